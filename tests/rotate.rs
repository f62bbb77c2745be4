//! `rotate` on image files: headers made by our engine (`encrypt-image`) and by stock cryptsetup
//! (ADE's layouts, LUKS1 and LUKS2, detached and attached), keys read from FAT key volumes made by
//! mkfs.vfat + mcopy. Stock `cryptsetup open --test-passphrase` and `luksDump` are the oracle: they
//! say which key opens which header, independently of our code.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{initcrypt, run, sha256, truncate};
use initcrypt::exit::Classify;
use initcrypt::keyvol;
use initcrypt::lifecycle::rotate::{
    self, Error, Holder, Interrupt, Report, Step, Target, BACKUP_SUFFIX,
};
use initcrypt::luks::LuksVolume;
use initcrypt::secret::Secret;
use zeroize::Zeroizing;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Detached LUKS2 header written by our pass engine.
    Ours,
    /// ADE's OS layout: stock `cryptsetup reencrypt --encrypt` with a detached LUKS2 header.
    Luks2Detached,
    /// ADE's LUKS1 OS layout (old cryptsetup): detached LUKS1 header.
    Luks1Detached,
    /// ADE's LUKS1 data disks: header on the disk.
    Luks1Attached,
    Luks2Attached,
    /// cryptsetup 2.x's default PBKDF (memory-hard), detached.
    Luks2Argon,
}

const NAMES: [&str; 6] = [
    "osencrypt",
    "data0_1",
    "data0_2",
    "data0_3",
    "data0_4",
    "data0_5",
];

/// The key file name of volume `i` on both key volumes.
fn key_name(i: usize) -> String {
    if i == 0 {
        "LinuxPassPhraseFileName".to_string()
    } else {
        format!("LinuxPassPhraseFileName_0_{i}")
    }
}

fn old_pass(i: usize) -> Vec<u8> {
    common::ade_passphrase(10 + i as u8)
}

fn new_pass(i: usize) -> Vec<u8> {
    common::ade_passphrase(40 + i as u8)
}

/// Key volumes (old and new) and the same keys as plain files for the stock oracle.
struct Keys {
    dir: PathBuf,
    old_bek: PathBuf,
    new_bek: PathBuf,
}

impl Keys {
    fn new(dir: &Path) -> Keys {
        let names: Vec<String> = (0..NAMES.len()).map(key_name).collect();
        let (olds, news): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
            (0..NAMES.len()).map(|i| (old_pass(i), new_pass(i))).unzip();
        let files = |keys: &[Vec<u8>]| -> Vec<(String, Vec<u8>)> {
            names.iter().cloned().zip(keys.iter().cloned()).collect()
        };
        let (o, n) = (files(&olds), files(&news));
        let o: Vec<(&str, &[u8])> = o.iter().map(|(a, b)| (a.as_str(), b.as_slice())).collect();
        let n: Vec<(&str, &[u8])> = n.iter().map(|(a, b)| (a.as_str(), b.as_slice())).collect();
        let kdir = dir.join("keys");
        std::fs::create_dir_all(&kdir).unwrap();
        let old_bek = common::fat_image(
            &kdir,
            "old-bek.img",
            16,
            common::Layout::Mbr,
            "BEK VOLUME",
            &o,
        );
        let new_bek = common::fat_image(
            &kdir,
            "new-bek.img",
            16,
            common::Layout::Whole,
            "BEK VOLUME",
            &n,
        );
        for i in 0..NAMES.len() {
            std::fs::write(kdir.join(format!("old-{i}")), old_pass(i)).unwrap();
            std::fs::write(kdir.join(format!("new-{i}")), new_pass(i)).unwrap();
        }
        Keys {
            dir: kdir,
            old_bek,
            new_bek,
        }
    }

    fn old_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("old-{i}"))
    }

    fn new_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("new-{i}"))
    }
}

/// One volume on image files.
struct Vol {
    kind: Kind,
    idx: usize,
    data: PathBuf,
    hdr: Option<PathBuf>,
}

fn format_args(kind: Kind, key: &str) -> Vec<&str> {
    let mut a = vec!["-q", "luksFormat", "--key-file", key];
    match kind {
        Kind::Luks1Detached | Kind::Luks1Attached => {
            a.extend(["--type", "luks1", "--pbkdf-force-iterations", "1000"])
        }
        Kind::Luks2Argon => a.extend([
            "--type",
            "luks2",
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-parallel",
            "1",
        ]),
        _ => a.extend([
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ]),
    }
    a
}

