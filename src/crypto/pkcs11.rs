//! The pkcs11 KEK backend: the KEK is an AES-256 key made inside a PKCS#11 device (an HSM;
//! SoftHSM2 in the tests) and used there, by label, to wrap and unwrap the root key with
//! AES-256-GCM (`CKM_AES_GCM`, a fresh 96-bit IV from the host's CSPRNG, the caller's
//! associated data, a 128-bit tag). Its bytes never reach this process.
//!
//! - **Made here, refused otherwise.** [`Hsm::generate`] makes the key sensitive, never
//!   extractable, a token object, able to encrypt and decrypt and nothing else (no wrap,
//!   unwrap, derive, sign, verify), unmodifiable, with its cardvault KEK id in `CKA_ID`.
//!   [`Hsm::open_key`] reads the attributes back and refuses a key whose value could leave the
//!   device, that was ever extractable or not sensitive (so it may exist elsewhere), or that
//!   could do more than encrypt and decrypt.
//! - **Sessions** are pooled: an operation takes an idle session or opens one, and puts it back.
//!   PKCS#11 keeps one login per process and token while a session is open, so the pool always
//!   keeps the session that logged in. A `Session` is used by one thread at a time.
//! - **Faults** are named ([`Fault`]), so the daemon can say which of them keeps it sealed. A
//!   wrong PIN is never tried twice: devices lock the user PIN after a few failures, so the
//!   caller passes the PIN's digest back and it is not sent again until the PIN file changes.
//! - The module (the vendor's library) is loaded and initialized once per process and path.

use std::path::Path;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde::Serialize;
use zeroize::Zeroizing;

use super::seal::{KekBackend, Pkcs11Settings};
use super::{fill_random, CryptoError, KeyMaterial, KEY_LEN, NONCE_LEN, TAG_LEN};

/// What keeps the device from being used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The module cannot be loaded or initialized (missing, not a PKCS#11 library).
    Module,
    /// No token with the configured label, or more than one.
    Token,
    /// The PIN file cannot be read, or others may read it.
    PinFile,
    /// The device refused the PIN.
    Pin,
    /// The device has locked the user PIN.
    PinLocked,
    /// No key with the configured label on the token.
    KeyMissing,
    /// The key's attributes are refused, or the label names several objects.
    KeyRefused,
    /// Anything else the device answered (unreachable, reset, an operation refused).
    Device,
}

impl Fault {
    pub fn code(self) -> &'static str {
        match self {
            Fault::Module => "module",
            Fault::Token => "token",
            Fault::PinFile => "pin_file",
            Fault::Pin => "pin_incorrect",
            Fault::PinLocked => "pin_locked",
            Fault::KeyMissing => "key_missing",
            Fault::KeyRefused => "key_refused",
            Fault::Device => "device",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("HSM: {message}")]
pub struct HsmError {
    pub fault: Fault,
    pub message: String,
    /// With [`Fault::Pin`]: the digest of the PIN the device refused, to pass back to
    /// [`Hsm::connect`] so that PIN is not sent again.
    pub refused_pin: Option<String>,
}

impl HsmError {
    fn new(fault: Fault, message: String) -> HsmError {
        HsmError {
            fault,
            message,
            refused_pin: None,
        }
    }
}

/// A device answer in a line (the binding's own text for some codes runs to a paragraph).
fn device(doing: &str, e: &P11Error) -> HsmError {
    let fault = match e {
        P11Error::Pkcs11(RvError::PinIncorrect, _) => Fault::Pin,
        P11Error::Pkcs11(RvError::PinLocked, _) => Fault::PinLocked,
        P11Error::LibraryLoading(_) => Fault::Module,
        _ => Fault::Device,
    };
    let said = match e {
        P11Error::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    };
    HsmError::new(fault, format!("{doing}: {said}"))
}

/// Modules loaded by this process: PKCS#11 allows one `C_Initialize` per process.
static MODULES: Mutex<Vec<(std::path::PathBuf, Pkcs11)>> = Mutex::new(Vec::new());

fn module(path: &Path) -> Result<Pkcs11, HsmError> {
    let mut loaded = MODULES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, ctx)) = loaded.iter().find(|(p, _)| p == path) {
        return Ok(ctx.clone());
    }
    if !path.is_file() {
        return Err(HsmError::new(
            Fault::Module,
            format!("module {}: no such file", path.display()),
        ));
    }
    let refused = |e: P11Error| {
        HsmError::new(
            Fault::Module,
            format!(
                "module {}: {}",
                path.display(),
                device("loading", &e).message
            ),
        )
    };
    let ctx = Pkcs11::new(path).map_err(refused)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(refused(e)),
    }
    loaded.push((path.to_owned(), ctx.clone()));
    Ok(ctx)
}

