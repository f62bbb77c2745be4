//! Running an image's own tools (update-initramfs, dracut, update-grub) for `enable --root DIR`.
//!
//! The image's tools must run against the image's files: its kernels, its hooks, its
//! configuration. So they run in a chroot into DIR, with /proc, /sys and /dev bound in (both
//! builders read them). The binds are made in a private mount namespace of this process: nothing
//! shows up in the host's mount table, nothing is left behind if we are killed, and DIR's own
//! files are never touched by the binds (a tree checksum before and after sees no difference).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::mount::{MountFlags, MountPropagationFlags};

/// The root already prepared in this process.
static PREPARED: Mutex<Option<PathBuf>> = Mutex::new(None);

fn io(e: rustix::io::Errno, what: &str) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Enter a private mount namespace (once) and bind /proc, /sys and /dev into `root`.
pub fn prepare(root: &Path) -> std::io::Result<()> {
    let mut done = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    if done.as_deref() == Some(root) {
        return Ok(());
    }
    if done.is_none() {
        crate::ffi::unshare_mount_namespace()?;
        // Our mounts must not propagate back into the host's namespace.
        rustix::mount::mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(|e| io(e, "making / private"))?;
    }
    let at = |d: &str| root.join(d);
    rustix::mount::mount(
        "proc",
        at("proc"),
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    )
    .map_err(|e| io(e, &format!("mounting proc on {}", at("proc").display())))?;
    for d in ["sys", "dev"] {
        rustix::mount::mount_bind_recursive(Path::new("/").join(d), at(d))
            .map_err(|e| io(e, &format!("binding /{d} on {}", at(d).display())))?;
    }
    *done = Some(root.to_path_buf());
    Ok(())
}
