//! Ferret silent OT extension (Yang, Weng, Lan, Zhang, Wang, "Ferret: Fast Extension for
//! coRRElated oT with small communication", CCS 2020, ePrint 2020/924), semi-honest,
//! primal LPN with regular noise, behind [`RandomCot`].
//!
//! # Message flow (one direction; both run at once, each party is the sender of one)
//!
//! ```text
//!   setup (once per session)
//!     Chou-Orlandi base OTs, IKNP extension of BOOTSTRAP.reserve() = 74,036 COTs per
//!     direction (both: one flight each way); Δ = IKNP's Δ
//!     one BOOTSTRAP iteration (below) ─▶ MAIN stock (540,928) + 329,472 spare COTs
//!
//!   iteration with parameters (t, h, k), stock = k + t·h COTs from the previous one
//!     S: t GGM trees of 2^h leaves     ────── t·(2h+1) blocks (mpcot.rs) ──────▶  R: punctured
//!        (MPCOT, regular noise)                                                     trees, e
//!     both: LPN with the public code of the iteration (lpn.rs):
//!        S: y = v ⊕ A·K_stock               R: z = w ⊕ A·M_stock,  x = e ⊕ A·u_stock
//!     keep the last k + t·h outputs as the next stock, hand out n − k − t·h
//!     (z = y ⊕ x·Δ: random COTs with the session's global Δ)
//!
//!   extend(n_send, n_recv): hand out the spare, then as many MAIN iterations as needed
//!     (split: extend_send computes and sends ours; extend_recv receives and computes theirs:
//!     one flight each way for both directions together)
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
//! - Choice bits are kept explicitly (one byte per COT), not in the least significant bit
//!   of the blocks as in the reference: Δ stays a uniform 128-bit value (IKNP's) and the
//!   keys stay uniform, at the price of one byte-sized lookup per stock index in the LPN.
//! - The code's seed, the level-OT hash key and the GGM keys are public and derived from
//!   the IKNP session identifier (both parties agree on it): no seed message.
//! - One thread per party: the bench runs both parties on the machine's two cores; the
//!   LPN step splits into independent row ranges if a deployment wants two threads.
//! - Memory per party and direction: one iteration's output (n blocks, 160 MiB for MAIN,
//!   plus n bytes of choice bits on the receiving side) and the stock (8.7 MiB).

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
use super::{Block, CotBatch, OtError, Party, Prg, RandomCot, Tccr};
use crate::channel::Channel;
use ggm::Ggm;
use lpn::LpnCode;

/// Our stock and spare COTs as the sender of one direction.
#[derive(Default)]
struct SendSide {
    /// the stock keys: k for the code, then t·h for the level OTs
    keys: Vec<Block>,
    /// COTs produced beyond what was asked (handed out first)
    spare: Vec<Block>,
    /// iterations run in this direction
    iter: u64,
    /// base COTs used for level OTs so far (tweak counter)
    tw: u64,
}

/// Our stock and spare COTs as the receiver of one direction.
#[derive(Default)]
struct RecvSide {
    bits: Vec<u8>,
    m: Vec<Block>,
    spare_bits: Vec<u8>,
    spare_m: Vec<Block>,
    iter: u64,
    tw: u64,
}

impl Drop for SendSide {
    fn drop(&mut self) {
        self.keys.zeroize();
        self.spare.zeroize();
    }
}

impl Drop for RecvSide {
    fn drop(&mut self) {
        self.bits.zeroize();
        self.m.zeroize();
        self.spare_bits.zeroize();
        self.spare_m.zeroize();
    }
}

