//! Online backup of a store, and its offline restore.
//!
//! A backup holds the store as its raw bytes: sealed records, wrapped keys, the wrapped root
//! key with its check value and recovery copy, the DEK states and encryption reservations.
//! Never a key or a card in the clear.
//!
//! - **Consistent while serving.** [`Vault::backup`] runs beside requests. Rotation,
//!   destruction, rekey and seal moves wait for it (it holds the key lock). It reads every
//!   record space first and the wrapped keys after them, so every key a record in the file
//!   needs is in the file (a key is only ever added while the lock is held by no one else,
//!   never removed). Reservations come last, so they cover every seal in the file. A record
//!   acknowledged before the backup began is in it, as is the last state of a card token
//!   used before it began (a use is never undone).
//! - **Framed, digested, MACed.** `cardvault-backup-v1\n`, then frames (a tag byte and
//!   length-prefixed fields): a header, the seal rows, one frame per entry, the DEK state, the
//!   reservations, an end frame with the frame count; then a SHA-256 of everything before it
//!   (a damaged file is found with no key) and an HMAC-SHA-256 under a random key that the
//!   root key wraps in the header (a file changed by anyone without the KEK, or under
//!   another KEK, is found once the KEK opens the root key).
//! - **Restore** ([`restore`]) checks the digest, then the MAC, before it writes anything;
//!   writes every entry; and writes the root key, its check value and recovery copy last, in
//!   one transaction, and only if the MAC still matches: until then no daemon starts on the
//!   store.

use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use ring::{digest, hmac};
use serde::{Deserialize, Serialize};

use super::keys::{decode_recovery, root_aad};
use super::{rfc3339, unix_now, Vault, VaultError};
use crate::crypto::seal::KekBackend;
use crate::crypto::{Kek, KeyMaterial};
use crate::store::{Kind, Store};

pub const MAGIC: &[u8] = b"cardvault-backup-v1\n";
const FORMAT: &str = "cardvault-backup-v1";
const TAG_HEADER: u8 = 1;
const TAG_SEAL: u8 = 2;
const TAG_ENTRY: u8 = 3;
const TAG_DEK_STATE: u8 = 4;
const TAG_RESERVATION: u8 = 5;
const TAG_END: u8 = 0xff;
/// No field of a well-formed backup comes near this: a damaged length is refused, not
/// allocated.
const MAX_FIELD: usize = 16 << 20;
/// The writer hands bytes on this many at a time.
pub const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackupError(pub String);

impl From<io::Error> for BackupError {
    fn from(e: io::Error) -> Self {
        BackupError(format!("reading the backup: {e}"))
    }
}

/// What the first frame says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub backup_id: String,
    pub created_at: String,
    /// The engine backed up (`sled`).
    pub engine: String,
    /// The store's durable commit number when the backup began (sled).
    pub commit: Option<u64>,
    /// The KEK the root key is wrapped by.
    pub kek_id: String,
    /// The MAC key, wrapped by the root key (hex).
    pub mac_key: String,
}

/// The rows that say how the root key is sealed.
#[derive(Debug, Clone)]
pub struct SealRows {
    pub kek_id: String,
    pub check: Vec<u8>,
    pub root: Vec<u8>,
    pub recovery: Option<Vec<u8>>,
}

/// What a backup held, per space.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub cards: u64,
    pub customers: u64,
    pub tokens: u64,
    pub idempotency: u64,
    pub keys: u64,
    pub reservations: u64,
}

impl Counts {
    fn add(&mut self, kind: Kind) {
        let n = match kind {
            Kind::Cards => &mut self.cards,
            Kind::Customers => &mut self.customers,
            Kind::Tokens => &mut self.tokens,
            Kind::Idempotency => &mut self.idempotency,
            Kind::Keys => &mut self.keys,
        };
        *n += 1;
    }
}

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Keys => 1,
        Kind::Cards => 2,
        Kind::Customers => 3,
        Kind::Tokens => 4,
        Kind::Idempotency => 5,
    }
}

fn kind_of(code: u8) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| kind_code(*k) == code)
}

