//! Card portability over HTTP: the import keys, `POST /v1/import` and the export steps.
//!
//! An import's upload is kept (ciphertext only, mode 0600, in `spool_dir`) while it is read
//! twice, each time as a stream: first to its end, to check the file's integrity (OpenPGP's
//! SEIPDv1 packet, which GnuPG writes, proves it only at the end), its signer when one is
//! asked for, and its header row; then to import what was checked, row by row. So no row of
//! a damaged or altered file is ever imported, and memory stays bounded whatever the size.
//! The results go back as CSV while rows are imported, each line once its row is durable.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;

use super::{grant, json, parse_json, read_body, AppState};
use crate::api::error::ApiError;
use crate::policy::{Export, Grant, Import};
use crate::portability::openpgp::{self, Algorithm, PgpError};
use crate::portability::rows::{csv_field, FileError, RowError, Rows, WipingReader};
use crate::vault::{Bulk, VaultError};

/// Rows imported in one transaction, at most.
const CHUNK: usize = 256;
/// The largest encrypted file taken.
const MAX_UPLOAD: u64 = 16 << 30;
/// The largest signer key sent before the file.
const MAX_SIGNER: usize = 64 * 1024;
/// The header that says the body starts with the signer's public key, of this many bytes.
pub const SIGNER_LENGTH_HEADER: &str = "import-signer-length";

impl From<PgpError> for ApiError {
    fn from(e: PgpError) -> ApiError {
        let status = match e {
            PgpError::KeyGeneration | PgpError::Write => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        let message = match e {
            PgpError::NotOpenPgp => "the file is not an OpenPGP message",
            PgpError::NotEncrypted => "the file is not encrypted",
            PgpError::WrongKey => "the file is not encrypted to any of the vault's import keys",
            PgpError::Damaged => {
                "the file is damaged, truncated or was altered (integrity check failed); nothing was imported"
            }
            PgpError::BadSignature => "the file is not signed by the signer given",
            PgpError::BadKey => "the key is malformed, or has no usable encryption key",
            PgpError::KeyGeneration => "key generation failed",
            PgpError::Write => "writing the encrypted file failed",
        };
        ApiError::new(status, e.code(), message)
    }
}

impl From<&FileError> for ApiError {
    fn from(e: &FileError) -> ApiError {
        let message = match e {
            FileError::Empty => "the file holds no rows",
            FileError::MissingColumn(_) => {
                "the header row lacks a required column (number, exp_month, exp_year)"
            }
            FileError::BadHeader => "the header row is malformed or names a column twice",
        };
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportKeyRequest {
    #[serde(default)]
    algorithm: Option<String>,
    #[serde(default)]
    rotate: bool,
}

/// `POST /v1/admin/import-keys`: the current import key (made if there is none, or a new
/// one with `rotate`), and every key still held.
pub async fn import_key(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Import>(&req, &state)?;
    let body: ImportKeyRequest = parse_json(&read_body(&req, payload).await?)?;
    let algorithm = match body.algorithm.as_deref() {
        None => Algorithm::Rsa4096,
        Some(name) => Algorithm::parse(name).ok_or(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_algorithm",
            "algorithm must be rsa4096 or curve25519",
        ))?,
    };
    let vault = state.vault.clone();
    // RSA key generation takes seconds: off the worker.
    let (current, all, made) = web::block(move || vault.import_key(&grant, algorithm, body.rotate))
        .await
        .map_err(|_| ApiError::INTERNAL)??;
    Ok(json(
        if made {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &serde_json::json!({"key": current, "keys": all, "created": made}),
    ))
}

/// `DELETE /v1/admin/import-keys/{fingerprint}`.
pub async fn remove_import_key(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Import>(&req, &state)?;
    let vault = state.vault.clone();
    let fingerprint = path.into_inner();
    if fingerprint.is_empty() || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::NOT_FOUND);
    }
    web::block(move || vault.remove_import_key(&grant, &fingerprint))
        .await
        .map_err(|_| ApiError::INTERNAL)??;
    Ok(HttpResponse::NoContent().finish())
}

/// The upload while it is read. Its folder entry is removed as soon as it is made: both
/// readings go through the handle it was written by, so the bytes read are the bytes
/// written, nothing else can open it, and a crash leaves nothing behind.
struct Spool {
    file: std::fs::File,
}

impl Spool {
    fn create(dir: &Path) -> Result<Spool, ApiError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut name = [0u8; 16];
        crate::crypto::fill_random(&mut name).map_err(|_| ApiError::INTERNAL)?;
        let path = dir.join(format!(
            "cardvault-import-{}.pgp",
            crate::crypto::hex(&name)
        ));
        let unavailable = |e: std::io::Error| {
            tracing::error!(error = %e, dir = %dir.display(), "cannot create the import spool file");
            SPOOL_UNAVAILABLE
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(unavailable)?;
        std::fs::remove_file(&path).map_err(unavailable)?;
        Ok(Spool { file })
    }

