//! Backend `cheetah`: linear layers by BFV with Cheetah's coefficient packing
//! ([`crate::he`], Cheetah §4.1 HomFC, with flooding), truncation, ReLU and argmax by the
//! OT engine ([`crate::mpc`], CrypTFlow2 millionaire over IKNP + KK13). Message flow: the
//! module doc of [`crate::backend`].
//!
//! # Linear layers online or preprocessed
//!
//! [`LinearMode::Online`] (the default, Cheetah's way): every linear layer of a batch runs
//! the HE protocol on the client's share of that layer's input.
//!
//! [`LinearMode::Preprocessed`] (Delphi's split, Mishra et al., USENIX Security 2020, §4:
//! "offline" phase, then "online"): right after the batch header, before any value that
//! depends on the inputs is used, the client draws a uniform mask r_k (rows x n_i) for
//! every linear layer k and the same HE protocol computes shares of W_k r_k (client
//! u_k = W_k r_k - R_k, server R_k; no bias, no server share), all layers' queries in one
//! flight and all answers in the next (steps `offline/linear`). Online, the client sends
//! d = x_c - r_k in the clear (uniform: r_k is a one-time pad the server never sees,
//! packed l bits each) and keeps u_k as its share; the server computes
//! W_k (x_s + d) + b_k + R_k locally. The sum is W_k (x_c + x_s) + b_k, exactly as
//! online. The server's view gains only d (uniform); the client's view is the same HE
//! answers as online, on its own random masks. Online, a linear layer is then
//! `l·rows·n_i` bits one way and no HE.
//!
//! ```text
//! client                                               server
//! batch header                                    -->  admit (policy, budget)
//! offline: Enc(r_k) queries, every layer          -->
//!                                                 <--  answers: u_k = W_k r_k - R_k
//! layer k: d = x_c - r_k (packed)                 -->  y_s = W_k (x_s + d) + b_k + R_k
//! non-linear layers by the OT engine, as online   <->
//! ```
//!
//! Each linear layer of a batch is one flight each way whatever the batch size: when a
//! batch has more rows than one HE call may return values for (2^18, the flooding
//! budget), the client sends the queries of all its row chunks in one flight and the
//! server answers them all in the next.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use rand::{CryptoRng, Rng};
use tracing::debug;
use zeroize::Zeroizing;

use super::plan::{Plan, Post, Stage};
use super::wire::{BACKEND_VERSION, BatchHeader, HEADER_LEN, Hello};
use super::{
    BackendError, BatchOutput, BatchPolicy, BatchRefusal, BatchSummary, HookOp, HookPoint,
    InferenceClient, InferenceServer, ModelSpec, OutputMode, SecureInference, ServerHook,
};
use crate::channel::{Channel, ChannelError, StepCost};
use crate::fixed::{FixedLayer, FixedModel, first_argmax};
use crate::he::{self, HeParams, LinearShape};
use crate::mpc::{MpcConfig, MpcError, MpcSession, Party, cost};
use crate::ot::{CoreOt, KkotConfig, OtKind};
use crate::ring::Ring;

/// The `cheetah` family.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cheetah;

/// How a session computes its linear layers (module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearMode {
    /// HE on the client's share of each layer's input, during the batch (Cheetah)
    #[default]
    Online,
    /// HE on random masks before the inputs are used, a masked reshare online (Delphi)
    Preprocessed,
}

impl LinearMode {
    /// `online` or `preprocessed`.
    pub fn name(self) -> &'static str {
        match self {
            LinearMode::Online => "online",
            LinearMode::Preprocessed => "preprocessed",
        }
    }
}

impl std::str::FromStr for LinearMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "online" => Ok(LinearMode::Online),
            "preprocessed" => Ok(LinearMode::Preprocessed),
            other => Err(format!(
                "unknown linear-layer mode {other:?} (online or preprocessed)"
            )),
        }
    }
}

impl fmt::Display for LinearMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Tunables both parties of a `cheetah` session must share (the client announces its
/// own in the hello; the server refuses a difference by name).
///
/// The default runs the non-linear layers over Ferret silent OT with the configuration
/// measured best for it ([`MpcConfig::recommended`]); IKNP stays selectable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheetahConfig {
    /// the core OT under the 2PC layers
    pub ot: OtKind,
    /// the 2PC session's configuration (leaf width, 1-of-N OT, extension batch)
    pub mpc: MpcConfig,
    /// a public bound on the signed bits of the weights (a smaller HE modulus), or
    /// `None`: any ring element, which reveals nothing about the weights
    pub weight_bits: Option<u32>,
    /// linear layers online (Cheetah) or preprocessed (Delphi); the client's choice: the
    /// server runs the mode the hello names (both give it the same guarantees)
    pub linear: LinearMode,
}

impl Default for CheetahConfig {
    fn default() -> Self {
        Self::with_ot(OtKind::default())
    }
}

impl CheetahConfig {
    /// The recommended configuration over the core OT `ot`.
    pub fn with_ot(ot: OtKind) -> Self {
        Self {
            ot,
            mpc: MpcConfig::recommended(ot),
            weight_bits: None,
            linear: LinearMode::Online,
        }
    }

    fn weight_bits(&self, plan: &Plan) -> u32 {
        self.weight_bits.unwrap_or_else(|| plan.fixed.ring_bits())
    }

