//! [`ServiceOracle`]: the [`Oracle`] answered by the real secure service, each call one
//! or more real 2PC batches through gRPC over mutual TLS ([`crate::infer::run_with_info`]).
//!
//! ```text
//!   attacker                                   server (policy, budget per certificate)
//!   new():    GetModelInfo  ─────────────────▶  output mode, max_rows, budget, model
//!   labels(xs) / logits(xs), per chunk of at most max_rows rows:
//!             Session(start: rows, cols, output) ─▶ refused at once: RESOURCE_EXHAUSTED
//!                                                   (nothing left), FAILED_PRECONDITION
//!                                                   (logits of a labels-only server)
//!             set-up, then one batch header  ──▶  charged to the budget, or the session
//!                                                   ends RESOURCE_EXHAUSTED
//!             2PC of the batch               ◀─▶  labels (argmax inside 2PC) or logits
//! ```
//!
//! Inputs: each value v in [0, 1] is encoded as `FixedPoint::encode(v)` (round(v 2^f),
//! ties away from zero) in the model's ring, the same encoding as
//! [`super::oracle::LocalFixedOracle`]; logits are decoded from signed ring elements as
//! multiples of 2^-f. So the service and the local fixed-point oracle answer bit for bit
//! alike (tested below, over an in-process server with real mutual TLS).
//!
//! Refusals become named [`OracleError`]s: the budget ([`OracleError::BudgetExhausted`],
//! with the server's figures, re-read after the refusal), logits of a labels-only server
//! ([`OracleError::LabelsOnly`], before anything is sent when the server announced labels
//! only), anything else is [`OracleError::Service`] with the error chain.
//!
//! Accounting: [`Oracle::queries`] counts the rows of batches the server accepted (and
//! so charged); [`Oracle::remaining`] is the server's figure for this certificate (other
//! sessions with the same certificate count too).
//!
//! The oracle blocks on a tokio runtime it is given a handle of: call it from a thread
//! that is not running that runtime's tasks (a plain thread, e.g. the attack's).

use std::error::Error as StdError;
use std::time::Instant;

use fusion_common::backend::{BackendKind, LayerKind};
use fusion_common::fixed::FixedPoint;
use fusion_common::net::{Budget, OutputMode as WireOutput, ServiceInfo};
use serde::Serialize;
use tokio::runtime::Handle;
use tonic::Code;

use super::oracle::{Oracle, OracleError, OutputMode, check_rows};
use crate::client::Client;
use crate::infer::{InferError, InferOptions, Inputs, model_spec, run_with_info};

/// Throughput of a [`ServiceOracle`] so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ServiceStats {
    /// sessions run (accepted or not)
    pub sessions: u64,
    /// rows answered
    pub rows: u64,
    /// wall time spent in sessions that answered, seconds
    pub seconds: f64,
}

impl ServiceStats {
    /// Rows answered per second of session time.
    pub fn rows_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.rows as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The secure service as an [`Oracle`] (see the module doc).
#[derive(Debug)]
pub struct ServiceOracle {
    rt: Handle,
    client: Client,
    info: ServiceInfo,
    fixed: FixedPoint,
    input_len: usize,
    classes: usize,
    max_rows: usize,
    backend: BackendKind,
    /// rows of accepted batches
    used: u64,
    /// the server's budget for this certificate, as last known
    budget: Budget,
    stats: ServiceStats,
}

impl ServiceOracle {
    /// Reads the server's description (`GetModelInfo`) through `client`, whose
    /// connection lives on the runtime `rt`. Blocks: not from inside `rt`'s tasks.
    pub fn new(rt: Handle, client: Client) -> Result<Self, OracleError> {
        let info = rt.block_on(client.model_info()).map_err(|e| service(&e))?;
        let m = info
            .model
            .as_ref()
            .ok_or_else(|| OracleError::Service("the server has no model loaded".into()))?;
        let spec = model_spec(m).map_err(|e| service(&e))?;
        let classes = spec
            .layers
            .iter()
            .rev()
            .find_map(|l| match l {
                LayerKind::Dense { outputs, .. } => Some(*outputs),
                _ => None,
            })
            .ok_or_else(|| OracleError::Service("the model has no dense layer".into()))?;
        let max_rows = usize::try_from(info.max_rows).unwrap_or(usize::MAX).max(1);
        Ok(Self {
            rt,
            client,
            fixed: spec.fixed,
            input_len: spec.input_len,
            classes,
            max_rows,
            backend: BackendKind::default(),
            used: 0,
            budget: info.budget,
            stats: ServiceStats::default(),
            info,
        })
    }

