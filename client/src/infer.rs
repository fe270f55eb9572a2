//! Secure inference against a server: [`run`] (the library call) and the
//! `fusion-client infer` command.
//!
//! ```no_run
//! # async fn demo(client: fusion_client::Client, pixels: Vec<u8>) -> Result<(), fusion_client::infer::InferError> {
//! use fusion_client::infer::{InferOptions, Inputs, run};
//! let out = run(&client, Inputs::Pixels(&pixels), &InferOptions::default()).await?;
//! println!("labels {:?}", out.labels);
//! println!("{}", fusion_common::cost::render_table(&out.cost));
//! # Ok(()) }
//! ```
//!
//! One session per call: the backend's set-up (HE keys, base OTs), then the rows in
//! batches of at most `batch_rows` (and the server's largest batch), each charged to
//! this client's budget by the server. The output mode is the server's decision: the
//! client may ask for one (a labels-only server refuses logits by name).

use std::ops::Range;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use fusion_common::backend::{
    BackendError, BackendKind, BatchOutput, Cheetah, CheetahConfig, InferenceClient, LayerKind,
    LinearMode, ModelSpec, OutputMode, SecureInference,
};
use fusion_common::channel::{Channel, CostReport};
use fusion_common::fixed::FixedPoint;
use fusion_common::net::{ModelSummary, ServiceInfo, SessionStart};
use fusion_common::nn::mnist::{self, Split};
use rand::{CryptoRng, Rng};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::args::ConnectArgs;
use crate::client::{Client, ClientError};
use crate::local::{BUNDLED_MNIST, bundled};
use crate::report::{CostJson, render_tables};
use crate::verified::FusionError;

/// The rows to infer (the client's secret: `Debug` shows only their number).
#[derive(Clone, Copy)]
pub enum Inputs<'a> {
    /// 8-bit pixels, the model's input length per row (encoded at the model's scale)
    Pixels(&'a [u8]),
    /// ring elements already encoded at the model's scale
    Encoded(&'a [u64]),
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pixels(p) => write!(f, "Pixels([{} bytes redacted])", p.len()),
            Self::Encoded(e) => write!(f, "Encoded([{} values redacted])", e.len()),
        }
    }
}

/// How to run. The default runs `cheetah` with preprocessed linear layers (the HE and
/// the OT extension in each batch's offline phase, [`LinearMode::Preprocessed`]).
#[derive(Debug, Clone)]
pub struct InferOptions {
    /// the protocol family
    pub backend: BackendKind,
    /// the output mode to ask for (`None`: the server's policy)
    pub output: Option<OutputMode>,
    /// the largest batch to send (`None`: the server's largest)
    pub batch_rows: Option<usize>,
    /// the `cheetah` session's configuration (must equal the server's but for the
    /// linear-layer mode, which the client chooses)
    pub cheetah: CheetahConfig,
}

impl Default for InferOptions {
    fn default() -> Self {
        Self {
            backend: BackendKind::default(),
            output: None,
            batch_rows: None,
            cheetah: CheetahConfig {
                linear: LinearMode::Preprocessed,
                ..CheetahConfig::default()
            },
        }
    }
}

/// What a secure inference returns. `Debug` leaves out the labels and logits (the
/// client's own results).
#[derive(Clone)]
pub struct InferOutput {
    /// one label per row
    pub labels: Vec<usize>,
    /// in logits mode, the logits per row (signed fixed point at scale 2^`scale_bits`)
    pub logits: Option<Vec<Vec<i64>>>,
    /// f
    pub scale_bits: u32,
    /// the output mode the server applied
    pub output: OutputMode,
    /// the backend
    pub backend: BackendKind,
    /// batches run
    pub batches: usize,
    /// the server's number for the session
    pub session_id: u64,
    /// the client's costs per step (setup steps start with `setup`)
    pub cost: CostReport,
}

