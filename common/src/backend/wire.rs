//! The backend's own messages: the session hello and the batch header (big-endian,
//! fixed length, checked field by field while decoding).
//!
//! ```text
//! hello  (44 bytes): 0x48 | version u16 | model digest [32] | leaf bits u8 |
//!                    1-of-N OT u8 (0 KK13, 1 from COTs) | min batch u32 | weight bits u8 |
//!                    core OT u8 (0 IKNP, 1 Ferret) | linear layers u8 (0 online,
//!                    1 preprocessed)
//! header (10 bytes): 0x42 | rows u32 | cols u32 | output u8 (1 labels, 2 logits)
//! ```

use super::cheetah::LinearMode;
use super::{BackendError, OutputMode};
use crate::mpc::MpcConfig;
use crate::ot::{KkotConfig, OtKind};

/// The backend protocol version this code speaks (3: Ferret's LPN code takes its 21-bit
/// index lanes three from each 64-bit half of an AES block; the hello names the
/// linear-layer mode).
pub const BACKEND_VERSION: u16 = 3;
/// Bytes of the hello.
pub const HELLO_LEN: usize = 44;
/// Bytes of a batch header.
pub const HEADER_LEN: usize = 10;

const TAG_HELLO: u8 = 0x48;
const TAG_HEADER: u8 = 0x42;

/// The client's first message: what the session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u16,
    pub(crate) digest: [u8; 32],
    pub(crate) mpc: MpcConfig,
    pub(crate) weight_bits: u8,
    pub(crate) ot: OtKind,
    pub(crate) linear: LinearMode,
}

fn malformed(what: &'static str, reason: impl Into<String>) -> BackendError {
    BackendError::Malformed {
        what,
        reason: reason.into(),
    }
}

fn check_len(what: &'static str, msg: &[u8], len: usize) -> Result<(), BackendError> {
    if msg.len() != len {
        return Err(malformed(
            what,
            format!("{} bytes, expected {len}", msg.len()),
        ));
    }
    Ok(())
}

fn check_tag(what: &'static str, msg: &[u8], tag: u8) -> Result<(), BackendError> {
    match msg.first() {
        Some(&t) if t == tag => Ok(()),
        Some(&t) => Err(BackendError::WrongMessage {
            what,
            expected: tag,
            actual: t,
        }),
        None => Err(malformed(what, "empty message")),
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(HELLO_LEN);
        m.push(TAG_HELLO);
        m.extend_from_slice(&self.version.to_be_bytes());
        m.extend_from_slice(&self.digest);
        m.push(self.mpc.leaf_bits as u8);
        m.push(match self.mpc.kn {
            KkotConfig::Kk13 => 0,
            KkotConfig::FromCots => 1,
        });
        m.extend_from_slice(&(self.mpc.min_batch.min(u32::MAX as usize) as u32).to_be_bytes());
        m.push(self.weight_bits);
        m.push(match self.ot {
            OtKind::Iknp => 0,
            OtKind::Ferret => 1,
        });
        m.push(match self.linear {
            LinearMode::Online => 0,
            LinearMode::Preprocessed => 1,
        });
        m
    }

    pub(crate) fn decode(msg: &[u8]) -> Result<Self, BackendError> {
        const WHAT: &str = "hello";
        // the tag first, so another message is named as such whatever its length
        check_tag(WHAT, msg, TAG_HELLO)?;
        check_len(WHAT, msg, HELLO_LEN)?;
        let version = u16::from_be_bytes([msg[1], msg[2]]);
        if version != BACKEND_VERSION {
            return Err(BackendError::Version {
                ours: BACKEND_VERSION,
                peer: version,
            });
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&msg[3..35]);
        let kn = match msg[36] {
            0 => KkotConfig::Kk13,
            1 => KkotConfig::FromCots,
            other => return Err(malformed(WHAT, format!("unknown 1-of-N OT {other}"))),
        };
        let ot = match msg[42] {
            0 => OtKind::Iknp,
            1 => OtKind::Ferret,
            other => return Err(malformed(WHAT, format!("unknown core OT {other}"))),
        };
        let linear = match msg[43] {
            0 => LinearMode::Online,
            1 => LinearMode::Preprocessed,
            other => {
                return Err(malformed(
                    WHAT,
                    format!("unknown linear-layer mode {other}"),
                ));
            }
        };
        Ok(Self {
            version,
            digest,
            mpc: MpcConfig {
                leaf_bits: u32::from(msg[35]),
                kn,
                min_batch: be_u32(&msg[37..41]) as usize,
            },
            weight_bits: msg[41],
            ot,
            linear,
        })
    }
}

