//! The audit file: append-only JSON lines, each carrying an HMAC chained to the line before.
//!
//! - A line is `{"seq":N, ..., "prev":"<mac of line N-1>","mac":"<HMAC-SHA-256>"}` where the MAC
//!   covers the line's text up to `,"mac"` and is keyed by the audit key
//!   (`keys_dir/audit.key`). Changing, deleting, reordering or inserting a line breaks the
//!   chain at that line; `cardvault audit verify` names the first bad one.
//! - Beside the log, `PATH.head` holds the last sequence number and MAC, rewritten in place
//!   every second and at shutdown: a log cut back by whole lines no longer reaches it. It only
//!   ever names a line that is durable: the round captures the last line written, fdatasyncs
//!   the log, then writes that line's seq and MAC into the head and fdatasyncs the head. So a
//!   power loss never leaves a head ahead of the log (a false "lines were removed").
//! - Lines are written by one writer thread, in batches: a request's line is made (numbered,
//!   chained, MACed) at once, and the request then awaits its [`AuditTicket`], which resolves
//!   once the `write` that carried the line returned. So a reply never goes out before its
//!   line is in the kernel (a killed process loses nothing it reported), and concurrent
//!   requests share one `write` instead of taking turns at one each (measured: the syscall
//!   was ~7 of the ~12 µs an audited read paid for its line). Synced to disk every second
//!   and at shutdown.
//! - Rotation by size (`[audit] rotate_mb`): once a second, a log past the size is renamed
//!   `PATH.<seq of its last line, 20 digits>` and a new `PATH` begun; the chain goes on in it
//!   (its first line's `prev` is the part's last MAC). A daemon that starts on an empty live
//!   log continues from the newest part. `audit verify` with no file takes the parts, oldest
//!   first, then the live log. Parts are never deleted: archiving them is the operator's.
//! - Fail closed: a write that fails marks the sink failed, and a failed sink refuses every
//!   event until the path is writable again (checked every second; a rotated or replaced
//!   file is reopened and the chain continues in it).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Actor, AuditError, AuditEvent, AuditSink, AuditTicket, Outcome};
use crate::crypto::{hex, unhex, KeyMaterial};

pub const KEY_FILE: &str = "audit.key";
const KEY_HEADER: &str = "cardvault audit key v1";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const MAC_SUFFIX_LEN: usize = r#","mac":""}"#.len() + 64;

/// The HMAC key that chains the audit log.
pub struct AuditKey(ring::hmac::Key);

impl AuditKey {
    /// Creates `keys_dir/audit.key` (0600) unless it exists.
    pub fn create(path: &Path) -> Result<(), AuditError> {
        let key = KeyMaterial::random().map_err(|e| AuditError(e.to_string()))?;
        let key_hex = Zeroizing::new(hex(key.expose()));
        let text = Zeroizing::new(format!("{KEY_HEADER}\n{}\n", *key_hex));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| AuditError(format!("cannot create {}: {e}", path.display())))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| AuditError(format!("cannot write {}: {e}", path.display())))
    }

    pub fn load(path: &Path) -> Result<AuditKey, AuditError> {
        crate::crypto::custody::check_private(path).map_err(|e| AuditError(e.to_string()))?;
        let text = Zeroizing::new(
            fs::read_to_string(path)
                .map_err(|e| AuditError(format!("cannot read {}: {e}", path.display())))?,
        );
        let mut lines = text.lines();
        let bytes = (lines.next() == Some(KEY_HEADER))
            .then(|| lines.next().and_then(|l| unhex(l.trim())))
            .flatten()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| AuditError(format!("{} is not an audit key file", path.display())))?;
        Ok(AuditKey(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &bytes,
        )))
    }

    fn mac(&self, text: &[u8]) -> String {
        hex(ring::hmac::sign(&self.0, text).as_ref())
    }

    fn verify(&self, text: &[u8], mac: &str) -> bool {
        unhex(mac).is_some_and(|tag| ring::hmac::verify(&self.0, text, &tag).is_ok())
    }
}

/// One line as written (field order is the line's order).
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    seq: u64,
    time: String,
    /// The node that wrote the line (`[node] name`), when several serve one store.
    #[serde(skip_serializing_if = "str::is_empty", default)]
    node: &'a str,
    event: &'a str,
    outcome: String,
    identity: &'a str,
    #[serde(skip_serializing_if = "str::is_empty", default)]
    subject: &'a str,
    #[serde(skip_serializing_if = "str::is_empty", default)]
    fingerprint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty", default)]
    project: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    forward: Option<super::Forwarded>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    bulk: Option<crate::vault::Bulk>,
    prev: String,
}

/// Lines made but not yet written, and the channel that tells their requests the outcome.
/// It holds every line made since the writer last took one, so when it is taken its last
/// line is the chain's `seq` and `prev`.
struct Batch {
    text: Vec<u8>,
    done: tokio::sync::watch::Sender<Option<Result<(), String>>>,
}

struct Chain {
    /// `PATH.head`, kept open: rewritten in place every second.
    head: Option<File>,
    /// (device, inode) of the open file, to notice rotation or replacement.
    identity: (u64, u64),
    /// The last line made: the next one chains from it.
    seq: u64,
    prev: String,
    /// The last line written.
    written_seq: u64,
    written_prev: String,
    failed: Option<String>,
    pending: Option<Batch>,
    /// The writer waits for a batch.
    writer_idle: bool,
    /// The writer thread died: nothing will write again until a restart.
    writer_gone: bool,
    stop: bool,
    /// A sync of the log failed: lines written before it may be lost in a power loss even
    /// though the kernel still shows them (it reports a write-back failure once, and may keep
    /// the pages it could not write). The head then stays at the last line a successful sync
    /// made durable, until a restart.
    head_frozen: bool,
}

struct Inner {
    /// Mirrors `Chain::failed`, so the check before every request takes no lock.
    failed: AtomicBool,
    path: PathBuf,
    head: PathBuf,
    key: AuditKey,
    /// Written in every line: the daemon's node name.
    node: std::sync::OnceLock<String>,
    /// Size past which the log is rotated (0: never).
    rotate_bytes: std::sync::atomic::AtomicU64,
    /// Asks the compressor thread to compress the plain parts (`[audit] compress`).
    compressor: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    chain: Mutex<Chain>,
    /// The writer sleeps on this (with `chain`) while there is nothing to write.
    wake: Condvar,
    /// The open log. The writer holds it while it writes. Lock order: `chain`, then `file`.
    file: Mutex<Option<File>>,
    /// Tests only: the order in which the log was synced and the head written.
    #[cfg(test)]
    trace: Mutex<Vec<Step>>,
    /// Tests only: the next log sync fails as a failed write-back would.
    #[cfg(test)]
    fail_next_sync: AtomicBool,
}

/// One step of a maintenance round, as the tests see it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The log was fdatasync'd while its last line had this seq.
    LogSynced(u64),
    /// The head was written naming this seq, and synced.
    HeadWritten(u64),
}

