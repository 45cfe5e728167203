//! HTTP handlers, request and response bodies. The only module that knows actix-web's types
//! (with `server`, which assembles the listener).
//!
//! Bodies are read by hand into wiping memory with a size limit, and parsed with our own error
//! mapping: actix's JSON extractor would answer a PAN sent as a number with serde's message,
//! which quotes the number.

mod admin;
mod error;
mod portability;
pub use portability::SIGNER_LENGTH_HEADER;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use error::ApiError;

use crate::card::{contains_pan, CardError, Cvc, Expiry, HolderName, Pan, SecretInput};
use crate::customer::{NewProfile, ProfilePatch, Recurring};
use crate::policy::{Customers, Forward, Grant, Peer, Policy, Requires};
use crate::tokens::{IdKind, ObjectId, Project};
use crate::vault::{this_month, Begin, NewCard, Purpose, TokenPatch, TokenView, Vault};

/// Request bodies larger than this are refused with 413 before they are parsed.
pub const BODY_LIMIT: usize = 16 * 1024;
pub const PROJECT_HEADER: &str = "vault-project";

/// What every handler shares.
pub struct AppState {
    pub vault: Arc<Vault>,
    /// Replaced whole by a `SIGHUP` reload.
    pub policy: std::sync::RwLock<Arc<Policy>>,
    pub limits: crate::limits::Limiter,
    /// For checking connections made before a reload against the current CA and CRLs.
    pub tls: Arc<crate::tls::TlsState>,
    /// The config the daemon started with; a seal migration reads its file again.
    pub config: crate::config::Config,
    /// The PSPs forwards may go to; replaced whole by a `SIGHUP` reload.
    pub receivers: std::sync::RwLock<Arc<crate::forward::Receivers>>,
}

/// Routes, shared by the daemon and anything else that serves the API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .service(resource("/health").route(web::get().to(health)))
            .service(resource("/metrics").route(web::get().to(admin::metrics)))
            .service(resource("/admin/unseal").route(web::post().to(admin::unseal)))
            .service(resource("/admin/keys").route(web::get().to(admin::inventory)))
            .service(resource("/admin/keys/rotate").route(web::post().to(admin::rotate)))
            .service(resource("/admin/keys/rekey").route(web::post().to(admin::rekey)))
            .service(resource("/admin/keys/migrate").route(web::post().to(admin::migrate)))
            .service(resource("/admin/backup").route(web::post().to(admin::backup)))
            .service(resource("/admin/import-keys").route(web::post().to(portability::import_key)))
            .service(
                resource("/admin/import-keys/{fingerprint}")
                    .route(web::delete().to(portability::remove_import_key)),
            )
            .service(resource("/import").route(web::post().to(portability::import)))
            .service(resource("/exports").route(web::post().to(portability::request_export)))
            .service(
                resource("/exports/{id}/approve")
                    .route(web::post().to(portability::approve_export)),
            )
            .service(
                resource("/exports/{id}/file").route(web::post().to(portability::fetch_export)),
            )
            .service(resource("/cards").route(web::post().to(tokenize)))
            .service(resource("/cards/{id}").route(web::get().to(card)))
            .service(resource("/detokenize").route(web::post().to(detokenize)))
            .service(resource("/forward").route(web::post().to(forward)))
            .service(resource("/customers").route(web::post().to(create_customer)))
            .service(
                resource("/customers/{customer}")
                    .route(web::get().to(customer))
                    .route(web::patch().to(update_customer))
                    .route(web::delete().to(delete_customer)),
            )
            .service(
                resource("/customers/{customer}/tokens")
                    .route(web::post().to(attach_card))
                    .route(web::get().to(list_tokens)),
            )
            .service(
                resource("/customers/{customer}/tokens/{token}")
                    .route(web::get().to(customer_token))
                    .route(web::patch().to(update_token))
                    .route(web::delete().to(delete_token)),
            ),
    )
    .default_service(web::to(not_found));
}

fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NOT_FOUND)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::METHOD_NOT_ALLOWED)
}

fn peer(req: &HttpRequest) -> Result<&Arc<Peer>, ApiError> {
    req.conn_data::<Arc<Peer>>().ok_or(ApiError::FORBIDDEN)
}

