"""A disk with a volatile write cache, for power cuts that can lose what was never flushed.

QEMU's raw-file drives keep every write QEMU issued in the host page cache, and a SIGKILL of QEMU
loses none of them: a power cut over them can never catch a missing flush. Here a disk image is
served to QEMU over NBD (fixed newstyle handshake, unix socket, one thread per disk and boot) by a
server that behaves like a disk with a write-back cache:

- a WRITE is acknowledged once it is in memory (`pending`, in arrival order); reads see it;
- NBD_CMD_FLUSH (what the guest's REQ_PREFLUSH becomes: virtio-blk FLUSH → QEMU → NBD) writes every
  pending write into the image file, in order, and only then acknowledges;
- at a power cut the harness kills QEMU, then calls `crash()`: for each physical block (the disk's
  physical block size, 512 by default: the unit a real disk writes atomically) touched by pending
  writes, a seeded draw decides whether it reached the medium and, if it was written several times
  since the flush, which of its versions did. So writes are torn at block boundaries, reordered,
  partly or wholly lost; the rest of the pending data is gone. A block never reverts to something
  older than its last flushed content, nor shows bytes no write ever carried;
- a clean QEMU exit (NBD_CMD_DISC or the end of a boot that was not cut) writes everything back.

FUA is not advertised: virtio-blk and QEMU's scsi-hd (without `dpofua`) give the guest no FUA, so the
guest kernel emulates it with a flush, and QEMU itself turns a FUA write into write + flush for a
server without FUA. TRIM and WRITE_ZEROES are not advertised either (QEMU writes zeroes instead;
its raw drives ignore discards too). Not modelled: a disk that acknowledges a flush it did not do, a
block torn inside itself, a read error after the cut, or write-back ordering a real disk might
favour (the draw is uniform).

Python stdlib only. The cache is a list of (offset, bytes) extents with a 1 MiB bucket index for
reads; it is split into blocks only at crash time, so the hot path is a memcpy per request.
"""

import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Handshake (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 0x80000001
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
# Transmission
TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH = 1, 2, 4
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
EPERM, EIO, EINVAL = 1, 5, 22
MAX_PAYLOAD = 32 << 20   # QEMU's NBD_MAX_BUFFER_SIZE

BUCKET_SHIFT = 20        # read index: 1 MiB buckets
# Beyond this many unflushed bytes the oldest writes are written back, as a full disk cache would:
# bounds host memory; far above what the guest can write between two flushes of a correct pass.
CACHE_LIMIT = 1 << 30


@dataclass
class CacheStats:
    """What one disk saw during one boot, and at its end."""
    writes: int = 0
    write_bytes: int = 0
    reads: int = 0
    flushes: int = 0
    destaged_writes: int = 0     # written back early because the cache was full (CACHE_LIMIT)
    server_cpu_seconds: float = 0.0   # CPU time of the serving thread: what the cache costs the host
    end: str = "running"         # clean (everything written back) | crash
    crash: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "crash"}
        if self.crash:
            d["crash"] = self.crash
        return d


