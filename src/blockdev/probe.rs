//! Just enough superblock probing to match `UUID=` without blkid: LUKS1/2, ext2/3/4, XFS and FAT.

use std::io::{self, Read, Seek, SeekFrom};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `crypto_LUKS`, `ext4`, `xfs`, `vfat`.
    pub fstype: &'static str,
    pub uuid: Option<String>,
    /// LUKS version (1 or 2) when `fstype` is crypto_LUKS.
    pub luks_version: Option<u16>,
}

/// Identify what starts at the beginning of `r`; `Ok(None)` when nothing known is there.
pub fn probe<R: Read + Seek>(r: &mut R) -> io::Result<Option<Probe>> {
    let mut buf = vec![0u8; 2048];
    r.seek(SeekFrom::Start(0))?;
    let n = read_up_to(r, &mut buf)?;
    buf.truncate(n);
    Ok(luks(&buf)
        .or_else(|| ext(&buf))
        .or_else(|| xfs(&buf))
        .or_else(|| fat(&buf)))
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn cstr(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = std::str::from_utf8(&b[..end]).ok()?.trim();
    (!s.is_empty()).then(|| s.to_ascii_lowercase())
}

fn luks(b: &[u8]) -> Option<Probe> {
    if b.len() < 208 || &b[0..6] != b"LUKS\xba\xbe" {
        return None;
    }
    let version = u16::from_be_bytes([b[6], b[7]]);
    Some(Probe {
        fstype: "crypto_LUKS",
        uuid: cstr(&b[168..208]),
        luks_version: Some(version),
    })
}

fn ext(b: &[u8]) -> Option<Probe> {
    if b.len() < 1024 + 120 || b[1024 + 56..1024 + 58] != [0x53, 0xEF] {
        return None;
    }
    let u = &b[1024 + 104..1024 + 120];
    Some(Probe {
        fstype: "ext4",
        uuid: Some(uuid_be(u)),
        luks_version: None,
    })
}

fn xfs(b: &[u8]) -> Option<Probe> {
    if b.len() < 48 || &b[0..4] != b"XFSB" {
        return None;
    }
    Some(Probe {
        fstype: "xfs",
        uuid: Some(uuid_be(&b[32..48])),
        luks_version: None,
    })
}

fn fat(b: &[u8]) -> Option<Probe> {
    if b.len() < 512 || b[510] != 0x55 || b[511] != 0xAA {
        return None;
    }
    let id_at = if &b[82..87] == b"FAT32" {
        67
    } else if &b[54..57] == b"FAT" {
        39
    } else {
        return None;
    };
    let id = u32::from_le_bytes([b[id_at], b[id_at + 1], b[id_at + 2], b[id_at + 3]]);
    Some(Probe {
        fstype: "vfat",
        uuid: Some(format!("{:04x}-{:04x}", id >> 16, id & 0xffff)),
        luks_version: None,
    })
}

/// ext4 and XFS store the UUID as plain big-endian bytes (unlike GPT's mixed-endian GUIDs).
fn uuid_be(u: &[u8]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn luks_header_uuid() {
        let mut b = vec![0u8; 4096];
        b[0..6].copy_from_slice(b"LUKS\xba\xbe");
        b[7] = 2;
        b[168..204].copy_from_slice(b"0A1B2C3D-0000-4000-8000-000000000001");
        let p = probe(&mut Cursor::new(b)).unwrap().unwrap();
        assert_eq!(p.fstype, "crypto_LUKS");
        assert_eq!(p.luks_version, Some(2));
        assert_eq!(
            p.uuid.as_deref(),
            Some("0a1b2c3d-0000-4000-8000-000000000001")
        );
    }

    #[test]
    fn nothing_on_zeros_or_short_input() {
        assert_eq!(probe(&mut Cursor::new(vec![0u8; 4096])).unwrap(), None);
        assert_eq!(probe(&mut Cursor::new(vec![1u8; 10])).unwrap(), None);
    }
}
