//! Invariants of the code base (ARCHITECTURE.md), checked by reading the source tree.

use std::path::{Path, PathBuf};

fn sources(under: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(under);
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.push((p, text));
        }
    }
    out
}

fn in_module(path: &Path, modules: &[&str]) -> bool {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    modules.iter().any(|m| path.starts_with(src.join(m)))
}

#[test]
fn only_api_and_server_know_actix() {
    for (path, text) in sources("src") {
        if !in_module(&path, &["api", "server.rs", "commands.rs", "tidy.rs"]) {
            assert!(!text.contains("actix"), "{} uses actix", path.display());
        }
    }
}

#[test]
fn crypto_and_card_depend_on_nothing_in_the_crate() {
    for (path, text) in sources("src") {
        if in_module(&path, &["crypto", "card.rs"]) {
            assert!(
                !text.contains("crate::"),
                "{} depends on the crate",
                path.display()
            );
        }
    }
}

#[test]
fn store_never_sees_card_data() {
    for (path, text) in sources("src/store") {
        for forbidden in ["crate::card", "Pan", "Cvc", "crate::crypto", "crate::vault"] {
            assert!(
                !text.contains(forbidden),
                "{} mentions {forbidden}",
                path.display()
            );
        }
    }
}

#[test]
fn only_policy_mints_grants() {
    for (path, text) in sources("src") {
        if !in_module(&path, &["policy", "tidy.rs"]) {
            assert!(
                !text.contains("Grant {"),
                "{} builds a Grant",
                path.display()
            );
        }
    }
}

#[test]
fn secret_types_do_not_derive_debug_or_serialize() {
    let card =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/card.rs")).unwrap();
    for ty in ["pub struct Pan", "pub struct Cvc", "pub struct SecretInput"] {
        let at = card.find(ty).unwrap();
        let derive_line = card[..at]
            .lines()
            .rev()
            .find(|l| l.starts_with("#[derive"))
            .unwrap();
        assert!(
            !derive_line.contains("Debug") && !derive_line.contains("Serialize"),
            "{ty}: {derive_line}"
        );
    }
}
