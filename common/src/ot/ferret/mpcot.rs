//! Multi-point COT with regular noise from t single-point COTs (Ferret §3, Fig. 6 and
//! Fig. 5, semi-honest), one GGM tree per bin of 2^h positions.
//!
//! ```text
//!   sender S (Δ, h base COTs per tree: keys q_i)      receiver R (bits r_i, m_i = q_i ⊕ r_i·Δ)
//!   per tree: random seed s, leaves v_0..v_{2^h-1},   per tree: α = (1−r_1, ..., 1−r_h) in binary,
//!             level sums K^i_0, K^i_1                           most significant first
//!      ────── c^i_b = K^i_b ⊕ H(τ_i, q_i ⊕ b·Δ), b = 0, 1 (i = 1..h);  d = Δ ⊕ ⊕_j v_j ──────▶
//!                                                     K^i_{r_i} = c^i_{r_i} ⊕ H(τ_i, m_i),
//!                                                     w_j = v_j (j ≠ α) by the punctured tree,
//!                                                     w_α = d ⊕ ⊕_{j≠α} w_j = v_α ⊕ Δ
//!   output v (n = t·2^h blocks)                      output w = v ⊕ e·Δ, e = unit vector at α
//!                                                     in each bin (regular noise of weight t)
//! ```
//!
//! Choice bits ride in the least significant bit (as in the reference): Δ has LSB 1 and
//! the leaves are used with their LSB cleared (v_j ∧ ¬1, also inside d), so LSB(w_j) = e_j.
//!
//! The receiver's noise position is the complement of its random base-COT choice bits, so
//! it sends nothing (Ferret's SPCOT with the choice bits of F_COT used directly, as in the
//! reference implementation emp-ot `mpcot_reg.h`): the sender learns nothing, and α is
//! uniform in the bin. The correction d reveals v_α ⊕ Δ, which is the receiver's output
//! itself; v_α stays pseudo-random to the receiver (punctured PRF), so Δ stays hidden.
//! H is the TCCR hash with one fresh tweak τ per base COT (Guo et al. 2020).

use super::super::{Block, OtError, Tccr};
use super::ggm::Ggm;
use super::params::FerretParams;
use crate::ot::Prg;

/// The tweak of base COT number `idx` of direction `dir` (unique per session and purpose:
/// the Ferret hash has its own fixed key, see `ferret/mod.rs`).
#[inline]
pub(crate) fn tweak(dir: u8, idx: u64) -> Block {
    (u128::from(dir) << 64) | u128::from(idx)
}

/// Clears the least significant bit of every leaf and returns the XOR of the results.
fn mask_and_sum(tree: &mut [Block]) -> Block {
    let mut acc = 0;
    for v in tree.iter_mut() {
        *v &= !1;
        acc ^= *v;
    }
    acc
}

fn read_block(b: &[u8]) -> Block {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Block::from_le_bytes(a)
}

/// Sender of one MPCOT: expands tree after tree (v with LSBs clear) into a scratch buffer
/// and passes each to `emit(j, tree)`; returns the message (t·(2h + 1) blocks). `base`
/// holds the t·h base-COT keys (tree-major, level order); `tw0` is the first tweak index,
/// `tw0 + t·h` the next free one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send(
    p: &FerretParams,
    ggm: &mut Ggm,
    hash: &Tccr,
    prg: &mut Prg,
    delta: Block,
    base: &[Block],
    dir: u8,
    tw0: u64,
    mut emit: impl FnMut(usize, &mut [Block]),
) -> Vec<u8> {
    let h = p.h as usize;
    debug_assert_eq!(base.len(), p.t * h);
    // the level OTs' pads H(τ, q) and H(τ, q ⊕ Δ), all at once
    let base1: Vec<Block> = base.iter().map(|&q| q ^ delta).collect();
    let mut h0 = vec![0 as Block; base.len()];
    let mut h1 = vec![0 as Block; base.len()];
    hash.hash_many(base, |i| tweak(dir, tw0 + i as u64), &mut h0);
    hash.hash_many(&base1, |i| tweak(dir, tw0 + i as u64), &mut h1);
    let mut tree = vec![0 as Block; 1 << h];
    let mut sums = vec![[0 as Block; 2]; h];
    let mut msg = Vec::with_capacity(p.iteration_bytes());
    for j in 0..p.t {
        ggm.expand_tree(prg.block(), &mut tree, &mut sums);
        let d = delta ^ mask_and_sum(&mut tree);
        for (i, s) in sums.iter().enumerate() {
            // Ferret Fig. 5 (SPCOT), step 3: the level sums under the base OTs
            msg.extend_from_slice(&(s[0] ^ h0[j * h + i]).to_le_bytes());
            msg.extend_from_slice(&(s[1] ^ h1[j * h + i]).to_le_bytes());
        }
        // Fig. 5, step 4 (semi-honest, no consistency check)
        msg.extend_from_slice(&d.to_le_bytes());
        emit(j, &mut tree);
    }
    sums.iter_mut().for_each(|s| *s = [0, 0]);
    h0.iter_mut().chain(h1.iter_mut()).for_each(|x| *x = 0);
    tree.iter_mut().for_each(|x| *x = 0);
    msg
}

