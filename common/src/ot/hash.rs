//! Fixed-key AES: the correlation-robust hash and the PRG of the OT layer.
//!
//! - [`Tccr`]: the tweakable circular correlation-robust hash of Guo, Katz, Wang and Yu
//!   ("Efficient and Secure Multiparty Computation from Fixed-Key Block Ciphers", S&P 2020,
//!   "TCCR"): `H(i, x) = π(π(x) ⊕ i) ⊕ π(x)` where π is AES-128 under a key that is public
//!   but fixed per session (derived from the base-OT transcript, so two sessions never
//!   share a permutation). Every use in this crate passes a tweak `i` that is unique per
//!   correlated OT and per purpose (see `ot::session`), which is what IKNP and the derived
//!   OTs need when many OTs share one global Δ.
//! - [`Prg`]: AES-128 in counter mode under a secret seed; also a `rand_core` RNG so the
//!   protocols can draw ring elements from it. Its key schedule is zeroized on drop (the
//!   `aes` crate's `zeroize` feature).
//!
//! Both process eight blocks at a time so that AES-NI pipelines (the `aes` crate detects
//! AES-NI at run time and falls back to a constant-time software AES).

use zeroize::Zeroize;

use super::Block;
use super::aesni::Aes;

const PAR: usize = 8;

/// The fixed-key AES tweakable correlation-robust hash (Guo et al. 2020, "TCCR").
pub struct Tccr {
    pi: Aes,
}

impl std::fmt::Debug for Tccr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tccr { pi: fixed-key AES (public) }")
    }
}

impl Tccr {
    /// The hash under the public permutation keyed by `key`.
    pub fn new(key: Block) -> Self {
        Self { pi: Aes::new(key) }
    }

    /// KK13 pads of one OT: `hash_wide_many` of `(q_0 ⊕ cs[j]_0, q_1 ⊕ cs[j]_1)`, tweak `tw`.
    pub(crate) fn kk_pads(&self, q: [Block; 2], cs: &[[Block; 2]], tw: Block, out: &mut [Block]) {
        self.pi.mmo2_pads(q, cs, tw, out);
    }

    /// `H(i, x) = π(π(x) ⊕ i) ⊕ π(x)` for one block.
    pub fn hash(&self, tweak: Block, x: Block) -> Block {
        let mut o = [0];
        self.hash_many(&[x], |_| tweak, &mut o);
        o[0]
    }

    /// `out[k] = H(tweak(k), xs[k])` for every k, eight at a time.
    pub fn hash_many(&self, xs: &[Block], tweak: impl Fn(usize) -> Block, out: &mut [Block]) {
        debug_assert_eq!(xs.len(), out.len());
        let mut a = [0 as Block; PAR];
        let mut b = [0 as Block; PAR];
        for (c, (xc, oc)) in xs.chunks(PAR).zip(out.chunks_mut(PAR)).enumerate() {
            let n = xc.len();
            a[..n].copy_from_slice(xc);
            self.pi.encrypt(&mut a[..n]); // π(x)
            for k in 0..n {
                b[k] = a[k] ^ tweak(c * PAR + k);
            }
            self.pi.encrypt(&mut b[..n]); // π(π(x) ⊕ i)
            for k in 0..n {
                oc[k] = b[k] ^ a[k];
            }
        }
    }

    /// The hash of a 256-bit string (two blocks), for the 256-bit rows of the KK13 1-of-N
    /// OT: a 2-block Matyas-Meyer-Oseas chain under the fixed key with the tweak in the
    /// first block, `y = π(x_0 ⊕ i) ⊕ x_0 ⊕ i`, `H = π(y ⊕ x_1) ⊕ y ⊕ x_1`. XOR-ing two
    /// one-block hashes of the halves would not do (a half may carry only 64 unknown bits of
    /// the KK13 correlation). This construction is not one of those Guo et al. prove; its
    /// use rests on the ideal-permutation heuristic (finding a non-chosen pad means finding
    /// the whole 256-bit input, which keeps ≥ 128 bits of min-entropy given the receiver's
    /// view, the Walsh-Hadamard distance). Eight at a time.
    pub fn hash_wide_many(
        &self,
        xs: &[[Block; 2]],
        tweak: impl Fn(usize) -> Block,
        out: &mut [Block],
    ) {
        debug_assert_eq!(xs.len(), out.len());
        let mut a = [0 as Block; PAR];
        let mut b = [0 as Block; PAR];
        for (c, (xc, oc)) in xs.chunks(PAR).zip(out.chunks_mut(PAR)).enumerate() {
            let n = xc.len();
            for k in 0..n {
                a[k] = xc[k][0] ^ tweak(c * PAR + k);
                b[k] = a[k];
            }
            self.pi.encrypt(&mut a[..n]);
            for k in 0..n {
                a[k] ^= b[k] ^ xc[k][1];
            }
            b[..n].copy_from_slice(&a[..n]);
            self.pi.encrypt(&mut a[..n]);
            for k in 0..n {
                oc[k] = a[k] ^ b[k];
            }
        }
    }
}

