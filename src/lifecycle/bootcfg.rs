//! The kernel command line of the next boot: where it is configured (`/etc/default/grub` and
//! `grub.d/*.cfg`, `/etc/kernel/cmdline`), what `grub.cfg` says now, and the edits that make
//! `root=` name the root *filesystem*.
//!
//! Why `root=UUID=<filesystem UUID>`: the filesystem keeps its UUID inside the mapping, and the
//! initramfs re-probes the partition after every pass, so the same word finds the root before
//! encryption, after it, and after decryption. `root=PARTUUID=` and `/dev/sdX` name the partition,
//! which holds ciphertext once encrypted; `root=/dev/mapper/<name>` disappears once decrypted
//! (config refuses to decrypt while root= names the mapping). initcrypt never writes either.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What a `root=` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootArg {
    /// The filesystem: `UUID=`, `LABEL=`, `/dev/disk/by-uuid/…`, `/dev/disk/by-label/…`.
    Filesystem,
    /// The partition: `PARTUUID=`, `PARTLABEL=`, `/dev/sdX…`, by-partuuid, by-path, by-id.
    Partition,
    /// A device-mapper device: `/dev/mapper/<name>`, `/dev/dm-N`, by-id/dm-name-<name>.
    Mapping(String),
    Other,
}

pub fn classify(root: &str) -> RootArg {
    let r = root.trim_matches('"');
    if r.starts_with("UUID=") || r.starts_with("LABEL=") {
        return RootArg::Filesystem;
    }
    if r.starts_with("PARTUUID=") || r.starts_with("PARTLABEL=") {
        return RootArg::Partition;
    }
    if let Some(n) = r.strip_prefix("/dev/mapper/") {
        return RootArg::Mapping(n.to_string());
    }
    if let Some(n) = r.strip_prefix("/dev/disk/by-id/dm-name-") {
        return RootArg::Mapping(n.to_string());
    }
    if r.starts_with("/dev/dm-") || r.starts_with("/dev/disk/by-id/dm-uuid-") {
        return RootArg::Mapping(r.to_string());
    }
    if r.starts_with("/dev/disk/by-uuid/") || r.starts_with("/dev/disk/by-label/") {
        return RootArg::Filesystem;
    }
    if r.starts_with("/dev/") {
        // /dev/sda2, /dev/vda2, /dev/nvme0n1p2, by-partuuid, by-path, by-id: the partition.
        return RootArg::Partition;
    }
    RootArg::Other
}

/// The value of the last `root=` word of a command line (the kernel uses the last one). A word
/// may be quoted whole (`"root=UUID=x"`, as in a grub defaults line) or its value may be; the
/// quotes are not part of the value.
pub fn root_of(cmdline: &str) -> Option<String> {
    cmdline
        .split(|c: char| c.is_ascii() && is_blank(c as u8))
        .filter_map(|w| core_of(w).1.strip_prefix("root="))
        .next_back()
        .map(|v| v.trim_matches(QUOTES).to_string())
}

const QUOTES: [char; 2] = ['"', '\''];

/// A word without the quotes around it: (leading quotes, the word, trailing quotes).
fn core_of(word: &str) -> (&str, &str, &str) {
    let inner = word.trim_start_matches(QUOTES);
    let pre = &word[..word.len() - inner.len()];
    let core = inner.trim_end_matches(QUOTES);
    (pre, core, &inner[core.len()..])
}

/// What to change on the command line.
#[derive(Debug, Clone)]
pub struct Fix {
    /// The root filesystem's UUID, for `root=UUID=…`.
    pub uuid: String,
    /// Replace root= values naming the partition (always) and a mapping (disable).
    pub replace_mapping: bool,
    /// Drop ADE's `rd.luks.ade.partuuid=` / `rd.luks.ade.bootuuid=` (disable of the OS volume:
    /// once volumes.json no longer names it, they would make the boot encrypt it again).
    pub drop_ade: bool,
}

