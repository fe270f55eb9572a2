//! `fusion-client attack papernot|carlini ...`.

use super::carlini::hybrid::{self, FirstLayerFile, HybridConfig, HybridReport};
use super::carlini::{CarliniConfig, carlini};
use super::data::{Arithmetic, AttackData};
use super::oracle::{
    DEFAULT_MAX_BATCH, LocalF32Oracle, LocalFixedOracle, Oracle, OracleError, OutputMode, Policy,
};
use super::papernot::{PapernotConfig, SubstituteReport, baseline, papernot};
use super::report::{CurvePoint, RunRecord, markdown, write};
use super::service::ServiceOracle;
use crate::args::ConnectArgs;
use crate::local::LocalServer;
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use fusion_common::net::connect::ServerAddress;
use fusion_common::nn::Model;
use fusion_server::runner::Registry;
use fusion_server::state::{Policy as ServerPolicy, ServedModel, ServerState, SessionLimits};
use std::path::PathBuf;
use std::time::Instant;
use tokio::runtime::Runtime;

/// Arguments of `fusion-client attack`.
#[derive(Debug, Args)]
pub struct AttackArgs {
    #[command(subcommand)]
    pub attack: AttackCommand,
}

/// The attacks.
#[derive(Debug, Subcommand)]
pub enum AttackCommand {
    /// Papernot et al. substitute training (labels only), and the "label N real images"
    /// baseline.
    Papernot(PapernotArgs),
    /// Carlini-Jagielski-Mironov cryptanalytic extraction (needs logits).
    Carlini(CarliniArgs),
}

/// Which oracle answers the queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OracleKind {
    /// the fixed-point evaluator: exactly what the secure service computes
    LocalFixed,
    /// the plain f32 evaluator (validation)
    LocalF32,
    /// the real secure service at --server (its policy and budget apply; needs --ca,
    /// --cert, --key)
    Service,
    /// the real secure service, served by this process on 127.0.0.1 over mutual TLS
    /// with ephemeral certificates, under the policy the flags describe (a fresh budget
    /// per run)
    ServiceLocal,
}

/// Options shared by both attacks.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// the oracle
    #[arg(long, value_enum, default_value = "local-fixed")]
    pub oracle: OracleKind,
    /// the victim model (the local oracle's model, and the reference for measurements)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// with --oracle service: the server, as https://HOST:PORT
    #[arg(long, env = "FUSION_SERVER")]
    pub server: Option<ServerAddress>,
    /// with --oracle service: the CA certificate that issued the server's (PEM)
    #[arg(long, env = "FUSION_CA")]
    pub ca: Option<PathBuf>,
    /// with --oracle service: this client's certificate (PEM)
    #[arg(long, env = "FUSION_CERT")]
    pub cert: Option<PathBuf>,
    /// with --oracle service: this client's private key (PEM)
    #[arg(long, env = "FUSION_KEY")]
    pub key: Option<PathBuf>,
    /// with --oracle service: the name to check the server certificate against
    #[arg(long = "server-name", env = "FUSION_SERVER_NAME")]
    pub server_name: Option<String>,
    /// the MNIST directory
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// simulate the defended policy's output: labels only
    #[arg(long)]
    pub labels_only: bool,
    /// row budget of the oracle
    #[arg(long)]
    pub budget: Option<u64>,
    /// largest batch of one oracle call
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// run both policies locally: undefended (logits, no budget) and defended (labels
    /// only, `--defended-budget`); ignores --labels-only and --budget
    #[arg(long)]
    pub compare: bool,
    /// the defended policy's budget for --compare
    #[arg(long, default_value_t = 10_000)]
    pub defended_budget: u64,
    /// write run-*.json, report.json, report.md and agreement.png into this directory
    /// (merging with the runs already there)
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// print the run records as JSON on stdout (no progress bars)
    #[arg(long)]
    pub json: bool,
    /// seed of the attack's random choices
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `attack papernot`.
#[derive(Debug, Args)]
pub struct PapernotArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// substitution rounds
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// seed images
    #[arg(long, default_value_t = 150)]
    pub seeds: usize,
    /// Jacobian augmentation step
    #[arg(long, default_value_t = 0.1)]
    pub lambda: f32,
    /// period of the step's sign
    #[arg(long, default_value_t = 3)]
    pub tau: usize,
    /// training epochs per round
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// baseline sizes N (comma separated; default: 150 2^k, as many as the rounds)
    #[arg(long, value_delimiter = ',')]
    pub baseline: Vec<usize>,
    /// skip the baseline
    #[arg(long)]
    pub no_baseline: bool,
    /// skip the substitute training (run the baseline only)
    #[arg(long, conflicts_with = "no_baseline")]
    pub no_papernot: bool,
}

