//! The key hierarchy at run time: sealed and unsealed, DEK versions and their rotation,
//! re-encryption, destruction, KEK rekey and the key inventory.
//!
//! - **Sealed.** A vault whose KEK lives in custodian shares starts without it. Shares arrive
//!   one per custodian identity ([`Vault::unseal`]); each is checked against its commitment
//!   when it arrives; at the threshold they are combined, the result is checked against the
//!   store's KEK check value, and the shares are wiped. A share that does not reach the
//!   threshold is wiped 15 minutes after it arrived, each on its own clock, by the
//!   once-a-second key maintenance (sealed or not) or by the next unseal call.
//! - **DEK versions** are store-wide: version `v` means every project's own DEK `dek/v`. One
//!   version is active (new seals), older ones are decrypt-only until no record uses them, then
//!   destroyed (their wrapped keys removed). Rotation is by request or automatic, after
//!   `dek_max_encryptions` seals under one project's DEK or after `dek_max_age`.
//! - **Encryption counts** are kept per project DEK in memory and reserved in the store in
//!   blocks, ahead of use: after a crash the count resumes from the reservation, so it can
//!   overcount by at most a block and never undercounts.
//! - **Re-encryption** runs on its own thread, in batches with pauses, one compare-and-swap per
//!   record. A crash loses nothing: a record not yet moved still opens under its old version,
//!   which is destroyed only after a full pass finds no record left under it, after the moved
//!   records were flushed, and once no request still holds it.
//! - **The root key.** The KEK wraps one root key, kept in the store; the root key wraps every
//!   DEK and fingerprint key. A node keeps only the root key in memory once unsealed. A store
//!   made before the root key gets one at its first unseal, its wrapped keys moved under it in
//!   one transaction.
//! - **Rekey** re-wraps the root key and the check value under a new KEK in one store
//!   transaction. Nothing any node holds changes, so every node keeps serving.
//! - **Several nodes** (a shared store): each reads the DEK state every second and stops
//!   using keys when it could not for `STATE_LEASE`; every change to it is a compare-and-swap;
//!   rotation, re-encryption and destruction run on the leader only, and a version is
//!   destroyed only once every live node reports it no longer uses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{open, seal, secs, unix_now, Blob, ProjectKeys, Vault, VaultError, KEK_CHECK_AAD};
use crate::crypto::custody::{Custody, Share};
use crate::crypto::pkcs11::{Hsm, KeyAttributes};
use crate::crypto::seal::{Backend, KekBackend, Pkcs11Settings};
use crate::crypto::{FingerprintKey, Kek, KeyMaterial, SealingKey};
use crate::store::{CardRecord, CustomerRecord, Ledger, StoreError, TokenRecord};
use crate::tokens::Project;

/// GCM with random 96-bit nonces stays within its bounds up to 2^32 seals under one key.
pub const GCM_NONCE_LIMIT: u64 = 1 << 32;
/// Seals are reserved in the store this many at a time.
const RESERVATION_BLOCK: u64 = 4096;
/// Past this, a DEK refuses to seal even if automatic rotation has not happened.
const HARD_LIMIT: u64 = GCM_NONCE_LIMIT - (1 << 24);
/// Each unseal share is wiped this long after it was received (per share, not from the
/// first one), so a half-finished unseal does not linger. Enforced every second by key
/// maintenance, and on every unseal call.
const UNSEAL_WINDOW: Duration = Duration::from_secs(15 * 60);
/// On a shared store, a node that has not read the DEK state for this long stops using keys
/// (503) until it reads it again. Shorter than the store's node lease, so the leader counts
/// a node as gone only after it stopped sealing under what it last read.
const STATE_LEASE: Duration = Duration::from_secs(5);
/// On a shared store, a DEK version is destroyed no sooner than this after it was retired:
/// past `STATE_LEASE`, and past a heartbeat of every node that read the state before.
const NODE_SETTLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct KeySettings {
    pub dek_max_encryptions: u64,
    pub dek_max_age: Duration,
    /// Records re-encrypted between pauses.
    pub reencrypt_batch: usize,
    pub reencrypt_pause: Duration,
}

impl Default for KeySettings {
    fn default() -> Self {
        KeySettings {
            dek_max_encryptions: 1 << 30,
            dek_max_age: Duration::from_secs(90 * 86_400),
            reencrypt_batch: 200,
            reencrypt_pause: Duration::from_millis(20),
        }
    }
}

/// Where the KEK comes from at startup.
pub enum KeySource {
    /// Custodian shares: the vault starts sealed.
    Custody(Custody),
    /// A PKCS#11 device: the vault unseals itself through it, and the custodians' shares (the
    /// recovery KEK's) unseal it when the device cannot.
    Hsm {
        settings: Pkcs11Settings,
        recovery: Option<Custody>,
    },
    /// The insecure dev key, already loaded.
    Dev(Box<Kek>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    Active,
    DecryptOnly,
    Destroyed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct DekVersion {
    pub version: u32,
    pub created_at: i64,
    pub state: KeyState,
    #[serde(default)]
    pub retired_at: Option<i64>,
    #[serde(default)]
    pub destroyed_at: Option<i64>,
    #[serde(default)]
    pub reason: String,
}

/// Store-wide DEK versions (kept in the store's `meta` tree as JSON). Every change is a
/// compare-and-swap of the stored bytes, so two nodes changing it at once cannot both win.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct DekState {
    pub active: u32,
    pub versions: Vec<DekVersion>,
}

impl DekState {
    fn initial(now: i64) -> DekState {
        DekState {
            active: 1,
            versions: vec![DekVersion {
                version: 1,
                created_at: now,
                state: KeyState::Active,
                retired_at: None,
                destroyed_at: None,
                reason: "initial".into(),
            }],
        }
    }

    fn decrypt_only(&self) -> impl Iterator<Item = u32> + '_ {
        self.versions
            .iter()
            .filter(|v| v.state == KeyState::DecryptOnly)
            .map(|v| v.version)
    }

    fn active_created_at(&self) -> i64 {
        self.versions
            .iter()
            .find(|v| v.version == self.active)
            .map_or(0, |v| v.created_at)
    }
}

/// One project's DEK of one version, with its encryption count.
pub(super) struct Dek {
    pub version: u32,
    pub key: SealingKey,
    project: Project,
    ledger: Ledger,
    /// Seals made by this process under this DEK.
    used: AtomicU64,
    /// Seals this process took from the store's count, in blocks, ahead of use.
    granted: AtomicU64,
    /// The store's count (every process's blocks) when this process last took a block.
    total: AtomicU64,
    reserving: Mutex<()>,
}

impl Dek {
    fn new(version: u32, key: &KeyMaterial, project: &Project, ledger: Ledger, taken: u64) -> Dek {
        Dek {
            version,
            key: SealingKey::new(key),
            project: project.clone(),
            ledger,
            used: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            total: AtomicU64::new(taken),
            reserving: Mutex::new(()),
        }
    }

    /// Counts one seal, taking another block from the store's count when this process's
    /// blocks are used up. Every process adds its own blocks, so the store's count bounds the
    /// seals of all of them together.
    pub fn count(&self) -> Result<(), VaultError> {
        let n = self.used.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.granted.load(Ordering::Acquire) {
            let _one_at_a_time = self.reserving.lock().unwrap_or_else(|p| p.into_inner());
            if n > self.granted.load(Ordering::Acquire) {
                let total =
                    self.ledger
                        .reserve(self.project.as_str(), self.version, RESERVATION_BLOCK)?;
                self.total.store(total, Ordering::Release);
                self.granted.fetch_add(RESERVATION_BLOCK, Ordering::AcqRel);
            }
        }
        if self.total.load(Ordering::Acquire) >= HARD_LIMIT {
            return Err(VaultError::KeyExhausted);
        }
        Ok(())
    }

    /// Seals made under this DEK by every process, as far as this one knows: the store's count
    /// less what is still unused of this process's blocks.
    pub fn encryptions(&self) -> u64 {
        let unused = self
            .granted
            .load(Ordering::Relaxed)
            .saturating_sub(self.used.load(Ordering::Relaxed));
        self.total.load(Ordering::Relaxed).saturating_sub(unused)
    }
}

/// Shares received so far while sealed, each with the time it arrived. The clock is passed
/// in (`now`), so expiry can be tested without waiting.
#[derive(Default)]
pub(super) struct Unsealing {
    shares: Vec<PendingShare>,
}

struct PendingShare {
    /// Wiped on drop (`Share` holds its bytes in `Zeroizing`).
    share: Share,
    received: Instant,
}

impl Unsealing {
    /// Wipes every share received `UNSEAL_WINDOW` or more before `now`, each on its own
    /// clock. Returns how many were wiped.
    fn expire(&mut self, now: Instant) -> usize {
        let before = self.shares.len();
        // `retain` drops the removed shares, which zeroizes their bytes.
        self.shares
            .retain(|p| now.saturating_duration_since(p.received) < UNSEAL_WINDOW);
        before.saturating_sub(self.shares.len())
    }

    /// Adds `share` as received at `now`, replacing an earlier share of the same custodian,
    /// after wiping the expired ones. Returns how many shares are held.
    fn add(&mut self, share: Share, now: Instant) -> usize {
        self.expire(now);
        self.shares.retain(|p| p.share.custodian != share.custodian);
        self.shares.push(PendingShare {
            share,
            received: now,
        });
        self.shares.len()
    }

    /// Wipes every share.
    fn clear(&mut self) {
        self.shares.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shares.len()
    }
}