impl Fix {
    fn wants(&self, value: &str) -> bool {
        match classify(value) {
            RootArg::Partition => true,
            RootArg::Mapping(_) => self.replace_mapping,
            _ => false,
        }
    }
}

/// The kernel splits its command line at C's isspace(): ASCII blanks including \v.
fn is_blank(c: u8) -> bool {
    c.is_ascii_whitespace() || c == 0x0b
}

/// Blank-separated words of `text` with their byte ranges.
fn words(text: &str) -> Vec<Range<usize>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if is_blank(b[i]) {
            i += 1;
            continue;
        }
        let s = i;
        while i < b.len() && !is_blank(b[i]) {
            i += 1;
        }
        out.push(s..i);
    }
    out
}

/// Apply `fix` to the kernel-parameter words of `text` (a whole /etc/kernel/cmdline, or the value
/// part of a GRUB_CMDLINE_LINUX line); everything else stays byte for byte. Quotes around a word
/// stay where they are. A dropped word takes one run of blanks with it (the one before it, else
/// the one after); quotes it leaves join the word before.
fn fix_words(text: &str, fix: &Fix) -> String {
    let blank = |g: &str| !g.is_empty() && g.bytes().all(|c| c == b' ' || c == b'\t');
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    let mut eat_blanks = false;
    for w in words(text) {
        let (pre, core, post) = core_of(&text[w.clone()]);
        let mut gap = &text[pos..w.start];
        if eat_blanks {
            gap = gap.trim_start_matches([' ', '\t']);
            eat_blanks = false;
        }
        let drop = fix.drop_ade
            && (core.starts_with("rd.luks.ade.partuuid=")
                || core.starts_with("rd.luks.ade.bootuuid="));
        if drop {
            if !blank(gap) || out.is_empty() {
                out.push_str(gap);
                eat_blanks = true;
            }
            out.push_str(pre);
            out.push_str(post);
        } else {
            out.push_str(gap);
            out.push_str(pre);
            match core.strip_prefix("root=") {
                Some(v) if fix.wants(v.trim_matches(QUOTES)) => {
                    out.push_str("root=UUID=");
                    out.push_str(&fix.uuid);
                }
                _ => out.push_str(core),
            }
            out.push_str(post);
        }
        pos = w.end;
    }
    let tail = &text[pos..];
    out.push_str(if eat_blanks {
        tail.trim_start_matches([' ', '\t'])
    } else {
        tail
    });
    out
}

/// Apply `fix` to a grub defaults file (shell syntax): the command-line variables get `fix_words`,
/// `GRUB_FORCE_PARTUUID=` (Ubuntu's first-boot "initrdless" boot by PARTUUID) is commented out,
/// and `GRUB_DISABLE_LINUX_UUID=true` (which makes grub-mkconfig write the device name instead of
/// the UUID) becomes false. Other lines are untouched.
pub fn fix_grub_defaults(text: &str, fix: &Fix) -> String {
    text.split_inclusive('\n')
        .map(|line| {
            let t = line.trim_start();
            let t = t.strip_prefix("export ").unwrap_or(t).trim_start();
            if t.starts_with("GRUB_CMDLINE_LINUX=") || t.starts_with("GRUB_CMDLINE_LINUX_DEFAULT=")
            {
                let eq = line.find('=').map(|i| i + 1).unwrap_or(0);
                format!("{}{}", &line[..eq], fix_words(&line[eq..], fix))
            } else if t.starts_with("GRUB_FORCE_PARTUUID=") {
                format!("# disabled by initcrypt (the partition is encrypted): {line}")
            } else if let Some(v) = t.strip_prefix("GRUB_DISABLE_LINUX_UUID=") {
                if v.trim().trim_matches(['"', '\'']) == "true" {
                    let at = line.rfind("true").unwrap_or(0);
                    format!("{}false{}", &line[..at], &line[at + 4..])
                } else {
                    line.to_string()
                }
            } else {
                line.to_string()
            }
        })
        .collect()
}

pub fn fix_cmdline_file(text: &str, fix: &Fix) -> String {
    fix_words(text, fix)
}

