//! The key-volume reader on hostile input: FAT12/16/32 parsing, root listing, key-file reads and
//! MBR/GPT partition tables must end in an error, never a panic, an overflow, a hang or a huge
//! allocation. Run with `scripts/fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Partitions whose FAT is parsed too, as `keyvol --device image.img` does (first few only, so
/// a 128-entry GPT does not make one input 128 times slower).
const MAX_PARTITIONS: usize = 4;

fuzz_target!(|data: &[u8]| {
    // The image as a partitionless volume, then its partition table.
    initcrypt::keyvol::fuzz_image(data);
    // And each partition's contents, as `keyvol::open_path` reads them (bounds clamped to the
    // image: past its end a device read returns nothing, as the slice's end does).
    let mut cursor = std::io::Cursor::new(data);
    let Ok(parts) = initcrypt::blockdev::partitions_of(&mut cursor, 512) else {
        return;
    };
    for p in parts.iter().take(MAX_PARTITIONS) {
        let len = data.len() as u64;
        if p.start >= len {
            continue;
        }
        let end = p.start.saturating_add(p.size).min(len);
        initcrypt::keyvol::fuzz_image(&data[p.start as usize..end as usize]);
    }
});
