//! Custody of the KEK under dual control: Shamir k-of-n shares, each sealed under its
//! custodian's passphrase.
//!
//! - `keys init` makes a random KEK, splits it with [`split`] into full-length shares (never
//!   halves of the key) and seals each with [`seal_share`]: Argon2id (64 MiB, t=3, p=4 at
//!   least, random salt, parameters kept beside it and bound into the AAD) derives a key that
//!   seals the share with AES-256-GCM. The KEK itself is never written anywhere.
//! - The public descriptor ([`Custody`], `custodians/kek.json`) names the KEK id, the
//!   threshold and, per custodian, a commitment (a SHA-256) to that custodian's share, so the
//!   daemon refuses a wrong or foreign share when it is submitted, before combining anything.
//! - [`open_share`] runs on the custodian's side (`cardvault unseal`): a wrong passphrase
//!   fails there and nothing is sent.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{aad, fill_random, hex, unhex, CryptoError, KeyMaterial, SealingKey, KEY_LEN};

pub const CUSTODIANS_DIR: &str = "custodians";
/// Where a rekey ceremony writes the next shares until the daemon has switched to them.
pub const NEXT_CUSTODIANS_DIR: &str = "custodians.next";
/// Prefix of a folder of new shares set aside by a rekey rerun (`custodians.abandoned.KEK_ID`):
/// the vault did not use that KEK when the rerun asked, but a rekey still under way could yet
/// commit it, so its shares are kept, and the daemon finds them by KEK id at start.
pub const ABANDONED_CUSTODIANS_PREFIX: &str = "custodians.abandoned.";

/// Every folder of custodian shares in `keys_dir`, in the order the daemon tries them:
/// `custodians`, `custodians.next`, then the abandoned ones.
pub fn custody_dirs(keys_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = [CUSTODIANS_DIR, NEXT_CUSTODIANS_DIR]
        .iter()
        .map(|d| keys_dir.join(d))
        .filter(|d| d.is_dir())
        .collect();
    let mut abandoned: Vec<std::path::PathBuf> = std::fs::read_dir(keys_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(ABANDONED_CUSTODIANS_PREFIX))
        })
        .collect();
    abandoned.sort();
    dirs.extend(abandoned);
    dirs
}
pub const DESCRIPTOR_FILE: &str = "kek.json";
const DESCRIPTOR_FORMAT: &str = "cardvault-custody-v1";
const SHARE_FORMAT: &str = "cardvault-share-v1";
/// A custodian passphrase shorter than this is refused when shares are made.
pub const MIN_PASSPHRASE_LEN: usize = 12;

/// Argon2id cost. The floor is what the key-management issue asks for; files below it are
/// refused, files above it are accepted (parameters are read from the share file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl KdfParams {
    pub const MINIMUM: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 4,
    };

    /// Parameters are read from the share file: the floor keeps them strong, the ceiling
    /// keeps a tampered file from making the CLI exhaust memory or run for hours.
    const MAXIMUM: KdfParams = KdfParams {
        m_kib: 4 * 1024 * 1024,
        t: 64,
        p: 64,
    };

    fn at_least_minimum(&self) -> bool {
        self.m_kib >= Self::MINIMUM.m_kib && self.t >= Self::MINIMUM.t && self.p >= Self::MINIMUM.p
    }

    fn within_maximum(&self) -> bool {
        self.m_kib <= Self::MAXIMUM.m_kib && self.t <= Self::MAXIMUM.t && self.p <= Self::MAXIMUM.p
    }
}

/// The public half of a custody setup: which KEK, how many shares unseal it, and a commitment
/// to each custodian's share. Holds nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Custody {
    pub format: String,
    pub kek_id: String,
    pub threshold: u8,
    pub created_at: String,
    pub custodians: Vec<Custodian>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Custodian {
    pub name: String,
    /// SHA-256 over the KEK id, the custodian's name and the share.
    pub commitment: String,
}

/// One custodian's share of one KEK: wiped on drop, never printed.
pub struct Share {
    pub kek_id: String,
    pub custodian: String,
    bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share({}, {}, <redacted>)", self.kek_id, self.custodian)
    }
}

impl Share {
    pub fn new(kek_id: &str, custodian: &str, bytes: Zeroizing<Vec<u8>>) -> Share {
        Share {
            kek_id: kek_id.to_owned(),
            custodian: custodian.to_owned(),
            bytes,
        }
    }