/// `attack carlini`.
#[derive(Debug, Args)]
pub struct CarliniArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// critical points per neuron (0: twice the input length)
    #[arg(long, default_value_t = 0)]
    pub points_per_neuron: usize,
    /// stop collecting after this many rows
    #[arg(long, default_value_t = 5_000_000)]
    pub max_queries: u64,
    /// rows of the second phase: lines aimed at the corners where neurons not yet found
    /// switch (one hidden layer), or the refit of first-layer rows (deeper networks,
    /// rounded outputs)
    #[arg(long, default_value_t = 1_500_000)]
    pub targeted_queries: u64,
    /// deeper networks, rounded outputs: do not probe weak rejected kinks again with a
    /// larger step nor judge a probe once more without its 2% worst inputs (the second
    /// chance is on by default)
    #[arg(long, conflicts_with = "retry_weak_probes")]
    pub no_retry_weak_probes: bool,
    /// the second chance for weak probes, the default (kept so older commands run)
    #[arg(long, hide = true)]
    pub retry_weak_probes: bool,
    /// samples per line at the first search level
    #[arg(long, default_value_t = 64)]
    pub grid: usize,
    /// save the extracted model (safetensors) here
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// deeper networks: save the first-layer result (rows, the signs used, the queries
    /// they cost, the victim's digest and widths) as JSON here; with --load-first-layer,
    /// the loaded rows with the signs the completion used
    #[arg(long)]
    pub save_first_layer: Option<PathBuf>,
    /// deeper networks: skip the search and use this saved first-layer result (refused if
    /// made against another model; its queries are counted in the report); the rows'
    /// signs are decided again by the chain's sign step (the file's kept where it decides
    /// none)
    #[arg(long)]
    pub load_first_layer: Option<PathBuf>,
    /// hybrid completion (Jagielski et al. 2020) when the cryptanalytic chain builds no
    /// model: logits of this many attacker images (MNIST training set) queried and
    /// learned with the recovered first-layer rows fixed, against the same learning with
    /// no row fixed; 0: no completion
    #[arg(long, default_value_t = 60_000)]
    pub learn_queries: usize,
    /// hybrid completion: uniform random points in [0,1]^d queried besides the images
    #[arg(long, default_value_t = 0)]
    pub learn_random: usize,
    /// hybrid completion: training epochs
    #[arg(long, default_value_t = 20)]
    pub learn_epochs: usize,
}

/// The oracle of one run, and what it needs kept alive.
enum Host {
    Fixed(LocalFixedOracle),
    F32(LocalF32Oracle),
    /// the service oracle, and the in-process server it talks to (service-local)
    Service(Box<ServiceOracle>, Option<LocalServer>),
}