/// Put in a connection's data instead of a [`Peer`] when its verified certificate lacks the
/// clientAuth extended key usage: no identity, but enough to audit the refusal.
pub struct NoClientAuth(pub Peer);

fn project(req: &HttpRequest) -> Result<Project, ApiError> {
    match req.headers().get(PROJECT_HEADER) {
        None => Ok(Project::default_project()),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| Project::parse(v).ok())
            .ok_or(ApiError::INVALID_PROJECT),
    }
}

/// The caller's grant for `P`. A denial is audited; 503 `sealed` for data permissions while
/// the vault is sealed; 503 `audit_unavailable` when the audit trail cannot take the event
/// the request would make (fail closed: the action never starts).
fn grant<P: Requires>(req: &HttpRequest, state: &AppState) -> Result<Grant<P>, ApiError> {
    let Ok(peer) = peer(req) else {
        if let Some(NoClientAuth(refused)) = req.conn_data::<NoClientAuth>() {
            state.vault.audit_refusal(
                crate::audit::Actor::of("", refused),
                &project(req).unwrap_or_else(|_| Project::default_project()),
                "policy.denied",
                crate::vault::VaultError::Forbidden,
                "client certificate lacks the clientAuth extended key usage",
            )?;
        }
        return Err(ApiError::FORBIDDEN);
    };
    let project = project(req)?;
    if !state.tls.still_trusted(peer) {
        let actor = crate::audit::Actor::of("", peer);
        state.vault.audit_refusal(
            actor,
            &project,
            "policy.denied",
            crate::vault::VaultError::Forbidden,
            "client certificate expired since the handshake, or no longer trusted after a reload (revoked, or CA changed), or its intermediate or CRL expired",
        )?;
        return Err(ApiError::FORBIDDEN);
    }
    let policy = Arc::clone(&state.policy.read().unwrap_or_else(|p| p.into_inner()));
    let grant = match policy.authorize::<P>(peer, &project) {
        Ok(grant) => grant,
        Err(denied) => {
            let reason = denied.to_string();
            let actor = crate::audit::Actor::of(denied.identity(), peer);
            state.vault.audit_refusal(
                actor,
                &project,
                "policy.denied",
                crate::vault::VaultError::Forbidden,
                &reason,
            )?;
            return Err(denied.into());
        }
    };
    // A scrape makes no audit line and must work while the trail is down: it is how an
    // operator sees that it is.
    if P::PERMISSION != crate::policy::Permission::Metrics {
        state.vault.audit_ready()?;
    }
    if !P::PERMISSION.is_vault_wide() && state.vault.is_sealed() {
        return Err(ApiError::SEALED);
    }
    Ok(grant)
}

/// Reads at most [`BODY_LIMIT`] bytes into wiping memory.
async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    read_body_up_to(req, payload, BODY_LIMIT).await
}

/// Reads at most `limit` bytes into wiping memory.
async fn read_body_up_to(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::BODY_TOO_LARGE);
    }
    // Sized by Content-Length when there is one: the buffer is wiped whole on drop, so a
    // 16 KiB buffer for a 100-byte card would cost a 16 KiB memset per request.
    let mut body = Zeroizing::new(Vec::with_capacity(declared.unwrap_or(limit)));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::INVALID_REQUEST)?;
        let len = body.len() + chunk.len();
        if len > limit {
            return Err(ApiError::BODY_TOO_LARGE);
        }
        if len > body.capacity() {
            body = regrown(&body, limit);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A copy of `bytes` in a new buffer of `capacity`: growing a `Vec` in place would free the
/// old allocation unwiped, this drops it through `Zeroizing`.
fn regrown(bytes: &[u8], capacity: usize) -> Zeroizing<Vec<u8>> {
    let mut grown = Zeroizing::new(Vec::with_capacity(capacity));
    grown.extend_from_slice(bytes);
    grown
}

/// Parses a body as `T` with our own error codes (serde's messages quote the input).
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::INVALID_JSON
        }
        _ => ApiError::INVALID_REQUEST,
    })
}

/// A response body ready to send, and to store for idempotent replay.
type Reply = (StatusCode, Vec<u8>);

fn reply<T: Serialize>(status: StatusCode, body: &T) -> Result<Reply, ApiError> {
    serde_json::to_vec(body)
        .map(|bytes| (status, bytes))
        .map_err(|_| ApiError::INTERNAL)
}

