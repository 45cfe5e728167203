//! Binary encoding of stored records, with length checks before every slice.
//!
//! A card record is a small plaintext header (timestamps, state, key version) followed by two
//! sealed blobs: the card metadata, and the PAN. Using a card token drops its PAN blob for good;
//! the metadata stays so `GET /v1/cards/{id}` can still answer `used: true`.

/// Format tag: bump when the layout changes, and keep a decoder for every tag in the field.
const CARD_FORMAT_V1: u8 = 1;
const FLAG_USED: u8 = 0b01;
const FLAG_HAS_PAN: u8 = 0b10;

/// How long a used or expired card token's record (its metadata, no PAN) is kept after its
/// use or expiry, so a late use is still told `used` or `expired`; seconds. The PostgreSQL
/// schema's `cards.sweep_at` column repeats this rule.
pub const TOMBSTONE_RETENTION_SECS: i64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stored record is malformed")]
pub struct Malformed;

#[derive(Clone, PartialEq, Eq)]
pub struct CardRecord {
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; after this the token is refused with `token_expired`.
    pub expires_at: i64,
    /// Unix seconds of the one use, once used.
    pub used_at: Option<i64>,
    /// DEK version both blobs are sealed under.
    pub key_version: u32,
    /// Sealed card metadata (scheme, IIN, last 4, expiry, holder name, fingerprint).
    pub meta: Vec<u8>,
    /// Sealed PAN; `None` once the token was used or expired.
    pub pan: Option<Vec<u8>>,
}

impl std::fmt::Debug for CardRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardRecord")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("used_at", &self.used_at)
            .field("key_version", &self.key_version)
            .field("has_pan", &self.pan.is_some())
            .finish_non_exhaustive()
    }
}

