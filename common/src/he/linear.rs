//! The HE linear layer: sessions, setup, and the per-layer exchange (Cheetah §4, HomFC,
//! batched), with re-randomisation, flooding, modulus switching and trimming.
//! Message flow and analysis: the module doc of [`crate::he`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rand::{CryptoRng, Rng};
use zeroize::{Zeroize, Zeroizing};

use super::HeError;
use super::keys::{PublicKey, SecretKey};
use super::packing::{LinearShape, Packing};
use super::params::{DEGREE, HeParams};
use super::rns::{
    Accumulator, RnsPoly, encode_scaled, lift_signed, sample_cbd, sample_flood, sample_ternary,
    switch_coefficient,
};
use super::wire::{
    QueryHeader, decode_poly_q, decode_query_header, decode_response_ct, decode_response_header,
    decode_setup, encode_poly_q, encode_query_header, encode_response_ct, encode_response_header,
    encode_setup,
};
use crate::channel::Channel;

/// Domain label of the uniform polynomials of query ciphertexts.
const QUERY_DOMAIN: &str = "query ciphertext a";

/// Runs `f`; refuses if the session is poisoned and poisons it if `f` fails.
fn guarded<T>(poisoned: &AtomicBool, f: impl FnOnce() -> Result<T, HeError>) -> Result<T, HeError> {
    if poisoned.load(Ordering::SeqCst) {
        return Err(HeError::Poisoned);
    }
    let r = f();
    if r.is_err() {
        poisoned.store(true, Ordering::SeqCst);
    }
    r
}

fn check_ring(
    values: &[u64],
    expected: usize,
    what: &'static str,
    p: &HeParams,
) -> Result<(), HeError> {
    if values.len() != expected {
        return Err(HeError::InputLength {
            what,
            expected,
            actual: values.len(),
        });
    }
    if let Some(index) = values.iter().position(|v| *v > p.ring().mask()) {
        return Err(HeError::NotInRing {
            what,
            index,
            bits: p.ring().bits(),
        });
    }
    Ok(())
}

/// The client's side of an HE session: the parameters and the secret key.
/// The key is zeroized on drop and never printed.
pub struct ClientSession {
    params: Arc<HeParams>,
    sk: SecretKey,
    poisoned: AtomicBool,
}

impl fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSession")
            .field("params", &self.params.id())
            .field("secret_key", &"[redacted]")
            .field("poisoned", &self.poisoned.load(Ordering::SeqCst))
            .finish()
    }
}

/// The server's side of an HE session: the parameters and the client's public key.
pub struct ServerSession {
    params: Arc<HeParams>,
    pk: PublicKey,
    poisoned: AtomicBool,
}

impl fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSession")
            .field("params", &self.params.id())
            .field("public_key", &self.pk)
            .field("poisoned", &self.poisoned.load(Ordering::SeqCst))
            .finish()
    }
}

impl ClientSession {
    /// Generates the secret key and the setup message (parameter id and public key) for
    /// the server.
    pub fn generate<R: Rng + CryptoRng + ?Sized>(
        params: Arc<HeParams>,
        rng: &mut R,
    ) -> (Self, Vec<u8>) {
        let sk = SecretKey::generate(&params, rng);
        let pk = PublicKey::generate(&sk, &params, rng);
        let msg = encode_setup(&params, &pk.seed, &pk.pk0);
        (
            Self {
                params,
                sk,
                poisoned: AtomicBool::new(false),
            },
            msg,
        )
    }

    /// The session's parameters.
    pub fn params(&self) -> &HeParams {
        &self.params
    }

