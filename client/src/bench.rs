//! `fusion-client bench relu`: both parties of the 2PC ReLU in one process, with costs.
//!
//! [`run_relu_bench`] runs the server and the client role on two threads over an in-memory
//! duplex ([`Transport::Memory`]) wrapped in `Counting`, sets up a session (base OTs, KK13
//! bootstrap: reported as `setup`), runs one batch of `count` ReLUs on random shares,
//! checks the result against the plaintext, and reports the client's view of the costs.
//! [`run_relu_bench_over`] takes any pair of connected channels: the seam where the TLS
//! transport (the gRPC stream over loopback) plugs in.

use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};

use fusion_common::channel::{Channel, Counting, StepCost, memory_pair};
use fusion_common::mpc::{MpcConfig, MpcError, MpcSession, OtKind, Party};
use fusion_common::ot::KkotConfig;
use fusion_common::ring::{Ring, RingError};
use serde::Serialize;

/// `fusion-client bench ...`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// what to benchmark
    #[command(subcommand)]
    pub what: BenchCmd,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// A batch of 2PC ReLUs, both parties in this process: bytes, rounds and time, setup
    /// reported apart.
    Relu(ReluArgs),
}

/// `fusion-client bench relu ...`
#[derive(Debug, Args)]
pub struct ReluArgs {
    /// ReLUs in the batch
    #[arg(long, default_value_t = 1 << 16)]
    pub count: usize,
    /// ring width l (2..=64)
    #[arg(long, default_value_t = 32)]
    pub bits: u32,
    /// transport between the two parties
    #[arg(long, value_enum, default_value_t = Transport::Memory)]
    pub transport: Transport,
    /// core OT extension (Ferret by default, as in the backend)
    #[arg(long, value_enum, default_value_t = OtArg::Ferret)]
    pub ot: OtArg,
    /// bits per millionaire leaf (m of the 1-of-2^m OTs); default: the core OT's
    /// recommended value (6 for IKNP, 4 for Ferret)
    #[arg(long)]
    pub leaf_bits: Option<u32>,
    /// 1-of-N OT of the millionaire leaves; default: kk13 with IKNP, cots with Ferret
    #[arg(long, value_enum)]
    pub kn: Option<KnArg>,
    /// print one JSON object
    #[arg(long)]
    pub json: bool,
}

/// The core OT on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OtArg {
    /// IKNP/ALSZ OT extension
    Iknp,
    /// Ferret silent OT
    Ferret,
}

impl From<OtArg> for OtKind {
    fn from(o: OtArg) -> Self {
        match o {
            OtArg::Iknp => OtKind::Iknp,
            OtArg::Ferret => OtKind::Ferret,
        }
    }
}

/// The 1-of-N OT flavour on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KnArg {
    /// KK13 over a 256-bit code
    Kk13,
    /// m correlated OTs per 1-of-2^m OT
    Cots,
}

/// Runs a `bench` command and returns the text to print.
pub fn run(args: &BenchArgs) -> Result<String, BenchError> {
    match &args.what {
        BenchCmd::Relu(a) => {
            let ot = OtKind::from(a.ot);
            let rec = MpcConfig::recommended(ot);
            let config = MpcConfig {
                leaf_bits: a.leaf_bits.unwrap_or(rec.leaf_bits),
                kn: match a.kn {
                    None => rec.kn,
                    Some(KnArg::Kk13) => KkotConfig::Kk13,
                    Some(KnArg::Cots) => KkotConfig::FromCots,
                },
                ..rec
            };
            let b = ReluBench {
                count: a.count,
                bits: a.bits,
                config,
                ot,
            };
            let r = run_relu_bench(b, a.transport)?;
            if a.json {
                serde_json::to_string(&r).map_err(|e| BenchError::Output(e.to_string()))
            } else {
                Ok(format!(
                    "{} ReLUs, l = {}: {:.0} bits/ReLU, {:.2} us/ReLU, {} rounds, {:.3} s; setup {} B, {} rounds, {:.3} s ({} OT, leaves {} m = {})",
                    r.count,
                    r.bits,
                    r.bits_per_relu,
                    r.us_per_relu,
                    r.rounds,
                    r.seconds,
                    r.setup.bytes_total,
                    r.setup.rounds,
                    r.setup.seconds,
                    r.ot,
                    r.kn,
                    r.leaf_bits
                ))
            }
        }
    }
}

