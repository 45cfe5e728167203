//! The HSM seal over a real PKCS#11 device (SoftHSM2, a token per test): unattended starts,
//! the faults that keep a vault sealed and how it says so, the custodians' recovery when the
//! device is lost, a key whose value ever left a device refused, moving the seal while
//! serving, and several nodes each unsealing through the device.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::keys::{
    assert_nowhere, customer_tokens, detokenize_ok, health, inventory, secrets, tokenize_n,
    wait_for,
};
use crate::support::*;

both_engines!(the_seal_moves_shamir_to_pkcs11_and_back_under_load);

const CUSTODIANS: [&str; 3] = ["alice", "bob", "carol"];

/// The events of the setup's audit log, `(event, outcome)`.
fn audit_events(setup: &Setup) -> Vec<(String, String)> {
    std::fs::read_to_string(setup.root().join("audit/audit.log"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["event"].as_str().unwrap().to_owned(),
                v["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `/v1/health`'s status and, while sealed, why.
fn sealed_because(setup: &Setup, daemon: &Daemon) -> (u16, String) {
    let res = health(setup, daemon);
    let reason = res.json()["reason"].as_str().unwrap_or_default().to_owned();
    (res.status, reason)
}

fn keys_cli(setup: &Setup, daemon: &Daemon, args: &[&str]) -> (bool, String) {
    setup.cli_as(daemon, &setup.ops(), args)
}

/// `keys migrate --to TO` with `custodians`' shares and passphrase files.
fn migrate(setup: &Setup, daemon: &Daemon, to: &str, custodians: &[&str]) -> (bool, String) {
    let mut args = vec![
        "keys".to_owned(),
        "migrate".into(),
        "--to".into(),
        to.into(),
    ];
    for name in custodians {
        args.push("--share".into());
        args.push(setup.share(name).to_str().unwrap().into());
        args.push("--passphrase-file".into());
        args.push(format!(
            "{name}={}",
            setup.passphrase_file(name, 1).display()
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    keys_cli(setup, daemon, &args)
}

/// With the KEK made inside the device, the vault serves at every start with no custodian;
/// `keys status` shows the key's checked attributes; the KEK, the recovery KEK, the shares,
/// the root key and the data keys appear in no file (the token's folder included), log or
/// audit line.
#[test]
fn the_hsm_seal_unseals_every_start_with_no_custodian() {
    let Some(setup) = Setup::hsm_on(Engine::Sled, "hsm-start", &CUSTODIANS, 2) else {
        return;
    };
    let daemon = setup.start();
    assert_eq!(health(&setup, &daemon).status, 200, "{}", daemon.output());
    let router = setup.client(&daemon, &setup.router());
    let cards = tokenize_n(&router, 3, 0);
    let reusable = customer_tokens(&router, &[test_pan(10)]);
    detokenize_ok(&router, &cards[0].0, &cards[0].1);

    let inv = inventory(&setup, &daemon);
    assert_eq!(inv["seal"]["backend"], "pkcs11", "{inv}");
    assert_eq!(inv["seal"]["unsealed_by"], "hsm");
    let a = &inv["seal"]["attributes"];
    for (flag, want) in [
        ("sensitive", true),
        ("always_sensitive", true),
        ("extractable", false),
        ("never_extractable", true),
        ("encrypt", true),
        ("decrypt", true),
        ("wrap", false),
        ("unwrap", false),
        ("derive", false),
        ("sign", false),
    ] {
        assert_eq!(a[flag], json!(want), "{flag}: {inv}");
    }
    assert_eq!(a["bits"], 256);
    let recovery = inv["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["purpose"].as_str().unwrap().starts_with("recovery"))
        .expect("no recovery KEK in the inventory");
    assert!(recovery["custody"].as_str().unwrap().contains("2-of-3"));
    let (ok, out) = keys_cli(&setup, &daemon, &["keys", "status"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("seal: pkcs11") && out.contains("extractable=false"),
        "{out}"
    );
    let mut logs = daemon.stop();

    // A restart: serving again, no human step.
    let daemon = setup.start();
    assert_eq!(health(&setup, &daemon).status, 200);
    let router = setup.client(&daemon, &setup.router());
    detokenize_ok(&router, &cards[1].0, &cards[1].1);
    detokenize_ok(&router, &reusable[0].0, &reusable[0].1);
    logs.push_str(&daemon.stop());
    let unsealed: Vec<_> = audit_events(&setup)
        .into_iter()
        .filter(|(e, _)| e == "keys.unseal.hsm")
        .collect();
    assert_eq!(unsealed.len(), 2, "{unsealed:?}");
    assert!(unsealed.iter().all(|(_, o)| o == "success"), "{unsealed:?}");

    let passes: Vec<(&str, PathBuf)> = CUSTODIANS
        .iter()
        .map(|n| (*n, setup.passphrase_file(n, 1)))
        .collect();
    let found = secrets(&setup.keys_dir.join("custodians"), &passes, Some(&setup));
    assert_nowhere(setup.root(), &logs, &found);
    assert!(!logs.contains(hsm::PIN), "the HSM PIN in the log");
}

/// A wrong PIN, a missing module and a missing key each keep the vault sealed, with the
/// reason in `/v1/health` and a log line naming it, and no crash. A PIN the device refused is
/// not sent again until the PIN file changes; then the vault unseals by itself.
#[test]
fn hsm_faults_keep_the_vault_sealed_and_say_which() {
    let Some(setup) = Setup::hsm_on(Engine::Sled, "hsm-faults", &CUSTODIANS, 2) else {
        return;
    };
    let pin_file = setup.root().join("hsm.pin");
    // A PIN file others may read is refused before anything starts, by `check` and `serve`.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let refused = Daemon::try_start(&setup)
        .err()
        .expect("started with a readable PIN file");
    assert!(
        refused.contains("pin_file") && refused.contains("chmod 600"),
        "{refused}"
    );
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(!ok && out.contains("pin_file"), "{out}");
    write_private(&pin_file, "0000-not-the-pin\n");
    let daemon = setup.start();
    assert_eq!(
        sealed_because(&setup, &daemon),
        (503, "pin_incorrect".into())
    );
    let router = setup.client(&daemon, &setup.router());
    let res = router.post("/v1/cards", &card_body(&test_pan(1)));
    assert_eq!((res.status, res.code()), (503, "sealed".into()));
    // The next try (a second later) does not send the refused PIN again.
    wait_for("the retry", Duration::from_secs(10), || {
        daemon.output().contains("not tried again")
    });
    assert_eq!(
        daemon.output().matches("refused the PIN in").count(),
        2,
        "{}",
        daemon.output()
    );
    write_private(&pin_file, &format!("{}\n", hsm::PIN));
    wait_for(
        "the unseal after the PIN fix",
        Duration::from_secs(30),
        || health(&setup, &daemon).status == 200,
    );
    let out = daemon.stop();
    assert!(out.contains("unsealed through the HSM"), "{out}");
    assert!(!out.contains("0000-not-the-pin") && !out.contains(hsm::PIN));

    for (section, reason, says) in [
        (
            hsm::kek_section().replace(hsm::MODULE, "/nonexistent/libnothing.so"),
            "module",
            "no such file",
        ),
        (
            hsm::kek_section().replace(hsm::KEY, "no-such-key"),
            "key_missing",
            "no key labelled \"no-such-key\"",
        ),
        (
            hsm::kek_section().replace(
                &format!("token_label = \"{}\"", hsm::TOKEN),
                "token_label = \"elsewhere\"",
            ),
            "token",
            "no token labelled \"elsewhere\"",
        ),
    ] {
        setup.set_kek(&section);
        let daemon = setup.start();
        assert_eq!(sealed_because(&setup, &daemon), (503, reason.into()));
        assert!(daemon.output().contains(says), "{}", daemon.output());
        // Still up and answering after a retry or two.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(sealed_because(&setup, &daemon), (503, reason.into()));
        daemon.stop();
    }
    let failed = audit_events(&setup)
        .into_iter()
        .filter(|(e, o)| e == "keys.unseal.hsm" && o != "success")
        .count();
    assert!(failed >= 4, "HSM failures not audited: {failed}");
}

/// The device is lost (the token wiped): the vault stays sealed, two custodians unseal it
/// with their recovery shares (audited as break-glass), every card is intact; then the seal
/// moves to a new device while serving, and the vault unseals itself again.
#[test]
fn a_lost_hsm_is_recovered_by_custodians_then_replaced() {
    let Some(setup) = Setup::hsm_on(Engine::Sled, "hsm-lost", &CUSTODIANS, 2) else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cards = tokenize_n(&router, 5, 0);
    let reusable = customer_tokens(&router, &[test_pan(20)]);
    daemon.stop();
    let old_kek = setup.stored_meta("kek_id").unwrap();

    let softhsm = setup.softhsm.as_ref().unwrap();
    softhsm.delete_token(hsm::TOKEN);
    let daemon = setup.start();
    assert_eq!(sealed_because(&setup, &daemon), (503, "token".into()));
    let (ok, out) = setup.unseal_as(&daemon, "alice", 1);
    assert!(ok && out.contains("1 of 2"), "{out}");
    let (ok, out) = setup.unseal_as(&daemon, "carol", 1);
    assert!(ok && out.contains("unsealed"), "{out}");
    assert_eq!(health(&setup, &daemon).status, 200);
    let router = setup.client(&daemon, &setup.router());
    for (token, pan) in cards.iter().skip(1).chain(&reusable) {
        detokenize_ok(&router, token, pan);
    }
    assert_eq!(
        inventory(&setup, &daemon)["seal"]["unsealed_by"],
        "recovery"
    );
    assert!(daemon.output().contains("RECOVERY SHARES (break-glass)"));
    assert!(audit_events(&setup)
        .iter()
        .any(|(e, o)| e == "keys.unseal.recovery" && o == "success"));

    // A new device: a new token with the same label; the seal moves to a key made there.
    softhsm.init_token(hsm::TOKEN);
    let (ok, out) = migrate(&setup, &daemon, "pkcs11", &["bob", "carol"]);
    assert!(ok, "{out}\n{}", daemon.output());
    assert_eq!(health(&setup, &daemon).status, 200);
    daemon.stop();
    assert_ne!(setup.stored_meta("kek_id").unwrap(), old_kek);
    let daemon = setup.start();
    assert_eq!(health(&setup, &daemon).status, 200, "{}", daemon.output());
    let router = setup.client(&daemon, &setup.router());
    detokenize_ok(&router, &reusable[0].0, &reusable[0].1);
    assert_eq!(inventory(&setup, &daemon)["seal"]["unsealed_by"], "hsm");
    daemon.stop();
}

/// A key whose value existed outside a device (imported: never `CKA_ALWAYS_SENSITIVE`, never
/// `CKA_NEVER_EXTRACTABLE`) is refused at start, even with the right label and KEK id, and
/// `keys init` refuses to use one.
#[test]
fn a_key_that_ever_left_a_device_is_refused() {
    let Some(setup) = Setup::hsm_on(Engine::Sled, "hsm-imported", &CUSTODIANS, 2) else {
        return;
    };
    let kek_id = String::from_utf8(setup.stored_meta("kek_id").unwrap()).unwrap();
    let softhsm = setup.softhsm.as_ref().unwrap();
    softhsm.delete_token(hsm::TOKEN);
    softhsm.init_token(hsm::TOKEN);
    softhsm.import_aes(hsm::TOKEN, hsm::KEY, &kek_id, &[7u8; 32], setup.root());
    let daemon = setup.start();
    assert_eq!(sealed_because(&setup, &daemon), (503, "key_refused".into()));
    assert!(
        daemon
            .output()
            .contains("copy may exist outside the device")
            || daemon.output().contains("may leave the device"),
        "{}",
        daemon.output()
    );
    daemon.stop();

    let Some(fresh) = Setup::hsm_on_token_only(Engine::Sled, "hsm-imported-init") else {
        return;
    };
    let softhsm = fresh.softhsm.as_ref().unwrap();
    softhsm.import_aes(
        hsm::TOKEN,
        hsm::KEY,
        "kek_0011223344556677",
        &[9u8; 32],
        fresh.root(),
    );
    let mut args = vec![
        "keys".to_owned(),
        "init".into(),
        "--custodians".into(),
        "alice,bob".into(),
        "--threshold".into(),
        "2".into(),
    ];
    for name in ["alice", "bob"] {
        args.push("--passphrase-file".into());
        args.push(format!(
            "{name}={}",
            fresh.passphrase_file(name, 1).display()
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = fresh.try_cli(&args);
    assert!(!ok && out.contains("is refused"), "{out}");
    assert!(!fresh.keys_dir.join("custodians").exists());
}

/// The seal moves from custodian shares to the device and back while requests run, none
/// failing: after the first move the vault unseals itself at start, after the second it
/// waits for custodians again; no record is re-encrypted and every card reads back.
fn the_seal_moves_shamir_to_pkcs11_and_back_under_load(engine: Engine) {
    if !hsm::available() {
        return;
    }
    let Some(mut setup) = Setup::custodians_on(engine, "hsm-migrate", "", &CUSTODIANS, 2) else {
        return;
    };
    setup.add_softhsm();
    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    let router = setup.client(&daemon, &setup.router());
    let mut cards = customer_tokens(&router, &[test_pan(1), test_pan(2)]);
    daemon.stop();
    let (wrapped_before, root_before) = (setup.wrapped_keys(), setup.stored_root_key());
    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    assert!(setup.unseal_as(&daemon, "carol", 1).0);

    let (written, failures) = under_load(&setup, &daemon, || {
        setup.set_kek(&hsm::kek_section());
        let (ok, out) = migrate(&setup, &daemon, "pkcs11", &["alice", "carol"]);
        assert!(ok, "{out}");
        assert!(out.contains("sealed by pkcs11"), "{out}");
    });
    assert_eq!(failures, 0, "requests failed during the move to pkcs11");
    cards.extend(written);
    assert_eq!(inventory(&setup, &daemon)["seal"]["backend"], "pkcs11");
    daemon.stop();
    // Only the root key's wrapping changed.
    assert_eq!(setup.wrapped_keys(), wrapped_before);
    assert_ne!(setup.stored_root_key(), root_before);

    let daemon = setup.start();
    assert_eq!(health(&setup, &daemon).status, 200, "{}", daemon.output());
    let (written, failures) = under_load(&setup, &daemon, || {
        setup.set_kek("[kek]\nbackend = \"shamir\"\n");
        let (ok, out) = migrate(&setup, &daemon, "shamir", &["bob", "carol"]);
        assert!(ok, "{out}");
    });
    assert_eq!(
        failures, 0,
        "requests failed during the move back to shamir"
    );
    cards.extend(written);
    let inv = inventory(&setup, &daemon);
    assert_eq!(inv["seal"]["backend"], "shamir", "{inv}");
    daemon.stop();
    assert!(setup.stored_meta("recovery_root").is_none());
    assert_eq!(setup.wrapped_keys(), wrapped_before);

    let daemon = setup.start();
    assert_eq!(health(&setup, &daemon).status, 503);
    assert!(setup.unseal_as(&daemon, "carol", 1).0);
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    let router = setup.client(&daemon, &setup.router());
    for (token, pan) in &cards {
        detokenize_ok(&router, token, pan);
    }
    let events = audit_events(&setup);
    let moves: Vec<_> = events.iter().filter(|(e, _)| e == "keys.migrate").collect();
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert!(moves.iter().all(|(_, o)| o == "success"));
    daemon.stop();
}

/// Runs `during` while two threads tokenize and detokenize; returns the customer tokens the
/// load made and how many requests failed.
pub(crate) fn under_load(
    setup: &Setup,
    daemon: &Daemon,
    during: impl FnOnce(),
) -> (Vec<(String, String)>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let router = setup.client(daemon, &setup.router());
            let (stop, failures) = (Arc::clone(&stop), Arc::clone(&failures));
            std::thread::spawn(move || {
                let mut made = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let pan = test_pan(1000 * (w + 1) + i);
                    let res = router.post("/v1/cards", &card_body(&pan));
                    if res.status != 201 {
                        failures.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let token = res.json()["id"].as_str().unwrap().to_owned();
                    let res = router.post("/v1/detokenize", &json!({"token": token}));
                    if res.status != 200 || res.json()["number"] != pan.as_str() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    if i % 10 == 0 {
                        made.extend(customer_tokens(&router, &[pan]));
                    }
                    i += 1;
                }
                made
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    during();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let made = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    (made, failures.load(Ordering::Relaxed))
}

/// Several nodes over one PostgreSQL store each unseal themselves through the device: at
/// start, and after one is killed and restarted.
#[test]
fn every_node_unseals_itself_through_the_hsm() {
    let Some(setup) = Setup::hsm_on(Engine::Postgres, "hsm-nodes", &CUSTODIANS, 2) else {
        return;
    };
    let a = setup.start_node("a");
    let b = setup.start_node("b");
    for node in [&a, &b] {
        assert_eq!(health(&setup, node).status, 200, "{}", node.output());
    }
    let at_a = setup.client(&a, &setup.router());
    let at_b = setup.client(&b, &setup.router());
    let cards = tokenize_n(&at_a, 4, 0);
    detokenize_ok(&at_b, &cards[0].0, &cards[0].1);
    a.kill9();
    let a = setup.start_node("a");
    assert_eq!(health(&setup, &a).status, 200, "{}", a.output());
    let at_a = setup.client(&a, &setup.router());
    detokenize_ok(&at_a, &cards[1].0, &cards[1].1);
    assert_eq!(inventory(&setup, &b)["seal"]["backend"], "pkcs11");
    b.stop();
    a.stop();
}

/// What a kill -9 in the middle of a move to the device leaves (the key made in the token,
/// the store not switched: the switch itself is one store transaction) keeps the old seal
/// working: a restart with the device configured finds a key the store is not under, stays
/// sealed saying so, and the custodians unseal it as before; the move run again takes the key
/// the killed run made instead of making another, and completes.
#[test]
fn a_seal_move_killed_after_making_the_key_leaves_the_old_seal_working() {
    if !hsm::available() {
        return;
    }
    let mut setup = Setup::with_custodians("hsm-kill", "", &CUSTODIANS, 2);
    setup.add_softhsm();
    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    let router = setup.client(&daemon, &setup.router());
    let cards = customer_tokens(&router, &[test_pan(1), test_pan(2)]);
    daemon.kill9();

    // The killed run's key: made in the token under the configured label by another store's
    // `keys init` (the same attributes a move gives it).
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let other = setup.root().join("other.toml");
    write(
        &other,
        &text
            .replace("data_dir = \"data\"", "data_dir = \"other-data\"")
            .replace("keys_dir = \"keys\"", "keys_dir = \"other-keys\"")
            .replace("audit/audit.log", "other-audit/audit.log")
            .replacen("[tls]", &format!("{}[tls]", hsm::kek_section()), 1),
    );
    let out = std::process::Command::new(BIN)
        .args(["keys", "init", "--config", other.to_str().unwrap()])
        .args(["--custodians", "alice,bob", "--threshold", "2"])
        .arg(format!(
            "--passphrase-file=alice={}",
            setup.passphrase_file("alice", 1).display()
        ))
        .arg(format!(
            "--passphrase-file=bob={}",
            setup.passphrase_file("bob", 1).display()
        ))
        .env("SOFTHSM2_CONF", &setup.softhsm.as_ref().unwrap().conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    setup.set_kek(&hsm::kek_section());
    let daemon = setup.start();
    assert_eq!(
        sealed_because(&setup, &daemon),
        (503, "wrong_kek".into()),
        "{}",
        daemon.output()
    );
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    assert!(setup.unseal_as(&daemon, "carol", 1).0);
    let router = setup.client(&daemon, &setup.router());
    detokenize_ok(&router, &cards[0].0, &cards[0].1);

    let (ok, out) = migrate(&setup, &daemon, "pkcs11", &["alice", "bob"]);
    assert!(ok, "{out}\n{}", daemon.output());
    assert!(
        !daemon.output().contains("made a KEK in the HSM"),
        "the rerun made a second key"
    );
    daemon.kill9();
    let daemon = setup.start();
    assert_eq!(health(&setup, &daemon).status, 200, "{}", daemon.output());
    let router = setup.client(&daemon, &setup.router());
    detokenize_ok(&router, &cards[1].0, &cards[1].1);
    daemon.stop();
}