    /// The server's description as read by [`ServiceOracle::new`].
    pub fn info(&self) -> &ServiceInfo {
        &self.info
    }

    /// Sessions, rows and time so far.
    pub fn stats(&self) -> ServiceStats {
        self.stats
    }

    /// The ring and scale of the served model.
    pub fn fixed_point(&self) -> FixedPoint {
        self.fixed
    }

    /// Runs `xs` in sessions of one batch of at most the server's `max_rows` rows each,
    /// asking for `output`: the signed logits (scale 2^f) or the labels of every row.
    fn run(&mut self, xs: &[Vec<f32>], output: OutputMode) -> Result<Answer, OracleError> {
        check_rows(xs, self.input_len)?;
        let mut answer = Answer::default();
        for (c, chunk) in xs.chunks(self.max_rows).enumerate() {
            let mut enc = Vec::with_capacity(chunk.len() * self.input_len);
            for (i, x) in chunk.iter().enumerate() {
                let row = c * self.max_rows + i;
                for &v in x {
                    // round(v 2^f), ties away from zero (the binding encoding)
                    enc.push(self.fixed.encode(f64::from(v)).map_err(|e| {
                        OracleError::BadInput {
                            row,
                            reason: e.to_string(),
                        }
                    })?);
                }
            }
            let opts = InferOptions {
                backend: self.backend,
                output: Some(match output {
                    OutputMode::Labels => WireOutput::Labels,
                    OutputMode::Logits => WireOutput::Logits,
                }),
                batch_rows: Some(chunk.len()),
                ..InferOptions::default()
            };
            let t = Instant::now();
            self.stats.sessions += 1;
            let out = self.rt.block_on(run_with_info(
                &self.client,
                &self.info,
                Inputs::Encoded(&enc),
                &opts,
            ));
            let out = match out {
                Ok(out) => out,
                Err(e) => return Err(self.refusal(&e)),
            };
            let rows = chunk.len() as u64;
            if out.labels.len() != chunk.len() {
                return Err(OracleError::Service(format!(
                    "{} labels for {} rows",
                    out.labels.len(),
                    chunk.len()
                )));
            }
            self.used += rows;
            if let Budget::Rows { remaining, .. } = &mut self.budget {
                *remaining = remaining.saturating_sub(rows);
            }
            self.stats.rows += rows;
            self.stats.seconds += t.elapsed().as_secs_f64();
            answer.labels.extend(out.labels);
            if output == OutputMode::Logits {
                let logits = out
                    .logits
                    .ok_or_else(|| OracleError::Service("the server returned no logits".into()))?;
                if logits.len() != chunk.len() || logits.iter().any(|l| l.len() != self.classes) {
                    return Err(OracleError::Service(format!(
                        "logits of {} rows for {} rows of {} classes",
                        logits.len(),
                        chunk.len(),
                        self.classes
                    )));
                }
                answer.logits.extend(logits);
            }
        }
        Ok(answer)
    }