fn send(status: StatusCode, body: Vec<u8>, replayed: bool) -> HttpResponse {
    let mut res = HttpResponse::build(status);
    res.insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("application/json");
    if replayed {
        res.insert_header(("idempotent-replayed", "true"));
    }
    res.body(body)
}

/// What a creating request made: its reply, and what a replay rebuilds the reply from.
struct Created {
    reply: Reply,
    replay: Replayable,
}

impl Created {
    fn new<T: Serialize>(
        status: StatusCode,
        object: &str,
        duplicate: bool,
        view: &T,
    ) -> Result<Created, ApiError> {
        Ok(Created {
            replay: Replayable {
                object: object.to_owned(),
                duplicate,
            },
            reply: reply(status, view)?,
        })
    }
}

/// Kept for an `Idempotency-Key` instead of the reply itself (which may hold personal data):
/// the object made, and whether it was an existing one.
#[derive(Serialize, Deserialize)]
struct Replayable {
    object: String,
    #[serde(default)]
    duplicate: bool,
}

/// The status of a creating request that succeeded: 201, or 200 when it returned an object
/// that existed already (an attach of a card the customer holds).
fn created_status(duplicate: bool) -> StatusCode {
    if duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

/// Why a creating request failed, and what it made all the same: an object committed before
/// its audit line failed ([`VaultError::Unaudited`](crate::vault::VaultError::Unaudited)).
/// The client gets `error`; the request's `Idempotency-Key` keeps `made` as its outcome.
struct Failed {
    error: ApiError,
    made: Option<(StatusCode, Replayable)>,
}

impl From<ApiError> for Failed {
    fn from(error: ApiError) -> Failed {
        Failed { error, made: None }
    }
}

impl From<crate::vault::VaultError> for Failed {
    fn from(e: crate::vault::VaultError) -> Failed {
        let made = match &e {
            crate::vault::VaultError::Unaudited {
                object, duplicate, ..
            } => Some((
                created_status(*duplicate),
                Replayable {
                    object: object.clone(),
                    duplicate: *duplicate,
                },
            )),
            _ => None,
        };
        Failed {
            error: ApiError::from(e),
            made,
        }
    }
}

/// Runs a creating request under its `Idempotency-Key`, if it has one (SPEC §4). A replay gets
/// the first outcome: a success is rebuilt by `render` from the live object (404 if it was
/// deleted since), an error is sent as it was. The same key with another body gets 409. A
/// server error releases the key so a retry can run, unless the request made its object
/// before failing (its audit line was lost): the key then keeps that object as a success, and
/// the retry gets it, replayed, instead of making a second one.
///
/// Under a key, `run` and the recording of its outcome are a task of their own: a client that
/// goes away mid-request drops this future, and the request must still finish and record what
/// it made, or the retry the key exists for would make a second object.
async fn idempotent<P: Requires, R>(
    req: &HttpRequest,
    state: &AppState,
    grant: &Grant<P>,
    body: &[u8],
    run: impl std::future::Future<Output = Result<Created, Failed>> + 'static,
    render: impl FnOnce(Replayable) -> R,
) -> Result<HttpResponse, ApiError>
where
    R: std::future::Future<Output = Result<Vec<u8>, ApiError>>,
{
    let Some(value) = req.headers().get("idempotency-key") else {
        let (status, bytes) = run.await.map_err(|failed| failed.error)?.reply;
        return Ok(send(status, bytes, false));
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or(ApiError::INVALID_IDEMPOTENCY_KEY)?;
    let claim = match state
        .vault
        .idempotency_begin(grant, key, req.method().as_str(), req.path(), body)
        .await?
    {
        Begin::Proceed(claim) => claim,
        Begin::Replay { status, body } => {
            let status = StatusCode::from_u16(status).map_err(|_| ApiError::INTERNAL)?;
            if !status.is_success() {
                return Ok(send(status, body, true));
            }
            let replay: Replayable =
                serde_json::from_slice(&body).map_err(|_| ApiError::INTERNAL)?;
            return Ok(send(status, render(replay).await?, true));
        }
        Begin::Conflict => return Err(ApiError::IDEMPOTENCY_CONFLICT),
        Begin::InProgress => return Err(ApiError::IDEMPOTENCY_IN_PROGRESS),
    };
    let task = actix_web::rt::spawn(async move {
        match run.await {
            Ok(Created {
                reply: (status, bytes),
                replay,
            }) => {
                let kept = serde_json::to_vec(&replay).map_err(|_| ApiError::INTERNAL)?;
                claim.finish(status.as_u16(), kept).await?;
                Ok(send(status, bytes, false))
            }
            // Made, then refused: the key keeps the object, the client gets the error.
            Err(Failed {
                error,
                made: Some((status, replay)),
            }) => {
                let kept = serde_json::to_vec(&replay).map_err(|_| ApiError::INTERNAL)?;
                claim.finish(status.as_u16(), kept).await?;
                Err(error)
            }
            Err(Failed { error, made: None }) if error.status.is_client_error() => {
                claim.finish(error.status.as_u16(), error.body()).await?;
                Err(error)
            }
            // Dropping the claim releases the key.
            Err(Failed { error, made: None }) => Err(error),
        }
    });
    task.await.map_err(|_| ApiError::INTERNAL)?
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(body)
}

/// Liveness and readiness: 200 when serving, 503 `sealed` until custodians unseal, 503
/// `unavailable` while the store or the audit trail cannot take writes.
async fn health(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if !state.tls.still_trusted(peer(&req)?) {
        return Err(ApiError::FORBIDDEN);
    }
    Ok(if state.vault.is_sealed() {
        // With an HSM seal, why the device did not unseal it (a stable code, never a path).
        let body = match state.vault.seal_fault() {
            Some(reason) => {
                serde_json::json!({"status": "sealed", "sealed": true, "reason": reason})
            }
            None => serde_json::json!({"status": "sealed", "sealed": true}),
        };
        json(StatusCode::SERVICE_UNAVAILABLE, &body)
    } else if !state.vault.ready() {
        // "unavailable" mends by itself (a full disk with room again, an audit log that can
        // be written again); "restart_required" does not.
        let status = if state.vault.needs_restart() {
            "restart_required"
        } else {
            "unavailable"
        };
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": status, "sealed": false}),
        )
    } else {
        json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "sealed": false}),
        )
    })
}

