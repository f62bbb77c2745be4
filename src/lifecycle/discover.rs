//! Everything `check` and `enable`/`disable` look at, gathered once: the root tree's fstab,
//! crypttab, volumes.json, boot configuration, kernels and initramfs builder, plus what the machine
//! says about the devices behind them. Nothing here changes anything.
//!
//! Which fstab lines are data volumes: block-device filesystems other than `/`, `/boot`,
//! `/boot/efi` (and `/efi`), swap, the key volume (`LABEL=BEK VOLUME`, `/mnt/azure_bek_disk`) and
//! the platform's temporary resource disk. The resource disk is recognised by its udev link
//! (`/dev/disk/azure/resource`, `/dev/disk/cloud/azure_resource`), by cloud-init's mark on its
//! fstab line (`comment=cloudconfig`), or by waagent's `ResourceDisk.MountPoint` (default
//! `/mnt/resource`) when `ResourceDisk.Format=y`: it is wiped at every redeploy, so ADE leaves it
//! alone (or re-creates it encrypted with a throw-away key, which is [7]'s business).

use std::fs;
use std::path::{Path, PathBuf};

use super::bootcfg::BootConfig;
use super::crypttab::{self, Crypttab};
use super::fstab::{self, Entry, Fstab};
use super::initramfs::{self, Builder, Kernel};
use super::machine::{Device, Machine, Mounted};
use super::volumes;
use super::VolumeType;
use crate::blockdev::DeviceSpec;
use crate::config::{self, Desired, Header, MountSpec, PassSpec, Role, Volume};
use crate::keyvol::OS_KEY_FILE;

/// Filesystems a boot partition can have for initcrypt to mount it and keep headers there.
pub const BOOT_FSTYPES: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs"];

/// How the root filesystem is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A filesystem on a partition: what initcrypt encrypts in place.
    Partition,
    /// Already on a dm-crypt mapping (an ADE VM, or initcrypt already done).
    Encrypted {
        name: String,
        below: Option<Box<Device>>,
    },
    /// On LVM (issue [8]).
    Lvm,
    /// A filesystem on a whole disk (no partition table: nothing to name by PARTUUID).
    WholeDisk,
    Other(String),
    Unknown(String),
}

