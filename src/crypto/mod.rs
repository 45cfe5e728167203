//! Envelope encryption: data keys (DEKs) seal records, a key-encryption key (KEK) wraps DEKs.
//!
//! Fixed algorithms, no negotiation: AES-256-GCM with a random 96-bit nonce for every seal, and
//! associated data on every seal so a ciphertext only opens in the place it was written for.
//! HMAC-SHA-256 (ring) for card fingerprints. Key bytes live in `KeyMaterial` (wiped on drop,
//! redacted `Debug`) and in cipher objects whose round keys are wiped on drop.
//!
//! The KEK comes from Shamir shares held by custodians ([`custody`]), from a PKCS#11 device
//! ([`pkcs11`]), both behind one seam ([`seal`]), or in `cardvault dev` from a local file named
//! insecure ([`DevKey`]). This module knows nothing of HTTP, sled or card formats.

pub mod custody;
mod local;
pub mod pkcs11;
pub mod seal;

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use local::{DevKey, FILE_NAME as DEV_KEY_FILE};

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the system random number generator failed")]
    Rng,
    #[error("ciphertext failed authentication (wrong key, or tampered or misplaced record)")]
    Authentication,
    #[error("sealed blob is too short")]
    Truncated,
    #[error("key file: {0}")]
    KeyFile(String),
    #[error("{0}")]
    Custody(String),
    #[error(transparent)]
    Hsm(#[from] pkcs11::HsmError),
}

/// 256 bits of key: wiped on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial([u8; KEY_LEN]);

impl KeyMaterial {
    pub fn random() -> Result<KeyMaterial, CryptoError> {
        let mut key = [0u8; KEY_LEN];
        fill_random(&mut key)?;
        Ok(KeyMaterial(key))
    }

    pub fn from_slice(bytes: &[u8]) -> Result<KeyMaterial, CryptoError> {
        let array: [u8; KEY_LEN] = bytes.try_into().map_err(|_| CryptoError::Truncated)?;
        Ok(KeyMaterial(array))
    }

    /// The only way to read the key bytes.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(<redacted>)")
    }
}

/// Random bytes straight from the OS CSPRNG: for keys, salts and anything long-lived.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new().fill(buf).map_err(|_| CryptoError::Rng)
}

/// How many bytes a thread draws from the OS at a time for [`fill_unique`].
const POOL_LEN: usize = 512;

thread_local! {
    static POOL: std::cell::RefCell<RandomPool> = const {
        std::cell::RefCell::new(RandomPool { bytes: [0; POOL_LEN], next: POOL_LEN })
    };
}

/// Random bytes for nonces and ids: from the OS CSPRNG like [`fill_random`], but drawn
/// [`POOL_LEN`] bytes at a time into a per-thread buffer, so a tokenization (an id and two
/// nonces, 72 bytes) makes one `getrandom` call in seven instead of three. Every byte is
/// handed out once and wiped from the buffer as it is taken. The process never forks
/// without exec, so no two processes share a buffer. Requests over a quarter of the buffer go
/// to the OS directly.
pub fn fill_unique(buf: &mut [u8]) -> Result<(), CryptoError> {
    if buf.len() > POOL_LEN / 4 {
        return fill_random(buf);
    }
    // While a thread's locals are being destroyed its pool is gone: go to the OS.
    POOL.try_with(|pool| pool.borrow_mut().take(buf))
        .unwrap_or_else(|_| fill_random(buf))
}

/// No `Zeroize` impl on purpose: wiping the bytes while `next` pointed at them would hand out
/// zeros as nonces. Drop wipes what is left and marks it all used.
struct RandomPool {
    bytes: [u8; POOL_LEN],
    /// The first byte not yet handed out.
    next: usize,
}

impl Drop for RandomPool {
    fn drop(&mut self) {
        self.bytes.zeroize();
        self.next = POOL_LEN;
    }
}

impl RandomPool {
    fn take(&mut self, out: &mut [u8]) -> Result<(), CryptoError> {
        if self.next + out.len() > POOL_LEN {
            // Empty until the refill succeeds, so a failed one hands nothing out.
            self.next = POOL_LEN;
            fill_random(&mut self.bytes)?;
            self.next = 0;
        }
        let end = self.next + out.len();
        let taken = self.bytes.get_mut(self.next..end).ok_or(CryptoError::Rng)?;
        out.copy_from_slice(taken);
        taken.zeroize();
        self.next = end;
        Ok(())
    }
}

