//! The rows of a card file: CSV with a header row, or JSON Lines, parsed from decrypted bytes
//! in memory that is wiped, into cards checked as tokenization checks them. A bad row is an
//! error code for that row, never the end of the file, and never an echo of what it held.

use std::io::{BufRead, Read};

use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use crate::card::{Expiry, HolderName, Pan};
use crate::customer::{FieldError, Profile, ProfilePatch, Recurring};

/// The columns of an import file and of an export (which adds `customer` and `token`).
pub const COLUMNS: [&str; 10] = [
    "number",
    "exp_month",
    "exp_year",
    "holder_name",
    "customer_ref",
    "email",
    "name",
    "phone",
    "network_transaction_id",
    "recurring_model",
];

/// One record's size limit: a record longer than this (an unclosed quote, a binary file) is
/// a `malformed_row`, and reading resumes at the next line.
const MAX_RECORD: usize = 16 * 1024;
/// The longest `customer_ref` kept (it is stored in the customer's metadata, which allows 500).
const MAX_REF: usize = 200;

/// A row that parsed: what becomes a customer and a customer token.
pub struct ImportRow {
    pub pan: Pan,
    pub expiry: Expiry,
    pub holder_name: Option<HolderName>,
    pub customer_ref: Option<String>,
    pub profile: Profile,
    pub recurring: Option<Recurring>,
}

redacted_debug!(ImportRow);

/// Why a row was refused: a stable code, written to the results file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowError {
    Malformed,
    InvalidNumber,
    InvalidExpiry,
    InvalidHolderName,
    InvalidCustomerRef,
    InvalidEmail,
    InvalidName,
    InvalidPhone,
    InvalidRecurringModel,
    InvalidNetworkTransactionId,
}

impl RowError {
    pub fn code(self) -> &'static str {
        match self {
            RowError::Malformed => "malformed_row",
            RowError::InvalidNumber => "invalid_number",
            RowError::InvalidExpiry => "invalid_expiry",
            RowError::InvalidHolderName => "invalid_holder_name",
            RowError::InvalidCustomerRef => "invalid_customer_ref",
            RowError::InvalidEmail => "invalid_email",
            RowError::InvalidName => "invalid_name",
            RowError::InvalidPhone => "invalid_phone",
            RowError::InvalidRecurringModel => "invalid_recurring_model",
            RowError::InvalidNetworkTransactionId => "invalid_network_transaction_id",
        }
    }
}

/// Why a whole file was refused before any row was imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("the file is empty")]
    Empty,
    #[error("the header row lacks the required column {0}")]
    MissingColumn(&'static str),
    #[error("the header row is malformed or names a column twice")]
    BadHeader,
}

impl FileError {
    pub fn code(&self) -> &'static str {
        match self {
            FileError::Empty => "empty_file",
            FileError::MissingColumn(_) => "missing_column",
            FileError::BadHeader => "invalid_header",
        }
    }
}

/// A `BufRead` whose buffer is wiped when it is dropped (the decrypted file passes through it).
pub struct WipingReader<R> {
    inner: R,
    buf: Zeroizing<Vec<u8>>,
    pos: usize,
    filled: usize,
}

impl<R: Read> WipingReader<R> {
    pub fn new(inner: R) -> WipingReader<R> {
        WipingReader {
            inner,
            buf: Zeroizing::new(vec![0; 64 * 1024]),
            pos: 0,
            filled: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

impl<R: Read> Read for WipingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = copy_out(Some(self.fill_buf()?), out);
        self.consume(n);
        Ok(n)
    }
}

/// Copies as much of `from` as `out` takes (for `Read` impls over a buffer); how much.
pub fn copy_out(from: Option<&[u8]>, out: &mut [u8]) -> usize {
    let from = from.unwrap_or_default();
    let n = from.len().min(out.len());
    if let (Some(to), Some(from)) = (out.get_mut(..n), from.get(..n)) {
        to.copy_from_slice(from);
    }
    n
}

impl<R: Read> BufRead for WipingReader<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.pos >= self.filled {
            self.buf.zeroize_used(self.filled);
            self.filled = self.inner.read(&mut self.buf)?;
            self.pos = 0;
        }
        Ok(self.buf.get(self.pos..self.filled).unwrap_or_default())
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.filled);
    }
}

trait ZeroizeUsed {
    fn zeroize_used(&mut self, used: usize);
}

