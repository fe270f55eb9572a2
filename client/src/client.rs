//! The client library: connect over mutual TLS, read the service description, run a
//! protocol session.
//!
//! ```no_run
//! # async fn demo(client: fusion_client::Client) -> Result<(), fusion_client::ClientError> {
//! use fusion_common::channel::{Channel, ChannelError};
//! use fusion_common::net::SessionStart;
//!
//! let out = client
//!     .session(SessionStart::new("echo"), |ch, _accepted| {
//!         ch.set_step("ping");
//!         ch.send(b"hello")?;
//!         let back = ch.recv()?;
//!         Ok::<_, ChannelError>(back)
//!     })
//!     .await?;
//! assert_eq!(out.value, b"hello");
//! println!("{}", fusion_common::cost::render_table(&out.cost));
//! # Ok(()) }
//! ```

use std::error::Error as StdError;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use fusion_common::channel::{Channel, ChannelError, CostReport, Counting};
use fusion_common::net::connect::{PeerCertificate, ServerAddress, connect_observed};
use fusion_common::net::pb::{self, frame::Kind, fusion_client::FusionClient};
use fusion_common::net::stream::{
    ChannelConfig, GrpcChannel, OUTBOUND_QUEUE, inbound_capacity, peer_status, spawn_pump,
};
use fusion_common::net::tls::{Identity, TlsError, client_config, server_name};
use fusion_common::net::{
    FrameLimits, InfoError, PublicPool, ServiceInfo, SessionAccepted, SessionStart, StartError,
    error_chain,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel as TonicChannel;
use tonic::{Code, Status};

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Certificates or keys could not be loaded, or the TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The connection (TCP, TLS handshake or HTTP/2) failed.
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// the server address
        addr: String,
        /// the error and its causes (e.g. the TLS alert)
        detail: String,
    },
    /// The server answered a call with an error status (a refusal or a failure).
    #[error("{call}: {code:?}: {message}")]
    Status {
        /// which call
        call: &'static str,
        /// the gRPC code
        code: Code,
        /// the server's message (or the transport's, with its causes)
        message: String,
    },
    /// The server's reply does not describe a valid service.
    #[error("{call}: invalid reply: {source}")]
    BadInfo {
        /// which call
        call: &'static str,
        /// what is wrong
        #[source]
        source: InfoError,
    },
    /// The server's acceptance is malformed or does not match the start.
    #[error("session: invalid acceptance: {0}")]
    BadAccept(String),
    /// The transport failed during the session (after the protocol returned, too).
    #[error("session transport: {0}")]
    Session(#[source] ChannelError),
    /// The protocol closure returned an error (downcast `source` for its type).
    #[error("protocol: {source}")]
    Protocol {
        /// the closure's error
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The protocol closure panicked.
    #[error("the protocol thread failed: {0}")]
    Panicked(String),
}

impl ClientError {
    /// The gRPC status code of a refusal or failure by the server, wherever it surfaced:
    /// the status of a call (e.g. the session's start), or a session the server ended
    /// with a status after it started ([`ChannelError::PeerStatus`], found in the
    /// transport's error or in the protocol's error chain). `None` for local failures.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { code, .. } => return Some(*code),
            ClientError::Session(ch) => return peer_status(ch).map(|(c, _)| c),
            _ => {}
        }
        let mut src: Option<&(dyn StdError + 'static)> = match self {
            // the closure's error is boxed: its source() is the inner error itself
            ClientError::Protocol { source } => Some(source.as_ref()),
            _ => None,
        };
        while let Some(s) = src {
            let channel = s.downcast_ref::<ChannelError>().or_else(|| {
                match s.downcast_ref::<fusion_common::backend::BackendError>() {
                    Some(fusion_common::backend::BackendError::Channel(ch)) => Some(ch),
                    _ => None,
                }
            });
            if let Some((code, _)) = channel.and_then(peer_status) {
                return Some(code);
            }
            if let Some(inner) = s.downcast_ref::<ClientError>() {
                return inner.code();
            }
            src = s.source();
        }
        None
    }

    fn status(call: &'static str, s: Status) -> Self {
        // a transport failure keeps its cause (e.g. the TLS alert) in the source chain
        let message = match std::error::Error::source(&s) {
            Some(src) => format!("{}: {}", s.message(), error_chain(src)),
            None => s.message().to_owned(),
        };
        ClientError::Status {
            call,
            code: s.code(),
            message,
        }
    }
}

