//! Hybrid completion: when the cryptanalytic chain stops short of a model (an incomplete
//! first layer, undecided signs, ...), learn the rest of the network with the recovered
//! first-layer rows built in. Jagielski, Carlini, Berthelot, Kurakin, Papernot, "High
//! Accuracy and High Fidelity Extraction of Neural Networks" (USENIX Security 2020, §6:
//! "learning-based extraction with the first layer from a functionally-equivalent
//! attack"). This is learning, not cryptanalytic extraction, and is reported as such.
//!
//! ```text
//! rows with a decided sign (unit normal w_i, offset b_i, oriented active side z > 0):
//!     fixed in layer 1 at norm ROW_NORM (relu commutes with a positive scale; layer 2
//!     absorbs it)
//! the other first-layer rows (missing, undecided), layers 2.. : trainable, He initialised
//! N attacker inputs (MNIST training images, seeded choice; optionally uniform points in
//!     [0,1]^d) -> oracle logits                                    (N more queries)
//! Adam on the mean squared logit error, cosine rate decay, E epochs  (nn::train::fit)
//! the control: the same architecture, inputs, logits, epochs and seed with no row fixed
//!     (pure learning-based extraction from logits)
//! both measured against the victim (reference copy, not queried)
//! ```
//! The first-layer result can be saved and loaded ([`FirstLayerFile`]) so that the hours
//! of the search are not repeated for each completion; the file records the queries it
//! cost and the victim's digest and shape, and is refused for another model. A loaded
//! file's rows get the chain's first-layer sign step again ([`resign`]: the same wiggle a
//! fresh run makes, its queries counted), so that a completion uses today's signs, not
//! those of the run that saved the file; the file's sign stands only where the step
//! leaves a row undecided.

use super::super::data::{Arithmetic, AttackData};
use super::super::oracle::{Oracle, OracleError, OutputMode, query_logits};
use super::super::progress;
use super::super::reference;
use super::deep::{FirstLayerReport, Row};
use super::layers::{self, DeeperReport, SignReport};
use super::{CarliniConfig, Metrics, measure};
use fusion_common::fixed::FixedPoint;
use fusion_common::nn::train::{FixedRow, Schedule, Targets, TrainConfig, fit};
use fusion_common::nn::{LayerSpec, Model, ModelDigest};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// The format tag of a saved first layer.
pub const FIRST_LAYER_FORMAT: &str = "fusion carlini first layer v1";

/// Norm of a fixed first-layer row (He initialisation's expected row norm, sqrt(2), so
/// that fixed and trainable rows start at the same scale).
const ROW_NORM: f64 = std::f64::consts::SQRT_2;

/// Errors of the hybrid completion and of the first-layer files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HybridError {
    /// Reading or writing a first-layer file failed.
    #[error("first-layer file {path}: {source}")]
    Io {
        /// the file
        path: String,
        /// the cause
        source: std::io::Error,
    },
    /// A first-layer file is not valid JSON of the expected form.
    #[error("first-layer file {path}: {source}")]
    Json {
        /// the file
        path: String,
        /// the cause
        source: serde_json::Error,
    },
    /// A first-layer file of another format.
    #[error("first-layer file: format {found:?}, expected {FIRST_LAYER_FORMAT:?}")]
    Format {
        /// the tag in the file
        found: String,
    },
    /// The file was made against another model.
    #[error(
        "first-layer file made against model {file} ({file_dims:?}), not this model {model} \
         ({model_dims:?}): refused"
    )]
    ModelMismatch {
        /// digest in the file
        file: ModelDigest,
        /// the victim's digest
        model: ModelDigest,
        /// layer widths in the file
        file_dims: Vec<usize>,
        /// the victim's layer widths
        model_dims: Vec<usize>,
    },
    /// The rows in the file do not fit the recorded shape.
    #[error("first-layer file: {0}")]
    Rows(String),
    /// The oracle gives labels only.
    #[error("the hybrid completion learns from logits; this oracle returns labels only")]
    LabelsOnly,
    /// The oracle failed for another reason than the budget.
    #[error(transparent)]
    Oracle(OracleError),
    /// Training or measuring failed.
    #[error("hybrid completion: {0}")]
    Train(String),
}

/// A first-layer row as saved: unit normal, offset, its sign (+1 / -1 decided and already
/// applied to `w` and `b`, 0 undecided) and its support.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedRow {
    /// unit normal (oriented by `sign` when decided)
    pub w: Vec<f64>,
    /// offset
    pub b: f64,
    /// +1 / -1: decided (and applied); 0: undecided
    pub sign: f64,
    /// critical points supporting the row
    pub points: usize,
    /// refitted from many critical points
    pub refined: bool,
}

impl SavedRow {
    /// The row as the search holds it (the inverse of [`FirstLayerFile::new`]'s copy; the
    /// sign, where decided, stays applied to `w` and `b`).
    pub fn row(&self) -> Row {
        Row {
            w: self.w.clone(),
            b: self.b,
            points: self.points,
            refined: self.refined,
        }
    }
}