/// Encodes associated data unambiguously: each part is length-prefixed, so no two different
/// part lists produce the same bytes.
pub fn aad(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The key-encryption key, assembled in memory only: from custodian shares (production) or
/// from the insecure dev key file. It wraps and unwraps data keys and never hands out its bytes.
pub struct Kek {
    key: SealingKey,
    id: String,
}

impl Kek {
    pub fn new(material: &KeyMaterial, id: &str) -> Kek {
        Kek {
            key: SealingKey::new(material),
            id: id.to_owned(),
        }
    }

    /// The KEK's public id (`kek_` and 16 hex digits): names it in shares, store and inventory.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn wrap(&self, aad: &[u8], key: &KeyMaterial) -> Result<Vec<u8>, CryptoError> {
        self.key.seal(aad, key.expose())
    }

    pub fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, CryptoError> {
        KeyMaterial::from_slice(&self.key.open(aad, wrapped)?)
    }

    /// Seals key material that is not an AES key (an OpenPGP secret key), or a record the
    /// vault keeps beside its keys (an export request).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.key.seal(aad, plain)
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.key.open(aad, sealed)
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({}, <redacted>)", self.id)
    }
}

/// A fresh KEK id.
pub fn new_kek_id() -> Result<String, CryptoError> {
    let mut id = [0u8; 8];
    fill_random(&mut id)?;
    Ok(format!("kek_{}", hex(&id)))
}

/// An AES-256-GCM key with its schedule prepared once.
pub struct SealingKey {
    cipher: Aes256Gcm,
}

impl SealingKey {
    pub fn new(key: &KeyMaterial) -> SealingKey {
        SealingKey {
            cipher: Aes256Gcm::new(key.expose().into()),
        }
    }

    /// Returns `nonce || ciphertext || tag` under a fresh random nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_unique(&mut nonce)?;
        self.seal_with_nonce(nonce, aad, plaintext)
    }

    fn seal_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Authentication)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Opens a blob from [`SealingKey::seal`]; the plaintext comes back in wiping memory.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Truncated);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Authentication)
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

/// HMAC-SHA-256 under a per-project key: the same card gets the same fingerprint within a
/// project and an unrelated one in any other.
pub struct FingerprintKey(ring::hmac::Key);

impl FingerprintKey {
    pub fn new(key: &KeyMaterial) -> FingerprintKey {
        FingerprintKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose()))
    }

    pub fn fingerprint(&self, data: &[u8]) -> String {
        hex(ring::hmac::sign(&self.0, data).as_ref())
    }

    /// `fingerprint(&aad(parts))`, without copying the parts into one buffer: for parts that
    /// hold card data (a request body), which would otherwise be left behind unwiped.
    pub fn fingerprint_parts(&self, parts: &[&[u8]]) -> String {
        let mut context = ring::hmac::Context::with_key(&self.0);
        for part in parts {
            context.update(&(part.len() as u32).to_be_bytes());
            context.update(part);
        }
        hex(context.sign().as_ref())
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey(<redacted>)")
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    let digit = |n: u8| char::from_digit(u32::from(n), 16).unwrap_or('0');
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(digit(b >> 4));
        out.push(digit(b & 0x0f));
    }
    out
}

