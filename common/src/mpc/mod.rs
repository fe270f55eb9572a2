//! Two-party non-linear layers over the OT layer: millionaire, DReLU, ReLU, B2A, the
//! multiplexer, exact truncation, argmax and reveal (CrypTFlow2, ePrint 2020/1002;
//! Cheetah, ePrint 2022/207).
//!
//! # Use
//!
//! ```text
//!   let mut s = MpcSession::setup(&mut ch, Party::Server, MpcConfig::default(), &mut OsRng)?;  // once (IKNP)
//!   let mut s = MpcSession::setup_with(&mut ch, Party::Server,                                 // or any core OT:
//!       MpcConfig::recommended(OtKind::Ferret), OtKind::Ferret, &mut OsRng)?;                 // Ferret (the default kind)
//!   let y  = s.relu(&mut ch, ring, &x_share)?;             // any number of batches after
//!   let t  = s.relu_trunc(&mut ch, ring, &acc_share, f)?;  // hidden layer: ReLU(acc >> f)
//!   let z  = s.trunc(&mut ch, ring, &acc_share, f)?;       // logits: acc >> f (signed)
//!   let lb = s.argmax_reveal(&mut ch, ring, &z, cols, Party::Client)?;  // Some(labels) at the client
//! ```
//!
//! Shares are additive mod 2^l (`u64` per element, reduced), boolean shares are XOR
//! (`u8` 0/1 per element). Both parties call the same operation with the same public
//! arguments (ring, lengths, f, row width) and their own shares. The session never names
//! steps on the channel: callers wrap each operation in `ch.set_step(...)` (the backend
//! names steps by layer; the `bench` command uses `setup` and `relu`).
//!
//! Randomness: the session holds an AES-CTR [`Prg`] seeded at setup from the caller's
//! CSPRNG (the OS in product code). An error poisons the session: every later call
//! returns [`MpcError::Poisoned`]; start a new session.
//!
//! Semantics are those of `BRIEF.md` (fixed point): `trunc` is the exact arithmetic shift
//! (floor) of the signed value for every input; `relu_trunc(x) = max(0, x >> f)`;
//! `argmax` returns the smallest index among the maximal signed values, exact when every
//! difference of two values in a row fits the signed range (see [`argmax_precondition`]),
//! which holds for the output of `trunc` with f ≥ 1.

mod argmax;
pub mod cost;
mod millionaire;
mod ops;
#[cfg(test)]
mod tests;

pub use crate::ot::{OtKind, Party};
pub use argmax::argmax_precondition;

use rand::{CryptoRng, Rng};

use crate::channel::{Channel, ChannelError};
use crate::ot::{CoreOt, Iknp, KkotConfig, OtError, OtSession, Prg, RandomCot};
use crate::ring::{Ring, RingError};

/// Errors of the 2PC layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MpcError {
    /// The OT layer failed (transport, malformed OT message, ...).
    #[error(transparent)]
    Ot(#[from] OtError),
    /// A named protocol message could not be received or had the wrong length.
    #[error("{what}: {source}")]
    Message {
        /// which message
        what: &'static str,
        /// the transport's error
        source: ChannelError,
    },
    /// A named message did not decode.
    #[error("{what}: {source}")]
    Malformed {
        /// which message
        what: &'static str,
        /// why
        source: RingError,
    },
    /// Arguments the operation cannot take (documented per operation).
    #[error("invalid input: {0}")]
    BadInput(String),
    /// An earlier error left the session unusable.
    #[error("2PC session poisoned by an earlier error")]
    Poisoned,
}

/// Tunables of a session; both parties must use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpcConfig {
    /// Bits per millionaire leaf (the m of 1-of-2^m OT), 1..=8.
    pub leaf_bits: u32,
    /// Which 1-of-N OT the leaves use.
    pub kn: KkotConfig,
    /// Smallest COT extension batch per direction.
    pub min_batch: usize,
}

impl Default for MpcConfig {
    fn default() -> Self {
        Self {
            // Measured (bench relu, IKNP + KK13, 2^18 ReLUs, CPU µs per party and ReLU on the
            // shared 2-core machine): l = 32, m = 4, 5, 6, 7: 4422, 3968, 3546, 3284 bits,
            // 2.1, 2.0, 2.1, 2.6 µs; l = 37: 4996, 4560, 3876, 3876 bits, 2.4, 2.3, 2.7,
            // 2.7 µs. The KK13 sender hashes every one of the 2^m entries of a leaf, so m = 7
            // buys its last 7% of bits at l = 32 with 25% more CPU; m = 6 is the default.
            leaf_bits: 6,
            kn: KkotConfig::Kk13,
            min_batch: 1 << 12,
        }
    }
}

