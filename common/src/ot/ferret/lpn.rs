//! The local linear code of Ferret's primal-LPN step (Ferret §4, Fig. 7, after Boyle et al.
//! CCS 2019): output i of an iteration is the MPCOT output at i XOR the D = 10 stock
//! entries `stock[idx(i, 0..D)]`, i.e. `y = v ⊕ A·K` for a sparse public n × k matrix A
//! with (at most) D ones per row.
//!
//! ```text
//!   sender:   y_i = v_i ⊕ ⊕_j K[idx(i, j)]            (K: the sender's stock keys)
//!   receiver: z_i = w_i ⊕ ⊕_j M[idx(i, j)]            (M = K ⊕ u·Δ: the receiver's stock)
//!   then z_i = y_i ⊕ x_i·Δ with x = e ⊕ A·u, pseudo-random by primal LPN with regular
//!   noise e (one 1 per tree); x_i is the LSB of z_i (keys have LSB 0, Δ has LSB 1), so
//!   both sides run the same code on blocks only.
//! ```
//!
//! The matrix comes from a public seed: outputs 4g..4g+3 take their 40 indices, in order,
//! from the lanes of the AES blocks `AES_seed(B·g), ..., AES_seed(B·g + B − 1)`, each lane
//! masked to log2 k bits (k is a power of two, so every index is uniform; a repeated index
//! cancels, as in the XOR sum). Lanes are 21 bits wide, six to a block (B = 7) when
//! k ≤ 2^21 — three from each 64-bit half, at bits 0, 21, 42 of the half, so extracting
//! them takes 64-bit shifts only — else 32 bits, four to a block (B = 10, the reference's
//! layout, emp-ot `lpn_f2.h`); the narrow lanes save 30% of the AES. Written afresh; both
//! parties derive the seed from the session and the iteration.

use super::super::Block;
use super::super::aesni::{Aes, prefetch_l2};
use super::params::D;

/// Outputs per group (one group's indices come from B AES blocks).
const GROUP: usize = 4;
/// Most AES blocks per group (32-bit lanes).
const MAX_BLOCKS: usize = (GROUP * D).div_ceil(4);
/// Groups whose index blocks are encrypted in one call.
const BATCH: usize = 64;
/// Rows ahead whose stock entries are prefetched (see [`LpnCode::encode_at`]).
const PREFETCH: usize = 24;

/// Splits the blocks of whole groups into their `GROUP·D` indices each: six 21-bit lanes
/// per block (three from each 64-bit half) when `SIX`, else four 32-bit lanes, in order,
/// masked.
fn extract<const SIX: bool>(blocks: &[Block], idx: &mut [u32], mask: u32) {
    let per = GROUP * D;
    let lanes = if SIX { 6 } else { 4 };
    let nb = per.div_ceil(lanes);
    let mask = u64::from(mask);
    for (gb, out) in blocks.chunks_exact(nb).zip(idx.chunks_exact_mut(per)) {
        let mut all = [0u32; MAX_BLOCKS * 6];
        for (c, &b) in gb.iter().enumerate() {
            let (lo, hi) = (b as u64, (b >> 64) as u64);
            let l = &mut all[c * lanes..(c + 1) * lanes];
            if SIX {
                l[0] = (lo & mask) as u32;
                l[1] = ((lo >> 21) & mask) as u32;
                l[2] = ((lo >> 42) & mask) as u32;
                l[3] = (hi & mask) as u32;
                l[4] = ((hi >> 21) & mask) as u32;
                l[5] = ((hi >> 42) & mask) as u32;
            } else {
                l[0] = (lo & mask) as u32;
                l[1] = ((lo >> 32) & mask) as u32;
                l[2] = (hi & mask) as u32;
                l[3] = ((hi >> 32) & mask) as u32;
            }
        }
        out.copy_from_slice(&all[..per]);
    }
}

/// The public code of one iteration: n rows, D indices each, into a stock of 2^log_k.
pub(crate) struct LpnCode {
    aes: Aes,
    mask: u32,
    /// lanes per block: 6 of 21 bits, or 4 of 32 bits
    lanes: usize,
    /// AES blocks per group
    blocks: usize,
}

impl LpnCode {
    /// The code under the public `seed` for a stock of 2^`log_k` entries (`log_k` ≤ 32).
    pub(crate) fn new(seed: Block, log_k: u32) -> Self {
        let mask = if log_k >= 32 {
            u32::MAX
        } else {
            (1u32 << log_k) - 1
        };
        let lanes = if log_k <= 21 { 6 } else { 4 };
        Self {
            aes: Aes::new(seed),
            mask,
            lanes,
            blocks: (GROUP * D).div_ceil(lanes),
        }
    }

    /// The D indices of every output of groups `g0..g0 + count` (D·GROUP per group).
    fn indices(&self, g0: usize, count: usize, blocks: &mut [Block], idx: &mut [u32]) {
        let nb = self.blocks;
        let blocks = &mut blocks[..count * nb];
        for (c, b) in blocks.iter_mut().enumerate() {
            *b = (g0 * nb + c) as Block;
        }
        self.aes.encrypt(blocks);
        if self.lanes == 6 {
            extract::<true>(blocks, idx, self.mask);
        } else {
            extract::<false>(blocks, idx, self.mask);
        }
    }