class VolatileCache:
    """The write-back cache in front of one image file. Not thread-safe: one serving thread owns it
    while QEMU runs; crash()/write_back() run after that thread has ended."""

    def __init__(self, image: Path, block: int = 512):
        self.fd = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.block = block
        self.pending: list[tuple[int, bytes]] = []
        self.pending_bytes = 0
        self.index: dict[int, list[int]] = {}
        self.stats = CacheStats()

    def close(self) -> None:
        os.close(self.fd)

    def write(self, offset: int, data) -> None:
        i = len(self.pending)
        self.pending.append((offset, data))
        self.pending_bytes += len(data)
        for b in range(offset >> BUCKET_SHIFT, ((offset + len(data) - 1) >> BUCKET_SHIFT) + 1):
            self.index.setdefault(b, []).append(i)
        self.stats.writes += 1
        self.stats.write_bytes += len(data)
        if self.pending_bytes > CACHE_LIMIT:
            self._destage(len(self.pending) // 2 or 1)

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        os.preadv(self.fd, [buf], offset)
        self.stats.reads += 1
        if not self.pending:
            return buf
        end = offset + length
        hits = set()
        for b in range(offset >> BUCKET_SHIFT, ((end - 1) >> BUCKET_SHIFT) + 1):
            hits.update(self.index.get(b, ()))
        view = memoryview(buf)
        for i in sorted(hits):   # arrival order: a newer write wins
            o, d = self.pending[i]
            lo, hi = max(o, offset), min(o + len(d), end)
            if lo < hi:
                view[lo - offset:hi - offset] = memoryview(d)[lo - o:hi - o]
        return buf

    def flush(self) -> None:
        self.stats.flushes += 1
        self._destage(len(self.pending))

    def write_back(self) -> None:
        """The disk stays powered after a clean QEMU exit: everything still cached reaches the image."""
        self._destage(len(self.pending))
        self.stats.end = "clean"

    def _destage(self, n: int) -> None:
        for o, d in self.pending[:n]:
            os.pwrite(self.fd, d, o)
        if n < len(self.pending):
            self.stats.destaged_writes += n
        self.pending = self.pending[n:]
        self.pending_bytes = sum(len(d) for _, d in self.pending)
        self.index = {}
        for i, (o, d) in enumerate(self.pending):
            for b in range(o >> BUCKET_SHIFT, ((o + len(d) - 1) >> BUCKET_SHIFT) + 1):
                self.index.setdefault(b, []).append(i)

    def crash(self, rng: random.Random) -> dict:
        """Power lost: per block, a seeded draw says whether the medium got it and which of its cached
        versions. `keep` (itself drawn per crash) is the chance that a block reached the medium, so
        some cuts lose almost everything, some almost nothing, most a mix."""
        bs = self.block
        history: dict[int, list[int]] = {}   # block -> pending writes touching it, oldest first
        for i, (o, d) in enumerate(self.pending):
            for blk in range(o // bs, (o + len(d) - 1) // bs + 1):
                history.setdefault(blk, []).append(i)
        keep = rng.random()
        kept_blocks = stale_blocks = 0
        kept_of_write = [0] * len(self.pending)
        blocks_of_write = [0] * len(self.pending)
        out: dict[int, bytes] = {}
        for blk in sorted(history):
            writes = history[blk]
            for i in writes:
                blocks_of_write[i] += 1
            if rng.random() >= keep:
                continue
            k = rng.randint(1, len(writes))   # the medium holds the block as it was after k writes
            kept_blocks += 1
            stale_blocks += k < len(writes)
            for i in writes[:k]:
                kept_of_write[i] += 1
            out[blk] = self._block_after(blk, [self.pending[i] for i in writes[:k]])
        self._write_runs(out)
        n = len(self.pending)
        self.stats.crash = {
            "block": bs, "keep_probability": round(keep, 3),
            "pending_writes": n, "pending_bytes": self.pending_bytes, "pending_blocks": len(history),
            "kept_blocks": kept_blocks, "dropped_blocks": len(history) - kept_blocks,
            "older_version_blocks": stale_blocks,
            "writes_kept": sum(1 for i in range(n) if kept_of_write[i] == blocks_of_write[i]),
            "writes_lost": sum(1 for i in range(n) if kept_of_write[i] == 0),
            "writes_torn": sum(1 for i in range(n) if 0 < kept_of_write[i] < blocks_of_write[i]),
        }
        self.pending, self.pending_bytes, self.index = [], 0, {}
        self.stats.end = "crash"
        return self.stats.crash

    def _block_after(self, blk: int, writes: list[tuple[int, bytes]]) -> bytes:
        bs = self.block
        start, end = blk * bs, min((blk + 1) * bs, self.size)
        o, d = writes[-1]
        if len(writes) == 1 and o <= start and o + len(d) >= end:   # the common case: one whole block
            return bytes(memoryview(d)[start - o:end - o])
        buf = bytearray(os.pread(self.fd, end - start, start))
        for o, d in writes:
            lo, hi = max(o, start), min(o + len(d), end)
            if lo < hi:
                buf[lo - start:hi - start] = memoryview(d)[lo - o:hi - o]
        return bytes(buf)

    def _write_runs(self, out: dict[int, bytes]) -> None:
        run_start, run = None, []
        for blk in sorted(out) + [None]:
            if run and (blk is None or blk != run_start + len(run)):
                os.pwrite(self.fd, b"".join(run), run_start * self.block)
                run = []
            if blk is not None:
                if not run:
                    run_start = blk
                run.append(out[blk])


class NbdServer:
    """Serves one image over a unix socket to QEMU's NBD client, through a VolatileCache."""

    def __init__(self, image: Path, sock_path: Path, *, block: int = 512, readonly: bool = False,
                 flush_held: threading.Event | None = None):
        self.cache = VolatileCache(image, block)
        # armed by VolatileDisks.wait_for_cut: the next FLUSH that finds unflushed writes is not served but held
        # until the cut, and flush_held is set (the cache is then as full as it gets between two flushes)
        self.hold_flush = False
        self.flush_held = flush_held or threading.Event()
        self.readonly = readonly
        self.sock_path = sock_path
        self.error: str | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(sock_path))
        self.listener.listen(1)
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, name=f"nbd-{sock_path.name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.conn = conn
            cpu = time.thread_time()
            try:
                if self._handshake(conn):
                    self._transmission(conn)
            except (ConnectionError, EOFError):   # QEMU ended or was killed (the cut)
                pass
            except (OSError, ProtocolError, struct.error) as e:
                self.error = str(e)
            finally:
                conn.close()
                self.conn = None
                self.cache.stats.server_cpu_seconds += round(time.thread_time() - cpu, 3)

    def stop(self, crash_rng: random.Random | None = None) -> CacheStats:
        """After QEMU has ended: crash (a power cut: QEMU was killed) or write everything back."""
        self.stopping.set()
        self.thread.join(10)
        if self.thread.is_alive() and self.conn:   # QEMU is gone, so this is not expected
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.thread.join(10)
        self.listener.close()
        if crash_rng is not None:
            self.cache.crash(crash_rng)
        else:
            self.cache.write_back()
        self.cache.close()
        return self.cache.stats

    # --- handshake -----------------------------------------------------------------------------
    def _tflags(self) -> int:
        return TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | (TFLAG_READ_ONLY if self.readonly else 0)

    def _handshake(self, conn) -> bool:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", recv_exact(conn, 4))
        if not client_flags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError(f"client flags {client_flags:#x}: fixed newstyle only")
        while True:
            magic, opt, length = struct.unpack(">QII", recv_exact(conn, 16))
            if magic != IHAVEOPT or length > 1 << 16:
                raise ProtocolError(f"bad option header (magic {magic:#x}, length {length})")
            data = recv_exact(conn, length)
            if opt == OPT_EXPORT_NAME:
                zeroes = b"" if client_flags & FLAG_NO_ZEROES else bytes(124)
                conn.sendall(struct.pack(">QH", self.cache.size, self._tflags()) + zeroes)
                return True
            if opt == OPT_ABORT:
                self._reply(conn, opt, REP_ACK)
                return False
            if opt in (OPT_INFO, OPT_GO):
                (name_len,) = struct.unpack_from(">I", data)
                (n_req,) = struct.unpack_from(">H", data, 4 + name_len)
                wanted = struct.unpack_from(f">{n_req}H", data, 6 + name_len)
                self._reply(conn, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.cache.size, self._tflags()))
                if INFO_BLOCK_SIZE in wanted:   # minimum 512 (logical), preferred = the atomic block
                    self._reply(conn, opt, REP_INFO,
                                struct.pack(">HIII", INFO_BLOCK_SIZE, 512, self.cache.block, MAX_PAYLOAD))
                self._reply(conn, opt, REP_ACK)
                if opt == OPT_GO:
                    return True
                continue
            self._reply(conn, opt, REP_ERR_UNSUP)   # structured replies, meta contexts, lists, TLS

    @staticmethod
    def _reply(conn, opt: int, rep: int, data: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rep, len(data)) + data)

    # --- transmission --------------------------------------------------------------------------
    def _transmission(self, conn) -> None:
        cache = self.cache
        while True:
            magic, _flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", recv_exact(conn, 28))
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            bad = offset + length > cache.size or length > MAX_PAYLOAD
            if cmd == CMD_WRITE:
                data = recv_exact(conn, length)
                err = EPERM if self.readonly else EINVAL if bad else 0
                if not err:
                    cache.write(offset, data)
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, handle))
            elif cmd == CMD_READ:
                if bad:
                    conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, handle))
                else:
                    send_all(conn, struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle), cache.read(offset, length))
            elif cmd == CMD_FLUSH:
                if self.hold_flush and cache.pending:
                    self.flush_held.set()
                    self.stopping.wait()   # the cut comes, then stop(): this flush never happened
                    raise EOFError("power cut during a flush")
                cache.flush()
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
            elif cmd == CMD_DISC:
                cache.write_back()
                return
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, handle))