    /// A handle to read it from the start.
    fn reader(&self) -> Result<std::fs::File, ApiError> {
        use std::io::Seek;
        let mut file = self.file.try_clone().map_err(|_| ApiError::INTERNAL)?;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|_| ApiError::INTERNAL)?;
        Ok(file)
    }
}

const SPOOL_UNAVAILABLE: ApiError = ApiError::new(
    StatusCode::SERVICE_UNAVAILABLE,
    "spool_unavailable",
    "the upload cannot be kept while it is read (spool_dir); nothing was imported",
);

/// Imports running now; each holds a slot while it lives.
static IMPORTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Imports at once, at most: each keeps an upload of up to 16 GiB in `spool_dir`.
const MAX_IMPORTS: usize = 2;

struct ImportSlot;

impl ImportSlot {
    fn take() -> Option<ImportSlot> {
        use std::sync::atomic::Ordering;
        IMPORTS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IMPORTS).then_some(n + 1)
            })
            .ok()
            .map(|_| ImportSlot)
    }
}

impl Drop for ImportSlot {
    fn drop(&mut self) {
        IMPORTS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The spool read as an OpenPGP message: decrypted, decompressed, through a wiping buffer.
fn open_spool(
    file: std::fs::File,
    keys: &[openpgp::ImportKey],
) -> Result<(WipingReader<pgp::composed::Message<'static>>, String), ApiError> {
    let (message, used) = openpgp::open(std::io::BufReader::new(file), keys)?;
    Ok((WipingReader::new(message), used))
}

/// What the first reading found: the key that opened the file, the signer checked, the rows.
struct Checked {
    key: String,
    signer: Option<String>,
    rows: u64,
}

/// Pass one: the file read to its end. Its integrity, its signer (whose key is parsed here,
/// off the worker) and its header are checked; its rows are counted, nothing is kept.
fn check_file(
    file: std::fs::File,
    keys: &[openpgp::ImportKey],
    signer: Option<&[u8]>,
) -> Result<Checked, ApiError> {
    let signer = signer
        .map(|bytes| openpgp::public_key(bytes).map_err(ApiError::from))
        .transpose()?;
    let (reader, used) = open_spool(file, keys)?;
    let mut rows = match Rows::new(reader) {
        Ok(rows) => rows,
        Err(Ok(e)) => return Err(ApiError::from(&e)),
        Err(Err(_)) => return Err(PgpError::Damaged.into()),
    };
    let today = crate::vault::this_month();
    while rows
        .next_row(today)
        .map_err(|_| ApiError::from(PgpError::Damaged))?
        .is_some()
    {}
    if let Some(signer) = &signer {
        openpgp::verify_signer(rows.reader().get_ref(), signer)?;
    }
    Ok(Checked {
        key: used,
        signer: signer.as_ref().map(openpgp::fingerprint_of),
        rows: rows.row,
    })
}

/// Waits, without blocking the worker, for an audit line made by
/// [`crate::vault::Vault::audit_bulk`].
async fn written(
    line: Result<crate::audit::AuditTicket, crate::vault::VaultError>,
) -> Result<(), crate::vault::VaultError> {
    line?.wait().await?;
    Ok(())
}

/// A refused import's audit line; the refusal itself unless the line cannot be written.
async fn refused(vault: &crate::vault::Vault, grant: &Grant<Import>, e: ApiError) -> ApiError {
    let line = vault.audit_bulk(
        grant.actor(),
        grant.project(),
        "cards.import",
        Some(e.code),
        None,
        None,
    );
    match written(line).await {
        Ok(()) => e,
        Err(audit) => ApiError::from(audit),
    }
}

/// `POST /v1/import`: the body is the encrypted file (after the signer's key, when
/// `Import-Signer-Length` is given); the answer is the results, as CSV.
pub async fn import(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = Arc::new(grant::<Import>(&req, &state)?);
    let vault = state.vault.clone();
    let Some(slot) = ImportSlot::take() else {
        let busy = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_imports",
            "two imports are running already; retry when one ends",
        );
        return Err(refused(&vault, &grant, busy).await);
    };
    let keys = {
        let vault = vault.clone();
        web::block(move || vault.import_keys())
            .await
            .map_err(|_| ApiError::INTERNAL)??
    };
    if keys.is_empty() {
        let none = ApiError::new(
            StatusCode::CONFLICT,
            "no_import_key",
            "the vault has no import key yet: make one with `cardvault keys import-key`",
        );
        return Err(refused(&vault, &grant, none).await);
    }
    let signer_len = match req.headers().get(SIGNER_LENGTH_HEADER) {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| (1..=MAX_SIGNER).contains(n))
            .ok_or(ApiError::INVALID_REQUEST)?,
    };
    // The upload, into the spool (the signer's key first, kept in memory). Writes go to the
    // page cache; the spool is never synced, since it need not outlive the import.
    let spool = match Spool::create(&state.config.spool_dir) {
        Ok(spool) => spool,
        Err(e) => return Err(refused(&vault, &grant, e).await),
    };
    let mut signer_bytes = Vec::with_capacity(signer_len);
    let mut total = 0u64;
    while let Some(chunk) = payload.next().await {
        let mut chunk = chunk.map_err(|_| ApiError::INVALID_REQUEST)?;
        total += chunk.len() as u64;
        if total > MAX_UPLOAD {
            return Err(ApiError::BODY_TOO_LARGE);
        }
        if signer_bytes.len() < signer_len {
            let take = (signer_len - signer_bytes.len()).min(chunk.len());
            signer_bytes.extend_from_slice(&chunk.split_to(take));
        }
        if !chunk.is_empty() {
            if let Err(e) = (&spool.file).write_all(&chunk) {
                tracing::error!(error = %e, "writing the import spool failed");
                return Err(refused(&vault, &grant, SPOOL_UNAVAILABLE).await);
            }
        }
    }
    if signer_bytes.len() < signer_len {
        return Err(ApiError::INVALID_REQUEST);
    }

