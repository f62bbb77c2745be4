"""Full-OS Debian 12 guest images (scenario key `guest = "debian-dracut" | "debian-initramfs-tools"`), built on the
host without loop devices or mounts, cached in two layers:

  base    mmdebstrap of bookworm from the host's own Debian mirror (systemd as PID 1, udev, the cloud kernel,
          dracut or initramfs-tools, grub's config tools, e2fsprogs, xfsprogs, cryptsetup-bin), customised by
          qemu-harness/guest-os/customize.sh, then booted once under QEMU so that the guest's own `update-grub`
          writes /boot/grub/grub.cfg (grub-probe needs the real disk: it cannot run in a chroot on the host).
          Kept: the root tree (tree/) with that grub.cfg, and meta.json. Rebuilt only when its inputs change.
  deb     the base tree + initcrypt's Debian package (scripts/package-deb) installed with dpkg in a chroot: the
          package's trigger/postinst rebuilds the initramfs with the distribution's own tool. Written as a GPT
          disk image (disk.img) + meta.json. Keyed by the base and the package's content (not its mtimes).

Cache: ${INITCRYPT_CACHE:-/var/cache/initcrypt}/qemu/guest/v<FORMAT>/
  base-<flavour>-<key>/{tree/, meta.json, firstboot.serial.log, mmdebstrap.log}
  <flavour>-<basekey>-deb-<debkey>/{disk.img, meta.json, dpkg.log}
Every entry is built in a `.tmp.<pid>` folder renamed into place at the end (a half-built entry is never used) under
an flock of `.lock-<entry>` (other worktrees may run the harness at the same time).

Disk layout (GPT, like RHEL/CentOS cloud images: separate /boot): p1 `boot` ext4 256 MiB, p2 `root` ext4, p3 `bios`
(BIOS boot, 1 MiB, empty) and p4 `esp` (FAT, empty) reserved for the real GRUB boots of issue [8]. fstab by UUID.
"""

import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .util import HARNESS_DIR, REPO_ROOT, HarnessError, log, run, sha256_file

GUEST_OS_DIR = HARNESS_DIR / "guest-os"
# Bump when the build steps below change what the image holds: the key hashes the inputs (packages, sizes, mirror,
# guest-os/ files), not this module's code, so that a change of the cache logic does not rebuild every image.
FORMAT = "2"
SUITE = "bookworm"
COMMON_PACKAGES = ["systemd", "systemd-sysv", "udev", "linux-image-cloud-amd64", "e2fsprogs", "xfsprogs",
                   "util-linux", "kmod", "cryptsetup-bin", "dmsetup", "grub2-common", "grub-pc-bin", "dbus"]
FLAVOURS = {
    "debian-dracut": {"tool": "dracut", "packages": ["dracut"]},
    "debian-initramfs-tools": {"tool": "initramfs-tools", "packages": ["initramfs-tools", "lz4"]},
}
MiB = 1 << 20
SECTOR = 512
BOOT_SIZE = 256 * MiB
ROOT_SIZE = 1024 * MiB
BIOS_SIZE = 1 * MiB
ESP_SIZE = 32 * MiB
RANDOM_SIZE = 8 * MiB
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MARKER_PATH = "/etc/initcrypt-test/marker"
RANDOM_PATH = "/var/lib/initcrypt-test/random.bin"
KEEP_DEB_LAYERS = 4  # per base: other worktrees may use other builds of the package at the same time
STALE_DAYS = 3       # entries of another base key (another harness version) unused this long are removed
FIRSTBOOT_TIMEOUT = 900
# what the image-building first boot runs in the guest (guestrun.first_boot)
FIRSTBOOT_SCRIPT = """\
update-grub
mark UPDATE_GRUB_RC $?
"""


@dataclass
class GuestImage:
    flavour: str
    disk: Path    # the cached disk image: copy it, never boot it in place
    meta: dict    # uuids, partuuids, offsets, kernel version, marker, file hashes


def cache_root() -> Path:
    """One folder per FORMAT: a worktree running an older harness never sees (nor cleans up) these entries."""
    d = Path(os.environ.get("INITCRYPT_CACHE", "/var/cache/initcrypt")) / "qemu" / "guest" / f"v{FORMAT}"
    d.mkdir(parents=True, exist_ok=True)
    return d