/// Which transport carries the two parties' messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// in-process memory duplex
    Memory,
    /// the product gRPC stream over mutual TLS on loopback (wired by the net adapter)
    Tls,
}

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct ReluBench {
    /// number of ReLUs in the batch
    pub count: usize,
    /// ring width l
    pub bits: u32,
    /// session configuration (leaf width, 1-of-N flavour, batch size)
    pub config: MpcConfig,
    /// the core OT
    pub ot: OtKind,
}

/// Costs of one phase as the client sees them.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// bytes both ways
    pub bytes_total: u64,
    /// bytes the client sent
    pub bytes_sent: u64,
    /// bytes the client received
    pub bytes_received: u64,
    /// flights (direction changes) at the client
    pub rounds: u64,
    /// wall time, seconds
    pub seconds: f64,
}

impl From<&StepCost> for Phase {
    fn from(s: &StepCost) -> Self {
        Self {
            bytes_total: s.bytes_total(),
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            rounds: s.rounds,
            seconds: s.seconds,
        }
    }
}

/// The JSON report of `bench relu`.
#[derive(Clone, Debug, Serialize)]
pub struct ReluReport {
    /// ReLUs in the batch
    pub count: usize,
    /// ring width
    pub bits: u32,
    /// bytes of the ReLU batch, both ways (setup excluded)
    pub bytes_total: u64,
    /// bytes_total · 8 / count
    pub bits_per_relu: f64,
    /// flights of the ReLU batch at the client
    pub rounds: u64,
    /// wall time of the ReLU batch, seconds
    pub seconds: f64,
    /// seconds · 10^6 / count
    pub us_per_relu: f64,
    /// session setup (base OTs, KK13 bootstrap), reported apart
    pub setup: Phase,
    /// the ReLU batch in the same form
    pub relu: Phase,
    /// the core OT (`iknp` or `ferret`)
    pub ot: String,
    /// the 1-of-N OT of the millionaire leaves (`kk13` or `cots`)
    pub kn: String,
    /// bits per millionaire leaf
    pub leaf_bits: u32,
    /// the transport
    pub transport: String,
    /// whether the reconstructed outputs equal the plaintext ReLU (always checked)
    pub verified: bool,
    /// CPU time of the server's thread during the ReLU batch, seconds (from
    /// `/proc/thread-self/schedstat`; null where unavailable): wall time on a shared
    /// machine depends on the load, CPU time much less
    pub cpu_seconds_server: Option<f64>,
    /// CPU time of the client's thread during the ReLU batch, seconds
    pub cpu_seconds_client: Option<f64>,
    /// peak resident memory of the whole process (both parties), bytes, from `VmHWM` in
    /// `/proc/self/status` (null where unavailable)
    pub peak_memory_bytes: Option<u64>,
}

/// The process's peak resident set (`VmHWM`, Linux), bytes.
fn peak_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This thread's CPU time so far, from `/proc/thread-self/schedstat` (Linux).
fn thread_cpu() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 * 1e-9)
}

/// Errors of the bench runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// bad ring width
    #[error(transparent)]
    Ring(#[from] RingError),
    /// the protocol failed
    #[error("the {party:?} role failed")]
    Protocol {
        /// which party failed
        party: Party,
        /// why
        source: MpcError,
    },
    /// a party's thread panicked
    #[error("a party's thread panicked")]
    Panicked,
    /// the transport is not available in this build
    #[error("transport {0:?} is not wired in this build")]
    Unavailable(Transport),
    /// the secure result differs from the plaintext ReLU
    #[error("the secure ReLU differs from the plaintext at element {0}")]
    Wrong(usize),
    /// the report could not be rendered
    #[error("output: {0}")]
    Output(String),
}

/// Runs the bench over the chosen transport.
pub fn run_relu_bench(b: ReluBench, transport: Transport) -> Result<ReluReport, BenchError> {
    match transport {
        Transport::Memory => {
            let (s, c) = memory_pair();
            run_relu_bench_over(b, s, c, "memory")
        }
        // The lead wires this to the gRPC adapter (common::net) after merging.
        Transport::Tls => Err(BenchError::Unavailable(Transport::Tls)),
    }
}

type PartyOut = (Vec<u64>, StepCost, StepCost, Option<f64>);

