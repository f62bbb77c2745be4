#!/bin/sh
# mmdebstrap --customize-hook of the full-OS guest (qemu-harness/harness/guestimage.py): runs on the host with
# the new root as $1 (proc, sys and dev mounted inside it by mmdebstrap). Everything that makes the image a lean
# test VM is here; its content is part of the image's cache key.
#   $1 root  $2 folder of these files  $3 flavour (dracut | initramfs-tools)
#   $4 root fs UUID  $5 boot fs UUID
set -eu
root=$1 src=$2 flavour=$3 root_uuid=$4 boot_uuid=$5

# fstab by UUID, like a real image: separate /boot (RHEL/CentOS-like layout)
cat >"$root/etc/fstab" <<FSTAB
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=$root_uuid / ext4 errors=remount-ro 0 1
UUID=$boot_uuid /boot ext4 defaults 0 2
FSTAB
echo initcrypt-guest >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tinitcrypt-guest\n' >"$root/etc/hosts"

# GRUB's configuration as a cloud image has it: update-grub runs inside the guest (grub-probe needs the real disk)
mkdir -p "$root/boot/grub"
cp "$root/usr/share/grub/default/grub" "$root/etc/default/grub"
sed -i -e 's/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=0/' \
	-e 's/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="console=ttyS0"/' "$root/etc/default/grub"
cat >>"$root/etc/default/grub" <<'GRUB'
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB

# not a first boot (systemd-firstboot would prompt on the console), no logins, nothing periodic
chroot "$root" systemd-machine-id-setup >/dev/null
chroot "$root" systemctl mask -q getty@.service serial-getty@.service console-getty.service \
	getty-static.service systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
	dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer remote-fs.target \
	systemd-pstore.service

# the harness's runner: after the boot, the script the host delivers on a small virtio disk
install -D -m 0755 "$src/harness-run" "$root/usr/lib/initcrypt-harness/harness-run"
install -D -m 0644 "$src/initcrypt-harness.service" "$root/usr/lib/systemd/system/initcrypt-harness.service"
install -D -m 0644 "$src/emergency-harness.conf" "$root/etc/systemd/system/emergency.service.d/harness.conf"
chroot "$root" systemctl enable -q initcrypt-harness.service

# known files for the host checks (marker string, random data), written by guestimage.py before this hook
[ -f "$root/etc/initcrypt-test/marker" ]
