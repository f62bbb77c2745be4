"""Real initramfs images: built by the distribution's own `dracut` (systemd initrd) or `mkinitramfs`
(busybox initramfs-tools) from a staged install of initcrypt, for scenarios with initramfs = "dracut" |
"mkinitramfs". Nothing is installed into the host: dracut gets a private base dir (dracutbasedir), mkinitramfs runs
in a private mount namespace where the cached kernel package's modules and config are bound on /lib/modules and
/boot.

  stage            scripts/install --destdir <out>/stage --binary <the harness binary> (+ the scenario's
                   /etc/initcrypt/volumes.json); the module and the hook read it through INITCRYPT_ROOT=<stage>
  dracut           <out>/dracut-base (symlinks to /usr/lib/dracut + a modules.d with 50initcrypt from the stage)
  mkinitramfs      <out>/initramfs-tools (a private conf dir: MODULES=list, our hook and local-top script)
Both leave <out>/initrd.img (mode 0644) and <out>/<tool>.log; the image is checked before the boot.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .binary import is_static_elf
from .util import REPO_ROOT, HarnessError, log, run

INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install"
DRACUT_DIR = Path("/usr/lib/dracut")
DRACUT_MODULES = ("systemd systemd-initrd dracut-systemd kernel-modules rootfs-block udev-rules base fs-lib crypt dm "
                  "initcrypt")
DRIVERS = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod")
ITOOLS_CONF = Path("/etc/initramfs-tools/initramfs.conf")
VOLUMES_JSON = "/etc/initcrypt/volumes.json"
LOG_TAIL = 12

# what a staged install must hold (scripts/install's layout)
STAGED_BINARY = "usr/sbin/initcrypt"
STAGED_DRACUT_MODULE = "usr/lib/dracut/modules.d/50initcrypt"
STAGED_ITOOLS = "usr/share/initramfs-tools"
# what the dracut image must hold besides the binary
DRACUT_IMAGE_FILES = ("usr/lib/systemd/system/initcrypt-keys.service",
                      "usr/lib/systemd/system-generators/initcrypt-generator")


class ImageBuildError(HarnessError):
    """dracut/mkinitramfs failed or its image lacks what initcrypt needs: a scenario failure, not a harness bug."""


def _tail(text: str, n: int = LOG_TAIL) -> str:
    lines = [l for l in text.replace("\r", "").splitlines() if l.strip()][-n:]
    return "\n".join(f"    | {l}" for l in lines)


def _tool(cmd: list, *, log_path: Path, what: str, env: dict | None = None, timeout: float = 600) -> str:
    """Run a builder; its combined output goes to log_path. Failure = ImageBuildError with the last lines."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        p = subprocess.run([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=full_env, timeout=timeout)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what}: command not found ({e})") from None
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what}: still running after {timeout:.0f} s (killed)") from None
    out = p.stdout.decode(errors="replace")
    log_path.write_text(out)
    if p.returncode != 0:
        raise ImageBuildError(f"{what} failed (rc {p.returncode}; full output in {log_path}), last lines:\n"
                              + _tail(out))
    return out


def stage_install(out: Path, binary: Path, volumes_json: str | None) -> Path:
    """scripts/install --destdir <out>/stage --binary BINARY, plus the scenario's volumes.json. Returns the stage."""
    if not is_static_elf(binary):
        raise ImageBuildError(f"{binary} is dynamically linked: the real initramfs scenarios need the static "
                              "build (scripts/build-static, or INITCRYPT_BIN=...)")
    stage = out / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    _tool(["sh", INSTALL_SCRIPT, "--destdir", stage, "--binary", binary], log_path=out / "install.log",
          what="scripts/install")
    missing = [p for p in (STAGED_BINARY, STAGED_DRACUT_MODULE + "/module-setup.sh",
                           STAGED_ITOOLS + "/hooks/initcrypt", STAGED_ITOOLS + "/scripts/local-top/initcrypt")
               if not (stage / p).exists()]
    if missing:
        raise ImageBuildError(f"scripts/install left no {', '.join(missing)} under {stage}")
    if volumes_json is not None:
        dst = stage / VOLUMES_JSON.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(volumes_json)
    return stage


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------------ dracut

