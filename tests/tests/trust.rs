//! The client's trust store end to end: a server caught cheating is recorded (keyed on
//! the certificate it presented in the TLS handshake) and refused before any session
//! starts; `--trust-again` clears it; a corrupt store is a named error; an honest server
//! is never recorded. Every store lives in a temporary directory.

mod small;

use std::path::{Path, PathBuf};

use fusion_client::trust::{
    TrustArgs, TrustError, TrustStore, fingerprint, is_distrusted, run_verified_trusted,
};
use fusion_client::verified::{FusionOptions, Params, PublicRows, is_detected};
use fusion_common::nn::mnist::{self, Dataset, Split};
use fusion_server::runner::Registry;
use fusion_server::state::{Policy, ServedModel, ServerState, SessionLimits};
use fusion_tests::TestServer;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn test_set() -> Dataset {
    mnist::load(repo("data/mnist"), Split::Test).expect("MNIST")
}

/// The small model, its pool without entries labelled 0 (so `constant@0` fails every
/// public row).
fn served() -> ServedModel {
    small::served(Some(0))
}

async fn start(adversary: Option<&str>) -> TestServer {
    small::start(served(), adversary, Policy::default()).await
}

/// Tiny parameters at the default confidence: check (c) tests the published pool labels
/// (the same for every batch), so the honest run cannot be flagged by an unlucky draw, as
/// it once was in CI when (c) tested the T = 2 sampled rows (both among the model's ~3%
/// errors: p = 7.8e-4). The cheater here is caught by check (a).
fn opts() -> FusionOptions {
    FusionOptions {
        params: Params::Fixed { t: 2, r: 2 },
        ..FusionOptions::default()
    }
}

fn trust(dir: &Path, again: bool) -> TrustArgs {
    TrustArgs {
        store: Some(dir.to_path_buf()),
        trust_again: again,
    }
}

/// One guarded batch of the test image 1500.
async fn batch(s: &TestServer, test: &Dataset, t: &TrustArgs) -> anyhow::Result<Vec<usize>> {
    let client = s.client().await;
    let info = client.model_info().await?;
    let public = PublicRows::fetch(&client, &info, test).await?;
    let own = test.image(1500).expect("image").to_vec();
    let (out, _) = run_verified_trusted(t, &client, &info, &public, &own, &opts()).await?;
    Ok(out.labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detected_server_is_recorded_and_refused_before_a_session_until_trusted_again() {
    let test = test_set();
    let dir = tempfile::tempdir().unwrap();
    let s = start(Some("constant@0")).await;

    let e = batch(&s, &test, &trust(dir.path(), false))
        .await
        .unwrap_err();
    assert!(is_detected(&e), "{e}");
    assert_eq!(s.handle.stats().sessions_accepted, 1);
    // recorded, keyed on the certificate the server presented
    let store = TrustStore::open(Some(dir.path())).unwrap();
    let der = CertificateDer::from_pem_slice(s.pki.server.cert_pem.as_bytes()).unwrap();
    let fp = fingerprint(der.as_ref());
    let entry = store.entries().get(&fp).expect("the server is recorded");
    assert_eq!(entry.server, s.addr.to_string());
    assert!(entry.reason.starts_with("detected"), "{}", entry.reason);

    // the next batch is refused before any session starts
    let e = batch(&s, &test, &trust(dir.path(), false))
        .await
        .unwrap_err();
    assert!(is_distrusted(&e), "{e}");
    assert!(!is_detected(&e));
    assert!(e.to_string().contains("--trust-again"), "{e}");
    assert_eq!(
        s.handle.stats().sessions_accepted,
        1,
        "no session was started"
    );

    // --trust-again clears the entry: the batch runs (and this cheater is caught again)
    let e = batch(&s, &test, &trust(dir.path(), true))
        .await
        .unwrap_err();
    assert!(is_detected(&e), "{e}");
    assert_eq!(s.handle.stats().sessions_accepted, 2);
    let mut store = TrustStore::open(Some(dir.path())).unwrap();
    assert!(store.check(&fp).is_err(), "recorded again");
    // `trust reset SERVER` by address
    assert_eq!(store.reset(&s.addr.to_string()).unwrap(), 1);
    assert!(
        TrustStore::open(Some(dir.path()))
            .unwrap()
            .entries()
            .is_empty()
    );
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_server_is_never_recorded_and_a_corrupt_store_is_a_named_error() {
    let test = test_set();
    let dir = tempfile::tempdir().unwrap();
    let s = start(None).await;
    for _ in 0..2 {
        let labels = batch(&s, &test, &trust(dir.path(), false)).await.unwrap();
        assert_eq!(labels.len(), 1);
    }
    assert!(
        !dir.path().join(fusion_client::trust::FILE_NAME).exists(),
        "honest runs write nothing"
    );

    std::fs::write(dir.path().join(fusion_client::trust::FILE_NAME), b"{oops").unwrap();
    let e = batch(&s, &test, &trust(dir.path(), false))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<TrustError>(),
            Some(TrustError::Corrupt { .. })
        ),
        "{e}"
    );
    assert_eq!(
        s.handle.stats().sessions_accepted,
        2,
        "no session with a corrupt store"
    );
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_server_aborts_after_accepting_it_is_recorded() {
    use fusion_server::runner::RunnerError;
    let test = test_set();
    let dir = tempfile::tempdir().unwrap();
    // a "cheetah" that accepts the session, then aborts it (the selective-failure signal)
    let mut registry = Registry::empty();
    registry
        .register(
            "cheetah",
            |_: &mut dyn fusion_common::channel::Channel,
             _: &fusion_server::runner::StartInfo,
             _: &ServerState| {
                Err(RunnerError::protocol(
                    "cheetah",
                    std::io::Error::other("aborted on purpose"),
                ))
            },
        )
        .unwrap();
    let state = ServerState::new(Some(served()), Policy::default(), SessionLimits::default());
    let s = TestServer::start_with_state(state, registry).await;
    let e = batch(&s, &test, &trust(dir.path(), false))
        .await
        .unwrap_err();
    assert!(!is_detected(&e), "an abort is not a check failure: {e}");
    assert_eq!(s.handle.stats().sessions_accepted, 1);
    let store = TrustStore::open(Some(dir.path())).unwrap();
    let entry = store
        .entries()
        .values()
        .next()
        .expect("the server is recorded");
    assert!(
        entry.reason.contains("after the session started"),
        "{}",
        entry.reason
    );
    let e = batch(&s, &test, &trust(dir.path(), false))
        .await
        .unwrap_err();
    assert!(is_distrusted(&e), "{e}");
    assert_eq!(s.handle.stats().sessions_accepted, 1);
    s.handle.shutdown().await.unwrap();
}
