"""Scenario files: qemu-harness/scenarios/NAME.toml (format in qemu-harness/README.md).

Placeholders {<disk>.<fact>} (and {key.<name>} for guest files/scripts) are expanded after the disks are built.
"""

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .util import HARNESS_DIR, HarnessError

SCENARIO_DIR = HARNESS_DIR / "scenarios"

TOP_KEYS = {"description", "default", "memory", "smp", "timeout", "kernel_args", "disk", "files", "guest_script",
            "guest_tools", "expect_in_order", "expect_present", "expect_absent", "expect_facts", "expect_disk",
            "power_cut", "expect_lines", "initramfs", "expect_root_init", "guest", "boot"}
GUESTS = ("debian-dracut", "debian-initramfs-tools")
# a full-OS scenario (guest = ...) says everything per [[boot]]; these top-level keys belong to the other kinds
GUEST_FORBIDDEN = {"guest_script", "guest_tools", "initramfs", "expect_root_init", "files", "power_cut",
                   "expect_in_order", "expect_present", "expect_facts", "expect_lines"}
BOOT_KEYS = {"script", "end", "kernel_args", "disks", "files", "timeout", "expect_in_order", "expect_present",
             "expect_absent", "expect_facts", "expect_facts_not", "expect_lines", "expect_done", "allow_emergency",
             "power_cut"}
BOOT_POWER_CUT_KEYS = {"after", "max_delay", "min_delay", "seed", "repeat"}
INITRAMFS_KINDS = ("harness", "dracut", "mkinitramfs")
REAL_INITRAMFS_FILES = {"/etc/initcrypt/volumes.json"}  # what a staged install can carry into a real image
DISK_ATTACH_KEYS = {"name", "builder", "bus", "controller", "lun", "hotplug_after", "readonly", "physical_block_size",
                    "logical_block_size"}
DISK_EXPECT_KEYS = {"unchanged", "decrypts_to_original", "luks_sector_size", "plaintext_original", "encrypted",
                    "plaintext", "header"}
POWER_CUT_KEYS = {"boots", "seed", "after", "max_delay", "min_delay", "until", "min_cuts_in_pass"}
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Lines that reach the serial console straight from their writer, in the order they were written: systemd's own
# status lines, the root's /sbin/init facts and the kernel's last words. Under a systemd initrd, initcrypt's
# stderr goes to journald, which forwards it to the console on its own schedule: such a line can print before or
# after a status line written at nearly the same moment, so one order chain must not hold both kinds.
CONSOLE_DIRECT_RE = re.compile(r"^(Starting |Started |Finished |Mounted |Reached target |Failed to start |Stopped |"
                               r"@@|reboot: )")
PLACEHOLDER_RE = re.compile(r"\{([a-z][a-z0-9_]*)\.([A-Za-z0-9_]+)\}")


@dataclass
class DiskSpec:
    name: str
    builder: str
    bus: str = "virtio"
    controller: int = 0
    lun: int = 0
    hotplug_after: float | None = None
    readonly: bool = False
    physical_block_size: int | None = None  # None: QEMU's default (512)
    logical_block_size: int = 512
    params: dict = field(default_factory=dict)
    serial: str | None = None  # the guest-visible serial; None: the name (the harness's script disk sets its own)


@dataclass
class PowerCut:
    """[power_cut]: `boots` boots of the same images, each SIGKILLed a seeded random delay in [min_delay,
    max_delay) after the first line matching `after`; then the final boot, checked as usual."""
    boots: int
    seed: int
    after: re.Pattern
    max_delay: float
    min_delay: float = 0.0
    until: re.Pattern | None = None  # a line that ends the pass: a cut after it did not land inside the pass
    min_cuts_in_pass: int = 0        # fail if fewer cuts landed between `after` and `until`


@dataclass
class BootPowerCut:
    """[boot.power_cut] of a full-OS boot: QEMU SIGKILLed a seeded random delay in [min_delay, max_delay) after the
    first console line matching `after`; `repeat` such boots of the same images (each re-reads the boot config)."""
    after: re.Pattern
    max_delay: float
    min_delay: float = 0.0
    seed: int = 0
    repeat: int = 1


@dataclass
class BootSpec:
    """One [[boot]] of a full-OS scenario (guest = ...)."""
    index: int
    script: str = ""
    end: str = "poweroff"            # after the script: poweroff | reboot | none (the script ends the boot itself)
    kernel_args: str = ""            # added after the guest's own arguments and the harness's
    disks: list[str] | None = None   # attached at this boot, in this order (None: every [[disk]])
    files: dict = field(default_factory=dict)
    timeout: float | None = None     # None: the scenario's
    expect_in_order: list[list[str]] = field(default_factory=list)
    expect_present: list[str] = field(default_factory=list)
    expect_absent: list[str] = field(default_factory=list)
    expect_facts: dict = field(default_factory=dict)
    expect_facts_not: dict = field(default_factory=dict)
    expect_lines: list = field(default_factory=list)
    expect_done: bool = True         # @@HARNESS_DONE=1 required (false: e.g. a boot that must fail)
    allow_emergency: bool = False    # else @@GUEST_EMERGENCY=1 (the image's emergency.service) fails the boot
    power_cut: BootPowerCut | None = None


