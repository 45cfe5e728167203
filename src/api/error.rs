//! The one mapping from errors to HTTP: `{"error": {"code", "message"}}` with a stable code
//! and a fixed message. Nothing submitted is ever echoed; the cause is logged server-side.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::card::CardError;
use crate::customer::FieldError;
use crate::policy::Denied;
use crate::store::StoreError;
use crate::vault::VaultError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: &'static str,
}

impl ApiError {
    pub const fn new(status: StatusCode, code: &'static str, message: &'static str) -> ApiError {
        ApiError {
            status,
            code,
            message,
        }
    }

    pub const FORBIDDEN: ApiError = ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "the caller may not do this",
    );
    pub const NOT_FOUND: ApiError =
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such object");
    pub const METHOD_NOT_ALLOWED: ApiError = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path",
    );
    pub const INVALID_JSON: ApiError = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        "the request body is not valid JSON",
    );
    pub const INVALID_REQUEST: ApiError = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "the request body does not have the fields and types this endpoint takes",
    );
    pub const BODY_TOO_LARGE: ApiError = ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "the request body is too large",
    );
    pub const INVALID_PROJECT: ApiError = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_project",
        "Vault-Project must be 1-64 characters of a-z, 0-9, '_' and '-'",
    );
    pub const PROHIBITED_DATA: ApiError = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "prohibited_data",
        "track data and PIN blocks are never accepted",
    );
    pub const INVALID_FIELD: ApiError = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        "reason and reference must be short printable text without card numbers",
    );
    pub const IDEMPOTENCY_CONFLICT: ApiError = ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        "this Idempotency-Key was used with a different request",
    );
    pub const IDEMPOTENCY_IN_PROGRESS: ApiError = ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_in_progress",
        "the first request with this Idempotency-Key is still running; retry shortly",
    );
    pub const INVALID_IDEMPOTENCY_KEY: ApiError = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_idempotency_key",
        "Idempotency-Key must be 1-255 printable ASCII characters",
    );
    pub const RATE_LIMITED: ApiError = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "this caller is over its detokenization limit; slow down",
    );
    pub const SEALED: ApiError = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "sealed",
        "the vault is sealed: custodians must unseal it before it serves card data",
    );
    pub const INTERNAL: ApiError = ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "internal error",
    );
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.code)
    }
}

impl ApiError {
    /// The JSON body this error is sent with.
    pub fn body(&self) -> Vec<u8> {
        let body = Body {
            error: Inner {
                code: self.code,
                message: self.message,
            },
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status)
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .content_type("application/json")
            .body(self.body())
    }
}