/// Client-side transport settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// what this client accepts per frame and per message
    pub frames: FrameLimits,
    /// how long a session's send or receive may wait for the server
    pub idle_timeout: Duration,
    /// how long [`Client::session`] keeps asking again when the server refuses a start as
    /// busy (`UNAVAILABLE`: all session slots or its memory cap taken) or the call fails to
    /// reach it (also `UNAVAILABLE`); zero returns the first refusal, a wait too long for a
    /// clock (`Duration::MAX`) waits as long as it takes. Only the start call is asked
    /// again, before the server has admitted anything: nothing of the session ran and
    /// nothing was charged.
    pub busy_wait: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            frames: FrameLimits::default(),
            idle_timeout: Duration::from_secs(600),
            busy_wait: Duration::ZERO,
        }
    }
}

/// The first pause between two starts refused as busy; it doubles up to [`BUSY_PAUSE_MAX`].
const BUSY_PAUSE_FIRST: Duration = Duration::from_millis(200);
/// The longest pause between two starts refused as busy.
const BUSY_PAUSE_MAX: Duration = Duration::from_secs(5);

/// The pause after the `n`-th busy refusal (from 0): exponential, capped, with ±25% jitter
/// so that clients refused together do not return together.
fn busy_pause(n: u32) -> Duration {
    use rand::Rng;
    let base = BUSY_PAUSE_FIRST
        .saturating_mul(1u32 << n.min(16))
        .min(BUSY_PAUSE_MAX);
    base.mul_f64(rand::rng().random_range(0.75..1.25))
}

/// The result of a session: the closure's value, the server's acceptance, and the
/// client-side costs per protocol step.
#[derive(Debug)]
pub struct SessionOutput<R> {
    /// what the closure returned
    pub value: R,
    /// the server's acceptance (session number, budget left, limits)
    pub accepted: SessionAccepted,
    /// bytes, messages, rounds and time per step, measured on this side
    pub cost: CostReport,
}

/// A connection to a Fusion server. Cheap to clone; calls may run concurrently.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: FusionClient<TonicChannel>,
    addr: ServerAddress,
    options: ClientOptions,
    peer: PeerCertificate,
}

impl Client {
    /// Connects to `addr` as `identity`, checking the server's certificate against
    /// `server_ca_pem` and `name` (by default the address's host).
    pub async fn connect(
        addr: &ServerAddress,
        name: Option<&str>,
        identity: &Identity,
        server_ca_pem: &[u8],
    ) -> Result<Self, ClientError> {
        let config = client_config(identity, server_ca_pem)?;
        Self::connect_with_config(addr, name, config, ClientOptions::default()).await
    }

