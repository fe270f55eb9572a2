//! The backend's tests: both roles in-process over `memory_pair()` with seeded RNGs.
//!
//! - correctness against `eval_fixed`, bit for bit: 200 MNIST test images (labels and
//!   logits), and small models with every layer pattern and the ring's edge values;
//! - byte and flight counts of a batch against the `he` and `mpc` formulas;
//! - every refusal and every tampered or truncated message with its named error.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

use super::*;
use crate::channel::{CostReport, Counting, StepCost, memory_pair};
use crate::fixed::{FixedModel, eval_fixed};
use crate::he::HeError;
use crate::mpc::{MpcConfig, OtKind};
use crate::nn::mnist::{self, Split};
use crate::nn::{Architecture, LayerSpec, Model, Tensor};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn mnist_model() -> Model {
    Model::load(repo("models/mnist-dnn.safetensors")).unwrap()
}

/// Rewrites one message.
type Edit = Box<dyn FnMut(&mut Vec<u8>) + Send>;

/// A channel that rewrites the `nth` message sent during step `step`.
struct Tamper<C> {
    inner: C,
    step: String,
    current: String,
    nth: usize,
    seen: usize,
    edit: Edit,
}

impl<C: Channel> Tamper<C> {
    fn new(
        inner: C,
        step: &str,
        nth: usize,
        edit: impl FnMut(&mut Vec<u8>) + Send + 'static,
    ) -> Self {
        Self {
            inner,
            step: step.into(),
            current: String::new(),
            nth,
            seen: 0,
            edit: Box::new(edit),
        }
    }
}

