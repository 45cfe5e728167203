//! `GET /v1/metrics`: the Prometheus exposition, for the `metrics` permission only, valid as
//! Prometheus's own `promtool` reads it, and with no id or card data in it.

use serde_json::json;

use crate::support::*;

/// The exposition checked by `promtool check metrics` (Debian's `prometheus` package). CI sets
/// `CARDVAULT_REQUIRE_PROMTOOL` so that a missing promtool fails instead of skipping.
fn promtool_check(body: &str) -> Option<String> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CARDVAULT_REQUIRE_PROMTOOL").is_none(),
                "promtool is required here: {e}"
            );
            eprintln!("SKIPPED the promtool check: {e} (apt-get install prometheus)");
            return None;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused the exposition:\n{}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn metrics_are_valid_prometheus_text_without_ids_or_card_data() {
    let setup = Setup::new("metrics");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let prometheus = setup.client(&daemon, &setup.identity(&spec("prometheus")));
    let pan = test_pan(3);
    let card = router.post("/v1/cards", &card_body(&pan)).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(router.get(&format!("/v1/cards/{card}")).status, 200);
    let detok = router.post("/v1/detokenize", &json!({"token": card}));
    assert_eq!(detok.status, 200);

    // A method of the caller's choosing, and a path with an id in it that matches no route.
    let odd = router.send("FOOBAR", "/v1/cards", &[], None).unwrap();
    assert_eq!(odd.status, 405);
    assert_eq!(router.get(&format!("/v1/nowhere/{card}")).status, 404);

    // Only `metrics` may scrape.
    let res = router.get("/v1/metrics");
    assert_eq!((res.status, res.code()), (403, "forbidden".into()));

    let res = prometheus.get("/v1/metrics");
    assert_eq!(res.status, 200, "{}", res.body);
    let body = res.body;
    for want in [
        "cardvault_http_requests_total{route=\"/v1/cards\",method=\"POST\",status=\"201\"} 1\n",
        "cardvault_http_requests_total{route=\"/v1/cards/{id}\",method=\"GET\",status=\"200\"} 1\n",
        "cardvault_http_requests_total{route=\"/v1/detokenize\",method=\"POST\",status=\"200\"} 1\n",
        "cardvault_http_request_duration_seconds_count{route=\"/v1/cards\",method=\"POST\"} 1\n",
        "cardvault_sealed 0\n",
        "cardvault_ready 1\n",
        "cardvault_dek_encryptions{project=\"default\",version=\"1\",state=\"active\"}",
        "cardvault_dek_rotation_limit{project=\"default\",version=\"1\",state=\"active\"} 1073741824\n",
        "cardvault_tls_expiry_seconds{kind=\"server_certificate\"",
        "cardvault_tls_expiry_seconds{kind=\"client_ca\"",
        "cardvault_records{kind=\"cvc\"} 0\n",
    ] {
        assert!(body.contains(want), "no {want:?} in:\n{body}");
    }
    // Flushes and audit batches were counted.
    for name in [
        "cardvault_store_flush_duration_seconds_count",
        "cardvault_audit_write_duration_seconds_count",
    ] {
        let n: u64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}"))
            .parse()
            .unwrap();
        assert!(n > 0, "{name} is 0");
    }
    // Labels carry route patterns, never ids, and nothing of the card.
    assert!(!body.contains(&card) && !body.contains(&pan) && !body.contains("FOOBAR"));
    assert!(body.contains("route=\"/v1/cards\",method=\"other\",status=\"405\""));
    if let Some(lint) = promtool_check(&body) {
        assert!(lint.trim().is_empty(), "promtool lint: {lint}");
    }
}
