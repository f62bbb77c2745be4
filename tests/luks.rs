//! LUKS handling against volumes made by stock cryptsetup on image files (no device-mapper needed):
//! LUKS1 and LUKS2, attached and detached headers, right and wrong keys, missing headers.

mod common;

use std::path::Path;

use common::{run, truncate};
use initcrypt::exit::Classify;
use initcrypt::luks::LuksVolume;
use initcrypt::secret::Secret;
use zeroize::Zeroizing;

fn secret(b: &[u8]) -> Secret {
    Secret::new(Zeroizing::new(b.to_vec()))
}

/// `cryptsetup luksFormat` with the fast PBKDF the harness uses; `header` = detached header file.
fn format(data: &Path, header: Option<&Path>, luks: &str, key: &Path) {
    let mut args = vec![
        "-q",
        "luksFormat",
        "--type",
        luks,
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        key.to_str().unwrap(),
    ];
    let hs;
    if let Some(h) = header {
        truncate(h, "4K");
        hs = h.to_str().unwrap().to_string();
        args.extend(["--header", &hs]);
    }
    args.push(data.to_str().unwrap());
    run("cryptsetup", &args);
}

#[test]
fn stock_volumes_open_for_key_checks_in_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let pass = common::ade_passphrase(9);
    std::fs::write(&key, &pass).unwrap();
    for luks in ["luks1", "luks2"] {
        for detached in [false, true] {
            let data = dir.path().join(format!("{luks}-{detached}.img"));
            truncate(&data, "32M");
            let hdr = dir.path().join(format!("{luks}-{detached}.hdr"));
            format(&data, detached.then_some(hdr.as_path()), luks, &key);
            let vol = LuksVolume::new(&data, detached.then_some(hdr.as_path()));
            let info = vol.info().unwrap();
            assert_eq!(info.version, if luks == "luks1" { 1 } else { 2 });
            assert!(!info.reencrypt_pending);
            let before = common::sha256(&data);
            vol.check_key(&secret(&pass), "LinuxPassPhraseFileName")
                .unwrap();
            let wrong = vol
                .check_key(&secret(b"wrong"), "LinuxPassPhraseFileName")
                .unwrap_err();
            assert_eq!(
                wrong.exit().code(),
                4,
                "{luks} detached={detached}: {wrong}"
            );
            assert!(wrong.to_string().contains("nothing was written"));
            assert_eq!(common::sha256(&data), before, "a key check writes nothing");
        }
    }
}

#[test]
fn missing_or_foreign_headers_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.img");
    truncate(&data, "8M");
    let missing = LuksVolume::new(&data, Some(&dir.path().join("nope")))
        .info()
        .unwrap_err();
    assert_eq!(missing.exit().code(), 5, "{missing}");
    let plain = LuksVolume::new(&data, None).info().unwrap_err();
    assert_eq!(plain.exit().code(), 6, "{plain}");
}

#[test]
fn unfinished_stock_reencryption_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"k").unwrap();
    let data = dir.path().join("d.img");
    truncate(&data, "16M");
    let hdr = dir.path().join("h");
    common::stock_encrypt(&data, &hdr, &key, &["--init-only"]);
    let info = LuksVolume::new(&data, Some(&hdr)).info().unwrap();
    assert!(
        info.reencrypt_pending,
        "ADE's online flow leaves exactly this state"
    );
}
