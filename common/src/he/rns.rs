//! Polynomials of Z_Q[X]/(X^N + 1) in RNS form, on `fhe-math`'s modular arithmetic
//! (`zq::Modulus`) and NTT (`ntt::NttOperator`), plus the samplers, the exact-scaling
//! plaintext encoding and the direct modulus switch from Q to a power of two.
//!
//! A polynomial is `k * N` residues, residue row i holding the coefficients (or NTT values)
//! modulo the i-th prime. Values that depend only on public data may take variable time;
//! everything touching the secret key or the client's data uses fhe-math's constant-time
//! operations and branch-free lifts.

use blake3::Hasher;
use rand::{CryptoRng, Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::params::{CBD_PAIRS, DEGREE, HeParams, SwitchConst};

/// A polynomial with `rows` residue rows of N values each.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RnsPoly {
    pub(crate) data: Vec<u64>,
}

impl RnsPoly {
    pub(crate) fn zero(rows: usize) -> Self {
        Self {
            data: vec![0; rows * DEGREE],
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.data.len() / DEGREE
    }

    pub(crate) fn row(&self, i: usize) -> &[u64] {
        &self.data[i * DEGREE..(i + 1) * DEGREE]
    }

    pub(crate) fn row_mut(&mut self, i: usize) -> &mut [u64] {
        &mut self.data[i * DEGREE..(i + 1) * DEGREE]
    }

    /// Coefficients -> NTT values, row by row.
    pub(crate) fn ntt(&mut self, p: &HeParams) {
        for i in 0..self.rows() {
            p.ntt[i].forward(self.row_mut(i));
        }
    }

    /// NTT values -> coefficients, row by row.
    pub(crate) fn intt(&mut self, p: &HeParams) {
        for i in 0..self.rows() {
            p.ntt[i].backward(self.row_mut(i));
        }
    }

    /// self = self * other (pointwise; both in NTT form).
    #[cfg(test)]
    pub(crate) fn mul_assign(&mut self, other: &RnsPoly, p: &HeParams) {
        for i in 0..self.rows() {
            p.q[i].mul_vec(self.row_mut(i), other.row(i));
        }
    }

    /// self = self + other.
    pub(crate) fn add_assign(&mut self, other: &RnsPoly, p: &HeParams) {
        for i in 0..self.rows() {
            p.q[i].add_vec(self.row_mut(i), other.row(i));
        }
    }

    /// self = -self.
    pub(crate) fn neg_assign(&mut self, p: &HeParams) {
        for i in 0..self.rows() {
            p.q[i].neg_vec(self.row_mut(i));
        }
    }

    /// The polynomial with small signed integer coefficients `c` (|c| < every prime).
    pub(crate) fn from_signed(c: &[i64], rows: usize, p: &HeParams) -> Self {
        let mut out = Self::zero(rows);
        for i in 0..rows {
            let m = *p.q[i];
            for (o, &v) in out.row_mut(i).iter_mut().zip(c) {
                *o = lift_signed(v, m);
            }
        }
        out
    }

    /// A uniformly random polynomial (coefficient form) expanded from a public seed, the
    /// domain label and an index; both parties derive the same one.
    pub(crate) fn uniform_from_seed(
        seed: &[u8; 32],
        domain: &str,
        index: u64,
        p: &HeParams,
    ) -> Self {
        let mut h = Hasher::new_derive_key("fusion-common he uniform polynomial v1");
        h.update(domain.as_bytes());
        h.update(&[0]);
        h.update(seed);
        h.update(&index.to_le_bytes());
        let mut prng = ChaCha20Rng::from_seed(*h.finalize().as_bytes());
        let rows = p.q.len();
        let mut out = Self::zero(rows);
        for i in 0..rows {
            let m = *p.q[i];
            let mask = u64::MAX >> (m - 1).leading_zeros();
            for o in out.row_mut(i) {
                *o = loop {
                    // Rejection sampling: exact uniformity, the stream is public.
                    let v = prng.next_u64() & mask;
                    if v < m {
                        break v;
                    }
                };
            }
        }
        out
    }
}

/// x mod m for a signed x with |x| < m, without a data-dependent branch.
#[inline]
pub(crate) fn lift_signed(x: i64, m: u64) -> u64 {
    let v = x as u64;
    let neg = v >> 63; // 1 if x < 0
    v.wrapping_add(m & neg.wrapping_neg())
}

/// Uniform ternary coefficients in {-1, 0, 1}.
pub(crate) fn sample_ternary<R: Rng + CryptoRng + ?Sized>(rng: &mut R) -> Vec<i64> {
    let mut out = Vec::with_capacity(DEGREE);
    while out.len() < DEGREE {
        let mut word = rng.next_u64();
        for _ in 0..32 {
            let two = word & 3;
            word >>= 2;
            // Rejection of 3 keeps {0, 1, 2} uniform; the rejected draws reveal nothing.
            if two != 3 && out.len() < DEGREE {
                out.push(two as i64 - 1);
            }
        }
    }
    out
}

/// Centred binomial errors with CBD_PAIRS coin pairs: |e| <= 21, variance 10.5.
pub(crate) fn sample_cbd<R: Rng + CryptoRng + ?Sized>(rng: &mut R, count: usize) -> Vec<i64> {
    let mask = (1u64 << CBD_PAIRS) - 1;
    (0..count)
        .map(|_| {
            let w = rng.next_u64();
            i64::from((w & mask).count_ones()) - i64::from(((w >> CBD_PAIRS) & mask).count_ones())
        })
        .collect()
}

/// Uniform integer in [-bound, bound] (bound < 2^126), as residues mod each prime.
pub(crate) fn sample_flood<R: Rng + CryptoRng + ?Sized>(
    rng: &mut R,
    bound: u128,
    p: &HeParams,
    out: &mut [u64; 3],
) {
    let range = 2 * bound + 1;
    let mask = u128::MAX >> range.leading_zeros();
    let v = loop {
        let x = ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())) & mask;
        if x < range {
            break x;
        }
    };
    for (i, o) in out.iter_mut().enumerate().take(p.q.len()) {
        let m = &p.q[i];
        // (v - bound) mod p_i
        *o = m.sub(m.reduce_u128(v), m.reduce_u128(bound));
    }
}