/// Decodes lowercase or uppercase hex into wiping memory.
pub fn unhex(text: &str) -> Option<Zeroizing<Vec<u8>>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 2));
    for pair in text.as_bytes().chunks_exact(2) {
        let (hi, lo) = (pair.first().copied()?, pair.get(1).copied()?);
        out.push(nibble(hi)? << 4 | nibble(lo)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashing the parts in place gives the digest of their encoding, so idempotency records
    /// written before keep matching.
    #[test]
    fn fingerprint_parts_matches_the_encoded_parts() {
        let key = FingerprintKey::new(&KeyMaterial::from_slice(&[7; 32]).unwrap());
        let body = br#"{"number":"4242424242424242"}"#;
        let parts: [&[u8]; 4] = [b"cardvault/idempotency/v1", b"POST", b"/v1/cards", body];
        assert_eq!(key.fingerprint_parts(&parts), key.fingerprint(&aad(&parts)));
        // Moving a byte across a part boundary changes it.
        let shifted: [&[u8]; 4] = [b"cardvault/idempotency/v1", b"POST/", b"v1/cards", body];
        assert_ne!(
            key.fingerprint_parts(&shifted),
            key.fingerprint_parts(&parts)
        );
    }

    #[test]
    fn pooled_random_bytes_are_handed_out_once_and_wiped() {
        let mut pool = RandomPool {
            bytes: [0; POOL_LEN],
            next: POOL_LEN,
        };
        let mut seen = std::collections::HashSet::new();
        let mut refills = 0;
        for draw in 0..200 {
            let before = pool.next;
            let mut nonce = [0u8; NONCE_LEN];
            pool.take(&mut nonce).unwrap();
            if pool.next < before {
                refills += 1;
            }
            assert!(seen.insert(nonce), "a nonce came out twice at draw {draw}");
            assert!(pool.next >= NONCE_LEN && pool.next <= POOL_LEN);
            assert!(
                pool.bytes[..pool.next].iter().all(|&b| b == 0),
                "bytes handed out were left in the pool"
            );
        }
        // 200 draws of 12 bytes: 42 to a refill of 512, so the first and four more.
        assert_eq!(refills, 5);
    }

    #[test]
    fn large_draws_bypass_the_pool() {
        let left = || POOL.with(|p| POOL_LEN - p.borrow().next);
        let mut small = [0u8; 16];
        fill_unique(&mut small).unwrap();
        let before = left();
        let mut large = [0u8; POOL_LEN / 4 + 1];
        fill_unique(&mut large).unwrap();
        assert_eq!(left(), before);
        assert!(large.iter().any(|&b| b != 0));
    }

    /// NIST GCM test vector (gcmEncryptExtIV256.rsp, Count 0 of the 96-bit IV, 128-bit tag,
    /// 128-bit plaintext, 0-bit AAD group).
    #[test]
    fn aes_256_gcm_known_answer() {
        let key =
            unhex("31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22").unwrap();
        let nonce: [u8; 12] = unhex("0d18e06c7c725ac9e362e1ce")
            .unwrap()
            .as_slice()
            .try_into()
            .unwrap();
        let pt = unhex("2db5168e932556f8089a0622981d017d").unwrap();
        let sk = SealingKey::new(&KeyMaterial::from_slice(&key).unwrap());
        let sealed = sk.seal_with_nonce(nonce, b"", &pt).unwrap();
        assert_eq!(
            hex(sealed.get(NONCE_LEN..).unwrap()),
            "fa4362189661d163fcd6a56d8bf0405ad636ac1bbedd5cc3ee727dc2ab4a9489"
        );
        assert_eq!(sk.open(b"", &sealed).unwrap().as_slice(), pt.as_slice());
    }

    /// RFC 4231 test case 2.
    #[test]
    fn hmac_sha256_known_answer() {
        let mut key = [0u8; KEY_LEN];
        key[..4].copy_from_slice(b"Jefe");
        // RFC 4231 uses a 4-byte key; HMAC pads keys with zeros to the block size, so the
        // zero-padded 32-byte key gives the same MAC.
        let fk = FingerprintKey::new(&KeyMaterial(key));
        assert_eq!(
            fk.fingerprint(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn seal_binds_aad_and_detects_tampering() {
        let sk = SealingKey::new(&KeyMaterial::random().unwrap());
        let a = aad(&[b"card", b"p1", b"id1"]);
        let sealed = sk.seal(&a, b"secret").unwrap();
        assert_eq!(sk.open(&a, &sealed).unwrap().as_slice(), b"secret");
        assert!(sk.open(&aad(&[b"card", b"p1", b"id2"]), &sealed).is_err());
        assert!(sk.open(&aad(&[b"card", b"p1i", b"d1"]), &sealed).is_err());
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(sk.open(&a, &flipped).is_err());
        assert!(sk.open(&a, &sealed[..20]).is_err());
        let other = SealingKey::new(&KeyMaterial::random().unwrap());
        assert!(other.open(&a, &sealed).is_err());
        assert_ne!(sk.seal(&a, b"secret").unwrap(), sealed, "nonces repeat");
    }

    #[test]
    fn debug_is_redacted() {
        let km = KeyMaterial::from_slice(&[0xab; 32]).unwrap();
        assert!(!format!("{km:?}").contains("ab"));
        assert!(!format!("{:?}", SealingKey::new(&km)).contains("ab"));
    }
}
