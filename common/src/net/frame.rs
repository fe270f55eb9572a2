//! Splitting protocol messages into chunks and putting them back together.
//!
//! A message of `n` bytes travels as chunks `(seq, offset, total_len = n, payload)` with
//! `payload.len() <= frame_limit`, offsets `0, f, 2f, ...` and `seq` counting messages
//! from 0 in each direction. An empty message is one chunk with an empty payload. The
//! receiver checks every field against what it expects next, so a chunk that is too
//! large, out of order, overlapping, or a message cut short is a named error.

use super::pb;
use crate::channel::ChannelError;

/// Default payload limit of one frame: 1 MiB.
pub const DEFAULT_FRAME_LIMIT: usize = 1 << 20;

/// Smallest frame limit a party may ask for (keeps the per-frame overhead sane).
pub const MIN_FRAME_LIMIT: usize = 4 << 10;

/// Largest frame limit a party may ask for.
pub const MAX_FRAME_LIMIT: usize = 64 << 20;

/// Default limit on one reassembled message: 64 MiB.
///
/// Derived from the largest message the protocols send, measured on the bundled model at
/// the default largest batch (two 1,024-row batches in one session, both linear modes,
/// labels and logits, in-process): the largest is a Ferret extension iteration, server
/// to client, 4,325,376 bytes (fixed by the Ferret parameters, not by the rows); client
/// to server, the preprocessed mode's masked input of the first layer, 3,311,616 bytes
/// (`rows x 784` ring elements of 33 bits, packed: the only message that grows with the
/// batch), then the base OTs of the set-up, 1,185,792 bytes. 64 MiB leaves a margin of
/// 15 at the default batch and covers batches up to about 20,000 rows in the
/// preprocessed mode. A session may hold about two such messages of inbound data (see
/// [`super::stream::inbound_bytes`]), which the server counts against its memory cap.
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;

/// What a gRPC message may carry beyond a chunk's payload (protobuf framing, a start
/// frame's parameters, the unary replies). tonic's encoding and decoding limits are set
/// to `frame_limit + FRAME_OVERHEAD` on both sides.
pub const FRAME_OVERHEAD: usize = 64 << 10;

/// The limits of one party's receive side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// largest chunk payload accepted
    pub frame_limit: usize,
    /// largest reassembled message accepted
    pub max_message: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            frame_limit: DEFAULT_FRAME_LIMIT,
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

impl FrameLimits {
    /// The value for tonic's `max_decoding_message_size` / `max_encoding_message_size`.
    pub fn grpc_message_limit(&self) -> usize {
        self.frame_limit.saturating_add(FRAME_OVERHEAD)
    }

    /// The limits for sending to a peer that receives with `peer`: the smaller of each.
    pub fn meet(&self, peer: &FrameLimits) -> FrameLimits {
        FrameLimits {
            frame_limit: self.frame_limit.min(peer.frame_limit),
            max_message: self.max_message.min(peer.max_message),
        }
    }

    /// Checks that the frame limit lies in `MIN_FRAME_LIMIT..=MAX_FRAME_LIMIT` and that a
    /// message may be at least one frame long.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_FRAME_LIMIT..=MAX_FRAME_LIMIT).contains(&self.frame_limit) {
            return Err(format!(
                "frame limit {} outside {MIN_FRAME_LIMIT}..={MAX_FRAME_LIMIT}",
                self.frame_limit
            ));
        }
        if self.max_message < self.frame_limit {
            return Err(format!(
                "message limit {} below the frame limit {}",
                self.max_message, self.frame_limit
            ));
        }
        Ok(())
    }
}

/// Numbers outgoing messages and cuts them into chunks.
#[derive(Debug, Default)]
pub(crate) struct Chunker {
    next_seq: u64,
}

