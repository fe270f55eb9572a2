//! Papernot, McDaniel, Goodfellow, Jha, Celik, Swami, "Practical Black-Box Attacks against
//! Machine Learning" (AsiaCCS 2017, arXiv 1602.02697): substitute training with
//! Jacobian-based dataset augmentation, on labels only.
//!
//! ```text
//! S_0 = 150 seed images (attacker's own, see data.rs)
//! for rho in 0..rounds:
//!     label the new rows of S_rho with the oracle            (queries)
//!     train the substitute F on S_rho (continuing from the previous round's weights)
//!     if rho < rounds - 1:
//!         S_{rho+1} = S_rho  u  { clip(x + lambda_rho sgn(dF_{O(x)}/dx (x)), 0, 1) : x in S_rho }
//! ```
//! (Alg. 1 and §4.2 of the paper.) The periodic step size (§6, "periodic step size") is
//! lambda_rho = lambda (-1)^(floor(rho / tau) + 1) with tau = 3, the sign convention of the
//! reference implementation (the cleverhans MNIST black-box tutorial: -lambda for rounds 0-2,
//! +lambda after). Defaults as there: 6 rounds, lambda 0.1, substitute 784-200-200-10, Adam
//! 1e-3 (constant rate), 10 epochs a round, mini-batch 128; 150 seeds, so 4,800 labelled rows
//! in all (150 2^5).
//!
//! The baseline labels N real (unlabelled) images and trains the same architecture from
//! scratch with the same optimiser, at N = 150 2^k to compare with the rounds.

use super::data::{AttackData, score, to_array};
use super::oracle::{Oracle, OracleError, query_labels};
use super::progress;
use fusion_common::fixed::FixedPoint;
use fusion_common::nn::mnist::{CLASSES, PIXELS};
use fusion_common::nn::train::{Schedule, TrainConfig, train_from};
use fusion_common::nn::{Model, Tensor};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Settings of the substitute attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PapernotConfig {
    /// seed images (attacker's real data)
    pub seeds: usize,
    /// substitution rounds
    pub rounds: usize,
    /// Jacobian augmentation step
    pub lambda: f32,
    /// period of the step's sign
    pub tau: usize,
    /// substitute hidden layers
    pub hidden: Vec<usize>,
    /// Adam learning rate
    pub lr: f32,
    /// epochs per round
    pub epochs: usize,
    /// mini-batch
    pub batch: usize,
    /// seed of the image choice and of training
    pub seed: u64,
}

impl Default for PapernotConfig {
    fn default() -> Self {
        Self {
            seeds: 150,
            rounds: 6,
            lambda: 0.1,
            tau: 3,
            hidden: vec![200, 200],
            lr: 1e-3,
            epochs: 10,
            batch: 128,
            seed: 1,
        }
    }
}

/// One point of an attack's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// round (0-based) or step index
    pub round: usize,
    /// rows charged by the oracle so far
    pub queries: u64,
    /// labelled rows the substitute was trained on
    pub training_rows: usize,
    /// the substitute's accuracy on the held-out images (true labels)
    pub test_accuracy: f64,
    /// the substitute's top-1 agreement with the victim on the held-out images
    pub agreement: f64,
    /// seconds since the attack started
    pub seconds: f64,
}

/// The outcome of a substitute attack (Papernot or the baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubstituteReport {
    /// `"papernot"` or `"baseline"`
    pub method: String,
    /// the settings
    pub config: PapernotConfig,
    /// per round (or per N for the baseline)
    pub rounds: Vec<Round>,
    /// why the attack stopped early, if it did (e.g. the budget)
    pub stopped: Option<String>,
    /// rows charged in all
    pub queries: u64,
}

impl SubstituteReport {
    /// The last round's figures, if any round completed.
    pub fn last(&self) -> Option<&Round> {
        self.rounds.last()
    }
}

/// Errors of the substitute attacks other than the oracle's refusals (which end the
/// attack with a report).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubstituteError {
    /// The oracle failed for another reason than the budget.
    #[error(transparent)]
    Oracle(#[from] OracleError),
    /// Training the substitute failed.
    #[error("substitute training: {0}")]
    Train(String),
    /// The oracle's shape is not MNIST's.
    #[error("the substitute attack expects 784 inputs and 10 classes, the oracle has {0} and {1}")]
    Shape(usize, usize),
}

/// The substitute being trained, with its parameters.
struct Substitute {
    config: TrainConfig,
    params: Option<Vec<Vec<Tensor>>>,
    model: Option<Model>,
}

impl Substitute {
    fn new(cfg: &PapernotConfig) -> Self {
        Self {
            config: TrainConfig {
                hidden: cfg.hidden.clone(),
                epochs: cfg.epochs,
                batch: cfg.batch,
                lr: cfg.lr,
                schedule: Schedule::Constant,
                seed: cfg.seed,
                shift: 0,
                weight_decay: 0.0,
                max_steps: None,
                progress: false,
            },
            params: None,
            model: None,
        }
    }

