//! LUKS volumes through libcryptsetup: one typed handle per volume, a short-lived libcryptsetup context
//! per operation (the library is not thread-safe and a context caches header state that a later
//! operation must re-read), and errors that say which device and what to do.
//!
//! Everything about the volume is read from its header (LUKS1 or LUKS2, any cipher, PBKDF, sector
//! size): volumes written by ADE or by stock cryptsetup open as they are.

use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::{
    CryptActivate, CryptPbkdf, CryptReencrypt, CryptRequirement, CryptVolumeKey,
};
use libcryptsetup_rs::consts::vals::{
    CryptKdf, CryptReencryptDirectionInfo, CryptReencryptModeInfo, EncryptionFormat, KeyslotInfo,
};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptParamsReencrypt,
    CryptPbkdfType, Either, LibcryptErr,
};
use zeroize::Zeroizing;

use crate::exit::{Classify, Exit};
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no LUKS header in {header} ({detail}); check that header and device belong together")]
    NotLuks { header: String, detail: String },
    #[error("LUKS header {header} is missing; restore it from backup (luksHeaderRestore) or check the boot partition")]
    HeaderMissing { header: String },
    #[error("the key from {key_file} is rejected by every keyslot of {device}; restore the matching key to the key volume (re-stamp the encryption settings) — nothing was written")]
    KeyRejected { device: String, key_file: String },
    #[error("cannot open {device} as /dev/mapper/{name}: {detail}")]
    Activate {
        device: String,
        name: String,
        detail: String,
    },
    #[error("libcryptsetup failed on {device} while {during}: {detail}")]
    Library {
        device: String,
        during: &'static str,
        detail: String,
    },
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::KeyRejected { .. } => Exit::KeyRejected,
            Error::HeaderMissing { .. } => Exit::DeviceMissing,
            _ => Exit::LayoutUnsupported,
        }
    }
}

fn errno_of(e: &LibcryptErr) -> Option<i32> {
    match e {
        LibcryptErr::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// What the header says about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub version: u8,
    pub uuid: String,
    /// A LUKS2 reencryption (ADE's online flow, or `cryptsetup reencrypt`) is unfinished.
    pub reencrypt_pending: bool,
}

/// The data-path parameters of a volume, as our pass engine needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataParams {
    pub cipher: String,
    pub mode: String,
    pub sector_size: u32,
    /// Data offset and IV offset in 512-byte sectors (both 0 for ADE's detached layout).
    pub data_offset: u64,
    pub iv_offset: u64,
    pub uuid: String,
    /// Bytes the data segment covers: `None` for LUKS2's `dynamic` (up to the device's end, in
    /// whole sectors) and for LUKS1; `Some` for a fixed segment (`--device-size`).
    pub segment_size: Option<u64>,
}

/// How a new header protects its keyslot. The default suits ADE's 127-random-byte passphrases:
/// a memory-hard KDF would only cost boot time and RAM (design §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatParams {
    pub sector_size: u32,
    pub uuid: uuid::Uuid,
    pub pbkdf2_iterations: u32,
}

/// libcryptsetup's floor for PBKDF2 iterations.
pub const MIN_PBKDF2_ITERATIONS: u32 = 1000;

/// A LUKS volume: its data device and where its header is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksVolume {
    data: PathBuf,
    /// Detached header file, or None when the header is at the start of `data`.
    header: Option<PathBuf>,
}

impl LuksVolume {
    pub fn new(data: &Path, header: Option<&Path>) -> Self {
        LuksVolume {
            data: data.to_path_buf(),
            header: header.map(Path::to_path_buf),
        }
    }

    fn header_path(&self) -> &Path {
        self.header.as_deref().unwrap_or(&self.data)
    }

    fn header_name(&self) -> String {
        self.header_path().display().to_string()
    }

