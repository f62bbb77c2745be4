//! The key volume reader against images made by mkfs.vfat + mcopy (+ sfdisk), through the CLI and
//! the library: every FAT type and layout, the lookup rule, exact key bytes, and refusals.

mod common;

use common::{ade_passphrase, fat_image, initcrypt, Layout};
use initcrypt::keyvol;

#[test]
fn every_fat_type_and_layout_is_found_with_json_listing() {
    let dir = tempfile::tempdir().unwrap();
    let key = ade_passphrase(1);
    for fat in [12u8, 16, 32] {
        for layout in [Layout::Whole, Layout::Mbr, Layout::Gpt] {
            let name = format!("bek-{fat}-{layout:?}.img");
            let img = fat_image(
                dir.path(),
                &name,
                fat,
                layout,
                "BEK VOLUME",
                &[("LinuxPassPhraseFileName", &key)],
            );
            let out = initcrypt()
                .args(["keyvol", "--json", "--device", img.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["fat_type"], format!("FAT{fat}"), "{name}");
            assert_eq!(v["label"], "BEK VOLUME");
            assert_eq!(v["files"][0]["name"], "LinuxPassPhraseFileName");
            assert_eq!(v["files"][0]["size"], 172);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                !stdout.contains(std::str::from_utf8(&key[..40]).unwrap()),
                "listing must never show key bytes"
            );
            let kv = keyvol::open_path(&img).unwrap();
            assert_eq!(
                kv.key_for("LinuxPassPhraseFileName").unwrap().expose(),
                &key[..],
                "{name}: exact bytes"
            );
        }
    }
}

#[test]
fn key_bytes_are_never_trimmed_or_extended() {
    let dir = tempfile::tempdir().unwrap();
    let odd = b" pass with spaces and a newline\n\n";
    let img = fat_image(
        dir.path(),
        "odd.img",
        16,
        Layout::Whole,
        "BEK VOLUME",
        &[("LinuxPassPhraseFileName", odd)],
    );
    let kv = keyvol::open_path(&img).unwrap();
    assert_eq!(kv.key_for("LinuxPassPhraseFileName").unwrap().expose(), odd);
}

#[test]
fn lookup_rule_exact_then_single_candidate_else_error_listing_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (ade_passphrase(2), ade_passphrase(3));
    let two = fat_image(
        dir.path(),
        "two.img",
        16,
        Layout::Mbr,
        "BEK VOLUME",
        &[
            ("LinuxPassPhraseFileName", &a),
            ("LinuxPassPhraseFileName_0_1", &b),
        ],
    );
    let kv = keyvol::open_path(&two).unwrap();
    assert_eq!(
        kv.key_for("LinuxPassPhraseFileName_0_1").unwrap().expose(),
        &b[..]
    );
    assert_eq!(
        kv.key_for("LinuxPassPhraseFileName").unwrap().expose(),
        &a[..]
    );
    let err = kv
        .key_for("LinuxPassPhraseFileName_0_2")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LinuxPassPhraseFileName, LinuxPassPhraseFileName_0_1"),
        "{err}"
    );

    let one = fat_image(
        dir.path(),
        "one.img",
        12,
        Layout::Whole,
        "BEK VOLUME",
        &[("LinuxPassPhraseFileName_1_0", &b)],
    );
    let kv = keyvol::open_path(&one).unwrap();
    assert_eq!(
        kv.key_for("LinuxPassPhraseFileName").unwrap().expose(),
        &b[..],
        "the only candidate is used"
    );
}

#[test]
fn other_labels_empty_keys_and_garbage_are_refused_with_exit_3_or_4() {
    let dir = tempfile::tempdir().unwrap();
    let other = fat_image(
        dir.path(),
        "other.img",
        16,
        Layout::Whole,
        "DATA",
        &[("LinuxPassPhraseFileName", b"x")],
    );
    let out = initcrypt()
        .args(["keyvol", "--device", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().filter(|l| l.contains("error:")).count(),
        1,
        "one line: {err}"
    );

    let garbage = dir.path().join("garbage.img");
    std::fs::write(&garbage, vec![0x5a; 1 << 20]).unwrap();
    let out = initcrypt()
        .args(["keyvol", "--device", garbage.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));

    let empty = fat_image(
        dir.path(),
        "empty.img",
        16,
        Layout::Whole,
        "BEK VOLUME",
        &[("LinuxPassPhraseFileName", b"")],
    );
    let err = keyvol::open_path(&empty)
        .unwrap()
        .key_for("LinuxPassPhraseFileName")
        .unwrap_err();
    assert_eq!(initcrypt::exit::Classify::exit(&err).code(), 4);
}

#[test]
fn reading_never_writes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = fat_image(
        dir.path(),
        "ro.img",
        32,
        Layout::Gpt,
        "BEK VOLUME",
        &[("LinuxPassPhraseFileName", &ade_passphrase(4))],
    );
    let before = common::sha256(&img);
    let kv = keyvol::open_path(&img).unwrap();
    kv.key_for("LinuxPassPhraseFileName").unwrap();
    drop(kv);
    assert_eq!(common::sha256(&img), before);
}