    fn describe(ot: OtKind, mpc: &MpcConfig, weight_bits: u32) -> String {
        format!(
            "core OT {}, leaf bits {}, 1-of-N {:?}, min batch {}, weight bits {}",
            ot.name(),
            mpc.leaf_bits,
            mpc.kn,
            mpc.min_batch,
            weight_bits
        )
    }
}

impl SecureInference for Cheetah {
    const NAME: &'static str = "cheetah";
    type Config = CheetahConfig;
    type Client = CheetahClient;
    type Server = CheetahServer;

    fn client_setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        spec: &ModelSpec,
        config: &CheetahConfig,
        rng: &mut R,
    ) -> Result<CheetahClient, BackendError> {
        CheetahClient::setup(ch, spec, config, rng)
    }

    fn server_setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        model: &FixedModel,
        config: &CheetahConfig,
        rng: &mut R,
    ) -> Result<CheetahServer, BackendError> {
        CheetahServer::setup(ch, model, config, rng)
    }
}

fn he_params(plan: &Plan, config: &CheetahConfig) -> Result<Arc<HeParams>, BackendError> {
    Ok(Arc::new(HeParams::new(
        plan.fixed.ring_bits(),
        config.weight_bits(plan),
    )?))
}

/// The HE calls of a linear layer: row ranges and their shapes.
fn calls(
    plan: &Plan,
    rows: usize,
    inputs: usize,
    outputs: usize,
) -> Vec<(Range<usize>, LinearShape)> {
    plan.chunks(rows)
        .map(|r| {
            let s = LinearShape::new(r.len(), inputs, outputs);
            (r, s)
        })
        .collect()
}

/// The client's role of a `cheetah` session.
pub struct CheetahClient {
    pub(super) plan: Plan,
    config: CheetahConfig,
    he: he::ClientSession,
    mpc: MpcSession<CoreOt>,
    batches: u64,
    poisoned: bool,
    /// the next batch's offline material ([`CheetahClient::prepare_batch`])
    prepared: Option<Prepared>,
}

/// A batch whose offline phase ran ahead of its inputs.
struct Prepared {
    rows: usize,
    output: OutputMode,
    masks: Vec<Mask>,
}

impl fmt::Debug for CheetahClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheetahClient")
            .field("config", &self.config)
            .field("he", &self.he)
            .field("mpc", &self.mpc)
            .field("batches", &self.batches)
            .field("poisoned", &self.poisoned)
            .field(
                "prepared",
                &self.prepared.as_ref().map(|p| (p.rows, p.output)),
            )
            .finish()
    }
}

