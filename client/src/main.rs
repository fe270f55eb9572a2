//! `fusion-client`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use fusion_client::bench;

/// Fusion client.
#[derive(Debug, Parser)]
#[command(name = "fusion-client", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks (both parties in this process).
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => println!("{}", bench::run(&args)?),
    }
    Ok(())
}
