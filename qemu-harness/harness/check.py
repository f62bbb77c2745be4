"""Deciding PASS/FAIL from the serial transcript, the guest's @@facts and the disk images."""

import re

from .scenario import Scenario, expand

FACT_RE = re.compile(r"@@([A-Za-z0-9_]+)=(.*)$")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ALWAYS_ABSENT = ["Kernel panic"]


def parse_facts(transcript: str) -> dict:
    """@@NAME=VALUE lines (anywhere in a line); the last value of a name wins."""
    facts = {}
    for line in transcript.splitlines():
        m = FACT_RE.search(line.rstrip("\r"))
        if m:
            facts[m.group(1)] = m.group(2)
    return facts


def rendered_lines(raw: str) -> list[str]:
    """The console as a terminal shows it: per line (the tty's \\r\\n line ends stripped), the text after its last
    carriage return, escape sequences removed (an in-place progress line rewritten with \\r leaves only its last state)."""
    return [ANSI_RE.sub("", line.rstrip("\r").rsplit("\r", 1)[-1]) for line in raw.split("\n")]


def check_lines(scn: Scenario, raw: str) -> list[str]:
    """[[expect_lines]]: every rendered line in which `with` occurs must match `re`; at least `min` such lines."""
    failures = []
    lines = rendered_lines(raw)
    for with_re, full_re, minimum in scn.expect_lines:
        hits = [l for l in lines if with_re.search(l)]
        bad = [l for l in hits if not full_re.search(l)]
        if bad:
            failures.append(f"{len(bad)} of {len(hits)} console lines with /{with_re.pattern}/ do not match "
                            f"/{full_re.pattern}/, e.g. {bad[0].strip()!r}")
        if len(hits) < minimum:
            failures.append(f"only {len(hits)} console lines with /{with_re.pattern}/ (expected >= {minimum})")
    return failures


def check(scn: Scenario, transcript: str, host_facts: dict, guest_facts: dict, sha_before: dict, sha_after: dict,
          vm) -> list[str]:
    """Every failed expectation as one line; empty list = PASS."""
    where = str(scn.path)
    failures = []
    if scn.real_initramfs:  # systemd colours unit names: "Finished \x1b[0;1;39mfoo.service\x1b[0m."
        transcript = ANSI_RE.sub("", transcript)
    if vm.timed_out:
        failures.append(f"timeout: QEMU still running after {scn.timeout:.0f} s (killed)")
    elif vm.returncode != 0:
        failures.append(f"QEMU exited with rc {vm.returncode} (its own messages are in serial.log)")
    failures += vm.hotplug_errors
    if not scn.real_initramfs:
        if guest_facts.get("HARNESS_DONE") != "1":
            failures.append("guest did not reach the end of /init (no @@HARNESS_DONE=1)")
    elif scn.expect_root_init:
        if guest_facts.get("ROOT_INIT") != "1":
            failures.append(f"the root filesystem's /sbin/init never ran (no @@ROOT_INIT=1): the {scn.initramfs} "
                            "initramfs did not switch into the root")
        elif guest_facts.get("HARNESS_DONE") != "1":
            failures.append("the root filesystem's /sbin/init did not reach its end (no @@HARNESS_DONE=1)")
    elif "ROOT_INIT" in guest_facts:
        failures.append("the root filesystem's /sbin/init ran (@@ROOT_INIT present) but expect_root_init = false")

    for chain in scn.expect_in_order:
        failures += _check_chain(transcript, [expand(w, host_facts, where=where) for w in chain])

    for want in scn.expect_present:
        want = expand(want, host_facts, where=where)
        if want not in transcript:
            failures.append(f"expected somewhere: {want!r} (not found)")

    for bad in ALWAYS_ABSENT + scn.expect_absent:
        bad = expand(bad, host_facts, where=where)
        if bad in transcript:
            line = next(l for l in transcript.splitlines() if bad in l)
            failures.append(f"forbidden text present: {bad!r} in line {line.strip()!r}")

    for name, want in scn.expect_facts.items():
        want = expand(want, host_facts, where=where)
        got = guest_facts.get(name)
        if got != want:
            failures.append(f"fact @@{name}: expected {want!r}, got {got!r}")

    for disk, checks in scn.expect_disk.items():
        if "unchanged" in checks:
            same = sha_before[disk] == sha_after[disk]
            if checks["unchanged"] and not same:
                failures.append(f"disk {disk}: image changed during the boot (sha256 differs)")
            if not checks["unchanged"] and same:
                failures.append(f"disk {disk}: image expected to change but is identical")
    return failures


def _check_chain(transcript: str, chain: list[str]) -> list[str]:
    """Each substring must appear after the previous one of its chain."""
    failures, pos = [], 0
    for want in chain:
        i = transcript.find(want, pos)
        if i < 0:
            earlier = transcript.find(want)
            failures.append(f"expected in order: {want!r}" + (" (found, but before the previous expectation)"
                                                               if earlier >= 0 else " (not found)"))
        else:
            pos = i + len(want)
    return failures
