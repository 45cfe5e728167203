//! The card going out, the answer coming back.
//!
//! Out: placeholders such as `{{card.number}}` are put in only inside JSON string values, or
//! form values, each encoded for its content type. Anything else in the body goes as the
//! caller wrote it. In: every PAN-shaped run of digits in the PSP's answer is masked to its
//! last four, and so is the card sent however it is written; credentials the vault added are
//! redacted.

use std::collections::HashSet;
use std::io::Write;

use serde_json::Value;
use zeroize::Zeroizing;

/// A placeholder that is not one of the known ones, or a body the content type cannot carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateError {
    /// `{{…}}` that names no card field, or an unclosed `{{`.
    Placeholder,
    /// A form body that is not an object of scalar values.
    FormBody,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Number,
    ExpMonth,
    ExpYear,
    ExpYear2,
    Cvc,
    HolderName,
}

/// One placeholder: the field, and whether it stands for a JSON number (`| number`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placeholder {
    field: Field,
    number: bool,
}

/// What the placeholders are filled with.
pub struct Card<'a> {
    pub number: &'a str,
    pub exp_month: u8,
    pub exp_year: u16,
    pub cvc: Option<&'a str>,
    pub holder_name: Option<&'a str>,
}

impl Card<'_> {
    /// The field's text; `None` for a CVC or holder name the card does not have.
    fn value(&self, field: Field, out: &mut Zeroizing<String>) -> Option<()> {
        use std::fmt::Write as _;
        let _ = match field {
            Field::Number => write!(out, "{}", self.number),
            Field::ExpMonth => write!(out, "{:02}", self.exp_month),
            Field::ExpYear => write!(out, "{:04}", self.exp_year),
            Field::ExpYear2 => write!(out, "{:02}", self.exp_year % 100),
            Field::Cvc => write!(out, "{}", self.cvc?),
            Field::HolderName => write!(out, "{}", self.holder_name?),
        };
        Some(())
    }
}

/// A piece of a string value: literal text, or a placeholder.
enum Piece<'a> {
    Text(&'a str),
    Card(Placeholder),
}

/// Splits a string value into literal text and placeholders.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let (before, after) = rest.split_at(open);
        if !before.is_empty() {
            out.push(Piece::Text(before));
        }
        let inner_and_rest = after.get(2..).unwrap_or("");
        let close = inner_and_rest
            .find("}}")
            .ok_or(TemplateError::Placeholder)?;
        let (inner, tail) = inner_and_rest.split_at(close);
        out.push(Piece::Card(placeholder(inner)?));
        rest = tail.get(2..).unwrap_or("");
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

fn placeholder(inner: &str) -> Result<Placeholder, TemplateError> {
    let (name, filter) = match inner.split_once('|') {
        Some((name, filter)) => (name.trim(), Some(filter.trim())),
        None => (inner.trim(), None),
    };
    let field = match name {
        "card.number" => Field::Number,
        "card.exp_month" => Field::ExpMonth,
        "card.exp_year" => Field::ExpYear,
        "card.exp_year2" => Field::ExpYear2,
        "card.cvc" => Field::Cvc,
        "card.holder_name" => Field::HolderName,
        _ => return Err(TemplateError::Placeholder),
    };
    let number = match filter {
        None => false,
        // Only the expiry as a number: a PAN or CVC as a JSON number would lose what makes
        // it one (its length, leading zeros).
        Some("number") if matches!(field, Field::ExpMonth | Field::ExpYear | Field::ExpYear2) => {
            true
        }
        Some(_) => return Err(TemplateError::Placeholder),
    };
    Ok(Placeholder { field, number })
}

/// Checks a body before anything is sent: every placeholder is known, and a form body has the
/// shape a form can carry. Returns whether the body uses the CVC.
pub fn check(body: &Value, form: bool) -> Result<bool, TemplateError> {
    let mut cvc = false;
    check_value(body, &mut cvc)?;
    if form {
        let Value::Object(fields) = body else {
            return Err(TemplateError::FormBody);
        };
        if fields
            .values()
            .any(|v| matches!(v, Value::Object(_) | Value::Array(_)))
        {
            return Err(TemplateError::FormBody);
        }
    }
    Ok(cvc)
}

