//! Round trips over real mutual TLS: the service description, the public pool, echo
//! sessions with messages above the frame limit, budgets and policy refusals.

use fusion_client::echo::echo_exchange;
use fusion_client::{Client, ClientError, ClientOptions, SessionOutput};
use fusion_common::channel::{Channel, ChannelError};
use fusion_common::fixed::FixedPoint;
use fusion_common::net::stream::inbound_bytes;
use fusion_common::net::{Budget, DEFAULT_FRAME_LIMIT, OutputMode, SessionStart};
use fusion_common::nn::{Architecture, Model, PublicPool, Tensor};
use fusion_server::runner::{ECHO, Registry, RunnerError, StartInfo};
use fusion_server::state::{Policy, ServedModel, ServerState, SessionLimits};
use fusion_tests::TestServer;
use rand::SeedableRng;
use std::time::Duration;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_policy_budget_and_the_callers_subject() {
    let policy = Policy {
        max_rows: 77,
        budget: Some(100),
        ..Policy::default()
    };
    let s = TestServer::start(policy, SessionLimits::default(), Registry::with_builtins()).await;
    let info = s.client().await.model_info().await.unwrap();
    assert_eq!(info.client_subject, "CN=client");
    assert_eq!(info.backends, vec!["echo"]);
    assert_eq!(info.output, OutputMode::Labels);
    assert_eq!(info.max_rows, 77);
    assert_eq!(
        info.budget,
        Budget::Rows {
            limit: 100,
            remaining: 100
        }
    );
    assert_eq!(info.max_frame_bytes, DEFAULT_FRAME_LIMIT as u64);
    assert!(info.model.is_none());
    // without a model there is no pool
    let err = s.client().await.public_pool().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
}

