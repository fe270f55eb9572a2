//! The attacker's view of the service: an [`Oracle`] answers "labels for these inputs" or
//! "logits for these inputs", counts the rows it was asked for, and enforces the server's
//! policy (labels only, a row budget, a largest batch).
//!
//! Implementations here are local, to validate the attacks and to compare:
//! - [`LocalFixedOracle`]: exactly what the secure service computes, the fixed-point
//!   evaluator [`fusion_common::fixed::eval_fixed`] on the model: every input value v in
//!   [0, 1] is encoded as `FixedPoint::encode(v)` = round(v 2^f), logits come back as ring
//!   elements and are decoded to multiples of 2^-f. Arbitrary inputs in [0, 1]^784 can drive
//!   accumulators past the ring (the bundled models keep 2 bits of headroom on MNIST, not on
//!   every input): the evaluator's semantics are used as they are, wrap-around included, and
//!   [`LocalFixedOracle::stats`] reports how often it happened.
//! - [`LocalF32Oracle`]: the plain f32 evaluator.
//!
//! The real service implements the same trait: [`super::service::ServiceOracle`] (one
//! call = one or more real 2PC batches), with its refusals mapped onto [`OracleError`].
//!
//! Accounting: [`Oracle::queries`] counts rows of accepted batches, the way the server
//! charges budgets (a batch is charged when accepted; a refused batch costs nothing).

use fusion_common::fixed::{FixedPoint, eval_fixed, first_argmax};
use fusion_common::nn::Model;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

/// What leaves the service for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// The top-1 label of each row only (the defended policy).
    Labels,
    /// The logits (the undefended policy); labels are available too.
    Logits,
}

impl std::fmt::Display for OutputMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutputMode::Labels => "labels",
            OutputMode::Logits => "logits",
        })
    }
}

/// Why an oracle did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
#[non_exhaustive]
pub enum OracleError {
    /// Logits were asked of an oracle that returns labels only.
    #[error("the oracle returns labels only (the server's policy): logits are not available")]
    LabelsOnly,
    /// The batch would exceed the row budget; nothing was charged.
    #[error("query budget exhausted: {used} of {budget} rows used")]
    BudgetExhausted {
        /// rows charged so far to this client (for a service: to its certificate, by
        /// every session, not only this oracle's)
        used: u64,
        /// the budget in rows
        budget: u64,
    },
    /// The service failed (transport, protocol, server error).
    #[error("oracle service: {0}")]
    Service(String),
    /// An input the oracle does not accept: wrong length, a value that is not finite or
    /// outside [0, 1], or a batch larger than [`Oracle::max_batch`].
    #[error("bad oracle input (row {row}): {reason}")]
    BadInput {
        /// the offending row (0 for a batch-level problem)
        row: usize,
        /// what is wrong
        reason: String,
    },
}

/// A black-box classifier the attacker can query.
///
/// Inputs are real vectors in [0, 1]^n (n = [`Oracle::input_len`], 784 for MNIST); one
/// call is one batch of at most [`Oracle::max_batch`] rows, answered whole or refused
/// whole. Use [`query_labels`] / [`query_logits`] to send more rows than one batch holds.
pub trait Oracle {
    /// Whether logits are available.
    fn mode(&self) -> OutputMode;
    /// Values per input row.
    fn input_len(&self) -> usize;
    /// Number of classes (logits per row).
    fn classes(&self) -> usize;
    /// The largest batch one call may send.
    fn max_batch(&self) -> usize;
    /// Rows charged so far (accepted batches only).
    fn queries(&self) -> u64;
    /// The row budget, if any.
    fn budget(&self) -> Option<u64>;
    /// The top-1 label (first argmax of the logits) of every row.
    fn labels(&mut self, xs: &[Vec<f32>]) -> Result<Vec<usize>, OracleError>;
    /// The logits of every row; [`OracleError::LabelsOnly`] from a labels-only oracle.
    fn logits(&mut self, xs: &[Vec<f32>]) -> Result<Vec<Vec<f64>>, OracleError>;
    /// A short description for reports (e.g. `"local-fixed Z_2^33 f=12"`).
    fn describe(&self) -> String;

    /// Rows still available under the budget (`None`: unlimited).
    fn remaining(&self) -> Option<u64> {
        self.budget().map(|b| b.saturating_sub(self.queries()))
    }
}

/// The answers obtained for a prefix of the rows asked, and the error that stopped the
/// rest (if any). Attacks use this to report what they had when the budget ran out.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial<T> {
    /// Answers for rows `0..results.len()`.
    pub results: Vec<T>,
    /// Why the remaining rows were not answered.
    pub error: Option<OracleError>,
}

