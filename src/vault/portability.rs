//! Card portability in the vault: the OpenPGP import keys (sealed by the root key, beside the
//! wrapped DEKs), cards imported as customers and customer tokens, and export requests under
//! dual control.
//!
//! An imported customer's id is derived from its `customer_ref` with the project's
//! fingerprint key (an HMAC), so a second import of the same file finds it without an index
//! and without the reference being readable from the id; a row without a reference is keyed
//! by its card. Its token is deduplicated by card within the customer, as attach does for
//! callers that see fingerprints.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::customers::{
    new_customer, new_token, open_profile, open_token_meta, TokenMeta, MAX_TOKENS_PER_CUSTOMER,
};
use super::{open, unix_now, Blob, CardMeta, ProjectKeys, Vault, VaultError};
use crate::audit::{AuditEvent, Outcome};
use crate::crypto::aad;
use crate::policy::{Export, Grant, Import};
use crate::portability::openpgp::{self, Algorithm, ImportKey};
use crate::portability::rows::ImportRow;
use crate::store::{Batch, CustomerRecord, TokenRef};
use crate::tokens::{IdKind, ObjectId, Project};

/// The "project" under which the import keys and export requests sit among the wrapped keys:
/// not a valid project name, so never a project's.
const SPACE: &str = "_portability";
const KEY_PREFIX: &str = "import-key/";
const EXPORT_PREFIX: &str = "export/";
/// How long an export request may be approved and fetched.
pub const EXPORT_TTL_SECS: i64 = 24 * 3600;
/// The most customers one export request may list.
pub const MAX_EXPORT_CUSTOMERS: usize = 100_000;
const MAX_ATTEMPTS: usize = 16;

/// Counts for the one audit line of an import or an export.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bulk {
    /// The import key the file was encrypted to, or the export's recipient key.
    pub key: String,
    /// The key an imported file's signature was checked against, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signer: Option<String>,
    pub rows: u64,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub created: u64,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub duplicate: u64,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub failed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An import key as listed: never its secret part.
#[derive(Debug, Clone, Serialize)]
pub struct ImportKeyInfo {
    pub fingerprint: String,
    pub algorithm: &'static str,
    pub created_at: i64,
    pub public_key: String,
}

/// What importing one row did.
#[derive(Debug, Clone)]
pub struct Imported {
    pub customer: String,
    pub token: String,
    pub duplicate: bool,
}

/// An export request as kept (sealed by the root key).
#[derive(Clone, Serialize, Deserialize)]
struct ExportRequest {
    project: String,
    requested_by: String,
    requested_at: i64,
    recipient: String,
    recipient_fingerprint: String,
    customers: Option<Vec<String>>,
    approved_by: Option<String>,
    approved_at: Option<i64>,
}

redacted_debug!(ExportRequest);

/// What an approved export hands to the thread that writes it.
pub struct ExportPlan {
    pub id: String,
    pub project: Project,
    pub recipient: pgp::composed::SignedPublicKey,
    pub recipient_fingerprint: String,
    customers: Option<Vec<String>>,
}

redacted_debug!(ExportPlan);

fn key_aad(fingerprint: &str) -> Vec<u8> {
    aad(&[b"cardvault/import-key/v1", fingerprint.as_bytes()])
}

fn export_aad(id: &str) -> Vec<u8> {
    aad(&[b"cardvault/export/v1", id.as_bytes()])
}

fn refused(code: &'static str, message: &'static str) -> VaultError {
    VaultError::Refused { code, message }
}

impl Vault {
    fn root_sealer(&self) -> Result<Arc<crate::crypto::Kek>, VaultError> {
        self.keyring.root().ok_or(VaultError::Sealed)
    }

    /// Every import key, newest first, opened.
    pub fn import_keys(&self) -> Result<Vec<ImportKey>, VaultError> {
        let root = self.root_sealer()?;
        let mut keys = Vec::new();
        for (space, name, sealed) in self.store.wrapped_keys()? {
            let Some(fingerprint) = name.strip_prefix(KEY_PREFIX).filter(|_| space == SPACE) else {
                continue;
            };
            let bytes = root
                .open(&key_aad(fingerprint), &sealed)
                .map_err(|_| VaultError::Integrity(name.clone()))?;
            keys.push(ImportKey::from_bytes(&bytes).map_err(|_| VaultError::Integrity(name))?);
        }
        keys.sort_by_key(|k| std::cmp::Reverse(k.created_at()));
        Ok(keys)
    }