/// The saved result of the first-layer search (and the first-layer signs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstLayerFile {
    /// [`FIRST_LAYER_FORMAT`]
    pub format: String,
    /// the victim's digest (of the reference copy the run was measured with)
    pub model_digest: ModelDigest,
    /// the victim's widths: input, hidden..., classes
    pub dims: Vec<usize>,
    /// rows charged by the run that produced the file (search, signs and whatever of the
    /// chain ran): counted again in every report that uses the file
    pub queries: u64,
    /// the run's settings
    pub config: CarliniConfig,
    /// the recovered rows
    pub rows: Vec<SavedRow>,
    /// the run's first-layer report
    pub first_layer: Option<FirstLayerReport>,
    /// the run's chain report (signs, why it stopped), as recorded
    pub deeper: Option<serde_json::Value>,
    /// for a file saved from a loaded one: the sign step run on the loaded rows (the
    /// signs in `rows` are the ones it left; its queries are in `queries`)
    #[serde(default)]
    pub resigned: Option<SignRefresh>,
}

/// Input, hidden and output widths of an MLP model.
pub fn model_dims(model: &Model) -> Vec<usize> {
    let arch = model.architecture();
    let mut dims = vec![arch.input_len()];
    dims.extend(arch.layers().iter().filter_map(|l| match *l {
        LayerSpec::Dense { outputs, .. } => Some(outputs),
        _ => None,
    }));
    dims
}

impl FirstLayerFile {
    /// The file of a run against `victim`: `rows` (oriented where `signs` is +-1),
    /// `queries` rows charged.
    pub fn new(
        victim: &Model,
        config: &CarliniConfig,
        queries: u64,
        rows: &[Row],
        signs: &[f64],
        first_layer: Option<FirstLayerReport>,
        deeper: Option<DeeperReport>,
    ) -> Self {
        Self {
            format: FIRST_LAYER_FORMAT.into(),
            model_digest: *victim.digest(),
            dims: model_dims(victim),
            queries,
            config: config.clone(),
            rows: rows
                .iter()
                .enumerate()
                .map(|(i, r)| SavedRow {
                    w: r.w.clone(),
                    b: r.b,
                    sign: signs.get(i).copied().unwrap_or(0.0),
                    points: r.points,
                    refined: r.refined,
                })
                .collect(),
            first_layer,
            deeper: deeper.and_then(|r| serde_json::to_value(r).ok()),
            resigned: None,
        }
    }

    /// The file of a completion from this loaded file: the rows with the signs it used
    /// (see [`resign`]) and the sign step's queries added to the file's.
    pub fn resigned(&self, rows: Vec<SavedRow>, refresh: &SignRefresh) -> Self {
        Self {
            rows,
            queries: self.queries + refresh.queries,
            resigned: Some(refresh.clone()),
            ..self.clone()
        }
    }

    /// What a report says of the run behind this loaded file (`path`), with this run's
    /// sign step on its rows (`signs`, if it ran): `queries` is the file's own count,
    /// `sign_step_queries` the step's, and `queries_with_sign_step` both, the first
    /// layer's cost as the hybrid counts it.
    pub fn run_summary(&self, path: &Path, signs: Option<&SignRefresh>) -> serde_json::Value {
        let sign_step = signs.map_or(0, |s| s.queries);
        serde_json::json!({
            "loaded_from": path.display().to_string(),
            "queries": self.queries,
            "sign_step_queries": sign_step,
            "queries_with_sign_step": self.queries + sign_step,
            "config": self.config,
            "first_layer": self.first_layer,
            "deeper": self.deeper,
        })
    }

    /// Writes the file (JSON).
    pub fn save(&self, path: &Path) -> Result<(), HybridError> {
        let name = path.display().to_string();
        let json = serde_json::to_vec(self).map_err(|source| HybridError::Json {
            path: name.clone(),
            source,
        })?;
        std::fs::write(path, json).map_err(|source| HybridError::Io { path: name, source })
    }

    /// Reads a file and checks it against `victim`: same digest and widths, rows of the
    /// input width, no more rows than the first layer has. Refused by name otherwise.
    pub fn load(path: &Path, victim: &Model) -> Result<Self, HybridError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| HybridError::Io {
            path: name.clone(),
            source,
        })?;
        let f: Self = serde_json::from_slice(&bytes)
            .map_err(|source| HybridError::Json { path: name, source })?;
        f.check(victim)?;
        Ok(f)
    }

    /// The checks of [`FirstLayerFile::load`].
    pub fn check(&self, victim: &Model) -> Result<(), HybridError> {
        if self.format != FIRST_LAYER_FORMAT {
            return Err(HybridError::Format {
                found: self.format.clone(),
            });
        }
        let dims = model_dims(victim);
        if self.model_digest != *victim.digest() || self.dims != dims {
            return Err(HybridError::ModelMismatch {
                file: self.model_digest,
                model: *victim.digest(),
                file_dims: self.dims.clone(),
                model_dims: dims,
            });
        }
        let d = dims.first().copied().unwrap_or(0);
        let width = dims.get(1).copied().unwrap_or(0);
        if self.rows.len() > width {
            return Err(HybridError::Rows(format!(
                "{} rows for a first layer of {width}",
                self.rows.len()
            )));
        }
        if let Some((i, r)) = self
            .rows
            .iter()
            .enumerate()
            .find(|(_, r)| r.w.len() != d || !(r.sign == 0.0 || r.sign.abs() == 1.0))
        {
            return Err(HybridError::Rows(format!(
                "row {i}: {} weights (input width {d}), sign {}",
                r.w.len(),
                r.sign
            )));
        }
        Ok(())
    }
}