class ProtocolError(Exception):
    pass


def send_all(conn, header: bytes, data) -> None:
    """sendmsg without the copy of header + data; it may send less than asked, so finish with sendall."""
    sent = conn.sendmsg([header, data])
    if sent < len(header):
        conn.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(data):
        conn.sendall(memoryview(data)[sent - len(header):])


def recv_exact(conn, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = conn.recv_into(view[got:])
        if r == 0:
            raise EOFError("connection closed")
        got += r
    return buf


CUT_MODES = ("flush", "dirty", "delay")   # cut N of a scenario uses CUT_MODES[(N - 1) % 3]
# How long after unflushed writes appear a "dirty" cut comes at most (seeded, uniform). A chunk of the pass
# stays unflushed for ~1-40 ms under TCG (measured); some cuts land after its flush, most inside.
DIRTY_JITTER = 0.03


class VolatileDisks:
    """The NBD servers of one boot: one per disk with cache = "volatile", sockets in `sock_dir`."""

    def __init__(self, disks, images: dict, sock_dir: Path):
        self.servers: dict[str, NbdServer] = {}
        self.flush_held = threading.Event()
        try:
            for d in disks:
                if d.cache == "volatile":
                    self.servers[d.name] = NbdServer(images[d.name], socket_path(sock_dir, d.name),
                                                     block=d.physical_block_size or 512, readonly=d.readonly,
                                                     flush_held=self.flush_held)
        except BaseException:
            self.stop(None)
            raise

    def wait_for_cut(self, mode: str, rng: random.Random, max_wait: float) -> str:
        """Called when a cut is due, in a CUT_MODES mode. A cut can only lose something while a cache holds
        unflushed writes, and a correct guest keeps them there for milliseconds between its flushes, so:
        flush: wait (at most max_wait s) for a FLUSH that finds unflushed writes and cut while holding it:
            everything since the previous flush is pending (a whole chunk of the pass, a journal record);
        dirty: cut a seeded 0-DIRTY_JITTER s after unflushed writes appear (often a chunk half-written,
            sometimes just flushed);
        delay: cut at once (any instant: boot, reads, recovery, as with the host cache)."""
        t0 = time.monotonic()
        if mode == "delay":
            return "cut at the delay"
        if mode == "flush":
            for s in self.servers.values():
                s.hold_flush = True
            if self.flush_held.wait(max_wait):
                return f"cut during a flush, {time.monotonic() - t0:.2f} s after it was due"
            return f"no flush with unflushed writes within {max_wait:g} s: cut anyway"
        jitter = rng.uniform(0, DIRTY_JITTER)
        while time.monotonic() - t0 < max_wait:
            if any(s.cache.pending for s in self.servers.values()):
                time.sleep(jitter)
                return f"cut {jitter * 1000:.0f} ms after unflushed writes, {time.monotonic() - t0:.2f} s after it was due"
            time.sleep(0.001)
        return f"no unflushed writes within {max_wait:g} s: cut anyway"

    def stop(self, crash_seed: str | None) -> dict:
        """{disk: stats}; with crash_seed (QEMU was killed) each cache loses its unflushed writes as drawn
        by random.Random(f"{crash_seed}:{disk}")."""
        out = {}
        for name, server in self.servers.items():
            rng = random.Random(f"{crash_seed}:{name}") if crash_seed is not None else None
            stats = server.stop(rng).as_dict()
            if server.error:
                stats["error"] = server.error
            out[name] = stats
        self.servers = {}
        return out


def socket_path(sock_dir: Path, disk: str) -> Path:
    return Path(sock_dir) / f"nbd-{disk}.sock"


def summary(stats: dict) -> str:
    """One line for power_cut.txt."""
    s = f"{stats['writes']} writes, {stats['flushes']} flushes"
    c = stats.get("crash")
    if c:
        s += (f"; cut with {c['pending_writes']} unflushed writes ({c['pending_bytes'] / 2**20:.1f} MiB, "
              f"{c['pending_blocks']} blocks of {c['block']}): {c['kept_blocks']} blocks kept "
              f"({c['older_version_blocks']} as an older version), {c['dropped_blocks']} lost; writes "
              f"{c['writes_kept']} kept, {c['writes_torn']} torn, {c['writes_lost']} lost")
    elif stats["end"] == "clean":
        s += "; clean exit, all written back"
    return s + (f"; SERVER ERROR {stats['error']}" if stats.get("error") else "")
