#!/bin/sh
# mmdebstrap customize hook shared by every apflab image. $1 = the new root.
# Inputs come from the environment set by apflab.images (all under the recipe):
#   APFLAB_COMMON   guest_images/common
#   APFLAB_HOSTNAME hostname for this image
#   APFLAB_EXTRA    optional second hook (the recipe's own customize.sh)
set -eu
root=$1
cp -a "$APFLAB_COMMON/overlay/." "$root/"
echo "$APFLAB_HOSTNAME" > "$root/etc/hostname"
printf '127.0.1.1\t%s\n' "$APFLAB_HOSTNAME" >> "$root/etc/hosts"
printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n' > "$root/etc/fstab"
cp "$APFLAB_COMMON/modules" "$root/etc/initramfs-tools/modules"
chroot "$root" systemctl enable systemd-networkd.service apflab-ssh-keys.service >/dev/null 2>&1
grep -v '^#' "$APFLAB_COMMON/masked-units" | while read -r unit; do
    [ -n "$unit" ] && ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# journald: keep logs in memory only (the disk is a throw-away overlay anyway)
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/apflab.conf"
# root has no usable password ('*'): no console login; SSH takes only the run's key
chroot "$root" usermod -p '*' root
if [ -n "${APFLAB_EXTRA:-}" ]; then
    "$APFLAB_EXTRA" "$root"
fi
chroot "$root" update-initramfs -u -k all >/dev/null
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
