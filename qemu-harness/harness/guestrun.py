"""Full-OS scenarios (`guest = ...` + `[[boot]]`): the cached image (guestimage), one QEMU run per boot with the
kernel, initrd and command line the guest's own grub.cfg names (guestboot), the scenario's script delivered on the
script disk, per-boot checks, then the host disk checks."""

import json
import random
import shutil
import threading
import time
from pathlib import Path

from . import check, diskcheck, disks, guestboot, guestimage, vm
from .binary import Binary
from .scenario import BootSpec, DiskSpec, Scenario, expand
from .util import HarnessError, log, sha256_file

FIRSTBOOT_SCRIPT = """\
update-grub
mark UPDATE_GRUB_RC $?
"""


def _boot_vm(cmd: list[str], serial: Path, timeout: float, hotplugs=(), kill=None) -> vm.VmResult:
    qmp_sock = vm.make_qmp_path()
    cmd = list(cmd)
    i = cmd.index("-qmp") + 1
    cmd[i] = cmd[i].replace("unix:/QMP,", f"unix:{qmp_sock},")
    try:
        return vm.run_vm(cmd, serial_log=serial, timeout=timeout, hotplugs=list(hotplugs), qmp_sock=qmp_sock,
                         kill=kill)
    finally:
        shutil.rmtree(qmp_sock.parent, ignore_errors=True)


def _script_spec() -> DiskSpec:
    return DiskSpec(name="hscript", builder="script", readonly=True, serial=guestboot.SCRIPT_SERIAL)


def first_boot(meta: dict, tree: Path, work: Path) -> None:
    """The image-building boot of a base: the tree as a disk, booted with its own kernel and initrd, runs the
    guest's update-grub; the guest's /boot/grub then goes back into the tree."""
    img = work / "disk.img"
    guestimage.make_disk(tree, img, meta)
    kver = meta["kver"]
    script = work / "firstboot.script.img"
    guestboot.script_disk(script, boot=0, end="poweroff", script=FIRSTBOOT_SCRIPT)
    os_disk = DiskSpec(name="os", builder="guest-os")
    spec = _script_spec()
    args = guestboot.full_cmdline(f"root=UUID={meta['fs_uuid']['root']} ro console=ttyS0", "")
    cmd = vm.qemu_command(kernel=tree / "boot" / f"vmlinuz-{kver}", initrd=tree / "boot" / f"initrd.img-{kver}",
                          append=args, memory=1024, smp=1, disks=[os_disk, spec],
                          images={"os": img, "hscript": script}, qmp_sock=Path("/QMP"), base="")
    serial = work / "firstboot.serial.log"
    r = _boot_vm(cmd, serial, guestimage.FIRSTBOOT_TIMEOUT)
    text = serial.read_text(errors="replace")
    facts = check.parse_facts(text.replace("\r", ""))
    meta["firstboot_vm_seconds"] = round(r.wall, 1)
    meta["firstboot_facts"] = {k: v for k, v in facts.items() if k in ("SYSTEM_STATE", "BOOT_FINISHED_UPTIME")}
    if r.timed_out or facts.get("UPDATE_GRUB_RC") != "0" or facts.get("HARNESS_DONE") != "1":
        raise HarnessError(f"guest image first boot failed (timed out: {r.timed_out}, UPDATE_GRUB_RC "
                           f"{facts.get('UPDATE_GRUB_RC')}, log {serial}):\n"
                           + "\n".join(text.replace("\r", "").splitlines()[-20:]))
    part = next(p for p in guestboot.partitions(img) if p["name"] == "boot")
    reader = guestboot.ExtReader(img, part, work / "replay")
    try:
        shutil.rmtree(tree / "boot" / "grub", ignore_errors=True)
        guestboot.copy_tree_boot(reader, "/grub", tree / "boot")
    finally:
        reader.close()
    entry = guestboot.parse_first_menuentry((tree / "boot" / "grub" / "grub.cfg").read_text())
    meta["grub_first_entry"] = {"title": entry["title"], "linux": entry["linux"], "initrd": entry["initrd"]}
    img.unlink()


# ------------------------------------------------------------------------------------------------------- scenarios