    /// A fresh context with the header loaded.
    fn context(&self) -> Result<CryptDevice, Error> {
        if let Some(h) = &self.header {
            if !h.exists() {
                return Err(Error::HeaderMissing {
                    header: h.display().to_string(),
                });
            }
        }
        let init = match &self.header {
            Some(h) => {
                CryptInit::init_with_data_device(Either::Right((h.as_path(), self.data.as_path())))
            }
            None => CryptInit::init(&self.data),
        };
        let mut dev = init.map_err(|e| Error::Library {
            device: self.header_name(),
            during: "initialising",
            detail: e.to_string(),
        })?;
        dev.context_handle()
            .load::<()>(None, None)
            .map_err(|e| Error::NotLuks {
                header: self.header_name(),
                detail: e.to_string(),
            })?;
        match dev.format_handle().get_type() {
            Ok(EncryptionFormat::Luks1) | Ok(EncryptionFormat::Luks2) => Ok(dev),
            other => Err(Error::NotLuks {
                header: self.header_name(),
                detail: format!("type {other:?}"),
            }),
        }
    }

    /// Write a new LUKS2 header (aes-xts-plain64, 512-bit key, data offset 0) into the detached
    /// header file, for `data`, with one keyslot for `key`. Nothing is written to `data`.
    pub fn format_detached(
        header: &Path,
        data: &Path,
        key: &Secret,
        p: &FormatParams,
    ) -> Result<LuksVolume, Error> {
        let vol = LuksVolume::new(data, Some(header));
        let lib = |during: &'static str| {
            move |e: LibcryptErr| Error::Library {
                device: header.display().to_string(),
                during,
                detail: e.to_string(),
            }
        };
        let mut dev = CryptInit::init_with_data_device(Either::Right((header, data)))
            .map_err(lib("initialising"))?;
        let pbkdf = CryptPbkdfType {
            type_: CryptKdf::Pbkdf2,
            hash: Some("sha256".into()),
            time_ms: 0,
            iterations: p.pbkdf2_iterations.max(MIN_PBKDF2_ITERATIONS),
            max_memory_kb: 0,
            parallel_threads: 0,
            flags: CryptPbkdf::NO_BENCHMARK,
        };
        dev.settings_handle()
            .set_pbkdf_type(&pbkdf)
            .map_err(lib("setting the PBKDF"))?;
        let params = CryptParamsLuks2 {
            pbkdf: None,
            integrity: None,
            integrity_params: None,
            data_alignment: 0,
            data_device: Some(data.to_path_buf()),
            sector_size: p.sector_size,
            label: None,
            subsystem: None,
        };
        let mut pref: CryptParamsLuks2Ref =
            (&params).try_into().map_err(lib("preparing the format"))?;
        dev.context_handle()
            .format::<CryptParamsLuks2Ref>(
                EncryptionFormat::Luks2,
                ("aes", "xts-plain64"),
                Some(p.uuid),
                Either::Right(64),
                Some(&mut pref),
            )
            .map_err(lib("formatting the header"))?;
        dev.keyslot_handle()
            .add_by_key(None, None, key.expose(), CryptVolumeKey::empty())
            .map_err(lib("adding the keyslot"))?;
        Ok(vol)
    }

    /// The volume key and data parameters, unlocked with `key`. Wrong key: `KeyRejected`.
    pub fn volume_key(
        &self,
        key: &Secret,
        key_file: &str,
    ) -> Result<(Zeroizing<Vec<u8>>, DataParams), Error> {
        let mut dev = self.context()?;
        let lib = |during: &'static str| {
            let device = self.header_name();
            move |e: LibcryptErr| Error::Library {
                device,
                during,
                detail: e.to_string(),
            }
        };
        let size = dev.status_handle().get_volume_key_size().max(0) as usize;
        let mut vk = Zeroizing::new(vec![0u8; size]);
        let (_, got) = dev
            .volume_key_handle()
            .get(None, &mut vk, Some(key.expose()))
            .map_err(|e| self.activation_error(e, None, key_file))?;
        vk.truncate(got);
        let mut st = dev.status_handle();
        let params = DataParams {
            cipher: st.get_cipher().map_err(lib("reading the cipher"))?,
            mode: st
                .get_cipher_mode()
                .map_err(lib("reading the cipher mode"))?,
            sector_size: libcryptsetup_rs::get_sector_size(Some(&mut dev)).max(512) as u32,
            data_offset: dev.status_handle().get_data_offset(),
            iv_offset: dev.status_handle().get_iv_offset(),
            uuid: dev
                .status_handle()
                .get_uuid()
                .map(|u| u.to_string())
                .map_err(lib("reading the UUID"))?,
            segment_size: None,
        };
        let params = DataParams {
            segment_size: segment_size(&mut dev).map_err(|detail| Error::Library {
                device: self.header_name(),
                during: "reading the data segment",
                detail,
            })?,
            ..params
        };
        Ok((vk, params))
    }

    /// Finish a LUKS2 reencryption another tool left unfinished (ADE's online flow runs
    /// `cryptsetup reencrypt --encrypt --init-only`, then resumes in the running system), offline.
    /// libcryptsetup recovers an interrupted hotzone first when the metadata asks for it.
    pub fn resume_reencryption(&self, key: &Secret, key_file: &str) -> Result<(), Error> {
        std::fs::create_dir_all("/run/cryptsetup").ok();
        let params = |flags| CryptParamsReencrypt {
            mode: CryptReencryptModeInfo::Encrypt,
            direction: CryptReencryptDirectionInfo::Forward,
            resilience: "checksum".into(),
            hash: "sha256".into(),
            data_shift: 0,
            // 32 MiB hotzones keep a recovery after a crash short (the default is up to 1 GiB).
            max_hotzone_size: (32 << 20) / 512,
            device_size: 0,
            luks2: None,
            flags,
        };
        let mut dev = self.context()?;
        let init = dev.reencrypt_handle().reencrypt_init_by_passphrase(
            None,
            key.expose(),
            None,
            None,
            None,
            params(CryptReencrypt::RESUME_ONLY),
        );
        if let Err(first) = init {
            if matches!(errno_of(&first), Some(libc::EPERM) | Some(libc::ENOENT)) {
                return Err(self.activation_error(first, None, key_file));
            }
            log::info!("resume refused ({first}); running reencryption recovery first");
            dev = self.context()?;
            dev.reencrypt_handle()
                .reencrypt_init_by_passphrase(
                    None,
                    key.expose(),
                    None,
                    None,
                    None,
                    params(CryptReencrypt::RESUME_ONLY | CryptReencrypt::RECOVERY),
                )
                .map_err(|e| self.activation_error(e, None, key_file))?;
        }
        dev.reencrypt_handle()
            .reencrypt2::<()>(None, None)
            .map_err(|e| Error::Library {
                device: self.data.display().to_string(),
                during: "resuming the reencryption",
                detail: e.to_string(),
            })
    }

    /// Bytes already in the new (crypt) segments of an unfinished LUKS2 reencryption, read from the
    /// header's JSON metadata; None when the metadata does not say.
    pub fn reencrypted_bytes(&self) -> Option<u64> {
        let mut dev = self.context().ok()?;
        let json = dev.status_handle().dump_json().ok()?;
        let segments = json.get("segments")?.as_object()?;
        let done = segments
            .values()
            .filter(|s| s.get("type").and_then(|t| t.as_str()) == Some("crypt"))
            .filter_map(|s| s.get("size")?.as_str()?.parse::<u64>().ok())
            .sum();
        Some(done)
    }

    pub fn info(&self) -> Result<Info, Error> {
        let mut dev = self.context()?;
        let version = match dev.format_handle().get_type() {
            Ok(EncryptionFormat::Luks1) => 1,
            _ => 2,
        };
        let uuid = dev
            .status_handle()
            .get_uuid()
            .map(|u| u.to_string())
            .map_err(|e| Error::Library {
                device: self.header_name(),
                during: "reading the UUID",
                detail: e.to_string(),
            })?;
        let reencrypt_pending = version == 2
            && dev
                .luks2_flag_handle::<CryptRequirement>()
                .persistent_flags_get()
                .map(|f| {
                    f.intersects(
                        CryptRequirement::ONLINE_REENCRYPT | CryptRequirement::OFFLINE_REENCRYPT,
                    )
                })
                .unwrap_or(false);
        Ok(Info {
            version,
            uuid,
            reencrypt_pending,
        })
    }

    /// Check `key` against the keyslots without activating anything; returns the keyslot.
    pub fn check_key(&self, key: &Secret, key_file: &str) -> Result<u32, Error> {
        let mut dev = self.context()?;
        dev.activate_handle()
            .activate_by_passphrase(None, None, key.expose(), CryptActivate::empty())
            .map_err(|e| self.activation_error(e, None, key_file))
    }

    /// Open the mapping `/dev/mapper/<name>`; returns the keyslot that matched.
    pub fn activate(&self, name: &str, key: &Secret, key_file: &str) -> Result<u32, Error> {
        std::fs::create_dir_all("/run/cryptsetup").ok(); // libcryptsetup's LUKS2 lock directory
        let mut dev = self.context()?;
        dev.activate_handle()
            .activate_by_passphrase(Some(name), None, key.expose(), CryptActivate::empty())
            .map_err(|e| self.activation_error(e, Some(name), key_file))
    }

    fn activation_error(&self, e: LibcryptErr, name: Option<&str>, key_file: &str) -> Error {
        let device = self.data.display().to_string();
        match errno_of(&e) {
            Some(libc::EPERM) | Some(libc::ENOENT) => Error::KeyRejected {
                device,
                key_file: key_file.to_string(),
            },
            _ => Error::Activate {
                device,
                name: name.unwrap_or("(key check)").to_string(),
                detail: format!(
                    "{e}; see the libcryptsetup lines above (initcrypt.debug for more)"
                ),
            },
        }
    }
}

