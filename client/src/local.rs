//! A server in this process on 127.0.0.1 (port 0) over real mutual TLS, with ephemeral
//! certificates, and clients for it: what `demo` and `bench --transport tls` run on.

use std::path::{Path, PathBuf};

use fusion_common::net::certs::{CertBundle, CertSpec, generate};
use fusion_common::net::connect::ServerAddress;
use fusion_common::net::tls::{client_config, server_config};
use fusion_server::runner::Registry;
use fusion_server::state::ServerState;
use fusion_server::{ServerHandle, spawn};

use crate::client::{Client, ClientOptions};

/// The bundled model, relative to the workspace root.
pub const BUNDLED_MODEL: &str = "models/mnist-dnn.safetensors";
/// The bundled MNIST files, relative to the workspace root.
pub const BUNDLED_MNIST: &str = "data/mnist";

/// `rel` under the current directory, or else under the workspace root this crate was
/// built from, whichever exists.
pub fn bundled(rel: &str) -> Option<PathBuf> {
    [
        PathBuf::from(rel),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// A running in-process server and the certificates to reach it.
#[derive(Debug)]
pub struct LocalServer {
    /// the server
    pub handle: ServerHandle,
    /// `https://127.0.0.1:PORT`
    pub addr: ServerAddress,
    /// the ephemeral CA, the server's certificate (localhost, 127.0.0.1) and one
    /// client certificate (`CN=client`)
    pub pki: CertBundle,
}

impl LocalServer {
    /// Makes the certificates and starts serving `state` with `registry`. Must run inside
    /// a multi-threaded tokio runtime.
    pub async fn start(state: ServerState, registry: Registry) -> anyhow::Result<Self> {
        fusion_common::net::install_crypto_provider();
        let pki = generate(&CertSpec::default())?;
        let tls = server_config(&pki.server.identity(), pki.ca_pem.as_bytes())?;
        let handle = spawn("127.0.0.1:0".parse()?, tls, state, registry).await?;
        let addr = ServerAddress::new("127.0.0.1", handle.local_addr().port());
        Ok(Self { handle, addr, pki })
    }

    /// Connects as the bundle's client.
    pub async fn client(&self) -> anyhow::Result<Client> {
        self.client_at(self.addr.port()).await
    }

    /// Connects as the bundle's client to another port of 127.0.0.1 that leads to this
    /// server (a relay such as [`crate::link::LinkEmulator`]), checking the server's
    /// certificate against the name `localhost`.
    pub async fn client_at(&self, port: u16) -> anyhow::Result<Client> {
        self.client_with(port, ClientOptions::default()).await
    }

    /// As [`LocalServer::client_at`], with these transport settings (e.g. a bench's own
    /// message limit).
    pub async fn client_with(&self, port: u16, options: ClientOptions) -> anyhow::Result<Client> {
        let cert = self
            .pki
            .clients
            .first()
            .ok_or_else(|| anyhow::anyhow!("no client certificate was made"))?;
        let config = client_config(&cert.identity(), self.pki.ca_pem.as_bytes())?;
        Ok(Client::connect_with_config(
            &ServerAddress::new("127.0.0.1", port),
            Some("localhost"),
            config,
            options,
        )
        .await?)
    }

    /// Stops the server.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.handle.shutdown().await?;
        Ok(())
    }
}
