//! Disk trouble: `data_dir` on a small tmpfs that fills up; the audit log on one that fills
//! between an object's commit and its audit line; store files damaged or replaced by an older
//! copy.
//!
//! The full-disk tests need root (to mount a tmpfs), which CI has; elsewhere they say so and
//! pass without checking anything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

/// A tmpfs mounted on `path`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_gets_503_and_the_vault_recovers_when_space_returns() {
    let setup = Setup::new("diskfull");
    let Some(tmpfs) = Tmpfs::mount(&setup.data_dir, "4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let daemon = setup.start();
    let mut router = setup.client(&daemon, &setup.router()).session();

    // Fill the disk: every answer is a 201 or a clean 503, never a 500 or a dropped connection.
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..20_000u32 {
        let pan = test_pan(300_000 + i);
        let res = router.post("/v1/cards", &card_body(&pan));
        match res.status {
            201 => acked.push((res.json()["id"].as_str().unwrap().to_owned(), pan)),
            503 => {
                assert_eq!(res.code(), "storage_unavailable", "{}", res.body);
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            other => panic!("{other} while the disk filled: {}", res.body),
        }
    }
    assert!(
        refused >= 5,
        "the disk never filled ({} cards written)",
        acked.len()
    );
    assert!(!acked.is_empty());

    // Reads go on while writes are refused. sled finishes pending node splits on the read
    // path too (a write), so a read may be refused the same way, but never anything else.
    let (id, _) = &acked[0];
    let res = router.get(&format!("/v1/cards/{id}"));
    assert!(
        res.status == 200 || (res.status, res.code()) == (503, "storage_unavailable".into()),
        "{} {}",
        res.status,
        res.body
    );

    // Out of the load balancer's rotation while it cannot write.
    let res = router.get("/v1/health");
    assert_eq!(
        (res.status, res.json()["status"].as_str()),
        (503, Some("unavailable"))
    );

    // Space returns: the same daemon takes writes again, without a restart.
    tmpfs.resize("64m");
    let mut recovered = false;
    for i in 0..200u32 {
        let pan = test_pan(400_000 + i);
        let res = router.post("/v1/cards", &card_body(&pan));
        if res.status == 201 {
            acked.push((res.json()["id"].as_str().unwrap().to_owned(), pan));
            recovered = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        recovered,
        "the daemon did not take writes again once space returned"
    );
    assert_eq!(router.get("/v1/health").status, 200);

    // Everything acknowledged, before and after the full disk, is there after a crash.
    daemon.kill9();
    let daemon = setup.start();
    let mut router = setup.client(&daemon, &setup.router()).session();
    for (id, pan) in &acked {
        let res = router.post("/v1/detokenize", &serde_json::json!({"token": id}));
        assert_eq!(res.status, 200, "{id}: {}", res.body);
        assert_eq!(res.json()["number"], pan.as_str());
    }
    drop(daemon);
}

/// How much shorter than an earlier audit line of the same kind a line may be: its time may
/// drop up to four characters (trailing zeros of the milliseconds are not written), its client
/// port may be a digit shorter.
const LINE_SLACK: u64 = 10;

/// How many bytes can be appended to `file` before its filesystem must give it another block:
/// tmpfs allocates whole pages, so an append that fits in the last one needs no free space.
fn room_in_last_block(file: &Path) -> u64 {
    let meta = std::fs::metadata(file).unwrap();
    (meta.blocks() * 512).saturating_sub(meta.len())
}

/// The length of the last line of the audit log, newline included.
fn last_line_len(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines().last().map_or(0, |l| l.len() as u64 + 1)
}

/// A POST with an `Idempotency-Key`, on a connection of its own: its status, whether it was
/// a replay (`idempotent-replayed: true`; `support::Response` keeps no headers), its body.
fn post_keyed(
    setup: &Setup,
    daemon: &Daemon,
    who: &Identity,
    path: &str,
    key: &str,
    body: &Value,
) -> (u16, bool, Value) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(setup.root().join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(&who.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&who.key).unwrap())
    .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = TcpStream::connect(daemon.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nIdempotency-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).unwrap();
    tls.flush().unwrap();
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => panic!("POST {path}: {e}"),
    }
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let replayed = head
        .lines()
        .any(|l| l.trim().eq_ignore_ascii_case("idempotent-replayed: true"));
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    (status, replayed, body)
}

