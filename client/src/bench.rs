//! `fusion-client bench`: both parties in one process, with costs.
//!
//! - `bench relu`: [`run_relu_bench`] runs the server and the client role of a batch of
//!   2PC ReLUs on random shares, checks the result against the plaintext, and reports the
//!   client's view of the costs (setup apart). [`run_relu_bench_over`] takes any pair of
//!   connected channels ([`Transport::Memory`]: the in-memory duplex);
//!   [`Transport::Tls`] runs the server role as a session runner of a real server in
//!   this process (127.0.0.1, port 0, ephemeral certificates) and the client role over
//!   gRPC and mutual TLS.
//! - `bench infer`: a secure inference of N MNIST test images with the served model, one
//!   session per batch size (set-up apart), checked against the fixed-point evaluator:
//!   in memory (both roles of `fusion_common::backend` on two threads) or over TLS (the
//!   real `cheetah` runner of an in-process server and [`crate::infer::run_with_info`]).
//! - `--link lan|wan|wan100|RATE_MBIT/DELAY_MS` (implies `--transport tls`; an explicit
//!   `--transport memory` with it is refused, [`BenchError::MemoryWithLink`]): the client
//!   reaches the in-process server through the [`LinkEmulator`] (a TCP relay adding the
//!   profile's one-way delay and rate per direction; the TLS bytes pass unchanged). Each
//!   run is made twice, first straight over loopback TLS (the compute term), then through
//!   the link; the report puts the measured time next to the model
//!   `compute + rounds x one-way delay + bytes / rate` per phase, and the bytes the relay
//!   carried next to the payload the counting channel saw.
//! - `--report DIR`: `report.json`, `report.md` and PNG charts (see [`crate::charts`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};

use fusion_common::backend::{
    BackendError, BatchOutput, Cheetah, CheetahConfig, Honest, InferenceClient, InferenceServer,
    LinearMode, LocalPolicy, ModelSpec, OutputMode, SecureInference,
};
use fusion_common::channel::{Channel, CostReport, Counting, StepCost, memory_pair};
use fusion_common::fixed::{FixedModel, eval_fixed};
use fusion_common::mpc::{MpcConfig, MpcError, MpcSession, OtKind, Party};
use fusion_common::net::SessionStart;
use fusion_common::nn::Model;
use fusion_common::nn::mnist::{self, Split};
use fusion_common::ot::KkotConfig;
use fusion_common::ring::{Ring, RingError};
use fusion_server::runner::{Refusal, Registry, RunnerError, StartInfo};
use fusion_server::state::{Policy, ServedModel, ServerState, SessionLimits};
use serde::Serialize;

use crate::charts::{RunCost, write_report};
use crate::client::ClientOptions;
use crate::infer::{InferError, InferOptions, InferOutput, Inputs, run_with_info};
use crate::link::{LinkEmulator, LinkError, LinkProfile};
use crate::local::{BUNDLED_MNIST, BUNDLED_MODEL, LocalServer, bundled};
use crate::report::{CostJson, LinkJson, PhaseCost, StepJson, render_tables};

/// Where the compute term of the link model comes from.
pub const COMPUTE_FROM: &str =
    "the same run over TLS on loopback without the link, made just before in this process";

/// A `--link` value: the profile and its name as given.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkArg {
    /// the profile
    pub profile: LinkProfile,
    /// `lan`, `wan`, `wan100` or `RATE_MBIT/DELAY_MS` as given
    pub label: String,
}

/// Parses a `--link` value.
pub fn parse_link(s: &str) -> Result<LinkArg, LinkError> {
    Ok(LinkArg {
        profile: LinkProfile::parse(s)?,
        label: s.to_owned(),
    })
}

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
    /// A secure inference of MNIST test images with the served model (backend
    /// `cheetah`), both parties in this process: bytes, rounds and time per step, setup
    /// reported apart, the result checked against the fixed-point evaluator.
    Infer(InferBenchArgs),
}

/// `fusion-client bench infer ...`
#[derive(Debug, Args)]
pub struct InferBenchArgs {
    /// rows in the batch; a comma list (1,16,256) runs one session per value
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub rows: Vec<usize>,
    /// transport between the two parties: `memory` (the default without --link) or
    /// `tls` (implied by --link; `--transport memory` with --link is refused)
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// what leaves the protocol: `labels` or `logits`
    #[arg(long, default_value = "labels")]
    pub output: OutputMode,
    /// linear layers `preprocessed` (Delphi: HE on random masks and the OT extension in
    /// the batch's offline phase, reported apart) or `online` (Cheetah: HE during the
    /// batch)
    #[arg(long, env = "FUSION_LINEAR", default_value = "preprocessed")]
    pub linear: LinearMode,
    /// the model file (default: the bundled model)
    #[arg(long, env = "FUSION_MODEL")]
    pub model: Option<PathBuf>,
    /// the directory of the MNIST gzip IDX files (default: the bundled data/mnist)
    #[arg(long, env = "FUSION_MNIST_DIR")]
    pub mnist_dir: Option<PathBuf>,
    /// emulate a link between the parties (implies --transport tls): lan (3 Gbit/s,
    /// 0.3 ms one way), wan (400 Mbit/s, 40 ms), wan100 (100 Mbit/s, 40 ms) or
    /// RATE_MBIT/DELAY_MS
    #[arg(long, env = "FUSION_LINK", value_parser = parse_link)]
    pub link: Option<LinkArg>,
    /// print JSON (one object, or an array with several --rows)
    #[arg(long)]
    pub json: bool,
    /// write report.json, report.md and the PNG charts into this directory
    #[arg(long, env = "FUSION_REPORT_DIR")]
    pub report: Option<PathBuf>,
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
    /// transport between the two parties: `memory` (the default without --link) or
    /// `tls` (implied by --link; `--transport memory` with --link is refused)
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// core OT extension (Ferret by default, as in the backend); a comma list
    /// (iknp,ferret) runs one bench per kind and compares them
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ferret")]
    pub ot: Vec<OtArg>,
    /// bits per millionaire leaf (m of the 1-of-2^m OTs); default: the core OT's
    /// recommended value (6 for IKNP, 4 for Ferret)
    #[arg(long)]
    pub leaf_bits: Option<u32>,
    /// 1-of-N OT of the millionaire leaves; default: kk13 with IKNP, cots with Ferret
    #[arg(long, value_enum)]
    pub kn: Option<KnArg>,
    /// emulate a link between the parties (implies --transport tls): lan, wan, wan100 or
    /// RATE_MBIT/DELAY_MS
    #[arg(long, env = "FUSION_LINK", value_parser = parse_link)]
    pub link: Option<LinkArg>,
    /// print one JSON object
    #[arg(long)]
    pub json: bool,
    /// write report.json, report.md and the PNG charts into this directory
    #[arg(long, env = "FUSION_REPORT_DIR")]
    pub report: Option<PathBuf>,
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
        BenchCmd::Infer(a) => run_infer_cmd(a),
        BenchCmd::Relu(a) => run_relu_cmd(a),
    }
}

