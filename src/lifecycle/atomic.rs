//! Changing an operator's files so that any failure leaves every file as it was.
//!
//! - `write_atomic`: temp file in the same directory, fsync, rename over the target, fsync the
//!   directory. A reader (or a power cut) sees the old file or the new one, never a mix.
//! - `Transaction`: every change `enable`/`disable` make is recorded with what is needed to undo
//!   it (the original bytes, mode and owner of a file; a directory created; the files a tool like
//!   update-initramfs or update-grub may rewrite). A failed step rolls back everything done before
//!   it, newest first; if the rollback fails too, both errors are reported (the habit of
//!   stratisd's RollbackError), so the operator knows exactly which file to restore.
//! - `Guard`: distribution tools replace their outputs (initramfs images, grub.cfg) by writing a
//!   new file and renaming it, so a hard link taken before the tool runs keeps the old bytes at no
//!   cost in space (a full /boot is one of the failures to survive). Where a hard link is not
//!   possible (vfat), a copy goes to the root filesystem instead.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::exit::{Classify, Exit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {path}: {source}; make it writable (read-only /etc? full filesystem?) and run again")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is a symbolic link; initcrypt replaces only regular files — point the edit at its target and run again")]
    Symlink { path: PathBuf },
    #[error("another initcrypt enable/disable holds {path}; wait for it to finish")]
    Locked { path: PathBuf },
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        Exit::LayoutUnsupported
    }
}

fn werr(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Sync a directory so that a rename or unlink inside it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Mode and owner a replaced file keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Attrs {
    fn of(meta: &fs::Metadata) -> Attrs {
        Attrs {
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }
}

/// Replace `path` with `bytes` atomically: temp file, fsync, rename, fsync of the directory.
/// `attrs` None: mode 0644, owned by whoever runs us (root).
pub fn write_atomic(path: &Path, bytes: &[u8], attrs: Option<Attrs>) -> Result<(), Error> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.initcrypt-{}.tmp", std::process::id()));
    let mode = attrs.map(|a| a.mode).unwrap_or(0o644);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed the mode given to open().
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(a) = attrs {
            rustix::fs::fchown(
                &f,
                Some(rustix::fs::Uid::from_raw(a.uid)),
                Some(rustix::fs::Gid::from_raw(a.gid)),
            )?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr(path))
}

/// A file's bytes and attributes, or None when it does not exist. A symlink is refused: writing
/// over it would replace the link, not the file it names.
pub fn read_original(path: &Path) -> Result<Option<(Vec<u8>, Attrs)>, Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::Symlink {
            path: path.to_path_buf(),
        }),
        Ok(m) => {
            let bytes = fs::read(path).map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(Some((bytes, Attrs::of(&m))))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// An exclusive lock for one enable/disable at a time, on the root's /etc directory itself (so
/// taking it creates no file).
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn take(etc: &Path) -> Result<Lock, Error> {
        let file = File::open(etc).map_err(|source| Error::Read {
            path: etc.to_path_buf(),
            source,
        })?;
        // A short, bounded wait: a lock can outlive its holder by a fork→exec window of a
        // process that spawned a child at the wrong instant (threaded callers, e.g. tests).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Lock { _file: file }),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(_) => {
                    return Err(Error::Locked {
                        path: etc.to_path_buf(),
                    })
                }
            }
        }
    }
}

fn hash_file(path: &Path) -> std::io::Result<u128> {
    let mut f = File::open(path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.digest128())
}

/// One file a tool may replace, and how to get its old bytes back.
#[derive(Debug)]
struct Guarded {
    path: PathBuf,
    backup: PathBuf,
    linked: bool,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    hash: u128,
}

/// The files of one directory that a tool may rewrite (those whose names `wanted` accepts).
#[derive(Debug)]
pub struct Guard {
    dir: PathBuf,
    wanted: fn(&str) -> bool,
    files: Vec<Guarded>,
    /// Names (files and symlinks) present before the tool ran.
    before: Vec<String>,
}