/// AES-128 in counter mode under a secret seed. Deterministic for a seed; the seed comes
/// from the caller's CSPRNG (the OS in product code).
pub struct Prg {
    aes: Aes,
    counter: u128,
    buf: [Block; PAR],
    used: usize,
}

impl std::fmt::Debug for Prg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prg { [redacted] }")
    }
}

impl Drop for Prg {
    fn drop(&mut self) {
        // The AES key schedule zeroizes itself (feature `zeroize` of `aes`).
        self.buf.zeroize();
        self.counter.zeroize();
    }
}

impl Prg {
    /// A PRG with the given seed.
    pub fn new(seed: Block) -> Self {
        Self {
            aes: Aes::new(seed),
            counter: 0,
            buf: [0; PAR],
            used: PAR,
        }
    }

    /// A PRG seeded from `rng`.
    pub fn from_rng<R: rand::Rng + rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut s: Block = rng.random();
        let p = Self::new(s);
        s.zeroize();
        p
    }

    /// Fills `out` with the next pseudo-random blocks (counter mode, no buffering).
    pub fn fill_blocks(&mut self, out: &mut [Block]) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.counter.wrapping_add(k as u128);
        }
        self.counter = self.counter.wrapping_add(out.len() as u128);
        self.aes.encrypt(out);
    }

    /// The next pseudo-random block.
    pub fn block(&mut self) -> Block {
        if self.used == PAR {
            let mut b = [0; PAR];
            self.fill_blocks(&mut b);
            self.buf = b;
            self.used = 0;
        }
        let b = self.buf[self.used];
        self.buf[self.used] = 0;
        self.used += 1;
        b
    }

    /// `n` pseudo-random bits, one per byte (0 or 1).
    pub fn bits(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let b = self.block();
            let k = (n - out.len()).min(128);
            out.extend((0..k).map(|i| ((b >> i) & 1) as u8));
        }
        out
    }
}

impl rand_core::RngCore for Prg {
    fn next_u32(&mut self) -> u32 {
        self.block() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.block() as u64
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for c in dst.chunks_mut(16) {
            let b = self.block().to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
    }
}

impl rand_core::CryptoRng for Prg {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_matches_fips197_vector() {
        // FIPS-197 Appendix C.1: key 000102..0f, plaintext 00112233..ff.
        let key = Block::from_le_bytes(
            *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f",
        );
        let aes = Aes::new(key);
        let pt = Block::from_le_bytes(
            *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff",
        );
        let mut x = [pt];
        aes.encrypt(&mut x);
        assert_eq!(
            hex::encode(x[0].to_le_bytes()),
            "69c4e0d86a7b0430d8cdb78070b4c55a"
        );
    }

    #[test]
    fn tccr_batch_equals_single_and_depends_on_tweak() {
        let h = Tccr::new(7);
        let xs: Vec<Block> = (0..19u128).map(|i| i * 0x1234_5678_9abc_def1).collect();
        let mut out = vec![0; xs.len()];
        h.hash_many(&xs, |k| k as u128 + 100, &mut out);
        for (k, x) in xs.iter().enumerate() {
            assert_eq!(out[k], h.hash(k as u128 + 100, *x));
            assert_ne!(out[k], h.hash(k as u128 + 101, *x));
        }
        let w: Vec<[Block; 2]> = xs.iter().map(|&x| [x, !x]).collect();
        let mut o2 = vec![0; w.len()];
        h.hash_wide_many(&w, |k| k as u128, &mut o2);
        let mut o3 = vec![0; w.len()];
        h.hash_wide_many(&w, |k| k as u128 + 1, &mut o3);
        assert!(o2.iter().zip(&o3).all(|(a, b)| a != b));
    }

    #[test]
    fn prg_is_deterministic_per_seed_and_streams_consistently() {
        let mut a = Prg::new(1);
        let mut b = Prg::new(1);
        let mut c = Prg::new(2);
        let mut x = [0; 20];
        a.fill_blocks(&mut x[..7]);
        a.fill_blocks(&mut x[7..]);
        let mut y = [0; 20];
        b.fill_blocks(&mut y);
        assert_eq!(x, y);
        let mut z = [0; 20];
        c.fill_blocks(&mut z);
        assert_ne!(x, z);
        let bits = Prg::new(3).bits(1000);
        let _ = Tccr::new(1); // constructible
        let ones = bits.iter().filter(|&&b| b == 1).count();
        assert!(bits.iter().all(|&b| b <= 1) && (400..600).contains(&ones));
    }
}
