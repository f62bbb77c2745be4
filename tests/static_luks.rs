//! libcryptsetup really works inside the binary, with no device-mapper: format a LUKS2 header
//! detached from its data image, add keyslots (pbkdf2 as our OS volumes use, argon2id as operator
//! passphrases may), load the header back from the file and check passphrases against it.
//!
//! Runs in the plain host build (Debian's dynamic libcryptsetup) and, built by
//! `scripts/build-static --test-bin static_luks`, as a fully static musl executable that
//! `tests/static/check-static.sh` runs under strace to prove nothing (.so, openssl.cnf, /etc/...) is
//! opened at run time. Needs a writable /run (LUKS2 metadata locks in /run/cryptsetup).

use std::fs::OpenOptions;
use std::path::Path;

use libcryptsetup_rs::consts::flags::{CryptActivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat};
use libcryptsetup_rs::{CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either};

/// What ADE writes on the key volume: base64 of 127 random bytes, 172 characters, no newline.
const PASSPHRASE: &[u8] = b"q0M8hU2vN4Zl7wRk1c9JfT5yXb3sPeA6gHiDoQuL0mVnW2KjY8rS4tZ1xCd7Ev9Bf3Gh5Ij6Kl8Mn0Op2Qr4St6Uv8Wx0Yz1a3b5c7d9e1f3g5h7i9j1k3l5m7n9o1p3q5r7s9t1u3v5w7x9y1z3A5B7C9D1E3F5G7H9I1J3K5L7M9N1O3P5Q7RSw=";
const OPERATOR_PASSPHRASE: &[u8] = b"correct horse battery staple";

fn make_file(path: &Path, len: u64) {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .expect("create image file");
    f.set_len(len).expect("size image file");
}

fn pbkdf2_min() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".to_string()),
        time_ms: 0,
        iterations: 1000,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

fn argon2id_small() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Argon2Id,
        hash: None,
        time_ms: 0,
        iterations: 4,
        max_memory_kb: 32 * 1024,
        parallel_threads: 1,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

#[test]
fn format_detached_luks2_header_then_load_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let header = dir.path().join("osluksheader");
    let data = dir.path().join("data.img");
    // libcryptsetup refuses a header file smaller than 4096 bytes (it grows it itself).
    make_file(&header, 4096);
    make_file(&data, 16 << 20);

    let uuid = {
        let mut dev = CryptInit::init_with_data_device(Either::Right((&header, &data)))
            .expect("crypt_init_data_device");
        dev.settings_handle()
            .set_pbkdf_type(&pbkdf2_min())
            .expect("set pbkdf2");
        // With a detached header, data_alignment is used as the data offset: 0 = ciphertext sector N
        // replaces plaintext sector N (the in-place layout of design §3).
        let params = CryptParamsLuks2 {
            pbkdf: None,
            integrity: None,
            integrity_params: None,
            data_alignment: 0,
            data_device: None,
            sector_size: 512,
            label: None,
            subsystem: None,
        };
        let mut params_ref: CryptParamsLuks2Ref<'_> = (&params).try_into().expect("params");
        dev.context_handle()
            .format(
                EncryptionFormat::Luks2,
                ("aes", "xts-plain64"),
                None,
                Either::Right(512 / 8),
                Some(&mut params_ref),
            )
            .expect("crypt_format LUKS2 (detached header)");
        let slot = dev
            .keyslot_handle()
            .add_by_key(None, None, PASSPHRASE, CryptVolumeKey::empty())
            .expect("add pbkdf2 keyslot");
        assert_eq!(slot, 0);

        dev.settings_handle()
            .set_pbkdf_type(&argon2id_small())
            .expect("set argon2id");
        let slot = dev
            .keyslot_handle()
            .add_by_passphrase(None, PASSPHRASE, OPERATOR_PASSPHRASE)
            .expect("add argon2id keyslot");
        assert_eq!(slot, 1);
        dev.status_handle().get_uuid().expect("uuid after format")
    };

    assert!(
        std::fs::metadata(&header).unwrap().len() > 4096,
        "libcryptsetup should have grown the detached header file"
    );

    // Load it back from the header file alone, as `initcrypt` does at boot.
    let mut dev = CryptInit::init(&header).expect("crypt_init on the header file");
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .expect("crypt_load LUKS2");
    assert_eq!(dev.status_handle().get_uuid().expect("uuid"), uuid);
    assert_eq!(dev.status_handle().get_cipher().expect("cipher"), "aes");
    assert_eq!(
        dev.status_handle().get_cipher_mode().expect("cipher mode"),
        "xts-plain64"
    );
    assert_eq!(dev.status_handle().get_volume_key_size(), 64);
    assert_eq!(
        dev.status_handle().get_data_offset(),
        0,
        "detached header: data starts at sector 0"
    );

    // name = None: check the passphrase against the keyslots without activating (no device-mapper).
    let act = |dev: &mut libcryptsetup_rs::CryptDevice, pass: &[u8]| {
        dev.activate_handle()
            .activate_by_passphrase(None, None, pass, CryptActivate::empty())
    };
    assert_eq!(act(&mut dev, PASSPHRASE).expect("pbkdf2 keyslot opens"), 0);
    assert_eq!(
        act(&mut dev, OPERATOR_PASSPHRASE).expect("argon2id keyslot opens"),
        1
    );
    assert!(
        act(&mut dev, b"wrong passphrase").is_err(),
        "a wrong passphrase must be rejected"
    );
}
