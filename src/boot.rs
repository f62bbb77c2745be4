//! The boot step: reconcile each volume's desired state with what its disk is (design §2): run or
//! resume the in-place pass where one is wanted or unfinished, then open what is encrypted.
//!
//! Observation is shared with `status`, so the two can never disagree about a disk. The pass runs
//! here, before sysroot.mount, because nothing else can hold the root filesystem open yet.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::blockdev::{self, BlockDev, TempMount};
use crate::config::{self, BootParams, Desired, Header, Role, Volume};
use crate::exit::{Classify, Exit};
use crate::keyvol::{self, KeyVolumes};
use crate::luks::{self, Info, LuksVolume};
use crate::pass::{self, Direction};
use crate::secret::Secret;

/// Private mount points for boot partitions live here, never under /boot or /sysroot.
const RUN_DIR: &str = "/run/initcrypt";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    KeyVolume(#[from] keyvol::Error),
    #[error(transparent)]
    Block(#[from] blockdev::Error),
    #[error(transparent)]
    Luks(#[from] luks::Error),
    #[error("{name}: {source}")]
    Pass { name: String, source: pass::Error },
    #[error("{name}: the in-place pass needs a detached header (header.boot_uuid/path in volumes.json); a volume with its header on the disk is neither encrypted nor decrypted in place by initcrypt (use `cryptsetup reencrypt` offline)")]
    NeedsDetachedHeader { name: String },
    #[error("{name}: {device} is in use ({what}); initcrypt only touches a device nothing holds — boot without mounting it or check the crypttab/fstab entries")]
    Busy {
        name: String,
        device: String,
        what: String,
    },
    #[error(
        "{name}: no key volume (see the key volume error on another line); attach the BEK volume and reboot"
    )]
    NoKeyVolume { name: String, exit: Exit },
    #[error("{name}: {device} has neither a LUKS header nor a filesystem initcrypt recognises, and the header {header} is missing; restore the header or check volumes.json")]
    Unrecognised {
        name: String,
        device: String,
        header: String,
    },
    #[error("{source} [the OS volume {name} is {state}: the boot stops so that nothing mounts or repairs it]")]
    OsUnusable {
        name: String,
        state: &'static str,
        source: Box<Error>,
    },
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Config(e) => e.exit(),
            Error::KeyVolume(e) => e.exit(),
            Error::Block(e) => e.exit(),
            Error::Luks(e) => e.exit(),
            Error::Busy { .. } => Exit::DeviceMissing,
            Error::Unrecognised { .. } => Exit::DeviceMissing,
            Error::Pass { source, .. } => source.exit(),
            Error::NeedsDetachedHeader { .. } => Exit::LayoutUnsupported,
            Error::NoKeyVolume { exit, .. } => *exit,
            Error::OsUnusable { .. } => Exit::OsUnusable,
        }
    }
}

/// What a volume's disk is right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A filesystem (or nothing LUKS) where the volume should be.
    Plaintext {
        fstype: Option<&'static str>,
    },
    Encrypted(Info),
    /// Our pass is unfinished: `done` of `total` bytes are in target form.
    Unfinished {
        direction: Direction,
        done: u64,
        total: u64,
    },
    /// The mapping is already open (e.g. by systemd-cryptsetup, or a previous run).
    Open {
        dm: String,
    },
}

/// Whether the boot partition must be writable (only to run a pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A volume's device and, for a detached header, the mounted boot partition holding it.
pub struct Located {
    pub dev: BlockDev,
    pub header: Option<PathBuf>,
    /// Our private mount of the boot partition, undone when this value drops (None when the
    /// partition was already mounted, e.g. /boot in the running system, or the header is attached).
    _boot: Option<TempMount>,
}

