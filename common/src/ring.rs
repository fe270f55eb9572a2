//! Arithmetic in the ring Z_{2^l} and additive secret sharing over it.
//!
//! Every value of the secure protocols is an element of Z_{2^l} held as a `u64` whose bits
//! above `l` are zero. The signed reading of an element is its two's-complement value in
//! [-2^(l-1), 2^(l-1)). Shares are additive: x = x0 + x1 mod 2^l.
//!
//! Elements travel bit-packed: n elements take exactly ceil(n * l / 8) bytes, and unpacking
//! refuses a buffer of any other length or with non-zero padding bits.

use rand::{CryptoRng, Rng};

/// The smallest ring width the protocols support.
pub const MIN_BITS: u32 = 1;
/// The largest ring width (elements are held in a `u64`).
pub const MAX_BITS: u32 = 64;

/// Errors of ring construction and element decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The requested width is outside [`MIN_BITS`]..=[`MAX_BITS`].
    #[error("ring width {bits} is outside {MIN_BITS}..={MAX_BITS}")]
    BadWidth {
        /// the width asked for
        bits: u32,
    },
    /// A packed buffer of the wrong length.
    #[error("packed ring elements: expected {expected} bytes for {count} elements, got {actual}")]
    PackedLength {
        /// number of elements expected
        count: usize,
        /// bytes expected
        expected: usize,
        /// bytes received
        actual: usize,
    },
    /// Padding bits after the last element were not zero.
    #[error("packed ring elements: non-zero padding bits")]
    Padding,
}

/// The ring Z_{2^l}.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ring {
    bits: u32,
    mask: u64,
}

impl Ring {
    /// The ring of `bits`-bit integers.
    pub const fn new(bits: u32) -> Result<Self, RingError> {
        if bits < MIN_BITS || bits > MAX_BITS {
            return Err(RingError::BadWidth { bits });
        }
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        Ok(Self { bits, mask })
    }

    /// l, the width in bits.
    #[inline]
    pub const fn bits(self) -> u32 {
        self.bits
    }

    /// 2^l - 1.
    #[inline]
    pub const fn mask(self) -> u64 {
        self.mask
    }

    /// x mod 2^l.
    #[inline]
    pub const fn reduce(self, x: u64) -> u64 {
        x & self.mask
    }

    /// a + b mod 2^l.
    #[inline]
    pub const fn add(self, a: u64, b: u64) -> u64 {
        a.wrapping_add(b) & self.mask
    }

    /// a - b mod 2^l.
    #[inline]
    pub const fn sub(self, a: u64, b: u64) -> u64 {
        a.wrapping_sub(b) & self.mask
    }

    /// -a mod 2^l.
    #[inline]
    pub const fn neg(self, a: u64) -> u64 {
        a.wrapping_neg() & self.mask
    }

    /// a * b mod 2^l.
    #[inline]
    pub const fn mul(self, a: u64, b: u64) -> u64 {
        a.wrapping_mul(b) & self.mask
    }

    /// The most significant bit (bit l-1): the sign of the signed reading.
    #[inline]
    pub const fn msb(self, x: u64) -> bool {
        (x >> (self.bits - 1)) & 1 == 1
    }

    /// The element whose signed reading is `v` mod 2^l.
    #[inline]
    pub const fn from_signed(self, v: i64) -> u64 {
        (v as u64) & self.mask
    }

    /// The signed (two's-complement) reading of `x` in [-2^(l-1), 2^(l-1)).
    #[inline]
    pub const fn to_signed(self, x: u64) -> i64 {
        let shift = 64 - self.bits;
        (((x & self.mask) << shift) as i64) >> shift
    }

    /// 2^(l-1) - 1, the largest positive signed value.
    #[inline]
    pub const fn max_signed(self) -> i64 {
        (self.mask >> 1) as i64
    }

    /// -2^(l-1), the most negative signed value.
    #[inline]
    pub const fn min_signed(self) -> i64 {
        -self.max_signed() - 1
    }

    /// A uniformly random element.
    #[inline]
    pub fn random<R: Rng + CryptoRng + ?Sized>(self, rng: &mut R) -> u64 {
        rng.random::<u64>() & self.mask
    }

    /// Additive shares (x0, x1) of `x`, x0 uniformly random.
    pub fn share<R: Rng + CryptoRng + ?Sized>(self, x: u64, rng: &mut R) -> (u64, u64) {
        let x0 = self.random(rng);
        (x0, self.sub(x, x0))
    }

    /// Number of bytes that `count` packed elements take.
    #[inline]
    pub const fn packed_len(self, count: usize) -> usize {
        packed_len(count, self.bits)
    }

    /// Packs elements at l bits each (little-endian bit order).
    pub fn pack(self, xs: &[u64]) -> Vec<u8> {
        pack_bits(xs, self.bits)
    }

    /// Unpacks exactly `count` elements; refuses a buffer of another length.
    pub fn unpack(self, bytes: &[u8], count: usize) -> Result<Vec<u64>, RingError> {
        unpack_bits(bytes, count, self.bits)
    }
}

/// Bytes taken by `count` values of `width` bits packed.
#[inline]
pub const fn packed_len(count: usize, width: u32) -> usize {
    (count * width as usize).div_ceil(8)
}

/// Packs the low `width` bits of each value, little-endian bit order, no gaps.
pub fn pack_bits(xs: &[u64], width: u32) -> Vec<u8> {
    debug_assert!((1..=64).contains(&width));
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    let mut out = Vec::with_capacity(packed_len(xs.len(), width));
    let mut acc: u128 = 0;
    let mut nbits: u32 = 0;
    for &x in xs {
        acc |= u128::from(x & mask) << nbits;
        nbits += width;
        while nbits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            nbits -= 8;
        }
    }
    if nbits > 0 {
        out.push(acc as u8);
    }
    out
}

