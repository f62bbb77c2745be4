"""Small helpers shared by every part of the harness: running commands, hashing, sizes, logging."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent.parent  # qemu-harness/
REPO_ROOT = HARNESS_DIR.parent


class HarnessError(Exception):
    """A failure of the harness itself (a tool failed, a scenario file is wrong), not of the guest."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd, *, stdin=subprocess.DEVNULL, input=None, env=None, cwd=None, capture=True):
    """Run cmd (a list, never through a shell). Raise HarnessError with its stderr when it fails.

    Returns the CompletedProcess (stdout/stderr as text when capture is true)."""
    cmd = [str(c) for c in cmd]
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    kwargs = dict(env=full_env, cwd=cwd)
    if input is not None:
        kwargs["input"] = input
    else:
        kwargs["stdin"] = stdin
    if capture:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc = subprocess.run(cmd, **kwargs)
    except FileNotFoundError as e:
        raise HarnessError(f"command not found: {cmd[0]} ({e})") from None
    if proc.returncode != 0:
        err = proc.stderr if capture else b""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        raise HarnessError(f"command failed (rc {proc.returncode}): {' '.join(cmd)}\n{err.strip()}")
    if capture:
        proc.stdout = proc.stdout.decode(errors="replace") if isinstance(proc.stdout, bytes) else proc.stdout
    return proc


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def parse_size(value) -> int:
    """'64M' / '1G' / '512K' / 4096 -> bytes (binary units)."""
    if isinstance(value, int):
        return value
    s = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s and s[-1] in units:
        return int(s[:-1]) * units[s[-1]]
    return int(s)