impl<T> Partial<T> {
    /// All rows answered, or the error.
    pub fn complete(self) -> Result<Vec<T>, OracleError> {
        match self.error {
            None => Ok(self.results),
            Some(e) => Err(e),
        }
    }
}

/// Sends `xs` in batches of at most `max_batch` rows. When the budget cannot cover the
/// next batch, sends the part it still covers (so no row of budget is wasted), then
/// returns the answers so far with [`OracleError::BudgetExhausted`].
fn query_batched<T>(
    oracle: &mut dyn Oracle,
    xs: &[Vec<f32>],
    mut call: impl FnMut(&mut dyn Oracle, &[Vec<f32>]) -> Result<Vec<T>, OracleError>,
) -> Partial<T> {
    let mut results = Vec::with_capacity(xs.len());
    let step = oracle.max_batch().max(1);
    let mut start = 0;
    while start < xs.len() {
        let mut end = (start + step).min(xs.len());
        if let Some(left) = oracle.remaining() {
            let left = usize::try_from(left).unwrap_or(usize::MAX);
            if left == 0 {
                // the budget's own figures: a service's budget may also have been spent
                // by other sessions of the same certificate
                let budget = oracle.budget().unwrap_or(0);
                return Partial {
                    results,
                    error: Some(OracleError::BudgetExhausted {
                        used: budget,
                        budget,
                    }),
                };
            }
            end = end.min(start + left);
        }
        match call(oracle, &xs[start..end]) {
            Ok(r) => results.extend(r),
            Err(e) => {
                return Partial {
                    results,
                    error: Some(e),
                };
            }
        }
        start = end;
    }
    Partial {
        results,
        error: None,
    }
}

/// Labels of any number of rows, batch by batch (see [`Partial`]).
pub fn query_labels(oracle: &mut dyn Oracle, xs: &[Vec<f32>]) -> Partial<usize> {
    query_batched(oracle, xs, |o, b| o.labels(b))
}

/// Logits of any number of rows, batch by batch (see [`Partial`]).
pub fn query_logits(oracle: &mut dyn Oracle, xs: &[Vec<f32>]) -> Partial<Vec<f64>> {
    if oracle.mode() == OutputMode::Labels {
        return Partial {
            results: Vec::new(),
            error: Some(OracleError::LabelsOnly),
        };
    }
    query_batched(oracle, xs, |o, b| o.logits(b))
}

/// The policy a local oracle simulates: what leaves it, a budget, the largest batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// labels only or logits
    pub output: OutputMode,
    /// rows in all (`None`: unlimited)
    pub budget: Option<u64>,
    /// rows per batch
    pub max_batch: usize,
}

