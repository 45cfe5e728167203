//! Customers and their reusable customer tokens.
//!
//! A customer token is made from a card token in one store transaction that also marks the
//! card token used, so a card token is good for exactly one of: one detokenization, or one
//! customer token. The transaction first checks that the card, the customer and (for a
//! duplicate) the existing token are still exactly as read; if anything changed meanwhile it
//! writes nothing and the operation starts over from fresh reads.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    open, rfc3339, seal, unix_now, Blob, CardDetails, CardMeta, ProjectKeys, Purpose, ShownCard,
    Vault, VaultError,
};
use crate::card::Expiry;
use crate::customer::{Profile, ProfilePatch, Recurring};
use crate::policy::{Customers, Disclosure, Grant};
use crate::store::{Batch, CardRecord, CustomerRecord, TokenRecord, TokenRef};
use crate::tokens::{IdKind, ObjectId, Project};

/// How often a multi-record change is retried after losing a race before giving up.
const MAX_ATTEMPTS: usize = 16;
/// Distinct cards one customer may hold. The customer record lists its tokens and is rewritten
/// by every attach, so the list must stay short; real customers hold a handful of cards.
pub const MAX_TOKENS_PER_CUSTOMER: usize = 100;

redacted_debug!(TokenMeta, CustomerView, TokenView, Attached);

/// What is sealed in a customer token's metadata blob.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct TokenMeta {
    pub(super) card: CardMeta,
    pub(super) recurring: Option<Recurring>,
}

#[derive(Clone, Serialize)]
pub struct CustomerView {
    pub id: String,
    pub object: &'static str,
    #[serde(flatten)]
    pub profile: Profile,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Clone, Serialize)]
pub struct TokenView {
    pub id: String,
    pub object: &'static str,
    pub customer: String,
    #[serde(flatten)]
    pub card: ShownCard,
    pub recurring: Option<Recurring>,
    pub created_at: String,
    pub updated_at: String,
}

/// The result of attaching a card to a customer.
pub struct Attached {
    pub token: TokenView,
    /// The customer already held this card: the existing token is returned. Only ever true
    /// for a caller whose [`Disclosure`] shows fingerprints: for any other caller attach does
    /// not look for the card among the customer's tokens, so that attaching candidate cards
    /// cannot tell which one the customer holds.
    pub duplicate: bool,
}

/// Changes to a customer token: a new expiry from an account updater, or recurring data
/// learnt from the first payment.
#[derive(Debug, Default)]
pub struct TokenPatch {
    pub expiry: Option<Expiry>,
    pub recurring: Option<Recurring>,
}

/// A new customer token's record: its metadata and PAN sealed under the active DEK.
pub(super) fn new_token(
    keys: &ProjectKeys,
    project: &Project,
    id: &str,
    customer: &str,
    meta: &TokenMeta,
    digits: &[u8],
    now: i64,
) -> Result<TokenRecord, VaultError> {
    Ok(TokenRecord {
        customer: customer.to_owned(),
        created_at: now,
        updated_at: now,
        key_version: keys.dek_version,
        meta: seal(keys, Blob::TokenMeta, project, id, &json(meta, id)?)?,
        pan: seal(keys, Blob::TokenPan, project, id, digits)?,
    })
}

/// A new customer's record, its profile sealed, holding no token yet.
pub(super) fn new_customer(
    keys: &ProjectKeys,
    project: &Project,
    id: &str,
    profile: &Profile,
    now: i64,
) -> Result<CustomerRecord, VaultError> {
    Ok(CustomerRecord {
        created_at: now,
        updated_at: now,
        key_version: keys.dek_version,
        profile: seal(
            keys,
            Blob::CustomerProfile,
            project,
            id,
            &json(profile, id)?,
        )?,
        tokens: Vec::new(),
    })
}