fn names_in(dir: &Path, wanted: fn(&str) -> bool) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| wanted(n) && !n.ends_with(ROLLBACK_SUFFIX))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const ROLLBACK_SUFFIX: &str = ".initcrypt-rollback";

fn same_state(m: &fs::Metadata, g: &Guarded) -> bool {
    m.ino() == g.ino && m.len() == g.len && (m.mtime(), m.mtime_nsec()) == g.mtime
}

impl Guard {
    /// Take a rollback copy of each wanted regular file in `dir`; `spill` is where copies go when
    /// a hard link cannot be made.
    fn take(
        dir: &Path,
        wanted: fn(&str) -> bool,
        spill: &mut dyn FnMut() -> Result<PathBuf, Error>,
    ) -> Result<Guard, Error> {
        let before = names_in(dir, wanted);
        let mut files = Vec::new();
        for name in &before {
            let path = dir.join(name);
            let Ok(m) = fs::symlink_metadata(&path) else {
                continue;
            };
            if !m.file_type().is_file() {
                continue;
            }
            let hash = hash_file(&path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            let link = dir.join(format!(".{name}{ROLLBACK_SUFFIX}"));
            let _ = fs::remove_file(&link);
            let (backup, linked) = match fs::hard_link(&path, &link) {
                Ok(()) => (link, true),
                Err(_) => {
                    let copy = spill()?.join(format!("{name}{ROLLBACK_SUFFIX}"));
                    fs::copy(&path, &copy).map_err(werr(&copy))?;
                    (copy, false)
                }
            };
            files.push(Guarded {
                path,
                backup,
                linked,
                ino: m.ino(),
                len: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                hash,
            });
        }
        Ok(Guard {
            dir: dir.to_path_buf(),
            wanted,
            files,
            before,
        })
    }

    /// Put every changed file back and remove the files the tool created. Errors are collected.
    fn restore(&self, errors: &mut Vec<String>) {
        for g in &self.files {
            let unchanged = fs::symlink_metadata(&g.path)
                .map(|m| same_state(&m, g))
                .unwrap_or(false);
            if !unchanged {
                let put_back = if g.linked {
                    fs::rename(&g.backup, &g.path)
                } else {
                    fs::read(&g.backup).and_then(|b| {
                        let attrs = fs::metadata(&g.backup).ok().map(|m| Attrs::of(&m));
                        write_atomic(&g.path, &b, attrs)
                            .map_err(|e| std::io::Error::other(e.to_string()))
                    })
                };
                if let Err(e) = put_back {
                    errors.push(format!("cannot restore {}: {e}", g.path.display()));
                    continue;
                }
            }
            match hash_file(&g.path) {
                Ok(h) if h == g.hash => {}
                Ok(_) => errors.push(format!(
                    "{} was rewritten in place and its old bytes are lost; rebuild it with the distribution's tool",
                    g.path.display()
                )),
                Err(e) => errors.push(format!("cannot read back {}: {e}", g.path.display())),
            }
        }
        for name in names_in(&self.dir, self.wanted) {
            if !self.before.contains(&name) {
                let p = self.dir.join(&name);
                if let Err(e) = fs::remove_file(&p) {
                    errors.push(format!(
                        "cannot remove {} (made by the failed step): {e}",
                        p.display()
                    ));
                }
            }
        }
        self.drop_backups();
        let _ = sync_dir(&self.dir);
    }

    fn drop_backups(&self) {
        for g in &self.files {
            let _ = fs::remove_file(&g.backup);
        }
    }
}

#[derive(Debug)]
enum Undo {
    /// A file replaced or created: its old bytes and attributes (None: it did not exist).
    File {
        path: PathBuf,
        original: Option<(Vec<u8>, Attrs)>,
    },
    /// A directory created (removed again when empty).
    Dir(PathBuf),
    Guard(Guard),
}

/// Every change of one enable/disable, undoable as a whole.
#[derive(Debug)]
pub struct Transaction {
    undo: Vec<Undo>,
    /// Where rollback copies go when a hard link is impossible (on the root filesystem).
    spill: PathBuf,
    /// Files written, for the report.
    changed: Vec<PathBuf>,
}

/// A failed step, and what its rollback could not undo (empty: everything is as before).
#[derive(Debug)]
pub struct RollbackFailure(pub Vec<String>);

impl Transaction {
    pub fn new(spill: PathBuf) -> Transaction {
        Transaction {
            undo: Vec::new(),
            spill,
            changed: Vec::new(),
        }
    }

