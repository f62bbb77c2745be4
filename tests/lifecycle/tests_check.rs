//! `check`: each seed item checked or reported as designed away; each failing finding provoked.

use initcrypt::exit::Exit;
use initcrypt::lifecycle::check::{exit_of, Finding, Level};
use initcrypt::lifecycle::enable;
use initcrypt::lifecycle::machine::User;
use initcrypt::lifecycle::VolumeType;

use crate::fake::*;

fn check(f: &Fake, vt: VolumeType) -> Vec<Finding> {
    enable::check(&f.target(), vt)
}

fn find<'a>(fs: &'a [Finding], id: &str) -> Vec<&'a Finding> {
    fs.iter().filter(|f| f.id == id).collect()
}

fn level_of(fs: &[Finding], id: &str) -> Level {
    let v = find(fs, id);
    assert!(!v.is_empty(), "no finding {id}:\n{}", dump(fs));
    v.iter().map(|f| f.level).max_by_key(|l| *l as u8).unwrap()
}

fn dump(fs: &[Finding]) -> String {
    fs.iter().map(|f| f.line() + "\n").collect()
}

#[test]
fn a_good_vm_passes_and_every_seed_item_has_a_finding() {
    let t = Tree::new();
    let f = Fake::vm(&t);
    let fs = check(&f, VolumeType::All);
    assert_eq!(exit_of(&fs), Exit::Ok, "{}", dump(&fs));
    // Issue [6] item 2 and the seeds' troubleshooting guide + overview, one id each.
    for id in [
        "os.layout",        // LVM / custom partition schemes (guide)
        "os.root-arg",      // boot configuration survives encryption
        "boot.partition",   // a boot partition is present
        "boot.space",       // ... with room for headers and journals
        "initramfs.tool",   // dracut or initramfs-tools
        "kernel.dm-crypt",  // dm-crypt for every kernel (overview: dm-crypt module)
        "bootloader.tools", // grub-pc-bin autoremoved (#1240)
        "keyvol.present",   // key volume
        "keyvol.os-key",    // ... holds the OS key
        "keyvol.data-key",  // ... and says which data key file
        "fstab.parse",
        "fstab.mounted", // data mounted as fstab says (overview: mount -a, lsblk)
        "fstab.nested",  // /data3 + /data3/data4 (guide)
        "data.volume",
        "memory",          // 7 GB rule (guide, overview table): not a requirement
        "os.unmount",      // unmount failure, SAP/MongoDB/Docker, custom scripts (guide)
        "selinux",         // SELinux (guide)
        "kernel.oom",      // Ubuntu 14.04 dd OOM kill (guide)
        "agent",           // agent/extension versions (guide)
        "network",         // firewall / Key Vault endpoints (guide, overview)
        "status.drift",    // portal shows encrypted after low-level decrypt (guide)
        "recovery",        // restore from snapshot after a failed pass (guide)
        "vfat",            // vfat module (overview)
        "data.late-mount", // disks available a minute after reboot (overview)
        "fstab.kept",      // mount info moved out of fstab (overview)
        "os.pass-time",    // 3-16 h with SSH disabled (guide)
    ] {
        assert!(!find(&fs, id).is_empty(), "no finding {id}:\n{}", dump(&fs));
    }
    // The designed-away ones are ok lines, never silent.
    assert_eq!(level_of(&fs, "memory"), Level::Ok);
    assert!(find(&fs, "memory")[0].what.contains("not a requirement"));
    // The partition root= is fixable: a warning that says what enable does.
    assert_eq!(level_of(&fs, "os.root-arg"), Level::Warn);
    assert!(find(&fs, "os.root-arg")[0]
        .fix
        .contains(&format!("root=UUID={ROOT_UUID}")));
    // Key files: LUN 1 has its own, LUN 2 falls back to the OS key, as ADE does.
    let keys: Vec<String> = find(&fs, "keyvol.data-key")
        .iter()
        .map(|f| f.line())
        .collect();
    assert!(
        keys.iter().any(|l| l.contains("data0_1p1")
            && l.contains("LinuxPassPhraseFileName_0_1 (on the key volume)")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|l| l.contains("data0_2")
            && l.contains("LinuxPassPhraseFileName_0_2 is not on the key volume")),
        "{keys:?}"
    );
    // Nested /data1/logs after /data1: ordered, ok.
    assert_eq!(level_of(&fs, "fstab.nested"), Level::Ok);
    // Every line has the four parts.
    for f in &fs {
        let l = f.line();
        assert!(
            l.starts_with("ok  ") || l.starts_with("warn") || l.starts_with("fail"),
            "{l}"
        );
    }
}