    /// Trains on `xs` with labels `ys`, continuing from the current weights if `warm`.
    fn train(
        &mut self,
        xs: &[Vec<f32>],
        ys: &[usize],
        warm: bool,
        round: usize,
    ) -> Result<(), SubstituteError> {
        let x = to_array(xs);
        let y: Vec<u8> = ys.iter().map(|&l| l as u8).collect();
        let config = TrainConfig {
            seed: self.config.seed.wrapping_add(round as u64),
            ..self.config.clone()
        };
        let init = if warm { self.params.as_deref() } else { None };
        let t = train_from(&config, &[PIXELS], CLASSES, x.view(), &y, init)
            .map_err(|e| SubstituteError::Train(e.to_string()))?;
        // The substitute is the attacker's own f32 model; the fixed-point parameters only
        // satisfy `Model::new` (a wide ring so that any weight encodes).
        let fp = FixedPoint::new(62, 12).map_err(|e| SubstituteError::Train(e.to_string()))?;
        let model = Model::new(t.architecture, t.params.clone(), fp)
            .map_err(|e| SubstituteError::Train(e.to_string()))?;
        self.params = Some(t.params);
        self.model = Some(model);
        Ok(())
    }

    fn labels(&self, data: &AttackData) -> Vec<usize> {
        self.model
            .as_ref()
            .and_then(|m| m.predict_f32(data.eval_x.view()).ok())
            .unwrap_or_default()
    }

    /// x + lambda sgn(grad of the logit of label y at x), clipped to [0, 1].
    fn augment(&self, xs: &[Vec<f32>], ys: &[usize], lambda: f32) -> Vec<Vec<f32>> {
        let Some(model) = &self.model else {
            return Vec::new();
        };
        let x = to_array(xs);
        let Ok(g) = model.logit_input_gradients(x.view(), ys) else {
            return Vec::new();
        };
        xs.iter()
            .zip(g.rows())
            .map(|(row, grad)| {
                row.iter()
                    .zip(grad.iter())
                    .map(|(&v, &d)| {
                        let s = if d > 0.0 {
                            1.0
                        } else if d < 0.0 {
                            -1.0
                        } else {
                            0.0
                        };
                        (v + lambda * s).clamp(0.0, 1.0)
                    })
                    .collect()
            })
            .collect()
    }
}

fn check_shape(oracle: &dyn Oracle) -> Result<(), SubstituteError> {
    if oracle.input_len() != PIXELS || oracle.classes() != CLASSES {
        return Err(SubstituteError::Shape(oracle.input_len(), oracle.classes()));
    }
    Ok(())
}

/// Labels `xs`; on a budget refusal keeps the labelled prefix and returns the reason.
fn label(
    oracle: &mut dyn Oracle,
    xs: &[Vec<f32>],
) -> Result<(Vec<usize>, Option<String>), SubstituteError> {
    let p = query_labels(oracle, xs);
    match p.error {
        None => Ok((p.results, None)),
        Some(e @ OracleError::BudgetExhausted { .. }) => Ok((p.results, Some(e.to_string()))),
        Some(e) => Err(e.into()),
    }
}

/// Runs the Papernot et al. substitute attack against `oracle` (labels only).
pub fn papernot(
    oracle: &mut dyn Oracle,
    data: &AttackData,
    cfg: &PapernotConfig,
    show_progress: bool,
) -> Result<SubstituteReport, SubstituteError> {
    check_shape(oracle)?;
    let start = Instant::now();
    let bar = progress::bar(show_progress, cfg.rounds as u64, "papernot rounds");
    let mut sub = Substitute::new(cfg);
    let mut xs = data.seeds(cfg.seeds, cfg.seed);
    let mut ys: Vec<usize> = Vec::new();
    let mut rounds = Vec::new();
    let mut stopped = None;
    for rho in 0..cfg.rounds {
        bar.set_message(format!(
            "round {rho}: labelling {} rows",
            xs.len() - ys.len()
        ));
        // Label the rows added since the last round.
        let (new, why) = label(oracle, &xs[ys.len()..])?;
        ys.extend(new);
        xs.truncate(ys.len());
        if ys.is_empty() {
            stopped = why;
            break;
        }
        bar.set_message(format!("round {rho}: training on {} rows", ys.len()));
        sub.train(&xs, &ys, rho > 0, rho)?;
        let (acc, agree) = score(data, &sub.labels(data));
        rounds.push(Round {
            round: rho,
            queries: oracle.queries(),
            training_rows: ys.len(),
            test_accuracy: acc,
            agreement: agree,
            seconds: start.elapsed().as_secs_f64(),
        });
        bar.inc(1);
        if let Some(why) = why {
            stopped = Some(format!("round {rho}: {why}"));
            break;
        }
        if rho + 1 < cfg.rounds {
            // Periodic step size, tau as in the paper; sign as in the reference code.
            let sign = if (rho / cfg.tau.max(1)).is_multiple_of(2) {
                -1.0
            } else {
                1.0
            };
            let new = sub.augment(&xs, &ys, sign * cfg.lambda);
            xs.extend(new);
        }
    }
    bar.finish_and_clear();
    Ok(SubstituteReport {
        method: "papernot".into(),
        config: cfg.clone(),
        rounds,
        stopped,
        queries: oracle.queries(),
    })
}

