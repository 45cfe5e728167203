//! The rustls server configuration, and the caller's identity from its certificate.
//!
//! Client certificates are required: the verifier is built without `allow_unauthenticated`,
//! so a client with no certificate, one from another CA, or an expired one fails the handshake
//! and never reaches HTTP. TLS 1.3 and 1.2 only, ECDHE key exchange with AEAD suites only,
//! no 0-RTT. Session resumption is off: a resumed TLS 1.3 session does not re-check the client
//! certificate, so a revoked or expired certificate would keep working as long as its ticket.
//! With keep-alive connections the full handshake is rarely paid.
//!
//! The crypto provider (ring) is passed explicitly everywhere, so no process-wide default is
//! needed and a second provider in the dependency tree cannot make startup ambiguous.
//!
//! Revocation: with `[tls] crl`, every handshake checks the client's chain against the CRLs
//! (unknown status and an expired CRL are refusals). Reload: the server certificate, the
//! client CA and the CRLs sit behind [`TlsState`], which `SIGHUP` replaces as a whole or not
//! at all; connections already established keep their session.
//!
//! An open connection's chain is verified again before a request when a reload came since it
//! was last verified, and when time alone may have changed the answer since: an intermediate
//! the client sent expired, or a CRL passed its nextUpdate ([`TlsState::still_trusted`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{CertificateRevocationList, FromDer, GeneralName, X509Certificate};

use crate::crypto::sha256_hex;
use crate::policy::Peer;

mod failures;
pub use failures::HandshakeLog;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The ring provider restricted to ECDHE + AEAD suites (all of ring's defaults already are;
/// listing them keeps a future default from widening the set unnoticed).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
            provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
            provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            provider::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            provider::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            provider::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..provider::default_provider()
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

/// The files the TLS layer is made from.
#[derive(Debug, Clone)]
pub struct TlsPaths<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: &'a Path,
    pub crl: Option<&'a Path>,
}

/// How long a client has to finish its TLS handshake (set on the server).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// A generation no reload ever reaches: a connection stamped with it is checked again at its
/// first request.
const UNCHECKED: u64 = u64::MAX;

/// What `SIGHUP` replaces: the server certificate and the client verifier (CA and CRLs).
#[derive(Debug)]
pub struct TlsState {
    /// Bumped by every successful reload.
    generation: AtomicU64,
    /// When the last reload began swapping the new configuration in.
    reloaded_at: Mutex<Option<Instant>>,
    certified: RwLock<Arc<CertifiedKey>>,
    verifier: RwLock<Arc<Verifier>>,
    /// Leaked once per load (a few hundred bytes per reload), so `root_hint_subjects` can hand
    /// out a reference that outlives the lock.
    hints: RwLock<&'static [DistinguishedName]>,
    /// When the loaded material runs out, for the warnings ahead of it ([`TlsState::expiring`]).
    deadlines: RwLock<Vec<Deadline>>,
}

/// When one piece of the TLS material stops working: a certificate's notAfter, a CRL's
/// nextUpdate (past it, every handshake it covers is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadline {
    /// `server_certificate`, `client_ca` or `crl`.
    pub kind: &'static str,
    /// What runs out, for the log: "server certificate", "client CA CN=...", "CRL ...".
    pub what: String,
    /// Unix seconds.
    pub at: i64,
}

/// How long before a deadline the daily warnings start.
pub const WARN_DAYS: i64 = 30;

/// The client verifier, and when what it decides changes with time alone. One value, so that
/// a reload replaces both at once and a verification always sees the deadlines of its own CRLs.
#[derive(Debug)]
struct Verifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// The nextUpdate of each CRL loaded (Unix seconds): from then on the verifier refuses
    /// every chain that CRL covers. Empty without `[tls] crl`.
    crl_next_updates: Vec<i64>,
}

struct Loaded {
    certified: Arc<CertifiedKey>,
    verifier: Arc<Verifier>,
    deadlines: Vec<Deadline>,
}

