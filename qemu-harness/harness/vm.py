"""Running one QEMU/TCG guest: command line, serial transcript, QMP hot-plug, timeout.

QEMU exits 0 even when the guest failed: the caller decides from the transcript and the disk images.
"""

import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .scenario import DiskSpec
from .util import HarnessError

BASE_CMDLINE = "console=ttyS0 panic=-1 rd.shell=0 rd.emergency=poweroff loglevel=4"


@dataclass
class KillPlan:
    """Power cut: SIGKILL QEMU `delay` seconds after the first serial line matching `pattern`."""
    pattern: re.Pattern
    delay: float


@dataclass
class VmResult:
    timed_out: bool
    returncode: int | None
    wall: float
    hotplug_errors: list[str]
    trigger_at: float | None = None   # seconds after QEMU started when KillPlan.pattern matched
    trigger_line: str | None = None
    killed_at: float | None = None    # when the SIGKILL was sent (None: QEMU ended by itself first)


def drive_args(disk: DiskSpec, image: Path) -> tuple[list[str], list[str]]:
    """(-blockdev args, -device args) for a cold-plugged disk."""
    node = f"d-{disk.name}"
    ro = "on" if disk.readonly else "off"
    blockdev = ["-blockdev", f"driver=raw,node-name={node},read-only={ro},"
                f"file.driver=file,file.filename={image},file.aio=threads,cache.direct=off,cache.no-flush=on"]
    return blockdev, ["-device", device_arg(disk, node)]


def device_opts(disk: DiskSpec, node: str) -> tuple[str, dict]:
    """(driver, properties) of the guest-visible device; serial = the disk's name (virtio-blk: max 20 chars)."""
    props = {"drive": node, "id": f"dev-{disk.name}", "serial": (disk.serial or disk.name)[:20]}
    if disk.physical_block_size:
        props.update(physical_block_size=disk.physical_block_size, logical_block_size=disk.logical_block_size)
    if disk.bus == "virtio":
        return "virtio-blk-pci", props
    props.update({"bus": f"scsi{disk.controller}.0", "channel": 0, "scsi-id": 0, "lun": disk.lun})
    return "scsi-hd", props


def device_arg(disk: DiskSpec, node: str) -> str:
    driver, props = device_opts(disk, node)
    return ",".join([driver] + [f"{k}={v}" for k, v in props.items()])


def qemu_command(*, kernel: Path, initrd: Path | None, append: str, memory: int, smp: int, disks: list[DiskSpec],
                 images: dict, qmp_sock: Path, base: str = BASE_CMDLINE) -> list[str]:
    """base: the harness's own arguments before `append` (full-OS boots pass "": their command line is the
    guest's own, completed by guestboot.full_cmdline)."""
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", str(smp), "-m", str(memory),
           "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
           "-qmp", f"unix:{qmp_sock},server=on,wait=off",
           "-kernel", str(kernel), "-append", f"{base} {append}".strip()]
    if initrd is not None:
        cmd += ["-initrd", str(initrd)]
    for ctrl in sorted({d.controller for d in disks if d.bus == "scsi"}):
        cmd += ["-device", f"virtio-scsi-pci,id=scsi{ctrl}"]
    for d in disks:
        if d.hotplug_after is None:
            bd, dev = drive_args(d, images[d.name])
            cmd += bd + dev
    return cmd


