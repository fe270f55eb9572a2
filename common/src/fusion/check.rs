//! Checking a mixed batch's results (Fusion, client side).
//!
//! After the secure inference the client un-shuffles the T + R*B results with its secret
//! [`MixPlan`] and checks, in this order:
//!
//! - (a) every public row's label equals the label the server published for that pool
//!   entry (bound to the model by the pool digest);
//! - (b) the R copies of each own input gave identical results;
//! - (c) the accuracy of the published labels over the whole public pool (P entries)
//!   against the true labels is not significantly below the accuracy the server claims:
//!   an exact one-sided binomial test, P[Bin(P, claimed) <= correct] >= 1 - confidence.
//!
//! Why (c) tests the whole pool and not the batch's T public rows: once (a) holds, the
//! batch's public rows carry exactly the published labels, so their accuracy is that of a
//! random subsample of the pool's published labels, which the client has in full. A test
//! on the T sampled rows saw a fraction T/P of the evidence and, its outcome depending on
//! the batch's random draw, flagged an honest server with probability up to
//! 1 - confidence in every batch (and a flagged server is distrusted for good); the test
//! on the pool is deterministic: an honest server whose claim is its accuracy on the pool
//! (what `fusion-server serve` announces by default) always passes, and a server whose
//! published labels fall short of its claim fails in every batch.
//!
//! Any failure returns a [`CheckError`] naming the check and the number of rows; no result
//! of that batch is released.

use super::mix::{MixPlan, Origin};

/// A result row that has a label (a label itself, or logits whose first argmax is one).
pub trait RowOutput: Clone + PartialEq {
    /// The top-1 label of this row.
    fn label(&self) -> usize;
}

impl RowOutput for usize {
    fn label(&self) -> usize {
        *self
    }
}

impl RowOutput for u8 {
    fn label(&self) -> usize {
        usize::from(*self)
    }
}

impl RowOutput for Vec<i64> {
    /// First argmax, as the fixed-point evaluator defines it.
    fn label(&self) -> usize {
        let mut best = 0;
        for (i, v) in self.iter().enumerate() {
            if *v > self[best] {
                best = i;
            }
        }
        best
    }
}

/// What the client expects of the public rows.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// the server's published label for each pool position (digest already verified)
    pub pool_labels: &'a [u8],
    /// the true label of each pool position (public data set)
    pub pool_truth: &'a [u8],
    /// the accuracy the server claims for its model, in [0, 1]
    pub claimed_accuracy: f64,
    /// confidence of check (c), e.g. 0.999: a server whose claim is a population accuracy
    /// (not its pool accuracy) is flagged only if its published pool labels are below the
    /// claim at this confidence
    pub confidence: f64,
}

/// Why a batch was rejected: the server misbehaved. ((c) depends on the pool only: an
/// honest server claiming a population accuracy fails it only if its public pool is
/// unluckily bad, with probability at most 1 - confidence over the pool's draw.)
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The batch has the wrong number of results.
    #[error("the server returned {actual} results for a batch of {expected} rows")]
    CountMismatch {
        /// rows sent
        expected: usize,
        /// results received
        actual: usize,
    },
    /// A public position outside the pool (a client-side inconsistency).
    #[error("pool position {position} outside a pool of {pool}")]
    PoolPosition {
        /// the position
        position: usize,
        /// pool size
        pool: usize,
    },
    /// Check (a).
    #[error("check (a) failed: {rows} of {of} public rows differ from the published labels")]
    PublicMismatch {
        /// public rows with a wrong label
        rows: usize,
        /// public rows in the batch (T)
        of: usize,
    },
    /// Check (b).
    #[error(
        "check (b) failed: the copies of {samples} of {of} own inputs disagree ({rows} rows involved)"
    )]
    CopiesDisagree {
        /// own inputs whose copies disagree
        samples: usize,
        /// own inputs in the batch (B)
        of: usize,
        /// rows of those inputs (R each)
        rows: usize,
    },
    /// Check (c).
    #[error(
        "check (c) failed: {correct} of the {of} published pool labels are correct, below the claimed accuracy {claimed:.4} (p = {p_value:.3e})"
    )]
    AccuracyBelowClaim {
        /// pool entries whose published label is the true label
        correct: usize,
        /// pool entries (P)
        of: usize,
        /// the server's claim
        claimed: f64,
        /// P[Bin(P, claimed) <= correct]
        p_value: f64,
    },
}