    /// Connects with a prepared rustls configuration (see
    /// [`fusion_common::net::tls::client_config`]).
    pub async fn connect_with_config(
        addr: &ServerAddress,
        name: Option<&str>,
        config: Arc<rustls::ClientConfig>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let name = server_name(name.unwrap_or(addr.host()))?;
        let peer = PeerCertificate::default();
        let channel = connect_observed(addr, name, config, peer.clone())
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                detail: with_hint(error_chain(&e)),
            })?;
        let limit = options.frames.grpc_message_limit();
        let grpc = FusionClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        Ok(Self {
            grpc,
            addr: addr.clone(),
            options,
            peer,
        })
    }

    /// The server's leaf certificate (DER) as presented in the latest TLS handshake.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        self.peer.lock().ok().and_then(|p| p.clone())
    }

    /// The server's address.
    pub fn addr(&self) -> &ServerAddress {
        &self.addr
    }

    /// The transport settings in use.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The raw gRPC stub (for tools and tests that speak the wire protocol directly).
    pub fn grpc(&self) -> FusionClient<TonicChannel> {
        self.grpc.clone()
    }

    /// `GetModelInfo`: the model's public description, the policy and this client's
    /// budget.
    pub async fn model_info(&self) -> Result<ServiceInfo, ClientError> {
        let reply = self
            .grpc
            .clone()
            .get_model_info(pb::ModelInfoRequest {})
            .await
            .map_err(|s| ClientError::status("model info", s))?;
        ServiceInfo::from_pb(reply.into_inner()).map_err(|source| ClientError::BadInfo {
            call: "model info",
            source,
        })
    }

    /// `GetPublicPool`: the public pool (not yet checked against the model digest; see
    /// [`fusion_common::nn::PublicPool::verify`]).
    pub async fn public_pool(&self) -> Result<PublicPool, ClientError> {
        let reply = self
            .grpc
            .clone()
            .get_public_pool(pb::PublicPoolRequest {})
            .await
            .map_err(|s| ClientError::status("public pool", s))?;
        PublicPool::from_pb(reply.into_inner()).map_err(|source| ClientError::BadInfo {
            call: "public pool",
            source,
        })
    }

    /// Runs one session: sends `start`, waits for the server's acceptance, then runs
    /// `protocol` on a blocking thread over the session's channel (wrapped in
    /// [`Counting`], so `set_step` names the steps of the cost report). When the closure
    /// returns, the client ends its stream and waits for the server's end, so a failure
    /// on the server's side is reported even after the last message. A closure error
    /// aborts the session (the server is told why).
    ///
    /// A start the server refuses as busy (`UNAVAILABLE`) is sent again after a growing
    /// pause for up to [`ClientOptions::busy_wait`]; the last refusal is returned after it.
    pub async fn session<R, E, F>(
        &self,
        start: SessionStart,
        protocol: F,
    ) -> Result<SessionOutput<R>, ClientError>
    where
        F: FnOnce(&mut dyn Channel, &SessionAccepted) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let (out_tx, inbound, accepted, server_limits) = self.open(&start).await?;
        let recv = self.options.frames;
        let config = ChannelConfig {
            recv,
            send: recv.meet(&server_limits),
            idle_timeout: Some(self.options.idle_timeout),
        };
        let inbound = spawn_pump(inbound, inbound_capacity(&recv));
        let ch = GrpcChannel::client(out_tx, inbound, config, tokio::runtime::Handle::current());
        let acc = accepted.clone();
        let joined = tokio::task::spawn_blocking(move || run_protocol(ch, &acc, protocol)).await;
        let (value, cost) = joined.map_err(|e| ClientError::Panicked(e.to_string()))??;
        Ok(SessionOutput {
            value,
            accepted,
            cost,
        })
    }

    /// Sends `start` on a new stream and waits for the server's acceptance: the stream's
    /// two ends, the acceptance and the server's frame limits.
    async fn open(&self, start: &SessionStart) -> Result<Opened, ClientError> {
        let recv = self.options.frames;
        let start_frame = pb::Frame {
            kind: Some(Kind::Start(start.to_pb(recv))),
        };
        // Only the call's own status is asked again: the server refuses a start (busy or
        // otherwise) before it answers with a stream, and the transport fails the call
        // before any stream exists; once the stream is there the session may have been
        // admitted (and charged), so nothing after that point is retried.
        let begun = tokio::time::Instant::now();
        // no deadline if the wait does not fit in an Instant ("as long as it takes")
        let deadline = begun.checked_add(self.options.busy_wait);
        let mut refusals = 0u32;
        let (out_tx, response) = loop {
            let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
            out_tx
                .send(start_frame.clone())
                .await
                .map_err(|_| ClientError::Session(ChannelError::Closed))?;
            match self.grpc.clone().session(ReceiverStream::new(out_rx)).await {
                Ok(response) => break (out_tx, response),
                Err(s) if s.code() == Code::Unavailable => {
                    let pause = busy_pause(refusals);
                    refusals += 1;
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + pause > d) {
                        let mut e = ClientError::status("session", s);
                        if refusals > 1
                            && let ClientError::Status { message, .. } = &mut e
                        {
                            message.push_str(&format!(
                                " (refused {refusals} times in {:.1} s)",
                                begun.elapsed().as_secs_f64()
                            ));
                        }
                        return Err(e);
                    }
                    tracing::info!(
                        pause_ms = pause.as_millis() as u64,
                        reason = %s.message(),
                        "session start refused as busy or the server unreachable, asking again"
                    );
                    tokio::time::sleep(pause).await;
                }
                Err(s) => return Err(ClientError::status("session", s)),
            }
        };
        let mut inbound = response.into_inner();
        let first = tokio::time::timeout(self.options.idle_timeout, inbound.message())
            .await
            .map_err(|_| ClientError::Session(ChannelError::Timeout(self.options.idle_timeout)))?
            .map_err(|s| ClientError::status("session", s))?;
        let accepted = match first {
            Some(pb::Frame {
                kind: Some(Kind::Accepted(a)),
            }) => a,
            Some(_) => {
                return Err(ClientError::BadAccept(
                    "the server's first frame is not an acceptance".into(),
                ));
            }
            None => {
                return Err(ClientError::BadAccept(
                    "the server ended the session before accepting it".into(),
                ));
            }
        };
        let (accepted, server_limits) = SessionAccepted::from_pb(accepted)
            .map_err(|e: StartError| ClientError::BadAccept(e.to_string()))?;
        if accepted.backend != start.backend || accepted.rows != start.rows {
            return Err(ClientError::BadAccept(format!(
                "asked for {} with {} rows, accepted {} with {} rows",
                start.backend, start.rows, accepted.backend, accepted.rows
            )));
        }
        Ok((out_tx, inbound, accepted, server_limits))
    }
}

