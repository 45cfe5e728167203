//! Card portability against GnuPG, the independent OpenPGP implementation: files gpg encrypts
//! to the vault's import key are imported by the real daemon; exports it writes are decrypted
//! by gpg with the recipient's secret key.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use super::detokenize;
use crate::support::*;

/// A GnuPG home of its own; `None` (the test is skipped) when gpg is missing and not required.
struct Gpg {
    home: TempDir,
}

impl Gpg {
    fn new(label: &str) -> Option<Gpg> {
        let found = Command::new("gpg")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                std::env::var_os("CARDVAULT_REQUIRE_GPG").is_none(),
                "gpg is required (CARDVAULT_REQUIRE_GPG) but not installed"
            );
            eprintln!("skipped: gpg is not installed");
            return None;
        }
        let home = TempDir::new(&format!("gpg-{label}"));
        std::fs::set_permissions(
            home.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        Some(Gpg { home })
    }

    /// Runs gpg with `args`; panics on failure; returns stdout.
    fn run(&self, args: &[&str]) -> Vec<u8> {
        let (ok, out, err) = self.try_run(args);
        assert!(ok, "gpg {args:?}: {}", String::from_utf8_lossy(&err));
        out
    }

    fn try_run(&self, args: &[&str]) -> (bool, Vec<u8>, Vec<u8>) {
        let out = Command::new("gpg")
            .arg("--homedir")
            .arg(self.home.path())
            .args([
                "--batch",
                "--yes",
                "--no-tty",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--trust-model",
                "always",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.success(), out.stdout, out.stderr)
    }

    /// A new key pair (ed25519 and cv25519); returns its fingerprint.
    fn generate(&self, uid: &str) -> String {
        self.run(&["--quick-gen-key", uid, "future-default", "default", "never"]);
        let listing = String::from_utf8(self.run(&["--with-colons", "--list-keys", uid])).unwrap();
        listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:::::::::"))
            .map(|f| f.trim_end_matches(':').to_owned())
            .unwrap()
    }

    fn import(&self, key: &Path) {
        self.run(&["--import", key.to_str().unwrap()]);
    }

    fn export_public(&self, uid: &str, to: &Path) {
        let armored = self.run(&["--armor", "--export", uid]);
        std::fs::write(to, armored).unwrap();
    }

    fn encrypt(&self, recipient: &str, plain: &Path, out: &Path, sign_with: Option<&str>) {
        let mut args = vec!["--output", out.to_str().unwrap(), "--recipient", recipient];
        if let Some(signer) = sign_with {
            args.extend(["--local-user", signer, "--sign"]);
        }
        args.extend(["--encrypt", plain.to_str().unwrap()]);
        self.run(&args);
    }
}

/// The fingerprint (first `fpr` line) of a key gpg has imported under `uid`.
fn fingerprint(gpg: &Gpg, uid: &str) -> String {
    let listing = String::from_utf8(gpg.run(&["--with-colons", "--list-keys", uid])).unwrap();
    listing
        .lines()
        .find_map(|l| l.strip_prefix("fpr:::::::::"))
        .map(|f| f.trim_end_matches(':').to_owned())
        .unwrap()
}

/// The vault's import key, made by `keys import-key`, imported into gpg; returns the
/// fingerprint gpg gives it.
fn vault_import_key(setup: &Setup, daemon: &Daemon, gpg: &Gpg, algorithm: &str) -> String {
    let migrator = setup.identity(&spec("migrator"));
    let (ok, out) = setup.cli_as(
        daemon,
        &migrator,
        &["keys", "import-key", "--algorithm", algorithm],
    );
    assert!(ok, "{out}");
    let start = out.find("-----BEGIN PGP PUBLIC KEY BLOCK-----").unwrap();
    let path = setup.root().join(format!("vault-{algorithm}.asc"));
    write(&path, &out[start..]);
    gpg.import(&path);
    let fpr = fingerprint(gpg, "cardvault import key");
    assert!(out.contains(&fpr), "{out}");
    fpr
}

fn import(
    setup: &Setup,
    daemon: &Daemon,
    file: &Path,
    out: &Path,
    extra: &[&str],
) -> (bool, String) {
    let migrator = setup.identity(&spec("migrator"));
    let mut args = vec![
        "import",
        "--file",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    setup.cli_as(daemon, &migrator, &args)
}

/// The results file's lines after its header, split into fields.
fn results(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("row,customer_ref,customer,token,status"));
    lines
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect()
}