impl Vol {
    /// Volume number `idx` of kind `kind` in `dir`, keyed with old key `idx`.
    fn make(dir: &Path, keys: &Keys, kind: Kind, idx: usize) -> Vol {
        let data = dir.join(format!("v{idx}.img"));
        let hdr = dir.join(format!("v{idx}.hdr"));
        let key = keys.old_file(idx);
        let keys_ = key.to_str().unwrap();
        let attached = matches!(kind, Kind::Luks1Attached | Kind::Luks2Attached);
        truncate(
            &data,
            if kind == Kind::Luks2Attached {
                "32M"
            } else {
                "8M"
            },
        );
        match kind {
            Kind::Ours => {
                let out = initcrypt()
                    .args(["encrypt-image", "--raw", "--device", data.to_str().unwrap()])
                    .args(["--header", hdr.to_str().unwrap(), "--key-file", keys_])
                    .args(["--sector-size", "4096"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Kind::Luks2Detached => common::stock_encrypt(&data, &hdr, &key, &[]),
            _ => {
                let mut a = format_args(kind, keys_);
                let hs = hdr.to_str().unwrap().to_string();
                if !attached {
                    truncate(&hdr, "4K");
                    a.extend(["--header", &hs]);
                }
                let ds = data.to_str().unwrap().to_string();
                a.push(&ds);
                run("cryptsetup", &a);
            }
        }
        Vol {
            kind,
            idx,
            data,
            hdr: (!attached).then_some(hdr),
        }
    }

    fn name(&self) -> &'static str {
        NAMES[self.idx]
    }

    fn header(&self) -> &Path {
        self.hdr.as_deref().unwrap_or(&self.data)
    }

    fn backup(&self) -> PathBuf {
        let mut s = self.header().as_os_str().to_owned();
        s.push(BACKUP_SUFFIX);
        PathBuf::from(s)
    }

    fn is_luks1(&self) -> bool {
        matches!(self.kind, Kind::Luks1Attached | Kind::Luks1Detached)
    }

    /// Stock cryptsetup's verdict: does `key` open this volume?
    fn opens(&self, key: &Path) -> bool {
        self.opens_with_header(key, self.hdr.as_deref())
    }

    fn opens_with_header(&self, key: &Path, hdr: Option<&Path>) -> bool {
        let mut c = Command::new("cryptsetup");
        c.args([
            "open",
            "--test-passphrase",
            "--key-file",
            key.to_str().unwrap(),
        ]);
        if let Some(h) = hdr {
            c.args(["--header", h.to_str().unwrap()]);
        }
        c.arg(&self.data);
        c.output().expect("cryptsetup").status.success()
    }

    fn dump(&self) -> String {
        let mut c = Command::new("cryptsetup");
        c.arg("luksDump");
        c.arg(self.header());
        let out = c.output().unwrap();
        assert!(out.status.success(), "luksDump {}", self.header().display());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The keyslot section of luksDump without salts.
    fn keyslots(&self) -> String {
        keyslots_of(&self.dump())
    }

    /// Active keyslot numbers, from luksDump.
    fn slots(&self) -> Vec<u32> {
        let d = self.dump();
        let mut slots = Vec::new();
        let mut in_keyslots = false;
        for l in d.lines() {
            if let Some(rest) = l.strip_prefix("Key Slot ") {
                if let Some((n, state)) = rest.split_once(':') {
                    if state.trim() == "ENABLED" {
                        slots.push(n.parse().unwrap());
                    }
                }
            }
            if l.starts_with("Keyslots:") {
                in_keyslots = true;
                continue;
            }
            if in_keyslots && !l.starts_with(' ') && !l.starts_with('\t') {
                in_keyslots = false;
            }
            if in_keyslots {
                if let Some((n, kind)) = l.trim().split_once(':') {
                    if kind.trim() == "luks2" {
                        if let Ok(n) = n.parse() {
                            slots.push(n);
                        }
                    }
                }
            }
        }
        slots
    }

    fn target(&self, keys: &Keys) -> Target {
        let old = keyvol::open_path(&keys.old_bek)
            .unwrap()
            .key_for(&key_name(self.idx))
            .unwrap();
        let new = keyvol::open_path(&keys.new_bek)
            .unwrap()
            .key_for(&key_name(self.idx))
            .unwrap();
        Target {
            name: self.name().to_string(),
            volume: LuksVolume::new(&self.data, self.hdr.as_deref()),
            old,
            new,
            old_source: format!("{} on old-bek.img", key_name(self.idx)),
            new_source: format!("{} on new-bek.img", key_name(self.idx)),
            backup: self.backup(),
        }
    }

    /// In-process check through libcryptsetup (the same library stock cryptsetup uses; the first
    /// test shows both agree on every layout): a process per check is too slow for the loops.
    fn lib_opens(&self, key: Vec<u8>) -> bool {
        LuksVolume::new(&self.data, self.hdr.as_deref())
            .check_key(&Secret::new(Zeroizing::new(key)), "k")
            .is_ok()
    }

    fn opens_old(&self, _keys: &Keys) -> bool {
        self.lib_opens(old_pass(self.idx))
    }

    fn opens_new(&self, _keys: &Keys) -> bool {
        self.lib_opens(new_pass(self.idx))
    }

    fn stock_opens_old(&self, keys: &Keys) -> bool {
        self.opens(&keys.old_file(self.idx))
    }

    fn stock_opens_new(&self, keys: &Keys) -> bool {
        self.opens(&keys.new_file(self.idx))
    }

    fn lib_slots(&self) -> Vec<u32> {
        LuksVolume::new(&self.data, self.hdr.as_deref())
            .active_keyslots()
            .unwrap()
    }
}

/// Copy writing only the non-zero 4 KiB blocks: headers and images are mostly zeros, and the
/// loops copy them dozens of times on a shared, loaded machine.
fn sparse_copy(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(from).unwrap();
    let f = std::fs::File::create(to).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (n, block) in bytes.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, n as u64 * 4096).unwrap();
        }
    }
}

