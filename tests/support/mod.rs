//! Test harness: real certificates, a real daemon process, a real mTLS client.
//!
//! Each test gets its own folder, CA, policy, KEK and `cardvault serve` process on a free
//! loopback port. The client is plain rustls over a TCP socket, one connection per request,
//! so a refused handshake shows up as an error and every byte the daemon sends is seen.

#![allow(dead_code)]

pub mod hsm;
pub mod pg;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cardvault::pki::{Authority, ClientSpec};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub const BIN: &str = env!("CARGO_BIN_EXE_cardvault");
/// The insecure dev key file in `keys_dir`.
pub const DEV_KEY: &str = "INSECURE-dev-kek.key";

/// A folder removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("cardvault-test-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("CARDVAULT_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub const POLICY: &str = r#"
[[identity]]
name = "router"
uri_san = "spiffe://cardvault.test/router"
permissions = ["tokenize", "read", "customers", "detokenize", "forward", "fingerprint"]
projects = ["*"]
show_iin8 = true

[[identity]]
name = "checkout"
uri_san = "spiffe://cardvault.test/checkout"
permissions = ["tokenize", "read"]
projects = ["*"]

# Prometheus: scrapes /v1/metrics and nothing else.
[[identity]]
name = "prometheus"
uri_san = "spiffe://cardvault.test/prometheus"
permissions = ["metrics"]

# An edge that makes customer tokens but never sees a card number or a fingerprint.
[[identity]]
name = "edge"
uri_san = "spiffe://cardvault.test/edge"
permissions = ["tokenize", "read", "customers"]
projects = ["*"]

[[identity]]
name = "ops"
common_name = "ops.cardvault.test"
permissions = ["keys"]
projects = ["*"]

[[identity]]
name = "shop-a-edge"
dns_san = "edge.shop-a.test"
permissions = ["tokenize", "read"]
projects = ["shop-a"]

[[identity]]
name = "alice"
uri_san = "spiffe://cardvault.test/alice"
permissions = ["unseal"]

[[identity]]
name = "bob"
uri_san = "spiffe://cardvault.test/bob"
permissions = ["unseal"]

[[identity]]
name = "carol"
uri_san = "spiffe://cardvault.test/carol"
permissions = ["unseal"]

[[identity]]
name = "dave"
uri_san = "spiffe://cardvault.test/dave"
permissions = ["unseal"]

# Imports card files; two exporters, so that one can approve the other's export.
[[identity]]
name = "migrator"
uri_san = "spiffe://cardvault.test/migrator"
permissions = ["import", "detokenize"]
projects = ["*"]

[[identity]]
name = "exporter-a"
uri_san = "spiffe://cardvault.test/exporter-a"
permissions = ["export"]
projects = ["*"]

[[identity]]
name = "exporter-b"
uri_san = "spiffe://cardvault.test/exporter-b"
permissions = ["export"]
projects = ["*"]

# Takes online backups and nothing else.
[[identity]]
name = "backup"
uri_san = "spiffe://cardvault.test/backup"
permissions = ["backup"]
"#;

/// A client identity: certificate and key files.
#[derive(Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's serial number, to revoke it.
    pub serial: Vec<u8>,
}

/// Which store engine a test's daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sled,
    Postgres,
}

/// Everything a daemon needs on disk, before it runs.
pub struct Setup {
    /// The test's own PostgreSQL (stopped before its folder is removed).
    pub pg: Option<pg::PgCluster>,
    pub dir: TempDir,
    pub ca: Authority,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub keys_dir: PathBuf,
    pub policy: PathBuf,
    /// The test's own SoftHSM2, named to every daemon and CLI run by `SOFTHSM2_CONF`.
    pub softhsm: Option<hsm::SoftHsm>,
}

impl Setup {
    pub fn new(label: &str) -> Setup {
        Setup::with_settings(label, "")
    }

