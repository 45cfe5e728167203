//! Card data, parsed at the edge.
//!
//! `Pan`, `Expiry`, `Cvc` and `HolderName` can only be built by their `parse` functions, so code
//! past the API layer never handles an unchecked string. The secret ones (`Pan`, `Cvc`) live in
//! fixed-size arrays (no reallocation leaves copies behind), are wiped on drop, print as
//! `<redacted>` in `Debug`, and are read through one named method each. This module depends on
//! nothing else in the crate.

use std::fmt;

use serde::Deserialize;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Why a piece of card data was refused. The variants never carry the submitted value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("card number must be 12 to 19 digits and pass the Luhn check")]
    InvalidNumber,
    #[error("expiry is malformed or in the past")]
    InvalidExpiry,
    #[error("CVC must be 3 or 4 digits")]
    InvalidCvc,
    #[error("holder name is too long, empty, or holds control characters or digits")]
    InvalidHolderName,
}

/// A string from a request body that may hold card data: wiped on drop, never printed.
#[derive(Deserialize, Default)]
#[serde(transparent)]
pub struct SecretInput(Zeroizing<String>);

impl SecretInput {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SecretInput {
    fn from(s: &str) -> Self {
        SecretInput(Zeroizing::new(s.to_owned()))
    }
}

impl fmt::Debug for SecretInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretInput(<redacted>)")
    }
}

const PAN_MAX: usize = 19;
const PAN_MIN: usize = 12;

/// A primary account number: 12–19 ASCII digits that pass the Luhn check.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Pan {
    digits: [u8; PAN_MAX],
    len: u8,
}

impl Pan {
    /// Accepts digits, optionally grouped by single spaces or dashes between digit groups.
    pub fn parse(input: &str) -> Result<Pan, CardError> {
        // Digits go straight into the `Pan`: every early return drops it, and dropping wipes.
        let mut pan = Pan {
            digits: [0u8; PAN_MAX],
            len: 0,
        };
        let mut previous_was_digit = false;
        for byte in input.bytes() {
            match byte {
                b'0'..=b'9' => {
                    let slot = pan
                        .digits
                        .get_mut(usize::from(pan.len))
                        .ok_or(CardError::InvalidNumber)?;
                    *slot = byte;
                    pan.len += 1;
                    previous_was_digit = true;
                }
                b' ' | b'-' if previous_was_digit => previous_was_digit = false,
                _ => return Err(CardError::InvalidNumber),
            }
        }
        if !previous_was_digit || usize::from(pan.len) < PAN_MIN || !luhn_valid(pan.digits()) {
            return Err(CardError::InvalidNumber);
        }
        Ok(pan)
    }

    /// Rebuilds a PAN read back from the store; the same checks as `parse`.
    pub fn from_digits(digits: &[u8]) -> Result<Pan, CardError> {
        std::str::from_utf8(digits)
            .map_err(|_| CardError::InvalidNumber)
            .and_then(Pan::parse)
    }

    /// The only way to read the full number.
    pub fn expose_digits(&self) -> &str {
        // Only ASCII digits are ever stored, so this cannot fail.
        std::str::from_utf8(self.digits()).unwrap_or("")
    }