/// Inverse of [`pack_bits`]: exactly `count` values, exact length, zero padding.
pub fn unpack_bits(bytes: &[u8], count: usize, width: u32) -> Result<Vec<u64>, RingError> {
    debug_assert!((1..=64).contains(&width));
    let expected = packed_len(count, width);
    if bytes.len() != expected {
        return Err(RingError::PackedLength {
            count,
            expected,
            actual: bytes.len(),
        });
    }
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    let mut out = Vec::with_capacity(count);
    let mut acc: u128 = 0;
    let mut nbits: u32 = 0;
    let mut it = bytes.iter();
    for _ in 0..count {
        while nbits < width {
            // The length check above guarantees enough bytes.
            let b = it.next().copied().unwrap_or(0);
            acc |= u128::from(b) << nbits;
            nbits += 8;
        }
        out.push((acc as u64) & mask);
        acc >>= width;
        nbits -= width;
    }
    if acc != 0 {
        return Err(RingError::Padding);
    }
    Ok(out)
}

/// [`pack_bits`] with width 1 for bits held one per byte (the LSB of each byte).
pub fn pack_bit_bytes(bits: &[u8]) -> Vec<u8> {
    bits.chunks(8)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |acc, (k, &b)| acc | ((b & 1) << k))
        })
        .collect()
}

/// [`unpack_bits`] with width 1 into one byte per bit: exactly `count` bits, exact
/// length, zero padding (the same checks and errors).
pub fn unpack_bit_bytes(bytes: &[u8], count: usize) -> Result<Vec<u8>, RingError> {
    let expected = count.div_ceil(8);
    if bytes.len() != expected {
        return Err(RingError::PackedLength {
            count,
            expected,
            actual: bytes.len(),
        });
    }
    if !count.is_multiple_of(8) && bytes[expected - 1] >> (count % 8) != 0 {
        return Err(RingError::Padding);
    }
    let mut out = Vec::with_capacity(count);
    for &b in bytes {
        for k in 0..8 {
            out.push((b >> k) & 1);
        }
    }
    out.truncate(count);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;

    #[test]
    fn bit_bytes_pack_as_width_one() {
        let mut rng = ChaCha12Rng::seed_from_u64(8);
        for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000] {
            let bits: Vec<u8> = (0..n).map(|_| rng.random::<u8>() & 1).collect();
            let wide: Vec<u64> = bits.iter().map(|&b| u64::from(b)).collect();
            let packed = pack_bit_bytes(&bits);
            assert_eq!(packed, pack_bits(&wide, 1), "n={n}");
            assert_eq!(unpack_bit_bytes(&packed, n).unwrap(), bits);
            // the same errors as unpack_bits
            let mut long = packed.clone();
            long.push(0);
            assert!(matches!(
                unpack_bit_bytes(&long, n),
                Err(RingError::PackedLength { .. })
            ));
            if !n.is_multiple_of(8) {
                let mut bad = packed.clone();
                *bad.last_mut().unwrap() |= 0x80;
                assert!(matches!(unpack_bit_bytes(&bad, n), Err(RingError::Padding)));
                assert!(matches!(unpack_bits(&bad, n, 1), Err(RingError::Padding)));
            }
        }
    }

    #[test]
    fn widths() {
        assert!(Ring::new(0).is_err());
        assert!(Ring::new(65).is_err());
        assert_eq!(Ring::new(64).map(|r| r.mask()), Ok(u64::MAX));
    }

    #[test]
    fn signed_edges() {
        let r = Ring::new(37).unwrap();
        for v in [0i64, -1, 1, r.max_signed(), r.min_signed()] {
            assert_eq!(r.to_signed(r.from_signed(v)), v);
        }
        assert_eq!(r.from_signed(-1), r.mask());
        assert!(r.msb(r.from_signed(-1)));
        assert!(!r.msb(r.from_signed(r.max_signed())));
        assert_eq!(
            r.add(r.from_signed(r.max_signed()), 1),
            r.from_signed(r.min_signed())
        );
    }

    #[test]
    fn sharing_reconstructs() {
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        for bits in [1, 16, 32, 37, 62, 64] {
            let r = Ring::new(bits).unwrap();
            for _ in 0..100 {
                let x = r.random(&mut rng);
                let (a, b) = r.share(x, &mut rng);
                assert_eq!(r.add(a, b), x);
            }
        }
    }

    #[test]
    fn pack_round_trip_and_refusals() {
        let mut rng = ChaCha12Rng::seed_from_u64(2);
        for bits in [1, 7, 8, 13, 37, 62, 64] {
            let r = Ring::new(bits).unwrap();
            for n in [0usize, 1, 3, 64, 65] {
                let xs: Vec<u64> = (0..n).map(|_| r.random(&mut rng)).collect();
                let p = r.pack(&xs);
                assert_eq!(p.len(), r.packed_len(n));
                assert_eq!(r.unpack(&p, n).unwrap(), xs);
                let mut longer = p.clone();
                longer.push(0);
                assert!(matches!(
                    r.unpack(&longer, n),
                    Err(RingError::PackedLength { .. })
                ));
            }
        }
        // 3 elements of 7 bits = 21 bits -> 3 bytes with 3 padding bits.
        let r = Ring::new(7).unwrap();
        let mut p = r.pack(&[1, 2, 3]);
        p[2] |= 0x80;
        assert_eq!(r.unpack(&p, 3), Err(RingError::Padding));
    }
}