/// The residues of round(Q * x / t) = floor(Q/t) x + round((Q mod t) x / t) for x in Z_t.
#[inline]
pub(crate) fn encode_scaled(x: u64, p: &HeParams, i: usize) -> u64 {
    let l = p.ring().bits();
    let frac = ((u128::from(p.rho) * u128::from(x) + (1u128 << (l - 1))) >> l) as u64;
    let m = &p.q[i];
    m.add(m.mul(p.delta[i], m.reduce(x)), m.reduce(frac))
}

/// round(2^k * c / Q) mod 2^k for the coefficient `j` of `poly` (coefficient form, all
/// primes), through the CRT identity c/Q = sum_i [c_i (Q/p_i)^-1]_{p_i} / p_i mod 1.
/// The result is within 1/2 + 2^-60 of 2^k c / Q (mod 2^k).
#[inline]
pub(crate) fn switch_coefficient(
    poly: &RnsPoly,
    j: usize,
    p: &HeParams,
    consts: &[SwitchConst],
    k: u32,
) -> u64 {
    // Fixed point with 64 fractional bits.
    let mut acc: u128 = 0;
    for (i, c) in consts.iter().enumerate() {
        let m = &p.q[i];
        let (inv, inv_shoup) = p.qhat_inv[i];
        let y = m.mul_shoup(poly.data[i * DEGREE + j], inv, inv_shoup);
        let y = u128::from(y);
        acc = acc
            .wrapping_add((y * u128::from(c.int)) << 64)
            .wrapping_add(y * u128::from(c.hi))
            .wrapping_add((y * u128::from(c.lo)) >> 64);
    }
    let rounded = (acc + (1u128 << 63)) >> 64;
    (rounded as u64) & ((1u64 << k) - 1)
}

/// A lazily reduced accumulator of pointwise products (NTT form), one u128 per value.
pub(crate) struct Accumulator {
    data: Vec<u128>,
}

impl Accumulator {
    pub(crate) fn new(rows: usize) -> Self {
        Self {
            data: vec![0; rows * DEGREE],
        }
    }

    pub(crate) fn clear(&mut self) {
        self.data.iter_mut().for_each(|v| *v = 0);
    }

    /// self += a * b (pointwise). Each product is < 2^124 / 2^16: 2^16 of them fit.
    pub(crate) fn fma(&mut self, a: &RnsPoly, b: &RnsPoly) {
        for ((acc, x), y) in self.data.iter_mut().zip(&a.data).zip(&b.data) {
            *acc += u128::from(*x) * u128::from(*y);
        }
    }

