//! Secure inference of a whole model: the protocol families ([`SecureInference`]) with a
//! client role and a server role, each run over a [`Channel`].
//!
//! One session sets up once (HE keys, base OTs) and then runs any number of batches. A
//! batch is a header (rows, output mode), checked by the server against the model and
//! its policy ([`BatchPolicy`], which also charges the client's budget), then the layers
//! of the model in order, driven by the model's layer list ([`ModelSpec`]), then the
//! output: the labels only (argmax inside 2PC, revealed to the client) or the logits, as
//! the server's policy allows. The server never learns inputs, intermediate values or
//! outputs; the client learns only what the output mode releases.
//!
//! # Message flow (backend [`cheetah`])
//!
//! ```text
//! client (rows X, B x n_0)                                 server (W_k, b_k; policy)
//! ---- setup, once per session -------------------------------------------------------
//! hello: version | model digest | 2PC config     --> check each        [setup/hello]
//! HE: param id | seed | pk0   (he::client_setup) --> check id, ranges  [setup/he-keys]
//! base OTs both ways, KK13 bootstrap   <-------------------------->    [setup/base-ot]
//! ---- per batch, any number ---------------------------------------------------------
//! header: rows | cols | output mode              --> rows in 1..=max, cols = n_0,
//!                                                    mode allowed, charge budget [batch/header]
//! for each Dense k of the model (Flatten is a no-op):
//!   HE query: Enc(Xc)                            --> Y = W_k (Xc + Xs) + b_k - R
//!   client's share Y - R                         <-- HE response          [layerk/linear]
//!   next layer ReLU: shares of max(0, acc >> f)  <-> CrypTFlow2 millionaire,
//!                                                    truncation and MUX    [layerk/relu_trunc]
//!   otherwise:       shares of acc >> f          <->                       [layerk/trunc]
//! a ReLU that does not follow a Dense: ReLU      <->                       [layerk/relu]
//! labels mode: first argmax by a tournament      <-> index shares, opened
//!              of comparisons                        to the client only    [output/argmax]
//! logits mode: the server's logit shares         <--                       [output/reveal]
//! ---- end: the client closes the channel between two batches ------------------------
//! ```
//!
//! The client's input share is its whole input (the server's share of the first layer is
//! absent, so the first HE product carries no server share). Every step is exact: the
//! result equals [`crate::fixed::eval_fixed`] bit for bit (BRIEF fixed-point semantics;
//! `trunc` and `relu_trunc` are exact arithmetic shifts, argmax is exact because
//! truncated values lie in [-2^(l-2), 2^(l-2))).
//!
//! # Adding a family
//!
//! A family is a type implementing [`SecureInference`] in its own module (`cheetah`
//! here; `cryptflow2`, `delphi`, `aby` later) and a [`BackendKind`] variant; the server
//! registers a runner under [`BackendKind::name`], the client dispatches on the kind.
//! [`ModelSpec`], [`BatchPolicy`], [`ServerHook`], the batch header and the errors are
//! shared.
//!
//! # Deviating servers (evaluation only)
//!
//! [`ServerHook`] sees, and may change, the server's own shares at every step (after each
//! linear layer, each non-linear layer, and before the output); a wrapper around the
//! channel may change the server's messages; `serve_batch` takes the model per batch, so
//! a server may also compute with another model than the one it announced. None of this
//! gives the server anything it could not do by running other code; the product runs the
//! honest hook ([`Honest`]).

pub mod cheetah;
mod plan;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use rand::{CryptoRng, Rng};

use crate::channel::{Channel, ChannelError};
use crate::fixed::{FixedLayer, FixedModel, FixedPoint};
use crate::he::HeError;
use crate::mpc::MpcError;
pub use crate::net::info::OutputMode;

pub use cheetah::{Cheetah, CheetahClient, CheetahConfig, CheetahServer, LinearMode};
pub use plan::MAX_MPC_VALUES;
pub use wire::{BACKEND_VERSION, BatchHeader, HEADER_LEN, HELLO_LEN};

