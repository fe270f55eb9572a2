//! The per-session OT object: COT buffers for both directions and every derived OT.
//!
//! ```text
//!   reserve(n_send, n_recv)          one RandomCot::extend (IKNP: one flight each way)
//!                                    only if a buffer runs short; batches ≥ min_batch
//!   ROT         sender: (H(i,k_i), H(i,k_i⊕Δ))    receiver: (b_i, H(i,m_i))     no traffic
//!   COT_l       R ──▶ S : d = c ⊕ b (1 bit)       S: k' = k ⊕ d·Δ, r = H(i,k')
//!   (chosen c)  S ──▶ R : t = r + δ - H(i,k'⊕Δ)   R: y = H(i,m) + c·t = r + c·δ
//!   OT (1-of-2) R ──▶ S : d                       S ──▶ R : e_b = x_b ⊕ H(i, k' ⊕ b·Δ)
//!   OT (1-of-N) R ──▶ S : m correction bits       S ──▶ R : e_j = x_j ⊕ ⊕_t slice_j(G(i_t, K_{t,j_t}))
//!               (N = 2^m; Naor-Pinkas 1999, from m OTs; G(i, K) = H((i,0), K) ‖ H((i,1), K) ‖ …
//!               cut into N slices of `bits` bits, see `np_rows`)
//! ```
//!
//! Tweaks: `H` is the session's [`Tccr`]; the tweak of COT number `i` (counted per
//! direction from the session's start) is `dir·2^127 + i·2^16 + sub`, where `dir` says
//! which party is the COT sender and `sub` separates several hashes of one COT. Every
//! COT is used once, so no tweak repeats in a session (Guo et al. 2020, TCCR).
//!
//! Derived OTs are message-in/message-out: the caller (a protocol of `crate::mpc`) sends
//! the returned bytes as one channel message and passes the peer's message in, so messages
//! of many OTs share flights. Receiving sides check lengths exactly.

use rand::{CryptoRng, Rng};
use zeroize::{Zeroize, Zeroizing};

use super::iknp::Iknp;
use super::kkot::{Kkot, KkotConfig};
use super::{Block, CotBatch, OtError, Party, RandomCot, Tccr};
use crate::channel::Channel;
use crate::ring::{Ring, pack_bit_bytes, unpack_bit_bytes};

/// The default smallest extension batch (COTs per direction).
pub(crate) const DEFAULT_MIN_BATCH: usize = 1 << 12;

/// COTs hashed at a time by the sender of ROTs and chosen-choice OTs (four buffers of this
/// many blocks on the stack: 16 KiB).
const PAIR_CHUNK: usize = 256;

/// 1-of-N OTs hashed at a time (see `np_rows`).
const NP_CHUNK: usize = 32;

/// OT state of one session: a [`RandomCot`] plus buffers and derived OTs.
pub struct OtSession<C: RandomCot = Iknp> {
    cot: C,
    party: Party,
    hash: Tccr,
    delta: Block,
    /// the buffered COTs (`send`: keys where we are the sender; `recv`, `recv_bits`: where
    /// we are the receiver), consumed from `send_pos` / `recv_pos` on; the vectors keep
    /// their capacity from one extension to the next. Secrets: the COTs before the
    /// positions are zero (each operation zeroizes those it takes as it uses them; copies
    /// it hands out, as in [`CotChosen`] and [`KnChosen`], zeroize themselves on drop);
    /// those after wait for their use or the session's drop ([`CotBatch`] zeroizes itself)
    buf: CotBatch,
    send_pos: usize,
    send_idx: u64,
    recv_pos: usize,
    recv_idx: u64,
    min_batch: usize,
    kk: Option<Kkot>,
    /// extension counts between `reserve_send` and `reserve_recv`
    pending: Option<(usize, usize)>,
    poisoned: bool,
}

impl<C: RandomCot> std::fmt::Debug for OtSession<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (s, r) = self.available();
        write!(
            f,
            "OtSession {{ ot: {}, party: {:?}, buffered: ({s}, {r}), poisoned: {}, [redacted] }}",
            self.cot.name(),
            self.party,
            self.poisoned
        )
    }
}

impl<C: RandomCot> Drop for OtSession<C> {
    fn drop(&mut self) {
        self.delta.zeroize();
        // `buf` zeroizes itself
    }
}

/// Receiver state of a chosen-choice COT batch between [`OtSession::cot_choose`] and
/// [`OtSession::cot_finish`].
pub struct CotChosen {
    idx: u64,
    choices: Vec<u8>,
    m: Vec<Block>,
}

impl std::fmt::Debug for CotChosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CotChosen {{ n: {}, [redacted] }}", self.m.len())
    }
}

impl Drop for CotChosen {
    fn drop(&mut self) {
        self.choices.zeroize();
        self.m.zeroize();
    }
}

/// Receiver state of a 1-of-N batch between [`OtSession::kn_choose`] and
/// [`OtSession::kn_finish`].
pub enum KnChosen {
    /// from m chosen-choice COTs per OT
    Cots {
        /// the receiver's pad of each OT (its chosen slice, see `np_rows`), hashed when the
        /// choices were made: the state keeps `bits` bits per OT, not m blocks
        pads: Zeroizing<Vec<u64>>,
        /// the choices
        choices: Zeroizing<Vec<u16>>,
        /// log2 N
        m: u32,
        /// message width the pads were cut for
        bits: u32,
    },
    /// from the KK13 extension
    Kk(super::kkot::KkRecv),
}

