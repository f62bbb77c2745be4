//! The CLI contract of design §4: exit codes, one-line errors, --help everywhere.

mod common;

use common::initcrypt;

const SUBCOMMANDS: &[&str] = &[
    "boot",
    "generator",
    "keys",
    "keyscript",
    "encrypt",
    "encrypt-image",
    "decrypt",
    "status",
    "keyvol",
    "enable",
    "disable",
    "rotate",
    "check",
];

#[test]
fn every_subcommand_has_help() {
    for sub in SUBCOMMANDS {
        let out = initcrypt().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{sub}"
        );
    }
}

#[test]
fn usage_errors_exit_2_and_unimplemented_never_succeeds() {
    let out = initcrypt().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    {
        let args = ["encrypt", "--online", "x"];
        let out = initcrypt().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not implemented"));
    }
    let out = initcrypt()
        .env_remove("CRYPTTAB_NAME")
        .arg("keyscript")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn invalid_config_exits_8_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("volumes.json");
    std::fs::write(&cfg, r#"{"version":1,"volumes":[{"name":"d","role":"data","device":"/dev/sdc","key_file":"k","desired":"encrypted"}]}"#).unwrap();
    let out = initcrypt()
        .args(["--config", cfg.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("volumes[0].device"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn encrypt_and_decrypt_of_an_unknown_volume_exit_8() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("volumes.json");
    std::fs::write(&cfg, r#"{"version":1,"volumes":[]}"#).unwrap();
    for verb in ["encrypt", "decrypt"] {
        let out = initcrypt()
            .args(["--config", cfg.to_str().unwrap(), verb, "nope"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(8), "{verb}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("no volume named nope"));
    }
}

#[test]
fn status_json_reports_missing_devices_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("volumes.json");
    std::fs::write(
        &cfg,
        r#"{"version":1,"volumes":[{"name":"d","role":"data","device":"UUID=00000000-dead-beef-0000-000000000000","key_file":"k","desired":"encrypted"}]}"#,
    )
    .unwrap();
    let start = std::time::Instant::now();
    let out = initcrypt()
        .args(["--config", cfg.to_str().unwrap(), "status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed().as_secs() < 20,
        "status must not wait for devices"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"], "NotMounted");
    assert_eq!(v["os"], "NotEncrypted");
    assert_eq!(v["volumes"][0]["name"], "d");
}

/// The lifecycle commands' usage errors exit 2 and change nothing; a tree that is not a VM root
/// fails check with the layout code and one summary line.
#[test]
fn lifecycle_usage_and_an_empty_root() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    let root = dir.path().to_str().unwrap();
    for args in [
        &[
            "enable",
            "--volume-type",
            "all",
            "--format-empty",
            "--root",
            root,
        ][..],
        &["enable", "--volume-type", "bogus", "--root", root],
        &["check", "--root", "/nonexistent-initcrypt-root"],
        &[
            "--config",
            "/tmp/x.json",
            "disable",
            "--volume-type",
            "data",
            "--root",
            root,
        ],
    ] {
        let out = initcrypt().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{args:?}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("etc")).unwrap().count(),
        0,
        "nothing written"
    );
    let out = initcrypt()
        .args(["check", "--root", root])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("fail  os.layout")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("ok    memory")),
        "{stdout}"
    );
    let out = initcrypt()
        .args(["check", "--root", root, "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == "boot.partition" && f["level"] == "fail"));
}
