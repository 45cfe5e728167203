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
//! - **Rekey** re-wraps every wrapped key and the check value under a new KEK in one store
//!   transaction, with new key creation held off meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{open, seal, unix_now, Blob, ProjectKeys, Vault, VaultError, KEK_CHECK_AAD};
use crate::crypto::custody::{Custody, Share};
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Store-wide DEK versions (kept in the store's `meta` tree as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    used: AtomicU64,
    /// Seals up to this count are reserved in the store.
    reserved: AtomicU64,
    reserving: Mutex<()>,
}

impl Dek {
    /// Counts one seal, reserving another block in the store when the last one is used up.
    pub fn count(&self) -> Result<(), VaultError> {
        let n = self.used.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= HARD_LIMIT {
            return Err(VaultError::KeyExhausted);
        }
        if n > self.reserved.load(Ordering::Acquire) {
            let _one_at_a_time = self.reserving.lock().unwrap_or_else(|p| p.into_inner());
            if n > self.reserved.load(Ordering::Acquire) {
                let upto = n + RESERVATION_BLOCK;
                self.ledger
                    .reserve(self.project.as_str(), self.version, upto)?;
                self.reserved.store(upto, Ordering::Release);
            }
        }
        Ok(())
    }

    pub fn encryptions(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
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
    pub kek: std::sync::RwLock<Option<Arc<Kek>>>,
    /// Set once the KEK is in place, so the sealed check on every request takes no lock.
    pub unsealed: std::sync::atomic::AtomicBool,
    pub custody: Mutex<Option<Custody>>,
    pub unsealing: Mutex<Unsealing>,
    pub state: std::sync::RwLock<DekState>,
    /// Every DEK handed out, to know when no request holds a retired version any more.
    pub issued: Mutex<Vec<Weak<Dek>>>,
    /// Serializes rotation, destruction and rekey.
    pub admin: Mutex<()>,
    pub settings: KeySettings,
}

impl KeyRing {
    pub fn new(settings: KeySettings, custody: Option<Custody>) -> KeyRing {
        KeyRing {
            kek: std::sync::RwLock::new(None),
            unsealed: std::sync::atomic::AtomicBool::new(false),
            custody: Mutex::new(custody),
            unsealing: Mutex::new(Unsealing::default()),
            state: std::sync::RwLock::new(DekState::initial(unix_now())),
            issued: Mutex::new(Vec::new()),
            admin: Mutex::new(()),
            settings,
        }
    }

    pub fn kek(&self) -> Option<Arc<Kek>> {
        self.kek.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn active_version(&self) -> u32 {
        self.state.read().unwrap_or_else(|p| p.into_inner()).active
    }
}

/// Where an unseal stands after a share was accepted.
#[derive(Debug, Serialize)]
pub struct UnsealProgress {
    pub sealed: bool,
    pub received: usize,
    pub threshold: u8,
    pub kek_id: String,
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

fn dek_name(version: u32) -> String {
    format!("dek/{version}")
}

impl Vault {
    pub fn is_sealed(&self) -> bool {
        !self.keyring.unsealed.load(Ordering::Acquire)
    }

    /// The id of the KEK in use; `None` while sealed.
    pub fn kek_id(&self) -> Option<String> {
        self.keyring.kek().map(|k| k.id().to_owned())
    }

    /// Takes the KEK into use: checks it against the store (or, for a new store, records its
    /// check value), loads the DEK versions, and resumes any pending re-encryption.
    pub(super) fn install_kek(&self, kek: Kek) -> Result<(), VaultError> {
        match self.store.kek_check()? {
            Some((check, id)) => {
                if !id.is_empty() && id != kek.id() {
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
                kek.unwrap(&aad, &check).map_err(|_| {
                    VaultError::WrongKek("the KEK check value does not open".into())
                })?;
            }
            None => {
                let probe = KeyMaterial::random().map_err(VaultError::Keys)?;
                let check = kek
                    .wrap(&kek_check_aad(kek.id()), &probe)
                    .map_err(VaultError::Keys)?;
                self.store.set_kek_check(&check, kek.id())?;
            }
        }
        let state = match self.store.dek_state()? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|_| VaultError::Integrity("dek_state".into()))?,
            None => {
                let state = DekState::initial(unix_now());
                self.write_state(&state)?;
                state
            }
        };
        *self
            .keyring
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner()) = state;
        *self.keyring.kek.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(kek));
        self.keyring.unsealed.store(true, Ordering::Release);
        tracing::info!("vault unsealed");
        Ok(())
    }

