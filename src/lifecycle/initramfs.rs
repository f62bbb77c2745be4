//! The initramfs images of a root tree: which builder makes them, which kernels they belong to,
//! rebuilding them with the distribution's own tool, and reading what an image carries.
//!
//! Reading an image is done here rather than through `lsinitramfs`/`lsinitrd`: `status` must
//! compare the volumes.json *inside* the running kernel's image with the one on disk (that is
//! what makes a state `VMRestartPending`, never a flag file), and `enable` checks the same thing
//! for every kernel after a rebuild. One reader serves both builders: an initramfs is a sequence
//! of newc cpio archives, the first ones often uncompressed (CPU microcode), the last one
//! compressed; compressed parts are piped through the system's own decompressor.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::bootcfg::find_tool;
use super::machine::Machine;
use crate::exit::{Classify, Exit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("neither initramfs-tools (update-initramfs) nor dracut is installed in {root}; install one (apt-get install initramfs-tools) and run again")]
    NoBuilder { root: String },
    #[error("{tool} failed ({status}): {detail}; fix what it reports and run again")]
    Tool {
        tool: String,
        status: String,
        detail: String,
    },
    #[error("the initramfs of kernel {kernel} ({image}) {what} after the rebuild; check the builder's configuration (is initcrypt's hook/module installed?) and run again")]
    Verify {
        kernel: String,
        image: String,
        what: String,
    },
    #[error("cannot read initramfs {image}: {why}")]
    Read { image: String, why: String },
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        Exit::LayoutUnsupported
    }
}

/// The distribution's initramfs builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Builder {
    InitramfsTools { tool: PathBuf },
    Dracut { tool: PathBuf },
}

impl Builder {
    /// initramfs-tools when `update-initramfs` is there (Debian's default), else dracut.
    pub fn detect(root: &Path) -> Option<Builder> {
        if let Some(tool) = find_tool(root, &["update-initramfs"]) {
            return Some(Builder::InitramfsTools { tool });
        }
        find_tool(root, &["dracut"]).map(|tool| Builder::Dracut { tool })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Builder::InitramfsTools { .. } => "initramfs-tools",
            Builder::Dracut { .. } => "dracut",
        }
    }

    pub fn tool(&self) -> &Path {
        match self {
            Builder::InitramfsTools { tool } | Builder::Dracut { tool } => tool,
        }
    }
}

/// An installed kernel: its version, where its initramfs is (or goes) and whether it has dm-crypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub version: String,
    /// Host path of its initramfs image (it may not exist yet).
    pub image: PathBuf,
    pub dm_crypt: bool,
}

/// dm-crypt built in or shipped as a module for this kernel.
fn has_dm_crypt(moddir: &Path) -> bool {
    let builtin = std::fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    if builtin.lines().any(|l| l.ends_with("/dm-crypt.ko")) {
        return true;
    }
    std::fs::read_dir(moddir.join("kernel/drivers/md"))
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("dm-crypt.ko"))
        })
        .unwrap_or(false)
}

