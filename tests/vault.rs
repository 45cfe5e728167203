//! End-to-end tests: the real `cardvault serve` binary, real mTLS with certificates minted
//! here, a real sled folder on disk.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

/// For each `fn name(engine: Engine)`, the tests `name::sled` and `name::postgres`.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sled() {
                super::$name(crate::support::Engine::Sled)
            }

            #[test]
            fn postgres() {
                super::$name(crate::support::Engine::Postgres)
            }
        }
    )*};
}

#[path = "suite/customers.rs"]
mod customers;

#[path = "suite/crash.rs"]
mod crash;

#[path = "suite/disk.rs"]
mod disk;

#[path = "suite/keys.rs"]
mod keys;

#[path = "suite/audit.rs"]
mod audit;

#[path = "suite/tls_scan.rs"]
mod tls_scan;

#[path = "suite/reload.rs"]
mod reload;

#[path = "suite/forward.rs"]
mod forward;

#[path = "suite/portability.rs"]
mod portability;

#[path = "suite/oracle.rs"]
mod oracle;

#[path = "suite/metrics.rs"]
mod metrics;

#[path = "suite/check.rs"]
mod check;

#[path = "suite/backup.rs"]
mod backup;

#[path = "suite/hsm.rs"]
mod hsm;

#[path = "suite/postgres.rs"]
mod postgres;

#[path = "suite/cluster.rs"]
mod cluster;

use std::collections::HashSet;
use std::time::Duration;

use cardvault::pki::{Authority, ClientSpec};
use serde_json::json;
use support::*;

const VISA: &str = "4111111111111111";

both_engines!(
    tokenize_read_detokenize_once,
    concurrent_detokenize_of_one_card_token_succeeds_exactly_once,
    projects_are_isolated_and_fingerprints_are_per_project,
    no_pan_in_plaintext_at_rest_or_in_logs,
    acknowledged_tokens_survive_kill_9,
    tokens_acknowledged_while_killed_mid_load_survive,
    used_card_tokens_stay_used_after_kill_9,
    card_tokens_and_cvcs_expire,
);

fn tokenize(client: &Client, pan: &str) -> serde_json::Value {
    let res = client.post("/v1/cards", &card_body(pan));
    assert_eq!(res.status, 201, "{}", res.body);
    res.json()
}

fn detokenize(client: &Client, token: &str) -> Response {
    client.post(
        "/v1/detokenize",
        &json!({"token": token, "reason": "cit", "reference": "inv_123"}),
    )
}

fn tokenize_read_detokenize_once(engine: Engine) {
    let Some(setup) = Setup::on(engine, "lifecycle") else {
        return;
    };
    let daemon = setup.start();
    let checkout = setup.client(&daemon, &setup.checkout());
    let router = setup.client(&daemon, &setup.router());

    let res = checkout.post("/v1/cards", &card_body("4111 1111 1111 1111"));
    assert_eq!(res.status, 201, "{}", res.body);
    assert!(!res.body.contains(VISA), "tokenize response holds the PAN");
    let card = res.json();
    let id = card["id"].as_str().unwrap();
    assert!(id.starts_with("card_") && id.len() == 37, "{id}");
    assert_eq!(card["scheme"], "visa");
    assert_eq!(card["iin"], "411111");
    // BIN-6 and last 4 only: checkout holds neither `fingerprint` nor `show_iin8`.
    assert!(card.get("iin8").is_none(), "{card}");
    assert_eq!(card["last4"], "1111");
    assert_eq!(card["exp_month"], 12);
    assert_eq!(card["exp_year"], future_year());
    assert_eq!(card["holder_name"], "Grace Hopper");
    assert_eq!(card["used"], false);
    assert!(card.get("fingerprint").is_none(), "{card}");
    assert!(card.get("cvc").is_none() && card.get("number").is_none());

    let meta = checkout.get(&format!("/v1/cards/{id}"));
    assert_eq!(meta.status, 200);
    assert_eq!(meta.json()["last4"], card["last4"]);
    assert_eq!(meta.json()["used"], false);
    let full = router.get(&format!("/v1/cards/{id}")).json();
    assert_eq!(full["iin8"], "41111111");
    assert_eq!(full["fingerprint"].as_str().unwrap().len(), 64);

    let first = detokenize(&router, id);
    assert_eq!(first.status, 200, "{}", first.body);
    let details = first.json();
    assert_eq!(details["number"], VISA);
    assert_eq!(details["cvc"], "737");
    assert_eq!(details["exp_month"], 12);
    assert_eq!(details["exp_year"], future_year());
    assert_eq!(details["holder_name"], "Grace Hopper");

    let second = detokenize(&router, id);
    assert_eq!((second.status, second.code()), (409, "token_used".into()));
    assert!(!second.body.contains(VISA));

    let after = checkout.get(&format!("/v1/cards/{id}"));
    assert_eq!(after.json()["used"], true);
    assert_eq!(after.json()["last4"], "1111");

    let health = setup.client(&daemon, &setup.ops()).get("/v1/health");
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (200, json!("ok"))
    );
}

