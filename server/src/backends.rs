//! The secure-inference runners: the server role of each family of
//! [`fusion_common::backend`], over the session's channel, with the server's policy and
//! per-client budgets.
//!
//! A session: the start is checked ([`SessionRunner::check_start`]: a model is served,
//! the declared columns are its input length), then the family's set-up, then batches
//! until the client closes its stream. Each batch header is checked against the policy
//! ([`SessionPolicy`]: largest batch, output mode) and charged to the client's budget;
//! a refusal ends the session with its own gRPC code and message (the server goes on
//! serving others).

use fusion_common::backend::{
    BackendError, BatchPolicy, BatchRefusal, Cheetah, CheetahConfig, Honest, InferenceServer,
    OutputMode, SecureInference, ServerHook,
};
use fusion_common::fixed::{FixedLayer, FixedModel};
use fusion_common::net::session::SessionStart;
use fusion_common::ot::Ferret;
use fusion_common::ot::ferret::{MAIN, OtKind};
use tonic::Code;

use fusion_common::channel::Channel;

use crate::runner::{Refusal, Registry, RunnerError, SessionRunner, StartInfo};
use crate::state::ServerState;

/// Registers every family this build offers (`cheetah`).
pub(crate) fn register_all(r: &mut Registry) {
    // the names are valid and distinct from `echo`: registration cannot fail
    let _ = r.register(Cheetah::NAME, CheetahRunner::default());
}

/// What a batch may do in one session: the server's policy (largest batch, at most the
/// rows the session declared; the output mode) and the client's budget.
#[derive(Debug)]
pub struct SessionPolicy<'a> {
    state: &'a ServerState,
    client: &'a str,
    max_rows: u64,
}

impl<'a> SessionPolicy<'a> {
    /// The policy of a session started with `start`.
    pub fn new(state: &'a ServerState, start: &'a StartInfo) -> Self {
        let max_rows = match start.rows {
            0 => state.policy.max_rows,
            r => r.min(state.policy.max_rows),
        };
        Self {
            state,
            client: &start.client,
            max_rows,
        }
    }
}

impl BatchPolicy for SessionPolicy<'_> {
    fn max_rows(&self) -> u64 {
        self.max_rows
    }

    fn allows(&self, output: OutputMode) -> bool {
        output == OutputMode::Labels || self.state.policy.output == OutputMode::Logits
    }

    fn charge(&mut self, rows: u64) -> Result<(), BatchRefusal> {
        self.state
            .budgets
            .charge(self.client, rows)
            .map(|_| ())
            .map_err(|e| BatchRefusal::Budget {
                requested: e.requested,
                remaining: e.remaining,
                limit: e.limit,
            })
    }
}

/// The gRPC code of a refused batch.
pub fn refusal_code(r: &BatchRefusal) -> Code {
    match r {
        BatchRefusal::NoRows | BatchRefusal::Columns { .. } => Code::InvalidArgument,
        BatchRefusal::Budget { .. } => Code::ResourceExhausted,
        _ => Code::FailedPrecondition,
    }
}

/// A backend error as the session's end: refusals with their own code, transport
/// errors as such, the rest as a protocol failure (`ABORTED`).
pub fn runner_error(backend: &str, e: BackendError) -> RunnerError {
    match e {
        BackendError::Refused(r) => RunnerError::Refused(Refusal {
            code: refusal_code(&r),
            message: format!("{backend}: batch refused: {r}"),
        }),
        BackendError::Channel(c) => RunnerError::Channel(c),
        other => RunnerError::protocol(backend, other),
    }
}

/// Checks a start of a family that needs the served model.
pub(crate) fn check_model_start(start: &SessionStart, state: &ServerState) -> Result<(), Refusal> {
    let Some(m) = &state.model else {
        return Err(Refusal::policy("this server has no model loaded"));
    };
    let expected = m.model.fixed_model().input_len() as u64;
    if start.cols != expected {
        return Err(Refusal::invalid(format!(
            "batch declares {} columns per row, the model takes {expected}",
            start.cols
        )));
    }
    Ok(())
}