/// `what` and the notAfter of each certificate in `certs` that parses.
fn not_afters(
    certs: &[CertificateDer<'_>],
    kind: &'static str,
    what: impl Fn(&X509Certificate<'_>) -> String,
) -> Vec<Deadline> {
    certs
        .iter()
        .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok())
        .map(|(_, cert)| Deadline {
            kind,
            what: what(&cert),
            at: cert.validity().not_after.timestamp(),
        })
        .collect()
}

fn load(paths: &TlsPaths<'_>, provider: &Arc<CryptoProvider>) -> Result<Loaded, TlsError> {
    let mut roots = RootCertStore::empty();
    let cas = load_certs(paths.client_ca)?;
    let mut deadlines = not_afters(&cas, "client_ca", |c| format!("client CA {}", c.subject()));
    for ca in cas {
        roots.add(ca).map_err(|e| file_err(paths.client_ca, e))?;
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let mut crl_next_updates = Vec::new();
    if let Some(crl) = paths.crl {
        let crls = CertificateRevocationListDer::pem_file_iter(crl)
            .map_err(|e| file_err(crl, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(crl, e))?;
        if crls.is_empty() {
            return Err(file_err(crl, "no CRL found"));
        }
        // A CRL that cannot be parsed here is refused: open connections could not be checked
        // again when it expires. One without a nextUpdate never expires, so sets no deadline.
        for der in &crls {
            let (_, parsed) =
                CertificateRevocationList::from_der(der.as_ref()).map_err(|e| file_err(crl, e))?;
            if let Some(next_update) = parsed.next_update() {
                crl_next_updates.push(next_update.timestamp());
                deadlines.push(Deadline {
                    kind: "crl",
                    what: format!("CRL of {} ({})", parsed.issuer(), crl.display()),
                    at: next_update.timestamp(),
                });
            }
        }
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    let inner = builder
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let chain = load_certs(paths.cert)?;
    deadlines.extend(not_afters(
        chain.get(..1).unwrap_or_default(),
        "server_certificate",
        |c| format!("server certificate {}", c.subject()),
    ));
    let certified = CertifiedKey::from_der(chain, load_key(paths.key)?, provider)
        .map_err(|e| file_err(paths.key, e))?;
    Ok(Loaded {
        certified: Arc::new(certified),
        verifier: Arc::new(Verifier {
            inner,
            crl_next_updates,
        }),
        deadlines,
    })
}

fn expiring(deadlines: &[Deadline], now: i64) -> Vec<(Deadline, i64)> {
    deadlines
        .iter()
        .filter(|d| d.at.saturating_sub(now) <= WARN_DAYS * 86_400)
        .map(|d| (d.clone(), d.at.saturating_sub(now).div_euclid(86_400)))
        .collect()
}

/// Unix seconds, as webpki counts them (whole seconds, rounded down).
fn unix_seconds(at: UnixTime) -> i64 {
    i64::try_from(at.as_secs()).unwrap_or(i64::MAX)
}

/// The first second in which verifying `peer`'s chain again may be refused although a
/// verification at `checked` (Unix seconds) passed: a certificate sent after the leaf expires
/// (webpki refuses it once the time is past its notAfter), or a CRL reaches its nextUpdate
/// (refused from that second on). `i64::MAX` when there is none. Moments at or before
/// `checked` are left out, as that verification already passed with them: a spare certificate
/// the client sent already expired was not on the path, and a CRL already expired covers none
/// of this chain.
fn next_check(peer: &Peer, checked: i64, crl_next_updates: &[i64]) -> i64 {
    peer.issuers_not_after
        .iter()
        .map(|not_after| not_after.saturating_add(1))
        .chain(crl_next_updates.iter().copied())
        .filter(|&at| at > checked)
        .min()
        .unwrap_or(i64::MAX)
}

impl TlsState {
    /// Loads everything again and swaps it in, or changes nothing and says why.
    pub fn reload(&self, paths: &TlsPaths<'_>) -> Result<(), TlsError> {
        let loaded = load(paths, &crypto_provider())?;
        let hints: &'static [DistinguishedName] = Box::leak(
            loaded
                .verifier
                .inner
                .root_hint_subjects()
                .to_vec()
                .into_boxed_slice(),
        );
        // Before anything is swapped: a connection stamped after the new generation must see
        // that a reload is recent (`generation_for_new_connection`).
        *self.reloaded_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        *self.certified.write().unwrap_or_else(|p| p.into_inner()) = loaded.certified;
        *self.verifier.write().unwrap_or_else(|p| p.into_inner()) = loaded.verifier;
        *self.hints.write().unwrap_or_else(|p| p.into_inner()) = hints;
        *self.deadlines.write().unwrap_or_else(|p| p.into_inner()) = loaded.deadlines;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// When each piece of the loaded material runs out.
    pub fn deadlines(&self) -> Vec<Deadline> {
        self.deadlines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What runs out within [`WARN_DAYS`] of `now` (Unix seconds), or has run out, with the
    /// whole days left (negative once past). The daemon logs these once a day.
    pub fn expiring(&self, now: i64) -> Vec<(Deadline, i64)> {
        expiring(
            &self.deadlines.read().unwrap_or_else(|p| p.into_inner()),
            now,
        )
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The generation to stamp on a connection whose handshake has just finished. Its client
    /// certificate was checked somewhere inside the handshake, which lasts at most
    /// [`HANDSHAKE_TIMEOUT`]: when a reload began within that window (plus a second), the check
    /// may have run under the configuration before it, so the connection is left unchecked
    /// and its first request checks it again ([`TlsState::still_trusted`]).
    pub fn generation_for_new_connection(&self) -> u64 {
        let generation = self.generation();
        let recent = self
            .reloaded_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() <= HANDSHAKE_TIMEOUT + Duration::from_secs(1));
        if recent {
            UNCHECKED
        } else {
            generation
        }
    }

    /// Sets when a new connection's chain is next verified (`Peer::recheck_at`), from the
    /// intermediates it sent and the CRLs in force; called in `on_connect`. The handshake
    /// verified the chain at some moment of the last [`HANDSHAKE_TIMEOUT`], so a deadline that
    /// fell inside that window (plus a second) may have passed after the check: it counts as
    /// still ahead, and the first request verifies the chain again. A connection left
    /// unstamped is verified again at its first request all the same (`recheck_at` is 0).
    pub fn stamp(&self, peer: &Peer) {
        let window = i64::try_from(HANDSHAKE_TIMEOUT.as_secs() + 1).unwrap_or(i64::MAX);
        let checked = unix_seconds(UnixTime::now()).saturating_sub(window);
        let verifier = self.current_verifier();
        peer.recheck_at.store(
            next_check(peer, checked, &verifier.crl_next_updates),
            Ordering::Release,
        );
    }

    /// Whether a connection's client chain is still trusted: its leaf not expired since the
    /// handshake (keep-alive can outlast a certificate), and its chain verified again with the
    /// current CA and CRLs once after each reload and whenever an intermediate it sent expired
    /// or a CRL passed its nextUpdate since the last verification. A connection whose chain
    /// fails that stays open, but every request on it is refused (until a reload makes the
    /// chain pass again).
    pub fn still_trusted(&self, peer: &Peer) -> bool {
        let at = UnixTime::now();
        let now = unix_seconds(at);
        if now > peer.not_after {
            return false;
        }
        let generation = self.generation();
        // The common case, on every request: no reload and no deadline since the last check.
        // `recheck_at` is stored before `trusted_under`, so a generation seen here comes with
        // the deadline computed beside it.
        if peer.trusted_under.load(Ordering::Acquire) == generation
            && now < peer.recheck_at.load(Ordering::Acquire)
        {
            return true;
        }
        let _one_at_a_time = peer.rechecking.lock().unwrap_or_else(|p| p.into_inner());
        let Some((leaf, intermediates)) = peer.chain.split_first() else {
            return false;
        };
        let intermediates: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        // Read after the generation: if a reload lands in between, the generation stored is the
        // older one, and the next request verifies again.
        let verifier = self.current_verifier();
        let trusted = verifier
            .inner
            .verify_client_cert(&CertificateDer::from(leaf.as_slice()), &intermediates, at)
            .is_ok();
        if trusted {
            peer.recheck_at.store(
                next_check(peer, now, &verifier.crl_next_updates),
                Ordering::Release,
            );
            peer.trusted_under.store(generation, Ordering::Release);
        }
        trusted
    }

    fn current_verifier(&self) -> Arc<Verifier> {
        Arc::clone(&self.verifier.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The server certificate as currently loaded.
#[derive(Debug)]
struct CurrentCert(Arc<TlsState>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.certified.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// The client verifier as currently loaded: required certificates, CRLs when configured.
#[derive(Debug)]
struct CurrentVerifier(Arc<TlsState>);

impl ClientCertVerifier for CurrentVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        *self.0.hints.read().unwrap_or_else(|p| p.into_inner())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current_verifier()
            .inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current_verifier()
            .inner
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current_verifier()
            .inner
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current_verifier().inner.supported_verify_schemes()
    }
}

/// The server's TLS configuration: required client certificates from `client_ca`, checked
/// against the CRLs when given; the state behind it can be reloaded.
pub fn server_config(paths: &TlsPaths<'_>) -> Result<(ServerConfig, Arc<TlsState>), TlsError> {
    let provider = crypto_provider();
    let loaded = load(paths, &provider)?;
    let hints: &'static [DistinguishedName] = Box::leak(
        loaded
            .verifier
            .inner
            .root_hint_subjects()
            .to_vec()
            .into_boxed_slice(),
    );
    let state = Arc::new(TlsState {
        generation: AtomicU64::new(0),
        reloaded_at: Mutex::new(None),
        certified: RwLock::new(loaded.certified),
        verifier: RwLock::new(loaded.verifier),
        hints: RwLock::new(hints),
        deadlines: RwLock::new(loaded.deadlines),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(CurrentVerifier(Arc::clone(&state))))
        .with_cert_resolver(Arc::new(CurrentCert(Arc::clone(&state))));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, state))
}

/// Reads the verified leaf certificate (`chain[0]`; the rest are intermediates).
///
/// Returns `None` for a leaf without the clientAuth extended key usage: webpki accepts a leaf
/// with no EKU at all, but a certificate that does not say it is for client authentication
/// is not given an identity here.
pub fn peer_from_chain(chain: &[CertificateDer<'_>]) -> Option<Peer> {
    let leaf = chain.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    let eku = cert.extended_key_usage().ok()??;
    if !eku.value.client_auth {
        return None;
    }
    let mut peer = Peer {
        subject: cert.subject().to_string(),
        fingerprint: sha256_hex(leaf.as_ref()),
        chain: chain.iter().map(|c| c.as_ref().to_vec()).collect(),
        // The leaf's: other certificates a client sends need not be on the path the
        // verifier built, and an expired spare one must not lock it out.
        not_after: cert.validity().not_after.timestamp(),
        // Every other certificate's, on the path or not: when one expires the chain is
        // verified again, which refuses it only if the path needed that certificate. One that
        // does not parse here is skipped: x509-parser reads more than webpki accepts, so
        // webpki cannot have built the path through it.
        issuers_not_after: chain
            .iter()
            .skip(1)
            .filter_map(|c| X509Certificate::from_der(c.as_ref()).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .collect(),
        ..Peer::default()
    };
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            peer.common_names.push(s.to_owned());
        }
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => peer.uri_sans.push((*u).to_owned()),
                GeneralName::DNSName(d) => peer.dns_sans.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    Some(peer)
}

/// The leaf of a chain the handshake verified but [`peer_from_chain`] gave no identity (no
/// clientAuth extended key usage): its subject, fingerprint and chain only, so a refusal can
/// be audited. It carries no names, so no policy identity can ever match it.
pub fn refused_peer(chain: &[CertificateDer<'_>]) -> Option<Peer> {
    let leaf = chain.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    Some(Peer {
        subject: cert.subject().to_string(),
        fingerprint: sha256_hex(leaf.as_ref()),
        ..Peer::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, ClientSpec};

    /// A reload makes the connections finishing their handshake right after it unchecked, so
    /// a certificate it revoked cannot slip through on a handshake that was checked before it;
    /// the first request checks them under the new configuration.
    /// Warnings start 30 days ahead, count whole days, and go on once past.
    #[test]
    fn deadlines_within_thirty_days_are_reported_with_the_days_left() {
        let day = 86_400;
        let now = 1_800_000_000;
        let deadline = |what: &str, at: i64| Deadline {
            kind: "crl",
            what: what.into(),
            at,
        };
        let list = [
            deadline("far", now + 31 * day),
            deadline("thirty", now + 30 * day),
            deadline("seven", now + 7 * day + 5),
            deadline("hours", now + 3600),
            deadline("past", now - 10),
        ];
        let got: Vec<(String, i64)> = expiring(&list, now)
            .into_iter()
            .map(|(d, days)| (d.what, days))
            .collect();
        assert_eq!(
            got,
            [
                ("thirty".to_owned(), 30),
                ("seven".to_owned(), 7),
                ("hours".to_owned(), 0),
                ("past".to_owned(), -1)
            ]
        );
    }

    #[test]
    fn connections_made_across_a_reload_are_checked_again() {
        let dir = std::env::temp_dir().join(format!("cardvault-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Authority::new("test ca").unwrap();
        let server = ca.server(&["localhost"]).unwrap();
        let client = ca.client(&ClientSpec::named("router")).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (cert, key, client_ca) = (
            file("server.pem", &server.cert_pem),
            file("server.key", &server.key_pem),
            file("ca.pem", &ca.cert_pem()),
        );
        let paths = TlsPaths {
            cert: &cert,
            key: &key,
            client_ca: &client_ca,
            crl: None,
        };
        let (_, state) = server_config(&paths).unwrap();
        assert_eq!(state.generation_for_new_connection(), 0);

        state.reload(&paths).unwrap();
        assert_eq!(state.generation(), 1);
        let stamp = state.generation_for_new_connection();
        assert_eq!(stamp, UNCHECKED);

        let der = vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()];
        let peer = peer_from_chain(&der).unwrap();
        peer.trusted_under.store(stamp, Ordering::SeqCst);
        assert!(state.still_trusted(&peer));
        assert_eq!(peer.trusted_under.load(Ordering::SeqCst), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A chain is verified again at the first of its intermediates' expiries and the loaded
    /// CRLs' nextUpdates; an expired spare certificate the client also sent sets no deadline
    /// (it is not on the path, and must neither lock the client out nor make every request
    /// verify again), and a reload's CRLs replace the deadline.
    #[test]
    fn chains_are_verified_again_at_their_first_deadline() {
        let dir =
            std::env::temp_dir().join(format!("cardvault-tls-deadlines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let at = |seconds: i64| time::OffsetDateTime::from_unix_timestamp(now + seconds).unwrap();
        let root = Authority::new("test ca").unwrap();
        let intermediate = root.intermediate("test intermediate", at(3600)).unwrap();
        let spare = root.intermediate("spare", at(-3600)).unwrap();
        let server = root.server(&["localhost"]).unwrap();
        let client = intermediate.client(&ClientSpec::named("router")).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let crls = |intermediate_next_update: i64| {
            format!(
                "{}{}",
                root.crl_until(&[], at(3 * 3600)).unwrap(),
                intermediate
                    .crl_until(&[], at(intermediate_next_update))
                    .unwrap()
            )
        };
        let (cert, key, client_ca, crl) = (
            file("server.pem", &server.cert_pem),
            file("server.key", &server.key_pem),
            file("ca.pem", &root.cert_pem()),
            file("crl.pem", &crls(2 * 3600)),
        );
        let paths = TlsPaths {
            cert: &cert,
            key: &key,
            client_ca: &client_ca,
            crl: Some(&crl),
        };
        let (_, state) = server_config(&paths).unwrap();

        let mut chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(chain.len(), 2, "leaf and intermediate");
        chain.push(CertificateDer::from_pem_slice(spare.cert_pem().as_bytes()).unwrap());
        let peer = peer_from_chain(&chain).unwrap();
        assert_eq!(peer.issuers_not_after, vec![now + 3600, now - 3600]);

        // Unstamped, the first request verifies the chain and finds the intermediate's expiry
        // first (webpki refuses it from the second after its notAfter).
        assert_eq!(peer.recheck_at.load(Ordering::SeqCst), 0);
        assert!(state.still_trusted(&peer));
        assert_eq!(peer.recheck_at.load(Ordering::SeqCst), now + 3601);
        peer.recheck_at.store(0, Ordering::SeqCst);
        state.stamp(&peer);
        assert_eq!(peer.recheck_at.load(Ordering::SeqCst), now + 3601);

        // A reload whose intermediate CRL expires sooner: the next request verifies again
        // and takes its nextUpdate.
        file("crl.pem", &crls(1800));
        state.reload(&paths).unwrap();
        assert!(state.still_trusted(&peer));
        assert_eq!(peer.trusted_under.load(Ordering::SeqCst), 1);
        assert_eq!(peer.recheck_at.load(Ordering::SeqCst), now + 1800);

        // A deadline at or before the verification is left out, but `stamp` counts the ones
        // that fell during the handshake, which may have checked the chain just before them.
        assert_eq!(next_check(&peer, now, &[now - 2]), now + 3601);
        assert_eq!(next_check(&peer, now - 4, &[now - 2]), now - 2);
        assert_eq!(next_check(&Peer::default(), now, &[]), i64::MAX);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