impl std::fmt::Debug for InferOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferOutput")
            .field("labels", &format_args!("[{} redacted]", self.labels.len()))
            .field("logits", &self.logits.as_ref().map(|_| "[redacted]"))
            .field("scale_bits", &self.scale_bits)
            .field("output", &self.output)
            .field("backend", &self.backend)
            .field("batches", &self.batches)
            .field("session_id", &self.session_id)
            .field("cost", &self.cost)
            .finish()
    }
}

/// Errors of a secure inference.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// Connecting, a refusal, or the session failed (the protocol's error and the
    /// server's named reason are in the message and the source chain).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server serves no model.
    #[error("the server has no model loaded")]
    NoModel,
    /// The server does not offer the backend.
    #[error("backend {backend} is not offered by the server (offered: {offered})")]
    NotOffered {
        /// asked for
        backend: String,
        /// what the server offers
        offered: String,
    },
    /// The server's model description cannot be used.
    #[error("the server's model description: {0}")]
    BadModel(String),
    /// Inputs that are not whole rows.
    #[error("{len} input values are not whole rows of {cols}")]
    Shape {
        /// values given
        len: usize,
        /// the model's input length
        cols: usize,
    },
    /// No rows.
    #[error("no inputs")]
    Empty,
    /// The run needs more rows than this client's budget has left: refused before any
    /// session starts (a batch the server refuses mid-session would end the session).
    #[error(
        "this run needs {rows} rows and this client's budget has {remaining} left (the server's --budget)"
    )]
    OverBudget {
        /// rows the run would send
        rows: u64,
        /// rows left, as the server reported them
        remaining: u64,
    },
}

/// Refuses a run of `rows` rows that the budget `info` reports cannot pay for (`infer`
/// and Fusion check before a session starts; [`run_with_info`] leaves it to the server).
pub(crate) fn check_budget(info: &ServiceInfo, rows: usize) -> Result<(), InferError> {
    let rows = u64::try_from(rows).unwrap_or(u64::MAX);
    let remaining = info.budget.remaining();
    if rows > remaining {
        return Err(InferError::OverBudget { rows, remaining });
    }
    Ok(())
}

/// The public model description a backend needs, from the server's `GetModelInfo`.
pub fn model_spec(m: &ModelSummary) -> Result<ModelSpec, InferError> {
    let bad = |s: String| InferError::BadModel(s);
    let fixed = FixedPoint::new(m.ring_bits, m.scale_bits).map_err(|e| bad(e.to_string()))?;
    let len = |s: &[u64]| {
        s.iter()
            .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))
    };
    let input_len =
        len(&m.architecture.input_shape).ok_or_else(|| bad("input shape too large".into()))?;
    let layers = m
        .architecture
        .layers
        .iter()
        .map(|l| {
            Ok(match l.kind.as_str() {
                "dense" => LayerKind::Dense {
                    inputs: len(&l.input_shape)
                        .ok_or_else(|| bad("dense input shape too large".into()))?,
                    outputs: len(&l.output_shape)
                        .ok_or_else(|| bad("dense output shape too large".into()))?,
                },
                "relu" => LayerKind::Relu,
                "flatten" => LayerKind::Flatten,
                other => LayerKind::Other(other.to_owned()),
            })
        })
        .collect::<Result<Vec<_>, InferError>>()?;
    let digest = <[u8; 32]>::try_from(m.model_digest.as_slice())
        .map_err(|_| bad(format!("a model digest of {} bytes", m.model_digest.len())))?;
    Ok(ModelSpec {
        fixed,
        input_len,
        layers,
        digest,
    })
}

/// Asks the server for its description, then runs [`run_with_info`].
pub async fn run(
    client: &Client,
    inputs: Inputs<'_>,
    opts: &InferOptions,
) -> Result<InferOutput, InferError> {
    let info = client.model_info().await?;
    run_with_info(client, &info, inputs, opts).await
}

/// A finished session's client state, dropped by its caller once the session has ended:
/// zeroizing it takes a while (Ferret keeps a whole iteration's COTs, about 160 MiB per
/// direction: ~0.2 s here), which is no protocol step and must not hold up the session's
/// end or count in its last step.
pub(crate) type Spent = Box<dyn Send>;

