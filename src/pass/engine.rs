//! The pipelined pass: read → hash + transform on all cores → journal record → write, with the
//! device flushed once every `SLOTS` chunks.
//!
//! # Invariant
//! Chunks are visited in the order of `plan`. Let R be the newest durable journal record and D the
//! `durable` it carries. Then every chunk visited before R's chunk holds the target form
//! (ciphertext when encrypting) *once the device's cache reaches stable storage*, every chunk of a
//! record with seq ≤ D is there already, every chunk visited after R's is untouched, and each
//! sector of a chunk whose record is newer than D is wholly source or wholly target on stable
//! storage. It holds on a device with a volatile write cache that may lose, tear (at sector
//! granularity) or reorder any write not yet flushed, because
//! 1. a chunk's record is written and flushed (FLUSH journal-record) before any byte of the chunk
//!    is written, and it hashes every source sector of the chunk;
//! 2. records live in a ring of `SLOTS` slots and the device is flushed (FLUSH ring) before a slot
//!    is reused, i.e. record n is written only after chunk n−SLOTS is durable: every chunk that may
//!    still sit in the cache has its record in the ring, and D is exactly the last flush;
//! 3. sectors are never larger than the device's physical block size, so a sector reaches stable
//!    storage whole or not at all.
//!
//! Up to `SLOTS` chunks are in flight between two flushes; the journal flush of each record is
//! a small write, and it overlaps the previous chunk's data write: a data writer thread writes
//! chunk n while the journal side makes record n+1 durable (record n was durable before chunk n
//! was handed over, and the ring's flush waits until the writes it must cover have completed). After the last chunk the device is flushed (FLUSH final) and a final record says
//! so, after which nothing needs the key or a re-read to finish.
//!
//! # Recovery
//! For each record newer than D, oldest first, and each sector of its chunk: if its hash equals the
//! recorded source hash it is still source and is transformed; else if the *inverse* transform of
//! it hashes to the recorded value it is already target; else the device changed under the pass
//! and we stop without writing (exit 7). Chunks are classified before anything is rewritten,
//! rewritten whole (rewriting target sectors with the same bytes is harmless) and flushed
//! (FLUSH recovery); the pass continues after R's chunk with the next seq. No record is written
//! during recovery, so a crash during recovery is recovered the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;

use zeroize::Zeroizing;

use super::device::{AlignedBuf, Device};
use super::journal::{Journal, Record, HASH_LEN, SLOTS};
use super::plan::Plan;
use super::xts::Xts;
use super::{Direction, Error};

/// Chunks in memory at once: one being read, one being transformed, one being written.
pub const BUFFERS: usize = 3;

pub struct Engine<'a> {
    pub dev: &'a dyn Device,
    pub journal: &'a Journal,
    pub xts: &'a Xts,
    pub plan: Plan,
    pub stop: Arc<AtomicBool>,
    pub progress: &'a mut dyn FnMut(u64, u64),
}

type Hash = [u8; HASH_LEN];
/// A transformed chunk on its way to the writer: offset, length, buffer, source-sector hashes.
type Crypted = Result<(u64, u64, AlignedBuf, Vec<Hash>), Error>;

/// Where a pass continues after recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Position in the plan of the next chunk.
    pub index: u64,
    /// Next record number.
    pub seq: u64,
    /// Newest record whose chunk is known durable.
    pub durable: u64,
    /// The journal's final record is there: every chunk is durable.
    pub finished: bool,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn forward(dir: Direction) -> bool {
    dir == Direction::Encrypt
}

/// Hash each source sector, then transform it in place, splitting the chunk across all cores.
fn hash_and_transform(
    journal: &Journal,
    xts: &Xts,
    buf: &mut [u8],
    offset: u64,
    encrypt: bool,
) -> Vec<Hash> {
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
                    *h = journal.hash(sector);
                }
                xts.run(data, offset + (i * per * ss) as u64, encrypt);
            });
        }
    });
    hashes
}