/// The size of the default (first) data segment of a LUKS2 header: `None` when `dynamic` or when
/// the header is LUKS1 (whose data runs to the device's end); an error when the JSON says
/// something else than a size or `dynamic`, which a pass must not guess at.
fn segment_size(dev: &mut CryptDevice) -> Result<Option<u64>, String> {
    if !matches!(dev.format_handle().get_type(), Ok(EncryptionFormat::Luks2)) {
        return Ok(None);
    }
    let json = dev.status_handle().dump_json().map_err(|e| e.to_string())?;
    let size = json
        .get("segments")
        .and_then(|s| s.get("0"))
        .and_then(|s| s.get("size"))
        .and_then(|s| s.as_str())
        .ok_or("the header has no segment 0 with a size")?;
    match size {
        "dynamic" => Ok(None),
        n => n
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("segment 0 size {n:?} is neither dynamic nor a number")),
    }
}

/// What `rotate` needs from a header: which keyslots a key opens, adding one next to a verified
/// one, destroying one, and (LUKS1 only, whose single header copy is not updated atomically) a
/// header backup. Every call takes a fresh context, so what it reports is what the disk holds now,
/// not what an earlier context cached.
impl LuksVolume {
    /// The file (or device, for an attached header) holding the header.
    pub fn header_file(&self) -> &Path {
        self.header_path()
    }

