//! Group commit: many writers share one `flush()`.
//!
//! A write is durable only after a sled `flush()` that *started after* the write completed
//! (sled buffers writes in user space; an `insert` that returned can vanish on `kill -9`).
//! Each writer inserts, then takes a ticket (a sequence number) and waits until the flusher
//! reports a flush that covered it. One dedicated thread loops: read the highest ticket issued,
//! `flush()`, publish that ticket as durable. Writers that arrive during a flush are covered by
//! the next one, so under load one fsync serves many requests.
//!
//! sled's `flush()` writes its log with `sync_file_range`, which survives a killed process but
//! neither syncs the file's size nor flushes the drive's cache: after a power loss the flushed
//! tail could be gone. So each flush is followed by an `fdatasync` of the log file, and only
//! then are its writers told their writes are durable.
//!
//! Each flush first writes the next commit number into the store's `meta` tree, so the store
//! itself says how far its durable state reaches; [`GroupCommit::durable_commit`] is the last
//! number a completed flush covered (the witness in [`super::recovery`] keeps it outside the
//! store, to catch a store that lost what it had acknowledged).
//!
//! Why not `Tree::flush_async`: on sled 0.34.7 it deadlocks with 7 or more concurrent callers
//! (sled issue #1308). This design calls only the blocking `flush()`, from one thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

struct Shared {
    /// The highest ticket handed out. A writer takes its ticket after its write returned, so
    /// any flush that starts after reading a value >= the ticket covers the write.
    issued: AtomicU64,
    /// The flusher sleeps here while no ticket is waiting. The mutex guards nothing but the
    /// sleep/wake handshake (a writer notifies while holding it, so no wake-up is lost).
    wake_lock: Mutex<()>,
    wake: Condvar,
    /// Set by the flusher (under `wake_lock`) before it checks for tickets and sleeps. A
    /// writer that bumped `issued` and then reads `false` here needs no wake-up: the flusher
    /// has not checked yet, so it will see the new ticket (all four accesses are SeqCst).
    /// Under load the flusher is nearly always busy, and writers skip the lock and syscall.
    sleeping: AtomicBool,
    stop: AtomicBool,
    /// The commit number the last completed flush covered.
    durable_commit: AtomicU64,
    /// Set when a write or flush failed: this sled instance takes no more writes.
    failed: AtomicBool,
    /// Set when that failure was not a full disk: reopening in place is not safe.
    fatal: AtomicBool,
    /// Held around each `fdatasync` of the log ([`sync_log`]).
    sync_turn: Mutex<()>,
}

impl Shared {
    /// Nothing issued yet; commit numbers continue from `commit`.
    fn new(commit: u64) -> Shared {
        Shared {
            issued: AtomicU64::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            durable_commit: AtomicU64::new(commit),
            failed: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
            sync_turn: Mutex::new(()),
        }
    }

