//! The in-place pass: encrypts (or decrypts) a device where it lies, offline, crash-safe at every
//! instant, in constant memory. See `engine` for the invariant and the recovery argument.
//!
//! Files next to the final header path H (all on the boot partition):
//! - `H.pending`: the LUKS2 header while the pass runs. Renamed to H (then the directory is synced)
//!   only once the last chunk is durable, so no tool can open a half-encrypted device as whole.
//! - `H.journal`: the journal (`journal`), created before the first data byte changes and removed
//!   after the rename.
//!
//! State is read from these files alone (design §2: nothing stores "encrypted: true"):
//! journal → a pass is unfinished (its direction is in the journal); else H → encrypted;
//! else (with or without a stale pending header) → plaintext.

mod device;
mod engine;
mod journal;
mod progress;
mod xts;

pub use device::{Device, FileDevice};
pub use journal::Direction;
pub use progress::Progress;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::exit::{Classify, Exit};
use crate::luks::{self, FormatParams, LuksVolume};
use crate::secret::Secret;
use journal::{sync_dir, Journal, Superblock};

/// 16 MiB chunks, three in flight: 48 MiB of buffers whatever the device size.
pub const CHUNK_SIZE: u64 = 16 << 20;
/// What libcryptsetup's default LUKS2 header (metadata + keyslot area) occupies.
const LUKS2_HEADER_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error {what}: {source}; the pass stopped at a safe point and resumes with the same command")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot open {device} for the pass: {source}; it must exist and nothing may have it open or mounted")]
    Open {
        device: String,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a LUKS header of this device; move it away — initcrypt will not overwrite it")]
    ForeignFile { path: String },
    #[error("cannot write {path} on the boot partition: {source}; free space there (the header needs 16 MiB) or make it writable — the data device was not touched")]
    BootPartition {
        path: String,
        source: std::io::Error,
    },
    #[error("journal {path} belongs to {found}, not to {expected}; restore the right journal or boot partition — nothing was written")]
    ForeignJournal {
        path: String,
        found: String,
        expected: String,
    },
    #[error("{device} is {actual} bytes but its unfinished pass covers {expected}; reattach the original device — nothing was written")]
    DeviceSmaller {
        device: String,
        actual: u64,
        expected: u64,
    },
    #[error("journal {path} is damaged ({detail}); the data is intact up to the last record; restore the boot partition from a snapshot")]
    JournalCorrupt { detail: String, path: String },
    #[error("the sector at byte {offset} is neither the journalled plaintext nor its ciphertext: the device changed under the pass; nothing was written, restore from a snapshot")]
    Inconsistent { offset: u64 },
    #[error(
        "stopped at a safe point before byte {at}; run the same command (or reboot) to resume"
    )]
    Stopped { at: u64 },
    #[error("{device}: {why}")]
    Unsupported { device: String, why: String },
    #[error(
        "an unfinished {found:?} pass exists for {device}; finish it with `initcrypt {cmd}` first"
    )]
    WrongDirection {
        device: String,
        found: Direction,
        cmd: &'static str,
    },
    #[error(transparent)]
    Luks(#[from] luks::Error),
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Luks(e) => e.exit(),
            Error::Open { .. } | Error::DeviceSmaller { .. } => Exit::DeviceMissing,
            Error::ForeignFile { .. }
            | Error::Unsupported { .. }
            | Error::ForeignJournal { .. }
            | Error::WrongDirection { .. } => Exit::LayoutUnsupported,
            _ => Exit::PassFailed,
        }
    }
}

/// The files of one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub header: PathBuf,
    pub pending: PathBuf,
    pub journal: PathBuf,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Paths {
    pub fn for_header(header: &Path) -> Paths {
        Paths {
            header: header.to_path_buf(),
            pending: with_suffix(header, ".pending"),
            journal: with_suffix(header, ".journal"),
        }
    }

    pub fn with_journal(mut self, journal: Option<&Path>) -> Paths {
        if let Some(j) = journal {
            self.journal = j.to_path_buf();
        }
        self
    }
}

/// What the files say about the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Plaintext,
    Encrypted,
    /// A pass is unfinished; `done` bytes of `total` are in target form.
    Unfinished {
        direction: Direction,
        done: u64,
        total: u64,
    },
}

/// Observe without changing anything.
pub fn observe(paths: &Paths) -> Result<State, Error> {
    let corrupt = |e: std::io::Error| Error::JournalCorrupt {
        detail: e.to_string(),
        path: paths.journal.display().to_string(),
    };
    if let Some(j) = Journal::open_read_only(&paths.journal).map_err(corrupt)? {
        let done = j
            .window()
            .map_err(corrupt)?
            .first()
            .map(|r| r.offset)
            .unwrap_or(0);
        return Ok(State::Unfinished {
            direction: j.sb.direction,
            done,
            total: j.sb.device_size,
        });
    }
    Ok(if paths.header.exists() {
        State::Encrypted
    } else {
        State::Plaintext
    })
}