/// The transport a bench runs over: the one given, `tls` with a link (which runs over
/// TLS), else `memory`. An explicit `memory` with a link is refused: a link cannot carry
/// the in-memory duplex.
pub fn bench_transport(
    transport: Option<Transport>,
    link: Option<&LinkArg>,
) -> Result<Transport, BenchError> {
    match (transport, link) {
        (Some(Transport::Memory), Some(l)) => Err(BenchError::MemoryWithLink {
            link: l.label.clone(),
        }),
        (Some(t), _) => Ok(t),
        (None, Some(_)) => Ok(Transport::Tls),
        (None, None) => Ok(Transport::Memory),
    }
}

/// Runs `bench relu` (one bench per `--ot` value) and returns the text to print.
fn run_relu_cmd(a: &ReluArgs) -> Result<String, BenchError> {
    let transport = bench_transport(a.transport, a.link.as_ref())?;
    if a.ot.is_empty() {
        return Err(BenchError::Setup("--ot needs at least one OT kind".into()));
    }
    let mut reports = Vec::new();
    for &o in &a.ot {
        let ot = OtKind::from(o);
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
        reports.push(match &a.link {
            Some(l) => run_relu_bench_link(b, l)?,
            None => run_relu_bench(b, transport)?,
        });
    }
    let mut notes = String::new();
    if let Some(dir) = &a.report {
        let runs: Vec<RunCost> = reports
            .iter()
            .map(|r| RunCost {
                label: format!("{} OT", r.ot),
                rows: None,
                cost: r.cost.clone(),
                link: r.link.clone(),
            })
            .collect();
        let title = format!("bench relu, {} ReLUs, {}", a.count, reports[0].transport);
        let files = if reports.len() == 1 {
            write_report(dir, &title, &reports[0], &runs)?
        } else {
            write_report(dir, &title, &reports, &runs)?
        };
        notes = written(&files);
    }
    if a.json {
        let out = if reports.len() == 1 {
            serde_json::to_string(&reports[0])
        } else {
            serde_json::to_string(&reports)
        };
        return out.map_err(|e| BenchError::Output(e.to_string()));
    }
    let mut s = String::new();
    for r in &reports {
        let link = r.link.as_ref().map(LinkJson::render).unwrap_or_default();
        s.push_str(&format!(
            "{}\n{link}\n{}\n",
            relu_line(r),
            render_tables(&r.cost)
        ));
    }
    s.push_str(&notes);
    Ok(s)
}

fn written(files: &[PathBuf]) -> String {
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    format!("\nwrote {}\n", names.join(", "))
}

fn relu_line(r: &ReluReport) -> String {
    format!(
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
    )
}

