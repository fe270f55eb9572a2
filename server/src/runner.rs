//! Backends on the server side: a registry from backend name to a [`SessionRunner`],
//! the blocking function that plays the server's role over the session's channel.
//!
//! A later backend registers itself like this (the function runs on a blocking thread,
//! with the channel wrapped in [`fusion_common::channel::Counting`]):
//!
//! ```no_run
//! use fusion_common::channel::Channel;
//! use fusion_server::runner::{Registry, RunnerError, StartInfo};
//! use fusion_server::state::ServerState;
//!
//! fn my_backend(
//!     ch: &mut dyn Channel,
//!     start: &StartInfo,
//!     state: &ServerState,
//! ) -> Result<(), RunnerError> {
//!     ch.set_step("online");
//!     let msg = ch.recv()?;
//!     ch.send(&msg)?;
//!     Ok(())
//! }
//!
//! let mut registry = Registry::with_builtins();
//! registry.register("mine", my_backend).unwrap();
//! ```
//!
//! A runner that needs to refuse a start before the session is accepted (and before the
//! budget is charged), e.g. because `cols` does not match the model, implements
//! [`SessionRunner::check_start`].

use std::collections::{BTreeMap, btree_map::Entry};
use std::error::Error as StdError;
use std::sync::Arc;

use fusion_common::channel::{Channel, ChannelError};
use fusion_common::net::info::OutputMode;
use fusion_common::net::session::SessionStart;
use fusion_common::net::stream::{inbound_bytes, status_code};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Code, Status};

use crate::service::ClientShare;
use crate::state::ServerState;

/// The share of the server's memory cap a session holds (see
/// [`SessionLimits::max_memory`](crate::state::SessionLimits::max_memory)), released when
/// its last clone is dropped: a runner that frees its state on another thread moves a
/// clone there, so the memory counts until it is really free. Empty without a cap.
/// The same MiB count against the client's share of the cap
/// ([`SessionLimits::max_client_memory`](crate::state::SessionLimits::max_client_memory))
/// until then.
#[derive(Clone, Default)]
pub struct MemoryHold(Option<Arc<Held>>);

/// The permits of a [`MemoryHold`] and its count in the client's share, given back
/// together when dropped.
struct Held {
    permit: OwnedSemaphorePermit,
    _share: ClientShare,
}

impl MemoryHold {
    /// A hold of `permit` (one permit per MiB), counted in the client's `share`.
    pub(crate) fn new(permit: OwnedSemaphorePermit, share: ClientShare) -> Self {
        Self(Some(Arc::new(Held {
            permit,
            _share: share,
        })))
    }

    /// MiB held (0 without a cap).
    pub fn mib(&self) -> usize {
        self.0.as_ref().map_or(0, |h| h.permit.num_permits())
    }
}

impl std::fmt::Debug for MemoryHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryHold({} MiB)", self.mib())
    }
}

/// What a runner knows about its session (all of it public).
#[derive(Debug, Clone)]
pub struct StartInfo {
    /// the server's number for the session
    pub session_id: u64,
    /// the client's certificate subject
    pub client: String,
    /// the backend name
    pub backend: String,
    /// batch rows (already charged)
    pub rows: u64,
    /// columns per row
    pub cols: u64,
    /// the output mode in force
    pub output: OutputMode,
    /// the parameters the client declared
    pub params: BTreeMap<String, String>,
    /// the session's share of the server's memory cap
    pub memory: MemoryHold,
}

/// A start the server will not run, with the gRPC code the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// the status code
    pub code: Code,
    /// what the client is told
    pub message: String,
}

impl Refusal {
    /// A malformed request (`INVALID_ARGUMENT`).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: Code::InvalidArgument,
            message: message.into(),
        }
    }

    /// A request the policy does not allow (`FAILED_PRECONDITION`).
    pub fn policy(message: impl Into<String>) -> Self {
        Self {
            code: Code::FailedPrecondition,
            message: message.into(),
        }
    }

    /// The status sent to the client.
    pub fn to_status(&self) -> Status {
        Status::new(self.code, self.message.clone())
    }
}

