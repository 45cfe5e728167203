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
use crate::audit::LogSink;
use crate::config::Config;
use crate::crypto::{CryptoError, KeyEncryptionKey, LocalKek};
use crate::policy::{Policy, PolicyError};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};
use crate::vault::{Vault, VaultError, VaultSettings};

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
    #[error("opening the vault: {0}")]
    Vault(VaultError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Application {
    server: actix_web::dev::Server,
    addr: SocketAddr,
    vault: Arc<Vault>,
}

impl Application {
    pub fn build(config: &Config) -> Result<Application, StartupError> {
        let policy = Arc::new(Policy::load(&config.policies)?);
        let tls_config =
            tls::server_config(&config.tls.cert, &config.tls.key, &config.tls.client_ca)?;
        let kek = LocalKek::load(&config.keys_dir.join(crate::crypto::LOCAL_KEK_FILE))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|source| StartupError::DataDir {
                path: config.data_dir.display().to_string(),
                source,
            })?;
        let store = Store::open(&config.data_dir, config.cache_bytes)?;
        let settings = VaultSettings {
            card_token_ttl: config.card_token_ttl,
            cvc_ttl: config.cvc_ttl,
        };
        tracing::info!(kek = kek.describe(), data_dir = %config.data_dir.display(), "opening the vault");
        let vault = Vault::open(store, Box::new(kek), settings, Box::new(LogSink)).map_err(
            |e| match e {
                VaultError::Keys(_) => StartupError::WrongKek(e),
                other => StartupError::Vault(other),
            },
        )?;

        let listener = TcpListener::bind(config.listen).map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        let state = web::Data::new(AppState {
            vault: Arc::clone(&vault),
            policy,
        });
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(middleware::from_fn(api::log_request))
                .configure(api::configure)
        })
        .on_connect(|conn, extensions| {
            // Runs once per connection, after the client certificate was verified.
            let Some(stream) = conn.downcast_ref::<TlsStream<TcpStream>>() else {
                return;
            };
            let (_, session) = stream.get_ref();
            if let Some(peer) = session.peer_certificates().and_then(tls::peer_from_chain) {
                extensions.insert(Arc::new(peer));
            }
        })
        .shutdown_timeout(10);
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
        if let Err(e) = self.vault.close() {
            tracing::error!(error = %e, "closing the store failed");
        }
        tracing::info!("stopped");
        served
    }
}