impl Policy {
    /// Logits, no budget (the undefended service).
    pub fn undefended() -> Self {
        Self {
            output: OutputMode::Logits,
            budget: None,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// Labels only with a budget of `rows` (the defended service).
    pub fn defended(rows: u64) -> Self {
        Self {
            output: OutputMode::Labels,
            budget: Some(rows),
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// `"logits, no budget"` / `"labels, budget 10000"`.
    pub fn label(&self) -> String {
        match self.budget {
            None => format!("{}, no budget", self.output),
            Some(b) => format!("{}, budget {b}", self.output),
        }
    }
}

/// The largest batch of the local oracles by default (the server's default limit).
pub const DEFAULT_MAX_BATCH: usize = 1024;

/// Policy enforcement and row accounting shared by the local oracles.
#[derive(Debug, Clone)]
struct Gate {
    policy: Policy,
    input_len: usize,
    used: u64,
}

impl Gate {
    /// Checks a batch against the policy and the input domain; charges it if accepted.
    fn admit(&mut self, xs: &[Vec<f32>], logits: bool) -> Result<(), OracleError> {
        if logits && self.policy.output == OutputMode::Labels {
            return Err(OracleError::LabelsOnly);
        }
        if xs.len() > self.policy.max_batch {
            return Err(OracleError::BadInput {
                row: 0,
                reason: format!(
                    "batch of {} rows, at most {} allowed",
                    xs.len(),
                    self.policy.max_batch
                ),
            });
        }
        check_rows(xs, self.input_len)?;
        let rows = xs.len() as u64;
        if let Some(budget) = self.policy.budget
            && self.used + rows > budget
        {
            return Err(OracleError::BudgetExhausted {
                used: self.used,
                budget,
            });
        }
        self.used += rows;
        Ok(())
    }
}

/// Every row has `len` values, each finite and in [0, 1].
pub(crate) fn check_rows(xs: &[Vec<f32>], len: usize) -> Result<(), OracleError> {
    for (row, x) in xs.iter().enumerate() {
        if x.len() != len {
            return Err(OracleError::BadInput {
                row,
                reason: format!("{} values, {len} expected", x.len()),
            });
        }
        if let Some((j, v)) = x
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && (0.0..=1.0).contains(*v)))
        {
            return Err(OracleError::BadInput {
                row,
                reason: format!("value {v} at {j} is not in [0, 1]"),
            });
        }
    }
    Ok(())
}

/// Ring wrap-around seen by a [`LocalFixedOracle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrapStats {
    /// rows evaluated
    pub rows: u64,
    /// rows with at least one accumulator outside the ring's signed range
    pub wrapped_rows: u64,
    /// accumulators outside the ring's signed range
    pub wrapped_accumulators: u64,
    /// the largest |accumulator| seen (exact integer)
    pub max_abs_acc: u64,
    /// l
    pub ring_bits: u32,
}

/// The fixed-point evaluator on a model: bit for bit what the secure service computes.
#[derive(Debug)]
pub struct LocalFixedOracle {
    model: Model,
    fixed: FixedPoint,
    gate: Gate,
    stats: WrapStats,
}

impl LocalFixedOracle {
    /// An oracle on `model` under `policy`.
    pub fn new(model: Model, policy: Policy) -> Self {
        let fixed = model.fixed_point();
        let input_len = model.architecture().input_len();
        Self {
            model,
            fixed,
            gate: Gate {
                policy,
                input_len,
                used: 0,
            },
            stats: WrapStats {
                ring_bits: fixed.ring_bits(),
                ..WrapStats::default()
            },
        }
    }

    /// Wrap-around statistics over every row evaluated so far.
    pub fn stats(&self) -> WrapStats {
        self.stats
    }

    /// Signed logits (scale 2^f) of an admitted batch, and the wrap statistics.
    fn eval(&mut self, xs: &[Vec<f32>]) -> Result<Vec<Vec<i64>>, OracleError> {
        let mut enc = Vec::with_capacity(xs.len() * self.gate.input_len);
        for (row, x) in xs.iter().enumerate() {
            for &v in x {
                // round(v 2^f), ties away from zero (the binding encoding).
                let e = self
                    .fixed
                    .encode(f64::from(v))
                    .map_err(|e| OracleError::BadInput {
                        row,
                        reason: e.to_string(),
                    })?;
                enc.push(e);
            }
        }
        let fm = self.model.fixed_model();
        let r = eval_fixed(fm, &enc).map_err(|e| OracleError::Service(e.to_string()))?;
        self.stats.rows += xs.len() as u64;
        self.stats.max_abs_acc = self.stats.max_abs_acc.max(r.max_abs_acc);
        if r.wrapped > 0 {
            self.stats.wrapped_accumulators += r.wrapped as u64;
            // Rare: find the rows that wrapped, one by one.
            for row in enc.chunks(self.gate.input_len) {
                let one = eval_fixed(fm, row).map_err(|e| OracleError::Service(e.to_string()))?;
                self.stats.wrapped_rows += u64::from(one.wrapped > 0);
            }
        }
        (0..r.rows())
            .map(|i| {
                r.signed_logits(i)
                    .ok_or_else(|| OracleError::Service("logits missing".into()))
            })
            .collect()
    }
}

impl Oracle for LocalFixedOracle {
    fn mode(&self) -> OutputMode {
        self.gate.policy.output
    }
    fn input_len(&self) -> usize {
        self.gate.input_len
    }
    fn classes(&self) -> usize {
        self.model.architecture().output_len()
    }
    fn max_batch(&self) -> usize {
        self.gate.policy.max_batch
    }
    fn queries(&self) -> u64 {
        self.gate.used
    }
    fn budget(&self) -> Option<u64> {
        self.gate.policy.budget
    }
    fn labels(&mut self, xs: &[Vec<f32>]) -> Result<Vec<usize>, OracleError> {
        self.gate.admit(xs, false)?;
        Ok(self.eval(xs)?.iter().map(|l| first_argmax(l)).collect())
    }
    fn logits(&mut self, xs: &[Vec<f32>]) -> Result<Vec<Vec<f64>>, OracleError> {
        self.gate.admit(xs, true)?;
        let scale = 2f64.powi(-(self.fixed.frac_bits() as i32));
        Ok(self
            .eval(xs)?
            .into_iter()
            .map(|l| l.into_iter().map(|v| v as f64 * scale).collect())
            .collect())
    }
    fn describe(&self) -> String {
        format!(
            "local fixed point ({}), {}",
            self.fixed,
            self.gate.policy.label()
        )
    }
}

/// The plain f32 evaluator on a model (for validation).
#[derive(Debug)]
pub struct LocalF32Oracle {
    model: Model,
    gate: Gate,
}

impl LocalF32Oracle {
    /// An oracle on `model` under `policy`.
    pub fn new(model: Model, policy: Policy) -> Self {
        let input_len = model.architecture().input_len();
        Self {
            model,
            gate: Gate {
                policy,
                input_len,
                used: 0,
            },
        }
    }