impl MpcConfig {
    /// The configuration measured best for a core OT: IKNP with KK13 leaves of 6 bits
    /// ([`MpcConfig::default`]); Ferret with leaves from COTs (a COT costs under half a
    /// bit there, so m COTs beat KK13's 256 bits a leaf) of 4 bits.
    ///
    /// Measured for Ferret (bench relu, 2^20 ReLUs, CPU seconds per party on the shared
    /// 2-core machine): l = 32, m = 3, 4, 5: 326, 382, 440 bits/ReLU, 6.0, 4.9, 4.9 s;
    /// l = 37, m = 3, 4: 388, 449 bits, 7.0, 5.4 s; KK13 leaves (m = 4): 2,382 bits, 3.2 s.
    /// m = 4 meets the issue's 420/480-bit targets with the least CPU (m = 3 needs 13%
    /// more COTs for the extra AND nodes and two more flights).
    pub fn recommended(kind: OtKind) -> Self {
        match kind {
            OtKind::Iknp => Self::default(),
            OtKind::Ferret => Self {
                leaf_bits: FERRET_LEAF_BITS,
                kn: KkotConfig::FromCots,
                ..Self::default()
            },
        }
    }
}

/// Leaf width with Ferret (see [`MpcConfig::recommended`]).
const FERRET_LEAF_BITS: u32 = 4;

/// The per-session 2PC object: OT state, PRG, configuration.
pub struct MpcSession<C: RandomCot = Iknp> {
    pub(crate) ot: OtSession<C>,
    pub(crate) party: Party,
    pub(crate) prg: Prg,
    pub(crate) cfg: MpcConfig,
    poisoned: bool,
}

impl<C: RandomCot> std::fmt::Debug for MpcSession<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpcSession")
            .field("party", &self.party)
            .field("cfg", &self.cfg)
            .field("ot", &self.ot)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl MpcSession<Iknp> {
    /// Sets up a session over IKNP: base OTs in both directions (Chou-Orlandi), and the
    /// KK13 bootstrap if configured. Both parties call it once; `rng` is the OS CSPRNG in
    /// product code.
    pub fn setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        cfg: MpcConfig,
        rng: &mut R,
    ) -> Result<Self, MpcError> {
        check_cfg(&cfg)?;
        let ot = OtSession::setup_iknp(ch, party, cfg.kn, rng)?;
        Self::from_ot(ot, cfg, rng)
    }
}

impl MpcSession<CoreOt> {
    /// Sets up a session over the core OT `kind` (both parties pass the same): IKNP as
    /// [`MpcSession::setup`] does, or Ferret (IKNP bootstrap, then silent OT; see
    /// [`crate::ot::ferret`]), plus the KK13 bootstrap if `cfg` asks for it. Backends
    /// select with [`OtKind::default`] (Ferret) and [`MpcConfig::recommended`].
    pub fn setup_with<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        cfg: MpcConfig,
        kind: OtKind,
        rng: &mut R,
    ) -> Result<Self, MpcError> {
        check_cfg(&cfg)?;
        let core = CoreOt::setup(ch, party, kind, rng)?;
        Self::setup_over(ch, party, cfg, core, rng)
    }

    /// The core OT's state as the cost formulas model it ([`cost::Extension`]), for the
    /// client's view of the next operations ([`cost::Sequence`]): IKNP, or Ferret with
    /// the COTs it holds in each direction and its iteration size and bytes.
    pub fn cost_extension(&self) -> cost::Extension {
        match self.ot.core() {
            CoreOt::Iknp(_) => cost::Extension::Iknp,
            CoreOt::Ferret(f) => {
                let (as_sender, as_receiver) = f.spare();
                let main = f.params();
                // (server as sender, client as sender), whichever party this is
                let (s2c, c2s) = match self.party {
                    Party::Client => (as_receiver, as_sender),
                    Party::Server => (as_sender, as_receiver),
                };
                cost::Extension::Ferret {
                    usable: main.usable(),
                    iteration_bytes: main.iteration_bytes(),
                    spare_s2c: s2c,
                    spare_c2s: c2s,
                }
            }
        }
    }

    /// The rest of [`Self::setup_with`] over a set-up core OT.
    pub(crate) fn setup_over<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        cfg: MpcConfig,
        core: CoreOt,
        rng: &mut R,
    ) -> Result<Self, MpcError> {
        check_cfg(&cfg)?;
        let sid = core.session_id();
        let mut ot = OtSession::new(core, party, sid);
        if cfg.kn == KkotConfig::Kk13 {
            // exact batches so that no IKNP COT is left over from setup (as `setup_iknp`;
            // Ferret hands out whole iterations whatever the batch)
            ot.set_min_batch(1);
            ot.enable_kk13(ch, rng)?;
        }
        Self::from_ot(ot, cfg, rng)
    }
}

