//! "What is on this device?", answered by libblkid: the same probers udev and `blkid` use, so a
//! volume holding LVM, btrfs, swap, NTFS, ZFS, RAID or a partition table is named for what it is,
//! not "unrecognised" (a hand-written probe knew LUKS, ext*, XFS and FAT only).
//!
//! Two questions, two probes:
//! - [`probe`]: the one signature a device carries (blkid's safe probe, superblocks only), with its
//!   UUID, LABEL and block size: what `UUID=` matching and the pass need.
//! - [`full_probe`]: every signature blkid finds, superblocks and partition tables, checksum errors
//!   and ambivalent results included (what `wipefs` lists): a device is provably empty only when
//!   this finds nothing.
//!
//! Only probing is used: no blkid cache and no `/etc/blkid.conf` (those belong to
//! `blkid_get_cache`/`blkid_evaluate_tag`, never called here), which the static binary's strace
//! check holds us to.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use std::sync::Mutex;

use libblkid_rs::{BlkidProbe, BlkidProbeRet, BlkidSafeprobeRet, BlkidSublks, BlkidSublksFlags};

/// The signature on a device, as blkid names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// blkid's TYPE: `crypto_LUKS`, `ext4`, `xfs`, `vfat`, `LVM2_member`, `btrfs`, `swap`, ...
    pub fstype: &'static str,
    /// As blkid (and so udev's /dev/disk/by-uuid) spells it; `UUID=` matching ignores case.
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// blkid's BLOCK_SIZE: the ext* block size, the XFS and FAT sector size, the btrfs sector size
    /// (what a crypt sector must not exceed). None where blkid does not report one.
    pub block_size: Option<u64>,
    /// LUKS version (1 or 2) when `fstype` is crypto_LUKS.
    pub luks_version: Option<u16>,
}

/// One signature found by [`full_probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// blkid's TYPE for a superblock (`ext4`, `LVM2_member`, `zfs_member`, `linux_raid_member`...),
    /// PTTYPE for a partition table (`gpt`, `dos`, `PMBR`).
    pub kind: String,
    pub partition_table: bool,
    /// Byte offset of the magic that identified it, when blkid reports one.
    pub offset: Option<u64>,
    pub uuid: Option<String>,
    pub label: Option<String>,
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(o) = self.offset {
            write!(f, " at byte {o}")?;
        }
        if let Some(u) = &self.uuid {
            write!(f, " UUID={u}")?;
        }
        Ok(())
    }
}

fn blkid_err(what: &str) -> impl Fn(libblkid_rs::BlkidErr) -> io::Error + '_ {
    move |e| io::Error::other(format!("libblkid: {what}: {e}"))
}

/// A probe of the open file or device `f` (blkid reads through its descriptor, from offset 0 to
/// the end; the descriptor stays ours).
fn new_probe(f: &File) -> io::Result<BlkidProbe> {
    let mut pr = BlkidProbe::new().map_err(blkid_err("new probe"))?;
    pr.set_device(f.as_raw_fd(), 0, 0)
        .map_err(blkid_err("set device"))?;
    Ok(pr)
}

