//! Customers and reusable customer tokens, end to end.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{detokenize, tokenize, VISA};
use crate::support::*;

both_engines!(
    customer_token_lifecycle,
    customer_updates_and_validation,
    attaching_a_card_the_customer_holds_returns_the_existing_token,
    a_card_token_makes_one_customer_token_or_one_payment_never_both,
    idempotency_keys_replay_conflict_and_race,
    an_abandoned_request_and_its_retry_make_one_object,
    no_contact_details_or_pan_at_rest_or_in_logs,
    customers_and_tokens_are_isolated_by_project,
    acknowledged_customer_tokens_survive_kill_9,
);

const EMAIL: &str = "grace.hopper@navy.example";
const PHONE: &str = "+1 202 555 0143";

fn new_customer(client: &Client) -> String {
    let res = client.post(
        "/v1/customers",
        &json!({"email": EMAIL, "name": "Grace Hopper", "phone": PHONE, "address": {"line1": "1 Navy Way", "country": "us"}, "metadata": {"crm": "c-42"}}),
    );
    assert_eq!(res.status, 201, "{}", res.body);
    res.json()["id"].as_str().unwrap().to_owned()
}

fn attach(client: &Client, customer: &str, card: &str, recurring: Option<Value>) -> Response {
    let mut body = json!({"source": card});
    if let Some(r) = recurring {
        body["recurring"] = r;
    }
    client.post(&format!("/v1/customers/{customer}/tokens"), &body)
}