fn audit_lines(setup: &Setup, action: &str) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    for file in files_below(&setup.root().join("audit")) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if v["event"] == action {
                    found.push(v);
                }
            }
        }
    }
    found
}

both_engines!(gpg_encrypted_cards_import_once_and_detokenize_to_their_rows);

fn gpg_encrypted_cards_import_once_and_detokenize_to_their_rows(engine: Engine) {
    let Some(gpg) = Gpg::new("import") else {
        return;
    };
    let Some(setup) = Setup::on_with(engine, "import", "spool_dir = \"spool\"\n") else {
        return;
    };
    std::fs::create_dir(setup.root().join("spool")).unwrap();
    let daemon = setup.start();
    let vault_fpr = vault_import_key(&setup, &daemon, &gpg, "curve25519");
    let year = future_year();
    let pans: Vec<String> = (0..4).map(|n| test_pan(7000 + n)).collect();
    // Rows 1-2: one customer with two cards; row 3: the first card again (a duplicate);
    // row 4: no reference; then bad rows, none of which may stop the import.
    let csv = format!(
        "number,exp_month,exp_year,holder_name,customer_ref,email,name,phone,network_transaction_id,recurring_model\n\
         {p0},4,{year},Ada Lovelace,psp-cus-1,ada@example.com,\"Lovelace, Ada\",+44 20 7946 0000,483297487231504,subscription\n\
         {p1},5,{year},Ada Lovelace,psp-cus-1,,,,,\n\
         {p0},4,{year},,psp-cus-1,,,,,\n\
         {p2},12,{year},,,,,,,unscheduled\n\
         {bad},4,{year},,psp-cus-2,,,,,\n\
         {p3},4,2020,,psp-cus-3,,,,,\n\
         ,4,{year},,psp-cus-4,,,,,\n\
         {p3},\"4,{year},,psp-cus-5,,,,,\n\
         {p3},4,{year},,{p2},,,,,\n",
        p0 = pans[0],
        p1 = pans[1],
        p2 = pans[2],
        p3 = pans[3],
        bad = &pans[3][..15],
    );
    let plain = setup.root().join("cards.csv");
    write(&plain, &csv);
    let encrypted = setup.root().join("cards.csv.gpg");
    gpg.encrypt(&vault_fpr, &plain, &encrypted, None);
    std::fs::remove_file(&plain).unwrap();

    let out = setup.root().join("results.csv");
    let (ok, output) = import(&setup, &daemon, &encrypted, &out, &[]);
    assert!(ok, "{output}");
    assert!(
        output.contains("complete rows=9 created=3 duplicate=1 failed=5"),
        "{output}"
    );
    let first = results(&out);
    let statuses: Vec<&str> = first.iter().map(|r| r[4].as_str()).collect();
    assert_eq!(
        statuses,
        [
            "created",
            "created",
            "duplicate",
            "created",
            "invalid_number",
            "invalid_expiry",
            "invalid_number",
            "malformed_row",
            "invalid_customer_ref",
        ]
    );
    let rows: Vec<&str> = first.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(rows, ["1", "2", "3", "4", "5", "6", "7", "8", "9"]);
    // One customer for psp-cus-1; the duplicate row names the first row's token.
    assert_eq!(first[0][1], "psp-cus-1");
    assert_eq!(first[0][2], first[1][2]);
    assert_ne!(first[0][3], first[1][3]);
    assert_eq!(first[2][3], first[0][3]);
    assert_ne!(first[3][2], first[0][2]);
    // No card number, and no submitted value of a bad row, in the results.
    let text = std::fs::read_to_string(&out).unwrap();
    for pan in &pans {
        assert!(!text.contains(pan.as_str()));
    }
    assert!(!text.contains(&pans[3][..15]));

    // Every token detokenizes to its row.
    let router = setup.client(&daemon, &setup.router());
    for (row, pan, month) in [(0, &pans[0], 4), (1, &pans[1], 5), (3, &pans[2], 12)] {
        let res = detokenize(&router, &first[row][3]);
        assert_eq!(res.status, 200, "{}", res.body);
        let card = res.json();
        assert_eq!(card["number"], pan.as_str());
        assert_eq!(
            (card["exp_month"].as_i64(), card["exp_year"].as_i64()),
            (Some(month), Some(i64::from(year)))
        );
    }
    let card = detokenize(&router, &first[0][3]).json();
    assert_eq!(card["holder_name"], "Ada Lovelace");
    assert_eq!(
        card["recurring"]["scheme_transaction_id"],
        "483297487231504"
    );
    assert_eq!(card["recurring"]["model"], "subscription");
    let customer = router.get(&format!("/v1/customers/{}", first[0][2])).json();
    assert_eq!(customer["email"], "ada@example.com");
    assert_eq!(customer["name"], "Lovelace, Ada");
    assert_eq!(customer["metadata"]["customer_ref"], "psp-cus-1");

    // The same file again creates nothing and gives the same ids.
    let again = setup.root().join("results-2.csv");
    let (ok, output) = import(&setup, &daemon, &encrypted, &again, &[]);
    assert!(ok, "{output}");
    assert!(
        output.contains("complete rows=9 created=0 duplicate=4 failed=5"),
        "{output}"
    );
    let second = results(&again);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a[..4], b[..4]);
        if a[4] == "created" {
            assert_eq!(b[4], "duplicate");
        } else {
            assert_eq!(a[4], b[4]);
        }
    }
    let customer = router
        .get(&format!("/v1/customers/{}/tokens", first[0][2]))
        .json();
    assert_eq!(
        customer["data"].as_array().map(Vec::len),
        Some(2),
        "{customer}"
    );

    // One audit line per import, with counts, never a row's data.
    let lines = audit_lines(&setup, "cards.import");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["bulk"]["created"], 3);
    assert_eq!(lines[0]["bulk"]["failed"], 5);
    assert_eq!(lines[0]["bulk"]["key"], vault_fpr.as_str());
    assert_eq!(lines[1]["bulk"]["duplicate"], 4);
    assert_eq!(audit_lines(&setup, "import.key_created").len(), 1);

    // The spool is empty, and no file the import touched holds a card number in clear.
    assert_eq!(
        files_below(&setup.root().join("spool")),
        Vec::<PathBuf>::new()
    );
    let log = daemon.stop();
    for pan in &pans {
        assert!(!log.contains(pan.as_str()));
    }
    let leaks = files_containing_digits(setup.root(), &pans);
    assert!(leaks.is_empty(), "card numbers in clear in {leaks:?}");
}

