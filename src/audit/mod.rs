//! Audit events: who touched which object, when, with what outcome. Never card data or keys.
//!
//! The vault reports every security-relevant action, success or failure, through
//! [`AuditSink`]. The daemon's sink is the chained audit file ([`file::FileSink`]); every
//! event also goes to the structured log. Fail closed: before an action the vault asks the
//! sink whether it can write ([`AuditSink::ready`]) and refuses the request (503
//! `audit_unavailable`) when it cannot, so an unrecordable action does not happen. If the
//! write after the action fails anyway, the caller still gets 503 and no card data.

pub mod file;

use std::fmt;
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        })
    }
}

/// Who acted: the policy identity, the certificate it was matched from, and where the
/// connection came from. Empty strings for the daemon itself.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub identity: &'a str,
    pub subject: &'a str,
    /// SHA-256 of the client certificate (DER), hex.
    pub fingerprint: &'a str,
    pub address: Option<SocketAddr>,
}

impl Actor<'static> {
    /// The daemon itself (startup, shutdown, background key operations).
    pub fn system() -> Actor<'static> {
        Actor {
            identity: "cardvault",
            subject: "",
            fingerprint: "",
            address: None,
        }
    }
}

impl<'a> Actor<'a> {
    pub fn of(identity: &'a str, peer: &'a crate::policy::Peer) -> Actor<'a> {
        Actor {
            identity,
            subject: &peer.subject,
            fingerprint: &peer.fingerprint,
            address: peer.address,
        }
    }
}

/// One audited action. Every field is safe to persist: ids, names and codes only.
#[derive(Debug, Clone, Copy)]
pub struct AuditEvent<'a> {
    pub action: &'static str,
    pub outcome: Outcome,
    pub actor: Actor<'a>,
    pub project: &'a str,
    pub object: Option<&'a str>,
    /// The error code on failure.
    pub code: Option<&'static str>,
    pub reason: Option<&'a str>,
    pub reference: Option<&'a str>,
    /// What a forward to a PSP did.
    pub forward: Option<&'a Forwarded>,
    /// The counts of an import or an export.
    pub bulk: Option<&'a crate::vault::Bulk>,
}

/// A forward's line: where it went and what came back; never a body or a header's value.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Forwarded {
    pub receiver: String,
    pub method: String,
    /// Without the query.
    pub path: String,
    /// The PSP's status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Request body bytes sent, response body bytes received.
    pub sent: u64,
    pub received: u64,
    pub ms: u64,
    /// Whether this forward used a card token up.
    pub token_used: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("audit sink unavailable: {0}")]
pub struct AuditError(pub String);

/// A recorded event on its way to the log: await it before acting on the outcome or replying.
#[must_use = "an audit line is not written until its ticket resolves"]
pub struct AuditTicket(Option<tokio::sync::watch::Receiver<Option<Result<(), String>>>>);

impl AuditTicket {
    /// Already written (or nothing to wait for).
    pub fn written() -> AuditTicket {
        AuditTicket(None)
    }

    fn pending(rx: tokio::sync::watch::Receiver<Option<Result<(), String>>>) -> AuditTicket {
        AuditTicket(Some(rx))
    }

    /// Resolves once the line is in the log file, or could not be written.
    pub async fn wait(self) -> Result<(), AuditError> {
        let Some(mut rx) = self.0 else {
            return Ok(());
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| AuditError("the audit writer stopped".into()))?
            .clone();
        outcome.unwrap_or(Ok(())).map_err(AuditError)
    }

    /// [`AuditTicket::wait`], blocking the thread: for rare events (start, stop, reload, key
    /// operations, refusals). Unconstrained: on a runtime worker, tokio's cooperative budget
    /// could otherwise make the wait yield to a scheduler this thread never returns to.
    pub fn wait_blocking(self) -> Result<(), AuditError> {
        block_on(tokio::task::unconstrained(self.wait()))
    }
}

/// Runs a future to completion on this thread (parks between polls).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

pub trait AuditSink: Send + Sync {
    /// Makes the event's line and hands it to the writer; await the ticket before replying.
    fn record(&self, event: &AuditEvent<'_>) -> Result<AuditTicket, AuditError>;

    /// Whether an event could be written now; checked before an action.
    fn ready(&self) -> Result<(), AuditError> {
        Ok(())
    }

    /// Called every second: sync to disk, notice a rotated or repaired file.
    fn maintain(&self) {}

    /// Whether the trail cannot recover by itself (its writer is gone): only a restart helps.
    fn needs_restart(&self) -> bool {
        false
    }
}

/// Writes audit events into the daemon's structured log.
pub struct LogSink;

impl AuditSink for LogSink {
    fn record(&self, e: &AuditEvent<'_>) -> Result<AuditTicket, AuditError> {
        tracing::info!(
            target: "audit",
            action = e.action,
            outcome = %e.outcome,
            identity = e.actor.identity,
            subject = e.actor.subject,
            fingerprint = e.actor.fingerprint,
            peer = e.actor.address.map(|a| a.to_string()),
            project = e.project,
            object = e.object,
            code = e.code,
            reason = e.reason,
            reference = e.reference,
            receiver = e.forward.map(|f| f.receiver.as_str()),
            psp_status = e.forward.and_then(|f| f.status),
            "audit"
        );
        Ok(AuditTicket::written())
    }
}

/// The file, and the log beside it.
pub struct FileAndLog(pub file::FileSink);

impl AuditSink for FileAndLog {
    fn record(&self, e: &AuditEvent<'_>) -> Result<AuditTicket, AuditError> {
        let ticket = self.0.record(e)?;
        let _ = LogSink.record(e)?;
        Ok(ticket)
    }

    fn ready(&self) -> Result<(), AuditError> {
        self.0.ready()
    }

    fn maintain(&self) {
        self.0.maintain();
    }

    fn needs_restart(&self) -> bool {
        self.0.needs_restart()
    }
}