/// Why a session failed after it was accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The transport failed (closed early, truncated, too large, timed out, ...).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The backend's protocol failed (a message that does not decode, a check that fails).
    #[error("{backend}: {source}")]
    Protocol {
        /// the backend
        backend: String,
        /// its error
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The backend refused a request inside the session (e.g. a batch against the
    /// policy); the session ends with the refusal's code and message.
    #[error("{0}")]
    Refused(Refusal),
    /// The runner panicked (a bug); the session ends with `INTERNAL`.
    #[error("the {backend} runner failed internally")]
    Panicked {
        /// the backend
        backend: String,
    },
}

impl RunnerError {
    /// Wraps a backend's own error.
    pub fn protocol(backend: &str, err: impl StdError + Send + Sync + 'static) -> Self {
        RunnerError::Protocol {
            backend: backend.to_owned(),
            source: Box::new(err),
        }
    }

    /// The gRPC code the session ends with.
    pub fn code(&self) -> Code {
        match self {
            RunnerError::Channel(e) => status_code(e),
            RunnerError::Protocol { .. } => Code::Aborted,
            RunnerError::Refused(r) => r.code,
            RunnerError::Panicked { .. } => Code::Internal,
        }
    }
}

/// The server's role of one backend.
pub trait SessionRunner: Send + Sync + 'static {
    /// Checks a start before the session is accepted and the budget charged. The
    /// policy checks (backend offered, rows, output mode) are already done.
    fn check_start(&self, _start: &SessionStart, _state: &ServerState) -> Result<(), Refusal> {
        Ok(())
    }

    /// Whether the backend needs a served model: without one the server does not offer
    /// it.
    fn needs_model(&self) -> bool {
        false
    }

    /// Whether the backend charges the client's budget itself, per batch inside the
    /// session (then the session start is not charged; it is refused only when the
    /// budget is already spent).
    fn charges_per_batch(&self) -> bool {
        false
    }

    /// The most memory the runner of a session started with `start` may hold at once,
    /// bytes, not counting the session's transport: the server charges each session this
    /// plus the inbound data its transport may hold ([`admission_memory`]) and admits
    /// sessions while their charges fit its cap
    /// ([`SessionLimits::max_memory`](crate::state::SessionLimits::max_memory)). The
    /// policy checks are done. Default: 0 (a runner that holds little beyond what it
    /// receives). `u64::MAX` says the runner cannot estimate the session: under a cap it
    /// is refused (`RESOURCE_EXHAUSTED`), without one it runs.
    fn memory_estimate(&self, _start: &SessionStart, _state: &ServerState) -> u64 {
        0
    }

    /// Runs the server's side of the protocol to the end. Called on a blocking thread.
    fn run(
        &self,
        ch: &mut dyn Channel,
        start: &StartInfo,
        state: &ServerState,
    ) -> Result<(), RunnerError>;
}

impl<F> SessionRunner for F
where
    F: Fn(&mut dyn Channel, &StartInfo, &ServerState) -> Result<(), RunnerError>
        + Send
        + Sync
        + 'static,
{
    fn run(
        &self,
        ch: &mut dyn Channel,
        start: &StartInfo,
        state: &ServerState,
    ) -> Result<(), RunnerError> {
        self(ch, start, state)
    }
}

/// What the server charges a session started with `start` against its memory cap, bytes:
/// the runner's [`SessionRunner::memory_estimate`] plus the most inbound data the
/// session's transport may hold whatever the client sends ([`inbound_bytes`] of the
/// server's frame limits: about 214 MiB with the defaults), which any session may be
/// sent, whatever its backend (an `echo` session too); `u64::MAX` (not estimated) where
/// the runner's estimate is.
pub fn admission_memory(
    runner: &dyn SessionRunner,
    start: &SessionStart,
    state: &ServerState,
) -> u64 {
    match runner.memory_estimate(start, state) {
        u64::MAX => u64::MAX,
        m => m.saturating_add(inbound_bytes(&state.limits.frames)),
    }
}