pub(super) fn json<T: Serialize>(value: &T, id: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    serde_json::to_vec(value)
        .map(Zeroizing::new)
        .map_err(|_| VaultError::Integrity(id.to_owned()))
}

fn parse<T: for<'de> Deserialize<'de>>(plain: &[u8], id: &str) -> Result<T, VaultError> {
    serde_json::from_slice(plain).map_err(|_| VaultError::Integrity(id.to_owned()))
}

fn customer_id(id: &ObjectId) -> Result<&str, VaultError> {
    (id.kind() == IdKind::Customer)
        .then(|| id.as_str())
        .ok_or(VaultError::NotFound)
}

impl Vault {
    async fn create_customer_inner(
        &self,
        grant: &Grant<Customers>,
        profile: Profile,
    ) -> Result<CustomerView, VaultError> {
        let project = grant.project();
        let keys = self
            .project_keys(project, true)?
            .ok_or(VaultError::NotFound)?;
        let id = ObjectId::generate(IdKind::Customer)?;
        let record = new_customer(&keys, project, id.as_str(), &profile, unix_now())?;
        let ticket = self
            .store
            .insert_customer(project.as_str(), id.as_str(), &record)
            .await?;
        self.store.durable(ticket).await?;
        Ok(customer_view(id.as_str(), profile, &record))
    }

    /// A customer as a replay of its creation shows it. Not an audit line of its own: the
    /// creation was one (or, if its line was lost, the log names the customer).
    pub async fn created_customer(
        &self,
        grant: &Grant<Customers>,
        id: &ObjectId,
    ) -> Result<CustomerView, VaultError> {
        let project = grant.project();
        let id = customer_id(id)?;
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        let record = self
            .store
            .customer(project.as_str(), id)
            .await?
            .ok_or(VaultError::NotFound)?;
        let profile = open_profile(&keys, project, id, &record)?;
        Ok(customer_view(id, profile, &record))
    }

    async fn update_customer_inner(
        &self,
        grant: &Grant<Customers>,
        id: &ObjectId,
        patch: ProfilePatch,
    ) -> Result<CustomerView, VaultError> {
        let project = grant.project();
        let id = customer_id(id)?;
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        let now = unix_now();
        let mut patched = None;
        // The patch applies to the profile as stored at the moment of the swap, so two racing
        // updates never lose each other's fields. `patched` holds the last attempt's result,
        // which is the one that was written.
        let swap = self
            .store
            .swap_customer(project.as_str(), id, |rec| {
                let mut profile = open_profile(&keys, project, id, rec)?;
                patch
                    .clone()
                    .apply(&mut profile)
                    .map_err(VaultError::Field)?;
                let sealed = seal(
                    &keys,
                    Blob::CustomerProfile,
                    project,
                    id,
                    &json(&profile, id)?,
                )?;
                patched = Some(profile);
                Ok(CustomerRecord {
                    updated_at: now,
                    key_version: keys.dek_version,
                    profile: sealed,
                    ..rec.clone()
                })
            })
            .await?;
        let (old, ticket) = swap.swapped(VaultError::NotFound)?;
        self.store.durable(ticket).await?;
        let profile = patched.ok_or(VaultError::NotFound)?;
        Ok(customer_view(
            id,
            profile,
            &CustomerRecord {
                updated_at: now,
                ..old
            },
        ))
    }

    /// Deletes a customer and every token it holds, in one transaction.
    async fn delete_customer_inner(
        &self,
        grant: &Grant<Customers>,
        id: &ObjectId,
    ) -> Result<(), VaultError> {
        let project = grant.project().as_str();
        let id = customer_id(id)?;
        for _ in 0..MAX_ATTEMPTS {
            let record = self
                .store
                .customer(project, id)
                .await?
                .ok_or(VaultError::NotFound)?;
            let mut batch = Batch::default();
            batch
                .expect_customer(project, id, &record)
                .remove_customer(project, id);
            for token in &record.tokens {
                batch.remove_token(project, &token.id);
            }
            if let Some(ticket) = self.store.commit(&batch).await? {
                self.store.durable(ticket).await?;
                return Ok(());
            }
        }
        Err(VaultError::Contention)
    }

