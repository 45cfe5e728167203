//! The domain service: tokenize a card, read its metadata, detokenize it once.
//!
//! It takes parsed card types and policy grants, and knows nothing of HTTP. It is the only
//! module that joins the key hierarchy (`crypto`) to the records (`store`):
//!
//! - every project has its own DEK (versioned) and fingerprint key, created on the project's
//!   first write, wrapped by the KEK and kept in the store only in wrapped form;
//! - a card record holds two sealed blobs, the metadata and the PAN, each bound by its AAD to
//!   project, id, blob kind and key version, so a blob moved to another record never opens;
//! - a card token is used by one atomic compare-and-swap that drops the PAN blob; the swap is
//!   made durable before the PAN is decrypted and handed out, so a crash can lose a payment's
//!   card but never hand the same card out twice;
//! - CVCs live in process memory ([`CvcCache`]) on sled. On a shared store (PostgreSQL, where
//!   several nodes serve) they are sealed under the project's DEK in their own table until
//!   their first use or `cvc_ttl`, whichever comes first.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

pub mod backup;
mod customers;
mod forward;
mod idempotency;
mod keys;
mod meta;
mod portability;

pub use customers::{TokenPatch, TokenView};
pub use forward::Ready;
pub use idempotency::Begin;
pub use keys::{seal_new_store, store_kek_ids, KeySettings, KeySource, GCM_NONCE_LIMIT};
pub use portability::{Bulk, Imported, EXPORT_TTL_SECS};

use crate::audit::{Actor, AuditEvent, AuditSink, AuditTicket, Outcome};
use crate::card::{Cvc, Expiry, HolderName, Pan};
use crate::crypto::{aad, CryptoError, FingerprintKey, SealingKey};
use crate::policy::{Detokenize, Disclosure, Grant, Read, Tokenize};
use crate::store::{CardRecord, Store, StoreError, Swap};
use crate::tokens::{IdError, IdKind, ObjectId, Project};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("no such object in this project")]
    NotFound,
    #[error("token already used")]
    TokenUsed,
    #[error("token expired")]
    TokenExpired,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("record {0} failed authentication: wrong key, or the store was tampered with")]
    Integrity(String),
    #[error("key hierarchy: {0}")]
    Keys(CryptoError),
    #[error("id generation: {0}")]
    Id(#[from] IdError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// A creating operation committed `object`, then its audit line could not be written.
    /// The caller is answered as for [`VaultError::Audit`]; the API keeps `object` under the
    /// request's `Idempotency-Key`, so that a retry gets it instead of making a second one.
    #[error("{object} was committed, but its audit line was lost: {cause}")]
    Unaudited {
        object: String,
        /// The object existed before (an attach that found the card already held).
        duplicate: bool,
        cause: crate::audit::AuditError,
    },
    #[error("{0}")]
    Field(crate::customer::FieldError),
    #[error("gave up after repeated conflicting concurrent changes")]
    Contention,
    #[error("the customer holds the most tokens allowed")]
    TooManyTokens,
    #[error("the vault is sealed")]
    Sealed,
    #[error("this vault's KEK is not held by custodians")]
    NoCustody,
    #[error("{0}")]
    ShareRefused(String),
    #[error("wrong key-encryption key: {0}")]
    WrongKek(String),
    /// The PKCS#11 device could not be used (unreachable, PIN, key missing or refused).
    #[error(transparent)]
    Hsm(crate::crypto::pkcs11::HsmError),
    /// A seal migration that cannot be done as asked (the detail is logged).
    #[error("seal: {0}")]
    Seal(String),
    /// The in-memory CVC cache is full of codes not yet used or expired.
    #[error("too many CVCs are waiting for their first use")]
    CvcCapacity,
    /// A backup that cannot be taken here, or stopped.
    #[error("backup: {0}")]
    BackupRefused(String),
    #[error("a data key reached its encryption limit")]
    KeyExhausted,
    /// Only for audit records of policy denials; the API answers those itself.
    #[error("denied by policy")]
    Forbidden,
    /// Only for audit records of detokenization limits; the API answers those itself.
    #[error("over the detokenization limit")]
    RateLimited,
    /// Only for audit records of a refused `SIGHUP` reload.
    #[error("reload refused")]
    ReloadRefused,
    /// An import or export step refused as asked (self-approval, an expired request...).
    #[error("{message}")]
    Refused {
        code: &'static str,
        message: &'static str,
    },
}