/// A number given either as a JSON number or as a string of digits. Any other JSON value
/// is accepted here and refused by the field's own check (422 with the field's code, not a
/// generic 400).
#[derive(Deserialize)]
#[serde(untagged)]
enum Loose {
    Int(u64),
    Text(String),
    Other(serde::de::IgnoredAny),
}

impl Loose {
    fn value(&self) -> Option<u64> {
        match self {
            Loose::Int(n) => Some(*n),
            Loose::Other(_) => None,
            Loose::Text(s)
                if !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                s.parse().ok()
            }
            Loose::Text(_) => None,
        }
    }
}

/// An expiry from request fields: 422 `invalid_expiry` for anything but a current or future
/// month.
fn expiry(month: &Loose, year: &Loose) -> Result<Expiry, ApiError> {
    let (month, year) = month
        .value()
        .zip(year.value())
        .ok_or(CardError::InvalidExpiry)?;
    Ok(Expiry::parse(month, year, this_month())?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    number: SecretInput,
    exp_month: Loose,
    exp_year: Loose,
    cvc: Option<SecretInput>,
    holder_name: Option<String>,
    // Named only to be refused with a clear code (PCI DSS 3.3.1: never stored after
    // authorization, and a vault has no business receiving them).
    track1: Option<IgnoredAny>,
    track2: Option<IgnoredAny>,
    track_data: Option<IgnoredAny>,
    pin: Option<IgnoredAny>,
    pin_block: Option<IgnoredAny>,
}

impl TokenizeRequest {
    fn parse(self) -> Result<NewCard, ApiError> {
        if self.track1.is_some()
            || self.track2.is_some()
            || self.track_data.is_some()
            || self.pin.is_some()
            || self.pin_block.is_some()
        {
            return Err(ApiError::PROHIBITED_DATA);
        }
        let pan = Pan::parse(self.number.expose())?;
        let expiry = expiry(&self.exp_month, &self.exp_year)?;
        let cvc = self
            .cvc
            .as_ref()
            .map(|c| Cvc::parse(c.expose()))
            .transpose()?;
        let holder_name = self
            .holder_name
            .as_deref()
            .map(HolderName::parse)
            .transpose()?;
        Ok(NewCard {
            pan,
            expiry,
            cvc,
            holder_name,
        })
    }
}

async fn tokenize(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = Arc::new(grant(&req, &state)?);
    let body = read_body(&req, payload).await?;
    let card = parse_json::<TokenizeRequest>(&body)?.parse()?;
    let run = {
        let (state, grant) = (state.clone(), Arc::clone(&grant));
        async move {
            let view = state.vault.tokenize(&grant, card).await?;
            Created::new(StatusCode::CREATED, &view.id, false, &view).map_err(Failed::from)
        }
    };
    let (st, gr) = (&state, &grant);
    let render = |r: Replayable| async move {
        let id = path_id(IdKind::Card, &r.object)?;
        reply(
            StatusCode::CREATED,
            &st.vault.tokenized_card(gr, &id).await?,
        )
        .map(|(_, b)| b)
    };
    idempotent(&req, &state, &grant, &body, run, render).await
}

async fn card(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant(&req, &state)?;
    let id = ObjectId::parse_kind(IdKind::Card, &path).map_err(|_| ApiError::NOT_FOUND)?;
    Ok(json(StatusCode::OK, &state.vault.card(&grant, &id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    token: SecretInput,
    reason: Option<String>,
    reference: Option<String>,
}

#[derive(Serialize)]
struct DetokenizeResponse<'a> {
    number: &'a str,
    exp_month: u8,
    exp_year: u16,
    holder_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cvc: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recurring: Option<&'a Recurring>,
}

/// Free text that goes into the audit trail: printable ASCII, bounded, and never something
/// that could be a card number.
fn label(value: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    if v.is_empty()
        || v.len() > max
        || !v.bytes().all(|b| (0x20..0x7f).contains(&b))
        || contains_pan(&v)
    {
        return Err(ApiError::INVALID_FIELD);
    }
    Ok(Some(v))
}

async fn detokenize(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant(&req, &state)?;
    admit_detokenization(&state, &grant)?;
    let body = parse_json::<DetokenizeRequest>(&read_body(&req, payload).await?)?;
    let purpose = Purpose {
        reason: label(body.reason, 64)?,
        reference: label(body.reference, 128)?,
    };
    let details = match ObjectId::parse(body.token.expose()) {
        Ok(token) => state.vault.detokenize(&grant, &token, &purpose).await,
        Err(_) => Err(crate::vault::VaultError::NotFound),
    };
    if matches!(details, Err(crate::vault::VaultError::NotFound)) {
        state.limits.missed(grant.identity(), Instant::now());
    }
    let details = details?;
    Ok(json(
        StatusCode::OK,
        &DetokenizeResponse {
            number: details.pan.expose_digits(),
            exp_month: details.expiry.month(),
            exp_year: details.expiry.year(),
            holder_name: details.holder_name.as_ref().map(HolderName::as_str),
            cvc: details.cvc.as_ref().map(Cvc::expose),
            recurring: details.recurring.as_ref(),
        },
    ))
}

/// Bulk-detokenization monitoring, for detokenize and forward alike: the policy's rate, and
/// a cap on unknown-token lookups. A refusal is audited.
fn admit_detokenization<P: Requires>(state: &AppState, grant: &Grant<P>) -> Result<(), ApiError> {
    if let Err(refusal) = state.limits.admit(
        grant.identity(),
        crate::limits::share(grant.limits(), state.vault.live_nodes()),
        Instant::now(),
    ) {
        state.vault.audit_refusal(
            grant.actor(),
            grant.project(),
            "limit.detokenize",
            crate::vault::VaultError::RateLimited,
            refusal.reason(),
        )?;
        return Err(ApiError::RATE_LIMITED);
    }
    Ok(())
}

/// `POST /v1/forward`: the caller's request goes to a registered PSP with the token's card put
/// in; the caller gets the PSP's answer with every card number masked. One audit line per
/// forward, refused or not, once the caller's permission is known.
async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    use crate::forward::{receivers, ForwardRequest};
    let grant = grant::<Forward>(&req, &state)?;
    admit_detokenization(&state, &grant)?;
    let request = parse_json::<ForwardRequest>(
        &read_body_up_to(&req, payload, crate::forward::REQUEST_LIMIT).await?,
    )?;
    let purpose = Purpose {
        reason: label(request.reason.clone(), 64)?,
        reference: label(request.reference.clone(), 128)?,
    };
    let started = Instant::now();
    let method = request.method.to_ascii_uppercase();
    let mut forwarded = crate::audit::Forwarded {
        receiver: Some(request.receiver.clone())
            .filter(|r| receivers::valid_name(r))
            .unwrap_or_default(),
        method: Some(method)
            .filter(|m| receivers::METHODS.contains(&m.as_str()))
            .unwrap_or_default(),
        ..Default::default()
    };
    let token = ObjectId::parse(request.token.expose()).ok();
    let outcome = run_forward(
        &state,
        &grant,
        &request,
        token.as_ref(),
        &mut forwarded,
        started,
    )
    .await;
    forwarded.ms = crate::forward::millis(started);
    if let Err((e, _)) = &outcome {
        if e.code == ApiError::NOT_FOUND.code {
            state.limits.missed(grant.identity(), Instant::now());
        }
    }
    let code = outcome.as_ref().err().map(|(e, _)| e.code);
    state
        .vault
        .audit_forward(
            &grant,
            token.as_ref().map(ObjectId::as_str),
            &purpose,
            &forwarded,
            code,
        )
        .await?;
    Ok(match outcome {
        Ok(answer) => json(StatusCode::OK, &answer),
        Err((error, token_used)) => error.forward_response(token_used),
    })
}

/// A forward's steps (see `forward`): the error, and whether the card token was used up.
async fn run_forward(
    state: &AppState,
    grant: &Grant<Forward>,
    request: &crate::forward::ForwardRequest,
    token: Option<&ObjectId>,
    forwarded: &mut crate::audit::Forwarded,
    started: Instant,
) -> Result<serde_json::Value, (ApiError, bool)> {
    use crate::forward::{template, Plan};
    let before = |e: ApiError| (e, false);
    if let Some(path) = crate::forward::audit_path(&request.path) {
        forwarded.path = path.to_owned();
    }
    let receivers = Arc::clone(&state.receivers.read().unwrap_or_else(|p| p.into_inner()));
    let plan = Plan::new(&receivers, grant.project(), request).map_err(|f| before(f.into()))?;
    let token = token.ok_or(before(ApiError::NOT_FOUND))?;
    let ready = state
        .vault
        .forward_check(grant, token)
        .await
        .map_err(|e| before(e.into()))?;
    let stream = crate::forward::connect(&plan.receiver)
        .await
        .map_err(|f| before(f.into()))?;
    // The connection is open: only now is a card token used up.
    let details = match ready {
        crate::vault::Ready::Card(details) => *details,
        crate::vault::Ready::CardToken => {
            let details = state
                .vault
                .forward_use(grant, token)
                .await
                .map_err(|e| before(e.into()))?;
            forwarded.token_used = true;
            details
        }
    };
    let card = template::Card {
        number: details.pan.expose_digits(),
        exp_month: details.expiry.month(),
        exp_year: details.expiry.year(),
        cvc: details.cvc.as_ref().map(Cvc::expose),
        holder_name: details.holder_name.as_ref().map(HolderName::as_str),
    };
    let body = plan.render(&card);
    forwarded.sent = body.len() as u64;
    let used = forwarded.token_used;
    let answer = crate::forward::exchange(stream, &plan, body, started)
        .await
        .map_err(|f| (ApiError::from(f), used))?;
    forwarded.status = Some(answer.status);
    forwarded.received = answer.body.len() as u64;
    let masker = template::Masker {
        pan: card.number,
        // A credential whole, and without its scheme (`Bearer`, `Basic`): a PSP may echo
        // either.
        secrets: plan
            .receiver
            .headers
            .iter()
            .filter(|h| h.secret)
            .flat_map(|h| {
                let bare = h.value.rsplit_once(' ').map(|(_, v)| v);
                [Some(h.value.as_str()), bare.filter(|v| v.len() >= 8)]
            })
            .flatten()
            .collect(),
        unmasked_fields: &plan.receiver.unmasked_fields,
        cvc: card.cvc,
    };
    crate::forward::masked_answer(&answer, &masker).map_err(|f| (ApiError::from(f), used))
}

fn path_id(kind: IdKind, raw: &str) -> Result<ObjectId, ApiError> {
    ObjectId::parse_kind(kind, raw).map_err(|_| ApiError::NOT_FOUND)
}

async fn create_customer(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = Arc::new(grant::<Customers>(&req, &state)?);
    let body = read_body(&req, payload).await?;
    let profile = parse_json::<NewProfile>(&body)?.parse()?;
    let run = {
        let (state, grant) = (state.clone(), Arc::clone(&grant));
        async move {
            let view = state.vault.create_customer(&grant, profile).await?;
            Created::new(StatusCode::CREATED, &view.id, false, &view).map_err(Failed::from)
        }
    };
    let (st, gr) = (&state, &grant);
    let render = |r: Replayable| async move {
        let id = path_id(IdKind::Customer, &r.object)?;
        reply(
            StatusCode::CREATED,
            &st.vault.created_customer(gr, &id).await?,
        )
        .map(|(_, b)| b)
    };
    idempotent(&req, &state, &grant, &body, run, render).await
}

async fn customer(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Customers>(&req, &state)?;
    let id = path_id(IdKind::Customer, &path)?;
    Ok(json(
        StatusCode::OK,
        &state.vault.customer(&grant, &id).await?,
    ))
}

async fn update_customer(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Customers>(&req, &state)?;
    let id = path_id(IdKind::Customer, &path)?;
    let patch = parse_json::<ProfilePatch>(&read_body(&req, payload).await?)?;
    Ok(json(
        StatusCode::OK,
        &state.vault.update_customer(&grant, &id, patch).await?,
    ))
}

async fn delete_customer(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Customers>(&req, &state)?;
    let id = path_id(IdKind::Customer, &path)?;
    state.vault.delete_customer(&grant, &id).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"id": id.as_str(), "object": "customer", "deleted": true}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachRequest {
    source: SecretInput,
    recurring: Option<Recurring>,
}

/// A customer token as created: its view, plus `token` (its id, as SPEC §4 names it) and
/// whether it already existed.
#[derive(Serialize)]
struct AttachResponse {
    token: String,
    #[serde(flatten)]
    view: TokenView,
    duplicate: bool,
}

async fn attach_card(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = Arc::new(grant::<Customers>(&req, &state)?);
    let customer = path_id(IdKind::Customer, &path)?;
    let body = read_body(&req, payload).await?;
    let request = parse_json::<AttachRequest>(&body)?;
    let source = ObjectId::parse_kind(IdKind::Card, request.source.expose())
        .map_err(|_| ApiError::NOT_FOUND)?;
    let recurring = request.recurring.map(Recurring::parse).transpose()?;
    let respond = |view: TokenView, duplicate: bool| {
        let token = view.id.clone();
        Created::new(
            created_status(duplicate),
            &token,
            duplicate,
            &AttachResponse {
                token: token.clone(),
                view,
                duplicate,
            },
        )
    };
    let run = {
        let (state, grant, customer) = (state.clone(), Arc::clone(&grant), customer.clone());
        async move {
            let attached = state
                .vault
                .attach_card(&grant, &customer, &source, recurring)
                .await?;
            respond(attached.token, attached.duplicate).map_err(Failed::from)
        }
    };
    let (st, gr, cu) = (&state, &grant, &customer);
    let render = |r: Replayable| async move {
        let token = path_id(IdKind::CustomerToken, &r.object)?;
        let view = st.vault.attached_token(gr, cu, &token).await?;
        respond(view, r.duplicate).map(|created| created.reply.1)
    };
    idempotent(&req, &state, &grant, &body, run, render).await
}

async fn list_tokens(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Customers>(&req, &state)?;
    let customer = path_id(IdKind::Customer, &path)?;
    let tokens = state.vault.customer_tokens(&grant, &customer).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": tokens}),
    ))
}

