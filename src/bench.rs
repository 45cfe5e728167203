//! `cardvault bench`: drives a vault over real mTLS and prints throughput and latency.
//!
//! With no `--target` it starts its own throwaway vault (this same binary, `serve`, on a dev
//! PKI in a temporary folder, logging at `warn`), so the figures include everything a caller
//! pays: TLS, HTTP, policy, crypto, the store, and the flush before every acknowledged write.
//! The load generator is a small HTTP/1.1 keep-alive client over rustls, one connection per
//! concurrent worker (the `handshake` scenario opens a new connection per request instead).
//!
//! Scenarios that consume state (`detokenize-card`, `customer-token`, `mixed`) first prepare a
//! pool of card tokens; that preparation is not part of the figures.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub const SCENARIOS: &[&str] = &[
    "health",
    "tokenize",
    "detokenize-card",
    "detokenize-customer",
    "customer-token",
    "mixed",
    "handshake",
    "forward",
    "direct",
];

/// Scenarios that need the stand-in PSP: `forward` sends each payment through
/// `POST /v1/forward`; `direct` is what a router does without it (detokenize, then call the
/// PSP itself over a kept-alive connection).
const PSP_SCENARIOS: &[&str] = &["forward", "direct"];

/// The receiver the bench's vault forwards to, and the path it takes.
const PSP_RECEIVER: &str = "bench-psp";
const PSP_PATH: &str = "/v1/payments";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub duration: Duration,
    pub concurrency: usize,
    pub scenarios: Vec<String>,
    pub json: bool,
    /// Start the vault on a throwaway PostgreSQL instead of sled.
    pub postgres: bool,
    /// How many nodes to start over that PostgreSQL.
    pub nodes: usize,
    /// An already running vault: base URL, and the client identity and CA to reach it with.
    pub target: Option<Target>,
    /// Card tokens written into the bench's own vault before it starts (outside the measured
    /// time; the records tokenization writes, without requests or audit lines).
    pub fill: u64,
    /// Store sizes to measure at, in order: the store is filled to each (the daemon stopped),
    /// the daemon started (its startup timed), then every scenario run.
    pub growth: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct Target {
    /// One base URL per node; connections are spread over them in turn.
    pub urls: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: {0}")]
    Setup(String),
    #[error("bench: {0}")]
    Io(#[from] io::Error),
}

/// A count written `10000`, `250k` or `10M`.
pub fn parse_count(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 1_000),
        (i, 'm' | 'M') => (&text[..i], 1_000_000),
        _ => (text, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Server CPU (user + system) per 1,000 requests; only when the bench started the server.
    pub server_cpu_seconds_per_1k: Option<f64>,
    /// Server resident memory after the run; only when the bench started the server.
    pub server_rss_mib: Option<f64>,
    /// This process's CPU per 1,000 requests: the load generator, and the stand-in PSP when
    /// the scenario uses it (the router's side of `direct`).
    pub client_cpu_seconds_per_1k: Option<f64>,
}

pub fn run(options: &BenchOptions) -> Result<Vec<Figures>, BenchError> {
    for s in &options.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            return Err(setup(format!(
                "unknown scenario {s:?}; known: {}",
                SCENARIOS.join(", ")
            )));
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()?;
    let psp = options
        .scenarios
        .iter()
        .any(|s| PSP_SCENARIOS.contains(&s.as_str()));
    let (server, mut client) = match &options.target {
        Some(_) if psp => return Err(setup(
            "forward and direct start their own vault and stand-in PSP; they cannot drive --target",
        )),
        Some(target) => (None, Client::new(target)?),
        None => {
            let mut server = LocalServer::prepare(options.postgres, options.nodes)?;
            server.fill(options.fill)?;
            if psp {
                server.add_psp()?;
            }
            server.spawn()?;
            let client = Client::new(&server.target)?;
            (Some(server), client)
        }
    };
    if let Some(psp) = server.as_ref().and_then(|s| s.psp.as_ref()) {
        client.psp = Some(Arc::new(PspClient::new(psp.0.port(), &psp.1)?));
    }
    runtime.block_on(client.wait_ready())?;
    let mut all = Vec::new();
    for scenario in &options.scenarios {
        let figures =
            runtime.block_on(run_scenario(&client, scenario, options, server.as_ref()))?;
        if !options.json {
            eprintln!(
                "  {} done: {:.0} req/s",
                figures.scenario, figures.requests_per_second
            );
        }
        all.push(figures);
    }
    Ok(all)
}

/// `--import-rows N`: one import of an N-row card file, encrypted to the vault's import key
/// (RSA-4096), into the bench's own vault.
#[derive(Debug, Clone, Serialize)]
pub struct ImportFigures {
    pub rows: u64,
    pub created: u64,
    pub file_mib: f64,
    /// From the first byte sent to the last results line: upload, the integrity pass and the
    /// import pass.
    pub seconds: f64,
    pub rows_per_second: f64,
    /// The same file imported again: nothing is written, every row is a duplicate.
    pub rerun_rows_per_second: f64,
    /// The daemon's resident memory before the import, and its peak (`VmHWM`) after it.
    pub server_rss_before_mib: Option<f64>,
    pub server_peak_rss_mib: Option<f64>,
}

/// Card rows made as they are read: the plaintext is never whole in memory.
struct GeneratedCards {
    next: u64,
    total: u64,
    line: Vec<u8>,
    pos: usize,
}

impl io::Read for GeneratedCards {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.line.len() {
            self.line.clear();
            self.pos = 0;
            if self.next == 0 {
                self.line
                    .extend_from_slice(b"number,exp_month,exp_year,customer_ref,email\n");
            } else if self.next > self.total {
                return Ok(0);
            } else {
                let n = self.next;
                let body = (n * 7_919_777_113) % 100_000_000_000_000;
                let pan = crate::card::luhn_complete(&format!("4{body:014}"), 16);
                let line = format!("{pan},{},2031,cus-{n},c{n}@example.com\n", n % 12 + 1);
                self.line.extend_from_slice(line.as_bytes());
            }
            self.next += 1;
        }
        let n = crate::portability::rows::copy_out(self.line.get(self.pos..), out);
        self.pos += n;
        Ok(n)
    }
}

