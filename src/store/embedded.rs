//! The embedded engine: sled, in one folder that one process holds.
//!
//! Trees: `cards`, `customers`, `customer_tokens`, `idempotency` and `keys`, each keyed by
//! `project \0 id`; `meta` for store-wide values. Two sweep indexes, keyed by a time rounded
//! down to its 64-second bucket (8 bytes, big-endian, sign bit flipped, so keys sort by time)
//! then a key in a record tree, with empty values:
//! - `card_sweep`: when the sweeper next has work on a group of cards
//!   ([`CardRecord::sweep_at`]). A group is the cards of one project whose ids were made in the
//!   same second (`project \0 card_` and the id's six time characters): they share their
//!   expiry, so one entry stands for all of them and a tokenization writes an entry only when
//!   it is the first of its second (a set in memory remembers the entries written). A card
//!   whose id carries no time (and every entry of the per-card layout of format 3) has an
//!   entry of its own, keyed by its full key.
//! - `idempotency_sweep`: when a record was created, one entry per record.
//!
//! An entry is written before its record, so a crash leaves at worst an entry without a
//! record, which the sweeper drops. An entry is moved only by the sweeper, which visits every
//! card of the group, then puts the entry at the group's next due time: the earliest expiry
//! among cards that still hold a PAN, otherwise the latest end of retention. So no PAN
//! outlives its expiry by more than a sweep, and a tombstone may wait for its group's last
//! one (no card data; `card_token_ttl` at most). A use never makes the PAN's erasure due
//! earlier (the PAN goes with the use).
//! Compare-and-swap is sled's own; a [`Batch`] is one sled transaction over the trees it
//! touches.
//!
//! sled holds an exclusive lock on its folder: one process per store, so admin actions go
//! through the daemon. Compression stays off so a byte scan of the folder for test PANs means
//! something. Every write a caller is told about is made durable through [`GroupCommit`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::commit::{self, GroupCommit, Ticket};
use super::recovery;
use super::{
    key, split_key, Batch, CardRecord, Codec, CustomerRecord, IdempotencyRecord, Malformed, Space,
    StoreError, Swap, TokenRecord, FORMAT, FORMAT_KEY,
};

/// The sled engine: cheap to clone, every clone the same store.
#[derive(Clone)]
pub struct Sled(Arc<Shared>);

pub(crate) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) cache_bytes: u64,
    /// The open sled instance; `None` for the moment of a reopen.
    pub(super) current: RwLock<Option<Arc<Generation>>>,
    /// Bumped on every reopen (starts at 1).
    pub(super) generation: AtomicU64,
    /// Wakes the watcher early (a failed write, or closing).
    pub(super) signal: Arc<recovery::Signal>,
    /// The commit number in the witness file; held while the file is written.
    pub(super) witnessed: Mutex<u64>,
    /// Cards added less cards removed since the count in `meta` was last written.
    card_delta: std::sync::atomic::AtomicI64,
}

/// One opening of the sled store.
pub(super) struct Generation {
    db: sled::Db,
    cards: sled::Tree,
    customers: sled::Tree,
    tokens: sled::Tree,
    idempotency: sled::Tree,
    keys: sled::Tree,
    meta: sled::Tree,
    card_sweep: sled::Tree,
    idempotency_sweep: sled::Tree,
    /// `card_sweep` entries this opening wrote for new cards: a tokenization writes its
    /// group's entry only if it is not here (cleared when it grows past
    /// [`INDEXED_REMEMBERED`]).
    indexed: Mutex<std::collections::HashSet<Vec<u8>>>,
    pub(super) commit: GroupCommit,
}

impl Generation {
    fn open(dir: &Path, cache_bytes: u64, id: u64) -> Result<Generation, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .use_compression(false)
            .open()?;
        let meta = db.open_tree("meta")?;
        let commit = match meta.get(commit::COMMIT_KEY)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| Malformed)?),
            None => 0,
        };
        recovery::check(dir, commit)?;
        let recorded = meta.get(FORMAT_KEY)?;
        let found = match &recorded {
            Some(v) => u32::from_be_bytes(v.as_ref().try_into().map_err(|_| Malformed)?),
            // A new store is written in this format from its first record.
            None if db.open_tree("cards")?.is_empty()
                && db.open_tree("idempotency")?.is_empty() =>
            {
                FORMAT
            }
            None => 1,
        };
        if found > FORMAT {
            return Err(StoreError::TooNew { found });
        }
        if found < FORMAT || recorded.is_none() {
            if found < SWEEP_INDEX_FORMAT {
                // Written before the format: sled recovers writes in order, so a store that
                // records the new format also records that its indexes are still to build.
                meta.insert(SWEEP_INDEX_PENDING, &[1])?;
            }
            // Made durable by the first flush, with whatever this build writes first.
            meta.insert(FORMAT_KEY, &FORMAT.to_be_bytes())?;
        }
        let log = std::fs::File::open(dir.join("db")).map_err(sled::Error::from)?;
        Ok(Generation {
            cards: db.open_tree("cards")?,
            customers: db.open_tree("customers")?,
            tokens: db.open_tree("customer_tokens")?,
            idempotency: db.open_tree("idempotency")?,
            keys: db.open_tree("keys")?,
            card_sweep: db.open_tree("card_sweep")?,
            idempotency_sweep: db.open_tree("idempotency_sweep")?,
            indexed: Mutex::default(),
            commit: GroupCommit::start(db.clone(), meta.clone(), log, id, commit)
                .map_err(StoreError::Thread)?,
            meta,
            db,
        })
    }

    /// Indexes a card's group at the card's [`CardRecord::sweep_at`], unless this opening
    /// already did; written before the record. The lock is held over the insert, so a card
    /// that finds its entry remembered is written after the entry, and sled recovers writes
    /// in order.
    fn index_card(&self, k: &[u8], rec: &CardRecord) -> Result<(), StoreError> {
        let entry = sweep_key(rec.sweep_at(), card_group(k).unwrap_or(k));
        let mut indexed = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
        if !indexed.contains(&entry) {
            self.card_sweep.insert(entry.as_slice(), &[])?;
            if indexed.len() >= INDEXED_REMEMBERED {
                indexed.clear();
            }
            indexed.insert(entry);
        }
        Ok(())
    }

    /// Indexes an idempotency record at its creation; written before the record.
    fn index_idempotency(&self, k: &[u8], created_at: i64) -> Result<(), StoreError> {
        self.idempotency_sweep
            .insert(sweep_key(created_at, k), &[])?;
        Ok(())
    }

    /// Whether this sled instance can no longer write.
    pub(super) fn failed(&self) -> bool {
        self.commit.failed()
    }
}

