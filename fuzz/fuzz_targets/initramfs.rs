//! The initramfs reader (newc cpio, the uncompressed path status and enable use to find
//! volumes.json in an image) on hostile input: an error or a result, never a panic, a hang or a
//! huge allocation. Run with `scripts/fuzz`.
#![no_main]

use initcrypt::lifecycle::initramfs::{scan_cpio, Contents};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut c = Contents::default();
    let _ = scan_cpio(&mut std::io::Cursor::new(data), &mut c);
    if let Some(j) = &c.volumes_json {
        assert!(j.len() <= data.len());
    }
});