/// Volumes formatted once; each case works on a copy.
struct Tpl {
    dir: PathBuf,
    kinds: Vec<Kind>,
}

impl Tpl {
    fn new(root: &Path, keys: &Keys, kinds: &[Kind]) -> Tpl {
        let dir = root.join(format!(
            "tpl-{}",
            kinds
                .iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join("-")
        ));
        build(&dir, keys, kinds);
        Tpl {
            dir,
            kinds: kinds.to_vec(),
        }
    }

    fn copy(&self, to: &Path) -> Vec<Vol> {
        std::fs::create_dir_all(to).unwrap();
        self.kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let src_data = self.dir.join(format!("v{i}.img"));
                let src_hdr = self.dir.join(format!("v{i}.hdr"));
                // Keyslot operations on a detached header never write the data device (the first
                // test checks it): those cases share the template's data image.
                let hdr = src_hdr.exists().then(|| {
                    let h = to.join(format!("v{i}.hdr"));
                    sparse_copy(&src_hdr, &h);
                    h
                });
                let data = if hdr.is_some() {
                    src_data
                } else {
                    let d = to.join(format!("v{i}.img"));
                    sparse_copy(&src_data, &d);
                    d
                };
                Vol {
                    kind,
                    idx: i,
                    data,
                    hdr,
                }
            })
            .collect()
    }
}