/// Drops a session's state on a blocking thread (see [`Spent`]).
pub(crate) async fn zeroize_spent(spent: Spent) {
    let _ = tokio::task::spawn_blocking(move || drop(spent)).await;
}

/// The client's side of one session of a protocol family: set-up, then the batches of
/// `per` rows each (the last one may be shorter).
pub(crate) fn client_batches<B: SecureInference, R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    spec: &ModelSpec,
    config: &B::Config,
    x: &[u64],
    per: usize,
    output: OutputMode,
    rng: &mut R,
) -> Result<(Vec<BatchOutput>, Spent), BackendError>
where
    B::Client: Send + 'static,
{
    let rows = x.len() / spec.input_len.max(1);
    let per = per.max(1);
    let sizes: Vec<usize> = (0..rows.div_ceil(per))
        .map(|i| per.min(rows - i * per))
        .collect();
    client_batches_sized::<B, R>(ch, spec, config, x, &sizes, output, rng)
}

/// [`client_batches`] with the rows of each batch given: batch i is the next `sizes[i]`
/// rows of `x` (the sizes must add up to the rows of `x`).
pub(crate) fn client_batches_sized<B: SecureInference, R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    spec: &ModelSpec,
    config: &B::Config,
    x: &[u64],
    sizes: &[usize],
    output: OutputMode,
    rng: &mut R,
) -> Result<(Vec<BatchOutput>, Spent), BackendError>
where
    B::Client: Send + 'static,
{
    let cols = spec.input_len;
    if sizes.iter().sum::<usize>() * cols != x.len() {
        return Err(BackendError::BadBatch(format!(
            "batches of {} rows in all for {} values of {cols} columns",
            sizes.iter().sum::<usize>(),
            x.len()
        )));
    }
    let mut c = B::client_setup(ch, spec, config, rng)?;
    let mut outs = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for &n in sizes {
        let rows = &x[at..at + n * cols];
        outs.push(c.run_batch(ch, rows, n, output, rng)?);
        at += n * cols;
    }
    Ok((outs, Box::new(c)))
}

/// Runs the rows through the server's model in one session (see the module doc), with
/// the server's description `info` already in hand.
pub async fn run_with_info(
    client: &Client,
    info: &ServiceInfo,
    inputs: Inputs<'_>,
    opts: &InferOptions,
) -> Result<InferOutput, InferError> {
    let m = info.model.as_ref().ok_or(InferError::NoModel)?;
    let kind = opts.backend;
    if !info.backends.iter().any(|b| b == kind.name()) {
        return Err(InferError::NotOffered {
            backend: kind.name().into(),
            offered: info.backends.join(", "),
        });
    }
    let spec = model_spec(m)?;
    // the client's inputs, encoded: zeroized when the session's closure is dropped
    let x = Zeroizing::new(match inputs {
        Inputs::Pixels(p) => spec.fixed.encode_pixels(p),
        Inputs::Encoded(v) => v.to_vec(),
    });
    let cols = spec.input_len;
    if x.is_empty() {
        return Err(InferError::Empty);
    }
    if !x.len().is_multiple_of(cols) {
        return Err(InferError::Shape { len: x.len(), cols });
    }
    let rows = x.len() / cols;
    let per = opts
        .batch_rows
        .unwrap_or(usize::MAX)
        .min(usize::try_from(info.max_rows).unwrap_or(usize::MAX))
        .min(rows)
        .max(1);
    let mut start = SessionStart::new(kind.name()).with_batch(per as u64, cols as u64);
    if let Some(o) = opts.output {
        start = start.with_output(o);
    }
    let cheetah = opts.cheetah;
    let ring = spec.fixed.ring();
    let out = client
        .session(start, move |ch, accepted| {
            let mut rng = rand::rng();
            match kind {
                BackendKind::Cheetah => client_batches::<Cheetah, _>(
                    ch,
                    &spec,
                    &cheetah,
                    &x,
                    per,
                    accepted.output,
                    &mut rng,
                ),
                other => Err(BackendError::BadBatch(format!(
                    "backend {other} is not available in this client"
                ))),
            }
        })
        .await?;
    let (values, spent) = out.value;
    zeroize_spent(spent).await;
    let batches = values.len();
    let mut labels = Vec::with_capacity(rows);
    let mut logits: Option<Vec<Vec<i64>>> = None;
    for b in values {
        labels.extend(b.labels);
        if let Some(l) = b.logits {
            logits.get_or_insert_with(Vec::new).extend(
                l.chunks(b.classes.max(1))
                    .map(|r| r.iter().map(|&v| ring.to_signed(v)).collect()),
            );
        }
    }
    Ok(InferOutput {
        labels,
        logits,
        scale_bits: m.scale_bits,
        output: out.accepted.output,
        backend: kind,
        batches,
        session_id: out.accepted.session_id,
        cost: out.cost,
    })
}

