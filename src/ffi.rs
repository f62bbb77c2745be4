//! The only module with `unsafe`: the C callback libcryptsetup calls for its log messages.
//!
//! libcryptsetup-rs offers a macro for this, but it panics on non-UTF-8 messages and unknown levels;
//! a message from C must never abort the boot, so the conversion here is lossy and total.

use std::ffi::{c_char, c_int, c_void, CStr};

/// libcryptsetup log levels (libcryptsetup.h): NORMAL 0, ERROR 1, VERBOSE 2, DEBUG -1, DEBUG_JSON -2.
fn level_of(level: c_int) -> log::Level {
    match level {
        1 => log::Level::Warn, // library errors are reported by us as one line; keep theirs as detail
        0 => log::Level::Info,
        2 => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

extern "C" fn cryptsetup_log(level: c_int, msg: *const c_char, _usrptr: *mut c_void) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string that stays valid for the duration of
    // this call; we copy it out before returning and never keep the pointer.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    let text = text.trim_end();
    if !text.is_empty() {
        log::log!(target: "libcryptsetup", level_of(level), "{text}");
    }
}

/// Route libcryptsetup's global log into `log` (debug output only when we are at debug level).
pub fn route_cryptsetup_log(debug: bool) {
    libcryptsetup_rs::set_log_callback::<()>(Some(cryptsetup_log), None);
    let level = if debug {
        libcryptsetup_rs::consts::vals::CryptDebugLevel::All
    } else {
        libcryptsetup_rs::consts::vals::CryptDebugLevel::None
    };
    libcryptsetup_rs::set_debug_level(level);
}

/// Move the calling thread (the lifecycle commands are single-threaded) into a private mount
/// namespace, so that the /proc, /sys and /dev mounts made for a chroot into an image (`enable
/// --root DIR`) are seen by our children only and vanish with the process.
pub fn unshare_mount_namespace() -> std::io::Result<()> {
    // SAFETY: CLONE_NEWNS (which implies CLONE_FS) only gives this thread its own copy of the
    // mount table and of its root/cwd/umask; it touches no memory and no file descriptor table
    // (CLONE_FILES, the flag that makes unshare unsafe for other threads' descriptors, is not set).
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