    /// The data device.
    pub fn data_device(&self) -> &Path {
        &self.data
    }

    /// A context for the header without loading it: restoring a damaged header cannot load it first.
    fn bare_context(&self) -> Result<CryptDevice, Error> {
        let init = match &self.header {
            Some(h) => {
                CryptInit::init_with_data_device(Either::Right((h.as_path(), self.data.as_path())))
            }
            None => CryptInit::init(&self.data),
        };
        init.map_err(|e| Error::Library {
            device: self.header_name(),
            during: "initialising",
            detail: e.to_string(),
        })
    }

    fn keyslot_error(&self, during: &'static str, slot: Option<u32>, e: LibcryptErr) -> Error {
        Error::Library {
            device: self.header_name(),
            during,
            detail: match slot {
                Some(s) => format!("keyslot {s}: {e}"),
                None => e.to_string(),
            },
        }
    }

    /// The keyslots holding a copy of the volume key (LUKS2 unbound slots hold none).
    pub fn active_keyslots(&self) -> Result<Vec<u32>, Error> {
        let mut dev = self.context()?;
        let fmt = dev
            .format_handle()
            .get_type()
            .map_err(|e| self.keyslot_error("reading the LUKS version", None, e))?;
        let max = libcryptsetup_rs::CryptKeyslotHandle::max_keyslots(fmt)
            .map_err(|e| self.keyslot_error("counting keyslots", None, e))?;
        let mut active = Vec::new();
        for slot in 0..max {
            if matches!(
                dev.keyslot_handle().status(slot),
                Ok(KeyslotInfo::Active) | Ok(KeyslotInfo::ActiveLast)
            ) {
                active.push(slot);
            }
        }
        Ok(active)
    }