/// Each failing finding of `lifecycle-check-findings`, one at a time, with its exit code.
#[test]
fn failing_findings_and_their_exit_codes() {
    struct Case {
        what: &'static str,
        id: &'static str,
        exit: Exit,
        setup: fn(&Tree, &mut Fake),
    }
    let cases = [
        Case {
            what: "fstab by /dev/sdX",
            id: "fstab.persistent-name",
            exit: Exit::ConfigInvalid,
            setup: |t, _| {
                t.write(
                    "etc/fstab",
                    &FSTAB.replace(&format!("UUID={D1_UUID}"), "/dev/sdb1"),
                )
            },
        },
        Case {
            what: "no nofail",
            id: "fstab.nofail",
            exit: Exit::ConfigInvalid,
            setup: |t, _| {
                t.write(
                    "etc/fstab",
                    &FSTAB.replace("defaults,nofail\t", "defaults\t"),
                )
            },
        },
        Case {
            what: "no key volume",
            id: "keyvol.present",
            exit: Exit::KeyVolumeMissing,
            setup: |_, f| {
                f.keyvol = Err("no FAT volume labelled \"BEK VOLUME\" appeared within 0 s".into())
            },
        },
        Case {
            what: "no OS key file",
            id: "keyvol.os-key",
            exit: Exit::KeyRejected,
            setup: |_, f| {
                f.keyvol = Ok(vec![
                    "LinuxPassPhraseFileName_0_1".into(),
                    "LinuxPassPhraseFileName_0_2".into(),
                ])
            },
        },
        Case {
            what: "no boot partition",
            id: "boot.partition",
            exit: Exit::LayoutUnsupported,
            setup: |t, f| {
                t.write(
                    "etc/fstab",
                    &FSTAB.replace(
                        &format!(
                            "UUID={BOOT_UUID} /boot           ext4    defaults        0       2\n"
                        ),
                        "",
                    ),
                );
                f.mounts.remove("/boot");
            },
        },
        Case {
            what: "full boot partition",
            id: "boot.space",
            exit: Exit::LayoutUnsupported,
            setup: |_, f| f.free = Some(10 << 20),
        },
        Case {
            what: "LVM root",
            id: "os.layout",
            exit: Exit::LayoutUnsupported,
            setup: |_, f| {
                f.add_mapping("dm-0", "rootvg-rootlv", "LVM", "vda2", ROOT_UUID);
                f.mounts.get_mut("/").unwrap().device = Some("dm-0".into());
            },
        },
        Case {
            what: "kernel without dm-crypt",
            id: "kernel.dm-crypt",
            exit: Exit::LayoutUnsupported,
            setup: |t, _| {
                t.add_kernel(KVER2);
                std::fs::remove_file(t.path(&format!(
                    "lib/modules/{KVER2}/kernel/drivers/md/dm-crypt.ko.xz"
                )))
                .unwrap();
            },
        },
        Case {
            what: "data disk absent",
            id: "data.device",
            exit: Exit::DeviceMissing,
            setup: |_, f| {
                f.devices.retain(|(_, d)| d.name != "sdc");
                f.mounts.remove("/data1/logs");
            },
        },
        Case {
            what: "another disk mounted where fstab says",
            id: "fstab.mounted",
            exit: Exit::DeviceMissing,
            setup: |_, f| f.mounts.get_mut("/data1").unwrap().device = Some("sdz1".into()),
        },
        Case {
            what: "no initramfs builder",
            id: "initramfs.tool",
            exit: Exit::LayoutUnsupported,
            setup: |t, _| std::fs::remove_file(t.path("usr/sbin/update-initramfs")).unwrap(),
        },
        Case {
            what: "grub.cfg by PARTUUID and no update-grub",
            id: "bootloader.tools",
            exit: Exit::LayoutUnsupported,
            setup: |t, _| std::fs::remove_file(t.path("usr/sbin/update-grub")).unwrap(),
        },
        Case {
            what: "a crypttab line of that name for another disk",
            id: "crypttab.conflict",
            exit: Exit::ConfigInvalid,
            setup: |t, _| t.write("etc/crypttab", "data0_1p1 /dev/sdz1 none luks\n"),
        },
        Case {
            what: "malformed fstab line",
            id: "fstab.parse",
            exit: Exit::ConfigInvalid,
            setup: |t, _| t.write("etc/fstab", &format!("{FSTAB}/dev/sdd1 /broken\n")),
        },
    ];
    for c in cases {
        let t = Tree::new();
        let mut f = Fake::vm(&t);
        (c.setup)(&t, &mut f);
        let fs = check(&f, VolumeType::All);
        assert_eq!(
            level_of(&fs, c.id),
            Level::Fail,
            "{}:\n{}",
            c.what,
            dump(&fs)
        );
        assert_eq!(exit_of(&fs), c.exit, "{}:\n{}", c.what, dump(&fs));
        let bad: Vec<&Finding> = fs.iter().filter(|f| f.level == Level::Fail).collect();
        for b in bad {
            assert!(
                !b.fix.is_empty(),
                "{}: a failing finding without a fix: {}",
                c.what,
                b.line()
            );
        }
    }
}

