//! Flags every networked command shares: where the server is and who we are.

use std::path::PathBuf;

use clap::Args;
use fusion_common::net::Identity;
use fusion_common::net::connect::ServerAddress;
use fusion_common::net::tls::read;

use crate::client::{Client, ClientError};

/// How to reach the server (each flag also from the environment variable shown).
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The server, as https://HOST:PORT.
    #[arg(long, env = "FUSION_SERVER")]
    pub server: ServerAddress,
    /// CA certificate that issued the server's certificate (PEM).
    #[arg(long, env = "FUSION_CA")]
    pub ca: PathBuf,
    /// This client's certificate (PEM).
    #[arg(long, env = "FUSION_CERT")]
    pub cert: PathBuf,
    /// This client's private key (PEM).
    #[arg(long, env = "FUSION_KEY")]
    pub key: PathBuf,
    /// Name to check the server certificate against (default: the host of --server).
    #[arg(long = "server-name", env = "FUSION_SERVER_NAME")]
    pub server_name: Option<String>,
}

impl ConnectArgs {
    /// Loads the certificates and connects.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let identity = Identity::from_files(&self.cert, &self.key)?;
        let ca = read(&self.ca, "server CA")?;
        Client::connect(&self.server, self.server_name.as_deref(), &identity, &ca).await
    }
}