impl ZeroizeUsed for Vec<u8> {
    fn zeroize_used(&mut self, used: usize) {
        if let Some(part) = self.get_mut(..used) {
            part.zeroize();
        }
    }
}

/// Reads rows one at a time from a decrypted file.
pub struct Rows<R> {
    input: R,
    format: Format,
    /// The raw record, and its fields unquoted, in wiped memory.
    line: Zeroizing<Vec<u8>>,
    fields: Zeroizing<Vec<u8>>,
    ranges: Vec<std::ops::Range<usize>>,
    /// For CSV: which field holds each of `COLUMNS` (None: the column is absent).
    index: [Option<usize>; COLUMNS.len()],
    /// Data rows read so far (the header row is not one).
    pub row: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    JsonLines,
}

/// One item of the file: a row's number and what it gave.
pub type Item = (u64, Result<ImportRow, RowError>);

impl<R: BufRead> Rows<R> {
    /// What the rows are read from (after the last row: to check a signature).
    pub fn reader(&self) -> &R {
        &self.input
    }

    /// Reads the header row (CSV), or recognises JSON Lines by a first line that opens with `{`.
    pub fn new(mut input: R) -> Result<Rows<R>, std::io::Result<FileError>> {
        let format = loop {
            let head = input.fill_buf().map_err(Err)?;
            match head.first() {
                None => return Err(Ok(FileError::Empty)),
                // A byte-order mark, or blank lines before the first row.
                Some(b'\xEF' | b'\xBB' | b'\xBF' | b'\r' | b'\n' | b' ' | b'\t') => {
                    input.consume(1)
                }
                Some(b'{') => break Format::JsonLines,
                Some(_) => break Format::Csv,
            }
        };
        let mut rows = Rows {
            input,
            format,
            // Room for the longest record (and the byte past it that marks it too long), so
            // neither buffer ever grows and leaves a copy of a row behind.
            line: Zeroizing::new(Vec::with_capacity(MAX_RECORD + 1)),
            fields: Zeroizing::new(Vec::with_capacity(MAX_RECORD + 1)),
            ranges: Vec::with_capacity(COLUMNS.len()),
            index: [None; COLUMNS.len()],
            row: 0,
        };
        if format == Format::Csv {
            if !rows.read_record().map_err(Err)? {
                return Err(Ok(FileError::Empty));
            }
            if !rows.split_csv() {
                return Err(Ok(FileError::BadHeader));
            }
            for (i, range) in rows.ranges.iter().enumerate() {
                let name = rows
                    .fields
                    .get(range.clone())
                    .map(|n| String::from_utf8_lossy(n).trim().to_ascii_lowercase())
                    .unwrap_or_default();
                if let Some(c) = COLUMNS.iter().position(|c| *c == name) {
                    let slot = rows.index.get_mut(c).ok_or(Ok(FileError::BadHeader))?;
                    if slot.is_some() {
                        return Err(Ok(FileError::BadHeader));
                    }
                    *slot = Some(i);
                }
            }
            for (c, name) in COLUMNS.iter().enumerate().take(3) {
                if rows.index.get(c).copied().flatten().is_none() {
                    return Err(Ok(FileError::MissingColumn(name)));
                }
            }
        }
        Ok(rows)
    }

    /// The next row, `None` at the end of the file. An I/O error (a damaged file) is returned
    /// as is and ends the reading.
    pub fn next_row(&mut self, today: (u16, u8)) -> std::io::Result<Option<Item>> {
        loop {
            if !self.read_record()? {
                return Ok(None);
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines are not rows
            }
            self.row += 1;
            let parsed = match self.format {
                Format::Csv => self.csv_row(today),
                Format::JsonLines => self.json_row(today),
            };
            return Ok(Some((self.row, parsed)));
        }
    }

    /// Reads one line into `line`. `false` at the end of the file. A record is one line: a
    /// quoted field may hold commas and quotes, not line breaks, so that a stray quote costs
    /// its own row and never swallows the rows after it.
    fn read_record(&mut self) -> std::io::Result<bool> {
        // The bytes used are wiped; the buffer never grows, so no row lies beyond them (its
        // whole capacity is wiped when it is dropped).
        self.line.as_mut_slice().zeroize();
        self.line.clear();
        let (n, ended) = read_line_bounded(&mut self.input, &mut self.line, MAX_RECORD)?;
        if n == 0 {
            return Ok(false);
        }
        if self.line.len() > MAX_RECORD {
            // Far too long: drop it and what is left of its line; the row is malformed.
            self.line.as_mut_slice().zeroize();
            self.line.clear();
            self.line.extend_from_slice(b"\x00");
            if !ended {
                skip_line(&mut self.input)?;
            }
        }
        Ok(true)
    }

