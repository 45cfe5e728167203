//! The PostgreSQL engine: several daemons over one database, which does the replication,
//! failover and backups.
//!
//! Each space is a table of `(project, id, value)`, `value` being the same bytes the sled
//! engine stores (timestamps, state flags, key version and ciphertext: never a PAN, CVC,
//! contact detail or key in the clear). Store-wide values live in `meta`, DEK encryption
//! reservations in `encryptions`.
//!
//! - A single-record change is one statement: `INSERT ... ON CONFLICT DO NOTHING` for a new
//!   record or claim, `UPDATE ... WHERE value = <the bytes read>` for a compare-and-swap (zero
//!   rows: a racing writer won; read again and decide again, as on sled).
//! - A [`Batch`] is one transaction: every record it checks is locked (`FOR UPDATE`, in a fixed
//!   order) and compared, a record it expects absent is `INSERT`ed (a racing insert fails it),
//!   and any conflict, serialization failure or deadlock rolls it back whole and reports the
//!   race, so the caller re-reads and decides again.
//! - Every write is durable when its statement returns: the daemon waits for `COMMIT` (with
//!   `synchronous_commit` as the operator set it), never for a flush of its own.
//!
//! Connections live on the engine's own small runtime (so blocking callers and request
//! handlers share them), every statement is prepared once per connection, and every call is
//! bounded by the statement timeout on both sides: PostgreSQL's `statement_timeout`, and a
//! client-side deadline for a database that stopped answering altogether. A connection error
//! answers [`StoreError::Database`] (503); the pool replaces dead connections as the database
//! comes back, with no restart.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{self, Metrics, Pool, RecycleError, RecycleResult};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, NoTls, Statement};

use super::{
    split_key, Batch, Codec, Malformed, Space, StoreError, Swap, Ticket, FORMAT, FORMAT_KEY,
};

/// `[store.postgres]`, resolved.
#[derive(Clone)]
pub struct PgSettings {
    /// A libpq-style URL or key=value string, without a password.
    pub url: String,
    /// A file holding the password (mode 0600 or stricter), if the role has one.
    pub password_file: Option<PathBuf>,
    pub pool_size: usize,
    /// CA certificates that sign the server's certificate: TLS (rustls) when set.
    pub ca: Option<PathBuf>,
    /// A client certificate and key for the database, if it asks for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Bound on every call, on the server (`statement_timeout`) and on the client.
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL carries no password (refused at parse), but say only where it points.
        f.debug_struct("PgSettings")
            .field("hosts", &self.hosts().ok())
            .field("pool_size", &self.pool_size)
            .field("tls", &self.ca.is_some())
            .finish_non_exhaustive()
    }
}

impl PgSettings {
    /// Parses the URL and checks what can be checked without connecting: no password in it,
    /// and plaintext only to loopback hosts or a Unix socket.
    pub fn validate(&self) -> Result<(), String> {
        let config = self.parse_url()?;
        if config.get_password().is_some() {
            return Err("[store.postgres] url holds a password: put it in password_file".into());
        }
        if self.ca.is_none() {
            if let Some(host) = self.hosts()?.into_iter().find(|h| !is_local(h)) {
                return Err(format!(
                    "[store.postgres] host {host} is not loopback: set ca (TLS to the database) \
                     or connect over loopback or a Unix socket"
                ));
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("[store.postgres] cert and key go together".into());
        }
        if (self.cert.is_some() || self.key.is_some()) && self.ca.is_none() {
            return Err("[store.postgres] cert and key need ca".into());
        }
        if self.pool_size == 0 {
            return Err("[store.postgres] pool_size must be at least 1".into());
        }
        if self.statement_timeout.is_zero() {
            return Err("[store.postgres] statement_timeout must be positive".into());
        }
        Ok(())
    }

    fn parse_url(&self) -> Result<tokio_postgres::Config, String> {
        self.url
            .parse::<tokio_postgres::Config>()
            // The parser's message may quote the URL: say only that it is wrong.
            .map_err(|_| "[store.postgres] url is not a PostgreSQL connection URL".to_owned())
    }

    /// The hosts the URL names (Unix sockets as their folder).
    pub fn hosts(&self) -> Result<Vec<String>, String> {
        let config = self.parse_url()?;
        let mut hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        hosts.extend(config.get_hostaddrs().iter().map(|a| a.to_string()));
        if hosts.is_empty() {
            return Err("[store.postgres] url names no host".into());
        }
        Ok(hosts)
    }

    /// The client config: URL, password, timeouts and keepalives.
    fn client_config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config = self.parse_url().map_err(StoreError::Damaged)?;
        if let Some(path) = &self.password_file {
            let password = read_secret(path).map_err(StoreError::Damaged)?;
            config.password(password.trim_end_matches(['\r', '\n']));
        }
        let millis = self.statement_timeout.as_millis();
        config
            .application_name("cardvault")
            .options(format!(
                "-c statement_timeout={millis} -c lock_timeout={millis} \
                 -c idle_in_transaction_session_timeout={}",
                millis.saturating_mul(2)
            ))
            .connect_timeout(self.statement_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(self.statement_timeout.saturating_mul(2));
        if self.ca.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        Ok(config)
    }

    /// rustls, verifying the server against `ca` (and its name against the URL's host).
    fn tls(&self) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let bad =
            |what: &str, e: String| StoreError::Damaged(format!("[store.postgres] {what}: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::tls::load_certs(ca).map_err(|e| bad("ca", e.to_string()))? {
            roots.add(cert).map_err(|e| bad("ca", e.to_string()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| bad("tls", e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = crate::tls::load_certs(cert).map_err(|e| bad("cert", e.to_string()))?;
                let key = crate::tls::load_key(key).map_err(|e| bad("key", e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad("cert", e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }
}

fn is_local(host: &str) -> bool {
    host == "localhost"
        || host.starts_with('/')
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reads a password file, refusing one that others can read.
fn read_secret(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("[store.postgres] password_file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "[store.postgres] password_file {} is readable by others: chmod 600 it",
            path.display()
        ));
    }
    std::fs::read_to_string(path)
        .map_err(|e| format!("[store.postgres] password_file {}: {e}", path.display()))
}

/// The tables of the record spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Cards,
    Customers,
    Tokens,
    Idempotency,
    Keys,
}

const TABLES: [Table; 5] = [
    Table::Cards,
    Table::Customers,
    Table::Tokens,
    Table::Idempotency,
    Table::Keys,
];

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Cards => "cards",
            Table::Customers => "customers",
            Table::Tokens => "customer_tokens",
            Table::Idempotency => "idempotency",
            Table::Keys => "wrapped_keys",
        }
    }

    pub fn of_kind(kind: super::Kind) -> Table {
        match kind {
            super::Kind::Cards => Table::Cards,
            super::Kind::Customers => Table::Customers,
            super::Kind::Tokens => Table::Tokens,
            super::Kind::Idempotency => Table::Idempotency,
            super::Kind::Keys => Table::Keys,
        }
    }

    fn of(space: Space) -> Table {
        match space {
            Space::Cards => Table::Cards,
            Space::Customers => Table::Customers,
            Space::Tokens => Table::Tokens,
        }
    }
}

/// The statements of one table, in the order [`Statements`] prepares them.
#[derive(Debug, Clone, Copy)]
enum Op {
    Get,
    Lock,
    Insert,
    Update,
    Upsert,
    DeleteIf,
    Delete,
    Page,
}

const OPS: [Op; 8] = [
    Op::Get,
    Op::Lock,
    Op::Insert,
    Op::Update,
    Op::Upsert,
    Op::DeleteIf,
    Op::Delete,
    Op::Page,
];

fn sql(op: Op, table: Table) -> String {
    let t = table.name();
    match op {
        Op::Get => format!("SELECT value FROM {t} WHERE project = $1 AND id = $2"),
        Op::Lock => format!("SELECT value FROM {t} WHERE project = $1 AND id = $2 FOR UPDATE"),
        Op::Insert => format!(
            "INSERT INTO {t} (project, id, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
        ),
        Op::Update => {
            format!("UPDATE {t} SET value = $3 WHERE project = $1 AND id = $2 AND value = $4")
        }
        Op::Upsert => format!(
            "INSERT INTO {t} (project, id, value) VALUES ($1, $2, $3) \
             ON CONFLICT (project, id) DO UPDATE SET value = EXCLUDED.value"
        ),
        Op::DeleteIf => format!("DELETE FROM {t} WHERE project = $1 AND id = $2 AND value = $3"),
        Op::Delete => format!("DELETE FROM {t} WHERE project = $1 AND id = $2"),
        Op::Page => format!(
            "SELECT project, id, value FROM {t} WHERE (project, id) > ($1, $2) \
             ORDER BY project, id LIMIT $3"
        ),
    }
}

/// The use of a one-off card token (see [`Postgres::use_card_taking_cvc`]): `$1` project, `$2` id,
/// `$3` now, `$4` the key versions the caller can open. Returns the bytes before, whether it
/// was used now, and, when it was, the card's stored CVC (taken in the same statement: its
/// version, sealed bytes, and whether it was still live).
const USE_CARD: &str = r"
WITH old AS (
    SELECT value,
           ('x' || encode(substring(value FROM 11 FOR 8), 'hex'))::bit(64)::bigint AS expires,
           ('x' || lpad(encode(substring(value FROM 27 FOR 4), 'hex'), 16, '0'))::bit(64)::bigint
               AS version,
           ('x' || lpad(encode(substring(value FROM 31 FOR 4), 'hex'), 16, '0'))::bit(64)::bigint
               AS meta_len
    FROM cards WHERE project = $1 AND id = $2 FOR UPDATE
), used AS (
    UPDATE cards SET value =
        substring(old.value FROM 1 FOR 1) || '\x01'::bytea
        || substring(old.value FROM 3 FOR 16) || int8send($3::bigint)
        || substring(old.value FROM 27 FOR (8 + old.meta_len)::int) || '\x00000000'::bytea
    FROM old
    WHERE cards.project = $1 AND cards.id = $2
      AND get_byte(old.value, 0) = 1 AND get_byte(old.value, 1) = 2
      AND old.expires > $3 AND old.version = ANY($4::bigint[])
    RETURNING 1
), cvc AS (
    DELETE FROM cvcs WHERE project = $1 AND id = $2 AND EXISTS (SELECT 1 FROM used)
    RETURNING version, value, expires_at > NOW_MS AS live
)
SELECT old.value, EXISTS (SELECT 1 FROM used),
       (SELECT version FROM cvc), (SELECT value FROM cvc), (SELECT live FROM cvc)
FROM old";

const META_GET: &str = "SELECT value FROM meta WHERE name = $1";
const META_PUT: &str = "INSERT INTO meta (name, value) VALUES ($1, $2) \
                        ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value";
const RESERVED_GET: &str = "SELECT reserved FROM encryptions WHERE project = $1 AND version = $2";
const RESERVE: &str = "INSERT INTO encryptions (project, version, reserved) VALUES ($1, $2, $3) \
                       ON CONFLICT (project, version) \
                       DO UPDATE SET reserved = encryptions.reserved + EXCLUDED.reserved \
                       RETURNING reserved";

/// A new card and its CVC, in one statement (one commit): `$1` project, `$2` id, `$3` the card
/// record, `$4` the CVC's key version, `$5` its time to live (ms), `$6` it sealed.
const CARD_WITH_CVC: &str = "WITH cvc AS (INSERT INTO cvcs (project, id, version, expires_at, value) \
                             VALUES ($1, $2, $4, NOW_MS + $5, $6) ON CONFLICT (project, id) DO UPDATE \
                             SET version = EXCLUDED.version, expires_at = EXCLUDED.expires_at, \
                                 value = EXCLUDED.value) \
                             INSERT INTO cards (project, id, value) VALUES ($1, $2, $3) \
                             ON CONFLICT DO NOTHING";
/// Taken at most once, by whichever node asks first; an expired one is deleted unread.
const CVC_TAKE: &str = "DELETE FROM cvcs WHERE project = $1 AND id = $2 \
                        RETURNING version, value, expires_at > NOW_MS";
const NODE_ALIVE: &str = "SELECT EXISTS (SELECT 1 FROM nodes WHERE boot_id = $1 \
                          AND seen_at > now() - make_interval(secs => $2))";

/// Every statement, prepared once per connection.
struct Statements {
    /// `OPS.len()` per table, tables in `TABLES` order.
    tables: Vec<Statement>,
    meta_get: Statement,
    meta_put: Statement,
    reserved_get: Statement,
    reserve: Statement,
    use_card: Statement,
    card_with_cvc: Statement,
    cvc_take: Statement,
    node_alive: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        // Sent together: the client pipelines them over one round trip's wait.
        let texts: Vec<String> = TABLES
            .iter()
            .flat_map(|t| OPS.iter().map(move |op| sql(*op, *t)))
            .collect();
        let tables =
            futures_util::future::try_join_all(texts.iter().map(|q| client.prepare(q))).await?;
        Ok(Statements {
            tables,
            meta_get: client.prepare(META_GET).await?,
            meta_put: client.prepare(META_PUT).await?,
            reserved_get: client.prepare(RESERVED_GET).await?,
            reserve: client.prepare(RESERVE).await?,
            use_card: client
                .prepare(&USE_CARD.replace("NOW_MS", DB_MILLIS))
                .await?,
            card_with_cvc: client
                .prepare(&CARD_WITH_CVC.replace("NOW_MS", DB_MILLIS))
                .await?,
            cvc_take: client
                .prepare(&CVC_TAKE.replace("NOW_MS", DB_MILLIS))
                .await?,
            node_alive: client.prepare(NODE_ALIVE).await?,
        })
    }

    fn get(&self, op: Op, table: Table) -> Result<&Statement, StoreError> {
        let t = TABLES.iter().position(|x| *x == table).unwrap_or(0);
        self.tables
            .get(t * OPS.len() + op as usize)
            .ok_or_else(|| StoreError::Query("statement missing".into()))
    }
}

/// One pooled connection.
pub struct Conn {
    client: Client,
    statements: Statements,
}

/// Makes connections on the engine's runtime (or, for shared ones, on the caller's).
pub struct Manager {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    runtime: tokio::runtime::Handle,
    /// Connections run by the creating thread's runtime (a request thread's own pool).
    here: bool,
}

impl Manager {
    /// Connects, and runs the connection on the engine's runtime.
    async fn connect(&self) -> Result<Client, StoreError> {
        let (config, tls) = (self.config.clone(), self.tls.clone());
        let task = self.runtime.spawn(async move {
            match tls {
                None => {
                    let (client, connection) = config.connect(NoTls).await?;
                    tokio::spawn(async move { drop(connection.await) });
                    Ok(client)
                }
                Some(tls) => {
                    let (client, connection) = config.connect(tls).await?;
                    tokio::spawn(async move { drop(connection.await) });
                    Ok(client)
                }
            }
        });
        match task.await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Database("connection task ended".into())),
        }
    }
}

