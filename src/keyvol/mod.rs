//! The key volume: the small FAT disk labelled `BEK VOLUME` that the platform attaches at boot,
//! holding `LinuxPassPhraseFileName` (OS volume) and `LinuxPassPhraseFileName_<ctrl>_<lun>` (data disks).
//!
//! We read it from the raw block device (whole disk, or a partition of an MBR/GPT disk) so the
//! initramfs needs neither a mount nor the vfat/nls modules, whose absence broke ADE boots.

mod fat;

pub use fat::{ReadOnlySlice, MAX_KEY_BYTES};

use std::collections::BTreeMap;
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
    #[error("key volume {device} is corrupt or truncated ({reason}); re-attach it (restart the VM from the portal/API so the platform attaches it again), or copy the whole image")]
    Corrupt { device: String, reason: String },
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
            Error::NotFound { .. }
            | Error::NotKeyVolume { .. }
            | Error::Corrupt { .. }
            | Error::Open { .. } => Exit::KeyVolumeMissing,
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
    /// A FAT volume that cannot be read whole is `Error::Corrupt` unless its boot sector names
    /// another volume: its root directory (and the label entry there) is out of reach, and it may be
    /// the key volume, truncated or still being attached.
    fn at(location: Location) -> Result<Option<KeyVolume>, Error> {
        let device = location.path.display().to_string();
        let file = File::open(&location.path).map_err(|e| Error::Open {
            device: device.clone(),
            source: e,
        })?;
        let listing = match fat::list(ReadOnlySlice::new(file, location.offset, location.len)) {
            Ok(l) => l,
            Err(fat::Refused::Damaged { boot_label, source }) if may_be_ours(&boot_label) => {
                return Err(Error::Corrupt {
                    device,
                    reason: source.to_string(),
                })
            }
            Err(e) => {
                log::trace!("{device}+{}: {e}", location.offset);
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

/// Could a FAT volume whose boot sector carries this label be the key volume? Its label, or none
/// (Windows formats leave "NO NAME" there and write the label in the root directory only).
fn may_be_ours(boot_label: &str) -> bool {
    let l = boot_label.trim();
    l.is_empty() || l.eq_ignore_ascii_case("NO NAME") || l.eq_ignore_ascii_case(LABEL)
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

impl KeyVolumes {
    /// Every distinct key stored for `wanted`, in scan order, with the device it came from. While a
    /// key rotation runs, the platform attaches a second key volume with the new keys: both are
    /// legitimate, and only a volume's header can say which one it accepts (see `boot::Keys`).
    pub fn candidates(&self, wanted: &str) -> Result<Vec<(Secret, String)>, Error> {
        let mut found: Vec<(Secret, String)> = Vec::new();
        let mut first_err = None;
        for kv in &self.0 {
            match kv.key_for(wanted) {
                Ok(key) if found.iter().any(|(k, _)| *k == key) => {}
                Ok(key) => found.push((key, kv.device.clone())),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (found.is_empty(), first_err) {
            (false, _) => Ok(found),
            (true, Some(e)) => Err(e),
            (true, None) => Err(Error::NotFound {
                secs: 0,
                looked: "nothing".to_string(),
            }),
        }
    }
}

/// What one look at every block device found.
#[derive(Debug, Default)]
struct Scan {
    found: Vec<KeyVolume>,
    /// Kernel names looked at.
    looked: Vec<String>,
    /// Key volumes that could not be read whole (`Error::Corrupt`), by device.
    damaged: BTreeMap<String, Error>,
}

/// Look at every block device once. Partitions are block devices of their own, so a partitioned
/// key disk is found through its partition and a partitionless one through the disk itself.
fn scan_once() -> Result<Scan, Error> {
    let mut scan = Scan::default();
    for dev in blockdev::scan()? {
        if dev.size == 0 || dev.checked_node().is_err() {
            continue;
        }
        scan.looked.push(dev.name.clone());
        let loc = Location {
            path: dev.node(),
            offset: 0,
            len: dev.size,
        };
        match KeyVolume::at(loc) {
            Ok(Some(kv)) => scan.found.push(kv),
            Ok(None) => {}
            Err(e @ Error::Corrupt { .. }) => {
                scan.damaged.insert(dev.name.clone(), e);
            }
            Err(e) => log::debug!("{}: {e}", dev.name),
        }
    }
    Ok(scan)
}

/// Find the key volume(s), waiting up to `timeout` for the platform to attach it.
pub fn find(timeout: Duration) -> Result<KeyVolumes, Error> {
    search(timeout, scan_once)
}

/// The bounded wait of `find`, over any scanner. A damaged candidate does not end it: a disk that
/// is still being attached can read short for a moment, and another device may hold the real key
/// volume. Only when the wait runs out is a damaged one reported, as such, rather than "not found".
fn search(
    timeout: Duration,
    mut scan: impl FnMut() -> Result<Scan, Error>,
) -> Result<KeyVolumes, Error> {
    let mut last = Scan::default();
    let mut reported = BTreeMap::new();
    let found = blockdev::poll_until(
        timeout,
        "the key volume (FAT labelled \"BEK VOLUME\")",
        || {
            last = scan()?;
            for (dev, e) in &last.damaged {
                let line = e.to_string();
                if reported.get(dev) != Some(&line) {
                    log::info!("{line}; still waiting");
                    reported.insert(dev.clone(), line);
                }
            }
            Ok::<_, Error>((!last.found.is_empty()).then(|| std::mem::take(&mut last.found)))
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
            if let Some((_, e)) = last.damaged.pop_first() {
                return Err(e);
            }
            let looked = if last.looked.is_empty() {
                "no block devices".to_string()
            } else {
                last.looked.join(" ")
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
        // A partition table may claim more than a truncated image holds: the volume's own
        // length check then sees how much is really there.
        let loc = Location {
            path: path.to_path_buf(),
            offset: p.start,
            len: p.size.min(len.saturating_sub(p.start)),
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
/// then read every key file, so corrupt images exercise the whole reader. Twice: as the device it
/// is (a prefix of a volume is refused as truncated), and padded with zeros to the length its boot
/// sector declares, so that prefixes of real volumes reach the directory and file readers.
pub fn fuzz_image(data: &[u8]) {
    let len = data.len() as u64;
    let exact = || ReadOnlySlice::new(std::io::Cursor::new(data), 0, len);
    list_and_read(exact);
    let padded_len = fat::ZeroTail::declared(data).size();
    if padded_len > len {
        list_and_read(|| ReadOnlySlice::new(fat::ZeroTail::declared(data), 0, padded_len));
    }
    let _ = blockdev::partitions_of(&mut std::io::Cursor::new(data), 512);
}

fn list_and_read<R: std::io::Read + std::io::Seek>(storage: impl Fn() -> ReadOnlySlice<R>) {
    if let Ok(listing) = fat::list(storage()) {
        for (name, _) in listing.files.iter().take(16) {
            let _ = fat::read_file(storage(), name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn damaged(dev: &str) -> BTreeMap<String, Error> {
        BTreeMap::from([(
            dev.to_string(),
            Error::Corrupt {
                device: format!("/dev/{dev}"),
                reason: "truncated: …".into(),
            },
        )])
    }

    fn key_volume(dev: &str) -> KeyVolume {
        KeyVolume {
            device: format!("/dev/{dev}"),
            fat_type: "FAT12",
            label: LABEL.into(),
            files: vec![],
            location: Location {
                path: PathBuf::from(format!("/dev/{dev}")),
                offset: 0,
                len: 0,
            },
        }
    }

    // A disk still being attached reads short at first: the search keeps polling and takes the
    // key volume once it reads whole.
    #[test]
    fn a_damaged_candidate_does_not_end_the_search() {
        let calls = Cell::new(0);
        let found = search(Duration::from_secs(10), || {
            calls.set(calls.get() + 1);
            Ok(if calls.get() < 3 {
                Scan {
                    damaged: damaged("sdb"),
                    looked: vec!["sda".into(), "sdb".into()],
                    ..Scan::default()
                }
            } else {
                Scan {
                    found: vec![key_volume("sdb")],
                    ..Scan::default()
                }
            })
        })
        .unwrap();
        assert_eq!(calls.get(), 3);
        assert_eq!(found.0[0].device, "/dev/sdb");
    }

    // When the wait runs out, a damaged key volume is reported as such, not as "not found" (whose
    // advice, attach the key volume, is wrong for a disk that is attached).
    #[test]
    fn a_search_that_ends_on_a_damaged_candidate_reports_it() {
        let calls = Cell::new(0);
        let e = search(Duration::from_millis(500), || {
            calls.set(calls.get() + 1);
            Ok(Scan {
                damaged: damaged("sdc"),
                looked: vec!["sdc".into()],
                ..Scan::default()
            })
        })
        .unwrap_err();
        assert!(calls.get() > 1, "polled until the wait ran out");
        assert!(
            matches!(e, Error::Corrupt { ref device, .. } if device == "/dev/sdc"),
            "{e}"
        );
        assert_eq!(e.exit(), Exit::KeyVolumeMissing);

        let e = search(Duration::from_millis(10), || Ok(Scan::default())).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
    }
}
