//! The device a pass works on, behind a trait so tests can inject short writes and I/O errors.
//!
//! Real devices are opened with O_DIRECT when the kernel allows it (not on tmpfs): writes bypass the
//! page cache, so `sync` only has to flush the device's own cache and memory stays constant in the
//! device size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

// A device's length is a size, never an "empty" collection: no is_empty.
#[allow(clippy::len_without_is_empty)]
pub trait Device: Send + Sync {
    fn len(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (FLUSH to the device).
    fn sync(&self) -> io::Result<()>;
}

pub struct FileDevice {
    file: File,
    len: u64,
}

impl FileDevice {
    /// Open read-write, O_DIRECT when possible. `O_EXCL` on a block device fails if anything has it
    /// mounted or mapped: the kernel's own answer to "is this device in use".
    pub fn open(path: &Path) -> io::Result<FileDevice> {
        let is_block = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        let excl = if is_block { libc::O_EXCL } else { 0 };
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags | excl)
                .open(path)
        };
        let file = match open(libc::O_DIRECT) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0)?,
            Err(e) => return Err(e),
        };
        let len = crate::blockdev::device_len(&file)?;
        Ok(FileDevice { file, len })
    }
}

impl Device for FileDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A plain file behind the `Device` seam: the journal (small, preallocated, written with
/// `pwrite` and made durable with `fdatasync`), so tests can route it through a simulated cache.
pub struct PlainFile {
    file: File,
}

impl PlainFile {
    pub fn new(file: File) -> io::Result<PlainFile> {
        Ok(PlainFile { file })
    }
}

impl Device for PlainFile {
    /// The file's current length (it grows while a journal is being created).
    fn len(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A heap buffer whose usable part starts on a 4096-byte boundary, as O_DIRECT requires, without
/// `unsafe`: over-allocate and start at the first aligned byte.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

pub const ALIGN: usize = 4096;

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let start = (ALIGN - (raw.as_ptr() as usize % ALIGN)) % ALIGN;
        AlignedBuf { raw, start, len }
    }

    pub fn slice(&self, len: usize) -> &[u8] {
        &self.raw[self.start..self.start + len.min(self.len)]
    }

    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        let end = self.start + len.min(self.len);
        &mut self.raw[self.start..end]
    }
}

impl Drop for AlignedBuf {
    /// Buffers hold plaintext of the disk being encrypted; clear them before the memory is reused.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned() {
        for n in [512, 4096, 1 << 20] {
            let mut b = AlignedBuf::new(n);
            assert_eq!(b.slice_mut(n).as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.slice(n).len(), n);
        }
    }
}
