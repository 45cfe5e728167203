//! The binary's subcommands, behind a thin `main`: each returns an error the caller prints.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::client::AdminClient;
use crate::config::{Config, LogConfig, LogFormat};
use crate::crypto::custody::{
    self, Custody, KdfParams, Share, CUSTODIANS_DIR, DESCRIPTOR_FILE, NEXT_CUSTODIANS_DIR,
};
use crate::crypto::{new_kek_id, DevKey, KeyMaterial, DEV_KEY_FILE};
use crate::server::{Application, StartupError};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Dev(#[from] crate::dev::DevError),
    #[error("{0}")]
    Keys(String),
    #[error("audit: {0}")]
    Audit(String),
    #[error("{0} problem(s) found")]
    Check(usize),
    #[error("{0}")]
    Explain(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error("store: {0}")]
    Store(String),
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
}

/// Installs the log subscriber. Nothing the crate logs carries card data or keys; the level
/// only decides how much of the rest is shown.
pub fn init_logging(log: &LogConfig) {
    let level = log.level.parse().unwrap_or(tracing::Level::INFO);
    // Colours only on a terminal: logs sent to a file or journald stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(true)
        .with_ansi(ansi);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// `cardvault serve --config FILE`
pub fn serve(config_path: &Path) -> Result<(), CommandError> {
    let config = Config::load(config_path)?;
    init_logging(&config.log);
    run(&config, |_| {})
}

fn run(config: &Config, on_listening: impl FnOnce(&Application)) -> Result<(), CommandError> {
    crate::hardening::warn_if_root();
    crate::hardening::no_huge_pages();
    crate::hardening::lock_memory();
    actix_web::rt::System::new().block_on(async {
        let app = Application::build(config)?;
        on_listening(&app);
        app.run().await.map_err(CommandError::Serve)
    })
}

/// Passphrases given as files, `NAME=PATH` each; anyone not listed is asked on the terminal.
pub struct Passphrases(Vec<(String, PathBuf)>);

impl Passphrases {
    pub fn parse(args: &[String]) -> Result<Passphrases, CommandError> {
        args.iter()
            .map(|a| match a.split_once('=') {
                Some((name, path)) if !name.is_empty() && !path.is_empty() => {
                    Ok((name.to_owned(), PathBuf::from(path)))
                }
                _ => Err(CommandError::Keys(format!(
                    "--passphrase-file {a:?}: expected NAME=PATH"
                ))),
            })
            .collect::<Result<_, _>>()
            .map(Passphrases)
    }

    /// The passphrase of `name`: from its file (which group and others must not read), else
    /// from the terminal without echo (twice when `confirm`).
    fn get(
        &self,
        name: &str,
        prompt: &str,
        confirm: bool,
    ) -> Result<Zeroizing<String>, CommandError> {
        if let Some((_, path)) = self.0.iter().find(|(n, _)| n == name) {
            return read_passphrase_file(path);
        }
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            return Err(CommandError::Keys(format!(
                "no passphrase for {name}: give --passphrase-file {name}=PATH or run on a terminal"
            )));
        }
        let first = Zeroizing::new(
            rpassword::prompt_password(prompt).map_err(|e| CommandError::Keys(e.to_string()))?,
        );
        if confirm {
            let again = Zeroizing::new(
                rpassword::prompt_password("again: ")
                    .map_err(|e| CommandError::Keys(e.to_string()))?,
            );
            if *again != *first {
                return Err(CommandError::Keys(format!(
                    "the two passphrases for {name} differ"
                )));
            }
        }
        Ok(first)
    }
}

fn read_passphrase_file(path: &Path) -> Result<Zeroizing<String>, CommandError> {
    custody::check_private(path).map_err(|e| CommandError::Keys(e.to_string()))?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| CommandError::Keys(format!("{}: {e}", path.display())))?,
    );
    Ok(Zeroizing::new(
        text.trim_end_matches(['\n', '\r']).to_owned(),
    ))
}

/// A field of a JSON reply, `null` when absent.
fn at<'a>(value: &'a serde_json::Value, pointer: &str) -> &'a serde_json::Value {
    value.pointer(pointer).unwrap_or(&serde_json::Value::Null)
}

/// A string in wiping memory, allocated once at a size the bodies here never outgrow, so no
/// growth leaves an unwiped copy behind.
fn wiping(start: &str) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(16 * 1024));
    s.push_str(start);
    s
}

fn keys_error(e: impl std::fmt::Display) -> CommandError {
    CommandError::Keys(e.to_string())
}

fn private_dir(path: &Path) -> Result<(), CommandError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| CommandError::Keys(format!("cannot create {}: {e}", path.display())))
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CommandError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| CommandError::Keys(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| CommandError::Keys(format!("cannot write {}: {e}", path.display())))
}