    /// Marks this instance failed at `step`, and fatal unless [`after_failure`] allows a
    /// reopen. `fatal` is set before `failed`, so whoever sees `failed` sees the verdict too;
    /// and it is never cleared, so a later, milder report cannot undo it.
    fn fail(&self, step: Step, error: &sled::Error) {
        if after_failure(step, error) == Recovery::Restart {
            self.fatal.store(true, Ordering::SeqCst);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Marks this instance failed after a sled call (an insert, a transaction, or its
    /// `flush()`) returned `error`. sled keeps the first error of the thread that writes its
    /// log and returns it from every later call, and that thread both `pwrite`s the log and
    /// `sync_file_range`s it: a full disk refusing a write and a failed write-back of pages
    /// the kernel had already taken arrive as the same error, of the same kind. Only the
    /// kernel can tell them apart, so before a full disk is taken for a refused write, the
    /// log is `fdatasync`ed on our own handle: that reports any write-back error met since
    /// our last sync (and writes back what is still dirty). If it fails, the failure is a
    /// write-back failure, fatal like any failed `fdatasync`. It takes its turn with
    /// [`sync_log`] and marks the instance before the turn ends, so no sync that acknowledges
    /// writes can run between the two.
    fn sled_failed(&self, log: &std::fs::File, error: &sled::Error) {
        let _turn = self.sync_turn.lock().unwrap_or_else(|p| p.into_inner());
        // Once fatal, nothing can make it less so: no need to ask the kernel again.
        let step =
            if is_full(error) && !self.fatal.load(Ordering::SeqCst) && log.sync_data().is_err() {
                Step::WriteBack
            } else {
                Step::Write
            };
        self.fail(step, error);
    }
}

/// Where a failure was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A sled call failed: an insert, a transaction, the commit number, or the `pwrite`
    /// inside its `flush()`. A full disk counts as this only once the log's write-back was
    /// then found clean ([`Shared::sled_failed`]): what the kernel had taken is on disk, and
    /// nothing written since was acknowledged.
    Write,
    /// The kernel's write-back of the log failed: reported by an `fdatasync` of it, whether
    /// ours after a flush ([`sync_log`]) or the one that checks a sled error
    /// ([`Shared::sled_failed`]), which is how a failure of sled's own `sync_file_range`
    /// shows.
    WriteBack,
}

/// What may be done about an instance that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Reopen the store in place once the disk has room again.
    Reopen,
    /// Take no more writes until an operator has checked the disk and restarted the daemon.
    Restart,
}

/// Whether a failure at `step` may be recovered by reopening the store in place. Only a full
/// disk refusing a write may: the files then hold everything up to the refused write, and
/// reopening reads them as a restart would. A failed write-back never may, whatever its kind
/// (a full disk met only at write-back included): the kernel may have dropped the pages it
/// could not write, keep serving them from its cache, and report the next sync a success, so
/// the store could be reopened on data the disk does not hold and acknowledge later writes on
/// top of it. Any other error is not understood well enough to carry on either.
fn after_failure(step: Step, error: &sled::Error) -> Recovery {
    match step {
        Step::Write if is_full(error) => Recovery::Reopen,
        Step::Write | Step::WriteBack => Recovery::Restart,
    }
}

/// Whether `error` says the file system is full (`ENOSPC`).
fn is_full(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e) if e.kind() == std::io::ErrorKind::StorageFull)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flushing the store to disk failed")]
pub struct FlushFailed;

