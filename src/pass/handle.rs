//! One pass, as a handle built once: its journal, which header file is current, whether it resumes.
//!
//! Life cycle of the files (H = final header path; every step is durable before the next):
//! - encrypt: journal created (with the header UUID chosen up front) → `H.pending` formatted →
//!   chunks → final record → `H.pending` renamed to H → journal wiped and removed.
//! - decrypt: journal created (UUID of H) → H renamed to `H.pending` (no tool opens a half-decrypted
//!   device as whole) → chunks → final record → `H.pending` removed → journal wiped and removed.
//!
//! So a journal with no record means no data byte was touched, and a missing pending header is
//! recreated only then; a pending header without a journal is never deleted or reused (it may hold
//! the only key to an encrypted prefix) and is refused with the way out.

use std::path::Path;

use super::device::Device;
use super::engine::{Engine, Resume};
use super::journal::{self, sync_dir, Journal, Order, Superblock};
use super::plan::Plan;
use super::xts::Xts;
use super::{Direction, Error, Expect, Outcome, Request, StoreWrap};
use crate::blockdev;
use crate::luks::{self, FormatParams, LuksVolume};

/// What libcryptsetup's default LUKS2 header (metadata + keyslot area) occupies.
const LUKS2_HEADER_BYTES: u64 = 16 << 20;

/// Which file holds the volume's keyslots while the pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderAt {
    Pending,
    Final,
    /// Neither: only possible once the journal's final record is written (decrypt removed it).
    Gone,
}

pub enum Begin<'a> {
    /// The device already has the wanted form.
    AlreadyDone,
    Ready(Pass<'a>),
}

pub struct Pass<'a> {
    req: &'a Request<'a>,
    dev: &'a dyn Device,
    journal: Journal,
    header: HeaderAt,
    resumed: bool,
}

fn corrupt(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::JournalCorrupt {
        detail: e.to_string(),
        path: path.display().to_string(),
    }
}

fn boot_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::BootPartition {
        path: path.display().to_string(),
        source: e,
    }
}

/// Bytes done and covered, as the journal says (for `observe`: no key needed).
pub fn progress_of(j: &Journal) -> std::io::Result<(u64, u64)> {
    let plan = plan_of(&j.sb);
    let window = j.window()?;
    // Chunks of records newer than the newest record's `durable` may still be in flight (the
    // data writer runs one chunk behind the journal): only what precedes the oldest of them is
    // claimed done.
    let done = match window.last() {
        None => 0,
        Some(r) if r.is_done(&j.sb) => j.sb.device_size,
        Some(newest) => {
            let oldest = window
                .iter()
                .find(|r| r.seq > newest.durable)
                .unwrap_or(newest);
            plan.bytes_before(plan.index_of(oldest.offset / j.sb.chunk_size))
        }
    };
    Ok((done, j.sb.device_size))
}

fn plan_of(sb: &Superblock) -> Plan {
    Plan::new(sb.device_size, sb.chunk_size, sb.order, sb.direction)
}