impl<C: Channel> Channel for Tamper<C> {
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

/// One batch the client runs: inputs, rows, output mode.
type Batch = (Vec<u64>, usize, OutputMode);

struct Outcome {
    /// per batch: the output and the client's costs of that batch
    client: Result<Vec<(BatchOutput, Vec<StepCost>)>, BackendError>,
    server: Result<u64, BackendError>,
    policy: LocalPolicy,
}

/// Steps of `after` minus those of `before` (same names), in `after`'s order.
fn diff(after: &CostReport, before: &CostReport) -> Vec<StepCost> {
    after
        .steps
        .iter()
        .filter_map(|s| {
            let mut d = s.clone();
            if let Some(b) = before.steps.iter().find(|b| b.step == s.step) {
                d.bytes_sent -= b.bytes_sent;
                d.bytes_received -= b.bytes_received;
                d.messages_sent -= b.messages_sent;
                d.messages_received -= b.messages_received;
                d.rounds -= b.rounds;
            }
            (d.bytes_total() > 0 || d.rounds > 0).then_some(d)
        })
        .collect()
}

/// Runs a session: the server (model `served`, policy) and the client (spec, config),
/// the client's channel optionally wrapped by `wrap`; the client runs `batches` in
/// order and stops at its first error.
fn session(
    served: &FixedModel,
    spec: &ModelSpec,
    client_cfg: CheetahConfig,
    server_cfg: CheetahConfig,
    policy: LocalPolicy,
    batches: Vec<Batch>,
    wrap: impl FnOnce(crate::channel::MemoryChannel) -> Box<dyn Channel> + Send,
) -> Outcome {
    let (a, b) = memory_pair();
    std::thread::scope(|sc| {
        let server = sc.spawn(move || {
            let mut policy = policy;
            let mut ch = b;
            let mut rng = ChaCha12Rng::seed_from_u64(1);
            let r = Cheetah::server_setup(&mut ch, served, &server_cfg, &mut rng)
                .and_then(|mut s| s.serve(&mut ch, served, &mut policy, &mut Honest, &mut rng));
            (r, policy)
        });
        let client = sc.spawn(move || {
            let mut ch = Counting::new(wrap(a));
            let mut rng = ChaCha12Rng::seed_from_u64(2);
            let mut c = Cheetah::client_setup(&mut ch, spec, &client_cfg, &mut rng)?;
            let mut outs = Vec::new();
            for (x, rows, mode) in &batches {
                let before = ch.report();
                let out = c.run_batch(&mut ch, x, *rows, *mode, &mut rng)?;
                outs.push((out, diff(&ch.report(), &before)));
            }
            Ok(outs)
        });
        let client = client.join().unwrap();
        let (server, policy) = server.join().unwrap();
        Outcome {
            client,
            server,
            policy,
        }
    })
}

fn plain(ch: crate::channel::MemoryChannel) -> Box<dyn Channel> {
    Box::new(ch)
}

fn unlimited(output: OutputMode) -> LocalPolicy {
    LocalPolicy::new(1 << 20, output, None)
}

fn check_against_eval(model: &FixedModel, x: &[u64], out: &BatchOutput) {
    let e = eval_fixed(model, x).unwrap();
    assert_eq!(out.labels, e.labels);
    assert_eq!(out.classes, e.classes);
    if let Some(l) = &out.logits {
        assert_eq!(l, &e.logits, "logits bit for bit");
    }
}

#[test]
fn mnist_200_images_labels_and_logits_equal_the_fixed_point_evaluator() {
    let model = mnist_model();
    let fm = model.fixed_model();
    let spec = ModelSpec::of(fm);
    let images = mnist::read_images(&Split::Test.images_path(&repo("data/mnist"))).unwrap();
    let x = fm.encode_images(&images[..200 * mnist::PIXELS]);
    let (first, second) = x.split_at(100 * mnist::PIXELS);
    let cfg = CheetahConfig::default();
    // two batches of 100 in labels mode, then the same 200 rows at once in logits mode
    let batches = vec![
        (first.to_vec(), 100, OutputMode::Labels),
        (second.to_vec(), 100, OutputMode::Labels),
        (x.clone(), 200, OutputMode::Logits),
    ];
    let o = session(
        fm,
        &spec,
        cfg,
        cfg,
        unlimited(OutputMode::Logits),
        batches,
        plain,
    );
    assert_eq!(o.server.unwrap(), 3);
    let outs = o.client.unwrap();
    check_against_eval(fm, first, &outs[0].0);
    check_against_eval(fm, second, &outs[1].0);
    check_against_eval(fm, &x, &outs[2].0);
    assert!(outs[2].0.logits.is_some() && outs[0].0.logits.is_none());
    let e = eval_fixed(fm, &x).unwrap();
    let mut labels = outs[0].0.labels.clone();
    labels.extend(&outs[1].0.labels);
    assert_eq!(labels, e.labels);
    assert_eq!(outs[2].0.labels, e.labels);
    // the step names of a batch, in order
    let names: Vec<&str> = outs[0].1.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        names,
        [
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
    assert_eq!(outs[2].1.last().unwrap().step, "output/reveal");
    // the same 200 rows with preprocessed linear layers (Delphi's split): the same bits
    let pre = CheetahConfig {
        linear: LinearMode::Preprocessed,
        ..cfg
    };
    let o = session(
        fm,
        &spec,
        pre,
        cfg,
        unlimited(OutputMode::Logits),
        vec![(x.clone(), 200, OutputMode::Logits)],
        plain,
    );
    assert_eq!(o.server.unwrap(), 1);
    check_against_eval(fm, &x, &o.client.unwrap()[0].0);
}

/// Costs of a batch: bytes of every step exactly, and flights exactly where the batch
/// follows a batch (the first one follows the set-up, whose last direction varies).
fn assert_costs(measured: &[StepCost], predicted: &[StepCost], flights: bool) {
    let names = |v: &[StepCost]| v.iter().map(|s| s.step.clone()).collect::<Vec<_>>();
    assert_eq!(names(measured), names(predicted));
    for (m, p) in measured.iter().zip(predicted) {
        assert_eq!(
            (m.bytes_sent, m.bytes_received),
            (p.bytes_sent, p.bytes_received),
            "bytes of {}",
            m.step
        );
        if flights {
            assert_eq!(m.rounds, p.rounds, "flights of {}", m.step);
        }
    }
}

/// Predicts the costs of `batches` with a client set up like the session's (same seed,
/// same COT buffers) by replaying: predictions are taken before each batch.
fn predicted(served: &FixedModel, cfg: CheetahConfig, batches: &[Batch]) -> Vec<Vec<StepCost>> {
    let (a, b) = memory_pair();
    let spec = ModelSpec::of(served);
    std::thread::scope(|sc| {
        sc.spawn(move || {
            let mut ch = b;
            let mut rng = ChaCha12Rng::seed_from_u64(1);
            let mut p = unlimited(OutputMode::Logits);
            let mut s = Cheetah::server_setup(&mut ch, served, &cfg, &mut rng).unwrap();
            s.serve(&mut ch, served, &mut p, &mut Honest, &mut rng)
                .unwrap();
        });
        let mut ch = a;
        let mut rng = ChaCha12Rng::seed_from_u64(2);
        let mut c = Cheetah::client_setup(&mut ch, &spec, &cfg, &mut rng).unwrap();
        let mut out = Vec::new();
        for (x, rows, mode) in batches {
            out.push(c.predict_batch_cost(*rows, *mode).unwrap());
            c.run_batch(&mut ch, x, *rows, *mode, &mut rng).unwrap();
        }
        out
    })
}

fn tensor(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
    Tensor::new(shape, data).unwrap()
}

/// A model with every layer pattern the plan knows: ReLU before any Dense, a ReLU
/// fused across a Flatten, a standalone ReLU after a fused one, a final Dense with no
/// ReLU (plain truncation), and equal output biases (ties in the argmax).
fn patterns_model() -> Model {
    let arch = Architecture::new(
        vec![2, 3],
        vec![
            LayerSpec::Flatten,
            LayerSpec::Relu,
            LayerSpec::Dense {
                inputs: 6,
                outputs: 5,
            },
            LayerSpec::Flatten,
            LayerSpec::Relu,
            LayerSpec::Relu,
            LayerSpec::Dense {
                inputs: 5,
                outputs: 4,
            },
        ],
    )
    .unwrap();
    let w1: Vec<f32> = (0..30).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let w2: Vec<f32> = (0..20).map(|i| ((i * 5 % 9) as f32 - 4.0) / 3.0).collect();
    let params = vec![
        vec![],
        vec![],
        vec![
            tensor(vec![5, 6], w1),
            tensor(vec![5], vec![0.5, -0.25, 0.0, 1.0, -1.5]),
        ],
        vec![],
        vec![],
        vec![],
        vec![tensor(vec![4, 5], w2), tensor(vec![4], vec![0.125; 4])],
    ];
    Model::new(arch, params, crate::fixed::FixedPoint::new(33, 12).unwrap()).unwrap()
}

#[test]
fn every_layer_pattern_and_the_ring_edges_equal_the_evaluator() {
    let model = patterns_model();
    let fm = model.fixed_model();
    let ring = fm.fixed_point().ring();
    let fp = fm.fixed_point();
    let min = 1u64 << (ring.bits() - 1);
    let max = min - 1;
    let m1 = ring.mask();
    let rows: Vec<Vec<u64>> = vec![
        vec![0; 6],
        vec![m1; 6],
        vec![max; 6],
        vec![min; 6],
        vec![min, max, 0, m1, 1, min + 1],
        (0..6)
            .map(|i| fp.encode(i as f64 / 2.0 - 1.2).unwrap())
            .collect(),
        (0..6).map(|i| fp.encode(3.0 - i as f64).unwrap()).collect(),
    ];
    let x: Vec<u64> = rows.concat();
    let n = rows.len();
    let spec = ModelSpec::of(fm);
    let plan = plan::Plan::new(&spec).unwrap();
    assert_eq!(plan.stages.len(), 4, "{:?}", plan.stages);
    let cfg = CheetahConfig::default();
    // both linear-layer modes; the server takes the mode from the client's hello
    let pre = CheetahConfig {
        linear: LinearMode::Preprocessed,
        ..cfg
    };
    let run_both = |client_cfg: CheetahConfig| {
        let o = session(
            fm,
            &spec,
            client_cfg,
            cfg,
            unlimited(OutputMode::Logits),
            vec![
                (x.clone(), n, OutputMode::Logits),
                (x.clone(), n, OutputMode::Labels),
            ],
            plain,
        );
        assert_eq!(o.server.unwrap(), 2);
        let outs = o.client.unwrap();
        check_against_eval(fm, &x, &outs[0].0);
        check_against_eval(fm, &x, &outs[1].0);
        outs
    };
    let outs = run_both(pre);
    let names: Vec<&str> = outs[0].1.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        names[..3],
        ["batch/header", "offline/linear", "layer0/relu"]
    );
    let outs = run_both(cfg);
    // all-equal logits: a model whose last layer is a constant, so every row ties and
    // the first index must win
    let ties = ties_model();
    let tf = ties.fixed_model();
    let tx: Vec<u64> = rows_of(tf, 3);
    let o = session(
        tf,
        &ModelSpec::of(tf),
        cfg,
        cfg,
        unlimited(OutputMode::Logits),
        vec![(tx.clone(), 3, OutputMode::Labels)],
        plain,
    );
    let outs2 = o.client.unwrap();
    check_against_eval(tf, &tx, &outs2[0].0);
    assert_eq!(outs2[0].0.labels, [0, 0, 0]);
    let names: Vec<&str> = outs[0].1.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        names,
        [
            "batch/header",
            "layer0/relu",
            "layer1/linear",
            "layer1/relu_trunc",
            "layer1/relu",
            "layer2/linear",
            "layer2/trunc",
            "output/reveal"
        ]
    );
}