pub struct FileSink {
    inner: Arc<Inner>,
    writer: Option<JoinHandle<()>>,
}

fn open_append(path: &Path) -> std::io::Result<(File, (u64, u64))> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((file, (meta.dev(), meta.ino())))
}

fn open_head(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .ok()
}

/// The name a size rotation gives the log when its last line is `seq`.
fn part_path(path: &Path, seq: u64) -> PathBuf {
    with_suffix(path, &format!(".{seq:020}"))
}

/// The parts a size rotation left beside `path`, oldest first. A part compressed into
/// `PART.gz` is listed under that name, unless the plain part is still there too (a
/// compression cut short), then under the plain one.
pub fn parts(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut found: Vec<(String, bool, PathBuf)> = fs::read_dir(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let rest = name.strip_prefix(&prefix)?;
        let (seq, gz) = rest
            .strip_suffix(GZ_SUFFIX)
            .map_or((rest, false), |seq| (seq, true));
        (seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit()))
            .then(|| (seq.to_owned(), gz, path.with_file_name(e.file_name())))
    })
    .collect();
    // Zero-padded: the names sort as the sequence numbers do; the plain part first.
    found.sort();
    found.dedup_by(|later, earlier| later.0 == earlier.0);
    found.into_iter().map(|(_, _, path)| path).collect()
}

/// The suffix of a compressed part.
const GZ_SUFFIX: &str = ".gz";

/// deflate level of compressed parts: 1, the fastest (measured on audit lines, see
/// docs/performance.md).
const GZ_LEVEL: u32 = 1;

fn is_gz(path: &Path) -> bool {
    path.as_os_str().to_string_lossy().ends_with(GZ_SUFFIX)
}

/// `path` with `suffix` added to its name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A log file's text: a part named `*.gz` is decompressed (a damaged one is an error).
pub fn read_log(path: &Path) -> std::io::Result<String> {
    if !is_gz(path) {
        return fs::read_to_string(path);
    }
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::io::BufReader::new(File::open(path)?))
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Compresses the plain parts beside `path` into `PART.gz` (0600), oldest first; returns
/// how many. Each is written as `PART.gz.partial`, synced, read back and compared with the
/// part byte for byte, renamed, and only then is the part removed, each step made durable
/// before the next: a crash leaves the plain part, or both (then the next run removes the
/// plain one once the two compare equal). Nothing is removed on doubt.
pub fn compress_parts(path: &Path) -> std::io::Result<usize> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let sync_dir = || File::open(&dir)?.sync_all();
    let mut compressed = 0;
    for part in parts(path) {
        if is_gz(&part) {
            continue;
        }
        let gz = with_suffix(&part, GZ_SUFFIX);
        if !gz.exists() {
            let partial = with_suffix(&gz, ".partial");
            match fs::remove_file(&partial) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)?;
            let mut encoder = flate2::write::GzEncoder::new(
                std::io::BufWriter::with_capacity(1 << 16, out),
                flate2::Compression::new(GZ_LEVEL),
            );
            std::io::copy(&mut File::open(&part)?, &mut encoder)?;
            encoder
                .finish()?
                .into_inner()
                .map_err(std::io::IntoInnerError::into_error)?
                .sync_all()?;
            if !same_bytes(&part, &partial)? {
                fs::remove_file(&partial)?;
                return Err(std::io::Error::other(format!(
                    "{} did not read back as {}",
                    partial.display(),
                    part.display()
                )));
            }
            fs::rename(&partial, &gz)?;
            sync_dir()?;
        } else if !same_bytes(&part, &gz)? {
            return Err(std::io::Error::other(format!(
                "{} and {} differ: both kept",
                part.display(),
                gz.display()
            )));
        }
        fs::remove_file(&part)?;
        sync_dir()?;
        compressed += 1;
    }
    Ok(compressed)
}

/// Whether the plain file `plain` holds exactly what the compressed file `gz` decompresses
/// to.
fn same_bytes(plain: &Path, gz: &Path) -> std::io::Result<bool> {
    /// Up to 64 KiB: as much as the reader gives before its end.
    fn chunk(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(1 << 16);
        r.take(1 << 16).read_to_end(&mut buf)?;
        Ok(buf)
    }
    let mut a = std::io::BufReader::new(File::open(plain)?);
    let mut b = flate2::read::GzDecoder::new(std::io::BufReader::new(File::open(gz)?));
    loop {
        let (x, y) = (chunk(&mut a)?, chunk(&mut b)?);
        if x != y {
            return Ok(false);
        }
        if x.is_empty() {
            return Ok(true);
        }
    }
}

fn head_path(path: &Path) -> PathBuf {
    with_suffix(path, ".head")
}

impl FileSink {
    /// Opens the log for appending and continues its chain from the last line, which must
    /// verify: a damaged tail stops startup rather than be built upon.
    pub fn open(path: &Path, key: AuditKey) -> Result<FileSink, AuditError> {
        Self::open_after(path, key, None)
    }

    /// Opens the log; an empty one continues the chain after `(seq, mac)` of another file's
    /// last line instead of starting it (a key rotation's new file).
    fn open_after(
        path: &Path,
        key: AuditKey,
        after: Option<(u64, String)>,
    ) -> Result<FileSink, AuditError> {
        let fail = |what: String| AuditError(format!("audit log {}: {what}", path.display()));
        let newest_part = || -> Result<Option<(u64, String)>, AuditError> {
            let Some(part) = parts(path).pop() else {
                return Ok(None);
            };
            let line = part_last_line(&part)
                .map_err(|e| fail(format!("{}: {e}", part.display())))?
                .ok_or_else(|| fail(format!("{} is empty", part.display())))?;
            let (seq, mac, _) = check_line(&key, &line).ok_or_else(|| {
                fail(format!(
                    "the last line of {} does not verify; run `cardvault audit verify`",
                    part.display()
                ))
            })?;
            Ok(Some((seq, mac)))
        };
        let (seq, prev) = match last_line(path).map_err(|e| fail(e.to_string()))? {
            // An empty live log: a key rotation's new file, one begun by a size rotation, or
            // the very first.
            None => match after {
                Some(after) => after,
                None => newest_part()?.unwrap_or((0, GENESIS.to_owned())),
            },
            Some(line) => {
                let checked = check_line(&key, &line).ok_or_else(|| {
                    fail("the last line does not verify; run `cardvault audit verify` and move the file aside".into())
                })?;
                (checked.0, checked.1)
            }
        };
        // Lines cut off the end while the daemon was stopped: the head remembers them.
        if let Some((head_seq, head_mac)) = fs::read_to_string(head_path(path))
            .ok()
            .as_deref()
            .and_then(parse_head)
        {
            if head_seq > seq || (head_seq == seq && head_mac != prev) {
                return Err(fail(format!(
                    "the log ends at seq {seq} but seq {head_seq} was written: lines were removed; \
                     run `cardvault audit verify` and keep the file as evidence"
                )));
            }
        }
        let (file, identity) = open_append(path).map_err(|e| fail(e.to_string()))?;
        let head = open_head(&head_path(path));
        let inner = Arc::new(Inner {
            failed: AtomicBool::new(false),
            path: path.to_owned(),
            head: head_path(path),
            key,
            node: std::sync::OnceLock::new(),
            rotate_bytes: std::sync::atomic::AtomicU64::new(0),
            compressor: Mutex::new(None),
            chain: Mutex::new(Chain {
                head,
                identity,
                seq,
                prev: prev.clone(),
                written_seq: seq,
                written_prev: prev,
                failed: None,
                pending: None,
                writer_idle: false,
                writer_gone: false,
                stop: false,
                head_frozen: false,
            }),
            wake: Condvar::new(),
            file: Mutex::new(Some(file)),
            #[cfg(test)]
            trace: Mutex::new(Vec::new()),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
        });
        let writer_inner = Arc::clone(&inner);
        let writer = std::thread::Builder::new()
            .name("cardvault-audit".into())
            .spawn(move || writer_inner.write_loop())
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        Ok(FileSink {
            inner,
            writer: Some(writer),
        })
    }
}

