//! `initcrypt rotate`: replace the passphrase of every encrypted volume so that no volume is ever
//! left without a key the platform holds (ADE lost volumes this way, azure-linux-extensions#2035:
//! unchecked `luksAddKey`, then `luksRemoveKey -q`, then an emptied key file).
//!
//! The order (README "Key rotation" gives the platform's side):
//! 1. **Survey**, read-only. Every header is loaded and each active keyslot is tested with the old
//!    and with the new key. A volume that neither key opens, a LUKS2 reencryption in progress, or a new
//!    key equal to the old one stops the run here: nothing is written.
//! 2. **Enroll**, volume by volume. LUKS1 only: back the header up to the boot partition (fsynced)
//!    before its first change. Add a keyslot for the new key, unlocked with the old key and with the
//!    old slot's PBKDF parameters; fsync; verify in a fresh context that the new key opens the new slot
//!    and the old key still opens its own.
//! 3. **Remove**, only once every volume holds both keys, verified. Volume by volume: verify the new
//!    slot again, destroy each slot the old key opens, fsync, verify that the new key opens the volume
//!    and the old key opens nothing. Slots that neither key opens (an operator's recovery passphrase)
//!    are kept.
//! 4. Wipe and delete the LUKS1 header backups.
//!
//! State lives in the headers alone, no flag file: each volume opens with the old key only, with both,
//! or with the new key only. A run after a power cut (same arguments) goes forward from whatever mix it
//! finds: it enrolls where the new key is missing, then removes the old key everywhere. A failure (an
//! error, not a power cut) rolls every volume back to the old key only, last volume first: LUKS1
//! headers from their backup, LUKS2 by keyslot operations that again never remove a slot before
//! another has just been verified. A failed rollback is reported next to the failure.
//!
//! `rotate` (the core) takes explicit volumes and keys so tests drive it on image files; `run` is the
//! thin system layer: volumes.json, key volumes, the boot partition.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use zeroize::Zeroizing;

use crate::boot::{self, Access, Observed};
use crate::config::{self, BootParams, Header};
use crate::exit::{Classify, Exit};
use crate::keyvol::{self, KeyVolume, KeyVolumes};
use crate::luks::{self, LuksVolume};
use crate::secret::Secret;

/// Suffix of a LUKS1 header backup (next to a detached header, or under `/boot/luks/`).
pub const BACKUP_SUFFIX: &str = ".rotate-backup";
/// Where the backup of an attached LUKS1 header goes in the running system: the boot partition,
/// plaintext and mounted before anything is opened, like our detached headers.
const ATTACHED_BACKUP_DIR: &str = "/boot/luks";
/// The key volume the VM booted with is attached already: waiting longer only delays the error.
const OLD_KEYVOL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    KeyVolume(#[from] keyvol::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error("{name}: {source}")]
    Luks { name: String, source: luks::Error },
    #[error("--new-key-volume and --new-key-file: give exactly one")]
    Usage,
    #[error("cannot read the new key file {path}: {source}; pass an existing, non-empty file")]
    NewKeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the key volume the VM booted with is not attached (only the new one, {new}); rotate needs the old key too — reattach it, nothing was written")]
    NoOldKeyVolume { new: String },
    #[error("{name}: the new key is the old key ({from}); attach the key volume holding the new keys — nothing was written")]
    SameKey { name: String, from: String },
    #[error("{name}: neither the old key ({old}) nor the new key ({new}) opens {header}; check both key volumes — nothing was written")]
    NeitherKey {
        name: String,
        header: String,
        old: String,
        new: String,
    },
    #[error("{name}: {device} is being encrypted or decrypted (unfinished pass or LUKS2 reencryption); finish it first (reboot, or `initcrypt encrypt {name}`), then rotate — nothing was written")]
    Busy { name: String, device: String },
    #[error("{name}: {dir} is not on a persistent filesystem, so the backup of its LUKS1 header would not survive a power cut; run rotate from the booted system with the boot partition on /boot — nothing was written")]
    VolatileBackup { name: String, dir: String },
    #[error("{name}: {what}: {source}")]
    Step {
        name: String,
        what: String,
        source: luks::Error,
    },
    #[error("{name}: {what}")]
    Verify { name: String, what: String },
    #[error("{name}: LUKS1 header backup {path}: {source}; free space on the boot partition or make it writable")]
    Backup {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{name}: injected failure after {what}")]
    Injected { name: String, what: String },
    #[error("{cause}; rolled back: every volume opens with the old key only, as before — keep the old key volume, fix the cause and run rotate again")]
    RolledBack { cause: Box<Error> },
    #[error("rollback failed too: {rollback}; every volume still opens with the old key or the new one — keep both key volumes attached and run `initcrypt rotate` again")]
    RollbackFailed {
        cause: Box<Error>,
        rollback: Box<Error>,
    },
    #[error("rotated, but {path} (a LUKS1 header backup the old key opens) could not be removed: {source}; delete it, or run rotate again")]
    BackupLeft {
        path: String,
        source: std::io::Error,
    },
    #[error("interrupted (test hook)")]
    Interrupted,
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Config(e) => e.exit(),
            Error::KeyVolume(e) => e.exit(),
            Error::Boot(e) => e.exit(),
            Error::Luks { source, .. } => source.exit(),
            Error::Usage | Error::SameKey { .. } => Exit::Usage,
            Error::NewKeyFile { .. } | Error::NeitherKey { .. } => Exit::KeyRejected,
            Error::NoOldKeyVolume { .. } => Exit::KeyVolumeMissing,
            Error::Busy { .. } | Error::VolatileBackup { .. } => Exit::LayoutUnsupported,
            Error::RolledBack { cause } | Error::RollbackFailed { cause, .. } => cause.exit(),
            Error::Step { .. }
            | Error::Verify { .. }
            | Error::Backup { .. }
            | Error::Injected { .. }
            | Error::BackupLeft { .. }
            | Error::Interrupted => Exit::PassFailed,
        }
    }
}

