//! Several daemons over one PostgreSQL: any node serves any request, exactly once across
//! nodes, and the cluster rides out the loss of a node, of the primary database and of one
//! node's link to it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::keys::{
    customer_tokens, dek_versions, detokenize_ok, inventory, rekey_as_ops, tokenize_n, wait_for,
};
use crate::support::*;

/// A dev-key vault on its own PostgreSQL, with `extra` top-level settings.
fn cluster_setup(label: &str, extra: &str) -> Option<Setup> {
    Setup::on_with(Engine::Postgres, label, extra)
}

/// Nodes `n1`..`nN` of `setup`, started one after another.
fn nodes(setup: &Setup, n: usize) -> Vec<Daemon> {
    (1..=n)
        .map(|i| setup.start_node(&format!("n{i}")))
        .collect()
}

const LEADS: &str = "this node now runs the background work";

/// A node's `cardvault_nodes` and `cardvault_leader` metrics.
fn cluster_view(setup: &Setup, daemon: &Daemon) -> (u64, bool) {
    let prometheus = setup.identity(&spec("prometheus"));
    let text = setup.client(daemon, &prometheus).get("/v1/metrics").body;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics"))
    };
    (value("cardvault_nodes"), value("cardvault_leader") == 1)
}

/// Waits until every node counts all `nodes` and exactly one leads; returns the leader.
fn settled(setup: &Setup, nodes: &[&Daemon]) -> usize {
    let mut leader = None;
    wait_for(
        "the nodes to see each other",
        Duration::from_secs(15),
        || {
            let views: Vec<(u64, bool)> = nodes.iter().map(|d| cluster_view(setup, d)).collect();
            let leaders: Vec<usize> = (0..views.len()).filter(|i| views[*i].1).collect();
            leader = leaders.first().copied();
            views.iter().all(|v| v.0 == nodes.len() as u64) && leaders.len() == 1
        },
    );
    leader.unwrap()
}

