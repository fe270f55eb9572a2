//! GGM trees (Goldreich, Goldwasser, Micali) with fixed-key AES as the length-doubling
//! PRG: the punctured PRF of Ferret's single-point COT (Ferret §3, after Boyle et al.
//! CCS 2019 and Schoppmann et al. CCS 2019).
//!
//! ```text
//!   G(s) = (π_L(s) ⊕ s, π_R(s) ⊕ s)        π_L, π_R: AES-128 under two fixed public keys
//!
//!   level 0:                 s
//!   level 1:          x_0         x_1          K^1_0 = x_0,  K^1_1 = x_1
//!   level 2:       x_00  x_01  x_10  x_11      K^2_0 = x_00 ⊕ x_10, K^2_1 = x_01 ⊕ x_11
//!   ...            node j of level i has children 2j (left) and 2j+1 (right) at level i+1;
//!                  K^i_b = XOR of the nodes of level i at positions ≡ b (mod 2)
//! ```
//!
//! A receiver who knows, for every level i, the sum K^i_{r_i} of the side *off* its path
//! (r_i = 1 − α_i for the path α = α_1..α_h, most significant first) rebuilds every leaf
//! but leaf α: at level i it expands the nodes it knows, and the off-path child of its
//! path node is K^i_{r_i} ⊕ (the other nodes of that parity). Leaves are in index order.
//! The PRG is the fixed-key "Davies-Meyer"-style construction of the reference
//! implementation (emp-ot `twokeyprp.h`), secure with AES modelled as an ideal cipher.

use super::super::Block;
use super::super::aesni::Aes;

/// The public AES keys of the PRG's two halves (any fixed distinct keys do; these are the
/// 16 ASCII bytes `"ferret GGM left\0"` and `"ferret GGM right"` read little-endian).
pub(crate) const KEY_LEFT: Block = key_from(b"ferret GGM left\0");
pub(crate) const KEY_RIGHT: Block = key_from(b"ferret GGM right");

const fn key_from(b: &[u8; 16]) -> Block {
    Block::from_le_bytes(*b)
}

/// The length-doubling PRG and scratch space for one tree depth.
pub(crate) struct Ggm {
    left: Aes,
    right: Aes,
    a: Vec<Block>,
    b: Vec<Block>,
}

impl Ggm {
    /// A PRG with scratch for trees of depth up to `h`.
    pub(crate) fn new(h: u32) -> Self {
        let half = 1usize << h.saturating_sub(1);
        Self {
            left: Aes::new(KEY_LEFT),
            right: Aes::new(KEY_RIGHT),
            a: vec![0; half],
            b: vec![0; half],
        }
    }

    /// Expands the `len` nodes in `nodes[..len]` into their `2·len` children in
    /// `nodes[..2·len]` (children of node j at 2j and 2j+1) and returns the XOR of the
    /// left children and the XOR of the right children.
    pub(crate) fn expand_level(&mut self, nodes: &mut [Block], len: usize) -> (Block, Block) {
        if self.a.len() < len {
            self.a.resize(len, 0);
            self.b.resize(len, 0);
        }
        let (a, b) = (&mut self.a[..len], &mut self.b[..len]);
        a.copy_from_slice(&nodes[..len]);
        b.copy_from_slice(&nodes[..len]);
        self.left.encrypt(a);
        self.right.encrypt(b);
        let (mut s0, mut s1) = (0, 0);
        // Downwards, so that no parent is overwritten before it is read (2j, 2j+1 ≥ j).
        for j in (0..len).rev() {
            let p = nodes[j];
            let l = a[j] ^ p;
            let r = b[j] ^ p;
            nodes[2 * j] = l;
            nodes[2 * j + 1] = r;
            s0 ^= l;
            s1 ^= r;
        }
        (s0, s1)
    }

    /// The sender's full tree: expands `seed` into `leaves` (2^h of them) and writes the
    /// level sums `(K^i_0, K^i_1)` for i = 1..=h into `sums[i-1]`.
    pub(crate) fn expand_tree(
        &mut self,
        seed: Block,
        leaves: &mut [Block],
        sums: &mut [[Block; 2]],
    ) {
        let h = sums.len();
        debug_assert_eq!(leaves.len(), 1 << h);
        leaves[0] = seed;
        for (i, s) in sums.iter_mut().enumerate() {
            let (s0, s1) = self.expand_level(leaves, 1 << i);
            *s = [s0, s1];
        }
    }