    /// Whether an earlier error made the session unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// The query messages (header, then one per input ciphertext) that encrypt the
    /// client's share `xc` (B x n_i, row-major). Cheetah §4.1: the client encrypts its
    /// share with the secret key; only c0 and one seed per query travel.
    pub fn encrypt_layer<R: Rng + CryptoRng + ?Sized>(
        &self,
        xc: &[u64],
        shape: LinearShape,
        rng: &mut R,
    ) -> Result<Vec<Vec<u8>>, HeError> {
        let p = &*self.params;
        let pk = Packing::choose(p, &shape)?;
        check_ring(xc, shape.rows * shape.inputs, "client share", p)?;
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let count = pk.input_cts(&shape);
        let mut msgs = Vec::with_capacity(count + 1);
        msgs.push(encode_query_header(
            p,
            &QueryHeader {
                shape,
                packing: pk,
                count,
                seed,
            },
        )?);
        let ibs = pk.in_blocks(&shape);
        for rb in 0..pk.row_blocks(&shape) {
            for j in 0..ibs {
                let idx = rb * ibs + j;
                // c0 = -a s + e + round(Q x / t)
                let mut c0 = RnsPoly::uniform_from_seed(&seed, QUERY_DOMAIN, idx as u64, p);
                c0.ntt(p);
                self.sk.mul_into(&mut c0, p);
                c0.intt(p);
                c0.neg_assign(p);
                let e = Zeroizing::new(sample_cbd(rng, DEGREE));
                for i in 0..c0.rows() {
                    let m = &p.q[i];
                    let row = c0.row_mut(i);
                    for (c, e) in row.iter_mut().zip(e.iter()) {
                        *c = m.add(*c, lift_signed(*e, **m));
                    }
                    for b in 0..pk.rows_in(&shape, rb) {
                        let src = (rb * pk.rows + b) * shape.inputs + j * pk.inputs;
                        for jj in 0..pk.inputs_in(&shape, j) {
                            let pos = pk.input_pos(b, jj);
                            row[pos] = m.add(row[pos], encode_scaled(xc[src + jj], p, i));
                        }
                    }
                }
                let mut msg = Vec::with_capacity(p.upload_ct_bytes());
                encode_poly_q(&c0, p, &mut msg);
                msgs.push(msg);
            }
        }
        Ok(msgs)
    }

    /// The client's output share (B x n_o, row-major) from the response messages
    /// (header, then one per output ciphertext).
    pub fn decrypt_layer(
        &self,
        shape: LinearShape,
        header: &[u8],
        cts: &[Vec<u8>],
    ) -> Result<Vec<u64>, HeError> {
        let p = &*self.params;
        let shift = p.c1_bits() - p.ring().bits();
        let mut v = self.decrypt_raw(shape, header, cts)?;
        for x in v.iter_mut() {
            // round(v / 2^(K1 - l)) mod 2^l
            *x = ((*x + (1 << (shift - 1))) >> shift) & p.ring().mask();
        }
        Ok(v)
    }

