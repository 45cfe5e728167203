//! Assembles the daemon: policy, TLS, KEK, store, vault, and the HTTP server over rustls.
//!
//! [`Application::build`] does every check that can refuse a start and binds the listener
//! (port 0 works, which is how tests get a free port); [`Application::run`] serves until
//! SIGINT/SIGTERM, drains connections, then flushes and closes the store. There is no
//! plaintext listener: the one listener accepts TCP only to run a rustls handshake on it
//! ([`handshake`]), and only a completed handshake reaches HTTP. A failed one is a log line.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use actix_http::{HttpService, Protocol};
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::{AppConfig, Extensions};
use actix_web::rt::net::TcpStream;
use actix_web::{middleware, web, App};
use tokio_rustls::server::TlsStream;

use crate::api::{self, AppState};
use crate::audit::file::{AuditKey, FileSink, KEY_FILE as AUDIT_KEY_FILE};
use crate::audit::{Actor, AuditError, FileAndLog};
use crate::config::Config;
use crate::crypto::custody::Custody;
use crate::crypto::{CryptoError, DevKey, DEV_KEY_FILE};
use crate::forward::receivers::ReceiversError;
use crate::forward::Receivers;
use crate::policy::{Policy, PolicyError};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};
use crate::vault::{KeySource, Vault, VaultError, VaultSettings};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Receivers(#[from] ReceiversError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("key-encryption key: {0}")]
    Kek(#[from] CryptoError),
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0} (is another cardvault running on this data_dir?)")]
    SledStore(StoreError),
    #[error("{0}")]
    StoreRefused(StoreError),
    #[error("the config has problems (`cardvault check` lists the same):\n  {}", .0.join("\n  "))]
    Check(Vec<String>),
    #[error("the key-encryption key does not open this store ({0}); wrong keys_dir?")]
    WrongKek(VaultError),
    #[error("keys_dir {0}")]
    Keys(String),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("opening the vault: {0}")]
    Vault(VaultError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// On `SIGHUP`: the server certificate, client CA, CRLs, policies and receivers are loaded again from
/// the paths the config names, and swapped in together, or not at all (the log says why).
/// Established connections keep their session; new handshakes use the new files.
fn spawn_reloader(
    mut hangup: tokio::signal::unix::Signal,
    config: Config,
    tls: Arc<tls::TlsState>,
    state: web::Data<AppState>,
) {
    actix_web::rt::spawn(async move {
        while hangup.recv().await.is_some() {
            let outcome = reload(&config, &tls, &state);
            match &outcome {
                Ok(()) => tracing::info!("reloaded certificates, CRLs, policies and receivers"),
                Err(why) => {
                    tracing::error!(error = %why, "reload refused; the previous configuration stays in force")
                }
            }
            let result = outcome.map_err(|_| VaultError::ReloadRefused);
            if let Err(e) = state
                .vault
                .audit_event(Actor::system(), "daemon.reload", &result)
            {
                tracing::error!(error = %e, "the reload could not be audited");
            }
        }
    });
}

/// What a reload reads: the config file again (so `[tls]` paths, a CRL turned on or off, and
/// `policies` may change), then the files it names. Other settings take effect at a restart.
fn reload(config: &Config, tls: &tls::TlsState, state: &AppState) -> Result<(), String> {
    let current = match &config.source {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => config.clone(),
    };
    let policy = Policy::load(&current.policies).map_err(|e| e.to_string())?;
    let receivers = load_receivers(&current).map_err(|e| e.to_string())?;
    tls.reload(&current.tls.paths())
        .map_err(|e| e.to_string())?;
    *state.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    *state.receivers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(receivers);
    Ok(())
}

/// The receivers the config names, or none.
fn load_receivers(config: &Config) -> Result<Receivers, ReceiversError> {
    match &config.receivers {
        Some(path) => Receivers::load(path),
        None => Ok(Receivers::none()),
    }
}

/// At start and then once a day: a warning for each certificate (server, client CA) or CRL
/// that runs out within 30 days, an error for one that has run out. An expired server
/// certificate or CRL stops every handshake, so these come early and every day.
fn spawn_expiry_warnings(tls: Arc<tls::TlsState>) {
    actix_web::rt::spawn(async move {
        loop {
            for (deadline, days_left) in tls.expiring(crate::vault::unix_now()) {
                let at = crate::vault::rfc3339(deadline.at);
                if days_left < 0 {
                    tracing::error!(what = %deadline.what, at, "TLS material has run out");
                } else {
                    tracing::warn!(what = %deadline.what, days_left, at, "TLS material runs out soon");
                }
            }
            actix_web::rt::time::sleep(std::time::Duration::from_secs(86_400)).await;
        }
    });
}

/// The audit file (its folder made 0700 if missing) and its key from `keys_dir`.
/// The audit trail, and the lock held on its log while the daemon runs.
fn open_audit(config: &Config) -> Result<(FileAndLog, std::fs::File), StartupError> {
    if let Some(dir) = config.audit_path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| AuditError(format!("cannot create {}: {e}", dir.display())))?;
    }
    let key = AuditKey::load(&config.keys_dir.join(AUDIT_KEY_FILE)).map_err(|e| {
        AuditError(format!(
            "{}; `cardvault keys init` makes the audit key",
            e.0
        ))
    })?;
    let lock = crate::audit::file::lock(&config.audit_path)?;
    let sink = FileSink::open(&config.audit_path, key)?;
    sink.set_node(&config.node);
    sink.set_rotation(config.audit_rotate_bytes);
    if config.audit_compress {
        sink.set_compression()?;
    }
    Ok((FileAndLog(sink), lock))
}