    /// The receiver's punctured tree: `off[i]` (0/1) is the parity of the off-path child at
    /// level i+1 and `known[i]` its level sum `K^{i+1}_{off[i]}`. Fills every leaf but the
    /// punctured one, which is left 0, and returns its index α (α_{i+1} = 1 − off[i]).
    pub(crate) fn expand_punctured(
        &mut self,
        off: &[u8],
        known: &[Block],
        leaves: &mut [Block],
    ) -> usize {
        let h = off.len();
        debug_assert_eq!(known.len(), h);
        debug_assert_eq!(leaves.len(), 1 << h);
        leaves[0] = 0; // the root is unknown; its (garbage) children are fixed below
        let mut p = 0usize;
        for i in 0..h {
            let (s0, s1) = self.expand_level(leaves, 1 << i);
            let r = usize::from(off[i] & 1);
            let garbage = leaves[2 * p + r];
            let side = if r == 0 { s0 } else { s1 };
            // K^{i+1}_r = (this node) ⊕ (every other node of parity r, as computed)
            leaves[2 * p + r] = known[i] ^ side ^ garbage;
            leaves[2 * p + 1 - r] = 0;
            p = 2 * p + 1 - r;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::Aes128;
    use aes::cipher::{BlockEncrypt, KeyInit};

    /// AES with the `aes` crate, independent of the AES-NI module.
    fn aes(key: Block, x: Block) -> Block {
        let c = Aes128::new(&key.to_le_bytes().into());
        let mut b = aes::Block::from(x.to_le_bytes());
        c.encrypt_block(&mut b);
        let mut o = [0u8; 16];
        o.copy_from_slice(&b);
        Block::from_le_bytes(o)
    }

    fn g(s: Block) -> (Block, Block) {
        (aes(KEY_LEFT, s) ^ s, aes(KEY_RIGHT, s) ^ s)
    }

    #[test]
    fn depth_two_tree_matches_expansion_by_hand() {
        let seed: Block = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff;
        // by hand: level 1 = G(seed), level 2 = G(x0) ‖ G(x1)
        let (x0, x1) = g(seed);
        let (x00, x01) = g(x0);
        let (x10, x11) = g(x1);
        let mut ggm = Ggm::new(2);
        let mut leaves = [0; 4];
        let mut sums = [[0; 2]; 2];
        ggm.expand_tree(seed, &mut leaves, &mut sums);
        assert_eq!(leaves, [x00, x01, x10, x11]);
        assert_eq!(sums[0], [x0, x1]);
        assert_eq!(sums[1], [x00 ^ x10, x01 ^ x11]);
        // the two halves of the PRG differ and depend on the seed
        assert_ne!(x0, x1);
        assert_ne!(g(seed ^ 1).0, x0);
    }

    #[test]
    fn punctured_tree_rebuilds_every_leaf_but_the_punctured_one() {
        for h in [1u32, 2, 5, 9] {
            let mut ggm = Ggm::new(h);
            let n = 1usize << h;
            let seed: Block = 0xfeed_0000_0000_0000_0000_0000_0000_0001 ^ u128::from(h);
            let mut leaves = vec![0; n];
            let mut sums = vec![[0; 2]; h as usize];
            ggm.expand_tree(seed, &mut leaves, &mut sums);
            for alpha in (0..n).step_by((n / 8).max(1)).chain([n - 1]) {
                // off-path parity at level i+1 is the complement of α's bit there
                let off: Vec<u8> = (0..h)
                    .map(|i| 1 - ((alpha >> (h - 1 - i)) & 1) as u8)
                    .collect();
                let known: Vec<Block> = (0..h as usize)
                    .map(|i| sums[i][usize::from(off[i])])
                    .collect();
                let mut got = vec![0; n];
                let a = Ggm::new(h).expand_punctured(&off, &known, &mut got);
                assert_eq!(a, alpha, "h={h}");
                for j in 0..n {
                    if j == alpha {
                        assert_eq!(got[j], 0);
                    } else {
                        assert_eq!(got[j], leaves[j], "h={h} alpha={alpha} leaf {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_level_sum_corrupts_leaves_below_it() {
        let h = 4u32;
        let mut ggm = Ggm::new(h);
        let mut leaves = vec![0; 16];
        let mut sums = vec![[0; 2]; 4];
        ggm.expand_tree(99, &mut leaves, &mut sums);
        let alpha = 6usize;
        let off: Vec<u8> = (0..h)
            .map(|i| 1 - ((alpha >> (h - 1 - i)) & 1) as u8)
            .collect();
        let mut known: Vec<Block> = (0..4).map(|i| sums[i][usize::from(off[i])]).collect();
        known[1] ^= 1;
        let mut got = vec![0; 16];
        ggm.expand_punctured(&off, &known, &mut got);
        let wrong = (0..16)
            .filter(|&j| j != alpha && got[j] != leaves[j])
            .count();
        assert!(wrong >= 4, "{wrong}");
    }
}
