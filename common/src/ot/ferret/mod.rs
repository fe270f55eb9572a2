//! Ferret silent OT extension (Yang, Weng, Lan, Zhang, Wang, "Ferret: Fast Extension for
//! coRRElated oT with small communication", CCS 2020, ePrint 2020/924), semi-honest,
//! primal LPN with regular noise, behind [`RandomCot`].
//!
//! # Message flow (one direction; both run at once, each party is the sender of one)
//!
//! ```text
//!   setup (once per session)
//!     Chou-Orlandi base OTs, IKNP extension of BOOTSTRAP.reserve() = 74,036 COTs per
//!     direction (both: one flight each way), IKNP's Δ drawn with LSB 1
//!     one BOOTSTRAP iteration (below) ─▶ MAIN stock (540,928) + 329,472 spare COTs
//!
//!   iteration with parameters (t, h, k), stock = k + t·h COTs from the previous one
//!     S: t GGM trees of 2^h leaves     ────── t·(2h+1) blocks (mpcot.rs) ──────▶  R: punctured
//!        (MPCOT, regular noise)                                                     trees, e
//!     both: LPN with the public code of the iteration (lpn.rs):
//!        S: y = v ⊕ A·K_stock               R: z = w ⊕ A·M_stock   (x = e ⊕ A·u = LSB(z))
//!     keep the last k + t·h outputs as the next stock, hand out n − k − t·h
//!     (z = y ⊕ x·Δ: random COTs with the session's global Δ)
//!
//!   extend(n_send, n_recv): where COTs are asked for, the bootstrap's spare ones (the
//!     first time), then as many whole MAIN iterations as needed, appended to the caller's
//!     buffers (the session keeps the surplus for its next operations)
//!     (split: extend_send computes and sends ours; extend_recv receives and computes theirs:
//!     one flight each way for both directions together, one message per iteration, each
//!     sent as soon as it is computed, so the receiver works on iteration i while the
//!     sender computes i + 1: with one direction busier than the other, as in the
//!     millionaire where the server sends 39 of 47 COTs per ReLU, the receiving party
//!     would otherwise wait for all of the sender's iterations)
//! ```
//!
//! Bytes: the sender of a direction sends `MAIN.iteration_bytes()` = 552,960 per iteration
//! of `MAIN.usable()` = 9,944,832 COTs, 0.445 bits per COT ([`FerretParams`]); the receiver
//! sends nothing. Setup: 128 base OTs each way, 16·74,112 IKNP bytes and 285,600 bootstrap
//! bytes per direction.
//!
//! Semi-honest only: a malicious sender could choose inconsistent trees (Ferret's
//! consistency check is not implemented; the project's base protocols are semi-honest).
//!
//! # Choices
//!
//! - Choice bits ride in the least significant bit of the receiver's blocks, as in the
//!   reference: Δ has LSB 1 (127 random bits) and every sender key has LSB 0, so
//!   LSB(m) = b is carried through the GGM trees and the code for free. (Keeping the bits
//!   in a separate byte table made the receiver's LPN step twice as slow as the sender's,
//!   measured.) [`RandomCot::delta`] and the handed-out keys keep this form.
//! - The code's seed, the level-OT hash key and the GGM keys are public and derived from
//!   the IKNP session identifier (both parties agree on it): no seed message.
//! - One thread per party: the bench runs both parties on the machine's two cores; the
//!   LPN step splits into independent row ranges if a deployment wants two threads.
//! - Memory per party and direction: the stock (8.3 MiB for MAIN) here; the iterations
//!   write their outputs straight into the caller's buffers ([`RandomCot::extend_into`]),
//!   which the session keeps from one extension to the next, so the outputs are neither
//!   copied nor written to fresh pages once the session's buffers have grown (page
//!   faults on fresh buffers were a fifth of the CPU of a 1,024-row inference, and the
//!   copy out of an iteration buffer of Ferret's own 5%, measured). The caller holds up to
//!   one iteration's outputs more than it asked for ([`Ferret::max_surplus_bytes`]).