impl Shared {
    pub(super) fn current(&self) -> Result<Arc<Generation>, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Closes the failed sled instance and opens the store again; returns the new generation.
    pub(super) fn reopen(&self) -> Result<u64, StoreError> {
        let old = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(old) = old {
            // Writers waiting on its flushes get `FlushFailed` now.
            old.commit.shutdown();
        }
        // sled's folder lock is released once the last handle of the old instance is gone;
        // until then the open fails and the watcher tries again.
        let id = self.generation.load(Ordering::SeqCst) + 1;
        let generation = Generation::open(&self.dir, self.cache_bytes, id)?;
        self.generation.store(id, Ordering::SeqCst);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(generation));
        Ok(id)
    }

    fn close(&self) -> Result<(), StoreError> {
        self.signal.wake(true);
        let generation = self.current()?;
        self.persist_count(&generation)?;
        generation.commit.shutdown();
        generation.commit.sync(&generation.db)?;
        recovery::witness(self);
        Ok(())
    }
}

impl Shared {
    /// Adds the cards added and removed since the last call to the count in `meta`.
    fn persist_count(&self, g: &Generation) -> Result<(), StoreError> {
        let delta = self.card_delta.swap(0, Ordering::SeqCst);
        if delta != 0 {
            let added = g.meta.fetch_and_update(CARD_COUNT, |old| {
                let old = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, i64::from_be_bytes);
                Some(old.saturating_add(delta).max(0).to_be_bytes().to_vec())
            });
            if let Err(e) = added {
                // Counted again next time.
                self.card_delta.fetch_add(delta, Ordering::SeqCst);
                return Err(e.into());
            }
        }
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

const KEK_CHECK: &[u8] = b"kek_check";
const KEK_ID: &[u8] = b"kek_id";
const ROOT_KEY: &[u8] = b"root_key";
const RECOVERY_ROOT: &[u8] = b"recovery_root";
const DEK_STATE: &[u8] = b"dek_state";
const ENCRYPTIONS: &str = "encryptions/";
/// How many card records the store holds, as of the last `persist_count` (i64 BE): exact
/// but for the changes of the last second before a crash.
const CARD_COUNT: &[u8] = b"card_count";
/// Present while the sweep indexes of a store written by an earlier format are not built.
const SWEEP_INDEX_PENDING: &[u8] = b"sweep_index_pending";
/// The store format that brought the sweep indexes.
const SWEEP_INDEX_FORMAT: u32 = 3;

/// How many entries [`Generation::indexed`] remembers: a few minutes of new groups across
/// projects (one per project and second), a few hundred KiB.
const INDEXED_REMEMBERED: usize = 4096;

/// How long after its second a group is left alone by the sweeper: a tokenization takes its
/// id and writes its record within it, so no card joins a group the sweeper has moved on from.
/// (It matters only with a `card_token_ttl` shorter than this; the PAN's erasure then waits
/// for it.)
const GROUP_SETTLED: i64 = 60;

/// The group of a card key (`project \0 card_` and the time characters), if its id carries a
/// time.
fn card_group(k: &[u8]) -> Option<&[u8]> {
    let at = k.iter().position(|b| *b == 0)?;
    let id = std::str::from_utf8(k.get(at + 1..)?).ok()?;
    let group = crate::tokens::ObjectId::card_group(id)?;
    k.get(..at + 1 + group.len())
}

/// Seconds of one index bucket. Entries are keyed by bucket, then by group or record key, so
/// the entries of a busy second spread over the bucket's pages instead of all landing on the
/// tree's last page. (Keyed by the exact time, every insert went to one page:
/// measured, tokenize lost a fifth of its throughput.)
const SWEEP_BUCKET: i64 = 64;

/// The start of `at`'s bucket.
fn bucket(at: i64) -> i64 {
    at.div_euclid(SWEEP_BUCKET) * SWEEP_BUCKET
}

/// An index entry: `at`'s bucket so that keys sort by time, then the record's key.
fn sweep_key(at: i64, record_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + record_key.len());
    k.extend_from_slice(&((bucket(at) as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(record_key);
    k
}

/// The bucket and record key of an index entry.
fn split_sweep_key(k: &[u8]) -> Option<(i64, &[u8])> {
    let (at, rest) = k.split_first_chunk::<8>()?;
    Some(((u64::from_be_bytes(*at) ^ (1 << 63)) as i64, rest))
}

fn get<R: Codec>(tree: &sled::Tree, k: &[u8]) -> Result<Option<R>, StoreError> {
    match tree.get(k)? {
        Some(bytes) => Ok(Some(R::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// `(project, id, record)` for every entry of `tree`.
fn entries<R: Codec>(
    tree: Result<sled::Tree, StoreError>,
) -> impl Iterator<Item = Result<(String, String, R), StoreError>> {
    let (tree, unavailable) = match tree {
        Ok(tree) => (Some(tree), None),
        Err(e) => (None, Some(Err(e))),
    };
    unavailable
        .into_iter()
        .chain(tree.into_iter().flat_map(|tree| {
            tree.iter().map(|item| {
                let (k, v) = item?;
                let (project, id) = split_key(&k).ok_or(StoreError::Corrupt(Malformed))?;
                Ok((project, id, R::decode(&v)?))
            })
        }))
}

/// Inserts a record that must not exist yet. Ids carry 154 bits from the CSPRNG, so an existing
/// record under one means a broken generator, and is refused rather than overwritten.
fn insert_new<R: Codec>(
    g: &Generation,
    tree: &sled::Tree,
    k: &[u8],
    rec: &R,
) -> Result<Ticket, StoreError> {
    match tree.compare_and_swap(k, None as Option<&[u8]>, Some(rec.encode()))? {
        Ok(()) => Ok(g.commit.ticket()),
        Err(_) => Err(StoreError::Corrupt(Malformed)),
    }
}

fn swap<R: Codec, E>(
    g: &Generation,
    tree: &sled::Tree,
    k: &[u8],
    mut decide: impl FnMut(&R) -> Result<R, E>,
) -> Result<Swap<R, E>, StoreError> {
    loop {
        let Some(current) = tree.get(k)? else {
            return Ok(Swap::Missing);
        };
        let old = R::decode(&current)?;
        let new = match decide(&old) {
            Ok(new) => new,
            Err(e) => return Ok(Swap::Refused(e)),
        };
        if tree
            .compare_and_swap(k, Some(&current), Some(new.encode()))?
            .is_ok()
        {
            return Ok(Swap::Swapped(old, g.commit.ticket()));
        }
    }
}

impl Sled {
    /// Opens the store in `dir`, refusing one that holds less than its commit witness says
    /// was acknowledged, and starts its flush and watcher threads.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Sled, StoreError> {
        let generation = Generation::open(dir, cache_bytes, 1)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            cache_bytes,
            current: RwLock::new(Some(Arc::new(generation))),
            generation: AtomicU64::new(1),
            signal: Arc::default(),
            witnessed: Mutex::new(0),
            card_delta: std::sync::atomic::AtomicI64::new(0),
        });
        recovery::spawn_watcher(Arc::downgrade(&shared), Arc::clone(&shared.signal))
            .map_err(StoreError::Thread)?;
        Ok(Sled(shared))
    }

    /// Takes the lock a daemon holds on the store in `dir` (sled `flock`s its log file for as
    /// long as it has the store open), without opening the store: while the returned file is
    /// kept, no daemon can start on it. `Err` when one runs, or when the lock cannot be asked
    /// for (taken as running); `Ok(None)` when there is no store.
    pub fn lock_stopped(dir: &Path) -> Result<Option<std::fs::File>, String> {
        let file = match std::fs::File::open(dir.join("db")) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| format!("{} is in use: a daemon is running on it", dir.display()))?;
        Ok(Some(file))
    }

    /// Which opening of the store is current: anything derived from an earlier one (cached
    /// keys, counts) must be read again.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::SeqCst)
    }

    /// Runs `f` on the current sled instance; an I/O error marks it failed and wakes the
    /// watcher, which reopens the store once it can.
    fn with<T>(
        &self,
        f: impl FnOnce(&Generation) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let g = self.0.current()?;
        let result = f(&g);
        if let Err(StoreError::Sled(e @ sled::Error::Io(_))) = &result {
            g.commit.fail(e);
            self.0.signal.wake(false);
        }
        result
    }

    /// [`Store::with`] for a write: refused with [`StoreError::Unavailable`] once this sled
    /// instance has failed. sled refuses writes after its own I/O errors, but not after a
    /// failed `fdatasync` of its log, which it never sees; a write applied now could never be
    /// acknowledged, and would be served to readers as if it had been.
    fn write<T>(
        &self,
        f: impl FnOnce(&Generation) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with(|g| {
            if g.failed() {
                return Err(StoreError::Unavailable);
            }
            f(g)
        })
    }

    /// Whether the store takes writes now: open, and its sled instance has not failed.
    pub fn writable(&self) -> bool {
        self.0.current().is_ok_and(|g| !g.failed())
    }

    /// Whether the store failed in a way a reopen does not mend (a failed write-back, an I/O
    /// error other than a full disk): it takes no writes until the daemon restarts.
    pub fn needs_restart(&self) -> bool {
        self.0
            .current()
            .is_ok_and(|g| g.failed() && g.commit.fatal())
    }

    /// Waits until the write behind `ticket` is on disk.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        let g = self.0.current()?;
        Ok(g.commit.durable(ticket).await?)
    }

    /// Flushes everything, stops the flush thread and writes the commit witness.
    pub fn close(&self) -> Result<(), StoreError> {
        self.0.close()
    }

    /// Inserts a new card record under a fresh id.
    pub fn insert_card(
        &self,
        project: &str,
        id: &str,
        rec: &CardRecord,
    ) -> Result<Ticket, StoreError> {
        let ticket = self.write(|g| {
            let k = key(project, id);
            g.index_card(&k, rec)?;
            insert_new(g, &g.cards, &k, rec)
        })?;
        self.0.card_delta.fetch_add(1, Ordering::Relaxed);
        Ok(ticket)
    }

    pub fn card(&self, project: &str, id: &str) -> Result<Option<CardRecord>, StoreError> {
        self.with(|g| get(&g.cards, &key(project, id)))
    }

    pub fn customer(&self, project: &str, id: &str) -> Result<Option<CustomerRecord>, StoreError> {
        self.with(|g| get(&g.customers, &key(project, id)))
    }

    pub fn token(&self, project: &str, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.with(|g| get(&g.tokens, &key(project, id)))
    }

    /// Atomically replaces a card record with what `decide` makes of it: compare-and-swap in
    /// a loop, so of any number of racing callers exactly one sees the old state and wins.
    /// `decide` may run several times and must have no side effects.
    pub fn swap_card<E>(
        &self,
        project: &str,
        id: &str,
        decide: impl FnMut(&CardRecord) -> Result<CardRecord, E>,
    ) -> Result<Swap<CardRecord, E>, StoreError> {
        self.write(|g| swap(g, &g.cards, &key(project, id), decide))
    }

    /// As [`Store::swap_card`], for a customer.
    pub fn swap_customer<E>(
        &self,
        project: &str,
        id: &str,
        decide: impl FnMut(&CustomerRecord) -> Result<CustomerRecord, E>,
    ) -> Result<Swap<CustomerRecord, E>, StoreError> {
        self.write(|g| swap(g, &g.customers, &key(project, id), decide))
    }

    /// As [`Store::swap_card`], for a customer token.
    pub fn swap_token<E>(
        &self,
        project: &str,
        id: &str,
        decide: impl FnMut(&TokenRecord) -> Result<TokenRecord, E>,
    ) -> Result<Swap<TokenRecord, E>, StoreError> {
        self.write(|g| swap(g, &g.tokens, &key(project, id), decide))
    }

    /// Inserts a new customer under a fresh id.
    pub fn insert_customer(
        &self,
        project: &str,
        id: &str,
        rec: &CustomerRecord,
    ) -> Result<Ticket, StoreError> {
        self.write(|g| insert_new(g, &g.customers, &key(project, id), rec))
    }

    /// Applies `batch` in one transaction if every record it checks is exactly as expected.
    /// `Ok(None)`: a check failed (a racing change); nothing was written.
    pub fn commit(&self, batch: &Batch) -> Result<Option<Ticket>, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
        self.write(|g| {
            let outcome =
                (&g.cards, &g.customers, &g.tokens).transaction(|(cards, customers, tokens)| {
                    let tree = |space: Space| match space {
                        Space::Cards => cards,
                        Space::Customers => customers,
                        Space::Tokens => tokens,
                    };
                    for (space, k, expected) in &batch.checks {
                        let current = tree(*space).get(k)?;
                        if current.as_deref() != expected.as_deref() {
                            return Err(ConflictableTransactionError::Abort(()));
                        }
                    }
                    for (space, k, value) in &batch.writes {
                        match value {
                            Some(v) => {
                                tree(*space).insert(k.as_slice(), v.as_slice())?;
                            }
                            None => {
                                tree(*space).remove(k.as_slice())?;
                            }
                        }
                    }
                    Ok(())
                });
            match outcome {
                Ok(()) => Ok(Some(g.commit.ticket())),
                Err(TransactionError::Abort(())) => Ok(None),
                Err(TransactionError::Storage(e)) => Err(e.into()),
            }
        })
    }

