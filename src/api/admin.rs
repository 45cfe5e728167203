//! Key-management endpoints: unseal, DEK rotation, KEK rekey, the key inventory; and the
//! metrics scrape.
//!
//! Unseal takes `unseal` (each custodian with their own certificate); the key endpoints take
//! `keys`; metrics take `metrics`. All three are vault-wide permissions. Shares arrive as hex in wiping memory and are never
//! logged; key operations run on the blocking pool (they scan or flush the store).

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::{grant, json, parse_json, read_body, ApiError, AppState};
use crate::card::SecretInput;
use crate::crypto::custody::{Custody, Share};
use crate::policy::{Backup, Keys, Metrics, Unseal};
use crate::vault::VaultError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsealRequest {
    kek_id: String,
    share: SecretInput,
}

/// `POST /v1/admin/unseal`: one custodian's share; the caller's identity is the custodian.
pub async fn unseal(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Unseal>(&req, &state)?;
    let body = parse_json::<UnsealRequest>(&read_body(&req, payload).await?)?;
    let vault = state.vault.clone();
    let identity = grant.identity().to_owned();
    // Combining, checking and loading keys read and flush the store: off the async workers.
    let result = web::block(move || vault.unseal(&identity, &body.kek_id, body.share.expose()))
        .await
        .map_err(|_| ApiError::INTERNAL)?;
    // Shares of the recovery KEK while the KEK is in an HSM: the break-glass path, audited
    // under its own action.
    let action = match &result {
        Ok(progress) if progress.recovery => "keys.unseal.recovery",
        _ => "keys.unseal",
    };
    state.vault.audit_event(grant.actor(), action, &result)?;
    Ok(json(StatusCode::OK, &result?))
}

/// `POST /v1/admin/keys/rotate`: a new DEK version for new writes; older ones are
/// re-encrypted away in the background.
pub async fn rotate(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Keys>(&req, &state)?;
    let vault = state.vault.clone();
    let result = web::block(move || vault.rotate_deks("manual"))
        .await
        .map_err(|_| ApiError::INTERNAL)?;
    state
        .vault
        .audit_event(grant.actor(), "keys.rotate", &result)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"active_dek_version": result?}),
    ))
}

/// `GET /v1/admin/keys`: every key with its purpose, algorithm, version, state, creation,
/// encryption count and records; never key bytes.
pub async fn inventory(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    grant::<Keys>(&req, &state)?;
    let vault = state.vault.clone();
    let inventory = web::block(move || vault.key_inventory())
        .await
        .map_err(|_| ApiError::INTERNAL)??;
    Ok(json(StatusCode::OK, &inventory))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmittedShare {
    custodian: String,
    share: SecretInput,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RekeyRequest {
    /// k shares of the KEK in use: proof of custody.
    shares: Vec<SubmittedShare>,
    /// The new KEK's custody descriptor, and k of its shares.
    next: Custody,
    next_shares: Vec<SubmittedShare>,
}

fn shares(kek_id: &str, submitted: &[SubmittedShare]) -> Result<Vec<Share>, ApiError> {
    submitted
        .iter()
        .map(|s| Share::from_hex(kek_id, &s.custodian, s.share.expose()))
        .collect::<Option<Vec<_>>>()
        .ok_or(ApiError::INVALID_REQUEST)
}

/// `POST /v1/admin/keys/rekey`: re-wraps every key under a new KEK in one transaction.
pub async fn rekey(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Keys>(&req, &state)?;
    let body = parse_json::<RekeyRequest>(&read_body(&req, payload).await?)?;
    if state.vault.is_sealed() {
        return Err(VaultError::Sealed.into());
    }
    let current_id = state
        .vault
        .custody_kek_id()
        .ok_or(ApiError::from(VaultError::NoCustody))?;
    let current = shares(&current_id, &body.shares)?;
    let next_shares = shares(&body.next.kek_id, &body.next_shares)?;
    let vault = state.vault.clone();
    let next = body.next;
    let result = web::block(move || vault.rekey(&current, next, &next_shares))
        .await
        .map_err(|_| ApiError::INTERNAL)?;
    // A rekey that committed must be reported as done, or the operator would throw away the
    // only shares that now open the store: a failed audit write is logged, not returned.
    if let Err(e) = state
        .vault
        .audit_event(grant.actor(), "keys.rekey", &result)
    {
        tracing::error!(error = %e, "the rekey could not be audited");
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"kek_id": result?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    /// `pkcs11` or `shamir`.
    to: String,
    /// k shares of the custodians' KEK: proof of custody.
    shares: Vec<SubmittedShare>,
}

/// `POST /v1/admin/keys/migrate`: moves the seal to the backend named (with the settings of
/// the daemon's own config file, read again now), re-wrapping the root key only.
pub async fn migrate(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Keys>(&req, &state)?;
    let body = parse_json::<MigrateRequest>(&read_body(&req, payload).await?)?;
    let custody_id = state
        .vault
        .custody_kek_id()
        .ok_or(ApiError::from(VaultError::NoCustody))?;
    let shares = shares(&custody_id, &body.shares)?;
    let vault = state.vault.clone();
    let config = state.config.clone();
    let to = body.to;
    let result = web::block(move || {
        let backend = match &config.source {
            Some(path) => {
                crate::config::Config::load(path)
                    .map_err(|e| VaultError::Seal(e.to_string()))?
                    .kek
            }
            None => config.kek.clone(),
        };
        let target = match (to.as_str(), backend) {
            ("shamir", _) => crate::crypto::seal::Backend::Shamir,
            ("pkcs11", b @ crate::crypto::seal::Backend::Pkcs11(_)) => b,
            ("pkcs11", _) => {
                return Err(VaultError::Seal(
                    "the config names no [kek.pkcs11]: set [kek] backend = \"pkcs11\" and its \
                     section first"
                        .into(),
                ))
            }
            _ => return Err(VaultError::Seal("`to` is pkcs11 or shamir".into())),
        };
        vault.migrate_seal(&target, &shares)
    })
    .await
    .map_err(|_| ApiError::INTERNAL)?;
    // Like a rekey: a migration that committed is reported as done even if its audit line
    // failed (logged), or the operator would act on a seal that is not the one in use.
    if let Err(e) = state
        .vault
        .audit_event(grant.actor(), "keys.migrate", &result)
    {
        tracing::error!(error = %e, "the seal migration could not be audited");
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"kek_id": result?}),
    ))
}

