//! Key custody and rotation: sealed start and unseal by k distinct custodians, DEK rotation
//! under load with re-encryption, a kill in the middle of re-encryption, KEK rekey to a new
//! custodian list, and scans for key material where it must not be.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardvault::crypto::custody::{self, Custody, Share};
use cardvault::crypto::hex;
use serde_json::json;

use crate::support::*;

both_engines!(
    dek_rotation_under_load_loses_nothing,
    dek_rotates_itself_after_its_encryption_limit,
    kill_9_during_reencryption_resumes_after_unseal,
    a_rekey_that_never_reached_the_vault_runs_again,
);

pub(crate) fn tokenize_n(client: &Client, n: u32, offset: u32) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let pan = test_pan(offset + i);
            let res = client.post("/v1/cards", &card_body(&pan));
            assert_eq!(res.status, 201, "{}", res.body);
            (res.json()["id"].as_str().unwrap().to_owned(), pan)
        })
        .collect()
}

pub(crate) fn detokenize_ok(client: &Client, token: &str, pan: &str) {
    let res = client.post("/v1/detokenize", &json!({"token": token}));
    assert_eq!(res.status, 200, "{token}: {}", res.body);
    assert_eq!(res.json()["number"], pan);
}

/// A customer with one reusable token per PAN; returns `(tok_id, pan)`.
pub(crate) fn customer_tokens(client: &Client, pans: &[String]) -> Vec<(String, String)> {
    let res = client.post("/v1/customers", &json!({"email": "ada@example.com"}));
    assert_eq!(res.status, 201, "{}", res.body);
    let cust = res.json()["id"].as_str().unwrap().to_owned();
    pans.iter()
        .map(|pan| {
            let card = client.post("/v1/cards", &card_body(pan)).json()["id"]
                .as_str()
                .unwrap()
                .to_owned();
            let res = client.post(
                &format!("/v1/customers/{cust}/tokens"),
                &json!({"source": card}),
            );
            assert_eq!(res.status, 201, "{}", res.body);
            (
                res.json()["token"].as_str().unwrap().to_owned(),
                pan.clone(),
            )
        })
        .collect()
}

pub(crate) fn inventory(setup: &Setup, daemon: &Daemon) -> serde_json::Value {
    let res = setup.client(daemon, &setup.ops()).get("/v1/admin/keys");
    assert_eq!(res.status, 200, "{}", res.body);
    res.json()
}