fn customer_token_lifecycle(engine: Engine) {
    let Some(setup) = Setup::on(engine, "cust-lifecycle") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());

    let card = tokenize(&router, VISA)["id"].as_str().unwrap().to_owned();
    let cust = new_customer(&router);
    let got = router.get(&format!("/v1/customers/{cust}"));
    assert_eq!(got.status, 200);
    let profile = got.json();
    assert_eq!(
        (profile["email"].as_str(), profile["phone"].as_str()),
        (Some(EMAIL), Some(PHONE))
    );
    assert_eq!(profile["address"]["country"], "US");
    assert_eq!(profile["metadata"]["crm"], "c-42");

    let res = attach(
        &router,
        &cust,
        &card,
        Some(json!({"model": "subscription"})),
    );
    assert_eq!(res.status, 201, "{}", res.body);
    let token = res.json();
    let tok = token["id"].as_str().unwrap().to_owned();
    assert!(tok.starts_with("tok_") && tok.len() == 36, "{tok}");
    assert_eq!(token["customer"], cust.as_str());
    assert_eq!(token["duplicate"], false);
    assert_eq!(token["token"], token["id"]);
    assert_eq!(
        (
            token["scheme"].as_str(),
            token["last4"].as_str(),
            token["iin"].as_str()
        ),
        (Some("visa"), Some("1111"), Some("411111"))
    );
    assert_eq!(token["iin8"], "41111111");
    assert_eq!(token["holder_name"], "Grace Hopper");
    assert_eq!(token["fingerprint"].as_str().unwrap().len(), 64);
    assert!(!res.body.contains(VISA) && token.get("cvc").is_none());

    // The card token was used up by the customer token.
    let res = detokenize(&router, &card);
    assert_eq!((res.status, res.code()), (409, "token_used".into()));
    assert_eq!(
        router.get(&format!("/v1/cards/{card}")).json()["used"],
        true
    );

    // Reusable: three payments, never a CVC; MIT data comes back.
    for reason in ["cit", "mit", "mit"] {
        let res = router.post(
            "/v1/detokenize",
            &json!({"token": tok, "reason": reason, "reference": "inv_7"}),
        );
        assert_eq!(res.status, 200, "{}", res.body);
        let details = res.json();
        assert_eq!(details["number"], VISA);
        assert!(
            details.get("cvc").is_none(),
            "a customer token returned a CVC"
        );
        assert_eq!(details["recurring"]["model"], "subscription");
    }

    // The router learns the scheme transaction id; an account updater brings a new expiry.
    let year = future_year() + 2;
    let res = send(
        &router,
        "PATCH",
        &format!("/v1/customers/{cust}/tokens/{tok}"),
        Some(
            &json!({"exp_month": 3, "exp_year": year, "recurring": {"model": "subscription", "scheme_transaction_id": "483297487231504"}}),
        ),
    );
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(
        (res.json()["id"].as_str(), res.json()["exp_year"].as_i64()),
        (Some(tok.as_str()), Some(i64::from(year)))
    );
    let details = detokenize(&router, &tok).json();
    assert_eq!(
        (details["exp_month"].as_i64(), details["exp_year"].as_i64()),
        (Some(3), Some(i64::from(year)))
    );
    assert_eq!(
        details["recurring"]["scheme_transaction_id"],
        "483297487231504"
    );

    let list = router.get(&format!("/v1/customers/{cust}/tokens")).json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(VISA));

    let res = send(
        &router,
        "DELETE",
        &format!("/v1/customers/{cust}/tokens/{tok}"),
        None,
    );
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(
        router
            .get(&format!("/v1/customers/{cust}/tokens/{tok}"))
            .status,
        404
    );
    assert_eq!(detokenize(&router, &tok).code(), "not_found");
    assert_eq!(
        router.get(&format!("/v1/customers/{cust}/tokens")).json()["data"],
        json!([])
    );

    // Deleting the customer deletes all of its tokens.
    let toks: Vec<String> = ["5555555555554444", "378282246310005"]
        .iter()
        .map(|pan| {
            let card = tokenize(&router, pan)["id"].as_str().unwrap().to_owned();
            attach(&router, &cust, &card, None).json()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        router.get(&format!("/v1/customers/{cust}/tokens")).json()["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let res = send(&router, "DELETE", &format!("/v1/customers/{cust}"), None);
    assert_eq!(
        (res.status, res.json()["deleted"].clone()),
        (200, json!(true))
    );
    assert_eq!(router.get(&format!("/v1/customers/{cust}")).status, 404);
    assert_eq!(
        router.get(&format!("/v1/customers/{cust}/tokens")).status,
        404
    );
    for tok in &toks {
        assert_eq!(
            router
                .get(&format!("/v1/customers/{cust}/tokens/{tok}"))
                .status,
            404
        );
        assert_eq!(
            detokenize(&router, tok).code(),
            "not_found",
            "{tok} outlived its customer"
        );
    }
}

fn customer_updates_and_validation(engine: Engine) {
    let Some(setup) = Setup::on(engine, "cust-update") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let checkout = setup.client(&daemon, &setup.checkout());
    let cust = new_customer(&router);

    let res = send(
        &router,
        "PATCH",
        &format!("/v1/customers/{cust}"),
        Some(&json!({"name": null, "metadata": {"crm": null, "tier": "gold"}})),
    );
    assert_eq!(res.status, 200, "{}", res.body);
    let profile = router.get(&format!("/v1/customers/{cust}")).json();
    assert_eq!(profile["name"], Value::Null);
    assert_eq!(profile["email"], EMAIL);
    assert_eq!(profile["metadata"], json!({"tier": "gold"}));

    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"email": "not an email"}), 422, "invalid_email"),
        (json!({"phone": VISA}), 422, "invalid_phone"),
        (
            json!({"name": "Visa 4111 1111 1111 1111"}),
            422,
            "invalid_field",
        ),
        (json!({"metadata": {"note": VISA}}), 422, "invalid_metadata"),
        (
            json!({"address": {"country": "USA"}}),
            422,
            "invalid_country",
        ),
        (json!({"favourite_colour": "blue"}), 400, "invalid_request"),
        (
            json!({"email": 4111111111111111u64}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in &cases {
        for res in [
            router.post("/v1/customers", body),
            send(
                &router,
                "PATCH",
                &format!("/v1/customers/{cust}"),
                Some(body),
            ),
        ] {
            assert_eq!(
                (res.status, res.code().as_str()),
                (*status, *code),
                "{body}: {}",
                res.body
            );
            assert!(!res.body.contains("4111"), "echoed: {}", res.body);
        }
    }
    // A failed PATCH changed nothing.
    assert_eq!(
        router.get(&format!("/v1/customers/{cust}")).json()["metadata"],
        json!({"tier": "gold"})
    );

    // checkout may tokenize but not manage customers.
    assert_eq!(
        checkout.post("/v1/customers", &json!({})).code(),
        "forbidden"
    );
    assert_eq!(
        checkout.get(&format!("/v1/customers/{cust}")).code(),
        "forbidden"
    );

    let card = tokenize(&router, VISA)["id"].as_str().unwrap().to_owned();
    let bad_sources = [
        (
            json!({"source": "tok_abcdefghijklmnopqrstuvwxyzABCDEF"}),
            404,
            "not_found",
        ),
        (json!({"source": VISA}), 404, "not_found"),
        (
            json!({"source": card, "recurring": {"model": "weekly"}}),
            422,
            "invalid_recurring",
        ),
        (
            json!({"source": card, "cvc": "123"}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in &bad_sources {
        let res = router.post(&format!("/v1/customers/{cust}/tokens"), body);
        assert_eq!(
            (res.status, res.code().as_str()),
            (*status, *code),
            "{body}: {}",
            res.body
        );
        assert!(!res.body.contains(VISA));
    }
    let res = attach(
        &router,
        "cust_abcdefghijklmnopqrstuvwxyzABCDEF",
        &card,
        None,
    );
    assert_eq!(res.code(), "not_found");
    // None of the refusals used the card token up.
    assert_eq!(attach(&router, &cust, &card, None).status, 201);
    let again = attach(&router, &cust, &card, None);
    assert_eq!((again.status, again.code()), (409, "token_used".into()));
}

fn attaching_a_card_the_customer_holds_returns_the_existing_token(engine: Engine) {
    let Some(setup) = Setup::on(engine, "cust-dup") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cust = new_customer(&router);
    let first = router.post(
        "/v1/cards",
        &json!({"number": VISA, "exp_month": 1, "exp_year": future_year()}),
    );
    let first = attach(&router, &cust, first.json()["id"].as_str().unwrap(), None).json();

    let later = future_year() + 4;
    let second = router.post(
        "/v1/cards",
        &json!({"number": "4111-1111-1111-1111", "exp_month": 6, "exp_year": later}),
    );
    let second_card = second.json()["id"].as_str().unwrap().to_owned();
    let res = attach(&router, &cust, &second_card, None);
    assert_eq!(res.status, 200, "{}", res.body);
    let dup = res.json();
    assert_eq!(
        (dup["duplicate"].clone(), dup["id"].clone()),
        (json!(true), first["id"].clone())
    );
    assert_eq!(
        (dup["exp_month"].as_i64(), dup["exp_year"].as_i64()),
        (Some(6), Some(i64::from(later)))
    );
    assert_eq!(
        router.get(&format!("/v1/customers/{cust}/tokens")).json()["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(detokenize(&router, &second_card).code(), "token_used");

    // An older expiry does not overwrite a newer one.
    let older = router.post(
        "/v1/cards",
        &json!({"number": VISA, "exp_month": 1, "exp_year": future_year()}),
    );
    let res = attach(&router, &cust, older.json()["id"].as_str().unwrap(), None).json();
    assert_eq!(
        (res["exp_month"].as_i64(), res["exp_year"].as_i64()),
        (Some(6), Some(i64::from(later)))
    );
}

fn a_card_token_makes_one_customer_token_or_one_payment_never_both(engine: Engine) {
    let Some(setup) = Setup::on(engine, "cust-race") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cust = new_customer(&router);
    for round in 0..3 {
        let card = tokenize(&router, &test_pan(round))["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let barrier = Arc::new(Barrier::new(32));
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let (router, barrier, card, cust) =
                    (router.clone(), barrier.clone(), card.clone(), cust.clone());
                std::thread::spawn(move || {
                    let (path, body) = if i % 2 == 0 {
                        (
                            format!("/v1/customers/{cust}/tokens"),
                            json!({"source": card}),
                        )
                    } else {
                        ("/v1/detokenize".to_owned(), json!({"token": card}))
                    };
                    let conn = router.connect().unwrap();
                    barrier.wait();
                    let res = conn
                        .send("POST", &path, &[], Some(body.to_string().as_bytes()))
                        .unwrap();
                    (res.status, res.body)
                })
            })
            .collect();
        let results: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = results
            .iter()
            .filter(|(s, _)| *s == 200 || *s == 201)
            .count();
        assert_eq!(wins, 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .all(|(s, b)| matches!(s, 200 | 201) || (*s == 409 && b.contains("token_used"))),
            "{results:?}"
        );
    }
    // Whatever won, the customer holds at most one token per round's card.
    assert!(
        router.get(&format!("/v1/customers/{cust}/tokens")).json()["data"]
            .as_array()
            .unwrap()
            .len()
            <= 3
    );
}

fn idempotency_keys_replay_conflict_and_race(engine: Engine) {
    let Some(setup) = Setup::on(engine, "idem") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let post = |key: &str, path: &str, body: &Value| {
        router
            .send(
                "POST",
                path,
                &[("Idempotency-Key", key)],
                Some(body.to_string().as_bytes()),
            )
            .unwrap()
    };

    // Replay: the first response again, no second object.
    let body = json!({"email": EMAIL});
    let first = post("key-1", "/v1/customers", &body);
    let replay = post("key-1", "/v1/customers", &body);
    assert_eq!(first.status, 201);
    assert_eq!(
        (replay.status, replay.body.clone()),
        (201, first.body.clone())
    );
    // Conflict: the same key with another body.
    let other = post(
        "key-1",
        "/v1/customers",
        &json!({"email": "someone.else@example.com"}),
    );
    assert_eq!(
        (other.status, other.code()),
        (409, "idempotency_conflict".into())
    );
    // Another caller's identical key is its own.
    let checkout = setup.client(&daemon, &setup.checkout());
    let card_body = card_body(VISA);
    let mine = post("shared-key", "/v1/cards", &card_body);
    let theirs = checkout
        .send(
            "POST",
            "/v1/cards",
            &[("Idempotency-Key", "shared-key")],
            Some(card_body.to_string().as_bytes()),
        )
        .unwrap();
    assert_ne!(mine.json()["id"], theirs.json()["id"]);
    assert_eq!(
        post("shared-key", "/v1/cards", &card_body).json()["id"],
        mine.json()["id"]
    );
    // Keys are per project too.
    let other_project = router.in_project("shop-b");
    let res = other_project
        .send(
            "POST",
            "/v1/customers",
            &[("Idempotency-Key", "key-1")],
            Some(body.to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(res.status, 201);
    assert_ne!(res.json()["id"], first.json()["id"]);

    // A replay is rebuilt from the live object: once the customer is deleted, it is gone.
    let doomed = post(
        "key-doomed",
        "/v1/customers",
        &json!({"email": "doomed@example.com"}),
    );
    let doomed_id = doomed.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        send(
            &router,
            "DELETE",
            &format!("/v1/customers/{doomed_id}"),
            None
        )
        .status,
        200
    );
    let ghost = post(
        "key-doomed",
        "/v1/customers",
        &json!({"email": "doomed@example.com"}),
    );
    assert_eq!(
        (ghost.status, ghost.code()),
        (404, "not_found".into()),
        "{}",
        ghost.body
    );
    assert!(!ghost.body.contains("doomed@example.com"));

    // A client error is remembered like a success.
    let bad = json!({"email": "nope"});
    assert_eq!(
        post("key-bad", "/v1/customers", &bad).code(),
        "invalid_email"
    );

    // Concurrent replays of one key: one object, whatever the interleaving.
    let card = tokenize(&router, VISA)["id"].as_str().unwrap().to_owned();
    let cust = first.json()["id"].as_str().unwrap().to_owned();
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (router, barrier, card, cust) =
                (router.clone(), barrier.clone(), card.clone(), cust.clone());
            std::thread::spawn(move || {
                let conn = router.connect().unwrap();
                let body = json!({"source": card}).to_string();
                barrier.wait();
                conn.send(
                    "POST",
                    &format!("/v1/customers/{cust}/tokens"),
                    &[("Idempotency-Key", "attach-1")],
                    Some(body.as_bytes()),
                )
                .unwrap()
            })
        })
        .collect();
    let results: Vec<Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let created: HashSet<String> = results
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    for r in &results {
        assert!(
            r.status == 201 || r.code() == "idempotency_in_progress",
            "{}: {}",
            r.status,
            r.body
        );
    }
    assert_eq!(
        router.get(&format!("/v1/customers/{cust}/tokens")).json()["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // After the race, a replay answers with the one token.
    let replay = router
        .send(
            "POST",
            &format!("/v1/customers/{cust}/tokens"),
            &[("Idempotency-Key", "attach-1")],
            Some(json!({"source": card}).to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(
        replay.json()["id"].as_str(),
        created.iter().next().map(String::as_str)
    );
}

/// A client that times out and goes away mid-request, then retries with the same key, never
/// gets a second object: the first request runs to its end and records its outcome whether
/// or not anyone is still waiting for it.
fn an_abandoned_request_and_its_retry_make_one_object(engine: Engine) {
    let Some(setup) = Setup::on(engine, "idem-abandon") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let rounds = 40u32;
    for round in 0..rounds {
        let key = format!("abandoned-{round}");
        let body = card_body(&test_pan(700 + round)).to_string();
        let headers = [("Idempotency-Key", key.as_str())];
        router
            .connect()
            .unwrap()
            .send_and_abandon(
                "POST",
                "/v1/cards",
                &headers,
                Some(body.as_bytes()),
                // From before the request is read to while its write waits for the disk.
                Duration::from_micros(u64::from(round) * 100),
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = router
                .send("POST", "/v1/cards", &headers, Some(body.as_bytes()))
                .unwrap();
            if res.status == 201 {
                break;
            }
            assert_eq!(res.code(), "idempotency_in_progress", "{}", res.body);
            assert!(Instant::now() < deadline, "the key stayed in progress");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    daemon.stop();
    // Counted in the store itself: a request dropped mid-write would have audited nothing.
    assert_eq!(
        setup.stored_cards(),
        rounds as usize,
        "a retry made a second card"
    );
}

fn customers_and_tokens_are_isolated_by_project(engine: Engine) {
    let Some(setup) = Setup::on(engine, "cust-projects") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let (a, b) = (router.in_project("shop-a"), router.in_project("shop-b"));
    let cust = new_customer(&a);
    let card = tokenize(&a, VISA)["id"].as_str().unwrap().to_owned();
    let tok = attach(&a, &cust, &card, None).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    assert_eq!(b.get(&format!("/v1/customers/{cust}")).code(), "not_found");
    assert_eq!(
        b.get(&format!("/v1/customers/{cust}/tokens")).code(),
        "not_found"
    );
    assert_eq!(
        b.get(&format!("/v1/customers/{cust}/tokens/{tok}")).code(),
        "not_found"
    );
    assert_eq!(detokenize(&b, &tok).code(), "not_found");
    assert_eq!(
        send(&b, "DELETE", &format!("/v1/customers/{cust}"), None).code(),
        "not_found"
    );
    let b_card = tokenize(&b, VISA)["id"].as_str().unwrap().to_owned();
    assert_eq!(attach(&b, &cust, &b_card, None).code(), "not_found");
    // A shop-b customer cannot take shop-a's card token either.
    let b_cust = new_customer(&b);
    let a_card = tokenize(&a, VISA)["id"].as_str().unwrap().to_owned();
    assert_eq!(attach(&b, &b_cust, &a_card, None).code(), "not_found");
    // Still all there for shop-a.
    assert_eq!(detokenize(&a, &tok).json()["number"], VISA);
    assert_eq!(a.get(&format!("/v1/customers/{cust}")).status, 200);
}

fn no_contact_details_or_pan_at_rest_or_in_logs(engine: Engine) {
    let Some(setup) = Setup::on_with_level(engine, "cust-atrest", "", "trace") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let pans = [test_pan(77), "5555555555554444".to_owned()];
    for pan in &pans {
        let cust = new_customer(&router);
        let card = tokenize(&router, pan)["id"].as_str().unwrap().to_owned();
        let tok = attach(&router, &cust, &card, Some(json!({"model": "unscheduled"}))).json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(detokenize(&router, &tok).status, 200);
    }
    let output = daemon.stop();
    let (store_dir, dump) = setup.store_at_rest();
    assert!(!files_below(&store_dir).is_empty());
    if setup.pg.is_some() {
        assert!(
            contains(&dump, b"COPY public.customers"),
            "the dump holds no customers"
        );
    }
    for needle in [
        EMAIL,
        PHONE,
        "Grace Hopper",
        "1 Navy Way",
        pans[0].as_str(),
        pans[1].as_str(),
    ] {
        let hits = files_containing(&store_dir, needle.as_bytes());
        assert!(hits.is_empty(), "{needle:?} in plaintext in {hits:?}");
        let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(
            !contains(&dump, needle.as_bytes()) && !contains(&dump, hex.as_bytes()),
            "{needle:?} in the database dump"
        );
        assert!(!output.contains(needle), "{needle:?} in the log");
    }
    assert!(
        output.contains("customer_token.create"),
        "the log scan saw no customer token at all"
    );
}

fn acknowledged_customer_tokens_survive_kill_9(engine: Engine) {
    let Some(setup) = Setup::on(engine, "cust-kill9") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cust = new_customer(&router);
    let cards: Vec<(String, String)> = (0..24)
        .map(|i| {
            (
                tokenize(&router, &test_pan(500 + i))["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                test_pan(500 + i),
            )
        })
        .collect();
    let handles: Vec<_> = cards
        .chunks(6)
        .map(|chunk| {
            let (router, chunk, cust) = (router.clone(), chunk.to_vec(), cust.clone());
            std::thread::spawn(move || {
                chunk
                    .into_iter()
                    .map(|(card, pan)| {
                        let res = attach(&router, &cust, &card, None);
                        assert_eq!(res.status, 201, "{}", res.body);
                        (card, res.json()["id"].as_str().unwrap().to_owned(), pan)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let made: Vec<(String, String, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    daemon.kill9();

    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    assert_eq!(
        router.get(&format!("/v1/customers/{cust}/tokens")).json()["data"]
            .as_array()
            .unwrap()
            .len(),
        made.len()
    );
    for (card, tok, pan) in &made {
        let res = detokenize(&router, tok);
        assert_eq!(res.status, 200, "{tok}: {}", res.body);
        assert_eq!(res.json()["number"], pan.as_str());
        assert_eq!(
            detokenize(&router, card).code(),
            "token_used",
            "{card} usable again after the crash"
        );
    }
}