impl FileSink {
    /// Names the node in every line from now on (set once; later calls are ignored).
    pub fn set_node(&self, name: &str) {
        let _ = self.inner.node.set(name.to_owned());
    }

    /// Rotates the log once it holds `bytes` or more (checked every second; 0: never).
    pub fn set_rotation(&self, bytes: u64) {
        self.inner.rotate_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Compresses parts into `PART.gz` ([`compress_parts`]) on a thread of its own: those
    /// left plain now (a crash, an earlier build), then each one a rotation makes.
    pub fn set_compression(&self) -> Result<(), AuditError> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let path = self.inner.path.clone();
        std::thread::Builder::new()
            .name("cardvault-audit-gz".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    match compress_parts(&path) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(parts = n, "audit parts compressed"),
                        Err(e) => tracing::warn!(path = %path.display(), error = %e, "audit parts not compressed; tried again at the next rotation or start"),
                    }
                }
            })
            .map_err(|e| AuditError(format!("cannot start the audit compressor: {e}")))?;
        let _ = tx.send(());
        *self
            .inner
            .compressor
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
        Ok(())
    }
}

impl Drop for FileSink {
    /// Writes what is pending, then stops the writer.
    fn drop(&mut self) {
        self.inner.lock_chain().stop = true;
        self.inner.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Inner {
    fn lock_chain(&self) -> std::sync::MutexGuard<'_, Chain> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_file(&self) -> std::sync::MutexGuard<'_, Option<File>> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer thread: takes whatever lines are pending and writes them with one `write`.
    fn write_loop(&self) {
        let _gone = WriterGone(self);
        loop {
            let mut chain = self.lock_chain();
            while chain.pending.is_none() && !chain.stop {
                chain.writer_idle = true;
                chain = self.wake.wait(chain).unwrap_or_else(|p| p.into_inner());
            }
            chain.writer_idle = false;
            let Some(batch) = chain.pending.take() else {
                return;
            };
            let last = (chain.seq, chain.prev.clone());
            let backlog = chain.seq.saturating_sub(chain.written_seq);
            let mut file = self.lock_file();
            drop(chain);
            let started = std::time::Instant::now();
            let written = match file.as_mut() {
                // The length is read under the file lock, where only this thread writes and a
                // rotation cannot swap the file.
                Some(file) => file.metadata().and_then(|meta| {
                    file.write_all(&batch.text).inspect_err(|_| {
                        // A full disk can take part of a batch: cut it, so the chain still
                        // ends at the last line written.
                        let _ = file.set_len(meta.len());
                    })
                }),
                None => Err(std::io::Error::other("not open")),
            };
            drop(file);
            crate::metrics::audit_write(started.elapsed(), backlog);
            let mut chain = self.lock_chain();
            match written {
                Ok(()) => {
                    (chain.written_seq, chain.written_prev) = last;
                    batch.done.send_replace(Some(Ok(())));
                }
                Err(err) => {
                    let why = format!("cannot append to {}: {err}", self.path.display());
                    tracing::error!(error = %why, "audit log unwritable: refusing audited requests");
                    chain.failed = Some(why.clone());
                    self.failed.store(true, Ordering::Release);
                    // The chain goes on from the last line in the file; lines made after
                    // this batch chain from it, so they fail with it.
                    chain.seq = chain.written_seq;
                    chain.prev = chain.written_prev.clone();
                    if let Some(later) = chain.pending.take() {
                        later.done.send_replace(Some(Err(why.clone())));
                    }
                    batch.done.send_replace(Some(Err(why)));
                }
            }
        }
    }

    fn line(&self, chain: &Chain, e: &AuditEvent<'_>) -> Result<(String, String), AuditError> {
        let line = Line {
            seq: chain.seq + 1,
            time: crate::vault::rfc3339_millis(),
            node: self.node.get().map_or("", String::as_str),
            event: e.action,
            outcome: e.outcome.to_string(),
            identity: e.actor.identity,
            subject: e.actor.subject,
            fingerprint: e.actor.fingerprint,
            peer: e.actor.address.map(|a| a.to_string()),
            project: e.project,
            object: e.object,
            code: e.code,
            reason: e.reason,
            reference: e.reference,
            forward: e.forward.cloned(),
            bulk: e.bulk.cloned(),
            prev: chain.prev.clone(),
        };
        let mut text = serde_json::to_string(&line).map_err(|e| AuditError(e.to_string()))?;
        // `{...,"prev":"..."}` becomes `{...,"prev":"...","mac":"..."}`.
        text.pop();
        let mac = self.key.mac(text.as_bytes());
        for part in [",\"mac\":\"", &mac, "\"}\n"] {
            text.push_str(part);
        }
        Ok((text, mac))
    }
}

/// Fails the audit trail closed if the writer thread panics: the lines made after it would
/// otherwise wait for good, and so would their requests. Every audited request then gets 503
/// `audit_unavailable` until a restart (the once-a-second check no longer reopens).
struct WriterGone<'a>(&'a Inner);

impl Drop for WriterGone<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let why = "the audit writer thread stopped: restart the daemon".to_owned();
        tracing::error!(error = %why, "audit log unwritable: refusing audited requests");
        let mut chain = self.0.lock_chain();
        chain.writer_gone = true;
        chain.failed = Some(why.clone());
        self.0.failed.store(true, Ordering::Release);
        if let Some(pending) = chain.pending.take() {
            pending.done.send_replace(Some(Err(why)));
        }
    }
}

impl AuditSink for FileSink {
    fn record(&self, e: &AuditEvent<'_>) -> Result<AuditTicket, AuditError> {
        let inner = &*self.inner;
        let mut chain = inner.lock_chain();
        if let Some(why) = &chain.failed {
            return Err(AuditError(why.clone()));
        }
        let (text, mac) = inner.line(&chain, e)?;
        chain.seq += 1;
        chain.prev = mac;
        let batch = chain.pending.get_or_insert_with(|| Batch {
            text: Vec::new(),
            done: tokio::sync::watch::Sender::new(None),
        });
        batch.text.extend_from_slice(text.as_bytes());
        let ticket = AuditTicket::pending(batch.done.subscribe());
        // One wake per batch: the requests that join it while the writer gets up make no
        // futex call of their own.
        if chain.writer_idle {
            chain.writer_idle = false;
            inner.wake.notify_one();
        }
        Ok(ticket)
    }

