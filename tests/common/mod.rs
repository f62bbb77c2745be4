//! Helpers for host integration tests: images made by the real tools (mkfs.vfat, mcopy, sfdisk,
//! cryptsetup) on plain files, no root-only kernel features.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Run a tool, failing the test with its stderr when it fails or is missing: a missing tool must
/// fail loudly, never skip (the README's test command installs them all).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} (install it; the README test command does): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn truncate(path: &Path, size: &str) {
    run("truncate", &["-s", size, path.to_str().unwrap()]);
}

/// An ADE-like passphrase: base64 of 127 random bytes, 172 characters, no newline.
pub fn ade_passphrase(seed: u8) -> Vec<u8> {
    let raw: Vec<u8> = (0..127u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    for c in raw.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        let chars = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        let keep = c.len() + 1;
        for (i, ch) in chars.iter().enumerate() {
            out.push(if i < keep { table[*ch as usize] } else { b'=' });
        }
    }
    assert_eq!(out.len(), 172);
    out
}

/// Layout of a key volume image.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    Whole,
    Mbr,
    Gpt,
}

/// Make a FAT image labelled `label` holding `files`; returns its path.
pub fn fat_image(
    dir: &Path,
    name: &str,
    fat: u8,
    layout: Layout,
    label: &str,
    files: &[(&str, &[u8])],
) -> PathBuf {
    let img = dir.join(name);
    let size_mib: u64 = if fat == 32 { 64 } else { 16 };
    truncate(&img, &format!("{size_mib}M"));
    let offset_sectors = match layout {
        Layout::Whole => 0,
        Layout::Mbr => {
            sfdisk(&img, "label: dos\nstart=2048, type=c\n");
            2048
        }
        Layout::Gpt => {
            let script = format!(
                "label: gpt\nstart=2048, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
                gpt_part_sectors(size_mib)
            );
            sfdisk(&img, &script);
            2048
        }
    };
    let blocks = match layout {
        Layout::Gpt => (gpt_part_sectors(size_mib) / 2).to_string(),
        _ => ((size_mib * 1024) - offset_sectors / 2).to_string(),
    };
    let fatarg = fat.to_string();
    let off = offset_sectors.to_string();
    let mut args = vec!["-F", &fatarg, "-n", label];
    if offset_sectors > 0 {
        args.extend(["--offset", &off]);
    }
    if fat == 32 {
        args.extend(["-s", "1"]);
    }
    let imgs = img.to_str().unwrap().to_string();
    args.push(&imgs);
    args.push(&blocks);
    run("mkfs.vfat", &args);
    let target = if offset_sectors > 0 {
        format!("{}@@{}", imgs, offset_sectors * 512)
    } else {
        imgs.clone()
    };
    for (fname, content) in files {
        let src = dir.join(format!("src-{fname}"));
        std::fs::write(&src, content).unwrap();
        run(
            "mcopy",
            &["-i", &target, src.to_str().unwrap(), &format!("::/{fname}")],
        );
    }
    img
}

/// The partition fills the disk but for the 1 MiB in front and room for the backup GPT at the end.
fn gpt_part_sectors(size_mib: u64) -> u64 {
    size_mib * 2048 - 2048 - 2048
}

fn sfdisk(img: &Path, script: &str) {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .args(["-q", img.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (fdisk package) is required");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
}

/// Stock `cryptsetup reencrypt --encrypt` of an image file with a new detached LUKS2 header, as ADE
/// lays it out (data offset 0), with the fast PBKDF the tests use; `extra` adds options.
pub fn stock_encrypt(img: &Path, hdr: &Path, key: &Path, extra: &[&str]) {
    truncate(hdr, "4K");
    let mut args = vec![
        "-q",
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ];
    args.extend_from_slice(extra);
    let (h, k, i) = (
        hdr.to_str().unwrap(),
        key.to_str().unwrap(),
        img.to_str().unwrap(),
    );
    args.extend(["--header", h, "--key-file", k, i]);
    run("cryptsetup", &args);
}

pub fn sha256(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

pub fn initcrypt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_initcrypt"))
}
