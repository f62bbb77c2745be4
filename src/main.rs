//! initcrypt: the early-boot half of VM disk encryption. See README.md and docs/design.md.

use std::io::IsTerminal;

use initcrypt::pass::{self, Direction};
use initcrypt::secret::Secret;
use initcrypt::{boot, config, exit, keys, keyvol, kmsg, lifecycle, status};
use zeroize::Zeroizing;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use argh::FromArgs;

use config::BootParams;
use exit::{Classify, Exit};

/// initcrypt: find the key volume, open (and later encrypt in place) the LUKS volumes of this VM.
#[derive(FromArgs)]
struct Cli {
    /// volumes.json to read (default /etc/initcrypt/volumes.json)
    #[argh(option, default = "PathBuf::from(config::DEFAULT_PATH)")]
    config: PathBuf,
    /// debug output (also: initcrypt.debug on the kernel command line)
    #[argh(switch)]
    debug: bool,
    #[argh(subcommand)]
    cmd: Cmd,
}

// Subcommands of design §4 that later issues implement are parsed already, so the CLI contract
// (and `--help`) is stable; their arguments are read once they do something.
#[allow(dead_code)]
#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Boot(BootCmd),
    Generator(GeneratorCmd),
    Keys(KeysCmd),
    Keyscript(KeyscriptCmd),
    Encrypt(EncryptCmd),
    EncryptImage(EncryptImageCmd),
    DecryptImage(DecryptImageCmd),
    Decrypt(DecryptCmd),
    Status(StatusCmd),
    Keyvol(KeyvolCmd),
    Enable(EnableCmd),
    Disable(DisableCmd),
    Rotate(RotateCmd),
    Check(CheckCmd),
}

/// find the key volume and open every configured volume (initramfs-tools path)
#[derive(FromArgs)]
#[argh(subcommand, name = "boot")]
struct BootCmd {}

/// systemd generator (initrd): crypttab lines for the stock systemd-cryptsetup units, plus initcrypt's keys and encrypt units
#[derive(FromArgs)]
#[argh(subcommand, name = "generator")]
struct GeneratorCmd {
    /// generator output directories: normal, early, late
    #[argh(positional)]
    dirs: Vec<String>,
}

/// write /run/cryptsetup-keys.d/<name>.key (0400) for each volume, or remove them
#[derive(FromArgs)]
#[argh(subcommand, name = "keys")]
struct KeysCmd {
    /// delete the key files instead of writing them
    #[argh(switch)]
    remove: bool,
}

/// print the key for $CRYPTTAB_NAME on stdout (initramfs-tools keyscript= contract)
#[derive(FromArgs)]
#[argh(subcommand, name = "keyscript")]
struct KeyscriptCmd {}

/// encrypt a configured volume in place now, offline (resumes an interrupted pass); --online is not implemented yet
#[derive(FromArgs)]
#[argh(subcommand, name = "encrypt")]
struct EncryptCmd {
    /// volume name from volumes.json
    #[argh(positional)]
    name: String,
    /// run the pass online, after boot
    #[argh(switch)]
    online: bool,
}

/// encrypt an image or device in place with explicit paths (image builders, benchmarks); rerun to resume
#[derive(FromArgs)]
#[argh(subcommand, name = "encrypt-image")]
struct EncryptImageCmd {
    #[argh(option)]
    /// data device or image file
    device: PathBuf,
    #[argh(option)]
    /// detached LUKS2 header to create (appears only when the pass is complete)
    header: PathBuf,
    #[argh(option)]
    /// file holding the passphrase (its exact bytes)
    key_file: PathBuf,
    #[argh(option)]
    /// journal file (default: <header>.journal)
    journal: Option<PathBuf>,
    #[argh(option)]
    /// LUKS sector size for a new header (default: the largest the device and filesystem allow)
    sector_size: Option<u32>,
    #[argh(option, default = "initcrypt::luks::MIN_PBKDF2_ITERATIONS")]
    /// PBKDF2 iterations for the keyslot (default: the minimum, right for random keys)
    pbkdf2_iterations: u32,
    #[argh(switch)]
    /// the device holds raw data with no filesystem signature: encrypt it anyway (without this, a
    /// device that shows no filesystem is refused, because a pass whose journal and header were
    /// lost leaves it looking so)
    raw: bool,
}

/// decrypt an image or device in place with explicit paths, then drop its header; rerun to resume
#[derive(FromArgs)]
#[argh(subcommand, name = "decrypt-image")]
struct DecryptImageCmd {
    #[argh(option)]
    /// data device or image file
    device: PathBuf,
    #[argh(option)]
    /// its detached LUKS2 header
    header: PathBuf,
    #[argh(option)]
    /// file holding the passphrase (its exact bytes)
    key_file: PathBuf,
    #[argh(option)]
    /// journal file (default: <header>.journal)
    journal: Option<PathBuf>,
}

