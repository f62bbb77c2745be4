//! A described machine and a root tree to run the lifecycle commands on.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use initcrypt::config::Volume;
use initcrypt::lifecycle::enable::Target;
use initcrypt::lifecycle::machine::{Device, Dm, Machine, Mounted, Observation, User};

pub const ROOT_UUID: &str = "7a3f0c1e-0000-4000-8000-00000000000a";
pub const ROOT_PARTUUID: &str = "6b2c1d00-02";
pub const BOOT_UUID: &str = "b0070000-0000-4000-8000-0000000000b1";
pub const BOOT_PARTUUID: &str = "6b2c1d00-01";
pub const D1_UUID: &str = "d1d1d1d1-0000-4000-8000-0000000000d1";
pub const D1_PARTUUID: &str = "a1a1a1a1-01";
pub const D2_UUID: &str = "d2d2d2d2-0000-4000-8000-0000000000d2";
pub const D2_BYPATH: &str = "pci-0000:00:05.0-scsi-0:0:0:2";
pub const KVER: &str = "6.1.0-28-cloud-amd64";
pub const KVER2: &str = "6.1.0-29-cloud-amd64";

pub const FSTAB: &str = "# /etc/fstab: static file system information.\n\
#\n\
UUID=7a3f0c1e-0000-4000-8000-00000000000a /               ext4    errors=remount-ro 0       1\n\
UUID=b0070000-0000-4000-8000-0000000000b1 /boot           ext4    defaults        0       2\n\
UUID=d1d1d1d1-0000-4000-8000-0000000000d1\t/data1\text4\tdefaults,nofail\t0\t2\n\
UUID=d2d2d2d2-0000-4000-8000-0000000000d2 /data1/logs xfs defaults,nofail,x-systemd.device-timeout=10 0 2\n\
LABEL=BEK\\040VOLUME /mnt/azure_bek_disk auto defaults,discard,nofail 0 0\n\
/swapfile none swap sw 0 0\n";

pub const GRUB_DEFAULTS: &str = "# If you change this file, run 'update-grub' afterwards.\n\
GRUB_DEFAULT=0\n\
GRUB_TIMEOUT=1\n\
GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n\
GRUB_CMDLINE_LINUX=\"console=ttyS0 root=PARTUUID=6b2c1d00-02\"\n";

