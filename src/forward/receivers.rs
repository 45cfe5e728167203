//! Receivers: the PSP endpoints an operator registers in the file (or folder of files) that
//! `receivers` in the config names. Loaded at start and again on `SIGHUP`, swapped whole;
//! never created through the API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::tokens::Project;

/// Longest total time a receiver may be given.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Methods a receiver may allow.
pub const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Request headers nobody sets through a forward: the vault writes the message framing and
/// the connection's own headers itself.
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
];

#[derive(Debug, thiserror::Error)]
#[error("receivers {path}: {message}")]
pub struct ReceiversError {
    pub path: PathBuf,
    pub message: String,
}

/// Every receiver, by name.
#[derive(Default)]
pub struct Receivers {
    by_name: HashMap<String, Arc<Receiver>>,
}

/// One PSP endpoint.
pub struct Receiver {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The URL's path, without a trailing `/` (usually empty).
    pub base_path: String,
    paths: Vec<String>,
    methods: Vec<String>,
    /// `None`: every project.
    projects: Option<HashSet<Project>>,
    pub tls: Arc<rustls::ClientConfig>,
    /// Headers the vault adds, replacing any the caller sent under the same name. Values
    /// read from a file are credentials: never logged, and redacted from the answer.
    pub headers: Vec<ConfiguredHeader>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub allow_private_network: bool,
    /// JSON field names whose values the answer keeps unmasked unless they hold the card
    /// sent (a PSP's 16-digit payment reference, say).
    pub unmasked_fields: HashSet<String>,
    /// Idle connections, reused by later forwards.
    pub pool: super::Pool,
}