/// A small model with a public pool, built in the test (no model file needed).
fn small_model() -> ServedModel {
    let arch = Architecture::mlp(&[4], &[3], 2).expect("test model");
    let params = vec![
        vec![
            Tensor::new(vec![3, 4], (0..12).map(|i| i as f32 / 10.0 - 0.5).collect())
                .expect("test model"),
            Tensor::new(vec![3], vec![0.1, -0.2, 0.3]).expect("test model"),
        ],
        vec![],
        vec![
            Tensor::new(vec![2, 3], vec![0.5, -0.5, 0.25, -0.25, 0.75, 0.1]).expect("test model"),
            Tensor::new(vec![2], vec![0.0, 0.05]).expect("test model"),
        ],
    ];
    let model =
        Model::new(arch, params, FixedPoint::new(37, 12).expect("test model")).expect("test model");
    let pool = PublicPool::new(model.digest(), vec![0, 1, 2], vec![1, 0, 1]).expect("test model");
    let model = model.with_public_pool(pool).expect("test model");
    ServedModel::new("tiny", model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_with_a_model_reports_architecture_fixed_point_and_pool() {
    let served = small_model();
    let digest = *served.model.digest();
    let state = ServerState::new(Some(served), Policy::default(), SessionLimits::default());
    let s = TestServer::start_with_state(state, Registry::with_builtins()).await;
    let client = s.client().await;
    let info = client.model_info().await.unwrap();
    let m = info.model.unwrap();
    assert_eq!(m.name, "tiny");
    assert_eq!((m.ring_bits, m.scale_bits), (37, 12));
    assert_eq!(m.architecture.input_shape, vec![4]);
    let kinds: Vec<_> = m
        .architecture
        .layers
        .iter()
        .map(|l| l.kind.as_str())
        .collect();
    assert_eq!(kinds, ["dense", "relu", "dense"]);
    assert_eq!(m.architecture.layers[0].output_shape, vec![3]);
    assert_eq!(m.architecture.output_shape, vec![2]);
    assert_eq!(m.model_digest, digest.as_bytes().to_vec());
    assert_eq!(m.pool_size, 3);
    assert_eq!(m.accuracy_samples, 0, "no evaluation recorded: no claim");
    let pool = client.public_pool().await.unwrap();
    assert_eq!(pool.entries.len(), 3);
    assert_eq!(pool.digest, m.pool_digest);
    pool.to_nn().unwrap().verify(&digest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip_with_messages_above_the_frame_limit() {
    let s = TestServer::start_default().await;
    let sizes = [
        0,
        1,
        DEFAULT_FRAME_LIMIT - 1,
        DEFAULT_FRAME_LIMIT,
        DEFAULT_FRAME_LIMIT + 1,
        2 * DEFAULT_FRAME_LIMIT + 17,
    ];
    let out = s
        .client()
        .await
        .session(SessionStart::new(ECHO), move |ch, _| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            echo_exchange(ch, &sizes, &mut rng)
        })
        .await
        .unwrap();
    let total = out.cost.total("total");
    let bytes: u64 = sizes.iter().map(|&n| n as u64).sum();
    assert_eq!((total.bytes_sent, total.bytes_received), (bytes, bytes));
    let n = sizes.len() as u64;
    assert_eq!((total.messages_sent, total.messages_received), (n, n));
    // every message is one flight out and one back
    assert_eq!(total.rounds, 2 * n);
    assert_eq!(out.cost.steps.len(), sizes.len());
    assert_eq!(out.accepted.backend, "echo");
    assert_eq!(s.handle.stats().sessions_accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_is_charged_per_certificate_and_refused_when_exhausted() {
    let policy = Policy {
        budget: Some(10),
        ..Policy::default()
    };
    let s = TestServer::start(policy, SessionLimits::default(), Registry::with_builtins()).await;
    let client = s.client().await;
    let batch = |rows| SessionStart::new(ECHO).with_batch(rows, 4);
    let out = client
        .session(batch(6), |_, _| Ok::<_, ChannelError>(()))
        .await
        .unwrap();
    assert_eq!(
        out.accepted.budget,
        Budget::Rows {
            limit: 10,
            remaining: 4
        }
    );
    let err = client
        .session(batch(5), |_, _| Ok::<_, ChannelError>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("budget exhausted"), "{err}");
    assert_eq!(client.model_info().await.unwrap().budget.remaining(), 4);
    // another certificate has its own budget
    let alice = s.client_as("alice").await.unwrap();
    let info = alice.model_info().await.unwrap();
    assert_eq!(info.client_subject, "CN=alice");
    assert_eq!(info.budget.remaining(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_carry_their_codes() {
    let policy = Policy {
        max_rows: 8,
        ..Policy::default()
    };
    let s = TestServer::start(policy, SessionLimits::default(), Registry::with_builtins()).await;
    let client = s.client().await;
    let noop = |_: &mut dyn Channel, _: &_| Ok::<_, ChannelError>(());
    let cases = [
        (SessionStart::new("cheetah"), Code::Unimplemented),
        (
            SessionStart::new(ECHO).with_batch(9, 1),
            Code::FailedPrecondition,
        ),
        (
            SessionStart::new(ECHO).with_output(OutputMode::Logits),
            Code::FailedPrecondition,
        ),
    ];
    for (start, code) in cases {
        let err = client.session(start.clone(), noop).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{start:?}: {err}");
    }
    assert_eq!(s.handle.stats().sessions_refused, 3);
    // labels may always be asked for
    let ok = client
        .session(
            SessionStart::new(ECHO).with_output(OutputMode::Labels),
            noop,
        )
        .await
        .unwrap();
    assert_eq!(ok.accepted.output, OutputMode::Labels);
}

#[derive(Debug, thiserror::Error)]
#[error("the check of message {0} failed")]
struct CheckFailed(usize);

fn fails_after_one(
    ch: &mut dyn Channel,
    _: &StartInfo,
    _: &ServerState,
) -> Result<(), RunnerError> {
    let m = ch.recv()?;
    ch.send(&m)?;
    let _ = ch.recv()?;
    Err(RunnerError::protocol("flaky", CheckFailed(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_protocol_error_reaches_the_client_and_the_server_goes_on() {
    let mut registry = Registry::with_builtins();
    registry.register("flaky", fails_after_one).unwrap();
    let s = TestServer::start(Policy::default(), SessionLimits::default(), registry).await;
    let client = s.client().await;
    let err = client
        .session(SessionStart::new("flaky"), |ch, _| {
            ch.send(b"one")?;
            assert_eq!(ch.recv()?, b"one");
            ch.send(b"two")?;
            ch.recv()
        })
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Aborted") && text.contains("the check of message 2 failed"),
        "{text}"
    );
    assert_eq!(s.await_failed_sessions(1).await, 1);
    // a client error aborts the session and the server says why in its log
    let err = client
        .session(SessionStart::new(ECHO), |ch, _| {
            ch.send(b"x")?;
            ch.recv()?;
            Err::<(), Box<dyn std::error::Error + Send + Sync>>(Box::new(CheckFailed(1)))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, fusion_client::ClientError::Protocol { .. }),
        "{err}"
    );
    assert_eq!(s.await_failed_sessions(2).await, 2);
    // and the server still serves
    client
        .session(SessionStart::new(ECHO), |ch, _| {
            ch.send(b"still here")?;
            ch.recv()
        })
        .await
        .unwrap();
}

/// A runner with a bug a peer's message reaches: it panics on `boom`, else echoes.
fn panics_on_boom(ch: &mut dyn Channel, _: &StartInfo, _: &ServerState) -> Result<(), RunnerError> {
    let m = ch.recv()?;
    if m == b"boom" {
        panic!("a runner bug reached by a peer's message");
    }
    ch.send(&m)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_ends_with_internal_and_the_server_goes_on() {
    let mut registry = Registry::with_builtins();
    registry.register("buggy", panics_on_boom).unwrap();
    let s = TestServer::start(Policy::default(), SessionLimits::default(), registry).await;
    let client = s.client().await;
    // more panicking sessions than one client may run at once: each one's slot comes back
    let slots = SessionLimits::default().max_client_sessions as u64;
    for k in 1..=slots + 1 {
        let err = client
            .session(SessionStart::new("buggy"), |ch, _| {
                ch.send(b"boom")?;
                ch.recv()
            })
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("Internal") && text.contains("the buggy runner failed internally"),
            "{text}"
        );
        assert_eq!(s.await_failed_sessions(k).await, k);
    }
    // the same runner still serves a good message, and so does echo
    for backend in ["buggy", ECHO] {
        let out = client
            .session(SessionStart::new(backend), |ch, _| {
                ch.send(b"fine")?;
                ch.recv()
            })
            .await
            .unwrap();
        assert_eq!(out.value, b"fine");
    }
}

/// What the server charges every session for the inbound data its transport may hold
/// under the default frame limits, MiB (rounded up), on top of its runner's estimate.
const INBOUND_MIB: u64 = 215;

#[test]
fn the_inbound_charge_is_that_of_the_default_limits() {
    let inbound = inbound_bytes(&SessionLimits::default().frames);
    assert_eq!(inbound.div_ceil(1 << 20), INBOUND_MIB);
}

/// A runner that holds 100 MiB per declared row (by its estimate; the server charges the
/// session 215 MiB more for its transport) until its client's one message, which it
/// echoes.
struct Heavy;

impl fusion_server::SessionRunner for Heavy {
    fn memory_estimate(&self, start: &SessionStart, _: &ServerState) -> u64 {
        start.rows * (100 << 20)
    }

    fn run(
        &self,
        ch: &mut dyn Channel,
        start: &StartInfo,
        state: &ServerState,
    ) -> Result<(), RunnerError> {
        // held of the cap: its estimate and the inbound data (nothing without a cap)
        let held = match state.limits.max_memory {
            Some(_) => start.rows * 100 + INBOUND_MIB,
            None => 0,
        };
        assert_eq!(start.memory.mib() as u64, held);
        let m = ch.recv()?;
        ch.send(&m)?;
        Ok(())
    }
}

/// A session A of `start` on a connection of its own, running once this returns (the
/// server has accepted it) until the sender fires; then it echoes `done`.
async fn hold(
    s: &TestServer,
    start: SessionStart,
) -> (
    std::sync::mpsc::Sender<()>,
    tokio::task::JoinHandle<Result<SessionOutput<Vec<u8>>, ClientError>>,
) {
    hold_as(s, s.client().await, start).await
}

/// [`hold`] for the given client.
async fn hold_as(
    s: &TestServer,
    client: Client,
    start: SessionStart,
) -> (
    std::sync::mpsc::Sender<()>,
    tokio::task::JoinHandle<Result<SessionOutput<Vec<u8>>, ClientError>>,
) {
    let accepted = s.handle.stats().sessions_accepted;
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let a = tokio::spawn(async move {
        client
            .session(start, move |ch, _| {
                wait.recv()
                    .map_err(|e| ChannelError::Transport(e.to_string()))?;
                ch.send(b"done")?;
                ch.recv()
            })
            .await
    });
    for _ in 0..3000 {
        if s.handle.stats().sessions_accepted > accepted {
            return (go, a);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the held session was not accepted within 30 s")
}

/// Runs an echo session of `start` as soon as the server stops refusing it for the
/// client's concurrent sessions (a held session's slot is released right after its end,
/// not before the client sees it; a client does not ask again after this refusal).
async fn echo_when_free(client: &Client, start: SessionStart) -> Vec<u8> {
    for _ in 0..100 {
        let r = client
            .session(start.clone(), |ch, _| {
                ch.send(b"again")?;
                ch.recv()
            })
            .await;
        match r {
            Ok(o) => return o.value,
            Err(e) if e.code() == Some(Code::ResourceExhausted) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("still refused after 100 tries")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_admitted_by_memory_and_refused_with_named_codes() {
    let mut registry = Registry::with_builtins();
    registry.register("heavy", Heavy).unwrap();
    // a cap of 700 MiB, each session charged 100 MiB a row and 215 MiB of inbound data
    let limits = SessionLimits {
        max_memory: Some(700 << 20),
        ..SessionLimits::default()
    };
    let s = TestServer::start(Policy::default(), limits, registry).await;
    let client = s.client().await;
    let heavy = |rows| SessionStart::new("heavy").with_batch(rows, 1);
    // session A holds 415 of the 700 MiB until it is told to finish
    let (go, a) = hold(&s, heavy(2)).await;
    // 315 more MiB do not fit beside it: busy
    let err = client
        .session(heavy(1), |_, _| Ok::<_, ChannelError>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(
        err.to_string()
            .contains("415 of its 700 MiB memory cap, this one needs about 315 MiB"),
        "{err}"
    );
    // 715 MiB never fit: exhausted, whatever runs
    let err = client
        .session(heavy(5), |_, _| Ok::<_, ChannelError>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("needs about 715 MiB"), "{err}");
    assert!(err.to_string().contains("declare at most 4 rows"), "{err}");
    // a runner that estimates nothing (echo) is charged its inbound data alone: 215 MiB
    // fit beside A (another client's: A's client is over its 350 MiB share)
    let alice = s.client_as("alice").await.unwrap();
    let light = |ch: &mut dyn Channel, _: &_| {
        ch.send(b"light")?;
        ch.recv()
    };
    let out = alice.session(SessionStart::new(ECHO), light).await.unwrap();
    assert_eq!(out.value, b"light");
    // while one runs beside A (630 MiB), another does not fit: busy
    let (go_echo, e) = hold_as(&s, alice.clone(), SessionStart::new(ECHO)).await;
    let err = alice
        .session(SessionStart::new(ECHO), light)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(
        err.to_string()
            .contains("630 of its 700 MiB memory cap, this one needs about 215 MiB"),
        "{err}"
    );
    go_echo.send(()).unwrap();
    assert_eq!(e.await.unwrap().unwrap().value, b"done");
    // a client that waits up to 1 s asks again at least once (first pause 0.15-0.25 s)
    // and returns the last refusal, saying how often it asked
    let brief = patient(&s, Duration::from_secs(1)).await;
    let err = brief
        .session(heavy(1), |_, _| Ok::<_, ChannelError>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().contains("memory cap"), "{err}");
    assert!(err.to_string().contains(" times in "), "{err}");
    assert!(s.handle.stats().sessions_refused >= 4);
    // one that waits as long as it takes (a wait no clock can add) gets its session once
    // A's share is released (right after A's end): it is refused while A runs, then A is
    // told to finish
    let refused = s.handle.stats().sessions_refused;
    let b = patient(&s, Duration::MAX).await;
    let b = tokio::spawn(async move {
        b.session(heavy(2), |ch, _| {
            ch.send(b"again")?;
            ch.recv()
        })
        .await
    });
    while s.handle.stats().sessions_refused < refused + 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!b.is_finished());
    go.send(()).unwrap();
    assert_eq!(a.await.unwrap().unwrap().value, b"done");
    assert_eq!(b.await.unwrap().unwrap().value, b"again");
}

/// A client of the test PKI that asks again for up to `wait` while the server is busy.
async fn patient(s: &TestServer, wait: Duration) -> Client {
    let options = ClientOptions {
        busy_wait: wait,
        ..ClientOptions::default()
    };
    s.client_with("client", options)
        .await
        .expect("client connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_may_run_only_so_many_sessions_at_once() {
    let mut registry = Registry::with_builtins();
    registry.register("heavy", Heavy).unwrap();
    let limits = SessionLimits {
        max_client_sessions: 1,
        ..SessionLimits::default()
    };
    let s = TestServer::start(Policy::default(), limits, registry).await;
    let (go, a) = hold(&s, SessionStart::new("heavy")).await;
    let echo = |ch: &mut dyn Channel, _: &_| {
        ch.send(b"hi")?;
        ch.recv()
    };
    // the same certificate (another connection) is refused while A runs
    let client = s.client().await;
    let err = client
        .session(SessionStart::new(ECHO), echo)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(
        err.to_string()
            .contains("CN=client already runs 1 sessions"),
        "{err}"
    );
    // another client is not
    let alice = s.client_as("alice").await.unwrap();
    alice.session(SessionStart::new(ECHO), echo).await.unwrap();
    go.send(()).unwrap();
    assert_eq!(a.await.unwrap().unwrap().value, b"done");
    // once A has ended, its slot is free again
    assert_eq!(
        echo_when_free(&client, SessionStart::new(ECHO)).await,
        b"again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_sessions_hold_at_most_its_share_of_the_memory_cap() {
    let mut registry = Registry::with_builtins();
    registry.register("heavy", Heavy).unwrap();
    // a cap of 900 MiB, each client's share half of it (the default); a session is
    // charged 100 MiB a row and 215 MiB of inbound data
    let limits = SessionLimits {
        max_memory: Some(900 << 20),
        ..SessionLimits::default()
    };
    let s = TestServer::start(Policy::default(), limits, registry).await;
    let heavy = |rows| SessionStart::new("heavy").with_batch(rows, 1);
    let echo = |ch: &mut dyn Channel, _: &_| {
        ch.send(b"hi")?;
        ch.recv()
    };
    // session A of CN=client holds 315 MiB
    let (go, a) = hold(&s, heavy(1)).await;
    // 315 more of the same client: the cap has room, its 450 MiB share has not: busy
    let client = s.client().await;
    let err = client
        .session(heavy(1), |_, _| Ok::<_, ChannelError>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(
        err.to_string()
            .contains("CN=client's running sessions hold 315 MiB of its 450 MiB share"),
        "{err}"
    );
    // another client is served beside A
    let alice = s.client_as("alice").await.unwrap();
    assert_eq!(alice.session(heavy(1), echo).await.unwrap().value, b"hi");
    // A's client fails mid-session (its side ends the stream with an error): the server's
    // runner fails and A's share is given back
    let failed = s.handle.stats().sessions_failed;
    drop(go);
    assert!(a.await.unwrap().is_err());
    assert!(s.await_failed_sessions(failed + 1).await > failed);
    // (the hold goes right after the runner's end: a busy retry covers the gap)
    let retrying = patient(&s, Duration::from_secs(60)).await;
    let (go, b) = {
        let out = retrying.session(heavy(1), echo).await.unwrap();
        assert_eq!(out.value, b"hi");
        // a client holding nothing may start one session over its share if it fits the
        // cap: 515 MiB
        hold(&s, heavy(3)).await
    };
    // while it runs (515 of the 900 MiB), its client may not add 315 MiB more: its share
    let err = client
        .session(heavy(1), |_, _| Ok::<_, ChannelError>(()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(
        err.to_string()
            .contains("hold 515 MiB of its 450 MiB share"),
        "{err}"
    );
    go.send(()).unwrap();
    assert_eq!(b.await.unwrap().unwrap().value, b"done");
    // and once it has ended the whole share is back
    let out = retrying.session(heavy(1), echo).await.unwrap();
    assert_eq!(out.value, b"hi");
}