/// Find a volume's device (and boot partition), waiting up to `timeout` for them.
pub fn locate(v: &Volume, timeout: Duration, access: Access) -> Result<Located, Error> {
    let dev = blockdev::wait_for(&v.device, timeout)?;
    let (header, boot) = match &v.header {
        Header::Attached => (None, None),
        Header::Detached { boot_uuid, path } => {
            let spec = blockdev::DeviceSpec::Uuid(boot_uuid.clone());
            let bootdev = blockdev::wait_for(&spec, timeout)?;
            let (root, boot) = mount_boot(&bootdev, boot_uuid, access)?;
            (Some(root.join(path)), boot)
        }
    };
    Ok(Located {
        dev,
        header,
        _boot: boot,
    })
}

fn mount_boot(
    bootdev: &BlockDev,
    uuid: &str,
    access: Access,
) -> Result<(PathBuf, Option<TempMount>), Error> {
    if let Some(point) = blockdev::mount_point_of(bootdev) {
        log::debug!(
            "boot partition {} already mounted at {}",
            bootdev.name,
            point.display()
        );
        return Ok((point, None));
    }
    let target = Path::new(RUN_DIR).join(format!("boot-{uuid}"));
    let m = TempMount::mount(bootdev, &target, access == Access::ReadOnly)?;
    Ok((m.path().to_path_buf(), Some(m)))
}

/// Observe a located volume without changing anything.
pub fn observe(v: &Volume, loc: &Located) -> Result<Observed, Error> {
    if let Some(dm) = blockdev::mapping_active(&v.name) {
        return Ok(Observed::Open { dm });
    }
    let node = loc.dev.checked_node()?;
    let probe = std::fs::File::open(&node)
        .ok()
        .and_then(|f| blockdev::probe(&f).ok().flatten());
    match &loc.header {
        None => match probe {
            Some(p) if p.fstype == "crypto_LUKS" => {
                Ok(Observed::Encrypted(LuksVolume::new(&node, None).info()?))
            }
            other => Ok(Observed::Plaintext {
                fstype: other.map(|p| p.fstype),
            }),
        },
        Some(h) => observe_detached(v, loc, &node, h, probe),
    }
}

fn observe_detached(
    v: &Volume,
    loc: &Located,
    node: &Path,
    h: &Path,
    probe: Option<blockdev::Probe>,
) -> Result<Observed, Error> {
    let pass_err = |e| Error::Pass {
        name: v.name.clone(),
        source: e,
    };
    match pass::observe(&pass::Paths::for_header(h)).map_err(pass_err)? {
        pass::State::Unfinished {
            direction,
            done,
            total,
        } => Ok(Observed::Unfinished {
            direction,
            done,
            total,
        }),
        pass::State::Encrypted => Ok(Observed::Encrypted(LuksVolume::new(node, Some(h)).info()?)),
        pass::State::Stranded => {
            let paths = pass::Paths::for_header(h);
            Err(pass_err(pass::Error::PendingWithoutJournal {
                device: loc.dev.name.clone(),
                pending: paths.pending.display().to_string(),
                journal: paths.journal.display().to_string(),
            }))
        }
        pass::State::Plaintext => match probe {
            Some(p) if p.fstype != "crypto_LUKS" => Ok(Observed::Plaintext {
                fstype: Some(p.fstype),
            }),
            // No header, no journal, no pending header, no signature: a volume wanted decrypted
            // is plaintext whatever it holds (raw data, or a signature libblkid does not know),
            // and nothing will touch it. One wanted encrypted is not converted from such a state:
            // a pass whose journal and header were both lost would look the same.
            None if v.desired == Desired::Decrypted => Ok(Observed::Plaintext { fstype: None }),
            _ => Err(Error::Unrecognised {
                name: v.name.clone(),
                device: loc.dev.name.clone(),
                header: h.display().to_string(),
            }),
        },
    }
}

