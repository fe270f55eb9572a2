//! `fusion-server`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use fusion_server::{certs_cmd, serve_cmd};

/// Fusion model owner: serves a DNN for two-party secure inference over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "fusion-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the model (gRPC over TLS 1.3; client certificates required).
    Serve(serve_cmd::ServeArgs),
    /// Make a CA, a server certificate and client certificates.
    Certs(certs_cmd::CertsArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    fusion_common::net::install_crypto_provider();
    match Cli::parse().command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve_cmd::run(args)),
        Command::Certs(args) => certs_cmd::run(args),
    }
}
