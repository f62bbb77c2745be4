//! The systemd side of the boot, checked on the host with the real tools: the generator's crypttab
//! lines go through the real systemd-cryptsetup-generator, and every unit (ours and generated) through
//! `systemd-analyze verify`. The QEMU scenarios dracut-* prove the same units boot.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::initcrypt;
use initcrypt::config::{self, BootParams};
use initcrypt::generator::{self, Paths};

const VOLUMES: &str = r#"{"version": 1, "volumes": [
  {"name": "osencrypt", "role": "os", "device": "PARTUUID=0d3c9a1e-01",
   "header": {"boot_uuid": "5a4b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d", "path": "luks/osluksheader"},
   "desired": "encrypted"},
  {"name": "data-0-1", "role": "data", "device": "/dev/disk/by-path/pci-0000:00:05.0-scsi-0:0:0:1",
   "key_file": "LinuxPassPhraseFileName_0_1", "desired": "encrypted"},
  {"name": "scratch", "role": "data", "device": "PARTUUID=77-02",
   "header": {"boot_uuid": "5a4b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d", "path": "luks/scratch.hdr"},
   "key_file": "LinuxPassPhraseFileName_0_2", "desired": "decrypted"}
]}"#;

struct Gen {
    _dir: tempfile::TempDir,
    normal: PathBuf,
    early: PathBuf,
    runtime: PathBuf,
}

