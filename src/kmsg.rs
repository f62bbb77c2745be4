//! Logging: `log` records go to /dev/kmsg in the initramfs (so they reach the serial console and boot
//! diagnostics) and to stderr for the operator.
//!
//! Named `kmsg` rather than `log` (design §7) so it does not shadow the `log` crate. We write /dev/kmsg
//! ourselves instead of using kernlog because the priority mapping must be explicit and reviewed here
//! (stratisd passed `log::Level as c_int` to syslog, which maps Error to LOG_ALERT): one write(2) per
//! record is all kernlog would do.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

/// syslog(3) priorities of RFC 5424, the `<N>` prefix /dev/kmsg understands.
const LOG_ERR: u8 = 3;
const LOG_WARNING: u8 = 4;
const LOG_INFO: u8 = 6;
const LOG_DEBUG: u8 = 7;

/// Explicit mapping from `log` levels to syslog priorities (Trace and Debug share LOG_DEBUG).
pub fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => LOG_ERR,
        log::Level::Warn => LOG_WARNING,
        log::Level::Info => LOG_INFO,
        log::Level::Debug | log::Level::Trace => LOG_DEBUG,
    }
}

/// /dev/kmsg is rate-limited per writer in a busybox initramfs; one record may hold at most ~1 KiB.
const KMSG_MAX: usize = 976;

struct Logger {
    kmsg: Option<Mutex<File>>,
    /// Highest level printed on stderr (the operator's view); kmsg gets everything that is enabled.
    stderr_level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        let level = effective_level(record);
        if level > log::max_level() {
            return;
        }
        let text = format_record(record);
        if level <= self.stderr_level {
            // stderr is the console in the initramfs and the terminal elsewhere; a failed write has
            // nowhere better to be reported.
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        }
        if let Some(kmsg) = &self.kmsg {
            let mut line = format!("<{}>{text}", syslog_priority(level));
            truncate_utf8(&mut line, KMSG_MAX);
            line.push('\n');
            if let Ok(mut f) = kmsg.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// fatfs reports compatibility notes (odd reserved-sector counts, boot jump opcodes) at warn level;
/// they describe the platform's volume, not a problem of ours, so they only show with debug.
fn effective_level(record: &log::Record) -> log::Level {
    if record.target().starts_with("fatfs") {
        log::Level::Debug.max(record.level())
    } else {
        record.level()
    }
}

fn format_record(record: &log::Record) -> String {
    let from_lib = record.target() == "libcryptsetup" || record.target().starts_with("fatfs");
    let tag = match (record.level(), from_lib) {
        (_, true) => format!("initcrypt: [{}] ", record.target()),
        (log::Level::Error, _) => "initcrypt: error: ".to_string(),
        (log::Level::Warn, _) => "initcrypt: warning: ".to_string(),
        _ => "initcrypt: ".to_string(),
    };
    // One record is one line: a newline inside a message would split the one-line contract.
    let msg = record.args().to_string().replace('\n', " ");
    format!("{tag}{msg}")
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// True when running from an initramfs: systemd initrds have /etc/initrd-release, busybox
/// initramfs-tools images have /conf/initramfs.conf, and both run from a ram-backed root.
pub fn in_initramfs() -> bool {
    std::path::Path::new("/etc/initrd-release").exists()
        || std::path::Path::new("/conf/initramfs.conf").exists()
        || root_is_ramfs()
}

fn root_is_ramfs() -> bool {
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    match rustix::fs::statfs("/") {
        Ok(st) => {
            let t = st.f_type as u64;
            t == RAMFS_MAGIC || t == TMPFS_MAGIC
        }
        Err(_) => false,
    }
}

/// Under a systemd unit with StandardError=journal(+console), stderr already reaches the journal
/// and the console: writing /dev/kmsg as well would show every line twice. systemd says so in
/// $JOURNAL_STREAM ("<dev>:<inode>" of the stream), which must match stderr itself.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        v.split_once(':')
            .map(|(d, i)| (d.to_string(), i.to_string()))
    }) else {
        return false;
    };
    let stderr = std::io::stderr();
    let Ok(st) = rustix::fs::fstat(stderr.as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Install the logger once, at the start of `main`.
pub fn init(debug: bool) {
    let kmsg = if in_initramfs() && !stderr_is_journal() {
        OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .ok()
            .map(Mutex::new)
    } else {
        None
    };
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    let logger = Logger {
        kmsg,
        stderr_level: level,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(if debug {
            log::LevelFilter::Trace
        } else {
            log::LevelFilter::Info
        });
    }
    crate::ffi::route_cryptsetup_log(debug);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslog_not_log_levels() {
        assert_eq!(syslog_priority(log::Level::Error), 3);
        assert_eq!(syslog_priority(log::Level::Warn), 4);
        assert_eq!(syslog_priority(log::Level::Info), 6);
        assert_eq!(syslog_priority(log::Level::Debug), 7);
        assert_eq!(syslog_priority(log::Level::Trace), 7);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut s = "ééééé".to_string();
        truncate_utf8(&mut s, 3);
        assert_eq!(s, "é");
    }
}
