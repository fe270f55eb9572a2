//! Secure inference end to end over real mutual TLS (a real server on port 0 with the
//! bundled model, the `cheetah` runner, a real client): results equal the fixed-point
//! evaluator's in both output modes, and every refusal arrives at the client with its
//! name while the server goes on serving.

use std::path::{Path, PathBuf};

use fusion_client::ClientError;
use fusion_client::infer::{InferError, InferOptions, Inputs, run};
use fusion_common::backend::{
    BackendError, BatchHeader, Cheetah, CheetahConfig, InferenceClient, ModelSpec, OutputMode,
    SecureInference,
};
use fusion_common::channel::{Channel, ChannelError};
use fusion_common::fixed::eval_fixed;
use fusion_common::net::SessionStart;
use fusion_common::nn::mnist::{self, Split};
use fusion_server::runner::Registry;
use fusion_server::state::{Policy, ServedModel, ServerState, SessionLimits};
use fusion_tests::TestServer;
use tonic::Code;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn served() -> ServedModel {
    ServedModel::load(&repo("models/mnist-dnn.safetensors")).expect("the bundled model")
}

fn images(n: usize) -> Vec<u8> {
    let all = mnist::read_images(&Split::Test.images_path(&repo("data/mnist"))).expect("MNIST");
    all[..n * mnist::PIXELS].to_vec()
}