    fn digits(&self) -> &[u8] {
        self.digits.get(..usize::from(self.len)).unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The issuer identification number: the first six digits.
    pub fn iin(&self) -> &str {
        self.expose_digits().get(..6).unwrap_or("")
    }

    /// The eight-digit IIN, shown only for PANs of 16 digits or more (PCI DSS 3.4.1 allows it).
    pub fn iin8(&self) -> Option<&str> {
        (self.len() >= 16).then(|| self.expose_digits().get(..8).unwrap_or(""))
    }

    pub fn last4(&self) -> &str {
        let s = self.expose_digits();
        s.get(s.len().saturating_sub(4)..).unwrap_or("")
    }

    pub fn scheme(&self) -> Scheme {
        Scheme::of(self)
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pan(<redacted>)")
    }
}

pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        if !d.is_ascii_digit() {
            return false;
        }
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// True when `text` could hold a card number: 12 or more digits in a row, with up to
/// [`SEPARATOR_RUN`] separators between any two of them. A digit is any Unicode decimal or
/// other numeric character (fullwidth `４` too). A separator is one of `- + . _ / \ |`, a
/// Unicode dash (`is_dash`: the en dash a word processor puts between digit groups, the
/// minus sign, the fullwidth hyphen-minus a CJK input method types), or a run of whitespace of
/// any length, which counts as one separator (`4111      1111` is one number, as it looks).
/// A letter or anything else (a comma, a colon, a `*`) starts the count again.
/// Deliberately blunt: any 12-digit stretch of a longer number has a one-in-ten chance of
/// passing Luhn, so a Luhn test would let a PAN hidden in a longer run (a PAN followed by its
/// CVC) through. Free text headed for logs or storage is refused when this is true.
pub fn contains_pan(text: &str) -> bool {
    digit_row(text, SEPARATOR_RUN, true, is_invisible, |c| {
        c.is_whitespace()
            || is_dash(c)
            || matches!(
                c,
                '+' | '.'
                    | '_'
                    | '/'
                    | '\\'
                    | '|'
                    | '\''
                    | '\u{b7}' // middle dot
                    | '\u{2022}' // bullet
                    | '\u{2219}' // bullet operator
                    | '\u{30fb}' // katakana middle dot
                    | '\u{ff0b}' // fullwidth plus
                    | '\u{ff0e}' // fullwidth full stop
                    | '\u{ff0f}' // fullwidth solidus
            )
    })
}

/// Characters that show nothing, or only mark the one before, skipped as if absent so that
/// they can neither join nor split a row of digits: zero-width space, joiners and direction
/// marks, bidirectional embeddings and isolates, word joiner and invisible operators,
/// byte-order mark, soft hyphen, Mongolian vowel separator, Arabic letter mark, combining
/// grapheme joiner, variation selectors, and the combining diacritical marks.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}'
            | '\u{ad}'
            | '\u{180e}'
            | '\u{61c}'
            | '\u{34f}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{300}'..='\u{36f}'
    )
}

/// The hyphen-minus and the Unicode dashes that may stand in for it between digit groups:
/// hyphen to horizontal bar (U+2010 to U+2015), the minus sign, and the small and fullwidth
/// hyphen-minus forms.
fn is_dash(c: char) -> bool {
    matches!(
        c,
        '-' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{fe58}' | '\u{fe63}' | '\u{ff0d}'
    )
}

/// The narrower rule project names have always been checked with: 12 or more digits with
/// single spaces, dashes or dots between them. Names are kept in policies, key names and
/// every stored record's key, so a name accepted once must stay accepted: this rule must not
/// widen with [`contains_pan`].
pub fn contains_grouped_pan(text: &str) -> bool {
    digit_row(text, 1, false, |_| false, |c| matches!(c, ' ' | '-' | '.'))
}

/// Whether `text` holds [`PAN_MIN`] numeric characters with at most `max_run` separators
/// between any two. With `whitespace_runs`, a run of whitespace characters counts as one
/// separator, however long; without it, each whitespace character counts on its own.
fn digit_row(
    text: &str,
    max_run: usize,
    whitespace_runs: bool,
    ignorable: impl Fn(char) -> bool,
    separator: impl Fn(char) -> bool,
) -> bool {
    let mut digits = 0usize;
    let mut separators = 0usize;
    // Whether the previous character was whitespace counted as a separator of this row.
    let mut in_whitespace = false;
    for c in text.chars().filter(|&c| !ignorable(c)) {
        if c.is_numeric() {
            digits += 1;
            separators = 0;
            in_whitespace = false;
            if digits >= PAN_MIN {
                return true;
            }
        } else if whitespace_runs && in_whitespace && c.is_whitespace() {
            // The rest of a whitespace run that was already counted as one separator.
        } else if digits > 0 && separators < max_run && separator(c) {
            separators += 1;
            in_whitespace = c.is_whitespace();
        } else {
            digits = 0;
            separators = 0;
            in_whitespace = false;
        }
    }
    false
}

/// How many separators in a row [`contains_pan`] still reads as one number
/// (`4111 - 1111`, `4111 – 1111`: a whitespace run, a dash, a whitespace run).
const SEPARATOR_RUN: usize = 3;

/// Card expiry: the card is valid through the last day of `month`/`year`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    month: u8,
    year: u16,
}