pub struct GroupCommit {
    /// Which opening of the store this is; a ticket from another one is never durable here.
    generation: u64,
    shared: Arc<Shared>,
    /// The highest ticket on disk. It never moves after a failure: after a failed `fdatasync`
    /// the kernel may have dropped the pages it could not write and report the next one as a
    /// success, so a flush after a failure proves nothing. The flusher stops for good, and
    /// its writers see the channel close.
    durable: watch::Receiver<u64>,
    /// sled's log file, synced after each flush.
    log: Arc<std::fs::File>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A write waiting to become durable.
#[must_use = "a write is not durable until its ticket is awaited"]
pub struct Ticket {
    generation: u64,
    seq: u64,
}

impl Ticket {
    /// The ticket of a write that was durable when it returned (a PostgreSQL `COMMIT`).
    pub(crate) fn committed() -> Ticket {
        Ticket {
            generation: 0,
            seq: 0,
        }
    }
}

/// Where the commit number is kept in the `meta` tree.
pub const COMMIT_KEY: &[u8] = b"commit";

impl GroupCommit {
    /// Starts the flusher for one opening (`generation`) of the store, continuing the commit
    /// numbers from `commit` (what the store's `meta` tree holds).
    /// `log` is sled's log file (`data_dir/db`), synced after each flush.
    pub fn start(
        db: sled::Db,
        meta: sled::Tree,
        log: std::fs::File,
        generation: u64,
        commit: u64,
    ) -> std::io::Result<GroupCommit> {
        let (tx, rx) = watch::channel(0);
        let shared = Arc::new(Shared::new(commit));
        let thread_shared = Arc::clone(&shared);
        let log = Arc::new(log);
        let thread_log = Arc::clone(&log);
        // The sender lives in the thread: when the thread ends (shutdown, a failure, or a
        // panic), the channel closes and every waiting writer gets `FlushFailed` instead of
        // waiting forever.
        let thread = std::thread::Builder::new()
            .name("cardvault-flush".into())
            .spawn(move || flush_loop(&thread_shared, &db, &meta, &thread_log, &tx))?;
        Ok(GroupCommit {
            generation,
            shared,
            durable: rx,
            log,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Call after the write has returned.
    pub fn ticket(&self) -> Ticket {
        let seq = self.shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.wake_flusher();
        }
        Ticket {
            generation: self.generation,
            seq,
        }
    }

    /// The commit number the last completed flush covered.
    pub fn durable_commit(&self) -> u64 {
        self.shared.durable_commit.load(Ordering::SeqCst)
    }

    /// Whether a write or flush failed (this sled instance takes no more writes).
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// Whether the failure rules out reopening in place: anything but a full disk refusing a
    /// write (see `after_failure`).
    pub fn fatal(&self) -> bool {
        self.shared.fatal.load(Ordering::SeqCst)
    }

    /// Flushes `db` and syncs its log now, outside the group commit: for rare, blocking
    /// writers (key operations) that must be durable before they answer.
    pub fn sync(&self, db: &sled::Db) -> sled::Result<()> {
        flush_and_sync(db, &self.log, &self.shared)
    }

    /// Marks this sled instance failed (a sled call outside the flusher hit an I/O error).
    /// Errors from [`GroupCommit::sync`] come back here too: they were judged where they
    /// happened, and a fatal verdict is never undone.
    pub fn fail(&self, error: &sled::Error) {
        self.shared.sled_failed(&self.log, error);
    }

    /// Notifies while holding the lock the flusher checks under, so no wake-up is lost.
    fn wake_flusher(&self) {
        let _guard = self
            .shared
            .wake_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.shared.wake.notify_one();
    }

    /// Resolves once a flush that started after the ticket was taken has completed.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), FlushFailed> {
        if ticket.generation != self.generation {
            return Err(FlushFailed);
        }
        // Closed (the flusher stopped on a failure, or panicked) before reaching the ticket:
        // never durable.
        self.durable
            .clone()
            .wait_for(|durable| *durable >= ticket.seq)
            .await
            .map(|_| ())
            .map_err(|_| FlushFailed)
    }

    /// Stops the flusher after one last flush; idempotent.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake_flusher();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Under load, the flusher waits this long before starting a flush so that it covers more
/// writes: fewer, larger flushes cost less CPU per write. Measured on 2 cores at 64
/// connections: 300 µs gave tokenize +15-18% req/s over none; with the log `fdatasync`ed
/// after each flush, 1 ms beat 300 µs (tokenize 14.4k -> 15.7k, detokenize-card 13.8k ->
/// 15.0k, p99 10.9 -> 8.8 ms) and 2 ms (13.4k, 13.2k). Only when the previous flush covered
/// at least [`LINGER_MIN_BATCH`] writes, so a lone write at idle is never delayed.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
const LINGER_MIN_BATCH: u64 = 4;

fn flush_loop(
    shared: &Shared,
    db: &sled::Db,
    meta: &sled::Tree,
    log: &std::fs::File,
    durable: &watch::Sender<u64>,
) {
    let _gone = FlusherGone(shared);
    let mut covered = 0u64;
    let mut last_batch = 0u64;
    loop {
        {
            let mut guard = shared.wake_lock.lock().unwrap_or_else(|p| p.into_inner());
            shared.sleeping.store(true, Ordering::SeqCst);
            while shared.issued.load(Ordering::SeqCst) == covered
                && !shared.stop.load(Ordering::SeqCst)
            {
                guard = shared.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            shared.sleeping.store(false, Ordering::SeqCst);
        }
        if last_batch >= LINGER_MIN_BATCH && !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(LINGER);
        }
        let target = shared.issued.load(Ordering::SeqCst);
        let commit = shared.durable_commit.load(Ordering::SeqCst) + 1;
        let started = std::time::Instant::now();
        // Each step marks the instance failed as it fails, and judges its own error.
        let result = meta
            .insert(COMMIT_KEY, &commit.to_be_bytes())
            .inspect_err(|e| shared.sled_failed(log, e))
            .and_then(|_| flush_and_sync(db, log, shared));
        // A write that failed elsewhere (`GroupCommit::fail`) ends acknowledgements too.
        if result.is_err() || shared.failed.load(Ordering::SeqCst) {
            if let Err(e) = &result {
                tracing::error!(error = %e, "store flush failed; writes get 503 from now on");
            }
            return;
        }
        // The commit number first: a writer told its write is durable may read it at once.
        shared.durable_commit.store(commit, Ordering::SeqCst);
        durable.send_replace(target);
        crate::metrics::store_flush(started.elapsed(), target - covered);
        last_batch = target - covered;
        covered = target;
        if shared.stop.load(Ordering::SeqCst) && shared.issued.load(Ordering::SeqCst) == covered {
            return;
        }
    }
}

/// Marks the instance failed, and not to be reopened in place, if the flusher thread panics:
/// its writers get `FlushFailed` as the channel closes, and without this the store would look
/// writable (to `/v1/health` too) while no write could ever be acknowledged.
struct FlusherGone<'a>(&'a Shared);

impl Drop for FlusherGone<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the store's flush thread stopped: writes get 503; restart the daemon");
            self.0.fatal.store(true, Ordering::SeqCst);
            self.0.failed.store(true, Ordering::SeqCst);
        }
    }
}

