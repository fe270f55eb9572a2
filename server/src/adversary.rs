//! Cheating servers, for evaluating Fusion (cargo feature `adversary`, off by default and
//! never part of the product build).
//!
//! Every strategy runs the real `cheetah` protocol and deviates *inside* it, through the
//! server's own data: its additive shares ([`ServerHook`], seen after every linear layer,
//! non-linear layer and before the output) or the weights it computes with
//! (`serve_batch` takes the model per batch). Nothing travels on a side channel.
//!
//! ```text
//!  client                         server (adversary)
//!  setup (announced model)  <-->  setup with the announced model (digest checked)
//!  batch header             -->   admit, charge
//!  HE query                 -->   W' X + b' - R          (wrong-model: W' != W)
//!  ReLU/trunc               <->   shares z_s             (deviate-relu: z_s + 8.0)
//!  argmax                   <->   output shares o_s      (flip-*, constant: o_s[c] + 2^(l-4);
//!                                                         replay: o_s of an earlier batch)
//! ```
//!
//! Strategies (`--adversary STRATEGY`):
//! - `wrong-model`: computes with a weaker model of the announced architecture: the model
//!   file given by `--adversary-model`, or else (train-free) the announced model with all
//!   but the first 1/16 of the first hidden layer's units switched off (weights and bias
//!   zero);
//! - `flip-one`, `flip-rows:K`: K rows chosen uniformly at random get +2^(l-4) on the
//!   server's share of the logit of one class c, so their label becomes c (unchanged on a
//!   row whose label already was c); one c per batch, so altered copies of an input stay
//!   consistent;
//! - `constant`: the same on every row (every label becomes c);
//! - `replay`: the server's output shares are those of the previous batch it served (any
//!   session; cycled to the batch's length); the first batch is served honestly since
//!   there is nothing to replay;
//! - `deviate-relu`: the first ReLU layer's output shares get +8.0 (8 * 2^f) on every
//!   value: a corrupted ReLU step, max(0, x) + 8.
//!
//! The class c is drawn uniformly per batch, or fixed by a suffix `@c` (e.g.
//! `flip-rows:2@7`), which tests use to make every flip effective.

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use fusion_common::backend::{
    Cheetah, CheetahConfig, HookOp, HookPoint, SecureInference, ServerHook,
};
use fusion_common::channel::Channel;
use fusion_common::net::session::SessionStart;
use fusion_common::nn::{LayerSpec, Model, ModelError, Tensor};
use fusion_common::ring::Ring;
use rand::rngs::StdRng;
use rand::seq::index;
use rand::{Rng, SeedableRng};

use crate::backends::{announced_model, check_model_start, serve_cheetah};
use crate::runner::{ECHO, Refusal, Registry, RunnerError, SessionRunner, StartInfo, echo};
use crate::state::ServerState;

/// What a cheating server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// computes with a weaker model than the announced one
    WrongModel,
    /// alters one random row's label
    FlipOne,
    /// alters K random rows' labels
    FlipRows(usize),
    /// the same label on every row
    Constant,
    /// returns the previous batch's output shares
    Replay,
    /// corrupts the first ReLU layer
    DeviateRelu,
}

impl Strategy {
    /// Every strategy, with K = 2 for `flip-rows`.
    pub const ALL: [Strategy; 6] = [
        Strategy::WrongModel,
        Strategy::FlipOne,
        Strategy::FlipRows(2),
        Strategy::Constant,
        Strategy::Replay,
        Strategy::DeviateRelu,
    ];

    /// Rows altered at the output, if the strategy alters a fixed number of rows.
    pub fn rows_altered(self) -> Option<usize> {
        match self {
            Strategy::FlipOne => Some(1),
            Strategy::FlipRows(k) => Some(k),
            _ => None,
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::WrongModel => f.write_str("wrong-model"),
            Strategy::FlipOne => f.write_str("flip-one"),
            Strategy::FlipRows(k) => write!(f, "flip-rows:{k}"),
            Strategy::Constant => f.write_str("constant"),
            Strategy::Replay => f.write_str("replay"),
            Strategy::DeviateRelu => f.write_str("deviate-relu"),
        }
    }
}

/// A strategy and, optionally, the class its flips aim at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdversarySpec {
    /// the strategy
    pub strategy: Strategy,
    /// the class flips set (`None`: uniform per batch)
    pub class: Option<usize>,
}

