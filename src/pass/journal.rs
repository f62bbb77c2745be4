//! The pass journal: a small file on the boot partition that says which chunk is in flight and what
//! each of its sectors looked like before the pass touched it.
//!
//! Layout: a 4 KiB superblock (what pass, which device, which header), then a ring of `SLOTS` record
//! slots. Record `seq` goes to slot `seq % SLOTS`, so writing record n never damages records
//! n−SLOTS+1 … n−1. The engine flushes the device before it reuses a slot (record n needs chunk
//! n−SLOTS durable), so the chunks that may be in flight at a crash are exactly those whose records
//! are still in the ring: recovery replays them all (`window`). A torn record write leaves garbage in
//! one slot whose previous chunk was already durable. Every record carries an xxh3-128 checksum.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_128;

const SB_MAGIC: &[u8; 8] = b"ICJRNL02";
const REC_MAGIC: &[u8; 8] = b"ICREC001";
const SB_SIZE: u64 = 4096;
/// Records kept: the device is flushed once per `SLOTS - 1` chunks instead of once per chunk.
pub const SLOTS: u64 = 8;
const REC_HEADER: usize = 64;
/// A sector hash: xxh3-128 of the sector's bytes.
pub const HASH_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Encrypt,
    Decrypt,
}

/// What the journal is about; checked against the device and header on every resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub direction: Direction,
    pub sector_size: u32,
    pub chunk_size: u64,
    pub device_size: u64,
    pub luks_uuid: String,
    pub identity: String,
}

/// "All bytes before `offset` are done; `[offset, offset+len)` is in flight and its source sectors
/// hashed to `hashes`; everything after is untouched." `len == 0 && offset == device_size`: finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub hashes: Vec<[u8; HASH_LEN]>,
}

pub struct Journal {
    file: File,
    pub path: PathBuf,
    pub sb: Superblock,
    slot_size: u64,
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

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl Superblock {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SB_SIZE as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8] = match self.direction {
            Direction::Encrypt => 0,
            Direction::Decrypt => 1,
        };
        b[12..16].copy_from_slice(&self.sector_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.device_size.to_le_bytes());
        put_str(&mut b[64..128], &self.luks_uuid);
        put_str(&mut b[128..512], &self.identity);
        let sum = xxh3_128(&b[..4080]);
        b[4080..4096].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Superblock> {
        if b.len() < SB_SIZE as usize || &b[0..8] != SB_MAGIC {
            return None;
        }
        let mut sum = [0u8; 16];
        sum.copy_from_slice(&b[4080..4096]);
        if u128::from_le_bytes(sum) != xxh3_128(&b[..4080]) {
            return None;
        }
        let direction = match b[8] {
            0 => Direction::Encrypt,
            1 => Direction::Decrypt,
            _ => return None,
        };
        let sb = Superblock {
            direction,
            sector_size: u32_at(b, 12),
            chunk_size: u64_at(b, 16),
            device_size: u64_at(b, 24),
            luks_uuid: get_str(&b[64..128]),
            identity: get_str(&b[128..512]),
        };
        let sane = matches!(sb.sector_size, 512 | 1024 | 2048 | 4096)
            && sb.chunk_size >= sb.sector_size as u64
            && sb.chunk_size <= 1 << 30
            && sb.chunk_size % sb.sector_size as u64 == 0;
        sane.then_some(sb)
    }
}

impl Journal {
    /// Create a new journal (fails if one exists: an existing journal is a pass to resume, never to
    /// overwrite). It is written in full under a temporary name, synced, then renamed into place and
    /// the directory synced: a crash leaves either no journal or a whole one, and a full boot
    /// partition is found out before any data is touched.
    pub fn create(path: &Path, sb: Superblock) -> io::Result<Journal> {
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
        let result = (|| {
            file.write_all_at(&sb.encode(), 0)?;
            let zeros = vec![0u8; slot_size as usize];
            for slot in 0..SLOTS {
                file.write_all_at(&zeros, SB_SIZE + slot * slot_size)?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            sync_dir(path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            sb,
            slot_size,
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
        let mut b = vec![0u8; SB_SIZE as usize];
        file.read_exact_at(&mut b, 0)?;
        let sb = Superblock::decode(&b).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not an initcrypt journal (bad magic or checksum)",
            )
        })?;
        let slot_size = slot_size_for(sb.chunk_size, sb.sector_size);
        Ok(Some(Journal {
            file,
            path: path.to_path_buf(),
            sb,
            slot_size,
        }))
    }

    fn slot_offset(&self, seq: u64) -> u64 {
        SB_SIZE + (seq % SLOTS) * self.slot_size
    }

    /// Write a record and make it durable before returning.
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
        for (i, h) in rec.hashes.iter().enumerate() {
            b[REC_HEADER + i * HASH_LEN..REC_HEADER + (i + 1) * HASH_LEN].copy_from_slice(h);
        }
        let sum = xxh3_128(&b[..40]) ^ xxh3_128(&b[REC_HEADER..]).rotate_left(1);
        b[40..56].copy_from_slice(&sum.to_le_bytes());
        self.file.write_all_at(&b, self.slot_offset(rec.seq))?;
        self.file.sync_data()
    }

    fn read_slot(&self, slot: u64) -> io::Result<Option<Record>> {
        let mut h = [0u8; REC_HEADER];
        self.file
            .read_exact_at(&mut h, SB_SIZE + slot * self.slot_size)?;
        if &h[0..8] != REC_MAGIC {
            return Ok(None);
        }
        let n = u64_at(&h, 32);
        if n > (self.slot_size - REC_HEADER as u64) / HASH_LEN as u64 {
            return Ok(None);
        }
        let mut body = vec![0u8; n as usize * HASH_LEN];
        self.file.read_exact_at(
            &mut body,
            SB_SIZE + slot * self.slot_size + REC_HEADER as u64,
        )?;
        let mut sum = [0u8; 16];
        sum.copy_from_slice(&h[40..56]);
        if u128::from_le_bytes(sum) != xxh3_128(&h[..40]) ^ xxh3_128(&body).rotate_left(1) {
            return Ok(None);
        }
        let hashes = body
            .chunks_exact(HASH_LEN)
            .map(|c| {
                let mut a = [0u8; HASH_LEN];
                a.copy_from_slice(c);
                a
            })
            .collect();
        Ok(Some(Record {
            seq: u64_at(&h, 8),
            offset: u64_at(&h, 16),
            len: u64_at(&h, 24),
            hashes,
        }))
    }

    /// The records whose chunks may be in flight, oldest first: every valid record within `SLOTS`
    /// of the newest. Empty when no record was ever written (no data was touched).
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

    /// Delete the journal file (the pass is finished) and make the deletion durable.
    pub fn remove(self) -> io::Result<()> {
        std::fs::remove_file(&self.path)?;
        sync_dir(&self.path)
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
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            direction: Direction::Encrypt,
            sector_size: 512,
            chunk_size: 4096,
            device_size: 1 << 20,
            luks_uuid: "u".into(),
            identity: "PARTUUID=x".into(),
        }
    }

    #[test]
    fn records_alternate_slots_and_newest_valid_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::create(&p, sb()).unwrap();
        assert!(j.window().unwrap().is_empty());
        assert!(
            Journal::create(&p, sb()).is_err(),
            "never overwrite a journal"
        );
        let rec = |seq| Record {
            seq,
            offset: seq * 4096,
            len: 4096,
            hashes: vec![[seq as u8; 16]; 8],
        };
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
        j.file
            .write_all_at(
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
    fn foreign_files_are_not_journals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        assert!(Journal::open(&p).is_err());
    }
}