impl CheckError {
    /// A short name of the failed check, for reports and exit messages.
    pub fn check_name(&self) -> &'static str {
        match self {
            Self::PublicMismatch { .. } => "a: public rows",
            Self::CopiesDisagree { .. } => "b: copies agree",
            Self::AccuracyBelowClaim { .. } => "c: accuracy",
            Self::CountMismatch { .. } | Self::PoolPosition { .. } => "batch shape",
        }
    }
}

/// The verified results: one per own input, in the order the inputs were given.
/// `Debug` shows how many there are, not the results (the client's own, like
/// [`crate::backend::BatchOutput`]'s).
#[derive(Clone, PartialEq)]
pub struct Verified<O> {
    /// result of own input s
    pub outputs: Vec<O>,
    /// the batch's public rows whose label was the true label (for the record)
    pub public_correct: usize,
    /// pool entries whose published label is the true label (check (c))
    pub pool_correct: usize,
    /// pool entries (P)
    pub pool_size: usize,
    /// the p-value of check (c), P[Bin(P, claimed) <= pool_correct]
    pub p_value: f64,
}

impl<O> std::fmt::Debug for Verified<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field(
                "outputs",
                &format_args!("[{} redacted]", self.outputs.len()),
            )
            .field("public_correct", &self.public_correct)
            .field("pool_correct", &self.pool_correct)
            .field("pool_size", &self.pool_size)
            .field("p_value", &self.p_value)
            .finish()
    }
}

/// Runs checks (a), (b), (c) on the results of a batch assembled with `plan`.
pub fn check<O: RowOutput>(
    plan: &MixPlan,
    results: &[O],
    exp: &Expectations<'_>,
) -> Result<Verified<O>, CheckError> {
    if results.len() != plan.rows() {
        return Err(CheckError::CountMismatch {
            expected: plan.rows(),
            actual: results.len(),
        });
    }
    let pool = exp.pool_labels.len().min(exp.pool_truth.len());
    let positions = plan.public_positions();
    if let Some(&p) = positions.iter().find(|&&p| p >= pool) {
        return Err(CheckError::PoolPosition { position: p, pool });
    }

    // Un-shuffle.
    let mut own: Vec<Vec<Option<&O>>> = vec![vec![None; plan.r()]; plan.b()];
    let mut public_wrong = 0;
    let mut public_correct = 0;
    for (i, out) in results.iter().enumerate() {
        match plan.origin(i) {
            Origin::Public(j) => {
                let p = positions[j];
                let label = out.label();
                if label != usize::from(exp.pool_labels[p]) {
                    public_wrong += 1;
                }
                if label == usize::from(exp.pool_truth[p]) {
                    public_correct += 1;
                }
            }
            Origin::Own { sample, copy } => own[sample][copy] = Some(out),
        }
    }

    // (a)
    if public_wrong > 0 {
        return Err(CheckError::PublicMismatch {
            rows: public_wrong,
            of: plan.t(),
        });
    }

    // (b)
    let mut outputs = Vec::with_capacity(plan.b());
    let mut disagree = 0;
    for copies in &own {
        let first = copies[0];
        if copies.iter().any(|c| *c != first) {
            disagree += 1;
        }
        if let Some(o) = first {
            outputs.push(o.clone());
        }
    }
    if disagree > 0 {
        return Err(CheckError::CopiesDisagree {
            samples: disagree,
            of: plan.b(),
            rows: disagree * plan.r(),
        });
    }

    // (c), over the whole pool (see the module documentation)
    let pool_correct = exp.pool_labels[..pool]
        .iter()
        .zip(&exp.pool_truth[..pool])
        .filter(|(a, b)| a == b)
        .count();
    let p_value = binomial_cdf(pool, exp.claimed_accuracy, pool_correct);
    if pool > 0 && p_value < 1.0 - exp.confidence {
        return Err(CheckError::AccuracyBelowClaim {
            correct: pool_correct,
            of: pool,
            claimed: exp.claimed_accuracy,
            p_value,
        });
    }

    Ok(Verified {
        outputs,
        public_correct,
        pool_correct,
        pool_size: pool,
        p_value,
    })
}

