//! `initcrypt check`: pre-flight, one finding per line, nothing changed.
//!
//! Every finding has a stable id (what `enable --force ID` names), a level (`ok`, `warn`, `fail`),
//! where it was found, what was found, and the fix. It covers each item of ADE's troubleshooting
//! guide and overview (../shared/seeds): either checked, or reported `ok` as designed away with the
//! reason (ADE's 7 GB memory rule, its unmount of the live root, SELinux, the agent version...).
//!
//! Exit status: 0 when nothing fails; otherwise the design §4 code of the first failing finding in
//! the order printed (layout and boot partition 6, key volume 3, key file 4, missing device 5,
//! an fstab/crypttab/volumes.json line to fix 8).

use std::collections::BTreeSet;

use serde::Serialize;

use super::bootcfg::{self, RootArg};
use super::discover::{self, DataKind, Inventory, Layout};
use super::machine::Machine;
use super::VolumeType;
use crate::config::Role;
use crate::exit::Exit;
use crate::keyvol::OS_KEY_FILE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub id: &'static str,
    #[serde(rename = "where")]
    pub location: String,
    pub what: String,
    pub fix: String,
    /// Exit code when this finding fails.
    #[serde(skip)]
    pub exit: Exit,
    /// `enable --force` may not override it: enable could not even plan its changes.
    #[serde(skip)]
    pub forceable: bool,
}

impl Finding {
    fn new(
        level: Level,
        id: &'static str,
        location: impl Into<String>,
        what: impl Into<String>,
    ) -> Finding {
        Finding {
            level,
            id,
            location: location.into(),
            what: what.into(),
            fix: String::new(),
            exit: Exit::LayoutUnsupported,
            forceable: true,
        }
    }

    fn ok(id: &'static str, location: impl Into<String>, what: impl Into<String>) -> Finding {
        Finding::new(Level::Ok, id, location, what)
    }

    fn warn(
        id: &'static str,
        location: impl Into<String>,
        what: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(Level::Warn, id, location, what).fix(fix)
    }

    fn fail(
        id: &'static str,
        location: impl Into<String>,
        what: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(Level::Fail, id, location, what).fix(fix)
    }

    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = fix.into();
        self
    }

    fn code(mut self, exit: Exit) -> Finding {
        self.exit = exit;
        self
    }

    fn hard(mut self) -> Finding {
        self.forceable = false;
        self
    }

    /// One line: `fail  fstab.nofail          /etc/fstab:7 /data: no nofail …; fix: …`.
    pub fn line(&self) -> String {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        };
        let mut s = format!(
            "{level:<4}  {:<22}  {}: {}",
            self.id, self.location, self.what
        );
        if !self.fix.is_empty() {
            s.push_str("; fix: ");
            s.push_str(&self.fix);
        }
        s
    }
}

/// MiB, for messages.
fn mib(b: u64) -> String {
    format!("{} MiB", b.div_ceil(1 << 20))
}

/// What one more in-place pass needs on the boot partition: the LUKS2 header that stays (16 MiB,
/// `pass::LUKS2_HEADER_BYTES`) and, while it runs, the journal (8 slots of a 16 MiB chunk's
/// sector hashes: 4.04 MiB at 512-byte sectors, the worst case). Passes run one at a time.
pub const HEADER_BYTES: u64 = 16 << 20;
pub const JOURNAL_BYTES: u64 = 4096 + 8 * 528_384;
/// What adding initcrypt to an initramfs costs (the static binary, compressed).
pub const INITRAMFS_GROWTH: u64 = 4 << 20;

/// Everything check has to say about this machine for these volume types.
pub fn run(inv: &Inventory, m: &dyn Machine, vt: VolumeType) -> Vec<Finding> {
    let mut f = Vec::new();
    let (planned, refused, os_error) = inv.plan(vt);
    parse_findings(inv, &mut f);
    if vt.includes(Role::Os) {
        os_findings(inv, m, os_error.as_deref(), &mut f);
    }
    boot_findings(inv, m, &planned, &mut f);
    builder_findings(inv, &mut f);
    bootloader_findings(inv, vt, &mut f);
    key_findings(inv, vt, &planned, &mut f);
    if vt.includes(Role::Data) {
        data_findings(inv, m, &planned, &refused, &mut f);
    }
    crypttab_findings(inv, m, &planned, &mut f);
    designed_away(inv, m, &mut f);
    f
}