/// One volume to rotate, with both of its keys.
pub struct Target {
    pub name: String,
    pub volume: LuksVolume,
    pub old: Secret,
    pub new: Secret,
    /// Where the old and the new key came from (messages only, never the bytes).
    pub old_source: String,
    pub new_source: String,
    /// Where the LUKS1 header backup goes (on the boot partition); unused for LUKS2.
    pub backup: PathBuf,
}

/// Which key opens a keyslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Holder {
    Old,
    New,
    /// Neither: an operator's recovery passphrase, say. Kept.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub slot: u32,
    pub key: Holder,
}

/// What one volume held before and after the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeReport {
    pub name: String,
    pub header: String,
    pub luks: u8,
    pub before: Vec<Slot>,
    pub after: Vec<Slot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub volumes: Vec<VolumeReport>,
}

/// A step boundary: everything before it is durable. The hook sees each one (progress lines; tests
/// inject a failure or a crash there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A damaged LUKS1 header was replaced by its backup (found at the start, or in a rollback).
    Restored {
        volume: usize,
    },
    BackedUp {
        volume: usize,
    },
    Enrolled {
        volume: usize,
        slot: u32,
    },
    /// The new key opens `slot` and the old key still opens its own.
    Verified {
        volume: usize,
        slot: u32,
    },
    Removed {
        volume: usize,
        slot: u32,
    },
    /// The old key opens nothing any more; the new key opens `slot`.
    Finished {
        volume: usize,
        slot: u32,
    },
    BackupDeleted {
        volume: usize,
    },
    /// Rollback: the old key enrolled again where it had been removed.
    ReEnrolledOld {
        volume: usize,
        slot: u32,
    },
    /// Rollback: a keyslot of the new key destroyed.
    RemovedNew {
        volume: usize,
        slot: u32,
    },
    /// Rollback: the volume opens with the old key only.
    RolledBack {
        volume: usize,
    },
}

impl Step {
    pub fn volume(&self) -> usize {
        match *self {
            Step::Restored { volume }
            | Step::BackedUp { volume }
            | Step::Enrolled { volume, .. }
            | Step::Verified { volume, .. }
            | Step::Removed { volume, .. }
            | Step::Finished { volume, .. }
            | Step::BackupDeleted { volume }
            | Step::ReEnrolledOld { volume, .. }
            | Step::RemovedNew { volume, .. }
            | Step::RolledBack { volume } => volume,
        }
    }
}

/// What a hook can do at a step boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupt {
    /// Fail as if the step after this one had failed: the run rolls back.
    Fail,
    /// Stop dead, as a power cut would: no rollback, no clean-up.
    Crash,
}

pub type Hook<'a> = dyn FnMut(&Step) -> Result<(), Interrupt> + 'a;

/// Keyslots of one header, each tested with both keys.
#[derive(Debug, Clone)]
struct Survey {
    version: u8,
    slots: Vec<Slot>,
}

impl Survey {
    fn of(&self, who: Holder) -> Vec<u32> {
        self.slots
            .iter()
            .filter(|s| s.key == who)
            .map(|s| s.slot)
            .collect()
    }
}