#[test]
fn batch_bytes_and_flights_equal_the_he_and_mpc_formulas() {
    let model = patterns_model();
    let fm = model.fixed_model();
    let x: Vec<u64> = (0..3 * 6)
        .map(|i| (i * 977) as u64 & fm.fixed_point().ring().mask())
        .collect();
    for cfg in [
        CheetahConfig::default(),
        CheetahConfig::with_ot(OtKind::Iknp),
        CheetahConfig {
            ot: OtKind::Iknp,
            mpc: MpcConfig {
                min_batch: 1,
                leaf_bits: 4,
                kn: crate::ot::KkotConfig::FromCots,
            },
            weight_bits: None,
            linear: LinearMode::Online,
        },
        CheetahConfig {
            ot: OtKind::Ferret,
            mpc: MpcConfig {
                min_batch: 1,
                ..MpcConfig::recommended(OtKind::Ferret)
            },
            weight_bits: None,
            linear: LinearMode::Online,
        },
        CheetahConfig {
            linear: LinearMode::Preprocessed,
            ..CheetahConfig::default()
        },
        CheetahConfig {
            linear: LinearMode::Preprocessed,
            ..CheetahConfig::with_ot(OtKind::Iknp)
        },
    ] {
        let batches = vec![
            (x.clone(), 3, OutputMode::Labels),
            (x[..12].to_vec(), 2, OutputMode::Logits),
            (x.clone(), 3, OutputMode::Labels),
        ];
        let o = session(
            fm,
            &ModelSpec::of(fm),
            cfg,
            cfg,
            unlimited(OutputMode::Logits),
            batches.clone(),
            plain,
        );
        let outs = o.client.unwrap();
        let pred = predicted(fm, cfg, &batches);
        for (i, ((_, measured), p)) in outs.iter().zip(&pred).enumerate() {
            assert_costs(measured, p, i > 0);
        }
        // the formulas themselves: the first linear layer is the HE formula, the output
        // of a logits batch is one flight of l bits per value
        let he = crate::he::HeParams::new(33, 33).unwrap();
        let lc = crate::he::layer_cost(&he, &crate::he::LinearShape::new(3, 6, 5)).unwrap();
        let named = |n: &str| outs[0].1.iter().find(|s| s.step == n).unwrap().clone();
        let l1 = named("layer1/linear");
        match cfg.linear {
            LinearMode::Online => assert_eq!(
                (l1.bytes_sent, l1.bytes_received),
                (lc.query_bytes as u64, lc.response_bytes as u64)
            ),
            LinearMode::Preprocessed => {
                // online: the masked input only, l bits per value, one way
                assert_eq!(
                    (l1.bytes_sent, l1.bytes_received),
                    ((3 * 6 * 33usize).div_ceil(8) as u64, 0)
                );
                // offline: both layers' HE, one flight each way
                let lc2 =
                    crate::he::layer_cost(&he, &crate::he::LinearShape::new(3, 5, 4)).unwrap();
                let off = named("offline/linear");
                assert_eq!(
                    (off.bytes_sent, off.bytes_received),
                    (
                        (lc.query_bytes + lc2.query_bytes) as u64,
                        (lc.response_bytes + lc2.response_bytes) as u64
                    )
                );
            }
        }
        let rev = outs[1].1.last().unwrap();
        assert_eq!(rev.step, "output/reveal");
        assert_eq!(
            (rev.bytes_sent, rev.bytes_received, rev.rounds),
            (0, (2 * 4 * 33usize).div_ceil(8) as u64, 0),
            "the reveal continues the flight of the truncation"
        );
    }
}