fn parse_findings(inv: &Inventory, f: &mut Vec<Finding>) {
    let fstab = inv.fstab_path.display().to_string();
    match &inv.fstab {
        Ok(t) => f.push(Finding::ok(
            "fstab.parse",
            &fstab,
            format!("{} entries", t.entries().len()),
        )),
        Err(e) => f.push(
            Finding::fail(
                "fstab.parse",
                &fstab,
                e.to_string(),
                "correct the line; enable edits only a file it can write back byte for byte",
            )
            .code(Exit::ConfigInvalid)
            .hard(),
        ),
    }
    if let Err(e) = &inv.crypttab {
        f.push(
            Finding::fail(
                "crypttab.parse",
                inv.crypttab_path.display().to_string(),
                e.to_string(),
                "correct the line",
            )
            .code(Exit::ConfigInvalid)
            .hard(),
        );
    }
    if let Err(e) = &inv.config {
        f.push(
            Finding::fail(
                "config.parse",
                inv.config_path.display().to_string(),
                e.to_string(),
                "correct or remove volumes.json",
            )
            .code(Exit::ConfigInvalid)
            .hard(),
        );
    }
}

fn os_findings(inv: &Inventory, m: &dyn Machine, os_error: Option<&str>, f: &mut Vec<Finding>) {
    let dev = inv.os.device.as_ref();
    let at = dev
        .map(|d| format!("/ ({})", d.name))
        .unwrap_or_else(|| "/".into());
    match &inv.os.layout {
        Layout::Partition => f.push(Finding::ok(
            "os.layout",
            &at,
            format!(
                "{} on a partition (PARTUUID={}): encrypted in place at the next boot",
                dev.and_then(|d| d.fstype.clone()).unwrap_or_default(),
                dev.and_then(|d| d.partuuid.clone())
                    .unwrap_or_else(|| "?".into())
            ),
        )),
        Layout::Encrypted { name, .. } => f.push(Finding::ok(
            "os.layout",
            &at,
            format!("already encrypted: the root runs on mapping {name}"),
        )),
        other => f.push(
            Finding::fail(
                "os.layout",
                &at,
                discover::layout_why(other),
                "encrypt the data volumes only (--volume-type data), or keep the OS plaintext",
            )
            .hard(),
        ),
    }
    if let Some(why) = os_error {
        if matches!(inv.os.layout, Layout::Partition | Layout::Encrypted { .. }) {
            f.push(
                Finding::fail(
                    "os.layout",
                    &at,
                    format!("cannot configure the OS volume: {why}"),
                    "see the boot.partition finding",
                )
                .hard(),
            );
        }
    }
    // root= of the next boot
    let cfg = &inv.bootcfg;
    let (root, src) = match cfg.next_root() {
        Some((r, p)) => (Some(r), p.display().to_string()),
        None => (
            m.cmdline().and_then(|c| bootcfg::root_of(&c)),
            "/proc/cmdline".to_string(),
        ),
    };
    let uuid = inv.os.fs_uuid.clone().unwrap_or_else(|| "<fs uuid>".into());
    let fixable = (!cfg.defaults.is_empty() && cfg.tool.is_some()) || cfg.kernel_cmdline.is_some();
    match root.as_deref().map(bootcfg::classify) {
        Some(RootArg::Filesystem) => f.push(Finding::ok(
            "os.root-arg",
            &src,
            format!("root={}: names the filesystem, which keeps its UUID inside the mapping", root.unwrap_or_default()),
        )),
        Some(RootArg::Partition) if fixable => f.push(Finding::warn(
            "os.root-arg",
            &src,
            format!("root={} names the partition, which holds ciphertext once encrypted", root.unwrap_or_default()),
            format!("none needed: enable rewrites it to root=UUID={uuid} and regenerates the boot configuration"),
        )),
        Some(RootArg::Partition) => f.push(Finding::fail(
            "os.root-arg",
            &src,
            format!("root={} names the partition, and initcrypt finds no /etc/default/grub with a grub-mkconfig or /etc/kernel/cmdline to change", root.unwrap_or_default()),
            format!("make the boot loader pass root=UUID={uuid}, then run again"),
        )),
        Some(RootArg::Mapping(n)) => f.push(Finding::ok(
            "os.root-arg",
            &src,
            format!("root= names mapping {n}: works while encrypted; disable rewrites it to root=UUID= before decrypting"),
        )),
        _ => f.push(Finding::warn(
            "os.root-arg",
            &src,
            "no root= found: the boot loader's default applies",
            format!("check that the boot entry passes root=UUID={uuid}"),
        )),
    }
    if let Some(e) = &inv.os.entry {
        if bootcfg::classify(&e.spec) == RootArg::Partition {
            f.push(Finding::warn(
                "fstab.root",
                format!("{}:{}", inv.fstab_path.display(), e.line + 1),
                format!("/ is mounted by {} (the partition)", e.spec),
                format!(
                    "none needed: enable rewrites it to UUID={uuid} (kept in the fstab backup)"
                ),
            ));
        }
    }
}

