//! The BFV parameter set: ring degree, RNS moduli, plaintext modulus t = 2^l, the final
//! (download) moduli, and the noise and flooding bounds they are sized for.
//!
//! Everything here is public and deterministic: both parties derive the same
//! [`HeParams`] from `(ring_bits, weight_bits)` and compare [`ParamId`]s on the wire.
//! The analysis behind every constant is in the module doc of [`crate::he`].

use std::fmt;

use fhe_math::ntt::NttOperator;
use fhe_math::zq::Modulus;
use fhe_math::zq::primes::generate_prime;
use num_bigint::BigUint;
use num_traits::{One, ToPrimitive};

use super::HeError;
use crate::ring::Ring;

/// Polynomial degree N (the ring is `Z_Q[X]/(X^N + 1)`).
pub const DEGREE: usize = 8192;
/// log2 N.
pub const LOG_DEGREE: u32 = 13;
/// Number of RNS primes in Q.
pub const NUM_PRIMES: usize = 3;
/// Largest log2 Q that the HomomorphicEncryption.org standard allows at N = 8192 for
/// 128-bit classical security with a uniform ternary secret and sigma ~ 3.2 (Albrecht et
/// al., "Homomorphic Encryption Security Standard", 2018, Table 1).
pub const MAX_LOG_Q: u32 = 218;
/// Smallest supported ring width l.
pub const MIN_RING_BITS: u32 = 16;
/// Largest supported ring width l (the analysis and the u128 arithmetic assume l <= 40).
pub const MAX_RING_BITS: u32 = 40;
/// Errors are centred binomial with 21 coin pairs: |e| <= 21, variance 10.5 (sigma 3.24,
/// at least the standard's 3.19).
pub const CBD_PAIRS: u32 = 21;
/// Statistical security of circuit privacy (flooding), for one whole inference.
pub const STAT_SEC: u32 = 40;
/// log2 of the number of linear layers one inference may run under the flooding budget
/// (each layer call gets statistical distance 2^-(STAT_SEC + this)).
pub const LOG_LAYERS_PER_INFERENCE: u32 = 2;
/// log2 of the largest number of outputs (rows x outputs) of one layer call.
pub const LOG_MAX_OUTPUTS: u32 = 18;
/// log2 of the largest number of weight terms that meet in one output coefficient
/// (ceil(n_i / n_i') * n_i' * n_o' for the packing chosen).
pub const LOG_MAX_WEIGHT_TERMS: u32 = 14;
/// Decryption of one coefficient fails with probability at most 2^-this (the only
/// probabilistic term is the rounding of c1 at the final modulus, bounded by Hoeffding).
pub const LOG_DECRYPTION_FAILURE: u32 = 80;
/// Bits kept per returned c1 coefficient above l: the final modulus for c1 is 2^(l + this).
pub const C1_EXTRA_BITS: u32 = 11;
/// Bits kept per returned c0 coefficient above l: c0 travels modulo 2^(l + this).
pub const C0_EXTRA_BITS: u32 = 3;

/// The identity of a parameter set: a BLAKE3 digest of everything that defines it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub [u8; 32]);

impl fmt::Debug for ParamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ParamId({self})")
    }
}

impl fmt::Display for ParamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..8]))
    }
}

/// Precomputed constants for the exact switch from Q to 2^k of one RNS residue:
/// 2^k / p_i = int + (hi * 2^64 + lo) / 2^128.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SwitchConst {
    pub(crate) int: u64,
    pub(crate) hi: u64,
    pub(crate) lo: u64,
}

/// A BFV parameter set (see the module doc of [`crate::he`] for the analysis).
pub struct HeParams {
    ring: Ring,
    weight_bits: u32,
    moduli: Vec<u64>,
    pub(crate) q: Vec<Modulus>,
    pub(crate) ntt: Vec<NttOperator>,
    /// serialised width of a residue mod p_i
    pub(crate) residue_bits: Vec<u32>,
    c1_bits: u32,
    c0_bits: u32,
    /// floor(Q / t) mod p_i
    pub(crate) delta: Vec<u64>,
    /// Q mod t
    pub(crate) rho: u64,
    /// (Q / p_i)^-1 mod p_i and its Shoup companion
    pub(crate) qhat_inv: Vec<(u64, u64)>,
    pub(crate) switch_c1: Vec<SwitchConst>,
    pub(crate) switch_c0: Vec<SwitchConst>,
    /// p_0^-1 mod p_1 (CRT of the first two residues at decryption)
    pub(crate) p0_inv_mod_p1: u64,
    noise_bound: u128,
    flood_bound: u128,
    log2_q: f64,
    id: ParamId,
}

