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

use crate::runner::{
    MemoryHold, Refusal, Registry, RunnerError, SessionRunner, StartInfo, admission_memory,
};
use crate::state::ServerState;

/// Bytes per MiB (the memory cap's unit).
const MIB: u64 = 1 << 20;

/// Counters the tests and the logs use.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) handshakes_running: AtomicU64,
    pub(crate) handshakes_peak: AtomicU64,
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
    /// TLS handshakes under way now
    pub handshakes_running: u64,
    /// the most TLS handshakes that were ever under way at once
    pub handshakes_peak: u64,
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
            handshakes_running: g(&self.handshakes_running),
            handshakes_peak: g(&self.handshakes_peak),
            sessions_accepted: g(&self.sessions_accepted),
            sessions_refused: g(&self.sessions_refused),
            sessions_ok: g(&self.sessions_ok),
            sessions_failed: g(&self.sessions_failed),
        }
    }
}

/// One running TLS handshake, counted in [`ServerStats`] until dropped.
pub(crate) struct HandshakeRunning(Arc<ServerStats>);

impl ServerStats {
    /// Counts a handshake as running (and the peak) until the guard is dropped.
    pub(crate) fn handshake_started(self: &Arc<Self>) -> HandshakeRunning {
        let now = self.handshakes_running.fetch_add(1, Ordering::Relaxed) + 1;
        self.handshakes_peak.fetch_max(now, Ordering::Relaxed);
        HandshakeRunning(self.clone())
    }
}