/// Runs `bench infer` and returns the text to print.
fn run_infer_cmd(a: &InferBenchArgs) -> Result<String, BenchError> {
    let transport = bench_transport(a.transport, a.link.as_ref())?;
    let model_path = match &a.model {
        Some(p) => p.clone(),
        None => bundled(BUNDLED_MODEL)
            .ok_or_else(|| BenchError::Setup(format!("no model file at {BUNDLED_MODEL}")))?,
    };
    let dir = match &a.mnist_dir {
        Some(d) => d.clone(),
        None => bundled(BUNDLED_MNIST)
            .ok_or_else(|| BenchError::Setup(format!("no MNIST files at {BUNDLED_MNIST}")))?,
    };
    let images = mnist::read_images(&Split::Test.images_path(&dir))
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let reports = run_infer_bench(
        &model_path,
        &images,
        &a.rows,
        a.output,
        transport,
        a.link.as_ref(),
        a.linear,
    )?;
    let json = |r: &[InferReport]| {
        if r.len() == 1 {
            serde_json::to_string_pretty(&r[0])
        } else {
            serde_json::to_string_pretty(r)
        }
    };
    let mut notes = String::new();
    if let Some(dir) = &a.report {
        let runs: Vec<RunCost> = reports.iter().map(InferReport::run_cost).collect();
        let title = match &a.link {
            Some(l) => format!("bench infer, link {}", l.label),
            None => format!("bench infer, {}", reports[0].transport),
        };
        let files = if reports.len() == 1 {
            write_report(dir, &title, &reports[0], &runs)?
        } else {
            write_report(dir, &title, &reports, &runs)?
        };
        notes = written(&files);
    }
    if a.json {
        return json(&reports).map_err(|e| BenchError::Output(e.to_string()));
    }
    let mut s = String::new();
    for r in &reports {
        s.push_str(&format!(
            "{} rows ({}, {}): online {:.1} KB/row, {:.2} ms/row, {} rounds, {:.3} s; setup {:.1} KB, {} rounds, {:.3} s; verified {}\n",
            r.rows,
            r.transport,
            r.output,
            r.bytes_per_row_online / 1e3,
            r.ms_per_row_online,
            r.online.rounds,
            r.online.seconds,
            r.setup.bytes_total() as f64 / 1e3,
            r.setup.rounds,
            r.setup.seconds,
            r.verified
        ));
        if r.offline.bytes_total() > 0 {
            s.push_str(&format!(
                "  linear layers preprocessed: offline {:.1} KB/row, {:.2} ms/row, {} rounds, {:.3} s (reported apart)\n",
                r.offline.bytes_total() as f64 / 1e3 / r.rows.max(1) as f64,
                r.offline.seconds * 1e3 / r.rows.max(1) as f64,
                r.offline.rounds,
                r.offline.seconds,
            ));
        }
        if let Some(l) = &r.link {
            s.push_str(&l.render());
        }
        s.push('\n');
        s.push_str(&render_tables(&r.cost));
        s.push('\n');
    }
    s.push_str(&notes);
    Ok(s)
}

/// The JSON report of one `bench infer` run.
#[derive(Clone, Debug, Serialize)]
pub struct InferReport {
    /// rows in the batch
    pub rows: usize,
    /// the backend (`cheetah`)
    pub backend: String,
    /// the core OT (`iknp`)
    pub ot: String,
    /// the 1-of-N OT of the millionaire leaves
    pub kn: String,
    /// bits per millionaire leaf
    pub leaf_bits: u32,
    /// the transport
    pub transport: String,
    /// what left the protocol
    pub output: OutputMode,
    /// linear layers `online` or `preprocessed`
    pub linear: String,
    /// the session set-up (hello, HE keys, base OTs), client side
    pub setup: PhaseCost,
    /// the batch's preprocessing (`offline/*` steps: HE on the masks with
    /// `--linear preprocessed`; zero otherwise), client side
    pub offline: PhaseCost,
    /// the rest of the batch, client side
    pub online: PhaseCost,
    /// per step, client side
    pub steps: Vec<StepJson>,
    /// online bytes both ways per row
    pub bytes_per_row_online: f64,
    /// online wall time per row, milliseconds
    pub ms_per_row_online: f64,
    /// whether the labels (and logits) equal the fixed-point evaluator's (always checked)
    pub verified: bool,
    /// per layer (the steps summed by the part of their name before `/`), client side
    pub layers: Vec<StepCost>,
    /// through the link emulator: the profile, wire bytes and measured time against the
    /// model per phase (null without `--link`)
    pub link: Option<LinkJson>,
    /// the counting channel's report the figures come from
    #[serde(skip)]
    pub cost: CostReport,
}

impl InferReport {
    /// The run as the report writer takes it.
    pub fn run_cost(&self) -> RunCost {
        RunCost {
            label: format!("{} row{}", self.rows, if self.rows == 1 { "" } else { "s" }),
            rows: Some(self.rows),
            cost: self.cost.clone(),
            link: self.link.clone(),
        }
    }
}

/// The first `rows` MNIST images of `images` (cycled), as pixels.
fn first_images(images: &[u8], rows: usize) -> Vec<u8> {
    images
        .chunks_exact(mnist::PIXELS)
        .cycle()
        .take(rows)
        .flatten()
        .copied()
        .collect()
}

/// Checks a run against the evaluator.
fn verify(
    model: &FixedModel,
    x: &[u64],
    labels: &[usize],
    logits: Option<&[u64]>,
) -> Result<(), BenchError> {
    let e = eval_fixed(model, x).map_err(|e| BenchError::Setup(e.to_string()))?;
    if let Some(i) = e.labels.iter().zip(labels).position(|(a, b)| a != b) {
        return Err(BenchError::Wrong(i));
    }
    if e.labels.len() != labels.len() {
        return Err(BenchError::Wrong(labels.len().min(e.labels.len())));
    }
    if let Some(i) = logits.and_then(|l| e.logits.iter().zip(l).position(|(a, b)| a != b)) {
        return Err(BenchError::Wrong(i / e.classes.max(1)));
    }
    Ok(())
}

fn infer_report(
    rows: usize,
    transport: &str,
    output: OutputMode,
    cost: &CostReport,
    config: &CheetahConfig,
) -> InferReport {
    let c = CostJson::from_report(cost);
    let n = rows.max(1) as f64;
    InferReport {
        rows,
        backend: Cheetah::NAME.into(),
        ot: config.ot.name().into(),
        kn: match config.mpc.kn {
            KkotConfig::Kk13 => "kk13".into(),
            _ => "cots".into(),
        },
        leaf_bits: config.mpc.leaf_bits,
        transport: transport.into(),
        output,
        linear: config.linear.name().into(),
        setup: c.setup,
        offline: c.offline,
        online: c.online,
        bytes_per_row_online: c.online.bytes_total() as f64 / n,
        ms_per_row_online: c.online.seconds * 1e3 / n,
        steps: c.steps,
        verified: true,
        layers: c.layers,
        link: None,
        cost: cost.clone(),
    }
}