@dataclass
class Scenario:
    name: str
    description: str
    default: bool
    memory: int
    smp: int
    timeout: float
    kernel_args: str
    disks: list[DiskSpec]
    files: dict
    guest_script: str
    guest_tools: list[str]
    expect_in_order: list[list[str]]  # independent chains; each one's substrings appear in its order
    expect_present: list[str]
    expect_absent: list[str]
    expect_facts: dict
    expect_disk: dict
    path: Path
    power_cut: PowerCut | None = None
    expect_lines: list = field(default_factory=list)  # [(with: re.Pattern, re: re.Pattern, min: int)]
    initramfs: str = "harness"    # harness: base cpio + overlay + guest_script; dracut | mkinitramfs: a real image
    expect_root_init: bool = True  # real images: the root's /sbin/init must run (false: it must not)
    guest: str | None = None       # full-OS scenario: debian-dracut | debian-initramfs-tools
    boots: list[BootSpec] = field(default_factory=list)

    @property
    def real_initramfs(self) -> bool:
        return self.initramfs != "harness"

    @property
    def expects_done(self) -> bool:
        """Whether the guest must print @@HARNESS_DONE=1 (the harness /init, or the bootable root's init)."""
        return not self.real_initramfs or self.expect_root_init


def _fail(path, msg):
    raise HarnessError(f"{path}: {msg}")


