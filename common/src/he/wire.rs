//! Checked message encodings. Every decoder checks the tag, the parameter id, the exact
//! length, the padding bits and the range of every residue before anything else sees
//! the data.
//!
//! ```text
//! setup     : tag 0x51 | param id (32) | pk seed (32) | pk0: N residues per prime, packed
//! query hdr : tag 0x52 | param id (32) | B n_i n_o | B' n_i' n_o' | count (u32 LE each) | seed (32)
//! query ct  : c0: N residues per prime, each at bits(p_i) bits, prime after prime
//! resp hdr  : tag 0x53 | param id (32) | B n_i n_o | count (u32 LE each)
//! resp ct   : c1: N values at K1 bits | c0: the kept values at K0 bits (zero padding)
//! ```

use super::HeError;
use super::packing::{LinearShape, Packing};
use super::params::{DEGREE, HeParams, ParamId};
use super::rns::RnsPoly;
use crate::ring::{RingError, pack_bits, unpack_bits};

pub(crate) const TAG_SETUP: u8 = 0x51;
pub(crate) const TAG_QUERY: u8 = 0x52;
pub(crate) const TAG_RESPONSE: u8 = 0x53;

/// Bytes of a query header.
pub const QUERY_HEADER_LEN: usize = 1 + 32 + 7 * 4 + 32;
/// Bytes of a response header.
pub const RESPONSE_HEADER_LEN: usize = 1 + 32 + 4 * 4;

/// Bytes of the setup message for `p`.
pub fn setup_bytes(p: &HeParams) -> usize {
    1 + 32 + 32 + p.upload_ct_bytes()
}