/// `(state, records)` of every DEK version in the default project.
pub(crate) fn dek_versions(inv: &serde_json::Value) -> HashMap<u64, (String, u64)> {
    inv["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["project"] == "default" && k["version"].is_u64())
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                (
                    k["state"].as_str().unwrap().to_owned(),
                    k["records"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

pub(crate) fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn health(setup: &Setup, daemon: &Daemon) -> Response {
    setup.client(daemon, &setup.router()).get("/v1/health")
}

/// The custodians' KEK, the shares and every data and fingerprint key, rebuilt here from the
/// share files, the passphrases and the (stopped) daemon's store, so the test can look for
/// their bytes where they must not be. With an HSM seal the custodians' KEK opens the recovery
/// copy of the root key. The key AAD is restated here as a test oracle: a change to it makes
/// the unwrap below fail loudly.
pub(crate) fn secrets(
    custody_dir: &Path,
    passphrases: &[(&str, PathBuf)],
    store: Option<&Setup>,
) -> Vec<Vec<u8>> {
    let custody = Custody::load(custody_dir).unwrap();
    let shares: Vec<Share> = passphrases
        .iter()
        .map(|(name, pass)| {
            let text = std::fs::read_to_string(custody::share_path(custody_dir, name)).unwrap();
            let pass = std::fs::read_to_string(pass).unwrap();
            custody::open_share(&text, pass.trim_end().as_bytes()).unwrap()
        })
        .collect();
    let refs: Vec<&Share> = shares.iter().collect();
    let kek = custody.combine(&refs).unwrap();
    let mut found = vec![kek.expose().to_vec()];
    for s in &shares {
        found.push(cardvault::crypto::unhex(&s.to_hex()).unwrap().to_vec());
    }
    let Some(setup) = store else {
        return found;
    };
    // The KEK opens the root key; the root key opens every DEK and fingerprint key.
    let kek = cardvault::crypto::Kek::new(&kek, &custody.kek_id);
    let aad = cardvault::crypto::aad(&[b"cardvault/root-key/v1", custody.kek_id.as_bytes()]);
    let wrapped_root = match setup.stored_meta("recovery_root") {
        Some(copy) => {
            let copy: serde_json::Value = serde_json::from_slice(&copy).unwrap();
            assert_eq!(copy["kek_id"], custody.kek_id.as_str());
            cardvault::crypto::unhex(copy["root"].as_str().unwrap())
                .unwrap()
                .to_vec()
        }
        None => setup.stored_root_key(),
    };
    let root = kek.unwrap(&aad, &wrapped_root).unwrap();
    found.push(root.expose().to_vec());
    let root = cardvault::crypto::Kek::new(&root, "root");
    let mut keys = 0;
    for (project, name, wrapped) in setup.wrapped_keys() {
        let aad = cardvault::crypto::aad(&[b"cardvault/key/v1", &project, &name]);
        found.push(root.unwrap(&aad, &wrapped).unwrap().expose().to_vec());
        keys += 1;
    }
    assert!(keys >= 2, "no data keys found in the store");
    found
}

/// No file outside the sealed share files, and no log line, holds any of `secrets`, raw or
/// as hex.
pub(crate) fn assert_nowhere(root: &Path, logs: &str, secrets: &[Vec<u8>]) {
    for secret in secrets {
        let text = hex(secret);
        assert!(!logs.contains(&text), "key material in the log");
        for needle in [secret.as_slice(), text.as_bytes()] {
            let hits: Vec<PathBuf> = files_containing(root, needle)
                .into_iter()
                .filter(|p| p.extension().is_none_or(|e| e != "share"))
                .collect();
            assert!(hits.is_empty(), "key material in {hits:?}");
        }
    }
}

#[test]
fn sealed_until_k_distinct_custodians_unseal() {
    let setup = Setup::with_custodians("unseal", "", &["alice", "bob", "carol"], 2);
    for name in ["alice", "bob", "carol"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(setup.share(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}.share");
    }
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let res = health(&setup, &daemon);
    assert_eq!(
        (res.status, res.json()["sealed"].clone()),
        (503, json!(true))
    );
    let res = router.post("/v1/cards", &card_body(&test_pan(1)));
    assert_eq!((res.status, res.code()), (503, "sealed".into()));

    // k-1 shares: still sealed. The same custodian twice counts once.
    let (ok, out) = setup.unseal_as(&daemon, "alice", 1);
    assert!(ok && out.contains("1 of 2"), "{out}");
    let (ok, out) = setup.unseal_as(&daemon, "alice", 1);
    assert!(ok && out.contains("1 of 2"), "{out}");
    assert_eq!(health(&setup, &daemon).status, 503);

    // A wrong passphrase fails on the custodian's side; nothing is sent.
    let wrong = setup.root().join("wrong-pass");
    write_private(&wrong, "not bob's passphrase at all\n");
    let (ok, out) = setup.unseal(
        &daemon,
        &setup.identity(&spec("bob")),
        &setup.share("bob"),
        &wrong,
    );
    assert!(!ok && out.contains("wrong passphrase"), "{out}");
    // Bob's share under Carol's certificate is not Carol's share.
    let (ok, out) = setup.unseal(
        &daemon,
        &setup.identity(&spec("carol")),
        &setup.share("bob"),
        &setup.passphrase_file("bob", 1),
    );
    assert!(!ok && out.contains("share_refused"), "{out}");
    // A caller without `unseal` is refused outright.
    let (ok, out) = setup.unseal(
        &daemon,
        &setup.router(),
        &setup.share("bob"),
        &setup.passphrase_file("bob", 1),
    );
    assert!(!ok && out.contains("403"), "{out}");
    assert_eq!(
        health(&setup, &daemon).status,
        503,
        "refusals changed the state"
    );

    // A second distinct custodian: unsealed, serving.
    let (ok, out) = setup.unseal_as(&daemon, "carol", 1);
    assert!(ok && out.contains("unsealed"), "{out}");
    assert_eq!(health(&setup, &daemon).status, 200);
    let cards = tokenize_n(&router, 3, 0);

    // A restart seals again; another pair of custodians opens the same data.
    let logs = daemon.stop();
    let daemon = setup.start();
    assert_eq!(health(&setup, &daemon).status, 503);
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    let router = setup.client(&daemon, &setup.router());
    for (token, pan) in &cards {
        detokenize_ok(&router, token, pan);
    }
    let logs = format!("{logs}\n{}", daemon.stop());
    let custody_dir = setup.keys_dir.join("custodians");
    let passes: Vec<(&str, PathBuf)> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| (*n, setup.passphrase_file(n, 1)))
        .collect();
    assert_nowhere(
        setup.root(),
        &logs,
        &secrets(&custody_dir, &passes, Some(&setup)),
    );
}

fn dek_rotation_under_load_loses_nothing(engine: Engine) {
    let Some(setup) = Setup::on_with(
        engine,
        "rotate",
        "[keys]\nreencrypt_batch = 25\nreencrypt_pause = \"10ms\"\n",
    ) else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cards = tokenize_n(&router, 150, 0);
    let pans: Vec<String> = (150..155).map(test_pan).collect();
    let tokens = customer_tokens(&router, &pans);

    // Load: tokenize + detokenize in a loop on two threads, during rotation and re-encryption.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            let client = router.clone();
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let pan = test_pan(10_000 + w * 100_000 + i);
                    i += 1;
                    let res = client.post("/v1/cards", &card_body(&pan));
                    let ok = res.status == 201 && {
                        let id = res.json()["id"].as_str().unwrap().to_owned();
                        let res = client.post("/v1/detokenize", &json!({"token": id}));
                        res.status == 200 && res.json()["number"] == pan
                    };
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let res = setup
        .client(&daemon, &setup.ops())
        .post("/v1/admin/keys/rotate", &json!({}));
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["active_dek_version"], 2);
    // Only `keys` may rotate.
    let res = router.post("/v1/admin/keys/rotate", &json!({}));
    assert_eq!(res.status, 403);
    wait_for("version 1 to be destroyed", Duration::from_secs(90), || {
        dek_versions(&inventory(&setup, &daemon))
            .get(&1)
            .is_some_and(|(state, _)| state == "destroyed")
    });
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during rotation"
    );
    assert!(done.load(Ordering::Relaxed) > 0);
    let audit = std::fs::read_to_string(setup.root().join("audit/audit.log")).unwrap();
    assert!(
        audit.contains(r#""event":"keys.destroy","outcome":"success","identity":"cardvault""#)
            && audit.contains(r#""object":"dek/1""#),
        "no audit line for the destruction"
    );

    let versions = dek_versions(&inventory(&setup, &daemon));
    assert_eq!(versions[&1], ("destroyed".into(), 0), "{versions:?}");
    assert_eq!(versions[&2].0, "active");
    for (token, pan) in &cards {
        detokenize_ok(&router, token, pan);
    }
    for (token, pan) in &tokens {
        detokenize_ok(&router, token, pan);
    }
    // The inventory names keys, never their bytes.
    let inv = inventory(&setup, &daemon);
    for k in inv["keys"].as_array().unwrap() {
        for field in ["id", "purpose", "algorithm", "state"] {
            assert!(k[field].is_string(), "{k}");
        }
        assert!(k.get("key").is_none() && k.get("wrapped").is_none(), "{k}");
    }
    daemon.stop();
}

fn dek_rotates_itself_after_its_encryption_limit(engine: Engine) {
    let Some(setup) = Setup::on_with(engine, "autorotate", "[keys]\ndek_max_encryptions = 40\n")
    else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    // Two seals per card token (metadata and PAN): 30 tokens pass the limit.
    let cards = tokenize_n(&router, 30, 0);
    wait_for("automatic rotation", Duration::from_secs(30), || {
        inventory(&setup, &daemon)["active_dek_version"] == 2
    });
    for (token, pan) in &cards {
        detokenize_ok(&router, token, pan);
    }
    daemon.stop();
    // The daemon's own key operation is on the audit trail.
    let audit = std::fs::read_to_string(setup.root().join("audit/audit.log")).unwrap();
    let rotated = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["event"] == "keys.rotate")
        .expect("no keys.rotate line");
    assert_eq!(rotated["identity"], "cardvault");
    assert_eq!(rotated["object"], "dek/2");
    assert_eq!(rotated["reason"], "dek_max_encryptions");
}

fn kill_9_during_reencryption_resumes_after_unseal(engine: Engine) {
    let Some(setup) = Setup::custodians_on(
        engine,
        "reencrypt-kill",
        "[keys]\nreencrypt_batch = 10\nreencrypt_pause = \"100ms\"\n",
        &["alice", "bob"],
        2,
    ) else {
        return;
    };
    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    let router = setup.client(&daemon, &setup.router());
    let cards = tokenize_n(&router, 200, 0);
    let res = setup
        .client(&daemon, &setup.ops())
        .post("/v1/admin/keys/rotate", &json!({}));
    assert_eq!(res.status, 200, "{}", res.body);
    // Killed once some records moved and others have not.
    wait_for("re-encryption under way", Duration::from_secs(30), || {
        let v = dek_versions(&inventory(&setup, &daemon));
        v.get(&2).is_some_and(|(_, n)| *n >= 20) && v.get(&1).is_some_and(|(_, n)| *n > 0)
    });
    daemon.kill9();

    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    let v = dek_versions(&inventory(&setup, &daemon));
    assert_eq!(v[&1].0, "decrypt-only", "{v:?}");
    wait_for("re-encryption to finish", Duration::from_secs(120), || {
        dek_versions(&inventory(&setup, &daemon))
            .get(&1)
            .is_some_and(|(state, _)| state == "destroyed")
    });
    let router = setup.client(&daemon, &setup.router());
    for (token, pan) in &cards {
        detokenize_ok(&router, token, pan);
    }
    daemon.stop();
}

/// `cardvault keys rekey` as ops at `url`: the `current` custodians prove custody with their
/// first passphrases; the `next` list gets new shares under their second ones.
pub(crate) fn rekey_as_ops(
    setup: &Setup,
    url: &str,
    current: &[&str],
    next: &[&str],
) -> (bool, String) {
    let ops = setup.ops();
    let pass = |n: &str, g: u32| format!("{n}={}", setup.passphrase_file(n, g).display());
    let mut args: Vec<String> = vec!["keys".into(), "rekey".into()];
    for n in current {
        args.extend(["--share".into(), setup.share(n).display().to_string()]);
        args.extend(["--passphrase-file".into(), pass(n, 1)]);
    }
    args.extend([
        "--custodians".into(),
        next.join(","),
        "--threshold".into(),
        "2".into(),
    ]);
    for n in next {
        args.extend(["--new-passphrase-file".into(), pass(n, 2)]);
    }
    args.extend([
        "--cert".into(),
        ops.cert.display().to_string(),
        "--key".into(),
        ops.key.display().to_string(),
        "--url".into(),
        url.into(),
    ]);
    setup.try_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A rekey whose request never reached the vault leaves `custodians.next` (its outcome is
/// unknown to the CLI); running it again, as the runbook says, finds the vault still on the
/// old KEK, removes the useless new shares and rekeys.
fn a_rekey_that_never_reached_the_vault_runs_again(engine: Engine) {
    let Some(setup) = Setup::custodians_on(engine, "rekey-retry", "", &["alice", "bob"], 2) else {
        return;
    };
    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    let old_kek = inventory(&setup, &daemon)["keys"][0]["id"].clone();
    let rekey = |url: &str| rekey_as_ops(&setup, url, &["alice", "bob"], &["alice", "bob"]);
    // Nothing listens there: the request never arrives.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("https://{}", unused.local_addr().unwrap());
    drop(unused);
    let (ok, out) = rekey(&nowhere);
    assert!(!ok && out.contains("outcome unknown"), "{out}");
    assert!(setup.keys_dir.join("custodians.next").exists());

    let (ok, out) = rekey(&format!("https://{}", daemon.addr));
    assert!(ok, "{out}");
    assert!(
        out.contains("had not taken effect") && out.contains("rekeyed"),
        "{out}"
    );
    assert!(!setup.keys_dir.join("custodians.next").exists());
    // The first attempt's shares are kept aside, never deleted.
    let aside = std::fs::read_dir(&setup.keys_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("custodians.abandoned.kek_")
        })
        .count();
    assert_eq!(aside, 1);
    assert_ne!(inventory(&setup, &daemon)["keys"][0]["id"], old_kek);
}

#[test]
fn rekey_moves_to_new_custodians_and_old_shares_stop_working() {
    let setup = Setup::with_custodians("rekey", "", &["alice", "bob", "carol"], 2);
    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    assert!(setup.unseal_as(&daemon, "carol", 1).0);
    let router = setup.client(&daemon, &setup.router());
    let cards = tokenize_n(&router, 10, 0);
    let pans: Vec<String> = (10..13).map(test_pan).collect();
    let tokens = customer_tokens(&router, &pans);
    let old_kek = inventory(&setup, &daemon)["keys"][0]["id"].clone();
    // Custodians keep their own copies of their share files.
    let kept = setup.root().join("alice-old.share");
    std::fs::copy(setup.share("alice"), &kept).unwrap();
    let carol_kept = setup.root().join("carol-old.share");
    std::fs::copy(setup.share("carol"), &carol_kept).unwrap();
    let old_secrets = secrets(
        &setup.keys_dir.join("custodians"),
        &[
            ("alice", setup.passphrase_file("alice", 1)),
            ("carol", setup.passphrase_file("carol", 1)),
        ],
        None,
    );

    // Alice and Bob prove custody; Carol leaves, Dave joins; everyone picks a new passphrase.
    let url = format!("https://{}", daemon.addr);
    let (ok, out) = rekey_as_ops(&setup, &url, &["alice", "bob"], &["alice", "bob", "dave"]);
    assert!(ok, "{out}");
    assert!(out.contains("rekeyed"), "{out}");
    assert!(!setup.share("carol").exists(), "the old share files stay");
    assert!(!setup.keys_dir.join("custodians.next").exists());
    // Still serving, on the same process.
    for (token, pan) in &cards[..5] {
        detokenize_ok(&router, token, pan);
    }
    let inv = inventory(&setup, &daemon);
    assert_ne!(inv["keys"][0]["id"], old_kek);
    assert!(inv["keys"][0]["custody"]
        .as_str()
        .unwrap()
        .contains("alice, bob, dave"));
    let logs = daemon.stop();

    // After a restart: the old share is refused, the new ones unseal, everything reads.
    let daemon = setup.start();
    let (ok, out) = setup.unseal(
        &daemon,
        &setup.identity(&spec("alice")),
        &kept,
        &setup.passphrase_file("alice", 1),
    );
    assert!(!ok && out.contains("share_refused"), "{out}");
    assert_eq!(health(&setup, &daemon).status, 503);
    let (ok, out) = setup.unseal(
        &daemon,
        &setup.identity(&spec("carol")),
        &carol_kept,
        &setup.passphrase_file("carol", 1),
    );
    assert!(
        !ok && out.contains("share_refused"),
        "a custodian who left: {out}"
    );
    assert!(setup.unseal_as(&daemon, "dave", 2).0);
    assert!(setup.unseal_as(&daemon, "bob", 2).0);
    assert_eq!(health(&setup, &daemon).status, 200);
    let router = setup.client(&daemon, &setup.router());
    for (token, pan) in cards.iter().skip(5) {
        detokenize_ok(&router, token, pan);
    }
    for (token, pan) in &tokens {
        detokenize_ok(&router, token, pan);
    }
    let logs = format!("{logs}\n{}", daemon.stop());
    let new_secrets = secrets(
        &setup.keys_dir.join("custodians"),
        &[
            ("alice", setup.passphrase_file("alice", 2)),
            ("bob", setup.passphrase_file("bob", 2)),
            ("dave", setup.passphrase_file("dave", 2)),
        ],
        Some(&setup),
    );
    assert_nowhere(setup.root(), &logs, &[old_secrets, new_secrets].concat());
}

#[test]
fn rewriting_a_customer_token_after_rotation_keeps_its_card_readable() {
    // Re-encryption moves one record, then pauses long enough for the rewrite below to run
    // first: the token is still under version 1 when it is rewritten under version 2.
    let setup = Setup::with_settings(
        "rotate-rewrite",
        "[keys]\nreencrypt_batch = 1\nreencrypt_pause = \"30s\"\n",
    );
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let pan = test_pan(1);
    let customer = router
        .post("/v1/customers", &json!({"email": "ada@example.com"}))
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let attach = |pan: &str| {
        let card = router.post("/v1/cards", &card_body(pan)).json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        router.post(
            &format!("/v1/customers/{customer}/tokens"),
            &json!({"source": card, "recurring": {"model": "unscheduled"}}),
        )
    };
    let res = attach(&pan);
    assert_eq!(res.status, 201, "{}", res.body);
    let token = res.json()["token"].as_str().unwrap().to_owned();
    let res = setup
        .client(&daemon, &setup.ops())
        .post("/v1/admin/keys/rotate", &json!({}));
    assert_eq!(res.status, 200);
    // The same card attached again refreshes the existing token, now under version 2.
    let res = attach(&pan);
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["token"], token.as_str());
    detokenize_ok(&router, &token, &pan);
    // And an update of the token's recurring data.
    let res = send(
        &router,
        "PATCH",
        &format!("/v1/customers/{customer}/tokens/{token}"),
        Some(&json!({"recurring": {"model": "subscription"}})),
    );
    assert_eq!(res.status, 200);
    detokenize_ok(&router, &token, &pan);
    daemon.kill9();
}