impl From<CardError> for ApiError {
    fn from(e: CardError) -> ApiError {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        match e {
            CardError::InvalidNumber => ApiError::new(
                status,
                "invalid_number",
                "card number must be 12 to 19 digits and pass the Luhn check",
            ),
            CardError::InvalidExpiry => ApiError::new(
                status,
                "invalid_expiry",
                "expiry is malformed or in the past",
            ),
            CardError::InvalidCvc => {
                ApiError::new(status, "invalid_cvc", "CVC must be 3 or 4 digits")
            }
            CardError::InvalidHolderName => ApiError::new(
                status,
                "invalid_holder_name",
                "holder name must be 1 to 100 characters, without digits or control characters",
            ),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> ApiError {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        match e {
            FieldError::Email => ApiError::new(status, "invalid_email", "email is not a valid address"),
            FieldError::Phone => ApiError::new(status, "invalid_phone", "phone must hold 4 to 15 digits"),
            FieldError::Text => ApiError::new(
                status,
                "invalid_field",
                "a text field is empty, too long, holds control characters, or looks like a card number",
            ),
            FieldError::Country => ApiError::new(status, "invalid_country", "country must be a two-letter ISO 3166 code"),
            FieldError::Metadata => ApiError::new(
                status,
                "invalid_metadata",
                "metadata: at most 50 keys of up to 40 characters, values up to 500, no card numbers",
            ),
            FieldError::RecurringModel | FieldError::SchemeTransactionId => ApiError::new(
                status,
                "invalid_recurring",
                "recurring needs model unscheduled, subscription or installment, and an alphanumeric scheme_transaction_id of up to 64",
            ),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> ApiError {
        tracing::info!(reason = %e, "request denied by policy");
        ApiError::FORBIDDEN
    }
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> ApiError {
        match &e {
            VaultError::NotFound => ApiError::NOT_FOUND,
            VaultError::TokenUsed => ApiError::new(
                StatusCode::CONFLICT,
                "token_used",
                "this card token was already used",
            ),
            VaultError::TokenExpired => ApiError::new(
                StatusCode::GONE,
                "token_expired",
                "this card token has expired",
            ),
            VaultError::Store(
                StoreError::Sled(_)
                | StoreError::Flush(_)
                | StoreError::Thread(_)
                | StoreError::Unavailable
                | StoreError::Database(_)
                | StoreError::InUse
                | StoreError::Damaged(_)
                | StoreError::TooNew { .. }
                | StoreError::SchemaTooNew { .. },
            ) => {
                tracing::error!(error = %e, "storage failure");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "the store cannot take writes right now; retry later",
                )
            }
            // `Unaudited`: the object was made, and is kept under the request's
            // Idempotency-Key (see `api::idempotent`); the client is refused all the same.
            VaultError::Audit(_) | VaultError::Unaudited { .. } => {
                tracing::error!(error = %e, "audit failure");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "the audit trail cannot be written; the request was refused",
                )
            }
            VaultError::Store(StoreError::Query(_)) => {
                tracing::error!(error = %e, "the database refused a query");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage_error",
                    "the store refused the operation",
                )
            }
            VaultError::Integrity(_) | VaultError::Store(StoreError::Corrupt(_)) => {
                tracing::error!(error = %e, "stored record failed its integrity check");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "record_integrity",
                    "a stored record failed its integrity check",
                )
            }
            VaultError::Field(f) => ApiError::from(*f),
            VaultError::TooManyTokens => ApiError::new(
                StatusCode::CONFLICT,
                "too_many_tokens",
                "this customer already holds the most cards allowed (100); delete one first",
            ),
            VaultError::Contention => {
                tracing::warn!(error = %e, "request lost too many races");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "contention",
                    "too many concurrent changes to the same objects; retry",
                )
            }
            VaultError::Sealed => ApiError::SEALED,
            VaultError::Forbidden => ApiError::FORBIDDEN,
            VaultError::RateLimited => ApiError::RATE_LIMITED,
            VaultError::ReloadRefused => ApiError::INTERNAL,
            VaultError::Refused { code, message } => {
                let status = match *code {
                    "self_approval" => StatusCode::FORBIDDEN,
                    "export_expired" => StatusCode::GONE,
                    "export_not_approved" | "export_already_approved" => StatusCode::CONFLICT,
                    "key_generation_failed" | "client_gone" => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                ApiError::new(status, code, message)
            }
            VaultError::NoCustody => ApiError::new(
                StatusCode::CONFLICT,
                "no_custody",
                "this vault's key is not held by custodians; there is nothing to unseal or rekey",
            ),
            VaultError::ShareRefused(why) => {
                tracing::warn!(reason = %why, "key share refused");
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "share_refused",
                    "the share was refused: it is not this custodian's share of the KEK in use",
                )
            }
            VaultError::WrongKek(_) => {
                tracing::error!(error = %e, "wrong key-encryption key");
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "wrong_kek",
                    "the shares rebuild a key that does not open this store",
                )
            }
            VaultError::Hsm(_) => {
                tracing::error!(error = %e, "the HSM could not be used");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "hsm_unavailable",
                    "the HSM holding the KEK could not be used; the daemon's log says why",
                )
            }
            VaultError::Seal(_) => {
                tracing::warn!(error = %e, "seal change refused");
                ApiError::new(
                    StatusCode::CONFLICT,
                    "seal_refused",
                    "the seal cannot be changed as asked; the daemon's log says why",
                )
            }
            VaultError::CvcCapacity => {
                tracing::warn!("CVC cache full: a tokenization with a CVC was refused");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cvc_capacity",
                    "too many CVCs are waiting for their first use; retry later, or tokenize \
                     without the CVC",
                )
            }
            VaultError::BackupRefused(_) => {
                tracing::warn!(error = %e, "backup refused");
                ApiError::new(
                    StatusCode::CONFLICT,
                    "backup_refused",
                    "no backup is taken here: a PostgreSQL store is backed up with the \
                     database's own tools",
                )
            }
            VaultError::KeyExhausted => {
                tracing::error!(error = %e, "data key exhausted; rotate now");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "key_exhausted",
                    "the data key reached its encryption limit; an operator must rotate keys",
                )
            }
            VaultError::Keys(_) | VaultError::Id(_) => {
                tracing::error!(error = %e, "internal failure");
                ApiError::INTERNAL
            }
        }
    }
}

