//! BFV linear layers over Z_{2^l}, Cheetah style (Huang et al., "Cheetah: Lean and Fast
//! Secure Two-Party Deep Neural Network Inference", ePrint 2022/207, §4, HomFC), with
//! circuit privacy by re-randomisation and noise flooding.
//!
//! For a layer Y = W X + b over Z_{2^l} with X additively shared (client Xc, server Xs;
//! Xs = 0 for the first layer), the parties end with additive shares of W X + b, exactly
//! (no truncation here: the OT engine truncates).
//!
//! # Message flow
//!
//! ```text
//! client (sk s, pk)                                     server (W, b, Xs)
//! ---- setup, once per session -------------------------------------------------------
//! s <- ternary; a_pk = PRG(seed_pk); pk0 = -(a_pk s + e)
//!        setup: param id | seed_pk | pk0 mod Q        --> check id, ranges
//! ---- per linear layer (B rows x n_i inputs -> n_o outputs) -------------------------
//! pack Xc (Cheetah §4.1 / packing.rs)
//! ct_j = (c0_j, a_j): c0_j = -a_j s + e_j + round(Q x_j / t), a_j = PRG(seed, j)
//!        query hdr: id | shape | packing | count | seed
//!        query ct_j: c0_j mod Q (count of them)       --> check id, shape, packing, count,
//!                                                         lengths, every residue < p_i
//!                                                         R <- Z_{2^l}^(B x n_o) (its share)
//!                                                         per output block k (§4.1):
//!                                                          ct = sum_j ct_j * w_jk
//!                                                             + (pk0 u + e1, pk1 u + e2)
//!                                                             + round(Q (W Xs + b - R) / t)
//!                                                             + flood F at kept coefficients
//!                                                          c1 -> round(2^K1 c1 / Q), all N
//!                                                          c0 -> round(2^K0 c0 / Q), kept only
//!        resp hdr: id | shape | count             <--
//!        resp ct_k: c1 (N x K1 bits) | kept c0 (K0 bits each)
//! check id, shape, count, lengths, padding;
//! y = round((2^(K1-K0) c0 + c1 s mod 2^K1) / 2^(K1-l))   = W X + b - R   (its share)
//! ```
//!
//! One layer is one flight each way (the first query shares its flight with setup).
//! The uploaded ciphertexts are "seeded": only c0 and one 32-byte seed per query travel.
//! The server returns all of c1 (the client needs it to compute c1 s) but only the c0
//! coefficients that hold results; every returned value is modulus-switched to a power of
//! two and trimmed to the bits decryption needs.
//!
//! # Why BFV is built here on `fhe-math`
//!
//! `fhe` 0.1.1's BFV cannot do what the protocol needs through its public API: its secret
//! key is CBD-distributed like the errors (not the uniform ternary key sized here, and
//! ||s||_1, which multiplies the rounding noise after a switch, about four times larger),
//! its seeded encryption takes the
//! seed from `rand::rng()` rather than the caller's RNG, ciphertext polynomials are
//! crate-private (no adding chosen noise at chosen coefficients, no trimming, no dropping
//! coefficients), it switches only down its prime chain (not to a power of two) and it
//! serialises whole ciphertexts. So this module implements the small BFV it needs on
//! `fhe-math`: `zq::Modulus` (constant-time modular arithmetic), `ntt::NttOperator` (with
//! `fhe-math`'s `tfhe-ntt` feature: the AVX2 NTT, 3.4x faster here), `zq::primes`. Only
//! coefficient-form values travel, so the NTT backend never affects interoperability.
//!
//! # Parameters ([`HeParams::new`]`(l, weight_bits)`)
//!
//! - N = 8192, Q = three NTT-friendly primes (p = 1 mod 2N), secret uniform ternary, errors
//!   centred binomial with 21 coin pairs (|e| <= 21, sigma = 3.24 >= 3.19).
//! - Security: the HomomorphicEncryption.org standard (Albrecht et al., "Homomorphic
//!   Encryption Security Standard", 2018), Table 1, 128-bit classical security, ternary
//!   secret: N = 4096 allows log q <= 109, N = 8192 allows log q <= 218. Flooding for
//!   circuit privacy needs more than 109 bits (below), hence N = 8192; every set here has
//!   log Q <= 218 (checked at construction).
//! - t = 2^l (coprime to Q). Messages are encoded with exact scaling, round(Q m / t), not
//!   floor(Q/t) m: then Q (x w) / t = Q [x w]_t / t + Q k is exact modulo Q and the
//!   product carries no (Q mod t) k term, whose size (~ K t^2) no Q here could absorb.
//! - Chosen sizes (weights anywhere in the ring, `weight_bits = l`):
//!
//! | l  | primes (bits) | log2 Q | K1 (c1) | K0 (c0) | E (noise) | B_f (flood) |
//! |----|---------------|--------|---------|---------|-----------|-------------|
//! | 32 | 48, 48, 47    | 143.0  | 43      | 35      | 2^49.4    | 2^108.4     |
//! | 37 | 51, 51, 51    | 153.0  | 48      | 40      | 2^54.4    | 2^113.4     |
//! | 40 | 53, 53, 53    | 159.0  | 51      | 43      | 2^57.4    | 2^116.4     |
//!
//!   A smaller public weight bound shrinks Q (l = 37 with 16-bit weights: log2 Q = 132,
//!   14 % fewer upload bytes); it reveals that bound to the client.
//!
//! # Noise (worst case, except one Hoeffding term) and flooding
//!
//! 1. Upload: c0 + a s = Q x / t + (e + eps), |e + eps| <= 21.5.
//! 2. Product with the weight polynomials (centred, |w| <= 2^(wb-1)) summed over the input
//!    blocks: Q [W x]_t / t + E_W with |E_W| <= 21.5 * 2^(wb-1) * K, where K = ceil(n_i/n_i')
//!    n_i' n_o' <= 2^14 weight terms reach one coefficient (the packing is chosen under
//!    that limit).
//! 3. Adding round(Q z / t) (<= 1/2) and the re-randomisation e1 - e_pk u + e2 s
//!    (<= 21 (2N + 1)).
//!    Total: E = 43 K 2^(wb-2) + 1 + 21 (2N + 1) (2^54.4 for l = wb = 37).
//! 4. Flooding: F uniform on [-B_f, B_f] at every returned coefficient, B_f = 2^59 E.
//!    SD(F, F + x) = |x| / (2 B_f + 1) < 2^-60 per coefficient; a layer call returns at most
//!    2^18 coefficients ([`LinearShape::check`]), so <= 2^-42 per call and <= 2^-40 for an
//!    inference of up to four linear layers.
//! 5. Switching c1 to 2^K1 and the kept c0 to 2^K0 (exact CRT rounding, error <= 1/2 +
//!    2^-60 each): the decryption noise is (2^K1/Q)(E + B_f) + 2^(K1-K0)/2 + (r1 * s), where
//!    r1 (the c1 rounding) does not depend on s; by Hoeffding over the N ternary
//!    coefficients of s, |r1 * s| <= 480 except with probability 2^-80 per coefficient.
//!    With K1 = l + 11, K0 = l + 3 the bound 2^(K1-l-1) = 1024 leaves 415 for the first
//!    term, which fixes Q: log2 Q > log2(E + B_f) + K1 - log2 415.
//!
//! A smaller modulus for uploads than for products does not help: flooding must cover
//! e * W, so the upload's relative noise e / q_up must already be below 2^-(l + 1 + 59) /
//! (21.5 * 2^(wb-1) * K); lifting a ciphertext from a smaller q_up to Q keeps its relative
//! noise. The uploads therefore travel modulo the full Q (156,672 bytes each at l = 37).
//!
//! # Circuit privacy (semi-honest)
//!
//! The client sees c1' = sum_j a_j w_jk + pk1 u + e2 and, at the kept positions only,
//! c0' = Delta m - c1' s + E_W + e1 - e_pk u + e2 s + F. Hybrid 1: replace the noise by F
//! alone (statistical, step 4). Hybrid 2: pk1 u + e2 is an RLWE sample with secret u and
//! uniform pk1 (from the public seed, independent of s), so c1' is uniform. The view is
//! then simulated from m = [W X + b - R]_t at the kept positions, which is uniform given
//! the client's share because R is. Switching, trimming and dropping c0 coefficients are
//! public post-processing. The unsent c0 coefficients hold partial sums of W; they never
//! leave the server. Against a malicious client (noise beyond 21, or a non-ternary key)
//! the flood bound does not hold: like Cheetah, the base protocol is semi-honest.
//! The server sees only RLWE ciphertexts under the client's key (and the public key).
//!
//! # Costs (l = 37, full-ring weights; `layer_cost`, asserted by the tests)
//!
//! Upload: QUERY_HEADER_LEN + input_cts x 156,672 bytes. Download: RESPONSE_HEADER_LEN +
//! per output ciphertext N K1 / 8 = 49,152 bytes + ceil(kept K0 / 8). Setup: 156,737 bytes
//! once. The packing minimises the sum over B', n_i', n_o' with B' n_i' n_o' <= N; per row
//! the cost is about 2 sqrt(n_i n_o log Q K1 N / B'), so it falls with the batch.
//!
//! # Input-independent preprocessing (Delphi style)
//!
//! The same exchange with the client's share a fresh random r, `xs = None` and a zero
//! bias gives the client W r - R' and the server R' (Delphi, Mishra et al. 2020, §4). Online,
//! the client sends d = Xc - r (l bits per input, uniform to the server) and the shares of
//! W X + b are (W r - R', W (d + Xs) + b + R'): no HE online. The preprocessing can run
//! at the largest batch (B = 512) whatever the online batch size.

