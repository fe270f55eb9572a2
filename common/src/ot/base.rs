//! Base OT: the "simplest OT" of Chou and Orlandi (LATINCRYPT 2015, ePrint 2015/267,
//! Fig. 1) over Ristretto255, run in both directions at once, random-OT form (the
//! outputs are the key pairs; nothing is encrypted under them here).
//!
//! ```text
//!   each party as base-OT sender S          each party as base-OT receiver R (choice c_i)
//!   a <- Z_q,  A = a·G
//!   ------------------- A (32 B) ---------------------------->
//!                                            b_i <- Z_q,  B_i = b_i·G + c_i·A
//!   <------------------ B_1..B_n (32 B each) ------------------
//!   k_i^0 = H(i, a·B_i)                      k_i^{c_i} = H(i, b_i·A)
//!   k_i^1 = H(i, a·B_i - a·A)
//! ```
//!
//! Both directions share the two flights (each party sends its A, then its B's). H is
//! blake3 over a domain tag, the session id (a hash of both A's), the direction, the index
//! and the points `A, B_i` (transcript binding) and the shared point. Semi-honest security
//! under CDH in the random-oracle model; a point that does not decode, or the identity as
//! A, is refused with [`OtError::InvalidPoint`].
//!
//! Scalars: 64 bytes from the caller's CSPRNG reduced with `from_bytes_mod_order_wide`
//! (curve25519-dalek 4 uses rand_core 0.6; this avoids mixing RNG crates). Scalars are
//! zeroized when dropped.

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rand::{CryptoRng, Rng};
use subtle::{Choice, ConditionallySelectable};
use zeroize::{Zeroize, Zeroizing};

use super::Party;
use super::{Block, OtError};
use crate::channel::Channel;

const POINT: usize = 32;

/// What one party holds after [`base_ot_both`].
pub(crate) struct BaseOts {
    /// key pairs where this party was the base-OT sender
    pub(crate) sent: Zeroizing<Vec<[Block; 2]>>,
    /// keys where this party was the base-OT receiver (`k^{c_i}`)
    pub(crate) received: Zeroizing<Vec<Block>>,
    /// a public session identifier both parties agree on (hash of both A's)
    pub(crate) session_id: [u8; 32],
}

impl std::fmt::Debug for BaseOts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BaseOts {{ sent: {}, received: {}, [redacted] }}",
            self.sent.len(),
            self.received.len()
        )
    }
}

fn random_scalar<R: Rng + CryptoRng + ?Sized>(rng: &mut R) -> Scalar {
    let mut w = [0u8; 64];
    rng.fill_bytes(&mut w);
    let s = Scalar::from_bytes_mod_order_wide(&w);
    w.zeroize();
    s
}

fn decode(bytes: &[u8], index: usize) -> Result<RistrettoPoint, OtError> {
    CompressedRistretto::from_slice(bytes)
        .ok()
        .and_then(|c| c.decompress())
        .ok_or(OtError::InvalidPoint { index })
}

/// `H(sid, dir, i, A, B_i, P)` truncated to a block.
fn kdf(sid: &[u8; 32], dir: u8, i: usize, a: &[u8], b: &[u8], p: &RistrettoPoint) -> Block {
    let mut h = blake3::Hasher::new_derive_key("fusion 2026 ot/base chou-orlandi key");
    h.update(sid);
    h.update(&[dir]);
    h.update(&(i as u64).to_le_bytes());
    h.update(a);
    h.update(b);
    h.update(p.compress().as_bytes());
    let mut out = [0u8; 16];
    h.finalize_xof().fill(&mut out);
    let k = Block::from_le_bytes(out);
    out.zeroize();
    k
}

