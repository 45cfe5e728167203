//! The seal: the one joint between the vault and whatever holds its key-encryption key.
//!
//! The vault asks a KEK for two things only, to wrap the root key and to unwrap it
//! ([`KekBackend`]). Two backends answer:
//!
//! - **shamir** (the default): the KEK is rebuilt in memory from k custodians' shares
//!   ([`super::custody`]) and wraps in software ([`super::Kek`]); the vault starts sealed and
//!   waits for them.
//! - **pkcs11**: the KEK is an AES-256 key made inside a PKCS#11 device and never leaves it
//!   ([`super::pkcs11`]); the vault unseals itself through the device at start. The
//!   custodians' shares then rebuild a **recovery** KEK that wraps a second copy of the root
//!   key: the break-glass path when the device is lost.
//!
//! Both give `nonce || ciphertext || tag` of AES-256-GCM with the caller's associated data, so
//! a wrapped root key has one format whichever backend made it.

use std::path::PathBuf;

use super::{CryptoError, Kek, KeyMaterial};

/// A key-encryption key, wherever it lives.
pub trait KekBackend: Send + Sync {
    /// The KEK's public id (`kek_` and 16 hex digits): names it in the store and in shares.
    fn id(&self) -> &str;
    /// Seals `key` under the KEK, bound to `aad`.
    fn wrap(&self, aad: &[u8], key: &KeyMaterial) -> Result<Vec<u8>, CryptoError>;
    /// Opens what [`KekBackend::wrap`] sealed with the same `aad`.
    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, CryptoError>;
}

impl KekBackend for Kek {
    fn id(&self) -> &str {
        Kek::id(self)
    }

    fn wrap(&self, aad: &[u8], key: &KeyMaterial) -> Result<Vec<u8>, CryptoError> {
        Kek::wrap(self, aad, key)
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, CryptoError> {
        Kek::unwrap(self, aad, wrapped)
    }
}

/// `[kek]` in the config: which backend holds the KEK.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    /// Custodian shares (`keys_dir/custodians`).
    #[default]
    Shamir,
    /// A PKCS#11 device, with the custodians' shares for recovery.
    Pkcs11(Pkcs11Settings),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Shamir => "shamir",
            Backend::Pkcs11(_) => "pkcs11",
        }
    }
}

/// `[kek.pkcs11]`: where the device's KEK is and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The vendor's PKCS#11 library.
    pub module: PathBuf,
    /// The token (the HSM partition) holding the KEK, by label.
    pub token_label: String,
    /// The KEK, by label.
    pub key_label: String,
    /// The user PIN, in a file only the daemon's user may read (0600).
    pub pin_file: PathBuf,
}