fn boot_findings(
    inv: &Inventory,
    m: &dyn Machine,
    planned: &[discover::Planned],
    f: &mut Vec<Finding>,
) {
    let b = &inv.boot;
    let root_dev = inv.os.device.as_ref().map(|d| d.name.clone());
    let bad = |what: String| {
        Finding::fail(
            "boot.partition",
            "/boot",
            what,
            "give the VM a separate plaintext /boot partition (ext4, xfs or btrfs), as the RHEL/CentOS gallery images have; images without one come with issue [8]",
        )
        .hard()
    };
    match (&b.entry, &b.device) {
        (None, None) => {
            f.push(bad("no separate /boot in fstab or mounted: the detached headers and pass journals need one".into()));
            return;
        }
        (_, None) => {
            f.push(bad(format!(
                "fstab's /boot ({}) names no device present here",
                b.entry.as_ref().map(|e| e.spec.clone()).unwrap_or_default()
            )));
            return;
        }
        _ => {}
    }
    let Some(dev) = &b.device else { return };
    if Some(&dev.name) == root_dev.as_ref() {
        f.push(bad("/boot is on the root device itself".into()));
        return;
    }
    if !b.mounted {
        f.push(bad(format!(
            "/boot ({}) is not mounted{}",
            dev.name,
            if inv.offline {
                " in the image tree"
            } else {
                ""
            }
        )));
        return;
    }
    let fstype = b.fstype.clone().unwrap_or_default();
    if !discover::BOOT_FSTYPES.contains(&fstype.as_str()) || b.fs_uuid.is_none() {
        f.push(bad(format!(
            "/boot ({}) is {fstype:?}, not ext2/3/4, xfs or btrfs with a UUID",
            dev.name
        )));
        return;
    }
    f.push(Finding::ok(
        "boot.partition",
        "/boot",
        format!(
            "{} {fstype} UUID={}, plaintext: holds the detached headers",
            dev.name,
            b.fs_uuid.clone().unwrap_or_default()
        ),
    ));
    // Room: new headers (they stay), one journal (passes run one at a time), the initramfs images.
    let headers = planned.iter().filter(|p| p.new_header).count() as u64;
    let images: Vec<u64> = inv
        .kernels
        .iter()
        .filter_map(|k| std::fs::metadata(&k.image).ok().map(|m| m.len()))
        .collect();
    let growth = inv.kernels.len() as u64 * INITRAMFS_GROWTH;
    let slack = images.iter().copied().max().unwrap_or(0) + INITRAMFS_GROWTH;
    let need =
        headers * HEADER_BYTES + if headers > 0 { JOURNAL_BYTES } else { 0 } + growth + slack;
    match m.free_bytes(&inv.root.join("boot")) {
        Some(have) if have >= need => f.push(Finding::ok(
            "boot.space",
            "/boot",
            format!(
                "{} free, {} needed ({headers} new header(s) of 16 MiB, one 4 MiB pass journal, initramfs rebuild room)",
                mib(have),
                mib(need)
            ),
        )),
        Some(have) => f.push(Finding::fail(
            "boot.space",
            "/boot",
            format!("{} free, {} needed ({headers} new header(s) of 16 MiB, one 4 MiB pass journal, initramfs rebuild room)", mib(have), mib(need)),
            format!("free {} in /boot (remove old kernels: apt autoremove --purge)", mib(need - have)),
        )),
        None => f.push(Finding::warn("boot.space", "/boot", "cannot read the free space", "check that /boot has room")),
    }
}