    pub fn idempotency(
        &self,
        project: &str,
        scope: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.with(|g| get(&g.idempotency, &key(project, scope)))
    }

    /// Compare-and-swap of an idempotency record; `Ok(None)` when `old` is no longer current.
    pub fn swap_idempotency(
        &self,
        project: &str,
        scope: &str,
        old: Option<&IdempotencyRecord>,
        new: Option<&IdempotencyRecord>,
    ) -> Result<Option<Ticket>, StoreError> {
        self.write(|g| {
            let k = key(project, scope);
            if let (None, Some(new)) = (old, new) {
                g.index_idempotency(&k, new.created_at)?;
            }
            let swapped = g.idempotency.compare_and_swap(
                k,
                old.map(IdempotencyRecord::encode),
                new.map(IdempotencyRecord::encode),
            )?;
            Ok(swapped.is_ok().then(|| g.commit.ticket()))
        })
    }

    /// Removes idempotency records created before `cutoff` (unix seconds); returns how many.
    /// Reads only the index entries of the buckets up to `cutoff`'s.
    pub fn remove_idempotency_before(&self, cutoff: i64) -> Result<usize, StoreError> {
        self.write(|g| {
            let mut removed = 0;
            let end = sweep_key(cutoff.saturating_add(SWEEP_BUCKET), &[]);
            for item in g.idempotency_sweep.range(..end) {
                let (entry, _) = item?;
                let (at, k) = split_sweep_key(&entry).ok_or(Malformed)?;
                if let Some(v) = g.idempotency.get(k)? {
                    let created = IdempotencyRecord::decode(&v).map_or(i64::MIN, |r| r.created_at);
                    // Not old yet, and this is its entry: kept for a later sweep.
                    if created >= cutoff && bucket(created) == at {
                        continue;
                    }
                    // Old: removed. (Otherwise claimed again since, under an entry of its own.)
                    if created < cutoff
                        && g.idempotency
                            .compare_and_swap(k, Some(&v), None as Option<&[u8]>)?
                            .is_ok()
                    {
                        removed += 1;
                    }
                }
                g.idempotency_sweep.remove(&entry)?;
            }
            Ok(removed)
        })
    }