    /// The named error of a failed session; re-reads the budget after a budget refusal.
    fn refusal(&mut self, e: &InferError) -> OracleError {
        match refusal_code(e) {
            Some(Code::ResourceExhausted) => {
                if let Ok(info) = self.rt.block_on(self.client.model_info()) {
                    self.budget = info.budget;
                }
                let (used, budget) = match self.budget {
                    Budget::Rows { limit, remaining } => (limit.saturating_sub(remaining), limit),
                    // refused for the budget by a server that announces none
                    Budget::Unlimited => (self.used, 0),
                };
                OracleError::BudgetExhausted { used, budget }
            }
            Some(Code::FailedPrecondition) if self.info.output == WireOutput::Labels => {
                OracleError::LabelsOnly
            }
            _ => service(e),
        }
    }
}

/// Answers of one oracle call.
#[derive(Debug, Default)]
struct Answer {
    labels: Vec<usize>,
    logits: Vec<Vec<i64>>,
}

/// `Service(the error and its causes)`.
fn service(e: &(dyn StdError + 'static)) -> OracleError {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        src = s.source();
    }
    OracleError::Service(text)
}

/// The gRPC code of a refusal by the server, wherever it surfaced (see
/// [`ClientError::code`]).
pub fn refusal_code(e: &InferError) -> Option<Code> {
    match e {
        InferError::Client(c) => c.code(),
        _ => None,
    }
}

impl Oracle for ServiceOracle {
    fn mode(&self) -> OutputMode {
        match self.info.output {
            WireOutput::Labels => OutputMode::Labels,
            WireOutput::Logits => OutputMode::Logits,
        }
    }
    fn input_len(&self) -> usize {
        self.input_len
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn max_batch(&self) -> usize {
        self.max_rows
    }
    fn queries(&self) -> u64 {
        self.used
    }
    fn budget(&self) -> Option<u64> {
        match self.budget {
            Budget::Unlimited => None,
            Budget::Rows { limit, .. } => Some(limit),
        }
    }
    fn remaining(&self) -> Option<u64> {
        match self.budget {
            Budget::Unlimited => None,
            Budget::Rows { remaining, .. } => Some(remaining),
        }
    }
    fn labels(&mut self, xs: &[Vec<f32>]) -> Result<Vec<usize>, OracleError> {
        Ok(self.run(xs, OutputMode::Labels)?.labels)
    }
    fn logits(&mut self, xs: &[Vec<f32>]) -> Result<Vec<Vec<f64>>, OracleError> {
        // refuse before sending anything: the server announced labels only
        if self.mode() == OutputMode::Labels {
            return Err(OracleError::LabelsOnly);
        }
        let scale = 2f64.powi(-(self.fixed.frac_bits() as i32));
        Ok(self
            .run(xs, OutputMode::Logits)?
            .logits
            .into_iter()
            .map(|l| l.into_iter().map(|v| v as f64 * scale).collect())
            .collect())
    }
    fn describe(&self) -> String {
        let budget = match self.budget {
            Budget::Unlimited => "no budget".to_string(),
            Budget::Rows { limit, .. } => format!("budget {limit}"),
        };
        format!(
            "secure service {} ({}, {}), {}, {budget}",
            self.client.addr(),
            self.backend.name(),
            self.fixed,
            self.mode()
        )
    }
}

#[cfg(test)]
mod tests {
    //! Over an in-process server with real mutual TLS ([`LocalServer`]) and the small
    //! model `models/mnist-784-32-10.safetensors`.

    use super::*;
    use crate::attack::carlini::{CarliniConfig, CarliniError, carlini};
    use crate::attack::data::{Arithmetic, AttackData};
    use crate::attack::oracle::{LocalFixedOracle, Policy, query_labels};
    use crate::attack::papernot::{PapernotConfig, papernot};
    use crate::local::LocalServer;
    use fusion_common::nn::Model;
    use fusion_common::nn::mnist::{self, Split};
    use fusion_server::runner::Registry;
    use fusion_server::state::{Policy as ServerPolicy, ServedModel, ServerState, SessionLimits};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::path::PathBuf;
    use tokio::runtime::Runtime;

    fn root() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn model() -> Model {
        Model::load(root().join("models/mnist-784-32-10.safetensors")).unwrap()
    }