/// A session's stream once accepted: the sender of outbound frames, the inbound stream,
/// the acceptance, the server's frame limits.
type Opened = (
    mpsc::Sender<pb::Frame>,
    tonic::Streaming<pb::Frame>,
    SessionAccepted,
    FrameLimits,
);

/// Adds what a TLS alert from the server most likely means.
fn with_hint(detail: String) -> String {
    let hint = if detail.contains("CertificateRequired") {
        "the server requires a client certificate"
    } else if [
        "UnknownCA",
        "BadCertificate",
        "DecryptError",
        "CertificateUnknown",
        "UnsupportedCertificate",
    ]
    .iter()
    .any(|a| detail.contains(&format!("fatal alert: {a}")))
    {
        "the server did not accept this client certificate (from a CA it does not trust, or not a client certificate?)"
    } else if detail.contains("invalid peer certificate") {
        "the server's certificate was not accepted (check --ca and --server-name)"
    } else {
        return detail;
    };
    format!("{detail} ({hint})")
}

/// The blocking part of a session: the closure, then a clean end or an abort.
fn run_protocol<R, E, F>(
    ch: GrpcChannel,
    accepted: &SessionAccepted,
    protocol: F,
) -> Result<(R, CostReport), ClientError>
where
    F: FnOnce(&mut dyn Channel, &SessionAccepted) -> Result<R, E>,
    E: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut counting = Counting::new(ch);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        protocol(&mut counting as &mut dyn Channel, accepted)
    }));
    let (ch, cost) = counting.into_parts();
    match result {
        Ok(Ok(value)) => {
            ch.finish().map_err(ClientError::Session)?;
            Ok((value, cost))
        }
        Ok(Err(e)) => {
            let source = e.into();
            ch.abort(Code::Aborted, &source.to_string());
            Err(ClientError::Protocol { source })
        }
        Err(_) => {
            ch.abort(Code::Aborted, "the client's protocol failed internally");
            Err(ClientError::Panicked(
                "the protocol closure panicked".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_pauses_double_from_the_first_up_to_the_cap_with_a_quarter_of_jitter() {
        for _ in 0..200 {
            for (n, base) in [(0, 0.2), (1, 0.4), (2, 0.8), (4, 3.2), (5, 5.0), (40, 5.0)] {
                let p = busy_pause(n).as_secs_f64();
                assert!((0.75 * base..=1.25 * base).contains(&p), "pause {n}: {p} s");
            }
        }
    }
}
