//! The daemon's configuration: TOML, parsed once at startup, refused if unsafe.
//!
//! Relative paths are taken relative to the config file's folder, so a config and the files it
//! names can move together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where the records live: sled in `data_dir` (the default), or PostgreSQL.
    pub store: crate::store::StoreConfig,
    pub keys_dir: PathBuf,
    pub policies: PathBuf,
    /// The PSPs forwards may go to (a file, or a folder of `*.toml`); none when unset.
    pub receivers: Option<PathBuf>,
    /// Where an import's encrypted upload is kept while it is checked and read (ciphertext
    /// only, mode 0600, removed when the import ends); default: the system's temp folder.
    pub spool_dir: PathBuf,
    pub tls: TlsFiles,
    pub card_token_ttl: Duration,
    pub cvc_ttl: Duration,
    /// sled: the most CVCs held in memory at once, waiting for their first use.
    pub cvc_max: usize,
    /// HTTP worker threads; default: one per core.
    pub workers: Option<usize>,
    pub log: LogConfig,
    /// Allows the single-file dev KEK (`cardvault dev`, tests). Never in production.
    pub insecure_dev_key: bool,
    pub keys: crate::vault::KeySettings,
    /// `[kek]`: which backend holds the KEK (custodian shares, or a PKCS#11 device).
    pub kek: crate::crypto::seal::Backend,
    /// The chained audit log; never inside `data_dir` or `keys_dir`.
    pub audit_path: PathBuf,
    /// The audit log is rotated past this size (`[audit] rotate_mb`; 0: never).
    pub audit_rotate_bytes: u64,
    /// Rotated parts are compressed into `PART.gz` (`[audit] compress`, default true).
    pub audit_compress: bool,
    /// The file this was loaded from, read again on `SIGHUP` for the TLS files and policies.
    pub source: Option<PathBuf>,
    /// This daemon's name among the nodes of one store (`[node] name`; default: the host
    /// name). It names the node in every audit line and in the store's `nodes` table.
    pub node: String,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// PEM file of CRLs from the client CA; checked on every handshake.
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    pub fn paths(&self) -> crate::tls::TlsPaths<'_> {
        crate::tls::TlsPaths {
            cert: &self.cert,
            key: &self.key,
            client_ca: &self.client_ca,
            crl: self.crl.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    /// sled's folder; not used with `[store] engine = "postgres"`.
    data_dir: Option<PathBuf>,
    keys_dir: PathBuf,
    policies: PathBuf,
    receivers: Option<PathBuf>,
    spool_dir: Option<PathBuf>,
    tls: RawTls,
    card_token_ttl: Option<String>,
    cvc_ttl: Option<String>,
    cvc_max: Option<usize>,
    workers: Option<usize>,
    /// The old place of `[store] cache_mb`, still read.
    cache_mb: Option<u64>,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    insecure_dev_key: bool,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    kek: RawKek,
    audit: RawAudit,
    #[serde(default)]
    node: RawNode,
}

/// `[node]`: this daemon among several over one PostgreSQL store.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<String>,
}

/// `[store]`: which engine keeps the records, and its settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    /// `"sled"`, the embedded engine (the default), or `"postgres"`.
    engine: Option<String>,
    /// sled's page cache, in MiB (default 64).
    cache_mb: Option<u64>,
    postgres: Option<RawPostgres>,
}

/// `[store.postgres]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: String,
    password_file: Option<PathBuf>,
    pool_size: Option<usize>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    statement_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: PathBuf,
    rotate_mb: Option<u64>,
    compress: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    dek_max_encryptions: Option<u64>,
    dek_max_age: Option<String>,
    reencrypt_batch: Option<usize>,
    reencrypt_pause: Option<String>,
}

