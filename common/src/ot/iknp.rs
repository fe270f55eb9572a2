//! IKNP OT extension (Ishai, Kilian, Nissim, Petrank, CRYPTO 2003) with the ALSZ
//! optimisations (Asharov, Lindell, Schneider, Zohner, CCS 2013 / ePrint 2013/552):
//! random correlated OT with a global Δ, so the sender sends nothing (ALSZ, correlated/random OT),
//! seeds expanded with AES-CTR, the matrix transposed with a fast 128 x 128 transpose.
//!
//! ```text
//!   COT sender (holds Δ = s)                    COT receiver (random choices r ∈ {0,1}^n)
//!   setup: base-OT receiver, choices s_j        setup: base-OT sender, seeds (k_j^0, k_j^1)
//!          gets k_j^{s_j}, j = 0..127
//!   extend(n):                                  t_j = G(k_j^0), u_j = t_j ⊕ G(k_j^1) ⊕ r
//!      <──────────── u_0..u_127 (128 · n bits) ─────────────
//!   q_j = G(k_j^{s_j}) ⊕ s_j·u_j  (= t_j ⊕ s_j·r)
//!   transpose: row i of Q = k_i                 transpose: row i of T = m_i = k_i ⊕ r_i·Δ
//! ```
//!
//! One flight per extension and direction (IKNP Fig. 1 steps 2-3; ALSZ), 128 bits per
//! COT. Both directions extend in the same flight: each party sends its `u` for the
//! direction where it is the receiver, then reads the peer's. G is AES-128-CTR keyed by
//! the base-OT seed; the counter runs across extensions so no PRG block is ever reused.
//! Columns are processed in chunks of [`CHUNK`] blocks (128 · CHUNK OTs) so the working
//! set stays in cache; the wire layout is `[chunk][column j][block]`.

use super::aesni::Aes;
use rand::{CryptoRng, Rng};
use zeroize::{Zeroize, Zeroizing};

use super::base::base_ot_both;
use super::hash::Prg;
use super::transpose::transpose128;
use super::{Block, CotBatch, OtError, Party, RandomCot};
use crate::channel::Channel;

/// Base OTs per direction (the computational security parameter).
pub(crate) const KAPPA: usize = 128;
/// Blocks (of 128 OTs) per column chunk.
const CHUNK: usize = 32;

/// IKNP correlated-OT extension, both directions of one session.
pub struct Iknp {
    delta: Block,
    /// as COT sender: G keyed by k_j^{s_j}
    send_g: Vec<Aes>,
    /// as COT receiver: G keyed by (k_j^0, k_j^1)
    recv_g: Vec<[Aes; 2]>,
    send_ctr: u128,
    recv_ctr: u128,
    choice_prg: Prg,
    session_id: [u8; 32],
    /// receiver output of an extension whose first half was sent (split extension)
    pending: Option<(Vec<u8>, Vec<Block>)>,
}

impl std::fmt::Debug for Iknp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Iknp {{ send_ctr: {}, recv_ctr: {}, [redacted] }}",
            self.send_ctr, self.recv_ctr
        )
    }
}

impl Drop for Iknp {
    fn drop(&mut self) {
        // AES key schedules zeroize themselves; Δ and pending outputs are ours to clear.
        self.delta.zeroize();
        if let Some((b, m)) = self.pending.as_mut() {
            b.zeroize();
            m.zeroize();
        }
    }
}

fn aes_from(k: Block) -> Aes {
    Aes::new(k)
}

/// `out[b] = AES_k(ctr + b)`.
fn expand(g: &Aes, ctr: u128, out: &mut [Block]) {
    for (b, o) in out.iter_mut().enumerate() {
        *o = ctr.wrapping_add(b as u128);
    }
    g.encrypt(out);
}

