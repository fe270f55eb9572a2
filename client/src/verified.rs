//! Verified secure inference (Fusion's mix-and-check around the secure protocol): the
//! library behind `fusion-client infer` and `fusion-client audit`.
//!
//! ```text
//! client                                              server
//! GetModelInfo: digests, claimed accuracy, max rows <--
//! GetPublicPool: (index, label) pairs + digest      <--   verified against the model digest
//! tune (T, R) for B (exact bound) or take --t/--r
//! mix: T public rows + R copies of B own rows, secret uniform order (fusion::mix)
//! one secure batch of T + R*B rows (the real protocol) <-->
//! un-shuffle, checks (a) (b) (c) (fusion::check) -> own results, or a named detection
//! ```
//!
//! [`run_verified`] verifies B own inputs: one Fusion batch when T + R·B fits the server's
//! largest batch, else the inputs split evenly into as few Fusion batches as fit
//! ([`Setting::split`]), all in one protocol session. [`run_sessions`] runs several
//! independent Fusion batches (each its own secret plan and public draw) in one protocol
//! session, which is also what `audit` uses to keep trials cheap.
//!
//! Split batches are independent checks: a server that deviates in a set S of them
//! escapes all of S with probability at most the product of their bounds, so the bound
//! of the whole run is the largest bound of one batch ([`VerifiedOutput::escape`]).

use std::sync::Arc;

use fusion_common::backend::{BackendError, BackendKind, Cheetah, OutputMode};
use fusion_common::channel::CostReport;
use fusion_common::fusion::check::{CheckError, Expectations, check};
use fusion_common::fusion::mix::{MixError, MixPlan};
use fusion_common::fusion::tune::{self, TuneError};
use fusion_common::net::{ServiceInfo, SessionStart};
use fusion_common::nn::mnist::{self, Dataset};
use fusion_common::nn::{ModelDigest, PoolError};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::client::Client;
use crate::infer::{
    InferError, InferOptions, check_budget, client_batches_sized, model_spec, zeroize_spent,
};

/// The default target for the escape probability, 2^-40 (DESIGN: 40-bit statistical).
pub const DEFAULT_TARGET: f64 = 9.094_947_017_729_282e-13;
/// The default confidence of check (c).
pub const DEFAULT_CONFIDENCE: f64 = 0.999;
/// The largest R the tuner considers.
pub const MAX_R: usize = 64;