fn check_cfg(cfg: &MpcConfig) -> Result<(), MpcError> {
    if !(1..=8).contains(&cfg.leaf_bits) {
        return Err(MpcError::BadInput(format!("leaf_bits = {}", cfg.leaf_bits)));
    }
    Ok(())
}

impl<C: RandomCot> MpcSession<C> {
    /// A session over an already set-up OT session (e.g. Ferret's).
    pub fn from_ot<R: Rng + CryptoRng + ?Sized>(
        mut ot: OtSession<C>,
        cfg: MpcConfig,
        rng: &mut R,
    ) -> Result<Self, MpcError> {
        check_cfg(&cfg)?;
        ot.set_min_batch(cfg.min_batch);
        let party = ot.party();
        Ok(Self {
            ot,
            party,
            prg: Prg::from_rng(rng),
            cfg,
            poisoned: false,
        })
    }

    /// This party's role.
    pub fn party(&self) -> Party {
        self.party
    }

    /// The configuration.
    pub fn config(&self) -> MpcConfig {
        self.cfg
    }

    /// The OT session (for derived OTs and buffer inspection).
    pub fn ot(&mut self) -> &mut OtSession<C> {
        &mut self.ot
    }

    /// Whether an earlier error left the session unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned || self.ot.is_poisoned()
    }

    /// Runs `f`, poisoning the session if it fails.
    pub(crate) fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, MpcError>,
    ) -> Result<T, MpcError> {
        if self.is_poisoned() {
            return Err(MpcError::Poisoned);
        }
        let r = f(self);
        if r.is_err() {
            self.poisoned = true;
            self.ot.poison();
        }
        r
    }

    pub(crate) fn is_server(&self) -> bool {
        self.party == Party::Server
    }
}

// ------------------------------------------------------------------ wire helpers

pub(crate) fn recv_len(
    ch: &mut dyn Channel,
    what: &'static str,
    len: usize,
) -> Result<Vec<u8>, MpcError> {
    ch.recv_exact(len)
        .map_err(|source| MpcError::Message { what, source })
}

pub(crate) fn recv_bits(
    ch: &mut dyn Channel,
    what: &'static str,
    n: usize,
) -> Result<Vec<u8>, MpcError> {
    let m = recv_len(ch, what, n.div_ceil(8))?;
    crate::ring::unpack_bit_bytes(&m, n).map_err(|source| MpcError::Malformed { what, source })
}

pub(crate) fn send_bits(ch: &mut dyn Channel, bits: &[u8]) -> Result<(), MpcError> {
    ch.send_vec(crate::ring::pack_bit_bytes(bits))?;
    Ok(())
}

pub(crate) fn recv_ring(
    ch: &mut dyn Channel,
    what: &'static str,
    ring: Ring,
    n: usize,
) -> Result<Vec<u64>, MpcError> {
    let m = recv_len(ch, what, ring.packed_len(n))?;
    ring.unpack(&m, n)
        .map_err(|source| MpcError::Malformed { what, source })
}

impl From<ChannelError> for MpcError {
    fn from(e: ChannelError) -> Self {
        MpcError::Ot(OtError::Channel(e))
    }
}

pub(crate) fn check_shares(ring: Ring, x: &[u64]) -> Result<(), MpcError> {
    if let Some(i) = x.iter().position(|&v| v > ring.mask()) {
        return Err(MpcError::BadInput(format!(
            "share {i} is not reduced mod 2^{}",
            ring.bits()
        )));
    }
    Ok(())
}