/// Finalizes the module and forgets it, so the next [`module`] initializes it again: some
/// modules (SoftHSM2 among them) list only the tokens present at `C_Initialize`, so a token
/// made or replaced since then is found only this way.
fn reinitialize(path: &Path) {
    let mut loaded = MODULES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(at) = loaded.iter().position(|(p, _)| p == path) {
        let (_, ctx) = loaded.swap_remove(at);
        let _ = ctx.finalize();
    }
}

/// The slots whose token has the label.
fn slots_labelled(ctx: &Pkcs11, label: &str) -> Result<Vec<Slot>, HsmError> {
    let mut found = Vec::new();
    for slot in ctx
        .get_slots_with_token()
        .map_err(|e| device("listing the slots", &e))?
    {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| device("reading a token", &e))?;
        if info.label() == label {
            found.push(slot);
        }
    }
    Ok(found)
}

/// The PIN from its file, which only the daemon's user may read.
fn read_pin(path: &Path) -> Result<Zeroizing<String>, HsmError> {
    let refused = |why: String| HsmError::new(Fault::PinFile, why);
    super::custody::check_private(path).map_err(|e| refused(e.to_string()))?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| refused(format!("PIN file {}: {e}", path.display())))?,
    );
    let pin = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    if pin.is_empty() {
        return Err(refused(format!("PIN file {} is empty", path.display())));
    }
    Ok(pin)
}

fn pin_digest(pin: &str) -> String {
    super::sha256_hex(&Zeroizing::new(super::aad(&[
        b"cardvault/hsm-pin/v1",
        pin.as_bytes(),
    ])))
}

/// A logged-in token, with a pool of sessions.
pub struct Hsm {
    ctx: Pkcs11,
    slot: Slot,
    settings: Pkcs11Settings,
    /// Idle sessions; never emptied of the last one, which holds the login.
    idle: Mutex<Vec<Session>>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hsm({})", self.settings.token_label)
    }
}

