//! Crash harness: the daemon is killed with SIGKILL at random moments under mixed load, again
//! and again, and every state a client was told about must be there after each restart.
//!
//! Cycles: `CARDVAULT_CRASH_CYCLES` (default 20). The load mixes tokenize, one-off
//! detokenization, attaching card tokens to a customer, and reusable detokenization, with
//! several clients racing for the same card tokens on purpose.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[derive(Default)]
struct Seen {
    /// Card tokens whose creation was acknowledged, with their PAN.
    cards: HashMap<String, String>,
    /// Card tokens a client saw used (a 200 detokenize or a 201 attach), and how often.
    used: HashMap<String, usize>,
    /// Customer tokens whose creation was acknowledged, with their PAN.
    tokens: HashMap<String, String>,
    /// Ids made or used in the current cycle: checked in full after the next restart.
    recent: HashSet<String>,
}

/// A small deterministic generator, so a failing cycle can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn post(client: &Client, path: &str, body: &serde_json::Value) -> Option<Response> {
    client
        .send("POST", path, &[], Some(body.to_string().as_bytes()))
        .ok()
}

both_engines!(kill_9_at_random_moments_loses_nothing_acknowledged);

fn kill_9_at_random_moments_loses_nothing_acknowledged(engine: Engine) {
    let cycles: u64 = std::env::var("CARDVAULT_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Some(setup) = Setup::on(engine, "crash") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let res = router.post("/v1/customers", &json!({"name": "Crash Test"}));
    let customer = res.json()["id"].as_str().unwrap().to_owned();
    let mut daemon = Some(daemon);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut rng = Lcg(0x5eed);
    let mut pan_counter = 0u32;

    for cycle in 0..cycles {
        let live = daemon.take().unwrap_or_else(|| setup.start());
        let router = setup.client(&live, &setup.router());
        check(&router, &mut seen.lock().unwrap(), cycle, false);

        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..8u32)
            .map(|w| {
                let (router, seen, stop, customer) =
                    (router.clone(), seen.clone(), stop.clone(), customer.clone());
                let mut rng = Lcg(rng.next() ^ u64::from(w));
                let first_pan = pan_counter + w * 10_000;
                std::thread::spawn(move || {
                    let mut n = first_pan;
                    while !stop.load(Ordering::SeqCst) {
                        let pick = |seen: &Seen, rng: &mut Lcg| {
                            let ids: Vec<&String> = seen.cards.keys().collect();
                            (!ids.is_empty()).then(|| ids[rng.next() as usize % ids.len()].clone())
                        };
                        match rng.next() % 4 {
                            0 | 1 => {
                                n += 1;
                                let pan = test_pan(200_000 + n);
                                if let Some(res) = post(&router, "/v1/cards", &card_body(&pan)) {
                                    if res.status == 201 {
                                        let id = res.json()["id"].as_str().unwrap().to_owned();
                                        let mut seen = seen.lock().unwrap();
                                        seen.recent.insert(id.clone());
                                        seen.cards.insert(id, pan);
                                    }
                                }
                            }
                            2 => {
                                let Some(card) = pick(&seen.lock().unwrap(), &mut rng) else {
                                    continue;
                                };
                                let (path, body) = if rng.next().is_multiple_of(2) {
                                    ("/v1/detokenize".to_owned(), json!({"token": card}))
                                } else {
                                    (
                                        format!("/v1/customers/{customer}/tokens"),
                                        json!({"source": card}),
                                    )
                                };
                                if let Some(res) = post(&router, &path, &body) {
                                    let mut seen = seen.lock().unwrap();
                                    if matches!(res.status, 200 | 201) {
                                        *seen.used.entry(card.clone()).or_default() += 1;
                                        seen.recent.insert(card.clone());
                                        if res.status == 201 || res.json().get("token").is_some() {
                                            let pan = seen.cards[&card].clone();
                                            let token =
                                                res.json()["id"].as_str().unwrap().to_owned();
                                            seen.recent.insert(token.clone());
                                            seen.tokens.insert(token, pan);
                                        }
                                    } else {
                                        assert!(
                                            res.status == 409 || res.status == 503,
                                            "cycle {cycle}: {} {}",
                                            res.status,
                                            res.body
                                        );
                                    }
                                }
                            }
                            _ => {
                                let token = {
                                    let seen = seen.lock().unwrap();
                                    let ids: Vec<&String> = seen.tokens.keys().collect();
                                    (!ids.is_empty())
                                        .then(|| ids[rng.next() as usize % ids.len()].clone())
                                };
                                let Some(token) = token else { continue };
                                if let Some(res) = post(
                                    &router,
                                    "/v1/detokenize",
                                    &json!({"token": token, "reason": "mit"}),
                                ) {
                                    if res.status == 200 {
                                        let want = seen.lock().unwrap().tokens[&token].clone();
                                        assert_eq!(
                                            res.json()["number"],
                                            want.as_str(),
                                            "cycle {cycle}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        pan_counter += 8 * 10_000;
        std::thread::sleep(Duration::from_millis(150 + rng.next() % 600));
        live.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().unwrap();
        }
        let seen = seen.lock().unwrap();
        let twice: Vec<_> = seen.used.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "cycle {cycle}: card tokens used twice: {twice:?}"
        );
    }
    let live = setup.start();
    let router = setup.client(&live, &setup.router());
    let mut seen = seen.lock().unwrap();
    check(&router, &mut seen, cycles, true);
    assert!(
        seen.cards.len() > 50 && !seen.used.is_empty() && !seen.tokens.is_empty(),
        "the load did too little to mean anything"
    );
}

/// What was acknowledged is there: cards exist, used cards stay used, customer tokens give
/// their card. After each restart: everything from the last cycle plus a tenth of the rest;
/// at the end, everything. Checked from 8 threads.
fn check(router: &Client, seen: &mut Seen, cycle: u64, full: bool) {
    enum Expect {
        Card { used: bool },
        Token { pan: String },
    }
    let wanted = |id: &String| {
        full || seen.recent.contains(id) || id.bytes().map(u32::from).sum::<u32>() % 10 == 0
    };
    let mut work: Vec<(String, Expect)> = Vec::new();
    for id in seen.cards.keys().filter(|id| wanted(id)) {
        work.push((
            id.clone(),
            Expect::Card {
                used: seen.used.contains_key(id),
            },
        ));
    }
    for (token, pan) in seen.tokens.iter().filter(|(id, _)| wanted(id)) {
        work.push((token.clone(), Expect::Token { pan: pan.clone() }));
    }
    let chunk = work.len().div_ceil(8).max(1);
    let mut work = work.into_iter();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let part: Vec<(String, Expect)> = work.by_ref().take(chunk).collect();
            let router = router.clone();
            std::thread::spawn(move || {
                for (id, expect) in part {
                    match expect {
                        Expect::Card { used } => {
                            let res = router.get(&format!("/v1/cards/{id}"));
                            assert_eq!(
                                res.status, 200,
                                "cycle {cycle}: acknowledged card {id} lost: {}",
                                res.body
                            );
                            if used {
                                assert_eq!(
                                    res.json()["used"],
                                    true,
                                    "cycle {cycle}: used card {id} came back unused"
                                );
                            }
                        }
                        Expect::Token { pan } => {
                            let res = router.post("/v1/detokenize", &json!({"token": id}));
                            assert_eq!(
                                res.status, 200,
                                "cycle {cycle}: customer token {id} lost: {}",
                                res.body
                            );
                            assert_eq!(res.json()["number"], pan.as_str());
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    seen.recent.clear();
}
