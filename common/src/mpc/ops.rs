//! DReLU, the multiplexer, ReLU, B2A, exact truncation and reveal.
//!
//! ```text
//!  DReLU (CrypTFlow2, DReLU from the millionaire):  S: a = x_S mod 2^(l-1)   C: b = 2^(l-1)-1 - (x_C mod 2^(l-1))
//!        carry = millionaire(a > b) = [x_S' + x_C' ≥ 2^(l-1)]
//!        drelu_S = msb(x_S) ⊕ carry_S ⊕ 1,  drelu_C = msb(x_C) ⊕ carry_C
//!  MUX (Cheetah, ePrint 2022/207, multiplexer from 2 COTs): z = (d_S ⊕ d_C)·x
//!        S ──▶ C COT, choice d_C, δ = (1-2d_S)·x_S    C ──▶ S COT, choice d_S, δ = (1-2d_C)·x_C
//!        flights: both send choice corrections, then both send COT replies
//!  ReLU = MUX(DReLU(x), x)                      (CrypTFlow2, ReLU from DReLU)
//!  B2A  d = d_S + d_C - 2·d_S·d_C: one COT S ──▶ C, choice d_C, δ = -2·d_S  (CrypTFlow2, B2A by COT_l)
//!  Truncation by f, exact floor of the signed value (CrypTFlow2, faithful truncation: wrap and low-bit carry):
//!        x >> f = (x_S >> f) + (x_C >> f) + c - 2^(l-f)·(w + msb(x))
//!        c = [x_S mod 2^f + x_C mod 2^f ≥ 2^f]           (millionaire on f bits)
//!        w = [x_S + x_C ≥ 2^l] = maj(m_S, m_C, carry),  msb(x) = m_S ⊕ m_C ⊕ carry
//!        (m_P = msb(x_P), carry from the (l-1)-bit millionaire of DReLU; both
//!        millionaires run in the same flights). The term c - 2^(l-f)(w + msb) is a
//!        function of the server's m_S, carry_S, c_S and the client's m_C, carry_C, c_C:
//!        one 1-of-8 OT_l, server sender, client's choice (m_C, carry_C, c_C).
//!  trunc_nonneg (known msb(x) = 0, e.g. after ReLU; Cheetah's known-MSB idea, made exact):
//!        w = m_S ∨ m_C, no (l-1)-bit millionaire; c by the f-bit millionaire;
//!        B2A of c and the cross term m_S·m_C by two COTs S ──▶ C.
//!  relu_trunc = max(0, x >> f) = DReLU(x)·(x >> f), fused: the 1-of-8 table carries
//!        d·((x_S >> f) + c - 2^(l-f)(w + msb)) with d = 1 ⊕ msb(x), and one COT C ──▶ S
//!        (choice d_S) adds d·(x_C >> f).
//!  reveal: the sender sends its shares (l bits each), the receiver adds.
//! ```

use super::millionaire::{carry_groups, carry_input, mill_cots};
use super::{MpcError, MpcSession, check_shares, recv_len, recv_ring};
use crate::channel::Channel;
use crate::ot::{Party, RandomCot};
use crate::ring::Ring;

/// All ones where bit 0 of `d` is 1, else zero: selects by a secret bit without a branch.
#[inline]
fn bit_mask(d: u8) -> u64 {
    0u64.wrapping_sub(u64::from(d & 1))
}

impl<C: RandomCot> MpcSession<C> {
    pub(crate) fn kn_from_cots(&self) -> bool {
        !self.ot.uses_kk13()
    }

    /// Reserves `(server-sender, client-sender)` COTs, mirrored for our role.
    pub(crate) fn reserve_dirs(
        &mut self,
        ch: &mut dyn Channel,
        s2c: usize,
        c2s: usize,
    ) -> Result<(), MpcError> {
        if self.is_server() {
            self.ot.reserve(ch, s2c, c2s)?;
        } else {
            self.ot.reserve(ch, c2s, s2c)?;
        }
        Ok(())
    }