/// Errors of a verified inference. [`FusionError::Detected`] is the server's
/// misbehaviour; the others are set-up or transport failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FusionError {
    /// The secure inference itself failed (connecting, refusal, protocol error).
    #[error(transparent)]
    Infer(#[from] InferError),
    /// The server publishes no public pool.
    #[error("the server publishes no public pool: Fusion cannot check it (use --no-fusion)")]
    NoPool,
    /// The pool does not verify against the announced model.
    #[error("the public pool does not verify: {0}")]
    Pool(#[from] PoolError),
    /// The pool differs from what `GetModelInfo` announced, or names samples the client
    /// does not have.
    #[error("the public pool: {0}")]
    PoolMismatch(String),
    /// No (T, R) meets the target within the server's batch limit.
    #[error(transparent)]
    Tune(#[from] TuneError),
    /// The batch cannot be built.
    #[error(transparent)]
    Mix(#[from] MixError),
    /// T + R*B exceeds the largest batch (the server's, or the caller's where smaller).
    #[error(
        "a Fusion batch of {rows} rows exceeds the largest batch of {max} rows (the server's --max-rows, or --batch where smaller)"
    )]
    TooManyRows {
        /// T + R*B
        rows: usize,
        /// the server's limit
        max: u64,
    },
    /// The server misbehaved: a check failed; nothing of the batch is returned.
    #[error("server misbehaviour detected: {0}")]
    Detected(#[from] CheckError),
}

impl FusionError {
    /// Whether this is a detection of the server's misbehaviour.
    pub fn is_detection(&self) -> bool {
        matches!(self, FusionError::Detected(_))
    }
}

/// The public rows a client can use: the verified pool, the pool images and their true
/// labels.
#[derive(Debug, Clone)]
pub struct PublicRows {
    /// the server's published label per pool entry
    labels: Vec<u8>,
    /// the true label per pool entry
    truth: Vec<u8>,
    /// the pool images, `mnist::PIXELS` bytes each
    pixels: Vec<u8>,
}

impl PublicRows {
    /// Checks the pool `GetPublicPool` returned against the model info (digest bound to
    /// the model digest, size as announced) and takes the images and true labels from
    /// `test` (the public dataset the pool indexes).
    pub fn new(
        info: &ServiceInfo,
        pool: &fusion_common::net::info::PublicPool,
        test: &Dataset,
    ) -> Result<Self, FusionError> {
        let m = info.model.as_ref().ok_or(InferError::NoModel)?;
        if pool.entries.is_empty() || m.pool_size == 0 {
            return Err(FusionError::NoPool);
        }
        if pool.entries.len() as u64 != m.pool_size || pool.digest != m.pool_digest {
            return Err(FusionError::PoolMismatch(format!(
                "{} entries with another digest than the {} announced",
                pool.entries.len(),
                m.pool_size
            )));
        }
        let digest = <[u8; 32]>::try_from(m.model_digest.as_slice()).map_err(|_| {
            FusionError::PoolMismatch(format!("a model digest of {} bytes", m.model_digest.len()))
        })?;
        let nn_pool = pool
            .to_nn()
            .map_err(|e| FusionError::PoolMismatch(e.to_string()))?;
        nn_pool.verify(&ModelDigest(digest))?;
        let classes = m.architecture.output_shape.iter().product::<u64>().max(1);
        let mut labels = Vec::with_capacity(pool.entries.len());
        let mut truth = Vec::with_capacity(pool.entries.len());
        let mut pixels = Vec::with_capacity(pool.entries.len() * mnist::PIXELS);
        for e in &pool.entries {
            if u64::from(e.label) >= classes || e.label > u32::from(u8::MAX) {
                return Err(FusionError::PoolMismatch(format!(
                    "label {} of entry {} is not one of {classes} classes",
                    e.label, e.index
                )));
            }
            let i = e.index as usize;
            let img = test.image(i).ok_or_else(|| {
                FusionError::PoolMismatch(format!(
                    "index {i} outside the {} public samples",
                    test.len()
                ))
            })?;
            labels.push(e.label as u8);
            truth.push(test.labels()[i]);
            pixels.extend_from_slice(img);
        }
        Ok(Self {
            labels,
            truth,
            pixels,
        })
    }

    /// `GetPublicPool`, then [`PublicRows::new`].
    pub async fn fetch(
        client: &Client,
        info: &ServiceInfo,
        test: &Dataset,
    ) -> Result<Self, FusionError> {
        let pool = client.public_pool().await.map_err(InferError::from)?;
        Self::new(info, &pool, test)
    }

    /// Entries in the pool.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the pool is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn image(&self, p: usize) -> &[u8] {
        &self.pixels[p * mnist::PIXELS..(p + 1) * mnist::PIXELS]
    }
}

/// How (T, R) are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Params {
    /// the cheapest (T, R) whose exact worst-case escape probability is at most `target`
    Tuned {
        /// escape probability target, in (0, 1]
        target: f64,
    },
    /// given
    Fixed {
        /// public rows
        t: usize,
        /// copies
        r: usize,
    },
}

impl Default for Params {
    fn default() -> Self {
        Params::Tuned {
            target: DEFAULT_TARGET,
        }
    }
}

/// How to run a verified inference.
#[derive(Debug, Clone)]
pub struct FusionOptions {
    /// the secure inference's options (backend, output mode; `batch_rows`, where smaller
    /// than the server's largest batch, bounds the rows T + R*B of each Fusion batch,
    /// which is one protocol batch)
    pub infer: InferOptions,
    /// (T, R)
    pub params: Params,
    /// confidence of check (c)
    pub confidence: f64,
}