/// Makes a new random KEK, splits it for `custodians` and writes their sealed shares and the
/// custody descriptor into `dir` (which must not exist). The KEK never touches disk; the
/// shares come back in memory (wiped on drop) for a caller that needs k of them.
fn write_custody(
    dir: &Path,
    custodians: &[String],
    threshold: u8,
    passphrases: &Passphrases,
) -> Result<(Custody, Vec<Share>), CommandError> {
    let kek = KeyMaterial::random().map_err(keys_error)?;
    let kek_id = new_kek_id().map_err(keys_error)?;
    let now = crate::vault::rfc3339(crate::vault::unix_now());
    let (custody, shares) =
        custody::split(&kek, &kek_id, custodians, threshold, &now).map_err(keys_error)?;
    drop(kek);
    if dir.exists() {
        return Err(CommandError::Keys(format!(
            "{} exists: refusing to overwrite custodian shares",
            dir.display()
        )));
    }
    private_dir(dir)?;
    let written = (|| {
        for share in &shares {
            let passphrase = passphrases.get(
                &share.custodian,
                &format!(
                    "new passphrase for {} (at least {} characters): ",
                    share.custodian,
                    custody::MIN_PASSPHRASE_LEN
                ),
                true,
            )?;
            let text =
                custody::seal_share(share, threshold, passphrase.as_bytes(), KdfParams::MINIMUM)
                    .map_err(keys_error)?;
            write_new(&custody::share_path(dir, &share.custodian), &text, 0o600)?;
        }
        write_new(&dir.join(DESCRIPTOR_FILE), &custody.to_json(), 0o600)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(dir);
        return Err(e);
    }
    Ok((custody, shares))
}

/// `cardvault keys init`: a KEK split among custodians, or (`--insecure-dev-key`) the dev key.
pub fn keys_init(
    config_path: &Path,
    custodians: Option<&str>,
    threshold: Option<u8>,
    passphrase_files: &[String],
    insecure_dev_key: bool,
) -> Result<(), CommandError> {
    let config = Config::load(config_path)?;
    refuse_root_in_others_folder(&config.keys_dir)?;
    private_dir(&config.keys_dir)?;
    let custody_dir = config.keys_dir.join(CUSTODIANS_DIR);
    let dev_key = config.keys_dir.join(DEV_KEY_FILE);
    if custody_dir.exists() || dev_key.exists() {
        return Err(CommandError::Keys(format!(
            "{} already holds a key; refusing to make another",
            config.keys_dir.display()
        )));
    }
    let audit_key = config.keys_dir.join(crate::audit::file::KEY_FILE);
    if !audit_key.exists() {
        crate::audit::file::AuditKey::create(&audit_key).map_err(keys_error)?;
        println!(
            "wrote the audit key (chains the audit log) to {}",
            audit_key.display()
        );
    }
    if insecure_dev_key {
        if custodians.is_some() {
            return Err(CommandError::Keys(
                "--insecure-dev-key and --custodians exclude each other".into(),
            ));
        }
        DevKey::create(&dev_key).map_err(keys_error)?;
        println!(
            "wrote an INSECURE dev key to {}: one file holds the whole KEK; for dev and tests only",
            dev_key.display()
        );
        return Ok(());
    }
    let (Some(custodians), Some(threshold)) = (custodians, threshold) else {
        return Err(CommandError::Keys(
            "give --custodians NAME,NAME,... and --threshold K (or --insecure-dev-key for dev)"
                .into(),
        ));
    };
    let names: Vec<String> = custodians.split(',').map(|n| n.trim().to_owned()).collect();
    let passphrases = Passphrases::parse(passphrase_files)?;
    if let crate::crypto::seal::Backend::Pkcs11(settings) = &config.kek {
        return keys_init_pkcs11(&config, settings, &names, threshold, &passphrases);
    }
    let (custody, _shares) = write_custody(&custody_dir, &names, threshold, &passphrases)?;
    println!(
        "made KEK {} and split it {}-of-{}; the KEK itself was not written anywhere",
        custody.kek_id,
        custody.threshold,
        custody.custodians.len()
    );
    print_shares(&custody, &custody_dir);
    Ok(())
}

/// Where each custodian's share went.
fn print_shares(custody: &Custody, custody_dir: &Path) {
    for c in &custody.custodians {
        println!(
            "  {}: {}",
            c.name,
            custody::share_path(custody_dir, &c.name).display()
        );
    }
    println!(
        "each custodian keeps a copy of their own share file and passphrase; {} of them unseal",
        custody.threshold
    );
}

/// `keys init` with `[kek] backend = "pkcs11"`: the KEK is made inside the device (or the
/// device's key with that label is taken, once its attributes pass); a recovery KEK is split
/// among the custodians as with shamir; and the store gets its root key, wrapped by the
/// device's KEK and, as the recovery copy, by the custodians' KEK. The store must be new.
fn keys_init_pkcs11(
    config: &Config,
    settings: &crate::crypto::seal::Pkcs11Settings,
    names: &[String],
    threshold: u8,
    passphrases: &Passphrases,
) -> Result<(), CommandError> {
    use crate::crypto::pkcs11::{Fault, Hsm};
    use crate::crypto::seal::KekBackend;
    store_stopped(config, "the store")?;
    if let Some(dir) = config.data_dir() {
        private_dir(dir)?;
    }
    let store =
        crate::store::Store::open(&config.store).map_err(|e| CommandError::Store(e.to_string()))?;
    if let Some(id) = store
        .kek_id()
        .map_err(|e| CommandError::Store(e.to_string()))?
    {
        return Err(CommandError::Keys(format!(
            "the store is sealed under KEK {id} already: `cardvault keys migrate --to pkcs11` \
             moves an existing store to the HSM"
        )));
    }
    let hsm = Hsm::connect(settings, None).map_err(keys_error)?;
    let kek = match hsm.open_key() {
        Ok(kek) => {
            println!(
                "the token already holds a key labelled {:?} (KEK {}); its attributes pass, so \
                 it is used",
                settings.key_label,
                kek.id()
            );
            kek
        }
        Err(e) if e.fault == Fault::KeyMissing => {
            let id = new_kek_id().map_err(keys_error)?;
            hsm.generate(&id).map_err(keys_error)?
        }
        Err(e) => return Err(keys_error(e)),
    };
    let custody_dir = config.keys_dir.join(CUSTODIANS_DIR);
    let (custody, shares) = write_custody(&custody_dir, names, threshold, passphrases)?;
    let sealed = (|| {
        let refs: Vec<&Share> = shares.iter().collect();
        let recovery = custody.combine(&refs).map_err(keys_error)?;
        let recovery = crate::crypto::Kek::new(&recovery, &custody.kek_id);
        crate::vault::seal_new_store(&store, &kek, &recovery).map_err(keys_error)?;
        store
            .close()
            .map_err(|e| CommandError::Store(e.to_string()))
    })();
    if let Err(e) = sealed {
        let _ = std::fs::remove_dir_all(&custody_dir);
        return Err(e);
    }
    println!(
        "KEK {} is in the HSM (token {:?}, key {:?}): sensitive, never extractable; nobody \
         ever sees its bytes",
        kek.id(),
        settings.token_label,
        settings.key_label
    );
    println!(
        "made the store's root key, wrapped by the HSM's KEK, with a recovery copy under KEK \
         {} split {}-of-{} among the custodians (break-glass if the HSM is lost)",
        custody.kek_id,
        custody.threshold,
        custody.custodians.len()
    );
    print_shares(&custody, &custody_dir);
    Ok(())
}

/// `cardvault keys migrate --to pkcs11|shamir`: k custodians open their shares, and the
/// daemon moves the store's seal while it serves (the root key re-wrapped, nothing else).
pub fn keys_migrate(
    connect: &Connect,
    to: &str,
    share_files: &[PathBuf],
    passphrase_files: &[String],
) -> Result<(), CommandError> {
    let (config, client) = connect.open()?;
    if to != config.kek.name() {
        return Err(CommandError::Keys(format!(
            "--to {to}, but {} says [kek] backend = {:?}: set the backend (and, for pkcs11, \
             [kek.pkcs11]) in the config first, so the daemon's next start uses the new seal",
            connect.config.display(),
            config.kek.name()
        )));
    }
    let custody = Custody::load(&config.keys_dir.join(CUSTODIANS_DIR)).map_err(keys_error)?;
    let shares = open_custodians_shares(&custody, share_files, passphrase_files)?;
    // Built by hand so shares only ever sit in wiping memory (custodian names and `to` are
    // letters, digits, '-', '_' and '.': nothing to escape).
    let mut body = wiping(r#"{"to":""#);
    body.push_str(to);
    body.push_str(r#"","shares":"#);
    body.push_str(&share_entries(&shares));
    body.push('}');
    let reply = expect_ok(
        client
            .send("POST", "/v1/admin/keys/migrate", Some(body.as_bytes()))
            .map_err(keys_error)?,
    )?;
    println!(
        "the store is sealed by {to} now (KEK {}); no record was re-encrypted",
        at(&reply, "/kek_id").as_str().unwrap_or("")
    );
    Ok(())
}

/// `cardvault backup --out FILE`: the running daemon streams a backup of its store (permission
/// `backup`); it is written to `FILE.partial` (0600), its digest checked, then renamed.
pub fn backup(connect: &Connect, out: &Path) -> Result<(), CommandError> {
    use std::os::unix::fs::OpenOptionsExt;
    let (_, client) = connect.open()?;
    let failed = |e: String| CommandError::Store(format!("backup: {e}"));
    if out.exists() {
        return Err(failed(format!(
            "{} exists: refusing to overwrite it",
            out.display()
        )));
    }
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| failed(format!("{}: {e}", partial.display())))?;
    let received = (|| {
        let mut writer = std::io::BufWriter::with_capacity(crate::vault::backup::CHUNK, file);
        if let Some(reply) = client.download("/v1/admin/backup", &mut writer)? {
            return Err(expect_ok(reply).err().map_or_else(
                || "the vault answered without a backup".to_owned(),
                |e| e.to_string(),
            ));
        }
        let file = writer.into_inner().map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        crate::vault::backup::check_digest(&partial).map_err(|e| e.to_string())
    })();
    let counts = match received {
        Ok(counts) => counts,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(failed(e));
        }
    };
    std::fs::rename(&partial, out).map_err(|e| failed(format!("{}: {e}", out.display())))?;
    let head = crate::vault::backup::BackupHead::read(out).map_err(|e| failed(e.to_string()))?;
    println!(
        "wrote {} (backup {}, KEK {}): {}; ciphertext and wrapped keys only",
        out.display(),
        head.header.backup_id,
        head.header.kek_id,
        described(&head, &counts)
    );
    println!(
        "keep it with keys_dir (the custodians' kek.json and shares of this KEK) and the audit \
         files; restore it with `cardvault restore`"
    );
    Ok(())
}

/// `cardvault restore --from FILE` into an empty store, every daemon stopped. Before anything
/// is written: the file's digest (a damaged file), its KEK id against the custodians' (or the
/// HSM's), and its MAC under the root key that KEK opens. Then every entry, and the root key
/// last. The daemon then starts sealed as after any restart (or unseals through the HSM).
pub fn restore(
    config_path: &Path,
    from: &Path,
    share_files: &[PathBuf],
    passphrase_files: &[String],
) -> Result<(), CommandError> {
    use crate::crypto::seal::KekBackend;
    use crate::vault::backup::{self, BackupHead};
    let config = Config::load(config_path)?;
    let failed = |e: &dyn std::fmt::Display| CommandError::Store(format!("restore: {e}"));
    store_stopped(&config, "the store")?;
    if let Some(dir) = config.data_dir() {
        new_data_dir(dir)?;
    }
    let head = BackupHead::read(from).map_err(|e| failed(&e))?;
    let ids = head.kek_ids().map_err(|e| failed(&e))?;
    let another = |held: &str| {
        failed(&format!(
            "the backup is under KEK {}; {held}: it is another vault's backup, or one from \
             before a rekey or a seal move (use that time's shares or key)",
            ids.join(" (recovery: ") + if ids.len() > 1 { ")" } else { "" }
        ))
    };
    let kek: Box<dyn KekBackend> = if !share_files.is_empty() {
        let custody = Custody::load(&config.keys_dir.join(CUSTODIANS_DIR)).map_err(keys_error)?;
        if !ids.contains(&custody.kek_id) {
            return Err(another(&format!(
                "keys_dir's custodians hold {}",
                custody.kek_id
            )));
        }
        backup::check_digest(from).map_err(|e| failed(&e))?;
        let shares = open_custodians_shares(&custody, share_files, passphrase_files)?;
        let refs: Vec<&Share> = shares.iter().collect();
        let material = custody.combine(&refs).map_err(keys_error)?;
        Box::new(crate::crypto::Kek::new(&material, &custody.kek_id))
    } else if let crate::crypto::seal::Backend::Pkcs11(settings) = &config.kek {
        let hsm = crate::crypto::pkcs11::Hsm::connect(settings, None).map_err(keys_error)?;
        let kek = hsm.open_key().map_err(keys_error)?;
        if !ids.iter().any(|id| id == kek.id()) {
            return Err(another(&format!("the HSM's KEK is {}", kek.id())));
        }
        backup::check_digest(from).map_err(|e| failed(&e))?;
        Box::new(kek)
    } else if config.insecure_dev_key && config.keys_dir.join(DEV_KEY_FILE).exists() {
        let kek = DevKey::load(&config.keys_dir.join(DEV_KEY_FILE)).map_err(keys_error)?;
        if !ids.iter().any(|id| id == kek.id()) {
            return Err(another(&format!("the dev key is {}", kek.id())));
        }
        backup::check_digest(from).map_err(|e| failed(&e))?;
        Box::new(kek)
    } else {
        backup::check_digest(from).map_err(|e| failed(&e))?;
        return Err(failed(
            &"give k custodians' shares (--share NAME.share, one per custodian): their KEK \
              opens the backup's root key, which checks its MAC before anything is written",
        ));
    };
    backup::check_mac(from, &head, kek.as_ref()).map_err(|e| failed(&e))?;
    let store = crate::store::Store::open(&config.store).map_err(|e| failed(&e))?;
    let counts = backup::restore(&store, from, &head, kek.as_ref()).map_err(|e| failed(&e))?;
    store.close().map_err(|e| failed(&e))?;
    println!(
        "restored backup {}: {}; digest and MAC checked",
        head.header.backup_id,
        described(&head, &counts)
    );
    println!(
        "start the daemon: it unseals as after any restart (k custodians, or the HSM; \
         keys/README.md runbook 2)"
    );
    Ok(())
}

/// When a backup was taken and what it holds, for a person.
fn described(
    head: &crate::vault::backup::BackupHead,
    counts: &crate::vault::backup::Counts,
) -> String {
    format!(
        "taken {} at commit {}: {} cards, {} customers, {} customer tokens, {} idempotency \
         keys, {} wrapped keys",
        head.header.created_at,
        head.header
            .commit
            .map_or_else(|| "-".to_owned(), |c| c.to_string()),
        counts.cards,
        counts.customers,
        counts.tokens,
        counts.idempotency,
        counts.keys
    )
}

/// A `data_dir` to restore into: absent (made 0700), or empty but for a commit witness left
/// by an earlier store, which is removed (it would refuse the restored store's lower number).
fn new_data_dir(dir: &Path) -> Result<(), CommandError> {
    let witness = crate::store::WITNESS_FILE;
    if let Ok(entries) = std::fs::read_dir(dir) {
        let others: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != witness)
            .collect();
        if !others.is_empty() {
            return Err(CommandError::Store(format!(
                "restore: {} is not empty ({}): restore into a new or emptied data_dir",
                dir.display(),
                others.join(", ")
            )));
        }
        if dir.join(witness).exists() {
            std::fs::remove_file(dir.join(witness))
                .map_err(|e| CommandError::Store(format!("restore: {witness}: {e}")))?;
            println!(
                "removed the commit witness an earlier store left in {}",
                dir.display()
            );
        }
    }
    private_dir(dir)
}

