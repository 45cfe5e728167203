//! A stand-in PSP: an HTTPS server on loopback with a certificate of its own, for
//! `cardvault bench --scenario forward` and the tests. `serve` never starts one.
//!
//! It keeps every request it receives, and answers 201 with a JSON echo of the request
//! (method, path, headers, body), a session cookie, and the first long digit run of the
//! request body in an `x-echo-number` header: the answer a careless PSP could give, and that
//! the vault must mask. Request headers steer it: `x-stub-status` (the status to answer),
//! `x-stub-delay-ms` (wait after reading the request), `x-stub-size` (answer that many bytes
//! of text instead), `x-stub-location` (a `location` header, for redirects), `x-stub-close`
//! (close the connection after the answer).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use zeroize::Zeroizing;

/// A request as the stub received it.
#[derive(Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Lower-case names, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Received(<redacted>)")
    }
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct StubPsp {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StubPsp {
    /// Listens on `127.0.0.1`, a free port, with this certificate chain and key (PEM), on
    /// `threads` threads of its own.
    pub fn start(cert_pem: &str, key_pem: &str, threads: usize) -> std::io::Result<StubPsp> {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(std::io::Error::other)?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(std::io::Error::other)?;
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(std::io::Error::other)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .enable_all()
            .build()?;
        let kept = Arc::clone(&received);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    let tcp = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, _)) => tcp,
                            Err(_) => continue,
                        },
                    };
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, kept) = (acceptor.clone(), Arc::clone(&kept));
                    let counted = Arc::clone(&counted);
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let service =
                            hyper::service::service_fn(move |req| answer(req, Arc::clone(&kept)));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
        });
        Ok(StubPsp {
            port,
            received,
            connections,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many TLS connections were accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for StubPsp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn answer(
    req: hyper::Request<Incoming>,
    kept: Arc<Mutex<Vec<Received>>>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = Zeroizing::new(
        body.collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .unwrap_or_default(),
    );
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let number = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let seq = {
        let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.push(Received {
            method: parts.method.to_string(),
            path: path.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
        kept.len()
    };
    if let Some(ms) = number("x-stub-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = number("x-stub-status")
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(201);
    let mut response = hyper::Response::builder()
        .status(status)
        .header("set-cookie", "psp_session=stub; HttpOnly");
    if let Some(location) = parts
        .headers
        .get("x-stub-location")
        .and_then(|v| v.to_str().ok())
    {
        response = response.header("location", location);
    }
    if parts.headers.contains_key("x-stub-close") {
        response = response.header("connection", "close");
    }
    let text = String::from_utf8_lossy(&body);
    if let Some(run) = text
        .split(|c: char| !c.is_ascii_digit())
        .find(|run| run.len() >= 12)
    {
        response = response.header("x-echo-number", run);
    }
    let payload = match number("x-stub-size") {
        Some(size) => {
            response = response.header("content-type", "text/plain");
            vec![b'a'; usize::try_from(size).unwrap_or(0)]
        }
        None => {
            response = response.header("content-type", "application/json");
            let echoed = serde_json::from_slice::<serde_json::Value>(&body)
                .unwrap_or_else(|_| serde_json::Value::String(text.into_owned()));
            let headers: serde_json::Map<String, serde_json::Value> = headers
                .into_iter()
                .map(|(n, v)| (n, serde_json::Value::String(v)))
                .collect();
            serde_json::to_vec(&serde_json::json!({
                "id": format!("pay_{seq}"),
                "object": "payment",
                "received": {
                    "method": parts.method.as_str(),
                    "path": path,
                    "headers": headers,
                    "body": echoed,
                }
            }))
            .unwrap_or_default()
        }
    };
    Ok(response
        .body(Full::new(Bytes::from(payload)))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new()))))
}
