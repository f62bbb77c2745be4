"""qemu-harness/run --selftest: the host-side parts of the full-OS machinery that need no QEMU, each checked to
pass on good input and to fail on bad input (a check that cannot fail proves nothing).

  grub.cfg      the first menuentry of a Debian grub.cfg; a $variable on its linux line is refused
  cmdline       what the harness adds to the guest's own arguments
  script disk   the tar archive the guest's runner unpacks
  data disks    ext4/xfs/btrfs, GPT and whole disk: `plaintext` passes, and fails once a file's bytes change;
                encrypted in place by stock cryptsetup with a detached header on an OS boot partition: `encrypted`
                passes and `plaintext` fails
"""

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from . import diskcheck, disks, guestboot
from .util import HarnessError, log

GRUB_CFG = """\
set default="0"
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
fi
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-x' {
	load_video
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_gpt
	search --no-floppy --fs-uuid --set=root F6BFA0FA-acdb-4fb8-ad86-8d6b9b60908c
	echo	'Loading Linux 6.1.0-57-cloud-amd64 ...'
	linux	/vmlinuz-6.1.0-57-cloud-amd64 root=UUID=da015e1a ro console=ttyS0 quiet
	initrd	/initrd.img-6.1.0-57-cloud-amd64
}
submenu 'Advanced options' {
	menuentry 'second' {
		linux /vmlinuz-old root=/dev/sda2
	}
}
"""


def _expect(cond: bool, what: str, failures: list) -> None:
    log(f"selftest: {'ok  ' if cond else 'FAIL'} {what}")
    if not cond:
        failures.append(what)


def _grub(failures: list) -> None:
    e = guestboot.parse_first_menuentry(GRUB_CFG)
    _expect(e["linux"] == ["/vmlinuz-6.1.0-57-cloud-amd64", "root=UUID=da015e1a", "ro", "console=ttyS0", "quiet"]
            and e["initrd"] == ["/initrd.img-6.1.0-57-cloud-amd64"]
            and e["search"] == "f6bfa0fa-acdb-4fb8-ad86-8d6b9b60908c", "grub.cfg: first menuentry parsed", failures)
    try:
        guestboot.parse_first_menuentry(GRUB_CFG.replace("quiet", "$vt_handoff"))
        refused = False
    except HarnessError:
        refused = True
    _expect(refused, "grub.cfg: a $variable on the linux line is refused", failures)
    nested = guestboot.parse_first_menuentry("submenu 'x' {\n menuentry 'y' {\n  linux /k a=b\n }\n}\n")
    _expect(nested["linux"] == ["/k", "a=b"] and nested["initrd"] is None, "grub.cfg: entry inside a submenu",
            failures)


def _cmdline(failures: list) -> None:
    c = guestboot.full_cmdline("root=UUID=x ro console=ttyS0 quiet", "extra=1")
    _expect(c == "root=UUID=x ro console=ttyS0 quiet panic=-1 rd.shell=0 rd.emergency=poweroff no_timer_check extra=1",
            f"cmdline: harness arguments added once ({c})", failures)
    c = guestboot.full_cmdline("root=/dev/vda2 panic=5 console=tty0", "")
    _expect(c.split().count("console=ttyS0") == 1 and "panic=-1" not in c and c.endswith("rd.emergency=poweroff no_timer_check"),
            f"cmdline: the guest's own panic= kept, console=ttyS0 added ({c})", failures)


def _script_disk(work: Path, failures: list) -> None:
    img = work / "script.img"
    guestboot.script_disk(img, boot=2, end="reboot", script="mark X 1\n", setup="true\n",
                          files={"/etc/a/b": "content"})
    with tarfile.open(img) as t:
        names = set(t.getnames())
        env = t.extractfile("boot.env").read().decode()
    _expect({"boot.sh", "boot.env", "harness.sh", "scenario.sh", "setup.sh", "files/etc/a/b"} <= names
            and "END=reboot" in env and img.stat().st_size == guestboot.SCRIPT_DISK_SIZE,
            "script disk: tar with boot.sh, boot.env, harness.sh, scenario.sh, setup.sh, files/", failures)


