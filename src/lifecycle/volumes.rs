//! Writing volumes.json (reading it is `config::parse`'s job, which stays the only parser), and
//! the stable names `enable` gives new volumes.
//!
//! Mapping names (design §3: stable across reboots and device renames):
//! - the OS volume is `osencrypt` (ADE's name), or the name of the mapping the root already runs on;
//! - a data volume on a SCSI LUN is `data<ctrl>_<lun>` for a whole disk and `data<ctrl>_<lun>p<N>`
//!   for its partition N, with ADE's controller and LUN numbers (the same ones its key file name
//!   `LinuxPassPhraseFileName_<ctrl>_<lun>` carries);
//! - any other data volume is `data-<filesystem UUID>`.
//!
//! Both survive a change of kernel enumeration order (`/dev/sdc` becoming `/dev/sdb`): the LUN is
//! the platform's slot, the UUID is in the filesystem, which keeps it inside the mapping. The name is
//! computed once, by the first `enable`, and read back from volumes.json ever after.

use serde::Serialize;

use crate::config::{Desired, Header, Role, Volume};

#[derive(Serialize)]
struct OutFile<'a> {
    version: u32,
    volumes: Vec<OutVolume<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutHeader<'a> {
    Keyword(&'static str),
    Detached { boot_uuid: &'a str, path: String },
}

#[derive(Serialize)]
struct OutMount<'a> {
    target: String,
    fstype: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    options: Option<&'a str>,
}

#[derive(Serialize)]
struct OutPass {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    online: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    io_concurrency: Option<u32>,
}

#[derive(Serialize)]
struct OutVolume<'a> {
    name: &'a str,
    role: Role,
    device: String,
    header: OutHeader<'a>,
    key_file: &'a str,
    desired: Desired,
    #[serde(skip_serializing_if = "Option::is_none")]
    mount: Option<OutMount<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<OutPass>,
}

fn out_volume(v: &Volume) -> OutVolume<'_> {
    let header = match &v.header {
        Header::Attached => OutHeader::Keyword("attached"),
        Header::Detached { boot_uuid, path } => OutHeader::Detached {
            boot_uuid,
            path: path.display().to_string(),
        },
    };
    let pass = (v.pass.online || v.pass.io_concurrency.is_some()).then_some(OutPass {
        online: v.pass.online,
        io_concurrency: v.pass.io_concurrency,
    });
    OutVolume {
        name: &v.name,
        role: v.role,
        device: v.device.to_string(),
        header,
        key_file: &v.key_file,
        desired: v.desired,
        mount: v.mount.as_ref().map(|m| OutMount {
            target: m.target.display().to_string(),
            fstype: &m.fstype,
            options: m.options.as_deref(),
        }),
        pass,
    }
}

/// volumes.json text for these volumes: deterministic (same volumes, same bytes), so running
/// `enable` twice writes the same file, and `config::parse` reads back exactly `volumes`.
pub fn render(volumes: &[Volume]) -> String {
    let file = OutFile {
        version: 1,
        volumes: volumes.iter().map(out_volume).collect(),
    };
    // Serialising plain strings, numbers and enums cannot fail.
    let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
    text.push('\n');
    text
}

/// A data volume's mapping name (see the module comment).
pub fn data_name(
    scsi: Option<(u32, u32)>,
    partition: Option<u32>,
    fs_uuid: Option<&str>,
) -> Option<String> {
    match (scsi, partition) {
        (Some((c, l)), None) => Some(format!("data{c}_{l}")),
        (Some((c, l)), Some(p)) => Some(format!("data{c}_{l}p{p}")),
        (None, _) => fs_uuid
            .filter(|u| !u.is_empty() && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .map(|u| format!("data-{}", u.to_ascii_lowercase())),
    }
}

/// ADE's key file name for a data disk on SCSI controller `ctrl`, LUN `lun`.
pub fn lun_key_file(ctrl: u32, lun: u32) -> String {
    format!("{}_{ctrl}_{lun}", crate::keyvol::OS_KEY_FILE)
}

/// Keep `existing` (in its order), replace volumes of the same name by `updates`, append the
/// rest; the OS volume first, as the boot handles it first anyway.
pub fn merge(existing: &[Volume], updates: Vec<Volume>) -> Vec<Volume> {
    let mut out: Vec<Volume> = existing.to_vec();
    for u in updates {
        match out.iter_mut().find(|v| v.name == u.name) {
            Some(v) => *v = u,
            None => out.push(u),
        }
    }
    out.sort_by_key(|v| v.role != Role::Os);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::DeviceSpec;
    use crate::config::{MountSpec, PassSpec};
    use std::path::{Path, PathBuf};

    fn os() -> Volume {
        Volume {
            name: "osencrypt".into(),
            role: Role::Os,
            device: DeviceSpec::PartUuid("aa-02".into()),
            header: Header::Detached {
                boot_uuid: "0f0e".into(),
                path: PathBuf::from("luks/osluksheader"),
            },
            key_file: "LinuxPassPhraseFileName".into(),
            desired: Desired::Encrypted,
            mount: None,
            pass: PassSpec::default(),
        }
    }

    fn data() -> Volume {
        Volume {
            name: "data0_1".into(),
            role: Role::Data,
            device: DeviceSpec::ByPath("pci-0000:00:04.0-scsi-0:0:0:1".into()),
            header: Header::Detached {
                boot_uuid: "0f0e".into(),
                path: PathBuf::from("luks/data0_1.hdr"),
            },
            key_file: "LinuxPassPhraseFileName_0_1".into(),
            desired: Desired::Decrypted,
            mount: Some(MountSpec {
                target: "/data".into(),
                fstype: "xfs".into(),
                options: Some("defaults,nofail".into()),
            }),
            pass: PassSpec {
                online: false,
                io_concurrency: Some(4),
            },
        }
    }

    #[test]
    fn render_parses_back_to_the_same_volumes() {
        let mut attached = data();
        attached.name = "ade".into();
        attached.header = Header::Attached;
        attached.device = DeviceSpec::Uuid("1234".into());
        attached.mount = None;
        attached.pass = PassSpec::default();
        let vols = vec![os(), data(), attached];
        let text = render(&vols);
        assert_eq!(crate::config::parse(&text, Path::new("v")).unwrap(), vols);
        assert_eq!(render(&vols), text, "deterministic");
    }

    #[test]
    fn names() {
        assert_eq!(data_name(Some((1, 0)), None, Some("x")).unwrap(), "data1_0");
        assert_eq!(data_name(Some((1, 3)), Some(2), None).unwrap(), "data1_3p2");
        assert_eq!(
            data_name(None, Some(1), Some("ABCD-12")).unwrap(),
            "data-abcd-12"
        );
        assert_eq!(data_name(None, None, None), None);
        assert_eq!(data_name(None, None, Some("../x")), None);
        assert_eq!(lun_key_file(1, 0), "LinuxPassPhraseFileName_1_0");
    }

    #[test]
    fn merge_keeps_existing_and_puts_os_first() {
        let d = data();
        let mut d2 = data();
        d2.desired = Desired::Encrypted;
        let merged = merge(&[d], vec![os(), d2.clone()]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].role, Role::Os);
        assert_eq!(merged[1], d2);
    }
}