/// Shares as the JSON list the key endpoints take, in wiping memory.
fn share_entries(list: &[Share]) -> Zeroizing<String> {
    let mut out = wiping("[");
    for (i, s) in list.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"{"custodian":""#);
        out.push_str(&s.custodian);
        out.push_str(r#"","share":""#);
        out.push_str(&s.to_hex());
        out.push_str(r#""}"#);
    }
    out.push(']');
    out
}

/// How an operator command reaches the daemon.
#[derive(Clone)]
pub struct Connect {
    pub config: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA of the vault's server certificate; default: the config's `tls.client_ca`.
    pub ca: Option<PathBuf>,
    /// Default: `https://` and the config's `listen` (a wildcard address becomes loopback).
    pub url: Option<String>,
}

impl Connect {
    fn open(&self) -> Result<(Config, AdminClient), CommandError> {
        let config = Config::load(&self.config)?;
        let url = match &self.url {
            Some(url) => url.clone(),
            None => {
                let mut addr = config.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("https://{addr}")
            }
        };
        let ca = self
            .ca
            .clone()
            .unwrap_or_else(|| config.tls.client_ca.clone());
        let client = AdminClient::new(&url, &ca, &self.cert, &self.key).map_err(keys_error)?;
        Ok((config, client))
    }
}

fn expect_ok(reply: crate::client::Reply) -> Result<serde_json::Value, CommandError> {
    if reply.status == 200 {
        return Ok(reply.body);
    }
    Err(CommandError::Keys(format!(
        "the vault answered {} {}: {}",
        reply.status,
        at(&reply.body, "/error/code").as_str().unwrap_or(""),
        at(&reply.body, "/error/message").as_str().unwrap_or("")
    )))
}

/// Opens a share file with its custodian's passphrase (from `files`, else the terminal).
fn open_share_file(path: &Path, passphrases: &Passphrases) -> Result<Share, CommandError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CommandError::Keys(format!("{}: {e}", path.display())))?;
    let custodian = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| at(&v, "/custodian").as_str().map(str::to_owned))
        .ok_or_else(|| CommandError::Keys(format!("{} is not a share file", path.display())))?;
    let passphrase = passphrases.get(
        &custodian,
        &format!("passphrase for {custodian}'s share: "),
        false,
    )?;
    custody::open_share(&text, passphrase.as_bytes()).map_err(keys_error)
}

