"""Host-side checks of an OS disk after the boot, with stock tools only (no mount, no loop, no dm):

  [expect_disk.<disk>]
  decrypts_to_original = true   the boot partition holds the final header (luks/osluksheader, no .pending, no
                                .journal left), luksDump: LUKS2, one crypt segment, aes-xts-plain64, offset 0, no
                                requirement (no unfinished reencryption); the marker string is nowhere in the raw
                                root partition; stock `cryptsetup reencrypt --decrypt` of a copy of the root
                                partition gives back the plaintext's sha256 (fact root_sha256 of the builder)
  luks_sector_size = 4096       the header's data segment uses this sector size
  plaintext_original = true     decrypted back: the raw root partition's sha256 is the builder's plaintext one
                                (fact root_sha256), and no header, .pending or .journal is left on the boot partition

Works on disks of the plain-os and ade-os builders (facts header_path, key_name, root_sha256, marker_string).
Leaves <disk>.osluksheader and <disk>.luksDump.txt in the artifacts; the root copy is deleted.
"""

import hashlib
import re
import json
import shutil
import subprocess
from pathlib import Path

from . import disks
from .util import HarnessError, run, sha256_file

MiB = 1 << 20


def partition_hashes(image: Path, facts: dict) -> dict:
    """sha256 of the boot and root partitions of an ade-os/plain-os image (empty for other disks): says which one
    changed when an `unchanged` check fails."""
    out = {}
    for part in ("boot", "root"):
        off, size = facts.get(f"{part}_offset"), facts.get(f"{part}_size")
        if off is None or size is None:
            continue
        h, left = hashlib.sha256(), int(size)
        with open(image, "rb") as f:
            f.seek(int(off))
            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                h.update(chunk)
                left -= len(chunk)
        out[part] = h.hexdigest()
    return out


def _partitions(image: Path) -> tuple[dict, dict]:
    """(boot, root) partitions of the GPT image: by name, else p1/p2; offset/size in bytes."""
    table = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    parts = [{"name": p.get("name", ""), "offset": p["start"] * sector, "size": p["size"] * sector}
             for p in table["partitions"]]
    by_name = {p["name"]: p for p in parts}
    if "boot" in by_name and "root" in by_name:
        return by_name["boot"], by_name["root"]
    if len(parts) >= 2:
        return parts[0], parts[1]
    raise HarnessError(f"{image}: expected a boot and a root partition, found {parts}")


def _extract(image: Path, part: dict, out: Path) -> None:
    with open(image, "rb") as src, open(out, "wb") as dst:
        src.seek(part["offset"])
        left = part["size"]
        while left:
            block = src.read(min(left, 8 * MiB))
            if not block:
                raise HarnessError(f"{image} ends inside its partition at {part['offset']}")
            dst.write(block)
            left -= len(block)


def _boot_copy(image: Path, part: dict, out: Path) -> None:
    """Copy of the boot partition with its ext4 journal replayed (on the copy only), as the next mount would see
    it: after a power cut, new directory entries may still be only in the journal, invisible to debugfs."""
    _extract(image, part, out)
    r = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(out)], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise HarnessError(f"e2fsck -E journal_only on a copy of the boot partition of {image}: rc {r.returncode}: "
                           f"{(r.stdout + r.stderr).strip()[-500:]}")


def _debugfs(fs_image: Path, request: str) -> str:
    """debugfs exits 0 even when the request fails: the caller checks the output/side effects."""
    return run(["debugfs", "-R", request, fs_image]).stdout


def boot_listing(image: Path, header_path: str, work: Path) -> list[str]:
    """Names in the header's folder on the boot partition that start with the header's name (debugfs, no mount)."""
    boot, _ = _partitions(image)
    work.mkdir(parents=True, exist_ok=True)
    boot_img = work / "boot-listing.img"
    try:
        _boot_copy(image, boot, boot_img)
        folder, name = str(Path("/") / header_path).rsplit("/", 1)
        return sorted(e for e in _debugfs(boot_img, f"ls {folder or '/'}").split() if e.startswith(name))
    finally:
        boot_img.unlink(missing_ok=True)