def _flip_file_byte(image: Path, needle: bytes) -> bool:
    """Change one byte of the file whose content starts with needle (found in the raw image)."""
    data = image.read_bytes()
    i = data.find(needle)
    if i < 0:
        return False
    with open(image, "r+b") as f:
        f.seek(i + 100)
        b = f.read(1)
        f.seek(i + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    return True


def _data_disks(work: Path, failures: list) -> None:
    keys = disks.KeyStore(work / "keys")
    os_facts = disks.build_disk("plain-os", work / "os.img", {"root_size": "64M", "random_size": "1M"},
                                disks.BuildContext(workdir=work / "b" / "os", keys=keys))
    for fs in ("ext4", "xfs", "btrfs"):
        if fs == "btrfs" and not shutil.which("mkfs.btrfs"):
            log("selftest: skip btrfs (no mkfs.btrfs)")
            continue
        for layout in ("gpt", "none"):
            name = f"{fs}_{layout}"
            f = disks.build_disk("data", work / f"{name}.img", {"fs": fs, "layout": layout, "random_size": "1M",
                                                                "size": "128M" if fs == "btrfs" else "64M"},
                                 disks.BuildContext(workdir=work / "b" / name, keys=keys))
            facts = {name: f, "os": dict(os_facts)}
            images = {name: work / f"{name}.img", "os": work / "os.img"}
            hdr_path = f"luks/{name}.hdr"
            fails, _ = diskcheck.check_guest_disk(name, {"plaintext": True, "header": hdr_path}, facts, keys,
                                                  images, work, "os")
            _expect(not fails, f"{name}: plaintext check passes on the fresh disk {fails}", failures)
            # the encrypted layout initcrypt's data pass leaves: detached header on the OS boot partition, offset 0
            off, size = int(f["part_offset"]), int(f["part_size"])
            part, hdr = work / "part.img", work / "hdr"
            diskcheck._extract(images[name], {"offset": off, "size": size}, part)
            hdr.unlink(missing_ok=True)
            with open(hdr, "wb") as h:
                h.truncate(16 << 20)
            subprocess.run(["cryptsetup", "-q", "reencrypt", "--encrypt", "--type", "luks2", "--header", str(hdr),
                            "--key-file", str(keys.file("default")), *disks.PBKDF_ARGS, str(part)],
                           check=True, stdin=subprocess.DEVNULL, capture_output=True)
            disks.write_at(images[name], part, off)
            subprocess.run(["debugfs", "-w", "-R", f"write {hdr} /{hdr_path}",
                            f"{images['os']}?offset={os_facts['boot_offset']}"], check=True, capture_output=True)
            fails, _ = diskcheck.check_guest_disk(name, {"encrypted": True, "header": hdr_path}, facts, keys,
                                                  images, work, "os")
            _expect(not fails, f"{name}: encrypted check passes after a stock in-place encryption {fails}", failures)
            if fs == "ext4":  # (xfs_repair searching a noise image for superblocks takes minutes)
                fails, _ = diskcheck.check_guest_disk(name, {"plaintext": True, "header": hdr_path}, facts, keys,
                                                      images, work, "os")
                _expect(len(fails) >= 2, f"{name}: plaintext check fails on the encrypted disk ({len(fails)} "
                        "findings)", failures)
            subprocess.run(["debugfs", "-w", "-R", f"rm /{hdr_path}",
                            f"{images['os']}?offset={os_facts['boot_offset']}"], check=True, capture_output=True)
        # one changed byte in a plaintext file must be seen
        name = f"{fs}_changed"
        f = disks.build_disk("data", work / f"{name}.img", {"fs": fs, "layout": "none", "random_size": "1M",
                                                            "size": "128M" if fs == "btrfs" else "64M"},
                             disks.BuildContext(workdir=work / "b" / name, keys=keys))
        flipped = _flip_file_byte(work / f"{name}.img", f["marker_string"].encode())
        fails, _ = diskcheck.check_guest_disk(name, {"plaintext": True, "header": "luks/x.hdr"},
                                              {name: f, "os": dict(os_facts)}, keys,
                                              {name: work / f"{name}.img", "os": work / "os.img"}, work, "os")
        _expect(flipped and any("/initcrypt-test/marker has sha256" in x for x in fails),
                f"{name}: a changed byte in a file fails the plaintext check", failures)


def main() -> int:
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qemu-harness-selftest-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        _grub(failures)
        _cmdline(failures)
        _script_disk(work, failures)
        _data_disks(work, failures)
    total = sum(1 for _ in failures)
    print(f"selftest: {total} failed" if total else "selftest: all passed", flush=True)
    return 1 if failures else 0