    /// A dev-key vault on `engine`; `None` (the test is skipped) when PostgreSQL is asked for
    /// and not installed, and not required.
    pub fn on(engine: Engine, label: &str) -> Option<Setup> {
        Setup::on_with(engine, label, "")
    }

    /// [`Setup::on`] with `extra` top-level settings.
    pub fn on_with(engine: Engine, label: &str, extra: &str) -> Option<Setup> {
        Setup::on_with_level(engine, label, extra, "debug")
    }

    /// [`Setup::on_with`] at log `level`.
    pub fn on_with_level(engine: Engine, label: &str, extra: &str, level: &str) -> Option<Setup> {
        if engine == Engine::Postgres && !pg::available() {
            return None;
        }
        let setup = Setup::files_on(
            engine,
            label,
            &format!("insecure_dev_key = true\n{extra}"),
            level,
        );
        setup.cli(&["keys", "init", "--insecure-dev-key"]);
        Some(setup)
    }

    /// `extra` is appended to the config's top-level keys (e.g. `cvc_ttl = "1s"`).
    pub fn with_settings(label: &str, extra: &str) -> Setup {
        Setup::with_log_level(label, extra, "debug")
    }

    /// For the leak scans: `trace` shows everything every crate logs.
    pub fn with_log_level(label: &str, extra: &str, level: &str) -> Setup {
        let setup = Setup::files(label, &format!("insecure_dev_key = true\n{extra}"), level);
        setup.cli(&["keys", "init", "--insecure-dev-key"]);
        setup
    }

    /// A vault whose KEK is split among `custodians` (`threshold` of them unseal), each with
    /// the passphrase file of [`Setup::passphrase_file`]. It starts sealed.
    pub fn with_custodians(label: &str, extra: &str, custodians: &[&str], threshold: u8) -> Setup {
        let setup = Setup::files(label, extra, "debug");
        setup.init_custodians(custodians, threshold);
        setup
    }

    /// `keys init` for `custodians`, each with the passphrase file of
    /// [`Setup::passphrase_file`].
    fn init_custodians(&self, custodians: &[&str], threshold: u8) {
        let setup = self;
        let mut args = vec![
            "keys".to_owned(),
            "init".into(),
            "--custodians".into(),
            custodians.join(","),
            "--threshold".into(),
            threshold.to_string(),
        ];
        for name in custodians {
            args.push("--passphrase-file".into());
            args.push(format!(
                "{name}={}",
                setup.passphrase_file(name, 1).display()
            ));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        setup.cli(&args);
    }

    /// [`Setup::with_custodians`] on `engine`; `None` as for [`Setup::on`].
    pub fn custodians_on(
        engine: Engine,
        label: &str,
        extra: &str,
        custodians: &[&str],
        threshold: u8,
    ) -> Option<Setup> {
        if engine == Engine::Postgres && !pg::available() {
            return None;
        }
        let setup = Setup::files_on(engine, label, extra, "debug");
        setup.init_custodians(custodians, threshold);
        Some(setup)
    }

    /// A vault whose KEK is made in a SoftHSM2 token (`[kek] backend = "pkcs11"`), with a
    /// recovery KEK split among `custodians`; `None` (skipped) as for [`Setup::on`], or when
    /// SoftHSM2 is not installed and not required.
    pub fn hsm_on(
        engine: Engine,
        label: &str,
        custodians: &[&str],
        threshold: u8,
    ) -> Option<Setup> {
        if !hsm::available() || (engine == Engine::Postgres && !pg::available()) {
            return None;
        }
        let setup = Setup::hsm_on_token_only(engine, label)?;
        setup.init_custodians(custodians, threshold);
        Some(setup)
    }

    /// [`Setup::hsm_on`] up to `keys init`, not run.
    pub fn hsm_on_token_only(engine: Engine, label: &str) -> Option<Setup> {
        if !hsm::available() || (engine == Engine::Postgres && !pg::available()) {
            return None;
        }
        let mut setup = Setup::files_on(engine, label, "", "debug");
        setup.add_softhsm();
        setup.set_kek(&hsm::kek_section());
        Some(setup)
    }

    /// This setup's SoftHSM2 with an initialized token, and the PIN file the `[kek]` section
    /// of [`hsm::kek_section`] names.
    pub fn add_softhsm(&mut self) -> &hsm::SoftHsm {
        let softhsm = hsm::SoftHsm::new(self.root());
        softhsm.init_token(hsm::TOKEN);
        write_private(&self.root().join("hsm.pin"), &format!("{}\n", hsm::PIN));
        self.softhsm.insert(softhsm)
    }

    /// Replaces the config's `[kek]` section (kept before `[tls]`) with `section`.
    pub fn set_kek(&self, section: &str) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        if let (Some(start), Some(end)) = (text.find("[kek]\n"), text.find("[tls]")) {
            text.replace_range(start..end, "");
        }
        let text = text.replacen("[tls]", &format!("{section}[tls]"), 1);
        write(&self.config, &text);
    }