/// `A..B` (end exclusive).
pub fn parse_range(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range A..B"))?;
    let a: usize = a.trim().parse().map_err(|e| format!("range start: {e}"))?;
    let b: usize = b.trim().parse().map_err(|e| format!("range end: {e}"))?;
    if a >= b {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

/// Flags of `infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// MNIST test images A..B (end exclusive, of 10,000) from --mnist-dir.
    #[arg(
        long = "mnist-test",
        value_name = "A..B",
        value_parser = parse_range,
        conflicts_with = "input",
        required_unless_present = "input"
    )]
    pub mnist_test: Option<Range<usize>>,
    /// An IDX3 image file (28x28 unsigned bytes, gzip-compressed or raw).
    #[arg(long, value_name = "FILE.idx")]
    pub input: Option<PathBuf>,
    /// The directory of the MNIST gzip IDX files (default: the bundled data/mnist).
    #[arg(long, env = "FUSION_MNIST_DIR")]
    pub mnist_dir: Option<PathBuf>,
    /// The protocol family.
    #[arg(long, env = "FUSION_BACKEND", default_value = "cheetah")]
    pub backend: BackendKind,
    /// The output to ask for: `labels` or `logits` (default: the server's policy).
    #[arg(long, env = "FUSION_INFER_OUTPUT")]
    pub output: Option<OutputMode>,
    /// The largest batch to send, in rows, Fusion's public rows and copies included
    /// (default: the server's largest).
    #[arg(long, env = "FUSION_BATCH",
          value_parser = fusion_server::cli::at_least_one::<usize>)]
    pub batch: Option<usize>,
    /// Linear layers `preprocessed` (Delphi: HE on random masks and the OT extension in
    /// each batch's offline phase, then a masked reshare) or `online` (Cheetah: HE on the
    /// input share during the batch).
    #[arg(long, env = "FUSION_LINEAR", default_value = "preprocessed")]
    pub linear: LinearMode,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write report.json, report.md and the PNG chart of the costs into this directory.
    #[arg(long, env = "FUSION_REPORT_DIR")]
    pub report: Option<PathBuf>,
    /// Run the bare protocol, without Fusion's mix-and-check (results NOT verified).
    #[arg(long, conflicts_with_all = ["t", "r", "target", "confidence"])]
    pub no_fusion: bool,
    #[command(flatten)]
    pub fusion: FusionArgs,
    #[command(flatten)]
    pub trust: crate::trust::TrustArgs,
}

/// Fusion's flags (`infer`, `audit`).
#[derive(Debug, Args)]
pub struct FusionArgs {
    /// Public rows T (with --r; default: tuned for --target).
    #[arg(long = "t", requires = "r")]
    pub t: Option<usize>,
    /// Copies R of each own input (with --t).
    #[arg(long = "r", requires = "t")]
    pub r: Option<usize>,
    /// Largest acceptable escape probability of a cheating server, for the tuner.
    #[arg(long, default_value = "2^-40", value_parser = crate::tune_cmd::parse_probability)]
    pub target: f64,
    /// Confidence of check (c) (the published pool labels' accuracy against the server's
    /// claim).
    #[arg(long, default_value_t = crate::verified::DEFAULT_CONFIDENCE,
          value_parser = parse_confidence)]
    pub confidence: f64,
}