    fn ready(&self) -> Result<(), AuditError> {
        if !self.inner.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match &self.inner.lock_chain().failed {
            Some(why) => Err(AuditError(why.clone())),
            None => Ok(()),
        }
    }

    fn maintain(&self) {
        self.inner.maintain();
    }

    fn needs_restart(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire) && self.inner.lock_chain().writer_gone
    }
}

impl Inner {
    /// Every second and at shutdown: sync the log, then record its last durable line in the
    /// head; notice a rotated, replaced or repaired file.
    fn maintain(&self) {
        // The head is written and synced with no lock held: audited requests need the chain
        // lock to make their lines, and should not wait for a second fsync each second.
        if let Some((head, seq, mac)) = self.maintain_log() {
            self.write_head(&head, seq, &mac);
        }
    }

    /// Syncs the log and reopens it if it was rotated, replaced or failed. Returns what the
    /// head may now name, and a handle on the head file to write it with.
    fn maintain_log(&self) -> Option<(File, u64, String)> {
        let mut chain = self.lock_chain();
        // What the head may name, captured before the sync: every line up to `written_seq`
        // was in the file when its `write` returned, so the sync below carries it. A batch
        // whose `write` ends after this point is not named even if the sync carries it too
        // (the next round names it): the head never gets ahead of what this sync made durable.
        let (seq, mac) = (chain.written_seq, chain.written_prev.clone());
        // Waits for a write in progress.
        let mut file = self.lock_file();
        let mut head = None;
        if let Some(open) = file.as_ref() {
            if let Err(e) = self.sync_log(open) {
                tracing::error!(path = %self.path.display(), error = %e, "audit log cannot be synced: refusing audited requests; the head stays where it is until a restart");
                chain.failed = Some(format!("cannot sync {}: {e}", self.path.display()));
                chain.head_frozen = true;
                self.failed.store(true, Ordering::Release);
                // Retried next round, by reopening.
                return None;
            }
            // Only after a sync that succeeded. (With no log open nothing was written since
            // the last round's sync; the head waits for the next one.)
            if !chain.head_frozen && seq > 0 {
                head = chain
                    .head
                    .as_ref()
                    .and_then(|h| h.try_clone().ok())
                    .map(|h| (h, seq, mac));
            }
        }
        let meta = fs::metadata(&self.path).ok().filter(|m| m.is_file());
        let current = meta.as_ref().map(|m| (m.dev(), m.ino()));
        let limit = self.rotate_bytes.load(Ordering::Relaxed);
        let full = meta.is_some_and(|m| limit > 0 && m.len() >= limit);
        if !chain.writer_gone && chain.failed.is_none() && current == Some(chain.identity) && full {
            // Just synced, and no write runs while the file lock is held: the part is whole.
            match self.rotate() {
                Ok(part) => {
                    tracing::info!(part = %part.display(), "audit log rotated");
                    if let Some(compressor) = self
                        .compressor
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                    {
                        let _ = compressor.send(());
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "audit log not rotated; retrying");
                    return head;
                }
            }
        } else if chain.writer_gone || (current == Some(chain.identity) && chain.failed.is_none()) {
            return head;
        }
        // Rotated, replaced, removed or failed: reopen; the chain continues in the new file.
        match open_append(&self.path) {
            Ok((new_file, identity)) => {
                if chain.failed.take().is_some() {
                    tracing::warn!(path = %self.path.display(), "audit log writable again");
                }
                self.failed.store(false, Ordering::Release);
                *file = Some(new_file);
                chain.identity = identity;
                chain.head = open_head(&self.head);
            }
            Err(e) => {
                if chain.failed.is_none() {
                    tracing::error!(path = %self.path.display(), error = %e, "audit log unwritable: refusing audited requests");
                }
                *file = None;
                chain.failed = Some(format!("cannot open {}: {e}", self.path.display()));
                self.failed.store(true, Ordering::Release);
            }
        }
        head
    }
}

impl Inner {
    /// Renames the log to its part name (`PATH.<last seq>`), and syncs the folder so the
    /// rename is durable. The caller holds the file lock and opens the new log.
    fn rotate(&self) -> std::io::Result<PathBuf> {
        let seq = last_line(&self.path)?
            .and_then(|line| check_line(&self.key, &line))
            .map(|(seq, _, _)| seq)
            .ok_or_else(|| std::io::Error::other("the last line does not verify"))?;
        let part = part_path(&self.path, seq);
        if part.exists() {
            return Err(std::io::Error::other(format!(
                "{} exists already",
                part.display()
            )));
        }
        fs::rename(&self.path, &part)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(part)
    }

    /// fdatasyncs the open log (the caller holds the file lock, so no write is in progress).
    fn sync_log(&self, file: &File) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        file.sync_data()?;
        #[cfg(test)]
        self.note(Step::LogSynced(self.last_seq_in_file()));
        Ok(())
    }

    /// Records `(seq, mac)` in the head file, in place (same format and length every time),
    /// then fdatasyncs the head. Call it only with a line that a log sync already carried.
    /// Done every second and at shutdown, not per line: one syscall per event under the
    /// chain's lock cost a third of the tokenization throughput. A cut of whole lines older
    /// than the last second is caught. A failed head write leaves an older head, which is
    /// safe: it only names an earlier line.
    fn write_head(&self, file: &File, seq: u64, mac: &str) {
        let head = format!("{seq:020} {mac}\n");
        let written = file
            .write_all_at(head.as_bytes(), 0)
            .and_then(|()| file.sync_data());
        #[cfg(test)]
        if written.is_ok() {
            self.note(Step::HeadWritten(seq));
        }
        if let Err(e) = written {
            tracing::warn!(path = %self.head.display(), error = %e, "audit head cannot be written or synced");
        }
    }

    #[cfg(test)]
    fn note(&self, step: Step) {
        self.trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(step);
    }

    /// The seq of the log's last line as the file holds it now.
    #[cfg(test)]
    fn last_seq_in_file(&self) -> u64 {
        last_line(&self.path)
            .ok()
            .flatten()
            .and_then(|line| check_line(&self.key, &line))
            .map_or(0, |(seq, _, _)| seq)
    }
}

/// [`last_line`] of a part, compressed or not.
fn part_last_line(part: &Path) -> std::io::Result<Option<String>> {
    if !is_gz(part) {
        return last_line(part);
    }
    Ok(last_line_of(read_log(part)?.as_bytes()))
}

/// The last complete line of the log, if any. An incomplete last line is returned as is, so
/// that it fails verification.
fn last_line(path: &Path) -> std::io::Result<Option<String>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(last_line_of(&tail))
}

