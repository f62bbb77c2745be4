"""Preparation, idempotent and cached: host packages, Debian's cloud kernel, the base initramfs.

Cache: ${INITCRYPT_CACHE:-/var/cache/initcrypt}/qemu
  kernel/<kver>/{linux-image-*.deb, kpkg/, vmlinuz}   dpkg -x of the kernel package (never into /), depmod -b
  base-<kver>-<hash>.cpio                             busybox + modules + /init, keyed by its inputs
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .initramfs import pack_cpio
from .util import HARNESS_DIR, HarnessError, log, run

PACKAGES = [
    "qemu-system-x86", "busybox-static", "cryptsetup-bin", "dosfstools", "mtools", "e2fsprogs",
    "xfsprogs", "fdisk", "kmod", "cpio", "initramfs-tools-core",
    # real initramfs scenarios: dracut-core coexists with initramfs-tools-core; dracut's systemd, crypt and dm
    # modules copy the host's systemd, systemd-cryptsetup and dmsetup (only recommended by dracut-core)
    "dracut-core", "systemd", "udev", "dmsetup", "zstd", "binutils",
    # full-OS guests: the image builder, and btrfs data disks (mkfs.btrfs --rootdir, btrfs check/restore)
    "mmdebstrap", "btrfs-progs",
]

# Loaded by the guest /init in this order. Never vfat, fat or nls_*: initcrypt reads FAT itself.
MODULES = [
    "virtio_pci", "virtio_blk", "virtio_scsi", "scsi_mod", "sd_mod", "dm_mod", "dm_crypt",
    "xts", "aesni_intel", "sha256_ssse3", "crc32c_intel", "af_alg", "algif_skcipher",
]
# In the image but not loaded (xfs costs ~1 s of TCG time): a scenario script runs `modprobe xfs` when it needs it.
EXTRA_MODULES = ["xfs"]
FORBIDDEN_MODULE = re.compile(r"/(vfat|fat|nls_[a-z0-9_-]+)\.ko")

BASE_FORMAT = "3"  # bump when the layout of the base tree changes in a way its inputs do not show

BUSYBOX = Path("/bin/busybox")


@dataclass
class Prepared:
    kver: str
    vmlinuz: Path
    base_cpio: Path
    kpkg: Path  # dpkg -x of the kernel package: lib/modules/<kver>, boot/config-<kver> (real initramfs builders)


def cache_dir() -> Path:
    d = Path(os.environ.get("INITCRYPT_CACHE", "/var/cache/initcrypt")) / "qemu"
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_packages() -> None:
    """apt-get install what is missing; one dpkg-query first so that a warm run costs nothing."""
    # dpkg-query exits 1 when a package is unknown to dpkg but still lists the known ones: no check here.
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *PACKAGES],
                       capture_output=True, text=True)
    installed = {parts[0] for parts in map(str.split, r.stdout.splitlines()) if len(parts) >= 2 and parts[1] == "ii"}
    missing = [p for p in PACKAGES if p not in installed]
    if not missing:
        return
    log(f"prepare: installing {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    try:
        run(cmd, env=env)
    except HarnessError:
        run(["apt-get", "update"], env=env)
        run(cmd, env=env)


def resolve_kernel_version() -> str:
    """Version of linux-image-<ver>-cloud-amd64 that linux-image-cloud-amd64 depends on.

    INITCRYPT_KERNEL=<ver> pins it. apt-get update runs only when the lookup fails; if even that fails,
    the newest kernel already in the cache is used."""
    pinned = os.environ.get("INITCRYPT_KERNEL")
    if pinned:
        return pinned
    ver = _kernel_from_apt()
    if ver is None:
        log("prepare: linux-image-cloud-amd64 unknown to apt, running apt-get update")
        try:
            run(["apt-get", "update"], env={"DEBIAN_FRONTEND": "noninteractive"})
            ver = _kernel_from_apt()
        except HarnessError as e:
            log(f"prepare: {e}")
    if ver is None:
        cached = sorted(p.name for p in (cache_dir() / "kernel").glob("*") if (p / "vmlinuz").exists())
        if not cached:
            raise HarnessError("cannot resolve the cloud kernel version (apt-cache depends linux-image-cloud-amd64)")
        ver = cached[-1]
        log(f"prepare: using cached kernel {ver}")
    return ver


def _kernel_from_apt():
    """apt-cache is slow here (~1.7 s: no pkgcache.bin), so the answer is remembered until apt's lists change."""
    lists = Path("/var/lib/apt/lists")
    stamp = max((f.stat().st_mtime for f in lists.glob("*_Packages*")), default=0.0)
    memo = cache_dir() / "kernel-version.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["lists_mtime"] == stamp:
            return saved["kver"]
    except (OSError, ValueError, KeyError):
        pass
    r = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True)
    m = re.search(r"Depends:\s*linux-image-(\S+-cloud-amd64)\b", r.stdout)
    if not m:
        return None
    memo.write_text(json.dumps({"lists_mtime": stamp, "kver": m.group(1)}) + "\n")
    return m.group(1)