    /// Turns a card token into a customer token (or returns the customer's existing token for
    /// the same card), using up the card token in the same transaction.
    pub async fn attach_card(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        source: &ObjectId,
        recurring: Option<Recurring>,
    ) -> Result<Attached, VaultError> {
        const ACTION: &str = "customer_token.create";
        let result = self
            .attach_card_inner(grant, customer, source, recurring)
            .await;
        let object = result.as_ref().ok().map(|a| a.token.id.as_str());
        let audited = self.audit_line(grant, ACTION, object, &result).await;
        match (audited, result) {
            (Ok(()), result) => result,
            // The token is in the store and the card token used up: the error names the token.
            (Err(e), Ok(attached)) => {
                Err(e.unaudited(ACTION, &attached.token.id, attached.duplicate))
            }
            (Err(e), Err(_)) => Err(e),
        }
    }

    async fn attach_card_inner(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        source: &ObjectId,
        recurring: Option<Recurring>,
    ) -> Result<Attached, VaultError> {
        let project = grant.project();
        let p = project.as_str();
        let cust = customer_id(customer)?;
        if source.kind() != IdKind::Card {
            return Err(VaultError::NotFound);
        }
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        for _ in 0..MAX_ATTEMPTS {
            let customer_rec = self
                .store
                .customer(p, cust)
                .await?
                .ok_or(VaultError::NotFound)?;
            let card_rec = self
                .store
                .card(p, source.as_str())
                .await?
                .ok_or(VaultError::NotFound)?;
            let now = unix_now();
            if card_rec.used_at.is_some() {
                return Err(VaultError::TokenUsed);
            }
            let Some(sealed_pan) = card_rec
                .pan
                .as_deref()
                .filter(|_| card_rec.expires_at > now)
            else {
                return Err(VaultError::TokenExpired);
            };
            let card_meta = self.open_meta(&keys, project, source, &card_rec)?;
            let used_card = CardRecord {
                used_at: Some(now),
                pan: None,
                ..card_rec.clone()
            };
            let mut batch = Batch::default();
            batch
                .expect_card(p, source.as_str(), &card_rec)
                .expect_customer(p, cust, &customer_rec)
                .put_card(p, source.as_str(), &used_card);

            let existing = customer_rec
                .tokens
                .iter()
                .filter(|_| grant.disclosure().fingerprint)
                .find(|t| t.fingerprint == card_meta.fingerprint);
            let (token_id, token_rec, meta, duplicate) = match existing {
                Some(existing) => {
                    let Some(token_rec) = self.store.token(p, &existing.id).await? else {
                        continue; // deleted meanwhile: the customer record changes too; retry
                    };
                    let mut meta: TokenMeta = parse(
                        &open(
                            &keys,
                            Blob::TokenMeta,
                            project,
                            &existing.id,
                            token_rec.key_version,
                            &token_rec.meta,
                        )?,
                        &existing.id,
                    )?;
                    // An account-updater style refresh: keep the later expiry.
                    if (card_meta.exp_year, card_meta.exp_month)
                        > (meta.card.exp_year, meta.card.exp_month)
                    {
                        meta.card.exp_year = card_meta.exp_year;
                        meta.card.exp_month = card_meta.exp_month;
                    }
                    if recurring.is_some() {
                        meta.recurring = recurring.clone();
                    }
                    let updated = TokenRecord {
                        updated_at: now,
                        key_version: keys.dek_version,
                        meta: seal(
                            &keys,
                            Blob::TokenMeta,
                            project,
                            &existing.id,
                            &json(&meta, &existing.id)?,
                        )?,
                        pan: current_pan(&keys, project, &existing.id, &token_rec)?,
                        ..token_rec.clone()
                    };
                    batch.expect_token(p, &existing.id, &token_rec).put_token(
                        p,
                        &existing.id,
                        &updated,
                    );
                    (existing.id.clone(), updated, meta, true)
                }
                None => {
                    if customer_rec.tokens.len() >= MAX_TOKENS_PER_CUSTOMER {
                        return Err(VaultError::TooManyTokens);
                    }
                    let token_id = ObjectId::generate(IdKind::CustomerToken)?;
                    let tid = token_id.as_str();
                    let digits = open(
                        &keys,
                        Blob::Pan,
                        project,
                        source.as_str(),
                        card_rec.key_version,
                        sealed_pan,
                    )?;
                    let meta = TokenMeta {
                        card: card_meta.clone(),
                        recurring: recurring.clone(),
                    };
                    let token_rec = new_token(&keys, project, tid, cust, &meta, &digits, now)?;
                    let mut updated_customer = customer_rec.clone();
                    // A token made by a caller that may not see fingerprints takes no part in
                    // deduplication, later attaches included: if it did, a fingerprint holder's
                    // attach landing on it (or not) would tell its maker which of the cards it
                    // attached is the one the customer holds. An empty fingerprint matches none.
                    updated_customer.tokens.push(TokenRef {
                        id: tid.to_owned(),
                        fingerprint: if grant.disclosure().fingerprint {
                            card_meta.fingerprint.clone()
                        } else {
                            String::new()
                        },
                    });
                    batch
                        .expect_no_token(p, tid)
                        .put_token(p, tid, &token_rec)
                        .put_customer(p, cust, &updated_customer);
                    (tid.to_owned(), token_rec, meta, false)
                }
            };
            if let Some(ticket) = self.store.commit(&batch).await? {
                self.store.durable(ticket).await?;
                // A customer token never carries a CVC: wipe the card token's now.
                drop(self.cvcs.take(project, source));
                return Ok(Attached {
                    token: token_view(&token_id, &token_rec, meta, grant.disclosure()),
                    duplicate,
                });
            }
        }
        Err(VaultError::Contention)
    }