    fn check_ring(ring: Ring, x: &[u64]) -> Result<(), MpcError> {
        if ring.bits() < 2 {
            return Err(MpcError::BadInput("ring of fewer than 2 bits".into()));
        }
        check_shares(ring, x)
    }

    /// Carries `[x_S mod 2^b + x_C mod 2^b ≥ 2^b]` of every element for every width b in
    /// `widths`, all in one millionaire run; returns one bit vector per width.
    pub(crate) fn carries(
        &mut self,
        ch: &mut dyn Channel,
        x: &[u64],
        widths: &[u32],
        need: (usize, usize),
    ) -> Result<Vec<Vec<u8>>, MpcError> {
        let mut groups = Vec::new();
        let mut inputs = Vec::new();
        let mut per = Vec::new();
        for &b in widths {
            let g = carry_groups(b, x.len());
            per.push(g.len());
            groups.extend(g);
            inputs.extend(carry_input(self.party, x, b));
        }
        let refs: Vec<&[u64]> = inputs.iter().map(|v| v.as_slice()).collect();
        let out = self.millionaire(ch, &groups, &refs, need)?;
        let mut it = out.into_iter();
        Ok(per
            .into_iter()
            .map(|k| it.by_ref().take(k).flatten().collect())
            .collect())
    }

    pub(crate) fn drelu_inner(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        need: (usize, usize),
    ) -> Result<Vec<u8>, MpcError> {
        let carry = self
            .carries(ch, x, &[ring.bits() - 1], need)?
            .swap_remove(0);
        let server = u8::from(self.is_server());
        Ok(x.iter()
            .zip(&carry)
            .map(|(&v, &c)| u8::from(ring.msb(v)) ^ c ^ server)
            .collect())
    }

    /// XOR shares of DReLU(x) = [x ≥ 0] (signed) for every element.
    /// Cost: see [`super::cost::drelu`].
    pub fn drelu(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
    ) -> Result<Vec<u8>, MpcError> {
        self.guarded(|s| {
            Self::check_ring(ring, x)?;
            let g = carry_groups(ring.bits() - 1, x.len());
            let (a, b) = mill_cots(s.cfg.leaf_bits, s.kn_from_cots(), &g);
            s.drelu_inner(ch, ring, x, (a, b))
        })
    }

    /// The multiplexer core: shares of `d·x[i*w+v]` (d XOR-shared, x additive), `w` lanes
    /// per choice bit. Needs n COTs each way reserved.
    pub(crate) fn mux_inner(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        d: &[u8],
        x: &[u64],
        w: usize,
    ) -> Result<Vec<u64>, MpcError> {
        let n = d.len();
        if x.len() != n * w {
            return Err(MpcError::BadInput(format!(
                "mux of {n} bits and {} values",
                x.len()
            )));
        }
        // Cheetah MUX: we receive the peer's COT with our bit as choice ...
        let (st, msg) = self.ot.cot_choose(d)?;
        ch.send_vec(msg)?;
        let peer_d = recv_len(ch, "mux choice corrections", n.div_ceil(8))?;
        // ... and send ours with δ = (1 - 2·d_ours)·x_ours.
        let corr: Vec<u64> = x
            .iter()
            .enumerate()
            .map(|(k, &v)| v ^ ((ring.neg(v) ^ v) & bit_mask(d[k / w])))
            .collect();
        let (r, reply) = self.ot.cot_respond(ring, &peer_d, &corr, w)?;
        ch.send_vec(reply)?;
        let peer_reply = recv_len(ch, "mux COT reply", ring.packed_len(n * w))?;
        let y = self.ot.cot_finish(st, ring, &peer_reply, w)?;
        Ok((0..n * w)
            .map(|k| {
                let own = x[k] & bit_mask(d[k / w]);
                ring.add(ring.sub(own, r[k]), y[k])
            })
            .collect())
    }

