//! An external scanner's view of the TLS listener: `sslscan` (Debian's package) enumerates
//! protocols and cipher suites the way an assessor's tools do.
//!
//! CI installs sslscan and sets `CARDVAULT_REQUIRE_SSLSCAN`, so there the test fails rather
//! than skips when the scanner is missing.

use std::process::Command;

use crate::support::*;

fn sslscan(args: &[&str]) -> Option<String> {
    match Command::new("sslscan").args(args).output() {
        Ok(out) => {
            assert!(out.status.success(), "sslscan {args:?}: {}", out.status);
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(_) if std::env::var_os("CARDVAULT_REQUIRE_SSLSCAN").is_none() => {
            eprintln!("sslscan is not installed: TLS scan skipped (CI installs it)");
            None
        }
        Err(e) => panic!("sslscan: {e}"),
    }
}

/// `(version, cipher)` of every suite the scan saw accepted.
fn accepted(xml: &str) -> Vec<(String, String)> {
    xml.lines()
        .filter(|l| l.trim_start().starts_with("<cipher ") && !l.contains("status=\"rejected\""))
        .map(|l| {
            let attr = |name: &str| {
                l.split(&format!(" {name}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_owned()
            };
            (attr("sslversion"), attr("cipher"))
        })
        .collect()
}

#[test]
fn an_external_scanner_sees_only_modern_tls_and_a_required_client_certificate() {
    let setup = Setup::new("sslscan");
    let daemon = setup.start();
    let target = daemon.addr.to_string();
    let router = setup.router();

    // With a client certificate, the scanner can complete handshakes and list every suite.
    let Some(xml) = sslscan(&[
        "--no-colour",
        "--xml=-",
        &format!("--certs={}", router.cert.display()),
        &format!("--pk={}", router.key.display()),
        &target,
    ]) else {
        return;
    };
    for (kind, version) in [("ssl", "2"), ("ssl", "3"), ("tls", "1.0"), ("tls", "1.1")] {
        let line = format!(r#"<protocol type="{kind}" version="{version}" enabled="0" />"#);
        assert!(
            xml.contains(&line),
            "{kind} {version} not reported disabled:\n{xml}"
        );
    }
    assert!(
        xml.contains(r#"<protocol type="tls" version="1.3" enabled="1" />"#),
        "{xml}"
    );
    let suites = accepted(&xml);
    assert!(suites.iter().any(|(v, _)| v == "TLSv1.3"), "{suites:?}");
    assert!(suites.iter().any(|(v, _)| v == "TLSv1.2"), "{suites:?}");
    for (version, cipher) in &suites {
        let ok = match version.as_str() {
            // TLS 1.3 suites are all AEAD, and its key exchange is always (EC)DHE.
            "TLSv1.3" => cipher.contains("GCM") || cipher.contains("POLY1305"),
            "TLSv1.2" => {
                cipher.starts_with("ECDHE-")
                    && (cipher.contains("-GCM-") || cipher.ends_with("CHACHA20-POLY1305"))
            }
            _ => false,
        };
        assert!(ok, "{version} {cipher} accepted");
    }

    // Without one, the server asks for a certificate from the client CA, and no TLS 1.2
    // handshake completes.
    let text = sslscan(&["--no-colour", "--show-client-cas", &target]).unwrap();
    assert!(
        text.contains("Acceptable client certificate CA names"),
        "{text}"
    );
    assert!(text.contains("cardvault test CA"), "{text}");
    let without = sslscan(&["--no-colour", "--xml=-", &target]).unwrap();
    // The scan did reach the server (TLS 1.3 answers before the certificate is asked for)...
    assert!(
        without.contains(r#"<protocol type="tls" version="1.3" enabled="1" />"#),
        "{without}"
    );
    // ...and no TLS 1.2 handshake completed without a certificate.
    assert!(
        accepted(&without).iter().all(|(v, _)| v != "TLSv1.2"),
        "a TLS 1.2 handshake completed without a client certificate"
    );
    daemon.stop();
}