/// decrypt a configured volume in place now, offline, and drop its header (resumes an interrupted pass)
#[derive(FromArgs)]
#[argh(subcommand, name = "decrypt")]
struct DecryptCmd {
    /// volume name from volumes.json
    #[argh(positional)]
    name: String,
}

/// show what each volume is, observed from the disks
#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// machine-readable output with ADE's field names
    #[argh(switch)]
    json: bool,
}

/// show where the key volume is and which key files it holds (names and sizes, never contents)
#[derive(FromArgs)]
#[argh(subcommand, name = "keyvol")]
struct KeyvolCmd {
    /// a block device or image file to read instead of scanning the machine
    #[argh(option)]
    device: Option<PathBuf>,
    /// JSON output: {"device", "fat_type", "label", "files": [{"name", "size"}]}
    #[argh(switch)]
    json: bool,
}

/// want volumes encrypted: runs check, writes volumes.json, fstab, the kernel command line and every initramfs; the next boot encrypts
#[derive(FromArgs)]
#[argh(subcommand, name = "enable")]
struct EnableCmd {
    /// os, data or all
    #[argh(option)]
    volume_type: String,
    /// format empty data disks instead of encrypting in place (issue [7]; exits 2 for now)
    #[argh(switch)]
    format_empty: bool,
    /// a mounted image to prepare offline instead of the running system (its /boot mounted at DIR/boot)
    #[argh(option)]
    root: Option<PathBuf>,
    /// go on despite this failing check finding (repeat for each)
    #[argh(option)]
    force: Vec<String>,
}

/// want volumes decrypted: the next boot decrypts them and root=/fstab point back at the filesystems
#[derive(FromArgs)]
#[argh(subcommand, name = "disable")]
struct DisableCmd {
    /// data, os or all
    #[argh(option)]
    volume_type: String,
    /// a mounted image to change offline instead of the running system
    #[argh(option)]
    root: Option<PathBuf>,
}

/// replace the key of every encrypted volume: the new key is added and verified on every volume before any old keyslot is removed; any failure rolls back, and after an interruption the same command finishes. Platform order: attach the new key volume, run rotate, detach the old key volume only after rotate exits 0
#[derive(FromArgs)]
#[argh(subcommand, name = "rotate")]
struct RotateCmd {
    /// the new key volume (FAT "BEK VOLUME", device or image), holding each volume's new key under the same file name as the key volume the VM booted with
    #[argh(option)]
    new_key_volume: Option<PathBuf>,
    /// a file whose exact bytes (no newline stripped) become the new key of EVERY volume; instead of --new-key-volume
    #[argh(option)]
    new_key_file: Option<PathBuf>,
    /// print each volume's keyslots before and after as JSON
    #[argh(switch)]
    json: bool,
}

/// pre-flight checks: one finding per line (ok|warn|fail, id, where, what, fix); exit 0 when nothing fails
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct CheckCmd {
    /// os, data or all (default all)
    #[argh(option, default = "String::from(\"all\")")]
    volume_type: String,
    /// a mounted image to inspect instead of the running system
    #[argh(option)]
    root: Option<PathBuf>,
    /// machine-readable output
    #[argh(switch)]
    json: bool,
}

/// One failure, printed as one line by `main`.
struct Failure {
    exit: Exit,
    line: String,
}

impl<E: std::error::Error + Classify> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            exit: e.exit(),
            line: e.to_string(),
        }
    }
}

fn not_yet(what: &str) -> Result<(), Failure> {
    Err(Failure {
        exit: Exit::Usage,
        line: format!("`initcrypt {what}` is not implemented in this version; nothing was done"),
    })
}

fn keyvol_cmd(cmd: &KeyvolCmd, params: &BootParams) -> Result<(), Failure> {
    let vols = match &cmd.device {
        Some(dev) => vec![keyvol::open_path(dev)?],
        None => keyvol::find(params.keyvol_timeout)?.0,
    };
    for kv in &vols {
        if cmd.json {
            let text = serde_json::to_string(kv).map_err(|e| Failure {
                exit: Exit::Usage,
                line: e.to_string(),
            })?;
            println!("{text}");
        } else {
            println!("{}  {}  label \"{}\"", kv.device, kv.fat_type, kv.label);
            for f in &kv.files {
                println!("  {:>8}  {}", f.size, f.name);
            }
        }
    }
    Ok(())
}