mod keys;
mod linear;
mod packing;
mod params;
mod rns;
mod wire;

#[cfg(test)]
mod tests;

pub use linear::{
    ClientSession, ServerSession, client_linear, client_setup, recv_query_ct, recv_response,
    server_linear, server_setup,
};
pub use packing::{LayerCost, LinearShape, MAX_DIM, Packing, layer_cost};
pub use params::{
    C0_EXTRA_BITS, C1_EXTRA_BITS, CBD_PAIRS, DEGREE, HeParams, LOG_DECRYPTION_FAILURE, LOG_DEGREE,
    LOG_LAYERS_PER_INFERENCE, LOG_MAX_OUTPUTS, LOG_MAX_WEIGHT_TERMS, MAX_LOG_Q, MAX_RING_BITS,
    MIN_RING_BITS, NUM_PRIMES, ParamId, STAT_SEC,
};
pub use wire::{QUERY_HEADER_LEN, RESPONSE_HEADER_LEN, setup_bytes};

use crate::channel::ChannelError;

/// Errors of the HE layer. Every check on a peer's message has its own variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeError {
    /// The transport failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A ring width the parameter sets do not cover.
    #[error("unsupported ring width {bits} (supported {MIN_RING_BITS}..={MAX_RING_BITS})")]
    UnsupportedRing {
        /// l asked for
        bits: u32,
    },
    /// A weight bound outside 2..=l.
    #[error("unsupported weight bound of {bits} bits for a ring of {ring_bits} bits")]
    UnsupportedWeightBits {
        /// the bound asked for
        bits: u32,
        /// l
        ring_bits: u32,
    },
    /// No parameter set meets the noise analysis within the security table.
    #[error("no parameter set: {0}")]
    NoParameters(String),
    /// A layer shape outside what the parameters are sized for.
    #[error("unsupported layer shape {shape:?}: {reason}")]
    UnsupportedShape {
        /// the shape
        shape: LinearShape,
        /// why
        reason: &'static str,
    },
    /// A message made for another parameter set (ring, moduli, degree, bounds).
    #[error("message for parameters {actual}, this session uses {expected}")]
    WrongParameters {
        /// this session's parameter id
        expected: ParamId,
        /// the id in the message
        actual: ParamId,
    },
    /// A message of another kind than the protocol expects here.
    #[error("unexpected message tag {actual:#04x}, expected {expected:#04x}")]
    WrongMessage {
        /// the tag expected
        expected: u8,
        /// the tag received
        actual: u8,
    },
    /// The peer's layer shape differs from ours (e.g. a wrong row count).
    #[error("layer shape {actual:?} does not match the expected {expected:?}")]
    ShapeMismatch {
        /// ours
        expected: LinearShape,
        /// the peer's
        actual: LinearShape,
    },
    /// The peer's packing differs from the one both sides must derive.
    #[error("packing {actual:?} does not match the expected {expected:?}")]
    PackingMismatch {
        /// ours
        expected: Packing,
        /// the peer's
        actual: Packing,
    },
    /// A wrong number of ciphertexts.
    #[error("expected {expected} ciphertexts, got {actual}")]
    CountMismatch {
        /// how many the shape implies
        expected: usize,
        /// how many were declared or received
        actual: usize,
    },
    /// A message or part of one with the wrong length.
    #[error("malformed {what}: expected {expected} bytes, got {actual}")]
    MalformedLength {
        /// what was being decoded
        what: &'static str,
        /// bytes expected
        expected: usize,
        /// bytes received
        actual: usize,
    },
    /// A message that cannot be decoded for another reason.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// what was being decoded
        what: &'static str,
        /// why
        reason: &'static str,
    },
    /// A ciphertext residue not below its prime.
    #[error("malformed {what}: residue {index} modulo prime {prime} is not below the prime")]
    CoefficientOutOfRange {
        /// what was being decoded
        what: &'static str,
        /// which prime of Q
        prime: usize,
        /// which coefficient
        index: usize,
    },
    /// A local input of the wrong length.
    #[error("{what} has {actual} elements, expected {expected}")]
    InputLength {
        /// which input
        what: &'static str,
        /// elements expected
        expected: usize,
        /// elements given
        actual: usize,
    },
    /// A local input that is not an element of Z_{2^l}.
    #[error("{what}[{index}] is not an element of Z_2^{bits}")]
    NotInRing {
        /// which input
        what: &'static str,
        /// where
        index: usize,
        /// l
        bits: u32,
    },
    /// A weight outside the parameter set's declared weight bound.
    #[error("weight {index} does not fit in {bits} signed bits")]
    WeightOutOfRange {
        /// which weight (row-major)
        index: usize,
        /// the bound
        bits: u32,
    },
    /// An earlier error left the session unusable.
    #[error("the HE session is unusable after an earlier error")]
    Poisoned,
}
