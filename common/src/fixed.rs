//! Fixed-point numbers in the ring Z_{2^l} with scale 2^f, and the fixed-point evaluator
//! whose arithmetic the secure protocols reproduce bit for bit.
//!
//! Semantics (binding; `wt/BRIEF.md`, "Fixed-point semantics"):
//! - a real v is encoded as round(v * 2^s) (to nearest, ties away from zero) read as a
//!   signed value mod 2^l, with s = f for weights and activations and s = 2f for biases;
//!   an MNIST pixel p in 0..=255 is round(p/255 * 2^f);
//! - a dense layer computes acc_i = sum_j W_ij x_j + B_i mod 2^l, then y_i = acc_i >> f,
//!   the exact arithmetic shift (floor division by 2^f) of the signed reading of acc_i,
//!   reduced mod 2^l;
//! - ReLU is max(0, signed(x)); logits are the last dense layer's truncated output; the
//!   label is the first index of the largest signed logit.
//!
//! The evaluator ([`eval_fixed`]) wraps around in the ring exactly as the protocols do and
//! records the largest |acc| it sees, from which the headroom (bits between that magnitude
//! and the sign bit) follows; see [`FixedEval::headroom_bits`].

#[cfg(test)]
mod eval_tests;
mod model;

pub use model::{FixedDense, FixedEval, FixedLayer, FixedModel, eval_fixed, first_argmax};

use crate::ring::{Ring, RingError};
use serde::{Deserialize, Serialize};

/// The default number of fractional bits, f (as in CrypTFlow2 and Cheetah).
pub const DEFAULT_FRAC_BITS: u32 = 12;
/// The headroom, in bits, every bundled model keeps above its largest accumulator.
pub const REQUIRED_HEADROOM_BITS: u32 = 2;

/// Errors of fixed-point encoding and evaluation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FixedError {
    /// The ring width is invalid.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The scale does not fit the ring: biases at scale 2^(2f) need 2f + 2 <= l.
    #[error(
        "fixed point: {frac_bits} fractional bits do not fit a {ring_bits}-bit ring (need 2f + 2 <= l)"
    )]
    BadScale {
        /// l
        ring_bits: u32,
        /// f
        frac_bits: u32,
    },
    /// NaN or an infinity cannot be encoded.
    #[error("fixed point: cannot encode the non-finite value {value}")]
    NotFinite {
        /// the value
        value: f64,
    },
    /// The value's encoding falls outside the signed range of the ring.
    #[error(
        "fixed point: {value} at scale 2^{scale_bits} is outside the signed range of Z_2^{ring_bits}"
    )]
    OutOfRange {
        /// the value
        value: f64,
        /// the scale exponent used
        scale_bits: u32,
        /// l
        ring_bits: u32,
    },
    /// An input batch whose length is not a whole number of rows.
    #[error("fixed-point input: {len} elements is not a whole number of rows of {row_len}")]
    InputLength {
        /// elements given
        len: usize,
        /// elements per row
        row_len: usize,
    },
    /// An input element with bits set above bit l-1.
    #[error("fixed-point input element {index} ({value:#x}) is not reduced mod 2^{ring_bits}")]
    Unreduced {
        /// position in the batch
        index: usize,
        /// the value
        value: u64,
        /// l
        ring_bits: u32,
    },
    /// The model has a layer kind the fixed-point evaluator does not support yet.
    #[error("fixed point: layer {layer} ({kind}) is not supported")]
    UnsupportedLayer {
        /// index of the layer
        layer: usize,
        /// its kind
        kind: &'static str,
    },
    /// A parameter of the model cannot be encoded.
    #[error("fixed point: parameter {tensor} element {index}: {source}")]
    Param {
        /// tensor name
        tensor: String,
        /// element index in the tensor
        index: usize,
        /// why
        source: Box<FixedError>,
    },
    /// The largest accumulator leaves less headroom than required.
    #[error(
        "fixed point: largest |accumulator| {max_abs_acc} leaves {headroom_bits} bits of headroom \
         in Z_2^{ring_bits}, {required} required"
    )]
    Headroom {
        /// the largest |acc| seen
        max_abs_acc: u64,
        /// l
        ring_bits: u32,
        /// headroom left (negative: the accumulator wrapped)
        headroom_bits: i64,
        /// headroom required
        required: u32,
    },
}

