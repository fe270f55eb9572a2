//! Cost formulas of every operation, as the client sees them: bytes sent, bytes
//! received and flights (direction changes + 1, as [`Counting`](crate::channel::Counting)
//! counts them from a fresh counter). The server's bytes are the mirror image.
//!
//! They hold for a session whose COT buffers are empty when the operation starts and
//! whose `min_batch` is 1 (as in the tests; the buffers are modelled across the levels of
//! argmax); with buffered COTs or a larger `min_batch` only the extension part changes
//! ([`Sequence`] models both, for operations chained on one session).
//! [`Extension`] models the core OT: IKNP extends by what the buffer lacks rounded up to
//! `r128(n)`, a multiple of 128, the COT receiver sending 16 bytes per COT; Ferret hands
//! out, when the buffer lacks any, all the COTs left over from its bootstrap and then whole
//! iterations until the lack is covered (the surplus stays in the session's buffer), the
//! COT sender sending a fixed number of bytes per iteration
//! ([`crate::ot::FerretParams::iteration_bytes`]). Either way the extension is one
//! flight each way and shares flights as below.
//!
//! In bits per element (IKNP, κ = 128, leaves by KK13 over a 256-bit code, m-bit leaves,
//! q = ceil((l-1)/m) leaves, q-1 AND nodes):
//!
//! | operation | bits per element (both directions) |
//! |---|---|
//! | millionaire on β bits | Σ_leaves (256 + w_k·2^{m_k}) + (q-1)·(2κ + 2·(2 or 3)) |
//! | DReLU | millionaire on l-1 bits |
//! | MUX | 2·(κ + 1 + l) |
//! | ReLU | DReLU + MUX |
//! | B2A | κ + 1 + l |
//! | trunc (exact, signed) | millionaire(l-1) + millionaire(f) + 256 + 8·l |
//! | relu_trunc | trunc + κ + 1 + l |
//! | trunc_nonneg | millionaire(f) + 2·(κ + 1 + l) |
//! | argmax (per row of k) | (k-1)·(DReLU + 2·(κ + 1 + 2l)) + l (reveal) |
//!
//! (w_k = 1 for the lowest leaf, 2 otherwise; with 1-of-N from COTs a leaf costs
//! m_k·(κ + 1) + w_k·2^{m_k} instead of 256 + w_k·2^{m_k}.) Over Ferret replace κ = 128 by
//! about 0.45 (bits per COT of the main parameter set, amortised over whole iterations).
//! Flights (client), ReLU with KK13: 4 (extension and leaf OTs share flights; both parties
//! hold the tables for half of the batch) + 2·ceil(log2 q) (AND levels) + 4 (MUX).

use super::millionaire::{MillGroup, carry_groups, leaf_sizes, mill_cots, tree};
use crate::ot::{FerretParams, Party};
use crate::ring::Ring;

/// Costs seen by the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// bytes the client sends
    pub sent: u64,
    /// bytes the client receives
    pub received: u64,
    /// flights at the client
    pub flights: u64,
}

impl Cost {
    /// Bytes both ways.
    pub fn total(&self) -> u64 {
        self.sent + self.received
    }
}

/// The parameters a formula needs.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// bits per millionaire leaf
    pub leaf_bits: u32,
    /// whether 1-of-N OTs use KK13 (else m COTs)
    pub kk13: bool,
    /// how the core OT extends the COT buffers
    pub ext: Extension,
}

/// How the core OT fills the session's COT buffers (the state at the operation's start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Extension {
    /// IKNP: what the buffer lacks, rounded up to a multiple of 128; 16 bytes per COT from
    /// the COT receiver
    #[default]
    Iknp,
    /// Ferret: where the buffer lacks COTs, all the `spare` ones left in Ferret by its
    /// bootstrap, then whole iterations of `usable` COTs until nothing lacks, each costing
    /// `iteration_bytes` from the COT sender (the surplus stays in the session's buffer)
    Ferret {
        /// COTs per iteration
        usable: usize,
        /// bytes per iteration
        iteration_bytes: usize,
        /// COTs left in Ferret, server as sender
        spare_s2c: usize,
        /// COTs left in Ferret, client as sender
        spare_c2s: usize,
    },
}