    async fn customer_tokens_inner(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
    ) -> Result<Vec<TokenView>, VaultError> {
        let project = grant.project();
        let cust = customer_id(customer)?;
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        let record = self
            .store
            .customer(project.as_str(), cust)
            .await?
            .ok_or(VaultError::NotFound)?;
        let mut views = Vec::with_capacity(record.tokens.len());
        for t in &record.tokens {
            // A token deleted between the two reads is simply not listed.
            if let Some(token) = self.store.token(project.as_str(), &t.id).await? {
                views.push(token_view(
                    &t.id,
                    &token,
                    open_token_meta(&keys, project, &t.id, &token)?,
                    grant.disclosure(),
                ));
            }
        }
        Ok(views)
    }

    /// A customer token as a replay of the attach that made it shows it. Not an audit line of
    /// its own: the attach was one (or, if its line was lost, the log names the token).
    pub async fn attached_token(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        token: &ObjectId,
    ) -> Result<TokenView, VaultError> {
        let project = grant.project();
        let (keys, record) = self.owned_token(project, customer, token).await?;
        Ok(token_view(
            token.as_str(),
            &record,
            open_token_meta(&keys, project, token.as_str(), &record)?,
            grant.disclosure(),
        ))
    }

    async fn update_customer_token_inner(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        token: &ObjectId,
        patch: TokenPatch,
    ) -> Result<TokenView, VaultError> {
        let project = grant.project();
        let tid = token.as_str();
        let (keys, _) = self.owned_token(project, customer, token).await?;
        let now = unix_now();
        let mut new_meta = None;
        let swap = self
            .store
            .swap_token(project.as_str(), tid, |rec| {
                let mut meta = open_token_meta(&keys, project, tid, rec)?;
                if let Some(expiry) = patch.expiry {
                    meta.card.exp_month = expiry.month();
                    meta.card.exp_year = expiry.year();
                }
                if let Some(r) = &patch.recurring {
                    meta.recurring = Some(r.clone());
                }
                let sealed = seal(&keys, Blob::TokenMeta, project, tid, &json(&meta, tid)?)?;
                let pan = current_pan(&keys, project, tid, rec)?;
                new_meta = Some(meta);
                Ok(TokenRecord {
                    updated_at: now,
                    key_version: keys.dek_version,
                    meta: sealed,
                    pan,
                    ..rec.clone()
                })
            })
            .await?;
        let (old, ticket) = swap.swapped(VaultError::NotFound)?;
        self.store.durable(ticket).await?;
        let meta = new_meta.ok_or(VaultError::NotFound)?;
        Ok(token_view(
            tid,
            &TokenRecord {
                updated_at: now,
                ..old
            },
            meta,
            grant.disclosure(),
        ))
    }

