//! The 128 x 128 bit-matrix transpose of OT extension, in safe Rust.
//!
//! Eklundh's recursive block swap: seven passes, each swapping the off-diagonal
//! s x s sub-blocks (s = 64, 32, ..., 1) with masks and shifts on whole `u128` rows.
//! About 450 `u128` mask-shift-xor steps per 128 OTs; no `unsafe`, no SIMD intrinsics
//! needed (the compiler keeps a row pair in registers).
//!
//! Layout: `m[i]` is row i; bit j of `m[i]` (bit 0 = least significant) is column j.
//! After [`transpose128`], bit j of `m[i]` is the old bit i of `m[j]`.

use super::Block;

const MASKS: [(u32, u128); 7] = [
    (64, 0x0000_0000_0000_0000_ffff_ffff_ffff_ffff),
    (32, 0x0000_0000_ffff_ffff_0000_0000_ffff_ffff),
    (16, 0x0000_ffff_0000_ffff_0000_ffff_0000_ffff),
    (8, 0x00ff_00ff_00ff_00ff_00ff_00ff_00ff_00ff),
    (4, 0x0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f),
    (2, 0x3333_3333_3333_3333_3333_3333_3333_3333),
    (1, 0x5555_5555_5555_5555_5555_5555_5555_5555),
];

/// Transposes the 128 x 128 bit matrix `m` in place.
pub fn transpose128(m: &mut [Block; 128]) {
    for &(s, mask) in &MASKS {
        let su = s as usize;
        let mut i = 0;
        while i < 128 {
            for k in i..i + su {
                let a = m[k];
                let b = m[k + su];
                let t = ((a >> s) ^ b) & mask;
                m[k] = a ^ (t << s);
                m[k + su] = b ^ t;
            }
            i += 2 * su;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ot::hash::Prg;

    fn naive(m: &[Block; 128]) -> [Block; 128] {
        let mut t = [0; 128];
        for (i, row) in m.iter().enumerate() {
            for (j, out) in t.iter_mut().enumerate() {
                *out |= ((row >> j) & 1) << i;
            }
        }
        t
    }

    #[test]
    fn transpose_matches_naive_and_is_an_involution() {
        let mut prg = Prg::new(9);
        for _ in 0..4 {
            let mut m = [0; 128];
            prg.fill_blocks(&mut m);
            let orig = m;
            transpose128(&mut m);
            assert_eq!(m, naive(&orig));
            transpose128(&mut m);
            assert_eq!(m, orig);
        }
        let mut id = [0; 128];
        for (i, r) in id.iter_mut().enumerate() {
            *r = 1 << i;
        }
        let orig = id;
        transpose128(&mut id);
        assert_eq!(id, orig);
    }
}