fn generate(volumes_json: &str, cmdline: &str, etc_crypttab: &str) -> Gen {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("volumes.json");
    fs::write(&cfg, volumes_json).unwrap();
    let etc = dir.path().join("etc-crypttab");
    fs::write(&etc, etc_crypttab).unwrap();
    let params = BootParams::parse(cmdline).unwrap();
    let volumes = config::load(&cfg, &params).unwrap();
    let paths = Paths {
        normal: dir.path().join("normal"),
        early: dir.path().join("early"),
        runtime_dir: dir.path().join("run"),
        etc_crypttab: etc,
        stock_generator: None,
    };
    fs::create_dir_all(&paths.normal).unwrap();
    generator::generate(&volumes, &params, &paths).unwrap();
    Gen {
        normal: paths.normal.clone(),
        early: paths.early.clone(),
        runtime: paths.runtime_dir.clone(),
        _dir: dir,
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn crypttab_lines_become_stock_units_with_our_ordering() {
    let g = generate(VOLUMES, "ro initcrypt.keyvol_timeout=100", "");
    // The lines handed to the stock generator: key field none, no prompt, kept across switch-root.
    assert_eq!(
        read(&g.runtime.join("crypttab")),
        "osencrypt PARTUUID=0d3c9a1e-01 none luks,headless=true,x-initrd.attach,header=/luks/osluksheader:UUID=5a4b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d\n\
         data-0-1 /dev/disk/by-path/pci-0000:00:05.0-scsi-0:0:0:1 none luks,headless=true,x-initrd.attach,nofail\n"
    );
    // The stock unit: it opens with the key file systemd-cryptsetup finds by name, the header on a
    // boot partition systemd mounts for the open only.
    let os = read(&g.early.join("systemd-cryptsetup@osencrypt.service"));
    assert!(
        os.contains("'osencrypt' '/dev/disk/by-partuuid/0d3c9a1e-01' 'none'"),
        "{os}"
    );
    assert!(
        os.contains("header=/run/systemd/cryptsetup/headerdev-osencrypt/luks/osluksheader"),
        "{os}"
    );
    assert!(os.contains("headless=true"), "{os}");
    assert!(g
        .early
        .join("cryptsetup.target.requires/systemd-cryptsetup@osencrypt.service")
        .exists());
    // nofail: the data volume is wanted, not required, by cryptsetup.target.
    let data_unit = "systemd-cryptsetup@data\\x2d0\\x2d1.service";
    assert!(g.early.join(data_unit).exists());
    assert!(!g
        .early
        .join("cryptsetup.target.requires")
        .join(data_unit)
        .exists());
    // Our ordering on top of the stock units.
    let dropin = read(
        &g.normal
            .join("systemd-cryptsetup@osencrypt.service.d/50-initcrypt.conf"),
    );
    for want in [
        "Requires=initcrypt-keys.service initcrypt-encrypt@osencrypt.service",
        "After=initcrypt-keys.service initcrypt-encrypt@osencrypt.service",
        // the key file stays until the unit has used it
        "Before=initcrypt-keys-cleanup.service",
        // a rejected OS key ends in the emergency path, not in a wait for a root that cannot come
        "OnFailure=emergency.target",
        "OnFailureJobMode=isolate",
    ] {
        assert!(
            dropin.lines().any(|l| l == want),
            "{want} missing: {dropin}"
        );
    }
    let data_dropin = read(
        &g.normal
            .join("systemd-cryptsetup@data\\x2d0\\x2d1.service.d/50-initcrypt.conf"),
    );
    assert!(
        !data_dropin.contains("OnFailure"),
        "a data disk never sends the boot to emergency: {data_dropin}"
    );
    // ... and a missing data disk never holds the key cleanup (and so the boot) for its device timeout
    assert!(
        !data_dropin.contains("initcrypt-keys-cleanup"),
        "{data_dropin}"
    );
    // dracut's initqueue must not time out on the root while the OS pass runs, nor while the data
    // passes run that the OS header's mount (and so the OS open) waits for.
    let iq = read(
        &g.normal
            .join("dracut-initqueue.service.d/50-initcrypt.conf"),
    );
    assert!(
        iq.lines().any(|l| l
            == "After=initcrypt-keys.service initcrypt-encrypt@osencrypt.service \
                initcrypt-encrypt-data@data\\x2d0\\x2d1.service initcrypt-decrypt-data@scratch.service"),
        "{iq}"
    );
    // root=UUID= names a filesystem the pass moves behind the mapping during this boot: the root is
    // mounted after the open, and never after a failed pass.
    let sysroot = read(&g.normal.join("sysroot.mount.d/50-initcrypt.conf"));
    for want in [
        "Requires=initcrypt-encrypt@osencrypt.service",
        "After=initcrypt-encrypt@osencrypt.service systemd-cryptsetup@osencrypt.service",
    ] {
        assert!(
            sysroot.lines().any(|l| l == want),
            "{want} missing: {sysroot}"
        );
    }
    assert!(
        !sysroot.contains("data"),
        "a data volume never holds the root: {sysroot}"
    );
    // (a link to the template, which exists in the initrd, not necessarily on this host)
    let want = g
        .normal
        .join("cryptsetup.target.wants/initcrypt-encrypt@osencrypt.service");
    assert!(
        fs::symlink_metadata(&want).is_ok(),
        "{} missing",
        want.display()
    );
    // The header's boot partition is mounted only after our units: never on the way to emergency,
    // never while the pass holds its own mount.
    let hdr = read(
        &g.normal
            .join("run-systemd-cryptsetup-headerdev\\x2dosencrypt.mount.d/50-initcrypt.conf"),
    );
    for want in [
        "Requires=initcrypt-keys.service initcrypt-encrypt@osencrypt.service",
        // after every pass unit: they mount the same boot partition privately
        "After=initcrypt-keys.service initcrypt-encrypt@osencrypt.service initcrypt-encrypt-data@data\\x2d0\\x2d1.service initcrypt-decrypt-data@scratch.service",
        "Options=ro",
    ] {
        assert!(hdr.lines().any(|l| l == want), "{want} missing: {hdr}");
    }
    assert!(g
        .early
        .join("run-systemd-cryptsetup-headerdev\\x2dosencrypt.mount")
        .exists());
    // A data volume's pass has its own template (no OnFailure=, no hold on the root mount), and
    // pass units run one at a time.
    let want = g
        .normal
        .join("cryptsetup.target.wants/initcrypt-encrypt-data@data\\x2d0\\x2d1.service");
    assert_eq!(
        fs::read_link(&want).unwrap(),
        Path::new("/usr/lib/systemd/system/initcrypt-encrypt-data@.service")
    );
    let order = read(
        &g.normal
            .join("initcrypt-encrypt-data@data\\x2d0\\x2d1.service.d/50-order.conf"),
    );
    assert!(
        order
            .lines()
            .any(|l| l == "After=initcrypt-encrypt@osencrypt.service"),
        "{order}"
    );
    assert!(!g
        .normal
        .join("initcrypt-encrypt@osencrypt.service.d")
        .exists());
    // The unit may wait as long as the command line lets the binary wait, plus a margin.
    let t = read(&g.normal.join("initcrypt-keys.service.d/50-timeout.conf"));
    assert!(t.contains("TimeoutStartSec=130"), "{t}");
    // A volume wanted decrypted is decrypted by its own pass unit (in the one-at-a-time chain) and
    // never opened: no crypttab line, no stock unit, no header mount.
    assert!(!g.early.join("systemd-cryptsetup@scratch.service").exists());
    assert!(!read(&g.runtime.join("crypttab")).contains("scratch"));
    assert!(!g
        .early
        .join("run-systemd-cryptsetup-headerdev\\x2dscratch.mount")
        .exists());
    let want = g
        .normal
        .join("cryptsetup.target.wants/initcrypt-decrypt-data@scratch.service");
    assert_eq!(
        fs::read_link(&want).unwrap(),
        Path::new("/usr/lib/systemd/system/initcrypt-decrypt-data@.service")
    );
    let order = read(
        &g.normal
            .join("initcrypt-decrypt-data@scratch.service.d/50-order.conf"),
    );
    assert!(
        order
            .lines()
            .any(|l| l == "After=initcrypt-encrypt-data@data\\x2d0\\x2d1.service"),
        "{order}"
    );
}

/// An OS volume wanted decrypted (what `disable` asks for): its decrypt unit holds the root mount,
/// nothing opens it, and the key unit asks for no key.
#[test]
fn an_os_volume_wanted_decrypted_is_decrypted_before_the_root_mount() {
    let json = r#"{"version": 1, "volumes": [
  {"name": "osencrypt", "role": "os", "device": "PARTUUID=0d3c9a1e-01",
   "header": {"boot_uuid": "5a4b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d", "path": "luks/osluksheader"},
   "desired": "decrypted"}
]}"#;
    let g = generate(json, "", "");
    assert!(!g.runtime.join("crypttab").exists());
    assert!(!g
        .early
        .join("systemd-cryptsetup@osencrypt.service")
        .exists());
    assert!(fs::symlink_metadata(
        g.normal
            .join("cryptsetup.target.wants/initcrypt-decrypt@osencrypt.service")
    )
    .is_ok());
    let sysroot = read(&g.normal.join("sysroot.mount.d/50-initcrypt.conf"));
    for want in [
        "Requires=initcrypt-decrypt@osencrypt.service",
        "After=initcrypt-decrypt@osencrypt.service",
    ] {
        assert!(
            sysroot.lines().any(|l| l == want),
            "{want} missing: {sysroot}"
        );
    }
    // The root's fsck never preens the partition while the decryption runs, nor after it failed
    // (review F1.2c: it was ordered only after its device unit).
    let fsck = read(
        &g.normal
            .join("systemd-fsck-root.service.d/50-initcrypt.conf"),
    );
    for want in [
        "Requires=initcrypt-decrypt@osencrypt.service",
        "After=initcrypt-decrypt@osencrypt.service",
    ] {
        assert!(fsck.lines().any(|l| l == want), "{want} missing: {fsck}");
    }
    let iq = read(
        &g.normal
            .join("dracut-initqueue.service.d/50-initcrypt.conf"),
    );
    assert!(
        iq.lines()
            .any(|l| l == "After=initcrypt-keys.service initcrypt-decrypt@osencrypt.service"),
        "{iq}"
    );
}

