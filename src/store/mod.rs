//! The store: where records, wrapped keys and store-wide state live. It sees only ciphertext,
//! wrapped keys and opaque ids. Two engines sit behind one seam, [`Store`]:
//!
//! - **sled** ([`embedded`]), the default: embedded, one process per folder, its own group
//!   commit ([`GroupCommit`]);
//! - **postgres** ([`pg`]): any number of daemons over one database, each write durable at its
//!   `COMMIT`.
//!
//! The vault, api and crypto layers do not know which one runs. Both keep the same spaces, each
//! keyed by `(project, id)`:
//! - `cards` → [`CardRecord`]; `customers` → [`CustomerRecord`] (with its token list);
//!   `customer_tokens` → [`TokenRecord`];
//! - `idempotency`: `(project, scope)` → [`IdempotencyRecord`], where the scope is an HMAC of
//!   the caller identity and its `Idempotency-Key` (a caller-chosen key never reaches the store);
//! - `keys`: `(project, name)` → a key wrapped by the KEK (`dek/<version>`, `fingerprint`);
//! - store-wide values: the KEK check value and id, the DEK versions and their states, and the
//!   encryption count reserved for each project's DEK version.
//!
//! Sweeps read only what is due: cards by [`CardRecord::sweep_at`] (the PAN's erasure at expiry,
//! then the tombstone's removal), idempotency records by `created_at`. sled keeps an index tree
//! for each ([`embedded`]); PostgreSQL a generated column with an index ([`pg`]).
//!
//! Every single-record change is a compare-and-swap against the exact bytes read. Changes that
//! span records (a card token becoming a customer token, a customer deleted with its tokens) go
//! through [`Store::commit`]: one transaction that first checks every record it depends on is
//! still exactly as the caller read it, so a racing change makes it fail as a whole (the caller
//! re-reads and decides again) instead of half-applying.
//!
//! Request paths call the `async` methods. Background work (key maintenance, sweeps) and admin
//! actions call the blocking ones; on postgres those run on the engine's own runtime, so they
//! may also be called from inside a request handler (on a helper thread).

mod commit;
pub mod embedded;
pub mod pg;
mod record;
mod recovery;
pub use recovery::WITNESS_FILE;

use std::future::Future;
use std::path::Path;

pub use commit::{FlushFailed, Ticket};
pub use embedded::Sled;
pub use pg::{PgSettings, Postgres};
pub(crate) use record::{put_bytes, put_short, Reader};
pub use record::{
    CardRecord, CustomerRecord, IdempotencyRecord, Malformed, StoredResponse, TokenRecord,
    TokenRef, TOMBSTONE_RETENTION_SECS,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: {0}")]
    Corrupt(#[from] Malformed),
    #[error(transparent)]
    Flush(#[from] FlushFailed),
    #[error("store: cannot start its threads: {0}")]
    Thread(std::io::Error),
    #[error("store: reopening after a write failure")]
    Unavailable,
    #[error("store damaged: {0}")]
    Damaged(String),
    #[error("database unavailable: {0}")]
    Database(String),
    #[error(
        "another running cardvault daemon uses this node name on this database: give each \
         node its own `[node] name`"
    )]
    InUse,
    #[error("database refused a query: {0}")]
    Query(String),
    #[error(
        "database schema version {found} was written by a newer cardvault (this one knows up to \
         {known}): run that version or a later one; downgrades are not supported"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error(
        "store format {found} was written by a newer cardvault (this one reads up to {FORMAT}): \
         run that version or a later one; downgrades are not supported"
    )]
    TooNew { found: u32 },
}

/// The layout of what this build writes. A store records the highest format that ever wrote
/// to it; this build reads every format up to its own and refuses a store from a newer one
/// (whose records it might misread or half-rewrite). 2: card metadata in the binary layout
/// (`vault::meta`); 1 (unrecorded): before it. 3: sweep indexes (on sled, a store of an
/// earlier format has its indexes built by its first sweep after the upgrade). 4: on sled, a
/// card sweep entry stands for the cards of one second (format 3's per-card entries are still
/// read; an earlier build would drop the new ones unread).
pub const FORMAT: u32 = 4;
const FORMAT_KEY: &[u8] = b"format";

