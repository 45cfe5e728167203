//! `POST /v1/forward`: the vault sends a caller's request to a registered PSP (a receiver)
//! with the card put in, and hands back the PSP's answer with every card number masked. The
//! caller, the payment router, never holds a PAN.
//!
//! Order of a forward, so that a card token is used up only once bytes may reach the PSP:
//! check the request against the receiver; check the token (a customer token is read, a card
//! token is looked at without being used); resolve the PSP's host once and check the address;
//! connect and finish TLS; only then use the card token up (the compare-and-swap of
//! detokenization, durable before the card leaves) and send. A failure before the send
//! leaves the token as it was.

pub mod receivers;
pub mod template;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

pub use receivers::{Receiver, Receivers};

use crate::card::{contains_pan, SecretInput};

/// The largest PSP answer passed back; a larger one is 502 `receiver_response_too_large`.
pub const RESPONSE_LIMIT: usize = 1 << 20;
/// The largest forward request the vault takes.
pub const REQUEST_LIMIT: usize = 64 * 1024;
/// Headers a caller may send through a forward, and the longest value.
const MAX_HEADERS: usize = 32;
const MAX_HEADER_VALUE: usize = 4096;

/// Response headers never passed back: the connection's own, and cookies (a session with the
/// PSP is the vault's, not the caller's). The body is re-encoded, so its length goes too.
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
    "set-cookie2",
    "content-length",
];

/// A forward as the caller sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    pub receiver: String,
    pub token: SecretInput,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: Option<Value>,
    pub reason: Option<String>,
    pub reference: Option<String>,
}

/// Why a forward was refused or failed. Each has its stable code (see `api::error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    ReceiverNotFound,
    ProjectNotAllowed,
    MethodNotAllowed,
    PathNotAllowed,
    InvalidPath,
    InvalidHeader,
    InvalidPlaceholder,
    InvalidBody,
    UnsupportedContentType,
    AddressRefused,
    Unreachable,
    Tls,
    Timeout,
    /// The connection failed after the request was handed to it.
    ConnectionLost,
    ResponseTooLarge,
    ResponseInvalid,
}

/// A forward checked against its receiver, ready to go once the card is known.
pub struct Plan {
    pub receiver: Arc<Receiver>,
    method: http::Method,
    /// The path to send: the receiver's base path and the caller's path.
    target: String,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    body: Option<Value>,
    form: bool,
}

/// What the audit trail records of a forward's path: the path without its query, once it
/// passed [`check_path`] (a refused path is not recorded).
pub fn audit_path(path: &str) -> Option<&str> {
    check_path(path).ok()?;
    Some(path.split_once('?').map_or(path, |(p, _)| p))
}

/// A path a forward may name: absolute, printable, no dot segments, no encoded separators or
/// dots, no fragment, and nothing that could be a card number (paths end up in PSP logs).
pub fn check_path(path: &str) -> Result<(), Failure> {
    let bare = path.split_once('?').map_or(path, |(p, _)| p);
    let lower = bare.to_ascii_lowercase();
    let ok = path.starts_with('/')
        && path.len() <= 2048
        && path
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b) && b != b'#' && b != b'\\')
        && !bare.contains("//")
        && !bare.split('/').any(|s| s == "." || s == "..")
        && !["%2e", "%2f", "%5c", "%00"]
            .iter()
            .any(|e| lower.contains(e))
        && !contains_pan(path);
    if ok {
        Ok(())
    } else {
        Err(Failure::InvalidPath)
    }
}