/// The protocol families this build offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum BackendKind {
    /// Cheetah-style: HE (BFV, coefficient packing) linear layers, OT-based non-linear.
    #[default]
    Cheetah,
}

impl BackendKind {
    /// Every family, in the order clients prefer them.
    pub const ALL: [BackendKind; 1] = [BackendKind::Cheetah];

    /// The name on the wire and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cheetah => Cheetah::NAME,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = BackendKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown backend {s:?} (available: {})", names.join(", "))
            })
    }
}

/// A protocol family: how a session is set up on each side.
pub trait SecureInference {
    /// The backend's name (`cheetah`).
    const NAME: &'static str;
    /// Tunables both parties must share (checked at setup).
    type Config: Clone + Default + fmt::Debug + Send + Sync;
    /// The client's role after setup.
    type Client: InferenceClient;
    /// The server's role after setup.
    type Server: InferenceServer;

    /// The client's setup (keys, base OTs) for the public model `spec`.
    fn client_setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        spec: &ModelSpec,
        config: &Self::Config,
        rng: &mut R,
    ) -> Result<Self::Client, BackendError>;

    /// The server's setup for the model it announced (`model`'s digest is checked
    /// against the client's).
    fn server_setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        model: &FixedModel,
        config: &Self::Config,
        rng: &mut R,
    ) -> Result<Self::Server, BackendError>;
}

/// The client's role of a set-up session.
pub trait InferenceClient: Send {
    /// Runs one batch of `rows` rows (`inputs` row-major, ring elements, the model's input
    /// length each) and returns what `output` releases. The server may refuse the batch
    /// (its error then arrives as [`ChannelError::PeerStatus`] with the refusal's code).
    fn run_batch<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        inputs: &[u64],
        rows: usize,
        output: OutputMode,
        rng: &mut R,
    ) -> Result<BatchOutput, BackendError>;
}

/// The server's role of a set-up session.
pub trait InferenceServer: Send {
    /// Serves one batch with `model` (of the architecture set up): reads and checks the
    /// header against `policy` (which charges the budget), runs the layers, and returns
    /// what was served; `Ok(None)` when the client closed the session instead of sending
    /// another header. `hook` sees the server's shares ([`Honest`] in the product).
    fn serve_batch<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        model: &FixedModel,
        policy: &mut dyn BatchPolicy,
        hook: &mut dyn ServerHook,
        rng: &mut R,
    ) -> Result<Option<BatchSummary>, BackendError>;

    /// Serves batches until the client closes the session; returns the number served.
    fn serve<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        model: &FixedModel,
        policy: &mut dyn BatchPolicy,
        hook: &mut dyn ServerHook,
        rng: &mut R,
    ) -> Result<u64, BackendError> {
        let mut n = 0;
        while self.serve_batch(ch, model, policy, hook, rng)?.is_some() {
            n += 1;
        }
        Ok(n)
    }
}

/// What the client gets from a batch.
#[derive(Clone, PartialEq, Eq)]
pub struct BatchOutput {
    /// the label of each row (first argmax of its logits)
    pub labels: Vec<usize>,
    /// in logits mode, the logits (ring elements at scale 2^f, row-major, `classes` each)
    pub logits: Option<Vec<u64>>,
    /// logits per row
    pub classes: usize,
}

impl fmt::Debug for BatchOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // the client's own results: kept out of logs by default
        f.debug_struct("BatchOutput")
            .field("rows", &self.labels.len())
            .field("classes", &self.classes)
            .field("logits", &self.logits.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// What the server served in a batch (public: the header's contents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    /// the batch's number in the session (from 0)
    pub index: u64,
    /// rows
    pub rows: u64,
    /// output mode
    pub output: OutputMode,
}

/// The server's decisions on a batch header. The server runner implements it over its
/// policy and the per-client budgets.
pub trait BatchPolicy {
    /// The largest batch.
    fn max_rows(&self) -> u64;
    /// Whether `output` may leave the protocol.
    fn allows(&self, output: OutputMode) -> bool;
    /// Charges `rows` against the client's budget (called once per accepted header,
    /// after every other check): an error refuses the batch.
    fn charge(&mut self, rows: u64) -> Result<(), BatchRefusal>;
}