#[test]
fn mnist_batch_costs_equal_the_formulas_with_the_default_configuration() {
    let model = mnist_model();
    let fm = model.fixed_model();
    let images = mnist::read_images(&Split::Test.images_path(&repo("data/mnist"))).unwrap();
    let x = fm.encode_images(&images[..2 * mnist::PIXELS]);
    let cfg = CheetahConfig::default();
    let batches = vec![
        (x[..mnist::PIXELS].to_vec(), 1, OutputMode::Labels),
        (x.clone(), 2, OutputMode::Labels),
    ];
    let o = session(
        fm,
        &ModelSpec::of(fm),
        cfg,
        cfg,
        unlimited(OutputMode::Labels),
        batches.clone(),
        plain,
    );
    let outs = o.client.unwrap();
    let pred = predicted(fm, cfg, &batches);
    assert_costs(&outs[0].1, &pred[0], false);
    assert_costs(&outs[1].1, &pred[1], true);
    check_against_eval(fm, &x, &outs[1].0);
}

fn small() -> Model {
    let arch = Architecture::mlp(&[4], &[3], 2).unwrap();
    let params = vec![
        vec![
            tensor(vec![3, 4], (0..12).map(|i| i as f32 / 10.0 - 0.5).collect()),
            tensor(vec![3], vec![0.1, -0.2, 0.3]),
        ],
        vec![],
        vec![
            tensor(vec![2, 3], vec![0.5, -0.5, 0.25, -0.25, 0.75, 0.1]),
            tensor(vec![2], vec![0.0, 0.05]),
        ],
    ];
    Model::new(arch, params, crate::fixed::FixedPoint::new(33, 12).unwrap()).unwrap()
}

/// A model whose logits are equal for every input (zero last-layer weights, equal biases).
fn ties_model() -> Model {
    let arch = Architecture::mlp(&[4], &[3], 3).unwrap();
    let params = vec![
        vec![
            tensor(vec![3, 4], (0..12).map(|i| i as f32 / 10.0 - 0.5).collect()),
            tensor(vec![3], vec![0.1, -0.2, 0.3]),
        ],
        vec![],
        vec![
            tensor(vec![3, 3], vec![0.0; 9]),
            tensor(vec![3], vec![0.5; 3]),
        ],
    ];
    Model::new(arch, params, crate::fixed::FixedPoint::new(33, 12).unwrap()).unwrap()
}

fn rows_of(m: &FixedModel, n: usize) -> Vec<u64> {
    let mask = m.fixed_point().ring().mask();
    (0..n * m.input_len())
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & mask)
        .collect()
}

fn rows(n: usize) -> Vec<u64> {
    (0..n * 4).map(|i| (i as u64 * 1234) % 4096).collect()
}

/// Runs one refused or tampered session and returns the server's error.
fn server_error(
    policy: LocalPolicy,
    client_cfg: CheetahConfig,
    spec: Option<ModelSpec>,
    batches: Vec<Batch>,
    wrap: impl FnOnce(crate::channel::MemoryChannel) -> Box<dyn Channel> + Send,
) -> (BackendError, LocalPolicy) {
    let model = small();
    let fm = model.fixed_model();
    let spec = spec.unwrap_or_else(|| ModelSpec::of(fm));
    let o = session(
        fm,
        &spec,
        client_cfg,
        CheetahConfig::default(),
        policy,
        batches,
        wrap,
    );
    assert!(o.client.is_err(), "the client sees the session end");
    (o.server.unwrap_err(), o.policy)
}