#[test]
fn findings_that_warn() {
    let t = Tree::new();
    let mut f = Fake::vm(&t);
    f.users.insert(
        "/data1".into(),
        vec![User {
            pid: 4242,
            comm: "postgres".into(),
        }],
    );
    f.mounts.remove("/data1/logs");
    // nested line listed before its parent; a data disk inside the resource disk
    t.write(
        "etc/fstab",
        &format!(
            "UUID={ROOT_UUID} / ext4 defaults 0 1\nUUID={BOOT_UUID} /boot ext4 defaults 0 2\n\
UUID={D2_UUID} /data1/logs xfs defaults,nofail 0 2\nUUID={D1_UUID} /data1 ext4 defaults,nofail 0 2\n\
/dev/disk/cloud/azure_resource-part1 /mnt auto defaults,nofail,x-systemd.requires=cloud-init.service,comment=cloudconfig 0 2\n"
        ),
    );
    let fs = check(&f, VolumeType::Data);
    assert_eq!(exit_of(&fs), Exit::Ok, "{}", dump(&fs));
    let busy = find(&fs, "data.busy");
    assert!(
        busy[0].what.contains("postgres (pid 4242)"),
        "{}",
        dump(&fs)
    );
    assert_eq!(level_of(&fs, "fstab.nested"), Level::Warn);
    assert_eq!(
        level_of(&fs, "fstab.mounted"),
        Level::Warn,
        "not mounted now"
    );
    // the resource disk is not a data volume
    assert!(
        !dump(&fs).contains("data0_") || !dump(&fs).contains(" /mnt:"),
        "{}",
        dump(&fs)
    );
    assert!(find(&fs, "data.volume")
        .iter()
        .all(|f| !f.location.ends_with(" /mnt")));
    // --volume-type data says nothing about the OS layout
    assert!(find(&fs, "os.layout").is_empty());
}

#[test]
fn resource_disk_key_volume_and_swap_are_not_data() {
    let t = Tree::new();
    let mut f = Fake::vm(&t);
    t.write(
        "etc/waagent.conf",
        "ResourceDisk.Format=y\nResourceDisk.MountPoint=/mnt/resource\n",
    );
    t.write(
        "etc/fstab",
        &format!(
            "{FSTAB}/dev/sdd1 /mnt/resource ext4 defaults 0 2\ntmpfs /tmp tmpfs defaults 0 0\n/data1 /srv none bind 0 0\n"
        ),
    );
    f.mounts.remove("/data1/logs");
    let fs = check(&f, VolumeType::Data);
    // /dev/sdd1 without nofail would fail fstab.persistent-name and fstab.nofail if it were data
    assert_eq!(exit_of(&fs), Exit::Ok, "{}", dump(&fs));
    let vols: Vec<String> = find(&fs, "data.volume")
        .iter()
        .map(|f| f.location.clone())
        .collect();
    assert_eq!(vols.len(), 2, "{vols:?}");
}

#[test]
fn offline_root_without_key_volume_only_warns() {
    let t = Tree::new();
    let mut f = Fake::vm(&t);
    f.keyvol = Err("not attached".into());
    let mut target = f.target();
    target.offline = true;
    let fs = enable::check(&target, VolumeType::Os);
    assert_eq!(level_of(&fs, "keyvol.present"), Level::Warn);
    assert_eq!(exit_of(&fs), Exit::Ok, "{}", dump(&fs));
}

#[test]
fn an_ade_vm_is_recognised() {
    let t = Tree::new();
    let mut f = Fake::vm(&t);
    f.add_mapping("dm-0", "osencrypt", "CRYPT", "vda2", ROOT_UUID);
    f.mounts.get_mut("/").unwrap().device = Some("dm-0".into());
    t.write("boot/luks/osluksheader", "header");
    t.write(
        "etc/crypttab",
        &format!("osencrypt /dev/disk/by-partuuid/{ROOT_PARTUUID} /mnt/azure_bek_disk/LinuxPassPhraseFileName luks,discard,header=/boot/luks/osluksheader"),
    );
    f.devices
        .iter_mut()
        .find(|(_, d)| d.name == "vda2")
        .unwrap()
        .1
        .fstype = Some("crypto_LUKS".into());
    let fs = check(&f, VolumeType::Os);
    assert_eq!(exit_of(&fs), Exit::Ok, "{}", dump(&fs));
    assert!(find(&fs, "os.layout")[0].what.contains("already encrypted"));
    assert_eq!(level_of(&fs, "crypttab.line"), Level::Ok);
}