fn mac_aad(backup_id: &str) -> Vec<u8> {
    crate::crypto::aad(&[b"cardvault/backup-mac/v1", backup_id.as_bytes()])
}

/// Frames written through a running digest and MAC.
struct Framed<W: Write> {
    out: W,
    digest: digest::Context,
    mac: hmac::Context,
    frames: u64,
}

impl<W: Write> Framed<W> {
    fn new(out: W, mac_key: &hmac::Key) -> io::Result<Framed<W>> {
        let mut framed = Framed {
            out,
            digest: digest::Context::new(&digest::SHA256),
            mac: hmac::Context::with_key(mac_key),
            frames: 0,
        };
        framed.put(MAGIC)?;
        Ok(framed)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.digest.update(bytes);
        self.mac.update(bytes);
        self.out.write_all(bytes)
    }

    fn frame(&mut self, tag: u8, fields: &[&[u8]]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(1 + fields.iter().map(|f| 4 + f.len()).sum::<usize>());
        buf.push(tag);
        for field in fields {
            let len = u32::try_from(field.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(field);
        }
        self.frames += 1;
        self.put(&buf)
    }

    fn finish(mut self) -> io::Result<()> {
        let frames = self.frames;
        self.frame(TAG_END, &[&frames.to_be_bytes()])?;
        let digest = self.digest.finish();
        let mac = self.mac.sign();
        self.out.write_all(digest.as_ref())?;
        self.out.write_all(mac.as_ref())?;
        self.out.flush()
    }
}

/// One frame as read.
enum Frame {
    Header(Vec<u8>),
    Seal(SealRows),
    Entry(Kind, String, String, Vec<u8>),
    DekState(Vec<u8>),
    Reservation(String, u32, u64),
    End(u64),
}

/// Frames read through a running digest (and MAC, once its key is known).
struct Frames<R: Read> {
    input: BufReader<R>,
    digest: digest::Context,
    mac: Option<hmac::Context>,
    frames: u64,
}

fn damaged(why: &str) -> BackupError {
    BackupError(format!(
        "the backup is damaged or not a cardvault backup: {why}"
    ))
}

impl<R: Read> Frames<R> {
    fn new(input: R, mac_key: Option<&hmac::Key>) -> Result<Frames<R>, BackupError> {
        let mut frames = Frames {
            input: BufReader::with_capacity(CHUNK, input),
            digest: digest::Context::new(&digest::SHA256),
            mac: mac_key.map(hmac::Context::with_key),
            frames: 0,
        };
        let magic = frames.take(MAGIC.len())?;
        if magic != MAGIC {
            return Err(damaged("no cardvault-backup-v1 header"));
        }
        Ok(frames)
    }

