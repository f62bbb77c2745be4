//! What the lifecycle commands need to know about the machine beyond the files of its root tree:
//! which block device an fstab line names, what is mounted where, the key volume's file names,
//! free space, processes using a mount, and what each configured volume's disk is now.
//!
//! Everything is behind the `Machine` trait so host tests can describe a machine (block devices
//! cannot be faked on a build host) while the files themselves (fstab, /etc/default/grub, /boot,
//! lib/modules) are real files in a test tree. `Live` answers from sysfs, udev's database and
//! /proc, the way the running system sees itself.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use crate::blockdev::{self, DeviceSpec};
use crate::boot::{self, Observed};
use crate::config::{Header, Volume};
use crate::pass::Direction;

/// A block device, as far as the lifecycle commands care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    /// Kernel name (`sdb1`, `vda2`, `dm-0`).
    pub name: String,
    /// Kernel name of the whole disk (itself for a disk or a dm device).
    pub disk: String,
    pub partition: Option<u32>,
    pub size: u64,
    /// Filesystem (or `crypto_LUKS`, `LVM2_member`…) on the device.
    pub fstype: Option<String>,
    /// Filesystem UUID.
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub partuuid: Option<String>,
    /// `/dev/disk/by-path/<this>`.
    pub by_path: Option<String>,
    /// ADE's SCSI controller and LUN of the disk (`/dev/disk/azure/scsi<c>/lun<l>`, else the
    /// SCSI address host:…:lun).
    pub scsi: Option<(u32, u32)>,
    /// The platform's temporary resource disk (`/dev/disk/azure/resource`).
    pub resource: bool,
    /// For a device-mapper device: its name and the kind from its dm UUID (`CRYPT`, `LVM`, …).
    pub dm: Option<Dm>,
    /// md RAID and other stacked kinds initcrypt does not encrypt (`md`, `loop`…).
    pub other_kind: Option<String>,
    /// Devices stacked on this one (kernel names).
    pub holders: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dm {
    pub name: String,
    /// The prefix of the dm UUID: `CRYPT`, `LVM`, `mpath`…
    pub kind: String,
    /// Kernel names of the devices below.
    pub slaves: Vec<String>,
}

/// An entry of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// Mount point, as a path inside the root tree ("/", "/boot", "/data").
    pub target: String,
    /// Kernel name of the mounted device, when it is a block device.
    pub device: Option<String>,
    pub fstype: String,
    pub source: String,
}

/// What a configured volume's disk is now (design §2's "observed").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Plaintext,
    Encrypted {
        reencrypt_pending: bool,
    },
    Unfinished {
        direction: Direction,
        done: u64,
        total: u64,
        /// Time since the journal last changed: a recent change means a pass is running now.
        journal_age: Option<Duration>,
    },
    Open {
        dm: String,
    },
    /// Not observable (device or boot partition absent…), with the reason.
    Unknown(String),
}

/// A process using a mount, for check's "who holds /data" finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub pid: u32,
    pub comm: String,
}

pub trait Machine {
    /// The block device an fstab/command-line device field names (`UUID=…`, `PARTUUID=…`,
    /// `LABEL=…`, `/dev/…`), already unescaped.
    fn device(&self, spec: &str) -> Option<Device>;
    /// A block device by kernel name.
    fn device_by_name(&self, name: &str) -> Option<Device>;
    /// What is mounted at `target` (a path inside the root tree), topmost mount.
    fn mounted_at(&self, target: &str) -> Option<Mounted>;
    /// File names on the key volume, or why it was not found.
    fn key_volume(&self) -> Result<Vec<String>, String>;
    /// Free bytes of the filesystem holding `path` (a host path).
    fn free_bytes(&self, path: &Path) -> Option<u64>;
    /// Processes with a file, directory or mapping open on the filesystem mounted at `target`.
    fn users_of(&self, target: &str) -> Vec<User>;
    /// The running kernel's command line (None when preparing an image offline).
    fn cmdline(&self) -> Option<String>;
    /// The running kernel's release (`uname -r`).
    fn running_kernel(&self) -> Option<String>;
    fn mem_total(&self) -> Option<u64>;
    /// What a configured volume's disk is now.
    fn observe(&self, v: &Volume) -> Observation;
    /// Run a tool of the root tree (`tool` is its path inside the tree).
    fn exec(&self, tool: &Path, args: &[&str]) -> std::io::Result<Output>;
}

/// The running system (root "/"), or an image mounted at `root` (`--root DIR`): devices, mounts
/// and processes are the host's either way; tools run inside `root` through a chroot.
pub struct Live {
    pub root: PathBuf,
}