#[derive(Debug, Clone)]
pub struct OsFacts {
    pub entry: Option<Entry>,
    pub device: Option<Device>,
    pub layout: Layout,
    pub fs_uuid: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BootFacts {
    pub entry: Option<Entry>,
    pub device: Option<Device>,
    /// Mounted at /boot in the tree (required: headers go there, images are written there).
    pub mounted: bool,
    pub fs_uuid: Option<String>,
    pub fstype: Option<String>,
}

/// What an fstab line that is a data filesystem turned out to be.
#[derive(Debug, Clone)]
pub enum DataKind {
    /// A plaintext filesystem initcrypt can encrypt in place.
    Candidate {
        device: Box<Device>,
        mounted: Option<Mounted>,
    },
    /// Already `/dev/mapper/<name>` of a volume in volumes.json.
    Managed { name: String },
    /// On a mapping someone else opens (ADE's crypttab line): left as it is.
    Foreign { why: String },
    /// A kind initcrypt does not encrypt yet (LVM LV, md RAID…).
    Unsupported { why: String },
    /// The device the line names is not there.
    Missing,
}

#[derive(Debug, Clone)]
pub struct DataFacts {
    pub entry: Entry,
    pub kind: DataKind,
}

/// A volume `enable` would configure, and the notes check prints about it.
#[derive(Debug, Clone)]
pub struct Planned {
    pub volume: Volume,
    /// The fstab line it comes from (data volumes).
    pub entry: Option<Entry>,
    /// Which key file and why.
    pub key_note: String,
    /// Its header does not exist yet: the boot partition needs room for it.
    pub new_header: bool,
}

/// A data line enable cannot turn into a volume, and why.
#[derive(Debug, Clone)]
pub struct Unplannable {
    pub entry: Entry,
    pub why: String,
}

pub struct Inventory {
    pub root: PathBuf,
    pub offline: bool,
    pub fstab_path: PathBuf,
    pub fstab: Result<Fstab, fstab::Error>,
    pub crypttab_path: PathBuf,
    pub crypttab: Result<Crypttab, crypttab::Error>,
    pub config_path: PathBuf,
    /// volumes.json, or why it is invalid.
    pub config: Result<Vec<Volume>, String>,
    pub os: OsFacts,
    pub boot: BootFacts,
    pub data: Vec<DataFacts>,
    pub keyvol: Result<Vec<String>, String>,
    pub kernels: Vec<Kernel>,
    pub builder: Option<Builder>,
    pub bootcfg: BootConfig,
}

fn read_optional(p: &Path) -> Result<String, std::io::Error> {
    match fs::read_to_string(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other,
    }
}

fn is_block_spec(spec: &str) -> bool {
    ["UUID=", "PARTUUID=", "LABEL=", "PARTLABEL=", "/dev/"]
        .iter()
        .any(|p| spec.starts_with(p))
}

const NOT_BLOCK_FS: &[&str] = &[
    "swap",
    "tmpfs",
    "proc",
    "sysfs",
    "devpts",
    "devtmpfs",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "9p",
    "overlay",
    "fuse",
    "fuse.sshfs",
    "none",
    "bind",
    "cgroup",
    "cgroup2",
    "debugfs",
    "securityfs",
    "efivarfs",
    "hugetlbfs",
    "mqueue",
    "binfmt_misc",
    "autofs",
    "ramfs",
    "squashfs",
    "iso9660",
];

/// waagent's resource disk mount point, when waagent formats it.
fn waagent_resource_mount(root: &Path) -> Option<String> {
    let text = fs::read_to_string(root.join("etc/waagent.conf")).ok()?;
    let get = |key: &str| {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().to_string())
    };
    (get("ResourceDisk.Format").as_deref() == Some("y"))
        .then(|| get("ResourceDisk.MountPoint").unwrap_or_else(|| "/mnt/resource".into()))
}

/// Why an fstab entry is not a data volume (None: it is one).
pub fn not_data(e: &Entry, root: &Path) -> Option<&'static str> {
    let t = fstab::normalise_target(&e.target);
    if NOT_BLOCK_FS.contains(&e.fstype.as_str()) || e.has_option("bind") || !is_block_spec(&e.spec)
    {
        return Some("not a block-device filesystem");
    }
    if matches!(t.as_str(), "/" | "/boot" | "/boot/efi" | "/efi") {
        return Some("part of the OS");
    }
    if e.spec == "LABEL=BEK VOLUME" || t == "/mnt/azure_bek_disk" {
        return Some("the key volume");
    }
    if e.has_option("comment") && e.options.contains("comment=cloudconfig") {
        return Some("the resource disk (cloud-init)");
    }
    if waagent_resource_mount(root).is_some_and(|m| fstab::normalise_target(&m) == t) {
        return Some("the resource disk (waagent)");
    }
    None
}

/// Where the root filesystem lives.
fn os_layout(m: &dyn Machine, dev: &Device) -> Layout {
    if let Some(dm) = &dev.dm {
        return match dm.kind.as_str() {
            "CRYPT" => Layout::Encrypted {
                name: dm.name.clone(),
                below: dm
                    .slaves
                    .first()
                    .and_then(|s| m.device_by_name(s))
                    .map(Box::new),
            },
            "LVM" => Layout::Lvm,
            other => Layout::Other(format!("device-mapper {other} device {}", dm.name)),
        };
    }
    if let Some(k) = &dev.other_kind {
        return Layout::Other(format!("{k} device {}", dev.name));
    }
    if dev.fstype.as_deref() == Some("LVM2_member") {
        return Layout::Lvm;
    }
    if dev.partition.is_none() {
        return Layout::WholeDisk;
    }
    Layout::Partition
}