impl Iknp {
    /// Runs the base OTs of both directions (2 flights each way, 32 + 128·32 bytes each way)
    /// and returns the extender. `rng` must be a CSPRNG (the OS in product code).
    pub fn setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        rng: &mut R,
    ) -> Result<Self, OtError> {
        let delta: Block = rng.random();
        Self::setup_with_delta(ch, party, delta, rng)
    }

    /// [`Iknp::setup`] with a given Δ (Ferret's bootstrap uses a Δ whose least significant
    /// bit is 1, so that choice bits ride in the receivers' blocks).
    pub(crate) fn setup_with_delta<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        delta: Block,
        rng: &mut R,
    ) -> Result<Self, OtError> {
        // Δ's bits: zeroized when dropped, also on an error
        let choices: Zeroizing<Vec<bool>> =
            Zeroizing::new((0..KAPPA).map(|j| (delta >> j) & 1 == 1).collect());
        // As COT receiver we are the base-OT sender (KAPPA pairs); as COT sender we are the
        // base-OT receiver with choices Δ (IKNP Fig. 1, step 1).
        let base = base_ot_both(ch, party, KAPPA, &choices, rng)?;
        let send_g = base.received.iter().map(|&k| aes_from(k)).collect();
        let recv_g = base
            .sent
            .iter()
            .map(|p| [aes_from(p[0]), aes_from(p[1])])
            .collect();
        Ok(Self {
            delta,
            send_g,
            recv_g,
            send_ctr: 0,
            recv_ctr: 0,
            choice_prg: Prg::from_rng(rng),
            session_id: base.session_id,
            pending: None,
        })
    }

    /// The public session identifier fixed by the base OTs (both parties agree on it).
    pub fn session_id(&self) -> [u8; 32] {
        self.session_id
    }

    /// COT receiver: builds the `u` message for `nb` blocks; returns (u, choices, m).
    fn receiver_extend(&mut self, nb: usize) -> (Vec<u8>, Vec<u8>, Vec<Block>) {
        let mut r = vec![0 as Block; nb];
        self.choice_prg.fill_blocks(&mut r);
        let mut msg = Vec::with_capacity(nb * KAPPA * 16);
        let mut m = vec![0 as Block; nb * 128];
        let mut t = vec![0 as Block; KAPPA * CHUNK];
        let mut g1 = vec![0 as Block; CHUNK];
        let mut mat = [0 as Block; 128];
        for c0 in (0..nb).step_by(CHUNK) {
            let cn = CHUNK.min(nb - c0);
            let ctr = self.recv_ctr + c0 as u128;
            for (j, g) in self.recv_g.iter().enumerate() {
                let tj = &mut t[j * CHUNK..j * CHUNK + cn];
                expand(&g[0], ctr, tj);
                expand(&g[1], ctr, &mut g1[..cn]);
                for b in 0..cn {
                    // IKNP Fig. 1 step 2: u_j = G(k_j^0) ⊕ G(k_j^1) ⊕ r
                    msg.extend_from_slice(&(tj[b] ^ g1[b] ^ r[c0 + b]).to_le_bytes());
                }
            }
            for b in 0..cn {
                for (j, row) in mat.iter_mut().enumerate() {
                    *row = t[j * CHUNK + b];
                }
                transpose128(&mut mat);
                m[(c0 + b) * 128..(c0 + b + 1) * 128].copy_from_slice(&mat);
            }
        }
        self.recv_ctr += nb as u128;
        let bits: Vec<u8> = (0..nb * 128)
            .map(|i| ((r[i / 128] >> (i % 128)) & 1) as u8)
            .collect();
        t.zeroize();
        r.zeroize();
        mat.zeroize();
        (msg, bits, m)
    }

    /// COT sender: consumes the peer's `u` for `nb` blocks; returns the keys.
    fn sender_extend(&mut self, nb: usize, u: &[u8]) -> Vec<Block> {
        let mut k = vec![0 as Block; nb * 128];
        let mut q = vec![0 as Block; KAPPA * CHUNK];
        let mut mat = [0 as Block; 128];
        let mut off = 0;
        for c0 in (0..nb).step_by(CHUNK) {
            let cn = CHUNK.min(nb - c0);
            let ctr = self.send_ctr + c0 as u128;
            for (j, g) in self.send_g.iter().enumerate() {
                let qj = &mut q[j * CHUNK..j * CHUNK + cn];
                expand(g, ctr, qj);
                // IKNP Fig. 1 step 3: q_j = G(k_j^{s_j}) ⊕ s_j·u_j, with s_j (a bit of Δ)
                // as a mask of all zeros or all ones: no branch on Δ
                let s_j = ((self.delta >> j) & 1).wrapping_neg();
                for (b, x) in qj.iter_mut().enumerate() {
                    let p = off + b * 16;
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&u[p..p + 16]);
                    *x ^= Block::from_le_bytes(a) & s_j;
                }
                off += cn * 16;
            }
            for b in 0..cn {
                for (j, row) in mat.iter_mut().enumerate() {
                    *row = q[j * CHUNK + b];
                }
                transpose128(&mut mat);
                k[(c0 + b) * 128..(c0 + b + 1) * 128].copy_from_slice(&mat);
            }
        }
        self.send_ctr += nb as u128;
        q.zeroize();
        mat.zeroize();
        k
    }
}

