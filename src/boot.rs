//! The boot step: reconcile each volume's desired state with what its disk is (design §2).
//! This build opens what is encrypted; the in-place pass arrives with the `pass` module.
//!
//! Observation is shared with `status`, so the two can never disagree about a disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::blockdev::{self, BlockDev, TempMount};
use crate::config::{self, BootParams, Desired, Header, Role, Volume};
use crate::exit::{Classify, Exit};
use crate::keyvol::{self, KeyVolumes};
use crate::luks::{self, Info, LuksVolume};

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
    #[error("{name}: {device} is in use ({what}); initcrypt only touches a device nothing holds — boot without mounting it or check the crypttab/fstab entries")]
    Busy {
        name: String,
        device: String,
        what: String,
    },
    #[error("{name}: {device} has neither a LUKS header nor a filesystem initcrypt recognises, and the header {header} is missing; restore the header or check volumes.json")]
    Unrecognised {
        name: String,
        device: String,
        header: String,
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
    /// The mapping is already open (e.g. by systemd-cryptsetup, or a previous run).
    Open {
        dm: String,
    },
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
pub fn locate(v: &Volume, timeout: Duration) -> Result<Located, Error> {
    let dev = blockdev::wait_for(&v.device, timeout)?;
    let (header, boot) = match &v.header {
        Header::Attached => (None, None),
        Header::Detached { boot_uuid, path } => {
            let spec = blockdev::DeviceSpec::Uuid(boot_uuid.clone());
            let bootdev = blockdev::wait_for(&spec, timeout)?;
            let (root, boot) = mount_boot(&bootdev, boot_uuid)?;
            (Some(root.join(path)), boot)
        }
    };
    Ok(Located {
        dev,
        header,
        _boot: boot,
    })
}

fn mount_boot(bootdev: &BlockDev, uuid: &str) -> Result<(PathBuf, Option<TempMount>), Error> {
    if let Some(point) = blockdev::mount_point_of(bootdev) {
        log::debug!(
            "boot partition {} already mounted at {}",
            bootdev.name,
            point.display()
        );
        return Ok((point, None));
    }
    let target = Path::new(RUN_DIR).join(format!("boot-{uuid}"));
    let m = TempMount::mount(bootdev, &target, true)?;
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
        .and_then(|mut f| blockdev::probe(&mut f).ok().flatten());
    match &loc.header {
        None => match probe {
            Some(p) if p.fstype == "crypto_LUKS" => {
                Ok(Observed::Encrypted(LuksVolume::new(&node, None).info()?))
            }
            other => Ok(Observed::Plaintext {
                fstype: other.map(|p| p.fstype),
            }),
        },
        Some(h) if h.exists() => Ok(Observed::Encrypted(LuksVolume::new(&node, Some(h)).info()?)),
        Some(h) => match probe {
            Some(p) if p.fstype != "crypto_LUKS" => Ok(Observed::Plaintext {
                fstype: Some(p.fstype),
            }),
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

/// Reconcile one volume.
fn reconcile(v: &Volume, keys: &KeyVolumes, timeout: Duration) -> Result<(), Error> {
    if let Some(dm) = blockdev::mapping_active(&v.name) {
        log::info!("{} is already open ({dm})", v.name);
        return Ok(());
    }
    let loc = locate(v, timeout)?;
    match (observe(v, &loc)?, v.desired) {
        (Observed::Open { .. }, _) => Ok(()),
        (Observed::Plaintext { fstype }, Desired::Encrypted) => {
            log::warn!(
                "{}: {} is still plaintext ({}); this initcrypt cannot encrypt in place yet, so it boots plaintext",
                v.name,
                loc.dev.name,
                fstype.unwrap_or("no filesystem recognised")
            );
            Ok(())
        }
        (Observed::Plaintext { .. }, Desired::Decrypted) => Ok(()),
        (Observed::Encrypted(info), _) => open(v, &loc, &info, keys),
    }
}

fn open(v: &Volume, loc: &Located, info: &Info, keys: &KeyVolumes) -> Result<(), Error> {
    check_not_busy(v, &loc.dev)?;
    if info.reencrypt_pending {
        log::info!(
            "{}: LUKS2 reencryption unfinished on {}; opening it as it is",
            v.name,
            loc.dev.name
        );
    }
    let key = keys.key_for(&v.key_file)?;
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
    let keys = keyvol::find(params.keyvol_timeout)?;
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
    let (_, chosen) = failures.remove(pick);
    for (_, e) in &failures {
        log::error!("{e}");
    }
    Err(chosen)
}