    fn create_dirs(&mut self, dir: &Path) -> Result<(), Error> {
        let mut missing = Vec::new();
        let mut d = dir;
        while !d.exists() {
            missing.push(d.to_path_buf());
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        for m in missing.into_iter().rev() {
            fs::create_dir(&m).map_err(werr(&m))?;
            self.undo.push(Undo::Dir(m));
        }
        Ok(())
    }

    /// Make `path` hold `bytes` (atomically), keeping its mode and owner; a file with these bytes
    /// already is left alone, so running a command twice changes nothing the second time.
    pub fn write(&mut self, path: &Path, bytes: &[u8], new_mode: u32) -> Result<(), Error> {
        let original = read_original(path)?;
        if original.as_ref().is_some_and(|(b, _)| b == bytes) {
            return Ok(());
        }
        self.create_dirs(parent_of(path))?;
        let attrs = original.as_ref().map(|(_, a)| *a).or(Some(Attrs {
            mode: new_mode,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }));
        write_atomic(path, bytes, attrs)?;
        self.undo.push(Undo::File {
            path: path.to_path_buf(),
            original,
        });
        self.changed.push(path.to_path_buf());
        Ok(())
    }

    /// Remove `path` (nothing to do when it does not exist).
    pub fn remove(&mut self, path: &Path) -> Result<(), Error> {
        let Some(original) = read_original(path)? else {
            return Ok(());
        };
        fs::remove_file(path).map_err(werr(path))?;
        sync_dir(parent_of(path)).map_err(werr(path))?;
        self.undo.push(Undo::File {
            path: path.to_path_buf(),
            original: Some(original),
        });
        self.changed.push(path.to_path_buf());
        Ok(())
    }

    /// Before a tool rewrites files of `dir` whose names `wanted` accepts: keep their old bytes.
    pub fn guard(&mut self, dir: &Path, wanted: fn(&str) -> bool) -> Result<(), Error> {
        if !dir.is_dir() {
            return Ok(());
        }
        let spill_dir = self.spill.clone();
        let mut created = Vec::new();
        let mut spill = || -> Result<PathBuf, Error> {
            let mut d = spill_dir.as_path();
            let mut missing = Vec::new();
            while !d.exists() {
                missing.push(d.to_path_buf());
                d = parent_of(d);
            }
            for m in missing.into_iter().rev() {
                fs::create_dir(&m).map_err(werr(&m))?;
                created.push(m);
            }
            Ok(spill_dir.clone())
        };
        let taken = Guard::take(dir, wanted, &mut spill);
        self.undo.extend(created.into_iter().map(Undo::Dir));
        let g = taken?;
        self.undo.push(Undo::Guard(g));
        Ok(())
    }

    /// Files this transaction wrote or removed.
    pub fn changed(&self) -> &[PathBuf] {
        &self.changed
    }

    /// Keep every change; drop the rollback copies.
    pub fn commit(self) {
        for u in &self.undo {
            if let Undo::Guard(g) = u {
                g.drop_backups();
            }
        }
        let _ = fs::remove_dir(&self.spill);
    }

    /// Undo every change, newest first. Returns what could not be undone.
    pub fn rollback(self) -> Result<(), RollbackFailure> {
        let mut errors = Vec::new();
        for u in self.undo.into_iter().rev() {
            match u {
                Undo::File { path, original } => {
                    let r = match original {
                        Some((bytes, attrs)) => write_atomic(&path, &bytes, Some(attrs)),
                        None => fs::remove_file(&path)
                            .or_else(|e| {
                                if e.kind() == std::io::ErrorKind::NotFound {
                                    Ok(())
                                } else {
                                    Err(e)
                                }
                            })
                            .and_then(|()| sync_dir(parent_of(&path)))
                            .map_err(werr(&path)),
                    };
                    if let Err(e) = r {
                        errors.push(e.to_string());
                    }
                }
                Undo::Dir(d) => {
                    let _ = fs::remove_dir(&d);
                }
                Undo::Guard(g) => g.restore(&mut errors),
            }
        }
        let _ = fs::remove_dir(&self.spill);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RollbackFailure(errors))
        }
    }
}