/// Why the run stopped before its end.
enum Stop {
    Crash,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// Rotate every target from its old key to its new key (module docs: order, crash and failure
/// behaviour). `hook` sees every step boundary.
pub fn rotate(targets: &[Target], hook: &mut Hook) -> Result<Report, Error> {
    let mut before = Vec::with_capacity(targets.len());
    for t in targets {
        before.push(preflight(t)?);
    }
    let mut run = Run {
        targets,
        hook,
        known: before.clone(),
        before,
    };
    match run.forward() {
        Ok(()) => {}
        Err(Stop::Crash) => return Err(Error::Interrupted),
        Err(Stop::Failed(cause)) => {
            return Err(match run.rollback() {
                Ok(()) => Error::RolledBack {
                    cause: Box::new(cause),
                },
                Err(Stop::Crash) => Error::Interrupted,
                Err(Stop::Failed(rollback)) => Error::RollbackFailed {
                    cause: Box::new(cause),
                    rollback: Box::new(rollback),
                },
            })
        }
    }
    // Step 4. The rotation is complete: a backup that cannot be removed is reported (the next run
    // removes it), never a reason to roll back.
    for i in 0..targets.len() {
        match run.delete_backup(i) {
            Ok(()) => {}
            Err(Stop::Crash) => return Err(Error::Interrupted),
            Err(Stop::Failed(e)) => return Err(e),
        }
    }
    let volumes = targets
        .iter()
        .zip(run.before)
        .zip(run.known)
        .map(|((t, b), now)| VolumeReport {
            name: t.name.clone(),
            header: t.volume.header_file().display().to_string(),
            luks: now.version,
            before: b.slots,
            after: now.slots,
        })
        .collect();
    Ok(Report { volumes })
}

fn luks_err(t: &Target) -> impl Fn(luks::Error) -> Error + '_ {
    move |e| Error::Luks {
        name: t.name.clone(),
        source: e,
    }
}

/// Read a header and test each active keyslot with both keys.
fn survey(t: &Target) -> Result<Survey, luks::Error> {
    let info = t.volume.info()?;
    let active = t.volume.active_keyslots()?;
    let old = t.volume.slots_opened_by(&t.old, &active)?;
    let rest: Vec<u32> = active
        .iter()
        .copied()
        .filter(|s| !old.contains(s))
        .collect();
    let new = t.volume.slots_opened_by(&t.new, &rest)?;
    let slots = active
        .iter()
        .map(|&slot| Slot {
            slot,
            key: if old.contains(&slot) {
                Holder::Old
            } else if new.contains(&slot) {
                Holder::New
            } else {
                Holder::Other
            },
        })
        .collect();
    Ok(Survey {
        version: info.version,
        slots,
    })
}

/// The LUKS1 backup, if it exists and is a header of this volume that `key` opens: a backup that
/// no key we hold opens (left by an older rotation) is never restored.
fn backup_opening(t: &Target, key: &Secret) -> Option<LuksVolume> {
    if !t.backup.exists() {
        return None;
    }
    let b = LuksVolume::new(t.volume.data_device(), Some(&t.backup));
    let info = b.info().ok()?;
    if info.version != 1 {
        return None;
    }
    if let Ok(current) = t.volume.info() {
        if current.uuid != info.uuid {
            return None;
        }
    }
    b.check_key(key, &t.name).ok().map(|_| b)
}

/// Step 1 for one volume: read-only. A LUKS1 header that neither key opens (a torn write) but whose
/// backup the old key opens is reported as needing a restore: `survey.slots` is then empty.
fn preflight(t: &Target) -> Result<Survey, Error> {
    if t.old == t.new {
        return Err(Error::SameKey {
            name: t.name.clone(),
            from: t.new_source.clone(),
        });
    }
    let info = t.volume.info();
    if let Ok(i) = &info {
        if i.reencrypt_pending {
            return Err(Error::Busy {
                name: t.name.clone(),
                device: t.volume.data_device().display().to_string(),
            });
        }
    }
    let surveyed = info.and_then(|_| survey(t));
    match surveyed {
        Ok(s) if !s.slots.iter().all(|s| s.key == Holder::Other) => Ok(s),
        other => {
            if backup_opening(t, &t.old).is_some() {
                log::warn!(
                    "{}: the header {} opens with neither key; its LUKS1 backup {} will be restored",
                    t.name,
                    t.volume.header_file().display(),
                    t.backup.display()
                );
                return Ok(Survey {
                    version: 1,
                    slots: Vec::new(),
                });
            }
            match other {
                Err(e) => Err(luks_err(t)(e)),
                Ok(_) => Err(Error::NeitherKey {
                    name: t.name.clone(),
                    header: t.volume.header_file().display().to_string(),
                    old: t.old_source.clone(),
                    new: t.new_source.clone(),
                }),
            }
        }
    }
}