/// P[Bin(n, p) <= k], summed in log space (exact to double precision for n up to millions).
pub fn binomial_cdf(n: usize, p: f64, k: usize) -> f64 {
    if k >= n {
        return 1.0;
    }
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0; // k < n successes are impossible
    }
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    // ln C(n, i) built up incrementally.
    let mut ln_c = 0.0f64;
    let mut terms = Vec::with_capacity(k + 1);
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(ln_c + i as f64 * lp + (n - i) as f64 * lq);
    }
    let m = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = terms.iter().map(|t| (t - m).exp()).sum();
    (m + s.ln()).exp().min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;

    #[test]
    fn verified_debug_shows_no_result() {
        let v = Verified {
            outputs: vec![987_654_321u64, 123_456_789],
            public_correct: 3,
            pool_correct: 4,
            pool_size: 5,
            p_value: 0.5,
        };
        let d = format!("{v:?}");
        assert!(!d.contains("987654321") && !d.contains("123456789"), "{d}");
        assert!(
            d.contains("[2 redacted]") && d.contains("pool_size: 5"),
            "{d}"
        );
    }

    /// A plan, the honest results for it (label = pool position % 10 for public rows,
    /// `own[s]` for own rows), and the pool.
    fn setup(b: usize, t: usize, r: usize, seed: u64) -> (MixPlan, Vec<usize>, Vec<u8>) {
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        let pool: Vec<u8> = (0..50u8).map(|i| i % 10).collect();
        let plan = MixPlan::new(b, t, r, pool.len(), &mut rng).unwrap();
        let own: Vec<usize> = (0..b).map(|s| (s * 3) % 10).collect();
        let rows = plan.assemble(&own, |p| usize::from(pool[p])).unwrap();
        (plan, rows, pool)
    }

    fn exp(pool: &[u8]) -> Expectations<'_> {
        Expectations {
            pool_labels: pool,
            pool_truth: pool,
            claimed_accuracy: 0.98,
            confidence: 0.999,
        }
    }

    #[test]
    fn honest_results_pass_and_come_back_in_input_order() {
        let (plan, rows, pool) = setup(6, 8, 3, 1);
        let v = check(&plan, &rows, &exp(&pool)).unwrap();
        assert_eq!(v.outputs, (0..6).map(|s| (s * 3) % 10).collect::<Vec<_>>());
        assert_eq!(v.public_correct, 8);
    }

    #[test]
    fn each_check_names_itself() {
        let (plan, rows, pool) = setup(6, 8, 3, 2);
        // (a): alter one public row.
        let i = (0..plan.rows())
            .find(|&i| matches!(plan.origin(i), Origin::Public(_)))
            .unwrap();
        let mut bad = rows.clone();
        bad[i] = (bad[i] + 1) % 10;
        assert_eq!(
            check(&plan, &bad, &exp(&pool)).unwrap_err(),
            CheckError::PublicMismatch { rows: 1, of: 8 }
        );
        // (b): alter one copy of an own input.
        let i = (0..plan.rows())
            .find(|&i| matches!(plan.origin(i), Origin::Own { copy: 1, .. }))
            .unwrap();
        let mut bad = rows.clone();
        bad[i] = (bad[i] + 1) % 10;
        let e = check(&plan, &bad, &exp(&pool)).unwrap_err();
        assert_eq!(
            e,
            CheckError::CopiesDisagree {
                samples: 1,
                of: 6,
                rows: 3
            }
        );
        assert_eq!(e.check_name(), "b: copies agree");
        // Altering a whole group consistently escapes (a) and (b) by design.
        let sample = match plan.origin(i) {
            Origin::Own { sample, .. } => sample,
            Origin::Public(_) => unreachable!(),
        };
        let mut bad = rows.clone();
        for (k, row) in bad.iter_mut().enumerate() {
            if matches!(plan.origin(k), Origin::Own { sample: s, .. } if s == sample) {
                *row = (*row + 1) % 10;
            }
        }
        assert!(check(&plan, &bad, &exp(&pool)).is_ok());
        // Wrong count.
        assert!(matches!(
            check(&plan, &rows[1..], &exp(&pool)),
            Err(CheckError::CountMismatch { .. })
        ));
    }

    #[test]
    fn accuracy_check_flags_a_model_worse_than_claimed() {
        // Published labels agree with the results, but half of them are not the truth.
        let (plan, rows, pool) = setup(2, 40, 2, 3);
        let truth: Vec<u8> = pool
            .iter()
            .enumerate()
            .map(|(i, &l)| if i % 2 == 0 { l } else { (l + 1) % 10 })
            .collect();
        let e = Expectations {
            pool_truth: &truth,
            ..exp(&pool)
        };
        let err = check(&plan, &rows, &e).unwrap_err();
        assert!(
            matches!(
                err,
                CheckError::AccuracyBelowClaim {
                    correct: 25,
                    of: 50,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.check_name(), "c: accuracy");
    }

    #[test]
    fn accuracy_check_is_the_pools_and_never_flags_a_claim_equal_to_it() {
        // a pool of 1,000 with 15 published labels wrong; the claim is the pool accuracy
        let pool: Vec<u8> = (0..1000).map(|i| (i % 10) as u8).collect();
        let truth: Vec<u8> = pool
            .iter()
            .enumerate()
            .map(|(i, &l)| if i % 67 == 1 { (l + 1) % 10 } else { l })
            .collect();
        assert_eq!(pool.iter().zip(&truth).filter(|(a, b)| a != b).count(), 15);
        let honest = Expectations {
            pool_labels: &pool,
            pool_truth: &truth,
            claimed_accuracy: 0.985,
            confidence: 0.999,
        };
        // every draw passes with the same p-value, whatever its public rows hold
        let mut rng = ChaCha12Rng::seed_from_u64(9);
        let mut drew_wrong = 0;
        for _ in 0..200 {
            let plan = MixPlan::new(2, 8, 2, pool.len(), &mut rng).unwrap();
            let rows = plan.assemble(&[3, 4], |p| usize::from(pool[p])).unwrap();
            let v = check(&plan, &rows, &honest).unwrap();
            assert_eq!((v.pool_correct, v.pool_size), (985, 1000));
            assert!(v.p_value > 0.5);
            drew_wrong += usize::from(v.public_correct < 8);
        }
        assert!(
            drew_wrong > 0,
            "some draws had a wrongly labelled public row"
        );
        // claiming more than the pool shows is flagged in every batch
        let over = Expectations {
            claimed_accuracy: 0.995,
            ..honest
        };
        let plan = MixPlan::new(2, 8, 2, pool.len(), &mut rng).unwrap();
        let rows = plan.assemble(&[3, 4], |p| usize::from(pool[p])).unwrap();
        assert!(matches!(
            check(&plan, &rows, &over),
            Err(CheckError::AccuracyBelowClaim {
                correct: 985,
                of: 1000,
                ..
            })
        ));
    }

    #[test]
    fn logits_rows_use_first_argmax_and_exact_copy_equality() {
        assert_eq!(vec![1i64, 5, 5, -2].label(), 1);
        assert_eq!(vec![-3i64].label(), 0);
    }

    #[test]
    fn binomial_cdf_matches_hand_values() {
        // Bin(3, 0.5): P[<= 1] = 4/8.
        assert!((binomial_cdf(3, 0.5, 1) - 0.5).abs() < 1e-12);
        // Bin(10, 0.9): P[<= 7] = 1 - P[8] - P[9] - P[10] = 0.0701908...
        assert!((binomial_cdf(10, 0.9, 7) - 0.070_190_8).abs() < 1e-6);
        assert_eq!(binomial_cdf(5, 0.3, 5), 1.0);
        assert_eq!(binomial_cdf(5, 1.0, 4), 0.0);
    }
}