/// Ferret random COT, both directions of one session (see the module documentation).
pub struct Ferret {
    party: Party,
    delta: Block,
    main: FerretParams,
    session_id: [u8; 32],
    /// fixed-key TCCR hash of the level OTs (public key, derived from the session)
    hash: Tccr,
    /// secret: the GGM seeds of our trees
    prg: Prg,
    ggm: Ggm,
    send: SendSide,
    recv: RecvSide,
    /// our sender-side output between `extend_send` and `extend_recv`
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
        let mut iknp = Iknp::setup(ch, party, rng)?;
        let m_b = boot.reserve();
        let mut base = iknp.extend(ch, m_b, m_b)?;
        if base.send.len() < m_b || base.recv.len() < m_b || base.recv_bits.len() < m_b {
            return Err(OtError::BadRequest("IKNP returned too few COTs".into()));
        }
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
            send: SendSide::default(),
            recv: RecvSide::default(),
            pending: None,
        };
        drop(iknp);
        // Bootstrap iteration in both directions: ours first (one flight each way).
        let mut out = vec![0 as Block; boot.n()];
        let msg = s.sender_iteration(&boot, &base.send[..m_b], &mut out);
        ch.send_vec(msg)?;
        let peer = ch
            .recv_exact(boot.iteration_bytes())
            .map_err(|e| OtError::msg("Ferret bootstrap messages", e))?;
        let mut m = vec![0 as Block; boot.n()];
        let mut bits = vec![0u8; boot.n()];
        s.recv_iteration(
            &boot,
            &base.recv_bits[..m_b],
            &base.recv[..m_b],
            &peer,
            &mut m,
            &mut bits,
        )?;
        drop(std::mem::take(&mut base));
        let keep = boot.n() - main.reserve();
        s.send.keys = out[keep..].to_vec();
        out[keep..].zeroize();
        out.truncate(keep);
        s.send.spare = out;
        s.recv.m = m[keep..].to_vec();
        s.recv.bits = bits[keep..].to_vec();
        m[keep..].zeroize();
        bits[keep..].zeroize();
        m.truncate(keep);
        bits.truncate(keep);
        s.recv.spare_m = m;
        s.recv.spare_bits = bits;
        Ok(s)
    }

    /// The main parameter set.
    pub fn params(&self) -> FerretParams {
        self.main
    }

    /// Spare COTs held back (handed out by the next extension): (as sender, as receiver).
    pub fn spare(&self) -> (usize, usize) {
        (self.send.spare.len(), self.recv.spare_m.len())
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

    /// One iteration as the sender: `stock` = k code keys then t·h level-OT keys; fills
    /// `out` (n blocks) with y = v ⊕ A·K and returns the message.
    fn sender_iteration(
        &mut self,
        p: &FerretParams,
        stock: &[Block],
        out: &mut [Block],
    ) -> Vec<u8> {
        let dir = self.dir_send();
        let (code_keys, ot_keys) = stock.split_at(p.k());
        let msg = mpcot::send(
            p,
            &mut self.ggm,
            &self.hash,
            &mut self.prg,
            self.delta,
            ot_keys,
            dir,
            self.send.tw,
            out,
        );
        self.send.tw += ot_keys.len() as u64;
        // Ferret Fig. 7 (primal LPN): y = v ⊕ A·K
        self.code(p, dir, self.send.iter).encode(out, code_keys);
        self.send.iter += 1;
        msg
    }

    /// One iteration as the receiver: fills `m` and `bits` (n each, bits zero on entry)
    /// with z = w ⊕ A·M and x = e ⊕ A·u.
    fn recv_iteration(
        &mut self,
        p: &FerretParams,
        stock_bits: &[u8],
        stock_m: &[Block],
        msg: &[u8],
        m: &mut [Block],
        bits: &mut [u8],
    ) -> Result<(), OtError> {
        let dir = 1 - self.dir_send();
        let (code_m, ot_m) = stock_m.split_at(p.k());
        let (code_b, ot_b) = stock_bits.split_at(p.k());
        mpcot::recv(
            p,
            &mut self.ggm,
            &self.hash,
            ot_b,
            ot_m,
            dir,
            self.recv.tw,
            msg,
            m,
            bits,
        )?;
        self.recv.tw += ot_m.len() as u64;
        self.code(p, dir, self.recv.iter)
            .encode_with_bits(m, bits, code_m, code_b);
        self.recv.iter += 1;
        Ok(())
    }

    /// MAIN iterations an extension of `need` COTs runs when `spare` are held back.
    fn iterations(&self, need: usize, spare: usize) -> usize {
        if need == 0 || need <= spare {
            0
        } else {
            (need - spare).div_ceil(self.main.usable())
        }
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
        self.extend_send(ch, n_send, n_recv)?;
        self.extend_recv(ch, n_send, n_recv)
    }

    fn split_extend(&self) -> bool {
        true
    }

    fn extend_send(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        _n_recv: usize,
    ) -> Result<(), OtError> {
        if self.pending.is_some() {
            return Err(OtError::BadRequest(
                "Ferret: extend_send twice without extend_recv".into(),
            ));
        }
        if n_send == 0 {
            self.pending = Some(Vec::new());
            return Ok(());
        }
        let main = self.main;
        let mut out = std::mem::take(&mut self.send.spare);
        let iters = self.iterations(n_send, out.len());
        if iters > 0 {
            out.reserve_exact(iters * main.usable() + main.reserve());
            let mut msg = Vec::with_capacity(iters * main.iteration_bytes());
            for _ in 0..iters {
                let base = out.len();
                out.resize(base + main.n(), 0);
                let mut stock = std::mem::take(&mut self.send.keys);
                msg.extend_from_slice(&self.sender_iteration(&main, &stock, &mut out[base..]));
                // the last k + t·h outputs are the next stock
                stock.copy_from_slice(&out[base + main.usable()..]);
                self.send.keys = stock;
                out[base + main.usable()..].zeroize();
                out.truncate(base + main.usable());
            }
            ch.send_vec(msg)?;
        }
        self.pending = Some(out);
        Ok(())
    }

    fn extend_recv(
        &mut self,
        ch: &mut dyn Channel,
        _n_send: usize,
        n_recv: usize,
    ) -> Result<CotBatch, OtError> {
        let Some(send) = self.pending.take() else {
            return Err(OtError::BadRequest(
                "Ferret: extend_recv without extend_send".into(),
            ));
        };
        let mut batch = CotBatch::default();
        batch.send = send;
        if n_recv == 0 {
            return Ok(batch);
        }
        let main = self.main;
        let mut m = std::mem::take(&mut self.recv.spare_m);
        let mut bits = std::mem::take(&mut self.recv.spare_bits);
        let iters = self.iterations(n_recv, m.len());
        if iters > 0 {
            let msg = ch
                .recv_exact(iters * main.iteration_bytes())
                .map_err(|e| OtError::msg("Ferret SPCOT messages", e))?;
            m.reserve_exact(iters * main.usable() + main.reserve());
            bits.reserve_exact(iters * main.usable() + main.reserve());
            for part in msg.chunks_exact(main.iteration_bytes()) {
                let base = m.len();
                m.resize(base + main.n(), 0);
                bits.resize(base + main.n(), 0);
                let mut sm = std::mem::take(&mut self.recv.m);
                let mut sb = std::mem::take(&mut self.recv.bits);
                let r =
                    self.recv_iteration(&main, &sb, &sm, part, &mut m[base..], &mut bits[base..]);
                let keep = base + main.usable();
                sm.copy_from_slice(&m[keep..]);
                sb.copy_from_slice(&bits[keep..]);
                self.recv.m = sm;
                self.recv.bits = sb;
                m[keep..].zeroize();
                bits[keep..].zeroize();
                m.truncate(keep);
                bits.truncate(keep);
                r?;
            }
        }
        batch.recv = m;
        batch.recv_bits = bits;
        Ok(batch)
    }

    fn extend_cost(&self, n_send: usize, n_recv: usize) -> (usize, usize) {
        let b = self.main.iteration_bytes();
        (
            b * self.iterations(n_send, self.send.spare.len()),
            b * self.iterations(n_recv, self.recv.spare_m.len()),
        )
    }

    fn name(&self) -> &'static str {
        "ferret"
    }
}