impl CardRecord {
    pub fn encode(&self) -> Vec<u8> {
        let pan = self.pan.as_deref().unwrap_or(&[]);
        let mut out = Vec::with_capacity(1 + 1 + 8 * 3 + 4 + 4 + self.meta.len() + 4 + pan.len());
        out.push(CARD_FORMAT_V1);
        let mut flags = 0;
        if self.used_at.is_some() {
            flags |= FLAG_USED;
        }
        if self.pan.is_some() {
            flags |= FLAG_HAS_PAN;
        }
        out.push(flags);
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.used_at.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.key_version.to_be_bytes());
        put_bytes(&mut out, &self.meta);
        put_bytes(&mut out, pan);
        out
    }

    /// When the sweeper next has work on this record (unix seconds): while it holds a PAN,
    /// its expiry (the PAN is then erased); after that, the end of its retention as a
    /// tombstone (the record is then removed).
    pub fn sweep_at(&self) -> i64 {
        if self.pan.is_some() {
            self.expires_at
        } else {
            self.used_at
                .unwrap_or(self.expires_at)
                .saturating_add(TOMBSTONE_RETENTION_SECS)
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<CardRecord, Malformed> {
        let mut r = Reader(bytes);
        if r.u8()? != CARD_FORMAT_V1 {
            return Err(Malformed);
        }
        let flags = r.u8()?;
        if flags & !(FLAG_USED | FLAG_HAS_PAN) != 0 {
            return Err(Malformed);
        }
        let created_at = r.i64()?;
        let expires_at = r.i64()?;
        let used_at = r.i64()?;
        let key_version = r.u32()?;
        let meta = r.bytes()?.to_vec();
        let pan = r.bytes()?;
        r.finish()?;
        if meta.is_empty() || (flags & FLAG_HAS_PAN == 0) != pan.is_empty() {
            return Err(Malformed);
        }
        Ok(CardRecord {
            created_at,
            expires_at,
            used_at: (flags & FLAG_USED != 0).then_some(used_at),
            key_version,
            meta,
            pan: (flags & FLAG_HAS_PAN != 0).then(|| pan.to_vec()),
        })
    }
}

/// A customer: sealed profile (contact details) plus the list of its customer tokens, so that
/// deleting the customer removes every token in the same transaction without a scan.
#[derive(Clone, PartialEq, Eq)]
pub struct CustomerRecord {
    pub created_at: i64,
    pub updated_at: i64,
    pub key_version: u32,
    /// Sealed profile (email, name, phone, address, metadata).
    pub profile: Vec<u8>,
    /// The customer's tokens and their card fingerprints (keyed HMACs), oldest first.
    pub tokens: Vec<TokenRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRef {
    pub id: String,
    pub fingerprint: String,
}

impl std::fmt::Debug for CustomerRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerRecord")
            .field("created_at", &self.created_at)
            .field("key_version", &self.key_version)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

const CUSTOMER_FORMAT_V1: u8 = 1;

impl CustomerRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.profile.len() + self.tokens.len() * 110);
        out.push(CUSTOMER_FORMAT_V1);
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out.extend_from_slice(&self.updated_at.to_be_bytes());
        out.extend_from_slice(&self.key_version.to_be_bytes());
        put_bytes(&mut out, &self.profile);
        out.extend_from_slice(&(self.tokens.len() as u32).to_be_bytes());
        for t in &self.tokens {
            put_bytes(&mut out, t.id.as_bytes());
            put_bytes(&mut out, t.fingerprint.as_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<CustomerRecord, Malformed> {
        let mut r = Reader(bytes);
        if r.u8()? != CUSTOMER_FORMAT_V1 {
            return Err(Malformed);
        }
        let created_at = r.i64()?;
        let updated_at = r.i64()?;
        let key_version = r.u32()?;
        let profile = r.bytes()?.to_vec();
        let count = r.u32()?;
        let mut tokens = Vec::new();
        for _ in 0..count {
            tokens.push(TokenRef {
                id: r.string()?,
                fingerprint: r.string()?,
            });
        }
        r.finish()?;
        if profile.is_empty() {
            return Err(Malformed);
        }
        Ok(CustomerRecord {
            created_at,
            updated_at,
            key_version,
            profile,
            tokens,
        })
    }
}

/// A reusable customer token: the card (never a CVC) sealed for one customer.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub customer: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub key_version: u32,
    /// Sealed card metadata and recurring (MIT) data.
    pub meta: Vec<u8>,
    /// Sealed PAN.
    pub pan: Vec<u8>,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("customer", &self.customer)
            .field("created_at", &self.created_at)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

const TOKEN_FORMAT_V1: u8 = 1;

impl TokenRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.meta.len() + self.pan.len());
        out.push(TOKEN_FORMAT_V1);
        put_bytes(&mut out, self.customer.as_bytes());
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out.extend_from_slice(&self.updated_at.to_be_bytes());
        out.extend_from_slice(&self.key_version.to_be_bytes());
        put_bytes(&mut out, &self.meta);
        put_bytes(&mut out, &self.pan);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<TokenRecord, Malformed> {
        let mut r = Reader(bytes);
        if r.u8()? != TOKEN_FORMAT_V1 {
            return Err(Malformed);
        }
        let rec = TokenRecord {
            customer: r.string()?,
            created_at: r.i64()?,
            updated_at: r.i64()?,
            key_version: r.u32()?,
            meta: r.bytes()?.to_vec(),
            pan: r.bytes()?.to_vec(),
        };
        r.finish()?;
        if rec.meta.is_empty() || rec.pan.is_empty() {
            return Err(Malformed);
        }
        Ok(rec)
    }
}

/// The outcome of the first request under an `Idempotency-Key`, or the claim of a request
/// still running. Holds no card data or personal data: a success is kept as the id of the
/// object made (the reply is rebuilt from the live object), an error as its fixed-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub created_at: i64,
    /// Keyed digest of method, path and body: the same key with another body is a conflict.
    pub request_digest: Vec<u8>,
    /// The process (boot id) that claimed the key; a claim left by an earlier process, which
    /// died before answering, may be taken over.
    pub owner: u64,
    /// `None` while the first request runs.
    pub response: Option<StoredResponse>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// For a success: what to rebuild the reply from (an object id and flags, see the API);
    /// for an error: the error body.
    pub body: Vec<u8>,
}

const IDEMPOTENCY_FORMAT_V1: u8 = 1;

