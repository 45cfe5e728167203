//! Who may do what: `policies/` files → decisions. The only place that grants a permission.
//!
//! A caller is known by its verified client certificate ([`Peer`]). Each `[[identity]]` in the
//! policy names exactly one matcher (URI SAN, DNS SAN or subject CN), its permissions and the
//! projects it may touch. Anything not granted is denied, and so is a certificate that matches
//! no identity or more than one.
//!
//! Authorization yields a proof value, [`Grant<P>`], that only this module can construct. Vault
//! operations take the grant for their permission, so an operation whose check was forgotten
//! does not compile, and the grant carries the one project the operation may touch.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::tokens::Project;

/// What a verified client certificate says about its holder.
#[derive(Debug, Default)]
pub struct Peer {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub common_names: Vec<String>,
    /// The subject DN, for logs.
    pub subject: String,
    /// SHA-256 of the leaf certificate (DER), hex, for logs.
    pub fingerprint: String,
    /// The connection's remote address, for the audit trail.
    pub address: Option<std::net::SocketAddr>,
    /// The verified chain (DER, leaf first), to check again after a reload of CA or CRLs.
    pub chain: Vec<Vec<u8>>,
    /// The TLS configuration generation the chain was last found trusted under.
    pub trusted_under: std::sync::atomic::AtomicU64,
    /// The leaf certificate's `notAfter` (Unix seconds): past it, requests on a connection
    /// opened before are refused.
    pub not_after: i64,
    /// The `notAfter` (Unix seconds) of each certificate the client sent after its leaf, on
    /// the verified path or not: once one has passed, the chain is verified again.
    pub issuers_not_after: Vec<i64>,
    /// When the chain is next verified again (Unix seconds): the first second in which an
    /// intermediate may have expired or a CRL passed its nextUpdate. 0 (the default) until
    /// `TlsState::stamp` sets it, so a connection nobody stamped is verified again at its
    /// first request rather than trusted past such a moment.
    pub recheck_at: std::sync::atomic::AtomicI64,
    /// Held while the chain is verified again, so that two requests doing it at once cannot
    /// leave one verification's generation beside the other's `recheck_at`.
    pub rechecking: std::sync::Mutex<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Tokenize,
    Read,
    Customers,
    Detokenize,
    /// Send a request to a registered PSP (a receiver) with a token's card put in by the
    /// vault: `POST /v1/forward`. The caller never sees the card.
    Forward,
    /// Submit one's own custodian share to unseal, vault-wide.
    Unseal,
    /// Key management: rotation, rekey, inventory, vault-wide.
    Keys,
    /// See card fingerprints, and have attach deduplicate cards by them. Not a permission of
    /// its own endpoint: it widens what the other permissions show (see [`Disclosure`]).
    Fingerprint,
    /// Scrape `GET /v1/metrics`, vault-wide.
    Metrics,
    /// Take an online backup of the store (ciphertext and wrapped keys), vault-wide.
    Backup,
    /// Import an OpenPGP-encrypted card file into the project's customers, and manage the
    /// vault's import keys.
    Import,
    /// Request, approve (another identity's request) and fetch an OpenPGP-encrypted export of
    /// the project's customer tokens.
    Export,
}

impl Permission {
    const ALL: [Permission; 12] = [
        Permission::Tokenize,
        Permission::Read,
        Permission::Customers,
        Permission::Detokenize,
        Permission::Forward,
        Permission::Unseal,
        Permission::Keys,
        Permission::Fingerprint,
        Permission::Metrics,
        Permission::Backup,
        Permission::Import,
        Permission::Export,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Tokenize => "tokenize",
            Permission::Read => "read",
            Permission::Customers => "customers",
            Permission::Detokenize => "detokenize",
            Permission::Forward => "forward",
            Permission::Unseal => "unseal",
            Permission::Keys => "keys",
            Permission::Fingerprint => "fingerprint",
            Permission::Metrics => "metrics",
            Permission::Backup => "backup",
            Permission::Import => "import",
            Permission::Export => "export",
        }
    }

    /// Permissions over the whole vault rather than one project's data: `projects` does not
    /// restrict them.
    pub fn is_vault_wide(self) -> bool {
        matches!(
            self,
            Permission::Unseal | Permission::Keys | Permission::Metrics | Permission::Backup
        )
    }

    fn parse(s: &str) -> Option<Permission> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Type-level permissions, so that a `Grant` names the permission it proves.