    /// A service oracle on an in-process server with `policy`.
    fn start(rt: &Runtime, policy: ServerPolicy) -> (ServiceOracle, LocalServer) {
        let served = ServedModel::new("mnist-784-32-10", model());
        let state = ServerState::new(Some(served), policy, SessionLimits::default());
        let server = rt
            .block_on(LocalServer::start(state, Registry::with_builtins()))
            .unwrap();
        let client = rt.block_on(server.client()).unwrap();
        let oracle = ServiceOracle::new(rt.handle().clone(), client).unwrap();
        (oracle, server)
    }

    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// `n` MNIST test images in [0, 1], then `random` uniform rows in [0, 1]^784.
    fn rows(n: usize, random: usize) -> Vec<Vec<f32>> {
        let test = mnist::load(root().join("data/mnist"), Split::Test).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut xs: Vec<Vec<f32>> = (0..n)
            .map(|i| {
                test.images()[i * 784..(i + 1) * 784]
                    .iter()
                    .map(|&p| f32::from(p) / 255.0)
                    .collect()
            })
            .collect();
        xs.extend((0..random).map(|_| (0..784).map(|_| rng.random::<f32>()).collect()));
        xs
    }

    fn policy(output: WireOutput, budget: Option<u64>, max_rows: u64) -> ServerPolicy {
        ServerPolicy {
            output,
            budget,
            max_rows,
            ..ServerPolicy::default()
        }
    }

    /// Logits and labels through real 2PC batches (split at the server's 4 rows) equal the
    /// fixed-point evaluator's, bit for bit; rows are counted per accepted batch.
    #[test]
    fn service_oracle_answers_exactly_the_fixed_point_evaluator() {
        let rt = runtime();
        let (mut o, server) = start(&rt, policy(WireOutput::Logits, None, 4));
        assert_eq!(o.mode(), OutputMode::Logits);
        assert_eq!((o.input_len(), o.classes(), o.max_batch()), (784, 10, 4));
        assert_eq!((o.budget(), o.remaining()), (None, None));
        let xs = rows(4, 2);
        let mut local = LocalFixedOracle::new(model(), Policy::undefended());
        let want_logits = local.logits(&xs).unwrap();
        let want_labels = local.labels(&xs).unwrap();

        let logits = o.logits(&xs).unwrap();
        assert_eq!(logits, want_logits);
        assert_eq!(o.queries(), 6);
        assert_eq!(o.stats().sessions, 2, "6 rows at most 4 a batch");
        let labels = o.labels(&xs).unwrap();
        assert_eq!(labels, want_labels);
        assert_eq!(o.queries(), 12);
        assert_eq!(o.stats().rows, 12);
        // a row outside [0, 1] is refused locally, nothing sent or charged
        let mut bad = xs[..1].to_vec();
        bad[0][3] = 1.5;
        assert!(matches!(
            o.labels(&bad),
            Err(OracleError::BadInput { row: 0, .. })
        ));
        assert_eq!((o.queries(), o.stats().sessions), (12, 4));
        rt.block_on(server.shutdown()).unwrap();
    }