fn without_epoch(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with("Epoch:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The keyslot section of a luksDump without salts: equal when the same slots hold keys with the
/// same PBKDF parameters, even if a slot was written again.
fn keyslots_of(dump: &str) -> String {
    let mut on = false;
    let mut out = Vec::new();
    for l in dump.lines() {
        if l.starts_with("Keyslots:") || l.starts_with("Key Slot") {
            on = true;
        }
        if l.starts_with("Tokens:") {
            on = false;
        }
        let t = l.trim();
        let hex_only = !t.is_empty()
            && t.split(' ')
                .all(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()));
        if on && !t.starts_with("Salt:") && !hex_only {
            out.push(t.to_string());
        }
    }
    out.join("\n")
}

fn build(dir: &Path, keys: &Keys, kinds: &[Kind]) -> Vec<Vol> {
    std::fs::create_dir_all(dir).unwrap();
    kinds
        .iter()
        .enumerate()
        .map(|(i, &k)| Vol::make(dir, keys, k, i))
        .collect()
}

fn targets(vols: &[Vol], keys: &Keys) -> Vec<Target> {
    vols.iter().map(|v| v.target(keys)).collect()
}

fn rotate_all(vols: &[Vol], keys: &Keys) -> Result<Report, Error> {
    rotate::rotate(&targets(vols, keys), &mut |_| Ok(()))
}

/// The steps of an uninterrupted run on a fresh copy.
fn steps_of(dir: &Path, keys: &Keys, tpl: &Tpl) -> Vec<Step> {
    let vols = tpl.copy(dir);
    let mut steps = Vec::new();
    rotate::rotate(&targets(&vols, keys), &mut |s| {
        steps.push(*s);
        Ok(())
    })
    .unwrap();
    steps
}

/// The end state of a rotation: the new key opens every volume, the old key none, one keyslot
/// each, no LUKS1 backup left.
fn assert_rotated(vols: &[Vol], keys: &Keys, ctx: &str) {
    for v in vols {
        assert_eq!(v.lib_slots().len(), 1, "{ctx}: {} ({:?})", v.name(), v.kind);
        assert!(
            v.opens_new(keys),
            "{ctx}: {} ({:?}) rejects the new key",
            v.name(),
            v.kind
        );
        assert!(
            !v.opens_old(keys),
            "{ctx}: {} ({:?}) still opens with the old key",
            v.name(),
            v.kind
        );
        assert!(!v.backup().exists(), "{ctx}: {} backup left", v.name());
    }
}

/// The same end state, seen by stock cryptsetup (`open --test-passphrase`, `luksDump`).
fn assert_rotated_stock(vols: &[Vol], keys: &Keys, ctx: &str) {
    for v in vols {
        assert!(
            v.stock_opens_new(keys),
            "{ctx}: {} ({:?}) rejects the new key",
            v.name(),
            v.kind
        );
        assert!(
            !v.stock_opens_old(keys),
            "{ctx}: {} ({:?}) opens with the old key",
            v.name(),
            v.kind
        );
        assert_eq!(
            v.slots().len(),
            1,
            "{ctx}: {} ({:?}): {}",
            v.name(),
            v.kind,
            v.dump()
        );
    }
}

const ALL: [Kind; 6] = [
    Kind::Ours,
    Kind::Luks2Detached,
    Kind::Luks1Detached,
    Kind::Luks1Attached,
    Kind::Luks2Attached,
    Kind::Luks2Argon,
];

#[test]
fn rotates_every_layout_the_old_key_opens_nothing_and_a_rerun_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    let vols = build(&tmp.path().join("v"), &keys, &ALL);
    let pbkdf_before: Vec<String> = vols.iter().map(|v| v.keyslots()).collect();
    let data_before: Vec<String> = vols
        .iter()
        .filter(|v| v.hdr.is_some())
        .map(|v| sha256(&v.data))
        .collect();
    for v in &vols {
        assert!(
            v.stock_opens_old(&keys) && !v.stock_opens_new(&keys),
            "{:?}",
            v.kind
        );
        assert!(v.opens_old(&keys) && !v.opens_new(&keys), "{:?}", v.kind);
    }
    let report = rotate_all(&vols, &keys).unwrap();
    assert_rotated(&vols, &keys, "after rotate");
    assert_rotated_stock(&vols, &keys, "after rotate");
    for (v, before) in vols.iter().zip(&pbkdf_before) {
        // The new slot has the old slot's PBKDF parameters (LUKS1/2 pbkdf2 at 1000 iterations,
        // argon2id at 4 iterations and 32 MiB): only the slot number (LUKS2 slot 1 instead of 0) and
        // its key material offset (LUKS1) may differ.
        let strip = |s: &str| -> String {
            s.lines()
                .filter(|l| !l.starts_with("Key Slot") && !l.ends_with(": luks2"))
                .filter(|l| !l.starts_with("Key material offset") && !l.starts_with("Area offset"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&v.keyslots()), strip(before), "{:?}", v.kind);
    }
    let detached_after: Vec<String> = vols
        .iter()
        .filter(|v| v.hdr.is_some())
        .map(|v| sha256(&v.data))
        .collect();
    assert_eq!(
        detached_after, data_before,
        "a keyslot change never touches a detached-header volume's data"
    );
    assert_eq!(report.volumes.len(), ALL.len());
    for (rv, v) in report.volumes.iter().zip(&vols) {
        assert_eq!(rv.luks, if v.is_luks1() { 1 } else { 2 });
        assert_eq!(rv.before.len(), 1);
        assert_eq!(rv.before[0].key, Holder::Old);
        assert_eq!(rv.after.len(), 1);
        assert_eq!(rv.after[0].key, Holder::New);
        assert_eq!(v.slots(), vec![rv.after[0].slot], "{:?}", v.kind);
    }
    let json = report.json();
    let first = format!(
        r#"{{"result":"rotated","volumes":[{{"name":"osencrypt","header":"{}","luks":2,"before":[{{"slot":0,"key":"old"}}],"after":[{{"slot":1,"key":"new"}}]}},"#,
        vols[0].header().display()
    );
    assert!(json.starts_with(&first), "{json}");
    let lines = report.lines();
    assert!(
        lines[0].starts_with(
            "osencrypt: new key in keyslot 1; old key removed from keyslot 0 (LUKS2, "
        ),
        "{lines:?}"
    );
    let text = format!("{lines:?} {:?}", serde_json::to_string(&report).unwrap());
    for i in 0..ALL.len() {
        for secret in [old_pass(i), new_pass(i)] {
            assert!(
                !text.contains(std::str::from_utf8(&secret).unwrap()),
                "key bytes in the report"
            );
        }
    }

    // Same arguments again: every volume is already rotated; nothing is written.
    let hashes: Vec<String> = vols.iter().map(|v| sha256(v.header())).collect();
    let again = rotate_all(&vols, &keys).unwrap();
    assert!(
        again.lines().iter().all(|l| l.contains("already rotated")),
        "{:?}",
        again.lines()
    );
    let after: Vec<String> = vols.iter().map(|v| sha256(v.header())).collect();
    assert_eq!(after, hashes);
}

#[test]
fn a_wrong_old_key_or_the_same_key_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    let kinds = [Kind::Ours, Kind::Luks1Detached, Kind::Luks2Attached];
    let vols = build(&tmp.path().join("v"), &keys, &kinds);
    let hashes: Vec<String> = vols.iter().map(|v| sha256(v.header())).collect();

    let mut t = targets(&vols, &keys);
    t[1].old = Secret::new(Zeroizing::new(common::ade_passphrase(99)));
    let e = rotate::rotate(&t, &mut |_| Ok(())).unwrap_err();
    assert!(matches!(e, Error::NeitherKey { .. }), "{e}");
    assert_eq!(e.exit().code(), 4, "{e}");
    assert!(
        e.to_string().contains("data0_1") && e.to_string().contains("nothing was written"),
        "{e}"
    );
    assert!(!e
        .to_string()
        .contains(std::str::from_utf8(&old_pass(1)).unwrap()));

    let mut t = targets(&vols, &keys);
    t[2].new = Secret::new(Zeroizing::new(old_pass(2)));
    let e = rotate::rotate(&t, &mut |_| Ok(())).unwrap_err();
    assert!(matches!(e, Error::SameKey { .. }), "{e}");
    assert_eq!(e.exit().code(), 2, "{e}");

    let after: Vec<String> = vols.iter().map(|v| sha256(v.header())).collect();
    assert_eq!(after, hashes, "header bytes identical");
    assert!(vols.iter().all(|v| !v.backup().exists()));
}