/// The baseline: labels `sizes` real images (cumulatively: the first N of one seeded
/// random order) and trains a fresh substitute of the same architecture on each prefix.
pub fn baseline(
    oracle: &mut dyn Oracle,
    data: &AttackData,
    cfg: &PapernotConfig,
    sizes: &[usize],
    show_progress: bool,
) -> Result<SubstituteReport, SubstituteError> {
    check_shape(oracle)?;
    let start = Instant::now();
    let max = sizes.iter().copied().max().unwrap_or(0);
    let images = data
        .real_images(max, cfg.seed)
        .map_err(|e| SubstituteError::Train(e.to_string()))?;
    let bar = progress::bar(show_progress, sizes.len() as u64, "baseline sizes");
    let mut ys: Vec<usize> = Vec::new();
    let mut rounds = Vec::new();
    let mut stopped = None;
    for (k, &n) in sizes.iter().enumerate() {
        let want = n.min(images.len());
        if want > ys.len() {
            bar.set_message(format!("N = {n}: labelling"));
            let (new, why) = label(oracle, &images[ys.len()..want])?;
            ys.extend(new);
            if why.is_some() {
                stopped = why.map(|w| format!("N = {n}: {w}"));
            }
        }
        if ys.is_empty() {
            break;
        }
        bar.set_message(format!("N = {}: training", ys.len()));
        let mut sub = Substitute::new(cfg);
        sub.train(&images[..ys.len()], &ys, false, 0)?;
        let (acc, agree) = score(data, &sub.labels(data));
        rounds.push(Round {
            round: k,
            queries: oracle.queries(),
            training_rows: ys.len(),
            test_accuracy: acc,
            agreement: agree,
            seconds: start.elapsed().as_secs_f64(),
        });
        bar.inc(1);
        if stopped.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(SubstituteReport {
        method: "baseline".into(),
        config: cfg.clone(),
        rounds,
        stopped,
        queries: oracle.queries(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::data::Arithmetic;
    use crate::attack::oracle::{LocalFixedOracle, OutputMode, Policy};
    use fusion_common::nn::mnist::{self, Split};

    fn setup() -> (Model, AttackData) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let model = Model::load(root.join("models/mnist-784-32-10.safetensors")).unwrap();
        let test = mnist::load(root.join("data/mnist"), Split::Test).unwrap();
        // A small training subset stands in for the attacker's unlabelled real images.
        let train = test.slice(0..1000).unwrap();
        let data = AttackData::from_sets(&test, Some(train), &model, Arithmetic::Fixed).unwrap();
        (model, data)
    }

    fn small() -> PapernotConfig {
        PapernotConfig {
            rounds: 3,
            hidden: vec![64],
            epochs: 5,
            ..PapernotConfig::default()
        }
    }

    /// On a small budget (150 seeds, 3 rounds: 600 labelled rows) the substitute agrees
    /// with the victim far above chance (10%), through a labels-only oracle.
    #[test]
    fn papernot_beats_chance_on_a_small_budget() {
        let (model, data) = setup();
        let mut oracle = LocalFixedOracle::new(model, Policy::defended(1000));
        assert_eq!(oracle.mode(), OutputMode::Labels);
        let r = papernot(&mut oracle, &data, &small(), false).unwrap();
        assert_eq!(r.rounds.len(), 3);
        assert_eq!(r.queries, 600);
        assert_eq!(oracle.queries(), 600);
        let q: Vec<u64> = r.rounds.iter().map(|x| x.queries).collect();
        assert_eq!(q, [150, 300, 600]);
        let last = r.last().unwrap();
        assert!(last.agreement > 0.5, "agreement {}", last.agreement);
        assert!(last.test_accuracy > 0.5, "accuracy {}", last.test_accuracy);
        assert!(r.stopped.is_none());
    }

    /// A budget smaller than the attack needs: the round that overflows labels what the
    /// budget still covers, trains on it, and the report says why it stopped.
    #[test]
    fn papernot_stops_at_the_budget_with_a_report() {
        let (model, data) = setup();
        let mut oracle = LocalFixedOracle::new(model, Policy::defended(400));
        let r = papernot(&mut oracle, &data, &small(), false).unwrap();
        assert_eq!(oracle.queries(), 400);
        assert_eq!(r.rounds.len(), 3);
        assert_eq!(r.rounds[2].training_rows, 400);
        let why = r.stopped.as_deref().unwrap();
        assert!(why.contains("budget exhausted"), "{why}");
    }

    #[test]
    fn baseline_labels_real_images() {
        let (model, data) = setup();
        let mut oracle = LocalFixedOracle::new(model, Policy::defended(10_000));
        let r = baseline(&mut oracle, &data, &small(), &[100, 400], false).unwrap();
        assert_eq!(oracle.queries(), 400);
        assert_eq!(r.rounds.len(), 2);
        assert!(r.rounds[1].agreement > 0.6, "{}", r.rounds[1].agreement);
    }
}