/// Receiver of one MPCOT: from the base COTs (`m`, t·h of them, choice bits in their LSB)
/// and the sender's message, rebuilds tree after tree (w, with e in the LSBs) and passes
/// each to `emit(j, tree)`. Returns the noise positions (one per tree, within the tree).
#[allow(clippy::too_many_arguments)]
pub(crate) fn recv(
    p: &FerretParams,
    ggm: &mut Ggm,
    hash: &Tccr,
    m: &[Block],
    dir: u8,
    tw0: u64,
    msg: &[u8],
    mut emit: impl FnMut(usize, &mut [Block]),
) -> Result<Vec<usize>, OtError> {
    let h = p.h as usize;
    if msg.len() != p.iteration_bytes() {
        return Err(OtError::msg(
            "Ferret SPCOT messages",
            crate::channel::ChannelError::LengthMismatch {
                expected: p.iteration_bytes(),
                actual: msg.len(),
            },
        ));
    }
    let mut hm = vec![0 as Block; m.len()];
    hash.hash_many(m, |i| tweak(dir, tw0 + i as u64), &mut hm);
    let mut known = vec![0 as Block; h];
    let mut off = vec![0u8; h];
    let mut tree = vec![0 as Block; 1 << h];
    let mut alphas = Vec::with_capacity(p.t);
    let per_tree = (2 * h + 1) * 16;
    for (j, part) in msg.chunks_exact(per_tree).enumerate() {
        for i in 0..h {
            off[i] = (m[j * h + i] & 1) as u8;
            let c = read_block(&part[(2 * i + usize::from(off[i])) * 16..]);
            known[i] = c ^ hm[j * h + i];
        }
        let alpha = ggm.expand_punctured(&off, &known, &mut tree);
        let d = read_block(&part[2 * h * 16..]);
        // leaf α is 0 here, so the sum runs over the others
        tree[alpha] = d ^ mask_and_sum(&mut tree);
        alphas.push(alpha);
        emit(j, &mut tree);
    }
    known.iter_mut().for_each(|k| *k = 0);
    hm.iter_mut().for_each(|k| *k = 0);
    tree.iter_mut().for_each(|x| *x = 0);
    Ok(alphas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpcot_outputs_differ_by_delta_at_one_uniform_position_per_bin() {
        let p = FerretParams {
            t: 40,
            h: 6,
            log_k: 4,
        };
        let delta: Block = 0x0123_4567_89ab_cdef_0f1e_2d3c_4b5a_6979;
        let hash = Tccr::new(77);
        let mut prg = Prg::new(5);
        let mut coins = Prg::new(6);
        let nb = p.t * p.h as usize;
        // base COTs in the LSB form: keys with LSB 0, Δ with LSB 1
        let mut q = vec![0 as Block; nb];
        coins.fill_blocks(&mut q);
        q.iter_mut().for_each(|x| *x &= !1);
        let bits = coins.bits(nb);
        let m: Vec<Block> = q
            .iter()
            .zip(&bits)
            .map(|(&q, &b)| if b == 1 { q ^ delta } else { q })
            .collect();
        let mut v = Vec::new();
        let mut ggm = Ggm::new(p.h);
        let msg = send(&p, &mut ggm, &hash, &mut prg, delta, &q, 1, 500, |_, t| {
            v.extend_from_slice(t)
        });
        assert_eq!(msg.len(), p.t * 13 * 16);
        let mut w = Vec::new();
        let alphas = recv(&p, &mut ggm, &hash, &m, 1, 500, &msg, |_, t| {
            w.extend_from_slice(t)
        })
        .unwrap();
        assert_eq!((v.len(), w.len()), (p.n(), p.n()));
        let bin = 1usize << p.h;
        for j in 0..p.t {
            // α is the complement of the tree's base choice bits, most significant first
            let want = (0..6).fold(0, |a, i| (a << 1) | usize::from(1 - bits[j * 6 + i]));
            assert_eq!(alphas[j], want);
            for x in 0..bin {
                let i = j * bin + x;
                assert_eq!(v[i] & 1, 0);
                assert_eq!(w[i] & 1, u128::from(x == want), "e in the LSB");
                assert_eq!(w[i], if x == want { v[i] ^ delta } else { v[i] });
            }
        }
        // positions spread over the bins (40 trees of 64 leaves)
        let distinct: std::collections::HashSet<_> = alphas.iter().collect();
        assert!(distinct.len() > 20);
        // a wrong tweak base breaks the correlation (the hash keys the level OTs)
        let mut w2 = Vec::new();
        recv(&p, &mut ggm, &hash, &m, 1, 501, &msg, |_, t| {
            w2.extend_from_slice(t)
        })
        .unwrap();
        assert_ne!(w2, w);
        // a short message is a named error
        let r = recv(&p, &mut ggm, &hash, &m, 1, 500, &msg[1..], |_, _| ());
        assert!(matches!(
            r,
            Err(OtError::Message {
                what: "Ferret SPCOT messages",
                ..
            })
        ));
    }
}