/// Opens each share file with its custodian's passphrase and checks it is a share of
/// `custody`'s KEK, before anything is sent.
fn open_custodians_shares(
    custody: &Custody,
    share_files: &[PathBuf],
    passphrase_files: &[String],
) -> Result<Vec<Share>, CommandError> {
    let passphrases = Passphrases::parse(passphrase_files)?;
    let shares = share_files
        .iter()
        .map(|f| open_share_file(f, &passphrases))
        .collect::<Result<Vec<_>, _>>()?;
    for share in &shares {
        custody.verify(share).map_err(keys_error)?;
    }
    Ok(shares)
}

/// `cardvault unseal`: opens one share locally and submits it with the custodian's own
/// certificate.
pub fn unseal(
    connect: &Connect,
    urls: &[String],
    share_file: &Path,
    passphrase_file: Option<&Path>,
) -> Result<(), CommandError> {
    // One node (the config's, or one --url) or every node named.
    let targets: Vec<Connect> = if urls.len() <= 1 {
        vec![connect.clone()]
    } else {
        urls.iter()
            .map(|url| Connect {
                url: Some(url.clone()),
                ..connect.clone()
            })
            .collect()
    };
    let clients = targets
        .iter()
        .map(|t| t.open().map(|(_, client)| (t.url.clone(), client)))
        .collect::<Result<Vec<_>, _>>()?;
    let passphrases = Passphrases(Vec::new());
    let share = match passphrase_file {
        Some(path) => {
            let text = std::fs::read_to_string(share_file)
                .map_err(|e| CommandError::Keys(format!("{}: {e}", share_file.display())))?;
            let passphrase = read_passphrase_file(path)?;
            custody::open_share(&text, passphrase.as_bytes()).map_err(keys_error)?
        }
        None => open_share_file(share_file, &passphrases)?,
    };
    // Built by hand so the share's hex only ever sits in wiping memory (the KEK id is
    // `kek_` and hex digits: nothing to escape).
    let mut body = wiping(r#"{"kek_id":""#);
    body.push_str(&share.kek_id);
    body.push_str(r#"","share":""#);
    body.push_str(&share.to_hex());
    body.push_str(r#""}"#);
    drop(share);
    let mut failed = Vec::new();
    for (url, client) in &clients {
        let node = match (url, clients.len()) {
            (Some(url), n) if n > 1 => format!("{url}: "),
            _ => String::new(),
        };
        let reply = client
            .send("POST", "/v1/admin/unseal", Some(body.as_bytes()))
            .map_err(keys_error)
            .and_then(expect_ok);
        match reply {
            Ok(reply) if at(&reply, "/sealed") == false => {
                println!("{node}unsealed: the vault is serving")
            }
            Ok(reply) => println!(
                "{node}share accepted: {} of {} custodians; still sealed",
                at(&reply, "/received"),
                at(&reply, "/threshold")
            ),
            // One node's refusal does not keep the share from the others.
            Err(e) if clients.len() > 1 => {
                eprintln!("{node}{e}");
                failed.push(url.clone().unwrap_or_default());
            }
            Err(e) => return Err(e),
        }
    }
    if !failed.is_empty() {
        return Err(CommandError::Keys(format!(
            "the share was not accepted by {}",
            failed.join(", ")
        )));
    }
    Ok(())
}

/// `cardvault keys status`: the key inventory, as a table or JSON.
pub fn keys_status(connect: &Connect, json: bool) -> Result<(), CommandError> {
    let (_, client) = connect.open()?;
    let inventory = expect_ok(
        client
            .send("GET", "/v1/admin/keys", None)
            .map_err(keys_error)?,
    )?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&inventory).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "sealed: {}   active DEK version: {}",
        at(&inventory, "/sealed"),
        at(&inventory, "/active_dek_version")
    );
    let seal = at(&inventory, "/seal");
    let text = |p: &str| at(seal, p).as_str().unwrap_or("-").to_owned();
    print!("seal: {}", text("/backend"));
    if seal.get("token").is_some() {
        print!(
            " (token {:?}, key {:?})",
            text("/token"),
            text("/key_label")
        );
    }
    if seal.get("unsealed_by").is_some() {
        print!("   unsealed by: {}", text("/unsealed_by"));
    }
    println!();
    if let Some(a) = seal.get("attributes") {
        let flag = |name: &str| at(a, &format!("/{name}")) == true;
        println!(
            "  HSM key {}: AES-{}, sensitive={} always_sensitive={} extractable={} \
             never_extractable={} encrypt={} decrypt={} wrap={} unwrap={} derive={} sign={}",
            at(a, "/id").as_str().unwrap_or(""),
            at(a, "/bits"),
            flag("sensitive"),
            flag("always_sensitive"),
            flag("extractable"),
            flag("never_extractable"),
            flag("encrypt"),
            flag("decrypt"),
            flag("wrap"),
            flag("unwrap"),
            flag("derive"),
            flag("sign"),
        );
    }
    if seal.get("fault").is_some() {
        println!("  HSM fault: {}", text("/fault"));
    }
    println!(
        "{:<28} {:<13} {:<13} {:>11} {:>9}  purpose",
        "key", "algorithm", "state", "encryptions", "records"
    );
    for k in at(&inventory, "/keys").as_array().into_iter().flatten() {
        let num = |f: &str| {
            k.get(f)
                .and_then(serde_json::Value::as_u64)
                .map_or("-".into(), |n| n.to_string())
        };
        println!(
            "{:<28} {:<13} {:<13} {:>11} {:>9}  {}{}",
            at(k, "/id").as_str().unwrap_or(""),
            at(k, "/algorithm").as_str().unwrap_or(""),
            at(k, "/state").as_str().unwrap_or(""),
            num("encryptions"),
            num("records"),
            at(k, "/purpose").as_str().unwrap_or(""),
            at(k, "/custody")
                .as_str()
                .map(|c| format!(" [{c}]"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `cardvault keys rotate`: a new DEK version now.
pub fn keys_rotate(connect: &Connect) -> Result<(), CommandError> {
    let (_, client) = connect.open()?;
    let reply = expect_ok(
        client
            .send("POST", "/v1/admin/keys/rotate", Some(b"{}"))
            .map_err(keys_error)?,
    )?;
    println!(
        "DEK version {} is active; older versions are being re-encrypted away (see `keys status`)",
        at(&reply, "/active_dek_version")
    );
    Ok(())
}

/// Refuses to write, as root, into a folder another user owns (the daemon's `keys_dir` or
/// audit folder): the files would be root's and the daemon could not read them, and giving
/// them away afterwards would mean root following paths that user controls. Run the command
/// as that user instead.
fn refuse_root_in_others_folder(dir: &Path) -> Result<(), CommandError> {
    use std::os::unix::fs::MetadataExt;
    if !crate::hardening::is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    Err(CommandError::Keys(format!(
        "{} belongs to uid {}: run this as that user (e.g. sudo -u cardvault cardvault ...), \
         so that what it writes there is readable by the daemon",
        dir.display(),
        meta.uid()
    )))
}

/// Moves the new custodians' folder into place once the vault uses its KEK; the old shares
/// are removed (they open nothing any more).
fn promote(current_dir: &Path, next_dir: &Path, kek_id: &str) -> Result<(), CommandError> {
    let retired = current_dir.with_extension("retired");
    let _ = std::fs::remove_dir_all(&retired);
    std::fs::rename(current_dir, &retired)
        .and_then(|()| std::fs::rename(next_dir, current_dir))
        .map_err(|e| {
            CommandError::Keys(format!(
                "the vault now uses KEK {kek_id}, but moving {} into place failed: {e}; the \
                 daemon also finds it there after a restart",
                next_dir.display()
            ))
        })?;
    let _ = std::fs::remove_dir_all(&retired);
    Ok(())
}

/// A `custodians.next` left by a rekey whose outcome was unknown (a timeout, a reset, a
/// vault that could not be reached): the vault says which KEK it uses. If it is the new one,
/// that rekey took effect: its folder is moved into place and `Ok(true)` says so. If it is
/// still the current one, it never did: its shares open nothing, they are removed, and the
/// rekey runs again (`Ok(false)`). Anything else is left for an operator.
fn settle_unfinished_rekey(
    client: &crate::client::AdminClient,
    current_dir: &Path,
    next_dir: &Path,
) -> Result<bool, CommandError> {
    let current = Custody::load(current_dir).map_err(keys_error)?;
    let next = Custody::load(next_dir).map_err(keys_error)?;
    let inventory = expect_ok(
        client
            .send("GET", "/v1/admin/keys", None)
            .map_err(keys_error)?,
    )?;
    let unfinished = |why: &str| {
        CommandError::Keys(format!(
            "{} exists: a rekey did not finish, and {why}; see keys/README.md, runbook 4 step 5",
            next_dir.display()
        ))
    };
    if inventory.get("sealed") != Some(&serde_json::Value::Bool(false)) {
        return Err(unfinished(
            "the vault is sealed: unseal it and run this again",
        ));
    }
    // The custodians' KEK: the store's KEK, or its recovery KEK while the KEK is in an HSM.
    let in_use = inventory
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter(|k| {
            k.get("purpose")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|p| p.starts_with("key-encryption") || p.starts_with("recovery"))
        })
        .filter_map(|k| k.get("id").and_then(serde_json::Value::as_str))
        .map(str::to_owned)
        .find(|id| *id == next.kek_id || *id == current.kek_id)
        .unwrap_or_default();
    if in_use == next.kek_id {
        promote(current_dir, next_dir, &next.kek_id)?;
        println!(
            "the last rekey had taken effect: KEK {} ({}-of-{}) replaces {}; its shares are \
             now in {}. Nothing else was changed",
            next.kek_id,
            next.threshold,
            next.custodians.len(),
            current.kek_id,
            current_dir.display()
        );
        return Ok(true);
    }
    if in_use == current.kek_id {
        // Set aside, never deleted: a rekey still under way in the vault (queued behind
        // another key operation, say) could yet commit that KEK, and then only these shares
        // open the store; the daemon finds them by KEK id at its next start.
        let aside = current_dir.with_file_name(format!(
            "{}{}",
            custody::ABANDONED_CUSTODIANS_PREFIX,
            next.kek_id
        ));
        std::fs::rename(next_dir, &aside)
            .map_err(|e| CommandError::Keys(format!("moving {} aside: {e}", next_dir.display())))?;
        eprintln!(
            "the last rekey had not taken effect (the vault still uses {}): its new shares are \
             kept in {} in case it still does; rekeying again",
            current.kek_id,
            aside.display()
        );
        return Ok(false);
    }
    Err(unfinished(&format!(
        "the vault uses KEK {in_use:?}, neither {} nor {}",
        current.kek_id, next.kek_id
    )))
}

/// `cardvault keys rekey`: k current custodians open their shares; a new KEK is split for the
/// new custodian list into `custodians.next/`; the daemon re-wraps every key under it; then
/// the new folder replaces the old one, whose shares no longer open anything.
pub fn keys_rekey(
    connect: &Connect,
    share_files: &[PathBuf],
    passphrase_files: &[String],
    custodians: &str,
    threshold: u8,
    new_passphrase_files: &[String],
) -> Result<(), CommandError> {
    let (config, client) = connect.open()?;
    refuse_root_in_others_folder(&config.keys_dir)?;
    let current_dir = config.keys_dir.join(CUSTODIANS_DIR);
    let next_dir = config.keys_dir.join(NEXT_CUSTODIANS_DIR);
    let current = Custody::load(&current_dir).map_err(keys_error)?;
    if next_dir.exists() && settle_unfinished_rekey(&client, &current_dir, &next_dir)? {
        return Ok(());
    }
    let shares = open_custodians_shares(&current, share_files, passphrase_files)?;
    let names: Vec<String> = custodians.split(',').map(|n| n.trim().to_owned()).collect();
    let (next, mut next_shares) = write_custody(
        &next_dir,
        &names,
        threshold,
        &Passphrases::parse(new_passphrase_files)?,
    )?;
    // k of the new shares let the daemon rebuild the new KEK.
    next_shares.truncate(usize::from(next.threshold));
    let result = (|| {
        // Built by hand so shares only ever sit in wiping memory (custodian names are
        // letters, digits, '-', '_' and '.': nothing to escape).
        let next_json = serde_json::to_string(&next).map_err(keys_error)?;
        let (current_entries, next_entries) = (share_entries(&shares), share_entries(&next_shares));
        let mut body = wiping(r#"{"shares":"#);
        body.push_str(&current_entries);
        body.push_str(r#","next":"#);
        body.push_str(&next_json);
        body.push_str(r#","next_shares":"#);
        body.push_str(&next_entries);
        body.push('}');
        client
            .send("POST", "/v1/admin/keys/rekey", Some(body.as_bytes()))
            .map_err(keys_error)
    })();
    match result {
        Ok(reply) if reply.status == 200 => {}
        // Refused before anything changed: the new shares are useless.
        Ok(reply) if (400..500).contains(&reply.status) => {
            let _ = std::fs::remove_dir_all(&next_dir);
            expect_ok(reply)?;
        }
        // Unknown outcome (timeout, reset, server error): the daemon may already use the new
        // KEK, and then only these shares open the store. Never delete them here.
        other => {
            let why = match other {
                Ok(reply) => format!("the vault answered {}", reply.status),
                Err(e) => e.to_string(),
            };
            return Err(CommandError::Keys(format!(
                "rekey outcome unknown ({why}). {} is KEPT: compare `cardvault keys status` \
                 with its kek.json; if the vault reports that KEK id, move it to {}; \
                 otherwise remove it (keys/README.md, runbook 4 step 5)",
                next_dir.display(),
                current_dir.display()
            )));
        }
    }
    promote(&current_dir, &next_dir, &next.kek_id)?;
    println!(
        "rekeyed: KEK {} ({}-of-{}) replaces {}; the old shares open nothing any more",
        next.kek_id,
        next.threshold,
        next.custodians.len(),
        current.kek_id
    );
    Ok(())
}

/// `cardvault audit verify FILE... --config CONFIG`: checks every line's MAC and chain link,
/// and that each file continues the one before; an error names the file and first bad line.
pub fn audit_verify(
    config_path: &Path,
    logs: &[PathBuf],
    rotated: bool,
    key: Option<&Path>,
) -> Result<(), CommandError> {
    use crate::audit::file::{verify_files, AuditKey, Verdict, KEY_FILE};
    let config = Config::load(config_path)?;
    let key_path = key.map_or_else(|| config.keys_dir.join(KEY_FILE), Path::to_owned);
    let key = AuditKey::load(&key_path).map_err(keys_error)?;
    let logs = if logs.is_empty() {
        let mut files = crate::audit::file::parts(&config.audit_path);
        files.push(config.audit_path.clone());
        files
    } else {
        logs.to_vec()
    };
    match verify_files(&logs, &key, rotated).map_err(keys_error)? {
        (_, Verdict::Intact(lines, first, last)) => {
            println!(
                "intact: {} file(s), {lines} lines, seq {first} to {last}",
                logs.len()
            );
            Ok(())
        }
        (path, Verdict::Broken(line, why)) => Err(CommandError::Audit(format!(
            "{}: line {line}: {why}",
            path.display()
        ))),
    }
}

/// `cardvault audit rotate-key --config F`, the daemon stopped: the audit log and its key move
/// aside, and a new log under a new key continues the old one's chain (its first line's
/// `prev` is the old last line's MAC).
pub fn audit_rotate_key(config_path: &Path) -> Result<(), CommandError> {
    let config = Config::load(config_path)?;
    // Held to the end: no daemon starts on the log (or, on sled, the store) while it is rotated.
    let _stopped = match config.data_dir() {
        Some(dir) => crate::store::Store::lock_stopped(dir)
            .map_err(|why| CommandError::Audit(format!("{why}: stop it first")))?,
        None => None,
    };
    let _log = match crate::audit::file::lock(&config.audit_path) {
        Ok(file) => Some(file),
        // No folder yet: no daemon has written this log.
        Err(_) if config.audit_path.parent().is_some_and(|d| !d.exists()) => None,
        Err(e) => return Err(CommandError::Audit(format!("{}: stop it first", e.0))),
    };
    refuse_root_in_others_folder(&config.keys_dir)?;
    if let Some(audit_dir) = config.audit_path.parent() {
        refuse_root_in_others_folder(audit_dir)?;
    }
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .map_err(|e| CommandError::Audit(e.to_string()))?;
    let key_path = config.keys_dir.join(crate::audit::file::KEY_FILE);
    let (seq, moved) = crate::audit::file::rotate_key(&config.audit_path, &key_path, &stamp)
        .map_err(|e| CommandError::Audit(e.0))?;
    println!(
        "rotated the audit key: {} (verify it with --key {}.{stamp}) ends at seq {seq}; {} \
         continues it under the new key (verify it with --rotated)",
        moved.display(),
        key_path.display(),
        config.audit_path.display()
    );
    Ok(())
}

/// `cardvault dev`: throwaway certificates, policy and key; serves and prints curl examples.
pub fn dev(dir: &Path, listen: &str) -> Result<(), CommandError> {
    let config_path = crate::dev::prepare(dir, listen)?;
    let config = Config::load(&config_path)?;
    init_logging(&config.log);
    run(&config, |app| {
        println!(
            "{}",
            crate::dev::curl_examples(dir, &config, app.local_addr())
        );
    })
}

/// `cardvault bench`: prints a table (or JSON) of throughput and latency per scenario.
/// `cardvault bench --import-rows N`.
pub fn bench_import(store: &str, rows: &str, json: bool) -> Result<(), CommandError> {
    use crate::bench::BenchError;
    let rows = crate::bench::parse_count(rows)
        .filter(|n| *n > 0)
        .ok_or_else(|| BenchError::Setup(format!("{rows:?} is not a count like 1M")))?;
    let figures = crate::bench::import_run(store == "postgres", rows)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).unwrap_or_default()
        );
        return Ok(());
    }
    let mib = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    println!("| rows | file MiB | seconds | rows/s | rows/s again | daemon RSS before MiB | daemon peak RSS MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {} | {} |",
        figures.rows,
        figures.file_mib,
        figures.seconds,
        figures.rows_per_second,
        figures.rerun_rows_per_second,
        mib(figures.server_rss_before_mib),
        mib(figures.server_peak_rss_mib)
    );
    Ok(())
}

pub fn bench(
    duration: &str,
    concurrency: usize,
    scenarios: &[String],
    json: bool,
    (store, nodes): (&str, usize),
    target: Option<crate::bench::Target>,
    (fill, growth): (&str, Option<&str>),
) -> Result<(), CommandError> {
    use crate::bench::{BenchError, BenchOptions, SCENARIOS};
    let count = |text: &str| {
        crate::bench::parse_count(text).ok_or_else(|| {
            BenchError::Setup(format!("{text:?} is not a count like 500000, 250k or 10M"))
        })
    };
    let fill = count(fill)?;
    let growth = growth
        .map(|list| {
            list.split(',')
                .map(|n| count(n.trim()))
                .collect::<Result<Vec<u64>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    if growth.iter().zip(growth.iter().skip(1)).any(|(a, b)| b < a) {
        return Err(BenchError::Setup("--growth: sizes in increasing order".into()).into());
    }
    let postgres = match store {
        "sled" => false,
        "postgres" => true,
        other => {
            return Err(
                BenchError::Setup(format!("--store {other:?}: use sled or postgres")).into(),
            )
        }
    };
    if nodes == 0 || (nodes > 1 && !postgres) {
        return Err(BenchError::Setup(
            "--nodes: at least 1, and more than 1 only with --store postgres (sled serves one process)"
                .into(),
        )
        .into());
    }
    let duration = crate::config::parse_duration(duration)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            BenchError::Setup(format!(
                "--duration {duration:?} is not a duration like 10s or 1m"
            ))
        })?;
    let scenarios = if scenarios.is_empty() || scenarios.iter().any(|s| s == "all") {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        scenarios.to_vec()
    };
    let options = BenchOptions {
        duration,
        concurrency: concurrency.max(1),
        scenarios,
        json,
        postgres,
        nodes,
        target,
        fill,
        growth,
    };
    if !options.growth.is_empty() {
        let steps = crate::bench::growth(&options)?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&steps).unwrap_or_default()
            );
        } else {
            print!("{}", crate::bench::growth_table(&steps));
        }
        return Ok(());
    }
    let figures = crate::bench::run(&options)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).unwrap_or_default()
        );
    } else {
        print!("{}", crate::bench::table(&figures));
    }
    Ok(())
}