/// One session in memory: set-up, one batch; the client's output and costs.
fn infer_memory(
    model: &FixedModel,
    x: &[u64],
    rows: usize,
    output: OutputMode,
    config: &CheetahConfig,
) -> Result<(BatchOutput, CostReport), BenchError> {
    let (s, c) = memory_pair();
    let spec = ModelSpec::of(model);
    std::thread::scope(|sc| {
        let server = sc.spawn(move || {
            let mut ch = s;
            let mut rng = rand::rng();
            let mut policy = LocalPolicy::new(rows as u64, output, None);
            let mut srv = Cheetah::server_setup(&mut ch, model, config, &mut rng)?;
            srv.serve(&mut ch, model, &mut policy, &mut Honest, &mut rng)
        });
        let client = (|| {
            let mut ch = Counting::new(c);
            let mut rng = rand::rng();
            let mut cl = Cheetah::client_setup(&mut ch, &spec, config, &mut rng)?;
            let out = cl.run_batch(&mut ch, x, rows, output, &mut rng)?;
            let (_, cost) = ch.into_parts();
            Ok::<_, BackendError>((out, cost))
        })();
        let server = server.join().map_err(|_| BenchError::Panicked)?;
        let out = client.map_err(|e| BenchError::Backend {
            party: Party::Client,
            source: e,
        })?;
        server.map_err(|e| BenchError::Backend {
            party: Party::Server,
            source: e,
        })?;
        Ok(out)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Setup(e.to_string()))
}

/// Runs `bench infer` for each batch size: one session each, checked against the
/// evaluator.
pub fn run_infer_bench(
    model_path: &std::path::Path,
    images: &[u8],
    rows: &[usize],
    output: OutputMode,
    transport: Transport,
    link: Option<&LinkArg>,
    linear: LinearMode,
) -> Result<Vec<InferReport>, BenchError> {
    if rows.is_empty() || rows.contains(&0) {
        return Err(BenchError::Setup(
            "--rows needs positive batch sizes".into(),
        ));
    }
    // a link runs over the product transport (the command's own rule)
    bench_transport(Some(transport), link)?;
    let config = CheetahConfig {
        linear,
        ..CheetahConfig::default()
    };
    let model = Model::load(model_path).map_err(|e| BenchError::Setup(e.to_string()))?;
    let fm = model.fixed_model();
    match transport {
        Transport::Memory => rows
            .iter()
            .map(|&n| {
                let x = fm.encode_images(&first_images(images, n));
                let (out, cost) = infer_memory(fm, &x, n, output, &config)?;
                verify(fm, &x, &out.labels, out.logits.as_deref())?;
                Ok(infer_report(n, "memory", output, &cost, &config))
            })
            .collect(),
        Transport::Tls => runtime()?.block_on(async {
            let max = rows.iter().copied().max().unwrap_or(1) as u64;
            let policy = Policy {
                max_rows: max,
                output,
                // the bench measures cost, not policy
                budget: None,
                ..Policy::default()
            };
            let served = ServedModel::new("bench", model.clone());
            let state = ServerState::new(Some(served), policy, SessionLimits::default());
            let server = LocalServer::start(state, Registry::with_builtins())
                .await
                .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
            let client = server
                .client()
                .await
                .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
            let info = client.model_info().await.map_err(InferError::from)?;
            // Through the link: a second client whose connection goes through the relay
            // (the TLS handshake and HTTP/2 set-up done here, before the counters are read).
            let linked = match link {
                Some(l) => {
                    let emu = LinkEmulator::start(server.handle.local_addr(), l.profile)
                        .map_err(|e| BenchError::Setup(e.to_string()))?;
                    let c = server
                        .client_at(emu.local_addr().port())
                        .await
                        .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
                    c.model_info().await.map_err(InferError::from)?;
                    Some((l, emu, c))
                }
                None => None,
            };
            let mut reports = Vec::new();
            for &n in rows {
                let x = fm.encode_images(&first_images(images, n));
                let opts = InferOptions {
                    output: Some(output),
                    batch_rows: Some(n),
                    cheetah: config,
                    ..InferOptions::default()
                };
                let out = run_with_info(&client, &info, Inputs::Encoded(&x), &opts).await?;
                verify_output(fm, &x, &out)?;
                let direct = infer_report(n, "tls", output, &out.cost, &config);
                let Some((l, emu, c)) = &linked else {
                    reports.push(direct);
                    continue;
                };
                let before = emu.counters().snapshot();
                let out = run_with_info(c, &info, Inputs::Encoded(&x), &opts).await?;
                let after = emu.counters().snapshot();
                verify_output(fm, &x, &out)?;
                let mut r = infer_report(n, "tls+link", output, &out.cost, &config);
                r.link = Some(LinkJson::new(
                    &l.profile,
                    &l.label,
                    COMPUTE_FROM,
                    (after.0 - before.0, after.1 - before.1),
                    (&r.setup, &r.online),
                    (&direct.setup, &direct.online),
                ));
                reports.push(r);
            }
            server
                .shutdown()
                .await
                .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
            Ok(reports)
        }),
    }
}

/// Checks a TLS run's labels (and logits) against the evaluator.
fn verify_output(model: &FixedModel, x: &[u64], out: &InferOutput) -> Result<(), BenchError> {
    let ring = model.fixed_point().ring();
    let logits: Option<Vec<u64>> = out
        .logits
        .as_ref()
        .map(|l| l.iter().flatten().map(|&v| ring.from_signed(v)).collect());
    verify(model, x, &out.labels, logits.as_deref())
}

/// Which transport carries the two parties' messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// in-process memory duplex
    Memory,
    /// the product gRPC stream over mutual TLS on loopback: a real server in this
    /// process (port 0, ephemeral certificates) and a real client
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
    /// the client's steps (`setup`, `relu`)
    pub steps: Vec<StepJson>,
    /// through the link emulator: the profile, wire bytes and measured time against the
    /// model per phase (`online` is the ReLU batch; null without `--link`)
    pub link: Option<LinkJson>,
    /// the client's counting-channel report
    #[serde(skip)]
    pub cost: CostReport,
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
    /// a backend role failed
    #[error("the {party:?} role of the backend failed")]
    Backend {
        /// which party failed
        party: Party,
        /// why
        source: BackendError,
    },
    /// the secure inference over TLS failed
    #[error(transparent)]
    Infer(#[from] InferError),
    /// the in-process server, the model or the data could not be set up
    #[error("setting up: {0}")]
    Setup(String),
    /// the secure result differs from the plaintext (ReLU) or the evaluator (inference)
    #[error("the secure result differs from the plaintext at element (or row) {0}")]
    Wrong(usize),
    /// the report could not be rendered
    #[error("output: {0}")]
    Output(String),
    /// the report directory could not be written
    #[error(transparent)]
    Report(#[from] crate::charts::ReportError),
    /// `--transport memory` with `--link`: the link emulator relays TCP, so a link runs
    /// over TLS
    #[error(
        "--transport memory conflicts with --link {link}: a link runs over TLS (drop \
         --transport or give --transport tls)"
    )]
    MemoryWithLink {
        /// the --link value given
        link: String,
    },
}

