//! The millionaire protocol of CrypTFlow2 (ePrint 2020/1002, Alg. 1), batched, over
//! several groups of comparisons of different widths at once.
//!
//! ```text
//!   sender: x (β bits)                              receiver: y (β bits)
//!   split into q = ceil(β/m) digits x_k, y_k of m bits (the top one may be shorter)
//!   [triples] 2 ROTs per AND node (no traffic): correlated bit triples (a; b, b')
//!   [leaves]  R ──▶ S : 1-of-2^m OT choose message for every leaf (choice y_k)
//!             S ──▶ R : table j ↦ (lt_k ⊕ [x_k > j], eq_k ⊕ [x_k = j])   (Alg. 1 steps 5-10)
//!                       (leaf 0 carries only the gt bit)
//!   [tree]    per level, both at once: open d = eq_hi ⊕ a, e = gt_lo ⊕ b, e' = eq_lo ⊕ b'
//!             gt = gt_hi ⊕ (eq_hi ∧ gt_lo),  eq = eq_hi ∧ eq_lo       (Alg. 1 steps 12-16)
//!   output: XOR shares of [x > y]
//! ```
//!
//! Groups of different widths and with either party as the sender run in the same
//! flights. The operations split each batch in two halves with the roles swapped, so
//! both parties do half of the table work (the sender hashes all 2^m entries of every
//! leaf, the receiver one) at the same time: two leaf flights each way instead of one,
//! about half the wall time.
//!
//! Triples (Beaver) from random OT: for the pair (a; b, b') with a = a_S ⊕ a_C, each cross
//! term a_P·b_Q comes from one ROT where P is the receiver with its random choice a_P and
//! Q is the sender whose 2-bit pads differ by b_Q (ALSZ 2013 / Demmler et al., ABY 2015, for the OT-based bit
//! triple). The eq of the lowest node at each level is never
//! needed, so its e' is not sent.

use zeroize::Zeroize;

use super::{MpcError, MpcSession, recv_bits, recv_len, send_bits};
use crate::channel::Channel;
use crate::ot::{Party, RandomCot};

/// One group of `n` comparisons of `bits`-bit values; `sender` holds the x's (and sends
/// the leaf tables), the other party the y's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MillGroup {
    pub(crate) bits: u32,
    pub(crate) n: usize,
    pub(crate) sender: Party,
}

/// The groups computing the carries `[a_S + a_C ≥ 2^bits]` of `n` pairs of `bits`-bit
/// shares: the first half with the server as sender, the second with the client (empty
/// halves dropped). See [`carry_input`].
pub(crate) fn carry_groups(bits: u32, n: usize) -> Vec<MillGroup> {
    let na = n / 2;
    [(na, Party::Server), (n - na, Party::Client)]
        .into_iter()
        .filter(|&(k, _)| k > 0)
        .map(|(k, sender)| MillGroup { bits, n: k, sender })
        .collect()
}

/// This party's inputs for [`carry_groups`]: the sender compares its low `bits` bits
/// against the receiver's `2^bits - 1 - low bits` (x > y ⟺ a_S + a_C ≥ 2^bits).
pub(crate) fn carry_input(me: Party, x: &[u64], bits: u32) -> Vec<Vec<u64>> {
    let low = |v: u64| {
        if bits >= 64 {
            v
        } else {
            v & ((1u64 << bits) - 1)
        }
    };
    let top = low(u64::MAX);
    let groups = carry_groups(bits, x.len());
    let mut out = Vec::with_capacity(groups.len());
    let mut at = 0;
    for g in groups {
        let part = &x[at..at + g.n];
        out.push(
            part.iter()
                .map(|&v| if g.sender == me { low(v) } else { top - low(v) })
                .collect(),
        );
        at += g.n;
    }
    out
}