    // Pass one, off the worker.
    let file = spool.reader()?;
    let keys = Arc::new(keys);
    let check_keys = Arc::clone(&keys);
    let signer = (signer_len > 0).then_some(signer_bytes);
    let checked = match web::block(move || check_file(file, &check_keys, signer.as_deref())).await {
        Ok(Ok(checked)) => checked,
        Ok(Err(e)) => return Err(refused(&vault, &grant, e).await),
        Err(_) => return Err(ApiError::INTERNAL),
    };

    // Pass two: rows from a reading thread, imported here, results out as they are durable.
    let (row_tx, row_rx) = tokio::sync::mpsc::channel::<RowItem>(CHUNK * 4);
    let file = spool.reader()?;
    std::thread::Builder::new()
        .name("cardvault-import".into())
        .spawn(move || read_rows(file, &keys, row_tx))
        .map_err(|_| ApiError::INTERNAL)?;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(16);
    actix_web::rt::spawn(import_rows(
        vault,
        grant,
        row_rx,
        out_tx,
        checked,
        (spool, slot),
    ));
    let body = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(HttpResponse::build(StatusCode::OK)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .content_type("text/csv")
        .streaming(body))
}

enum RowItem {
    Row(
        u64,
        Result<Box<crate::portability::rows::ImportRow>, RowError>,
    ),
    /// The second reading failed (the spool changed under it): the import stops there.
    Failed,
}

fn read_rows(
    file: std::fs::File,
    keys: &[openpgp::ImportKey],
    tx: tokio::sync::mpsc::Sender<RowItem>,
) {
    let Ok((reader, _)) = open_spool(file, keys) else {
        let _ = tx.blocking_send(RowItem::Failed);
        return;
    };
    let Ok(mut rows) = Rows::new(reader) else {
        let _ = tx.blocking_send(RowItem::Failed);
        return;
    };
    let today = crate::vault::this_month();
    loop {
        match rows.next_row(today) {
            Ok(Some((n, row))) => {
                if tx
                    .blocking_send(RowItem::Row(n, row.map(Box::new)))
                    .is_err()
                {
                    return; // the import stopped
                }
            }
            Ok(None) => return,
            Err(_) => {
                let _ = tx.blocking_send(RowItem::Failed);
                return;
            }
        }
    }
}

