//! `fusion-client attack papernot|carlini ...`.

use super::carlini::{CarliniConfig, carlini};
use super::data::{Arithmetic, AttackData};
use super::oracle::{
    DEFAULT_MAX_BATCH, LocalF32Oracle, LocalFixedOracle, Oracle, OracleError, OutputMode, Policy,
    WrapStats,
};
use super::papernot::{PapernotConfig, SubstituteReport, baseline, papernot};
use super::report::{CurvePoint, RunRecord, markdown, write};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use fusion_common::nn::Model;
use std::path::PathBuf;
use std::time::Instant;

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
    /// samples per line at the first search level
    #[arg(long, default_value_t = 64)]
    pub grid: usize,
    /// save the extracted model (safetensors) here
    #[arg(long)]
    pub save: Option<PathBuf>,
}

/// A local oracle of either arithmetic.
enum Local {
    Fixed(LocalFixedOracle),
    F32(LocalF32Oracle),
}

impl Local {
    fn new(kind: OracleKind, model: &Model, policy: Policy) -> Self {
        match kind {
            OracleKind::LocalFixed => Local::Fixed(LocalFixedOracle::new(model.clone(), policy)),
            OracleKind::LocalF32 => Local::F32(LocalF32Oracle::new(model.clone(), policy)),
        }
    }
    fn oracle(&mut self) -> &mut dyn Oracle {
        match self {
            Local::Fixed(o) => o,
            Local::F32(o) => o,
        }
    }
    fn wrap(&self) -> Option<WrapStats> {
        match self {
            Local::Fixed(o) => Some(o.stats()),
            Local::F32(_) => None,
        }
    }
}

fn arithmetic(kind: OracleKind) -> Arithmetic {
    match kind {
        OracleKind::LocalFixed => Arithmetic::Fixed,
        OracleKind::LocalF32 => Arithmetic::F32,
    }
}

/// The policies to run: both with --compare, else the one the flags describe.
fn policies(c: &CommonArgs) -> Vec<Policy> {
    let mut undefended = Policy::undefended();
    undefended.max_batch = c.max_batch;
    let mut defended = Policy::defended(c.defended_budget);
    defended.max_batch = c.max_batch;
    if c.compare {
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

/// Runs `fusion-client attack ...`.
pub fn run(args: AttackArgs) -> anyhow::Result<()> {
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
    wrap: Option<WrapStats>,
) -> anyhow::Result<RunRecord> {
    let mut details = serde_json::to_value(r)?;
    if let Some(w) = wrap {
        details["wrap"] = serde_json::to_value(w)?;
    }
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
    let mut out = Vec::new();
    for policy in policies(c) {
        let mut local = Local::new(c.oracle, &model, policy);
        let desc = local.oracle().describe();
        if !c.json {
            eprintln!("papernot against {desc}");
        }
        let t = Instant::now();
        let r = papernot(local.oracle(), &data, &cfg, !c.json)?;
        out.push(substitute_record(
            &r,
            &policy,
            &desc,
            &path,
            t.elapsed().as_secs_f64(),
            local.wrap(),
        )?);
        if with_baseline {
            let mut local = Local::new(c.oracle, &model, policy);
            if !c.json {
                eprintln!("baseline (label N real images) against {desc}");
            }
            let t = Instant::now();
            let r = baseline(local.oracle(), &data, &cfg, &sizes, !c.json)?;
            out.push(substitute_record(
                &r,
                &policy,
                &desc,
                &path,
                t.elapsed().as_secs_f64(),
                local.wrap(),
            )?);
        }
    }
    Ok(out)
}

fn run_carlini(a: &CarliniArgs) -> anyhow::Result<Vec<RunRecord>> {
    let c = &a.common;
    let (model, path) = load_model(c, "models/mnist-784-32-10.safetensors")?;
    let ar = arithmetic(c.oracle);
    let data = AttackData::load(&c.data, &model, ar, false)?;
    let cfg = CarliniConfig {
        seed: c.seed,
        grid: a.grid,
        points_per_neuron: a.points_per_neuron,
        max_queries: a.max_queries,
        ..CarliniConfig::default()
    };
    let mut out = Vec::new();
    for policy in policies(c) {
        let mut local = Local::new(c.oracle, &model, policy);
        let desc = local.oracle().describe();
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
        let record = match result {
            Ok(ex) => {
                if let (Some(p), Some(m)) = (&a.save, &ex.model) {
                    m.save(p)
                        .with_context(|| format!("saving {}", p.display()))?;
                }
                let mut details = serde_json::to_value(&ex.report)?;
                if let Some(w) = local.wrap() {
                    details["wrap"] = serde_json::to_value(w)?;
                }
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
    }
    Ok(out)
}