impl std::fmt::Display for AdversarySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.strategy)?;
        if let Some(c) = self.class {
            write!(f, "@{c}")?;
        }
        Ok(())
    }
}

/// A strategy name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdversaryError {
    /// Not a strategy.
    #[error(
        "unknown adversary {0:?} (wrong-model, flip-one, flip-rows:K, constant, replay, deviate-relu; optional @CLASS)"
    )]
    Unknown(String),
    /// A bad K or class.
    #[error("adversary {spec:?}: {reason}")]
    BadParameter {
        /// as given
        spec: String,
        /// why
        reason: String,
    },
    /// The weaker model cannot stand in for the announced one.
    #[error("the adversary's model: {0}")]
    Model(String),
    /// The server has no model to deviate from.
    #[error("an adversary needs a served model")]
    NoModel,
}

impl FromStr for AdversarySpec {
    type Err = AdversaryError;
    fn from_str(s: &str) -> Result<Self, AdversaryError> {
        let bad = |reason: String| AdversaryError::BadParameter {
            spec: s.to_owned(),
            reason,
        };
        let (name, class) = match s.split_once('@') {
            Some((n, c)) => (
                n,
                Some(c.parse::<usize>().map_err(|e| bad(format!("class: {e}")))?),
            ),
            None => (s, None),
        };
        let strategy = match name {
            "wrong-model" => Strategy::WrongModel,
            "flip-one" => Strategy::FlipOne,
            "constant" => Strategy::Constant,
            "replay" => Strategy::Replay,
            "deviate-relu" => Strategy::DeviateRelu,
            other => match other.strip_prefix("flip-rows:") {
                Some(k) => {
                    let k: usize = k.parse().map_err(|e| bad(format!("K: {e}")))?;
                    if k == 0 {
                        return Err(bad("K must be at least 1".into()));
                    }
                    Strategy::FlipRows(k)
                }
                None => return Err(AdversaryError::Unknown(s.to_owned())),
            },
        };
        Ok(Self { strategy, class })
    }
}

/// The announced model with all but the first `keep` units of its first hidden layer
/// switched off (their weights and bias set to zero): a weaker model of the same
/// architecture, made without training.
pub fn weakened(model: &Model, keep: usize) -> Result<Model, ModelError> {
    let arch = model.architecture().clone();
    let mut params: Vec<Vec<Tensor>> = (0..arch.layers().len())
        .map(|i| {
            model
                .layer_params(i)
                .map(<[Tensor]>::to_vec)
                .unwrap_or_default()
        })
        .collect();
    if let Some(i) = arch
        .layers()
        .iter()
        .position(|l| matches!(l, LayerSpec::Dense { .. }))
        && let LayerSpec::Dense { inputs, outputs } = arch.layers()[i]
        && let [w, b] = params[i].as_mut_slice()
    {
        let mut wd = w.data().to_vec();
        let mut bd = b.data().to_vec();
        for o in keep.min(outputs)..outputs {
            wd[o * inputs..(o + 1) * inputs].fill(0.0);
            bd[o] = 0.0;
        }
        *w = Tensor::new(w.shape().to_vec(), wd)?;
        *b = Tensor::new(b.shape().to_vec(), bd)?;
    }
    Model::new(arch, params, model.fixed_point())
}

/// The output shares of the last batch served, with their values per row (for `replay`).
type Replayed = Arc<Mutex<Option<(usize, Vec<u64>)>>>;

/// The server role of `cheetah`, deviating by a [`Strategy`].
#[derive(Debug)]
pub struct AdversaryRunner {
    spec: AdversarySpec,
    config: CheetahConfig,
    /// what `wrong-model` computes with
    wrong: Option<Arc<Model>>,
    /// the output shares of the last batch served (for `replay`)
    last: Replayed,
}

impl AdversaryRunner {
    /// A runner deviating from `announced` by `spec`; `wrong_model` replaces the
    /// train-free weaker model of `wrong-model` (same architecture and fixed point needed).
    pub fn new(
        spec: AdversarySpec,
        announced: &Model,
        wrong_model: Option<Model>,
    ) -> Result<Self, AdversaryError> {
        let wrong = match spec.strategy {
            Strategy::WrongModel => {
                let m = match wrong_model {
                    Some(m) => m,
                    None => {
                        let hidden = announced
                            .architecture()
                            .layers()
                            .iter()
                            .find_map(|l| match l {
                                LayerSpec::Dense { outputs, .. } => Some(*outputs),
                                _ => None,
                            })
                            .unwrap_or(1);
                        weakened(announced, (hidden / 16).max(1))
                            .map_err(|e| AdversaryError::Model(e.to_string()))?
                    }
                };
                if m.architecture() != announced.architecture()
                    || m.fixed_point() != announced.fixed_point()
                {
                    return Err(AdversaryError::Model(
                        "its architecture or fixed-point parameters differ from the announced model's".into(),
                    ));
                }
                Some(Arc::new(m))
            }
            _ => None,
        };
        Ok(Self {
            spec,
            config: CheetahConfig::default(),
            wrong,
            last: Arc::new(Mutex::new(None)),
        })
    }