    fn eval(&self, xs: &[Vec<f32>]) -> Result<Array2<f32>, OracleError> {
        let n = self.gate.input_len;
        let flat: Vec<f32> = xs.iter().flatten().copied().collect();
        let x = Array2::from_shape_vec((xs.len(), n), flat)
            .map_err(|e| OracleError::Service(e.to_string()))?;
        self.model
            .forward_f32(x.view())
            .map_err(|e| OracleError::Service(e.to_string()))
    }
}

impl Oracle for LocalF32Oracle {
    fn mode(&self) -> OutputMode {
        self.gate.policy.output
    }
    fn input_len(&self) -> usize {
        self.gate.input_len
    }
    fn classes(&self) -> usize {
        self.model.architecture().output_len()
    }
    fn max_batch(&self) -> usize {
        self.gate.policy.max_batch
    }
    fn queries(&self) -> u64 {
        self.gate.used
    }
    fn budget(&self) -> Option<u64> {
        self.gate.policy.budget
    }
    fn labels(&mut self, xs: &[Vec<f32>]) -> Result<Vec<usize>, OracleError> {
        self.gate.admit(xs, false)?;
        let y = self.eval(xs)?;
        Ok(y.rows()
            .into_iter()
            .map(|r| argmax_f32(r.iter().copied()))
            .collect())
    }
    fn logits(&mut self, xs: &[Vec<f32>]) -> Result<Vec<Vec<f64>>, OracleError> {
        self.gate.admit(xs, true)?;
        let y = self.eval(xs)?;
        Ok(y.rows()
            .into_iter()
            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
            .collect())
    }
    fn describe(&self) -> String {
        format!("local f32, {}", self.gate.policy.label())
    }
}

/// First index of the largest value.
pub(crate) fn argmax_f32(values: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// First index of the largest value.
pub(crate) fn argmax_f64(values: &[f64]) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, &v) in values.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion_common::nn::{Architecture, Tensor};

    /// A hand-made 3-2-2 network: h = relu(W1 x + b1), y = W2 h + b2.
    fn tiny() -> Model {
        let arch = Architecture::mlp(&[3], &[2], 2).unwrap();
        let t = |s: Vec<usize>, v: Vec<f32>| Tensor::new(s, v).unwrap();
        let params = vec![
            vec![
                t(vec![2, 3], vec![1.0, -0.5, 0.25, 0.5, 0.5, -1.0]),
                t(vec![2], vec![0.0, 0.125]),
            ],
            Vec::new(),
            vec![
                t(vec![2, 2], vec![1.0, -1.0, -0.5, 2.0]),
                t(vec![2], vec![0.5, 0.0]),
            ],
        ];
        Model::new(arch, params, FixedPoint::new(33, 12).unwrap()).unwrap()
    }

