//! The local linear code of Ferret's primal-LPN step (Ferret §4, Fig. 7, after Boyle et al.
//! CCS 2019): output i of an iteration is the MPCOT output at i XOR the D = 10 stock
//! entries `stock[idx(i, 0..D)]`, i.e. `y = v ⊕ A·K` for a sparse public n × k matrix A
//! with (at most) D ones per row.
//!
//! ```text
//!   sender:   y_i = v_i ⊕ ⊕_j K[idx(i, j)]            (K: the sender's stock keys)
//!   receiver: z_i = w_i ⊕ ⊕_j M[idx(i, j)]            (M = K ⊕ u·Δ: the receiver's stock)
//!             x_i = e_i ⊕ ⊕_j u[idx(i, j)]            (u: the stock's choice bits)
//!   then z_i = y_i ⊕ x_i·Δ, and x = e ⊕ A·u is pseudo-random by primal LPN with regular
//!   noise e (one 1 per tree).
//! ```
//!
//! The matrix comes from a public seed: outputs 4g..4g+3 take their 40 indices from the
//! 32-bit lanes of the ten AES blocks `AES_seed(10g), ..., AES_seed(10g + 9)`, each lane
//! masked to log2 k bits (k is a power of two, so every index is uniform; a repeated index
//! cancels, as in the XOR sum). The same layout as the reference (emp-ot `lpn_f2.h`),
//! written afresh; both parties derive the seed from the session and the iteration.

use super::super::Block;
use super::super::aesni::Aes;
use super::params::D;

/// Outputs per group (one group's indices come from ten AES blocks).
const GROUP: usize = 4;
/// AES blocks per group.
const BLOCKS: usize = GROUP * D / 4;
/// Groups whose index blocks are encrypted in one call.
const BATCH: usize = 64;

/// The public code of one iteration: n rows, D indices each, into a stock of 2^log_k.
pub(crate) struct LpnCode {
    aes: Aes,
    mask: u32,
}

impl LpnCode {
    /// The code under the public `seed` for a stock of 2^`log_k` entries (`log_k` ≤ 32).
    pub(crate) fn new(seed: Block, log_k: u32) -> Self {
        let mask = if log_k >= 32 {
            u32::MAX
        } else {
            (1u32 << log_k) - 1
        };
        Self {
            aes: Aes::new(seed),
            mask,
        }
    }

    /// The D indices of every output of groups `g0..g0 + count` (D·GROUP per group).
    fn indices(&self, g0: usize, count: usize, blocks: &mut [Block], idx: &mut [u32]) {
        let blocks = &mut blocks[..count * BLOCKS];
        for (c, b) in blocks.iter_mut().enumerate() {
            *b = (g0 * BLOCKS + c) as Block;
        }
        self.aes.encrypt(blocks);
        for (c, b) in blocks.iter().enumerate() {
            for l in 0..4 {
                idx[4 * c + l] = ((b >> (32 * l)) as u32) & self.mask;
            }
        }
    }

    /// Row `i` of the matrix as its D indices (for tests and checks).
    #[cfg(test)]
    pub(crate) fn row(&self, i: usize) -> [u32; D] {
        let mut blocks = [0 as Block; BLOCKS];
        let mut idx = [0u32; GROUP * D];
        self.indices(i / GROUP, 1, &mut blocks, &mut idx);
        let o = i % GROUP;
        let mut r = [0u32; D];
        r.copy_from_slice(&idx[o * D..(o + 1) * D]);
        r
    }

    /// `out[i] ^= ⊕_j stock[idx(i, j)]` for every i (`out.len()` a multiple of 4,
    /// `stock.len()` = 2^log_k).
    pub(crate) fn encode(&self, out: &mut [Block], stock: &[Block]) {
        self.run(out.len(), stock.len(), |i, idx| {
            let mut acc = out[i];
            for &j in idx {
                acc ^= stock[j as usize];
            }
            out[i] = acc;
        });
    }