/// Counts the results lines of an import as they arrive.
#[derive(Default)]
struct ImportResults {
    pending: Vec<u8>,
    created: u64,
    trailer: Option<String>,
}

impl io::Write for ImportResults {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if line.starts_with(b"# ") {
                self.trailer = Some(String::from_utf8_lossy(&line).trim().to_owned());
            } else if line.ends_with(b",created\r\n") {
                self.created += 1;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `--import-rows`: makes the file (outside the measured time), then imports it once.
pub fn import_run(postgres: bool, rows: u64) -> Result<ImportFigures, BenchError> {
    let mut server = LocalServer::prepare(postgres, 1)?;
    server.spawn()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(Client::new(&server.target)?.wait_ready())?;
    let url = server
        .target
        .urls
        .first()
        .cloned()
        .ok_or_else(|| setup("no node"))?;
    let pki = server.dir.join("pki");
    let admin = crate::client::AdminClient::new(
        &url,
        &pki.join("ca.pem"),
        &pki.join("ops.pem"),
        &pki.join("ops.key"),
    )
    .map_err(setup)?;
    let reply = admin
        .send(
            "POST",
            "/v1/admin/import-keys",
            Some(br#"{"algorithm":"rsa4096"}"#),
        )
        .map_err(setup)?;
    let armored = reply
        .body
        .pointer("/key/public_key")
        .and_then(|k| k.as_str())
        .ok_or_else(|| setup(format!("no import key: {}", reply.body)))?;
    let recipient = crate::portability::openpgp::public_key(armored.as_bytes()).map_err(setup)?;
    let path = server.dir.join("cards.csv.pgp");
    eprintln!("  writing {rows} encrypted rows...");
    let file = std::fs::File::create(&path)?;
    crate::portability::openpgp::encrypt_to(
        &recipient,
        GeneratedCards {
            next: 0,
            total: rows,
            line: Vec::new(),
            pos: 0,
        },
        io::BufWriter::new(file),
    )
    .map_err(setup)?;
    let size = std::fs::metadata(&path)?.len();
    let pid = server.children.first().map(Child::id);
    let before = pid.and_then(rss_mib);
    let import = || -> Result<(f64, ImportResults), BenchError> {
        let mut results = ImportResults::default();
        let started = Instant::now();
        let reply = admin
            .stream(
                "POST",
                "/v1/import",
                &[("content-type", "application/octet-stream")],
                &mut io::BufReader::with_capacity(256 * 1024, std::fs::File::open(&path)?),
                size,
                &mut results,
            )
            .map_err(setup)?;
        let seconds = started.elapsed().as_secs_f64();
        if let Some(reply) = reply {
            return Err(setup(format!(
                "import refused: {} {}",
                reply.status, reply.body
            )));
        }
        match &results.trailer {
            Some(t) if t.starts_with("# complete") => Ok((seconds, results)),
            other => Err(setup(format!("import did not complete: {other:?}"))),
        }
    };
    eprintln!("  importing...");
    let (seconds, results) = import()?;
    let peak = pid.and_then(peak_rss_mib);
    eprintln!("  importing again (every row a duplicate)...");
    let (again, _) = import()?;
    Ok(ImportFigures {
        rows,
        created: results.created,
        file_mib: size as f64 / (1024.0 * 1024.0),
        seconds,
        rows_per_second: rows as f64 / seconds.max(1e-9),
        rerun_rows_per_second: rows as f64 / again.max(1e-9),
        server_rss_before_mib: before,
        server_peak_rss_mib: peak,
    })
}

/// One store size of a growth run.
#[derive(Debug, Clone, Serialize)]
pub struct GrowthStep {
    /// Card tokens in the store when the step's daemon started (filled plus those the earlier
    /// steps' requests made).
    pub tokens: u64,
    /// From the daemon's spawn to its first 200 on `/v1/health`.
    pub startup_seconds: f64,
    pub figures: Vec<Figures>,
    /// The daemon's resident memory after the step's scenarios.
    pub rss_mib: Option<f64>,
    /// The store after the step's scenarios (the sled folder, or the PostgreSQL database),
    /// per card token in it then.
    pub store_bytes_per_token: Option<f64>,
    /// Audit log growth during the step per line written (fills write no audit lines).
    pub audit_bytes_per_line: Option<f64>,
    /// Bytes per line of the compressed audit parts so far (what the audit costs at steady
    /// state, once lines are rotated out of the live log).
    pub audit_part_bytes_per_line: Option<f64>,
}

/// `--growth`: for each size, stop the daemon, fill the store up to it, start the daemon (its
/// startup timed) and run every scenario.
pub fn growth(options: &BenchOptions) -> Result<Vec<GrowthStep>, BenchError> {
    if options.target.is_some() {
        return Err(setup(
            "--growth starts its own vault; it cannot drive --target",
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()?;
    let mut server = LocalServer::prepare(options.postgres, options.nodes)?;
    let mut client = Client::new(&server.target)?;
    if options
        .scenarios
        .iter()
        .any(|s| PSP_SCENARIOS.contains(&s.as_str()))
    {
        server.add_psp()?;
        if let Some((psp, ca)) = &server.psp {
            client.psp = Some(Arc::new(PspClient::new(psp.port(), ca)?));
        }
    }
    // Card tokens made by the requests of earlier steps.
    let mut made = 0u64;
    let mut steps = Vec::new();
    for &size in &options.growth {
        server.stop();
        let tokens = server.filled + made;
        server.fill(size.saturating_sub(tokens))?;
        let tokens = server.filled + made;
        let (_, audit_before) = server.disk();
        let lines_before = server.audit_lines();
        let started = Instant::now();
        server.spawn()?;
        runtime.block_on(client.wait_ready())?;
        let startup_seconds = started.elapsed().as_secs_f64();
        let mut figures = Vec::new();
        for scenario in &options.scenarios {
            let f = runtime.block_on(run_scenario(&client, scenario, options, Some(&server)))?;
            if matches!(
                scenario.as_str(),
                "tokenize" | "detokenize-card" | "mixed" | "customer-token"
            ) {
                // Each of these makes card tokens: the prepared pools, or the measured calls.
                made += (f.requests - f.errors) as u64;
            }
            figures.push(f);
        }
        let rss_mib = server.rss_mib();
        let (store_bytes, audit_after) = server.disk();
        let lines = server.audit_lines().saturating_sub(lines_before);
        let tokens_after = server.filled + made;
        let step = GrowthStep {
            tokens,
            startup_seconds,
            rss_mib,
            store_bytes_per_token: (tokens_after > 0 && store_bytes > 0)
                .then(|| store_bytes as f64 / tokens_after as f64),
            audit_bytes_per_line: (lines > 0)
                .then(|| audit_after.saturating_sub(audit_before) as f64 / lines as f64),
            audit_part_bytes_per_line: server.audit_parts(),
            figures,
        };
        if !options.json {
            eprintln!("  {} tokens done", step.tokens);
        }
        steps.push(step);
    }
    Ok(steps)
}

/// A growth run as a table: one row per store size, each scenario's throughput and p99.
pub fn growth_table(steps: &[GrowthStep]) -> String {
    let scenarios: Vec<&str> = steps
        .first()
        .map(|s| s.figures.iter().map(|f| f.scenario.as_str()).collect())
        .unwrap_or_default();
    let mut out = format!("{:>12} {:>9}", "tokens", "start s");
    for s in &scenarios {
        out.push_str(&format!(" {:>22} {:>8}", format!("{s} req/s"), "p99 ms"));
    }
    out.push_str(&format!(
        " {:>8} {:>11} {:>13} {:>13}\n",
        "rss MiB", "store B/tok", "audit B/line", "parts B/line"
    ));
    for step in steps {
        out.push_str(&format!(
            "{:>12} {:>9.2}",
            step.tokens, step.startup_seconds
        ));
        for f in &step.figures {
            out.push_str(&format!(
                " {:>22.0} {:>8.2}",
                f.requests_per_second, f.p99_ms
            ));
        }
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
        out.push_str(&format!(
            " {:>8} {:>11} {:>13} {:>13}\n",
            opt(step.rss_mib),
            opt(step.store_bytes_per_token),
            opt(step.audit_bytes_per_line),
            opt(step.audit_part_bytes_per_line)
        ));
    }
    out
}

/// The figures as a table, with each scenario's throughput relative to `health`.
pub fn table(figures: &[Figures]) -> String {
    let health = figures
        .iter()
        .find(|f| f.scenario == "health")
        .map(|f| f.requests_per_second);
    let mut out = format!(
        "{:<20} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9} {:>8}\n",
        "scenario",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "cpu-s/1k",
        "bench cpu",
        "x health",
        "rss MiB"
    );
    for f in figures {
        let cpu = f
            .server_cpu_seconds_per_1k
            .map_or("-".to_owned(), |c| format!("{c:.3}"));
        // How many times the cost of the bare mTLS + HTTP stack a request of this kind takes.
        let ratio = health.map_or("-".to_owned(), |h| {
            format!("{:.2}", h / f.requests_per_second.max(1e-9))
        });
        let rss = f
            .server_rss_mib
            .map_or("-".to_owned(), |r| format!("{r:.0}"));
        out.push_str(&format!(
            "{:<20} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>9} {:>9} {:>9} {:>8}\n",
            f.scenario,
            f.requests_per_second,
            f.p50_ms,
            f.p90_ms,
            f.p99_ms,
            f.max_ms,
            f.errors,
            cpu,
            f.client_cpu_seconds_per_1k
                .map_or("-".to_owned(), |c| format!("{c:.3}")),
            ratio,
            rss
        ));
    }
    out
}

/// A throwaway vault in a temporary folder, stopped and removed on drop: one daemon, or
/// several nodes over one throwaway PostgreSQL.
struct LocalServer {
    children: Vec<Child>,
    /// One config per node.
    configs: Vec<PathBuf>,
    /// Stopped after the daemons, before the folder is removed.
    postgres: Option<crate::throwaway::Cluster>,
    dir: PathBuf,
    target: Target,
    /// Card tokens written by [`LocalServer::fill`] so far.
    filled: u64,
    /// The stand-in PSP and its CA certificate file, once [`LocalServer::add_psp`] ran.
    psp: Option<(crate::stub_psp::StubPsp, PathBuf)>,
}

impl LocalServer {
    fn prepare(postgres: bool, nodes: usize) -> Result<LocalServer, BenchError> {
        let dir = std::env::temp_dir().join(format!("cardvault-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Pick free ports; the short race with other processes is acceptable for a bench.
        let ports = (0..nodes.max(1))
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
            })
            .collect::<Result<Vec<u16>, _>>()?;
        let first = *ports.first().ok_or_else(|| setup("no node to start"))?;
        let config = crate::dev::prepare(&dir, &format!("127.0.0.1:{first}")).map_err(setup)?;
        // Every tokenization carries a CVC, none is used by a tokenize-only run: kept 30 s,
        // they stay well under `cvc_max` however long the run.
        let mut text = format!("cvc_ttl = \"30s\"\n{}", std::fs::read_to_string(&config)?);
        text.push_str("\n[log]\nlevel = \"warn\"\n");
        // Nodes on one machine share it: each gets its share of the HTTP workers and of the
        // database connections for requests (a request thread's pool is `pool_size` over the
        // cores), so the cluster runs about as many of each as one node would.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let nodes = ports.len();
        let workers = (cores / nodes).max(1);
        let pool_size = (32 * cores / (nodes * workers)).max(4);
        if nodes > 1 {
            text = format!("workers = {workers}\n{text}");
        }
        let postgres = if postgres {
            let cluster = crate::throwaway::Cluster::start(&dir).map_err(setup)?;
            text.push_str(&cluster.store_config(&format!("pool_size = {pool_size}")));
            Some(cluster)
        } else {
            None
        };
        let mut configs = Vec::new();
        let mut urls = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            // Node i: its own port, name and audit log; the rest shared.
            let node = text
                .replace(&format!("127.0.0.1:{first}"), &format!("127.0.0.1:{port}"))
                .replace("audit.log", &format!("audit-{i}.log"));
            let path = dir.join(format!("node-{i}.toml"));
            std::fs::write(&path, format!("{node}\n[node]\nname = \"bench-{i}\"\n"))?;
            configs.push(path);
            urls.push(format!("https://127.0.0.1:{port}"));
        }
        let pki = dir.join("pki");
        Ok(LocalServer {
            children: Vec::new(),
            configs,
            postgres,
            target: Target {
                urls,
                cert: pki.join("router.pem"),
                key: pki.join("router.key"),
                ca: pki.join("ca.pem"),
            },
            dir,
            filled: 0,
            psp: None,
        })
    }

    /// Starts the stand-in PSP (one thread: it shares the machine) and registers it as the
    /// receiver `bench-psp` of every node, before they start.
    fn add_psp(&mut self) -> Result<(), BenchError> {
        let ca = crate::pki::Authority::new("cardvault bench PSP CA").map_err(setup)?;
        let cert = ca.server(&["localhost"]).map_err(setup)?;
        let psp = crate::stub_psp::StubPsp::start(&cert.cert_pem, &cert.key_pem, 1)?;
        let ca_path = self.dir.join("psp-ca.pem");
        std::fs::write(&ca_path, ca.cert_pem())?;
        std::fs::write(
            self.dir.join("receivers.toml"),
            format!(
                "[[receiver]]\nname = \"{PSP_RECEIVER}\"\nurl = \"https://localhost:{}\"\n\
                 paths = [\"{PSP_PATH}\"]\nmethods = [\"POST\"]\nprojects = [\"*\"]\n\
                 ca = \"psp-ca.pem\"\nallow_private_network = true\n",
                psp.port()
            ),
        )?;
        for config in &self.configs {
            let text = std::fs::read_to_string(config)?;
            std::fs::write(config, format!("receivers = \"receivers.toml\"\n{text}"))?;
        }
        self.psp = Some((psp, ca_path));
        Ok(())
    }

    /// Starts the daemons.
    fn spawn(&mut self) -> Result<(), BenchError> {
        for path in &self.configs {
            self.children.push(
                Command::new(std::env::current_exe()?)
                    .args(["serve", "--config"])
                    .arg(path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()?,
            );
        }
        Ok(())
    }

    /// Stops the daemons (SIGTERM, as an operator would) and waits for them.
    fn stop(&mut self) {
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for mut child in self.children.drain(..) {
            let _ = child.wait();
        }
    }

    /// Writes `count` more card tokens into the store while the daemons are stopped.
    fn fill(&mut self, count: u64) -> Result<(), BenchError> {
        if count == 0 {
            return Ok(());
        }
        let first = self
            .configs
            .first()
            .ok_or_else(|| setup("no node to fill"))?;
        let config = crate::config::Config::load(first).map_err(setup)?;
        if let Some(data_dir) = config.data_dir() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)?;
        }
        let store = crate::store::Store::open(&config.store).map_err(setup)?;
        let kek = crate::crypto::DevKey::load(&config.keys_dir.join(crate::crypto::DEV_KEY_FILE))
            .map_err(setup)?;
        let settings = crate::vault::VaultSettings::from(&config);
        let vault = crate::vault::Vault::open(
            store,
            crate::vault::KeySource::Dev(Box::new(kek)),
            settings,
            Box::new(crate::audit::LogSink),
        )
        .map_err(setup)?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
        let started = Instant::now();
        vault
            .bench_fill(
                &crate::tokens::Project::default_project(),
                self.filled,
                count,
                threads,
            )
            .map_err(setup)?;
        vault.close().map_err(setup)?;
        self.filled += count;
        eprintln!(
            "  filled {count} card tokens in {:.1} s ({:.0}/s)",
            started.elapsed().as_secs_f64(),
            count as f64 / started.elapsed().as_secs_f64().max(1e-3)
        );
        Ok(())
    }

    /// The audit logs and their rotated parts (compressed or not), as `(path, lines)`.
    fn audit_files(&self) -> Vec<(PathBuf, u64)> {
        std::fs::read_dir(self.dir.join("audit"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|path| {
                let name = path.to_string_lossy();
                !name.ends_with(".head") && !name.ends_with(".lock") && !name.ends_with(".partial")
            })
            .filter_map(|path| {
                let text = crate::audit::file::read_log(&path).ok()?;
                let lines = text.bytes().filter(|b| *b == b'\n').count() as u64;
                Some((path, lines))
            })
            .collect()
    }

    /// Lines in the audit logs and their rotated parts.
    fn audit_lines(&self) -> u64 {
        self.audit_files().iter().map(|(_, lines)| lines).sum()
    }

    /// Bytes per line of the compressed parts, if there are any yet.
    fn audit_parts(&self) -> Option<f64> {
        let (bytes, lines) = self
            .audit_files()
            .iter()
            .filter(|(path, _)| path.to_string_lossy().ends_with(".gz"))
            .fold((0u64, 0u64), |(b, l), (path, lines)| {
                let size = std::fs::metadata(path).map_or(0, |m| m.len());
                (b + size, l + lines)
            });
        (lines > 0).then(|| bytes as f64 / lines as f64)
    }

    /// Bytes of the store (the sled folder, or PostgreSQL's `cardvault` database: tables,
    /// indexes and TOAST, without the WAL), and under the audit folder.
    fn disk(&self) -> (u64, u64) {
        let store = match &self.postgres {
            None => dir_bytes(&self.dir.join("data")),
            Some(cluster) => cluster
                .psql("cardvault", "SELECT pg_database_size('cardvault')")
                .ok()
                .and_then(|out| String::from_utf8(out.stdout).ok())
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0),
        };
        (store, dir_bytes(&self.dir.join("audit")))
    }

    /// User + system CPU seconds the server process has used so far (Linux `/proc`).
    fn cpu_seconds(&self) -> Option<f64> {
        self.children
            .iter()
            .map(|c| cpu_seconds(c.id()))
            .sum::<Option<f64>>()
    }

    /// Resident set size of the server processes together, MiB.
    fn rss_mib(&self) -> Option<f64> {
        self.children
            .iter()
            .map(|c| rss_mib(c.id()))
            .sum::<Option<f64>>()
    }
}

/// User + system CPU seconds process `pid` has used so far (Linux `/proc`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on.
    Some((utime + stime) / 100.0)
}

/// Resident set size of process `pid`, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// Peak resident memory of process `pid` (`VmHWM`), MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// A memory field of `/proc/PID/status` (in kB there), MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Bytes of the files under `dir`, recursively.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop();
        drop(self.postgres.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone)]
struct Client {
    /// Each node: its address and TLS server name.
    nodes: Vec<(SocketAddr, ServerName<'static>)>,
    /// The first node's host, for the `host` header (the nodes share a certificate).
    host: String,
    connector: TlsConnector,
    /// Connections go to the nodes in turn.
    next: Arc<std::sync::atomic::AtomicUsize>,
    /// The stand-in PSP, for `direct`.
    psp: Option<Arc<PspClient>>,
}

/// The router's own connection to the stand-in PSP (`direct`): TLS to its CA, no client
/// certificate, kept alive.
struct PspClient {
    addr: SocketAddr,
    connector: TlsConnector,
    port: u16,
}

impl PspClient {
    fn new(port: u16, ca: &std::path::Path) -> Result<PspClient, BenchError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::tls::load_certs(ca).map_err(setup)? {
            roots.add(cert).map_err(setup)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(setup)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(PspClient {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            connector: TlsConnector::from(Arc::new(config)),
            port,
        })
    }

    async fn connect(&self) -> io::Result<Conn> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
        Ok(Conn {
            stream: self.connector.connect(name, tcp).await?,
            buf: Vec::with_capacity(4096),
        })
    }

    /// The payment a router would send the PSP itself, with the card it detokenized.
    fn payment(&self, detokenized: &[u8]) -> Option<Vec<u8>> {
        let card: serde_json::Value = serde_json::from_slice(detokenized).ok()?;
        let body = serde_json::json!({"amount": 1000, "currency": "EUR", "card": {
            "number": card.get("number")?, "exp_month": card.get("exp_month")?,
            "exp_year": card.get("exp_year")?.to_string(), "name": card.get("holder_name")?}})
        .to_string();
        Some(
            format!(
                "POST {PSP_PATH} HTTP/1.1\r\nhost: localhost:{}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                self.port,
                body.len()
            )
            .into_bytes(),
        )
    }
}

impl Client {
    fn new(target: &Target) -> Result<Client, BenchError> {
        let mut nodes = Vec::new();
        let mut first_host = None;
        for url in &target.urls {
            let (authority, host) = crate::client::authority(url).map_err(setup)?;
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&authority)
                .map_err(setup)?
                .next()
                .ok_or_else(|| setup(format!("--target {url} does not resolve")))?;
            nodes.push((addr, ServerName::try_from(host.clone()).map_err(setup)?));
            first_host.get_or_insert(host);
        }
        let host = first_host.ok_or_else(|| setup("no --target"))?;
        let config =
            crate::client::tls_config(&target.ca, &target.cert, &target.key).map_err(setup)?;
        Ok(Client {
            nodes,
            host,
            connector: TlsConnector::from(Arc::new(config)),
            next: Arc::default(),
            psp: None,
        })
    }

    async fn connect(&self) -> io::Result<Conn> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (addr, name) = self
            .nodes
            .get(n % self.nodes.len().max(1))
            .ok_or_else(|| io::Error::other("no node to connect to"))?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream = self.connector.connect(name.clone(), tcp).await?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Waits until every node answers health with 200.
    async fn wait_ready(&self) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let request = self.request("GET", "/v1/health", None);
        let mut ready = 0;
        loop {
            if let Ok(mut conn) = self.connect().await {
                if let Ok((200, _)) = conn.send(&request).await {
                    ready += 1;
                    if ready >= self.nodes.len() {
                        return Ok(());
                    }
                    continue;
                }
            }
            if Instant::now() > deadline {
                return Err(setup("the vault did not answer /v1/health within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
        let body = body.unwrap_or("");
        format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        )
        .into_bytes()
    }
}

struct Conn {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    /// Sends one request and reads one response (keep-alive, `content-length` bodies).
    async fn send(&mut self, request: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        self.stream.flush().await?;
        loop {
            if let Some((status, header_len, body_len)) = parse_head(&self.buf)? {
                if self.buf.len() >= header_len + body_len {
                    let body = self
                        .buf
                        .get(header_len..header_len + body_len)
                        .unwrap_or(&[])
                        .to_vec();
                    self.buf.drain(..header_len + body_len);
                    return Ok((status, body));
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    }
}

/// `(status, header length, content length)` once the head is complete.
fn parse_head(buf: &[u8]) -> io::Result<Option<(u16, usize, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(buf.get(..end).unwrap_or(&[]))
        .map_err(|_| io::Error::other("bad head"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Some((status, end + 4, length)))
}

fn json_field(body: &[u8], field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}

fn card_json(n: usize) -> String {
    let pan = crate::card::luhn_complete(&format!("4{:014}", n % 100_000_000_000_000), 16);
    let year = time::OffsetDateTime::now_utc().year() + 3;
    format!(
        r#"{{"number":"{pan}","exp_month":12,"exp_year":{year},"cvc":"123","holder_name":"Bench Card"}}"#
    )
}

/// What one worker does per request.
#[derive(Clone)]
enum Work {
    Fixed(Arc<Vec<u8>>),
    /// Detokenize the card tokens of a shared pool, each once.
    DetokenizeCards(Arc<Pool>),
    DetokenizeCustomer(Arc<Vec<String>>),
    Attach(Arc<Pool>, Arc<Vec<String>>),
    Mixed(Arc<Pool>, Arc<Vec<String>>),
    Handshake,
    /// Payments through `POST /v1/forward` with customer tokens.
    Forward(Arc<Vec<String>>),
    /// Detokenize a customer token, then send the payment to the PSP directly.
    Direct(Arc<Vec<String>>, Arc<PspClient>),
}

/// Card tokens prepared before a run, handed out once each.
struct Pool {
    ids: Vec<String>,
    next: AtomicUsize,
}

impl Pool {
    fn take(&self) -> Option<&str> {
        self.ids
            .get(self.next.fetch_add(1, Ordering::Relaxed))
            .map(String::as_str)
    }
}

async fn run_scenario(
    client: &Client,
    scenario: &str,
    options: &BenchOptions,
    server: Option<&LocalServer>,
) -> Result<Figures, BenchError> {
    let work = prepare(client, scenario, options).await?;
    let cpu_before = server.and_then(LocalServer::cpu_seconds);
    let own_before = cpu_seconds(std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..options.concurrency {
        let (client, work, stop) = (client.clone(), work.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            drive(&client, &work, &stop, worker).await
        }));
    }
    tokio::time::sleep(options.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut finished = started;
    for t in tasks {
        let (lat, err, done) = t.await.map_err(setup)?;
        latencies.extend(lat);
        errors += err;
        finished = finished.max(done);
    }
    // A worker stops early when a prepared pool runs dry: count the time work was done.
    let seconds = finished.duration_since(started).as_secs_f64().max(1e-3);
    let cpu = match (cpu_before, server.and_then(LocalServer::cpu_seconds)) {
        (Some(a), Some(b)) if !latencies.is_empty() => {
            Some((b - a) / latencies.len() as f64 * 1000.0)
        }
        _ => None,
    };
    let client_cpu = match (own_before, cpu_seconds(std::process::id())) {
        (Some(a), Some(b)) if !latencies.is_empty() => {
            Some((b - a) / latencies.len() as f64 * 1000.0)
        }
        _ => None,
    };
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies.get(i).map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    Ok(Figures {
        scenario: scenario.to_owned(),
        requests: latencies.len(),
        errors,
        seconds,
        requests_per_second: latencies.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        server_cpu_seconds_per_1k: cpu,
        server_rss_mib: server.and_then(LocalServer::rss_mib),
        client_cpu_seconds_per_1k: client_cpu,
    })
}

/// Builds what the scenario needs before the clock starts.
async fn prepare(
    client: &Client,
    scenario: &str,
    options: &BenchOptions,
) -> Result<Work, BenchError> {
    let customers = |n: usize| async move { make_customers(client, n, options.concurrency).await };
    Ok(match scenario {
        "health" => Work::Fixed(Arc::new(client.request("GET", "/v1/health", None))),
        "tokenize" => Work::Fixed(Arc::new(client.request(
            "POST",
            "/v1/cards",
            Some(&card_json(1)),
        ))),
        "detokenize-card" => Work::DetokenizeCards(Arc::new(card_pool(client, options).await?)),
        "detokenize-customer" => Work::DetokenizeCustomer(Arc::new(
            customer_tokens(client, customers(1).await?).await?,
        )),
        "forward" => Work::Forward(Arc::new(
            customer_tokens(client, customers(1).await?).await?,
        )),
        "direct" => Work::Direct(
            Arc::new(customer_tokens(client, customers(1).await?).await?),
            client
                .psp
                .clone()
                .ok_or_else(|| setup("direct needs the stand-in PSP"))?,
        ),
        "customer-token" => {
            let pool = card_pool(client, options).await?;
            let owners = customers(pool.ids.len() / 10 + 1).await?;
            Work::Attach(Arc::new(pool), Arc::new(owners))
        }
        "mixed" => {
            let pool = card_pool(client, options).await?;
            let owners = customers(1).await?;
            let owner = owners.first().cloned().unwrap_or_default();
            let mut conn = client.connect().await?;
            let mut tokens = Vec::new();
            for i in 0..20 {
                let card = tokenize_one(client, &mut conn, 1_000_000 + i).await?;
                let req = client.request(
                    "POST",
                    &format!("/v1/customers/{owner}/tokens"),
                    Some(&format!(r#"{{"source":"{card}"}}"#)),
                );
                let (_, body) = conn.send(&req).await?;
                tokens.extend(json_field(&body, "id"));
            }
            Work::Mixed(Arc::new(pool), Arc::new(tokens))
        }
        "handshake" => Work::Handshake,
        other => return Err(setup(format!("unknown scenario {other}"))),
    })
}

/// 100 customer tokens of the first of `owners`.
async fn customer_tokens(client: &Client, owners: Vec<String>) -> Result<Vec<String>, BenchError> {
    let mut tokens = Vec::new();
    let mut conn = client.connect().await?;
    let owner = owners.first().map(String::as_str).unwrap_or("");
    for i in 0..100 {
        let card = tokenize_one(client, &mut conn, i).await?;
        let req = client.request(
            "POST",
            &format!("/v1/customers/{owner}/tokens"),
            Some(&format!(r#"{{"source":"{card}"}}"#)),
        );
        let (status, body) = conn.send(&req).await?;
        let id = json_field(&body, "id")
            .filter(|_| status < 300)
            .ok_or_else(|| setup("could not make a customer token"))?;
        tokens.push(id);
    }
    Ok(tokens)
}

async fn tokenize_one(client: &Client, conn: &mut Conn, n: usize) -> Result<String, BenchError> {
    let (status, body) = conn
        .send(&client.request("POST", "/v1/cards", Some(&card_json(n))))
        .await?;
    json_field(&body, "id")
        .filter(|_| status == 201)
        .ok_or_else(|| setup(format!("tokenize failed with {status}")))
}

/// Makes `n` customers over up to `connections` connections at once: each one waits for a
/// flush, so one connection alone took most of the customer-token scenario's preparation.
async fn make_customers(
    client: &Client,
    n: usize,
    connections: usize,
) -> Result<Vec<String>, BenchError> {
    let workers = connections.clamp(1, n.max(1));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = client.clone();
            let share = n / workers + usize::from(w < n % workers);
            tokio::spawn(async move { make_customers_on_one(&client, share).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.extend(task.await.map_err(setup)??);
    }
    Ok(out)
}

async fn make_customers_on_one(client: &Client, n: usize) -> Result<Vec<String>, BenchError> {
    let mut conn = client.connect().await?;
    let req = client.request(
        "POST",
        "/v1/customers",
        Some(r#"{"name":"Bench Customer"}"#),
    );
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, body) = conn.send(&req).await?;
        out.push(
            json_field(&body, "id")
                .filter(|_| status == 201)
                .ok_or_else(|| setup("could not make a customer"))?,
        );
    }
    Ok(out)
}

/// Tokenizes distinct cards at full speed for the scenario's duration: enough for a run of
/// the same length that uses each token once (using a token is never cheaper than making one).
async fn card_pool(client: &Client, options: &BenchOptions) -> Result<Pool, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..options.concurrency {
        let (client, stop, counter) = (client.clone(), Arc::clone(&stop), Arc::clone(&counter));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let Ok(mut conn) = client.connect().await else {
                return ids;
            };
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                match tokenize_one(&client, &mut conn, n).await {
                    Ok(id) => ids.push(id),
                    Err(_) => break,
                }
            }
            ids
        }));
    }
    tokio::time::sleep(options.duration + Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.map_err(setup)?);
    }
    if ids.is_empty() {
        return Err(setup("could not prepare card tokens"));
    }
    Ok(Pool {
        ids,
        next: AtomicUsize::new(0),
    })
}

/// A forward of customer token `id` to the stand-in PSP.
fn forward_json(id: &str) -> String {
    serde_json::json!({
        "receiver": PSP_RECEIVER, "token": id, "method": "POST", "path": PSP_PATH,
        "body": {"amount": 1000, "currency": "EUR", "card": {
            "number": "{{card.number}}", "exp_month": "{{card.exp_month | number}}",
            "exp_year": "{{card.exp_year}}", "name": "{{card.holder_name}}"}},
        "reason": "mit",
    })
    .to_string()
}

/// The second half of `direct`: the router sends the card it detokenized to the PSP over its
/// own kept-alive connection.
async fn ok_direct(psp: &PspClient, conn: &mut Option<Conn>, detokenized: &[u8]) -> bool {
    let Some(request) = psp.payment(detokenized) else {
        return false;
    };
    if conn.is_none() {
        *conn = psp.connect().await.ok();
    }
    let Some(c) = conn.as_mut() else { return false };
    let ok = matches!(c.send(&request).await, Ok((200..=299, _)));
    if !ok {
        *conn = None;
    }
    ok
}

/// One worker: requests back to back until told to stop; returns latencies (µs), errors, and
/// when it stopped.
async fn drive(
    client: &Client,
    work: &Work,
    stop: &AtomicBool,
    worker: usize,
) -> (Vec<u32>, usize, Instant) {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    let mut conn = None;
    let mut psp_conn = None;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let request = match work {
            Work::Fixed(req) => req.as_ref().clone(),
            Work::DetokenizeCards(pool) => match pool.take() {
                Some(id) => client.request(
                    "POST",
                    "/v1/detokenize",
                    Some(&format!(r#"{{"token":"{id}"}}"#)),
                ),
                None => break,
            },
            Work::DetokenizeCustomer(tokens) | Work::Direct(tokens, _) => {
                let id = tokens
                    .get((worker + i) % tokens.len().max(1))
                    .map_or("", String::as_str);
                client.request(
                    "POST",
                    "/v1/detokenize",
                    Some(&format!(r#"{{"token":"{id}","reason":"mit"}}"#)),
                )
            }
            Work::Attach(pool, owners) => {
                let next = pool.next.fetch_add(1, Ordering::Relaxed);
                let (Some(card), Some(owner)) = (pool.ids.get(next), owners.get(next / 10)) else {
                    break;
                };
                client.request(
                    "POST",
                    &format!("/v1/customers/{owner}/tokens"),
                    Some(&format!(r#"{{"source":"{card}"}}"#)),
                )
            }
            Work::Mixed(pool, tokens) => match i % 4 {
                // A checkout mix: half new cards, a quarter one-off payments, a quarter
                // payments with a stored card.
                0 | 1 => client.request(
                    "POST",
                    "/v1/cards",
                    Some(&card_json(worker * 1_000_000 + i)),
                ),
                2 => match pool.take() {
                    Some(id) => client.request(
                        "POST",
                        "/v1/detokenize",
                        Some(&format!(r#"{{"token":"{id}","reason":"cit"}}"#)),
                    ),
                    None => client.request(
                        "POST",
                        "/v1/cards",
                        Some(&card_json(worker * 1_000_000 + i)),
                    ),
                },
                _ => {
                    let id = tokens
                        .get(i % tokens.len().max(1))
                        .map_or("", String::as_str);
                    client.request(
                        "POST",
                        "/v1/detokenize",
                        Some(&format!(r#"{{"token":"{id}","reason":"mit"}}"#)),
                    )
                }
            },
            Work::Handshake => client.request("GET", "/v1/health", None),
            Work::Forward(tokens) => {
                let id = tokens
                    .get((worker + i) % tokens.len().max(1))
                    .map_or("", String::as_str);
                client.request("POST", "/v1/forward", Some(&forward_json(id)))
            }
        };
        let started = Instant::now();
        if conn.is_none() || matches!(work, Work::Handshake) {
            conn = client.connect().await.ok();
        }
        let ok = match conn.as_mut() {
            Some(c) => match c.send(&request).await {
                Ok((200..=299, body)) => match work {
                    Work::Direct(_, psp) => ok_direct(psp, &mut psp_conn, &body).await,
                    // The vault answers 200 with the PSP's status inside.
                    Work::Forward(_) => serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("status").and_then(serde_json::Value::as_u64))
                        .is_some_and(|s| (200..300).contains(&s)),
                    _ => true,
                },
                _ => false,
            },
            None => false,
        };
        latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        if !ok {
            errors += 1;
            conn = None;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    (latencies, errors, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts() {
        assert_eq!(parse_count("0"), Some(0));
        assert_eq!(parse_count("250k"), Some(250_000));
        assert_eq!(parse_count("10M"), Some(10_000_000));
        assert_eq!(parse_count("1.5M"), None);
        assert_eq!(parse_count("M"), None);
        assert_eq!(parse_count(""), None);
    }

    #[test]
    fn parses_response_heads() {
        let raw = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nx: y\r\n\r\n{}HTTP/1.1";
        assert_eq!(
            parse_head(raw).unwrap(),
            Some((201, raw.len() - "{}HTTP/1.1".len(), 2))
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }
}