impl<'a> Pass<'a> {
    /// Open the journal of an unfinished pass, or start a new one; nothing is written to the
    /// device here.
    pub fn begin(
        req: &'a Request<'a>,
        dev: &'a dyn Device,
        dir: Direction,
        wrap: StoreWrap,
    ) -> Result<Begin<'a>, Error> {
        let paths = &req.paths;
        let begun = match Journal::open(&paths.journal).map_err(corrupt(&paths.journal))? {
            Some(j) => Pass::resume(req, dev, dir, j)?,
            None => match Pass::start(req, dev, dir)? {
                Some(p) => p,
                None => return Ok(Begin::AlreadyDone),
            },
        };
        let mut pass = begun;
        pass.journal.wrap_store(wrap);
        Ok(Begin::Ready(pass))
    }

    fn resume(
        req: &'a Request<'a>,
        dev: &'a dyn Device,
        dir: Direction,
        journal: Journal,
    ) -> Result<Pass<'a>, Error> {
        let paths = &req.paths;
        if journal.sb.direction != dir {
            return Err(Error::WrongDirection {
                device: req.device.display().to_string(),
                found: journal.sb.direction,
            });
        }
        check_journal(req, &journal, dev)?;
        let window = journal.window().map_err(corrupt(&paths.journal))?;
        let finished = window.last().is_some_and(|r| r.is_done(&journal.sb));
        let header = match (
            paths.pending.exists(),
            paths.header.exists(),
            journal.sb.direction,
        ) {
            // Encrypt, and the journal has no record: no byte was written under any key, so the
            // crash came before the pending header was whole (it may be missing or half
            // formatted). Make it again, with the UUID the journal chose.
            (_, false, Direction::Encrypt) if window.is_empty() => {
                new_header(req, journal.sb.sector_size, &journal.sb.luks_uuid)?;
                HeaderAt::Pending
            }
            (true, _, _) => HeaderAt::Pending,
            // Decrypt: the journal was created, the rename of H had not happened yet.
            (false, true, Direction::Decrypt) => {
                rename_durably(&paths.header, &paths.pending)?;
                HeaderAt::Pending
            }
            // Encrypt: renamed already, only the journal's removal was left.
            (false, true, Direction::Encrypt) => HeaderAt::Final,
            (false, false, _) if finished => HeaderAt::Gone,
            (false, false, _) => {
                return Err(Error::HeaderLost {
                    device: req.device.display().to_string(),
                    pending: paths.pending.display().to_string(),
                })
            }
        };
        Ok(Pass {
            req,
            dev,
            journal,
            header,
            resumed: true,
        })
    }

    /// Begin a new pass. `Ok(None)`: there is nothing to do (already in the wanted state).
    fn start(
        req: &'a Request<'a>,
        dev: &'a dyn Device,
        dir: Direction,
    ) -> Result<Option<Pass<'a>>, Error> {
        let paths = &req.paths;
        let stranded = || Error::PendingWithoutJournal {
            device: req.device.display().to_string(),
            pending: paths.pending.display().to_string(),
            journal: paths.journal.display().to_string(),
        };
        match dir {
            Direction::Encrypt if paths.header.exists() => {
                match LuksVolume::new(req.device, Some(&paths.header)).info() {
                    Ok(_) => Ok(None),
                    Err(_) => Err(Error::ForeignFile {
                        path: paths.header.display().to_string(),
                    }),
                }
            }
            _ if paths.pending.exists() => Err(stranded()),
            Direction::Encrypt => Pass::start_encrypt(req, dev).map(Some),
            Direction::Decrypt if !paths.header.exists() => Ok(None),
            Direction::Decrypt => Pass::start_decrypt(req, dev).map(Some),
        }
    }

    fn start_encrypt(req: &'a Request<'a>, dev: &'a dyn Device) -> Result<Pass<'a>, Error> {
        let paths = &req.paths;
        check_plaintext(req)?;
        let sector_size = choose_sector_size(req, dev)?;
        check_space(
            &paths.header,
            LUKS2_HEADER_BYTES + journal::file_size(req.chunk_size, sector_size),
        )?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let sb = superblock(
            req,
            Direction::Encrypt,
            sector_size,
            dev.len(),
            uuid.clone(),
        );
        let journal = create_journal(&paths.journal, sb)?;
        if let Err(e) = new_header(req, sector_size, &uuid) {
            // Nothing was written to the device: the journal (no records) goes too.
            if let Err(undo) = journal.remove() {
                log::warn!(
                    "{} could not be removed after the failed start ({undo}); the next run recreates the header",
                    paths.journal.display()
                );
            }
            return Err(e);
        }
        Ok(Pass {
            req,
            dev,
            journal,
            header: HeaderAt::Pending,
            resumed: false,
        })
    }

    fn start_decrypt(req: &'a Request<'a>, dev: &'a dyn Device) -> Result<Pass<'a>, Error> {
        let paths = &req.paths;
        let vol = LuksVolume::new(req.device, Some(&paths.header));
        // Mid-reencryption, the header's default segment is the *final* one: decrypting by it
        // would scramble the part that is still in its old form.
        if vol.info()?.reencrypt_pending {
            return Err(unsupported(req, "its LUKS2 reencryption is unfinished; finish it first (initcrypt encrypt <name>, or cryptsetup reencrypt --resume-only), then decrypt"));
        }
        let (_, params) = vol.volume_key(req.key, req.key_name)?;
        check_decryptable(req, &params)?;
        let covered = covered_size(req, &params, dev.len())?;
        let sb = superblock(
            req,
            Direction::Decrypt,
            params.sector_size,
            covered,
            params.uuid,
        );
        let journal = create_journal(&paths.journal, sb)?;
        rename_durably(&paths.header, &paths.pending)?;
        Ok(Pass {
            req,
            dev,
            journal,
            header: HeaderAt::Pending,
            resumed: false,
        })
    }

    /// Unlock the header with the key and check it is the journal's; derive the hash seed.
    fn unlock(&mut self) -> Result<Xts, Error> {
        let paths = &self.req.paths;
        let header = match self.header {
            HeaderAt::Pending => &paths.pending,
            _ => &paths.header,
        };
        let (vk, params) = LuksVolume::new(self.req.device, Some(header))
            .volume_key(self.req.key, self.req.key_name)?;
        if params.uuid != self.journal.sb.luks_uuid {
            return Err(Error::ForeignJournal {
                path: paths.journal.display().to_string(),
                found: self.journal.sb.luks_uuid.clone(),
                expected: params.uuid,
            });
        }
        let xts = Xts::new(&vk, self.journal.sb.sector_size as usize)
            .ok_or_else(|| unsupported(self.req, "volume key is not an AES-XTS key"))?;
        self.journal.set_seed(xts.journal_seed());
        Ok(xts)
    }

    /// Recover what may be in flight, run the remaining chunks, publish or drop the header.
    pub fn run(mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<Outcome, Error> {
        let window = self
            .journal
            .window()
            .map_err(corrupt(&self.req.paths.journal))?;
        let finished = window.last().is_some_and(|r| r.is_done(&self.journal.sb));
        if !finished {
            let xts = self.unlock()?;
            let mut engine = Engine {
                dev: self.dev,
                journal: &self.journal,
                xts: &xts,
                plan: plan_of(&self.journal.sb),
                stop: self.req.stop.clone(),
                progress,
            };
            let at: Resume = engine.recover(&window)?;
            (engine.progress)(
                engine.plan.bytes_before(at.index),
                self.journal.sb.device_size,
            );
            engine.run(at)?;
        }
        let bytes = self.journal.sb.device_size;
        let resumed = self.resumed;
        self.finish()?;
        Ok(Outcome {
            bytes,
            resumed,
            already_done: false,
        })
    }

    /// Every chunk is durable: publish the header (encrypt) or drop it (decrypt), then the journal.
    fn finish(self) -> Result<(), Error> {
        let paths = &self.req.paths;
        match (self.journal.sb.direction, self.header) {
            (Direction::Encrypt, HeaderAt::Pending) => {
                rename_durably(&paths.pending, &paths.header)?
            }
            (Direction::Decrypt, HeaderAt::Pending) => std::fs::remove_file(&paths.pending)
                .and_then(|_| sync_dir(&paths.pending))
                .map_err(boot_err(&paths.pending))?,
            _ => {}
        }
        self.journal.remove().map_err(boot_err(&paths.journal))
    }
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
    if dev.len() > j.sb.device_size {
        log::warn!(
            "{} is {} bytes, larger than the {} bytes its unfinished pass covers (it grew); the pass covers the first {} bytes only: grow the filesystem after the pass",
            req.device.display(),
            dev.len(),
            j.sb.device_size,
            j.sb.device_size
        );
    }
    Ok(())
}

fn unsupported(req: &Request, why: &str) -> Error {
    Error::Unsupported {
        device: req.device.display().to_string(),
        why: why.to_string(),
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
        order: Order::Guarded,
        keyed: true,
        sector_size,
        chunk_size: req.chunk_size,
        device_size: size,
        luks_uuid,
        identity: req.identity.clone(),
    }
}

fn create_journal(path: &Path, sb: Superblock) -> Result<Journal, Error> {
    make_dirs(path).map_err(boot_err(path))?;
    Journal::create(path, sb).map_err(boot_err(path))
}

/// The journal is the first file of a pass, so it makes the directories the header path names
/// (`luks/` on a fresh boot partition), each made durable in its parent before anything is
/// written inside it.
fn make_dirs(path: &Path) -> std::io::Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    make_dirs(dir)?;
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    super::journal::sync_dir(dir)
}

/// A new encryption starts only on a device that still shows the plaintext it should hold: the
/// only defence when both the journal and the pending header of an earlier pass were lost.
fn check_plaintext(req: &Request) -> Result<(), Error> {
    if req.expect == Expect::Raw {
        return Ok(());
    }
    let found = blockdev::probe_path(req.device).map_err(|e| e.to_string());
    let found = match found {
        Ok(Some(p)) if p.fstype != "crypto_LUKS" => return Ok(()),
        Ok(Some(_)) => "it already has a LUKS header".to_string(),
        Ok(None) => "no filesystem signature".to_string(),
        Err(e) => format!("unreadable: {e}"),
    };
    Err(Error::NotPlaintext {
        device: req.device.display().to_string(),
        found,
    })
}

/// Our engine handles the layout ADE and stock cryptsetup write for detached headers; anything else
/// is better left to `cryptsetup reencrypt`.
fn check_decryptable(req: &Request, p: &luks::DataParams) -> Result<(), Error> {
    if p.cipher != "aes" || p.mode != "xts-plain64" {
        return Err(unsupported(
            req,
            &format!(
                "cipher {}-{} is not aes-xts-plain64; use cryptsetup reencrypt --decrypt",
                p.cipher, p.mode
            ),
        ));
    }
    if p.data_offset != 0 || p.iv_offset != 0 {
        return Err(unsupported(req, "data offset is not 0 (header not detached in ADE's layout); use cryptsetup reencrypt --decrypt"));
    }
    Ok(())
}

/// The bytes a decryption covers: the LUKS data segment, never simply the device. A fixed segment
/// ends where the header says (past it the device holds plaintext that was never encrypted); a
/// dynamic one ends at the last whole sector (dm-crypt maps no partial sector, so a tail shorter
/// than a sector was never encrypted either).
fn covered_size(req: &Request, p: &luks::DataParams, len: u64) -> Result<u64, Error> {
    let ss = p.sector_size as u64;
    let covered = match p.segment_size {
        Some(size) if size > len => {
            return Err(Error::DeviceSmaller {
                device: req.device.display().to_string(),
                actual: len,
                expected: size,
            })
        }
        Some(size) if size % ss != 0 => {
            return Err(unsupported(
                req,
                &format!("its LUKS segment size {size} is not a multiple of its {ss}-byte sector"),
            ))
        }
        Some(size) => size,
        None => len - len % ss,
    };
    if covered == 0 {
        return Err(unsupported(req, "its LUKS data segment is empty"));
    }
    if covered < len {
        log::warn!(
            "{}: the LUKS segment covers {covered} of its {len} bytes; the last {} bytes were never encrypted and stay as they are",
            req.device.display(),
            len - covered
        );
    }
    Ok(covered)
}

/// The largest sector size that is safe: never above the device's physical block size (a larger
/// sector could be torn by a power cut), a divisor of the device size, and not above the block
/// size of the filesystem on it (ext4 refuses crypt sectors larger than its blocks; a filesystem
/// initcrypt cannot size, FAT included, gets 512, which every filesystem mounts on).
fn choose_sector_size(req: &Request, dev: &dyn Device) -> Result<u32, Error> {
    let physical = blockdev::physical_block_size_of(req.device);
    let limit = physical
        .min(fs_block_size(req.device).unwrap_or(512))
        .clamp(512, 4096);
    let size = match req.sector_size {
        Some(s) if !matches!(s, 512 | 1024 | 2048 | 4096) => {
            return Err(unsupported(
                req,
                &format!("sector size {s} is not 512–4096"),
            ))
        }
        Some(s) if s as u64 > physical => {
            return Err(unsupported(
                req,
                &format!(
                    "sector size {s} is above the device's physical block size (writes could tear)"
                ),
            ))
        }
        Some(s) => s,
        None => [4096u32, 2048, 1024, 512]
            .into_iter()
            .find(|s| *s as u64 <= limit && dev.len().is_multiple_of(*s as u64))
            .unwrap_or(512),
    };
    if !dev.len().is_multiple_of(size as u64) || dev.len() == 0 {
        return Err(unsupported(
            req,
            &format!(
                "size {} is not a multiple of the {size}-byte sector",
                dev.len()
            ),
        ));
    }
    Ok(size)
}

/// The filesystem's block size as libblkid reports it (ext* block size; XFS, FAT and btrfs sector
/// size), if a signature that has one is there.
fn fs_block_size(path: &Path) -> Option<u64> {
    blockdev::probe_path(path)
        .ok()
        .flatten()
        .and_then(|p| p.block_size)
}

/// Format the pending header (a stale partial one from an interrupted start, whose journal has no
/// record, is replaced), durable on disk, with the UUID the journal recorded.
fn new_header(req: &Request, sector_size: u32, uuid: &str) -> Result<(), Error> {
    let pending = &req.paths.pending;
    let err = boot_err(pending);
    let uuid = uuid::Uuid::parse_str(uuid)
        .map_err(|e| err(std::io::Error::other(format!("journal UUID {uuid}: {e}"))))?;
    if let Some(dir) = pending.parent() {
        std::fs::create_dir_all(dir).map_err(&err)?;
    }
    match std::fs::remove_file(pending) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(pending)
        .map_err(&err)?;
    f.set_len(4096).map_err(&err)?;
    let params = FormatParams {
        sector_size,
        uuid,
        pbkdf2_iterations: req.pbkdf2_iterations,
    };
    // The header file lives on the boot partition: an I/O failure while formatting it is a boot
    // partition problem (full, read-only, failing), never the data device's.
    let formatted = LuksVolume::format_detached(pending, req.device, req.key, &params)
        .and_then(|v| v.info())
        .map_err(|e| err(std::io::Error::other(e.to_string())))
        .and_then(|_| f.sync_all().and_then(|_| sync_dir(pending)).map_err(&err));
    if let Err(e) = formatted {
        if let Err(undo) = std::fs::remove_file(pending) {
            log::warn!(
                "{} could not be removed after the failed format: {undo}",
                pending.display()
            );
        }
        return Err(e);
    }
    Ok(())
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
    let st = rustix::fs::statvfs(probe).map_err(|e| boot_err(dir)(e.into()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < needed {
        let msg = format!(
            "{} MiB free, the header and journal need {} MiB",
            free >> 20,
            needed.div_ceil(1 << 20)
        );
        return Err(boot_err(dir)(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            msg,
        )));
    }
    Ok(())
}

fn rename_durably(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::rename(from, to)
        .and_then(|_| sync_dir(to))
        .map_err(boot_err(to))
}