fn party<C: Channel>(
    ch: C,
    who: Party,
    b: ReluBench,
    ring: Ring,
    x: Vec<u64>,
) -> Result<PartyOut, MpcError> {
    let mut ch = Counting::new(ch);
    ch.set_step("setup");
    let mut rng = rand::rng();
    let mut s = MpcSession::setup_with(&mut ch, who, b.config, b.ot, &mut rng)?;
    ch.set_step("relu");
    let cpu0 = thread_cpu();
    let t = Instant::now();
    let y = s.relu(&mut ch, ring, &x)?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu0.and_then(|a| thread_cpu().map(|b| b - a));
    ch.set_step("end");
    let r = ch.report();
    let mut relu = r.total_with_prefix("relu");
    relu.seconds = secs;
    Ok((y, r.total_with_prefix("setup"), relu, cpu))
}

/// Runs the bench over a connected pair of channels (server end, client end).
pub fn run_relu_bench_over<A, B>(
    b: ReluBench,
    server: A,
    client: B,
    transport: &str,
) -> Result<ReluReport, BenchError>
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    let ring = Ring::new(b.bits)?;
    let mut rng = rand::rng();
    let x: Vec<u64> = (0..b.count).map(|_| ring.random(&mut rng)).collect();
    let (x0, x1): (Vec<u64>, Vec<u64>) = x.iter().map(|&v| ring.share(v, &mut rng)).unzip();
    let hs = std::thread::spawn(move || party(server, Party::Server, b, ring, x0));
    let hc = std::thread::spawn(move || party(client, Party::Client, b, ring, x1));
    let rc = hc.join().map_err(|_| BenchError::Panicked)?;
    let rs = hs.join().map_err(|_| BenchError::Panicked)?;
    let (y1, setup, relu, cpu_c) = rc.map_err(|source| BenchError::Protocol {
        party: Party::Client,
        source,
    })?;
    let (y0, _, srelu, cpu_s) = rs.map_err(|source| BenchError::Protocol {
        party: Party::Server,
        source,
    })?;
    for i in 0..b.count {
        if ring.add(y0[i], y1[i]) != ring.from_signed(ring.to_signed(x[i]).max(0)) {
            return Err(BenchError::Wrong(i));
        }
    }
    let seconds = relu.seconds.max(srelu.seconds);
    let n = b.count.max(1) as f64;
    Ok(ReluReport {
        count: b.count,
        bits: b.bits,
        bytes_total: relu.bytes_total(),
        bits_per_relu: relu.bytes_total() as f64 * 8.0 / n,
        rounds: relu.rounds,
        seconds,
        us_per_relu: seconds * 1e6 / n,
        setup: Phase::from(&setup),
        relu: Phase {
            seconds,
            ..Phase::from(&relu)
        },
        ot: b.ot.name().into(),
        kn: match b.config.kn {
            KkotConfig::Kk13 => "kk13".into(),
            _ => "cots".into(),
        },
        leaf_bits: b.config.leaf_bits,
        transport: transport.into(),
        verified: true,
        cpu_seconds_server: cpu_s,
        cpu_seconds_client: cpu_c,
        peak_memory_bytes: peak_memory(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_bench_runs_and_reports_consistent_figures() {
        let b = ReluBench {
            count: 1000,
            bits: 32,
            config: MpcConfig::default(),
            ot: OtKind::Iknp,
        };
        let r = run_relu_bench(b, Transport::Memory).unwrap();
        assert!(r.verified);
        assert_eq!(r.count, 1000);
        assert_eq!(r.ot, "iknp");
        assert!((r.bits_per_relu - r.bytes_total as f64 * 8.0 / 1000.0).abs() < 1e-9);
        assert!(r.setup.bytes_total > 128 * 32 * 2);
        assert!(r.rounds > 0);
        assert!(matches!(
            run_relu_bench(b, Transport::Tls),
            Err(BenchError::Unavailable(_))
        ));
    }

    #[test]
    fn relu_bench_over_ferret_reports_the_ot_and_memory() {
        let args = BenchArgs {
            what: BenchCmd::Relu(ReluArgs {
                count: 500,
                bits: 37,
                transport: Transport::Memory,
                ot: OtArg::Ferret,
                leaf_bits: None,
                kn: None,
                json: true,
            }),
        };
        let out = run(&args).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ot"], "ferret");
        assert_eq!(v["kn"], "cots");
        assert_eq!(v["verified"], true);
        // the setup carries the IKNP bootstrap (74,036 COTs each way, 16 bytes each)
        assert!(v["setup"]["bytes_total"].as_u64().unwrap() > 2 * 16 * 74_036);
        // 500 ReLUs come out of the bootstrap's spare COTs: protocol bytes only
        assert!(v["bits_per_relu"].as_f64().unwrap() < 480.0);
        assert!(v["peak_memory_bytes"].as_u64().unwrap_or(1) > 0);
    }
}
