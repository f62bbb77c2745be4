//! Little-endian fields of on-disk structures (journal, partition tables, FAT), read once here.
//!
//! Callers read fixed-size buffers they have already length-checked; a field past the end of the
//! buffer reads as zero instead of panicking, so a wrong offset shows up as a bad value (which every
//! reader validates) and never as an abort in the initramfs.

fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = at.checked_add(N).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    a
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(field(b, at))
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(field(b, at))
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(field(b, at))
}

pub fn le128(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(field(b, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_zero_past_the_end() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le16(&b, 0), 0x0201);
        assert_eq!(le32(&b, 1), 0x0504_0302);
        assert_eq!(le64(&b, 1), 0x0908_0706_0504_0302);
        assert_eq!(le32(&b, 7), 0);
        assert_eq!(le64(&b, usize::MAX), 0);
    }
}