#[test]
fn refused_batches_are_named_and_not_charged() {
    let cfg = CheetahConfig::default();
    let labels_only = || LocalPolicy::new(4, OutputMode::Labels, Some(5));
    // logits asked of a labels-only server
    let (e, p) = server_error(
        labels_only(),
        cfg,
        None,
        vec![(rows(1), 1, OutputMode::Logits)],
        plain,
    );
    assert!(
        matches!(e, BackendError::Refused(BatchRefusal::LogitsNotAllowed)),
        "{e}"
    );
    assert_eq!(p.budget, Some(5), "not charged");
    // rows over the limit
    let (e, _) = server_error(
        labels_only(),
        cfg,
        None,
        vec![(rows(5), 5, OutputMode::Labels)],
        plain,
    );
    assert!(
        matches!(
            e,
            BackendError::Refused(BatchRefusal::TooManyRows { rows: 5, max: 4 })
        ),
        "{e}"
    );
    // budget exhaustion: 3 rows served, the next 3 refused, the budget keeps its 2
    let (e, p) = server_error(
        labels_only(),
        cfg,
        None,
        vec![
            (rows(3), 3, OutputMode::Labels),
            (rows(3), 3, OutputMode::Labels),
        ],
        plain,
    );
    assert_eq!(
        e.to_string(),
        "batch refused: budget exhausted: 3 rows requested, 2 of 5 left"
    );
    assert_eq!(p.budget, Some(2));
    // a wrong column count and zero rows (headers written by hand)
    let header = |rows: u32, cols: u32| {
        move |m: &mut Vec<u8>| {
            *m = BatchHeader {
                rows,
                cols,
                output: OutputMode::Labels,
            }
            .encode()
        }
    };
    let (e, _) = server_error(
        labels_only(),
        cfg,
        None,
        vec![(rows(1), 1, OutputMode::Labels)],
        |c| Box::new(Tamper::new(c, "batch/header", 0, header(1, 5))),
    );
    assert!(
        matches!(
            e,
            BackendError::Refused(BatchRefusal::Columns {
                declared: 5,
                expected: 4
            })
        ),
        "{e}"
    );
    let (e, _) = server_error(
        labels_only(),
        cfg,
        None,
        vec![(rows(1), 1, OutputMode::Labels)],
        |c| Box::new(Tamper::new(c, "batch/header", 0, header(0, 4))),
    );
    assert!(
        matches!(e, BackendError::Refused(BatchRefusal::NoRows)),
        "{e}"
    );
}

#[test]
fn wrong_row_count_short_message_and_other_parameters_are_refused_by_name() {
    let cfg = CheetahConfig::default();
    let policy = || LocalPolicy::new(16, OutputMode::Labels, None);
    let batch = || vec![(rows(2), 2, OutputMode::Labels)];
    // the header declares 3 rows, the HE query is for 2
    let (e, p) = server_error(policy(), cfg, None, batch(), |c| {
        Box::new(Tamper::new(c, "batch/header", 0, |m: &mut Vec<u8>| {
            m[4] = 3
        }))
    });
    assert!(
        matches!(e, BackendError::He(HeError::ShapeMismatch { .. })),
        "{e}"
    );
    assert_eq!(p.budget, None);
    // a truncated ciphertext (the first one after the query header)
    let (e, _) = server_error(policy(), cfg, None, batch(), |c| {
        Box::new(Tamper::new(c, "layer1/linear", 1, |m: &mut Vec<u8>| {
            m.truncate(m.len() - 1)
        }))
    });
    assert!(
        matches!(e, BackendError::He(HeError::MalformedLength { .. })),
        "{e}"
    );
    // preprocessed linear layers: a masked input one byte short, then one too long
    let pre = CheetahConfig {
        linear: LinearMode::Preprocessed,
        ..cfg
    };
    for edit in [
        (|m: &mut Vec<u8>| m.truncate(m.len() - 1)) as fn(&mut Vec<u8>),
        |m: &mut Vec<u8>| m.push(0),
    ] {
        let (e, _) = server_error(policy(), pre, None, batch(), move |c| {
            Box::new(Tamper::new(c, "layer1/linear", 0, edit))
        });
        assert!(
            matches!(
                e,
                BackendError::Malformed {
                    what: "masked layer input",
                    ..
                }
            ),
            "{e}"
        );
    }
    // a query for other parameters (the parameter id in the query header)
    let (e, _) = server_error(policy(), cfg, None, batch(), |c| {
        Box::new(Tamper::new(c, "layer1/linear", 0, |m: &mut Vec<u8>| {
            m[1] ^= 1
        }))
    });
    assert!(
        matches!(e, BackendError::He(HeError::WrongParameters { .. })),
        "{e}"
    );
    // HE keys for other parameters
    let (e, _) = server_error(policy(), cfg, None, batch(), |c| {
        Box::new(Tamper::new(c, "setup/he-keys", 0, |m: &mut Vec<u8>| {
            m[1] ^= 1
        }))
    });
    assert!(
        matches!(e, BackendError::He(HeError::WrongParameters { .. })),
        "{e}"
    );
    // a truncated 2PC message (the truncation's first client message)
    let (e, _) = server_error(policy(), cfg, None, batch(), |c| {
        Box::new(Tamper::new(c, "layer1/relu_trunc", 0, |m: &mut Vec<u8>| {
            m.truncate(m.len() / 2)
        }))
    });
    assert!(matches!(e, BackendError::Mpc(_)), "{e}");
    // a short header, and another message where the header should be
    let (e, _) = server_error(policy(), cfg, None, batch(), |c| {
        Box::new(Tamper::new(c, "batch/header", 0, |m: &mut Vec<u8>| {
            m.truncate(9)
        }))
    });
    assert!(matches!(e, BackendError::Malformed { .. }), "{e}");
    let (e, _) = server_error(policy(), cfg, None, batch(), |c| {
        Box::new(Tamper::new(c, "batch/header", 0, |m: &mut Vec<u8>| {
            m[0] = 0x48
        }))
    });
    assert!(matches!(e, BackendError::WrongMessage { .. }), "{e}");
}

