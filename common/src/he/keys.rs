//! Keys: the client's ternary secret key and the public key it sends at setup.

use std::fmt;

use rand::{CryptoRng, Rng};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::params::{DEGREE, HeParams};
use super::rns::{RnsPoly, sample_cbd, sample_ternary};

/// Domain label of the public key's uniform polynomial.
pub(crate) const PK_DOMAIN: &str = "public key a";

/// The client's secret key s, uniform ternary, kept in NTT form modulo every prime.
/// Zeroized on drop; `Debug` prints `[redacted]`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct SecretKey {
    /// s in NTT form, NUM_PRIMES rows
    ntt: Vec<u64>,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

impl SecretKey {
    pub(crate) fn generate<R: Rng + CryptoRng + ?Sized>(p: &HeParams, rng: &mut R) -> Self {
        let mut s = sample_ternary(rng);
        let mut poly = RnsPoly::from_signed(&s, p.q.len(), p);
        s.zeroize();
        poly.ntt(p);
        let ntt = std::mem::take(&mut poly.data);
        Self { ntt }
    }

    /// s in NTT form modulo the first `rows` primes, as a polynomial (a copy; the caller
    /// zeroizes it).
    pub(crate) fn ntt_rows(&self, rows: usize) -> RnsPoly {
        RnsPoly {
            data: self.ntt[..rows * DEGREE].to_vec(),
        }
    }

    /// self * a for `a` in NTT form (same number of rows), in place into `a`.
    pub(crate) fn mul_into(&self, a: &mut RnsPoly, p: &HeParams) {
        for i in 0..a.rows() {
            p.q[i].mul_vec(a.row_mut(i), &self.ntt[i * DEGREE..(i + 1) * DEGREE]);
        }
    }
}

/// The client's public key (pk0, pk1) = (-(a s + e), a), a expanded from a public seed.
/// Held by the server in NTT form for re-randomisation.
pub(crate) struct PublicKey {
    pub(crate) seed: [u8; 32],
    /// pk0 in coefficient form (for the wire)
    pub(crate) pk0: RnsPoly,
    pub(crate) pk0_ntt: RnsPoly,
    pub(crate) pk1_ntt: RnsPoly,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("seed", &hex::encode(self.seed))
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    /// Generates the public key of `sk` (the seed from the client's CSPRNG).
    pub(crate) fn generate<R: Rng + CryptoRng + ?Sized>(
        sk: &SecretKey,
        p: &HeParams,
        rng: &mut R,
    ) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let rows = p.q.len();
        let mut a = RnsPoly::uniform_from_seed(&seed, PK_DOMAIN, 0, p);
        a.ntt(p);
        let mut pk0 = a.clone();
        sk.mul_into(&mut pk0, p);
        pk0.intt(p);
        // e is as secret as s (with pk0 and a it gives a s, hence s): both of its forms
        // are zeroized
        let e_small = Zeroizing::new(sample_cbd(rng, DEGREE));
        let mut e = RnsPoly::from_signed(&e_small, rows, p);
        pk0.add_assign(&e, p);
        e.data.zeroize();
        pk0.neg_assign(p);
        Self::from_parts(seed, pk0, p, Some(a))
    }

    /// The public key from its wire parts (pk0 already range-checked).
    pub(crate) fn from_parts(
        seed: [u8; 32],
        pk0: RnsPoly,
        p: &HeParams,
        a_ntt: Option<RnsPoly>,
    ) -> Self {
        let pk1_ntt = a_ntt.unwrap_or_else(|| {
            let mut a = RnsPoly::uniform_from_seed(&seed, PK_DOMAIN, 0, p);
            a.ntt(p);
            a
        });
        let mut pk0_ntt = pk0.clone();
        pk0_ntt.ntt(p);
        Self {
            seed,
            pk0,
            pk0_ntt,
            pk1_ntt,
        }
    }
}