    fn key_info(key: &ImportKey) -> Result<ImportKeyInfo, VaultError> {
        Ok(ImportKeyInfo {
            fingerprint: key.fingerprint(),
            algorithm: key.algorithm().as_str(),
            created_at: key.created_at(),
            public_key: key
                .public_armored()
                .map_err(|_| VaultError::Integrity("import key".into()))?,
        })
    }

    /// The current import key, made first if there is none or `rotate` asks for a new one
    /// (older keys stay, for files already encrypted to them). `true` when one was made.
    /// Audited as `import.key` (made) on the default project's trail.
    pub fn import_key(
        &self,
        grant: &Grant<Import>,
        algorithm: Algorithm,
        rotate: bool,
    ) -> Result<(ImportKeyInfo, Vec<ImportKeyInfo>, bool), VaultError> {
        let result = self.import_key_inner(algorithm, rotate);
        if let Ok((info, _, true)) = &result {
            self.audit_bulk(
                grant.actor(),
                grant.project(),
                "import.key_created",
                None,
                Some(&info.fingerprint),
                None,
            )?
            .wait_blocking()?;
        }
        result
    }

    fn import_key_inner(
        &self,
        algorithm: Algorithm,
        rotate: bool,
    ) -> Result<(ImportKeyInfo, Vec<ImportKeyInfo>, bool), VaultError> {
        let existing = self.import_keys()?;
        if let Some(current) = existing.first().filter(|_| !rotate) {
            let all = existing
                .iter()
                .map(Self::key_info)
                .collect::<Result<_, _>>()?;
            return Ok((Self::key_info(current)?, all, false));
        }
        let key = ImportKey::generate(algorithm, "cardvault import key")
            .map_err(|_| refused("key_generation_failed", "key generation failed"))?;
        let fingerprint = key.fingerprint();
        let root = self.root_sealer()?;
        let sealed = root
            .seal(
                &key_aad(&fingerprint),
                &key.to_bytes()
                    .map_err(|_| refused("key_generation_failed", "key generation failed"))?,
            )
            .map_err(VaultError::Keys)?;
        self.store
            .insert_wrapped_key(SPACE, &format!("{KEY_PREFIX}{fingerprint}"), &sealed)?;
        self.store.flush()?;
        let mut all = vec![Self::key_info(&key)?];
        for k in &existing {
            all.push(Self::key_info(k)?);
        }
        Ok((Self::key_info(&key)?, all, true))
    }

    /// Removes an import key: files encrypted to it can no longer be read.
    pub fn remove_import_key(
        &self,
        grant: &Grant<Import>,
        fingerprint: &str,
    ) -> Result<(), VaultError> {
        let name = format!("{KEY_PREFIX}{fingerprint}");
        let result = match self.store.wrapped_key(SPACE, &name)? {
            None => Err(VaultError::NotFound),
            Some(_) => {
                self.store.remove_wrapped_key(SPACE, &name)?;
                self.store.flush().map_err(VaultError::from)
            }
        };
        self.audit_bulk(
            grant.actor(),
            grant.project(),
            "import.key_removed",
            result.as_ref().err().map(VaultError::code),
            Some(fingerprint),
            None,
        )?
        .wait_blocking()?;
        result
    }

    /// The id an imported customer gets: from its reference, or (without one) from its card.
    fn imported_customer_id(
        keys: &ProjectKeys,
        row: &ImportRow,
        card_fingerprint: &str,
    ) -> Result<ObjectId, VaultError> {
        let seed = match &row.customer_ref {
            Some(r) => keys
                .fingerprint
                .fingerprint_parts(&[b"cardvault/import/customer_ref", r.as_bytes()]),
            None => keys
                .fingerprint
                .fingerprint_parts(&[b"cardvault/import/card", card_fingerprint.as_bytes()]),
        };
        ObjectId::derived(IdKind::Customer, seed.as_bytes()).map_err(VaultError::from)
    }

