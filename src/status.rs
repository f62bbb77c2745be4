//! `initcrypt status`: what each volume *is*, observed from the disks every time (headers, pass
//! journals, dm tables, mounts), never from a flag file, with ADE's status vocabulary so existing
//! agents keep their parsers.
//!
//! Per volume (design §4):
//! - `EncryptionInProgress` / `DecryptionInProgress`: a pass is unfinished (our journal, or a LUKS2
//!   reencryption ADE left); percent, bytes, and while the pass runs (its journal changed in the
//!   last 10 s) rate and ETA measured over one second;
//! - `VMRestartPending`: what the disk is differs from volumes.json, *and* the running kernel's
//!   initramfs already carries this exact volumes.json (read from the image), so a reboot acts;
//!   when the image is older the state stays what the disk is (a reboot would change nothing);
//! - `NotMounted`: a data volume whose mapping is open but not mounted where its `mount` (or the
//!   fstab line on its mapping) says, or whose device is absent;
//! - `Encrypted` / `NotEncrypted`: the disk matches.
//!
//! The `os` and `data` fields aggregate them (the "worst" state wins, in the order listed above);
//! with no data volume configured `data` is `NotMounted` unless a plaintext data filesystem is
//! mounted (`NotEncrypted`), as ADE reports it. `ProgressMessage` uses ADE's strings where ADE has
//! one ("OS disk encryption started", "Encryption succeeded for all volumes", …).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, BootParams, Desired, Role, Volume};
use crate::exit::{Classify, Exit};
use crate::lifecycle::discover;
use crate::lifecycle::fstab::{self, Fstab};
use crate::lifecycle::initramfs;
use crate::lifecycle::machine::{Live, Machine, Observation};
use crate::pass::Direction;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("cannot print the status: {0}")]
    Output(String),
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Config(e) => e.exit(),
            Error::Output(_) => Exit::Usage,
        }
    }
}

/// ADE's per-disk states (design §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AdeState {
    Encrypted,
    NotEncrypted,
    EncryptionInProgress,
    DecryptionInProgress,
    VMRestartPending,
    NotMounted,
}

