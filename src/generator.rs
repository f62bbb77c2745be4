//! `initcrypt-generator`: the systemd generator of the initrd (design §1).
//!
//! systemd runs generators before any unit starts, and they may only write into their three output
//! directories. This one turns volumes.json (and ADE's `rd.luks.ade.*` parameters, which only exist
//! at boot) into:
//! - crypttab lines (key field `none`, `headless=true`, `x-initrd.attach`, `nofail` on data) that the
//!   **stock** `systemd-cryptsetup-generator` turns into the stock `systemd-cryptsetup@<name>` units,
//!   so systemd-cryptsetup, not initcrypt, opens every mapping and finds its key in
//!   `/run/cryptsetup-keys.d/<name>.key`. Those units go to the *early* directory, which outranks
//!   the normal one: a line for the same name in the image's /etc/crypttab (dracut copies the
//!   host's; ADE's reads the key from /mnt/azure_bek_disk and the header from /boot, neither of
//!   which exists in the initrd) is shadowed for volumes initcrypt manages;
//! - drop-ins: each stock unit requires and follows `initcrypt-keys.service` and the volume's pass
//!   unit (`initcrypt-encrypt@` for the OS volume, `initcrypt-encrypt-data@` for data); the OS
//!   unit fails to the emergency path; pass units run one at a time, OS first; header mounts are
//!   read-only and follow every pass unit; dracut's initqueue and sysroot.mount follow the OS pass;
//! - for a volume wanted decrypted, no crypttab line: only its `initcrypt-decrypt@` (OS) or
//!   `initcrypt-decrypt-data@` pass unit, in the same chain.
//!
//! Why run the stock generator on our own crypttab instead of baking /etc/crypttab into the image:
//! ADE's parameters name the disk only on the kernel command line, and generators cannot write
//! /etc. Why not write the units ourselves: systemd's generator knows its own escaping, device
//! timeouts and header-device mounts; copying that would drift. The crypttab is kept in
//! `/run/initcrypt/crypttab` (no secrets) so an operator can read what was asked for.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{self, BootParams, Desired, Header, Role, Volume};
use crate::exit::{Classify, Exit};

/// Where the crypttab for the stock generator goes (the running system's /run, never /etc).
pub const RUNTIME_DIR: &str = "/run/initcrypt";
/// Where systemd keeps unit files installed by the package / the dracut module.
const UNIT_DIR: &str = "/usr/lib/systemd/system";
const STOCK_GENERATORS: [&str; 2] = [
    "/usr/lib/systemd/system-generators/systemd-cryptsetup-generator",
    "/lib/systemd/system-generators/systemd-cryptsetup-generator",
];
/// Seconds systemd allows initcrypt-keys.service beyond the binary's own key-volume wait.
const KEYS_TIMEOUT_MARGIN: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generator: expected 3 output directories (normal early late), got {0}; systemd passes them")]
    Usage(usize),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("generator: cannot write {path}: {source}; is the initrd's /run writable?")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generator: systemd-cryptsetup-generator is not in this initrd ({}); rebuild the initrd with dracut's crypt module", STOCK_GENERATORS.join(", "))]
    NoStockGenerator,
    #[error("generator: systemd-cryptsetup-generator failed on {crypttab} ({status}); check the crypttab lines there")]
    StockGenerator { crypttab: PathBuf, status: String },
    #[error("generator: systemd-cryptsetup-generator made no unit for {name} from {crypttab}; check that line")]
    NoUnit { name: String, crypttab: PathBuf },
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Usage(_) => Exit::Usage,
            Error::Config(e) => e.exit(),
            Error::Write { .. }
            | Error::NoStockGenerator
            | Error::StockGenerator { .. }
            | Error::NoUnit { .. } => Exit::LayoutUnsupported,
        }
    }
}

/// Where the generator reads and writes; `Paths::system()` at boot, temporary folders in tests.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The generator's "normal" output directory: our drop-ins and wants.
    pub normal: PathBuf,
    /// The "early" one: the stock units made from our crypttab, so they outrank /etc/crypttab's.
    pub early: PathBuf,
    /// Our crypttab for the stock generator.
    pub runtime_dir: PathBuf,
    /// The system's crypttab (only read, to say which of its lines ours replace).
    pub etc_crypttab: PathBuf,
    /// The stock generator to run, or None to search the usual places.
    pub stock_generator: Option<PathBuf>,
}