    fn write_state(&self, state: &DekState) -> Result<(), VaultError> {
        let bytes =
            serde_json::to_vec(state).map_err(|_| VaultError::Integrity("dek_state".into()))?;
        Ok(self.store.set_dek_state(&bytes)?)
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
            });
        }
        let received = unsealing.add(share, now);
        if received < usize::from(custody.threshold) {
            return Ok(UnsealProgress {
                sealed: true,
                received,
                threshold: custody.threshold,
                kek_id: custody.kek_id,
            });
        }
        let refs: Vec<&Share> = unsealing.shares.iter().map(|p| &p.share).collect();
        let combined = custody.combine(&refs);
        // The shares are wiped here whatever the outcome.
        unsealing.clear();
        let material = combined.map_err(|e| VaultError::ShareRefused(e.to_string()))?;
        self.install_kek(Kek::new(&material, &custody.kek_id))?;
        Ok(UnsealProgress {
            sealed: false,
            received,
            threshold: custody.threshold,
            kek_id: custody.kek_id,
        })
    }

    /// A project's keys: cached for the active version, else unwrapped from the store, else
    /// (when `create`) made, wrapped and stored.
    pub(super) fn project_keys(
        &self,
        project: &Project,
        create: bool,
    ) -> Result<Option<Arc<ProjectKeys>>, VaultError> {
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
        let kek = self.keyring.kek().ok_or(VaultError::Sealed)?;
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
        let active_dek = Arc::new(Dek {
            version: state.active,
            key: SealingKey::new(&dek),
            project: project.clone(),
            ledger: self.store.ledger(),
            used: AtomicU64::new(reserved),
            reserved: AtomicU64::new(reserved),
            reserving: Mutex::new(()),
        });
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
                // Held so a rekey cannot re-wrap the store between our wrap and our insert.
                let current = self.keyring.kek.read().unwrap_or_else(|p| p.into_inner());
                let kek = current.as_deref().ok_or(VaultError::Sealed)?;
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
        let kek = self.keyring.kek().ok_or(VaultError::Sealed)?;
        let _admin = self.keyring.admin.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self
            .keyring
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
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
        self.write_state(&state)?;
        *self
            .keyring
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner()) = state;
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
        // Key operations are audited: none while sealed, none while the audit log is down.
        if self.is_sealed() || self.audit.ready().is_err() {
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
        if pending.is_empty() || self.retired_keys_in_use() {
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
        if self.retired_keys_in_use() {
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
        let mut state = self
            .keyring
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = unix_now();
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
        self.write_state(&state)?;
        *self
            .keyring
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner()) = state;
        // Cached keys still hold the destroyed versions for decryption: drop them all.
        self.keys.write().unwrap_or_else(|p| p.into_inner()).clear();
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
        let kek_id = match (self.keyring.kek(), &custody) {
            (Some(kek), _) => kek.id().to_owned(),
            (None, Some(c)) => c.kek_id.clone(),
            (None, None) => String::new(),
        };
        let mut keys = vec![KeyInfo {
            id: kek_id,
            purpose: "key-encryption (wraps every DEK and fingerprint key)",
            algorithm: "AES-256-GCM",
            project: None,
            version: None,
            state: if sealed { "sealed" } else { "active" }.into(),
            created_at: custody.as_ref().map(|c| c.created_at.clone()),
            encryptions: None,
            records: None,
            custody: Some(match &custody {
                Some(c) => format!(
                    "shamir {}-of-{}: {}",
                    c.threshold,
                    c.custodians.len(),
                    c.custodians
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => "INSECURE single dev key file".into(),
            }),
        }];
        if sealed {
            return Ok(Inventory {
                sealed,
                active_dek_version: 0,
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
            keys,
        })
    }

    /// KEK rotation: `current` proves custody of the KEK in use; `next` and `next_shares`
    /// describe and rebuild the new one. Every wrapped key is re-wrapped in one transaction.
    pub fn rekey(
        &self,
        current: &[Share],
        next: Custody,
        next_shares: &[Share],
    ) -> Result<String, VaultError> {
        let kek = self.keyring.kek().ok_or(VaultError::Sealed)?;
        let custody = self
            .keyring
            .custody
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(VaultError::NoCustody)?;
        let refs: Vec<&Share> = current.iter().collect();
        let proven = custody
            .combine(&refs)
            .map_err(|e| VaultError::ShareRefused(e.to_string()))?;
        // The rebuilt key must open the store's check value, as the KEK in use does.
        let (check, _) = self.store.kek_check()?.ok_or(VaultError::Sealed)?;
        if Kek::new(&proven, kek.id())
            .unwrap(&kek_check_aad(kek.id()), &check)
            .is_err()
        {
            return Err(VaultError::ShareRefused(
                "the current shares do not rebuild the KEK in use".into(),
            ));
        }
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
        // No key is created or wrapped while the store moves to the new KEK.
        let mut slot = self.keyring.kek.write().unwrap_or_else(|p| p.into_inner());
        let old = slot.as_deref().ok_or(VaultError::Sealed)?;
        // The custody proven above must still be the one in use (no rekey in between).
        if old.id() != kek.id() {
            return Err(VaultError::Contention);
        }
        let mut rewrapped = Vec::new();
        for (project, name, wrapped) in self.store.wrapped_keys()? {
            let p = Project::parse(&project).map_err(|_| VaultError::Integrity(project.clone()))?;
            let aad = super::key_aad(&p, &name);
            let key = old
                .unwrap(&aad, &wrapped)
                .map_err(|_| VaultError::Integrity(format!("{project}/{name}")))?;
            let again = new_kek.wrap(&aad, &key).map_err(VaultError::Keys)?;
            rewrapped.push((project, name, wrapped, again));
        }
        let probe = KeyMaterial::random().map_err(VaultError::Keys)?;
        let check = new_kek
            .wrap(&kek_check_aad(new_kek.id()), &probe)
            .map_err(VaultError::Keys)?;
        if !self.store.rewrap(&rewrapped, &check, new_kek.id())? {
            return Err(VaultError::Contention);
        }
        let id = new_kek.id().to_owned();
        *slot = Some(Arc::new(new_kek));
        *self
            .keyring
            .custody
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(next);
        tracing::info!(kek = %id, keys = rewrapped.len(), "KEK rekeyed");
        Ok(id)
    }
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