/// Read an operator-supplied key file into zeroizing memory.
fn read_key_file(path: &Path) -> Result<Secret, Failure> {
    let bytes = std::fs::read(path).map_err(|e| Failure {
        exit: Exit::KeyRejected,
        line: format!(
            "cannot read key file {}: {e}; pass an existing file",
            path.display()
        ),
    })?;
    Ok(Secret::new(Zeroizing::new(bytes)))
}

/// What `encrypt-image` / `decrypt-image` were asked to do.
struct ImagePass<'a> {
    device: &'a Path,
    header: &'a Path,
    key_file: &'a Path,
    journal: Option<&'a Path>,
    sector_size: Option<u32>,
    pbkdf2_iterations: u32,
    raw: bool,
}

fn image_pass(p: &ImagePass, dir: Direction) -> Result<(), Failure> {
    let key = read_key_file(p.key_file)?;
    let identity = std::fs::canonicalize(p.device)
        .unwrap_or_else(|_| p.device.to_path_buf())
        .display()
        .to_string();
    let key_name = p.key_file.display().to_string();
    let mut req = pass::Request::new(p.device, p.header, &key, &key_name, identity);
    req.paths = req.paths.with_journal(p.journal);
    req.sector_size = p.sector_size;
    req.pbkdf2_iterations = p.pbkdf2_iterations;
    req.stop = pass::stop_on_signals();
    if p.raw {
        req.expect = pass::Expect::Raw;
    }
    let name = p
        .device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut progress = pass::Progress::new(&name, std::io::stderr().is_terminal());
    let mut report = |done, total| progress.update(done, total);
    let outcome = match dir {
        Direction::Encrypt => pass::encrypt(&req, &mut report)?,
        Direction::Decrypt => pass::decrypt(&req, &mut report)?,
    };
    if outcome.already_done {
        log::info!(
            "{} is already {}ed; nothing to do",
            p.device.display(),
            dir.verb()
        );
    } else {
        log::info!(
            "{}ed {} in place{}",
            dir.verb(),
            p.device.display(),
            if outcome.resumed { " (resumed)" } else { "" }
        );
    }
    Ok(())
}

// --- lifecycle: check, enable, disable ---------------------------------------------------------

fn volume_type(s: &str) -> Result<lifecycle::VolumeType, Failure> {
    lifecycle::VolumeType::parse(s).ok_or_else(|| Failure {
        exit: Exit::Usage,
        line: format!("--volume-type {s}: expected os, data or all"),
    })
}

/// enable/disable always write the root's /etc/initcrypt/volumes.json (the initramfs hooks read
/// that path): --config is for the read-only commands.
fn lifecycle_root(cli: &Cli, root: &Option<PathBuf>) -> Result<(PathBuf, bool), Failure> {
    if cli.config != Path::new(config::DEFAULT_PATH) {
        return Err(Failure {
            exit: Exit::Usage,
            line: format!("--config does not apply here: check/enable/disable use {} of the root (--root DIR for an image)", config::DEFAULT_PATH),
        });
    }
    match root {
        Some(r) if r.is_dir() => Ok((r.clone(), r != Path::new("/"))),
        Some(r) => Err(Failure {
            exit: Exit::Usage,
            line: format!("--root {}: not a directory; mount the image's root there (and its /boot at DIR/boot)", r.display()),
        }),
        None => Ok((PathBuf::from("/"), false)),
    }
}

fn lifecycle_cmd(cli: &Cli) -> Result<(), Failure> {
    use lifecycle::enable::{self as en, Target};
    use lifecycle::machine::Live;
    let root_opt = match &cli.cmd {
        Cmd::Check(c) => &c.root,
        Cmd::Enable(c) => &c.root,
        Cmd::Disable(c) => &c.root,
        _ => return Ok(()),
    };
    let (root, offline) = lifecycle_root(cli, root_opt)?;
    let live = Live::new(&root);
    let target = Target {
        machine: &live,
        root,
        offline,
    };
    let mut out = std::io::stdout();
    match &cli.cmd {
        Cmd::Check(c) => {
            let findings = en::check(&target, volume_type(&c.volume_type)?);
            if c.json {
                let text =
                    serde_json::to_string_pretty(&serde_json::json!({ "findings": findings }))
                        .map_err(|e| Failure {
                            exit: Exit::Usage,
                            line: e.to_string(),
                        })?;
                println!("{text}");
            } else {
                for f in &findings {
                    println!("{}", f.line());
                }
            }
            let exit = lifecycle::check::exit_of(&findings);
            if exit != Exit::Ok {
                let failing = findings
                    .iter()
                    .filter(|f| f.level == lifecycle::check::Level::Fail)
                    .count();
                return Err(Failure {
                    exit,
                    line: format!(
                        "check: {failing} failing finding(s); fix them before `initcrypt enable`"
                    ),
                });
            }
        }
        Cmd::Enable(c) => {
            let opts = en::Options {
                volume_type: volume_type(&c.volume_type)?,
                force: c.force.clone(),
                format_empty: c.format_empty,
            };
            en::enable(&target, &opts, &mut out)?;
        }
        Cmd::Disable(c) => en::disable(&target, volume_type(&c.volume_type)?, &mut out)?,
        _ => {}
    }
    Ok(())
}