/// The `root=` of each boot entry of a grub.cfg (`linux`, `linuxefi`, `linux16` lines), in
/// order: the first is what boots by default (GRUB_DEFAULT=0, the usual cloud setting).
pub fn grub_cfg_roots(text: &str) -> Vec<Option<String>> {
    text.lines()
        .filter_map(|l| {
            let cmd = l.split_whitespace().next()?;
            matches!(cmd, "linux" | "linuxefi" | "linux16").then(|| root_of(l))
        })
        .collect()
}

fn is_cmdline_assignment(line: &str) -> bool {
    let t = line.trim_start();
    let t = t.strip_prefix("export ").unwrap_or(t).trim_start();
    t.starts_with("GRUB_CMDLINE_LINUX=")
}

/// `line` (a GRUB_CMDLINE_LINUX= assignment) with `word` added inside its value, or None when
/// the value already has a root= word.
fn pin_line(line: &str, word: &str) -> Option<String> {
    let eq = line.find('=')? + 1;
    let (body, nl) = match line.strip_suffix('\n') {
        Some(b) => (b, "\n"),
        None => (line, ""),
    };
    let value = &body[eq..];
    if root_of(value).is_some() {
        return None;
    }
    let first = value.chars().next();
    let new_value = match first {
        Some(q @ ('"' | '\'')) => {
            let close = value[1..].find(q)? + 1;
            let inside = &value[1..close];
            let sep = if inside.trim().is_empty() { "" } else { " " };
            format!("{}{sep}{word}{}", &value[..close], &value[close..])
        }
        _ if value.trim().is_empty() => format!("\"{word}\"{}", value.trim_start()),
        _ => {
            let (v, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
            format!(
                "\"{v} {word}\"{}{rest}",
                if rest.is_empty() { "" } else { " " }
            )
        }
    };
    Some(format!("{}{new_value}{nl}", &body[..eq]))
}

/// How the next boot's command line is configured in a root tree.
#[derive(Debug, Clone, Default)]
pub struct BootConfig {
    /// `/etc/default/grub` then `/etc/default/grub.d/*.cfg` (host paths, text).
    pub defaults: Vec<(PathBuf, String)>,
    pub kernel_cmdline: Option<(PathBuf, String)>,
    pub grub_cfg: Option<(PathBuf, String)>,
    /// The tool that regenerates grub.cfg (path inside the tree) and its arguments.
    pub tool: Option<(PathBuf, Vec<String>)>,
    /// GRUB's platform modules are installed (`/usr/lib/grub/<platform>`): without them the next
    /// grub-install fails, which is how ADE left VMs unbootable (azure-linux-extensions#1240).
    pub platform_modules: bool,
}

pub fn find_tool(root: &Path, names: &[&str]) -> Option<PathBuf> {
    for name in names {
        for dir in ["usr/sbin", "usr/bin", "sbin", "bin"] {
            let p = root.join(dir).join(name);
            if p.is_file() {
                return Some(Path::new("/").join(dir).join(name));
            }
        }
    }
    None
}

impl BootConfig {
    pub fn read(root: &Path) -> BootConfig {
        let mut c = BootConfig::default();
        let default = root.join("etc/default/grub");
        if let Ok(t) = fs::read_to_string(&default) {
            c.defaults.push((default, t));
        }
        let mut extra: Vec<PathBuf> = fs::read_dir(root.join("etc/default/grub.d"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "cfg"))
                    .collect()
            })
            .unwrap_or_default();
        extra.sort();
        for p in extra {
            if let Ok(t) = fs::read_to_string(&p) {
                c.defaults.push((p, t));
            }
        }
        let kc = root.join("etc/kernel/cmdline");
        if let Ok(t) = fs::read_to_string(&kc) {
            c.kernel_cmdline = Some((kc, t));
        }
        for rel in ["boot/grub/grub.cfg", "boot/grub2/grub.cfg"] {
            if let Ok(t) = fs::read_to_string(root.join(rel)) {
                c.grub_cfg = Some((root.join(rel), t));
                break;
            }
        }
        let cfg_arg = |rel: &str| vec!["-o".to_string(), format!("/{rel}")];
        c.tool = if let Some(t) = find_tool(root, &["update-grub"]) {
            Some((t, Vec::new()))
        } else if let Some(t) = find_tool(root, &["grub-mkconfig"]) {
            Some((t, cfg_arg("boot/grub/grub.cfg")))
        } else {
            find_tool(root, &["grub2-mkconfig"]).map(|t| (t, cfg_arg("boot/grub2/grub.cfg")))
        };
        c.platform_modules = ["usr/lib/grub", "usr/lib/grub2", "usr/share/grub2"]
            .iter()
            .any(|d| {
                fs::read_dir(root.join(d))
                    .map(|rd| {
                        rd.flatten().any(|e| {
                            let n = e.file_name().to_string_lossy().into_owned();
                            n.contains("-pc") || n.contains("-efi")
                        })
                    })
                    .unwrap_or(false)
            });
        c
    }

    /// The files `fix` changes, with their new text, plus `root=UUID=<uuid>` pinned at the end of the last `GRUB_CMDLINE_LINUX=` the
    /// grub defaults assign (in the order grub-mkconfig sources them), when that line has no
    /// root= word. Why: grub-mkconfig writes its own root= from what it probes, and probes
    /// `root=/dev/mapper/<name>` when /dev/disk/by-uuid does not list the mapped filesystem (a
    /// mapping udev did not fully describe); the kernel, dracut and initramfs-tools all take the
    /// *last* root= word, and GRUB_CMDLINE_LINUX comes after grub's own, so ours decides whatever
    /// grub-mkconfig probes at a later kernel upgrade.
    pub fn edits_pinned(&self, fix: &Fix) -> Vec<(PathBuf, String)> {
        let mut files: Vec<(PathBuf, String)> = self
            .defaults
            .iter()
            .map(|(p, t)| (p.clone(), fix_grub_defaults(t, fix)))
            .collect();
        let mut last = None;
        for (fi, (_, text)) in files.iter().enumerate() {
            for (li, line) in text.split_inclusive('\n').enumerate() {
                if is_cmdline_assignment(line) {
                    last = Some((fi, li));
                }
            }
        }
        let pin = format!("root=UUID={}", fix.uuid);
        match last {
            Some((fi, li)) => {
                let text = &files[fi].1;
                let lines: Vec<&str> = text.split_inclusive('\n').collect();
                if let Some(new) = pin_line(lines[li], &pin) {
                    let mut out: String = lines[..li].concat();
                    out.push_str(&new);
                    out.push_str(&lines[li + 1..].concat());
                    files[fi].1 = out;
                }
            }
            None => {
                if let Some((_, text)) = files.first_mut() {
                    if !text.is_empty() && !text.ends_with('\n') {
                        text.push('\n');
                    }
                    text.push_str(&format!("GRUB_CMDLINE_LINUX=\"{pin}\"\n"));
                }
            }
        }
        let mut out: Vec<(PathBuf, String)> = files
            .into_iter()
            .zip(&self.defaults)
            .filter(|((_, new), (_, old))| new != old)
            .map(|(f, _)| f)
            .collect();
        if let Some((p, t)) = &self.kernel_cmdline {
            let n = fix_cmdline_file(t, fix);
            if n != *t {
                out.push((p.clone(), n));
            }
        }
        out
    }

    /// root= of the next boot: grub.cfg's first entry, else /etc/kernel/cmdline.
    pub fn next_root(&self) -> Option<(String, PathBuf)> {
        if let Some((p, t)) = &self.grub_cfg {
            if let Some(Some(r)) = grub_cfg_roots(t).into_iter().next() {
                return Some((r, p.clone()));
            }
        }
        self.kernel_cmdline
            .as_ref()
            .and_then(|(p, t)| root_of(t).map(|r| (r, p.clone())))
    }

    /// grub.cfg entries whose root= `fix` would replace (stale until grub.cfg is regenerated).
    pub fn stale_grub_entries(&self, fix: &Fix) -> usize {
        self.grub_cfg
            .as_ref()
            .map(|(_, t)| {
                grub_cfg_roots(t)
                    .iter()
                    .filter(|r| r.as_deref().is_some_and(|v| fix.wants(v)))
                    .count()
            })
            .unwrap_or(0)
    }

    /// ADE's boot parameters anywhere in the configuration.
    pub fn has_ade_params(&self) -> bool {
        self.defaults
            .iter()
            .chain(self.kernel_cmdline.iter())
            .chain(self.grub_cfg.iter())
            .any(|(_, t)| t.contains("rd.luks.ade."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix(mapping: bool, ade: bool) -> Fix {
        Fix {
            uuid: "1234-abcd".into(),
            replace_mapping: mapping,
            drop_ade: ade,
        }
    }

    #[test]
    fn classes() {
        assert_eq!(classify("UUID=x"), RootArg::Filesystem);
        assert_eq!(classify("/dev/disk/by-uuid/x"), RootArg::Filesystem);
        assert_eq!(classify("PARTUUID=x"), RootArg::Partition);
        assert_eq!(classify("/dev/sda1"), RootArg::Partition);
        assert_eq!(classify("/dev/nvme0n1p2"), RootArg::Partition);
        assert_eq!(
            classify("/dev/mapper/osencrypt"),
            RootArg::Mapping("osencrypt".into())
        );
        assert_eq!(
            classify("/dev/disk/by-id/dm-name-osencrypt"),
            RootArg::Mapping("osencrypt".into())
        );
        assert_eq!(classify("ZFS=pool"), RootArg::Other);
    }

    #[test]
    fn grub_defaults_edit_only_what_breaks() {
        let text = "GRUB_DEFAULT=0\n\
GRUB_CMDLINE_LINUX_DEFAULT=\"quiet root=PARTUUID=aa-02 console=ttyS0\"\n\
GRUB_CMDLINE_LINUX=\"root=/dev/mapper/osencrypt rd.luks.ade.partuuid=aa-02 rd.luks.ade.bootuuid=bb net.ifnames=0\"\n\
# root=PARTUUID=comment stays\n\
GRUB_DISABLE_LINUX_UUID=true\n";
        let enable = fix_grub_defaults(text, &fix(false, false));
        assert_eq!(
            enable,
            text.replace("root=PARTUUID=aa-02", "root=UUID=1234-abcd")
                .replace("UUID=true", "UUID=false")
        );
        let disable = fix_grub_defaults(text, &fix(true, true));
        assert!(
            disable.contains("GRUB_CMDLINE_LINUX=\"root=UUID=1234-abcd net.ifnames=0\"\n"),
            "{disable}"
        );
        assert!(disable.contains("# root=PARTUUID=comment stays\n"));
        // nothing to do: byte-identical
        let clean = "GRUB_CMDLINE_LINUX=\"console=ttyS0 root=UUID=1234-abcd\"\n";
        assert_eq!(fix_grub_defaults(clean, &fix(true, true)), clean);
    }

    #[test]
    fn force_partuuid_is_commented_out() {
        let t = "GRUB_FORCE_PARTUUID=aa-02\n";
        let n = fix_grub_defaults(t, &fix(false, false));
        assert!(n.starts_with('#') && n.ends_with("GRUB_FORCE_PARTUUID=aa-02\n"));
    }

    #[test]
    fn drop_words_at_edges() {
        let f = fix(true, true);
        assert_eq!(fix_words("rd.luks.ade.partuuid=a ro", &f), "ro");
        assert_eq!(fix_words("ro rd.luks.ade.partuuid=a", &f), "ro");
        assert_eq!(fix_words("\"rd.luks.ade.partuuid=a\"", &f), "\"\"");
        assert_eq!(fix_words("a rd.luks.ade.bootuuid=b c\n", &f), "a c\n");
    }

    #[test]
    fn root_is_pinned_in_the_last_assignment() {
        let d = tempfile::tempdir().unwrap();
        let w = |rel: &str, t: &str| {
            std::fs::create_dir_all(d.path().join(rel).parent().unwrap()).unwrap();
            std::fs::write(d.path().join(rel), t).unwrap();
        };
        w(
            "etc/default/grub",
            "GRUB_CMDLINE_LINUX=\"console=ttyS0\" # serial\n",
        );
        let c = BootConfig::read(d.path());
        let e = c.edits_pinned(&fix(false, false));
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].1,
            "GRUB_CMDLINE_LINUX=\"console=ttyS0 root=UUID=1234-abcd\" # serial\n"
        );
        // a grub.d snippet assigning it later is the one grub-mkconfig uses
        w("etc/default/grub.d/50-cloud.cfg", "GRUB_CMDLINE_LINUX=''\n");
        let c = BootConfig::read(d.path());
        let e = c.edits_pinned(&fix(false, false));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].1, "GRUB_CMDLINE_LINUX='root=UUID=1234-abcd'\n");
        // already there (any form that survives): nothing to do
        w(
            "etc/default/grub.d/50-cloud.cfg",
            "GRUB_CMDLINE_LINUX=\"$GRUB_CMDLINE_LINUX root=UUID=1234-abcd\"\n",
        );
        assert!(BootConfig::read(d.path())
            .edits_pinned(&fix(false, false))
            .is_empty());
        // no assignment at all: one line appended
        std::fs::remove_dir_all(d.path().join("etc/default/grub.d")).unwrap();
        w("etc/default/grub", "GRUB_TIMEOUT=0");
        let e = BootConfig::read(d.path()).edits_pinned(&fix(false, false));
        assert_eq!(
            e[0].1,
            "GRUB_TIMEOUT=0\nGRUB_CMDLINE_LINUX=\"root=UUID=1234-abcd\"\n"
        );
        assert_eq!(
            pin_line("GRUB_CMDLINE_LINUX=quiet\n", "root=UUID=x").unwrap(),
            "GRUB_CMDLINE_LINUX=\"quiet root=UUID=x\"\n"
        );
    }

    /// Found by the bootcfg fuzz target: quotes inside a word, and quotes left by a dropped word.
    #[test]
    fn quotes_inside_words() {
        let f = fix(true, true);
        assert_eq!(root_of("root=\"\"/dev/sdo\"\""), Some("/dev/sdo".into()));
        assert_eq!(
            fix_cmdline_file("root=\"\"/dev/sdo\"\"", &f),
            "root=UUID=1234-abcd\"\""
        );
        assert_eq!(
            fix_words("\"quiet rd.luks.ade.partuuid=x\"", &f),
            "\"quiet\""
        );
        assert_eq!(
            fix_words("\"rd.luks.ade.partuuid=x quiet\"", &f),
            "\"quiet\""
        );
        assert_eq!(root_of("\"root=UUID=a\""), Some("UUID=a".into()));
    }

    /// Found by the bootcfg fuzz target: the kernel (isspace) and the editor must agree on words.
    #[test]
    fn vertical_tab_separates_words_like_the_kernel() {
        let t = "ro\x0broot=PARTUUID=aa-02";
        assert_eq!(root_of(t).as_deref(), Some("PARTUUID=aa-02"));
        assert_eq!(
            fix_cmdline_file(t, &fix(false, false)),
            "ro\x0broot=UUID=1234-abcd"
        );
    }

    #[test]
    fn grub_cfg_first_entry() {
        let cfg = "menuentry 'Debian' {\n\tlinux\t/vmlinuz-6.1 root=UUID=abc ro quiet\n\tinitrd /initrd.img-6.1\n}\nmenuentry 'x' {\n linux /v root=PARTUUID=aa-02\n}\n";
        assert_eq!(
            grub_cfg_roots(cfg),
            [
                Some("UUID=abc".to_string()),
                Some("PARTUUID=aa-02".to_string())
            ]
        );
    }
}