#[test]
fn the_os_pass_comes_first_whatever_the_file_order() {
    let data_first = r#"{"version": 1, "volumes": [
  {"name": "data0_1", "role": "data", "device": "PARTUUID=77-02",
   "header": {"boot_uuid": "5a4b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d", "path": "luks/data0_1.hdr"},
   "key_file": "LinuxPassPhraseFileName_0_1", "desired": "encrypted"},
  {"name": "osencrypt", "role": "os", "device": "PARTUUID=0d3c9a1e-01",
   "header": {"boot_uuid": "5a4b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d", "path": "luks/osluksheader"},
   "desired": "encrypted"}]}"#;
    let g = generate(data_first, "", "");
    assert!(!g
        .normal
        .join("initcrypt-encrypt@osencrypt.service.d")
        .exists());
    let order = read(
        &g.normal
            .join("initcrypt-encrypt-data@data0_1.service.d/50-order.conf"),
    );
    assert!(
        order
            .lines()
            .any(|l| l == "After=initcrypt-encrypt@osencrypt.service"),
        "{order}"
    );
}

#[test]
fn ade_command_line_alone_opens_osencrypt() {
    let g = generate(
        r#"{"version": 1, "volumes": []}"#,
        "root=/dev/mapper/osencrypt rd.luks.ade.partuuid=AB-02 rd.luks.ade.bootuuid=0F0E-AA",
        "",
    );
    let os = read(&g.early.join("systemd-cryptsetup@osencrypt.service"));
    assert!(os.contains("'/dev/disk/by-partuuid/ab-02' 'none'"), "{os}");
    assert!(os.contains("headerdev-osencrypt/luks/osluksheader"), "{os}");
    let mount = read(
        &g.early
            .join("run-systemd-cryptsetup-headerdev\\x2dosencrypt.mount"),
    );
    assert!(mount.contains("What=/dev/disk/by-uuid/0f0e-aa"), "{mount}");
}