impl Host {
    /// The oracle `kind` on `model` under `policy` (the service's own policy for
    /// `service`). `rt` runs the service's connections.
    fn new(
        kind: OracleKind,
        model: &Model,
        model_path: &std::path::Path,
        policy: Policy,
        c: &CommonArgs,
        rt: &Runtime,
    ) -> anyhow::Result<Self> {
        Ok(match kind {
            OracleKind::LocalFixed => Host::Fixed(LocalFixedOracle::new(model.clone(), policy)),
            OracleKind::LocalF32 => Host::F32(LocalF32Oracle::new(model.clone(), policy)),
            OracleKind::Service => {
                if c.labels_only || c.budget.is_some() {
                    anyhow::bail!(
                        "--labels-only and --budget set a local or service-local policy: a \
                         real server's policy is its own"
                    );
                }
                let connect = connect_args(c)?;
                let client = rt.block_on(connect.connect())?;
                let oracle = ServiceOracle::new(rt.handle().clone(), client)?;
                Host::Service(Box::new(oracle), None)
            }
            OracleKind::ServiceLocal => {
                let name = model_path
                    .file_stem()
                    .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
                let served = ServedModel::new(&name, model.clone());
                let state = ServerState::new(
                    Some(served),
                    server_policy(policy),
                    SessionLimits::default(),
                );
                let server = rt.block_on(LocalServer::start(state, Registry::with_builtins()))?;
                let client = rt.block_on(server.client())?;
                let oracle = ServiceOracle::new(rt.handle().clone(), client)?;
                Host::Service(Box::new(oracle), Some(server))
            }
        })
    }
    fn oracle(&mut self) -> &mut dyn Oracle {
        match self {
            Host::Fixed(o) => o,
            Host::F32(o) => o,
            Host::Service(o, _) => o.as_mut(),
        }
    }
    /// The policy in force (the server's, for a service).
    fn policy(&mut self) -> Policy {
        let o = self.oracle();
        Policy {
            output: o.mode(),
            budget: o.budget(),
            max_batch: o.max_batch(),
        }
    }
    /// A description for the report.
    fn describe(&mut self) -> String {
        let local = matches!(self, Host::Service(_, Some(_)));
        let d = self.oracle().describe();
        if local {
            format!("{d} (in-process server)")
        } else {
            d
        }
    }
    /// Details of the oracle for the report: ring wrap-around, service throughput.
    fn details(&self, details: &mut serde_json::Value) -> anyhow::Result<()> {
        match self {
            Host::Fixed(o) => details["wrap"] = serde_json::to_value(o.stats())?,
            Host::F32(_) => {}
            Host::Service(o, _) => {
                let s = o.stats();
                details["service"] = serde_json::to_value(s)?;
                details["service"]["rows_per_second"] = serde_json::to_value(s.rows_per_second())?;
            }
        }
        Ok(())
    }
    /// Stops an in-process server.
    fn close(self, rt: &Runtime) -> anyhow::Result<()> {
        if let Host::Service(_, Some(server)) = self {
            rt.block_on(server.shutdown())?;
        }
        Ok(())
    }
}

/// The server's policy simulating the attack's `policy`.
fn server_policy(policy: Policy) -> ServerPolicy {
    ServerPolicy {
        output: match policy.output {
            OutputMode::Labels => fusion_common::net::OutputMode::Labels,
            OutputMode::Logits => fusion_common::net::OutputMode::Logits,
        },
        budget: policy.budget,
        max_rows: policy.max_batch as u64,
        ..ServerPolicy::default()
    }
}

/// `--server`, `--ca`, `--cert`, `--key` for `--oracle service`.
fn connect_args(c: &CommonArgs) -> anyhow::Result<ConnectArgs> {
    let need = |o: &Option<PathBuf>, flag: &str| {
        o.clone()
            .with_context(|| format!("--oracle service needs {flag} (or its FUSION_ variable)"))
    };
    Ok(ConnectArgs {
        server: c
            .server
            .clone()
            .context("--oracle service needs --server (or FUSION_SERVER)")?,
        ca: need(&c.ca, "--ca")?,
        cert: need(&c.cert, "--cert")?,
        key: need(&c.key, "--key")?,
        server_name: c.server_name.clone(),
        busy_wait: crate::args::DEFAULT_BUSY_WAIT,
    })
}

fn arithmetic(kind: OracleKind) -> Arithmetic {
    match kind {
        OracleKind::LocalF32 => Arithmetic::F32,
        // the service computes exactly the fixed-point evaluation
        OracleKind::LocalFixed | OracleKind::Service | OracleKind::ServiceLocal => {
            Arithmetic::Fixed
        }
    }
}

/// The policies to run: both with --compare, else the one the flags describe.
fn policies(c: &CommonArgs) -> Vec<Policy> {
    let mut undefended = Policy::undefended();
    undefended.max_batch = c.max_batch;
    let mut defended = Policy::defended(c.defended_budget);
    defended.max_batch = c.max_batch;
    if c.compare && c.oracle != OracleKind::Service {
        return vec![undefended, defended];
    }
    vec![Policy {
        output: if c.labels_only {
            OutputMode::Labels
        } else {
            OutputMode::Logits
        },
        budget: c.budget,
        max_batch: c.max_batch,
    }]
}

