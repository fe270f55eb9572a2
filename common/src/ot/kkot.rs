//! KK13 1-of-N OT (Kolesnikov and Kumaresan, CRYPTO 2013) for N ≤ 256, over the
//! 256-bit Walsh-Hadamard code (minimum distance 128, so 128-bit security as in SCI's
//! `split-kkot`), bootstrapped from the core [`RandomCot`](super::RandomCot).
//!
//! ```text
//!   KK sender (secret s ∈ {0,1}^256)             KK receiver (choices c_i < N)
//!   setup: 256 ROTs with us as COT receiver:     setup: 256 ROTs with us as COT sender:
//!          s_j = choice bit, seed = our key            seed pairs (k_j^0, k_j^1)
//!          (no traffic beyond the COT extension)
//!   per batch:                                   t_j = G(k_j^0),
//!                                                u_j = t_j ⊕ G(k_j^1) ⊕ column j of C(c)
//!      <──────────── u_0..u_255 (256 bits per OT, rounded to 128 OTs) ──────
//!   q_j = G(k_j^{s_j}) ⊕ s_j·u_j                 row i of T: t_i
//!   row i of Q: q_i = t_i ⊕ (C(c_i) ∧ s)
//!   pad_{i,j} = H(i, q_i ⊕ (C(j) ∧ s))           pad_{i,c_i} = H(i, t_i)
//!      ──────────── x_{i,j} ⊕ pad_{i,j} for all j (N·k bits per OT) ─────────▶
//! ```
//!
//! Cost per OT: 256 + N·k bits and one flight each way, against m·(128 + 1) + N·k for
//! the 1-of-N from m COTs (Naor-Pinkas) when a COT costs 128 bits (IKNP). With a silent
//! OT (a COT for a few bits) the m-COT route is the cheaper one; [`KkotConfig`] chooses.
//! H is the 2-block fixed-key hash [`Tccr::hash_wide_many`] with the OT index as tweak.

use super::aesni::Aes;
use rand::{CryptoRng, Rng};
use zeroize::{Zeroize, Zeroizing};

use super::session::OtSession;
use super::transpose::transpose128;
use super::{Block, OtError, RandomCot, Tccr};
use crate::channel::Channel;

/// Width of the code (columns of the extension matrix).
const W: usize = 256;
/// Blocks (of 128 OTs) per chunk.
const CHUNK: usize = 16;
/// OTs hashed at a time by the receiver's finish.
const FINISH_CHUNK: usize = 256;

/// Which construction serves 1-of-N OTs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KkotConfig {
    /// KK13 over a 256-bit Walsh-Hadamard code (best with IKNP).
    #[default]
    Kk13,
    /// m chosen-choice COTs per OT (best with a silent OT such as Ferret).
    FromCots,
}

/// KK13 state of one session, both directions.
pub(crate) struct Kkot {
    /// s: our secret as KK sender, 256 bits
    s: [Block; 2],
    /// C(j) ∧ s for every j < 256
    cs: Vec<[Block; 2]>,
    send_g: Vec<Aes>,
    recv_g: Vec<[Aes; 2]>,
    send_ctr: u128,
    recv_ctr: u128,
    send_idx: u64,
    recv_idx: u64,
    codes: Vec<[Block; 2]>,
    /// 0 if the server is the KK sender in our sending direction, 1 otherwise
    dir_send: u8,
}

impl Drop for Kkot {
    fn drop(&mut self) {
        self.s.zeroize();
        self.cs.zeroize();
    }
}

/// Receiver state between choose and finish.
pub struct KkRecv {
    idx: u64,
    choices: Vec<u16>,
    t: Vec<[Block; 2]>,
}

impl KkRecv {
    /// OTs chosen.
    pub(crate) fn len(&self) -> usize {
        self.choices.len()
    }
}

impl Drop for KkRecv {
    fn drop(&mut self) {
        self.choices.zeroize();
        self.t.zeroize();
    }
}

impl std::fmt::Debug for KkRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KkRecv {{ n: {}, [redacted] }}", self.choices.len())
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

/// The Walsh-Hadamard codeword of `c`: bit j is parity(j & c), j < 256.
fn wh_code(c: usize) -> [Block; 2] {
    let mut w = [0 as Block; 2];
    for j in 0..W {
        if (j & c).count_ones() % 2 == 1 {
            w[j / 128] |= 1 << (j % 128);
        }
    }
    w
}

#[inline]
fn kk_tweak(dir: u8, idx: u64) -> Block {
    (1u128 << 126) | (u128::from(dir) << 125) | (u128::from(idx) << 16)
}