impl Plan {
    /// Checks a request against the receivers in force.
    pub fn new(
        receivers: &Receivers,
        project: &crate::tokens::Project,
        request: &ForwardRequest,
    ) -> Result<Plan, Failure> {
        let receiver = receivers
            .get(&request.receiver)
            .ok_or(Failure::ReceiverNotFound)?;
        check_path(&request.path)?;
        let method = request.method.to_ascii_uppercase();
        receiver
            .allows(project, &method, &request.path)
            .map_err(|n| match n {
                receivers::NotAllowed::Project => Failure::ProjectNotAllowed,
                receivers::NotAllowed::Method => Failure::MethodNotAllowed,
                receivers::NotAllowed::Path => Failure::PathNotAllowed,
            })?;
        let method =
            http::Method::from_bytes(method.as_bytes()).map_err(|_| Failure::MethodNotAllowed)?;
        if request.headers.len() > MAX_HEADERS {
            return Err(Failure::InvalidHeader);
        }
        let mut headers = Vec::new();
        let mut content_type = None;
        for (name, value) in &request.headers {
            let lower = name.to_ascii_lowercase();
            let header = http::HeaderName::from_bytes(lower.as_bytes())
                .map_err(|_| Failure::InvalidHeader)?;
            if receivers::RESERVED_HEADERS.contains(&lower.as_str())
                || value.len() > MAX_HEADER_VALUE
                || contains_pan(value)
            {
                return Err(Failure::InvalidHeader);
            }
            let value = http::HeaderValue::from_str(value).map_err(|_| Failure::InvalidHeader)?;
            if lower == "content-type" {
                content_type = value.to_str().ok().map(str::to_ascii_lowercase);
            }
            // The receiver's own headers (its credentials) replace the caller's.
            if receiver.headers.iter().any(|h| h.name == lower) {
                continue;
            }
            headers.push((header, value));
        }
        let mut form = false;
        if let Some(body) = &request.body {
            let media = content_type
                .as_deref()
                .map(|c| c.split(';').next().unwrap_or("").trim().to_owned());
            form = match media.as_deref() {
                None => {
                    headers.push((
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    ));
                    false
                }
                Some("application/x-www-form-urlencoded") => true,
                Some(m) if m == "application/json" || m.ends_with("+json") => false,
                Some(_) => return Err(Failure::UnsupportedContentType),
            };
            template::check(body, form).map_err(|e| match e {
                template::TemplateError::Placeholder => Failure::InvalidPlaceholder,
                template::TemplateError::FormBody => Failure::InvalidBody,
            })?;
        }
        let target = format!("{}{}", receiver.base_path, request.path);
        Ok(Plan {
            receiver,
            method,
            target,
            headers,
            body: request.body.clone(),
            form,
        })
    }

    /// The request body with the card put in.
    pub fn render(&self, card: &template::Card<'_>) -> Zeroizing<Vec<u8>> {
        match &self.body {
            None => Zeroizing::new(Vec::new()),
            Some(body) if self.form => template::render_form(body, card),
            Some(body) => template::render_json(body, card),
        }
    }
}

/// Whether the vault may connect to `ip`. Never: unspecified, broadcast, multicast, and
/// "this network". Unless the receiver allows private networks (development, tests): no
/// loopback, private (RFC 1918, unique local), shared (CGNAT), link-local (where cloud
/// metadata services live), documentation, benchmarking or reserved addresses, including
/// IPv4 addresses inside IPv6 (mapped, NAT64, 6to4).
pub fn egress_allowed(ip: IpAddr, private_ok: bool) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_allowed(v4, private_ok),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_allowed(v4, private_ok);
            }
            let seg = v6.segments();
            let embedded = |a: u16, b: u16| {
                let [a1, a2] = a.to_be_bytes();
                let [b1, b2] = b.to_be_bytes();
                Ipv4Addr::new(a1, a2, b1, b2)
            };
            match seg {
                // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach an IPv4 address.
                [0x64, 0xff9b, 0, 0, 0, 0, a, b] => return v4_allowed(embedded(a, b), private_ok),
                [0x2002, a, b, ..] => return v4_allowed(embedded(a, b), private_ok),
                _ => {}
            }
            if v6.is_unspecified() || v6.is_multicast() {
                return false;
            }
            if private_ok {
                return true;
            }
            let [s0, s1, ..] = seg;
            !(v6.is_loopback()
                || (s0 & 0xfe00) == 0xfc00 // unique local
                || (s0 & 0xffc0) == 0xfe80 // link-local
                || (s0 & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s0 == 0x2001 && s1 == 0x0db8) // documentation
                || (s0 == 0x2001 && s1 == 0) // Teredo
                || (s0 == 0x0100 && seg[1..4] == [0, 0, 0]) // discard
                || seg[..6] == [0; 6]) // IPv4-compatible
        }
    }
}