/// The outcome of a compare-and-swap loop ([`Store::swap_card`], [`Store::swap_token`], ...).
pub enum Swap<R, E> {
    /// No record under that id.
    Missing,
    /// `decide` refused the change; nothing was written.
    Refused(E),
    /// The record was replaced; the old value and the ticket to await before acting on it.
    Swapped(R, Ticket),
}

impl<R, E> Swap<R, E> {
    /// The old record and its ticket; `missing` when there was no record, the refusal as is.
    pub fn swapped(self, missing: E) -> Result<(R, Ticket), E> {
        match self {
            Swap::Swapped(old, ticket) => Ok((old, ticket)),
            Swap::Missing => Err(missing),
            Swap::Refused(e) => Err(e),
        }
    }
}

/// A record type with a byte encoding.
pub trait Codec: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, Malformed>;
}

macro_rules! codec {
    ($t:ty) => {
        impl Codec for $t {
            fn encode(&self) -> Vec<u8> {
                <$t>::encode(self)
            }
            fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
                <$t>::decode(bytes)
            }
        }
    };
}
codec!(CardRecord);
codec!(CustomerRecord);
codec!(TokenRecord);
codec!(IdempotencyRecord);

/// Bytes as stored (raw scans).
impl Codec for Vec<u8> {
    fn encode(&self) -> Vec<u8> {
        self.clone()
    }
    fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        Ok(bytes.to_vec())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Space {
    Cards,
    Customers,
    Tokens,
}

/// Checks and writes for one [`Store::commit`].
#[derive(Default)]
pub struct Batch {
    /// `(tree, key, the exact bytes expected there, or None for "absent")`
    checks: Vec<(Space, Vec<u8>, Option<Vec<u8>>)>,
    /// `(tree, key, new bytes, or None to remove)`
    writes: Vec<(Space, Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn expect_card(&mut self, project: &str, id: &str, rec: &CardRecord) -> &mut Batch {
        self.checks
            .push((Space::Cards, key(project, id), Some(rec.encode())));
        self
    }

    pub fn put_card(&mut self, project: &str, id: &str, rec: &CardRecord) -> &mut Batch {
        self.writes
            .push((Space::Cards, key(project, id), Some(rec.encode())));
        self
    }

    pub fn expect_customer(&mut self, project: &str, id: &str, rec: &CustomerRecord) -> &mut Batch {
        self.checks
            .push((Space::Customers, key(project, id), Some(rec.encode())));
        self
    }

    pub fn put_customer(&mut self, project: &str, id: &str, rec: &CustomerRecord) -> &mut Batch {
        self.writes
            .push((Space::Customers, key(project, id), Some(rec.encode())));
        self
    }

    pub fn expect_no_customer(&mut self, project: &str, id: &str) -> &mut Batch {
        self.checks.push((Space::Customers, key(project, id), None));
        self
    }

    pub fn remove_customer(&mut self, project: &str, id: &str) -> &mut Batch {
        self.writes.push((Space::Customers, key(project, id), None));
        self
    }

    pub fn expect_token(&mut self, project: &str, id: &str, rec: &TokenRecord) -> &mut Batch {
        self.checks
            .push((Space::Tokens, key(project, id), Some(rec.encode())));
        self
    }

    pub fn expect_no_token(&mut self, project: &str, id: &str) -> &mut Batch {
        self.checks.push((Space::Tokens, key(project, id), None));
        self
    }

    pub fn put_token(&mut self, project: &str, id: &str, rec: &TokenRecord) -> &mut Batch {
        self.writes
            .push((Space::Tokens, key(project, id), Some(rec.encode())));
        self
    }

    pub fn remove_token(&mut self, project: &str, id: &str) -> &mut Batch {
        self.writes.push((Space::Tokens, key(project, id), None));
        self
    }
}

/// Which engine keeps the records, and its settings.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sled {
        dir: std::path::PathBuf,
        cache_bytes: u64,
    },
    Postgres(PgSettings),
}

/// The store: cheap to clone, every clone the same store.
#[derive(Clone)]
pub enum Store {
    Sled(Sled),
    Postgres(Postgres),
}

