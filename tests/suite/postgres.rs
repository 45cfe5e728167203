//! The PostgreSQL engine's own failure behaviour: a database that stops or stalls under load,
//! and a schema from a newer build.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::detokenize;
use crate::support::*;

/// A vault on its own PostgreSQL with a 2 s statement timeout (the default is 5 s).
fn setup(label: &str) -> Option<Setup> {
    let setup = Setup::on(Engine::Postgres, label)?;
    // `[store.postgres]` is the config's last table.
    let mut config = std::fs::read_to_string(&setup.config).unwrap();
    config.push_str("statement_timeout = \"2s\"\n");
    write(&setup.config, &config);
    Some(setup)
}

fn health(setup: &Setup, daemon: &Daemon) -> (u16, String) {
    let res = setup.client(daemon, &setup.router()).get("/v1/health");
    let status = res.json()["status"].as_str().unwrap_or_default().to_owned();
    (res.status, status)
}

fn wait_for_health(setup: &Setup, daemon: &Daemon, want: (u16, &str), within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = health(setup, daemon);
        if (got.0, got.1.as_str()) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {got:?}, not {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What writers saw while the database went away and came back.
#[derive(Default)]
struct Outcomes {
    /// Acknowledged card tokens and their PANs.
    acked: Vec<(String, String)>,
    /// `storage_unavailable` answers, with how long each took.
    unavailable: Vec<Duration>,
    /// Anything else: must stay empty.
    unexpected: Vec<String>,
}

/// Tokenizes in a loop on `threads` threads until `stop`.
fn writers(
    router: &Client,
    threads: u32,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Outcomes>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let (router, stop, seen) = (router.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let pan = test_pan(500_000 + t * 100_000 + i);
                    i += 1;
                    let started = Instant::now();
                    let res = router.send(
                        "POST",
                        "/v1/cards",
                        &[],
                        Some(card_body(&pan).to_string().as_bytes()),
                    );
                    let mut seen = seen.lock().unwrap();
                    match res {
                        Ok(res) if res.status == 201 => seen
                            .acked
                            .push((res.json()["id"].as_str().unwrap().to_owned(), pan)),
                        Ok(res) if res.status == 503 && res.code() == "storage_unavailable" => {
                            seen.unavailable.push(started.elapsed())
                        }
                        Ok(res) => seen.unexpected.push(format!("{} {}", res.status, res.body)),
                        Err(e) => seen.unexpected.push(e.to_string()),
                    }
                }
            })
        })
        .collect()
}

/// Every acknowledged token is there, once, with its card.
fn assert_all_detokenize(router: &Client, acked: &[(String, String)]) {
    for (id, pan) in acked {
        let res = detokenize(router, id);
        assert_eq!(
            res.status, 200,
            "{id} was acknowledged and is gone: {}",
            res.body
        );
        assert_eq!(res.json()["number"], pan.as_str());
    }
}

/// PostgreSQL stops under load: requests get 503 `storage_unavailable` within the statement
/// timeout, health says `unavailable`; when it is back the same daemon serves again, with no
/// restart and no unseal, and every write it acknowledged is there.
#[test]
fn a_database_outage_gets_503_and_the_vault_reconnects_by_itself() {
    let Some(mut setup) = setup("pg-outage") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let early = router.post("/v1/cards", &card_body(&test_pan(1)));
    assert_eq!(early.status, 201, "{}", early.body);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Outcomes::default()));
    let load = writers(&router, 4, &stop, &seen);
    std::thread::sleep(Duration::from_millis(800));
    setup.pg.as_mut().unwrap().stop();
    wait_for_health(
        &setup,
        &daemon,
        (503, "unavailable"),
        Duration::from_secs(15),
    );
    // Down for a while (longer than a node may go without reading the DEK state): every
    // request in this time is answered, none hangs.
    std::thread::sleep(Duration::from_secs(6));
    let during = seen.lock().unwrap().unavailable.len();
    assert!(
        during > 0,
        "no request was refused while the database was down"
    );
    setup.pg.as_mut().unwrap().start_again().unwrap();
    wait_for_health(&setup, &daemon, (200, "ok"), Duration::from_secs(30));
    // Healthy means serving: the first request reads the DEK state again itself rather than
    // wait for the next round of the thread that does.
    let res = detokenize(&router, early.json()["id"].as_str().unwrap());
    assert_eq!(res.status, 200, "right after the outage: {}", res.body);
    // Writes succeed again on the same process.
    let before = seen.lock().unwrap().acked.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().acked.len() < before + 20 {
        assert!(Instant::now() < deadline, "writes did not resume");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    for handle in load {
        handle.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert!(seen.unexpected.is_empty(), "{:?}", seen.unexpected);
    // The statement timeout is 2 s; a refusal never waits much longer than it.
    let slowest = seen.unavailable.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(6),
        "a refusal took {slowest:?}"
    );
    assert!(daemon.output().contains("storage failure"));
    assert_all_detokenize(&router, &seen.acked);
    let (status, _) = health(&setup, &daemon);
    assert_eq!(status, 200);
    daemon.stop();
}