#[test]
fn a_crypttab_line_for_a_managed_volume_is_shadowed() {
    // ADE's own line: key on a mount and header on /boot, neither of which exists in the initrd.
    let g = generate(
        VOLUMES,
        "",
        "osencrypt /dev/disk/by-partuuid/0d3c9a1e-01 /mnt/azure_bek_disk/LinuxPassPhraseFileName luks,discard,header=/boot/luks/osluksheader\n",
    );
    // Ours is made in the early directory, which outranks the unit the stock run over
    // /etc/crypttab writes to the normal one.
    let os = read(&g.early.join("systemd-cryptsetup@osencrypt.service"));
    assert!(
        os.contains("'none'") && !os.contains("azure_bek_disk"),
        "{os}"
    );
    assert!(read(&g.runtime.join("crypttab")).starts_with("osencrypt PARTUUID=0d3c9a1e-01 none "));
    assert!(g
        .normal
        .join("systemd-cryptsetup@osencrypt.service.d/50-initcrypt.conf")
        .exists());
}

/// A line in the image's /etc/crypttab for a volume wanted decrypted would make a stock unit that
/// races the decryption, then fails on plaintext at every boot: it is skipped by a condition that
/// never holds (and `systemd-analyze condition` agrees that it never holds).
#[test]
fn a_crypttab_line_for_a_volume_wanted_decrypted_is_skipped() {
    let g = generate(
        VOLUMES,
        "",
        "scratch PARTUUID=77-02 /mnt/azure_bek_disk/LinuxPassPhraseFileName_0_2 luks,header=/boot/luks/scratch.hdr\n",
    );
    let dropin = read(
        &g.normal
            .join("systemd-cryptsetup@scratch.service.d/50-initcrypt.conf"),
    );
    for want in [
        "After=initcrypt-decrypt-data@scratch.service",
        "ConditionPathExists=!/",
    ] {
        assert!(
            dropin.lines().any(|l| l == want),
            "{want} missing: {dropin}"
        );
    }
    let out = Command::new("systemd-analyze")
        .args(["condition", "ConditionPathExists=!/"])
        .output()
        .expect("systemd-analyze (package systemd) is installed by scripts/setup");
    assert!(!out.status.success(), "{out:?}");
    // Without a line of its own, a decrypted volume gets no drop-in for a unit that does not exist.
    let g = generate(VOLUMES, "", "");
    assert!(!g
        .normal
        .join("systemd-cryptsetup@scratch.service.d")
        .exists());
}