    fn take(&mut self, n: usize) -> Result<Vec<u8>, BackupError> {
        let mut buf = vec![0u8; n];
        self.input
            .read_exact(&mut buf)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => damaged("it ends early"),
                _ => BackupError::from(e),
            })?;
        self.digest.update(&buf);
        if let Some(mac) = &mut self.mac {
            mac.update(&buf);
        }
        Ok(buf)
    }

    fn field(&mut self) -> Result<Vec<u8>, BackupError> {
        let len = self.take(4)?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| damaged("a field length"))?);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_FIELD {
            return Err(damaged("a field is too long"));
        }
        self.take(len)
    }

    fn text(&mut self) -> Result<String, BackupError> {
        String::from_utf8(self.field()?).map_err(|_| damaged("a name is not UTF-8"))
    }

    fn next(&mut self) -> Result<Frame, BackupError> {
        let tag = self.take(1)?.first().copied().unwrap_or_default();
        let number = |bytes: Vec<u8>| -> Result<u64, BackupError> {
            let bytes: [u8; 8] = bytes.try_into().map_err(|_| damaged("a number"))?;
            Ok(u64::from_be_bytes(bytes))
        };
        let frame = match tag {
            TAG_HEADER => Frame::Header(self.field()?),
            TAG_SEAL => {
                let kek_id = self.text()?;
                let check = self.field()?;
                let root = self.field()?;
                let recovery = self.field()?;
                Frame::Seal(SealRows {
                    kek_id,
                    check,
                    root,
                    recovery: (!recovery.is_empty()).then_some(recovery),
                })
            }
            TAG_ENTRY => {
                let code = self.field()?;
                let kind = match code.as_slice() {
                    [code] => kind_of(*code).ok_or_else(|| damaged("an entry kind"))?,
                    _ => return Err(damaged("an entry kind")),
                };
                Frame::Entry(kind, self.text()?, self.text()?, self.field()?)
            }
            TAG_DEK_STATE => Frame::DekState(self.field()?),
            TAG_RESERVATION => {
                let project = self.text()?;
                let version = self.field()?;
                let version = u32::from_be_bytes(
                    version
                        .try_into()
                        .map_err(|_| damaged("a reservation version"))?,
                );
                let reserved = number(self.field()?)?;
                Frame::Reservation(project, version, reserved)
            }
            TAG_END => Frame::End(number(self.field()?)?),
            _ => return Err(damaged("an unknown frame")),
        };
        self.frames += 1;
        Ok(frame)
    }

    /// After the end frame: the trailer matches what was read, and nothing follows it.
    /// `Ok(false)`: the digest matches but the MAC does not.
    fn finish(self, frames: u64) -> Result<bool, BackupError> {
        if frames + 1 != self.frames {
            return Err(damaged("frames are missing"));
        }
        let Frames {
            mut input,
            digest,
            mac,
            ..
        } = self;
        let mut trailer = [0u8; 64];
        input.read_exact(&mut trailer).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => damaged("its digest is missing"),
            _ => BackupError::from(e),
        })?;
        let mut rest = [0u8; 1];
        if input.read(&mut rest)? != 0 {
            return Err(damaged("bytes follow its end"));
        }
        let (want_digest, want_mac) = trailer.split_at(32);
        if digest.finish().as_ref() != want_digest {
            return Err(damaged("its SHA-256 does not match"));
        }
        Ok(match mac {
            Some(mac) => {
                let got = mac.sign();
                got.as_ref().len() == want_mac.len()
                    && got
                        .as_ref()
                        .iter()
                        .zip(want_mac)
                        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                        == 0
            }
            None => true,
        })
    }
}