/// `cardvault check --config F`: every problem `serve` would refuse to start on, and every
/// warning it would log, without starting; non-zero when there is a problem.
pub fn check(config_path: &Path) -> Result<(), CommandError> {
    let config = Config::load(config_path)?;
    let found = crate::check::run(&config);
    for p in &found.problems {
        println!("problem: {p}");
    }
    for w in &found.warnings {
        println!("warning: {w}");
    }
    if found.problems.is_empty() {
        println!(
            "{}: no problems ({} warning(s)); the store is checked when serve opens it",
            config_path.display(),
            found.warnings.len()
        );
        Ok(())
    } else {
        Err(CommandError::Check(found.problems.len()))
    }
}

/// `cardvault policy explain --config F --cert X.pem`: which identity a client certificate
/// is, and what it may do on which projects.
pub fn policy_explain(config_path: &Path, cert: &Path) -> Result<(), CommandError> {
    let config = Config::load(config_path)?;
    let policy = crate::policy::Policy::load(&config.policies)
        .map_err(|e| CommandError::Explain(e.to_string()))?;
    let chain = crate::tls::load_certs(cert).map_err(|e| CommandError::Explain(e.to_string()))?;
    let Some(peer) = crate::tls::peer_from_chain(&chain) else {
        return Err(CommandError::Explain(format!(
            "{}: no identity: the leaf lacks the clientAuth extended key usage (every request \
             is refused)",
            cert.display()
        )));
    };
    match policy.identify(&peer) {
        Ok(identity) => {
            println!("{}", identity.explain());
            Ok(())
        }
        Err(denied) => Err(CommandError::Explain(format!(
            "{}: {denied} (subject {}): every request is refused",
            cert.display(),
            peer.subject
        ))),
    }
}