impl Default for FusionOptions {
    fn default() -> Self {
        Self {
            infer: InferOptions::default(),
            params: Params::default(),
            confidence: DEFAULT_CONFIDENCE,
        }
    }
}

/// The parameters a batch ran with and their exact bound.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Setting {
    /// public rows
    #[serde(rename = "T")]
    pub t: usize,
    /// copies
    #[serde(rename = "R")]
    pub r: usize,
    /// own inputs
    #[serde(rename = "B")]
    pub b: usize,
    /// T + R*B
    pub rows: usize,
    /// the exact worst-case escape probability, max over m of C(B,m)/C(T+RB,Rm)
    pub escape: f64,
    /// its log2
    pub log2_escape: f64,
}

impl Setting {
    /// The (T, R) for B own inputs under `params` and the server's `max_rows`.
    pub fn choose(params: Params, b: usize, max_rows: u64) -> Result<Self, FusionError> {
        let limit = usize::try_from(max_rows).unwrap_or(usize::MAX);
        let c = match params {
            Params::Tuned { target } => tune::alternatives(b, target, limit, MAX_R)?
                .into_iter()
                .next()
                .ok_or(TuneError::Unreachable {
                    max_rows: limit,
                    target_log2: target.log2(),
                })?,
            Params::Fixed { t, r } => tune::evaluate(t, r, b)?,
        };
        if c.rows as u64 > max_rows {
            return Err(FusionError::TooManyRows {
                rows: c.rows,
                max: max_rows,
            });
        }
        Ok(Self {
            t: c.t,
            r: c.r,
            b,
            rows: c.rows,
            escape: c.escape,
            log2_escape: c.log2_escape,
        })
    }

    /// The Fusion batches for B own inputs under the server's `max_rows`: one batch if
    /// [`Setting::choose`] fits it, else the fewest batches k whose even split of B (sizes
    /// ⌈B/k⌉ and ⌊B/k⌋) each fit, in input order. When not even B = 1 fits, the error
    /// of the one-batch choice is returned.
    pub fn split(params: Params, b: usize, max_rows: u64) -> Result<Vec<Self>, FusionError> {
        let one = match Self::choose(params, b, max_rows) {
            Ok(s) => return Ok(vec![s]),
            Err(
                e @ (FusionError::TooManyRows { .. }
                | FusionError::Tune(TuneError::Unreachable { .. })),
            ) => e,
            Err(e) => return Err(e),
        };
        let fits = |size: usize| Self::choose(params, size, max_rows).ok();
        // the largest size that fits (fewer own inputs never need more rows)
        let (mut lo, mut hi) = (0, b);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid).is_some() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo == 0 {
            return Err(one);
        }
        let mut k = b.div_ceil(lo);
        while k <= b {
            // n_big batches of small + 1, the rest of small (small ≥ 1 as k ≤ b)
            let (small, n_big) = (b / k, b % k);
            let ss = fits(small);
            let big = if n_big > 0 { fits(small + 1) } else { ss };
            if let (Some(sb), Some(ss)) = (big, ss) {
                return Ok((0..k).map(|i| if i < n_big { sb } else { ss }).collect());
            }
            k += 1;
        }
        Err(one)
    }
}

/// A verified result. `Debug` leaves out the labels and logits (the client's own
/// results).
#[derive(Clone)]
pub struct FusionOutput {
    /// one label per own input, in input order
    pub labels: Vec<usize>,
    /// in logits mode, the logits per own input (signed, scale 2^f)
    pub logits: Option<Vec<Vec<i64>>>,
    /// the parameters and bound
    pub setting: Setting,
    /// public rows whose label was the true label
    pub public_correct: usize,
    /// pool entries whose published label is the true label, of `pool_size` (check (c))
    pub pool_correct: usize,
    /// pool entries
    pub pool_size: usize,
    /// p-value of check (c)
    pub p_value: f64,
}