impl Manager {
    fn copy(&self) -> Manager {
        Manager {
            config: self.config.clone(),
            tls: self.tls.clone(),
            runtime: self.runtime.clone(),
            here: false,
        }
    }

    /// A connection run by the calling thread's runtime, its statements prepared.
    async fn create_here(&self) -> Result<Conn, StoreError> {
        let client = match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(classify)?;
                tokio::spawn(async move { drop(connection.await) });
                client
            }
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(classify)?;
                tokio::spawn(async move { drop(connection.await) });
                client
            }
        };
        let statements = Statements::prepare(&client).await.map_err(classify)?;
        Ok(Conn { client, statements })
    }
}

impl managed::Manager for Manager {
    type Type = Conn;
    type Error = StoreError;

    async fn create(&self) -> Result<Conn, StoreError> {
        if self.here {
            return self.create_here().await;
        }
        let client = self.connect().await?;
        let statements = Statements::prepare(&client).await.map_err(classify)?;
        Ok(Conn { client, statements })
    }

    async fn recycle(&self, conn: &mut Conn, _: &Metrics) -> RecycleResult<StoreError> {
        if conn.client.is_closed() {
            return Err(RecycleError::message("connection closed"));
        }
        Ok(())
    }
}

/// Sorts a PostgreSQL error into "the database is unreachable or refusing service" (503, the
/// caller may retry later) and "the database refused this query" (500).
fn classify(e: tokio_postgres::Error) -> StoreError {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection broke, timed out or never opened; the cause (a refused
        // certificate, a reset) is in the source chain, which the error's own text leaves out.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        return StoreError::Database(text);
    };
    let class = code.code().get(..2).unwrap_or("");
    if matches!(class, "08" | "53" | "57" | "58")
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::LOCK_NOT_AVAILABLE
    {
        StoreError::Database(e.to_string())
    } else {
        StoreError::Query(e.to_string())
    }
}

/// Inside a transaction: a lost race (roll back, report the race) or a failure.
enum TxError {
    Race,
    Store(StoreError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> TxError {
        if lost_race(&e) {
            TxError::Race
        } else {
            TxError::Store(classify(e))
        }
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> TxError {
        TxError::Store(e)
    }
}

/// Whether a failed transaction lost a race (the caller re-reads and tries again).
fn lost_race(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::UNIQUE_VIOLATION
    })
}

/// The engine: cheap to clone, every clone the same pool.
#[derive(Clone)]
pub struct Postgres(Arc<Inner>);

struct Inner {
    /// Connections for request handlers.
    pool: Pool<Manager>,
    /// Connections for blocking callers ([`Postgres::block`]): a request handler that blocks
    /// its thread on a store call must never wait for a connection that a request suspended
    /// on that same thread holds.
    background: Pool<Manager>,
    /// Runs the connections, the health probe and blocking callers' work.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    timeout: Duration,
    /// Whether the last probe or call reached the database.
    up: Arc<AtomicBool>,
    /// Tells this engine's shared connections apart in a thread's [`LOCAL`].
    id: u64,
    /// Opens the shared connections.
    local: Manager,
    /// Connections for writes per request thread.
    local_pool_size: usize,
    /// This daemon as a node of the cluster (`None` for the command-line tools).
    node: Option<Arc<Node>>,
}

/// This daemon as one of the nodes serving from the database. Its row in `nodes` is refreshed
/// every second by the probe, with what the key maintenance last reported.
pub struct Node {
    name: String,
    boot_id: i64,
    /// Whether this node holds the leader lock (background work runs here).
    leader: AtomicBool,
    /// Nodes seen alive at the last refresh, this one included.
    live: std::sync::atomic::AtomicUsize,
    /// The active DEK version this node seals under, and whether a request still holds an
    /// older one: the leader destroys a version only when no live node does.
    /// ([`SEALED`] while sealed; 0 until the first report.)
    active_version: std::sync::atomic::AtomicI64,
    holds_retired: AtomicBool,
}

/// What a sealed node reports as its DEK version: it holds no key, so holds nothing back.
const SEALED: i64 = -1;

impl Node {
    fn new(name: &str) -> Result<Node, StoreError> {
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| StoreError::Damaged("no randomness for the node id".into()))?;
        Ok(Node {
            name: name.to_owned(),
            // Positive, so it reads the same as a PostgreSQL bigint and a claim owner.
            boot_id: i64::from_be_bytes(id) & i64::MAX,
            leader: AtomicBool::new(false),
            live: std::sync::atomic::AtomicUsize::new(1),
            active_version: std::sync::atomic::AtomicI64::new(0),
            holds_retired: AtomicBool::new(false),
        })
    }
}