    pub(crate) fn reduce(&self, p: &HeParams) -> RnsPoly {
        let rows = self.data.len() / DEGREE;
        let mut out = RnsPoly::zero(rows);
        for i in 0..rows {
            let m = &p.q[i];
            for (o, v) in out
                .row_mut(i)
                .iter_mut()
                .zip(&self.data[i * DEGREE..(i + 1) * DEGREE])
            {
                *o = m.reduce_u128(*v);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use num_bigint::BigUint;
    use num_traits::{One, ToPrimitive, Zero};
    use rand_chacha::ChaCha12Rng;

    fn q_of(p: &HeParams) -> BigUint {
        p.moduli()
            .iter()
            .fold(BigUint::one(), |a, m| a * BigUint::from(*m))
    }

    /// The integer in [0, Q) with the given residues (test-only CRT).
    pub(crate) fn crt(p: &HeParams, poly: &RnsPoly, j: usize) -> BigUint {
        let q = q_of(p);
        let mut acc = BigUint::zero();
        for (i, m) in p.moduli().iter().enumerate() {
            let mb = BigUint::from(*m);
            let qhat = &q / &mb;
            let inv = BigUint::from(p.qhat_inv[i].0);
            acc += BigUint::from(poly.data[i * DEGREE + j]) * inv % &mb * qhat;
        }
        acc % q
    }

    #[test]
    fn switch_matches_exact_rounding() {
        let p = HeParams::new(37, 37).unwrap();
        let q = q_of(&p);
        let mut poly = RnsPoly::uniform_from_seed(&[3; 32], "t", 0, &p);
        // Edge residues: 0, Q - 1, (Q-1)/2, (Q+1)/2.
        for (j, v) in [
            BigUint::zero(),
            &q - 1u32,
            (&q - 1u32) / 2u32,
            (&q + 1u32) / 2u32,
        ]
        .iter()
        .enumerate()
        {
            for (i, m) in p.moduli().iter().enumerate() {
                poly.data[i * DEGREE + j] = (v % BigUint::from(*m)).to_u64().unwrap();
            }
        }
        for k in [p.c0_bits(), p.c1_bits()] {
            let consts = if k == p.c0_bits() {
                &p.switch_c0
            } else {
                &p.switch_c1
            };
            for j in (0..DEGREE).step_by(61).chain(0..4) {
                let c = crt(&p, &poly, j);
                // exact: floor((2^k c + Q/2) / Q) mod 2^k
                let exact = (((c << k as usize) + (&q >> 1usize)) / &q) % (BigUint::one() << k);
                let got = switch_coefficient(&poly, j, &p, consts, k);
                let exact = exact.to_u64().unwrap();
                let diff = got.wrapping_sub(exact) & ((1 << k) - 1);
                assert!(diff == 0 || diff == 1 || diff == (1 << k) - 1, "j = {j}");
            }
        }
    }

    #[test]
    fn scaled_encoding_is_round_q_x_over_t() {
        let p = HeParams::new(37, 37).unwrap();
        let q = q_of(&p);
        let ring = p.ring();
        let mut poly = RnsPoly::zero(3);
        let xs = [
            0,
            1,
            ring.mask(),
            ring.from_signed(ring.max_signed()),
            ring.from_signed(ring.min_signed()),
        ];
        for (j, x) in xs.iter().enumerate() {
            for i in 0..3 {
                poly.data[i * DEGREE + j] = encode_scaled(*x, &p, i);
            }
            let t = BigUint::one() << 37usize;
            let exact = (&q * BigUint::from(*x) + (&t >> 1usize)) / &t;
            assert_eq!(crt(&p, &poly, j), exact % &q);
        }
    }

    #[test]
    fn samplers_stay_in_range() {
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let s = sample_ternary(&mut rng);
        assert_eq!(s.len(), DEGREE);
        assert!(s.iter().all(|v| (-1..=1).contains(v)));
        for v in -1..=1 {
            let n = s.iter().filter(|x| **x == v).count();
            assert!((2400..3050).contains(&n), "{v}: {n}");
        }
        let e = sample_cbd(&mut rng, 100_000);
        assert!(e.iter().all(|v| v.abs() <= 21));
        let var = e.iter().map(|v| (v * v) as f64).sum::<f64>() / e.len() as f64;
        assert!((var - 10.5).abs() < 0.3, "{var}");
        let p = HeParams::new(32, 32).unwrap();
        let mut r = [0u64; 3];
        sample_flood(&mut rng, 5, &p, &mut r);
        let v = if r[0] > p.moduli()[0] / 2 {
            r[0] as i128 - p.moduli()[0] as i128
        } else {
            r[0] as i128
        };
        assert!(v.abs() <= 5);
        assert_eq!(lift_signed(-1, 97), 96);
        assert_eq!(lift_signed(5, 97), 5);
    }

    #[test]
    fn ntt_product_is_negacyclic() {
        let p = HeParams::new(32, 32).unwrap();
        let mut a = vec![0i64; DEGREE];
        let mut b = vec![0i64; DEGREE];
        a[DEGREE - 1] = 1; // X^(N-1)
        b[2] = 3; // 3 X^2
        let mut pa = RnsPoly::from_signed(&a, 3, &p);
        let mut pb = RnsPoly::from_signed(&b, 3, &p);
        pa.ntt(&p);
        pb.ntt(&p);
        pa.mul_assign(&pb, &p);
        pa.intt(&p);
        // X^(N+1) = -X
        for i in 0..3 {
            assert_eq!(pa.row(i)[1], p.moduli()[i] - 3);
            assert_eq!(pa.row(i).iter().filter(|v| **v != 0).count(), 1);
        }
    }
}