impl Drop for HandshakeRunning {
    fn drop(&mut self) {
        self.0.handshakes_running.fetch_sub(1, Ordering::Relaxed);
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

/// What the running sessions of one client certificate hold: session slots
/// ([`SessionLimits::max_client_sessions`]) and MiB of the memory cap
/// ([`SessionLimits::max_client_memory`]).
///
/// [`SessionLimits::max_client_sessions`]: crate::state::SessionLimits::max_client_sessions
/// [`SessionLimits::max_client_memory`]: crate::state::SessionLimits::max_client_memory
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientUse {
    sessions: usize,
    mib: usize,
}

/// [`ClientUse`] per client certificate subject (a client using nothing has no entry).
pub(crate) type ClientUses = Arc<std::sync::Mutex<std::collections::HashMap<String, ClientUse>>>;

fn lock_uses(
    uses: &ClientUses,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, ClientUse>> {
    // a panic elsewhere while holding the lock leaves a valid map: keep going
    uses.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives back `sessions` slots and `mib` MiB of `client`'s use; forgets a client that
/// uses nothing any more.
fn release_use(uses: &ClientUses, client: &str, sessions: usize, mib: usize) {
    let mut c = lock_uses(uses);
    if let Some(u) = c.get_mut(client) {
        u.sessions = u.sessions.saturating_sub(sessions);
        u.mib = u.mib.saturating_sub(mib);
        if *u == ClientUse::default() {
            c.remove(client);
        }
    }
}

/// One of a client's running sessions ([`SessionLimits::max_client_sessions`]); freed
/// when dropped.
///
/// [`SessionLimits::max_client_sessions`]: crate::state::SessionLimits::max_client_sessions
struct ClientSlot {
    uses: ClientUses,
    client: String,
}

impl ClientSlot {
    /// Takes one of `client`'s `max` slots, or says how many it runs.
    fn take(uses: &ClientUses, client: &str, max: usize) -> Result<Self, usize> {
        let mut c = lock_uses(uses);
        let u = c.entry(client.to_owned()).or_default();
        if u.sessions >= max {
            return Err(u.sessions);
        }
        u.sessions += 1;
        Ok(Self {
            uses: uses.clone(),
            client: client.to_owned(),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        release_use(&self.uses, &self.client, 1, 0);
    }
}

/// A session's MiB counted against its client's share of the memory cap
/// ([`SessionLimits::max_client_memory`]); given back when dropped (with the
/// [`MemoryHold`] that owns it, so at the same time as the cap's permits).
///
/// [`SessionLimits::max_client_memory`]: crate::state::SessionLimits::max_client_memory
pub(crate) struct ClientShare {
    uses: ClientUses,
    client: String,
    mib: usize,
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        release_use(&self.uses, &self.client, 0, self.mib);
    }
}

/// The memory cap: one permit per MiB, the cap and each client's share, in MiB.
#[derive(Debug)]
struct MemoryCap {
    permits: Arc<Semaphore>,
    cap: usize,
    share: usize,
}

/// The service implementation.
#[derive(Debug)]
pub struct FusionService {
    state: Arc<ServerState>,
    registry: Registry,
    offered: Vec<String>,
    sessions: Arc<Semaphore>,
    /// the memory cap (`None`: no cap)
    memory: Option<MemoryCap>,
    /// session slots and memory held per client
    clients: ClientUses,
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
        let mib = |bytes: u64| {
            usize::try_from(bytes / MIB)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS)
        };
        let memory = state.limits.max_memory.map(|bytes| MemoryCap {
            permits: Arc::new(Semaphore::new(mib(bytes))),
            cap: mib(bytes),
            share: mib(state.limits.max_client_memory.bytes(bytes)),
        });
        Self {
            state,
            registry,
            offered,
            sessions,
            memory,
            clients: ClientUses::default(),
            next_id: AtomicU64::new(1),
            stats,
        }
    }

    fn refuse(&self, client: &str, refusal: Refusal) -> Status {
        bump(&self.stats.sessions_refused);
        warn!(client = %client, code = ?refusal.code, reason = %refusal.message, "session refused");
        refusal.to_status()
    }

    /// The session's share of the memory cap, by its runner's estimate and its transport's
    /// inbound data ([`admission_memory`]): refused with
    /// `RESOURCE_EXHAUSTED` if it exceeds the whole cap (or the runner cannot estimate
    /// it), `UNAVAILABLE` while the running sessions hold too much of it, or `client`'s
    /// running sessions hold so much that this one would take them over the client's
    /// share (a client holding none of the cap may always start a session that fits).
    fn hold_memory(
        &self,
        client: &str,
        runner: &dyn SessionRunner,
        start: &SessionStart,
    ) -> Result<MemoryHold, Refusal> {
        let Some(MemoryCap {
            permits: sem,
            cap,
            share,
        }) = &self.memory
        else {
            return Ok(MemoryHold::default());
        };
        let estimate = admission_memory(runner, start, &self.state);
        if estimate == u64::MAX {
            return Err(Refusal {
                code: tonic::Code::ResourceExhausted,
                message: format!(
                    "the memory of a {} session in this server's configuration is not \
                     estimated: refused under the memory cap of {cap} MiB",
                    start.backend
                ),
            });
        }
        let need = usize::try_from(estimate.div_ceil(MIB)).unwrap_or(usize::MAX);
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
                admission_memory(runner, &s, &self.state).div_ceil(MIB) <= *cap as u64
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
        // the client's use is read and updated under one lock: two sessions of one
        // client cannot both pass the share check
        let mut uses = lock_uses(&self.clients);
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
        let held = uses.get(client).map_or(0, |u| u.mib);
        if held > 0 && held.saturating_add(need) > *share {
            // the permits go back as `permit` is dropped
            return Err(Refusal {
                code: tonic::Code::Unavailable,
                message: format!(
                    "server busy: {client}'s running sessions hold {held} MiB of its \
                     {share} MiB share of the {cap} MiB memory cap, this one needs about \
                     {need} MiB"
                ),
            });
        }
        uses.entry(client.to_owned()).or_default().mib += need;
        drop(uses);
        Ok(MemoryHold::new(
            permit,
            ClientShare {
                uses: self.clients.clone(),
                client: client.to_owned(),
                mib: need,
            },
        ))
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
        let slot = ClientSlot::take(&self.clients, client, max).map_err(|n| Refusal {
            code: tonic::Code::ResourceExhausted,
            message: format!(
                "{client} already runs {n} sessions, the most one client may run at once"
            ),
        })?;
        let memory = self.hold_memory(client, runner.as_ref(), start)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::ECHO;
    use crate::state::{ClientMemory, Policy, SessionLimits};

    /// Estimates 100 MiB per declared row (IKNP-like `u64::MAX` for 999 rows); the
    /// server adds the transport's inbound data.
    struct Heavy;

    impl SessionRunner for Heavy {
        fn memory_estimate(&self, start: &SessionStart, _: &ServerState) -> u64 {
            match start.rows {
                999 => u64::MAX,
                r => r * (100 << 20),
            }
        }

        fn run(
            &self,
            _: &mut dyn Channel,
            _: &StartInfo,
            _: &ServerState,
        ) -> Result<(), RunnerError> {
            Ok(())
        }
    }

    /// A service with a cap of `cap_mib` MiB (per-client share `share`), `policy`, and the
    /// `heavy` backend.
    fn service(cap_mib: u64, share: ClientMemory, policy: Policy) -> FusionService {
        service_offering("heavy", cap_mib, share, policy)
    }

    /// As [`service`], offering `backend` (`heavy` or a built-in) alone.
    fn service_offering(
        backend: &str,
        cap_mib: u64,
        share: ClientMemory,
        policy: Policy,
    ) -> FusionService {
        let limits = SessionLimits {
            max_memory: Some(cap_mib << 20),
            max_client_memory: share,
            ..SessionLimits::default()
        };
        let mut registry = Registry::with_builtins();
        registry.register("heavy", Heavy).unwrap();
        let state = Arc::new(ServerState::new(None, policy, limits));
        FusionService::new(state, registry, vec![backend.into()], Default::default())
    }

    fn heavy(rows: u64) -> SessionStart {
        SessionStart::new("heavy").with_batch(rows, 1)
    }

    /// (permits free, the client's use)
    fn usage(s: &FusionService, client: &str) -> (usize, Option<ClientUse>) {
        let free = s.memory.as_ref().unwrap().permits.available_permits();
        (free, lock_uses(&s.clients).get(client).copied())
    }

    fn refusal(r: Result<Admitted, Refusal>) -> Refusal {
        match r {
            Ok(_) => panic!("admitted"),
            Err(e) => e,
        }
    }

    /// What every session is charged for its transport's inbound data under the default
    /// frame limits (1 MiB frames, 64 MiB messages), MiB, rounded up.
    const INBOUND_MIB: usize = 215;

    #[test]
    fn every_session_is_charged_its_transports_inbound_data() {
        use fusion_common::net::frame::FrameLimits;
        use fusion_common::net::stream::inbound_bytes;
        // 16 MiB window + 1 frame + 65 queued frames of 1 MiB + 64 KiB + 2 x 64 MiB
        let inbound = inbound_bytes(&FrameLimits::default());
        assert_eq!(
            inbound,
            (16 << 20) + 66 * ((1 << 20) + (64 << 10)) + 2 * (64 << 20)
        );
        assert_eq!(inbound.div_ceil(MIB) as usize, INBOUND_MIB);
        // `echo` estimates nothing of its own: it is charged the inbound data
        let s = service_offering(ECHO, 500, ClientMemory::Whole, Policy::default());
        let echo = SessionStart::new(ECHO);
        let a = s.admit("CN=a", &echo).unwrap();
        assert_eq!(a.1.2.mib(), INBOUND_MIB);
        let b = s.admit("CN=a", &echo).unwrap();
        assert_eq!(
            usage(&s, "CN=a"),
            (
                500 - 2 * INBOUND_MIB,
                Some(ClientUse {
                    sessions: 2,
                    mib: 2 * INBOUND_MIB
                })
            )
        );
        // a third does not fit beside them
        let r = refusal(s.admit("CN=b", &echo));
        assert_eq!(r.code, tonic::Code::Unavailable, "{r:?}");
        assert!(
            r.message
                .contains("hold 430 of its 500 MiB memory cap, this one needs about 215 MiB"),
            "{}",
            r.message
        );
        drop((a, b));
        assert_eq!(usage(&s, "CN=a"), (500, None));
        // under a cap below the inbound data no echo session is admitted
        let s = service_offering(ECHO, 200, ClientMemory::default(), Policy::default());
        let r = refusal(s.admit("CN=a", &echo));
        assert_eq!(r.code, tonic::Code::ResourceExhausted, "{r:?}");
        assert!(
            r.message
                .contains("needs about 215 MiB, more than this server's memory cap of 200 MiB"),
            "{}",
            r.message
        );
    }

    #[test]
    fn one_clients_sessions_hold_at_most_its_share_of_the_cap() {
        // cap 1,200 MiB, half of it per client; heavy(r) holds 100 r + 215 MiB
        let s = service(1200, ClientMemory::Half, Policy::default());
        let a1 = s.admit("CN=a", &heavy(1)).unwrap();
        assert_eq!(a1.1.2.mib(), 315);
        // 315 + 315 > 600: busy, naming the share
        let r = refusal(s.admit("CN=a", &heavy(1)));
        assert_eq!(r.code, tonic::Code::Unavailable, "{r:?}");
        assert!(
            r.message
                .contains("CN=a's running sessions hold 315 MiB of its 600 MiB share"),
            "{}",
            r.message
        );
        // nothing of the refused session is held
        assert_eq!(
            usage(&s, "CN=a"),
            (
                885,
                Some(ClientUse {
                    sessions: 1,
                    mib: 315
                })
            )
        );
        // 315 + 215 fits the share
        let a2 = s.admit("CN=a", &heavy(0)).unwrap();
        // another client has its own share: 515 MiB of the 670 left
        let b1 = s.admit("CN=b", &heavy(3)).unwrap();
        assert_eq!(usage(&s, "CN=b").1.unwrap().mib, 515);
        // 215 more do not fit the 155 left of the cap: the global refusal
        let r = refusal(s.admit("CN=c", &heavy(0)));
        assert_eq!(r.code, tonic::Code::Unavailable);
        assert!(
            r.message.contains("1045 of its 1200 MiB memory cap"),
            "{r:?}"
        );
        // ending sessions gives back both the cap's permits and the client's share
        drop(a1);
        assert_eq!(
            usage(&s, "CN=a"),
            (
                470,
                Some(ClientUse {
                    sessions: 1,
                    mib: 215
                })
            )
        );
        drop((a2, b1));
        assert_eq!(usage(&s, "CN=a"), (1200, None));
        assert_eq!(usage(&s, "CN=b"), (1200, None));
        // with `Whole` one client may hold all of it: 4 x 215 MiB, over half
        let s = service(1200, ClientMemory::Whole, Policy::default());
        let held: Vec<_> = (0..4)
            .map(|_| s.admit("CN=a", &heavy(0)).unwrap())
            .collect();
        assert_eq!(usage(&s, "CN=a").0, 340);
        drop(held);
        assert_eq!(usage(&s, "CN=a"), (1200, None));
    }

    #[test]
    fn a_client_holding_nothing_may_start_one_session_that_fits_the_cap() {
        // cap 500 MiB, share 250: a 415 MiB session is over the share but fits the cap
        let s = service(500, ClientMemory::Half, Policy::default());
        let a1 = s.admit("CN=a", &heavy(2)).unwrap();
        assert_eq!(a1.1.2.mib(), 415);
        // a second one of the same client is over its share (not over the cap)
        let s2 = service(1000, ClientMemory::Bytes(300 << 20), Policy::default());
        let b1 = s2.admit("CN=a", &heavy(2)).unwrap();
        let r = refusal(s2.admit("CN=a", &heavy(1)));
        assert_eq!(r.code, tonic::Code::Unavailable);
        assert!(r.message.contains("415 MiB of its 300 MiB share"), "{r:?}");
        // a session whose runner estimates nothing still holds its inbound data, which
        // counts against its client's share
        let s3 = service(1000, ClientMemory::Half, Policy::default());
        let light = s3.admit("CN=a", &heavy(0)).unwrap();
        assert_eq!(light.1.2.mib(), INBOUND_MIB);
        let r = refusal(s3.admit("CN=a", &heavy(3)));
        assert_eq!(r.code, tonic::Code::Unavailable);
        assert!(
            r.message.contains("hold 215 MiB of its 500 MiB share"),
            "{r:?}"
        );
        // over the cap itself is still refused as such
        drop(a1);
        let r = refusal(s.admit("CN=a", &heavy(3)));
        assert_eq!(r.code, tonic::Code::ResourceExhausted);
        assert!(r.message.contains("needs about 515 MiB"), "{r:?}");
        assert!(r.message.contains("declare at most 2 rows"), "{r:?}");
        drop((b1, light));
        assert_eq!(usage(&s2, "CN=a"), (1000, None));
        assert_eq!(usage(&s3, "CN=a"), (1000, None));
        assert_eq!(usage(&s, "CN=a"), (500, None));
    }

    #[test]
    fn refusals_after_the_memory_is_held_give_it_back() {
        // the budget is checked after the memory: a refused budget releases the hold
        let policy = Policy {
            budget: Some(1),
            ..Policy::default()
        };
        let s = service(1000, ClientMemory::Half, policy);
        let r = refusal(s.admit("CN=a", &heavy(2)));
        assert_eq!(r.code, tonic::Code::ResourceExhausted);
        assert!(r.message.contains("budget exhausted"), "{r:?}");
        assert_eq!(usage(&s, "CN=a"), (1000, None));
        // a session whose memory is not estimated is refused under a cap, holding nothing
        let r = refusal(s.admit("CN=a", &heavy(999)));
        assert_eq!(r.code, tonic::Code::ResourceExhausted);
        assert!(r.message.contains("not estimated"), "{r:?}");
        assert_eq!(usage(&s, "CN=a"), (1000, None));
        // a hold cloned to another thread (as `cheetah` zeroizes its state on one) counts
        // until the last clone is dropped
        let a = s.admit("CN=b", &heavy(1)).unwrap();
        let clone = a.1.2.clone();
        drop(a);
        assert_eq!(usage(&s, "CN=b").1.unwrap().mib, 100 + INBOUND_MIB);
        assert_eq!(usage(&s, "CN=b").1.unwrap().sessions, 0);
        std::thread::spawn(move || drop(clone)).join().unwrap();
        assert_eq!(usage(&s, "CN=b"), (1000, None));
    }
}