const SYS_BLOCK: &str = "/sys/class/block";

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// udev's database entry of a device: E: properties and S: symlinks.
#[derive(Default)]
struct UdevDb {
    props: Vec<(String, String)>,
    links: Vec<String>,
}

impl UdevDb {
    fn read(devno: &str) -> UdevDb {
        let mut db = UdevDb::default();
        let Ok(text) = fs::read_to_string(format!("/run/udev/data/b{devno}")) else {
            return db;
        };
        for line in text.lines() {
            if let Some(kv) = line.strip_prefix("E:") {
                if let Some((k, v)) = kv.split_once('=') {
                    db.props.push((k.to_string(), v.to_string()));
                }
            } else if let Some(l) = line.strip_prefix("S:") {
                db.links.push(l.to_string());
            }
        }
        db
    }

    fn prop(&self, key: &str) -> Option<String> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }
}

/// ADE's controller/LUN from an Azure udev link `disk/azure/scsi<c>/lun<l>`.
pub fn azure_lun(link: &str) -> Option<(u32, u32)> {
    let rest = link.strip_prefix("disk/azure/scsi")?;
    let (c, lun) = rest.split_once("/lun")?;
    Some((c.parse().ok()?, lun.parse().ok()?))
}

/// udev's escaping of a label in /dev/disk/by-label (`BEK VOLUME` → `BEK\x20VOLUME`).
fn udev_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) {
            out.push(c);
        } else {
            for b in c.to_string().bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out
}

fn kernel_name_of(node: &Path) -> Option<String> {
    let real = fs::canonicalize(node).ok()?;
    let name = real.file_name()?.to_string_lossy().into_owned();
    Path::new(SYS_BLOCK).join(&name).exists().then_some(name)
}

fn kernel_name_of_devno(devno: &str) -> Option<String> {
    let real = fs::canonicalize(format!("/sys/dev/block/{devno}")).ok()?;
    Some(real.file_name()?.to_string_lossy().into_owned())
}

fn list_dir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn describe(name: &str) -> Option<Device> {
    let base = Path::new(SYS_BLOCK).join(name);
    let devno = read_trim(&base.join("dev"))?;
    let size = read_trim(&base.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        * 512;
    let partition = read_trim(&base.join("partition")).and_then(|s| s.parse().ok());
    let disk = if partition.is_some() {
        fs::canonicalize(&base)
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| name.to_string())
    } else {
        name.to_string()
    };
    let db = UdevDb::read(&devno);
    let mut dev = Device {
        name: name.to_string(),
        disk: disk.clone(),
        partition,
        size,
        fstype: db.prop("ID_FS_TYPE"),
        uuid: db.prop("ID_FS_UUID").map(|u| u.to_ascii_lowercase()),
        label: db.prop("ID_FS_LABEL"),
        partuuid: db
            .prop("ID_PART_ENTRY_UUID")
            .map(|u| u.to_ascii_lowercase()),
        holders: list_dir(&base.join("holders")),
        ..Default::default()
    };
    for l in &db.links {
        if let Some(p) = l.strip_prefix("disk/by-path/") {
            dev.by_path.get_or_insert_with(|| p.to_string());
        }
        if l.starts_with("disk/azure/resource") || l.starts_with("disk/cloud/azure_resource") {
            dev.resource = true;
        }
    }
    // The disk's Azure link names the LUN (a partition's link is `lun<l>-part<n>`).
    let disk_db = if disk == name {
        db
    } else {
        read_trim(&Path::new(SYS_BLOCK).join(&disk).join("dev"))
            .map(|d| UdevDb::read(&d))
            .unwrap_or_default()
    };
    dev.scsi = disk_db.links.iter().find_map(|l| azure_lun(l));
    if disk_db
        .links
        .iter()
        .any(|l| l.starts_with("disk/azure/resource") || l.starts_with("disk/cloud/azure_resource"))
    {
        dev.resource = true;
    }
    if dev.scsi.is_none() && !disk_db.links.iter().any(|l| l.starts_with("disk/azure/")) {
        // Off Azure (the QEMU harness): controller = SCSI host number, LUN = the address's last part.
        dev.scsi = list_dir(&Path::new(SYS_BLOCK).join(&disk).join("device/scsi_device"))
            .first()
            .and_then(|hctl| {
                let p: Vec<u32> = hctl.split(':').filter_map(|x| x.parse().ok()).collect();
                (p.len() == 4).then(|| (p[0], p[3]))
            });
    }
    if name.starts_with("dm-") {
        let dm_uuid = read_trim(&base.join("dm/uuid")).unwrap_or_default();
        dev.dm = Some(Dm {
            name: read_trim(&base.join("dm/name")).unwrap_or_default(),
            kind: dm_uuid.split('-').next().unwrap_or("").to_string(),
            slaves: list_dir(&base.join("slaves")),
        });
    } else if name.starts_with("md") || name.starts_with("loop") || name.starts_with("nbd") {
        dev.other_kind = Some(
            name.trim_end_matches(|c: char| c.is_ascii_digit() || c == 'p')
                .to_string(),
        );
    }
    // Without udev (a bare initramfs, a container): read the superblock and partition table ourselves.
    if dev.fstype.is_none() || (dev.partition.is_some() && dev.partuuid.is_none()) {
        let bd = blockdev::scan().ok().and_then(|devs| {
            devs.iter()
                .find(|d| d.name == name)
                .cloned()
                .map(|d| (d, devs))
        });
        if let Some((bd, devs)) = bd {
            if dev.fstype.is_none() {
                if let Some(p) = bd
                    .checked_node()
                    .ok()
                    .and_then(|n| fs::File::open(n).ok())
                    .and_then(|f| blockdev::probe(&f).ok().flatten())
                {
                    dev.fstype = Some(p.fstype.to_string());
                    dev.uuid = dev.uuid.or(p.uuid);
                }
            }
            if dev.partuuid.is_none() {
                dev.partuuid = blockdev::partuuid_of(&bd, &devs);
            }
        }
    }
    Some(dev)
}