/// The first-layer sign step run again on a loaded file's rows ([`resign`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignRefresh {
    /// rows loaded
    pub rows: usize,
    /// of those, with a sign in the file
    pub file_signed: usize,
    /// signs the step decided now
    pub fresh_decided: usize,
    /// decided both in the file and now, differently (now's is used)
    pub disagree: usize,
    /// undecided now, the file's sign kept
    pub kept_from_file: usize,
    /// rows with a sign in the end (fixed in the hybrid)
    pub signed: usize,
    /// rows charged to the step (counted in the hybrid's queries)
    pub queries: u64,
    /// wall time of the step
    pub seconds: f64,
    /// the wiggle's figures (`None` if the budget stopped it)
    pub report: Option<SignReport>,
    /// why the step stopped (budget), if it did: the file's signs are kept
    pub stopped: Option<String>,
}

/// The rows with the signs used: `fresh[i]` (relative to the search's orientation of row
/// i, `file` sign times its saved normal) where decided, else the file's. The result is
/// oriented by its sign, as saved rows are. Fills the counts of `refresh` (not its
/// queries, time, report).
pub fn merge_signs(rows: &[SavedRow], fresh: &[f64], refresh: &mut SignRefresh) -> Vec<SavedRow> {
    refresh.rows = rows.len();
    refresh.file_signed = 0;
    refresh.fresh_decided = 0;
    refresh.disagree = 0;
    refresh.kept_from_file = 0;
    let out: Vec<SavedRow> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let new = fresh.get(i).copied().unwrap_or(0.0);
            refresh.file_signed += usize::from(r.sign != 0.0);
            refresh.fresh_decided += usize::from(new != 0.0);
            refresh.disagree += usize::from(new != 0.0 && r.sign != 0.0 && new != r.sign);
            refresh.kept_from_file += usize::from(new == 0.0 && r.sign != 0.0);
            let sign = if new != 0.0 { new } else { r.sign };
            // back to the search's orientation (a decided sign is applied in the file),
            // then this sign applied
            let to_search = if r.sign != 0.0 { r.sign } else { 1.0 };
            let k = to_search * if sign != 0.0 { sign } else { 1.0 };
            SavedRow {
                w: r.w.iter().map(|v| k * v).collect(),
                b: k * r.b,
                sign,
                points: r.points,
                refined: r.refined,
            }
        })
        .collect();
    refresh.signed = out.iter().filter(|r| r.sign != 0.0).count();
    out
}

/// Runs the chain's first-layer sign step (layers.rs, the wiggle a fresh run makes after
/// the search; output noise scale `noise`, as `CarliniConfig::noise`) on all of a loaded
/// file's `rows`, in the search's orientation, and merges its signs with the file's
/// ([`merge_signs`]). Its queries go through `oracle` like any other. If the budget stops
/// it, the file's signs are kept and the stop is recorded.
pub fn resign(
    oracle: &mut dyn Oracle,
    rows: &[SavedRow],
    noise: f64,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<SavedRow>, SignRefresh), HybridError> {
    if oracle.mode() == OutputMode::Labels {
        return Err(HybridError::LabelsOnly);
    }
    let start = Instant::now();
    let q0 = oracle.queries();
    let search = |r: &SavedRow| if r.sign != 0.0 { r.sign } else { 1.0 };
    let unsigned = layers::Layer {
        w: rows
            .iter()
            .map(|r| r.w.iter().map(|v| search(r) * v).collect())
            .collect(),
        b: rows.iter().map(|r| search(r) * r.b).collect(),
    };
    let mut refresh = SignRefresh {
        rows: rows.len(),
        file_signed: 0,
        fresh_decided: 0,
        disagree: 0,
        kept_from_file: 0,
        signed: 0,
        queries: 0,
        seconds: 0.0,
        report: None,
        stopped: None,
    };
    let fresh = if rows.is_empty() {
        Vec::new()
    } else {
        match layers::first_layer_signs(oracle, &unsigned, noise.max(1e-9), rng) {
            Ok((signs, mut sr)) => {
                sr.queries = oracle.queries() - q0;
                refresh.report = Some(sr);
                signs
            }
            Err(e @ OracleError::BudgetExhausted { .. }) => {
                refresh.stopped = Some(e.to_string());
                vec![0.0; rows.len()]
            }
            Err(OracleError::LabelsOnly) => return Err(HybridError::LabelsOnly),
            Err(e) => return Err(HybridError::Oracle(e)),
        }
    };
    let out = merge_signs(rows, &fresh, &mut refresh);
    refresh.queries = oracle.queries() - q0;
    refresh.seconds = start.elapsed().as_secs_f64();
    Ok((out, refresh))
}

/// Settings of the completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HybridConfig {
    /// attacker images (MNIST training set, seeded choice) whose logits are queried
    pub learn_queries: usize,
    /// uniform random points in [0,1]^d queried besides
    pub random_queries: usize,
    /// training epochs
    pub epochs: usize,
    /// mini-batch
    pub batch: usize,
    /// Adam's peak rate (cosine decay)
    pub lr: f32,
    /// seed of the image choice, the random points and the training
    pub seed: u64,
}

impl Default for HybridConfig {
    fn default() -> Self {
        Self {
            learn_queries: 60_000,
            random_queries: 0,
            epochs: 20,
            batch: 128,
            lr: 1e-3,
            seed: 1,
        }
    }
}

