"""qemu-harness/run: --list | --all | NAME..."""

import argparse
import concurrent.futures
import fcntl
import os
import sys
import time

from . import scenario
from .binary import locate_binary, target_dir
from .prepare import prepare
from .runner import run_scenario
from .util import HarnessError, log

TAIL_LINES = 15


def exclusive_run_lock():
    """One harness run at a time per target dir: two runs would wipe each other's target/qemu/<scenario>/ and share
    2 cores under TCG. A second run waits (and says so) instead of clobbering the first."""
    d = target_dir() / "qemu"
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / ".run.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        log(f"waiting for another qemu-harness run ({holder}) to finish: one run at a time per {d}")
        t0 = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        log(f"lock acquired after {time.monotonic() - t0:.0f} s")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qemu-harness/run", description="Boot initcrypt scenarios under QEMU/TCG.")
    ap.add_argument("--list", action="store_true", help="list scenarios (name, default, description)")
    ap.add_argument("--all", action="store_true", help="run every scenario with default = true")
    ap.add_argument("--prepare-only", action="store_true", help="only install/fetch/build the cached parts")
    ap.add_argument("--selftest", action="store_true",
                    help="check the host-side parts of the full-OS machinery (no QEMU; about a minute)")
    ap.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                    help="run up to N scenarios at once (TCG: one host thread per vCPU; default 1)")
    ap.add_argument("names", nargs="*", metavar="NAME")
    args = ap.parse_args(argv)

    try:
        if args.list:
            for name in scenario.all_names():
                s = scenario.load(name)
                print(f"{name:28} {'default' if s.default else 'extra  '}  {s.description}")
            return 0
        if args.selftest:
            from . import selftest
            return selftest.main()
        if args.prepare_only:
            prepare()
            return 0
        names = list(args.names)
        if args.all:
            names += [n for n in scenario.all_names() if scenario.load(n).default and n not in names]
        if not names:
            ap.error("name at least one scenario, or --all, or --list")
        scenarios = [scenario.load(n) for n in names]  # fail early on a bad file
    except HarnessError as e:
        log(f"error: {e}")
        return 2
    try:
        prep = prepare()
        binary = locate_binary()
    except HarnessError as e:
        log(f"error: {e}")
        for n in names:
            print(f"FAIL {n} 0.0s (not run: preparation failed)", flush=True)
        print(f"0 passed, {len(names)} failed", flush=True)
        return 2

    lock = exclusive_run_lock()
    passed = failed = 0
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")

    def one(scn):
        log(f"--- {scn.name}: {scn.description}")
        return run_scenario(scn, prep, binary)

    if args.jobs == 1:
        results = (one(s) for s in scenarios)
    else:
        # Threads are enough: a scenario waits on QEMU and tools. Results print as they finish.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
        results = (f.result() for f in concurrent.futures.as_completed([pool.submit(one, s) for s in scenarios]))
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        print(f"{status} {r.name} {r.wall:.1f}s {r.serial_log}", flush=True)
        for f in r.failures:
            print(f"    {f}", flush=True)
        if not r.passed and r.serial_log.exists():
            tail = r.serial_log.read_text(errors="replace").replace("\r", "").splitlines()[-TAIL_LINES:]
            print(f"    --- last {len(tail)} lines of {r.serial_log.name}:", *(f"    | {t}" for t in tail), sep="\n")
        passed, failed = passed + r.passed, failed + (not r.passed)
    print(f"{passed} passed, {failed} failed", flush=True)
    lock.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