    /// See [`super::Store::sweep_cards`]. Entry by entry in time order, up to `now`'s bucket:
    /// every card of the entry's group (or its one card) is visited, then the entry is put at
    /// the group's next due time (see the module's text), or removed with the group's last
    /// card. The new entry is written before the old one goes: a crash between the two leaves
    /// the group indexed twice, which costs one more visit, never not at all. An entry due
    /// again within its own bucket stays where it is for the next sweep.
    pub fn sweep_cards(&self, now: i64, visit: super::SweepVisit<'_>) -> Result<(), StoreError> {
        use std::ops::Bound;
        let end = sweep_key(now.saturating_add(SWEEP_BUCKET), &[]);
        let mut start = Bound::Unbounded;
        loop {
            let next = self.with(|g| {
                let range = (start.clone(), Bound::Excluded(end.clone()));
                Ok(g.card_sweep.range::<Vec<u8>, _>(range).next().transpose()?)
            })?;
            let Some((entry, _)) = next else { break };
            start = Bound::Excluded(entry.to_vec());
            let (at, part) = split_sweep_key(&entry).ok_or(Malformed)?;
            let (project, name) = split_key(part).ok_or(Malformed)?;
            let group = crate::tokens::ObjectId::card_group_second(&name);
            if group.is_some_and(|second| second as i64 > now.saturating_sub(GROUP_SETTLED)) {
                continue;
            }
            let members: Vec<(String, Option<CardRecord>)> = self.with(|g| match group {
                Some(_) => g
                    .cards
                    .scan_prefix(part)
                    .map(|item| {
                        let (k, v) = item?;
                        let (_, id) = split_key(&k).ok_or(Malformed)?;
                        Ok((id, CardRecord::decode(&v).ok()))
                    })
                    .collect(),
                None => Ok(vec![(
                    name.clone(),
                    g.cards.get(part)?.and_then(|v| CardRecord::decode(&v).ok()),
                )]),
            })?;
            // The earliest expiry among cards still holding a PAN, the latest end of retention
            // among the others.
            let (mut pan_due, mut kept_due) = (None::<i64>, None::<i64>);
            for (id, record) in members {
                let card = super::DueCard {
                    at,
                    project: project.clone(),
                    id,
                    record,
                };
                if let Some(now_holds) = visit(&card)? {
                    let due = now_holds.sweep_at();
                    if now_holds.pan.is_some() {
                        pan_due = Some(pan_due.map_or(due, |d| d.min(due)));
                    } else {
                        kept_due = Some(kept_due.map_or(due, |d| d.max(due)));
                    }
                }
            }
            let next = pan_due.or(kept_due);
            if next.map(bucket) == Some(at) {
                continue;
            }
            self.write(|g| {
                if let Some(next) = next {
                    g.card_sweep.insert(sweep_key(next, part), &[])?;
                }
                g.card_sweep.remove(&*entry)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// See [`super::Store::build_sweep_indexes`]. Entries are a set, so one written by a
    /// request meanwhile is simply written again.
    pub fn build_sweep_indexes(&self) -> Result<bool, StoreError> {
        self.write(|g| {
            if g.meta.get(SWEEP_INDEX_PENDING)?.is_none() {
                return Ok(false);
            }
            // The count starts here too: the scan's, less what requests changed meanwhile
            // (those are in the pending changes, written on top of it).
            let before = self.0.card_delta.load(Ordering::SeqCst);
            let mut cards = 0i64;
            for item in g.cards.iter() {
                let (k, v) = item?;
                cards += 1;
                if let Ok(record) = CardRecord::decode(&v) {
                    g.index_card(&k, &record)?;
                }
            }
            g.meta
                .insert(CARD_COUNT, &cards.saturating_sub(before).to_be_bytes())?;
            for item in g.idempotency.iter() {
                let (k, v) = item?;
                // An unreadable one is due at once, and removed as before.
                let at = IdempotencyRecord::decode(&v).map_or(i64::MIN, |r| r.created_at);
                g.index_idempotency(&k, at)?;
            }
            g.meta.remove(SWEEP_INDEX_PENDING)?;
            Ok(true)
        })
    }

    /// Card records: the count kept in `meta` plus the changes not yet written to it (no
    /// scan).
    pub fn count_cards(&self) -> Result<u64, StoreError> {
        self.with(|g| {
            let stored = g
                .meta
                .get(CARD_COUNT)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, i64::from_be_bytes);
            let delta = self.0.card_delta.load(Ordering::Relaxed);
            Ok(u64::try_from(stored.saturating_add(delta)).unwrap_or(0))
        })
    }

    /// Writes the card count's pending changes to `meta` (every second, and at close).
    pub fn persist_count(&self) -> Result<(), StoreError> {
        self.write(|g| self.0.persist_count(g))
    }

    /// Removes a card record if it still holds exactly `expected` (used by the sweeper).
    pub fn remove_card_if(
        &self,
        project: &str,
        id: &str,
        expected: &CardRecord,
    ) -> Result<bool, StoreError> {
        let removed = self.write(|g| {
            let swapped = g.cards.compare_and_swap(
                key(project, id),
                Some(expected.encode()),
                None as Option<&[u8]>,
            )?;
            Ok(swapped.is_ok())
        })?;
        if removed {
            self.0.card_delta.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    /// Every card record, as `(project, id, record)`; records that fail to decode are skipped
    /// (and counted by the caller through the `Err` items).
    pub fn cards(&self) -> impl Iterator<Item = Result<(String, String, CardRecord), StoreError>> {
        entries(self.0.current().map(|g| g.cards.clone()))
    }

    /// Every customer record, as `(project, id, record)`.
    pub fn customers(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, CustomerRecord), StoreError>> {
        entries(self.0.current().map(|g| g.customers.clone()))
    }

    /// Every customer token record, as `(project, id, record)`.
    pub fn tokens(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, TokenRecord), StoreError>> {
        entries(self.0.current().map(|g| g.tokens.clone()))
    }

    /// A project's key wrapped by the KEK, if it exists.
    pub fn wrapped_key(&self, project: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|g| Ok(g.keys.get(key(project, name))?.map(|v| v.to_vec())))
    }

    /// Stores `wrapped` unless a key of that name exists; returns the key that is now stored
    /// (ours, or the one a racing writer stored first). Not flushed here: callers flush before
    /// sealing anything under it (`Vault::project_keys`, `Vault::rotate_deks`), and check the
    /// store was not reopened in between.
    pub fn insert_wrapped_key(
        &self,
        project: &str,
        name: &str,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.write(|g| {
            let k = key(project, name);
            match g
                .keys
                .compare_and_swap(&k, None as Option<&[u8]>, Some(wrapped))?
            {
                Ok(()) => Ok(wrapped.to_vec()),
                Err(e) => e
                    .current
                    .map(|v| v.to_vec())
                    .ok_or(StoreError::Corrupt(Malformed)),
            }
        })
    }

    /// The wrapped KEK check value and the KEK id, if this store has them yet.
    pub fn kek_check(&self) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        self.with(|g| {
            let check = g.meta.get(KEK_CHECK)?;
            let id = g.meta.get(KEK_ID)?;
            Ok(match (check, id) {
                (Some(check), Some(id)) => Some((
                    check.to_vec(),
                    String::from_utf8(id.to_vec()).map_err(|_| Malformed)?,
                )),
                (Some(check), None) => Some((check.to_vec(), String::new())),
                _ => None,
            })
        })
    }

    /// The root key, wrapped by the KEK, if this store has one yet.
    pub fn root_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|g| Ok(g.meta.get(ROOT_KEY)?.map(|v| v.to_vec())))
    }

    /// The commit number the last flush made durable.
    pub fn durable_commit(&self) -> Result<u64, StoreError> {
        self.with(|g| Ok(g.commit.durable_commit()))
    }

    /// The root key as the custodians' recovery KEK wraps it, if the store has one.
    pub fn recovery_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|g| Ok(g.meta.get(RECOVERY_ROOT)?.map(|v| v.to_vec())))
    }

    /// Records the KEK check value and id of a new store, durably, before anything is sealed.
    pub fn set_kek_check(&self, wrapped: &[u8], kek_id: &str) -> Result<(), StoreError> {
        self.write(|g| {
            g.meta
                .transaction(|meta| {
                    meta.insert(KEK_CHECK, wrapped)?;
                    meta.insert(KEK_ID, kek_id.as_bytes())?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(transaction_error)?;
            g.commit.sync(&g.db)?;
            Ok(())
        })
    }

    /// Every wrapped key, as `(project, name, wrapped)`.
    pub fn wrapped_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        self.with(|g| {
            g.keys
                .iter()
                .map(|item| {
                    let (k, v) = item?;
                    let (project, name) = split_key(&k).ok_or(Malformed)?;
                    Ok((project, name, v.to_vec()))
                })
                .collect()
        })
    }

    /// Replaces every wrapped key and the KEK check value and id in one transaction, then
    /// flushes: after a crash the store is wholly under the old KEK or wholly under the new.
    /// `Ok(false)`: some wrapped key is no longer what `rewrapped` was made from.
    pub fn rewrap(
        &self,
        rewrapped: &[(String, String, Vec<u8>, Vec<u8>)],
        root: (Option<&[u8]>, &[u8]),
        check: &[u8],
        kek_id: &str,
        recovery: Option<super::MetaSwap<'_>>,
    ) -> Result<bool, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
        self.write(|g| {
            let outcome = (&g.keys, &g.meta).transaction(|(keys, meta)| {
                if meta.get(ROOT_KEY)?.as_deref() != root.0 {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                if let Some((old, new)) = recovery {
                    if meta.get(RECOVERY_ROOT)?.as_deref() != old {
                        return Err(ConflictableTransactionError::Abort(()));
                    }
                    match new {
                        Some(new) => meta.insert(RECOVERY_ROOT, new)?,
                        None => meta.remove(RECOVERY_ROOT)?,
                    };
                }
                meta.insert(ROOT_KEY, root.1)?;
                for (project, name, old, new) in rewrapped {
                    let k = key(project, name);
                    if keys.get(&k)?.as_deref() != Some(old.as_slice()) {
                        return Err(ConflictableTransactionError::Abort(()));
                    }
                    keys.insert(k, new.as_slice())?;
                }
                meta.insert(KEK_CHECK, check)?;
                meta.insert(KEK_ID, kek_id.as_bytes())?;
                Ok(())
            });
            match outcome {
                Ok(()) => {
                    g.commit.sync(&g.db)?;
                    Ok(true)
                }
                Err(TransactionError::Abort(())) => Ok(false),
                Err(TransactionError::Storage(e)) => Err(e.into()),
            }
        })
    }

    /// Removes a wrapped key (a destroyed DEK version). Not durable until the next flush.
    pub fn remove_wrapped_key(&self, project: &str, name: &str) -> Result<(), StoreError> {
        self.write(|g| {
            g.keys.remove(key(project, name))?;
            Ok(())
        })
    }

    /// The DEK version states (JSON, owned by the vault), if written yet.
    pub fn dek_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|g| Ok(g.meta.get(DEK_STATE)?.map(|v| v.to_vec())))
    }

    /// Replaces the DEK version states if they are still `old`, and flushes.
    pub fn swap_dek_state(&self, old: Option<&[u8]>, new: &[u8]) -> Result<bool, StoreError> {
        self.write(|g| {
            if g.meta.compare_and_swap(DEK_STATE, old, Some(new))?.is_err() {
                return Ok(false);
            }
            g.commit.sync(&g.db)?;
            Ok(true)
        })
    }

    /// Encryptions reserved so far under a project's DEK version.
    pub fn encryptions_reserved(&self, project: &str, version: u32) -> Result<u64, StoreError> {
        self.with(|g| {
            Ok(match g.meta.get(encryptions_key(project, version))? {
                Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| Malformed)?),
                None => 0,
            })
        })
    }

    /// Flushes everything written so far and syncs it (for rare, blocking callers: key
    /// operations).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.write(|g| Ok(g.commit.sync(&g.db)?))
    }
}