impl Kkot {
    /// Bootstraps from 256 ROTs each way (KK13 base OTs; here random OTs derived
    /// from the session's COTs, so no public-key work and no traffic beyond one
    /// extension).
    pub(crate) fn setup<C: RandomCot, R: Rng + CryptoRng + ?Sized>(
        ot: &mut OtSession<C>,
        ch: &mut dyn Channel,
        _rng: &mut R,
    ) -> Result<Self, OtError> {
        ot.reserve(ch, W, W)?;
        // the base seeds live on in the key schedules only (zeroized on drop)
        let pairs = Zeroizing::new(ot.rot_send(W)?); // we are the base-OT sender: our KK-receiver seeds
        let recv = ot.rot_recv(W)?; // we are the base-OT receiver: our KK-sender secret
        let mut s = [0 as Block; 2];
        for (j, &b) in recv.bits.iter().enumerate() {
            s[j / 128] |= Block::from(b & 1) << (j % 128);
        }
        let codes: Vec<[Block; 2]> = (0..W).map(wh_code).collect();
        let cs = codes.iter().map(|c| [c[0] & s[0], c[1] & s[1]]).collect();
        let dir_send = match ot.party() {
            super::Party::Server => 0,
            super::Party::Client => 1,
        };
        let kk = Self {
            s,
            cs,
            send_g: recv.keys.iter().map(|&k| aes_from(k)).collect(),
            recv_g: pairs
                .iter()
                .map(|p| [aes_from(p[0]), aes_from(p[1])])
                .collect(),
            send_ctr: 0,
            recv_ctr: 0,
            send_idx: 0,
            recv_idx: 0,
            codes,
            dir_send,
        };
        s.zeroize();
        Ok(kk)
    }

    /// Bytes of the receiver's message for `n` OTs.
    pub(crate) fn choose_len(n: usize) -> usize {
        n.div_ceil(128) * 128 * W / 8
    }

    /// Receiver: the extension matrix for `choices` (KK13, receiver). Processed in
    /// chunks of [`CHUNK`] blocks of 128 OTs (cache-sized); wire layout
    /// `[chunk][column j][block]`, 16 bytes per block.
    pub(crate) fn choose(&mut self, choices: &[u16]) -> (KkRecv, Vec<u8>) {
        let n = choices.len();
        let nb = n.div_ceil(128);
        let ctr = self.recv_ctr;
        self.recv_ctr += nb as u128;
        let idx = self.recv_idx;
        self.recv_idx += n as u64;
        let mut msg = Vec::with_capacity(nb * W * 16);
        let mut t = vec![[0 as Block; 2]; nb * 128];
        let mut code_cols = vec![0 as Block; W * CHUNK];
        let mut tcols = vec![0 as Block; W * CHUNK];
        let mut g1 = vec![0 as Block; CHUNK];
        let mut m = [0 as Block; 128];
        for c0 in (0..nb).step_by(CHUNK) {
            let cn = CHUNK.min(nb - c0);
            // Columns of the codeword matrix: 2 transposes per block.
            for b in 0..cn {
                for h in 0..2 {
                    for (i, row) in m.iter_mut().enumerate() {
                        let c = choices.get((c0 + b) * 128 + i).copied().unwrap_or(0) as usize;
                        *row = self.codes[c % W][h];
                    }
                    transpose128(&mut m);
                    for (jj, col) in m.iter().enumerate() {
                        code_cols[(h * 128 + jj) * CHUNK + b] = *col;
                    }
                }
            }
            for (j, g) in self.recv_g.iter().enumerate() {
                let tj = &mut tcols[j * CHUNK..j * CHUNK + cn];
                expand(&g[0], ctr + c0 as u128, tj);
                expand(&g[1], ctr + c0 as u128, &mut g1[..cn]);
                for b in 0..cn {
                    // KK13: u_j = G(k_j^0) ⊕ G(k_j^1) ⊕ (column j of the codewords)
                    msg.extend_from_slice(
                        &(tj[b] ^ g1[b] ^ code_cols[j * CHUNK + b]).to_le_bytes(),
                    );
                }
            }
            for b in 0..cn {
                for h in 0..2 {
                    for (jj, row) in m.iter_mut().enumerate() {
                        *row = tcols[(h * 128 + jj) * CHUNK + b];
                    }
                    transpose128(&mut m);
                    for (i, r) in m.iter().enumerate() {
                        t[(c0 + b) * 128 + i][h] = *r;
                    }
                }
            }
        }
        t.truncate(n);
        tcols.zeroize();
        code_cols.zeroize();
        g1.zeroize();
        m.zeroize();
        (
            KkRecv {
                idx,
                choices: choices.to_vec(),
                t,
            },
            msg,
        )
    }