    async fn delete_customer_token_inner(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        token: &ObjectId,
    ) -> Result<(), VaultError> {
        let project = grant.project();
        let p = project.as_str();
        let cust = customer_id(customer)?;
        for _ in 0..MAX_ATTEMPTS {
            let (_, token_rec) = self.owned_token(project, customer, token).await?;
            let customer_rec = self
                .store
                .customer(p, cust)
                .await?
                .ok_or(VaultError::NotFound)?;
            let mut updated = customer_rec.clone();
            updated.tokens.retain(|t| t.id != token.as_str());
            let mut batch = Batch::default();
            batch
                .expect_customer(p, cust, &customer_rec)
                .expect_token(p, token.as_str(), &token_rec)
                .put_customer(p, cust, &updated)
                .remove_token(p, token.as_str());
            if let Some(ticket) = self.store.commit(&batch).await? {
                self.store.durable(ticket).await?;
                return Ok(());
            }
        }
        Err(VaultError::Contention)
    }

    /// A customer token's card, as often as asked; never a CVC.
    pub(super) async fn detokenize_customer_token(
        &self,
        project: &Project,
        token: &ObjectId,
    ) -> Result<CardDetails, VaultError> {
        let tid = token.as_str();
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        let record = self
            .store
            .token(project.as_str(), tid)
            .await?
            .ok_or(VaultError::NotFound)?;
        let meta = open_token_meta(&keys, project, tid, &record)?;
        let digits = open(
            &keys,
            Blob::TokenPan,
            project,
            tid,
            record.key_version,
            &record.pan,
        )?;
        CardDetails::open(&digits, &meta.card, None, meta.recurring, tid)
    }

    /// The token, if it exists in this project and belongs to `customer`.
    async fn owned_token(
        &self,
        project: &Project,
        customer: &ObjectId,
        token: &ObjectId,
    ) -> Result<(std::sync::Arc<ProjectKeys>, TokenRecord), VaultError> {
        let cust = customer_id(customer)?;
        if token.kind() != IdKind::CustomerToken {
            return Err(VaultError::NotFound);
        }
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        let record = self
            .store
            .token(project.as_str(), token.as_str())
            .await?
            .filter(|r| r.customer == cust)
            .ok_or(VaultError::NotFound)?;
        Ok((keys, record))
    }
}

/// The audited entry points: each records one audit event, success or failure.
impl Vault {
    pub async fn create_customer(
        &self,
        grant: &Grant<Customers>,
        profile: Profile,
    ) -> Result<CustomerView, VaultError> {
        const ACTION: &str = "customer.create";
        let result = self.create_customer_inner(grant, profile).await;
        let object = result.as_ref().ok().map(|v| v.id.as_str());
        let audited = self.audit_line(grant, ACTION, object, &result).await;
        match (audited, result) {
            (Ok(()), result) => result,
            // The customer is in the store: the error names it.
            (Err(e), Ok(view)) => Err(e.unaudited(ACTION, &view.id, false)),
            (Err(e), Err(_)) => Err(e),
        }
    }