/// A confidence strictly between 0 and 1.
fn parse_confidence(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if c > 0.0 && c < 1.0 => Ok(c),
        _ => Err(format!(
            "{s:?} is not a confidence strictly between 0 and 1"
        )),
    }
}

impl FusionArgs {
    /// The options these flags give.
    pub fn options(&self, infer: InferOptions) -> crate::verified::FusionOptions {
        use crate::verified::{FusionOptions, Params};
        FusionOptions {
            infer,
            params: match (self.t, self.r) {
                (Some(t), Some(r)) => Params::Fixed { t, r },
                _ => Params::Tuned {
                    target: self.target,
                },
            },
            confidence: self.confidence,
        }
    }
}

/// What `infer --json` prints.
#[derive(Debug, Serialize)]
struct InferJson {
    backend: String,
    output: OutputMode,
    rows: usize,
    batches: usize,
    labels: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<Vec<Vec<f64>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale_bits: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    true_labels: Option<Vec<u8>>,
    cost: CostJson,
}

fn decode(v: i64, scale_bits: u32) -> f64 {
    // exact: |v| < 2^53 and a power-of-two scale
    v as f64 / (1u64 << scale_bits) as f64
}

/// Reads the images the flags name: pixels and, for MNIST test images, the true labels.
fn load_inputs(args: &InferArgs) -> anyhow::Result<(Vec<u8>, Option<Vec<u8>>)> {
    if let Some(path) = &args.input {
        let pixels = mnist::read_images_any(path)?;
        if pixels.is_empty() {
            anyhow::bail!("{} holds no images", path.display());
        }
        return Ok((pixels, None));
    }
    let range = args
        .mnist_test
        .clone()
        .context("give --mnist-test A..B or --input FILE.idx")?;
    let dir = match &args.mnist_dir {
        Some(d) => d.clone(),
        None => bundled(BUNDLED_MNIST).context("no MNIST directory: pass --mnist-dir")?,
    };
    let test = mnist::load(&dir, Split::Test)?.slice(range)?;
    Ok((test.images().to_vec(), Some(test.labels().to_vec())))
}

/// The bundled (or `dir`'s) MNIST test set: the public dataset the pool indexes.
pub fn public_dataset(dir: Option<&std::path::Path>) -> anyhow::Result<mnist::Dataset> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => bundled(BUNDLED_MNIST).context("no MNIST directory: pass --mnist-dir")?,
    };
    Ok(mnist::load(&dir, Split::Test)?)
}