impl Hsm {
    /// Loads the module, finds the token by label and logs in with the PIN file's PIN,
    /// unless its digest is `refused_pin` (the device refused it before).
    pub fn connect(
        settings: &Pkcs11Settings,
        refused_pin: Option<&str>,
    ) -> Result<Arc<Hsm>, HsmError> {
        let mut ctx = module(&settings.module)?;
        let mut found = slots_labelled(&ctx, &settings.token_label)?;
        if found.is_empty() {
            // The token may have come since the module was initialized: look again afresh.
            reinitialize(&settings.module);
            ctx = module(&settings.module)?;
            found = slots_labelled(&ctx, &settings.token_label)?;
        }
        let slot = match found.as_slice() {
            [slot] => *slot,
            [] => {
                return Err(HsmError::new(
                    Fault::Token,
                    format!(
                        "no token labelled {:?} in {}",
                        settings.token_label,
                        settings.module.display()
                    ),
                ))
            }
            many => {
                return Err(HsmError::new(
                    Fault::Token,
                    format!(
                        "{} tokens are labelled {:?}: give each a label of its own",
                        many.len(),
                        settings.token_label
                    ),
                ))
            }
        };
        let pin = read_pin(&settings.pin_file)?;
        let digest = pin_digest(&pin);
        if refused_pin == Some(digest.as_str()) {
            let mut e = HsmError::new(
                Fault::Pin,
                format!(
                    "the device refused the PIN in {}, and it has not changed since: not tried \
                     again (a device locks its PIN after a few failures)",
                    settings.pin_file.display()
                ),
            );
            e.refused_pin = Some(digest);
            return Err(e);
        }
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| device("opening a session", &e))?;
        match session.login(UserType::User, Some(&AuthPin::from(pin.to_string()))) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                let mut refused = device(
                    &format!("logging in to token {:?}", settings.token_label),
                    &e,
                );
                if refused.fault == Fault::Pin {
                    refused.message = format!(
                        "the device refused the PIN in {}",
                        settings.pin_file.display()
                    );
                    refused.refused_pin = Some(digest);
                }
                return Err(refused);
            }
        }
        Ok(Arc::new(Hsm {
            ctx,
            slot,
            settings: settings.clone(),
            idle: Mutex::new(vec![session]),
        }))
    }

    pub fn settings(&self) -> &Pkcs11Settings {
        &self.settings
    }

    /// Runs `f` on a pooled session.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let session = match taken {
            Some(session) => session,
            None => self
                .ctx
                .open_rw_session(self.slot)
                .map_err(|e| device("opening a session", &e))?,
        };
        let out = f(&session);
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(session);
        out
    }

    /// The KEK's handle, found by its label.
    fn find_key(&self, session: &Session) -> Result<ObjectHandle, HsmError> {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.settings.key_label.as_bytes().to_vec()),
            ])
            .map_err(|e| device("finding the key", &e))?;
        match found.as_slice() {
            [key] => Ok(*key),
            [] => Err(HsmError::new(
                Fault::KeyMissing,
                format!(
                    "no key labelled {:?} on token {:?}",
                    self.settings.key_label, self.settings.token_label
                ),
            )),
            many => Err(HsmError::new(
                Fault::KeyRefused,
                format!(
                    "{} keys are labelled {:?} on token {:?}: which one is the KEK is ambiguous",
                    many.len(),
                    self.settings.key_label,
                    self.settings.token_label
                ),
            )),
        }
    }

    /// Makes a new KEK inside the device (sensitive, never extractable, encrypt and decrypt
    /// only) with `kek_id` in its `CKA_ID`. Refused if the label is taken.
    pub fn generate(self: &Arc<Self>, kek_id: &str) -> Result<HsmKek, HsmError> {
        self.with_session(|session| {
            match self.find_key(session) {
                Err(e) if e.fault == Fault::KeyMissing => {}
                Ok(_) | Err(_) => {
                    return Err(HsmError::new(
                        Fault::KeyRefused,
                        format!(
                            "a key labelled {:?} exists on token {:?} already: refusing to make \
                             another",
                            self.settings.key_label, self.settings.token_label
                        ),
                    ))
                }
            }
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen((KEY_LEN as u64).into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                        Attribute::Modifiable(false),
                        Attribute::Label(self.settings.key_label.as_bytes().to_vec()),
                        Attribute::Id(kek_id.as_bytes().to_vec()),
                    ],
                )
                .map_err(|e| device("generating the KEK", &e))?;
            Ok(())
        })?;
        self.open_key()
    }

    /// The KEK, once its attributes are checked.
    pub fn open_key(self: &Arc<Self>) -> Result<HsmKek, HsmError> {
        let attributes = self.attributes()?;
        if let Some(why) = attributes.refusal() {
            return Err(HsmError::new(
                Fault::KeyRefused,
                format!(
                    "key {:?} on token {:?} is refused: {why}",
                    self.settings.key_label, self.settings.token_label
                ),
            ));
        }
        Ok(HsmKek {
            hsm: Arc::clone(self),
            id: attributes.id.clone(),
            attributes,
        })
    }

    /// The KEK's attributes as the device reports them now.
    pub fn attributes(&self) -> Result<KeyAttributes, HsmError> {
        self.with_session(|session| {
            let key = self.find_key(session)?;
            let read = session
                .get_attributes(
                    key,
                    &[
                        AttributeType::Id,
                        AttributeType::KeyType,
                        AttributeType::ValueLen,
                        AttributeType::Token,
                        AttributeType::Sensitive,
                        AttributeType::AlwaysSensitive,
                        AttributeType::Extractable,
                        AttributeType::NeverExtractable,
                        AttributeType::Encrypt,
                        AttributeType::Decrypt,
                        AttributeType::Wrap,
                        AttributeType::Unwrap,
                        AttributeType::Derive,
                        AttributeType::Sign,
                    ],
                )
                .map_err(|e| device("reading the key's attributes", &e))?;
            let mut a = KeyAttributes::default();
            for attribute in read {
                match attribute {
                    Attribute::Id(id) => a.id = String::from_utf8_lossy(&id).into_owned(),
                    Attribute::KeyType(t) => a.aes = t == KeyType::AES,
                    Attribute::ValueLen(n) => a.bits = u64::from(n).saturating_mul(8),
                    Attribute::Token(v) => a.token = v,
                    Attribute::Sensitive(v) => a.sensitive = v,
                    Attribute::AlwaysSensitive(v) => a.always_sensitive = v,
                    Attribute::Extractable(v) => a.extractable = v,
                    Attribute::NeverExtractable(v) => a.never_extractable = v,
                    Attribute::Encrypt(v) => a.encrypt = v,
                    Attribute::Decrypt(v) => a.decrypt = v,
                    Attribute::Wrap(v) => a.wrap = v,
                    Attribute::Unwrap(v) => a.unwrap = v,
                    Attribute::Derive(v) => a.derive = v,
                    Attribute::Sign(v) => a.sign = v,
                    _ => {}
                }
            }
            Ok(a)
        })
    }
}