impl Chunker {
    /// The chunks of `msg`, each with at most `frame_limit` payload bytes, made one at a
    /// time (a message that fits one frame is moved, not copied).
    pub(crate) fn split(&mut self, msg: Vec<u8>, frame_limit: usize) -> Chunks {
        let seq = self.next_seq;
        self.next_seq += 1;
        Chunks {
            seq,
            total_len: msg.len(),
            msg,
            pos: 0,
            frame_limit: frame_limit.max(1),
            done: false,
        }
    }
}

/// The chunks of one message (see [`Chunker::split`]).
#[derive(Debug)]
pub(crate) struct Chunks {
    seq: u64,
    total_len: usize,
    msg: Vec<u8>,
    pos: usize,
    frame_limit: usize,
    done: bool,
}

impl Iterator for Chunks {
    type Item = pb::Chunk;

    fn next(&mut self) -> Option<pb::Chunk> {
        if self.done {
            return None;
        }
        if self.pos == 0 && self.total_len <= self.frame_limit {
            self.done = true;
            return Some(pb::Chunk {
                seq: self.seq,
                offset: 0,
                total_len: self.total_len as u64,
                payload: std::mem::take(&mut self.msg),
            });
        }
        let end = self.total_len.min(self.pos + self.frame_limit);
        let payload = self.msg.get(self.pos..end)?.to_vec();
        let offset = self.pos;
        self.pos = end;
        self.done = self.pos >= self.total_len;
        Some(pb::Chunk {
            seq: self.seq,
            offset: offset as u64,
            total_len: self.total_len as u64,
            payload,
        })
    }
}

#[derive(Debug)]
struct Partial {
    seq: u64,
    total: usize,
    buf: Vec<u8>,
}

/// Checks incoming chunks and returns whole messages.
#[derive(Debug)]
pub(crate) struct Reassembler {
    limits: FrameLimits,
    next_seq: u64,
    partial: Option<Partial>,
}