    /// c0 + c1 s modulo 2^K1 at every kept coefficient, in the output layout.
    pub(crate) fn decrypt_raw(
        &self,
        shape: LinearShape,
        header: &[u8],
        cts: &[Vec<u8>],
    ) -> Result<Vec<u64>, HeError> {
        let p = &*self.params;
        let pk = Packing::choose(p, &shape)?;
        let count = pk.output_cts(&shape);
        decode_response_header(header, p, &shape, count)?;
        if cts.len() != count {
            return Err(HeError::CountMismatch {
                expected: count,
                actual: cts.len(),
            });
        }
        let (k1, k0) = (p.c1_bits(), p.c0_bits());
        let k1_mask = (1u64 << k1) - 1;
        let (m0, m1) = (&p.q[0], &p.q[1]);
        let big = u128::from(**m0) * u128::from(**m1);
        let half = big / 2;
        let s2 = Zeroizing::new(self.sk.ntt_rows(2).data);
        let mut out = vec![0u64; shape.rows * shape.outputs];
        let rbs = pk.row_blocks(&shape);
        for k in 0..pk.out_blocks(&shape) {
            for rb in 0..rbs {
                let (rows, outs) = (pk.rows_in(&shape, rb), pk.outputs_in(&shape, k));
                let (c1, c0) = decode_response_ct(&cts[k * rbs + rb], p, rows * outs)?;
                // c1 * s exactly over Z (|.| < N 2^K1 < p0 p1 / 2), then modulo 2^K1.
                let mut cs = RnsPoly::zero(2);
                for i in 0..2 {
                    let m = &p.q[i];
                    for (o, c) in cs.row_mut(i).iter_mut().zip(&c1) {
                        *o = m.reduce(*c);
                    }
                }
                cs.ntt(p);
                for i in 0..2 {
                    p.q[i].mul_vec(cs.row_mut(i), &s2[i * DEGREE..(i + 1) * DEGREE]);
                }
                cs.intt(p);
                for b in 0..rows {
                    for r in 0..outs {
                        let pos = pk.output_pos(b, r);
                        let (x0, x1) = (cs.data[pos], cs.data[DEGREE + pos]);
                        let h = m1.mul(m1.sub(x1, m1.reduce(x0)), p.p0_inv_mod_p1);
                        let x = u128::from(x0) + u128::from(**m0) * u128::from(h);
                        let over = half.wrapping_sub(x) >> 127; // 1 iff x > half
                        let cs_val = (x.wrapping_sub(big * over) as u64) & k1_mask;
                        let c0v = c0[b * outs + r] << (k1 - k0);
                        out[(rb * pk.rows + b) * shape.outputs + k * pk.outputs + r] =
                            c0v.wrapping_add(cs_val) & k1_mask;
                    }
                }
                cs.data.zeroize();
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    pub(crate) fn secret_key(&self) -> &SecretKey {
        &self.sk
    }
}

impl ServerSession {
    /// The server's session from the client's setup message.
    pub fn from_setup(params: Arc<HeParams>, msg: &[u8]) -> Result<Self, HeError> {
        let (seed, pk0) = decode_setup(msg, &params)?;
        let pk = PublicKey::from_parts(seed, pk0, &params, None);
        Ok(Self {
            params,
            pk,
            poisoned: AtomicBool::new(false),
        })
    }

    /// The session's parameters.
    pub fn params(&self) -> &HeParams {
        &self.params
    }

    /// Whether an earlier error made the session unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// Checks a query header against the layer the server expects; returns the number of
    /// ciphertext messages that follow.
    pub fn check_query_header(&self, shape: LinearShape, header: &[u8]) -> Result<usize, HeError> {
        let p = &*self.params;
        let pk = Packing::choose(p, &shape)?;
        Ok(decode_query_header(header, p, &shape, &pk)?.count)
    }

    /// Evaluates one layer on the client's query: returns the response messages (header,
    /// then one per output ciphertext) and the server's output share R (B x n_o).
    ///
    /// `weights` is n_o x n_i row-major, `bias` has n_o entries, `xs` is the server's
    /// share of X (B x n_i; `None` for a zero share, e.g. the first layer), all in Z_{2^l}.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_layer<R: Rng + CryptoRng + ?Sized>(
        &self,
        weights: &[u64],
        bias: &[u64],
        xs: Option<&[u64]>,
        shape: LinearShape,
        header: &[u8],
        cts: &[Vec<u8>],
        rng: &mut R,
    ) -> Result<(Vec<Vec<u8>>, Vec<u64>), HeError> {
        let p = &*self.params;
        let count = Packing::choose(p, &shape)?.output_cts(&shape);
        let mut msgs = Vec::with_capacity(count + 1);
        msgs.push(encode_response_header(p, &shape, count)?);
        let ys = self.evaluate_core(
            weights,
            bias,
            xs,
            shape,
            header,
            cts,
            rng,
            |c0, c1, kept| {
                // Modulus switching to 2^K0 (kept c0) and 2^K1 (all of c1): the trimmed form.
                let c0_out: Vec<u64> = kept
                    .iter()
                    .map(|pos| switch_coefficient(c0, *pos, p, &p.switch_c0, p.c0_bits()))
                    .collect();
                let c1_out: Vec<u64> = (0..DEGREE)
                    .map(|j| switch_coefficient(c1, j, p, &p.switch_c1, p.c1_bits()))
                    .collect();
                msgs.push(encode_response_ct(p, &c1_out, &c0_out));
            },
        )?;
        Ok((msgs, ys))
    }

    /// The evaluation up to the flooded result ciphertexts modulo Q: `emit` gets each
    /// output ciphertext (coefficient form; only the kept coefficients of c0 are final)
    /// and its kept positions, in order (output block major, then row block). Returns R.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn evaluate_core<R: Rng + CryptoRng + ?Sized>(
        &self,
        weights: &[u64],
        bias: &[u64],
        xs: Option<&[u64]>,
        shape: LinearShape,
        header: &[u8],
        cts: &[Vec<u8>],
        rng: &mut R,
        mut emit: impl FnMut(&RnsPoly, &RnsPoly, &[usize]),
    ) -> Result<Vec<u64>, HeError> {
        let p = &*self.params;
        let ring = p.ring();
        let pk = Packing::choose(p, &shape)?;
        check_ring(weights, shape.outputs * shape.inputs, "weights", p)?;
        check_ring(bias, shape.outputs, "bias", p)?;
        if let Some(xs) = xs {
            check_ring(xs, shape.rows * shape.inputs, "server share", p)?;
        }
        let wmax = 1i64 << (p.weight_bits() - 1);
        if let Some(index) = weights
            .iter()
            .position(|w| !(-wmax..wmax).contains(&ring.to_signed(*w)))
        {
            return Err(HeError::WeightOutOfRange {
                index,
                bits: p.weight_bits(),
            });
        }
        let hdr = decode_query_header(header, p, &shape, &pk)?;
        if cts.len() != hdr.count {
            return Err(HeError::CountMismatch {
                expected: hdr.count,
                actual: cts.len(),
            });
        }

        // Decode and transform the client's ciphertexts (c1 = a from the seed).
        let mut inputs = Vec::with_capacity(cts.len());
        for (idx, msg) in cts.iter().enumerate() {
            let mut c0 = decode_poly_q(msg, p, "input ciphertext")?;
            c0.ntt(p);
            let mut a = RnsPoly::uniform_from_seed(&hdr.seed, QUERY_DOMAIN, idx as u64, p);
            a.ntt(p);
            inputs.push((c0, a));
        }

        // The server's output share R and the plaintext W Xs + b - R it adds.
        let ys: Vec<u64> = (0..shape.rows * shape.outputs)
            .map(|_| ring.random(rng))
            .collect();
        let mut z = Zeroizing::new(vec![0u64; shape.rows * shape.outputs]);
        for row in 0..shape.rows {
            for out in 0..shape.outputs {
                let mut acc = bias[out].wrapping_sub(ys[row * shape.outputs + out]);
                if let Some(xs) = xs {
                    let w = &weights[out * shape.inputs..(out + 1) * shape.inputs];
                    let x = &xs[row * shape.inputs..(row + 1) * shape.inputs];
                    for (a, b) in w.iter().zip(x) {
                        acc = acc.wrapping_add(a.wrapping_mul(*b));
                    }
                }
                z[row * shape.outputs + out] = ring.reduce(acc);
            }
        }

        let rows = p.q.len();
        let (ibs, obs, rbs) = (
            pk.in_blocks(&shape),
            pk.out_blocks(&shape),
            pk.row_blocks(&shape),
        );
        let mut acc0 = Accumulator::new(rows);
        let mut acc1 = Accumulator::new(rows);
        let mut signed = vec![0i64; DEGREE];
        for k in 0..obs {
            let outs = pk.outputs_in(&shape, k);
            // Cheetah §4.1: the weight block as a plaintext polynomial, reversed inputs.
            let wpolys: Vec<RnsPoly> = (0..ibs)
                .map(|j| {
                    signed.iter_mut().for_each(|v| *v = 0);
                    for r in 0..outs {
                        let src = (k * pk.outputs + r) * shape.inputs + j * pk.inputs;
                        for jj in 0..pk.inputs_in(&shape, j) {
                            signed[pk.weight_pos(r, jj)] = ring.to_signed(weights[src + jj]);
                        }
                    }
                    let mut w = RnsPoly::from_signed(&signed, rows, p);
                    w.ntt(p);
                    w
                })
                .collect();
            for rb in 0..rbs {
                acc0.clear();
                acc1.clear();
                for (j, w) in wpolys.iter().enumerate() {
                    let (c0, a) = &inputs[rb * ibs + j];
                    acc0.fma(c0, w);
                    acc1.fma(a, w);
                }
                // Re-randomise: add a public-key encryption of zero (pk0 u + e1, pk1 u + e2).
                let u = Zeroizing::new(sample_ternary(rng));
                let mut u = RnsPoly::from_signed(&u, rows, p);
                u.ntt(p);
                acc0.fma(&self.pk.pk0_ntt, &u);
                acc1.fma(&self.pk.pk1_ntt, &u);
                u.data.zeroize();
                let mut c0 = acc0.reduce(p);
                c0.intt(p);
                let mut c1 = acc1.reduce(p);
                c1.intt(p);
                let e2 = Zeroizing::new(sample_cbd(rng, DEGREE));
                for i in 0..rows {
                    let m = &p.q[i];
                    for (c, e) in c1.row_mut(i).iter_mut().zip(e2.iter()) {
                        *c = m.add(*c, lift_signed(*e, **m));
                    }
                }
                // Kept coefficients of c0: + e1 + round(Q z / t) + flooding noise (c0's
                // other coefficients are never sent).
                let nrows = pk.rows_in(&shape, rb);
                let e1 = Zeroizing::new(sample_cbd(rng, nrows * outs));
                let mut kept = Vec::with_capacity(nrows * outs);
                let mut flood = Zeroizing::new([0u64; 3]);
                for b in 0..nrows {
                    for r in 0..outs {
                        let pos = pk.output_pos(b, r);
                        kept.push(pos);
                        let zv = z[(rb * pk.rows + b) * shape.outputs + k * pk.outputs + r];
                        sample_flood(rng, p.flood_bound(), p, &mut flood);
                        for i in 0..rows {
                            let m = &p.q[i];
                            let add = m.add(
                                m.add(encode_scaled(zv, p, i), flood[i]),
                                lift_signed(e1[b * outs + r], **m),
                            );
                            let c = &mut c0.data[i * DEGREE + pos];
                            *c = m.add(*c, add);
                        }
                    }
                }
                emit(&c0, &c1, &kept);
                c0.data.zeroize();
            }
        }
        Ok(ys)
    }
}

/// Client setup: generates the keys and sends the parameter id and the public key.
pub fn client_setup<C, R>(
    ch: &mut C,
    params: Arc<HeParams>,
    rng: &mut R,
) -> Result<ClientSession, HeError>
where
    C: Channel + ?Sized,
    R: Rng + CryptoRng + ?Sized,
{
    let (session, msg) = ClientSession::generate(params, rng);
    ch.send_vec(msg)?;
    ch.flush()?;
    Ok(session)
}

/// Server setup: receives and checks the client's parameter id and public key.
pub fn server_setup<C>(ch: &mut C, params: Arc<HeParams>) -> Result<ServerSession, HeError>
where
    C: Channel + ?Sized,
{
    let msg = ch.recv()?;
    ServerSession::from_setup(params, &msg)
}

/// The client's side of one linear layer: sends the encryption of its share `xc`
/// (B x n_i), receives the result, returns its output share (B x n_o) of W X + b.
pub fn client_linear<C, R>(
    ch: &mut C,
    session: &ClientSession,
    xc: &[u64],
    shape: LinearShape,
    rng: &mut R,
) -> Result<Vec<u64>, HeError>
where
    C: Channel + ?Sized,
    R: Rng + CryptoRng + ?Sized,
{
    guarded(&session.poisoned, || {
        for msg in session.encrypt_layer(xc, shape, rng)? {
            ch.send_vec(msg)?;
        }
        ch.flush()?;
        let (header, cts) = recv_response(ch, session.params(), shape)?;
        session.decrypt_layer(shape, &header, &cts)
    })
}

/// Receives the server's response to a layer of `shape`: the header, checked (shape,
/// parameters, ciphertext count) before any ciphertext is read, then each result
/// ciphertext, its length checked (against the result coefficients its block keeps)
/// before the next is read. The client holds a layer's response until all of it is in:
/// unchecked, a server could make it hold `count` messages of the transport's largest
/// size.
pub fn recv_response<C: Channel + ?Sized>(
    ch: &mut C,
    p: &HeParams,
    shape: LinearShape,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), HeError> {
    let pk = Packing::choose(p, &shape)?;
    let count = pk.output_cts(&shape);
    let header = ch.recv()?;
    decode_response_header(&header, p, &shape, count)?;
    let rbs = pk.row_blocks(&shape);
    let mut cts = Vec::with_capacity(count);
    // in the order of `decrypt_raw`: output block k, then row block rb
    for k in 0..pk.out_blocks(&shape) {
        for rb in 0..rbs {
            let kept = pk.rows_in(&shape, rb) * pk.outputs_in(&shape, k);
            let expected = Packing::response_ct_bytes(p, kept);
            let m = ch.recv()?;
            if m.len() != expected {
                return Err(HeError::MalformedLength {
                    what: "result ciphertext",
                    expected,
                    actual: m.len(),
                });
            }
            cts.push(m);
        }
    }
    Ok((header, cts))
}

/// Receives one query ciphertext, its length checked before the next is read (the
/// server holds a layer's queries until all are in).
pub fn recv_query_ct<C: Channel + ?Sized>(ch: &mut C, p: &HeParams) -> Result<Vec<u8>, HeError> {
    let m = ch.recv()?;
    if m.len() != p.upload_ct_bytes() {
        return Err(HeError::MalformedLength {
            what: "input ciphertext",
            expected: p.upload_ct_bytes(),
            actual: m.len(),
        });
    }
    Ok(m)
}

/// The server's side of one linear layer: receives the client's query, computes
/// W X + b - R under encryption (X = Xc + Xs), re-randomises, floods, switches and trims,
/// sends it back and returns its own output share R (B x n_o).
#[allow(clippy::too_many_arguments)]
pub fn server_linear<C, R>(
    ch: &mut C,
    session: &ServerSession,
    weights: &[u64],
    bias: &[u64],
    xs: Option<&[u64]>,
    shape: LinearShape,
    rng: &mut R,
) -> Result<Vec<u64>, HeError>
where
    C: Channel + ?Sized,
    R: Rng + CryptoRng + ?Sized,
{
    guarded(&session.poisoned, || {
        let header = ch.recv()?;
        let count = session.check_query_header(shape, &header)?;
        let cts = (0..count)
            .map(|_| recv_query_ct(ch, session.params()))
            .collect::<Result<Vec<_>, _>>()?;
        let (msgs, ys) = session.evaluate_layer(weights, bias, xs, shape, &header, &cts, rng)?;
        for msg in msgs {
            ch.send_vec(msg)?;
        }
        ch.flush()?;
        Ok(ys)
    })
}