/// A little reader over a message that names what it is reading in its errors.
struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeError> {
        if self.buf.len() < n {
            return Err(HeError::MalformedLength {
                what: self.what,
                expected: n,
                actual: self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<usize, HeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn array32(&mut self) -> Result<[u8; 32], HeError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }

    fn tag(&mut self, expected: u8) -> Result<(), HeError> {
        let t = self.take(1)?[0];
        if t != expected {
            return Err(HeError::WrongMessage {
                expected,
                actual: t,
            });
        }
        Ok(())
    }

    fn params(&mut self, p: &HeParams) -> Result<(), HeError> {
        let id = ParamId(self.array32()?);
        if id != p.id() {
            return Err(HeError::WrongParameters {
                expected: p.id(),
                actual: id,
            });
        }
        Ok(())
    }

    fn end(&self) -> Result<(), HeError> {
        if !self.buf.is_empty() {
            return Err(HeError::MalformedLength {
                what: self.what,
                expected: 0,
                actual: self.buf.len(),
            });
        }
        Ok(())
    }
}

fn put_u32(out: &mut Vec<u8>, v: usize) -> Result<(), HeError> {
    let v = u32::try_from(v).map_err(|_| HeError::Malformed {
        what: "header",
        reason: "field above u32",
    })?;
    out.extend_from_slice(&v.to_le_bytes());
    Ok(())
}

fn ring_err(what: &'static str, e: RingError) -> HeError {
    match e {
        RingError::PackedLength {
            expected, actual, ..
        } => HeError::MalformedLength {
            what,
            expected,
            actual,
        },
        _ => HeError::Malformed {
            what,
            reason: "non-zero padding bits",
        },
    }
}

/// Packs a polynomial modulo Q (coefficient form), prime after prime.
pub(crate) fn encode_poly_q(poly: &RnsPoly, p: &HeParams, out: &mut Vec<u8>) {
    for i in 0..poly.rows() {
        out.extend_from_slice(&pack_bits(poly.row(i), p.residue_bits[i]));
    }
}

/// Unpacks a polynomial modulo Q, refusing any residue not below its prime.
pub(crate) fn decode_poly_q(
    bytes: &[u8],
    p: &HeParams,
    what: &'static str,
) -> Result<RnsPoly, HeError> {
    if bytes.len() != p.upload_ct_bytes() {
        return Err(HeError::MalformedLength {
            what,
            expected: p.upload_ct_bytes(),
            actual: bytes.len(),
        });
    }
    let mut poly = RnsPoly::zero(p.q.len());
    let mut off = 0;
    for i in 0..p.q.len() {
        let len = DEGREE * p.residue_bits[i] as usize / 8;
        let row = unpack_bits(&bytes[off..off + len], DEGREE, p.residue_bits[i])
            .map_err(|e| ring_err(what, e))?;
        off += len;
        let m = *p.q[i];
        if let Some(index) = row.iter().position(|v| *v >= m) {
            return Err(HeError::CoefficientOutOfRange {
                what,
                prime: i,
                index,
            });
        }
        poly.row_mut(i).copy_from_slice(&row);
    }
    Ok(poly)
}

/// The setup message.
pub(crate) fn encode_setup(p: &HeParams, seed: &[u8; 32], pk0: &RnsPoly) -> Vec<u8> {
    let mut out = Vec::with_capacity(setup_bytes(p));
    out.push(TAG_SETUP);
    out.extend_from_slice(&p.id().0);
    out.extend_from_slice(seed);
    encode_poly_q(pk0, p, &mut out);
    out
}

pub(crate) fn decode_setup(msg: &[u8], p: &HeParams) -> Result<([u8; 32], RnsPoly), HeError> {
    let mut r = Reader {
        what: "setup message",
        buf: msg,
    };
    r.tag(TAG_SETUP)?;
    r.params(p)?;
    let seed = r.array32()?;
    let pk0 = decode_poly_q(r.buf, p, "public key")?;
    Ok((seed, pk0))
}

/// The header of a layer query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueryHeader {
    pub(crate) shape: LinearShape,
    pub(crate) packing: Packing,
    pub(crate) count: usize,
    pub(crate) seed: [u8; 32],
}

pub(crate) fn encode_query_header(p: &HeParams, h: &QueryHeader) -> Result<Vec<u8>, HeError> {
    let mut out = Vec::with_capacity(QUERY_HEADER_LEN);
    out.push(TAG_QUERY);
    out.extend_from_slice(&p.id().0);
    for v in [
        h.shape.rows,
        h.shape.inputs,
        h.shape.outputs,
        h.packing.rows,
        h.packing.inputs,
        h.packing.outputs,
        h.count,
    ] {
        put_u32(&mut out, v)?;
    }
    out.extend_from_slice(&h.seed);
    Ok(out)
}

/// Decodes a query header and checks it against what the server expects.
pub(crate) fn decode_query_header(
    msg: &[u8],
    p: &HeParams,
    shape: &LinearShape,
    packing: &Packing,
) -> Result<QueryHeader, HeError> {
    if msg.len() != QUERY_HEADER_LEN {
        return Err(HeError::MalformedLength {
            what: "query header",
            expected: QUERY_HEADER_LEN,
            actual: msg.len(),
        });
    }
    let mut r = Reader {
        what: "query header",
        buf: msg,
    };
    r.tag(TAG_QUERY)?;
    r.params(p)?;
    let got_shape = LinearShape::new(r.u32()?, r.u32()?, r.u32()?);
    let got_packing = Packing {
        rows: r.u32()?,
        inputs: r.u32()?,
        outputs: r.u32()?,
    };
    let count = r.u32()?;
    let seed = r.array32()?;
    r.end()?;
    if got_shape != *shape {
        return Err(HeError::ShapeMismatch {
            expected: *shape,
            actual: got_shape,
        });
    }
    if got_packing != *packing {
        return Err(HeError::PackingMismatch {
            expected: *packing,
            actual: got_packing,
        });
    }
    let expected = packing.input_cts(shape);
    if count != expected {
        return Err(HeError::CountMismatch {
            expected,
            actual: count,
        });
    }
    Ok(QueryHeader {
        shape: got_shape,
        packing: got_packing,
        count,
        seed,
    })
}

pub(crate) fn encode_response_header(
    p: &HeParams,
    shape: &LinearShape,
    count: usize,
) -> Result<Vec<u8>, HeError> {
    let mut out = Vec::with_capacity(RESPONSE_HEADER_LEN);
    out.push(TAG_RESPONSE);
    out.extend_from_slice(&p.id().0);
    for v in [shape.rows, shape.inputs, shape.outputs, count] {
        put_u32(&mut out, v)?;
    }
    Ok(out)
}

pub(crate) fn decode_response_header(
    msg: &[u8],
    p: &HeParams,
    shape: &LinearShape,
    expected_count: usize,
) -> Result<(), HeError> {
    if msg.len() != RESPONSE_HEADER_LEN {
        return Err(HeError::MalformedLength {
            what: "response header",
            expected: RESPONSE_HEADER_LEN,
            actual: msg.len(),
        });
    }
    let mut r = Reader {
        what: "response header",
        buf: msg,
    };
    r.tag(TAG_RESPONSE)?;
    r.params(p)?;
    let got = LinearShape::new(r.u32()?, r.u32()?, r.u32()?);
    let count = r.u32()?;
    r.end()?;
    if got != *shape {
        return Err(HeError::ShapeMismatch {
            expected: *shape,
            actual: got,
        });
    }
    if count != expected_count {
        return Err(HeError::CountMismatch {
            expected: expected_count,
            actual: count,
        });
    }
    Ok(())
}

/// One returned ciphertext: c1 (all N, modulo 2^K1) and the kept c0 values (modulo 2^K0).
pub(crate) fn encode_response_ct(p: &HeParams, c1: &[u64], c0: &[u64]) -> Vec<u8> {
    let mut out = pack_bits(c1, p.c1_bits());
    out.extend_from_slice(&pack_bits(c0, p.c0_bits()));
    out
}

pub(crate) fn decode_response_ct(
    msg: &[u8],
    p: &HeParams,
    kept: usize,
) -> Result<(Vec<u64>, Vec<u64>), HeError> {
    let what = "result ciphertext";
    let expected = Packing::response_ct_bytes(p, kept);
    if msg.len() != expected {
        return Err(HeError::MalformedLength {
            what,
            expected,
            actual: msg.len(),
        });
    }
    let split = DEGREE * p.c1_bits() as usize / 8;
    let c1 = unpack_bits(&msg[..split], DEGREE, p.c1_bits()).map_err(|e| ring_err(what, e))?;
    let c0 = unpack_bits(&msg[split..], kept, p.c0_bits()).map_err(|e| ring_err(what, e))?;
    Ok((c1, c0))
}