def ensure_kernel(kver: str) -> Path:
    """Download + dpkg -x + depmod -b, once per kernel version. Returns the kernel folder."""
    kdir = cache_dir() / "kernel" / kver
    if (kdir / "vmlinuz").exists() and (kdir / "kpkg" / "lib" / "modules" / kver / "modules.dep").exists():
        return kdir
    log(f"prepare: fetching linux-image-{kver}")
    if kdir.exists():
        shutil.rmtree(kdir)
    kdir.mkdir(parents=True)
    pkg = f"linux-image-{kver}"
    try:
        run(["apt-get", "download", pkg], cwd=kdir)
    except HarnessError:
        run(["apt-get", "update"], env={"DEBIAN_FRONTEND": "noninteractive"})
        run(["apt-get", "download", pkg], cwd=kdir)
    debs = list(kdir.glob(f"{pkg}_*.deb"))
    if len(debs) != 1:
        raise HarnessError(f"apt-get download {pkg} left {debs} in {kdir}")
    kpkg = kdir / "kpkg"
    run(["dpkg", "-x", debs[0], kpkg])  # into the cache folder, NEVER into /
    run(["depmod", "-b", kpkg, kver])
    shutil.copy2(kpkg / "boot" / f"vmlinuz-{kver}", kdir / "vmlinuz")
    return kdir


def module_files(kpkg: Path, kver: str) -> list[Path]:
    """The .ko files of MODULES and their dependencies (modprobe --show-depends), in load order."""
    out = []
    for mod in MODULES + EXTRA_MODULES:
        proc = run(["modprobe", "-d", kpkg, "-S", kver, "--show-depends", mod])
        for line in proc.stdout.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod":
                path = Path(parts[1])
                if FORBIDDEN_MODULE.search(str(path)):
                    raise HarnessError(f"module {mod} pulls in {path.name}; FAT support must stay out of the guest")
                if path not in out:
                    out.append(path)
    return out


def _base_inputs_hash(kver: str, mods: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"format {BASE_FORMAT}\nkernel {kver}\nmodules {MODULES} {EXTRA_MODULES}\n".encode())
    for m in mods:
        h.update(f"ko {m.name}\n".encode())
    for f in (HARNESS_DIR / "guest" / "init", HARNESS_DIR / "guest" / "harness.sh", BUSYBOX):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def ensure_base(kver: str, kdir: Path) -> Path:
    """Base cpio: busybox-static + applet symlinks, modules (+deps), /init, /lib/harness.sh."""
    kpkg = kdir / "kpkg"
    mods = module_files(kpkg, kver)
    digest = _base_inputs_hash(kver, mods)
    out = cache_dir() / f"base-{kver}-{digest}.cpio"
    if out.exists():
        return out
    log(f"prepare: building base initramfs {out.name}")
    with tempfile.TemporaryDirectory(prefix="initcrypt-base-") as tmp:
        root = Path(tmp)
        make_skeleton(root)
        shutil.copy2(BUSYBOX, root / "usr/bin/busybox")
        applets = run([BUSYBOX, "--list"]).stdout.split()
        for a in applets:
            link = root / "usr/bin" / a
            if not link.exists() and a != "busybox":
                link.symlink_to("busybox")
        moddir = root / "usr/lib/modules" / kver
        for ko in mods:
            rel = ko.relative_to(kpkg / "lib/modules" / kver)
            dst = moddir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ko, dst)
        for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            shutil.copy2(kpkg / "lib/modules" / kver / f, moddir / f)
        run(["depmod", "-b", root / "usr", kver])
        shutil.copy2(HARNESS_DIR / "guest" / "init", root / "init")
        (root / "init").chmod(0o755)
        shutil.copy2(HARNESS_DIR / "guest" / "harness.sh", root / "usr/lib/harness.sh")
        (root / "etc/harness").mkdir(parents=True)
        (root / "etc/harness/modules").write_text("".join(f"{m}\n" for m in MODULES))
        tmp_out = out.with_name(out.name + ".tmp")
        pack_cpio(root, tmp_out)
        tmp_out.replace(out)
    for old in cache_dir().glob(f"base-{kver}-*.cpio"):
        if old != out:
            old.unlink()
    return out


def make_skeleton(root: Path) -> None:
    """Merged-/usr layout, like Debian's: /bin, /sbin, /lib, /lib64 are symlinks into /usr."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "dev", "proc", "sys", "run", "tmp", "etc", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        (root / name).symlink_to(f"usr/{name}")


def prepare() -> Prepared:
    t0 = time.monotonic()
    ensure_packages()
    kver = resolve_kernel_version()
    kdir = ensure_kernel(kver)
    base = ensure_base(kver, kdir)
    log(f"prepare: kernel {kver}, base {base.name} ({base.stat().st_size // 1024} KiB), "
        f"{time.monotonic() - t0:.1f} s")
    return Prepared(kver=kver, vmlinuz=kdir / "vmlinuz", base_cpio=base, kpkg=kdir / "kpkg")