/// What a header was: its bytes, its luksDump without the epoch, its keyslots without salts.
struct Orig {
    bytes: Vec<u8>,
    dump: String,
    slots: String,
}

fn originals(vols: &[Vol]) -> Vec<Orig> {
    vols.iter()
        .map(|v| {
            let dump = v.dump();
            Orig {
                bytes: std::fs::read(v.header()).unwrap(),
                dump: without_epoch(&dump),
                slots: keyslots_of(&dump),
            }
        })
        .collect()
}

/// After a rollback every volume is as before: the old key opens it, the new one does not, the
/// same keyslots are active with the same parameters (luksDump). LUKS1 headers come back byte for
/// byte (from their backup); LUKS2 headers whose old slot was never removed differ only in their
/// epoch; those whose old slot was removed get it back in the same slot with a new salt.
fn assert_rolled_back(
    vols: &[Vol],
    keys: &Keys,
    orig: &[Orig],
    removed_before: &[bool],
    ctx: &str,
) {
    for (i, v) in vols.iter().enumerate() {
        let o = &orig[i];
        assert!(
            v.opens_old(keys),
            "{ctx}: {} ({:?}) rejects the old key",
            v.name(),
            v.kind
        );
        assert!(
            !v.opens_new(keys),
            "{ctx}: {} ({:?}) opens with the new key",
            v.name(),
            v.kind
        );
        let dump = v.dump();
        assert_eq!(
            keyslots_of(&dump),
            o.slots,
            "{ctx}: {} ({:?}) keyslots",
            v.name(),
            v.kind
        );
        if v.is_luks1() {
            assert!(
                std::fs::read(v.header()).unwrap() == o.bytes,
                "{ctx}: {} LUKS1 header bytes differ",
                v.name()
            );
        } else if !removed_before[i] {
            assert_eq!(without_epoch(&dump), o.dump, "{ctx}: {} luksDump", v.name());
        }
        assert!(!v.backup().exists(), "{ctx}: {} backup left", v.name());
    }
}

