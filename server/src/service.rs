//! The gRPC service: `GetModelInfo`, `GetPublicPool` and `Session`.
//!
//! A session: read the start frame (with a timeout), check it against the policy, the
//! backend's own check and the caller's budget, answer `Accepted`, then hand the stream
//! to the backend's runner on a blocking thread through a [`GrpcChannel`]. Every
//! acceptance, refusal and end is logged with the client's certificate subject.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fusion_common::channel::{Channel, Counting};
use fusion_common::net::pb::fusion_server::Fusion;
use fusion_common::net::pb::{self, frame::Kind};
use fusion_common::net::session::{SessionAccepted, SessionStart};
use fusion_common::net::stream::{
    ChannelConfig, GrpcChannel, OUTBOUND_QUEUE, inbound_capacity, spawn_pump,
};
use fusion_common::net::tls::certificate_subject;
use fusion_common::net::{Budget, OutputMode, ServiceInfo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::runner::{MemoryHold, Refusal, Registry, RunnerError, SessionRunner, StartInfo};
use crate::state::ServerState;

/// Bytes per MiB (the memory cap's unit).
const MIB: u64 = 1 << 20;

/// Counters the tests and the logs use.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) sessions_accepted: AtomicU64,
    pub(crate) sessions_refused: AtomicU64,
    pub(crate) sessions_ok: AtomicU64,
    pub(crate) sessions_failed: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// TLS handshakes that failed (no or bad client certificate, not TLS, ...)
    pub handshakes_failed: u64,
    /// sessions accepted
    pub sessions_accepted: u64,
    /// sessions refused at the start
    pub sessions_refused: u64,
    /// accepted sessions whose runner finished cleanly
    pub sessions_ok: u64,
    /// accepted sessions that ended with an error
    pub sessions_failed: u64,
}

impl ServerStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            handshakes_failed: g(&self.handshakes_failed),
            sessions_accepted: g(&self.sessions_accepted),
            sessions_refused: g(&self.sessions_refused),
            sessions_ok: g(&self.sessions_ok),
            sessions_failed: g(&self.sessions_failed),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// An admitted session: its runner, its permits (a session slot, the client's slot, its
/// share of the memory cap) and the acceptance to send.
type Admitted = (
    Arc<dyn SessionRunner>,
    (OwnedSemaphorePermit, ClientSlot, MemoryHold),
    SessionAccepted,
);

/// Sessions running per client certificate subject.
type ClientCounts = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// One of a client's running sessions ([`SessionLimits::max_client_sessions`]); freed
/// when dropped.
///
/// [`SessionLimits::max_client_sessions`]: crate::state::SessionLimits::max_client_sessions
struct ClientSlot {
    counts: ClientCounts,
    client: String,
}

impl ClientSlot {
    /// Takes one of `client`'s `max` slots, or says how many it runs.
    fn take(counts: &ClientCounts, client: &str, max: usize) -> Result<Self, usize> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(client.to_owned()).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(Self {
            counts: counts.clone(),
            client: client.to_owned(),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.client);
            }
        }
    }
}

/// The service implementation.
#[derive(Debug)]
pub struct FusionService {
    state: Arc<ServerState>,
    registry: Registry,
    offered: Vec<String>,
    sessions: Arc<Semaphore>,
    /// the memory cap in MiB permits (`None`: no cap)
    memory: Option<(Arc<Semaphore>, usize)>,
    /// sessions running per client
    per_client: ClientCounts,
    next_id: AtomicU64,
    stats: Arc<ServerStats>,
}