impl IdempotencyRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.response.as_ref().map_or(0, |r| r.body.len()));
        out.push(IDEMPOTENCY_FORMAT_V1);
        out.extend_from_slice(&self.created_at.to_be_bytes());
        put_bytes(&mut out, &self.request_digest);
        out.extend_from_slice(&self.owner.to_be_bytes());
        match &self.response {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                out.extend_from_slice(&r.status.to_be_bytes());
                put_bytes(&mut out, &r.body);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<IdempotencyRecord, Malformed> {
        let mut r = Reader(bytes);
        if r.u8()? != IDEMPOTENCY_FORMAT_V1 {
            return Err(Malformed);
        }
        let created_at = r.i64()?;
        let request_digest = r.bytes()?.to_vec();
        let owner = u64::from_be_bytes(r.array()?);
        let response = match r.u8()? {
            0 => None,
            1 => Some(StoredResponse {
                status: u16::from_be_bytes(r.array()?),
                body: r.bytes()?.to_vec(),
            }),
            _ => return Err(Malformed),
        };
        r.finish()?;
        Ok(IdempotencyRecord {
            created_at,
            request_digest,
            owner,
            response,
        })
    }
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// `bytes` behind a one-byte length, for fields that are never longer than 255 bytes; `None`
/// if this one is.
#[must_use]
pub(crate) fn put_short(out: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
    out.push(u8::try_from(bytes.len()).ok()?);
    out.extend_from_slice(bytes);
    Some(())
}

/// Reads a record front to back; every read checks the length left.
pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader(bytes)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        self.take(N)?.try_into().map_err(|_| Malformed)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, Malformed> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let len = usize::try_from(self.u32()?).map_err(|_| Malformed)?;
        self.take(len)
    }

    pub(crate) fn string(&mut self) -> Result<String, Malformed> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed)
    }

    /// What [`put_short`] wrote.
    pub(crate) fn short(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// The end of the record: anything left over makes it malformed.
    pub(crate) fn finish(self) -> Result<(), Malformed> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Malformed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pan: Option<Vec<u8>>, used_at: Option<i64>) -> CardRecord {
        CardRecord {
            created_at: 1_700_000_000,
            expires_at: 1_700_086_400,
            used_at,
            key_version: 3,
            meta: vec![1, 2, 3],
            pan,
        }
    }

    #[test]
    fn round_trips() {
        for rec in [
            sample(Some(vec![9; 40]), None),
            sample(None, Some(1_700_000_100)),
            sample(None, None),
        ] {
            assert_eq!(CardRecord::decode(&rec.encode()).unwrap(), rec);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let bytes = sample(Some(vec![9; 40]), None).encode();
        for len in 0..bytes.len() {
            assert!(CardRecord::decode(&bytes[..len]).is_err(), "prefix {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(CardRecord::decode(&longer).is_err());
        let mut bad_flags = bytes;
        bad_flags[1] = 0xff;
        assert!(CardRecord::decode(&bad_flags).is_err());
    }

    #[test]
    fn other_records_round_trip_and_refuse_truncation() {
        let customer = CustomerRecord {
            created_at: 5,
            updated_at: 6,
            key_version: 1,
            profile: vec![7; 30],
            tokens: vec![TokenRef {
                id: "tok_a".into(),
                fingerprint: "ff".into(),
            }],
        };
        let token = TokenRecord {
            customer: "cust_a".into(),
            created_at: 1,
            updated_at: 2,
            key_version: 1,
            meta: vec![3; 10],
            pan: vec![4; 30],
        };
        let idem = IdempotencyRecord {
            created_at: 9,
            request_digest: vec![1; 32],
            owner: 77,
            response: Some(StoredResponse {
                status: 201,
                body: vec![5; 40],
            }),
        };
        let claim = IdempotencyRecord {
            response: None,
            ..idem.clone()
        };
        assert_eq!(
            CustomerRecord::decode(&customer.encode()).unwrap(),
            customer
        );
        assert_eq!(TokenRecord::decode(&token.encode()).unwrap(), token);
        assert_eq!(IdempotencyRecord::decode(&idem.encode()).unwrap(), idem);
        assert_eq!(IdempotencyRecord::decode(&claim.encode()).unwrap(), claim);
        for len in 0..customer.encode().len() {
            assert!(
                CustomerRecord::decode(&customer.encode()[..len]).is_err(),
                "customer prefix {len}"
            );
        }
        for len in 0..token.encode().len() {
            assert!(
                TokenRecord::decode(&token.encode()[..len]).is_err(),
                "token prefix {len}"
            );
        }
        for len in 0..idem.encode().len() {
            assert!(
                IdempotencyRecord::decode(&idem.encode()[..len]).is_err(),
                "idempotency prefix {len}"
            );
        }
    }

    #[test]
    fn debug_shows_no_blobs() {
        let rec = sample(Some(vec![0x42; 8]), None);
        assert!(!format!("{rec:?}").contains("66"));
    }
}