    /// The passphrase file of `name`'s share of the `generation`-th KEK (written on demand).
    pub fn passphrase_file(&self, name: &str, generation: u32) -> PathBuf {
        let path = self.root().join(format!("pass-{name}-{generation}"));
        if !path.exists() {
            write_private(
                &path,
                &format!("{name} passphrase, generation {generation}\n"),
            );
        }
        path
    }

    /// Runs `cardvault ARGS --config CONFIG` and returns its output; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let (ok, output) = self.try_cli(args);
        assert!(ok, "cardvault {args:?}: {output}");
        output
    }

    /// Runs `cardvault ARGS --config CONFIG`: (success, stdout and stderr).
    pub fn try_cli(&self, args: &[&str]) -> (bool, String) {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null());
        if let Some(softhsm) = &self.softhsm {
            command.env("SOFTHSM2_CONF", &softhsm.conf);
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

    /// `cardvault unseal` with certificate `who`, and `share` opened by `passphrase`.
    pub fn unseal(
        &self,
        daemon: &Daemon,
        who: &Identity,
        share: &Path,
        passphrase: &Path,
    ) -> (bool, String) {
        self.cli_as(
            daemon,
            who,
            &[
                "unseal",
                "--share",
                share.to_str().unwrap(),
                "--passphrase-file",
                passphrase.to_str().unwrap(),
            ],
        )
    }

    /// `cardvault ARGS` sent to `daemon` with `who`'s certificate: (success, output).
    pub fn cli_as(&self, daemon: &Daemon, who: &Identity, args: &[&str]) -> (bool, String) {
        let url = format!("https://{}", daemon.addr);
        let mut all = args.to_vec();
        all.extend([
            "--cert",
            who.cert.to_str().unwrap(),
            "--key",
            who.key.to_str().unwrap(),
            "--url",
            &url,
        ]);
        self.try_cli(&all)
    }

    /// Custodian `name` unseals with their own certificate, share and passphrase.
    pub fn unseal_as(&self, daemon: &Daemon, name: &str, generation: u32) -> (bool, String) {
        self.unseal(
            daemon,
            &self.identity(&spec(name)),
            &self.share(name),
            &self.passphrase_file(name, generation),
        )
    }

    /// The share file of custodian `name`.
    pub fn share(&self, name: &str) -> PathBuf {
        self.keys_dir
            .join("custodians")
            .join(format!("{name}.share"))
    }

    fn files(label: &str, extra: &str, level: &str) -> Setup {
        Setup::files_on(Engine::Sled, label, extra, level)
    }

    fn files_on(engine: Engine, label: &str, extra: &str, level: &str) -> Setup {
        let dir = TempDir::new(label);
        let root = dir.path().to_owned();
        let pg = (engine == Engine::Postgres).then(|| pg::start(&root));
        let store = pg
            .as_ref()
            .map(|pg| pg.store_config(""))
            .unwrap_or_default();
        let data_dir = if pg.is_some() {
            ""
        } else {
            "data_dir = \"data\"\n"
        };
        let ca = Authority::new("cardvault test CA").unwrap();
        write(&root.join("ca.pem"), &ca.cert_pem());
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        write(&root.join("server.pem"), &server.cert_pem);
        write_private(&root.join("server.key"), &server.key_pem);
        let policy = root.join("policy.toml");
        write(&policy, POLICY);
        let config = root.join("cardvault.toml");
        write(
            &config,
            &format!(
                "listen = \"127.0.0.1:0\"\n{data_dir}keys_dir = \"keys\"\npolicies = \"policy.toml\"\nworkers = 2\n{extra}\n\
                 [tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
                 [audit]\npath = \"audit/audit.log\"\n\
                 [log]\nlevel = \"{level}\"\n{store}"
            ),
        );
        Setup {
            pg,
            data_dir: root.join("data"),
            keys_dir: root.join("keys"),
            dir,
            ca,
            config,
            policy,
            softhsm: None,
        }
    }

    /// Every wrapped key in the (stopped) daemon's store: `(project, name, wrapped)`.
    pub fn wrapped_keys(&self) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        match &self.pg {
            Some(pg) => pg::query(
                pg,
                "SELECT project || ' ' || id || ' ' || encode(value, 'hex') FROM wrapped_keys",
            )
            .lines()
            .map(|line| {
                let mut parts = line.split(' ');
                let (project, name, hex) = (
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                );
                (
                    project.as_bytes().to_vec(),
                    name.as_bytes().to_vec(),
                    cardvault::crypto::unhex(hex).unwrap().to_vec(),
                )
            })
            .collect(),
            None => {
                let db = sled::open(&self.data_dir).unwrap();
                db.open_tree("keys")
                    .unwrap()
                    .iter()
                    .map(|item| {
                        let (k, wrapped) = item.unwrap();
                        let mut parts = k.splitn(2, |b| *b == 0);
                        let (project, name) = (parts.next().unwrap(), parts.next().unwrap());
                        (project.to_vec(), name.to_vec(), wrapped.to_vec())
                    })
                    .collect()
            }
        }
    }

    /// The root key as the KEK wraps it, from the (stopped) daemon's store.
    pub fn stored_root_key(&self) -> Vec<u8> {
        self.stored_meta("root_key")
            .expect("no root key in the store")
    }

    /// A store-wide value (`root_key`, `recovery_root`, `kek_id`...) from the (stopped)
    /// daemon's store.
    pub fn stored_meta(&self, name: &str) -> Option<Vec<u8>> {
        match &self.pg {
            Some(pg) => {
                let hex = pg::query(
                    pg,
                    &format!("SELECT encode(value, 'hex') FROM meta WHERE name = '{name}'"),
                );
                (!hex.is_empty()).then(|| cardvault::crypto::unhex(&hex).unwrap().to_vec())
            }
            None => sled::open(&self.data_dir)
                .unwrap()
                .open_tree("meta")
                .unwrap()
                .get(name.as_bytes())
                .unwrap()
                .map(|v| v.to_vec()),
        }
    }

    /// Where the (stopped) daemon's store is, for a leak scan: the folder holding its files
    /// (sled's `data_dir`, or the PostgreSQL cluster's folder with its tables and WAL), and on
    /// PostgreSQL a `pg_dump` of the database (empty on sled).
    pub fn store_at_rest(&self) -> (PathBuf, Vec<u8>) {
        match &self.pg {
            Some(pg) => (self.root().join("pg"), pg.dump().unwrap()),
            None => (self.data_dir.clone(), Vec::new()),
        }
    }

    /// How many card records the (stopped) daemon's store holds.
    pub fn stored_cards(&self) -> usize {
        match &self.pg {
            Some(pg) => pg::query(pg, "SELECT count(*) FROM cards").parse().unwrap(),
            None => {
                let db = sled::Config::new().path(&self.data_dir).open().unwrap();
                db.open_tree("cards").unwrap().len()
            }
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a client certificate from this setup's CA.
    pub fn identity(&self, spec: &ClientSpec) -> Identity {
        issue(&self.ca, spec, self.root())
    }

    /// The router, checkout and ops identities of [`POLICY`].
    pub fn router(&self) -> Identity {
        self.identity(&spec("router"))
    }

    pub fn checkout(&self) -> Identity {
        self.identity(&spec("checkout"))
    }

    pub fn ops(&self) -> Identity {
        let mut s = spec("ops.cardvault.test");
        s.uri_san = None;
        self.identity(&s)
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(self)
    }

    /// The environment every daemon of this setup runs with.
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        self.softhsm
            .iter()
            .map(|h| ("SOFTHSM2_CONF", h.conf.clone()))
            .collect()
    }

    /// A config for node `name` of several over this setup's store: the same store, keys,
    /// policies and certificates, its own `[node] name` and audit log.
    pub fn node_config(&self, name: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replace(
            "[audit]\npath = \"audit/audit.log\"",
            &format!("[audit]\npath = \"audit-{name}/audit.log\""),
        );
        assert!(text.contains(&format!("audit-{name}")), "{text}");
        let path = self.root().join(format!("{name}.toml"));
        // Before `[tls]`: the last table stays `[store.postgres]`, which tests append to.
        let text = text.replacen("[tls]", &format!("[node]\nname = \"{name}\"\n[tls]"), 1);
        write(&path, &text);
        path
    }

    /// Starts node `name` (see [`Setup::node_config`]).
    pub fn start_node(&self, name: &str) -> Daemon {
        Daemon::start_with(&self.node_config(name), &self.env())
            .unwrap_or_else(|out| panic!("node {name} did not start:\n{out}"))
    }

    pub fn client(&self, daemon: &Daemon, who: &Identity) -> Client {
        Client::new(daemon.addr, &self.root().join("ca.pem"), Some(who))
    }
}

