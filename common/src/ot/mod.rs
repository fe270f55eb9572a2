//! Oblivious transfer: base OT, IKNP/ALSZ correlated-OT extension, and every OT flavour
//! the 2PC protocols need, derived from one core trait.
//!
//! # Layers
//!
//! ```text
//!   base.rs      Chou-Orlandi base OT (Ristretto255), both directions, once per session
//!      │  128 random OTs per direction
//!   iknp.rs      IKNP extension with the ALSZ optimisations  ──implements──▶  RandomCot
//!   ferret/      Ferret silent OT (GGM trees, regular-noise MPCOT, LPN), bootstrapped from
//!      │         IKNP once per session ──implements──▶ RandomCot; `CoreOt` picks either at
//!      │         run time (`OtKind`, Ferret by default)
//!   session.rs   OtSession<C: RandomCot>: buffers COTs per direction (large batches, one
//!      │         flight per extension, none when the buffer suffices) and derives
//!      │           - random OT (ROT), k-bit messages           (no extra traffic)
//!      │           - chosen-choice COT with arithmetic correlations mod 2^l (1 + l bits)
//!      │           - chosen-message 1-of-2 OT                  (1 + 2k bits)
//!      │           - 1-of-N OT, N = 2^m, from m chosen-choice COTs (m + N·k bits)
//!   kkot.rs      KK13 1-of-N OT (N ≤ 256) over a 256-bit Walsh-Hadamard code, bootstrapped
//!                from 256 ROTs of the core trait: 256 + N·k bits, cheaper than m COTs
//!                while a COT costs 128 bits (IKNP); with a silent OT the m-COT route wins.
//!   hash.rs      fixed-key AES TCCR hash (Guo et al. 2020) and AES-CTR PRG
//!   aesni.rs     the only `unsafe`: AES-128 with AES-NI on u128 blocks (fallback: `aes`),
//!                and a cache prefetch hint for Ferret's LPN step
//!   transpose.rs 128 x 128 bit transpose (Eklundh), safe Rust
//! ```
//!
//! Measured choice of the 1-of-N OT (bench relu, 2^16 ReLUs, l = 32): over IKNP, KK13
//! 4,422 bits/ReLU at m = 4 and 3,284 at m = 7, against 6,373 and 6,003 for m COTs per OT
//! (that route pays m·129 bits per leaf against 256 for KK13), and less CPU. Over Ferret
//! (2^20 ReLUs, l = 32, m = 4): m COTs per OT 382 bits/ReLU against 2,382 for KK13, whose
//! 256 bits a leaf now dominate (KK13 needs fewer COTs, so less CPU: 3.2 against 4.9 s).
//!
//! A *random correlated OT* (block form, global Δ) between a sender and a receiver: the
//! sender holds Δ (fixed for the session and direction) and k_i; the receiver holds a random
//! bit b_i and m_i = k_i ⊕ b_i·Δ. Blocks are `u128`.
//!
//! # Choosing the core OT
//!
//! [`Ferret`] (issue 9) implements [`RandomCot`] as IKNP does; [`CoreOt`] holds either,
//! chosen at run time by [`OtKind`] (Ferret by default). A backend writes
//!
//! ```text
//!   let kind = OtKind::default();                                          // Ferret
//!   let mpc  = MpcSession::setup_with(ch, party, MpcConfig::recommended(kind), kind, &mut OsRng)?;
//! ```
//!
//! (or, by hand: `OtSession::new(core, party, core.session_id())` and
//! `MpcSession::from_ot`). Every protocol of `crate::mpc` runs unchanged over either (the
//! tests run them over both, and over a test-only dealer COT). `KkotConfig::FromCots`
//! builds the leaves' 1-of-N OTs from m COTs each, the cheap choice once a COT costs under
//! a bit; `OtSession::enable_kk13` stays available on any core OT.
//!
//! Everything runs over the blocking [`Channel`](crate::channel::Channel); the derived
//! OTs are message-in/message-out functions so that the protocols of `crate::mpc` can put
//! messages of several OTs into one flight.