    /// A registry like [`Registry::with_builtins`] whose `cheetah` is this adversary.
    pub fn registry(self) -> Registry {
        let mut r = Registry::empty();
        // both names are valid and distinct: registration cannot fail
        let _ = r.register(ECHO, echo);
        let _ = r.register(Cheetah::NAME, self);
        r
    }

    /// The strategy.
    pub fn spec(&self) -> AdversarySpec {
        self.spec
    }
}

/// The deviation, as a hook on the server's shares.
struct Deviation {
    spec: AdversarySpec,
    ring: Ring,
    frac_bits: u32,
    rng: StdRng,
    last: Replayed,
    relu_done: Option<u64>,
}

impl Deviation {
    /// Adds 2^(l-4) to logit `c` of `row`: the row's label becomes c (logits of the
    /// bundled models are far below 2^(l-4), and the sum stays below 2^(l-2), where the
    /// argmax is exact).
    fn push(&self, shares: &mut [u64], cols: usize, row: usize, c: usize) {
        let delta = 1u64 << (self.ring.bits() - 4);
        if let Some(v) = shares.get_mut(row * cols + c) {
            *v = self.ring.add(*v, delta);
        }
    }
}

impl ServerHook for Deviation {
    fn shares(&mut self, at: HookPoint, shares: &mut [u64]) {
        match (self.spec.strategy, at.op) {
            (Strategy::DeviateRelu, HookOp::ReluTrunc | HookOp::Relu)
                if self.relu_done != Some(at.batch) =>
            {
                self.relu_done = Some(at.batch);
                let eight = 8u64 << self.frac_bits;
                for v in shares.iter_mut() {
                    *v = self.ring.add(*v, eight);
                }
            }
            (s, HookOp::Output) => {
                let cols = at.cols.max(1);
                let c = self
                    .spec
                    .class
                    .unwrap_or_else(|| self.rng.random_range(0..cols))
                    .min(cols - 1);
                match s {
                    Strategy::FlipOne | Strategy::FlipRows(_) => {
                        let k = s.rows_altered().unwrap_or(1).min(at.rows);
                        for row in index::sample(&mut self.rng, at.rows, k) {
                            self.push(shares, cols, row, c);
                        }
                    }
                    Strategy::Constant => {
                        for row in 0..at.rows {
                            self.push(shares, cols, row, c);
                        }
                    }
                    Strategy::Replay => {
                        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                        let current = shares.to_vec();
                        if let Some((lc, old)) = last.as_ref()
                            && *lc == cols
                            && !old.is_empty()
                        {
                            for (v, o) in shares.iter_mut().zip(old.iter().cycle()) {
                                *v = *o;
                            }
                        }
                        *last = Some((cols, current));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

impl SessionRunner for AdversaryRunner {
    fn needs_model(&self) -> bool {
        true
    }

    fn charges_per_batch(&self) -> bool {
        true
    }

    fn check_start(&self, start: &SessionStart, state: &ServerState) -> Result<(), Refusal> {
        check_model_start(start, state)
    }

    fn memory_estimate(&self, start: &SessionStart, state: &ServerState) -> u64 {
        crate::backends::cheetah_session_memory(&self.config, start, state)
    }

    fn run(
        &self,
        ch: &mut dyn Channel,
        start: &StartInfo,
        state: &ServerState,
    ) -> Result<(), RunnerError> {
        // the set-up is for the announced model (the client checks its digest); the
        // batches are computed with the wrong model, if any
        let fixed = announced_model(state)?.fixed_point();
        let mut hook = Deviation {
            spec: self.spec,
            ring: fixed.ring(),
            frac_bits: fixed.frac_bits(),
            rng: StdRng::from_os_rng(),
            last: Arc::clone(&self.last),
            relu_done: None,
        };
        let computed = self.wrong.as_ref().map(|m| m.fixed_model());
        let batches = serve_cheetah(ch, start, state, &self.config, computed, &mut hook)?;
        tracing::warn!(
            session = start.session_id,
            adversary = %self.spec,
            batches,
            "adversarial cheetah session done"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion_common::fixed::{FixedLayer, FixedModel};

    fn first_dense_outputs(m: &FixedModel) -> Option<usize> {
        m.layers().iter().find_map(|l| match l {
            FixedLayer::Dense(d) => Some(d.outputs()),
            _ => None,
        })
    }
    use fusion_common::fixed::eval_fixed;
    use fusion_common::nn::mnist::{self, Split};
    use std::path::{Path, PathBuf};

    fn repo(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    }

    #[test]
    fn strategies_parse_and_print() {
        for s in Strategy::ALL {
            let spec: AdversarySpec = s.to_string().parse().unwrap();
            assert_eq!(spec.strategy, s);
            assert_eq!(spec.class, None);
        }
        let s: AdversarySpec = "flip-rows:3@7".parse().unwrap();
        assert_eq!((s.strategy, s.class), (Strategy::FlipRows(3), Some(7)));
        assert_eq!(s.to_string(), "flip-rows:3@7");
        assert!(matches!(
            "flip-rows:0".parse::<AdversarySpec>(),
            Err(AdversaryError::BadParameter { .. })
        ));
        assert!(matches!(
            "honest".parse::<AdversarySpec>(),
            Err(AdversaryError::Unknown(_))
        ));
        assert!(matches!(
            "constant@x".parse::<AdversarySpec>(),
            Err(AdversaryError::BadParameter { .. })
        ));
    }

    #[test]
    fn the_train_free_wrong_model_is_much_weaker_on_the_pool() {
        let model = Model::load(repo("models/mnist-784-32-10.safetensors")).unwrap();
        let runner = AdversaryRunner::new(
            AdversarySpec {
                strategy: Strategy::WrongModel,
                class: None,
            },
            &model,
            None,
        )
        .unwrap();
        let weak = runner.wrong.as_ref().unwrap();
        assert_eq!(first_dense_outputs(weak.fixed_model()), Some(32));
        let test = mnist::load(repo("data/mnist"), Split::Test).unwrap();
        let n = 300;
        let x = model
            .fixed_model()
            .encode_images(&test.images()[..n * mnist::PIXELS]);
        let good = eval_fixed(model.fixed_model(), &x).unwrap().labels;
        let bad = eval_fixed(weak.fixed_model(), &x).unwrap().labels;
        let agree = good.iter().zip(&bad).filter(|(a, b)| a == b).count();
        // far below the announced model: public rows catch it within a few draws
        assert!(agree * 2 < n, "agreement {agree} of {n}");
        // another architecture is refused
        let other = Model::load(repo("models/mnist-dnn.safetensors")).unwrap();
        assert!(matches!(
            AdversaryRunner::new(
                AdversarySpec {
                    strategy: Strategy::WrongModel,
                    class: None
                },
                &model,
                Some(other)
            ),
            Err(AdversaryError::Model(_))
        ));
    }

    #[test]
    fn flips_move_exactly_k_rows_to_the_class() {
        let ring = Ring::new(37).unwrap();
        let mut hook = Deviation {
            spec: AdversarySpec {
                strategy: Strategy::FlipRows(2),
                class: Some(3),
            },
            ring,
            frac_bits: 12,
            rng: StdRng::seed_from_u64(1),
            last: Arc::new(Mutex::new(None)),
            relu_done: None,
        };
        let (rows, cols) = (5, 10);
        let mut shares = vec![0u64; rows * cols];
        let at = HookPoint {
            batch: 0,
            layer: 2,
            op: HookOp::Output,
            rows,
            cols,
        };
        hook.shares(at, &mut shares);
        let changed: Vec<usize> = (0..rows)
            .filter(|r| shares[r * cols..(r + 1) * cols].iter().any(|&v| v != 0))
            .collect();
        assert_eq!(changed.len(), 2);
        for r in changed {
            assert_eq!(shares[r * cols + 3], 1 << 33);
        }
        // other hook points are untouched by a flip
        let mut z = vec![5u64; 10];
        hook.shares(
            HookPoint {
                op: HookOp::ReluTrunc,
                ..at
            },
            &mut z,
        );
        assert!(z.iter().all(|&v| v == 5));
    }
}