    /// Splits `line` as one RFC 4180 record (without line breaks in fields) into
    /// `fields`/`ranges`; `false` if malformed.
    fn split_csv(&mut self) -> bool {
        self.fields.as_mut_slice().zeroize();
        self.fields.clear();
        self.ranges.clear();
        let mut line: &[u8] = &self.line;
        while let Some(stripped) = line
            .strip_suffix(b"\n")
            .or_else(|| line.strip_suffix(b"\r"))
        {
            line = stripped;
        }
        let mut i = 0;
        loop {
            let start = self.fields.len();
            if line.get(i) == Some(&b'"') {
                i += 1;
                loop {
                    match line.get(i) {
                        None => return false,
                        Some(b'"') if line.get(i + 1) == Some(&b'"') => {
                            self.fields.push(b'"');
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b) => {
                            self.fields.push(*b);
                            i += 1;
                        }
                    }
                }
                match line.get(i) {
                    None | Some(b',') => {}
                    Some(_) => return false,
                }
            } else {
                while let Some(b) = line.get(i) {
                    if *b == b',' {
                        break;
                    }
                    if *b == b'"' {
                        return false;
                    }
                    self.fields.push(*b);
                    i += 1;
                }
            }
            self.ranges.push(start..self.fields.len());
            if self.ranges.len() > 64 {
                return false;
            }
            match line.get(i) {
                Some(b',') => i += 1,
                _ => return true,
            }
        }
    }

    fn csv_row(&mut self, today: (u16, u8)) -> Result<ImportRow, RowError> {
        if !self.split_csv() {
            return Err(RowError::Malformed);
        }
        let width = self.index.iter().flatten().max().map_or(0, |m| m + 1);
        if self.ranges.len() < width {
            return Err(RowError::Malformed);
        }
        let field = |c: usize| -> Result<Option<&str>, RowError> {
            let Some(i) = self.index.get(c).copied().flatten() else {
                return Ok(None);
            };
            let range = self.ranges.get(i).ok_or(RowError::Malformed)?;
            let bytes = self.fields.get(range.clone()).ok_or(RowError::Malformed)?;
            let text = std::str::from_utf8(bytes).map_err(|_| RowError::Malformed)?;
            Ok(Some(text.trim()).filter(|t| !t.is_empty()))
        };
        build(
            [
                field(0)?,
                field(1)?,
                field(2)?,
                field(3)?,
                field(4)?,
                field(5)?,
                field(6)?,
                field(7)?,
                field(8)?,
                field(9)?,
            ],
            today,
        )
    }

    fn json_row(&mut self, today: (u16, u8)) -> Result<ImportRow, RowError> {
        let row: JsonRow = serde_json::from_slice(&self.line).map_err(|_| RowError::Malformed)?;
        let month = row.exp_month.as_ref().map(Text::get);
        let year = row.exp_year.as_ref().map(Text::get);
        fn s(v: &Option<Zeroizing<String>>) -> Option<&str> {
            v.as_deref().map(|t| t.trim()).filter(|t| !t.is_empty())
        }
        build(
            [
                s(&row.number),
                month.as_deref().map(|t| t.trim()),
                year.as_deref().map(|t| t.trim()),
                s(&row.holder_name),
                s(&row.customer_ref),
                s(&row.email),
                s(&row.name),
                s(&row.phone),
                s(&row.network_transaction_id),
                s(&row.recurring_model),
            ],
            today,
        )
    }
}

/// `read_until(b'\n')` that stops adding once `line` passes `limit` (so one huge line cannot
/// take memory); returns the bytes consumed, and whether the line's end was.
fn read_line_bounded<R: BufRead>(
    input: &mut R,
    line: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<(usize, bool)> {
    let mut total = 0;
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok((total, true));
        }
        let (take, done) = match memchr_newline(available) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let room = limit.saturating_add(1).saturating_sub(line.len());
        line.extend_from_slice(available.get(..take.min(room)).unwrap_or_default());
        input.consume(take);
        total += take;
        if done || line.len() > limit {
            return Ok((total, done));
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

fn skip_line<R: BufRead>(input: &mut R) -> std::io::Result<()> {
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok(());
        }
        match memchr_newline(available) {
            Some(i) => {
                input.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = available.len();
                input.consume(n);
            }
        }
    }
}