    /// Shares of `d·x` for XOR-shared bits `d` and additive shares `x` (same length).
    /// Cost: see [`super::cost::mux`].
    pub fn mux(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        d: &[u8],
        x: &[u64],
    ) -> Result<Vec<u64>, MpcError> {
        self.guarded(|s| {
            check_shares(ring, x)?;
            s.reserve_dirs(ch, d.len(), d.len())?;
            s.mux_inner(ch, ring, d, x, 1)
        })
    }

    /// Shares of ReLU(x) = max(0, x) (signed) for every element.
    /// Cost: see [`super::cost::relu`].
    pub fn relu(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
    ) -> Result<Vec<u64>, MpcError> {
        self.guarded(|s| {
            Self::check_ring(ring, x)?;
            let n = x.len();
            let g = carry_groups(ring.bits() - 1, x.len());
            let (a, b) = mill_cots(s.cfg.leaf_bits, s.kn_from_cots(), &g);
            let d = s.drelu_inner(ch, ring, x, (a + n, b + n))?;
            s.mux_inner(ch, ring, &d, x, 1)
        })
    }

    /// Additive shares mod 2^l of XOR-shared bits. Cost: see [`super::cost::b2a`].
    pub fn b2a(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        d: &[u8],
    ) -> Result<Vec<u64>, MpcError> {
        self.guarded(|s| {
            let n = d.len();
            s.reserve_dirs(ch, n, 0)?;
            if s.is_server() {
                let msg = recv_len(ch, "B2A choice corrections", n.div_ceil(8))?;
                let corr: Vec<u64> = d
                    .iter()
                    .map(|&b| ring.neg(ring.mul(2, u64::from(b & 1))))
                    .collect();
                let (r, reply) = s.ot.cot_respond(ring, &msg, &corr, 1)?;
                ch.send_vec(reply)?;
                Ok(d.iter()
                    .zip(&r)
                    .map(|(&b, &r)| ring.sub(u64::from(b & 1), r))
                    .collect())
            } else {
                let (st, msg) = s.ot.cot_choose(d)?;
                ch.send_vec(msg)?;
                let reply = recv_len(ch, "B2A COT reply", ring.packed_len(n))?;
                let y = s.ot.cot_finish(st, ring, &reply, 1)?;
                Ok(d.iter()
                    .zip(&y)
                    .map(|(&b, &y)| ring.add(u64::from(b & 1), y))
                    .collect())
            }
        })
    }

    fn check_f(ring: Ring, f: u32) -> Result<(), MpcError> {
        if f >= ring.bits() {
            return Err(MpcError::BadInput(format!(
                "truncation by {f} bits in a {}-bit ring",
                ring.bits()
            )));
        }
        Ok(())
    }