/// The key side of the vault's state.
pub(super) struct KeyRing {
    /// The root key (see the module doc): it wraps every DEK and fingerprint key. The KEK
    /// itself is dropped once it has opened the root key.
    pub root: std::sync::RwLock<Option<Arc<Kek>>>,
    /// The id of the KEK that wraps the root key, as the store last said.
    pub kek_id: std::sync::RwLock<String>,
    /// Set once the KEK is in place, so the sealed check on every request takes no lock.
    pub unsealed: std::sync::atomic::AtomicBool,
    pub custody: Mutex<Option<Custody>>,
    pub unsealing: Mutex<Unsealing>,
    /// The PKCS#11 side of the seal, when the config names one.
    pub seal: Mutex<SealStatus>,
    pub state: std::sync::RwLock<DekState>,
    /// Every DEK handed out, to know when no request holds a retired version any more.
    pub issued: Mutex<Vec<Weak<Dek>>>,
    /// Serializes rotation, destruction and rekey.
    pub admin: Mutex<()>,
    pub settings: KeySettings,
    /// When `state` was last read from a shared store, in milliseconds since `epoch`.
    refreshed: AtomicU64,
    epoch: Instant,
    /// Held by a request reading the state itself because it was stale.
    refreshing: Mutex<()>,
}

impl KeyRing {
    pub fn new(settings: KeySettings, custody: Option<Custody>) -> KeyRing {
        KeyRing {
            root: std::sync::RwLock::new(None),
            kek_id: std::sync::RwLock::new(String::new()),
            unsealed: std::sync::atomic::AtomicBool::new(false),
            custody: Mutex::new(custody),
            unsealing: Mutex::new(Unsealing::default()),
            seal: Mutex::new(SealStatus::default()),
            state: std::sync::RwLock::new(DekState::initial(unix_now())),
            issued: Mutex::new(Vec::new()),
            admin: Mutex::new(()),
            settings,
            refreshed: AtomicU64::new(0),
            epoch: Instant::now(),
            refreshing: Mutex::new(()),
        }
    }

    fn mark_refreshed(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.refreshed.store(ms.max(1), Ordering::Release);
    }

    /// Whether the DEK state was read from the store within `within`.
    fn fresh(&self, within: Duration) -> bool {
        let at = self.refreshed.load(Ordering::Acquire);
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        at > 0 && now.saturating_sub(at) <= u64::try_from(within.as_millis()).unwrap_or(0)
    }

    pub fn root(&self) -> Option<Arc<Kek>> {
        self.root.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn active_version(&self) -> u32 {
        self.state.read().unwrap_or_else(|p| p.into_inner()).active
    }
}

/// The device side of the seal, and how the vault was unsealed.
#[derive(Default)]
pub struct SealStatus {
    /// `[kek.pkcs11]`, when the vault unseals itself through a device.
    pub settings: Option<Pkcs11Settings>,
    /// The device, once connected (its sessions stay pooled for status and migrations).
    pub device: Option<Arc<Hsm>>,
    /// The key's attributes as checked when it was last opened.
    pub attributes: Option<KeyAttributes>,
    /// Why the device did not unseal the vault, the last time it was tried: a stable code and
    /// a line for the log.
    pub fault: Option<(&'static str, String)>,
    /// The digest of a PIN the device refused: not sent again until the PIN file changes.
    refused_pin: Option<String>,
    /// The last fault written to the audit trail.
    audited_fault: Option<(&'static str, String)>,
    /// What unsealed the vault: `shares`, `hsm`, `recovery` (the custodians' break-glass
    /// shares while the KEK is in a device) or `dev`.
    pub unsealed_by: Option<&'static str>,
}

/// The seal as `keys status` shows it.
#[derive(Debug, Serialize)]
pub struct SealInfo {
    /// `shamir` or `pkcs11`: what holds the KEK the store is under now.
    pub backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsealed_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<KeyAttributes>,
    /// Why the device does not unseal the vault now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// The KEK the custodians' recovery shares rebuild, when the KEK is in a device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_kek: Option<String>,
}

/// Where an unseal stands after a share was accepted.
#[derive(Debug, Serialize)]
pub struct UnsealProgress {
    pub sealed: bool,
    pub received: usize,
    pub threshold: u8,
    pub kek_id: String,
    /// The shares were the recovery KEK's: the break-glass path while the KEK is in a device.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recovery: bool,
}

/// One key in the inventory (PCI DSS 3.6.1.1). Never key bytes.
#[derive(Debug, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub purpose: &'static str,
    pub algorithm: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryptions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custody: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Inventory {
    pub sealed: bool,
    pub active_dek_version: u32,
    pub seal: SealInfo,
    pub keys: Vec<KeyInfo>,
}

/// What a re-encryption pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassOutcome {
    pub moved: u64,
    /// Records still under an older version (moved concurrently, or unreadable).
    pub remaining: u64,
}

fn kek_check_aad(kek_id: &str) -> Vec<u8> {
    crate::crypto::aad(&[KEK_CHECK_AAD, kek_id.as_bytes()])
}

/// The root key as wrapped by KEK `kek_id`.
pub(super) fn root_aad(kek_id: &str) -> Vec<u8> {
    crate::crypto::aad(&[b"cardvault/root-key/v1", kek_id.as_bytes()])
}

/// The root key wrapped by `kek`, and a new KEK check value: what a store under `kek` holds.
fn wrap_root(kek: &dyn KekBackend, root: &KeyMaterial) -> Result<(Vec<u8>, Vec<u8>), VaultError> {
    let wrapped = kek
        .wrap(&root_aad(kek.id()), root)
        .map_err(VaultError::Keys)?;
    let probe = KeyMaterial::random().map_err(VaultError::Keys)?;
    let check = kek
        .wrap(&kek_check_aad(kek.id()), &probe)
        .map_err(VaultError::Keys)?;
    Ok((wrapped, check))
}

/// The id the root key goes by in memory (it wraps keys as a KEK did).
const ROOT_ID: &str = "root";

/// The recovery copy of the root key as the store keeps it: the recovery KEK's id and the
/// root key it wraps.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoveryCopy {
    kek_id: String,
    /// Hex of `nonce || ciphertext || tag`.
    root: String,
}

fn encode_recovery(recovery: &Kek, root: &KeyMaterial) -> Result<Vec<u8>, VaultError> {
    let wrapped = recovery
        .wrap(&root_aad(recovery.id()), root)
        .map_err(VaultError::Keys)?;
    serde_json::to_vec(&RecoveryCopy {
        kek_id: recovery.id().to_owned(),
        root: crate::crypto::hex(&wrapped),
    })
    .map_err(|_| VaultError::Integrity("recovery_root".into()))
}

/// The store's recovery copy of the root key, decoded.
struct StoredRecovery {
    kek_id: String,
    wrapped: Vec<u8>,
    /// The row as stored, for a compare-and-swap.
    row: Vec<u8>,
}

fn recovery_copy(store: &crate::store::Store) -> Result<Option<StoredRecovery>, VaultError> {
    let Some(row) = store.recovery_root()? else {
        return Ok(None);
    };
    let (kek_id, wrapped) = decode_recovery(&row)?;
    Ok(Some(StoredRecovery {
        kek_id,
        wrapped,
        row,
    }))
}

/// A recovery copy row as `(recovery KEK id, wrapped root key)`.
pub(super) fn decode_recovery(row: &[u8]) -> Result<(String, Vec<u8>), VaultError> {
    let copy: RecoveryCopy =
        serde_json::from_slice(row).map_err(|_| VaultError::Integrity("recovery_root".into()))?;
    let wrapped = crate::crypto::unhex(&copy.root)
        .ok_or_else(|| VaultError::Integrity("recovery_root".into()))?;
    Ok((copy.kek_id, wrapped.to_vec()))
}

/// The KEK ids a store's root key is sealed under: the KEK's, then the recovery KEK's. For
/// choosing which custodian folder is this store's.
pub fn store_kek_ids(store: &crate::store::Store) -> Result<Vec<String>, VaultError> {
    let mut ids: Vec<String> = store.kek_id()?.into_iter().collect();
    if let Some(copy) = recovery_copy(store)? {
        ids.push(copy.kek_id);
    }
    Ok(ids)
}

/// A new store sealed by a device's `kek`, with a recovery copy of its new root key under the
/// custodians' `recovery` KEK: what `keys init` writes for the pkcs11 backend, since the daemon
/// alone never holds the recovery KEK. Refused if the store has a KEK already.
pub fn seal_new_store(
    store: &crate::store::Store,
    kek: &dyn KekBackend,
    recovery: &Kek,
) -> Result<(), VaultError> {
    if let Some(id) = store.kek_id()? {
        return Err(VaultError::Seal(format!(
            "this store is sealed under KEK {id} already: `cardvault keys migrate` moves a \
             store's seal"
        )));
    }
    let material = KeyMaterial::random().map_err(VaultError::Keys)?;
    let (wrapped, check) = wrap_root(kek, &material)?;
    let copy = encode_recovery(recovery, &material)?;
    if !store.rewrap(
        &[],
        (None, &wrapped),
        &check,
        kek.id(),
        Some((None, Some(&copy))),
    )? {
        return Err(VaultError::Contention);
    }
    Ok(())
}

/// Which of the store's copies of the root key a custodian KEK opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootCopy {
    /// The KEK's own: the custodians hold the KEK (shamir).
    Primary,
    /// The recovery copy: the KEK is in a device.
    Recovery,
}

fn dek_name(version: u32) -> String {
    format!("dek/{version}")
}

impl Vault {
    /// How many nodes serve this store now, this one included (1 on sled).
    pub fn live_nodes(&self) -> usize {
        self.store.live_nodes()
    }

