//! `Idempotency-Key`: the same key with the same request gets the first response again for
//! 24 hours; with another request it is a conflict.
//!
//! A key is scoped to (project, caller identity). The first request claims it with a
//! compare-and-swap, so a replay racing the original finds the claim and is told to retry
//! (409 `idempotency_in_progress`) instead of creating a second object. The request is
//! identified by an HMAC of method, path and body under the project's fingerprint key (the
//! body may hold a PAN, so never a plain hash). The stored response is sealed like any record:
//! it holds card metadata and contact details.
//!
//! A claim whose request died with the process is taken over after [`ABANDONED_AFTER`].

use zeroize::Zeroizing;

use super::{open, seal, unix_now, Blob, Vault, VaultError};
use crate::crypto::aad;
use crate::policy::{Grant, Requires};
use crate::store::{idempotency_key, IdempotencyRecord, StoredResponse};
use crate::tokens::Project;

/// How long a key is remembered.
pub const RETENTION_SECS: i64 = 24 * 3600;
/// How long a claim without a response blocks the key before it counts as abandoned.
pub const ABANDONED_AFTER: i64 = 60;

pub enum Begin {
    /// First use of the key: run the request, then [`Vault::idempotency_finish`].
    Proceed(Claim),
    /// The key was used with this request before: here is the first response.
    Replay {
        status: u16,
        body: Zeroizing<Vec<u8>>,
    },
    /// The key was used with another request.
    Conflict,
    /// The first request with this key is still running.
    InProgress,
}

/// A claimed key, to be finished or abandoned.
pub struct Claim {
    key: Vec<u8>,
    project: Project,
    record: IdempotencyRecord,
}

impl Vault {
    pub fn idempotency_begin<P: Requires>(
        &self,
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
        let digest = keys
            .fingerprint
            .fingerprint(&aad(&[
                b"cardvault/idempotency/v1",
                method.as_bytes(),
                path.as_bytes(),
                body,
            ]))
            .into_bytes();
        let k = idempotency_key(project.as_str(), grant.identity(), key);
        loop {
            let now = unix_now();
            let current = self.store.idempotency(&k)?;
            let claimable = match &current {
                None => true,
                Some(rec) if rec.created_at + RETENTION_SECS <= now => true,
                Some(rec) if rec.request_digest != digest => return Ok(Begin::Conflict),
                Some(rec) => match &rec.response {
                    Some(response) => {
                        let id = scope_id(&k)?;
                        let body = open(
                            &keys,
                            Blob::IdempotentResponse,
                            project,
                            id,
                            response.key_version,
                            &response.body,
                        )?;
                        return Ok(Begin::Replay {
                            status: response.status,
                            body,
                        });
                    }
                    None if now - rec.created_at > ABANDONED_AFTER => true,
                    None => return Ok(Begin::InProgress),
                },
            };
            if claimable {
                let claim = IdempotencyRecord {
                    created_at: now,
                    request_digest: digest.clone(),
                    response: None,
                };
                // Not awaited: a claim lost in a crash only means the retry runs again.
                if let Some(_ticket) =
                    self.store
                        .swap_idempotency(&k, current.as_ref(), Some(&claim))?
                {
                    return Ok(Begin::Proceed(Claim {
                        key: k,
                        project: project.clone(),
                        record: claim,
                    }));
                }
            }
        }
    }

    /// Records the response of a claimed request, durably, before it is sent.
    pub async fn idempotency_finish(
        &self,
        claim: Claim,
        status: u16,
        body: &[u8],
    ) -> Result<(), VaultError> {
        let keys = self
            .project_keys(&claim.project, true)?
            .ok_or(VaultError::NotFound)?;
        let id = scope_id(&claim.key)?;
        let done = IdempotencyRecord {
            response: Some(StoredResponse {
                status,
                key_version: keys.dek_version,
                body: seal(&keys, Blob::IdempotentResponse, &claim.project, id, body)?,
            }),
            ..claim.record.clone()
        };
        // A claim taken over as abandoned belongs to the newer request now: leave it.
        if let Some(ticket) =
            self.store
                .swap_idempotency(&claim.key, Some(&claim.record), Some(&done))?
        {
            self.store.durable(ticket).await?;
        }
        Ok(())
    }

    /// Releases a claim whose request failed on the server's side, so a retry can run.
    pub fn idempotency_abandon(&self, claim: Claim) {
        if let Err(e) = self
            .store
            .swap_idempotency(&claim.key, Some(&claim.record), None)
        {
            tracing::warn!(error = %e, "could not release an idempotency claim; it expires by itself");
        }
    }

    /// Forgets keys past their retention.
    pub(super) fn sweep_idempotency(&self, now: i64) -> Result<usize, crate::store::StoreError> {
        let mut removed = 0;
        for item in self.store.idempotency_records() {
            let (k, rec) = item?;
            if rec.created_at + RETENTION_SECS <= now
                && self.store.swap_idempotency(&k, Some(&rec), None)?.is_some()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The record's key as a string, to bind the sealed response to it. Project, identity and
/// key are validated printable ASCII, so this cannot fail for keys made here.
fn scope_id(key: &[u8]) -> Result<&str, VaultError> {
    std::str::from_utf8(key).map_err(|_| VaultError::Integrity("idempotency record".into()))
}