/// Refuses when a daemon may be running on the store `config` names: a sled folder is locked
/// by its daemon (and, once opened here, by this process); a PostgreSQL database has no
/// cardvault connection.
fn store_stopped(config: &Config, side: &str) -> Result<(), CommandError> {
    use crate::store::{Postgres, StoreConfig};
    match &config.store {
        StoreConfig::Sled { dir, .. } => {
            crate::store::Store::lock_stopped(dir)
                .map_err(|why| CommandError::Store(format!("{side}: {why}: stop it first")))?;
            Ok(())
        }
        StoreConfig::Postgres(settings) => {
            let connected = Postgres::daemons_connected(settings)
                .map_err(|e| CommandError::Store(format!("{side}: {e}")))?;
            if connected > 0 {
                return Err(CommandError::Store(format!(
                    "{side}: {connected} cardvault connection(s) to the database: stop every daemon first"
                )));
            }
            Ok(())
        }
    }
}

/// `cardvault store copy --from A --to B`, every daemon stopped: moves a store between engines
/// (sled to PostgreSQL, or back) as the bytes it holds, so every record opens under the same
/// keys. The KEK check value is written last: a copy cut short leaves a destination no daemon
/// starts on, and running the command again completes it. On a destination that already holds
/// this store it only verifies; one holding another store is refused.
pub fn store_copy(from: &Path, to: &Path) -> Result<(), CommandError> {
    use crate::store::{Kind, Store};
    let from_config = Config::load(from)?;
    let to_config = Config::load(to)?;
    fn failed(side: &'static str) -> impl Fn(crate::store::StoreError) -> CommandError {
        move |e| CommandError::Store(format!("{side}: {e}"))
    }
    store_stopped(&from_config, "--from")?;
    store_stopped(&to_config, "--to")?;
    if let (Some(a), Some(b)) = (from_config.data_dir(), to_config.data_dir()) {
        if a == b {
            return Err(CommandError::Store(
                "--from and --to are the same store".into(),
            ));
        }
    }
    if let Some(dir) = to_config.data_dir() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CommandError::Store(format!("--to: {}: {e}", dir.display())))?;
    }
    let source = Store::open(&from_config.store).map_err(failed("--from"))?;
    let target = Store::open(&to_config.store).map_err(failed("--to"))?;
    let Some((check, kek_id)) = source.kek_check().map_err(failed("--from"))? else {
        return Err(CommandError::Store(
            "--from: the store is empty (no KEK check value): nothing to copy".into(),
        ));
    };
    let already = match target.kek_check().map_err(failed("--to"))? {
        Some((c, id)) if c == check && id == kek_id => true,
        Some(_) => {
            return Err(CommandError::Store(
                "--to: the destination holds another vault's store (another KEK); refusing to \
                 mix them"
                    .into(),
            ))
        }
        None => false,
    };
    if !already {
        for kind in Kind::ALL {
            for item in source.raw_entries(kind) {
                let (project, id, bytes) = item.map_err(failed("--from"))?;
                target
                    .put_raw(kind, &project, &id, &bytes)
                    .map_err(failed("--to"))?;
            }
        }
        if let Some(state) = source.dek_state().map_err(failed("--from"))? {
            let current = target.dek_state().map_err(failed("--to"))?;
            if current.as_deref() != Some(state.as_slice()) {
                target
                    .swap_dek_state(current.as_deref(), &state)
                    .map_err(failed("--to"))?;
            }
        }
        for (project, version, reserved) in source.reservations().map_err(failed("--from"))? {
            // A rerun tops a reservation up to the source's, never past it.
            let held = target
                .encryptions_reserved(&project, version)
                .map_err(failed("--to"))?;
            if reserved > held {
                target
                    .ledger()
                    .reserve(&project, version, reserved - held)
                    .map_err(failed("--to"))?;
            }
        }
        target.flush().map_err(failed("--to"))?;
        // Last: only now can a daemon start on the destination. The root key goes with the
        // check value, in the same transaction.
        match source.root_key().map_err(failed("--from"))? {
            Some(root) => {
                let held = target.root_key().map_err(failed("--to"))?;
                let recovery = source.recovery_root().map_err(failed("--from"))?;
                let held_recovery = target.recovery_root().map_err(failed("--to"))?;
                if !target
                    .rewrap(
                        &[],
                        (held.as_deref(), &root),
                        &check,
                        &kek_id,
                        Some((held_recovery.as_deref(), recovery.as_deref())),
                    )
                    .map_err(failed("--to"))?
                {
                    return Err(CommandError::Store(
                        "--to: the destination's root key changed during the copy".into(),
                    ));
                }
            }
            None => target
                .set_kek_check(&check, &kek_id)
                .map_err(failed("--to"))?,
        }
    }
    // Verify: the same root key (and recovery copy) and entries, byte for byte, each a
    // well-formed record.
    if source.root_key().map_err(failed("--from"))? != target.root_key().map_err(failed("--to"))?
        || source.recovery_root().map_err(failed("--from"))?
            != target.recovery_root().map_err(failed("--to"))?
    {
        return Err(CommandError::Store(
            "verification failed: the destination's root key differs from the source's".into(),
        ));
    }
    let mut summary = Vec::new();
    for kind in Kind::ALL {
        let mut want = std::collections::HashMap::new();
        for item in source.raw_entries(kind) {
            let (project, id, bytes) = item.map_err(failed("--from"))?;
            want.insert((project, id), bytes);
        }
        let mut found = 0usize;
        for item in target.raw_entries(kind) {
            let (project, id, bytes) = item.map_err(failed("--to"))?;
            match want.get(&(project, id)) {
                Some(expected) if *expected == bytes && kind.decodes(&bytes) => found += 1,
                _ => {
                    return Err(CommandError::Store(format!(
                        "verification failed: the destination's {} differ from the source's",
                        kind.name()
                    )))
                }
            }
        }
        if found != want.len() {
            return Err(CommandError::Store(format!(
                "verification failed: {found} of {} {} copied",
                want.len(),
                kind.name()
            )));
        }
        summary.push(format!("{found} {}", kind.name()));
    }
    if target.dek_state().map_err(failed("--to"))?
        != source.dek_state().map_err(failed("--from"))?
    {
        return Err(CommandError::Store(
            "verification failed: DEK states differ".into(),
        ));
    }
    source.close().map_err(failed("--from"))?;
    target.close().map_err(failed("--to"))?;
    println!(
        "{} {} ({} engine) to {} ({} engine): {}",
        if already {
            "already copied: verified"
        } else {
            "copied"
        },
        from.display(),
        source.engine(),
        to.display(),
        target.engine(),
        summary.join(", ")
    );
    Ok(())
}