impl Reassembler {
    pub(crate) fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            next_seq: 0,
            partial: None,
        }
    }

    /// Takes one chunk; returns the message it completes, if any.
    pub(crate) fn push(&mut self, chunk: pb::Chunk) -> Result<Option<Vec<u8>>, ChannelError> {
        let len = chunk.payload.len();
        if len > self.limits.frame_limit {
            return Err(ChannelError::FrameTooLarge {
                actual: len,
                limit: self.limits.frame_limit,
            });
        }
        match self.partial.take() {
            None => self.first_chunk(chunk),
            Some(p) => self.next_chunk(p, chunk),
        }
    }

    fn first_chunk(&mut self, chunk: pb::Chunk) -> Result<Option<Vec<u8>>, ChannelError> {
        if chunk.seq != self.next_seq {
            return Err(ChannelError::Malformed(format!(
                "chunk of message {} where message {} was due",
                chunk.seq, self.next_seq
            )));
        }
        if chunk.offset != 0 {
            return Err(ChannelError::Malformed(format!(
                "message {} starts at offset {} instead of 0",
                chunk.seq, chunk.offset
            )));
        }
        let total = usize::try_from(chunk.total_len).unwrap_or(usize::MAX);
        if total > self.limits.max_message {
            return Err(ChannelError::TooLarge {
                actual: total,
                limit: self.limits.max_message,
            });
        }
        let len = chunk.payload.len();
        if len > total {
            return Err(ChannelError::Malformed(format!(
                "chunk of {len} bytes in a message declared as {total} bytes"
            )));
        }
        if len == total {
            self.next_seq += 1;
            return Ok(Some(chunk.payload));
        }
        if len == 0 {
            return Err(ChannelError::Malformed(
                "empty chunk inside a multi-frame message".into(),
            ));
        }
        // Grow with what actually arrives; reserve at most a few frames up front so a
        // declared length alone cannot make us allocate.
        let mut buf = Vec::with_capacity(total.min(4 * self.limits.frame_limit));
        buf.extend_from_slice(&chunk.payload);
        self.partial = Some(Partial {
            seq: chunk.seq,
            total,
            buf,
        });
        Ok(None)
    }

    fn next_chunk(
        &mut self,
        mut p: Partial,
        chunk: pb::Chunk,
    ) -> Result<Option<Vec<u8>>, ChannelError> {
        if chunk.seq != p.seq {
            if chunk.seq == p.seq.wrapping_add(1) && chunk.offset == 0 {
                return Err(ChannelError::Truncated {
                    expected: p.total,
                    received: p.buf.len(),
                });
            }
            return Err(ChannelError::Malformed(format!(
                "chunk of message {} inside message {}",
                chunk.seq, p.seq
            )));
        }
        if chunk.total_len != p.total as u64 {
            return Err(ChannelError::Malformed(format!(
                "message {} changed its length from {} to {}",
                p.seq, p.total, chunk.total_len
            )));
        }
        if chunk.offset != p.buf.len() as u64 {
            return Err(ChannelError::Malformed(format!(
                "chunk at offset {} of message {} where offset {} was due",
                chunk.offset,
                p.seq,
                p.buf.len()
            )));
        }
        let len = chunk.payload.len();
        if len == 0 {
            return Err(ChannelError::Malformed(
                "empty chunk inside a multi-frame message".into(),
            ));
        }
        if len > p.total - p.buf.len() {
            return Err(ChannelError::Malformed(format!(
                "chunk overruns message {}: {} + {len} bytes of {}",
                p.seq,
                p.buf.len(),
                p.total
            )));
        }
        p.buf.extend_from_slice(&chunk.payload);
        if p.buf.len() == p.total {
            self.next_seq += 1;
            return Ok(Some(p.buf));
        }
        self.partial = Some(p);
        Ok(None)
    }

    /// Called when the stream ends: an unfinished message is [`ChannelError::Truncated`].
    pub(crate) fn finish(&self) -> Result<(), ChannelError> {
        match &self.partial {
            None => Ok(()),
            Some(p) => Err(ChannelError::Truncated {
                expected: p.total,
                received: p.buf.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(frame: usize, max: usize) -> FrameLimits {
        FrameLimits {
            frame_limit: frame,
            max_message: max,
        }
    }

    fn roundtrip(msgs: &[Vec<u8>], frame: usize) -> Vec<Vec<u8>> {
        let mut c = Chunker::default();
        let mut r = Reassembler::new(limits(frame, 1 << 20));
        let mut out = vec![];
        for m in msgs {
            for ch in c.split(m.clone(), frame) {
                assert!(ch.payload.len() <= frame);
                if let Some(done) = r.push(ch).unwrap() {
                    out.push(done);
                }
            }
        }
        r.finish().unwrap();
        out
    }

    #[test]
    fn split_and_reassemble_round_trip_at_the_edges() {
        let frame = 16;
        let msgs: Vec<Vec<u8>> = [0usize, 1, 15, 16, 17, 32, 33, 100]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        assert_eq!(roundtrip(&msgs, frame), msgs);
    }

    #[test]
    fn chunk_counts_follow_the_frame_limit() {
        let mut c = Chunker::default();
        assert_eq!(c.split(vec![], 16).count(), 1);
        assert_eq!(c.split(vec![0; 16], 16).count(), 1);
        assert_eq!(c.split(vec![0; 17], 16).count(), 2);
        let chunks: Vec<_> = c.split(vec![0; 40], 16).collect();
        let lens: Vec<_> = chunks.iter().map(|c| c.payload.len()).collect();
        assert_eq!(lens, vec![16, 16, 8]);
        assert!(chunks.iter().all(|c| c.seq == 3 && c.total_len == 40));
        let offsets: Vec<_> = chunks.iter().map(|c| c.offset).collect();
        assert_eq!(offsets, vec![0, 16, 32]);
    }

    #[test]
    fn frame_over_the_limit_is_refused() {
        let mut r = Reassembler::new(limits(16, 1024));
        let chunk = pb::Chunk {
            seq: 0,
            offset: 0,
            total_len: 17,
            payload: vec![0; 17],
        };
        assert!(matches!(
            r.push(chunk),
            Err(ChannelError::FrameTooLarge {
                actual: 17,
                limit: 16
            })
        ));
    }

    #[test]
    fn message_over_the_limit_is_refused_before_reassembly() {
        let mut r = Reassembler::new(limits(16, 64));
        let chunk = pb::Chunk {
            seq: 0,
            offset: 0,
            total_len: 65,
            payload: vec![0; 16],
        };
        assert!(matches!(
            r.push(chunk),
            Err(ChannelError::TooLarge {
                actual: 65,
                limit: 64
            })
        ));
        // an absurd declared length does not allocate and is refused the same way
        let mut r = Reassembler::new(limits(16, 64));
        let chunk = pb::Chunk {
            seq: 0,
            offset: 0,
            total_len: u64::MAX,
            payload: vec![],
        };
        assert!(matches!(r.push(chunk), Err(ChannelError::TooLarge { .. })));
    }

    #[test]
    fn stream_ending_mid_message_is_truncated() {
        let mut c = Chunker::default();
        let mut r = Reassembler::new(limits(16, 1024));
        let chunks: Vec<_> = c.split(vec![1; 40], 16).take(2).collect();
        for ch in chunks {
            assert!(r.push(ch).unwrap().is_none());
        }
        assert!(matches!(
            r.finish(),
            Err(ChannelError::Truncated {
                expected: 40,
                received: 32
            })
        ));
    }

    #[test]
    fn next_message_before_the_last_chunk_is_truncated() {
        let mut c = Chunker::default();
        let mut r = Reassembler::new(limits(16, 1024));
        let first: Vec<_> = c.split(vec![1; 40], 16).collect();
        let second: Vec<_> = c.split(vec![2; 4], 16).collect();
        r.push(first[0].clone()).unwrap();
        assert!(matches!(
            r.push(second[0].clone()),
            Err(ChannelError::Truncated {
                expected: 40,
                received: 16
            })
        ));
    }

    #[test]
    fn inconsistent_chunk_sequences_are_malformed() {
        let mk = |seq, offset, total_len, n| pb::Chunk {
            seq,
            offset,
            total_len,
            payload: vec![9; n],
        };
        let cases: Vec<(&str, Vec<pb::Chunk>)> = vec![
            ("wrong first seq", vec![mk(1, 0, 4, 4)]),
            ("nonzero first offset", vec![mk(0, 4, 8, 4)]),
            ("payload beyond total", vec![mk(0, 0, 4, 8)]),
            ("empty in multi-frame", vec![mk(0, 0, 40, 0)]),
            ("gap", vec![mk(0, 0, 40, 16), mk(0, 20, 40, 16)]),
            ("overlap", vec![mk(0, 0, 40, 16), mk(0, 8, 40, 16)]),
            ("length changed", vec![mk(0, 0, 40, 16), mk(0, 16, 48, 16)]),
            ("overrun", vec![mk(0, 0, 20, 16), mk(0, 16, 20, 16)]),
            (
                "empty continuation",
                vec![mk(0, 0, 40, 16), mk(0, 16, 40, 0)],
            ),
            ("foreign seq", vec![mk(0, 0, 40, 16), mk(5, 0, 4, 4)]),
        ];
        for (name, chunks) in cases {
            let mut r = Reassembler::new(limits(16, 1024));
            let mut result = Ok(None);
            for ch in chunks {
                result = r.push(ch);
                if result.is_err() {
                    break;
                }
            }
            assert!(
                matches!(result, Err(ChannelError::Malformed(_))),
                "{name}: {result:?}"
            );
        }
    }

    #[test]
    fn limits_meet_and_validate() {
        let a = limits(1 << 20, 1 << 30);
        let b = limits(64 << 10, 1 << 31);
        assert_eq!(a.meet(&b), limits(64 << 10, 1 << 30));
        assert!(a.validate().is_ok());
        assert!(limits(100, 1 << 20).validate().is_err());
        assert!(limits(1 << 20, 1 << 10).validate().is_err());
        assert_eq!(a.grpc_message_limit(), (1 << 20) + FRAME_OVERHEAD);
    }
}