/// Snapshot of a tree (path → content hash, mode, link target), for tests that prove a failed
/// command left every file as it was.
pub fn tree_digest(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            let desc = if m.file_type().is_symlink() {
                format!(
                    "link {}",
                    fs::read_link(&p)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                )
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                format!(
                    "file {:o} {:032x}",
                    m.mode() & 0o7777,
                    hash_file(&p).unwrap_or(0)
                )
            };
            out.insert(rel, desc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_keeps_mode_and_rollback_restores() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("etc/fstab");
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, b"old\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
        let before = tree_digest(d.path());
        let mut tx = Transaction::new(d.path().join("spill"));
        tx.write(&f, b"new\n", 0o644).unwrap();
        tx.write(&d.path().join("etc/initcrypt/volumes.json"), b"{}", 0o644)
            .unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"new\n");
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o640);
        tx.rollback().unwrap();
        assert_eq!(tree_digest(d.path()), before);
    }

    #[test]
    fn guard_restores_replaced_and_removes_new_files() {
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join("initrd.img-6.1"), b"old image").unwrap();
        fs::write(boot.join("vmlinuz-6.1"), b"kernel").unwrap();
        let before = tree_digest(d.path());
        let mut tx = Transaction::new(d.path().join("spill"));
        tx.guard(&boot, |n| n.starts_with("initrd")).unwrap();
        // what update-initramfs does: write a new file, rename it over the old one
        fs::write(boot.join("initrd.img-6.1.new"), b"new image").unwrap();
        fs::rename(boot.join("initrd.img-6.1.new"), boot.join("initrd.img-6.1")).unwrap();
        fs::write(boot.join("initrd.img-6.2"), b"another").unwrap();
        tx.rollback().unwrap();
        assert_eq!(tree_digest(d.path()), before);
    }

    #[test]
    fn guard_reports_a_file_rewritten_in_place() {
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join("initrd.img-6.1"), b"old image").unwrap();
        let mut tx = Transaction::new(d.path().join("spill"));
        tx.guard(&boot, |n| n.starts_with("initrd")).unwrap();
        let mut f = OpenOptions::new()
            .write(true)
            .open(boot.join("initrd.img-6.1"))
            .unwrap();
        f.write_all(b"NEW").unwrap();
        drop(f);
        let err = tx.rollback().unwrap_err();
        assert!(err.0[0].contains("rewritten in place"), "{:?}", err.0);
    }

    #[test]
    fn commit_leaves_no_rollback_copies() {
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join("initrd.img-6.1"), b"old").unwrap();
        let mut tx = Transaction::new(d.path().join("spill"));
        tx.guard(&boot, |n| n.starts_with("initrd")).unwrap();
        tx.commit();
        let names: Vec<_> = fs::read_dir(&boot)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            ["initrd.img-6.1"],
            "no .initcrypt-rollback link left"
        );
    }
}