fn builder_findings(inv: &Inventory, f: &mut Vec<Finding>) {
    match &inv.builder {
        Some(b) => f.push(Finding::ok(
            "initramfs.tool",
            b.tool().display().to_string(),
            format!("{}: every kernel's initramfs is rebuilt with it", b.name()),
        )),
        None => f.push(
            Finding::fail(
                "initramfs.tool",
                "/usr/sbin",
                "neither update-initramfs nor dracut is installed",
                "install initramfs-tools or dracut",
            )
            .hard(),
        ),
    }
    if inv.kernels.is_empty() {
        f.push(
            Finding::fail(
                "kernel.installed",
                "/lib/modules",
                if inv.boot.mounted || inv.boot.entry.is_none() {
                    "no installed kernel (lib/modules/<version> with a vmlinuz)"
                } else {
                    "no kernel image in /boot: /boot is not mounted"
                },
                "install a kernel package (or mount /boot)",
            )
            .hard(),
        );
    }
    for k in &inv.kernels {
        if k.dm_crypt {
            f.push(Finding::ok(
                "kernel.dm-crypt",
                format!("/lib/modules/{}", k.version),
                "dm-crypt is available",
            ));
        } else {
            f.push(Finding::fail(
                "kernel.dm-crypt",
                format!("/lib/modules/{}", k.version),
                "dm-crypt is neither built in nor a module: this kernel cannot open an encrypted disk",
                "install the distribution's full kernel (e.g. linux-image-cloud-amd64) or remove this one",
            ));
        }
    }
}

fn bootloader_findings(inv: &Inventory, vt: VolumeType, f: &mut Vec<Finding>) {
    let cfg = &inv.bootcfg;
    let Some((grub_cfg, _)) = &cfg.grub_cfg else {
        f.push(Finding::ok(
            "bootloader.tools",
            "/boot",
            "no grub.cfg: nothing to regenerate (the boot entry's command line is configured elsewhere)",
        ));
        return;
    };
    let at = grub_cfg.display().to_string();
    let uuid = inv.os.fs_uuid.clone().unwrap_or_default();
    let fix = bootcfg::Fix {
        uuid,
        replace_mapping: false,
        drop_ade: false,
    };
    let regen_needed = vt.includes(Role::Os)
        && (cfg.stale_grub_entries(&fix) > 0 || !cfg.edits_pinned(&fix).is_empty());
    match &cfg.tool {
        Some((t, _)) => f.push(Finding::ok("bootloader.tools", &at, format!("{} regenerates it", t.display()))),
        None if regen_needed => f.push(Finding::fail(
            "bootloader.tools",
            &at,
            "grub.cfg boots root= by partition and no update-grub/grub-mkconfig is installed to regenerate it",
            "install the distribution's grub package (grub2-common / grub-common)",
        )),
        None => f.push(Finding::warn(
            "bootloader.tools",
            &at,
            "no update-grub/grub-mkconfig installed: a kernel upgrade will not reach grub.cfg",
            "install the distribution's grub package",
        )),
    }
    if !cfg.platform_modules {
        f.push(Finding::warn(
            "bootloader.tools",
            "/usr/lib/grub",
            "GRUB's platform modules (i386-pc or x86_64-efi) are not installed: the next grub-install fails (ADE left VMs unbootable this way, azure-linux-extensions#1240); initcrypt itself never runs grub-install",
            "apt-get install grub-pc-bin (BIOS) or grub-efi-amd64-bin (UEFI)",
        ));
    }
}