/// A batch header: what the client asks the server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// rows in the batch
    pub rows: u32,
    /// columns per row (the model's input length)
    pub cols: u32,
    /// what should leave the protocol
    pub output: OutputMode,
}

impl BatchHeader {
    /// The wire form ([`HEADER_LEN`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(HEADER_LEN);
        m.push(TAG_HEADER);
        m.extend_from_slice(&self.rows.to_be_bytes());
        m.extend_from_slice(&self.cols.to_be_bytes());
        m.push(match self.output {
            OutputMode::Labels => 1,
            OutputMode::Logits => 2,
        });
        m
    }

    /// From the wire form, checked.
    pub fn decode(msg: &[u8]) -> Result<Self, BackendError> {
        const WHAT: &str = "batch header";
        check_tag(WHAT, msg, TAG_HEADER)?;
        check_len(WHAT, msg, HEADER_LEN)?;
        let output = match msg[9] {
            1 => OutputMode::Labels,
            2 => OutputMode::Logits,
            other => return Err(malformed(WHAT, format!("unknown output mode {other}"))),
        };
        Ok(Self {
            rows: be_u32(&msg[1..5]),
            cols: be_u32(&msg[5..9]),
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_and_header_round_trip_and_refuse_bad_fields() {
        let h = Hello {
            version: BACKEND_VERSION,
            digest: [7; 32],
            mpc: MpcConfig::default(),
            weight_bits: 33,
            ot: OtKind::Ferret,
            linear: LinearMode::Preprocessed,
        };
        let m = h.encode();
        assert_eq!(m.len(), HELLO_LEN);
        assert_eq!(Hello::decode(&m).unwrap(), h);
        let mut v = m.clone();
        v[2] ^= 1;
        assert!(matches!(
            Hello::decode(&v),
            Err(BackendError::Version { .. })
        ));
        let mut k = m.clone();
        k[36] = 9;
        assert!(matches!(
            Hello::decode(&k),
            Err(BackendError::Malformed { .. })
        ));
        let mut o = m.clone();
        o[42] = 2;
        assert!(matches!(
            Hello::decode(&o),
            Err(BackendError::Malformed { .. })
        ));
        let mut lm = m.clone();
        lm[43] = 2;
        assert!(matches!(
            Hello::decode(&lm),
            Err(BackendError::Malformed { .. })
        ));
        assert!(matches!(
            Hello::decode(&m[..43]),
            Err(BackendError::Malformed { .. })
        ));
        assert!(matches!(
            Hello::decode(&[]),
            Err(BackendError::Malformed { .. })
        ));

        for output in [OutputMode::Labels, OutputMode::Logits] {
            let b = BatchHeader {
                rows: u32::MAX,
                cols: 0,
                output,
            };
            let e = b.encode();
            assert_eq!(e.len(), HEADER_LEN);
            assert_eq!(BatchHeader::decode(&e).unwrap(), b);
        }
        let mut e = BatchHeader {
            rows: 1,
            cols: 784,
            output: OutputMode::Labels,
        }
        .encode();
        assert!(matches!(
            BatchHeader::decode(&e[..9]),
            Err(BackendError::Malformed { .. })
        ));
        assert!(matches!(
            BatchHeader::decode(&m),
            Err(BackendError::WrongMessage {
                expected: TAG_HEADER,
                actual: TAG_HELLO,
                ..
            })
        ));
        e[9] = 0;
        assert!(matches!(
            BatchHeader::decode(&e),
            Err(BackendError::Malformed { .. })
        ));
    }
}