/// One AND node of the tree at some level: positions in the level's list.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Node {
    pub(crate) hi: usize,
    pub(crate) lo: usize,
    /// whether the output's eq is needed (its position in the next level is not 0)
    pub(crate) need_eq: bool,
}

/// The leaf sizes (low digit first) for `bits` and leaf width at most `m`: the fewest
/// leaves, sizes as equal as possible, the larger ones first (leaf 0 carries only the gt
/// bit, so a larger table costs least there). E.g. 31 bits, m = 6: [6, 5, 5, 5, 5, 5]
/// (a 1-of-2 leaf would cost 256 bits with KK13 for one bit of input).
pub(crate) fn leaf_sizes(bits: u32, m: u32) -> Vec<u32> {
    let q = bits.div_ceil(m);
    let (base, rem) = (bits / q, bits % q);
    (0..q).map(|k| base + u32::from(k < rem)).collect()
}

/// The tree: per level, the combines (and whether an odd last position is carried).
pub(crate) fn tree(q: usize) -> Vec<Vec<Node>> {
    let mut levels = Vec::new();
    let mut len = q;
    while len > 1 {
        let mut lv = Vec::new();
        for p in (0..len - 1).step_by(2) {
            lv.push(Node {
                hi: p + 1,
                lo: p,
                need_eq: p / 2 > 0,
            });
        }
        levels.push(lv);
        len = len.div_ceil(2);
    }
    levels
}

/// COTs the millionaire takes: (server as sender, client as sender).
pub(crate) fn mill_cots(m: u32, kn_from_cots: bool, groups: &[MillGroup]) -> (usize, usize) {
    let mut s2c = 0;
    let mut c2s = 0;
    for g in groups {
        let sizes = leaf_sizes(g.bits, m);
        let nodes = sizes.len() - 1;
        s2c += g.n * nodes;
        c2s += g.n * nodes;
        if kn_from_cots {
            let k = g.n * sizes.iter().map(|&s| s as usize).sum::<usize>();
            match g.sender {
                Party::Server => s2c += k,
                Party::Client => c2s += k,
            }
        }
    }
    (s2c, c2s)
}

/// Leaf sizes and AND tree of one group.
type Plan = (Vec<u32>, Vec<Vec<Node>>);

/// gt and eq shares per leaf position, each over the group's comparisons.
type LeafShares = (Vec<Vec<u8>>, Vec<Vec<u8>>);

/// This party's share of the correlated triples of one group: a (1 bit), b and c (2 lanes);
/// zeroized on drop.
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
struct Triples {
    a: Vec<u8>,
    b: Vec<u8>,
    c: Vec<u8>,
}

impl<C: RandomCot> MpcSession<C> {
    #[allow(clippy::needless_range_loop)] // parallel arrays indexed together
    /// Draws this party's triples for `t` AND nodes from 2·t ROTs (no traffic).
    fn triples(&mut self, t: usize) -> Result<Triples, MpcError> {
        // ROT1: server sender, client receiver; ROT2: client sender, server receiver. Only
        // two bits of each hash are used: kept as they come, nothing of the batch's size
        // in blocks.
        let mut s0 = vec![0u8; t];
        let mut b = vec![0u8; t];
        let mut a = vec![0u8; t];
        let mut got = vec![0u8; t];
        let mut send = |ot: &mut crate::ot::OtSession<C>| {
            ot.rot_send_each(t, |i, h0, h1| {
                s0[i] = (h0 & 3) as u8;
                b[i] = s0[i] ^ (h1 & 3) as u8;
            })
        };
        let mut recv = |ot: &mut crate::ot::OtSession<C>| {
            ot.rot_recv_each(t, |i, bit, h| {
                a[i] = bit & 1;
                got[i] = (h & 3) as u8;
            })
        };
        if self.is_server() {
            send(&mut self.ot)?;
            recv(&mut self.ot)?;
        } else {
            recv(&mut self.ot)?;
            send(&mut self.ot)?;
        }
        // c = a·b ⊕ (own pad s0 of a_peer·b) ⊕ (received pad of a·b_peer)
        let c = (0..t)
            .map(|i| (b[i] & 0u8.wrapping_sub(a[i] & 1)) ^ s0[i] ^ got[i])
            .collect();
        s0.zeroize();
        got.zeroize();
        let tr = Triples { a, b, c };
        Ok(tr)
    }

