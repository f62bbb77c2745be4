"""Booting a full-OS guest the way its own boot configuration says, bootloader-free.

Per boot the host reads the OS disk image (stock tools, no mount): the first menuentry of the guest's
/boot/grub/grub.cfg (written by the guest's own update-grub) gives the kernel, the initrd and the kernel command
line; the files are taken from the filesystem that the entry's `search --set=root` names (the /boot partition)
with debugfs. So a guest that rebuilt its initramfs, edited /etc/default/grub and ran update-grub boots the result at
its next boot, as a real VM would. QEMU gets `-kernel/-initrd/-append` = those + the harness's console arguments.

The scenario's script reaches the booted guest on a small read-only virtio disk with serial `harness-script`: a
tar archive written raw (boot.sh, harness.sh, scenario.sh, files/). initcrypt-harness.service (in the image) waits
for the end of the boot (After=multi-user.target), unpacks it under /run/initcrypt-harness and runs boot.sh, which
prints the facts, runs the script as root with its output on ttyS0 and powers off or reboots (both end QEMU:
-no-reboot). A disk and not the kernel command line (systemd.run=) because the same delivery keeps working when
issue [8] boots through a real GRUB, whose command line the host does not write; and not a virtio-serial channel
because a one-way, fire-and-forget script needs no protocol.
"""

import hashlib
import io
import json
import re
import shlex
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .util import HARNESS_DIR, HarnessError, run, sha256_file

MiB = 1 << 20
SCRIPT_SERIAL = "harness-script"
SCRIPT_DISK_SIZE = 4 * MiB
# what the harness adds to the guest's own command line (each only if the guest's arguments lack it)
# no_timer_check: see vm.py (TCG on a loaded host can miss the early IO-APIC timer check and panic).
HARNESS_ARGS = ["console=ttyS0", "panic=-1", "rd.shell=0", "rd.emergency=poweroff", "no_timer_check"]


@dataclass
class BootConfig:
    kernel: Path
    initrd: Path | None
    args: str          # the menuentry's `linux` arguments, as grub.cfg has them
    title: str
    kernel_path: str   # as grub.cfg names them (relative to the filesystem `search` chose)
    initrd_path: str | None
    fs_uuid: str       # the filesystem they were read from
    grub_cfg_sha256: str
    initrd_sha256: str | None


# ------------------------------------------------------------------------------------------------ reading the disk

def partitions(image: Path) -> list[dict]:
    table = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return [{"name": p.get("name", ""), "offset": p["start"] * sector, "size": p["size"] * sector,
             "uuid": p.get("uuid", "").lower(), "number": i + 1} for i, p in enumerate(table["partitions"])]


def ext_info(image: Path, offset: int) -> dict | None:
    """UUID and whether the journal needs a replay, of an ext2/3/4 filesystem at offset (None: not ext)."""
    p = subprocess.run(["dumpe2fs", "-h", f"{image}?offset={offset}"], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    info = {}
    for line in p.stdout.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    return {"uuid": info.get("Filesystem UUID", "").lower(),
            "needs_recovery": "needs_recovery" in info.get("Filesystem features", "")}


class ExtReader:
    """Read-only access to one ext filesystem in a disk image with debugfs. A filesystem whose journal needs a
    replay (a power cut) is read from a copy whose journal was replayed (e2fsck -E journal_only), as the next mount
    would see it: reading it in place could return stale blocks."""

    def __init__(self, image: Path, part: dict, work: Path):
        self.image, self.part = image, part
        info = ext_info(image, part["offset"])
        if info is None:
            raise HarnessError(f"{image} partition {part['number']} is not an ext filesystem")
        self.uuid = info["uuid"]
        self.spec = f"{image}?offset={part['offset']}"
        self.copy = None
        if info["needs_recovery"]:
            work.mkdir(parents=True, exist_ok=True)
            self.copy = work / f"p{part['number']}.replayed.img"
            with open(image, "rb") as src, open(self.copy, "wb") as dst:
                src.seek(part["offset"])
                left = part["size"]
                while left:
                    block = src.read(min(left, 8 * MiB))
                    if not block:
                        break
                    dst.write(block)
                    left -= len(block)
            r = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(self.copy)], capture_output=True, text=True)
            if r.returncode not in (0, 1):
                raise HarnessError(f"e2fsck -E journal_only of a copy of {image} p{part['number']}: rc "
                                   f"{r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}")
            self.spec = str(self.copy)

    def cat(self, path: str) -> bytes | None:
        p = subprocess.run(["debugfs", "-R", f"cat {path}", self.spec], capture_output=True)
        if p.returncode != 0 or b"File not found" in p.stderr:
            return None
        return p.stdout

    def exists(self, path: str) -> bool:
        p = subprocess.run(["debugfs", "-R", f"stat {path}", self.spec], capture_output=True, text=True)
        return p.returncode == 0 and "Inode:" in p.stdout

    def dump(self, path: str, dest: Path) -> None:
        dest.unlink(missing_ok=True)
        subprocess.run(["debugfs", "-R", f"dump {path} {dest}", self.spec], capture_output=True)
        if not dest.exists():
            raise HarnessError(f"{path} not found on the filesystem {self.uuid} of {self.image}")

    def close(self):
        if self.copy:
            self.copy.unlink(missing_ok=True)