fn key_findings(
    inv: &Inventory,
    vt: VolumeType,
    planned: &[discover::Planned],
    f: &mut Vec<Finding>,
) {
    let at = "key volume";
    let files = match &inv.keyvol {
        Ok(files) => {
            f.push(Finding::ok(
                "keyvol.present",
                at,
                format!("\"BEK VOLUME\" holds: {}", files.join(", ")),
            ));
            files
        }
        Err(e) if inv.offline => {
            f.push(Finding::warn(
                "keyvol.present",
                at,
                format!("not attached to this machine ({e})"),
                "none for an image prepared offline: the platform attaches it at the VM's first boot; without it that boot waits initcrypt.keyvol_timeout= and stops",
            ));
            return;
        }
        Err(e) => {
            let what = e.split(';').next().unwrap_or(e).to_string();
            f.push(
                Finding::fail("keyvol.present", at, what, "attach the key volume (enable encryption from the platform so it writes the keys), then run again")
                    .code(Exit::KeyVolumeMissing),
            );
            return;
        }
    };
    let resolvable = |want: &str| {
        files.iter().any(|f| f == want)
            || files.iter().filter(|f| f.starts_with(OS_KEY_FILE)).count() == 1
    };
    if vt.includes(Role::Os) && planned.iter().any(|p| p.volume.role == Role::Os) {
        if resolvable(OS_KEY_FILE) {
            f.push(Finding::ok(
                "keyvol.os-key",
                at,
                format!("{OS_KEY_FILE} present"),
            ));
        } else {
            f.push(
                Finding::fail(
                    "keyvol.os-key",
                    at,
                    format!("{OS_KEY_FILE} is not on the key volume"),
                    "re-stamp the encryption settings so the platform writes it",
                )
                .code(Exit::KeyRejected),
            );
        }
    }
    for p in planned.iter().filter(|p| p.volume.role == Role::Data) {
        let where_ = format!("key volume, {}", p.volume.name);
        if resolvable(&p.volume.key_file) {
            f.push(Finding::ok(
                "keyvol.data-key",
                where_,
                format!("key file {}", p.key_note),
            ));
        } else {
            f.push(
                Finding::fail(
                    "keyvol.data-key",
                    where_,
                    format!(
                        "neither {} nor {OS_KEY_FILE} is on the key volume",
                        p.volume.key_file
                    ),
                    "re-stamp the encryption settings so the platform writes the data disks' keys",
                )
                .code(Exit::KeyRejected),
            );
        }
    }
}

fn data_findings(
    inv: &Inventory,
    m: &dyn Machine,
    planned: &[discover::Planned],
    refused: &[discover::Unplannable],
    f: &mut Vec<Finding>,
) {
    let fstab = inv.fstab_path.display().to_string();
    let at = |e: &super::fstab::Entry| format!("{fstab}:{} {}", e.line + 1, e.target);
    if inv.data.is_empty() {
        f.push(Finding::ok(
            "data.none",
            &fstab,
            "no data filesystem in fstab: nothing to encrypt there",
        ));
    }
    for d in &inv.data {
        let e = &d.entry;
        if e.spec.starts_with("/dev/")
            && !e.spec.starts_with("/dev/disk/")
            && !e.spec.starts_with("/dev/mapper/")
        {
            f.push(
                Finding::fail(
                    "fstab.persistent-name",
                    at(e),
                    format!("{} is a kernel name: it may name another disk after a reboot (and does after encryption)", e.spec),
                    "use UUID=<filesystem UUID> (blkid) in that line",
                )
                .code(Exit::ConfigInvalid),
            );
        }
        if !e.has_option("nofail") && !matches!(d.kind, DataKind::Foreign { .. }) {
            f.push(
                Finding::fail(
                    "fstab.nofail",
                    at(e),
                    "no nofail option: a data disk that cannot be opened (detached, no key) would stop the boot",
                    "add nofail to the line's options",
                )
                .code(Exit::ConfigInvalid),
            );
        }
        match &d.kind {
            DataKind::Candidate { device, mounted } => match mounted {
                Some(mm) if mm.device.as_deref() == Some(device.name.as_str()) => f.push(Finding::ok(
                    "fstab.mounted",
                    at(e),
                    format!("{} ({}) is mounted there as fstab says", device.name, device.fstype.clone().unwrap_or_default()),
                )),
                Some(mm) => f.push(
                    Finding::fail(
                        "fstab.mounted",
                        at(e),
                        format!("fstab names {} but {} is mounted there", device.name, mm.device.clone().unwrap_or(mm.source.clone())),
                        "make the line name the mounted filesystem (mount -a, then lsblk)",
                    )
                    .code(Exit::DeviceMissing),
                ),
                None if inv.offline => {}
                None => f.push(Finding::warn(
                    "fstab.mounted",
                    at(e),
                    format!("{} is not mounted now", device.name),
                    "run mount -a and check lsblk: a line that does not mount now will not mount after encryption either",
                )),
            },
            DataKind::Managed { name } => f.push(Finding::ok("data.managed", at(e), format!("already volume {name} (/dev/mapper/{name})"))),
            DataKind::Foreign { why } => f.push(Finding::warn("data.foreign", at(e), why.clone(), "none: initcrypt leaves it as it is")),
            DataKind::Unsupported { .. } | DataKind::Missing => {}
        }
        if let DataKind::Candidate { .. } | DataKind::Managed { .. } = &d.kind {
            let users = m.users_of(&e.target);
            if !users.is_empty() {
                let names: Vec<String> = users
                    .iter()
                    .take(8)
                    .map(|u| format!("{} (pid {})", u.comm, u.pid))
                    .collect();
                f.push(Finding::warn(
                    "data.busy",
                    at(e),
                    format!("in use by {}", names.join(", ")),
                    "none needed for the offline pass (the reboot stops them); stop writers first if they must not see the reboot",
                ));
            }
        }
    }
    for r in refused {
        let exit = if r.why.contains("names no device") {
            Exit::DeviceMissing
        } else {
            Exit::LayoutUnsupported
        };
        f.push(
            Finding::fail(
                "data.device",
                at(&r.entry),
                r.why.clone(),
                format!(
                    "fix or remove the line, or --force data.device to leave {} plaintext",
                    r.entry.target
                ),
            )
            .code(exit),
        );
    }
    for p in planned.iter().filter(|p| p.volume.role == Role::Data) {
        f.push(Finding::ok(
            "data.volume",
            p.entry.as_ref().map(at).unwrap_or_default(),
            format!(
                "volume {} on {}, header luks/{}.hdr on /boot",
                p.volume.name, p.volume.device, p.volume.name
            ),
        ));
    }
    nesting_findings(inv, f);
}