/// A client spec with the test policy's URI SAN scheme.
pub fn spec(name: &str) -> ClientSpec {
    let mut s = ClientSpec::named(name);
    s.uri_san = Some(format!("spiffe://cardvault.test/{name}"));
    s
}

pub fn issue(ca: &Authority, spec: &ClientSpec, dir: &Path) -> Identity {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let issued = ca.client(spec).unwrap();
    let cert = dir.join(format!("client-{n}.pem"));
    let key = dir.join(format!("client-{n}.key"));
    write(&cert, &issued.cert_pem);
    write_private(&key, &issued.key_pem);
    Identity {
        cert,
        key,
        serial: issued.serial,
    }
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A running `cardvault serve`, with everything it printed.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(setup: &Setup) -> Daemon {
        Daemon::try_start(setup).unwrap_or_else(|out| panic!("daemon did not start:\n{out}"))
    }

    /// Starts the daemon; `Err` carries its output when it exits or does not listen in time.
    pub fn try_start(setup: &Setup) -> Result<Daemon, String> {
        Daemon::start_with(&setup.config, &setup.env())
    }

    /// Starts `cardvault serve --config CONFIG`, as [`Daemon::try_start`].
    pub fn start_config(config: &Path) -> Result<Daemon, String> {
        Daemon::start_with(config, &[])
    }

    /// [`Daemon::start_config`] with `env` added to its environment.
    pub fn start_with(config: &Path, env: &[(&str, PathBuf)]) -> Result<Daemon, String> {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = Arc::clone(&output);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = listening_addr(&line) {
                        let _ = tx.send(addr);
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(addr) => {
                    return Ok(Daemon {
                        child,
                        addr,
                        output,
                    })
                }
                Err(_) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(output.lock().unwrap().join("\n"));
                }
                Err(_) => {
                    if let Ok(Some(_)) = child.try_wait() {
                        // Let the reader threads drain the pipes.
                        std::thread::sleep(Duration::from_millis(200));
                        return Err(output.lock().unwrap().join("\n"));
                    }
                }
            }
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no flush, no cleanup.
    pub fn kill9(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.output()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "daemon exited with {status}");
                std::thread::sleep(Duration::from_millis(100));
                return self.output();
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on https://").nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    addr.parse().ok()
}

