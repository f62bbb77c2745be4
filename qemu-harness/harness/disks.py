"""Disk builders: raw image files made on the host with stock tools, without loop devices, mounts or dm.

Each builder takes (image path, params, context) and returns its facts (strings), usable as
{<disk>.<fact>} in kernel args, guest files, the guest script and expectations.

  bek        FAT12/16/32 key volume (mkfs.vfat [--offset] + mcopy)                facts: fat layout label volume_id
  ade-os     GPT: boot (ext4 holding luks/osluksheader) + root (ext4 encrypted in place by stock cryptsetup
             with that detached header, data offset 0; reencrypt=partial: an interrupted stock reencryption)
                                                           facts: root_partuuid boot_partuuid boot_uuid root_fs_uuid
                                                                  luks_uuid luks_version header_path file_sha256 marker_path
                                                                  + the OS_FACTS below
  plain-os   GPT: boot (ext4, empty luks/ or nothing) + root (plaintext ext4 or xfs) for the in-place pass
                                                           facts: root_partuuid boot_partuuid boot_uuid root_fs_uuid fs
                                                                  header_path file_sha256 marker_path + the OS_FACTS below
  bootable = true (ade-os, plain-os): the root also holds busybox, /etc/os-release and a /sbin/init that prints
             the ROOT_* facts, for real dracut/mkinitramfs images that switch into it
  OS_FACTS (ade-os, plain-os): root_sha256 (plaintext root partition before anything), marker_string (a distinctive
             string inside the marker file), boot_offset boot_size root_offset root_size (bytes), key_name
  luks-data  attached LUKS2 header, ext4 inside (reencrypt --encrypt --reduce-device-size) or no filesystem
                                                           facts: luks_uuid fs_uuid file_sha256 marker_path data_offset mapped_size
  plain      zero-filled raw image                         facts: (generic only)
Every disk also gets: path size image_sha256 (before the boot) serial.
"""

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .util import HarnessError, parse_size, run, sha256_file

MiB = 1 << 20
SECTOR = 512
PBKDF_ARGS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MS_BASIC_DATA_GUID = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"


def ade_passphrase() -> bytes:
    """What ADE writes to the key volume: base64 of 127 random bytes, 172 chars, no newline."""
    return base64.b64encode(secrets.token_bytes(127))


@dataclass
class KeyStore:
    """Named passphrases of one scenario run, generated on first use and shared by all its disks."""
    folder: Path
    keys: dict = field(default_factory=dict)

    def get(self, name: str) -> bytes:
        if name not in self.keys:
            self.keys[name] = ade_passphrase()
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_bytes(self.keys[name])
        return self.keys[name]

    def file(self, name: str) -> Path:
        self.get(name)
        return self.folder / name


@dataclass
class BuildContext:
    workdir: Path  # scratch folder for this disk
    keys: KeyStore


class Params:
    """Builder parameters with defaults; unknown keys are an error (typos must not pass silently)."""

    def __init__(self, builder: str, params: dict):
        self.builder, self.left = builder, dict(params)

    def get(self, key, default):
        return self.left.pop(key, default)

    def done(self):
        if self.left:
            raise HarnessError(f"builder {self.builder}: unknown parameter(s) {sorted(self.left)}")


# ---------------------------------------------------------------------------------------------------------- helpers

def make_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def write_at(image: Path, part: Path, offset: int) -> None:
    """dd of a partition image into the disk image at a byte offset (conv=notrunc,sparse)."""
    run(["dd", f"if={part}", f"of={image}", "bs=1M", "conv=notrunc,sparse", "oflag=seek_bytes",
         f"seek={offset}", "status=none"])


def sfdisk(image: Path, script: str) -> list[dict]:
    """Partition an image file; return its partitions as sfdisk --json reports them (start/size in sectors)."""
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image], input=script.encode())
    table = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]
    return table["partitions"]


def marker_tree(folder: Path, rel: str = "etc/marker") -> tuple[str, str]:
    """A folder holding one file of random content; returns (path in the fs, sha256)."""
    data = secrets.token_hex(2048).encode() + b"\n"
    f = folder / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return "/" + rel, hashlib.sha256(data).hexdigest()


def mkfs_ext4(image: Path, size: int, tree: Path, fs_uuid: str, label: str = "") -> None:
    make_file(image, size)
    cmd = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", fs_uuid, "-d", tree]
    if label:
        cmd += ["-L", label]
    run(cmd + [image])