/// One results line: `row,customer_ref,customer,token,status`.
fn result_line(
    row: u64,
    customer_ref: Option<&str>,
    ids: Option<(&str, &str)>,
    status: &str,
) -> web::Bytes {
    let mut line = Vec::with_capacity(96);
    line.extend_from_slice(row.to_string().as_bytes());
    line.push(b',');
    csv_field(&mut line, customer_ref.unwrap_or_default());
    line.push(b',');
    let (customer, token) = ids.unwrap_or_default();
    line.extend_from_slice(customer.as_bytes());
    line.push(b',');
    line.extend_from_slice(token.as_bytes());
    line.push(b',');
    line.extend_from_slice(status.as_bytes());
    line.extend_from_slice(b"\r\n");
    web::Bytes::from(line)
}

/// One row's outcome: its number, its reference (when valid), and what it became.
type Outcome = (
    u64,
    Option<String>,
    Result<crate::vault::Imported, &'static str>,
);

/// Imports a chunk of rows in one transaction; `Err` stops the import (with its code).
async fn import_chunk(
    vault: &crate::vault::Vault,
    grant: &Grant<Import>,
    chunk: Vec<RowItem>,
) -> Result<Vec<Outcome>, &'static str> {
    let mut good = Vec::with_capacity(chunk.len());
    for item in &chunk {
        match item {
            RowItem::Failed => return Err("file_damaged"),
            RowItem::Row(_, Ok(row)) => good.push(&**row),
            RowItem::Row(_, Err(_)) => {}
        }
    }
    let imported = vault.import_cards(grant, &good).await.map_err(|e| {
        tracing::error!(error = %e, "import stopped");
        ApiError::from(e).code
    })?;
    let mut imported = imported.into_iter();
    let mut outcomes = Vec::with_capacity(chunk.len());
    for item in chunk {
        let RowItem::Row(n, row) = item else {
            continue;
        };
        outcomes.push(match row {
            Err(e) => (n, None, Err(e.code())),
            Ok(row) => {
                let reference = row.customer_ref.clone();
                match imported.next() {
                    Some(Ok(done)) => (n, reference, Ok(done)),
                    Some(Err(VaultError::TooManyTokens)) => (n, reference, Err("too_many_tokens")),
                    Some(Err(e)) => (n, reference, Err(e.code())),
                    None => return Err("internal_error"),
                }
            }
        });
    }
    Ok(outcomes)
}