    /// A customer's contact details; an audit line (who read which customer).
    pub async fn customer(
        &self,
        grant: &Grant<Customers>,
        id: &ObjectId,
    ) -> Result<CustomerView, VaultError> {
        let result = self.created_customer(grant, id).await;
        self.audited(grant, "customer.read", Some(id.as_str()), result)
            .await
    }

    /// The metadata of a customer's tokens; one audit line naming the customer.
    pub async fn customer_tokens(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
    ) -> Result<Vec<TokenView>, VaultError> {
        let result = self.customer_tokens_inner(grant, customer).await;
        self.audited(
            grant,
            "customer_token.list",
            Some(customer.as_str()),
            result,
        )
        .await
    }

    /// One customer token's metadata; an audit line (who read which token).
    pub async fn customer_token(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        token: &ObjectId,
    ) -> Result<TokenView, VaultError> {
        let result = self.attached_token(grant, customer, token).await;
        self.audited(grant, "customer_token.read", Some(token.as_str()), result)
            .await
    }

    pub async fn update_customer(
        &self,
        grant: &Grant<Customers>,
        id: &ObjectId,
        patch: ProfilePatch,
    ) -> Result<CustomerView, VaultError> {
        let result = self.update_customer_inner(grant, id, patch).await;
        self.audited(grant, "customer.update", Some(id.as_str()), result)
            .await
    }

    /// Deletes a customer and every token it holds, in one transaction.
    pub async fn delete_customer(
        &self,
        grant: &Grant<Customers>,
        id: &ObjectId,
    ) -> Result<(), VaultError> {
        let result = self.delete_customer_inner(grant, id).await;
        self.audited(grant, "customer.delete", Some(id.as_str()), result)
            .await
    }

    pub async fn update_customer_token(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        token: &ObjectId,
        patch: TokenPatch,
    ) -> Result<TokenView, VaultError> {
        let result = self
            .update_customer_token_inner(grant, customer, token, patch)
            .await;
        self.audited(grant, "customer_token.update", Some(token.as_str()), result)
            .await
    }

    pub async fn delete_customer_token(
        &self,
        grant: &Grant<Customers>,
        customer: &ObjectId,
        token: &ObjectId,
    ) -> Result<(), VaultError> {
        let result = self
            .delete_customer_token_inner(grant, customer, token)
            .await;
        self.audited(grant, "customer_token.delete", Some(token.as_str()), result)
            .await
    }

    async fn audited<T>(
        &self,
        grant: &Grant<Customers>,
        action: &'static str,
        object: Option<&str>,
        result: Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        self.audit_line(grant, action, object, &result).await?;
        result
    }

    /// Writes the audit line of `result`; the error is the audit trail's.
    async fn audit_line<T>(
        &self,
        grant: &Grant<Customers>,
        action: &'static str,
        object: Option<&str>,
        result: &Result<T, VaultError>,
    ) -> Result<(), VaultError> {
        self.audit(
            grant.actor(),
            grant.project(),
            action,
            result,
            object,
            &Purpose::default(),
        )?
        .wait()
        .await?;
        Ok(())
    }
}

/// A token's sealed PAN for a rewrite under the active DEK version: as stored if it is under
/// that version already, else moved to it with the metadata (a record has one key version).
fn current_pan(
    keys: &ProjectKeys,
    project: &Project,
    id: &str,
    rec: &TokenRecord,
) -> Result<Vec<u8>, VaultError> {
    if rec.key_version == keys.dek_version {
        return Ok(rec.pan.clone());
    }
    let digits = open(keys, Blob::TokenPan, project, id, rec.key_version, &rec.pan)?;
    seal(keys, Blob::TokenPan, project, id, &digits)
}

