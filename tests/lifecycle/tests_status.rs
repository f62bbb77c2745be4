//! status: states computed from observation, the initramfs's content and mounts.

use std::time::Duration;

use initcrypt::config::BootParams;
use initcrypt::lifecycle::enable::{self, Options};
use initcrypt::lifecycle::machine::Observation;
use initcrypt::lifecycle::VolumeType;
use initcrypt::pass::Direction;
use initcrypt::status::{self, AdeState};

use crate::fake::*;

fn enable_all(f: &Fake) {
    let o = Options {
        volume_type: VolumeType::All,
        force: Vec::new(),
        format_empty: false,
    };
    enable::enable(&f.target(), &o, &mut Vec::new()).unwrap();
}

fn collect(t: &Tree, f: &Fake) -> status::Status {
    let params = BootParams::parse("").unwrap();
    status::collect_with(f, t.root(), &status::config_in(t.root()), &params).unwrap()
}

#[test]
fn restart_pending_only_when_the_running_initramfs_carries_the_config() {
    let t = Tree::new();
    let f = Fake::vm(&t);
    enable_all(&f);
    let st = collect(&t, &f);
    assert_eq!(st.initramfs_current, Some(true));
    assert_eq!(st.os, AdeState::VMRestartPending);
    assert_eq!(st.data, AdeState::VMRestartPending);
    assert!(
        st.progress_message.starts_with("Reboot the VM"),
        "{}",
        st.progress_message
    );
    // the same volumes.json edited by hand, no rebuild: a reboot would do nothing
    let json = t.read("etc/initcrypt/volumes.json");
    t.write(
        "etc/initcrypt/volumes.json",
        &json.replace("\"version\": 1", "\"version\":1"),
    );
    let st = collect(&t, &f);
    assert_eq!(st.initramfs_current, Some(false));
    assert_eq!(st.os, AdeState::NotEncrypted);
    assert!(
        st.volumes[0]
            .detail
            .contains("run `initcrypt enable` again"),
        "{}",
        st.volumes[0].detail
    );
}

#[test]
fn encrypted_open_mounted_and_not_mounted() {
    let t = Tree::new();
    let mut f = Fake::vm(&t);
    enable_all(&f);
    f.add_mapping("dm-1", "data0_1p1", "CRYPT", "sdb1", D1_UUID);
    f.add_mapping("dm-2", "data0_2", "CRYPT", "sdc", D2_UUID);
    f.observe_as("osencrypt", Observation::Open { dm: "dm-0".into() });
    f.observe_as("data0_1p1", Observation::Open { dm: "dm-1".into() });
    f.observe_as("data0_2", Observation::Open { dm: "dm-2".into() });
    f.mounts.get_mut("/data1").unwrap().device = Some("dm-1".into());
    f.mounts.get_mut("/data1/logs").unwrap().device = Some("dm-2".into());
    let st = collect(&t, &f);
    assert_eq!((st.os, st.data), (AdeState::Encrypted, AdeState::Encrypted));
    assert_eq!(st.progress_message, "Encryption succeeded for all volumes");
    // data0_2 open but its mount point empty
    f.mounts.remove("/data1/logs");
    let st = collect(&t, &f);
    assert_eq!(st.data, AdeState::NotMounted);
    let v = st.volumes.iter().find(|v| v.name == "data0_2").unwrap();
    assert_eq!(v.state, AdeState::NotMounted);
    assert!(
        v.detail.contains("not mounted at /data1/logs"),
        "{}",
        v.detail
    );
    let text = status::render(&st);
    assert_eq!(text.lines().count(), 4, "{text}");
}

#[test]
fn a_pass_in_progress_has_percent_bytes_rate_and_eta() {
    let t = Tree::new();
    let f = Fake::vm(&t);
    enable_all(&f);
    f.observe_as(
        "osencrypt",
        Observation::Unfinished {
            direction: Direction::Encrypt,
            done: 3 << 30,
            total: 8 << 30,
            journal_age: Some(Duration::from_secs(600)),
        },
    );
    let st = collect(&t, &f);
    assert_eq!(st.os, AdeState::EncryptionInProgress);
    assert_eq!(st.progress_message, "OS disk encryption started");
    let v = &st.volumes[0];
    assert_eq!(
        (v.percent, v.bytes_done, v.bytes_total),
        (Some(37), Some(3 << 30), Some(8 << 30))
    );
    assert_eq!(
        v.rate_bytes_per_sec, None,
        "journal untouched for 10 min: not running"
    );
    assert!(v.detail.contains("resumes at the next boot"));
}

#[test]
fn decrypted_and_no_data_volume() {
    let t = Tree::new();
    let f = Fake::vm(&t);
    let o = Options {
        volume_type: VolumeType::Os,
        force: Vec::new(),
        format_empty: false,
    };
    enable::enable(&f.target(), &o, &mut Vec::new()).unwrap();
    f.observe_as("osencrypt", Observation::Open { dm: "dm-0".into() });
    let st = collect(&t, &f);
    // plaintext data filesystems are mounted: ADE says NotEncrypted for data
    assert_eq!(
        (st.os, st.data),
        (AdeState::Encrypted, AdeState::NotEncrypted)
    );
    assert_eq!(st.progress_message, "Encryption succeeded for OS volume");
}