/// A chunking writer over a callback, for streaming a backup out of a blocking thread.
pub struct Chunks<F: FnMut(Vec<u8>) -> io::Result<()>> {
    buf: Vec<u8>,
    send: F,
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Chunks<F> {
    pub fn new(send: F) -> Chunks<F> {
        Chunks {
            buf: Vec::with_capacity(CHUNK),
            send,
        }
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Write for Chunks<F> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        (self.send)(full)
    }
}

impl Vault {
    /// Whether this store can be backed up by [`Vault::backup`] (sled; a PostgreSQL store is
    /// backed up with the database's own tools).
    pub fn backup_supported(&self) -> Result<(), VaultError> {
        if self.store.is_shared() {
            return Err(VaultError::BackupRefused(
                "the PostgreSQL engine is backed up with the database's own tools \
                 (pg_basebackup, point-in-time recovery)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Writes a backup of the store to `out` while the vault serves (see the module doc).
    pub fn backup(&self, out: impl Write) -> Result<Counts, VaultError> {
        self.backup_supported()?;
        let root = self.keyring.root().ok_or(VaultError::Sealed)?;
        let _admin = self.keyring.admin.lock().unwrap_or_else(|p| p.into_inner());
        let mut id = [0u8; 8];
        crate::crypto::fill_random(&mut id).map_err(VaultError::Keys)?;
        let backup_id = format!("bak_{}", crate::crypto::hex(&id));
        let mac_key = KeyMaterial::random().map_err(VaultError::Keys)?;
        let wrapped_mac = root
            .wrap(&mac_aad(&backup_id), &mac_key)
            .map_err(VaultError::Keys)?;
        let (check, kek_id) = self.store.kek_check()?.ok_or(VaultError::Sealed)?;
        let root_row = self
            .store
            .root_key()?
            .ok_or_else(|| VaultError::Integrity("root key".into()))?;
        let recovery = self.store.recovery_root()?;
        let header = Header {
            format: FORMAT.into(),
            backup_id,
            created_at: rfc3339(unix_now()),
            engine: self.store.engine().into(),
            commit: self.store.durable_commit()?,
            kek_id: kek_id.clone(),
            mac_key: crate::crypto::hex(&wrapped_mac),
        };
        let header =
            serde_json::to_vec(&header).map_err(|_| VaultError::Integrity("header".into()))?;
        let aborted = |e: io::Error| VaultError::BackupRefused(format!("the backup stopped: {e}"));
        let mut out = Framed::new(out, &hmac::Key::new(hmac::HMAC_SHA256, mac_key.expose()))
            .map_err(aborted)?;
        out.frame(TAG_HEADER, &[&header]).map_err(aborted)?;
        out.frame(
            TAG_SEAL,
            &[
                kek_id.as_bytes(),
                &check,
                &root_row,
                recovery.as_deref().unwrap_or_default(),
            ],
        )
        .map_err(aborted)?;
        let mut counts = Counts::default();
        // The wrapped keys after every record: a key is never removed while the lock is held,
        // so each record's key is read after the record.
        let order = [
            Kind::Cards,
            Kind::Customers,
            Kind::Tokens,
            Kind::Idempotency,
            Kind::Keys,
        ];
        for kind in order {
            for item in self.store.raw_entries(kind) {
                let (project, id, bytes) = item?;
                out.frame(
                    TAG_ENTRY,
                    &[
                        &[kind_code(kind)],
                        project.as_bytes(),
                        id.as_bytes(),
                        &bytes,
                    ],
                )
                .map_err(aborted)?;
                counts.add(kind);
            }
        }
        if let Some(state) = self.store.dek_state()? {
            out.frame(TAG_DEK_STATE, &[&state]).map_err(aborted)?;
        }
        // Last: they cover every seal in the records above.
        for (project, version, reserved) in self.store.reservations()? {
            out.frame(
                TAG_RESERVATION,
                &[
                    project.as_bytes(),
                    &version.to_be_bytes(),
                    &reserved.to_be_bytes(),
                ],
            )
            .map_err(aborted)?;
            counts.reservations += 1;
        }
        out.finish().map_err(aborted)?;
        Ok(counts)
    }
}

/// A backup's first two frames: what it is and how its root key is sealed.
pub struct BackupHead {
    pub header: Header,
    pub seal: SealRows,
}

impl BackupHead {
    pub fn read(path: &Path) -> Result<BackupHead, BackupError> {
        let file = std::fs::File::open(path)
            .map_err(|e| BackupError(format!("{}: {e}", path.display())))?;
        let mut frames = Frames::new(file, None)?;
        let Frame::Header(header) = frames.next()? else {
            return Err(damaged("no header"));
        };
        let header: Header = serde_json::from_slice(&header).map_err(|_| damaged("its header"))?;
        if header.format != FORMAT {
            return Err(damaged("an unknown format"));
        }
        let Frame::Seal(seal) = frames.next()? else {
            return Err(damaged("no seal rows"));
        };
        Ok(BackupHead { header, seal })
    }

    /// The KEK ids that open this backup's root key: its KEK's, and the recovery KEK's.
    pub fn kek_ids(&self) -> Result<Vec<String>, BackupError> {
        let mut ids = vec![self.seal.kek_id.clone()];
        if let Some(row) = &self.seal.recovery {
            let (id, _) = decode_recovery(row).map_err(|_| damaged("its recovery copy"))?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// The MAC key, once `kek` opened the root key (its own copy, or the recovery copy).
    fn mac_key(&self, kek: &dyn KekBackend) -> Result<hmac::Key, BackupError> {
        let wrapped = if kek.id() == self.seal.kek_id {
            self.seal.root.clone()
        } else {
            match &self.seal.recovery {
                Some(row) => match decode_recovery(row) {
                    Ok((id, wrapped)) if id == kek.id() => wrapped,
                    _ => return Err(self.foreign(kek.id())),
                },
                None => return Err(self.foreign(kek.id())),
            }
        };
        let root = kek
            .unwrap(&root_aad(kek.id()), &wrapped)
            .map_err(|_| BackupError("the KEK does not open the backup's root key".into()))?;
        let root = Kek::new(&root, "root");
        let wrapped_mac =
            crate::crypto::unhex(&self.header.mac_key).ok_or_else(|| damaged("its MAC key"))?;
        let mac_key = root
            .unwrap(&mac_aad(&self.header.backup_id), &wrapped_mac)
            .map_err(|_| {
                BackupError(
                    "the backup's MAC key does not open under its root key: it was changed".into(),
                )
            })?;
        Ok(hmac::Key::new(hmac::HMAC_SHA256, mac_key.expose()))
    }

    fn foreign(&self, kek: &str) -> BackupError {
        BackupError(format!(
            "the backup is under KEK {} (recovery: {}), not {kek}: it is another vault's, or \
             from before a rekey",
            self.seal.kek_id,
            self.kek_ids()
                .ok()
                .and_then(|ids| ids.get(1).cloned())
                .unwrap_or_else(|| "none".into())
        ))
    }
}

/// Reads the whole backup and checks its digest (no key needed): a damaged file is refused.
pub fn check_digest(path: &Path) -> Result<Counts, BackupError> {
    walk(path, None, |_| Ok(()))
}

/// Reads the whole backup and checks its digest and MAC under the key `kek` opens.
pub fn check_mac(path: &Path, head: &BackupHead, kek: &dyn KekBackend) -> Result<(), BackupError> {
    let key = head.mac_key(kek)?;
    walk(path, Some(&key), |_| Ok(())).map(|_| ())
}

/// Every frame of the backup through `each`, then the trailer checked; counts what it held.
fn walk(
    path: &Path,
    mac_key: Option<&hmac::Key>,
    mut each: impl FnMut(&Frame) -> Result<(), BackupError>,
) -> Result<Counts, BackupError> {
    let file =
        std::fs::File::open(path).map_err(|e| BackupError(format!("{}: {e}", path.display())))?;
    let mut frames = Frames::new(file, mac_key)?;
    let mut counts = Counts::default();
    loop {
        let frame = frames.next()?;
        if let Frame::End(n) = frame {
            return match frames.finish(n)? {
                true => Ok(counts),
                false => Err(BackupError(
                    "the backup's MAC does not match: it was changed by someone without the \
                     KEK"
                    .into(),
                )),
            };
        }
        match &frame {
            Frame::Entry(kind, ..) => counts.add(*kind),
            Frame::Reservation(..) => counts.reservations += 1,
            _ => {}
        }
        each(&frame)?;
    }
}

/// Writes the backup into `store`, which must be empty, checking the digest and MAC again as
/// it goes; the root key, its check value and recovery copy go in last, and only if they
/// still match, so a store cut short, or written from a file changed meanwhile, is one no
/// daemon starts on.
pub fn restore(
    store: &Store,
    path: &Path,
    head: &BackupHead,
    kek: &dyn KekBackend,
) -> Result<Counts, BackupError> {
    let stored = |e: crate::store::StoreError| BackupError(format!("the store: {e}"));
    if store.kek_check().map_err(stored)?.is_some() {
        return Err(BackupError(
            "the store is not empty: restore into an empty store only".into(),
        ));
    }
    let key = head.mac_key(kek)?;
    let counts = walk(path, Some(&key), |frame| {
        match frame {
            Frame::Entry(kind, project, id, bytes) => {
                store.put_raw(*kind, project, id, bytes).map_err(stored)?
            }
            Frame::DekState(state) => {
                let current = store.dek_state().map_err(stored)?;
                store
                    .swap_dek_state(current.as_deref(), state)
                    .map_err(stored)?;
            }
            Frame::Reservation(project, version, reserved) => {
                store
                    .ledger()
                    .reserve(project, *version, *reserved)
                    .map_err(stored)?;
            }
            _ => {}
        }
        Ok(())
    })?;
    store.flush().map_err(stored)?;
    let seal = &head.seal;
    let written = store
        .rewrap(
            &[],
            (None, &seal.root),
            &seal.check,
            &seal.kek_id,
            Some((None, seal.recovery.as_deref())),
        )
        .map_err(stored)?;
    if !written {
        return Err(BackupError(
            "the store changed during the restore: is a daemon running on it?".into(),
        ));
    }
    Ok(counts)
}
