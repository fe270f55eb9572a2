//! The "bad input" list of the foundation issue, one test each: refused at the TLS
//! door (client side error, server log line and counter), or the session ends with a
//! named error while the server goes on serving.

use std::sync::Arc;
use std::time::Duration;

use fusion_client::echo::echo_exchange;
use fusion_client::{Client, ClientError, ClientOptions};
use fusion_common::net::certs::{CertSpec, generate};
use fusion_common::net::pb::{self, frame::Kind};
use fusion_common::net::tls::{client_config, client_config_without_certificate};
use fusion_common::net::{FrameLimits, SessionStart, error_chain};
use fusion_server::runner::{ECHO, Registry};
use fusion_server::state::{Policy, SessionLimits};
use fusion_tests::TestServer;
use rand::SeedableRng;
use tonic::Code;

fn frame(kind: Kind) -> pb::Frame {
    pb::Frame { kind: Some(kind) }
}

fn start_frame() -> pb::Frame {
    frame(Kind::Start(
        SessionStart::new(ECHO).to_pb(FrameLimits::default()),
    ))
}

fn chunk(seq: u64, offset: u64, total_len: u64, len: usize) -> pb::Frame {
    frame(Kind::Chunk(pb::Chunk {
        seq,
        offset,
        total_len,
        payload: vec![0xab; len],
    }))
}