    /// The receiver's side: blocks as [`Self::encode`] and `bits[i] ^= ⊕_j stock_bits[idx]`.
    pub(crate) fn encode_with_bits(
        &self,
        out: &mut [Block],
        bits: &mut [u8],
        stock: &[Block],
        stock_bits: &[u8],
    ) {
        debug_assert_eq!(out.len(), bits.len());
        debug_assert_eq!(stock.len(), stock_bits.len());
        self.run(out.len(), stock.len(), |i, idx| {
            let mut acc = out[i];
            let mut bit = bits[i];
            for &j in idx {
                acc ^= stock[j as usize];
                bit ^= stock_bits[j as usize];
            }
            out[i] = acc;
            bits[i] = bit;
        });
    }

    fn run(&self, n: usize, k: usize, mut f: impl FnMut(usize, &[u32])) {
        assert!(
            n.is_multiple_of(GROUP) && k > self.mask as usize,
            "LPN code: {n} outputs, stock of {k}"
        );
        let groups = n / GROUP;
        let mut blocks = vec![0 as Block; BATCH * BLOCKS];
        let mut idx = vec![0u32; BATCH * GROUP * D];
        let mut g0 = 0;
        while g0 < groups {
            let count = BATCH.min(groups - g0);
            self.indices(g0, count, &mut blocks, &mut idx);
            for (r, row) in idx[..count * GROUP * D].chunks_exact(D).enumerate() {
                f(g0 * GROUP + r, row);
            }
            g0 += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive matrix-vector product over F_2^128: the dense matrix from the rows, then
    /// y_i = ⊕_{j: A[i][j] = 1} x_j.
    fn naive(code: &LpnCode, n: usize, k: usize, x: &[Block]) -> Vec<Block> {
        let mut a = vec![vec![0u8; k]; n];
        for (i, row) in a.iter_mut().enumerate() {
            for j in code.row(i) {
                row[j as usize] ^= 1;
            }
        }
        a.iter()
            .map(|row| {
                row.iter()
                    .zip(x)
                    .filter(|(b, _)| **b == 1)
                    .fold(0, |acc, (_, v)| acc ^ v)
            })
            .collect()
    }

    #[test]
    fn code_equals_naive_matrix_vector_product() {
        let (log_k, n) = (6u32, 300usize);
        let k = 1usize << log_k;
        let code = LpnCode::new(0x5eed, log_k);
        let x: Vec<Block> = (0..k as u128)
            .map(|j| j.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) ^ 7)
            .collect();
        let mut y: Vec<Block> = (0..n as u128).collect();
        code.encode(&mut y, &x);
        let want = naive(&code, n, k, &x);
        for i in 0..n {
            assert_eq!(y[i], want[i] ^ i as Block, "row {i}");
        }
        // bits follow the same rows
        let u: Vec<u8> = (0..k).map(|j| (j % 3 == 0) as u8).collect();
        let mut z = vec![0 as Block; n];
        let mut bits = vec![0u8; n];
        code.encode_with_bits(&mut z, &mut bits, &x, &u);
        for i in 0..n {
            let b = code.row(i).iter().fold(0, |a, &j| a ^ u[j as usize]);
            assert_eq!(bits[i], b);
            assert_eq!(z[i], want[i]);
        }
    }

    #[test]
    fn rows_are_in_range_distinct_per_seed_and_spread() {
        let code = LpnCode::new(1, 10);
        let other = LpnCode::new(2, 10);
        let mut hits = vec![0u32; 1024];
        let mut same = 0;
        for i in 0..4096 {
            let r = code.row(i);
            assert!(r.iter().all(|&j| j < 1024));
            same += usize::from(r == other.row(i));
            for j in r {
                hits[j as usize] += 1;
            }
        }
        assert_eq!(same, 0);
        // 40,960 indices over 1,024 columns: about 40 each
        assert!(hits.iter().all(|&h| (10..90).contains(&h)), "{hits:?}");
        // the first row by hand: lanes of AES_seed(0) and AES_seed(1), AES_seed(2)'s low half
        let aes = Aes::new(1);
        let mut b = [0 as Block, 1, 2];
        aes.encrypt(&mut b);
        let lane = |x: Block, l: u32| ((x >> (32 * l)) as u32) & 1023;
        let by_hand = [
            lane(b[0], 0),
            lane(b[0], 1),
            lane(b[0], 2),
            lane(b[0], 3),
            lane(b[1], 0),
            lane(b[1], 1),
            lane(b[1], 2),
            lane(b[1], 3),
            lane(b[2], 0),
            lane(b[2], 1),
        ];
        assert_eq!(code.row(0), by_hand);
    }
}