class CacheLock:
    """flock of <cache>/.lock-<entry>: one builder per entry across worktrees; waiting is said once."""

    def __init__(self, entry: str):
        self.path = cache_root() / f".lock-{entry}"

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"guest image: waiting for another build of {self.path.name[6:]}")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def _tmp_dir(final: Path) -> Path:
    """A fresh build folder next to the final one; stale ones of dead builders are removed first."""
    for old in final.parent.glob(final.name + ".tmp.*"):
        pid = old.name.rsplit(".", 1)[-1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# ------------------------------------------------------------------------------------------------------ the mirror

def debian_sources() -> str:
    """deb822 sources of the Debian archive entries apt already uses on this host (no third-party repository:
    their keys are not in the guest). Falls back to deb.debian.org."""
    entries = []
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for block in re.split(r"\n\s*\n", text):
                fields = {}
                for line in block.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        entries.append((uri, suite))
        elif f.suffix == ".list":
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb":
                    words = [p for p in parts[1:] if not p.startswith("[")]
                    if len(words) >= 2:
                        entries.append((words[0], words[1]))
    debian = [(u, s) for u, s in entries
              if re.search(r"/debian(-security)?/?$", u) and s.split("-")[0] == SUITE]
    if not debian:
        debian = [("http://deb.debian.org/debian", SUITE), ("http://deb.debian.org/debian", f"{SUITE}-updates"),
                  ("http://deb.debian.org/debian-security", f"{SUITE}-security")]
    seen, blocks = set(), []
    for u, s in debian:
        if (u, s) not in seen:
            seen.add((u, s))
            blocks.append(f"Types: deb\nURIs: {u}\nSuites: {s}\nComponents: main\n"
                          "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    return "\n".join(blocks)


# ------------------------------------------------------------------------------------------------------------ keys

def base_key(flavour: str) -> str:
    h = hashlib.sha256()
    h.update(f"format {FORMAT}\nsuite {SUITE}\nflavour {flavour}\n".encode())
    h.update(f"packages {COMMON_PACKAGES} {FLAVOURS[flavour]['packages']}\n".encode())
    h.update(f"layout {BOOT_SIZE} {ROOT_SIZE} {BIOS_SIZE} {ESP_SIZE} {RANDOM_SIZE}\n".encode())
    h.update(debian_sources().encode())
    h.update(FIRSTBOOT_SCRIPT.encode())
    for f in sorted(GUEST_OS_DIR.iterdir()):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


# What the deb layer does besides dpkg -i; part of its key, so a warm cache never serves a layer made the old way.
# 2: /etc/machine-id is written (see _set_machine_id).
LAYER_VERSION = "2"


def _set_machine_id(tree: Path, key: str) -> None:
    """A fixed machine-id in the layer. With the base's empty file every scenario's first boot was systemd's
    "first boot": a transient id that systemd-machine-id-commit.service writes once / is writable, which failed
    under load once in ~15 full-OS runs and left boot 1 `degraded`. Derived from the layer key: stable per layer."""
    mid = hashlib.sha256(f"initcrypt-guest-{key}".encode()).hexdigest()[:32]
    (tree / "etc" / "machine-id").write_text(mid + "\n")


def deb_content_key(deb: Path) -> str:
    """Hash of the package's control and data members (names, modes, link targets, bytes) without mtimes:
    scripts/package-deb makes a new .deb file at every build even when nothing changed."""
    h = hashlib.sha256(f"layer v{LAYER_VERSION}\0".encode())
    for what in ("--ctrl-tarfile", "--fsys-tarfile"):
        data = subprocess.run(["dpkg-deb", what, str(deb)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for m in sorted(t.getmembers(), key=lambda m: m.name):
                h.update(f"{m.name}\0{m.mode:o}\0{m.type!r}\0{m.linkname}\0".encode())
                if m.isfile():
                    h.update(hashlib.sha256(t.extractfile(m).read()).digest())
    return h.hexdigest()[:16]


def build_deb(binary: Path, out: Path) -> Path:
    """scripts/package-deb --binary BINARY, copied to out (the package script writes into the repo's target/)."""
    r = run(["sh", REPO_ROOT / "scripts" / "package-deb", "--binary", binary], cwd=REPO_ROOT)
    deb = REPO_ROOT / r.stdout.strip().splitlines()[-1]
    if not deb.is_file():
        raise HarnessError(f"scripts/package-deb printed {deb}, which does not exist")
    out.mkdir(parents=True, exist_ok=True)
    dst = out / deb.name
    shutil.copyfile(deb, dst)
    return dst


# ----------------------------------------------------------------------------------------------------- disk images

def make_disk(tree: Path, image: Path, meta: dict) -> dict:
    """GPT disk image from a root tree: /boot's content on p1 (ext4), the rest on p2 (ext4), both with the UUIDs in
    meta (the tree's fstab names them), p3 BIOS boot, p4 an empty FAT ESP. Returns the partition offsets/sizes.
    The tree is left as it was."""
    first = 2048
    sizes = [("boot", BOOT_SIZE, LINUX_FS_GUID), ("root", ROOT_SIZE, LINUX_FS_GUID),
             ("bios", BIOS_SIZE, BIOS_BOOT_GUID), ("esp", ESP_SIZE, ESP_GUID)]
    total = first * SECTOR + sum(s for _, s, _ in sizes) + 2048 * SECTOR
    with open(image, "wb") as f:
        f.truncate(total)
    lines, start = ["label: gpt", "unit: sectors"], first
    for name, size, guid in sizes:
        lines.append(f"start={start}, size={size // SECTOR}, type={guid}, uuid={meta['partuuid'][name]}, name={name}")
        start += size // SECTOR
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image], input=("\n".join(lines) + "\n").encode())
    table = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]["partitions"]
    parts = {p["name"]: {"offset": p["start"] * SECTOR, "size": p["size"] * SECTOR} for p in table}

    boot_dir = tree / "boot"
    aside = tree.parent / (tree.name + ".boot-aside")
    boot_dir.rename(aside)
    boot_dir.mkdir()
    try:
        for name, src in (("boot", aside), ("root", tree)):
            run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", meta["fs_uuid"][name], "-L", name,
                 "-E", f"offset={parts[name]['offset']}", "-d", src, image, f"{parts[name]['size'] // 1024}k"])
    finally:
        boot_dir.rmdir()
        aside.rename(boot_dir)
    esp = parts["esp"]
    run(["mkfs.vfat", "-F", "16", "-n", "ESP", "-i", meta["esp_id"], "--offset", str(esp["offset"] // SECTOR),
         image, str(esp["size"] // 1024)])
    return parts


# ------------------------------------------------------------------------------------------------------------ base

def _packages(flavour: str) -> list[str]:
    return COMMON_PACKAGES + FLAVOURS[flavour]["packages"]


def _setup_hook_script(flavour: str, marker_string: str, random_file: Path) -> str:
    """Before any package: the initramfs tool's configuration (so the kernel's postinst already uses it) and the
    known test files."""
    src = GUEST_OS_DIR
    if FLAVOURS[flavour]["tool"] == "dracut":
        conf = f'mkdir -p "$1/etc/dracut.conf.d" && cp {src}/dracut.conf "$1/etc/dracut.conf.d/90-harness.conf"'
    else:
        conf = (f'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d" && '
                f'cp {src}/initramfs.conf "$1/etc/initramfs-tools/conf.d/harness" && '
                f'cp {src}/initramfs-modules "$1/usr/share/initramfs-tools/modules.d/harness"')
    return (f'{conf} && mkdir -p "$1/etc/initcrypt-test" "$1/var/lib/initcrypt-test" && '
            f'printf "%s\\n" {marker_string} > "$1{MARKER_PATH}" && cp {random_file} "$1{RANDOM_PATH}"')


def ensure_base(flavour: str, kernel_boot) -> tuple[Path, dict]:
    """The base entry (tree + meta) of a flavour, built if missing. kernel_boot(meta, tree, workdir) runs the first
    boot (see guestboot.first_boot): it is passed in to keep this module free of QEMU."""
    if flavour not in FLAVOURS:
        raise HarnessError(f"guest must be one of {', '.join(FLAVOURS)}, not {flavour!r}")
    key = base_key(flavour)
    final = cache_root() / f"base-{flavour}-{key}"
    with CacheLock(final.name):
        if (final / "meta.json").exists():
            return final, json.loads((final / "meta.json").read_text())
        t0 = time.monotonic()
        log(f"guest image: building base {final.name} (mmdebstrap from the host's mirror, then a first boot "
            "for update-grub; several minutes)")
        tmp = _tmp_dir(final)
        meta = {"flavour": flavour, "key": key, "tool": FLAVOURS[flavour]["tool"], "packages": _packages(flavour),
                "fs_uuid": {"boot": str(uuid.uuid4()), "root": str(uuid.uuid4())},
                "partuuid": {n: str(uuid.uuid4()) for n in ("boot", "root", "bios", "esp")},
                "esp_id": secrets.token_hex(4).upper()}
        marker_string = f"initcrypt-marker-{secrets.token_hex(16)}"
        marker = (marker_string + "\n").encode()
        random_file = tmp / "random.bin"
        random_file.write_bytes(secrets.token_bytes(RANDOM_SIZE))
        meta.update(marker_string=marker_string, marker_path=MARKER_PATH,
                    files={MARKER_PATH: hashlib.sha256(marker).hexdigest(), RANDOM_PATH: sha256_file(random_file)})
        sources = tmp / "debian.sources"
        sources.write_text(debian_sources())
        tree = tmp / "tree"
        cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
               "--aptopt=Apt::Install-Recommends \"false\"",
               "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
               "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
               f"--include={','.join(_packages(flavour))}",
               f"--setup-hook={_setup_hook_script(flavour, marker_string, random_file)}",
               f"--customize-hook=sh {GUEST_OS_DIR}/customize.sh \"$1\" {GUEST_OS_DIR} {meta['tool']} "
               f"{meta['fs_uuid']['root']} {meta['fs_uuid']['boot']}",
               SUITE, str(tree), str(sources)]
        with open(tmp / "mmdebstrap.log", "wb") as logf:
            p = subprocess.run(["nice", "-n", "5", *cmd], stdin=subprocess.DEVNULL, stdout=logf,
                               stderr=subprocess.STDOUT)
        if p.returncode != 0:
            tail = (tmp / "mmdebstrap.log").read_text(errors="replace").splitlines()[-15:]
            raise HarnessError(f"mmdebstrap failed (rc {p.returncode}, log {tmp / 'mmdebstrap.log'}):\n"
                               + "\n".join(tail))
        random_file.unlink()
        meta["mmdebstrap_seconds"] = round(time.monotonic() - t0, 1)
        kernels = sorted(p.name[len("vmlinuz-"):] for p in (tree / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise HarnessError(f"guest image: expected one kernel in {tree}/boot, found {kernels}")
        meta["kver"] = kernels[0]
        meta["tree_bytes"] = int(run(["du", "-sb", tree]).stdout.split()[0])
        t1 = time.monotonic()
        kernel_boot(meta, tree, tmp)  # writes tree/boot/grub/grub.cfg (the guest's update-grub)
        meta["firstboot_seconds"] = round(time.monotonic() - t1, 1)
        meta["build_seconds"] = round(time.monotonic() - t0, 1)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for leftover in ("disk.img", "debian.sources"):
            (tmp / leftover).unlink(missing_ok=True)
        tmp.rename(final)
        log(f"guest image: base {final.name} built in {meta['build_seconds']:.0f} s "
            f"(mmdebstrap {meta['mmdebstrap_seconds']:.0f} s, first boot {meta['firstboot_seconds']:.0f} s)")
        return final, meta


# ------------------------------------------------------------------------------------------------------ deb layer

# dpkg inside the tree, in a private mount namespace (gone with the process: nothing stays mounted on the host)
CHROOT_SCRIPT = r'''
set -e
r=$1; shift
mount --bind /dev "$r/dev"
mount -t proc proc "$r/proc"
mount -t sysfs sysfs "$r/sys"
mount -t tmpfs tmpfs "$r/run"
mount -t tmpfs tmpfs "$r/tmp"
exec chroot "$r" "$@"
'''


def chroot_run(tree: Path, argv: list[str], log_path: Path) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    with open(log_path, "ab") as logf:
        p = subprocess.run(["nice", "-n", "5", "unshare", "-m", "--propagation", "private", "sh", "-c",
                            CHROOT_SCRIPT, "sh", str(tree), *argv], stdin=subprocess.DEVNULL, stdout=logf,
                           stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise HarnessError(f"in the guest tree: {' '.join(argv)} failed (rc {p.returncode}, log {log_path}):\n"
                           + "\n".join(tail))


def ensure_deb_layer(flavour: str, deb: Path, kernel_boot) -> GuestImage:
    base, base_meta = ensure_base(flavour, kernel_boot)
    key = deb_content_key(deb)
    final = cache_root() / f"{flavour}-{base_meta['key']}-deb-{key}"
    with CacheLock(final.name):
        if not (final / "meta.json").exists():
            t0 = time.monotonic()
            log(f"guest image: installing {deb.name} into {flavour} ({final.name})")
            tmp = _tmp_dir(final)
            tree = tmp / "tree"
            run(["cp", "-a", base / "tree", tree])
            t_copy = time.monotonic() - t0
            initrd = tree / "boot" / f"initrd.img-{base_meta['kver']}"
            before = sha256_file(initrd)
            shutil.copyfile(deb, tree / "var/tmp/initcrypt.deb")
            chroot_run(tree, ["dpkg", "-i", "/var/tmp/initcrypt.deb"], tmp / "dpkg.log")
            (tree / "var/tmp/initcrypt.deb").unlink()
            _set_machine_id(tree, key)
            t_dpkg = time.monotonic() - t0 - t_copy
            meta = dict(base_meta)
            meta.update(deb=deb.name, deb_key=key, layer=final.name,
                        initrd_rebuilt=sha256_file(initrd) != before,
                        initrd_bytes=initrd.stat().st_size)
            if not meta["initrd_rebuilt"]:
                raise HarnessError(f"dpkg -i {deb.name} did not rebuild /boot/{initrd.name} (dpkg.log in {tmp})")
            meta["parts"] = make_disk(tree, tmp / "disk.img", meta)
            shutil.rmtree(tree)
            meta.update(copy_seconds=round(t_copy, 1), dpkg_seconds=round(t_dpkg, 1),
                        layer_seconds=round(time.monotonic() - t0, 1))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            tmp.rename(final)
            log(f"guest image: {final.name} in {meta['layer_seconds']:.0f} s (copy {t_copy:.0f} s, dpkg -i + "
                f"initramfs {t_dpkg:.0f} s)")
        (final / "meta.json").touch()  # last use, for the clean-up below
        (base / "meta.json").touch()
        meta = json.loads((final / "meta.json").read_text())
    _forget_old_layers(flavour, base_meta["key"], keep=final)
    return GuestImage(flavour=flavour, disk=final / "disk.img", meta=meta)


def copy_disk(img: GuestImage, dest: Path) -> None:
    """Sparse copy of the cached disk image for one scenario, under a shared lock (a clean-up never removes an
    entry while it is being copied)."""
    lock = cache_root() / f".lock-{img.disk.parent.name}"
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        if not img.disk.exists():
            raise HarnessError(f"{img.disk} vanished (cache cleaned by another run?): run the scenario again")
        run(["cp", "--sparse=always", img.disk, dest])


def _forget_old_layers(flavour: str, bkey: str, keep: Path) -> None:
    """Cache clean-up. Deb layers of this base beyond the KEEP_DEB_LAYERS most recently used ones go once unused for
    an hour; entries of other base keys (another version of the harness, maybe in another worktree that still uses
    them) only once unused for STALE_DAYS. A locked entry (being built or copied) is never removed."""
    root = cache_root()
    now = time.time()

    def last_use(p: Path) -> float:
        m = p / "meta.json"
        return m.stat().st_mtime if m.exists() else p.stat().st_mtime

    entries = [p for p in root.iterdir() if p.is_dir() and ".tmp." not in p.name]
    ours = sorted((p for p in entries if p.name.startswith(f"{flavour}-{bkey}-deb-")), key=last_use, reverse=True)
    old = [p for p in ours[KEEP_DEB_LAYERS:] if p != keep and now - last_use(p) > 3600]
    old += [p for p in entries if bkey not in p.name and now - last_use(p) > STALE_DAYS * 86400]
    for p in old:
        with open(root / f".lock-{p.name}", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(p, ignore_errors=True)
        (root / f".lock-{p.name}").unlink(missing_ok=True)