/// The first `len` bytes of `img`, as a new image next to it.
fn head(img: &std::path::Path, len: u64, name: &str) -> std::path::PathBuf {
    let out = img.with_file_name(name);
    std::fs::copy(img, &out).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .unwrap()
        .set_len(len)
        .unwrap();
    out
}

// The review's case: the first 4 KiB of a 16 MiB FAT16 made by mkfs.fat used to be listed as a
// key volume without files (exit 0, `files: []`), and the boot then blamed the key files.
#[test]
fn a_truncated_key_volume_is_corrupt_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    let key = ade_passphrase(5);
    let files: &[(&str, &[u8])] = &[("LinuxPassPhraseFileName", &key)];
    let whole = fat_image(dir.path(), "w.img", 16, Layout::Whole, "BEK VOLUME", files);
    let mbr = fat_image(dir.path(), "m.img", 16, Layout::Mbr, "BEK VOLUME", files);
    let fat32 = fat_image(dir.path(), "f.img", 32, Layout::Whole, "BEK VOLUME", files);
    let cases = [
        (
            head(&whole, 4096, "w-4k.img"),
            "declares 16777216 bytes",
            "has 4096 bytes",
        ),
        // Cut inside the partition: the MBR still claims all of it.
        (
            head(&mbr, (1 << 20) + 8192, "m-8k.img"),
            "declares 15728640 bytes",
            "has 8192 bytes",
        ),
        // FAT32, cut inside its first FAT, and just short of its last sector.
        (
            head(&fat32, 64 << 10, "f-64k.img"),
            "declares 67108864 bytes",
            "has 65536 bytes",
        ),
        (
            head(&fat32, (64 << 20) - 512, "f-short.img"),
            "declares 67108864 bytes",
            "has 67108352 bytes",
        ),
    ];
    for (img, declares, has) in cases {
        let out = initcrypt()
            .args(["keyvol", "--json", "--device", img.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{}: {err}", img.display());
        assert!(
            out.stdout.is_empty(),
            "nothing listed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        let line = lines[0];
        for want in [
            "corrupt or truncated",
            img.to_str().unwrap(),
            declares,
            "end at byte",
            has,
            "re-attach it",
        ] {
            assert!(line.contains(want), "{want:?} missing from: {line}");
        }
        let e = keyvol::open_path(&img).unwrap_err();
        assert!(matches!(e, keyvol::Error::Corrupt { .. }), "{e}");
    }
    // A truncated FAT volume whose boot sector names another volume is not ours to report: it is
    // skipped like any other filesystem.
    let other = fat_image(dir.path(), "o.img", 16, Layout::Whole, "DATA", &[]);
    let e = keyvol::open_path(&head(&other, 4096, "o-4k.img")).unwrap_err();
    assert!(matches!(e, keyvol::Error::NotKeyVolume { .. }), "{e}");
    // The untruncated images still read, key bytes exact.
    for img in [&whole, &mbr, &fat32] {
        let kv = keyvol::open_path(img).unwrap();
        assert_eq!(
            kv.key_for("LinuxPassPhraseFileName").unwrap().expose(),
            &key[..]
        );
    }
}

/// During a key rotation two key volumes hold different keys under one name, and the VM may boot
/// then: the single-key rule refuses (it could feed a stale key to a keyslot), the candidates are
/// both keys, and the volume's header picks the one a keyslot accepts.
#[test]
fn two_key_volumes_with_different_keys_let_the_header_choose() {
    use initcrypt::keyvol::{open_path, KeyVolumes};
    use initcrypt::luks::LuksVolume;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (common::ade_passphrase(1), common::ade_passphrase(2));
    let a = common::fat_image(
        dir.path(),
        "old.img",
        16,
        common::Layout::Whole,
        "BEK VOLUME",
        &[("LinuxPassPhraseFileName", &old)],
    );
    let b = common::fat_image(
        dir.path(),
        "new.img",
        16,
        common::Layout::Gpt,
        "BEK VOLUME",
        &[("LinuxPassPhraseFileName", &new)],
    );
    let vols = KeyVolumes(vec![open_path(&a).unwrap(), open_path(&b).unwrap()]);
    assert!(vols.key_for("LinuxPassPhraseFileName").is_err(), "conflict");
    let cands = vols.candidates("LinuxPassPhraseFileName").unwrap();
    assert_eq!(cands.len(), 2);
    // A header that only the new key opens.
    let img = dir.path().join("data.img");
    common::truncate(&img, "20M");
    common::run("mkfs.ext4", &["-q", img.to_str().unwrap()]);
    let hdr = dir.path().join("h");
    let keyfile = dir.path().join("newkey");
    std::fs::write(&keyfile, &new).unwrap();
    common::stock_encrypt(&img, &hdr, &keyfile, &[]);
    let vol = LuksVolume::new(&img, Some(&hdr));
    let picked = initcrypt::boot::pick_key(&vol, "osencrypt", "LinuxPassPhraseFileName", &cands)
        .unwrap()
        .expect("a header to ask");
    assert_eq!(cands[picked].0.expose(), &new[..]);
    // Neither key: rejected, naming both key volumes.
    let other = KeyVolumes(vec![open_path(&a).unwrap()]);
    let err = initcrypt::boot::pick_key(
        &vol,
        "osencrypt",
        "LinuxPassPhraseFileName",
        &other.candidates("LinuxPassPhraseFileName").unwrap(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("rejected by every keyslot"),
        "{err}"
    );
    // Same bytes on both volumes: one candidate (no header check needed).
    let c = common::fat_image(
        dir.path(),
        "same.img",
        16,
        common::Layout::Mbr,
        "BEK VOLUME",
        &[("LinuxPassPhraseFileName", &old)],
    );
    let same = KeyVolumes(vec![open_path(&a).unwrap(), open_path(&c).unwrap()]);
    assert_eq!(same.candidates("LinuxPassPhraseFileName").unwrap().len(), 1);
}

/// A power cut while `rotate` rewrote a LUKS1 header (one copy, no checksum) may tear it: the
/// boot then restores rotate's backup, but only when the header is really unusable and the backup
/// opens with a key it holds.
#[test]
fn a_torn_luks1_header_is_restored_from_the_rotation_backup_only_when_needed() {
    use initcrypt::boot::restore_wanted;
    use initcrypt::luks::LuksVolume;
    use initcrypt::secret::Secret;
    let dir = tempfile::tempdir().unwrap();
    let key = common::ade_passphrase(3);
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, &key).unwrap();
    let img = dir.path().join("root.img");
    common::truncate(&img, "20M");
    common::run("mkfs.ext4", &["-q", img.to_str().unwrap()]);
    let hdr = dir.path().join("osluksheader");
    common::stock_encrypt(&img, &hdr, &keyfile, &["--sector-size", "512"]);
    common::run(
        "cryptsetup",
        &["-q", "convert", "--type", "luks1", hdr.to_str().unwrap()],
    );
    let backup = dir.path().join("osluksheader.rotate-backup");
    std::fs::copy(&hdr, &backup).unwrap();
    let cands = |k: &[u8]| {
        vec![(
            Secret::new(zeroize::Zeroizing::new(k.to_vec())),
            "bek".to_string(),
        )]
    };
    let wanted = |c| {
        restore_wanted(
            &img,
            &hdr,
            &backup,
            "osencrypt",
            "LinuxPassPhraseFileName",
            c,
        )
    };
    assert!(!wanted(cands(&key)).unwrap(), "a healthy header stays");
    // Torn: the first sector of the phdr (magic, cipher, key digest) is garbage.
    let mut b = std::fs::read(&hdr).unwrap();
    b[..512].fill(0x5a);
    std::fs::write(&hdr, &b).unwrap();
    assert!(
        !wanted(cands(b"another key")).unwrap(),
        "a backup no key we hold opens is never restored"
    );
    assert!(wanted(cands(&key)).unwrap());
    LuksVolume::new(&img, Some(&hdr))
        .restore_luks1_header(&backup)
        .unwrap();
    assert_eq!(
        std::fs::read(&hdr).unwrap(),
        std::fs::read(&backup).unwrap()
    );
    assert!(
        !wanted(cands(&key)).unwrap(),
        "restored: nothing more to do"
    );
}
