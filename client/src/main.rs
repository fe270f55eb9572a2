//! `fusion-client`.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fusion_client::bench::{ReluBench, Transport, run_relu_bench};
use fusion_common::mpc::MpcConfig;
use fusion_common::ot::KkotConfig;

#[derive(Parser)]
#[command(name = "fusion-client", about = "Fusion client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks (both parties in one process).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    Memory,
    Tls,
}

#[derive(Clone, Copy, ValueEnum)]
enum KnArg {
    Kk13,
    Cots,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// A batch of 2PC ReLUs: bytes, rounds and time, setup apart.
    Relu {
        /// ReLUs in the batch
        #[arg(long, default_value_t = 1 << 16)]
        count: usize,
        /// ring width l (2..=64)
        #[arg(long, default_value_t = 32)]
        bits: u32,
        /// transport
        #[arg(long, value_enum, default_value_t = TransportArg::Memory)]
        transport: TransportArg,
        /// bits per millionaire leaf
        #[arg(long, default_value_t = MpcConfig::default().leaf_bits)]
        leaf_bits: u32,
        /// 1-of-N OT of the leaves
        #[arg(long, value_enum, default_value_t = KnArg::Kk13)]
        kn: KnArg,
        /// print one JSON object
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Bench {
            what:
                BenchCmd::Relu {
                    count,
                    bits,
                    transport,
                    leaf_bits,
                    kn,
                    json,
                },
        } => {
            let config = MpcConfig {
                leaf_bits,
                kn: match kn {
                    KnArg::Kk13 => KkotConfig::Kk13,
                    KnArg::Cots => KkotConfig::FromCots,
                },
                ..MpcConfig::default()
            };
            let t = match transport {
                TransportArg::Memory => Transport::Memory,
                TransportArg::Tls => Transport::Tls,
            };
            let r = run_relu_bench(
                ReluBench {
                    count,
                    bits,
                    config,
                },
                t,
            )
            .context("bench relu")?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} ReLUs, l = {}: {:.0} bits/ReLU, {:.2} us/ReLU, {} rounds, {:.3} s; setup {} B, {:.3} s ({} OT, leaves {} m = {})",
                    r.count,
                    r.bits,
                    r.bits_per_relu,
                    r.us_per_relu,
                    r.rounds,
                    r.seconds,
                    r.setup.bytes_total,
                    r.setup.seconds,
                    r.ot,
                    r.kn,
                    r.leaf_bits
                );
            }
        }
    }
    Ok(())
}