pub(super) fn open_profile(
    keys: &ProjectKeys,
    project: &Project,
    id: &str,
    record: &CustomerRecord,
) -> Result<Profile, VaultError> {
    parse(
        &open(
            keys,
            Blob::CustomerProfile,
            project,
            id,
            record.key_version,
            &record.profile,
        )?,
        id,
    )
}

pub(super) fn open_token_meta(
    keys: &ProjectKeys,
    project: &Project,
    id: &str,
    record: &TokenRecord,
) -> Result<TokenMeta, VaultError> {
    parse(
        &open(
            keys,
            Blob::TokenMeta,
            project,
            id,
            record.key_version,
            &record.meta,
        )?,
        id,
    )
}

fn customer_view(id: &str, profile: Profile, record: &CustomerRecord) -> CustomerView {
    CustomerView {
        id: id.to_owned(),
        object: "customer",
        profile: profile.screened(),
        created_at: rfc3339(record.created_at),
        updated_at: rfc3339(record.updated_at),
    }
}

fn token_view(
    id: &str,
    record: &TokenRecord,
    meta: TokenMeta,
    disclosure: Disclosure,
) -> TokenView {
    TokenView {
        id: id.to_owned(),
        object: "customer_token",
        customer: record.customer.clone(),
        card: meta.card.shown(disclosure),
        recurring: meta.recurring,
        created_at: rfc3339(record.created_at),
        updated_at: rfc3339(record.updated_at),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::card::{Expiry, Pan};
    use crate::policy::{Detokenize, Peer, Policy, Tokenize};
    use crate::vault::tests::test_vault;
    use crate::vault::NewCard;

    /// Sixteen threads race for each card token, half attaching it to a customer, half
    /// detokenizing it: exactly one of them wins, in every one of 50 rounds.
    #[test]
    fn attach_and_detokenize_race_has_one_winner() {
        let (vault, _dirs) = test_vault("attach-race");
        let policy = Policy::parse(&[(
            "t.toml".into(),
            "[[identity]]\nname='r'\nuri_san='u'\npermissions=['tokenize','customers','detokenize']\nprojects=['*']".into(),
        )])
        .unwrap();
        let peer = Arc::new(Peer {
            uri_sans: vec!["u".into()],
            ..Peer::default()
        });
        let project = Project::default_project();
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let customers: Grant<Customers> = policy.authorize(&peer, &project).unwrap();
        let cust = rt()
            .block_on(vault.create_customer(&customers, Profile::default()))
            .unwrap()
            .id;
        let cust = ObjectId::parse(&cust).unwrap();
        for round in 0..50 {
            let tokenize: Grant<Tokenize> = policy.authorize(&peer, &project).unwrap();
            let card = NewCard {
                pan: Pan::parse(&crate::card::luhn_complete(&format!("4{round:014}"), 16)).unwrap(),
                expiry: Expiry::parse(12, 40, (2026, 1)).unwrap(),
                cvc: None,
                holder_name: None,
            };
            let card = rt().block_on(vault.tokenize(&tokenize, card)).unwrap().id;
            let card = ObjectId::parse(&card).unwrap();
            let barrier = Arc::new(Barrier::new(16));
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let (vault, barrier, card, cust) = (
                        Arc::clone(&vault),
                        Arc::clone(&barrier),
                        card.clone(),
                        cust.clone(),
                    );
                    let customers: Grant<Customers> = policy.authorize(&peer, &project).unwrap();
                    let detokenize: Grant<Detokenize> = policy.authorize(&peer, &project).unwrap();
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        barrier.wait();
                        if i % 2 == 0 {
                            rt.block_on(vault.attach_card(&customers, &cust, &card, None))
                                .is_ok()
                        } else {
                            rt.block_on(vault.detokenize(&detokenize, &card, &Purpose::default()))
                                .is_ok()
                        }
                    })
                })
                .collect();
            let wins = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|w| *w)
                .count();
            assert_eq!(wins, 1, "round {round}");
        }
    }
}