/// A JSON Lines row; card data in strings that are wiped.
#[derive(Deserialize)]
struct JsonRow {
    number: Option<Zeroizing<String>>,
    exp_month: Option<Text>,
    exp_year: Option<Text>,
    holder_name: Option<Zeroizing<String>>,
    customer_ref: Option<Zeroizing<String>>,
    email: Option<Zeroizing<String>>,
    name: Option<Zeroizing<String>>,
    phone: Option<Zeroizing<String>>,
    network_transaction_id: Option<Zeroizing<String>>,
    recurring_model: Option<Zeroizing<String>>,
}

/// A value given as a string or a number (`"exp_month": 4` or `"04"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Number(u64),
    Text(Zeroizing<String>),
}

impl Text {
    fn get(&self) -> Zeroizing<String> {
        match self {
            Text::Number(n) => Zeroizing::new(n.to_string()),
            Text::Text(t) => t.clone(),
        }
    }
}

/// A row from its ten column values (in `COLUMNS` order, blank as `None`).
fn build(values: [Option<&str>; 10], today: (u16, u8)) -> Result<ImportRow, RowError> {
    let [number, month, year, holder, customer_ref, email, name, phone, nti, model] = values;
    let pan =
        Pan::parse(number.ok_or(RowError::InvalidNumber)?).map_err(|_| RowError::InvalidNumber)?;
    let number = |v: Option<&str>| {
        v.and_then(|v| v.parse::<u64>().ok())
            .ok_or(RowError::InvalidExpiry)
    };
    let expiry =
        Expiry::parse(number(month)?, number(year)?, today).map_err(|_| RowError::InvalidExpiry)?;
    let holder_name = holder
        .map(HolderName::parse)
        .transpose()
        .map_err(|_| RowError::InvalidHolderName)?;
    let customer_ref = match customer_ref {
        Some(r)
            if r.chars().count() <= MAX_REF
                && !r.chars().any(char::is_control)
                && !crate::card::contains_pan(r) =>
        {
            Some(r.to_owned())
        }
        Some(_) => return Err(RowError::InvalidCustomerRef),
        None => None,
    };
    let mut profile = Profile::default();
    let field_error = |e: FieldError, text: RowError| match e {
        FieldError::Email => RowError::InvalidEmail,
        FieldError::Phone => RowError::InvalidPhone,
        _ => text,
    };
    ProfilePatch::contact(email, name, phone)
        .apply(&mut profile)
        .map_err(|e| field_error(e, RowError::InvalidName))?;
    if let Some(r) = &customer_ref {
        profile.metadata.insert("customer_ref".into(), r.clone());
    }
    let recurring = match (model, nti) {
        (None, None) => None,
        (model, nti) => Some(
            Recurring {
                model: model.unwrap_or("unscheduled").to_owned(),
                scheme_transaction_id: nti.map(str::to_owned),
            }
            .parse()
            .map_err(|e| match e {
                FieldError::RecurringModel => RowError::InvalidRecurringModel,
                _ => RowError::InvalidNetworkTransactionId,
            })?,
        ),
    };
    Ok(ImportRow {
        pan,
        expiry,
        holder_name,
        customer_ref,
        profile,
        recurring,
    })
}