impl FusionService {
    /// A service over `state` offering the backends `offered` (all in `registry`).
    pub(crate) fn new(
        state: Arc<ServerState>,
        registry: Registry,
        offered: Vec<String>,
        stats: Arc<ServerStats>,
    ) -> Self {
        let sessions = Arc::new(Semaphore::new(state.limits.max_sessions.max(1)));
        let memory = state.limits.max_memory.map(|bytes| {
            let mib = usize::try_from(bytes / MIB)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS);
            (Arc::new(Semaphore::new(mib)), mib)
        });
        Self {
            state,
            registry,
            offered,
            sessions,
            memory,
            per_client: ClientCounts::default(),
            next_id: AtomicU64::new(1),
            stats,
        }
    }

    fn refuse(&self, client: &str, refusal: Refusal) -> Status {
        bump(&self.stats.sessions_refused);
        warn!(client = %client, code = ?refusal.code, reason = %refusal.message, "session refused");
        refusal.to_status()
    }

    /// The session's share of the memory cap, by its runner's estimate: refused with
    /// `RESOURCE_EXHAUSTED` if it exceeds the whole cap, `UNAVAILABLE` while the running
    /// sessions hold too much of it.
    fn hold_memory(
        &self,
        runner: &dyn SessionRunner,
        start: &SessionStart,
    ) -> Result<MemoryHold, Refusal> {
        let Some((sem, cap)) = &self.memory else {
            return Ok(MemoryHold::default());
        };
        let need = runner.memory_estimate(start, &self.state).div_ceil(MIB);
        let need = usize::try_from(need).unwrap_or(usize::MAX);
        if need > *cap {
            let rows = match start.rows {
                0 => "the largest batch".to_owned(),
                r => format!("{r} rows"),
            };
            // the most rows that would fit (the estimate grows with the rows; 0 rows
            // declared means the policy's largest batch)
            let fits = |rows: u64| {
                let mut s = start.clone();
                s.rows = rows;
                runner.memory_estimate(&s, &self.state).div_ceil(MIB) <= *cap as u64
            };
            let advice = if fits(1) {
                let (mut lo, mut hi) = match start.rows {
                    0 => (1, self.state.policy.max_rows.max(2)),
                    r => (1, r.max(2)),
                };
                while lo + 1 < hi {
                    let mid = lo + (hi - lo) / 2;
                    if fits(mid) { lo = mid } else { hi = mid }
                }
                format!("declare at most {lo} rows")
            } else {
                "a 1-row session does not fit either".to_owned()
            };
            return Err(Refusal {
                code: tonic::Code::ResourceExhausted,
                message: format!(
                    "a {} session of {rows} needs about {need} MiB, more than this \
                     server's memory cap of {cap} MiB: {advice}",
                    start.backend
                ),
            });
        }
        if need == 0 {
            return Ok(MemoryHold::default());
        }
        let permits = u32::try_from(need).unwrap_or(u32::MAX);
        let permit = sem
            .clone()
            .try_acquire_many_owned(permits)
            .map_err(|_| Refusal {
                code: tonic::Code::Unavailable,
                message: format!(
                    "server busy: running sessions hold {} of its {cap} MiB memory cap, \
                     this one needs about {need} MiB",
                    cap - sem.available_permits()
                ),
            })?;
        Ok(MemoryHold::new(permit))
    }

    /// Policy, backend, memory and budget checks; on success the session's number, its
    /// permits and the acceptance to send.
    fn admit(&self, client: &str, start: &SessionStart) -> Result<Admitted, Refusal> {
        let runner = match self.registry.get(&start.backend) {
            Some(r) if self.offered.contains(&start.backend) => r,
            _ => {
                return Err(Refusal {
                    code: tonic::Code::Unimplemented,
                    message: format!(
                        "backend {:?} is not offered here (offered: {})",
                        start.backend,
                        self.offered.join(", ")
                    ),
                });
            }
        };
        let policy = &self.state.policy;
        if start.rows > policy.max_rows {
            return Err(Refusal::policy(format!(
                "batch of {} rows exceeds the maximum of {}",
                start.rows, policy.max_rows
            )));
        }
        let output = match (start.output, policy.output) {
            (Some(OutputMode::Logits), OutputMode::Labels) => {
                return Err(Refusal::policy(
                    "this server releases labels only (logits were requested)",
                ));
            }
            (Some(o), _) => o,
            (None, p) => p,
        };
        runner.check_start(start, &self.state)?;
        let permit = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal {
                code: tonic::Code::Unavailable,
                message: format!(
                    "server busy: {} sessions running",
                    self.state.limits.max_sessions
                ),
            })?;
        let max = self.state.limits.max_client_sessions.max(1);
        let slot = ClientSlot::take(&self.per_client, client, max).map_err(|n| Refusal {
            code: tonic::Code::ResourceExhausted,
            message: format!(
                "{client} already runs {n} sessions, the most one client may run at once"
            ),
        })?;
        let memory = self.hold_memory(runner.as_ref(), start)?;
        let exhausted = |e: crate::state::BudgetExhausted| Refusal {
            code: tonic::Code::ResourceExhausted,
            message: e.to_string(),
        };
        let budget = if runner.charges_per_batch() {
            // charged per batch by the runner; refuse now only if nothing is left
            let left = self.state.budgets.remaining(client);
            if let Budget::Rows {
                limit,
                remaining: 0,
            } = left
            {
                return Err(exhausted(crate::state::BudgetExhausted {
                    requested: start.rows.max(1),
                    remaining: 0,
                    limit,
                }));
            }
            left
        } else {
            self.state
                .budgets
                .charge(client, start.rows)
                .map_err(exhausted)?
        };
        let accepted = SessionAccepted {
            session_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            backend: start.backend.clone(),
            rows: start.rows,
            cols: start.cols,
            output,
            budget,
            params: Default::default(),
        };
        Ok((runner, (permit, slot, memory), accepted))
    }
}

/// The caller's certificate subject (the TLS layer already required and verified it).
fn client_subject<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let first = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    certificate_subject(first).map_err(|e| Status::unauthenticated(e.to_string()))
}

#[tonic::async_trait]
impl Fusion for FusionService {
    async fn get_model_info(
        &self,
        req: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let client = client_subject(&req)?;
        info!(client = %client, "model info");
        let s = &self.state;
        let info = ServiceInfo {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            model: s.model.as_ref().map(|m| m.summary.clone()),
            backends: self.offered.clone(),
            output: s.policy.output,
            max_rows: s.policy.max_rows,
            budget: s.budgets.remaining(&client),
            max_frame_bytes: s.limits.frames.frame_limit as u64,
            max_message_bytes: s.limits.frames.max_message as u64,
            client_subject: client,
        };
        Ok(Response::new(info.to_pb()))
    }