impl Expiry {
    /// `year` may be given with 2 or 4 digits. Refused when before the current month `today`
    /// (year, month) or absurdly far in the future.
    pub fn parse(month: u64, year: u64, today: (u16, u8)) -> Result<Expiry, CardError> {
        let (this_year, this_month) = today;
        if !(1..=12).contains(&month) {
            return Err(CardError::InvalidExpiry);
        }
        let year = match year {
            0..=99 => 2000 + year,
            1000..=9999 => year,
            _ => return Err(CardError::InvalidExpiry),
        };
        let year = u16::try_from(year).map_err(|_| CardError::InvalidExpiry)?;
        let month = month as u8;
        if (year, month) < (this_year, this_month) || year > this_year + 50 {
            return Err(CardError::InvalidExpiry);
        }
        Ok(Expiry { month, year })
    }

    /// Rebuilds an expiry read back from the store, without the "not in the past" check.
    pub fn stored(month: u8, year: u16) -> Expiry {
        Expiry { month, year }
    }

    pub fn month(&self) -> u8 {
        self.month
    }

    pub fn year(&self) -> u16 {
        self.year
    }
}

/// A card verification code: kept in memory only, never stored.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Cvc {
    digits: [u8; 4],
    len: u8,
}

impl Cvc {
    pub fn parse(input: &str) -> Result<Cvc, CardError> {
        let bytes = input.as_bytes();
        if !(3..=4).contains(&bytes.len()) || !bytes.iter().all(u8::is_ascii_digit) {
            return Err(CardError::InvalidCvc);
        }
        let mut digits = [0u8; 4];
        for (slot, b) in digits.iter_mut().zip(bytes) {
            *slot = *b;
        }
        Ok(Cvc {
            digits,
            len: bytes.len() as u8,
        })
    }

    /// The digits in four bytes, a 3-digit code padded with a zero byte.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 4]> {
        Zeroizing::new(self.digits)
    }

    /// The inverse of [`Cvc::to_bytes`]; `None` for bytes it never produced.
    pub fn from_bytes(bytes: &[u8; 4]) -> Option<Cvc> {
        let len = if bytes.ends_with(&[0]) { 3 } else { 4 };
        let digits = bytes.get(..len)?;
        digits.iter().all(u8::is_ascii_digit).then(|| Cvc {
            digits: *bytes,
            len: len as u8,
        })
    }

    /// The only way to read the code.
    pub fn expose(&self) -> &str {
        let digits = self.digits.get(..usize::from(self.len)).unwrap_or(&[]);
        std::str::from_utf8(digits).unwrap_or("")
    }
}

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc(<redacted>)")
    }
}

/// The cardholder's name as embossed: personal data, sealed at rest.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct HolderName(String);

impl HolderName {
    pub const MAX_CHARS: usize = 100;

    /// Refuses control characters and digits of any script (fullwidth `４` too, as a CJK input
    /// method types them): a name never needs them, and refusing digits keeps a PAN typed into
    /// the wrong field from being stored as a "name". Names stored while only ASCII digits
    /// were refused must be read back with [`HolderName::stored`], which keeps that rule, so
    /// that tightening this one hides none of them.
    pub fn parse(input: &str) -> Result<HolderName, CardError> {
        Self::checked(input, char::is_numeric)
    }

    /// Rebuilds a name read back from the store, under the rule names were first accepted
    /// with (control characters and ASCII digits refused): a name stored then must still be
    /// shown. Never use it for input.
    pub fn stored(input: &str) -> Result<HolderName, CardError> {
        Self::checked(input, |c| c.is_ascii_digit())
    }

