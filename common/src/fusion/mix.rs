//! Mixing a batch (Fusion, client side): T public rows and R copies of each of B own
//! inputs, in a uniformly random order that only the client knows.
//!
//! ```text
//!   own inputs x_0 .. x_{B-1}      public pool (indices, labels; digest checked)
//!        |  R copies each                 |  T drawn uniformly without replacement
//!        +---------------+----------------+
//!                        v
//!         T + R*B rows, shuffled by a secret uniform permutation (OS randomness)
//!                        v
//!         the secure-inference batch; the permutation never leaves the client
//! ```
//!
//! The plan (which row is which) is secret: it is zeroized on drop and not printed.

use rand::seq::{SliceRandom, index};
use rand::{CryptoRng, Rng};
use zeroize::Zeroize;

/// Errors of building a mixed batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MixError {
    /// More public rows requested than the pool holds.
    #[error("{requested} public rows requested but the pool holds only {pool}")]
    PoolTooSmall {
        /// T
        requested: usize,
        /// pool size
        pool: usize,
    },
    /// B = 0 or R = 0.
    #[error("a batch needs at least one own input and one copy (B = {b}, R = {r})")]
    Empty {
        /// own inputs
        b: usize,
        /// copies
        r: usize,
    },
    /// The own inputs given do not match the plan's B.
    #[error("the plan is for {expected} own inputs, got {actual}")]
    CountMismatch {
        /// B of the plan
        expected: usize,
        /// inputs given
        actual: usize,
    },
}

/// What a row of the batch is, as only the client knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// the j-th drawn public sample (see [`MixPlan::public_positions`])
    Public(usize),
    /// copy `copy` of own input `sample`
    Own {
        /// index among the B own inputs
        sample: usize,
        /// which of the R copies
        copy: usize,
    },
}

/// The secret layout of one mixed batch.
pub struct MixPlan {
    t: usize,
    r: usize,
    b: usize,
    /// positions in the public pool of the T drawn samples
    public: Vec<usize>,
    /// row i of the batch is item order[i]: v < T is public sample v, otherwise own
    /// sample (v - T) / R, copy (v - T) % R
    order: Vec<usize>,
}

impl std::fmt::Debug for MixPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MixPlan")
            .field("t", &self.t)
            .field("r", &self.r)
            .field("b", &self.b)
            .field("order", &"[redacted]")
            .finish()
    }
}

impl Drop for MixPlan {
    fn drop(&mut self) {
        self.public.zeroize();
        self.order.zeroize();
    }
}

impl MixPlan {
    /// Draws T public samples from a pool of `pool_len` and a uniform secret order of the
    /// T + R*B rows. Pass the OS CSPRNG in the product (`rand::rngs::OsRng`-backed).
    pub fn new<G: Rng + CryptoRng + ?Sized>(
        b: usize,
        t: usize,
        r: usize,
        pool_len: usize,
        rng: &mut G,
    ) -> Result<Self, MixError> {
        if b == 0 || r == 0 {
            return Err(MixError::Empty { b, r });
        }
        if t > pool_len {
            return Err(MixError::PoolTooSmall {
                requested: t,
                pool: pool_len,
            });
        }
        let public = index::sample(rng, pool_len, t).into_vec();
        let mut order: Vec<usize> = (0..t + r * b).collect();
        order.shuffle(rng); // Fisher-Yates with unbiased uniform draws
        Ok(Self {
            t,
            r,
            b,
            public,
            order,
        })
    }

    /// T, the public rows.
    pub fn t(&self) -> usize {
        self.t
    }

    /// R, the copies of each own input.
    pub fn r(&self) -> usize {
        self.r
    }

    /// B, the own inputs.
    pub fn b(&self) -> usize {
        self.b
    }

    /// T + R*B.
    pub fn rows(&self) -> usize {
        self.order.len()
    }

    /// The pool positions of the drawn public samples.
    pub fn public_positions(&self) -> &[usize] {
        &self.public
    }