    /// Imports rows: for each, its customer (made unless the reference's is there) and a
    /// customer token for its card (unless the customer holds that card already), all in one
    /// transaction, durable when it returns. Rows of one customer in one call are applied in
    /// order. The outer error stops the import (the store failed); a row's own error (a
    /// customer full of cards) is its outcome.
    pub async fn import_cards(
        &self,
        grant: &Grant<Import>,
        rows: &[&ImportRow],
    ) -> Result<Vec<Result<Imported, VaultError>>, VaultError> {
        struct Touched {
            id: String,
            stored: Option<CustomerRecord>,
            working: CustomerRecord,
            changed: bool,
        }
        let project = grant.project();
        let p = project.as_str();
        let keys = self
            .project_keys(project, true)?
            .ok_or(VaultError::NotFound)?;
        let mut prepared = Vec::with_capacity(rows.len());
        for row in rows {
            let fingerprint = keys
                .fingerprint
                .fingerprint(row.pan.expose_digits().as_bytes());
            let customer = Self::imported_customer_id(&keys, row, &fingerprint)?;
            prepared.push((fingerprint, customer));
        }
        for _ in 0..MAX_ATTEMPTS {
            let now = unix_now();
            let mut batch = Batch::default();
            let mut touched: Vec<Touched> = Vec::new();
            let mut index: std::collections::HashMap<&str, usize> =
                std::collections::HashMap::new();
            let mut outcomes = Vec::with_capacity(rows.len());
            for (row, (fingerprint, customer)) in rows.iter().zip(&prepared) {
                let cust = customer.as_str();
                let slot = match index.get(cust) {
                    Some(i) => *i,
                    None => {
                        let stored = self.store.customer(p, cust).await?;
                        let working = match &stored {
                            Some(rec) => rec.clone(),
                            None => new_customer(&keys, project, cust, &row.profile, now)?,
                        };
                        touched.push(Touched {
                            id: cust.to_owned(),
                            stored,
                            working,
                            changed: false,
                        });
                        index.insert(cust, touched.len() - 1);
                        touched.len() - 1
                    }
                };
                let entry = touched
                    .get_mut(slot)
                    .ok_or_else(|| VaultError::Integrity(cust.to_owned()))?;
                if let Some(token) = entry
                    .working
                    .tokens
                    .iter()
                    .find(|t| t.fingerprint == *fingerprint)
                {
                    outcomes.push(Ok(Imported {
                        customer: cust.to_owned(),
                        token: token.id.clone(),
                        duplicate: true,
                    }));
                    continue;
                }
                if entry.working.tokens.len() >= MAX_TOKENS_PER_CUSTOMER {
                    outcomes.push(Err(VaultError::TooManyTokens));
                    continue;
                }
                let token = ObjectId::generate(IdKind::CustomerToken)?;
                let tid = token.as_str();
                let meta = TokenMeta {
                    card: CardMeta::of(
                        &row.pan,
                        &row.expiry,
                        row.holder_name.as_ref(),
                        fingerprint.clone(),
                    ),
                    recurring: row.recurring.clone(),
                };
                let digits = row.pan.expose_digits().as_bytes();
                let token_rec = new_token(&keys, project, tid, cust, &meta, digits, now)?;
                batch.expect_no_token(p, tid).put_token(p, tid, &token_rec);
                entry.working.tokens.push(TokenRef {
                    id: tid.to_owned(),
                    fingerprint: fingerprint.clone(),
                });
                if entry.stored.is_some() {
                    entry.working.updated_at = now;
                }
                entry.changed = true;
                outcomes.push(Ok(Imported {
                    customer: cust.to_owned(),
                    token: tid.to_owned(),
                    duplicate: false,
                }));
            }
            let mut writes = false;
            for entry in touched.iter().filter(|t| t.changed) {
                match &entry.stored {
                    Some(stored) => batch.expect_customer(p, &entry.id, stored),
                    None => batch.expect_no_customer(p, &entry.id),
                };
                batch.put_customer(p, &entry.id, &entry.working);
                writes = true;
            }
            if !writes {
                return Ok(outcomes);
            }
            if let Some(ticket) = self.store.commit(&batch).await? {
                self.store.durable(ticket).await?;
                return Ok(outcomes);
            }
        }
        Err(VaultError::Contention)
    }