#[test]
fn a_failure_after_each_step_of_the_second_volume_rolls_every_volume_back() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    for middle in [Kind::Luks1Detached, Kind::Ours, Kind::Luks1Attached] {
        let kinds = [Kind::Luks2Detached, middle, Kind::Luks1Attached];
        let kinds = if middle == Kind::Luks1Attached {
            [Kind::Luks2Attached, middle, Kind::Luks1Detached]
        } else {
            kinds
        };
        let tpl = Tpl::new(tmp.path(), &keys, &kinds);
        let all = steps_of(&tmp.path().join(format!("probe-{middle:?}")), &keys, &tpl);
        // Deleting the LUKS1 backups comes after the rotation is complete: nothing to roll back.
        let of_second: Vec<Step> = all
            .iter()
            .copied()
            .filter(|s| s.volume() == 1 && !matches!(s, Step::BackupDeleted { .. }))
            .collect();
        assert!(of_second.len() >= 4, "{of_second:?}");
        for (n, fail_at) in of_second.iter().enumerate() {
            let vols = tpl.copy(&tmp.path().join(format!("{middle:?}-{n}")));
            let orig = originals(&vols);
            // Which volumes had their old slot removed before the failure (LUKS2 ones then get it
            // back in a new slot write: same slot, same parameters, new salt).
            let idx = all.iter().position(|s| s == fail_at).unwrap();
            let removed: Vec<bool> = (0..3)
                .map(|v| {
                    all[..=idx]
                        .iter()
                        .any(|s| matches!(s, Step::Removed { volume, .. } if *volume == v))
                })
                .collect();
            let mut seen = Vec::new();
            let e = rotate::rotate(&targets(&vols, &keys), &mut |s| {
                seen.push(*s);
                if s == fail_at {
                    Err(Interrupt::Fail)
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
            let ctx = format!("{middle:?}: failure after {fail_at:?}");
            assert!(matches!(e, Error::RolledBack { .. }), "{ctx}: {e}");
            assert_eq!(e.exit().code(), 7, "{ctx}");
            assert!(
                e.to_string().contains("data0_1: injected failure"),
                "{ctx}: {e}"
            );
            assert!(e.to_string().contains("rolled back"), "{ctx}: {e}");
            // The rollback went last volume first.
            let rolled: Vec<usize> = seen
                .iter()
                .filter_map(|s| match s {
                    Step::RolledBack { volume } => Some(*volume),
                    _ => None,
                })
                .collect();
            let mut sorted = rolled.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            assert_eq!(rolled, sorted, "{ctx}: {seen:?}");
            assert_rolled_back(&vols, &keys, &orig, &removed, &ctx);
        }
    }
}

/// Which keys open each volume: `O` old only, `B` both, `N` new only. Fails on a volume neither
/// key opens. And one of the two keys opens every volume: the state never needs both key volumes
/// at once (all of O/B while the new key is enrolled, all of B/N while the old one is removed).
fn key_state(vols: &[Vol], keys: &Keys, ctx: &str) -> String {
    let state: String = vols
        .iter()
        .map(|v| match (v.opens_old(keys), v.opens_new(keys)) {
            (true, false) => 'O',
            (true, true) => 'B',
            (false, true) => 'N',
            (false, false) => panic!("{ctx}: {} ({:?}) opens with neither key", v.name(), v.kind),
        })
        .collect();
    assert!(
        !state.contains('N') || !state.contains('O'),
        "{ctx}: {state}: neither key alone opens every volume"
    );
    state
}

#[test]
fn a_crash_at_every_step_boundary_leaves_every_volume_openable_and_the_rerun_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    let kinds = [
        Kind::Ours,
        Kind::Luks1Detached,
        Kind::Luks2Attached,
        Kind::Luks1Attached,
    ];
    let tpl = Tpl::new(tmp.path(), &keys, &kinds);
    let total = steps_of(&tmp.path().join("probe"), &keys, &tpl).len();
    assert!(total >= 4 * 3 + 2, "{total}");
    let mut states = std::collections::BTreeSet::new();
    for k in 0..total {
        let vols = tpl.copy(&tmp.path().join(format!("k{k}")));
        let mut n = 0;
        let e = rotate::rotate(&targets(&vols, &keys), &mut |_| {
            n += 1;
            if n > k {
                Err(Interrupt::Crash)
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(e, Error::Interrupted), "{e}");
        let ctx = format!("crash after {k} steps");
        states.insert(key_state(&vols, &keys, &ctx));
        rotate_all(&vols, &keys).unwrap_or_else(|e| panic!("{ctx}: rerun: {e}"));
        assert_rotated(&vols, &keys, &ctx);
    }
    // The crashes landed in every kind of mix: old only, both, new only.
    for s in ["BOOO", "BBBB", "NBBB", "NNNN"] {
        assert!(states.contains(s), "{s} not seen in {states:?}");
    }
}

#[test]
fn a_crash_during_a_rollback_leaves_every_volume_openable_and_the_rerun_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    let kinds = [Kind::Luks2Detached, Kind::Ours, Kind::Luks1Attached];
    let tpl = Tpl::new(tmp.path(), &keys, &kinds);
    // Fail once the second volume lost its old key: the rollback re-enrolls and removes on all.
    let fail_at = Step::Finished { volume: 1, slot: 1 };
    let mut states = std::collections::BTreeSet::new();
    let mut k = 0;
    loop {
        let vols = tpl.copy(&tmp.path().join(format!("r{k}")));
        let mut failed = false;
        let mut after_fail = 0;
        let r = rotate::rotate(&targets(&vols, &keys), &mut |s| {
            if failed {
                after_fail += 1;
                if after_fail > k {
                    return Err(Interrupt::Crash);
                }
            }
            if *s == fail_at {
                failed = true;
                return Err(Interrupt::Fail);
            }
            Ok(())
        });
        let ctx = format!("crash after {k} rollback steps");
        match r {
            Err(Error::Interrupted) => {}
            Err(Error::RolledBack { .. }) => {
                assert!(k > 3, "{ctx}: rollback too short");
                // Through both halves of the rollback: the old key back everywhere, then the new gone.
                assert!(
                    states.contains("BBB") && states.contains("BBO"),
                    "{states:?}"
                );
                break;
            }
            other => panic!("{ctx}: {other:?}"),
        }
        let state = key_state(&vols, &keys, &ctx);
        states.insert(state);
        rotate_all(&vols, &keys).unwrap_or_else(|e| panic!("{ctx}: rerun: {e}"));
        assert_rotated(&vols, &keys, &ctx);
        k += 1;
    }
}

/// Overwrite the LUKS1 header's first KiB: the torn write its single copy cannot survive alone.
fn tear(v: &Vol) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(v.header())
        .unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&[0x5a; 1024]).unwrap();
}

