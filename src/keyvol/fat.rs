//! The FAT reader: `fatfs` over a read-only, bounded view of a block device or image file.
//!
//! The key volume belongs to the platform; we never write it, and a corrupt or hostile image must end
//! in an error, never a panic or a hang. So: every write is refused by the storage wrapper (fatfs
//! cannot even mark the volume dirty), reads never leave the partition's bounds, directory listings stop
//! after `MAX_ENTRIES`, and file reads stop at `MAX_KEY_BYTES`.
//!
//! fatfs 0.3.6 trusts the numbers on disk: it does unchecked `u32` arithmetic on BPB fields and on
//! cluster numbers from the FAT and from directory entries (an overflow panics where overflow checks
//! are on, as in debug and fuzz builds, and silently reads the wrong sectors where they are off), and
//! it walks a FAT32 root directory's cluster chain with no bound (a looping chain of deleted entries
//! never ends, whatever `MAX_ENTRIES` says). [`Layout`] re-reads each of those numbers with checked
//! arithmetic before fatfs sees the volume, walks the root directory itself within `MAX_ROOT_BYTES`,
//! and checks a key file's cluster chain before fatfs follows it; fatfs is only used on what passed.
//!
//! fatfs also takes a short read for the end of a directory. On a truncated image or a device that
//! is still being attached, that made a key volume with keys look like one without files, and the
//! boot then stopped searching and blamed the key files. So a volume must hold every byte its boot
//! sector declares, and a read error inside the root directory is an error, never its end.

use std::io::{self, Read, Seek, SeekFrom, Write};

use zeroize::Zeroizing;

/// Far above ADE's 172-byte passphrase, far below anything that could hurt an initramfs.
pub const MAX_KEY_BYTES: u64 = 64 * 1024;
/// Root directory entries listed (long-name fragments and deleted entries are not counted).
pub const MAX_ENTRIES: usize = 4096;
/// The largest root directory we accept: the largest a FAT12/16 BPB can declare (65535 entries). A
/// FAT32 root chain that does not end within it is refused (loop or corruption).
const MAX_ROOT_BYTES: u64 = 65536 * DIR_ENTRY;
const DIR_ENTRY: u64 = 32;

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

    /// The window's length: what the device (or partition) holds, as far as the reader may go.
    pub fn size(&self) -> u64 {
        self.len
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

/// An in-memory image seen as a device of `len` bytes whose part past the data reads as zeros.
/// The fuzz target hands the reader prefixes of real key volumes (boot sector, FATs, root directory,
/// first files: what fits in a fuzz input), which declare far more than they hold; through this
/// view the whole reader still runs on them, and on the bare prefix the truncation check does.
pub struct ZeroTail<'a> {
    data: &'a [u8],
    len: u64,
    pos: u64,
}

impl<'a> ZeroTail<'a> {
    /// The view as long as the boot sector of `data` declares (at most 1 TiB), or as `data`.
    pub fn declared(data: &'a [u8]) -> Self {
        let declared = Layout::read(&mut io::Cursor::new(data))
            .map(|l| l.declared_len.min(1 << 40))
            .unwrap_or(0);
        ZeroTail {
            data,
            len: declared.max(data.len() as u64),
            pos: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.len
    }
}

impl Read for ZeroTail<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        let from_data = self.data.get(self.pos as usize..).unwrap_or_default();
        let n = want.min(from_data.len());
        buf[..n].copy_from_slice(&from_data[..n]);
        buf[n..want].fill(0);
        self.pos += want as u64;
        Ok(want)
    }
}

impl Seek for ZeroTail<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
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

/// Why `list` refused a volume. The two cases call for different reactions: a device that holds
/// something else is skipped, while a FAT volume that cannot be read whole may be the key volume
/// itself (truncated, not fully attached yet, or failing) and must never pass for one without files.
#[derive(Debug)]
pub enum Refused {
    /// No FAT boot sector we can use: the device holds something else.
    NotFat(io::Error),
    /// A FAT boot sector, but the volume is truncated or its FAT or root directory cannot be read.
    Damaged {
        /// The label in the boot sector (the root directory's label entry could not be read).
        boot_label: String,
        source: io::Error,
    },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NotFat(e) => write!(f, "not FAT: {e}"),
            Refused::Damaged { source, .. } => write!(f, "{source}"),
        }
    }
}

