//! The one `unsafe` module of the OT layer: AES-128 with AES-NI intrinsics on `u128`
//! blocks, eight blocks in flight, with a run-time check and a fallback to the `aes`
//! crate (constant-time software AES) where AES-NI is missing.
//!
//! Why: the `aes` crate's API works on byte arrays; converting every `u128` block to and
//! from `GenericArray` cost about as much as the AES itself in the hot loops of the
//! millionaire (measured with `perf`). Byte order is the `aes` crate's with
//! `u128::to_le_bytes` (tested against it below and against FIPS-197 in `hash.rs`).

use aes::Aes128;
use aes::cipher::{BlockEncrypt, KeyInit};
use zeroize::Zeroize;

use super::Block;

/// AES-128 encryption under one key.
pub(crate) struct Aes {
    /// round keys (AES-NI path)
    rk: [Block; 11],
    /// software fallback
    soft: Option<Aes128>,
}

impl Drop for Aes {
    fn drop(&mut self) {
        self.rk.zeroize();
    }
}

impl Aes {
    pub(crate) fn new(key: Block) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("sse2")
            {
                // SAFETY: the CPU supports AES-NI and SSE2 (checked just above).
                let rk = unsafe { ni::expand_key(key) };
                return Self { rk, soft: None };
            }
        }
        let mut k = key.to_le_bytes();
        let soft = Aes128::new(&k.into());
        k.zeroize();
        Self {
            rk: [0; 11],
            soft: Some(soft),
        }
    }

    /// The KK13 pads of one OT: for every j, the 2-block MMO chain of
    /// `Tccr::hash_wide_many` on `(q_0 ⊕ cs[j]_0, q_1 ⊕ cs[j]_1)` with tweak `tw`, computed in
    /// registers (no per-block conversions).
    pub(crate) fn mmo2_pads(&self, q: [Block; 2], cs: &[[Block; 2]], tw: Block, out: &mut [Block]) {
        debug_assert_eq!(cs.len(), out.len());
        if self.soft.is_none() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `soft` is None only when `new` found AES-NI and SSE2.
            unsafe {
                ni::mmo2_pads(&self.rk, q, cs, tw, out)
            }
            #[cfg(target_arch = "x86_64")]
            return;
        }
        let mut a = [0 as Block; 8];
        let mut b = [0 as Block; 8];
        for (cc, oc) in cs.chunks(8).zip(out.chunks_mut(8)) {
            let n = cc.len();
            for k in 0..n {
                a[k] = q[0] ^ cc[k][0] ^ tw;
                b[k] = a[k];
            }
            self.encrypt(&mut a[..n]);
            for k in 0..n {
                a[k] ^= b[k] ^ q[1] ^ cc[k][1];
            }
            b[..n].copy_from_slice(&a[..n]);
            self.encrypt(&mut a[..n]);
            for k in 0..n {
                oc[k] = a[k] ^ b[k];
            }
        }
    }

    /// Encrypts every block of `data` in place.
    pub(crate) fn encrypt(&self, data: &mut [Block]) {
        match &self.soft {
            None => {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `soft` is None only when `new` found AES-NI and SSE2.
                unsafe {
                    ni::encrypt(&self.rk, data)
                }
            }
            Some(a) => {
                let mut buf = [aes::Block::default(); 8];
                for chunk in data.chunks_mut(8) {
                    for (b, x) in buf.iter_mut().zip(chunk.iter()) {
                        *b = aes::Block::from(x.to_le_bytes());
                    }
                    a.encrypt_blocks(&mut buf[..chunk.len()]);
                    for (x, b) in chunk.iter_mut().zip(buf.iter()) {
                        let mut t = [0u8; 16];
                        t.copy_from_slice(b);
                        *x = Block::from_le_bytes(t);
                    }
                }
            }
        }
    }
}

