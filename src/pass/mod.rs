//! The in-place pass: encrypts (or decrypts) a device where it lies, offline, crash-safe at every
//! instant (power cuts with a volatile disk cache included), in constant memory. See `engine` for
//! the invariant and the recovery argument, `handle` for the files' life cycle, `plan` for the
//! order in which chunks are visited.
//!
//! Files next to the final header path H (all on the boot partition):
//! - `H.journal`: the journal (`journal`). It is created **first**, with the new header's UUID
//!   chosen up front, and removed last.
//! - `H.pending`: the LUKS2 header while the pass runs. Renamed to H (then the directory is synced)
//!   only once every chunk is durable, so no tool can open a half-encrypted device as whole.
//!
//! State is read from these files alone (design §2: nothing stores "encrypted: true"):
//! journal → a pass is unfinished (its direction is in the journal); else H → encrypted; else a
//! pending header alone → a pass whose journal was lost (refused: only the journal can tell which
//! chunks that header's key encrypted); else plaintext.

mod device;
mod engine;
mod handle;
mod journal;
mod plan;
mod progress;
mod xts;

pub use device::{Device, FileDevice, PlainFile};
pub use progress::Progress;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::exit::{Classify, Exit};
use crate::luks;
use crate::secret::Secret;
use journal::Journal;

/// 16 MiB chunks, three in memory: 48 MiB of buffers whatever the device size.
pub const CHUNK_SIZE: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Encrypt,
    Decrypt,
}

impl Direction {
    /// The subcommand that runs this direction: "encrypt" / "decrypt".
    pub fn verb(self) -> &'static str {
        match self {
            Direction::Encrypt => "encrypt",
            Direction::Decrypt => "decrypt",
        }
    }
}

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
    #[error("stopped at a safe point ({done} of {total} bytes done); run the same command (or reboot) to resume")]
    Stopped { done: u64, total: u64 },
    #[error("{device}: {why}")]
    Unsupported { device: String, why: String },
    #[error("an unfinished {} pass exists for {device}; finish it with `initcrypt {}` first", .found.verb(), .found.verb())]
    WrongDirection { device: String, found: Direction },
    #[error("{pending} exists without its journal {journal}: a pass may have encrypted part of {device} with that header's key, and only the journal says which part; restore the journal (same boot partition backup), or, if {device} was never written, move {pending} away — nothing was written")]
    PendingWithoutJournal {
        device: String,
        pending: String,
        journal: String,
    },
    #[error("the header {pending} of the unfinished pass on {device} is missing, and its journal shows chunks already written with its key; restore {pending} from the boot partition's backup — nothing was written")]
    HeaderLost { device: String, pending: String },
    #[error("{device} does not look like the plaintext it should be ({found}); a pass that lost its journal and header would leave it so, and encrypting it again would destroy it — nothing was written; if it really holds raw data with no filesystem, say so explicitly (encrypt-image --raw)")]
    NotPlaintext { device: String, found: String },
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
            | Error::WrongDirection { .. }
            | Error::PendingWithoutJournal { .. }
            | Error::HeaderLost { .. }
            | Error::NotPlaintext { .. } => Exit::LayoutUnsupported,
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
    /// A pending header without its journal: refused until the operator restores the journal or
    /// moves the header away (see `Error::PendingWithoutJournal`).
    Stranded,
}

/// Observe without changing anything (the boot partition may be mounted read-only).
pub fn observe(paths: &Paths) -> Result<State, Error> {
    let corrupt = |e: std::io::Error| Error::JournalCorrupt {
        detail: e.to_string(),
        path: paths.journal.display().to_string(),
    };
    if let Some(j) = Journal::open_read_only(&paths.journal).map_err(corrupt)? {
        let (done, total) = handle::progress_of(&j).map_err(corrupt)?;
        return Ok(State::Unfinished {
            direction: j.sb.direction,
            done,
            total,
        });
    }
    Ok(if paths.header.exists() {
        State::Encrypted
    } else if paths.pending.exists() {
        State::Stranded
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

/// What a device to be encrypted must look like before a new pass starts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A signature that is not LUKS (a filesystem, an LVM PV, ...): the device is whole plaintext.
    Signature,
    /// Anything: raw data with no signature, vouched for by the caller.
    Raw,
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
    /// Checked when a new encryption starts.
    pub expect: Expect,
    /// Chunk size of a new pass (`CHUNK_SIZE` in production; tests use small chunks to get many
    /// crash points out of a small device).
    pub chunk_size: u64,
}

impl<'a> Request<'a> {
    /// A request with the production defaults: sector size chosen, minimum PBKDF2 iterations (the
    /// key is random), a filesystem signature expected, 16 MiB chunks, SIGTERM/SIGINT stop it.
    pub fn new(
        device: &'a Path,
        header: &Path,
        key: &'a Secret,
        key_name: &'a str,
        identity: String,
    ) -> Request<'a> {
        Request {
            device,
            paths: Paths::for_header(header),
            key,
            key_name,
            identity,
            sector_size: None,
            pbkdf2_iterations: luks::MIN_PBKDF2_ITERATIONS,
            stop: Arc::new(AtomicBool::new(false)),
            expect: Expect::Signature,
            chunk_size: CHUNK_SIZE,
        }
    }
}

/// What a finished `run` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes the pass covers (the LUKS segment), which may be less than the device.
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
    let dev = FileDevice::open(req.device).map_err(|e| Error::Open {
        device: req.device.display().to_string(),
        source: e,
    })?;
    run_on(&dev, req, dir, progress)
}

/// The pass over an already opened device (tests substitute devices that fail on purpose).
pub fn run_on(
    dev: &dyn Device,
    req: &Request,
    dir: Direction,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outcome, Error> {
    run_with(dev, &|store| store, req, dir, progress)
}

/// The journal's store goes through `wrap`: tests route it, and the device, through a simulated
/// volatile write cache that a "power cut" partly loses.
pub type StoreWrap<'a> = &'a dyn Fn(Box<dyn Device>) -> Box<dyn Device>;

/// `run_on` with the journal's store wrapped (see `StoreWrap`).
pub fn run_with(
    dev: &dyn Device,
    wrap: StoreWrap,
    req: &Request,
    dir: Direction,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outcome, Error> {
    match handle::Pass::begin(req, dev, dir, wrap)? {
        handle::Begin::AlreadyDone => Ok(Outcome {
            bytes: 0,
            resumed: false,
            already_done: true,
        }),
        handle::Begin::Ready(pass) => pass.run(progress),
    }
}