fn v4_allowed(ip: Ipv4Addr, private_ok: bool) -> bool {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || a == 0 {
        return false;
    }
    if private_ok {
        return true;
    }
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && (b & 0xc0) == 64) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || ip.is_documentation()
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || a >= 240) // reserved
}

/// How long an idle connection to a PSP is kept for reuse, and how many per receiver.
const IDLE_FOR: Duration = Duration::from_secs(30);
const IDLE_MAX: usize = 64;

/// Idle connections to one receiver, reused by later forwards: a TLS handshake per payment
/// would cost the vault and the PSP more than the payment's own work. Each forward still
/// resolves the host and checks the addresses; an idle connection is taken only when its
/// address is among those this forward may reach. A reload makes new receivers, with new
/// pools: connections of a removed receiver close with its old pool.
#[derive(Default)]
pub struct Pool {
    idle: std::sync::Mutex<Vec<Idle>>,
}

struct Idle {
    addr: SocketAddr,
    sender: SendRequest,
    since: Instant,
}

type SendRequest = hyper::client::conn::http1::SendRequest<WipedBody>;

impl Pool {
    fn take(&self, allowed: &[SocketAddr]) -> Option<(SocketAddr, SendRequest)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| !c.sender.is_closed() && c.since.elapsed() < IDLE_FOR);
        let at = idle.iter().rposition(|c| allowed.contains(&c.addr))?;
        let taken = idle.swap_remove(at);
        Some((taken.addr, taken.sender))
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_MAX {
            idle.push(Idle {
                addr,
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A connection to a receiver, open before the card is known.
pub struct Connection {
    addr: SocketAddr,
    sender: SendRequest,
    /// Taken from the pool (it may have been closed by the PSP meanwhile).
    reused: bool,
    /// The addresses this forward may reach, for a second connection.
    allowed: Vec<SocketAddr>,
}

/// Resolves the receiver's host once, keeps the addresses it may reach, and takes an idle
/// connection to one of them or opens TLS to the first that answers. Nothing of the card is
/// known yet.
pub async fn connect(receiver: &Receiver) -> Result<Connection, Failure> {
    let deadline = tokio::time::Instant::now() + receiver.connect_timeout;
    let resolved: Vec<SocketAddr> = tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((receiver.host.as_str(), receiver.port)),
    )
    .await
    .map_err(|_| Failure::Timeout)?
    .map_err(|e| {
        tracing::warn!(receiver = %receiver.name, error = %e, "receiver host does not resolve");
        Failure::Unreachable
    })?
    .collect();
    let allowed: Vec<SocketAddr> = resolved
        .iter()
        .copied()
        .filter(|a| egress_allowed(a.ip(), receiver.allow_private_network))
        .collect();
    if allowed.is_empty() {
        if !resolved.is_empty() {
            tracing::warn!(
                receiver = %receiver.name,
                addresses = ?resolved,
                "receiver refused: its host resolves only to addresses the vault may not reach"
            );
            return Err(Failure::AddressRefused);
        }
        return Err(Failure::Unreachable);
    }
    if let Some((addr, sender)) = receiver.pool.take(&allowed) {
        return Ok(Connection {
            addr,
            sender,
            reused: true,
            allowed,
        });
    }
    let (addr, sender) = open(receiver, &allowed, deadline).await?;
    Ok(Connection {
        addr,
        sender,
        reused: false,
        allowed,
    })
}

/// Opens TLS to the first of `allowed` that answers, and HTTP/1.1 over it; the connection is
/// driven by a task of its own until it closes.
async fn open(
    receiver: &Receiver,
    allowed: &[SocketAddr],
    deadline: tokio::time::Instant,
) -> Result<(SocketAddr, SendRequest), Failure> {
    let name = rustls::pki_types::ServerName::try_from(receiver.host.clone())
        .map_err(|_| Failure::Unreachable)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&receiver.tls));
    let mut failure = Failure::Unreachable;
    for &addr in allowed {
        let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => {
                tracing::warn!(receiver = %receiver.name, %addr, error = %e, "receiver connection failed");
                continue;
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
            .await
        {
            Err(_) => return Err(Failure::Timeout),
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(receiver = %receiver.name, %addr, error = %e, "receiver TLS handshake failed");
                failure = Failure::Tls;
                continue;
            }
        };
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(64 * 1024)
            .handshake::<_, WipedBody>(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|_| Failure::Unreachable)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        return Ok((addr, sender));
    }
    Err(failure)
}