/// A flag that SIGTERM and SIGINT set: the pass checks it between chunks and stops at a safe point.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            log::warn!("cannot catch signal {sig}: {e}; a stop request will kill the pass (it resumes on the next run)");
        }
    }
    stop
}

/// One pass to run.
pub struct Request<'a> {
    pub device: &'a Path,
    pub paths: Paths,
    pub key: &'a Secret,
    /// Key file name, for messages only.
    pub key_name: &'a str,
    /// Stable name of the device (`PARTUUID=…`, or the image path), checked on resume.
    pub identity: String,
    /// Sector size for a new header; None: the largest the device and filesystem allow.
    pub sector_size: Option<u32>,
    pub pbkdf2_iterations: u32,
    pub stop: Arc<AtomicBool>,
}

/// What a finished `run` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub bytes: u64,
    pub resumed: bool,
    pub already_done: bool,
}

/// Encrypt `req.device` in place (or finish an unfinished encryption).
pub fn encrypt(req: &Request, progress: &mut dyn FnMut(u64, u64)) -> Result<Outcome, Error> {
    run(req, Direction::Encrypt, progress)
}

/// Decrypt `req.device` in place (or finish an unfinished decryption), then drop its header.
pub fn decrypt(req: &Request, progress: &mut dyn FnMut(u64, u64)) -> Result<Outcome, Error> {
    run(req, Direction::Decrypt, progress)
}