/// Parse a FAT filesystem and list its root directory's files.
pub fn list<R: Read + Seek>(mut storage: ReadOnlySlice<R>) -> Result<Listing, Refused> {
    let layout = Layout::read(&mut storage).map_err(Refused::NotFat)?;
    let damaged = |source: io::Error| Refused::Damaged {
        boot_label: layout.boot_label.clone(),
        source,
    };
    layout.check_fits(storage.size()).map_err(damaged)?;
    layout.root_entries(&mut storage).map_err(damaged)?;
    // fatfs checks a few BPB fields of its own; what it refuses after ours passed is not a volume
    // we can read, as before.
    let fs = mount(&mut storage).map_err(Refused::NotFat)?;
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
        let entry = entry.map_err(damaged)?;
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
    mut storage: ReadOnlySlice<R>,
    name: &str,
) -> io::Result<Zeroizing<Vec<u8>>> {
    let layout = Layout::read(&mut storage)?;
    layout.check_fits(storage.size())?;
    let raw = layout.root_entries(&mut storage)?;
    // fatfs matches the (long) name; its iterator yields the root's entries in the order
    // `root_entries` collected them, so the index names the raw entry, whose cluster chain is
    // checked before fatfs follows it.
    let index = {
        let fs = mount(&mut storage)?;
        let found = fs
            .root_dir()
            .iter()
            .take(MAX_ENTRIES)
            .map_while(Result::ok)
            .position(|e| e.is_file() && e.file_name() == name);
        found.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} vanished from the key volume"),
            )
        })?
    };
    let Some(entry) = raw.get(index).filter(|e| !e.is_dir()) else {
        return Err(corrupt(format!(
            "{name}: fatfs and the raw root directory disagree"
        )));
    };
    if u64::from(entry.size) > MAX_KEY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{name} is {} bytes, more than the {MAX_KEY_BYTES} a key file may have",
                entry.size
            ),
        ));
    }
    layout.check_chain(&mut storage, entry.first_cluster, entry.size)?;

    let fs = mount(&mut storage)?;
    let Some(file_entry) = fs
        .root_dir()
        .iter()
        .map_while(Result::ok)
        .nth(index)
        .filter(|e| e.is_file() && e.file_name() == name && e.len() == u64::from(entry.size))
    else {
        return Err(corrupt(format!(
            "{name}: directory entry changed between two reads"
        )));
    };
    // Capacity is fixed up front and never exceeded, so the Vec never reallocates and leaves no
    // unzeroized copy of key bytes behind.
    let want = entry.size as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(want));
    let mut file = file_entry.to_file();
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

/// fatfs over the (already checked) volume; it borrows the storage, so the checks can read it again.
fn mount<R: Read + Seek>(
    storage: &mut ReadOnlySlice<R>,
) -> io::Result<fatfs::FileSystem<&mut ReadOnlySlice<R>>> {
    storage.seek(SeekFrom::Start(0))?; // fatfs asserts it is handed the volume at offset 0
    fatfs::FileSystem::new(storage, fatfs::FsOptions::new())
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    r.seek(SeekFrom::Start(offset))?;
    r.read_exact(buf)
}

fn le16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The boot sector's volume label, present when the extended boot signature is 0x29 (0x28 stops
/// after the volume ID).
fn boot_label(b: &[u8; 512], is_fat32: bool) -> String {
    let (sig, at) = if is_fat32 { (66, 71) } else { (38, 43) };
    if b[sig] != 0x29 {
        return String::new();
    }
    String::from_utf8_lossy(&b[at..at + 11])
        .trim_end()
        .to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FatBits {
    Fat12,
    Fat16,
    Fat32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    /// FAT12/16: a fixed region, byte offset and length.
    Region { offset: u64, len: u64 },
    /// FAT32: a cluster chain from this cluster.
    Chain(u32),
}

/// The numbers of a FAT volume that fatfs computes with, read from the boot sector the way fatfs
/// reads them, but with checked arithmetic: `read` refuses a boot sector on which any of fatfs's
/// `u32` computations would overflow (fatfs refuses what else is wrong with it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    bits: FatBits,
    cluster_size: u64,
    /// Byte offset and length of the FAT fatfs reads (the active one when mirroring is off).
    fat_offset: u64,
    fat_len: u64,
    first_data_byte: u64,
    /// The highest cluster number: `total_clusters + 1` (numbering starts at 2).
    max_cluster: u32,
    root: Root,
    /// `total_sectors * bytes_per_sector`: what the device must hold.
    declared_len: u64,
    /// The label field of the boot sector (blank when it has none).
    boot_label: String,
}