/// Runs the bench over the chosen transport.
pub fn run_relu_bench(b: ReluBench, transport: Transport) -> Result<ReluReport, BenchError> {
    match transport {
        Transport::Memory => {
            let (s, c) = memory_pair();
            run_relu_bench_over(b, s, c, "memory")
        }
        Transport::Tls => run_relu_bench_tls(b, None).map(|(r, _)| r),
    }
}

/// The bench over TLS twice: straight on loopback (the compute term), then through the
/// link emulator; the second run's report with the link model.
pub fn run_relu_bench_link(b: ReluBench, link: &LinkArg) -> Result<ReluReport, BenchError> {
    let (direct, _) = run_relu_bench_tls(b, None)?;
    let (mut r, wire) = run_relu_bench_tls(b, Some(link.profile))?;
    let phase = |p: &Phase| PhaseCost {
        bytes_sent: p.bytes_sent,
        bytes_received: p.bytes_received,
        rounds: p.rounds,
        seconds: p.seconds,
        ..PhaseCost::default()
    };
    r.transport = "tls+link".into();
    r.link = Some(LinkJson::new(
        &link.profile,
        &link.label,
        COMPUTE_FROM,
        wire,
        (&phase(&r.setup), &phase(&r.relu)),
        (&phase(&direct.setup), &phase(&direct.relu)),
    ));
    Ok(r)
}

type PartyOut = (Vec<u64>, StepCost, StepCost, Option<f64>, CostReport);

/// The server's job of a TLS bench: its shares, and where to put its result.
type ServerJob = (
    Vec<u64>,
    std::sync::mpsc::Sender<Result<PartyOut, MpcError>>,
);

/// The diagnostic backend of the TLS bench, registered only in its in-process server.
const BENCH_RELU: &str = "bench-relu";

/// The ReLU bench over the product transport: the server role runs as the session
/// runner of a real server in this process, the client role over gRPC and TLS (through
/// the link emulator when `link` is given: then also the bytes it relayed each way
/// during the session).
fn run_relu_bench_tls(
    b: ReluBench,
    link: Option<LinkProfile>,
) -> Result<(ReluReport, (u64, u64)), BenchError> {
    let ring = Ring::new(b.bits)?;
    let mut rng = rand::rng();
    let x: Vec<u64> = (0..b.count).map(|_| ring.random(&mut rng)).collect();
    let (x0, x1): (Vec<u64>, Vec<u64>) = x.iter().map(|&v| ring.share(v, &mut rng)).unzip();
    let (tx, rx) = std::sync::mpsc::channel();
    let slot: Arc<Mutex<Option<ServerJob>>> = Arc::new(Mutex::new(Some((x0, tx))));
    let mut registry = Registry::with_builtins();
    let job = slot.clone();
    registry
        .register(
            BENCH_RELU,
            move |ch: &mut dyn Channel, _: &StartInfo, _: &ServerState| {
                let taken = job.lock().unwrap_or_else(|e| e.into_inner()).take();
                let Some((x0, tx)) = taken else {
                    return Err(RunnerError::Refused(Refusal::policy(
                        "one bench session only",
                    )));
                };
                let r = party(ch, Party::Server, b, ring, x0);
                let failed = r.as_ref().err().map(|e| e.to_string());
                let _ = tx.send(r);
                match failed {
                    None => Ok(()),
                    Some(e) => Err(RunnerError::Refused(Refusal::invalid(e))),
                }
            },
        )
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    // One call of `MpcSession::relu` on the whole count sends messages in proportion to
    // it (an IKNP extension of 96 MiB at 2^20 ReLUs, over the 64 MiB default; the product
    // backends call it on at most 2^17 values). Both ends of this in-process pair allow
    // 1 KiB a ReLU, the default at least.
    let mut limits = SessionLimits::default();
    limits.frames.max_message = relu_bench_max_message(b.count, limits.frames.max_message);
    let options = ClientOptions {
        frames: limits.frames,
        ..ClientOptions::default()
    };
    let client_out = runtime()?.block_on(async {
        let state = ServerState::new(None, Policy::default(), limits);
        let server = LocalServer::start(state, registry)
            .await
            .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
        let emu = link
            .map(|p| LinkEmulator::start(server.handle.local_addr(), p))
            .transpose()
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        let port = match &emu {
            Some(e) => e.local_addr().port(),
            None => server.handle.local_addr().port(),
        };
        let client = server
            .client_with(port, options)
            .await
            .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
        // the TLS handshake and HTTP/2 set-up before the counters are read
        client.model_info().await.map_err(InferError::from)?;
        let before = emu.as_ref().map(|e| e.counters().snapshot());
        let out = client
            .session(SessionStart::new(BENCH_RELU), move |ch, _| {
                party(ch, Party::Client, b, ring, x1)
            })
            .await
            .map_err(|e| BenchError::Setup(format!("the TLS session failed: {e}")));
        let wire = match (&emu, before) {
            (Some(e), Some(b)) => {
                let a = e.counters().snapshot();
                (a.0 - b.0, a.1 - b.1)
            }
            _ => (0, 0),
        };
        server
            .shutdown()
            .await
            .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
        out.map(|o| (o, wire))
    })?;
    let (client_out, wire) = client_out;
    let rs = rx.recv().map_err(|_| BenchError::Panicked)?;
    let r = relu_report(b, ring, &x, Ok(client_out.value), rs, "tls")?;
    Ok((r, wire))
}