/// Fixed-point parameters: the ring Z_{2^l} and f fractional bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawFixedPoint", into = "RawFixedPoint")]
pub struct FixedPoint {
    ring: Ring,
    frac_bits: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFixedPoint {
    ring_bits: u32,
    frac_bits: u32,
}

impl TryFrom<RawFixedPoint> for FixedPoint {
    type Error = FixedError;
    fn try_from(r: RawFixedPoint) -> Result<Self, FixedError> {
        FixedPoint::new(r.ring_bits, r.frac_bits)
    }
}

impl From<FixedPoint> for RawFixedPoint {
    fn from(p: FixedPoint) -> Self {
        RawFixedPoint {
            ring_bits: p.ring.bits(),
            frac_bits: p.frac_bits,
        }
    }
}

/// The number of bits needed to write `m` in binary (0 for 0): m < 2^bit_len(m).
#[inline]
pub const fn bit_len(m: u64) -> u32 {
    64 - m.leading_zeros()
}

/// Headroom of a ring of `ring_bits` bits over a largest magnitude `max_abs`: the number
/// of bits between that magnitude and the sign bit, (l - 1) - bit_len(max_abs). With
/// headroom h, every value seen satisfies |v| < 2^(l-1-h); negative means values wrapped.
pub const fn headroom_bits(ring_bits: u32, max_abs: u64) -> i64 {
    ring_bits as i64 - 1 - bit_len(max_abs) as i64
}

/// The smallest ring width keeping `headroom` bits above the magnitude `max_abs`.
pub const fn ring_bits_for(max_abs: u64, headroom: u32) -> u32 {
    bit_len(max_abs) + 1 + headroom
}

impl FixedPoint {
    /// Z_{2^ring_bits} with `frac_bits` fractional bits; needs 2f + 2 <= l so that a bias
    /// of magnitude 1 at scale 2^(2f) is representable.
    pub fn new(ring_bits: u32, frac_bits: u32) -> Result<Self, FixedError> {
        let ring = Ring::new(ring_bits)?;
        if 2 * u64::from(frac_bits) + 2 > u64::from(ring_bits) {
            return Err(FixedError::BadScale {
                ring_bits,
                frac_bits,
            });
        }
        Ok(Self { ring, frac_bits })
    }

    /// The ring Z_{2^l}.
    #[inline]
    pub const fn ring(&self) -> Ring {
        self.ring
    }

    /// l.
    #[inline]
    pub const fn ring_bits(&self) -> u32 {
        self.ring.bits()
    }

    /// f.
    #[inline]
    pub const fn frac_bits(&self) -> u32 {
        self.frac_bits
    }

    /// round(v * 2^scale_bits), ties away from zero, as a ring element; refuses NaN,
    /// infinities and values outside [-2^(l-1), 2^(l-1)) after scaling.
    pub fn encode_scaled(&self, v: f64, scale_bits: u32) -> Result<u64, FixedError> {
        if !v.is_finite() {
            return Err(FixedError::NotFinite { value: v });
        }
        // Multiplying by a power of two is exact (barring overflow, caught below) and
        // f64::round rounds half away from zero: the encoding is exact and portable.
        let x = (v * 2f64.powi(scale_bits as i32)).round();
        let bound = 2f64.powi(self.ring.bits() as i32 - 1);
        if !(x >= -bound && x < bound) {
            return Err(FixedError::OutOfRange {
                value: v,
                scale_bits,
                ring_bits: self.ring.bits(),
            });
        }
        Ok(self.ring.from_signed(x as i64))
    }

    /// Encodes a weight or activation at scale 2^f.
    #[inline]
    pub fn encode(&self, v: f64) -> Result<u64, FixedError> {
        self.encode_scaled(v, self.frac_bits)
    }

    /// Encodes a bias at scale 2^(2f) (it is added to products of two scale-f values).
    #[inline]
    pub fn encode_bias(&self, v: f64) -> Result<u64, FixedError> {
        self.encode_scaled(v, 2 * self.frac_bits)
    }

    /// The real value of a ring element at scale 2^scale_bits (signed reading / 2^s).
    /// Exact while |signed| < 2^53.
    #[inline]
    pub fn decode_scaled(&self, x: u64, scale_bits: u32) -> f64 {
        self.ring.to_signed(x) as f64 / 2f64.powi(scale_bits as i32)
    }