/// Unescape mountinfo's octal escapes (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    super::fstab::unescape(s)
}

impl Live {
    pub fn new(root: &Path) -> Live {
        Live {
            root: root.to_path_buf(),
        }
    }

    fn host_path(&self, target: &str) -> PathBuf {
        self.root.join(target.trim_start_matches('/'))
    }

    fn offline(&self) -> bool {
        self.root != Path::new("/")
    }

    /// (devno, host mount point) of every mount, in mount order.
    fn mountinfo() -> Vec<(String, PathBuf, String, String)> {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let f: Vec<&str> = left.split(' ').collect();
                let r: Vec<&str> = right.split(' ').collect();
                Some((
                    f.get(2)?.to_string(),
                    PathBuf::from(unescape_mountinfo(f.get(4)?)),
                    r.first()?.to_string(),
                    unescape_mountinfo(r.get(1).unwrap_or(&"")),
                ))
            })
            .collect()
    }

    fn mount_devno(&self, target: &str) -> Option<u64> {
        let host = self.host_path(target);
        let m = fs::metadata(&host).ok()?;
        Some(m.dev())
    }
}

impl Machine for Live {
    fn device(&self, spec: &str) -> Option<Device> {
        let by = |dir: &str, v: &str| PathBuf::from(format!("/dev/disk/{dir}/{v}"));
        let (node, fallback) = if let Some(v) = spec.strip_prefix("UUID=") {
            (by("by-uuid", v), DeviceSpec::parse(spec).ok())
        } else if let Some(v) = spec.strip_prefix("PARTUUID=") {
            (
                by("by-partuuid", &v.to_ascii_lowercase()),
                DeviceSpec::parse(spec).ok(),
            )
        } else if let Some(v) = spec.strip_prefix("LABEL=") {
            (by("by-label", &udev_escape(v)), None)
        } else if let Some(v) = spec.strip_prefix("PARTLABEL=") {
            (by("by-partlabel", &udev_escape(v)), None)
        } else if spec.starts_with('/') {
            (PathBuf::from(spec), None)
        } else {
            return None;
        };
        if let Some(name) = kernel_name_of(&node) {
            return describe(&name);
        }
        // No udev links (bare initramfs, container): our own scan for UUID=/PARTUUID=.
        let devs = blockdev::scan().ok()?;
        let found = blockdev::resolve(&fallback?, &devs).ok().flatten()?;
        describe(&found.name)
    }

    fn device_by_name(&self, name: &str) -> Option<Device> {
        describe(name)
    }

    fn mounted_at(&self, target: &str) -> Option<Mounted> {
        let host = self.host_path(target);
        let host = fs::canonicalize(&host).unwrap_or(host);
        Live::mountinfo()
            .into_iter()
            .rev()
            .find(|(_, point, _, _)| *point == host)
            .map(|(devno, _, fstype, source)| Mounted {
                target: target.to_string(),
                device: kernel_name_of_devno(&devno),
                fstype,
                source,
            })
    }