fn concurrent_detokenize_of_one_card_token_succeeds_exactly_once(engine: Engine) {
    let Some(setup) = Setup::on(engine, "race") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let id = tokenize(&router, VISA)["id"].as_str().unwrap().to_owned();

    let barrier = std::sync::Arc::new(std::sync::Barrier::new(64));
    let handles: Vec<_> = (0..64)
        .map(|_| {
            let (router, id, barrier) = (router.clone(), id.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Handshake first, then all 64 requests leave together.
                let conn = router.connect().unwrap();
                let body = json!({"token": id}).to_string();
                barrier.wait();
                let res = conn
                    .send("POST", "/v1/detokenize", &[], Some(body.as_bytes()))
                    .unwrap();
                (res.status, res.body)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<_> = results.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    assert!(ok[0].1.contains(VISA));
    for (status, body) in results.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 409, "{body}");
        assert!(body.contains("token_used") && !body.contains(VISA));
    }
}

#[test]
fn tls_layer_refuses_missing_foreign_and_expired_certificates() {
    let setup = Setup::new("tls");
    let daemon = setup.start();
    let ca = setup.root().join("ca.pem");

    // The control: a good certificate gets through, so the refusals below mean something.
    let good = Client::new(daemon.addr, &ca, Some(&setup.router()));
    assert_eq!(
        good.send("GET", "/v1/health", &[], None).unwrap().status,
        200
    );

    let anonymous = Client::new(daemon.addr, &ca, None);
    assert!(
        anonymous.send("GET", "/v1/health", &[], None).is_err(),
        "no client certificate was accepted"
    );

    let foreign_ca = Authority::new("some other CA").unwrap();
    let foreign = issue(&foreign_ca, &spec("router"), setup.root());
    let foreign = Client::new(daemon.addr, &ca, Some(&foreign));
    assert!(
        foreign.send("GET", "/v1/health", &[], None).is_err(),
        "foreign CA was accepted"
    );

    let mut expired_spec = spec("router");
    expired_spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    expired_spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = Client::new(daemon.addr, &ca, Some(&setup.identity(&expired_spec)));
    assert!(
        expired.send("GET", "/v1/health", &[], None).is_err(),
        "expired certificate was accepted"
    );

    let not_yet = {
        let mut s = spec("router");
        s.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        s.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        Client::new(daemon.addr, &ca, Some(&setup.identity(&s)))
    };
    assert!(
        not_yet.send("GET", "/v1/health", &[], None).is_err(),
        "not-yet-valid certificate was accepted"
    );

    // Each failed handshake is a log line with the peer's address and the reason.
    for reason in [
        "no client certificate",
        "client certificate from an unknown CA",
        "client certificate expired",
        "client certificate not yet valid",
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let logged = |out: &str| {
            out.lines().any(|l| {
                l.contains("TLS handshake failed")
                    && l.contains(&format!("reason=\"{reason}\""))
                    && l.contains("peer=127.0.0.1:")
            })
        };
        while !logged(&daemon.output()) {
            assert!(
                std::time::Instant::now() < deadline,
                "no log line for a handshake failed with {reason:?}:\n{}",
                daemon.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // A certificate that expires while its keep-alive connection is open: refused from then
    // on, on the connection it already has.
    let mut short = spec("router");
    short.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let mut session = setup.client(&daemon, &setup.identity(&short)).session();
    assert_eq!(session.get("/v1/health").status, 200);
    let card = "/v1/cards/card_00000000000000000000000000000000";
    assert_eq!(session.get(card).status, 404);
    std::thread::sleep(std::time::Duration::from_millis(4500));
    assert_eq!(session.get("/v1/health").status, 403);
    let res = session.get(card);
    assert_eq!((res.status, res.code()), (403, "forbidden".into()));
    assert!(!daemon.output().contains("panicked"));
}

#[test]
fn policy_decides_who_does_what() {
    let setup = Setup::new("policy");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let checkout = setup.client(&daemon, &setup.checkout());
    let ops = setup.client(&daemon, &setup.ops());
    let stranger = setup.client(&daemon, &setup.identity(&spec("stranger")));
    let mut no_eku = spec("router");
    no_eku.client_auth_eku = false;
    let no_eku = setup.client(&daemon, &setup.identity(&no_eku));
    let mut shop_edge = ClientSpec::named("edge");
    shop_edge.uri_san = None;
    shop_edge.dns_san = Some("edge.shop-a.test".into());
    let shop_edge = setup.client(&daemon, &setup.identity(&shop_edge));

    let id = tokenize(&checkout, VISA)["id"].as_str().unwrap().to_owned();

    let forbidden = |res: Response| {
        assert_eq!(
            (res.status, res.code()),
            (403, "forbidden".to_owned()),
            "{}",
            res.body
        );
        assert!(!res.body.contains(VISA));
    };
    forbidden(detokenize(&checkout, &id));
    forbidden(stranger.post("/v1/cards", &card_body(VISA)));
    forbidden(stranger.get(&format!("/v1/cards/{id}")));
    forbidden(ops.post("/v1/cards", &card_body(VISA)));
    forbidden(ops.get(&format!("/v1/cards/{id}")));
    forbidden(no_eku.post("/v1/detokenize", &json!({"token": id})));
    forbidden(
        shop_edge
            .in_project("shop-b")
            .post("/v1/cards", &card_body(VISA)),
    );
    assert_eq!(
        shop_edge
            .in_project("shop-a")
            .post("/v1/cards", &card_body(VISA))
            .status,
        201
    );

    // The denials above consumed nothing: the router still gets the card, once.
    assert_eq!(detokenize(&router, &id).status, 200);

    // Every refusal is an audit line, the certificate without clientAuth included.
    drop(daemon.stop());
    let audit = std::fs::read_to_string(setup.root().join("audit/audit.log")).unwrap();
    let no_eku_line = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| {
            l["event"] == "policy.denied"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("clientAuth"))
        })
        .unwrap_or_else(|| panic!("no audit line for the certificate without clientAuth"));
    assert!(no_eku_line["subject"].as_str().unwrap().contains("router"));
    assert_eq!(no_eku_line["fingerprint"].as_str().unwrap().len(), 64);
}

#[test]
fn bad_input_gets_a_4xx_with_a_code_and_never_an_echo() {
    let setup = Setup::new("badinput");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let year = future_year();
    let eleven = cardvault::card::luhn_complete("41111111111", 11);
    let twenty = cardvault::card::luhn_complete("41111111111111111111", 20);
    let body =
        |number: serde_json::Value, month: serde_json::Value, yr: serde_json::Value, cvc: &str| {
            json!({"number": number, "exp_month": month, "exp_year": yr, "cvc": cvc}).to_string()
        };
    let mut oversized = body(json!(VISA), json!(12), json!(year), "123");
    oversized.insert_str(1, &format!("\"pad\": \"{}\",", "x".repeat(20 * 1024)));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("non-digits", body(json!("4111-1111-1111-111x"), json!(12), json!(year), "123"), 422, "invalid_number"),
        ("bad luhn", body(json!("4111111111111112"), json!(12), json!(year), "123"), 422, "invalid_number"),
        ("11 digits", body(json!(eleven), json!(12), json!(year), "123"), 422, "invalid_number"),
        ("20 digits", body(json!(twenty), json!(12), json!(year), "123"), 422, "invalid_number"),
        ("track data as number", body(json!(format!("%B{VISA}^HOPPER/GRACE^3012")), json!(12), json!(year), "123"), 422, "invalid_number"),
        ("month 13", body(json!(VISA), json!(13), json!(year), "123"), 422, "invalid_expiry"),
        ("month 0", body(json!(VISA), json!(0), json!(year), "123"), 422, "invalid_expiry"),
        ("past expiry", body(json!(VISA), json!(1), json!(2020), "123"), 422, "invalid_expiry"),
        ("year as words", body(json!(VISA), json!(12), json!("soon"), "123"), 422, "invalid_expiry"),
        ("2-digit cvc", body(json!(VISA), json!(12), json!(year), "12"), 422, "invalid_cvc"),
        ("cvc letters", body(json!(VISA), json!(12), json!(year), "12a"), 422, "invalid_cvc"),
        ("malformed json", format!("{{\"number\": \"{VISA}\", "), 400, "invalid_json"),
        ("empty body", String::new(), 400, "invalid_json"),
        ("number as JSON number", format!("{{\"number\": {VISA}, \"exp_month\": 12, \"exp_year\": {year}}}"), 400, "invalid_request"),
        ("number as array", body(json!([VISA]), json!(12), json!(year), "123"), 400, "invalid_request"),
        ("missing number", json!({"exp_month": 12, "exp_year": year}).to_string(), 400, "invalid_request"),
        ("unknown field", json!({"number": VISA, "exp_month": 12, "exp_year": year, "pan2": VISA}).to_string(), 400, "invalid_request"),
        ("track2 field", json!({"number": VISA, "exp_month": 12, "exp_year": year, "track2": format!(";{VISA}=3012?")}).to_string(), 422, "prohibited_data"),
        ("pin block", json!({"number": VISA, "exp_month": 12, "exp_year": year, "pin_block": "0412AC89ABCDEF67"}).to_string(), 422, "prohibited_data"),
        ("PAN as holder name", json!({"number": VISA, "exp_month": 12, "exp_year": year, "holder_name": VISA}).to_string(), 422, "invalid_holder_name"),
        ("oversized body", oversized, 413, "body_too_large"),
    ];
    let mut seen = Vec::new();
    for (name, body, status, code) in &cases {
        let res = router.post_raw("/v1/cards", body.as_bytes());
        assert_eq!(
            (res.status, res.code().as_str()),
            (*status, *code),
            "{name}: {}",
            res.body
        );
        assert!(
            !res.body.contains(VISA) && !res.body.contains("4111"),
            "{name} echoed: {}",
            res.body
        );
        seen.push(res.body);
    }

    let detok_cases: Vec<(&str, serde_json::Value, u16, &str)> = vec![
        ("PAN as token", json!({"token": VISA}), 404, "not_found"),
        (
            "unknown token",
            json!({"token": "card_abcdefghijklmnopqrstuvwxyzABCDEF"}),
            404,
            "not_found",
        ),
        (
            "customer token unknown",
            json!({"token": "tok_abcdefghijklmnopqrstuvwxyzABCDEF"}),
            404,
            "not_found",
        ),
        (
            "token as number",
            json!({"token": 4111111111111111u64}),
            400,
            "invalid_request",
        ),
        (
            "PAN in reference",
            json!({"token": "card_abcdefghijklmnopqrstuvwxyzABCDEF", "reference": VISA}),
            422,
            "invalid_field",
        ),
        (
            "spaced PAN in reason",
            json!({"token": "card_abcdefghijklmnopqrstuvwxyzABCDEF", "reason": "4111 1111 1111 1111"}),
            422,
            "invalid_field",
        ),
        (
            "dashed PAN and CVC in reference",
            json!({"token": "card_abcdefghijklmnopqrstuvwxyzABCDEF", "reference": "4111-1111-1111-1111-737"}),
            422,
            "invalid_field",
        ),
    ];
    for (name, body, status, code) in &detok_cases {
        let res = router.post("/v1/detokenize", body);
        assert_eq!(
            (res.status, res.code().as_str()),
            (*status, *code),
            "{name}: {}",
            res.body
        );
        assert!(!res.body.contains("4111"), "{name} echoed: {}", res.body);
    }

    let bad_project = router
        .send(
            "POST",
            "/v1/cards",
            &[("Vault-Project", "Shop/A")],
            Some(card_body(VISA).to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(
        (bad_project.status, bad_project.code()),
        (400, "invalid_project".into())
    );
    let unknown_route = router.get("/v1/nothing-here");
    assert_eq!(
        (unknown_route.status, unknown_route.code()),
        (404, "not_found".into())
    );
    let wrong_method = router.send("DELETE", "/v1/cards", &[], None).unwrap();
    assert_eq!(
        (wrong_method.status, wrong_method.code()),
        (405, "method_not_allowed".into())
    );
    let path_pan = router.get(&format!("/v1/cards/{VISA}"));
    assert_eq!(
        (path_pan.status, path_pan.code()),
        (404, "not_found".into())
    );
    assert!(!path_pan.body.contains(VISA));

    // Nothing was half-written: no failed request left a card behind to read.
    let output = daemon.stop();
    assert!(!output.contains("panicked"));
    assert!(!output.contains(VISA), "the log holds a PAN");
    assert_eq!(
        output
            .matches("action=\"card.tokenize\" outcome=success")
            .count(),
        0,
        "a refused card was stored"
    );
}

fn projects_are_isolated_and_fingerprints_are_per_project(engine: Engine) {
    let Some(setup) = Setup::on(engine, "projects") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let (a, b) = (router.in_project("shop-a"), router.in_project("shop-b"));

    let a1 = tokenize(&a, VISA);
    let a2 = tokenize(&a, "4111 1111 1111 1111");
    let b1 = tokenize(&b, VISA);
    let other = tokenize(&a, "5555555555554444");
    assert_eq!(a1["fingerprint"], a2["fingerprint"]);
    assert_ne!(a1["fingerprint"], b1["fingerprint"]);
    assert_ne!(a1["fingerprint"], other["fingerprint"]);
    assert_eq!(other["scheme"], "mastercard");

    let id = a1["id"].as_str().unwrap();
    let res = b.get(&format!("/v1/cards/{id}"));
    assert_eq!((res.status, res.code()), (404, "not_found".into()));
    let res = detokenize(&b, id);
    assert_eq!((res.status, res.code()), (404, "not_found".into()));
    let res = detokenize(&router, id);
    assert_eq!(
        (res.status, res.code()),
        (404, "not_found".into()),
        "the default project saw shop-a's card"
    );
    // Still unused in its own project.
    assert_eq!(detokenize(&a, id).json()["number"], VISA);
}

fn no_pan_in_plaintext_at_rest_or_in_logs(engine: Engine) {
    // At trace level, every crate's logging is on: actix's dispatcher, rustls, sled,
    // tokio-postgres.
    let Some(setup) = Setup::on_with_level(engine, "atrest", "", "trace") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let checkout = setup.client(&daemon, &setup.checkout());
    let pans: Vec<String> = (0..20)
        .map(test_pan)
        .chain(["378282246310005".into(), "6011111111111117".into()])
        .collect();
    let mut ids = Vec::new();
    for pan in &pans {
        ids.push(tokenize(&router, pan)["id"].as_str().unwrap().to_owned());
    }
    for id in ids.iter().step_by(2) {
        assert_eq!(detokenize(&router, id).status, 200);
    }
    // Error paths carrying the same card data: each must be refused without logging it.
    let pan = &pans[0];
    let year = future_year();
    let refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "/v1/cards",
            format!(r#"{{"number": {pan}, "exp_month": 12, "exp_year": {year}}}"#).into_bytes(),
        ),
        (
            "/v1/cards",
            format!(r#"{{"number": "{pan}", "exp_month": 13, "exp_year": {year}, "cvc": "737"}}"#)
                .into_bytes(),
        ),
        (
            "/v1/cards",
            format!(r#"{{"number": "{pan}", "exp_month": 12, "exp_year": {year}, "cvc": "73"}}"#)
                .into_bytes(),
        ),
        (
            "/v1/cards",
            format!(r#"{{"number": "{pan}", "track2": ";{pan}=3012?"}}"#).into_bytes(),
        ),
        ("/v1/cards", format!(r#"{{"number": "{pan}""#).into_bytes()),
        (
            "/v1/cards",
            format!(r#"{{"pad": "{}", "number": "{pan}"}}"#, "x".repeat(20_000)).into_bytes(),
        ),
        (
            "/v1/detokenize",
            format!(r#"{{"token": "{pan}"}}"#).into_bytes(),
        ),
        (
            "/v1/detokenize",
            format!(r#"{{"token": "{}", "reference": "{pan}"}}"#, ids[1]).into_bytes(),
        ),
        (
            "/v1/customers",
            format!(r#"{{"name": "{pan}", "metadata": {{"card": "{pan}"}}}}"#).into_bytes(),
        ),
    ];
    for (path, body) in &refused {
        let res = router.post_raw(path, body);
        assert!(
            (400..500).contains(&res.status),
            "{path}: {} {}",
            res.status,
            res.body
        );
        assert!(!res.body.contains(pan.as_str()));
    }
    assert_eq!(
        checkout
            .post("/v1/detokenize", &json!({"token": ids[1]}))
            .status,
        403
    );
    let output = daemon.stop();
    assert!(
        output.contains("actix_http::h1"),
        "trace logging was not on"
    );

    // The scan must be able to find something: the daemon did write a store and a key.
    // On PostgreSQL the store is the cluster's folder (tables and WAL) and a `pg_dump`.
    let (store_dir, dump) = setup.store_at_rest();
    if setup.pg.is_some() {
        let text = String::from_utf8_lossy(&dump);
        assert!(
            ids.iter().all(|id| text.contains(id.as_str())),
            "the dump holds no cards"
        );
    }
    assert!(!files_below(&store_dir).is_empty() && !files_below(&setup.keys_dir).is_empty());
    let audit = setup.root().join("audit");
    assert!(!files_below(&audit).is_empty(), "no audit file to scan");
    for dir in [&store_dir, &setup.keys_dir, &audit] {
        let hits = files_containing_digits(dir, &pans);
        assert!(hits.is_empty(), "PAN in plaintext in {hits:?}");
    }
    for pan in &pans {
        let hex: String = pan.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(
            !contains(&dump, pan.as_bytes()) && !contains(&dump, hex.as_bytes()),
            "PAN in the database dump"
        );
        assert!(!output.contains(pan.as_str()), "PAN in the log");
        assert!(!output.contains(&pan[6..]), "PAN middle digits in the log");
    }
    assert!(!output.contains("Grace Hopper"), "holder name in the log");
    assert!(
        output.contains("card.detokenize"),
        "the log scan saw no detokenization at all"
    );
}

#[test]
fn swapped_ciphertexts_never_open_as_the_other_card() {
    let setup = Setup::new("tamper");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let (pan_a, pan_b) = (VISA, "5555555555554444");
    let a = tokenize(&router, pan_a)["id"].as_str().unwrap().to_owned();
    let b = tokenize(&router, pan_b)["id"].as_str().unwrap().to_owned();
    daemon.stop();

    {
        let db = sled::open(&setup.data_dir).unwrap();
        let cards = db.open_tree("cards").unwrap();
        let key = |id: &str| [b"default\0".as_slice(), id.as_bytes()].concat();
        let va = cards.get(key(&a)).unwrap().unwrap();
        let vb = cards.get(key(&b)).unwrap().unwrap();
        assert_ne!(va, vb);
        cards.insert(key(&a), vb).unwrap();
        cards.insert(key(&b), va).unwrap();
        db.flush().unwrap();
    }

    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    for (id, other_pan) in [(&a, pan_b), (&b, pan_a)] {
        let meta = router.get(&format!("/v1/cards/{id}"));
        assert_ne!(meta.status, 200, "{}", meta.body);
        let res = detokenize(&router, id);
        assert_ne!(res.status, 200, "{}", res.body);
        assert_eq!(res.code(), "record_integrity");
        assert!(!res.body.contains(other_pan) && !res.body.contains(&other_pan[12..]));
    }
}

fn acknowledged_tokens_survive_kill_9(engine: Engine) {
    let Some(setup) = Setup::on(engine, "kill9") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let handles: Vec<_> = (0..8u32)
        .map(|t| {
            let router = router.clone();
            std::thread::spawn(move || {
                (0..25u32)
                    .map(|i| {
                        let pan = test_pan(1000 + t * 100 + i);
                        let id = tokenize(&router, &pan)["id"].as_str().unwrap().to_owned();
                        (id, pan)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let written: Vec<(String, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    // The instant the last acknowledgement arrived: no graceful shutdown, no flush.
    daemon.kill9();
    assert_eq!(written.len(), 200);
    assert_eq!(
        written
            .iter()
            .map(|(id, _)| id)
            .collect::<HashSet<_>>()
            .len(),
        200
    );
    assert_all_readable(&setup, &written);
}

/// Writers keep going while the daemon is killed: every write acknowledged before the kill
/// must be there after the restart, including the last ones in flight.
fn tokens_acknowledged_while_killed_mid_load_survive(engine: Engine) {
    let Some(setup) = Setup::on(engine, "kill9load") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = (0..16u32)
        .map(|t| {
            let (router, stop) = (router.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0.. {
                    let pan = test_pan(100_000 + t * 10_000 + i);
                    match router.send(
                        "POST",
                        "/v1/cards",
                        &[],
                        Some(card_body(&pan).to_string().as_bytes()),
                    ) {
                        Ok(res) if res.status == 201 => {
                            acked.push((res.json()["id"].as_str().unwrap().to_owned(), pan))
                        }
                        Ok(res) => panic!("{}: {}", res.status, res.body),
                        Err(_) if stop.load(std::sync::atomic::Ordering::SeqCst) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    daemon.kill9();
    let written: Vec<(String, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        written.len() >= 50,
        "only {} writes before the kill",
        written.len()
    );
    assert_all_readable(&setup, &written);
}

fn assert_all_readable(setup: &Setup, written: &[(String, String)]) {
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let chunks: Vec<Vec<(String, String)>> = written
        .chunks(written.len().div_ceil(8).max(1))
        .map(<[_]>::to_vec)
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let router = router.clone();
            std::thread::spawn(move || {
                chunk
                    .into_iter()
                    .filter(|(id, pan)| {
                        let res = detokenize(&router, id);
                        res.status != 200 || res.json()["number"] != pan.as_str()
                    })
                    .map(|(id, _)| id)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let lost: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged tokens lost or unreadable: {lost:?}",
        lost.len(),
        written.len()
    );
}

fn used_card_tokens_stay_used_after_kill_9(engine: Engine) {
    let Some(setup) = Setup::on(engine, "kill9used") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let ids: Vec<String> = (0..20)
        .map(|i| {
            tokenize(&router, &test_pan(i))["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for id in &ids {
        assert_eq!(detokenize(&router, id).status, 200);
    }
    daemon.kill9();
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    for id in &ids {
        assert_eq!(
            detokenize(&router, id).code(),
            "token_used",
            "{id} came back usable"
        );
    }
}

fn card_tokens_and_cvcs_expire(engine: Engine) {
    let Some(setup) = Setup::on_with(engine, "ttl", "card_token_ttl = \"4s\"\ncvc_ttl = \"1s\"")
    else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let early = tokenize(&router, VISA)["id"].as_str().unwrap().to_owned();
    let late = tokenize(&router, VISA)["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(1500));
    let res = detokenize(&router, &early);
    assert_eq!(res.status, 200, "{}", res.body);
    assert!(res.json().get("cvc").is_none(), "CVC outlived cvc_ttl");
    assert_eq!(res.json()["number"], VISA);
    std::thread::sleep(Duration::from_millis(4000));
    let res = detokenize(&router, &late);
    assert_eq!((res.status, res.code()), (410, "token_expired".into()));
}

/// The in-memory CVC cache holds at most `cvc_max` codes: past it, a tokenization that
/// brings a CVC is refused (503 `cvc_capacity`) before anything is stored, one without a CVC
/// goes through, and a code taken by its detokenization makes room again.
#[test]
fn the_cvc_cache_is_bounded_and_refuses_rather_than_grows() {
    let setup = Setup::with_settings("cvc-cap", "cvc_max = 2");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let first = tokenize(&router, &test_pan(1))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokenize(&router, &test_pan(2));
    let res = router.post("/v1/cards", &card_body(&test_pan(3)));
    assert_eq!(
        (res.status, res.code()),
        (503, "cvc_capacity".into()),
        "{}",
        res.body
    );
    assert!(!res.body.contains(&test_pan(3)) && !res.body.contains("737"));
    let mut without = card_body(&test_pan(4));
    without.as_object_mut().unwrap().remove("cvc");
    assert_eq!(router.post("/v1/cards", &without).status, 201);
    let res = detokenize(&router, &first);
    assert_eq!(res.json()["cvc"], "737", "{}", res.body);
    tokenize(&router, &test_pan(5));
    daemon.stop();
    // Four cards stored: the refused one is not among them.
    assert_eq!(setup.stored_cards(), 4);
}

#[test]
fn startup_is_refused_on_unsafe_or_broken_setups() {
    type Breakage = Box<dyn Fn(&Setup)>;
    let cases: Vec<(&str, Breakage, &str)> = vec![
        (
            "missing cert",
            Box::new(|s| std::fs::remove_file(s.root().join("server.pem")).unwrap()),
            "server.pem",
        ),
        (
            "KEK readable by others",
            Box::new(|s| {
                use std::os::unix::fs::PermissionsExt;
                let kek = s.keys_dir.join(DEV_KEY);
                std::fs::set_permissions(kek, std::fs::Permissions::from_mode(0o644)).unwrap();
            }),
            "chmod 600",
        ),
        (
            "keys_dir inside data_dir",
            Box::new(|s| {
                let text = std::fs::read_to_string(&s.config)
                    .unwrap()
                    .replace("keys_dir = \"keys\"", "keys_dir = \"data/keys\"");
                write(&s.config, &text);
            }),
            "keys_dir",
        ),
        (
            "unknown permission",
            Box::new(|s| write(&s.policy, &POLICY.replace("\"keys\"", "\"godmode\""))),
            "unknown permission",
        ),
        (
            "identity without matcher",
            Box::new(|s| {
                write(
                    &s.policy,
                    &POLICY.replace("common_name = \"ops.cardvault.test\"\n", ""),
                )
            }),
            "no matcher",
        ),
        (
            "duplicate identity",
            Box::new(|s| {
                write(
                    &s.policy,
                    &POLICY.replace("name = \"ops\"", "name = \"router\""),
                )
            }),
            "duplicates",
        ),
        (
            "missing KEK",
            Box::new(|s| std::fs::remove_file(s.keys_dir.join(DEV_KEY)).unwrap()),
            "holds no key",
        ),
        (
            "keys_dir open to others",
            Box::new(|s| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&s.keys_dir, std::fs::Permissions::from_mode(0o755))
                    .unwrap();
            }),
            "accessible to others",
        ),
        (
            "policy writable by others",
            Box::new(|s| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&s.policy, std::fs::Permissions::from_mode(0o666))
                    .unwrap();
            }),
            "writable by others",
        ),
        (
            "dev key without insecure_dev_key",
            Box::new(|s| {
                let text = std::fs::read_to_string(&s.config)
                    .unwrap()
                    .replace("insecure_dev_key = true\n", "");
                write(&s.config, &text);
            }),
            "holds only the INSECURE dev key",
        ),
    ];
    for (name, break_it, message) in cases {
        let setup = Setup::new("refuse");
        break_it(&setup);
        match Daemon::try_start(&setup) {
            Ok(_) => panic!("{name}: the daemon started"),
            Err(output) => assert!(
                output.contains(message),
                "{name}: expected {message:?} in:\n{output}"
            ),
        }
    }

    // A KEK other than the one the store was made with.
    let setup = Setup::new("wrongkek");
    let daemon = setup.start();
    tokenize(&setup.client(&daemon, &setup.router()), VISA);
    daemon.stop();
    std::fs::remove_file(setup.keys_dir.join(DEV_KEY)).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["keys", "init", "--insecure-dev-key", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let output = Daemon::try_start(&setup)
        .err()
        .expect("started with the wrong KEK");
    assert!(output.contains("does not open this store"), "{output}");

    // keys init never overwrites a KEK.
    let out = std::process::Command::new(BIN)
        .args(["keys", "init", "--insecure-dev-key", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_running_daemon_cannot_dump_core() {
    let setup = Setup::new("nocore");
    let daemon = setup.start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    // Serving (so its signal handlers are in place) before it is stopped.
    let res = setup.client(&daemon, &setup.router()).get("/v1/health");
    assert_eq!(res.status, 200);
    daemon.stop();
}

/// The benchmark command works end to end (its figures are not asserted: timing belongs to
/// `cardvault bench` runs, not to tests).
#[test]
fn bench_command_drives_every_scenario_without_errors() {
    let out = std::process::Command::new(BIN)
        .args(["bench", "--duration", "1s", "--concurrency", "4", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let figures = figures.as_array().unwrap();
    let names: Vec<&str> = figures
        .iter()
        .map(|f| f["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 9, "{names:?}");
    // Payments through the vault to the stand-in PSP, and by the router itself.
    assert!(
        names.contains(&"forward") && names.contains(&"direct"),
        "{names:?}"
    );
    for f in figures {
        assert!(f["requests"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(f["errors"], 0, "{f}");
        assert!(f["server_cpu_seconds_per_1k"].as_f64().is_some(), "{f}");
    }
}

/// A growth run fills the store to each size, restarts the daemon over it and measures: one
/// step per size, with the tokens counted, the startup timed and the disk per token given
/// (the sled folder, or the PostgreSQL database, which the fill writes in transactions of
/// rows).
#[test]
fn bench_growth_measures_each_store_size() {
    growth_run("sled");
    if support::pg::available() {
        growth_run("postgres");
    }
}

fn growth_run(store: &str) {
    let out = std::process::Command::new(BIN)
        .args([
            "bench",
            "--store",
            store,
            "--growth",
            "0,3k",
            "--scenario",
            "tokenize",
            "--scenario",
            "detokenize-card",
            "--duration",
            "1s",
            "--concurrency",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("filled "), "{stderr}");
    let steps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = steps.as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["tokens"], 0);
    // Filled up to 3,000 less what the first step's requests made, so exactly 3,000 or,
    // when those requests made more, all of them.
    let second = steps[1]["tokens"].as_u64().unwrap();
    assert!(second >= 3_000, "{}", steps[1]);
    for step in steps {
        assert!(step["startup_seconds"].as_f64().unwrap() > 0.0, "{step}");
        assert!(
            step["store_bytes_per_token"].as_f64().unwrap() > 0.0,
            "{store}: {step}"
        );
        assert!(
            step["audit_bytes_per_line"].as_f64().unwrap() > 0.0,
            "{step}"
        );
        let figures = step["figures"].as_array().unwrap();
        assert_eq!(figures.len(), 2, "{step}");
        for f in figures {
            assert!(f["requests"].as_u64().unwrap() > 0, "{f}");
            assert_eq!(f["errors"], 0, "{f}");
        }
    }
}

/// `cardvault dev` prints curl lines that work exactly as printed: run them with bash + curl.
#[test]
fn dev_command_prints_curl_lines_that_work() {
    let dir = TempDir::new("dev");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(BIN)
        .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut script = String::from("set -e\n");
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("curl ") || line.starts_with("CARD=") {
            script.push_str(&line);
            script.push('\n');
        }
        if line.contains("listening on https://") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        script.lines().filter(|l| l.starts_with("curl ")).count(),
        6,
        "{script}"
    );
    for expected in [
        r#""status":"ok""#,
        r#""last4":"4242""#,
        r#""number":"4242424242424242""#,
        r#""cvc":"123""#,
        r#""code":"token_used""#,
        r#""code":"forbidden""#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
}

/// SIGTERM the moment the daemon says it listens: a clean stop (drained, store closed, exit
/// 0), not death by the signal's default action.
#[test]
fn a_sigterm_right_after_start_stops_cleanly() {
    let setup = Setup::new("early-term");
    for _ in 0..5 {
        let output = setup.start().stop();
        assert!(output.contains("stopped"), "{output}");
    }
}
