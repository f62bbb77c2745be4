//! The pass journal: a small file on the boot partition that says which chunks may be in flight and
//! what each of their sectors looked like before the pass touched them.
//!
//! Layout: a 4 KiB superblock (which pass, which device, which header, which chunk order), then a
//! ring of `SLOTS` record slots. Record `seq` goes to slot `seq % SLOTS`, so writing record n never
//! damages records n−SLOTS+1 … n−1. Each record also carries `durable`: the newest seq whose chunk
//! the engine had flushed to the device before writing this record. The engine flushes the device
//! before it reuses a slot (record n needs chunk n−SLOTS durable), so every chunk that may be lost
//! or torn by a power cut still has its record: recovery replays the records newer than the newest
//! record's `durable`. A torn record write leaves garbage in one slot whose chunk was never written
//! (the record is made durable before its chunk is written). A final record with `len == 0` and
//! `offset == size` says every chunk is durable, so finishing needs neither the key nor a re-read.
//!
//! Sector hashes are xxh3-128 seeded with a value derived from the volume key (`set_seed`): the
//! journal sits on the unencrypted boot partition, and unseeded hashes of plaintext sectors would
//! let anyone holding the disk confirm guesses about their content. The record area is also
//! overwritten with zeros before the file is unlinked.
//!
//! Version 2 journals (linear order, unseeded hashes, no `durable`) written by earlier releases are
//! read and resumed as they were written.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_128;

use super::device::{Device, PlainFile};
use super::Direction;
use crate::bytes::{le128, le32, le64};

const SB_MAGIC_V2: &[u8; 8] = b"ICJRNL02";
const SB_MAGIC: &[u8; 8] = b"ICJRNL03";
const REC_MAGIC_V2: &[u8; 8] = b"ICREC001";
const REC_MAGIC: &[u8; 8] = b"ICREC002";
const SB_SIZE: u64 = 4096;
/// Records kept: the device is flushed once per `SLOTS` chunks, not once per chunk.
pub const SLOTS: u64 = 8;
const REC_HEADER: usize = 64;
/// A sector hash: xxh3-128 of the sector's bytes.
pub const HASH_LEN: usize = 16;
/// Bounds on the chunk size a journal may declare, checked before any buffer is sized by it.
pub const MIN_CHUNK: u64 = 64 << 10;
pub const MAX_CHUNK: u64 = 64 << 20;

/// The order in which a pass visits chunks (fixed when the journal is created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// 0, 1, 2, … (version 2 journals).
    Linear,
    /// Encrypt: the first and the last chunk first, so the device stops probing as its old
    /// filesystem at once. Decrypt: the last and the first chunk last, so no superblock a probe
    /// or the kernel looks for is plaintext before every other chunk is (see `plan`).
    Guarded,
}

/// What the journal is about; checked against the device and header on every resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub direction: Direction,
    pub order: Order,
    /// Sector hashes are seeded from the volume key (version 3).
    pub keyed: bool,
    pub sector_size: u32,
    pub chunk_size: u64,
    /// Bytes the pass covers from offset 0 (the LUKS segment; a multiple of `sector_size`).
    pub device_size: u64,
    pub luks_uuid: String,
    pub identity: String,
}

/// "Chunk `[offset, offset+len)` is in flight and its source sectors hashed to `hashes`; every
/// chunk before it in the pass's order is done, every chunk after it untouched; chunks of records
/// up to `durable` are on stable storage." `len == 0 && offset == device_size`: finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub durable: u64,
    pub hashes: Vec<[u8; HASH_LEN]>,
}

impl Record {
    pub fn is_done(&self, sb: &Superblock) -> bool {
        self.len == 0 && self.offset == sb.device_size
    }
}

pub struct Journal {
    store: Box<dyn Device>,
    pub path: PathBuf,
    pub sb: Superblock,
    slot_size: u64,
    seed: u64,
}

/// Bytes a journal file takes on the boot partition.
pub fn file_size(chunk_size: u64, sector_size: u32) -> u64 {
    SB_SIZE + SLOTS * slot_size_for(chunk_size, sector_size)
}

fn slot_size_for(chunk_size: u64, sector_size: u32) -> u64 {
    let bytes = REC_HEADER as u64 + (chunk_size / sector_size as u64) * HASH_LEN as u64;
    bytes.div_ceil(4096) * 4096
}

fn put_str(buf: &mut [u8], s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(buf.len());
    buf[..n].copy_from_slice(&b[..n]);
}