def parse_first_menuentry(cfg: str) -> dict:
    """The first `menuentry` of a grub.cfg (nested in a submenu or not): its title, `search ... --set=root UUID`,
    `linux PATH ARGS...` and `initrd PATH...`. Only what Debian's grub-mkconfig writes is understood; a `$variable`
    in the linux line is an error (the host could not know its value)."""
    entry, depth, start_depth = None, 0, None
    for raw in cfg.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, posix=True)
        if entry is None and words and words[0] == "menuentry":
            entry = {"title": words[1] if len(words) > 1 else "", "search": None, "linux": None, "initrd": None}
            start_depth = depth
        if entry is not None and words:
            if words[0] == "search" and "--set=root" in words:
                entry["search"] = words[-1].lower()
            elif words[0] in ("linux", "linuxefi", "linux16"):
                entry["linux"] = words[1:]
            elif words[0] in ("initrd", "initrdefi", "initrd16"):
                entry["initrd"] = words[1:]
        depth += line.count("{") - line.count("}")
        if entry is not None and depth <= start_depth and line.endswith("}"):
            break
    if entry is None or not entry["linux"]:
        raise HarnessError("grub.cfg has no menuentry with a linux line")
    if any("$" in w for w in entry["linux"]):
        raise HarnessError(f"grub.cfg's first menuentry uses a variable on its linux line: {entry['linux']}")
    return entry


def read_boot_config(image: Path, work: Path) -> BootConfig:
    """Kernel, initrd and arguments of the first menuentry of the guest's grub.cfg, files copied into work/."""
    work.mkdir(parents=True, exist_ok=True)
    readers = []
    try:
        for part in partitions(image):
            if ext_info(image, part["offset"]) is not None:
                readers.append(ExtReader(image, part, work / "replay"))
        cfg, cfg_reader = None, None
        for r in readers:  # a separate /boot holds grub/grub.cfg; a root without one, boot/grub/grub.cfg
            for path in ("/grub/grub.cfg", "/boot/grub/grub.cfg"):
                data = r.cat(path)
                if data:
                    cfg, cfg_reader = data, r
                    break
            if cfg:
                break
        if cfg is None:
            raise HarnessError(f"no grub/grub.cfg on any ext filesystem of {image} (did update-grub run?)")
        (work / "grub.cfg").write_bytes(cfg)
        entry = parse_first_menuentry(cfg.decode(errors="replace"))
        files = cfg_reader
        if entry["search"]:
            files = next((r for r in readers if r.uuid == entry["search"]), None)
            if files is None:
                raise HarnessError(f"grub.cfg searches the filesystem {entry['search']}, not found on {image}")
        kpath, args = entry["linux"][0], " ".join(entry["linux"][1:])
        kernel = work / "vmlinuz"
        files.dump(kpath, kernel)
        initrd, ipath, isha = None, None, None
        if entry["initrd"]:
            if len(entry["initrd"]) > 1:
                raise HarnessError(f"grub.cfg loads several initrds {entry['initrd']}: not supported yet")
            ipath = entry["initrd"][0]
            initrd = work / "initrd.img"
            files.dump(ipath, initrd)
            isha = sha256_file(initrd)
        return BootConfig(kernel=kernel, initrd=initrd, args=args, title=entry["title"], kernel_path=kpath,
                          initrd_path=ipath, fs_uuid=files.uuid, grub_cfg_sha256=hashlib.sha256(cfg).hexdigest(),
                          initrd_sha256=isha)
    finally:
        for r in readers:
            r.close()