/// Sends `frames` on a raw session stream (then ends it); returns how the server
/// answered: `Err(status)` for a refusal at the start, otherwise the frames it sent and
/// the status it ended with.
async fn raw_session(
    client: &Client,
    frames: Vec<pb::Frame>,
) -> Result<(Vec<pb::Frame>, Option<tonic::Status>), tonic::Status> {
    let response = client.grpc().session(tokio_stream::iter(frames)).await?;
    let mut inbound = response.into_inner();
    let mut got = vec![];
    loop {
        match inbound.message().await {
            Ok(Some(f)) => got.push(f),
            Ok(None) => return Ok((got, None)),
            Err(s) => return Ok((got, Some(s))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http2_connection_is_refused() {
    let s = TestServer::start_default().await;
    let url = format!("http://127.0.0.1:{}", s.addr.port());
    let result = async {
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut grpc = pb::fusion_client::FusionClient::new(channel);
        grpc.get_model_info(pb::ModelInfoRequest {}).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    let err = result.expect_err("a plaintext client must not get an answer");
    eprintln!("client sees: {}", error_chain(err.as_ref()));
    assert!(s.await_handshake_failures(1).await >= 1);
    assert_eq!(s.handle.stats().sessions_accepted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_a_certificate_is_refused() {
    let s = TestServer::start_default().await;
    let config = client_config_without_certificate(s.pki.ca_pem.as_bytes()).unwrap();
    let result = async {
        let c =
            Client::connect_with_config(&s.addr, None, config, ClientOptions::default()).await?;
        c.model_info().await
    }
    .await;
    let err = result.expect_err("no certificate, no service");
    let text = error_chain(&err);
    assert!(
        text.contains("CertificateRequired") && text.contains("requires a client certificate"),
        "client sees: {text}"
    );
    assert!(s.await_handshake_failures(1).await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused() {
    let s = TestServer::start_default().await;
    let stranger = generate(&CertSpec::default()).unwrap();
    // trusts the right server CA but presents a certificate from another CA
    let config = client_config(&stranger.clients[0].identity(), s.pki.ca_pem.as_bytes()).unwrap();
    let result = async {
        let c =
            Client::connect_with_config(&s.addr, None, config, ClientOptions::default()).await?;
        c.model_info().await
    }
    .await;
    let err = result.expect_err("a foreign client certificate gets no service");
    let text = error_chain(&err);
    assert!(
        text.contains("fatal alert: UnknownCA") && text.contains("did not accept this client"),
        "client sees: {text}"
    );
    assert!(s.await_handshake_failures(1).await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_name_is_refused() {
    let s = TestServer::start_default().await;
    let id = s.pki.clients[0].identity();
    let err = Client::connect(
        &s.addr,
        Some("fusion.other.example"),
        &id,
        s.pki.ca_pem.as_bytes(),
    )
    .await
    .expect_err("the certificate does not name fusion.other.example");
    let text = error_chain(&err);
    assert!(text.contains("not valid for name"), "client sees: {text}");
    // the client hangs up during the handshake; the server logs it
    assert!(s.await_handshake_failures(1).await >= 1);
    // a server certificate from another CA is refused the same way
    let other = generate(&CertSpec::default()).unwrap();
    let err = Client::connect(&s.addr, None, &id, other.ca_pem.as_bytes())
        .await
        .expect_err("unknown server CA");
    let text = error_chain(&err);
    assert!(
        text.contains("UnknownIssuer") && text.contains("check --ca"),
        "{text}"
    );
}

fn small_frames() -> SessionLimits {
    SessionLimits {
        frames: FrameLimits {
            frame_limit: 64 << 10,
            max_message: 1 << 20,
        },
        ..SessionLimits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_the_limit_ends_the_session() {
    let s = TestServer::start(Policy::default(), small_frames(), Registry::with_builtins()).await;
    let client = s.client().await;
    // over our frame limit but within tonic's decoding limit: the adapter's named error
    let (got, status) = raw_session(
        &client,
        vec![start_frame(), chunk(0, 0, 100_000, (64 << 10) + 1)],
    )
    .await
    .unwrap();
    assert!(matches!(
        got.first(),
        Some(pb::Frame {
            kind: Some(Kind::Accepted(_))
        })
    ));
    let status = status.expect("the session ends with an error");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("exceeds the frame limit"),
        "{status:?}"
    );
    // far over: tonic's decoding limit (frame limit + overhead) stops it first
    let (_, status) = raw_session(
        &client,
        vec![start_frame(), chunk(0, 0, 512 << 10, 512 << 10)],
    )
    .await
    .unwrap();
    let status = status.expect("the session ends with an error");
    assert_ne!(status.code(), Code::Ok);
    assert!(status.message().contains("too large"), "{status:?}");
    assert_eq!(s.await_failed_sessions(2).await, 2);
    // a message over the message limit, declared in its first chunk
    let (_, status) = raw_session(&client, vec![start_frame(), chunk(0, 0, 2 << 20, 100)])
        .await
        .unwrap();
    assert_eq!(status.unwrap().code(), Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_message_ends_the_session() {
    let s = TestServer::start(Policy::default(), small_frames(), Registry::with_builtins()).await;
    let client = s.client().await;
    let f = 64 << 10;
    // two chunks of a three-chunk message, then the stream ends
    let (_, status) = raw_session(
        &client,
        vec![
            start_frame(),
            chunk(0, 0, 3 * f as u64, f),
            chunk(0, f as u64, 3 * f as u64, f),
        ],
    )
    .await
    .unwrap();
    let status = status.expect("the session ends with an error");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("truncated message"), "{status:?}");
    // the next message starts before the last one ended
    let (_, status) = raw_session(
        &client,
        vec![
            start_frame(),
            chunk(0, 0, 3 * f as u64, f),
            chunk(1, 0, 4, 4),
        ],
    )
    .await
    .unwrap();
    assert!(status.unwrap().message().contains("truncated message"));
    // an inconsistent chunk sequence (a gap)
    let (_, status) = raw_session(
        &client,
        vec![
            start_frame(),
            chunk(0, 0, 3 * f as u64, f),
            chunk(0, 2 * f as u64, 3 * f as u64, f),
        ],
    )
    .await
    .unwrap();
    let status = status.unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("malformed frame"), "{status:?}");
    assert_eq!(s.await_failed_sessions(3).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frame_not_a_valid_start_is_refused() {
    let s = TestServer::start_default().await;
    let client = s.client().await;
    let bad_starts = vec![
        ("a chunk first", vec![chunk(0, 0, 1, 1)]),
        (
            "an accepted frame first",
            vec![frame(Kind::Accepted(pb::Accepted::default()))],
        ),
        ("an empty frame", vec![pb::Frame { kind: None }]),
        ("no frame at all", vec![]),
        ("version 0", vec![frame(Kind::Start(pb::Start::default()))]),
        (
            "bad backend name",
            vec![frame(Kind::Start(pb::Start {
                backend: "Echo!".into(),
                ..SessionStart::new(ECHO).to_pb(FrameLimits::default())
            }))],
        ),
        (
            "tiny frame limit",
            vec![frame(Kind::Start(pb::Start {
                max_frame_bytes: 1,
                ..SessionStart::new(ECHO).to_pb(FrameLimits::default())
            }))],
        ),
    ];
    let n = bad_starts.len() as u64;
    for (name, frames) in bad_starts {
        let status = raw_session(&client, frames)
            .await
            .expect_err("refused before acceptance");
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
    }
    assert_eq!(s.handle.stats().sessions_refused, n);
    assert_eq!(s.handle.stats().sessions_accepted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_is_served_while_a_bad_session_fails() {
    let s = Arc::new(
        TestServer::start(Policy::default(), small_frames(), Registry::with_builtins()).await,
    );
    let good = s.client_as("alice").await.unwrap();
    let bad = s.client().await;
    let (to_good, mut bad_done) = tokio::sync::mpsc::channel::<()>(1);
    let (half_done_tx, mut half_done) = tokio::sync::mpsc::channel::<()>(1);
    // the good session: one echo, then wait (mid-session) for the bad one to fail,
    // then more echoes, with messages over the frame limit
    let good_task = tokio::spawn(async move {
        good.session(SessionStart::new(ECHO), move |ch, _| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            echo_exchange(ch, &[1000], &mut rng)?;
            let _ = half_done_tx.blocking_send(());
            bad_done.blocking_recv();
            echo_exchange(ch, &[100_000, 200_000, 10], &mut rng)?;
            ch.flush()?;
            Ok::<_, fusion_client::echo::EchoError>(())
        })
        .await
    });
    half_done
        .recv()
        .await
        .expect("the good session is under way");
    let f = 64 << 10;
    let (_, status) = raw_session(&bad, vec![start_frame(), chunk(0, 0, 3 * f as u64, f)])
        .await
        .unwrap();
    assert!(status.unwrap().message().contains("truncated message"));
    assert_eq!(s.await_failed_sessions(1).await, 1);
    to_good.send(()).await.unwrap();
    let out = good_task.await.unwrap().expect("the good session finishes");
    assert_eq!(out.cost.total("t").messages_sent, 4);
    let stats = s.handle.stats();
    assert_eq!((stats.sessions_accepted, stats.sessions_failed), (2, 1));
    // and a third client after all that
    let err: Option<ClientError> = s.client().await.model_info().await.err();
    assert!(err.is_none());
}
