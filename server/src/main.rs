//! `fusion-server`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use fusion_server::model_cmd::{EvalArgs, TrainArgs, run_eval, run_train};

/// Fusion model owner.
#[derive(Debug, Parser)]
#[command(name = "fusion-server", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train the MNIST model and write its model file.
    Train(TrainArgs),
    /// Evaluate a model file on the MNIST test set in f32 and in fixed point.
    Eval(EvalArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train(args) => run_train(&args),
        Command::Eval(args) => run_eval(&args),
    }
}