/// The PSP's answer, as read.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Zeroizing<Vec<u8>>,
}

/// Sends the request and reads the answer, within the receiver's total time (counted from
/// `started`), then keeps the connection for the next forward. A reused connection the PSP
/// closed before the request was written is replaced by a new one: hyper hands back a
/// request it never wrote.
pub async fn exchange(
    connection: Connection,
    plan: &Plan,
    body: Zeroizing<Vec<u8>>,
    started: Instant,
) -> Result<Answer, Failure> {
    let receiver = &plan.receiver;
    let deadline = tokio::time::Instant::from_std(started + receiver.timeout);
    let mut builder = http::Request::builder()
        .method(plan.method.clone())
        .uri(plan.target.as_str())
        .header(http::header::HOST, receiver.authority())
        .header(http::header::USER_AGENT, "cardvault")
        .header(http::header::ACCEPT_ENCODING, "identity");
    for (name, value) in &plan.headers {
        builder = builder.header(name, value);
    }
    for header in &receiver.headers {
        let mut value =
            http::HeaderValue::from_str(&header.value).map_err(|_| Failure::InvalidHeader)?;
        value.set_sensitive(header.secret);
        builder = builder.header(header.name.as_str(), value);
    }
    let request = builder
        .body(WipedBody(Some(WipedBuf { bytes: body, at: 0 })))
        .map_err(|_| Failure::InvalidPath)?;
    let exchange = async move {
        let Connection {
            mut addr,
            mut sender,
            reused,
            allowed,
        } = connection;
        let response = if sender.ready().await.is_ok() {
            match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => match e.take_message() {
                    // Never written: safe on a new connection.
                    Some(request) if reused => {
                        let (a, s, response) =
                            resend(receiver, &allowed, deadline, request).await?;
                        (addr, sender) = (a, s);
                        response
                    }
                    _ => return Err(Failure::ConnectionLost),
                },
            }
        } else if reused {
            // Closed while idle: nothing was written to it.
            let (a, s, response) = resend(receiver, &allowed, deadline, request).await?;
            (addr, sender) = (a, s);
            response
        } else {
            return Err(Failure::ConnectionLost);
        };
        let (parts, mut incoming) = response.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > RESPONSE_LIMIT) {
            return Err(Failure::ResponseTooLarge);
        }
        let mut body = Zeroizing::new(Vec::with_capacity(declared.unwrap_or(16 * 1024)));
        while let Some(frame) = http_body_util::BodyExt::frame(&mut incoming).await {
            let frame = frame.map_err(|_| Failure::ConnectionLost)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = body.len() + data.len();
            if len > RESPONSE_LIMIT {
                return Err(Failure::ResponseTooLarge);
            }
            if len > body.capacity() {
                let mut grown = Zeroizing::new(Vec::with_capacity((len * 2).min(RESPONSE_LIMIT)));
                grown.extend_from_slice(&body);
                body = grown;
            }
            body.extend_from_slice(&data);
        }
        // Read to its end: the connection can carry the next forward.
        receiver.pool.put(addr, sender);
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| Failure::Timeout)?
}

