//! BFV linear layers, Cheetah style (ePrint 2022/207 §4, HomFC).
//!
//! (Full documentation below is completed in this module's final version.)

mod keys;
mod linear;
mod packing;
mod params;
mod rns;
mod wire;

#[cfg(test)]
mod tests;

pub use linear::{
    ClientSession, ServerSession, client_linear, client_setup, server_linear, server_setup,
};
pub use packing::{LayerCost, LinearShape, MAX_DIM, Packing, layer_cost};
pub use params::{
    C0_EXTRA_BITS, C1_EXTRA_BITS, CBD_PAIRS, DEGREE, HeParams, LOG_DECRYPTION_FAILURE,
    LOG_DEGREE, LOG_LAYERS_PER_INFERENCE, LOG_MAX_OUTPUTS, LOG_MAX_WEIGHT_TERMS, MAX_LOG_Q, MAX_RING_BITS,
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