impl CheetahClient {
    /// Sets the session up for the public model `spec`: hello, HE keys (the secret key
    /// stays here), base OTs.
    pub fn setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        spec: &ModelSpec,
        config: &CheetahConfig,
        rng: &mut R,
    ) -> Result<Self, BackendError> {
        let plan = Plan::new(spec)?;
        let params = he_params(&plan, config)?;
        let weight_bits = u8::try_from(params.weight_bits())
            .map_err(|_| BackendError::UnsupportedModel("weight bound above 255 bits".into()))?;
        ch.set_step("setup/hello");
        ch.send_vec(
            Hello {
                version: BACKEND_VERSION,
                digest: spec.digest,
                mpc: config.mpc,
                weight_bits,
                ot: config.ot,
                linear: config.linear,
            }
            .encode(),
        )?;
        ch.set_step("setup/he-keys");
        let he = he::client_setup(ch, params, rng)?;
        ch.set_step("setup/base-ot");
        let mpc = MpcSession::setup_with(ch, Party::Client, config.mpc, config.ot, rng)?;
        Ok(Self {
            plan,
            config: *config,
            he,
            mpc,
            batches: 0,
            poisoned: false,
            prepared: None,
        })
    }

    /// The HE parameters of the session.
    pub fn he_params(&self) -> &HeParams {
        self.he.params()
    }

    /// Logits per row.
    pub fn classes(&self) -> usize {
        self.plan.output_len
    }

    /// The costs of the next batch of `rows` rows, per step, as this client's
    /// [`Counting`](crate::channel::Counting) will record them: bytes each way and
    /// flights, from the `he` and `mpc` cost formulas with the COTs this session holds
    /// now. Messages and time are not predicted (zero). The count of flights assumes that
    /// the client's last message before the batch was one it received (as after a batch).
    pub fn predict_batch_cost(
        &mut self,
        rows: usize,
        output: OutputMode,
    ) -> Result<Vec<StepCost>, BackendError> {
        let plan = &self.plan;
        let ring = plan.fixed.ring();
        let f = plan.fixed.frac_bits();
        let p = cost::Params {
            leaf_bits: self.config.mpc.leaf_bits,
            kk13: self.config.mpc.kn == KkotConfig::Kk13,
            ext: self.mpc.cost_extension(),
        };
        let mut seq = cost::Sequence::new(
            p,
            self.config.mpc.min_batch,
            self.mpc.ot().available(),
            Some(false),
        );
        let mut steps = Vec::new();
        let mut step = |name: String,
                        seq: &mut cost::Sequence,
                        op: &mut dyn FnMut(&mut cost::Sequence) -> Result<(), BackendError>|
         -> Result<(), BackendError> {
            let before = seq.total();
            op(seq)?;
            let after = seq.total();
            steps.push(StepCost {
                step: name,
                bytes_sent: after.sent - before.sent,
                bytes_received: after.received - before.received,
                rounds: after.flights - before.flights,
                ..StepCost::default()
            });
            Ok(())
        };
        step("batch/header".into(), &mut seq, &mut |s| {
            s.send(HEADER_LEN);
            Ok(())
        })?;
        let params = self.he.params();
        let linear_cost = |ni: usize, no: usize| {
            calls(plan, rows, ni, no)
                .iter()
                .map(|(_, s)| he::layer_cost(params, s))
                .collect::<Result<Vec<_>, _>>()
        };
        let preprocessed = self.config.linear == LinearMode::Preprocessed;
        if preprocessed {
            let costs = linear_shapes(plan)
                .into_iter()
                .map(|(ni, no)| linear_cost(ni, no))
                .collect::<Result<Vec<_>, _>>()?;
            step("offline/linear".into(), &mut seq, &mut |s| {
                costs.iter().flatten().for_each(|c| s.send(c.query_bytes));
                costs
                    .iter()
                    .flatten()
                    .for_each(|c| s.recv(c.response_bytes));
                Ok(())
            })?;
            let (send, recv) = batch_cots(plan, &self.config.mpc, rows, output);
            step("offline/ot".into(), &mut seq, &mut |s| {
                s.reserve(send, recv);
                Ok(())
            })?;
        }
        for stage in &plan.stages {
            match *stage {
                Stage::Linear {
                    group,
                    inputs,
                    outputs,
                    post,
                    ..
                } => {
                    if preprocessed {
                        step(format!("layer{group}/linear"), &mut seq, &mut |s| {
                            s.send(ring.packed_len(rows * inputs));
                            Ok(())
                        })?;
                    } else {
                        let costs = linear_cost(inputs, outputs)?;
                        step(format!("layer{group}/linear"), &mut seq, &mut |s| {
                            costs.iter().for_each(|c| s.send(c.query_bytes));
                            costs.iter().for_each(|c| s.recv(c.response_bytes));
                            Ok(())
                        })?;
                    }
                    let parts: Vec<usize> = plan.mpc_parts(rows * outputs, outputs).collect();
                    match post {
                        Post::ReluTrunc => {
                            step(format!("layer{group}/relu_trunc"), &mut seq, &mut |s| {
                                parts.iter().for_each(|&n| s.relu_trunc(ring, n, f));
                                Ok(())
                            })?
                        }
                        Post::Trunc => step(format!("layer{group}/trunc"), &mut seq, &mut |s| {
                            parts.iter().for_each(|&n| s.trunc(ring, n, f));
                            Ok(())
                        })?,
                    }
                }
                Stage::Relu { group, width } => {
                    let parts: Vec<usize> = plan.mpc_parts(rows * width, width).collect();
                    step(format!("layer{group}/relu"), &mut seq, &mut |s| {
                        parts.iter().for_each(|&n| s.relu(ring, n));
                        Ok(())
                    })?
                }
            }
        }
        let classes = plan.output_len;
        let parts: Vec<usize> = plan.mpc_parts(rows * classes, classes).collect();
        match output {
            OutputMode::Labels => step("output/argmax".into(), &mut seq, &mut |s| {
                parts
                    .iter()
                    .for_each(|&n| s.argmax_reveal(ring, n / classes, classes));
                Ok(())
            })?,
            OutputMode::Logits => step("output/reveal".into(), &mut seq, &mut |s| {
                s.reveal_to_client(ring, rows * classes);
                Ok(())
            })?,
        }
        // a reservation the buffers already cover sends nothing: no step is recorded
        steps.retain(|s| s.step != "offline/ot" || s.bytes_sent + s.bytes_received > 0);
        Ok(steps)
    }

    /// Runs the offline phase of the next batch before its inputs exist (Delphi's
    /// preprocessing; [`LinearMode::Preprocessed`] only): sends the batch header, the HE
    /// on the masks and the COT extension now; the next [`InferenceClient::run_batch`],
    /// which must name the same `rows` and `output`, then runs only the online phase.
    /// The server waits for it within its session idle timeout.
    pub fn prepare_batch<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        rows: usize,
        output: OutputMode,
        rng: &mut R,
    ) -> Result<(), BackendError> {
        if self.poisoned {
            return Err(BackendError::Poisoned);
        }
        if self.config.linear != LinearMode::Preprocessed {
            return Err(BackendError::BadBatch(
                "only a session with preprocessed linear layers prepares batches".into(),
            ));
        }
        if self.prepared.is_some() {
            return Err(BackendError::BadBatch("a batch is already prepared".into()));
        }
        match self.start_batch(ch, rows, output, rng) {
            Ok(masks) => {
                self.prepared = Some(Prepared {
                    rows,
                    output,
                    masks,
                });
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// The batch header and, in preprocessed mode, the offline phase: the masks and the
    /// client's shares of W r per linear layer, then the non-linear layers' COTs.
    fn start_batch<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        rows: usize,
        output: OutputMode,
        rng: &mut R,
    ) -> Result<Vec<Mask>, BackendError> {
        let plan = &self.plan;
        if rows == 0 {
            return Err(BackendError::BadBatch("a batch of zero rows".into()));
        }
        let header = BatchHeader {
            rows: u32::try_from(rows)
                .map_err(|_| BackendError::BadBatch(format!("{rows} rows in one batch")))?,
            cols: u32::try_from(plan.input_len)
                .map_err(|_| BackendError::BadBatch("input rows too long".into()))?,
            output,
        };
        ch.set_step("batch/header");
        ch.send_vec(header.encode())?;
        Ok(match self.config.linear {
            LinearMode::Online => Vec::new(),
            LinearMode::Preprocessed => {
                let masks = client_offline(ch, &self.he, plan, rows, rng)?;
                // the non-linear layers' COTs, before the inputs are used
                ch.set_step("offline/ot");
                let (send, recv) = batch_cots(plan, &self.config.mpc, rows, output);
                self.mpc
                    .ot()
                    .reserve(ch, send, recv)
                    .map_err(MpcError::from)?;
                masks
            }
        })
    }

    fn batch_inner<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        inputs: &[u64],
        rows: usize,
        output: OutputMode,
        rng: &mut R,
    ) -> Result<BatchOutput, BackendError> {
        check_inputs(self.plan.fixed.ring(), inputs, rows * self.plan.input_len)?;
        let masks = match self.prepared.take() {
            Some(p) if p.rows == rows && p.output == output => p.masks,
            Some(p) => {
                return Err(BackendError::BadBatch(format!(
                    "the prepared batch has {} rows ({}), this one {rows} ({output})",
                    p.rows, p.output
                )));
            }
            None => self.start_batch(ch, rows, output, rng)?,
        };
        let plan = &self.plan;
        let ring = plan.fixed.ring();
        let mut pre = masks.into_iter();
        let mut x = Zeroizing::new(inputs.to_vec());
        for stage in &plan.stages {
            match *stage {
                Stage::Linear {
                    group,
                    inputs: ni,
                    outputs: no,
                    post,
                    ..
                } => {
                    ch.set_step(&format!("layer{group}/linear"));
                    let y = match self.config.linear {
                        LinearMode::Online => {
                            client_linear(ch, &self.he, plan, &x, rows, ni, no, rng)?
                        }
                        LinearMode::Preprocessed => {
                            let (r, u) = pre.next().ok_or(BackendError::ArchitectureChanged)?;
                            // Delphi §4, online: d = x_c - r, in the clear (r is a pad)
                            let d = Zeroizing::new(
                                x.iter()
                                    .zip(r.iter())
                                    .map(|(&a, &b)| ring.sub(a, b))
                                    .collect::<Vec<u64>>(),
                            );
                            ch.send_vec(ring.pack(&d))?;
                            u
                        }
                    };
                    let op = match post {
                        Post::ReluTrunc => NonLinear::ReluTrunc,
                        Post::Trunc => NonLinear::Trunc,
                    };
                    ch.set_step(&format!("layer{group}/{}", op.name()));
                    x = nonlinear(&mut self.mpc, ch, plan, &y, no, op)?;
                }
                Stage::Relu { group, width } => {
                    ch.set_step(&format!("layer{group}/relu"));
                    x = nonlinear(&mut self.mpc, ch, plan, &x, width, NonLinear::Relu)?;
                }
            }
        }
        let classes = plan.output_len;
        let out = match output {
            OutputMode::Labels => {
                ch.set_step("output/argmax");
                let labels =
                    argmax_reveal(&mut self.mpc, ch, plan, &x)?.ok_or_else(nothing_revealed)?;
                BatchOutput {
                    labels,
                    logits: None,
                    classes,
                }
            }
            OutputMode::Logits => {
                ch.set_step("output/reveal");
                let logits = self
                    .mpc
                    .reveal(ch, ring, &x, Party::Client)?
                    .ok_or_else(nothing_revealed)?;
                let labels = logits
                    .chunks(classes)
                    .map(|row| {
                        let signed: Vec<i64> = row.iter().map(|&v| ring.to_signed(v)).collect();
                        first_argmax(&signed)
                    })
                    .collect();
                BatchOutput {
                    labels,
                    logits: Some(logits),
                    classes,
                }
            }
        };
        ch.flush()?;
        self.batches += 1;
        Ok(out)
    }
}