fn check_value(value: &Value, cvc: &mut bool) -> Result<(), TemplateError> {
    match value {
        Value::String(s) => {
            for piece in pieces(s)? {
                if let Piece::Card(p) = piece {
                    *cvc |= p.field == Field::Cvc;
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(|v| check_value(v, cvc)),
        Value::Object(map) => map.values().try_for_each(|v| check_value(v, cvc)),
        _ => Ok(()),
    }
}

/// Counts bytes written, to size the wiping buffer once: a growing `Vec` would leave copies
/// of the card in the allocations it leaves behind.
#[derive(Default)]
struct Count(usize);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders a checked body as JSON with the card put in, into wiping memory.
pub fn render_json(body: &Value, card: &Card<'_>) -> Zeroizing<Vec<u8>> {
    let mut count = Count::default();
    write_json(&mut count, body, card);
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    write_json(&mut *out, body, card);
    out
}

/// Renders a checked form body (`application/x-www-form-urlencoded`).
pub fn render_form(body: &Value, card: &Card<'_>) -> Zeroizing<Vec<u8>> {
    let mut count = Count::default();
    write_form(&mut count, body, card);
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    write_form(&mut *out, body, card);
    out
}

fn write_json<W: Write>(out: &mut W, value: &Value, card: &Card<'_>) {
    match value {
        Value::String(s) => write_json_string(out, s, card),
        Value::Array(items) => {
            let _ = out.write_all(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    let _ = out.write_all(b",");
                }
                write_json(out, item, card);
            }
            let _ = out.write_all(b"]");
        }
        Value::Object(map) => {
            let _ = out.write_all(b"{");
            let mut first = true;
            for (key, item) in map {
                // A CVC the card does not have leaves its field out, as a PSP expects of a
                // payment with a stored card; a holder name likewise.
                if missing_whole(item, card) {
                    continue;
                }
                if !first {
                    let _ = out.write_all(b",");
                }
                first = false;
                let _ = serde_json::to_writer(&mut *out, key);
                let _ = out.write_all(b":");
                write_json(out, item, card);
            }
            let _ = out.write_all(b"}");
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// A string value that is exactly one placeholder whose field the card lacks.
fn missing_whole(value: &Value, card: &Card<'_>) -> bool {
    let Value::String(s) = value else {
        return false;
    };
    match pieces(s).as_deref() {
        Ok([Piece::Card(p)]) => {
            let mut scratch = Zeroizing::new(String::new());
            card.value(p.field, &mut scratch).is_none()
        }
        _ => false,
    }
}

fn write_json_string<W: Write>(out: &mut W, text: &str, card: &Card<'_>) {
    let Ok(pieces) = pieces(text) else {
        // Checked before: not reached. Sent as written.
        let _ = serde_json::to_writer(&mut *out, text);
        return;
    };
    let mut value = Zeroizing::new(String::with_capacity(128));
    if let [Piece::Card(p)] = pieces.as_slice() {
        if p.number {
            let _ = card.value(p.field, &mut value);
            let digits = value.trim_start_matches('0');
            let _ = out.write_all(if digits.is_empty() {
                b"0"
            } else {
                digits.as_bytes()
            });
            return;
        }
    }
    let _ = out.write_all(b"\"");
    for piece in &pieces {
        match piece {
            Piece::Text(t) => escape_json(out, t),
            Piece::Card(p) => {
                value.clear();
                let _ = card.value(p.field, &mut value);
                escape_json(out, &value);
            }
        }
    }
    let _ = out.write_all(b"\"");
}

/// The inside of a JSON string: quote, backslash and control characters escaped.
fn escape_json<W: Write>(out: &mut W, text: &str) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let escaped: Option<&[u8]> = match c {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            c if (c as u32) < 0x20 => None,
            _ => continue,
        };
        let _ = out.write_all(text.get(start..i).unwrap_or("").as_bytes());
        match escaped {
            Some(e) => {
                let _ = out.write_all(e);
            }
            None => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
        }
        start = i + c.len_utf8();
    }
    let _ = out.write_all(text.get(start..).unwrap_or("").as_bytes());
}

fn write_form<W: Write>(out: &mut W, body: &Value, card: &Card<'_>) {
    let Value::Object(fields) = body else { return };
    let mut first = true;
    let mut value = Zeroizing::new(String::with_capacity(128));
    for (key, item) in fields {
        if missing_whole(item, card) {
            continue;
        }
        if !first {
            let _ = out.write_all(b"&");
        }
        first = false;
        escape_form(out, key);
        let _ = out.write_all(b"=");
        match item {
            Value::String(s) => {
                for piece in pieces(s).unwrap_or_default() {
                    match piece {
                        Piece::Text(t) => escape_form(out, t),
                        Piece::Card(p) => {
                            value.clear();
                            let _ = card.value(p.field, &mut value);
                            escape_form(out, &value);
                        }
                    }
                }
            }
            Value::Null => {}
            other => escape_form(out, &other.to_string()),
        }
    }
}

/// `application/x-www-form-urlencoded`: letters, digits and `*-._` as they are, space as
/// `+`, every other byte as `%XX`.
fn escape_form<W: Write>(out: &mut W, text: &str) {
    for b in text.bytes() {
        let _ = match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.write_all(&[b])
            }
            b' ' => out.write_all(b"+"),
            _ => write!(out, "%{b:02X}"),
        };
    }
}

/// Masks what the PSP answers before the caller sees it.
pub struct Masker<'a> {
    /// The digits of the card sent.
    pub pan: &'a str,
    /// Credentials the vault added to the request, longest first (a whole header value
    /// before the token inside it).
    pub secrets: Vec<&'a str>,
    /// Field names whose values only the card-sent rule applies to.
    pub unmasked_fields: &'a HashSet<String>,
    /// The CVC sent, if one was: a JSON value equal to it is masked wherever it stands (a
    /// caller could put `{{card.cvc}}` in a field the PSP echoes, a description say).
    pub cvc: Option<&'a str>,
}

