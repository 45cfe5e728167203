//! Audit events: who touched which object, when, with what outcome. Never card data or keys.
//!
//! The vault reports every security-relevant action, success or failure, through
//! [`AuditSink`], after the action. The sink here writes structured `tracing` events under the
//! `audit` target. A sink may fail; the caller then gets 503 `audit_unavailable`, but the
//! action has already happened (for a card token: it is used up and its card withheld).
//! Writing the event ahead of the action, so that an unrecordable action never happens, comes
//! with the tamper-evident audit file.

use std::fmt;

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

/// One audited action. Every field is safe to persist: ids, names and codes only.
#[derive(Debug, Clone, Copy)]
pub struct AuditEvent<'a> {
    pub action: &'static str,
    pub outcome: Outcome,
    /// The policy identity that acted.
    pub identity: &'a str,
    pub project: &'a str,
    pub object: Option<&'a str>,
    /// The error code on failure.
    pub code: Option<&'static str>,
    pub reason: Option<&'a str>,
    pub reference: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
#[error("audit sink unavailable: {0}")]
pub struct AuditError(pub String);

pub trait AuditSink: Send + Sync {
    fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError>;
}

/// Writes audit events into the daemon's structured log.
pub struct LogSink;

impl AuditSink for LogSink {
    fn record(&self, e: &AuditEvent<'_>) -> Result<(), AuditError> {
        tracing::info!(
            target: "audit",
            action = e.action,
            outcome = %e.outcome,
            identity = e.identity,
            project = e.project,
            object = e.object,
            code = e.code,
            reason = e.reason,
            reference = e.reference,
            "audit"
        );
        Ok(())
    }
}