impl fmt::Debug for HeParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeParams")
            .field("id", &self.id)
            .field("degree", &DEGREE)
            .field("ring_bits", &self.ring.bits())
            .field("weight_bits", &self.weight_bits)
            .field("moduli", &self.moduli)
            .field("log2_q", &self.log2_q)
            .field("c1_bits", &self.c1_bits)
            .field("c0_bits", &self.c0_bits)
            .finish()
    }
}

/// The bound tau on |(rounding of c1) * s| that holds except with probability
/// 2^-LOG_DECRYPTION_FAILURE (Hoeffding over the N independent uniform ternary
/// coefficients of s, each term in [-r, r] with r = 1/2 + 2^-50), rounded up.
pub(crate) fn c1_rounding_bound() -> u64 {
    let r = 0.5 + 2f64.powi(-50);
    let ln = (f64::from(LOG_DECRYPTION_FAILURE + 1)) * std::f64::consts::LN_2;
    let tau = (DEGREE as f64 * (2.0 * r) * (2.0 * r) * ln / 2.0).sqrt();
    tau.ceil() as u64 + 1
}

/// The worst-case noise bound E at modulus Q of a result before flooding, for
/// `terms` weight terms of at most `weight_bits` signed bits (module doc, "noise").
pub(crate) fn noise_bound(weight_bits: u32, terms: u64) -> u128 {
    // (|e| + 1/2) * sum |w| <= 21.5 * terms * 2^(wb-1) = 43 * terms * 2^(wb-2)
    let product = ((43u128 * u128::from(terms)) << (weight_bits - 1)).div_ceil(2);
    // plaintext rounding (1/2), re-randomisation e1 - e_pk*u + e2*s
    let rerand = u128::from(CBD_PAIRS) * (2 * DEGREE as u128 + 1);
    product + 1 + rerand
}