/// Shared (pipelined) connections per request thread.
const LOCAL_CONNECTIONS: usize = 2;

/// A thread's connections of one engine: shared ones for reads, a pool for writes.
struct LocalConns {
    conns: Vec<Option<Arc<Conn>>>,
    next: usize,
    pool: Pool<Manager>,
}

/// Whether the caller is a request handler: on a runtime of its own thread (an HTTP worker),
/// not a blocking caller ([`Postgres::block`]) and not the engine's runtime.
fn on_request_thread() -> bool {
    !matches!(BLOCKING.try_with(|b| *b), Ok(true))
        && tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

thread_local! {
    /// Per engine (by [`Inner::id`]), the connections this thread's requests share.
    static LOCAL: std::cell::RefCell<std::collections::HashMap<u64, LocalConns>> =
        std::cell::RefCell::default();
}

/// A connection for one statement: pooled (exclusive) or shared by a thread's requests.
// One lives for one store call; boxing the pooled one would cost an allocation per call.
#[allow(clippy::large_enum_variant)]
pub enum ConnRef {
    Pooled(deadpool::managed::Object<Manager>),
    Shared(Arc<Conn>),
}

impl std::ops::Deref for ConnRef {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        match self {
            ConnRef::Pooled(conn) => conn,
            ConnRef::Shared(conn) => conn,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(runtime) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            // Never blocks, so it is safe wherever the last handle goes (even inside a runtime).
            runtime.shutdown_background();
        }
    }
}

/// Schema migrations, applied in order; the schema's version is how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: the record spaces, store-wide values and DEK encryption reservations. `C` collation:
    // ids are ASCII, and keyset scans then compare bytes.
    r#"
    CREATE TABLE cards (project text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
                        value bytea NOT NULL, PRIMARY KEY (project, id));
    CREATE TABLE customers (project text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
                            value bytea NOT NULL, PRIMARY KEY (project, id));
    CREATE TABLE customer_tokens (project text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
                                  value bytea NOT NULL, PRIMARY KEY (project, id));
    CREATE TABLE idempotency (project text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
                              value bytea NOT NULL, PRIMARY KEY (project, id));
    CREATE TABLE wrapped_keys (project text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
                               value bytea NOT NULL, PRIMARY KEY (project, id));
    CREATE TABLE meta (name text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
    CREATE TABLE encryptions (project text COLLATE "C" NOT NULL, version bigint NOT NULL,
                              reserved bigint NOT NULL, PRIMARY KEY (project, version));
    "#,
    // 2: several daemons over one database. `nodes`: one row per running daemon, refreshed
    // every second (a row not refreshed for `NODE_LEASE` is a dead node's). `cvcs`: CVCs
    // sealed under the project's DEK until their first use or `expires_at` (milliseconds,
    // the database's clock), whichever comes first. Unlogged: a CVC never reaches the WAL,
    // a standby or a WAL archive, and a crash or failover of the database forgets them, as a
    // restart of a sled vault does (the card stays; its first use has no CVC).
    r#"
    CREATE TABLE nodes (boot_id bigint PRIMARY KEY, name text NOT NULL,
                        started_at timestamptz NOT NULL DEFAULT now(),
                        seen_at timestamptz NOT NULL DEFAULT now(),
                        active_version bigint NOT NULL DEFAULT 0,
                        holds_retired boolean NOT NULL DEFAULT false);
    CREATE UNLOGGED TABLE cvcs (project text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
                       version bigint NOT NULL, expires_at bigint NOT NULL, value bytea NOT NULL,
                       PRIMARY KEY (project, id));
    CREATE INDEX cvcs_by_expiry ON cvcs (expires_at);
    "#,
    // 3: sweeps read only what is due. `cards.sweep_at` is `CardRecord::sweep_at` read from
    // the record's header (flags at byte 1, expiry at bytes 10..18, use at 18..26): the expiry
    // while the PAN is held, then the use (or expiry) plus the tombstone retention; NULL for
    // a record it cannot read. `idempotency.created_at` is read from bytes 1..9. Generated, so
    // every write keeps them current; adding them rewrites both tables once.
    r#"
    ALTER TABLE cards ADD COLUMN sweep_at bigint GENERATED ALWAYS AS (
        CASE WHEN length(value) >= 26 AND get_byte(value, 0) = 1 THEN
            CASE WHEN get_byte(value, 1) & 2 <> 0
                THEN ('x' || encode(substring(value FROM 11 FOR 8), 'hex'))::bit(64)::bigint
            WHEN get_byte(value, 1) & 1 <> 0
                THEN ('x' || encode(substring(value FROM 19 FOR 8), 'hex'))::bit(64)::bigint
                     + TOMBSTONE_SECS
            ELSE ('x' || encode(substring(value FROM 11 FOR 8), 'hex'))::bit(64)::bigint
                 + TOMBSTONE_SECS
            END
        END) STORED;
    CREATE INDEX cards_by_sweep ON cards (sweep_at, project, id);
    ALTER TABLE idempotency ADD COLUMN created_at bigint GENERATED ALWAYS AS (
        CASE WHEN length(value) >= 9 AND get_byte(value, 0) = 1
            THEN ('x' || encode(substring(value FROM 2 FOR 8), 'hex'))::bit(64)::bigint
        END) STORED;
    CREATE INDEX idempotency_by_age ON idempotency (created_at);
    "#,
];

/// `sql` with the constants the migrations name filled in.
fn with_constants(sql: &str) -> String {
    sql.replace(
        "TOMBSTONE_SECS",
        &super::TOMBSTONE_RETENTION_SECS.to_string(),
    )
}

/// Any constant: every daemon and `keys init` migrate under this advisory lock.
const MIGRATION_LOCK: i64 = 0x6361_7264_7661_756c;

/// The class of the advisory lock each daemon holds on its node name (see [`probe_session`]),
/// with the name's hash as the object.
const NODE_LOCK: i32 = 0x6376_6e64;
/// Held by the one daemon that runs background work: key maintenance and sweeps.
const LEADER_LOCK: i64 = 0x6361_7264_7661_756d;
/// A node whose row was not refreshed for this long is taken for dead: its idempotency
/// claims can be taken over, and the keys it held no longer hold back a destruction.
pub const NODE_LEASE: Duration = Duration::from_secs(10);
/// Milliseconds since the epoch on the database's clock, so every node judges expiry alike.
const DB_MILLIS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

const KEK_CHECK: &str = "kek_check";
const KEK_ID: &str = "kek_id";
const DEK_STATE: &str = "dek_state";
const ROOT_KEY: &str = "root_key";
const RECOVERY_ROOT: &str = "recovery_root";

/// Connections kept for blocking callers (key maintenance, sweeps, admin actions).
const BACKGROUND_CONNECTIONS: usize = 4;

tokio::task_local! {
    /// Set while a blocking caller's work runs: it takes the background connections.
    static BLOCKING: bool;
}

/// Rows per page of a full scan.
const PAGE: i64 = 1000;

impl Postgres {
    /// Connects, creates or migrates the schema, and starts the pool and its health probe.
    /// A daemon passes its node name: it then takes that name's lock (two running daemons
    /// never share a name), joins `nodes`, and may become the leader.
    pub fn open(settings: &PgSettings, node: Option<&str>) -> Result<Postgres, StoreError> {
        settings.validate().map_err(StoreError::Damaged)?;
        let node = node.map(Node::new).transpose()?.map(Arc::new);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cardvault-pg")
            .enable_all()
            .build()
            .map_err(StoreError::Thread)?;
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        match Postgres::start(settings, runtime.handle(), node.clone()) {
            Ok((pool, background, up, local)) => Ok(Postgres(Arc::new(Inner {
                pool,
                background,
                handle: runtime.handle().clone(),
                runtime: Mutex::new(Some(runtime)),
                timeout: settings.statement_timeout,
                up,
                id: INSTANCES.fetch_add(1, Ordering::SeqCst),
                local,
                local_pool_size: (settings.pool_size
                    / std::thread::available_parallelism().map_or(1, |n| n.get()))
                .max(2),
                node,
            }))),
            Err(e) => {
                // `open` may run inside a runtime, where dropping one would panic.
                runtime.shutdown_background();
                Err(e)
            }
        }
    }

    /// Migrates, then makes the pools and starts the probe on `handle`.
    #[allow(clippy::type_complexity)]
    fn start(
        settings: &PgSettings,
        handle: &tokio::runtime::Handle,
        node: Option<Arc<Node>>,
    ) -> Result<(Pool<Manager>, Pool<Manager>, Arc<AtomicBool>, Manager), StoreError> {
        let handle = handle.clone();
        let manager = Manager {
            config: settings.client_config()?,
            tls: settings.tls()?,
            runtime: handle.clone(),
            here: false,
        };
        let timeout = settings.statement_timeout;
        block_on(&handle, async {
            tokio::time::timeout(timeout.saturating_mul(4), migrate(&manager))
                .await
                .unwrap_or_else(|_| Err(StoreError::Database("timed out migrating".into())))
        })?;
        let pool = |manager: Manager, size: usize| {
            Pool::builder(manager)
                .max_size(size)
                .runtime(deadpool::Runtime::Tokio1)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .build()
                .map_err(|e| StoreError::Damaged(e.to_string()))
        };
        let (background, probe_manager) = (
            pool(manager.copy(), BACKGROUND_CONNECTIONS)?,
            manager.copy(),
        );
        let local = manager.copy();
        let pool = pool(manager, settings.pool_size)?;
        let up = Arc::new(AtomicBool::new(true));
        let session = block_on(&handle, async {
            tokio::time::timeout(timeout, probe_session(&probe_manager, node.as_deref()))
                .await
                .unwrap_or_else(|_| Err(StoreError::Database("timed out joining".into())))
        })?;
        handle.spawn(probe(
            pool.clone(),
            probe_manager,
            Some(session),
            Arc::clone(&up),
            timeout,
            node,
        ));
        Ok((pool, background, up, local))
    }