    /// A budget of 40 rows: the server's refusals (RESOURCE_EXHAUSTED at the start and
    /// of a batch inside a session) are `BudgetExhausted` with the server's figures, the
    /// batching helper spends exactly the budget, and Papernot's attack ends with its
    /// partial result.
    #[test]
    fn budget_refusal_through_the_service() {
        let rt = runtime();
        let (mut o, server) = start(&rt, policy(WireOutput::Labels, Some(40), 16));
        assert_eq!(o.mode(), OutputMode::Labels);
        assert_eq!((o.budget(), o.remaining()), (Some(40), Some(40)));
        let xs = rows(30, 0);
        assert_eq!(o.labels(&xs[..30]).unwrap().len(), 30);
        assert_eq!((o.queries(), o.remaining()), (30, Some(10)));
        // the budget is the certificate's: a second oracle sees what is left
        let client = rt.block_on(server.client()).unwrap();
        let o2 = ServiceOracle::new(rt.handle().clone(), client).unwrap();
        assert_eq!((o2.queries(), o2.remaining()), (0, Some(10)));
        // 16 rows with 10 left: the session starts, its batch is refused inside it
        let before = o.stats().sessions;
        assert_eq!(
            o.labels(&xs[..16]),
            Err(OracleError::BudgetExhausted {
                used: 30,
                budget: 40
            })
        );
        assert_eq!(o.stats().sessions, before + 1, "the server refused it");
        assert_eq!((o.queries(), o.remaining()), (30, Some(10)));
        // the helper spends the last 10 rows, then stops by name
        let p = query_labels(&mut o, &xs[..16]);
        assert_eq!(p.results.len(), 10);
        assert_eq!(
            p.error,
            Some(OracleError::BudgetExhausted {
                used: 40,
                budget: 40
            })
        );
        assert_eq!(o.queries(), 40);
        // nothing left: the server refuses at the start
        assert_eq!(
            o.labels(&xs[..1]),
            Err(OracleError::BudgetExhausted {
                used: 40,
                budget: 40
            })
        );
        // the second oracle, stale (it believes 10 rows are left): the server refuses,
        // with the certificate's figures, not this oracle's 0 rows
        let mut o2 = o2;
        let p = query_labels(&mut o2, &xs[..5]);
        assert!(p.results.is_empty());
        assert_eq!(
            p.error,
            Some(OracleError::BudgetExhausted {
                used: 40,
                budget: 40
            })
        );
        assert_eq!((o2.queries(), o2.remaining()), (0, Some(0)));
        rt.block_on(server.shutdown()).unwrap();

        // The attack on a fresh server with the same budget: stops in round 0 with the
        // 40 rows it got, trained and scored.
        let (mut o, server) = start(&rt, policy(WireOutput::Labels, Some(40), 16));
        let test = mnist::load(root().join("data/mnist"), Split::Test).unwrap();
        let data = AttackData::from_sets(&test, None, &model(), Arithmetic::Fixed).unwrap();
        let cfg = PapernotConfig {
            rounds: 2,
            hidden: vec![32],
            epochs: 2,
            ..PapernotConfig::default()
        };
        let r = papernot(&mut o, &data, &cfg, false).unwrap();
        assert_eq!((r.queries, o.queries()), (40, 40));
        assert_eq!(r.rounds.len(), 1);
        assert_eq!(r.rounds[0].training_rows, 40);
        let why = r.stopped.as_deref().unwrap();
        assert!(why.contains("budget exhausted: 40 of 40"), "{why}");
        rt.block_on(server.shutdown()).unwrap();
    }

    /// A labels-only server: Carlini's extraction stops at once (no session), and logits
    /// asked of the server anyway are refused by the server as `LabelsOnly`.
    #[test]
    fn labels_only_service_refuses_carlini() {
        let rt = runtime();
        let (mut o, server) = start(&rt, policy(WireOutput::Labels, None, 16));
        let m = model();
        let err = carlini(
            &mut o,
            m.architecture(),
            &CarliniConfig::default(),
            None,
            None,
            false,
        )
        .unwrap_err();
        assert!(matches!(err, CarliniError::LabelsOnly), "{err}");
        assert!(err.to_string().contains("labels"), "{err}");
        assert_eq!((o.queries(), o.stats().sessions), (0, 0));
        assert_eq!(o.logits(&rows(1, 0)), Err(OracleError::LabelsOnly));
        assert_eq!(o.stats().sessions, 0, "refused before sending");
        // past the local check: the server's own refusal (FAILED_PRECONDITION)
        assert!(matches!(
            o.run(&rows(1, 0), OutputMode::Logits),
            Err(OracleError::LabelsOnly)
        ));
        assert_eq!((o.queries(), o.stats().sessions), (0, 1));
        // labels still work
        assert_eq!(o.labels(&rows(2, 0)).unwrap().len(), 2);
        rt.block_on(server.shutdown()).unwrap();
    }
}