/// Refuse a device something holds: a mounted filesystem or a stacked device (dm, md, LVM).
fn check_not_busy(v: &Volume, dev: &BlockDev) -> Result<(), Error> {
    if let Some(point) = blockdev::mount_point_of(dev) {
        return Err(Error::Busy {
            name: v.name.clone(),
            device: dev.name.clone(),
            what: format!("mounted at {}", point.display()),
        });
    }
    let holders = blockdev::holders(dev);
    if !holders.is_empty() {
        return Err(Error::Busy {
            name: v.name.clone(),
            device: dev.name.clone(),
            what: format!("held by {}", holders.join(" ")),
        });
    }
    Ok(())
}

/// The key volume, searched for the first time a volume needs a key and only then: a VM whose
/// volumes are all in their wanted state (decrypted, or already open) boots without its BEK disk
/// and without the bounded wait for it. A failed search is not repeated for the next volume.
pub struct Keys {
    timeout: Duration,
    /// The search's outcome: the key volumes, or the exit code of its failure.
    found: OnceCell<Result<KeyVolumes, Exit>>,
}

impl Keys {
    pub fn new(timeout: Duration) -> Keys {
        Keys {
            timeout,
            found: OnceCell::new(),
        }
    }

    /// Keys from key volumes already found (`initcrypt keys`, `keyscript`).
    pub fn with(found: KeyVolumes, timeout: Duration) -> Keys {
        Keys {
            timeout,
            found: OnceCell::from(Ok(found)),
        }
    }

    fn volumes(&self, v: &Volume) -> Result<&KeyVolumes, Error> {
        let mut first_failure = None;
        let found = self.found.get_or_init(|| {
            keyvol::find(self.timeout).map_err(|e| {
                let exit = e.exit();
                first_failure = Some(e);
                exit
            })
        });
        if let Some(e) = first_failure {
            return Err(e.into());
        }
        found.as_ref().map_err(|exit| Error::NoKeyVolume {
            name: v.name.clone(),
            exit: *exit,
        })
    }

    /// The key of volume `v`, from the key volume (searched for on first use). The first failure
    /// is returned whole; later volumes get a short line pointing at it.
    ///
    /// During a key rotation the platform attaches a second key volume holding the new keys under
    /// the same names, and the VM may reboot before the old one is detached: then the volume's
    /// header chooses (the first candidate a keyslot accepts, checked without activating
    /// anything). A volume without a header yet (about to be encrypted) needs a single key.
    pub fn key_for(&self, v: &Volume) -> Result<Secret, Error> {
        let vols = self.volumes(v)?;
        let mut candidates = vols.candidates(&v.key_file)?;
        if candidates.len() == 1 {
            return Ok(candidates.remove(0).0);
        }
        match self.accepted_by_header(v, candidates)? {
            Some(key) => Ok(key),
            // No header to ask: the single-key rule and its conflict error.
            None => Ok(vols.key_for(&v.key_file)?),
        }
    }

    /// The candidate the volume's current header accepts; `None` when it has no header to ask.
    fn accepted_by_header(
        &self,
        v: &Volume,
        candidates: Vec<(Secret, String)>,
    ) -> Result<Option<Secret>, Error> {
        let loc = locate(v, self.timeout, Access::ReadOnly)?;
        let node = loc.dev.checked_node()?;
        let header = match &loc.header {
            None => None,
            Some(h) => {
                let paths = pass::Paths::for_header(h);
                match (paths.pending.exists(), h.exists()) {
                    (true, _) => Some(paths.pending),
                    (false, true) => Some(h.clone()),
                    (false, false) => return Ok(None),
                }
            }
        };
        let vol = LuksVolume::new(&node, header.as_deref());
        let mut candidates = candidates;
        Ok(pick_key(&vol, &v.name, &v.key_file, &candidates)?.map(|i| candidates.swap_remove(i).0))
    }
}