    pub fn is_sealed(&self) -> bool {
        !self.keyring.unsealed.load(Ordering::Acquire)
    }

    /// The id of the KEK in use; `None` while sealed.
    pub fn kek_id(&self) -> Option<String> {
        if self.is_sealed() {
            return None;
        }
        Some(
            self.keyring
                .kek_id
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Takes the KEK into use: checks it against the store (or, for a new store, records its
    /// check value and makes the root key), opens the root key with it, loads the DEK
    /// versions, and resumes any pending re-encryption. `Ok(true)`: `kek` was the recovery
    /// KEK (the break-glass path).
    pub(super) fn install_kek(&self, kek: &dyn KekBackend) -> Result<bool, VaultError> {
        let (root, copy) = loop {
            if let Some(opened) = self.open_root(kek)? {
                break opened;
            }
        };
        let state = match self.stored_state()? {
            (Some(_), state) => state,
            (None, _) => {
                let state = DekState::initial(unix_now());
                if self.store.swap_dek_state(None, &encode_state(&state)?)? {
                    state
                } else {
                    // Another node wrote it first.
                    self.stored_state()?.1
                }
            }
        };
        self.adopt_state(state);
        let store_kek = self.store.kek_id()?.unwrap_or_default();
        *self
            .keyring
            .kek_id
            .write()
            .unwrap_or_else(|p| p.into_inner()) = store_kek;
        *self.keyring.root.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(root));
        self.keyring.unsealed.store(true, Ordering::Release);
        if copy == RootCopy::Recovery {
            tracing::warn!(kek = %kek.id(), "vault UNSEALED WITH RECOVERY SHARES (break-glass): the HSM seal was not used");
        } else {
            tracing::info!("vault unsealed");
        }
        Ok(copy == RootCopy::Recovery)
    }

    /// Checks `kek` against the store and opens the root key with it: the KEK's own copy, or
    /// the recovery copy when `kek` is the recovery KEK. A new store gets its check value and
    /// root key here (never from a device's KEK: `keys init` makes that store, with its
    /// recovery copy); a store from before the root key gets one, with every wrapped key moved
    /// under it, in one transaction. `Ok(None)`: another node changed the store meanwhile (it
    /// made the root key first): try again.
    fn open_root(&self, kek: &dyn KekBackend) -> Result<Option<(Kek, RootCopy)>, VaultError> {
        let Some((check, id)) = self.store.kek_check()? else {
            if self.seal_settings().is_some() {
                return Err(VaultError::Seal(
                    "this store has no root key yet: with the pkcs11 backend, `cardvault keys \
                     init` makes it, with its recovery copy"
                        .into(),
                ));
            }
            let material = KeyMaterial::random().map_err(VaultError::Keys)?;
            let (wrapped, check) = wrap_root(kek, &material)?;
            let made = self
                .store
                .rewrap(&[], (None, &wrapped), &check, kek.id(), None)?;
            return Ok(made.then(|| (Kek::new(&material, ROOT_ID), RootCopy::Primary)));
        };
        if !id.is_empty() && id != kek.id() {
            if let Some(copy) = recovery_copy(&self.store)? {
                if copy.kek_id == kek.id() {
                    let material =
                        kek.unwrap(&root_aad(kek.id()), &copy.wrapped)
                            .map_err(|_| {
                                VaultError::WrongKek("the recovery copy does not open".into())
                            })?;
                    return Ok(Some((Kek::new(&material, ROOT_ID), RootCopy::Recovery)));
                }
            }
            return Err(VaultError::WrongKek(format!(
                "this store is under KEK {id}, not {}",
                kek.id()
            )));
        }
        let aad = if id.is_empty() {
            KEK_CHECK_AAD.to_vec()
        } else {
            kek_check_aad(&id)
        };
        kek.unwrap(&aad, &check)
            .map_err(|_| VaultError::WrongKek("the KEK check value does not open".into()))?;
        if let Some(wrapped) = self.store.root_key()? {
            let material = kek
                .unwrap(&root_aad(kek.id()), &wrapped)
                .map_err(|_| VaultError::Integrity("root key".into()))?;
            return Ok(Some((Kek::new(&material, ROOT_ID), RootCopy::Primary)));
        }
        // Keys wrapped by the KEK itself (a store from before the root key) move under a new
        // root key, which the KEK then wraps: the last change a rekey has to make to them.
        let material = KeyMaterial::random().map_err(VaultError::Keys)?;
        let root = Kek::new(&material, ROOT_ID);
        let mut rewrapped = Vec::new();
        for (project, name, wrapped) in self.store.wrapped_keys()? {
            let p = Project::parse(&project).map_err(|_| VaultError::Integrity(project.clone()))?;
            let aad = super::key_aad(&p, &name);
            let key = kek
                .unwrap(&aad, &wrapped)
                .map_err(|_| VaultError::Integrity(format!("{project}/{name}")))?;
            let again = root.wrap(&aad, &key).map_err(VaultError::Keys)?;
            rewrapped.push((project, name, wrapped, again));
        }
        let wrapped_root = kek
            .wrap(&root_aad(kek.id()), &material)
            .map_err(VaultError::Keys)?;
        let moved = self
            .store
            .rewrap(&rewrapped, (None, &wrapped_root), &check, &id, None)?;
        if moved {
            tracing::info!(
                keys = rewrapped.len(),
                "wrapped keys moved under a new root key"
            );
        }
        Ok(moved.then_some((root, RootCopy::Primary)))
    }

    /// The DEK state as the store holds it now, with its bytes (for a compare-and-swap).
    fn stored_state(&self) -> Result<(Option<Vec<u8>>, DekState), VaultError> {
        match self.store.dek_state()? {
            Some(bytes) => {
                let state = serde_json::from_slice(&bytes)
                    .map_err(|_| VaultError::Integrity("dek_state".into()))?;
                Ok((Some(bytes), state))
            }
            None => Ok((None, DekState::initial(unix_now()))),
        }
    }

    /// Takes `state` into use here. Keys cached under another state are dropped: a version
    /// may have become active, decrypt-only or destroyed.
    fn adopt_state(&self, state: DekState) {
        let mut current = self
            .keyring
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if *current != state {
            *current = state;
            drop(current);
            self.keys.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
        self.keyring.mark_refreshed();
    }

    /// Reads the DEK state another node may have changed (a rotation, a destruction). Every
    /// node does this every second on a shared store, so a rotation anywhere reaches it
    /// within a second or two.
    pub(super) fn refresh_state(&self) -> Result<(), VaultError> {
        if self.is_sealed() {
            return Ok(());
        }
        let (stored, state) = self.stored_state()?;
        if let Some((_, kek_id)) = self.store.kek_check()? {
            *self
                .keyring
                .kek_id
                .write()
                .unwrap_or_else(|p| p.into_inner()) = kek_id;
        }
        if stored.is_some() {
            self.adopt_state(state);
        }
        Ok(())
    }

    /// The id of the KEK the custodians' shares rebuild (the store's KEK, or its recovery KEK
    /// while the KEK is in a device).
    pub fn custody_kek_id(&self) -> Option<String> {
        self.keyring
            .custody
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.kek_id.clone())
    }

    fn seal_status(&self) -> std::sync::MutexGuard<'_, SealStatus> {
        self.keyring.seal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `[kek.pkcs11]`, when the vault unseals itself through a device.
    pub(super) fn seal_settings(&self) -> Option<Pkcs11Settings> {
        self.seal_status().settings.clone()
    }

    pub(super) fn set_seal_settings(&self, settings: Option<Pkcs11Settings>) {
        self.seal_status().settings = settings;
    }

    fn unsealed_by(&self, how: &'static str) {
        self.seal_status().unsealed_by = Some(how);
    }

    /// Why the device does not unseal the vault now, as a stable code (`/v1/health`).
    pub fn seal_fault(&self) -> Option<&'static str> {
        self.seal_status().fault.as_ref().map(|(code, _)| *code)
    }

    /// Unseals through the device named by `[kek.pkcs11]`: connects, logs in, opens the key
    /// (refusing one whose attributes allow extraction) and takes it into use. On failure the
    /// vault stays sealed and the fault is kept for `/v1/health` and `keys status`; it is
    /// logged when it differs from the last one. A PIN the device refused is not sent again
    /// until the PIN file changes.
    pub fn unseal_with_hsm(&self) -> Result<(), VaultError> {
        let Some(settings) = self.seal_settings() else {
            return Err(VaultError::NoCustody);
        };
        if !self.is_sealed() {
            return Ok(());
        }
        let refused_pin = self.seal_status().refused_pin.clone();
        let opened = Hsm::connect(&settings, refused_pin.as_deref()).and_then(|hsm| {
            let kek = hsm.open_key()?;
            Ok((hsm, kek))
        });
        let outcome = match opened {
            Ok((hsm, kek)) => {
                let attributes = kek.attributes.clone();
                self.install_kek(&kek).map(|_| (hsm, attributes))
            }
            Err(e) => Err(VaultError::Hsm(e)),
        };
        let mut status = self.seal_status();
        match outcome {
            Ok((hsm, attributes)) => {
                status.device = Some(hsm);
                status.attributes = Some(attributes);
                status.fault = None;
                status.refused_pin = None;
                status.unsealed_by = Some("hsm");
                tracing::info!(token = %settings.token_label, key = %settings.key_label, "unsealed through the HSM");
                Ok(())
            }
            Err(e) => {
                let code = match &e {
                    VaultError::Hsm(h) => {
                        if h.refused_pin.is_some() {
                            status.refused_pin = h.refused_pin.clone();
                        }
                        h.fault.code()
                    }
                    VaultError::WrongKek(_) => "wrong_kek",
                    VaultError::Seal(_) => "no_root_key",
                    other => other.code(),
                };
                let line = e.to_string();
                let changed = status.fault.as_ref() != Some(&(code, line.clone()));
                if changed {
                    tracing::error!(fault = code, error = %line, "SEALED: the HSM did not unseal the vault; retrying with backoff (custodians can unseal with recovery shares)");
                }
                status.fault = Some((code, line));
                Err(e)
            }
        }
    }

    /// Audits an unseal through the device: the success, and a failure the first time it
    /// differs from the last (a retry every few seconds would otherwise fill the trail).
    pub(super) fn audit_hsm_unseal(&self, outcome: &Result<(), VaultError>) {
        let record = match outcome {
            Ok(()) => true,
            Err(_) => {
                let mut status = self.seal_status();
                let fault = status.fault.clone();
                let new = fault != status.audited_fault;
                status.audited_fault = fault;
                new
            }
        };
        if record {
            if let Err(e) =
                self.audit_event(crate::audit::Actor::system(), "keys.unseal.hsm", outcome)
            {
                tracing::error!(error = %e, "the HSM unseal could not be audited");
            }
        }
    }

    /// The KEK id and check of the store's copy that the custodians' KEK `kek` opens, and the
    /// root key: the KEK's own copy (shamir), or the recovery copy (pkcs11).
    fn open_with_custodians(&self, kek: &Kek) -> Result<(RootCopy, KeyMaterial), VaultError> {
        let (_, primary) = self.store.kek_check()?.ok_or(VaultError::Sealed)?;
        let (copy, wrapped) = if primary == kek.id() {
            let wrapped = self
                .store
                .root_key()?
                .ok_or_else(|| VaultError::Integrity("root key".into()))?;
            (RootCopy::Primary, wrapped)
        } else {
            match recovery_copy(&self.store)? {
                Some(copy) if copy.kek_id == kek.id() => (RootCopy::Recovery, copy.wrapped),
                _ => {
                    return Err(VaultError::ShareRefused(format!(
                        "KEK {} seals neither this store's root key (under {primary}) nor its \
                         recovery copy: restart this node to load the custody in use",
                        kek.id()
                    )))
                }
            }
        };
        let root = kek.unwrap(&root_aad(kek.id()), &wrapped).map_err(|_| {
            VaultError::ShareRefused("the shares do not open the store's root key".into())
        })?;
        Ok((copy, root))
    }

    /// The custodians' KEK rebuilt from `shares` (proof of custody for a seal change).
    fn custodians_kek(&self, shares: &[Share]) -> Result<(Custody, Kek), VaultError> {
        let custody = self
            .keyring
            .custody
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(VaultError::NoCustody)?;
        let refs: Vec<&Share> = shares.iter().collect();
        let material = custody
            .combine(&refs)
            .map_err(|e| VaultError::ShareRefused(e.to_string()))?;
        let kek = Kek::new(&material, &custody.kek_id);
        Ok((custody, kek))
    }

    /// Moves the store's seal to `to`, under k custodians' `shares`, while serving: only the
    /// root key's wrapping changes (with the check value and the recovery copy, in one
    /// transaction), so no record is re-encrypted and every node keeps its root key.
    ///
    /// - To **pkcs11**: the device's KEK (made there if the label is free) wraps the root key,
    ///   and the custodians' KEK keeps a recovery copy. Also moves a store from one device key
    ///   to another (a new HSM).
    /// - To **shamir**: the custodians' KEK wraps the root key again, and the recovery copy is
    ///   removed.
    ///
    /// Returns the KEK id the store is under afterwards.
    pub fn migrate_seal(&self, to: &Backend, shares: &[Share]) -> Result<String, VaultError> {
        self.keyring.root().ok_or(VaultError::Sealed)?;
        let (_, custodians) = self.custodians_kek(shares)?;
        let _admin = self.keyring.admin.lock().unwrap_or_else(|p| p.into_inner());
        let (copy, root) = self.open_with_custodians(&custodians)?;
        let (_, primary) = self.store.kek_check()?.ok_or(VaultError::Sealed)?;
        let held_root = self
            .store
            .root_key()?
            .ok_or_else(|| VaultError::Integrity("root key".into()))?;
        let held_recovery = recovery_copy(&self.store)?.map(|copy| copy.row);
        let (committed, kek_id) = match to {
            Backend::Shamir => {
                if copy == RootCopy::Primary {
                    return Ok(primary);
                }
                let (wrapped, check) = wrap_root(&custodians, &root)?;
                let done = self.store.rewrap(
                    &[],
                    (Some(&held_root), &wrapped),
                    &check,
                    custodians.id(),
                    Some((held_recovery.as_deref(), None)),
                )?;
                if done {
                    let mut status = self.seal_status();
                    status.device = None;
                    status.attributes = None;
                }
                (done, custodians.id().to_owned())
            }
            Backend::Pkcs11(settings) => {
                let hsm = Hsm::connect(settings, None).map_err(VaultError::Hsm)?;
                let kek = match hsm.open_key() {
                    Ok(kek) => kek,
                    Err(e) if e.fault == crate::crypto::pkcs11::Fault::KeyMissing => {
                        let id = crate::crypto::new_kek_id().map_err(VaultError::Keys)?;
                        let kek = hsm.generate(&id).map_err(VaultError::Hsm)?;
                        tracing::info!(kek = %id, token = %settings.token_label, key = %settings.key_label, "made a KEK in the HSM");
                        kek
                    }
                    Err(e) => return Err(VaultError::Hsm(e)),
                };
                if kek.id() == primary {
                    return Ok(primary);
                }
                let (wrapped, check) = wrap_root(&kek, &root)?;
                let recovery = encode_recovery(&custodians, &root)?;
                let done = self.store.rewrap(
                    &[],
                    (Some(&held_root), &wrapped),
                    &check,
                    kek.id(),
                    Some((held_recovery.as_deref(), Some(&recovery))),
                )?;
                if done {
                    let mut status = self.seal_status();
                    status.attributes = Some(kek.attributes.clone());
                    status.device = Some(Arc::clone(kek.hsm()));
                    status.settings = Some(settings.clone());
                }
                (done, kek.id().to_owned())
            }
        };
        if !committed {
            return Err(VaultError::Contention);
        }
        *self
            .keyring
            .kek_id
            .write()
            .unwrap_or_else(|p| p.into_inner()) = kek_id.clone();
        tracing::info!(kek = %kek_id, backend = to.name(), "seal migrated");
        Ok(kek_id)
    }

    /// Accepts one custodian's share. `custodian` is the caller's policy identity: a share
    /// counts only as its own custodian's, and the same custodian twice counts once.
    pub fn unseal(
        &self,
        custodian: &str,
        kek_id: &str,
        share_hex: &str,
    ) -> Result<UnsealProgress, VaultError> {
        self.unseal_at(custodian, kek_id, share_hex, Instant::now())
    }

    /// [`Vault::unseal`] with the share received at `now`.
    pub(super) fn unseal_at(
        &self,
        custodian: &str,
        kek_id: &str,
        share_hex: &str,
        now: Instant,
    ) -> Result<UnsealProgress, VaultError> {
        let custody = self
            .keyring
            .custody
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(VaultError::NoCustody)?;
        if !self.is_sealed() {
            return Ok(UnsealProgress {
                sealed: false,
                received: 0,
                threshold: custody.threshold,
                kek_id: custody.kek_id,
                recovery: false,
            });
        }
        let share = Share::from_hex(kek_id, custodian, share_hex)
            .ok_or_else(|| VaultError::ShareRefused("not a share".into()))?;
        custody
            .verify(&share)
            .map_err(|e| VaultError::ShareRefused(e.to_string()))?;
        let mut unsealing = self
            .keyring
            .unsealing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !self.is_sealed() {
            unsealing.clear();
            return Ok(UnsealProgress {
                sealed: false,
                received: 0,
                threshold: custody.threshold,
                kek_id: custody.kek_id,
                recovery: false,
            });
        }
        let received = unsealing.add(share, now);
        if received < usize::from(custody.threshold) {
            return Ok(UnsealProgress {
                sealed: true,
                received,
                threshold: custody.threshold,
                kek_id: custody.kek_id,
                recovery: false,
            });
        }
        let refs: Vec<&Share> = unsealing.shares.iter().map(|p| &p.share).collect();
        let combined = custody.combine(&refs);
        // The shares are wiped here whatever the outcome.
        unsealing.clear();
        let material = combined.map_err(|e| VaultError::ShareRefused(e.to_string()))?;
        let recovery = self.install_kek(&Kek::new(&material, &custody.kek_id))?;
        self.unsealed_by(if recovery { "recovery" } else { "shares" });
        Ok(UnsealProgress {
            sealed: false,
            received,
            threshold: custody.threshold,
            kek_id: custody.kek_id,
            recovery,
        })
    }

    /// A project's keys: cached for the active version, else unwrapped from the store, else
    /// (when `create`) made, wrapped and stored.
    pub(super) fn project_keys(
        &self,
        project: &Project,
        create: bool,
    ) -> Result<Option<Arc<ProjectKeys>>, VaultError> {
        // A node that could not read the shared DEK state lately may have missed a rotation
        // and then a destruction: it seals and opens nothing until it reads it again. It
        // tries once now (the database may just be back), one request at a time.
        if self.store.is_shared() && !self.keyring.fresh(STATE_LEASE) {
            let read_now = match self.keyring.refreshing.try_lock() {
                Ok(_one) => self.refresh_state().is_ok(),
                Err(_) => false,
            };
            if !read_now || !self.keyring.fresh(STATE_LEASE) {
                return Err(
                    StoreError::Database("the DEK state could not be read lately".into()).into(),
                );
            }
        }
        let active = self.keyring.active_version();
        // Keys loaded from an earlier opening of the store are loaded again: their encryption
        // counts may have been reserved in writes that reopening lost.
        let generation = self.store.generation();
        if let Some(keys) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(project)
        {
            if keys.dek_version == active && keys.store_generation == generation {
                return Ok(Some(Arc::clone(keys)));
            }
        }
        // Held until the new DEK is registered in `issued` and cached: a rotation waits for
        // loads in progress, so every DEK of a retired version is visible to the maintenance
        // thread before it moves or destroys anything.
        let state = self.keyring.state.read().unwrap_or_else(|p| p.into_inner());
        let kek = self.keyring.root().ok_or(VaultError::Sealed)?;
        let Some(fingerprint) = self.project_key(&kek, project, "fingerprint", create)? else {
            return Ok(None);
        };
        // A project that exists gets the active version's DEK on first use, read or write.
        let dek = self
            .project_key(&kek, project, &dek_name(state.active), true)?
            .ok_or(VaultError::NotFound)?;
        let reserved = self
            .store
            .encryptions_reserved(project.as_str(), state.active)?;
        let active_dek = Arc::new(Dek::new(
            state.active,
            &dek,
            project,
            self.store.ledger(),
            reserved,
        ));
        let mut older = HashMap::new();
        for version in state.decrypt_only() {
            if let Some(key) = self.project_key(&kek, project, &dek_name(version), false)? {
                older.insert(version, SealingKey::new(&key));
            }
        }
        self.keyring
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&active_dek));
        let keys = Arc::new(ProjectKeys {
            dek_version: state.active,
            store_generation: generation,
            active: active_dek,
            older,
            fingerprint: FingerprintKey::new(&fingerprint),
        });
        // Every key read above is on disk before anything is sealed under it: one made by a
        // racing request may not be yet, and a reopen would lose it while we kept it.
        self.store.flush()?;
        if self.store.generation() != generation {
            return Err(StoreError::Unavailable.into());
        }
        let mut map = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = map.get(project) {
            if existing.dek_version == keys.dek_version
                && existing.store_generation == keys.store_generation
            {
                return Ok(Some(Arc::clone(existing)));
            }
        }
        map.insert(project.clone(), Arc::clone(&keys));
        drop(map);
        drop(state);
        Ok(Some(keys))
    }

    fn project_key(
        &self,
        kek: &Kek,
        project: &Project,
        name: &str,
        create: bool,
    ) -> Result<Option<KeyMaterial>, VaultError> {
        let aad = super::key_aad(project, name);
        let wrapped = match self.store.wrapped_key(project.as_str(), name)? {
            Some(w) => w,
            None if create => {
                // The root key never changes, not even at a rekey, so what it wraps here stays
                // readable whichever node runs the next rekey.
                let fresh = KeyMaterial::random().map_err(VaultError::Keys)?;
                let wrapped = kek.wrap(&aad, &fresh).map_err(VaultError::Keys)?;
                let stored = self
                    .store
                    .insert_wrapped_key(project.as_str(), name, &wrapped)?;
                return kek
                    .unwrap(&aad, &stored)
                    .map(Some)
                    .map_err(VaultError::Keys);
            }
            None => return Ok(None),
        };
        kek.unwrap(&aad, &wrapped)
            .map(Some)
            .map_err(VaultError::Keys)
    }

    /// Makes a new DEK version active; the old active version becomes decrypt-only and is
    /// re-encrypted away in the background.
    pub fn rotate_deks(&self, reason: &str) -> Result<u32, VaultError> {
        let kek = self.keyring.root().ok_or(VaultError::Sealed)?;
        let _admin = self.keyring.admin.lock().unwrap_or_else(|p| p.into_inner());
        // From the store, not memory: another node may have rotated since the last refresh.
        let (stored, mut state) = self.stored_state()?;
        let before = state.active;
        let now = unix_now();
        let next = state.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        for v in &mut state.versions {
            if v.state == KeyState::Active {
                v.state = KeyState::DecryptOnly;
                v.retired_at = Some(now);
            }
        }
        state.versions.push(DekVersion {
            version: next,
            created_at: now,
            state: KeyState::Active,
            retired_at: None,
            destroyed_at: None,
            reason: reason.to_owned(),
        });
        state.active = next;
        // The new version's DEK for every known project, on disk before the state names it.
        let generation = self.store.generation();
        let mut projects: Vec<String> = self
            .store
            .wrapped_keys()?
            .into_iter()
            .filter(|(_, name, _)| name == "fingerprint")
            .map(|(project, _, _)| project)
            .collect();
        projects.dedup();
        for project in projects {
            if let Ok(project) = Project::parse(&project) {
                self.project_key(&kek, &project, &dek_name(next), true)?;
            }
        }
        self.store.flush()?;
        if self.store.generation() != generation {
            return Err(StoreError::Unavailable.into());
        }
        if !self
            .store
            .swap_dek_state(stored.as_deref(), &encode_state(&state)?)?
        {
            // Another node changed the state meanwhile: if it rotated, its version is the
            // new one (one rotation, not two).
            let (_, current) = self.stored_state()?;
            let active = current.active;
            self.adopt_state(current);
            if active != before {
                return Ok(active);
            }
            return Err(VaultError::Contention);
        }
        self.adopt_state(state);
        tracing::info!(version = next, reason, "DEK rotated");
        Ok(next)
    }

    /// Wipes the unseal shares received `UNSEAL_WINDOW` or more before `now`, without waiting
    /// for another unseal call. Returns how many were wiped.
    pub(super) fn expire_unseal_shares(&self, now: Instant) -> usize {
        let wiped = self
            .keyring
            .unsealing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(now);
        if wiped > 0 {
            tracing::info!(
                wiped,
                window_secs = UNSEAL_WINDOW.as_secs(),
                "unseal shares expired and wiped"
            );
        }
        wiped
    }

    /// One maintenance round (every second, from `cardvault-keys`).
    pub(super) fn maintain_keys(&self) -> Result<(), VaultError> {
        self.maintain_keys_at(Instant::now())
    }

    /// One maintenance round at `now`: wipe expired unseal shares (sealed or not); then, while
    /// unsealed, rotate when due, re-encrypt towards the active version, and destroy versions
    /// no record uses any more. `now` is the clock for share expiry only.
    pub(super) fn maintain_keys_at(&self, now: Instant) -> Result<(), VaultError> {
        self.expire_unseal_shares(now);
        if self.is_sealed() {
            self.store.report_keys(None, false);
            return Ok(());
        }
        let holds_retired = self.retired_keys_in_use();
        self.store
            .report_keys(Some(self.keyring.active_version()), holds_retired);
        // Key operations are audited: none while the audit log is down. On a shared store
        // one node at a time does them (the leader).
        if self.audit.ready().is_err() || !self.store.is_leader() {
            return Ok(());
        }
        if let Some(reason) = self.rotation_due() {
            let result = self.rotate_deks(&reason);
            let object = result.as_ref().ok().map(|v| format!("dek/{v}"));
            self.audit_system("keys.rotate", &result, object.as_deref(), &reason)?;
            result?;
        }
        let pending: Vec<u32> = self
            .keyring
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .decrypt_only()
            .collect();
        if pending.is_empty() || holds_retired {
            return Ok(());
        }
        let pass = self.reencrypt_pass()?;
        if pass.moved > 0 {
            tracing::info!(
                moved = pass.moved,
                remaining = pass.remaining,
                "records re-encrypted"
            );
        }
        if pass.remaining == 0 {
            self.destroy_unused(&pending)?;
        }
        Ok(())
    }

    /// Whether a request still holds a DEK of a version that is no longer active. Such a
    /// request may read a record sealed under its own version only; records move (and
    /// versions go) only once none is left. Stale cache entries are dropped first.
    fn retired_keys_in_use(&self) -> bool {
        let active = self.keyring.active_version();
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, k| k.dek_version == active);
        let mut issued = self
            .keyring
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        issued.retain(|w| w.strong_count() > 0);
        issued
            .iter()
            .filter_map(Weak::upgrade)
            .any(|d| d.version != active)
    }

    fn rotation_due(&self) -> Option<String> {
        let settings = &self.keyring.settings;
        let state = self.keyring.state.read().unwrap_or_else(|p| p.into_inner());
        let age = unix_now().saturating_sub(state.active_created_at());
        if u64::try_from(age).unwrap_or(0) >= settings.dek_max_age.as_secs() {
            return Some("dek_max_age".into());
        }
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.values()
            .filter(|k| k.dek_version == state.active)
            .any(|k| k.active.encryptions() >= settings.dek_max_encryptions)
            .then(|| "dek_max_encryptions".into())
    }

    /// Moves every record under an older DEK version to the active one, in throttled
    /// batches. Each record moves by compare-and-swap; one changed meanwhile is left for the
    /// next pass.
    pub(super) fn reencrypt_pass(&self) -> Result<PassOutcome, VaultError> {
        let active = self.keyring.active_version();
        let settings = &self.keyring.settings;
        let mut outcome = PassOutcome::default();
        let mut in_batch = 0usize;
        let mut throttle = |moved: bool| {
            if moved {
                in_batch += 1;
                if in_batch >= settings.reencrypt_batch.max(1) {
                    in_batch = 0;
                    std::thread::sleep(settings.reencrypt_pause);
                }
            }
        };
        let mut pass =
            |records: &mut dyn Iterator<Item = Result<(String, String, u32), StoreError>>,
             move_one: fn(&Vault, &str, &str, u32) -> Result<bool, VaultError>|
             -> Result<(), VaultError> {
                for item in records {
                    let Ok((project, id, record_version)) = item else {
                        outcome.remaining += 1;
                        continue;
                    };
                    if record_version == active {
                        continue;
                    }
                    let moved = move_one(self, &project, &id, active)?;
                    count(&mut outcome, moved);
                    throttle(moved);
                }
                Ok(())
            };
        pass(
            &mut self
                .store
                .cards()
                .map(|r| r.map(|(p, i, rec)| (p, i, rec.key_version))),
            Vault::reencrypt_card,
        )?;
        pass(
            &mut self
                .store
                .customers()
                .map(|r| r.map(|(p, i, rec)| (p, i, rec.key_version))),
            Vault::reencrypt_customer,
        )?;
        pass(
            &mut self
                .store
                .tokens()
                .map(|r| r.map(|(p, i, rec)| (p, i, rec.key_version))),
            Vault::reencrypt_token,
        )?;
        // CVCs kept in a shared store, a page at a time: each moves by compare-and-swap, and
        // one taken meanwhile is simply gone.
        let mut left = self.store.cvcs_not_under(active, 1000)?;
        while !left.is_empty() {
            let page = left.len();
            let mut moved_here = 0;
            for (project, id, version, sealed) in left {
                let moved = self.reencrypt_cvc(&project, &id, version, &sealed, active)?;
                moved_here += usize::from(moved);
                count(&mut outcome, moved);
                throttle(moved);
            }
            if moved_here == 0 || page < 1000 {
                break;
            }
            left = self.store.cvcs_not_under(active, 1000)?;
        }
        Ok(outcome)
    }

    /// The project and its keys, if they are for the `active` version (else the record waits
    /// for the next pass).
    fn keys_for(
        &self,
        project: &str,
        active: u32,
    ) -> Result<Option<(Project, Arc<ProjectKeys>)>, VaultError> {
        let Ok(project) = Project::parse(project) else {
            return Ok(None);
        };
        let keys = self
            .project_keys(&project, false)?
            .filter(|k| k.dek_version == active);
        Ok(keys.map(|k| (project, k)))
    }

    fn reencrypt_cvc(
        &self,
        project: &str,
        id: &str,
        version: u32,
        sealed: &[u8],
        active: u32,
    ) -> Result<bool, VaultError> {
        let Some((p, keys)) = self.keys_for(project, active)? else {
            return Ok(false);
        };
        let plain = open(&keys, Blob::Cvc, &p, id, version, sealed)?;
        let again = seal(&keys, Blob::Cvc, &p, id, &plain)?;
        Ok(self.store.reseal_cvc(project, id, sealed, active, &again)?)
    }

    fn reencrypt_card(&self, project: &str, id: &str, active: u32) -> Result<bool, VaultError> {
        let Some((p, keys)) = self.keys_for(project, active)? else {
            return Ok(false);
        };
        let swap = self.store.wait(self.store.swap_card(project, id, |rec| {
            if rec.key_version == active {
                return Err(VaultError::NotFound);
            }
            let meta = open(&keys, Blob::Meta, &p, id, rec.key_version, &rec.meta)?;
            let pan = match &rec.pan {
                Some(sealed) => {
                    let digits = open(&keys, Blob::Pan, &p, id, rec.key_version, sealed)?;
                    Some(seal(&keys, Blob::Pan, &p, id, &digits)?)
                }
                None => None,
            };
            Ok(CardRecord {
                key_version: active,
                meta: seal(&keys, Blob::Meta, &p, id, &meta)?,
                pan,
                ..rec.clone()
            })
        }))?;
        self.count_moved(swap.swapped(VaultError::NotFound))
    }

    fn reencrypt_customer(&self, project: &str, id: &str, active: u32) -> Result<bool, VaultError> {
        let Some((p, keys)) = self.keys_for(project, active)? else {
            return Ok(false);
        };
        let swap = self
            .store
            .wait(self.store.swap_customer(project, id, |rec| {
                if rec.key_version == active {
                    return Err(VaultError::NotFound);
                }
                let profile = open(
                    &keys,
                    Blob::CustomerProfile,
                    &p,
                    id,
                    rec.key_version,
                    &rec.profile,
                )?;
                Ok(CustomerRecord {
                    key_version: active,
                    profile: seal(&keys, Blob::CustomerProfile, &p, id, &profile)?,
                    ..rec.clone()
                })
            }))?;
        self.count_moved(swap.swapped(VaultError::NotFound))
    }

    fn reencrypt_token(&self, project: &str, id: &str, active: u32) -> Result<bool, VaultError> {
        let Some((p, keys)) = self.keys_for(project, active)? else {
            return Ok(false);
        };
        let swap = self.store.wait(self.store.swap_token(project, id, |rec| {
            if rec.key_version == active {
                return Err(VaultError::NotFound);
            }
            reseal_token(&keys, &p, id, rec)
        }))?;
        self.count_moved(swap.swapped(VaultError::NotFound))
    }

    /// Whether a record moved; one that vanished, was already moved, or does not open (logged)
    /// is left for the next pass.
    fn count_moved<R>(
        &self,
        swapped: Result<(R, crate::store::Ticket), VaultError>,
    ) -> Result<bool, VaultError> {
        match swapped {
            Ok(_) => Ok(true),
            Err(VaultError::NotFound) => Ok(false),
            Err(VaultError::Integrity(id)) => {
                tracing::warn!(record = %id, "re-encryption skipped a record that does not open");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Destroys the decrypt-only versions once no record and no running request uses them.
    fn destroy_unused(&self, pending: &[u32]) -> Result<(), VaultError> {
        let _admin = self.keyring.admin.lock().unwrap_or_else(|p| p.into_inner());
        let active = self.keyring.active_version();
        if self.retired_keys_in_use() || self.store.others_hold_retired(active)? {
            return Ok(());
        }
        // CVCs kept in a shared store live for `cvc_ttl` under the version they were sealed
        // with: the version waits for them to be used or to expire.
        if self.store.cvc_versions()?.iter().any(|v| *v != active) {
            return Ok(());
        }
        // The scan, the flush and the removals must see one opening of the store: a reopen in
        // between could have lost moves the scan counted. The next round tries again.
        let generation = self.store.generation();
        // A last count after the holders are gone: anything sealed under an old version
        // before that is visible now.
        if self.records_by_version()?.keys().any(|(_, v)| *v != active) {
            return Ok(());
        }
        // The moved records are on disk before the keys that could still open them go.
        self.store.flush()?;
        if self.store.generation() != generation {
            return Ok(());
        }
        let (stored, mut state) = self.stored_state()?;
        if state.active != active {
            return Ok(());
        }
        let now = unix_now();
        // On a shared store, a node that read the state just before the rotation may seal
        // under the old version until its next read (at most `STATE_LEASE`) and report it only
        // at its next heartbeat: a version retired so recently is not destroyed yet.
        let settled = secs(NODE_SETTLE);
        if self.store.is_shared()
            && state.versions.iter().any(|v| {
                pending.contains(&v.version)
                    && v.retired_at.unwrap_or(now).saturating_add(settled) > now
            })
        {
            return Ok(());
        }
        for (project, name, _) in self.store.wrapped_keys()? {
            if pending.iter().any(|v| name == dek_name(*v)) {
                self.store.remove_wrapped_key(&project, &name)?;
            }
        }
        if self.store.generation() != generation {
            return Err(StoreError::Unavailable.into());
        }
        let mut destroyed = Vec::new();
        for v in &mut state.versions {
            if pending.contains(&v.version) && v.state == KeyState::DecryptOnly {
                v.state = KeyState::Destroyed;
                v.destroyed_at = Some(now);
                destroyed.push(v.version);
                tracing::info!(version = v.version, "DEK version destroyed");
            }
        }
        if !self
            .store
            .swap_dek_state(stored.as_deref(), &encode_state(&state)?)?
        {
            return Ok(());
        }
        // Cached keys still hold the destroyed versions for decryption: dropped here.
        self.adopt_state(state);
        for version in destroyed {
            self.audit_system(
                "keys.destroy",
                &Ok::<(), VaultError>(()),
                Some(&format!("dek/{version}")),
                "no record left under this version",
            )?;
        }
        Ok(())
    }

    /// Records per `(project, key version)`, by a scan that decodes only record headers.
    fn records_by_version(&self) -> Result<HashMap<(String, u32), u64>, VaultError> {
        let mut counts = HashMap::new();
        let mut add = |project: String, version: u32| {
            *counts.entry((project, version)).or_insert(0u64) += 1;
        };
        for item in self.store.cards() {
            let (project, _, rec) = item?;
            add(project, rec.key_version);
        }
        for item in self.store.customers() {
            let (project, _, rec) = item?;
            add(project, rec.key_version);
        }
        for item in self.store.tokens() {
            let (project, _, rec) = item?;
            add(project, rec.key_version);
        }
        Ok(counts)
    }

    /// Each project's DEK versions with their state and seals made, for metrics: the
    /// inventory without its scan of every record. Empty while sealed or on a store error.
    pub(super) fn dek_inventory(&self) -> Vec<(String, u32, String, u64)> {
        self.inventory(false)
            .map(|inv| inv.keys)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|k| Some((k.project?, k.version?, k.state, k.encryptions.unwrap_or(0))))
            .collect()
    }

    /// The seal as the store says now. With `live` (`keys status`, never a metrics scrape),
    /// the device's key attributes are read again when it is connected, so a key changed or
    /// deleted since the unseal shows.
    fn seal_info(&self, custody: Option<&Custody>, live: bool) -> Result<SealInfo, VaultError> {
        let recovery = recovery_copy(&self.store)?.map(|copy| copy.kek_id);
        let primary = self.store.kek_id()?;
        let in_device = recovery.is_some()
            && primary.as_deref() != custody.map(|c| c.kek_id.as_str())
            && primary.is_some();
        let status = self.seal_status();
        let device = status.device.clone();
        let settings = status.settings.clone();
        let mut info = SealInfo {
            backend: if in_device { "pkcs11" } else { "shamir" },
            unsealed_by: status.unsealed_by,
            token: settings.as_ref().map(|s| s.token_label.clone()),
            key_label: settings.as_ref().map(|s| s.key_label.clone()),
            attributes: status.attributes.clone(),
            fault: status.fault.as_ref().map(|(_, line)| line.clone()),
            recovery_kek: if in_device { recovery } else { None },
        };
        drop(status);
        if let Some(hsm) = device.filter(|_| live) {
            match hsm.attributes() {
                Ok(now) => info.attributes = Some(now),
                Err(e) => info.fault = Some(e.to_string()),
            }
        }
        Ok(info)
    }

    /// The key inventory: the KEK, and per project its fingerprint key and DEK versions.
    pub fn key_inventory(&self) -> Result<Inventory, VaultError> {
        self.inventory(true)
    }

    /// The inventory, with each DEK version's record count when `count_records` (a scan of
    /// every record).
    fn inventory(&self, count_records: bool) -> Result<Inventory, VaultError> {
        let sealed = self.is_sealed();
        let custody = self
            .keyring
            .custody
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let seal = self.seal_info(custody.as_ref(), count_records)?;
        let kek_id = match (self.kek_id(), &custody, &seal.recovery_kek) {
            (Some(id), _, _) => id,
            (None, _, Some(_)) | (None, None, None) => self.store.kek_id()?.unwrap_or_default(),
            (None, Some(c), None) => c.kek_id.clone(),
        };
        let shamir = |c: &Custody| {
            format!(
                "shamir {}-of-{}: {}",
                c.threshold,
                c.custodians.len(),
                c.custodians
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let held_by = match (&seal, &custody) {
            (
                SealInfo {
                    backend: "pkcs11", ..
                },
                _,
            ) => format!(
                "pkcs11: token {:?}, key {:?} (never extractable)",
                seal.token.as_deref().unwrap_or_default(),
                seal.key_label.as_deref().unwrap_or_default()
            ),
            (_, Some(c)) => shamir(c),
            (_, None) => "INSECURE single dev key file".into(),
        };
        let mut keys = vec![KeyInfo {
            id: kek_id,
            purpose: "key-encryption (wraps the root key)",
            algorithm: "AES-256-GCM",
            project: None,
            version: None,
            state: if sealed { "sealed" } else { "active" }.into(),
            created_at: custody
                .as_ref()
                .filter(|_| seal.recovery_kek.is_none())
                .map(|c| c.created_at.clone()),
            encryptions: None,
            records: None,
            custody: Some(held_by),
        }];
        if let (Some(recovery), Some(c)) = (&seal.recovery_kek, &custody) {
            keys.push(KeyInfo {
                id: recovery.clone(),
                purpose: "recovery key-encryption (wraps a copy of the root key: break-glass)",
                algorithm: "AES-256-GCM",
                project: None,
                version: None,
                state: "active".into(),
                created_at: Some(c.created_at.clone()),
                encryptions: None,
                records: None,
                custody: Some(shamir(c)),
            });
        }
        keys.push(KeyInfo {
            id: ROOT_ID.into(),
            purpose:
                "root (wraps every DEK and fingerprint key; kept in the store, wrapped by the KEK)",
            algorithm: "AES-256-GCM",
            project: None,
            version: None,
            state: if sealed { "sealed" } else { "active" }.into(),
            created_at: None,
            encryptions: None,
            records: None,
            custody: None,
        });
        if sealed {
            return Ok(Inventory {
                sealed,
                active_dek_version: 0,
                seal,
                keys,
            });
        }
        let state = self
            .keyring
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let records = if count_records {
            self.records_by_version()?
        } else {
            HashMap::new()
        };
        let cached: HashMap<Project, Arc<ProjectKeys>> =
            self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let wrapped = self.store.wrapped_keys()?;
        let mut projects: Vec<&str> = wrapped
            .iter()
            .filter(|(_, name, _)| name == "fingerprint")
            .map(|(p, _, _)| p.as_str())
            .collect();
        projects.dedup();
        for project in projects {
            keys.push(KeyInfo {
                id: format!("{project}/fingerprint"),
                purpose: "card fingerprints",
                algorithm: "HMAC-SHA-256",
                project: Some(project.to_owned()),
                version: None,
                state: "active".into(),
                created_at: None,
                encryptions: None,
                records: None,
                custody: None,
            });
            for v in &state.versions {
                let has_key = wrapped
                    .iter()
                    .any(|(p, name, _)| p == project && *name == dek_name(v.version));
                if !has_key && v.state != KeyState::Destroyed {
                    continue;
                }
                let live = cached
                    .iter()
                    .find(|(p, k)| p.as_str() == project && k.dek_version == v.version)
                    .map(|(_, k)| k.active.encryptions());
                let encryptions = match live {
                    Some(n) => n,
                    None => self.store.encryptions_reserved(project, v.version)?,
                };
                keys.push(KeyInfo {
                    id: format!("{project}/dek/{}", v.version),
                    purpose: "data encryption (card and customer records)",
                    algorithm: "AES-256-GCM",
                    project: Some(project.to_owned()),
                    version: Some(v.version),
                    state: serde_json::to_value(v.state)
                        .ok()
                        .and_then(|s| s.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    created_at: Some(super::rfc3339(v.created_at)),
                    encryptions: Some(encryptions),
                    records: Some(
                        records
                            .get(&(project.to_owned(), v.version))
                            .copied()
                            .unwrap_or(0),
                    ),
                    custody: None,
                });
            }
        }
        Ok(Inventory {
            sealed,
            active_dek_version: state.active,
            seal,
            keys,
        })
    }

    /// Custodian KEK rotation: `current` proves custody of the custodians' KEK in use; `next`
    /// and `next_shares` describe and rebuild the new one. Only the copy of the root key that
    /// the custodians' KEK wraps is re-wrapped (with the check value and KEK id when it is the
    /// store's KEK, in one transaction; the recovery copy when the KEK is in a device): the keys
    /// the root key wraps, and every node's copy of it in memory, stay as they are, so every
    /// node keeps serving.
    pub fn rekey(
        &self,
        current: &[Share],
        next: Custody,
        next_shares: &[Share],
    ) -> Result<String, VaultError> {
        self.keyring.root().ok_or(VaultError::Sealed)?;
        let (custody, proven) = self.custodians_kek(current)?;
        if next.kek_id == custody.kek_id {
            return Err(VaultError::ShareRefused(
                "the new custody must be for a new KEK".into(),
            ));
        }
        next.validate()
            .map_err(|e| VaultError::ShareRefused(e.to_string()))?;
        let refs: Vec<&Share> = next_shares.iter().collect();
        let material = next
            .combine(&refs)
            .map_err(|e| VaultError::ShareRefused(e.to_string()))?;
        let new_kek = Kek::new(&material, &next.kek_id);
        let _admin = self.keyring.admin.lock().unwrap_or_else(|p| p.into_inner());
        let (copy, root) = self.open_with_custodians(&proven)?;
        let held_root = self
            .store
            .root_key()?
            .ok_or_else(|| VaultError::Integrity("root key".into()))?;
        let done = match copy {
            RootCopy::Primary => {
                let (again, check) = wrap_root(&new_kek, &root)?;
                self.store
                    .rewrap(&[], (Some(&held_root), &again), &check, new_kek.id(), None)?
            }
            RootCopy::Recovery => {
                let held = recovery_copy(&self.store)?.map(|copy| copy.row);
                let again = encode_recovery(&new_kek, &root)?;
                let (check, id) = self.store.kek_check()?.ok_or(VaultError::Sealed)?;
                self.store.rewrap(
                    &[],
                    (Some(&held_root), &held_root),
                    &check,
                    &id,
                    Some((held.as_deref(), Some(&again))),
                )?
            }
        };
        if !done {
            return Err(VaultError::Contention);
        }
        let id = new_kek.id().to_owned();
        if copy == RootCopy::Primary {
            *self
                .keyring
                .kek_id
                .write()
                .unwrap_or_else(|p| p.into_inner()) = id.clone();
        }
        *self
            .keyring
            .custody
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(next);
        tracing::info!(kek = %id, recovery = copy == RootCopy::Recovery, "custodians' KEK rekeyed");
        Ok(id)
    }
}

/// While the vault is sealed, tries the device again with backoff (1 s doubling to 30 s),
/// until it or the custodians unseal the vault.
pub(super) fn spawn_hsm_unseal(vault: Weak<Vault>) {
    let spawned = std::thread::Builder::new()
        .name("cardvault-hsm".into())
        .spawn(move || {
            let mut wait = Duration::from_secs(1);
            loop {
                std::thread::sleep(wait);
                let Some(vault) = vault.upgrade() else {
                    return;
                };
                if !vault.is_sealed() {
                    return;
                }
                let outcome = vault.unseal_with_hsm();
                vault.audit_hsm_unseal(&outcome);
                if outcome.is_ok() {
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the HSM unseal thread: the vault stays sealed until custodians unseal it");
    }
}

fn encode_state(state: &DekState) -> Result<Vec<u8>, VaultError> {
    serde_json::to_vec(state).map_err(|_| VaultError::Integrity("dek_state".into()))
}

fn count(outcome: &mut PassOutcome, moved: bool) {
    if moved {
        outcome.moved += 1;
    } else {
        outcome.remaining += 1;
    }
}

/// A customer token's blobs opened under their version and sealed under the active one.
pub(super) fn reseal_token(
    keys: &ProjectKeys,
    project: &Project,
    id: &str,
    rec: &TokenRecord,
) -> Result<TokenRecord, VaultError> {
    let meta = open(
        keys,
        Blob::TokenMeta,
        project,
        id,
        rec.key_version,
        &rec.meta,
    )?;
    let pan = open(keys, Blob::TokenPan, project, id, rec.key_version, &rec.pan)?;
    Ok(TokenRecord {
        key_version: keys.dek_version,
        meta: seal(keys, Blob::TokenMeta, project, id, &meta)?,
        pan: seal(keys, Blob::TokenPan, project, id, &pan)?,
        ..rec.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::custody::split;
    use zeroize::Zeroizing;

    fn minutes(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    fn share(custodian: &str) -> Share {
        Share::new("kek_test", custodian, Zeroizing::new(vec![7u8; 33]))
    }

    /// Each share is forgotten `UNSEAL_WINDOW` after it arrived, on its own clock: a share
    /// that came 14 minutes after the first one outlives it.
    #[test]
    fn unseal_shares_expire_per_share_not_from_the_first() {
        let t0 = Instant::now();
        let mut unsealing = Unsealing::default();
        assert_eq!(unsealing.add(share("alice"), t0), 1);
        assert_eq!(unsealing.add(share("bob"), t0 + minutes(14)), 2);
        assert_eq!(
            unsealing.expire(t0 + UNSEAL_WINDOW - Duration::from_millis(1)),
            0
        );
        assert_eq!(unsealing.expire(t0 + minutes(16)), 1);
        assert_eq!(unsealing.len(), 1);
        assert_eq!(unsealing.shares[0].share.custodian, "bob");
        // A third share at 16 minutes counts with bob's, not alone.
        assert_eq!(unsealing.add(share("carol"), t0 + minutes(16)), 2);
        // Bob's window ends at 29 minutes, carol's at 31.
        assert_eq!(unsealing.expire(t0 + minutes(29)), 1);
        assert_eq!(unsealing.shares[0].share.custodian, "carol");
        assert_eq!(unsealing.expire(t0 + minutes(31)), 1);
        assert_eq!(unsealing.len(), 0);
        // A custodian who sends their share again starts its window again.
        assert_eq!(unsealing.add(share("alice"), t0), 1);
        assert_eq!(unsealing.add(share("alice"), t0 + minutes(10)), 1);
        assert_eq!(unsealing.expire(t0 + minutes(16)), 0);
        assert_eq!(unsealing.expire(t0 + minutes(25)), 1);
    }

    /// A sealed vault over a fresh store whose KEK is split `threshold`-of-3 among alice, bob
    /// and carol; the shares come back in that order. The folder goes when the guard drops.
    fn sealed_vault(label: &str, threshold: u8) -> (Arc<Vault>, Vec<Share>, Cleanup) {
        let root =
            std::env::temp_dir().join(format!("cardvault-unseal-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let cleanup = Cleanup(root.clone());
        let kek = KeyMaterial::random().unwrap();
        let names: Vec<String> = ["alice", "bob", "carol"].map(String::from).to_vec();
        let (custody, shares) = split(&kek, "kek_test", &names, threshold, "now").unwrap();
        let store = crate::store::Store::open_sled(&root.join("data"), 8 << 20).unwrap();
        let settings = crate::vault::VaultSettings {
            card_token_ttl: Duration::from_secs(3600),
            cvc_ttl: Duration::from_secs(60),
            cvc_max: 1000,
            keys: KeySettings::default(),
        };
        let vault = Vault::open(
            store,
            KeySource::Custody(custody),
            settings,
            Box::new(crate::audit::LogSink),
        )
        .unwrap();
        assert!(vault.is_sealed());
        (vault, shares, cleanup)
    }

    /// A store an earlier build left (keys wrapped by the KEK itself, no root key) gets a
    /// root key at its first unseal: the same keys stay in use, now wrapped by the root key,
    /// and the KEK wraps the root key alone.
    #[test]
    fn a_store_without_a_root_key_moves_its_keys_under_one_at_unseal() {
        let dir = std::env::temp_dir().join(format!("cardvault-rootless-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _cleanup = Cleanup(dir.clone());
        let material = KeyMaterial::random().unwrap();
        let kek = Kek::new(&material, "kek_test");
        let store = crate::store::Store::open_sled(&dir.join("data"), 8 << 20).unwrap();
        let probe = KeyMaterial::random().unwrap();
        let check = kek.wrap(&kek_check_aad("kek_test"), &probe).unwrap();
        store.set_kek_check(&check, "kek_test").unwrap();
        let project = Project::parse("default").unwrap();
        let (fingerprint, dek) = (
            KeyMaterial::random().unwrap(),
            KeyMaterial::random().unwrap(),
        );
        for (name, key) in [("fingerprint", &fingerprint), ("dek/1", &dek)] {
            let wrapped = kek
                .wrap(&super::super::key_aad(&project, name), key)
                .unwrap();
            store.insert_wrapped_key("default", name, &wrapped).unwrap();
        }
        let settings = crate::vault::VaultSettings {
            card_token_ttl: Duration::from_secs(3600),
            cvc_ttl: Duration::from_secs(60),
            cvc_max: 1000,
            keys: KeySettings::default(),
        };
        let vault = Vault::open(
            store,
            KeySource::Dev(Box::new(Kek::new(&material, "kek_test"))),
            settings,
            Box::new(crate::audit::LogSink),
        )
        .unwrap();

        // The same keys in use.
        let keys = vault.project_keys(&project, false).unwrap().unwrap();
        assert_eq!(
            keys.fingerprint.fingerprint(b"4111111111111111"),
            FingerprintKey::new(&fingerprint).fingerprint(b"4111111111111111")
        );
        let sealed = SealingKey::new(&dek).seal(b"aad", b"plain").unwrap();
        let opened = keys.opener(1).unwrap().open(b"aad", &sealed).unwrap();
        assert_eq!(opened.as_slice(), b"plain");
        // Wrapped by the root key now; the KEK opens the root key only.
        let aad = super::super::key_aad(&project, "dek/1");
        let wrapped = vault
            .store
            .wrapped_key("default", "dek/1")
            .unwrap()
            .unwrap();
        assert!(kek.unwrap(&aad, &wrapped).is_err());
        let stored_root = vault.store.root_key().unwrap().unwrap();
        let root = kek.unwrap(&root_aad("kek_test"), &stored_root).unwrap();
        let unwrapped = Kek::new(&root, ROOT_ID).unwrap(&aad, &wrapped).unwrap();
        assert_eq!(unwrapped.expose(), dek.expose());
    }

    struct Cleanup(std::path::PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn held(vault: &Vault) -> usize {
        vault
            .keyring
            .unsealing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The once-a-second key maintenance tick wipes a share past its window while sealed,
    /// with no further unseal call.
    #[test]
    fn the_key_tick_wipes_an_expired_unseal_share_without_an_unseal_call() {
        let (vault, shares, _cleanup) = sealed_vault("tick", 2);
        let t0 = Instant::now();
        let progress = vault
            .unseal_at("alice", "kek_test", &shares[0].to_hex(), t0)
            .unwrap();
        assert!(progress.sealed);
        assert_eq!(progress.received, 1);
        vault.maintain_keys_at(t0 + minutes(14)).unwrap();
        assert_eq!(held(&vault), 1, "wiped before its window ended");
        vault.maintain_keys_at(t0 + minutes(16)).unwrap();
        assert_eq!(held(&vault), 0, "the tick did not wipe an expired share");
        // Bob alone does not unseal: alice's share is gone.
        let progress = vault
            .unseal_at("bob", "kek_test", &shares[1].to_hex(), t0 + minutes(16))
            .unwrap();
        assert!(progress.sealed);
        assert_eq!(progress.received, 1);
    }

    /// Share A at 0 and share B at 14 minutes: at 16 minutes A is gone and B still counts (and
    /// still combines), where measuring from the first share would have dropped both.
    #[test]
    fn an_unseal_share_keeps_its_own_window_when_an_older_one_expires() {
        let (vault, shares, _cleanup) = sealed_vault("window", 3);
        let t0 = Instant::now();
        let unseal = |i: usize, name: &str, at: Instant| {
            vault
                .unseal_at(name, "kek_test", &shares[i].to_hex(), at)
                .unwrap()
        };
        assert_eq!(unseal(0, "alice", t0).received, 1);
        assert_eq!(unseal(1, "bob", t0 + minutes(14)).received, 2);
        let progress = unseal(2, "carol", t0 + minutes(16));
        assert!(progress.sealed);
        assert_eq!(progress.received, 2, "bob's share was dropped with alice's");
        vault.maintain_keys_at(t0 + minutes(16)).unwrap();
        assert_eq!(held(&vault), 2);
        // Alice again: bob's and carol's shares are still there, and the three unseal.
        let progress = unseal(0, "alice", t0 + minutes(17));
        assert!(!progress.sealed);
        assert!(!vault.is_sealed());
        assert_eq!(held(&vault), 0);
    }
}
