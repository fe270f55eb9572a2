//! The `fusion-client` command line (the binary is one call to [`main`]).

use crate::attack;
use crate::{audit, bench, demo, infer, info_cmd, trust, tune_cmd, verified};
use clap::{Parser, Subcommand};

/// Fusion client: secure inference against a Fusion server over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "fusion-client", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the server's model, policy and your budget.
    Info(info_cmd::InfoArgs),
    /// Secure inference of MNIST test images or an IDX image file, verified by Fusion's
    /// mix-and-check (exit status 3 when the server is caught cheating): one label (or
    /// the logits) per image and the cost table.
    Infer(infer::InferArgs),
    /// N independent Fusion batches against a server: detected / accepted counts with
    /// 99% intervals and the exact escape bound.
    Audit(audit::AuditArgs),
    /// Everything on this machine: ephemeral certificates, an in-process server on
    /// 127.0.0.1 over real mutual TLS, the model info and a secure inference of a few
    /// MNIST test images.
    Demo(demo::DemoArgs),
    /// Benchmarks (both parties in this process).
    Bench(bench::BenchArgs),
    /// Fusion parameters: the exact escape probability of a cheating server and the
    /// cheapest (T, R) for a target.
    Tune(tune_cmd::TuneArgs),
    /// Model-extraction attacks (Papernot substitute training; Carlini-Jagielski-Mironov
    /// cryptanalytic extraction) against an oracle, with reports.
    Attack(attack::AttackArgs),
    /// The trust store: servers this client caught cheating (exit status 4 when `infer`
    /// refuses one): `list`, `reset SERVER`.
    Trust(trust::TrustCmd),
}

/// The whole `fusion-client` program: parses the command line, sets up logging and the
/// TLS provider, runs the command (exit status 3 when Fusion catches the server, 4 when
/// the trust store refuses it). The binary's `main` is this one call.
pub fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(log_colours())
        .init();
    fusion_common::net::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match Cli::parse().command {
        Command::Info(args) => runtime.block_on(info_cmd::run(args)),
        Command::Infer(args) => match runtime.block_on(infer::run_cmd(args)) {
            Err(e) if verified::is_detected(&e) => {
                eprintln!("error: {e}\nno results from this batch are returned");
                std::process::exit(verified::EXIT_DETECTED)
            }
            Err(e) if trust::is_distrusted(&e) => {
                eprintln!("error: {e}");
                std::process::exit(trust::EXIT_DISTRUSTED)
            }
            r => r,
        },
        Command::Audit(args) => runtime.block_on(audit::run_cmd(args)),
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::Bench(args) => {
            println!("{}", bench::run(&args)?);
            Ok(())
        }
        Command::Tune(args) => tune_cmd::run(&args),
        Command::Attack(args) => attack::run(args),
        Command::Trust(cmd) => trust::run(&cmd),
    }
}

/// Colours in the log only on a terminal, and never with `NO_COLOR` set: no escape codes
/// in a log file, a pipe or `docker compose logs`.
fn log_colours() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