fn token_path(path: &(String, String)) -> Result<(ObjectId, ObjectId), ApiError> {
    Ok((
        path_id(IdKind::Customer, &path.0)?,
        path_id(IdKind::CustomerToken, &path.1)?,
    ))
}

async fn customer_token(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Customers>(&req, &state)?;
    let (customer, token) = token_path(&path)?;
    Ok(json(
        StatusCode::OK,
        &state
            .vault
            .customer_token(&grant, &customer, &token)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenPatchRequest {
    exp_month: Option<Loose>,
    exp_year: Option<Loose>,
    recurring: Option<Recurring>,
}

async fn update_token(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Customers>(&req, &state)?;
    let (customer, token) = token_path(&path)?;
    let request = parse_json::<TokenPatchRequest>(&read_body(&req, payload).await?)?;
    let expiry = match (request.exp_month, request.exp_year) {
        (None, None) => None,
        (Some(m), Some(y)) => Some(expiry(&m, &y)?),
        _ => return Err(CardError::InvalidExpiry.into()),
    };
    let patch = TokenPatch {
        expiry,
        recurring: request.recurring.map(Recurring::parse).transpose()?,
    };
    Ok(json(
        StatusCode::OK,
        &state
            .vault
            .update_customer_token(&grant, &customer, &token, patch)
            .await?,
    ))
}

async fn delete_token(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Customers>(&req, &state)?;
    let (customer, token) = token_path(&path)?;
    state
        .vault
        .delete_customer_token(&grant, &customer, &token)
        .await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"id": token.as_str(), "object": "customer_token", "deleted": true}),
    ))
}