pub trait Requires: sealed::Sealed {
    const PERMISSION: Permission;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! permission_marker {
    ($name:ident, $perm:expr) => {
        #[derive(Debug)]
        pub enum $name {}
        impl sealed::Sealed for $name {}
        impl Requires for $name {
            const PERMISSION: Permission = $perm;
        }
    };
}

permission_marker!(Tokenize, Permission::Tokenize);
permission_marker!(Read, Permission::Read);
permission_marker!(Detokenize, Permission::Detokenize);
permission_marker!(Forward, Permission::Forward);
permission_marker!(Customers, Permission::Customers);
permission_marker!(Unseal, Permission::Unseal);
permission_marker!(Keys, Permission::Keys);
permission_marker!(Metrics, Permission::Metrics);
permission_marker!(Backup, Permission::Backup);
permission_marker!(Import, Permission::Import);
permission_marker!(Export, Permission::Export);

/// What an identity may see of a card beyond scheme, BIN-6, last 4, expiry and holder name.
///
/// A fingerprint (a keyed hash of the whole PAN) is an equality oracle: whoever can also make
/// fingerprints of PANs of their choosing (by tokenizing them) recovers a card's hidden digits
/// by trying every candidate that fits its truncation. So fingerprints, and attach's
/// deduplication (which answers the same question), are shown only to identities holding
/// `fingerprint`, and the policy refuses `fingerprint` beside `tokenize` unless the identity
/// holds `detokenize` anyway. The first 8 digits are shown only where the policy says
/// `show_iin8 = true`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Disclosure {
    /// `fingerprint` in card and customer-token views; `duplicate` answers from attach.
    pub fingerprint: bool,
    /// `iin8` in views of cards of 16 digits or more.
    pub iin8: bool,
}

/// Proof that the policy allowed `identity` to use permission `P` on `project`.
/// Only [`Policy::authorize`] makes one.
pub struct Grant<P: Requires> {
    identity: Arc<str>,
    peer: Arc<Peer>,
    limits: Limits,
    disclosure: Disclosure,
    project: Project,
    _permission: PhantomData<fn() -> P>,
}

impl<P: Requires> Grant<P> {
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The identity's limits from the policy.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Who acted, for the audit trail.
    pub fn actor(&self) -> crate::audit::Actor<'_> {
        crate::audit::Actor::of(&self.identity, &self.peer)
    }

    pub fn project(&self) -> &Project {
        &self.project
    }

    /// What the identity may see of a card.
    pub fn disclosure(&self) -> Disclosure {
        self.disclosure
    }
}

impl<P: Requires> fmt::Debug for Grant<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Grant<{}>({} on {})",
            P::PERMISSION.as_str(),
            self.identity,
            self.project
        )
    }
}

/// Why a request was denied; all of these answer 403 `forbidden` and are logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("certificate matches no identity in the policy")]
    UnknownIdentity,
    #[error("certificate matches several identities: {0}")]
    Ambiguous(String),
    #[error("identity {identity} lacks permission {permission}")]
    MissingPermission {
        identity: String,
        permission: &'static str,
    },
    #[error("identity {identity} may not use project {project}")]
    Project { identity: String, project: String },
}

