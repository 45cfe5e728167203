//! OpenPGP for card portability, through rPGP (pure Rust: RustCrypto's RSA, Curve25519 and
//! AES; no C library): the vault's import keys, reading a file encrypted to one of them, and
//! encrypting an export to a recipient's key.
//!
//! Files are read in rPGP's streaming mode, so memory stays bounded whatever their size. In
//! that mode the integrity check of a SEIPDv1 packet (what GnuPG writes) is known only at the
//! end of the stream, so the importer reads every file twice: once to the end to check it,
//! once to import what was checked (see `api::portability`).

use std::fmt;
use std::io::{BufRead, Read, Write};

use pgp::composed::{
    DecryptionOptions, Deserializable, EncryptionCaps, KeyType, Message, MessageBuilder,
    SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey, SubkeyParamsBuilder, TheRing,
};
use pgp::crypto::ecc_curve::ECCCurve;
use pgp::crypto::hash::HashAlgorithm;
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::ser::Serialize;
use pgp::types::{CompressionAlgorithm, KeyDetails, Password, Seipdv1ReadMode};
use rand_core::OsRng;

/// The algorithm of a new import key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSA-4096 primary and encryption subkey: what every PSP's tooling reads.
    Rsa4096,
    /// Ed25519 primary, X25519 (ECDH, v4) encryption subkey: GnuPG 2.2 and later.
    Curve25519,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "rsa4096" => Some(Algorithm::Rsa4096),
            "curve25519" => Some(Algorithm::Curve25519),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rsa4096 => "rsa4096",
            Algorithm::Curve25519 => "curve25519",
        }
    }
}

/// Why an OpenPGP operation failed. Never carries plaintext: rPGP's own messages are not
/// passed on, since a parse error may quote the bytes it choked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PgpError {
    #[error("the file is not an OpenPGP message")]
    NotOpenPgp,
    #[error("the file is not encrypted")]
    NotEncrypted,
    #[error("the file is not encrypted to any of the vault's import keys")]
    WrongKey,
    #[error("the file is damaged, truncated or was altered (integrity check failed)")]
    Damaged,
    #[error("the file is not signed by the expected signer")]
    BadSignature,
    #[error("the key is malformed, or has no usable encryption key")]
    BadKey,
    #[error("key generation failed")]
    KeyGeneration,
    #[error("writing the encrypted file failed")]
    Write,
}

impl PgpError {
    pub fn code(self) -> &'static str {
        match self {
            PgpError::NotOpenPgp => "not_openpgp",
            PgpError::NotEncrypted => "not_encrypted",
            PgpError::WrongKey => "wrong_key",
            PgpError::Damaged => "file_damaged",
            PgpError::BadSignature => "bad_signature",
            PgpError::BadKey => "invalid_key",
            PgpError::KeyGeneration => "key_generation_failed",
            PgpError::Write => "write_failed",
        }
    }
}

/// A vault import key: an OpenPGP secret key. Its secret parts are wiped on drop by rPGP.
pub struct ImportKey(SignedSecretKey);

impl fmt::Debug for ImportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImportKey({}, <redacted>)", self.fingerprint())
    }
}

impl ImportKey {
    /// A new key pair, with `user_id` (`cardvault import key <…>`) on it.
    pub fn generate(algorithm: Algorithm, user_id: &str) -> Result<ImportKey, PgpError> {
        let (primary, encryption) = match algorithm {
            Algorithm::Rsa4096 => (KeyType::Rsa(4096), KeyType::Rsa(4096)),
            Algorithm::Curve25519 => (
                KeyType::Ed25519Legacy,
                KeyType::ECDH(ECCCurve::Curve25519Legacy),
            ),
        };
        let subkey = SubkeyParamsBuilder::default()
            .key_type(encryption)
            .can_sign(false)
            .can_encrypt(EncryptionCaps::All)
            .can_authenticate(false)
            .build()
            .map_err(|_| PgpError::KeyGeneration)?;
        // Preferences a sender's OpenPGP tool reads to choose its algorithms: without them
        // GnuPG falls back to 3DES and SHA-1.
        let params = SecretKeyParamsBuilder::default()
            .preferred_symmetric_algorithms(
                [
                    SymmetricKeyAlgorithm::AES256,
                    SymmetricKeyAlgorithm::AES192,
                    SymmetricKeyAlgorithm::AES128,
                ]
                .into_iter()
                .collect(),
            )
            .preferred_hash_algorithms(
                [
                    HashAlgorithm::Sha512,
                    HashAlgorithm::Sha384,
                    HashAlgorithm::Sha256,
                ]
                .into_iter()
                .collect(),
            )
            .preferred_compression_algorithms(
                [CompressionAlgorithm::ZLIB, CompressionAlgorithm::ZIP]
                    .into_iter()
                    .collect(),
            )
            .key_type(primary)
            .can_certify(true)
            .can_sign(false)
            .can_encrypt(EncryptionCaps::None)
            .primary_user_id(user_id.into())
            .subkeys(vec![subkey])
            .build()
            .map_err(|_| PgpError::KeyGeneration)?;
        let key = params
            .generate(OsRng)
            .map_err(|_| PgpError::KeyGeneration)?;
        Ok(ImportKey(key))
    }