/// The audit log alone on a small tmpfs (`data_dir` stays on the normal disk), so that the
/// line a creating request writes after committing its object is the first write refused for
/// space. The request gets 503 `audit_unavailable`; its `Idempotency-Key` keeps the object
/// all the same, so the client's retry gets that object back, replayed, and no second one is
/// made. For a card, a customer and a customer token (whose retry would otherwise be refused
/// 409 `token_used`, the token made never reported).
#[test]
fn an_object_made_before_its_audit_line_failed_is_replayed_not_made_twice() {
    let setup = Setup::new("audit-full-idem");
    let audit_dir = setup.root().join("audit");
    let Some(_tmpfs) = Tmpfs::mount(&audit_dir, "2m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let log = audit_dir.join("audit.log");
    let daemon = setup.start();
    let who = setup.router();
    let router = setup.client(&daemon, &who);

    let new_card = |n: u32| {
        let res = router.post("/v1/cards", &card_body(&test_pan(n)));
        assert_eq!(res.status, 201, "{}", res.body);
        res.json()["id"].as_str().unwrap().to_owned()
    };
    // A card to read: each read is one audit line, which moves the log's end in its page.
    let probe_card = new_card(1);
    let tokenize_line = last_line_len(&log);

    // Sends `body` to `path` under `key` once the disk has no free block and the log's last
    // one too little room for the request's line (about `line` bytes): 503. Space returns,
    // the trail recovers by itself, and the retry gets what the first request made.
    let refused_then_replayed = |path: &str, key: &str, body: &Value, line: u64| {
        let mut reads = 0;
        while room_in_last_block(&log) + LINE_SLACK >= line {
            let res = router.get(&format!("/v1/cards/{probe_card}"));
            assert_eq!(res.status, 200, "{}", res.body);
            reads += 1;
            assert!(
                reads < 2000,
                "the log's end never left too little room for a line"
            );
        }
        let filler = audit_dir.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xA5u8; 64 * 1024];
        let full = loop {
            if let Err(e) = file.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(full.raw_os_error(), Some(28), "not ENOSPC: {full}");
        drop(file);

        let (status, replayed, first) = post_keyed(&setup, &daemon, &who, path, key, body);
        assert_eq!(
            (status, first["error"]["code"].as_str()),
            (503, Some("audit_unavailable")),
            "{first}"
        );
        assert!(!replayed);

        std::fs::remove_file(&filler).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while router.get("/v1/health").status != 200 {
            assert!(
                Instant::now() < deadline,
                "the audit trail did not recover once space returned"
            );
            std::thread::sleep(Duration::from_millis(100));
        }

        let (status, replayed, again) = post_keyed(&setup, &daemon, &who, path, key, body);
        assert_eq!(status, 201, "{again}");
        assert!(replayed, "the retry made a new object: {again}");
        // And it stays the one object.
        let (status, replayed, third) = post_keyed(&setup, &daemon, &who, path, key, body);
        assert_eq!((status, replayed, &third["id"]), (201, true, &again["id"]));
        again["id"].as_str().unwrap().to_owned()
    };

    let pan = test_pan(2);
    let card = refused_then_replayed("/v1/cards", "card-key", &card_body(&pan), tokenize_line);
    let res = router.get(&format!("/v1/cards/{card}"));
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["last4"], &pan[pan.len() - 4..]);

    let res = router.post("/v1/customers", &json!({"email": "probe@example.com"}));
    assert_eq!(res.status, 201, "{}", res.body);
    let holder = res.json()["id"].as_str().unwrap().to_owned();
    let customer_line = last_line_len(&log);
    let customer = refused_then_replayed(
        "/v1/customers",
        "customer-key",
        &json!({"email": "grace.hopper@navy.example"}),
        customer_line,
    );
    let res = router.get(&format!("/v1/customers/{customer}"));
    assert_eq!(
        res.json()["email"],
        "grace.hopper@navy.example",
        "{}",
        res.body
    );

    let tokens = format!("/v1/customers/{holder}/tokens");
    let res = router.post(&tokens, &json!({"source": new_card(3)}));
    assert_eq!(res.status, 201, "{}", res.body);
    let probe_token = res.json()["id"].as_str().unwrap().to_owned();
    let attach_line = last_line_len(&log);
    let source = new_card(4);
    let token = refused_then_replayed(
        tokens.as_str(),
        "attach-key",
        &json!({"source": source}),
        attach_line,
    );
    let held: Vec<String> = router.get(&tokens).json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(
        held.contains(&probe_token) && held.contains(&token),
        "{held:?}"
    );

    let output = daemon.stop();
    // Each object the failed requests made is named in the daemon's log, without card data.
    for id in [&card, &customer, &token] {
        assert!(
            output
                .lines()
                .any(|l| l.contains(id.as_str()) && l.contains("audit line was lost")),
            "{id} not logged as committed without its audit line:\n{output}"
        );
    }
    assert!(!output.contains(&pan), "a PAN in the log");
    // Counted in the store itself: one object per key.
    let db = sled::Config::new().path(&setup.data_dir).open().unwrap();
    let count = |tree: &str| db.open_tree(tree).unwrap().len();
    assert_eq!(count("cards"), 4, "a retry made a second card");
    assert_eq!(count("customers"), 2, "a retry made a second customer");
    assert_eq!(count("customer_tokens"), 2, "a retry made a second token");
}

