//! The one transport abstraction every two-party protocol is written against.
//!
//! A [`Channel`] carries whole messages (byte strings) in order between the two parties.
//! It is blocking: protocol code is plain synchronous Rust and runs on its own thread; the
//! gRPC adapter in [`crate::net`] bridges it to the async stream. Implementations here:
//!
//! - [`MemoryChannel`]: an in-memory duplex for tests and benches ([`memory_pair`]);
//! - [`Counting`]: a wrapper that records, per named protocol step, bytes and messages each
//!   way, rounds and wall time. Every cost report in the project comes from it.
//!
//! A *round* here is one flight in one direction: the counter goes up each time the
//! direction of traffic changes (the first message of a session counts as one flight).
//! A request followed by its answer is therefore two rounds.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Default limit on one message: 1 GiB. Protocol messages are far smaller; the limit only
/// stops a peer from making us allocate without bound.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 30;

/// Errors of the transport.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer closed its end (or went away) before the message arrived.
    #[error("the peer closed the channel")]
    Closed,
    /// A message over the size limit (sent or received).
    #[error("message of {actual} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// bytes in the message
        actual: usize,
        /// the limit
        limit: usize,
    },
    /// A message whose length is not the one the protocol expects at this point.
    #[error("expected a message of {expected} bytes, got {actual}")]
    LengthMismatch {
        /// bytes expected
        expected: usize,
        /// bytes received
        actual: usize,
    },
    /// One transport frame over the frame limit.
    #[error("frame of {actual} bytes exceeds the frame limit of {limit} bytes")]
    FrameTooLarge {
        /// payload bytes in the frame
        actual: usize,
        /// the limit
        limit: usize,
    },
    /// A multi-frame message that ended early: the stream closed, or the next message
    /// began, before all of its bytes arrived.
    #[error("truncated message: expected {expected} bytes, got {received} before it ended")]
    Truncated {
        /// bytes the message declared
        expected: usize,
        /// bytes that arrived
        received: usize,
    },
    /// A malformed frame from the transport (e.g. an inconsistent chunk sequence).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// No message within the receive timeout.
    #[error("no message from the peer within {0:?}")]
    Timeout(Duration),
    /// The peer (or the transport) reported an error and ended the session.
    #[error("transport error: {0}")]
    Transport(String),
    /// The peer ended the session with a status: a refusal (a policy, a budget, a bad
    /// request) or a failure on its side. `code` is the status code of the transport (gRPC
    /// codes for the product's transport), `name` its name.
    #[error("the peer ended the session: {name}: {message}")]
    PeerStatus {
        /// the numeric status code
        code: i32,
        /// the code's name (e.g. `ResourceExhausted`)
        name: String,
        /// the peer's message
        message: String,
    },
}

/// A reliable, ordered, message-oriented, blocking duplex to the other party.
pub trait Channel: Send {
    /// Queues one message for the peer. It may be buffered until [`Channel::flush`] or the
    /// next [`Channel::recv`].
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError>;

    /// Receives the next message whole. Flushes pending sends first.
    fn recv(&mut self) -> Result<Vec<u8>, ChannelError>;

    /// Pushes every queued message to the peer.
    fn flush(&mut self) -> Result<(), ChannelError>;

    /// Names the protocol step that the following traffic belongs to (for cost reports).
    /// Transports ignore it; [`Counting`] records it.
    fn set_step(&mut self, _step: &str) {}

    /// Sends an owned message (avoids a copy where the transport can take ownership).
    fn send_vec(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        self.send(&msg)
    }

    /// Receives the next message and checks that it has exactly `len` bytes.
    fn recv_exact(&mut self, len: usize) -> Result<Vec<u8>, ChannelError> {
        let m = self.recv()?;
        if m.len() != len {
            return Err(ChannelError::LengthMismatch {
                expected: len,
                actual: m.len(),
            });
        }
        Ok(m)
    }
}

impl<C: Channel + ?Sized> Channel for &mut C {
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        (**self).send(msg)
    }
    fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        (**self).recv()
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        (**self).flush()
    }
    fn set_step(&mut self, step: &str) {
        (**self).set_step(step)
    }
    fn send_vec(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        (**self).send_vec(msg)
    }
}

impl<C: Channel + ?Sized> Channel for Box<C> {
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        (**self).send(msg)
    }
    fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        (**self).recv()
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        (**self).flush()
    }
    fn set_step(&mut self, step: &str) {
        (**self).set_step(step)
    }
    fn send_vec(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        (**self).send_vec(msg)
    }
}