/// Sealed bytes as a shared store keeps a card's CVC: the DEK version they are sealed under,
/// and the bytes (the store cannot open them).
pub type SealedBlob = (u32, Vec<u8>);
/// A [`SealedBlob`] with its key: `(project, id, version, sealed)`.
pub type SealedRow = (String, String, u32, Vec<u8>);
/// A card the sweeper has work on: its place in the sweep order (`at`, unix seconds: on sled
/// the start of its index bucket, on PostgreSQL the exact time; then project and id) and the
/// record as stored now (`None`: gone, or unreadable).
#[derive(Debug)]
pub struct DueCard {
    pub at: i64,
    pub project: String,
    pub id: String,
    pub record: Option<CardRecord>,
}

/// Where a sweep pass has got to: `(at, project, id)` of the last card it read.
pub type SweepCursor = (i64, String, String);

/// The sweeper's work on one due card: returns what the card holds after it (`None`: gone).
pub type SweepVisit<'a> = &'a mut dyn FnMut(&DueCard) -> Result<Option<CardRecord>, StoreError>;

/// Cards read per query by the PostgreSQL sweep.
const SWEEP_PAGE: usize = 512;

/// A compare-and-swap of one meta row: what it must hold now, what it then holds (`None`:
/// absent).
pub type MetaSwap<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Dispatches a call to the engine: `engine!(self, s => s.method(args))`.
macro_rules! engine {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Sled($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens the store the config names (creating or migrating a PostgreSQL schema).
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Sled { dir, cache_bytes } => Store::open_sled(dir, *cache_bytes),
            StoreConfig::Postgres(settings) => Ok(Store::Postgres(Postgres::open(settings, None)?)),
        }
    }

    /// Opens the store for a daemon: on PostgreSQL it joins the database's nodes as `node`.
    pub fn open_node(config: &StoreConfig, node: &str) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Postgres(settings) => {
                Ok(Store::Postgres(Postgres::open(settings, Some(node))?))
            }
            StoreConfig::Sled { .. } => Store::open(config),
        }
    }

    /// Opens the sled store in `dir`.
    pub fn open_sled(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Ok(Store::Sled(Sled::open(dir, cache_bytes)?))
    }

    /// `"sled"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        match self {
            Store::Sled(_) => "sled",
            Store::Postgres(_) => "postgres",
        }
    }

    /// See [`Sled::lock_stopped`]: the lock a daemon holds on a sled folder.
    pub fn lock_stopped(dir: &Path) -> Result<Option<std::fs::File>, String> {
        Sled::lock_stopped(dir)
    }

    /// Which opening of the store is current: anything derived from an earlier one (cached
    /// keys, counts) must be read again. Constant on postgres, whose commits are never undone.
    pub fn generation(&self) -> u64 {
        engine!(self, s => s.generation())
    }

    /// Whether the store takes writes now.
    pub fn writable(&self) -> bool {
        engine!(self, s => s.writable())
    }

    /// Whether the store failed in a way only a restart mends.
    pub fn needs_restart(&self) -> bool {
        engine!(self, s => s.needs_restart())
    }

    /// Waits until the write behind `ticket` is durable (on postgres it already is).
    pub async fn durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.durable(ticket).await,
            Store::Postgres(_) => Ok(()),
        }
    }

    /// Makes everything durable and stops the engine's threads.
    pub fn close(&self) -> Result<(), StoreError> {
        engine!(self, s => s.close())
    }

    /// Runs an `async` store call to completion from blocking code (key maintenance, sweeps,
    /// admin actions).
    pub fn wait<T: Send>(
        &self,
        call: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        match self {
            // sled's calls never wait: they are ready on their first poll.
            Store::Sled(_) => {
                futures_util::FutureExt::now_or_never(call).unwrap_or(Err(StoreError::Unavailable))
            }
            Store::Postgres(pg) => pg.block(call),
        }
    }

    /// Runs a store call nobody waits for (a `Drop` releasing a claim): at once on sled, as
    /// a task on postgres (on the caller's runtime, or the engine's outside one).
    pub fn detach(&self, call: impl Future<Output = ()> + Send + 'static) {
        match self {
            Store::Sled(_) => {
                // sled's calls are ready on their first poll.
                let _ = futures_util::FutureExt::now_or_never(call);
            }
            Store::Postgres(pg) => pg.detach(call),
        }
    }

    /// Inserts a new card record under a fresh id.
    pub async fn insert_card(
        &self,
        project: &str,
        id: &str,
        rec: &CardRecord,
    ) -> Result<Ticket, StoreError> {
        match self {
            Store::Sled(s) => s.insert_card(project, id, rec),
            Store::Postgres(pg) => {
                Box::pin(pg.insert(pg::Table::Cards, project, id, rec.encode())).await
            }
        }
    }

    pub async fn card(&self, project: &str, id: &str) -> Result<Option<CardRecord>, StoreError> {
        match self {
            Store::Sled(s) => s.card(project, id),
            Store::Postgres(pg) => Box::pin(pg.get(pg::Table::Cards, project, id)).await,
        }
    }

    pub async fn customer(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<CustomerRecord>, StoreError> {
        match self {
            Store::Sled(s) => s.customer(project, id),
            Store::Postgres(pg) => Box::pin(pg.get(pg::Table::Customers, project, id)).await,
        }
    }

    pub async fn token(&self, project: &str, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Sled(s) => s.token(project, id),
            Store::Postgres(pg) => Box::pin(pg.get(pg::Table::Tokens, project, id)).await,
        }
    }

    /// Atomically replaces a card record with what `decide` makes of it: compare-and-swap in
    /// a loop, so of any number of racing callers exactly one sees the old state and wins.
    /// `decide` may run several times and must have no side effects.
    pub async fn swap_card<E>(
        &self,
        project: &str,
        id: &str,
        decide: impl FnMut(&CardRecord) -> Result<CardRecord, E>,
    ) -> Result<Swap<CardRecord, E>, StoreError> {
        match self {
            Store::Sled(s) => s.swap_card(project, id, decide),
            Store::Postgres(pg) => Box::pin(pg.swap(pg::Table::Cards, project, id, decide)).await,
        }
    }

    /// Uses a one-off card token: [`Store::swap_card`] with `decide`, which must accept exactly
    /// an unused record that still holds its PAN, expires after `now`, is sealed under one of
    /// `versions`, and must make it used at `now` without its PAN. On PostgreSQL that change
    /// is one statement (one round trip), and `decide` only names the refusal. That statement
    /// also takes the card's stored CVC: `Some(cvc)` when it looked (PostgreSQL, the card used
    /// by the statement), `None` when the caller must take it itself.
    #[allow(clippy::type_complexity)]
    pub async fn use_card_taking_cvc<E>(
        &self,
        project: &str,
        id: &str,
        now: i64,
        versions: &[u32],
        decide: impl FnMut(&CardRecord) -> Result<CardRecord, E>,
    ) -> Result<(Swap<CardRecord, E>, Option<Option<SealedBlob>>), StoreError> {
        match self {
            Store::Sled(s) => Ok((s.swap_card(project, id, decide)?, None)),
            Store::Postgres(pg) => {
                Box::pin(pg.use_card_taking_cvc(project, id, now, versions, decide)).await
            }
        }
    }

    /// A new card and its sealed CVC `(version, sealed, ttl)`, written together (PostgreSQL
    /// only: on sled CVCs stay in memory and this is [`Store::insert_card`]).
    pub async fn insert_card_with_cvc(
        &self,
        project: &str,
        id: &str,
        rec: &CardRecord,
        cvc: (u32, Vec<u8>, std::time::Duration),
    ) -> Result<Ticket, StoreError> {
        match self {
            Store::Sled(s) => s.insert_card(project, id, rec),
            Store::Postgres(pg) => {
                Box::pin(pg.insert_card_with_cvc(project, id, rec.encode(), cvc)).await
            }
        }
    }

    /// As [`Store::swap_card`], for a customer.
    pub async fn swap_customer<E>(
        &self,
        project: &str,
        id: &str,
        decide: impl FnMut(&CustomerRecord) -> Result<CustomerRecord, E>,
    ) -> Result<Swap<CustomerRecord, E>, StoreError> {
        match self {
            Store::Sled(s) => s.swap_customer(project, id, decide),
            Store::Postgres(pg) => {
                Box::pin(pg.swap(pg::Table::Customers, project, id, decide)).await
            }
        }
    }

    /// As [`Store::swap_card`], for a customer token.
    pub async fn swap_token<E>(
        &self,
        project: &str,
        id: &str,
        decide: impl FnMut(&TokenRecord) -> Result<TokenRecord, E>,
    ) -> Result<Swap<TokenRecord, E>, StoreError> {
        match self {
            Store::Sled(s) => s.swap_token(project, id, decide),
            Store::Postgres(pg) => Box::pin(pg.swap(pg::Table::Tokens, project, id, decide)).await,
        }
    }

    /// Inserts a new customer under a fresh id.
    pub async fn insert_customer(
        &self,
        project: &str,
        id: &str,
        rec: &CustomerRecord,
    ) -> Result<Ticket, StoreError> {
        match self {
            Store::Sled(s) => s.insert_customer(project, id, rec),
            Store::Postgres(pg) => {
                Box::pin(pg.insert(pg::Table::Customers, project, id, rec.encode())).await
            }
        }
    }

    /// Applies `batch` in one transaction if every record it checks is exactly as expected.
    /// `Ok(None)`: a check failed (a racing change); nothing was written.
    pub async fn commit(&self, batch: &Batch) -> Result<Option<Ticket>, StoreError> {
        match self {
            Store::Sled(s) => s.commit(batch),
            Store::Postgres(pg) => Box::pin(pg.commit(batch)).await,
        }
    }

    pub async fn idempotency(
        &self,
        project: &str,
        scope: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        match self {
            Store::Sled(s) => s.idempotency(project, scope),
            Store::Postgres(pg) => Box::pin(pg.get(pg::Table::Idempotency, project, scope)).await,
        }
    }

    /// Compare-and-swap of an idempotency record; `Ok(None)` when `old` is no longer current.
    pub async fn swap_idempotency(
        &self,
        project: &str,
        scope: &str,
        old: Option<&IdempotencyRecord>,
        new: Option<&IdempotencyRecord>,
    ) -> Result<Option<Ticket>, StoreError> {
        match self {
            Store::Sled(s) => s.swap_idempotency(project, scope, old, new),
            Store::Postgres(pg) => {
                Box::pin(pg.swap_bytes(
                    pg::Table::Idempotency,
                    project,
                    scope,
                    old.map(IdempotencyRecord::encode),
                    new.map(IdempotencyRecord::encode),
                ))
                .await
            }
        }
    }

    /// Removes idempotency records created before `cutoff` (unix seconds); returns how many.
    pub fn remove_idempotency_before(&self, cutoff: i64) -> Result<usize, StoreError> {
        match self {
            Store::Sled(s) => s.remove_idempotency_before(cutoff),
            Store::Postgres(pg) => pg.remove_idempotency_before(cutoff),
        }
    }

    /// Visits the cards due for the sweeper at `now` (their [`CardRecord::sweep_at`] at
    /// most `now`, as indexed). `visit` returns what the card holds after it (`None`: gone),
    /// and the index follows. On sled the index is by 64-second bucket and by group (the
    /// cards of one project and second), so cards due later may come too: `visit` checks
    /// each record. On PostgreSQL, pages of [`SWEEP_PAGE`] in index order; its index follows
    /// the record by itself.
    pub fn sweep_cards(&self, now: i64, visit: SweepVisit<'_>) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.sweep_cards(now, visit),
            Store::Postgres(pg) => {
                let mut after = None;
                loop {
                    let due = pg.cards_due(now, after.as_ref(), SWEEP_PAGE)?;
                    let Some(last) = due.last() else {
                        return Ok(());
                    };
                    after = Some((last.at, last.project.clone(), last.id.clone()));
                    for card in &due {
                        visit(card)?;
                    }
                }
            }
        }
    }

    /// Builds the sweep indexes of a store written before they existed: a full scan, once
    /// (sled; PostgreSQL's migration did it). Returns whether there was anything to build.
    pub fn build_sweep_indexes(&self) -> Result<bool, StoreError> {
        match self {
            Store::Sled(s) => s.build_sweep_indexes(),
            Store::Postgres(_) => Ok(false),
        }
    }

    /// How many card records the store holds, without a scan: on sled a count kept in the
    /// store (exact but for the changes of the last second before a crash), on PostgreSQL the
    /// planner's estimate (refreshed by its autovacuum).
    pub fn count_cards(&self) -> Result<u64, StoreError> {
        engine!(self, s => s.count_cards())
    }

    /// Writes sled's card count (every second, from the sweeper); nothing on PostgreSQL.
    pub fn persist_count(&self) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.persist_count(),
            Store::Postgres(_) => Ok(()),
        }
    }

    /// Removes a card record if it still holds exactly `expected` (used by the sweeper).
    pub fn remove_card_if(
        &self,
        project: &str,
        id: &str,
        expected: &CardRecord,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sled(s) => s.remove_card_if(project, id, expected),
            Store::Postgres(pg) => {
                let removed = pg.block(pg.swap_bytes(
                    pg::Table::Cards,
                    project,
                    id,
                    Some(expected.encode()),
                    None,
                ))?;
                Ok(removed.is_some())
            }
        }
    }

    /// Every card record, as `(project, id, record)`; records that fail to decode are `Err`
    /// items (counted by the caller).
    pub fn cards(
        &self,
    ) -> Box<dyn Iterator<Item = Result<(String, String, CardRecord), StoreError>> + Send> {
        match self {
            Store::Sled(s) => Box::new(s.cards()),
            Store::Postgres(pg) => Box::new(pg.entries(pg::Table::Cards)),
        }
    }

    /// Every customer record, as `(project, id, record)`.
    pub fn customers(
        &self,
    ) -> Box<dyn Iterator<Item = Result<(String, String, CustomerRecord), StoreError>> + Send> {
        match self {
            Store::Sled(s) => Box::new(s.customers()),
            Store::Postgres(pg) => Box::new(pg.entries(pg::Table::Customers)),
        }
    }

    /// Every customer token record, as `(project, id, record)`.
    pub fn tokens(
        &self,
    ) -> Box<dyn Iterator<Item = Result<(String, String, TokenRecord), StoreError>> + Send> {
        match self {
            Store::Sled(s) => Box::new(s.tokens()),
            Store::Postgres(pg) => Box::new(pg.entries(pg::Table::Tokens)),
        }
    }

    /// A project's key wrapped by the KEK, if it exists.
    pub fn wrapped_key(&self, project: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        engine!(self, s => s.wrapped_key(project, name))
    }

    /// Stores `wrapped` unless a key of that name exists; returns the key that is now stored
    /// (ours, or the one a racing writer stored first). Not durable here on sled: callers
    /// flush before sealing anything under it (`Vault::project_keys`, `Vault::rotate_deks`),
    /// and check the store was not reopened in between.
    pub fn insert_wrapped_key(
        &self,
        project: &str,
        name: &str,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        engine!(self, s => s.insert_wrapped_key(project, name, wrapped))
    }

    /// The wrapped KEK check value and the KEK id, if this store has them yet.
    pub fn kek_check(&self) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        engine!(self, s => s.kek_check())
    }

    /// The id of the KEK this store's keys are wrapped by, if it has one yet.
    pub fn kek_id(&self) -> Result<Option<String>, StoreError> {
        Ok(self.kek_check()?.map(|(_, id)| id))
    }

    /// Records the KEK check value and id of a new store, durably, before anything is sealed.
    pub fn set_kek_check(&self, wrapped: &[u8], kek_id: &str) -> Result<(), StoreError> {
        engine!(self, s => s.set_kek_check(wrapped, kek_id))
    }

    /// Every wrapped key, as `(project, name, wrapped)`.
    pub fn wrapped_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        engine!(self, s => s.wrapped_keys())
    }

    /// Replaces the wrapped root key (`root.0` by `root.1`, `None`: there is none yet), the
    /// wrapped keys listed, the KEK check value and id, and (when `recovery` is given) the
    /// recovery copy of the root key (`None` on either side: absent), in one transaction,
    /// durably: after a crash the store is wholly as before or wholly as after. `Ok(false)`:
    /// the root key, its recovery copy or some wrapped key is no longer what the change was
    /// made from (another node changed it).
    pub fn rewrap(
        &self,
        rewrapped: &[(String, String, Vec<u8>, Vec<u8>)],
        root: (Option<&[u8]>, &[u8]),
        check: &[u8],
        kek_id: &str,
        recovery: Option<MetaSwap<'_>>,
    ) -> Result<bool, StoreError> {
        engine!(self, s => s.rewrap(rewrapped, root, check, kek_id, recovery))
    }

    /// The root key as the KEK wraps it, if the store has one yet.
    pub fn root_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        engine!(self, s => s.root_key())
    }

    /// The recovery copy of the root key (wrapped by the custodians' KEK while the KEK itself
    /// is in an HSM), if the store has one.
    pub fn recovery_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        engine!(self, s => s.recovery_root())
    }

    /// Removes a wrapped key (a destroyed DEK version). Not durable on sled until the next
    /// flush.
    pub fn remove_wrapped_key(&self, project: &str, name: &str) -> Result<(), StoreError> {
        engine!(self, s => s.remove_wrapped_key(project, name))
    }

    /// The DEK version states (JSON, owned by the vault), if written yet.
    pub fn dek_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        engine!(self, s => s.dek_state())
    }

    /// Replaces the DEK version states, durably, if they are still `old` (`None`: never
    /// written); `Ok(false)` if another writer (another node) changed them first.
    pub fn swap_dek_state(&self, old: Option<&[u8]>, new: &[u8]) -> Result<bool, StoreError> {
        engine!(self, s => s.swap_dek_state(old, new))
    }

    /// The id that marks this process's idempotency claims on a shared database.
    pub fn node_id(&self) -> Option<u64> {
        match self {
            Store::Sled(_) => None,
            Store::Postgres(pg) => pg.node_id(),
        }
    }

    /// Whether background work (key maintenance, sweeps) runs in this process: always on
    /// sled; on PostgreSQL on the one node that holds the leader lock.
    pub fn is_leader(&self) -> bool {
        match self {
            Store::Sled(_) => true,
            Store::Postgres(pg) => pg.is_leader(),
        }
    }

    /// How many daemons serve this store now (this one included): 1 on sled.
    pub fn live_nodes(&self) -> usize {
        match self {
            Store::Sled(_) => 1,
            Store::Postgres(pg) => pg.live_nodes(),
        }
    }

    /// Whether several daemons may share this store (and so its CVCs and key state).
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Tells the other nodes which DEK version this one seals under (`None`: sealed) and
    /// whether a request here still holds an older one.
    pub fn report_keys(&self, active_version: Option<u32>, holds_retired: bool) {
        if let Store::Postgres(pg) = self {
            pg.report_keys(active_version, holds_retired);
        }
    }

    /// Whether the claim owner `id` is a live node (never, on sled: a claim not this
    /// process's own was left by one that died).
    pub async fn node_alive(&self, id: u64) -> Result<bool, StoreError> {
        match self {
            Store::Sled(_) => Ok(false),
            Store::Postgres(pg) => Box::pin(pg.node_alive(id)).await,
        }
    }

    /// Whether another live node has not yet taken version `active` into use or still holds
    /// an older DEK.
    pub fn others_hold_retired(&self, active: u32) -> Result<bool, StoreError> {
        match self {
            Store::Sled(_) => Ok(false),
            Store::Postgres(pg) => pg.others_hold_retired(active),
        }
    }

    /// Removes a card's stored CVC, returning it unless it had expired.
    pub async fn take_cvc(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<SealedBlob>, StoreError> {
        match self {
            Store::Sled(_) => Ok(None),
            Store::Postgres(pg) => Box::pin(pg.take_cvc(project, id)).await,
        }
    }

    /// Deletes expired stored CVCs.
    pub fn sweep_cvcs(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sled(_) => Ok(0),
            Store::Postgres(pg) => pg.sweep_cvcs(),
        }
    }

    /// The DEK versions stored CVCs are sealed under.
    pub fn cvc_versions(&self) -> Result<Vec<u32>, StoreError> {
        match self {
            Store::Sled(_) => Ok(Vec::new()),
            Store::Postgres(pg) => pg.cvc_versions(),
        }
    }

    /// Stored CVCs sealed under another DEK version than `active` (at most `limit`), for
    /// re-encryption: `(project, id, version, sealed)`.
    pub fn cvcs_not_under(&self, active: u32, limit: i64) -> Result<Vec<SealedRow>, StoreError> {
        match self {
            Store::Sled(_) => Ok(Vec::new()),
            Store::Postgres(pg) => pg.cvcs_not_under(active, limit),
        }
    }

    /// Replaces a stored CVC's sealing if it is still `old`.
    pub fn reseal_cvc(
        &self,
        project: &str,
        id: &str,
        old: &[u8],
        version: u32,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sled(_) => Ok(false),
            Store::Postgres(pg) => pg.reseal_cvc(project, id, old, version, new),
        }
    }

    /// Stored CVCs (live or awaiting the sweep).
    pub fn cvc_count(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sled(_) => Ok(0),
            Store::Postgres(pg) => pg.cvc_count(),
        }
    }

    /// Encryptions reserved so far under a project's DEK version.
    pub fn encryptions_reserved(&self, project: &str, version: u32) -> Result<u64, StoreError> {
        engine!(self, s => s.encryptions_reserved(project, version))
    }

    /// Where DEK encryption counts are reserved.
    pub fn ledger(&self) -> Ledger {
        Ledger(self.clone())
    }

    /// The commit number the last flush made durable (sled); `None` on PostgreSQL.
    pub fn durable_commit(&self) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Sled(s) => s.durable_commit().map(Some),
            Store::Postgres(_) => Ok(None),
        }
    }

    /// Makes everything written so far durable (for rare, blocking callers: key operations).
    pub fn flush(&self) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.flush(),
            Store::Postgres(_) => Ok(()),
        }
    }
}