#[test]
fn damaged_altered_misaddressed_or_unsigned_files_import_nothing() {
    let Some(gpg) = Gpg::new("refusals") else {
        return;
    };
    let setup = Setup::with_settings("import-refusals", "spool_dir = \"spool\"\n");
    std::fs::create_dir(setup.root().join("spool")).unwrap();
    let daemon = setup.start();
    // The default key (RSA-4096), as a PSP would be given.
    let vault_fpr = vault_import_key(&setup, &daemon, &gpg, "rsa4096");
    let sender = gpg.generate("Old PSP <migrations@old-psp.test>");
    let stranger = gpg.generate("Someone Else <else@example.test>");
    let year = future_year();
    let pans: Vec<String> = (0..200).map(|n| test_pan(8000 + n)).collect();
    let mut csv = String::from("number,exp_month,exp_year,customer_ref\n");
    for (i, pan) in pans.iter().enumerate() {
        csv.push_str(&format!("{pan},6,{year},ref-{i}\n"));
    }
    let plain = setup.root().join("cards.csv");
    write(&plain, &csv);
    let signed = setup.root().join("signed.gpg");
    gpg.encrypt(&vault_fpr, &plain, &signed, Some(&sender));
    let elsewhere = setup.root().join("elsewhere.gpg");
    gpg.encrypt(&stranger, &plain, &elsewhere, None);
    std::fs::remove_file(&plain).unwrap();
    let sender_key = setup.root().join("sender.asc");
    gpg.export_public(&sender, &sender_key);
    let stranger_key = setup.root().join("stranger.asc");
    gpg.export_public(&stranger, &stranger_key);

    let bytes = std::fs::read(&signed).unwrap();
    // A byte changed in the middle of the ciphertext, and the file cut short.
    let mut altered = bytes.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 0x01;
    let altered_path = setup.root().join("altered.gpg");
    std::fs::write(&altered_path, &altered).unwrap();
    let truncated_path = setup.root().join("truncated.gpg");
    std::fs::write(&truncated_path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let garbage_path = setup.root().join("plain.csv.gpg");
    std::fs::write(
        &garbage_path,
        format!("number,exp_month,exp_year\n{},1,{year}\n", pans[0]),
    )
    .unwrap();

    for (file, code) in [
        (&altered_path, "file_damaged"),
        (&truncated_path, "file_damaged"),
        (&elsewhere, "wrong_key"),
        (&garbage_path, "not_openpgp"),
    ] {
        let out = setup.root().join(format!("{code}-results.csv"));
        let (ok, output) = import(&setup, &daemon, file, &out, &[]);
        assert!(!ok, "{file:?} was imported: {output}");
        assert!(output.contains(code), "{file:?}: {output}");
        assert!(!out.exists());
        for pan in &pans {
            assert!(!output.contains(pan.as_str()));
        }
    }
    // The wrong signer is refused; the right one imports.
    let out = setup.root().join("wrong-signer.csv");
    let (ok, output) = import(
        &setup,
        &daemon,
        &signed,
        &out,
        &["--signer", stranger_key.to_str().unwrap()],
    );
    assert!(!ok && output.contains("bad_signature"), "{output}");
    // Nothing was imported by any refused attempt: every row is new now.
    let out = setup.root().join("results.csv");
    let (ok, output) = import(
        &setup,
        &daemon,
        &signed,
        &out,
        &["--signer", sender_key.to_str().unwrap()],
    );
    assert!(ok, "{output}");
    assert!(output.contains("complete rows=200 created=200"), "{output}");
    let lines = audit_lines(&setup, "cards.import");
    let refusals: Vec<_> = lines
        .iter()
        .filter_map(|l| l["code"].as_str().map(str::to_owned))
        .collect();
    // The import that passed names the signer its signature was checked against.
    assert_eq!(lines.last().unwrap()["bulk"]["signer"], sender.as_str());
    assert_eq!(
        refusals,
        [
            "file_damaged",
            "file_damaged",
            "wrong_key",
            "not_openpgp",
            "bad_signature"
        ]
    );
    // A removed key opens nothing any more.
    let migrator = setup.identity(&spec("migrator"));
    let (ok, out_text) = setup.cli_as(
        &daemon,
        &migrator,
        &["keys", "import-key", "--remove", &vault_fpr],
    );
    assert!(ok, "{out_text}");
    let (ok, output) = import(&setup, &daemon, &signed, &setup.root().join("r3.csv"), &[]);
    assert!(!ok && output.contains("no_import_key"), "{output}");
    assert_eq!(
        files_below(&setup.root().join("spool")),
        Vec::<PathBuf>::new()
    );
    drop(daemon);
    std::fs::remove_file(&garbage_path).unwrap();
    let leaks = files_containing_digits(setup.root(), &pans);
    assert!(leaks.is_empty(), "card numbers in clear in {leaks:?}");
}

#[test]
fn exports_need_a_second_identity_and_decrypt_only_for_the_recipient() {
    let Some(gpg) = Gpg::new("export") else {
        return;
    };
    let setup = Setup::new("export");
    let daemon = setup.start();
    let router = setup.client(&daemon, &setup.router());
    // Customers and tokens made through the API, with recurring data and a profile.
    let year = future_year();
    let pans: Vec<String> = (0..3).map(|n| test_pan(9000 + n)).collect();
    let mut expected = Vec::new();
    for (i, pan) in pans.iter().enumerate() {
        let cust = router.post(
            "/v1/customers",
            &json!({"email": format!("c{i}@example.com"), "metadata": {"customer_ref": format!("ref-{i}")}}),
        );
        assert_eq!(cust.status, 201, "{}", cust.body);
        let cust = cust.json()["id"].as_str().unwrap().to_owned();
        let card = router.post("/v1/cards", &card_body(pan)).json();
        let tok = router.post(
            &format!("/v1/customers/{cust}/tokens"),
            &json!({"source": card["id"]}),
        );
        assert_eq!(tok.status, 201, "{}", tok.body);
        expected.push((
            pan.clone(),
            cust,
            tok.json()["id"].as_str().unwrap().to_owned(),
        ));
    }
    let recipient = gpg.generate("New PSP <imports@new-psp.test>");
    let recipient_key = setup.root().join("new-psp.asc");
    gpg.export_public(&recipient, &recipient_key);

    let a = setup.identity(&spec("exporter-a"));
    let b = setup.identity(&spec("exporter-b"));
    let (ok, out) = setup.cli_as(
        &daemon,
        &a,
        &[
            "export",
            "request",
            "--recipient",
            recipient_key.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("exp_"))
        .unwrap()
        .to_owned();
    let file = setup.root().join("export.csv.gpg");
    let f = file.to_str().unwrap();
    // Not approved: nothing leaves. The requester cannot approve its own request.
    let (ok, out) = setup.cli_as(&daemon, &a, &["export", "fetch", &id, "--out", f]);
    assert!(!ok && out.contains("export_not_approved"), "{out}");
    assert!(!file.exists());
    let (ok, out) = setup.cli_as(&daemon, &a, &["export", "approve", &id]);
    assert!(!ok && out.contains("self_approval"), "{out}");
    // Someone without `export` cannot approve.
    let (ok, out) = setup.cli_as(&daemon, &setup.router(), &["export", "approve", &id]);
    assert!(!ok && out.contains("403"), "{out}");
    let (ok, out) = setup.cli_as(&daemon, &b, &["export", "approve", &id]);
    assert!(ok, "{out}");
    let (ok, out) = setup.cli_as(&daemon, &a, &["export", "fetch", &id, "--out", f]);
    assert!(ok, "{out}");

    // Encrypted: no card number in the file; gpg opens it with the recipient's secret key.
    let bytes = std::fs::read(&file).unwrap();
    for pan in &pans {
        assert!(!contains(&bytes, pan.as_bytes()));
    }
    let plain = String::from_utf8(gpg.run(&["--decrypt", f])).unwrap();
    let mut lines = plain.lines();
    assert_eq!(
        lines.next(),
        Some("number,exp_month,exp_year,holder_name,customer_ref,email,name,phone,network_transaction_id,recurring_model,customer,token")
    );
    let mut rows: Vec<Vec<String>> = lines
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    rows.sort_by(|x, y| x[0].cmp(&y[0]));
    let mut want = expected.clone();
    want.sort();
    assert_eq!(rows.len(), want.len());
    for (row, (pan, cust, tok)) in rows.iter().zip(&want) {
        assert_eq!(&row[0], pan);
        assert_eq!(row[2], year.to_string());
        assert_eq!((&row[10], &row[11]), (cust, tok));
        assert!(row[4].starts_with("ref-") && row[5].ends_with("@example.com"));
    }
    // Every step is an audit line, with who did it.
    let requested = audit_lines(&setup, "export.requested");
    let approved = audit_lines(&setup, "export.approved");
    let fetched = audit_lines(&setup, "export.fetched");
    // Written before the first byte left, with the recipient's key.
    let released = audit_lines(&setup, "export.released");
    assert_eq!(released.len(), 1);
    assert_eq!(released[0]["identity"], "exporter-a");
    assert_eq!(released[0]["object"], id.as_str());
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0]["identity"], "exporter-a");
    assert_eq!(
        approved
            .iter()
            .map(|l| (l["identity"].as_str().unwrap(), l["code"].as_str()))
            .collect::<Vec<_>>(),
        [("exporter-a", Some("self_approval")), ("exporter-b", None)]
    );
    assert_eq!(fetched.len(), 2);
    assert_eq!(fetched[0]["code"], "export_not_approved");
    assert_eq!(fetched[1]["bulk"]["rows"], 3);
    assert_eq!(fetched[1]["object"], id.as_str());
    // A second approval is refused.
    let (ok, out) = setup.cli_as(&daemon, &b, &["export", "approve", &id]);
    assert!(!ok && out.contains("export_already_approved"), "{out}");
    drop(daemon);
    std::fs::remove_file(&file).unwrap();
    let leaks = files_containing_digits(setup.root(), &pans);
    assert!(leaks.is_empty(), "card numbers in clear in {leaks:?}");
}