/// Runs `n_send` base OTs with this party as sender and `choices.len()` with this party as
/// receiver, in both directions at once (two flights each way). The peer must call with
/// `n_send` = our `choices.len()` and vice versa.
pub(crate) fn base_ot_both<R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    party: Party,
    n_send: usize,
    choices: &[bool],
    rng: &mut R,
) -> Result<BaseOts, OtError> {
    let n_recv = choices.len();
    // Flight 1: our A (as sender).
    let a = Zeroizing::new(random_scalar(rng));
    let big_a = RistrettoPoint::mul_base(&a);
    let a_bytes = big_a.compress().to_bytes();
    ch.send(&a_bytes)?;
    let peer_a_bytes = ch
        .recv_exact(POINT)
        .map_err(|e| OtError::msg("base OT: peer's A", e))?;
    let peer_a = decode(&peer_a_bytes, 0)?;
    if peer_a == RistrettoPoint::identity() {
        return Err(OtError::InvalidPoint { index: 0 });
    }
    let (sa, ca) = match party {
        Party::Server => (&a_bytes[..], &peer_a_bytes[..]),
        Party::Client => (&peer_a_bytes[..], &a_bytes[..]),
    };
    let mut h = blake3::Hasher::new_derive_key("fusion 2026 ot/base session id");
    h.update(sa);
    h.update(ca);
    let session_id: [u8; 32] = *h.finalize().as_bytes();
    // Direction tag: 0 when the server is the base-OT sender, 1 when the client is.
    let (my_dir, peer_dir) = match party {
        Party::Server => (0u8, 1u8),
        Party::Client => (1u8, 0u8),
    };

    // Flight 2: our B's (as receiver), Chou-Orlandi Fig. 1 step 2.
    let mut bs = Zeroizing::new(Vec::with_capacity(n_recv));
    let mut msg = Vec::with_capacity(n_recv * POINT);
    for &c in choices {
        let b = random_scalar(rng);
        // B_i = b_i·G + c_i·A without a branch on c_i (the choices are IKNP's Δ bits): add
        // A or the identity, chosen in constant time
        let add = RistrettoPoint::conditional_select(
            &RistrettoPoint::identity(),
            &peer_a,
            Choice::from(u8::from(c)),
        );
        let p = RistrettoPoint::mul_base(&b) + add;
        msg.extend_from_slice(p.compress().as_bytes());
        bs.push(b);
    }
    ch.send_vec(msg.clone())?;
    let peer_b = ch
        .recv_exact(n_send * POINT)
        .map_err(|e| OtError::msg("base OT: peer's B's", e))?;

    // Receiver keys: k^{c_i} = H(b_i·A), step 3.
    let mut received = Zeroizing::new(Vec::with_capacity(n_recv));
    for (i, b) in bs.iter().enumerate() {
        let bi = &msg[i * POINT..(i + 1) * POINT];
        received.push(kdf(
            &session_id,
            peer_dir,
            i,
            &peer_a_bytes,
            bi,
            &(b * peer_a),
        ));
    }
    // Sender keys: k^0 = H(a·B_i), k^1 = H(a·B_i - a·A), step 3.
    let t = *a * big_a;
    let mut sent = Zeroizing::new(Vec::with_capacity(n_send));
    for i in 0..n_send {
        let bi_bytes = &peer_b[i * POINT..(i + 1) * POINT];
        let bi = decode(bi_bytes, i)?;
        let p0 = *a * bi;
        let p1 = p0 - t;
        sent.push([
            kdf(&session_id, my_dir, i, &a_bytes, bi_bytes, &p0),
            kdf(&session_id, my_dir, i, &a_bytes, bi_bytes, &p1),
        ]);
    }
    Ok(BaseOts {
        sent,
        received,
        session_id,
    })
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // tests index parallel arrays
mod tests {
    use super::*;
    use crate::channel::{Counting, memory_pair};
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;

    #[test]
    fn base_ot_both_directions_correct_with_counted_bytes() {
        let (a, b) = memory_pair();
        let (mut a, mut b) = (Counting::new(a), Counting::new(b));
        let ch_s: Vec<bool> = (0..20).map(|i| i % 3 == 0).collect();
        let ch_c: Vec<bool> = (0..7).map(|i| i % 2 == 0).collect();
        let cs = ch_s.clone();
        let h = std::thread::spawn(move || {
            let mut rng = ChaCha12Rng::seed_from_u64(2);
            let r = base_ot_both(&mut b, Party::Client, 20, &ch_c, &mut rng).unwrap();
            (
                r.sent.to_vec(),
                r.received.to_vec(),
                r.session_id,
                b.report(),
                ch_c,
            )
        });
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let s = base_ot_both(&mut a, Party::Server, 7, &cs, &mut rng).unwrap();
        let (c_sent, c_recv, c_sid, c_rep, ch_c) = h.join().unwrap();
        assert_eq!(s.session_id, c_sid);
        for (i, &c) in ch_s.iter().enumerate() {
            assert_eq!(s.received[i], c_sent[i][c as usize]);
            assert_ne!(s.received[i], c_sent[i][1 - c as usize]);
        }
        for (i, &c) in ch_c.iter().enumerate() {
            assert_eq!(c_recv[i], s.sent[i][c as usize]);
        }
        let t = a.report().total("all");
        assert_eq!(t.bytes_sent, (32 + 20 * 32) as u64);
        assert_eq!(t.bytes_received, (32 + 7 * 32) as u64);
        assert_eq!(t.rounds, 4); // send A, recv A, send B's, recv B's
        assert_eq!(c_rep.total("all").bytes_sent, (32 + 7 * 32) as u64);
    }

    #[test]
    fn invalid_and_short_points_are_refused() {
        // A peer whose A is not a valid Ristretto encoding.
        let (mut a, mut b) = memory_pair();
        let h = std::thread::spawn(move || {
            b.send(&[0xffu8; 32]).unwrap();
            let _ = b.recv();
        });
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let r = base_ot_both(&mut a, Party::Server, 1, &[true], &mut rng);
        assert!(
            matches!(r, Err(OtError::InvalidPoint { index: 0 })),
            "{r:?}"
        );
        drop(a);
        h.join().unwrap();
        // The identity as A.
        let (mut a, mut b) = memory_pair();
        let h = std::thread::spawn(move || {
            b.send(&[0u8; 32]).unwrap();
            let _ = b.recv();
        });
        let r = base_ot_both(&mut a, Party::Server, 1, &[true], &mut rng);
        assert!(
            matches!(r, Err(OtError::InvalidPoint { index: 0 })),
            "{r:?}"
        );
        drop(a);
        h.join().unwrap();
        // Truncated B's.
        let (mut a, mut b) = memory_pair();
        let h = std::thread::spawn(move || {
            let mut rng = ChaCha12Rng::seed_from_u64(5);
            let p = RistrettoPoint::mul_base(&random_scalar(&mut rng));
            b.send(p.compress().as_bytes()).unwrap();
            let _ = b.recv();
            b.send(&[0u8; 31]).unwrap();
            let _ = b.recv();
        });
        let r = base_ot_both(&mut a, Party::Server, 1, &[], &mut rng);
        assert!(matches!(r, Err(OtError::Message { .. })), "{r:?}");
        drop(a);
        h.join().unwrap();
    }
}