impl Denied {
    /// The identity the certificate matched, when it matched exactly one.
    pub fn identity(&self) -> &str {
        match self {
            Denied::MissingPermission { identity, .. } | Denied::Project { identity, .. } => {
                identity
            }
            Denied::UnknownIdentity | Denied::Ambiguous(_) => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    UriSan(String),
    DnsSan(String),
    CommonName(String),
}

impl Matcher {
    fn matches(&self, peer: &Peer) -> bool {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == v);
        match self {
            Matcher::UriSan(v) => has(&peer.uri_sans, v),
            Matcher::DnsSan(v) => has(&peer.dns_sans, v),
            Matcher::CommonName(v) => has(&peer.common_names, v),
        }
    }
}

#[derive(Debug)]
pub struct Identity {
    name: Arc<str>,
    matcher: Matcher,
    permissions: HashSet<Permission>,
    /// `None` means every project (`"*"`).
    projects: Option<HashSet<Project>>,
    limits: Limits,
    disclosure: Disclosure,
}

/// Per-identity limits on detokenization (bulk-detokenization monitoring).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Sustained detokenizations per second, with `detokenize_burst` in reserve; `None`:
    /// no rate limit.
    pub detokenize_per_second: Option<f64>,
    pub detokenize_burst: u32,
    /// Lookups of tokens that do not exist (404) allowed per minute before detokenization
    /// is refused for the rest of that minute: enumeration.
    pub unknown_tokens_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            detokenize_per_second: None,
            detokenize_burst: 0,
            unknown_tokens_per_minute: 60,
        }
    }
}

impl Identity {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What this identity may do, in words: for `cardvault policy explain`.
    pub fn explain(&self) -> String {
        let mut permissions: Vec<&str> = self.permissions.iter().map(|p| p.as_str()).collect();
        permissions.sort_unstable();
        let projects = match &self.projects {
            None => "every project".to_owned(),
            Some(set) => {
                let mut names: Vec<&str> = set.iter().map(|p| p.as_str()).collect();
                names.sort_unstable();
                format!("projects {}", names.join(", "))
            }
        };
        let shown = match (self.disclosure.iin8, self.disclosure.fingerprint) {
            (false, false) => "BIN-6 and last 4",
            (true, false) => "BIN-8 and last 4",
            (false, true) => "BIN-6, last 4 and fingerprints",
            (true, true) => "BIN-8, last 4 and fingerprints",
        };
        let matcher = match &self.matcher {
            Matcher::UriSan(v) => format!("URI SAN {v}"),
            Matcher::DnsSan(v) => format!("DNS SAN {v}"),
            Matcher::CommonName(v) => format!("CN {v}"),
        };
        let limit = match self.limits.detokenize_per_second {
            Some(rate) => format!(
                "; detokenize at most {rate}/s (burst {})",
                self.limits.detokenize_burst
            ),
            None => String::new(),
        };
        let (wide, bound): (Vec<&str>, Vec<&str>) = permissions
            .iter()
            .partition(|p| Permission::parse(p).is_some_and(Permission::is_vault_wide));
        let mut may = Vec::new();
        if !bound.is_empty() {
            may.push(format!("{} on {projects}", bound.join(", ")));
        }
        if !wide.is_empty() {
            may.push(format!("{} vault-wide", wide.join(", ")));
        }
        if may.is_empty() {
            may.push("nothing".into());
        }
        format!(
            "identity {} (matched on {matcher}): {}; cards shown as {shown}{limit}",
            self.name,
            may.join("; ")
        )
    }
}

#[derive(Debug)]
pub struct Policy {
    identities: Vec<Identity>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("policy {0}: no identities defined")]
    Empty(PathBuf),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    identity: Vec<IdentityEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityEntry {
    name: String,
    uri_san: Option<String>,
    dns_san: Option<String>,
    common_name: Option<String>,
    permissions: Vec<String>,
    /// May be left out by an identity whose permissions are all vault-wide (custodians).
    #[serde(default)]
    projects: Vec<String>,
    detokenize_per_second: Option<f64>,
    detokenize_burst: Option<u32>,
    unknown_tokens_per_minute: Option<u32>,
    /// Show the first 8 digits (`iin8`) of cards of 16 digits or more, not only 6.
    #[serde(default)]
    show_iin8: bool,
}

