//! Flags every networked command shares: where the server is and who we are.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use fusion_common::net::Identity;
use fusion_common::net::connect::ServerAddress;
use fusion_common::net::tls::{client_config, read};

use crate::client::{Client, ClientError, ClientOptions};

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
    /// Seconds to keep asking again when the server refuses a session as busy (all its
    /// session slots or its memory cap taken); 0 gives up at the first refusal.
    #[arg(long = "busy-wait", env = "FUSION_BUSY_WAIT", default_value_t = DEFAULT_BUSY_WAIT,
          value_parser = seconds)]
    pub busy_wait: f64,
}

/// `--busy-wait`'s default, in seconds.
pub const DEFAULT_BUSY_WAIT: f64 = 60.0;

/// A non-negative, finite number of seconds.
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0 to 86400")),
    }
}

impl ConnectArgs {
    /// Loads the certificates and connects.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let identity = Identity::from_files(&self.cert, &self.key)?;
        let ca = read(&self.ca, "server CA")?;
        let options = ClientOptions {
            busy_wait: Duration::from_secs_f64(self.busy_wait),
            ..ClientOptions::default()
        };
        let config = client_config(&identity, &ca)?;
        Client::connect_with_config(&self.server, self.server_name.as_deref(), config, options)
            .await
    }
}