def dracut_basedir(stage: Path, dest: Path) -> Path:
    """dracut has no extra-module-dir option: a private base dir whose entries are symlinks to /usr/lib/dracut's,
    except modules.d, which is real and holds symlinks to every stock module plus the staged 50initcrypt."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "modules.d").mkdir(parents=True)
    for e in DRACUT_DIR.iterdir():
        if e.name != "modules.d":
            (dest / e.name).symlink_to(e)
    for m in (DRACUT_DIR / "modules.d").iterdir():
        (dest / "modules.d" / m.name).symlink_to(m)
    ours = stage / STAGED_DRACUT_MODULE
    link = dest / "modules.d" / ours.name
    if link.exists() or link.is_symlink():
        raise ImageBuildError(f"{DRACUT_DIR}/modules.d already has {ours.name}: uninstall it from the host first")
    link.symlink_to(ours.resolve())
    return dest


def build_dracut(kver: str, kpkg: Path, stage: Path, out: Path, compress: str = "none") -> Path:
    img = out / "initrd.img"
    base = dracut_basedir(stage, out / "dracut-base")
    conf, confdir = out / "dracut.conf", out / "dracut.conf.d"  # empty: the host's /etc/dracut.conf* stay out
    conf.write_text("")
    confdir.mkdir(exist_ok=True)
    cmd = ["dracut", "--force", "--no-hostonly", "--no-early-microcode", "--conf", conf, "--confdir", confdir,
           "--kver", kver, "--kmoddir", kpkg / "lib" / "modules" / kver,
           "--no-compress" if compress == "none" else f"--compress={compress}",
           "-m", DRACUT_MODULES, "--drivers", " ".join(DRIVERS), img]
    _tool(cmd, log_path=out / "dracut.log", what="dracut",
          env={"dracutbasedir": str(base), "INITCRYPT_ROOT": str(stage.resolve())})
    if not img.is_file() or img.stat().st_size == 0:
        raise ImageBuildError(f"dracut exited 0 but left no image at {img}")
    img.chmod(0o644)  # dracut writes 0600
    check_dracut_image(img, stage, out)
    return img


def check_dracut_image(img: Path, stage: Path, out: Path) -> None:
    listing = run(["lsinitrd", img]).stdout
    (out / "lsinitrd.txt").write_text(listing)
    names = {l.split()[-1] for l in listing.splitlines() if l.split() and not l.startswith(("=", " "))}
    # lsinitrd prints `ls -l` style lines; a symlink ends with "-> target"
    names |= {l.split(" -> ")[0].split()[-1] for l in listing.splitlines() if " -> " in l}
    missing = [f for f in (STAGED_BINARY, *DRACUT_IMAGE_FILES) if f not in names]
    if missing:
        raise ImageBuildError(f"dracut image {img.name} lacks {', '.join(missing)} (lsinitrd.txt has the listing)")
    data = subprocess.run(["lsinitrd", "-f", STAGED_BINARY, str(img)], capture_output=True).stdout
    want = sha256_bytes((stage / STAGED_BINARY).read_bytes())
    if sha256_bytes(data) != want:
        raise ImageBuildError(f"dracut image: {STAGED_BINARY} ({len(data)} bytes) is not the staged binary "
                              f"(sha256 {sha256_bytes(data)[:16]}… vs {want[:16]}…)")


# ------------------------------------------------------------------------------------------------------- mkinitramfs

def itools_confdir(stage: Path, dest: Path) -> Path:
    """A private initramfs-tools conf dir (mkinitramfs -d): the host's initramfs.conf with MODULES=list, our
    driver list, and the staged hook + local-top script (mode 0755: a non-executable one is skipped silently)."""
    if dest.exists():
        shutil.rmtree(dest)
    for d in ("conf.d", "hooks", "scripts/local-top"):
        (dest / d).mkdir(parents=True)
    conf = ITOOLS_CONF.read_text() if ITOOLS_CONF.exists() else ""
    lines = [l for l in conf.splitlines() if not l.startswith(("MODULES=", "BUSYBOX="))]
    (dest / "initramfs.conf").write_text("\n".join(lines + ["MODULES=list", "BUSYBOX=y"]) + "\n")
    (dest / "modules").write_text("".join(f"{m}\n" for m in DRIVERS))
    for rel in ("hooks/initcrypt", "scripts/local-top/initcrypt"):
        dst = dest / rel
        shutil.copyfile(stage / STAGED_ITOOLS / rel, dst)
        dst.chmod(0o755)
    return dest


# Inside `unshare -m` (a private mount namespace, gone with the process: nothing is left mounted on the host).
# mkinitramfs hard-codes /lib/modules/$K and reads /boot/config-$K. /lib/modules does not exist on this host:
# an overlay on /usr/lib (upper layer on a private tmpfs) makes room for the mount point without touching the host.
NS_SCRIPT = r'''
set -e
kpkg=$1 scratch=$2; shift 2
if [ ! -d /lib/modules ]; then
	mount -t tmpfs -o mode=0700 initcrypt-harness "$scratch"
	mkdir "$scratch/upper" "$scratch/work"
	mount -t overlay overlay -o "lowerdir=/usr/lib,upperdir=$scratch/upper,workdir=$scratch/work" /usr/lib
	mkdir /usr/lib/modules
fi
mount --bind "$kpkg/lib/modules" /lib/modules
[ -d /boot ] || { echo "no /boot on the host to mount the kernel config on" >&2; exit 1; }
mount --bind "$kpkg/boot" /boot
exec "$@"
'''


def build_mkinitramfs(kver: str, kpkg: Path, stage: Path, out: Path) -> Path:
    img = out / "initrd.img"
    confdir = itools_confdir(stage, out / "initramfs-tools")
    scratch = out / "ns-scratch"
    scratch.mkdir(exist_ok=True)
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", NS_SCRIPT, "sh", kpkg, scratch,
           "mkinitramfs", "-d", confdir, "-o", img, kver]
    _tool(cmd, log_path=out / "mkinitramfs.log", what="mkinitramfs",
          env={"INITCRYPT_ROOT": str(stage.resolve())})
    scratch.rmdir()
    if not img.is_file() or img.stat().st_size == 0:
        raise ImageBuildError(f"mkinitramfs exited 0 but left no image at {img}")
    img.chmod(0o644)
    check_mkinitramfs_image(img, out)
    return img


def check_mkinitramfs_image(img: Path, out: Path) -> None:
    listing = run(["lsinitramfs", img]).stdout
    (out / "lsinitramfs.txt").write_text(listing)
    names = set(listing.split())
    if STAGED_BINARY not in names:
        raise ImageBuildError(f"mkinitramfs image {img.name} lacks {STAGED_BINARY} (the hook did not run? "
                              "lsinitramfs.txt has the listing)")
    unpacked = out / "unmkinitramfs"
    if unpacked.exists():
        shutil.rmtree(unpacked)
    run(["unmkinitramfs", img, unpacked])
    orders = list(unpacked.rglob("scripts/local-top/ORDER"))
    text = "".join(o.read_text() for o in orders)
    shutil.rmtree(unpacked)
    if "local-top/initcrypt" not in text:
        raise ImageBuildError("mkinitramfs image: scripts/local-top/ORDER does not run local-top/initcrypt "
                              f"({'no ORDER file' if not orders else 'ORDER: ' + ' '.join(text.split())})")


def build(kind: str, kver: str, kpkg: Path, binary: Path, volumes_json: str | None, out: Path) -> Path:
    """The scenario's initrd.img, built by `kind` (dracut | mkinitramfs) from a fresh staged install."""
    stage = stage_install(out, binary, volumes_json)
    if kind == "dracut":
        img = build_dracut(kver, kpkg, stage, out)
    elif kind == "mkinitramfs":
        img = build_mkinitramfs(kver, kpkg, stage, out)
    else:
        raise HarnessError(f"unknown initramfs builder {kind!r}")
    log(f"{kind}: {img} ({img.stat().st_size // 1024} KiB)")
    return img
