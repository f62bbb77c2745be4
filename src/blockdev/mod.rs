//! Block devices as the initramfs sees them: a sysfs scan (no udev needed), persistent names
//! (`PARTUUID=`, `UUID=`, `/dev/disk/by-path/…`) resolved by reading partition tables ourselves and
//! superblocks with libblkid, holders and mounts (a device in use must never be touched), and
//! bounded waits.

mod mount;
mod parttable;
mod pathid;
mod probe;

pub use mount::{mount_point_of, TempMount};
pub use parttable::{partitions_of, Partition, TableKind};
pub use probe::{full_probe, full_probe_path, probe, probe_path, Probe, Signature};

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::exit::{Classify, Exit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}; check that sysfs and devtmpfs are mounted")]
    Sysfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device {spec} did not appear within {secs} s; check that the disk is attached and the name in volumes.json is right")]
    NotFound { spec: String, secs: u64 },
    #[error("device spec \"{spec}\" is not supported: use PARTUUID=…, UUID=… or /dev/disk/by-path/… (never /dev/sdX, which changes between boots)")]
    BadSpec { spec: String },
    #[error("{spec} matches both {a} and {b}; remove the duplicate (cloned disk?) so the right one is used")]
    Ambiguous { spec: String, a: String, b: String },
    #[error("cannot mount {device} at {target}: {reason}")]
    Mount {
        device: String,
        target: PathBuf,
        reason: String,
    },
    #[error("{device} has no device node in /dev (is devtmpfs mounted?)")]
    NoNode { device: String },
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::BadSpec { .. } => Exit::ConfigInvalid,
            Error::Mount { .. } => Exit::LayoutUnsupported,
            _ => Exit::DeviceMissing,
        }
    }
}

/// One entry of /sys/class/block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name (`vda2`, `sdb`).
    pub name: String,
    /// major:minor as in sysfs `dev`.
    pub devno: (u32, u32),
    /// Size in bytes.
    pub size: u64,
    /// Partition number when this is a partition.
    pub partition: Option<u32>,
    /// Kernel name of the whole disk for a partition.
    pub parent: Option<String>,
}

impl BlockDev {
    /// The device node; devtmpfs names it after the kernel name.
    pub fn node(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }

    /// Kernel name of the whole disk (itself for a disk).
    pub fn disk(&self) -> &str {
        self.parent.as_deref().unwrap_or(&self.name)
    }

    /// The node, checked to be the block device sysfs describes (a missing node under /dev can
    /// otherwise be created as a regular file by a careless writer).
    pub fn checked_node(&self) -> Result<PathBuf, Error> {
        let node = self.node();
        match rustix::fs::stat(&node) {
            Ok(st) if (st.st_mode & libc::S_IFMT) == libc::S_IFBLK => {
                let rdev = st.st_rdev;
                if (rustix::fs::major(rdev), rustix::fs::minor(rdev)) == self.devno {
                    return Ok(node);
                }
                Err(Error::NoNode {
                    device: self.name.clone(),
                })
            }
            _ => Err(Error::NoNode {
                device: self.name.clone(),
            }),
        }
    }
}

const SYS_BLOCK: &str = "/sys/class/block";

