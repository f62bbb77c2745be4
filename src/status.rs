//! `initcrypt status`: what each volume *is*, observed from the disks every time (nothing stored),
//! with ADE's status vocabulary so existing agents can keep their parsers.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::boot::{self, Observed};
use crate::config::{self, BootParams, Desired, Role, Volume};
use crate::exit::{Classify, Exit};
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

#[derive(Debug, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub role: Role,
    pub device: String,
    pub kernel_name: Option<String>,
    pub desired: Desired,
    pub state: AdeState,
    pub open: bool,
    pub luks_version: Option<u8>,
    /// Percent done of an unfinished pass.
    pub percent: Option<u8>,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub os: AdeState,
    pub data: AdeState,
    #[serde(rename = "ProgressMessage")]
    pub progress_message: String,
    pub volumes: Vec<VolumeStatus>,
}

fn state_of(v: &Volume, obs: &Observed) -> AdeState {
    match (obs, v.desired) {
        (
            Observed::Unfinished {
                direction: Direction::Encrypt,
                ..
            },
            _,
        ) => AdeState::EncryptionInProgress,
        (
            Observed::Unfinished {
                direction: Direction::Decrypt,
                ..
            },
            _,
        ) => AdeState::DecryptionInProgress,
        (Observed::Open { .. }, Desired::Encrypted) => AdeState::Encrypted,
        (Observed::Open { .. }, Desired::Decrypted) => AdeState::VMRestartPending,
        (Observed::Encrypted(i), Desired::Encrypted) if i.reencrypt_pending => {
            AdeState::EncryptionInProgress
        }
        (Observed::Encrypted(_), Desired::Encrypted) => AdeState::Encrypted,
        (Observed::Encrypted(i), Desired::Decrypted) if i.reencrypt_pending => {
            AdeState::DecryptionInProgress
        }
        (Observed::Encrypted(_), Desired::Decrypted) => AdeState::VMRestartPending,
        // The offline pass runs at the next boot.
        (Observed::Plaintext { .. }, Desired::Encrypted) => AdeState::VMRestartPending,
        (Observed::Plaintext { .. }, Desired::Decrypted) => AdeState::NotEncrypted,
    }
}

fn volume_status(v: &Volume) -> VolumeStatus {
    let mut s = VolumeStatus {
        name: v.name.clone(),
        role: v.role,
        device: v.device.to_string(),
        kernel_name: None,
        desired: v.desired,
        state: AdeState::NotMounted,
        open: false,
        luks_version: None,
        percent: None,
        detail: String::new(),
    };
    // Status never waits: what is not there now is reported as such.
    let loc = match boot::locate(v, Duration::ZERO, boot::Access::ReadOnly) {
        Ok(l) => l,
        Err(e) => {
            s.detail = e.to_string();
            return s;
        }
    };
    s.kernel_name = Some(loc.dev.name.clone());
    match boot::observe(v, &loc) {
        Ok(obs) => {
            s.state = state_of(v, &obs);
            s.open = matches!(obs, Observed::Open { .. });
            match &obs {
                Observed::Encrypted(i) => s.luks_version = Some(i.version),
                Observed::Unfinished { done, total, .. } => {
                    s.percent = Some(((done * 100).checked_div(*total).unwrap_or(0)) as u8)
                }
                _ => {}
            }
            s.detail = format!("{obs:?}");
        }
        Err(e) => s.detail = e.to_string(),
    }
    s
}

fn aggregate(vols: &[VolumeStatus], role: Role) -> AdeState {
    let mut states = vols.iter().filter(|v| v.role == role).map(|v| v.state);
    let Some(first) = states.next() else {
        return AdeState::NotEncrypted;
    };
    states.fold(first, |acc, s| {
        if acc == s {
            acc
        } else if s == AdeState::Encrypted {
            acc
        } else {
            s
        }
    })
}

fn message(os: AdeState, data: AdeState, any: bool) -> String {
    use AdeState::*;
    match (os, data) {
        _ if !any => "No volumes configured".into(),
        (EncryptionInProgress, _) | (_, EncryptionInProgress) => {
            "OS disk encryption started".into()
        }
        (DecryptionInProgress, _) | (_, DecryptionInProgress) => "Decryption in progress".into(),
        (VMRestartPending, _) | (_, VMRestartPending) => {
            "Restart the VM to finish the requested change".into()
        }
        (NotMounted, _) | (_, NotMounted) => "A configured device is not present".into(),
        _ => "Encryption succeeded for all volumes".into(),
    }
}

pub fn collect(config_path: &Path, params: &BootParams) -> Result<Status, Error> {
    let volumes = config::load(config_path, params)?;
    let vols: Vec<VolumeStatus> = volumes.iter().map(volume_status).collect();
    let os = aggregate(&vols, Role::Os);
    let data = aggregate(&vols, Role::Data);
    Ok(Status {
        os,
        data,
        progress_message: message(os, data, !vols.is_empty()),
        volumes: vols,
    })
}

pub fn run(config_path: &Path, params: &BootParams, json: bool) -> Result<(), Error> {
    let st = collect(config_path, params)?;
    if json {
        let text = serde_json::to_string_pretty(&st).map_err(|e| Error::Output(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "os: {:?}  data: {:?}  ({})",
        st.os, st.data, st.progress_message
    );
    for v in &st.volumes {
        println!(
            "  {:<12} {:<4} {:<40} {:?}{}",
            v.name,
            format!("{:?}", v.role).to_lowercase(),
            v.device,
            v.state,
            if v.open { " (open)" } else { "" }
        );
    }
    Ok(())
}