/// sled's `flush()` (a `pwrite` and a `sync_file_range` of its log), then [`sync_log`]: what
/// makes a write durable, for the flusher and key operations alike. Marks the instance failed
/// on any error. A failed `flush()` is fatal unless the log's write-back is then found clean
/// ([`Shared::sled_failed`]): its error may be the kernel's report of pages it could not
/// write, and a full disk reported there is no proof that the disk holds what was written.
fn flush_and_sync(db: &sled::Db, log: &std::fs::File, shared: &Shared) -> sled::Result<()> {
    db.flush().inspect_err(|e| shared.sled_failed(log, e))?;
    sync_log(log, shared)
}

/// `fdatasync`s sled's log. A failure here is never a reason to reopen in place, whatever
/// its kind: the kernel may already have dropped the pages it could not write. The flusher
/// and key operations sync the same file, and the kernel reports a write-back error to one
/// `fdatasync` only: syncs take turns, a failure marks the instance failed before the next
/// one starts, and no sync succeeds after a failure.
fn sync_log(log: &std::fs::File, shared: &Shared) -> sled::Result<()> {
    let _turn = shared.sync_turn.lock().unwrap_or_else(|p| p.into_inner());
    if shared.failed.load(Ordering::SeqCst) {
        // Reported as the earlier failure's kind, so that passing it to `GroupCommit::fail`
        // does not turn a full disk (recovered in place) into a fatal failure. `fail` sets
        // `fatal` before `failed`, so it is settled here.
        let kind = if shared.fatal.load(Ordering::SeqCst) {
            std::io::ErrorKind::Other
        } else {
            std::io::ErrorKind::StorageFull
        };
        return Err(sled::Error::Io(std::io::Error::new(
            kind,
            "the store failed earlier; nothing is synced any more",
        )));
    }
    log.sync_data().map_err(|e| {
        let e = sled::Error::from(e);
        shared.fail(Step::WriteBack, &e);
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `test` on a current-thread runtime, inside a `LocalSet`.
    fn block_on(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(tokio::task::LocalSet::new().run_until(test));
    }

    /// A temporary sled store, its `meta` tree, and its folder.
    fn temp_db(label: &str) -> (sled::Db, sled::Tree, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("cardvault-{label}-{}", std::process::id()));
        let db = sled::Config::new()
            .path(&dir)
            .temporary(true)
            .open()
            .unwrap();
        let meta = db.open_tree("meta").unwrap();
        (db, meta, dir)
    }

    #[test]
    fn many_concurrent_writers_all_become_durable() {
        block_on(concurrent_writers());
    }

    async fn concurrent_writers() {
        let (db, meta, dir) = temp_db("gc");
        let log = || std::fs::File::open(dir.join("db")).unwrap();
        let gc = Arc::new(GroupCommit::start(db.clone(), meta.clone(), log(), 1, 0).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let gc = Arc::clone(&gc);
            let db = db.clone();
            tasks.push(tokio::task::spawn_local(async move {
                db.insert(i.to_be_bytes(), &b"v"[..]).unwrap();
                gc.durable(gc.ticket()).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        // Every flush wrote its commit number first: the store holds the last durable one.
        let stored = meta.get(COMMIT_KEY).unwrap().unwrap();
        assert_eq!(
            u64::from_be_bytes(stored.as_ref().try_into().unwrap()),
            gc.durable_commit()
        );
        assert!(gc.durable_commit() >= 1);
        // A ticket from another opening of the store is never durable here.
        let other = GroupCommit::start(db.clone(), meta, log(), 2, 0).unwrap();
        assert_eq!(gc.durable(other.ticket()).await, Err(FlushFailed));
        other.shutdown();
        gc.shutdown();
    }

    /// After a failure, nothing written to this instance is ever acknowledged again, though
    /// sled itself would flush it without complaint.
    #[test]
    fn no_write_is_acknowledged_after_a_failure() {
        block_on(async {
            let (db, meta, dir) = temp_db("gcf");
            let log = std::fs::File::open(dir.join("db")).unwrap();
            let gc = GroupCommit::start(db.clone(), meta, log, 1, 0).unwrap();
            db.insert(b"before", &b"v"[..]).unwrap();
            assert_eq!(gc.durable(gc.ticket()).await, Ok(()));
            // A write elsewhere hit an I/O error.
            gc.fail(&sled::Error::Io(std::io::Error::other("injected")));
            db.insert(b"after", &b"v"[..]).unwrap();
            let late = gc.ticket();
            assert_eq!(gc.durable(late).await, Err(FlushFailed));
            assert!(gc.failed() && gc.fatal());
            gc.shutdown();
        });
    }

    /// A flusher that panics leaves the instance failed and fatal; one that returns does not.
    #[test]
    fn a_panicking_flusher_fails_the_instance() {
        let shared = Arc::new(Shared::new(0));
        let run = |panic: bool| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                let _gone = FlusherGone(&shared);
                assert!(!panic, "injected");
            })
            .join()
        };
        assert!(run(false).is_ok());
        assert!(!shared.failed.load(Ordering::SeqCst));
        assert!(run(true).is_err());
        assert!(shared.failed.load(Ordering::SeqCst) && shared.fatal.load(Ordering::SeqCst));
    }

    fn full() -> sled::Error {
        sled::Error::Io(std::io::Error::from(std::io::ErrorKind::StorageFull))
    }

    /// Only a full disk refusing a write is reopened in place; a failed write-back is fatal
    /// whatever its kind, a full disk included.
    #[test]
    fn only_a_full_disk_refusing_a_write_is_reopened_in_place() {
        let io = |kind: std::io::ErrorKind| sled::Error::Io(std::io::Error::from(kind));
        let cases = [
            (Step::Write, full(), Recovery::Reopen),
            (
                Step::Write,
                io(std::io::ErrorKind::Other),
                Recovery::Restart,
            ),
            (
                Step::Write,
                io(std::io::ErrorKind::PermissionDenied),
                Recovery::Restart,
            ),
            (
                Step::Write,
                sled::Error::Unsupported("x".into()),
                Recovery::Restart,
            ),
            (Step::WriteBack, full(), Recovery::Restart),
            (
                Step::WriteBack,
                io(std::io::ErrorKind::Other),
                Recovery::Restart,
            ),
        ];
        for (step, error, want) in &cases {
            assert_eq!(after_failure(*step, error), *want, "{step:?}: {error}");
        }
    }

    /// A full disk reported by sled (from an insert or from its flush, which cannot be told
    /// apart) is fatal when the log's write-back has failed: the kernel may have dropped pages
    /// that sled's `sync_file_range` could not write.
    #[test]
    fn a_full_disk_with_a_failed_write_back_is_fatal() {
        let (db, meta, _) = temp_db("gcwb");
        // fdatasync on a pipe fails (EINVAL), standing in for a write-back error.
        let (reader, _writer) = std::io::pipe().unwrap();
        let log = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
        let gc = GroupCommit::start(db, meta, log, 1, 0).unwrap();
        gc.fail(&full());
        assert!(gc.failed() && gc.fatal());
        gc.shutdown();
    }

    /// A full disk whose log then syncs cleanly was a refused write: the store may be reopened
    /// in place. A write-back failure reported later still makes it fatal, for good.
    #[test]
    fn a_full_disk_with_a_clean_write_back_may_be_reopened() {
        let (db, meta, dir) = temp_db("gcfull");
        let log = std::fs::File::open(dir.join("db")).unwrap();
        let gc = GroupCommit::start(db.clone(), meta, log, 1, 0).unwrap();
        db.insert(b"k", &b"v"[..]).unwrap();
        gc.fail(&full());
        assert!(gc.failed() && !gc.fatal());
        gc.shared.fail(Step::WriteBack, &full());
        assert!(gc.fatal());
        gc.shared.fail(Step::Write, &full());
        gc.fail(&full());
        assert!(gc.fatal());
        gc.shutdown();
    }

    /// A log that cannot be synced fails its writers, the instance, and the key operations'
    /// own syncs.
    #[test]
    fn a_failed_sync_is_fatal_and_fails_its_writers() {
        block_on(async {
            let (db, meta, _) = temp_db("gcs");
            // fdatasync on a pipe fails (EINVAL).
            let (reader, _writer) = std::io::pipe().unwrap();
            let log = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
            let gc = GroupCommit::start(db.clone(), meta, log, 1, 0).unwrap();
            db.insert(b"k", &b"v"[..]).unwrap();
            assert_eq!(gc.durable(gc.ticket()).await, Err(FlushFailed));
            assert!(gc.failed() && gc.fatal());
            assert!(gc.sync(&db).is_err());
            gc.shutdown();
        });
    }
}