impl Extension {
    /// Ferret right after setup with (`boot`, `main`): the bootstrap's left-over COTs in
    /// both directions, then `main` iterations.
    pub fn ferret_after_setup(boot: &FerretParams, main: &FerretParams) -> Self {
        let spare = boot.n().saturating_sub(main.reserve());
        Extension::Ferret {
            usable: main.usable(),
            iteration_bytes: main.iteration_bytes(),
            spare_s2c: spare,
            spare_c2s: spare,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Trace {
    cost: Cost,
    last_send: Option<bool>,
    /// COTs left in the buffers (server-sender, client-sender), as the session keeps them
    avail: (usize, usize),
    /// the session's smallest extension (0 and 1 are the same: exact extensions)
    min_batch: usize,
    ext: Extension,
    /// COTs taken by the operations so far (server-sender, client-sender)
    taken: (usize, usize),
}

impl Trace {
    fn ev(&mut self, send: bool, bytes: usize) {
        if self.last_send != Some(send) {
            self.cost.flights += 1;
            self.last_send = Some(send);
        }
        if send {
            self.cost.sent += bytes as u64;
        } else {
            self.cost.received += bytes as u64;
        }
    }
    fn send(&mut self, b: usize) {
        self.ev(true, b)
    }
    fn recv(&mut self, b: usize) {
        self.ev(false, b)
    }
    fn new(p: Params) -> Self {
        Self {
            ext: p.ext,
            ..Self::default()
        }
    }

    /// COTs the session asks the core OT for when `need` are wanted and `have` are
    /// buffered: `OtSession::extension_for` (at least `min_batch`).
    fn lack(&self, have: usize, need: usize) -> usize {
        if need > have {
            (need - have).max(self.min_batch)
        } else {
            0
        }
    }

    /// A reservation of (server-sender, client-sender) COTs: extends what the buffers lack
    /// and takes the COTs. Returns the extension bytes (client sends, client receives).
    fn extend(&mut self, s2c: usize, c2s: usize) -> (usize, usize) {
        let (ls, lc) = (self.lack(self.avail.0, s2c), self.lack(self.avail.1, c2s));
        let (gs, gc, sent, received) = match &mut self.ext {
            Extension::Iknp => {
                let r = |n: usize| n.div_ceil(128) * 128;
                // the client is the IKNP receiver (sender of the matrix) for s2c COTs
                (r(ls), r(lc), 16 * r(ls), 16 * r(lc))
            }
            Extension::Ferret {
                usable,
                iteration_bytes,
                spare_s2c,
                spare_c2s,
            } => {
                // all the spare COTs, then whole iterations (none when nothing lacks)
                let get = |need: usize, spare: &mut usize| {
                    if need == 0 {
                        return (0, 0);
                    }
                    let iters = need.saturating_sub(*spare).div_ceil(*usable);
                    let got = *spare + iters * *usable;
                    *spare = 0;
                    (got, iters * *iteration_bytes)
                };
                let (gs, bs) = get(ls, spare_s2c);
                let (gc, bc) = get(lc, spare_c2s);
                // the COT sender sends Ferret's messages: the client for c2s COTs
                (gs, gc, bc, bs)
            }
        };
        self.avail = (self.avail.0 + gs - s2c, self.avail.1 + gc - c2s);
        self.taken = (self.taken.0 + s2c, self.taken.1 + c2s);
        (sent, received)
    }

    /// Reservation of (server-sender, client-sender) COTs, one flight each way.
    fn ext(&mut self, s2c: usize, c2s: usize) {
        let (sent, received) = self.extend(s2c, c2s);
        if sent > 0 {
            self.send(sent);
        }
        if received > 0 {
            self.recv(received);
        }
    }
    /// The millionaire with the operation's reservation: with KK13 our choose messages
    /// share the flight of our extension message.
    fn mill_ext(&mut self, p: Params, groups: &[MillGroup], s2c: usize, c2s: usize) {
        let (sent, received) = self.extend(s2c, c2s);
        let choose = |g: &MillGroup, mk: u32| {
            if p.kk13 {
                32 * g.n.div_ceil(128) * 128
            } else {
                (g.n * mk as usize).div_ceil(8)
            }
        };
        let reply = |g: &MillGroup, k: usize, mk: u32| {
            (g.n * (1usize << mk) * if k == 0 { 1 } else { 2 }).div_ceil(8)
        };
        let send_chooses = |t: &mut Self| {
            for g in groups.iter().filter(|g| g.sender == Party::Server) {
                for &mk in &leaf_sizes(g.bits, p.leaf_bits) {
                    t.send(choose(g, mk));
                }
            }
        };
        if sent > 0 {
            self.send(sent);
        }
        if p.kk13 {
            send_chooses(self);
        }
        if received > 0 {
            self.recv(received);
        }
        if !p.kk13 {
            send_chooses(self);
        }
        for g in groups.iter().filter(|g| g.sender == Party::Client) {
            for &mk in &leaf_sizes(g.bits, p.leaf_bits) {
                self.recv(choose(g, mk));
            }
        }
        for g in groups.iter().filter(|g| g.sender == Party::Client) {
            for (k, &mk) in leaf_sizes(g.bits, p.leaf_bits).iter().enumerate() {
                self.send(reply(g, k, mk));
            }
        }
        for g in groups.iter().filter(|g| g.sender == Party::Server) {
            for (k, &mk) in leaf_sizes(g.bits, p.leaf_bits).iter().enumerate() {
                self.recv(reply(g, k, mk));
            }
        }
        let trees: Vec<_> = groups
            .iter()
            .map(|g| tree(leaf_sizes(g.bits, p.leaf_bits).len()))
            .collect();
        let depth = trees.iter().map(|t| t.len()).max().unwrap_or(0);
        for lv in 0..depth {
            let mut bits = 0;
            for (g, t) in groups.iter().zip(&trees) {
                if let Some(nodes) = t.get(lv) {
                    bits += nodes
                        .iter()
                        .map(|nd| (2 + usize::from(nd.need_eq)) * g.n)
                        .sum::<usize>();
                }
            }
            self.send(bits.div_ceil(8));
            self.recv(bits.div_ceil(8));
        }
    }
    fn mux(&mut self, ring: Ring, n: usize, w: usize) {
        self.send(n.div_ceil(8));
        self.recv(n.div_ceil(8));
        self.send(ring.packed_len(n * w));
        self.recv(ring.packed_len(n * w));
    }
}

fn carry_group(ring: Ring, n: usize) -> Vec<MillGroup> {
    carry_groups(ring.bits() - 1, n)
}

/// Runs `op` on a fresh trace (empty buffers, exact extensions).
fn fresh(p: Params, op: impl FnOnce(&mut Trace)) -> Cost {
    let mut t = Trace::new(p);
    op(&mut t);
    t.cost
}

fn drelu_into(t: &mut Trace, p: Params, ring: Ring, n: usize) {
    let g = carry_group(ring, n);
    let (a, b) = mill_cots(p.leaf_bits, !p.kk13, &g);
    t.mill_ext(p, &g, a, b);
}

fn relu_into(t: &mut Trace, p: Params, ring: Ring, n: usize) {
    let g = carry_group(ring, n);
    let (a, b) = mill_cots(p.leaf_bits, !p.kk13, &g);
    t.mill_ext(p, &g, a + n, b + n);
    t.mux(ring, n, 1);
}

fn trunc_general(t: &mut Trace, p: Params, ring: Ring, n: usize, f: u32, relu: bool) {
    let mut g = carry_group(ring, n);
    g.extend(carry_groups(f, n));
    let (mut a, mut b) = mill_cots(p.leaf_bits, !p.kk13, &g);
    if !p.kk13 {
        a += 3 * n;
    }
    if relu {
        b += n;
    }
    t.mill_ext(p, &g, a, b);
    t.send(if p.kk13 {
        32 * n.div_ceil(128) * 128
    } else {
        (3 * n).div_ceil(8)
    });
    if relu {
        t.recv(n.div_ceil(8));
        t.send(ring.packed_len(n));
    }
    t.recv((n * 8 * ring.bits() as usize).div_ceil(8));
}

fn reveal_into(t: &mut Trace, ring: Ring, n: usize) {
    t.recv(ring.packed_len(n));
}

fn argmax_reveal_into(t: &mut Trace, p: Params, ring: Ring, rows: usize, cols: usize) {
    let mut len = cols;
    let (mut ns, mut nc) = (0, 0);
    while len > 1 {
        let n = rows * (len / 2);
        let (a, b) = mill_cots(p.leaf_bits, !p.kk13, &carry_group(ring, n));
        ns += a + n;
        nc += b + n;
        len = len.div_ceil(2);
    }
    let mut need = (ns, nc);
    let mut len = cols;
    while len > 1 {
        let n = rows * (len / 2);
        let (a, b) = std::mem::take(&mut need);
        t.mill_ext(p, &carry_group(ring, n), a, b);
        t.mux(ring, n, 2);
        len = len.div_ceil(2);
    }
    reveal_into(t, ring, rows);
}

/// [`MpcSession::drelu`](super::MpcSession::drelu) of `n` elements.
pub fn drelu(p: Params, ring: Ring, n: usize) -> Cost {
    fresh(p, |t| drelu_into(t, p, ring, n))
}

/// [`MpcSession::mux`](super::MpcSession::mux) of `n` elements.
pub fn mux(p: Params, ring: Ring, n: usize) -> Cost {
    fresh(p, |t| {
        t.ext(n, n);
        t.mux(ring, n, 1);
    })
}

/// [`MpcSession::relu`](super::MpcSession::relu) of `n` elements.
pub fn relu(p: Params, ring: Ring, n: usize) -> Cost {
    fresh(p, |t| relu_into(t, p, ring, n))
}

/// [`MpcSession::b2a`](super::MpcSession::b2a) of `n` bits.
pub fn b2a(p: Params, ring: Ring, n: usize) -> Cost {
    fresh(p, |t| {
        t.ext(n, 0);
        t.send(n.div_ceil(8));
        t.recv(ring.packed_len(n));
    })
}

/// [`MpcSession::trunc_nonneg`](super::MpcSession::trunc_nonneg) of `n` elements by f ≥ 1.
pub fn trunc_nonneg(p: Params, ring: Ring, n: usize, f: u32) -> Cost {
    fresh(p, |t| {
        let g = carry_groups(f, n);
        let (a, b) = mill_cots(p.leaf_bits, !p.kk13, &g);
        t.mill_ext(p, &g, a + 2 * n, b);
        t.send((2 * n).div_ceil(8));
        t.recv(ring.packed_len(2 * n));
    })
}

/// [`MpcSession::trunc`](super::MpcSession::trunc) of `n` elements by f ≥ 1.
pub fn trunc(p: Params, ring: Ring, n: usize, f: u32) -> Cost {
    fresh(p, |t| trunc_general(t, p, ring, n, f, false))
}

/// [`MpcSession::relu_trunc`](super::MpcSession::relu_trunc) of `n` elements by f ≥ 1.
pub fn relu_trunc(p: Params, ring: Ring, n: usize, f: u32) -> Cost {
    fresh(p, |t| trunc_general(t, p, ring, n, f, true))
}

/// [`MpcSession::reveal`](super::MpcSession::reveal) of `n` elements to the client.
pub fn reveal_to_client(ring: Ring, n: usize) -> Cost {
    let mut t = Trace::default();
    reveal_into(&mut t, ring, n);
    t.cost
}

/// [`MpcSession::argmax_reveal`](super::MpcSession::argmax_reveal) to the client, `rows`
/// rows of `cols`.
pub fn argmax_reveal(p: Params, ring: Ring, rows: usize, cols: usize) -> Cost {
    fresh(p, |t| argmax_reveal_into(t, p, ring, rows, cols))
}

/// The costs of consecutive operations of one session as the client sees them, for
/// callers that chain operations (the backends): the COT buffers carry over from one
/// operation to the next (with the session's `min_batch`), and a flight that continues
/// across two operations, or across an operation and a message of another layer
/// ([`Sequence::send`], [`Sequence::recv`], e.g. HE), is counted once, as
/// [`Counting`](crate::channel::Counting) counts it.
#[derive(Clone, Debug)]
pub struct Sequence {
    t: Trace,
    p: Params,
}

impl Sequence {
    /// A sequence that starts with `available` COTs buffered at the client (as
    /// [`OtSession::available`](crate::ot::OtSession::available) reports them there: as
    /// sender, as receiver), on a session with extensions of at least `min_batch`, after a
    /// flight of the client in direction `last_send` (`None`: nothing before).
    pub fn new(
        p: Params,
        min_batch: usize,
        available: (usize, usize),
        last_send: Option<bool>,
    ) -> Self {
        Self {
            t: Trace {
                avail: (available.1, available.0),
                min_batch,
                last_send,
                ..Trace::new(p)
            },
            p,
        }
    }

    /// Everything so far.
    pub fn total(&self) -> Cost {
        self.t.cost
    }

    /// The COTs the client's session holds now (as sender, as receiver).
    pub fn available(&self) -> (usize, usize) {
        (self.t.avail.1, self.t.avail.0)
    }

    /// The COTs the operations so far took, as the client's session counts them (as
    /// sender, as receiver).
    pub fn taken(&self) -> (usize, usize) {
        (self.t.taken.1, self.t.taken.0)
    }

    /// [`OtSession::reserve`](crate::ot::OtSession::reserve) of `send` / `recv` COTs at
    /// the client (mirrored at the server): extends what the buffers lack, one flight
    /// each way, and leaves the COTs buffered.
    pub fn reserve(&mut self, send: usize, recv: usize) {
        let taken = self.t.taken;
        self.t.ext(recv, send);
        self.t.avail = (self.t.avail.0 + recv, self.t.avail.1 + send);
        self.t.taken = taken;
    }

    /// A message of `bytes` the client sends outside the 2PC layer.
    pub fn send(&mut self, bytes: usize) {
        self.t.send(bytes);
    }

    /// A message of `bytes` the client receives outside the 2PC layer.
    pub fn recv(&mut self, bytes: usize) {
        self.t.recv(bytes);
    }

    /// [`MpcSession::relu`](super::MpcSession::relu) of `n` elements.
    pub fn relu(&mut self, ring: Ring, n: usize) {
        relu_into(&mut self.t, self.p, ring, n);
    }

    /// [`MpcSession::trunc`](super::MpcSession::trunc) of `n` elements by f ≥ 1.
    pub fn trunc(&mut self, ring: Ring, n: usize, f: u32) {
        trunc_general(&mut self.t, self.p, ring, n, f, false);
    }

    /// [`MpcSession::relu_trunc`](super::MpcSession::relu_trunc) of `n` elements by f ≥ 1.
    pub fn relu_trunc(&mut self, ring: Ring, n: usize, f: u32) {
        trunc_general(&mut self.t, self.p, ring, n, f, true);
    }

    /// [`MpcSession::reveal`](super::MpcSession::reveal) of `n` elements to the client.
    pub fn reveal_to_client(&mut self, ring: Ring, n: usize) {
        reveal_into(&mut self.t, ring, n);
    }

    /// [`MpcSession::argmax_reveal`](super::MpcSession::argmax_reveal) to the client.
    pub fn argmax_reveal(&mut self, ring: Ring, rows: usize, cols: usize) {
        argmax_reveal_into(&mut self.t, self.p, ring, rows, cols);
    }
}