/// The attributes of the device's KEK that cardvault checks (never its value, which the
/// device does not give).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyAttributes {
    /// The cardvault KEK id kept in `CKA_ID`.
    pub id: String,
    pub aes: bool,
    pub bits: u64,
    /// A token object (kept by the device), not a session object.
    pub token: bool,
    pub sensitive: bool,
    pub always_sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub encrypt: bool,
    pub decrypt: bool,
    pub wrap: bool,
    pub unwrap: bool,
    pub derive: bool,
    pub sign: bool,
}

impl KeyAttributes {
    /// Why this key must not be the KEK, if it must not.
    pub fn refusal(&self) -> Option<String> {
        if !self.aes || self.bits != 8 * KEY_LEN as u64 {
            return Some("it is not an AES-256 key".into());
        }
        if !self.sensitive || self.extractable {
            return Some(
                "its value may leave the device (CKA_SENSITIVE false or CKA_EXTRACTABLE true)"
                    .into(),
            );
        }
        if !self.always_sensitive || !self.never_extractable {
            return Some(
                "it was once readable or extractable (CKA_ALWAYS_SENSITIVE or \
                 CKA_NEVER_EXTRACTABLE false), so a copy may exist outside the device"
                    .into(),
            );
        }
        if !self.encrypt || !self.decrypt {
            return Some("it cannot encrypt and decrypt".into());
        }
        if self.wrap || self.unwrap || self.derive || self.sign {
            return Some(
                "it may also wrap, unwrap, derive or sign: the KEK encrypts and decrypts only"
                    .into(),
            );
        }
        if !self.token {
            return Some("it is a session object, gone when the session closes".into());
        }
        if !self.id.starts_with("kek_") {
            return Some(
                "its CKA_ID holds no cardvault KEK id: it was not made by cardvault".into(),
            );
        }
        None
    }
}

/// The device's KEK: wraps and unwraps inside the device.
pub struct HsmKek {
    hsm: Arc<Hsm>,
    id: String,
    pub attributes: KeyAttributes,
}

impl std::fmt::Debug for HsmKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HsmKek({}, {:?})", self.id, self.hsm)
    }
}

impl HsmKek {
    pub fn hsm(&self) -> &Arc<Hsm> {
        &self.hsm
    }
}

impl KekBackend for HsmKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, aad: &[u8], key: &KeyMaterial) -> Result<Vec<u8>, CryptoError> {
        let mut iv = [0u8; NONCE_LEN];
        fill_random(&mut iv)?;
        let sealed = self.hsm.with_session(|session| {
            let handle = self.hsm.find_key(session)?;
            let mut nonce = iv;
            let params = GcmParams::new(&mut nonce, aad, (8 * TAG_LEN as u64).into())
                .map_err(|e| device("preparing AES-GCM", &e))?;
            session
                .encrypt(&Mechanism::AesGcm(params), handle, key.expose())
                .map_err(|e| device("wrapping in the device", &e))
        })?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, CryptoError> {
        if wrapped.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Truncated);
        }
        let (iv, sealed) = wrapped.split_at(NONCE_LEN);
        let opened = self.hsm.with_session(|session| {
            let handle = self.hsm.find_key(session)?;
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(iv);
            let params = GcmParams::new(&mut nonce, aad, (8 * TAG_LEN as u64).into())
                .map_err(|e| device("preparing AES-GCM", &e))?;
            match session.decrypt(&Mechanism::AesGcm(params), handle, sealed) {
                Ok(plain) => Ok(Some(Zeroizing::new(plain))),
                // A tag that does not verify: not this KEK's, or changed.
                Err(P11Error::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                )) => Ok(None),
                Err(e) => Err(device("unwrapping in the device", &e)),
            }
        })?;
        let opened = opened.ok_or(CryptoError::Authentication)?;
        KeyMaterial::from_slice(&opened)
    }
}