_DEB_LOCK = threading.Lock()
_DEBS: dict = {}  # binary path -> the package built from it in this run (package-deb writes one fixed folder)


def prepare_guest(flavour: str, binary: Binary, out: Path) -> guestimage.GuestImage:
    """The cached image of the flavour with this build of the package installed (built if missing)."""
    if not binary.static:
        raise HarnessError(f"{binary.path} is dynamically linked: the Debian package needs the static build "
                           "(scripts/build-static, or INITCRYPT_BIN=...)")
    with _DEB_LOCK:
        key = (str(binary.path), binary.path.stat().st_mtime_ns)
        if key not in _DEBS:
            _DEBS[key] = guestimage.build_deb(binary.path, out.parent / ".deb")
        deb = _DEBS[key]
    return guestimage.ensure_deb_layer(flavour, deb, first_boot)


def guest_os_facts(img: guestimage.GuestImage) -> dict:
    m = img.meta
    p = m["parts"]
    return {"root_partuuid": m["partuuid"]["root"], "boot_partuuid": m["partuuid"]["boot"],
            "bios_partuuid": m["partuuid"]["bios"], "esp_partuuid": m["partuuid"]["esp"],
            "boot_uuid": m["fs_uuid"]["boot"], "root_fs_uuid": m["fs_uuid"]["root"], "kver": m["kver"],
            "flavour": m["flavour"], "tool": m["tool"], "marker_string": m["marker_string"],
            "marker_path": m["marker_path"], "file_sha256": m["files"][m["marker_path"]],
            "random_sha256": m["files"][guestimage.RANDOM_PATH], "files": json.dumps(m["files"], sort_keys=True),
            "header_path": "luks/osluksheader", "key_name": "default", "fs": "ext4", "layer": m["layer"],
            "boot_offset": p["boot"]["offset"], "boot_size": p["boot"]["size"],
            "root_offset": p["root"]["offset"], "root_size": p["root"]["size"]}


def build_guest_disks(scn: Scenario, out: Path, keys: disks.KeyStore, img: guestimage.GuestImage) -> dict:
    facts = {}
    for d in scn.disks:
        path = out / f"{d.name}.img"
        if d.builder == "guest-os":
            if d.params:
                raise HarnessError(f"disk {d.name}: builder guest-os takes no parameter ({sorted(d.params)})")
            guestimage.copy_disk(img, path)
            f = {k: str(v) for k, v in guest_os_facts(img).items()}
            f.update(path=str(path), size=str(path.stat().st_size))
        else:
            f = disks.build_disk(d.builder, path, d.params,
                                 disks.BuildContext(workdir=out / "build" / d.name, keys=keys))
        f["serial"] = d.name[:20]
        f["bus"] = d.bus
        if d.bus == "virtio":
            f["by_id"] = f"/dev/disk/by-id/virtio-{d.name[:20]}"
        else:
            f["hctl"] = f"{d.controller}:0:0:{d.lun}"
        facts[d.name] = f
    shutil.rmtree(out / "build", ignore_errors=True)
    return facts


def _setup_script(new_mounts: list[dict]) -> str:
    """fstab lines of data disks attached for the first time (by UUID, nofail), then mounted."""
    lines = []
    for f in new_mounts:
        mnt = f["fstab_line"].split()[1]
        lines += [f"grep -q '^UUID={f['fs_uuid']} ' /etc/fstab || echo '{f['fstab_line']}' >>/etc/fstab",
                  f"mkdir -p {mnt}"]
    if lines:
        lines.append("systemctl daemon-reload")
        for f in new_mounts:
            mnt = f["fstab_line"].split()[1]
            lines.append(f"mount {mnt} && mark MOUNTED_{f['serial'].upper()} \"$(findmnt -n -o SOURCE {mnt})\"")
    return "\n".join(lines) + ("\n" if lines else "")