pub struct ConfiguredHeader {
    /// Lower case.
    pub name: String,
    pub value: Zeroizing<String>,
    pub secret: bool,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Why a receiver refuses a request (403, each with its code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAllowed {
    Project,
    Method,
    Path,
}

impl Receivers {
    pub fn none() -> Receivers {
        Receivers::default()
    }

    /// Loads the file, or every `*.toml` file in the folder (in name order). Refused whole on
    /// any problem.
    pub fn load(path: &Path) -> Result<Receivers, ReceiversError> {
        let err = |message: String| ReceiversError {
            path: path.to_owned(),
            message,
        };
        refuse_writable_by_others(path).map_err(&err)?;
        let files = if path.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(path).map_err(|e| err(e.to_string()))? {
                let file = entry.map_err(|e| err(e.to_string()))?.path();
                if file.extension().is_some_and(|x| x == "toml") && file.is_file() {
                    files.push(file);
                }
            }
            files.sort();
            files
        } else {
            vec![path.to_owned()]
        };
        let mut receivers = Receivers::default();
        for file in files {
            let err = |message: String| ReceiversError {
                path: file.clone(),
                message,
            };
            refuse_writable_by_others(&file).map_err(&err)?;
            let text = std::fs::read_to_string(&file).map_err(|e| err(e.to_string()))?;
            let raw: RawFile = toml::from_str(&text).map_err(|e| err(e.message().to_owned()))?;
            let base = file.parent().unwrap_or(Path::new("."));
            for entry in raw.receiver {
                let receiver = Receiver::from_raw(entry, base).map_err(&err)?;
                if receivers.by_name.contains_key(&receiver.name) {
                    return Err(err(format!(
                        "receiver {:?} is defined twice",
                        receiver.name
                    )));
                }
                receivers
                    .by_name
                    .insert(receiver.name.clone(), Arc::new(receiver));
            }
        }
        Ok(receivers)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Receiver>> {
        self.by_name.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl Receiver {
    /// Whether this receiver takes `method` on `path` (a checked forward path, query
    /// included) for `project`.
    pub fn allows(&self, project: &Project, method: &str, path: &str) -> Result<(), NotAllowed> {
        if self.projects.as_ref().is_some_and(|p| !p.contains(project)) {
            return Err(NotAllowed::Project);
        }
        if !self.methods.iter().any(|m| m == method) {
            return Err(NotAllowed::Method);
        }
        let bare = path.split_once('?').map_or(path, |(p, _)| p);
        let under = |prefix: &String| {
            bare == prefix.as_str()
                || bare
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| prefix.ends_with('/') || rest.starts_with('/'))
        };
        if !self.paths.iter().any(under) {
            return Err(NotAllowed::Path);
        }
        Ok(())
    }

    /// The `host` header's value.
    pub fn authority(&self) -> String {
        if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn from_raw(raw: RawReceiver, base: &Path) -> Result<Receiver, String> {
        let name = raw.name;
        if !valid_name(&name) {
            return Err(format!(
                "receiver name {name:?}: use 1-64 characters of a-z, 0-9, '_' and '-'"
            ));
        }
        let at = |what: &str| format!("receiver {name:?}: {what}");
        let (host, port, base_path) = parse_url(&raw.url).map_err(|e| at(&e))?;
        if raw.paths.is_empty() {
            return Err(at("paths lists no path prefix"));
        }
        for p in &raw.paths {
            if crate::forward::check_path(p).is_err() || p.contains('?') {
                return Err(at(&format!(
                    "path prefix {p:?} must start with '/' and hold no query, '..' or encoded \
                     separators"
                )));
            }
        }
        let methods: Vec<String> = raw.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        if methods.is_empty() {
            return Err(at("methods lists no method"));
        }
        if let Some(m) = methods.iter().find(|m| !METHODS.contains(&m.as_str())) {
            return Err(at(&format!(
                "method {m:?} is not one of {}",
                METHODS.join(", ")
            )));
        }
        if raw.projects.is_empty() {
            return Err(at("projects lists no project (use [\"*\"] for all)"));
        }
        let projects = Project::parse_list(&raw.projects).map_err(|e| at(&e))?;
        let resolve = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        let tls = client_tls(
            raw.ca.as_ref().map(resolve).as_deref(),
            raw.cert.as_ref().map(resolve).as_deref(),
            raw.key.as_ref().map(resolve).as_deref(),
        )
        .map_err(|e| at(&e))?;
        let mut headers = Vec::new();
        for (header, value) in raw.headers {
            let lower = header.to_ascii_lowercase();
            if http::HeaderName::from_bytes(lower.as_bytes()).is_err()
                || RESERVED_HEADERS.contains(&lower.as_str())
            {
                return Err(at(&format!(
                    "header {header:?} is not a header name the vault lets a receiver set"
                )));
            }
            let (value, secret) = match value {
                RawHeader::Plain(v) => (Zeroizing::new(v), false),
                RawHeader::File(FileRef { file }) => (read_secret(&resolve(&file))?, true),
            };
            if http::HeaderValue::from_str(&value).is_err() || value.is_empty() {
                return Err(at(&format!("header {header:?} has an invalid value")));
            }
            headers.push(ConfiguredHeader {
                name: lower,
                value,
                secret,
            });
        }
        let duration = |field: &str, value: Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(v) => crate::config::parse_duration(&v)
                .filter(|d| !d.is_zero() && *d <= MAX_TIMEOUT)
                .ok_or_else(|| at(&format!("{field} {v:?}: give a duration from 1s to 120s"))),
        };
        let timeout = duration("timeout", raw.timeout, DEFAULT_TIMEOUT)?;
        let connect_timeout = duration(
            "connect_timeout",
            raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT.min(timeout),
        )?;
        if connect_timeout > timeout {
            return Err(at("connect_timeout must not be longer than timeout"));
        }
        Ok(Receiver {
            name,
            host,
            port,
            base_path,
            paths: raw.paths,
            methods,
            projects,
            tls,
            headers,
            timeout,
            connect_timeout,
            allow_private_network: raw.allow_private_network,
            unmasked_fields: raw.unmasked_fields.into_iter().collect(),
            pool: super::Pool::default(),
        })
    }
}

/// Receiver names: what a forward request names, and what the audit trail records.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !crate::card::contains_pan(name)
}

/// `https://host[:port][/base]`: host, port, base path. A host name only: an IP literal (in
/// any spelling a resolver accepts) is refused, and so are user info, query and fragment.
pub fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("url {url:?} must start with https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains(['@', '[', ']', '?', '#']) || path.contains(['?', '#']) {
        return Err(format!(
            "url {url:?}: give https://host[:port][/path], without user info, IP literal, query or fragment"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("url {url:?}: invalid port"))?,
        ),
        None => (authority, 443),
    };
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    // The last label starting with a letter rules out 127.0.0.1, 2130706433 and 0x7f000001.
    let named = labels
        .last()
        .is_some_and(|l| l.bytes().next().is_some_and(|b| b.is_ascii_lowercase()));
    if host.len() > 253 || !labels.iter().all(label_ok) || !named {
        return Err(format!(
            "url {url:?}: the host must be a DNS name, never an IP address"
        ));
    }
    let base = path.trim_end_matches('/');
    if !base.is_empty() && crate::forward::check_path(base).is_err() {
        return Err(format!("url {url:?}: invalid path"));
    }
    Ok((host, port, base.to_owned()))
}

/// TLS toward a PSP: TLS 1.2 or 1.3 with the vault's suites, the receiver's CA or the public
/// web roots, and a client certificate when the PSP asks for mTLS.
fn client_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for c in crate::tls::load_certs(ca).map_err(|e| format!("ca: {e}"))? {
                roots
                    .add(c)
                    .map_err(|e| format!("ca {}: {e}", ca.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match (cert, key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            refuse_readable_by_others(key)?;
            let chain = crate::tls::load_certs(cert).map_err(|e| format!("cert: {e}"))?;
            let key = crate::tls::load_key(key).map_err(|e| format!("key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert and key: {e}"))?
        }
        _ => return Err("cert and key go together".into()),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A credential file: only its owner may read it; one trailing line break is dropped.
fn read_secret(path: &Path) -> Result<Zeroizing<String>, String> {
    refuse_readable_by_others(path)?;
    let mut text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    while text.ends_with('\n') || text.ends_with('\r') {
        text.pop();
    }
    Ok(text)
}

fn refuse_readable_by_others(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is open to others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

/// Anyone who can change the receivers file can send cards to a host of their choosing.
fn refuse_writable_by_others(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    if mode & 0o002 != 0 {
        return Err(format!(
            "writable by others (mode {:o}): anyone on the host could send cards where they \
             like; run chmod o-w on it",
            mode & 0o777
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    receiver: Vec<RawReceiver>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReceiver {
    name: String,
    url: String,
    paths: Vec<String>,
    methods: Vec<String>,
    projects: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    headers: BTreeMap<String, RawHeader>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    #[serde(default)]
    allow_private_network: bool,
    #[serde(default)]
    unmasked_fields: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawHeader {
    Plain(String),
    File(FileRef),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRef {
    file: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_host_never_an_address() {
        assert_eq!(
            parse_url("https://api.acme-psp.example").unwrap(),
            ("api.acme-psp.example".into(), 443, String::new())
        );
        assert_eq!(
            parse_url("https://Psp.Example:8443/base/").unwrap(),
            ("psp.example".into(), 8443, "/base".into())
        );
        assert_eq!(
            parse_url("https://localhost:9").unwrap().0,
            "localhost".to_owned()
        );
        for bad in [
            "http://psp.example",
            "https://127.0.0.1",
            "https://2130706433",
            "https://0x7f000001",
            "https://[::1]:443",
            "https://user@psp.example",
            "https://psp.example?x=1",
            "https://psp.example/a#b",
            "https://psp.example:0",
            "https://psp.example:99999",
            "https://-psp.example",
            "https://psp..example",
            "https://psp.example/../admin",
            "https://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} was accepted");
        }
    }

    fn receiver(paths: &[&str], projects: &[&str]) -> Receiver {
        let toml = format!(
            "name = \"acme\"\nurl = \"https://psp.example\"\npaths = {paths:?}\nmethods = [\"post\"]\nprojects = {projects:?}\n"
        );
        Receiver::from_raw(toml::from_str(&toml).unwrap(), Path::new(".")).unwrap()
    }

    #[test]
    fn paths_match_by_whole_segments() {
        let r = receiver(&["/v1/payments"], &["*"]);
        let p = Project::default_project();
        assert!(r.allows(&p, "POST", "/v1/payments").is_ok());
        assert!(r.allows(&p, "POST", "/v1/payments/pay_1/capture").is_ok());
        assert!(r.allows(&p, "POST", "/v1/payments?expand=card").is_ok());
        assert_eq!(r.allows(&p, "POST", "/v1/paymentsX"), Err(NotAllowed::Path));
        assert_eq!(r.allows(&p, "POST", "/v1/refunds"), Err(NotAllowed::Path));
        assert_eq!(r.allows(&p, "GET", "/v1/payments"), Err(NotAllowed::Method));
        let only = receiver(&["/"], &["shop-a"]);
        assert!(only
            .allows(&Project::parse("shop-a").unwrap(), "POST", "/x")
            .is_ok());
        assert_eq!(
            only.allows(&Project::parse("shop-b").unwrap(), "POST", "/x"),
            Err(NotAllowed::Project)
        );
    }

    #[test]
    fn a_bad_receiver_is_refused_with_its_reason() {
        let parse = |extra: &str| {
            let toml = format!(
                "name = \"acme\"\nurl = \"https://psp.example\"\npaths = [\"/v1\"]\nmethods = [\"POST\"]\nprojects = [\"*\"]\n{extra}"
            );
            Receiver::from_raw(toml::from_str(&toml).unwrap(), Path::new("."))
        };
        assert!(parse("").is_ok());
        assert!(parse("timeout = \"0s\"").unwrap_err().contains("timeout"));
        assert!(parse("timeout = \"10m\"").is_err());
        assert!(parse("headers = { Host = \"evil.example\" }")
            .unwrap_err()
            .contains("Host"));
        assert!(parse("headers = { \"x-a\" = \"line\\nbreak\" }").is_err());
        assert!(parse("cert = \"a.pem\"").unwrap_err().contains("together"));
        let bad_name = "name = \"Acme\"\nurl = \"https://psp.example\"\npaths = [\"/\"]\nmethods = [\"POST\"]\nprojects = [\"*\"]\n";
        assert!(Receiver::from_raw(toml::from_str(bad_name).unwrap(), Path::new(".")).is_err());
    }

    /// The example in `deploy/` loads, once the files it names exist.
    #[test]
    fn the_example_receivers_file_loads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cardvault-receivers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("psp")).unwrap();
        let example = include_str!("../../deploy/receivers.example.toml");
        std::fs::write(dir.join("receivers.toml"), example).unwrap();
        let ca = crate::pki::Authority::new("example PSP CA").unwrap();
        let client = ca
            .client(&crate::pki::ClientSpec::named("cardvault"))
            .unwrap();
        let private = |name: &str, text: &str| {
            let path = dir.join("psp").join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        private("acme.auth", "Bearer sk_live_example\n");
        private("globex.key", "AQE1234example");
        private("globex-client.key", &client.key_pem);
        std::fs::write(dir.join("psp/globex-client.pem"), &client.cert_pem).unwrap();
        let loaded = Receivers::load(&dir.join("receivers.toml")).unwrap();
        assert_eq!(loaded.len(), 2);
        let globex = loaded.get("globex").unwrap();
        assert_eq!(globex.base_path, "/pal/servlet/Payment/v68");
        assert!(globex
            .allows(&Project::parse("shop-a").unwrap(), "POST", "/authorise")
            .is_ok());
        let acme = loaded.get("acme").unwrap();
        assert!(acme
            .headers
            .iter()
            .any(|h| h.secret && h.name == "authorization"));
        assert!(acme
            .headers
            .iter()
            .any(|h| !h.secret && h.name == "acme-version"));
        // A credential file others can read is refused.
        std::fs::set_permissions(
            dir.join("psp/acme.auth"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let refused = Receivers::load(&dir.join("receivers.toml")).err().unwrap();
        assert!(refused.to_string().contains("open to others"), "{refused}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