/// Kernels installed in `root`: a `lib/modules/<version>` with a kernel image for it
/// (`boot/vmlinuz-<version>`, or `lib/modules/<version>/vmlinuz` on BLS systems).
pub fn kernels(root: &Path) -> Vec<Kernel> {
    let mods = root.join("lib/modules");
    let mut out: Vec<Kernel> = std::fs::read_dir(&mods)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|v| {
                    root.join(format!("boot/vmlinuz-{v}")).exists()
                        || mods.join(v).join("vmlinuz").exists()
                })
                .map(|v| Kernel {
                    image: image_path(root, &v),
                    dm_crypt: has_dm_crypt(&mods.join(&v)),
                    version: v,
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out
}

/// Where a kernel's initramfs is: the existing one of Debian's and Red Hat's names, else Debian's
/// name on Debian-like trees (both builders use it there) and Red Hat's elsewhere.
pub fn image_path(root: &Path, version: &str) -> PathBuf {
    let debian = root.join(format!("boot/initrd.img-{version}"));
    let redhat = root.join(format!("boot/initramfs-{version}.img"));
    if debian.exists() {
        debian
    } else if redhat.exists() || !root.join("etc/debian_version").exists() {
        redhat
    } else {
        debian
    }
}

/// Names in /boot that a rebuild may write (for the rollback guard).
pub fn is_image_name(n: &str) -> bool {
    n.starts_with("initrd") || n.starts_with("initramfs")
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let keep = &lines[lines.len().saturating_sub(3)..];
    let joined = keep.join(" | ");
    if joined.is_empty() {
        "no output".into()
    } else {
        joined
    }
}

/// Run a tool of the tree through the machine; a failure is one error with the end of its output.
pub fn run_tool(m: &dyn Machine, tool: &Path, args: &[&str]) -> Result<(), Error> {
    let shown = format!("{} {}", tool.display(), args.join(" "));
    let out = m.exec(tool, args).map_err(|e| Error::Tool {
        tool: shown.clone(),
        status: "not started".into(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut both = out.stderr.clone();
    both.extend_from_slice(&out.stdout);
    Err(Error::Tool {
        tool: shown,
        status: out.status.to_string(),
        detail: tail(&out.stderr).replace("no output", &tail(&both)),
    })
}

/// Rebuild the image of every installed kernel with the distribution's tool.
pub fn rebuild(
    m: &dyn Machine,
    builder: &Builder,
    kernels: &[Kernel],
    offline: bool,
) -> Result<(), Error> {
    match builder {
        Builder::InitramfsTools { tool } => {
            // -u only updates images that exist; a kernel without one gets it created.
            if kernels.iter().any(|k| k.image.exists()) {
                run_tool(m, tool, &["-u", "-k", "all"])?;
            }
            for k in kernels.iter().filter(|k| !k.image.exists()) {
                run_tool(m, tool, &["-c", "-k", &k.version])?;
            }
            Ok(())
        }
        Builder::Dracut { tool } => {
            // An image prepared offline boots on hardware dracut cannot see from the chroot.
            let mut args = vec!["-f", "--regenerate-all"];
            if offline {
                args.push("--no-hostonly");
            }
            run_tool(m, tool, &args)
        }
    }
}

/// What an initramfs image carries, as far as initcrypt cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    pub initcrypt: bool,
    pub volumes_json: Option<Vec<u8>>,
}

const VOLUMES_JSON: &str = "etc/initcrypt/volumes.json";
const MAX_JSON: u64 = 1 << 20;

fn norm(name: &str) -> &str {
    name.trim_start_matches("./").trim_start_matches('/')
}

fn hex(field: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(field).ok()?, 16).ok()
}

/// Read newc cpio members from `r` until its end, noting what initcrypt looks for. `pos` counts
/// the bytes consumed (members are 4-byte aligned relative to the archive start).
pub fn scan_cpio<R: Read>(r: &mut R, c: &mut Contents) -> io::Result<()> {
    let mut pos: u64 = 0;
    let mut hdr = [0u8; 110];
    loop {
        // Between archives: zero padding up to the next magic.
        let mut first = [0u8; 1];
        loop {
            if r.read(&mut first)? == 0 {
                return Ok(());
            }
            pos += 1;
            if first[0] != 0 {
                break;
            }
        }
        hdr[0] = first[0];
        r.read_exact(&mut hdr[1..])?;
        pos += 109;
        if &hdr[..5] != b"07070" || !(hdr[5] == b'1' || hdr[5] == b'2') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a newc cpio archive",
            ));
        }
        let field = |i: usize| hex(&hdr[6 + i * 8..6 + (i + 1) * 8]);
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad cpio header");
        let size = field(6).ok_or_else(bad)?;
        let namesize = field(11).ok_or_else(bad)?;
        if namesize == 0 || namesize > 4096 {
            return Err(bad());
        }
        let mut name = vec![0u8; namesize as usize];
        r.read_exact(&mut name)?;
        pos += namesize;
        skip(r, pos.next_multiple_of(4) - pos)?;
        pos = pos.next_multiple_of(4);
        let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(&name)).into_owned();
        let n = norm(&name);
        if n == "TRAILER!!!" {
            skip(r, size)?;
        } else if n == VOLUMES_JSON && size <= MAX_JSON {
            let mut buf = vec![0u8; size as usize];
            r.read_exact(&mut buf)?;
            c.volumes_json = Some(buf);
        } else {
            if matches!(
                n,
                "usr/sbin/initcrypt" | "sbin/initcrypt" | "usr/bin/initcrypt"
            ) {
                c.initcrypt = true;
            }
            skip(r, size)?;
        }
        pos += size;
        skip(r, pos.next_multiple_of(4) - pos)?;
        pos = pos.next_multiple_of(4);
    }
}

