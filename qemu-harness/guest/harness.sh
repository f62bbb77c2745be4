# Shell library for scenario scripts (sourced by /init; scenario scripts source it again).
# Facts go to the console as "@@NAME=VALUE"; the host parses them and compares with the scenario's expect_facts.

mark() { echo "@@$1=$2"; }

# stamp NAME: uptime stamp in the transcript ("T_INIT NAME <seconds since kernel start>")
stamp() { read -r up _ < /proc/uptime; echo "T_INIT $1 $up"; }

sha256_of() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }

# dev_by_serial SERIAL: /dev/vdX whose virtio-blk serial is SERIAL (the host sets serial=<disk name>)
dev_by_serial() {
	for s in /sys/block/vd*/serial; do
		[ -f "$s" ] || continue
		if [ "$(cat "$s")" = "$1" ]; then d=${s%/serial}; echo "/dev/${d##*/}"; return 0; fi
	done
	return 1
}

# dev_by_hctl H:C:T:L: /dev/sdX of a SCSI disk (virtio-scsi controller N is usually host N)
dev_by_hctl() {
	for b in /sys/class/scsi_disk/"$1"/device/block/*; do
		[ -e "$b" ] && { echo "/dev/${b##*/}"; return 0; }
	done
	return 1
}

# vfat_facts: proves nothing mounted or loaded FAT support (initcrypt reads FAT itself)
vfat_facts() {
	mark VFAT_FS "$(grep -c vfat /proc/filesystems)"
	mark VFAT_MODULE "$(grep -c -E '^(vfat|fat) ' /proc/modules)"
}

# mount_sha DEV MOUNTPOINT FILE FACT: mount DEV read-only, mark FACT=sha256 of FILE (or "missing"), unmount.
# DEV itself is made read-only first (blockdev --setro): `mount -o ro` of xfs on a writable device still writes
# to it (measured: the root partition then no longer decrypts to the original bytes).
mount_sha() {
	mkdir -p "$2"
	blockdev --setro "$1"
	if mount -o ro "$1" "$2"; then
		v=$(sha256_of "$2$3")
		mark "$4" "${v:-missing}"
		umount "$2"
	else
		mark "$4" "mount-failed"
	fi
}

# block_size DEV: size in bytes of a block device
block_size() { blockdev --getsize64 "$1"; }

dump_dmesg() { echo "----- dmesg -----"; dmesg; echo "----- end dmesg -----"; }

# Full-OS guests only (the host answers these lines through QMP while the script runs):
# hotplug NAME [PATH]: attach the scenario's [[disk]] NAME now; waits up to 60 s for PATH (default its virtio by-id link)
hotplug() {
	echo "@@HOTPLUG_REQUEST=$1"
	p=${2:-/dev/disk/by-id/virtio-$1}
	i=0
	while [ ! -e "$p" ] && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
	[ -e "$p" ]
}
# unplug NAME [PATH]: detach it (ACPI eject); waits up to 60 s for PATH to go
unplug() {
	echo "@@UNPLUG_REQUEST=$1"
	p=${2:-/dev/disk/by-id/virtio-$1}
	i=0
	while [ -e "$p" ] && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
	[ ! -e "$p" ]
}
