//! `/dev/disk/by-path/…` names without udev. When udev runs, its link decides; in a busybox
//! initramfs we compute the same name from the sysfs path the way systemd 252's path_id does for the
//! buses a cloud VM uses: PCI, virtio (transparent) and SCSI (host number relative to the
//! controller's first host, so the name survives probe-order changes).
//!
//! Unknown bus components yield no name at all rather than a guess: a wrong match could open or
//! later encrypt the wrong disk.

use std::fs;
use std::path::{Path, PathBuf};

use super::BlockDev;

/// The by-path names this device answers to (empty when it cannot be named).
pub fn path_id(dev: &BlockDev) -> Option<Vec<String>> {
    let mut ids = Vec::new();
    if let Some(name) = udev_names(dev) {
        ids.extend(name);
    }
    if let Some(disk_id) = computed_disk_id(dev.disk()) {
        match dev.partition {
            Some(n) => ids.push(format!("{disk_id}-part{n}")),
            None => ids.push(disk_id),
        }
    }
    (!ids.is_empty()).then_some(ids)
}

/// Names of udev links pointing at this device, when udev populated /dev/disk/by-path.
fn udev_names(dev: &BlockDev) -> Option<Vec<String>> {
    let rd = fs::read_dir("/dev/disk/by-path").ok()?;
    let names = rd
        .flatten()
        .filter(|e| {
            fs::canonicalize(e.path())
                .ok()
                .and_then(|p| {
                    p.file_name()
                        .map(|n| n.to_string_lossy() == dev.name.as_str())
                })
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    Some(names)
}

fn computed_disk_id(disk: &str) -> Option<String> {
    let real = fs::canonicalize(Path::new("/sys/class/block").join(disk)).ok()?;
    id_from_sysfs_path(&real, &host_base)
}

/// Lowest `hostN` number among the SCSI hosts of one controller (the directory holding `host_dir`).
fn host_base(host_dir: &Path) -> Option<u32> {
    let parent = host_dir.parent()?;
    fs::read_dir(parent)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("host")?.parse().ok())
        .min()
}

fn is_pci_addr(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() == 12 && b[4] == b':' && b[7] == b':' && b[10] == b'.'
}

fn scsi_hctl(c: &str) -> Option<[u32; 4]> {
    let v: Vec<u32> = c
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    <[u32; 4]>::try_from(v).ok()
}

/// Pure part of the computation, separated so it can be tested on a made-up sysfs path.
pub fn id_from_sysfs_path(real: &Path, host_base: &dyn Fn(&Path) -> Option<u32>) -> Option<String> {
    let comps: Vec<String> = real
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let devices = comps.iter().position(|c| c == "devices")?;
    let block = comps.iter().rposition(|c| c == "block")?;
    let mut parts: Vec<String> = Vec::new();
    for (i, c) in comps.iter().enumerate().take(block).skip(devices + 1) {
        if c.starts_with("pci") && c.contains(':') && !is_pci_addr(c) {
            continue; // the root bridge `pci0000:00`
        }
        if is_pci_addr(c) {
            parts.push(format!("pci-{c}"));
        } else if let Some([h, ch, t, l]) = scsi_hctl(c) {
            let host_dir: PathBuf = comps[..i].iter().collect::<PathBuf>();
            let host_dir = host_dir.ancestors().find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("host"))
            })?;
            let base = host_base(host_dir).unwrap_or(h);
            parts.push(format!("scsi-{}:{ch}:{t}:{l}", h.checked_sub(base)?));
        } else if c.starts_with("virtio") || c.starts_with("host") || c.starts_with("target") {
            continue;
        } else {
            return None;
        }
    }
    (!parts.is_empty()).then(|| parts.join("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_scsi_lun() {
        let p = Path::new(
            "/sys/devices/pci0000:00/0000:00:04.0/virtio1/host2/target2:0:0/2:0:0:1/block/sda",
        );
        assert_eq!(
            id_from_sysfs_path(p, &|_| Some(2)).as_deref(),
            Some("pci-0000:00:04.0-scsi-0:0:0:1")
        );
    }

    #[test]
    fn virtio_blk() {
        let p = Path::new("/sys/devices/pci0000:00/0000:00:05.0/virtio2/block/vda");
        assert_eq!(
            id_from_sysfs_path(p, &|_| None).as_deref(),
            Some("pci-0000:00:05.0")
        );
    }

    #[test]
    fn unknown_bus_gives_no_name() {
        let p = Path::new(
            "/sys/devices/LNXSYSTM:00/VMBUS:00/abc-def/host3/target3:0:0/3:0:0:0/block/sdc",
        );
        assert_eq!(id_from_sysfs_path(p, &|_| Some(3)), None);
        assert_eq!(
            id_from_sysfs_path(Path::new("/sys/devices/virtual/block/loop0"), &|_| None),
            None
        );
    }
}
