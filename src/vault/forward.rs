//! The vault's side of a forward to a PSP: the token's card, a card token used up only once
//! the connection to the PSP is open, and the forward's one audit line.

use crate::audit::{AuditEvent, Forwarded, Outcome};
use crate::policy::{Forward, Grant};
use crate::tokens::{IdKind, ObjectId};

use super::{unix_now, CardDetails, Purpose, Vault, VaultError};

/// A token checked before the connection: a customer token's card is read now (reading it
/// uses nothing up); a card token is only looked at.
pub enum Ready {
    Card(Box<CardDetails>),
    CardToken,
}

impl Vault {
    /// Checks the token before anything is sent: 404 for no such token, 409 for a card token
    /// already used, 410 for one expired. Nothing changes.
    pub async fn forward_check(
        &self,
        grant: &Grant<Forward>,
        token: &ObjectId,
    ) -> Result<Ready, VaultError> {
        let project = grant.project();
        match token.kind() {
            IdKind::CustomerToken => Ok(Ready::Card(Box::new(
                self.detokenize_customer_token(project, token).await?,
            ))),
            IdKind::Card => {
                let record = self
                    .store
                    .card(project.as_str(), token.as_str())
                    .await?
                    .ok_or(VaultError::NotFound)?;
                if record.used_at.is_some() {
                    return Err(VaultError::TokenUsed);
                }
                if record.expires_at <= unix_now() || record.pan.is_none() {
                    return Err(VaultError::TokenExpired);
                }
                Ok(Ready::CardToken)
            }
            IdKind::Customer => Err(VaultError::NotFound),
        }
    }

    /// Uses a card token up, as detokenization does (one compare-and-swap, durable before the
    /// card leaves), and opens it: called with the connection to the PSP open.
    pub async fn forward_use(
        &self,
        grant: &Grant<Forward>,
        token: &ObjectId,
    ) -> Result<CardDetails, VaultError> {
        self.detokenize_card(grant.project(), token).await
    }

    /// The forward's audit line, success or failure; returns once it is written.
    pub async fn audit_forward(
        &self,
        grant: &Grant<Forward>,
        token: Option<&str>,
        purpose: &Purpose,
        forwarded: &Forwarded,
        failure: Option<&'static str>,
    ) -> Result<(), VaultError> {
        let event = AuditEvent {
            action: "card.forward",
            outcome: if failure.is_none() {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            actor: grant.actor(),
            project: grant.project().as_str(),
            object: token,
            code: failure,
            reason: purpose.reason.as_deref(),
            reference: purpose.reference.as_deref(),
            forward: Some(forwarded),
            bulk: None,
        };
        self.audit.record(&event)?.wait().await?;
        Ok(())
    }
}