    pub fn generation(&self) -> u64 {
        1
    }

    /// Whether the database answered the last probe or call.
    pub fn writable(&self) -> bool {
        self.0.up.load(Ordering::SeqCst)
    }

    pub fn needs_restart(&self) -> bool {
        false
    }

    pub fn close(&self) -> Result<(), StoreError> {
        if let Some(node) = &self.0.node {
            // A node that stops leaves at once rather than after its lease: its share of the
            // cluster's limits goes back to the others.
            let left = self.block(self.with(|conn| async move {
                conn.client
                    .execute("DELETE FROM nodes WHERE boot_id = $1", &[&node.boot_id])
                    .await
                    .map_err(classify)
            }));
            if let Err(e) = left {
                tracing::warn!(error = %e, "could not remove this node's row; it expires by itself");
            }
        }
        self.0.pool.close();
        self.0.background.close();
        Ok(())
    }

    /// This node's id in `nodes`, which also marks its idempotency claims.
    pub fn node_id(&self) -> Option<u64> {
        self.0.node.as_ref().map(|n| n.boot_id as u64)
    }

    /// Whether background work runs here: this node holds the leader lock (a store opened
    /// by a tool, with no node, leads nothing).
    pub fn is_leader(&self) -> bool {
        self.0
            .node
            .as_ref()
            .is_some_and(|n| n.leader.load(Ordering::SeqCst))
    }

    /// Live nodes at the last heartbeat, this one included.
    pub fn live_nodes(&self) -> usize {
        self.0
            .node
            .as_ref()
            .map_or(1, |n| n.live.load(Ordering::SeqCst))
    }

    /// What the next heartbeat tells the other nodes about this node's keys: the version it
    /// seals under (`None`: sealed, holding no key), and whether a request still holds an
    /// older one.
    pub fn report_keys(&self, active_version: Option<u32>, holds_retired: bool) {
        if let Some(node) = &self.0.node {
            let reported = active_version.map_or(SEALED, i64::from);
            node.active_version.store(reported, Ordering::SeqCst);
            node.holds_retired.store(holds_retired, Ordering::SeqCst);
        }
    }

    /// Whether the node with this id refreshed its row within [`NODE_LEASE`].
    pub async fn node_alive(&self, id: u64) -> Result<bool, StoreError> {
        let id = i64::try_from(id).map_err(|_| StoreError::Corrupt(Malformed))?;
        let lease = NODE_LEASE.as_secs_f64();
        self.with(|conn| async move {
            conn.client
                .query_one(&conn.statements.node_alive, &[&id, &lease])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(classify)
        })
        .await
    }