fn run(
    req: &Request,
    dir: Direction,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outcome, Error> {
    let open_err = |e| Error::Open {
        device: req.device.display().to_string(),
        source: e,
    };
    let dev = FileDevice::open(req.device).map_err(open_err)?;
    run_on(&dev, req, dir, progress)
}

/// The pass over an already opened device (tests substitute devices that fail on purpose).
pub fn run_on(
    dev: &dyn Device,
    req: &Request,
    dir: Direction,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outcome, Error> {
    let paths = &req.paths;
    let corrupt = |e: std::io::Error| Error::JournalCorrupt {
        detail: e.to_string(),
        path: paths.journal.display().to_string(),
    };
    let (journal, resumed) = match Journal::open(&paths.journal).map_err(corrupt)? {
        Some(j) => (j, true),
        None => match start(req, dir, dev)? {
            Some(j) => (j, false),
            None => {
                return Ok(Outcome {
                    bytes: 0,
                    resumed: false,
                    already_done: true,
                })
            }
        },
    };
    if journal.sb.direction != dir {
        let cmd = if journal.sb.direction == Direction::Encrypt {
            "encrypt"
        } else {
            "decrypt"
        };
        return Err(Error::WrongDirection {
            device: req.device.display().to_string(),
            found: journal.sb.direction,
            cmd,
        });
    }
    check_journal(req, &journal, dev)?;
    if dir == Direction::Decrypt && paths.header.exists() {
        rename_durably(&paths.header, &paths.pending)?;
    }
    let header = if paths.pending.exists() {
        &paths.pending
    } else {
        &paths.header
    };
    let (vk, params) =
        LuksVolume::new(req.device, Some(header)).volume_key(req.key, req.key_name)?;
    if params.uuid != journal.sb.luks_uuid {
        return Err(Error::ForeignJournal {
            path: paths.journal.display().to_string(),
            found: journal.sb.luks_uuid.clone(),
            expected: params.uuid,
        });
    }
    let xts =
        xts::Xts::new(&vk, journal.sb.sector_size as usize).ok_or_else(|| Error::Unsupported {
            device: req.device.display().to_string(),
            why: "volume key is not an AES-XTS key".into(),
        })?;
    let mut engine = engine::Engine {
        dev,
        journal: &journal,
        xts: &xts,
        stop: req.stop.clone(),
        progress,
    };
    let window = journal.window().map_err(corrupt)?;
    let (from, seq) = match window.last() {
        Some(newest) => {
            engine.recover(&window)?;
            (newest.offset + newest.len, newest.seq + 1)
        }
        None => (0, 1),
    };
    (engine.progress)(from, journal.sb.device_size);
    engine.run(from, seq)?;
    finish(paths, dir, journal)?;
    Ok(Outcome {
        bytes: dev.len(),
        resumed,
        already_done: false,
    })
}

/// Check an existing journal against the device before anything is written.
fn check_journal(req: &Request, j: &Journal, dev: &dyn Device) -> Result<(), Error> {
    if j.sb.identity != req.identity {
        return Err(Error::ForeignJournal {
            path: j.path.display().to_string(),
            found: j.sb.identity.clone(),
            expected: req.identity.clone(),
        });
    }
    if dev.len() < j.sb.device_size {
        return Err(Error::DeviceSmaller {
            device: req.device.display().to_string(),
            actual: dev.len(),
            expected: j.sb.device_size,
        });
    }
    Ok(())
}

/// Begin a new pass: header and journal in place, nothing written to the device yet.
/// `Ok(None)`: there is nothing to do (already in the wanted state).
fn start(req: &Request, dir: Direction, dev: &dyn Device) -> Result<Option<Journal>, Error> {
    let paths = &req.paths;
    match dir {
        Direction::Encrypt => {
            if paths.header.exists() {
                return match LuksVolume::new(req.device, Some(&paths.header)).info() {
                    Ok(_) => Ok(None),
                    Err(_) => Err(Error::ForeignFile {
                        path: paths.header.display().to_string(),
                    }),
                };
            }
            let sector_size = choose_sector_size(req, dev)?;
            check_space(
                &paths.header,
                LUKS2_HEADER_BYTES + journal::file_size(CHUNK_SIZE, sector_size),
            )?;
            let uuid = new_header(req, sector_size)?;
            let sb = superblock(req, dir, sector_size, dev.len(), uuid);
            create_journal(paths, sb).map(Some)
        }
        Direction::Decrypt => {
            if !paths.header.exists() {
                return Ok(None);
            }
            let vol = LuksVolume::new(req.device, Some(&paths.header));
            // Mid-reencryption, the header's default segment is the *final* one: decrypting by it
            // would scramble the part that is still in its old form.
            if vol.info()?.reencrypt_pending {
                return Err(Error::Unsupported {
                    device: req.device.display().to_string(),
                    why: "its LUKS2 reencryption is unfinished; finish it first (initcrypt encrypt <name>, or cryptsetup reencrypt --resume-only), then decrypt".into(),
                });
            }
            let (_, params) = vol.volume_key(req.key, req.key_name)?;
            check_decryptable(req, &params)?;
            let sb = superblock(req, dir, params.sector_size, dev.len(), params.uuid);
            create_journal(paths, sb).map(Some)
        }
    }
}

fn superblock(
    req: &Request,
    direction: Direction,
    sector_size: u32,
    size: u64,
    luks_uuid: String,
) -> Superblock {
    Superblock {
        direction,
        sector_size,
        chunk_size: CHUNK_SIZE,
        device_size: size,
        luks_uuid,
        identity: req.identity.clone(),
    }
}

fn create_journal(paths: &Paths, sb: Superblock) -> Result<Journal, Error> {
    Journal::create(&paths.journal, sb).map_err(|e| Error::BootPartition {
        path: paths.journal.display().to_string(),
        source: e,
    })
}

/// Our engine handles the layout ADE and stock cryptsetup write for detached headers; anything else
/// is better left to `cryptsetup reencrypt`.
fn check_decryptable(req: &Request, p: &luks::DataParams) -> Result<(), Error> {
    let why = if p.cipher != "aes" || p.mode != "xts-plain64" {
        Some(format!(
            "cipher {}-{} is not aes-xts-plain64; use cryptsetup reencrypt --decrypt",
            p.cipher, p.mode
        ))
    } else if p.data_offset != 0 || p.iv_offset != 0 {
        Some("data offset is not 0 (header not detached in ADE's layout); use cryptsetup reencrypt --decrypt".into())
    } else {
        None
    };
    why.map_or(Ok(()), |why| {
        Err(Error::Unsupported {
            device: req.device.display().to_string(),
            why,
        })
    })
}

/// The largest sector size that is safe: never above the device's physical block size (a larger
/// sector could be torn by a power cut), a divisor of the device size, and not above the block
/// size of the filesystem on it (ext4 refuses crypt sectors larger than its blocks).
fn choose_sector_size(req: &Request, dev: &dyn Device) -> Result<u32, Error> {
    let unsupported = |why: String| Error::Unsupported {
        device: req.device.display().to_string(),
        why,
    };
    let limit = physical_block_size(req.device)
        .min(fs_block_size(req.device).unwrap_or(4096))
        .clamp(512, 4096);
    let size = match req.sector_size {
        Some(s) if !matches!(s, 512 | 1024 | 2048 | 4096) => {
            return Err(unsupported(format!("sector size {s} is not 512–4096")))
        }
        Some(s) if s as u64 > physical_block_size(req.device) => {
            return Err(unsupported(format!(
                "sector size {s} is above the device's physical block size (writes could tear)"
            )))
        }
        Some(s) => s,
        None => [4096u32, 2048, 1024, 512]
            .into_iter()
            .find(|s| *s as u64 <= limit && dev.len() % *s as u64 == 0)
            .unwrap_or(512),
    };
    if dev.len() % size as u64 != 0 || dev.len() == 0 {
        return Err(unsupported(format!(
            "size {} is not a multiple of the {size}-byte sector",
            dev.len()
        )));
    }
    Ok(size)
}

/// Physical block size of a block device; image files count as 4096 (page-sized writes).
fn physical_block_size(path: &Path) -> u64 {
    let Ok(real) = std::fs::canonicalize(path) else {
        return 512;
    };
    let Some(name) = real.file_name().and_then(|n| n.to_str()) else {
        return 512;
    };
    let is_block = std::fs::metadata(&real)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if !is_block {
        return 4096;
    }
    let sys = Path::new("/sys/class/block").join(name);
    let disk = std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| {
            if sys.join("partition").exists() {
                p.parent().map(Path::to_path_buf)
            } else {
                Some(p)
            }
        })
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    disk.map(|d| crate::blockdev::physical_block_size(&d))
        .unwrap_or(512)
}

/// Block size of the filesystem on the device, as libblkid reports it (ext* block size; XFS, FAT
/// and btrfs sector size), if one is there.
fn fs_block_size(path: &Path) -> Option<u64> {
    crate::blockdev::probe_path(path)
        .ok()
        .flatten()
        .and_then(|p| p.block_size)
}

/// Format the pending header (replacing a stale one from an interrupted start), durable on disk.
fn new_header(req: &Request, sector_size: u32) -> Result<String, Error> {
    let pending = &req.paths.pending;
    let boot_err = |e: std::io::Error| Error::BootPartition {
        path: pending.display().to_string(),
        source: e,
    };
    if let Some(dir) = pending.parent() {
        std::fs::create_dir_all(dir).map_err(boot_err)?;
    }
    let _ = std::fs::remove_file(pending);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(pending)
        .map_err(boot_err)?;
    f.set_len(4096).map_err(boot_err)?;
    let uuid = uuid::Uuid::new_v4();
    let params = FormatParams {
        sector_size,
        uuid,
        pbkdf2_iterations: req.pbkdf2_iterations,
    };
    // The header file lives on the boot partition: an I/O failure while formatting it is a boot
    // partition problem (full, read-only, failing), never the data device's.
    let formatted = LuksVolume::format_detached(pending, req.device, req.key, &params)
        .and_then(|v| v.info())
        .map_err(|e| boot_err(std::io::Error::other(e.to_string())))
        .and_then(|_| {
            f.sync_all()
                .and_then(|_| sync_dir(pending))
                .map_err(boot_err)
        });
    if let Err(e) = formatted {
        let _ = std::fs::remove_file(pending);
        return Err(e);
    }
    Ok(uuid.to_string())
}

/// Refuse to start when the boot partition cannot hold the header and the journal: found out before
/// anything is written, with the numbers the operator needs.
fn check_space(header: &Path, needed: u64) -> Result<(), Error> {
    let dir = header
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let st = rustix::fs::statvfs(probe).map_err(|e| Error::BootPartition {
        path: dir.display().to_string(),
        source: e.into(),
    })?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < needed {
        let msg = format!(
            "{} MiB free, the header and journal need {} MiB",
            free >> 20,
            needed.div_ceil(1 << 20)
        );
        return Err(Error::BootPartition {
            path: dir.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, msg),
        });
    }
    Ok(())
}

fn rename_durably(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::rename(from, to)
        .and_then(|_| sync_dir(to))
        .map_err(|e| Error::BootPartition {
            path: to.display().to_string(),
            source: e,
        })
}

/// The last chunk is durable: publish the header (encrypt) or drop it (decrypt), then the journal.
fn finish(paths: &Paths, dir: Direction, journal: Journal) -> Result<(), Error> {
    let boot_err = |p: &Path| {
        let path = p.display().to_string();
        move |e| Error::BootPartition { path, source: e }
    };
    match dir {
        Direction::Encrypt => {
            if paths.pending.exists() {
                rename_durably(&paths.pending, &paths.header)?;
            }
            journal.remove().map_err(boot_err(&paths.journal))
        }
        Direction::Decrypt => {
            journal.remove().map_err(boot_err(&paths.journal))?;
            std::fs::remove_file(&paths.pending)
                .and_then(|_| sync_dir(&paths.pending))
                .map_err(boot_err(&paths.pending))
        }
    }
}