fn get_str(buf: &[u8]) -> String {
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl Superblock {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SB_SIZE as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8] = match self.direction {
            Direction::Encrypt => 0,
            Direction::Decrypt => 1,
        };
        b[9] = match self.order {
            Order::Linear => 0,
            Order::Guarded => 1,
        };
        b[10] = self.keyed as u8;
        b[12..16].copy_from_slice(&self.sector_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.device_size.to_le_bytes());
        put_str(&mut b[64..128], &self.luks_uuid);
        put_str(&mut b[128..512], &self.identity);
        let sum = xxh3_128(&b[..4080]);
        b[4080..4096].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The superblock and the journal's version; an error says what is wrong with it.
    fn decode(b: &[u8]) -> io::Result<(Superblock, u8)> {
        let version = match b.get(0..8) {
            Some(m) if m == SB_MAGIC => 3,
            Some(m) if m == SB_MAGIC_V2 => 2,
            _ => return Err(invalid("not an initcrypt journal (bad magic)")),
        };
        if b.len() < SB_SIZE as usize || le128(b, 4080) != xxh3_128(&b[..4080]) {
            return Err(invalid("journal superblock checksum mismatch"));
        }
        let direction = match b[8] {
            0 => Direction::Encrypt,
            1 => Direction::Decrypt,
            d => return Err(invalid(format!("unknown direction {d}"))),
        };
        let (order, keyed) = match (version, b[9], b[10]) {
            (2, _, _) => (Order::Linear, false),
            (_, 0, k) => (Order::Linear, k == 1),
            (_, 1, k) => (Order::Guarded, k == 1),
            (_, o, _) => return Err(invalid(format!("unknown chunk order {o}"))),
        };
        let sb = Superblock {
            direction,
            order,
            keyed,
            sector_size: le32(b, 12),
            chunk_size: le64(b, 16),
            device_size: le64(b, 24),
            luks_uuid: get_str(&b[64..128]),
            identity: get_str(&b[128..512]),
        };
        sb.check()?;
        Ok((sb, version))
    }

    /// Bounds every size before anything (a buffer, a loop) is sized by it.
    fn check(&self) -> io::Result<()> {
        let ss = self.sector_size as u64;
        if !matches!(self.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(invalid(format!("sector size {} is not 512–4096", ss)));
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) || !self.chunk_size.is_power_of_two()
        {
            return Err(invalid(format!(
                "chunk size {} is not a power of two in 64 KiB–64 MiB",
                self.chunk_size
            )));
        }
        if self.device_size == 0 || !self.device_size.is_multiple_of(ss) {
            return Err(invalid(format!(
                "covered size {} is not a positive multiple of the {ss}-byte sector",
                self.device_size
            )));
        }
        Ok(())
    }
}