    fn rows(n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| vec![(i % 5) as f32 / 4.0, 0.5, 1.0 - (i % 3) as f32 / 2.0])
            .collect()
    }

    #[test]
    fn fixed_oracle_matches_the_evaluator_and_counts_rows() {
        let m = tiny();
        let mut o = LocalFixedOracle::new(m.clone(), Policy::undefended());
        let xs = rows(7);
        let logits = o.logits(&xs).unwrap();
        let labels = o.labels(&xs).unwrap();
        assert_eq!(o.queries(), 14);
        let fm = m.fixed_model();
        let fp = fm.fixed_point();
        for ((x, l), lab) in xs.iter().zip(&logits).zip(&labels) {
            let enc: Vec<u64> = x
                .iter()
                .map(|&v| fp.encode(f64::from(v)).unwrap())
                .collect();
            let r = eval_fixed(fm, &enc).unwrap();
            let want: Vec<f64> = r
                .signed_logits(0)
                .unwrap()
                .iter()
                .map(|&v| v as f64 / 4096.0)
                .collect();
            assert_eq!(l, &want);
            assert_eq!(*lab, r.labels[0]);
            // multiples of 2^-f
            assert!(l.iter().all(|v| (v * 4096.0).fract() == 0.0));
        }
        assert_eq!(o.stats().rows, 14);
        assert_eq!(o.stats().wrapped_rows, 0);
    }

    #[test]
    fn f32_oracle_matches_forward() {
        let m = tiny();
        let mut o = LocalF32Oracle::new(m.clone(), Policy::undefended());
        let xs = rows(4);
        let l = o.logits(&xs).unwrap();
        let x = Array2::from_shape_vec((4, 3), xs.concat()).unwrap();
        let y = m.forward_f32(x.view()).unwrap();
        for (r, row) in l.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                assert_eq!(*v, f64::from(y[(r, c)]));
            }
        }
        assert_eq!(o.queries(), 4);
    }

    #[test]
    fn labels_only_refuses_logits_without_charging() {
        let mut o = LocalFixedOracle::new(tiny(), Policy::defended(100));
        assert_eq!(o.mode(), OutputMode::Labels);
        assert_eq!(o.logits(&rows(3)), Err(OracleError::LabelsOnly));
        assert_eq!(o.queries(), 0);
        assert_eq!(o.labels(&rows(3)).unwrap().len(), 3);
        assert_eq!(o.queries(), 3);
        let p = query_logits(&mut o, &rows(2));
        assert_eq!(p.error, Some(OracleError::LabelsOnly));
        assert_eq!(o.queries(), 3);
    }

    #[test]
    fn budget_is_enforced_per_batch_and_helpers_use_the_remainder() {
        let mut policy = Policy::defended(10);
        policy.max_batch = 4;
        let mut o = LocalF32Oracle::new(tiny(), policy);
        // A batch over the limit is refused whole, nothing charged.
        assert!(matches!(
            o.labels(&rows(5)),
            Err(OracleError::BadInput { .. })
        ));
        assert_eq!(o.labels(&rows(4)).unwrap().len(), 4);
        assert_eq!(o.labels(&rows(4)).unwrap().len(), 4);
        assert_eq!(
            o.labels(&rows(4)),
            Err(OracleError::BudgetExhausted {
                used: 8,
                budget: 10
            })
        );
        assert_eq!(o.queries(), 8);
        assert_eq!(o.remaining(), Some(2));
        // The helper spends the last 2 rows, then reports the exhaustion.
        let p = query_labels(&mut o, &rows(5));
        assert_eq!(p.results.len(), 2);
        assert_eq!(
            p.error,
            Some(OracleError::BudgetExhausted {
                used: 10,
                budget: 10
            })
        );
        assert_eq!(o.queries(), 10);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut o = LocalFixedOracle::new(tiny(), Policy::undefended());
        assert!(matches!(
            o.labels(&[vec![0.5; 2]]),
            Err(OracleError::BadInput { row: 0, .. })
        ));
        assert!(matches!(
            o.labels(&[vec![0.5; 3], vec![0.5, 1.5, 0.0]]),
            Err(OracleError::BadInput { row: 1, .. })
        ));
        assert!(matches!(
            o.labels(&[vec![f32::NAN, 0.0, 0.0]]),
            Err(OracleError::BadInput { .. })
        ));
        assert_eq!(o.queries(), 0);
    }

    #[test]
    fn wrap_around_is_counted() {
        // l = 26, f = 12: a weight of 1000 on inputs near 1 overflows the ring.
        let arch = Architecture::mlp(&[2], &[1], 2).unwrap();
        let t = |s: Vec<usize>, v: Vec<f32>| Tensor::new(s, v).unwrap();
        let params = vec![
            vec![t(vec![1, 2], vec![1000.0, 1000.0]), t(vec![1], vec![0.0])],
            Vec::new(),
            vec![t(vec![2, 1], vec![1.0, -1.0]), t(vec![2], vec![0.0, 0.0])],
        ];
        let m = Model::new(arch, params, FixedPoint::new(26, 12).unwrap()).unwrap();
        let mut o = LocalFixedOracle::new(m, Policy::undefended());
        o.logits(&[vec![0.0, 0.0], vec![1.0, 1.0], vec![0.001, 0.0]])
            .unwrap();
        let s = o.stats();
        assert_eq!(s.rows, 3);
        assert_eq!(s.wrapped_rows, 1);
        assert!(s.wrapped_accumulators >= 1);
    }
}
