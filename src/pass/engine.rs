//! The pipelined pass: read → hash + transform on all cores → journal record → write → flush.
//!
//! # Invariant
//! Let record R = (offset, len, hashes) be the newest durable journal record. Then every byte
//! before `offset` holds the target form (ciphertext when encrypting), every byte from
//! `offset + len` on holds the source form, and each sector in `[offset, offset + len)` is wholly
//! source or wholly target. It holds because
//! 1. the record for a chunk is durable (written, fdatasync'd) before any byte of that chunk is
//!    written, and it hashes every source sector of the chunk;
//! 2. records live in a ring of `SLOTS` slots and the device is flushed before a slot is reused
//!    (record n is written only once chunk n−SLOTS is durable), so every chunk that may be in flight
//!    still has its record in the ring; a torn record write only destroys the record of a chunk that
//!    was already durable;
//! 3. sectors are never larger than the device's physical block size, so a sector write is atomic.
//!
//! # Recovery
//! For each record of W, oldest first, and each sector of its chunk: if its hash equals the recorded
//! source hash it is still source and is transformed; else if the *inverse* transform of it hashes to
//! the recorded value it is already target; else the device changed under the pass and we stop
//! without writing (exit 7). Chunks are classified before anything is rewritten, rewritten whole
//! (rewriting target sectors with the same bytes is harmless) and flushed; the pass continues after
//! the newest record's chunk with the next seq. No record is written during recovery, so a crash
//! during recovery is recovered the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_128;

use super::device::{AlignedBuf, Device};
use super::journal::{Direction, Journal, Record, HASH_LEN, SLOTS};
use super::xts::Xts;
use super::Error;

/// Chunks in flight at once: one being read, one being transformed, one being written.
pub const BUFFERS: usize = 3;

pub struct Engine<'a> {
    pub dev: &'a dyn Device,
    pub journal: &'a Journal,
    pub xts: &'a Xts,
    pub stop: Arc<AtomicBool>,
    pub progress: &'a mut dyn FnMut(u64, u64),
}

type Hash = [u8; HASH_LEN];
/// A transformed chunk on its way to the writer: offset, length, buffer, source-sector hashes.
type Crypted = Result<(u64, u64, AlignedBuf, Vec<Hash>), Error>;

fn hash(sector: &[u8]) -> Hash {
    xxh3_128(sector).to_le_bytes()
}

fn forward(dir: Direction) -> bool {
    dir == Direction::Encrypt
}

/// Hash each source sector, then transform it in place, splitting the chunk across all cores.
fn hash_and_transform(xts: &Xts, buf: &mut [u8], offset: u64, encrypt: bool) -> Vec<Hash> {
    let ss = xts.sector_size();
    let sectors = buf.len() / ss;
    let mut hashes = vec![[0u8; HASH_LEN]; sectors];
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let per = sectors.div_ceil(cores).max(1);
    std::thread::scope(|s| {
        for (i, (data, hs)) in buf
            .chunks_mut(per * ss)
            .zip(hashes.chunks_mut(per))
            .enumerate()
        {
            s.spawn(move || {
                for (sector, h) in data.chunks_exact(ss).zip(hs.iter_mut()) {
                    *h = hash(sector);
                }
                xts.run(data, offset + (i * per * ss) as u64, encrypt);
            });
        }
    });
    hashes
}