    /// The slots among `slots` that `key` opens (one PBKDF each; nothing is activated or written).
    pub fn slots_opened_by(&self, key: &Secret, slots: &[u32]) -> Result<Vec<u32>, Error> {
        let mut dev = self.context()?;
        let mut opened = Vec::new();
        for &slot in slots {
            match dev.activate_handle().activate_by_passphrase(
                None,
                Some(slot),
                key.expose(),
                CryptActivate::empty(),
            ) {
                Ok(_) => opened.push(slot),
                Err(e) if matches!(errno_of(&e), Some(libc::EPERM) | Some(libc::ENOENT)) => {}
                Err(e) => return Err(self.keyslot_error("checking a key", Some(slot), e)),
            }
        }
        Ok(opened)
    }

    /// Whether `key` opens keyslot `slot`, read from the disk now.
    pub fn key_opens_slot(&self, key: &Secret, slot: u32) -> Result<bool, Error> {
        Ok(!self.slots_opened_by(key, &[slot])?.is_empty())
    }

    /// Add a keyslot for `new`, unlocked with `unlock`, with the PBKDF parameters of keyslot `like`
    /// (the slot `unlock` opens): the new slot costs the boot what the old one did, and our own
    /// pbkdf2-at-the-minimum volumes stay that way. One header update. Returns the new slot.
    pub fn add_keyslot_like(&self, unlock: &Secret, new: &Secret, like: u32) -> Result<u32, Error> {
        std::fs::create_dir_all("/run/cryptsetup").ok(); // LUKS2 metadata lock directory
        let mut dev = self.context()?;
        let mut pbkdf = dev
            .keyslot_handle()
            .get_pbkdf(like)
            .map_err(|e| self.keyslot_error("reading the PBKDF", Some(like), e))?;
        pbkdf.flags = CryptPbkdf::NO_BENCHMARK;
        pbkdf.time_ms = 0;
        dev.settings_handle()
            .set_pbkdf_type(&pbkdf)
            .map_err(|e| self.keyslot_error("setting the PBKDF", Some(like), e))?;
        dev.keyslot_handle()
            .add_by_passphrase(None, unlock.expose(), new.expose())
            .map_err(|e| self.keyslot_error("adding a keyslot", None, e))
    }

    /// Destroy keyslot `slot` (libcryptsetup wipes its key material, then updates the header).
    /// Whether another slot still opens the volume is the caller's to check first.
    pub fn destroy_keyslot(&self, slot: u32) -> Result<(), Error> {
        std::fs::create_dir_all("/run/cryptsetup").ok();
        let mut dev = self.context()?;
        dev.keyslot_handle()
            .destroy(slot)
            .map_err(|e| self.keyslot_error("destroying a keyslot", Some(slot), e))
    }

    /// Copy the header and keyslot area to `to`, which must not exist (libcryptsetup creates it 0400).
    pub fn backup_header(&self, to: &Path) -> Result<(), Error> {
        let mut dev = self.context()?;
        dev.backup_handle()
            .header_backup(None, to)
            .map_err(|e| self.keyslot_error("backing up the header", None, e))
    }

    /// Write the LUKS1 header backup `from` over the header, even a damaged one.
    pub fn restore_luks1_header(&self, from: &Path) -> Result<(), Error> {
        let mut dev = self.bare_context()?;
        dev.backup_handle()
            .header_restore(Some(EncryptionFormat::Luks1), from)
            .map_err(|e| self.keyslot_error("restoring the header backup", None, e))
    }

    /// fsync the header file or device: libcryptsetup syncs its own writes, but a keyslot step
    /// must be durable before the next one starts, whatever the library version does.
    pub fn sync_header(&self) -> Result<(), Error> {
        std::fs::File::open(self.header_path())
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::Library {
                device: self.header_name(),
                during: "syncing the header",
                detail: e.to_string(),
            })
    }
}
