//! Keeping the store usable through disk trouble, and noticing when it lost data.
//!
//! - **Reopen after a write failure.** Once a sled write or flush fails (a full disk, an I/O
//!   error), that sled instance refuses every later write for good, though it still serves
//!   reads. When the failure is a full disk, the watcher thread waits until the file system
//!   has room again ([`RECOVERY_FREE_BYTES`]), and then reopens the store in place: for the
//!   moment of the reopen every call answers [`StoreError::Unavailable`] (503); writes that
//!   were waiting for a flush of the failed instance get `FlushFailed` (503), never an
//!   acknowledgement. What sled
//!   recovers on reopen is what a restart after a crash would see. Any other I/O error is not
//!   recovered in place, nor is a failed `fdatasync` of sled's log, whatever its error: after
//!   a failed write-back the kernel may serve pages that never reached the disk, so reading
//!   the store again could trust data it does not have. Writes answer 503 until an operator
//!   has checked the disk and restarted the daemon. From the first failure on, the failed
//!   instance takes no write and acknowledges none ([`super::commit`]).
//! - **The commit witness.** Each flush writes the next commit number into the store before it
//!   syncs (see [`super::commit`]); once a second the watcher copies the last durable number to
//!   `data_dir/cardvault.commit` (written to a temporary file, synced, renamed). A store whose
//!   own commit number is lower than the witness has lost writes it acknowledged: sled cuts its
//!   log at the first damaged entry and opens what came before, so damaged files, or an older
//!   copy put in place of the store, would otherwise be served as if whole. [`check`] refuses
//!   that at startup.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::embedded::Shared;
use super::StoreError;

/// The store is reopened after a failure only once its file system has this much room.
pub const RECOVERY_FREE_BYTES: u64 = 8 << 20;
/// The file in `data_dir` that holds the last commit number known to be durable.
pub const WITNESS_FILE: &str = "cardvault.commit";
const TICK: Duration = Duration::from_secs(1);

fn witness_path(dir: &Path) -> PathBuf {
    dir.join(WITNESS_FILE)
}

/// The witnessed commit number; 0 when there is no witness yet (a new store, or one from
/// before the witness existed).
fn read_witness(dir: &Path) -> Result<u64, StoreError> {
    let path = witness_path(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            StoreError::Damaged(format!(
                "{} does not hold a commit number; if the store is known to be whole, remove \
                 it and start again",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::Damaged(format!("{}: {e}", path.display()))),
    }
}

fn write_witness(dir: &Path, commit: u64) -> std::io::Result<()> {
    use std::io::Write;
    let path = witness_path(dir);
    let tmp = path.with_extension("commit.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    writeln!(file, "{commit}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Refuses a store that holds less than was acknowledged from it.
pub fn check(dir: &Path, stored: u64) -> Result<(), StoreError> {
    let witnessed = read_witness(dir)?;
    if stored < witnessed {
        return Err(StoreError::Damaged(format!(
            "the store in {} ends at commit {stored}, but commit {witnessed} was acknowledged \
             from it: its files are damaged or an older copy was put in their place, and it \
             would serve partial data. Restore it from a backup (see README, \"Store \
             integrity and backups\")",
            dir.display()
        )));
    }
    Ok(())
}

/// Bytes the current user can still write on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Wakes the watcher early: a failed write, or the store closing.
#[derive(Default)]
pub struct Signal {
    /// `(woken, closing)`
    state: Mutex<(bool, bool)>,
    wake: Condvar,
}

impl Signal {
    /// Sleeps up to `timeout` or until woken; false once the store is closing.
    fn wait(&self, timeout: Duration) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut state, _) = self
            .wake
            .wait_timeout_while(state, timeout, |(woken, _)| !*woken)
            .unwrap_or_else(|p| p.into_inner());
        state.0 = false;
        !state.1
    }

    pub fn wake(&self, closing: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = true;
        state.1 |= closing;
        self.wake.notify_all();
    }
}

/// Starts the watcher; it ends when the store is closed or dropped. It holds the store only
/// while it works, never while it sleeps.
pub fn spawn_watcher(shared: Weak<Shared>, signal: Arc<Signal>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("cardvault-store".into())
        .spawn(move || {
            while signal.wait(TICK) {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                witness(&shared);
                recover(&shared);
            }
        })
        .map(drop)
}

/// Writes the witness when the durable commit number moved. One writer at a time: the
/// watcher and `close` both call this.
pub(super) fn witness(shared: &Shared) {
    let Ok(generation) = shared.current() else {
        return;
    };
    let mut witnessed = shared.witnessed.lock().unwrap_or_else(|p| p.into_inner());
    let durable = generation.commit.durable_commit();
    if durable <= *witnessed {
        return;
    }
    match write_witness(&shared.dir, durable) {
        Ok(()) => *witnessed = durable,
        // A stale witness only makes the startup check weaker, never wrong.
        Err(e) => tracing::debug!(error = %e, "writing the commit witness failed"),
    }
}

/// Reopens the store if its sled instance failed and the disk has room again.
fn recover(shared: &Arc<Shared>) {
    let (failed, fatal) = match shared.current() {
        Ok(generation) => (generation.failed(), generation.commit.fatal()),
        Err(_) => (true, false),
    };
    if !failed {
        return;
    }
    if fatal {
        tracing::error!(
            "the store hit an I/O error other than a full disk and takes no more writes: \
             check the disk, then restart the daemon"
        );
        return;
    }
    let free = free_bytes(&shared.dir).unwrap_or(0);
    if free < RECOVERY_FREE_BYTES {
        tracing::warn!(
            free_bytes = free,
            "the store cannot take writes; waiting for free space"
        );
        return;
    }
    match shared.reopen() {
        Ok(generation) => tracing::warn!(generation, "store reopened after a write failure"),
        Err(e) => tracing::error!(error = %e, "reopening the store failed; retrying"),
    }
}