impl VaultError {
    /// A stable code for audit records (the API layer keeps its own mapping to HTTP).
    pub fn code(&self) -> &'static str {
        match self {
            VaultError::NotFound => "not_found",
            VaultError::TokenUsed => "token_used",
            VaultError::TokenExpired => "token_expired",
            VaultError::Store(_) => "storage_unavailable",
            VaultError::Integrity(_) => "record_integrity",
            VaultError::Keys(_) | VaultError::Id(_) => "internal_error",
            VaultError::Audit(_) | VaultError::Unaudited { .. } => "audit_unavailable",
            VaultError::Field(_) => "invalid_field",
            VaultError::Contention => "contention",
            VaultError::TooManyTokens => "too_many_tokens",
            VaultError::Sealed => "sealed",
            VaultError::NoCustody => "no_custody",
            VaultError::ShareRefused(_) => "share_refused",
            VaultError::WrongKek(_) => "wrong_kek",
            VaultError::Hsm(_) => "hsm_unavailable",
            VaultError::Seal(_) => "seal_refused",
            VaultError::BackupRefused(_) => "backup_refused",
            VaultError::CvcCapacity => "cvc_capacity",
            VaultError::KeyExhausted => "key_exhausted",
            VaultError::Forbidden => "forbidden",
            VaultError::RateLimited => "rate_limited",
            VaultError::ReloadRefused => "reload_refused",
            VaultError::Refused { code, .. } => code,
        }
    }

    /// The error of an audit line that failed after `action` committed `object`: an audit
    /// failure becomes [`VaultError::Unaudited`] (logged here, with ids only), anything else
    /// stays as it is. Allocates only on that failure.
    fn unaudited(self, action: &'static str, object: &str, duplicate: bool) -> VaultError {
        match self {
            VaultError::Audit(cause) => {
                tracing::error!(
                    action,
                    object,
                    error = %cause,
                    "object committed, but its audit line was lost"
                );
                VaultError::Unaudited {
                    object: object.to_owned(),
                    duplicate,
                    cause,
                }
            }
            other => other,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VaultSettings {
    pub card_token_ttl: Duration,
    pub cvc_ttl: Duration,
    /// sled: the most CVCs held in memory at once (see [`CvcCache`]).
    pub cvc_max: usize,
    pub keys: KeySettings,
}

impl From<&crate::config::Config> for VaultSettings {
    fn from(config: &crate::config::Config) -> VaultSettings {
        VaultSettings {
            card_token_ttl: config.card_token_ttl,
            cvc_ttl: config.cvc_ttl,
            cvc_max: config.cvc_max,
            keys: config.keys.clone(),
        }
    }
}

/// A card as accepted at tokenization.
#[derive(Debug)]
pub struct NewCard {
    pub pan: Pan,
    pub expiry: Expiry,
    pub cvc: Option<Cvc>,
    pub holder_name: Option<HolderName>,
}

/// Card details handed out by detokenization.
#[derive(Debug)]
pub struct CardDetails {
    pub pan: Pan,
    pub expiry: Expiry,
    pub holder_name: Option<HolderName>,
    pub cvc: Option<Cvc>,
    /// Recurring (MIT) data of a customer token.
    pub recurring: Option<crate::customer::Recurring>,
}

impl CardDetails {
    /// Details from a decrypted PAN and the card's metadata; a PAN that no longer parses means
    /// the record is damaged.
    fn open(
        digits: &[u8],
        meta: &CardMeta,
        cvc: Option<Cvc>,
        recurring: Option<crate::customer::Recurring>,
        id: &str,
    ) -> Result<CardDetails, VaultError> {
        Ok(CardDetails {
            pan: Pan::from_digits(digits).map_err(|_| VaultError::Integrity(id.to_owned()))?,
            expiry: Expiry::stored(meta.exp_month, meta.exp_year),
            holder_name: meta
                .holder_name
                .as_deref()
                .and_then(|h| HolderName::stored(h).ok()),
            cvc,
            recurring,
        })
    }
}

/// Why a detokenization happened, for the audit trail.
#[derive(Debug, Default)]
pub struct Purpose {
    pub reason: Option<String>,
    pub reference: Option<String>,
}

impl Purpose {
    /// A reason only: for refusals and the daemon's own operations.
    fn because(reason: &str) -> Purpose {
        Purpose {
            reason: Some(reason.to_owned()),
            reference: None,
        }
    }
}

redacted_debug!(CardMeta, CardView, ShownCard);

/// What may be shown about a card: never the PAN.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CardMeta {
    pub scheme: String,
    pub iin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iin8: Option<String>,
    pub last4: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub holder_name: Option<String>,
    pub fingerprint: String,
}

/// What one caller is shown of a card: [`CardMeta`] cut to the caller's [`Disclosure`].
/// Views are only ever made through [`CardMeta::shown`].
#[derive(Clone, Serialize)]
pub struct ShownCard {
    pub scheme: String,
    pub iin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iin8: Option<String>,
    pub last4: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub holder_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl CardMeta {
    /// What may be shown of a card, with its fingerprint (made by the caller, who may need it
    /// before this).
    fn of(
        pan: &Pan,
        expiry: &Expiry,
        holder_name: Option<&HolderName>,
        fingerprint: String,
    ) -> CardMeta {
        CardMeta {
            scheme: pan.scheme().as_str().to_owned(),
            iin: pan.iin().to_owned(),
            iin8: pan.iin8().map(str::to_owned),
            last4: pan.last4().to_owned(),
            exp_month: expiry.month(),
            exp_year: expiry.year(),
            holder_name: holder_name.map(|h| h.as_str().to_owned()),
            fingerprint,
        }
    }

    /// The metadata as `disclosure` lets its caller see it.
    pub fn shown(self, disclosure: Disclosure) -> ShownCard {
        ShownCard {
            scheme: self.scheme,
            iin: self.iin,
            iin8: self.iin8.filter(|_| disclosure.iin8),
            last4: self.last4,
            exp_month: self.exp_month,
            exp_year: self.exp_year,
            // A name stored under the older rule (only ASCII digits refused) that holds a card
            // number by the current free-text rule (fullwidth digits, say) is not shown.
            holder_name: self.holder_name.filter(|h| !crate::card::contains_pan(h)),
            fingerprint: Some(self.fingerprint).filter(|_| disclosure.fingerprint),
        }
    }
}

/// A card token's public view.
#[derive(Clone, Serialize)]
pub struct CardView {
    pub id: String,
    pub object: &'static str,
    #[serde(flatten)]
    pub card: ShownCard,
    pub created_at: String,
    pub expires_at: String,
    pub used: bool,
}

/// What a sealed blob is; part of its AAD, so a blob never opens as another kind.
#[derive(Clone, Copy)]
enum Blob {
    Meta,
    Pan,
    CustomerProfile,
    TokenMeta,
    TokenPan,
    /// A CVC kept in a shared store until its first use or `cvc_ttl`.
    Cvc,
}

fn record_aad(blob: Blob, project: &Project, id: &str, key_version: u32) -> Vec<u8> {
    let kind: &[u8] = match blob {
        Blob::Meta => b"card-meta",
        Blob::Pan => b"card-pan",
        Blob::CustomerProfile => b"customer-profile",
        Blob::TokenMeta => b"token-meta",
        Blob::TokenPan => b"token-pan",
        Blob::Cvc => b"card-cvc",
    };
    aad(&[
        b"cardvault/record/v1",
        kind,
        project.as_str().as_bytes(),
        id.as_bytes(),
        &key_version.to_be_bytes(),
    ])
}

fn key_aad(project: &Project, name: &str) -> Vec<u8> {
    aad(&[
        b"cardvault/key/v1",
        project.as_str().as_bytes(),
        name.as_bytes(),
    ])
}

/// A project's unwrapped keys, schedules prepared once: the active DEK (which seals), the
/// decrypt-only DEKs of older versions, and the fingerprint key.
struct ProjectKeys {
    dek_version: u32,
    /// [`Store::generation`] when these were loaded.
    store_generation: u64,
    active: Arc<keys::Dek>,
    older: HashMap<u32, SealingKey>,
    fingerprint: FingerprintKey,
}

impl ProjectKeys {
    /// Every DEK version these keys open.
    fn versions(&self) -> Vec<u32> {
        std::iter::once(self.dek_version)
            .chain(self.older.keys().copied())
            .collect()
    }

    fn opener(&self, version: u32) -> Option<&SealingKey> {
        if version == self.dek_version {
            Some(&self.active.key)
        } else {
            self.older.get(&version)
        }
    }
}

/// Card verification codes, in memory only: taken (and wiped) by the first detokenization,
/// or wiped by the sweeper once `cvc_ttl` has passed (to the millisecond). A restart forgets
/// them all, by design.
///
/// Compact, because a busy vault holds a CVC for every card tokenized in the last `cvc_ttl`:
/// an entry is 26 bytes (plus the map's control byte and free slots). An HMAC of the project
/// and token id under a key made at start (and never stored) gives each entry its map key (16
/// bytes) and a 4-byte mask; the map holds the CVC's digits XORed with that mask, so it holds
/// neither token ids nor codes in the clear.
///
/// The key is in the same memory, so the masked digits are still wiped: in place before an
/// entry is removed, and the whole old table before the map is moved to a bigger one (the map
/// is grown here, never by the standard library, which would free the old table as it is).
///
/// **Bounded.** It holds at most `cvc_max` codes (default 1,000,000: a table of 2^21 slots,
/// about 54 MiB, never grown past what that needs; twice that for the moment a growing table
/// is copied). When it is full, expired codes are
/// wiped at once, and if it is still full a tokenization that brings a CVC is refused with 503
/// `cvc_capacity` before anything is stored: a caller flooding it cannot grow the process
/// without bound, nor push out a code another caller's payment still needs. A tokenization
/// without a CVC is unaffected. Concurrent tokenizations may overshoot the cap by the
/// requests in flight.
struct CvcCache {
    key: ring::hmac::Key,
    /// Expiry times are milliseconds since this instant.
    epoch: Instant,
    entries: Mutex<HashMap<[u8; 16], CvcEntry>>,
    max: usize,
}

#[derive(Clone, Zeroize)]
struct CvcEntry {
    masked: [u8; 4],
    /// Milliseconds since [`CvcCache::epoch`], rounded up, in 48 bits (8,900 years), little
    /// endian: six bytes where a `u64` would pad the entry to 32.
    expires: [u8; 6],
}

impl CvcEntry {
    /// `expires` is measured from the cache's epoch.
    fn new(masked: [u8; 4], expires: Duration) -> CvcEntry {
        let ms = u64::try_from(expires.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(u64::from(!expires.subsec_nanos().is_multiple_of(1_000_000)))
            .min((1 << 48) - 1);
        let [a, b, c, d, e, f, _, _] = ms.to_le_bytes();
        CvcEntry {
            masked,
            expires: [a, b, c, d, e, f],
        }
    }

    fn expires(&self) -> Duration {
        let [a, b, c, d, e, f] = self.expires;
        Duration::from_millis(u64::from_le_bytes([a, b, c, d, e, f, 0, 0]))
    }
}

/// XORs `mask` into `digits`: masks a code, or unmasks a masked one.
fn xor_mask(digits: &mut [u8; 4], mask: &[u8; 4]) {
    digits.iter_mut().zip(mask).for_each(|(b, m)| *b ^= m);
}

impl CvcCache {
    /// The smallest table the map is rebuilt into.
    const MIN_CAPACITY: usize = 1024;

    /// How many codes are held.
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn new(max: usize) -> Result<CvcCache, CryptoError> {
        let rng = ring::rand::SystemRandom::new();
        Ok(CvcCache {
            key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .map_err(|_| CryptoError::Rng)?,
            epoch: Instant::now(),
            entries: Mutex::new(HashMap::new()),
            max: max.max(1),
        })
    }

    /// Whether one more code fits, after wiping the expired ones if the cache is full.
    fn room(&self, now: Instant) -> bool {
        if self.len() < self.max {
            return true;
        }
        self.sweep(now);
        self.len() < self.max
    }

    /// The entry's map key and mask.
    fn slot(&self, project: &Project, id: &ObjectId) -> ([u8; 16], Zeroizing<[u8; 4]>) {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(project.as_str().as_bytes());
        ctx.update(b"\0");
        ctx.update(id.as_str().as_bytes());
        let tag = ctx.sign();
        let (mut map_key, mut mask) = ([0u8; 16], Zeroizing::new([0u8; 4]));
        for (slot, b) in map_key.iter_mut().chain(mask.iter_mut()).zip(tag.as_ref()) {
            *slot = *b;
        }
        (map_key, mask)
    }

    fn elapsed(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }

    fn put(&self, project: &Project, id: &ObjectId, cvc: Cvc, until: Instant) {
        let (map_key, mask) = self.slot(project, id);
        let mut masked = cvc.to_bytes();
        xor_mask(&mut masked, &mask);
        let entry = CvcEntry::new(*masked, self.elapsed(until));
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= map.capacity() {
            // Full (or its free slots used up by removals): the next insert would reallocate.
            // Never past what the cap needs: a table sized for twice the cap would double
            // the memory a full cache takes.
            let wanted = (map.len() * 2).min(self.max.max(map.len() + 1));
            let mut fresh = HashMap::with_capacity(wanted.max(Self::MIN_CAPACITY));
            for (k, e) in map.iter_mut() {
                fresh.insert(*k, e.clone());
                e.zeroize();
            }
            *map = fresh;
        }
        if let Some(mut old) = map.insert(map_key, entry) {
            old.zeroize();
        }
    }

    fn take(&self, project: &Project, id: &ObjectId) -> Option<Cvc> {
        self.take_at(project, id, Instant::now())
    }

    fn take_at(&self, project: &Project, id: &ObjectId, now: Instant) -> Option<Cvc> {
        let (map_key, mask) = self.slot(project, id);
        let (mut digits, expires) = {
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.get_mut(&map_key)?;
            let taken = (Zeroizing::new(entry.masked), entry.expires());
            entry.zeroize();
            map.remove(&map_key);
            taken
        };
        if self.elapsed(now) >= expires {
            return None;
        }
        xor_mask(&mut digits, &mask);
        Cvc::from_bytes(&digits)
    }

    fn sweep(&self, now: Instant) -> usize {
        let now = self.elapsed(now);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|_, entry| {
            let keep = now < entry.expires();
            if !keep {
                entry.zeroize();
            }
            keep
        });
        before - map.len()
    }
}

pub struct Vault {
    store: Store,
    keyring: keys::KeyRing,
    /// Unwrapped project keys for the active DEK version. Read-mostly: a write lock only
    /// when a project is first seen or the version changes.
    keys: RwLock<HashMap<Project, Arc<ProjectKeys>>>,
    cvcs: CvcCache,
    settings: VaultSettings,
    audit: Box<dyn AuditSink>,
    /// Random per process: marks the idempotency claims this process owns.
    boot_id: u64,
    /// Card records (live tokens and tombstones), for metrics, as the store counts them:
    /// read every second on sled, every minute on PostgreSQL.
    cards_counted: std::sync::atomic::AtomicU64,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The current (year, month) in UTC, for expiry checks.
pub fn this_month() -> (u16, u8) {
    let now = time::OffsetDateTime::now_utc();
    (
        u16::try_from(now.year()).unwrap_or(0),
        u8::from(now.month()),
    )
}

/// Now, in UTC, to the millisecond (`2026-11-27T07:04:11.123Z`), for audit lines.
pub fn rfc3339_millis() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

const KEK_CHECK_AAD: &[u8] = b"cardvault/kek-check/v1";

impl Vault {
    /// Opens the vault over `store`. With the dev key it is unsealed at once (a wrong key is
    /// refused here, not discovered on the first detokenize); with custodian shares it starts
    /// sealed and waits for [`Vault::unseal`].
    pub fn open(
        store: Store,
        source: KeySource,
        settings: VaultSettings,
        audit: Box<dyn AuditSink>,
    ) -> Result<Arc<Vault>, VaultError> {
        let (custody, dev_kek, device) = match source {
            KeySource::Custody(custody) => (Some(custody), None, None),
            KeySource::Hsm { settings, recovery } => (recovery, None, Some(settings)),
            KeySource::Dev(kek) => (None, Some(kek), None),
        };
        let mut boot_id = [0u8; 8];
        crate::crypto::fill_random(&mut boot_id).map_err(VaultError::Keys)?;
        let vault = Arc::new(Vault {
            store,
            keyring: keys::KeyRing::new(settings.keys.clone(), custody),
            keys: RwLock::new(HashMap::new()),
            cvcs: CvcCache::new(settings.cvc_max).map_err(VaultError::Keys)?,
            settings,
            audit,
            boot_id: u64::from_be_bytes(boot_id),
            cards_counted: std::sync::atomic::AtomicU64::new(0),
        });
        if let Some(kek) = dev_kek {
            vault.install_kek(kek.as_ref())?;
            vault
                .keyring
                .seal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unsealed_by = Some("dev");
        }
        if device.is_some() {
            vault.set_seal_settings(device);
            // The first try here, so a healthy start is serving when it listens; then again
            // with backoff until the device or the custodians unseal it.
            let first = vault.unseal_with_hsm();
            vault.audit_hsm_unseal(&first);
            if first.is_err() {
                keys::spawn_hsm_unseal(Arc::downgrade(&vault));
            }
        }
        spawn_sweeper(Arc::downgrade(&vault));
        spawn_key_maintenance(Arc::downgrade(&vault));
        if vault.store.is_shared() {
            spawn_state_refresh(Arc::downgrade(&vault));
        }
        Ok(vault)
    }

    /// Flushes the store and stops its flush thread; syncs the audit trail.
    pub fn close(&self) -> Result<(), VaultError> {
        self.audit.maintain();
        Ok(self.store.close()?)
    }

    /// Stores `count` test cards (numbers `first..first + count`) in `project` as a
    /// tokenization stores them, without requests, CVCs or audit lines, on `threads` threads;
    /// flushed before it returns. For `cardvault bench --fill`, which builds a large store this
    /// way outside its measured time: the records are exactly what the API would write.
    pub fn bench_fill(
        &self,
        project: &Project,
        first: u64,
        count: u64,
        threads: u64,
    ) -> Result<(), VaultError> {
        let keys = self
            .project_keys(project, true)?
            .ok_or(VaultError::NotFound)?;
        let now = time::OffsetDateTime::now_utc();
        let today = (
            u16::try_from(now.year()).unwrap_or(2026),
            u8::from(now.month()),
        );
        let threads = threads.max(1);
        let make = |n: u64| -> Result<(ObjectId, CardRecord), VaultError> {
            let digits = format!("5{:014}", n % 100_000_000_000_000);
            let card = NewCard {
                pan: Pan::parse(&crate::card::luhn_complete(&digits, 16))
                    .map_err(|_| VaultError::Integrity("bench card".into()))?,
                expiry: Expiry::parse(12, u64::from(today.0) + 3, today)
                    .map_err(|_| VaultError::Integrity("bench card".into()))?,
                cvc: None,
                holder_name: None,
            };
            let id = ObjectId::generate(IdKind::Card)?;
            let (record, _) =
                card_record(&keys, project, &id, &card, self.settings.card_token_ttl)?;
            Ok((id, record))
        };
        // On PostgreSQL a statement of rows at a time, not a commit (a WAL flush) per row.
        let pg = match &self.store {
            Store::Postgres(pg) => Some(pg),
            Store::Sled(_) => None,
        };
        let fill = |numbers: std::iter::StepBy<std::ops::Range<u64>>| -> Result<(), VaultError> {
            let mut rows = Vec::with_capacity(FILL_BATCH);
            for n in numbers {
                let (id, record) = make(n)?;
                let Some(pg) = pg else {
                    // Not awaited one by one: the flush at the end makes them all durable.
                    let _ticket = self.store.wait(self.store.insert_card(
                        project.as_str(),
                        id.as_str(),
                        &record,
                    ))?;
                    continue;
                };
                rows.push((id.as_str().to_owned(), record.encode()));
                if rows.len() == FILL_BATCH {
                    pg.insert_cards(project.as_str(), &rows)?;
                    rows.clear();
                }
            }
            if let Some(pg) = pg.filter(|_| !rows.is_empty()) {
                pg.insert_cards(project.as_str(), &rows)?;
            }
            Ok(())
        };
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let fill = &fill;
                    scope.spawn(move || fill((first + t..first + count).step_by(threads as usize)))
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or(Err(VaultError::Integrity("bench fill".into())))
            })
        })?;
        self.store.flush()?;
        Ok(())
    }

    pub async fn tokenize(
        &self,
        grant: &Grant<Tokenize>,
        card: NewCard,
    ) -> Result<CardView, VaultError> {
        const ACTION: &str = "card.tokenize";
        let result = self.tokenize_inner(grant, card).await;
        let object = result.as_ref().ok().map(|v| v.id.as_str());
        let audited = match self.audit(
            grant.actor(),
            grant.project(),
            ACTION,
            &result,
            object,
            &Purpose::default(),
        ) {
            Ok(ticket) => ticket.wait().await.map_err(VaultError::from),
            Err(e) => Err(e),
        };
        match (audited, result) {
            (Ok(()), result) => result,
            // The card is in the store: the error names it.
            (Err(e), Ok(view)) => Err(e.unaudited(ACTION, &view.id, false)),
            (Err(e), Err(_)) => Err(e),
        }
    }

    async fn tokenize_inner(
        &self,
        grant: &Grant<Tokenize>,
        card: NewCard,
    ) -> Result<CardView, VaultError> {
        let project = grant.project();
        // Before anything is stored: a card must not be stored without the CVC it came with.
        if card.cvc.is_some() && !self.store.is_shared() && !self.cvcs.room(Instant::now()) {
            return Err(VaultError::CvcCapacity);
        }
        let keys = self
            .project_keys(project, true)?
            .ok_or(VaultError::NotFound)?;
        let id = ObjectId::generate(IdKind::Card)?;
        let (record, meta) = card_record(&keys, project, &id, &card, self.settings.card_token_ttl)?;
        // On a shared store the CVC is sealed and written with the card, in one statement:
        // any node may serve the first detokenization. On sled it stays in this process.
        let shared_cvc = match &card.cvc {
            Some(cvc) if self.store.is_shared() => Some((
                keys.dek_version,
                seal(&keys, Blob::Cvc, project, id.as_str(), &cvc.to_bytes()[..])?,
                self.settings.cvc_ttl,
            )),
            _ => None,
        };
        let ticket = match shared_cvc {
            Some(cvc) => {
                self.store
                    .insert_card_with_cvc(project.as_str(), id.as_str(), &record, cvc)
                    .await?
            }
            None => {
                self.store
                    .insert_card(project.as_str(), id.as_str(), &record)
                    .await?
            }
        };
        self.store.durable(ticket).await?;
        if let Some(cvc) = card.cvc.filter(|_| !self.store.is_shared()) {
            self.cvcs
                .put(project, &id, cvc, Instant::now() + self.settings.cvc_ttl);
        }
        Ok(view(&id, meta.shown(grant.disclosure()), &record))
    }

    /// A card token's metadata; the read is an audit line (who read which card), so that
    /// collecting cards' truncations leaves a trace.
    pub async fn card(&self, grant: &Grant<Read>, id: &ObjectId) -> Result<CardView, VaultError> {
        let result = self
            .card_view(grant.project(), id, grant.disclosure())
            .await;
        self.audit(
            grant.actor(),
            grant.project(),
            "card.read",
            &result,
            Some(id.as_str()),
            &Purpose::default(),
        )?
        .wait()
        .await?;
        result
    }

    /// The card a tokenization made, for replaying its `Idempotency-Key`: the caller may
    /// tokenize without holding `read`, and gets back what it got the first time.
    pub async fn tokenized_card(
        &self,
        grant: &Grant<Tokenize>,
        id: &ObjectId,
    ) -> Result<CardView, VaultError> {
        self.card_view(grant.project(), id, grant.disclosure())
            .await
    }

    async fn card_view(
        &self,
        project: &Project,
        id: &ObjectId,
        disclosure: Disclosure,
    ) -> Result<CardView, VaultError> {
        if id.kind() != IdKind::Card {
            return Err(VaultError::NotFound);
        }
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        let record = self
            .store
            .card(project.as_str(), id.as_str())
            .await?
            .ok_or(VaultError::NotFound)?;
        let meta = self.open_meta(&keys, project, id, &record)?;
        Ok(view(id, meta.shown(disclosure), &record))
    }

    /// Hands out a card token's details exactly once, or a customer token's as often as asked.
    pub async fn detokenize(
        &self,
        grant: &Grant<Detokenize>,
        token: &ObjectId,
        purpose: &Purpose,
    ) -> Result<CardDetails, VaultError> {
        let result = match token.kind() {
            IdKind::Card => self.detokenize_card(grant.project(), token).await,
            IdKind::CustomerToken => self.detokenize_customer_token(grant.project(), token).await,
            IdKind::Customer => Err(VaultError::NotFound),
        };
        self.audit(
            grant.actor(),
            grant.project(),
            "card.detokenize",
            &result,
            Some(token.as_str()),
            purpose,
        )?
        .wait()
        .await?;
        result
    }

    async fn detokenize_card(
        &self,
        project: &Project,
        id: &ObjectId,
    ) -> Result<CardDetails, VaultError> {
        if id.kind() != IdKind::Card {
            return Err(VaultError::NotFound);
        }
        let keys = self
            .project_keys(project, false)?
            .ok_or(VaultError::NotFound)?;
        let now = unix_now();
        let (swap, stored_cvc) = self
            .store
            .use_card_taking_cvc(
                project.as_str(),
                id.as_str(),
                now,
                &keys.versions(),
                |current| {
                    if current.used_at.is_some() {
                        return Err(VaultError::TokenUsed);
                    }
                    // Never use a token up with keys that cannot open it.
                    if keys.opener(current.key_version).is_none() {
                        return Err(VaultError::Integrity(id.to_string()));
                    }
                    if current.expires_at <= now || current.pan.is_none() {
                        return Err(VaultError::TokenExpired);
                    }
                    Ok(CardRecord {
                        used_at: Some(now),
                        pan: None,
                        ..current.clone()
                    })
                },
            )
            .await?;
        let (record, ticket) = swap.swapped(VaultError::NotFound)?;
        // The use must be on disk before the card leaves the process: after a crash the token
        // stays used, so the card can never be handed out twice.
        self.store.durable(ticket).await?;
        let cvc = self.take_cvc(&keys, project, id, stored_cvc).await?;
        let meta = self.open_meta(&keys, project, id, &record)?;
        let sealed_pan = record.pan.as_deref().ok_or(VaultError::TokenExpired)?;
        let digits = open(
            &keys,
            Blob::Pan,
            project,
            id.as_str(),
            record.key_version,
            sealed_pan,
        )?;
        CardDetails::open(&digits, &meta, cvc, None, id.as_str())
    }

    /// Takes a card's CVC, if one was given and has not expired: it is gone afterwards,
    /// whichever node took it.
    /// `taken`: what the card's use already took from a shared store, if it looked.
    async fn take_cvc(
        &self,
        keys: &ProjectKeys,
        project: &Project,
        id: &ObjectId,
        taken: Option<Option<crate::store::SealedBlob>>,
    ) -> Result<Option<Cvc>, VaultError> {
        if !self.store.is_shared() {
            return Ok(self.cvcs.take(project, id));
        }
        let taken = match taken {
            Some(taken) => taken,
            None => self.store.take_cvc(project.as_str(), id.as_str()).await?,
        };
        let Some((version, sealed)) = taken else {
            return Ok(None);
        };
        let plain = open(keys, Blob::Cvc, project, id.as_str(), version, &sealed)?;
        let digits: &[u8; 4] = plain
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Integrity(id.to_string()))?;
        Ok(Some(
            Cvc::from_bytes(digits).ok_or_else(|| VaultError::Integrity(id.to_string()))?,
        ))
    }

    fn open_meta(
        &self,
        keys: &ProjectKeys,
        project: &Project,
        id: &ObjectId,
        record: &CardRecord,
    ) -> Result<CardMeta, VaultError> {
        let plain = open(
            keys,
            Blob::Meta,
            project,
            id.as_str(),
            record.key_version,
            &record.meta,
        )?;
        CardMeta::decode(&plain).map_err(|_| VaultError::Integrity(id.to_string()))
    }

    /// Records a key operation (unseal, rotation, rekey), a policy denial, or the daemon's
    /// start and stop in the audit trail; returns once the line is written (these events are
    /// rare, and the blocking wait keeps their callers simple).
    pub fn audit_event<T>(
        &self,
        actor: Actor<'_>,
        action: &'static str,
        result: &Result<T, VaultError>,
    ) -> Result<(), VaultError> {
        Ok(self
            .audit(
                actor,
                &Project::default_project(),
                action,
                result,
                None,
                &Purpose::default(),
            )?
            .wait_blocking()?)
    }

    /// Records a request refused before it acted: `action` names the check (`policy.denied`,
    /// `limit.detokenize`), `refusal` gives the code.
    pub fn audit_refusal(
        &self,
        actor: Actor<'_>,
        project: &Project,
        action: &'static str,
        refusal: VaultError,
        reason: &str,
    ) -> Result<(), VaultError> {
        Ok(self
            .audit(
                actor,
                project,
                action,
                &Err::<(), _>(refusal),
                None,
                &Purpose::because(reason),
            )?
            .wait_blocking()?)
    }

    /// Records an operation the daemon did on its own (automatic rotation, destruction).
    fn audit_system<T>(
        &self,
        action: &'static str,
        result: &Result<T, VaultError>,
        object: Option<&str>,
        reason: &str,
    ) -> Result<(), VaultError> {
        Ok(self
            .audit(
                Actor::system(),
                &Project::default_project(),
                action,
                result,
                object,
                &Purpose::because(reason),
            )?
            .wait_blocking()?)
    }

    /// Whether the vault can serve writes: the store takes them and the audit trail takes
    /// events. `/v1/health` answers 503 when not, so a load balancer stops sending traffic.
    pub fn ready(&self) -> bool {
        self.store.writable() && self.audit.ready().is_ok()
    }

    /// Whether what keeps the vault from serving writes will not mend by itself: a store
    /// failure a reopen cannot fix, or a dead audit writer. `/v1/health` says
    /// `restart_required`, so an operator (or an orchestrator) restarts it.
    pub fn needs_restart(&self) -> bool {
        self.store.needs_restart() || self.audit.needs_restart()
    }

    /// Whether the audit trail can take events; checked before every audited request.
    pub fn audit_ready(&self) -> Result<(), VaultError> {
        Ok(self.audit.ready()?)
    }

    /// Syncs and checks the audit trail (every second, from the sweeper).
    fn maintain_audit(&self) {
        self.audit.maintain();
    }

    fn audit<T>(
        &self,
        actor: Actor<'_>,
        project: &Project,
        action: &'static str,
        result: &Result<T, VaultError>,
        object: Option<&str>,
        purpose: &Purpose,
    ) -> Result<AuditTicket, VaultError> {
        let event = AuditEvent {
            action,
            outcome: if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            actor,
            project: project.as_str(),
            object,
            code: result.as_ref().err().map(VaultError::code),
            reason: purpose.reason.as_deref(),
            reference: purpose.reference.as_deref(),
            forward: None,
            bulk: None,
        };
        Ok(self.audit.record(&event)?)
    }

    /// Drops the PAN of expired card tokens and forgets tombstones after their retention,
    /// reading only the cards due (the store's sweep index). Safe to run while serving:
    /// every change is a compare-and-swap, and a card changed meanwhile is read again.
    fn sweep_cards(&self, now: i64) -> Result<CardSweep, StoreError> {
        let mut sweep = CardSweep::default();
        self.store.sweep_cards(now, &mut |card| {
            sweep.read += 1;
            self.sweep_card(card, now, &mut sweep)
        })?;
        Ok(sweep)
    }

    /// The sweeper's work on one due card; returns what it holds after (`None`: gone).
    fn sweep_card(
        &self,
        card: &crate::store::DueCard,
        now: i64,
        sweep: &mut CardSweep,
    ) -> Result<Option<CardRecord>, StoreError> {
        let Some(record) = &card.record else {
            return Ok(None);
        };
        let (project, id) = (&card.project, &card.id);
        if record.sweep_at() > now {
            // Not due yet (used since it was indexed, or due later in its bucket or group).
            return Ok(Some(record.clone()));
        }
        if record.pan.is_some() {
            let swap = self
                .store
                .wait(self.store.swap_card(project, id, |current| {
                    if current.pan.is_none() || current.expires_at > now {
                        return Err(());
                    }
                    Ok(CardRecord {
                        pan: None,
                        ..current.clone()
                    })
                }))?;
            // Not awaited: an expired token's PAN is unusable whether or not this erasure
            // reaches disk before the next flush.
            if let Swap::Swapped(_, _ticket) = swap {
                sweep.expired += 1;
            }
        } else if self.store.remove_card_if(project, id, record)? {
            sweep.forgotten += 1;
            return Ok(None);
        }
        // Changed by the sweep or by a request meanwhile: due as it now reads.
        self.store.wait(self.store.card(project, id))
    }

    /// Reads the store's card count for metrics (on sled, writing its pending changes first).
    fn count_cards(&self) {
        if let Err(e) = self.store.persist_count() {
            tracing::warn!(error = %e, "could not write the card count");
        }
        match self.store.count_cards() {
            Ok(n) => self.cards_counted.store(n, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "could not count card records"),
        }
    }

    /// What `GET /v1/metrics` shows of the vault: sealed and ready states, each project's
    /// DEK versions with their seal counts and rotation limit (no record scan), and record
    /// counts as of the last sweep.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let deks = self
            .dek_inventory()
            .into_iter()
            .map(|(project, version, state, seals)| {
                // Project names keep an older, narrower PAN rule (SECURITY.md): one that the
                // free-text rule would refuse never becomes a label.
                let project = if crate::card::contains_pan(&project) {
                    "(withheld)".to_owned()
                } else {
                    project
                };
                (
                    project,
                    version,
                    state,
                    seals,
                    self.settings.keys.dek_max_encryptions,
                )
            })
            .collect();
        crate::metrics::Snapshot {
            sealed: self.is_sealed(),
            ready: self.ready(),
            nodes: self.store.live_nodes(),
            leader: self.store.is_leader(),
            deks,
            records: vec![
                ("card", self.cards_counted.load(Ordering::Relaxed)),
                (
                    "cvc",
                    if self.store.is_shared() {
                        self.store.cvc_count().unwrap_or(0)
                    } else {
                        self.cvcs.len() as u64
                    },
                ),
            ],
            ..Default::default()
        }
    }
}

