//! Property-based fuzzing of the parsers and decoders that see untrusted bytes: they never
//! panic, and what they accept round-trips. CI runs the default 256 cases per property; for a
//! longer run: `PROPTEST_CASES=100000 cargo test --lib fuzz`. A failure proptest finds is
//! kept as a named regression case below it.

use proptest::prelude::*;

use crate::card::{contains_pan, luhn_complete, Cvc, Expiry, HolderName, Pan};
use crate::policy::Policy;
use crate::store::{CardRecord, CustomerRecord, IdempotencyRecord, TokenRecord};
use crate::tokens::{ObjectId, Project};

proptest! {
    #[test]
    fn card_parsers_never_panic(s in any::<String>(), m in any::<u64>(), y in any::<u64>()) {
        let _ = Pan::parse(&s);
        let _ = Cvc::parse(&s);
        let _ = HolderName::parse(&s);
        let _ = contains_pan(&s);
        let _ = Expiry::parse(m, y, (2026, 11));
        let _ = ObjectId::parse(&s);
        let _ = Project::parse(&s);
    }

    #[test]
    fn every_luhn_valid_number_parses_in_every_written_form(
        prefix in "[1-9][0-9]{10,17}",
        sep in prop::sample::select(vec!["", " ", "-"]),
    ) {
        let pan = luhn_complete(&prefix, prefix.len() + 1);
        let grouped: Vec<String> = pan.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        let parsed = Pan::parse(&grouped.join(sep)).unwrap();
        prop_assert_eq!(parsed.expose_digits(), pan.as_str());
        prop_assert!(contains_pan(&pan));
    }

    #[test]
    fn record_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = CardRecord::decode(&bytes);
        let _ = CustomerRecord::decode(&bytes);
        let _ = TokenRecord::decode(&bytes);
        let _ = IdempotencyRecord::decode(&bytes);
    }

    #[test]
    fn card_records_round_trip(
        created in any::<i64>(), expires in any::<i64>(), used in any::<Option<i64>>(),
        version in any::<u32>(), meta in prop::collection::vec(any::<u8>(), 1..64),
        pan in prop::option::of(prop::collection::vec(any::<u8>(), 1..64)),
    ) {
        let rec = CardRecord { created_at: created, expires_at: expires, used_at: used, key_version: version, meta, pan };
        prop_assert_eq!(CardRecord::decode(&rec.encode()).unwrap(), rec);
    }

    #[test]
    fn policy_parser_never_panics(text in any::<String>()) {
        let _ = Policy::parse(&[("fuzz.toml".into(), text)]);
    }

    #[test]
    fn policy_parser_never_panics_on_near_valid_input(
        name in any::<String>(), matcher in any::<String>(), perm in any::<String>(), project in any::<String>(),
    ) {
        let text = format!(
            "[[identity]]\nname = {name:?}\nuri_san = {matcher:?}\npermissions = [{perm:?}]\nprojects = [{project:?}]\n"
        );
        let _ = Policy::parse(&[("fuzz.toml".into(), text)]);
    }

    #[test]
    fn config_parser_never_panics(text in any::<String>()) {
        let _ = crate::config::Config::parse(&text, std::path::Path::new("/tmp"));
    }
}