impl Paths {
    /// SYSTEMD_CRYPTTAB is systemd's own override of /etc/crypttab; it is honoured the same way.
    pub fn system(normal: PathBuf, early: PathBuf) -> Paths {
        let etc = std::env::var_os("SYSTEMD_CRYPTTAB")
            .map_or_else(|| PathBuf::from("/etc/crypttab"), PathBuf::from);
        Paths {
            normal,
            early,
            runtime_dir: PathBuf::from(RUNTIME_DIR),
            etc_crypttab: etc,
            stock_generator: None,
        }
    }
}

/// True in the initrd. SYSTEMD_IN_INITRD overrides, as it does for systemd's own generators.
pub fn in_initrd() -> bool {
    match std::env::var("SYSTEMD_IN_INITRD").ok().as_deref() {
        Some("1" | "yes" | "true" | "on") => true,
        Some("0" | "no" | "false" | "off") => false,
        _ => Path::new("/etc/initrd-release").exists(),
    }
}

/// The generator entry point: `initcrypt-generator <normal> <early> <late>`.
pub fn run(config_path: &Path, params: &BootParams, dirs: &[String]) -> Result<(), Error> {
    let [normal, early, _late] = dirs else {
        return Err(Error::Usage(dirs.len()));
    };
    if !in_initrd() {
        log::debug!("generator: not in the initrd; the real root's crypttab opens what is left");
        return Ok(());
    }
    if params.skip {
        log::info!("generator: disabled on the kernel command line (rd.initcrypt=0 or rd.ade=0)");
        return Ok(());
    }
    let volumes = config::load(config_path, params)?;
    generate(
        &volumes,
        params,
        &Paths::system(PathBuf::from(normal), PathBuf::from(early)),
    )
}

/// Everything the generator writes for these volumes (testable without being in an initrd).
pub fn generate(volumes: &[Volume], params: &BootParams, paths: &Paths) -> Result<(), Error> {
    let taken = crypttab_names(&paths.etc_crypttab);
    let mut ours = Vec::new();
    for v in volumes {
        if v.desired == Desired::Decrypted {
            log::info!(
                "generator: {} is wanted decrypted: {} decrypts it if it is not yet, and nothing opens it",
                v.name,
                pass_unit(v)
            );
            if taken.contains(&v.name) {
                skip_crypttab_unit(v, paths)?;
            }
            continue;
        }
        if taken.contains(&v.name) {
            log::info!(
                "generator: {} has a line in {}; initcrypt's line replaces it in the initrd (key from the key volume, header from the boot partition)",
                v.name,
                paths.etc_crypttab.display()
            );
        }
        ours.push(v);
    }
    write_dropins(volumes, &paths.normal)?;
    keys_timeout(params, &paths.normal)?;
    if ours.is_empty() {
        return Ok(());
    }
    let crypttab = paths.runtime_dir.join("crypttab");
    let text: String = ours.iter().map(|v| crypttab_line(v) + "\n").collect();
    write_file(&crypttab, &text)?;
    run_stock_generator(&crypttab, paths)?;
    for v in &ours {
        let unit = paths.early.join(cryptsetup_unit(&v.name));
        if !unit.exists() {
            return Err(Error::NoUnit {
                name: v.name.clone(),
                crypttab,
            });
        }
    }
    Ok(())
}

/// One crypttab(5) line: the key comes from /run/cryptsetup-keys.d/<name>.key (field `none`), a
/// wrong key fails instead of prompting (`headless=true`), the mapping outlives the switch to the
/// real root (`x-initrd.attach`), and a data disk never blocks the boot (`nofail`).
pub fn crypttab_line(v: &Volume) -> String {
    let mut opts = String::from("luks,headless=true,x-initrd.attach");
    if let Header::Detached { boot_uuid, path } = &v.header {
        // path:device makes systemd mount the boot partition for the open only.
        let _ = write!(opts, ",header=/{}:UUID={boot_uuid}", path.display());
    }
    if v.role == Role::Data {
        opts.push_str(",nofail");
    }
    format!("{} {} none {opts}", v.name, v.device)
}