/// A request a reused connection never wrote, sent on a new one.
async fn resend(
    receiver: &Receiver,
    allowed: &[SocketAddr],
    deadline: tokio::time::Instant,
    request: http::Request<WipedBody>,
) -> Result<
    (
        SocketAddr,
        SendRequest,
        http::Response<hyper::body::Incoming>,
    ),
    Failure,
> {
    let (addr, mut sender) = open(receiver, allowed, deadline).await?;
    sender.ready().await.map_err(|_| Failure::ConnectionLost)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|_| Failure::ConnectionLost)?;
    Ok((addr, sender, response))
}

/// The answer as the caller gets it: status, headers and body with every card number masked
/// and the vault's credentials redacted. `Err` for a body the vault cannot read to mask (a
/// compressed one, or bytes that are not text).
pub fn masked_answer(
    answer: &Answer,
    masker: &template::Masker<'_>,
) -> Result<serde_json::Value, Failure> {
    let mut headers = serde_json::Map::new();
    let dropped: Vec<String> = answer
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in &answer.headers {
        let name = name.as_str();
        if DROPPED_RESPONSE_HEADERS.contains(&name) || dropped.iter().any(|d| d == name) {
            continue;
        }
        let Ok(value) = value.to_str() else { continue };
        let value = masker.text(value, false);
        match headers.get_mut(name) {
            Some(serde_json::Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                headers.insert(name.to_owned(), serde_json::Value::String(value));
            }
        }
    }
    if answer
        .headers
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.eq_ignore_ascii_case("identity"))
    {
        return Err(Failure::ResponseInvalid);
    }
    let json = answer
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|m| m == "application/json" || m.ends_with("+json"));
    let body = if answer.body.is_empty() {
        serde_json::Value::Null
    } else {
        let text = std::str::from_utf8(&answer.body).map_err(|_| Failure::ResponseInvalid)?;
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(mut value) if json => {
                masker.json(&mut value);
                value
            }
            _ => serde_json::Value::String(masker.text(text, false)),
        }
    };
    Ok(serde_json::json!({
        "status": answer.status,
        "headers": headers,
        "body": body,
    }))
}

/// A request body in wiping memory: hyper takes it as it is.
struct WipedBody(Option<WipedBuf>);

struct WipedBuf {
    bytes: Zeroizing<Vec<u8>>,
    at: usize,
}

impl bytes::Buf for WipedBuf {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    fn chunk(&self) -> &[u8] {
        self.bytes.get(self.at..).unwrap_or(&[])
    }

    fn advance(&mut self, n: usize) {
        self.at = (self.at + n).min(self.bytes.len());
    }
}

impl http_body::Body for WipedBody {
    type Data = WipedBuf;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<WipedBuf>, Self::Error>>> {
        Poll::Ready(
            self.0
                .take()
                .filter(|b| !b.bytes.is_empty())
                .map(|b| Ok(http_body::Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.bytes.is_empty())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.bytes.len() as u64))
    }
}

/// How long a forward took, for the audit trail.
pub fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_refuses_internal_addresses() {
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
            "::7f00:1",
        ];
        for a in refused {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!egress_allowed(ip, false), "{a} allowed");
        }
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(egress_allowed(a.parse().unwrap(), false), "{a} refused");
        }
        // Allowed private networks still never reach multicast or "any".
        assert!(egress_allowed("127.0.0.1".parse().unwrap(), true));
        assert!(egress_allowed("::1".parse().unwrap(), true));
        for a in ["0.0.0.0", "224.0.0.1", "::", "ff02::1"] {
            assert!(!egress_allowed(a.parse().unwrap(), true), "{a} allowed");
        }
    }

    #[test]
    fn forward_paths_are_plain() {
        for ok in ["/v1/payments", "/v1/payments/pay_1?expand=card", "/"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "v1/payments",
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2e/admin",
            "/v1/%2F",
            "//evil.example/x",
            "/a b",
            "/a#frag",
            "/a\\b",
            "/cards/4242424242424242",
            "/x?pan=4242424242424242",
            "",
        ] {
            assert_eq!(check_path(bad), Err(Failure::InvalidPath), "{bad}");
        }
    }
}