/// `[kek]` and `[kek.pkcs11]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKek {
    backend: Option<String>,
    pkcs11: Option<RawPkcs11>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPkcs11 {
    module: PathBuf,
    token_label: String,
    key_label: String,
    pin_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    crl: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // The config holds no secret, but it names the keys, policies and CA: a config others
        // can change could point the daemon at theirs.
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o002 != 0 {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    message: format!(
                        "writable by others (mode {:o}); run chmod o-w on it",
                        mode & 0o777
                    ),
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Config::parse(&text, base).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let listen = raw
            .listen
            .parse()
            .map_err(|_| format!("listen: {:?} is not an address:port", raw.listen))?;
        let duration = |name: &str, value: Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(v) => parse_duration(&v)
                .ok_or_else(|| format!("{name}: {v:?} is not a duration like 90s, 15m, 24h or 7d")),
        };
        let card_token_ttl = duration(
            "card_token_ttl",
            raw.card_token_ttl,
            Duration::from_secs(24 * 3600),
        )?;
        let cvc_ttl = duration("cvc_ttl", raw.cvc_ttl, Duration::from_secs(3600))?;
        if card_token_ttl.is_zero() || cvc_ttl.is_zero() {
            return Err("card_token_ttl and cvc_ttl must be positive".into());
        }
        // A card token is for one checkout, and a CVC must not outlive the authorization it
        // was collected for.
        if card_token_ttl > Duration::from_secs(30 * 86_400) {
            return Err("card_token_ttl must be at most 30d".into());
        }
        if cvc_ttl > Duration::from_secs(86_400) {
            return Err("cvc_ttl must be at most 24h".into());
        }
        let cvc_max = raw.cvc_max.unwrap_or(DEFAULT_CVC_MAX);
        if cvc_max == 0 || cvc_max > 100_000_000 {
            return Err("cvc_max must be between 1 and 100000000".into());
        }
        let defaults = crate::vault::KeySettings::default();
        let keys = crate::vault::KeySettings {
            dek_max_encryptions: raw
                .keys
                .dek_max_encryptions
                .unwrap_or(defaults.dek_max_encryptions),
            dek_max_age: duration(
                "keys.dek_max_age",
                raw.keys.dek_max_age,
                defaults.dek_max_age,
            )?,
            reencrypt_batch: raw.keys.reencrypt_batch.unwrap_or(defaults.reencrypt_batch),
            reencrypt_pause: duration(
                "keys.reencrypt_pause",
                raw.keys.reencrypt_pause,
                defaults.reencrypt_pause,
            )?,
        };
        // Random 96-bit nonces: past 2^32 seals under one key, a nonce collision is no longer
        // negligible. Rotation must come well before.
        if keys.dek_max_encryptions == 0
            || keys.dek_max_encryptions > crate::vault::GCM_NONCE_LIMIT / 2
        {
            return Err("keys.dek_max_encryptions must be between 1 and 2^31".into());
        }
        if keys.dek_max_age.is_zero() || keys.dek_max_age > Duration::from_secs(365 * 86_400) {
            return Err("keys.dek_max_age must be positive and at most 365d".into());
        }
        if keys.reencrypt_batch == 0 {
            return Err("keys.reencrypt_batch must be at least 1".into());
        }
        if raw.workers == Some(0) {
            return Err("workers must be at least 1".into());
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let cache_mb = match (raw.store.cache_mb, raw.cache_mb) {
            (Some(_), Some(_)) => {
                return Err(
                    "cache_mb is set twice: keep [store] cache_mb and remove the top-level one"
                        .into(),
                )
            }
            (store, top) => store.or(top),
        };
        let store = match raw.store.engine.as_deref().unwrap_or("sled") {
            "sled" => {
                if raw.store.postgres.is_some() {
                    return Err(
                        "[store.postgres] is set but [store] engine is \"sled\": set engine = \"postgres\" or remove it"
                            .into(),
                    );
                }
                let dir = raw
                    .data_dir
                    .ok_or("data_dir is required with the sled engine (the default)")?;
                crate::store::StoreConfig::Sled {
                    dir: resolve(dir),
                    cache_bytes: cache_mb.unwrap_or(64).saturating_mul(1024 * 1024),
                }
            }
            "postgres" => {
                let pg = raw.store.postgres.ok_or(
                    "[store] engine = \"postgres\" needs a [store.postgres] section with url",
                )?;
                if cache_mb.is_some() {
                    return Err("cache_mb is for the sled engine: remove it with postgres".into());
                }
                let settings = crate::store::PgSettings {
                    url: pg.url,
                    password_file: pg.password_file.map(&resolve),
                    pool_size: pg.pool_size.unwrap_or(32),
                    ca: pg.ca.map(&resolve),
                    cert: pg.cert.map(&resolve),
                    key: pg.key.map(&resolve),
                    statement_timeout: duration(
                        "[store.postgres] statement_timeout",
                        pg.statement_timeout,
                        Duration::from_secs(5),
                    )?,
                };
                settings.validate()?;
                crate::store::StoreConfig::Postgres(settings)
            }
            other => {
                return Err(format!(
                "[store] engine {other:?} is not known: use \"sled\" (the default) or \"postgres\""
            ))
            }
        };
        let kek = kek_backend(raw.kek, &resolve)?;
        let config = Config {
            listen,
            store,
            keys_dir: resolve(raw.keys_dir),
            policies: resolve(raw.policies),
            receivers: raw.receivers.map(&resolve),
            spool_dir: raw.spool_dir.map_or_else(std::env::temp_dir, &resolve),
            tls: TlsFiles {
                cert: resolve(raw.tls.cert),
                key: resolve(raw.tls.key),
                client_ca: resolve(raw.tls.client_ca),
                crl: raw.tls.crl.map(resolve),
            },
            card_token_ttl,
            cvc_ttl,
            cvc_max,
            workers: raw.workers,
            log: raw.log,
            insecure_dev_key: raw.insecure_dev_key,
            keys,
            kek,
            audit_path: resolve(raw.audit.path),
            audit_rotate_bytes: raw
                .audit
                .rotate_mb
                .unwrap_or(DEFAULT_AUDIT_ROTATE_MB)
                .saturating_mul(1 << 20),
            audit_compress: raw.audit.compress.unwrap_or(true),
            source: None,
            node: node_name(raw.node.name)?,
        };
        config.check_layout()?;
        Ok(config)
    }

    /// Keys never sit beside the data: refuse a `keys_dir` inside `data_dir` or the reverse
    /// (compared after resolving `..` and symlinks as far as the paths exist).
    fn check_layout(&self) -> Result<(), String> {
        let keys = normalize(&self.keys_dir);
        let audit = normalize(&self.audit_path);
        if audit.starts_with(&keys) {
            return Err(format!(
                "audit.path ({}) must be outside data_dir and keys_dir",
                self.audit_path.display()
            ));
        }
        let Some(data_dir) = self.data_dir() else {
            return Ok(());
        };
        let data = normalize(data_dir);
        if keys.starts_with(&data) || data.starts_with(&keys) {
            return Err(format!(
                "keys_dir ({}) must not be inside data_dir ({}) or contain it: keys never sit beside the data",
                self.keys_dir.display(),
                data_dir.display()
            ));
        }
        // The audit trail must survive a wiped or restored store, and must not sit with keys.
        if audit.starts_with(&data) {
            return Err(format!(
                "audit.path ({}) must be outside data_dir and keys_dir",
                self.audit_path.display()
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The sled folder, when the store is sled.
    pub fn data_dir(&self) -> Option<&Path> {
        match &self.store {
            crate::store::StoreConfig::Sled { dir, .. } => Some(dir),
            crate::store::StoreConfig::Postgres(_) => None,
        }
    }
}

/// Resolves `.` and `..` lexically, then canonicalizes the longest existing ancestor (to follow
/// symlinks) and appends the rest, so that paths that do not exist yet still compare correctly.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut clean = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    let mut existing = clean.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return rest
                .iter()
                .rev()
                .fold(canonical, |acc: PathBuf, part| acc.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => return clean,
        }
    }
}

/// `[node] name`, or this host's name; 1 to 63 letters, digits, `.`, `_` or `-`.
/// CVCs held in memory at once by default (sled): a table of about 54 MiB.
pub const DEFAULT_CVC_MAX: usize = 1_000_000;

/// `[audit] rotate_mb` when unset: parts of 256 MiB (about 550,000 lines).
pub const DEFAULT_AUDIT_ROTATE_MB: u64 = 256;

/// `[kek]`: `backend = "shamir"` (the default) or `"pkcs11"` with its `[kek.pkcs11]`.
fn kek_backend(
    raw: RawKek,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<crate::crypto::seal::Backend, String> {
    use crate::crypto::seal::{Backend, Pkcs11Settings};
    let settings = match raw.pkcs11 {
        None => None,
        Some(p) => {
            for (name, label) in [("token_label", &p.token_label), ("key_label", &p.key_label)] {
                // PKCS#11 labels are 32 bytes, blank-padded.
                if label.is_empty() || label.len() > 32 || label.ends_with(' ') {
                    return Err(format!(
                        "[kek.pkcs11] {name}: 1 to 32 bytes, not ending in a space"
                    ));
                }
            }
            Some(Pkcs11Settings {
                module: resolve(p.module),
                token_label: p.token_label,
                key_label: p.key_label,
                pin_file: resolve(p.pin_file),
            })
        }
    };
    match (raw.backend.as_deref().unwrap_or("shamir"), settings) {
        ("shamir", _) => Ok(Backend::Shamir),
        ("pkcs11", Some(settings)) => Ok(Backend::Pkcs11(settings)),
        ("pkcs11", None) => Err(
            "[kek] backend = \"pkcs11\" needs a [kek.pkcs11] section (module, token_label, \
             key_label, pin_file)"
                .into(),
        ),
        (other, _) => Err(format!(
            "[kek] backend {other:?} is not known: use \"shamir\" (the default) or \"pkcs11\""
        )),
    }
}

fn node_name(configured: Option<String>) -> Result<String, String> {
    let (name, from) = match configured {
        Some(name) => (name, "[node] name"),
        None => (
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            "the host name (set [node] name)",
        ),
    };
    let valid = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{from} must be 1 to 63 letters, digits, '.', '_' or '-'"
        ))
    }
}