/// Connects, runs (verified by Fusion unless `--no-fusion`), prints. A detected
/// misbehaviour is returned as a [`crate::verified::FusionError::Detected`] (the binary
/// exits with status 3).
pub async fn run_cmd(args: InferArgs) -> anyhow::Result<()> {
    let (pixels, truth) = load_inputs(&args)?;
    let client = args.connect.connect().await?;
    let info = client.model_info().await?;
    let opts = InferOptions {
        backend: args.backend,
        output: args.output,
        batch_rows: args.batch,
        cheetah: CheetahConfig {
            linear: args.linear,
            ..CheetahConfig::default()
        },
    };
    if !args.no_fusion {
        return run_fusion_cmd(&args, &client, &info, &pixels, truth.as_deref(), opts).await;
    }
    eprintln!("Fusion disabled (--no-fusion): the bare protocol; results are NOT verified");
    // the trust store guards the bare protocol too (an abort can leak there as well)
    let (mut store, fp) = args.trust.admit(&client)?;
    // a batch the server refuses over the budget would end the session after it started
    check_budget(&info, pixels.len() / mnist::PIXELS)?;
    let out = run_with_info(&client, &info, Inputs::Pixels(&pixels), &opts)
        .await
        .map_err(|e| {
            crate::trust::record_failure(&mut store, &fp, &client, FusionError::Infer(e))
        })?;
    let json = InferJson {
        backend: out.backend.name().into(),
        output: out.output,
        rows: out.labels.len(),
        batches: out.batches,
        labels: out.labels.clone(),
        logits: out.logits.as_ref().map(|l| {
            l.iter()
                .map(|r| r.iter().map(|&v| decode(v, out.scale_bits)).collect())
                .collect()
        }),
        scale_bits: out.logits.as_ref().map(|_| out.scale_bits),
        true_labels: truth.clone(),
        cost: CostJson::from_report(&out.cost),
    };
    let written = write_cost_report(args.report.as_deref(), &json, &out.cost, out.session_id)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    print!("{}", render_output(&out, truth.as_deref()));
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// `--report DIR`: writes `json` (what `--json` prints) as `report.json`, the cost
/// tables as `report.md` and the per-layer chart `layers.png`; returns the files written
/// (none without a directory).
pub fn write_cost_report(
    dir: Option<&std::path::Path>,
    json: &impl Serialize,
    cost: &CostReport,
    session_id: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    let Some(dir) = dir else { return Ok(vec![]) };
    let run = crate::charts::RunCost {
        label: format!("session {session_id}"),
        rows: None,
        cost: cost.clone(),
        link: None,
    };
    Ok(crate::charts::write_report(dir, "infer", json, &[run])?)
}

async fn run_fusion_cmd(
    args: &InferArgs,
    client: &Client,
    info: &ServiceInfo,
    pixels: &[u8],
    truth: Option<&[u8]>,
    opts: InferOptions,
) -> anyhow::Result<()> {
    use crate::verified::PublicRows;
    let test = public_dataset(args.mnist_dir.as_deref())?;
    let public = PublicRows::fetch(client, info, &test).await?;
    let fopts = args.fusion.options(opts);
    let (out, session) =
        crate::trust::run_verified_trusted(&args.trust, client, info, &public, pixels, &fopts)
            .await?;
    let j = serde_json::json!({
            "fusion": out.summary(),
            "backend": fopts.infer.backend.name(),
            "output": session.output,
            "labels": out.labels,
            "true_labels": truth,
            "cost": CostJson::from_report(&session.cost),
    });
    let written = write_cost_report(
        args.report.as_deref(),
        &j,
        &session.cost,
        session.session_id,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let mut s = out.render();
    let inner = InferOutput {
        labels: out.labels.clone(),
        logits: out.logits.clone(),
        scale_bits: info.model.as_ref().map_or(0, |m| m.scale_bits),
        output: session.output,
        backend: fopts.infer.backend,
        batches: out.batches.len(),
        session_id: session.session_id,
        cost: session.cost,
    };
    s.push_str(&render_output(&inner, truth));
    print!("{s}");
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// The text output: one line per row, then the cost table.
pub fn render_output(out: &InferOutput, truth: Option<&[u8]>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "session {}: backend {}, output {}, {} rows in {} batch(es)\n",
        out.session_id,
        out.backend,
        out.output,
        out.labels.len(),
        out.batches
    );
    let _ = writeln!(
        s,
        "row  label{}{}",
        if truth.is_some() { "  true" } else { "" },
        if out.logits.is_some() { "  logits" } else { "" }
    );
    for (i, l) in out.labels.iter().enumerate() {
        let _ = write!(s, "{i:>3}  {l:>5}");
        if let Some(t) = truth.and_then(|t| t.get(i)) {
            let _ = write!(s, "  {t:>4}");
        }
        if let Some(row) = out.logits.as_ref().and_then(|l| l.get(i)) {
            let vals: Vec<String> = row
                .iter()
                .map(|&v| format!("{:.3}", decode(v, out.scale_bits)))
                .collect();
            let _ = write!(s, "  [{}]", vals.join(", "));
        }
        s.push('\n');
    }
    if let Some(t) = truth {
        let right = out
            .labels
            .iter()
            .zip(t)
            .filter(|(a, b)| **a == usize::from(**b))
            .count();
        let _ = writeln!(s, "\n{right} of {} labels equal the true labels", t.len());
    }
    let _ = writeln!(s, "\ncost (client side)\n");
    s.push_str(&render_tables(&out.cost));
    s
}