/// A field for a CSV line: quoted when it holds a comma, a quote or a line break.
pub fn csv_field(out: &mut Vec<u8>, value: &str) {
    if value
        .bytes()
        .any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'))
    {
        out.push(b'"');
        for b in value.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(value.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TODAY: (u16, u8) = (2026, 12);

    fn all(text: &str) -> Vec<(u64, Result<ImportRow, RowError>)> {
        let mut rows = Rows::new(text.as_bytes()).unwrap();
        let mut out = Vec::new();
        while let Some(item) = rows.next_row(TODAY).unwrap() {
            out.push(item);
        }
        out
    }

    fn codes(text: &str) -> Vec<Result<(), &'static str>> {
        all(text)
            .into_iter()
            .map(|(_, r)| r.map(|_| ()).map_err(RowError::code))
            .collect()
    }

    #[test]
    fn csv_rows_parse_with_quotes_any_column_order_and_blank_optionals() {
        let text = "exp_year,number,exp_month,customer_ref,email,name\r\n\
                    2030,4242424242424242,4,c-1,ada@example.com,\"Lovelace, Ada\"\r\n\
                    \r\n\
                    31,5555555555554444,12,\"c \"\"2\"\"\",,\n";
        let rows = all(text);
        assert_eq!(rows.len(), 2);
        let (n, first) = &rows[0];
        let first = first.as_ref().unwrap();
        assert_eq!(*n, 1);
        assert_eq!(first.pan.last4(), "4242");
        assert_eq!((first.expiry.month(), first.expiry.year()), (4, 2030));
        assert_eq!(first.customer_ref.as_deref(), Some("c-1"));
        assert_eq!(first.profile.name.as_deref(), Some("Lovelace, Ada"));
        assert_eq!(first.profile.metadata["customer_ref"], "c-1");
        let (n, second) = &rows[1];
        let second = second.as_ref().unwrap();
        assert_eq!(*n, 2);
        assert_eq!(second.expiry.year(), 2031);
        assert_eq!(second.customer_ref.as_deref(), Some("c \"2\""));
        assert_eq!(second.profile.email, None);
    }

    #[test]
    fn bad_rows_get_their_code_and_the_rest_still_parse() {
        let text =
            "number,exp_month,exp_year,recurring_model,network_transaction_id,customer_ref\n\
                    4242424242424241,4,2030,,,\n\
                    4242424242424242,4,2020,,,\n\
                    4242424242424242,13,2030,,,\n\
                    4242424242424242,4,2030,weekly,,\n\
                    4242424242424242,4,2030,,bad id!,\n\
                    4242424242424242,4,2030,,,4111111111111111\n\
                    4242424242424242,\"4,2030,,,\n\
                    4242424242424242,4\n\
                    ,4,2030,,,\n\
                    4242424242424242,4,2030,subscription,ABC123,x\n";
        assert_eq!(
            codes(text),
            vec![
                Err("invalid_number"),
                Err("invalid_expiry"),
                Err("invalid_expiry"),
                Err("invalid_recurring_model"),
                Err("invalid_network_transaction_id"),
                Err("invalid_customer_ref"),
                Err("malformed_row"),
                Err("malformed_row"),
                Err("invalid_number"),
                Ok(()),
            ]
        );
    }

    #[test]
    fn a_missing_required_column_refuses_the_file() {
        for (text, missing) in [
            ("number,exp_month\n4242424242424242,4\n", "exp_year"),
            ("pan,exp_month,exp_year\n", "number"),
        ] {
            match Rows::new(text.as_bytes()) {
                Err(Ok(FileError::MissingColumn(c))) => assert_eq!(c, missing),
                _ => panic!("{text:?} was not refused"),
            }
        }
        assert!(matches!(Rows::new(&b""[..]), Err(Ok(FileError::Empty))));
        assert!(matches!(
            Rows::new(&b"number,number,exp_month,exp_year\n"[..]),
            Err(Ok(FileError::BadHeader))
        ));
    }

    #[test]
    fn json_lines_take_numbers_or_strings() {
        let text = "{\"number\":\"4242424242424242\",\"exp_month\":4,\"exp_year\":\"2030\",\"customer_ref\":\"c-9\",\"recurring_model\":\"installment\"}\n\
                    {\"number\":\"4242\",\"exp_month\":4,\"exp_year\":2030}\n\
                    not json\n";
        let rows = all(text);
        let first = rows[0].1.as_ref().unwrap();
        assert_eq!(first.customer_ref.as_deref(), Some("c-9"));
        assert_eq!(first.recurring.as_ref().unwrap().model, "installment");
        assert_eq!(rows[1].1.as_ref().err(), Some(&RowError::InvalidNumber));
        assert_eq!(rows[2].1.as_ref().err(), Some(&RowError::Malformed));
    }

    #[test]
    fn an_overlong_record_is_one_malformed_row() {
        let mut text = String::from("number,exp_month,exp_year\n\"");
        text.push_str(&"9".repeat(MAX_RECORD * 2));
        text.push_str("\n4242424242424242,4,2030\n");
        let rows = codes(&text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.first(), Some(&Err("malformed_row")));
        assert_eq!(rows.last(), Some(&Ok(())));
    }

    #[test]
    fn the_wiping_reader_reads_what_it_wraps() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        WipingReader::new(&data[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
    }
}
