//! The PAN-recovery oracle: an identity without `detokenize` must learn no more of a card than
//! its truncation, however many cards it tokenizes, reads or attaches.
//!
//! The attack: read the target card's metadata (BIN and last 4), tokenize every Luhn-valid
//! candidate for the hidden digits, and look for the one candidate whose answer differs from
//! the others the way only the same PAN's would (a matching fingerprint, or attach reporting
//! the customer already holds it). The target's hidden digits start with `00`, so an attacker
//! enumerating candidates in order reaches it within the first 2,000 whether it sees 6 or 8
//! leading digits: the test fails if any signal singles it out.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::support::*;

both_engines!(attach_cannot_recover_a_pan_through_deduplication,);

const CANDIDATES: usize = 2000;

/// The target: a Visa number whose 7th and 8th digits are `00`, the rest unpredictable.
fn target_pan() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    cardvault::card::luhn_complete(&format!("41111100{:04}123", nanos % 10_000), 16)
}

fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The first `n` Luhn-valid 16-digit numbers with the leading digits and last 4 the caller was
/// shown (`iin8` when shown, else `iin`), in ascending order of the hidden digits.
fn candidates(shown: &Value, n: usize) -> Vec<String> {
    let lead = shown["iin8"]
        .as_str()
        .or(shown["iin"].as_str())
        .unwrap()
        .to_owned();
    let last4 = shown["last4"].as_str().unwrap();
    let hidden = 16 - lead.len() - 4;
    (0..10u64.pow(hidden as u32))
        .map(|m| format!("{lead}{m:0hidden$}{last4}"))
        .filter(|pan| luhn_valid(pan))
        .take(n)
        .collect()
}

/// What a view shows that was derived from the card number: everything but the object's own
/// id, timestamps, state and the request-specific fields.
fn pan_derived(view: &Value) -> Value {
    let mut v = view.clone();
    if let Some(map) = v.as_object_mut() {
        for field in [
            "id",
            "object",
            "token",
            "customer",
            "created_at",
            "updated_at",
            "expires_at",
            "used",
            "duplicate",
            "recurring",
        ] {
            map.remove(field);
        }
    }
    v
}

/// The attack over plain tokenize + read, as an identity holding just those (the shipped
/// checkout edge): no candidate may stand out from the others.
#[test]
fn tokenize_and_read_cannot_recover_a_pan() {
    let setup = Setup::new("oracle-read");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let checkout = setup.client(&daemon, &setup.checkout());
    let target = target_pan();
    let id = {
        let res = router.post("/v1/cards", &card_body(&target));
        assert_eq!(res.status, 201, "{}", res.body);
        res.json()["id"].as_str().unwrap().to_owned()
    };
    // The router (fingerprint, show_iin8) still sees both.
    let full = router.get(&format!("/v1/cards/{id}")).json();
    assert_eq!(full["iin8"], &target[..8]);
    assert_eq!(full["fingerprint"].as_str().unwrap().len(), 64);

    let mut session = checkout.session();
    let shown = session.get(&format!("/v1/cards/{id}")).json();
    assert_eq!(shown["iin"], &target[..6]);
    let list = candidates(&shown, CANDIDATES);
    assert!(list.contains(&target), "the enumeration reaches the target");
    // Every answer the caller gets, by what it says about the card: all candidates must be
    // answered alike, or the odd one out is the target.
    let mut outcomes: HashMap<String, Vec<&String>> = HashMap::new();
    for pan in &list {
        let res = session.post("/v1/cards", &card_body(pan));
        let mut seen = format!("{} {}", res.status, pan_derived(&res.json()));
        if res.status == 201 {
            let read = session.get(&format!("/v1/cards/{}", res.json()["id"].as_str().unwrap()));
            seen += &format!(" {} {}", read.status, pan_derived(&read.json()));
        }
        outcomes.entry(seen).or_default().push(pan);
    }
    assert_eq!(
        outcomes.len(),
        1,
        "checkout told {} candidates apart ({} answers; the target's was shared by {})",
        list.len(),
        outcomes.len(),
        outcomes
            .values()
            .find(|p| p.contains(&&target))
            .map_or(0, Vec::len)
    );
    // And that one answer is the target's own truncation, nothing more.
    let only = outcomes.keys().next().unwrap();
    assert!(only.ends_with(&pan_derived(&shown).to_string()), "{only}");
    assert!(
        shown.get("fingerprint").is_none() && shown.get("iin8").is_none(),
        "checkout sees more than BIN-6 and last 4: {shown}"
    );
}

