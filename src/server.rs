//! Assembles the daemon: policy, TLS, KEK, store, vault, and the HTTP server over rustls.
//!
//! [`Application::build`] does every check that can refuse a start and binds the listener
//! (port 0 works, which is how tests get a free port); [`Application::run`] serves until
//! SIGINT/SIGTERM, drains connections, then flushes and closes the store. There is no
//! plaintext listener: the only bind is `listen_rustls_0_23`.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::rt::net::TcpStream;
use actix_web::{middleware, web, App, HttpServer};

use crate::api::{self, AppState};
use crate::audit::file::{AuditKey, FileSink, KEY_FILE as AUDIT_KEY_FILE};
use crate::audit::{Actor, AuditError, FileAndLog};
use crate::config::Config;
use crate::crypto::custody::{Custody, CUSTODIANS_DIR, NEXT_CUSTODIANS_DIR};
use crate::crypto::{CryptoError, DevKey, DEV_KEY_FILE};
use crate::policy::{Policy, PolicyError};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};
use crate::vault::{KeySource, Vault, VaultError, VaultSettings};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("key-encryption key: {0}")]
    Kek(#[from] CryptoError),
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} (is another cardvault running on this data_dir?)")]
    Store(#[from] StoreError),
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

/// On `SIGHUP`: the server certificate, client CA, CRLs and policies are loaded again from
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
                Ok(()) => tracing::info!("reloaded certificates, CRLs and policies"),
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

fn reload(config: &Config, tls: &tls::TlsState, state: &AppState) -> Result<(), String> {
    let policy = Policy::load(&config.policies).map_err(|e| e.to_string())?;
    tls.reload(&config.tls.paths()).map_err(|e| e.to_string())?;
    *state.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    Ok(())
}

/// The audit file (its folder made 0700 if missing) and its key from `keys_dir`.
fn open_audit(config: &Config) -> Result<FileAndLog, StartupError> {
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
    Ok(FileAndLog(FileSink::open(&config.audit_path, key)?))
}

/// Where the KEK comes from: custodian shares (the vault starts sealed), or the insecure dev
/// key when the config allows it. Of `custodians/` and `custodians.next/` (left by a rekey
/// that switched the store but not yet the folders), the one for the store's KEK is used.
fn key_source(config: &Config, store_kek: Option<String>) -> Result<KeySource, StartupError> {
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
    let candidates: Vec<Custody> = [CUSTODIANS_DIR, NEXT_CUSTODIANS_DIR]
        .iter()
        .map(|dir| config.keys_dir.join(dir))
        .filter(|dir| dir.exists())
        .map(|dir| Custody::load(&dir))
        .collect::<Result<_, _>>()?;
    if !candidates.is_empty() && dev_key.exists() {
        return Err(StartupError::Keys(format!(
            "{} holds custodian shares and an insecure dev key: remove the dev key",
            config.keys_dir.display()
        )));
    }
    if let Some(first) = candidates.first() {
        let chosen = match &store_kek {
            None => Some(first),
            Some(id) => candidates.iter().find(|c| &c.kek_id == id),
        };
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
                store_kek.unwrap_or_default()
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

pub struct Application {
    server: actix_web::dev::Server,
    addr: SocketAddr,
    vault: Arc<Vault>,
}

impl Application {
    pub fn build(config: &Config) -> Result<Application, StartupError> {
        // First: a SIGHUP during startup must not kill the daemon (its default action).
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|source| StartupError::Bind {
                addr: config.listen,
                source,
            })?;
        let policy = Arc::new(Policy::load(&config.policies)?);
        let tls_config = tls::server_config(&config.tls.paths())?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|source| StartupError::DataDir {
                path: config.data_dir.display().to_string(),
                source,
            })?;
        let store = Store::open(&config.data_dir, config.cache_bytes)?;
        let source = key_source(config, store.kek_id()?)?;
        let settings = VaultSettings {
            card_token_ttl: config.card_token_ttl,
            cvc_ttl: config.cvc_ttl,
            keys: config.keys.clone(),
        };
        let audit = open_audit(config)?;
        let vault = Vault::open(store, source, settings, Box::new(audit)).map_err(|e| match e {
            VaultError::Keys(_) | VaultError::WrongKek(_) => StartupError::WrongKek(e),
            other => StartupError::Vault(other),
        })?;
        vault
            .audit_event(Actor::system(), "daemon.start", &Ok::<(), VaultError>(()))
            .map_err(StartupError::Vault)?;
        if vault.is_sealed() {
            tracing::warn!("the vault is SEALED: k custodians must run `cardvault unseal`");
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
        });
        let generation = Arc::clone(&tls_state);
        spawn_reloader(hangup, config.clone(), tls_state, state.clone());
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(middleware::from_fn(api::log_request))
                .configure(api::configure)
        })
        .on_connect(move |conn, extensions| {
            // Runs once per connection, after the client certificate was verified.
            let Some(stream) = conn.downcast_ref::<TlsStream<TcpStream>>() else {
                return;
            };
            let (_, session) = stream.get_ref();
            if let Some(mut peer) = session.peer_certificates().and_then(tls::peer_from_chain) {
                peer.address = stream.get_ref().0.peer_addr().ok();
                // Verified by the handshake, under the configuration in force now unless a
                // reload came during it.
                peer.trusted_under =
                    std::sync::atomic::AtomicU64::new(generation.generation_for_new_connection());
                extensions.insert(Arc::new(peer));
            }
        })
        .shutdown_timeout(10)
        .tls_handshake_timeout(tls::HANDSHAKE_TIMEOUT);
        if let Some(workers) = config.workers {
            server = server.workers(workers);
        }
        let server = server
            .listen_rustls_0_23(listener, tls_config)
            .map_err(|source| StartupError::Bind {
                addr: config.listen,
                source,
            })?
            .run();
        Ok(Application {
            server,
            addr,
            vault,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until a shutdown signal, then flushes and closes the store.
    pub async fn run(self) -> std::io::Result<()> {
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