/// Where the KEK comes from: custodian shares (the vault starts sealed), a PKCS#11 device
/// (`[kek] backend = "pkcs11"`: the vault unseals itself, the custodians' shares rebuild the
/// recovery KEK), or the insecure dev key when the config allows it. Of the custodian folders
/// (`custodians/`, and `custodians.next/` left by a rekey that switched the store but not yet
/// the folders), the one for a KEK the store is under is used.
fn key_source(config: &Config, store_keks: &[String]) -> Result<KeySource, StartupError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config.keys_dir)
        .map_err(|e| StartupError::Keys(format!("{}: {e}", config.keys_dir.display())))?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(StartupError::Keys(format!(
            "{} is accessible to others (mode {:o}); run chmod o-rwx on it",
            config.keys_dir.display(),
            mode & 0o777
        )));
    }
    let dev_key = config.keys_dir.join(DEV_KEY_FILE);
    let candidates: Vec<Custody> = crate::crypto::custody::custody_dirs(&config.keys_dir)
        .iter()
        .map(|dir| Custody::load(dir))
        .collect::<Result<_, _>>()?;
    if !candidates.is_empty() && dev_key.exists() {
        return Err(StartupError::Keys(format!(
            "{} holds custodian shares and an insecure dev key: remove the dev key",
            config.keys_dir.display()
        )));
    }
    let chosen = match store_keks {
        [] => candidates.first(),
        ids => candidates.iter().find(|c| ids.contains(&c.kek_id)),
    };
    if let crate::crypto::seal::Backend::Pkcs11(settings) = &config.kek {
        let Some(recovery) = chosen else {
            return Err(StartupError::Keys(format!(
                "{}: the pkcs11 backend needs the custodians' recovery custody \
                 (custodians/kek.json{}); `cardvault keys init` makes it",
                config.keys_dir.display(),
                if candidates.is_empty() {
                    String::new()
                } else {
                    format!(", for one of {}", store_keks.join(" and "))
                }
            )));
        };
        tracing::info!(token = %settings.token_label, key = %settings.key_label, recovery = %recovery.kek_id, "KEK held by an HSM; custodians hold the recovery KEK");
        return Ok(KeySource::Hsm {
            settings: settings.clone(),
            recovery: Some(recovery.clone()),
        });
    }
    if !candidates.is_empty() {
        return match chosen {
            Some(custody) => {
                tracing::info!(kek = %custody.kek_id, threshold = custody.threshold, custodians = custody.custodians.len(), "KEK held by custodians");
                Ok(KeySource::Custody(custody.clone()))
            }
            None => Err(StartupError::Keys(format!(
                "{}: the custodian shares are for {}, but this store is under {}",
                config.keys_dir.display(),
                candidates
                    .iter()
                    .map(|c| c.kek_id.as_str())
                    .collect::<Vec<_>>()
                    .join(" and "),
                store_keks.join(" and ")
            ))),
        };
    }
    if dev_key.exists() {
        if !config.insecure_dev_key {
            return Err(StartupError::Keys(format!(
                "{} holds only the INSECURE dev key; production needs custodian shares \
                 (`cardvault keys init --custodians ...`). Set insecure_dev_key = true only \
                 outside production",
                config.keys_dir.display()
            )));
        }
        tracing::warn!("running on the INSECURE dev key: one file holds the whole KEK; never use this with real cards");
        return Ok(KeySource::Dev(Box::new(DevKey::load(&dev_key)?)));
    }
    Err(StartupError::Keys(format!(
        "{} holds no key: run `cardvault keys init --config FILE --custodians NAMES --threshold K`",
        config.keys_dir.display()
    )))
}

/// Handshakes running at once per worker, past which accepted connections wait their turn
/// (a flood of slow handshakes cannot take every worker's memory).
const HANDSHAKES_PER_WORKER: usize = 256;

