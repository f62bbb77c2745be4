//! The operator's commands on a running VM or a mounted image: `check` (pre-flight), `enable` and
//! `disable` (say what the volumes should be, so that the next boot does it), `rotate` (a new
//! passphrase on every volume, crash-safe), and `status` lives in
//! `crate::status`. Each concern is its own module; the files they change are replaced atomically
//! and every change is undone when a later step fails (`atomic`).

pub mod atomic;
pub mod bootcfg;
pub mod check;
mod chroot;
pub mod crypttab;
pub mod discover;
pub mod enable;
pub mod fstab;
pub mod initramfs;
pub mod machine;
pub mod rotate;
mod tabfile;
pub mod volumes;

use crate::config::Role;

/// `--volume-type os|data|all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeType {
    Os,
    Data,
    All,
}

impl VolumeType {
    pub fn parse(s: &str) -> Option<VolumeType> {
        match s.to_ascii_lowercase().as_str() {
            "os" => Some(VolumeType::Os),
            "data" => Some(VolumeType::Data),
            "all" => Some(VolumeType::All),
            _ => None,
        }
    }

    pub fn includes(self, role: Role) -> bool {
        matches!(
            (self, role),
            (VolumeType::All, _) | (VolumeType::Os, Role::Os) | (VolumeType::Data, Role::Data)
        )
    }
}

impl std::fmt::Display for VolumeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeType::Os => "os",
            VolumeType::Data => "data",
            VolumeType::All => "all",
        })
    }
}