/// Registration refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A name that clients could not send (see `fusion_common::net::session`).
    #[error("invalid backend name {0:?}: use [a-z0-9_-], at most 32 characters")]
    BadName(String),
    /// The name is taken.
    #[error("backend {0:?} is already registered")]
    Duplicate(String),
}

/// Backend name -> runner.
#[derive(Clone, Default)]
pub struct Registry {
    runners: BTreeMap<String, Arc<dyn SessionRunner>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backends", &self.names())
            .finish()
    }
}

impl Registry {
    /// No backends.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The backends this crate provides: `echo` (diagnostic) and the secure-inference
    /// families of [`crate::backends`] (`cheetah`), which are offered only when a model
    /// is served.
    pub fn with_builtins() -> Self {
        let mut r = Self::empty();
        r.runners.insert(ECHO.to_owned(), Arc::new(echo));
        crate::backends::register_all(&mut r);
        r
    }

    /// Adds a backend.
    pub fn register(
        &mut self,
        name: &str,
        runner: impl SessionRunner,
    ) -> Result<&mut Self, RegistryError> {
        let valid = !name.is_empty()
            && name.len() <= fusion_common::net::session::MAX_BACKEND_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        match self.runners.entry(name.to_owned()) {
            Entry::Occupied(_) => Err(RegistryError::Duplicate(name.to_owned())),
            Entry::Vacant(v) => {
                v.insert(Arc::new(runner));
                Ok(self)
            }
        }
    }

    /// The runner for `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn SessionRunner>> {
        self.runners.get(name).cloned()
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.runners.keys().cloned().collect()
    }
}

/// The diagnostic backend's name.
pub const ECHO: &str = "echo";

/// Diagnostic backend: sends every message back unchanged until the client ends the
/// stream. Used by the demo's measured echo and by the tests.
pub fn echo(
    ch: &mut dyn Channel,
    _start: &StartInfo,
    _state: &ServerState,
) -> Result<(), RunnerError> {
    ch.set_step("echo");
    loop {
        match ch.recv() {
            Ok(msg) => ch.send_vec(msg)?,
            // the client ended its stream between messages: done
            Err(ChannelError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Policy, SessionLimits};
    use fusion_common::channel::memory_pair;

    fn start() -> StartInfo {
        StartInfo {
            session_id: 1,
            client: "CN=t".into(),
            backend: ECHO.into(),
            rows: 0,
            cols: 0,
            output: OutputMode::Labels,
            params: BTreeMap::new(),
            memory: Default::default(),
        }
    }

    #[test]
    fn echo_returns_each_message_and_ends_on_close() {
        let (mut a, mut b) = memory_pair();
        let state = ServerState::new(None, Policy::default(), SessionLimits::default());
        let t = std::thread::spawn(move || echo(&mut b, &start(), &state));
        for m in [vec![], vec![1u8; 10], vec![2u8; 100_000]] {
            a.send(&m).unwrap();
            assert_eq!(a.recv().unwrap(), m);
        }
        drop(a);
        assert!(t.join().unwrap().is_ok());
    }

    #[test]
    fn registry_names_and_refusals() {
        let mut r = Registry::with_builtins();
        assert_eq!(r.names(), vec!["cheetah", "echo"]);
        assert!(r.get("cheetah").unwrap().needs_model());
        assert!(!r.get("echo").unwrap().needs_model());
        assert!(matches!(
            r.register("echo", echo),
            Err(RegistryError::Duplicate(_))
        ));
        assert!(matches!(
            r.register("Bad Name", echo),
            Err(RegistryError::BadName(_))
        ));
        r.register("echo2", echo).unwrap();
        assert!(r.get("echo2").is_some() && r.get("nope").is_none());
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            RunnerError::from(ChannelError::FrameTooLarge {
                actual: 2,
                limit: 1
            })
            .code(),
            Code::ResourceExhausted
        );
        let e = RunnerError::protocol("x", std::fmt::Error);
        assert_eq!(e.code(), Code::Aborted);
        assert!(e.to_string().starts_with("x: "));
    }
}