mod ggm;
mod lpn;
mod mpcot;
mod params;
mod select;
#[cfg(test)]
pub(crate) mod tests;

pub use params::{BOOTSTRAP, D, FerretParams, MAIN};
pub use select::{CoreOt, OtKind};

use rand::{CryptoRng, Rng};
use zeroize::Zeroize;

use super::iknp::Iknp;
use super::{Block, CotBatch, OtError, Party, Prg, RandomCot, Tccr, reserve_zeroizing};
use crate::channel::Channel;
use ggm::Ggm;
use lpn::LpnCode;

/// Bytes of one COT block.
const BLOCK_BYTES: usize = 16;

/// Stock and left-overs of one direction: keys (LSB 0) on the sender's side, received
/// blocks (choice bit in the LSB) on the receiver's.
#[derive(Default)]
struct Side {
    /// the stock: k for the code, then t·h for the level OTs
    stock: Vec<Block>,
    /// the bootstrap's outputs beyond the MAIN stock, handed out by the first extension
    spare: Vec<Block>,
    /// iterations run in this direction
    iter: u64,
    /// base COTs used for level OTs so far (tweak counter)
    tw: u64,
}

impl Drop for Side {
    fn drop(&mut self) {
        self.stock.zeroize();
        self.spare.zeroize();
    }
}

/// Ferret random COT, both directions of one session (see the module documentation).
pub struct Ferret {
    party: Party,
    /// our Δ (LSB 1)
    delta: Block,
    main: FerretParams,
    session_id: [u8; 32],
    /// fixed-key TCCR hash of the level OTs (public key, derived from the session)
    hash: Tccr,
    /// secret: the GGM seeds of our trees
    prg: Prg,
    ggm: Ggm,
    /// the direction where we are the COT sender
    send: Side,
    /// the direction where we are the COT receiver
    recv: Side,
    /// between `extend_send` and `extend_recv`: our sender COTs (the plain API keeps them
    /// here; `extend_send_into` has put them in the caller's batch already)
    pending: Option<Vec<Block>>,
}

impl std::fmt::Debug for Ferret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ferret {{ party: {:?}, params: {:?}, iterations: ({}, {}), spare: {:?}, [redacted] }}",
            self.party,
            self.main,
            self.send.iter,
            self.recv.iter,
            self.spare()
        )
    }
}

impl Drop for Ferret {
    fn drop(&mut self) {
        self.delta.zeroize();
        if let Some(p) = self.pending.as_mut() {
            p.zeroize();
        }
    }
}

fn derive_block(context: &str, parts: &[&[u8]]) -> Block {
    let mut h = blake3::Hasher::new_derive_key(context);
    for p in parts {
        h.update(p);
    }
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d.as_bytes()[..16]);
    Block::from_le_bytes(k)
}

/// Moves the last `keep_from..` blocks of `out` into `stock` (same length) and truncates.
fn split_stock(out: &mut Vec<Block>, keep_from: usize, stock: &mut Vec<Block>) {
    stock.clear();
    stock.extend_from_slice(&out[keep_from..]);
    out[keep_from..].zeroize();
    out.truncate(keep_from);
}