/// The fixed-point form of the model this server announces, or the refusal of a family
/// that needs one.
pub(crate) fn announced_model(state: &ServerState) -> Result<&FixedModel, RunnerError> {
    Ok(state
        .model
        .as_ref()
        .ok_or_else(|| RunnerError::Refused(Refusal::policy("this server has no model")))?
        .model
        .fixed_model())
}

/// A `cheetah` session: set-up for the announced model (the client checks its digest),
/// then batches under the session's policy until the client closes, each computed with
/// `computed` (the announced model unless `None` is overridden, as a cheating server of
/// the `adversary` feature does) and passed through `hook`. Returns the batches served.
pub(crate) fn serve_cheetah(
    ch: &mut dyn Channel,
    start: &StartInfo,
    state: &ServerState,
    config: &CheetahConfig,
    computed: Option<&FixedModel>,
    hook: &mut dyn ServerHook,
) -> Result<u64, RunnerError> {
    let name = Cheetah::NAME;
    let announced = announced_model(state)?;
    let mut rng = rand::rng();
    let mut server = Cheetah::server_setup(ch, announced, config, &mut rng)
        .map_err(|e| runner_error(name, e))?;
    let mut policy = SessionPolicy::new(state, start);
    let served = server.serve(
        ch,
        computed.unwrap_or(announced),
        &mut policy,
        hook,
        &mut rng,
    );
    // Zeroizing the session's state takes a while (its COT buffers hold up to a batch's
    // COTs and one Ferret iteration per direction: ~0.2 s here): on a thread of its own,
    // so that the session's end status is not held up (if no thread can be made, it
    // happens here). The session's share of the memory cap goes with it.
    let hold = start.memory.clone();
    let _ = std::thread::Builder::new()
        .name("zeroize-session".into())
        .spawn(move || {
            drop(server);
            drop(hold);
        });
    served.map_err(|e| runner_error(name, e))
}

/// Memory of a `cheetah` session besides its Ferret buffers and per-row state: keys,
/// the model's encodings, transport queues (a 1-row session measured 52 MB here: server
/// VmHWM over an idle server's, `fusion-client infer --mnist-test 0..1 --no-fusion`).
const CHEETAH_BASE_BYTES: u64 = 64 << 20;

/// Memory of a `cheetah` batch per row and per unit of the model's Dense outputs (each a
/// truncation, the hidden ones a ReLU: their COTs, shares and HE plaintexts). Measured on
/// the bundled 784-128-128-10 model (266 units), server VmHWM less an idle server's:
/// 372 MB at 128 rows, 444 MB at 1,024 (one batch), 534 MB for four 1,024-row batches in
/// one session (the session's COT buffers keep the capacity of its largest extension,
/// at most a batch's COTs and one Ferret iteration); both linear modes alike. The
/// increments put a row near 300 bytes per unit; 1,024 leaves room for the buffers'
/// growth.
const CHEETAH_ROW_UNIT_BYTES: u64 = 1024;

/// The most memory a `cheetah` session with batches of up to `rows` rows of a model with
/// `units` Dense outputs per row holds at once, bytes (the server's admission estimate):
/// the base, what Ferret holds beyond a batch's COTs ([`Ferret::max_surplus_bytes`],
/// about 346 MiB once a main iteration has run in both directions) and the rows. For
/// the bundled model at 1,024 rows about 676 MiB (what the server charges the session,
/// [`admission_memory`](crate::runner::admission_memory), adds the transport's inbound
/// data).
///
/// `None` for a configuration over IKNP: not estimated. The row term was measured over
/// Ferret, which writes its COTs into the session's buffers; IKNP also holds, while it
/// extends, both parties' `u` matrices (16 bytes per COT each way) and the fresh batch
/// before it is copied into the session's buffers (17 bytes per COT), for up to a whole
/// batch's COTs at once (the `offline/ot` step of the preprocessed mode), which nothing
/// here counts. The server never runs IKNP: its `cheetah` runner is registered with
/// [`CheetahConfig::default`] (Ferret; the adversary runners too), `serve` has no option
/// to change that, and the server refuses a client whose hello names another core OT
/// (`cheetah.rs`, the hello check). A runner built with an IKNP configuration by a
/// library user is refused under a memory cap (see
/// [`SessionRunner::memory_estimate`]) rather than admitted on an under-count.
pub fn cheetah_memory_estimate(config: &CheetahConfig, units: u64, rows: u64) -> Option<u64> {
    let ot = match config.ot {
        OtKind::Ferret => Ferret::max_surplus_bytes(&MAIN) as u64,
        _ => return None,
    };
    Some(
        CHEETAH_BASE_BYTES.saturating_add(ot).saturating_add(
            rows.saturating_mul(units)
                .saturating_mul(CHEETAH_ROW_UNIT_BYTES),
        ),
    )
}