fn encryptions_key(project: &str, version: u32) -> Vec<u8> {
    let mut k = ENCRYPTIONS.as_bytes().to_vec();
    k.extend_from_slice(&key(project, &version.to_string()));
    k
}

impl Sled {
    fn tree(g: &Generation, kind: super::Kind) -> &sled::Tree {
        match kind {
            super::Kind::Cards => &g.cards,
            super::Kind::Customers => &g.customers,
            super::Kind::Tokens => &g.tokens,
            super::Kind::Idempotency => &g.idempotency,
            super::Kind::Keys => &g.keys,
        }
    }

    pub fn raw_entries(&self, kind: super::Kind) -> super::RawEntries {
        let tree = match self.0.current() {
            Ok(g) => Sled::tree(&g, kind).clone(),
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        Box::new(tree.iter().map(|item| {
            let (k, v) = item?;
            let (project, id) = split_key(&k).ok_or(StoreError::Corrupt(Malformed))?;
            Ok((project, id, v.to_vec()))
        }))
    }

    pub fn put_raw(
        &self,
        kind: super::Kind,
        project: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.write(|g| {
            let k = key(project, id);
            match kind {
                super::Kind::Cards => {
                    if let Ok(record) = CardRecord::decode(bytes) {
                        g.index_card(&k, &record)?;
                    }
                }
                super::Kind::Idempotency => {
                    let at = IdempotencyRecord::decode(bytes).map_or(i64::MIN, |r| r.created_at);
                    g.index_idempotency(&k, at)?;
                }
                _ => {}
            }
            let previous = Sled::tree(g, kind).insert(k, bytes)?;
            if matches!(kind, super::Kind::Cards) && previous.is_none() {
                self.0.card_delta.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    pub fn reservations(&self) -> Result<Vec<(String, u32, u64)>, StoreError> {
        self.with(|g| {
            g.meta
                .scan_prefix(ENCRYPTIONS.as_bytes())
                .map(|item| {
                    let (k, v) = item?;
                    let rest = k.get(ENCRYPTIONS.len()..).ok_or(Malformed)?;
                    let (project, version) = split_key(rest).ok_or(Malformed)?;
                    let version = version.parse().map_err(|_| Malformed)?;
                    let count = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| Malformed)?);
                    Ok((project, version, count))
                })
                .collect()
        })
    }

    /// Raises a DEK's encryption reservation (see [`Ledger::reserve`]).
    pub fn reserve(&self, project: &str, version: u32, block: u64) -> Result<u64, StoreError> {
        self.write(|g| {
            let old = g
                .meta
                .fetch_and_update(encryptions_key(project, version), |old| {
                    let old = old
                        .and_then(|v| <[u8; 8]>::try_from(v).ok())
                        .map_or(0, u64::from_be_bytes);
                    Some(old.saturating_add(block).to_be_bytes().to_vec())
                })?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes);
            Ok(old.saturating_add(block))
        })
    }
}

fn transaction_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => e.into(),
        sled::transaction::TransactionError::Abort(()) => StoreError::Corrupt(Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TOMBSTONE_RETENTION_SECS;
    use std::sync::{Arc, Barrier};

    fn temp_store(label: &str) -> (Sled, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("cardvault-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Sled::open(&dir, 8 << 20).unwrap(), dir)
    }

    fn record() -> CardRecord {
        CardRecord {
            created_at: 1,
            expires_at: i64::MAX,
            used_at: None,
            key_version: 1,
            meta: vec![1],
            pan: Some(vec![2; 28]),
        }
    }

    /// A store records its format; one from a newer build is refused before anything is read.
    #[test]
    fn a_store_from_a_newer_format_is_refused() {
        let (store, dir) = temp_store("format");
        store.close().unwrap();
        drop(store);
        let db = sled::open(&dir).unwrap();
        let meta = db.open_tree("meta").unwrap();
        assert_eq!(
            meta.get(FORMAT_KEY).unwrap().unwrap().as_ref(),
            FORMAT.to_be_bytes()
        );
        meta.insert(FORMAT_KEY, &(FORMAT + 1).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
        drop((meta, db));
        let refused = Sled::open(&dir, 8 << 20).err().unwrap();
        assert!(matches!(refused, StoreError::TooNew { found } if found == FORMAT + 1));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn card(expires_at: i64, used_at: Option<i64>) -> CardRecord {
        CardRecord {
            expires_at,
            used_at,
            pan: used_at.is_none().then(|| vec![2; 28]),
            ..record()
        }
    }

    /// The ids a sweep at `now` visits, each left as it is.
    fn due_ids(store: &Sled, now: i64) -> Vec<String> {
        let mut ids = Vec::new();
        store
            .sweep_cards(now, &mut |card| {
                ids.push(card.id.clone());
                Ok(card.record.clone())
            })
            .unwrap();
        ids.sort();
        ids
    }

    /// A sweep at `now` as the vault's: erases due PANs, removes due tombstones. Returns how
    /// many cards it visited.
    fn sweep(store: &Sled, now: i64) -> usize {
        let mut visited = 0;
        store
            .sweep_cards(now, &mut |card| {
                visited += 1;
                let Some(record) = card.record.clone() else {
                    return Ok(None);
                };
                if record.sweep_at() > now {
                    return Ok(Some(record));
                }
                if record.pan.is_none() {
                    assert!(store.remove_card_if(&card.project, &card.id, &record)?);
                    return Ok(None);
                }
                let erased = CardRecord {
                    pan: None,
                    ..record
                };
                let swapped =
                    store.swap_card(&card.project, &card.id, |_| Ok::<_, ()>(erased.clone()))?;
                assert!(matches!(swapped, Swap::Swapped(..)));
                Ok(Some(erased))
            })
            .unwrap();
        visited
    }

    /// The index names the cards due and no others, by 64-second bucket, and follows a card
    /// the sweeper changed; an entry whose card is gone is dropped.
    #[test]
    fn a_sweep_visits_only_the_indexed_due_cards() {
        let (store, dir) = temp_store("due");
        for i in 0..300 {
            let _ = store
                .insert_card("p", &format!("live{i:03}"), &card(6_400, None))
                .unwrap();
        }
        let _ = store
            .insert_card("p", "expired", &card(1_280, None))
            .unwrap();
        let used = card(9_000, Some(-TOMBSTONE_RETENTION_SECS + 640));
        let _ = store.insert_card("q", "tombstone", &used).unwrap();
        assert_eq!(due_ids(&store, 639), Vec::<String>::new());
        assert_eq!(due_ids(&store, 640), ["tombstone"]);
        assert_eq!(due_ids(&store, 1_279), ["tombstone"]);
        assert_eq!(due_ids(&store, 1_280), ["expired", "tombstone"]);
        // Erased, its entry moves to the end of its retention; the tombstone goes.
        assert_eq!(sweep(&store, 1_280), 2);
        assert!(store.card("p", "expired").unwrap().unwrap().pan.is_none());
        assert!(store.card("q", "tombstone").unwrap().is_none());
        assert_eq!(due_ids(&store, 6_399), Vec::<String>::new());
        assert_eq!(due_ids(&store, 6_400).len(), 300);
        let mut later = due_ids(&store, 6_400);
        later.push("expired".into());
        later.sort();
        assert_eq!(due_ids(&store, 1_280 + TOMBSTONE_RETENTION_SECS), later);
        // A card removed behind the index's back: its entry goes at its visit.
        assert!(store
            .remove_card_if("p", "live000", &card(6_400, None))
            .unwrap());
        assert_eq!(sweep(&store, 6_400), 300);
        assert_eq!(due_ids(&store, 6_400), Vec::<String>::new());
        assert_eq!(store.count_cards().unwrap(), 300);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Cards whose ids were made in the same second share one index entry: a thousand of them
    /// write one. The sweep visits the group at its expiry (every PAN erased), at the end of
    /// its retention (every tombstone removed, one used early included), and never between.
    /// A group is left alone in the minute after its second.
    #[test]
    fn cards_of_one_second_share_one_sweep_entry() {
        use crate::tokens::{IdKind, ObjectId};
        let (store, dir) = temp_store("group");
        let r = TOMBSTONE_RETENTION_SECS;
        let id = |second| ObjectId::generate_at(IdKind::Card, second).unwrap();
        let mut first = Vec::new();
        for _ in 0..1_000 {
            let id = id(1_000);
            let _ = store
                .insert_card("p", id.as_str(), &card(1_290, None))
                .unwrap();
            first.push(id);
        }
        for _ in 0..3 {
            let _ = store
                .insert_card("p", id(1_001).as_str(), &card(1_290, None))
                .unwrap();
        }
        let _ = store
            .insert_card("p", id(1_250).as_str(), &card(1_260, None))
            .unwrap();
        let entries = || store.0.current().unwrap().card_sweep.len();
        assert_eq!(entries(), 3, "one entry per group");
        // One card of the first group used early: its tombstone is due before its group's.
        let used = |c: &CardRecord| {
            Ok::<_, ()>(CardRecord {
                used_at: Some(1_100),
                pan: None,
                ..c.clone()
            })
        };
        let _ = store.swap_card("p", first[7].as_str(), used).unwrap();
        assert_eq!(sweep(&store, 1_279), 0);
        // The group of second 1250 (10 s tokens) waits out its minute.
        assert_eq!(sweep(&store, 1_290), 1_003);
        let held = |ids: &[ObjectId]| {
            ids.iter()
                .filter(|i| {
                    store
                        .card("p", i.as_str())
                        .unwrap()
                        .is_some_and(|c| c.pan.is_some())
                })
                .count()
        };
        assert_eq!(held(&first), 0, "a PAN outlived its expiry");
        assert_eq!(store.count_cards().unwrap(), 1_004);
        assert_eq!(sweep(&store, 1_310), 1);
        assert_eq!(entries(), 3);
        // Tombstones wait for their group's retention, then go together.
        assert_eq!(sweep(&store, 1_100 + r), 0);
        assert!(store.card("p", first[7].as_str()).unwrap().is_some());
        assert_eq!(sweep(&store, 1_290 + r), 1_004);
        assert_eq!((entries(), store.count_cards().unwrap()), (0, 0));
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A store written before the sweep indexes (format 2: no index trees) gets them built by
    /// its first sweep, once; until then nothing is due.
    #[test]
    fn a_store_of_an_earlier_format_has_its_sweep_indexes_built_once() {
        let (store, dir) = temp_store("upgrade");
        let _ = store
            .insert_card("p", "expired", &card(1_280, None))
            .unwrap();
        let _ = store.insert_card("p", "live", &card(6_400, None)).unwrap();
        let old = IdempotencyRecord {
            created_at: 10,
            request_digest: vec![1; 32],
            owner: 1,
            response: None,
        };
        store
            .swap_idempotency("p", "old", None, Some(&old))
            .unwrap();
        assert!(
            !store.build_sweep_indexes().unwrap(),
            "a new store has nothing to build"
        );
        store.close().unwrap();
        drop(store);
        // As the previous format left it: no index trees, format 2.
        let db = sled::open(&dir).unwrap();
        db.drop_tree("card_sweep").unwrap();
        db.drop_tree("idempotency_sweep").unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(FORMAT_KEY, &2u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
        drop(db);
        let store = Sled::open(&dir, 8 << 20).unwrap();
        assert_eq!(due_ids(&store, 1_280), Vec::<String>::new());
        assert_eq!(store.remove_idempotency_before(11).unwrap(), 0);
        assert!(store.build_sweep_indexes().unwrap());
        assert!(!store.build_sweep_indexes().unwrap(), "built twice");
        // The build counted the cards the earlier format never counted.
        assert_eq!(store.count_cards().unwrap(), 2);
        assert_eq!(due_ids(&store, 1_280), ["expired"]);
        assert_eq!(store.remove_idempotency_before(11).unwrap(), 1);
        store.close().unwrap();
        drop(store);
        // Recorded: a restart does not build them again, and the count stays.
        let store = Sled::open(&dir, 8 << 20).unwrap();
        assert!(!store.build_sweep_indexes().unwrap());
        assert_eq!(store.count_cards().unwrap(), 2);
        let _ = store.insert_card("p", "third", &card(6_400, None)).unwrap();
        store.persist_count().unwrap();
        let _ = store
            .insert_card("p", "fourth", &card(6_400, None))
            .unwrap();
        assert_eq!(store.count_cards().unwrap(), 4);
        store.close().unwrap();
        drop(store);
        // Written at close too.
        let store = Sled::open(&dir, 8 << 20).unwrap();
        assert_eq!(store.count_cards().unwrap(), 4);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Idempotency retention reads the index: old records go, newer ones stay, and a key
    /// released and claimed again is kept under its new claim.
    #[test]
    fn idempotency_retention_removes_only_old_records() {
        let (store, dir) = temp_store("idem");
        let at = |created_at| IdempotencyRecord {
            created_at,
            request_digest: vec![1; 32],
            owner: 1,
            response: None,
        };
        for (scope, created) in [("a", 100), ("b", 200), ("c", 300)] {
            store
                .swap_idempotency("p", scope, None, Some(&at(created)))
                .unwrap();
        }
        // "a" released, then claimed again later.
        store
            .swap_idempotency("p", "a", Some(&at(100)), None)
            .unwrap();
        store
            .swap_idempotency("p", "a", None, Some(&at(400)))
            .unwrap();
        assert_eq!(store.remove_idempotency_before(250).unwrap(), 1);
        assert!(store.idempotency("p", "a").unwrap().is_some());
        assert!(store.idempotency("p", "b").unwrap().is_none());
        assert!(store.idempotency("p", "c").unwrap().is_some());
        assert_eq!(store.remove_idempotency_before(250).unwrap(), 0);
        assert_eq!(store.remove_idempotency_before(401).unwrap(), 2);
        let g = store.0.current().unwrap();
        assert_eq!(g.idempotency_sweep.len(), 0, "entries left behind");
        drop(g);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A failure a reopen mends (a full disk that refused a write) leaves the store unwritable
    /// but not in need of a restart; any other I/O error needs one.
    #[test]
    fn only_a_failure_a_reopen_cannot_mend_needs_a_restart() {
        let (store, dir) = temp_store("restart");
        assert!(store.writable() && !store.needs_restart());
        let full = sled::Error::Io(std::io::ErrorKind::StorageFull.into());
        store.0.current().unwrap().commit.fail(&full);
        assert!(!store.writable() && !store.needs_restart());
        let other = sled::Error::Io(std::io::Error::other("i/o error"));
        store.0.current().unwrap().commit.fail(&other);
        assert!(!store.writable() && store.needs_restart());
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Sixteen threads race to use each of 100 records: exactly one wins every time.
    #[test]
    fn swap_card_has_exactly_one_winner() {
        let (store, dir) = temp_store("race");
        let store = Arc::new(store);
        for round in 0..100 {
            let id = format!("card_{round}");
            let _ticket = store.insert_card("p", &id, &record()).unwrap();
            let barrier = Arc::new(Barrier::new(16));
            let winners: usize = (0..16)
                .map(|_| {
                    let (store, barrier, id) =
                        (Arc::clone(&store), Arc::clone(&barrier), id.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let swap = store
                            .swap_card("p", &id, |r| {
                                if r.used_at.is_some() {
                                    return Err(());
                                }
                                Ok(CardRecord {
                                    used_at: Some(2),
                                    pan: None,
                                    ..r.clone()
                                })
                            })
                            .unwrap();
                        usize::from(matches!(swap, Swap::Swapped(..)))
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum();
            assert_eq!(winners, 1, "round {round}");
        }
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}
