//! Power loss with a volatile write cache, simulated at every write of a pass.
//!
//! `kill -9` never loses a completed `pwrite`, and the QEMU power cuts of the harness used to keep
//! every write in the host's page cache, so no earlier test could tell a pass that flushes from
//! one that does not. Here the device and the journal are two disks with their own volatile write
//! caches: a write lands in the cache (reads see it), a flush makes that disk's cached writes
//! durable, and at a power cut each cached block (the disk's physical block: the crypt sector for
//! the device, 512 bytes for the journal's disk) independently survives or is lost — writes are
//! lost, torn and reordered, and a flush of one disk says nothing about the other.
//!
//! Every event (a write or a flush, on either disk) of a pass over a small device is tried as the
//! instant of the cut, with several ways of losing the cache; the pass then resumes (itself cut
//! once more at a seeded instant, to test recovery's own flush), finishes, and the device must
//! decrypt to the original bytes. `scripts/mutate-flushes` deletes each of the pass's flushes in
//! turn and checks this test fails.
//!
//! Not modelled: the file-system level of the boot partition (the journal's creation, the pending
//! header's format and the renames, which are fsync'd files and directories), and a disk that
//! acknowledges a flush it did not do.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use common::{run, sha256};
use initcrypt::pass::{self, Device, Direction, PlainFile, Request};
use initcrypt::secret::Secret;
use zeroize::Zeroizing;

const CHUNK: u64 = 64 << 10;

/// How the cached, unflushed writes fare at the cut.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// Every cached write is lost.
    All,
    /// Every cached write reaches the disk (as if the cut came just after the cache emptied).
    Nothing,
    /// Each cached sector survives with probability ½, whatever its order.
    Random(u64),
    /// A random prefix of each write survives (torn writes).
    Torn(u64),
}

struct Cache {
    backend: Box<dyn Device>,
    pending: Vec<(u64, Vec<u8>)>,
    /// The disk's atomic write unit (its physical block size): a cut tears writes at this grain.
    unit: usize,
}

struct Sim {
    events: u64,
    cut_at: u64,
    cut: bool,
    disks: Vec<Cache>,
}

#[derive(Clone)]
struct Power(Arc<Mutex<Sim>>);

struct Disk {
    power: Power,
    id: usize,
    len: u64,
}

fn lost() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl Power {
    fn new(cut_at: u64) -> Power {
        Power(Arc::new(Mutex::new(Sim {
            events: 0,
            cut_at,
            cut: false,
            disks: Vec::new(),
        })))
    }

    fn attach(&self, backend: Box<dyn Device>, unit: usize) -> Disk {
        let mut sim = self.0.lock().unwrap();
        let len = backend.len();
        sim.disks.push(Cache {
            backend,
            pending: Vec::new(),
            unit,
        });
        Disk {
            power: self.clone(),
            id: sim.disks.len() - 1,
            len,
        }
    }

    fn events(&self) -> u64 {
        self.0.lock().unwrap().events
    }

    fn was_cut(&self) -> bool {
        self.0.lock().unwrap().cut
    }

    /// The cut: what survives of each disk's cache reaches the backend, the rest is gone.
    fn cut(&self, loss: Loss) {
        let mut sim = self.0.lock().unwrap();
        let mut rng = match loss {
            Loss::Random(s) | Loss::Torn(s) => s | 1,
            _ => 1,
        };
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for disk in &mut sim.disks {
            let unit = disk.unit;
            for (offset, data) in std::mem::take(&mut disk.pending) {
                let units = data.len().div_ceil(unit);
                let keep_prefix = (next() % (units as u64 + 1)) as usize;
                for (i, sector) in data.chunks(unit).enumerate() {
                    let keep = match loss {
                        Loss::All => false,
                        Loss::Nothing => true,
                        Loss::Random(_) => next() & 1 == 1,
                        Loss::Torn(_) => i < keep_prefix,
                    };
                    if keep {
                        disk.backend
                            .write_at(sector, offset + (i * unit) as u64)
                            .unwrap();
                    }
                }
            }
            disk.backend.sync().unwrap();
        }
    }
}

/// What the power did at an event.
enum Event {
    On,
    /// The cut happens at this very event.
    CutNow,
    /// The power is already off.
    Off,
}