/// One trained model's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// `"hybrid (recovered rows fixed)"` or `"learning only (no row fixed)"`
    pub method: String,
    /// first-layer rows fixed (recovered, sign decided)
    pub fixed_rows: usize,
    /// rows charged for this model in all: the learning queries, plus the first-layer
    /// run's for the hybrid
    pub queries: u64,
    /// final training loss (mean squared logit error)
    pub final_loss: f32,
    /// training steps
    pub steps: usize,
    /// wall time of this model's training (not the shared query phase, see
    /// [`HybridReport::query_seconds`], nor the measurement)
    pub seconds: f64,
    /// against the victim: random inputs and held-out MNIST (agreement, accuracy)
    pub metrics: Option<Metrics>,
    /// max |logit error| over the held-out MNIST images
    pub heldout_max_logit_error: Option<f64>,
    /// mean |logit error| over the held-out MNIST images
    pub heldout_mean_logit_error: Option<f64>,
}

/// The completion's report: "hybrid completion (learned rest)".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HybridReport {
    /// the settings
    pub config: HybridConfig,
    /// rows of the first-layer run the hybrid builds on (counted in its total)
    pub first_layer_queries: u64,
    /// first-layer rows recovered
    pub rows_recovered: usize,
    /// of those, fixed (sign decided)
    pub rows_fixed: usize,
    /// learning queries answered (images and random points)
    pub learn_queries: u64,
    /// why querying stopped early (budget), if it did
    pub stopped: Option<String>,
    /// wall time of the logit queries, shared by the hybrid and the control
    #[serde(default)]
    pub query_seconds: f64,
    /// for a loaded first layer: its signs decided again ([`resign`])
    #[serde(default)]
    pub signs: Option<SignRefresh>,
    /// the hybrid model
    pub hybrid: Option<Completion>,
    /// the control: the same training with no row fixed
    pub learning_only: Option<Completion>,
}

/// The completion's outcome: its report and the two models.
#[derive(Debug)]
pub struct Hybrid {
    /// figures
    pub report: HybridReport,
    /// the hybrid model (recovered rows fixed)
    pub model: Option<Model>,
    /// the control (pure learning)
    pub learning_only: Option<Model>,
}

/// The fixed rows of layer 1 for `rows` with a decided sign (rescaled to [`ROW_NORM`]).
pub fn fixed_rows(rows: &[SavedRow]) -> Vec<FixedRow> {
    rows.iter()
        .filter(|r| r.sign != 0.0)
        .enumerate()
        .map(|(k, r)| {
            let n = r.w.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-300);
            let s = ROW_NORM / n;
            FixedRow {
                layer: 0,
                row: k,
                w: r.w.iter().map(|v| (v * s) as f32).collect(),
                b: (r.b * s) as f32,
            }
        })
        .collect()
}

