//! Online backup and offline restore: a backup taken under load restores into a new folder
//! and serves every token acknowledged before it began, with used card tokens still used; a
//! damaged file, a changed one (its digest recomputed) and another vault's are refused before
//! anything is written; the permission is enforced, and a PostgreSQL store is sent to the
//! database's own tools.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::keys::{customer_tokens, detokenize_ok, tokenize_n};
use crate::support::*;

const CUSTODIANS: [&str; 3] = ["alice", "bob", "carol"];

/// `cardvault backup --out OUT` as `who`.
fn backup(setup: &Setup, daemon: &Daemon, who: &Identity, out: &Path) -> (bool, String) {
    setup.cli_as(daemon, who, &["backup", "--out", out.to_str().unwrap()])
}

/// `cardvault restore --config CONFIG --from FILE` with `custodians`' shares of `setup`.
fn restore(setup: &Setup, config: &Path, from: &Path, custodians: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(BIN);
    command
        .args(["restore", "--config", config.to_str().unwrap()])
        .args(["--from", from.to_str().unwrap()]);
    for name in custodians {
        command.arg("--share").arg(setup.share(name));
        command.arg(format!(
            "--passphrase-file={name}={}",
            setup.passphrase_file(name, 1).display()
        ));
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A config for the same vault over another `data_dir` and audit log.
fn config_beside(setup: &Setup, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{name}-data\""),
        )
        .replace("audit/audit.log", &format!("{name}-audit/audit.log"));
    let path = setup.root().join(format!("{name}.toml"));
    write(&path, &text);
    path
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// The restore drill: a backup taken while requests run restores into a new folder; the
/// restored vault unseals and every token acknowledged before the backup began detokenizes,
/// and every card token used before it stays used. Refusals come first and write nothing.
#[test]
fn a_backup_taken_under_load_restores_into_a_new_folder() {
    let setup = Setup::with_custodians("backup-drill", "", &CUSTODIANS, 2);
    let daemon = setup.start();
    assert!(setup.unseal_as(&daemon, "alice", 1).0);
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    let router = setup.client(&daemon, &setup.router());
    let cards = tokenize_n(&router, 40, 0);
    let (used, unused) = cards.split_at(15);
    for (token, pan) in used {
        detokenize_ok(&router, token, pan);
    }
    let reusable = customer_tokens(&router, &[test_pan(100), test_pan(101)]);

    // Not with a permission other than `backup`.
    let file = setup.root().join("vault.backup");
    let (ok, out) = backup(&setup, &daemon, &setup.ops(), &file);
    assert!(!ok && out.contains("403"), "{out}");
    assert!(!file.exists());

    let mut taken = (false, String::new());
    let (made, failures) = crate::hsm::under_load(&setup, &daemon, || {
        taken = backup(&setup, &daemon, &setup.identity(&spec("backup")), &file);
    });
    let (ok, out) = taken;
    assert!(ok, "{out}\n{}", daemon.output());
    assert!(out.contains("ciphertext and wrapped keys only"), "{out}");
    assert!(!made.is_empty());
    assert_eq!(failures, 0, "requests failed during the backup");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Ciphertext only.
    let bytes = std::fs::read(&file).unwrap();
    for (_, pan) in cards.iter().chain(&reusable) {
        assert!(!contains(&bytes, pan.as_bytes()), "a PAN in the backup");
    }
    daemon.stop();
    let audit = std::fs::read_to_string(setup.root().join("audit/audit.log")).unwrap();
    assert!(
        audit
            .contains("\"event\":\"store.backup\",\"outcome\":\"success\",\"identity\":\"backup\""),
        "{audit}"
    );

    let restored = config_beside(&setup, "restored");
    let restored_data = setup.root().join("restored-data");
    // A damaged copy: refused before anything is written.
    let damaged = setup.root().join("damaged.backup");
    let mut broken = bytes.clone();
    let middle = broken.len() / 2;
    broken[middle] ^= 0x40;
    std::fs::write(&damaged, &broken).unwrap();
    let (ok, out) = restore(&setup, &restored, &damaged, &["alice", "carol"]);
    assert!(!ok && out.contains("damaged"), "{out}");
    assert!(is_empty(&restored_data), "a damaged backup wrote something");
    // Changed by someone without the KEK, its SHA-256 recomputed: the MAC refuses it.
    let changed = setup.root().join("changed.backup");
    let body = broken.len() - 64;
    let digest = ring::digest::digest(&ring::digest::SHA256, &broken[..body]);
    broken[body..body + 32].copy_from_slice(digest.as_ref());
    std::fs::write(&changed, &broken).unwrap();
    let (ok, out) = restore(&setup, &restored, &changed, &["alice", "carol"]);
    assert!(!ok && out.contains("MAC does not match"), "{out}");
    assert!(is_empty(&restored_data), "a changed backup wrote something");
    // Another vault's custodians: refused before any passphrase is asked for.
    let other = Setup::with_custodians("backup-other", "", &CUSTODIANS, 2);
    let (ok, out) = restore(&other, &other.config, &file, &["alice", "bob"]);
    assert!(!ok && out.contains("another vault's backup"), "{out}");
    assert!(is_empty(&other.data_dir));

    let (ok, out) = restore(&setup, &restored, &file, &["alice", "carol"]);
    assert!(ok, "{out}");
    assert!(out.contains("digest and MAC checked"), "{out}");
    let (ok, out) = restore(&setup, &restored, &file, &["alice", "carol"]);
    assert!(!ok && out.contains("not empty"), "{out}");

    let daemon = Daemon::start_with(&restored, &setup.env()).unwrap();
    let health = setup.client(&daemon, &setup.router()).get("/v1/health");
    assert_eq!(health.status, 503, "the restored vault must start sealed");
    assert!(setup.unseal_as(&daemon, "bob", 1).0);
    assert!(setup.unseal_as(&daemon, "carol", 1).0);
    let router = setup.client(&daemon, &setup.router());
    for (token, pan) in unused.iter().chain(&reusable) {
        detokenize_ok(&router, token, pan);
    }
    for (token, _) in used {
        let res = router.post("/v1/detokenize", &json!({"token": token}));
        assert_eq!(
            (res.status, res.code()),
            (409, "token_used".into()),
            "{token}"
        );
    }
    // It serves new work too.
    tokenize_n(&router, 3, 50_000);
    daemon.stop();
}

/// A PostgreSQL store is backed up with the database's own tools: the endpoint says so.
#[test]
fn a_postgres_store_is_sent_to_the_databases_tools() {
    let Some(setup) = Setup::on(Engine::Postgres, "backup-pg") else {
        return;
    };
    let daemon = setup.start();
    let file = setup.root().join("vault.backup");
    let (ok, out) = backup(&setup, &daemon, &setup.identity(&spec("backup")), &file);
    assert!(!ok && out.contains("backup_refused"), "{out}");
    assert!(!file.exists() && !setup.root().join("vault.backup.partial").exists());
    daemon.stop();
    let audit = std::fs::read_to_string(setup.root().join("audit/audit.log")).unwrap();
    assert!(
        audit.contains("\"event\":\"store.backup\",\"outcome\":\"failure\""),
        "the refusal was not audited: {audit}"
    );
}

/// With the HSM seal, a restore needs no custodian: the HSM's KEK opens the backup's root
/// key, and the restored vault unseals itself.
#[test]
fn an_hsm_sealed_backup_restores_through_the_hsm() {
    let Some(setup) = Setup::hsm_on(Engine::Sled, "backup-hsm", &CUSTODIANS, 2) else {
        return;
    };
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    let cards = tokenize_n(&router, 5, 0);
    let file = setup.root().join("vault.backup");
    let (ok, out) = backup(&setup, &daemon, &setup.identity(&spec("backup")), &file);
    assert!(ok, "{out}");
    daemon.stop();

    let restored = config_beside(&setup, "restored");
    let out = std::process::Command::new(BIN)
        .args(["restore", "--config", restored.to_str().unwrap()])
        .args(["--from", file.to_str().unwrap()])
        .envs(setup.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = Daemon::start_with(&restored, &setup.env()).unwrap();
    let router = setup.client(&daemon, &setup.router());
    assert_eq!(router.get("/v1/health").status, 200, "{}", daemon.output());
    for (token, pan) in &cards {
        detokenize_ok(&router, token, pan);
    }
    daemon.stop();
}