#[test]
fn setup_refuses_another_model_configuration_or_version() {
    let model = small();
    let mut spec = ModelSpec::of(model.fixed_model());
    spec.digest[0] ^= 1;
    let policy = || LocalPolicy::new(16, OutputMode::Labels, None);
    let (e, _) = server_error(
        policy(),
        CheetahConfig::default(),
        Some(spec),
        vec![],
        plain,
    );
    assert!(matches!(e, BackendError::ModelMismatch { .. }), "{e}");
    let other = CheetahConfig {
        mpc: MpcConfig {
            leaf_bits: 5,
            ..CheetahConfig::default().mpc
        },
        ..CheetahConfig::default()
    };
    let (e, _) = server_error(policy(), other, None, vec![], plain);
    assert!(matches!(e, BackendError::ConfigMismatch { .. }), "{e}");
    // the same 2PC configuration over another core OT
    let iknp = CheetahConfig {
        ot: OtKind::Iknp,
        ..CheetahConfig::default()
    };
    let (e, _) = server_error(policy(), iknp, None, vec![], plain);
    assert!(
        matches!(&e, BackendError::ConfigMismatch { peer, .. } if peer.contains("core OT iknp")),
        "{e}"
    );
    let bound = CheetahConfig {
        weight_bits: Some(20),
        ..CheetahConfig::default()
    };
    let (e, _) = server_error(policy(), bound, None, vec![], plain);
    assert!(matches!(e, BackendError::ConfigMismatch { .. }), "{e}");
    let (e, _) = server_error(policy(), CheetahConfig::default(), None, vec![], |c| {
        Box::new(Tamper::new(c, "setup/hello", 0, |m: &mut Vec<u8>| m[2] = 9))
    });
    assert!(
        matches!(e, BackendError::Version { ours: 3, peer: 9 }),
        "{e}"
    );
}

#[test]
fn unsupported_layers_and_models_are_named_before_anything_is_sent() {
    let base = ModelSpec::of(small().fixed_model());
    let with = |layers: Vec<LayerKind>| ModelSpec {
        layers,
        ..base.clone()
    };
    let d = |i, o| LayerKind::Dense {
        inputs: i,
        outputs: o,
    };
    let e = plan::Plan::new(&with(vec![d(4, 3), LayerKind::Other("conv2d".into())])).unwrap_err();
    assert!(
        matches!(&e, BackendError::UnsupportedLayer { index: 1, kind } if kind == "conv2d"),
        "{e}"
    );
    for layers in [
        vec![LayerKind::Relu],
        vec![d(4, 4), d(4, 4), d(4, 4), d(4, 4), d(4, 2)],
        vec![d(5, 3)],
        vec![d(4, 0)],
    ] {
        let e = plan::Plan::new(&with(layers)).unwrap_err();
        assert!(matches!(e, BackendError::UnsupportedModel(_)), "{e}");
    }
    let mut zero_f = base.clone();
    zero_f.fixed = crate::fixed::FixedPoint::new(33, 0).unwrap();
    assert!(plan::Plan::new(&zero_f).is_err());
    // the client refuses locally: nothing reaches the channel
    let (mut a, b) = memory_pair();
    let mut rng = ChaCha12Rng::seed_from_u64(3);
    let e = Cheetah::client_setup(
        &mut a,
        &with(vec![LayerKind::Other("conv2d".into())]),
        &CheetahConfig::default(),
        &mut rng,
    )
    .unwrap_err();
    assert!(matches!(e, BackendError::UnsupportedLayer { .. }));
    drop(a);
    let mut b = b;
    assert!(matches!(b.recv(), Err(ChannelError::Closed)));
}