/// The project header for an operator command.
fn project_header(project: &str) -> [(&'static str, &str); 1] {
    [(crate::api::PROJECT_HEADER, project)]
}

fn expect_status(
    reply: crate::client::Reply,
    ok: &[u16],
) -> Result<serde_json::Value, CommandError> {
    if ok.contains(&reply.status) {
        return Ok(reply.body);
    }
    expect_ok(crate::client::Reply {
        status: if reply.status == 200 {
            500
        } else {
            reply.status
        },
        body: reply.body,
    })
}

/// `cardvault keys import-key`: prints the vault's current OpenPGP import key (made first
/// when there is none, or a new one with `rotate`), armored, for the sender; or removes one.
pub fn keys_import_key(
    connect: &Connect,
    project: &str,
    algorithm: &str,
    rotate: bool,
    remove: Option<&str>,
) -> Result<(), CommandError> {
    let (_, client) = connect.open()?;
    if let Some(fingerprint) = remove {
        let reply = client
            .send_with(
                "DELETE",
                &format!("/v1/admin/import-keys/{fingerprint}"),
                &project_header(project),
                None,
            )
            .map_err(keys_error)?;
        expect_status(reply, &[204])?;
        eprintln!(
            "import key {fingerprint} removed: files encrypted to it can no longer be imported"
        );
        return Ok(());
    }
    let body = serde_json::json!({"algorithm": algorithm, "rotate": rotate}).to_string();
    let reply = client
        .send_with(
            "POST",
            "/v1/admin/import-keys",
            &project_header(project),
            Some(body.as_bytes()),
        )
        .map_err(keys_error)?;
    let reply = expect_status(reply, &[200, 201])?;
    let fingerprint = at(&reply, "/key/fingerprint").as_str().unwrap_or_default();
    let made = at(&reply, "/created").as_bool().unwrap_or(false);
    eprintln!(
        "{} import key {fingerprint} ({}); {} key(s) held. Hand the public key below to the sender:",
        if made { "new" } else { "current" },
        at(&reply, "/key/algorithm").as_str().unwrap_or_default(),
        at(&reply, "/keys").as_array().map_or(0, Vec::len)
    );
    print!(
        "{}",
        at(&reply, "/key/public_key").as_str().unwrap_or_default()
    );
    Ok(())
}

/// Counts what passes through, for the progress line.
struct Counting<R> {
    inner: R,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// Writes the results file, and keeps the counts and a progress line on a terminal.
struct Results {
    file: std::io::BufWriter<std::fs::File>,
    pending: Vec<u8>,
    rows: u64,
    failed: u64,
    trailer: Option<String>,
    started: std::time::Instant,
    shown: std::time::Instant,
    terminal: bool,
}

impl Results {
    fn line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if line.starts_with(b"# ") {
            self.trailer = Some(String::from_utf8_lossy(line).trim().to_owned());
            return Ok(());
        }
        if !line.starts_with(b"row,") {
            self.rows += 1;
            let status = line
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if status != b"created" && status != b"duplicate" {
                self.failed += 1;
            }
        }
        self.file.write_all(line)?;
        if self.terminal && self.shown.elapsed() > std::time::Duration::from_millis(250) {
            self.shown = std::time::Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprint!(
                "\rimported {} rows ({:.0} rows/s), {} errors   ",
                self.rows,
                self.rows as f64 / secs,
                self.failed
            );
        }
        Ok(())
    }
}

impl Write for Results {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.line(&line)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// `cardvault import`: streams an encrypted card file to the vault and writes the results.
pub fn import(
    connect: &Connect,
    project: &str,
    file: &Path,
    out: &Path,
    signer: Option<&Path>,
) -> Result<(), CommandError> {
    use std::io::IsTerminal;
    let (_, client) = connect.open()?;
    let fail = |m: String| CommandError::Keys(m);
    let input = std::fs::File::open(file).map_err(|e| fail(format!("{}: {e}", file.display())))?;
    let size = input
        .metadata()
        .map_err(|e| fail(format!("{}: {e}", file.display())))?
        .len();
    let signer_key = match signer {
        Some(path) => std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?,
        None => Vec::new(),
    };
    let partial = out.with_extension("partial");
    let results_file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| fail(format!("{}: {e}", partial.display())))?;
    let terminal = std::io::stderr().is_terminal();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut body = std::io::Read::chain(
        &signer_key[..],
        Counting {
            inner: std::io::BufReader::with_capacity(256 * 1024, input),
            read: std::sync::Arc::clone(&sent),
        },
    );
    let mut results = Results {
        file: std::io::BufWriter::new(results_file),
        pending: Vec::new(),
        rows: 0,
        failed: 0,
        trailer: None,
        started: std::time::Instant::now(),
        shown: std::time::Instant::now(),
        terminal,
    };
    let length = signer_key.len().to_string();
    let mut headers = vec![
        (crate::api::PROJECT_HEADER, project),
        ("content-type", "application/octet-stream"),
    ];
    if !signer_key.is_empty() {
        headers.push((crate::api::SIGNER_LENGTH_HEADER, length.as_str()));
    }
    if terminal {
        eprint!("uploading {size} bytes and checking the file...");
    }
    let reply = client
        .stream(
            "POST",
            "/v1/import",
            &headers,
            &mut body,
            signer_key.len() as u64 + size,
            &mut results,
        )
        .map_err(fail);
    if terminal {
        eprintln!();
    }
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    if let Some(reply) = reply {
        let _ = std::fs::remove_file(&partial);
        expect_ok(reply)?;
        return Err(fail("the vault sent no results".into()));
    }
    results
        .flush()
        .map_err(|e| fail(format!("{}: {e}", partial.display())))?;
    match results.trailer.as_deref() {
        Some(t) if t.starts_with("# complete") => {
            std::fs::rename(&partial, out)
                .map_err(|e| fail(format!("{}: {e}", out.display())))?;
            eprintln!(
                "{}; results in {}",
                t.trim_start_matches("# "),
                out.display()
            );
            Ok(())
        }
        other => Err(fail(format!(
            "the import stopped ({}); rows done so far are in {} and a second run of the same file resumes safely (it creates nothing twice)",
            other.unwrap_or("the connection was cut").trim_start_matches("# "),
            partial.display()
        ))),
    }
}

/// `cardvault export request`: records a request; prints its id for the approver.
pub fn export_request(
    connect: &Connect,
    project: &str,
    recipient: &Path,
    customers: Option<&Path>,
) -> Result<(), CommandError> {
    let (_, client) = connect.open()?;
    let fail = |m: String| CommandError::Keys(m);
    let key = std::fs::read_to_string(recipient)
        .map_err(|e| fail(format!("{}: {e}", recipient.display())))?;
    let list = match customers {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| fail(format!("{}: {e}", path.display())))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let body = serde_json::json!({"recipient": key, "customers": list}).to_string();
    let reply = client
        .send_with(
            "POST",
            "/v1/exports",
            &project_header(project),
            Some(body.as_bytes()),
        )
        .map_err(keys_error)?;
    let reply = expect_status(reply, &[201])?;
    let id = at(&reply, "/id").as_str().unwrap_or_default();
    eprintln!(
        "export requested for recipient key {}; another identity with `export` must approve it within 24 h: cardvault export approve {id} ...",
        at(&reply, "/recipient_fingerprint").as_str().unwrap_or_default()
    );
    println!("{id}");
    Ok(())
}

/// `cardvault export approve`.
pub fn export_approve(connect: &Connect, project: &str, id: &str) -> Result<(), CommandError> {
    let (_, client) = connect.open()?;
    let reply = client
        .send_with(
            "POST",
            &format!("/v1/exports/{id}/approve"),
            &project_header(project),
            Some(b"{}"),
        )
        .map_err(keys_error)?;
    expect_ok(reply)?;
    eprintln!("export {id} approved; it can be fetched until 24 h after it was requested");
    Ok(())
}

/// `cardvault export fetch`: the encrypted file, written to `out` once whole.
pub fn export_fetch(
    connect: &Connect,
    project: &str,
    id: &str,
    out: &Path,
) -> Result<(), CommandError> {
    let (_, client) = connect.open()?;
    let fail = |m: String| CommandError::Keys(m);
    let partial = out.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| fail(format!("{}: {e}", partial.display())))?;
    let reply = client.stream(
        "POST",
        &format!("/v1/exports/{id}/file"),
        &project_header(project),
        &mut std::io::empty(),
        0,
        &mut file,
    );
    match reply {
        Ok(None) => {
            file.sync_all()
                .map_err(|e| fail(format!("{}: {e}", partial.display())))?;
            std::fs::rename(&partial, out).map_err(|e| fail(format!("{}: {e}", out.display())))?;
            eprintln!(
                "export {id} written to {} (encrypted to its recipient only)",
                out.display()
            );
            Ok(())
        }
        Ok(Some(reply)) => {
            let _ = std::fs::remove_file(&partial);
            expect_ok(reply).map(|_| ())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(fail(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run as root (as CI is), writing into a folder another user owns is refused with the
    /// fix; into root's own folder it goes ahead. Elsewhere it says so and checks nothing.
    #[test]
    fn root_is_refused_in_a_folder_another_user_owns() {
        if !crate::hardening::is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("cardvault-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        refuse_root_in_others_folder(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let refused = refuse_root_in_others_folder(&dir).unwrap_err().to_string();
        assert!(refused.contains("run this as that user"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