/// Identify what starts at the beginning of `f`; `Ok(None)` when blkid finds no superblock.
/// When several probers match (a leftover signature under a new one), blkid's safe probe refuses
/// to choose; the first match in blkid's prober order is taken then (RAID and LUKS come before
/// filesystems; the hand-written probe this replaces also put LUKS first).
pub fn probe(f: &File) -> io::Result<Option<Probe>> {
    let mut pr = new_probe(f)?;
    pr.enable_superblocks(true)
        .map_err(blkid_err("enable superblocks"))?;
    pr.set_superblock_flags(BlkidSublksFlags::new(vec![
        BlkidSublks::Type,
        BlkidSublks::Uuid,
        BlkidSublks::Label,
        BlkidSublks::Version,
    ]))
    .map_err(blkid_err("superblock flags"))?;
    match pr.do_safeprobe().map_err(blkid_err("probe"))? {
        BlkidSafeprobeRet::Success => {}
        BlkidSafeprobeRet::None => return Ok(None),
        BlkidSafeprobeRet::Ambiguous => {
            log::debug!("libblkid: several signatures match; taking the first in blkid's order");
            pr.reset();
            if matches!(
                pr.do_probe().map_err(blkid_err("probe"))?,
                BlkidProbeRet::Done
            ) {
                return Ok(None);
            }
        }
    }
    let value = |name: &str| pr.lookup_value(name).ok().filter(|v| !v.is_empty());
    let Some(fstype) = value("TYPE").as_deref().and_then(superblock_name) else {
        return Ok(None);
    };
    let luks_version = if fstype == "crypto_LUKS" {
        value("VERSION").and_then(|v| v.trim().parse().ok())
    } else {
        None
    };
    Ok(Some(Probe {
        fstype,
        uuid: value("UUID"),
        label: value("LABEL"),
        block_size: value("BLOCK_SIZE").and_then(|b| b.parse().ok()),
        luks_version,
    }))
}

/// [`probe`] of the device or image file at `path`.
pub fn probe_path(path: &Path) -> io::Result<Option<Probe>> {
    probe(&File::open(path)?)
}

/// Every signature blkid knows on `f`: superblocks (bad checksums included) and partition tables.
/// Empty means provably empty as far as blkid can tell: no filesystem, LVM, RAID, swap, ZFS,
/// LUKS, GPT or MBR. Ambivalent results are all listed, each counts.
pub fn full_probe(f: &File) -> io::Result<Vec<Signature>> {
    let mut pr = new_probe(f)?;
    pr.enable_superblocks(true)
        .map_err(blkid_err("enable superblocks"))?;
    pr.set_superblock_flags(BlkidSublksFlags::new(vec![
        BlkidSublks::Type,
        BlkidSublks::Uuid,
        BlkidSublks::Label,
        BlkidSublks::Usage,
        BlkidSublks::Magic,
        BlkidSublks::Badcsum,
    ]))
    .map_err(blkid_err("superblock flags"))?;
    pr.enable_partitions(true)
        .map_err(blkid_err("enable partitions"))?;
    let mut found = Vec::new();
    // blkid's low-level loop: each call reports the next match of the enabled chains, as wipefs
    // enumerates signatures.
    while let BlkidProbeRet::Success = pr.do_probe().map_err(blkid_err("probe"))? {
        let value = |name: &str| pr.lookup_value(name).ok().filter(|v| !v.is_empty());
        let (kind, partition_table, offset) = if let Some(t) = value("TYPE") {
            (t, false, value("SBMAGIC_OFFSET"))
        } else if let Some(t) = value("PTTYPE") {
            (t, true, value("PTMAGIC_OFFSET"))
        } else {
            continue;
        };
        found.push(Signature {
            kind,
            partition_table,
            offset: offset.and_then(|o| o.parse().ok()),
            uuid: value(if partition_table { "PTUUID" } else { "UUID" }),
            label: value("LABEL"),
        });
    }
    Ok(found)
}

/// [`full_probe`] of the device or image file at `path`.
pub fn full_probe_path(path: &Path) -> io::Result<Vec<Signature>> {
    full_probe(&File::open(path)?)
}

/// A `&'static str` for a superblock TYPE, so `Probe::fstype` stays one. TYPE is always the name of
/// the blkid prober that matched, so the set is bounded (about a hundred names) and each is kept
/// once. (libblkid-rs's `get_superblock_name` would give blkid's own static string, but it fails
/// on every call: it converts each unset flag bit to a usage flag and refuses 0.)
fn superblock_name(t: &str) -> Option<&'static str> {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().ok()?;
    if let Some(n) = names.iter().find(|n| **n == t) {
        return Some(n);
    }
    let n: &'static str = Box::leak(t.to_string().into_boxed_str());
    names.push(n);
    Some(n)
}
