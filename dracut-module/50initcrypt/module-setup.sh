#!/bin/bash
# dracut module "initcrypt": puts the static initcrypt binary, its units and generator, and
# volumes.json into a systemd initrd. At boot, initcrypt-generator turns volumes.json (or ADE's
# rd.luks.ade.* parameters) into crypttab lines for the stock systemd-cryptsetup@ units, plus
# initcrypt-keys.service (key files from the key volume) and initcrypt-encrypt@<name> (the in-place
# pass) ordered before them. Every failure here fails the image build, never the boot.
#
# INITCRYPT_ROOT=<dir> builds from a staged install (image builders, the QEMU harness) instead of /.
# shellcheck disable=SC2154 # dracut defines initdir, systemdutildir, systemdsystemunitdir and SYSTEMCTL

# The staged install root, or empty for the running system.
initcrypt_root() {
    # Unset means the files installed on this machine.
    printf '%s' "${INITCRYPT_ROOT:-}"
}

# True when this machine has volumes for initcrypt to open at boot.
initcrypt_wanted() {
    # volumes.json names them ...
    [[ -f "$(initcrypt_root)/etc/initcrypt/volumes.json" ]] && return 0
    # ... or ADE's parameters do (running now, or configured for the next boot).
    grep -qs 'rd\.luks\.ade\.' /proc/cmdline /etc/default/grub /etc/kernel/cmdline
}

# called by dracut
check() {
    # Without the binary the module cannot work: never include half of it.
    require_binaries "$(initcrypt_root)/usr/sbin/initcrypt" || return 1
    if initcrypt_wanted; then
        # Without systemd-cryptsetup, dracut would drop this module (and crypt) with a message
        # and still write an image that cannot open the root: fail the build instead.
        if [[ ! -x "$dracutsysrootdir$systemdutildir/systemd-cryptsetup" ]]; then
            dfatal "initcrypt: $systemdutildir/systemd-cryptsetup is missing; install systemd's cryptsetup support before building this initramfs"
            exit 1
        fi
        # Included in every image of this machine.
        return 0
    fi
    # Otherwise only on request (--add initcrypt, add_dracutmodules+=" initcrypt ").
    return 255
}

# called by dracut
depends() {
    # Units and generators need systemd in the initrd; "crypt" brings systemd-cryptsetup, its
    # generator, dm and the crypto modules.
    echo systemd crypt
}

# called by dracut
installkernel() {
    # dm-crypt and the ciphers of every layout we write or ADE wrote (aes-xts-plain64 with AES-NI
    # or without), in every image, also when the build host itself uses none of them (hostonly='').
    hostonly='' instmods dm_crypt xts aesni_intel aes_generic sha256_ssse3 sha256_generic cbc
    # The disk drivers of the clouds we run on (key volume and OS disk), for generic images.
    hostonly='' instmods virtio_blk virtio_scsi virtio_pci sd_mod hv_storvsc hv_vmbus nvme
}

# called by dracut
install() {
    local root unit
    # Where the files come from (see the top of this file).
    root=$(initcrypt_root)
    # The binary is static: inst_simple copies it alone, with no library to chase.
    inst_simple "$root/usr/sbin/initcrypt" /usr/sbin/initcrypt || exit 1
    # The folders of the two names below (ln_r does not create them).
    inst_dir "$systemdutildir/system-generators" || exit 1
    # (one per call: inst_dir returns early when its first argument exists)
    inst_dir /usr/lib/initcrypt || exit 1
    # systemd runs generators by name from this directory; the binary dispatches on argv[0].
    ln_r /usr/sbin/initcrypt "$systemdutildir/system-generators/initcrypt-generator" || exit 1
    # crypttab lines that prefer keyscript= use the same binary under this name.
    ln_r /usr/sbin/initcrypt /usr/lib/initcrypt/initcrypt-keyscript || exit 1
    # What the volumes should be; absent for ADE VMs that only pass rd.luks.ade.* parameters.
    if [[ -f "$root/etc/initcrypt/volumes.json" ]]; then
        # The file holds names and device specs, never keys.
        inst_simple "$root/etc/initcrypt/volumes.json" /etc/initcrypt/volumes.json || exit 1
    fi
    # Our units; a missing one fails the build here instead of the boot later.
    for unit in initcrypt-keys.service initcrypt-keys-cleanup.service initcrypt-encrypt@.service \
        initcrypt-encrypt-data@.service initcrypt-decrypt@.service initcrypt-decrypt-data@.service; do
        # Installed by scripts/install or the package under /usr/lib/systemd/system.
        inst_simple "$root/usr/lib/systemd/system/$unit" "$systemdsystemunitdir/$unit" || exit 1
    done
    # The stock pieces that open the volumes from the crypttab lines our generator writes.
    inst_multiple "$systemdutildir/systemd-cryptsetup" \
        "$systemdutildir/system-generators/systemd-cryptsetup-generator" || exit 1
    # The key files are read at the start of every boot, whether or not a volume needs them.
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target initcrypt-keys.service || exit 1
    # And removed before the switch to the real root ...
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target initcrypt-keys-cleanup.service || exit 1
    # ... or on the way to the emergency shell, whose isolate would cancel the first request.
    $SYSTEMCTL -q --root "$initdir" add-wants emergency.target initcrypt-keys-cleanup.service || exit 1
}