/// Hints the CPU to bring the cache line holding `x` into the L2 cache (PREFETCHT1).
/// A hint only: it changes no value, never faults, and is a no-op off x86_64. Used by
/// Ferret's LPN step, whose random reads from a stock of megabytes are memory-bound.
#[inline(always)]
pub(crate) fn prefetch_l2<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT1 is part of SSE, which every x86_64 CPU has; a prefetch reads no
    // data into the program and cannot fault, and `x` is a valid reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
            (x as *const T).cast::<i8>(),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

#[cfg(target_arch = "x86_64")]
mod ni {
    use std::arch::x86_64::*;

    use super::Block;

    macro_rules! round_key {
        ($k:expr, $rcon:literal) => {{
            let k = $k;
            let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(k));
            let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            _mm_xor_si128(k, t)
        }};
    }

    #[inline]
    #[target_feature(enable = "aes,sse2")]
    fn to_block(x: __m128i) -> Block {
        let mut o = [0u8; 16];
        // SAFETY: `o` is 16 writable bytes; storeu has no alignment requirement.
        unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), x) };
        Block::from_le_bytes(o)
    }

    #[inline]
    #[target_feature(enable = "aes,sse2")]
    fn from_block(x: Block) -> __m128i {
        let b = x.to_le_bytes();
        // SAFETY: `b` is 16 readable bytes; loadu has no alignment requirement.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    /// The AES-128 key schedule (FIPS-197 §5.2) with AESKEYGENASSIST.
    ///
    /// # Safety
    /// The CPU must support AES-NI and SSE2.
    #[target_feature(enable = "aes,sse2")]
    pub(super) unsafe fn expand_key(key: Block) -> [Block; 11] {
        let mut k = [_mm_setzero_si128(); 11];
        k[0] = from_block(key);
        k[1] = round_key!(k[0], 0x01);
        k[2] = round_key!(k[1], 0x02);
        k[3] = round_key!(k[2], 0x04);
        k[4] = round_key!(k[3], 0x08);
        k[5] = round_key!(k[4], 0x10);
        k[6] = round_key!(k[5], 0x20);
        k[7] = round_key!(k[6], 0x40);
        k[8] = round_key!(k[7], 0x80);
        k[9] = round_key!(k[8], 0x1b);
        k[10] = round_key!(k[9], 0x36);
        let mut out = [0 as Block; 11];
        for (o, x) in out.iter_mut().zip(k) {
            *o = to_block(x);
        }
        out
    }

    #[inline]
    #[target_feature(enable = "aes,sse2")]
    fn enc8(k: &[__m128i; 11], mut s: [__m128i; 8]) -> [__m128i; 8] {
        for x in s.iter_mut() {
            *x = _mm_xor_si128(*x, k[0]);
        }
        for rk in &k[1..10] {
            for x in s.iter_mut() {
                *x = _mm_aesenc_si128(*x, *rk);
            }
        }
        for x in s.iter_mut() {
            *x = _mm_aesenclast_si128(*x, k[10]);
        }
        s
    }

    /// See [`super::Aes::mmo2_pads`].
    ///
    /// # Safety
    /// The CPU must support AES-NI and SSE2.
    #[target_feature(enable = "aes,sse2")]
    pub(super) unsafe fn mmo2_pads(
        rk: &[Block; 11],
        q: [Block; 2],
        cs: &[[Block; 2]],
        tw: Block,
        out: &mut [Block],
    ) {
        let k: [__m128i; 11] = core::array::from_fn(|i| from_block(rk[i]));
        let q0 = _mm_xor_si128(from_block(q[0]), from_block(tw));
        let q1 = from_block(q[1]);
        for (cc, oc) in cs.chunks(8).zip(out.chunks_mut(8)) {
            let n = cc.len();
            let mut x0 = [_mm_setzero_si128(); 8];
            let mut x1 = [_mm_setzero_si128(); 8];
            for t in 0..n {
                x0[t] = _mm_xor_si128(q0, from_block(cc[t][0]));
                x1[t] = _mm_xor_si128(q1, from_block(cc[t][1]));
            }
            let e = enc8(&k, x0);
            let mut y = [_mm_setzero_si128(); 8];
            for t in 0..8 {
                // y ⊕ x_1 with y = π(x_0 ⊕ i) ⊕ x_0 ⊕ i
                y[t] = _mm_xor_si128(_mm_xor_si128(e[t], x0[t]), x1[t]);
            }
            let e2 = enc8(&k, y);
            for t in 0..n {
                oc[t] = to_block(_mm_xor_si128(e2[t], y[t]));
            }
        }
    }

    /// Encrypts `data` in place, eight blocks at a time.
    ///
    /// # Safety
    /// The CPU must support AES-NI and SSE2.
    #[target_feature(enable = "aes,sse2")]
    pub(super) unsafe fn encrypt(rk: &[Block; 11], data: &mut [Block]) {
        let k: [__m128i; 11] = core::array::from_fn(|i| from_block(rk[i]));
        let mut chunks = data.chunks_exact_mut(8);
        for c in &mut chunks {
            let mut s: [__m128i; 8] =
                core::array::from_fn(|i| _mm_xor_si128(from_block(c[i]), k[0]));
            for rk in &k[1..10] {
                for x in s.iter_mut() {
                    *x = _mm_aesenc_si128(*x, *rk);
                }
            }
            for (o, x) in c.iter_mut().zip(s) {
                *o = to_block(_mm_aesenclast_si128(x, k[10]));
            }
        }
        // the last 1-7 blocks still go through the pipeline (one block at a time would
        // wait out the AES latency for each: the 1-of-N hashes come 4 at a time)
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut s = [_mm_setzero_si128(); 8];
            for (x, o) in s.iter_mut().zip(rest.iter()) {
                *x = from_block(*o);
            }
            let e = enc8(&k, s);
            for (o, x) in rest.iter_mut().zip(e) {
                *o = to_block(x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_a_pure_hint() {
        let v: Vec<Block> = (0..1000).collect();
        for x in v.iter().step_by(7) {
            prefetch_l2(x);
        }
        prefetch_l2(&v[999]);
        assert_eq!(v.iter().sum::<Block>(), 999 * 1000 / 2);
    }

    #[test]
    fn aesni_matches_the_aes_crate() {
        let mut x: Block = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        for key in [
            0 as Block,
            1,
            u128::MAX,
            0x2b7e_1516_28ae_d2a6_abf7_1588_09cf_4f3c,
        ] {
            let a = Aes::new(key);
            let soft = Aes128::new(&key.to_le_bytes().into());
            let mut data: Vec<Block> = (0..19)
                .map(|_| {
                    x = x
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
                        .wrapping_add(1);
                    x
                })
                .collect();
            let want: Vec<Block> = data
                .iter()
                .map(|&b| {
                    let mut g = aes::Block::from(b.to_le_bytes());
                    soft.encrypt_block(&mut g);
                    let mut t = [0u8; 16];
                    t.copy_from_slice(&g);
                    Block::from_le_bytes(t)
                })
                .collect();
            a.encrypt(&mut data);
            assert_eq!(data, want);
            // the fused KK13 pads equal the generic 2-block hash
            let cs: Vec<[Block; 2]> = data.iter().map(|&d| [d, d.rotate_left(7)]).collect();
            let q = [data[0] ^ 5, data[1] ^ 9];
            let mut fused = vec![0; cs.len()];
            a.mmo2_pads(q, &cs, 77, &mut fused);
            let xs: Vec<[Block; 2]> = cs.iter().map(|c| [q[0] ^ c[0], q[1] ^ c[1]]).collect();
            let mut plain = vec![0; cs.len()];
            crate::ot::Tccr::new(key).hash_wide_many(&xs, |_| 77, &mut plain);
            assert_eq!(fused, plain);
        }
    }
}