/// The directories the run will write into (the report's, and those of the files
/// `--save` and `--save-first-layer` name), made before any query: a run of hours must
/// not end in "No such file or directory" with its results lost.
fn make_output_dirs(args: &AttackArgs) -> anyhow::Result<()> {
    let (common, files): (&CommonArgs, Vec<&PathBuf>) = match &args.attack {
        AttackCommand::Papernot(a) => (&a.common, Vec::new()),
        AttackCommand::Carlini(a) => (
            &a.common,
            a.save.iter().chain(&a.save_first_layer).collect(),
        ),
    };
    let parents = files
        .into_iter()
        .filter_map(|f| f.parent())
        .filter(|p| !p.as_os_str().is_empty());
    for dir in common.report.as_deref().into_iter().chain(parents) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the output directory {}", dir.display()))?;
    }
    Ok(())
}

/// Runs `fusion-client attack ...`.
pub fn run(args: AttackArgs) -> anyhow::Result<()> {
    make_output_dirs(&args)?;
    let (records, common) = match args.attack {
        AttackCommand::Papernot(a) => (run_papernot(&a)?, a.common),
        AttackCommand::Carlini(a) => (run_carlini(&a)?, a.common),
    };
    if let Some(dir) = &common.report {
        let written = write(dir, &records)?;
        if !common.json {
            for p in written {
                eprintln!("wrote {}", p.display());
            }
        }
    }
    if common.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        println!("{}", markdown(&records));
    }
    Ok(())
}

fn load_model(c: &CommonArgs, default: &str) -> anyhow::Result<(Model, PathBuf)> {
    let path = c.model.clone().unwrap_or_else(|| PathBuf::from(default));
    let m = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    Ok((m, path))
}

fn substitute_record(
    r: &SubstituteReport,
    policy: &Policy,
    oracle: &str,
    model: &std::path::Path,
    seconds: f64,
    host: &Host,
) -> anyhow::Result<RunRecord> {
    let mut details = serde_json::to_value(r)?;
    host.details(&mut details)?;
    Ok(RunRecord {
        attack: r.method.clone(),
        policy: policy.label(),
        defended: policy.output == OutputMode::Labels,
        oracle: oracle.to_string(),
        model: model.display().to_string(),
        queries: r.queries,
        seconds,
        curve: r
            .rounds
            .iter()
            .map(|p| CurvePoint {
                queries: p.queries,
                agreement: p.agreement,
                accuracy: p.test_accuracy,
            })
            .collect(),
        outcome: r.stopped.clone(),
        details,
    })
}

fn run_papernot(a: &PapernotArgs) -> anyhow::Result<Vec<RunRecord>> {
    let c = &a.common;
    let (model, path) = load_model(c, "models/mnist-dnn.safetensors")?;
    let with_baseline = !a.no_baseline;
    let data = AttackData::load(&c.data, &model, arithmetic(c.oracle), with_baseline)?;
    let cfg = PapernotConfig {
        seeds: a.seeds,
        rounds: a.rounds,
        lambda: a.lambda,
        tau: a.tau,
        epochs: a.epochs,
        seed: c.seed,
        ..PapernotConfig::default()
    };
    let sizes: Vec<usize> = if a.baseline.is_empty() {
        (0..a.rounds).map(|k| a.seeds << k).collect()
    } else {
        a.baseline.clone()
    };
    let rt = runtime(c)?;
    let mut out = Vec::new();
    for policy in policies(c) {
        if !a.no_papernot {
            let mut host = Host::new(c.oracle, &model, &path, policy, c, &rt)?;
            let (policy, desc) = (host.policy(), host.describe());
            if !c.json {
                eprintln!("papernot against {desc}");
            }
            let t = Instant::now();
            let r = papernot(host.oracle(), &data, &cfg, !c.json)?;
            let seconds = t.elapsed().as_secs_f64();
            out.push(substitute_record(
                &r, &policy, &desc, &path, seconds, &host,
            )?);
            host.close(&rt)?;
        }
        if with_baseline {
            // a fresh oracle (a fresh budget, except on a real server: the same
            // certificate's budget)
            let mut host = Host::new(c.oracle, &model, &path, policy, c, &rt)?;
            let (policy, desc) = (host.policy(), host.describe());
            if !c.json {
                eprintln!("baseline (label N real images) against {desc}");
            }
            let t = Instant::now();
            let r = baseline(host.oracle(), &data, &cfg, &sizes, !c.json)?;
            let seconds = t.elapsed().as_secs_f64();
            out.push(substitute_record(
                &r, &policy, &desc, &path, seconds, &host,
            )?);
            host.close(&rt)?;
        }
    }
    Ok(out)
}