fn skip<R: Read>(r: &mut R, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated cpio archive",
        ));
    }
    Ok(())
}

/// The decompressor for a compressed segment starting with `magic`.
fn decompressor(magic: &[u8]) -> Option<&'static [&'static str]> {
    Some(match magic {
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0xfd, b'7', b'z', b'X', ..] => &["xz", "-dc"],
        [0x5d, 0x00, 0x00, ..] => &["xz", "--format=lzma", "-dc"],
        [b'B', b'Z', b'h', ..] => &["bzip2", "-dc"],
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0x89, b'L', b'Z', b'O', ..] => &["lzop", "-dc"],
        _ => return None,
    })
}

/// Read an initramfs image: its uncompressed archives directly, then the compressed rest through
/// the matching decompressor.
pub fn inspect(image: &Path) -> Result<Contents, Error> {
    let err = |why: String| Error::Read {
        image: image.display().to_string(),
        why,
    };
    let mut file = File::open(image).map_err(|e| err(e.to_string()))?;
    let mut contents = Contents::default();
    let mut offset = 0u64;
    loop {
        // Find the next non-zero byte: the start of the next segment.
        let mut magic = [0u8; 6];
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| err(e.to_string()))?;
        let mut reader = BufReader::new(&file);
        let mut skipped = 0u64;
        let n = loop {
            let mut b = [0u8; 1];
            if reader.read(&mut b).map_err(|e| err(e.to_string()))? == 0 {
                return Ok(contents);
            }
            if b[0] != 0 {
                magic[0] = b[0];
                let got = reader
                    .read(&mut magic[1..])
                    .map_err(|e| err(e.to_string()))?;
                break got + 1;
            }
            skipped += 1;
        };
        offset += skipped;
        if magic[..n].starts_with(b"0707") {
            // Uncompressed archive: parse it from here and find where it ends.
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| err(e.to_string()))?;
            let mut counted = Counted {
                inner: BufReader::new(&file),
                n: 0,
            };
            scan_one_archive(&mut counted, &mut contents).map_err(|e| err(e.to_string()))?;
            offset += counted.n;
            continue;
        }
        let cmd = decompressor(&magic[..n]).ok_or_else(|| {
            err(format!(
                "unknown data at byte {offset} (magic {:02x?})",
                &magic[..n]
            ))
        })?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| err(e.to_string()))?;
        let stdin = file.try_clone().map_err(|e| err(e.to_string()))?;
        let mut child = Command::new(cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err(format!("cannot run {}: {e}", cmd[0])))?;
        let scanned = match child.stdout.take() {
            Some(mut out) => {
                let r = scan_cpio(&mut BufReader::new(&mut out), &mut contents);
                // Drain what is left so the decompressor does not die of SIGPIPE.
                let _ = io::copy(&mut out, &mut io::sink());
                r
            }
            None => Ok(()),
        };
        let status = child.wait().map_err(|e| err(e.to_string()))?;
        scanned.map_err(|e| err(e.to_string()))?;
        if !status.success() {
            return Err(err(format!("{} failed ({status})", cmd[0])));
        }
        return Ok(contents);
    }
}

