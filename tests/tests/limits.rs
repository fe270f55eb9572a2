//! What one hostile (authenticated or not) peer can make the server hold: a session's
//! inbound data is bounded by the message limit (a larger message ends that session with
//! `RESOURCE_EXHAUSTED`, others go on), and connections that never finish their TLS
//! handshake hold at most `max_handshakes` handshake slots.

use std::time::Duration;

use fusion_client::echo::echo_exchange;
use fusion_common::net::frame::DEFAULT_MAX_MESSAGE;
use fusion_common::net::pb::{self, frame::Kind};
use fusion_common::net::{DEFAULT_FRAME_LIMIT, FrameLimits, SessionStart};
use fusion_server::runner::{ECHO, Registry};
use fusion_server::state::{Policy, SessionLimits};
use fusion_tests::TestServer;
use rand::SeedableRng;
use tonic::Code;

fn frame(kind: Kind) -> pb::Frame {
    pb::Frame { kind: Some(kind) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_default_limit_ends_only_its_session() {
    let s = TestServer::start_default().await;
    assert_eq!(s.handle.stats().sessions_accepted, 0);
    let good = s.client_as("alice").await.unwrap();
    let bad = s.client().await;
    // a good session runs beside the bad one: it waits, mid-session, for the bad one's end
    let (bad_over_tx, mut bad_over) = tokio::sync::mpsc::channel::<()>(1);
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(1);
    let good_task = tokio::spawn(async move {
        good.session(SessionStart::new(ECHO), move |ch, _| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            echo_exchange(ch, &[1000], &mut rng)?;
            let _ = started_tx.blocking_send(());
            bad_over.blocking_recv();
            echo_exchange(ch, &[3 * DEFAULT_FRAME_LIMIT + 5, 10], &mut rng)?;
            Ok::<_, fusion_client::echo::EchoError>(())
        })
        .await
    });
    started.recv().await.expect("the good session is under way");
    // the bad one: full frames of a message one byte over the limit (the server's
    // default); it is refused at the first frame, before anything is kept
    let total = DEFAULT_MAX_MESSAGE as u64 + 1;
    let chunks = (0..4u64).map(move |i| {
        frame(Kind::Chunk(pb::Chunk {
            seq: 0,
            offset: i * DEFAULT_FRAME_LIMIT as u64,
            total_len: total,
            payload: vec![0x5a; DEFAULT_FRAME_LIMIT],
        }))
    });
    let frames: Vec<pb::Frame> = std::iter::once(frame(Kind::Start(
        SessionStart::new(ECHO).to_pb(FrameLimits::default()),
    )))
    .chain(chunks)
    .collect();
    let response = bad
        .grpc()
        .session(tokio_stream::iter(frames))
        .await
        .expect("accepted");
    let mut inbound = response.into_inner();
    let status = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "message of {total} bytes exceeds the limit of {DEFAULT_MAX_MESSAGE} bytes"
        )),
        "{status:?}"
    );
    assert_eq!(s.await_failed_sessions(1).await, 1);
    bad_over_tx.send(()).await.unwrap();
    let out = good_task.await.unwrap().expect("the good session finishes");
    assert_eq!(out.cost.total("t").messages_sent, 3);
    let stats = s.handle.stats();
    assert_eq!(
        (
            stats.sessions_accepted,
            stats.sessions_ok,
            stats.sessions_failed
        ),
        (2, 1, 1)
    );
    // the default message limit is the one announced
    let info = s.client().await.model_info().await.unwrap();
    assert_eq!(info.max_message_bytes, DEFAULT_MAX_MESSAGE as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_hold_at_most_their_slots_and_a_good_client_is_served() {
    let limits = SessionLimits {
        max_handshakes: 2,
        handshake_timeout: Duration::from_secs(1),
        ..SessionLimits::default()
    };
    let s = TestServer::start(Policy::default(), limits, Registry::with_builtins()).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], s.addr.port()));
    // peers that connect and never send a ClientHello: each holds a slot until its
    // handshake times out; the ones beyond the bound wait in the listen backlog
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // a good client behind them is served once they have timed out (its TLS connector
    // waits up to 10 s for the server's first bytes)
    let client = s.client().await;
    let info = client.model_info().await.unwrap();
    assert_eq!(info.client_subject, "CN=client");
    assert!(s.await_handshake_failures(5).await >= 5);
    let stats = s.handle.stats();
    assert_eq!(stats.handshakes_peak, 2, "{stats:?}");
    drop(stalled);
}
