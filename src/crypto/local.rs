//! A KEK held in a local file (`keys_dir/kek.key`, mode 0600).
//!
//! The file is text: a header line naming the format, then 64 hex digits. It must never sit
//! inside the data directory, and the daemon refuses it when group or others may read it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use super::{hex, unhex, CryptoError, KeyEncryptionKey, KeyMaterial, SealingKey};

const HEADER: &str = "cardvault local-kek v1";
pub const FILE_NAME: &str = "kek.key";

pub struct LocalKek {
    key: SealingKey,
}

impl LocalKek {
    /// Creates a new random KEK at `path`; refuses to overwrite an existing file.
    pub fn create(path: &Path) -> Result<(), CryptoError> {
        let key = KeyMaterial::random()?;
        let text = Zeroizing::new(format!("{HEADER}\n{}\n", hex(key.expose())));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| CryptoError::KeyFile(format!("cannot create {}: {e}", path.display())))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| CryptoError::KeyFile(format!("cannot write {}: {e}", path.display())))
    }

    /// Loads the KEK, refusing a file that group or others can read or write.
    pub fn load(path: &Path) -> Result<LocalKek, CryptoError> {
        let meta = fs::metadata(path)
            .map_err(|e| CryptoError::KeyFile(format!("cannot read {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(CryptoError::KeyFile(format!(
                "{} is accessible to group or others (mode {:o}); run chmod 600 on it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text =
            Zeroizing::new(fs::read_to_string(path).map_err(|e| {
                CryptoError::KeyFile(format!("cannot read {}: {e}", path.display()))
            })?);
        let malformed =
            || CryptoError::KeyFile(format!("{} is not a cardvault KEK file", path.display()));
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(malformed());
        }
        let bytes = lines
            .next()
            .and_then(|l| unhex(l.trim()))
            .ok_or_else(malformed)?;
        let key = KeyMaterial::from_slice(&bytes).map_err(|_| malformed())?;
        Ok(LocalKek {
            key: SealingKey::new(&key),
        })
    }
}

impl KeyEncryptionKey for LocalKek {
    fn describe(&self) -> &str {
        "local-file"
    }

    fn wrap(&self, aad: &[u8], key: &KeyMaterial) -> Result<Vec<u8>, CryptoError> {
        self.key.seal(aad, key.expose())
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, CryptoError> {
        KeyMaterial::from_slice(&self.key.open(aad, wrapped)?)
    }
}