/// The last complete line of `text` (the end of a log), if it has any; an incomplete last
/// line comes back as a marker that fails verification. Bytes until the line is found: a cut
/// of the file may fall inside a character.
fn last_line_of(text: &[u8]) -> Option<String> {
    if text.is_empty() {
        return None;
    }
    let Some(body) = text.strip_suffix(b"\n") else {
        return Some("\u{0}incomplete".into());
    };
    let line = body.rsplit(|b| *b == b'\n').next().unwrap_or(body);
    Some(String::from_utf8_lossy(line).into_owned())
}

/// Rotates the audit key (the daemon stopped): the log and its head move aside as
/// `PATH.STAMP` and `PATH.STAMP.head`, the key that chained them to `KEY.STAMP` (kept, to
/// verify them), a new key is made, and a new log begins whose first line,
/// `audit.key_rotated` under the new key, continues the old file's chain: its seq follows the
/// old last line's and its `prev` is that line's MAC. Verify the old file with the old key,
/// the new one with `--rotated`. Refused unless the old log verifies to its end.
/// Takes the lock a daemon holds while it writes `log`: an exclusive `flock` on `<log>.lock`
/// beside it. `audit rotate-key` takes the same lock, so the two never work on one log at once,
/// whatever the store engine. The lock goes with the returned file.
pub fn lock(log: &Path) -> Result<File, AuditError> {
    let mut name = log.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    let path = log.with_file_name(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| AuditError(format!("{}: {e}", path.display())))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            AuditError(format!(
                "{} is in use: a daemon is running on this audit log",
                log.display()
            ))
        },
    )?;
    Ok(file)
}

pub fn rotate_key(log: &Path, key_path: &Path, stamp: &str) -> Result<(u64, PathBuf), AuditError> {
    let fail = |what: String| AuditError(format!("{}: {what}", log.display()));
    let old_key = AuditKey::load(key_path)?;
    let (seq, mac) = match verify_files(&[log.to_owned()], &old_key, true)? {
        (_, Verdict::Broken(line, why)) => {
            return Err(fail(format!(
                "line {line}: {why}; the key is not rotated over a broken log"
            )))
        }
        (_, Verdict::Intact(0, _, _)) => (0, GENESIS.to_owned()),
        (_, Verdict::Intact(..)) => {
            let line = last_line(log)
                .map_err(|e| fail(e.to_string()))?
                .ok_or_else(|| fail("no last line".into()))?;
            let (seq, mac, _) =
                check_line(&old_key, &line).ok_or_else(|| fail("the last line moved".into()))?;
            (seq, mac)
        }
    };
    let aside = |p: &Path, suffix: &str| {
        let mut name = p.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{stamp}{suffix}"));
        p.with_file_name(name)
    };
    let moved_log = aside(log, "");
    let moves = [
        (log.to_owned(), moved_log.clone()),
        (head_path(log), aside(log, ".head")),
        (key_path.to_owned(), aside(key_path, "")),
    ];
    // Everything that could refuse, before anything moves: the names aside are free, and the
    // new key and the new log's first line are written under names of their own.
    if let Some((_, taken)) = moves.iter().find(|(_, to)| to.exists()) {
        return Err(fail(format!("{} exists already", taken.display())));
    }
    let new_key = aside(key_path, ".new");
    let new_log = aside(log, ".new");
    let made = (|| {
        AuditKey::create(&new_key)?;
        let sink = FileSink::open_after(&new_log, AuditKey::load(&new_key)?, Some((seq, mac)))?;
        let continues = format!(
            "continues {} after seq {seq}",
            moved_log.file_name().unwrap_or_default().to_string_lossy()
        );
        sink.record(&AuditEvent {
            action: "audit.key_rotated",
            outcome: Outcome::Success,
            actor: Actor::system(),
            project: "",
            object: None,
            code: None,
            reason: Some(&continues),
            reference: None,
            forward: None,
            bulk: None,
        })?
        .wait_blocking()?;
        sink.maintain();
        drop(sink);
        Ok::<(), AuditError>(())
    })();
    if let Err(e) = made {
        for temp in [&new_key, &new_log, &head_path(&new_log)] {
            let _ = fs::remove_file(temp);
        }
        return Err(e);
    }
    // Then the renames: the old files aside, the new ones in their place.
    let installs = [
        (new_key.clone(), key_path.to_owned()),
        (new_log.clone(), log.to_owned()),
        (head_path(&new_log), head_path(log)),
    ];
    for (from, to) in moves.iter().chain(installs.iter()) {
        if from.exists() {
            fs::rename(from, to).map_err(|e| {
                fail(format!(
                    "moving {} to {} failed ({e}); finish the moves by hand: old log, head \
                     and key to *.{stamp}, then *.{stamp}.new to the live names",
                    from.display(),
                    to.display()
                ))
            })?;
        }
    }
    Ok((seq, moved_log))
}

/// `(seq, mac, prev)` of a line whose MAC verifies.
fn check_line(key: &AuditKey, line: &str) -> Option<(u64, String, String)> {
    let cut = line.len().checked_sub(MAC_SUFFIX_LEN)?;
    let (body, suffix) = (line.get(..cut)?, line.get(cut..)?);
    let mac = suffix.strip_prefix(",\"mac\":\"")?.strip_suffix("\"}")?;
    if !key.verify(body.as_bytes(), mac) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(&format!("{body}}}")).ok()?;
    Some((
        value.get("seq")?.as_u64()?,
        mac.to_owned(),
        value.get("prev")?.as_str()?.to_owned(),
    ))
}

/// What `audit verify` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every line verifies and chains; `(lines, first seq, last seq)`.
    Intact(u64, u64, u64),
    /// The first line that does not: `(line number, why)`.
    Broken(u64, String),
}

/// Checks every line's MAC and its link to the line before, and that the log reaches the
/// head file when there is one. The first line must start the chain (seq 1) unless the log
/// is `rotated`, i.e. continues an earlier file.
pub fn verify(log: &str, key: &AuditKey, head: Option<&str>, rotated: bool) -> Verdict {
    let mut prev: Option<(u64, String)> = None;
    let mut first = 0;
    let mut count = 0u64;
    let complete = log.is_empty() || log.ends_with('\n');
    let lines: Vec<&str> = log.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let n = i as u64 + 1;
        if !complete && i + 1 == lines.len() {
            return Verdict::Broken(n, "truncated: the line is incomplete".into());
        }
        let Some((seq, mac, line_prev)) = check_line(key, line) else {
            return Verdict::Broken(
                n,
                "the MAC does not verify (changed or inserted line)".into(),
            );
        };
        match &prev {
            None => {
                first = seq;
                if (seq == 1) != (line_prev == GENESIS) || (seq != 1 && !rotated) {
                    return Verdict::Broken(
                        n,
                        format!("the log starts at seq {seq}, not at the chain's start (lines deleted, or a rotated file: pass --rotated)"),
                    );
                }
            }
            Some((prev_seq, prev_mac)) => {
                if seq != prev_seq + 1 || line_prev != *prev_mac {
                    return Verdict::Broken(
                        n,
                        format!(
                            "does not follow line {} (seq {seq} after {prev_seq}): a line was deleted, reordered or inserted",
                            n - 1
                        ),
                    );
                }
            }
        }
        prev = Some((seq, mac));
        count += 1;
    }
    let last = prev.as_ref().map_or(0, |(s, _)| *s);
    if let Some(why) = head.and_then(|h| cut_before_head(prev.as_ref(), h)) {
        return Verdict::Broken(count + 1, why);
    }
    Verdict::Intact(count, first, last)
}