fn nesting_findings(inv: &Inventory, f: &mut Vec<Finding>) {
    let fstab = inv.fstab_path.display().to_string();
    let entries = inv.fstab.as_ref().map(|t| t.entries()).unwrap_or_default();
    let resource: Vec<_> = entries
        .iter()
        .filter(|e| {
            discover::not_data(e, &inv.root).is_some_and(|w| w.starts_with("the resource disk"))
        })
        .collect();
    for d in &inv.data {
        let child = &d.entry;
        for parent in entries
            .iter()
            .filter(|p| super::fstab::is_inside(&child.target, &p.target) && p.target != "/")
        {
            let at = format!("{fstab}:{} {}", child.line + 1, child.target);
            if resource.iter().any(|r| r.line == parent.line) {
                f.push(Finding::warn(
                    "fstab.under-resource",
                    at,
                    format!("mounted inside the resource disk's {}: the platform re-creates that disk empty at a redeploy, so the mount point disappears", parent.target),
                    "mount data disks on directories of the OS disk",
                ));
            } else if parent.line < child.line {
                f.push(Finding::ok(
                    "fstab.nested",
                    at,
                    format!("inside {}, which fstab mounts first: kept in that order (systemd also orders nested mounts)", parent.target),
                ));
            } else {
                f.push(Finding::warn(
                    "fstab.nested",
                    at,
                    format!("inside {}, which fstab lists later", parent.target),
                    format!(
                        "move the {} line below the {} line (mount -a mounts in file order)",
                        child.target, parent.target
                    ),
                ));
            }
        }
    }
}

fn crypttab_findings(
    inv: &Inventory,
    m: &dyn Machine,
    planned: &[discover::Planned],
    f: &mut Vec<Finding>,
) {
    let Ok(ct) = &inv.crypttab else { return };
    let at = inv.crypttab_path.display().to_string();
    let names: BTreeSet<&str> = planned.iter().map(|p| p.volume.name.as_str()).collect();
    for e in ct.entries() {
        if !names.contains(e.name.as_str()) {
            continue;
        }
        let spec = e
            .device
            .strip_prefix("/dev/disk/by-partuuid/")
            .map(|u| format!("PARTUUID={u}"))
            .unwrap_or(e.device.clone());
        let theirs = m.device(&spec).map(|d| d.name);
        let ours = planned
            .iter()
            .find(|p| p.volume.name == e.name)
            .and_then(|p| m.device(&p.volume.device.to_string()).map(|d| d.name))
            .or_else(|| {
                // The OS volume of an ADE VM: the partition below the root mapping.
                match &inv.os.layout {
                    Layout::Encrypted { below, .. } => below.as_ref().map(|b| b.name.clone()),
                    _ => None,
                }
            });
        let at = format!("{at}:{}", e.line + 1);
        if theirs.is_some() && theirs == ours {
            f.push(Finding::ok(
                "crypttab.line",
                at,
                format!("{} has a line from another tool (ADE?); the volume is already open when the real root reads it, so it does no harm; disable removes it", e.name),
            ));
        } else {
            f.push(
                Finding::fail(
                    "crypttab.conflict",
                    at,
                    format!(
                        "{} is configured there for {}, another device than initcrypt's",
                        e.name, e.device
                    ),
                    "remove or rename that crypttab line",
                )
                .code(Exit::ConfigInvalid),
            );
        }
    }
}