def check_os_disk(disk: str, checks: dict, facts: dict, keys: disks.KeyStore, image: Path,
                  out: Path, final: bool = True) -> tuple[list[str], dict]:
    """Run the checks named in `checks` on the image after the boot. Returns (failures, facts for result.json).

    final=False (after a power cut that left the final header): leftover .pending/.journal files are only
    recorded; everything else must hold, since the header is renamed only after the last chunk is durable."""
    if checks.get("plaintext_original"):
        return _check_plaintext(disk, facts, image, out)
    failures: list[str] = []
    found: dict = {}
    want_plain = checks.get("decrypts_to_original", False)
    want_sector = checks.get("luks_sector_size")
    if not want_plain and want_sector is None:
        return failures, found
    header_path = facts.get("header_path", "luks/osluksheader")
    work = out / f"check-{disk}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        boot, root = _partitions(image)
        boot_img = work / "boot.img"
        _boot_copy(image, boot, boot_img)

        # 1. the boot partition: final header present, nothing of an unfinished pass left
        folder, name = str(Path("/") / header_path).rsplit("/", 1)
        listing = _debugfs(boot_img, f"ls {folder or '/'}")
        entries = set(listing.split())
        found["boot_dir"] = sorted(e for e in entries if e.startswith(name))
        for suffix in (".pending", ".journal"):
            if final and name + suffix in entries:
                failures.append(f"disk {disk}: {header_path}{suffix} is still on the boot partition (pass unfinished)")
        header = out / f"{disk}.osluksheader"
        header.unlink(missing_ok=True)
        _debugfs(boot_img, f"dump /{header_path} {header}")
        if not header.exists() or header.stat().st_size == 0:
            failures.append(f"disk {disk}: no /{header_path} on the boot partition (debugfs ls {folder or '/'}: "
                            f"{' '.join(sorted(entries)) or 'nothing'})")
            return failures, found
        boot_img.unlink()

        # 2. the header: what it says
        text = run(["cryptsetup", "luksDump", header]).stdout
        (out / f"{disk}.luksDump.txt").write_text(text)
        meta = json.loads(run(["cryptsetup", "luksDump", "--dump-json-metadata", header]).stdout)
        segs = meta.get("segments", {})
        seg = segs.get("0", {})
        reqs = meta.get("config", {}).get("requirements", {}).get("mandatory", [])
        found.update(luks_sector_size=seg.get("sector_size"), luks_cipher=seg.get("encryption"),
                     luks_offset=seg.get("offset"), luks_segments=len(segs), luks_requirements=reqs)
        if want_sector is not None and seg.get("sector_size") != int(want_sector):
            failures.append(f"disk {disk}: LUKS sector size {seg.get('sector_size')}, expected {want_sector}")
        if not want_plain:
            return failures, found
        if "cipher: aes-xts-plain64" not in text or "offset: 0 [bytes]" not in text:
            failures.append(f"disk {disk}: luksDump lacks 'cipher: aes-xts-plain64' / 'offset: 0 [bytes]' "
                            f"(see {disk}.luksDump.txt)")
        if reqs:
            failures.append(f"disk {disk}: header still has requirement(s) {reqs} (unfinished reencryption)")
        if len(segs) != 1 or seg.get("type") != "crypt" or seg.get("size") != "dynamic":
            failures.append(f"disk {disk}: expected one crypt segment over the whole device, got {segs}")

        # 3. the root partition: no plaintext marker left, and stock cryptsetup decrypts it to the original
        copy = work / "root.img"
        _extract(image, root, copy)
        marker = facts["marker_string"].encode()
        found["marker_count_after"] = disks.count_in_file(copy, marker)
        if found["marker_count_after"]:
            failures.append(f"disk {disk}: the marker string is still in the raw root partition "
                            f"({found['marker_count_after']}x): plaintext left")
        if seg.get("size") != "dynamic" or reqs:
            failures.append(f"disk {disk}: stock decrypt skipped (the header is not a finished encryption)")
            return failures, found
        work_header = work / "header"
        shutil.copyfile(header, work_header)
        key = keys.file(facts.get("key_name", "default"))
        try:
            run(["cryptsetup", "-q", "reencrypt", "--decrypt", "--header", work_header, "--key-file", key,
                 "--force-offline-reencrypt", copy])
        except HarnessError as e:
            failures.append(f"disk {disk}: stock cryptsetup decrypt failed: {e}")
            return failures, found
        # stock offline decrypt of a file may grow it to the next 4096 multiple: compare the original length
        with open(copy, "r+b") as f:
            f.truncate(root["size"])
        found["decrypted_sha256"] = sha256_file(copy)
        if found["decrypted_sha256"] != facts["root_sha256"]:
            failures.append(f"disk {disk}: stock decrypt gives sha256 {found['decrypted_sha256']}, "
                            f"not the original {facts['root_sha256']}")
        return failures, found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_plaintext(disk: str, facts: dict, image: Path, out: Path) -> tuple[list[str], dict]:
    """The root partition holds the builder's plaintext again, and the pass left nothing on the boot partition."""
    failures: list[str] = []
    work = out / f"check-{disk}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        found = {"root_sha256_after": partition_hashes(image, facts).get("root")}
        if found["root_sha256_after"] != facts["root_sha256"]:
            failures.append(f"disk {disk}: the raw root partition's sha256 is {found['root_sha256_after']}, not the "
                            f"original plaintext's {facts['root_sha256']}")
        left = boot_listing(image, facts.get("header_path", "luks/osluksheader"), work)
        found["boot_dir"] = left
        if left:
            failures.append(f"disk {disk}: {left} still on the boot partition after the decryption")
        return failures, found
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ full-OS guest disks
#
#  [expect_disk.<disk>] of a full-OS scenario (guest-os and data disks):
#  encrypted = true   the header (detached: `header` = its path on the OS disk's boot partition, default the disk's
#                     fact header_path; "attached": at the start of the partition) passes the luksDump checks, no
#                     .pending/.journal beside it; the raw partition no longer holds the plaintext marker string; a
#                     stock `cryptsetup reencrypt --decrypt --force-offline-reencrypt` of a copy gives a clean
#                     filesystem (ext4: e2fsck -fn; xfs: xfs_repair -n; btrfs: btrfs check --readonly) whose files
#                     (ext4: debugfs dump; btrfs: btrfs restore; xfs: the extents xfs_db maps) have the recorded sha256
#  plaintext = true   the raw partition is such a clean filesystem with the files intact, and no header file (nor
#                     .pending/.journal) is left on the OS disk's boot partition
# The root filesystem of a real OS changes while it runs (journal, logs): byte equality with the original does not
# apply, the files and the filesystem's consistency do.