#[allow(unsafe_code)]
mod aesni;
mod base;
pub mod ferret;
mod hash;
mod iknp;
mod kkot;
mod session;
#[cfg(test)]
mod tests;
mod transpose;

pub use ferret::{CoreOt, Ferret, FerretParams, OtKind};
pub use hash::{Prg, Tccr};
pub use iknp::Iknp;
pub use kkot::KkotConfig;
pub use session::{CotChosen, KnChosen, OtSession, RotRecv};
pub use transpose::transpose128;

use crate::channel::{Channel, ChannelError};
use crate::ring::RingError;

/// A 128-bit block: an OT key, a message of a correlated OT, the global Δ.
pub type Block = u128;

/// The two parties of the session. The server holds the model, the client the inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Party {
    /// the model owner (P0 in CrypTFlow2's notation)
    Server,
    /// the querier (P1)
    Client,
}

impl Party {
    /// The other party.
    pub fn peer(self) -> Party {
        match self {
            Party::Server => Party::Client,
            Party::Client => Party::Server,
        }
    }
}

/// Errors of the OT layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtError {
    /// The transport failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A named protocol message could not be received or had the wrong length.
    #[error("{what}: {source}")]
    Message {
        /// which message
        what: &'static str,
        /// the transport's error (often a length mismatch)
        source: ChannelError,
    },
    /// A named message did not decode (wrong length, non-zero padding).
    #[error("{what}: {source}")]
    Malformed {
        /// which message
        what: &'static str,
        /// why it did not decode
        source: RingError,
    },
    /// A base-OT group element that does not decode, or the identity.
    #[error("base OT: invalid group element at index {index}")]
    InvalidPoint {
        /// the index of the offending point
        index: usize,
    },
    /// A request the OT layer cannot serve (e.g. N too large for a 1-of-N OT).
    #[error("invalid OT request: {0}")]
    BadRequest(String),
    /// An earlier error left the session unusable.
    #[error("OT session poisoned by an earlier error")]
    Poisoned,
}

impl OtError {
    pub(crate) fn msg(what: &'static str, source: ChannelError) -> Self {
        OtError::Message { what, source }
    }
}

/// A batch of fresh random correlated OTs from [`RandomCot::extend`].
#[derive(Default)]
pub struct CotBatch {
    /// keys k_i of the COTs where this party is the sender (at least `n_send` of them)
    pub send: Vec<Block>,
    /// choice bits b_i (0 or 1) of the COTs where this party is the receiver
    pub recv_bits: Vec<u8>,
    /// m_i = k_i ⊕ b_i·Δ_peer, same length as `recv_bits` (at least `n_recv`)
    pub recv: Vec<Block>,
}

impl std::fmt::Debug for CotBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CotBatch {{ send: {} COTs, recv: {} COTs, [redacted] }}",
            self.send.len(),
            self.recv.len()
        )
    }
}

impl CotBatch {
    /// Appends `other`'s COTs (taking its vectors instead where ours are empty and too
    /// small to hold them: no copy).
    pub fn append(&mut self, mut other: CotBatch) {
        fn take<T: Copy + zeroize::DefaultIsZeroes>(ours: &mut Vec<T>, theirs: &mut Vec<T>) {
            if ours.is_empty() && ours.capacity() < theirs.len() {
                std::mem::swap(ours, theirs);
            } else {
                reserve_zeroizing(ours, theirs.len());
                ours.extend_from_slice(theirs);
            }
        }
        take(&mut self.send, &mut other.send);
        take(&mut self.recv, &mut other.recv);
        take(&mut self.recv_bits, &mut other.recv_bits);
    }
}

