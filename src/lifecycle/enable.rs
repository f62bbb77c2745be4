//! `initcrypt enable` and `initcrypt disable`: say what the volumes should be, so that the next boot
//! does it. Neither touches a disk: the passes run in the initramfs, where nothing holds them.
//!
//! Files `enable` changes (all under the root tree; `--root DIR` for an image):
//! - `/etc/initcrypt/volumes.json`: merged with what is there (enabling data after the OS keeps
//!   the OS volume; enabling twice writes the same bytes);
//! - `/etc/fstab`: the device field of each data line becomes `/dev/mapper/<name>`, and a root line
//!   naming the partition (`PARTUUID=`, `/dev/sdX`) becomes `UUID=<filesystem UUID>`; everything
//!   else stays byte for byte. `/etc/initcrypt/fstab.before-enable` keeps the fstab as it was
//!   before initcrypt changed any line (disable restores from it);
//! - the kernel command line (`/etc/default/grub`, `grub.d/*.cfg`, `/etc/kernel/cmdline`): a
//!   `root=` naming the partition becomes `root=UUID=`, and `root=UUID=` is pinned at the end of
//!   GRUB_CMDLINE_LINUX (see `BootConfig::edits_pinned`), then grub.cfg through
//!   update-grub/grub-mkconfig; the first version of each file is kept under
//!   `/etc/initcrypt/before-enable/` and put back by the `disable` that follows the decryption;
//! - every installed kernel's initramfs, rebuilt with the distribution's tool and then read back:
//!   each must carry initcrypt and exactly the new volumes.json.
//!
//! crypttab: none. Every volume is opened in the initramfs (dracut's units with `x-initrd.attach`,
//! initramfs-tools' `initcrypt boot`) and stays open across the switch to the real root, where
//! fstab mounts `/dev/mapper/<name>`. A real-root crypttab line would only duplicate that open (a
//! disk attached after the initramfs is issue [7]'s). `disable` removes other tools' lines (ADE's)
//! for a volume it decrypts, since they would fail at every boot once the disk is plaintext; they
//! are kept in `/etc/initcrypt/crypttab.before-disable`.
//!
//! Order: check → plan everything in memory (a malformed file stops here, nothing written) →
//! backups → volumes.json → fstab → boot configuration → grub.cfg → initramfs → read the images
//! back. A failure at any step rolls every earlier step back (`atomic::Transaction`).
//!
//! Stale configuration: once a boot has decrypted a volume, its entry (desired "decrypted", disk
//! plaintext) costs the boot one probe and nothing else. The next `disable` drops such entries, and
//! removes volumes.json when none is left (then the package can be removed); `status` says so.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::atomic::{self, Lock, Transaction};
use super::bootcfg::{self, Fix};
use super::check::{self, Finding, Level};
use super::discover::Inventory;
use super::fstab::{self, Fstab};
use super::initramfs;
use super::machine::{Machine, Observation};
use super::volumes;
use super::VolumeType;
use crate::config::{BootParams, Desired, Header, Role, Volume};
use crate::exit::{Classify, Exit};
use crate::pass::Direction;

pub const FSTAB_BACKUP: &str = "etc/initcrypt/fstab.before-enable";
pub const CRYPTTAB_BACKUP: &str = "etc/initcrypt/crypttab.before-disable";
/// Boot configuration files as they were before enable first changed them (same relative paths).
pub const BOOT_BACKUP_DIR: &str = "etc/initcrypt/before-enable";
const ROLLBACK_SPILL: &str = "var/lib/initcrypt/rollback";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("enable refused: {} failing finding(s) ({}) — fix them (see the lines above) or name each with --force ID; nothing was changed", failing.len(), failing.join(", "))]
    Refused { failing: Vec<String>, exit: Exit },
    #[error("{0}; nothing was changed")]
    Plan(String),
    #[error("{what}; nothing was changed")]
    Invalid { what: String, exit: Exit },
    #[error("{0}")]
    Atomic(#[from] atomic::Error),
    #[error("{0}")]
    Initramfs(#[from] initramfs::Error),
    #[error("{0}")]
    Grub(String),
    #[error("{first}; every change was rolled back")]
    RolledBack { first: Box<Error> },
    #[error("{first}; rolling back also failed: {}; restore those files from /etc/initcrypt/*.before-enable", rollback.join("; "))]
    RollbackFailed {
        first: Box<Error>,
        rollback: Vec<String>,
    },
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Usage(_) => Exit::Usage,
            Error::Refused { exit, .. } | Error::Invalid { exit, .. } => *exit,
            Error::Plan(_) | Error::Grub(_) => Exit::LayoutUnsupported,
            Error::Atomic(e) => e.exit(),
            Error::Initramfs(e) => e.exit(),
            Error::RolledBack { first } | Error::RollbackFailed { first, .. } => first.exit(),
        }
    }
}