impl std::fmt::Debug for KnChosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KnChosen { [redacted] }")
    }
}

/// Random OTs as received: choice bits and the keys `H(i, m_i)`.
pub struct RotRecv {
    /// the random choice bits (0/1)
    pub bits: Vec<u8>,
    /// the chosen keys
    pub keys: Vec<Block>,
}

impl std::fmt::Debug for RotRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RotRecv {{ n: {}, [redacted] }}", self.keys.len())
    }
}

impl Drop for RotRecv {
    fn drop(&mut self) {
        self.bits.zeroize();
        self.keys.zeroize();
    }
}

/// Appends `width`-bit values in the bit order of [`pack_bits`](crate::ring::pack_bits).
pub(crate) struct BitWriter {
    out: Vec<u8>,
    acc: u128,
    nbits: u32,
}

impl BitWriter {
    pub(crate) fn with_capacity(bits: usize) -> Self {
        Self {
            out: Vec::with_capacity(bits.div_ceil(8)),
            acc: 0,
            nbits: 0,
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, x: u64, width: u32) {
        self.acc |= u128::from(x) << self.nbits;
        self.nbits += width;
        while self.nbits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.nbits -= 8;
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        if self.nbits > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Random access to `count` packed `width`-bit values (the layout of [`pack_bits`](crate::ring::pack_bits)),
/// with the same exact-length and zero-padding checks as [`unpack_bits`](crate::ring::unpack_bits).
pub(crate) struct PackedReader<'a> {
    bytes: &'a [u8],
    width: u32,
}

impl<'a> PackedReader<'a> {
    pub(crate) fn new(
        what: &'static str,
        bytes: &'a [u8],
        count: usize,
        width: u32,
    ) -> Result<Self, OtError> {
        let expected = (count * width as usize).div_ceil(8);
        if bytes.len() != expected || !(1..=64).contains(&width) {
            return Err(OtError::Malformed {
                what,
                source: crate::ring::RingError::PackedLength {
                    count,
                    expected,
                    actual: bytes.len(),
                },
            });
        }
        let used = (count * width as usize) % 8;
        if used != 0 && bytes.last().is_some_and(|&b| b >> used != 0) {
            return Err(OtError::Malformed {
                what,
                source: crate::ring::RingError::Padding,
            });
        }
        Ok(Self { bytes, width })
    }

    /// Value number `k` (the caller keeps `k < count`).
    #[inline]
    pub(crate) fn get(&self, k: usize) -> u64 {
        let bit = k * self.width as usize;
        let (byte, off) = (bit / 8, bit % 8);
        let mut acc: u128 = 0;
        let nbytes = (off + self.width as usize).div_ceil(8);
        for (t, b) in self.bytes[byte..byte + nbytes].iter().enumerate() {
            acc |= u128::from(*b) << (8 * t);
        }
        let mask = if self.width == 64 {
            u64::MAX
        } else {
            (1u64 << self.width) - 1
        };
        ((acc >> off) as u64) & mask
    }
}

/// The mask of the bits of block `sb` (of a string cut into `big_n` slices of `w` bits)
/// that belong to slices j with bit t of j set.
#[inline]
fn slice_select(sb: usize, t: usize, w: usize, big_n: usize) -> Block {
    let mut sel: Block = 0;
    let (lo, hi) = (sb * 128, sb * 128 + 128);
    for j in (0..big_n).filter(|j| (j >> t) & 1 == 1) {
        let (a, b) = (j * w, (j + 1) * w);
        if b <= lo || a >= hi {
            continue;
        }
        let (a, b) = (a.max(lo) - lo, b.min(hi) - lo);
        let ones: Block = if b - a >= 128 {
            Block::MAX
        } else {
            ((1 as Block) << (b - a)) - 1
        };
        sel |= ones << a;
    }
    sel
}

/// Bits `at..at + w` (w ≤ 64) of the little-endian bit string `blocks`.
#[inline]
fn read_slice(blocks: &[Block], at: usize, w: usize) -> Block {
    let (b, o) = (at / 128, at % 128);
    let mut v = blocks[b] >> o;
    if o + w > 128 && b + 1 < blocks.len() {
        v |= blocks[b + 1] << (128 - o);
    }
    v
}

#[inline]
fn tweak(dir: u8, idx: u64, sub: u16) -> Block {
    (u128::from(dir) << 127) | (u128::from(idx) << 16) | u128::from(sub)
}

#[inline]
fn lane(h: Block, v: usize, ring: Ring) -> u64 {
    ring.reduce((h >> (64 * v)) as u64)
}

impl OtSession<Iknp> {
    /// Sets up IKNP in both directions (base OTs) and, if `kk` says so, the KK13 1-of-N
    /// extension on top. `rng` is the OS CSPRNG in product code.
    pub fn setup_iknp<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        kk: KkotConfig,
        rng: &mut R,
    ) -> Result<Self, OtError> {
        let cot = Iknp::setup(ch, party, rng)?;
        let sid = cot.session_id();
        let mut s = OtSession::new(cot, party, sid);
        if kk == KkotConfig::Kk13 {
            // Bootstrap with exact batches so no COT is left over from setup.
            let mb = s.min_batch;
            s.min_batch = 1;
            s.enable_kk13(ch, rng)?;
            s.min_batch = mb;
        }
        Ok(s)
    }
}

impl<C: RandomCot> OtSession<C> {
    /// Wraps a set-up [`RandomCot`]; `session_id` (public, agreed) keys the fixed-key hash.
    pub fn new(cot: C, party: Party, session_id: [u8; 32]) -> Self {
        let key = blake3::derive_key("fusion 2026 ot/session fixed-key aes", &session_id);
        let mut k = [0u8; 16];
        k.copy_from_slice(&key[..16]);
        let delta = cot.delta();
        Self {
            cot,
            party,
            hash: Tccr::new(Block::from_le_bytes(k)),
            delta,
            buf: CotBatch::default(),
            send_pos: 0,
            send_idx: 0,
            recv_pos: 0,
            recv_idx: 0,
            min_batch: DEFAULT_MIN_BATCH,
            kk: None,
            pending: None,
            poisoned: false,
        }
    }