impl HeParams {
    /// The parameter set for the ring Z_{2^ring_bits} and server weights whose signed
    /// readings fit in `weight_bits` bits (`weight_bits = ring_bits`: any ring element).
    pub fn new(ring_bits: u32, weight_bits: u32) -> Result<Self, HeError> {
        if !(MIN_RING_BITS..=MAX_RING_BITS).contains(&ring_bits) {
            return Err(HeError::UnsupportedRing { bits: ring_bits });
        }
        if !(2..=ring_bits).contains(&weight_bits) {
            return Err(HeError::UnsupportedWeightBits {
                bits: weight_bits,
                ring_bits,
            });
        }
        let ring =
            Ring::new(ring_bits).map_err(|_| HeError::UnsupportedRing { bits: ring_bits })?;
        let c1_bits = ring_bits + C1_EXTRA_BITS;
        let c0_bits = ring_bits + C0_EXTRA_BITS;
        let noise = noise_bound(weight_bits, 1 << LOG_MAX_WEIGHT_TERMS);
        let flood_shift = STAT_SEC + LOG_LAYERS_PER_INFERENCE + LOG_MAX_OUTPUTS - 1;
        let flood = noise << flood_shift;

        // Budget at the final modulus 2^c1_bits, in units of 1/1024:
        //   (2^K1/Q)(E + B_f) + tau + r*2^(K1-K0) < 2^(K1-l-1).
        let tau = c1_rounding_bound();
        let half = 1u128 << (c1_bits - ring_bits - 1);
        let c0_term = (1u128 << (c1_bits - c0_bits)) / 2 + 1;
        let slack = half
            .checked_sub(u128::from(tau) + c0_term)
            .filter(|s| *s > 0)
            .ok_or_else(|| HeError::NoParameters("no room at the final modulus".into()))?;
        let need = BigUint::from(noise + flood) << c1_bits as usize; // < Q * slack

        let two_n = 2 * DEGREE as u64;
        let lower = (need.bits() as u32).saturating_sub(slack.ilog2() + 2);
        for total in lower..=MAX_LOG_Q {
            let sizes: Vec<u32> = (0..NUM_PRIMES as u32)
                .map(|i| total / NUM_PRIMES as u32 + u32::from(i < total % NUM_PRIMES as u32))
                .collect();
            if sizes.iter().any(|b| *b > 61 || *b <= ring_bits + 1) {
                continue;
            }
            let Some(moduli) = pick_primes(&sizes, two_n) else {
                continue;
            };
            let q_big = moduli
                .iter()
                .fold(BigUint::one(), |acc, p| acc * BigUint::from(*p));
            if q_big.bits() as u32 > MAX_LOG_Q {
                break;
            }
            if q_big.clone() * BigUint::from(slack) <= need {
                continue;
            }
            return Self::assemble(
                ring,
                weight_bits,
                moduli,
                &q_big,
                c1_bits,
                c0_bits,
                noise,
                flood,
            );
        }
        Err(HeError::NoParameters(format!(
            "l = {ring_bits}, weight bits = {weight_bits} needs log2 Q above {MAX_LOG_Q}"
        )))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        ring: Ring,
        weight_bits: u32,
        moduli: Vec<u64>,
        q_big: &BigUint,
        c1_bits: u32,
        c0_bits: u32,
        noise_bound: u128,
        flood_bound: u128,
    ) -> Result<Self, HeError> {
        let math = |e: fhe_math::Error| HeError::NoParameters(e.to_string());
        let q: Vec<Modulus> = moduli
            .iter()
            .map(|p| Modulus::new(*p))
            .collect::<Result<_, _>>()
            .map_err(math)?;
        let ntt: Vec<NttOperator> = q
            .iter()
            .map(|m| NttOperator::new(m, DEGREE))
            .collect::<Option<_>>()
            .ok_or_else(|| HeError::NoParameters("NTT unsupported".into()))?;
        let residue_bits = moduli
            .iter()
            .map(|p| 64 - (p - 1).leading_zeros())
            .collect();
        let t = BigUint::one() << ring.bits() as usize;
        let delta_big = q_big / &t;
        let rho = (q_big % &t)
            .to_u64()
            .ok_or_else(|| HeError::NoParameters("rho".into()))?;
        let mut delta = Vec::new();
        let mut qhat_inv = Vec::new();
        for (p, m) in moduli.iter().zip(&q) {
            let pb = BigUint::from(*p);
            delta.push((&delta_big % &pb).to_u64().unwrap_or(0));
            let qhat = ((q_big / &pb) % &pb).to_u64().unwrap_or(0);
            let inv = m
                .inv(qhat)
                .ok_or_else(|| HeError::NoParameters("moduli not coprime".into()))?;
            qhat_inv.push((inv, m.shoup(inv)));
        }
        let switch = |k: u32| -> Vec<SwitchConst> {
            moduli
                .iter()
                .map(|p| {
                    let pb = BigUint::from(*p);
                    let two_k = BigUint::one() << k as usize;
                    let int = (&two_k / &pb).to_u64().unwrap_or(0);
                    let frac = ((&two_k % &pb) << 128usize) / &pb;
                    let hi = (&frac >> 64usize).to_u64().unwrap_or(0);
                    let lo = (&frac & BigUint::from(u64::MAX)).to_u64().unwrap_or(0);
                    SwitchConst { int, hi, lo }
                })
                .collect()
        };
        let p0_inv_mod_p1 = q[1]
            .inv(q[1].reduce(moduli[0]))
            .ok_or_else(|| HeError::NoParameters("moduli not coprime".into()))?;
        // Decryption computes c1 * s exactly modulo p0 * p1: it must exceed 2 N 2^K1.
        if 64 - moduli[0].leading_zeros() + 64 - moduli[1].leading_zeros()
            < c1_bits + LOG_DEGREE + 3
        {
            return Err(HeError::NoParameters("first two primes too small".into()));
        }
        let log2_q = q_big.bits() as f64
            + ((q_big >> (q_big.bits() as usize - 53))
                .to_f64()
                .unwrap_or(1.0)
                / 2f64.powi(53))
            .log2();
        let mut h = blake3::Hasher::new_derive_key("fusion-common he params v1");
        h.update(&(DEGREE as u64).to_le_bytes());
        for p in &moduli {
            h.update(&p.to_le_bytes());
        }
        for v in [
            ring.bits(),
            weight_bits,
            c1_bits,
            c0_bits,
            CBD_PAIRS,
            STAT_SEC,
            LOG_LAYERS_PER_INFERENCE,
            LOG_MAX_OUTPUTS,
            LOG_MAX_WEIGHT_TERMS,
            LOG_DECRYPTION_FAILURE,
        ] {
            h.update(&v.to_le_bytes());
        }
        let id = ParamId(*h.finalize().as_bytes());
        let switch_c1 = switch(c1_bits);
        let switch_c0 = switch(c0_bits);
        Ok(Self {
            ring,
            weight_bits,
            moduli,
            q,
            ntt,
            residue_bits,
            c1_bits,
            c0_bits,
            delta,
            rho,
            qhat_inv,
            switch_c1,
            switch_c0,
            p0_inv_mod_p1,
            noise_bound,
            flood_bound,
            log2_q,
            id,
        })
    }