impl Inventory {
    pub fn gather(m: &dyn Machine, root: &Path, offline: bool) -> Inventory {
        let fstab_path = root.join("etc/fstab");
        let fstab = read_optional(&fstab_path)
            .map_err(|e| fstab::Error::Malformed {
                line: 0,
                why: format!("cannot read it: {e}"),
            })
            .and_then(|t| Fstab::parse(&t));
        let crypttab_path = root.join("etc/crypttab");
        let crypttab = read_optional(&crypttab_path)
            .map_err(|e| crypttab::Error::Malformed {
                line: 0,
                why: format!("cannot read it: {e}"),
            })
            .and_then(|t| Crypttab::parse(&t));
        let config_path = root.join(config::DEFAULT_PATH.trim_start_matches('/'));
        let config = match fs::read_to_string(&config_path) {
            Ok(t) => config::parse(&t, &config_path).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("cannot read {}: {e}", config_path.display())),
        };
        let entries = fstab.as_ref().map(|f| f.entries()).unwrap_or_default();
        let os = Self::os_facts(m, &entries);
        let boot = Self::boot_facts(m, &entries);
        let managed: Vec<String> = config
            .as_ref()
            .map(|v| v.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default();
        let ct_names: Vec<String> = crypttab
            .as_ref()
            .map(|c| c.entries().into_iter().map(|e| e.name).collect())
            .unwrap_or_default();
        let data = entries
            .iter()
            .filter(|e| not_data(e, root).is_none())
            .map(|e| DataFacts {
                entry: e.clone(),
                kind: Self::data_kind(m, e, &managed, &ct_names),
            })
            .collect();
        Inventory {
            root: root.to_path_buf(),
            offline,
            fstab_path,
            fstab,
            crypttab_path,
            crypttab,
            config_path,
            config,
            os,
            boot,
            data,
            keyvol: m.key_volume(),
            kernels: initramfs::kernels(root),
            builder: Builder::detect(root),
            bootcfg: BootConfig::read(root),
        }
    }

    fn os_facts(m: &dyn Machine, entries: &[Entry]) -> OsFacts {
        let entry = entries
            .iter()
            .find(|e| fstab::normalise_target(&e.target) == "/")
            .cloned();
        let mounted = m.mounted_at("/");
        let device = mounted
            .as_ref()
            .and_then(|mm| mm.device.as_deref())
            .and_then(|n| m.device_by_name(n))
            .or_else(|| entry.as_ref().and_then(|e| m.device(&e.spec)));
        let layout = match &device {
            Some(d) => os_layout(m, d),
            None => Layout::Unknown(match mounted {
                Some(mm) => format!("/ is mounted from {} ({}), not a block device", mm.source, mm.fstype),
                None => "nothing is mounted at the root of the tree and fstab names no device found here".into(),
            }),
        };
        let fs_uuid = device.as_ref().and_then(|d| d.uuid.clone());
        OsFacts {
            entry,
            device,
            layout,
            fs_uuid,
        }
    }

    fn boot_facts(m: &dyn Machine, entries: &[Entry]) -> BootFacts {
        let entry = entries
            .iter()
            .find(|e| fstab::normalise_target(&e.target) == "/boot")
            .cloned();
        let mounted = m.mounted_at("/boot");
        let device = mounted
            .as_ref()
            .and_then(|mm| mm.device.as_deref())
            .and_then(|n| m.device_by_name(n))
            .or_else(|| entry.as_ref().and_then(|e| m.device(&e.spec)));
        BootFacts {
            fs_uuid: device.as_ref().and_then(|d| d.uuid.clone()),
            fstype: device.as_ref().and_then(|d| d.fstype.clone()),
            mounted: mounted.is_some(),
            entry,
            device,
        }
    }