fn audit_lines(setup: &Setup, node: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(setup.root().join(format!("audit-{node}/audit.log")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Any node serves any request; a card token is used once across nodes (48 racing
/// detokenizes over 3 nodes, and attach against detokenize on different nodes); one
/// `Idempotency-Key` sent to two nodes at once makes one card; a CVC given at one node comes
/// back once, at another; every audit line names its node and each node's file verifies.
#[test]
fn three_nodes_serve_one_vault_exactly_once() {
    let Some(setup) = cluster_setup("cluster", "") else {
        return;
    };
    let nodes = nodes(&setup, 3);
    let routers: Vec<Client> = nodes
        .iter()
        .map(|d| setup.client(d, &setup.router()))
        .collect();

    // Written at one node, read at the others; the CVC comes back once, at the first use.
    let card = routers[0].post("/v1/cards", &card_body(&test_pan(1)));
    assert_eq!(card.status, 201, "{}", card.body);
    let id = card.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(routers[2].get(&format!("/v1/cards/{id}")).status, 200);
    let first = routers[1].post("/v1/detokenize", &json!({"token": id}));
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["cvc"], "737", "{}", first.body);
    let again = routers[2].post("/v1/detokenize", &json!({"token": id}));
    assert_eq!((again.status, again.code()), (409, "token_used".into()));

    // 48 detokenizes of one card token over 3 nodes: one 200.
    let id = routers[2]
        .post("/v1/cards", &card_body(&test_pan(2)))
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let barrier = Arc::new(Barrier::new(48));
    let handles: Vec<_> = (0..48)
        .map(|i| {
            let (router, id, barrier) = (routers[i % 3].clone(), id.clone(), barrier.clone());
            std::thread::spawn(move || {
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
    let results: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|(s, _)| *s == 200).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .all(|(s, b)| *s == 200 || (*s == 409 && b.contains("token_used"))),
        "{results:?}"
    );

    // Attach at one node against detokenize at another: one winner per card token.
    let customer = routers[0].post("/v1/customers", &json!({"email": "ada@example.com"}));
    let customer = customer.json()["id"].as_str().unwrap().to_owned();
    for round in 0..3u32 {
        let card = routers[0]
            .post("/v1/cards", &card_body(&test_pan(10 + round)))
            .json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let barrier = Arc::new(Barrier::new(12));
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let (router, barrier, card, customer) = (
                    routers[i % 3].clone(),
                    barrier.clone(),
                    card.clone(),
                    customer.clone(),
                );
                std::thread::spawn(move || {
                    let (path, body) = if i % 2 == 0 {
                        (
                            format!("/v1/customers/{customer}/tokens"),
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
            .filter(|(s, _)| matches!(s, 200 | 201))
            .count();
        assert_eq!(wins, 1, "round {round}: {results:?}");
    }

    // The same Idempotency-Key at two nodes at once: one card, the same id to both.
    for round in 0..5u32 {
        let key = format!("two-nodes-{round}");
        let body = card_body(&test_pan(100 + round)).to_string();
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = [0usize, 1]
            .into_iter()
            .map(|n| {
                let (router, barrier, key, body) = (
                    routers[n].clone(),
                    barrier.clone(),
                    key.clone(),
                    body.clone(),
                );
                std::thread::spawn(move || {
                    let headers = [("Idempotency-Key", key.as_str())];
                    let conn = router.connect().unwrap();
                    barrier.wait();
                    let mut res = conn
                        .send("POST", "/v1/cards", &headers, Some(body.as_bytes()))
                        .unwrap();
                    // The other node's request is still running: retry, as a client does.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while res.status == 409 && res.code() == "idempotency_in_progress" {
                        assert!(Instant::now() < deadline, "the key stayed in progress");
                        std::thread::sleep(Duration::from_millis(20));
                        res = router
                            .send("POST", "/v1/cards", &headers, Some(body.as_bytes()))
                            .unwrap();
                    }
                    assert_eq!(res.status, 201, "{}", res.body);
                    res.json()["id"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        let ids: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ids[0], ids[1], "round {round}: two cards for one key");
    }

    // Each node's own audit file: every line names it, and the chain verifies.
    for (i, daemon) in nodes.into_iter().enumerate() {
        daemon.stop();
        let name = format!("n{}", i + 1);
        let lines = audit_lines(&setup, &name);
        assert!(lines.len() > 2, "{name}: {lines:?}");
        assert!(
            lines.iter().all(|l| l["node"] == name.as_str()),
            "{lines:?}"
        );
        let log = setup.root().join(format!("audit-{name}/audit.log"));
        let (ok, out) = setup.try_cli(&["audit", "verify", log.to_str().unwrap()]);
        assert!(ok, "{name}: {out}");
    }
    // The cards at rest: one per tokenization above (2 + 3 + 5 idempotent ones, once each).
    assert_eq!(setup.stored_cards(), 10);
}

/// A CVC kept in the shared store: sealed there (never its digits) in an unlogged table, gone
/// at its first use whichever node uses it, and past `cvc_ttl` at every node.
#[test]
fn a_cvc_is_shared_by_the_nodes_sealed_and_expires_everywhere() {
    let Some(setup) = cluster_setup("cluster-cvc", "cvc_ttl = \"2s\"") else {
        return;
    };
    let nodes = nodes(&setup, 2);
    let (a, b) = (
        setup.client(&nodes[0], &setup.router()),
        setup.client(&nodes[1], &setup.router()),
    );
    let mut body = card_body(&test_pan(1));
    body["cvc"] = json!("4917");
    let id = a.post("/v1/cards", &body).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pg = setup.pg.as_ref().unwrap();
    // Unlogged: never in the WAL, on a standby or in a WAL archive.
    assert_eq!(
        pg::query(
            pg,
            "SELECT relpersistence FROM pg_class WHERE relname = 'cvcs'"
        ),
        "u"
    );
    let stored = pg::query(pg, "SELECT encode(value, 'hex') FROM cvcs");
    // Nonce, one sealed 4-byte code and its tag: never the code's digits.
    assert_eq!(stored.len(), 2 * (12 + 4 + 16), "{stored}");
    assert!(
        !stored.contains(&cardvault::crypto::hex(b"4917")),
        "{stored}"
    );
    let res = b.post("/v1/detokenize", &json!({"token": id}));
    assert_eq!(res.json()["cvc"], "4917", "{}", res.body);
    assert_eq!(pg::query(pg, "SELECT count(*) FROM cvcs"), "0");

    // Past the TTL: no CVC at any node, and the leader's sweep removes it from the store.
    let id = a.post("/v1/cards", &body).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_millis(2500));
    let res = b.post("/v1/detokenize", &json!({"token": id}));
    assert_eq!(res.status, 200, "{}", res.body);
    assert!(res.json().get("cvc").is_none(), "{}", res.body);
    a.post("/v1/cards", &body);
    wait_for(
        "the expired CVC to be swept",
        Duration::from_secs(10),
        || {
            std::thread::sleep(Duration::from_millis(500));
            pg::query(pg, "SELECT count(*) FROM cvcs") == "0"
        },
    );
}

/// `keys rotate` at one node reaches the others within 2 s; the old version is destroyed
/// only once no node uses it. The leader dies in the middle of the re-encryption pass, and
/// another node takes the work over and finishes it.
#[test]
fn a_rotation_reaches_every_node_and_survives_the_leaders_death() {
    let Some(setup) = cluster_setup(
        "cluster-rotate",
        "[keys]\nreencrypt_batch = 10\nreencrypt_pause = \"150ms\"\n",
    ) else {
        return;
    };
    let started = nodes(&setup, 3);
    let leading = settled(&setup, &started.iter().collect::<Vec<_>>());
    let mut nodes: Vec<Option<Daemon>> = started.into_iter().map(Some).collect();
    let router = |n: usize| setup.client(nodes[n].as_ref().unwrap(), &setup.router());
    let cards = tokenize_n(&router(0), 300, 0);
    let other = (leading + 1) % 3;
    let third = (leading + 2) % 3;

    let ops = setup.client(nodes[other].as_ref().unwrap(), &setup.ops());
    let res = ops.post("/v1/admin/keys/rotate", &json!({}));
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["active_dek_version"], 2);
    let rotated = Instant::now();
    // Every node seals under version 2 within 2 s.
    for daemon in nodes.iter().flatten() {
        wait_for(
            "the new version at every node",
            Duration::from_secs(2),
            || inventory(&setup, daemon)["active_dek_version"] == 2,
        );
    }
    assert!(rotated.elapsed() <= Duration::from_secs(3));
    let pg = setup.pg.as_ref().unwrap();
    let fresh = tokenize_n(&router(third), 5, 1000);
    for (id, _) in &fresh {
        // The key version: bytes 26..30 of the record (format, flags, three timestamps).
        let version = pg::query(
            pg,
            &format!("SELECT get_byte(value, 29) FROM cards WHERE id = '{id}'"),
        );
        assert_eq!(version, "2", "{id} sealed under an old version");
    }

    // The leader dies mid-pass (300 records, 10 per 150 ms): another node finishes it.
    std::thread::sleep(Duration::from_millis(1200));
    let under_v1 = || {
        pg::query(
            pg,
            "SELECT count(*) FROM cards WHERE get_byte(value, 29) = 1",
        )
        .parse::<u32>()
        .unwrap()
    };
    assert!(
        under_v1() > 0,
        "the pass ended before the leader was killed"
    );
    nodes[leading].take().unwrap().kill9();
    let survivors: Vec<&Daemon> = nodes.iter().flatten().collect();
    wait_for("another node to lead", Duration::from_secs(15), || {
        survivors.iter().any(|d| d.output().contains(LEADS))
    });
    wait_for("version 1 to be destroyed", Duration::from_secs(90), || {
        dek_versions(&inventory(&setup, survivors[0]))
            .get(&1)
            .is_some_and(|(state, _)| state == "destroyed")
    });
    assert_eq!(under_v1(), 0);
    let reader = setup.client(survivors[1], &setup.router());
    for (token, pan) in cards.iter().chain(&fresh) {
        detokenize_ok(&reader, token, pan);
    }
}

/// Unseal with one `cardvault unseal` per custodian for every node; a KEK rekey at one node
/// leaves every node serving, keys made afterwards at another node included; a node started
/// afterwards unseals with the new shares only.
#[test]
fn a_rekey_at_one_node_leaves_every_node_serving() {
    let Some(setup) =
        Setup::custodians_on(Engine::Postgres, "cluster-rekey", "", &["alice", "bob"], 2)
    else {
        return;
    };
    let nodes = nodes(&setup, 3);
    let unseal_all = |name: &str, generation: u32, daemons: &[&Daemon]| {
        let who = setup.identity(&spec(name));
        let mut args = vec![
            "unseal".to_owned(),
            "--share".into(),
            setup.share(name).display().to_string(),
            "--passphrase-file".into(),
            setup
                .passphrase_file(name, generation)
                .display()
                .to_string(),
            "--cert".into(),
            who.cert.display().to_string(),
            "--key".into(),
            who.key.display().to_string(),
        ];
        for d in daemons {
            args.extend(["--url".into(), format!("https://{}", d.addr)]);
        }
        setup.try_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let all: Vec<&Daemon> = nodes.iter().collect();
    let (ok, out) = unseal_all("alice", 1, &all);
    assert!(ok && out.matches("still sealed").count() == 3, "{out}");
    let (ok, out) = unseal_all("bob", 1, &all);
    assert!(ok && out.matches("unsealed").count() == 3, "{out}");
    let routers: Vec<Client> = nodes
        .iter()
        .map(|d| setup.client(d, &setup.router()))
        .collect();
    let cards = tokenize_n(&routers[0], 6, 0);

    let (ok, out) = rekey_as_ops(
        &setup,
        &format!("https://{}", nodes[0].addr),
        &["alice", "bob"],
        &["alice", "bob"],
    );
    assert!(ok, "{out}");
    // Every node serves on, and keys made after the rekey (a new project's) at another node
    // open everywhere, and after a restart under the new shares.
    detokenize_ok(&routers[1], &cards[0].0, &cards[0].1);
    detokenize_ok(&routers[2], &cards[1].0, &cards[1].1);
    let shop = routers[1].in_project("after-rekey");
    let late = tokenize_n(&shop, 2, 50);
    detokenize_ok(
        &routers[2].in_project("after-rekey"),
        &late[0].0,
        &late[0].1,
    );
    let kek = inventory(&setup, &nodes[0])["keys"][0]["id"].clone();
    wait_for(
        "the new KEK id at every node",
        Duration::from_secs(5),
        || {
            nodes
                .iter()
                .all(|d| inventory(&setup, d)["keys"][0]["id"] == kek)
        },
    );

    // A node started now: the old shares are refused, the new ones unseal it.
    let fourth = setup.start_node("n4");
    let (ok, out) = unseal_all("alice", 1, &[&fourth]);
    assert!(!ok, "an old share was accepted: {out}");
    assert!(unseal_all("alice", 2, &[&fourth]).0);
    let (ok, out) = unseal_all("bob", 2, &[&fourth]);
    assert!(ok && out.contains("unsealed"), "{out}");
    let reader = setup.client(&fourth, &setup.router());
    detokenize_ok(&reader, &cards[2].0, &cards[2].1);
    detokenize_ok(&reader.in_project("after-rekey"), &late[1].0, &late[1].1);
}

/// What a client saw from the cluster while something died.
#[derive(Default)]
struct Seen {
    /// Acknowledged card tokens and their PANs.
    acked: Vec<(String, String)>,
    /// 503 `storage_unavailable` (or a connection to a dead node refused).
    refused: usize,
    /// Anything else: must stay empty.
    unexpected: Vec<String>,
}

/// Tokenizes in a loop over `clients` (round robin) until `stop`; a refused connection (a
/// dead node) goes to the next node, as a load balancer's health check would send it.
fn load(
    clients: Vec<Client>,
    threads: u32,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Seen>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let (clients, stop, seen) = (clients.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let pan = test_pan(700_000 + t * 100_000 + i);
                    let client = &clients[(i as usize + t as usize) % clients.len()];
                    i += 1;
                    let res = client.send(
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
                        Ok(res) if res.status == 503 => seen.refused += 1,
                        Ok(res) => seen.unexpected.push(format!("{} {}", res.status, res.body)),
                        Err(_) => seen.refused += 1,
                    }
                }
            })
        })
        .collect()
}

/// Stops the load and returns what it saw, which held nothing unexpected.
fn finish<'a>(
    stop: &AtomicBool,
    workers: Vec<std::thread::JoinHandle<()>>,
    seen: &'a Mutex<Seen>,
) -> std::sync::MutexGuard<'a, Seen> {
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert!(seen.unexpected.is_empty(), "{:?}", seen.unexpected);
    seen
}

/// kill -9 of one node under load: the others keep answering, every write any node
/// acknowledged is there, and a retry of an idempotent request at another node gets the
/// first outcome.
#[test]
fn a_node_killed_under_load_loses_nothing_acknowledged() {
    let Some(setup) = cluster_setup("cluster-kill", "") else {
        return;
    };
    let mut nodes: Vec<Option<Daemon>> = nodes(&setup, 3).into_iter().map(Some).collect();
    let client = |n: usize| setup.client(nodes[n].as_ref().unwrap(), &setup.router());
    let clients: Vec<Client> = (0..3).map(client).collect();
    // An idempotent tokenization answered by node 0 before it dies.
    let body = card_body(&test_pan(42)).to_string();
    let headers = [("Idempotency-Key", "before-the-kill")];
    let first = clients[0]
        .send("POST", "/v1/cards", &headers, Some(body.as_bytes()))
        .unwrap();
    assert_eq!(first.status, 201, "{}", first.body);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let workers = load(clients.clone(), 4, &stop, &seen);
    std::thread::sleep(Duration::from_millis(1500));
    nodes[0].take().unwrap().kill9();
    let at_kill = seen.lock().unwrap().acked.len();
    std::thread::sleep(Duration::from_secs(3));
    let seen = finish(&stop, workers, &seen);
    assert!(
        seen.acked.len() > at_kill + 20,
        "the other nodes stopped answering: {} then {}",
        at_kill,
        seen.acked.len()
    );
    // The retry at another node: the first outcome, not a second card.
    let retry = clients[1]
        .send("POST", "/v1/cards", &headers, Some(body.as_bytes()))
        .unwrap();
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(retry.json()["id"], first.json()["id"]);
    let reader = &clients[2];
    for (id, pan) in &seen.acked {
        detokenize_ok(reader, id, pan);
    }
}

/// The primary dies under load (kill -9) and its synchronous standby is promoted: nodes whose
/// URL names both carry on after a window of 503s, with no restart and no unseal; every token
/// acknowledged before the kill is there, and a card token used before it stays used.
#[test]
fn the_primary_dies_and_the_nodes_carry_on_with_the_promoted_standby() {
    let Some(mut setup) = cluster_setup("cluster-failover", "") else {
        return;
    };
    let standby = setup.pg.as_ref().unwrap().standby("pg-standby").unwrap();
    let primary_port = setup.pg.as_ref().unwrap().port;
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let both = format!(
        "postgresql://postgres@127.0.0.1:{primary_port},127.0.0.1:{}/cardvault?target_session_attrs=read-write",
        standby.port
    );
    let old = format!("postgresql://postgres@127.0.0.1:{primary_port}/cardvault");
    assert!(config.contains(&old), "{config}");
    write(
        &setup.config,
        &format!(
            "{}statement_timeout = \"2s\"\n",
            config.replace(&old, &both)
        ),
    );
    let nodes = nodes(&setup, 2);
    let clients: Vec<Client> = nodes
        .iter()
        .map(|d| setup.client(d, &setup.router()))
        .collect();
    let used = tokenize_n(&clients[0], 3, 0);
    for (id, pan) in &used {
        detokenize_ok(&clients[1], id, pan);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let workers = load(clients.clone(), 4, &stop, &seen);
    std::thread::sleep(Duration::from_millis(1500));
    setup.pg.as_mut().unwrap().kill9().unwrap();
    let acked_before_kill = seen.lock().unwrap().acked.clone();
    std::thread::sleep(Duration::from_millis(500));
    standby.promote().unwrap();
    let promoted = Instant::now();
    // Writes are acknowledged again, by both nodes, on the same processes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let recovered = loop {
        let n = seen.lock().unwrap().acked.len();
        if n > acked_before_kill.len() + 40 {
            break promoted.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no write succeeded after the promotion"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let seen = finish(&stop, workers, &seen);
    assert!(
        seen.refused > 0,
        "no request was refused while there was no primary"
    );
    eprintln!(
        "writes acknowledged again {recovered:?} after the promotion; {} refused in all",
        seen.refused
    );
    for client in &clients {
        assert_eq!(client.get("/v1/health").status, 200);
    }
    for (id, pan) in &seen.acked {
        detokenize_ok(&clients[1], id, pan);
    }
    for (id, _) in &used {
        let res = clients[0].post("/v1/detokenize", &json!({"token": id}));
        assert_eq!(res.code(), "token_used", "{}", res.body);
    }
    drop(standby);
}

/// One node loses its link to the database (a black hole: nothing is reset): it answers 503
/// `storage_unavailable` within the timeout and health says `unavailable`, the other node
/// serves on, and the cut-off node recovers by itself when the link is back.
#[test]
fn a_node_cut_off_from_the_database_answers_503_and_recovers() {
    let Some(setup) = cluster_setup("cluster-partition", "") else {
        return;
    };
    let port = setup.pg.as_ref().unwrap().port;
    let relay = Relay::new(format!("127.0.0.1:{port}").parse().unwrap());
    let healthy = setup.start_node("n1");
    // Node 2 reaches the database through the relay, with a 2 s timeout.
    let config = std::fs::read_to_string(setup.node_config("n2")).unwrap();
    let via = config.replace(
        &format!("127.0.0.1:{port}/"),
        &format!("127.0.0.1:{}/", relay.port),
    ) + "statement_timeout = \"2s\"\n";
    let path = setup.root().join("n2-relay.toml");
    write(&path, &via);
    let cut_off = Daemon::start_config(&path).unwrap();
    let (a, b) = (
        setup.client(&healthy, &setup.router()),
        setup.client(&cut_off, &setup.router()),
    );
    let before = tokenize_n(&b, 3, 0);

    relay.cut();
    let started = Instant::now();
    let res = b.post("/v1/cards", &card_body(&test_pan(10)));
    assert_eq!(
        (res.status, res.code()),
        (503, "storage_unavailable".into()),
        "{}",
        res.body
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    wait_for("health to say unavailable", Duration::from_secs(15), || {
        let res = b.get("/v1/health");
        res.status == 503 && res.json()["status"] == "unavailable"
    });
    // The other node serves on, and reads what the cut-off node wrote before.
    let during = tokenize_n(&a, 3, 20);
    detokenize_ok(&a, &before[0].0, &before[0].1);

    relay.mend();
    wait_for(
        "the cut-off node to recover",
        Duration::from_secs(30),
        || b.get("/v1/health").status == 200,
    );
    wait_for(
        "writes at the recovered node",
        Duration::from_secs(15),
        || b.post("/v1/cards", &card_body(&test_pan(30))).status == 201,
    );
    detokenize_ok(&b, &during[0].0, &during[0].1);
    detokenize_ok(&b, &before[1].0, &before[1].1);
}

/// An identity's detokenize rate holds for the cluster: with 3 nodes, successes stay within
/// the policy's rate (+10%) plus its burst, not three times that.
#[test]
fn the_detokenize_rate_limit_holds_across_nodes() {
    let Some(setup) = cluster_setup("cluster-limits", "") else {
        return;
    };
    let policy = POLICY.replace(
        "name = \"router\"\n",
        "name = \"router\"\ndetokenize_per_second = 20.0\ndetokenize_burst = 6\n",
    );
    write(&setup.policy, &policy);
    let nodes = nodes(&setup, 3);
    let routers: Vec<Client> = nodes
        .iter()
        .map(|d| setup.client(d, &setup.router()))
        .collect();
    let pans: Vec<String> = (0..3).map(test_pan).collect();
    let tokens = customer_tokens(&routers[0], &pans);
    // Every node has seen the other two before the clock starts, and the buckets are full.
    settled(&setup, &nodes.iter().collect::<Vec<_>>());
    std::thread::sleep(Duration::from_secs(1));
    let window = Duration::from_secs(4);
    let ok = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..6)
        .map(|t| {
            let (router, ok, token) = (routers[t % 3].clone(), ok.clone(), tokens[t % 3].0.clone());
            std::thread::spawn(move || {
                while started.elapsed() < window {
                    let res = router.post("/v1/detokenize", &json!({"token": token}));
                    if res.status == 200 {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        assert_eq!(res.status, 429, "{}", res.body);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::SeqCst) as f64;
    let allowed = 20.0 * 1.1 * elapsed + 6.0;
    assert!(
        ok <= allowed,
        "{ok} detokenizations in {elapsed:.1}s: more than the cluster's {allowed:.0}"
    );
    // And the limit is not starved either: the nodes together admit most of the rate.
    assert!(ok >= 20.0 * 0.6 * elapsed, "only {ok} in {elapsed:.1}s");
}