/// The index of the first candidate key a keyslot of `vol` accepts (checked without activating
/// anything); `None` when `vol` has no LUKS header to ask. All rejected: `KeyRejected` naming
/// every key volume tried.
pub fn pick_key(
    vol: &LuksVolume,
    name: &str,
    key_file: &str,
    candidates: &[(Secret, String)],
) -> Result<Option<usize>, luks::Error> {
    let mut tried = Vec::new();
    for (i, (key, device)) in candidates.iter().enumerate() {
        match vol.check_key(key, key_file) {
            Ok(slot) => {
                log::info!(
                    "{name}: the {key_file} key from {device} opens keyslot {slot} (another key volume holds a different one: a key rotation is under way)"
                );
                return Ok(Some(i));
            }
            Err(luks::Error::KeyRejected { .. }) => tried.push(device.as_str()),
            Err(luks::Error::NotLuks { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Err(luks::Error::KeyRejected {
        device: vol.data_device().display().to_string(),
        key_file: format!("{key_file} (on {})", tried.join(" and ")),
    })
}

/// What to do about a volume in the state observed.
enum Step {
    Done,
    Open(Info),
    Pass {
        direction: Direction,
        resume_at: Option<(u64, u64)>,
    },
    ResumeLuks2Reencryption,
}

fn next_step(want: Desired, obs: Observed) -> Step {
    match (obs, want) {
        (Observed::Open { .. }, _) | (Observed::Plaintext { .. }, Desired::Decrypted) => Step::Done,
        (Observed::Plaintext { .. }, Desired::Encrypted) => Step::Pass {
            direction: Direction::Encrypt,
            resume_at: None,
        },
        (
            Observed::Unfinished {
                direction,
                done,
                total,
            },
            _,
        ) => Step::Pass {
            direction,
            resume_at: Some((done, total)),
        },
        (Observed::Encrypted(i), Desired::Encrypted) if i.reencrypt_pending => {
            Step::ResumeLuks2Reencryption
        }
        (Observed::Encrypted(i), Desired::Encrypted) => Step::Open(i),
        // Mid-reencryption the header describes the final layout only: finish it, then decrypt.
        (Observed::Encrypted(i), Desired::Decrypted) if i.reencrypt_pending => {
            Step::ResumeLuks2Reencryption
        }
        (Observed::Encrypted(_), Desired::Decrypted) => Step::Pass {
            direction: Direction::Decrypt,
            resume_at: None,
        },
    }
}

/// Where `converge` left a volume.
enum Settled {
    /// Plaintext as wanted, or its mapping is open.
    Done,
    /// Encrypted as wanted, ready to open (its boot partition still mounted read-only).
    Encrypted { loc: Located, info: Info },
}

/// Observe, act, observe again, until the disk has the form `want`; never opens it. Bounded: a
/// volume needs at most an unfinished pass finished, a LUKS2 reencryption finished and a new pass.
/// Also says whether anything was done. The boot and `encrypt`/`decrypt <name>` (the systemd pass
/// units) share it, so an unfinished pass is finished the same way whichever runs.
fn converge(
    v: &Volume,
    want: Desired,
    keys: &Keys,
    timeout: Duration,
) -> Result<(Settled, bool), Error> {
    let mut acted = false;
    let mut rotation_checked = false;
    for _ in 0..5 {
        let loc = locate(v, timeout, Access::ReadOnly)?;
        let backup = loc.header.as_deref().map(rotation_backup);
        if !rotation_checked && backup.is_some_and(|b| b.exists()) {
            // A key rotation left a LUKS1 header backup: repair first, if the header was torn.
            drop(loc);
            rotation_checked = true;
            acted |= repair_torn_luks1(v, keys, timeout)?;
            continue;
        }
        // A pass remounts the boot partition read-write: the read-only mount goes first.
        match next_step(want, observe(v, &loc)?) {
            Step::Done => return Ok((Settled::Done, acted)),
            Step::Open(info) => return Ok((Settled::Encrypted { loc, info }, acted)),
            Step::Pass {
                direction,
                resume_at,
            } => {
                drop(loc);
                run_pass(v, keys, timeout, direction, resume_at)?;
            }
            Step::ResumeLuks2Reencryption => {
                drop(loc);
                resume_luks2(v, keys, timeout)?;
            }
        }
        acted = true;
    }
    Err(Error::Pass {
        name: v.name.clone(),
        source: pass::Error::Unsupported {
            device: v.device.to_string(),
            why: "the volume did not settle after its pass; check `initcrypt status`".into(),
        },
    })
}

/// `rotate` backs a LUKS1 header up next to it before changing it (LUKS1 keeps one header copy,
/// which a power cut during a keyslot write can tear). If the header no longer loads, or no key we
/// hold opens it, while the backup does open with one of them, the backup is written back before
/// anything else: otherwise the volume, and for the OS the VM, would never open again. The next
/// `rotate` finishes the rotation. Costs nothing but a stat unless a rotation left a backup.
fn repair_torn_luks1(v: &Volume, keys: &Keys, timeout: Duration) -> Result<bool, Error> {
    if !matches!(v.header, Header::Detached { .. }) {
        return Ok(false);
    }
    let loc = locate(v, timeout, Access::ReadOnly)?;
    let Some(h) = loc.header.clone() else {
        return Ok(false);
    };
    let backup = rotation_backup(&h);
    if !backup.exists() || !h.exists() {
        return Ok(false);
    }
    let node = loc.dev.checked_node()?;
    let candidates = keys.volumes(v)?.candidates(&v.key_file)?;
    if !restore_wanted(&node, &h, &backup, &v.name, &v.key_file, candidates)? {
        return Ok(false);
    }
    drop(loc);
    let loc = locate(v, timeout, Access::ReadWrite)?;
    let header = loc.header.clone().unwrap_or(h);
    LuksVolume::new(&node, Some(&header)).restore_luks1_header(&rotation_backup(&header))?;
    log::warn!(
        "{}: its LUKS1 header {} was damaged during a key rotation and was restored from {}; run `initcrypt rotate` again to finish the rotation",
        v.name,
        header.display(),
        backup.display()
    );
    Ok(true)
}

/// Where `rotate` keeps the backup of a detached LUKS1 header.
fn rotation_backup(header: &Path) -> PathBuf {
    let mut s = header.as_os_str().to_owned();
    s.push(crate::lifecycle::rotate::BACKUP_SUFFIX);
    PathBuf::from(s)
}

/// Whether the header at `header` is torn (does not load as LUKS1, or no candidate opens it) while
/// the LUKS1 backup opens with a candidate: only then is restoring it both needed and safe.
pub fn restore_wanted(
    node: &Path,
    header: &Path,
    backup: &Path,
    name: &str,
    key_file: &str,
    candidates: Vec<(Secret, String)>,
) -> Result<bool, Error> {
    let current = LuksVolume::new(node, Some(header));
    let healthy = match current.info() {
        Ok(i) if i.version != 1 => return Ok(false),
        Ok(_) => pick_key(&current, name, key_file, &candidates).is_ok(),
        Err(_) => false,
    };
    if healthy {
        return Ok(false);
    }
    let saved = LuksVolume::new(node, Some(backup));
    Ok(matches!(saved.info(), Ok(i) if i.version == 1)
        && matches!(pick_key(&saved, name, key_file, &candidates), Ok(Some(_))))
}

/// Reconcile one volume with its desired state, then open it if it is to be encrypted.
fn reconcile(v: &Volume, keys: &Keys, timeout: Duration) -> Result<(), Error> {
    if let Some(dm) = blockdev::mapping_active(&v.name) {
        log::info!("{} is already open ({dm})", v.name);
        return Ok(());
    }
    match converge(v, v.desired, keys, timeout)? {
        (Settled::Encrypted { loc, info }, _) => open(v, &loc, &info, keys),
        (Settled::Done, _) => Ok(()),
    }
}

/// Run (or resume) our in-place pass with the boot partition mounted read-write.
fn run_pass(
    v: &Volume,
    keys: &Keys,
    timeout: Duration,
    direction: Direction,
    resume_at: Option<(u64, u64)>,
) -> Result<(), Error> {
    if matches!(v.header, Header::Attached) {
        return Err(Error::NeedsDetachedHeader {
            name: v.name.clone(),
        });
    }
    // The key before the read-write mount: a missing key volume must leave /boot untouched.
    let key = keys.key_for(v)?;
    let loc = locate(v, timeout, Access::ReadWrite)?;
    check_not_busy(v, &loc.dev)?;
    let node = loc.dev.checked_node()?;
    let header = loc
        .header
        .clone()
        .ok_or_else(|| Error::NeedsDetachedHeader {
            name: v.name.clone(),
        })?;
    let verb = direction.verb();
    match resume_at {
        Some((done, total)) => log::info!(
            "{}: resuming the {verb}ion of {} at {}%",
            v.name,
            node.display(),
            percent(done, total)
        ),
        None => log::info!("{}: {verb}ing {} in place", v.name, node.display()),
    }
    let mut req = pass::Request::new(&node, &header, &key, &v.key_file, v.device.to_string());
    req.stop = pass::stop_on_signals();
    let mut progress = pass::Progress::new(
        &v.name,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let mut report = |done, total| progress.update(done, total);
    let result = match direction {
        Direction::Encrypt => pass::encrypt(&req, &mut report),
        Direction::Decrypt => pass::decrypt(&req, &mut report),
    };
    blockdev::announce_change(&loc.dev);
    result.map_err(|e| Error::Pass {
        name: v.name.clone(),
        source: e,
    })?;
    log::info!("{}: {verb}ed {} in place", v.name, node.display());
    Ok(())
}

/// `done` of `total` as a whole percentage, 0–100, whatever the values (they come from disk).
pub fn percent(done: u64, total: u64) -> u64 {
    (done.saturating_mul(100))
        .checked_div(total)
        .unwrap_or(0)
        .min(100)
}

/// Finish a LUKS2 reencryption ADE's online flow (or stock cryptsetup) left unfinished.
fn resume_luks2(v: &Volume, keys: &Keys, timeout: Duration) -> Result<(), Error> {
    let key = keys.key_for(v)?;
    let loc = locate(v, timeout, Access::ReadWrite)?;
    check_not_busy(v, &loc.dev)?;
    let node = loc.dev.checked_node()?;
    let vol = LuksVolume::new(&node, loc.header.as_deref());
    let pct = vol
        .reencrypted_bytes()
        .map(|b| format!("{}%", percent(b, loc.dev.size)));
    log::info!(
        "{}: resuming the encryption of {} at {} (an unfinished LUKS2 reencryption left by ADE or cryptsetup)",
        v.name,
        node.display(),
        pct.as_deref().unwrap_or("an unknown point")
    );
    let resumed = vol.resume_reencryption(&key, &v.key_file);
    blockdev::announce_change(&loc.dev);
    resumed?;
    log::info!(
        "{}: encrypted {} in place (LUKS2 reencryption finished)",
        v.name,
        node.display()
    );
    Ok(())
}

fn open(v: &Volume, loc: &Located, info: &Info, keys: &Keys) -> Result<(), Error> {
    check_not_busy(v, &loc.dev)?;
    if info.reencrypt_pending {
        log::info!(
            "{}: LUKS2 reencryption unfinished on {}; opening it as it is",
            v.name,
            loc.dev.name
        );
    }
    let key = keys.key_for(v)?;
    let node = loc.dev.checked_node()?;
    let slot =
        LuksVolume::new(&node, loc.header.as_deref()).activate(&v.name, &key, &v.key_file)?;
    log::info!(
        "opened {} on {} (LUKS{}, keyslot {slot})",
        v.name,
        node.display(),
        info.version
    );
    Ok(())
}

/// `initcrypt encrypt <name>` / `decrypt <name>`: bring one configured volume to that form now,
/// whatever its desired state says (an unfinished pass or LUKS2 reencryption is finished first),
/// leaving the mapping closed. Offline only: the device
/// must not be mounted or held (run it from the initramfs or on a data disk nothing uses).
pub fn pass_one(
    config_path: &Path,
    params: &BootParams,
    name: &str,
    direction: Direction,
) -> Result<(), Error> {
    let volumes = config::load(config_path, params)?;
    let v = volumes.iter().find(|v| v.name == name).ok_or_else(|| {
        let known: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        Error::Config(config::Error::Invalid {
            path: config_path.to_path_buf(),
            detail: format!(
                "no volume named {name} (configured: {})",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
        })
    })?;
    if blockdev::mapping_active(&v.name).is_some() {
        let loc = locate(v, params.keyvol_timeout, Access::ReadOnly)?;
        return Err(Error::Busy {
            name: v.name.clone(),
            device: loc.dev.name.clone(),
            what: format!("open as /dev/mapper/{}", v.name),
        });
    }
    let want = match direction {
        Direction::Encrypt => Desired::Encrypted,
        Direction::Decrypt => Desired::Decrypted,
    };
    // Only a pass needs the key: a volume already in the wanted state (every boot of
    // initcrypt-encrypt@ after the first) costs no key-volume scan.
    let keys = Keys::new(params.keyvol_timeout);
    let (_, acted) = converge(v, want, &keys, params.keyvol_timeout)?;
    if !acted {
        log::info!(
            "{name} is already {}; nothing to do",
            if want == Desired::Encrypted {
                "encrypted"
            } else {
                "decrypted"
            }
        );
    }
    Ok(())
}

/// `initcrypt boot`: keys + reconcile + open every volume. Every volume is tried; the exit code is
/// the OS volume's failure if it failed, else the first data volume's (data volumes never stop
/// the OS from booting).
pub fn run(config_path: &Path, params: &BootParams) -> Result<(), Error> {
    if params.skip {
        log::info!("disabled on the kernel command line (rd.initcrypt=0 or rd.ade=0)");
        return Ok(());
    }
    let volumes = config::load(config_path, params)?;
    if volumes.is_empty() {
        log::info!(
            "no volumes configured ({} absent, no rd.luks.ade.* parameters)",
            config_path.display()
        );
        return Ok(());
    }
    let keys = Keys::new(params.keyvol_timeout);
    let mut failures: Vec<(Role, Error)> = Vec::new();
    for v in &volumes {
        if let Err(e) = reconcile(v, &keys, params.keyvol_timeout) {
            failures.push((v.role, e));
        }
    }
    // main prints the returned error; the others are printed here, each once.
    let pick = failures
        .iter()
        .position(|(r, _)| *r == Role::Os)
        .unwrap_or(0);
    if failures.is_empty() {
        return Ok(());
    }
    let (role, chosen) = failures.remove(pick);
    for (_, e) in &failures {
        log::error!("{e}");
    }
    let os = volumes.iter().find(|v| v.role == Role::Os);
    match (
        role,
        os.and_then(|v| unusable_state(v, params.keyvol_timeout)),
    ) {
        (Role::Os, Some(state)) => Err(Error::OsUnusable {
            name: os.map(|v| v.name.clone()).unwrap_or_default(),
            state,
            source: Box::new(chosen),
        }),
        _ => Err(chosen),
    }
}

/// After the OS volume failed: is its device in a state from which a root must not be mounted?
/// `None` when it is mountable as it is (open, or still whole plaintext: a missing key volume
/// leaves an unconverted root that boots) or could not be observed (absent: the initramfs's own
/// wait for the root decides).
fn unusable_state(v: &Volume, timeout: Duration) -> Option<&'static str> {
    let loc = locate(v, timeout.min(Duration::from_secs(1)), Access::ReadOnly).ok()?;
    match observe(v, &loc) {
        Ok(Observed::Open { .. }) | Ok(Observed::Plaintext { .. }) => None,
        Ok(Observed::Unfinished { .. }) => Some("half converted by an unfinished pass"),
        Ok(Observed::Encrypted(_)) => Some("encrypted and not opened"),
        Err(_) => Some("in a state initcrypt cannot read"),
    }
}