fn designed_away(inv: &Inventory, m: &dyn Machine, f: &mut Vec<Finding>) {
    let mem = m
        .mem_total()
        .map(|b| format!("{} GiB here", b.div_ceil(1 << 30)))
        .unwrap_or_else(|| "not read".into());
    f.push(Finding::ok(
        "memory",
        "RAM",
        format!("not a requirement ({mem}): the pass runs in the initramfs in ~52 MiB whatever the disk size; ADE's 7-8 GB (2x root usage) rule came from copying the running OS into RAM"),
    ));
    f.push(Finding::ok(
        "os.unmount",
        "/",
        "designed away: the OS pass runs in the initramfs before anything mounts the root, so nothing (SAP, MongoDB, Cassandra, Docker, custom scripts, SELinux) can hold it; ADE's \"unmount failed\" cannot happen",
    ));
    f.push(Finding::ok(
        "selinux",
        "/",
        "designed away: no live unmount or pivot_root; the files enable replaces get their directory's default context, like any editor's",
    ));
    f.push(Finding::ok(
        "kernel.oom",
        "kernel",
        "designed away: no dd; the pass uses constant memory (three 16 MiB buffers), so the Ubuntu 14.04 OOM kill of ADE's dd does not apply",
    ));
    f.push(Finding::ok(
        "agent",
        "guest agent",
        "designed away: no VM agent or extension version is involved at boot; the platform only attaches the key volume",
    ));
    f.push(Finding::ok(
        "network",
        "network",
        "designed away: nothing at boot reaches Key Vault or Azure AD; the key comes from the attached key volume",
    ));
    f.push(Finding::ok(
        "status.drift",
        "status",
        "designed away: `initcrypt status` observes the disks every time (headers, journals, dm tables), so it cannot show a disk as encrypted after a low-level decrypt",
    ));
    f.push(Finding::ok(
        "recovery",
        "pass",
        "designed away: a failed or interrupted pass resumes at the next boot from its journal; no restore from snapshot is needed",
    ));
    f.push(Finding::ok(
        "vfat",
        "key volume",
        "designed away: initcrypt reads the FAT key volume itself, without the vfat module or a mount",
    ));
    f.push(Finding::ok(
        "data.late-mount",
        "data volumes",
        "designed away: data volumes open in the initramfs, before fstab mounts them and before any service starts (ADE's late, agent-driven unlock)",
    ));
    f.push(Finding::ok(
        "fstab.kept",
        inv.fstab_path.display().to_string(),
        "designed away: enable only changes the device field of the lines it encrypts (backup /etc/initcrypt/fstab.before-enable); nothing moves to a private file",
    ));
    if let Some(d) = &inv.os.device {
        if matches!(inv.os.layout, Layout::Partition) {
            f.push(Finding::ok(
                "os.pass-time",
                format!("/ ({})", d.name),
                format!(
                    "the next boot encrypts {} GiB in place before the root mounts: the VM is unreachable (no SSH) meanwhile, progress is on the serial console; it resumes if cut",
                    d.size.div_ceil(1 << 30)
                ),
            ));
        }
    }
    let ade: Vec<&str> = [
        "usr/lib/dracut/modules.d/91ade",
        "usr/lib/dracut/modules.d/91adeOnline",
        "usr/share/initramfs-tools/hooks/crypt-ade-hook",
        "usr/share/initramfs-tools/scripts/init-premount/crypt-ade-boot",
        "etc/dracut.conf.d/ade.conf",
    ]
    .into_iter()
    .filter(|p| inv.root.join(p).exists())
    .collect();
    if !ade.is_empty() {
        f.push(Finding::warn(
            "ade.leftovers",
            ade.iter().map(|p| format!("/{p}")).collect::<Vec<_>>().join(" "),
            "ADE's own initramfs pieces are installed: they try to open osencrypt too (harmless when initcrypt has opened it, but they prompt or retry when it has not)",
            "remove ADE's extension and these files, then rebuild the initramfs",
        ));
    }
}

/// The exit status of a check run: 0, or the code of the first failing finding.
pub fn exit_of(findings: &[Finding]) -> Exit {
    findings
        .iter()
        .find(|f| f.level == Level::Fail)
        .map(|f| f.exit)
        .unwrap_or(Exit::Ok)
}