impl std::fmt::Debug for FusionOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusionOutput")
            .field("labels", &format_args!("[{} redacted]", self.labels.len()))
            .field("logits", &self.logits.as_ref().map(|_| "[redacted]"))
            .field("setting", &self.setting)
            .field("public_correct", &self.public_correct)
            .field("pool_correct", &self.pool_correct)
            .field("pool_size", &self.pool_size)
            .field("p_value", &self.p_value)
            .finish()
    }
}

/// The verified results of B own inputs, maybe from several Fusion batches
/// ([`Setting::split`]); returned only when every batch passed every check. `Debug` leaves
/// out the labels and logits (the client's own results).
#[derive(Clone)]
pub struct VerifiedOutput {
    /// one label per own input, in input order
    pub labels: Vec<usize>,
    /// in logits mode, the logits per own input (signed, scale 2^f)
    pub logits: Option<Vec<Vec<i64>>>,
    /// each batch's own inputs, parameters, bound and checks, in input order
    pub batches: Vec<FusionOutput>,
}

impl std::fmt::Debug for VerifiedOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedOutput")
            .field("labels", &format_args!("[{} redacted]", self.labels.len()))
            .field("logits", &self.logits.as_ref().map(|_| "[redacted]"))
            .field("batches", &self.batches)
            .finish()
    }
}

impl VerifiedOutput {
    /// The bound of the whole run: the largest of the batches' exact bounds (the batches
    /// are independent checks; see the module documentation).
    pub fn escape(&self) -> f64 {
        self.batches
            .iter()
            .map(|b| b.setting.escape)
            .fold(0.0, f64::max)
    }

    /// log2 of [`Self::escape`].
    pub fn log2_escape(&self) -> f64 {
        self.batches
            .iter()
            .map(|b| b.setting.log2_escape)
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// Rows sent through the secure protocol in all (T + R·B summed over the batches).
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.setting.rows).sum()
    }

    /// What `infer` and `demo` print about the run: parameters, bound, checks passed.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let checks = |o: &FusionOutput| {
            format!(
                "checks passed: (a) {} public rows match the published labels, (b) copies agree, (c) {} of the {} published pool labels correct, consistent with the claimed accuracy (p = {:.3})",
                o.setting.t, o.pool_correct, o.pool_size, o.p_value
            )
        };
        if let [o] = self.batches.as_slice() {
            let st = o.setting;
            let _ = writeln!(
                s,
                "Fusion: T = {}, R = {}, B = {}: {} rows in one batch; a cheating server escapes with probability at most {:.3e} = 2^{:.2}",
                st.t, st.r, st.b, st.rows, st.escape, st.log2_escape
            );
            let _ = writeln!(s, "{}", checks(o));
            return s;
        }
        let _ = writeln!(
            s,
            "Fusion: B = {} own inputs in {} batches (T + R*B of one batch would exceed the server's largest batch), {} rows in all; a cheating server escapes with probability at most {:.3e} = 2^{:.2} (the largest bound of one batch)",
            self.labels.len(),
            self.batches.len(),
            self.rows(),
            self.escape(),
            self.log2_escape()
        );
        for (i, o) in self.batches.iter().enumerate() {
            let st = o.setting;
            let _ = writeln!(
                s,
                "  batch {}: T = {}, R = {}, B = {}, {} rows, bound 2^{:.2}; {}",
                i + 1,
                st.t,
                st.r,
                st.b,
                st.rows,
                st.log2_escape,
                checks(o)
            );
        }
        s
    }

    /// The summary `infer --json` and `demo --json` print under `fusion`.
    pub fn summary(&self) -> FusionSummary {
        FusionSummary {
            b: self.labels.len(),
            rows: self.rows(),
            escape: self.escape(),
            log2_escape: self.log2_escape(),
            batches: self
                .batches
                .iter()
                .map(|o| BatchSummary {
                    setting: o.setting,
                    public_correct: o.public_correct,
                    pool_correct: o.pool_correct,
                    pool_size: o.pool_size,
                    p_value: o.p_value,
                })
                .collect(),
        }
    }
}