def luks_uuid(header_or_device: Path) -> str:
    return run(["cryptsetup", "luksUUID", header_or_device]).stdout.strip()


# --------------------------------------------------------------------------------------------------------- builders

def build_plain(image: Path, p: Params, ctx: BuildContext) -> dict:
    size = parse_size(p.get("size", "16M"))
    p.done()
    make_file(image, size)
    return {}


FAT_DEFAULT_SIZE = {12: "8M", 16: "48M", 32: "64M"}
MBR_TYPE = {12: "1", 16: "e", 32: "c"}


def build_bek(image: Path, p: Params, ctx: BuildContext) -> dict:
    fat = int(p.get("fat", 16))
    if fat not in FAT_DEFAULT_SIZE:
        raise HarnessError(f"bek: fat must be 12, 16 or 32, not {fat}")
    layout = p.get("layout", "mbr")
    size = parse_size(p.get("size", FAT_DEFAULT_SIZE[fat]))
    label = p.get("label", "BEK VOLUME")
    files = p.get("files", {"LinuxPassPhraseFileName": "key:default"})
    p.done()

    make_file(image, size)
    if layout == "none":
        offset, sectors = 0, size // SECTOR
    elif layout in ("mbr", "gpt"):
        if layout == "mbr":
            script = f"label: dos\nstart=2048, type={MBR_TYPE[fat]}\n"
        else:
            script = f"label: gpt\nstart=2048, type={MS_BASIC_DATA_GUID}, name=\"Basic data partition\"\n"
        part = sfdisk(image, script)[0]
        offset, sectors = part["start"] * SECTOR, part["size"]
    else:
        raise HarnessError(f"bek: layout must be mbr, gpt or none, not {layout!r}")

    volume_id = secrets.token_hex(4).upper()
    cmd = ["mkfs.vfat", "-F", str(fat), "-n", label, "-i", volume_id]
    if fat == 32:
        cmd += ["-s", "1"]
    if offset:
        cmd += ["--offset", str(offset // SECTOR)]
    run(cmd + [image, str(sectors * SECTOR // 1024)])

    staged = ctx.workdir / "bek-files"
    staged.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        content = ctx.keys.get(value[4:]) if value.startswith("key:") else value.encode()
        local = staged / name
        local.write_bytes(content)
        run(["mcopy", "-i", f"{image}@@{offset}", local, f"::/{name}"], env={"MTOOLS_SKIP_CHECK": "1"})
    return {"fat": f"FAT{fat}", "layout": layout, "label": label,
            "volume_id": f"{volume_id[:4]}-{volume_id[4:]}"}


def os_tree(folder: Path, random_size: int, bootable: bool = False) -> dict:
    """Root filesystem content of the OS builders: /etc/marker (a distinctive string + random hex) and
    /var/lib/initcrypt-test/random.bin (random_size random bytes, so the partition is not mostly zeros).
    bootable: also a busybox root that a real initramfs can switch into (see ROOT_INIT)."""
    marker_string = f"initcrypt-marker-{secrets.token_hex(16)}"
    data = (marker_string + "\n" + secrets.token_hex(2048) + "\n").encode()
    marker = folder / "etc" / "marker"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(data)
    if random_size:
        rnd = folder / "var" / "lib" / "initcrypt-test" / "random.bin"
        rnd.parent.mkdir(parents=True, exist_ok=True)
        with open(rnd, "wb") as f:
            left = random_size
            while left:
                n = min(left, MiB)
                f.write(secrets.token_bytes(n))
                left -= n
    if bootable:
        bootable_tree(folder)
    return {"marker_path": "/etc/marker", "file_sha256": hashlib.sha256(data).hexdigest(),
            "marker_string": marker_string}


BUSYBOX = Path("/bin/busybox")  # busybox-static: the root needs no library
OS_RELEASE = "NAME=initcrypt-harness-root\nID=initcrypt-harness\n"  # systemd switches only into a root with it
# /sbin/init of a bootable root (busybox sh, as PID 1 after the initramfs's switch-root): the @@facts a real-initramfs
# scenario asserts, then power off. Every command is `$bb applet`: the root has no applet links (and Debian's
# busybox-static has no `mountpoint`).
ROOT_INIT = r"""#!/bin/sh
# /sbin/init of the qemu-harness bootable root: facts about how the initramfs left the system, then power off.
exec </dev/console >/dev/console 2>&1
bb=/bin/busybox
export PATH=/bin:/sbin
[ -r /proc/self/mountinfo ] || $bb mount -t proc proc /proc
[ -d /sys/class ] || $bb mount -t sysfs sysfs /sys
echo "@@ROOT_INIT=1"
echo "@@ROOT_SOURCE=$($bb awk '$2 == "/" { s = $1 } END { print s }' /proc/mounts)"
# mountinfo: field 3 = major:minor of the mounted device, 5 = mount point, 6 = per-mount options (ro|rw,...)
majmin=$($bb awk '$5 == "/" { d = $3 } END { print d }' /proc/self/mountinfo)
opts=$($bb awk '$5 == "/" { o = $6 } END { print o }' /proc/self/mountinfo)
dm=""
[ -r "/sys/dev/block/$majmin/dm/name" ] && dm=$($bb cat "/sys/dev/block/$majmin/dm/name")
echo "@@ROOT_DM_NAME=$dm"
# every open mapping, sorted: the ones the initramfs opened with x-initrd.attach survive the switch
names=""
for n in /sys/block/dm-*/dm/name; do [ -r "$n" ] && names="$names $($bb cat "$n")"; done
echo "@@DM_NAMES=$(echo $names | $bb tr ' ' '\n' | $bb sort | $bb tr '\n' ' ' | $bb sed 's/ $//')"
echo "@@MARKER_SHA256=$($bb sha256sum /etc/marker | $bb cut -d ' ' -f 1)"
keys=0
[ -d /run/cryptsetup-keys.d ] && keys=$($bb ls -A /run/cryptsetup-keys.d | $bb wc -l)
echo "@@KEY_FILES_LEFT=$keys"
echo "@@RUN_INITCRYPT_MOUNTS=$($bb awk '$2 ~ /^\/run\/initcrypt(\/|$)/' /proc/mounts | $bb wc -l)"
case ",$opts," in *,ro,*) echo "@@ROOT_RO=1" ;; *) echo "@@ROOT_RO=0" ;; esac
echo "@@HARNESS_DONE=1"
$bb sync
$bb poweroff -f
"""


def bootable_tree(folder: Path) -> None:
    """/bin/busybox (+ /bin/sh), /etc/os-release, /sbin/init printing the ROOT_* facts, empty mount points."""
    for d in ("bin", "sbin", "etc", "dev", "proc", "sys", "run", "tmp", "mnt"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    if not BUSYBOX.is_file():
        raise HarnessError(f"bootable root: {BUSYBOX} missing (install busybox-static)")
    shutil.copyfile(BUSYBOX, folder / "bin" / "busybox")
    (folder / "bin" / "busybox").chmod(0o755)
    (folder / "bin" / "sh").symlink_to("busybox")
    (folder / "etc" / "os-release").write_text(OS_RELEASE)
    init = folder / "sbin" / "init"
    init.write_text(ROOT_INIT)
    init.chmod(0o755)


def count_in_file(path: Path, needle: bytes, offset: int = 0, length: int | None = None) -> int:
    """Occurrences of needle in path[offset:offset+length] (what `grep -c -a -F` would see, but exact for binary
    data: a match spanning two read blocks counts too)."""
    count, tail = 0, b""
    with open(path, "rb") as f:
        f.seek(offset)
        left = length if length is not None else os.fstat(f.fileno()).st_size - offset
        while left > 0:
            block = f.read(min(left, 8 * MiB))
            if not block:
                break
            left -= len(block)
            buf = tail + block
            count += buf.count(needle)
            tail = buf[-(len(needle) - 1):] if len(needle) > 1 else b""
    return count


def xfs_protofile(tree: Path, proto: Path) -> None:
    """mkfs.xfs -p prototype of a host folder (see mkfs.xfs(8)): root dir, then entries, `$` ends a directory."""
    lines = ["initcrypt-test", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int):
        for e in sorted(d.iterdir()):
            if any(c in e.name for c in " :$\t\n"):
                raise HarnessError(f"xfs protofile: unsupported name {e}")
            pad = "  " * depth
            if e.is_symlink():
                lines.append(f"{pad}{e.name} l--777 0 0 {os.readlink(e)}")
            elif e.is_dir():
                lines.append(f"{pad}{e.name} d--755 0 0")
                walk(e, depth + 1)
                lines.append(f"{pad}$")
            else:
                mode = "755" if e.stat().st_mode & 0o100 else "644"
                lines.append(f"{pad}{e.name} ---{mode} 0 0 {e.resolve()}")
    walk(tree, 1)
    lines.append("$")
    proto.write_text("\n".join(lines) + "\n")


def mkfs_xfs(image: Path, size: int, tree: Path, fs_uuid: str, label: str, workdir: Path) -> None:
    """xfs on an image file, populated from tree through a protofile (no mount). mkfs.xfs >= 5.19 refuses
    filesystems under 300 MB unless it runs under fstests: its escape hatch (TEST_DIR, TEST_DEV, QA_CHECK_FS)
    is used for the small test roots; the kernel mounts them normally."""
    make_file(image, size)
    proto = workdir / "xfs.proto"
    xfs_protofile(tree, proto)
    env = {"TEST_DIR": "/nonexistent", "TEST_DEV": str(image), "QA_CHECK_FS": "0"} if size < 320 * MiB else None
    run(["mkfs.xfs", "-q", "-f", "-m", f"uuid={fs_uuid}", "-L", label, "-p", proto, image], env=env)


def gpt_boot_root(image: Path, boot_img: Path, root_img: Path) -> dict:
    """Disk image = GPT with p1 boot, p2 root (names boot/root, Linux filesystem type, random PARTUUIDs),
    partitions copied in at sfdisk's offsets. Returns partition facts (offsets and sizes in bytes)."""
    boot_size, root_size = boot_img.stat().st_size, root_img.stat().st_size
    boot_partuuid, root_partuuid = str(uuid.uuid4()), str(uuid.uuid4())
    first = 2048
    boot_sectors, root_sectors = boot_size // SECTOR, root_size // SECTOR
    make_file(image, (first + boot_sectors + root_sectors + 2048) * SECTOR)
    parts = sfdisk(image, (
        "label: gpt\nunit: sectors\n"
        f"start={first}, size={boot_sectors}, type={LINUX_FS_GUID}, uuid={boot_partuuid}, name=boot\n"
        f"start={first + boot_sectors}, size={root_sectors}, type={LINUX_FS_GUID}, uuid={root_partuuid}, name=root\n"))
    boot_off, root_off = parts[0]["start"] * SECTOR, parts[1]["start"] * SECTOR
    write_at(image, boot_img, boot_off)
    write_at(image, root_img, root_off)
    return {"boot_partuuid": boot_partuuid, "root_partuuid": root_partuuid, "boot_offset": boot_off,
            "boot_size": boot_size, "root_offset": root_off, "root_size": root_size}


def interrupt_stock_resume(header: Path, key: Path, device: Path, hotzone: str = "1M", limit: float = 120) -> int:
    """`cryptsetup reencrypt --resume-only` on an image file, stopped with SIGINT (cryptsetup's clean stop, at a
    hotzone boundary). Returns the bytes done.

    Measured with cryptsetup 2.6.1: a SIGINT that arrives before cryptsetup enters its reencryption loop (~1 s
    after start here) is lost and the pass then runs to its end, and a 128 MiB image file can be done within the
    0.5 s before the first --progress-json line. So SIGINT is repeated every 20 ms from 0.1 s on (the handler is
    installed at once): the first one inside the loop stops it after the current 1 MiB hotzone, whatever the host's
    speed. A run ended by a signal before doing anything is retried."""
    cmd = ["cryptsetup", "-q", "reencrypt", "--resume-only", "--hotzone-size", hotzone,
           "--header", str(header), "--key-file", str(key), "--force-offline-reencrypt", str(device)]
    for attempt in range(3):
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + limit
        try:
            time.sleep(0.1)
            while proc.poll() is None and time.monotonic() < deadline:
                proc.send_signal(signal.SIGINT)
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip()
        meta = json.loads(run(["cryptsetup", "luksDump", "--dump-json-metadata", header]).stdout)
        reqs = meta.get("config", {}).get("requirements", {}).get("mandatory", [])
        seg0 = meta["segments"]["0"]
        partial = (any(r.startswith("online-reencrypt") for r in reqs) and seg0["type"] == "crypt"
                   and seg0["size"] != "dynamic")
        if partial:
            return int(seg0["size"])
        if proc.returncode >= 0 or not any(r.startswith("online-reencrypt") for r in reqs):
            break  # it ran (to its end, or failed): retrying cannot help
    raise HarnessError(f"ade-os reencrypt=partial: the stock resume was not left partial (rc {proc.returncode}, "
                       f"{err!r}; segment 0 {seg0}, requirements {reqs})")


def build_ade_os(image: Path, p: Params, ctx: BuildContext) -> dict:
    """ADE's OS disk: p1 boot (plaintext ext4 with the detached header), p2 root (LUKS, data offset 0).

    reencrypt = "full" (default): stock offline `reencrypt --encrypt` to the end.
    reencrypt = "partial": what ADE's online flow leaves after an interruption: `reencrypt --encrypt --init-only`,
    then a stock `--resume-only` stopped part-way (SIGINT): header with the online-reencrypt requirement."""
    luks = p.get("luks", "luks2")
    boot_size = parse_size(p.get("boot_size", "64M"))
    root_size = parse_size(p.get("root_size", "64M"))
    header_size = parse_size(p.get("header_size", "32M"))  # ADE: dd bs=33554432 count=1 of zeros
    header_path = p.get("header_path", "luks/osluksheader")
    sector_size = p.get("sector_size", None)
    key = p.get("key", "default")
    mode = p.get("reencrypt", "full")
    random_size = parse_size(p.get("random_size", "1M"))
    bootable = bool(p.get("bootable", False))
    p.done()
    if luks not in ("luks1", "luks2"):
        raise HarnessError(f"ade-os: luks must be luks1 or luks2, not {luks!r}")
    if luks == "luks1" and sector_size not in (None, 512):
        raise HarnessError("ade-os: LUKS1 has 512-byte sectors only")
    if mode not in ("full", "partial"):
        raise HarnessError(f"ade-os: reencrypt must be full or partial, not {mode!r}")
    if mode == "partial" and luks != "luks2":
        raise HarnessError("ade-os: reencrypt=partial needs luks2 (LUKS1 has no resumable reencryption)")

    w = ctx.workdir
    root_tree, boot_tree = w / "root-tree", w / "boot-tree"
    tree_facts = os_tree(root_tree, random_size, bootable)
    root_img, boot_img = w / "root.img", w / "boot.img"
    root_fs_uuid, boot_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mkfs_ext4(root_img, root_size, root_tree, root_fs_uuid, label="root")
    root_sha = sha256_file(root_img)

    header = boot_tree / header_path
    make_file(header, header_size)
    # Stock cryptsetup 2.6.1 encrypts an image file in place offline without device-mapper only for LUKS2
    # (its LUKS1 reencryption goes through dm). LUKS1 = the same LUKS2 pass with 512-byte sectors, then
    # `cryptsetup convert --type luks1` of the header: same keyslot, same volume key, same ciphertext.
    key_file = ctx.keys.file(key)
    cmd = ["cryptsetup", "-q", "reencrypt", "--encrypt", "--type", "luks2", "--header", header,
           "--key-file", key_file, *PBKDF_ARGS]
    if luks == "luks1":
        cmd += ["--sector-size", "512"]
    elif sector_size:
        cmd += ["--sector-size", str(sector_size)]
    facts = {}
    if mode == "partial":
        run(cmd[:4] + ["--init-only"] + cmd[4:] + [root_img])
        facts["reencrypt_done_bytes"] = interrupt_stock_resume(header, key_file, root_img)
    else:
        run(cmd + [root_img])
    if luks == "luks1":
        run(["cryptsetup", "-q", "convert", "--type", "luks1", header])
    luks_id = luks_uuid(header)
    mkfs_ext4(boot_img, boot_size, boot_tree, boot_uuid, label="boot")

    facts.update(gpt_boot_root(image, boot_img, root_img))
    for f in (root_img, boot_img):
        f.unlink()
    shutil.rmtree(boot_tree)
    shutil.rmtree(root_tree)
    facts.update(tree_facts)
    facts.update(boot_uuid=boot_uuid, root_fs_uuid=root_fs_uuid, luks_uuid=luks_id, luks_version=luks,
                 header_path=header_path, root_sha256=root_sha, key_name=key)
    return facts


def build_plain_os(image: Path, p: Params, ctx: BuildContext) -> dict:
    """A not-yet-encrypted OS disk: p1 boot (ext4, `luks/` empty or absent), p2 root (plaintext ext4 or xfs with
    the marker and random data), for initcrypt's in-place pass at boot."""
    fs = p.get("fs", "ext4")
    boot_size = parse_size(p.get("boot_size", "64M"))
    root_size = parse_size(p.get("root_size", "256M"))
    random_size = parse_size(p.get("random_size", "8M"))
    luks_dir = bool(p.get("luks_dir", True))
    bootable = bool(p.get("bootable", False))
    header_path = p.get("header_path", "luks/osluksheader")
    key = p.get("key", "default")
    p.done()
    if fs not in ("ext4", "xfs"):
        raise HarnessError(f"plain-os: fs must be ext4 or xfs, not {fs!r}")
    for what, size in (("boot_size", boot_size), ("root_size", root_size)):
        if size % MiB:
            raise HarnessError(f"plain-os: {what} must be a multiple of 1 MiB (stock decrypt of an image file "
                               "rounds it up to 4096 bytes)")

    w = ctx.workdir
    root_tree, boot_tree = w / "root-tree", w / "boot-tree"
    tree_facts = os_tree(root_tree, random_size, bootable)
    root_img, boot_img = w / "root.img", w / "boot.img"
    root_fs_uuid, boot_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    if fs == "ext4":
        mkfs_ext4(root_img, root_size, root_tree, root_fs_uuid, label="root")
    else:
        mkfs_xfs(root_img, root_size, root_tree, root_fs_uuid, label="root", workdir=w)
    if count_in_file(root_img, tree_facts["marker_string"].encode()) < 1:
        raise HarnessError(f"plain-os: the marker string is not in the plaintext {fs} image (inline data?)")
    root_sha = sha256_file(root_img)

    boot_tree.mkdir(parents=True, exist_ok=True)
    if luks_dir:
        (boot_tree / Path(header_path).parent).mkdir(parents=True, exist_ok=True)
    mkfs_ext4(boot_img, boot_size, boot_tree, boot_uuid, label="boot")

    facts = gpt_boot_root(image, boot_img, root_img)
    for f in (root_img, boot_img):
        f.unlink()
    shutil.rmtree(boot_tree)
    shutil.rmtree(root_tree)
    facts.update(tree_facts)
    facts.update(boot_uuid=boot_uuid, root_fs_uuid=root_fs_uuid, fs=fs, header_path=header_path,
                 root_sha256=root_sha, key_name=key, luks_dir="yes" if luks_dir else "no")
    return facts


def build_luks_data(image: Path, p: Params, ctx: BuildContext) -> dict:
    """Data disk with an attached LUKS2 header. fs=ext4: a filesystem with a marker file, encrypted in place by
    `reencrypt --encrypt --reduce-device-size` (offline, no dm); fs=none: luksFormat of an empty image."""
    size = parse_size(p.get("size", "64M"))
    fs = p.get("fs", "ext4")
    reduce = parse_size(p.get("reduce", "16M"))
    key = p.get("key", "default")
    p.done()
    make_file(image, size)
    facts = {}
    if fs == "ext4":
        tree = ctx.workdir / "data-tree"
        marker_path, file_sha = marker_tree(tree)
        fs_uuid = str(uuid.uuid4())
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", fs_uuid, "-d", tree, image, f"{(size - reduce) // 1024}k"])
        run(["cryptsetup", "-q", "reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size",
             str(reduce), "--key-file", ctx.keys.file(key), *PBKDF_ARGS, image])
        facts.update(fs_uuid=fs_uuid, file_sha256=file_sha, marker_path=marker_path)
    elif fs == "none":
        run(["cryptsetup", "-q", "luksFormat", "--type", "luks2", "--key-file", ctx.keys.file(key),
             *PBKDF_ARGS, image])
    else:
        raise HarnessError(f"luks-data: fs must be ext4 or none, not {fs!r}")
    dump = json.loads(run(["cryptsetup", "luksDump", "--dump-json-metadata", image]).stdout)
    offset = int(dump["segments"]["0"]["offset"])
    facts.update(luks_uuid=luks_uuid(image), data_offset=str(offset), mapped_size=str(size - offset))
    return facts


def build_data(image: Path, p: Params, ctx: BuildContext) -> dict:
    """A plaintext data disk for full-OS scenarios: ext4, xfs or btrfs (made from a folder, no mount) holding a
    marker file (a distinctive string) and a random file, on a GPT partition (layout = "gpt") or the whole disk
    ("none"). mount = "/data1": the guest's fstab gets `UUID=<fs> /data1 <fs> defaults,nofail 0 N` at the first
    boot that attaches it (see guestrun), so the OS mounts it like a real data disk."""
    fs = p.get("fs", "ext4")
    layout = p.get("layout", "gpt")
    size = parse_size(p.get("size", "320M" if fs == "xfs" else "128M"))
    random_size = parse_size(p.get("random_size", "4M"))
    mount = p.get("mount", "")
    label = p.get("label", "data")
    p.done()
    if fs not in ("ext4", "xfs", "btrfs"):
        raise HarnessError(f"data: fs must be ext4, xfs or btrfs, not {fs!r}")
    if layout not in ("gpt", "none"):
        raise HarnessError(f"data: layout must be gpt or none, not {layout!r}")
    if fs == "btrfs" and not shutil.which("mkfs.btrfs"):
        raise HarnessError("data: fs = btrfs needs mkfs.btrfs (btrfs-progs)")
    if size % MiB:
        raise HarnessError("data: size must be a multiple of 1 MiB")
    w = ctx.workdir
    tree = w / "data-tree"
    marker_string = f"initcrypt-data-marker-{secrets.token_hex(16)}"
    marker = (marker_string + "\n" + secrets.token_hex(2048) + "\n").encode()
    (tree / "initcrypt-test").mkdir(parents=True)
    (tree / "initcrypt-test" / "marker").write_bytes(marker)
    rnd = secrets.token_bytes(random_size)
    (tree / "initcrypt-test" / "random.bin").write_bytes(rnd)
    files = {"/initcrypt-test/marker": hashlib.sha256(marker).hexdigest(),
             "/initcrypt-test/random.bin": hashlib.sha256(rnd).hexdigest()}
    fs_uuid = str(uuid.uuid4())
    facts = {}
    if layout == "gpt":
        partuuid = str(uuid.uuid4())
        make_file(image, size + 2 * MiB)
        part = sfdisk(image, f"label: gpt\nstart=2048, size={size // SECTOR}, type={LINUX_FS_GUID}, "
                             f"uuid={partuuid}, name={label}\n")[0]
        offset = part["start"] * SECTOR
        facts.update(partuuid=partuuid)
    else:
        make_file(image, size)
        offset = 0
    fsimg = w / "fs.img"
    if fs == "ext4":
        mkfs_ext4(fsimg, size, tree, fs_uuid, label=label)
    elif fs == "xfs":
        mkfs_xfs(fsimg, size, tree, fs_uuid, label=label, workdir=w)
    else:
        make_file(fsimg, size)
        run(["mkfs.btrfs", "-q", "-f", "-U", fs_uuid, "-L", label, "--rootdir", tree, fsimg])
    if count_in_file(fsimg, marker_string.encode()) < 1:
        raise HarnessError(f"data: the marker string is not in the plaintext {fs} image (inline data?)")
    fs_sha = sha256_file(fsimg)
    write_at(image, fsimg, offset)
    fsimg.unlink()
    shutil.rmtree(tree)
    passno = 0 if fs == "btrfs" else 2
    facts.update(fs=fs, fs_uuid=fs_uuid, layout=layout, part_offset=offset, part_size=size, label=label,
                 marker_string=marker_string, marker_path="/initcrypt-test/marker",
                 file_sha256=files["/initcrypt-test/marker"], random_sha256=files["/initcrypt-test/random.bin"],
                 files=json.dumps(files, sort_keys=True), fs_sha256=fs_sha, mount=mount,
                 fstab_line=f"UUID={fs_uuid} {mount or '/mnt/' + label} {fs} defaults,nofail 0 {passno}")
    return facts


BUILDERS = {"bek": build_bek, "ade-os": build_ade_os, "plain-os": build_plain_os, "luks-data": build_luks_data,
            "plain": build_plain, "data": build_data}


def build_disk(builder: str, image: Path, params: dict, ctx: BuildContext) -> dict:
    if builder not in BUILDERS:
        raise HarnessError(f"unknown disk builder {builder!r} (known: {', '.join(sorted(BUILDERS))})")
    if image.exists():
        image.unlink()
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    facts = BUILDERS[builder](image, Params(builder, params), ctx)
    facts = {k: str(v) for k, v in facts.items()}
    facts.update(path=str(image), size=str(image.stat().st_size))
    return facts