/// The HTTP server over the listener: each accepted connection runs a rustls handshake
/// ([`handshake`]); a completed one gets its [`Peer`](crate::policy::Peer) from the verified
/// certificate ([`on_connect`]) and is served by the app; a failed one is logged and closed.
///
/// Assembled from actix's parts rather than `HttpServer::listen_rustls_0_23`, whose acceptor
/// drops handshake errors unseen. The settings are `HttpServer`'s defaults.
fn serve(
    config: &Config,
    listener: TcpListener,
    tls_config: rustls::ServerConfig,
    state: web::Data<AppState>,
    generation: Arc<tls::TlsState>,
) -> std::io::Result<actix_web::dev::Server> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));
    let failures = Arc::new(tls::HandshakeLog::default());
    // The daemon's own handlers stop it (`Application::run`): actix's are installed by a task
    // after the listener is up, so a signal in between would kill the process.
    let mut builder = actix_server::Server::build()
        .shutdown_timeout(10)
        .disable_signals();
    if let Some(workers) = config.workers {
        builder = builder.workers(workers);
    }
    let graceful = builder.graceful_shutdown_signal();
    let builder = builder.listen("cardvault", listener, move || {
        let app = App::new()
            .app_data(state.clone())
            .wrap(middleware::from_fn(api::log_request))
            .configure(api::configure)
            .into_factory()
            .map_err(|e| e.error_response());
        let generation = Arc::clone(&generation);
        let graceful = graceful.clone();
        let http = HttpService::build()
            .client_request_timeout(std::time::Duration::from_secs(5))
            .client_disconnect_timeout(std::time::Duration::from_secs(1))
            .graceful_shutdown_signal(move || {
                let graceful = graceful.clone();
                async move { graceful.notified().await }
            })
            .on_connect_ext(move |io: &TlsStream<TcpStream>, ext: &mut Extensions| {
                on_connect(io, ext, &generation)
            })
            // The app reads neither the scheme nor the host from its config.
            .finish(map_config(app, |()| AppConfig::default()));
        let acceptor = acceptor.clone();
        let failures = Arc::clone(&failures);
        let turns = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PER_WORKER));
        fn_service(move |tcp: TcpStream| {
            handshake(
                tcp,
                acceptor.clone(),
                Arc::clone(&failures),
                Arc::clone(&turns),
            )
        })
        .and_then(http.map_err(|_| ()))
    })?;
    Ok(builder.run())
}

/// Runs the TLS handshake on an accepted connection, within [`tls::HANDSHAKE_TIMEOUT`]. A
/// failure (no certificate, unknown CA, expired, revoked, bad protocol, timeout) is one log
/// line with the peer's address and the reason, rate-limited by [`tls::HandshakeLog`].
async fn handshake(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    failures: Arc<tls::HandshakeLog>,
    turns: Arc<tokio::sync::Semaphore>,
) -> Result<(TlsStream<TcpStream>, Protocol, Option<SocketAddr>), ()> {
    let peer = tcp.peer_addr().ok();
    // Small requests and replies: no Nagle delay (as HttpServer's rustls acceptor does).
    let _ = tcp.set_nodelay(true);
    // The timeout runs from the accept and covers the wait for a turn: a flood of idle
    // connections is closed after it instead of queueing (each holding a file descriptor).
    let accepted = async {
        let _turn = turns
            .acquire_owned()
            .await
            .map_err(|_| std::io::Error::other("shutting down"))?;
        acceptor.accept(tcp).await
    };
    let outcome = match tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, accepted).await {
        Ok(accepted) => accepted,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    };
    match outcome {
        Ok(io) => Ok((io, Protocol::Http1, peer)),
        Err(e) => {
            crate::metrics::handshake_failed();
            failures.failed(peer, &e);
            Err(())
        }
    }
}

/// Runs once per connection, after the handshake verified the client certificate: the
/// [`Peer`](crate::policy::Peer) it names goes into the connection's data for every request.
fn on_connect(stream: &TlsStream<TcpStream>, extensions: &mut Extensions, tls: &tls::TlsState) {
    let (tcp, session) = stream.get_ref();
    let chain = session.peer_certificates().unwrap_or_default();
    let Some(mut peer) = tls::peer_from_chain(chain) else {
        // Verified, but not a client certificate: requests are refused, and audited.
        if let Some(mut refused) = tls::refused_peer(chain) {
            refused.address = tcp.peer_addr().ok();
            extensions.insert(api::NoClientAuth(refused));
        }
        return;
    };
    peer.address = tcp.peer_addr().ok();
    // Verified by the handshake, under the configuration in force now unless a reload came
    // during it.
    peer.trusted_under = std::sync::atomic::AtomicU64::new(tls.generation_for_new_connection());
    // When the chain must be verified again: an intermediate's or a CRL's expiry.
    tls.stamp(&peer);
    extensions.insert(Arc::new(peer));
}