    /// What row `i` of the batch is.
    pub fn origin(&self, i: usize) -> Origin {
        let v = self.order[i];
        if v < self.t {
            Origin::Public(v)
        } else {
            let k = v - self.t;
            Origin::Own {
                sample: k / self.r,
                copy: k % self.r,
            }
        }
    }

    /// The batch's rows in the secret order: `own[s]` for own rows, `public(pos)` for the
    /// public sample at pool position `pos`.
    pub fn assemble<I: Clone>(
        &self,
        own: &[I],
        mut public: impl FnMut(usize) -> I,
    ) -> Result<Vec<I>, MixError> {
        if own.len() != self.b {
            return Err(MixError::CountMismatch {
                expected: self.b,
                actual: own.len(),
            });
        }
        let drawn: Vec<I> = self.public.iter().map(|&p| public(p)).collect();
        Ok((0..self.rows())
            .map(|i| match self.origin(i) {
                Origin::Public(j) => drawn[j].clone(),
                Origin::Own { sample, .. } => own[sample].clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;

    #[test]
    fn every_item_appears_once_and_assembly_matches_origins() {
        let mut rng = ChaCha12Rng::seed_from_u64(7);
        let plan = MixPlan::new(4, 5, 3, 100, &mut rng).unwrap();
        assert_eq!(plan.rows(), 17);
        let mut seen_public = [0; 5];
        let mut seen_own = [[0; 3]; 4];
        for i in 0..plan.rows() {
            match plan.origin(i) {
                Origin::Public(j) => seen_public[j] += 1,
                Origin::Own { sample, copy } => seen_own[sample][copy] += 1,
            }
        }
        assert!(seen_public.iter().all(|&c| c == 1));
        assert!(seen_own.iter().flatten().all(|&c| c == 1));
        let mut pos = plan.public_positions().to_vec();
        pos.sort_unstable();
        pos.dedup();
        assert_eq!(pos.len(), 5, "public samples are distinct");

        let own = ["a", "b", "c", "d"];
        let rows = plan
            .assemble(&own, |p| if p < 50 { "lo" } else { "hi" })
            .unwrap();
        for (i, row) in rows.iter().enumerate() {
            match plan.origin(i) {
                Origin::Own { sample, .. } => assert_eq!(*row, own[sample]),
                Origin::Public(j) => {
                    let p = plan.public_positions()[j];
                    assert_eq!(*row, if p < 50 { "lo" } else { "hi" });
                }
            }
        }
        assert!(format!("{plan:?}").contains("redacted"));
    }

    #[test]
    fn order_is_uniform_enough() {
        // Where does own sample 0, copy 0 land among 1 + 2*2 = 5 rows? Each position
        // about 1/5 of the time (a loose chi-square bound; seeded so it cannot flake).
        let mut rng = ChaCha12Rng::seed_from_u64(11);
        let mut counts = [0u32; 5];
        let n = 20_000;
        for _ in 0..n {
            let plan = MixPlan::new(2, 1, 2, 10, &mut rng).unwrap();
            let i = (0..5)
                .find(|&i| plan.origin(i) == Origin::Own { sample: 0, copy: 0 })
                .unwrap();
            counts[i] += 1;
        }
        let e = n as f64 / 5.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert!(chi2 < 20.0, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn refusals() {
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        assert_eq!(
            MixPlan::new(1, 11, 1, 10, &mut rng).unwrap_err(),
            MixError::PoolTooSmall {
                requested: 11,
                pool: 10
            }
        );
        assert!(matches!(
            MixPlan::new(0, 1, 1, 10, &mut rng),
            Err(MixError::Empty { .. })
        ));
        let plan = MixPlan::new(2, 1, 1, 10, &mut rng).unwrap();
        assert!(matches!(
            plan.assemble(&[1], |_| 0),
            Err(MixError::CountMismatch { .. })
        ));
    }
}