fn nothing_revealed() -> BackendError {
    BackendError::Malformed {
        what: "output",
        reason: "nothing was revealed to the client".into(),
    }
}

/// The non-linear operation after a layer.
#[derive(Debug, Clone, Copy)]
enum NonLinear {
    ReluTrunc,
    Trunc,
    Relu,
}

impl NonLinear {
    fn name(self) -> &'static str {
        match self {
            NonLinear::ReluTrunc => "relu_trunc",
            NonLinear::Trunc => "trunc",
            NonLinear::Relu => "relu",
        }
    }
}

/// Shares of `op` on the shares `x` (rows of `width`), in 2PC calls of at most
/// `plan.mpc_values` values (CrypTFlow2 truncation and ReLU, [`crate::mpc`]).
fn nonlinear(
    mpc: &mut MpcSession<CoreOt>,
    ch: &mut dyn Channel,
    plan: &Plan,
    x: &[u64],
    width: usize,
    op: NonLinear,
) -> Result<Zeroizing<Vec<u64>>, BackendError> {
    let (ring, f) = (plan.fixed.ring(), plan.fixed.frac_bits());
    let mut out = Zeroizing::new(Vec::with_capacity(x.len()));
    let mut at = 0;
    for n in plan.mpc_parts(x.len(), width) {
        let part = &x[at..at + n];
        at += n;
        let y = Zeroizing::new(match op {
            NonLinear::ReluTrunc => mpc.relu_trunc(ch, ring, part, f)?,
            NonLinear::Trunc => mpc.trunc(ch, ring, part, f)?,
            NonLinear::Relu => mpc.relu(ch, ring, part)?,
        });
        out.extend_from_slice(&y);
    }
    Ok(out)
}