    /// Row `i` of the matrix as its D indices (for tests and checks).
    #[cfg(test)]
    pub(crate) fn row(&self, i: usize) -> [u32; D] {
        let mut blocks = [0 as Block; MAX_BLOCKS];
        let mut idx = [0u32; GROUP * D];
        self.indices(i / GROUP, 1, &mut blocks, &mut idx);
        let o = i % GROUP;
        let mut r = [0u32; D];
        r.copy_from_slice(&idx[o * D..(o + 1) * D]);
        r
    }

    /// `out[r] ^= ⊕_j stock[idx(first + r, j)]` for every r: rows `first..first + out.len()`
    /// of the code (`first` and `out.len()` multiples of 4, `stock.len()` ≥ 2^log_k).
    ///
    /// Memory-bound: D random reads from a stock of megabytes per output. The indices of a
    /// batch of 256 rows are computed first and the stock entries of row r + [`PREFETCH`]
    /// are prefetched into L2 while row r is summed (measured on the shared 2-core EPYC:
    /// CPU per ReLU 7.4 → 5.1 µs with both parties in one process; distances 16 to 32
    /// rows were equal within noise, prefetching into L1 was worse).
    pub(crate) fn encode_at(&self, out: &mut [Block], first: usize, stock: &[Block]) {
        assert!(
            first.is_multiple_of(GROUP)
                && out.len().is_multiple_of(GROUP)
                && stock.len() > self.mask as usize,
            "LPN code: rows {first}+{}, stock of {}",
            out.len(),
            stock.len()
        );
        // a slice of exactly mask + 1 entries: `x & mask` needs no bounds check
        let mask = self.mask;
        let stock = &stock[..=mask as usize];
        let g_first = first / GROUP;
        let groups = out.len() / GROUP;
        let mut blocks = [0 as Block; BATCH * MAX_BLOCKS];
        let mut idx = [0u32; BATCH * GROUP * D];
        let mut g = 0;
        while g < groups {
            let count = BATCH.min(groups - g);
            self.indices(g_first + g, count, &mut blocks, &mut idx);
            let rows = &mut out[g * GROUP..(g + count) * GROUP];
            let n = rows.len();
            for r in 0..n {
                if r + PREFETCH < n {
                    for &j in &idx[(r + PREFETCH) * D..(r + PREFETCH + 1) * D] {
                        prefetch_l2(&stock[(j & mask) as usize]);
                    }
                }
                let mut a = rows[r];
                for &j in &idx[r * D..(r + 1) * D] {
                    a ^= stock[(j & mask) as usize];
                }
                rows[r] = a;
            }
            g += count;
        }
    }

    /// [`Self::encode_at`] from row 0.
    #[cfg(test)]
    pub(crate) fn encode(&self, out: &mut [Block], stock: &[Block]) {
        self.encode_at(out, 0, stock);
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
    }

    #[test]
    fn encoding_a_range_of_rows_equals_the_same_rows_of_the_whole() {
        let code = LpnCode::new(9, 8);
        let x: Vec<Block> = (0..256u128).map(|j| (j << 64) | (j * 77)).collect();
        let mut whole: Vec<Block> = (0..1024u128).collect();
        code.encode(&mut whole, &x);
        let mut part: Vec<Block> = (512..768u128).collect();
        code.encode_at(&mut part, 512, &x);
        assert_eq!(part[..], whole[512..768]);
        // a longer stock than 2^log_k is fine (only the first 2^log_k entries are read)
        let mut longer = x.clone();
        longer.extend_from_slice(&[u128::MAX; 5]);
        let mut again: Vec<Block> = (0..1024u128).collect();
        code.encode(&mut again, &longer);
        assert_eq!(again, whole);
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
        // rows by hand: k = 2^10, so 21-bit lanes, six per block, seven blocks per group;
        // row 0 = the six lanes of AES_seed(0) and four of AES_seed(1), row 1 starts with
        // the last two lanes of AES_seed(1); group 1 starts at AES_seed(7)
        let aes = Aes::new(1);
        let mut b: Vec<Block> = (0..9).collect();
        aes.encrypt(&mut b);
        // lanes 0-2 at bits 0, 21, 42 of the low half, lanes 3-5 at bits 64, 85, 106
        let lane = |x: Block, l: u32| ((x >> (21 * l + u32::from(l >= 3))) as u32) & 1023;
        let row0: Vec<u32> = (0..6)
            .map(|l| lane(b[0], l))
            .chain((0..4).map(|l| lane(b[1], l)))
            .collect();
        assert_eq!(code.row(0).to_vec(), row0);
        assert_eq!(code.row(1)[..2], [lane(b[1], 4), lane(b[1], 5)]);
        let row4: Vec<u32> = (0..6)
            .map(|l| lane(b[7], l))
            .chain((0..4).map(|l| lane(b[8], l)))
            .collect();
        assert_eq!(code.row(4).to_vec(), row4);
        // a large stock (k > 2^21) uses 32-bit lanes, four per block
        let wide = LpnCode::new(1, 22);
        let lane32 = |x: Block, l: u32| ((x >> (32 * l)) as u32) & ((1 << 22) - 1);
        let w0: Vec<u32> = (0..4)
            .map(|l| lane32(b[0], l))
            .chain((0..4).map(|l| lane32(b[1], l)))
            .chain((0..2).map(|l| lane32(b[2], l)))
            .collect();
        assert_eq!(wide.row(0).to_vec(), w0);
    }
}
