//! The operator side of the admin API: a small blocking HTTPS client over mTLS, used by
//! `cardvault unseal` and `cardvault keys ...`, and the client TLS setup the benchmark shares.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use zeroize::Zeroizing;

/// A client TLS config: the vault's CA as the only root, and a client certificate.
pub fn tls_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, String> {
    let file = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| file(ca, &e))? {
        roots
            .add(c.map_err(|e| file(ca, &e))?)
            .map_err(|e| file(ca, &e))?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file(key, &e))?;
    rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| e.to_string())
}

/// `host:port` of an `https://host:port` URL, and the host alone.
pub fn authority(url: &str) -> Result<(String, String), String> {
    let authority = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} is not an https:// URL"))?
        .trim_end_matches('/');
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .to_owned();
    Ok((authority.to_owned(), host))
}

pub struct AdminClient {
    authority: String,
    server_name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
}

pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl AdminClient {
    pub fn new(url: &str, ca: &Path, cert: &Path, key: &Path) -> Result<AdminClient, String> {
        let (authority, host) = authority(url)?;
        Ok(AdminClient {
            authority,
            server_name: ServerName::try_from(host).map_err(|e| e.to_string())?,
            config: Arc::new(tls_config(ca, cert, key)?),
        })
    }

    /// A TLS connection to the vault.
    fn connect(
        &self,
    ) -> Result<
        (
            rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
            String,
        ),
        String,
    > {
        let addr = self
            .authority
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.authority))?
            .next()
            .ok_or_else(|| format!("{} does not resolve", self.authority))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(300)))
            .map_err(|e| e.to_string())?;
        let conn =
            rustls::ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())
                .map_err(|e| e.to_string())?;
        Ok((rustls::StreamOwned::new(conn, tcp), addr.to_string()))
    }

    fn request_head(
        &self,
        method: &str,
        path: &str,
        length: u64,
        headers: &[(&str, &str)],
    ) -> String {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {length}\r\nconnection: close\r\n",
            self.authority
        );
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            head.push_str("content-type: application/json\r\n");
        }
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head
    }

    /// One request on its own connection; the body is wiped after sending.
    pub fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Reply, String> {
        self.send_with(method, path, &[], body)
    }

    /// [`AdminClient::send`] with more headers (`vault-project`).
    pub fn send_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Reply, String> {
        let (mut tls, addr) = self.connect()?;
        let body = body.unwrap_or_default();
        let mut request = Zeroizing::new(
            self.request_head(method, path, body.len() as u64, headers)
                .into_bytes(),
        );
        request.extend_from_slice(body);
        tls.write_all(&request)
            .and_then(|()| tls.flush())
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw) {
            Ok(_) => {}
            // Servers may close without close_notify after `connection: close`.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(format!("reading from {addr}: {e}")),
        }
        parse(&raw).ok_or_else(|| "the vault sent a malformed response".into())
    }

    /// `POST path` with no body: a 200 reply's body is streamed into `out` (`Ok(None)`);
    /// any other reply comes back whole. A body cut short is an error.
    pub fn download(&self, path: &str, out: &mut dyn Write) -> Result<Option<Reply>, String> {
        self.stream("POST", path, &[], &mut std::io::empty(), 0, out)
    }

    /// `method path` with a body of `length` bytes sent as `body` yields it, then as
    /// [`AdminClient::download`]: a 200 reply's body streamed into `out`, any other whole.
    pub fn stream(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &mut dyn Read,
        length: u64,
        out: &mut dyn Write,
    ) -> Result<Option<Reply>, String> {
        use std::io::BufRead;
        let (mut tls, addr) = self.connect()?;
        tls.write_all(self.request_head(method, path, length, headers).as_bytes())
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        let sent = std::io::copy(&mut body.take(length), &mut tls)
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        if sent != length {
            return Err(format!("the request body was {sent} bytes, not {length}"));
        }
        tls.flush().map_err(|e| format!("sending to {addr}: {e}"))?;
        let mut reader = std::io::BufReader::new(tls);
        let cut = |e: std::io::Error| format!("the reply from {addr} was cut short: {e}");
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(cut)? == 0 {
                return Err(format!("{addr} closed the connection before replying"));
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("the vault sent a malformed response")?;
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        if status != 200 {
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            let mut raw = head.into_bytes();
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&rest);
            return parse(&raw)
                .map(Some)
                .ok_or_else(|| "the vault sent a malformed response".into());
        }
        if !chunked {
            std::io::copy(&mut reader, out).map_err(cut)?;
            return Ok(None);
        }
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).map_err(cut)?;
            let size = size.trim().split(';').next().unwrap_or_default();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| format!("the reply from {addr} was cut short"))?;
            if size == 0 {
                return Ok(None);
            }
            let copied = std::io::copy(&mut (&mut reader).take(size), out).map_err(cut)?;
            let mut crlf = [0u8; 2];
            if copied != size || reader.read_exact(&mut crlf).is_err() || &crlf != b"\r\n" {
                return Err(format!("the reply from {addr} was cut short"));
            }
        }
    }
}

fn parse(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(raw.get(..split)?).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let rest = raw.get(split + 4..)?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Some(Reply { status, body })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(data.get(..line_end)?).ok()?.trim(), 16)
                .ok()?;
        data = data.get(line_end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}