/// Sends `signal` to the cluster's postmaster and every backend it forked.
fn signal_cluster(setup: &Setup, signal: &str) {
    let pid = setup.pg.as_ref().unwrap().pid().unwrap().to_string();
    let children = std::process::Command::new("pgrep")
        .args(["-P", &pid])
        .output()
        .unwrap();
    let mut pids = vec![pid];
    pids.extend(
        String::from_utf8(children.stdout)
            .unwrap()
            .split_whitespace()
            .map(str::to_owned),
    );
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .args(&pids)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A database that stops answering (every PostgreSQL process frozen, connections open) never
/// hangs a request: it gets 503 within the statement timeout, and the vault serves again
/// when the database does.
#[test]
fn a_stalled_database_never_hangs_a_request() {
    let Some(setup) = setup("pg-stall") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    // Connections in the pool, then the freeze.
    for i in 0..20 {
        let res = router.post("/v1/cards", &card_body(&test_pan(i)));
        assert_eq!(res.status, 201, "{}", res.body);
    }
    signal_cluster(&setup, "STOP");
    let started = Instant::now();
    let res = router.post("/v1/cards", &card_body(&test_pan(99)));
    let took = started.elapsed();
    let refused = router.post(
        "/v1/detokenize",
        &json!({"token": "card_0000000000000000000000000000000a"}),
    );
    signal_cluster(&setup, "CONT");
    assert_eq!(
        (res.status, res.code()),
        (503, "storage_unavailable".into()),
        "{}",
        res.body
    );
    assert!(took < Duration::from_secs(6), "the request waited {took:?}");
    assert_eq!(refused.status, 503, "{}", refused.body);
    wait_for_health(&setup, &daemon, (200, "ok"), Duration::from_secs(30));
    let res = router.post("/v1/cards", &card_body(&test_pan(100)));
    assert_eq!(res.status, 201, "{}", res.body);
    daemon.stop();
}

/// A schema written by a newer cardvault is refused at start, with a message that says so.
/// A schema of the previous version is migrated: the sweep columns are computed for the
/// cards already there.
#[test]
fn a_schema_from_a_newer_cardvault_is_refused() {
    let Some(setup) = setup("pg-schema") else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    assert_eq!(
        router.post("/v1/cards", &card_body(&test_pan(1))).status,
        201
    );
    daemon.stop();
    let pg = setup.pg.as_ref().unwrap();
    assert_eq!(pg::query(pg, "SELECT version FROM cardvault_schema"), "3");
    // As schema 2 left it: no sweep columns.
    pg::query(
        pg,
        "ALTER TABLE cards DROP COLUMN sweep_at; ALTER TABLE idempotency DROP COLUMN created_at; \
         UPDATE cardvault_schema SET version = 2",
    );
    // A restart migrates it, and serves.
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    assert_eq!(
        router.post("/v1/cards", &card_body(&test_pan(2))).status,
        201
    );
    daemon.stop();
    assert_eq!(pg::query(pg, "SELECT count(*) FROM cards"), "2");
    assert_eq!(pg::query(pg, "SELECT version FROM cardvault_schema"), "3");
    // Both cards hold their PAN: due at their expiry, a day from now.
    assert_eq!(
        pg::query(
            pg,
            "SELECT count(*) FROM cards WHERE sweep_at BETWEEN \
             extract(epoch FROM now())::bigint + 86000 AND extract(epoch FROM now())::bigint + 86500"
        ),
        "2"
    );
    pg::query(pg, "UPDATE cardvault_schema SET version = 99");
    let out = Daemon::try_start(&setup)
        .err()
        .expect("started on a newer schema");
    assert!(
        out.contains("schema version 99") && out.contains("newer cardvault"),
        "{out}"
    );
}

/// `store copy` moves a stopped vault from sled to PostgreSQL and back: every card, used
/// token, customer token and key is there after each move, and opens. A second run only
/// verifies; a running daemon, or a destination holding another vault, is refused.
#[test]
fn store_copy_moves_a_vault_between_engines_and_back() {
    if !pg::available() {
        return;
    }
    let setup = Setup::new("copy");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cards: Vec<(String, String)> = (0..12)
        .map(|i| {
            let pan = test_pan(7000 + i);
            let res = router.post("/v1/cards", &card_body(&pan));
            (res.json()["id"].as_str().unwrap().to_owned(), pan)
        })
        .collect();
    let (used, unused) = cards.split_at(4);
    for (id, _) in used {
        assert_eq!(detokenize(&router, id).status, 200);
    }
    let customer = router.post("/v1/customers", &json!({"name": "Ada"})).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (attached, unused) = unused.split_at(3);
    let tokens: Vec<(String, String)> = attached
        .iter()
        .map(|(card, pan)| {
            let res = router.post(
                &format!("/v1/customers/{customer}/tokens"),
                &json!({"source": card}),
            );
            assert_eq!(res.status, 201, "{}", res.body);
            (res.json()["id"].as_str().unwrap().to_owned(), pan.clone())
        })
        .collect();
    // Card tokens are one-off: the first move's check uses some, the second the rest, and
    // those the first used must come back used.
    let (first, second) = unused.split_at(unused.len() / 2);
    let check = |router: &Client, fresh: &[(String, String)], spent: &[(String, String)]| {
        for (id, pan) in fresh.iter().chain(&tokens) {
            let res = detokenize(router, id);
            assert_eq!(res.status, 200, "{id}: {}", res.body);
            assert_eq!(res.json()["number"], pan.as_str());
        }
        for (id, _) in spent {
            assert_eq!(detokenize(router, id).code(), "token_used");
        }
    };

    let pg = pg::start(setup.root());
    let sled_config = std::fs::read_to_string(&setup.config).unwrap();
    let pg_config = sled_config.replace("data_dir = \"data\"\n", "") + &pg.store_config("");
    let (sled_toml, pg_toml) = (setup.root().join("sled.toml"), setup.root().join("pg.toml"));
    write(&sled_toml, &sled_config);
    write(&pg_toml, &pg_config);
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let out = std::process::Command::new(BIN)
            .args(["store", "copy", "--from"])
            .arg(from)
            .arg("--to")
            .arg(to)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    // Not while the sled daemon runs.
    let (ok, out) = copy(&sled_toml, &pg_toml);
    assert!(!ok && out.contains("stop it first"), "{out}");
    daemon.stop();

    let (ok, out) = copy(&sled_toml, &pg_toml);
    assert!(
        ok && out.contains("copied") && out.contains("3 customer tokens"),
        "{out}"
    );
    let (ok, out) = copy(&sled_toml, &pg_toml);
    assert!(ok && out.contains("already copied"), "{out}");

    // The daemon on PostgreSQL: same keys, same tokens.
    write(&setup.config, &pg_config);
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    check(&router, first, used);
    let (ok, out) = copy(&pg_toml, &sled_toml);
    assert!(!ok && out.contains("stop every daemon"), "{out}");
    daemon.stop();

    // Another vault's store is never mixed into this one.
    let other = Setup::new("copy-other");
    let other_daemon = other.start();
    other
        .client(&other_daemon, &other.router())
        .post("/v1/cards", &card_body(&test_pan(1)));
    other_daemon.stop();
    let (ok, out) = copy(&other.config, &pg_toml);
    assert!(!ok && out.contains("another vault"), "{out}");

    // And back, into a fresh sled folder.
    let back = sled_config.replace("data_dir = \"data\"", "data_dir = \"data-back\"");
    write(&setup.config, &back);
    let (ok, out) = copy(&pg_toml, &setup.config);
    assert!(ok && out.contains("copied"), "{out}");
    let daemon = setup.start();
    check(
        &setup.client(&daemon, &setup.router()),
        second,
        &[used, first].concat(),
    );
    daemon.stop();
}

/// Two running daemons never share a node name: a second one with the same `[node] name`
/// refuses to start (and starts once the first has stopped), while one with a name of its own
/// serves beside the first.
#[test]
fn a_second_daemon_with_the_same_node_name_is_refused() {
    let Some(setup) = setup("pg-second") else {
        return;
    };
    let first = setup.start();
    let out = Daemon::try_start(&setup)
        .err()
        .expect("a second daemon with the same node name started");
    assert!(out.contains("uses this node name"), "{out}");
    let other = setup.start_node("other");
    let id = setup
        .client(&first, &setup.router())
        .post("/v1/cards", &card_body(&test_pan(3)));
    assert_eq!(id.status, 201, "{}", id.body);
    let id = id.json()["id"].as_str().unwrap().to_owned();
    let res = setup
        .client(&other, &setup.router())
        .post("/v1/detokenize", &json!({"token": id}));
    assert_eq!(res.status, 200, "{}", res.body);
    other.stop();
    first.stop();
    let second = setup.start();
    let router = setup.client(&second, &setup.router());
    assert_eq!(
        router.post("/v1/cards", &card_body(&test_pan(4))).status,
        201
    );
    second.stop();
}

/// TLS to the database, verified with rustls: with the database's CA the daemon connects over
/// TLS (PostgreSQL shows its sessions encrypted), and with another CA it refuses to start.
#[test]
fn the_database_connection_is_tls_verified_with_rustls() {
    let Some(mut setup) = setup("pg-tls") else {
        return;
    };
    let server = setup.ca.server(&["localhost"]).unwrap();
    setup
        .pg
        .as_mut()
        .unwrap()
        .require_tls(&server.cert_pem, &server.key_pem)
        .unwrap();
    let plain = std::fs::read_to_string(&setup.config).unwrap();
    let tls = plain.replace("@127.0.0.1:", "@localhost:") + "ca = \"ca.pem\"\n";
    write(&setup.config, &tls);
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let id = router.post("/v1/cards", &card_body(&test_pan(5))).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(detokenize(&router, &id).json()["number"], test_pan(5));
    let pg = setup.pg.as_ref().unwrap();
    let encrypted = pg::query(
        pg,
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name = 'cardvault' AND ssl",
    );
    let clear = pg::query(
        pg,
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name = 'cardvault' AND NOT ssl",
    );
    assert!(
        encrypted != "0" && clear == "0",
        "{encrypted} over TLS, {clear} in the clear"
    );
    daemon.stop();

    // Another CA: the server's certificate is not trusted, nothing is sent.
    let other = cardvault::pki::Authority::new("another CA").unwrap();
    write(&setup.root().join("other-ca.pem"), &other.cert_pem());
    write(
        &setup.config,
        &tls.replace("ca = \"ca.pem\"", "ca = \"other-ca.pem\""),
    );
    let out = Daemon::try_start(&setup)
        .err()
        .expect("started with an untrusted database");
    assert!(
        out.contains("database unavailable") && out.contains("certificate"),
        "{out}"
    );
}