    /// Exact truncation `x >> f` (floor) of values known to be non-negative
    /// (x < 2^(l-1) as a signed value, e.g. ReLU outputs). Precondition: the caller knows
    /// msb(x) = 0; for other inputs the result is wrong. Cost: [`super::cost::trunc_nonneg`].
    pub fn trunc_nonneg(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        f: u32,
    ) -> Result<Vec<u64>, MpcError> {
        self.guarded(|s| {
            Self::check_ring(ring, x)?;
            Self::check_f(ring, f)?;
            if f == 0 {
                return Ok(x.to_vec());
            }
            let n = x.len();
            let g = carry_groups(f, n);
            let (a, b) = mill_cots(s.cfg.leaf_bits, s.kn_from_cots(), &g);
            let c = s.carries(ch, x, &[f], (a + 2 * n, b))?.swap_remove(0);
            let hi = 1u64 << (ring.bits() - f);
            let m: Vec<u8> = x.iter().map(|&v| u8::from(ring.msb(v))).collect();
            if s.is_server() {
                let msg = recv_len(ch, "trunc choice corrections", (2 * n).div_ceil(8))?;
                // B2A of c (δ = -2c_S) and the cross term of w = m_S ∨ m_C (δ = 2^(l-f)·m_S).
                let mut corr: Vec<u64> = c
                    .iter()
                    .map(|&b| ring.neg(ring.mul(2, u64::from(b))))
                    .collect();
                corr.extend(m.iter().map(|&b| ring.mul(hi, u64::from(b))));
                let (r, reply) = s.ot.cot_respond(ring, &msg, &corr, 1)?;
                ch.send_vec(reply)?;
                Ok((0..n)
                    .map(|i| {
                        let v = ring.add(x[i] >> f, u64::from(c[i]));
                        let v = ring.sub(v, ring.add(r[i], r[n + i]));
                        ring.sub(v, ring.mul(hi, u64::from(m[i])))
                    })
                    .collect())
            } else {
                let mut ch_bits = c.clone();
                ch_bits.extend_from_slice(&m);
                let (st, msg) = s.ot.cot_choose(&ch_bits)?;
                ch.send_vec(msg)?;
                let reply = recv_len(ch, "trunc COT reply", ring.packed_len(2 * n))?;
                let y = s.ot.cot_finish(st, ring, &reply, 1)?;
                Ok((0..n)
                    .map(|i| {
                        let v = ring.add(x[i] >> f, u64::from(c[i]));
                        let v = ring.add(v, ring.add(y[i], y[n + i]));
                        ring.sub(v, ring.mul(hi, u64::from(m[i])))
                    })
                    .collect())
            }
        })
    }

    /// Exact arithmetic shift `x >> f` (floor of the signed value), for every input.
    /// Cost: see [`super::cost::trunc`].
    pub fn trunc(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        f: u32,
    ) -> Result<Vec<u64>, MpcError> {
        self.guarded(|s| s.trunc_general(ch, ring, x, f, false))
    }

    /// `max(0, x >> f)` exactly, fused (one round trip less and one COT less than ReLU then
    /// truncation). Cost: see [`super::cost::relu_trunc`].
    pub fn relu_trunc(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        f: u32,
    ) -> Result<Vec<u64>, MpcError> {
        self.guarded(|s| {
            if f == 0 {
                Self::check_ring(ring, x)?;
                let n = x.len();
                let g = carry_groups(ring.bits() - 1, x.len());
                let (a, b) = mill_cots(s.cfg.leaf_bits, s.kn_from_cots(), &g);
                let d = s.drelu_inner(ch, ring, x, (a + n, b + n))?;
                return s.mux_inner(ch, ring, &d, x, 1);
            }
            s.trunc_general(ch, ring, x, f, true)
        })
    }