impl Policy {
    /// Loads a policy file, or every `*.toml` file in a folder (in name order).
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let read_err = |source| PolicyError::Read {
            path: path.to_owned(),
            source,
        };
        let mut files = Vec::new();
        refuse_world_writable(path)?;
        if path.is_dir() {
            for entry in std::fs::read_dir(path).map_err(read_err)? {
                let p = entry.map_err(read_err)?.path();
                if p.extension().is_some_and(|e| e == "toml") {
                    files.push(p);
                }
            }
            files.sort();
        } else {
            files.push(path.to_owned());
        }
        let mut sources = Vec::new();
        for file in files {
            refuse_world_writable(&file)?;
            let text = std::fs::read_to_string(&file).map_err(|source| PolicyError::Read {
                path: file.clone(),
                source,
            })?;
            sources.push((file, text));
        }
        let policy = Policy::parse(&sources)?;
        if policy.identities.is_empty() {
            return Err(PolicyError::Empty(path.to_owned()));
        }
        Ok(policy)
    }

    /// Parses policy sources `(origin, toml text)`; fails closed on anything doubtful.
    pub fn parse(sources: &[(PathBuf, String)]) -> Result<Policy, PolicyError> {
        let mut identities: Vec<Identity> = Vec::new();
        for (path, text) in sources {
            let invalid = |message: String| PolicyError::Invalid {
                path: path.clone(),
                message,
            };
            let file: PolicyFile =
                toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
            for entry in file.identity {
                let identity = Identity::from_entry(entry).map_err(invalid)?;
                if let Some(dup) = identities
                    .iter()
                    .find(|i| i.name == identity.name || i.matcher == identity.matcher)
                {
                    return Err(invalid(format!(
                        "identity {:?} duplicates identity {:?} (same name or same matcher)",
                        identity.name(),
                        dup.name()
                    )));
                }
                identities.push(identity);
            }
        }
        Ok(Policy { identities })
    }

    /// The one identity this certificate matches.
    pub fn identify(&self, peer: &Peer) -> Result<&Identity, Denied> {
        let mut matching = self.identities.iter().filter(|i| i.matcher.matches(peer));
        let first = matching.next().ok_or(Denied::UnknownIdentity)?;
        if let Some(second) = matching.next() {
            return Err(Denied::Ambiguous(format!(
                "{}, {}",
                first.name(),
                second.name()
            )));
        }
        Ok(first)
    }

    pub fn authorize<P: Requires>(
        &self,
        peer: &Arc<Peer>,
        project: &Project,
    ) -> Result<Grant<P>, Denied> {
        let identity = self.identify(peer)?;
        if !identity.permissions.contains(&P::PERMISSION) {
            return Err(Denied::MissingPermission {
                identity: identity.name().to_owned(),
                permission: P::PERMISSION.as_str(),
            });
        }
        if let Some(projects) = identity
            .projects
            .as_ref()
            .filter(|_| !P::PERMISSION.is_vault_wide())
        {
            if !projects.contains(project) {
                return Err(Denied::Project {
                    identity: identity.name().to_owned(),
                    project: project.to_string(),
                });
            }
        }
        Ok(Grant {
            identity: Arc::clone(&identity.name),
            peer: Arc::clone(peer),
            limits: identity.limits,
            disclosure: identity.disclosure,
            project: project.clone(),
            _permission: PhantomData,
        })
    }
}

/// A policy anyone on the host can change grants anything to anyone: refused.
fn refuse_world_writable(path: &Path) -> Result<(), PolicyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o002 != 0 {
        return Err(PolicyError::Invalid {
            path: path.to_owned(),
            message: format!(
                "writable by others (mode {:o}): anyone on the host could grant themselves \
                 detokenize; run chmod o-w on it",
                mode & 0o777
            ),
        });
    }
    Ok(())
}