    /// Trimmed, not empty, at most [`HolderName::MAX_CHARS`] characters, and none of them a
    /// control character or a `digit`.
    fn checked(input: &str, digit: impl Fn(char) -> bool) -> Result<HolderName, CardError> {
        let trimmed = input.trim();
        if trimmed.is_empty()
            || trimmed.chars().count() > Self::MAX_CHARS
            || trimmed.chars().any(|c| c.is_control() || digit(c))
        {
            return Err(CardError::InvalidHolderName);
        }
        Ok(HolderName(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HolderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HolderName(<redacted>)")
    }
}

/// Card schemes recognised from public IIN ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Diners,
    Jcb,
    UnionPay,
    Maestro,
    Mir,
    Elo,
    Hipercard,
    RuPay,
    Troy,
    Verve,
    Unknown,
}

/// Six-digit IIN ranges, first match wins: the narrow national ranges come before the broad
/// international ones they sit inside (Elo and RuPay inside Discover's 65, Elo inside Visa's 4).
const IIN_RANGES: &[(u32, u32, Scheme)] = {
    use Scheme::*;
    &[
        (401178, 401179, Elo),
        (431274, 431274, Elo),
        (438935, 438935, Elo),
        (451416, 451416, Elo),
        (457393, 457393, Elo),
        (457631, 457632, Elo),
        (504175, 504175, Elo),
        (506699, 506778, Elo),
        (509000, 509999, Elo),
        (627780, 627780, Elo),
        (636297, 636297, Elo),
        (636368, 636368, Elo),
        (650031, 650033, Elo),
        (650035, 650051, Elo),
        (650405, 650439, Elo),
        (650485, 650538, Elo),
        (650541, 650598, Elo),
        (650700, 650718, Elo),
        (650720, 650727, Elo),
        (650901, 650978, Elo),
        (651652, 651679, Elo),
        (655000, 655019, Elo),
        (655021, 655058, Elo),
        (384100, 384100, Hipercard),
        (384140, 384140, Hipercard),
        (384160, 384160, Hipercard),
        (606282, 606282, Hipercard),
        (637095, 637095, Hipercard),
        (637568, 637568, Hipercard),
        (637599, 637599, Hipercard),
        (637609, 637609, Hipercard),
        (637612, 637612, Hipercard),
        (506099, 506198, Verve),
        (507865, 507964, Verve),
        (650002, 650027, Verve),
        (508500, 508999, RuPay),
        (606985, 607984, RuPay),
        (608001, 608500, RuPay),
        (652150, 653149, RuPay),
        (817200, 819899, RuPay),
        (820000, 820199, RuPay),
        (979200, 979289, Troy),
        (220000, 220499, Mir),
        (340000, 349999, Amex),
        (370000, 379999, Amex),
        (300000, 305999, Diners),
        (309500, 309599, Diners),
        (360000, 369999, Diners),
        (380000, 399999, Diners),
        (352800, 358999, Jcb),
        (601100, 601199, Discover),
        (622126, 622925, UnionPay),
        (644000, 659999, Discover),
        (620000, 629999, UnionPay),
        (810000, 817199, UnionPay),
        (501800, 501899, Maestro),
        (502000, 502099, Maestro),
        (503800, 503899, Maestro),
        (589300, 589399, Maestro),
        (630400, 630499, Maestro),
        (675900, 675999, Maestro),
        (676100, 676399, Maestro),
        (676770, 676770, Maestro),
        (676774, 676774, Maestro),
        (500000, 509999, Maestro),
        (560000, 589999, Maestro),
        (510000, 559999, Mastercard),
        (222100, 272099, Mastercard),
        (400000, 499999, Visa),
    ]
};

impl Scheme {
    fn of(pan: &Pan) -> Scheme {
        let iin: u32 = pan.iin().parse().unwrap_or(0);
        IIN_RANGES
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&iin))
            .map_or(Scheme::Unknown, |(_, _, scheme)| *scheme)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Visa => "visa",
            Scheme::Mastercard => "mastercard",
            Scheme::Amex => "amex",
            Scheme::Discover => "discover",
            Scheme::Diners => "diners",
            Scheme::Jcb => "jcb",
            Scheme::UnionPay => "unionpay",
            Scheme::Maestro => "maestro",
            Scheme::Mir => "mir",
            Scheme::Elo => "elo",
            Scheme::Hipercard => "hipercard",
            Scheme::RuPay => "rupay",
            Scheme::Troy => "troy",
            Scheme::Verve => "verve",
            Scheme::Unknown => "unknown",
        }
    }
}