    fn data_kind(m: &dyn Machine, e: &Entry, managed: &[String], crypttab: &[String]) -> DataKind {
        if let Some(name) = e.spec.strip_prefix("/dev/mapper/") {
            if managed.iter().any(|n| n == name) {
                return DataKind::Managed {
                    name: name.to_string(),
                };
            }
            if crypttab.iter().any(|n| n == name) {
                return DataKind::Foreign {
                    why: format!("/dev/mapper/{name} is opened by the real root's crypttab (ADE or another tool)"),
                };
            }
        }
        let Some(dev) = m.device(&e.spec) else {
            return DataKind::Missing;
        };
        if let Some(dm) = &dev.dm {
            return match dm.kind.as_str() {
                "CRYPT" => DataKind::Foreign {
                    why: format!("already encrypted (mapping {}) by another tool", dm.name),
                },
                "LVM" => DataKind::Unsupported {
                    why: format!(
                        "an LVM logical volume ({}): encrypting data on LVM is not supported yet",
                        dm.name
                    ),
                },
                k => DataKind::Unsupported {
                    why: format!("a device-mapper {k} device ({})", dm.name),
                },
            };
        }
        if let Some(k) = &dev.other_kind {
            return DataKind::Unsupported {
                why: format!("a {k} device ({}): not supported yet", dev.name),
            };
        }
        if dev.fstype.as_deref() == Some("crypto_LUKS") {
            return DataKind::Foreign {
                why: "a LUKS volume opened by someone else".into(),
            };
        }
        let mounted = m.mounted_at(&e.target);
        DataKind::Candidate {
            device: Box::new(dev),
            mounted,
        }
    }

    /// Existing volumes.json entries (empty when absent or invalid).
    pub fn existing(&self) -> Vec<Volume> {
        self.config.clone().unwrap_or_default()
    }

    pub fn existing_os(&self) -> Option<Volume> {
        self.existing().into_iter().find(|v| v.role == Role::Os)
    }

    pub fn boot_header_exists(&self, rel: &Path) -> bool {
        self.root.join("boot").join(rel).exists()
    }

    /// Key file for a data volume on SCSI `scsi`, and the note check prints about it.
    fn data_key(&self, scsi: Option<(u32, u32)>) -> (String, String) {
        let lun = scsi.map(|(c, l)| volumes::lun_key_file(c, l));
        match (&self.keyvol, lun) {
            (Ok(files), Some(l)) if files.contains(&l) => (l.clone(), format!("{l} (on the key volume)")),
            (Ok(_), Some(l)) => (
                OS_KEY_FILE.into(),
                format!("{OS_KEY_FILE}: {l} is not on the key volume (ADE uses the OS key then)"),
            ),
            (Ok(_), None) => (OS_KEY_FILE.into(), format!("{OS_KEY_FILE}: not a SCSI LUN")),
            (Err(_), Some(l)) => (
                l.clone(),
                format!("{l} (key volume not visible now: the boot falls back to {OS_KEY_FILE} when it is the only key file)"),
            ),
            (Err(_), None) => (OS_KEY_FILE.into(), format!("{OS_KEY_FILE}: not a SCSI LUN")),
        }
    }