/// Makes room for exactly `additional` more elements in `v`, like `Vec::reserve_exact`, but
/// where the vector must move it copies into a new allocation and zeroizes the old one
/// first (`realloc` would free the old block with the secrets still in it).
pub(crate) fn reserve_zeroizing<T: Copy + zeroize::DefaultIsZeroes>(
    v: &mut Vec<T>,
    additional: usize,
) {
    use zeroize::Zeroize;
    if v.capacity() - v.len() >= additional {
        return;
    }
    let mut moved = Vec::with_capacity(v.len().saturating_add(additional));
    moved.extend_from_slice(v);
    v.zeroize();
    *v = moved;
}

impl Drop for CotBatch {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.send.zeroize();
        self.recv_bits.zeroize();
        self.recv.zeroize();
    }
}

/// The core OT trait: random correlated OT in block form with a global Δ per direction.
///
/// One value per session holds both directions: this party is the COT *sender* (holds Δ)
/// in one and the COT *receiver* in the other. The contract an implementation (IKNP here,
/// Ferret later) must satisfy:
///
/// - `delta()` is fixed for the value's lifetime and random (its bits are this party's
///   secret);
/// - `extend(ch, n_send, n_recv)` is called by both parties with mirrored counts (ours
///   `n_send` = the peer's `n_recv`) and returns at least that many fresh COTs in each
///   direction, the same number on both sides, with `recv[i] = peer.send[i] ⊕
///   recv_bits[i]·peer.delta()`, `recv_bits` uniform and unknown to the peer, and keys
///   pseudo-random to the receiver beyond the correlation;
/// - it uses only `ch` for traffic and may take any number of flights; after an error the
///   value may be left unusable (the owning [`OtSession`] poisons itself).
pub trait RandomCot: Send {
    /// This party's Δ for the direction where it is the COT sender.
    fn delta(&self) -> Block;

    /// Produces fresh COTs in both directions (see the trait's contract).
    fn extend(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<CotBatch, OtError>;

    /// Whether [`RandomCot::extend_send`] / [`RandomCot::extend_recv`] split an extension
    /// into "send everything" and "receive everything" (one flight each way), so that a
    /// protocol can put its own messages into the same flights. Default: no.
    fn split_extend(&self) -> bool {
        false
    }

    /// First half of a split extension: sends this party's messages, reads nothing.
    /// Only called when [`RandomCot::split_extend`] is true; the default refuses.
    fn extend_send(
        &mut self,
        _ch: &mut dyn Channel,
        _n_send: usize,
        _n_recv: usize,
    ) -> Result<(), OtError> {
        Err(OtError::BadRequest(
            "this core OT cannot split an extension".into(),
        ))
    }

    /// Second half of a split extension (same counts as the first): reads the peer's
    /// messages and returns the batch.
    fn extend_recv(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<CotBatch, OtError> {
        self.extend(ch, n_send, n_recv)
    }

    /// [`RandomCot::extend`] appending to `out`, whose vectors keep their capacity from one
    /// extension to the next (the session's buffers): a core OT that can write its outputs
    /// in place overrides it. Default: extend, then [`CotBatch::append`].
    fn extend_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        let b = self.extend(ch, n_send, n_recv)?;
        out.append(b);
        Ok(())
    }

    /// [`RandomCot::extend_send`] that may append this party's sender COTs to `out` at once
    /// (then [`RandomCot::extend_recv_into`] with the same `out` appends the rest).
    /// Default: [`RandomCot::extend_send`].
    fn extend_send_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
        _out: &mut CotBatch,
    ) -> Result<(), OtError> {
        self.extend_send(ch, n_send, n_recv)
    }

    /// [`RandomCot::extend_recv`] appending to `out` (the `out` of the
    /// [`RandomCot::extend_send_into`] before). Default: extend_recv, then append.
    fn extend_recv_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        let b = self.extend_recv(ch, n_send, n_recv)?;
        out.append(b);
        Ok(())
    }

    /// Upper bound on the bytes this party sends and receives for `extend(n_send, n_recv)`,
    /// used by the cost formulas: `(sent, received)`.
    fn extend_cost(&self, n_send: usize, n_recv: usize) -> (usize, usize);

    /// A short name for reports (`"iknp"`, `"ferret"`).
    fn name(&self) -> &'static str;
}