def full_cmdline(guest_args: str, extra: str) -> str:
    """The guest's own arguments, then those of HARNESS_ARGS it lacks (console=ttyS0 unless present as such; the
    others unless the guest sets that parameter itself), then the scenario's."""
    words = guest_args.split()
    names = {w.split("=", 1)[0] for w in words}
    add = [a for a in HARNESS_ARGS
           if (a not in words if a.startswith("console=") else a.split("=", 1)[0] not in names)]
    return " ".join(words + add + extra.split())


# ------------------------------------------------------------------------------------------------- the script disk

BOOT_SH = r'''#!/bin/sh
# generated by qemu-harness for one boot of a full-OS scenario (run by the image's initcrypt-harness.service)
. ./harness.sh
. ./boot.env
stamp runner
state=$(systemctl is-system-running --wait 2>/dev/null)
read -r up _ </proc/uptime
mark BOOT "$BOOT"
mark SYSTEM_STATE "$state"
mark BOOT_FINISHED_UPTIME "$up"
mark BOOT_CMDLINE "$(cat /proc/cmdline)"
mark BOOT_ANALYZE "$(systemd-analyze time 2>/dev/null | head -n 1)"
[ "$state" = running ] || systemctl --no-pager --failed
if [ -d files ]; then cp -a files/. / && mark FILES_INSTALLED "$(find files -type f | wc -l)"; fi
[ -f setup.sh ] && . ./setup.sh
sh ./scenario.sh
mark SCENARIO_RC $?
mark HARNESS_DONE 1
sync
case "$END" in
reboot) systemctl reboot ;;
poweroff) systemctl poweroff ;;
esac
'''


def script_disk(path: Path, *, boot: int, end: str, script: str, setup: str = "", files: dict | None = None) -> None:
    """The raw tar archive the guest's runner unpacks; padded to SCRIPT_DISK_SIZE."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        def add(name: str, data: bytes, mode: int = 0o644):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, 0, 0, 0
            t.addfile(info, io.BytesIO(data))
        add("boot.sh", BOOT_SH.encode(), 0o755)
        add("boot.env", f"BOOT={boot}\nEND={end}\n".encode())
        add("harness.sh", (HARNESS_DIR / "guest" / "harness.sh").read_bytes())
        add("scenario.sh", ("# generated by qemu-harness from the scenario's [[boot]] script\n. ./harness.sh\n"
                            + script).encode(), 0o755)
        if setup:
            add("setup.sh", setup.encode())
        for guest_path, content in (files or {}).items():
            if not guest_path.startswith("/"):
                raise HarnessError(f"files: {guest_path!r} must be an absolute guest path")
            add("files" + guest_path, content.encode(), 0o755 if content.startswith("#!") else 0o644)
    data = buf.getvalue()
    if len(data) > SCRIPT_DISK_SIZE:
        raise HarnessError(f"the boot's script and files take {len(data)} bytes, more than {SCRIPT_DISK_SIZE}")
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(SCRIPT_DISK_SIZE)


def reboot_kind(transcript: str) -> str:
    """How the guest ended, from the kernel's last line: reboot | poweroff | unknown."""
    if "reboot: Restarting system" in transcript:
        return "reboot"
    if "reboot: Power down" in transcript:
        return "poweroff"
    return "unknown"


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def copy_tree_boot(reader: ExtReader, src: str, dest: Path) -> None:
    """debugfs rdump of a folder (e.g. /grub) into dest/."""
    dest.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["debugfs", "-R", f"rdump {src} {dest}", reader.spec], capture_output=True, text=True)
    if p.returncode != 0 or not (dest / Path(src).name).exists():
        raise HarnessError(f"debugfs rdump {src}: {p.stderr.strip()[-300:]}")