impl Identity {
    fn from_entry(entry: IdentityEntry) -> Result<Identity, String> {
        let name = entry.name.trim().to_owned();
        if name.is_empty() {
            return Err("an identity has an empty name".into());
        }
        let matcher = match (entry.uri_san, entry.dns_san, entry.common_name) {
            (Some(v), None, None) => Matcher::UriSan(v),
            (None, Some(v), None) => Matcher::DnsSan(v),
            (None, None, Some(v)) => Matcher::CommonName(v),
            (None, None, None) => {
                return Err(format!(
                    "identity {name:?} has no matcher: give uri_san, dns_san or common_name"
                ))
            }
            _ => {
                return Err(format!(
                    "identity {name:?} has several matchers: give exactly one"
                ))
            }
        };
        if matches!(&matcher, Matcher::UriSan(v) | Matcher::DnsSan(v) | Matcher::CommonName(v) if v.trim().is_empty())
        {
            return Err(format!("identity {name:?} has an empty matcher"));
        }
        let mut permissions = HashSet::new();
        for p in &entry.permissions {
            let perm = Permission::parse(p).ok_or_else(|| {
                let known: Vec<_> = Permission::ALL.iter().map(|p| p.as_str()).collect();
                format!(
                    "identity {name:?}: unknown permission {p:?} (known: {})",
                    known.join(", ")
                )
            })?;
            permissions.insert(perm);
        }
        if permissions.contains(&Permission::Fingerprint)
            && permissions.contains(&Permission::Tokenize)
            && !permissions.contains(&Permission::Detokenize)
        {
            return Err(format!(
                "identity {name:?}: fingerprint beside tokenize lets it recover card numbers by \
                 tokenizing every candidate PAN and comparing fingerprints; give fingerprint to \
                 an identity that cannot tokenize (or that holds detokenize anyway)"
            ));
        }
        // An import answers which cards a customer holds (`duplicate`, and the same token id
        // for the same card, which idempotency needs), for cards the importer chose: the same
        // oracle as fingerprint beside tokenize.
        if permissions.contains(&Permission::Import)
            && !permissions.contains(&Permission::Detokenize)
        {
            return Err(format!(
                "identity {name:?}: import without detokenize lets it recover card numbers by \
                 importing every candidate PAN for a customer and reading which one comes back \
                 as a duplicate; give import to an identity that holds detokenize anyway"
            ));
        }
        if entry.projects.is_empty() && !permissions.iter().all(|p| p.is_vault_wide()) {
            return Err(format!(
                "identity {name:?} lists no projects (use [\"*\"] for all)"
            ));
        }
        let projects =
            Project::parse_list(&entry.projects).map_err(|e| format!("identity {name:?}: {e}"))?;
        let defaults = Limits::default();
        let limits = Limits {
            detokenize_per_second: entry.detokenize_per_second,
            detokenize_burst: entry
                .detokenize_burst
                .unwrap_or_else(|| entry.detokenize_per_second.map_or(0, |r| r.ceil() as u32)),
            unknown_tokens_per_minute: entry
                .unknown_tokens_per_minute
                .unwrap_or(defaults.unknown_tokens_per_minute),
        };
        if limits
            .detokenize_per_second
            .is_some_and(|r| !(r.is_finite() && r > 0.0))
            || (limits.detokenize_per_second.is_some() && limits.detokenize_burst == 0)
            || limits.unknown_tokens_per_minute == 0
        {
            return Err(format!(
                "identity {name:?}: detokenize_per_second must be positive, with a positive detokenize_burst; unknown_tokens_per_minute at least 1"
            ));
        }
        let disclosure = Disclosure {
            fingerprint: permissions.contains(&Permission::Fingerprint),
            iin8: entry.show_iin8,
        };
        Ok(Identity {
            name: name.into(),
            matcher,
            permissions,
            projects,
            limits,
            disclosure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(&[(PathBuf::from("test.toml"), text.to_owned())])
    }

    const EXAMPLE: &str = r#"
        [[identity]]
        name = "router"
        uri_san = "spiffe://pay/router"
        permissions = ["tokenize", "read", "detokenize"]
        projects = ["*"]

        [[identity]]
        name = "checkout"
        dns_san = "checkout.pay"
        permissions = ["tokenize"]
        projects = ["shop-a"]
    "#;

    fn peer(uri: &[&str], dns: &[&str], cn: &[&str]) -> Arc<Peer> {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Arc::new(Peer {
            uri_sans: v(uri),
            dns_sans: v(dns),
            common_names: v(cn),
            ..Peer::default()
        })
    }

    #[test]
    fn refuses_bad_policies() {
        let cases: &[(&str, &str)] = &[
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['fly']\nprojects=['*']", "unknown permission"),
            ("[[identity]]\nname='a'\npermissions=['read']\nprojects=['*']", "no matcher"),
            ("[[identity]]\nname='a'\nuri_san='x'\ncommon_name='y'\npermissions=['read']\nprojects=['*']", "several matchers"),
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['read']\nprojects=['*']\n[[identity]]\nname='a'\nuri_san='y'\npermissions=['read']\nprojects=['*']", "duplicates"),
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['read']\nprojects=['*']\n[[identity]]\nname='b'\nuri_san='x'\npermissions=['read']\nprojects=['*']", "duplicates"),
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['read']\nprojects=[]", "no projects"),
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['read']\nprojects=['Bad/Name']", "invalid project"),
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['read']\nprojects=['*']\ncolour='red'", "unknown field"),
            ("[[identity]]\nname='a'\nuri_san=''\npermissions=['read']\nprojects=['*']", "empty matcher"),
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['tokenize','read','fingerprint']\nprojects=['*']", "recover card numbers"),
            ("[[identity]]\nname='a'\nuri_san='x'\npermissions=['import']\nprojects=['*']", "import without detokenize"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}\n=> {err}");
        }
    }

    #[test]
    fn shipped_policies_parse() {
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        assert_eq!(Policy::load(&example).unwrap().identities.len(), 11);
        assert_eq!(parse(crate::dev::DEV_POLICY).unwrap().identities.len(), 3);
    }

    #[test]
    fn decisions_table() {
        let policy = parse(EXAMPLE).unwrap();
        let router = peer(&["spiffe://pay/router"], &[], &["router"]);
        let checkout = peer(&[], &["checkout.pay"], &[]);
        let stranger = peer(&["spiffe://pay/other"], &[], &["router"]);
        let shop_a = Project::parse("shop-a").unwrap();
        let shop_b = Project::parse("shop-b").unwrap();

        assert!(policy.authorize::<Detokenize>(&router, &shop_b).is_ok());
        assert!(policy.authorize::<Tokenize>(&checkout, &shop_a).is_ok());
        assert!(matches!(
            policy.authorize::<Tokenize>(&checkout, &shop_b),
            Err(Denied::Project { .. })
        ));
        assert!(matches!(
            policy.authorize::<Detokenize>(&checkout, &shop_a),
            Err(Denied::MissingPermission { .. })
        ));
        assert_eq!(
            policy.authorize::<Read>(&stranger, &shop_a).unwrap_err(),
            Denied::UnknownIdentity
        );
        let both = peer(&["spiffe://pay/router"], &["checkout.pay"], &[]);
        assert!(matches!(
            policy.authorize::<Read>(&both, &shop_a),
            Err(Denied::Ambiguous(_))
        ));
        let grant = policy.authorize::<Read>(&router, &shop_a).unwrap();
        assert_eq!(
            (grant.identity(), grant.project().as_str()),
            ("router", "shop-a")
        );
        assert_eq!(grant.disclosure(), Disclosure::default());
    }

    #[test]
    fn fingerprints_and_iin8_are_shown_only_where_granted() {
        let policy = parse(
            r#"
            [[identity]]
            name = "router"
            uri_san = "r"
            permissions = ["tokenize", "read", "detokenize", "fingerprint"]
            projects = ["*"]
            show_iin8 = true

            [[identity]]
            name = "fraud"
            uri_san = "f"
            permissions = ["read", "customers", "fingerprint"]
            projects = ["*"]

            [[identity]]
            name = "checkout"
            uri_san = "c"
            permissions = ["tokenize", "read"]
            projects = ["*"]
        "#,
        )
        .unwrap();
        let project = Project::default_project();
        let shown = |uri: &str| {
            policy
                .authorize::<Read>(&peer(&[uri], &[], &[]), &project)
                .unwrap()
                .disclosure()
        };
        let all = Disclosure {
            fingerprint: true,
            iin8: true,
        };
        assert_eq!(shown("r"), all);
        assert_eq!(
            shown("f"),
            Disclosure {
                fingerprint: true,
                iin8: false
            }
        );
        assert_eq!(shown("c"), Disclosure::default());
    }
}