def _guest_partition(image: Path, facts: dict, part_name: str) -> dict:
    if "part_offset" in facts:  # data builder
        return {"offset": int(facts["part_offset"]), "size": int(facts["part_size"])}
    return {"offset": int(facts[f"{part_name}_offset"]), "size": int(facts[f"{part_name}_size"])}


def _header_files(os_image: Path, os_facts: dict, header_path: str, work: Path, dump_to: Path | None) -> list[str]:
    """Names beside the detached header on the OS boot partition that start with its name (journal replayed on a
    copy when needed); with dump_to, the header itself is dumped there."""
    from .guestboot import ExtReader
    boot = _guest_partition(os_image, os_facts, "boot")
    reader = ExtReader(os_image, {**boot, "number": 1}, work / "replay")
    try:
        folder, name = str(Path("/") / header_path).rsplit("/", 1)
        p = subprocess.run(["debugfs", "-R", f"ls {folder or '/'}", reader.spec], capture_output=True, text=True)
        listing = sorted(e for e in p.stdout.split() if e.startswith(name))
        if dump_to is not None and name in listing:
            reader.dump(f"/{header_path}", dump_to)
        return listing
    finally:
        reader.close()


def _fs_check(fs: str, spec: str) -> tuple[bool, str]:
    """Is the filesystem clean (read-only check)? spec: a file, or for ext4 file?offset=N."""
    cmd = {"ext4": ["e2fsck", "-fn", spec], "xfs": ["xfs_repair", "-n", "-f", spec],
           "btrfs": ["btrfs", "check", "--readonly", spec]}[fs]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode == 0, (p.stdout + p.stderr).strip()[-400:]


