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