    /// The key as stored (binary transferable secret key), in memory that is wiped.
    pub fn to_bytes(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, PgpError> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(8192));
        self.0
            .to_writer(&mut *out)
            .map_err(|_| PgpError::KeyGeneration)?;
        Ok(out)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ImportKey, PgpError> {
        SignedSecretKey::from_bytes(bytes)
            .map(ImportKey)
            .map_err(|_| PgpError::BadKey)
    }

    /// The primary key's fingerprint, upper-case hex as GnuPG prints it.
    pub fn fingerprint(&self) -> String {
        format!("{:X}", self.0.fingerprint())
    }

    pub fn created_at(&self) -> i64 {
        i64::from(self.0.created_at().as_secs())
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.0.primary_key.public_key().algorithm() {
            pgp::crypto::public_key::PublicKeyAlgorithm::RSA => Algorithm::Rsa4096,
            _ => Algorithm::Curve25519,
        }
    }

    /// The public key, ASCII-armored, to hand to the sender.
    pub fn public_armored(&self) -> Result<String, PgpError> {
        SignedPublicKey::from(self.0.clone())
            .to_armored_string(Default::default())
            .map_err(|_| PgpError::BadKey)
    }
}

/// A public key from a file (armored or binary), its self-signatures checked.
pub fn public_key(bytes: &[u8]) -> Result<SignedPublicKey, PgpError> {
    let (key, _) = SignedPublicKey::from_reader_single(bytes).map_err(|_| PgpError::BadKey)?;
    key.verify_bindings().map_err(|_| PgpError::BadKey)?;
    Ok(key)
}

pub fn fingerprint_of(key: &SignedPublicKey) -> String {
    format!("{:X}", key.fingerprint())
}

/// Opens an encrypted message for reading with any of `keys`: decrypted, decompressed, read
/// as a stream. A read error before the end means the file is damaged; reaching the end
/// without one means its integrity check passed.
pub fn open<'a, R>(source: R, keys: &[ImportKey]) -> Result<(Message<'a>, String), PgpError>
where
    R: BufRead + fmt::Debug + Send + 'a,
{
    let (message, _) = Message::from_reader(source).map_err(|_| PgpError::NotOpenPgp)?;
    if !message.is_encrypted() {
        return Err(PgpError::NotEncrypted);
    }
    let empty = Password::empty();
    let ring = TheRing {
        secret_keys: keys.iter().map(|k| &k.0).collect(),
        key_passwords: keys.iter().map(|_| &empty).collect(),
        decrypt_options: DecryptionOptions::new().set_seipdv1_read_mode(Seipdv1ReadMode::Streaming),
        ..Default::default()
    };
    let (mut message, found) = message.decrypt_the_ring(ring, true).map_err(|e| match e {
        pgp::errors::Error::MissingKey => PgpError::WrongKey,
        _ => PgpError::Damaged,
    })?;
    let used = found
        .secret_keys
        .iter()
        .zip(keys)
        .find(|(r, _)| **r == pgp::composed::InnerRingResult::Ok)
        .map(|(_, k)| k.fingerprint())
        .unwrap_or_default();
    while message.is_compressed() {
        message = message.decompress().map_err(|_| PgpError::Damaged)?;
    }
    if message.is_encrypted() {
        return Err(PgpError::Damaged);
    }
    Ok((message, used))
}

/// Checks, after the message was read to its end, that it is signed by `signer`.
pub fn verify_signer(message: &Message<'_>, signer: &SignedPublicKey) -> Result<(), PgpError> {
    if !message.is_signed() {
        return Err(PgpError::BadSignature);
    }
    if message.verify(&signer.primary_key).is_ok() {
        return Ok(());
    }
    for sub in &signer.public_subkeys {
        if message.verify(&sub.key).is_ok() {
            return Ok(());
        }
    }
    Err(PgpError::BadSignature)
}

/// The recipient's encryption subkey: one whose algorithm encrypts and whose binding
/// signature allows encryption.
pub fn encryption_key(recipient: &SignedPublicKey) -> Option<&pgp::composed::SignedPublicSubKey> {
    recipient.public_subkeys.iter().find(|sub| {
        sub.key.algorithm().can_encrypt()
            && sub
                .signatures
                .iter()
                .any(|s| s.key_flags().encrypt_comms() || s.key_flags().encrypt_storage())
    })
}

/// Encrypts what `plain` yields to `recipient`'s encryption key (AES-256, with an integrity
/// check), streaming into `out`: nothing of the plaintext is held whole.
pub fn encrypt_to<R: Read, W: Write>(
    recipient: &SignedPublicKey,
    plain: R,
    out: W,
) -> Result<(), PgpError> {
    let key = encryption_key(recipient).ok_or(PgpError::BadKey)?;
    let mut builder = MessageBuilder::from_reader("cards.csv", plain)
        .seipd_v1(OsRng, SymmetricKeyAlgorithm::AES256);
    builder
        .encrypt_to_key(OsRng, &key.key)
        .map_err(|_| PgpError::BadKey)?;
    builder.to_writer(OsRng, out).map_err(|_| PgpError::Write)
}