    fn trunc_general(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        f: u32,
        relu: bool,
    ) -> Result<Vec<u64>, MpcError> {
        Self::check_ring(ring, x)?;
        Self::check_f(ring, f)?;
        if f == 0 {
            return Ok(x.to_vec());
        }
        let n = x.len();
        let l = ring.bits();
        let mut g = carry_groups(l - 1, n);
        g.extend(carry_groups(f, n));
        let (mut a, mut b) = mill_cots(self.cfg.leaf_bits, self.kn_from_cots(), &g);
        if self.kn_from_cots() {
            a += 3 * n; // the 1-of-8 OT from 3 COTs
        }
        if relu {
            b += n; // the COT C -> S adding d·(x_C >> f)
        }
        let mut out = self.carries(ch, x, &[l - 1, f], (a, b))?;
        let c = out.pop().unwrap_or_default();
        let carry = out.pop().unwrap_or_default();
        let hi = 1u64 << (l - f);
        let m: Vec<u8> = x.iter().map(|&v| u8::from(ring.msb(v))).collect();
        if self.is_server() {
            // Flight 1 in: the client's 1-of-8 choose message; out: our COT choice (relu).
            let d_s: Vec<u8> = (0..n).map(|i| 1 ^ m[i] ^ carry[i]).collect();
            let cot_st = if relu {
                let (st, msg) = self.ot.cot_choose(&d_s)?;
                ch.send_vec(msg)?;
                Some(st)
            } else {
                None
            };
            let msg = recv_len(ch, "trunc 1-of-8 OT", self.ot.kn_choose_len(n, 3))?;
            let rs: Vec<u64> = (0..n).map(|_| ring.random(&mut self.prg)).collect();
            // Table entry for the client's (u = m_C, v = carry_C, z = c_C).
            let reply = self.ot.kn_respond(&msg, n, 3, l, |i, j| {
                let (u, v, z) = ((j & 1) as u8, ((j >> 1) & 1) as u8, ((j >> 2) & 1) as u8);
                let cy = carry[i] ^ v;
                let cc = c[i] ^ z;
                let msb = m[i] ^ u ^ cy;
                let w = (m[i] & u) | (cy & (m[i] ^ u));
                let val = ring.sub(u64::from(cc), ring.mul(hi, u64::from(w + msb)));
                let val = if relu {
                    if msb == 0 {
                        ring.add(val, x[i] >> f)
                    } else {
                        0
                    }
                } else {
                    val
                };
                ring.sub(val, rs[i])
            })?;
            ch.send_vec(reply)?;
            let mut share: Vec<u64> = if relu {
                rs
            } else {
                (0..n).map(|i| ring.add(x[i] >> f, rs[i])).collect()
            };
            if let (Some(st), true) = (cot_st, relu) {
                let r = recv_len(ch, "relu_trunc COT reply", ring.packed_len(n))?;
                let y = self.ot.cot_finish(st, ring, &r, 1)?;
                for (s, y) in share.iter_mut().zip(y) {
                    *s = ring.add(*s, y);
                }
            }
            Ok(share)
        } else {
            let choices: Vec<u16> = (0..n)
                .map(|i| u16::from(m[i] | (carry[i] << 1) | (c[i] << 2)))
                .collect();
            let (st, msg) = self.ot.kn_choose(&choices, 3, l)?;
            ch.send_vec(msg)?;
            let d_c: Vec<u8> = (0..n).map(|i| m[i] ^ carry[i]).collect();
            let mut own = vec![0u64; n];
            if relu {
                let peer_d = recv_len(ch, "relu_trunc choice corrections", n.div_ceil(8))?;
                let corr: Vec<u64> = (0..n)
                    .map(|i| {
                        let v = x[i] >> f;
                        if d_c[i] == 1 { ring.neg(v) } else { v }
                    })
                    .collect();
                let (r, reply) = self.ot.cot_respond(ring, &peer_d, &corr, 1)?;
                ch.send_vec(reply)?;
                for i in 0..n {
                    own[i] = ring.sub(if d_c[i] == 1 { x[i] >> f } else { 0 }, r[i]);
                }
            }
            let len = (n * 8 * l as usize).div_ceil(8);
            let reply = recv_len(ch, "trunc 1-of-8 OT reply", len)?;
            let v = self.ot.kn_finish(st, n, 3, &reply, l)?;
            Ok((0..n)
                .map(|i| {
                    let base = if relu { own[i] } else { x[i] >> f };
                    ring.add(base, v[i])
                })
                .collect())
        }
    }

    /// Opens shares to `to`: returns `Some(values)` there and `None` at the other party.
    /// One flight, `l` bits per element. Cost: see [`super::cost::reveal`].
    pub fn reveal(
        &mut self,
        ch: &mut dyn Channel,
        ring: Ring,
        x: &[u64],
        to: Party,
    ) -> Result<Option<Vec<u64>>, MpcError> {
        self.guarded(|s| {
            check_shares(ring, x)?;
            if s.party == to {
                let peer = recv_ring(ch, "reveal shares", ring, x.len())?;
                Ok(Some(
                    x.iter().zip(peer).map(|(&a, b)| ring.add(a, b)).collect(),
                ))
            } else {
                ch.send_vec(ring.pack(x))?;
                ch.flush()?;
                Ok(None)
            }
        })
    }
}