impl Disk {
    /// Count an event; at the cut instant and after it, every operation fails.
    fn tick(sim: &mut Sim) -> Event {
        if sim.cut {
            return Event::Off;
        }
        sim.events += 1;
        if sim.events == sim.cut_at {
            sim.cut = true;
            return Event::CutNow;
        }
        Event::On
    }
}

impl Device for Disk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let sim = self.power.0.lock().unwrap();
        if sim.cut {
            return Err(lost());
        }
        let disk = &sim.disks[self.id];
        disk.backend.read_at(buf, offset)?;
        // The cache answers reads with what was written last.
        let end = offset + buf.len() as u64;
        for (o, data) in &disk.pending {
            let (from, to) = ((*o).max(offset), (o + data.len() as u64).min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - o) as usize..(to - o) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut sim = self.power.0.lock().unwrap();
        match Disk::tick(&mut sim) {
            Event::Off => Err(lost()),
            // The cut came while this write was in flight: it sits in the cache, maybe partly.
            Event::CutNow => {
                sim.disks[self.id].pending.push((offset, buf.to_vec()));
                Err(lost())
            }
            Event::On => {
                sim.disks[self.id].pending.push((offset, buf.to_vec()));
                Ok(())
            }
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        let mut sim = self.power.0.lock().unwrap();
        if !matches!(Disk::tick(&mut sim), Event::On) {
            return Err(lost());
        }
        let disk = &mut sim.disks[self.id];
        for (offset, data) in std::mem::take(&mut disk.pending) {
            disk.backend.write_at(&data, offset)?;
        }
        disk.backend.sync()
    }
}

fn open_file(p: &Path) -> Box<dyn Device> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    Box::new(PlainFile::new(f).unwrap())
}

struct Case<'a> {
    img: &'a Path,
    hdr: &'a Path,
    key: &'a Secret,
    sector: u32,
}

impl Case<'_> {
    fn request(&self) -> Request<'_> {
        let mut req = Request::new(self.img, self.hdr, self.key, "key", "sim".into());
        req.chunk_size = CHUNK;
        req.sector_size = Some(self.sector);
        req.stop = Arc::new(AtomicBool::new(false));
        req
    }

    /// Run (or resume) a pass with the power cut at event `cut_at`; true if the cut happened.
    fn run_cut(&self, dir: Direction, cut_at: u64, loss: Loss) -> (bool, u64) {
        let power = Power::new(cut_at);
        // The data disk's atomic unit is the crypt sector (the engine never picks one larger than
        // the physical block); the journal's disk tears at 512 bytes (records are checksummed).
        let dev = power.attach(open_file(self.img), self.sector as usize);
        let p2 = power.clone();
        let wrap =
            move |store: Box<dyn Device>| -> Box<dyn Device> { Box::new(p2.attach(store, 512)) };
        let req = self.request();
        let result = pass::run_with(&dev, &wrap, &req, dir, &mut |_, _| {});
        let cut = power.was_cut();
        if cut {
            // A pass may still succeed: a cut while the removed journal's records are wiped
            // comes after everything is durable (the wipe is best effort).
            power.cut(loss);
        } else if let Err(e) = result {
            panic!("{dir:?} without a cut failed: {e}");
        }
        (cut, power.events())
    }

    fn run_clean(&self, dir: Direction) {
        let (cut, _) = self.run_cut(dir, u64::MAX, Loss::All);
        assert!(!cut);
    }
}

fn ext4_image(dir: &Path, block: &str, extra: u64) -> std::path::PathBuf {
    let src = dir.join(format!("src{block}"));
    std::fs::create_dir_all(&src).unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let blob: Vec<u8> = (0..400_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("blob"), blob).unwrap();
    let img = dir.join(format!("p{block}.img"));
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            block,
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
            "1M",
        ],
    );
    // 16 chunks of 64 KiB and a short one: two ring flushes, a short last chunk, 240 cut instants.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len((1 << 20) + extra).unwrap();
    img
}

const LOSSES: [fn(u64) -> Loss; 4] = [|_| Loss::All, |_| Loss::Nothing, Loss::Random, Loss::Torn];

