//! `blockdev::probe` and `blockdev::full_probe` (libblkid) against images made by the real tools:
//! mkfs.ext4, mkfs.xfs, mkfs.vfat, mkswap, mkfs.btrfs, cryptsetup, sfdisk, and an LVM2 label
//! written by pvcreate. What each is called, its UUID, LABEL and block size, what "provably empty"
//! means, and the crypt sector size the pass derives from the probe.

mod common;

use std::path::{Path, PathBuf};

use common::{initcrypt, run, truncate};
use initcrypt::blockdev::{full_probe_path, probe_path, Probe};

const UUID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d";

fn image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let img = dir.join(name);
    truncate(&img, size);
    img
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn probed(img: &Path) -> Probe {
    probe_path(img)
        .unwrap()
        .unwrap_or_else(|| panic!("{}: nothing found", img.display()))
}

/// pvcreate refuses a plain file (it wants a block device, and this kernel has no device-mapper to
/// test LVM with), so the fixture is the first 4 KiB of a 16 MiB file that pvcreate 2.03.16
/// labelled through a loop device (`pvcreate --uuid 0CYoAK-Jcnd-gd42-3w5X-JAjz-oPUP-h3mZMf
/// --norestorefile /dev/loopN`): its LABELONE label and PV header, in sector 1.
fn lvm_pv(dir: &Path) -> PathBuf {
    let img = dir.join("pv.img");
    std::fs::write(&img, include_bytes!("data/lvm2-pv-label.img")).unwrap();
    truncate(&img, "16M");
    img
}

fn luks(dir: &Path, name: &str, version: &str) -> PathBuf {
    let img = image(dir, name, "32M");
    let key = dir.join("key");
    std::fs::write(&key, b"probe test passphrase").unwrap();
    run(
        "cryptsetup",
        &[
            "luksFormat",
            "-q",
            "--type",
            version,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--uuid",
            UUID,
            "--key-file",
            s(&key),
            s(&img),
        ],
    );
    img
}

/// Image, TYPE, UUID ("" when mkfs chose it), LABEL, BLOCK_SIZE.
type Case<'a> = (&'a Path, &'a str, &'a str, Option<&'a str>, Option<u64>);

#[test]
fn each_signature_is_named_as_blkid_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let ext4 = image(d, "ext4.img", "64M");
    run(
        "mkfs.ext4",
        &["-q", "-F", "-b", "4096", "-L", "root", "-U", UUID, s(&ext4)],
    );
    let ext4_1k = image(d, "ext4-1k.img", "64M");
    run("mkfs.ext4", &["-q", "-F", "-b", "1024", s(&ext4_1k)]);
    let xfs = image(d, "xfs.img", "300M");
    run(
        "mkfs.xfs",
        &[
            "-q",
            "-f",
            "-L",
            "data",
            "-m",
            &format!("uuid={UUID}"),
            s(&xfs),
        ],
    );
    let xfs_4k = image(d, "xfs-4k.img", "300M");
    run("mkfs.xfs", &["-q", "-f", "-s", "size=4096", s(&xfs_4k)]);
    let vfat = image(d, "vfat.img", "16M");
    run(
        "mkfs.vfat",
        &["-n", "BEK VOLUME", "-i", "1234ABCD", s(&vfat)],
    );
    let vfat_4k = image(d, "vfat-4k.img", "16M");
    run("mkfs.vfat", &["-S", "4096", s(&vfat_4k)]);
    let swap = image(d, "swap.img", "16M");
    run("mkswap", &["-U", UUID, "-L", "swp", s(&swap)]);
    let btrfs = image(d, "btrfs.img", "200M");
    run(
        "mkfs.btrfs",
        &["-q", "-f", "-L", "pool", "-U", UUID, s(&btrfs)],
    );
    let pv = lvm_pv(d);
    let luks2 = luks(d, "luks2.img", "luks2");
    let luks1 = luks(d, "luks1.img", "luks1");

    let cases: [Case; 11] = [
        (&ext4, "ext4", UUID, Some("root"), Some(4096)),
        (&ext4_1k, "ext4", "", None, Some(1024)),
        (&xfs, "xfs", UUID, Some("data"), Some(512)),
        (&xfs_4k, "xfs", "", None, Some(4096)),
        // FAT's block size is its logical sector: a 512-byte FAT must not get 4096-byte crypt
        // sectors (it would not mount on the mapping).
        (&vfat, "vfat", "1234-ABCD", Some("BEK VOLUME"), Some(512)),
        (&vfat_4k, "vfat", "", None, Some(4096)),
        (&swap, "swap", UUID, Some("swp"), None),
        (&btrfs, "btrfs", UUID, Some("pool"), Some(4096)),
        (
            &pv,
            "LVM2_member",
            "0CYoAK-Jcnd-gd42-3w5X-JAjz-oPUP-h3mZMf",
            None,
            None,
        ),
        (&luks2, "crypto_LUKS", UUID, None, None),
        (&luks1, "crypto_LUKS", UUID, None, None),
    ];
    for (img, fstype, uuid, label, block_size) in cases {
        let p = probed(img);
        let name = img.display();
        assert_eq!(p.fstype, fstype, "{name}");
        if !uuid.is_empty() {
            assert_eq!(p.uuid.as_deref(), Some(uuid), "{name}");
        } else {
            assert!(p.uuid.is_some(), "{name}: no UUID");
        }
        assert_eq!(p.label.as_deref(), label, "{name}");
        assert_eq!(p.block_size, block_size, "{name}");
    }
    assert_eq!(probed(&luks2).luks_version, Some(2));
    assert_eq!(probed(&luks1).luks_version, Some(1));
    assert_eq!(probed(&ext4).luks_version, None);
}

