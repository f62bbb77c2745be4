//! What each volume *should* be: `/etc/initcrypt/volumes.json` (design §2) and ADE's kernel
//! parameters. Parsing is strict — an unknown field or a bad value is an error naming the field —
//! because a typo silently ignored here could mean a disk left plaintext or the wrong disk touched.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::blockdev::DeviceSpec;
use crate::exit::{Classify, Exit};
use crate::keyvol::OS_KEY_FILE;

pub const DEFAULT_PATH: &str = "/etc/initcrypt/volumes.json";
/// ADE's mapping name and detached-header path for the OS volume (design §3).
pub const ADE_OS_NAME: &str = "osencrypt";
pub const ADE_HEADER_PATH: &str = "luks/osluksheader";
const DEFAULT_KEYVOL_TIMEOUT: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}; fix its permissions or remove it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is invalid: {detail}; fix the file (see README, volumes.json)")]
    Invalid { path: PathBuf, detail: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        Exit::ConfigInvalid
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Os,
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Encrypted,
    Decrypted,
}

/// Where the LUKS header lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// At the start of the data device.
    Attached,
    /// A file on the plaintext boot partition, found by the partition's filesystem UUID.
    Detached { boot_uuid: String, path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    pub target: PathBuf,
    pub fstype: String,
    #[serde(default)]
    pub options: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassSpec {
    #[serde(default)]
    pub online: bool,
    #[serde(default)]
    pub io_concurrency: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: u32,
    volumes: Vec<RawVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    role: Role,
    device: String,
    #[serde(default)]
    header: Option<RawHeader>,
    #[serde(default)]
    key_file: Option<String>,
    desired: Desired,
    #[serde(default)]
    mount: Option<MountSpec>,
    #[serde(default)]
    pass: Option<PassSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawHeader {
    Keyword(String),
    Detached(RawDetached),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetached {
    boot_uuid: String,
    path: String,
}

/// One volume, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub role: Role,
    pub device: DeviceSpec,
    pub header: Header,
    pub key_file: String,
    pub desired: Desired,
    pub mount: Option<MountSpec>,
    pub pass: PassSpec,
}

/// Parse and validate volumes.json text. Errors carry `volumes[i].field`.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Volume>, Error> {
    let invalid = |detail: String| Error::Invalid {
        path: path.to_path_buf(),
        detail,
    };
    let raw: RawFile = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    if raw.version != 1 {
        return Err(invalid(format!(
            "version: {} is not supported (this initcrypt reads version 1)",
            raw.version
        )));
    }
    let mut volumes = Vec::with_capacity(raw.volumes.len());
    for (i, rv) in raw.volumes.into_iter().enumerate() {
        let v =
            validate(rv).map_err(|(field, why)| invalid(format!("volumes[{i}].{field}: {why}")))?;
        if let Some(prev) = volumes.iter().find(|p: &&Volume| p.name == v.name) {
            return Err(invalid(format!(
                "volumes[{i}].name: \"{}\" is used twice",
                prev.name
            )));
        }
        if v.role == Role::Os && volumes.iter().any(|p: &Volume| p.role == Role::Os) {
            return Err(invalid(format!(
                "volumes[{i}].role: only one volume can have role \"os\""
            )));
        }
        volumes.push(v);
    }
    Ok(volumes)
}

type FieldError = (&'static str, String);

fn validate(rv: RawVolume) -> Result<Volume, FieldError> {
    check_name(&rv.name).map_err(|w| ("name", w))?;
    let device = DeviceSpec::parse(&rv.device).map_err(|e| ("device", e.to_string()))?;
    let header = match rv.header {
        None => Header::Attached,
        Some(RawHeader::Keyword(k)) if k == "attached" => Header::Attached,
        Some(RawHeader::Keyword(k)) => {
            return Err((
                "header",
                format!("\"{k}\" is neither \"attached\" nor {{\"boot_uuid\", \"path\"}}"),
            ))
        }
        Some(RawHeader::Detached(d)) => Header::Detached {
            boot_uuid: check_uuid(&d.boot_uuid).map_err(|w| ("header.boot_uuid", w))?,
            path: check_rel_path(&d.path).map_err(|w| ("header.path", w))?,
        },
    };
    if matches!(
        (&header, &device),
        (Header::Detached { .. }, DeviceSpec::Uuid(_))
    ) {
        // With the header elsewhere, the encrypted device carries no UUID at all: name it by
        // something that survives encryption.
        return Err((
            "device",
            "a detached-header volume must be named by PARTUUID= or /dev/disk/by-path/ (a filesystem UUID disappears once the device is encrypted)".into(),
        ));
    }
    let key_file = match rv.key_file {
        Some(k) => check_key_file(&k).map_err(|w| ("key_file", w))?,
        None if rv.role == Role::Os => OS_KEY_FILE.to_string(),
        None => {
            return Err((
                "key_file",
                "required for data volumes (e.g. LinuxPassPhraseFileName_0_1)".into(),
            ))
        }
    };
    if let Some(m) = &rv.mount {
        if !m.target.is_absolute() {
            return Err(("mount.target", "must be an absolute path".into()));
        }
    }
    Ok(Volume {
        name: rv.name,
        role: rv.role,
        device,
        header,
        key_file,
        desired: rv.desired,
        mount: rv.mount,
        pass: rv.pass.unwrap_or_default(),
    })
}

/// Mapping names become /dev/mapper/<name> and key file names under /run: keep them plain.
fn check_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        && !n.starts_with('.');
    ok.then_some(()).ok_or_else(|| {
        format!("\"{n}\" must be 1–64 characters of A–Z a–z 0–9 _ - . (not starting with .)")
    })
}

fn check_uuid(u: &str) -> Result<String, String> {
    let ok = !u.is_empty() && u.len() <= 64 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| u.to_ascii_lowercase())
        .ok_or_else(|| format!("\"{u}\" is not a filesystem UUID"))
}

