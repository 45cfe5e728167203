//! The plaintext of a card record's sealed metadata blob.
//!
//! Written in a compact binary layout: a card record is mostly this blob, and a smaller record
//! means fewer bytes for sled to copy, log and page back in, and more cards in its cache. The
//! blobs written before it are JSON and still open: JSON starts with `{`, the binary layout
//! with its format byte.
//!
//! Layout (format 1): the format byte; scheme, IIN, 8-digit IIN (empty when there is none)
//! and last 4, each behind a one-byte length; expiry month (1 byte) and year (2 bytes, big
//! endian); holder name as a presence byte and a four-byte length; the 32-byte fingerprint.

use zeroize::Zeroizing;

use super::CardMeta;
use crate::store::{put_bytes, put_short, Malformed, Reader};

const META_FORMAT_V1: u8 = 1;
const FINGERPRINT_LEN: usize = 32;

impl CardMeta {
    /// The plaintext to seal.
    pub(super) fn encode(&self) -> Result<Zeroizing<Vec<u8>>, Malformed> {
        match self.encode_binary() {
            Some(bytes) => Ok(bytes),
            // Only metadata the binary layout cannot hold (a fingerprint that is not 64
            // lowercase hex digits, a field over 255 bytes) gets here; parsed cards never do.
            None => serde_json::to_vec(self)
                .map(Zeroizing::new)
                .map_err(|_| Malformed),
        }
    }

    fn encode_binary(&self) -> Option<Zeroizing<Vec<u8>>> {
        let fingerprint = fingerprint_bytes(&self.fingerprint)?;
        // An empty 8-digit IIN is written as none; `Some("")` would not come back as itself.
        if self.iin8.as_deref() == Some("") {
            return None;
        }
        let holder = self.holder_name.as_deref();
        let mut out = Zeroizing::new(Vec::with_capacity(
            48 + FINGERPRINT_LEN + holder.map_or(0, str::len),
        ));
        out.push(META_FORMAT_V1);
        put_short(&mut out, self.scheme.as_bytes())?;
        put_short(&mut out, self.iin.as_bytes())?;
        put_short(&mut out, self.iin8.as_deref().unwrap_or("").as_bytes())?;
        put_short(&mut out, self.last4.as_bytes())?;
        out.push(self.exp_month);
        out.extend_from_slice(&self.exp_year.to_be_bytes());
        match holder {
            Some(name) => {
                out.push(1);
                put_bytes(&mut out, name.as_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&fingerprint);
        Some(out)
    }

    /// Reads what [`CardMeta::encode`] wrote, in either layout.
    pub(super) fn decode(plain: &[u8]) -> Result<CardMeta, Malformed> {
        if plain.first() == Some(&b'{') {
            return serde_json::from_slice(plain).map_err(|_| Malformed);
        }
        let mut r = Reader::new(plain);
        if r.u8()? != META_FORMAT_V1 {
            return Err(Malformed);
        }
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| Malformed);
        let scheme = text(r.short()?)?;
        let iin = text(r.short()?)?;
        let iin8 = Some(text(r.short()?)?).filter(|s| !s.is_empty());
        let last4 = text(r.short()?)?;
        let exp_month = r.u8()?;
        let exp_year = u16::from_be_bytes(r.array()?);
        let holder_name = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err(Malformed),
        };
        let fingerprint = crate::crypto::hex(r.take(FINGERPRINT_LEN)?);
        r.finish()?;
        Ok(CardMeta {
            scheme,
            iin,
            iin8,
            last4,
            exp_month,
            exp_year,
            holder_name,
            fingerprint,
        })
    }
}

/// The fingerprint's 32 bytes, if it is written the one way `crypto::hex` writes them, so
/// that decoding gives back the same string.
fn fingerprint_bytes(hex: &str) -> Option<Zeroizing<Vec<u8>>> {
    let lowercase = hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (hex.len() == 2 * FINGERPRINT_LEN && lowercase)
        .then(|| crate::crypto::unhex(hex))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(holder: Option<&str>, iin8: Option<&str>) -> CardMeta {
        CardMeta {
            scheme: "visa".into(),
            iin: "424242".into(),
            iin8: iin8.map(str::to_owned),
            last4: "4242".into(),
            exp_month: 12,
            exp_year: 2031,
            holder_name: holder.map(str::to_owned),
            fingerprint: crate::crypto::hex(&[0xa7; FINGERPRINT_LEN]),
        }
    }

    /// Views show what the caller's disclosure allows, and never a stored holder name the
    /// current rule would refuse (a card number in fullwidth digits, stored before the rule).
    #[test]
    fn views_are_cut_to_the_disclosure_and_screen_old_names() {
        use crate::policy::Disclosure;
        let none = Disclosure::default();
        let all = Disclosure {
            fingerprint: true,
            iin8: true,
        };
        let shown = meta(Some("Ada Lovelace"), Some("42424242")).shown(none);
        assert_eq!(
            (shown.iin8, shown.fingerprint, shown.holder_name.as_deref()),
            (None, None, Some("Ada Lovelace"))
        );
        let shown = meta(None, Some("42424242")).shown(all);
        assert_eq!(shown.iin8.as_deref(), Some("42424242"));
        assert_eq!(shown.fingerprint.map(|f| f.len()), Some(64));
        let fullwidth = "\u{ff14}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11} \
                         \u{ff11}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11}";
        assert_eq!(meta(Some(fullwidth), None).shown(all).holder_name, None);
        // A name with a numeral that is no card number is shown.
        let king = meta(Some("Henry \u{2167}"), None).shown(none);
        assert_eq!(king.holder_name.as_deref(), Some("Henry \u{2167}"));
    }

    #[test]
    fn metadata_round_trips_smaller_than_json() {
        for m in [
            meta(None, None),
            meta(Some("Zoë Ångström-O'Neil"), Some("42424242")),
            meta(Some(&"x".repeat(400)), None),
        ] {
            let bytes = m.encode().unwrap();
            assert_eq!(bytes.first(), Some(&META_FORMAT_V1));
            assert_eq!(CardMeta::decode(&bytes).unwrap(), m);
            let json = serde_json::to_vec(&m).unwrap();
            assert!(
                bytes.len() + 100 < json.len(),
                "{} vs {}",
                bytes.len(),
                json.len()
            );
        }
        // The common case, without a name: format 1, scheme 1 + 4, IIN 1 + 6, no IIN8 1, last
        // 4 1 + 4, expiry 3, no name 1, fingerprint 32: 55 bytes, where JSON takes 178.
        assert_eq!(meta(None, None).encode().unwrap().len(), 55);
    }

    #[test]
    fn json_written_before_the_binary_layout_still_opens() {
        let m = meta(Some("A Holder"), Some("42424242"));
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(CardMeta::decode(&json).unwrap(), m);
    }

    #[test]
    fn what_the_binary_layout_cannot_hold_is_written_as_json() {
        let mut upper = meta(None, None);
        upper.fingerprint = upper.fingerprint.to_uppercase();
        for m in [upper, meta(None, Some(""))] {
            let bytes = m.encode().unwrap();
            assert_eq!(bytes.first(), Some(&b'{'));
            assert_eq!(CardMeta::decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_are_malformed() {
        let bytes = meta(Some("A Holder"), Some("42424242")).encode().unwrap();
        for len in 0..bytes.len() {
            assert!(CardMeta::decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(CardMeta::decode(&longer).is_err());
        let mut unknown = bytes.to_vec();
        unknown[0] = 2;
        assert!(CardMeta::decode(&unknown).is_err());
    }
}
