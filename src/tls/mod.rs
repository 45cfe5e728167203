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

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::crypto::sha256_hex;
use crate::policy::Peer;

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

/// The server's TLS configuration: required client certificates from `client_ca`.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    for ca in load_certs(client_ca)? {
        roots.add(ca).map_err(|e| file_err(client_ca, e))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| file_err(key, e))?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
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