pub struct Options {
    pub volume_type: VolumeType,
    pub force: Vec<String>,
    pub format_empty: bool,
}

/// Where the commands act: the running system ("/") or an image tree (`--root DIR`).
pub struct Target<'a> {
    pub machine: &'a dyn Machine,
    pub root: PathBuf,
    pub offline: bool,
}

impl Target<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }
}

/// The findings that stop enable (failing and not forced), after printing every failing one.
fn refuse(findings: &[Finding], force: &[String], out: &mut dyn Write) -> Result<(), Error> {
    let failing: Vec<&Finding> = findings.iter().filter(|f| f.level == Level::Fail).collect();
    let mut blocking = Vec::new();
    let mut exit = Exit::Ok;
    for f in &failing {
        let forced = force.iter().any(|x| x == f.id) && f.forceable;
        let _ = writeln!(
            out,
            "{}{}",
            f.line(),
            if forced { "  [forced]" } else { "" }
        );
        if !forced && !blocking.contains(&f.id.to_string()) {
            if blocking.is_empty() {
                exit = f.exit;
            }
            blocking.push(f.id.to_string());
        }
    }
    for x in force {
        if let Some(f) = findings
            .iter()
            .find(|f| f.id == x && f.level == Level::Fail && !f.forceable)
        {
            let _ = writeln!(
                out,
                "--force {x}: {} cannot be forced (enable could not plan its changes)",
                f.id
            );
        }
    }
    if blocking.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused {
            failing: blocking,
            exit,
        })
    }
}

/// The fstab as it was before initcrypt changed any line: the current text (before this run's
/// changes) with the lines earlier runs changed put back from the previous backup.
fn compose_backup(
    previous: Option<&str>,
    current: &Fstab,
    changed_targets: &[String],
    managed: &BTreeSet<String>,
) -> String {
    let prev = previous.and_then(|t| Fstab::parse(t).ok());
    let Some(prev) = prev else {
        return current.render();
    };
    let covered = changed_targets.iter().all(|t| {
        let cur = current.entry_for_target(t);
        let old = prev.entry_for_target(t);
        matches!((cur, old), (Some(c), Some(o)) if c.spec == o.spec)
    });
    if covered {
        return prev.render();
    }
    let mut b = current.clone();
    for e in current.entries() {
        let is_ours = e
            .spec
            .strip_prefix("/dev/mapper/")
            .is_some_and(|n| managed.contains(n))
            || fstab::normalise_target(&e.target) == "/";
        if !is_ours {
            continue;
        }
        if let Some(o) = prev.entry_for_target(&e.target) {
            if let Some(raw) = prev.raw_spec(o.line) {
                b.set_raw_spec(e.line, raw);
            }
        }
    }
    b.render()
}

