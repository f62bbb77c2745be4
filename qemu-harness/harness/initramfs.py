"""cpio archives: packing a tree, and the per-scenario overlay appended to the cached base.

The kernel unpacks concatenated (uncompressed newc) archives in order, so initrd = base.cpio + overlay.cpio.
Uncompressed on purpose: under TCG, gunzip in the guest costs more than reading a few more MiB.
"""

import os
import shutil
import subprocess
from pathlib import Path

from .util import HarnessError, run

HOOK_FUNCTIONS = "/usr/share/initramfs-tools/hook-functions"
LIBGCC = Path("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1")
TOP_SYMLINKS = ("bin", "sbin", "lib", "lib64")


def pack_cpio(root: Path, out: Path, *, skip_top_symlinks: bool = False) -> None:
    """newc archive of root's tree, owned by root, in sorted order (stable output for stable input)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames + filenames):
            rel = rel_dir / name
            if skip_top_symlinks and str(rel) in TOP_SYMLINKS:
                continue
            entries.append(str(rel))
    listing = "".join(f"{e}\0" for e in sorted(entries)).encode()
    with open(out, "wb") as f:
        p = subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet", "-R", "0:0"], input=listing,
                           cwd=root, stdout=f, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise HarnessError(f"cpio failed in {root}: {p.stderr.decode(errors='replace').strip()}")


def install_binary(root: Path, binary: Path, static: bool, dest: str) -> None:
    """Put binary at dest (a guest path); a dynamic one gets its libraries through initramfs-tools' copy_exec."""
    dst = root / dest.lstrip("/")
    if static:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, dst)
        dst.chmod(0o755)
        return
    # copy_exec SRC DEST copies SRC and every library ldd names (under $DESTDIR). glibc 2.36 merged libpthread
    # into libc, so copy_exec's libgcc hook never fires: copy libgcc_s.so.1 explicitly (research pitfall P2).
    # copy_file returns 1 when the file is already there (ldd named it): success is the file being present.
    script = ('. "$1"; copy_exec "$2" "$3" || exit 1; [ -z "$4" ] && exit 0; '
              'copy_file library "$4" || [ -e "$DESTDIR$4" ]')
    libgcc = str(LIBGCC) if LIBGCC.exists() else ""
    run(["sh", "-c", script, "sh", HOOK_FUNCTIONS, binary, dest, libgcc], env={"DESTDIR": str(root), "verbose": "n"})
    if not dst.exists():
        raise HarnessError(f"copy_exec did not install {binary} as {dest}")


def concat(parts: list[Path], out: Path) -> None:
    with open(out, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