    /// The share as hex, for the unseal request (in wiping memory).
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex(&self.bytes))
    }

    pub fn from_hex(kek_id: &str, custodian: &str, text: &str) -> Option<Share> {
        let bytes = unhex(text).filter(|b| b.len() == KEY_LEN + 1)?;
        Some(Share::new(kek_id, custodian, bytes))
    }

    fn commitment(&self) -> String {
        let input = Zeroizing::new(aad(&[
            b"cardvault/share-commitment/v1",
            self.kek_id.as_bytes(),
            self.custodian.as_bytes(),
            &self.bytes,
        ]));
        super::sha256_hex(&input)
    }
}

/// A custodian name: what the custodian's client certificate is named in the policy.
pub fn valid_custodian_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

/// Splits `kek` into one share per custodian, any `threshold` of which rebuild it.
pub fn split(
    kek: &KeyMaterial,
    kek_id: &str,
    custodians: &[String],
    threshold: u8,
    created_at: &str,
) -> Result<(Custody, Vec<Share>), CryptoError> {
    let n = custodians.len();
    if threshold < 2 || usize::from(threshold) > n || n > 32 {
        return Err(CryptoError::Custody(format!(
            "need 2 <= threshold <= custodians <= 32 (threshold {threshold}, {n} custodians)"
        )));
    }
    for (i, name) in custodians.iter().enumerate() {
        if !valid_custodian_name(name) {
            return Err(CryptoError::Custody(format!(
                "custodian name {name:?}: use letters, digits, '-', '_' or '.'"
            )));
        }
        if custodians.iter().skip(i + 1).any(|other| other == name) {
            return Err(CryptoError::Custody(format!(
                "custodian {name:?} is named twice: each custodian holds one share"
            )));
        }
    }
    let shares: Vec<Share> = blahaj::Sharks(threshold)
        .dealer(kek.expose())
        .zip(custodians)
        .map(|(share, name)| Share::new(kek_id, name, Zeroizing::new(Vec::from(&share))))
        .collect();
    let custody = Custody {
        format: DESCRIPTOR_FORMAT.into(),
        kek_id: kek_id.to_owned(),
        threshold,
        created_at: created_at.to_owned(),
        custodians: shares
            .iter()
            .map(|s| Custodian {
                name: s.custodian.clone(),
                commitment: s.commitment(),
            })
            .collect(),
    };
    Ok((custody, shares))
}

impl Custody {
    pub fn load(dir: &Path) -> Result<Custody, CryptoError> {
        let path = dir.join(DESCRIPTOR_FILE);
        let text = fs::read_to_string(&path)
            .map_err(|e| CryptoError::KeyFile(format!("cannot read {}: {e}", path.display())))?;
        let custody: Custody = serde_json::from_str(&text).map_err(|e| {
            CryptoError::KeyFile(format!("{} is not a custody file: {e}", path.display()))
        })?;
        custody.validate().map_err(|e| {
            CryptoError::KeyFile(format!(
                "{} is not a valid custody file: {e}",
                path.display()
            ))
        })?;
        Ok(custody)
    }