/// Field names a PSP may echo a CVC under (compared without case, `_` or `-`).
const CVC_FIELDS: &[&str] = &[
    "cvc",
    "cvv",
    "cvc2",
    "cvv2",
    "csc",
    "cid",
    "cvn",
    "cvd",
    "securitycode",
    "cardsecuritycode",
    "verificationvalue",
    "cardverificationvalue",
];

impl Masker<'_> {
    /// Text with every PAN-shaped run of digits masked, and credentials redacted.
    pub fn text(&self, text: &str, exempt: bool) -> String {
        let mut masked = self.digits(text, exempt);
        for secret in &self.secrets {
            if secret.len() >= 4 && masked.contains(secret) {
                masked = masked.replace(secret, "[redacted]");
            }
        }
        masked
    }

    /// Runs of ASCII digits, with single spaces or dashes between them, are masked to their
    /// last four when they hold 12-19 digits and pass the Luhn check, when they are longer
    /// than 19 digits (a PAN may hide inside), or when they hold the card sent.
    fn digits(&self, text: &str, exempt: bool) -> String {
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < bytes.len() {
            let Some(&b) = bytes.get(i) else { break };
            if !b.is_ascii_digit() {
                let next = text
                    .get(i..)
                    .and_then(|rest| rest.find(|c: char| c.is_ascii_digit()))
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(text.get(i..next).unwrap_or(""));
                i = next;
                continue;
            }
            // The run: groups of digits, with single separators between them.
            let start = i;
            let mut end = i;
            let mut groups: Vec<&str> = Vec::new();
            let mut group_start = i;
            while let Some(&c) = bytes.get(end) {
                if c.is_ascii_digit() {
                    end += 1;
                } else if matches!(c, b' ' | b'-')
                    && bytes.get(end + 1).is_some_and(u8::is_ascii_digit)
                {
                    groups.push(text.get(group_start..end).unwrap_or(""));
                    end += 1;
                    group_start = end;
                } else {
                    break;
                }
            }
            groups.push(text.get(group_start..end).unwrap_or(""));
            let run = text.get(start..end).unwrap_or("");
            if self.masks(&groups, exempt) {
                let digits = run.bytes().filter(u8::is_ascii_digit).count();
                let keep = digits.saturating_sub(4);
                let mut seen = 0;
                for c in run.chars() {
                    if c.is_ascii_digit() {
                        out.push(if seen < keep { '*' } else { c });
                        seen += 1;
                    } else {
                        out.push(c);
                    }
                }
            } else {
                out.push_str(run);
            }
            i = end;
        }
        out
    }

    /// Whether a run (its groups of digits) is masked: when it holds the card sent; else,
    /// unless exempt, when a group is longer than any PAN (one may hide inside), or when any
    /// groups in a row make 12-19 digits that pass the Luhn check (a PAN written in groups,
    /// or followed by its CVC).
    fn masks(&self, groups: &[&str], exempt: bool) -> bool {
        let all = groups.concat();
        if !self.pan.is_empty() && all.contains(self.pan) {
            return true;
        }
        if exempt {
            return false;
        }
        if groups.iter().any(|g| g.len() > 19) {
            return true;
        }
        let mut joined = String::with_capacity(all.len());
        for first in 0..groups.len() {
            joined.clear();
            for group in groups.get(first..).unwrap_or(&[]) {
                joined.push_str(group);
                if joined.len() > 19 {
                    break;
                }
                if joined.len() >= 12 && crate::card::luhn_valid(joined.as_bytes()) {
                    return true;
                }
            }
        }
        false
    }

    /// Masks a JSON answer in place: strings, long integers, and object keys.
    pub fn json(&self, value: &mut Value) {
        self.json_under(value, false);
    }

    fn json_under(&self, value: &mut Value, exempt: bool) {
        let is_cvc = |text: &str| self.cvc.is_some_and(|c| c == text);
        match value {
            Value::String(s) if is_cvc(s) => {
                zeroize::Zeroize::zeroize(s);
                *s = "***".into();
            }
            Value::Number(n) if is_cvc(&n.to_string()) => *value = Value::String("***".into()),
            Value::String(s) => {
                let masked = self.text(s, exempt);
                if masked != *s {
                    // What the PSP sent may hold a card: wiped, not just dropped.
                    zeroize::Zeroize::zeroize(s);
                    *s = masked;
                }
            }
            Value::Number(n) => {
                let text = n.to_string();
                if text.bytes().all(|b| b.is_ascii_digit()) {
                    let masked = self.text(&text, exempt);
                    if masked != text {
                        *value = Value::String(masked);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.json_under(v, exempt)),
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (key, mut item) in entries {
                    let plain: String = key
                        .chars()
                        .filter(|c| *c != '_' && *c != '-')
                        .flat_map(char::to_lowercase)
                        .collect();
                    let cvc_like = CVC_FIELDS.contains(&plain.as_str())
                        && match &item {
                            Value::String(s) => {
                                (3..=4).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
                            }
                            Value::Number(n) => n.as_u64().is_some_and(|n| n < 10_000),
                            _ => false,
                        };
                    if cvc_like {
                        item = Value::String("***".into());
                    } else {
                        self.json_under(&mut item, self.unmasked_fields.contains(&key));
                    }
                    map.insert(self.text(&key, false), item);
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn card() -> Card<'static> {
        Card {
            number: "4242424242424242",
            exp_month: 3,
            exp_year: 2031,
            cvc: Some("012"),
            holder_name: Some("Ada \"Countess\" Lovelace"),
        }
    }

    #[test]
    fn placeholders_fill_json_string_values_only() {
        let body = serde_json::json!({
            "amount": 1000,
            "{{card.number}}": "key is not filled",
            "card": {"number": "{{card.number}}", "exp": "{{ card.exp_month }}/{{card.exp_year2}}",
                     "exp_month": "{{card.exp_month | number}}", "exp_year": "{{card.exp_year}}",
                     "cvc": "{{card.cvc}}", "name": "{{card.holder_name}}"},
            "list": ["{{card.exp_year|number}}", true, null]
        });
        assert_eq!(check(&body, false), Ok(true));
        let out = render_json(&body, &card());
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["card"]["number"], "4242424242424242");
        assert_eq!(parsed["card"]["exp"], "03/31");
        assert_eq!(parsed["card"]["exp_month"], 3);
        assert_eq!(parsed["card"]["exp_year"], "2031");
        assert_eq!(parsed["card"]["cvc"], "012");
        assert_eq!(parsed["card"]["name"], "Ada \"Countess\" Lovelace");
        assert_eq!(parsed["list"][0], 2031);
        assert_eq!(parsed["{{card.number}}"], "key is not filled");
        assert_eq!(parsed["amount"], 1000);
        // Sized once: no reallocation left a copy behind.
        assert_eq!(out.len(), out.capacity());
    }

    #[test]
    fn a_missing_cvc_leaves_its_field_out() {
        let body = serde_json::json!({"cvc": "{{card.cvc}}", "number": "{{card.number}}"});
        let no_cvc = Card {
            cvc: None,
            holder_name: None,
            ..card()
        };
        let parsed: Value = serde_json::from_slice(&render_json(&body, &no_cvc)).unwrap();
        assert_eq!(parsed, serde_json::json!({"number": "4242424242424242"}));
        let form = render_form(&body, &no_cvc);
        assert_eq!(&form[..], b"number=4242424242424242");
    }

    #[test]
    fn form_values_are_encoded_for_forms() {
        let body = serde_json::json!({"card[number]": "{{card.number}}", "card[name]": "{{card.holder_name}}", "amount": 1000, "note": "a&b=c"});
        assert_eq!(check(&body, true), Ok(false));
        let out = render_form(&body, &card());
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "amount=1000&card%5Bname%5D=Ada+%22Countess%22+Lovelace&card%5Bnumber%5D=4242424242424242&note=a%26b%3Dc"
        );
        assert_eq!(out.len(), out.capacity());
        assert_eq!(
            check(&serde_json::json!({"card": {"n": 1}}), true),
            Err(TemplateError::FormBody)
        );
        assert_eq!(
            check(&serde_json::json!([1]), true),
            Err(TemplateError::FormBody)
        );
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        for bad in [
            "{{card.pan}}",
            "{{card.number",
            "{{card.number|number}}",
            "{{card.cvc | number}}",
            "{{card.exp_month | upper}}",
            "{{}}",
            "{{ secrets.key }}",
        ] {
            assert_eq!(
                check(&serde_json::json!({ "x": bad }), false),
                Err(TemplateError::Placeholder),
                "{bad}"
            );
        }
    }

    fn masker(unmasked: &HashSet<String>) -> Masker<'_> {
        Masker {
            pan: "4242424242424242",
            secrets: vec!["sk_live_secret123"],
            unmasked_fields: unmasked,
            cvc: None,
        }
    }

    #[test]
    fn the_cvc_sent_is_masked_in_any_json_field() {
        let none = HashSet::new();
        let m = Masker {
            cvc: Some("737"),
            ..masker(&none)
        };
        let mut v =
            serde_json::json!({"description": "737", "n": 737, "amount": 1000, "other": "738"});
        m.json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"description": "***", "n": "***", "amount": 1000, "other": "738"})
        );
    }

    #[test]
    fn answers_are_masked() {
        let none = HashSet::new();
        let m = masker(&none);
        assert_eq!(
            m.text("card 4242424242424242 ok", false),
            "card ************4242 ok"
        );
        assert_eq!(m.text("4242 4242 4242 4242", false), "**** **** **** 4242");
        assert_eq!(m.text("5555-5555-5555-4444", false), "****-****-****-4444");
        // Not Luhn-valid: a reference number stays.
        assert_eq!(
            m.text("ref 1234567890123456", false),
            "ref 1234567890123456"
        );
        // Longer than any PAN: masked, a PAN could hide in it.
        assert_eq!(
            m.text("42424242424242421234", false),
            "****************1234"
        );
        assert_eq!(
            m.text("Bearer sk_live_secret123", false),
            "Bearer [redacted]"
        );
        assert_eq!(
            m.text("amount 1000, year 2031", false),
            "amount 1000, year 2031"
        );
        let mut v = serde_json::json!({
            "number": 4242424242424242u64, "echo": {"pan": "4242424242424242", "cvc": "012", "cvc_check": "pass"},
            "4242424242424242": "key", "id": 5555555555554444u64
        });
        m.json(&mut v);
        assert_eq!(v["number"], "************4242");
        assert_eq!(v["echo"]["pan"], "************4242");
        assert_eq!(v["echo"]["cvc"], "***");
        assert_eq!(v["echo"]["cvc_check"], "pass");
        assert_eq!(v["************4242"], "key");
        assert_eq!(v["id"], "************4444");
    }

    #[test]
    fn unmasked_fields_still_hide_the_card_sent() {
        let fields: HashSet<String> = ["pspReference".to_owned()].into();
        let m = masker(&fields);
        let mut v =
            serde_json::json!({"pspReference": "8815658961765255", "other": "8815658961765255"});
        assert!(crate::card::luhn_valid(b"8815658961765255"));
        m.json(&mut v);
        assert_eq!(v["pspReference"], "8815658961765255");
        assert_eq!(v["other"], "************5255");
        let mut echo = serde_json::json!({"pspReference": "4242424242424242"});
        m.json(&mut echo);
        assert_eq!(echo["pspReference"], "************4242");
    }

    proptest! {
        /// Whatever the text, no Luhn-valid 12-19 digit run survives the mask.
        #[test]
        fn no_pan_survives_the_mask(text in "[0-9 a-]{0,60}") {
            let none = HashSet::new();
            let masked = masker(&none).text(&text, false);
            for run in masked.split(|c: char| !c.is_ascii_digit()) {
                prop_assert!(run.len() <= 19, "{masked}");
                prop_assert!(!(run.len() >= 12 && crate::card::luhn_valid(run.as_bytes())), "{masked}");
            }
        }

        #[test]
        fn templates_never_panic(text in any::<String>()) {
            let body = serde_json::json!({"x": text});
            if check(&body, true).is_ok() {
                let _ = render_json(&body, &card());
                let _ = render_form(&body, &card());
            }
        }
    }
}