impl AdeState {
    /// Higher wins when volumes of one role disagree.
    fn weight(self) -> u8 {
        match self {
            AdeState::EncryptionInProgress => 6,
            AdeState::DecryptionInProgress => 5,
            AdeState::VMRestartPending => 4,
            AdeState::NotEncrypted => 3,
            AdeState::NotMounted => 2,
            AdeState::Encrypted => 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub role: Role,
    pub device: String,
    pub desired: Desired,
    pub state: AdeState,
    pub open: bool,
    /// Where the volume's filesystem is mounted now (data volumes).
    pub mounted_at: Option<String>,
    pub percent: Option<u8>,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub rate_bytes_per_sec: Option<u64>,
    pub eta_seconds: Option<u64>,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub os: AdeState,
    pub data: AdeState,
    #[serde(rename = "ProgressMessage")]
    pub progress_message: String,
    /// The running kernel's initramfs carries this volumes.json (None: it could not be read).
    pub initramfs_current: Option<bool>,
    pub volumes: Vec<VolumeStatus>,
}

/// Pure state rule (see the module comment).
pub fn state_of(
    v: &Volume,
    obs: &Observation,
    initramfs_current: bool,
    mounted: Option<bool>,
) -> AdeState {
    use AdeState::*;
    let pending = |observed: AdeState| {
        if initramfs_current {
            VMRestartPending
        } else {
            observed
        }
    };
    match (obs, v.desired) {
        (
            Observation::Unfinished {
                direction: Direction::Encrypt,
                ..
            },
            _,
        ) => EncryptionInProgress,
        (
            Observation::Unfinished {
                direction: Direction::Decrypt,
                ..
            },
            _,
        ) => DecryptionInProgress,
        (
            Observation::Encrypted {
                reencrypt_pending: true,
            },
            _,
        ) => EncryptionInProgress,
        (Observation::Open { .. }, Desired::Encrypted)
            if v.role == Role::Data && mounted == Some(false) =>
        {
            NotMounted
        }
        (Observation::Open { .. } | Observation::Encrypted { .. }, Desired::Encrypted) => Encrypted,
        (Observation::Open { .. } | Observation::Encrypted { .. }, Desired::Decrypted) => {
            pending(Encrypted)
        }
        (Observation::Plaintext, Desired::Encrypted) => pending(NotEncrypted),
        (Observation::Plaintext, Desired::Decrypted) => NotEncrypted,
        (Observation::Unknown(_), _) if v.role == Role::Data => NotMounted,
        (Observation::Unknown(_), _) => NotEncrypted,
    }
}

fn aggregate(vols: &[VolumeStatus], role: Role, plaintext_data_mounted: bool) -> AdeState {
    let states = vols.iter().filter(|v| v.role == role).map(|v| v.state);
    match states.max_by_key(|s| s.weight()) {
        Some(s) => s,
        None if role == Role::Data && !plaintext_data_mounted => AdeState::NotMounted,
        None => AdeState::NotEncrypted,
    }
}

/// ADE's ProgressMessage strings where ADE has one; ours otherwise.
fn message(os: AdeState, data: AdeState, vols: &[VolumeStatus]) -> String {
    use AdeState::*;
    if vols.is_empty() {
        return "No volumes configured".into();
    }
    let has = |r: Role| vols.iter().any(|v| v.role == r);
    let running = |r: Role| vols.iter().find(|v| v.role == r && v.percent.is_some());
    if os == EncryptionInProgress {
        return "OS disk encryption started".into();
    }
    if data == EncryptionInProgress {
        let total = vols.iter().filter(|v| v.role == Role::Data).count();
        let (i, v) = vols
            .iter()
            .filter(|v| v.role == Role::Data)
            .enumerate()
            .find(|(_, v)| v.state == EncryptionInProgress)
            .unwrap_or((0, &vols[0]));
        return format!(
            "Encrypting data volume {}/{total}: {}%",
            i + 1,
            v.percent.unwrap_or(0)
        );
    }
    if os == DecryptionInProgress || data == DecryptionInProgress {
        let p = running(Role::Os)
            .or(running(Role::Data))
            .and_then(|v| v.percent)
            .unwrap_or(0);
        return format!("Decryption in progress: {p}%");
    }
    if os == VMRestartPending || data == VMRestartPending {
        let names: Vec<&str> = vols
            .iter()
            .filter(|v| v.state == VMRestartPending)
            .map(|v| v.name.as_str())
            .collect();
        return format!(
            "Reboot the VM to apply the requested change ({})",
            names.join(", ")
        );
    }
    let all_decrypted = vols
        .iter()
        .all(|v| v.desired == Desired::Decrypted && v.state == NotEncrypted);
    if all_decrypted {
        return "Decryption succeeded for all volumes; `initcrypt disable` again removes them from volumes.json".into();
    }
    let enc = |s: AdeState| matches!(s, Encrypted | NotMounted);
    match (has(Role::Os), has(Role::Data)) {
        (true, _) if enc(os) && enc(data) => "Encryption succeeded for all volumes".into(),
        (true, _) if enc(os) => "Encryption succeeded for OS volume".into(),
        (_, true) if enc(data) => "Encryption succeeded for data volumes".into(),
        _ => "Encryption not complete: see the volumes' states".into(),
    }
}

fn fmt_bytes(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn fmt_eta(s: u64) -> String {
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Where a data volume should be mounted: its `mount.target`, else the fstab line on its mapping.
fn mount_target(v: &Volume, fstab: Option<&Fstab>) -> Option<String> {
    if let Some(m) = &v.mount {
        return Some(m.target.display().to_string());
    }
    let mapped = format!("/dev/mapper/{}", v.name);
    fstab?
        .entries()
        .into_iter()
        .find(|e| e.spec == mapped)
        .map(|e| e.target)
}

/// Does the running kernel's initramfs carry `config` (the bytes of volumes.json)?
pub fn initramfs_carries(m: &dyn Machine, root: &Path, config: Option<&[u8]>) -> Option<bool> {
    let release = m.running_kernel()?;
    let image = initramfs::image_path(root, &release);
    let c = initramfs::inspect(&image).ok()?;
    Some(match config {
        Some(bytes) => c.initcrypt && c.volumes_json.as_deref() == Some(bytes),
        // ADE's parameters alone: the image only needs initcrypt.
        None => c.initcrypt && c.volumes_json.is_none(),
    })
}

fn volume_status(
    m: &dyn Machine,
    v: &Volume,
    initramfs_current: bool,
    fstab: Option<&Fstab>,
) -> VolumeStatus {
    let mut obs = m.observe(v);
    let mut rate = None;
    if let Observation::Unfinished {
        done,
        journal_age: Some(age),
        ..
    } = &obs
    {
        // A journal written in the last seconds: the pass runs now; measure it.
        if *age < Duration::from_secs(10) {
            let first = *done;
            let wait = Duration::from_secs(1);
            std::thread::sleep(wait);
            let again = m.observe(v);
            if let Observation::Unfinished { done: d2, .. } = &again {
                rate = Some(d2.saturating_sub(first) / wait.as_secs().max(1));
                obs = again;
            }
        }
    }
    let target = (v.role == Role::Data)
        .then(|| mount_target(v, fstab))
        .flatten();
    let mounted_dev = target.as_ref().and_then(|t| m.mounted_at(t));
    let mounted = match (&obs, &target) {
        (Observation::Open { dm }, Some(_)) => {
            Some(mounted_dev.as_ref().and_then(|mm| mm.device.as_ref()) == Some(dm))
        }
        _ => None,
    };
    let state = state_of(v, &obs, initramfs_current, mounted);
    let mut s = VolumeStatus {
        name: v.name.clone(),
        role: v.role,
        device: v.device.to_string(),
        desired: v.desired,
        state,
        open: matches!(obs, Observation::Open { .. }),
        mounted_at: mounted_dev.map(|mm| mm.target),
        percent: None,
        bytes_done: None,
        bytes_total: None,
        rate_bytes_per_sec: None,
        eta_seconds: None,
        detail: String::new(),
    };
    s.detail = match &obs {
        Observation::Unfinished { done, total, .. } => {
            s.percent = Some(crate::boot::percent(*done, *total).min(100) as u8);
            s.bytes_done = Some(*done);
            s.bytes_total = Some(*total);
            s.rate_bytes_per_sec = rate;
            s.eta_seconds = rate
                .filter(|r| *r > 0)
                .map(|r| total.saturating_sub(*done) / r);
            match rate {
                Some(r) => format!(
                    "{}/{} running at {} MiB/s",
                    fmt_bytes(*done),
                    fmt_bytes(*total),
                    r >> 20
                ),
                None => format!(
                    "{}/{}; not running now: resumes at the next boot",
                    fmt_bytes(*done),
                    fmt_bytes(*total)
                ),
            }
        }
        Observation::Unknown(why) => why.clone(),
        Observation::Open { dm } if state == AdeState::NotMounted => format!(
            "open ({dm}) but not mounted at {}",
            target.clone().unwrap_or_default()
        ),
        Observation::Open { dm } => format!("open ({dm})"),
        Observation::Encrypted { .. } => "encrypted, closed".into(),
        Observation::Plaintext if v.desired == Desired::Decrypted => {
            "decrypted; `initcrypt disable` again removes it from volumes.json".into()
        }
        Observation::Plaintext => "plaintext".into(),
    };
    if state == AdeState::VMRestartPending {
        s.detail.push_str("; the next boot acts on it");
    } else if v.desired == Desired::Encrypted && obs == Observation::Plaintext {
        s.detail.push_str("; the initramfs does not carry the current volumes.json: run `initcrypt enable` again before rebooting");
    }
    s
}

/// The whole status, from `m` and the root tree at `root` (volumes from `config_path`).
pub fn collect_with(
    m: &dyn Machine,
    root: &Path,
    config_path: &Path,
    params: &BootParams,
) -> Result<Status, Error> {
    let volumes = config::load(config_path, params)?;
    let config_bytes = std::fs::read(config_path).ok();
    let initramfs_current = initramfs_carries(m, root, config_bytes.as_deref());
    let fstab = std::fs::read_to_string(root.join("etc/fstab"))
        .ok()
        .and_then(|t| Fstab::parse(&t).ok());
    let vols: Vec<VolumeStatus> = volumes
        .iter()
        .map(|v| volume_status(m, v, initramfs_current == Some(true), fstab.as_ref()))
        .collect();
    let managed: Vec<String> = volumes
        .iter()
        .map(|v| format!("/dev/mapper/{}", v.name))
        .collect();
    let plaintext_data_mounted = fstab.as_ref().is_some_and(|f| {
        f.entries().iter().any(|e| {
            discover::not_data(e, root).is_none()
                && !managed.contains(&e.spec)
                && m.mounted_at(&fstab::normalise_target(&e.target)).is_some()
        })
    });
    let os = aggregate(&vols, Role::Os, plaintext_data_mounted);
    let data = aggregate(&vols, Role::Data, plaintext_data_mounted);
    Ok(Status {
        os,
        data,
        progress_message: message(os, data, &vols),
        initramfs_current,
        volumes: vols,
    })
}

pub fn collect(config_path: &Path, params: &BootParams) -> Result<Status, Error> {
    let live = Live::new(Path::new("/"));
    collect_with(&live, Path::new("/"), config_path, params)
}

/// Human output: a summary line, then one aligned line per volume.
pub fn render(st: &Status) -> String {
    let mut out = format!(
        "os: {:?}  data: {:?}  ({})\n",
        st.os, st.data, st.progress_message
    );
    let w_name = st
        .volumes
        .iter()
        .map(|v| v.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let w_dev = st
        .volumes
        .iter()
        .map(|v| v.device.len())
        .max()
        .unwrap_or(6)
        .max(6);
    for v in &st.volumes {
        let progress = match (v.percent, v.eta_seconds) {
            (Some(p), Some(eta)) => format!("{p:>3}%  ETA {}  ", fmt_eta(eta)),
            (Some(p), None) => format!("{p:>3}%  "),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  {:<w_name$}  {:<4}  {:<20}  {:<w_dev$}  {progress}{}\n",
            v.name,
            if v.role == Role::Os { "os" } else { "data" },
            format!("{:?}", v.state),
            v.device,
            v.detail,
        ));
    }
    out
}

pub fn run(config_path: &Path, params: &BootParams, json: bool) -> Result<(), Error> {
    let st = collect(config_path, params)?;
    if json {
        let text = serde_json::to_string_pretty(&st).map_err(|e| Error::Output(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render(&st));
    }
    Ok(())
}

/// For tests: the path a root tree keeps volumes.json at.
pub fn config_in(root: &Path) -> PathBuf {
    root.join(config::DEFAULT_PATH.trim_start_matches('/'))
}