/// The two run records of a hybrid completion: the hybrid (recovered rows fixed) and the
/// control (pure learning from logits), each with its own query count and its own
/// training time (the shared query phase is `details.query_seconds`, in both).
fn hybrid_records(
    h: &HybridReport,
    policy: &Policy,
    oracle: &str,
    model: &std::path::Path,
    extra: serde_json::Value,
) -> anyhow::Result<Vec<RunRecord>> {
    let mut out = Vec::new();
    for (attack, c) in [
        ("carlini-hybrid", &h.hybrid),
        ("logit-learning", &h.learning_only),
    ] {
        let Some(c) = c else { continue };
        let mut details = serde_json::to_value(h)?;
        details["this"] = serde_json::to_value(c)?;
        details["first_layer_run"] = extra.clone();
        let curve = c
            .metrics
            .as_ref()
            .and_then(|m| {
                Some(CurvePoint {
                    queries: c.queries,
                    agreement: m.mnist_agreement?,
                    accuracy: m.mnist_accuracy?,
                })
            })
            .into_iter()
            .collect();
        out.push(RunRecord {
            attack: attack.into(),
            policy: policy.label(),
            defended: policy.output == OutputMode::Labels,
            oracle: oracle.to_string(),
            model: model.display().to_string(),
            queries: c.queries,
            seconds: c.seconds,
            curve,
            outcome: h.stopped.clone(),
            details,
        });
    }
    Ok(out)
}

/// The hidden widths of input, hidden..., classes widths.
fn hidden_of(dims: &[usize]) -> Vec<usize> {
    dims.get(1..dims.len().saturating_sub(1))
        .map(<[usize]>::to_vec)
        .unwrap_or_default()
}

fn hybrid_config(a: &CarliniArgs) -> HybridConfig {
    HybridConfig {
        learn_queries: a.learn_queries,
        random_queries: a.learn_random,
        epochs: a.learn_epochs,
        seed: a.common.seed,
        ..HybridConfig::default()
    }
}

