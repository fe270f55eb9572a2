//! The exact escape probability of a cheating server, and the cheapest (T, R) for a target.
//!
//! A batch has N = T + R*B rows in a uniformly random secret order: T public rows whose
//! results the client knows, and R copies of each of the client's B own inputs (a *group*).
//! The server picks a set S of k rows whose results it alters. It escapes detection only
//! if S contains no public row (check (a)) and S is a union of whole groups (check (b):
//! a partly altered group has copies that disagree). Because the order is a uniform
//! secret permutation, S's positions are, from the server's view, a uniform k-subset of
//! the rows, so
//!
//! ```text
//!   P(escape | k) = C(B, k/R) / C(N, k)   if R divides k,
//!                 = 0                       otherwise (some group is altered in part).
//! ```
//!
//! Altering fewer rows than a group (0 < k < R) is thus always caught, and the server's
//! best strategy is the m = k/R in 1..=B that maximises C(B, m) / C(N, R*m). Everything
//! here is computed with exact big integers; only the final logarithm is a float.

use num_bigint::BigUint;
use num_traits::{One, ToPrimitive, Zero};

/// Errors of the tuner.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TuneError {
    /// The batch has no own inputs or no copies.
    #[error("batch size B and repetitions R must be at least 1 (B = {b}, R = {r})")]
    Empty {
        /// own inputs
        b: usize,
        /// repetitions
        r: usize,
    },
    /// No (T, R) within the row limit meets the target.
    #[error("no (T, R) with at most {max_rows} rows meets an escape bound of 2^{target_log2:.2}")]
    Unreachable {
        /// the row limit searched
        max_rows: usize,
        /// the target, log2
        target_log2: f64,
    },
    /// A target that is not a probability in (0, 1].
    #[error("target escape probability must be in (0, 1], got {0}")]
    BadTarget(f64),
}

/// An exact non-negative rational number num/den.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ratio {
    /// numerator
    pub num: BigUint,
    /// denominator (non-zero)
    pub den: BigUint,
}

impl Ratio {
    /// log2 of the ratio (-inf for zero).
    pub fn log2(&self) -> f64 {
        if self.num.is_zero() {
            return f64::NEG_INFINITY;
        }
        log2_big(&self.num) - log2_big(&self.den)
    }

    /// The ratio as an f64 (0.0 when it underflows; use [`Ratio::log2`] then).
    pub fn to_f64(&self) -> f64 {
        self.log2().exp2()
    }

    /// num1/den1 <= num2/den2, exactly.
    pub fn le(&self, other: &Ratio) -> bool {
        &self.num * &other.den <= &other.num * &self.den
    }
}

/// log2 of a positive big integer, to double precision.
fn log2_big(x: &BigUint) -> f64 {
    let bits = x.bits();
    if bits <= 1000 {
        return x.to_f64().map_or(f64::INFINITY, f64::log2);
    }
    // Keep the top 64 bits: x = top * 2^shift with top in [2^63, 2^64).
    let shift = bits - 64;
    let top = (x >> shift).to_f64().unwrap_or(f64::MAX);
    top.log2() + shift as f64
}

/// C(n, k) exactly.
pub fn binomial(n: u64, k: u64) -> BigUint {
    if k > n {
        return BigUint::zero();
    }
    let k = k.min(n - k);
    let mut acc = BigUint::one();
    for i in 0..k {
        acc *= n - i;
        acc /= i + 1; // exact: C(n, i) (n - i) = (i + 1) C(n, i + 1)
    }
    acc
}

/// The escape probability of altering m whole groups, C(B, m) / C(T + R*B, R*m).
pub fn escape_whole_groups(t: usize, r: usize, b: usize, m: usize) -> Ratio {
    let n = (t + r * b) as u64;
    Ratio {
        num: binomial(b as u64, m as u64),
        den: binomial(n, (r * m) as u64),
    }
}

/// The escape probability of altering exactly k rows (any k): zero unless R divides k.
pub fn escape_rows(t: usize, r: usize, b: usize, k: usize) -> Ratio {
    if k == 0 {
        return Ratio {
            num: BigUint::one(),
            den: BigUint::one(),
        };
    }
    if !k.is_multiple_of(r) || k / r > b {
        return Ratio {
            num: BigUint::zero(),
            den: BigUint::one(),
        };
    }
    escape_whole_groups(t, r, b, k / r)
}

/// The server's best strategy for (T, R, B): the maximising m and its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct WorstCase {
    /// groups altered by the best strategy
    pub m: usize,
    /// its escape probability, exactly
    pub escape: Ratio,
}