/// The first argmax of each row of the shares `x`, revealed to the client only
/// (`Some(labels)` at the client, `None` at the server), in calls of at most
/// `plan.mpc_values` values.
fn argmax_reveal(
    mpc: &mut MpcSession<CoreOt>,
    ch: &mut dyn Channel,
    plan: &Plan,
    x: &[u64],
) -> Result<Option<Vec<usize>>, BackendError> {
    let (ring, classes) = (plan.fixed.ring(), plan.output_len);
    let mut labels: Option<Vec<usize>> = None;
    let mut at = 0;
    for n in plan.mpc_parts(x.len(), classes) {
        let part = &x[at..at + n];
        at += n;
        if let Some(l) = mpc.argmax_reveal(ch, ring, part, classes, Party::Client)? {
            labels.get_or_insert_with(Vec::new).extend(l);
        }
    }
    Ok(labels)
}

fn check_inputs(ring: Ring, inputs: &[u64], expected: usize) -> Result<(), BackendError> {
    if inputs.len() != expected {
        return Err(BackendError::InputLength {
            what: "inputs",
            expected,
            actual: inputs.len(),
        });
    }
    if let Some(index) = inputs.iter().position(|&v| v > ring.mask()) {
        return Err(BackendError::NotInRing {
            index,
            bits: ring.bits(),
        });
    }
    Ok(())
}

/// The client's side of a linear layer over all row chunks: every query in one flight,
/// then every response (Cheetah §4.1; one chunk is exactly [`he::client_linear`]).
#[allow(clippy::too_many_arguments)]
fn client_linear<R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    he: &he::ClientSession,
    plan: &Plan,
    x: &[u64],
    rows: usize,
    inputs: usize,
    outputs: usize,
    rng: &mut R,
) -> Result<Zeroizing<Vec<u64>>, BackendError> {
    client_queries(ch, he, plan, x, rows, inputs, outputs, rng)?;
    ch.flush()?;
    client_answers(ch, he, plan, rows, inputs, outputs)
}

/// The queries of a linear layer (all row chunks), sent without a flush.
#[allow(clippy::too_many_arguments)]
fn client_queries<R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    he: &he::ClientSession,
    plan: &Plan,
    x: &[u64],
    rows: usize,
    inputs: usize,
    outputs: usize,
    rng: &mut R,
) -> Result<(), BackendError> {
    for (r, s) in &calls(plan, rows, inputs, outputs) {
        for msg in he.encrypt_layer(&x[r.start * inputs..r.end * inputs], *s, rng)? {
            ch.send_vec(msg)?;
        }
    }
    Ok(())
}

/// The answers to a linear layer's queries: the client's share, rows x outputs.
fn client_answers(
    ch: &mut dyn Channel,
    he: &he::ClientSession,
    plan: &Plan,
    rows: usize,
    inputs: usize,
    outputs: usize,
) -> Result<Zeroizing<Vec<u64>>, BackendError> {
    let mut y = Zeroizing::new(Vec::with_capacity(rows * outputs));
    for (_, s) in &calls(plan, rows, inputs, outputs) {
        // the header and each ciphertext checked as they arrive: the chunk's answers are
        // held until all are in
        let (header, cts) = he::recv_response(ch, he.params(), *s)?;
        let cts = Zeroizing::new(cts);
        // this chunk's share, zeroized once copied (as the server's in `server_answers`)
        let part = Zeroizing::new(he.decrypt_layer(*s, &header, &cts)?);
        y.extend_from_slice(&part);
    }
    Ok(y)
}

/// A preprocessed linear layer at the client: the mask r and the share u = W r - R.
type Mask = (Zeroizing<Vec<u64>>, Zeroizing<Vec<u64>>);

/// The linear layers' linear shapes `(inputs, outputs)`, in order.
fn linear_shapes(plan: &Plan) -> Vec<(usize, usize)> {
    plan.stages
        .iter()
        .filter_map(|st| match *st {
            Stage::Linear {
                inputs, outputs, ..
            } => Some((inputs, outputs)),
            Stage::Relu { .. } => None,
        })
        .collect()
}

/// Most COTs per direction the offline phase stocks (2^23: 128 MiB of blocks per
/// direction and party); a larger batch extends the rest online.
const OFFLINE_COTS_MAX: usize = 1 << 23;

/// The COTs the non-linear layers of a batch take, as the client's session counts them
/// (as sender, as receiver), capped at [`OFFLINE_COTS_MAX`]: what the offline phase
/// stocks so that no extension runs online.
fn batch_cots(plan: &Plan, mpc: &MpcConfig, rows: usize, output: OutputMode) -> (usize, usize) {
    let ring = plan.fixed.ring();
    let f = plan.fixed.frac_bits();
    let p = cost::Params {
        leaf_bits: mpc.leaf_bits,
        kk13: mpc.kn == KkotConfig::Kk13,
        ext: cost::Extension::Iknp,
    };
    let mut seq = cost::Sequence::new(p, 0, (0, 0), None);
    for stage in &plan.stages {
        match *stage {
            Stage::Linear { outputs, post, .. } => {
                for n in plan.mpc_parts(rows * outputs, outputs) {
                    match post {
                        Post::ReluTrunc => seq.relu_trunc(ring, n, f),
                        Post::Trunc => seq.trunc(ring, n, f),
                    }
                }
            }
            Stage::Relu { width, .. } => {
                for n in plan.mpc_parts(rows * width, width) {
                    seq.relu(ring, n);
                }
            }
        }
    }
    let classes = plan.output_len;
    if output == OutputMode::Labels {
        for n in plan.mpc_parts(rows * classes, classes) {
            seq.argmax_reveal(ring, n / classes, classes);
        }
    }
    let (send, recv) = seq.taken();
    (send.min(OFFLINE_COTS_MAX), recv.min(OFFLINE_COTS_MAX))
}