fn run(cli: &Cli, params: &BootParams) -> Result<(), Failure> {
    let cfg = cli.config.as_path();
    match &cli.cmd {
        Cmd::Boot(_) => boot::run(cfg, params)?,
        Cmd::Keys(k) if k.remove => keys::remove_all(cfg, params)?,
        Cmd::Keys(_) => keys::write_all(cfg, params)?,
        Cmd::Keyscript(_) => keys::keyscript(cfg, params)?,
        Cmd::Status(s) => status::run(cfg, params, s.json)?,
        Cmd::Keyvol(k) => keyvol_cmd(k, params)?,
        Cmd::Generator(g) => initcrypt::generator::run(cfg, params, &g.dirs)?,
        Cmd::Encrypt(e) if e.online => not_yet("encrypt --online")?,
        Cmd::Encrypt(e) => boot::pass_one(cfg, params, &e.name, Direction::Encrypt)?,
        Cmd::EncryptImage(c) => image_pass(
            &ImagePass {
                device: &c.device,
                header: &c.header,
                key_file: &c.key_file,
                journal: c.journal.as_deref(),
                sector_size: c.sector_size,
                pbkdf2_iterations: c.pbkdf2_iterations,
                raw: c.raw,
            },
            Direction::Encrypt,
        )?,
        Cmd::DecryptImage(c) => image_pass(
            &ImagePass {
                device: &c.device,
                header: &c.header,
                key_file: &c.key_file,
                journal: c.journal.as_deref(),
                sector_size: None,
                pbkdf2_iterations: 0,
                raw: false,
            },
            Direction::Decrypt,
        )?,
        Cmd::Decrypt(d) => boot::pass_one(cfg, params, &d.name, Direction::Decrypt)?,
        Cmd::Rotate(r) => initcrypt::lifecycle::rotate::run(
            cfg,
            params,
            &initcrypt::lifecycle::rotate::Args {
                new_key_volume: r.new_key_volume.as_deref(),
                new_key_file: r.new_key_file.as_deref(),
                json: r.json,
            },
        )?,
        Cmd::Enable(_) | Cmd::Disable(_) | Cmd::Check(_) => lifecycle_cmd(cli)?,
    }
    Ok(())
}

/// argv with `initcrypt-generator` (systemd's generator name) turned into `initcrypt generator`,
/// and `initcrypt-keyscript` (crypttab keyscript=) into `initcrypt keyscript`.
fn normalised_args() -> (String, Vec<String>) {
    let mut args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().cloned().unwrap_or_else(|| "initcrypt".into());
    let base = Path::new(&argv0)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if args.is_empty() {
        args.push(argv0.clone());
    }
    match base.as_str() {
        "initcrypt-generator" => args.insert(1, "generator".into()),
        // crypttab's keyscript= takes a path, no arguments: this name means `initcrypt keyscript`.
        "initcrypt-keyscript" => args.insert(1, "keyscript".into()),
        _ => {}
    }
    ("initcrypt".into(), args.split_off(1))
}

fn main() -> ExitCode {
    let (cmd, args) = normalised_args();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let cli = match Cli::from_args(&[cmd.as_str()], &refs) {
        Ok(cli) => cli,
        Err(early) => {
            // --help succeeds on stdout; a usage error is exit 2 (argh's own default is 1).
            return if early.status.is_ok() {
                println!("{}", early.output);
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "initcrypt: error: {}",
                    early.output.trim_end().replace('\n', " ")
                );
                ExitCode::from(Exit::Usage.code())
            };
        }
    };
    let params = BootParams::from_system();
    let debug = cli.debug || params.as_ref().map(|p| p.debug).unwrap_or(false);
    kmsg::init(debug);
    let result = params.map_err(Failure::from).and_then(|p| run(&cli, &p));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            log::error!("{}", f.line);
            ExitCode::from(f.exit.code())
        }
    }
}