#[test]
fn provably_empty_means_no_signature_of_any_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let zeros = image(d, "zeros.img", "64M");
    assert_eq!(probe_path(&zeros).unwrap(), None);
    assert_eq!(full_probe_path(&zeros).unwrap(), vec![]);

    // A disk with a partition table and no partition: no filesystem, and not empty.
    for (label, kind) in [("gpt", "gpt"), ("dos", "dos")] {
        let disk = image(d, &format!("{label}.img"), "64M");
        let out = std::process::Command::new("sfdisk")
            .args(["-q", s(&disk)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(format!("label: {label}\n").as_bytes())?;
                c.wait()
            })
            .unwrap();
        assert!(out.success());
        assert_eq!(probe_path(&disk).unwrap(), None, "{label}: no superblock");
        let found = full_probe_path(&disk).unwrap();
        assert!(
            found.iter().any(|f| f.partition_table && f.kind == kind),
            "{label}: {found:?}"
        );
    }

    // Signatures the old probe did not know are found, with where their magic is.
    let swap = image(d, "swap.img", "16M");
    run("mkswap", &[s(&swap)]);
    let found = full_probe_path(&swap).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].kind.as_str(), found[0].offset),
        ("swap", Some(4086))
    );
    let pv = lvm_pv(d);
    let found = full_probe_path(&pv).unwrap();
    assert_eq!(found[0].kind, "LVM2_member", "{found:?}");
    assert_eq!(found[0].offset, Some(536)); // "LVM2 001" in the label at sector 1

    // One byte in the right place is enough: an LVM label alone in an otherwise zero device.
    let mut sector = std::fs::read(&pv).unwrap();
    sector.truncate(4096);
    let lone = d.join("lone.img");
    std::fs::write(&lone, &sector).unwrap();
    truncate(&lone, "64M");
    assert!(!full_probe_path(&lone).unwrap().is_empty());
}

// Two signatures at once (a FAT boot sector written over an ext4 whose superblock at byte 1024
// survives): blkid's safe probe calls that ambivalent. The full probe lists both; the probe
// answers with the first in blkid's order, as the hand-written probe answered with its first.
#[test]
fn ambivalent_devices_list_every_signature() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ext4 = image(d, "ext4.img", "64M");
    run("mkfs.ext4", &["-q", "-F", s(&ext4)]);
    let vfat = image(d, "vfat.img", "64M");
    run("mkfs.vfat", &[s(&vfat)]);
    let boot = std::fs::read(&vfat).unwrap()[..512].to_vec();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&ext4).unwrap();
        f.write_all_at(&boot, 0).unwrap();
    }
    let mut kinds: Vec<String> = full_probe_path(&ext4)
        .unwrap()
        .into_iter()
        .map(|f| f.kind)
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["ext4", "vfat"]);
    assert_eq!(probed(&ext4).fstype, "vfat");
}

// The pass takes the filesystem's block size from the probe: a FAT with 512-byte sectors gets a
// 512-byte crypt sector (with 4096 it would not mount on the mapping), ext4 with 4 KiB blocks a
// 4096-byte one. Checked in the header stock cryptsetup reads.
#[test]
fn encrypt_image_sizes_crypt_sectors_by_the_probed_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("key");
    std::fs::write(&key, b"probe test passphrase").unwrap();
    let vfat = image(d, "vfat.img", "32M");
    run("mkfs.vfat", &["-F", "32", "-s", "1", s(&vfat)]);
    let ext4 = image(d, "ext4.img", "32M");
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", s(&ext4)]);
    for (img, want) in [(&vfat, 512), (&ext4, 4096)] {
        let hdr = d.join(format!(
            "{}.hdr",
            img.file_name().unwrap().to_str().unwrap()
        ));
        let out = initcrypt()
            .args(["encrypt-image", "--device", s(img), "--header", s(&hdr)])
            .args(["--key-file", s(&key)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = run("cryptsetup", &["luksDump", s(&hdr)]);
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(
            dump.contains(&format!("sector: {want} [bytes]")),
            "{}: want {want}:\n{dump}",
            img.display()
        );
    }
}