#[test]
fn a_damaged_luks1_header_is_restored_from_its_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    for kind in [Kind::Luks1Detached, Kind::Luks1Attached] {
        let kinds = [Kind::Ours, kind];
        // A power cut tears the LUKS1 header while its new keyslot is written.
        let vols = build(&tmp.path().join(format!("{kind:?}-fwd")), &keys, &kinds);
        let e = rotate::rotate(&targets(&vols, &keys), &mut |s| match s {
            Step::Enrolled { volume: 1, .. } => Err(Interrupt::Crash),
            _ => Ok(()),
        })
        .unwrap_err();
        assert!(matches!(e, Error::Interrupted));
        let backup = vols[1].backup();
        assert!(
            backup.exists(),
            "{kind:?}: the backup precedes the first header write"
        );
        tear(&vols[1]);
        assert!(
            !vols[1].opens_old(&keys) && !vols[1].opens_new(&keys),
            "{kind:?}: torn"
        );
        // What the boot can do meanwhile: the backup, used as a detached header, opens with the old key.
        assert!(
            vols[1].opens_with_header(&keys.old_file(1), Some(&backup)),
            "{kind:?}"
        );
        let mut seen = Vec::new();
        rotate::rotate(&targets(&vols, &keys), &mut |s| {
            seen.push(*s);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen.first(),
            Some(&Step::Verified { volume: 0, slot: 1 }),
            "{seen:?}"
        );
        assert!(seen.contains(&Step::Restored { volume: 1 }), "{seen:?}");
        assert_rotated(&vols, &keys, &format!("{kind:?}"));

        // A failure after a torn write: the rollback restores the header byte for byte.
        let vols = build(&tmp.path().join(format!("{kind:?}-back")), &keys, &kinds);
        let orig2 = originals(&vols);
        let mut torn = false;
        let e = rotate::rotate(&targets(&vols, &keys), &mut |s| match s {
            Step::Enrolled { volume: 1, .. } => {
                tear(&vols[1]);
                torn = true;
                Err(Interrupt::Fail)
            }
            _ => Ok(()),
        })
        .unwrap_err();
        assert!(torn && matches!(e, Error::RolledBack { .. }), "{e}");
        assert_rolled_back(
            &vols,
            &keys,
            &orig2,
            &[false, false],
            &format!("{kind:?} rollback"),
        );
    }
}

#[test]
fn a_stale_backup_is_never_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    let vols = build(
        &tmp.path().join("v"),
        &keys,
        &[Kind::Luks1Detached, Kind::Ours],
    );
    let orig = originals(&vols);
    // A backup left by an older rotation: this volume's header, keyed with a key nobody holds now.
    let v = &vols[0];
    let stale = tmp.path().join("stale.hdr");
    std::fs::copy(v.header(), &stale).unwrap();
    let prev = tmp.path().join("prev");
    std::fs::write(&prev, b"a key of an older rotation").unwrap();
    let (o, st, pr, bk) = (
        keys.old_file(0).to_str().unwrap().to_string(),
        stale.to_str().unwrap().to_string(),
        prev.to_str().unwrap().to_string(),
        v.backup().to_str().unwrap().to_string(),
    );
    run(
        "cryptsetup",
        &[
            "-q",
            "luksChangeKey",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            &o,
            &st,
            &pr,
        ],
    );
    run(
        "cryptsetup",
        &["luksHeaderBackup", &st, "--header-backup-file", &bk],
    );
    assert!(v.opens_with_header(&prev, Some(&v.backup())));
    // Fail after the new key is in both volumes: the rollback restores the LUKS1 header from a
    // backup, which must be the one this run made, not the stale one.
    let mut steps = Vec::new();
    let e = rotate::rotate(&targets(&vols, &keys), &mut |s| {
        steps.push(*s);
        match s {
            Step::Verified { volume: 1, .. } => Err(Interrupt::Fail),
            _ => Ok(()),
        }
    })
    .unwrap_err();
    assert!(matches!(e, Error::RolledBack { .. }), "{e}");
    assert!(steps.contains(&Step::BackedUp { volume: 0 }), "{steps:?}");
    assert!(steps.contains(&Step::Restored { volume: 0 }), "{steps:?}");
    assert_rolled_back(&vols, &keys, &orig, &[false, false], "stale backup");
    assert!(!v.opens(&prev));
}