/// A new card token's record as the store keeps it, and its metadata: both blobs sealed under
/// the project's active DEK.
fn card_record(
    keys: &ProjectKeys,
    project: &Project,
    id: &ObjectId,
    card: &NewCard,
    ttl: Duration,
) -> Result<(CardRecord, CardMeta), VaultError> {
    let meta = CardMeta::of(
        &card.pan,
        &card.expiry,
        card.holder_name.as_ref(),
        keys.fingerprint
            .fingerprint(card.pan.expose_digits().as_bytes()),
    );
    let meta_plain = meta
        .encode()
        .map_err(|_| VaultError::Integrity(id.to_string()))?;
    let seal = |blob, plain: &[u8]| seal(keys, blob, project, id.as_str(), plain);
    let now = unix_now();
    let record = CardRecord {
        created_at: now,
        expires_at: now.saturating_add(secs(ttl)),
        used_at: None,
        key_version: keys.dek_version,
        meta: seal(Blob::Meta, &meta_plain)?,
        pan: Some(seal(Blob::Pan, card.pan.expose_digits().as_bytes())?),
    };
    Ok((record, meta))
}

/// Seals `plain` under the project's active DEK, bound to `blob`, `project` and `id`, and
/// counts the seal against the DEK's limit.
fn seal(
    keys: &ProjectKeys,
    blob: Blob,
    project: &Project,
    id: &str,
    plain: &[u8],
) -> Result<Vec<u8>, VaultError> {
    keys.active.count()?;
    keys.active
        .key
        .seal(&record_aad(blob, project, id, keys.dek_version), plain)
        .map_err(VaultError::Keys)
}