/// What the next boot does with a volume, in words.
pub fn next_action(v: &Volume, obs: &Observation) -> String {
    let pct = |done: &u64, total: &u64| crate::boot::percent(*done, *total);
    match (v.desired, obs) {
        (Desired::Encrypted, Observation::Plaintext) => "encrypt in place, then open".into(),
        (
            Desired::Encrypted,
            Observation::Encrypted {
                reencrypt_pending: true,
            },
        ) => "finish the unfinished LUKS2 reencryption, then open".into(),
        (Desired::Encrypted, Observation::Encrypted { .. }) => "open".into(),
        (Desired::Encrypted, Observation::Open { .. }) => "open (it is open now)".into(),
        (Desired::Decrypted, Observation::Open { .. } | Observation::Encrypted { .. }) => {
            "decrypt in place (header removed)".into()
        }
        (Desired::Decrypted, Observation::Plaintext) => "nothing (plaintext)".into(),
        (
            want,
            Observation::Unfinished {
                direction,
                done,
                total,
                ..
            },
        ) => {
            let verb = if *direction == Direction::Encrypt {
                "encryption"
            } else {
                "decryption"
            };
            let same = (*direction == Direction::Encrypt) == (want == Desired::Encrypted);
            if same {
                format!("resume the {verb} at {}%", pct(done, total))
            } else {
                format!(
                    "finish the {verb} at {}%, then reverse it",
                    pct(done, total)
                )
            }
        }
        (_, Observation::Unknown(why)) => format!("cannot tell now ({why})"),
    }
}

fn report(t: &Target, vols: &[Volume], vt: VolumeType, out: &mut dyn Write) {
    for v in vols.iter().filter(|v| vt.includes(v.role)) {
        let obs = t.machine.observe(v);
        let _ = writeln!(
            out,
            "next boot: {:<14} {:<4} {}  ({})",
            v.name,
            role_name(v.role),
            next_action(v, &obs),
            v.device
        );
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Os => "os",
        Role::Data => "data",
    }
}

/// Run `step`; on failure undo everything the transaction recorded.
fn transact(
    tx: Transaction,
    step: impl FnOnce(&mut Transaction) -> Result<(), Error>,
) -> Result<Vec<PathBuf>, Error> {
    let mut tx = tx;
    match step(&mut tx) {
        Ok(()) => {
            let changed = tx.changed().to_vec();
            tx.commit();
            Ok(changed)
        }
        Err(e) => match tx.rollback() {
            Ok(()) => Err(Error::RolledBack { first: Box::new(e) }),
            Err(rb) => Err(Error::RollbackFailed {
                first: Box::new(e),
                rollback: rb.0,
            }),
        },
    }
}