    /// The OS volume enable would configure (None, with the reason, when it cannot).
    pub fn plan_os(&self) -> Result<Planned, String> {
        let boot_uuid = self.boot.fs_uuid.clone();
        if let Some(mut v) = self.existing_os() {
            v.desired = Desired::Encrypted;
            let new_header = match &v.header {
                Header::Detached { path, .. } => {
                    !self.boot_header_exists(path) && self.layout_is_plain()
                }
                Header::Attached => false,
            };
            return Ok(Planned {
                volume: v,
                entry: self.os.entry.clone(),
                key_note: format!("{OS_KEY_FILE} (already configured)"),
                new_header,
            });
        }
        let detached = |boot_uuid: &Option<String>, path: &str| -> Result<Header, String> {
            let u = boot_uuid
                .clone()
                .ok_or("the boot partition's filesystem UUID is unknown (no separate /boot?)")?;
            Ok(Header::Detached {
                boot_uuid: u,
                path: PathBuf::from(path),
            })
        };
        let (name, device, header, new_header) = match &self.os.layout {
            Layout::Partition => {
                let d = self.os.device.as_ref().ok_or("root device unknown")?;
                let pu = d
                    .partuuid
                    .clone()
                    .ok_or("the root partition has no PARTUUID")?;
                (
                    config::ADE_OS_NAME.to_string(),
                    DeviceSpec::PartUuid(pu),
                    detached(&boot_uuid, config::ADE_HEADER_PATH)?,
                    !self.boot_header_exists(Path::new(config::ADE_HEADER_PATH)),
                )
            }
            Layout::Encrypted { name, below } => {
                let b = below
                    .as_ref()
                    .ok_or("the partition below the root mapping is unknown")?;
                let pu = b
                    .partuuid
                    .clone()
                    .ok_or("the partition below the root mapping has no PARTUUID")?;
                let header = if self.boot_header_exists(Path::new(config::ADE_HEADER_PATH)) {
                    detached(&boot_uuid, config::ADE_HEADER_PATH)?
                } else {
                    Header::Attached
                };
                (name.clone(), DeviceSpec::PartUuid(pu), header, false)
            }
            other => return Err(layout_why(other)),
        };
        Ok(Planned {
            volume: Volume {
                name,
                role: Role::Os,
                device,
                header,
                key_file: OS_KEY_FILE.into(),
                desired: Desired::Encrypted,
                mount: None,
                pass: PassSpec::default(),
            },
            entry: self.os.entry.clone(),
            key_note: format!("{OS_KEY_FILE} (ADE's OS key file)"),
            new_header,
        })
    }

    fn layout_is_plain(&self) -> bool {
        self.os.layout == Layout::Partition
    }

    /// The data volumes enable would configure, and the data lines it cannot take.
    pub fn plan_data(&self) -> (Vec<Planned>, Vec<Unplannable>) {
        let existing = self.existing();
        let mut planned = Vec::new();
        let mut refused = Vec::new();
        for d in &self.data {
            match &d.kind {
                DataKind::Managed { name } => {
                    if let Some(mut v) = existing.iter().find(|v| &v.name == name).cloned() {
                        v.desired = Desired::Encrypted;
                        planned.push(Planned {
                            key_note: format!("{} (already configured)", v.key_file),
                            volume: v,
                            entry: Some(d.entry.clone()),
                            new_header: false,
                        });
                    }
                }
                DataKind::Candidate { device, .. } => {
                    match self.plan_candidate(&d.entry, device, &existing) {
                        Ok(p) => planned.push(p),
                        Err(why) => refused.push(Unplannable {
                            entry: d.entry.clone(),
                            why,
                        }),
                    }
                }
                DataKind::Unsupported { why } => refused.push(Unplannable {
                    entry: d.entry.clone(),
                    why: why.clone(),
                }),
                DataKind::Missing => refused.push(Unplannable {
                    entry: d.entry.clone(),
                    why: format!("{} names no device present on this machine", d.entry.spec),
                }),
                DataKind::Foreign { .. } => {}
            }
        }
        // Two lines on one name would be one mapping for two disks.
        let mut seen = std::collections::BTreeSet::new();
        planned.retain(|p| {
            let fresh = seen.insert(p.volume.name.clone());
            if !fresh {
                refused.push(Unplannable {
                    entry: p.entry.clone().unwrap_or_else(|| Entry {
                        line: 0,
                        spec: String::new(),
                        target: String::new(),
                        fstype: String::new(),
                        options: String::new(),
                        freq: None,
                        passno: None,
                    }),
                    why: format!("another fstab line is already volume {}", p.volume.name),
                });
            }
            fresh
        });
        (planned, refused)
    }