    async fn get_public_pool(
        &self,
        req: Request<pb::PublicPoolRequest>,
    ) -> Result<Response<pb::PublicPool>, Status> {
        let client = client_subject(&req)?;
        info!(client = %client, "public pool");
        match &self.state.model {
            Some(m) => Ok(Response::new(m.pool.to_pb())),
            None => Err(Status::failed_precondition(
                "this server has no model loaded",
            )),
        }
    }

    type SessionStream = ReceiverStream<Result<pb::Frame, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::Frame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let client = client_subject(&req)?;
        let mut inbound = req.into_inner();
        let limits = self.state.limits;

        // 1. the start frame
        let first = match tokio::time::timeout(limits.start_timeout, inbound.message()).await {
            Err(_) => {
                return Err(self.refuse(
                    &client,
                    Refusal {
                        code: tonic::Code::DeadlineExceeded,
                        message: format!("no start frame within {:?}", limits.start_timeout),
                    },
                ));
            }
            Ok(Err(status)) => {
                return Err(self.refuse(
                    &client,
                    Refusal::invalid(format!("reading the start frame: {}", status.message())),
                ));
            }
            Ok(Ok(None)) => {
                return Err(self.refuse(
                    &client,
                    Refusal::invalid("the stream ended before a start frame"),
                ));
            }
            Ok(Ok(Some(frame))) => frame,
        };
        let Some(Kind::Start(start)) = first.kind else {
            return Err(self.refuse(
                &client,
                Refusal::invalid("the first frame of a session must be a start frame"),
            ));
        };
        let (start, client_limits) = SessionStart::from_pb(start)
            .map_err(|e| self.refuse(&client, Refusal::invalid(format!("bad start: {e}"))))?;

        // 2. policy, backend check, permits (sessions, the client's, memory), budget
        let (runner, (permit, slot, memory), accepted) = self
            .admit(&client, &start)
            .map_err(|r| self.refuse(&client, r))?;
        bump(&self.stats.sessions_accepted);
        info!(
            session = accepted.session_id,
            client = %client,
            backend = %accepted.backend,
            rows = accepted.rows,
            cols = accepted.cols,
            output = %accepted.output,
            budget = %accepted.budget,
            memory_mib = memory.mib(),
            "session accepted"
        );

        // 3. answer and hand over to the runner
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let accepted_frame = pb::Frame {
            kind: Some(Kind::Accepted(accepted.to_pb(limits.frames))),
        };
        out_tx
            .send(Ok(accepted_frame))
            .await
            .map_err(|_| Status::cancelled("the client went away"))?;
        let config = ChannelConfig {
            recv: limits.frames,
            send: limits.frames.meet(&client_limits),
            idle_timeout: Some(limits.idle_timeout),
        };
        let inbound = spawn_pump(inbound, inbound_capacity(&limits.frames));
        let ch = GrpcChannel::server(out_tx, inbound, config, tokio::runtime::Handle::current());
        let info = StartInfo {
            session_id: accepted.session_id,
            client,
            backend: accepted.backend,
            rows: accepted.rows,
            cols: accepted.cols,
            output: accepted.output,
            params: start.params,
            memory,
        };
        let state = self.state.clone();
        let stats = self.stats.clone();
        tokio::task::spawn_blocking(move || {
            let _permits = (permit, slot);
            run_session(ch, runner.as_ref(), &info, &state, &stats);
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

/// Runs one session to its end on the current (blocking) thread and ends the stream:
/// cleanly, or with the error's status.
fn run_session(
    ch: GrpcChannel,
    runner: &dyn SessionRunner,
    info: &StartInfo,
    state: &ServerState,
    stats: &ServerStats,
) {
    let mut counting = Counting::new(ch);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        runner.run(&mut counting as &mut dyn Channel, info, state)
    }))
    .unwrap_or_else(|_| {
        Err(RunnerError::Panicked {
            backend: info.backend.clone(),
        })
    });
    let (ch, cost) = counting.into_parts();
    let t = cost.total("total");
    match result {
        Ok(()) => {
            bump(&stats.sessions_ok);
            info!(
                session = info.session_id,
                client = %info.client,
                backend = %info.backend,
                bytes_sent = t.bytes_sent,
                bytes_received = t.bytes_received,
                rounds = t.rounds,
                seconds = t.seconds,
                "session finished"
            );
            // dropping the channel ends the response stream with status OK
            drop(ch);
        }
        Err(e) => {
            bump(&stats.sessions_failed);
            warn!(
                session = info.session_id,
                client = %info.client,
                backend = %info.backend,
                error = %e,
                bytes_sent = t.bytes_sent,
                bytes_received = t.bytes_received,
                "session failed"
            );
            ch.abort(e.code(), &format!("session {}: {e}", info.session_id));
        }
    }
}