#[test]
fn detached_header_volume_named_by_filesystem_uuid_is_refused() {
    let text = VOLUMES.replace("PARTUUID=0d3c9a1e-01", "UUID=1234-abcd");
    let err = config::parse(&text, Path::new("volumes.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("volumes[0].device") && err.contains("PARTUUID="),
        "{err}"
    );
}

#[test]
fn generator_cli_contract() {
    let dir = tempfile::tempdir().unwrap();
    // systemd passes exactly three directories.
    let out = initcrypt().args(["generator", "a"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Outside the initrd it writes nothing: the real root's own crypttab handles what is left.
    let d = dir.path().join("n");
    let out = initcrypt()
        .env("SYSTEMD_IN_INITRD", "0")
        .args(["generator", d.to_str().unwrap(), "e", "l"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!d.exists());
    // In the initrd, an invalid volumes.json is exit 8 naming the field, before anything is
    // written (initcrypt-keys.service then fails with the same line and takes the emergency path).
    let cfg = dir.path().join("volumes.json");
    fs::write(&cfg, VOLUMES.replace("PARTUUID=0d3c9a1e-01", "/dev/sda2")).unwrap();
    let out = initcrypt()
        .env("SYSTEMD_IN_INITRD", "1")
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "generator",
            d.to_str().unwrap(),
            "e",
            "l",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("volumes[0]"),
        "{out:?}"
    );
    assert!(!d.exists());
    // Under its generator name the binary runs the generator (argv[0] dispatch).
    let link = dir.path().join("initcrypt-generator");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_initcrypt"), &link).unwrap();
    let out = Command::new(&link)
        .env("SYSTEMD_IN_INITRD", "0")
        .args([d.to_str().unwrap(), "e", "l"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(&link).arg("x").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// crypttab's keyscript= takes a path and no arguments: /usr/lib/initcrypt/initcrypt-keyscript is a
/// link to the binary, which then acts as `initcrypt keyscript`.
#[test]
fn keyscript_name_dispatches_to_keyscript() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("initcrypt-keyscript");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_initcrypt"), &link).unwrap();
    let out = Command::new(&link)
        .env_remove("CRYPTTAB_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CRYPTTAB_NAME"),
        "{out:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing but a key ever goes to stdout"
    );
}

/// `systemd-analyze verify` over our units and the generated ones. It exits 0 on most problems and
/// only prints them, so any line it prints fails the test, except the one about our binary not
/// being installed on the build host.
#[test]
fn units_pass_systemd_analyze_verify() {
    let g = generate(VOLUMES, "", "");
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut units = Vec::new();
    for entry in fs::read_dir(repo.join("systemd-units")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        // A template is verified through an instance.
        let name = name.replace("@.service", "@osencrypt.service");
        fs::copy(&p, dir.path().join(&name)).unwrap();
        units.push(dir.path().join(name));
    }
    assert_eq!(
        units.len(),
        6,
        "systemd-units/ holds keys, keys-cleanup, encrypt@, encrypt-data@, decrypt@ and decrypt-data@"
    );
    for name in [
        "systemd-cryptsetup@osencrypt.service",
        "run-systemd-cryptsetup-headerdev\\x2dosencrypt.mount",
    ] {
        fs::copy(g.early.join(name), dir.path().join(name)).unwrap();
        units.push(dir.path().join(name));
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(&units)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("systemd-analyze (package systemd) is installed by scripts/setup");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("Command /usr/sbin/initcrypt is not executable"))
        .filter(|l| !l.contains("/lib/systemd/systemd-cryptsetup is not executable"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(bad.is_empty(), "systemd-analyze verify: {bad:#?}");
}
