//! The insecure dev key: a whole KEK in one local file (`keys_dir/INSECURE-dev-kek.key`, 0600).
//!
//! One file holding the whole KEK is what PCI DSS 3.6.1.2 forbids in production: anyone who
//! reads it reads every card. `cardvault dev` and the test suite use it; `serve` refuses it
//! unless the config says `insecure_dev_key = true`, and logs a warning when it is allowed.
//! The file is text: a header naming the format, the KEK id, then 64 hex digits.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use super::{hex, new_kek_id, unhex, CryptoError, Kek, KeyMaterial};

const HEADER: &str = "cardvault INSECURE dev key v1 (never use in production)";
pub const FILE_NAME: &str = "INSECURE-dev-kek.key";

pub struct DevKey;

impl DevKey {
    /// Creates a new random dev KEK at `path`; refuses to overwrite an existing file.
    pub fn create(path: &Path) -> Result<(), CryptoError> {
        let key = KeyMaterial::random()?;
        let key_hex = Zeroizing::new(hex(key.expose()));
        let text = Zeroizing::new(format!("{HEADER}\n{}\n{}\n", new_kek_id()?, *key_hex));
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
    pub fn load(path: &Path) -> Result<Kek, CryptoError> {
        super::custody::check_private(path)?;
        let text =
            Zeroizing::new(fs::read_to_string(path).map_err(|e| {
                CryptoError::KeyFile(format!("cannot read {}: {e}", path.display()))
            })?);
        let malformed = || {
            CryptoError::KeyFile(format!(
                "{} is not a cardvault dev key file",
                path.display()
            ))
        };
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(malformed());
        }
        let id = lines
            .next()
            .filter(|id| id.starts_with("kek_"))
            .ok_or_else(malformed)?;
        let bytes = lines
            .next()
            .and_then(|l| unhex(l.trim()))
            .ok_or_else(malformed)?;
        let key = KeyMaterial::from_slice(&bytes).map_err(|_| malformed())?;
        Ok(Kek::new(&key, id))
    }
}

/// Mode bits of a file, for the checks that refuse secrets readable by group or others.
pub(super) fn mode(path: &Path) -> Result<u32, CryptoError> {
    fs::metadata(path)
        .map(|m| m.permissions().mode())
        .map_err(|e| CryptoError::KeyFile(format!("cannot read {}: {e}", path.display())))
}