/// A blocking HTTPS client: one TLS connection per request.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    pub project: Option<String>,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

impl Client {
    pub fn new(addr: SocketAddr, ca: &Path, identity: Option<&Identity>) -> Client {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some(id) => {
                let chain = CertificateDer::pem_file_iter(&id.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        Client {
            addr,
            config: Arc::new(config),
            project: None,
        }
    }

    pub fn in_project(&self, project: &str) -> Client {
        Client {
            project: Some(project.to_owned()),
            ..self.clone()
        }
    }

    pub fn get(&self, path: &str) -> Response {
        self.send("GET", path, &[], None).unwrap()
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> Response {
        self.send("POST", path, &[], Some(body.to_string().as_bytes()))
            .unwrap()
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Response {
        self.send("POST", path, &[], Some(body)).unwrap()
    }

    /// Sends one request; an `Err` means TLS or the connection failed (no HTTP response).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        self.connect()?.send(method, path, headers, body)
    }

    /// A keep-alive connection for many requests.
    pub fn session(&self) -> Session {
        let conn = self.connect().unwrap();
        Session {
            tls: conn.tls,
            project: conn.project,
        }
    }

    /// Opens a connection and completes the TLS handshake, so that a later `send` on it
    /// costs only the request (used to line up racing requests).
    pub fn connect(&self) -> std::io::Result<Connection> {
        let tcp = TcpStream::connect(self.addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let conn = rustls::ClientConnection::new(
            Arc::clone(&self.config),
            ServerName::try_from("localhost").unwrap(),
        )
        .map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Connection {
            tls,
            project: self.project.clone(),
        })
    }
}

/// One TLS connection, used for one request.
pub struct Connection {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    project: Option<String>,
}

impl Connection {
    pub fn send(
        mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        self.write(method, path, headers, body, false)?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        parse_response(&raw).ok_or_else(|| std::io::Error::other("no HTTP response"))
    }

    /// Sends a request and drops the connection `after` it, without reading the reply or
    /// closing TLS: a client that timed out and went away.
    pub fn send_and_abandon(
        mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        after: Duration,
    ) -> std::io::Result<()> {
        self.write(method, path, headers, body, true)?;
        std::thread::sleep(after);
        self.tls.sock.shutdown(std::net::Shutdown::Both)
    }

    fn write(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        keep_alive: bool,
    ) -> std::io::Result<()> {
        let bytes = request(
            method,
            path,
            self.project.as_deref(),
            headers,
            body,
            keep_alive,
        );
        self.tls.write_all(&bytes)?;
        self.tls.flush()
    }
}

/// An HTTP/1.1 request; `keep_alive: false` asks the server to close the connection after it.
fn request(
    method: &str,
    path: &str,
    project: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !keep_alive {
        req.push_str("Connection: close\r\n");
    }
    if let Some(p) = project {
        req.push_str(&format!("Vault-Project: {p}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or(&[]));
    bytes
}

/// One keep-alive TLS connection for many requests in a row (for tests that send thousands).
pub struct Session {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    project: Option<String>,
}

impl Session {
    pub fn get(&mut self, path: &str) -> Response {
        self.send("GET", path, None).unwrap()
    }

    pub fn post(&mut self, path: &str, body: &serde_json::Value) -> Response {
        self.send("POST", path, Some(body.to_string().as_bytes()))
            .unwrap()
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        let bytes = request(method, path, self.project.as_deref(), &[], body, true);
        self.tls.write_all(&bytes)?;
        self.tls.flush()?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if raw.len() >= end + 4 + length {
                    raw.truncate(end + 4 + length);
                    break;
                }
            }
            match self.tls.read(&mut buf)? {
                0 => return Err(std::io::Error::other("connection closed mid-response")),
                n => raw.extend_from_slice(&buf[..n]),
            }
        }
        parse_response(&raw).ok_or_else(|| std::io::Error::other("no HTTP response"))
    }
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(Response {
        status,
        body: body.to_owned(),
    })
}

/// Any method with an optional JSON body (PATCH and DELETE have no `Client` helper).
pub fn send(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Response {
    let bytes = body.map(serde_json::Value::to_string);
    client
        .send(method, path, &[], bytes.as_deref().map(str::as_bytes))
        .unwrap()
}

/// Every file below `dir`, recursively.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Files below `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_below(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p)
                .map(|bytes| contains(&bytes, needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Whether `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

/// Files below `dir` that contain any of `needles` (ASCII digit strings), read once each: for
/// large folders (a PostgreSQL cluster) where a pass per needle would be slow.
pub fn files_containing_digits(dir: &Path, needles: &[String]) -> Vec<PathBuf> {
    let set: std::collections::HashSet<&[u8]> = needles.iter().map(|n| n.as_bytes()).collect();
    let lengths: std::collections::BTreeSet<usize> = needles.iter().map(String::len).collect();
    let shortest = lengths.iter().next().copied().unwrap_or(1);
    files_below(dir)
        .into_iter()
        .filter(|p| {
            let Ok(bytes) = std::fs::read(p) else {
                return false;
            };
            let mut run = 0;
            for (i, b) in bytes.iter().enumerate() {
                run = if b.is_ascii_digit() { run + 1 } else { 0 };
                // A needle ends here if the digit run is long enough.
                if run >= shortest {
                    for len in &lengths {
                        if run >= *len && set.contains(&bytes[i + 1 - len..=i]) {
                            return true;
                        }
                    }
                }
            }
            false
        })
        .collect()
}

/// A Luhn-valid 16-digit Visa-range test number, distinct for each `n`, with digits that look
/// random (no long runs of zeros a log scan could match by accident).
pub fn test_pan(n: u32) -> String {
    let body = (u64::from(n) + 1) * 9_876_543_210_987 % 100_000_000_000_000;
    cardvault::card::luhn_complete(&format!("4{body:014}"), 16)
}

pub fn future_year() -> i32 {
    time::OffsetDateTime::now_utc().year() + 3
}

pub fn card_body(pan: &str) -> serde_json::Value {
    serde_json::json!({
        "number": pan,
        "exp_month": 12,
        "exp_year": future_year(),
        "cvc": "737",
        "holder_name": "Grace Hopper",
    })
}

/// A TCP relay from a loopback port to `upstream` that can be cut: a network partition
/// between one daemon and its database. While cut, bytes go nowhere and new connections wait
/// (a black hole: nothing is refused or reset, so only timeouts tell); once mended, what was
/// held goes through.
pub struct Relay {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    pub fn new(upstream: SocketAddr) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accept_cut = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let cut = accept_cut.clone();
                std::thread::spawn(move || {
                    hold_while(&cut);
                    let Ok(server) = TcpStream::connect(upstream) else {
                        return;
                    };
                    let pairs = [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ];
                    for (from, to) in pairs {
                        let cut = cut.clone();
                        std::thread::spawn(move || pump(from, to, &cut));
                    }
                });
            }
        });
        Relay { port, cut }
    }

    /// Cuts the link: nothing goes through until [`Relay::mend`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn hold_while(cut: &std::sync::atomic::AtomicBool) {
    while cut.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: &std::sync::atomic::AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        hold_while(cut);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// What the daemon logs after a `SIGHUP` reload that took.
pub const RELOADED: &str = "reloaded certificates, CRLs, policies and receivers";

/// Sends the daemon `SIGHUP`.
pub fn hangup(daemon: &Daemon) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Waits until the daemon has logged `needle` `count` times.
pub fn wait_for_log(daemon: &Daemon, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.output().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in:\n{}",
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