/// Queries the oracle's logits on `cfg.learn_queries` attacker images and
/// `cfg.random_queries` uniform points, then trains the hybrid (the decided `rows` fixed)
/// and the control (nothing fixed) on them, and measures both against `victim` if given.
/// `first_layer_queries`: the rows the first-layer run cost (added to the hybrid's total).
#[allow(clippy::too_many_arguments)]
pub fn complete(
    oracle: &mut dyn Oracle,
    widths: &[usize],
    rows: &[SavedRow],
    first_layer_queries: u64,
    data: &AttackData,
    cfg: &HybridConfig,
    victim: Option<(&Model, Arithmetic)>,
    show_progress: bool,
) -> Result<Hybrid, HybridError> {
    if oracle.mode() == OutputMode::Labels {
        return Err(HybridError::LabelsOnly);
    }
    let d = oracle.input_len();
    let classes = oracle.classes();
    let train = |e: &dyn std::fmt::Display| HybridError::Train(e.to_string());
    let bar = progress::bar(show_progress, 3, "hybrid completion");
    bar.set_message("querying logits");
    let mut xs = if cfg.learn_queries > 0 {
        data.real_images(cfg.learn_queries, cfg.seed)
            .map_err(|e| train(&e))?
    } else {
        Vec::new()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x4879_6272);
    xs.extend((0..cfg.random_queries).map(|_| (0..d).map(|_| rng.random::<f32>()).collect()));
    let q0 = oracle.queries();
    let queried = Instant::now();
    let answered = query_logits(oracle, &xs);
    let query_seconds = queried.elapsed().as_secs_f64();
    let stopped = match answered.error {
        None => None,
        Some(e @ OracleError::BudgetExhausted { .. }) => Some(e.to_string()),
        Some(OracleError::LabelsOnly) => return Err(HybridError::LabelsOnly),
        Some(e) => return Err(HybridError::Oracle(e)),
    };
    let ys = answered.results;
    xs.truncate(ys.len());
    let learn_queries = oracle.queries() - q0;
    bar.inc(1);
    let fixed = fixed_rows(rows);
    let mut report = HybridReport {
        config: cfg.clone(),
        first_layer_queries,
        rows_recovered: rows.len(),
        rows_fixed: fixed.len(),
        learn_queries,
        stopped,
        query_seconds,
        signs: None,
        hybrid: None,
        learning_only: None,
    };
    let mut out = Hybrid {
        report: report.clone(),
        model: None,
        learning_only: None,
    };
    if ys.is_empty() {
        bar.finish_and_clear();
        out.report = report;
        return Ok(out);
    }
    let x = Array2::from_shape_vec(
        (xs.len(), d),
        xs.iter().flat_map(|r| r.iter().copied()).collect(),
    )
    .map_err(|e| train(&e))?;
    let t = Array2::from_shape_fn((ys.len(), classes), |(i, c)| {
        ys[i].get(c).copied().unwrap_or(0.0) as f32
    });
    let tc = TrainConfig {
        hidden: widths.to_vec(),
        epochs: cfg.epochs,
        batch: cfg.batch,
        lr: cfg.lr,
        schedule: Schedule::Cosine,
        seed: cfg.seed,
        shift: 0,
        weight_decay: 0.0,
        max_steps: None,
        progress: show_progress,
    };
    let heldout: Vec<Vec<f32>> = data.eval_x.rows().into_iter().map(|r| r.to_vec()).collect();
    for (is_hybrid, name, fixed, queries) in [
        (
            true,
            "hybrid (recovered rows fixed)",
            fixed.as_slice(),
            first_layer_queries + learn_queries,
        ),
        (
            false,
            "learning only (no row fixed)",
            &[][..],
            learn_queries,
        ),
    ] {
        bar.set_message(format!("training: {name}"));
        let start = Instant::now();
        let trained = fit(
            &tc,
            &[d],
            classes,
            x.view(),
            Targets::Outputs(t.view()),
            None,
            fixed,
        )
        .map_err(|e| train(&e))?;
        let seconds = start.elapsed().as_secs_f64();
        let fp = FixedPoint::new(62, 12).map_err(|e| train(&e))?;
        let model = Model::new(trained.architecture, trained.params, fp).map_err(|e| train(&e))?;
        let (metrics, hmax, hmean) = match victim {
            Some((v, ar)) => {
                let m = measure(&model, v, ar, Some(data), cfg.seed, 0).map_err(|e| train(&e))?;
                let (hmax, hmean) = logit_errors(&model, v, ar, &heldout)?;
                (Some(m), Some(hmax), Some(hmean))
            }
            None => (None, None, None),
        };
        let c = Completion {
            method: name.into(),
            fixed_rows: fixed.len(),
            queries,
            final_loss: trained.record.final_loss,
            steps: trained.steps,
            seconds,
            metrics,
            heldout_max_logit_error: hmax,
            heldout_mean_logit_error: hmean,
        };
        if is_hybrid {
            report.hybrid = Some(c);
            out.model = Some(model);
        } else {
            report.learning_only = Some(c);
            out.learning_only = Some(model);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    out.report = report;
    Ok(out)
}

/// The completion from a loaded first-layer `file`: its rows' signs decided again
/// ([`resign`], noise scale of the file's settings, RNG seeded from `cfg.seed`), then
/// [`complete`] with the signs used, the file's and the sign step's queries counted in
/// the hybrid's total. Returns the completion (its report's `signs` filled) and the file
/// of the rows and signs it used.
#[allow(clippy::too_many_arguments)]
pub fn complete_loaded(
    oracle: &mut dyn Oracle,
    file: &FirstLayerFile,
    data: &AttackData,
    cfg: &HybridConfig,
    victim: Option<(&Model, Arithmetic)>,
    show_progress: bool,
) -> Result<(Hybrid, FirstLayerFile), HybridError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5369_676e);
    let (rows, refresh) = resign(oracle, &file.rows, file.config.noise, &mut rng)?;
    let used = file.resigned(rows, &refresh);
    let widths = used
        .dims
        .get(1..used.dims.len().saturating_sub(1))
        .map(<[usize]>::to_vec)
        .unwrap_or_default();
    let mut h = complete(
        oracle,
        &widths,
        &used.rows,
        used.queries,
        data,
        cfg,
        victim,
        show_progress,
    )?;
    h.report.signs = Some(refresh);
    Ok((h, used))
}

