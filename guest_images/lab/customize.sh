#!/bin/sh
# Lab-specific part of the image ($1 = root): apflab's pinned Python
# dependencies installed offline from wheels prepared on the host
# (APFLAB_WHEELS = wheel dir, APFLAB_LOCK = requirements.lock). apflab itself
# and the tests are not baked in: `apflab lab up` brings the current source.
set -eu
root=$1
mkdir -p "$root/tmp/apflab-wheels"
cp "$APFLAB_WHEELS"/*.whl "$APFLAB_LOCK" "$root/tmp/apflab-wheels/"
chroot "$root" python3 -m venv /opt/apflab/venv
chroot "$root" /opt/apflab/venv/bin/pip install -q --no-index --no-cache-dir \
    --find-links /tmp/apflab-wheels -r /tmp/apflab-wheels/requirements.lock
rm -rf "$root/tmp/apflab-wheels"
# L1 loads the KVM vendor module early (udev would too, but late) and gives
# the guests' cgroups a memory controller (cgroup v2 is bookworm's default).
printf 'kvm\nkvm_amd\n' > "$root/etc/modules-load.d/apflab-kvm.conf"
