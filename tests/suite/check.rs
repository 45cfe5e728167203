//! `cardvault check` and `cardvault policy explain`: a config judged without starting, every
//! problem listed at once, the same problems stopping `serve`; and what a certificate may do.

use std::os::unix::fs::PermissionsExt;

use crate::support::*;

#[test]
fn check_lists_every_problem_and_serve_refuses_on_the_same() {
    let setup = Setup::new("check");
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(ok && out.contains("no problems"), "{out}");

    // Two problems at once: a TLS key others can read, and no audit key.
    let key = setup.root().join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(setup.keys_dir.join("audit.key")).unwrap();
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(!ok, "{out}");
    assert!(out.contains("readable by others"), "{out}");
    assert!(out.contains("audit.key"), "{out}");
    assert!(out.contains("2 problem(s) found"), "{out}");

    let refused = Daemon::try_start(&setup).err().expect("serve started");
    assert!(
        refused.contains("readable by others") && refused.contains("audit.key"),
        "{refused}"
    );
}

/// With the PostgreSQL engine, `check` also judges its files (without contacting the
/// database): a password file others can read and a CA that does not load are problems.
#[test]
fn check_judges_the_database_files() {
    let setup = Setup::new("check-pg");
    let password = setup.root().join("db.password");
    write(&password, "secret\n");
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("data_dir = \"data\"\n", "")
        + "[store]\nengine = \"postgres\"\n[store.postgres]\n\
           url = \"postgresql://cardvault@127.0.0.1:1/cardvault\"\n\
           password_file = \"db.password\"\nca = \"missing-ca.pem\"\n";
    write(&setup.config, &config);
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(!ok, "{out}");
    assert!(out.contains("db.password is open to others"), "{out}");
    assert!(out.contains("[store.postgres] ca"), "{out}");
    assert!(
        out.contains("2 problem(s) found") && !out.contains("secret"),
        "{out}"
    );
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    write(
        &setup.config,
        &config.replace("ca = \"missing-ca.pem\"\n", ""),
    );
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(ok && out.contains("no problems"), "{out}");
}

/// An import's spool folder: missing is a warning (only imports need it); writable by others
/// without the sticky bit is a problem.
#[test]
fn check_judges_the_spool_folder() {
    let setup = Setup::with_settings("check-spool", "spool_dir = \"spool\"\n");
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(
        ok && out.contains("spool_dir") && out.contains("spool_unavailable"),
        "{out}"
    );
    let spool = setup.root().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(!ok && out.contains("without the sticky bit"), "{out}");
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (ok, out) = setup.try_cli(&["check"]);
    assert!(ok && !out.contains("spool_dir"), "{out}");
}

#[test]
fn policy_explain_names_the_identity_and_what_it_may_do() {
    let setup = Setup::new("explain");
    let explain = |who: &Identity| {
        setup.try_cli(&["policy", "explain", "--cert", who.cert.to_str().unwrap()])
    };
    let (ok, out) = explain(&setup.router());
    assert!(ok, "{out}");
    assert!(out.contains("identity router"), "{out}");
    assert!(
        out.contains("customers, detokenize, fingerprint, forward, read, tokenize"),
        "{out}"
    );
    assert!(out.contains("BIN-8, last 4 and fingerprints"), "{out}");
    let (ok, out) = explain(&setup.checkout());
    assert!(
        ok && out.contains("cards shown as BIN-6 and last 4"),
        "{out}"
    );
    let (ok, out) = explain(&setup.identity(&spec("stranger")));
    assert!(!ok && out.contains("matches no identity"), "{out}");
    let mut no_eku = spec("router");
    no_eku.client_auth_eku = false;
    let (ok, out) = explain(&setup.identity(&no_eku));
    assert!(!ok && out.contains("clientAuth"), "{out}");
}

/// Every option of every command says what it is for in `--help`.
#[test]
fn every_flag_has_help_text() {
    let commands: &[&[&str]] = &[
        &["serve"],
        &["dev"],
        &["check"],
        &["bench"],
        &["unseal"],
        &["keys", "init"],
        &["keys", "status"],
        &["keys", "rotate"],
        &["keys", "rekey"],
        &["audit", "verify"],
        &["audit", "rotate-key"],
        &["policy", "explain"],
        &["store", "copy"],
    ];
    for command in commands {
        let out = std::process::Command::new(BIN)
            .args(*command)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{command:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let option = line.trim_start();
            if !option.starts_with("--") && !option.starts_with("-h") {
                continue;
            }
            // Help on the same line, after the flag and its value name, or on the next.
            // (A lone `[default: ...]` is not help.)
            let same_line = option
                .split("  ")
                .filter(|s| !s.trim().is_empty())
                .nth(1)
                .is_some_and(|help| !help.trim_start().starts_with('['));
            let next_line = lines.get(i + 1).is_some_and(|next| {
                next.starts_with("          ") && !next.trim_start().starts_with('-')
            });
            assert!(
                same_line || next_line,
                "{command:?}: {option:?} has no help text:\n{text}"
            );
        }
    }
}