/// One end of an in-memory duplex. Made in pairs by [`memory_pair`].
#[derive(Debug)]
pub struct MemoryChannel {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
    max_message: usize,
    timeout: Option<Duration>,
}

/// Two connected in-memory channel ends.
pub fn memory_pair() -> (MemoryChannel, MemoryChannel) {
    let (tx_a, rx_b) = mpsc::channel();
    let (tx_b, rx_a) = mpsc::channel();
    let mk = |tx, rx| MemoryChannel {
        tx,
        rx,
        max_message: DEFAULT_MAX_MESSAGE,
        timeout: None,
    };
    (mk(tx_a, rx_a), mk(tx_b, rx_b))
}

impl MemoryChannel {
    /// Sets the largest message this end sends or accepts.
    pub fn with_max_message(mut self, max: usize) -> Self {
        self.max_message = max;
        self
    }

    /// Makes `recv` fail with [`ChannelError::Timeout`] after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl Channel for MemoryChannel {
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        self.send_vec(msg.to_vec())
    }

    fn send_vec(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        if msg.len() > self.max_message {
            return Err(ChannelError::TooLarge {
                actual: msg.len(),
                limit: self.max_message,
            });
        }
        self.tx.send(msg).map_err(|_| ChannelError::Closed)
    }

    fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        let m = match self.timeout {
            None => self.rx.recv().map_err(|_| ChannelError::Closed)?,
            Some(t) => self.rx.recv_timeout(t).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => ChannelError::Timeout(t),
                mpsc::RecvTimeoutError::Disconnected => ChannelError::Closed,
            })?,
        };
        if m.len() > self.max_message {
            return Err(ChannelError::TooLarge {
                actual: m.len(),
                limit: self.max_message,
            });
        }
        Ok(m)
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// Costs of one protocol step, as seen by one party.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepCost {
    /// the step's name, e.g. `setup/base-ot` or `layer1/relu`
    pub step: String,
    /// payload bytes this party sent
    pub bytes_sent: u64,
    /// payload bytes this party received
    pub bytes_received: u64,
    /// messages sent
    pub messages_sent: u64,
    /// messages received
    pub messages_received: u64,
    /// flights (direction changes) that started in this step
    pub rounds: u64,
    /// wall time spent in this step, seconds
    pub seconds: f64,
}

impl StepCost {
    fn named(step: &str) -> Self {
        Self {
            step: step.to_owned(),
            ..Self::default()
        }
    }

    /// Adds another step's counters into this one (the name is kept).
    pub fn absorb(&mut self, other: &StepCost) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.messages_sent += other.messages_sent;
        self.messages_received += other.messages_received;
        self.rounds += other.rounds;
        self.seconds += other.seconds;
    }

    /// Bytes both ways.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }
}

/// The per-step costs of a run, in the order the steps first appeared.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CostReport {
    /// one entry per distinct step name
    pub steps: Vec<StepCost>,
}

impl CostReport {
    /// The sum over all steps, named `name`.
    pub fn total(&self, name: &str) -> StepCost {
        self.sum_where(name, |_| true)
    }

    /// The sum over the steps whose name starts with `prefix`.
    pub fn total_with_prefix(&self, prefix: &str) -> StepCost {
        self.sum_where(prefix, |s| s.step.starts_with(prefix))
    }

    fn sum_where(&self, name: &str, keep: impl Fn(&StepCost) -> bool) -> StepCost {
        let mut t = StepCost::named(name);
        for s in self.steps.iter().filter(|s| keep(s)) {
            t.absorb(s);
        }
        t
    }

    /// Merges another report's steps into this one, by step name.
    pub fn merge(&mut self, other: &CostReport) {
        for s in &other.steps {
            match self.steps.iter_mut().find(|x| x.step == s.step) {
                Some(x) => x.absorb(s),
                None => self.steps.push(s.clone()),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Sent,
    Received,
}

/// A channel wrapper that counts traffic per named step.
#[derive(Debug)]
pub struct Counting<C> {
    inner: C,
    report: CostReport,
    current: usize,
    last: Option<Direction>,
    step_started: Instant,
}

impl<C: Channel> Counting<C> {
    /// Wraps `inner`; traffic before the first [`Channel::set_step`] goes to step `"-"`.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            report: CostReport {
                steps: vec![StepCost::named("-")],
            },
            current: 0,
            last: None,
            step_started: Instant::now(),
        }
    }