    /// Whether another live node has not yet taken `active` into use, or still holds an
    /// older DEK for a request.
    pub fn others_hold_retired(&self, active: u32) -> Result<bool, StoreError> {
        let me = self.0.node.as_ref().map_or(-1, |n| n.boot_id);
        let (active, lease) = (i64::from(active), NODE_LEASE.as_secs_f64());
        self.block(self.with(|conn| async move {
            conn.client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM nodes WHERE boot_id <> $1 \
                     AND seen_at > now() - make_interval(secs => $3) \
                     AND active_version <> -1 \
                     AND (active_version <> $2 OR holds_retired))",
                    &[&me, &active, &lease],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(classify)
        }))
    }

    /// Removes a card's CVC and returns it (its DEK version and sealed bytes) unless it had
    /// expired.
    pub async fn take_cvc(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<super::SealedBlob>, StoreError> {
        self.with_write(|conn| async move {
            let row = conn
                .client
                .query_opt(&conn.statements.cvc_take, &[&project, &id])
                .await
                .map_err(classify)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let version: i64 = row.try_get(0).map_err(classify)?;
            let live: bool = row.try_get(2).map_err(classify)?;
            if !live {
                return Ok(None);
            }
            Ok(Some((
                u32::try_from(version).map_err(|_| Malformed)?,
                row.try_get(1).map_err(classify)?,
            )))
        })
        .await
    }

    /// Deletes expired CVCs; returns how many.
    pub fn sweep_cvcs(&self) -> Result<u64, StoreError> {
        self.block(self.with(|conn| async move {
            conn.client
                .execute(
                    &format!("DELETE FROM cvcs WHERE expires_at <= {DB_MILLIS}"),
                    &[],
                )
                .await
                .map_err(classify)
        }))
    }

    /// Cards due at `now` in sweep order after `after`, at most `limit`, read through
    /// `cards_by_sweep`: the pages of [`super::Store::sweep_cards`].
    pub fn cards_due(
        &self,
        now: i64,
        after: Option<&super::SweepCursor>,
        limit: usize,
    ) -> Result<Vec<super::DueCard>, StoreError> {
        let (at, project, id) = after
            .cloned()
            .unwrap_or((i64::MIN, String::new(), String::new()));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.block(self.with(|conn| async move {
            let rows = conn
                .client
                .query(
                    "SELECT sweep_at, project, id, value FROM cards WHERE sweep_at <= $1 \
                     AND (sweep_at, project, id) > ($2, $3, $4) \
                     ORDER BY sweep_at, project, id LIMIT $5",
                    &[&now, &at, &project, &id, &limit],
                )
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let value: Vec<u8> = row.try_get(3).map_err(classify)?;
                    Ok(super::DueCard {
                        at: row.try_get(0).map_err(classify)?,
                        project: row.try_get(1).map_err(classify)?,
                        id: row.try_get(2).map_err(classify)?,
                        record: super::CardRecord::decode(&value).ok(),
                    })
                })
                .collect()
        }))
    }

    /// The planner's estimate of the rows in `cards` (no scan); 0 before the first
    /// autovacuum or ANALYZE of the table.
    pub fn count_cards(&self) -> Result<u64, StoreError> {
        self.block(self.with(|conn| async move {
            let row = conn
                .client
                .query_one(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = 'cards'::regclass",
                    &[],
                )
                .await
                .map_err(classify)?;
            let n: i64 = row.try_get(0).map_err(classify)?;
            Ok(u64::try_from(n).unwrap_or(0))
        }))
    }

    /// Stored CVCs sealed under another version than `active`: `(project, id, version,
    /// sealed)`, at most `limit`.
    pub fn cvcs_not_under(
        &self,
        active: u32,
        limit: i64,
    ) -> Result<Vec<super::SealedRow>, StoreError> {
        let active = i64::from(active);
        self.block(self.with(|conn| async move {
            let rows = conn
                .client
                .query(
                    "SELECT project, id, version, value FROM cvcs WHERE version <> $1 LIMIT $2",
                    &[&active, &limit],
                )
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let version: i64 = row.try_get(2).map_err(classify)?;
                    Ok((
                        row.try_get(0).map_err(classify)?,
                        row.try_get(1).map_err(classify)?,
                        u32::try_from(version).map_err(|_| Malformed)?,
                        row.try_get(3).map_err(classify)?,
                    ))
                })
                .collect()
        }))
    }

    /// Replaces a stored CVC's sealed bytes if they are still `old` (re-encryption); its
    /// expiry stays. `Ok(false)`: it was taken or changed meanwhile.
    pub fn reseal_cvc(
        &self,
        project: &str,
        id: &str,
        old: &[u8],
        version: u32,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let version = i64::from(version);
        self.block(self.with(|conn| async move {
            let n = conn
                .client
                .execute(
                    "UPDATE cvcs SET version = $3, value = $4 \
                     WHERE project = $1 AND id = $2 AND value = $5",
                    &[&project, &id, &version, &new, &old],
                )
                .await
                .map_err(classify)?;
            Ok(n == 1)
        }))
    }

    /// The DEK versions CVCs are sealed under.
    pub fn cvc_versions(&self) -> Result<Vec<u32>, StoreError> {
        self.block(self.with(|conn| async move {
            let rows = conn
                .client
                .query("SELECT DISTINCT version FROM cvcs", &[])
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let v: i64 = row.try_get(0).map_err(classify)?;
                    u32::try_from(v).map_err(|_| StoreError::Corrupt(Malformed))
                })
                .collect()
        }))
    }

    /// How many CVCs are held (live or not yet swept), for metrics.
    pub fn cvc_count(&self) -> Result<u64, StoreError> {
        self.block(self.with(|conn| async move {
            let n: i64 = conn
                .client
                .query_one("SELECT count(*) FROM cvcs", &[])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(classify)?;
            Ok(u64::try_from(n).unwrap_or(0))
        }))
    }

    /// Runs `call` to completion from blocking code: on the calling thread when it is outside
    /// any runtime (the key and sweeper threads, the CLI), else on a helper thread (a request
    /// handler doing a rare blocking store call must not block its runtime on this one).
    pub fn block<T: Send>(
        &self,
        call: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        block_on(&self.0.handle, BLOCKING.scope(true, call))
    }

    /// Runs `call` as a task nobody waits for.
    pub fn detach(&self, call: impl Future<Output = ()> + Send + 'static) {
        match tokio::runtime::Handle::try_current() {
            Ok(current) => drop(current.spawn(call)),
            Err(_) => drop(self.0.handle.spawn(call)),
        }
    }

    /// Runs `f` on a pooled connection of its own (for a transaction or a write), within the
    /// statement timeout; notes whether the database could be reached. A request handler takes
    /// it from its own thread's pool, run by that thread.
    async fn with_pooled<'a, T, F, Fut>(&'a self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(deadpool::managed::Object<Manager>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + 'a,
    {
        let pool = if on_request_thread() {
            self.local_pool()
        } else if matches!(BLOCKING.try_with(|b| *b), Ok(true)) {
            self.0.background.clone()
        } else {
            self.0.pool.clone()
        };
        self.bounded(async {
            let conn = pool.get().await.map_err(pool_error)?;
            f(conn).await
        })
        .await
    }

    /// Runs `f` on a connection for one statement (or a compare-and-swap's read and update):
    /// in a request handler, one this thread shares with its other requests (pipelined, run by
    /// this thread: no hand-off to another thread per query); elsewhere a pooled one.
    async fn with<'a, T, F, Fut>(&'a self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnRef) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + 'a,
    {
        if !on_request_thread() {
            return self.with_pooled(|conn| f(ConnRef::Pooled(conn))).await;
        }
        self.bounded(async {
            let conn = self.local_conn().await?;
            f(ConnRef::Shared(conn)).await
        })
        .await
    }

    /// Runs a write on a pooled connection: a write waits for its `COMMIT`'s WAL flush, which
    /// would hold up every statement queued behind it on a shared connection; on connections
    /// of their own, concurrent commits share flushes (PostgreSQL's group commit).
    async fn with_write<'a, T, F, Fut>(&'a self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnRef) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + 'a,
    {
        self.with_pooled(|conn| f(ConnRef::Pooled(conn))).await
    }

    /// This thread's pool of connections for writes, run by this thread.
    fn local_pool(&self) -> Pool<Manager> {
        let id = self.0.id;
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            local
                .entry(id)
                .or_insert_with(|| self.local_conns())
                .pool
                .clone()
        })
    }

    fn local_conns(&self) -> LocalConns {
        let mut manager = self.0.local.copy();
        manager.here = true;
        let pool = Pool::builder(manager)
            .max_size(self.0.local_pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .unwrap_or_else(|_| self.0.pool.clone());
        LocalConns {
            conns: vec![None; LOCAL_CONNECTIONS],
            next: 0,
            pool,
        }
    }

    /// One of this thread's shared connections, opened (on this thread) when missing or closed.
    async fn local_conn(&self) -> Result<Arc<Conn>, StoreError> {
        let id = self.0.id;
        let (slot, current) = LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let set = local.entry(id).or_insert_with(|| self.local_conns());
            let slot = set.next;
            set.next = (slot + 1) % LOCAL_CONNECTIONS;
            (slot, set.conns.get(slot).cloned().flatten())
        });
        if let Some(conn) = current.filter(|c| !c.client.is_closed()) {
            return Ok(conn);
        }
        let conn = Arc::new(self.0.local.create_here().await?);
        LOCAL.with(|local| {
            if let Some(set) = local.borrow_mut().get_mut(&id) {
                if let Some(entry) = set.conns.get_mut(slot) {
                    *entry = Some(Arc::clone(&conn));
                }
            }
        });
        Ok(conn)
    }

    /// `work` within the statement timeout; notes whether the database could be reached.
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.0.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Database(
                "no answer within the statement timeout".into(),
            )),
        };
        match &result {
            Err(StoreError::Database(_)) => self.0.up.store(false, Ordering::SeqCst),
            Ok(_) => self.0.up.store(true, Ordering::SeqCst),
            Err(_) => {}
        }
        result
    }

    pub async fn get<R: Codec>(
        &self,
        table: Table,
        project: &str,
        id: &str,
    ) -> Result<Option<R>, StoreError> {
        self.with(|conn| async move {
            let stmt = conn.statements.get(Op::Get, table)?;
            let row = conn
                .client
                .query_opt(stmt, &[&project, &id])
                .await
                .map_err(classify)?;
            match row {
                Some(row) => Ok(Some(R::decode(
                    row.try_get::<_, &[u8]>(0).map_err(classify)?,
                )?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Inserts a record that must not exist yet (see `embedded::insert_new`).
    pub async fn insert(
        &self,
        table: Table,
        project: &str,
        id: &str,
        value: Vec<u8>,
    ) -> Result<Ticket, StoreError> {
        self.with_write(|conn| async move {
            let stmt = conn.statements.get(Op::Insert, table)?;
            let n = conn
                .client
                .execute(stmt, &[&project, &id, &value])
                .await
                .map_err(classify)?;
            if n == 1 {
                Ok(Ticket::committed())
            } else {
                Err(StoreError::Corrupt(Malformed))
            }
        })
        .await
    }

    /// Compare-and-swap in a loop: read, decide, `UPDATE ... WHERE value = <what was read>`.
    pub async fn swap<R: Codec, E>(
        &self,
        table: Table,
        project: &str,
        id: &str,
        mut decide: impl FnMut(&R) -> Result<R, E>,
    ) -> Result<Swap<R, E>, StoreError> {
        loop {
            let decide = &mut decide;
            let step = self
                .with_write(|conn| async move {
                    let get = conn.statements.get(Op::Get, table)?;
                    let Some(row) = conn
                        .client
                        .query_opt(get, &[&project, &id])
                        .await
                        .map_err(classify)?
                    else {
                        return Ok(Some(Swap::Missing));
                    };
                    let current: Vec<u8> = row.try_get(0).map_err(classify)?;
                    let old = R::decode(&current)?;
                    let new = match decide(&old) {
                        Ok(new) => new.encode(),
                        Err(e) => return Ok(Some(Swap::Refused(e))),
                    };
                    let update = conn.statements.get(Op::Update, table)?;
                    let n = conn
                        .client
                        .execute(update, &[&project, &id, &new, &current])
                        .await
                        .map_err(classify)?;
                    Ok((n == 1).then(|| Swap::Swapped(old, Ticket::committed())))
                })
                .await?;
            if let Some(outcome) = step {
                return Ok(outcome);
            }
        }
    }

    /// [`Postgres::use_card_taking_cvc`] without the CVC (the unit test's view of it).
    #[cfg(test)]
    pub async fn use_card<E>(
        &self,
        project: &str,
        id: &str,
        now: i64,
        versions: &[u32],
        decide: impl FnMut(&super::CardRecord) -> Result<super::CardRecord, E>,
    ) -> Result<Swap<super::CardRecord, E>, StoreError> {
        Ok(self
            .use_card_taking_cvc(project, id, now, versions, decide)
            .await?
            .0)
    }

    /// [`super::Store::use_card_taking_cvc`] in one statement: the row is locked, checked and
    /// rewritten from its own bytes (flags, `used_at`, the PAN cut off) by PostgreSQL, which
    /// returns the bytes it held. The layout is `CardRecord`'s: format 1, flags, created,
    /// expires, used (8 bytes each), key version (4), metadata (4-byte length), PAN (4-byte
    /// length). When it used the card, the same statement takes its stored CVC: `Some(cvc)`
    /// then (`cvc` being `None` when there was none or it had expired); `None` when the CVC
    /// was not looked at (ask [`Postgres::take_cvc`]).
    #[allow(clippy::type_complexity)]
    pub async fn use_card_taking_cvc<E>(
        &self,
        project: &str,
        id: &str,
        now: i64,
        versions: &[u32],
        mut decide: impl FnMut(&super::CardRecord) -> Result<super::CardRecord, E>,
    ) -> Result<
        (
            Swap<super::CardRecord, E>,
            Option<Option<super::SealedBlob>>,
        ),
        StoreError,
    > {
        let versions: Vec<i64> = versions.iter().map(|v| i64::from(*v)).collect();
        let step = self
            .with_write(|conn| async move {
                let row = conn
                    .client
                    .query_opt(&conn.statements.use_card, &[&project, &id, &now, &versions])
                    .await
                    .map_err(classify)?;
                match row {
                    None => Ok(None),
                    Some(row) => {
                        let old: Vec<u8> = row.try_get(0).map_err(classify)?;
                        let used: bool = row.try_get(1).map_err(classify)?;
                        let version: Option<i64> = row.try_get(2).map_err(classify)?;
                        let sealed: Option<Vec<u8>> = row.try_get(3).map_err(classify)?;
                        let live: Option<bool> = row.try_get(4).map_err(classify)?;
                        let cvc = match (version, sealed, live) {
                            (Some(v), Some(sealed), Some(true)) => {
                                Some((u32::try_from(v).map_err(|_| Malformed)?, sealed))
                            }
                            _ => None,
                        };
                        Ok(Some((old, used, cvc)))
                    }
                }
            })
            .await?;
        let Some((old, used, cvc)) = step else {
            return Ok((Swap::Missing, None));
        };
        let record = super::CardRecord::decode(&old)?;
        if used {
            return Ok((Swap::Swapped(record, Ticket::committed()), Some(cvc)));
        }
        match decide(&record) {
            Err(refused) => Ok((Swap::Refused(refused), None)),
            // The statement's test and `decide` disagree (a record it does not read the same
            // way): the general compare-and-swap decides.
            Ok(_) => Ok((self.swap(Table::Cards, project, id, decide).await?, None)),
        }
    }

    /// Inserts a new card and its sealed CVC in one statement (see `CARD_WITH_CVC`).
    pub async fn insert_card_with_cvc(
        &self,
        project: &str,
        id: &str,
        value: Vec<u8>,
        (version, sealed, ttl): (u32, Vec<u8>, Duration),
    ) -> Result<Ticket, StoreError> {
        let version = i64::from(version);
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.with_write(|conn| async move {
            let n = conn
                .client
                .execute(
                    &conn.statements.card_with_cvc,
                    &[&project, &id, &value, &version, &ttl, &sealed],
                )
                .await
                .map_err(classify)?;
            if n == 1 {
                Ok(Ticket::committed())
            } else {
                Err(StoreError::Corrupt(Malformed))
            }
        })
        .await
    }

    /// Compare-and-swap of raw bytes, `None` meaning absent; `Ok(None)` when `old` is no longer
    /// what is stored.
    pub async fn swap_bytes(
        &self,
        table: Table,
        project: &str,
        id: &str,
        old: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Ticket>, StoreError> {
        self.with_write(|conn| async move {
            let s = &conn.statements;
            let c = &conn.client;
            let changed = match (&old, &new) {
                (None, Some(new)) => c
                    .execute(s.get(Op::Insert, table)?, &[&project, &id, new])
                    .await
                    .map_err(classify)?,
                (Some(old), Some(new)) => c
                    .execute(s.get(Op::Update, table)?, &[&project, &id, new, old])
                    .await
                    .map_err(classify)?,
                (Some(old), None) => c
                    .execute(s.get(Op::DeleteIf, table)?, &[&project, &id, old])
                    .await
                    .map_err(classify)?,
                (None, None) => {
                    let row = c
                        .query_opt(s.get(Op::Get, table)?, &[&project, &id])
                        .await
                        .map_err(classify)?;
                    u64::from(row.is_none())
                }
            };
            Ok((changed == 1).then(Ticket::committed))
        })
        .await
    }

    /// Applies a [`Batch`] in one transaction; `Ok(None)` when a checked record changed or
    /// the transaction lost a race.
    pub async fn commit(&self, batch: &Batch) -> Result<Option<Ticket>, StoreError> {
        // Locks are taken in one order, so two batches never wait on each other in a cycle.
        let mut checks: Vec<_> = batch.checks.iter().collect();
        checks.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let absent: Vec<(Space, &[u8])> = checks
            .iter()
            .filter(|c| c.2.is_none())
            .map(|c| (c.0, c.1.as_slice()))
            .collect();
        let mut locks = Vec::with_capacity(checks.len());
        for (space, k, expected) in checks {
            let (project, id) = split_key(k).ok_or(Malformed)?;
            if let Some(expected) = expected {
                locks.push((Table::of(*space), project, id, expected));
            }
        }
        let mut writes = Vec::with_capacity(batch.writes.len());
        for (space, k, value) in &batch.writes {
            let (project, id) = split_key(k).ok_or(Malformed)?;
            let op = match value {
                None => Op::Delete,
                Some(_) if absent.contains(&(*space, k.as_slice())) => Op::Insert,
                Some(_) => Op::Upsert,
            };
            writes.push((Table::of(*space), project, id, op, value));
        }
        self.with_pooled(|mut conn| async move {
            let conn = &mut *conn;
            let s = &conn.statements;
            let tx = conn.client.transaction().await.map_err(classify)?;
            let outcome: Result<bool, TxError> = async {
                for (table, project, id, expected) in &locks {
                    let row = tx
                        .query_opt(s.get(Op::Lock, *table)?, &[project, id])
                        .await?;
                    let current: Option<Vec<u8>> = row.map(|r| r.try_get(0)).transpose()?;
                    if current.as_ref() != Some(*expected) {
                        return Ok(false);
                    }
                }
                for (table, project, id, op, value) in &writes {
                    let stmt = s.get(*op, *table)?;
                    let n = match value {
                        Some(v) => tx.execute(stmt, &[project, id, v]).await?,
                        None => tx.execute(stmt, &[project, id]).await?,
                    };
                    if matches!(op, Op::Insert) && n != 1 {
                        // Expected absent, and a racing writer put it there.
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            .await;
            match outcome {
                Ok(true) => match tx.commit().await {
                    Ok(()) => Ok(Some(Ticket::committed())),
                    Err(e) if lost_race(&e) => Ok(None),
                    Err(e) => Err(classify(e)),
                },
                Ok(false) => {
                    tx.rollback().await.map_err(classify)?;
                    Ok(None)
                }
                // Dropping the transaction rolls it back.
                Err(TxError::Race) => Ok(None),
                Err(TxError::Store(e)) => Err(e),
            }
        })
        .await
    }

    /// Full scan of a table, a page at a time (blocking).
    pub fn entries<R: Codec + Send + 'static>(&self, table: Table) -> Entries<R> {
        Entries {
            pg: self.clone(),
            table,
            after: (String::new(), String::new()),
            buffer: VecDeque::new(),
            done: false,
            record: PhantomData,
        }
    }

    /// Full scan of a table as stored (blocking).
    pub fn raw_entries(&self, table: Table) -> Entries<Vec<u8>> {
        self.entries(table)
    }

    /// Inserts new card records of one project in one statement (the bench's fill; blocking).
    pub fn insert_cards(
        &self,
        project: &str,
        cards: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let ids: Vec<&str> = cards.iter().map(|(id, _)| id.as_str()).collect();
        let values: Vec<&[u8]> = cards.iter().map(|(_, value)| value.as_slice()).collect();
        self.block(self.with(|conn| async move {
            conn.client
                .execute(
                    "INSERT INTO cards (project, id, value) \
                     SELECT $1, * FROM UNNEST($2::text[], $3::bytea[])",
                    &[&project, &ids, &values],
                )
                .await
                .map_err(classify)?;
            Ok(())
        }))
    }

    pub fn put_raw(
        &self,
        table: Table,
        project: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.block(self.with(|conn| async move {
            conn.client
                .execute(
                    conn.statements.get(Op::Upsert, table)?,
                    &[&project, &id, &bytes],
                )
                .await
                .map_err(classify)?;
            Ok(())
        }))
    }

    pub fn reservations(&self) -> Result<Vec<(String, u32, u64)>, StoreError> {
        self.block(self.with(|conn| async move {
            let rows = conn
                .client
                .query("SELECT project, version, reserved FROM encryptions", &[])
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let project: String = row.try_get(0).map_err(classify)?;
                    let version: i64 = row.try_get(1).map_err(classify)?;
                    let reserved: i64 = row.try_get(2).map_err(classify)?;
                    Ok((
                        project,
                        u32::try_from(version).map_err(|_| Malformed)?,
                        u64::try_from(reserved).map_err(|_| Malformed)?,
                    ))
                })
                .collect()
        }))
    }

    /// How many other cardvault processes are connected to the database `settings` name.
    pub fn daemons_connected(settings: &PgSettings) -> Result<i64, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::Thread)?;
        let mut config = settings.client_config()?;
        config.application_name("cardvault-admin");
        let manager = Manager {
            config,
            tls: settings.tls()?,
            runtime: runtime.handle().clone(),
            here: false,
        };
        let count = runtime.block_on(async {
            let client = tokio::time::timeout(settings.statement_timeout, manager.connect())
                .await
                .map_err(|_| StoreError::Database("no answer".into()))??;
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'cardvault' AND datname = current_database()",
                    &[],
                )
                .await
                .map_err(classify)?;
            row.try_get::<_, i64>(0).map_err(classify)
        });
        runtime.shutdown_background();
        count
    }

    async fn page(
        &self,
        table: Table,
        after: &(String, String),
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        self.with(|conn| async move {
            let stmt = conn.statements.get(Op::Page, table)?;
            let rows = conn
                .client
                .query(stmt, &[&after.0, &after.1, &PAGE])
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(classify)
        })
        .await
    }

    /// Removes idempotency records created before `cutoff` (unix seconds).
    pub fn remove_idempotency_before(&self, cutoff: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        loop {
            // In slices, so no one transaction holds a day of keys' row locks.
            let n = self.block(self.with(|conn| async move {
                conn.client
                    .execute(
                        "DELETE FROM idempotency WHERE (project, id) IN \
                         (SELECT project, id FROM idempotency WHERE created_at < $1 LIMIT 5000)",
                        &[&cutoff],
                    )
                    .await
                    .map_err(classify)
            }))?;
            removed += usize::try_from(n).unwrap_or(usize::MAX);
            if n < 5000 {
                return Ok(removed);
            }
        }
    }

    async fn meta(&self, name: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|conn| async move {
            let row = conn
                .client
                .query_opt(&conn.statements.meta_get, &[&name])
                .await
                .map_err(classify)?;
            row.map(|r| r.try_get(0)).transpose().map_err(classify)
        })
        .await
    }

    pub fn wrapped_key(&self, project: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.block(async {
            self.with(|conn| async move {
                let row = conn
                    .client
                    .query_opt(
                        conn.statements.get(Op::Get, Table::Keys)?,
                        &[&project, &name],
                    )
                    .await
                    .map_err(classify)?;
                row.map(|r| r.try_get(0)).transpose().map_err(classify)
            })
            .await
        })
    }

    pub fn insert_wrapped_key(
        &self,
        project: &str,
        name: &str,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.block(self.swap_bytes(Table::Keys, project, name, None, Some(wrapped.to_vec())))?;
        self.wrapped_key(project, name)?
            .ok_or(StoreError::Corrupt(Malformed))
    }

    pub fn kek_check(&self) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let (check, id) =
            self.block(async { Ok((self.meta(KEK_CHECK).await?, self.meta(KEK_ID).await?)) })?;
        Ok(match (check, id) {
            (Some(check), Some(id)) => Some((check, String::from_utf8(id).map_err(|_| Malformed)?)),
            (Some(check), None) => Some((check, String::new())),
            _ => None,
        })
    }

    /// Writes store-wide values in one transaction.
    async fn put_meta(&self, values: &[(&'static str, &[u8])]) -> Result<(), StoreError> {
        self.with_pooled(|mut conn| async move {
            let conn = &mut *conn;
            let tx = conn.client.transaction().await.map_err(classify)?;
            for (name, value) in values {
                tx.execute(&conn.statements.meta_put, &[name, value])
                    .await
                    .map_err(classify)?;
            }
            tx.commit().await.map_err(classify)
        })
        .await
    }

    pub fn set_kek_check(&self, wrapped: &[u8], kek_id: &str) -> Result<(), StoreError> {
        self.block(self.put_meta(&[(KEK_CHECK, wrapped), (KEK_ID, kek_id.as_bytes())]))
    }

    pub fn wrapped_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let mut all = Vec::new();
        let mut after = (String::new(), String::new());
        loop {
            let page = self.block(self.page(Table::Keys, &after))?;
            let full = page.len() as i64 == PAGE;
            if let Some((p, n, _)) = page.last() {
                after = (p.clone(), n.clone());
            }
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    pub fn rewrap(
        &self,
        rewrapped: &[(String, String, Vec<u8>, Vec<u8>)],
        root: (Option<&[u8]>, &[u8]),
        check: &[u8],
        kek_id: &str,
        recovery: Option<super::MetaSwap<'_>>,
    ) -> Result<bool, StoreError> {
        self.block(self.with_pooled(|mut conn| async move {
            let conn = &mut *conn;
            let s = &conn.statements;
            let tx = conn.client.transaction().await.map_err(classify)?;
            let recovered = match recovery {
                None => true,
                Some((old, Some(new))) => swap_meta(&tx, RECOVERY_ROOT, old, new).await?,
                Some((Some(old), None)) => {
                    tx.execute(
                        "DELETE FROM meta WHERE name = $1 AND value = $2",
                        &[&RECOVERY_ROOT, &old],
                    )
                    .await
                    .map_err(classify)?
                        == 1
                }
                Some((None, None)) => tx
                    .query_opt(
                        "SELECT 1 FROM meta WHERE name = $1 FOR UPDATE",
                        &[&RECOVERY_ROOT],
                    )
                    .await
                    .map_err(classify)?
                    .is_none(),
            };
            if !recovered || !swap_meta(&tx, ROOT_KEY, root.0, root.1).await? {
                tx.rollback().await.map_err(classify)?;
                return Ok(false);
            }
            let lock = s.get(Op::Lock, Table::Keys)?;
            let update = s.get(Op::Update, Table::Keys)?;
            let mut sorted: Vec<_> = rewrapped.iter().collect();
            sorted.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            for (project, name, old, new) in sorted {
                let row = tx
                    .query_opt(lock, &[project, name])
                    .await
                    .map_err(classify)?;
                let current: Option<Vec<u8>> =
                    row.map(|r| r.try_get(0)).transpose().map_err(classify)?;
                if current.as_deref() != Some(old.as_slice()) {
                    tx.rollback().await.map_err(classify)?;
                    return Ok(false);
                }
                tx.execute(update, &[project, name, new, old])
                    .await
                    .map_err(classify)?;
            }
            let kek_id = kek_id.as_bytes();
            tx.execute(&s.meta_put, &[&KEK_CHECK, &check])
                .await
                .map_err(classify)?;
            tx.execute(&s.meta_put, &[&KEK_ID, &kek_id])
                .await
                .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            Ok(true)
        }))
    }

    pub fn remove_wrapped_key(&self, project: &str, name: &str) -> Result<(), StoreError> {
        self.block(self.with(|conn| async move {
            conn.client
                .execute(
                    conn.statements.get(Op::Delete, Table::Keys)?,
                    &[&project, &name],
                )
                .await
                .map_err(classify)?;
            Ok(())
        }))
    }

    pub fn dek_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.block(self.meta(DEK_STATE))
    }

    pub fn root_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.block(self.meta(ROOT_KEY))
    }

    pub fn recovery_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.block(self.meta(RECOVERY_ROOT))
    }

    /// Replaces the DEK state if it is still `old` (`None`: not written yet).
    pub fn swap_dek_state(&self, old: Option<&[u8]>, new: &[u8]) -> Result<bool, StoreError> {
        self.block(
            self.with(|conn| async move { swap_meta(&conn.client, DEK_STATE, old, new).await }),
        )
    }

    pub fn encryptions_reserved(&self, project: &str, version: u32) -> Result<u64, StoreError> {
        let version = i64::from(version);
        self.block(self.with(|conn| async move {
            let row = conn
                .client
                .query_opt(&conn.statements.reserved_get, &[&project, &version])
                .await
                .map_err(classify)?;
            let reserved: i64 = match row {
                Some(row) => row.try_get(0).map_err(classify)?,
                None => 0,
            };
            Ok(u64::try_from(reserved).unwrap_or(0))
        }))
    }

    /// Takes `block` more encryptions of a project's DEK version; returns the total taken by
    /// every node so far.
    pub fn reserve(&self, project: &str, version: u32, block: u64) -> Result<u64, StoreError> {
        let version = i64::from(version);
        let block = i64::try_from(block).map_err(|_| StoreError::Corrupt(Malformed))?;
        self.block(self.with(|conn| async move {
            let total: i64 = conn
                .client
                .query_one(&conn.statements.reserve, &[&project, &version, &block])
                .await
                .map_err(classify)?
                .try_get(0)
                .map_err(classify)?;
            Ok(u64::try_from(total).unwrap_or(0))
        }))
    }
}

/// Compare-and-swap of a `meta` row: `new` replaces `old` (`None`: the row must not exist
/// yet); `Ok(false)` when the row held something else.
async fn swap_meta(
    client: &impl GenericClient,
    name: &str,
    old: Option<&[u8]>,
    new: &[u8],
) -> Result<bool, StoreError> {
    let changed =
        match old {
            None => client
                .execute(
                    "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                    &[&name, &new],
                )
                .await,
            Some(old) => {
                client
                    .execute(
                        "UPDATE meta SET value = $2 WHERE name = $1 AND value = $3",
                        &[&name, &new, &old],
                    )
                    .await
            }
        }
        .map_err(classify)?;
    Ok(changed == 1)
}

/// See [`Postgres::block`].
fn block_on<T: Send>(
    handle: &tokio::runtime::Handle,
    call: impl Future<Output = Result<T, StoreError>> + Send,
) -> Result<T, StoreError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return handle.block_on(call);
    }
    std::thread::scope(|s| s.spawn(|| handle.block_on(call)).join())
        .unwrap_or_else(|_| Err(StoreError::Unavailable))
}