/// Names in an existing crypttab (first field of every non-comment line).
fn crypttab_names(path: &Path) -> BTreeSet<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// systemd's unit-name escaping of a volume name (config allows A–Z a–z 0–9 _ - .).
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, c) in name.chars().enumerate() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | ':' => out.push(c),
            '.' if i > 0 => out.push(c),
            _ => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            }
        }
    }
    out
}

fn cryptsetup_unit(name: &str) -> String {
    format!("systemd-cryptsetup@{}.service", escape(name))
}

/// The pass template of a volume: the OS volume's sends a failed pass to the emergency path and
/// holds the root mount; a data volume's does neither (systemd cannot remove OnFailure= or Before=
/// in a drop-in, hence two templates).
/// A volume wanted decrypted gets the decrypting twin of its template, and no crypttab line.
fn template_of(v: &Volume) -> &'static str {
    match (v.role, v.desired) {
        (Role::Os, Desired::Encrypted) => "initcrypt-encrypt@.service",
        (Role::Data, Desired::Encrypted) => "initcrypt-encrypt-data@.service",
        (Role::Os, Desired::Decrypted) => "initcrypt-decrypt@.service",
        (Role::Data, Desired::Decrypted) => "initcrypt-decrypt-data@.service",
    }
}

/// The instance of `template_of(v)` for this volume.
fn pass_unit(v: &Volume) -> String {
    template_of(v).replace("@.", &format!("@{}.", escape(&v.name)))
}

fn header_mount_unit(v: &Volume) -> String {
    format!(
        "run-systemd-cryptsetup-{}.mount",
        escape(&format!("headerdev-{}", v.name))
    )
}

/// Every drop-in and link for the volumes initcrypt manages in the initrd.
fn write_dropins(volumes: &[Volume], normal: &Path) -> Result<(), Error> {
    // The OS volume's pass first in the one-at-a-time chain, so its own conversion is never queued
    // behind a data disk's.
    let mut volumes: Vec<&Volume> = volumes.iter().collect();
    volumes.sort_by_key(|v| v.role != Role::Os);
    let all_enc: Vec<String> = volumes.iter().map(|v| pass_unit(v)).collect();
    for (i, v) in volumes.iter().enumerate() {
        let opened = v.desired == Desired::Encrypted;
        if opened {
            cryptsetup_dropin(v, normal)?;
        }
        want(
            normal,
            "cryptsetup.target.wants",
            &pass_unit(v),
            template_of(v),
        )?;
        if i > 0 {
            // One pass unit at a time: they share the boot partition's private mount point.
            let text = format!(
                "# Generated by initcrypt-generator: one initcrypt pass unit at a time\n[Unit]\nAfter={}\n",
                all_enc[i - 1]
            );
            write_file(
                &normal
                    .join(format!("{}.d", all_enc[i]))
                    .join("50-order.conf"),
                &text,
            )?;
        }
        // (only a crypttab line makes the stock generator mount a header's partition)
        if let (true, Header::Detached { .. }) = (opened, &v.header) {
            header_mount_dropin(v, &all_enc, normal)?;
        }
    }
    let os_enc: Vec<&str> = volumes
        .iter()
        .zip(&all_enc)
        .filter(|(v, _)| v.role == Role::Os)
        .map(|(_, e)| e.as_str())
        .collect();
    if !os_enc.is_empty() {
        // dracut's initqueue gives up on the root after rd.retry= (180 s) and opens its emergency
        // shell; a pass takes as long as the disk. Its clock starts once every pass the root
        // device waits for is over: the OS pass, and, when the OS header is on a boot partition
        // (whose mount follows every pass unit), the data passes too.
        let os_header_mount = volumes.iter().any(|v| {
            v.role == Role::Os
                && v.desired == Desired::Encrypted
                && matches!(v.header, Header::Detached { .. })
        });
        let waits_for: Vec<&str> = if os_header_mount {
            all_enc.iter().map(String::as_str).collect()
        } else {
            os_enc.clone()
        };
        let text = format!(
            "# Generated by initcrypt-generator: the root device cannot appear before the passes it waits for are over\n[Unit]\nAfter=initcrypt-keys.service {}\n",
            waits_for.join(" ")
        );
        write_file(
            &normal
                .join("dracut-initqueue.service.d")
                .join("50-initcrypt.conf"),
            &text,
        )?;
        sysroot_dropin(&volumes, &os_enc, normal)?;
    }
    Ok(())
}

