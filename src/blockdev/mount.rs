//! Private, short-lived mounts of the boot partition (where detached headers live), and lookups of
//! existing mounts: a device that is mounted is in use and must not be touched by a pass.

use std::fs;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use super::{BlockDev, Error};

/// Filesystems a boot partition may carry (ext4 also mounts ext2/ext3).
const BOOT_FSTYPES: &[&str] = &["ext4", "xfs", "btrfs"];

/// A mount that is undone when dropped, including on every error path.
#[derive(Debug)]
pub struct TempMount {
    target: PathBuf,
    device: String,
}

impl TempMount {
    /// Mount `dev` at `target` (created if needed), trying the boot filesystem types in order.
    pub fn mount(dev: &BlockDev, target: &Path, read_only: bool) -> Result<TempMount, Error> {
        let node = dev.checked_node()?;
        let err = |reason: String| Error::Mount {
            device: dev.name.clone(),
            target: target.to_path_buf(),
            reason,
        };
        fs::create_dir_all(target).map_err(|e| err(e.to_string()))?;
        let mut flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        if read_only {
            flags |= MountFlags::RDONLY;
        }
        // Every type's reason: the one that matters (EBUSY from ext4: mounted elsewhere with the
        // other read-only flag) must not hide behind the last type's ENODEV.
        let mut reasons = Vec::new();
        for fstype in BOOT_FSTYPES {
            match rustix::mount::mount(&node, target, *fstype, flags, None) {
                Ok(()) => {
                    // Private propagation: the mount must not appear in (or be unmounted through)
                    // any peer namespace, e.g. the real root's once systemd switches over.
                    if let Err(e) =
                        rustix::mount::mount_change(target, MountPropagationFlags::PRIVATE)
                    {
                        log::debug!("cannot make {} private: {e}", target.display());
                    }
                    log::debug!("mounted {} ({fstype}) at {}", dev.name, target.display());
                    return Ok(TempMount {
                        target: target.to_path_buf(),
                        device: dev.name.clone(),
                    });
                }
                Err(e) => reasons.push(format!("{fstype}: {e}")),
            }
        }
        let _ = fs::remove_dir(target);
        Err(err(format!(
            "not an ext2/3/4, xfs or btrfs filesystem the kernel can mount here ({})",
            reasons.join("; ")
        )))
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.target, UnmountFlags::empty()) {
            log::warn!(
                "cannot unmount {} from {}: {e}",
                self.device,
                self.target.display()
            );
            return;
        }
        let _ = fs::remove_dir(&self.target);
    }
}

/// Where `dev` is mounted already, if anywhere (first entry of /proc/self/mountinfo).
pub fn mount_point_of(dev: &BlockDev) -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = format!("{}:{}", dev.devno.0, dev.devno.1);
    info.lines().find_map(|line| {
        let mut f = line.split(' ');
        let devno = f.nth(2)?;
        let _root = f.next()?;
        let point = f.next()?;
        (devno == want).then(|| PathBuf::from(unescape_mount_path(point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount_path("/mnt/azure\\040bek"), "/mnt/azure bek");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/end\\04"), "/end\\04");
    }
}
