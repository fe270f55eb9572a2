//! [`GrpcChannel`]: the blocking [`Channel`] over a gRPC bidirectional stream.
//!
//! ```text
//!  protocol thread (blocking)            tokio tasks                       network
//!  ----------------------------          -----------                       -------
//!  send(msg) --chunks--> mpsc::Sender --> ReceiverStream (tonic body) -----> peer
//!  recv()  <--reassemble-- mpsc::Receiver <-- pump task <-- Streaming<Frame> <-- peer
//! ```
//!
//! The protocol runs on a thread of its own (`spawn_blocking` or a std thread) and
//! blocks on the queues through a runtime [`Handle`]; the async side never waits on
//! protocol code. Sends go straight into a bounded queue (back-pressure from HTTP/2 flow
//! control); the receive queue holds at least one message of the maximum size, so a
//! protocol in which both parties send one message before reading cannot deadlock.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use super::frame::{Chunker, FrameLimits, Reassembler};
use super::pb::{self, frame::Kind};
use crate::channel::{Channel, ChannelError};

/// Frames from the peer, as the pump task forwards them.
pub type Inbound = mpsc::Receiver<Result<pb::Frame, Status>>;

/// Outgoing frames queued ahead of the network (the capacity to give the queue behind
/// [`GrpcChannel::client`] / [`GrpcChannel::server`]).
pub const OUTBOUND_QUEUE: usize = 16;

/// How long a failed send waits for the peer's reason (see `GrpcChannel::peer_reason`).
const PEER_REASON_WAIT: Duration = Duration::from_secs(10);

/// Longest abort reason passed on or shown.
const MAX_REASON: usize = 1024;

/// Settings of one end of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// limits on what this end accepts
    pub recv: FrameLimits,
    /// limits on what this end sends (the peer's receive limits, met with ours)
    pub send: FrameLimits,
    /// how long a blocking send or receive may wait; `None` waits forever
    pub idle_timeout: Option<Duration>,
}

/// Capacity of the inbound queue: enough frames for one maximal message.
pub fn inbound_capacity(limits: &FrameLimits) -> usize {
    let frames = limits.max_message / limits.frame_limit.max(1);
    frames.clamp(16, 4096) + 1
}

/// Receive window HTTP/2 may fill ahead of the pump task: hyper's adaptive window (which
/// both ends enable) grows to at most 16 MiB (`BDP_LIMIT` in hyper's `proto/h2/ping.rs`).
pub const HTTP2_WINDOW_BYTES: usize = 16 << 20;

/// The most inbound data one session's transport holds at once, whatever its peer sends
/// (bytes): the HTTP/2 receive window, the frame tonic is decoding, the inbound queue
/// ([`inbound_capacity`] frames of at most `frame_limit + FRAME_OVERHEAD` bytes: tonic
/// refuses larger ones), the message being reassembled (at most `max_message`: a larger
/// declared length is [`ChannelError::TooLarge`] before anything is kept) and the last
/// whole message, which the protocol holds while it checks it. About 214 MiB with the
/// default limits. Protocol messages the protocol keeps beyond that are its own memory
/// (its runner's estimate), each of a length it checks as it takes it.
pub fn inbound_bytes(limits: &FrameLimits) -> u64 {
    let frame = limits.grpc_message_limit() as u64;
    let queue = (inbound_capacity(limits) as u64).saturating_mul(frame);
    (HTTP2_WINDOW_BYTES as u64)
        .saturating_add(frame)
        .saturating_add(queue)
        .saturating_add((limits.max_message as u64).saturating_mul(2))
}

/// Spawns the task that moves frames from a tonic stream into a queue; the task ends
/// when the stream ends or fails (the failure is forwarded) or the queue's receiver is
/// dropped (the stream is dropped with it, which cancels it).
pub fn spawn_pump(mut stream: Streaming<pb::Frame>, capacity: usize) -> Inbound {
    let (tx, rx) = mpsc::channel(capacity);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                item = stream.message() => match item {
                    Ok(Some(frame)) => {
                        if tx.send(Ok(frame)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                },
            }
        }
    });
    rx
}