    /// The one audit line of an import, export step or key change, with its counts: await
    /// its ticket (`wait_blocking` off the runtime, `wait` on it) before acting on it.
    pub fn audit_bulk(
        &self,
        actor: crate::audit::Actor<'_>,
        project: &Project,
        action: &'static str,
        code: Option<&'static str>,
        object: Option<&str>,
        bulk: Option<&Bulk>,
    ) -> Result<crate::audit::AuditTicket, VaultError> {
        let event = AuditEvent {
            action,
            outcome: if code.is_none() {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            actor,
            project: project.as_str(),
            object,
            code,
            reason: None,
            reference: None,
            forward: None,
            bulk,
        };
        Ok(self.audit.record(&event)?)
    }

    fn export_request(&self, id: &str) -> Result<(ExportRequest, Vec<u8>), VaultError> {
        let name = format!("{EXPORT_PREFIX}{id}");
        let sealed = self
            .store
            .wrapped_key(SPACE, &name)?
            .ok_or(VaultError::NotFound)?;
        let plain = self
            .root_sealer()?
            .open(&export_aad(id), &sealed)
            .map_err(|_| VaultError::Integrity(name.clone()))?;
        let request = serde_json::from_slice(&plain).map_err(|_| VaultError::Integrity(name))?;
        Ok((request, sealed))
    }

    /// Records an export of the project's customer tokens (or those of `customers`) to
    /// `recipient` (an OpenPGP public key, armored); nothing leaves until another identity
    /// approves it. Returns its id.
    pub fn request_export(
        &self,
        grant: &Grant<Export>,
        recipient: &[u8],
        customers: Option<Vec<String>>,
    ) -> Result<(String, String), VaultError> {
        let result = (|| {
            let key = openpgp::public_key(recipient)
                .ok()
                .filter(|k| openpgp::encryption_key(k).is_some())
                .ok_or(refused(
                    "invalid_recipient",
                    "the recipient key is malformed or has no usable encryption subkey",
                ))?;
            if let Some(list) = &customers {
                if list.is_empty() || list.len() > MAX_EXPORT_CUSTOMERS {
                    return Err(refused(
                        "invalid_customers",
                        "the customer list is empty or too long",
                    ));
                }
                for c in list {
                    ObjectId::parse_kind(IdKind::Customer, c).map_err(|_| {
                        refused(
                            "invalid_customers",
                            "the customer list holds something that is not a customer id",
                        )
                    })?;
                }
            }
            let id = ObjectId::generate(IdKind::Customer)?
                .as_str()
                .replacen("cust_", "exp_", 1);
            let request = ExportRequest {
                project: grant.project().as_str().to_owned(),
                requested_by: grant.identity().to_owned(),
                requested_at: unix_now(),
                recipient: String::from_utf8_lossy(recipient).into_owned(),
                recipient_fingerprint: openpgp::fingerprint_of(&key),
                customers,
                approved_by: None,
                approved_at: None,
            };
            let plain = Zeroizing::new(
                serde_json::to_vec(&request).map_err(|_| VaultError::Integrity(id.clone()))?,
            );
            let sealed = self
                .root_sealer()?
                .seal(&export_aad(&id), &plain)
                .map_err(VaultError::Keys)?;
            self.store
                .insert_wrapped_key(SPACE, &format!("{EXPORT_PREFIX}{id}"), &sealed)?;
            self.store.flush()?;
            Ok((id, request.recipient_fingerprint))
        })();
        let bulk = result.as_ref().ok().map(|(_, fpr)| Bulk {
            key: fpr.clone(),
            ..Bulk::default()
        });
        self.audit_bulk(
            grant.actor(),
            grant.project(),
            "export.requested",
            result.as_ref().err().map(VaultError::code),
            result.as_ref().ok().map(|(id, _)| id.as_str()),
            bulk.as_ref(),
        )?
        .wait_blocking()?;
        result
    }

    /// Approves an export request: by an identity with `export` on its project other than the
    /// one that asked, within 24 hours.
    pub fn approve_export(&self, grant: &Grant<Export>, id: &str) -> Result<(), VaultError> {
        let result = (|| {
            let (mut request, _) = self.export_request(id)?;
            if request.project != grant.project().as_str() {
                return Err(VaultError::NotFound);
            }
            if unix_now() >= request.requested_at.saturating_add(EXPORT_TTL_SECS) {
                return Err(refused("export_expired", "the export request has expired"));
            }
            if request.requested_by == grant.identity() {
                return Err(refused(
                    "self_approval",
                    "an export must be approved by another identity than the one that asked",
                ));
            }
            if request.approved_by.is_some() {
                return Err(refused(
                    "export_already_approved",
                    "the export request is already approved",
                ));
            }
            request.approved_by = Some(grant.identity().to_owned());
            request.approved_at = Some(unix_now());
            let plain = Zeroizing::new(
                serde_json::to_vec(&request).map_err(|_| VaultError::Integrity(id.to_owned()))?,
            );
            let sealed = self
                .root_sealer()?
                .seal(&export_aad(id), &plain)
                .map_err(VaultError::Keys)?;
            self.store.put_raw(
                crate::store::Kind::Keys,
                SPACE,
                &format!("{EXPORT_PREFIX}{id}"),
                &sealed,
            )?;
            self.store.flush()?;
            Ok(())
        })();
        self.audit_bulk(
            grant.actor(),
            grant.project(),
            "export.approved",
            result.as_ref().err().map(VaultError::code),
            Some(id),
            None,
        )?
        .wait_blocking()?;
        result
    }

    /// An approved, unexpired export request, ready to be written. Audited here, before
    /// anything leaves: `export.released`, or the refusal as `export.fetched` with its code;
    /// the export itself is audited as `export.fetched` with its row count once written.
    pub fn export_plan(&self, grant: &Grant<Export>, id: &str) -> Result<ExportPlan, VaultError> {
        let result = (|| {
            let (request, _) = self.export_request(id)?;
            if request.project != grant.project().as_str() {
                return Err(VaultError::NotFound);
            }
            if unix_now() >= request.requested_at.saturating_add(EXPORT_TTL_SECS) {
                return Err(refused("export_expired", "the export request has expired"));
            }
            if request.approved_by.is_none() {
                return Err(refused(
                    "export_not_approved",
                    "the export request is not approved yet",
                ));
            }
            let recipient = openpgp::public_key(request.recipient.as_bytes())
                .map_err(|_| VaultError::Integrity(id.to_owned()))?;
            Ok(ExportPlan {
                id: id.to_owned(),
                project: grant.project().clone(),
                recipient,
                recipient_fingerprint: request.recipient_fingerprint,
                customers: request.customers,
            })
        })();
        // Before the first byte leaves: `export.released` (or the refusal). If the line
        // cannot be written, nothing leaves.
        let bulk = result.as_ref().ok().map(|plan| Bulk {
            key: plan.recipient_fingerprint.clone(),
            ..Bulk::default()
        });
        self.audit_bulk(
            grant.actor(),
            grant.project(),
            if result.is_ok() {
                "export.released"
            } else {
                "export.fetched"
            },
            result.as_ref().err().map(VaultError::code),
            Some(id),
            bulk.as_ref(),
        )?
        .wait_blocking()?;
        result
    }

    /// Writes the export's rows as CSV (the import's columns, then `customer` and `token`)
    /// into `out`, one customer token at a time: for the encryptor, on a thread of its own.
    /// Returns the number of rows.
    pub fn export_rows(
        &self,
        plan: &ExportPlan,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, VaultError> {
        use crate::portability::rows::{csv_field, COLUMNS};
        let project = &plan.project;
        let p = project.as_str();
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        // Large enough for any row (every field is bounded), so it never grows and leaves a
        // copy behind.
        let mut line = Zeroizing::new(Vec::with_capacity(8192));
        let header: Vec<&str> = COLUMNS
            .iter()
            .copied()
            .chain(["customer", "token"])
            .collect();
        line.extend_from_slice(header.join(",").as_bytes());
        line.extend_from_slice(b"\r\n");
        let io = |_| VaultError::Refused {
            code: "client_gone",
            message: "the client stopped reading the export",
        };
        out(&line).map_err(io)?;
        let mut rows = 0u64;
        let mut write_customer = |cust: &str, record: &CustomerRecord| -> Result<(), VaultError> {
            let profile = open_profile(&keys, project, cust, record)?.screened();
            for t in &record.tokens {
                let Some(token) = self.store.wait(self.store.token(p, &t.id))? else {
                    continue;
                };
                let meta = open_token_meta(&keys, project, &t.id, &token)?;
                let digits = open(
                    &keys,
                    Blob::TokenPan,
                    project,
                    &t.id,
                    token.key_version,
                    &token.pan,
                )?;
                let digits = std::str::from_utf8(&digits)
                    .map_err(|_| VaultError::Integrity(t.id.clone()))?;
                line.clear();
                let month = meta.card.exp_month.to_string();
                let year = meta.card.exp_year.to_string();
                let recurring = meta.recurring.as_ref();
                let fields: [&str; 12] = [
                    digits,
                    &month,
                    &year,
                    meta.card.holder_name.as_deref().unwrap_or_default(),
                    profile
                        .metadata
                        .get("customer_ref")
                        .map(String::as_str)
                        .unwrap_or_default(),
                    profile.email.as_deref().unwrap_or_default(),
                    profile.name.as_deref().unwrap_or_default(),
                    profile.phone.as_deref().unwrap_or_default(),
                    recurring
                        .and_then(|r| r.scheme_transaction_id.as_deref())
                        .unwrap_or_default(),
                    recurring.map(|r| r.model.as_str()).unwrap_or_default(),
                    cust,
                    &t.id,
                ];
                for (i, f) in fields.iter().enumerate() {
                    if i > 0 {
                        line.push(b',');
                    }
                    csv_field(&mut line, f);
                }
                line.extend_from_slice(b"\r\n");
                out(&line).map_err(io)?;
                rows += 1;
            }
            Ok(())
        };
        match &plan.customers {
            Some(list) => {
                for cust in list {
                    if let Some(record) = self.store.wait(self.store.customer(p, cust))? {
                        write_customer(cust, &record)?;
                    }
                }
            }
            None => {
                for entry in self.store.customers() {
                    let (project_name, cust, record) = entry?;
                    if project_name == p {
                        write_customer(&cust, &record)?;
                    }
                }
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Peer, Policy};
    use crate::vault::tests::test_vault;

    fn grant(policy: &Policy, who: &str) -> Grant<Export> {
        let peer = Arc::new(Peer {
            uri_sans: vec![who.into()],
            ..Peer::default()
        });
        policy
            .authorize::<Export>(&peer, &Project::default_project())
            .unwrap()
    }

    /// Moves a request's time back by `seconds`, as if it had been made that long ago.
    fn age(vault: &Vault, id: &str, seconds: i64) {
        let (mut request, _) = vault.export_request(id).unwrap();
        request.requested_at -= seconds;
        let plain = serde_json::to_vec(&request).unwrap();
        let sealed = vault
            .root_sealer()
            .unwrap()
            .seal(&export_aad(id), &plain)
            .unwrap();
        vault
            .store
            .put_raw(
                crate::store::Kind::Keys,
                SPACE,
                &format!("{EXPORT_PREFIX}{id}"),
                &sealed,
            )
            .unwrap();
    }

    fn code<T>(result: Result<T, VaultError>) -> &'static str {
        result.err().map_or("ok", |e| e.code())
    }

    #[test]
    fn an_export_is_approved_by_another_identity_within_24_hours_and_fetched_until_then() {
        let (vault, _dirs) = test_vault("export-window");
        let policy = Policy::parse(&[(
            "t.toml".into(),
            "[[identity]]\nname='a'\nuri_san='a'\npermissions=['export']\nprojects=['*']\n\
             [[identity]]\nname='b'\nuri_san='b'\npermissions=['export']\nprojects=['*']"
                .into(),
        )])
        .unwrap();
        let (a, b) = (grant(&policy, "a"), grant(&policy, "b"));
        let recipient = ImportKey::generate(Algorithm::Curve25519, "recipient")
            .unwrap()
            .public_armored()
            .unwrap();
        let (id, _) = vault
            .request_export(&a, recipient.as_bytes(), None)
            .unwrap();
        assert_eq!(code(vault.export_plan(&a, &id)), "export_not_approved");
        assert_eq!(code(vault.approve_export(&a, &id)), "self_approval");
        // Just inside the window: approved, and fetchable.
        age(&vault, &id, EXPORT_TTL_SECS - 60);
        assert_eq!(code(vault.approve_export(&b, &id)), "ok");
        assert_eq!(
            code(vault.approve_export(&b, &id)),
            "export_already_approved"
        );
        assert_eq!(code(vault.export_plan(&a, &id)), "ok");
        // Past it: nothing leaves, approved or not.
        age(&vault, &id, 61);
        assert_eq!(code(vault.export_plan(&a, &id)), "export_expired");
        assert_eq!(code(vault.export_plan(&b, &id)), "export_expired");
        let (late, _) = vault
            .request_export(&a, recipient.as_bytes(), None)
            .unwrap();
        age(&vault, &late, EXPORT_TTL_SECS);
        assert_eq!(code(vault.approve_export(&b, &late)), "export_expired");
        // A request for something that is not an OpenPGP key, or for ids that are not
        // customers', is refused.
        assert_eq!(
            code(vault.request_export(&a, b"not a key", None)),
            "invalid_recipient"
        );
        assert_eq!(
            code(vault.request_export(&a, recipient.as_bytes(), Some(vec!["tok_1".into()]))),
            "invalid_customers"
        );
    }
}