def _file_hashes(fs: str, spec: str, files: dict, work: Path) -> dict:
    """sha256 of each recorded file, read without a mount ('missing' when it cannot be read)."""
    got = {}
    if fs == "ext4":
        for path in files:
            dest = work / "file.out"
            dest.unlink(missing_ok=True)
            subprocess.run(["debugfs", "-R", f"dump {path} {dest}", spec], capture_output=True)
            got[path] = sha256_file(dest) if dest.exists() else "missing"
            dest.unlink(missing_ok=True)
    elif fs == "btrfs":
        dest = work / "restore"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        subprocess.run(["btrfs", "restore", spec, str(dest)], capture_output=True)
        for path in files:
            f = dest / path.lstrip("/")
            got[path] = sha256_file(f) if f.is_file() else "missing"
        shutil.rmtree(dest, ignore_errors=True)
    else:
        for path in files:
            got[path] = _xfs_file_sha256(spec, path)
    return got


def _xfs_file_sha256(image: str, path: str) -> str:
    """Read a file of an unmounted xfs image through its extent map (xfs_db -r: path, bmap), then hash it."""
    def db(*cmds):
        args = ["xfs_db", "-r"]
        for c in cmds:
            args += ["-c", c]
        return subprocess.run(args + [image], capture_output=True, text=True).stdout
    sb = db("sb 0", "p blocksize agblocks")
    vals = dict(re.findall(r"(\w+) = (\d+)", sb))
    if "blocksize" not in vals:
        return "missing"
    bs, agblocks = int(vals["blocksize"]), int(vals["agblocks"])
    size_out = db(f"path {path}", "p core.size")
    m = re.search(r"core\.size = (\d+)", size_out)
    if not m:
        return "missing"
    size = int(m.group(1))
    h, done = hashlib.sha256(), 0
    extents = re.findall(r"offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+)", db(f"path {path}", "bmap"))
    with open(image, "rb") as f:
        for startoff, agno, agbno, count in sorted(extents, key=lambda e: int(e[0])):
            if int(startoff) * bs != done:
                return "missing"  # a hole: not expected in the builder's files
            f.seek((int(agno) * agblocks + int(agbno)) * bs)
            want = min(int(count) * bs, size - done)
            h.update(f.read(want))
            done += want
    return h.hexdigest() if done == size else "missing"