struct Run<'t, 'h, 'a> {
    targets: &'t [Target],
    hook: &'h mut Hook<'a>,
    /// Each header's keyslots as the last survey and our own writes since left them: the
    /// forward steps test only what changed, because every keyslot test costs a PBKDF (seconds
    /// and up to 1 GiB for an argon2 slot of ADE's).
    known: Vec<Survey>,
    /// The keyslots found at the start (after a damaged LUKS1 header was restored), for the report.
    before: Vec<Survey>,
}

impl Run<'_, '_, '_> {
    fn step(&mut self, step: Step, what: &str) -> Result<(), Stop> {
        match (self.hook)(&step) {
            Ok(()) => Ok(()),
            Err(Interrupt::Crash) => Err(Stop::Crash),
            Err(Interrupt::Fail) => Err(Stop::Failed(Error::Injected {
                name: self.targets[step.volume()].name.clone(),
                what: what.to_string(),
            })),
        }
    }

    fn forward(&mut self) -> Result<(), Stop> {
        for i in 0..self.targets.len() {
            if self.known[i].slots.is_empty() {
                self.restore(i)?;
                self.known[i] = self.survey(i)?;
                self.before[i] = self.known[i].clone();
            }
            self.enroll(i)?;
        }
        for i in 0..self.targets.len() {
            self.remove_old(i)?;
        }
        Ok(())
    }

    fn survey(&self, i: usize) -> Result<Survey, Error> {
        let t = &self.targets[i];
        survey(t).map_err(luks_err(t))
    }

    /// A header write's outcome, made durable (fsync) before anything else happens.
    fn write<T>(&self, i: usize, what: &str, r: Result<T, luks::Error>) -> Result<T, Error> {
        let t = &self.targets[i];
        r.and_then(|v| t.volume.sync_header().map(|()| v))
            .map_err(|e| Error::Step {
                name: t.name.clone(),
                what: what.to_string(),
                source: e,
            })
    }

    fn opens(&self, i: usize, key: &Secret, slot: u32) -> Result<bool, Error> {
        let t = &self.targets[i];
        t.volume.key_opens_slot(key, slot).map_err(luks_err(t))
    }

    fn verify(&self, i: usize, ok: bool, what: impl FnOnce() -> String) -> Result<(), Error> {
        if ok {
            return Ok(());
        }
        Err(Error::Verify {
            name: self.targets[i].name.clone(),
            what: what(),
        })
    }

    /// Replace a LUKS1 header by its backup, which the old key opens, then check it.
    fn restore(&mut self, i: usize) -> Result<(), Stop> {
        let t = &self.targets[i];
        let what = format!("restoring the header from {}", t.backup.display());
        self.write(i, &what, t.volume.restore_luks1_header(&t.backup))?;
        let ok = t.volume.check_key(&t.old, &t.name).is_ok();
        self.verify(i, ok, || {
            format!(
                "the old key does not open the header restored from {}",
                t.backup.display()
            )
        })?;
        self.step(Step::Restored { volume: i }, "restoring the LUKS1 header")
    }

    /// Step 2 for one volume: the new key in a keyslot of its own, verified.
    fn enroll(&mut self, i: usize) -> Result<(), Stop> {
        let t = &self.targets[i];
        let s = self.known[i].clone();
        if let Some(&slot) = s.of(Holder::New).first() {
            // A previous run enrolled it already; the survey verified it.
            return self.step(Step::Verified { volume: i, slot }, "verifying the new key");
        }
        let Some(&old_slot) = s.of(Holder::Old).first() else {
            return Err(Error::Verify {
                name: t.name.clone(),
                what: "the old key opens no keyslot any more".into(),
            }
            .into());
        };
        if s.version == 1 {
            self.ensure_backup(i)?;
        }
        let slot = self.write(
            i,
            "adding a keyslot for the new key",
            t.volume.add_keyslot_like(&t.old, &t.new, old_slot),
        )?;
        self.known[i].slots.push(Slot {
            slot,
            key: Holder::New,
        });
        self.step(Step::Enrolled { volume: i, slot }, "adding the new keyslot")?;
        let new_ok = self.opens(i, &t.new, slot)?;
        self.verify(i, new_ok, || {
            format!("keyslot {slot} does not open with the new key after it was added")
        })?;
        let old_ok = self.opens(i, &t.old, old_slot)?;
        self.verify(i, old_ok, || {
            format!("keyslot {old_slot} no longer opens with the old key after keyslot {slot} was added")
        })?;
        self.step(
            Step::Verified { volume: i, slot },
            "verifying the new keyslot",
        )
    }

    /// Write the LUKS1 backup unless one the old key opens exists: through a temporary file,
    /// fsynced, renamed, directory fsynced, so the backup is either whole or absent.
    fn ensure_backup(&mut self, i: usize) -> Result<(), Stop> {
        let t = &self.targets[i];
        if backup_opening(t, &t.old).is_some() {
            return Ok(());
        }
        let err = |e: std::io::Error| Error::Backup {
            name: t.name.clone(),
            path: t.backup.display().to_string(),
            source: e,
        };
        if t.backup.exists() {
            log::info!(
                "{}: {} is a stale backup (no key we hold opens it); replacing it",
                t.name,
                t.backup.display()
            );
            wipe_and_remove(&t.backup).map_err(err)?;
        }
        if let Some(dir) = t.backup.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = with_suffix(&t.backup, ".tmp");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e).into()),
            _ => {}
        }
        t.volume.backup_header(&tmp).map_err(|e| Error::Step {
            name: t.name.clone(),
            what: format!("backing up the LUKS1 header to {}", tmp.display()),
            source: e,
        })?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &t.backup))
            .and_then(|()| sync_dir(&t.backup))
            .map_err(err)?;
        self.step(Step::BackedUp { volume: i }, "backing up the LUKS1 header")
    }

    /// Step 3 for one volume: every keyslot of the old key destroyed, each only after the new
    /// key's slot has just been verified.
    fn remove_old(&mut self, i: usize) -> Result<(), Stop> {
        let t = &self.targets[i];
        let s = self.known[i].clone();
        let Some(&new_slot) = s.of(Holder::New).first() else {
            return Err(Error::Verify {
                name: t.name.clone(),
                what: "no keyslot opens with the new key; the old key stays".into(),
            }
            .into());
        };
        let old_slots = s.of(Holder::Old);
        for &old_slot in &old_slots {
            let ok = self.opens(i, &t.new, new_slot)?;
            self.verify(i, ok, || {
                format!("keyslot {new_slot} no longer opens with the new key; keyslot {old_slot} of the old key stays")
            })?;
            let what = format!("removing keyslot {old_slot} of the old key");
            self.write(i, &what, t.volume.destroy_keyslot(old_slot))?;
            self.known[i].slots.retain(|x| x.slot != old_slot);
            self.step(
                Step::Removed {
                    volume: i,
                    slot: old_slot,
                },
                &what,
            )?;
        }
        if !old_slots.is_empty() {
            let new_ok = self.opens(i, &t.new, new_slot)?;
            self.verify(i, new_ok, || {
                format!("keyslot {new_slot} does not open with the new key after the old key was removed")
            })?;
            if let Ok(slot) = t.volume.check_key(&t.old, &t.name) {
                return Err(Error::Verify {
                    name: t.name.clone(),
                    what: format!("the old key still opens keyslot {slot} after its removal"),
                }
                .into());
            }
        }
        self.step(
            Step::Finished {
                volume: i,
                slot: new_slot,
            },
            "removing the old key",
        )
    }

    fn delete_backup(&mut self, i: usize) -> Result<(), Stop> {
        let t = &self.targets[i];
        // Whatever key it opens (an older rotation's, too): once every volume holds the new key
        // only, a backup is only a copy of a keyslot the platform forgets.
        if !t.backup.exists() {
            return Ok(());
        }
        wipe_and_remove(&t.backup).map_err(|e| Error::BackupLeft {
            path: t.backup.display().to_string(),
            source: e,
        })?;
        self.step(
            Step::BackupDeleted { volume: i },
            "deleting the LUKS1 backup",
        )
    }

    /// Bring every volume back to the old key only, in the forward order's mirror image: first the
    /// old key is made to open every volume again (re-enrolled where it was removed; the new key
    /// still opens them all meanwhile), then the new key's slots go, last volume first. So at every
    /// instant one of the two keys opens every volume, as during the forward run.
    fn rollback(&mut self) -> Result<(), Stop> {
        for i in (0..self.targets.len()).rev() {
            // Stop at the first failure: removing the new key elsewhere would leave volumes that
            // only the new key opens next to volumes that only the old key opens.
            self.rollback_enroll_old(i)?;
        }
        let mut first = None;
        for i in (0..self.targets.len()).rev() {
            match self.rollback_remove_new(i) {
                Ok(()) => {}
                Err(Stop::Crash) => return Err(Stop::Crash),
                Err(Stop::Failed(e)) => {
                    log::error!("rollback: {e}");
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(Stop::Failed(e));
        }
        for t in self.targets {
            if t.backup.exists() {
                if let Err(e) = wipe_and_remove(&t.backup) {
                    log::warn!("cannot remove {}: {e}", t.backup.display());
                }
            }
        }
        Ok(())
    }

    /// The header's keyslots now; a LUKS1 header that neither key opens is first restored from
    /// its backup (the only way it opens again).
    fn rollback_survey(&mut self, i: usize) -> Result<Survey, Stop> {
        let t = &self.targets[i];
        match survey(t) {
            Ok(s) if !s.slots.iter().all(|x| x.key == Holder::Other) => return Ok(s),
            Ok(_) | Err(_) if backup_opening(t, &t.old).is_some() => {
                self.restore(i)?;
            }
            Ok(_) => {
                return Err(Error::NeitherKey {
                    name: t.name.clone(),
                    header: t.volume.header_file().display().to_string(),
                    old: t.old_source.clone(),
                    new: t.new_source.clone(),
                }
                .into())
            }
            Err(e) => return Err(luks_err(t)(e).into()),
        }
        Ok(self.survey(i)?)
    }

    /// Rollback, first half: the old key opens volume `i` again.
    fn rollback_enroll_old(&mut self, i: usize) -> Result<(), Stop> {
        let s = self.rollback_survey(i)?;
        if s.of(Holder::Old).is_empty() {
            self.re_enroll_old(i, &s)?;
        }
        Ok(())
    }

    /// Rollback, second half: the new key opens volume `i` no more. A LUKS1 header goes back to
    /// its backup (byte for byte what it was); a LUKS2 header loses the new key's slots, each
    /// destroyed only after the old key's slot has just been verified.
    fn rollback_remove_new(&mut self, i: usize) -> Result<(), Stop> {
        let t = &self.targets[i];
        let s = self.rollback_survey(i)?;
        if s.of(Holder::New).is_empty() {
            return Ok(());
        }
        let Some(&old_slot) = s.of(Holder::Old).first() else {
            return Err(Error::Verify {
                name: t.name.clone(),
                what: "the old key opens no keyslot; the new key stays".into(),
            }
            .into());
        };
        if s.version == 1 && backup_opening(t, &t.old).is_some() {
            self.restore(i)?;
        } else {
            for new_slot in s.of(Holder::New) {
                let ok = self.opens(i, &t.old, old_slot)?;
                self.verify(i, ok, || {
                    format!("keyslot {old_slot} does not open with the old key; keyslot {new_slot} of the new key stays")
                })?;
                let what = format!("removing keyslot {new_slot} of the new key");
                self.write(i, &what, t.volume.destroy_keyslot(new_slot))?;
                self.step(
                    Step::RemovedNew {
                        volume: i,
                        slot: new_slot,
                    },
                    &what,
                )?;
            }
        }
        let s = self.survey(i)?;
        let ok = s.of(Holder::New).is_empty() && !s.of(Holder::Old).is_empty();
        self.verify(i, ok, || {
            "after the rollback the volume does not open with the old key only".into()
        })?;
        self.step(Step::RolledBack { volume: i }, "rolling back")
    }

    /// Rollback of a volume whose old key was removed already: enroll it again (unlocked with the
    /// new key), verified, before anything of the new key goes.
    fn re_enroll_old(&mut self, i: usize, s: &Survey) -> Result<u32, Stop> {
        let t = &self.targets[i];
        let Some(&like) = s.of(Holder::New).first() else {
            return Err(Error::Verify {
                name: t.name.clone(),
                what: "neither key opens a keyslot".into(),
            }
            .into());
        };
        let slot = self.write(
            i,
            "adding a keyslot for the old key again",
            t.volume.add_keyslot_like(&t.new, &t.old, like),
        )?;
        let ok = self.opens(i, &t.old, slot)?;
        self.verify(i, ok, || {
            format!("keyslot {slot} does not open with the old key after it was added again")
        })?;
        self.step(
            Step::ReEnrolledOld { volume: i, slot },
            "enrolling the old key again",
        )?;
        Ok(slot)
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Overwrite with zeros, fsync, unlink, fsync the directory: the backup's keyslot opens with a key
/// the platform is about to forget, and an unlinked file's blocks keep their bytes.
fn wipe_and_remove(path: &Path) -> std::io::Result<()> {
    let len = std::fs::metadata(path)?.len();
    let mut f = OpenOptions::new().write(true).open(path)?;
    let zeros = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    drop(f);
    std::fs::remove_file(path)?;
    sync_dir(path)
}

impl Report {
    /// `--json`: `{"result": "rotated", "volumes": [{"name", "header", "luks", "before": [{"slot",
    /// "key": "old|new|other"}], "after": [...]}]}`, fields in this order (a struct, not json!{}).
    pub fn json(&self) -> String {
        #[derive(Serialize)]
        struct Output<'a> {
            result: &'static str,
            volumes: &'a [VolumeReport],
        }
        let doc = Output {
            result: "rotated",
            volumes: &self.volumes,
        };
        // Plain strings, numbers and enums: serialising cannot fail.
        serde_json::to_string(&doc).unwrap_or_default()
    }

    /// One line per volume: what it held and what it holds now.
    pub fn lines(&self) -> Vec<String> {
        self.volumes
            .iter()
            .map(|v| {
                let slots = |list: &[Slot], who: Holder| -> Vec<String> {
                    list.iter()
                        .filter(|s| s.key == who)
                        .map(|s| s.slot.to_string())
                        .collect()
                };
                let new_after = slots(&v.after, Holder::New).join(",");
                let old_before = slots(&v.before, Holder::Old);
                let new_before = slots(&v.before, Holder::New);
                let kept = slots(&v.after, Holder::Other);
                let done = match (old_before.is_empty(), new_before.is_empty()) {
                    (true, _) => format!("already rotated: new key in keyslot {new_after}"),
                    (false, true) => format!(
                        "new key in keyslot {new_after}; old key removed from keyslot {}",
                        old_before.join(",")
                    ),
                    (false, false) => format!(
                        "new key in keyslot {new_after} (enrolled by an earlier run); old key removed from keyslot {}",
                        old_before.join(",")
                    ),
                };
                let kept = if kept.is_empty() {
                    String::new()
                } else {
                    format!("; keyslot {} (neither key) kept", kept.join(","))
                };
                format!("{}: {done}{kept} (LUKS{}, {})", v.name, v.luks, v.header)
            })
            .collect()
    }
}

/// `rotate --new-key-volume DEV | --new-key-file F`, as the CLI gives it.
pub struct Args<'a> {
    pub new_key_volume: Option<&'a Path>,
    pub new_key_file: Option<&'a Path>,
    pub json: bool,
}

/// Where the new keys come from.
enum NewKeys {
    Volume(KeyVolume),
    File { path: String, key: Secret },
}

impl NewKeys {
    fn key_for(&self, key_file: &str) -> Result<(Secret, String), Error> {
        match self {
            NewKeys::Volume(kv) => {
                let name = kv.resolve_name(key_file)?;
                Ok((kv.key_for(key_file)?, format!("{name} on {}", kv.device)))
            }
            NewKeys::File { path, key } => Ok((
                Secret::new(Zeroizing::new(key.expose().to_vec())),
                path.clone(),
            )),
        }
    }
}

fn read_new_key_file(path: &Path) -> Result<Secret, Error> {
    let err = |e| Error::NewKeyFile {
        path: path.display().to_string(),
        source: e,
    };
    let bytes = Zeroizing::new(std::fs::read(path).map_err(err)?);
    if bytes.is_empty() {
        return Err(err(std::io::Error::other("empty")));
    }
    if bytes.last() == Some(&b'\n') {
        log::warn!(
            "{} ends with a newline, which is part of the key; the platform must hand out exactly these bytes",
            path.display()
        );
    }
    Ok(Secret::new(bytes))
}

/// The whole disk a key volume lives on (sysfs), or the file itself: the new key volume is
/// told apart from the old one by it, whether DEV names the disk or its partition.
fn disk_of(path: &Path) -> Option<PathBuf> {
    let st = rustix::fs::stat(path).ok()?;
    if (st.st_mode & libc::S_IFMT) != libc::S_IFBLK {
        return std::fs::canonicalize(path).ok();
    }
    let (maj, min) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    if sys.join("partition").exists() {
        return sys.parent().map(Path::to_path_buf);
    }
    Some(sys)
}

/// The key volume(s) the VM booted with: every key volume attached except the new one.
fn old_key_volumes(new: Option<&Path>, wait: Duration) -> Result<KeyVolumes, Error> {
    let all = keyvol::find(wait)?;
    let new_disk = new.and_then(disk_of);
    let old: Vec<KeyVolume> = all
        .0
        .into_iter()
        .filter(|kv| new_disk.is_none() || disk_of(Path::new(&kv.device)) != new_disk)
        .collect();
    if old.is_empty() {
        return Err(Error::NoOldKeyVolume {
            new: new.map(|p| p.display().to_string()).unwrap_or_default(),
        });
    }
    Ok(KeyVolumes(old))
}

/// tmpfs and ramfs (the initramfs root) lose a backup at the first power cut.
fn is_volatile(dir: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let probe = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    match rustix::fs::statfs(probe) {
        // f_type is a c_long on x86_64 but not on every architecture.
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => matches!(s.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC),
        Err(_) => true,
    }
}

/// The system layer: volumes.json (and ADE's command line), key volumes, the boot partition.
pub fn run(config_path: &Path, params: &BootParams, args: &Args) -> Result<(), Error> {
    let new_keys = match (args.new_key_volume, args.new_key_file) {
        (Some(dev), None) => NewKeys::Volume(keyvol::open_path(dev)?),
        (None, Some(f)) => NewKeys::File {
            path: f.display().to_string(),
            key: read_new_key_file(f)?,
        },
        _ => return Err(Error::Usage),
    };
    let volumes = config::load(config_path, params)?;
    let mut located = Vec::new();
    for v in &volumes {
        let loc = boot::locate(v, params.keyvol_timeout, Access::ReadWrite)?;
        let node = loc.dev.checked_node().map_err(boot::Error::from)?;
        match boot::observe(v, &loc)? {
            Observed::Plaintext { .. } => {
                log::info!("{}: not encrypted; nothing to rotate", v.name);
                continue;
            }
            Observed::Unfinished { .. } => {
                return Err(Error::Busy {
                    name: v.name.clone(),
                    device: node.display().to_string(),
                })
            }
            Observed::Encrypted(_) | Observed::Open { .. } => {}
        }
        located.push((v, node, loc));
    }
    if located.is_empty() {
        println!("no encrypted volume; nothing to rotate");
        return Ok(());
    }
    let old_keys = old_key_volumes(
        args.new_key_volume,
        params.keyvol_timeout.min(OLD_KEYVOL_WAIT),
    )?;
    let old_devices: Vec<&str> = old_keys.0.iter().map(|k| k.device.as_str()).collect();
    let old_devices = old_devices.join(", ");
    let mut targets = Vec::new();
    for (v, node, loc) in &located {
        let volume = LuksVolume::new(node, loc.header.as_deref());
        let info = volume.info().map_err(|e| Error::Luks {
            name: v.name.clone(),
            source: e,
        })?;
        let backup = match (&v.header, &loc.header) {
            (Header::Detached { .. }, Some(h)) => with_suffix(h, BACKUP_SUFFIX),
            _ => Path::new(ATTACHED_BACKUP_DIR).join(format!("{}{BACKUP_SUFFIX}", v.name)),
        };
        if info.version == 1 && is_volatile(backup.parent().unwrap_or(Path::new("/"))) {
            return Err(Error::VolatileBackup {
                name: v.name.clone(),
                dir: backup
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            });
        }
        let (new, new_source) = new_keys.key_for(&v.key_file)?;
        targets.push(Target {
            name: v.name.clone(),
            volume,
            old: old_keys.key_for(&v.key_file)?,
            new,
            old_source: format!("{} on {old_devices}", v.key_file),
            new_source,
            backup,
        });
    }
    let mut hook = |s: &Step| {
        log_step(&targets_names(&targets), s);
        Ok(())
    };
    let report = match rotate(&targets, &mut hook) {
        Ok(r) => r,
        Err(Error::RollbackFailed { cause, rollback }) => {
            log::error!("{cause}");
            return Err(Error::RollbackFailed { cause, rollback });
        }
        Err(e) => return Err(e),
    };
    print_report(&report, args.json);
    Ok(())
}

fn targets_names(targets: &[Target]) -> Vec<&str> {
    targets.iter().map(|t| t.name.as_str()).collect()
}

/// Progress on stderr and the kernel log: one line per durable step.
fn log_step(names: &[&str], s: &Step) {
    let name = names.get(s.volume()).copied().unwrap_or("?");
    match *s {
        Step::Restored { .. } => {
            log::info!("rotate: {name}: LUKS1 header restored from its backup")
        }
        Step::BackedUp { .. } => log::info!("rotate: {name}: LUKS1 header backed up"),
        Step::Enrolled { slot, .. } => {
            log::info!("rotate: {name}: new key added in keyslot {slot}")
        }
        Step::Verified { slot, .. } => {
            log::info!("rotate: {name}: keyslot {slot} opens with the new key (verified)")
        }
        Step::Removed { slot, .. } => {
            log::info!("rotate: {name}: old key removed from keyslot {slot}")
        }
        Step::Finished { slot, .. } => {
            log::info!(
                "rotate: {name}: the old key opens nothing, the new key opens keyslot {slot}"
            )
        }
        Step::BackupDeleted { .. } => log::info!("rotate: {name}: LUKS1 header backup deleted"),
        Step::ReEnrolledOld { slot, .. } => {
            log::info!("rotate: {name}: rollback: old key enrolled again in keyslot {slot}")
        }
        Step::RemovedNew { slot, .. } => {
            log::info!("rotate: {name}: rollback: new key removed from keyslot {slot}")
        }
        Step::RolledBack { .. } => log::info!("rotate: {name}: rolled back to the old key only"),
    }
}

/// What the platform may do now.
pub const DONE_LINE: &str =
    "rotated: every volume opens with the new key only; the old key volume may be detached now";

fn print_report(report: &Report, json: bool) {
    if json {
        println!("{}", report.json());
        return;
    }
    for line in report.lines() {
        println!("{line}");
    }
    println!("{DONE_LINE}");
}