/// Request logging: request id, caller, route pattern (never the raw path or a body), status
/// and latency. Installed by `server` around the whole app.
pub async fn log_request(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let request_id = request_id();
    // Work that only the log line needs is skipped when the line would be dropped.
    let logging = tracing::enabled!(tracing::Level::INFO);
    let caller = if logging {
        match (
            req.conn_data::<Arc<Peer>>(),
            req.app_data::<web::Data<AppState>>(),
        ) {
            (Some(peer), Some(state)) => match state
                .policy
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .identify(peer)
            {
                Ok(identity) => identity.name().to_owned(),
                Err(_) => format!("unmatched:{} sha256:{}", peer.subject, peer.fingerprint),
            },
            _ => "no-client-auth-eku".to_owned(),
        }
    } else {
        String::new()
    };
    let method = req.method().clone();
    let mut res = next.call(req).await?;
    if let Ok(value) = header::HeaderValue::from_str(&request_id) {
        res.headers_mut()
            .insert(header::HeaderName::from_static("request-id"), value);
    }
    // The route pattern (`/v1/cards/{id}`), never the path: no id ever becomes a label.
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "-".to_owned());
    let status = res.status().as_u16();
    let latency = started.elapsed();
    if logging {
        tracing::info!(
            request_id,
            caller,
            method = %method,
            route,
            status,
            latency_us = latency.as_micros() as u64,
            "request"
        );
    }
    // The method as a label only when it is one of the few the API knows: a client picks it.
    let method_label = match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "PUT" => "PUT",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    crate::metrics::request(route, method_label, status, latency);
    Ok(res)
}