def check_guest_disk(disk: str, checks: dict, facts: dict, keys: disks.KeyStore, images: dict, out: Path,
                     os_name: str) -> tuple[list[str], dict]:
    if not (checks.get("encrypted") or checks.get("plaintext")):
        return [], {}
    f = facts[disk]
    fs = f.get("fs", "ext4")
    files = json.loads(f["files"])
    image, os_image = images[disk], images[os_name]
    part = _guest_partition(image, f, "root")
    header_path = checks.get("header", f.get("header_path"))
    if not header_path:
        return [f"disk {disk}: say where its header is (header = \"luks/<name>.hdr\" or \"attached\")"], {}
    work = out / f"check-{disk}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    failures, found = [], {}
    try:
        copy = work / "part.img"
        _extract(image, part, copy)
        found["marker_count"] = disks.count_in_file(copy, f["marker_string"].encode())
        if checks.get("plaintext"):
            if header_path != "attached":
                left = _header_files(os_image, facts[os_name], header_path, work, None)
                found["boot_dir"] = left
                if left:
                    failures.append(f"disk {disk}: {left} still on the boot partition")
            ok, text = _fs_check(fs, str(copy))
            found["fs_clean"] = ok
            if not ok:
                failures.append(f"disk {disk}: the raw partition is not a clean {fs}: {text}")
        else:
            header = out / f"{disk}.luksheader"
            header.unlink(missing_ok=True)
            if header_path == "attached":
                run(["cryptsetup", "luksHeaderBackup", copy, "--header-backup-file", header])
            else:
                left = _header_files(os_image, facts[os_name], header_path, work, header)
                found["boot_dir"] = left
                name = Path(header_path).name
                for suffix in (".pending", ".journal"):
                    if name + suffix in left:
                        failures.append(f"disk {disk}: {header_path}{suffix} still on the boot partition")
                if not header.exists():
                    failures.append(f"disk {disk}: no {header_path} on the OS boot partition ({left})")
                    return failures, found
            text = run(["cryptsetup", "luksDump", header]).stdout
            (out / f"{disk}.luksDump.txt").write_text(text)
            meta = json.loads(run(["cryptsetup", "luksDump", "--dump-json-metadata", header]).stdout)
            segs = meta.get("segments", {})
            seg = segs.get("0", {})
            reqs = meta.get("config", {}).get("requirements", {}).get("mandatory", [])
            found.update(luks_sector_size=seg.get("sector_size"), luks_offset=seg.get("offset"), luks_requirements=reqs)
            if "cipher: aes-xts-plain64" not in text:
                failures.append(f"disk {disk}: luksDump lacks 'cipher: aes-xts-plain64' ({disk}.luksDump.txt)")
            if header_path != "attached" and seg.get("offset") != "0":
                failures.append(f"disk {disk}: data offset {seg.get('offset')}, expected 0 (detached header)")
            if reqs or len(segs) != 1 or seg.get("type") != "crypt" or seg.get("size") != "dynamic":
                failures.append(f"disk {disk}: not one finished crypt segment (segments {segs}, requirements {reqs})")
                return failures, found
            if found["marker_count"]:
                failures.append(f"disk {disk}: the plaintext marker is still in the raw partition "
                                f"({found['marker_count']}x)")
            work_header = work / "header"
            shutil.copyfile(header, work_header)
            try:
                run(["cryptsetup", "-q", "reencrypt", "--decrypt", "--header", work_header, "--key-file",
                     keys.file(f.get("key_name", "default")), "--force-offline-reencrypt", copy])
            except HarnessError as e:
                failures.append(f"disk {disk}: stock cryptsetup decrypt of a copy failed: {e}")
                return failures, found
            with open(copy, "r+b") as fh:
                fh.truncate(part["size"])
            if header_path == "attached":  # the filesystem starts at the data offset
                off = int(seg.get("offset", 0))
                inner = work / "inner.img"
                _extract(copy, {"offset": off, "size": part["size"] - off}, inner)
                copy.unlink()
                inner.rename(copy)
            ok, out_text = _fs_check(fs, str(copy))
            found["fs_clean"] = ok
            if not ok:
                failures.append(f"disk {disk}: the stock-decrypted copy is not a clean {fs}: {out_text}")
        got = _file_hashes(fs, str(copy), files, work)
        found["files"] = got
        for path, want in files.items():
            if got.get(path) != want:
                failures.append(f"disk {disk}: {path} has sha256 {got.get(path)}, not the recorded {want}")
        return failures, found
    finally:
        shutil.rmtree(work, ignore_errors=True)