def load(name: str) -> Scenario:
    path = SCENARIO_DIR / f"{name}.toml"
    if not path.exists():
        raise HarnessError(f"no scenario {name!r} ({path} missing; see --list)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        _fail(path, f"invalid TOML: {e}")
    unknown = set(data) - TOP_KEYS
    if unknown:
        _fail(path, f"unknown key(s) {sorted(unknown)}")
    if "guest" in data:
        return _load_guest(name, path, data)
    if "boot" in data:
        _fail(path, "[[boot]] needs guest = \"debian-dracut\" or \"debian-initramfs-tools\"")
    kind = data.get("initramfs", "harness")
    if kind not in INITRAMFS_KINDS:
        _fail(path, f"initramfs must be one of {', '.join(INITRAMFS_KINDS)}, not {kind!r}")
    if "description" not in data or (kind == "harness" and "guest_script" not in data):
        _fail(path, "description and guest_script are required (in TOML, top-level keys go before the first [table])")
    if kind != "harness":
        for key in ("guest_script", "guest_tools"):
            if key in data:
                _fail(path, f"{key} has no effect with initramfs = {kind!r} (the root filesystem's /sbin/init "
                            "prints the facts): remove it")
        extra = set(data.get("files", {})) - REAL_INITRAMFS_FILES
        if extra:
            _fail(path, f"files {sorted(extra)}: with initramfs = {kind!r} only {sorted(REAL_INITRAMFS_FILES)} "
                        "goes into the image (through the staged install)")
    elif "expect_root_init" in data:
        _fail(path, "expect_root_init needs initramfs = \"dracut\" or \"mkinitramfs\"")

    disks = _load_disks(path, data)
    names = [d.name for d in disks]
    expect_disk = _load_expect_disk(path, data, names)

    power_cut = None
    if "power_cut" in data:
        pc = data["power_cut"]
        if set(pc) - POWER_CUT_KEYS:
            _fail(path, f"power_cut: unknown key(s) {sorted(set(pc) - POWER_CUT_KEYS)}")
        if not {"boots", "after", "max_delay"} <= set(pc):
            _fail(path, "power_cut needs boots, after and max_delay")
        try:
            power_cut = PowerCut(
                boots=int(pc["boots"]), seed=int(pc.get("seed", 0)), after=re.compile(pc["after"]),
                max_delay=float(pc["max_delay"]), min_delay=float(pc.get("min_delay", 0)),
                until=re.compile(pc["until"]) if pc.get("until") else None,
                min_cuts_in_pass=int(pc.get("min_cuts_in_pass", 0)))
        except (re.error, ValueError) as e:
            _fail(path, f"power_cut: {e}")
        if power_cut.boots < 1 or not 0 <= power_cut.min_delay < power_cut.max_delay:
            _fail(path, "power_cut: boots >= 1 and 0 <= min_delay < max_delay")

    expect_lines = []
    for i, rule in enumerate(data.get("expect_lines", [])):
        if set(rule) - {"with", "re", "min"} or not {"with", "re"} <= set(rule):
            _fail(path, f"expect_lines[{i}]: keys are with, re and optional min")
        try:
            expect_lines.append((re.compile(rule["with"]), re.compile(rule["re"]), int(rule.get("min", 1))))
        except (re.error, ValueError) as e:
            _fail(path, f"expect_lines[{i}]: {e}")

    return Scenario(
        name=name, description=data["description"], default=bool(data.get("default", False)),
        memory=int(data.get("memory", 512)), smp=int(data.get("smp", 1)), timeout=float(data.get("timeout", 120)),
        kernel_args=data.get("kernel_args", ""), disks=disks, files=data.get("files", {}),
        guest_script=data.get("guest_script", ""), guest_tools=data.get("guest_tools", []),
        expect_in_order=_order_chains(path, data.get("expect_in_order", []), kind), expect_present=data.get("expect_present", []),
        expect_absent=data.get("expect_absent", []),
        expect_facts={k: str(v) for k, v in data.get("expect_facts", {}).items()},
        expect_disk=expect_disk, path=path, power_cut=power_cut, expect_lines=expect_lines,
        initramfs=kind, expect_root_init=bool(data.get("expect_root_init", True)))


RESERVED_DISK_NAME = re.compile(r"^(key|boot\d*|hscript)$")


def _load_disks(path: Path, data: dict) -> list[DiskSpec]:
    disks = []
    for d in data.get("disk", []):
        d = dict(d)
        if "name" not in d or "builder" not in d:
            _fail(path, "every [[disk]] needs name and builder")
        if not NAME_RE.match(d["name"]) or RESERVED_DISK_NAME.match(d["name"]):
            _fail(path, f"disk name {d['name']!r} must match {NAME_RE.pattern} and not be key, boot, bootN or hscript")
        attach = {k: d.pop(k) for k in list(d) if k in DISK_ATTACH_KEYS}
        spec = DiskSpec(**attach, params=d)
        if spec.bus not in ("virtio", "scsi"):
            _fail(path, f"disk {spec.name}: bus must be virtio or scsi")
        disks.append(spec)
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        _fail(path, "disk names must be unique")
    luns = [(d.controller, d.lun) for d in disks if d.bus == "scsi"]
    if len(set(luns)) != len(luns):
        _fail(path, "two scsi disks on the same controller/lun")
    return disks


def _load_expect_disk(path: Path, data: dict, names: list[str]) -> dict:
    expect_disk = data.get("expect_disk", {})
    for disk, checks in expect_disk.items():
        if disk not in names:
            _fail(path, f"expect_disk.{disk}: no such disk")
        if set(checks) - DISK_EXPECT_KEYS:
            _fail(path, f"expect_disk.{disk}: unknown check(s) {sorted(set(checks) - DISK_EXPECT_KEYS)}")
    return expect_disk


def _expect_lines(path: Path, rules: list, where: str) -> list:
    out = []
    for i, rule in enumerate(rules):
        if set(rule) - {"with", "re", "min"} or not {"with", "re"} <= set(rule):
            _fail(path, f"{where}[{i}]: keys are with, re and optional min")
        try:
            out.append((re.compile(rule["with"]), re.compile(rule["re"]), int(rule.get("min", 1))))
        except (re.error, ValueError) as e:
            _fail(path, f"{where}[{i}]: {e}")
    return out


def _load_guest(name: str, path: Path, data: dict) -> Scenario:
    """guest = "debian-dracut" | "debian-initramfs-tools": the OS disk `os` (builder guest-os, first, virtio) is
    implicit unless a [[disk]] uses builder guest-os; everything the guest does is in [[boot]] entries."""
    guest = data["guest"]
    if guest not in GUESTS:
        _fail(path, f"guest must be one of {', '.join(GUESTS)}, not {guest!r}")
    bad = set(data) & GUEST_FORBIDDEN
    if bad:
        _fail(path, f"{sorted(bad)} do not apply to a full-OS scenario: say them per [[boot]]")
    if "description" not in data or not data.get("boot"):
        _fail(path, "description and at least one [[boot]] are required (top-level keys before the first table)")
    disks = _load_disks(path, data)
    if not any(d.builder == "guest-os" for d in disks):
        if any(d.name == "os" for d in disks):
            _fail(path, "disk name os is the implicit guest OS disk: rename yours or give it builder = \"guest-os\"")
        disks.insert(0, DiskSpec(name="os", builder="guest-os"))
    if sum(d.builder == "guest-os" for d in disks) != 1:
        _fail(path, "exactly one guest-os disk")
    names = [d.name for d in disks]
    boots = []
    for i, b in enumerate(data["boot"], start=1):
        where = f"boot[{i}]"
        if set(b) - BOOT_KEYS:
            _fail(path, f"{where}: unknown key(s) {sorted(set(b) - BOOT_KEYS)}")
        spec = BootSpec(index=i, script=b.get("script", ""), end=b.get("end", "poweroff"),
                        kernel_args=b.get("kernel_args", ""), disks=b.get("disks"), files=b.get("files", {}),
                        timeout=float(b["timeout"]) if "timeout" in b else None,
                        expect_in_order=_order_chains(path, b.get("expect_in_order", []), "guest"),
                        expect_present=b.get("expect_present", []), expect_absent=b.get("expect_absent", []),
                        expect_facts={k: str(v) for k, v in b.get("expect_facts", {}).items()},
                        expect_facts_not={k: str(v) for k, v in b.get("expect_facts_not", {}).items()},
                        expect_lines=_expect_lines(path, b.get("expect_lines", []), f"{where}.expect_lines"),
                        expect_done=bool(b.get("expect_done", "power_cut" not in b)),
                        allow_emergency=bool(b.get("allow_emergency", False)))
        if spec.end not in ("poweroff", "reboot", "none"):
            _fail(path, f"{where}: end must be poweroff, reboot or none")
        if spec.disks is not None:
            unknown = [n for n in spec.disks if n not in names]
            if unknown or len(set(spec.disks)) != len(spec.disks):
                _fail(path, f"{where}: disks {spec.disks}: unknown or repeated name(s) (known: {names})")
        if "power_cut" in b:
            pc = b["power_cut"]
            if set(pc) - BOOT_POWER_CUT_KEYS or not {"after", "max_delay"} <= set(pc):
                _fail(path, f"{where}.power_cut: keys after, max_delay and optional min_delay, seed, repeat")
            try:
                spec.power_cut = BootPowerCut(after=re.compile(pc["after"]), max_delay=float(pc["max_delay"]),
                                              min_delay=float(pc.get("min_delay", 0)), seed=int(pc.get("seed", 0)),
                                              repeat=int(pc.get("repeat", 1)))
            except (re.error, ValueError) as e:
                _fail(path, f"{where}.power_cut: {e}")
            if spec.power_cut.repeat < 1 or not 0 <= spec.power_cut.min_delay < spec.power_cut.max_delay:
                _fail(path, f"{where}.power_cut: repeat >= 1 and 0 <= min_delay < max_delay")
        boots.append(spec)
    return Scenario(
        name=name, description=data["description"], default=bool(data.get("default", False)),
        memory=int(data.get("memory", 1024)), smp=int(data.get("smp", 1)), timeout=float(data.get("timeout", 300)),
        kernel_args=data.get("kernel_args", ""), disks=disks, files={}, guest_script="", guest_tools=[],
        expect_in_order=[], expect_present=[], expect_absent=data.get("expect_absent", []), expect_facts={},
        expect_disk=_load_expect_disk(path, data, names), path=path, guest=guest, boots=boots)


def all_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def expand(template: str, facts: dict, keys=None, *, where: str = "") -> str:
    """Replace {disk.fact}; {key.NAME} only when keys (a KeyStore) is given. Unknown names are an error."""
    def sub(m):
        obj, attr = m.group(1), m.group(2)
        if obj == "key" and keys is not None:
            return keys.get(attr).decode()
        if obj in facts and attr in facts[obj]:
            return facts[obj][attr]
        known = ", ".join(f"{d}.{f}" for d in facts for f in facts[d])
        raise HarnessError(f"{where}: unknown placeholder {m.group(0)} (known: {known})")
    return PLACEHOLDER_RE.sub(sub, template)


def _order_chains(path: Path, raw: list, kind: str) -> list[list[str]]:
    """One chain (a list of strings) or several (a list of lists), checked independently of each other."""
    if not isinstance(raw, list):
        _fail(path, "expect_in_order must be a list of strings or a list of lists of strings")
    chains = raw if raw and all(isinstance(c, list) for c in raw) else [raw]
    for i, chain in enumerate(chains):
        if not all(isinstance(w, str) for w in chain):
            _fail(path, f"expect_in_order[{i}]: strings only (do not mix strings and lists)")
        if kind == "dracut":
            direct = {bool(CONSOLE_DIRECT_RE.match(w)) for w in chain}
            if len(direct) > 1:
                _fail(path, f"expect_in_order[{i}] mixes lines journald forwards (initcrypt's) with lines written "
                            "straight to the console (systemd status, @@facts): their relative order on the serial "
                            "console is not guaranteed. Put them in separate chains (a list of lists)")
    return [c for c in chains if c]