/// Completes `prefix` (digits) to a Luhn-valid number of `len` digits, filling with zeros.
/// Used to build test numbers for any IIN; never used on real card data.
pub fn luhn_complete(prefix: &str, len: usize) -> String {
    let mut body: String = prefix.chars().take(len.saturating_sub(1)).collect();
    while body.len() < len.saturating_sub(1) {
        body.push('0');
    }
    for check in b'0'..=b'9' {
        let mut candidate = body.clone().into_bytes();
        candidate.push(check);
        if luhn_valid(&candidate) {
            return String::from_utf8(candidate).unwrap_or_default();
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    const TODAY: (u16, u8) = (2026, 11);

    #[test]
    fn pan_parsing_table() {
        let cases: &[(&str, bool)] = &[
            ("4242424242424242", true),
            ("4242 4242 4242 4242", true),
            ("4242-4242-4242-4242", true),
            ("378282246310005", true),
            ("4242424242424241", false),
            ("4242 4242 4242 424a", false),
            (" 4242424242424242", false),
            ("4242424242424242 ", false),
            ("4242  4242424242424242", false),
            ("4242--4242424242424242", false),
            ("", false),
            ("abc", false),
            (&luhn_complete("4", 11), false),
            (&luhn_complete("4", 12), true),
            (&luhn_complete("4", 19), true),
            (&luhn_complete("4", 20), false),
            ("%B4242424242424242^DOE/JOHN^2512", false),
        ];
        for (input, ok) in cases {
            assert_eq!(Pan::parse(input).is_ok(), *ok, "case #{input}#");
        }
    }

    #[test]
    fn pan_detection_in_free_text() {
        for (input, found) in [
            ("4111111111111111", true),
            ("card 4111 1111 1111 1111 please", true),
            ("4111-1111-1111-1111", true),
            ("4111.1111.1111.1111", true),
            ("4111 1111 1111 1111 123", true),
            ("ref 9 4111111111111111", true),
            ("378282246310005", true),
            ("order 12345", false),
            ("inv_2026_000123", false),
            ("4111111111111112", true),
            ("inv 2026-11-27 no. 12345", false),
            ("+1 202 555 0143", false),
            ("", false),
            ("4111_1111_1111_1111", true),
            ("4111/1111/1111/1111", true),
            ("4111  1111  1111  1111", true),
            ("4111 - 1111 - 1111 - 1111", true),
            ("\u{ff14}\u{ff11}\u{ff11}\u{ff11}111111111111", true),
            ("4111 **** **** 1111", false),
            ("2026-11-27 12:30:45", false),
            ("2026-11-27, 2026-12-01", false),
            ("4111a1111b1111c1111", false),
        ] {
            assert_eq!(contains_pan(input), found, "{input}");
        }
        // Project names keep the narrower rule: what was a valid name stays one.
        for (input, found) in [
            ("4111-1111-1111-1111", true),
            ("m_2024_11_27_0001", false),
            ("4111--1111--1111--1111", false),
        ] {
            assert_eq!(contains_grouped_pan(input), found, "{input}");
        }
    }

    /// The same text in fullwidth forms, as a CJK input method types it: digits, spaces
    /// (ideographic) and hyphen-minus.
    fn fullwidth(ascii: &str) -> String {
        ascii
            .chars()
            .map(|c| match c {
                '0'..='9' => char::from_u32(0xff10 + u32::from(c) - u32::from('0')).unwrap(),
                ' ' => '\u{3000}',
                '-' => '\u{ff0d}',
                other => other,
            })
            .collect()
    }

    /// Separators the filter once missed: Unicode dashes, `+`, and whitespace runs of any
    /// length (one separator however long). Each case is written as it would be typed or
    /// pasted; every `true` case but the last two was missed before.
    #[test]
    fn pan_detection_reads_dashes_plus_and_whitespace_runs_as_separators() {
        let cases: &[(&str, bool)] = &[
            // En dash, spaced and not.
            ("4111 \u{2013} 1111 \u{2013} 1111 \u{2013} 1111", true),
            ("4111\u{2013}1111\u{2013}1111\u{2013}1111", true),
            // Em dash.
            ("4111 \u{2014} 1111 \u{2014} 1111 \u{2014} 1111", true),
            // Hyphen, non-breaking hyphen, figure dash; horizontal bar.
            ("4111\u{2010}1111\u{2011}1111\u{2012}1111", true),
            ("4111\u{2015}1111\u{2015}1111\u{2015}1111", true),
            // Minus sign.
            ("4111 \u{2212} 1111 \u{2212} 1111 \u{2212} 1111", true),
            // Small em dash, small hyphen-minus, fullwidth hyphen-minus.
            ("4111\u{fe58}1111\u{fe63}1111\u{ff0d}1111", true),
            ("4111+1111+1111+1111", true),
            ("4111 + 1111 + 1111 + 1111", true),
            ("4111    1111    1111    1111", true),
            ("4111      1111      1111      1111", true),
            ("4111\t\t\t\t1111\n\n\n\n1111 \u{3000} \u{a0} 1111", true),
            ("card:\n4111\n\n\n\n\n1111 1111 111", true),
            (&fullwidth("4111  1111-1111-1111"), true),
            (&fullwidth("4111 1111 1111 1111"), true),
            (&fullwidth("4111111111111111"), true),
            // Fewer than 12 digits, however separated.
            ("1234 \u{2013} 5678 \u{2013} 901", false),
            ("+1 202    555    0143", false),
            ("4111    1111    111", false),
            (&fullwidth("4111 1111 111"), false),
            // A letter, a comma, a colon or a star still ends the row.
            ("4111 \u{2013} 1111 x 1111 \u{2013} 1111", false),
            ("4111    1111    O    1111    1111", false),
            ("2026\u{2013}11\u{2013}27, 2026\u{2013}12\u{2013}01", false),
            ("2026-11-27    12:30:45", false),
            ("4111 + **** + **** + 1111", false),
            // A fourth separator still ends the row; a whitespace run counts as one.
            ("4111 \u{2013}\u{2013}\u{2013} 1111 1111 111", false),
            ("4111++++1111++++1111++++1111", false),
            // Invisible characters neither join nor split a row; dots, bullets and
            // apostrophes between groups, fullwidth punctuation, are separators.
            ("4111\u{200b}1111\u{200b}1111\u{200b}1111", true),
            ("4111\u{ad}1111\u{2060}1111\u{feff}1111", true),
            ("4111 \u{200b}\u{200b}\u{200b}\u{200b} 1111 1111 1111", true),
            ("4111\u{b7}1111\u{b7}1111\u{b7}1111", true),
            ("4111 \u{2022} 1111 \u{2022} 1111 \u{2022} 1111", true),
            ("4111'1111'1111'1111", true),
            ("4111\u{ff0b}1111\u{ff0e}1111\u{ff0f}1111", true),
            ("4111\u{200b}1111\u{200b}111", false),
            ("4111\u{200e}1111\u{202b}1111\u{2066}1111", true),
            ("4\u{301}111 1111 1111 1111", true),
        ];
        for (input, found) in cases {
            assert_eq!(contains_pan(input), *found, "{input:?}");
        }
        // Project names keep their old rule exactly: none of the new separators joins digits,
        // and the old ones still do.
        for input in [
            "4111\u{2013}1111\u{2013}1111\u{2013}1111",
            "4111+1111+1111+1111",
            "4111  1111  1111  1111",
            "4111\t1111\t1111\t1111",
        ] {
            assert!(!contains_grouped_pan(input), "{input:?}");
        }
        for input in ["4111 1111 1111 1111", "4111.1111.1111.1111", "411111111111"] {
            assert!(contains_grouped_pan(input), "{input:?}");
        }
    }

    #[test]
    fn pan_views() {
        let pan = Pan::parse("4242 4242 4242 4242").unwrap();
        assert_eq!(pan.expose_digits(), "4242424242424242");
        assert_eq!(pan.iin(), "424242");
        assert_eq!(pan.iin8(), Some("42424242"));
        assert_eq!(pan.last4(), "4242");
        let short = Pan::parse("378282246310005").unwrap();
        assert_eq!(short.iin8(), None);
        assert_eq!(format!("{pan:?}"), "Pan(<redacted>)");
        assert!(!format!("{:?}", Cvc::parse("123").unwrap()).contains("123"));
    }

    #[test]
    fn scheme_table() {
        let cases: &[(&str, Scheme)] = &[
            ("4242424242424242", Scheme::Visa),
            ("5555555555554444", Scheme::Mastercard),
            ("2223003122003222", Scheme::Mastercard),
            ("378282246310005", Scheme::Amex),
            ("6011111111111117", Scheme::Discover),
            ("6445644564456445", Scheme::Discover),
            ("3056930009020004", Scheme::Diners),
            ("36227206271667", Scheme::Diners),
            ("3566002020360505", Scheme::Jcb),
            ("6200000000000005", Scheme::UnionPay),
            ("6759649826438453", Scheme::Maestro),
            ("2200000000000004", Scheme::Mir),
            ("6362970000457013", Scheme::Elo),
            ("4011780000000000", Scheme::Elo),
            ("6062825624254001", Scheme::Hipercard),
            ("6521500000000000", Scheme::RuPay),
            ("9792000000000000", Scheme::Troy),
            ("5061000000000000", Scheme::Verve),
            ("9999990000000000", Scheme::Unknown),
        ];
        for (prefix, scheme) in cases {
            let pan = Pan::parse(&luhn_complete(prefix, prefix.len())).unwrap();
            assert_eq!(pan.scheme(), *scheme, "{prefix}");
        }
    }

    #[test]
    fn expiry_table() {
        type Case = (u64, u64, Option<(u8, u16)>);
        let cases: &[Case] = &[
            (12, 2030, Some((12, 2030))),
            (12, 30, Some((12, 2030))),
            (11, 2026, Some((11, 2026))),
            (10, 2026, None),
            (13, 2030, None),
            (0, 2030, None),
            (1, 2025, None),
            (1, 2200, None),
            (1, 123, None),
        ];
        for (m, y, want) in cases {
            let got = Expiry::parse(*m, *y, TODAY)
                .ok()
                .map(|e| (e.month(), e.year()));
            assert_eq!(got, *want, "{m}/{y}");
        }
    }

    #[test]
    fn cvc_and_name_table() {
        for (input, ok) in [
            ("123", true),
            ("1234", true),
            ("12", false),
            ("12345", false),
            ("12a", false),
        ] {
            assert_eq!(Cvc::parse(input).is_ok(), ok, "{input}");
        }
        for (input, ok) in [
            ("Ada Lovelace", true),
            ("", false),
            ("  ", false),
            ("4242424242424242", false),
            ("A\u{7}B", false),
            ("Zo\u{eb} \u{c9}lo\u{ef}se", true),
        ] {
            assert_eq!(HolderName::parse(input).is_ok(), ok, "{input:?}");
        }
        assert_eq!(Cvc::parse("987").unwrap().expose(), "987");
    }

    /// A name refuses digits of every script, not only ASCII ones; a name stored while only
    /// ASCII digits were refused is still read back.
    #[test]
    fn holder_names_refuse_digits_of_any_script() {
        let fullwidth_pan = fullwidth("4111 1111 1111 1111");
        // The same with ASCII spaces: "４１１１ １１１１ １１１１ １１１１".
        let ascii_spaced = fullwidth_pan.replace('\u{3000}', " ");
        let cases: &[(&str, bool)] = &[
            (&fullwidth_pan, false),
            (&ascii_spaced, false),
            (&fullwidth("4"), false),
            (&format!("Ada {}", fullwidth("1")), false),
            // Arabic-Indic and Devanagari digits.
            ("\u{661}\u{662}\u{663}", false),
            ("\u{967}\u{968}\u{969}", false),
            ("Ada 1", false),
            // Fullwidth letters are letters.
            ("\u{ff2a}\u{ff4f}\u{ff48}\u{ff4e} Smith", true),
            ("\u{5c71}\u{7530} \u{592a}\u{90ce}", true),
            ("Louis XIV", true),
            ("Ada O'Brien-King", true),
        ];
        for (input, ok) in cases {
            assert_eq!(HolderName::parse(input).is_ok(), *ok, "{input:?}");
        }
        // Read back from the store: the old rule, so no stored name disappears.
        let stored = HolderName::stored(&fullwidth_pan).unwrap();
        assert_eq!(stored.as_str(), fullwidth_pan);
        for input in ["Ada 1", "", "A\u{7}B"] {
            assert!(HolderName::stored(input).is_err(), "{input:?}");
        }
        assert_eq!(HolderName::stored("  Ada  ").unwrap().as_str(), "Ada");
    }

    #[test]
    fn cvc_bytes_round_trip_and_refuse_what_parse_never_makes() {
        for code in ["000", "987", "0000", "9876"] {
            let bytes = Cvc::parse(code).unwrap().to_bytes();
            assert_eq!(Cvc::from_bytes(&bytes).unwrap().expose(), code);
        }
        for bytes in [b"12\0\0", b"12a\0", b"\0\0\0\0", b"123\x01"] {
            assert!(Cvc::from_bytes(bytes).is_none(), "{bytes:?}");
        }
    }
}