impl From<crate::forward::Failure> for ApiError {
    fn from(f: crate::forward::Failure) -> ApiError {
        use crate::forward::Failure;
        let (status, code, message) = match f {
            Failure::ReceiverNotFound => (
                StatusCode::NOT_FOUND,
                "receiver_not_found",
                "no receiver of that name is registered",
            ),
            Failure::ProjectNotAllowed => (
                StatusCode::FORBIDDEN,
                "receiver_project_not_allowed",
                "this receiver does not take requests for this project",
            ),
            Failure::MethodNotAllowed => (
                StatusCode::FORBIDDEN,
                "receiver_method_not_allowed",
                "this receiver does not take this method",
            ),
            Failure::PathNotAllowed => (
                StatusCode::FORBIDDEN,
                "receiver_path_not_allowed",
                "this receiver does not take this path",
            ),
            Failure::InvalidPath => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_path",
                "path must be an absolute path without dot segments, encoded separators, \
                 fragment or card numbers",
            ),
            Failure::InvalidHeader => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_header",
                "a header is malformed, reserved to the vault, too long, or holds a card number",
            ),
            Failure::InvalidPlaceholder => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_placeholder",
                "a {{...}} placeholder is not one of card.number, card.exp_month, \
                 card.exp_year, card.exp_year2, card.cvc, card.holder_name",
            ),
            Failure::InvalidBody => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "a form body must be an object of text, number or boolean values",
            ),
            Failure::UnsupportedContentType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_type",
                "a body is sent as application/json (or +json) or \
                 application/x-www-form-urlencoded",
            ),
            Failure::AddressRefused => (
                StatusCode::BAD_GATEWAY,
                "receiver_address_refused",
                "the receiver's host resolves to an address the vault may not connect to",
            ),
            Failure::Unreachable => (
                StatusCode::BAD_GATEWAY,
                "receiver_unreachable",
                "the receiver could not be reached; nothing was sent",
            ),
            Failure::Tls => (
                StatusCode::BAD_GATEWAY,
                "receiver_tls_failed",
                "the receiver's TLS certificate or handshake was refused; nothing was sent",
            ),
            Failure::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "receiver_timeout",
                "the receiver did not answer in time",
            ),
            Failure::ConnectionLost => (
                StatusCode::BAD_GATEWAY,
                "receiver_failed",
                "the connection to the receiver failed after the request was sent",
            ),
            Failure::ResponseTooLarge => (
                StatusCode::BAD_GATEWAY,
                "receiver_response_too_large",
                "the receiver's answer is larger than 1 MiB",
            ),
            Failure::ResponseInvalid => (
                StatusCode::BAD_GATEWAY,
                "receiver_response_invalid",
                "the receiver's answer is compressed or not text, so it cannot be masked",
            ),
        };
        ApiError::new(status, code, message)
    }
}

impl ApiError {
    /// A forward's error: the body says whether the forward used its card token up (the
    /// card may have reached the PSP), so the caller knows whether it can try again.
    pub fn forward_response(&self, token_used: bool) -> HttpResponse {
        let body = serde_json::json!({"error": {
            "code": self.code,
            "message": self.message,
            "token_used": token_used,
        }});
        HttpResponse::build(self.status)
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(body)
    }
}