/// The keyed spaces, for moving a store between engines as raw bytes (`store copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cards,
    Customers,
    Tokens,
    Idempotency,
    Keys,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Keys,
        Kind::Cards,
        Kind::Customers,
        Kind::Tokens,
        Kind::Idempotency,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Cards => "cards",
            Kind::Customers => "customers",
            Kind::Tokens => "customer tokens",
            Kind::Idempotency => "idempotency keys",
            Kind::Keys => "wrapped keys",
        }
    }

    /// Whether `bytes` decode as a record of this space.
    pub fn decodes(self, bytes: &[u8]) -> bool {
        match self {
            Kind::Cards => CardRecord::decode(bytes).is_ok(),
            Kind::Customers => CustomerRecord::decode(bytes).is_ok(),
            Kind::Tokens => TokenRecord::decode(bytes).is_ok(),
            Kind::Idempotency => IdempotencyRecord::decode(bytes).is_ok(),
            Kind::Keys => !bytes.is_empty(),
        }
    }
}

/// `(project, id, bytes)` items of a raw scan.
pub type RawEntries =
    Box<dyn Iterator<Item = Result<(String, String, Vec<u8>), StoreError>> + Send>;

impl Store {
    /// Every entry of a space as stored (for `store copy`).
    pub fn raw_entries(&self, kind: Kind) -> RawEntries {
        match self {
            Store::Sled(s) => s.raw_entries(kind),
            Store::Postgres(pg) => Box::new(pg.raw_entries(pg::Table::of_kind(kind))),
        }
    }