impl Engine<'_> {
    /// Bring every chunk of the journal's window to target form (see Recovery above), then flush.
    pub fn recover(&mut self, window: &[Record]) -> Result<(), Error> {
        let mut fixed = Vec::with_capacity(window.len());
        for rec in window {
            fixed.push(self.classify(rec)?);
        }
        for (rec, buf) in window.iter().zip(fixed) {
            if let Some(buf) = buf {
                let data = buf.slice(rec.len as usize);
                self.dev.write_at(data, rec.offset).map_err(|e| Error::Io {
                    what: "rewriting an in-flight chunk",
                    source: e,
                })?;
            }
        }
        self.dev.sync().map_err(|e| Error::Io {
            what: "flushing the device",
            source: e,
        })
    }

    /// Read a record's chunk and turn its source sectors into target form in memory; `None` when
    /// every sector is already target (nothing to rewrite).
    fn classify(&mut self, rec: &Record) -> Result<Option<AlignedBuf>, Error> {
        let ss = self.xts.sector_size();
        let enc = forward(self.journal.sb.direction);
        if rec.len == 0 {
            return Ok(None);
        }
        if rec.len % ss as u64 != 0 || rec.hashes.len() as u64 != rec.len / ss as u64 {
            return Err(Error::JournalCorrupt {
                detail: "record length and hash count disagree".into(),
                path: self.journal.path.display().to_string(),
            });
        }
        let mut buf = AlignedBuf::new(rec.len as usize);
        let data = buf.slice_mut(rec.len as usize);
        self.dev.read_at(data, rec.offset).map_err(|e| Error::Io {
            what: "reading the in-flight chunk",
            source: e,
        })?;
        let mut tweaks = Vec::with_capacity(ss);
        let (mut src, mut done) = (0usize, 0usize);
        for (i, sector) in data.chunks_exact_mut(ss).enumerate() {
            if hash(sector) == rec.hashes[i] {
                self.xts.sector(
                    sector,
                    Xts::iv_of(rec.offset + (i * ss) as u64),
                    enc,
                    &mut tweaks,
                );
                src += 1;
                continue;
            }
            let mut probe = sector.to_vec();
            self.xts.sector(
                &mut probe,
                Xts::iv_of(rec.offset + (i * ss) as u64),
                !enc,
                &mut tweaks,
            );
            if hash(&probe) != rec.hashes[i] {
                return Err(Error::Inconsistent {
                    offset: rec.offset + (i * ss) as u64,
                });
            }
            done += 1;
        }
        if src > 0 {
            log::info!(
                "in-flight chunk at byte {}: {src} sectors still to do, {done} already done",
                rec.offset
            );
        }
        Ok((src > 0).then_some(buf))
    }

    /// Run the pass from `start` to the end of the device; `seq` is the next record number.
    pub fn run(&mut self, start: u64, seq: u64) -> Result<u64, Error> {
        let total = self.journal.sb.device_size;
        let chunk = self.journal.sb.chunk_size as usize;
        let enc = forward(self.journal.sb.direction);
        let (pool_tx, pool_rx) = sync_channel::<AlignedBuf>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = pool_tx.send(AlignedBuf::new(chunk));
        }
        let (read_tx, read_rx) = sync_channel::<Result<(u64, u64, AlignedBuf), Error>>(1);
        let (crypt_tx, crypt_rx) =
            sync_channel::<Result<(u64, u64, AlignedBuf, Vec<Hash>), Error>>(1);
        let offsets: Vec<u64> = (start..total).step_by(chunk).collect();
        let xts = self.xts;
        let dev = self.dev;
        let stop = self.stop.clone();
        std::thread::scope(|s| {
            s.spawn(move || reader(dev, &offsets, chunk as u64, total, pool_rx, read_tx, &stop));
            s.spawn(move || {
                for item in read_rx {
                    let out = item.map(|(off, len, mut buf)| {
                        let hashes = hash_and_transform(xts, buf.slice_mut(len as usize), off, enc);
                        (off, len, buf, hashes)
                    });
                    if crypt_tx.send(out).is_err() {
                        break;
                    }
                }
            });
            // The writer owns the crypt receiver and the buffer pool sender: when it returns (done,
            // stopped or failed) they drop, which unblocks and ends the reader and crypt threads
            // before the scope joins them.
            self.write_all(crypt_rx, pool_tx, start, seq)
        })
    }

    fn write_all(
        &mut self,
        crypt_rx: Receiver<Crypted>,
        pool_tx: SyncSender<AlignedBuf>,
        start: u64,
        mut seq: u64,
    ) -> Result<u64, Error> {
        let total = self.journal.sb.device_size;
        let mut next = start;
        // Highest seq whose chunk is known durable: a ring slot is reused only after its chunk is.
        let mut durable = seq.saturating_sub(1);
        for item in crypt_rx {
            let (off, len, buf, hashes) = item?;
            if off != next {
                return Err(Error::Io {
                    what: "ordering chunks",
                    source: std::io::Error::other(format!("chunk at {off}, expected {next}")),
                });
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err(Error::Stopped { at: off });
            }
            if seq > SLOTS && durable < seq - SLOTS {
                self.dev.sync().map_err(|e| Error::Io {
                    what: "flushing the device",
                    source: e,
                })?;
                durable = seq - 1;
            }
            self.journal
                .write(&Record {
                    seq,
                    offset: off,
                    len,
                    hashes,
                })
                .map_err(|e| Error::Io {
                    what: "writing the journal",
                    source: e,
                })?;
            seq += 1;
            self.dev
                .write_at(buf.slice(len as usize), off)
                .map_err(|e| Error::Io {
                    what: "writing the device",
                    source: e,
                })?;
            self.dev.sync().map_err(|e| Error::Io {
                what: "flushing the device",
                source: e,
            })?;
            (self.progress)(off + len, total);
            next = off + len;
            let _ = pool_tx.send(buf);
        }
        // The reader and crypt stages end early when asked to stop (or when they fail, which they
        // report above): an empty channel is only "done" if every byte went through.
        if next < total {
            return Err(Error::Stopped { at: next });
        }
        self.dev.sync().map_err(|e| Error::Io {
            what: "flushing the device",
            source: e,
        })?;
        Ok(seq)
    }
}

fn reader(
    dev: &dyn Device,
    offsets: &[u64],
    chunk: u64,
    total: u64,
    pool: Receiver<AlignedBuf>,
    out: SyncSender<Result<(u64, u64, AlignedBuf), Error>>,
    stop: &AtomicBool,
) {
    for &off in offsets {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut buf) = pool.recv() else { return };
        let len = chunk.min(total - off);
        let item = dev
            .read_at(buf.slice_mut(len as usize), off)
            .map(|_| (off, len, buf))
            .map_err(|e| Error::Io {
                what: "reading the device",
                source: e,
            });
        let failed = item.is_err();
        if out.send(item).is_err() || failed {
            return;
        }
    }
}
