//! Failed TLS handshakes: one log line each, naming the peer's address and why it failed, at
//! most [`LINES_PER_SECOND`] a second so that a scan cannot flood the log (the lines held back
//! are counted, and the count is logged with the next line let through).
//!
//! A failed handshake never reaches HTTP, so it is not an audit line (no identity was
//! established); the log is where an operator sees scans, expired or revoked certificates and
//! clients from another CA (PCI DSS 10.2.1.4, invalid access attempts).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustls::{CertificateError, Error as TlsError};

/// Lines logged in any one second; the rest are counted.
pub const LINES_PER_SECOND: u32 = 20;

/// Why a handshake failed, in words an operator can act on.
pub fn reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    else {
        return match error.kind() {
            std::io::ErrorKind::TimedOut => "handshake timed out",
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => "connection closed during the handshake",
            _ => "i/o error during the handshake",
        };
    };
    match tls {
        TlsError::NoCertificatesPresented => "no client certificate",
        TlsError::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "client certificate from an unknown CA",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "client certificate expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "client certificate not yet valid"
            }
            CertificateError::Revoked => "client certificate revoked",
            CertificateError::UnknownRevocationStatus => "client certificate revocation unknown",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "CRL past its next update",
            _ => "invalid client certificate",
        },
        TlsError::PeerIncompatible(_) => "bad protocol: no common version, suite or group",
        TlsError::InvalidMessage(_)
        | TlsError::InappropriateMessage { .. }
        | TlsError::InappropriateHandshakeMessage { .. }
        | TlsError::PeerMisbehaved(_) => "bad protocol",
        TlsError::AlertReceived(_) => "the client aborted the handshake",
        _ => "handshake refused",
    }
}

/// The rate limit's state: lines logged in the current one-second window, and lines held
/// back since the last one logged.
struct Window {
    started: Instant,
    logged: u32,
    held_back: u64,
}

/// Logs failed handshakes, rate-limited. One per listener, shared by its workers.
pub struct HandshakeLog {
    window: Mutex<Window>,
}

impl Default for HandshakeLog {
    fn default() -> Self {
        HandshakeLog {
            window: Mutex::new(Window {
                started: Instant::now(),
                logged: 0,
                held_back: 0,
            }),
        }
    }
}

impl HandshakeLog {
    /// Logs one failed handshake (a warning), unless this second's allowance is spent.
    pub fn failed(&self, peer: Option<SocketAddr>, error: &std::io::Error) {
        let Some(held_back) = self.admit(Instant::now()) else {
            return;
        };
        let peer = peer.map_or_else(|| "-".to_owned(), |p| p.to_string());
        tracing::warn!(
            peer = %peer,
            reason = reason(error),
            detail = %error,
            held_back,
            "TLS handshake failed"
        );
    }

    /// `Some(lines held back before this one)` if a line may be logged at `now`.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(w.started) >= Duration::from_secs(1) {
            w.started = now;
            w.logged = 0;
        }
        if w.logged >= LINES_PER_SECOND {
            w.held_back = w.held_back.saturating_add(1);
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_error(e: TlsError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn reasons_table() {
        let cases = [
            (
                tls_error(TlsError::NoCertificatesPresented),
                "no client certificate",
            ),
            (
                tls_error(TlsError::InvalidCertificate(CertificateError::Revoked)),
                "client certificate revoked",
            ),
            (
                tls_error(TlsError::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                )),
                "client certificate from an unknown CA",
            ),
            (
                tls_error(TlsError::InvalidCertificate(CertificateError::Expired)),
                "client certificate expired",
            ),
            (
                tls_error(TlsError::PeerIncompatible(
                    rustls::PeerIncompatible::Tls12NotOffered,
                )),
                "bad protocol: no common version, suite or group",
            ),
            (
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                "connection closed during the handshake",
            ),
            (
                std::io::Error::from(std::io::ErrorKind::TimedOut),
                "handshake timed out",
            ),
        ];
        for (error, want) in cases {
            assert_eq!(reason(&error), want, "{error}");
        }
    }

    /// A burst beyond the allowance is held back and counted, and the count rides on the
    /// next line let through in a later second.
    #[test]
    fn a_flood_is_cut_to_the_allowance_and_counted() {
        let log = HandshakeLog::default();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| log.admit(t0).is_some()).count();
        assert_eq!(admitted, LINES_PER_SECOND as usize);
        assert_eq!(log.admit(t0 + Duration::from_millis(999)), None);
        assert_eq!(
            log.admit(t0 + Duration::from_secs(1)),
            Some(100 - u64::from(LINES_PER_SECOND) + 1)
        );
        assert_eq!(log.admit(t0 + Duration::from_secs(1)), Some(0));
    }
}