/// `root=UUID=`/`LABEL=` name the filesystem, which an in-place pass moves from the raw partition
/// to the mapping during this boot: the root must be mounted after the open, never from the raw
/// partition udev probed before the pass, and never after a pass that failed.
fn sysroot_dropin(volumes: &[&Volume], os_enc: &[&str], normal: &Path) -> Result<(), Error> {
    let opens: Vec<String> = volumes
        .iter()
        .filter(|v| v.role == Role::Os && v.desired == Desired::Encrypted)
        .map(|v| cryptsetup_unit(&v.name))
        .collect();
    let text = format!(
        "# Generated by initcrypt-generator: the root comes from the finished (and opened) OS volume\n[Unit]\nRequires={enc}\nAfter={after}\n",
        enc = os_enc.join(" "),
        after = [os_enc.join(" "), opens.join(" ")].join(" ").trim_end()
    );
    write_file(
        &normal.join("sysroot.mount.d").join("50-initcrypt.conf"),
        &text,
    )?;
    // The root's fsck (`root=UUID=`/`LABEL=`) is ordered only after its device unit: it must never
    // preen the raw partition while a pass converts it, nor after a pass that failed.
    let text = format!(
        "# Generated by initcrypt-generator: no fsck of the root while, or after, an OS pass fails\n[Unit]\nRequires={enc}\nAfter={after}\n",
        enc = os_enc.join(" "),
        after = [os_enc.join(" "), opens.join(" ")].join(" ").trim_end()
    );
    write_file(
        &normal
            .join("systemd-fsck-root.service.d")
            .join("50-initcrypt.conf"),
        &text,
    )
}

/// The stock unit of one volume gets its key from initcrypt-keys.service and runs after the pass.
/// The OS volume's also keeps its key file until it has used it, and fails to the emergency path:
/// a rejected key would otherwise leave the boot waiting for a root that cannot appear. A data
/// volume's is not ordered against the key cleanup, which runs once initrd.target is reached: a
/// data disk that is missing must not hold the boot for its device timeout.
fn cryptsetup_dropin(v: &Volume, normal: &Path) -> Result<(), Error> {
    let enc = pass_unit(v);
    let mut text = format!(
        "# Generated by initcrypt-generator: key from initcrypt-keys.service, pass before the open\n[Unit]\nRequires=initcrypt-keys.service {enc}\nAfter=initcrypt-keys.service {enc}\n"
    );
    if v.role == Role::Os {
        text.push_str(
            "Before=initcrypt-keys-cleanup.service\nOnFailure=emergency.target\nOnFailureJobMode=isolate\n",
        );
    }
    write_file(
        &normal
            .join(format!("{}.d", cryptsetup_unit(&v.name)))
            .join("50-initcrypt.conf"),
        &text,
    )
}

/// The image's /etc/crypttab still has a line for a volume wanted decrypted (ADE's, copied by
/// dracut): the stock generator makes a unit of it that would race the decryption and then fail on
/// plaintext, failing cryptsetup.target at every boot. A condition that never holds skips it, and
/// a skipped unit counts as done for everything ordered after it (a masked one would not).
fn skip_crypttab_unit(v: &Volume, paths: &Paths) -> Result<(), Error> {
    log::info!(
        "generator: {} has a line in {}; its unit is skipped (the volume is wanted decrypted)",
        v.name,
        paths.etc_crypttab.display()
    );
    let text = format!(
        "# Generated by initcrypt-generator: {} is wanted decrypted; {} converts it and nothing opens it\n[Unit]\nAfter={}\n# \"/ must not exist\": never true, so the unit is skipped, which counts as done\nConditionPathExists=!/\n",
        v.name,
        pass_unit(v),
        pass_unit(v)
    );
    write_file(
        &paths
            .normal
            .join(format!("{}.d", cryptsetup_unit(&v.name)))
            .join("50-initcrypt.conf"),
        &text,
    )
}