impl Ferret {
    /// Sets up Ferret in both directions with the product parameters ([`BOOTSTRAP`] once,
    /// then [`MAIN`]): base OTs, IKNP for the bootstrap stock, one bootstrap iteration.
    /// `rng` is the OS CSPRNG in product code. Bytes: see the module documentation.
    pub fn setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        rng: &mut R,
    ) -> Result<Self, OtError> {
        Self::setup_with_params(ch, party, BOOTSTRAP, MAIN, rng)
    }

    /// [`Ferret::setup`] with other parameter sets (both parties must pass the same). Only
    /// the product sets are vetted for 128-bit security; tests use small insecure ones.
    pub(crate) fn setup_with_params<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        boot: FerretParams,
        main: FerretParams,
        rng: &mut R,
    ) -> Result<Self, OtError> {
        FerretParams::check_pair(&boot, &main)?;
        // Δ with LSB 1: the choice bit of every COT is the LSB of the receiver's block.
        let mut delta: Block = rng.random::<Block>() | 1;
        let mut iknp = Iknp::setup_with_delta(ch, party, delta, rng)?;
        delta.zeroize();
        let m_b = boot.reserve();
        let base = iknp.extend(ch, m_b, m_b)?;
        if base.send.len() < m_b || base.recv.len() < m_b || base.recv_bits.len() < m_b {
            return Err(OtError::BadRequest("IKNP returned too few COTs".into()));
        }
        // LSB form: keys k ∧ ¬1, received blocks (m ∧ ¬1) | b; still m = k ⊕ b·Δ
        let mut keys: Vec<Block> = base.send[..m_b].iter().map(|&k| k & !1).collect();
        let mut recv: Vec<Block> = base.recv[..m_b]
            .iter()
            .zip(&base.recv_bits)
            .map(|(&m, &b)| (m & !1) | Block::from(b & 1))
            .collect();
        drop(base);
        let session_id = iknp.session_id();
        let mut s = Self {
            party,
            delta: iknp.delta(),
            main,
            session_id,
            hash: Tccr::new(derive_block(
                "fusion 2026 ot/ferret level-OT hash key",
                &[&session_id],
            )),
            prg: Prg::from_rng(rng),
            ggm: Ggm::new(main.h.max(boot.h)),
            send: Side::default(),
            recv: Side::default(),
            pending: None,
        };
        drop(iknp);
        // The bootstrap iteration in both directions: ours first (one flight each way).
        let mut out = Vec::with_capacity(boot.n());
        let msg = s.sender_iteration(&boot, &keys, &mut out);
        ch.send_vec(msg)?;
        let peer = ch
            .recv_exact(boot.iteration_bytes())
            .map_err(|e| OtError::msg("Ferret bootstrap messages", e))?;
        let mut m = Vec::with_capacity(boot.n());
        s.recv_iteration(&boot, &recv, &peer, &mut m)?;
        keys.zeroize();
        recv.zeroize();
        let keep = boot.n() - main.reserve();
        split_stock(&mut out, keep, &mut s.send.stock);
        split_stock(&mut m, keep, &mut s.recv.stock);
        // The bootstrap's outputs beyond the MAIN stock wait for the first extension; MAIN
        // iterations write into the caller's buffers, so nothing is reserved for them here
        // (a session that never runs one never holds 2 x 160 MiB).
        s.send.spare = out;
        s.recv.spare = m;
        Ok(s)
    }

    /// The main parameter set.
    pub fn params(&self) -> FerretParams {
        self.main
    }

    /// COTs produced and not yet handed out (the next extension's first): (as sender, as
    /// receiver).
    pub fn spare(&self) -> (usize, usize) {
        (self.send.spare.len(), self.recv.spare.len())
    }

    /// Bytes of COT buffers this value holds now (both directions: stocks and the
    /// bootstrap's spare outputs, by capacity).
    pub fn held_bytes(&self) -> usize {
        let side = |s: &Side| (s.stock.capacity() + s.spare.capacity()) * BLOCK_BYTES;
        side(&self.send) + side(&self.recv)
    }

    /// The most memory Ferret and the buffers it extends hold beyond the COTs asked for,
    /// once a MAIN iteration has run in both directions: per direction the stock (k + t·h
    /// blocks) and one iteration's outputs (n blocks: an extension hands out whole
    /// iterations, so up to `usable − 1` COTs more than asked, and the next stock is split
    /// off the iteration's end), and in the receiver's direction the choice bits of the
    /// COTs handed out beyond those asked for (one byte each, up to `usable`: the bits
    /// vector is sized to the COTs handed out, the stock has none). About 346 MiB for
    /// [`MAIN`] (336.5 MiB of blocks, 9.5 MiB of bits).
    pub const fn max_surplus_bytes(main: &FerretParams) -> usize {
        2 * (main.reserve() + main.n()) * BLOCK_BYTES + main.usable()
    }

    /// The public session identifier (from the IKNP base OTs; both parties agree on it).
    pub fn session_id(&self) -> [u8; 32] {
        self.session_id
    }

    fn dir_send(&self) -> u8 {
        match self.party {
            Party::Server => 0,
            Party::Client => 1,
        }
    }

    fn code(&self, p: &FerretParams, dir: u8, iter: u64) -> LpnCode {
        let shape = [p.t as u64, u64::from(p.h), u64::from(p.log_k)];
        let shape: Vec<u8> = shape.iter().flat_map(|v| v.to_le_bytes()).collect();
        let seed = derive_block(
            "fusion 2026 ot/ferret lpn code seed",
            &[&self.session_id, &[dir], &iter.to_le_bytes(), &shape],
        );
        LpnCode::new(seed, p.log_k)
    }

    /// One iteration as the sender: `stock` = k code keys then t·h level-OT keys; appends
    /// y = v ⊕ A·K (n blocks) to `out` and returns the message. Each tree goes through
    /// the code while it is in cache.
    fn sender_iteration(
        &mut self,
        p: &FerretParams,
        stock: &[Block],
        out: &mut Vec<Block>,
    ) -> Vec<u8> {
        let dir = self.dir_send();
        let (code_keys, ot_keys) = stock.split_at(p.k());
        let code = self.code(p, dir, self.send.iter);
        let h = p.h;
        let msg = mpcot::send(
            p,
            &mut self.ggm,
            &self.hash,
            &mut self.prg,
            self.delta,
            ot_keys,
            dir,
            self.send.tw,
            |j, tree| {
                // Ferret Fig. 7 (primal LPN): y = v ⊕ A·K, rows of tree j
                code.encode_at(tree, j << h, code_keys);
                out.extend_from_slice(tree);
            },
        );
        self.send.tw += ot_keys.len() as u64;
        self.send.iter += 1;
        msg
    }

    /// One iteration as the receiver: appends z = w ⊕ A·M (n blocks, choice bits
    /// x = e ⊕ A·u in the LSBs) to `m`.
    fn recv_iteration(
        &mut self,
        p: &FerretParams,
        stock: &[Block],
        msg: &[u8],
        m: &mut Vec<Block>,
    ) -> Result<(), OtError> {
        let dir = 1 - self.dir_send();
        let (code_m, ot_m) = stock.split_at(p.k());
        let code = self.code(p, dir, self.recv.iter);
        let h = p.h;
        mpcot::recv(
            p,
            &mut self.ggm,
            &self.hash,
            ot_m,
            dir,
            self.recv.tw,
            msg,
            |j, tree| {
                // Ferret Fig. 7 (primal LPN): z = w ⊕ A·M, rows of tree j
                code.encode_at(tree, j << h, code_m);
                m.extend_from_slice(tree);
            },
        )?;
        self.recv.tw += ot_m.len() as u64;
        self.recv.iter += 1;
        Ok(())
    }

    /// MAIN iterations an extension of `need` COTs runs when `spare` are held back.
    fn iterations(&self, need: usize, spare: usize) -> usize {
        if need <= spare {
            0
        } else {
            (need - spare).div_ceil(self.main.usable())
        }
    }

    /// Appends the COTs of one direction to `out`: all spare ones, then whole MAIN
    /// iterations until `need` are appended (none if `need` is 0). `send`: the direction
    /// where we are the sender (each iteration's message goes to the peer as soon as it is
    /// computed), else the receiver's (each iteration's message read first). On an error
    /// `out` is left as it was.
    fn extend_side(
        &mut self,
        ch: &mut dyn Channel,
        need: usize,
        send: bool,
        out: &mut Vec<Block>,
    ) -> Result<(), OtError> {
        if need == 0 {
            return Ok(());
        }
        let main = self.main;
        let start = out.len();
        let side = if send { &mut self.send } else { &mut self.recv };
        let mut spare = std::mem::take(&mut side.spare);
        let iters = self.iterations(need, spare.len());
        // exactly the room the iterations need (the last one writes n outputs before its
        // stock is split off): the buffers' whole capacity gets written, so zeroizing it
        // touches no fresh page
        let room = spare.len() + iters.saturating_sub(1) * main.usable() + main.n();
        reserve_zeroizing(out, if iters == 0 { spare.len() } else { room });
        out.extend_from_slice(&spare);
        spare.zeroize();
        drop(spare);
        for _ in 0..iters {
            let keep_from = out.len() + main.usable();
            let side = if send { &mut self.send } else { &mut self.recv };
            let mut stock = std::mem::take(&mut side.stock);
            let r = if send {
                let msg = self.sender_iteration(&main, &stock, out);
                split_stock(out, keep_from, &mut stock);
                self.send.stock = stock;
                // the sender needs nothing from the peer: every iteration's message goes
                // out as soon as it is computed (one flight), so the receiver works on
                // iteration i while we compute i + 1
                ch.send_vec(msg).map_err(OtError::from)
            } else {
                let r = ch
                    .recv_exact(main.iteration_bytes())
                    .map_err(|e| OtError::msg("Ferret SPCOT messages", e))
                    .and_then(|part| self.recv_iteration(&main, &stock, &part, out));
                if r.is_ok() {
                    split_stock(out, keep_from, &mut stock);
                }
                self.recv.stock = stock;
                r
            };
            if let Err(e) = r {
                out[start..].zeroize();
                out.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl RandomCot for Ferret {
    fn delta(&self) -> Block {
        self.delta
    }

    fn extend(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<CotBatch, OtError> {
        let mut out = CotBatch::default();
        self.extend_into(ch, n_send, n_recv, &mut out)?;
        Ok(out)
    }

    fn extend_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        self.extend_send_into(ch, n_send, n_recv, out)?;
        self.extend_recv_into(ch, n_send, n_recv, out)
    }

    fn split_extend(&self) -> bool {
        true
    }

    fn extend_send(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<(), OtError> {
        let mut out = CotBatch::default();
        self.extend_send_into(ch, n_send, n_recv, &mut out)?;
        self.pending = Some(std::mem::take(&mut out.send));
        Ok(())
    }

    fn extend_recv(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<CotBatch, OtError> {
        let mut out = CotBatch::default();
        if let Some(p) = self.pending.as_mut() {
            out.send = std::mem::take(p);
        }
        self.extend_recv_into(ch, n_send, n_recv, &mut out)?;
        Ok(out)
    }

    fn extend_send_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        _n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        if self.pending.is_some() {
            return Err(OtError::BadRequest(
                "Ferret: extend_send twice without extend_recv".into(),
            ));
        }
        self.extend_side(ch, n_send, true, &mut out.send)?;
        self.pending = Some(Vec::new());
        Ok(())
    }

    fn extend_recv_into(
        &mut self,
        ch: &mut dyn Channel,
        _n_send: usize,
        n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        let Some(mut p) = self.pending.take() else {
            return Err(OtError::BadRequest(
                "Ferret: extend_recv without extend_send".into(),
            ));
        };
        // sender COTs of a plain `extend_send` before (a caller mixing the two APIs) go
        // out with this batch, as `extend_recv` would hand them out
        if !p.is_empty() {
            reserve_zeroizing(&mut out.send, p.len());
            out.send.extend_from_slice(&p);
            p.zeroize();
        }
        let start = out.recv.len();
        self.extend_side(ch, n_recv, false, &mut out.recv)?;
        reserve_zeroizing(&mut out.recv_bits, out.recv.len() - start);
        out.recv_bits
            .extend(out.recv[start..].iter().map(|&x| (x & 1) as u8));
        Ok(())
    }

    fn extend_cost(&self, n_send: usize, n_recv: usize) -> (usize, usize) {
        let b = self.main.iteration_bytes();
        (
            b * self.iterations(n_send, self.send.spare.len()),
            b * self.iterations(n_recv, self.recv.spare.len()),
        )
    }

    fn name(&self) -> &'static str {
        "ferret"
    }
}