/// [`VerifiedOutput::summary`].
#[derive(Debug, Clone, Serialize)]
pub struct FusionSummary {
    /// own inputs in all
    #[serde(rename = "B")]
    pub b: usize,
    /// rows through the protocol in all
    pub rows: usize,
    /// the run's bound (the largest batch bound)
    pub escape: f64,
    /// its log2
    pub log2_escape: f64,
    /// per Fusion batch
    pub batches: Vec<BatchSummary>,
}

/// One batch of a [`FusionSummary`].
#[derive(Debug, Clone, Serialize)]
pub struct BatchSummary {
    /// T, R, B, rows and the exact bound
    #[serde(flatten)]
    pub setting: Setting,
    /// public rows whose label was the true label
    pub public_correct: usize,
    /// pool entries whose published label is the true label (check (c))
    pub pool_correct: usize,
    /// pool entries
    pub pool_size: usize,
    /// p-value of check (c)
    pub p_value: f64,
}

/// What a session of Fusion batches gives: one outcome per batch, and the session's costs.
#[derive(Debug)]
pub struct SessionOutcomes {
    /// per batch: the verified results or why the batch was rejected
    pub batches: Vec<Result<FusionOutput, FusionError>>,
    /// the server's session number
    pub session_id: u64,
    /// the output mode the server applied
    pub output: OutputMode,
    /// the client's costs
    pub cost: CostReport,
}

/// The most rows of one Fusion batch: the server's largest batch, or the caller's
/// `batch_rows` where smaller.
fn row_limit(info: &ServiceInfo, opts: &InferOptions) -> u64 {
    let mine = opts
        .batch_rows
        .map_or(u64::MAX, |b| u64::try_from(b).unwrap_or(u64::MAX));
    info.max_rows.min(mine)
}

/// Verifies the B images of `own_pixels`: one Fusion batch, or the fewest that fit the
/// server's largest batch ([`Setting::split`]), in one protocol session. Fetches nothing;
/// `info` and `public` are already in hand. A failed check in any batch is the error
/// (nothing is returned).
pub async fn run_verified(
    client: &Client,
    info: &ServiceInfo,
    public: &PublicRows,
    own_pixels: &[u8],
    opts: &FusionOptions,
) -> Result<(VerifiedOutput, SessionOutcomes), FusionError> {
    let cols = mnist::PIXELS;
    if own_pixels.is_empty() || !own_pixels.len().is_multiple_of(cols) {
        return Err(InferError::Shape {
            len: own_pixels.len(),
            cols,
        }
        .into());
    }
    let settings = Setting::split(
        opts.params,
        own_pixels.len() / cols,
        row_limit(info, &opts.infer),
    )?;
    let mut own = Vec::with_capacity(settings.len());
    let mut at = 0;
    for st in &settings {
        own.push(&own_pixels[at..at + st.b * cols]);
        at += st.b * cols;
    }
    let mut s = run_sessions(client, info, public, &own, opts).await?;
    let mut out = VerifiedOutput {
        labels: Vec::with_capacity(own_pixels.len() / cols),
        logits: None,
        batches: Vec::with_capacity(settings.len()),
    };
    for b in std::mem::take(&mut s.batches) {
        let b = b?;
        out.labels.extend_from_slice(&b.labels);
        if let Some(l) = &b.logits {
            out.logits.get_or_insert_with(Vec::new).extend_from_slice(l);
        }
        out.batches.push(b);
    }
    if out.batches.is_empty() {
        return Err(InferError::Empty.into());
    }
    Ok((out, s))
}