fn check_rel_path(p: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(p.trim_start_matches('/'));
    let ok = !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then_some(path)
        .ok_or_else(|| format!("\"{p}\" must be a path inside the boot partition without .."))
}

fn check_key_file(k: &str) -> Result<String, String> {
    let ok = !k.is_empty() && k.len() <= 255 && !k.contains('/') && !k.contains('\0');
    ok.then(|| k.to_string())
        .ok_or_else(|| format!("\"{k}\" must be a file name in the key volume's root directory"))
}

/// Boot parameters we honour (design §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub skip: bool,
    pub keyvol_timeout: Duration,
    pub debug: bool,
    pub ade_partuuid: Option<String>,
    pub ade_bootuuid: Option<String>,
    /// The kernel's `root=`: a volume it names as a mapping must never be decrypted.
    pub root: Option<String>,
}

impl BootParams {
    pub fn parse(cmdline: &str) -> Result<BootParams, Error> {
        let mut p = BootParams {
            skip: false,
            keyvol_timeout: Duration::from_secs(DEFAULT_KEYVOL_TIMEOUT),
            debug: false,
            ade_partuuid: None,
            ade_bootuuid: None,
            root: None,
        };
        for word in cmdline.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "rd.initcrypt" | "rd.ade" => p.skip = matches!(value, "0" | "no" | "false" | "off"),
                "initcrypt.debug" => p.debug = true,
                "initcrypt.keyvol_timeout" => {
                    let secs = value.parse::<u64>().map_err(|_| Error::Cmdline(format!("initcrypt.keyvol_timeout=\"{value}\" is not a number of seconds; fix the boot entry")))?;
                    p.keyvol_timeout = Duration::from_secs(secs);
                }
                "rd.luks.ade.partuuid" => {
                    p.ade_partuuid = Some(value.trim_matches('"').to_ascii_lowercase())
                }
                "rd.luks.ade.bootuuid" => {
                    p.ade_bootuuid = Some(value.trim_matches('"').to_ascii_lowercase())
                }
                "root" => p.root = Some(value.to_string()),
                _ => {}
            }
        }
        Ok(p)
    }

    /// Read /proc/cmdline; outside Linux or without procfs there are simply no parameters.
    pub fn from_system() -> Result<BootParams, Error> {
        BootParams::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }

    /// The OS volume ADE's parameters describe, if both are given.
    pub fn ade_volume(&self) -> Result<Option<Volume>, Error> {
        let (Some(part), Some(boot)) = (&self.ade_partuuid, &self.ade_bootuuid) else {
            if self.ade_partuuid.is_some() != self.ade_bootuuid.is_some() {
                return Err(Error::Cmdline("rd.luks.ade.partuuid= and rd.luks.ade.bootuuid= must be given together; fix the boot entry".into()));
            }
            return Ok(None);
        };
        let device = DeviceSpec::parse(&format!("PARTUUID={part}"))
            .map_err(|e| Error::Cmdline(e.to_string()))?;
        let boot_uuid =
            check_uuid(boot).map_err(|w| Error::Cmdline(format!("rd.luks.ade.bootuuid: {w}")))?;
        Ok(Some(Volume {
            name: ADE_OS_NAME.to_string(),
            role: Role::Os,
            device,
            header: Header::Detached {
                boot_uuid,
                path: PathBuf::from(ADE_HEADER_PATH),
            },
            key_file: OS_KEY_FILE.to_string(),
            desired: Desired::Encrypted,
            mount: None,
            pass: PassSpec::default(),
        }))
    }
}

