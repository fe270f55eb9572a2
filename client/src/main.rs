//! `fusion-client`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

/// Fusion client.
#[derive(Debug, Parser)]
#[command(name = "fusion-client", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Model-extraction attacks against a local oracle (issue 7).
    Attack(fusion_client::attack::AttackArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Attack(args) => fusion_client::attack::run(args),
    }
}