/// The message limit of the ReLU bench's in-process pair: 1 KiB a ReLU, at least `floor`.
fn relu_bench_max_message(count: usize, floor: usize) -> usize {
    count.saturating_mul(1 << 10).max(floor)
}

fn party(
    ch: &mut dyn Channel,
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
    let mut r = ch.report();
    for s in r.steps.iter_mut().filter(|s| s.step == "relu") {
        s.seconds = secs;
    }
    let mut relu = r.total_with_prefix("relu");
    relu.seconds = secs;
    Ok((y, r.total_with_prefix("setup"), relu, cpu, r))
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
    let mut server = server;
    let mut client = client;
    let hs = std::thread::spawn(move || party(&mut server, Party::Server, b, ring, x0));
    let hc = std::thread::spawn(move || party(&mut client, Party::Client, b, ring, x1));
    let rc = hc.join().map_err(|_| BenchError::Panicked)?;
    let rs = hs.join().map_err(|_| BenchError::Panicked)?;
    relu_report(b, ring, &x, rc, rs, transport)
}

/// Checks both parties' outputs against the plaintext ReLU and makes the report.
fn relu_report(
    b: ReluBench,
    ring: Ring,
    x: &[u64],
    rc: Result<PartyOut, MpcError>,
    rs: Result<PartyOut, MpcError>,
    transport: &str,
) -> Result<ReluReport, BenchError> {
    let (y1, setup, relu, cpu_c, cost) = rc.map_err(|source| BenchError::Protocol {
        party: Party::Client,
        source,
    })?;
    let (y0, _, srelu, cpu_s, _) = rs.map_err(|source| BenchError::Protocol {
        party: Party::Server,
        source,
    })?;
    if y0.len() != b.count || y1.len() != b.count {
        return Err(BenchError::Wrong(y0.len().min(y1.len())));
    }
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
        steps: CostJson::from_report(&cost).steps,
        link: None,
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ReLU bench's pair allows the largest message measured at 2^20 ReLUs (the IKNP
    /// extension, 100,663,296 bytes at l = 32, refused by the 64 MiB default before) and
    /// keeps the default for small counts.
    #[test]
    fn the_relu_bench_limit_covers_its_largest_message() {
        let default = fusion_common::net::frame::DEFAULT_MAX_MESSAGE;
        assert!(relu_bench_max_message(1 << 20, default) >= 100_663_296);
        assert!(100_663_296 > default);
        assert_eq!(relu_bench_max_message(65_536, default), default);
        assert_eq!(relu_bench_max_message(usize::MAX, default), usize::MAX);
    }

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
        // the same over a real server and client (gRPC, mutual TLS): same bytes, same
        // flights (the payload is the protocol's, whatever carries it)
        fusion_common::net::install_crypto_provider();
        let t = run_relu_bench(b, Transport::Tls).unwrap();
        assert_eq!(t.transport, "tls");
        assert!(t.verified);
        assert_eq!((t.bytes_total, t.rounds), (r.bytes_total, r.rounds));
        assert_eq!(t.setup.bytes_total, r.setup.bytes_total);
    }

    #[test]
    fn infer_bench_in_memory_and_over_tls_is_verified_and_consistent() {
        fusion_common::net::install_crypto_provider();
        let model = bundled(BUNDLED_MODEL).unwrap();
        let dir = bundled(BUNDLED_MNIST).unwrap();
        let images = mnist::read_images(&Split::Test.images_path(&dir)).unwrap();
        let m = run_infer_bench(
            &model,
            &images,
            &[2],
            OutputMode::Logits,
            Transport::Memory,
            None,
            LinearMode::Online,
        )
        .unwrap();
        let t = run_infer_bench(
            &model,
            &images,
            &[2],
            OutputMode::Logits,
            Transport::Tls,
            None,
            LinearMode::Online,
        )
        .unwrap();
        // preprocessed linear layers through the real service (the server takes the mode
        // from the hello): verified, the HE offline
        let p = run_infer_bench(
            &model,
            &images,
            &[2],
            OutputMode::Logits,
            Transport::Tls,
            None,
            LinearMode::Preprocessed,
        )
        .unwrap();
        assert!(p[0].verified && p[0].linear == "preprocessed");
        assert!(p[0].offline.bytes_total() > 100_000);
        assert!(p[0].online.bytes_total() < t[0].online.bytes_total() / 10);
        for r in m.iter().chain(&t).chain(&p) {
            assert!(r.verified && r.rows == 2);
            assert!(r.setup.bytes_total() > 0 && r.online.rounds > 0);
            let sum: u64 = r
                .steps
                .iter()
                .filter(|s| !s.step.starts_with("setup") && !s.step.starts_with("offline"))
                .map(|s| s.bytes_sent + s.bytes_received)
                .sum();
            assert_eq!(sum, r.online.bytes_total());
            assert!((r.bytes_per_row_online - sum as f64 / 2.0).abs() < 1e-9);
        }
        // the protocol's bytes do not depend on the transport
        assert_eq!(m[0].online.bytes_total(), t[0].online.bytes_total());
        assert_eq!(m[0].setup.bytes_total(), t[0].setup.bytes_total());
        let steps: Vec<&str> = t[0].steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(steps.last(), Some(&"output/reveal"));
        let v = serde_json::to_value(&t[0]).unwrap();
        for k in [
            "rows",
            "setup",
            "online",
            "steps",
            "bytes_per_row_online",
            "ms_per_row_online",
            "backend",
            "ot",
            "verified",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["steps"][0]["layer"], "setup");
    }

    /// Through the link emulator: every payload byte the counting channel saw crossed the
    /// relay's sockets (per direction), the rest is TLS/HTTP2/gRPC overhead reported
    /// apart and bounded, and the payload equals the in-memory run's byte for byte.
    #[test]
    fn relu_bench_through_a_link_puts_wire_bytes_next_to_the_counted_payload() {
        fusion_common::net::install_crypto_provider();
        let b = ReluBench {
            count: 3000,
            bits: 32,
            config: MpcConfig::default(),
            ot: OtKind::Iknp,
        };
        let mem = run_relu_bench(b, Transport::Memory).unwrap();
        let link = parse_link("2000/0.1").unwrap();
        let r = run_relu_bench_link(b, &link).unwrap();
        assert!(r.verified);
        assert_eq!(r.transport, "tls+link");
        let l = r.link.as_ref().unwrap();
        assert_eq!((l.profile.as_str(), l.rate_mbit), ("2000/0.1", 2000.0));
        assert!((l.one_way_delay_ms - 0.1).abs() < 1e-12);
        // the protocol's bytes do not depend on the carrier
        let payload = r.setup.bytes_total + r.relu.bytes_total;
        assert_eq!(payload, mem.setup.bytes_total + mem.bytes_total);
        assert_eq!(l.payload_bytes, payload);
        // per direction, the relay carried at least the payload
        let sent = r.setup.bytes_sent + r.relu.bytes_sent;
        let received = r.setup.bytes_received + r.relu.bytes_received;
        assert!(l.wire_bytes_up >= sent, "{} < {sent}", l.wire_bytes_up);
        assert!(
            l.wire_bytes_down >= received,
            "{} < {received}",
            l.wire_bytes_down
        );
        let wire = l.wire_bytes_up + l.wire_bytes_down;
        assert_eq!(l.overhead_bytes, wire - payload);
        // framing costs a few bytes per frame and record, not a multiple of the payload
        assert!(
            l.overhead_bytes > 0 && l.overhead_bytes < payload / 10 + 64 * 1024,
            "overhead {} for payload {payload}",
            l.overhead_bytes
        );
        // the model's terms add up, from the counted rounds and bytes
        for (p, phase) in [(&l.setup, &r.setup), (&l.online, &r.relu)] {
            assert_eq!((p.rounds, p.bytes), (phase.rounds, phase.bytes_total));
            assert!((p.latency_seconds - p.rounds as f64 * 1e-4).abs() < 1e-12);
            assert!((p.transfer_seconds - p.bytes as f64 * 8.0 / 2e9).abs() < 1e-12);
            let sum = p.compute_seconds + p.latency_seconds + p.transfer_seconds;
            assert!((p.model_seconds - sum).abs() < 1e-12);
            assert_eq!(p.measured_seconds, phase.seconds);
        }
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["link"]["compute_from"], COMPUTE_FROM);
        assert_eq!(v["steps"][0]["step"], "setup");
    }

    /// `bench infer --json` over a sweep: an array of complete per-run objects, and
    /// `--report` writes the JSON (the same array), the Markdown and the charts.
    #[test]
    fn infer_bench_sweep_json_is_complete_and_the_report_dir_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let args = BenchArgs {
            what: BenchCmd::Infer(InferBenchArgs {
                rows: vec![1, 3],
                transport: Some(Transport::Memory),
                output: OutputMode::Labels,
                linear: LinearMode::Preprocessed,
                model: None,
                mnist_dir: None,
                link: None,
                json: true,
                report: Some(dir.path().to_owned()),
            }),
        };
        let out = run(&args).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let runs = v.as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for (r, rows) in runs.iter().zip([1, 3]) {
            assert_eq!(r["rows"], rows);
            for k in [
                "backend",
                "ot",
                "kn",
                "leaf_bits",
                "transport",
                "output",
                "linear",
                "setup",
                "offline",
                "online",
                "steps",
                "layers",
                "bytes_per_row_online",
                "ms_per_row_online",
                "verified",
                "link",
            ] {
                assert!(r.get(k).is_some(), "{k} missing");
            }
            assert_eq!(r["linear"], "preprocessed");
            // the HE ran offline: the online phase is the masked inputs and the 2PC layers
            let bytes = |p: &str| r[p]["bytes_sent"].as_u64().unwrap();
            assert!(bytes("offline") > 100_000, "{}", r["offline"]);
            assert!(bytes("online") < bytes("offline"));
            for phase in ["setup", "offline", "online"] {
                for k in [
                    "bytes_sent",
                    "bytes_received",
                    "messages_sent",
                    "messages_received",
                    "rounds",
                    "seconds",
                ] {
                    assert!(r[phase][k].is_number(), "{phase}.{k}");
                }
            }
            assert!(r["link"].is_null());
            // the layers sum to the steps
            let sum = |key: &str, k: &str| -> u64 {
                r[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s[k].as_u64().unwrap())
                    .sum()
            };
            assert_eq!(sum("steps", "bytes_sent"), sum("layers", "bytes_sent"));
            assert_eq!(sum("steps", "rounds"), sum("layers", "rounds"));
            let layers: Vec<&str> = r["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["step"].as_str().unwrap())
                .collect();
            assert_eq!(layers.first(), Some(&"setup"));
            assert!(layers.contains(&"layer1") && layers.contains(&"output"));
        }
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(written.as_array().map(Vec::len), Some(2));
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## 3 rows") && md.contains("| **online** |"));
        for f in ["layers-1-row.png", "layers-3-rows.png", "sweep.png"] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
    }

    /// `bench ... --link` runs over TLS; an explicit `--transport memory` with it is a
    /// named conflict, refused before anything runs (not silently run over TLS).
    #[test]
    fn an_explicit_memory_transport_with_a_link_is_refused() {
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let parse = |args: &[&str]| {
            let argv = ["bench"].iter().chain(args).copied();
            <Cmd as clap::Parser>::try_parse_from(argv).unwrap().bench
        };
        let transport = |b: &BenchArgs| match &b.what {
            BenchCmd::Infer(a) => bench_transport(a.transport, a.link.as_ref()),
            BenchCmd::Relu(a) => bench_transport(a.transport, a.link.as_ref()),
        };
        for cmd in ["infer", "relu"] {
            let b = parse(&[cmd, "--transport", "memory", "--link", "lan"]);
            let r = transport(&b);
            assert!(
                matches!(&r, Err(BenchError::MemoryWithLink { link }) if link == "lan"),
                "{r:?}"
            );
            // the command itself refuses it, before it loads or runs anything
            let e = run(&b).unwrap_err();
            assert!(matches!(e, BenchError::MemoryWithLink { .. }), "{e:?}");
            assert!(
                e.to_string()
                    .contains("--transport memory conflicts with --link lan"),
                "{e}"
            );
            // a link alone, or with tls, runs over TLS; memory is the default without
            for (args, t) in [
                (&[cmd, "--link", "wan"][..], Transport::Tls),
                (
                    &[cmd, "--transport", "tls", "--link", "lan"],
                    Transport::Tls,
                ),
                (&[cmd], Transport::Memory),
                (&[cmd, "--transport", "memory"], Transport::Memory),
                (&[cmd, "--transport", "tls"], Transport::Tls),
            ] {
                assert_eq!(transport(&parse(args)).unwrap(), t, "{args:?}");
            }
        }
        // the library entry point refuses the pair too
        let link = parse_link("lan").unwrap();
        let r = run_infer_bench(
            std::path::Path::new("/nonexistent"),
            &[],
            &[1],
            OutputMode::Labels,
            Transport::Memory,
            Some(&link),
            LinearMode::Online,
        );
        assert!(matches!(r, Err(BenchError::MemoryWithLink { .. })), "{r:?}");
    }

    #[test]
    fn link_flags_parse_and_refuse_nonsense() {
        assert_eq!(parse_link("wan").unwrap().profile, LinkProfile::WAN);
        assert_eq!(parse_link("100/40").unwrap().label, "100/40");
        assert!(parse_link("fast").is_err());
    }

    #[test]
    fn relu_bench_over_ferret_reports_the_ot_and_memory() {
        let dir = tempfile::tempdir().unwrap();
        let args = BenchArgs {
            what: BenchCmd::Relu(ReluArgs {
                count: 500,
                bits: 37,
                transport: Some(Transport::Memory),
                ot: vec![OtArg::Iknp, OtArg::Ferret],
                leaf_bits: None,
                kn: None,
                link: None,
                json: true,
                report: Some(dir.path().to_owned()),
            }),
        };
        let out = run(&args).unwrap();
        let runs: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(runs.as_array().map(Vec::len), Some(2));
        assert_eq!(runs[0]["ot"], "iknp");
        let v = &runs[1];
        assert_eq!(v["ot"], "ferret");
        assert_eq!(v["kn"], "cots");
        assert_eq!(v["verified"], true);
        // the setup carries the IKNP bootstrap (74,036 COTs each way, 16 bytes each)
        assert!(v["setup"]["bytes_total"].as_u64().unwrap() > 2 * 16 * 74_036);
        // 500 ReLUs come out of the bootstrap's spare COTs: protocol bytes only
        assert!(v["bits_per_relu"].as_f64().unwrap() < 480.0);
        assert!(v["peak_memory_bytes"].as_u64().unwrap_or(1) > 0);
        // the two OT kinds compared in the report directory
        for f in [
            "report.json",
            "report.md",
            "layers-iknp-OT.png",
            "layers-ferret-OT.png",
            "sweep.png",
        ] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
    }
}