/// Several independent Fusion batches (`own[i]` holds batch i's B_i images) in one
/// protocol session: each batch has its own (T, R) for its B_i, public draw and secret
/// order. The session's error (transport, refusal) is returned as such; each batch's
/// checks are in its outcome.
pub async fn run_sessions(
    client: &Client,
    info: &ServiceInfo,
    public: &PublicRows,
    own: &[&[u8]],
    opts: &FusionOptions,
) -> Result<SessionOutcomes, FusionError> {
    let m = info.model.as_ref().ok_or(InferError::NoModel)?;
    let kind = opts.infer.backend;
    if !info.backends.iter().any(|b| b == kind.name()) {
        return Err(InferError::NotOffered {
            backend: kind.name().into(),
            offered: info.backends.join(", "),
        }
        .into());
    }
    let spec = model_spec(m)?;
    let cols = spec.input_len;
    if cols != mnist::PIXELS {
        return Err(InferError::BadModel(format!(
            "Fusion's public rows are MNIST images of {} pixels, the model takes {cols}",
            mnist::PIXELS
        ))
        .into());
    }
    if own.is_empty() {
        return Err(InferError::Empty.into());
    }
    if let Some(o) = own
        .iter()
        .find(|o| o.is_empty() || !o.len().is_multiple_of(cols))
    {
        return Err(InferError::Shape { len: o.len(), cols }.into());
    }
    // one setting per batch (the tuner runs once per distinct B)
    let mut settings: Vec<Setting> = Vec::with_capacity(own.len());
    for o in own {
        let b = o.len() / cols;
        let st = match settings.iter().find(|s| s.b == b) {
            Some(s) => *s,
            None => Setting::choose(opts.params, b, row_limit(info, &opts.infer))?,
        };
        settings.push(st);
    }
    let total: usize = settings.iter().map(|s| s.rows).sum();
    check_budget(info, total)?;

    // Mix every batch (OS randomness; the plans never leave this process).
    let mut plans = Vec::with_capacity(own.len());
    // the mixed rows (own inputs among public ones, in the secret order): zeroized when the
    // session's closure is dropped, each image's encoding as soon as it is copied
    let mut rows = Zeroizing::new(Vec::<u64>::with_capacity(total * cols));
    {
        let mut rng = rand::rng();
        for (pixels, st) in own.iter().zip(&settings) {
            let plan = MixPlan::new(st.b, st.t, st.r, public.len(), &mut rng)?;
            let own_rows: Vec<&[u8]> = pixels.chunks(cols).collect();
            let batch = plan.assemble(&own_rows, |p| public.image(p))?;
            for img in batch {
                rows.extend_from_slice(&Zeroizing::new(spec.fixed.encode_pixels(img)));
            }
            plans.push(plan);
        }
    }

    let sizes: Vec<usize> = settings.iter().map(|s| s.rows).collect();
    let per = sizes.iter().copied().max().unwrap_or(1);
    let mut start = SessionStart::new(kind.name()).with_batch(per as u64, cols as u64);
    if let Some(o) = opts.infer.output {
        start = start.with_output(o);
    }
    let cheetah = opts.infer.cheetah;
    let ring = spec.fixed.ring();
    let spec = Arc::new(spec);
    let out = client
        .session(start, move |ch, accepted| {
            let mut rng = rand::rng();
            match kind {
                BackendKind::Cheetah => client_batches_sized::<Cheetah, _>(
                    ch,
                    &spec,
                    &cheetah,
                    &rows,
                    &sizes,
                    accepted.output,
                    &mut rng,
                ),
                other => Err(BackendError::BadBatch(format!(
                    "backend {other} is not available in this client"
                ))),
            }
        })
        .await
        .map_err(InferError::from)?;
    let (values, spent) = out.value;
    zeroize_spent(spent).await;

    let exp = Expectations {
        pool_labels: &public.labels,
        pool_truth: &public.truth,
        claimed_accuracy: m.claimed_accuracy,
        confidence: opts.confidence,
    };
    let outcomes = plans
        .iter()
        .zip(&settings)
        .zip(values)
        .map(|((plan, &setting), batch)| {
            let verified = match &batch.logits {
                Some(l) => {
                    let logits: Vec<Vec<i64>> = l
                        .chunks(batch.classes.max(1))
                        .map(|r| r.iter().map(|&v| ring.to_signed(v)).collect())
                        .collect();
                    let v = check(plan, &logits, &exp)?;
                    let labels = v
                        .outputs
                        .iter()
                        .map(fusion_common::fusion::check::RowOutput::label)
                        .collect();
                    (
                        labels,
                        Some(v.outputs),
                        (v.public_correct, v.pool_correct, v.pool_size, v.p_value),
                    )
                }
                None => {
                    let v = check(plan, &batch.labels, &exp)?;
                    (
                        v.outputs,
                        None,
                        (v.public_correct, v.pool_correct, v.pool_size, v.p_value),
                    )
                }
            };
            Ok(FusionOutput {
                labels: verified.0,
                logits: verified.1,
                setting,
                public_correct: verified.2.0,
                pool_correct: verified.2.1,
                pool_size: verified.2.2,
                p_value: verified.2.3,
            })
        })
        .collect();
    Ok(SessionOutcomes {
        batches: outcomes,
        session_id: out.accepted.session_id,
        output: out.accepted.output,
        cost: out.cost,
    })
}