impl Engine<'_> {
    /// Bring every chunk that may be in flight to target form (see Recovery above), flush, and
    /// say where the pass continues.
    pub fn recover(&mut self, window: &[Record]) -> Result<Resume, Error> {
        let Some(newest) = window.last() else {
            return Ok(Resume {
                index: 0,
                seq: 1,
                durable: 0,
                finished: false,
            });
        };
        if newest.is_done(&self.journal.sb) {
            return Ok(Resume {
                index: self.plan.count(),
                seq: newest.seq + 1,
                durable: newest.seq,
                finished: true,
            });
        }
        let pending: Vec<&Record> = window.iter().filter(|r| r.seq > newest.durable).collect();
        let mut fixed = Vec::with_capacity(pending.len());
        for rec in &pending {
            fixed.push(self.classify(rec)?);
        }
        for (rec, buf) in pending.iter().zip(fixed) {
            if let Some(buf) = buf {
                self.dev
                    .write_at(buf.slice(rec.len as usize), rec.offset)
                    .map_err(io("rewriting an in-flight chunk"))?;
            }
        }
        // The rewritten chunks are durable before the ring moves on past their records.
        self.dev.sync().map_err(io("flushing the device"))?; // FLUSH(recovery)
        let chunk = self.journal.sb.chunk_size;
        Ok(Resume {
            index: self.plan.index_of(newest.offset / chunk) + 1,
            seq: newest.seq + 1,
            durable: newest.seq,
            finished: false,
        })
    }

    /// Read a record's chunk and turn its source sectors into target form in memory; `None` when
    /// every sector is already target (nothing to rewrite).
    fn classify(&mut self, rec: &Record) -> Result<Option<AlignedBuf>, Error> {
        let ss = self.xts.sector_size();
        let enc = forward(self.journal.sb.direction);
        let mut buf = AlignedBuf::new(rec.len as usize);
        let data = buf.slice_mut(rec.len as usize);
        self.dev
            .read_at(data, rec.offset)
            .map_err(io("reading the in-flight chunk"))?;
        let mut tweaks = Zeroizing::new(Vec::with_capacity(ss));
        // Holds a plaintext sector when decrypting: wiped when dropped.
        let mut probe = Zeroizing::new(vec![0u8; ss]);
        let (mut src, mut done) = (0usize, 0usize);
        for (i, sector) in data.chunks_exact_mut(ss).enumerate() {
            let iv = Xts::iv_of(rec.offset + (i * ss) as u64);
            let recorded = rec.hashes.get(i).ok_or_else(|| Error::JournalCorrupt {
                detail: "record has fewer hashes than sectors".into(),
                path: self.journal.path.display().to_string(),
            })?;
            if self.journal.hash(sector) == *recorded {
                self.xts.sector(sector, iv, enc, &mut tweaks);
                src += 1;
                continue;
            }
            probe.copy_from_slice(sector);
            self.xts.sector(&mut probe, iv, !enc, &mut tweaks);
            if self.journal.hash(&probe) != *recorded {
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

    /// Run the pass from `at` to the end of the plan, then flush and write the final record.
    pub fn run(&mut self, at: Resume) -> Result<(), Error> {
        let chunk = self.journal.sb.chunk_size as usize;
        let enc = forward(self.journal.sb.direction);
        let (pool_tx, pool_rx) = sync_channel::<AlignedBuf>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = pool_tx.send(AlignedBuf::new(chunk));
        }
        let (read_tx, read_rx) = sync_channel::<Result<(u64, u64, AlignedBuf), Error>>(1);
        let (crypt_tx, crypt_rx) = sync_channel::<Crypted>(1);
        let (xts, journal, dev, plan) = (self.xts, self.journal, self.dev, self.plan);
        let stop = self.stop.clone();
        std::thread::scope(|s| {
            s.spawn(move || reader(dev, plan, at.index, pool_rx, read_tx, &stop));
            s.spawn(move || {
                for item in read_rx {
                    let out = item.map(|(off, len, mut buf)| {
                        let slice = buf.slice_mut(len as usize);
                        let hashes = hash_and_transform(journal, xts, slice, off, enc);
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
            self.write_all(crypt_rx, pool_tx, at)
        })
    }

    /// The journal side of the writer: makes each chunk's record durable, then hands the chunk to
    /// the data writer thread, so the record of chunk n+1 is flushed while chunk n is being
    /// written (the flush's latency no longer adds to every chunk). Record n is still durable
    /// before any byte of chunk n is written, and the ring's flush waits for the writes it covers.
    fn write_all(
        &mut self,
        crypt_rx: Receiver<Crypted>,
        pool_tx: SyncSender<AlignedBuf>,
        at: Resume,
    ) -> Result<(), Error> {
        let (data_tx, data_rx) = sync_channel::<ToWrite>(1);
        let (done_tx, done_rx) = channel::<Written>();
        let dev = self.dev;
        // The data writer returns each buffer to the pool as soon as it is written: holding it
        // until the journal side reads the report could starve the reader that side waits for.
        std::thread::scope(|s| {
            s.spawn(move || data_writer(dev, data_rx, done_tx, pool_tx));
            self.journal_side(crypt_rx, data_tx, done_rx, at)
        })
    }

    fn journal_side(
        &mut self,
        crypt_rx: Receiver<Crypted>,
        data_tx: SyncSender<ToWrite>,
        done_rx: Receiver<Written>,
        at: Resume,
    ) -> Result<(), Error> {
        let total = self.journal.sb.device_size;
        let plan = self.plan;
        let mut expected = plan.walk(at.index);
        let (mut seq, mut durable) = (at.seq, at.durable);
        // Every chunk before `at` is written (and was flushed by recovery).
        let mut w = Progress {
            written: at.seq - 1,
            index: at.index,
            failed: None,
        };
        let mut outcome: Result<(), Error> = Ok(());
        for item in crypt_rx {
            while let Ok(r) = done_rx.try_recv() {
                w.absorb(r, &plan, total, &mut *self.progress);
            }
            if w.failed.is_some() {
                break;
            }
            let (off, len, buf, hashes) = match item {
                Ok(c) => c,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            if expected.next() != Some((off, len)) {
                outcome = Err(Error::Io {
                    what: "ordering chunks",
                    source: std::io::Error::other(format!("unexpected chunk at {off}")),
                });
                break;
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if seq > durable + SLOTS {
                // Record `seq` reuses the slot of record seq − SLOTS, whose chunk must be written
                // and then flushed first.
                while w.written + SLOTS < seq && w.failed.is_none() {
                    match done_rx.recv() {
                        Ok(r) => w.absorb(r, &plan, total, &mut *self.progress),
                        Err(_) => break,
                    }
                }
                if w.failed.is_some() || w.written + SLOTS < seq {
                    break;
                }
                if let Err(e) = self.flush_ring() {
                    outcome = Err(e);
                    break;
                }
                durable = w.written;
            }
            let record = Record {
                seq,
                offset: off,
                len,
                durable,
                hashes,
            };
            if let Err(e) = self.journal.write(&record) {
                outcome = Err(io("writing the journal")(e));
                break;
            }
            if data_tx.send((seq, off, len, buf)).is_err() {
                break; // the data writer failed: its error is in done_rx
            }
            seq += 1;
        }
        // Let the data writer finish what it has, and collect every report.
        drop(data_tx);
        for r in done_rx {
            w.absorb(r, &plan, total, &mut *self.progress);
        }
        if let Some(e) = w.failed {
            return Err(e);
        }
        outcome?;
        // The reader and crypt stages end early when asked to stop: an empty channel is only
        // "done" if every chunk went through.
        if w.index < plan.count() {
            return self.stopped(plan.bytes_before(w.index));
        }
        // Every chunk is durable before the final record says so.
        self.dev.sync().map_err(io("flushing the device"))?; // FLUSH(final)
        self.journal
            .write(&Record {
                seq,
                offset: total,
                len: 0,
                durable: seq - 1,
                hashes: Vec::new(),
            })
            .map_err(io("writing the journal"))
    }

    /// The flush before a ring slot is reused. Its own function so that the statement carrying
    /// the FLUSH tag is exactly the flush (`scripts/mutate-flushes` deletes that line).
    fn flush_ring(&self) -> Result<(), Error> {
        self.dev.sync().map_err(io("flushing the device"))?; // FLUSH(ring)
        Ok(())
    }

    /// Stop at a chunk boundary: flush what was written (not needed for safety — the records
    /// cover it — but it shortens the next recovery) and report how far the pass got.
    fn stopped(&self, done: u64) -> Result<(), Error> {
        if let Err(e) = self.dev.sync() {
            log::warn!("flushing the device before stopping: {e}");
        }
        Err(Error::Stopped {
            done,
            total: self.journal.sb.device_size,
        })
    }
}

/// A chunk whose record is durable, for the data writer: seq, offset, length, buffer.
type ToWrite = (u64, u64, u64, AlignedBuf);
/// The data writer's report: the seq written, or the error that stopped it.
type Written = Result<u64, Error>;

/// Writes the chunks handed to it, in order, each only after its record was made durable, and
/// returns each buffer to the pool once written.
fn data_writer(
    dev: &dyn Device,
    rx: Receiver<ToWrite>,
    done: Sender<Written>,
    pool: SyncSender<AlignedBuf>,
) {
    for (seq, off, len, buf) in rx {
        let r = dev
            .write_at(buf.slice(len as usize), off)
            .map(|_| seq)
            .map_err(io("writing the device"));
        let failed = r.is_err();
        let _ = pool.send(buf);
        if done.send(r).is_err() || failed {
            return;
        }
    }
}

/// What the data writer has finished.
struct Progress {
    /// Newest seq whose chunk write completed.
    written: u64,
    /// Chunks of the plan written so far.
    index: u64,
    failed: Option<Error>,
}

impl Progress {
    fn absorb(&mut self, r: Written, plan: &Plan, total: u64, progress: &mut dyn FnMut(u64, u64)) {
        match r {
            Ok(seq) => {
                self.written = seq;
                self.index += 1;
                progress(plan.bytes_before(self.index), total);
            }
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
    }
}

fn reader(
    dev: &dyn Device,
    plan: Plan,
    from: u64,
    pool: Receiver<AlignedBuf>,
    out: SyncSender<Result<(u64, u64, AlignedBuf), Error>>,
    stop: &AtomicBool,
) {
    for (off, len) in plan.walk(from) {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut buf) = pool.recv() else { return };
        let item = dev
            .read_at(buf.slice_mut(len as usize), off)
            .map(|_| (off, len, buf))
            .map_err(io("reading the device"));
        let failed = item.is_err();
        if out.send(item).is_err() || failed {
            return;
        }
    }
}
