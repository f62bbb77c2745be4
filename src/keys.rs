//! Key delivery to the stock unlockers: key files in /run/cryptsetup-keys.d for systemd-cryptsetup
//! (crypttab key field `none`), and the initramfs-tools `keyscript=` contract (key on stdout).
//!
//! Key files exist only in /run (tmpfs, gone at switch-root's end), mode 0400, written atomically so
//! systemd-cryptsetup never reads a half-written key, and removed once the mappings are open.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::boot;
use crate::config::{self, BootParams, Desired, Role, Volume, ADE_OS_NAME};
use crate::exit::{Classify, Exit};
use crate::keyvol::{self, OS_KEY_FILE};
use crate::secret::Secret;

pub const KEY_DIR: &str = "/run/cryptsetup-keys.d";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    KeyVolume(#[from] keyvol::Error),
    #[error(transparent)]
    Boot(#[from] Box<boot::Error>),
    #[error("cannot write key file {path}: {source}; check that /run is a writable tmpfs")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove key file {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CRYPTTAB_NAME is not set; keyscript is meant to be run by cryptsetup's initramfs scripts for a crypttab line")]
    NoCrypttabName,
    #[error("cannot write the key to stdout: {0}")]
    Stdout(std::io::Error),
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Config(e) => e.exit(),
            Error::KeyVolume(e) => e.exit(),
            Error::Boot(e) => e.exit(),
            Error::NoCrypttabName => Exit::Usage,
            _ => Exit::PassFailed,
        }
    }
}

fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// Write `key` to `<dir>/<name>.key` with mode 0400: a temporary file in the same directory,
/// then rename, so a reader sees the whole key or none.
pub fn write_key_file(dir: &Path, name: &str, key: &Secret) -> Result<PathBuf, Error> {
    let path = key_path(dir, name);
    let werr = |e| Error::Write {
        path: path.clone(),
        source: e,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(werr)?;
    let tmp = dir.join(format!(".{name}.key.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)
        .map_err(werr)?;
    let written = f.write_all(key.expose()).and_then(|_| f.sync_all());
    if let Err(e) = written.and_then(|_| fs::rename(&tmp, &path)) {
        let _ = fs::remove_file(&tmp);
        return Err(werr(e));
    }
    Ok(path)
}

/// `initcrypt keys`: one key file per configured volume. Every volume is tried. The exit code is
/// the OS volume's failure (or the key volume's, when an OS volume is configured): that one stops
/// the boot. A data volume's failure is printed and its `nofail` systemd-cryptsetup unit fails by
/// itself, because a data disk must never stop the OS from booting.
pub fn write_all(config_path: &Path, params: &BootParams) -> Result<(), Error> {
    if params.skip {
        log::info!("disabled on the kernel command line (rd.initcrypt=0 or rd.ade=0)");
        return Ok(());
    }
    let configured = config::load(config_path, params)?;
    if configured.is_empty() {
        log::info!("no volumes configured; no key files written");
        return Ok(());
    }
    // Only volumes wanted encrypted are opened in the initrd. A volume wanted decrypted gets no key
    // file: its pass unit reads the key volume itself if a pass is still needed, so a VM already
    // decrypted boots without its BEK disk.
    let volumes: Vec<_> = configured
        .into_iter()
        .filter(|v| v.desired == Desired::Encrypted)
        .collect();
    if volumes.is_empty() {
        log::info!("no volume is wanted encrypted; no key files written");
        return Ok(());
    }
    let has_os = volumes.iter().any(|v| v.role == Role::Os);
    let keyvols = match keyvol::find(params.keyvol_timeout) {
        Ok(k) => k,
        Err(e) if !has_os => {
            log::error!(
                "{e} (only data volumes need a key in the initrd: the OS boots, they stay closed)"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let keys = boot::Keys::with(keyvols, params.keyvol_timeout);
    let mut os_failure = None;
    for v in &volumes {
        let r = keys
            .key_for(v)
            .map_err(|e| Error::Boot(Box::new(e)))
            .and_then(|k| write_key_file(Path::new(KEY_DIR), &v.name, &k));
        match r {
            Ok(p) => log::info!("key for {} written to {}", v.name, p.display()),
            Err(e) if v.role == Role::Os => os_failure = Some(e),
            Err(e) => log::error!(
                "{e} (data volume {}: it stays closed, the OS boots)",
                v.name
            ),
        }
    }
    os_failure.map_or(Ok(()), Err)
}

/// `initcrypt keys --remove`: delete the key files of every configured volume.
pub fn remove_all(config_path: &Path, params: &BootParams) -> Result<(), Error> {
    let volumes = config::load(config_path, params)?;
    for v in &volumes {
        let path = key_path(Path::new(KEY_DIR), &v.name);
        match fs::remove_file(&path) {
            Ok(()) => log::info!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Remove { path, source: e }),
        }
    }
    Ok(())
}

/// The key file name for a crypttab name: the configured volume's, else ADE's convention.
fn key_file_for(volumes: &[Volume], crypttab_name: &str) -> String {
    match volumes.iter().find(|v| v.name == crypttab_name) {
        Some(v) => v.key_file.clone(),
        None if crypttab_name == ADE_OS_NAME => OS_KEY_FILE.to_string(),
        None => {
            log::warn!("{crypttab_name} is not in volumes.json; trying {OS_KEY_FILE}");
            OS_KEY_FILE.to_string()
        }
    }
}

/// `initcrypt keyscript`: print the key for `$CRYPTTAB_NAME` on stdout, exactly its bytes.
pub fn keyscript(config_path: &Path, params: &BootParams) -> Result<(), Error> {
    let name = std::env::var("CRYPTTAB_NAME").map_err(|_| Error::NoCrypttabName)?;
    let volumes = config::load(config_path, params)?;
    let found = keyvol::find(params.keyvol_timeout)?;
    let key = match volumes.iter().find(|v| v.name == name) {
        // A configured volume: its header chooses when several key volumes are attached.
        Some(v) => boot::Keys::with(found, params.keyvol_timeout)
            .key_for(v)
            .map_err(Box::new)?,
        None => found.key_for(&key_file_for(&volumes, &name))?,
    };
    let mut out = std::io::stdout().lock();
    out.write_all(key.expose())
        .and_then(|_| out.flush())
        .map_err(Error::Stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use zeroize::Zeroizing;

    #[test]
    fn key_file_is_0400_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let key = Secret::new(Zeroizing::new(b"abc==".to_vec()));
        let p = write_key_file(dir.path(), "osencrypt", &key).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc==");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o400
        );
        // Rewriting replaces it (a second boot step, or a rotated key).
        let key2 = Secret::new(Zeroizing::new(b"xyz".to_vec()));
        write_key_file(dir.path(), "osencrypt", &key2).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"xyz");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