#[test]
fn a_corrupted_store_stops_startup_with_a_message() {
    let setup = Setup::new("corrupt");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    for i in 0..20 {
        assert_eq!(
            router.post("/v1/cards", &card_body(&test_pan(i))).status,
            201
        );
    }
    daemon.stop();
    // Overwrite the middle of every store file with garbage.
    for file in files_below(&setup.data_dir) {
        let mut bytes = std::fs::read(&file).unwrap();
        let len = bytes.len();
        if len > 64 {
            for b in &mut bytes[len / 4..len * 3 / 4] {
                *b = 0xA5;
            }
            std::fs::write(&file, bytes).unwrap();
        }
    }
    match Daemon::try_start(&setup) {
        Ok(daemon) => {
            drop(daemon);
            panic!("the daemon served a corrupted store");
        }
        Err(output) => assert!(
            output.contains("cardvault: error: store damaged:") && output.contains("backup"),
            "no clear message:\n{output}"
        ),
    }
}

/// An older copy of the store put in place of the current one would bring back card tokens
/// that were used since (a replay): startup refuses it.
#[test]
fn an_older_copy_of_the_store_is_refused() {
    let setup = Setup::new("rollback");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let res = router.post("/v1/cards", &card_body(&test_pan(1)));
    assert_eq!(res.status, 201, "{}", res.body);
    let id = res.json()["id"].as_str().unwrap().to_owned();
    daemon.stop();
    let copy = setup.dir.path().join("data-copy");
    copy_store(&setup.data_dir, &copy);

    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let res = router.post("/v1/detokenize", &serde_json::json!({"token": id}));
    assert_eq!(res.status, 200, "{}", res.body);
    daemon.stop();

    // The copy from before the card token was used, with today's witness left in place.
    for file in files_below(&setup.data_dir) {
        if !file.ends_with(WITNESS) {
            std::fs::remove_file(file).unwrap();
        }
    }
    copy_store(&copy, &setup.data_dir);
    match Daemon::try_start(&setup) {
        Ok(daemon) => {
            let router = setup.client(&daemon, &setup.router());
            let res = router.post("/v1/detokenize", &serde_json::json!({"token": id}));
            drop(daemon);
            panic!(
                "the daemon served an older copy of the store (detokenize: {})",
                res.status
            );
        }
        Err(output) => assert!(
            output.contains("cardvault: error: store damaged:") && output.contains("older copy"),
            "no clear message:\n{output}"
        ),
    }
}

/// The store's commit witness, in `data_dir`.
const WITNESS: &str = "cardvault.commit";

/// Copies the sled files of a store (not its commit witness) from `from` to `to`.
fn copy_store(from: &Path, to: &Path) {
    for file in files_below(from) {
        if file.ends_with(WITNESS) {
            continue;
        }
        let target = to.join(file.strip_prefix(from).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&file, &target).unwrap();
    }
}
