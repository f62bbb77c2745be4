//! GPT and MBR partition tables, read from the raw disk: the kernel does not export PARTUUIDs in
//! sysfs, and `keyvol --device image.img` must find the first partition of an image file.
//! Every count and offset read from disk is bounded before use: the input may be hostile.

use std::io::{self, Read, Seek, SeekFrom};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Kernel numbering: GPT entry index + 1; MBR primaries 1–4, logicals from 5.
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// PARTUUID as the kernel and blkid print it (lowercase).
    pub uuid: String,
    pub kind: TableKind,
}

const MAX_GPT_ENTRIES: u32 = 1024;
const MAX_LOGICAL: u32 = 128;

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    r.seek(SeekFrom::Start(offset))?;
    r.read_exact(buf)
}

use crate::bytes::{le16, le32, le64};

/// GUIDs are stored mixed-endian: the first three fields little-endian, the rest as bytes.
pub fn guid_string(g: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// Partitions of a disk, empty when it has no table. `lbs` is the logical block size (GPT's unit).
pub fn partitions_of<R: Read + Seek>(r: &mut R, lbs: u64) -> io::Result<Vec<Partition>> {
    let mut mbr = [0u8; 512];
    if read_at(r, 0, &mut mbr).is_err() || mbr[510] != 0x55 || mbr[511] != 0xAA {
        return Ok(Vec::new());
    }
    let protective = (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xEE);
    if protective {
        // Try the given sector size, then the other common one (image files carry no queue limits).
        for size in [lbs, 512, 4096] {
            if let Some(parts) = gpt(r, size)? {
                return Ok(parts);
            }
        }
        return Ok(Vec::new());
    }
    if looks_like_fat_boot_sector(&mbr) {
        return Ok(Vec::new());
    }
    mbr_partitions(r, &mbr, lbs)
}

/// A partitionless FAT volume also ends in 55 AA; its jump instruction and BPB tell it apart, as the
/// kernel's msdos parser does.
fn looks_like_fat_boot_sector(s: &[u8; 512]) -> bool {
    let jump = s[0] == 0xEB || s[0] == 0xE9;
    let bps = u16::from_le_bytes([s[11], s[12]]);
    jump && matches!(bps, 512 | 1024 | 2048 | 4096) && s[13] != 0 && s[13].is_power_of_two()
}

fn gpt<R: Read + Seek>(r: &mut R, lbs: u64) -> io::Result<Option<Vec<Partition>>> {
    let mut hdr = [0u8; 92];
    if read_at(r, lbs, &mut hdr).is_err() || &hdr[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80).min(MAX_GPT_ENTRIES);
    let esize = le32(&hdr, 84);
    if !(128..=4096).contains(&esize) || entries_lba == 0 {
        return Ok(None);
    }
    let Some(base) = entries_lba.checked_mul(lbs) else {
        return Ok(None);
    };
    let mut table = vec![0u8; count as usize * esize as usize];
    if read_at(r, base, &mut table).is_err() {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(esize as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        // `last` is inclusive: 0..=u64::MAX would be 2^64 sectors, which no disk has.
        let Some(sectors) = last.checked_sub(first).and_then(|n| n.checked_add(1)) else {
            continue;
        };
        parts.push(Partition {
            number: i as u32 + 1,
            start: first.saturating_mul(lbs),
            size: sectors.saturating_mul(lbs),
            uuid: guid_string(&e[16..32]),
            kind: TableKind::Gpt,
        });
    }
    Ok(Some(parts))
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

/// MBR addresses count logical sectors: 512 bytes on most disks, 4096 on 4Kn ones.
fn mbr_partitions<R: Read + Seek>(
    r: &mut R,
    mbr: &[u8; 512],
    lbs: u64,
) -> io::Result<Vec<Partition>> {
    let sig = le32(mbr, 440);
    let mut parts = Vec::new();
    let mut extended = None;
    for i in 0..4 {
        let e = &mbr[446 + i * 16..446 + (i + 1) * 16];
        let (t, start, len) = (e[4], le32(e, 8) as u64, le32(e, 12) as u64);
        if t == 0 || len == 0 {
            continue;
        }
        if is_extended(t) {
            extended = Some(start);
        }
        parts.push(mbr_part(sig, i as u32 + 1, start, len, lbs));
    }
    if let Some(ext) = extended {
        logical_partitions(r, sig, ext, lbs, &mut parts)?;
    }
    Ok(parts)
}

fn mbr_part(sig: u32, number: u32, start: u64, len: u64, lbs: u64) -> Partition {
    Partition {
        number,
        start: start.saturating_mul(lbs),
        size: len.saturating_mul(lbs),
        uuid: format!("{sig:08x}-{number:02x}"),
        kind: TableKind::Mbr,
    }
}

/// Walk the EBR chain; bounded so a looping chain cannot hang the boot.
fn logical_partitions<R: Read + Seek>(
    r: &mut R,
    sig: u32,
    ext: u64,
    lbs: u64,
    parts: &mut Vec<Partition>,
) -> io::Result<()> {
    let mut ebr_at = ext;
    for n in 0..MAX_LOGICAL {
        let mut ebr = [0u8; 512];
        let at = ebr_at.saturating_mul(lbs);
        if read_at(r, at, &mut ebr).is_err() || ebr[510] != 0x55 || ebr[511] != 0xAA {
            break;
        }
        let (start, len) = (le32(&ebr, 446 + 8) as u64, le32(&ebr, 446 + 12) as u64);
        if len > 0 {
            parts.push(mbr_part(sig, 5 + n, ebr_at.saturating_add(start), len, lbs));
        }
        let next = le32(&ebr, 462 + 8) as u64;
        if next == 0 {
            break;
        }
        ebr_at = ext.saturating_add(next);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn guid_is_mixed_endian() {
        let g = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid_string(&g), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    }

    #[test]
    fn empty_and_garbage_disks_have_no_partitions() {
        assert!(partitions_of(&mut Cursor::new(vec![0u8; 4096]), 512)
            .unwrap()
            .is_empty());
        assert!(partitions_of(&mut Cursor::new(vec![0xffu8; 100]), 512)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn mbr_partuuid_format() {
        let mut d = vec![0u8; 4096];
        d[440..444].copy_from_slice(&0x1234abcdu32.to_le_bytes());
        d[446 + 4] = 0x83;
        d[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&100u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xAA;
        let p = partitions_of(&mut Cursor::new(d), 512).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].uuid, "1234abcd-01");
        assert_eq!(p[0].start, 2048 * 512);
    }

    /// A protective MBR and a GPT header at LBA 1 whose entry array (LBA 2) holds `entries`
    /// (first LBA, last LBA) pairs.
    fn gpt_disk(entries: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; 64 * 512];
        d[446 + 4] = 0xEE;
        d[510] = 0x55;
        d[511] = 0xAA;
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, (first, last)) in entries.iter().enumerate() {
            let e = 1024 + i * 128;
            d[e] = 0xA2; // any non-zero type GUID
            d[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            d[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
        }
        d
    }

    // Regression (fuzzer): an entry spanning LBA 0..=u64::MAX overflowed `last - first + 1`.
    #[test]
    fn gpt_entry_spanning_every_lba_is_skipped() {
        let d = gpt_disk(&[(0, u64::MAX), (5, 4), (34, 2047)]);
        let parts = partitions_of(&mut Cursor::new(d), 512).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!((parts[0].number, parts[0].start), (3, 34 * 512));
        assert_eq!(parts[0].size, (2047 - 34 + 1) * 512);
        let d = gpt_disk(&[(1, u64::MAX)]);
        let parts = partitions_of(&mut Cursor::new(d), 512).unwrap();
        assert_eq!(parts[0].size, u64::MAX, "2^64 - 1 sectors: size saturates");
    }

    #[test]
    fn looping_ebr_chain_is_bounded() {
        // Extended partition at sector 4; the EBR at sector 8 names itself (ext + 4) as the next one.
        let mut d = vec![0u8; 8192];
        d[446 + 4] = 0x05;
        d[446 + 8..446 + 12].copy_from_slice(&4u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&8u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xAA;
        for ebr in [4usize, 8] {
            let e = ebr * 512;
            d[e + 446 + 4] = 0x83;
            d[e + 446 + 8..e + 446 + 12].copy_from_slice(&1u32.to_le_bytes());
            d[e + 446 + 12..e + 446 + 16].copy_from_slice(&1u32.to_le_bytes());
            d[e + 462 + 4] = 0x05;
            d[e + 462 + 8..e + 462 + 12].copy_from_slice(&4u32.to_le_bytes());
            d[e + 510] = 0x55;
            d[e + 511] = 0xAA;
        }
        let parts = partitions_of(&mut Cursor::new(d), 512).unwrap();
        assert_eq!(parts.len(), 1 + MAX_LOGICAL as usize);
    }

    #[test]
    fn mbr_addresses_count_logical_sectors() {
        // One primary partition at LBA 256, 1024 sectors long, signature 0x11223344.
        let mut disk = vec![0u8; 8192];
        disk[440..444].copy_from_slice(&0x1122_3344u32.to_le_bytes());
        let e = 446;
        disk[e + 4] = 0x83;
        disk[e + 8..e + 12].copy_from_slice(&256u32.to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&1024u32.to_le_bytes());
        disk[510] = 0x55;
        disk[511] = 0xAA;
        for lbs in [512u64, 4096] {
            let parts = partitions_of(&mut Cursor::new(disk.clone()), lbs).unwrap();
            assert_eq!(parts.len(), 1);
            assert_eq!((parts[0].start, parts[0].size), (256 * lbs, 1024 * lbs));
            assert_eq!(parts[0].uuid, "11223344-01");
        }
    }
}