    /// The costs so far (the current step's time included up to now).
    pub fn report(&self) -> CostReport {
        let mut r = self.report.clone();
        r.steps[self.current].seconds += self.step_started.elapsed().as_secs_f64();
        r.steps
            .retain(|s| s.step != "-" || s.bytes_total() > 0 || s.rounds > 0);
        r
    }

    /// Ends counting and returns the inner channel and the report.
    pub fn into_parts(self) -> (C, CostReport) {
        let r = self.report();
        (self.inner, r)
    }

    /// The wrapped channel.
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    fn note(&mut self, dir: Direction, bytes: usize) {
        let s = &mut self.report.steps[self.current];
        if self.last != Some(dir) {
            s.rounds += 1;
            self.last = Some(dir);
        }
        match dir {
            Direction::Sent => {
                s.bytes_sent += bytes as u64;
                s.messages_sent += 1;
            }
            Direction::Received => {
                s.bytes_received += bytes as u64;
                s.messages_received += 1;
            }
        }
    }
}

impl<C: Channel> Channel for Counting<C> {
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        self.inner.send(msg)?;
        self.note(Direction::Sent, msg.len());
        Ok(())
    }

    fn send_vec(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        let n = msg.len();
        self.inner.send_vec(msg)?;
        self.note(Direction::Sent, n);
        Ok(())
    }

    fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        let m = self.inner.recv()?;
        self.note(Direction::Received, m.len());
        Ok(m)
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        self.inner.flush()
    }

    fn set_step(&mut self, step: &str) {
        let now = Instant::now();
        self.report.steps[self.current].seconds += (now - self.step_started).as_secs_f64();
        self.step_started = now;
        self.current = match self.report.steps.iter().position(|s| s.step == step) {
            Some(i) => i,
            None => {
                self.report.steps.push(StepCost::named(step));
                self.report.steps.len() - 1
            }
        };
        self.inner.set_step(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_duplex_carries_messages_in_order() {
        let (mut a, mut b) = memory_pair();
        a.send(b"one").unwrap();
        a.send(b"").unwrap();
        a.send_vec(vec![7; 1000]).unwrap();
        assert_eq!(b.recv().unwrap(), b"one");
        assert_eq!(b.recv().unwrap(), b"");
        assert_eq!(b.recv_exact(1000).unwrap(), vec![7; 1000]);
        b.send(b"back").unwrap();
        assert!(matches!(
            a.recv_exact(3),
            Err(ChannelError::LengthMismatch {
                expected: 3,
                actual: 4
            })
        ));
    }

    #[test]
    fn closed_and_oversized_are_named() {
        let (a, mut b) = memory_pair();
        let mut a = a.with_max_message(4);
        assert!(matches!(
            a.send(b"12345"),
            Err(ChannelError::TooLarge {
                actual: 5,
                limit: 4
            })
        ));
        b.send(b"123456").unwrap();
        assert!(matches!(a.recv(), Err(ChannelError::TooLarge { .. })));
        drop(a);
        assert!(matches!(b.recv(), Err(ChannelError::Closed)));
        let (c, _d) = memory_pair();
        let mut c = c.with_timeout(Duration::from_millis(10));
        assert!(matches!(c.recv(), Err(ChannelError::Timeout(_))));
    }

    #[test]
    fn counting_records_bytes_messages_and_flights_per_step() {
        let (a, b) = memory_pair();
        let (mut a, mut b) = (Counting::new(a), Counting::new(b));
        a.set_step("setup");
        b.set_step("setup");
        a.send(&[0; 10]).unwrap();
        a.send(&[0; 5]).unwrap();
        b.recv().unwrap();
        b.recv().unwrap();
        b.send(&[0; 3]).unwrap();
        a.recv().unwrap();
        a.set_step("online");
        b.set_step("online");
        a.send(&[0; 1]).unwrap();
        b.recv().unwrap();

        let ra = a.report();
        assert_eq!(ra.steps.len(), 2);
        let s = &ra.steps[0];
        assert_eq!(
            (s.step.as_str(), s.bytes_sent, s.bytes_received),
            ("setup", 15, 3)
        );
        assert_eq!((s.messages_sent, s.messages_received, s.rounds), (2, 1, 2));
        let o = &ra.steps[1];
        assert_eq!((o.bytes_sent, o.rounds), (1, 1));
        let t = ra.total("all");
        assert_eq!((t.bytes_sent, t.bytes_received, t.rounds), (16, 3, 3));

        let rb = b.report();
        assert_eq!(rb.total_with_prefix("setup").bytes_received, 15);
        assert_eq!(rb.total("all").rounds, 3);
    }
}