/// `POST /v1/admin/backup`: a backup of the store, streamed as it is written (see
/// `vault::backup`): ciphertext and wrapped keys only. Taken on a thread of its own while
/// requests go on; the bytes go out as the client reads them. A failure after the first
/// byte ends the stream without its trailer, which the client refuses; the outcome is
/// audited (`store.backup`) either way.
pub async fn backup(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Backup>(&req, &state)?;
    // A refusal before the stream starts is audited as the outcome, as a finished backup is.
    let ready = if state.vault.is_sealed() {
        Err(VaultError::Sealed)
    } else {
        state.vault.backup_supported()
    };
    if let Err(e) = ready {
        let refused: Result<(), VaultError> = Err(e);
        state
            .vault
            .audit_event(grant.actor(), "store.backup", &refused)?;
        refused?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(8);
    let vault = state.vault.clone();
    std::thread::Builder::new()
        .name("cardvault-backup".into())
        .spawn(move || {
            let sender = tx.clone();
            let out = crate::vault::backup::Chunks::new(move |chunk| {
                sender
                    .blocking_send(Ok(web::Bytes::from(chunk)))
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left")
                    })
            });
            let result = vault.backup(out);
            match &result {
                Ok(counts) => tracing::info!(
                    cards = counts.cards,
                    customers = counts.customers,
                    tokens = counts.tokens,
                    keys = counts.keys,
                    "backup taken"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "backup failed");
                    let _ = tx.blocking_send(Err(std::io::Error::other("the backup stopped")));
                }
            }
            if let Err(e) = vault.audit_event(grant.actor(), "store.backup", &result) {
                tracing::error!(error = %e, "the backup could not be audited");
            }
        })
        .map_err(|_| ApiError::INTERNAL)?;
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(HttpResponse::build(StatusCode::OK)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .content_type("application/octet-stream")
        .streaming(body))
}

/// `GET /v1/metrics`: the Prometheus text exposition. Answers while sealed and while the audit
/// trail is down (that is when it is most needed); never an id, a caller's string or card data
/// in a label.
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    grant::<Metrics>(&req, &state)?;
    let vault = state.vault.clone();
    let tls = std::sync::Arc::clone(&state.tls);
    let body = web::block(move || {
        let mut snapshot = vault.metrics_snapshot();
        snapshot.now = crate::vault::unix_now();
        snapshot.tls_deadlines = tls
            .deadlines()
            .into_iter()
            .map(|d| (d.kind, d.what, d.at))
            .collect();
        crate::metrics::render(&snapshot)
    })
    .await
    .map_err(|_| ApiError::INTERNAL)?;
    Ok(HttpResponse::build(StatusCode::OK)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body))
}
