//! Exit codes of design §4, shared by every subcommand.
//!
//! Operators and units key their reaction on the code alone (systemd `OnFailure=`, the initramfs-tools
//! script's message), so every module error maps to exactly one of these.

/// The process exit codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Usage = 2,
    KeyVolumeMissing = 3,
    KeyRejected = 4,
    DeviceMissing = 5,
    LayoutUnsupported = 6,
    PassFailed = 7,
    ConfigInvalid = 8,
    /// `initcrypt boot` only: the OS volume was observed in a state no root can be mounted from
    /// (a pass unfinished, encrypted but not opened, unrecognisable). The line printed says why
    /// (its own cause), and the initramfs-tools hook stops the boot on this code rather than let
    /// anything mount or fsck the device (an extension of design §4, see README).
    OsUnusable = 9,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Implemented by every module's error enum so `main` can pick the exit code without knowing the module.
pub trait Classify {
    fn exit(&self) -> Exit;
}