/// max over m in 1..=B of C(B, m) / C(T + R*B, R*m), exactly.
///
/// A double-precision screen (log-factorials by summation, absolute error far below 0.01)
/// finds the m whose log-probability is within 2 nats of the largest; those few are then
/// compared with exact big integers, so the maximiser and its value are exact.
pub fn worst_case(t: usize, r: usize, b: usize) -> Result<WorstCase, TuneError> {
    if b == 0 || r == 0 {
        return Err(TuneError::Empty { b, r });
    }
    let n = t + r * b;
    let mut ln_fact = Vec::with_capacity(n + 1);
    let mut acc = 0.0f64;
    ln_fact.push(0.0);
    for i in 1..=n {
        acc += (i as f64).ln();
        ln_fact.push(acc);
    }
    let ln_c = |n: usize, k: usize| ln_fact[n] - ln_fact[k] - ln_fact[n - k];
    let approx: Vec<f64> = (1..=b).map(|m| ln_c(b, m) - ln_c(n, r * m)).collect();
    let top = approx.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut best: Option<WorstCase> = None;
    for (i, _) in approx.iter().enumerate().filter(|(_, a)| **a >= top - 2.0) {
        let m = i + 1;
        let cand = escape_whole_groups(t, r, b, m);
        if best.as_ref().is_none_or(|w| !cand.le(&w.escape)) {
            best = Some(WorstCase { m, escape: cand });
        }
    }
    // The screen always keeps its own maximum, so `best` is set.
    best.ok_or(TuneError::Empty { b, r })
}

/// One candidate parameter choice for a batch of B own inputs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Choice {
    /// own inputs
    #[serde(rename = "B")]
    pub b: usize,
    /// public rows
    #[serde(rename = "T")]
    pub t: usize,
    /// copies of each own input
    #[serde(rename = "R")]
    pub r: usize,
    /// rows in the batch, T + R*B
    pub rows: usize,
    /// the worst-case escape probability (as a float; 0 if it underflows)
    pub escape: f64,
    /// its log2, exact to double precision
    pub log2_escape: f64,
    /// the number of groups the best cheating strategy alters
    pub worst_m: usize,
    /// row overhead, (T + R*B) / B
    pub overhead: f64,
}

impl Choice {
    fn new(t: usize, r: usize, b: usize, wc: &WorstCase) -> Self {
        let rows = t + r * b;
        Self {
            b,
            t,
            r,
            rows,
            escape: wc.escape.to_f64(),
            log2_escape: wc.escape.log2(),
            worst_m: wc.m,
            overhead: rows as f64 / b as f64,
        }
    }
}

/// The smallest T (for this R) whose worst case is at most 2^target_log2, by bisection on T
/// (the escape probability does not increase with T), within `max_rows`.
fn smallest_t(r: usize, b: usize, target: &Ratio, max_rows: usize) -> Option<(usize, WorstCase)> {
    let fixed = r.checked_mul(b)?;
    if fixed > max_rows {
        return None;
    }
    let meets = |t: usize| worst_case(t, r, b).ok().filter(|wc| wc.escape.le(target));
    let hi_t = max_rows - fixed;
    let mut best = meets(hi_t).map(|wc| (hi_t, wc))?;
    let (mut lo, mut hi) = (0usize, hi_t); // invariant: hi meets the target
    if let Some(wc) = meets(0) {
        return Some((0, wc));
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match meets(mid) {
            Some(wc) => {
                hi = mid;
                best = (mid, wc);
            }
            None => lo = mid,
        }
    }
    Some(best)
}

/// The target probability as an exact ratio (an f64 is a dyadic rational).
fn target_ratio(target: f64) -> Ratio {
    use num_traits::float::FloatCore;
    let (mantissa, exponent, _sign) = FloatCore::integer_decode(target);
    let mantissa = BigUint::from(mantissa);
    if exponent >= 0 {
        Ratio {
            num: mantissa << exponent as u32,
            den: BigUint::one(),
        }
    } else {
        Ratio {
            num: mantissa,
            den: BigUint::one() << (-exponent) as u32,
        }
    }
}

/// For every R in 1..=max_r, the cheapest T meeting `target` (an escape probability in
/// (0, 1]) within `max_rows`; sorted by rows. The first entry is the cheapest choice.
pub fn alternatives(
    b: usize,
    target: f64,
    max_rows: usize,
    max_r: usize,
) -> Result<Vec<Choice>, TuneError> {
    if b == 0 {
        return Err(TuneError::Empty { b, r: 1 });
    }
    if !(target > 0.0 && target <= 1.0) {
        return Err(TuneError::BadTarget(target));
    }
    let tl = target.log2();
    let tr = target_ratio(target);
    let mut out: Vec<Choice> = (1..=max_r)
        .filter_map(|r| smallest_t(r, b, &tr, max_rows).map(|(t, wc)| Choice::new(t, r, b, &wc)))
        .collect();
    if out.is_empty() {
        return Err(TuneError::Unreachable {
            max_rows,
            target_log2: tl,
        });
    }
    out.sort_by(|x, y| x.rows.cmp(&y.rows).then(x.r.cmp(&y.r)));
    Ok(out)
}

