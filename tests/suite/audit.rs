//! The audit trail: one chained line per audited event, with who, from where, on what; never
//! card data; `audit verify` catches every kind of tampering; an unwritable log refuses
//! requests before they act.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

both_engines!(rotating_the_audit_key_continues_the_chain_in_a_new_file);

fn audit_lines(setup: &Setup) -> Vec<serde_json::Value> {
    std::fs::read_to_string(setup.root().join("audit/audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn verify(setup: &Setup, log: &Path, rotated: bool) -> (bool, String) {
    verify_all(setup, &[log], rotated)
}

fn verify_all(setup: &Setup, logs: &[&Path], rotated: bool) -> (bool, String) {
    let mut args = vec!["audit", "verify"];
    args.extend(logs.iter().map(|l| l.to_str().unwrap()));
    if rotated {
        args.push("--rotated");
    }
    setup.try_cli(&args)
}

#[test]
fn every_audited_event_makes_one_chained_line_without_card_data() {
    let setup = Setup::with_custodians("audit", "", &["alice", "bob"], 2);
    let daemon = setup.start();
    // Unseal: one success, one refusal (Alice's share under Bob's certificate), the last one.
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    let (ok, _) = setup.unseal(
        &daemon,
        &setup.identity(&spec("bob")),
        &setup.share("alice"),
        &setup.passphrase_file("alice", 1),
    );
    assert!(!ok);
    assert!(setup.unseal_as(&daemon, "bob", 1).0);

    let router = setup.client(&daemon, &setup.router());
    let pan = test_pan(7);
    let card = router.post("/v1/cards", &card_body(&pan)).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let detok = json!({"token": card, "reason": "cit", "reference": "order-77"});
    assert_eq!(router.post("/v1/detokenize", &detok).status, 200);
    assert_eq!(router.post("/v1/detokenize", &detok).status, 409);
    // A policy denial: checkout may not detokenize.
    let checkout = setup.client(&daemon, &setup.checkout());
    assert_eq!(checkout.post("/v1/detokenize", &detok).status, 403);
    // Customer and customer-token changes.
    let cust = router
        .post("/v1/customers", &json!({"email": "ada@example.com"}))
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = send(
        &router,
        "PATCH",
        &format!("/v1/customers/{cust}"),
        Some(&json!({"name": "Ada"})),
    );
    assert_eq!(res.status, 200);
    let card2 = router.post("/v1/cards", &card_body(&test_pan(8))).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tok = router
        .post(
            &format!("/v1/customers/{cust}/tokens"),
            &json!({"source": card2}),
        )
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = send(
        &router,
        "PATCH",
        &format!("/v1/customers/{cust}/tokens/{tok}"),
        Some(&json!({"recurring": {"model": "subscription"}})),
    );
    assert_eq!(res.status, 200);
    // Metadata reads: who read which card, customer, token or token list.
    assert_eq!(checkout.get(&format!("/v1/cards/{card}")).status, 200);
    assert_eq!(router.get(&format!("/v1/customers/{cust}")).status, 200);
    let tokens = format!("/v1/customers/{cust}/tokens");
    assert_eq!(router.get(&tokens).status, 200);
    assert_eq!(router.get(&format!("{tokens}/{tok}")).status, 200);
    let unknown = "card_1xYp7yA0D0TtlZ0maeMeHG1ynuKPNC6Y";
    assert_eq!(checkout.get(&format!("/v1/cards/{unknown}")).status, 404);
    let res = send(
        &router,
        "DELETE",
        &format!("/v1/customers/{cust}/tokens/{tok}"),
        None,
    );
    assert_eq!(res.status, 200);
    let res = send(&router, "DELETE", &format!("/v1/customers/{cust}"), None);
    assert_eq!(res.status, 200);
    // A key operation.
    let res = setup
        .client(&daemon, &setup.ops())
        .post("/v1/admin/keys/rotate", &json!({}));
    assert_eq!(res.status, 200);
    let logs = daemon.stop();

    let lines = audit_lines(&setup);
    let mut counts: HashMap<(String, String), usize> = HashMap::new();
    for l in &lines {
        let key = (
            l["event"].as_str().unwrap().to_owned(),
            l["outcome"].as_str().unwrap().to_owned(),
        );
        *counts.entry(key).or_default() += 1;
    }
    let expect = |event: &str, outcome: &str, n: usize| {
        assert_eq!(
            counts
                .get(&(event.into(), outcome.into()))
                .copied()
                .unwrap_or(0),
            n,
            "{event} {outcome}: {counts:?}"
        );
    };
    expect("daemon.start", "success", 1);
    expect("keys.unseal", "success", 2);
    expect("keys.unseal", "failure", 1);
    expect("card.tokenize", "success", 2);
    expect("card.detokenize", "success", 1);
    expect("card.detokenize", "failure", 1);
    expect("policy.denied", "failure", 1);
    expect("customer.create", "success", 1);
    expect("customer.update", "success", 1);
    expect("customer.delete", "success", 1);
    expect("customer_token.create", "success", 1);
    expect("card.read", "success", 1);
    expect("card.read", "failure", 1);
    expect("customer.read", "success", 1);
    expect("customer_token.list", "success", 1);
    expect("customer_token.read", "success", 1);
    expect("customer_token.update", "success", 1);
    expect("customer_token.delete", "success", 1);
    expect("keys.rotate", "success", 1);
    expect("daemon.stop", "success", 1);
    assert_eq!(lines.len(), counts.values().sum::<usize>());

    // Fields: who (policy name, certificate subject and fingerprint), from where, on what.
    let detokenized = lines
        .iter()
        .find(|l| l["event"] == "card.detokenize" && l["outcome"] == "success")
        .unwrap();
    assert_eq!(detokenized["identity"], "router");
    assert!(detokenized["subject"].as_str().unwrap().contains("router"));
    assert_eq!(detokenized["fingerprint"].as_str().unwrap().len(), 64);
    assert!(detokenized["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(detokenized["project"], "default");
    assert_eq!(detokenized["object"], card.as_str());
    assert_eq!(detokenized["reason"], "cit");
    assert_eq!(detokenized["reference"], "order-77");
    assert!(detokenized["time"].as_str().unwrap().ends_with('Z'));
    let used = lines
        .iter()
        .find(|l| l["event"] == "card.detokenize" && l["outcome"] == "failure")
        .unwrap();
    assert_eq!(used["code"], "token_used");
    let denied = lines
        .iter()
        .find(|l| l["event"] == "policy.denied")
        .unwrap();
    assert_eq!(denied["identity"], "checkout");
    let read = lines
        .iter()
        .find(|l| l["event"] == "card.read" && l["outcome"] == "success")
        .unwrap();
    assert_eq!(
        (read["identity"].as_str(), read["object"].as_str()),
        (Some("checkout"), Some(card.as_str()))
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as u64 + 1);
    }
    // Never a PAN or CVC, in the audit file or the log.
    let text = std::fs::read_to_string(setup.root().join("audit/audit.log")).unwrap();
    // (The CVC is three digits, which hex MACs contain by chance: look for it as a value.)
    for secret in [pan.as_str(), &test_pan(8), "\"737\"", "cvc", "number"] {
        assert!(!text.contains(secret), "{secret} in the audit file");
    }
    assert!(!logs.contains(&pan));

    // `audit verify`: intact, then each kind of tampering, named by line.
    let log = setup.root().join("audit/audit.log");
    let (ok, out) = verify(&setup, &log, false);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{} lines", lines.len())), "{out}");
    let original: Vec<String> = text.lines().map(|l| format!("{l}\n")).collect();
    let head = std::fs::read_to_string(setup.root().join("audit/audit.log.head")).unwrap();
    let flipped = {
        let mut l = original.clone();
        l[4] = l[4].replacen("success", "failure", 1);
        l
    };
    let cases: Vec<(&str, Vec<String>, usize)> = vec![
        ("flipped", flipped, 5),
        ("deleted", [&original[..3], &original[4..]].concat(), 4),
        (
            "reordered",
            [
                &original[..2],
                &original[3..4],
                &original[2..3],
                &original[4..],
            ]
            .concat(),
            3,
        ),
        ("inserted", [&original[..3], &original[1..]].concat(), 4),
        (
            "truncated",
            original[..original.len() - 2].to_vec(),
            original.len() - 1,
        ),
    ];
    for (name, tampered, line) in cases {
        let path = setup.root().join(format!("{name}.log"));
        std::fs::write(&path, tampered.concat()).unwrap();
        std::fs::write(setup.root().join(format!("{name}.log.head")), &head).unwrap();
        let (ok, out) = verify(&setup, &path, false);
        assert!(!ok, "{name}: verify passed");
        assert!(out.contains(&format!("line {line}:")), "{name}: {out}");
    }
    // A tail cut mid-line.
    let path = setup.root().join("cut.log");
    std::fs::write(&path, &text[..text.len() - 7]).unwrap();
    let (ok, out) = verify(&setup, &path, false);
    assert!(
        !ok && out.contains(&format!("line {}:", lines.len())),
        "{out}"
    );
}

#[test]
fn an_unwritable_audit_log_refuses_requests_before_they_act() {
    let setup = Setup::new("audit-closed");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let pan = test_pan(3);
    let card = router.post("/v1/cards", &card_body(&pan)).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = setup.root().join("audit/audit.log");
    std::fs::rename(&log, setup.root().join("audit/moved.log")).unwrap();
    std::fs::create_dir(&log).unwrap();
    let wait = |status: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = router.get(&format!("/v1/cards/{card}"));
            if res.status == status {
                return res;
            }
            assert!(
                Instant::now() < deadline,
                "still {}: {}",
                res.status,
                res.body
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(wait(503).code(), "audit_unavailable");
    let res = router.get("/v1/health");
    assert_eq!(
        (res.status, res.json()["status"].as_str()),
        (503, Some("unavailable"))
    );
    let res = router.post("/v1/detokenize", &json!({"token": card}));
    assert_eq!((res.status, res.code()), (503, "audit_unavailable".into()));
    assert!(!res.body.contains(&pan));
    let res = router.post("/v1/cards", &card_body(&test_pan(4)));
    assert_eq!(res.status, 503);

    // Repaired: serving again, and the refused detokenization never used the token up.
    std::fs::remove_dir(&log).unwrap();
    wait(200);
    assert_eq!(router.get("/v1/health").status, 200);
    let res = router.post("/v1/detokenize", &json!({"token": card}));
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["number"], pan.as_str());
    daemon.stop();
    // The chain continues in the new file: both verify together, oldest first.
    let moved = setup.root().join("audit/moved.log");
    let (ok, out) = verify_all(&setup, &[&moved, &log], false);
    assert!(ok, "{out}");
    // The live file alone starts mid-chain: refused unless declared a continuation.
    let (ok, out) = verify(&setup, &log, false);
    assert!(!ok && out.contains("line 1:"), "{out}");
    assert!(verify(&setup, &log, true).0);
    // The rotated part's tail cut: the live file no longer continues it.
    let text = std::fs::read_to_string(&moved).unwrap();
    let mut kept: Vec<&str> = text.lines().collect();
    kept.pop();
    let cut = setup.root().join("audit/cut.log");
    std::fs::write(
        &cut,
        kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let (ok, out) = verify_all(&setup, &[&cut, &log], false);
    assert!(!ok && out.contains("does not continue"), "{out}");
}

#[test]
fn detokenization_limits_answer_429_and_are_audited() {
    let setup = Setup::new("limits");
    let policy = POLICY.replace(
        "name = \"router\"\n",
        // One a minute after a burst of 3: slow CI machines refill nothing during the test.
        "name = \"router\"\ndetokenize_per_second = 0.016\ndetokenize_burst = 3\n",
    )
        + "\n[[identity]]\nname = \"prober\"\nuri_san = \"spiffe://cardvault.test/prober\"\n\
         permissions = [\"detokenize\"]\nprojects = [\"*\"]\nunknown_tokens_per_minute = 5\n";
    write(&setup.policy, &policy);
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cards: Vec<String> = (0..10)
        .map(|i| {
            router.post("/v1/cards", &card_body(&test_pan(i))).json()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // A burst above the rate: the burst allowance passes, the rest is refused.
    let statuses: Vec<u16> = cards
        .iter()
        .map(|c| router.post("/v1/detokenize", &json!({"token": c})).status)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok, 3, "{statuses:?}");
    assert_eq!(limited, cards.len() - 3, "{statuses:?}");
    let res = router.post("/v1/detokenize", &json!({"token": cards[9]}));
    assert_eq!(res.code(), "rate_limited");
    // The refused cards were not used up.
    for (card, status) in cards.iter().zip(&statuses) {
        let used = router.get(&format!("/v1/cards/{card}")).json()["used"] == true;
        assert_eq!(used, *status == 200, "{card}");
    }

    // Enumeration: five unknown tokens, then the prober is refused even a real one.
    let prober = setup.client(&daemon, &setup.identity(&spec("prober")));
    for i in 0..5 {
        let res = prober.post(
            "/v1/detokenize",
            &json!({"token": format!("card_{i:0>32}")}),
        );
        assert_eq!(res.status, 404, "{}", res.body);
    }
    let res = prober.post("/v1/detokenize", &json!({"token": cards[8]}));
    assert_eq!((res.status, res.code()), (429, "rate_limited".into()));
    daemon.stop();

    let lines = audit_lines(&setup);
    let refused: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["event"] == "limit.detokenize")
        .collect();
    assert_eq!(refused.len(), limited + 2, "{refused:?}");
    assert!(refused.iter().all(|l| l["code"] == "rate_limited"));
    assert!(refused
        .iter()
        .any(|l| l["identity"] == "router" && l["reason"].as_str().unwrap().contains("rate")));
    assert!(refused
        .iter()
        .any(|l| l["identity"] == "prober"
            && l["reason"].as_str().unwrap().contains("unknown tokens")));
}

/// `audit rotate-key`, the daemon stopped: the old log and key move aside and still verify
/// together; the new log, under a new key, continues the chain from the old last line, and
/// the daemon carries on writing it. A running daemon holds the log: refused, on either engine.
fn rotating_the_audit_key_continues_the_chain_in_a_new_file(engine: Engine) {
    let Some(setup) = Setup::on(engine, "audit-rotate") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    assert_eq!(
        router.post("/v1/cards", &card_body(&test_pan(1))).status,
        201
    );
    let (ok, out) = setup.try_cli(&["audit", "rotate-key"]);
    assert!(!ok && out.contains("stop it first"), "{out}");
    daemon.stop();

    let log = setup.root().join("audit/audit.log");
    let old_lines = audit_lines(&setup);
    let old_last = old_lines.last().unwrap().clone();
    let (ok, out) = setup.try_cli(&["audit", "rotate-key"]);
    assert!(ok, "{out}");
    let moved: Vec<_> = std::fs::read_dir(setup.root().join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("audit.log.") && !name.ends_with(".head") && !name.ends_with(".lock")
        })
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    let old_key: Vec<_> = std::fs::read_dir(&setup.keys_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit.key.")
        })
        .collect();
    assert_eq!(old_key.len(), 1, "{old_key:?}");

    // The old file verifies under the old key only; the new one starts where it ended.
    let verify = |file: &Path, extra: &[&str]| {
        let mut args = vec!["audit", "verify", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        setup.try_cli(&args)
    };
    let old_key = old_key[0].to_str().unwrap().to_owned();
    assert!(verify(&moved[0], &["--key", &old_key]).0);
    assert!(
        !verify(&moved[0], &[]).0,
        "the old file verified under the new key"
    );
    let first = audit_lines(&setup)[0].clone();
    assert_eq!(first["event"], "audit.key_rotated");
    assert_eq!(first["seq"], old_last["seq"].as_u64().unwrap() + 1);
    assert_eq!(first["prev"], old_last["mac"]);
    let (ok, out) = verify(&log, &["--rotated"]);
    assert!(ok, "{out}");

    // The daemon goes on writing the new file under the new key.
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    assert_eq!(
        router.post("/v1/cards", &card_body(&test_pan(2))).status,
        201
    );
    daemon.stop();
    let (ok, out) = verify(&log, &["--rotated"]);
    assert!(ok, "{out}");
    assert!(audit_lines(&setup).len() > 2);
}

/// `[audit] rotate_mb`: past the size the serving daemon renames its log into a part named by
/// its last seq and goes on in a new one; the part is compressed (`[audit] compress`, the
/// default) into a 0600 `.gz` that gzip reads back; `audit verify` with no file checks the
/// parts and the live log as one chain, across a restart; without the part, the set fails.
#[test]
fn the_audit_log_rotates_by_size_and_verifies_as_one_chain() {
    let setup = Setup::new("audit-size");
    let config = std::fs::read_to_string(&setup.config).unwrap();
    assert!(config.contains("[audit]\n"));
    std::fs::write(
        &setup.config,
        config.replace("[audit]\n", "[audit]\nrotate_mb = 1\n"),
    )
    .unwrap();
    let parts = || -> Vec<std::path::PathBuf> {
        let mut found: Vec<_> = std::fs::read_dir(setup.root().join("audit"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.strip_prefix("audit.log.")
                    .map(|s| s.strip_suffix(".gz").unwrap_or(s))
                    .is_some_and(|s| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        found.sort();
        found
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    // About 490 bytes a line: 2,400 tokenizations pass 1 MiB (four keep-alive sessions).
    std::thread::scope(|scope| {
        for t in 0..4 {
            let mut session = router.session();
            scope.spawn(move || {
                for i in 0..600 {
                    let res = session.post("/v1/cards", &card_body(&test_pan(t * 600 + i)));
                    assert_eq!(res.status, 201);
                }
            });
        }
    });
    let compressed = || {
        let found = parts();
        found.len() == 1 && found[0].to_string_lossy().ends_with(".gz")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !compressed() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(parts().len(), 1, "no part after 1 MiB of audit");
    assert!(compressed(), "the part was not compressed: {:?}", parts());
    let gz = parts()[0].clone();
    let mode = std::fs::metadata(&gz).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", gz.display());
    let unzipped = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&gz)
        .output()
        .unwrap();
    assert!(unzipped.status.success());
    let part = String::from_utf8(unzipped.stdout).unwrap();
    assert!(part.len() >= 1 << 20, "rotated at {} bytes", part.len());
    let size = std::fs::metadata(&gz).unwrap().len();
    assert!(size * 3 < part.len() as u64, "{size} bytes compressed");
    let last: serde_json::Value = serde_json::from_str(part.lines().last().unwrap()).unwrap();
    assert!(gz
        .to_string_lossy()
        .ends_with(&format!("{:020}.gz", last["seq"].as_u64().unwrap())));
    // The daemon goes on in the new file, chained to the part.
    assert_eq!(
        router
            .post("/v1/cards", &card_body(&test_pan(9_999)))
            .status,
        201
    );
    let first = &audit_lines(&setup)[0];
    assert_eq!(first["seq"], last["seq"].as_u64().unwrap() + 1);
    assert_eq!(first["prev"], last["mac"]);
    daemon.stop();
    let (ok, out) = setup.try_cli(&["audit", "verify"]);
    assert!(ok && out.contains("intact: 2 file(s)"), "{out}");
    // Across a restart.
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    assert_eq!(
        router
            .post("/v1/cards", &card_body(&test_pan(10_000)))
            .status,
        201
    );
    daemon.stop();
    let (ok, out) = setup.try_cli(&["audit", "verify"]);
    assert!(ok, "{out}");
    // Without its part, the live log starts mid-chain.
    let aside = setup.root().join("part-aside");
    std::fs::rename(&parts()[0], &aside).unwrap();
    let (ok, out) = setup.try_cli(&["audit", "verify"]);
    assert!(!ok && out.contains("starts at seq"), "{out}");
}