/// A policy held in memory: a largest batch, the output mode allowed (`Logits` allows
/// both) and an optional budget in rows for the session. For tests, benches and
/// single-client use; the server runner uses the server's shared budgets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPolicy {
    /// largest batch
    pub max_rows: u64,
    /// the most that may leave the protocol
    pub output: OutputMode,
    /// rows left (`None`: unlimited)
    pub budget: Option<u64>,
    /// the budget's limit (for the refusal's message)
    limit: Option<u64>,
}

impl LocalPolicy {
    /// A policy; `budget` rows in total.
    pub fn new(max_rows: u64, output: OutputMode, budget: Option<u64>) -> Self {
        Self {
            max_rows,
            output,
            budget,
            limit: budget,
        }
    }
}

impl BatchPolicy for LocalPolicy {
    fn max_rows(&self) -> u64 {
        self.max_rows
    }
    fn allows(&self, output: OutputMode) -> bool {
        output == OutputMode::Labels || self.output == OutputMode::Logits
    }
    fn charge(&mut self, rows: u64) -> Result<(), BatchRefusal> {
        if let (Some(left), Some(limit)) = (self.budget, self.limit) {
            if rows > left {
                return Err(BatchRefusal::Budget {
                    requested: rows,
                    remaining: left,
                    limit,
                });
            }
            self.budget = Some(left - rows);
        }
        Ok(())
    }
}

/// Where a [`ServerHook`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookPoint {
    /// the batch's number in the session
    pub batch: u64,
    /// the layer group k of the step names (`layerk/...`; 0 before the first Dense)
    pub layer: usize,
    /// the operation that produced the shares
    pub op: HookOp,
    /// rows of the batch
    pub rows: usize,
    /// values per row
    pub cols: usize,
}

/// The operation after which a [`ServerHook`] sees the server's shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookOp {
    /// a linear layer (W X + b, before truncation)
    Linear,
    /// ReLU then truncation (fused)
    ReluTrunc,
    /// truncation
    Trunc,
    /// a standalone ReLU
    Relu,
    /// the final values, just before the argmax or the reveal
    Output,
}

/// A server-side observer of the server's own additive shares (row-major, ring
/// elements). It may change them: the protocol then continues with the changed shares,
/// which is how an evaluation adversary deviates inside the real protocol. The product
/// uses [`Honest`].
pub trait ServerHook: Send {
    /// Called at `at` with the server's shares.
    fn shares(&mut self, at: HookPoint, shares: &mut [u64]);
}

/// The hook that changes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Honest;

impl ServerHook for Honest {
    fn shares(&mut self, _at: HookPoint, _shares: &mut [u64]) {}
}

/// One layer of a model's public description.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerKind {
    /// fully connected, W of `outputs` x `inputs`
    Dense {
        /// input length
        inputs: usize,
        /// output length
        outputs: usize,
    },
    /// max(0, x)
    Relu,
    /// no-op on row-major data
    Flatten,
    /// a layer kind this build does not know (named as the peer named it)
    Other(String),
}

/// The public description of a model that both parties derive the protocol from: the
/// fixed-point parameters, the input length, the layers and the digest the server
/// announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// l and f
    pub fixed: FixedPoint,
    /// elements per input row
    pub input_len: usize,
    /// the layers in order
    pub layers: Vec<LayerKind>,
    /// the model digest (binds the session to the announced model)
    pub digest: [u8; 32],
}

impl ModelSpec {
    /// The public description of a model the server holds.
    pub fn of(model: &FixedModel) -> Self {
        let layers = model
            .layers()
            .iter()
            .map(|l| match l {
                FixedLayer::Dense(d) => LayerKind::Dense {
                    inputs: d.inputs(),
                    outputs: d.outputs(),
                },
                FixedLayer::Relu => LayerKind::Relu,
                FixedLayer::Flatten => LayerKind::Flatten,
            })
            .collect();
        Self {
            fixed: model.fixed_point(),
            input_len: model.input_len(),
            layers,
            digest: *model.digest().as_bytes(),
        }
    }
}

