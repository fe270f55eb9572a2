//! Argmax over each row of a shared matrix: a tournament tree of comparisons and
//! multiplexers (the tournament of CrypTFlow2/SecureML argmax), all rows of a level batched.
//!
//! ```text
//!   level 0: candidates (x_j, j) for j < cols (index shares: server j, client 0)
//!   each level, for every row and every pair (left, right) of adjacent candidates:
//!       d    = DReLU(left.x - right.x)           millionaire on l-1 bits, all pairs at once
//!       pick = 1 ⊕ d   (right wins only if strictly greater: ties keep the smaller index)
//!       (x, j) = left + pick·(right - left)      MUX with 2 lanes (value, index)
//!   an odd last candidate goes up unchanged; ceil(log2 cols) levels; the COTs of all
//!   levels are reserved before the first
//!   argmax_reveal: the server sends its index shares to the client (one flight)
//! ```
//!
//! Exactness: `left.x - right.x` must not wrap, i.e. every two values of a row differ by
//! less than 2^(l-1) as signed values. [`argmax_precondition`] checks the sufficient
//! condition that all values lie in [-2^(l-2), 2^(l-2)); the output of `trunc` by f ≥ 1
//! always satisfies it. The tournament returns the first argmax: each node returns the
//! first argmax of its range, by induction (the left range precedes the right one).

use super::millionaire::{carry_groups, mill_cots};
use super::{MpcError, MpcSession};
use crate::channel::Channel;
use crate::ot::{Party, RandomCot};
use crate::ring::Ring;

/// Whether `values` (signed readings) lie in [-2^(l-2), 2^(l-2)), which makes
/// [`MpcSession::argmax`] exact. The evaluator can run it on the plaintext logits.
pub fn argmax_precondition(ring: Ring, values: &[i64]) -> bool {
    let b = ring.bits();
    if b < 2 {
        return false;
    }
    let lim = 1i128 << (b - 2);
    values.iter().all(|&v| (-lim..lim).contains(&i128::from(v)))
}

impl<C: RandomCot> MpcSession<C> {
    /// Shares (mod 2^l) of the first argmax index of each row of `x` (row-major, `cols`
    /// per row). Cost: see [`super::cost::argmax`].
    pub fn argmax(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        cols: usize,
    ) -> Result<Vec<u64>, MpcError> {
        self.guarded(|s| s.argmax_inner(ch, ring, x, cols))
    }

    /// The first argmax of each row, revealed to `to` only (`Some(labels)` there, `None`
    /// at the other party): the values never leave the protocol.
    pub fn argmax_reveal(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        cols: usize,
        to: Party,
    ) -> Result<Option<Vec<usize>>, MpcError> {
        let idx = self.argmax(ch, ring, x, cols)?;
        let r = self.reveal(ch, ring, &idx, to)?;
        match r {
            None => Ok(None),
            Some(v) => {
                if let Some(bad) = v.iter().find(|&&i| i as usize >= cols) {
                    self.guarded(|_| {
                        Err(MpcError::BadInput(format!("revealed index {bad} ≥ {cols}")))
                    })
                } else {
                    Ok(Some(v.into_iter().map(|i| i as usize).collect()))
                }
            }
        }
    }

    fn argmax_inner(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        cols: usize,
    ) -> Result<Vec<u64>, MpcError> {
        super::check_shares(ring, x)?;
        if cols == 0
            || !x.len().is_multiple_of(cols)
            || ring.bits() < 2
            || (cols as u128) > u128::from(ring.mask())
        {
            return Err(MpcError::BadInput(format!(
                "argmax of {} values in rows of {cols}",
                x.len()
            )));
        }
        let rows = x.len() / cols;
        let server = self.is_server();
        // candidates per row: (value, index) shares
        let mut vals: Vec<Vec<u64>> = (0..rows)
            .map(|r| x[r * cols..(r + 1) * cols].to_vec())
            .collect();
        let mut idxs: Vec<Vec<u64>> = (0..rows)
            .map(|_| {
                (0..cols as u64)
                    .map(|j| if server { j } else { 0 })
                    .collect()
            })
            .collect();
        // COTs of every level, reserved at once (one extension instead of one per level).
        let (mut need_s, mut need_c) = (0, 0);
        let mut len = cols;
        while len > 1 {
            let n = rows * (len / 2);
            let (a, b) = mill_cots(
                self.cfg.leaf_bits,
                self.kn_from_cots(),
                &carry_groups(ring.bits() - 1, n),
            );
            need_s += a + n;
            need_c += b + n;
            len = len.div_ceil(2);
        }
        let mut need = (need_s, need_c); // reserved with the first level's leaves
        let mut len = cols;
        while len > 1 {
            let pairs = len / 2;
            let n = rows * pairs;
            let mut diff = Vec::with_capacity(n);
            let mut delta = Vec::with_capacity(2 * n);
            for r in 0..rows {
                for p in 0..pairs {
                    let (l, h) = (2 * p, 2 * p + 1);
                    diff.push(ring.sub(vals[r][l], vals[r][h]));
                    delta.push(ring.sub(vals[r][h], vals[r][l]));
                    delta.push(ring.sub(idxs[r][h], idxs[r][l]));
                }
            }
            let d = self.drelu_inner(ch, ring, &diff, std::mem::take(&mut need))?;
            // pick right iff right > left strictly: 1 ⊕ [left - right ≥ 0]
            let pick: Vec<u8> = d.iter().map(|&b| b ^ u8::from(server)).collect();
            let sel = self.mux_inner(ch, ring, &pick, &delta, 2)?;
            let mut k = 0;
            for r in 0..rows {
                let mut nv = Vec::with_capacity(len.div_ceil(2));
                let mut ni = Vec::with_capacity(len.div_ceil(2));
                for p in 0..pairs {
                    nv.push(ring.add(vals[r][2 * p], sel[2 * k]));
                    ni.push(ring.add(idxs[r][2 * p], sel[2 * k + 1]));
                    k += 1;
                }
                if len % 2 == 1 {
                    nv.push(vals[r][len - 1]);
                    ni.push(idxs[r][len - 1]);
                }
                vals[r] = nv;
                idxs[r] = ni;
            }
            len = len.div_ceil(2);
        }
        Ok(idxs.into_iter().map(|v| v[0]).collect())
    }
}