/// Cut the power at every event of a pass in `dir` starting from `start` (an image + header
/// state), each way of losing the cache; resume once more with a seeded second cut; finish; and
/// compare the plaintext with `original`.
fn every_instant(
    dir_path: &Path,
    start: (&Path, Option<&Path>),
    dir: Direction,
    sector: u32,
    key: &Secret,
    original: &str,
) -> u64 {
    let img = dir_path.join("run.img");
    let hdr = dir_path.join("run.hdr");
    let paths = pass::Paths::for_header(&hdr);
    let reset = || {
        std::fs::copy(start.0, &img).unwrap();
        for p in [&paths.header, &paths.pending, &paths.journal] {
            let _ = std::fs::remove_file(p);
        }
        if let Some(h) = start.1 {
            std::fs::copy(h, &hdr).unwrap();
        }
    };
    let case = Case {
        img: &img,
        hdr: &hdr,
        key,
        sector,
    };
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut cut_at = 1;
    let mut tried = 0;
    loop {
        let mut done = false;
        for (n, loss) in LOSSES.iter().enumerate() {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            reset();
            let (cut, events) = case.run_cut(dir, cut_at, loss(seed));
            if !cut {
                done = true;
                break;
            }
            tried += 1;
            // The resume is cut too, at a seeded instant of its own (its recovery's flush is
            // what makes the chunks it rewrote durable), then runs to the end.
            let second = 1 + (seed >> 7) % (events + 8);
            case.run_cut(dir, second, LOSSES[(n + 1) % 4](seed >> 3));
            case.run_clean(dir);
            let state = format!(
                "{dir:?}, cut at event {cut_at} ({loss:?}), then at {second}",
                loss = loss(seed)
            );
            check_plaintext(&case, dir, original, &state);
        }
        if done {
            return tried;
        }
        cut_at += 1;
    }
}

/// After a finished pass: an encrypted device decrypts (with our engine, proven against stock
/// cryptsetup by tests/pass.rs) to the original; a decrypted one is the original.
fn check_plaintext(case: &Case, dir: Direction, original: &str, state: &str) {
    let paths = pass::Paths::for_header(case.hdr);
    assert!(
        !paths.journal.exists() && !paths.pending.exists(),
        "{state}: pass files left behind"
    );
    if dir == Direction::Encrypt {
        assert!(case.hdr.exists(), "{state}: no header published");
        case.run_clean(Direction::Decrypt);
    } else {
        assert!(!case.hdr.exists(), "{state}: header left behind");
    }
    assert_eq!(sha256(case.img), original, "{state}: data lost");
}

/// Scratch space on tmpfs when there is one: the simulator decides what is durable, so the real
/// fsyncs of every run's 16 MiB header only cost time (0.5 s a pass on a VM disk).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn secret() -> Secret {
    Secret::new(Zeroizing::new(common::ade_passphrase(9)))
}

#[test]
fn encryption_survives_a_power_cut_at_every_write_with_any_cache_loss() {
    let dir = scratch();
    let key = secret();
    for (block, sector, extra) in [("1024", 512u32, 3 * 512), ("4096", 4096, 4096)] {
        let pristine = ext4_image(dir.path(), block, extra);
        let original = sha256(&pristine);
        let tried = every_instant(
            dir.path(),
            (&pristine, None),
            Direction::Encrypt,
            sector,
            &key,
            &original,
        );
        eprintln!("encrypt, {sector}-byte sectors: {tried} cuts, all recovered");
        assert!(tried > 150, "only {tried} cut instants");
    }
}

#[test]
fn decryption_survives_a_power_cut_at_every_write_with_any_cache_loss() {
    let dir = scratch();
    let key = secret();
    for (block, sector, extra) in [("1024", 512u32, 3 * 512), ("4096", 4096, 4096)] {
        let pristine = ext4_image(dir.path(), block, extra);
        let original = sha256(&pristine);
        // The encrypted starting point, made once by a clean pass.
        let enc = dir.path().join(format!("enc{sector}.img"));
        let enc_hdr = dir.path().join(format!("enc{sector}.hdr"));
        std::fs::copy(&pristine, &enc).unwrap();
        let case = Case {
            img: &enc,
            hdr: &enc_hdr,
            key: &key,
            sector,
        };
        case.run_clean(Direction::Encrypt);
        let tried = every_instant(
            dir.path(),
            (&enc, Some(&enc_hdr)),
            Direction::Decrypt,
            sector,
            &key,
            &original,
        );
        eprintln!("decrypt, {sector}-byte sectors: {tried} cuts, all recovered");
        assert!(tried > 150, "only {tried} cut instants");
    }
}