    /// The real value of a ring element at scale 2^f.
    #[inline]
    pub fn decode(&self, x: u64) -> f64 {
        self.decode_scaled(x, self.frac_bits)
    }

    /// An 8-bit pixel p as round(p/255 * 2^f), computed exactly in integers:
    /// floor((2 p 2^f + 255) / 510). (p 2^f / 255 is never a tie: 2 p 2^f is even and
    /// 255 (2k + 1) is odd.)
    #[inline]
    pub fn encode_pixel(&self, p: u8) -> u64 {
        let num = 2 * u64::from(p) * (1u64 << self.frac_bits) + 255;
        // frac_bits <= 31 (2f + 2 <= l <= 64), so num < 2^41 and the result < 2^(l-1).
        self.ring.reduce(num / 510)
    }

    /// Encodes a batch of 8-bit images, pixel by pixel.
    pub fn encode_pixels(&self, pixels: &[u8]) -> Vec<u64> {
        let table: Vec<u64> = (0..=255u8).map(|p| self.encode_pixel(p)).collect();
        pixels.iter().map(|&p| table[usize::from(p)]).collect()
    }

    /// The exact arithmetic shift by f of the signed reading of x (floor(x / 2^f)), mod
    /// 2^l. Rounds toward minus infinity: -1 >> f = -1, not 0.
    #[inline]
    pub const fn trunc(&self, x: u64) -> u64 {
        self.ring
            .from_signed(self.ring.to_signed(x) >> self.frac_bits)
    }

    /// max(0, signed(x)).
    #[inline]
    pub const fn relu(&self, x: u64) -> u64 {
        if self.ring.msb(x) { 0 } else { x }
    }
}

impl std::fmt::Display for FixedPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Z_2^{} with scale 2^{}",
            self.ring.bits(),
            self.frac_bits
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(l: u32, f: u32) -> FixedPoint {
        FixedPoint::new(l, f).unwrap()
    }

    #[test]
    fn scale_must_fit() {
        assert!(FixedPoint::new(26, 12).is_ok());
        assert_eq!(
            FixedPoint::new(25, 12),
            Err(FixedError::BadScale {
                ring_bits: 25,
                frac_bits: 12
            })
        );
        assert!(matches!(FixedPoint::new(65, 12), Err(FixedError::Ring(_))));
        assert!(FixedPoint::new(64, 31).is_ok());
    }

    #[test]
    fn encode_decode_at_ring_edges() {
        for (l, f) in [(37, 12), (64, 12), (26, 12), (8, 3)] {
            let p = fp(l, f);
            let r = p.ring();
            // 0 and -1 (one unit in the last place below zero)
            assert_eq!(p.encode(0.0), Ok(0));
            assert_eq!(p.encode(-0.0), Ok(0));
            let minus_ulp = -(2f64.powi(-(f as i32)));
            assert_eq!(p.encode(minus_ulp), Ok(r.mask()));
            assert_eq!(p.decode(r.mask()), minus_ulp);
            assert_eq!(p.encode(-1.0), Ok(r.from_signed(-(1 << f))));
            assert_eq!(p.decode(r.from_signed(-(1 << f))), -1.0);
            // largest positive and most negative
            let max = r.max_signed();
            let min = r.min_signed();
            let max_real = max as f64 / 2f64.powi(f as i32);
            let min_real = min as f64 / 2f64.powi(f as i32);
            if l <= 53 {
                assert_eq!(p.encode(max_real), Ok(r.from_signed(max)));
                assert_eq!(p.decode(r.from_signed(max)), max_real);
            }
            assert_eq!(p.encode(min_real), Ok(r.from_signed(min)));
            assert_eq!(p.decode(r.from_signed(min)), min_real);
            assert_eq!(r.from_signed(min), 1u64 << (l - 1));
            // just outside
            assert!(matches!(
                p.encode(-min_real),
                Err(FixedError::OutOfRange { .. })
            ));
            assert!(matches!(
                p.encode(min_real - 1.0),
                Err(FixedError::OutOfRange { .. })
            ));
        }
        let p = fp(37, 12);
        assert!(matches!(
            p.encode(f64::NAN),
            Err(FixedError::NotFinite { .. })
        ));
        assert!(matches!(
            p.encode(f64::INFINITY),
            Err(FixedError::NotFinite { .. })
        ));
    }