def _check_boot(scn: Scenario, b, label: str, raw: str, facts_now: dict, expand_facts: dict, r) -> list[str]:
    transcript = guestboot.strip_ansi(raw.replace("\r", ""))
    where = f"{scn.path} {label}"
    fails = []
    cut = r.killed_at is not None
    if r.timed_out:
        fails.append(f"timeout: QEMU still running after {b.timeout or scn.timeout:.0f} s (killed)")
    elif not cut and r.returncode != 0:
        fails.append(f"QEMU exited with rc {r.returncode}")
    fails += r.hotplug_errors
    if b.expect_done and not cut and facts_now.get("HARNESS_DONE") != "1":
        fails.append("the guest did not finish the boot's script (no @@HARNESS_DONE=1)")
    if not b.allow_emergency and "@@GUEST_EMERGENCY=1" in transcript:
        fails.append("the guest entered emergency mode (@@GUEST_EMERGENCY=1)")
    for chain in b.expect_in_order:
        fails += check._check_chain(transcript, [expand(w, expand_facts, where=where) for w in chain])
    for want in b.expect_present:
        want = expand(want, expand_facts, where=where)
        if want not in transcript:
            fails.append(f"expected somewhere: {want!r} (not found)")
    for bad in check.ALWAYS_ABSENT + scn.expect_absent + b.expect_absent:
        bad = expand(bad, expand_facts, where=where)
        if bad in transcript:
            line = next(l for l in transcript.splitlines() if bad in l)
            fails.append(f"forbidden text present: {bad!r} in line {line.strip()!r}")
    for name, want in b.expect_facts.items():
        want = expand(want, expand_facts, where=where)
        if facts_now.get(name) != want:
            fails.append(f"fact {name}: expected {want!r}, got {facts_now.get(name)!r}")
    for name, unwanted in b.expect_facts_not.items():
        unwanted = expand(unwanted, expand_facts, where=where)
        if facts_now.get(name) == unwanted:
            fails.append(f"fact {name}: must differ from {unwanted!r}")
    lines = check.rendered_lines(raw)
    for with_re, full_re, minimum in b.expect_lines:
        hits = [l for l in lines if with_re.search(l)]
        bad = [l for l in hits if not full_re.search(l)]
        if bad:
            fails.append(f"{len(bad)} of {len(hits)} lines with /{with_re.pattern}/ do not match /{full_re.pattern}/, "
                         f"e.g. {bad[0].strip()!r}")
        if len(hits) < minimum:
            fails.append(f"only {len(hits)} lines with /{with_re.pattern}/ (expected >= {minimum})")
    return [f"{label}: {f}" for f in fails]