async fn import_rows(
    vault: Arc<crate::vault::Vault>,
    grant: Arc<Grant<Import>>,
    rows: tokio::sync::mpsc::Receiver<RowItem>,
    out: tokio::sync::mpsc::Sender<Result<web::Bytes, std::io::Error>>,
    checked: Checked,
    held: (Spool, ImportSlot),
) {
    let mut counts = Bulk {
        key: checked.key,
        signer: checked.signer,
        ..Bulk::default()
    };
    let mut stopped: Option<&'static str> = None;
    if out
        .send(Ok(web::Bytes::from_static(
            b"row,customer_ref,customer,token,status\r\n",
        )))
        .await
        .is_err()
    {
        stopped = Some("client_gone");
    }
    let items = futures_util::stream::unfold(rows, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    // Rows as they come, up to CHUNK in one transaction, one chunk at a time: chunks commit in
    // file order, so a customer's first row makes it (with two in flight, a later chunk could
    // create it first, with a later row's profile). Once the import stops (the client left,
    // the store failed), no chunk starts, the one in flight finishes, and every row committed
    // is counted whether its line went out or not.
    let mut chunks = std::pin::pin!(items.ready_chunks(CHUNK));
    let mut in_flight = futures_util::stream::FuturesOrdered::new();
    let mut more = true;
    loop {
        while more && stopped.is_none() && in_flight.is_empty() {
            match chunks.next().await {
                Some(chunk) => in_flight.push_back(import_chunk(&vault, &grant, chunk)),
                None => more = false,
            }
        }
        let Some(done) = in_flight.next().await else {
            break;
        };
        let lines = match done {
            Ok(lines) => lines,
            Err(code) => {
                stopped.get_or_insert(code);
                continue;
            }
        };
        for (n, reference, outcome) in lines {
            counts.rows += 1;
            let line = match outcome {
                Ok(done) => {
                    let status = if done.duplicate {
                        counts.duplicate += 1;
                        "duplicate"
                    } else {
                        counts.created += 1;
                        "created"
                    };
                    result_line(
                        n,
                        reference.as_deref(),
                        Some((&done.customer, &done.token)),
                        status,
                    )
                }
                Err(code) => {
                    counts.failed += 1;
                    result_line(n, reference.as_deref(), None, code)
                }
            };
            if stopped.is_none() && out.send(Ok(line)).await.is_err() {
                stopped = Some("client_gone");
            }
        }
    }
    if stopped.is_none() && counts.rows != checked.rows {
        stopped = Some("file_damaged");
    }
    drop(held);
    let audited = written(vault.audit_bulk(
        grant.actor(),
        grant.project(),
        "cards.import",
        stopped,
        None,
        Some(&counts),
    ))
    .await;
    let trailer = match (stopped, audited) {
        (None, Ok(())) => format!(
            "# complete rows={} created={} duplicate={} failed={}\r\n",
            counts.rows, counts.created, counts.duplicate, counts.failed
        ),
        (Some(code), _) => format!("# stopped code={code} rows={}\r\n", counts.rows),
        (None, Err(_)) => format!("# stopped code=audit_unavailable rows={}\r\n", counts.rows),
    };
    let _ = out.send(Ok(web::Bytes::from(trailer))).await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportRequestBody {
    recipient: String,
    #[serde(default)]
    customers: Option<Vec<String>>,
}

/// `POST /v1/exports`: records an export request; nothing leaves yet.
pub async fn request_export(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Export>(&req, &state)?;
    let body = super::read_body_up_to(&req, payload, 8 << 20).await?;
    let body: ExportRequestBody = parse_json(&body)?;
    let vault = state.vault.clone();
    let (id, fingerprint) =
        web::block(move || vault.request_export(&grant, body.recipient.as_bytes(), body.customers))
            .await
            .map_err(|_| ApiError::INTERNAL)??;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({
            "id": id,
            "recipient_fingerprint": fingerprint,
            "expires_in_seconds": crate::vault::EXPORT_TTL_SECS,
        }),
    ))
}

/// `POST /v1/exports/{id}/approve`: a second identity approves.
pub async fn approve_export(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Export>(&req, &state)?;
    let id = path.into_inner();
    let vault = state.vault.clone();
    web::block(move || vault.approve_export(&grant, &id))
        .await
        .map_err(|_| ApiError::INTERNAL)??;
    Ok(json(StatusCode::OK, &serde_json::json!({"approved": true})))
}

/// `POST /v1/exports/{id}/file`: the export, encrypted to its recipient only, streamed as it
/// is written. The plaintext rows pass from the reading thread to the encrypting one in
/// wiped buffers; a failure after the first byte ends the stream without its last chunk.
pub async fn fetch_export(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grant = grant::<Export>(&req, &state)?;
    let id = path.into_inner();
    let vault = state.vault.clone();
    let plan = {
        let vault = vault.clone();
        let grant_ref = grant;
        web::block(move || vault.export_plan(&grant_ref, &id).map(|p| (p, grant_ref)))
            .await
            .map_err(|_| ApiError::INTERNAL)??
    };
    let (plan, grant) = plan;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(8);
    let (plain_tx, plain_rx) = std::sync::mpsc::sync_channel::<Plain>(64);
    let plan = Arc::new(plan);
    let reader_plan = Arc::clone(&plan);
    let reader_vault = vault.clone();
    let rows = std::thread::Builder::new()
        .name("cardvault-export".into())
        .spawn(move || {
            let rows = reader_vault.export_rows(&reader_plan, &mut |line| {
                plain_tx
                    .send(Plain::Line(zeroize::Zeroizing::new(line.to_vec())))
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            });
            // Only a complete export is marked so; without the mark the encryptor fails
            // rather than seal a file that lacks rows.
            if rows.is_ok() {
                let _ = plain_tx.send(Plain::Done);
            }
            rows
        })
        .map_err(|_| ApiError::INTERNAL)?;
    std::thread::Builder::new()
        .name("cardvault-export-pgp".into())
        .spawn(move || {
            let sender = tx.clone();
            let sink = ChunkWriter(move |chunk: &[u8]| {
                sender
                    .blocking_send(Ok(web::Bytes::copy_from_slice(chunk)))
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            });
            let encrypted = openpgp::encrypt_to(&plan.recipient, PlainReader::new(plain_rx), sink);
            let rows = rows
                .join()
                .unwrap_or(Err(VaultError::Integrity("export".into())));
            // The first cause: the rows failing, else the encryption (a write failing is the
            // client leaving), rather than the other side stopping because of it.
            let outcome: Result<u64, &'static str> = match (encrypted, rows) {
                (Ok(()), Ok(n)) => Ok(n),
                (_, Err(e)) if e.code() != "client_gone" => Err(e.code()),
                (Err(PgpError::Write), _) => Err("client_gone"),
                (Err(e), _) => Err(e.code()),
                (Ok(()), Err(e)) => Err(e.code()),
            };
            if outcome.is_err() {
                let _ = tx.blocking_send(Err(std::io::Error::other("the export stopped")));
            }
            let counts = Bulk {
                key: plan.recipient_fingerprint.clone(),
                rows: *outcome.as_ref().unwrap_or(&0),
                ..Bulk::default()
            };
            let line = vault.audit_bulk(
                grant.actor(),
                &plan.project,
                "export.fetched",
                outcome.err(),
                Some(&plan.id),
                Some(&counts),
            );
            if let Err(e) = line.and_then(|ticket| Ok(ticket.wait_blocking()?)) {
                tracing::error!(error = %e, "the export could not be audited");
            }
        })
        .map_err(|_| ApiError::INTERNAL)?;
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(HttpResponse::build(StatusCode::OK)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .content_type("application/pgp-encrypted")
        .streaming(body))
}