/// A root-directory entry as fatfs's iterator yields it (not deleted, not a long-name fragment,
/// not the volume label), with the cluster fatfs would start reading at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawEntry {
    attrs: u8,
    first_cluster: u32,
    size: u32,
}

impl RawEntry {
    fn is_dir(&self) -> bool {
        self.attrs & 0x10 != 0
    }
}

/// What a cluster's FAT entry says comes next, as fatfs reads it.
enum Next {
    Cluster(u32),
    /// End of chain, bad cluster or free: fatfs stops there.
    End,
}

impl Layout {
    fn read<R: Read + Seek>(r: &mut R) -> io::Result<Layout> {
        let mut b = [0u8; 512];
        read_at(r, 0, &mut b)?;
        if b[510..512] != [0x55, 0xAA] {
            return Err(corrupt("no boot sector signature"));
        }
        let bytes_per_sector = le16(&b, 11);
        let sectors_per_cluster = u32::from(b[13]);
        let reserved = le16(&b, 14);
        let fats = u32::from(b[16]);
        let root_entries = le16(&b, 17);
        let total_16 = le16(&b, 19);
        let fat_16 = le16(&b, 22);
        let total_32 = le32(&b, 32);
        if !bytes_per_sector.is_power_of_two() || !(512..=4096).contains(&bytes_per_sector) {
            return Err(corrupt(format!("bytes per sector {bytes_per_sector}")));
        }
        if !sectors_per_cluster.is_power_of_two() || sectors_per_cluster > 128 {
            return Err(corrupt(format!(
                "sectors per cluster {sectors_per_cluster}"
            )));
        }
        if reserved == 0 || fats == 0 {
            return Err(corrupt("no reserved sectors or no FAT"));
        }
        // fatfs reads the FAT32 fields only when the FAT12/16 FAT size is 0.
        let is_fat32 = fat_16 == 0;
        let (sectors_per_fat, ext_flags, root_cluster) = if is_fat32 {
            (le32(&b, 36), le16(&b, 40), le32(&b, 44))
        } else {
            (fat_16, 0, 0)
        };
        let total_sectors = if total_16 == 0 { total_32 } else { total_16 };
        // fatfs computes these in u32: reserved + fats * sectors_per_fat + root sectors, and
        // sectors_per_fat * bytes_per_sector * 8 (FAT entries).
        let bps = u64::from(bytes_per_sector);
        let root_sectors = (u64::from(root_entries) * DIR_ENTRY).div_ceil(bps);
        let first_data_sector = u64::from(fats)
            .checked_mul(u64::from(sectors_per_fat))
            .and_then(|f| f.checked_add(u64::from(reserved) + root_sectors))
            .filter(|&s| s <= u64::from(u32::MAX))
            .ok_or_else(|| corrupt("FAT region larger than 2^32 sectors"))?;
        if u64::from(sectors_per_fat) * bps * 8 > u64::from(u32::MAX) {
            return Err(corrupt("FAT larger than 512 MiB"));
        }
        if u64::from(total_sectors) <= first_data_sector {
            return Err(corrupt("no data region"));
        }
        let total_clusters =
            (u64::from(total_sectors) - first_data_sector) / u64::from(sectors_per_cluster);
        let bits = match total_clusters {
            0..4085 => FatBits::Fat12,
            4085..65525 => FatBits::Fat16,
            _ => FatBits::Fat32,
        };
        if is_fat32 != (bits == FatBits::Fat32) || total_clusters > 0x0FFF_FFFF {
            return Err(corrupt(format!(
                "{total_clusters} clusters do not fit the FAT type the BPB declares"
            )));
        }
        let max_cluster = total_clusters as u32 + 1;
        // With mirroring off (FAT32 flag 0x80), fatfs reads FAT number `flags & 15` only, at
        // reserved + n * sectors_per_fat, again in u32.
        let active_fat = if ext_flags & 0x80 != 0 {
            ext_flags & 0x0F
        } else {
            0
        };
        let fat_sector = u64::from(reserved) + u64::from(active_fat) * u64::from(sectors_per_fat);
        if fat_sector > u64::from(u32::MAX) {
            return Err(corrupt(format!(
                "active FAT {active_fat} beyond 2^32 sectors"
            )));
        }
        let root = if is_fat32 {
            if !(2..=max_cluster).contains(&root_cluster) {
                return Err(corrupt(format!("root directory cluster {root_cluster}")));
            }
            Root::Chain(root_cluster)
        } else {
            Root::Region {
                offset: (first_data_sector - root_sectors) * bps,
                len: root_sectors * bps,
            }
        };
        Ok(Layout {
            bits,
            cluster_size: u64::from(sectors_per_cluster) * bps,
            fat_offset: fat_sector * bps,
            fat_len: u64::from(sectors_per_fat) * bps,
            first_data_byte: first_data_sector * bps,
            max_cluster,
            root,
            declared_len: u64::from(total_sectors) * bps,
            boot_label: boot_label(&b, is_fat32),
        })
    }