/// Kernel names we never look at: RAM disks, optical drives (reading an empty tray can block for
/// seconds), floppies, and device-mapper/md devices (our own mappings, never a key volume or a raw disk).
fn ignored(name: &str) -> bool {
    ["ram", "zram", "sr", "fd", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Every block device the kernel knows, disks before their partitions.
pub fn scan() -> Result<Vec<BlockDev>, Error> {
    let entries = fs::read_dir(SYS_BLOCK).map_err(|e| Error::Sysfs {
        path: SYS_BLOCK.into(),
        source: e,
    })?;
    let mut devs = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ignored(&name) {
            continue;
        }
        if let Some(dev) = read_sysfs_dev(&name) {
            devs.push(dev);
        }
    }
    devs.sort_by(|a, b| {
        (a.disk(), a.partition.unwrap_or(0)).cmp(&(b.disk(), b.partition.unwrap_or(0)))
    });
    Ok(devs)
}

fn read_sysfs_dev(name: &str) -> Option<BlockDev> {
    let base = Path::new(SYS_BLOCK).join(name);
    let devno = parse_devno(fs::read_to_string(base.join("dev")).ok()?.trim())?;
    let sectors: u64 = fs::read_to_string(base.join("size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let partition = fs::read_to_string(base.join("partition"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let parent = if partition.is_some() {
        fs::canonicalize(&base).ok().and_then(|p| {
            p.parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
    } else {
        None
    };
    Some(BlockDev {
        name: name.to_string(),
        devno,
        size: sectors.saturating_mul(512),
        partition,
        parent,
    })
}

fn parse_devno(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Kernel names of the devices stacked on this one (dm-crypt, LVM, md): a held device is in use.
pub fn holders(dev: &BlockDev) -> Vec<String> {
    let dir = Path::new(SYS_BLOCK).join(&dev.name).join("holders");
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Ask udev to probe this device again after a pass rewrote it. Its database still holds what the
/// device carried when the boot began: a `/dev/disk/by-uuid` link to a filesystem that now lives
/// behind the mapping (`root=UUID=` would resolve to the raw partition). udev's inotify watch
/// usually catches the close, but not every initramfs installs the rule that sets it. Best effort:
/// without udev nothing listens and nothing is lost.
pub fn announce_change(dev: &BlockDev) {
    let path = Path::new(SYS_BLOCK).join(&dev.name).join("uevent");
    if let Err(e) = fs::write(&path, b"change\n") {
        log::debug!("cannot write {}: {e}", path.display());
    }
}

/// Name of the device-mapper device a dm-N kernel device carries (`/sys/block/dm-N/dm/name`).
pub fn dm_name(kernel_name: &str) -> Option<String> {
    fs::read_to_string(Path::new(SYS_BLOCK).join(kernel_name).join("dm/name"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Is a device-mapper device with this name active? Read from sysfs so it works without dm ioctls.
pub fn mapping_active(name: &str) -> Option<String> {
    let rd = fs::read_dir(SYS_BLOCK).ok()?;
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dm-"))
        .find(|n| dm_name(n).as_deref() == Some(name))
}

/// A persistent device name from volumes.json or the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    PartUuid(String),
    Uuid(String),
    /// A `/dev/disk/by-path/…` name: udev's link when udev runs, else computed from sysfs.
    ByPath(String),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadSpec {
            spec: s.to_string(),
        };
        if let Some(v) = s.strip_prefix("PARTUUID=") {
            return non_empty(v)
                .map(|v| DeviceSpec::PartUuid(v.to_ascii_lowercase()))
                .ok_or_else(bad);
        }
        if let Some(v) = s.strip_prefix("UUID=") {
            return non_empty(v)
                .map(|v| DeviceSpec::Uuid(v.to_ascii_lowercase()))
                .ok_or_else(bad);
        }
        if let Some(v) = s.strip_prefix("/dev/disk/by-path/") {
            return non_empty(v)
                .filter(|v| !v.contains('/'))
                .map(|v| DeviceSpec::ByPath(v.to_string()))
                .ok_or_else(bad);
        }
        Err(bad())
    }
}

fn non_empty(v: &str) -> Option<&str> {
    let v = v.trim_matches('"');
    (!v.is_empty() && !v.chars().any(char::is_whitespace)).then_some(v)
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::PartUuid(u) => write!(f, "PARTUUID={u}"),
            DeviceSpec::Uuid(u) => write!(f, "UUID={u}"),
            DeviceSpec::ByPath(p) => write!(f, "/dev/disk/by-path/{p}"),
        }
    }
}

/// Find the one device matching `spec` among `devs`. Two matches are an error: a cloned disk must
/// never be encrypted or opened by accident.
pub fn resolve(spec: &DeviceSpec, devs: &[BlockDev]) -> Result<Option<BlockDev>, Error> {
    let mut found: Option<&BlockDev> = None;
    for dev in devs {
        if !matches(spec, dev, devs) {
            continue;
        }
        if let Some(prev) = found {
            return Err(Error::Ambiguous {
                spec: spec.to_string(),
                a: prev.name.clone(),
                b: dev.name.clone(),
            });
        }
        found = Some(dev);
    }
    Ok(found.cloned())
}

fn matches(spec: &DeviceSpec, dev: &BlockDev, devs: &[BlockDev]) -> bool {
    match spec {
        DeviceSpec::PartUuid(want) => {
            partuuid_of(dev, devs).is_some_and(|u| u.eq_ignore_ascii_case(want))
        }
        DeviceSpec::Uuid(want) => probe_node(dev)
            .and_then(|p| p.uuid)
            .is_some_and(|u| u.eq_ignore_ascii_case(want)),
        DeviceSpec::ByPath(want) => {
            pathid::path_id(dev).is_some_and(|ids| ids.iter().any(|id| id == want))
        }
    }
}

fn probe_node(dev: &BlockDev) -> Option<Probe> {
    let node = dev.checked_node().ok()?;
    probe_path(&node).ok().flatten()
}

/// The PARTUUID of a partition, read from its disk's GPT or MBR (the kernel does not export it in sysfs).
pub fn partuuid_of(dev: &BlockDev, devs: &[BlockDev]) -> Option<String> {
    let number = dev.partition?;
    let disk = devs
        .iter()
        .find(|d| Some(d.name.as_str()) == dev.parent.as_deref())?;
    let node = disk.checked_node().ok()?;
    let lbs = logical_block_size(&disk.name);
    let mut f = fs::File::open(node).ok()?;
    let parts = partitions_of(&mut f, lbs).ok()?;
    parts
        .into_iter()
        .find(|p| p.number == number)
        .map(|p| p.uuid)
}

/// Length of an open block device or file: seeking to its end works for both (a block device's
/// metadata length is 0).
pub fn device_len(f: &fs::File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// The physical block size of the disk holding the device or image at `path`: a write of that
/// size is atomic (a larger crypt sector could be torn by a power cut). Image files count as 4096
/// (page-sized writes); anything unreadable counts as 512, the safe floor.
pub fn physical_block_size_of(path: &Path) -> u64 {
    let Ok(real) = fs::canonicalize(path) else {
        return 512;
    };
    let is_block = fs::metadata(&real)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if !is_block {
        return 4096;
    }
    let Some(name) = real.file_name().and_then(|n| n.to_str()) else {
        return 512;
    };
    let sys = Path::new(SYS_BLOCK).join(name);
    let disk = fs::canonicalize(&sys)
        .ok()
        .and_then(|p| {
            if sys.join("partition").exists() {
                p.parent().map(Path::to_path_buf)
            } else {
                Some(p)
            }
        })
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    disk.map(|d| physical_block_size(&d)).unwrap_or(512)
}

/// Logical sector size of a disk (GPT's LBA unit).
pub fn logical_block_size(disk: &str) -> u64 {
    fs::read_to_string(
        Path::new("/sys/block")
            .join(disk)
            .join("queue/logical_block_size"),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(512)
}

/// Physical sector size: the largest write the device promises to make atomically.
pub fn physical_block_size(disk: &str) -> u64 {
    fs::read_to_string(
        Path::new("/sys/block")
            .join(disk)
            .join("queue/physical_block_size"),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(512)
}

/// Poll `check` until it yields a value or `timeout` passes. Devices appear late at boot (hot-plug,
/// slow controllers), so every wait is bounded; each second a debug line says what is still missing.
pub fn poll_until<T, E>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let start = Instant::now();
    let mut last_report = start;
    loop {
        if let Some(v) = check()? {
            return Ok(Some(v));
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Ok(None);
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            log::debug!(
                "still waiting for {what} ({} s of {} s)",
                waited.as_secs(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200).min(timeout.saturating_sub(waited)));
    }
}

/// Resolve `spec`, waiting up to `timeout` for it to appear.
pub fn wait_for(spec: &DeviceSpec, timeout: Duration) -> Result<BlockDev, Error> {
    let found = poll_until(timeout, &spec.to_string(), || {
        let devs = scan()?;
        resolve(spec, &devs)
    })?;
    found.ok_or_else(|| Error::NotFound {
        spec: spec.to_string(),
        secs: timeout.as_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_reject_kernel_names() {
        assert_eq!(
            DeviceSpec::parse("PARTUUID=ABCD-01").unwrap(),
            DeviceSpec::PartUuid("abcd-01".into())
        );
        assert_eq!(
            DeviceSpec::parse("UUID=\"x-y\"").unwrap(),
            DeviceSpec::Uuid("x-y".into())
        );
        assert!(matches!(
            DeviceSpec::parse("/dev/disk/by-path/pci-0000:00:04.0-scsi-0:0:0:1").unwrap(),
            DeviceSpec::ByPath(_)
        ));
        for bad in [
            "/dev/sda2",
            "UUID=",
            "PARTUUID=a b",
            "LABEL=x",
            "/dev/disk/by-path/a/b",
        ] {
            assert!(DeviceSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn poll_until_is_bounded() {
        let start = Instant::now();
        let r: Result<Option<()>, ()> =
            poll_until(Duration::from_millis(300), "nothing", || Ok(None));
        assert_eq!(r, Ok(None));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn scan_reads_this_machines_sysfs() {
        // Every machine running the tests has at least one block device (its root disk).
        let devs = scan().unwrap();
        assert!(devs
            .iter()
            .all(|d| d.partition.is_none() || d.parent.is_some()));
    }
}
