//! The FAT reader: `fatfs` over a read-only, bounded view of a block device or image file.
//!
//! The key volume belongs to the platform; we never write it, and a corrupt or hostile image must end
//! in an error, never a panic or a hang. So: every write is refused by the storage wrapper (fatfs
//! cannot even mark the volume dirty), reads never leave the partition's bounds, directory listings stop
//! after `MAX_ENTRIES` (a looping cluster chain in a FAT32 root would otherwise be endless), and file
//! reads stop at `MAX_KEY_BYTES`.

use std::io::{self, Read, Seek, SeekFrom, Write};

use zeroize::Zeroizing;

/// Far above ADE's 172-byte passphrase, far below anything that could hurt an initramfs.
pub const MAX_KEY_BYTES: u64 = 64 * 1024;
/// Root directory entries looked at, long-name fragments included.
pub const MAX_ENTRIES: usize = 4096;

/// A read-only window `[offset, offset + len)` of an underlying reader.
pub struct ReadOnlySlice<R> {
    inner: R,
    offset: u64,
    len: u64,
    pos: u64,
}

impl<R: Read + Seek> ReadOnlySlice<R> {
    pub fn new(inner: R, offset: u64, len: u64) -> Self {
        ReadOnlySlice {
            inner,
            offset,
            len,
            pos: 0,
        }
    }
}

impl<R: Read + Seek> Read for ReadOnlySlice<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let at = self
            .offset
            .checked_add(self.pos)
            .ok_or_else(|| io::Error::other("offset overflow"))?;
        self.inner.seek(SeekFrom::Start(at))?;
        let n = self.inner.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R> Write for ReadOnlySlice<R> {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the key volume is read-only for initcrypt",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R> Seek for ReadOnlySlice<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the volume",
            )),
        }
    }
}

/// What a FAT volume holds, as far as we care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub fat_type: &'static str,
    /// Boot-sector label, and the root-directory label entry when there is one.
    pub labels: Vec<String>,
    pub files: Vec<(String, u64)>,
}

/// Parse a FAT filesystem and list its root directory's files.
pub fn list<R: Read + Seek>(storage: ReadOnlySlice<R>) -> io::Result<Listing> {
    let fs = fatfs::FileSystem::new(storage, fatfs::FsOptions::new())?;
    let fat_type = match fs.fat_type() {
        fatfs::FatType::Fat12 => "FAT12",
        fatfs::FatType::Fat16 => "FAT16",
        fatfs::FatType::Fat32 => "FAT32",
    };
    let mut labels = vec![fs.volume_label().trim_end().to_string()];
    if let Ok(Some(l)) = fs.read_volume_label_from_root_dir() {
        labels.push(l.trim_end().to_string());
    }
    let mut files = Vec::new();
    for entry in fs.root_dir().iter().take(MAX_ENTRIES) {
        let entry = entry?;
        if entry.is_file() {
            files.push((entry.file_name(), entry.len()));
        }
    }
    Ok(Listing {
        fat_type,
        labels,
        files,
    })
}

/// Read one root-directory file, whole, into zeroizing memory.
pub fn read_file<R: Read + Seek>(
    storage: ReadOnlySlice<R>,
    name: &str,
) -> io::Result<Zeroizing<Vec<u8>>> {
    let fs = fatfs::FileSystem::new(storage, fatfs::FsOptions::new())?;
    let entry = fs
        .root_dir()
        .iter()
        .take(MAX_ENTRIES)
        .filter_map(Result::ok)
        .find(|e| e.is_file() && e.file_name() == name)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} vanished from the key volume"),
            )
        })?;
    if entry.len() > MAX_KEY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{name} is {} bytes, more than the {MAX_KEY_BYTES} a key file may have",
                entry.len()
            ),
        ));
    }
    // Capacity is fixed up front and never exceeded, so the Vec never reallocates and leaves no
    // unzeroized copy of key bytes behind.
    let want = entry.len() as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(want));
    let mut file = entry.to_file();
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let n = file.read(&mut chunk[..])?;
        if n == 0 {
            break;
        }
        if out.len() + n > want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is longer than its directory entry says"),
            ));
        }
        out.extend_from_slice(&chunk[..n]);
    }
    if out.len() != want {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{name}: cluster chain shorter than the file"),
        ));
    }
    Ok(out)
}