/// Dense outputs per row of the served model (0 without one).
fn model_units(state: &ServerState) -> u64 {
    let Some(m) = &state.model else { return 0 };
    m.model
        .fixed_model()
        .layers()
        .iter()
        .map(|l| match l {
            FixedLayer::Dense(d) => d.outputs() as u64,
            _ => 0,
        })
        .sum()
}

/// The runner's estimate of a `cheetah`-family session under `config`: batches of up to
/// the rows it declared (the policy's largest if none); `u64::MAX` (not estimated, see
/// [`SessionRunner::memory_estimate`]) where [`cheetah_memory_estimate`] has none. The
/// server adds the inbound data the session's transport may hold whatever the client
/// sends ([`admission_memory`](crate::runner::admission_memory): about 214 MiB with the
/// default limits; the measured figures above are of honest clients, whose messages are
/// far below the limits).
pub(crate) fn cheetah_session_memory(
    config: &CheetahConfig,
    start: &SessionStart,
    state: &ServerState,
) -> u64 {
    let rows = match start.rows {
        0 => state.policy.max_rows,
        r => r.min(state.policy.max_rows),
    };
    cheetah_memory_estimate(config, model_units(state), rows).unwrap_or(u64::MAX)
}

/// The server role of `cheetah`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheetahRunner {
    /// the 2PC configuration clients must use
    pub config: CheetahConfig,
}

impl SessionRunner for CheetahRunner {
    fn needs_model(&self) -> bool {
        true
    }

    fn charges_per_batch(&self) -> bool {
        true
    }

    fn check_start(&self, start: &SessionStart, state: &ServerState) -> Result<(), Refusal> {
        check_model_start(start, state)
    }

    fn memory_estimate(&self, start: &SessionStart, state: &ServerState) -> u64 {
        cheetah_session_memory(&self.config, start, state)
    }