#[derive(Debug)]
enum Outbound {
    /// the client's request stream
    Client(mpsc::Sender<pb::Frame>),
    /// the server's response stream (which can end with a status)
    Server(mpsc::Sender<Result<pb::Frame, Status>>),
}

/// One end of a session, as a blocking [`Channel`].
///
/// Must be used from a thread that is not running async tasks (a `spawn_blocking`
/// closure or a plain thread): it blocks on the runtime through a [`Handle`]. After any
/// error the channel is poisoned and returns that error again.
#[derive(Debug)]
pub struct GrpcChannel {
    out: Option<Outbound>,
    inbound: Inbound,
    handle: Handle,
    chunker: Chunker,
    reassembler: Reassembler,
    config: ChannelConfig,
    poisoned: Option<ChannelError>,
}

impl GrpcChannel {
    /// The client's end: frames go into the request stream `out`, frames come from
    /// `inbound` (see [`spawn_pump`]).
    pub fn client(
        out: mpsc::Sender<pb::Frame>,
        inbound: Inbound,
        config: ChannelConfig,
        handle: Handle,
    ) -> Self {
        Self::new(Outbound::Client(out), inbound, config, handle)
    }

    /// The server's end: frames go into the response stream `out`.
    pub fn server(
        out: mpsc::Sender<Result<pb::Frame, Status>>,
        inbound: Inbound,
        config: ChannelConfig,
        handle: Handle,
    ) -> Self {
        Self::new(Outbound::Server(out), inbound, config, handle)
    }