    /// The receiver's side of the leaf OTs: choose messages for every group where the
    /// peer holds the tables, sent in group order.
    fn send_chooses(
        &mut self,
        ch: &mut dyn Channel,
        groups: &[MillGroup],
        plans: &[Plan],
        mine: &[&[u64]],
        states: &mut Vec<crate::ot::KnChosen>,
    ) -> Result<(), MpcError> {
        let me = self.party;
        for ((g, (sizes, _)), v) in groups.iter().zip(plans).zip(mine) {
            if g.sender == me {
                continue;
            }
            let mut shift = 0;
            for (k, &mk) in sizes.iter().enumerate() {
                let digit_mask = (1u64 << mk) - 1;
                let choices: Vec<u16> = v
                    .iter()
                    .map(|&y| ((y >> shift) & digit_mask) as u16)
                    .collect();
                // leaf 0 carries only the gt bit (as in `receive_leaves`)
                let w = if k > 0 { 2 } else { 1 };
                let (st, msg) = self.ot.kn_choose(&choices, mk, w)?;
                ch.send_vec(msg)?;
                states.push(st);
                shift += mk;
            }
        }
        Ok(())
    }

    #[allow(clippy::needless_range_loop)] // parallel arrays indexed together
    /// Boolean shares of `[x > y]` for every comparison of every group, where the server
    /// holds the x's and the client the y's (`mine[g]` has `groups[g].n` values of
    /// `groups[g].bits` bits). `need` = COTs (server-sender, client-sender) of the whole
    /// operation, at least [`mill_cots`]; they are reserved here.
    pub(crate) fn millionaire(
        &mut self,
        ch: &mut dyn Channel,
        groups: &[MillGroup],
        mine: &[&[u64]],
        need: (usize, usize),
    ) -> Result<Vec<Vec<u8>>, MpcError> {
        let m = self.cfg.leaf_bits;
        if mine.len() != groups.len()
            || groups
                .iter()
                .zip(mine)
                .any(|(g, x)| x.len() != g.n || g.bits == 0 || g.bits > 64)
        {
            return Err(MpcError::BadInput(
                "millionaire groups and inputs disagree".into(),
            ));
        }
        let plans: Vec<Plan> = groups
            .iter()
            .map(|g| {
                let s = leaf_sizes(g.bits, m);
                let t = tree(s.len());
                (s, t)
            })
            .collect();
        // COTs for the whole operation (`need`, server-sender / client-sender). With KK13
        // the leaves need no COT: our choose messages go in the flight of our extension
        // message (split extension), saving a round trip.
        let kk = self.ot.uses_kk13();
        let (ns, nr) = if self.is_server() {
            need
        } else {
            (need.1, need.0)
        };
        self.ot.reserve_send(ch, ns, nr)?;
        let me = self.party;
        let mut states = Vec::new();
        if kk {
            self.send_chooses(ch, groups, &plans, mine, &mut states)?;
        }
        self.ot.reserve_recv(ch)?;
        // Triples for every node of every group (Alg. 1 uses bit triples; see module doc).
        let mut trip = Vec::with_capacity(groups.len());
        for (g, (sizes, _)) in groups.iter().zip(&plans) {
            trip.push(self.triples(g.n * (sizes.len() - 1))?);
        }
        // Leaves (Alg. 1 steps 5-10). Per group, the party holding x (`g.sender`) sends the
        // tables; flights: both send their choose messages, then both their replies.
        if !kk {
            self.send_chooses(ch, groups, &plans, mine, &mut states)?;
        }
        let mut msgs = Vec::new();
        for (g, (sizes, _)) in groups.iter().zip(&plans) {
            if g.sender == me {
                for &mk in sizes {
                    msgs.push(recv_len(
                        ch,
                        "millionaire leaf OT",
                        self.ot.kn_choose_len(g.n, mk),
                    )?);
                }
            }
        }
        let mut msg_it = msgs.into_iter();
        let mut replies = Vec::new();
        let mut own: Vec<Option<LeafShares>> = Vec::with_capacity(groups.len());
        for ((g, (sizes, _)), x) in groups.iter().zip(&plans).zip(mine) {
            if g.sender != me {
                own.push(None);
                continue;
            }
            let mut ggt = Vec::with_capacity(sizes.len());
            let mut geq = Vec::with_capacity(sizes.len());
            let mut shift = 0;
            for (k, &mk) in sizes.iter().enumerate() {
                let msg = msg_it.next().unwrap_or_default();
                let digit_mask = (1u64 << mk) - 1;
                let rg = self.prg.bits(g.n);
                let re = if k > 0 {
                    self.prg.bits(g.n)
                } else {
                    vec![0; g.n]
                };
                let w = if k > 0 { 2 } else { 1 };
                // CrypTFlow2 Alg. 1 steps 7-9: table entry j = (lt ⊕ [x_k > j], eq ⊕ [x_k = j]).
                let big_n = 1usize << mk;
                let reply = if big_n * w as usize <= 128 {
                    // All entries of one OT as one 128-bit row: gt bits at w·j, eq at 2j+1.
                    let all: u128 = if big_n * w as usize == 128 {
                        u128::MAX
                    } else {
                        (1u128 << (big_n * w as usize)) - 1
                    };
                    let (gt_pat, eq_pat) = if w == 2 {
                        (all / 3, (all / 3) << 1)
                    } else {
                        (all, 0)
                    };
                    let rows: Vec<u128> = (0..big_n)
                        .map(|a| {
                            let below: u128 =
                                (0..a).fold(0, |r, j| r | (1u128 << (j * w as usize)));
                            if w == 2 {
                                below | (1u128 << (2 * a + 1))
                            } else {
                                below
                            }
                        })
                        .collect();
                    self.ot.kn_respond_row(&msg, g.n, mk, w, |i| {
                        let a = ((x[i] >> shift) & digit_mask) as usize;
                        let mut r = rows[a];
                        // masked, no branch on the random bits
                        r ^= gt_pat & 0u128.wrapping_sub(u128::from(rg[i] & 1));
                        r ^= eq_pat & 0u128.wrapping_sub(u128::from(re[i] & 1));
                        r
                    })?
                } else {
                    self.ot.kn_respond(&msg, g.n, mk, w, |i, j| {
                        let a = (x[i] >> shift) & digit_mask;
                        let j = j as u64;
                        let gtb = u64::from(a > j) ^ u64::from(rg[i]);
                        let eqb = u64::from(a == j) ^ u64::from(re[i]);
                        gtb | (eqb << 1)
                    })?
                };
                replies.push(reply);
                ggt.push(rg);
                geq.push(re);
                shift += mk;
            }
            own.push(Some((ggt, geq)));
        }
        for r in replies {
            ch.send_vec(r)?;
        }
        let mut st_it = states.into_iter();
        let mut gt: Vec<Vec<Vec<u8>>> = Vec::with_capacity(groups.len());
        let mut eq: Vec<Vec<Vec<u8>>> = Vec::with_capacity(groups.len());
        for ((g, (sizes, _)), o) in groups.iter().zip(&plans).zip(own) {
            if let Some((ggt, geq)) = o {
                gt.push(ggt);
                eq.push(geq);
                continue;
            }
            let mut ggt = Vec::with_capacity(sizes.len());
            let mut geq = Vec::with_capacity(sizes.len());
            for (k, &mk) in sizes.iter().enumerate() {
                let Some(st) = st_it.next() else {
                    return Err(MpcError::BadInput("leaf count".into()));
                };
                let w = if k > 0 { 2 } else { 1 };
                let len = (g.n * (1usize << mk) * w as usize).div_ceil(8);
                let reply = recv_len(ch, "millionaire leaf OT reply", len)?;
                let v = self.ot.kn_finish(st, g.n, mk, &reply, w)?;
                ggt.push(v.iter().map(|&x| (x & 1) as u8).collect());
                geq.push(if k > 0 {
                    v.iter().map(|&x| ((x >> 1) & 1) as u8).collect()
                } else {
                    vec![0; g.n]
                });
            }
            gt.push(ggt);
            eq.push(geq);
        }
        // The AND tree, level by level across all groups (Alg. 1 steps 12-16).
        let depth = plans.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let mut node_base = vec![0usize; groups.len()];
        let server = self.is_server();
        for lv in 0..depth {
            let mut open = Vec::new();
            for (gi, (g, (_, t))) in groups.iter().zip(&plans).enumerate() {
                let Some(nodes) = t.get(lv) else { continue };
                let tr = &trip[gi];
                for (k, nd) in nodes.iter().enumerate() {
                    let base = (node_base[gi] + k) * g.n;
                    for i in 0..g.n {
                        let a = tr.a[base + i];
                        let b = tr.b[base + i];
                        open.push(eq[gi][nd.hi][i] ^ a);
                        open.push(gt[gi][nd.lo][i] ^ (b & 1));
                        if nd.need_eq {
                            open.push(eq[gi][nd.lo][i] ^ (b >> 1));
                        }
                    }
                }
            }
            send_bits(ch, &open)?;
            let peer = recv_bits(ch, "millionaire AND openings", open.len())?;
            let mut pos = 0;
            for (gi, (g, (_, t))) in groups.iter().zip(&plans).enumerate() {
                let Some(nodes) = t.get(lv) else { continue };
                let tr = &trip[gi];
                let mut ngt = Vec::with_capacity(nodes.len() + 1);
                let mut neq = Vec::with_capacity(nodes.len() + 1);
                for (k, nd) in nodes.iter().enumerate() {
                    let base = (node_base[gi] + k) * g.n;
                    let mut og = Vec::with_capacity(g.n);
                    let mut oe = Vec::with_capacity(if nd.need_eq { g.n } else { 0 });
                    for i in 0..g.n {
                        let (a, b, c) = (tr.a[base + i], tr.b[base + i], tr.c[base + i]);
                        let d = open[pos] ^ peer[pos];
                        let e1 = open[pos + 1] ^ peer[pos + 1];
                        pos += 2;
                        // Beaver: z = c ⊕ d·b ⊕ e·a ⊕ [server] d·e
                        let z1 = (c & 1) ^ (d & b & 1) ^ (e1 & a) ^ (u8::from(server) & d & e1);
                        og.push(gt[gi][nd.hi][i] ^ z1);
                        if nd.need_eq {
                            let e2 = open[pos] ^ peer[pos];
                            pos += 1;
                            let z2 =
                                (c >> 1) ^ (d & (b >> 1)) ^ (e2 & a) ^ (u8::from(server) & d & e2);
                            oe.push(z2);
                        }
                    }
                    ngt.push(og);
                    neq.push(oe);
                }
                let len = gt[gi].len();
                if len % 2 == 1 {
                    ngt.push(std::mem::take(&mut gt[gi][len - 1]));
                    neq.push(std::mem::take(&mut eq[gi][len - 1]));
                }
                node_base[gi] += nodes.len();
                gt[gi] = ngt;
                eq[gi] = neq;
            }
        }
        Ok(gt.into_iter().map(|mut g| g.swap_remove(0)).collect())
    }
}