#[test]
fn large_batches_split_into_he_and_2pc_calls_and_stay_exact() {
    // a plan whose HE calls hold 2 rows and whose 2PC calls hold 4 values: 5 rows are 3
    // HE calls per layer, 5 truncations of one row of 3, 3 argmaxes of 2 rows of 2
    let model = small();
    let fm = model.fixed_model();
    let mut plan = plan::Plan::new(&ModelSpec::of(fm)).unwrap();
    plan.chunk_rows = 2;
    plan.mpc_values = 4;
    let chunks: Vec<_> = plan.chunks(5).collect();
    assert_eq!(chunks, [0..2, 2..4, 4..5]);
    assert_eq!(plan.chunks(4).count(), 2);
    assert_eq!(plan.mpc_parts(15, 3).collect::<Vec<_>>(), [3; 5]);
    assert_eq!(plan.mpc_parts(10, 2).collect::<Vec<_>>(), [4, 4, 2]);
    // the real plan of the MNIST model: 2^18 / 128 rows per HE call, 1024 rows per 2PC call
    let mplan = plan::Plan::new(&ModelSpec::of(mnist_model().fixed_model())).unwrap();
    assert_eq!(mplan.chunk_rows, 2048);
    assert_eq!(mplan.mpc_parts(1024 * 128, 128).count(), 1);
    assert_eq!(
        mplan.mpc_parts(1025 * 128, 128).collect::<Vec<_>>(),
        [1024 * 128, 128]
    );

    let (mut a, mut b) = memory_pair();
    let cfg = CheetahConfig::default();
    let x = rows(5);
    std::thread::scope(|sc| {
        let plan2 = plan.clone();
        sc.spawn(move || {
            let mut rng = ChaCha12Rng::seed_from_u64(5);
            let mut s = Cheetah::server_setup(&mut b, fm, &cfg, &mut rng).unwrap();
            s.plan = plan2;
            s.serve(
                &mut b,
                fm,
                &mut unlimited(OutputMode::Logits),
                &mut Honest,
                &mut rng,
            )
            .unwrap();
        });
        let mut ch = Counting::new(&mut a);
        let mut rng = ChaCha12Rng::seed_from_u64(6);
        let mut c = Cheetah::client_setup(&mut ch, &ModelSpec::of(fm), &cfg, &mut rng).unwrap();
        c.plan = plan.clone();
        let mut measured = Vec::new();
        let mut predicted = Vec::new();
        for mode in [OutputMode::Logits, OutputMode::Labels] {
            predicted.push(c.predict_batch_cost(5, mode).unwrap());
            let before = ch.report();
            let out = c.run_batch(&mut ch, &x, 5, mode, &mut rng).unwrap();
            check_against_eval(fm, &x, &out);
            measured.push(diff(&ch.report(), &before));
        }
        assert_costs(&measured[0], &predicted[0], false);
        assert_costs(&measured[1], &predicted[1], true);
        let steps = &measured[0];
        let l1 = steps.iter().find(|s| s.step == "layer1/linear").unwrap();
        assert_eq!(
            l1.rounds, 1,
            "queries in the header's flight, answers in one"
        );
        let he = c.he_params();
        let expected: usize = chunks
            .iter()
            .map(|r| {
                crate::he::layer_cost(he, &crate::he::LinearShape::new(r.len(), 4, 3))
                    .unwrap()
                    .query_bytes
            })
            .sum();
        assert_eq!(l1.bytes_sent, expected as u64);
        drop(ch);
        drop(a);
    });
}

#[test]
fn the_roles_debug_output_redacts_keys_and_seeds() {
    let model = small();
    let fm = model.fixed_model();
    let (mut a, mut b) = memory_pair();
    let cfg = CheetahConfig::default();
    let (c, s) = std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            let mut rng = ChaCha12Rng::seed_from_u64(7);
            Cheetah::server_setup(&mut b, fm, &cfg, &mut rng).unwrap()
        });
        let mut rng = ChaCha12Rng::seed_from_u64(8);
        let c = Cheetah::client_setup(&mut a, &ModelSpec::of(fm), &cfg, &mut rng).unwrap();
        (c, h.join().unwrap())
    });
    let (cd, sd) = (format!("{c:?}"), format!("{s:?}"));
    assert!(cd.contains("secret_key: \"[redacted]\""), "{cd}");
    assert!(
        cd.contains("[redacted]") && sd.contains("[redacted]"),
        "{sd}"
    );
    assert!(!sd.contains("weight"), "{sd}");
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let out = BatchOutput {
        labels: vec![3],
        logits: Some(vec![123_456_789]),
        classes: 1,
    };
    let s = format!("{out:?}");
    assert!(!s.contains("123456789") && s.contains("[redacted]"), "{s}");
}