/// A batch the server does not run (each refusal is named; nothing of the batch was
/// computed and, except for [`BatchRefusal::Budget`], nothing was charged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchRefusal {
    /// A header declaring no rows.
    #[error("a batch of zero rows")]
    NoRows,
    /// More rows than the policy (or the session's declared batch) allows.
    #[error("batch of {rows} rows exceeds the maximum of {max}")]
    TooManyRows {
        /// rows declared
        rows: u64,
        /// the largest batch allowed
        max: u64,
    },
    /// A column count other than the model's input length.
    #[error("batch declares {declared} columns per row, the model takes {expected}")]
    Columns {
        /// columns declared
        declared: u64,
        /// the model's input length
        expected: u64,
    },
    /// Logits asked of a server that releases labels only.
    #[error("this server releases labels only (logits were requested)")]
    LogitsNotAllowed,
    /// The client's budget does not cover the batch.
    #[error("budget exhausted: {requested} rows requested, {remaining} of {limit} left")]
    Budget {
        /// rows asked for
        requested: u64,
        /// rows left
        remaining: u64,
        /// the per-client limit
        limit: u64,
    },
}

/// Errors of the backends. Every check on a peer's message has its own variant (or that
/// of the layer below: [`HeError`], [`MpcError`], [`ChannelError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The transport failed (for the client this includes the server ending the session
    /// with a named error, e.g. a refusal).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// An HE linear layer failed.
    #[error("HE: {0}")]
    He(#[from] HeError),
    /// A 2PC non-linear layer failed.
    #[error("2PC: {0}")]
    Mpc(#[from] MpcError),
    /// The server refused the batch.
    #[error("batch refused: {0}")]
    Refused(#[from] BatchRefusal),
    /// A backend message of the wrong length or with a bad field.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// which message
        what: &'static str,
        /// why
        reason: String,
    },
    /// A backend message of another kind than expected here.
    #[error("unexpected {what}: tag {actual:#04x}, expected {expected:#04x}")]
    WrongMessage {
        /// which message was expected
        what: &'static str,
        /// its tag
        expected: u8,
        /// the tag received
        actual: u8,
    },
    /// The peer speaks another version of the backend protocol.
    #[error("backend protocol version {peer}, this side speaks {ours}")]
    Version {
        /// ours
        ours: u16,
        /// the peer's
        peer: u16,
    },
    /// The client set up for another model than the one this server serves.
    #[error("the client expects model {expected}, this server serves {actual}")]
    ModelMismatch {
        /// the digest in the client's hello (hex)
        expected: String,
        /// the served model's digest (hex)
        actual: String,
    },
    /// The client's 2PC configuration differs from the server's.
    #[error("2PC configuration {peer} differs from this side's {ours}")]
    ConfigMismatch {
        /// ours
        ours: String,
        /// the peer's
        peer: String,
    },
    /// A layer the backend cannot evaluate.
    #[error("layer {index} ({kind}) is not supported by this backend")]
    UnsupportedLayer {
        /// the layer's index in the model
        index: usize,
        /// its kind
        kind: String,
    },
    /// A model the backend cannot evaluate for another reason.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// The model given for a batch does not have the architecture set up.
    #[error("the model's architecture differs from the one the session was set up for")]
    ArchitectureChanged,
    /// A local input of the wrong length.
    #[error("{what} has {actual} elements, expected {expected}")]
    InputLength {
        /// which input
        what: &'static str,
        /// expected
        expected: usize,
        /// given
        actual: usize,
    },
    /// A local input that is not an element of Z_{2^l}.
    #[error("input element {index} is not an element of Z_2^{bits}")]
    NotInRing {
        /// where
        index: usize,
        /// l
        bits: u32,
    },
    /// A batch the client itself cannot send (no rows, more than the header can carry).
    #[error("invalid batch: {0}")]
    BadBatch(String),
    /// An earlier error left the session unusable.
    #[error("the inference session is unusable after an earlier error")]
    Poisoned,
}
