//! Running the service: bind, serve over the TLS front door, shut down.

use std::net::SocketAddr;
use std::sync::Arc;

use fusion_common::net::pb::fusion_server::FusionServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

use crate::listener::tls_incoming;
use crate::runner::Registry;
use crate::service::{FusionService, ServerStats, StatsSnapshot};
use crate::state::ServerState;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// the address
        addr: SocketAddr,
        /// why
        #[source]
        source: std::io::Error,
    },
    /// The policy names a backend nobody registered.
    #[error("backend {name:?} is not available (available: {available})")]
    UnknownBackend {
        /// the name
        name: String,
        /// the registered names
        available: String,
    },
    /// The policy names a backend that needs a model, and no model is served.
    #[error("backend {name:?} needs a model (--model)")]
    NeedsModel {
        /// the name
        name: String,
    },
    /// The session limits are out of range.
    #[error("invalid session limits: {0}")]
    Limits(String),
    /// tonic failed.
    #[error("server transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The server task ended abnormally.
    #[error("server task: {0}")]
    Task(String),
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    stats: Arc<ServerStats>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Stops accepting, lets running calls finish, and waits.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    /// Waits until the server stops (it does only on error or after `shutdown`).
    pub async fn join(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(r) => r.map_err(ServerError::from),
            Err(e) => Err(ServerError::Task(e.to_string())),
        }
    }
}

/// The backends to offer: the policy's list (each must be registered, and have a model
/// if it needs one) or, when the list is empty, every registered backend that can run
/// (those that need a model only when one is served).
fn offered(state: &ServerState, registry: &Registry) -> Result<Vec<String>, ServerError> {
    let names = registry.names();
    let runnable = |name: &String| {
        state.model.is_some() || registry.get(name).is_some_and(|r| !r.needs_model())
    };
    if state.policy.backends.is_empty() {
        return Ok(names.into_iter().filter(runnable).collect());
    }
    for b in &state.policy.backends {
        if !names.contains(b) {
            return Err(ServerError::UnknownBackend {
                name: b.clone(),
                available: names.join(", "),
            });
        }
        if !runnable(b) {
            return Err(ServerError::NeedsModel { name: b.clone() });
        }
    }
    Ok(state.policy.backends.clone())
}

/// Binds `addr` and serves `state` with the backends of `registry` over TLS with
/// `tls` (see [`fusion_common::net::tls::server_config`]). Must run inside a
/// multi-threaded tokio runtime.
pub async fn spawn(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    state: ServerState,
    registry: Registry,
) -> Result<ServerHandle, ServerError> {
    state
        .limits
        .frames
        .validate()
        .map_err(ServerError::Limits)?;
    let offered = offered(&state, &registry)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let stats = Arc::new(ServerStats::default());
    let limits = state.limits;
    let grpc_limit = limits.frames.grpc_message_limit();
    let service = FusionService::new(Arc::new(state), registry, offered.clone(), stats.clone());
    let service = FusionServer::new(service)
        .max_decoding_message_size(grpc_limit)
        .max_encoding_message_size(grpc_limit);
    let incoming = tls_incoming(
        listener,
        tls,
        limits.handshake_timeout,
        limits.max_handshakes,
        stats.clone(),
    );
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .http2_adaptive_window(Some(true))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await
    });
    info!(addr = %local_addr, backends = ?offered, "serving (TLS 1.3, client certificates required)");
    Ok(ServerHandle {
        local_addr,
        stats,
        shutdown: Some(shutdown_tx),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Policy, ServedModel, SessionLimits};
    use fusion_common::fixed::FixedPoint;
    use fusion_common::nn::{Architecture, Model, Tensor};

    fn tiny() -> ServedModel {
        let arch = Architecture::mlp(&[2], &[], 2).unwrap();
        let params = vec![vec![
            Tensor::new(vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]).unwrap(),
            Tensor::new(vec![2], vec![0.0, 0.0]).unwrap(),
        ]];
        let m = Model::new(arch, params, FixedPoint::new(33, 12).unwrap()).unwrap();
        ServedModel::new("tiny", m)
    }

    #[test]
    fn backends_that_need_a_model_are_offered_only_with_one() {
        let r = Registry::with_builtins();
        let state = |model, backends: &[&str]| {
            ServerState::new(
                model,
                Policy {
                    backends: backends.iter().map(|s| s.to_string()).collect(),
                    ..Policy::default()
                },
                SessionLimits::default(),
            )
        };
        assert_eq!(offered(&state(None, &[]), &r).unwrap(), ["echo"]);
        assert_eq!(
            offered(&state(Some(tiny()), &[]), &r).unwrap(),
            ["cheetah", "echo"]
        );
        assert_eq!(
            offered(&state(Some(tiny()), &["cheetah"]), &r).unwrap(),
            ["cheetah"]
        );
        assert!(matches!(
            offered(&state(None, &["cheetah"]), &r),
            Err(ServerError::NeedsModel { .. })
        ));
        assert!(matches!(
            offered(&state(None, &["nope"]), &r),
            Err(ServerError::UnknownBackend { .. })
        ));
    }
}