def run_guest_scenario(scn: Scenario, binary: Binary, out: Path) -> tuple[list[str], dict]:
    """All boots of a full-OS scenario, then the host disk checks. Returns (failures, result details)."""
    t0 = time.monotonic()
    img = prepare_guest(scn.guest, binary, out)
    t_image = time.monotonic()
    keys = disks.KeyStore(out / "keys")
    facts = build_guest_disks(scn, out, keys, img)
    images = {name: Path(f["path"]) for name, f in facts.items()}
    sha_before = {name: sha256_file(p) for name, p in images.items()}
    for name, sha in sha_before.items():
        facts[name]["image_sha256"] = sha
    os_name = next(d.name for d in scn.disks if d.builder == "guest-os")
    by_name = {d.name: d for d in scn.disks}
    failures, records, mounted = [], [], set()
    t_boots = time.monotonic()
    logs = []
    run_no = 0
    for b in scn.boots:
        repeat = b.power_cut.repeat if b.power_cut else 1
        rng = random.Random(b.power_cut.seed) if b.power_cut else None
        for rep in range(1, repeat + 1):
            run_no += 1
            label = f"boot{b.index}" + (f".{rep}" if repeat > 1 else "")
            work = out / label
            cfg = guestboot.read_boot_config(images[os_name], work)
            host = {"initrd_sha256": cfg.initrd_sha256 or "", "initrd_path": cfg.initrd_path or "",
                    "kernel_path": cfg.kernel_path, "kernel_args": cfg.args, "grub_cfg_sha256": cfg.grub_cfg_sha256,
                    "boot_fs_uuid": cfg.fs_uuid, "menuentry": cfg.title}
            exp_facts = dict(facts, boot=host)
            attached = [by_name[n] for n in (b.disks if b.disks is not None else [d.name for d in scn.disks])]
            new_mounts = [facts[d.name] for d in attached if facts[d.name].get("mount") and d.name not in mounted]
            mounted |= {d.name for d in attached if facts[d.name].get("mount")}
            script = expand(b.script, exp_facts, keys, where=f"{scn.path} {label} script")
            files = {p: expand(t, exp_facts, keys, where=f"{scn.path} {label} files.{p}") for p, t in b.files.items()}
            sdisk = work / "script.img"
            guestboot.script_disk(sdisk, boot=b.index, end=b.end, script=script, setup=_setup_script(new_mounts),
                                  files=files)
            extra = expand(" ".join(x for x in (scn.kernel_args, b.kernel_args) if x), exp_facts,
                           where=f"{scn.path} {label} kernel_args")
            cmdline = guestboot.full_cmdline(cfg.args, extra)
            host["cmdline"] = cmdline
            cold = [d for d in attached if d.hotplug_after is None]
            hot = [(d, images[d.name]) for d in attached if d.hotplug_after is not None]
            cmd = vm.qemu_command(kernel=cfg.kernel, initrd=cfg.initrd, append=cmdline, memory=scn.memory,
                                  smp=scn.smp, disks=cold + [_script_spec()], images=dict(images, hscript=sdisk),
                                  qmp_sock=Path("/QMP"), base="")
            (out / f"{label}.qemu.cmd").write_text(" ".join(cmd) + "\n")
            kill = None
            if b.power_cut:
                delay = round(rng.uniform(b.power_cut.min_delay, b.power_cut.max_delay), 3)
                kill = vm.KillPlan(pattern=b.power_cut.after, delay=delay)
            serial = out / f"{label}.serial.log"
            log(f"{scn.name}: {label}: {cfg.kernel_path} + {cfg.initrd_path} ({len(cold)} disks"
                + (f", power cut {kill.delay:.2f} s after /{kill.pattern.pattern}/" if kill else "") + ")")
            r = _boot_vm(cmd, serial, b.timeout or scn.timeout, hot, kill)
            raw = serial.read_text(errors="replace")
            logs.append((label, raw))
            guest = check.parse_facts(guestboot.strip_ansi(raw.replace("\r", "")))
            host.update(end=guestboot.reboot_kind(raw), vm_seconds=f"{r.wall:.1f}")
            now = dict(guest, **host)
            failures += _check_boot(scn, b, label, raw, now, exp_facts, r)
            if b.power_cut and r.trigger_at is None:
                failures.append(f"{label}: power cut: /{b.power_cut.after.pattern}/ never appeared")
            facts[f"boot{b.index}"] = {k: str(v) for k, v in now.items()}
            records.append({"boot": label, "vm_seconds": round(r.wall, 2), "timed_out": r.timed_out,
                            "qemu_returncode": r.returncode, "trigger_at": r.trigger_at, "killed_at": r.killed_at,
                            "cut_delay": kill.delay if kill else None, "host": host, "guest_facts": guest,
                            "serial_log": serial.name})
    with open(out / "serial.log", "w") as f:
        for label, raw in logs:
            f.write(f"\n===== qemu-harness: {label} =====\n{raw}")
    t_checks = time.monotonic()
    sha_after = {name: sha256_file(p) for name, p in images.items()}
    disk_facts = {}
    for disk, checks in scn.expect_disk.items():
        if "unchanged" in checks:
            same = sha_before[disk] == sha_after[disk]
            if checks["unchanged"] != same:
                failures.append(f"disk {disk}: image " + ("changed" if not same else "expected to change but is "
                                                           "identical"))
        f, found = diskcheck.check_guest_disk(disk, checks, facts, keys, images, out, os_name)
        failures += f
        if found:
            disk_facts[disk] = found
    details = {"image_seconds": round(t_image - t0, 2), "setup_seconds": round(t_boots - t_image, 2),
               "boots_seconds": round(t_checks - t_boots, 2), "check_seconds": round(time.monotonic() - t_checks, 2),
               "boots": records, "host_facts": facts, "disk_facts": disk_facts, "image_sha256_after": sha_after,
               "image": {"layer": img.meta["layer"], "kver": img.meta["kver"]}}
    return failures, details
