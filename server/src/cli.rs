//! The `fusion-server` command line (the binary is one call to [`main`]).

use crate::model_cmd::{EvalArgs, TrainArgs, run_eval, run_train};
use crate::{certs_cmd, serve_cmd};
use clap::{Parser, Subcommand};
use std::str::FromStr;

/// Fusion model owner: serves a DNN for two-party secure inference over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "fusion-server", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model (gRPC over TLS 1.3; client certificates required).
    Serve(Box<serve_cmd::ServeArgs>),
    /// Make a CA, a server certificate and client certificates.
    Certs(certs_cmd::CertsArgs),
    /// Train the MNIST model and write its model file.
    Train(TrainArgs),
    /// Evaluate a model file on the MNIST test set in f32 and in fixed point.
    Eval(EvalArgs),
}

/// A count of 1 or more (`--max-rows`, `--idle-timeout`, `--max-sessions`, `certs --days`,
/// and the client's `--batch`, `audit --trials`, `--per-session`): clap's own range parser
/// would name the type's whole range in its message.
pub fn at_least_one<T: FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of 1 or more")),
    }
}

/// The whole `fusion-server` program: parses the command line, sets up logging and the
/// TLS provider, runs the command. The binary's `main` is this one call.
pub fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // the service logs every session and refusal; the offline tools only warnings
    let default_level = match command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(log_colours())
        .init();
    fusion_common::net::install_crypto_provider();
    match command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve_cmd::run(*args)),
        Command::Certs(args) => certs_cmd::run(args),
        Command::Train(args) => run_train(&args),
        Command::Eval(args) => run_eval(&args),
    }
}

/// Colours in the log only on a terminal, and never with `NO_COLOR` set: no escape codes
/// in a log file, a pipe or `docker compose logs`.
fn log_colours() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