    /// Refuse a volume that its device does not hold whole. Every cluster lies inside the declared
    /// length, so this also covers the FAT copies, the root directory and the root's cluster chain;
    /// the message names where those end, the part a listing needs. mkfs.fat and Windows never
    /// declare more than the partition, so only a truncated copy or a half-attached disk fails.
    fn check_fits(&self, len: u64) -> io::Result<()> {
        if self.declared_len <= len {
            return Ok(());
        }
        let root_end = match self.root {
            Root::Region { offset, len } => offset + len,
            Root::Chain(c) => self.cluster_offset(c) + self.cluster_size,
        };
        let regions_end = root_end.max(self.first_data_byte);
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "truncated: its boot sector declares {} bytes, its FAT and root directory end at byte {regions_end}, the device has {len} bytes",
                self.declared_len
            ),
        ))
    }

    /// Byte offset of a cluster `2..=max_cluster` (no overflow: it lies within the 2^32 sectors).
    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.first_data_byte + u64::from(cluster - 2) * self.cluster_size
    }

    /// The FAT entry of `cluster` (in `2..=max_cluster`), classified as fatfs classifies it; a
    /// link that fatfs would follow to a cluster number outside the volume is an error.
    fn next<R: Read + Seek>(&self, r: &mut R, cluster: u32) -> io::Result<Next> {
        let (at, width) = match self.bits {
            FatBits::Fat12 => (u64::from(cluster) + u64::from(cluster / 2), 2),
            FatBits::Fat16 => (u64::from(cluster) * 2, 2),
            FatBits::Fat32 => (u64::from(cluster) * 4, 4),
        };
        if at + width > self.fat_len {
            return Err(corrupt(format!("cluster {cluster} is beyond the FAT")));
        }
        let mut e = [0u8; 4];
        read_at(r, self.fat_offset + at, &mut e[..width as usize])?;
        let v = u32::from_le_bytes(e);
        let (v, bad) = match self.bits {
            FatBits::Fat12 if cluster & 1 == 0 => (v & 0x0FFF, 0xFF7),
            FatBits::Fat12 => (v >> 4, 0xFF7),
            FatBits::Fat16 => (v, 0xFFF7),
            FatBits::Fat32 => (v & 0x0FFF_FFFF, 0x0FFF_FFF7),
        };
        // fatfs: 0 is free, `bad` is a bad cluster, above it end of chain; FAT32 entries of
        // clusters 0x0FFFFFF7.. (special values themselves) read as bad.
        if v == 0 || v >= bad || (self.bits == FatBits::Fat32 && cluster >= 0x0FFF_FFF7) {
            return Ok(Next::End);
        }
        if !(2..=self.max_cluster).contains(&v) {
            return Err(corrupt(format!(
                "FAT entry of cluster {cluster} links to cluster {v}, outside 2..={}",
                self.max_cluster
            )));
        }
        Ok(Next::Cluster(v))
    }

    /// The root directory's entries in fatfs's iteration order, up to the end marker, the end of
    /// the region or the end of the chain. A FAT32 root chain is checked link by link as fatfs will
    /// follow it, and refused when it runs past `MAX_ROOT_BYTES` (a loop, or not a key volume).
    fn root_entries<R: Read + Seek>(&self, r: &mut R) -> io::Result<Vec<RawEntry>> {
        let mut out = Vec::new();
        let mut e = [0u8; DIR_ENTRY as usize];
        let (mut offset, mut left, mut cluster) = match self.root {
            Root::Region { offset, len } => (offset, len, None),
            Root::Chain(c) => (self.cluster_offset(c), self.cluster_size, Some(c)),
        };
        let mut seen = 0;
        loop {
            if left == 0 {
                let Some(c) = cluster else { break };
                match self.next(r, c)? {
                    Next::End => break,
                    Next::Cluster(n) => {
                        cluster = Some(n);
                        offset = self.cluster_offset(n);
                        left = self.cluster_size;
                    }
                }
            }
            if seen >= MAX_ROOT_BYTES {
                return Err(corrupt(format!(
                    "root directory longer than {MAX_ROOT_BYTES} bytes (looping cluster chain?)"
                )));
            }
            // Only the end marker ends the directory: a read error here (a bad sector, or the device
            // ending early) would otherwise hide every entry after it.
            read_at(r, offset, &mut e).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("cannot read the root directory at byte {offset}: {err}"),
                )
            })?;
            if e[0] == 0 {
                break;
            }
            offset += DIR_ENTRY;
            left -= DIR_ENTRY;
            seen += DIR_ENTRY;
            let attrs = e[11];
            let deleted = e[0] == 0xE5;
            let long_name = attrs & 0x0F == 0x0F;
            let label = attrs & 0x08 != 0;
            if deleted || long_name || label {
                continue;
            }
            let hi = if self.bits == FatBits::Fat32 {
                le16(&e, 20)
            } else {
                0
            };
            out.push(RawEntry {
                attrs,
                first_cluster: hi << 16 | le16(&e, 26),
                size: le32(&e, 28),
            });
        }
        Ok(out)
    }

    /// Check the clusters fatfs reads for a file of `size` bytes from `first`: the first one and
    /// every link up to the last one it needs. A chain that ends early is left to the reader (it
    /// reports a short file); a link outside the volume is an error.
    fn check_chain<R: Read + Seek>(&self, r: &mut R, first: u32, size: u32) -> io::Result<()> {
        if first == 0 || size == 0 {
            return Ok(()); // fatfs reads nothing
        }
        if !(2..=self.max_cluster).contains(&first) {
            return Err(corrupt(format!(
                "file starts at cluster {first}, outside 2..={}",
                self.max_cluster
            )));
        }
        let clusters = u64::from(size).div_ceil(self.cluster_size);
        let mut c = first;
        for _ in 1..clusters {
            match self.next(r, c)? {
                Next::Cluster(n) => c = n,
                Next::End => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SECTOR: usize = 512;

    fn slice(img: &[u8]) -> ReadOnlySlice<Cursor<&[u8]>> {
        ReadOnlySlice::new(Cursor::new(img), 0, img.len() as u64)
    }

    fn put16(img: &mut [u8], at: usize, v: u16) {
        img[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(img: &mut [u8], at: usize, v: u32) {
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A boot sector: 512-byte sectors, 1 sector per cluster, one FAT, label BEK VOLUME.
    fn boot_sector(img: &mut [u8], reserved: u16, fat32: bool) {
        img[0..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
        img[3..11].copy_from_slice(b"mkfs.fat");
        put16(img, 11, SECTOR as u16);
        img[13] = 1;
        put16(img, 14, reserved);
        img[16] = 1;
        img[21] = 0xF8;
        let ext = if fat32 { 64 } else { 36 };
        img[ext + 2] = 0x29;
        img[ext + 7..ext + 18].copy_from_slice(b"BEK VOLUME ");
        img[ext + 18..ext + 26].copy_from_slice(if fat32 { b"FAT32   " } else { b"FAT12   " });
        img[510] = 0x55;
        img[511] = 0xAA;
    }

    fn dir_entry(img: &mut [u8], at: usize, name: &[u8; 11], cluster: u32, size: u32) {
        img[at..at + 11].copy_from_slice(name);
        img[at + 11] = 0x20;
        put16(img, at + 20, (cluster >> 16) as u16);
        put16(img, at + 26, cluster as u16);
        put32(img, at + 28, size);
    }

    /// FAT12, 64 sectors: boot, FAT, root (16 entries), 61 data clusters. KEY (5 bytes) is at
    /// cluster 2; the root entry is at byte `2 * SECTOR`, the FAT at `SECTOR`.
    fn fat12() -> Vec<u8> {
        let mut img = vec![0u8; 64 * SECTOR];
        boot_sector(&mut img, 1, false);
        put16(&mut img, 17, 16); // root entries
        put16(&mut img, 19, 64); // total sectors
        put16(&mut img, 22, 1); // sectors per FAT
        img[SECTOR..SECTOR + 3].copy_from_slice(&[0xF8, 0xFF, 0xFF]);
        set_fat12(&mut img, 2, 0xFFF);
        dir_entry(&mut img, 2 * SECTOR, b"KEY        ", 2, 5);
        img[3 * SECTOR..3 * SECTOR + 5].copy_from_slice(b"hello");
        img
    }

    fn set_fat12(img: &mut [u8], cluster: usize, v: u16) {
        let at = SECTOR + cluster + cluster / 2;
        let old = u16::from_le_bytes([img[at], img[at + 1]]);
        let new = if cluster & 1 == 0 {
            (old & 0xF000) | v
        } else {
            (old & 0x000F) | (v << 4)
        };
        put16(img, at, new);
    }

    /// FAT32 with 65600 clusters (the fewest FAT32 allows is 65525): 33 MB, zeroed memory the
    /// tests never touch past the first clusters. The image holds all it declares: a shorter one is
    /// truncated. FSInfo in sector 1, FAT at sector 8 (513 sectors), cluster 2 at sector 521.
    const FAT32_FAT: usize = 8 * SECTOR;
    const FAT32_ROOT: usize = 521 * SECTOR;
    const FAT32_SECTORS: usize = 8 + 513 + 65600;

    fn fat32() -> Vec<u8> {
        let mut img = vec![0u8; FAT32_SECTORS * SECTOR];
        boot_sector(&mut img, 8, true);
        put32(&mut img, 32, FAT32_SECTORS as u32); // total sectors
        put32(&mut img, 36, 513); // sectors per FAT
        put32(&mut img, 44, 2); // root cluster
        put16(&mut img, 48, 1); // FSInfo
        put16(&mut img, 50, 6); // backup boot sector
        put32(&mut img, SECTOR, 0x4161_5252);
        put32(&mut img, SECTOR + 484, 0x6141_7272);
        put32(&mut img, SECTOR + 488, 0xFFFF_FFFF);
        put32(&mut img, SECTOR + 492, 0xFFFF_FFFF);
        put32(&mut img, SECTOR + 508, 0xAA55_0000);
        put32(&mut img, FAT32_FAT, 0x0FFF_FFF8);
        put32(&mut img, FAT32_FAT + 4, 0x0FFF_FFFF);
        put32(&mut img, FAT32_FAT + 8, 0x0FFF_FFFF); // root: one cluster
        put32(&mut img, FAT32_FAT + 12, 0x0FFF_FFFF); // KEY: one cluster
        dir_entry(&mut img, FAT32_ROOT, b"KEY        ", 3, 5);
        img[FAT32_ROOT + SECTOR..FAT32_ROOT + SECTOR + 5].copy_from_slice(b"hello");
        img
    }

    fn read_key(img: &[u8]) -> io::Result<Vec<u8>> {
        read_file(slice(img), "KEY").map(|k| k.to_vec())
    }

    fn refused<E: std::fmt::Display>(r: Result<impl std::fmt::Debug, E>) -> String {
        r.expect_err("a corrupt image must be refused").to_string()
    }

    /// The reason of a `Damaged` refusal; panics on success or on `NotFat`.
    fn damaged(r: Result<Listing, Refused>) -> io::Error {
        match r {
            Err(Refused::Damaged { source, .. }) => source,
            other => panic!("expected a damaged volume, got {other:?}"),
        }
    }

    /// A device whose reads fail with EIO inside `[bad.start, bad.end)`.
    struct BadSectors<'a> {
        inner: Cursor<&'a [u8]>,
        bad: std::ops::Range<u64>,
    }

    impl Read for BadSectors<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let at = self.inner.position();
            if at < self.bad.end && at + buf.len() as u64 > self.bad.start {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.inner.read(buf)
        }
    }

    impl Seek for BadSectors<'_> {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn well_formed_fat12_and_fat32_images_are_read() {
        for (img, fat_type) in [(fat12(), "FAT12"), (fat32(), "FAT32")] {
            let l = list(slice(&img)).unwrap();
            assert_eq!(l.fat_type, fat_type);
            assert_eq!(l.labels[0], "BEK VOLUME");
            assert_eq!(l.files, vec![("KEY".to_string(), 5)]);
            assert_eq!(read_key(&img).unwrap(), b"hello");
        }
    }

    // Regression (fuzzer, first run): a file entry whose first cluster is 1 made fatfs compute
    // `cluster - 2` and panic on the overflow in `File::read`.
    // The image is the first 5168 bytes of a 2 MiB volume: as it is, it is truncated; the rest of
    // the reader sees it as the fuzz target does, zero-padded to its declared length.
    #[test]
    fn fuzz_regression_file_at_cluster_1() {
        let img = include_bytes!("../../tests/data/fuzz-regressions/fat12-file-at-cluster-1.img");
        crate::keyvol::fuzz_image(img);
        assert!(damaged(list(slice(img))).to_string().contains("truncated"));
        let padded = || {
            let view = ZeroTail::declared(img);
            let len = view.size();
            ReadOnlySlice::new(view, 0, len)
        };
        let files = list(padded()).unwrap().files;
        assert_eq!(files.len(), 1);
        assert!(refused(read_file(padded(), &files[0].0)).contains("starts at cluster 1"));

        let mut img = fat12();
        put16(&mut img, 2 * SECTOR + 26, 1);
        assert_eq!(
            list(slice(&img)).unwrap().files.len(),
            1,
            "listing needs no clusters"
        );
        assert!(refused(read_key(&img)).contains("starts at cluster 1"));
    }

    #[test]
    fn file_clusters_and_links_outside_the_volume_are_refused() {
        let mut img = fat12();
        put16(&mut img, 2 * SECTOR + 26, 0xFFF0);
        assert!(refused(read_key(&img)).contains("outside 2..=62"));

        // A two-cluster file whose FAT link points at cluster 1, or past the last cluster.
        for link in [1, 63, 0xFF6] {
            let mut img = fat12();
            put32(&mut img, 2 * SECTOR + 28, 600);
            set_fat12(&mut img, 2, link);
            assert!(refused(read_key(&img)).contains(&format!("links to cluster {link}")));
        }

        // FAT32 uses the high half too: cluster 0xFFFF0003 would overflow fatfs's `cluster * 4`.
        let mut img = fat32();
        put16(&mut img, FAT32_ROOT + 20, 0xFFFF);
        assert!(refused(read_key(&img)).contains("starts at cluster 4294901763"));
    }

    #[test]
    fn a_chain_ending_early_is_a_short_file_not_a_crash() {
        let mut img = fat12();
        put32(&mut img, 2 * SECTOR + 28, 600);
        assert!(refused(read_key(&img)).contains("shorter than the file"));
    }

    #[test]
    fn bpb_fields_whose_arithmetic_overflows_in_fatfs_are_refused() {
        // fats * sectors_per_fat overflows u32.
        let mut img = fat32();
        img[16] = 2;
        put32(&mut img, 36, 0x8000_0000);
        assert!(refused(list(slice(&img))).contains("2^32 sectors"));
        // sectors_per_fat * bytes_per_sector * 8 overflows u32 (fatfs's FAT entry count).
        let mut img = fat32();
        put32(&mut img, 36, 0x0100_0000);
        put32(&mut img, 32, 0xFFFF_FFFF);
        assert!(refused(list(slice(&img))).contains("512 MiB"));
        // Mirroring off, active FAT 15: reserved + 15 * sectors_per_fat overflows u32.
        let mut img = fat32();
        put32(&mut img, 36, 0x0FFF_FFFF);
        put32(&mut img, 32, 0xFFFF_FFFF);
        put16(&mut img, 40, 0x8F);
        assert!(list(slice(&img)).is_err());
    }

    #[test]
    fn fat32_root_cluster_outside_the_volume_is_refused() {
        for root in [0, 1, 65602, 0x0FFF_FFFF, u32::MAX] {
            let mut img = fat32();
            put32(&mut img, 44, root);
            assert!(refused(list(slice(&img))).contains("root directory cluster"));
            assert!(read_key(&img).is_err());
        }
    }

    // A FAT32 root whose cluster links to itself and holds only deleted entries: fatfs's
    // iterator skips deleted entries internally, so `take(MAX_ENTRIES)` never bounded it and
    // `read_volume_label_from_root_dir` had no bound at all.
    #[test]
    fn looping_fat32_root_chain_ends_in_an_error() {
        let mut img = fat32();
        put32(&mut img, FAT32_FAT + 8, 2);
        for e in (0..SECTOR).step_by(32) {
            dir_entry(&mut img, FAT32_ROOT + e, b"\xE5ELETED    ", 3, 5);
        }
        assert!(refused(list(slice(&img))).contains("looping"));
        // With a live entry the loop is just as endless for fatfs's label search.
        dir_entry(&mut img, FAT32_ROOT, b"KEY        ", 3, 5);
        assert!(refused(list(slice(&img))).contains("looping"));
        assert!(read_key(&img).is_err());
    }

    #[test]
    fn truncated_and_empty_images_are_refused() {
        let img = fat12();
        for len in [0, 100, 511] {
            assert!(matches!(list(slice(&img[..len])), Err(Refused::NotFat(_))));
        }
        // Truncated right after the root directory: the root is readable, but the volume is not
        // all there, and a listing would pass for the whole volume. The boot sector's label comes
        // with the refusal (the caller decides whether the volume may be the key volume).
        match list(slice(&img[..3 * SECTOR])) {
            Err(Refused::Damaged { boot_label, .. }) => assert_eq!(boot_label, "BEK VOLUME"),
            other => panic!("{other:?}"),
        }
        let mut no_label = img.clone();
        no_label[38] = 0x28; // extended boot signature without a label field
        match list(slice(&no_label[..3 * SECTOR])) {
            Err(Refused::Damaged { boot_label, .. }) => assert_eq!(boot_label, ""),
            other => panic!("{other:?}"),
        }
        let e = damaged(list(slice(&img[..3 * SECTOR]))).to_string();
        assert!(
            e.contains("declares 32768 bytes")
                && e.contains("end at byte 1536")
                && e.contains("has 1536 bytes"),
            "{e}"
        );
        assert!(refused(read_key(&img[..3 * SECTOR])).contains("truncated"));
        // Inside the root directory and inside the FAT: the same, never an empty listing.
        for len in [2 * SECTOR, SECTOR + 8] {
            let e = damaged(list(slice(&img[..len]))).to_string();
            assert!(e.contains(&format!("has {len} bytes")), "{e}");
        }
    }

    // Cut inside the FAT, at the root cluster's first byte, inside it: refused, naming where the FAT
    // and the root's first cluster end (byte 522 * 512).
    #[test]
    fn truncated_fat32_images_are_refused() {
        let img = fat32();
        for len in [4096, FAT32_ROOT, FAT32_ROOT + 64, FAT32_ROOT + 2 * SECTOR] {
            let e = damaged(list(slice(&img[..len]))).to_string();
            assert!(
                e.contains("end at byte 267264") && e.contains(&format!("has {len} bytes")),
                "{e}"
            );
            assert!(read_key(&img[..len]).is_err());
        }
        assert!(list(slice(&img)).is_ok());
    }

    // The device says it is long enough but its reads end early (a short image behind a larger
    // partition entry, a disk still being attached): the root directory's entries past that point
    // are not "the end of the directory".
    #[test]
    fn a_short_read_inside_the_root_directory_is_an_error() {
        let img = fat12();
        let short = &img[..2 * SECTOR];
        let e = damaged(list(ReadOnlySlice::new(
            Cursor::new(short),
            0,
            img.len() as u64,
        )));
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("root directory at byte 1024"), "{e}");

        // FAT32: the root's chain goes on to cluster 4, which the device cannot deliver.
        let mut img = fat32();
        put32(&mut img, FAT32_FAT + 8, 4);
        put32(&mut img, FAT32_FAT + 16, 0x0FFF_FFFF);
        for e in (0..SECTOR).step_by(32) {
            dir_entry(&mut img, FAT32_ROOT + e, b"\xE5ELETED    ", 3, 5);
        }
        dir_entry(&mut img, FAT32_ROOT, b"KEY        ", 3, 5);
        let whole = img.len() as u64;
        assert_eq!(list(slice(&img)).unwrap().files.len(), 1);
        let short = &img[..FAT32_ROOT + 2 * SECTOR];
        let e = damaged(list(ReadOnlySlice::new(Cursor::new(short), 0, whole)));
        assert!(
            e.to_string().contains("root directory at byte 267776"),
            "{e}"
        );
    }

    #[test]
    fn an_io_error_inside_the_root_directory_is_an_error() {
        let img = fat12();
        let root = 2 * SECTOR as u64..3 * SECTOR as u64;
        let dev = BadSectors {
            inner: Cursor::new(&img),
            bad: root,
        };
        let e = damaged(list(ReadOnlySlice::new(dev, 0, img.len() as u64)));
        let e = e.to_string();
        assert!(
            e.contains("root directory at byte 1024") && e.contains("os error 5"),
            "{e}"
        );
        // The same bad sector in the data region is no concern of the listing.
        let dev = BadSectors {
            inner: Cursor::new(&img),
            bad: 10 * SECTOR as u64..11 * SECTOR as u64,
        };
        assert!(list(ReadOnlySlice::new(dev, 0, img.len() as u64)).is_ok());
    }
}