    fn plan_candidate(
        &self,
        e: &Entry,
        dev: &Device,
        existing: &[Volume],
    ) -> Result<Planned, String> {
        let device = match (dev.partition, &dev.partuuid, &dev.by_path) {
            (Some(_), Some(pu), _) => DeviceSpec::PartUuid(pu.clone()),
            (None, _, Some(bp)) => DeviceSpec::ByPath(bp.clone()),
            (Some(_), None, _) => return Err(format!("partition {} has no PARTUUID", dev.name)),
            (None, _, None) => {
                return Err(format!(
                    "{} is a whole disk without a /dev/disk/by-path name (udev not running?)",
                    dev.name
                ))
            }
        };
        let boot_uuid = self
            .boot
            .fs_uuid
            .clone()
            .ok_or("no boot partition to hold its detached header")?;
        if let Some(v) = existing.iter().find(|v| v.device == device) {
            let mut v = v.clone();
            v.desired = Desired::Encrypted;
            return Ok(Planned {
                key_note: format!("{} (already configured)", v.key_file),
                volume: v,
                entry: Some(e.clone()),
                new_header: false,
            });
        }
        let name =
            volumes::data_name(dev.scsi, dev.partition, dev.uuid.as_deref()).ok_or_else(|| {
                format!(
                    "{} has neither a SCSI LUN nor a filesystem UUID to name it by",
                    dev.name
                )
            })?;
        if let Some(v) = existing.iter().find(|v| v.name == name) {
            return Err(format!(
                "volumes.json already has a volume {name} on {} (another disk)",
                v.device
            ));
        }
        let (key_file, key_note) = self.data_key(dev.scsi);
        let header_rel = PathBuf::from(format!("luks/{name}.hdr"));
        Ok(Planned {
            new_header: !self.boot_header_exists(&header_rel),
            volume: Volume {
                name,
                role: Role::Data,
                device,
                header: Header::Detached {
                    boot_uuid,
                    path: header_rel,
                },
                key_file,
                desired: Desired::Encrypted,
                mount: Some(MountSpec {
                    target: PathBuf::from(fstab::normalise_target(&e.target)),
                    fstype: e.fstype.clone(),
                    options: Some(e.options.clone()),
                }),
                pass: PassSpec::default(),
            },
            entry: Some(e.clone()),
            key_note,
        })
    }

    /// Planned volumes of the requested types.
    pub fn plan(&self, vt: VolumeType) -> (Vec<Planned>, Vec<Unplannable>, Option<String>) {
        let mut planned = Vec::new();
        let mut os_error = None;
        if vt.includes(Role::Os) {
            match self.plan_os() {
                Ok(p) => planned.push(p),
                Err(e) => os_error = Some(e),
            }
        }
        let mut refused = Vec::new();
        if vt.includes(Role::Data) {
            let (p, r) = self.plan_data();
            planned.extend(p);
            refused = r;
        }
        (planned, refused, os_error)
    }
}

pub fn layout_why(l: &Layout) -> String {
    match l {
        Layout::Partition => "a partition".into(),
        Layout::Encrypted { name, .. } => format!("already on mapping {name}"),
        Layout::Lvm => "the root is on LVM, which initcrypt does not encrypt yet (issue [8]); keep ADE or a plain partition root".into(),
        Layout::WholeDisk => "the root filesystem fills a whole disk with no partition table: nothing to name it by PARTUUID".into(),
        Layout::Other(w) => format!("the root is on a {w}, which initcrypt does not encrypt"),
        Layout::Unknown(w) => w.clone(),
    }
}

/// True when the planned volume's header is detached on the boot partition.
pub fn is_detached(v: &Volume) -> bool {
    matches!(v.header, Header::Detached { .. })
}