/// A `<dir>/<unit>` link to the installed template (systemd uses the link's name).
fn want(normal: &Path, dir: &str, unit: &str, template: &str) -> Result<(), Error> {
    let wants = normal.join(dir);
    fs::create_dir_all(&wants).map_err(|e| werr(&wants, e))?;
    let link = wants.join(unit);
    if fs::symlink_metadata(&link).is_err() {
        symlink(Path::new(UNIT_DIR).join(template), &link).map_err(|e| werr(&link, e))?;
    }
    Ok(())
}

/// The stock unit mounts the boot partition holding a detached header (`header=PATH:UUID=`) as
/// soon as the partition appears. Ordered after our units, it waits until the key volume was found
/// (a boot that goes to emergency never mounts, so never writes, the boot partition: Requires, since
/// mount units ignore the isolate to emergency.target) and until every pass unit has released its
/// private mount (a second mount of the same ext4 with the other read-only flag fails with EBUSY).
/// It is read-only: opening a volume never writes its header, so a boot leaves /boot untouched.
fn header_mount_dropin(v: &Volume, all_enc: &[String], normal: &Path) -> Result<(), Error> {
    let text = format!(
        "# Generated by initcrypt-generator: the header's boot partition is mounted after initcrypt's units, read-only\n# (Requires too: a mount unit ignores the isolate to emergency.target and would still start)\n[Unit]\nRequires=initcrypt-keys.service {enc}\nAfter=initcrypt-keys.service {all}\n[Mount]\nOptions=ro\n",
        enc = pass_unit(v),
        all = all_enc.join(" ")
    );
    write_file(
        &normal
            .join(format!("{}.d", header_mount_unit(v)))
            .join("50-initcrypt.conf"),
        &text,
    )
}

/// initcrypt-keys.service may wait for the key volume as long as the kernel command line says.
fn keys_timeout(params: &BootParams, normal: &Path) -> Result<(), Error> {
    let secs = params.keyvol_timeout.as_secs() + KEYS_TIMEOUT_MARGIN;
    let d = normal
        .join("initcrypt-keys.service.d")
        .join("50-timeout.conf");
    write_file(
        &d,
        &format!("# Generated by initcrypt-generator from initcrypt.keyvol_timeout=\n[Service]\nTimeoutStartSec={secs}\n"),
    )
}

fn run_stock_generator(crypttab: &Path, paths: &Paths) -> Result<(), Error> {
    let gen = match &paths.stock_generator {
        Some(p) => p.clone(),
        None => STOCK_GENERATORS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or(Error::NoStockGenerator)?,
    };
    // An empty SYSTEMD_PROC_CMDLINE: the real run of the stock generator already handles the
    // command line's rd.luks.* options; a second look would emit their units twice.
    let scratch = paths.runtime_dir.join("generator");
    let dirs = ["early", "late"].map(|d| scratch.join(d));
    for d in dirs.iter().chain([&paths.early]) {
        fs::create_dir_all(d).map_err(|e| werr(d, e))?;
    }
    // Its "normal" output is our early directory (see the module doc); its own early and late
    // outputs are unused by crypttab lines and go to a scratch folder.
    let out = Command::new(&gen)
        .args([&paths.early, &dirs[0], &dirs[1]])
        .env("SYSTEMD_CRYPTTAB", crypttab)
        .env("SYSTEMD_PROC_CMDLINE", "")
        .env("SYSTEMD_IN_INITRD", "1")
        .output()
        .map_err(|e| Error::StockGenerator {
            crypttab: crypttab.to_path_buf(),
            status: e.to_string(),
        })?;
    let _ = fs::remove_dir_all(&scratch);
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(Error::StockGenerator {
            crypttab: crypttab.to_path_buf(),
            status: format!("{}: {}", out.status, msg.trim().replace('\n', "; ")),
        });
    }
    Ok(())
}

fn werr(path: &Path, source: std::io::Error) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a whole small file (temporary name + rename: a half-written unit is never read).
fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(|e| werr(dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| werr(&tmp, e))?;
    f.write_all(text.as_bytes()).map_err(|e| werr(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| werr(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_systemd_escape() {
        assert_eq!(escape("osencrypt"), "osencrypt");
        assert_eq!(escape("data-0-1"), "data\\x2d0\\x2d1");
        assert_eq!(escape("a.b_c"), "a.b_c");
        assert_eq!(escape(".x"), "\\x2ex");
    }
}