/// The exact figures for given (T, R, B).
pub fn evaluate(t: usize, r: usize, b: usize) -> Result<Choice, TuneError> {
    let wc = worst_case(t, r, b)?;
    Ok(Choice::new(t, r, b, &wc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomials() {
        assert_eq!(binomial(5, 2), BigUint::from(10u32));
        assert_eq!(binomial(5, 0), BigUint::one());
        assert_eq!(binomial(5, 6), BigUint::zero());
        assert_eq!(binomial(60, 30), BigUint::from(118_264_581_564_861_424u64));
    }

    #[test]
    fn hand_computed_case() {
        // T = 1, R = 2, B = 3: N = 7 rows.
        // m = 1: C(3,1)/C(7,2) = 3/21 = 1/7; m = 2: C(3,2)/C(7,4) = 3/35; m = 3: 1/C(7,6) = 1/7.
        let wc = worst_case(1, 2, 3).unwrap();
        assert_eq!(wc.escape.num * 7u32, wc.escape.den);
        assert_eq!(wc.m, 1, "ties keep the smallest m");
        let e2 = escape_whole_groups(1, 2, 3, 2);
        assert!(e2.le(&Ratio {
            num: BigUint::from(3u32),
            den: BigUint::from(35u32)
        }));
        assert!((evaluate(1, 2, 3).unwrap().escape - 1.0 / 7.0).abs() < 1e-15);
        // Partial groups never escape; altering nothing trivially does.
        assert!(escape_rows(1, 2, 3, 3).num.is_zero());
        assert!(escape_rows(1, 2, 3, 1).num.is_zero());
        assert_eq!(escape_rows(1, 2, 3, 0).to_f64(), 1.0);
    }

    #[test]
    fn screened_maximum_equals_exhaustive_maximum() {
        for t in [0, 1, 3, 10, 40] {
            for r in 1..=5 {
                for b in 1..=12 {
                    let wc = worst_case(t, r, b).unwrap();
                    let mut best = (1, escape_whole_groups(t, r, b, 1));
                    for m in 2..=b {
                        let c = escape_whole_groups(t, r, b, m);
                        if !c.le(&best.1) {
                            best = (m, c);
                        }
                    }
                    assert_eq!((wc.m, &wc.escape), (best.0, &best.1), "T={t} R={r} B={b}");
                }
            }
        }
    }

    #[test]
    fn no_public_rows_means_altering_everything_escapes() {
        // T = 0: the server alters every row consistently.
        let wc = worst_case(0, 3, 5).unwrap();
        assert_eq!(wc.m, 5);
        assert_eq!(wc.escape.to_f64(), 1.0);
    }

    #[test]
    fn large_parameters_stay_exact_in_log_space() {
        // B = 1000, R = 3, T = 200: log2 escape is far below any f64 subnormal.
        let c = evaluate(200, 3, 1000).unwrap();
        let direct = escape_whole_groups(200, 3, 1000, 1).log2();
        assert!((c.log2_escape - direct).abs() < 1e-9, "{c:?} vs {direct}");
        assert!(c.log2_escape < -20.0);
    }

    #[test]
    fn cheapest_choice_meets_target_and_is_minimal() {
        let b = 10;
        let alts = alternatives(b, 2f64.powi(-20), 2000, 6).unwrap();
        let best = &alts[0];
        assert!(best.log2_escape <= -20.0);
        // One fewer public row would miss the target.
        if best.t > 0 {
            let worse = evaluate(best.t - 1, best.r, b).unwrap();
            assert!(worse.log2_escape > -20.0);
        }
        for w in alts.windows(2) {
            assert!(w[0].rows <= w[1].rows);
        }
    }

    #[test]
    fn refusals() {
        assert!(matches!(worst_case(1, 0, 3), Err(TuneError::Empty { .. })));
        assert!(matches!(
            alternatives(3, 0.0, 100, 3),
            Err(TuneError::BadTarget(_))
        ));
        assert!(matches!(
            alternatives(100, 1e-30, 50, 2),
            Err(TuneError::Unreachable { .. })
        ));
    }
}