/// Opens a blob sealed by [`seal`]; any mismatch of key, kind, project or id is an integrity
/// failure, never a wrong answer.
fn open(
    keys: &ProjectKeys,
    blob: Blob,
    project: &Project,
    id: &str,
    key_version: u32,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    keys.opener(key_version)
        .ok_or_else(|| VaultError::Integrity(id.to_owned()))?
        .open(&record_aad(blob, project, id, key_version), sealed)
        .map_err(|_| VaultError::Integrity(id.to_owned()))
}

fn view(id: &ObjectId, card: ShownCard, record: &CardRecord) -> CardView {
    CardView {
        id: id.to_string(),
        object: "card",
        card,
        created_at: rfc3339(record.created_at),
        expires_at: rfc3339(record.expires_at),
        used: record.used_at.is_some(),
    }
}

/// Key upkeep on its own thread (re-encryption passes can be long): every second, rotate when
/// due, re-encrypt towards the active DEK version and destroy versions left unused.
fn spawn_key_maintenance(vault: Weak<Vault>) {
    let spawned = std::thread::Builder::new()
        .name("cardvault-keys".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let Some(vault) = vault.upgrade() else { return };
            if let Err(e) = vault.maintain_keys() {
                tracing::warn!(error = %e, "key maintenance failed; retrying");
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the key maintenance thread; rotation is manual only");
    }
}

/// On a shared store: the DEK state read every second, on a thread of its own so that a
/// long re-encryption pass never holds it up (see `Vault::refresh_state`).
fn spawn_state_refresh(vault: Weak<Vault>) {
    let spawned = std::thread::Builder::new()
        .name("cardvault-keystate".into())
        .spawn(move || {
            let mut pause = Duration::from_secs(1);
            loop {
                std::thread::sleep(pause);
                let Some(vault) = vault.upgrade() else { return };
                // Every second; after a failure sooner, so a database that comes back is
                // read again before the state counts as stale.
                pause = match vault.refresh_state() {
                    Ok(()) => Duration::from_secs(1),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the DEK state; retrying");
                        Duration::from_millis(200)
                    }
                };
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the DEK state thread");
    }
}

/// What one card sweep did: cards it read, PANs it erased, tombstones it removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CardSweep {
    pub read: usize,
    pub expired: usize,
    pub forgotten: usize,
}

/// Cards per statement of a bench fill on PostgreSQL.
const FILL_BATCH: usize = 1_000;

/// Background upkeep: CVC expiry every second; card-token expiry and idempotency-key
/// retention at the first tick (with, on a store of an earlier format, the one-time build of
/// the sweep indexes) and then every minute. Holds only a
/// weak reference, so it ends when the vault is dropped.
fn spawn_sweeper(vault: Weak<Vault>) {
    let spawned = std::thread::Builder::new()
        .name("cardvault-sweep".into())
        .spawn(move || {
            let mut last_card_sweep = Instant::now();
            let mut first = true;
            let mut last_count = None;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let Some(vault) = vault.upgrade() else { return };
                vault.maintain_audit();
                let wiped = vault.cvcs.sweep(Instant::now());
                if wiped > 0 {
                    tracing::debug!(wiped, "expired CVCs wiped");
                }
                // O(1) on sled; on PostgreSQL a catalog read, once a minute.
                if !vault.store.is_shared()
                    || last_count.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(60))
                {
                    vault.count_cards();
                    last_count = Some(Instant::now());
                }
                // On a shared store, the rest is one node's work: the leader's.
                if !vault.store.is_leader() {
                    continue;
                }
                match vault.store.sweep_cvcs() {
                    Ok(0) => {}
                    Ok(wiped) => tracing::debug!(wiped, "expired stored CVCs deleted"),
                    Err(e) => tracing::warn!(error = %e, "stored CVC sweep failed"),
                }
                if first || last_card_sweep.elapsed() >= Duration::from_secs(60) {
                    last_card_sweep = Instant::now();
                    if first {
                        match vault.store.build_sweep_indexes() {
                            Ok(true) => tracing::info!("sweep indexes built for this store"),
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "could not build the sweep indexes; retrying");
                                continue;
                            }
                        }
                    }
                    first = false;
                    match vault.sweep_cards(unix_now()) {
                        Ok(sweep) => tracing::debug!(
                            read = sweep.read,
                            expired = sweep.expired,
                            forgotten = sweep.forgotten,
                            "card tokens swept"
                        ),
                        Err(e) => tracing::warn!(error = %e, "card token sweep failed"),
                    }
                    match vault.sweep_idempotency(unix_now()) {
                        Ok(removed) => tracing::debug!(removed, "idempotency records swept"),
                        Err(e) => tracing::warn!(error = %e, "idempotency sweep failed"),
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the sweeper thread; expired CVCs are wiped only on use");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::TOMBSTONE_RETENTION_SECS;

    /// A vault over a fresh store and KEK in temporary folders (removed when the guard drops).
    pub(crate) fn test_vault(label: &str) -> (Arc<Vault>, TempDirs) {
        let root =
            std::env::temp_dir().join(format!("cardvault-vault-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("keys")).unwrap();
        let kek_path = root.join("keys").join(crate::crypto::DEV_KEY_FILE);
        crate::crypto::DevKey::create(&kek_path).unwrap();
        let kek = crate::crypto::DevKey::load(&kek_path).unwrap();
        let store = Store::open_sled(&root.join("data"), 8 << 20).unwrap();
        let settings = VaultSettings {
            card_token_ttl: Duration::from_secs(3600),
            cvc_ttl: Duration::from_secs(60),
            cvc_max: 1000,
            keys: KeySettings::default(),
        };
        let vault = Vault::open(
            store,
            KeySource::Dev(Box::new(kek)),
            settings,
            Box::new(crate::audit::LogSink),
        )
        .unwrap();
        (vault, TempDirs(root))
    }

    pub(crate) struct TempDirs(std::path::PathBuf);

    impl Drop for TempDirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The bench's fill writes the records tokenization writes: each one detokenizes, under
    /// the API's own rules, to a distinct valid card number.
    #[test]
    fn a_bench_fill_writes_cards_that_detokenize() {
        use crate::policy::{Peer, Policy};
        let (vault, _dirs) = test_vault("fill");
        let project = Project::default_project();
        vault.bench_fill(&project, 1_000, 40, 3).unwrap();
        let ids: Vec<String> = vault.store.cards().map(|c| c.unwrap().1).collect();
        assert_eq!(ids.len(), 40);
        let policy = Policy::parse(&[(
            "t.toml".into(),
            "[[identity]]\nname='r'\nuri_san='u'\npermissions=['detokenize']\nprojects=['*']"
                .into(),
        )])
        .unwrap();
        let peer = Arc::new(Peer {
            uri_sans: vec!["u".into()],
            ..Peer::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut pans = std::collections::HashSet::new();
        for id in &ids {
            let grant: Grant<Detokenize> = policy.authorize(&peer, &project).unwrap();
            let card = rt
                .block_on(vault.detokenize(
                    &grant,
                    &ObjectId::parse(id).unwrap(),
                    &Purpose::default(),
                ))
                .unwrap();
            let digits = card.pan.expose_digits().to_owned();
            assert!(Pan::parse(&digits).is_ok() && digits.starts_with('5'));
            pans.insert(digits);
        }
        assert_eq!(pans.len(), 40);
    }

    /// A sweep reads the cards due and no others: with 200 live cards beside them, it erases
    /// the expired PANs and removes the tombstones past retention, reading only those; a card
    /// used after it was indexed is kept until its own retention ends.
    #[test]
    fn a_sweep_reads_only_the_cards_due() {
        let (vault, _dirs) = test_vault("sweep");
        let now = 2_000_000_000;
        let r = TOMBSTONE_RETENTION_SECS;
        let card = |expires_at: i64, used_at: Option<i64>| CardRecord {
            created_at: now - 10,
            expires_at,
            used_at,
            key_version: 1,
            meta: vec![1; 40],
            pan: used_at.is_none().then(|| vec![2; 44]),
        };
        let insert = |id: &str, record: &CardRecord| {
            let _ = vault
                .store
                .wait(vault.store.insert_card("default", id, record))
                .unwrap();
        };
        for i in 0..200 {
            insert(&format!("live{i}"), &card(now + 3600, None));
        }
        for i in 0..5 {
            insert(&format!("expired{i}"), &card(now - 10, None));
        }
        for i in 0..3 {
            insert(&format!("old{i}"), &card(now - r, Some(now - r - 1)));
        }
        insert("recent", &card(now - 3600, Some(now - 60)));
        // Indexed at its expiry, then used: due later than its entry says.
        insert("used-later", &card(now - 1, None));
        let _ = vault
            .store
            .wait(vault.store.swap_card("default", "used-later", |c| {
                Ok::<_, ()>(CardRecord {
                    used_at: Some(now - 5),
                    pan: None,
                    ..c.clone()
                })
            }))
            .unwrap();

        let sweep = vault.sweep_cards(now).unwrap();
        assert_eq!(
            sweep,
            CardSweep {
                read: 5 + 3 + 1,
                expired: 5,
                forgotten: 3
            }
        );
        let stored = |id: &str| vault.store.wait(vault.store.card("default", id)).unwrap();
        assert!(stored("expired0").is_some_and(|c| c.pan.is_none()));
        assert!(stored("old0").is_none());
        assert!(stored("used-later").is_some());
        assert!(stored("live0").is_some_and(|c| c.pan.is_some()));
        // Nothing is due again until the next expiry.
        assert_eq!(vault.sweep_cards(now).unwrap(), CardSweep::default());
        // A week on: every tombstone of the first sweep goes; the live cards lose their PAN.
        let later = vault.sweep_cards(now - 5 + r).unwrap();
        assert_eq!(
            later,
            CardSweep {
                read: 200 + 5 + 1 + 1,
                expired: 200,
                forgotten: 5 + 1 + 1
            }
        );
    }

    /// A full cache refuses the next code until one expires; the expired one is wiped to
    /// make room, and the table is never grown past the cap.
    #[test]
    fn the_cvc_cache_holds_at_most_its_cap() {
        let cache = CvcCache::new(3).unwrap();
        let project = Project::parse("default").unwrap();
        let now = Instant::now();
        let ids: Vec<ObjectId> = (0..3)
            .map(|_| ObjectId::generate(IdKind::Card).unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            assert!(cache.room(now));
            let until = now + Duration::from_secs(if i == 0 { 1 } else { 3600 });
            cache.put(&project, id, Cvc::parse("123").unwrap(), until);
        }
        assert!(!cache.room(now), "a fourth code fitted under a cap of 3");
        assert_eq!(cache.len(), 3);
        // Once the first expires, the check wipes it and there is room again.
        assert!(cache.room(now + Duration::from_secs(2)));
        assert_eq!(cache.len(), 2);
        let capacity = cache.entries.lock().unwrap().capacity();
        assert!(capacity <= CvcCache::MIN_CAPACITY * 2, "{capacity}");
    }

    #[test]
    fn cvc_cache_takes_once_and_expires() {
        let cache = CvcCache::new(1 << 20).unwrap();
        let project = Project::default_project();
        let id = ObjectId::generate(IdKind::Card).unwrap();
        cache.put(
            &project,
            &id,
            Cvc::parse("123").unwrap(),
            Instant::now() + Duration::from_secs(60),
        );
        assert_eq!(
            cache
                .take(&project, &id)
                .map(|c| c.expose().to_owned())
                .as_deref(),
            Some("123")
        );
        assert!(cache.take(&project, &id).is_none());
        cache.put(&project, &id, Cvc::parse("123").unwrap(), Instant::now());
        assert_eq!(cache.sweep(Instant::now() + Duration::from_millis(2)), 1);
        assert!(cache.take(&project, &id).is_none());
    }

    #[test]
    fn cvc_cache_expires_a_code_at_its_ttl_to_the_millisecond() {
        let cache = CvcCache::new(1 << 20).unwrap();
        let project = Project::default_project();
        let id = ObjectId::generate(IdKind::Card).unwrap();
        let until = cache.epoch + Duration::from_micros(1_900_500);
        let code = |c: Option<Cvc>| c.map(|c| c.expose().to_owned());
        cache.put(&project, &id, Cvc::parse("123").unwrap(), until);
        let just_before = cache.epoch + Duration::from_millis(1900);
        assert_eq!(
            code(cache.take_at(&project, &id, just_before)).as_deref(),
            Some("123")
        );
        cache.put(&project, &id, Cvc::parse("123").unwrap(), until);
        // Expiry is `until` rounded up to the millisecond: 1900.5 ms -> 1901 ms.
        assert_eq!(cache.sweep(just_before), 0);
        assert_eq!(cache.sweep(cache.epoch + Duration::from_millis(1901)), 1);
        cache.put(&project, &id, Cvc::parse("123").unwrap(), until);
        let at = cache.epoch + Duration::from_millis(1901);
        assert!(cache.take_at(&project, &id, at).is_none());
    }

    #[test]
    fn cvc_cache_survives_growth_and_reuse_of_removed_slots() {
        let cache = CvcCache::new(1 << 20).unwrap();
        let project = Project::default_project();
        let until = Instant::now() + Duration::from_secs(60);
        let ids: Vec<ObjectId> = (0..5000)
            .map(|_| ObjectId::generate(IdKind::Card).unwrap())
            .collect();
        // Put and take in waves so that removals use up free slots between growths.
        for wave in ids.chunks(700) {
            for id in wave {
                cache.put(&project, id, Cvc::parse("321").unwrap(), until);
            }
            for id in wave.iter().step_by(2) {
                assert!(cache.take(&project, id).is_some());
            }
        }
        for wave in ids.chunks(700) {
            for id in wave.iter().skip(1).step_by(2) {
                let got = cache.take(&project, id).map(|c| c.expose().to_owned());
                assert_eq!(got.as_deref(), Some("321"));
            }
        }
        assert!(cache.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn cvc_cache_holds_no_code_in_the_clear_and_keeps_projects_apart() {
        let cache = CvcCache::new(1 << 20).unwrap();
        let (p1, p2) = (Project::parse("a").unwrap(), Project::parse("b").unwrap());
        let until = Instant::now() + Duration::from_secs(60);
        let ids: Vec<ObjectId> = (0..64)
            .map(|_| ObjectId::generate(IdKind::Card).unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let code = if i % 2 == 0 { "123" } else { "4567" };
            cache.put(&p1, id, Cvc::parse(code).unwrap(), until);
        }
        {
            let map = cache.entries.lock().unwrap();
            assert_eq!(map.len(), 64);
            let plain = map
                .values()
                .filter(|e| &e.masked == b"123\0" || &e.masked == b"4567")
                .count();
            assert!(plain <= 1, "{plain} of 64 codes stored in the clear");
        }
        assert!(
            ids.first().and_then(|id| cache.take(&p2, id)).is_none(),
            "another project's token"
        );
        for (i, id) in ids.iter().enumerate() {
            let code = if i % 2 == 0 { "123" } else { "4567" };
            let got = cache.take(&p1, id).map(|c| c.expose().to_owned());
            assert_eq!(got.as_deref(), Some(code));
        }
    }

    #[test]
    fn aad_differs_by_every_binding() {
        let p1 = Project::parse("a").unwrap();
        let p2 = Project::parse("b").unwrap();
        let i1 = ObjectId::generate(IdKind::Card).unwrap();
        let i2 = ObjectId::generate(IdKind::Card).unwrap();
        let (i1, i2) = (i1.as_str(), i2.as_str());
        let base = record_aad(Blob::Pan, &p1, i1, 1);
        assert_ne!(base, record_aad(Blob::Meta, &p1, i1, 1));
        assert_ne!(base, record_aad(Blob::TokenPan, &p1, i1, 1));
        assert_ne!(base, record_aad(Blob::Pan, &p2, i1, 1));
        assert_ne!(base, record_aad(Blob::Pan, &p1, i2, 1));
        assert_ne!(base, record_aad(Blob::Pan, &p1, i1, 2));
    }
}
