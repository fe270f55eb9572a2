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
    OutputMode, SecureInference,
};
use fusion_common::net::session::SessionStart;
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
fn check_model_start(start: &SessionStart, state: &ServerState) -> Result<(), Refusal> {
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

    fn run(
        &self,
        ch: &mut dyn Channel,
        start: &StartInfo,
        state: &ServerState,
    ) -> Result<(), RunnerError> {
        let name = Cheetah::NAME;
        let model = state
            .model
            .as_ref()
            .ok_or_else(|| RunnerError::Refused(Refusal::policy("this server has no model")))?
            .model
            .fixed_model();
        let mut rng = rand::rng();
        let mut server = Cheetah::server_setup(ch, model, &self.config, &mut rng)
            .map_err(|e| runner_error(name, e))?;
        let mut policy = SessionPolicy::new(state, start);
        let batches = server
            .serve(ch, model, &mut policy, &mut Honest, &mut rng)
            .map_err(|e| runner_error(name, e))?;
        tracing::info!(
            session = start.session_id,
            client = %start.client,
            batches,
            "cheetah session done"
        );
        Ok(())
    }
}