/// Why a chain whose last line is `last` (`(seq, mac)`, `None` for no line) falls short of
/// the head file's text, if it does: it ends before the line the head names, or at its seq
/// with another MAC.
fn cut_before_head(last: Option<&(u64, String)>, head: &str) -> Option<String> {
    let (head_seq, head_mac) = parse_head(head)?;
    let seq = last.map_or(0, |(s, _)| *s);
    let reaches = seq >= head_seq;
    let matches = seq != head_seq || last.is_some_and(|(_, m)| *m == head_mac);
    (!reaches || !matches)
        .then(|| format!("truncated: the log ends at seq {seq}, but seq {head_seq} was written"))
}

/// `(seq, mac)` from a head file's text.
fn parse_head(text: &str) -> Option<(u64, String)> {
    let (seq, mac) = text.trim().split_once(' ')?;
    Some((seq.parse().ok()?, mac.to_owned()))
}

/// Verifies log files given oldest first (rotated parts, then the live log), each on its own
/// and linked to the one before: a file must continue the previous file's chain exactly. The
/// first file must start the chain unless `rotated` (it continues a part not given). The head
/// file, when there is one, is checked against the last file. An error names the file.
pub fn verify_files(
    paths: &[PathBuf],
    key: &AuditKey,
    rotated: bool,
) -> Result<(PathBuf, Verdict), AuditError> {
    let mut previous: Option<(u64, String)> = None;
    let (mut lines, mut first_seq, mut last_seq) = (0, 0, 0);
    for (i, path) in paths.iter().enumerate() {
        let last = i + 1 == paths.len();
        // The head first: lines written between the two reads only make the log longer.
        let head = last
            .then(|| fs::read_to_string(head_path(path)).ok())
            .flatten();
        let log = read_log(path)
            .map_err(|e| AuditError(format!("cannot read {}: {e}", path.display())))?;
        let continues = rotated || i > 0;
        // A live log begun by a rotation and still empty: the head names the part's last line.
        if last && log.is_empty() && previous.is_some() {
            if let Some(why) = head
                .as_deref()
                .and_then(|h| cut_before_head(previous.as_ref(), h))
            {
                return Ok((path.clone(), Verdict::Broken(1, why)));
            }
            break;
        }
        match verify(&log, key, head.as_deref(), continues) {
            Verdict::Broken(n, why) => return Ok((path.clone(), Verdict::Broken(n, why))),
            Verdict::Intact(n, first, end) => {
                if let (Some((prev_seq, prev_mac)), Some(first_line)) =
                    (&previous, log.lines().next())
                {
                    let starts = check_line(key, first_line).map(|(_, _, p)| p);
                    if first != prev_seq + 1 || starts.as_deref() != Some(prev_mac.as_str()) {
                        return Ok((
                            path.clone(),
                            Verdict::Broken(
                                1,
                                format!("does not continue the previous file (seq {first} after {prev_seq}): a file or lines between them are missing"),
                            ),
                        ));
                    }
                }
                if let Some(last_line) = log.lines().last() {
                    if let Some((seq, mac, _)) = check_line(key, last_line) {
                        previous = Some((seq, mac));
                    }
                }
                if i == 0 {
                    first_seq = first;
                }
                lines += n;
                if n > 0 {
                    last_seq = end;
                }
            }
        }
    }
    let path = paths.last().cloned().unwrap_or_default();
    Ok((path, Verdict::Intact(lines, first_seq, last_seq)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, Outcome};

    fn sink(label: &str) -> (FileSink, PathBuf, AuditKey) {
        let dir =
            std::env::temp_dir().join(format!("cardvault-audit-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        AuditKey::create(&dir.join(KEY_FILE)).unwrap();
        let log = dir.join("audit.log");
        let sink = FileSink::open(&log, AuditKey::load(&dir.join(KEY_FILE)).unwrap()).unwrap();
        (sink, log, AuditKey::load(&dir.join(KEY_FILE)).unwrap())
    }

    /// Records `e` and waits until its line is in the file.
    fn written(sink: &FileSink, e: &AuditEvent) {
        sink.record(e).unwrap().wait_blocking().unwrap();
    }

    fn event(action: &'static str) -> AuditEvent<'static> {
        AuditEvent {
            action,
            outcome: Outcome::Success,
            actor: Actor::system(),
            project: "default",
            object: Some("card_x"),
            code: None,
            reason: None,
            reference: None,
            forward: None,
            bulk: None,
        }
    }

    #[test]
    fn every_kind_of_tampering_is_caught_at_its_line() {
        let (sink, path, key) = sink("tamper");
        for _ in 0..5 {
            written(&sink, &event("card.tokenize"));
        }
        sink.maintain();
        let log = fs::read_to_string(&path).unwrap();
        let head = fs::read_to_string(head_path(&path)).unwrap();
        assert_eq!(
            verify(&log, &key, Some(&head), false),
            Verdict::Intact(5, 1, 5)
        );
        let lines: Vec<&str> = log.lines().collect();
        let join = |ls: &[&str]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
        let broken_at = |text: &str| match verify(text, &key, Some(&head), false) {
            Verdict::Broken(n, _) => n,
            Verdict::Intact(..) => 0,
        };
        // A flipped byte.
        let mut flipped = log.clone().into_bytes();
        flipped[log.find("card_x").unwrap() + lines[0].len() + 1] ^= 1;
        assert_eq!(broken_at(&String::from_utf8(flipped).unwrap()), 2);
        // A deleted line, two swapped lines, a duplicated (inserted) line.
        assert_eq!(
            broken_at(&join(&[lines[0], lines[1], lines[3], lines[4]])),
            3
        );
        assert_eq!(
            broken_at(&join(&[lines[0], lines[2], lines[1], lines[3], lines[4]])),
            2
        );
        assert_eq!(
            broken_at(&join(&[
                lines[0], lines[1], lines[1], lines[2], lines[3], lines[4]
            ])),
            3
        );
        // A cut mid-line, and whole lines cut from the end (caught by the head).
        assert_eq!(broken_at(&log[..log.len() - 10]), 5);
        assert_eq!(broken_at(&join(&lines[..3])), 4);
        // The first line removed: the log no longer starts the chain.
        assert_eq!(broken_at(&join(&lines[1..])), 1);
        // ...which a rotated file may do, when it is declared as one.
        assert!(matches!(
            verify(&join(&lines[1..]), &key, None, true),
            Verdict::Intact(4, 2, 5)
        ));
    }

    /// Eight threads record at once: each ticket resolves only once its own line is in the
    /// file, and the lines, written in shared batches, form one intact chain.
    #[test]
    fn concurrent_lines_share_writes_and_keep_one_chain() {
        let (sink, path, key) = sink("batch");
        let sink = Arc::new(sink);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (sink, path) = (Arc::clone(&sink), path.clone());
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let object = format!("card_{t}_{i}");
                        let e = AuditEvent {
                            object: Some(&object),
                            ..event("card.tokenize")
                        };
                        written(&sink, &e);
                        let log = fs::read_to_string(&path).unwrap();
                        assert!(
                            log.contains(&format!("\"{object}\"")),
                            "{object} not written"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = fs::read_to_string(&path).unwrap();
        assert_eq!(
            verify(&log, &key, None, false),
            Verdict::Intact(400, 1, 400)
        );
    }

    /// A batch that cannot be written fails the tickets waiting on it, and the chain goes on
    /// from the last line in the file once the log is writable again.
    #[test]
    fn a_failed_write_fails_its_tickets_and_the_chain_resumes() {
        let (sink, path, key) = sink("writefail");
        written(&sink, &event("daemon.start"));
        // A read-only handle in place of the log's: the next write fails.
        *sink.inner.lock_file() = Some(File::open(&path).unwrap());
        let ticket = sink.record(&event("card.tokenize")).unwrap();
        assert!(ticket.wait_blocking().is_err());
        assert!(sink.ready().is_err());
        assert!(sink.record(&event("card.tokenize")).is_err());
        // The once-a-second check reopens the log.
        sink.maintain();
        assert!(sink.ready().is_ok());
        written(&sink, &event("card.tokenize"));
        let log = fs::read_to_string(&path).unwrap();
        assert_eq!(verify(&log, &key, None, false), Verdict::Intact(2, 1, 2));
    }

    /// A writer that dies fails the lines waiting for it and every later one, for good: the
    /// once-a-second check does not bring the log back without a writer.
    #[test]
    fn a_dead_writer_fails_the_trail_closed() {
        let (mut sink, _path, _key) = sink("writergone");
        written(&sink, &event("daemon.start"));
        // Stop the real writer, so that a line is left pending with nobody to write it.
        sink.inner.lock_chain().stop = true;
        sink.inner.wake.notify_one();
        sink.writer.take().unwrap().join().unwrap();
        let ticket = sink.record(&event("card.tokenize")).unwrap();
        // A writer thread that panics.
        let inner = Arc::clone(&sink.inner);
        let died = std::thread::spawn(move || {
            let _gone = WriterGone(&inner);
            panic!("writer bug");
        })
        .join();
        assert!(died.is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(ticket.wait_blocking().is_err()));
        let failed = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(failed, Ok(true), "the pending line must fail, not wait");
        assert!(sink.ready().is_err());
        assert!(sink.record(&event("card.tokenize")).is_err());
        sink.maintain();
        assert!(sink.ready().is_err());
        assert!(
            sink.needs_restart(),
            "a dead writer does not come back by itself"
        );
    }

    /// Blocking waits on a runtime worker (refusals are audited from request handlers): many
    /// in one task must not run into tokio's cooperative budget and park for good.
    #[test]
    fn blocking_waits_inside_a_runtime_task_complete() {
        let (sink, _path, _key) = sink("budget");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                for _ in 0..500 {
                    written(&sink, &event("policy.denied"));
                }
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a blocking audit wait hung inside the runtime");
    }

    /// After a power loss only what was fdatasync'd is left, so the head must never name a
    /// line beyond the last log sync made before it was written: else the next start reports
    /// lines removed that simply never reached the disk. Checked on the order of the syncs and
    /// head writes, first in plain rounds, then with writers racing the rounds.
    #[test]
    fn the_head_never_names_a_line_the_log_sync_before_it_did_not_carry() {
        let (sink, path, key) = sink("headorder");
        let sink = Arc::new(sink);
        for _ in 0..3 {
            written(&sink, &event("card.tokenize"));
        }
        sink.maintain();
        // Lines in the kernel but not on disk yet when the next round starts.
        for _ in 0..2 {
            written(&sink, &event("card.tokenize"));
        }
        sink.maintain();
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        written(&sink, &event("card.tokenize"));
                    }
                })
            })
            .collect();
        for _ in 0..20 {
            sink.maintain();
        }
        for w in writers {
            w.join().unwrap();
        }
        sink.maintain();
        let trace = sink.inner.trace.lock().unwrap().clone();
        let mut synced = 0;
        let mut heads = 0;
        for step in &trace {
            match *step {
                Step::LogSynced(seq) => synced = seq,
                Step::HeadWritten(seq) => {
                    assert!(
                        seq <= synced,
                        "the head named seq {seq} when the log was synced up to seq {synced}: {trace:?}"
                    );
                    heads += 1;
                }
            }
        }
        assert!(heads >= 3, "too few head writes to judge: {trace:?}");
        // The last round, with every line written, names the last line.
        assert_eq!(trace.last(), Some(&Step::HeadWritten(405)));
        let head = fs::read_to_string(head_path(&path)).unwrap();
        let log = fs::read_to_string(&path).unwrap();
        assert_eq!(head.len(), 20 + 1 + 64 + 1);
        assert_eq!(
            verify(&log, &key, Some(&head), false),
            Verdict::Intact(405, 1, 405)
        );
    }

    /// After a failed sync, lines written before it may be gone after a power loss though
    /// the file still shows them: the head never names a line past the last good sync again,
    /// even once the log is writable and synced again.
    #[test]
    fn after_a_failed_sync_the_head_stays_at_the_last_good_one() {
        let (sink, path, _key) = sink("headfreeze");
        for _ in 0..3 {
            written(&sink, &event("card.tokenize"));
        }
        sink.maintain();
        let head = || fs::read_to_string(head_path(&path)).unwrap();
        let good = head();
        assert!(good.starts_with(&format!("{:020} ", 3)), "{good}");
        written(&sink, &event("card.tokenize"));
        sink.inner.fail_next_sync.store(true, Ordering::SeqCst);
        sink.maintain();
        assert!(
            sink.ready().is_err(),
            "a failed sync must refuse audited requests"
        );
        // The next rounds reopen the log and sync it fine; lines are written again.
        sink.maintain();
        sink.ready().unwrap();
        written(&sink, &event("card.tokenize"));
        sink.maintain();
        sink.maintain();
        assert_eq!(head(), good);
    }

    #[test]
    fn a_reopened_log_continues_its_chain() {
        let (sink, path, key) = sink("reopen");
        written(&sink, &event("daemon.start"));
        drop(sink);
        let sink = FileSink::open(
            &path,
            AuditKey::load(&path.with_file_name(KEY_FILE)).unwrap(),
        )
        .unwrap();
        written(&sink, &event("daemon.start"));
        let log = fs::read_to_string(&path).unwrap();
        assert_eq!(verify(&log, &key, None, false), Verdict::Intact(2, 1, 2));
        // Whole lines cut while stopped: the head catches it at the next open.
        sink.maintain();
        drop(sink);
        let lines: Vec<&str> = log.lines().collect();
        fs::write(&path, format!("{}\n", lines[0])).unwrap();
        let reopened = FileSink::open(
            &path,
            AuditKey::load(&path.with_file_name(KEY_FILE)).unwrap(),
        );
        assert!(reopened.is_err(), "a log cut while stopped was accepted");
        fs::write(&path, &log).unwrap();
        // A damaged tail stops the next open.
        fs::write(&path, &log[..log.len() - 3]).unwrap();
        assert!(FileSink::open(
            &path,
            AuditKey::load(&path.with_file_name(KEY_FILE)).unwrap()
        )
        .is_err());
    }

    /// Past its size the log is rotated into a part named by its last seq, and the chain goes
    /// on in a new file: the set verifies as one chain, a restart on an empty live log
    /// continues from the newest part, and a part taken away breaks the set where it was.
    #[test]
    fn a_rotated_log_continues_its_chain_across_parts() {
        let (sink, path, key) = sink("rotate");
        sink.set_rotation(1);
        let reopen = || {
            let sink = FileSink::open(
                &path,
                AuditKey::load(&path.with_file_name(KEY_FILE)).unwrap(),
            )
            .unwrap();
            sink.set_rotation(1);
            sink
        };
        for _ in 0..10 {
            written(&sink, &event("card.tokenize"));
        }
        sink.maintain();
        assert_eq!(parts(&path), [part_path(&path, 10)]);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            0,
            "a new live log is begun"
        );
        for _ in 0..5 {
            written(&sink, &event("card.tokenize"));
        }
        sink.maintain();
        // Stopped with an empty live log; the next start continues from the newest part.
        drop(sink);
        let sink = reopen();
        for _ in 0..3 {
            written(&sink, &event("card.tokenize"));
        }
        sink.maintain();
        drop(sink);
        let all = |parts: Vec<PathBuf>| {
            let mut files = parts;
            files.push(path.clone());
            files
        };
        assert_eq!(
            parts(&path),
            [
                part_path(&path, 10),
                part_path(&path, 15),
                part_path(&path, 18)
            ]
        );
        assert_eq!(
            verify_files(&all(parts(&path)), &key, false).unwrap().1,
            Verdict::Intact(18, 1, 18)
        );
        // The head names seq 18, in the last part: the empty live log is not a cut.
        let sink = reopen();
        written(&sink, &event("card.tokenize"));
        drop(sink);
        assert_eq!(
            verify_files(&all(parts(&path)), &key, false).unwrap().1,
            Verdict::Intact(19, 1, 19)
        );
        let mut gap = all(parts(&path));
        gap.remove(1);
        let (file, verdict) = verify_files(&gap, &key, false).unwrap();
        assert_eq!(file, part_path(&path, 18));
        assert!(
            matches!(&verdict, Verdict::Broken(1, why) if why.contains("does not continue")),
            "{verdict:?}"
        );
        // The newest part emptied or removed while stopped: the next start refuses (an empty
        // part has no line to continue from; without it, the head names a later line).
        let sink = reopen();
        sink.maintain();
        drop(sink);
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
        let newest = part_path(&path, 19);
        let text = fs::read_to_string(&newest).unwrap();
        fs::write(&newest, "").unwrap();
        assert!(
            reopen_fails(&path),
            "a part emptied while stopped was accepted"
        );
        fs::remove_file(&newest).unwrap();
        assert!(
            reopen_fails(&path),
            "a part removed while stopped was accepted"
        );
        fs::write(&newest, text).unwrap();
        assert!(!reopen_fails(&path));
    }

    /// Parts compress into `PART.gz` (0600) that read back as they were; `verify_files`
    /// takes them as it takes plain ones, and a start on an empty live log continues from a
    /// compressed part. A compression cut short (a `.partial` left, or the plain part still
    /// beside its `.gz`) is finished by the next run; a plain part that differs from its
    /// `.gz` is kept, both are; a damaged `.gz` fails verification.
    #[test]
    fn compressed_parts_read_back_verify_and_continue_the_chain() {
        use std::os::unix::fs::PermissionsExt;
        let (sink, path, key) = sink("gz");
        sink.set_rotation(1);
        for _ in 0..3 {
            for _ in 0..20 {
                written(&sink, &event("card.tokenize"));
            }
            sink.maintain();
        }
        drop(sink);
        let plain = parts(&path);
        assert_eq!(plain.len(), 3);
        let texts: Vec<String> = plain
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        let partial = with_suffix(&plain[2], ".gz.partial");
        fs::write(&partial, b"cut short").unwrap();
        assert_eq!(compress_parts(&path).unwrap(), 3);
        let gz = parts(&path);
        let named: Vec<PathBuf> = plain.iter().map(|p| with_suffix(p, ".gz")).collect();
        assert_eq!(gz, named);
        for (part, text) in gz.iter().zip(&texts) {
            assert_eq!(read_log(part).unwrap(), *text);
            assert!(fs::metadata(part).unwrap().len() < text.len() as u64 / 2);
            let mode = fs::metadata(part).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!partial.exists() && plain.iter().all(|p| !p.exists()));
        // The plain part back beside its `.gz`: listed, then removed.
        fs::write(&plain[1], &texts[1]).unwrap();
        assert_eq!(parts(&path)[1], plain[1]);
        assert_eq!(compress_parts(&path).unwrap(), 1);
        assert!(!plain[1].exists());
        fs::write(&plain[1], "something else\n").unwrap();
        assert!(compress_parts(&path).is_err());
        assert!(
            plain[1].exists() && gz[1].exists(),
            "a differing copy was removed"
        );
        fs::remove_file(&plain[1]).unwrap();
        let all = || {
            let mut files = parts(&path);
            files.push(path.clone());
            files
        };
        assert_eq!(
            verify_files(&all(), &key, false).unwrap().1,
            Verdict::Intact(60, 1, 60)
        );
        let sink = FileSink::open(
            &path,
            AuditKey::load(&path.with_file_name(KEY_FILE)).unwrap(),
        )
        .unwrap();
        written(&sink, &event("card.tokenize"));
        drop(sink);
        assert_eq!(
            verify_files(&all(), &key, false).unwrap().1,
            Verdict::Intact(61, 1, 61)
        );
        let mut bytes = fs::read(&gz[1]).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        fs::write(&gz[1], bytes).unwrap();
        let refused = verify_files(&all(), &key, false).map(|v| v.1);
        assert!(
            matches!(&refused, Err(e) if e.0.contains(&*gz[1].to_string_lossy())),
            "{refused:?}"
        );
    }

    fn reopen_fails(path: &Path) -> bool {
        FileSink::open(
            path,
            AuditKey::load(&path.with_file_name(KEY_FILE)).unwrap(),
        )
        .is_err()
    }
}