    fn new(out: Outbound, inbound: Inbound, config: ChannelConfig, handle: Handle) -> Self {
        Self {
            out: Some(out),
            inbound,
            handle,
            chunker: Chunker::default(),
            reassembler: Reassembler::new(config.recv),
            config,
            poisoned: None,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// Ends the session with an error the peer sees: on the server a gRPC status with
    /// `code`; on the client an abort frame, after which the client waits (at most the
    /// idle timeout) for the server to end its side, so the abort is not lost to a
    /// stream reset.
    pub fn abort(mut self, code: Code, reason: &str) {
        let reason = clip(reason);
        match self.out.take() {
            None => {}
            Some(Outbound::Server(tx)) => {
                let _ = self.block(tx.send(Err(Status::new(code, reason))));
            }
            Some(Outbound::Client(tx)) => {
                let frame = pb::Frame {
                    kind: Some(Kind::Abort(pb::Abort { reason })),
                };
                if let Ok(Ok(())) = self.block(tx.send(frame)) {
                    drop(tx);
                    let deadline = self.config.idle_timeout;
                    let inbound = &mut self.inbound;
                    let _ = block_on(&self.handle, deadline, async {
                        while let Some(Ok(_)) = inbound.recv().await {}
                    });
                }
            }
        }
    }

    /// Closes the sending side and waits for the peer to end its side: anything but
    /// a clean end after the last whole message is an error. The client calls this
    /// after its protocol returned, so a failure on the server still reaches it.
    pub fn finish(mut self) -> Result<(), ChannelError> {
        if let Some(e) = self.poisoned.take() {
            return Err(e);
        }
        self.out = None;
        let item = block_on(&self.handle, self.config.idle_timeout, self.inbound.recv())?;
        match item {
            None => self.reassembler.finish(),
            Some(Err(status)) => Err(status_error(&status)),
            Some(Ok(_)) => Err(ChannelError::Malformed(
                "the peer sent more after the protocol's last message".into(),
            )),
        }
    }

    fn block<F: Future>(&self, f: F) -> Result<F::Output, ChannelError> {
        block_on(&self.handle, self.config.idle_timeout, f)
    }

    fn check(&self) -> Result<(), ChannelError> {
        match &self.poisoned {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn poison<T>(&mut self, r: Result<T, ChannelError>) -> Result<T, ChannelError> {
        if let Err(e) = &r {
            self.poisoned = Some(e.clone());
        }
        r
    }

    fn push(&mut self, chunk: pb::Chunk) -> Result<(), ChannelError> {
        let frame = pb::Frame {
            kind: Some(Kind::Chunk(chunk)),
        };
        let sent = match &self.out {
            None => return Err(ChannelError::Closed),
            Some(Outbound::Client(tx)) => self.block(tx.send(frame))?.is_ok(),
            Some(Outbound::Server(tx)) => self.block(tx.send(Ok(frame)))?.is_ok(),
        };
        if sent {
            Ok(())
        } else {
            Err(self.peer_reason())
        }
    }

    /// After a send found the stream closed: the reason the peer ended the session (its
    /// status, or its abort frame, queued behind data this side will no longer read),
    /// waiting at most [`PEER_REASON_WAIT`]; `Closed` if it gave none. A peer that
    /// refuses a request while this side is still sending thus reaches this side by
    /// name, not as a bare `Closed`.
    fn peer_reason(&mut self) -> ChannelError {
        let wait = self
            .config
            .idle_timeout
            .map_or(PEER_REASON_WAIT, |t| t.min(PEER_REASON_WAIT));
        loop {
            match block_on(&self.handle, Some(wait), self.inbound.recv()) {
                Ok(Some(Err(status))) => return status_error(&status),
                Ok(Some(Ok(pb::Frame {
                    kind: Some(Kind::Abort(a)),
                }))) => {
                    return ChannelError::Transport(format!(
                        "the peer aborted the session: {}",
                        clip(&a.reason)
                    ));
                }
                Ok(Some(Ok(_))) => {}
                Ok(None) | Err(_) => return ChannelError::Closed,
            }
        }
    }

    fn send_inner(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        for chunk in self.chunker.split(msg, self.config.send.frame_limit) {
            self.push(chunk)?;
        }
        Ok(())
    }

    fn recv_inner(&mut self) -> Result<Vec<u8>, ChannelError> {
        loop {
            let item = block_on(&self.handle, self.config.idle_timeout, self.inbound.recv())?;
            let frame = match item {
                None => {
                    self.reassembler.finish()?;
                    return Err(ChannelError::Closed);
                }
                Some(Err(status)) => return Err(status_error(&status)),
                Some(Ok(frame)) => frame,
            };
            match frame.kind {
                Some(Kind::Chunk(c)) => {
                    if let Some(msg) = self.reassembler.push(c)? {
                        return Ok(msg);
                    }
                }
                Some(Kind::Abort(a)) => {
                    return Err(ChannelError::Transport(format!(
                        "the peer aborted the session: {}",
                        clip(&a.reason)
                    )));
                }
                Some(Kind::Start(_)) | Some(Kind::Accepted(_)) => {
                    return Err(ChannelError::Malformed(
                        "a start or accepted frame inside a session".into(),
                    ));
                }
                None => return Err(ChannelError::Malformed("a frame with no content".into())),
            }
        }
    }
}

impl Channel for GrpcChannel {
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        self.send_vec(msg.to_vec())
    }

    fn send_vec(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        self.check()?;
        if msg.len() > self.config.send.max_message {
            // refused locally, nothing sent: the session stays usable
            return Err(ChannelError::TooLarge {
                actual: msg.len(),
                limit: self.config.send.max_message,
            });
        }
        let r = self.send_inner(msg);
        self.poison(r)
    }

    fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        self.check()?;
        let r = self.recv_inner();
        self.poison(r)
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        // sends are handed to the stream as they are made
        self.check()
    }
}

fn block_on<F: Future>(
    handle: &Handle,
    timeout: Option<Duration>,
    f: F,
) -> Result<F::Output, ChannelError> {
    match timeout {
        None => Ok(handle.block_on(f)),
        // the timer must be made inside the runtime's context, hence the async block
        Some(t) => handle
            .block_on(async move { tokio::time::timeout(t, f).await })
            .map_err(|_| ChannelError::Timeout(t)),
    }
}

/// The transport error for a status received on the stream.
pub fn status_error(status: &Status) -> ChannelError {
    ChannelError::PeerStatus {
        code: status.code() as i32,
        name: format!("{:?}", status.code()),
        message: clip(status.message()),
    }
}

/// The peer's status in a channel error: the inverse of [`status_error`].
///
/// A refusal that ends a session after it started (a batch over the budget, logits asked
/// of a labels-only server) reaches the protocol as [`ChannelError::PeerStatus`]; this
/// gives back its gRPC code and message, `None` for every other error (an abort frame, a
/// closed stream, a local failure).
pub fn peer_status(err: &ChannelError) -> Option<(Code, &str)> {
    match err {
        ChannelError::PeerStatus { code, message, .. } => {
            Some((Code::from_i32(*code), message.as_str()))
        }
        _ => None,
    }
}

/// The gRPC code a session ends with when its channel fails with `err`.
pub fn status_code(err: &ChannelError) -> Code {
    match err {
        ChannelError::TooLarge { .. } | ChannelError::FrameTooLarge { .. } => {
            Code::ResourceExhausted
        }
        ChannelError::LengthMismatch { .. }
        | ChannelError::Truncated { .. }
        | ChannelError::Malformed(_) => Code::InvalidArgument,
        ChannelError::Timeout(_) => Code::DeadlineExceeded,
        ChannelError::Closed | ChannelError::Transport(_) | ChannelError::PeerStatus { .. } => {
            Code::Aborted
        }
    }
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_REASON {
        return s.to_owned();
    }
    let mut end = MAX_REASON;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::MIN_FRAME_LIMIT;

    fn config(frame: usize, max: usize, timeout_ms: Option<u64>) -> ChannelConfig {
        let l = FrameLimits {
            frame_limit: frame,
            max_message: max,
        };
        ChannelConfig {
            recv: l,
            send: l,
            idle_timeout: timeout_ms.map(Duration::from_millis),
        }
    }

    /// A client end whose outbound frames land in the returned receiver, and a sender
    /// that plays the server's frames into its inbound queue.
    fn client_end(
        cfg: ChannelConfig,
        rt: &tokio::runtime::Runtime,
    ) -> (
        GrpcChannel,
        mpsc::Receiver<pb::Frame>,
        mpsc::Sender<Result<pb::Frame, Status>>,
    ) {
        let (out_tx, out_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::channel(1024);
        let ch = GrpcChannel::client(out_tx, in_rx, cfg, rt.handle().clone());
        (ch, out_rx, in_tx)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_send_into_a_closed_stream_reports_the_peers_reason() {
        let rt = runtime();
        let cfg = config(MIN_FRAME_LIMIT, 1 << 20, Some(5_000));
        // the peer refused (status) while we were sending: its data before the status
        // is skipped, the status is the error
        let (mut ch, out_rx, in_tx) = client_end(cfg, &rt);
        drop(out_rx);
        let data = pb::Frame {
            kind: Some(Kind::Chunk(pb::Chunk {
                payload: vec![1, 2, 3],
                ..Default::default()
            })),
        };
        rt.block_on(async {
            in_tx.send(Ok(data)).await.unwrap();
            in_tx
                .send(Err(Status::failed_precondition("batch refused: no")))
                .await
                .unwrap();
        });
        let e = ch.send(b"x").unwrap_err();
        assert!(
            matches!(&e, ChannelError::PeerStatus { name, message, .. } if name == "FailedPrecondition" && message == "batch refused: no"),
            "{e}"
        );
        // and the channel stays failed with that error
        assert!(matches!(ch.recv(), Err(ChannelError::PeerStatus { .. })));
        // a peer that went away without a reason: Closed
        let (mut ch, out_rx, in_tx) = client_end(cfg, &rt);
        drop((out_rx, in_tx));
        assert!(matches!(ch.send(b"x"), Err(ChannelError::Closed)));
    }

    #[test]
    fn large_messages_travel_in_frames_and_come_back_whole() {
        let rt = runtime();
        let cfg = config(MIN_FRAME_LIMIT, 1 << 20, Some(5_000));
        let (mut ch, mut out_rx, in_tx) = client_end(cfg, &rt);
        let msg: Vec<u8> = (0..3 * MIN_FRAME_LIMIT + 5).map(|i| i as u8).collect();
        ch.send(&msg).unwrap();
        ch.send(b"").unwrap();
        let mut frames = vec![];
        while let Ok(f) = out_rx.try_recv() {
            frames.push(f);
        }
        assert_eq!(
            frames.len(),
            5,
            "4 chunks for the large message, 1 for the empty one"
        );
        for f in &frames {
            match &f.kind {
                Some(Kind::Chunk(c)) => assert!(c.payload.len() <= MIN_FRAME_LIMIT),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        // play them back as if the peer had echoed them
        for f in frames {
            in_tx.blocking_send(Ok(f)).unwrap();
        }
        assert_eq!(ch.recv().unwrap(), msg);
        assert_eq!(ch.recv().unwrap(), b"");
        drop(in_tx);
        assert!(matches!(ch.recv(), Err(ChannelError::Closed)));
    }

    #[test]
    fn a_message_over_the_send_limit_is_refused_without_poisoning() {
        let rt = runtime();
        let (mut ch, mut out_rx, in_tx) = client_end(config(MIN_FRAME_LIMIT, 8192, None), &rt);
        assert!(matches!(
            ch.send(&[0; 8193]),
            Err(ChannelError::TooLarge {
                actual: 8193,
                limit: 8192
            })
        ));
        assert!(out_rx.try_recv().is_err(), "nothing was sent");
        ch.send(&[1; 10]).unwrap();
        assert!(out_rx.try_recv().is_ok());
        drop(in_tx);
    }

    #[test]
    fn stream_end_mid_message_is_truncated_and_poisons() {
        let rt = runtime();
        let (mut ch, _out_rx, in_tx) = client_end(config(MIN_FRAME_LIMIT, 1 << 20, None), &rt);
        let mut chunker = Chunker::default();
        let chunks: Vec<_> = chunker
            .split(vec![7; 2 * MIN_FRAME_LIMIT + 1], MIN_FRAME_LIMIT)
            .collect();
        in_tx
            .blocking_send(Ok(pb::Frame {
                kind: Some(Kind::Chunk(chunks[0].clone())),
            }))
            .unwrap();
        drop(in_tx);
        let expect = |r: Result<Vec<u8>, ChannelError>| {
            assert!(
                matches!(
                    r,
                    Err(ChannelError::Truncated {
                        expected,
                        received
                    }) if expected == 2 * MIN_FRAME_LIMIT + 1 && received == MIN_FRAME_LIMIT
                ),
                "{r:?}"
            )
        };
        expect(ch.recv());
        expect(ch.recv());
        assert!(ch.send(b"x").is_err(), "poisoned");
    }

    #[test]
    fn over_limit_frame_status_abort_and_empty_frames_are_named() {
        let rt = runtime();
        let frame = |kind| Ok(pb::Frame { kind });
        let cases: Vec<(Result<pb::Frame, Status>, &str)> = vec![
            (
                frame(Some(Kind::Chunk(pb::Chunk {
                    seq: 0,
                    offset: 0,
                    total_len: MIN_FRAME_LIMIT as u64 + 1,
                    payload: vec![0; MIN_FRAME_LIMIT + 1],
                }))),
                "frame-too-large",
            ),
            (Err(Status::resource_exhausted("no")), "transport"),
            (
                frame(Some(Kind::Abort(pb::Abort {
                    reason: "x".repeat(5000),
                }))),
                "abort",
            ),
            (frame(Some(Kind::Start(pb::Start::default()))), "malformed"),
            (frame(None), "malformed"),
        ];
        for (item, want) in cases {
            let (mut ch, _o, in_tx) = client_end(config(MIN_FRAME_LIMIT, 1 << 20, None), &rt);
            in_tx.blocking_send(item).unwrap();
            let r = ch.recv();
            let ok = match (&r, want) {
                (Err(ChannelError::FrameTooLarge { .. }), "frame-too-large") => true,
                (Err(ChannelError::PeerStatus { name, .. }), "transport") => {
                    name == "ResourceExhausted"
                }
                (Err(ChannelError::Transport(m)), "abort") => {
                    m.contains("aborted") && m.len() < MAX_REASON + 100
                }
                (Err(ChannelError::Malformed(_)), "malformed") => true,
                _ => false,
            };
            assert!(ok, "{want}: {r:?}");
        }
    }

    #[test]
    fn peer_status_reads_back_the_code_and_message() {
        for code in [
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::InvalidArgument,
            Code::Aborted,
            Code::Ok,
            Code::Unauthenticated,
        ] {
            let e = status_error(&Status::new(code, "batch refused: x: y"));
            assert_eq!(peer_status(&e), Some((code, "batch refused: x: y")), "{e}");
        }
        // not a status: an abort frame, other errors, a text that only looks like one
        let abort = ChannelError::Transport("the peer aborted the session: no".into());
        assert_eq!(peer_status(&abort), None);
        assert_eq!(peer_status(&ChannelError::Closed), None);
        assert_eq!(
            peer_status(&ChannelError::Transport("ResourceExhausted: budget".into())),
            None
        );
        // the error's text still names the code and the message
        let e = status_error(&Status::resource_exhausted("budget exhausted: 4 of 2"));
        assert_eq!(
            e.to_string(),
            "the peer ended the session: ResourceExhausted: budget exhausted: 4 of 2"
        );
    }

    #[test]
    fn idle_receive_times_out() {
        let rt = runtime();
        let (mut ch, _o, _in_tx) = client_end(config(MIN_FRAME_LIMIT, 1 << 20, Some(20)), &rt);
        assert!(matches!(ch.recv(), Err(ChannelError::Timeout(_))));
    }

    #[test]
    fn finish_reports_the_peers_final_status() {
        let rt = runtime();
        let (ch, _o, in_tx) = client_end(config(MIN_FRAME_LIMIT, 1 << 20, Some(5_000)), &rt);
        in_tx
            .blocking_send(Err(Status::invalid_argument("bad rows")))
            .unwrap();
        assert!(matches!(
            ch.finish(),
            Err(ChannelError::PeerStatus { name, message, .. }) if name == "InvalidArgument" && message == "bad rows"
        ));
        let (ch, _o, in_tx) = client_end(config(MIN_FRAME_LIMIT, 1 << 20, Some(5_000)), &rt);
        drop(in_tx);
        assert!(ch.finish().is_ok());
    }

    #[test]
    fn client_abort_sends_an_abort_frame() {
        let rt = runtime();
        let (ch, mut out_rx, in_tx) =
            client_end(config(MIN_FRAME_LIMIT, 1 << 20, Some(5_000)), &rt);
        // the server ends its side: the abort does not wait for the timeout
        drop(in_tx);
        ch.abort(Code::Aborted, "check failed");
        match out_rx.try_recv() {
            Ok(pb::Frame {
                kind: Some(Kind::Abort(a)),
            }) => assert_eq!(a.reason, "check failed"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_codes_for_channel_errors() {
        assert_eq!(
            status_code(&ChannelError::FrameTooLarge {
                actual: 2,
                limit: 1
            }),
            Code::ResourceExhausted
        );
        assert_eq!(
            status_code(&ChannelError::Truncated {
                expected: 2,
                received: 1
            }),
            Code::InvalidArgument
        );
        assert_eq!(
            status_code(&ChannelError::Timeout(Duration::from_secs(1))),
            Code::DeadlineExceeded
        );
        assert_eq!(status_code(&ChannelError::Closed), Code::Aborted);
    }
}