/// The client's offline phase (Delphi §4): a uniform mask per linear layer and, by the
/// HE protocol, its share of W r; every layer's queries in one flight, the answers in
/// the next.
fn client_offline<R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    he: &he::ClientSession,
    plan: &Plan,
    rows: usize,
    rng: &mut R,
) -> Result<Vec<Mask>, BackendError> {
    let ring = plan.fixed.ring();
    ch.set_step("offline/linear");
    let shapes = linear_shapes(plan);
    let mut masks = Vec::with_capacity(shapes.len());
    for &(ni, no) in &shapes {
        let r = Zeroizing::new((0..rows * ni).map(|_| ring.random(rng)).collect::<Vec<_>>());
        client_queries(ch, he, plan, &r, rows, ni, no, rng)?;
        masks.push(r);
    }
    ch.flush()?;
    shapes
        .iter()
        .zip(masks)
        .map(|(&(ni, no), r)| Ok((r, client_answers(ch, he, plan, rows, ni, no)?)))
        .collect()
}

/// The server's side of a linear layer over all row chunks: receives every query, then
/// answers each (one chunk is exactly [`he::server_linear`]). Returns its share R.
#[allow(clippy::too_many_arguments)]
fn server_linear<R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    he: &he::ServerSession,
    plan: &Plan,
    weights: &[u64],
    bias: &[u64],
    xs: Option<&[u64]>,
    rows: usize,
    inputs: usize,
    outputs: usize,
    rng: &mut R,
) -> Result<Zeroizing<Vec<u64>>, BackendError> {
    let queries = server_queries(ch, he, plan, rows, inputs, outputs)?;
    let y = server_answers(
        ch, he, plan, &queries, weights, bias, xs, rows, inputs, outputs, rng,
    )?;
    ch.flush()?;
    Ok(y)
}

/// A linear layer's queries, per row chunk: the header and the ciphertexts.
type Queries = Vec<(Vec<u8>, Vec<Vec<u8>>)>;

/// Receives a linear layer's queries (all row chunks), each checked against its shape.
fn server_queries(
    ch: &mut dyn Channel,
    he: &he::ServerSession,
    plan: &Plan,
    rows: usize,
    inputs: usize,
    outputs: usize,
) -> Result<Queries, BackendError> {
    let calls = calls(plan, rows, inputs, outputs);
    let mut queries = Vec::with_capacity(calls.len());
    for (_, s) in &calls {
        let header = ch.recv()?;
        let count = he.check_query_header(*s, &header)?;
        // each ciphertext's length is checked as it arrives: the layer's queries are
        // held until all are in, so `count` messages of the transport's largest size
        // must not be
        let cts = (0..count)
            .map(|_| he::recv_query_ct(ch, he.params()))
            .collect::<Result<Vec<_>, _>>()?;
        queries.push((header, cts));
    }
    Ok(queries)
}

/// Evaluates and sends the answers to a layer's queries (without a flush); returns the
/// server's share R.
#[allow(clippy::too_many_arguments)]
fn server_answers<R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    he: &he::ServerSession,
    plan: &Plan,
    queries: &Queries,
    weights: &[u64],
    bias: &[u64],
    xs: Option<&[u64]>,
    rows: usize,
    inputs: usize,
    outputs: usize,
    rng: &mut R,
) -> Result<Zeroizing<Vec<u64>>, BackendError> {
    let calls = calls(plan, rows, inputs, outputs);
    let mut y = Zeroizing::new(Vec::with_capacity(rows * outputs));
    for ((r, s), (header, cts)) in calls.iter().zip(queries) {
        let xs = xs.map(|v| &v[r.start * inputs..r.end * inputs]);
        let (msgs, share) = he.evaluate_layer(weights, bias, xs, *s, header, cts, rng)?;
        y.extend_from_slice(&share);
        drop(Zeroizing::new(share));
        for m in msgs {
            ch.send_vec(m)?;
        }
    }
    Ok(y)
}

/// The server's offline phase (Delphi §4): receives every layer's queries (the client's
/// masks, encrypted), answers them with W and no bias; returns R per linear layer.
fn server_offline<R: Rng + CryptoRng + ?Sized>(
    ch: &mut dyn Channel,
    he: &he::ServerSession,
    plan: &Plan,
    model: &FixedModel,
    rows: usize,
    rng: &mut R,
) -> Result<Vec<Zeroizing<Vec<u64>>>, BackendError> {
    ch.set_step("offline/linear");
    let mut layers = Vec::new();
    for st in &plan.stages {
        if let Stage::Linear {
            index,
            inputs,
            outputs,
            ..
        } = *st
        {
            let Some(FixedLayer::Dense(d)) = model.layers().get(index) else {
                return Err(BackendError::ArchitectureChanged);
            };
            let q = server_queries(ch, he, plan, rows, inputs, outputs)?;
            layers.push((d, q, inputs, outputs));
        }
    }
    let mut shares = Vec::with_capacity(layers.len());
    for (d, q, inputs, outputs) in &layers {
        let zero = vec![0u64; *outputs];
        shares.push(server_answers(
            ch,
            he,
            plan,
            q,
            d.weight(),
            &zero,
            None,
            rows,
            *inputs,
            *outputs,
            rng,
        )?);
    }
    ch.flush()?;
    Ok(shares)
}

