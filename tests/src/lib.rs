//! Helpers shared by the end-to-end tests: certificates made per test, a real server on
//! 127.0.0.1 port 0 over mutual TLS, clients with chosen identities.

use std::time::Duration;

use fusion_client::{Client, ClientError, ClientOptions};
use fusion_common::net::certs::{CertBundle, CertSpec, IssuedCert, generate};
use fusion_common::net::connect::ServerAddress;
use fusion_common::net::tls::{client_config, server_config};
use fusion_server::runner::Registry;
use fusion_server::state::{Policy, ServerState, SessionLimits};
use fusion_server::{ServerHandle, spawn};

/// Installs the crypto provider and a log subscriber that the test harness captures.
pub fn init() {
    fusion_common::net::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

/// A fresh CA with a server certificate (localhost, 127.0.0.1) and clients `client` and
/// `alice`.
pub fn pki() -> CertBundle {
    generate(&CertSpec {
        clients: vec!["client".into(), "alice".into()],
        ..CertSpec::default()
    })
    .expect("certificates")
}

/// A server under test and the certificates it trusts.
#[derive(Debug)]
pub struct TestServer {
    /// the running server
    pub handle: ServerHandle,
    /// its address, `https://127.0.0.1:PORT`
    pub addr: ServerAddress,
    /// the CA, server and client certificates
    pub pki: CertBundle,
}

impl TestServer {
    /// Starts a server without a model, with `policy` and `limits`, offering the
    /// built-in backends and whatever `registry` adds.
    pub async fn start(policy: Policy, limits: SessionLimits, registry: Registry) -> Self {
        Self::start_with_state(ServerState::new(None, policy, limits), registry).await
    }

    /// Starts a server with the default policy and limits.
    pub async fn start_default() -> Self {
        Self::start(
            Policy::default(),
            SessionLimits::default(),
            Registry::with_builtins(),
        )
        .await
    }

    /// Starts a server over a prepared state.
    pub async fn start_with_state(state: ServerState, registry: Registry) -> Self {
        init();
        let pki = pki();
        let tls = server_config(&pki.server.identity(), pki.ca_pem.as_bytes()).expect("tls");
        let handle = spawn("127.0.0.1:0".parse().expect("addr"), tls, state, registry)
            .await
            .expect("server starts");
        let addr = ServerAddress::new("127.0.0.1", handle.local_addr().port());
        Self { handle, addr, pki }
    }

    /// Connects as the named client of this server's PKI.
    pub async fn client_as(&self, name: &str) -> Result<Client, ClientError> {
        self.client_with(name, ClientOptions::default()).await
    }

    /// Connects as the named client of this server's PKI with `options`.
    pub async fn client_with(
        &self,
        name: &str,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let cert = self.issued(name);
        let config = client_config(&cert.identity(), self.pki.ca_pem.as_bytes())?;
        Client::connect_with_config(&self.addr, None, config, options).await
    }

    /// Connects as `client`.
    pub async fn client(&self) -> Client {
        self.client_as("client").await.expect("client connects")
    }

    fn issued(&self, name: &str) -> &IssuedCert {
        self.pki
            .clients
            .iter()
            .find(|c| c.name == name)
            .expect("a client of the test PKI")
    }

    /// Waits (up to 5 s) until the server counted `n` failed handshakes.
    pub async fn await_handshake_failures(&self, n: u64) -> u64 {
        for _ in 0..100 {
            let got = self.handle.stats().handshakes_failed;
            if got >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.handle.stats().handshakes_failed
    }

    /// Waits (up to 5 s) until the server counted `n` failed sessions.
    pub async fn await_failed_sessions(&self, n: u64) -> u64 {
        for _ in 0..100 {
            let got = self.handle.stats().sessions_failed;
            if got >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.handle.stats().sessions_failed
    }
}

/// The real binaries as child processes (the two-process and CLI tests).
pub mod process {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, Command};
    use std::time::Duration;

    /// `bin serve --listen 127.0.0.1:0` with the server certificate, key and client CA that
    /// `fusion-server certs --out pki` wrote; the caller adds its flags and spawns it.
    pub fn serve_command(bin: &Path, pki: &Path) -> Command {
        let mut c = Command::new(bin);
        c.args(["serve", "--listen", "127.0.0.1:0", "--cert"])
            .arg(pki.join("server.pem"))
            .arg("--key")
            .arg(pki.join("server.key"))
            .arg("--client-ca")
            .arg(pki.join("ca.pem"));
        c
    }

    /// Kills the child when the test ends, whatever happens.
    #[derive(Debug)]
    pub struct Reaper(pub Child);

    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The port of a `fusion-server serve` child started with its stdout piped: read from
    /// the line `fusion-server listening on ADDR` it prints (within 60 s).
    pub fn listening_port(server: &mut Reaper) -> String {
        let out = server
            .0
            .stdout
            .take()
            .expect("the server's stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("fusion-server listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server prints its address");
        addr.rsplit(':').next().unwrap_or_default().to_owned()
    }
}