/// The volumes to handle: volumes.json if present, plus ADE's OS volume from the command line when
/// the file names no OS volume of its own.
pub fn load(path: &Path, params: &BootParams) -> Result<Vec<Volume>, Error> {
    let mut volumes = match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(Error::Read {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    if let Some(ade) = params.ade_volume()? {
        if volumes.iter().any(|v| v.role == Role::Os) {
            log::info!("volumes.json names the OS volume; ignoring rd.luks.ade.* parameters");
        } else if volumes.iter().any(|v| v.name == ade.name) {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                detail: format!(
                    "a data volume is named {}, which ADE's OS volume needs",
                    ade.name
                ),
            });
        } else {
            volumes.insert(0, ade);
        }
    }
    for v in &mut volumes {
        if let Some(why) = decrypt_refusal(v, params) {
            log::error!(
                "{}: wanted decrypted, but {why}; it stays encrypted and is opened",
                v.name
            );
            v.desired = Desired::Encrypted;
        }
    }
    Ok(volumes)
}

/// Why a volume wanted decrypted must stay encrypted, if it must. Decrypting an OS volume while
/// `root=` names its mapping leaves a VM whose root never appears (the command line changes first,
/// then the disk); a header on the disk itself cannot be decrypted in place by initcrypt. Either
/// way the volume is treated as wanted encrypted, so every boot path opens it.
fn decrypt_refusal(v: &Volume, params: &BootParams) -> Option<String> {
    if v.desired != Desired::Decrypted {
        return None;
    }
    if matches!(v.header, Header::Attached) {
        return Some("its LUKS header is on the disk and initcrypt decrypts in place only volumes with a detached header; decrypt it offline with `cryptsetup reencrypt --decrypt`".into());
    }
    let root = params.root.as_deref()?;
    let names_mapping = [
        format!("/dev/mapper/{}", v.name),
        format!("/dev/disk/by-id/dm-name-{}", v.name),
    ]
    .iter()
    .any(|m| m == root);
    (v.role == Role::Os && names_mapping).then(|| {
        format!("the kernel command line boots root={root}, which no longer exists once it is decrypted; point root= at the filesystem (root=UUID=…) first")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<Volume>, Error> {
        parse(text, Path::new("v.json"))
    }

    const GOOD: &str = r#"{"version":1,"volumes":[
      {"name":"osencrypt","role":"os","device":"PARTUUID=AA-01","header":{"boot_uuid":"0f0e","path":"/luks/osluksheader"},"desired":"encrypted"},
      {"name":"data0_1","role":"data","device":"UUID=abc","key_file":"LinuxPassPhraseFileName_0_1","desired":"encrypted",
       "mount":{"target":"/data","fstype":"xfs"}}]}"#;

    #[test]
    fn good_file() {
        let v = p(GOOD).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].key_file, "LinuxPassPhraseFileName");
        assert_eq!(
            v[0].header,
            Header::Detached {
                boot_uuid: "0f0e".into(),
                path: "luks/osluksheader".into()
            }
        );
        assert_eq!(v[1].header, Header::Attached);
    }

    fn err_of(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let unknown = GOOD.replace(
            "\"desired\":\"encrypted\"}",
            "\"desired\":\"encrypted\",\"colour\":1}",
        );
        assert!(
            err_of(&unknown).contains("unknown field `colour`"),
            "{}",
            err_of(&unknown)
        );
        assert!(err_of(&GOOD.replace("PARTUUID=AA-01", "/dev/sda2")).contains("volumes[0].device"));
        assert!(err_of(&GOOD.replace("\"version\":1", "\"version\":2")).contains("version: 2"));
        assert!(
            err_of(&GOOD.replace("\"role\":\"data\"", "\"role\":\"swap\""))
                .contains("unknown variant `swap`")
        );
        assert!(err_of(&GOOD.replace("data0_1", "osencrypt")).contains("volumes[1].name"));
        assert!(
            err_of(&GOOD.replace("/luks/osluksheader", "../x")).contains("volumes[0].header.path")
        );
        assert!(
            err_of(&GOOD.replace(",\"key_file\":\"LinuxPassPhraseFileName_0_1\"", ""))
                .contains("volumes[1].key_file")
        );
        assert!(
            err_of(&GOOD.replace("\"role\":\"data\"", "\"role\":\"os\""))
                .contains("only one volume")
        );
        assert!(
            err_of(&GOOD.replace("\"target\":\"/data\"", "\"target\":\"data\""))
                .contains("mount.target")
        );
    }

    #[test]
    fn cmdline_ade_and_ours() {
        let bp = BootParams::parse("ro quiet rd.luks.ade.partuuid=ABC-1 rd.luks.ade.bootuuid=0F0E initcrypt.keyvol_timeout=7 initcrypt.debug").unwrap();
        assert_eq!(bp.keyvol_timeout, Duration::from_secs(7));
        assert!(bp.debug && !bp.skip);
        let v = bp.ade_volume().unwrap().unwrap();
        assert_eq!(v.name, "osencrypt");
        assert_eq!(v.device, DeviceSpec::PartUuid("abc-1".into()));
        assert!(BootParams::parse("rd.ade=0").unwrap().skip);
        assert!(BootParams::parse("rd.initcrypt=0").unwrap().skip);
        assert!(BootParams::parse("initcrypt.keyvol_timeout=x").is_err());
        assert!(BootParams::parse("rd.luks.ade.partuuid=a")
            .unwrap()
            .ade_volume()
            .is_err());
    }

    /// A volume is decrypted only when nothing still needs its mapping or its on-disk header.
    #[test]
    fn decryption_refused_while_root_names_the_mapping_or_the_header_is_attached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volumes.json");
        let all_decrypted = GOOD.replace("\"desired\":\"encrypted\"", "\"desired\":\"decrypted\"");
        std::fs::write(&path, all_decrypted).unwrap();
        let desired = |cmdline: &str| -> Vec<Desired> {
            let params = BootParams::parse(cmdline).unwrap();
            load(&path, &params)
                .unwrap()
                .iter()
                .map(|v| v.desired)
                .collect()
        };
        // data0_1 has its header on the disk: never decrypted in place
        assert_eq!(
            desired("root=UUID=1234 ro"),
            [Desired::Decrypted, Desired::Encrypted]
        );
        for root in ["/dev/mapper/osencrypt", "/dev/disk/by-id/dm-name-osencrypt"] {
            assert_eq!(
                desired(&format!("root={root} ro")),
                [Desired::Encrypted, Desired::Encrypted],
                "root={root}"
            );
        }
        // another mapping's name is not this volume's
        assert_eq!(
            desired("root=/dev/mapper/osencrypt2"),
            [Desired::Decrypted, Desired::Encrypted]
        );
    }
}