const STUB_UPDATE_INITRAMFS: &str = r#"#!/bin/bash
# Stub of update-initramfs for the host tests: like the real tool, writes each kernel's image to
# a new file and renames it over the old one; the image is a gzip'd newc cpio holding the
# initcrypt binary and volumes.json as the hook copies them.
set -e
case "$*" in "-u -k all"|-c\ -k\ *) ;; *) echo "stub update-initramfs: unexpected arguments $*" >&2; exit 2 ;; esac
echo "$*" >> "$STUB_LOG"
n=0
for m in "$ROOT"/lib/modules/*; do
	v=$(basename "$m")
	[ -e "$ROOT/boot/vmlinuz-$v" ] || continue
	if [ -n "$STUB_FAIL_INITRAMFS" ] && [ "$n" -ge "$STUB_FAIL_INITRAMFS" ]; then
		echo "update-initramfs: Generating /boot/initrd.img-$v" >&2
		echo "E: mkinitramfs failure cpio 141 gzip 1 (No space left on device)" >&2
		[ -n "$STUB_FREEZE" ] && chattr +i "$ROOT/$STUB_FREEZE"
		exit 1
	fi
	work=$(mktemp -d)
	mkdir -p "$work/usr/sbin" "$work/etc/initcrypt"
	cp "$ROOT/usr/sbin/initcrypt" "$work/usr/sbin/initcrypt"
	if [ -f "$ROOT/etc/initcrypt/volumes.json" ]; then cp "$ROOT/etc/initcrypt/volumes.json" "$work/etc/initcrypt/"; fi
	(cd "$work" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -n > "$ROOT/boot/initrd.img-$v.new"
	mv "$ROOT/boot/initrd.img-$v.new" "$ROOT/boot/initrd.img-$v"
	rm -rf "$work"
	n=$((n + 1))
done
"#;

const STUB_UPDATE_GRUB: &str = r#"#!/bin/bash
# Stub of update-grub: grub-mkconfig's root= rule (UUID unless GRUB_DISABLE_LINUX_UUID=true or
# /dev/disk/by-uuid lacks the root filesystem (STUB_NO_BYUUID), GRUB_FORCE_PARTUUID first) and the
# command-line variables, as 10_linux writes them.
set -e
echo "update-grub" >> "$STUB_LOG"
. "$ROOT/etc/default/grub"
for f in "$ROOT"/etc/default/grub.d/*.cfg; do [ -f "$f" ] && . "$f"; done
if [ -n "$GRUB_FORCE_PARTUUID" ]; then root="PARTUUID=$GRUB_FORCE_PARTUUID"
elif [ "$GRUB_DISABLE_LINUX_UUID" = true ] || [ -n "$STUB_NO_BYUUID" ]; then root="$STUB_ROOT_DEVICE"
else root="UUID=$STUB_ROOT_UUID"; fi
[ -n "$STUB_FAIL_GRUB" ] && { echo "grub-probe: error: failed to get canonical path of /dev/root" >&2; exit 1; }
out="$ROOT/boot/grub/grub.cfg"
{
	for m in "$ROOT"/lib/modules/*; do
		v=$(basename "$m")
		printf "menuentry 'Debian GNU/Linux, with Linux %s' {\n\tlinux\t/vmlinuz-%s root=%s ro %s %s\n\tinitrd\t/initrd.img-%s\n}\n" "$v" "$v" "$root" "$GRUB_CMDLINE_LINUX" "$GRUB_CMDLINE_LINUX_DEFAULT" "$v"
	done
} > "$out.new"
mv "$out.new" "$out"
"#;

const STUB_DRACUT: &str = r#"#!/bin/bash
# Stub of dracut -f --regenerate-all: Red Hat image names, the module's check() rule (included
# when volumes.json exists).
set -e
echo "dracut $*" >> "$STUB_LOG"
[ -n "$STUB_FAIL_INITRAMFS" ] && { echo "dracut: cannot write (No space left on device)" >&2; exit 1; }
for m in "$ROOT"/lib/modules/*; do
	v=$(basename "$m")
	work=$(mktemp -d)
	mkdir -p "$work/usr/lib/systemd"
	if [ -f "$ROOT/etc/initcrypt/volumes.json" ]; then
		mkdir -p "$work/usr/sbin" "$work/etc/initcrypt"
		cp "$ROOT/usr/sbin/initcrypt" "$work/usr/sbin/initcrypt"
		cp "$ROOT/etc/initcrypt/volumes.json" "$work/etc/initcrypt/"
	fi
	(cd "$work" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | zstd -q -c > "$ROOT/boot/initramfs-$v.img.tmp"
	mv "$ROOT/boot/initramfs-$v.img.tmp" "$ROOT/boot/initramfs-$v.img"
	rm -rf "$work"
done
"#;

/// A root tree (Debian-like, initramfs-tools, grub) in a temporary directory.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

fn write(p: &Path, text: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

fn exe(p: &Path, text: &str) {
    write(p, text);
    fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
}

impl Tree {
    pub fn new() -> Tree {
        let t = Tree {
            dir: tempfile::tempdir().unwrap(),
        };
        t.write("etc/fstab", FSTAB);
        t.write("etc/default/grub", GRUB_DEFAULTS);
        t.write("etc/debian_version", "12.8\n");
        t.write(
            "etc/crypttab",
            "# <target name> <source device> <key file> <options>\n",
        );
        t.write("usr/sbin/initcrypt", "\x7fELF initcrypt stand-in\n");
        exe(&t.path("usr/sbin/update-initramfs"), STUB_UPDATE_INITRAMFS);
        exe(&t.path("usr/sbin/update-grub"), STUB_UPDATE_GRUB);
        fs::create_dir_all(t.path("usr/lib/grub/i386-pc")).unwrap();
        t.add_kernel(KVER);
        t.write(
            "boot/grub/grub.cfg",
            &format!("menuentry 'Debian' {{\n\tlinux\t/vmlinuz-{KVER} root=PARTUUID={ROOT_PARTUUID} ro console=ttyS0 quiet\n\tinitrd\t/initrd.img-{KVER}\n}}\n"),
        );
        for d in ["proc", "sys", "dev", "data1", "mnt/azure_bek_disk"] {
            fs::create_dir_all(t.path(d)).unwrap();
        }
        t
    }

    /// A kernel with dm-crypt as a module and an initramfs made before initcrypt was installed.
    pub fn add_kernel(&self, v: &str) {
        self.write(&format!("boot/vmlinuz-{v}"), "kernel\n");
        self.write(
            &format!("lib/modules/{v}/kernel/drivers/md/dm-crypt.ko.xz"),
            "ko\n",
        );
        self.write(
            &format!("lib/modules/{v}/modules.builtin"),
            "kernel/drivers/md/dm-mod.ko\n",
        );
        let img = initramfs_image(&[("usr/lib/modules/x", b"x")]);
        fs::write(self.path(&format!("boot/initrd.img-{v}")), img).unwrap();
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        write(&self.path(rel), text);
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    pub fn digest(&self) -> BTreeMap<PathBuf, String> {
        initcrypt::lifecycle::atomic::tree_digest(self.root())
    }

    /// Switch the tree to dracut (Red Hat image names).
    pub fn use_dracut(&self) {
        fs::remove_file(self.path("usr/sbin/update-initramfs")).unwrap();
        fs::remove_file(self.path("etc/debian_version")).unwrap();
        exe(&self.path("usr/bin/dracut"), STUB_DRACUT);
        for e in fs::read_dir(self.path("boot")).unwrap().flatten() {
            let n = e.file_name().into_string().unwrap();
            if let Some(v) = n.strip_prefix("initrd.img-") {
                fs::rename(e.path(), self.path(&format!("boot/initramfs-{v}.img"))).unwrap();
            }
        }
    }
}

/// A gzip'd newc cpio image holding `files`.
pub fn initramfs_image(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |name: &str, data: &[u8], mode: u32| {
        out.extend_from_slice(
            format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                1,
                mode,
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0
            )
            .as_bytes(),
        );
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (n, d) in files {
        put(n, d, 0o100644);
    }
    put("TRAILER!!!", b"", 0);
    let mut child = Command::new("gzip")
        .arg("-nc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&out).unwrap();
    child.wait_with_output().unwrap().stdout
}

/// The machine the tree runs on.
pub struct Fake {
    pub root: PathBuf,
    pub devices: Vec<(Vec<String>, Device)>,
    pub mounts: HashMap<String, Mounted>,
    pub keyvol: Result<Vec<String>, String>,
    pub free: Option<u64>,
    pub users: HashMap<String, Vec<User>>,
    pub cmdline: Option<String>,
    pub running: Option<String>,
    pub observed: RefCell<HashMap<String, Observation>>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    _logdir: tempfile::TempDir,
}

pub fn dev(name: &str, disk: &str, part: Option<u32>, fstype: &str, uuid: &str) -> Device {
    Device {
        name: name.into(),
        disk: disk.into(),
        partition: part,
        size: 8 << 30,
        fstype: Some(fstype.into()),
        uuid: Some(uuid.into()),
        ..Default::default()
    }
}

fn mounted(target: &str, device: &str, fstype: &str) -> Mounted {
    Mounted {
        target: target.into(),
        device: Some(device.into()),
        fstype: fstype.into(),
        source: format!("/dev/{device}"),
    }
}

impl Fake {
    /// A VM with a GPT OS disk (vda1 /boot, vda2 /), a partitioned data disk on SCSI LUN 1 and a
    /// whole-disk xfs on LUN 2, all mounted as fstab says, and a key volume with the OS and LUN 1
    /// keys.
    pub fn vm(tree: &Tree) -> Fake {
        let logdir = tempfile::tempdir().unwrap();
        let mut root = dev("vda2", "vda", Some(2), "ext4", ROOT_UUID);
        root.partuuid = Some(ROOT_PARTUUID.into());
        let mut boot = dev("vda1", "vda", Some(1), "ext4", BOOT_UUID);
        boot.partuuid = Some(BOOT_PARTUUID.into());
        boot.size = 512 << 20;
        let mut d1 = dev("sdb1", "sdb", Some(1), "ext4", D1_UUID);
        d1.partuuid = Some(D1_PARTUUID.into());
        d1.scsi = Some((0, 1));
        let mut d2 = dev("sdc", "sdc", None, "xfs", D2_UUID);
        d2.scsi = Some((0, 2));
        d2.by_path = Some(D2_BYPATH.into());
        let devices = vec![
            (
                vec![
                    format!("UUID={ROOT_UUID}"),
                    format!("PARTUUID={ROOT_PARTUUID}"),
                    "/dev/vda2".into(),
                ],
                root,
            ),
            (
                vec![
                    format!("UUID={BOOT_UUID}"),
                    format!("PARTUUID={BOOT_PARTUUID}"),
                    "/dev/vda1".into(),
                ],
                boot,
            ),
            (
                vec![
                    format!("UUID={D1_UUID}"),
                    format!("PARTUUID={D1_PARTUUID}"),
                    "/dev/sdb1".into(),
                ],
                d1,
            ),
            (
                vec![
                    format!("UUID={D2_UUID}"),
                    format!("/dev/disk/by-path/{D2_BYPATH}"),
                    "/dev/sdc".into(),
                ],
                d2,
            ),
        ];
        let mut mounts = HashMap::new();
        for (t, d, f) in [
            ("/", "vda2", "ext4"),
            ("/boot", "vda1", "ext4"),
            ("/data1", "sdb1", "ext4"),
            ("/data1/logs", "sdc", "xfs"),
        ] {
            mounts.insert(t.to_string(), mounted(t, d, f));
        }
        let log = logdir.path().join("tools.log");
        Fake {
            root: tree.root().to_path_buf(),
            devices,
            mounts,
            keyvol: Ok(vec![
                "LinuxPassPhraseFileName".into(),
                "LinuxPassPhraseFileName_0_1".into(),
            ]),
            free: Some(400 << 20),
            users: HashMap::new(),
            cmdline: Some(format!(
                "BOOT_IMAGE=/vmlinuz-{KVER} root=PARTUUID={ROOT_PARTUUID} ro console=ttyS0"
            )),
            running: Some(KVER.into()),
            observed: RefCell::new(HashMap::new()),
            env: vec![
                ("STUB_ROOT_UUID".into(), ROOT_UUID.into()),
                ("STUB_ROOT_DEVICE".into(), "/dev/vda2".into()),
            ],
            log,
            _logdir: logdir,
        }
    }

    pub fn target(&self) -> Target<'_> {
        Target {
            machine: self,
            root: self.root.clone(),
            offline: false,
        }
    }

    pub fn set_env(&mut self, k: &str, v: &str) {
        self.env.retain(|(x, _)| x != k);
        self.env.push((k.into(), v.into()));
    }

    pub fn observe_as(&self, name: &str, o: Observation) {
        self.observed.borrow_mut().insert(name.into(), o);
    }

    pub fn device_mut(&mut self, name: &str) -> &mut Device {
        &mut self
            .devices
            .iter_mut()
            .find(|(_, d)| d.name == name)
            .unwrap()
            .1
    }

    /// Add a device-mapper device (an open mapping) named `dm_name` on kernel name `below`.
    pub fn add_mapping(
        &mut self,
        kernel: &str,
        dm_name: &str,
        kind: &str,
        below: &str,
        fs_uuid: &str,
    ) {
        let mut d = dev(kernel, kernel, None, "ext4", fs_uuid);
        d.dm = Some(Dm {
            name: dm_name.into(),
            kind: kind.into(),
            slaves: vec![below.into()],
        });
        self.devices.push((
            vec![format!("/dev/mapper/{dm_name}"), format!("/dev/{kernel}")],
            d,
        ));
    }

    pub fn tool_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Machine for Fake {
    fn device(&self, spec: &str) -> Option<Device> {
        let spec = spec.to_string();
        let lower = spec.to_ascii_lowercase();
        self.devices
            .iter()
            .find(|(specs, _)| {
                specs
                    .iter()
                    .any(|s| *s == spec || s.to_ascii_lowercase() == lower)
            })
            .map(|(_, d)| d.clone())
    }

    fn device_by_name(&self, name: &str) -> Option<Device> {
        self.devices
            .iter()
            .find(|(_, d)| d.name == name)
            .map(|(_, d)| d.clone())
    }

    fn mounted_at(&self, target: &str) -> Option<Mounted> {
        self.mounts.get(target).cloned()
    }

    fn key_volume(&self) -> Result<Vec<String>, String> {
        self.keyvol.clone()
    }

    fn free_bytes(&self, _path: &Path) -> Option<u64> {
        self.free
    }

    fn users_of(&self, target: &str) -> Vec<User> {
        self.users.get(target).cloned().unwrap_or_default()
    }

    fn cmdline(&self) -> Option<String> {
        self.cmdline.clone()
    }

    fn running_kernel(&self) -> Option<String> {
        self.running.clone()
    }

    fn mem_total(&self) -> Option<u64> {
        Some(2 << 30)
    }

    fn observe(&self, v: &Volume) -> Observation {
        self.observed
            .borrow()
            .get(&v.name)
            .cloned()
            .unwrap_or(Observation::Plaintext)
    }

    fn exec(&self, tool: &Path, args: &[&str]) -> std::io::Result<Output> {
        let path = self.root.join(tool.strip_prefix("/").unwrap_or(tool));
        Command::new(path)
            .args(args)
            .env("ROOT", &self.root)
            .env("STUB_LOG", &self.log)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
    }
}