/// A `Write` that hands each write to a function.
struct ChunkWriter<F>(F);

impl<F: FnMut(&[u8]) -> std::io::Result<()>> Write for ChunkWriter<F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (self.0)(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the export thread hands the encrypting one.
enum Plain {
    Line(zeroize::Zeroizing<Vec<u8>>),
    /// Every row was sent.
    Done,
}

/// A `Read` over plaintext lines from the export thread; each is wiped once read. The end of
/// the rows without [`Plain::Done`] is an error, so a partial export is never sealed.
struct PlainReader {
    rx: std::sync::mpsc::Receiver<Plain>,
    current: zeroize::Zeroizing<Vec<u8>>,
    pos: usize,
    done: bool,
}

impl PlainReader {
    fn new(rx: std::sync::mpsc::Receiver<Plain>) -> PlainReader {
        PlainReader {
            rx,
            current: zeroize::Zeroizing::new(Vec::new()),
            pos: 0,
            done: false,
        }
    }
}

impl std::io::Read for PlainReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Plain::Line(next)) => {
                    self.current = next;
                    self.pos = 0;
                }
                Ok(Plain::Done) => self.done = true,
                Err(_) => return Err(std::io::Error::other("the export's rows stopped")),
            }
        }
        let n = crate::portability::rows::copy_out(self.current.get(self.pos..), out);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn line(text: &str) -> Plain {
        Plain::Line(zeroize::Zeroizing::new(text.as_bytes().to_vec()))
    }

    /// Rows that stop without their end mark are an error to the encryptor, so an export
    /// whose reading failed midway is never sealed as a whole file.
    #[test]
    fn the_export_reader_fails_unless_every_row_was_sent() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(line("a,b\r\n")).unwrap();
        tx.send(line("c,d\r\n")).unwrap();
        tx.send(Plain::Done).unwrap();
        let mut all = String::new();
        PlainReader::new(rx).read_to_string(&mut all).unwrap();
        assert_eq!(all, "a,b\r\nc,d\r\n");

        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(line("a,b\r\n")).unwrap();
        drop(tx);
        assert!(PlainReader::new(rx).read_to_end(&mut Vec::new()).is_err());

        // And the encryption stops on it.
        let recipient = openpgp::public_key(
            openpgp::ImportKey::generate(Algorithm::Curve25519, "r")
                .unwrap()
                .public_armored()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(line("a,b\r\n")).unwrap();
        drop(tx);
        let mut out = Vec::new();
        assert!(openpgp::encrypt_to(&recipient, PlainReader::new(rx), &mut out).is_err());
    }

    /// At most two imports hold a slot at once; a slot is given back when dropped.
    #[test]
    fn imports_take_one_of_two_slots() {
        let first = ImportSlot::take().unwrap();
        let second = ImportSlot::take().unwrap();
        assert!(ImportSlot::take().is_none());
        drop(first);
        let third = ImportSlot::take().unwrap();
        drop((second, third));
    }
}