    /// Sender: the pads `pad_{i,j}` for `n` OTs and `big_n` messages each (KK13,
    /// sender), from the receiver's extension matrix, passed to `sink(i, pads_i)`.
    pub(crate) fn respond(
        &mut self,
        hash: &Tccr,
        msg: &[u8],
        n: usize,
        big_n: usize,
        sink: &mut dyn FnMut(usize, &[Block]),
    ) -> Result<(), OtError> {
        let expected = Self::choose_len(n);
        if msg.len() != expected {
            return Err(OtError::msg(
                "KK13 extension matrix",
                crate::channel::ChannelError::LengthMismatch {
                    expected,
                    actual: msg.len(),
                },
            ));
        }
        let nb = n.div_ceil(128);
        let ctr = self.send_ctr;
        self.send_ctr += nb as u128;
        let idx = self.send_idx;
        self.send_idx += n as u64;
        let dir = self.dir_send;
        let mut qcols = vec![0 as Block; W * CHUNK];
        let mut m = [0 as Block; 128];
        let mut q = [[0 as Block; 2]; 128];
        let mut pads = vec![0 as Block; big_n];
        let mut off = 0;
        for c0 in (0..nb).step_by(CHUNK) {
            let cn = CHUNK.min(nb - c0);
            for (j, g) in self.send_g.iter().enumerate() {
                let qj = &mut qcols[j * CHUNK..j * CHUNK + cn];
                expand(g, ctr + c0 as u128, qj);
                if (self.s[j / 128] >> (j % 128)) & 1 == 1 {
                    // KK13: q_j = G(k_j^{s_j}) ⊕ s_j·u_j
                    for (b, x) in qj.iter_mut().enumerate() {
                        let p = off + b * 16;
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&msg[p..p + 16]);
                        *x ^= Block::from_le_bytes(a);
                    }
                }
                off += cn * 16;
            }
            for b in 0..cn {
                for h in 0..2 {
                    for (jj, row) in m.iter_mut().enumerate() {
                        *row = qcols[(h * 128 + jj) * CHUNK + b];
                    }
                    transpose128(&mut m);
                    for (i, r) in m.iter().enumerate() {
                        q[i][h] = *r;
                    }
                }
                let first = (c0 + b) * 128;
                for (k, qi) in q.iter().enumerate().take(n - first) {
                    let i = first + k;
                    let tw = kk_tweak(dir, idx + i as u64);
                    hash.kk_pads(*qi, &self.cs[..big_n], tw, &mut pads);
                    sink(i, &pads);
                }
            }
        }
        q.zeroize();
        qcols.zeroize();
        m.zeroize();
        pads.zeroize();
        Ok(())
    }

    /// Receiver: `f(i, c_i, H(i, t_i))` for every OT in order. The rows `t_i` and the
    /// pads are zeroized as they are used (the state's choices on its drop).
    pub(crate) fn finish(
        &self,
        hash: &Tccr,
        mut st: KkRecv,
        mut f: impl FnMut(usize, usize, Block),
    ) {
        let dir = 1 - self.dir_send;
        let mut pads = [0 as Block; FINISH_CHUNK];
        for (c, (ts, cs)) in
            st.t.chunks_mut(FINISH_CHUNK)
                .zip(st.choices.chunks(FINISH_CHUNK))
                .enumerate()
        {
            let at = c * FINISH_CHUNK;
            let pads = &mut pads[..ts.len()];
            hash.hash_wide_many(ts, |i| kk_tweak(dir, st.idx + (at + i) as u64), pads);
            ts.iter_mut().for_each(Zeroize::zeroize);
            for (k, (&ch, p)) in cs.iter().zip(pads.iter()).enumerate() {
                f(at + k, usize::from(ch), *p);
            }
            pads.zeroize();
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // tests index parallel arrays
mod tests {
    use super::*;

    #[test]
    fn walsh_hadamard_codewords_have_distance_128() {
        let codes: Vec<[Block; 2]> = (0..W).map(wh_code).collect();
        assert_eq!(codes[0], [0, 0]);
        for a in 0..W {
            for b in (a + 1)..W {
                let d = (codes[a][0] ^ codes[b][0]).count_ones()
                    + (codes[a][1] ^ codes[b][1]).count_ones();
                assert_eq!(d, 128, "{a} {b}");
            }
        }
    }
}