/// `250ms`, `90s`, `15m`, `24h`, `7d`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    if unit == "ms" {
        return Some(Duration::from_millis(n));
    }
    let seconds = match unit {
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        listen = "127.0.0.1:8443"
        data_dir = "data"
        keys_dir = "keys"
        policies = "policies"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
        [audit]
        path = "audit/audit.log"
    "#;

    /// The PostgreSQL engine: no data_dir needed; plaintext only to loopback or a socket; no
    /// password in the URL; sled-only settings refused beside it.
    #[test]
    fn postgres_settings_are_checked() {
        let pg = |url: &str, more: &str| {
            let text = MINIMAL.replace("data_dir = \"data\"\n", "")
                + &format!(
                    "[store]\nengine = \"postgres\"\n[store.postgres]\nurl = \"{url}\"\n{more}"
                );
            Config::parse(&text, Path::new("/tmp"))
        };
        let c = pg("postgresql://cardvault@127.0.0.1:5432/cardvault", "").unwrap();
        assert_eq!(c.data_dir(), None);
        let crate::store::StoreConfig::Postgres(settings) = &c.store else {
            panic!("not postgres");
        };
        assert_eq!(settings.statement_timeout, Duration::from_secs(5));
        assert_eq!(settings.pool_size, 32);
        assert!(pg("host=/run/postgresql dbname=cardvault", "").is_ok());
        assert!(pg(
            "postgresql://cardvault@localhost/cardvault",
            "statement_timeout = \"2s\""
        )
        .is_ok());
        let remote = pg("postgresql://cardvault@db1:5432,db2:5432/cardvault", "").unwrap_err();
        assert!(remote.contains("db1") && remote.contains("ca"), "{remote}");
        assert!(pg(
            "postgresql://cardvault@db1:5432,db2:5432/cardvault?target_session_attrs=read-write",
            "ca = \"db-ca.pem\""
        )
        .is_ok());
        let password = pg("postgresql://cardvault:hunter2@127.0.0.1/cardvault", "").unwrap_err();
        assert!(
            password.contains("password_file") && !password.contains("hunter2"),
            "{password}"
        );
        assert!(pg(
            "postgresql://cardvault@127.0.0.1/cardvault",
            "cert = \"c.pem\"\nkey = \"k.pem\""
        )
        .unwrap_err()
        .contains("need ca"));
        assert!(pg("not a url ://", "").is_err());
        let cache = MINIMAL.to_owned()
            + "[store]\nengine = \"postgres\"\ncache_mb = 8\n[store.postgres]\nurl = \"host=/tmp\"\n";
        assert!(Config::parse(&cache, Path::new("/tmp"))
            .unwrap_err()
            .contains("cache_mb"));
        let stray = MINIMAL.to_owned() + "[store.postgres]\nurl = \"host=/tmp\"\n";
        assert!(Config::parse(&stray, Path::new("/tmp"))
            .unwrap_err()
            .contains("engine"));
        let no_dir = MINIMAL.replace("data_dir = \"data\"\n", "");
        assert!(Config::parse(&no_dir, Path::new("/tmp"))
            .unwrap_err()
            .contains("data_dir"));
    }

    /// The store cache is set under `[store]` (as documented), or at the top level where older
    /// configs have it.
    #[test]
    fn store_cache_is_read_from_store_or_the_top_level() {
        let mib = |text: &str| match Config::parse(text, Path::new("/tmp")).unwrap().store {
            crate::store::StoreConfig::Sled { cache_bytes, .. } => cache_bytes >> 20,
            crate::store::StoreConfig::Postgres(_) => 0,
        };
        assert_eq!(mib(MINIMAL), 64);
        assert_eq!(
            mib(&format!(
                "{MINIMAL}\n[store]\nengine = \"sled\"\ncache_mb = 16"
            )),
            16
        );
        assert_eq!(mib(&MINIMAL.replace("listen", "cache_mb = 32\nlisten")), 32);
    }

    /// `[audit] rotate_mb`: 256 MiB unless set, 0 for never, and a huge value saturates
    /// instead of wrapping to a small size.
    #[test]
    fn audit_rotation_size() {
        let bytes = |extra: &str| {
            Config::parse(
                &MINIMAL.replace("[audit]\n", &format!("[audit]\n{extra}")),
                Path::new("/tmp"),
            )
            .unwrap()
            .audit_rotate_bytes
        };
        assert_eq!(bytes(""), 256 << 20);
        assert_eq!(bytes("rotate_mb = 0\n"), 0);
        assert_eq!(bytes("rotate_mb = 1\n"), 1 << 20);
        assert_eq!(bytes("rotate_mb = 9223372036854775807\n"), u64::MAX);
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("90s", Some(90)),
            ("15m", Some(900)),
            ("24h", Some(86_400)),
            ("7d", Some(604_800)),
            ("30", Some(30)),
            ("1w", None),
            ("", None),
            ("h", None),
            ("20ms", Some(0)),
        ] {
            assert_eq!(parse_duration(text).map(|d| d.as_secs()), secs, "{text}");
        }
    }

    #[test]
    fn resolves_relative_paths_and_defaults() {
        let c = Config::parse(MINIMAL, Path::new("/etc/cardvault")).unwrap();
        assert_eq!(c.data_dir(), Some(Path::new("/etc/cardvault/data")));
        assert_eq!(c.tls.client_ca, Path::new("/etc/cardvault/ca.pem"));
        assert_eq!(c.card_token_ttl, Duration::from_secs(86_400));
        assert_eq!(c.cvc_ttl, Duration::from_secs(3600));
        assert_eq!(c.cvc_max, DEFAULT_CVC_MAX);
    }

    #[test]
    fn kek_backend_is_read_and_checked() {
        use crate::crypto::seal::Backend;
        let c = Config::parse(MINIMAL, Path::new("/etc/cardvault")).unwrap();
        assert_eq!(c.kek, Backend::Shamir);
        let hsm = format!(
            "{MINIMAL}\n[kek]\nbackend = \"pkcs11\"\n[kek.pkcs11]\nmodule = \"/usr/lib/m.so\"\n\
             token_label = \"cardvault\"\nkey_label = \"cardvault-kek\"\npin_file = \"hsm.pin\"\n"
        );
        let Backend::Pkcs11(p) = Config::parse(&hsm, Path::new("/etc/cardvault"))
            .unwrap()
            .kek
        else {
            panic!("not pkcs11");
        };
        assert_eq!(p.pin_file, Path::new("/etc/cardvault/hsm.pin"));
        assert_eq!(p.key_label, "cardvault-kek");
        let no_section = format!("{MINIMAL}\n[kek]\nbackend = \"pkcs11\"\n");
        assert!(Config::parse(&no_section, Path::new("/x"))
            .unwrap_err()
            .contains("[kek.pkcs11]"));
        let unknown = format!("{MINIMAL}\n[kek]\nbackend = \"kms\"\n");
        assert!(Config::parse(&unknown, Path::new("/x"))
            .unwrap_err()
            .contains("not known"));
        let long = hsm.replace("\"cardvault-kek\"", &format!("\"{}\"", "k".repeat(33)));
        assert!(Config::parse(&long, Path::new("/x"))
            .unwrap_err()
            .contains("key_label"));
    }

    #[test]
    fn refuses_unsafe_or_unknown() {
        let nested = MINIMAL.replace("keys_dir = \"keys\"", "keys_dir = \"data/keys\"");
        assert!(Config::parse(&nested, Path::new("/tmp/x"))
            .unwrap_err()
            .contains("keys_dir"));
        let dotted = MINIMAL.replace("keys_dir = \"keys\"", "keys_dir = \"other/../data/k\"");
        assert!(Config::parse(&dotted, Path::new("/tmp")).is_err());
        let audit_in_data = MINIMAL.replace("audit/audit.log", "data/audit.log");
        assert!(Config::parse(&audit_in_data, Path::new("/tmp/x"))
            .unwrap_err()
            .contains("audit.path"));
        let unknown = format!("{MINIMAL}\n[extra]\nx = 1");
        assert!(Config::parse(&unknown, Path::new("/tmp")).is_err());
        let engine = format!("{MINIMAL}\n[store]\nengine = \"mysql\"");
        assert!(Config::parse(&engine, Path::new("/tmp"))
            .unwrap_err()
            .contains("engine"));
        let twice = MINIMAL.replace("listen", "cache_mb = 8\nlisten") + "\n[store]\ncache_mb = 8";
        assert!(Config::parse(&twice, Path::new("/tmp"))
            .unwrap_err()
            .contains("twice"));
        for ttl in [
            "card_token_ttl = \"soon\"",
            "card_token_ttl = \"31d\"",
            "cvc_ttl = \"2d\"",
            "cvc_ttl = \"0s\"",
        ] {
            let bad = MINIMAL.replace("listen", &format!("{ttl}\nlisten"));
            assert!(Config::parse(&bad, Path::new("/tmp")).is_err(), "{ttl}");
        }
    }
}