class Qmp:
    """Minimal QMP client: greeting, qmp_capabilities, execute() returning 'return' or raising on 'error'."""

    def __init__(self, path: Path, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise HarnessError(f"QMP socket {path} did not come up")
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.buf = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HarnessError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise HarnessError(f"QMP {command}: {reply['error'].get('desc')}")
            # asynchronous events ("event": ...) are skipped

    def close(self):
        self.sock.close()


def hotplug(qmp: Qmp, disk: DiskSpec, image: Path) -> None:
    node = f"d-{disk.name}"
    qmp.execute("blockdev-add", **{"driver": "raw", "node-name": node, "read-only": disk.readonly,
                                   "file": {"driver": "file", "filename": str(image), "aio": "threads"},
                                   "cache": {"direct": False, "no-flush": True}})
    driver, props = device_opts(disk, node)
    qmp.execute("device_add", driver=driver, **props)


def run_vm(cmd: list[str], *, serial_log: Path, timeout: float, hotplugs: list[tuple[DiskSpec, Path]],
           qmp_sock: Path, kill: KillPlan | None = None) -> VmResult:
    """Run QEMU, copy its serial console to serial_log (plus host timestamps to serial_log.with .times),
    hot-plug disks at their times, kill it after timeout. With a KillPlan: SIGKILL (a power cut: writes QEMU
    already issued to the raw image files survive, the guest's caches and in-flight requests do not)
    kill.delay seconds after the first line matching kill.pattern."""
    if shutil.which(cmd[0]) is None:
        raise HarnessError(f"{cmd[0]} not found")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    times_path = serial_log.with_name(serial_log.stem + ".times")
    state: dict = {"trigger_at": None, "trigger_line": None, "killed_at": None}
    timers: list[threading.Timer] = []

    def power_cut():
        if proc.poll() is None:
            state["killed_at"] = time.monotonic() - t0
            _note(times_path, t0, "HOST power cut: SIGKILL of QEMU")
            proc.kill()

    def on_line(text: str, t: float):
        if kill and state["trigger_at"] is None and kill.pattern.search(text):
            state.update(trigger_at=t, trigger_line=text.strip().replace("\r", " ")[-300:])
            timer = threading.Timer(kill.delay, power_cut)
            timers.append(timer)
            timer.start()

    reader = threading.Thread(target=_copy_serial, args=(proc.stdout, serial_log, times_path, t0, on_line),
                              daemon=True)
    reader.start()
    errors: list[str] = []
    qmp = None
    try:
        for disk, image in sorted(hotplugs, key=lambda h: h[0].hotplug_after):
            wait = t0 + disk.hotplug_after - time.monotonic()
            if wait > 0 and _wait(proc, wait):
                errors.append(f"guest ended before hot-plug of {disk.name}")
                break
            try:
                qmp = qmp or Qmp(qmp_sock)
                hotplug(qmp, disk, image)
                _note(times_path, t0, f"HOST hot-plugged {disk.name}")
            except (HarnessError, OSError) as e:
                errors.append(f"hot-plug of {disk.name}: {e}")
        timed_out = _wait(proc, t0 + timeout - time.monotonic()) is False
        if timed_out:
            proc.kill()
            proc.wait()
    finally:
        if qmp:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        for timer in timers:
            timer.cancel()
    return VmResult(timed_out=timed_out, returncode=proc.returncode, wall=time.monotonic() - t0,
                    hotplug_errors=errors, **state)


def _wait(proc, seconds: float) -> bool:
    """Wait up to seconds; True if the process ended."""
    try:
        proc.wait(timeout=max(seconds, 0))
        return True
    except subprocess.TimeoutExpired:
        return False


def _copy_serial(stream, serial_log: Path, times_path: Path, t0: float, on_line=None) -> None:
    with open(serial_log, "wb") as log, open(times_path, "a") as times:
        for line in iter(stream.readline, b""):
            t = time.monotonic() - t0
            log.write(line)
            log.flush()
            text = line.decode(errors="replace")
            times.write(f"{t:8.3f} {text.rstrip()}\n")
            times.flush()
            if on_line:
                on_line(text, t)


def _note(times_path: Path, t0: float, text: str) -> None:
    with open(times_path, "a") as f:
        f.write(f"{time.monotonic() - t0:8.3f} {text}\n")


def make_qmp_path() -> Path:
    """UNIX socket paths are limited to 108 bytes: keep QMP's in a short temporary folder."""
    return Path(tempfile.mkdtemp(prefix="ich-")) / "qmp.sock"