/// One uncompressed archive up to and including its trailer.
fn scan_one_archive<R: Read>(r: &mut Counted<R>, c: &mut Contents) -> io::Result<()> {
    let start = r.n;
    let mut hdr = [0u8; 110];
    loop {
        r.read_exact(&mut hdr)?;
        if &hdr[..5] != b"07070" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a newc cpio archive",
            ));
        }
        let field = |i: usize| hex(&hdr[6 + i * 8..6 + (i + 1) * 8]);
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad cpio header");
        let size = field(6).ok_or_else(bad)?;
        let namesize = field(11).ok_or_else(bad)?;
        if namesize == 0 || namesize > 4096 {
            return Err(bad());
        }
        let mut name = vec![0u8; namesize as usize];
        r.read_exact(&mut name)?;
        let align = |r: &mut Counted<R>| {
            let rel = r.n - start;
            skip(r, rel.next_multiple_of(4) - rel)
        };
        align(r)?;
        let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(&name)).into_owned();
        let n = norm(&name);
        if n == VOLUMES_JSON && size <= MAX_JSON {
            let mut buf = vec![0u8; size as usize];
            r.read_exact(&mut buf)?;
            c.volumes_json = Some(buf);
        } else {
            if matches!(
                n,
                "usr/sbin/initcrypt" | "sbin/initcrypt" | "usr/bin/initcrypt"
            ) {
                c.initcrypt = true;
            }
            skip(r, size)?;
        }
        align(r)?;
        if n == "TRAILER!!!" {
            return Ok(());
        }
    }
}

struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// After a rebuild: every kernel's image exists, carries initcrypt and, when volumes.json exists,
/// exactly its bytes.
pub fn verify(kernels: &[Kernel], volumes_json: Option<&[u8]>) -> Result<(), Error> {
    for k in kernels {
        let fail = |what: &str| Error::Verify {
            kernel: k.version.clone(),
            image: k.image.display().to_string(),
            what: what.to_string(),
        };
        if !k.image.exists() {
            return Err(fail("was not written"));
        }
        let Some(want) = volumes_json else {
            continue;
        };
        let c = inspect(&k.image)?;
        if !c.initcrypt {
            return Err(fail("does not contain initcrypt"));
        }
        match c.volumes_json.as_deref() {
            Some(have) if have == want => {}
            Some(_) => return Err(fail("carries an older volumes.json")),
            None => return Err(fail("carries no volumes.json")),
        }
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A newc archive of (name, bytes) entries, as the builders write them.
    pub fn cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |name: &str, data: &[u8], mode: u32| {
            let namesize = name.len() + 1;
            out.extend_from_slice(
                format!(
                    "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                    1, mode, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, namesize, 0
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
        out
    }

    #[test]
    fn reads_uncompressed_then_gzip() {
        let d = tempfile::tempdir().unwrap();
        let early = cpio(&[("kernel/x86/microcode/GenuineIntel.bin", b"ucode")]);
        let main = cpio(&[
            ("usr/sbin/initcrypt", b"\x7fELF"),
            ("./etc/initcrypt/volumes.json", b"{\"version\":1}"),
        ]);
        let mainz = d.path().join("main.cpio");
        std::fs::write(&mainz, &main).unwrap();
        let gz = Command::new("gzip").arg("-c").arg(&mainz).output().unwrap();
        assert!(gz.status.success());
        let mut img = early.clone();
        img.resize(img.len().next_multiple_of(512), 0);
        img.extend_from_slice(&gz.stdout);
        let p = d.path().join("initrd.img");
        std::fs::write(&p, &img).unwrap();
        let c = inspect(&p).unwrap();
        assert!(c.initcrypt);
        assert_eq!(c.volumes_json.as_deref(), Some(&b"{\"version\":1}"[..]));
        // only the microcode archive: nothing of ours
        std::fs::write(&p, &early).unwrap();
        assert_eq!(inspect(&p).unwrap(), Contents::default());
        // garbage is an error, not a panic
        std::fs::write(&p, b"garbage").unwrap();
        assert!(inspect(&p).is_err());
    }
}