#[test]
fn a_prepared_batch_runs_only_its_online_phase_and_equals_the_evaluator() {
    let model = patterns_model();
    let fm = model.fixed_model();
    let spec = ModelSpec::of(fm);
    let x: Vec<u64> = rows_of(fm, 3);
    let pre = CheetahConfig {
        linear: LinearMode::Preprocessed,
        ..CheetahConfig::with_ot(OtKind::Iknp)
    };
    let (a, b) = memory_pair();
    std::thread::scope(|sc| {
        let server = sc.spawn(move || {
            let mut ch = b;
            let mut rng = ChaCha12Rng::seed_from_u64(1);
            let mut p = unlimited(OutputMode::Logits);
            let cfg = CheetahConfig::with_ot(OtKind::Iknp);
            let mut s = Cheetah::server_setup(&mut ch, fm, &cfg, &mut rng).unwrap();
            s.serve(&mut ch, fm, &mut p, &mut Honest, &mut rng)
        });
        let mut ch = Counting::new(a);
        let mut rng = ChaCha12Rng::seed_from_u64(2);
        let mut c = Cheetah::client_setup(&mut ch, &spec, &pre, &mut rng).unwrap();
        // offline first, inputs later: the batch runs only online steps
        c.prepare_batch(&mut ch, 3, OutputMode::Logits, &mut rng)
            .unwrap();
        let e = c
            .prepare_batch(&mut ch, 3, OutputMode::Logits, &mut rng)
            .unwrap_err();
        assert!(matches!(e, BackendError::BadBatch(_)), "{e}");
        let before = ch.report();
        let out = c
            .run_batch(&mut ch, &x, 3, OutputMode::Logits, &mut rng)
            .unwrap();
        check_against_eval(fm, &x, &out);
        let after = ch.report();
        let new_steps: Vec<String> = after
            .steps
            .iter()
            .filter(|s| {
                let old = before.steps.iter().find(|o| o.step == s.step);
                old.is_none_or(|o| o.bytes_total() != s.bytes_total())
            })
            .map(|s| s.step.clone())
            .collect();
        assert!(
            new_steps
                .iter()
                .all(|s| s.starts_with("layer") || s.starts_with("output")),
            "{new_steps:?}"
        );
        assert!(new_steps.contains(&"layer1/linear".to_string()));
        // a run that does not match the prepared batch is refused by name
        c.prepare_batch(&mut ch, 3, OutputMode::Logits, &mut rng)
            .unwrap();
        let e = c
            .run_batch(&mut ch, &x[..2 * 6], 2, OutputMode::Logits, &mut rng)
            .unwrap_err();
        assert!(
            matches!(&e, BackendError::BadBatch(m) if m.contains("prepared batch has 3 rows")),
            "{e}"
        );
        drop(ch);
        // the server saw a batch, then a header and offline phase that never continued
        assert!(server.join().unwrap().is_err());
    });
    // online sessions have nothing to prepare
    let (a, b) = memory_pair();
    std::thread::scope(|sc| {
        sc.spawn(move || {
            let mut ch = b;
            let mut rng = ChaCha12Rng::seed_from_u64(1);
            let cfg = CheetahConfig::default();
            let mut p = unlimited(OutputMode::Logits);
            let mut s = Cheetah::server_setup(&mut ch, fm, &cfg, &mut rng).unwrap();
            let _ = s.serve(&mut ch, fm, &mut p, &mut Honest, &mut rng);
        });
        let mut ch = a;
        let mut rng = ChaCha12Rng::seed_from_u64(2);
        let cfg = CheetahConfig::default();
        let mut c = Cheetah::client_setup(&mut ch, &spec, &cfg, &mut rng).unwrap();
        let e = c
            .prepare_batch(&mut ch, 3, OutputMode::Logits, &mut rng)
            .unwrap_err();
        assert!(matches!(e, BackendError::BadBatch(_)), "{e}");
    });
}

/// A channel that rewrites the `nth` message received during step `step` and counts the
/// messages received in that step.
struct TamperRecv<C> {
    inner: C,
    step: &'static str,
    current: String,
    nth: usize,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    edit: Edit,
}

impl<C: Channel> Channel for TamperRecv<C> {
    fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        self.inner.send(msg)
    }
    fn send_vec(&mut self, msg: Vec<u8>) -> Result<(), ChannelError> {
        self.inner.send_vec(msg)
    }
    fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        let mut m = self.inner.recv()?;
        if self.current == self.step {
            use std::sync::atomic::Ordering;
            if self.seen.fetch_add(1, Ordering::SeqCst) == self.nth {
                (self.edit)(&mut m);
            }
        }
        Ok(m)
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        self.inner.flush()
    }
    fn set_step(&mut self, step: &str) {
        self.current = step.into();
        self.inner.set_step(step);
    }
}

#[test]
fn a_result_ciphertext_of_the_wrong_length_is_refused_before_the_next_is_read() {
    // the client holds a layer's answers until all are in: each ciphertext's length is
    // checked as it arrives, in both linear modes
    let model = small();
    let fm = model.fixed_model();
    let spec = ModelSpec::of(fm);
    let n = 1024;
    let online = CheetahConfig {
        linear: LinearMode::Online,
        ..CheetahConfig::default()
    };
    let pre = CheetahConfig {
        linear: LinearMode::Preprocessed,
        ..CheetahConfig::default()
    };
    for (cfg, step) in [(online, "layer1/linear"), (pre, "offline/linear")] {
        // `nth` received message of the step one byte short (none: honest); the client's
        // result and the messages it read in the step
        let run = |nth: usize| {
            let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counter = seen.clone();
            let o = session(
                fm,
                &spec,
                cfg,
                cfg,
                LocalPolicy::new(n as u64, OutputMode::Labels, None),
                vec![(rows(n), n, OutputMode::Labels)],
                move |c| {
                    Box::new(TamperRecv {
                        inner: c,
                        step,
                        current: String::new(),
                        nth,
                        seen: counter,
                        edit: Box::new(|m: &mut Vec<u8>| {
                            m.pop();
                        }),
                    })
                },
            );
            (o.client, seen.load(std::sync::atomic::Ordering::SeqCst))
        };
        let (honest, all) = run(usize::MAX);
        assert!(honest.is_ok(), "{step}");
        // the header and at least two ciphertexts
        assert!(all >= 3, "{step}: {all}");
        // the first ciphertext one byte short: refused by name, nothing after it read
        let (r, read) = run(1);
        let e = r.err().unwrap();
        assert!(
            matches!(
                e,
                BackendError::He(HeError::MalformedLength {
                    what: "result ciphertext",
                    ..
                })
            ),
            "{step}: {e}"
        );
        assert_eq!(read, 2, "{step}");
    }
}