    #[test]
    fn rounding_ties_go_away_from_zero() {
        let p = fp(37, 2); // units of 1/4
        let r = p.ring();
        assert_eq!(p.encode(0.125), Ok(1)); // 0.5 units -> 1
        assert_eq!(p.encode(-0.125), Ok(r.from_signed(-1))); // -0.5 -> -1
        assert_eq!(p.encode(0.375), Ok(2)); // 1.5 -> 2
        assert_eq!(p.encode(-0.375), Ok(r.from_signed(-2)));
        assert_eq!(p.encode(0.625), Ok(3)); // 2.5 -> 3 (not to even)
        assert_eq!(p.encode(-0.625), Ok(r.from_signed(-3)));
        assert_eq!(p.encode(0.12), Ok(0)); // 0.48 -> 0
        assert_eq!(p.encode(-0.13), Ok(r.from_signed(-1))); // -0.52 -> -1
        // biases at scale 2f
        assert_eq!(p.encode_bias(1.0 / 32.0), Ok(1)); // 0.5 -> 1
        assert_eq!(p.encode_bias(-1.0 / 32.0), Ok(r.from_signed(-1)));
    }

    #[test]
    fn pixels_round_to_nearest() {
        for f in [0, 1, 8, 12, 16] {
            let p = fp(2 * f + 2 + 4, f);
            for px in 0..=255u8 {
                let want = (f64::from(px) / 255.0 * 2f64.powi(f as i32)).round() as u64;
                assert_eq!(p.encode_pixel(px), want, "f={f} p={px}");
            }
        }
        let p = fp(37, 12);
        assert_eq!(p.encode_pixel(0), 0);
        assert_eq!(p.encode_pixel(255), 4096);
        assert_eq!(p.encode_pixel(128), 2056); // 2056.03..
        assert_eq!(p.encode_pixels(&[0, 255, 128]), vec![0, 4096, 2056]);
    }

    #[test]
    fn truncation_floors_negative_values() {
        let p = fp(37, 12);
        let r = p.ring();
        let t = |v: i64| r.to_signed(p.trunc(r.from_signed(v)));
        assert_eq!(t(0), 0);
        assert_eq!(t(4095), 0);
        assert_eq!(t(4096), 1);
        assert_eq!(t(8191), 1);
        assert_eq!(t(-1), -1); // floor(-1/4096) = -1, toward zero would give 0
        assert_eq!(t(-4095), -1);
        assert_eq!(t(-4096), -1);
        assert_eq!(t(-4097), -2);
        assert_eq!(t(-8192), -2);
        assert_eq!(t(r.max_signed()), r.max_signed() >> 12);
        assert_eq!(t(r.min_signed()), -(1i64 << (37 - 1 - 12)));
    }

    #[test]
    fn relu_on_signed_value() {
        let p = fp(37, 12);
        let r = p.ring();
        assert_eq!(p.relu(0), 0);
        assert_eq!(p.relu(5), 5);
        assert_eq!(p.relu(r.from_signed(-1)), 0);
        assert_eq!(
            p.relu(r.from_signed(r.max_signed())),
            r.from_signed(r.max_signed())
        );
        assert_eq!(p.relu(r.from_signed(r.min_signed())), 0);
    }

    #[test]
    fn headroom_arithmetic() {
        assert_eq!(bit_len(0), 0);
        assert_eq!(bit_len(1), 1);
        assert_eq!(bit_len(255), 8);
        assert_eq!(bit_len(256), 9);
        assert_eq!(ring_bits_for(255, 2), 11); // 8 magnitude bits + sign + 2
        assert_eq!(headroom_bits(11, 255), 2);
        assert_eq!(headroom_bits(11, 256), 1);
        assert_eq!(headroom_bits(8, 1000), -3);
    }

    #[test]
    fn serde_checks_scale() {
        let p = fp(37, 12);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"ring_bits":37,"frac_bits":12}"#);
        assert_eq!(serde_json::from_str::<FixedPoint>(&json).unwrap(), p);
        assert!(serde_json::from_str::<FixedPoint>(r#"{"ring_bits":20,"frac_bits":12}"#).is_err());
    }
}