fn pool_error(e: managed::PoolError<StoreError>) -> StoreError {
    match e {
        managed::PoolError::Backend(e) => e,
        managed::PoolError::Timeout(_) => {
            StoreError::Database("no connection within the statement timeout".into())
        }
        other => StoreError::Database(other.to_string()),
    }
}

/// Creates or migrates the schema under an advisory lock, and records or checks the record
/// format (as the sled engine does in its `meta` tree).
async fn migrate(manager: &Manager) -> Result<(), StoreError> {
    let mut client = manager.connect().await?;
    let tx = client.transaction().await.map_err(classify)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(classify)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS cardvault_schema (version integer NOT NULL)")
        .await
        .map_err(classify)?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM cardvault_schema",
            &[],
        )
        .await
        .map_err(classify)?
        .try_get(0)
        .map_err(classify)?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(&with_constants(migration))
            .await
            .map_err(classify)?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("DELETE FROM cardvault_schema", &[])
            .await
            .map_err(classify)?;
        tx.execute(
            "INSERT INTO cardvault_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(classify)?;
    }
    let format_key = std::str::from_utf8(FORMAT_KEY).unwrap_or("format");
    let row = tx
        .query_opt(META_GET, &[&format_key])
        .await
        .map_err(classify)?;
    let found = match row {
        Some(row) => {
            let bytes: Vec<u8> = row.try_get(0).map_err(classify)?;
            u32::from_be_bytes(bytes.try_into().map_err(|_| Malformed)?)
        }
        None => 0,
    };
    if found > FORMAT {
        return Err(StoreError::TooNew { found });
    }
    if found < FORMAT {
        let bytes = FORMAT.to_be_bytes().to_vec();
        let params: [&(dyn ToSql + Sync); 2] = [&format_key, &bytes];
        tx.execute(META_PUT, &params).await.map_err(classify)?;
    }
    tx.commit().await.map_err(classify)
}