#[test]
fn keyslots_of_other_keys_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    let vols = build(
        &tmp.path().join("v"),
        &keys,
        &[Kind::Luks1Detached, Kind::Luks2Detached],
    );
    // An operator's recovery passphrase in another slot of both volumes.
    let recovery = tmp.path().join("recovery");
    std::fs::write(&recovery, b"operator recovery passphrase").unwrap();
    for v in &vols {
        let mut a = vec!["-q", "luksAddKey", "--pbkdf-force-iterations", "1000"];
        let k = keys.old_file(v.idx);
        let (ks, hs, ds, rs) = (
            k.to_str().unwrap().to_string(),
            v.hdr.as_ref().unwrap().to_str().unwrap().to_string(),
            v.data.to_str().unwrap().to_string(),
            recovery.to_str().unwrap().to_string(),
        );
        if !v.is_luks1() {
            a.extend(["--pbkdf", "pbkdf2"]);
        }
        a.extend(["--key-file", &ks, "--header", &hs, &ds, &rs]);
        run("cryptsetup", &a);
    }
    let report = rotate_all(&vols, &keys).unwrap();
    for (v, rv) in vols.iter().zip(&report.volumes) {
        assert!(v.opens_new(&keys) && !v.opens_old(&keys));
        assert!(
            v.opens(&recovery),
            "{:?}: the recovery slot is kept",
            v.kind
        );
        assert_eq!(v.slots(), vec![1, 2], "{:?}", v.kind);
        let after: Vec<Holder> = rv.after.iter().map(|s| s.key).collect();
        assert_eq!(after, [Holder::Other, Holder::New]);
        assert!(!v.backup().exists());
    }
    assert!(
        report.lines()[0].contains("keyslot 1 (neither key) kept"),
        "{:?}",
        report.lines()
    );
}

#[test]
fn the_cli_refuses_bad_arguments_with_one_line_and_says_the_new_key_file_goes_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let help = initcrypt().args(["rotate", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("EVERY volume"), "{help}");
    assert!(
        help.contains("detach the old key volume only after rotate exits 0"),
        "{help}"
    );
    let cfg = tmp.path().join("none.json");
    let none = initcrypt()
        .args(["--config", cfg.to_str().unwrap(), "rotate"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let key = tmp.path().join("k");
    std::fs::write(&key, b"x").unwrap();
    let both = initcrypt()
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "rotate",
            "--new-key-file",
            key.to_str().unwrap(),
        ])
        .args(["--new-key-volume", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2));
    let missing = initcrypt()
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "rotate",
            "--new-key-file",
        ])
        .arg(tmp.path().join("absent"))
        .output()
        .unwrap();
    assert_eq!(
        missing.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    // No volumes.json and no ADE parameters: nothing is encrypted, nothing to rotate.
    let nothing = initcrypt()
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "rotate",
            "--new-key-file",
            key.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        nothing.status.success(),
        "{}",
        String::from_utf8_lossy(&nothing.stderr)
    );
    assert!(String::from_utf8_lossy(&nothing.stdout).contains("nothing to rotate"));
}

#[test]
fn an_unfinished_luks2_reencryption_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new(tmp.path());
    let vols = build(&tmp.path().join("v"), &keys, &[Kind::Ours]);
    // ADE's online flow interrupted: `reencrypt --encrypt --init-only` left the requirement flag.
    let data = tmp.path().join("ade.img");
    let hdr = tmp.path().join("ade.hdr");
    truncate(&data, "8M");
    common::stock_encrypt(&data, &hdr, &keys.old_file(1), &["--init-only"]);
    let ade = Vol {
        kind: Kind::Luks2Detached,
        idx: 1,
        data,
        hdr: Some(hdr),
    };
    let all = [vols.into_iter().next().unwrap(), ade];
    let hashes: Vec<String> = all.iter().map(|v| sha256(v.header())).collect();
    let e = rotate_all(&all, &keys).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    assert_eq!(e.exit().code(), 6, "{e}");
    assert!(
        e.to_string().contains("data0_1") && e.to_string().contains("nothing was written"),
        "{e}"
    );
    let after: Vec<String> = all.iter().map(|v| sha256(v.header())).collect();
    assert_eq!(after, hashes);
}