    /// A descriptor that could have come from [`split`]: k of n with 2 <= k <= n, distinct
    /// valid names, a KEK id.
    pub fn validate(&self) -> Result<(), CryptoError> {
        let n = self.custodians.len();
        let names_ok = self.custodians.iter().enumerate().all(|(i, c)| {
            valid_custodian_name(&c.name)
                && !self.custodians.iter().skip(i + 1).any(|o| o.name == c.name)
        });
        if self.format != DESCRIPTOR_FORMAT
            || self.threshold < 2
            || usize::from(self.threshold) > n
            || !names_ok
            || !self.kek_id.starts_with("kek_")
        {
            return Err(CryptoError::Custody(
                "custody descriptor: need format v1, a KEK id, 2 <= threshold <= custodians, distinct names".into(),
            ));
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Accepts a share only if it is the named custodian's share of this KEK.
    pub fn verify(&self, share: &Share) -> Result<(), CryptoError> {
        let refused = |why: &str| CryptoError::Custody(format!("share refused: {why}"));
        if share.kek_id != self.kek_id {
            return Err(refused(
                "it belongs to another KEK (an old or foreign share)",
            ));
        }
        let custodian = self
            .custodians
            .iter()
            .find(|c| c.name == share.custodian)
            .ok_or_else(|| refused("no such custodian"))?;
        // Commitments are public (they sit in kek.json): a plain comparison leaks nothing.
        if share.commitment() != custodian.commitment {
            return Err(refused("it does not match the custodian's commitment"));
        }
        Ok(())
    }

    /// Rebuilds the KEK from at least `threshold` verified shares of distinct custodians.
    pub fn combine(&self, shares: &[&Share]) -> Result<KeyMaterial, CryptoError> {
        let mut parts = Vec::with_capacity(shares.len());
        for (i, share) in shares.iter().enumerate() {
            self.verify(share)?;
            if shares
                .iter()
                .skip(i + 1)
                .any(|s| s.custodian == share.custodian)
            {
                continue;
            }
            let part = blahaj::Share::try_from(share.bytes.as_slice())
                .map_err(|e| CryptoError::Custody(e.to_owned()))?;
            parts.push(part);
        }
        if parts.len() < usize::from(self.threshold) {
            return Err(CryptoError::Custody(format!(
                "{} of {} shares",
                parts.len(),
                self.threshold
            )));
        }
        let secret = Zeroizing::new(
            blahaj::Sharks(self.threshold)
                .recover(&parts)
                .map_err(|e| CryptoError::Custody(e.to_owned()))?,
        );
        KeyMaterial::from_slice(&secret)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareFile {
    format: String,
    kek_id: String,
    custodian: String,
    threshold: u8,
    kdf: KdfSpec,
    /// nonce || ciphertext || tag, hex.
    sealed: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfSpec {
    algorithm: String,
    m_kib: u32,
    t: u32,
    p: u32,
    salt: String,
}

fn passphrase_key(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<SealingKey, CryptoError> {
    let argon_params = argon2::Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN))
        .map_err(|e| CryptoError::Custody(format!("argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut derived = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase, salt, derived.as_mut())
        .map_err(|e| CryptoError::Custody(format!("argon2: {e}")))?;
    Ok(SealingKey::new(&KeyMaterial::from_slice(derived.as_ref())?))
}

fn share_aad(file_kek_id: &str, custodian: &str, threshold: u8, kdf: &KdfSpec) -> Vec<u8> {
    aad(&[
        SHARE_FORMAT.as_bytes(),
        file_kek_id.as_bytes(),
        custodian.as_bytes(),
        &[threshold],
        kdf.algorithm.as_bytes(),
        &kdf.m_kib.to_be_bytes(),
        &kdf.t.to_be_bytes(),
        &kdf.p.to_be_bytes(),
        kdf.salt.as_bytes(),
    ])
}

/// The share file's text: the share sealed under a key derived from `passphrase`.
pub fn seal_share(
    share: &Share,
    threshold: u8,
    passphrase: &[u8],
    params: KdfParams,
) -> Result<String, CryptoError> {
    if passphrase.len() < MIN_PASSPHRASE_LEN {
        return Err(CryptoError::Custody(format!(
            "the passphrase for {} is shorter than {MIN_PASSPHRASE_LEN} characters",
            share.custodian
        )));
    }
    if !params.at_least_minimum() {
        return Err(CryptoError::Custody(
            "argon2 parameters below m=64 MiB, t=3, p=4".into(),
        ));
    }
    let mut salt = [0u8; 16];
    fill_random(&mut salt)?;
    let kdf = KdfSpec {
        algorithm: "argon2id".into(),
        m_kib: params.m_kib,
        t: params.t,
        p: params.p,
        salt: hex(&salt),
    };
    let key = passphrase_key(passphrase, &salt, params)?;
    let sealed = key.seal(
        &share_aad(&share.kek_id, &share.custodian, threshold, &kdf),
        &share.bytes,
    )?;
    let file = ShareFile {
        format: SHARE_FORMAT.into(),
        kek_id: share.kek_id.clone(),
        custodian: share.custodian.clone(),
        threshold,
        kdf,
        sealed: hex(&sealed),
    };
    serde_json::to_string_pretty(&file)
        .map_err(|e| CryptoError::Custody(format!("encoding the share file: {e}")))
}

/// Opens a share file's text with its custodian's passphrase. A wrong passphrase, or any
/// change to the file, fails authentication.
pub fn open_share(text: &str, passphrase: &[u8]) -> Result<Share, CryptoError> {
    let file: ShareFile = serde_json::from_str(text)
        .map_err(|_| CryptoError::Custody("not a cardvault share file".into()))?;
    let params = KdfParams {
        m_kib: file.kdf.m_kib,
        t: file.kdf.t,
        p: file.kdf.p,
    };
    if file.format != SHARE_FORMAT || file.kdf.algorithm != "argon2id" {
        return Err(CryptoError::Custody("not a cardvault share file".into()));
    }
    if !params.at_least_minimum() || !params.within_maximum() {
        return Err(CryptoError::Custody(
            "share file's argon2 parameters are outside the accepted range".into(),
        ));
    }
    let salt = unhex(&file.kdf.salt).ok_or(CryptoError::Truncated)?;
    let sealed = unhex(&file.sealed).ok_or(CryptoError::Truncated)?;
    let key = passphrase_key(passphrase, &salt, params)?;
    let bytes = key
        .open(
            &share_aad(&file.kek_id, &file.custodian, file.threshold, &file.kdf),
            &sealed,
        )
        .map_err(|_| {
            CryptoError::Custody(format!(
                "wrong passphrase for {}'s share, or the share file was changed",
                file.custodian
            ))
        })?;
    if bytes.len() != KEY_LEN + 1 {
        return Err(CryptoError::Truncated);
    }
    Ok(Share::new(&file.kek_id, &file.custodian, bytes))
}

/// The share file of `custodian` in a custody folder.
pub fn share_path(dir: &Path, custodian: &str) -> PathBuf {
    dir.join(format!("{custodian}.share"))
}

/// Refuses a secret-holding file that group or others may read or write.
pub fn check_private(path: &Path) -> Result<(), CryptoError> {
    let mode = super::local::mode(path)?;
    if mode & 0o077 != 0 {
        return Err(CryptoError::KeyFile(format!(
            "{} is accessible to group or others (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn any_threshold_of_distinct_custodians_rebuild_the_kek() {
        let kek = KeyMaterial::random().unwrap();
        let (custody, shares) =
            split(&kek, "kek_1", &names(&["alice", "bob", "carol"]), 2, "now").unwrap();
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            let rebuilt = custody.combine(&[&shares[a], &shares[b]]).unwrap();
            assert_eq!(rebuilt.expose(), kek.expose());
        }
        // One share, or one custodian twice, is not enough.
        assert!(custody.combine(&[&shares[0]]).is_err());
        let twice = Share::new("kek_1", "alice", shares[0].bytes.clone());
        assert!(custody.combine(&[&shares[0], &twice]).is_err());
        // Shares are full length, and no share is the key or a piece of it.
        for s in &shares {
            assert_eq!(s.bytes.len(), KEY_LEN + 1);
            assert_ne!(s.bytes.get(1..).unwrap(), kek.expose().as_slice());
        }
    }

    #[test]
    fn foreign_or_altered_shares_are_refused_before_combining() {
        let kek = KeyMaterial::random().unwrap();
        let (custody, shares) = split(&kek, "kek_1", &names(&["alice", "bob"]), 2, "now").unwrap();
        let (_, other) = split(&kek, "kek_2", &names(&["alice", "bob"]), 2, "now").unwrap();
        assert!(custody.verify(&other[0]).is_err(), "another KEK's share");
        let mut flipped = shares[0].bytes.clone();
        flipped[5] ^= 1;
        assert!(custody
            .verify(&Share::new("kek_1", "alice", flipped))
            .is_err());
        // Alice's share presented as Bob's.
        let swapped = Share::new("kek_1", "bob", shares[0].bytes.clone());
        assert!(custody.verify(&swapped).is_err());
        assert!(custody.verify(&shares[1]).is_ok());
    }

    #[test]
    fn split_refuses_weak_setups() {
        let kek = KeyMaterial::random().unwrap();
        assert!(split(&kek, "k", &names(&["a", "b"]), 1, "").is_err());
        assert!(split(&kek, "k", &names(&["a", "b"]), 3, "").is_err());
        assert!(split(&kek, "k", &names(&["a", "a"]), 2, "").is_err());
        assert!(split(&kek, "k", &names(&["a", "../b"]), 2, "").is_err());
    }

    #[test]
    fn share_files_open_only_with_their_passphrase() {
        let kek = KeyMaterial::random().unwrap();
        let (_, shares) = split(&kek, "kek_1", &names(&["alice", "bob"]), 2, "now").unwrap();
        assert!(seal_share(&shares[0], 2, b"short", KdfParams::MINIMUM).is_err());
        let text = seal_share(&shares[0], 2, b"correct horse battery", KdfParams::MINIMUM).unwrap();
        assert!(!text.contains(&hex(&shares[0].bytes)));
        let opened = open_share(&text, b"correct horse battery").unwrap();
        assert_eq!(opened.bytes, shares[0].bytes);
        assert_eq!(opened.custodian, "alice");
        assert!(open_share(&text, b"correct horse batterY").is_err());
        // Weakening the stored parameters breaks the seal instead of weakening the KDF.
        let weakened = text.replace("\"t\": 3", "\"t\": 4");
        assert_ne!(weakened, text);
        assert!(open_share(&weakened, b"correct horse battery").is_err());
        let renamed = text.replace("\"custodian\": \"alice\"", "\"custodian\": \"bob\"");
        assert!(open_share(&renamed, b"correct horse battery").is_err());
    }
}