/// The attack through customers: attach each candidate to the customer that holds the target
/// and watch for `duplicate`, a 200 instead of 201, the existing token's id coming back, or a
/// view that matches; delete what it made so the customer never fills up.
fn attach_cannot_recover_a_pan_through_deduplication(engine: Engine) {
    let Some(setup) = Setup::on(engine, "oracle-attach") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let edge = setup.client(&daemon, &setup.identity(&spec("edge")));
    let target = target_pan();
    let cust = router.post("/v1/customers", &json!({})).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let card = router.post("/v1/cards", &card_body(&target)).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tokens = format!("/v1/customers/{cust}/tokens");
    let res = router.post(&tokens, &json!({"source": card}));
    assert_eq!(res.status, 201, "{}", res.body);
    let held = res.json()["id"].as_str().unwrap().to_owned();

    let mut session = edge.session();
    let listed = session.get(&tokens).json();
    let shown = listed["data"][0].clone();
    assert_eq!(shown["id"], held.as_str());
    let list = candidates(&shown, CANDIDATES);
    assert!(list.contains(&target), "the enumeration reaches the target");
    let mut outcomes: HashMap<String, Vec<&String>> = HashMap::new();
    for pan in &list {
        let made = session.post("/v1/cards", &card_body(pan));
        assert_eq!(made.status, 201, "{}", made.body);
        let source = made.json()["id"].as_str().unwrap().to_owned();
        let res = session.post(&tokens, &json!({"source": source}));
        assert!(
            res.status == 200 || res.status == 201,
            "{}: {}",
            res.status,
            res.body
        );
        let token = res.json();
        let id = token["id"].as_str().unwrap().to_owned();
        let listed = session.get(&tokens).json()["data"]
            .as_array()
            .unwrap()
            .len();
        let seen = format!(
            "{} {} {} {} {listed}",
            res.status,
            token["duplicate"],
            id == held,
            pan_derived(&token)
        );
        outcomes.entry(seen).or_default().push(pan);
        if id != held {
            let gone = session
                .send("DELETE", &format!("{tokens}/{id}"), None)
                .unwrap();
            assert_eq!(gone.status, 200, "{}", gone.body);
        }
    }
    assert_eq!(
        outcomes.len(),
        1,
        "edge told {} candidates apart ({} answers; the target's was shared by {})",
        list.len(),
        outcomes.len(),
        outcomes
            .values()
            .find(|p| p.contains(&&target))
            .map_or(0, Vec::len)
    );
    assert!(
        shown.get("fingerprint").is_none() && shown.get("iin8").is_none(),
        "edge sees more than BIN-6 and last 4: {shown}"
    );
    // The router, which may see fingerprints, still gets deduplication.
    let again = router.post("/v1/cards", &card_body(&target)).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = router.post(&tokens, &json!({"source": again}));
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["id"], held.as_str());
}

/// The other way round: cards attached to a customer by a caller without `fingerprint` never
/// take part in a fingerprint holder's deduplication. Else the router's routine attach of the
/// customer's card would land on (update, and not add beside) the one candidate that is the
/// same card, and the caller that attached the candidates would read which one it was.
#[test]
fn attaches_by_a_fingerprint_holder_never_land_on_another_callers_tokens() {
    let setup = Setup::new("oracle-reattach");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let edge = setup.client(&daemon, &setup.identity(&spec("edge")));
    let target = target_pan();
    let cust = router.post("/v1/customers", &json!({})).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tokens = format!("/v1/customers/{cust}/tokens");
    let attach = |client: &Client, pan: &str| {
        let card = client.post("/v1/cards", &card_body(pan)).json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        client.post(&tokens, &json!({"source": card}))
    };
    let others = [test_pan(1), test_pan(2)];
    let mut made = Vec::new();
    for pan in [&target, &others[0], &others[1]] {
        let res = attach(&edge, pan);
        assert_eq!(res.status, 201, "{}", res.body);
        made.push(res.json());
    }
    let before = edge.get(&tokens).json()["data"].clone();

    // The router attaches the customer's real card: a token of its own, beside the others.
    let res = attach(&router, &target);
    assert_eq!(res.status, 201, "landed on a token edge made: {}", res.body);
    let routers = res.json()["id"].as_str().unwrap().to_owned();
    assert!(made.iter().all(|t| t["id"] != routers.as_str()));
    let after = edge.get(&tokens).json()["data"].as_array().unwrap().clone();
    assert_eq!(after.len(), 4);
    for old in before.as_array().unwrap() {
        assert!(after.contains(old), "edge's token changed: {old}");
    }
    // The router still deduplicates against its own token.
    let res = attach(&router, &target);
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["id"], routers.as_str());
}
