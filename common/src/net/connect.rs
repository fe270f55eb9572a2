//! Opening a gRPC channel to the server over our own TLS 1.3 connector.
//!
//! tonic's built-in TLS would also offer TLS 1.2, so the channel is built with
//! `connect_with_connector`: TCP, then tokio-rustls with the configuration from
//! [`super::tls::client_config`], then HTTP/2. The endpoint handed to tonic only names
//! the authority; requests carry `https` as their scheme (`Endpoint::origin`).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use super::tls::ALPN_H2;

/// Time allowed for TCP connect plus TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server address given as `https://HOST:PORT` (`PORT` defaults to 443).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    host: String,
    port: u16,
}

/// An address that is not `https://HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server address {input:?}: {reason}")]
pub struct AddressError {
    input: String,
    reason: &'static str,
}

impl FromStr for ServerAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let err = |reason| AddressError {
            input: s.to_owned(),
            reason,
        };
        let uri: Uri = s.parse().map_err(|_| err("not a URI"))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some(_) => return Err(err("the scheme must be https (TLS is the only way in)")),
            None => return Err(err("write it as https://HOST:PORT")),
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(err("no path is allowed"));
        }
        let host = uri.host().ok_or_else(|| err("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(err("no host"));
        }
        // a port that is there must be one: `uri.port_u16()` is `None` for `:99999` or
        // `:abc` as for no port at all, which would silently mean 443
        let authority = uri.authority().map_or("", |a| a.as_str());
        let after_host = authority
            .rsplit_once(']')
            .map_or(authority, |(_, rest)| rest);
        let port = match after_host.rsplit_once(':') {
            None => 443,
            Some((_, p)) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(err("the port must be a number from 1 to 65535")),
            },
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

impl ServerAddress {
    /// From a host and port.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    /// The host (a name or an IP address, without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Connects to `addr` over TLS 1.3 with `config`, checking the server certificate
/// against `server_name`, and returns tonic's channel (HTTP/2 established).
///
/// In TLS 1.3 the client's handshake ends before the server has judged the client's
/// certificate; a refusal arrives as an alert on the first read. So the connector
/// waits for the server's first bytes (its HTTP/2 settings, which the server sends at
/// once) before handing the connection to HTTP/2: a refused certificate then fails the
/// connect with the server's alert (e.g. `CertificateRequired`, `UnknownCA`) instead of
/// a bare "connection closed" later.
pub async fn connect(
    addr: &ServerAddress,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    connect_observed(addr, server_name, config, PeerCertificate::default()).await
}

/// The server's leaf certificate (DER) as presented in the latest TLS handshake of a
/// connection made by [`connect_observed`] (`None` before the first handshake).
pub type PeerCertificate = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// [`connect`], also recording in `peer` the server's leaf certificate of every
/// handshake (the client's trust store is keyed on it).
pub async fn connect_observed(
    addr: &ServerAddress,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    peer: PeerCertificate,
) -> Result<Channel, tonic::transport::Error> {
    let authority = addr.authority();
    // tonic refuses an https endpoint without its own TLS settings: the endpoint it
    // connects names the authority over "http", the TLS is done by the connector below,
    // and `origin` puts https back on every request.
    let origin = Endpoint::from_shared(format!("https://{authority}"))?
        .uri()
        .clone();
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))?
        .origin(origin)
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_adaptive_window(true);
    let target = authority.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        let peer = peer.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let mut tls = TlsConnector::from(config).connect(server_name, tcp).await?;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server did not agree to HTTP/2 (ALPN h2)",
                ));
            }
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            if let Ok(mut slot) = peer.lock() {
                *slot = leaf;
            }
            let mut first = vec![0u8; 4096];
            let n = tokio::time::timeout(CONNECT_TIMEOUT, tls.read(&mut first))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "no answer after the TLS handshake")
                })??;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the server closed the connection after the TLS handshake",
                ));
            }
            first.truncate(n);
            Ok::<_, io::Error>(TokioIo::new(Prefixed {
                prefix: first,
                pos: 0,
                inner: tls,
            }))
        }
    });
    endpoint.connect_with_connector(connector).await
}

/// A stream that first yields bytes already read from `inner`.
#[derive(Debug)]
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_https_only() {
        let a: ServerAddress = "https://127.0.0.1:5000".parse().unwrap();
        assert_eq!((a.host(), a.port()), ("127.0.0.1", 5000));
        assert_eq!(a.to_string(), "https://127.0.0.1:5000");
        let b: ServerAddress = "https://[::1]:7".parse().unwrap();
        assert_eq!(b.host(), "::1");
        assert_eq!(b.authority(), "[::1]:7");
        let c: ServerAddress = "https://fusion.example".parse().unwrap();
        assert_eq!(c.port(), 443);
        let d: ServerAddress = "https://h:65535".parse().unwrap();
        assert_eq!(d.port(), 65535);
        let e = "https://h:99999".parse::<ServerAddress>().unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        for bad in [
            "http://localhost:1",
            "localhost:1",
            "https://h:1/path",
            "",
            "https://",
            "https://h:99999",
            "https://h:abc",
            "https://h:0",
            "https://h:",
            "https://[::1]:65536",
        ] {
            assert!(bad.parse::<ServerAddress>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn prefixed_stream_yields_the_prefix_then_the_rest() {
        use tokio::io::AsyncWriteExt;
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed {
            prefix: b"hello ".to_vec(),
            pos: 0,
            inner: a,
        };
        b.write_all(b"world").await.unwrap();
        drop(b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
