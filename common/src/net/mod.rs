//! The network: gRPC over TLS 1.3 with mutual authentication, and the adapter that
//! makes a gRPC bidirectional stream a blocking [`crate::channel::Channel`].
//!
//! This is the only module of `fusion-common` that knows tonic, tokio or rustls.
//!
//! ```text
//!   client                                            server
//!   ------                                            ------
//!   TCP -> TLS 1.3 (client cert, ALPN h2) ----------> TLS acceptor (client cert required,
//!                                                     checked against the client CA;
//!                                                     subject = the client's identity)
//!   GetModelInfo / GetPublicPool (unary) -----------> public description, policy, budget
//!   Session (bidi stream):
//!     Frame{start: backend, rows, cols, output,
//!           params, receive limits} ---------------> policy check, budget charged
//!     <--------------- Frame{accepted: id, budget, receive limits}  (or a gRPC status)
//!     Frame{chunk}* <==============================> Frame{chunk}*   (protocol messages)
//!     end of stream --------------------------------> runner returns
//!     <------------------------------------------------ end of stream, status OK
//! ```
//!
//! - [`frame`]: chunking of messages under the frame limit, reassembly with limits;
//! - [`stream`]: [`GrpcChannel`], the blocking channel over the stream (both sides);
//! - [`session`]: the typed `Start` / `Accepted` frames;
//! - [`info`]: the typed service description (`GetModelInfo`, `GetPublicPool`);
//! - [`tls`]: rustls configurations (TLS 1.3 only, mutual), PEM loading, subjects;
//! - [`connect`]: the client's TLS connector for tonic;
//! - [`certs`]: making a CA, a server and client certificates (rcgen).

pub mod certs;
pub mod connect;
pub mod frame;
pub mod info;
pub mod session;
pub mod stream;
pub mod tls;

/// The generated protobuf messages and gRPC stubs of `proto/fusion.proto`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod pb {
    tonic::include_proto!("fusion.v1");
}

pub use frame::{DEFAULT_FRAME_LIMIT, FrameLimits};
pub use info::{
    Architecture, Budget, InfoError, LayerInfo, ModelSummary, OutputMode, PoolEntry, PublicPool,
    ServiceInfo,
};
pub use session::{SessionAccepted, SessionStart, StartError};
pub use stream::{ChannelConfig, GrpcChannel};
pub use tls::{Identity, TlsError, install_crypto_provider};

/// An error and its sources, joined with `: ` (tonic's transport errors keep the
/// useful part, e.g. the TLS alert, in their sources).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let next = e.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = e.source();
    }
    s
}
