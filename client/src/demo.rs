//! `fusion-client demo`: the whole system on one machine, over real mutual TLS.
//!
//! Ephemeral certificates in a temporary directory, the server in-process on
//! 127.0.0.1 port 0 (the bundled model when its file is present), then as a client:
//! the model info, the public pool checked against its digest, and a measured echo
//! session with messages below and above the frame limit, with its cost table.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use fusion_common::cost::{group, human_bytes, render_table, to_json};
use fusion_common::net::certs::{CertSpec, generate};
use fusion_common::net::tls::{read, server_config};
use fusion_common::net::{DEFAULT_FRAME_LIMIT, Identity, SessionStart};
use fusion_common::nn::ModelDigest;
use fusion_server::runner::{ECHO, Registry};
use fusion_server::state::{Policy, ServerState, SessionLimits};

use crate::client::Client;
use crate::echo::echo_exchange;
use crate::info_cmd::render_info;

/// The bundled model, relative to the workspace root.
pub const BUNDLED_MODEL: &str = "models/mnist-dnn.safetensors";

/// Flags of `demo` (none needed).
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Model file to serve (default: the bundled model, when present).
    #[arg(long, env = "FUSION_MODEL")]
    pub model: Option<PathBuf>,
    /// Print the cost report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Echo message sizes: small, one frame exactly, and above the 1 MiB frame limit.
pub const ECHO_SIZES: [usize; 5] = [
    32,
    64 << 10,
    DEFAULT_FRAME_LIMIT,
    DEFAULT_FRAME_LIMIT + 1,
    3 * DEFAULT_FRAME_LIMIT + 12_345,
];

fn bundled_model() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from(BUNDLED_MODEL),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(BUNDLED_MODEL),
    ];
    candidates.into_iter().find(|p| p.is_file())
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    fusion_common::net::install_crypto_provider();
    let say = |s: String| {
        if !args.json {
            println!("{s}");
        }
    };

    // 1. certificates
    let dir = tempfile::tempdir().context("making a temporary directory")?;
    let bundle = generate(&CertSpec::default())?;
    bundle.write_to(dir.path(), false)?;
    say(format!(
        "certificates  ephemeral CA, server (localhost, 127.0.0.1), client CN=client in {}",
        dir.path().display()
    ));

    // 2. the server, in-process, over TLS
    let model_path = args.model.clone().or_else(bundled_model);
    if model_path.is_none() {
        say(format!(
            "model         no model file at {BUNDLED_MODEL} yet: serving without a model"
        ));
    }
    let server_identity = Identity::from_files(
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
    )?;
    let ca = read(&dir.path().join("ca.pem"), "CA")?;
    let tls = server_config(&server_identity, &ca)?;
    let state = ServerState::from_model_path(
        model_path.as_deref(),
        Policy::default(),
        SessionLimits::default(),
    )
    .context("loading the model")?;
    let server = fusion_server::spawn(
        "127.0.0.1:0".parse()?,
        tls,
        state,
        Registry::with_builtins(),
    )
    .await?;
    let addr = format!("https://127.0.0.1:{}", server.local_addr().port()).parse()?;
    say(format!(
        "server        listening on {addr} (TLS 1.3, client certificate required)"
    ));

    // 3. the client
    let client_identity = Identity::from_files(
        &dir.path().join("client.pem"),
        &dir.path().join("client.key"),
    )?;
    let client = Client::connect(&addr, Some("localhost"), &client_identity, &ca).await?;
    let info = client.model_info().await?;
    say(String::new());
    say(render_info(&info));
    if let Some(m) = info.model.as_ref().filter(|m| m.pool_size > 0) {
        let pool = client.public_pool().await?;
        let digest: [u8; 32] = m
            .model_digest
            .as_slice()
            .try_into()
            .context("model digest is not 32 bytes")?;
        pool.to_nn()?.verify(&ModelDigest(digest))?;
        say(format!(
            "public pool   {} entries received, digest verified against the model digest\n",
            pool.entries.len()
        ));
    }

    // 4. a measured echo
    let sizes: Vec<String> = ECHO_SIZES
        .iter()
        .map(|&s| format!("{} B", group(s as u64)))
        .collect();
    say(format!(
        "echo          {} messages ({}), frame limit {}",
        ECHO_SIZES.len(),
        sizes.join(", "),
        human_bytes(DEFAULT_FRAME_LIMIT as u64)
    ));
    let out = client
        .session(SessionStart::new(ECHO), |ch, _| {
            echo_exchange(ch, &ECHO_SIZES, &mut rand::rng())
        })
        .await?;
    if args.json {
        println!("{}", to_json(&out.cost));
    } else {
        println!(
            "\ncost of the echo session {} (client side, each message sent and received whole)\n",
            out.accepted.session_id
        );
        print!("{}", render_table(&out.cost));
    }
    let stats = server.stats();
    server.shutdown().await?;
    say(format!(
        "\nserver        {} session(s) accepted, {} finished cleanly, {} refused TLS handshakes",
        stats.sessions_accepted, stats.sessions_ok, stats.handshakes_failed
    ));
    Ok(())
}