/// The server's online linear layer of the preprocessed mode (Delphi §4): receives
/// d = x_c - r, returns W (x_s + d) + b + R, rows x outputs, in the ring.
#[allow(clippy::too_many_arguments)]
fn server_linear_preprocessed(
    ch: &mut dyn Channel,
    ring: Ring,
    d: &crate::fixed::FixedDense,
    xs: Option<&[u64]>,
    r: &[u64],
    rows: usize,
    inputs: usize,
    outputs: usize,
) -> Result<Zeroizing<Vec<u64>>, BackendError> {
    let msg = ch.recv()?;
    let mut v =
        Zeroizing::new(
            ring.unpack(&msg, rows * inputs)
                .map_err(|e| BackendError::Malformed {
                    what: "masked layer input",
                    reason: e.to_string(),
                })?,
        );
    if let Some(xs) = xs {
        for (a, &b) in v.iter_mut().zip(xs) {
            *a = ring.add(*a, b);
        }
    }
    let (w, b) = (d.weight(), d.bias());
    let mut y = Zeroizing::new(Vec::with_capacity(rows * outputs));
    for (row, rr) in v.chunks_exact(inputs).zip(r.chunks_exact(outputs)) {
        for (o, (&bo, &ro)) in b.iter().zip(rr).enumerate() {
            let acc = w[o * inputs..(o + 1) * inputs]
                .iter()
                .zip(row)
                .fold(bo.wrapping_add(ro), |acc, (&wi, &xi)| {
                    acc.wrapping_add(wi.wrapping_mul(xi))
                });
            y.push(acc & ring.mask());
        }
    }
    Ok(y)
}

impl InferenceClient for CheetahClient {
    fn run_batch<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        inputs: &[u64],
        rows: usize,
        output: OutputMode,
        rng: &mut R,
    ) -> Result<BatchOutput, BackendError> {
        if self.poisoned {
            return Err(BackendError::Poisoned);
        }
        let r = self.batch_inner(ch, inputs, rows, output, rng);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }
}

/// The server's role of a `cheetah` session.
pub struct CheetahServer {
    pub(super) plan: Plan,
    spec: ModelSpec,
    /// the linear-layer mode the client's hello named
    linear: LinearMode,
    he: he::ServerSession,
    mpc: MpcSession<CoreOt>,
    batches: u64,
    poisoned: bool,
}

