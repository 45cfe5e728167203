//! `Idempotency-Key`: the same key with the same request gets the first outcome again for
//! 24 hours; with another request it is a conflict.
//!
//! A key is scoped to (project, caller identity) and stored under an HMAC of both, so a
//! caller-chosen key never reaches disk. The first request claims it with a compare-and-swap;
//! a replay racing the original finds the claim and is told to retry (409
//! `idempotency_in_progress`) instead of creating a second object. The request is identified
//! by an HMAC of method, path and body under the project's fingerprint key (the body may hold
//! a PAN, so never a plain hash).
//!
//! What is kept is not the response body: a success is kept as the id of the object it made,
//! and the API rebuilds the reply from the live object; an error is kept as its fixed-text
//! body. So no card metadata or contact detail is copied here, and a deleted customer is not
//! resurrected by a replay.
//!
//! A claim belongs to the process that made it ([`Vault::boot_id`]), in the current opening of
//! the store (see `Store::generation`); on a shared store, to the node that made it, and
//! another node takes it over only once that node is gone (its lease ran out). Once a request has claimed its key, the API runs it to
//! the end in a task of its own, so a client that goes away does not cut it short (a shutdown
//! still does: a task running when the workers stop is dropped). If it fails
//! with a server error, or its outcome cannot be written, [`Claim`]'s `Drop` releases the key;
//! a claim left by a process that died is taken over by the next request with the key. A
//! request that committed its object and then failed (its audit line could not be written:
//! [`VaultError::Unaudited`]) is not a failure here: the API finishes its claim with the
//! object, as a success, so the retry gets that object instead of making a second one. One
//! gap remains: if the process dies after the object is committed and before the outcome is
//! recorded, a retry makes a second object.

use std::sync::Arc;

use super::{unix_now, Vault, VaultError};
use crate::policy::{Grant, Requires};
use crate::store::{IdempotencyRecord, StoredResponse};
use crate::tokens::Project;

/// How long a key is remembered.
pub const RETENTION_SECS: i64 = 24 * 3600;

pub enum Begin {
    /// First use of the key: run the request, then [`Claim::finish`].
    Proceed(Claim),
    /// The key was used with this request before: its status and stored body.
    Replay { status: u16, body: Vec<u8> },
    /// The key was used with another request.
    Conflict,
    /// The first request with this key is still running.
    InProgress,
}

/// A claimed key. Finish it with the outcome; dropping it unfinished releases the key so a
/// retry can run.
pub struct Claim {
    vault: Arc<Vault>,
    project: Project,
    scope: String,
    record: IdempotencyRecord,
    finished: bool,
}

impl Vault {
    pub async fn idempotency_begin<P: Requires>(
        self: &Arc<Self>,
        grant: &Grant<P>,
        key: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Begin, VaultError> {
        let project = grant.project();
        let keys = self
            .project_keys(project, true)?
            .ok_or(VaultError::NotFound)?;
        // The body holds card data: hashed in place, never copied into a plain buffer.
        let digest = keys
            .fingerprint
            .fingerprint_parts(&[
                b"cardvault/idempotency/v1",
                method.as_bytes(),
                path.as_bytes(),
                body,
            ])
            .into_bytes();
        let scope = keys.fingerprint.fingerprint_parts(&[
            b"cardvault/idempotency-scope/v1",
            grant.identity().as_bytes(),
            key.as_bytes(),
        ]);
        let p = project.as_str();
        loop {
            let now = unix_now();
            let current = self.store.idempotency(p, &scope).await?;
            let claimable = match &current {
                None => true,
                Some(rec) if rec.created_at + RETENTION_SECS <= now => true,
                Some(rec) if rec.request_digest != digest => return Ok(Begin::Conflict),
                Some(rec) => match &rec.response {
                    Some(response) => {
                        return Ok(Begin::Replay {
                            status: response.status,
                            body: response.body.clone(),
                        })
                    }
                    None if rec.owner == self.claim_owner() => return Ok(Begin::InProgress),
                    // Another node's, still running: its request may yet finish.
                    None if self.store.node_alive(rec.owner).await? => {
                        return Ok(Begin::InProgress)
                    }
                    // Left by a process that died before answering.
                    None => true,
                },
            };
            if claimable {
                let claim = IdempotencyRecord {
                    created_at: now,
                    request_digest: digest.clone(),
                    owner: self.claim_owner(),
                    response: None,
                };
                // Not awaited: a claim lost in a crash only means the retry runs again.
                if let Some(_ticket) = self
                    .store
                    .swap_idempotency(p, &scope, current.as_ref(), Some(&claim))
                    .await?
                {
                    return Ok(Begin::Proceed(Claim {
                        vault: Arc::clone(self),
                        project: project.clone(),
                        scope,
                        record: claim,
                        finished: false,
                    }));
                }
            }
        }
    }

    /// Who owns the claims made now: this process, in this opening of the store. A claim
    /// left by an earlier opening (the store was reopened after a write failure, and the
    /// request that made it could not release it) is taken over like one left by a crash.
    fn claim_owner(&self) -> u64 {
        match self.store.node_id() {
            // Shared store: the node's id in its `nodes` table, so other nodes can tell a
            // live node's claim from a dead one's.
            Some(node) => node,
            None => self.boot_id.wrapping_add(self.store.generation()),
        }
    }

    /// Forgets keys past their retention.
    pub(super) fn sweep_idempotency(&self, now: i64) -> Result<usize, crate::store::StoreError> {
        self.store.remove_idempotency_before(now - RETENTION_SECS)
    }
}

impl Claim {
    /// Records the outcome, durably, before the reply is sent. `body` is what a replay will
    /// get back: for a success the API's rebuild descriptor, for an error its body.
    pub async fn finish(mut self, status: u16, body: Vec<u8>) -> Result<(), VaultError> {
        let done = IdempotencyRecord {
            response: Some(StoredResponse { status, body }),
            ..self.record.clone()
        };
        let store = &self.vault.store;
        // Not finished until the outcome is written: if the write fails, dropping the claim
        // releases the key instead of leaving it in progress for a day.
        let ticket = store
            .swap_idempotency(
                self.project.as_str(),
                &self.scope,
                Some(&self.record),
                Some(&done),
            )
            .await?;
        self.finished = true;
        if let Some(ticket) = ticket {
            store.durable(ticket).await?;
        }
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let (vault, project, scope, record) = (
            Arc::clone(&self.vault),
            self.project.clone(),
            std::mem::take(&mut self.scope),
            self.record.clone(),
        );
        self.vault.store.detach(async move {
            let released = vault
                .store
                .swap_idempotency(project.as_str(), &scope, Some(&record), None)
                .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "could not release an idempotency claim; it expires by itself");
            }
        });
    }
}
