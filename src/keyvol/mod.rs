//! The key volume: the small FAT disk labelled `BEK VOLUME` that the platform attaches at boot,
//! holding `LinuxPassPhraseFileName` (OS volume) and `LinuxPassPhraseFileName_<ctrl>_<lun>` (data disks).
//!
//! We read it from the raw block device (whole disk, or a partition of an MBR/GPT disk) so the
//! initramfs needs neither a mount nor the vfat/nls modules, whose absence broke ADE boots.

mod fat;

pub use fat::{ReadOnlySlice, MAX_KEY_BYTES};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::blockdev;
use crate::exit::{Classify, Exit};
use crate::secret::Secret;

pub const LABEL: &str = "BEK VOLUME";
/// ADE's file name for the OS volume's passphrase and the prefix of the per-disk names.
pub const OS_KEY_FILE: &str = "LinuxPassPhraseFileName";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no FAT volume labelled \"BEK VOLUME\" appeared within {secs} s (looked at: {looked}); attach the key volume (restart the VM from the portal/API so the platform re-attaches it) or raise initcrypt.keyvol_timeout=")]
    NotFound { secs: u64, looked: String },
    #[error("{device} is not a FAT volume labelled \"BEK VOLUME\" ({reason}); pass the key volume or its image")]
    NotKeyVolume { device: String, reason: String },
    #[error("cannot open {device}: {source}; pass an existing block device or image file")]
    Open {
        device: String,
        source: std::io::Error,
    },
    #[error("key file {wanted} not on key volume {device} (it holds: {present}); re-stamp the encryption settings so the platform writes it, or set key_file in volumes.json")]
    KeyFileMissing {
        wanted: String,
        device: String,
        present: String,
    },
    #[error("key file {name} on {device} is unreadable: {source}; the key volume is damaged, re-attach it")]
    KeyFileRead {
        name: String,
        device: String,
        source: std::io::Error,
    },
    #[error("key file {name} on {device} is empty; re-stamp the encryption settings")]
    KeyFileEmpty { name: String, device: String },
    #[error("key volumes {a} and {b} hold different {name}; detach the stale one")]
    Conflict { name: String, a: String, b: String },
    #[error(transparent)]
    Block(#[from] blockdev::Error),
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::NotFound { .. } | Error::NotKeyVolume { .. } | Error::Open { .. } => {
                Exit::KeyVolumeMissing
            }
            Error::Block(e) => e.exit(),
            _ => Exit::KeyRejected,
        }
    }
}

/// Where a FAT volume starts inside a device or image file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    path: PathBuf,
    offset: u64,
    len: u64,
}

/// A key volume found on this machine (or in an image file), with its root directory listing.
#[derive(Debug, Clone, Serialize)]
pub struct KeyVolume {
    pub device: String,
    pub fat_type: &'static str,
    pub label: String,
    pub files: Vec<KeyFileInfo>,
    #[serde(skip)]
    location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyFileInfo {
    pub name: String,
    pub size: u64,
}

impl KeyVolume {
    /// Parse the FAT at `location`; `Ok(None)` when it is not a FAT volume labelled BEK VOLUME.
    fn at(location: Location) -> Result<Option<KeyVolume>, Error> {
        let device = location.path.display().to_string();
        let file = File::open(&location.path).map_err(|e| Error::Open {
            device: device.clone(),
            source: e,
        })?;
        let listing = match fat::list(ReadOnlySlice::new(file, location.offset, location.len)) {
            Ok(l) => l,
            Err(e) => {
                log::trace!("{device}+{}: not FAT: {e}", location.offset);
                return Ok(None);
            }
        };
        let Some(label) = listing
            .labels
            .iter()
            .find(|l| l.eq_ignore_ascii_case(LABEL))
            .cloned()
        else {
            log::trace!("{device}: FAT labelled {:?}, not ours", listing.labels);
            return Ok(None);
        };
        let files = listing
            .files
            .into_iter()
            .map(|(name, size)| KeyFileInfo { name, size })
            .collect();
        Ok(Some(KeyVolume {
            device,
            fat_type: listing.fat_type,
            label,
            files,
            location,
        }))
    }

    /// The file to use for `wanted`: the exact name; else, when exactly one `LinuxPassPhraseFileName*`
    /// exists, that one (ADE writes the same secret under every name); else an error naming what exists.
    pub fn resolve_name(&self, wanted: &str) -> Result<String, Error> {
        if self.files.iter().any(|f| f.name == wanted) {
            return Ok(wanted.to_string());
        }
        let candidates: Vec<&KeyFileInfo> = self
            .files
            .iter()
            .filter(|f| f.name.starts_with(OS_KEY_FILE))
            .collect();
        if let [only] = candidates.as_slice() {
            log::info!(
                "key file {wanted} not on {}; using the only key file there, {}",
                self.device,
                only.name
            );
            return Ok(only.name.clone());
        }
        Err(Error::KeyFileMissing {
            wanted: wanted.to_string(),
            device: self.device.clone(),
            present: self.present(),
        })
    }