    fn key_volume(&self) -> Result<Vec<String>, String> {
        crate::keyvol::find(Duration::ZERO)
            .map(|kv| {
                let mut names: Vec<String> =
                    kv.0.iter()
                        .flat_map(|v| v.files.iter().map(|f| f.name.clone()))
                        .collect();
                names.sort();
                names.dedup();
                names
            })
            .map_err(|e| e.to_string())
    }

    fn free_bytes(&self, path: &Path) -> Option<u64> {
        let st = rustix::fs::statvfs(path).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn users_of(&self, target: &str) -> Vec<User> {
        if self.offline() {
            return Vec::new();
        }
        let Some(dev) = self.mount_devno(target) else {
            return Vec::new();
        };
        let me = std::process::id();
        let mut users = Vec::new();
        for pid in list_dir(Path::new("/proc"))
            .iter()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            if pid == me {
                continue;
            }
            let base = PathBuf::from(format!("/proc/{pid}"));
            let mut paths: Vec<PathBuf> = ["cwd", "root", "exe"]
                .iter()
                .map(|l| base.join(l))
                .collect();
            paths.extend(
                list_dir(&base.join("fd"))
                    .iter()
                    .map(|fd| base.join("fd").join(fd)),
            );
            let uses = paths.iter().any(|p| {
                fs::metadata(p)
                    .map(|m| m.dev() == dev && !m.file_type().is_char_device_like())
                    .unwrap_or(false)
            });
            if uses {
                users.push(User {
                    pid,
                    comm: read_trim(&base.join("comm")).unwrap_or_default(),
                });
            }
        }
        users
    }

    fn cmdline(&self) -> Option<String> {
        if self.offline() {
            return None;
        }
        read_trim(Path::new("/proc/cmdline"))
    }

    fn running_kernel(&self) -> Option<String> {
        Some(
            rustix::system::uname()
                .release()
                .to_string_lossy()
                .into_owned(),
        )
    }

    fn mem_total(&self) -> Option<u64> {
        let text = fs::read_to_string("/proc/meminfo").ok()?;
        let kb: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    fn observe(&self, v: &Volume) -> Observation {
        let loc = match boot::locate(v, Duration::ZERO, boot::Access::ReadOnly) {
            Ok(l) => l,
            Err(e) => return Observation::Unknown(e.to_string()),
        };
        match boot::observe(v, &loc) {
            Ok(Observed::Plaintext { .. }) => Observation::Plaintext,
            Ok(Observed::Encrypted(i)) => Observation::Encrypted {
                reencrypt_pending: i.reencrypt_pending,
            },
            Ok(Observed::Open { dm }) => Observation::Open { dm },
            Ok(Observed::Unfinished {
                direction,
                done,
                total,
            }) => {
                let journal_age = match (&v.header, &loc.header) {
                    (Header::Detached { .. }, Some(h)) => {
                        fs::metadata(crate::pass::Paths::for_header(h).journal)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| SystemTime::now().duration_since(t).ok())
                    }
                    _ => None,
                };
                Observation::Unfinished {
                    direction,
                    done,
                    total,
                    journal_age,
                }
            }
            Err(e) => Observation::Unknown(e.to_string()),
        }
    }

    fn exec(&self, tool: &Path, args: &[&str]) -> std::io::Result<Output> {
        let path_env = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        if !self.offline() {
            return Command::new(tool).args(args).env("PATH", path_env).output();
        }
        super::chroot::prepare(&self.root)?;
        Command::new("chroot")
            .arg(&self.root)
            .arg(tool)
            .args(args)
            .env("PATH", path_env)
            .output()
    }
}

/// Character devices (/dev/null on a data mount's dev?) never mean "uses the filesystem".
trait CharDev {
    fn is_char_device_like(&self) -> bool;
}

impl CharDev for fs::FileType {
    fn is_char_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_char_device() || self.is_block_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_links() {
        assert_eq!(azure_lun("disk/azure/scsi1/lun0"), Some((1, 0)));
        assert_eq!(azure_lun("disk/azure/scsi1/lun12"), Some((1, 12)));
        assert_eq!(azure_lun("disk/azure/scsi1/lun0-part1"), None);
        assert_eq!(azure_lun("disk/azure/root"), None);
    }

    #[test]
    fn udev_label_escape() {
        assert_eq!(udev_escape("BEK VOLUME"), "BEK\\x20VOLUME");
        assert_eq!(udev_escape("root-fs_1"), "root-fs_1");
    }
}