/// `--load-first-layer`: the hybrid completion from a saved first layer (no search).
fn run_loaded_first_layer(
    a: &CarliniArgs,
    file: &std::path::Path,
    model: &Model,
    path: &std::path::Path,
    data: &AttackData,
) -> anyhow::Result<Vec<RunRecord>> {
    let c = &a.common;
    let ar = arithmetic(c.oracle);
    let fl = FirstLayerFile::load(file, model)?;
    let rt = runtime(c)?;
    let mut out = Vec::new();
    for policy in policies(c) {
        let mut host = Host::new(c.oracle, model, path, policy, c, &rt)?;
        let (policy, desc) = (host.policy(), host.describe());
        if !c.json {
            eprintln!(
                "hybrid completion against {desc}, first layer from {} ({} rows, {} signed, {} \
                 queries)",
                file.display(),
                fl.rows.len(),
                fl.rows.iter().filter(|r| r.sign != 0.0).count(),
                fl.queries
            );
        }
        let h = hybrid::complete_loaded(
            host.oracle(),
            &fl,
            data,
            &hybrid_config(a),
            Some((model, ar)),
            !c.json,
        );
        let (h, used) = match h {
            Ok(h) => h,
            Err(e @ hybrid::HybridError::LabelsOnly) => {
                if !c.json {
                    eprintln!("hybrid: {e}");
                }
                host.close(&rt)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(s) = &h.report.signs
            && !c.json
        {
            eprintln!(
                "hybrid: first-layer signs decided again: {} in the file, {} decided now ({} \
                 disagree with the file, {} kept from the file), {} rows",
                s.file_signed, s.fresh_decided, s.disagree, s.kept_from_file, s.queries
            );
        }
        if let Some(p) = &a.save_first_layer {
            used.save(p)?;
            if !c.json {
                eprintln!(
                    "hybrid: first layer with the signs used saved to {}",
                    p.display()
                );
            }
        }
        let extra = fl.run_summary(file, h.report.signs.as_ref());
        if let (Some(p), Some(m)) = (&a.save, &h.model) {
            m.save(p)
                .with_context(|| format!("saving {}", p.display()))?;
        }
        out.extend(hybrid_records(&h.report, &policy, &desc, path, extra)?);
        host.close(&rt)?;
    }
    Ok(out)
}

fn run_carlini(a: &CarliniArgs) -> anyhow::Result<Vec<RunRecord>> {
    let c = &a.common;
    let (model, path) = load_model(c, "models/mnist-784-32-10.safetensors")?;
    let ar = arithmetic(c.oracle);
    let deep = model
        .architecture()
        .layers()
        .iter()
        .filter(|l| matches!(l, fusion_common::nn::LayerSpec::Dense { .. }))
        .count()
        >= 3;
    let want_hybrid = deep && a.learn_queries > 0;
    let data = AttackData::load(&c.data, &model, ar, want_hybrid)?;
    if let Some(file) = &a.load_first_layer {
        return run_loaded_first_layer(a, file, &model, &path, &data);
    }
    let cfg = CarliniConfig {
        seed: c.seed,
        grid: a.grid,
        points_per_neuron: a.points_per_neuron,
        max_queries: a.max_queries,
        targeted_queries: a.targeted_queries,
        retry_weak_probes: !a.no_retry_weak_probes,
        ..CarliniConfig::default()
    };
    let rt = runtime(c)?;
    let mut out = Vec::new();
    for policy in policies(c) {
        let mut local = Host::new(c.oracle, &model, &path, policy, c, &rt)?;
        let (policy, desc) = (local.policy(), local.describe());
        if !c.json {
            eprintln!("carlini against {desc}");
        }
        let t = Instant::now();
        let arch = model.architecture().clone();
        let result = carlini(
            local.oracle(),
            &arch,
            &cfg,
            Some((&model, ar)),
            Some(&data),
            !c.json,
        );
        let seconds = t.elapsed().as_secs_f64();
        let queries = local.oracle().queries();
        let mut hybrid_out = Vec::new();
        let record = match result {
            Ok(ex) => {
                if let (Some(fl), false) = (&ex.report.first_layer, c.json) {
                    eprintln!("carlini: {}", fl.note);
                    if let Some(m) = &fl.metrics {
                        eprintln!(
                            "carlini: layer 1 vs the victim: {} of {} rows matched, {} within \
                             1e-2, {} within 1e-3, row error max {:.3e} mean {:.3e}, {} spurious",
                            m.matched,
                            m.victim_neurons,
                            m.within_1e2,
                            m.within_1e3,
                            m.row_rel_error_max,
                            m.row_rel_error_mean,
                            m.spurious
                        );
                    }
                }
                if let (Some(p), Some(m)) = (&a.save, &ex.model) {
                    m.save(p)
                        .with_context(|| format!("saving {}", p.display()))?;
                }
                let rows = FirstLayerFile::new(
                    &model,
                    &cfg,
                    queries,
                    &ex.first_layer,
                    &ex.first_layer_signs,
                    ex.report.first_layer.clone(),
                    ex.report.deeper.clone(),
                );
                if let Some(p) = &a.save_first_layer
                    && deep
                {
                    rows.save(p)?;
                    if !c.json {
                        eprintln!("carlini: first layer saved to {}", p.display());
                    }
                }
                if want_hybrid && ex.model.is_none() && ex.report.stopped.is_none() {
                    let widths = hidden_of(&rows.dims);
                    let h = hybrid::complete(
                        local.oracle(),
                        &widths,
                        &rows.rows,
                        queries,
                        &data,
                        &hybrid_config(a),
                        Some((&model, ar)),
                        !c.json,
                    )?;
                    if let (Some(p), Some(m)) = (&a.save, &h.model) {
                        m.save(p)
                            .with_context(|| format!("saving {}", p.display()))?;
                    }
                    let extra = serde_json::json!({ "queries": queries, "in_this_run": true });
                    hybrid_out.extend(hybrid_records(&h.report, &policy, &desc, &path, extra)?);
                }
                let mut details = serde_json::to_value(&ex.report)?;
                local.details(&mut details)?;
                let curve = ex
                    .report
                    .metrics
                    .as_ref()
                    .and_then(|m| {
                        Some(CurvePoint {
                            queries,
                            agreement: m.mnist_agreement?,
                            accuracy: m.mnist_accuracy?,
                        })
                    })
                    .into_iter()
                    .collect();
                RunRecord {
                    attack: "carlini".into(),
                    policy: policy.label(),
                    defended: policy.output == OutputMode::Labels,
                    oracle: desc,
                    model: path.display().to_string(),
                    queries,
                    seconds,
                    curve,
                    outcome: ex.report.stopped.as_ref().map(OracleError::to_string),
                    details,
                }
            }
            Err(
                e @ (super::carlini::CarliniError::LabelsOnly
                | super::carlini::CarliniError::Depth(_)),
            ) => {
                if !c.json {
                    eprintln!("carlini: {e}");
                }
                RunRecord {
                    attack: "carlini".into(),
                    policy: policy.label(),
                    defended: policy.output == OutputMode::Labels,
                    oracle: desc,
                    model: path.display().to_string(),
                    queries,
                    seconds,
                    curve: Vec::new(),
                    outcome: Some(format!("refused: {e}")),
                    details: serde_json::Value::Null,
                }
            }
            Err(e) => return Err(e.into()),
        };
        out.push(record);
        out.append(&mut hybrid_out);
        local.close(&rt)?;
    }
    Ok(out)
}

/// The runtime of the service oracles' connections (and of an in-process server); the
/// attacks run on this thread and block on it.
fn runtime(c: &CommonArgs) -> anyhow::Result<Runtime> {
    if c.oracle == OracleKind::Service && c.compare {
        anyhow::bail!(
            "--compare runs both policies on oracles of this process: use --oracle \
             service-local (a real server's policy is its own)"
        );
    }
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::hybrid::Completion;
    use super::*;

    /// The report directory and the parents of `--save` and `--save-first-layer` exist
    /// before the run (a missing one failed only at the end of the run, its results lost).
    #[test]
    fn output_directories_are_made_before_the_run() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            attack: AttackArgs,
        }
        use clap::Parser;
        let tmp = tempfile::tempdir().unwrap();
        let at = |p: &str| tmp.path().join(p).display().to_string();
        let cli = Cli::try_parse_from([
            "x",
            "carlini",
            "--report",
            &at("r/a"),
            "--save",
            &at("s/b/stolen.safetensors"),
            "--save-first-layer",
            &at("f/first.json"),
        ])
        .unwrap();
        for d in ["r/a", "s/b", "f"] {
            assert!(!tmp.path().join(d).exists(), "{d}");
        }
        make_output_dirs(&cli.attack).unwrap();
        for d in ["r/a", "s/b", "f"] {
            assert!(tmp.path().join(d).is_dir(), "{d}");
        }
        // a bare file name has no directory to make; a path under a file is refused by name
        let bare = Cli::try_parse_from(["x", "carlini", "--save", "stolen.safetensors"]).unwrap();
        make_output_dirs(&bare.attack).unwrap();
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        let under = Cli::try_parse_from(["x", "carlini", "--report", &at("file/r")]).unwrap();
        let e = make_output_dirs(&under.attack).unwrap_err();
        assert!(e.to_string().contains("output directory"), "{e}");
    }

    /// The hybrid and the control each carry their own training time, not the
    /// completion's total; the shared query phase is in the details, once per record.
    #[test]
    fn hybrid_records_carry_their_own_training_time() {
        let c = |method: &str, fixed: usize, queries: u64, seconds: f64| Completion {
            method: method.into(),
            fixed_rows: fixed,
            queries,
            final_loss: 0.5,
            steps: 10,
            seconds,
            metrics: None,
            heldout_max_logit_error: None,
            heldout_mean_logit_error: None,
        };
        let h = HybridReport {
            config: HybridConfig::default(),
            first_layer_queries: 100,
            rows_recovered: 3,
            rows_fixed: 2,
            learn_queries: 50,
            stopped: None,
            query_seconds: 7.5,
            signs: None,
            hybrid: Some(c("hybrid (recovered rows fixed)", 2, 150, 12.0)),
            learning_only: Some(c("learning only (no row fixed)", 0, 50, 9.0)),
        };
        let recs = hybrid_records(
            &h,
            &Policy::undefended(),
            "local-fixed",
            std::path::Path::new("models/m.safetensors"),
            serde_json::json!({}),
        )
        .unwrap();
        let got: Vec<(&str, u64, f64, f64)> = recs
            .iter()
            .map(|r| {
                (
                    r.attack.as_str(),
                    r.queries,
                    r.seconds,
                    r.details["query_seconds"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("carlini-hybrid", 150, 12.0, 7.5),
                ("logit-learning", 50, 9.0, 7.5)
            ]
        );
    }
}