    /// The parameter set's identity, compared on the wire.
    pub fn id(&self) -> ParamId {
        self.id
    }

    /// The plaintext ring Z_{2^l}.
    pub fn ring(&self) -> Ring {
        self.ring
    }

    /// The declared bound on the server's weights (signed bits).
    pub fn weight_bits(&self) -> u32 {
        self.weight_bits
    }

    /// The RNS primes whose product is Q.
    pub fn moduli(&self) -> &[u64] {
        &self.moduli
    }

    /// log2 Q.
    pub fn log2_q(&self) -> f64 {
        self.log2_q
    }

    /// K1: returned c1 coefficients are modulo 2^K1.
    pub fn c1_bits(&self) -> u32 {
        self.c1_bits
    }

    /// K0: returned c0 coefficients are modulo 2^K0.
    pub fn c0_bits(&self) -> u32 {
        self.c0_bits
    }

    /// E: the worst-case noise at Q of a result before flooding.
    pub fn noise_bound(&self) -> u128 {
        self.noise_bound
    }

    /// B_f: flooding noise is uniform in [-B_f, B_f].
    pub fn flood_bound(&self) -> u128 {
        self.flood_bound
    }

    /// Bytes of one uploaded ciphertext (c0 modulo Q; c1 is derived from a seed).
    pub fn upload_ct_bytes(&self) -> usize {
        DEGREE * self.residue_bits.iter().sum::<u32>() as usize / 8
    }
}

/// Distinct NTT-friendly primes (p = 1 mod 2N) just below 2^size for each size,
/// largest first within equal sizes.
fn pick_primes(sizes: &[u32], two_n: u64) -> Option<Vec<u64>> {
    let mut out: Vec<u64> = Vec::with_capacity(sizes.len());
    for &b in sizes {
        let mut upper = 1u64 << b;
        if let Some(prev) = out
            .iter()
            .copied()
            .filter(|p| 64 - p.leading_zeros() == b)
            .min()
        {
            upper = prev;
        }
        out.push(generate_prime(b as usize, two_n, upper)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sets_fit_the_standard_and_the_budget() {
        for l in [MIN_RING_BITS, 32, 37, MAX_RING_BITS] {
            let p = HeParams::new(l, l).unwrap();
            assert!(p.log2_q() <= f64::from(MAX_LOG_Q));
            assert_eq!(p.moduli().len(), NUM_PRIMES);
            for m in p.moduli() {
                assert_eq!(m % (2 * DEGREE as u64), 1);
                assert!(*m > 1 << (l + 1));
            }
            // Flooding covers the noise by the statistical margin.
            assert!(p.flood_bound() >> 59 >= p.noise_bound());
            // Q * slack > (E + B_f) 2^K1, re-checked in floating point.
            let lhs = ((p.noise_bound() + p.flood_bound()) as f64).log2() + f64::from(p.c1_bits());
            let slack = f64::from(1u32 << (C1_EXTRA_BITS - 1))
                - c1_rounding_bound() as f64
                - f64::from(1u32 << (C1_EXTRA_BITS - C0_EXTRA_BITS - 1));
            assert!(p.log2_q() + slack.log2() > lhs, "l = {l}: {p:?}");
        }
        let a = HeParams::new(37, 37).unwrap();
        let b = HeParams::new(37, 37).unwrap();
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), HeParams::new(37, 20).unwrap().id());
        assert_ne!(a.id(), HeParams::new(38, 38).unwrap().id());
        assert!(HeParams::new(37, 20).unwrap().log2_q() < a.log2_q());
    }

    #[test]
    fn out_of_range_widths_are_refused() {
        assert!(matches!(
            HeParams::new(41, 41),
            Err(HeError::UnsupportedRing { bits: 41 })
        ));
        assert!(matches!(
            HeParams::new(8, 8),
            Err(HeError::UnsupportedRing { bits: 8 })
        ));
        assert!(matches!(
            HeParams::new(37, 38),
            Err(HeError::UnsupportedWeightBits { .. })
        ));
    }
}