/// Regenerate grub.cfg (when `needed`) and prove that no entry still boots a `root=` the fix
/// replaces.
fn regenerate_grub(t: &Target, tx: &mut Transaction, fix: Option<&Fix>) -> Result<(), Error> {
    let cfg = bootcfg::BootConfig::read(&t.root);
    let Some((tool, args)) = &cfg.tool else {
        return Err(Error::Grub(
            "grub.cfg must be regenerated but no update-grub/grub-mkconfig is installed; install the grub package".into(),
        ));
    };
    for d in ["boot/grub", "boot/grub2"] {
        tx.guard(&t.path(d), |n| n.starts_with("grub.cfg"))?;
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    initramfs::run_tool(t.machine, tool, &args)?;
    let Some(fix) = fix else {
        return Ok(());
    };
    let after = bootcfg::BootConfig::read(&t.root);
    let stale = after.stale_grub_entries(fix);
    if stale > 0 {
        return Err(Error::Grub(format!(
            "{} still boots {stale} entr{} by a root= that breaks across encryption after {}; set GRUB_CMDLINE_LINUX and GRUB_DISABLE_LINUX_UUID so that it writes root=UUID={}",
            after.grub_cfg.map(|(p, _)| p.display().to_string()).unwrap_or_default(),
            if stale == 1 { "y" } else { "ies" },
            tool.display(),
            fix.uuid
        )));
    }
    Ok(())
}

/// Rebuild every kernel's initramfs and read each back.
fn rebuild_initramfs(
    t: &Target,
    tx: &mut Transaction,
    inv: &Inventory,
    json: Option<&[u8]>,
) -> Result<(), Error> {
    let builder = inv
        .builder
        .as_ref()
        .ok_or_else(|| initramfs::Error::NoBuilder {
            root: t.root.display().to_string(),
        })?;
    tx.guard(&t.path("boot"), initramfs::is_image_name)?;
    let kernels = initramfs::kernels(&t.root);
    initramfs::rebuild(t.machine, builder, &kernels, t.offline)?;
    initramfs::verify(&initramfs::kernels(&t.root), json)?;
    Ok(())
}

/// Write a backup of `path` under /etc/initcrypt/before-enable/<path> the first time it changes.
fn first_backup(t: &Target, tx: &mut Transaction, path: &Path) -> Result<(), Error> {
    let rel = path.strip_prefix(&t.root).unwrap_or(path);
    let backup = t.path(BOOT_BACKUP_DIR).join(rel);
    if backup.exists() {
        return Ok(());
    }
    if let Some((bytes, _)) = atomic::read_original(path)? {
        tx.write(&backup, &bytes, 0o644)?;
    }
    Ok(())
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Once no OS volume is left (the decrypting boot is done): put back the boot configuration
/// files enable changed, each one only if it is still exactly what enable made of it (an
/// operator's later edit is kept, with a line saying so). Returns whether a file was restored.
fn restore_boot_config(
    t: &Target,
    tx: &mut Transaction,
    inv: &Inventory,
    uuid: &str,
    out: &mut dyn Write,
) -> Result<bool, Error> {
    let dir = t.path(BOOT_BACKUP_DIR);
    let backups: Vec<(PathBuf, PathBuf)> = files_under(&dir)
        .into_iter()
        .filter_map(|b| Some((t.root.join(b.strip_prefix(&dir).ok()?), b)))
        .collect();
    if backups.is_empty() {
        return Ok(false);
    }
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    // The configuration as it was before enable, and what enable made of it.
    let mut before = inv.bootcfg.clone();
    for (cur, bak) in &backups {
        for (p, text) in before
            .defaults
            .iter_mut()
            .chain(before.kernel_cmdline.iter_mut())
        {
            if p == cur {
                *text = read(bak);
            }
        }
    }
    let fix = Fix {
        uuid: uuid.to_string(),
        replace_mapping: false,
        drop_ade: false,
    };
    let made = before.edits_pinned(&fix);
    let mut restored = false;
    for (cur, bak) in &backups {
        let original = read(bak);
        let expected = made
            .iter()
            .find(|(p, _)| p == cur)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| original.clone());
        if read(cur) == expected {
            tx.write(cur, original.as_bytes(), 0o644)?;
            tx.remove(bak)?;
            restored = true;
        } else {
            let _ = writeln!(
                out,
                "left as is: {} was changed after enable; its original stays in {}",
                cur.display(),
                bak.display()
            );
        }
    }
    Ok(restored)
}

pub fn enable(t: &Target, opts: &Options, out: &mut dyn Write) -> Result<(), Error> {
    if opts.format_empty {
        return Err(Error::Usage(
            "enable --format-empty (formatting empty data disks) comes with issue [7] and is not implemented in this version; nothing was done".into(),
        ));
    }
    let _lock = Lock::take(&t.path("etc"))?;
    let inv = Inventory::gather(t.machine, &t.root, t.offline);
    let findings = check::run(&inv, t.machine, opts.volume_type);
    refuse(&findings, &opts.force, out)?;
    let vt = opts.volume_type;
    let current = inv.fstab.clone().map_err(|e| Error::Invalid {
        what: format!("{}: {e}", inv.fstab_path.display()),
        exit: Exit::ConfigInvalid,
    })?;
    let existing = inv.config.clone().map_err(|e| Error::Invalid {
        what: e,
        exit: Exit::ConfigInvalid,
    })?;
    let (planned, refused, os_error) = inv.plan(vt);
    if let Some(e) = os_error {
        return Err(Error::Plan(format!("cannot configure the OS volume: {e}")));
    }
    for r in &refused {
        let _ = writeln!(
            out,
            "skipped: {} ({}) stays plaintext: {}",
            r.entry.target, r.entry.spec, r.why
        );
    }
    if planned.is_empty() {
        return Err(Error::Plan(format!("no {vt} volume to enable")));
    }
    let vols = volumes::merge(
        &existing,
        planned.iter().map(|p| p.volume.clone()).collect(),
    );
    let json = volumes::render(&vols);
    let managed: BTreeSet<String> = vols.iter().map(|v| v.name.clone()).collect();

    // fstab: data lines onto their mappings, a root line naming the partition onto the UUID.
    let mut new_fstab = current.clone();
    let mut changed_targets = Vec::new();
    for p in planned.iter().filter(|p| p.volume.role == Role::Data) {
        let Some(e) = &p.entry else { continue };
        let mapped = format!("/dev/mapper/{}", p.volume.name);
        if e.spec != mapped {
            new_fstab.set_spec(e.line, &mapped);
            changed_targets.push(e.target.clone());
        }
    }
    let os_uuid = inv.os.fs_uuid.clone();
    let os_planned = planned.iter().any(|p| p.volume.role == Role::Os);
    if let (true, Some(e), Some(u)) = (os_planned, &inv.os.entry, &os_uuid) {
        if bootcfg::classify(&e.spec) == bootcfg::RootArg::Partition {
            new_fstab.set_spec(e.line, &format!("UUID={u}"));
            changed_targets.push(e.target.clone());
        }
    }
    let backup_path = t.path(FSTAB_BACKUP);
    let previous_backup = fs::read_to_string(&backup_path).ok();
    let backup = (!changed_targets.is_empty()).then(|| {
        compose_backup(
            previous_backup.as_deref(),
            &current,
            &changed_targets,
            &managed,
        )
    });

    // Kernel command line.
    let fix = os_uuid.as_ref().map(|u| Fix {
        uuid: u.clone(),
        replace_mapping: false,
        drop_ade: false,
    });
    let (edits, regen) = match (&fix, os_planned) {
        (Some(fix), true) => {
            let edits = inv.bootcfg.edits_pinned(fix);
            let regen = inv.bootcfg.grub_cfg.is_some()
                && (!edits.is_empty() || inv.bootcfg.stale_grub_entries(fix) > 0);
            (edits, regen)
        }
        _ => (Vec::new(), false),
    };

    let tx = Transaction::new(t.path(ROLLBACK_SPILL));
    let config_path = inv.config_path.clone();
    let changed = transact(tx, |tx| {
        if let Some(b) = &backup {
            tx.write(&backup_path, b.as_bytes(), 0o644)?;
        }
        for (p, _) in &edits {
            first_backup(t, tx, p)?;
        }
        tx.write(&config_path, json.as_bytes(), 0o644)?;
        tx.write(&inv.fstab_path, new_fstab.render().as_bytes(), 0o644)?;
        for (p, text) in &edits {
            tx.write(p, text.as_bytes(), 0o644)?;
        }
        if let (true, Some(fix)) = (regen, &fix) {
            regenerate_grub(t, tx, Some(fix))?;
        }
        // Enabling again with nothing new: the images already carry this volumes.json.
        let current_images = initramfs::verify(&inv.kernels, Some(json.as_bytes())).is_ok();
        if !tx.changed().is_empty() || !current_images {
            rebuild_initramfs(t, tx, &inv, Some(json.as_bytes()))?;
        }
        Ok(())
    })?;
    if changed.is_empty() {
        let _ = writeln!(out, "already enabled: nothing changed");
    }
    for p in &changed {
        let _ = writeln!(out, "changed: {}", p.display());
    }
    report(t, &vols, vt, out);
    Ok(())
}

/// The ADE OS volume the command line (running, or configured for the next boot) describes.
fn ade_os_volume(inv: &Inventory, m: &dyn Machine) -> Option<Volume> {
    let mut texts: Vec<String> = m.cmdline().into_iter().collect();
    if let Some((_, t)) = &inv.bootcfg.grub_cfg {
        texts.extend(
            t.lines()
                .filter(|l| l.trim_start().starts_with("linux"))
                .map(str::to_string),
        );
    }
    texts.iter().find_map(|t| {
        BootParams::parse(t)
            .ok()
            .and_then(|p| p.ade_volume().ok().flatten())
    })
}

pub fn disable(t: &Target, vt: VolumeType, out: &mut dyn Write) -> Result<(), Error> {
    let _lock = Lock::take(&t.path("etc"))?;
    let inv = Inventory::gather(t.machine, &t.root, t.offline);
    for f in check::run(&inv, t.machine, vt) {
        if f.level == Level::Fail
            && matches!(f.id, "fstab.parse" | "crypttab.parse" | "config.parse")
        {
            let _ = writeln!(out, "{}", f.line());
            return Err(Error::Invalid {
                what: f.what,
                exit: Exit::ConfigInvalid,
            });
        }
    }
    let current = inv.fstab.clone().unwrap_or_default();
    let mut vols = inv.config.clone().unwrap_or_default();
    let ade_left = inv.bootcfg.has_ade_params()
        || t.machine
            .cmdline()
            .is_some_and(|c| c.contains("rd.luks.ade."));
    if vt.includes(Role::Os) && !vols.iter().any(|v| v.role == Role::Os) {
        if let Some(v) = ade_os_volume(&inv, t.machine) {
            let _ = writeln!(
                out,
                "the OS volume comes from ADE's boot parameters; it is added to volumes.json"
            );
            vols.insert(0, v);
        }
    }
    // Stale entries: decrypted by an earlier boot, nothing left to do for them.
    let mut pruned = Vec::new();
    vols.retain(|v| {
        let done = v.desired == Desired::Decrypted
            && t.machine.observe(v) == Observation::Plaintext
            && !(v.role == Role::Os && ade_left);
        if done {
            pruned.push(v.name.clone());
        }
        !done
    });
    let targets: Vec<String> = vols
        .iter()
        .filter(|v| vt.includes(v.role))
        .map(|v| v.name.clone())
        .collect();
    if targets.is_empty() && pruned.is_empty() {
        let _ = writeln!(out, "nothing to disable: no {vt} volume is configured");
        return Ok(());
    }
    for v in vols.iter().filter(|v| targets.contains(&v.name)) {
        if v.header == Header::Attached {
            return Err(Error::Plan(format!(
                "{}: its LUKS header is on the disk and initcrypt decrypts in place only volumes with a detached header; decrypt it offline with `cryptsetup reencrypt --decrypt`",
                v.name
            )));
        }
    }
    for v in vols.iter_mut().filter(|v| targets.contains(&v.name)) {
        v.desired = Desired::Decrypted;
    }
    let os_target = vols
        .iter()
        .any(|v| v.role == Role::Os && targets.contains(&v.name));

    // fstab: lines restored from the backup (or onto the filesystem's UUID without one).
    let backup_path = t.path(FSTAB_BACKUP);
    let backup = fs::read_to_string(&backup_path)
        .ok()
        .and_then(|b| Fstab::parse(&b).ok());
    let mut new_fstab = current.clone();
    for e in current.entries() {
        let data_name = e
            .spec
            .strip_prefix("/dev/mapper/")
            .filter(|n| targets.iter().any(|x| x == n));
        let is_root = fstab::normalise_target(&e.target) == "/" && os_target;
        if data_name.is_none() && !is_root {
            continue;
        }
        let old = backup
            .as_ref()
            .and_then(|b| b.entry_for_target(&e.target).map(|o| (o.line, b)));
        match old {
            Some((line, b)) if b.raw_spec(line) != current.raw_spec(e.line) => {
                if let Some(raw) = b.raw_spec(line) {
                    new_fstab.set_raw_spec(e.line, raw);
                }
            }
            Some(_) => {}
            None => {
                if let Some(uuid) = data_name
                    .and_then(|_| t.machine.device(&e.spec))
                    .and_then(|d| d.uuid)
                {
                    new_fstab.set_spec(e.line, &format!("UUID={uuid}"));
                }
            }
        }
    }
    let backup_done = backup.as_ref().is_some_and(|b| {
        b.entries().iter().all(|o| {
            new_fstab
                .entry_for_target(&o.target)
                .is_none_or(|n| Some(n.spec.as_str()) == Some(o.spec.as_str()))
        })
    });

    // crypttab: other tools' lines for the volumes decrypted now.
    let mut crypttab = inv.crypttab.clone().unwrap_or_default();
    let removed = crypttab.remove_names(&targets.iter().cloned().collect());

    // Kernel command line: root= onto the filesystem, ADE's parameters gone.
    let mut fix = None;
    if os_target {
        let uuid = inv.os.fs_uuid.clone().ok_or_else(|| {
            Error::Plan(
                "the root filesystem's UUID is unknown, so root= cannot be pointed at it".into(),
            )
        })?;
        fix = Some(Fix {
            uuid,
            replace_mapping: true,
            drop_ade: true,
        });
    }
    let edits = fix
        .as_ref()
        .map(|f| inv.bootcfg.edits_pinned(f))
        .unwrap_or_default();
    let regen = fix.as_ref().is_some_and(|f| {
        inv.bootcfg.grub_cfg.is_some()
            && (!edits.is_empty() || inv.bootcfg.stale_grub_entries(f) > 0)
    });
    if os_target
        && fix.is_some()
        && inv.bootcfg.grub_cfg.is_none()
        && inv.bootcfg.kernel_cmdline.is_none()
    {
        if let Some(r) = t.machine.cmdline().and_then(|c| bootcfg::root_of(&c)) {
            if matches!(
                bootcfg::classify(&r),
                bootcfg::RootArg::Mapping(_) | bootcfg::RootArg::Partition
            ) {
                return Err(Error::Plan(format!(
                    "the kernel boots root={r} and initcrypt finds no grub configuration or /etc/kernel/cmdline to change it; make the boot loader pass root=UUID=… first"
                )));
            }
        }
    }

    let json = (!vols.is_empty()).then(|| volumes::render(&vols));
    let os_done = !ade_left && !vols.iter().any(|v| v.role == Role::Os);
    let tx = Transaction::new(t.path(ROLLBACK_SPILL));
    let changed = transact(tx, |tx| {
        if !removed.is_empty() {
            let mut text = fs::read_to_string(t.path(CRYPTTAB_BACKUP)).unwrap_or_default();
            for r in &removed {
                text.push_str(r);
                if !r.ends_with('\n') {
                    text.push('\n');
                }
            }
            tx.write(&t.path(CRYPTTAB_BACKUP), text.as_bytes(), 0o600)?;
            tx.write(&inv.crypttab_path, crypttab.render().as_bytes(), 0o644)?;
        }
        for (p, _) in &edits {
            first_backup(t, tx, p)?;
        }
        match &json {
            Some(j) => tx.write(&inv.config_path, j.as_bytes(), 0o644)?,
            None => tx.remove(&inv.config_path)?,
        }
        tx.write(&inv.fstab_path, new_fstab.render().as_bytes(), 0o644)?;
        if backup_done {
            tx.remove(&backup_path)?;
        }
        for (p, text) in &edits {
            tx.write(p, text.as_bytes(), 0o644)?;
        }
        if let (true, Some(f)) = (regen, &fix) {
            regenerate_grub(t, tx, Some(f))?;
        }
        // The decrypting boot is done: the boot configuration goes back to what it was (the
        // root is on its partition again, so grub-mkconfig's own root= is right again).
        if let (true, Some(u)) = (os_done, &inv.os.fs_uuid) {
            if restore_boot_config(t, tx, &inv, u, &mut *out)? && inv.bootcfg.grub_cfg.is_some() {
                regenerate_grub(t, tx, None)?;
            }
        }
        if !tx.changed().is_empty() {
            rebuild_initramfs(t, tx, &inv, json.as_ref().map(|j| j.as_bytes()))?;
        }
        Ok(())
    })?;
    for n in &pruned {
        let _ = writeln!(
            out,
            "removed from volumes.json: {n} (decrypted by an earlier boot)"
        );
    }
    if json.is_none() {
        let _ = writeln!(out, "no volume left: volumes.json removed");
    }
    for p in &changed {
        let _ = writeln!(out, "changed: {}", p.display());
    }
    report(t, &vols, vt, out);
    Ok(())
}

/// Helper for `check`'s CLI: gather and check.
pub fn check(t: &Target, vt: VolumeType) -> Vec<Finding> {
    let inv = Inventory::gather(t.machine, &t.root, t.offline);
    check::run(&inv, t.machine, vt)
}