async fn server(policy: Policy) -> (TestServer, ServedModel) {
    let state = ServerState::new(Some(served()), policy, SessionLimits::default());
    (
        TestServer::start_with_state(state, Registry::with_builtins()).await,
        served(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_inference_over_tls_equals_the_evaluator_in_both_output_modes() {
    let policy = Policy {
        output: OutputMode::Logits,
        max_rows: 8,
        ..Policy::default()
    };
    let (s, model) = server(policy).await;
    let fm = model.model.fixed_model();
    let pixels = images(8);
    let expected = eval_fixed(fm, &fm.encode_images(&pixels)).unwrap();
    let client = s.client().await;
    let info = client.model_info().await.unwrap();
    assert_eq!(info.backends, ["cheetah", "echo"]);

    // labels only, in two batches (5 + 3)
    let labels = run(
        &client,
        Inputs::Pixels(&pixels),
        &InferOptions {
            output: Some(OutputMode::Labels),
            batch_rows: Some(5),
            // Cheetah's way: HE during the batch
            cheetah: CheetahConfig::default(),
            ..InferOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(labels.labels, expected.labels);
    assert_eq!((labels.batches, labels.output), (2, OutputMode::Labels));
    assert!(labels.logits.is_none());
    let names: Vec<&str> = labels.cost.steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        names,
        [
            "setup/hello",
            "setup/he-keys",
            "setup/base-ot",
            "batch/header",
            "layer1/linear",
            "layer1/relu_trunc",
            "layer2/linear",
            "layer2/relu_trunc",
            "layer3/linear",
            "layer3/trunc",
            "output/argmax"
        ]
    );

    // logits (the server's policy allows them; asked for by default)
    let logits = run(&client, Inputs::Pixels(&pixels), &InferOptions::default())
        .await
        .unwrap();
    assert_eq!(logits.output, OutputMode::Logits);
    assert_eq!(logits.labels, expected.labels);
    let got: Vec<Vec<i64>> = logits.logits.unwrap();
    for (r, row) in got.iter().enumerate() {
        assert_eq!(Some(row.clone()), expected.signed_logits(r), "row {r}");
    }
    assert_eq!(logits.scale_bits, 12);
    assert_eq!(
        logits.cost.steps.last().map(|s| s.step.as_str()),
        Some("output/reveal")
    );
    // the default preprocesses the linear layers: the HE runs offline, online a linear
    // layer is the masked input (l = 33 bits per value, one way)
    let step = |n: &str| logits.cost.steps.iter().find(|s| s.step == n).cloned();
    assert!(step("offline/linear").unwrap().bytes_sent > 100_000);
    let l1 = step("layer1/linear").unwrap();
    assert_eq!(
        (l1.bytes_sent, l1.bytes_received),
        ((8 * 784 * 33usize).div_ceil(8) as u64, 0)
    );
    assert_eq!(s.handle.stats().sessions_ok, 2);
}

/// Which message to rewrite: step, index within the step, the edit.
type Tampering = (&'static str, usize, fn(&mut Vec<u8>));

/// A channel that rewrites the `nth` message sent during step `step`.
struct Tamper<'a> {
    inner: &'a mut dyn Channel,
    step: &'static str,
    current: String,
    nth: usize,
    seen: usize,
    edit: fn(&mut Vec<u8>),
}

impl Channel for Tamper<'_> {
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        self.send_vec(msg.to_vec())
    }
    fn send_vec(&mut self, mut msg: Vec<u8>) -> Result<(), ChannelError> {
        if self.current == self.step {
            if self.seen == self.nth {
                (self.edit)(&mut msg);
            }
            self.seen += 1;
        }
        self.inner.send_vec(msg)
    }
    fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        self.inner.recv()
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        self.inner.flush()
    }
    fn set_step(&mut self, step: &str) {
        self.current = step.into();
        self.inner.set_step(step);
    }
}

/// One session run with the backend directly: set-up, then one batch of `rows` images
/// asking for `output`, through a channel that may rewrite one message. Returns the
/// error text the client sees.
async fn failing_session(
    client: &fusion_client::Client,
    spec: &ModelSpec,
    start_rows: u64,
    rows: usize,
    output: OutputMode,
    tamper: Option<Tampering>,
) -> String {
    let pixels = images(rows);
    let x = spec.fixed.encode_pixels(&pixels);
    let spec = spec.clone();
    let start = SessionStart::new("cheetah").with_batch(start_rows, spec.input_len as u64);
    let err = client
        .session(start, move |ch, _| {
            let mut rng = rand::rng();
            let mut t;
            let ch: &mut dyn Channel = match tamper {
                Some((step, nth, edit)) => {
                    t = Tamper {
                        inner: ch,
                        step,
                        current: String::new(),
                        nth,
                        seen: 0,
                        edit,
                    };
                    &mut t
                }
                None => ch,
            };
            let mut c = Cheetah::client_setup(ch, &spec, &CheetahConfig::default(), &mut rng)?;
            c.run_batch(ch, &x, rows, output, &mut rng)?;
            Ok::<_, BackendError>(())
        })
        .await
        .expect_err("the server refuses");
    match &err {
        ClientError::Protocol { source } => {
            assert!(source.downcast_ref::<BackendError>().is_some(), "{err}")
        }
        other => panic!("expected the protocol to fail, got {other}"),
    }
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_over_tls_are_named_and_the_server_goes_on() {
    let policy = Policy {
        output: OutputMode::Labels,
        max_rows: 4,
        budget: Some(10),
        ..Policy::default()
    };
    let (s, model) = server(policy).await;
    let fm = model.model.fixed_model();
    let spec = ModelSpec::of(fm);
    let client = s.client().await;

    // logits asked of a labels-only server: refused at the start, by code and name
    let err = run(
        &client,
        Inputs::Pixels(&images(1)),
        &InferOptions {
            output: Some(OutputMode::Logits),
            ..InferOptions::default()
        },
    )
    .await
    .unwrap_err();
    let InferError::Client(c) = &err else {
        panic!("{err}")
    };
    assert_eq!(c.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("labels only"), "{err}");
    // ... and in a batch header of a labels session
    let e = failing_session(&client, &spec, 4, 1, OutputMode::Logits, None).await;
    assert!(
        e.contains("FailedPrecondition") && e.contains("releases labels only"),
        "{e}"
    );
    // a wrong column count at the start
    let err = client
        .session(SessionStart::new("cheetah").with_batch(1, 783), |_, _| {
            Ok::<_, ChannelError>(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("the model takes 784"), "{err}");
    // ... and in a batch header
    fn cols_783(m: &mut Vec<u8>) {
        *m = BatchHeader {
            rows: 1,
            cols: 783,
            output: OutputMode::Labels,
        }
        .encode();
    }
    let e = failing_session(
        &client,
        &spec,
        4,
        1,
        OutputMode::Labels,
        Some(("batch/header", 0, cols_783)),
    )
    .await;
    assert!(
        e.contains("InvalidArgument") && e.contains("783 columns"),
        "{e}"
    );
    // rows over the limit (the session's declared batch and the policy's maximum): a
    // large batch, so the refusal arrives while the client is still sending
    let e = failing_session(&client, &spec, 0, 64, OutputMode::Labels, None).await;
    assert!(
        e.contains("FailedPrecondition") && e.contains("64 rows exceeds the maximum of 4"),
        "{e}"
    );
    let e = failing_session(&client, &spec, 2, 3, OutputMode::Labels, None).await;
    assert!(e.contains("3 rows exceeds the maximum of 2"), "{e}");
    // a wrong row count: the header says 2 rows, the HE query carries 1
    let two_rows: fn(&mut Vec<u8>) = |m| m[4] = 2;
    let e = failing_session(
        &client,
        &spec,
        4,
        1,
        OutputMode::Labels,
        Some(("batch/header", 0, two_rows)),
    )
    .await;
    assert!(e.contains("Aborted") && e.contains("layer shape"), "{e}");
    // a short message: a truncated ciphertext
    fn truncate(m: &mut Vec<u8>) {
        m.truncate(m.len() - 1);
    }
    let e = failing_session(
        &client,
        &spec,
        4,
        1,
        OutputMode::Labels,
        Some(("layer1/linear", 1, truncate)),
    )
    .await;
    assert!(e.contains("malformed input ciphertext"), "{e}");
    // a ciphertext for other parameters (the parameter id of the query)
    let other_params: fn(&mut Vec<u8>) = |m| m[1] ^= 0xff;
    let e = failing_session(
        &client,
        &spec,
        4,
        1,
        OutputMode::Labels,
        Some(("layer1/linear", 0, other_params)),
    )
    .await;
    assert!(e.contains("message for parameters"), "{e}");
    // so far 4 rows were charged: the batches whose header was accepted (2 rows
    // declared, 1, 1), each once although it failed; refused headers cost nothing
    assert_eq!(client.model_info().await.unwrap().budget.remaining(), 6);

    // budget exhaustion, per certificate
    let alice = s.client_as("alice").await.unwrap();
    let px = images(4);
    for _ in 0..2 {
        run(&alice, Inputs::Pixels(&px), &InferOptions::default())
            .await
            .unwrap();
    }
    let err = run(&alice, Inputs::Pixels(&px), &InferOptions::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ResourceExhausted")
            && text.contains("budget exhausted: 4 rows requested, 2 of 10 left"),
        "{text}"
    );
    // refused inside the session (the batch is counted when accepted): the same typed code
    // as a refusal at the start
    let InferError::Client(c) = &err else {
        panic!("{err}")
    };
    assert_eq!(c.code(), Some(Code::ResourceExhausted), "in-session: {err}");
    let err = run(
        &alice,
        Inputs::Pixels(&px[..2 * mnist::PIXELS]),
        &InferOptions::default(),
    )
    .await;
    assert!(err.is_ok(), "the last 2 rows are still there");
    let err = run(
        &alice,
        Inputs::Pixels(&px[..mnist::PIXELS]),
        &InferOptions::default(),
    )
    .await
    .unwrap_err();
    let InferError::Client(c) = &err else {
        panic!("{err}")
    };
    assert_eq!(
        c.code(),
        Some(Code::ResourceExhausted),
        "refused at the start: {err}"
    );

    // and the server still serves, exactly
    let pixels = images(3);
    let out = run(&client, Inputs::Pixels(&pixels), &InferOptions::default())
        .await
        .unwrap();
    assert_eq!(
        out.labels,
        eval_fixed(fm, &fm.encode_images(&pixels)).unwrap().labels
    );
    assert!(s.handle.stats().sessions_failed >= 8);
}

/// Flights in which both parties send before they receive (Ferret's trees, the
/// millionaire's leaves) must fit in the transport's buffers: a batch of 256 rows (over
/// Ferret, about 1.5 MB per flight of a hidden layer's ReLUs, a Ferret iteration among
/// them: more than one 1 MiB frame) over the real gRPC stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_256_rows_over_tls_completes_and_is_exact() {
    let policy = Policy {
        max_rows: 256,
        ..Policy::default()
    };
    let (s, model) = server(policy).await;
    let fm = model.model.fixed_model();
    let pixels = images(256);
    // linear layers online, so that the Ferret iteration runs in that flight
    let opts = InferOptions {
        cheetah: CheetahConfig::default(),
        ..InferOptions::default()
    };
    let out = run(&s.client().await, Inputs::Pixels(&pixels), &opts)
        .await
        .unwrap();
    assert_eq!(out.batches, 1);
    assert_eq!(
        out.labels,
        eval_fixed(fm, &fm.encode_images(&pixels)).unwrap().labels
    );
    let relu = out
        .cost
        .steps
        .iter()
        .find(|s| s.step == "layer1/relu_trunc")
        .unwrap();
    assert!(relu.bytes_sent > 1 << 20, "{relu:?}");
}
