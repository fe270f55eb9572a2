//! The TLS front door: accepts TCP connections and runs each TLS 1.3 handshake in its
//! own task (a slow or hostile peer cannot hold up others). Failed handshakes (no client
//! certificate, one from another CA, plaintext, a client that rejects our certificate)
//! are logged with the peer address and counted; successful ones go to tonic.
//!
//! At most [`SessionLimits::max_handshakes`] handshakes run at once (each holds a socket,
//! a task and rustls' buffers until it ends or times out): the loop takes a permit before
//! it accepts the next connection, so further peers wait in the kernel's listen backlog
//! (which drops what overflows it), never in this process. A permit is held until the
//! connection is handed to tonic or dropped.
//!
//! [`SessionLimits::max_handshakes`]: crate::state::SessionLimits::max_handshakes

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fusion_common::net::tls::certificate_subject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::service::ServerStats;

/// The stream of established TLS connections tonic serves.
pub(crate) type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// Connections waiting for tonic.
const QUEUE: usize = 64;

/// Starts accepting on `listener`; the returned stream yields connections whose TLS
/// handshake (with a client certificate) succeeded. At most `max_handshakes` (at least
/// one) handshakes run at once, each for at most `handshake_timeout`.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    max_handshakes: usize,
    stats: Arc<ServerStats>,
) -> Incoming {
    let (tx, rx) = mpsc::channel(QUEUE);
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(
        max_handshakes.clamp(1, Semaphore::MAX_PERMITS),
    ));
    tokio::spawn(async move {
        loop {
            // a free handshake slot first: until then, new peers wait in the backlog
            let slot = tokio::select! {
                _ = tx.closed() => break,
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    // the semaphore is never closed
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // e.g. out of file descriptors: back off instead of spinning
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                // dropped in reverse order: the gauge falls before the slot is freed
                let _slot = slot;
                let _in_flight = stats.handshake_started();
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let subject = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| certificate_subject(c).unwrap_or_else(|e| e.to_string()));
                        debug!(peer = %peer, client = ?subject, "TLS connection established");
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        warn!(peer = %peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        warn!(peer = %peer, timeout = ?handshake_timeout, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
