"""Disk builders: raw image files made on the host with stock tools, without loop devices, mounts or dm.

Each builder takes (image path, params, context) and returns its facts (strings), usable as
{<disk>.<fact>} in kernel args, guest files, the guest script and expectations.

  bek        FAT12/16/32 key volume (mkfs.vfat [--offset] + mcopy)                facts: fat layout label volume_id
  ade-os     GPT: boot (ext4 holding luks/osluksheader) + root (ext4 encrypted in place by stock cryptsetup
             with that detached header, data offset 0)     facts: root_partuuid boot_partuuid boot_uuid root_fs_uuid
                                                                  luks_uuid luks_version header_path file_sha256 marker_path
  luks-data  attached LUKS2 header, ext4 inside (reencrypt --encrypt --reduce-device-size) or no filesystem
                                                           facts: luks_uuid fs_uuid file_sha256 marker_path data_offset mapped_size
  plain      zero-filled raw image                         facts: (generic only)
Every disk also gets: path size image_sha256 (before the boot) serial.
"""

import base64
import hashlib
import json

import secrets
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .util import HarnessError, parse_size, run

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


def build_ade_os(image: Path, p: Params, ctx: BuildContext) -> dict:
    """ADE's OS disk: p1 boot (plaintext ext4 with the detached header), p2 root (LUKS, data offset 0)."""
    luks = p.get("luks", "luks2")
    boot_size = parse_size(p.get("boot_size", "64M"))
    root_size = parse_size(p.get("root_size", "64M"))
    header_size = parse_size(p.get("header_size", "32M"))  # ADE: dd bs=33554432 count=1 of zeros
    header_path = p.get("header_path", "luks/osluksheader")
    sector_size = p.get("sector_size", None)
    key = p.get("key", "default")
    p.done()
    if luks not in ("luks1", "luks2"):
        raise HarnessError(f"ade-os: luks must be luks1 or luks2, not {luks!r}")
    if luks == "luks1" and sector_size not in (None, 512):
        raise HarnessError("ade-os: LUKS1 has 512-byte sectors only")

    w = ctx.workdir
    root_tree, boot_tree = w / "root-tree", w / "boot-tree"
    marker_path, file_sha = marker_tree(root_tree)
    root_img, boot_img = w / "root.img", w / "boot.img"
    root_fs_uuid, boot_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mkfs_ext4(root_img, root_size, root_tree, root_fs_uuid, label="root")

    header = boot_tree / header_path
    make_file(header, header_size)
    # Stock cryptsetup 2.6.1 encrypts an image file in place offline without device-mapper only for LUKS2
    # (its LUKS1 reencryption goes through dm). LUKS1 = the same LUKS2 pass with 512-byte sectors, then
    # `cryptsetup convert --type luks1` of the header: same keyslot, same volume key, same ciphertext.
    cmd = ["cryptsetup", "-q", "reencrypt", "--encrypt", "--type", "luks2", "--header", header,
           "--key-file", ctx.keys.file(key), *PBKDF_ARGS]
    if luks == "luks1":
        cmd += ["--sector-size", "512"]
    elif sector_size:
        cmd += ["--sector-size", str(sector_size)]
    run(cmd + [root_img])
    if luks == "luks1":
        run(["cryptsetup", "-q", "convert", "--type", "luks1", header])
    luks_id = luks_uuid(header)
    mkfs_ext4(boot_img, boot_size, boot_tree, boot_uuid, label="boot")

    boot_partuuid, root_partuuid = str(uuid.uuid4()), str(uuid.uuid4())
    first = 2048
    boot_sectors, root_sectors = boot_size // SECTOR, root_size // SECTOR
    make_file(image, (first + boot_sectors + root_sectors + 2048) * SECTOR)
    parts = sfdisk(image, (
        "label: gpt\nunit: sectors\n"
        f"start={first}, size={boot_sectors}, type={LINUX_FS_GUID}, uuid={boot_partuuid}, name=boot\n"
        f"start={first + boot_sectors}, size={root_sectors}, type={LINUX_FS_GUID}, uuid={root_partuuid}, name=root\n"))
    write_at(image, boot_img, parts[0]["start"] * SECTOR)
    write_at(image, root_img, parts[1]["start"] * SECTOR)
    for f in (root_img, boot_img):
        f.unlink()
    shutil.rmtree(boot_tree)
    return {"root_partuuid": root_partuuid, "boot_partuuid": boot_partuuid, "boot_uuid": boot_uuid,
            "root_fs_uuid": root_fs_uuid, "luks_uuid": luks_id, "luks_version": luks,
            "header_path": header_path, "file_sha256": file_sha, "marker_path": marker_path}


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


BUILDERS = {"bek": build_bek, "ade-os": build_ade_os, "luks-data": build_luks_data, "plain": build_plain}


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