/// Opens the probe's own session. A node takes its name's lock there (a session-level
/// advisory lock: PostgreSQL drops it with the session, when the daemon dies or the database
/// restarts) and writes its row in `nodes`.
async fn probe_session(manager: &Manager, node: Option<&Node>) -> Result<Client, StoreError> {
    let client = manager.connect().await?;
    let Some(node) = node else {
        return Ok(client);
    };
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&NODE_LOCK, &node.name],
        )
        .await
        .map_err(classify)?;
    if !row.try_get::<_, bool>(0).map_err(classify)? {
        return Err(StoreError::InUse);
    }
    node.leader.store(false, Ordering::SeqCst);
    heartbeat(&client, node).await?;
    Ok(client)
}

/// Refreshes this node's row, counts the live nodes, and takes the leader lock if it is free.
async fn heartbeat(client: &Client, node: &Node) -> Result<(), StoreError> {
    let active = node.active_version.load(Ordering::SeqCst);
    let holds = node.holds_retired.load(Ordering::SeqCst);
    client
        .execute(
            "INSERT INTO nodes (boot_id, name, active_version, holds_retired) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (boot_id) DO UPDATE \
             SET seen_at = now(), active_version = EXCLUDED.active_version, \
                 holds_retired = EXCLUDED.holds_retired",
            &[&node.boot_id, &node.name, &active, &holds],
        )
        .await
        .map_err(classify)?;
    let lease = NODE_LEASE.as_secs_f64();
    let live: i64 = client
        .query_one(
            "SELECT count(*) FROM nodes WHERE seen_at > now() - make_interval(secs => $1)",
            &[&lease],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(classify)?;
    node.live
        .store(usize::try_from(live).unwrap_or(1).max(1), Ordering::SeqCst);
    if !node.leader.load(Ordering::SeqCst) {
        let won: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(classify)?;
        if won {
            tracing::info!(node = %node.name, "this node now runs the background work");
        }
        node.leader.store(won, Ordering::SeqCst);
    }
    // Rows of nodes gone for a day: nothing refers to them any more.
    client
        .execute(
            "DELETE FROM nodes WHERE seen_at < now() - interval '1 day'",
            &[],
        )
        .await
        .map_err(classify)?;
    Ok(())
}

/// Every second, on a session of its own: a node's heartbeat (see [`heartbeat`]), or a plain
/// `SELECT 1`, so that health answers 503 while the database is away even when no request
/// comes. After the session is lost it opens another (taking the name's lock again); losing
/// the session loses the leader lock with it, so the node stops leading at once.
async fn probe(
    pool: Pool<Manager>,
    manager: Manager,
    mut session: Option<Client>,
    up: Arc<AtomicBool>,
    timeout: Duration,
    node: Option<Arc<Node>>,
) {
    let mut refused = false;
    loop {
        let reached = tokio::time::timeout(timeout, async {
            if session.as_ref().is_none_or(Client::is_closed) {
                match probe_session(&manager, node.as_deref()).await {
                    Ok(client) => {
                        refused = false;
                        session = Some(client);
                        return true;
                    }
                    Err(StoreError::InUse) => {
                        if !refused {
                            tracing::error!("{}", StoreError::InUse);
                            refused = true;
                        }
                        return false;
                    }
                    Err(_) => return false,
                }
            }
            match (&session, &node) {
                (Some(client), Some(node)) => heartbeat(client, node).await.is_ok(),
                (Some(client), None) => client.simple_query("SELECT 1").await.is_ok(),
                (None, _) => false,
            }
        })
        .await
        .unwrap_or(false);
        if !reached {
            session = None;
            if let Some(node) = &node {
                if node.leader.swap(false, Ordering::SeqCst) {
                    tracing::warn!(
                        "lost the database session: no longer running the background work"
                    );
                }
            }
        }
        up.store(reached, Ordering::SeqCst);
        if pool.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A blocking full scan of one table, [`PAGE`] rows per query.
pub struct Entries<R> {
    pg: Postgres,
    table: Table,
    after: (String, String),
    buffer: VecDeque<(String, String, Vec<u8>)>,
    done: bool,
    record: PhantomData<fn() -> R>,
}

impl<R: Codec> Iterator for Entries<R> {
    type Item = Result<(String, String, R), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffer.is_empty() && !self.done {
            match self.pg.block(self.pg.page(self.table, &self.after)) {
                Ok(rows) => {
                    self.done = (rows.len() as i64) < PAGE;
                    if let Some((project, id, _)) = rows.last() {
                        self.after = (project.clone(), id.clone());
                    }
                    self.buffer.extend(rows);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        let (project, id, value) = self.buffer.pop_front()?;
        Some(
            R::decode(&value)
                .map(|record| (project, id, record))
                .map_err(StoreError::from),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CardRecord, IdempotencyRecord, Store};

    /// A store on a throwaway cluster in `dir`, or `None` where PostgreSQL is not installed
    /// (and not required).
    fn store(dir: &std::path::Path) -> Option<(crate::throwaway::Cluster, Store)> {
        if crate::throwaway::bin_dir().is_none() {
            assert!(std::env::var_os("CARDVAULT_REQUIRE_POSTGRES").is_none());
            return None;
        }
        let cluster = crate::throwaway::Cluster::start(dir).unwrap();
        let settings = PgSettings {
            url: cluster.url(),
            password_file: None,
            pool_size: 4,
            ca: None,
            cert: None,
            key: None,
            statement_timeout: Duration::from_secs(5),
        };
        let store = Store::Postgres(Postgres::open(&settings, None).unwrap());
        Some((cluster, store))
    }

    fn card(expires_at: i64, version: u32) -> CardRecord {
        CardRecord {
            created_at: 1_700_000_000,
            expires_at,
            used_at: None,
            key_version: version,
            meta: vec![7; 300],
            pan: Some(vec![9; 44]),
        }
    }

    fn engine(store: &super::super::Store) -> &Postgres {
        match store {
            super::super::Store::Postgres(pg) => pg,
            super::super::Store::Sled(_) => unreachable!("a PostgreSQL store"),
        }
    }

    /// The generated `sweep_at` column reads every kind of card record as
    /// `CardRecord::sweep_at` does; `cards_due` pages through the due ones in order; the
    /// idempotency sweep deletes by the generated `created_at`, old records only.
    #[test]
    fn sweeps_read_the_generated_columns_as_the_records_say() {
        let dir = std::env::temp_dir().join(format!("cardvault-pg-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let Some((_cluster, store)) = store(&dir) else {
            return;
        };
        let now = 1_800_000_000;
        let used = |used_at| CardRecord {
            used_at: Some(used_at),
            pan: None,
            ..card(now + 50, 3)
        };
        let cases = [
            ("a-live", card(now + 100, 3)),
            ("b-expired", card(now - 100, 3)),
            ("c-used", used(now - 10)),
            (
                "d-expired-tombstone",
                CardRecord {
                    pan: None,
                    ..card(now - 200, 3)
                },
            ),
            (
                "e-old-tombstone",
                used(now - super::super::TOMBSTONE_RETENTION_SECS - 1),
            ),
        ];
        for (id, record) in &cases {
            let _ = store.wait(store.insert_card("p", id, record)).unwrap();
        }
        for i in 0..50 {
            let _ = store
                .wait(store.insert_card("q", &format!("x{i}"), &card(now + 1, 3)))
                .unwrap();
        }
        let all = engine(&store).cards_due(i64::MAX, None, 100).unwrap();
        assert_eq!(all.len(), cases.len() + 50);
        for (id, record) in &cases {
            let due = all.iter().find(|d| d.id == *id).unwrap();
            assert_eq!(due.at, record.sweep_at(), "{id}");
            assert_eq!(due.record.as_ref(), Some(record), "{id}");
        }
        // Due now: the expired one and the old tombstone, in order, one page at a time.
        let first = engine(&store).cards_due(now, None, 1).unwrap();
        assert_eq!(first[0].id, "b-expired");
        let cursor = (first[0].at, first[0].project.clone(), first[0].id.clone());
        let rest = engine(&store).cards_due(now, Some(&cursor), 10).unwrap();
        let ids: Vec<_> = rest.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["e-old-tombstone"]);
        // A change of the record moves its column with it.
        let _ = store
            .wait(store.swap_card("p", "b-expired", |c| {
                Ok::<_, ()>(CardRecord {
                    pan: None,
                    ..c.clone()
                })
            }))
            .unwrap();
        let ids: Vec<_> = engine(&store)
            .cards_due(now, None, 10)
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, ["e-old-tombstone"]);

        let claim = |created_at| IdempotencyRecord {
            created_at,
            request_digest: vec![1; 32],
            owner: 1,
            response: None,
        };
        for (scope, created) in [("a", 100), ("b", 200), ("c", 300)] {
            let _ = store
                .wait(store.swap_idempotency("p", scope, None, Some(&claim(created))))
                .unwrap();
        }
        assert_eq!(store.remove_idempotency_before(250).unwrap(), 2);
        assert!(store.wait(store.idempotency("p", "c")).unwrap().is_some());
        assert_eq!(store.remove_idempotency_before(250).unwrap(), 0);
        store.close().unwrap();
        drop(store);
        drop(_cluster);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The one-statement use of a card token writes exactly the bytes the vault's own rule
    /// makes (used at `now`, PAN gone), and refuses (leaving the record as it was) exactly
    /// where that rule refuses: used, expired, or sealed under a version the caller cannot
    /// open; `decide` then only names the refusal.
    #[test]
    fn the_one_statement_card_use_matches_the_vault_rule() {
        let dir = std::env::temp_dir().join(format!("cardvault-pg-use-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let Some((_cluster, store)) = store(&dir) else {
            return;
        };
        let Store::Postgres(pg) = &store else {
            unreachable!()
        };
        let now = 1_800_000_000;
        let rule = |r: &CardRecord| {
            if r.used_at.is_some() {
                return Err("used");
            }
            if r.expires_at <= now || r.pan.is_none() {
                return Err("expired");
            }
            if r.key_version != 3 && r.key_version != 70_000 {
                return Err("version");
            }
            Ok(CardRecord {
                used_at: Some(now),
                pan: None,
                ..r.clone()
            })
        };
        let cases = [
            ("live", card(now + 1, 3), None),
            ("big-version", card(now + 1, 70_000), None),
            ("expired", card(now, 3), Some("expired")),
            ("other-version", card(now + 1, 4), Some("version")),
        ];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (id, record, refusal) in cases {
            let _ = store.wait(store.insert_card("p", id, &record)).unwrap();
            let mut asked = 0;
            let outcome = runtime
                .block_on(pg.use_card("p", id, now, &[3, 70_000], |r| {
                    asked += 1;
                    rule(r)
                }))
                .unwrap();
            let stored = store.wait(store.card("p", id)).unwrap().unwrap();
            match (outcome, refusal) {
                (Swap::Swapped(old, _), None) => {
                    assert_eq!(old, record, "{id}");
                    assert_eq!(stored, rule(&record).unwrap(), "{id}");
                    assert_eq!(stored.encode(), rule(&record).unwrap().encode(), "{id}");
                    assert_eq!(asked, 0, "{id}: decided in Rust, not in the statement");
                }
                (Swap::Refused(why), Some(expected)) => {
                    assert_eq!(why, expected, "{id}");
                    assert_eq!(stored, record, "{id}: a refused use changed the record");
                }
                (_, expected) => panic!("{id}: expected {expected:?}"),
            }
        }
        // Used once: the second use is refused as used.
        let again = runtime
            .block_on(pg.use_card("p", "live", now, &[3], rule))
            .unwrap();
        assert!(matches!(again, Swap::Refused("used")));
        let missing = runtime
            .block_on(pg.use_card("p", "none", now, &[3], rule))
            .unwrap();
        assert!(matches!(missing, Swap::Missing));
        store.close().unwrap();
        drop(store);
        drop(_cluster);
        let _ = std::fs::remove_dir_all(dir);
    }
}