    /// Switches 1-of-N OTs to KK13 (bootstraps its base OTs from 2·256 ROTs).
    pub fn enable_kk13<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        rng: &mut R,
    ) -> Result<(), OtError> {
        let r = Kkot::setup(self, ch, rng);
        match r {
            Ok(k) => {
                self.kk = Some(k);
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Whether 1-of-N OTs use KK13.
    pub fn uses_kk13(&self) -> bool {
        self.kk.is_some()
    }

    /// The smallest extension batch; both parties must set the same value.
    pub fn set_min_batch(&mut self, n: usize) {
        self.min_batch = n.max(1);
    }

    /// The smallest extension batch.
    pub fn min_batch(&self) -> usize {
        self.min_batch
    }

    /// The core OT (for its state, e.g. Ferret's spare COTs).
    pub fn core(&self) -> &C {
        &self.cot
    }

    /// The core OT's name (`"iknp"`, ...).
    pub fn ot_name(&self) -> &'static str {
        self.cot.name()
    }

    /// This party's role.
    pub fn party(&self) -> Party {
        self.party
    }

    /// Buffered COTs: (as sender, as receiver).
    pub fn available(&self) -> (usize, usize) {
        (
            self.buf.send.len() - self.send_pos,
            self.buf.recv.len() - self.recv_pos,
        )
    }

    /// Test view of the buffers: (non-zero entries in their used part, in their unused
    /// part), sender keys, receiver blocks and bits together.
    #[cfg(test)]
    pub(crate) fn nonzero_used_unused(&self) -> (usize, usize) {
        fn nz<T: Copy + Default + PartialEq>(v: &[T], pos: usize) -> (usize, usize) {
            let count = |s: &[T]| s.iter().filter(|&&x| x != T::default()).count();
            (count(&v[..pos]), count(&v[pos..]))
        }
        let parts = [
            nz(&self.buf.send, self.send_pos),
            nz(&self.buf.recv, self.recv_pos),
            nz(&self.buf.recv_bits, self.recv_pos),
        ];
        parts.iter().fold((0, 0), |a, p| (a.0 + p.0, a.1 + p.1))
    }

    /// Marks the session unusable.
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    /// Whether an earlier error left the session unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub(crate) fn check(&self) -> Result<(), OtError> {
        if self.poisoned {
            Err(OtError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn dir_send(&self) -> u8 {
        match self.party {
            Party::Server => 0,
            Party::Client => 1,
        }
    }

    fn dir_recv(&self) -> u8 {
        1 - self.dir_send()
    }

    /// The COT counts an extension would produce for a reservation: `(n_send, n_recv)`
    /// to ask the core OT for (0 where the buffer suffices).
    pub fn extension_for(&self, n_send: usize, n_recv: usize) -> (usize, usize) {
        let (a, b) = self.available();
        let f = |have: usize, need: usize| {
            if need > have {
                (need - have).max(self.min_batch)
            } else {
                0
            }
        };
        (f(a, n_send), f(b, n_recv))
    }

    /// Makes sure `n_send` / `n_recv` COTs are buffered, extending (both directions in one
    /// call of the core OT) only if one falls short. Both parties call it with mirrored
    /// counts. Bytes: see [`RandomCot::extend_cost`] of [`Self::extension_for`].
    pub fn reserve(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<(), OtError> {
        self.reserve_send(ch, n_send, n_recv)?;
        self.reserve_recv(ch)
    }

    /// First half of [`Self::reserve`]: where the core OT splits its extension
    /// ([`RandomCot::split_extend`], IKNP), sends this party's extension messages and
    /// returns; the caller may send more messages in the same flight and must then call
    /// [`Self::reserve_recv`] before using COTs. Otherwise does the whole reservation.
    pub fn reserve_send(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<(), OtError> {
        self.check()?;
        if self.pending.is_some() {
            self.poisoned = true;
            return Err(OtError::BadRequest(
                "reserve_send twice without reserve_recv".into(),
            ));
        }
        let (es, er) = self.extension_for(n_send, n_recv);
        if es == 0 && er == 0 {
            return Ok(());
        }
        self.compact();
        let r = if self.cot.split_extend() {
            self.pending = Some((es, er));
            self.cot.extend_send_into(ch, es, er, &mut self.buf)
        } else {
            self.cot.extend_into(ch, es, er, &mut self.buf)
        };
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Second half of [`Self::reserve`] (a no-op when nothing is pending).
    pub fn reserve_recv(&mut self, ch: &mut dyn Channel) -> Result<(), OtError> {
        self.check()?;
        let Some((es, er)) = self.pending.take() else {
            return Ok(());
        };
        let r = self.cot.extend_recv_into(ch, es, er, &mut self.buf);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Drops the COTs used so far from the buffers before an extension appends to them;
    /// the buffers keep their capacity. (Each operation zeroized the COTs it took as it
    /// used them: see [`Self::take`].)
    fn compact(&mut self) {
        debug_assert!(self.buf.send[..self.send_pos].iter().all(|&k| k == 0));
        debug_assert!(self.buf.recv[..self.recv_pos].iter().all(|&m| m == 0));
        debug_assert!(self.buf.recv_bits[..self.recv_pos].iter().all(|&b| b == 0));
        self.buf.send.drain(..self.send_pos);
        self.send_pos = 0;
        self.buf.recv.drain(..self.recv_pos);
        self.buf.recv_bits.drain(..self.recv_pos);
        self.recv_pos = 0;
    }

    /// Takes `n` COTs of one direction (`send`: where we are the sender): their first
    /// index and their range in the buffers. The caller zeroizes the range as it uses it
    /// (every operation of this file does, chunk by chunk where the range is large, so
    /// the writes hit the cache): a used COT does not stay in the buffers until the next
    /// extension or the session's end (the tests' builds check this at each extension).
    fn take(&mut self, n: usize, send: bool) -> Result<(u64, std::ops::Range<usize>), OtError> {
        let (have, role) = if send {
            (self.available().0, "sender")
        } else {
            (self.available().1, "receiver")
        };
        if have < n {
            self.poisoned = true;
            return Err(OtError::BadRequest(format!(
                "{n} {role} COTs used without reserve"
            )));
        }
        let (pos, idx) = if send {
            (&mut self.send_pos, &mut self.send_idx)
        } else {
            (&mut self.recv_pos, &mut self.recv_idx)
        };
        let first = *idx;
        *idx += n as u64;
        let r = *pos..*pos + n;
        *pos += n;
        Ok((first, r))
    }

    /// Takes `n` sender COTs: their first index and their range in `buf.send`.
    fn take_send(&mut self, n: usize) -> Result<(u64, std::ops::Range<usize>), OtError> {
        self.take(n, true)
    }

    /// Takes `n` sender COTs, applies the receiver's choice corrections `d` if given
    /// (`k' = k ⊕ d·Δ`) and calls `f(i, H(i, k'_i), H(i, k'_i ⊕ Δ))` for each, in order.
    /// Works through [`PAIR_CHUNK`] COTs at a time in small buffers, so a batch of millions
    /// allocates nothing of its size (fresh pages cost more than the hashing here).
    fn sender_pairs(
        &mut self,
        n: usize,
        d: Option<&[u8]>,
        mut f: impl FnMut(usize, Block, Block),
    ) -> Result<(), OtError> {
        let (idx, range) = self.take_send(n)?;
        let dir = self.dir_send();
        let delta = self.delta;
        let mut x0 = [0 as Block; PAIR_CHUNK];
        let mut x1 = [0 as Block; PAIR_CHUNK];
        let mut h0 = [0 as Block; PAIR_CHUNK];
        let mut h1 = [0 as Block; PAIR_CHUNK];
        for (c, kc) in self.buf.send[range].chunks_mut(PAIR_CHUNK).enumerate() {
            let at = c * PAIR_CHUNK;
            let len = kc.len();
            for (q, &k) in kc.iter().enumerate() {
                let k = match d {
                    Some(d) if d[at + q] == 1 => k ^ delta,
                    _ => k,
                };
                x0[q] = k;
                x1[q] = k ^ delta;
            }
            // used: gone from the buffer
            kc.zeroize();
            let base = idx + at as u64;
            self.hash.hash_many(
                &x0[..len],
                |q| tweak(dir, base + q as u64, 0),
                &mut h0[..len],
            );
            self.hash.hash_many(
                &x1[..len],
                |q| tweak(dir, base + q as u64, 0),
                &mut h1[..len],
            );
            for q in 0..len {
                f(at + q, h0[q], h1[q]);
            }
        }
        x0.zeroize();
        x1.zeroize();
        h0.zeroize();
        h1.zeroize();
        Ok(())
    }

    /// Takes `n` receiver COTs: their first index and their range in `buf.recv` /
    /// `buf.recv_bits`.
    fn take_recv_range(&mut self, n: usize) -> Result<(u64, std::ops::Range<usize>), OtError> {
        self.take(n, false)
    }

    fn take_recv(&mut self, n: usize) -> Result<(u64, Vec<u8>, Vec<Block>), OtError> {
        let (idx, r) = self.take_recv_range(n)?;
        let bits = self.buf.recv_bits[r.clone()].to_vec();
        let m = self.buf.recv[r.clone()].to_vec();
        // the copies are the caller's (zeroized on drop); the buffer's are gone
        self.buf.recv_bits[r.clone()].zeroize();
        self.buf.recv[r].zeroize();
        Ok((idx, bits, m))
    }

    // ---------------------------------------------------------------- random OT

    /// ROT as sender: `n` pairs `(H(i,k_i), H(i,k_i⊕Δ))`. No traffic (ALSZ).
    pub fn rot_send(&mut self, n: usize) -> Result<Vec<[Block; 2]>, OtError> {
        let mut out = Vec::with_capacity(n);
        self.sender_pairs(n, None, |_, a, b| out.push([a, b]))?;
        Ok(out)
    }

    /// [`Self::rot_send`] without the output vector: calls `f(i, H(i,k_i), H(i,k_i⊕Δ))` for
    /// each of the `n` ROTs in order (for callers that keep a few bits of each).
    pub fn rot_send_each(
        &mut self,
        n: usize,
        f: impl FnMut(usize, Block, Block),
    ) -> Result<(), OtError> {
        self.sender_pairs(n, None, f)
    }

    /// [`Self::rot_recv`] without the output vectors: calls `f(i, b_i, H(i, m_i))` for each
    /// of the `n` ROTs in order, hashing [`PAIR_CHUNK`] at a time.
    pub fn rot_recv_each(
        &mut self,
        n: usize,
        mut f: impl FnMut(usize, u8, Block),
    ) -> Result<(), OtError> {
        let dir = self.dir_recv();
        let (idx, r) = self.take_recv_range(n)?;
        let mut h = [0 as Block; PAIR_CHUNK];
        for (c, (mc, bc)) in self.buf.recv[r.clone()]
            .chunks_mut(PAIR_CHUNK)
            .zip(self.buf.recv_bits[r].chunks_mut(PAIR_CHUNK))
            .enumerate()
        {
            let at = c * PAIR_CHUNK;
            let base = idx + at as u64;
            let h = &mut h[..mc.len()];
            self.hash
                .hash_many(mc, |q| tweak(dir, base + q as u64, 0), h);
            mc.zeroize();
            for (q, (&hq, &b)) in h.iter().zip(bc.iter()).enumerate() {
                f(at + q, b, hq);
            }
            bc.zeroize();
        }
        h.zeroize();
        Ok(())
    }

    /// ROT as receiver: random bits `b_i` and keys `H(i, m_i)`. No traffic.
    pub fn rot_recv(&mut self, n: usize) -> Result<RotRecv, OtError> {
        let mut bits = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        self.rot_recv_each(n, |_, b, h| {
            bits.push(b);
            keys.push(h);
        })?;
        Ok(RotRecv { bits, keys })
    }

    // ------------------------------------------------- chosen-choice COT (arithmetic)

    /// Receiver, step 1 of a chosen-choice COT batch: returns the state and the message
    /// `d = c ⊕ b` (packed bits, `ceil(n/8)` bytes) for the sender.
    pub fn cot_choose(&mut self, choices: &[u8]) -> Result<(CotChosen, Vec<u8>), OtError> {
        let (idx, mut bits, m) = self.take_recv(choices.len())?;
        let d: Vec<u8> = choices
            .iter()
            .zip(&bits)
            .map(|(&c, &b)| (c ^ b) & 1)
            .collect();
        // the random choice bits b: with d on the wire they give the choices
        bits.zeroize();
        let choices = choices.iter().map(|c| c & 1).collect();
        Ok((CotChosen { idx, choices, m }, pack_bit_bytes(&d)))
    }

    /// The receiver's choice corrections `d` (n bits, one per byte) of a chosen-choice
    /// batch, from its message (exact length, zero padding; poisons the session if not).
    fn corrections(
        &mut self,
        n: usize,
        d_msg: &[u8],
        what: &'static str,
    ) -> Result<Vec<u8>, OtError> {
        unpack_bit_bytes(d_msg, n)
            .map_err(|source| OtError::Malformed { what, source })
            .inspect_err(|_| self.poisoned = true)
    }

    /// Sender of a chosen-choice COT batch with `w` (1 or 2) correlations per OT:
    /// `corr[i*w + v]` is δ for lane v of OT i. Returns the sender's outputs `r` (so the
    /// receiver gets `r + c·δ`) and the reply (`n·w` ring elements, packed). CrypTFlow2
    /// (COT_l) / Ferret (COT over Z_{2^l}): `t = r + δ - H(i, k'⊕Δ)`.
    pub fn cot_respond(
        &mut self,
        ring: Ring,
        d_msg: &[u8],
        corr: &[u64],
        w: usize,
    ) -> Result<(Vec<u64>, Vec<u8>), OtError> {
        if !(1..=2).contains(&w) || !corr.len().is_multiple_of(w) {
            return Err(OtError::BadRequest(format!(
                "COT with {w} lanes and {} values",
                corr.len()
            )));
        }
        let n = corr.len() / w;
        let d = self.corrections(n, d_msg, "COT choice corrections")?;
        let mut r = Vec::with_capacity(n * w);
        let mut t = Vec::with_capacity(n * w);
        self.sender_pairs(n, Some(&d), |i, h0, h1| {
            for v in 0..w {
                let a = lane(h0, v, ring);
                let b = lane(h1, v, ring);
                r.push(a);
                t.push(ring.sub(ring.add(a, corr[i * w + v]), b));
            }
        })?;
        Ok((r, ring.pack(&t)))
    }

    /// Receiver, step 2: `y = H(i, m_i) + c_i·t_i` for each lane.
    pub fn cot_finish(
        &self,
        st: CotChosen,
        ring: Ring,
        reply: &[u8],
        w: usize,
    ) -> Result<Vec<u64>, OtError> {
        let n = st.m.len();
        let t = ring
            .unpack(reply, n * w)
            .map_err(|source| OtError::Malformed {
                what: "COT reply",
                source,
            })?;
        let dir = self.dir_recv();
        // the receiver's pads H(i, m_i): zeroized when dropped
        let mut h = Zeroizing::new(vec![0; n]);
        self.hash
            .hash_many(&st.m, |i| tweak(dir, st.idx + i as u64, 0), &mut h);
        let mut y = Vec::with_capacity(n * w);
        for i in 0..n {
            // all ones where the choice bit is 1: a masked add, no branch on the secret bit
            let mask = 0u64.wrapping_sub(u64::from(st.choices[i] & 1));
            for v in 0..w {
                let a = lane(h[i], v, ring);
                y.push(ring.add(a, t[i * w + v] & mask));
            }
        }
        Ok(y)
    }

    // ------------------------------------------------- chosen-message 1-of-2 OT

    /// Sender of chosen-message 1-of-2 OTs of `bits`-bit messages (≤ 64):
    /// `e_b = x_b ⊕ H(i, k' ⊕ b·Δ)`; reply `2·n·bits` bits.
    pub fn ot_respond(
        &mut self,
        d_msg: &[u8],
        msgs: &[[u64; 2]],
        bits: u32,
    ) -> Result<Vec<u8>, OtError> {
        let ring =
            Ring::new(bits).map_err(|_| OtError::BadRequest(format!("{bits}-bit OT messages")))?;
        let n = msgs.len();
        let d = self.corrections(n, d_msg, "OT choice corrections")?;
        let mut e = Vec::with_capacity(2 * n);
        self.sender_pairs(n, Some(&d), |i, h0, h1| {
            e.push(ring.reduce(msgs[i][0] ^ h0 as u64));
            e.push(ring.reduce(msgs[i][1] ^ h1 as u64));
        })?;
        Ok(ring.pack(&e))
    }

    /// Receiver of chosen-message 1-of-2 OTs: `x_c = e_c ⊕ H(i, m_i)`.
    pub fn ot_finish(&self, st: CotChosen, reply: &[u8], bits: u32) -> Result<Vec<u64>, OtError> {
        let ring =
            Ring::new(bits).map_err(|_| OtError::BadRequest(format!("{bits}-bit OT messages")))?;
        let n = st.m.len();
        let e = ring
            .unpack(reply, 2 * n)
            .map_err(|source| OtError::Malformed {
                what: "OT reply",
                source,
            })?;
        let dir = self.dir_recv();
        // the receiver's pads H(i, m_i): zeroized when dropped
        let mut h = Zeroizing::new(vec![0; n]);
        self.hash
            .hash_many(&st.m, |i| tweak(dir, st.idx + i as u64, 0), &mut h);
        Ok((0..n)
            .map(|i| ring.reduce(e[2 * i + st.choices[i] as usize] ^ h[i] as u64))
            .collect())
    }

    // ------------------------------------------------------------- 1-of-N OT

    /// Receiver COTs a 1-of-2^m batch of `n` OTs needs from the core OT (0 with KK13).
    pub fn kn_cots(&self, n: usize, m: u32) -> usize {
        if self.kk.is_some() { 0 } else { n * m as usize }
    }

    /// Bytes of the receiver's message for `n` 1-of-2^m OTs.
    pub fn kn_choose_len(&self, n: usize, m: u32) -> usize {
        match &self.kk {
            Some(_) => Kkot::choose_len(n),
            None => (n * m as usize).div_ceil(8),
        }
    }

    /// Receiver, step 1 of `n` 1-of-2^m OTs of `bits`-bit messages with choices
    /// `c_i < 2^m`.
    pub fn kn_choose(
        &mut self,
        choices: &[u16],
        m: u32,
        bits: u32,
    ) -> Result<(KnChosen, Vec<u8>), OtError> {
        if !(1..=8).contains(&m) || !(1..=64).contains(&bits) {
            return Err(OtError::BadRequest(format!(
                "1-of-2^{m} OT of {bits}-bit messages"
            )));
        }
        if let Some(kk) = self.kk.as_mut() {
            let (st, msg) = kk.choose(choices);
            return Ok((KnChosen::Kk(st), msg));
        }
        if choices.iter().any(|&c| usize::from(c) >> m != 0) {
            return Err(OtError::BadRequest(format!(
                "1-of-2^{m} choice out of range"
            )));
        }
        let mu = m as usize;
        let w = bits as usize;
        let (idx, range) = self.take_recv_range(choices.len() * mu)?;
        let recv_bits = &mut self.buf.recv_bits[range.clone()];
        // R ──▶ S: d = c ⊕ b for each of the m COTs of each OT
        let mut d = BitWriter::with_capacity(choices.len() * mu);
        for (i, &c) in choices.iter().enumerate() {
            for t in 0..mu {
                d.push(u64::from(((c >> t) as u8 ^ recv_bits[i * mu + t]) & 1), 1);
            }
        }
        recv_bits.zeroize();
        // the pads, now: slice c of ⊕_t G_{t, c_t}, from the one or two blocks holding it
        // (`np_rows`), NP_CHUNK OTs hashed in one call
        let dir = self.dir_recv();
        let mut pads = Vec::with_capacity(choices.len());
        let cap = NP_CHUNK * 2 * mu;
        let mut xs = Vec::with_capacity(cap);
        let mut tw = Vec::with_capacity(cap);
        let mut h = vec![0 as Block; cap];
        let blocks = |c: u16| ((c as usize * w) / 128, ((c as usize + 1) * w - 1) / 128);
        for (k, cs) in choices.chunks(NP_CHUNK).enumerate() {
            xs.clear();
            tw.clear();
            let first = range.start + k * NP_CHUNK * mu;
            let recv_m = &mut self.buf.recv[first..first + cs.len() * mu];
            for (r, &c) in cs.iter().enumerate() {
                let i = k * NP_CHUNK + r;
                let (b0, b1) = blocks(c);
                for (t, &mt) in recv_m[r * mu..(r + 1) * mu].iter().enumerate() {
                    for s in b0..=b1 {
                        xs.push(mt);
                        tw.push(tweak(dir, idx + (i * mu + t) as u64, 1 + s as u16));
                    }
                }
            }
            // used: gone from the buffer (the copies in `xs` are zeroized below)
            recv_m.zeroize();
            let h = &mut h[..xs.len()];
            self.hash.hash_many(&xs, |q| tw[q], h);
            let mut at = 0;
            for &c in cs {
                let (b0, b1) = blocks(c);
                let nblk = b1 - b0 + 1;
                let mut acc = [0 as Block; 2];
                for _ in 0..mu {
                    for a in acc.iter_mut().take(nblk) {
                        *a ^= h[at];
                        at += 1;
                    }
                }
                pads.push(read_slice(&acc[..nblk], c as usize * w - b0 * 128, w) as u64);
            }
        }
        xs.zeroize();
        h.zeroize();
        Ok((
            KnChosen::Cots {
                pads: Zeroizing::new(pads),
                choices: Zeroizing::new(choices.to_vec()),
                m,
                bits,
            },
            d.finish(),
        ))
    }

    /// Sender of `n` 1-of-2^m OTs of `bits`-bit messages: `table(i, j)` is message j of
    /// OT i (called once per pair, in order, so tables are never materialised). Returns
    /// the reply (`n·2^m·bits` bits, packed).
    pub fn kn_respond(
        &mut self,
        msg: &[u8],
        n: usize,
        m: u32,
        bits: u32,
        mut table: impl FnMut(usize, usize) -> u64,
    ) -> Result<Vec<u8>, OtError> {
        let big_n = 1usize << m;
        if !(1..=64).contains(&bits) || !(1..=8).contains(&m) {
            return Err(OtError::BadRequest(format!(
                "1-of-{big_n} OT of {bits}-bit messages"
            )));
        }
        let mask = Ring::new(bits).map(|r| r.mask()).unwrap_or(u64::MAX);
        let mut out = BitWriter::with_capacity(n * big_n * bits as usize);
        let mut sink = |i: usize, pads: &[Block]| {
            for (j, p) in pads.iter().enumerate() {
                out.push((table(i, j) ^ *p as u64) & mask, bits);
            }
        };
        if let Some(kk) = self.kk.as_mut() {
            if let Err(e) = kk.respond(&self.hash, msg, n, big_n, &mut sink) {
                self.poisoned = true;
                return Err(e);
            }
        } else {
            let w = bits as usize;
            let slice_mask: Block = if w >= 128 { Block::MAX } else { (1 << w) - 1 };
            let mut pads = vec![0 as Block; big_n];
            self.np_rows(msg, n, m, bits, &mut |i, row| {
                for (j, p) in pads.iter_mut().enumerate() {
                    *p = read_slice(row, j * w, w) & slice_mask;
                }
                sink(i, &pads);
            })?;
            pads.zeroize();
        }
        Ok(out.finish())
    }

    /// Naor-Pinkas 1-of-N from m OTs (Naor and Pinkas, STOC 1999) with the pads cut from
    /// one string per key: for OT i and its COTs t < m, `G_{t,b} = H((i_t, 1), K_t ⊕ b·Δ) ‖
    /// H((i_t, 2), …) ‖ …` (`S = ceil(N·bits/128)` blocks) and
    /// `pad_j = ⊕_t slice_j(G_{t, j_t})`, slice j being bits `j·bits..(j+1)·bits`.
    ///
    /// Why this is enough: the receiver with choice c knows `G_{t, c_t}`; the strings
    /// `G_{t, 1−c_t}` are pseudo-random to it (TCCR with fresh tweaks, as for any ROT).
    /// For j ≠ c some t has `j_t ≠ c_t`, so pad_j contains `slice_j(G_{t, 1−c_t})`, and slice
    /// j of any string enters no other pad: the pads of all j ≠ c are independent and
    /// uniform. The sender hashes `2·m·S` blocks per OT instead of `m·N` (for the
    /// millionaire's 1-of-16 OTs of 2-bit messages: 8 instead of 64), the receiver m (or
    /// 2m where a slice straddles two blocks). The wire format is unchanged.
    ///
    /// Calls `sink(i, row)` for each OT in order with the `S` blocks of
    /// `row = ⊕_t (slices j of G_{t, j_t} for every j)`: pad_j is slice j of the row, so a
    /// caller packing all N messages into one row XORs it whole.
    fn np_rows(
        &mut self,
        msg: &[u8],
        n: usize,
        m: u32,
        bits: u32,
        sink: &mut dyn FnMut(usize, &[Block]),
    ) -> Result<(), OtError> {
        let big_n = 1usize << m;
        let mu = m as usize;
        let w = bits as usize;
        let nb = (big_n * w).div_ceil(128);
        let d = self.corrections(n * mu, msg, "1-of-N choice corrections")?;
        let (idx, range) = self.take_send(n * mu)?;
        let dir = self.dir_send();
        let delta = self.delta;
        // per OT: for each t and b, nb blocks G_{t,b}; NP_CHUNK OTs hashed in one call
        let per = mu * 2 * nb;
        let mut xs = vec![0 as Block; NP_CHUNK * per];
        let mut tw = vec![0 as Block; NP_CHUNK * per];
        let mut gs = vec![0 as Block; NP_CHUNK * per];
        let mut row = vec![0 as Block; nb];
        let sels: Vec<Block> = (0..mu * nb)
            .map(|q| slice_select(q % nb, q / nb, w, big_n))
            .collect();
        for c0 in (0..n).step_by(NP_CHUNK) {
            let cn = NP_CHUNK.min(n - c0);
            let first = range.start + c0 * mu;
            let keys = &mut self.buf.send[first..first + cn * mu];
            for i in 0..cn {
                for t in 0..mu {
                    let q = (c0 + i) * mu + t;
                    let k = keys[i * mu + t];
                    let kt = if d[q] == 1 { k ^ delta } else { k };
                    for b in 0..2 {
                        let x = if b == 1 { kt ^ delta } else { kt };
                        for sb in 0..nb {
                            let at = i * per + (t * 2 + b) * nb + sb;
                            xs[at] = x;
                            tw[at] = tweak(dir, idx + q as u64, 1 + sb as u16);
                        }
                    }
                }
            }
            // used: gone from the buffer (the copies in `xs` are zeroized below)
            keys.zeroize();
            let len = cn * per;
            self.hash.hash_many(&xs[..len], |q| tw[q], &mut gs[..len]);
            for i in 0..cn {
                let gs = &gs[i * per..(i + 1) * per];
                // row = ⊕_t (G_{t,0} on the slices j with j_t = 0, G_{t,1} on the others)
                row.iter_mut().for_each(|r| *r = 0);
                for t in 0..mu {
                    for (sb, r) in row.iter_mut().enumerate() {
                        let sel = sels[t * nb + sb];
                        *r ^= (gs[(t * 2) * nb + sb] & !sel) | (gs[(t * 2 + 1) * nb + sb] & sel);
                    }
                }
                sink(c0 + i, &row);
            }
        }
        xs.zeroize();
        gs.zeroize();
        row.zeroize();
        Ok(())
    }

    /// [`Self::kn_respond`] for tables whose `2^m` messages of `bits` bits fit in 128 bits:
    /// `row(i)` holds all messages of OT i, message j at bits `j·bits..(j+1)·bits`. Same
    /// reply format, a fraction of the work (no per-entry callback).
    pub fn kn_respond_row(
        &mut self,
        msg: &[u8],
        n: usize,
        m: u32,
        bits: u32,
        mut row: impl FnMut(usize) -> u128,
    ) -> Result<Vec<u8>, OtError> {
        let big_n = 1usize << m;
        if !(1..=8).contains(&m) || bits == 0 || big_n * bits as usize > 128 {
            return Err(OtError::BadRequest(format!(
                "1-of-{big_n} OT of {bits}-bit messages in one row"
            )));
        }
        let width = big_n as u32 * bits;
        let mask = (1u128 << bits) - 1;
        let mut out = BitWriter::with_capacity(n * width as usize);
        let mut put = |i: usize, p: u128| {
            let v = row(i) ^ p;
            if width > 64 {
                out.push(v as u64, 64);
                out.push((v >> 64) as u64, width - 64);
            } else {
                out.push(v as u64, width);
            }
        };
        if let Some(kk) = self.kk.as_mut() {
            let mut sink = |i: usize, pads: &[Block]| {
                let mut p: u128 = 0;
                for (j, pad) in pads.iter().enumerate() {
                    p |= (pad & mask) << (j as u32 * bits);
                }
                put(i, p);
            };
            if let Err(e) = kk.respond(&self.hash, msg, n, big_n, &mut sink) {
                self.poisoned = true;
                return Err(e);
            }
        } else {
            // N·bits ≤ 128: one block per row, pad j at bits j·bits.., the row itself is
            // the packed pads
            let width_mask = if width >= 128 {
                Block::MAX
            } else {
                (1 << width) - 1
            };
            self.np_rows(msg, n, m, bits, &mut |i, r| put(i, r[0] & width_mask))?;
        }
        Ok(out.finish())
    }

    /// Receiver, step 2: the chosen messages.
    pub fn kn_finish(
        &self,
        st: KnChosen,
        n: usize,
        m: u32,
        reply: &[u8],
        bits: u32,
    ) -> Result<Vec<u64>, OtError> {
        let big_n = 1usize << m;
        let e = PackedReader::new("1-of-N reply", reply, n * big_n, bits)?;
        let mask = Ring::new(bits).map(|r| r.mask()).unwrap_or(u64::MAX);
        let chosen = match &st {
            KnChosen::Kk(st) => st.len(),
            KnChosen::Cots { pads, .. } => pads.len(),
        };
        if chosen != n {
            return Err(OtError::BadRequest(format!(
                "1-of-N: {chosen} OTs chosen, {n} expected"
            )));
        }
        // The pads are used one at a time and not collected (no copy of them is left
        // behind; the state zeroizes its own on drop).
        let mut out = vec![0u64; n];
        match st {
            KnChosen::Kk(st) => match &self.kk {
                Some(kk) => kk.finish(&self.hash, st, |i, c, p| {
                    out[i] = (e.get(i * big_n + c) ^ p as u64) & mask;
                }),
                None => return Err(OtError::BadRequest("KK13 state without KK13".into())),
            },
            KnChosen::Cots {
                pads,
                choices,
                m: mm,
                bits: bb,
            } => {
                if (mm, bb) != (m, bits) || pads.len() != choices.len() {
                    return Err(OtError::BadRequest(format!(
                        "1-of-N state for 1-of-2^{mm} of {bb} bits, finished as 1-of-2^{m} of {bits}"
                    )));
                }
                for (i, (&c, &p)) in choices.iter().zip(pads.iter()).enumerate() {
                    out[i] = (e.get(i * big_n + usize::from(c)) ^ p) & mask;
                }
            }
        }
        Ok(out)
    }
}