pub struct Application {
    server: actix_web::dev::Server,
    addr: SocketAddr,
    vault: Arc<Vault>,
    /// SIGTERM and SIGINT, listened for from the start.
    stop_signals: [tokio::signal::unix::Signal; 2],
    /// Held while the daemon runs (see `audit::file::lock`).
    _audit_lock: std::fs::File,
}

impl Application {
    pub fn build(config: &Config) -> Result<Application, StartupError> {
        // First: a SIGHUP during startup must not kill the daemon (its default action), and a
        // SIGTERM or SIGINT from the moment it says it listens must stop it cleanly.
        let listen = |kind| {
            tokio::signal::unix::signal(kind).map_err(|source| StartupError::Bind {
                addr: config.listen,
                source,
            })
        };
        use tokio::signal::unix::SignalKind;
        let hangup = listen(SignalKind::hangup())?;
        let stop_signals = [
            listen(SignalKind::terminate())?,
            listen(SignalKind::interrupt())?,
        ];
        // Everything `cardvault check` finds stops the start, all of it said at once.
        let found = crate::check::run(config);
        for warning in &found.warnings {
            tracing::warn!(warning = %warning, "config check");
        }
        if !found.problems.is_empty() {
            return Err(StartupError::Check(found.problems));
        }
        let policy = Arc::new(Policy::load(&config.policies)?);
        let receivers = Arc::new(load_receivers(config)?);
        if !receivers.is_empty() {
            tracing::info!(receivers = receivers.len(), "receivers loaded");
        }
        let tls_config = tls::server_config(&config.tls.paths())?;
        if let Some(data_dir) = config.data_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(|source| StartupError::DataDir {
                    path: data_dir.display().to_string(),
                    source,
                })?;
        }
        let store = Store::open_node(&config.store, &config.node).map_err(|e| match e {
            StoreError::TooNew { .. }
            | StoreError::SchemaTooNew { .. }
            | StoreError::Database(_)
            | StoreError::Query(_)
            | StoreError::InUse => StartupError::StoreRefused(e),
            e @ StoreError::Sled(_) => StartupError::SledStore(e),
            other => StartupError::Store(other),
        })?;
        tracing::info!(engine = store.engine(), "store open");
        let store_keks = crate::vault::store_kek_ids(&store).map_err(StartupError::Vault)?;
        let source = key_source(config, &store_keks)?;
        let settings = VaultSettings::from(config);
        let (audit, audit_lock) = open_audit(config)?;
        let vault = Vault::open(store, source, settings, Box::new(audit)).map_err(|e| match e {
            VaultError::Keys(_) | VaultError::WrongKek(_) => StartupError::WrongKek(e),
            other => StartupError::Vault(other),
        })?;
        vault
            .audit_event(Actor::system(), "daemon.start", &Ok::<(), VaultError>(()))
            .map_err(StartupError::Vault)?;
        if vault.is_sealed() {
            match &config.kek {
                crate::crypto::seal::Backend::Pkcs11(_) => tracing::warn!(
                    "the vault is SEALED: the HSM did not unseal it (the log above says why); it \
                     tries again with backoff, and k custodians can unseal it with their \
                     recovery shares (`cardvault unseal`)"
                ),
                crate::crypto::seal::Backend::Shamir => {
                    tracing::warn!("the vault is SEALED: k custodians must run `cardvault unseal`")
                }
            }
        }

        let listener = TcpListener::bind(config.listen).map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        let (tls_config, tls_state) = tls_config;
        let state = web::Data::new(AppState {
            vault: Arc::clone(&vault),
            policy: std::sync::RwLock::new(policy),
            limits: crate::limits::Limiter::default(),
            tls: Arc::clone(&tls_state),
            config: config.clone(),
            receivers: std::sync::RwLock::new(receivers),
        });
        let generation = Arc::clone(&tls_state);
        spawn_expiry_warnings(Arc::clone(&tls_state));
        spawn_reloader(hangup, config.clone(), tls_state, state.clone());
        let server = serve(config, listener, tls_config, state, generation).map_err(|source| {
            StartupError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        Ok(Application {
            server,
            addr,
            vault,
            stop_signals,
            _audit_lock: audit_lock,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until a shutdown signal, then flushes and closes the store.
    pub async fn run(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let [mut terminate, mut interrupt] = self.stop_signals;
        actix_web::rt::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("stopping: draining connections");
            handle.stop(true).await;
        });
        tracing::info!(address = %self.addr, "listening on https://{}", self.addr);
        let served = self.server.await;
        if let Err(e) =
            self.vault
                .audit_event(Actor::system(), "daemon.stop", &Ok::<(), VaultError>(()))
        {
            tracing::error!(error = %e, "the stop could not be audited");
        }
        if let Err(e) = self.vault.close() {
            tracing::error!(error = %e, "closing the store failed");
        }
        tracing::info!("stopped");
        served
    }
}