/// A request id unique within the process and across restarts: a random per-process prefix
/// and a counter (no system call per request).
fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 4];
        let _ = crate::crypto::fill_random(&mut bytes);
        crate::crypto::hex(&bytes)
    });
    format!("{prefix}{:012x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Request bodies of any shape get a code, never a panic.
        #[test]
        fn request_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(req) = parse_json::<TokenizeRequest>(&body) {
                let _ = req.parse();
            }
            let _ = parse_json::<DetokenizeRequest>(&body);
            let _ = parse_json::<AttachRequest>(&body);
            let _ = parse_json::<TokenPatchRequest>(&body);
            if let Ok(p) = parse_json::<NewProfile>(&body) {
                let _ = p.parse();
            }
            let _ = parse_json::<ProfilePatch>(&body);
        }

        #[test]
        fn near_valid_card_bodies_never_panic(
            number in any::<String>(), month in any::<i64>(), year in any::<String>(), cvc in any::<String>(), name in any::<String>(),
        ) {
            let body = serde_json::json!({"number": number, "exp_month": month, "exp_year": year, "cvc": cvc, "holder_name": name});
            if let Ok(req) = parse_json::<TokenizeRequest>(body.to_string().as_bytes()) {
                let _ = req.parse();
            }
        }
    }
}