    /// Writes an entry as is, replacing any (for `store copy`; durable after [`Store::flush`]).
    pub fn put_raw(
        &self,
        kind: Kind,
        project: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.put_raw(kind, project, id, bytes),
            Store::Postgres(pg) => pg.put_raw(pg::Table::of_kind(kind), project, id, bytes),
        }
    }

    /// Every DEK encryption reservation: `(project, version, reserved)`.
    pub fn reservations(&self) -> Result<Vec<(String, u32, u64)>, StoreError> {
        engine!(self, s => s.reservations())
    }
}

/// Reservations of DEK encryption counts, held by each DEK in use.
#[derive(Clone)]
pub struct Ledger(Store);

impl Ledger {
    /// Takes `block` more encryptions of a DEK version and returns the total taken so far
    /// (by every holder: several daemons, or one for an instant after a version change; each
    /// adds its own block, so none counts another's seals as its own). On sled it is not
    /// awaited: the first record sealed under the new block is flushed after this write, so
    /// it never reaches disk without it. (Across a reopen of the store, requests in flight
    /// may seal a few records under a block the reopen lost: an undercount of a few seals,
    /// far inside the 2^24 margin below the GCM limit.) On postgres it is committed before
    /// it returns.
    pub fn reserve(&self, project: &str, version: u32, block: u64) -> Result<u64, StoreError> {
        engine!(&self.0, s => s.reserve(project, version, block))
    }
}

fn split_key(k: &[u8]) -> Option<(String, String)> {
    let mut parts = k.splitn(2, |b| *b == 0);
    let project = std::str::from_utf8(parts.next()?).ok()?;
    let name = std::str::from_utf8(parts.next()?).ok()?;
    Some((project.to_owned(), name.to_owned()))
}

fn key(project: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(project.len() + 1 + name.len());
    k.extend_from_slice(project.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}