impl Journal {
    /// Create a new journal (fails if one exists: an existing journal is a pass to resume, never to
    /// overwrite). It is written in full under a temporary name, synced, then renamed into place and
    /// the directory synced: a crash leaves either no journal or a whole one, and a full boot
    /// partition is found out before any data is touched.
    pub fn create(path: &Path, sb: Superblock) -> io::Result<Journal> {
        sb.check()?;
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a journal exists: resume it",
            ));
        }
        let slot_size = slot_size_for(sb.chunk_size, sb.sector_size);
        let tmp = temp_path(path);
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let store = PlainFile::new(file)?;
        let result = (|| {
            store.write_at(&sb.encode(), 0)?;
            let zeros = vec![0u8; slot_size as usize];
            for slot in 0..SLOTS {
                store.write_at(&zeros, SB_SIZE + slot * slot_size)?;
            }
            store.sync()?;
            std::fs::rename(&tmp, path)?;
            sync_dir(path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Journal {
            store: Box::new(store),
            path: path.to_path_buf(),
            sb,
            slot_size,
            seed: 0,
        })
    }

    /// Open an existing journal to resume it; `Ok(None)` if none exists, an error if it is not ours.
    pub fn open(path: &Path) -> io::Result<Option<Journal>> {
        Journal::open_with(path, true)
    }

    /// Open an existing journal only to look at it: observation runs with the boot partition
    /// mounted read-only (after a power cut, too).
    pub fn open_read_only(path: &Path) -> io::Result<Option<Journal>> {
        Journal::open_with(path, false)
    }

    fn open_with(path: &Path, write: bool) -> io::Result<Option<Journal>> {
        let file = match OpenOptions::new().read(true).write(write).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let store = PlainFile::new(file)?;
        let mut b = vec![0u8; SB_SIZE as usize];
        store.read_at(&mut b, 0)?;
        let (sb, _version) = Superblock::decode(&b)?;
        let slot_size = slot_size_for(sb.chunk_size, sb.sector_size);
        if store.len() < SB_SIZE + SLOTS * slot_size {
            return Err(invalid("journal file is shorter than its record slots"));
        }
        Ok(Some(Journal {
            store: Box::new(store),
            path: path.to_path_buf(),
            sb,
            slot_size,
            seed: 0,
        }))
    }

    /// Route the journal's reads and writes through another store (tests: a volatile write cache).
    pub fn wrap_store(&mut self, wrap: &dyn Fn(Box<dyn Device>) -> Box<dyn Device>) {
        let inner = std::mem::replace(&mut self.store, Box::new(NoStore));
        self.store = wrap(inner);
    }

    /// The hash seed, derived from the volume key once the pass has unlocked it.
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = if self.sb.keyed { seed } else { 0 };
    }

    /// The hash of a sector as this journal records it.
    pub fn hash(&self, sector: &[u8]) -> [u8; HASH_LEN] {
        xxhash_rust::xxh3::xxh3_128_with_seed(sector, self.seed).to_le_bytes()
    }

    fn slot_offset(&self, seq: u64) -> u64 {
        SB_SIZE + (seq % SLOTS) * self.slot_size
    }

    /// Write a record and make it durable before returning. Records say their format in their
    /// magic, so a version 2 journal is resumed with version 3 records (only its superblock, and
    /// with it the chunk order and unseeded hashes, stays as it was written).
    pub fn write(&self, rec: &Record) -> io::Result<()> {
        let mut b = vec![0u8; REC_HEADER + rec.hashes.len() * HASH_LEN];
        if b.len() as u64 > self.slot_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "record larger than its slot",
            ));
        }
        b[0..8].copy_from_slice(REC_MAGIC);
        b[8..16].copy_from_slice(&rec.seq.to_le_bytes());
        b[16..24].copy_from_slice(&rec.offset.to_le_bytes());
        b[24..32].copy_from_slice(&rec.len.to_le_bytes());
        b[32..40].copy_from_slice(&(rec.hashes.len() as u64).to_le_bytes());
        b[56..64].copy_from_slice(&rec.durable.to_le_bytes());
        for (i, h) in rec.hashes.iter().enumerate() {
            b[REC_HEADER + i * HASH_LEN..REC_HEADER + (i + 1) * HASH_LEN].copy_from_slice(h);
        }
        let sum = xxh3_128(&b[..40]) ^ xxh3_128(&b[56..]).rotate_left(1);
        b[40..56].copy_from_slice(&sum.to_le_bytes());
        self.store.write_at(&b, self.slot_offset(rec.seq))?;
        // The record is durable before any byte of its chunk is written.
        self.store.sync()?; // FLUSH(journal-record)
        Ok(())
    }

    /// The record in `slot`: `None` when the slot is empty or torn (bad magic or checksum); an
    /// error when a checksummed record contradicts the superblock (a bug or a forged journal).
    fn read_slot(&self, slot: u64) -> io::Result<Option<Record>> {
        let mut h = [0u8; REC_HEADER];
        let at = SB_SIZE + slot * self.slot_size;
        self.store.read_at(&mut h, at)?;
        let v3 = match &h[0..8] {
            m if m == REC_MAGIC => true,
            m if m == REC_MAGIC_V2 => false,
            _ => return Ok(None),
        };
        let n = le64(&h, 32);
        if n > (self.slot_size - REC_HEADER as u64) / HASH_LEN as u64 {
            return Ok(None);
        }
        let mut body = vec![0u8; n as usize * HASH_LEN];
        self.store.read_at(&mut body, at + REC_HEADER as u64)?;
        let sum = if v3 {
            let mut tail = h[56..].to_vec();
            tail.extend_from_slice(&body);
            xxh3_128(&h[..40]) ^ xxh3_128(&tail).rotate_left(1)
        } else {
            xxh3_128(&h[..40]) ^ xxh3_128(&body).rotate_left(1)
        };
        if le128(&h, 40) != sum {
            return Ok(None);
        }
        let rec = Record {
            seq: le64(&h, 8),
            offset: le64(&h, 16),
            len: le64(&h, 24),
            durable: if v3 { le64(&h, 56) } else { 0 },
            hashes: body
                .chunks_exact(HASH_LEN)
                .map(|c| {
                    let mut a = [0u8; HASH_LEN];
                    a.copy_from_slice(c);
                    a
                })
                .collect(),
        };
        self.validate(slot, &rec)?;
        Ok(Some(rec))
    }

    /// Checked arithmetic on everything a record says before the engine reads or writes by it.
    fn validate(&self, slot: u64, r: &Record) -> io::Result<()> {
        let sb = &self.sb;
        let ss = sb.sector_size as u64;
        let bad = |why: &str| {
            invalid(format!(
                "record {} (slot {slot}, offset {}, length {}): {why}",
                r.seq, r.offset, r.len
            ))
        };
        if r.seq % SLOTS != slot {
            return Err(bad("stored in the wrong slot"));
        }
        if r.durable >= r.seq {
            return Err(bad("claims its own chunk durable"));
        }
        if r.is_done(sb) {
            return if r.hashes.is_empty() {
                Ok(())
            } else {
                Err(bad("final record carries hashes"))
            };
        }
        let end = r
            .offset
            .checked_add(r.len)
            .ok_or_else(|| bad("overflows"))?;
        let want_len = sb.chunk_size.min(sb.device_size.saturating_sub(r.offset));
        if !r.offset.is_multiple_of(sb.chunk_size)
            || r.offset >= sb.device_size
            || end > sb.device_size
        {
            return Err(bad("not a chunk of the covered range"));
        }
        if r.len != want_len || !r.len.is_multiple_of(ss) || r.hashes.len() as u64 != r.len / ss {
            return Err(bad("length or hash count does not match the chunk"));
        }
        Ok(())
    }

    /// Every valid record within `SLOTS` of the newest, oldest first. Empty when no record was ever
    /// written (no data was touched).
    pub fn window(&self) -> io::Result<Vec<Record>> {
        let mut recs = Vec::new();
        for slot in 0..SLOTS {
            if let Some(r) = self.read_slot(slot)? {
                recs.push(r);
            }
        }
        let newest = recs.iter().map(|r| r.seq).max().unwrap_or(0);
        recs.retain(|r| r.seq + SLOTS > newest);
        recs.sort_by_key(|r| r.seq);
        Ok(recs)
    }

    /// Delete the file durably, then overwrite its records (they hash sectors of the device)
    /// through the still-open descriptor before its blocks are freed. In this order a crash at any
    /// point leaves either the whole journal (the pass finishes again) or none: wiping first would
    /// let a crash leave a journal whose final record is gone, which reads as "nothing done yet".
    pub fn remove(self) -> io::Result<()> {
        std::fs::remove_file(&self.path)?;
        sync_dir(&self.path)?;
        let zeros = vec![0u8; self.slot_size as usize];
        let wiped = (0..SLOTS)
            .try_for_each(|slot| self.store.write_at(&zeros, SB_SIZE + slot * self.slot_size))
            .and_then(|_| self.store.sync());
        if let Err(e) = wiped {
            log::warn!(
                "{}: removed, but its records could not be overwritten ({e}); they stay in the boot partition's free space",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// Placeholder while a store is being wrapped.
struct NoStore;

impl Device for NoStore {
    fn len(&self) -> u64 {
        0
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("no store"))
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("no store"))
    }
    fn sync(&self) -> io::Result<()> {
        Err(io::Error::other("no store"))
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// fsync the directory holding `path`, so a create, rename or unlink in it survives a power cut.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    fn sb() -> Superblock {
        Superblock {
            direction: Direction::Encrypt,
            order: Order::Linear,
            keyed: true,
            sector_size: 512,
            chunk_size: CHUNK,
            device_size: 1 << 20,
            luks_uuid: "u".into(),
            identity: "PARTUUID=x".into(),
        }
    }

    fn rec(seq: u64) -> Record {
        Record {
            seq,
            offset: (seq - 1) * CHUNK,
            len: CHUNK,
            durable: seq.saturating_sub(2),
            hashes: vec![[seq as u8; 16]; (CHUNK / 512) as usize],
        }
    }

    #[test]
    fn ring_keeps_the_newest_slots_records_and_a_torn_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::create(&p, sb()).unwrap();
        assert!(j.window().unwrap().is_empty());
        assert!(
            Journal::create(&p, sb()).is_err(),
            "never overwrite a journal"
        );
        for seq in 1..=10 {
            j.write(&rec(seq)).unwrap();
        }
        let w = j.window().unwrap();
        assert_eq!(
            w.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (3..=10).collect::<Vec<_>>()
        );
        assert_eq!(w.last(), Some(&rec(10)));
        // Tear record 11 (it overwrites record 3's slot): records 4..=10 remain the window.
        j.write(&rec(11)).unwrap();
        j.store
            .write_at(
                &[0xff; 8],
                SB_SIZE + 3 * j.slot_size + REC_HEADER as u64 + 5,
            )
            .unwrap();
        let w = j.window().unwrap();
        assert_eq!(
            w.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (4..=10).collect::<Vec<_>>()
        );
        let again = Journal::open(&p).unwrap().unwrap();
        assert_eq!(again.sb, sb());
        again.remove().unwrap();
        assert!(Journal::open(&p).unwrap().is_none());
    }

    #[test]
    fn foreign_files_and_absurd_superblocks_are_not_journals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        assert!(Journal::open(&p).is_err());
        for bad in [
            Superblock {
                chunk_size: 1 << 30,
                ..sb()
            },
            Superblock {
                chunk_size: 3 << 16,
                ..sb()
            },
            Superblock {
                device_size: (1 << 20) + 100,
                ..sb()
            },
            Superblock {
                sector_size: 777,
                ..sb()
            },
        ] {
            let q = dir.path().join("k");
            let _ = std::fs::remove_file(&q);
            assert!(Journal::create(&q, bad.clone()).is_err(), "{bad:?}");
            // The same values written by hand (valid checksum) are refused on open.
            std::fs::write(&q, bad.encode()).unwrap();
            assert!(Journal::open(&q).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn checksummed_records_that_contradict_the_superblock_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::create(&p, sb()).unwrap();
        let wrong = [
            Record {
                offset: 100,
                ..rec(1)
            },
            Record {
                offset: 1 << 20,
                ..rec(1)
            },
            Record {
                len: CHUNK / 2,
                hashes: vec![[0; 16]; (CHUNK / 1024) as usize],
                ..rec(1)
            },
            Record {
                offset: u64::MAX - 10,
                ..rec(1)
            },
            Record {
                durable: 1,
                ..rec(1)
            },
        ];
        for r in wrong {
            j.write(&r).unwrap();
            assert!(j.window().is_err(), "{:?}", (r.offset, r.len, r.durable));
        }
        // A record in the wrong slot: write seq 2's bytes into slot 1.
        j.write(&rec(2)).unwrap();
        let mut b = vec![0u8; j.slot_size as usize];
        j.store.read_at(&mut b, SB_SIZE + 2 * j.slot_size).unwrap();
        j.store.write_at(&b, SB_SIZE + j.slot_size).unwrap();
        assert!(j.window().is_err());
    }

    /// Sees the journal file as it is at every flush, to check what `remove` leaves behind.
    struct Snapshot {
        inner: Box<dyn Device>,
        copy: PathBuf,
    }

    impl Device for Snapshot {
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<()> {
            self.inner.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> io::Result<()> {
            self.inner.write_at(b, o)
        }
        fn sync(&self) -> io::Result<()> {
            self.inner.sync()?;
            // The file may be unlinked already: read its bytes through the store.
            let mut b = vec![0u8; self.inner.len() as usize];
            self.inner.read_at(&mut b, 0)?;
            std::fs::write(&self.copy, b)
        }
    }

    #[test]
    fn seeded_hashes_differ_from_plain_ones_and_removal_wipes_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::create(&p, sb()).unwrap();
        let plain = j.hash(&[0u8; 512]);
        assert_eq!(
            plain,
            xxh3_128(&[0u8; 512]).to_le_bytes(),
            "seed 0 is version 2's unseeded hash"
        );
        j.set_seed(0x1234_5678);
        assert_ne!(j.hash(&[0u8; 512]), plain);
        j.write(&rec(1)).unwrap();
        let copy = dir.path().join("copy");
        let snap = copy.clone();
        j.wrap_store(&move |inner| {
            Box::new(Snapshot {
                inner,
                copy: snap.clone(),
            })
        });
        j.remove().unwrap();
        assert!(!p.exists());
        // The file's bytes at its last flush (after the unlink): no record bytes left.
        let bytes = std::fs::read(&copy).unwrap();
        assert!(bytes.len() as u64 > SB_SIZE);
        assert!(bytes[SB_SIZE as usize..].iter().all(|&b| b == 0));
    }
}