/// The exit status of `fusion-client infer` when the server is caught cheating.
pub const EXIT_DETECTED: i32 = 3;

/// Whether a command's error is a detection of the server's misbehaviour (the binary
/// then exits with [`EXIT_DETECTED`]).
pub fn is_detected(e: &anyhow::Error) -> bool {
    e.downcast_ref::<FusionError>()
        .is_some_and(FusionError::is_detection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_results_and_inputs_shows_no_label_logit_or_pixel() {
        use crate::infer::{InferOutput, Inputs};
        let labels = vec![7, 3, 9];
        let logits = Some(vec![vec![-424_242, 31_337_000]]);
        let setting = Setting::choose(Params::Fixed { t: 1, r: 2 }, 3, 4096).unwrap();
        let fusion = FusionOutput {
            labels: labels.clone(),
            logits: logits.clone(),
            setting,
            public_correct: 1,
            pool_correct: 2,
            pool_size: 3,
            p_value: 0.25,
        };
        let verified = VerifiedOutput {
            labels: labels.clone(),
            logits: logits.clone(),
            batches: vec![fusion.clone()],
        };
        let infer = InferOutput {
            labels: labels.clone(),
            logits,
            scale_bits: 12,
            output: OutputMode::Logits,
            backend: BackendKind::Cheetah,
            batches: 1,
            session_id: 5,
            cost: CostReport::default(),
        };
        for d in [
            format!("{fusion:?}"),
            format!("{verified:?}"),
            format!("{infer:?}"),
        ] {
            assert!(!d.contains("424242") && !d.contains("31337000"), "{d}");
            assert!(!d.contains("[7, 3, 9]"), "{d}");
            assert!(d.contains("[3 redacted]"), "{d}");
        }
        let pixels = [201u8, 202, 203];
        let d = format!("{:?}", Inputs::Pixels(&pixels));
        assert!(!d.contains("201") && d.contains("3 bytes redacted"), "{d}");
        let enc = [77_777_777u64];
        let d = format!("{:?}", Inputs::Encoded(&enc));
        assert!(
            !d.contains("77777777") && d.contains("1 values redacted"),
            "{d}"
        );
    }

    #[test]
    fn settings_are_tuned_or_given_and_fit_the_server() {
        // the tuner's cheapest choice for B = 3 at 2^-40 (as `tune --batch 3` prints)
        let s = Setting::choose(Params::default(), 3, 4096).unwrap();
        assert_eq!((s.t, s.r, s.b, s.rows), (13, 14, 3, 55));
        assert!(s.log2_escape <= -40.0);
        // T = 1, R = 2, B = 3: max(C(3,1)/C(7,2), C(3,2)/C(7,4), C(3,3)/C(7,6)) = 1/7
        let s = Setting::choose(Params::Fixed { t: 1, r: 2 }, 3, 4096).unwrap();
        assert_eq!(s.rows, 7);
        assert!((s.escape - 1.0 / 7.0).abs() < 1e-15);
        assert!(matches!(
            Setting::choose(Params::Fixed { t: 1, r: 2 }, 3, 6),
            Err(FusionError::TooManyRows { rows: 7, max: 6 })
        ));
        assert!(matches!(
            Setting::choose(Params::default(), 3, 20),
            Err(FusionError::Tune(TuneError::Unreachable { .. }))
        ));
    }

    #[test]
    fn inputs_too_many_for_one_batch_are_split_evenly_into_the_fewest_that_fit() {
        let fixed = Params::Fixed { t: 2, r: 3 };
        // one batch fits: unchanged
        let one = Setting::split(fixed, 5, 60).unwrap();
        assert_eq!(one, vec![Setting::choose(fixed, 5, 60).unwrap()]);
        // 2 + 3*30 = 92 > 60; at most 19 per batch: 2 batches of 15 (47 rows each)
        let two = Setting::split(fixed, 30, 60).unwrap();
        assert_eq!(
            two.iter().map(|s| (s.b, s.rows)).collect::<Vec<_>>(),
            [(15, 47), (15, 47)]
        );
        // uneven: 16 then 15
        let odd = Setting::split(fixed, 31, 60).unwrap();
        assert_eq!(odd.iter().map(|s| s.b).collect::<Vec<_>>(), [16, 15]);
        // 57 own inputs at most 19 per batch: exactly 3 batches of 19
        let three = Setting::split(fixed, 57, 60).unwrap();
        assert_eq!(three.iter().map(|s| s.b).collect::<Vec<_>>(), [19, 19, 19]);
        // not even one input fits: the one-batch error
        assert!(matches!(
            Setting::split(fixed, 5, 4),
            Err(FusionError::TooManyRows { rows: 17, max: 4 })
        ));
        // tuned: 200 inputs do not fit 1024 rows at 2^-40 in one batch (`tune` says so);
        // each part meets the target and fits
        assert!(Setting::choose(Params::default(), 200, 1024).is_err());
        let tuned = Setting::split(Params::default(), 200, 1024).unwrap();
        assert!(tuned.len() >= 2);
        assert_eq!(tuned.iter().map(|s| s.b).sum::<usize>(), 200);
        let sizes: Vec<usize> = tuned.iter().map(|s| s.b).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        for s in &tuned {
            assert!(s.rows <= 1024 && s.log2_escape <= -40.0, "{s:?}");
        }
        // fewest: one batch fewer does not fit
        let k = tuned.len() - 1;
        assert!(Setting::choose(Params::default(), 200usize.div_ceil(k), 1024).is_err());
    }

    #[test]
    fn the_bound_of_split_batches_is_the_largest_batch_bound() {
        let out = |t, r, b| FusionOutput {
            labels: vec![0; b],
            logits: None,
            setting: Setting::choose(Params::Fixed { t, r }, b, 4096).unwrap(),
            public_correct: t,
            pool_correct: 985,
            pool_size: 1000,
            p_value: 1.0,
        };
        let v = VerifiedOutput {
            labels: vec![0; 7],
            logits: None,
            batches: vec![out(1, 2, 3), out(2, 3, 4)],
        };
        let worst = v.batches[0].setting.escape.max(v.batches[1].setting.escape);
        assert_eq!(v.escape(), worst);
        assert_eq!(v.rows(), 7 + 14);
        let j = serde_json::to_value(v.summary()).unwrap();
        assert_eq!(j["B"], 7);
        assert_eq!(j["batches"][1]["T"], 2);
        assert_eq!(j["batches"][1]["rows"], 14);
        assert!(v.render().contains("in 2 batches"));
    }

    #[test]
    fn only_a_failed_check_is_a_detection() {
        let d: anyhow::Error =
            FusionError::Detected(CheckError::PublicMismatch { rows: 2, of: 13 }).into();
        assert!(is_detected(&d));
        assert!(d.to_string().contains("check (a) failed: 2 of 13"));
        let other: anyhow::Error = FusionError::NoPool.into();
        assert!(!is_detected(&other));
        assert!(!is_detected(&anyhow::anyhow!("connection refused")));
    }
}