impl RandomCot for Iknp {
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
        _n_send: usize,
        n_recv: usize,
    ) -> Result<(), OtError> {
        let nb_recv = n_recv.div_ceil(128);
        if nb_recv > 0 {
            let (msg, bits, m) = self.receiver_extend(nb_recv);
            ch.send_vec(msg)?;
            self.pending = Some((bits, m));
        }
        Ok(())
    }

    fn extend_recv(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        _n_recv: usize,
    ) -> Result<CotBatch, OtError> {
        let nb_send = n_send.div_ceil(128);
        let mut out = CotBatch::default();
        if let Some((bits, m)) = self.pending.take() {
            out.recv_bits = bits;
            out.recv = m;
        }
        if nb_send > 0 {
            let u = ch
                .recv_exact(nb_send * KAPPA * 16)
                .map_err(|e| OtError::msg("IKNP extension matrix", e))?;
            out.send = self.sender_extend(nb_send, &u);
        }
        Ok(out)
    }

    fn extend_cost(&self, n_send: usize, n_recv: usize) -> (usize, usize) {
        (
            n_recv.div_ceil(128) * 128 * 16,
            n_send.div_ceil(128) * 128 * 16,
        )
    }

    fn name(&self) -> &'static str {
        "iknp"
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // tests index parallel arrays
mod tests {
    use super::*;
    use crate::channel::{Counting, memory_pair};
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;

    #[test]
    fn iknp_cots_satisfy_the_correlation_both_directions() {
        let (a, b) = memory_pair();
        let (mut a, mut b) = (Counting::new(a), Counting::new(b));
        let h = std::thread::spawn(move || {
            let mut rng = ChaCha12Rng::seed_from_u64(2);
            let mut c = Iknp::setup(&mut b, Party::Client, &mut rng).unwrap();
            let x = c.extend(&mut b, 300, 5000).unwrap();
            let y = c.extend(&mut b, 128, 0).unwrap();
            (
                c.delta(),
                x.send.clone(),
                x.recv_bits.clone(),
                x.recv.clone(),
                y.send.clone(),
            )
        });
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let mut s = Iknp::setup(&mut a, Party::Server, &mut rng).unwrap();
        a.set_step("ext");
        let x = s.extend(&mut a, 5000, 300).unwrap();
        let y = s.extend(&mut a, 0, 128).unwrap();
        let (cd, c_send, c_bits, c_recv, c_send2) = h.join().unwrap();
        // server -> client direction: 5000 rounded up to 40 blocks
        assert_eq!((x.send.len(), c_recv.len()), (5120, 5120));
        for i in 0..5120 {
            assert_eq!(
                c_recv[i],
                x.send[i] ^ if c_bits[i] == 1 { s.delta() } else { 0 }
            );
        }
        let ones = c_bits.iter().filter(|&&b| b == 1).count();
        assert!((2300..2820).contains(&ones));
        // client -> server direction, then a second extension (counter continues)
        for i in 0..384 {
            assert_eq!(
                x.recv[i],
                c_send[i] ^ if x.recv_bits[i] == 1 { cd } else { 0 }
            );
        }
        for i in 0..128 {
            assert_eq!(
                y.recv[i],
                c_send2[i] ^ if y.recv_bits[i] == 1 { cd } else { 0 }
            );
            assert_ne!(y.recv[i], x.recv[i]);
        }
        let r = a.report();
        let e = r.total_with_prefix("ext");
        assert_eq!(e.bytes_sent, 16 * (384 + 128));
        assert_eq!(e.bytes_received, 16 * 5120);
        assert_eq!(s.extend_cost(5000, 300), (16 * 384, 16 * 5120));
    }

    #[test]
    fn truncated_extension_matrix_is_refused() {
        let (mut a, mut b) = memory_pair();
        let h = std::thread::spawn(move || {
            let mut rng = ChaCha12Rng::seed_from_u64(2);
            let _c = Iknp::setup(&mut b, Party::Client, &mut rng).unwrap();
            b.send(&[0u8; 16 * 128 - 1]).unwrap();
        });
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let mut s = Iknp::setup(&mut a, Party::Server, &mut rng).unwrap();
        let r = s.extend(&mut a, 128, 0);
        assert!(matches!(r, Err(OtError::Message { .. })), "{r:?}");
        h.join().unwrap();
    }
}