impl fmt::Debug for CheetahServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheetahServer")
            .field("linear", &self.linear)
            .field("he", &self.he)
            .field("mpc", &self.mpc)
            .field("batches", &self.batches)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl CheetahServer {
    /// Sets the session up for `model` (the model this server announced): checks the
    /// client's hello (version, model digest, configuration), receives its HE public key,
    /// runs the base OTs.
    pub fn setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        model: &FixedModel,
        config: &CheetahConfig,
        rng: &mut R,
    ) -> Result<Self, BackendError> {
        let spec = ModelSpec::of(model);
        let plan = Plan::new(&spec)?;
        let params = he_params(&plan, config)?;
        ch.set_step("setup/hello");
        let hello = Hello::decode(&ch.recv()?)?;
        if hello.digest != spec.digest {
            return Err(BackendError::ModelMismatch {
                expected: hex::encode(hello.digest),
                actual: hex::encode(spec.digest),
            });
        }
        let ours = params.weight_bits();
        if hello.mpc != config.mpc || u32::from(hello.weight_bits) != ours || hello.ot != config.ot
        {
            return Err(BackendError::ConfigMismatch {
                ours: CheetahConfig::describe(config.ot, &config.mpc, ours),
                peer: CheetahConfig::describe(hello.ot, &hello.mpc, u32::from(hello.weight_bits)),
            });
        }
        ch.set_step("setup/he-keys");
        let he = he::server_setup(ch, params)?;
        ch.set_step("setup/base-ot");
        let mpc = MpcSession::setup_with(ch, Party::Server, config.mpc, config.ot, rng)?;
        Ok(Self {
            plan,
            spec,
            linear: hello.linear,
            he,
            mpc,
            batches: 0,
            poisoned: false,
        })
    }

    /// Batches served so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Checks a header against the model and the policy, charging the budget last.
    fn admit(&self, h: &BatchHeader, policy: &mut dyn BatchPolicy) -> Result<(), BatchRefusal> {
        if h.rows == 0 {
            return Err(BatchRefusal::NoRows);
        }
        let expected = self.plan.input_len as u64;
        if u64::from(h.cols) != expected {
            return Err(BatchRefusal::Columns {
                declared: u64::from(h.cols),
                expected,
            });
        }
        let max = policy.max_rows();
        if u64::from(h.rows) > max {
            return Err(BatchRefusal::TooManyRows {
                rows: u64::from(h.rows),
                max,
            });
        }
        if !policy.allows(h.output) {
            return Err(BatchRefusal::LogitsNotAllowed);
        }
        policy.charge(u64::from(h.rows))
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_inner<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        msg: &[u8],
        model: &FixedModel,
        policy: &mut dyn BatchPolicy,
        hook: &mut dyn ServerHook,
        rng: &mut R,
    ) -> Result<BatchSummary, BackendError> {
        let spec = ModelSpec::of(model);
        if spec.layers != self.spec.layers
            || spec.fixed != self.spec.fixed
            || spec.input_len != self.spec.input_len
        {
            return Err(BackendError::ArchitectureChanged);
        }
        let h = BatchHeader::decode(msg)?;
        self.admit(&h, policy)?;
        let rows = h.rows as usize;
        let batch = self.batches;
        debug!(batch, rows, output = %h.output, "cheetah batch accepted");
        let plan = &self.plan;
        let ring = plan.fixed.ring();
        let at = |layer, op, cols| HookPoint {
            batch,
            layer,
            op,
            rows,
            cols,
        };
        let mut pre = match self.linear {
            LinearMode::Online => Vec::new(),
            LinearMode::Preprocessed => {
                let shares = server_offline(ch, &self.he, plan, model, rows, rng)?;
                ch.set_step("offline/ot");
                let mpc = self.mpc.config();
                let (recv, send) = batch_cots(plan, &mpc, rows, h.output);
                self.mpc
                    .ot()
                    .reserve(ch, send, recv)
                    .map_err(MpcError::from)?;
                shares
            }
        }
        .into_iter();
        // The server's share of the current values; absent (zero) before the first layer.
        let mut xs: Option<Zeroizing<Vec<u64>>> = None;
        for stage in &plan.stages {
            match *stage {
                Stage::Linear {
                    group,
                    index,
                    inputs,
                    outputs,
                    post,
                } => {
                    let Some(FixedLayer::Dense(d)) = model.layers().get(index) else {
                        return Err(BackendError::ArchitectureChanged);
                    };
                    ch.set_step(&format!("layer{group}/linear"));
                    let xs_now = xs.as_deref().map(|v| v.as_slice());
                    let mut y = match self.linear {
                        LinearMode::Online => server_linear(
                            ch,
                            &self.he,
                            plan,
                            d.weight(),
                            d.bias(),
                            xs_now,
                            rows,
                            inputs,
                            outputs,
                            rng,
                        )?,
                        LinearMode::Preprocessed => {
                            let r = pre.next().ok_or(BackendError::ArchitectureChanged)?;
                            server_linear_preprocessed(
                                ch, ring, d, xs_now, &r, rows, inputs, outputs,
                            )?
                        }
                    };
                    hook.shares(at(group, HookOp::Linear, outputs), &mut y);
                    let (op, hop) = match post {
                        Post::ReluTrunc => (NonLinear::ReluTrunc, HookOp::ReluTrunc),
                        Post::Trunc => (NonLinear::Trunc, HookOp::Trunc),
                    };
                    ch.set_step(&format!("layer{group}/{}", op.name()));
                    let mut z = nonlinear(&mut self.mpc, ch, plan, &y, outputs, op)?;
                    hook.shares(at(group, hop, outputs), &mut z);
                    xs = Some(z);
                }
                Stage::Relu { group, width } => {
                    let x = xs
                        .take()
                        .unwrap_or_else(|| Zeroizing::new(vec![0; rows * width]));
                    ch.set_step(&format!("layer{group}/relu"));
                    let mut z = nonlinear(&mut self.mpc, ch, plan, &x, width, NonLinear::Relu)?;
                    hook.shares(at(group, HookOp::Relu, width), &mut z);
                    xs = Some(z);
                }
            }
        }
        let classes = plan.output_len;
        let mut out = xs.ok_or_else(|| {
            BackendError::UnsupportedModel("no dense layer (nothing to output)".into())
        })?;
        let last = match plan.stages.last() {
            Some(Stage::Linear { group, .. } | Stage::Relu { group, .. }) => *group,
            None => 0,
        };
        hook.shares(at(last, HookOp::Output, classes), &mut out);
        match h.output {
            OutputMode::Labels => {
                ch.set_step("output/argmax");
                argmax_reveal(&mut self.mpc, ch, plan, &out)?;
            }
            OutputMode::Logits => {
                ch.set_step("output/reveal");
                self.mpc.reveal(ch, ring, &out, Party::Client)?;
            }
        }
        ch.flush()?;
        self.batches += 1;
        Ok(BatchSummary {
            index: batch,
            rows: u64::from(h.rows),
            output: h.output,
        })
    }
}

impl InferenceServer for CheetahServer {
    fn serve_batch<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        ch: &mut dyn Channel,
        model: &FixedModel,
        policy: &mut dyn BatchPolicy,
        hook: &mut dyn ServerHook,
        rng: &mut R,
    ) -> Result<Option<BatchSummary>, BackendError> {
        if self.poisoned {
            return Err(BackendError::Poisoned);
        }
        ch.set_step("batch/header");
        let msg = match ch.recv() {
            Ok(m) => m,
            // the client ended the session between two batches
            Err(ChannelError::Closed) => return Ok(None),
            Err(e) => {
                self.poisoned = true;
                return Err(e.into());
            }
        };
        let r = self.batch_inner(ch, &msg, model, policy, hook, rng);
        if r.is_err() {
            self.poisoned = true;
        }
        r.map(Some)
    }
}