/// Max and mean |logit error| of `stolen` against the victim on `xs` (not queries).
fn logit_errors(
    stolen: &Model,
    victim: &Model,
    arithmetic: Arithmetic,
    xs: &[Vec<f32>],
) -> Result<(f64, f64), HybridError> {
    let e = |e: anyhow::Error| HybridError::Train(e.to_string());
    let truth = reference::logits(victim, arithmetic, xs).map_err(e)?;
    let got = reference::logits(stolen, Arithmetic::F32, xs).map_err(e)?;
    let (mut max, mut sum, mut n) = (0.0f64, 0.0f64, 0usize);
    for (a, b) in truth.iter().zip(&got) {
        for (x, y) in a.iter().zip(b) {
            max = max.max((x - y).abs());
            sum += (x - y).abs();
            n += 1;
        }
    }
    Ok((max, sum / n.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::super::tests::random_deep_model;
    use super::*;
    use crate::attack::oracle::{LocalFixedOracle, Policy};
    use fusion_common::nn::mnist::{self, Split};

    /// The victim's first-layer rows as unit normals: the first `signed` with their true
    /// orientation (sign decided), the next `unsigned` flipped and undecided, the rest
    /// missing.
    fn exact_rows(model: &Model, signed: usize, unsigned: usize) -> Vec<SavedRow> {
        let layers = reference::dense_layers(model, Arithmetic::Fixed);
        let (w1, b1) = &layers[0];
        (0..signed + unsigned)
            .map(|i| {
                let n = w1.row(i).dot(&w1.row(i)).sqrt();
                let (s, sign) = if i < signed { (1.0, 1.0) } else { (-1.0, 0.0) };
                SavedRow {
                    w: w1.row(i).iter().map(|v| s * v / n).collect(),
                    b: s * b1[i] / n,
                    sign,
                    points: 0,
                    refined: true,
                }
            })
            .collect()
    }

    fn data(model: &Model) -> AttackData {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let test = mnist::load(root.join("data/mnist"), Split::Test).unwrap();
        // Test images 0..1000 stand in for the attacker's unlabelled training images.
        let train = test.slice(0..1000).unwrap();
        AttackData::from_sets(&test, Some(train), model, Arithmetic::Fixed).unwrap()
    }

    /// A 784-16-8-10 victim with 12 of its 16 first-layer rows given exactly with their
    /// signs (2 more given unsigned, 2 missing): the hybrid, trained on the logits of 1000
    /// images and 3000 random points, keeps the 12 rows bit for bit (at norm ROW_NORM) and
    /// reaches the stated agreement and logit error; the control is trained on the same
    /// rows and counted without the first layer's queries.
    #[test]
    fn hybrid_keeps_the_given_rows_and_fits_the_rest() {
        let victim = random_deep_model(784, 16, 8, 10, 5);
        let data = data(&victim);
        let rows = exact_rows(&victim, 12, 2);
        let mut oracle = LocalFixedOracle::new(victim.clone(), Policy::undefended());
        let cfg = HybridConfig {
            learn_queries: 1000,
            random_queries: 3000,
            epochs: 60,
            lr: 1e-2,
            ..HybridConfig::default()
        };
        let h = complete(
            &mut oracle,
            &[16, 8],
            &rows,
            777,
            &data,
            &cfg,
            Some((&victim, Arithmetic::Fixed)),
            false,
        )
        .unwrap();
        assert_eq!(oracle.queries(), 4000);
        let r = &h.report;
        for c in [&r.hybrid, &r.learning_only].into_iter().flatten() {
            let m = c.metrics.as_ref().unwrap();
            eprintln!(
                "{}: loss {} agreement {:?} random {:.4} max {:.3} mean {:.4} heldout {:?}/{:?}",
                c.method,
                c.final_loss,
                m.mnist_agreement,
                m.random_agreement,
                m.max_logit_error,
                m.mean_logit_error,
                c.heldout_max_logit_error,
                c.heldout_mean_logit_error
            );
        }
        assert_eq!(
            (r.rows_recovered, r.rows_fixed, r.learn_queries),
            (14, 12, 4000)
        );
        let (hy, lo) = (
            r.hybrid.as_ref().unwrap(),
            r.learning_only.as_ref().unwrap(),
        );
        assert_eq!((hy.queries, lo.queries), (4777, 4000));
        assert_eq!((hy.fixed_rows, lo.fixed_rows), (12, 0));
        // The fixed rows, bit for bit.
        let model = h.model.as_ref().unwrap();
        let (w1, b1) = model.dense(0).unwrap();
        for f in fixed_rows(&rows) {
            assert_eq!(w1.row(f.row).to_vec(), f.w, "row {}", f.row);
            assert_eq!(b1[f.row], f.b);
        }
        let m = hy.metrics.as_ref().unwrap();
        // Measured (seeded): agreement 88.9% on held-out MNIST, 69% on random inputs,
        // mean logit error 0.60 (random) and 0.50 (held-out); the bounds leave a margin.
        assert!(m.mnist_agreement.unwrap() > 0.8, "{:?}", m.mnist_agreement);
        assert!(m.random_agreement > 0.5, "{}", m.random_agreement);
        assert!(m.mean_logit_error < 1.0, "{}", m.mean_logit_error);
        assert!(hy.heldout_mean_logit_error.unwrap() < 0.8);
        assert!(hy.final_loss.is_finite() && lo.final_loss.is_finite());
    }

    /// A saved first layer of the 784-16-8-10 victim with 14 of 16 rows whose signs are
    /// partly missing and partly wrong: rows 0-3 unsigned (true orientation), 4-7 signed
    /// the wrong way (-1, normal flipped), 8-11 signed right (+1), 12-13 unsigned and
    /// flipped. The completion from it runs the chain's sign step on all 14 rows, counts
    /// its queries, and fixes the rows with the victim's orientation; the file of the
    /// signs used reads back with them.
    #[test]
    fn a_loaded_first_layer_gets_its_signs_decided_again() {
        let victim = random_deep_model(784, 16, 8, 10, 5);
        let data = data(&victim);
        let truth = exact_rows(&victim, 16, 0);
        let mut rows = exact_rows(&victim, 12, 2);
        for r in &mut rows[..4] {
            r.sign = 0.0;
        }
        for r in &mut rows[4..8] {
            r.w.iter_mut().for_each(|v| *v = -*v);
            r.b = -r.b;
            r.sign = -1.0;
        }
        let plain: Vec<Row> = rows.iter().map(SavedRow::row).collect();
        let signs: Vec<f64> = rows.iter().map(|r| r.sign).collect();
        let file = FirstLayerFile::new(
            &victim,
            &CarliniConfig::default(),
            1_000,
            &plain,
            &signs,
            None,
            None,
        );
        let mut oracle = LocalFixedOracle::new(victim.clone(), Policy::undefended());
        let cfg = HybridConfig {
            learn_queries: 200,
            epochs: 1,
            ..HybridConfig::default()
        };
        let (h, used) = complete_loaded(&mut oracle, &file, &data, &cfg, None, false).unwrap();
        let s = h.report.signs.as_ref().unwrap();
        eprintln!("{s:?}");
        assert_eq!((s.rows, s.file_signed), (14, 8));
        // the wiggle decides every row of this net (measured: 14 of 14)
        assert_eq!(s.fresh_decided, 14);
        assert_eq!((s.disagree, s.kept_from_file, s.signed), (4, 0, 14));
        assert_eq!(s.report.as_ref().map(|r| r.decided), Some(14));
        assert!(s.queries > 0 && s.stopped.is_none());
        // every row now has the victim's orientation
        for (i, (u, t)) in used.rows.iter().zip(&truth).enumerate() {
            let c: f64 = u.w.iter().zip(&t.w).map(|(a, b)| a * b).sum();
            assert!(
                u.sign != 0.0 && c > 0.99,
                "row {i}: sign {} cos {c}",
                u.sign
            );
            assert!((u.b - t.b).abs() < 1e-12, "row {i}");
        }
        // the sign step's rows counted like any other: in the oracle, the hybrid's total,
        // the file of the signs used; not in the control's
        let r = &h.report;
        assert_eq!(oracle.queries(), s.queries + 200);
        assert_eq!(r.first_layer_queries, 1_000 + s.queries);
        assert_eq!(r.hybrid.as_ref().unwrap().queries, 1_000 + s.queries + 200);
        assert_eq!(r.learning_only.as_ref().unwrap().queries, 200);
        assert_eq!(r.rows_fixed, 14);
        assert_eq!(used.queries, 1_000 + s.queries);
        // the report's record of the loaded run: the file's rows and the step's, apart
        // and together (as the hybrid counts them)
        let run = file.run_summary(Path::new("f.json"), Some(s));
        assert_eq!(run["queries"], 1_000);
        assert_eq!(run["sign_step_queries"], s.queries);
        assert_eq!(run["queries_with_sign_step"], r.first_layer_queries);
        let (_dir, p) = temp_file("used.json");
        used.save(&p).unwrap();
        let back = FirstLayerFile::load(&p, &victim).unwrap();
        assert!(back.rows.iter().all(|r| r.sign != 0.0));
        assert_eq!(back.resigned.as_ref(), Some(s));
        assert_eq!(back.queries, used.queries);
    }

    /// Where the step decides no sign, the file's stands; where neither does, the row
    /// stays unsigned; a decided sign is applied to the search's orientation.
    #[test]
    fn merged_signs_keep_the_files_where_the_step_decides_none() {
        let row = |w: f64, sign: f64| SavedRow {
            w: vec![w, 0.0],
            b: w,
            sign,
            points: 1,
            refined: false,
        };
        // saved: oriented by the file's sign; the search's orientation is +1 in each
        let rows = [row(1.0, 0.0), row(-1.0, -1.0), row(1.0, 1.0), row(1.0, 0.0)];
        let fresh = [-1.0, 0.0, -1.0, 0.0];
        let mut refresh = SignRefresh {
            rows: 0,
            file_signed: 0,
            fresh_decided: 0,
            disagree: 0,
            kept_from_file: 0,
            signed: 0,
            queries: 0,
            seconds: 0.0,
            report: None,
            stopped: None,
        };
        let out = merge_signs(&rows, &fresh, &mut refresh);
        let got: Vec<(f64, f64, f64)> = out.iter().map(|r| (r.w[0], r.b, r.sign)).collect();
        assert_eq!(
            got,
            [
                (-1.0, -1.0, -1.0),
                (-1.0, -1.0, -1.0),
                (-1.0, -1.0, -1.0),
                (1.0, 1.0, 0.0)
            ]
        );
        assert_eq!(
            (
                refresh.rows,
                refresh.file_signed,
                refresh.fresh_decided,
                refresh.disagree,
                refresh.kept_from_file,
                refresh.signed
            ),
            (4, 2, 2, 1, 1, 3)
        );
    }

    /// The first-layer figures against a deep victim, with the kink census's last
    /// bucket unbounded above, read back through serde_json as they were written (the
    /// bound was an infinite f64 written as `null`, which did not read back).
    #[test]
    fn first_layer_report_round_trips_with_its_unbounded_bucket() {
        let victim = random_deep_model(784, 16, 8, 10, 5);
        let rows: Vec<Row> = exact_rows(&victim, 12, 0)
            .iter()
            .map(SavedRow::row)
            .collect();
        let data = data(&victim);
        let images: Vec<Vec<f64>> = (0..50)
            .map(|i| data.eval_x.row(i).iter().map(|&v| f64::from(v)).collect())
            .collect();
        let m = super::super::deep::measure(&rows, &victim, Arithmetic::Fixed, &images).unwrap();
        let last = m.kink_buckets.last().unwrap();
        assert_eq!((last.lo, last.hi), (8.0, None));
        assert_eq!(m.kink_buckets.iter().filter(|b| b.hi.is_none()).count(), 1);
        assert_eq!(m.matched, 12);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"hi\":null"), "{json}");
        let back: super::super::deep::FirstLayerMetrics = serde_json::from_str(&json).unwrap();
        assert_eq!(back.kink_buckets, m.kink_buckets);
        assert_eq!(back.matched, m.matched);
        // the whole report, inside a saved file, and the file itself
        let committed: FirstLayerFile = serde_json::from_slice(
            &std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("src/attack/results/first-layer-dnn-seed1-9m.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let mut report = committed.first_layer.clone().unwrap();
        report.metrics = Some(m);
        let f = FirstLayerFile::new(
            &victim,
            &CarliniConfig::default(),
            5,
            &rows,
            &[1.0; 12],
            Some(report),
            None,
        );
        let (_dir, p) = temp_file("fl.json");
        f.save(&p).unwrap();
        let g = FirstLayerFile::load(&p, &victim).unwrap();
        // serde_json reads floats to within an ulp (no float_roundtrip feature)
        let (mut a, mut b) = (g.first_layer.unwrap(), f.first_layer.unwrap());
        let (ma, mb) = (a.metrics.take().unwrap(), b.metrics.take().unwrap());
        assert_eq!(a, b);
        assert_eq!(ma.kink_buckets, mb.kink_buckets);
        assert!(ma.kink_buckets[5].hi.is_none());
        assert!((ma.row_rel_error_mean - mb.row_rel_error_mean).abs() <= 1e-25);
        assert_eq!((ma.matched, ma.within_1e3), (mb.matched, mb.within_1e3));
    }

    /// The committed first-layer file of the 9M-row bundled run (written when the bound
    /// was an infinite f64, as `null`) still loads, its report typed.
    #[test]
    fn the_committed_first_layer_file_loads_with_its_report() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let model = Model::load(root.join("models/mnist-dnn.safetensors")).unwrap();
        let f = FirstLayerFile::load(
            &root.join("client/src/attack/results/first-layer-dnn-seed1-9m.json"),
            &model,
        )
        .unwrap();
        assert_eq!(f.rows.len(), 81);
        assert_eq!(f.rows.iter().filter(|r| r.sign != 0.0).count(), 75);
        let fl = f.first_layer.as_ref().unwrap();
        assert_eq!((fl.recovered, fl.width), (81, 128));
        let m = fl.metrics.as_ref().unwrap();
        let b: Vec<(f64, Option<f64>, usize, usize)> = m
            .kink_buckets
            .iter()
            .map(|b| (b.lo, b.hi, b.neurons, b.found))
            .collect();
        assert_eq!(b.last(), Some(&(8.0, None, 6, 6)));
        assert_eq!(b.first(), Some(&(0.0, Some(1.0), 9, 0)));
        assert_eq!(f.resigned, None);
    }

    fn temp_file(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        (dir, p)
    }

    #[test]
    fn first_layer_file_round_trip() {
        let victim = random_deep_model(784, 16, 8, 10, 5);
        let rows = exact_rows(&victim, 12, 2);
        let plain: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                points: 3,
                ..r.row()
            })
            .collect();
        let signs: Vec<f64> = rows.iter().map(|r| r.sign).collect();
        let f = FirstLayerFile::new(
            &victim,
            &CarliniConfig::default(),
            123_456,
            &plain,
            &signs,
            None,
            None,
        );
        assert_eq!(f.dims, [784, 16, 8, 10]);
        let (_dir, p) = temp_file("fl.json");
        f.save(&p).unwrap();
        let g = FirstLayerFile::load(&p, &victim).unwrap();
        // serde_json reads floats to within an ulp (no float_roundtrip feature).
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-15);
        assert!(g.rows.iter().zip(&f.rows).all(|(a, b)| close(&a.w, &b.w)
            && close(&[a.b], &[b.b])
            && (a.sign, a.points, a.refined) == (b.sign, b.points, b.refined)));
        assert_eq!(g.rows.len(), f.rows.len());
        assert_eq!(
            (g.model_digest, &g.dims, &g.config),
            (f.model_digest, &f.dims, &f.config)
        );
        assert_eq!(g.queries, 123_456);
        assert_eq!(g.rows.iter().filter(|r| r.sign != 0.0).count(), 12);
    }

    /// A file made against one model is refused for another (same shape, other weights;
    /// other shape), and a malformed one is refused by name.
    #[test]
    fn first_layer_file_of_another_model_is_refused() {
        let victim = random_deep_model(784, 16, 8, 10, 5);
        let rows = exact_rows(&victim, 4, 0);
        let plain: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                points: 3,
                ..r.row()
            })
            .collect();
        let f = FirstLayerFile::new(
            &victim,
            &CarliniConfig::default(),
            9,
            &plain,
            &[1.0; 4],
            None,
            None,
        );
        let (_dir, p) = temp_file("fl.json");
        f.save(&p).unwrap();
        let same_shape = random_deep_model(784, 16, 8, 10, 6);
        assert!(matches!(
            FirstLayerFile::load(&p, &same_shape),
            Err(HybridError::ModelMismatch { .. })
        ));
        let other_shape = random_deep_model(784, 16, 16, 10, 5);
        let e = FirstLayerFile::load(&p, &other_shape).unwrap_err();
        assert!(matches!(e, HybridError::ModelMismatch { .. }));
        assert!(e.to_string().contains("refused"), "{e}");
        let mut bad = f.clone();
        bad.rows[0].w.pop();
        assert!(matches!(bad.check(&victim), Err(HybridError::Rows(_))));
        let mut bad = f.clone();
        bad.format = "something else".into();
        assert!(matches!(
            bad.check(&victim),
            Err(HybridError::Format { .. })
        ));
        std::fs::write(&p, b"{ not json").unwrap();
        assert!(matches!(
            FirstLayerFile::load(&p, &victim),
            Err(HybridError::Json { .. })
        ));
    }
}
