#!/bin/sh
# Guest-specific part of the image ($1 = root). APFLAB_WORKLOAD = the static
# apflab-memtouch binary built on the host from guest_images/workload/.
set -eu
install -m 755 "$APFLAB_WORKLOAD" "$1/usr/local/bin/apflab-memtouch"
