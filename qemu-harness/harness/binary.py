"""Which initcrypt binary goes into the guest.

Order: $INITCRYPT_BIN; target/x86_64-unknown-linux-musl/release/initcrypt (the static build);
else `cargo build --release` and target/release/initcrypt (dynamic glibc: its libraries go in via copy_exec).
"""

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .util import REPO_ROOT, HarnessError, log, run

MUSL_BIN = Path("target/x86_64-unknown-linux-musl/release/initcrypt")
GLIBC_BIN = Path("target/release/initcrypt")
PT_INTERP = 3


@dataclass
class Binary:
    path: Path
    static: bool
    origin: str  # how it was chosen, for the report


def is_static_elf(path: Path) -> bool:
    """True when the ELF has no PT_INTERP program header (static or static-pie)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2:
            raise HarnessError(f"{path} is not a 64-bit ELF file")
        endian = "<" if ident[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", ident, 32)
        phentsize, phnum = struct.unpack_from(endian + "HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == PT_INTERP:
            return False
    return True


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))


def locate_binary() -> Binary:
    env = os.environ.get("INITCRYPT_BIN")
    if env:
        path, origin = Path(env).resolve(), "INITCRYPT_BIN"
    else:
        tdir = target_dir()
        musl = tdir / MUSL_BIN.relative_to("target")
        if musl.exists():
            path, origin = musl, "static musl build"
        else:
            log("binary: no musl build found, running cargo build --release")
            run(["cargo", "build", "--release"], cwd=REPO_ROOT, capture=True)
            path, origin = tdir / GLIBC_BIN.relative_to("target"), "cargo build --release"
    if not path.is_file():
        raise HarnessError(f"initcrypt binary not found at {path} ({origin})")
    b = Binary(path=path, static=is_static_elf(path), origin=origin)
    log(f"binary: {b.path} ({b.origin}, {'static' if b.static else 'dynamic: libraries via copy_exec'})")
    return b