    fn run(
        &self,
        ch: &mut dyn Channel,
        start: &StartInfo,
        state: &ServerState,
    ) -> Result<(), RunnerError> {
        let batches = serve_cheetah(ch, start, state, &self.config, None, &mut Honest)?;
        tracing::info!(
            session = start.session_id,
            client = %start.client,
            batches,
            "cheetah session done"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::admission_memory;
    use crate::state::{Policy, SessionLimits};
    use fusion_common::channel::ChannelError;
    use fusion_common::net::stream::inbound_bytes;
    use std::collections::BTreeMap;

    fn start(rows: u64) -> StartInfo {
        StartInfo {
            session_id: 1,
            client: "CN=a".into(),
            backend: "cheetah".into(),
            rows,
            cols: 784,
            output: OutputMode::Labels,
            params: BTreeMap::new(),
            memory: Default::default(),
        }
    }

    #[test]
    fn the_memory_estimate_covers_ferret_and_the_rows_measured_on_the_bundled_model() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/mnist-dnn.safetensors");
        let served = crate::state::ServedModel::load(&path).unwrap();
        let state = ServerState::new(Some(served), Policy::default(), SessionLimits::default());
        assert_eq!(model_units(&state), 128 + 128 + 10);
        let ferret = CheetahConfig::with_ot(OtKind::Ferret);
        let iknp = CheetahConfig::with_ot(OtKind::Iknp);
        // what the server charges a session against its cap
        let session = |config: &CheetahConfig, rows: u64| {
            let start = SessionStart::new("cheetah").with_batch(rows, 784);
            admission_memory(&CheetahRunner { config: *config }, &start, &state)
        };
        // no rows declared: the policy's largest batch (1,024)
        assert_eq!(session(&ferret, 0), session(&ferret, 1024));
        // the transport's inbound data is counted, whatever the client sends
        let inbound = inbound_bytes(&state.limits.frames);
        assert_eq!(
            Some(session(&ferret, 1024)),
            cheetah_memory_estimate(&ferret, 266, 1024).map(|m| m + inbound)
        );
        assert!((200 << 20..230 << 20).contains(&inbound), "{inbound}");
        assert_eq!(session(&ferret, 5000), session(&ferret, 1024));
        // Ferret's surplus, bits included
        assert_eq!(
            cheetah_memory_estimate(&ferret, 266, 1024),
            Some(
                CHEETAH_BASE_BYTES
                    + 2 * 16 * (MAIN.n() + MAIN.reserve()) as u64
                    + MAIN.usable() as u64
                    + 1024 * 266 * CHEETAH_ROW_UNIT_BYTES
            )
        );
        // IKNP's extension buffers are not estimated: not admitted on an under-count
        assert_eq!(cheetah_memory_estimate(&iknp, 266, 1024), None);
        assert_eq!(session(&iknp, 1), u64::MAX);
        assert_eq!(
            session(&ferret, 1024) - session(&ferret, 24),
            1000 * 266 * CHEETAH_ROW_UNIT_BYTES
        );
        // above what a server held for such sessions (VmHWM less an idle server's, see
        // the constants): 1 row 52 MB (before any main iteration: a session of many
        // batches runs them later), 128 rows 372 MB, 1,024 rows 444 MB, four batches of
        // 1,024 rows 534 MB; and not far above at the largest batch
        for (rows, measured) in [(1, 52_000_000), (128, 372_000_000), (1024, 534_000_000)] {
            assert!(session(&ferret, rows) > measured, "{rows}");
        }
        assert!(session(&ferret, 1024) - inbound < 720_000_000);
    }

    #[test]
    fn the_session_policy_caps_rows_checks_the_output_and_charges_the_budget() {
        let state = ServerState::new(
            None,
            Policy {
                max_rows: 100,
                budget: Some(10),
                ..Policy::default()
            },
            SessionLimits::default(),
        );
        let s0 = start(0);
        let s7 = start(7);
        let s500 = start(500);
        assert_eq!(SessionPolicy::new(&state, &s0).max_rows(), 100);
        assert_eq!(SessionPolicy::new(&state, &s7).max_rows(), 7);
        assert_eq!(SessionPolicy::new(&state, &s500).max_rows(), 100);
        let mut p = SessionPolicy::new(&state, &s7);
        assert!(p.allows(OutputMode::Labels) && !p.allows(OutputMode::Logits));
        p.charge(6).unwrap();
        assert_eq!(
            p.charge(5),
            Err(BatchRefusal::Budget {
                requested: 5,
                remaining: 4,
                limit: 10
            })
        );
        // the budget is the server's, per certificate
        assert_eq!(state.budgets.remaining("CN=a").remaining(), 4);
    }

    #[test]
    fn backend_errors_become_session_ends_with_their_codes() {
        let e = runner_error("cheetah", BackendError::Refused(BatchRefusal::NoRows));
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "cheetah: batch refused: a batch of zero rows"
        );
        let e = runner_error(
            "cheetah",
            BackendError::Refused(BatchRefusal::Budget {
                requested: 1,
                remaining: 0,
                limit: 1,
            }),
        );
        assert_eq!(e.code(), Code::ResourceExhausted);
        let e = runner_error(
            "cheetah",
            BackendError::Refused(BatchRefusal::LogitsNotAllowed),
        );
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = runner_error(
            "cheetah",
            BackendError::Channel(ChannelError::FrameTooLarge {
                actual: 2,
                limit: 1,
            }),
        );
        assert_eq!(e.code(), Code::ResourceExhausted);
        let e = runner_error("cheetah", BackendError::Poisoned);
        assert_eq!(e.code(), Code::Aborted);
    }
}
