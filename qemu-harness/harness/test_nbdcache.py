"""Host tests of the volatile write cache (no QEMU): cd qemu-harness && python3 -m unittest harness.test_nbdcache"""

import os
import random
import socket
import struct
import tempfile
import unittest
from pathlib import Path

from . import nbdcache

SIZE = 64 << 10


class CacheTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.image = Path(self.dir.name) / "disk.img"
        self.image.write_bytes(os.urandom(SIZE))

    def tearDown(self):
        self.dir.cleanup()

    def test_reads_see_cached_writes_and_only_a_flush_reaches_the_image(self):
        before = self.image.read_bytes()
        c = nbdcache.VolatileCache(self.image, 512)
        c.write(1024, b"a" * 2048)
        c.write(2048, b"b" * 512)
        want = bytearray(before)
        want[1024:3072] = b"a" * 2048
        want[2048:2560] = b"b" * 512
        self.assertEqual(c.read(0, SIZE), want)
        self.assertEqual(self.image.read_bytes(), before)
        c.flush()
        self.assertEqual(self.image.read_bytes(), want)
        c.close()

    def test_a_crash_leaves_each_block_as_one_of_its_versions(self):
        """Random writes and flushes, then a crash: every block of the image must be its last flushed content
        with some prefix of the later writes touching it applied, and over many seeds both kept and lost blocks
        and torn writes must occur (else the cut would lose nothing or everything)."""
        seen = {"kept": 0, "lost": 0, "torn": 0, "older": 0}
        for seed in range(60):
            rnd = random.Random(seed)
            bs = rnd.choice([512, 4096])
            self.image.write_bytes(os.urandom(SIZE))
            durable = bytearray(self.image.read_bytes())
            current = bytearray(durable)
            since_flush = []
            c = nbdcache.VolatileCache(self.image, bs)
            for _ in range(rnd.randint(1, 40)):
                if rnd.random() < 0.1:
                    c.flush()
                    durable, since_flush = bytearray(current), []
                    continue
                off = rnd.randrange(SIZE // 512) * 512
                data = os.urandom(min(rnd.randint(1, 24) * 512, SIZE - off))
                c.write(off, data)
                current[off:off + len(data)] = data
                since_flush.append((off, data))
                self.assertEqual(c.read(0, SIZE), current)
            st = c.crash(random.Random(seed))
            c.close()
            after = self.image.read_bytes()
            for blk in range(SIZE // bs):
                lo, hi = blk * bs, (blk + 1) * bs
                versions, v = [bytes(durable[lo:hi])], bytearray(durable[lo:hi])
                for off, data in since_flush:
                    a, b = max(off, lo), min(off + len(data), hi)
                    if a < b:
                        v[a - lo:b - lo] = data[a - off:b - off]
                        versions.append(bytes(v))
                self.assertIn(after[lo:hi], versions, f"seed {seed} block {blk}")
            self.assertEqual(st["kept_blocks"] + st["dropped_blocks"], st["pending_blocks"])
            for k, field in (("kept", "kept_blocks"), ("lost", "dropped_blocks"), ("torn", "writes_torn"),
                             ("older", "older_version_blocks")):
                seen[k] += st[field]
        self.assertTrue(all(seen.values()), seen)


class ProtocolTest(unittest.TestCase):
    """A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies) against the server, as QEMU talks to it."""

    def test_write_flush_read_over_the_socket_then_crash_loses_the_unflushed_write(self):
        with tempfile.TemporaryDirectory() as d:
            image = Path(d) / "disk.img"
            image.write_bytes(bytes(SIZE))
            server = nbdcache.NbdServer(image, Path(d) / "s.sock", block=4096)
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(Path(d) / "s.sock"))
            magic, opt, hflags = struct.unpack(">QQH", nbdcache.recv_exact(s, 18))
            self.assertEqual((magic, opt), (nbdcache.NBDMAGIC, nbdcache.IHAVEOPT))
            s.sendall(struct.pack(">I", nbdcache.FLAG_FIXED_NEWSTYLE | nbdcache.FLAG_NO_ZEROES))
            s.sendall(struct.pack(">QII", nbdcache.IHAVEOPT, 8, 0))   # structured replies: refused
            self.assertEqual(struct.unpack(">QIII", nbdcache.recv_exact(s, 20))[2], nbdcache.REP_ERR_UNSUP)
            go = struct.pack(">I", 0) + struct.pack(">HH", 1, nbdcache.INFO_BLOCK_SIZE)
            s.sendall(struct.pack(">QII", nbdcache.IHAVEOPT, nbdcache.OPT_GO, len(go)) + go)
            infos = {}
            while True:
                _, _, rep, n = struct.unpack(">QIII", nbdcache.recv_exact(s, 20))
                body = nbdcache.recv_exact(s, n)
                if rep == nbdcache.REP_ACK:
                    break
                infos[struct.unpack_from(">H", body)[0]] = body
            size, tflags = struct.unpack_from(">QH", infos[nbdcache.INFO_EXPORT], 2)
            self.assertEqual(size, SIZE)
            self.assertTrue(tflags & nbdcache.TFLAG_SEND_FLUSH)
            self.assertEqual(struct.unpack_from(">III", infos[nbdcache.INFO_BLOCK_SIZE], 2)[1], 4096)

            def request(cmd, off=0, data=b"", length=None):
                n = len(data) if length is None else length
                s.sendall(struct.pack(">IHHQQI", nbdcache.REQUEST_MAGIC, 0, cmd, 7, off, n) + data)
                magic, err, handle = struct.unpack(">IIQ", nbdcache.recv_exact(s, 16))
                self.assertEqual((magic, err, handle), (nbdcache.SIMPLE_REPLY_MAGIC, 0, 7))
                return nbdcache.recv_exact(s, n) if cmd == nbdcache.CMD_READ else None

            request(nbdcache.CMD_WRITE, 0, b"x" * 8192)
            request(nbdcache.CMD_FLUSH)
            request(nbdcache.CMD_WRITE, 8192, b"y" * 8192)
            self.assertEqual(request(nbdcache.CMD_READ, 4096, length=8192), b"x" * 4096 + b"y" * 4096)
            s.close()
            # a seed whose cut keeps blocks with a probability under 5 % (the draw is deterministic per seed)
            seed = next(i for i in range(1000) if random.Random(i).random() < 0.05)
            stats = server.stop(random.Random(seed))
            img = image.read_bytes()
            self.assertEqual(img[:8192], b"x" * 8192)   # flushed: survives
            self.assertNotEqual(img[8192:16384], b"y" * 8192, stats.crash)   # unflushed: some block lost
            self.assertEqual((stats.writes, stats.flushes, stats.end), (2, 1, "crash"))
            self.assertIsNone(server.error)


if __name__ == "__main__":
    unittest.main()