    fn present(&self) -> String {
        if self.files.is_empty() {
            return "no files".to_string();
        }
        self.files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Read the key for `wanted` (lookup rule of `resolve_name`).
    pub fn key_for(&self, wanted: &str) -> Result<Secret, Error> {
        let name = self.resolve_name(wanted)?;
        let loc = &self.location;
        let file = File::open(&loc.path).map_err(|e| Error::Open {
            device: self.device.clone(),
            source: e,
        })?;
        let bytes =
            fat::read_file(ReadOnlySlice::new(file, loc.offset, loc.len), &name).map_err(|e| {
                Error::KeyFileRead {
                    name: name.clone(),
                    device: self.device.clone(),
                    source: e,
                }
            })?;
        if bytes.is_empty() {
            return Err(Error::KeyFileEmpty {
                name,
                device: self.device.clone(),
            });
        }
        log::debug!(
            "read key file {name} ({} bytes) from {}",
            bytes.len(),
            self.device
        );
        Ok(Secret::new(bytes))
    }
}

/// All key volumes the machine has; normally one.
#[derive(Debug)]
pub struct KeyVolumes(pub Vec<KeyVolume>);

impl KeyVolumes {
    /// Read the key for `wanted`. With several key volumes the key must be the same on each that holds
    /// it: picking one at random (as `blkid -L` would) could feed a stale key to a keyslot.
    pub fn key_for(&self, wanted: &str) -> Result<Secret, Error> {
        let mut found: Option<(Secret, &str)> = None;
        let mut first_err = None;
        for kv in &self.0 {
            match kv.key_for(wanted) {
                Ok(key) => match &found {
                    Some((prev, dev)) if *prev != key => {
                        return Err(Error::Conflict {
                            name: wanted.to_string(),
                            a: dev.to_string(),
                            b: kv.device.clone(),
                        })
                    }
                    Some(_) => {}
                    None => found = Some((key, &kv.device)),
                },
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (found, first_err) {
            (Some((key, _)), _) => Ok(key),
            (None, Some(e)) => Err(e),
            (None, None) => Err(Error::NotFound {
                secs: 0,
                looked: "nothing".to_string(),
            }),
        }
    }
}

/// Look at every block device once. Partitions are block devices of their own, so a partitioned
/// key disk is found through its partition and a partitionless one through the disk itself.
fn scan_once() -> Result<(Vec<KeyVolume>, Vec<String>), Error> {
    let mut found = Vec::new();
    let mut looked = Vec::new();
    for dev in blockdev::scan()? {
        if dev.size == 0 || dev.checked_node().is_err() {
            continue;
        }
        looked.push(dev.name.clone());
        let loc = Location {
            path: dev.node(),
            offset: 0,
            len: dev.size,
        };
        match KeyVolume::at(loc) {
            Ok(Some(kv)) => found.push(kv),
            Ok(None) => {}
            Err(e) => log::debug!("{}: {e}", dev.name),
        }
    }
    Ok((found, looked))
}

/// Find the key volume(s), waiting up to `timeout` for the platform to attach it.
pub fn find(timeout: Duration) -> Result<KeyVolumes, Error> {
    let mut looked = Vec::new();
    let found = blockdev::poll_until(
        timeout,
        "the key volume (FAT labelled \"BEK VOLUME\")",
        || {
            let (found, seen) = scan_once()?;
            looked = seen;
            Ok::<_, Error>((!found.is_empty()).then_some(found))
        },
    )?;
    match found {
        Some(vols) => {
            for kv in &vols {
                log::info!(
                    "key volume {} ({}, label \"{}\")",
                    kv.device,
                    kv.fat_type,
                    kv.label
                );
            }
            Ok(KeyVolumes(vols))
        }
        None => {
            let looked = if looked.is_empty() {
                "no block devices".to_string()
            } else {
                looked.join(" ")
            };
            Err(Error::NotFound {
                secs: timeout.as_secs(),
                looked,
            })
        }
    }
}

/// `keyvol --device PATH`: a block device or an image file, partitionless or with an MBR/GPT table
/// (then the first partition holding a key volume).
pub fn open_path(path: &Path) -> Result<KeyVolume, Error> {
    let device = path.display().to_string();
    let mut file = File::open(path).map_err(|e| Error::Open {
        device: device.clone(),
        source: e,
    })?;
    let len = device_len(&mut file).map_err(|e| Error::Open {
        device: device.clone(),
        source: e,
    })?;
    if let Some(kv) = KeyVolume::at(Location {
        path: path.to_path_buf(),
        offset: 0,
        len,
    })? {
        return Ok(kv);
    }
    let parts = blockdev::partitions_of(&mut file, 512).unwrap_or_default();
    for p in &parts {
        let loc = Location {
            path: path.to_path_buf(),
            offset: p.start,
            len: p.size,
        };
        if let Some(mut kv) = KeyVolume::at(loc)? {
            kv.device = format!("{device} (partition {})", p.number);
            return Ok(kv);
        }
    }
    let reason = if parts.is_empty() {
        "no FAT filesystem with that label"
    } else {
        "no partition holds one"
    };
    Err(Error::NotKeyVolume {
        device,
        reason: reason.to_string(),
    })
}

/// Size of a regular file or block device (seek to the end works for both).
fn device_len(f: &mut File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Used by the fuzz target: parse an in-memory image the way `open_path` parses a device,
/// then read every key file, so corrupt images exercise the whole reader.
pub fn fuzz_image(data: &[u8]) {
    let len = data.len() as u64;
    let storage = || ReadOnlySlice::new(std::io::Cursor::new(data), 0, len);
    if let Ok(listing) = fat::list(storage()) {
        for (name, _) in listing.files.iter().take(16) {
            let _ = fat::read_file(storage(), name);
        }
    }
    let _ = blockdev::partitions_of(&mut std::io::Cursor::new(data), 512);
}
