use super::*;
use crate::attack::oracle::{LocalF32Oracle, LocalFixedOracle, Policy};
use fusion_common::nn::Tensor;

/// A random d-h-c model whose weights are multiples of 2^-12 (biases of 2^-24), so that
/// the f32 and fixed-point oracles compute with the same parameters; first-layer
/// hyperplanes pass near the cube's centre so that lines cross them.
pub(crate) fn random_model(d: usize, h: usize, c: usize, seed: u64) -> Model {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let q = |v: f64, bits: i32| ((v * 2f64.powi(bits)).round() / 2f64.powi(bits)) as f32;
    let mut normal = || {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let s1 = (2.0 / d as f64).sqrt() * 2.0;
    let w1: Vec<f64> = (0..h * d).map(|_| s1 * normal()).collect();
    let b1: Vec<f32> = (0..h)
        .map(|i| {
            let row = &w1[i * d..(i + 1) * d];
            let centre: f64 = row.iter().map(|w| 0.5 * w).sum();
            let norm: f64 = row.iter().map(|w| w * w).sum::<f64>().sqrt();
            q(-centre + 0.15 * norm * normal(), 24)
        })
        .collect();
    let w2: Vec<f32> = (0..c * h).map(|_| q(normal(), 12)).collect();
    let b2: Vec<f32> = (0..c).map(|_| q(0.1 * normal(), 24)).collect();
    let w1: Vec<f32> = w1.iter().map(|&v| q(v, 12)).collect();
    let arch = Architecture::mlp(&[d], &[h], c).unwrap();
    let params = vec![
        vec![
            Tensor::new(vec![h, d], w1).unwrap(),
            Tensor::new(vec![h], b1).unwrap(),
        ],
        Vec::new(),
        vec![
            Tensor::new(vec![c, h], w2).unwrap(),
            Tensor::new(vec![c], b2).unwrap(),
        ],
    ];
    Model::new(arch, params, FixedPoint::new(40, 12).unwrap()).unwrap()
}

fn extract(
    model: &Model,
    oracle: &mut dyn Oracle,
    ar: Arithmetic,
    per_neuron: usize,
) -> CarliniReport {
    let cfg = CarliniConfig {
        points_per_neuron: per_neuron,
        ..CarliniConfig::default()
    };
    let arch = model.architecture().clone();
    carlini(oracle, &arch, &cfg, Some((model, ar)), None, false)
        .unwrap()
        .report
}

/// The threshold: the first layer of a 784-16-10 network to 1e-3 relative error
/// per row, against exactly what the service computes (fixed point, l = 40, f = 12), within
/// a bounded number of queries; the whole model to a stated logit error.
#[test]
fn extracts_784_16_10_against_fixed_point() {
    let model = random_model(784, 16, 10, 7);
    let mut oracle = LocalFixedOracle::new(model.clone(), Policy::undefended());
    let r = extract(&model, &mut oracle, Arithmetic::Fixed, 2000);
    let m = r.metrics.as_ref().unwrap();
    eprintln!("{m:#?}\nqueries {} in {:.1} s", r.queries, r.seconds);
    assert_eq!(m.matched_neurons, 16);
    assert_eq!(m.wrong_signs, 0);
    assert!(
        m.row_rel_error_max < 1e-3,
        "row error {}",
        m.row_rel_error_max
    );
    assert!(
        m.max_logit_error < 0.05,
        "max logit error {}",
        m.max_logit_error
    );
    assert!(
        m.mean_logit_error < 5e-3,
        "mean logit error {}",
        m.mean_logit_error
    );
    assert!(m.random_agreement > 0.99);
    assert!(r.queries < 2_000_000);
    assert_eq!(oracle.stats().wrapped_rows, 0);
}

/// The same against the f32 oracle, where the outputs are exact up to f32 rounding: far
/// fewer points per neuron reach far better precision.
#[test]
fn extracts_784_8_10_against_f32() {
    let model = random_model(784, 8, 10, 11);
    let mut oracle = LocalF32Oracle::new(model.clone(), Policy::undefended());
    let r = extract(&model, &mut oracle, Arithmetic::F32, 900);
    let m = r.metrics.as_ref().unwrap();
    eprintln!("{m:#?}\nqueries {} in {:.1} s", r.queries, r.seconds);
    assert_eq!(m.matched_neurons, 8);
    assert_eq!(m.wrong_signs, 0);
    assert!(
        m.row_rel_error_max < 1e-3,
        "row error {}",
        m.row_rel_error_max
    );
    assert!(
        m.max_logit_error < 0.01,
        "max logit error {}",
        m.max_logit_error
    );
    assert!(m.random_agreement > 0.995);
    assert!(r.queries < 1_000_000);
}

#[test]
fn refuses_a_labels_only_oracle_at_once() {
    let model = random_model(64, 4, 10, 1);
    let mut oracle = LocalFixedOracle::new(model.clone(), Policy::defended(1_000_000));
    let arch = model.architecture().clone();
    let err = carlini(
        &mut oracle,
        &arch,
        &CarliniConfig::default(),
        None,
        None,
        false,
    )
    .unwrap_err();
    assert!(matches!(err, CarliniError::LabelsOnly));
    assert!(err.to_string().contains("labels only"));
    assert_eq!(oracle.queries(), 0);
}

#[test]
fn budget_exhaustion_stops_collection_and_reports_what_it_had() {
    let model = random_model(64, 4, 10, 2);
    let mut policy = Policy::undefended();
    policy.budget = Some(3000);
    let mut oracle = LocalFixedOracle::new(model.clone(), policy);
    let arch = model.architecture().clone();
    let ex = carlini(
        &mut oracle,
        &arch,
        &CarliniConfig::default(),
        None,
        None,
        false,
    )
    .unwrap();
    let r = ex.report;
    assert!(matches!(
        r.stopped,
        Some(OracleError::BudgetExhausted { budget: 3000, .. })
    ));
    assert!(r.queries <= 3000 && r.queries > 2000, "{}", r.queries);
    assert!(r.lines > 0 && r.critical_points > 0);
    assert!(oracle.queries() <= 3000);
}

#[test]
fn refuses_deeper_networks() {
    let arch = Architecture::mlp(&[16], &[4, 4], 3).unwrap();
    let model = random_model(16, 4, 3, 3);
    let mut oracle = LocalF32Oracle::new(model, Policy::undefended());
    let err = carlini(
        &mut oracle,
        &arch,
        &CarliniConfig::default(),
        None,
        None,
        false,
    )
    .unwrap_err();
    assert!(matches!(err, CarliniError::Depth(_)));
    assert_eq!(oracle.queries(), 0);
}

#[test]
#[ignore]
fn diagnose_scan() {
    let model = random_model(784, 16, 10, 7);
    let (w, b) = model.dense(0).unwrap();
    for fixed in [false, true] {
        let mut o: Box<dyn Oracle> = if fixed {
            Box::new(LocalFixedOracle::new(model.clone(), Policy::undefended()))
        } else {
            Box::new(LocalF32Oracle::new(model.clone(), Policy::undefended()))
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let lines: Vec<Line> = (0..64).map(|_| Line::random(&mut rng, 784)).collect();
        let t0 = Instant::now();
        let s = search::scan(
            o.as_mut(),
            &lines,
            0,
            SearchParams {
                grid: 64,
                max_depth: 6,
                noise: 2f64.powi(-12),
            },
        )
        .unwrap();
        let truth: usize = lines
            .iter()
            .map(|l| {
                let x1: Vec<f64> = l.x0.iter().zip(&l.u).map(|(a, u)| a + u).collect();
                (0..16)
                    .filter(|&i| {
                        let z = |x: &[f64]| {
                            w.row(i)
                                .iter()
                                .zip(x)
                                .map(|(a, b)| f64::from(*a) * b)
                                .sum::<f64>()
                                + f64::from(b[i])
                        };
                        (z(&l.x0) > 0.0) != (z(&x1) > 0.0)
                    })
                    .count()
            })
            .sum();
        eprintln!(
            "fixed={fixed}: {} kinks found, {} true crossings, {} queries, {:?}, noise {}",
            s.kinks.len(),
            truth,
            o.queries(),
            t0.elapsed(),
            s.noise
        );
        let cfg = CarliniConfig::default();
        let groups = group_kinks(&s.kinks, &cfg, 16, s.noise);
        let sizes: Vec<usize> = groups.iter().map(|g| g.0.len()).collect();
        eprintln!("groups: {sizes:?}");
    }
}

#[test]
#[ignore]
fn diagnose_real_model_crossings() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = Model::load(root.join("models/mnist-784-32-10.safetensors")).unwrap();
    let test = fusion_common::nn::mnist::load(
        root.join("data/mnist"),
        fusion_common::nn::mnist::Split::Test,
    )
    .unwrap();
    let images: Vec<Vec<f64>> = (1000..2000)
        .map(|i| {
            test.image(i)
                .unwrap()
                .iter()
                .map(|&p| f64::from(p) / 255.0)
                .collect()
        })
        .collect();
    let (w, b) = (0..4).find_map(|i| model.dense(i)).unwrap();
    let h = w.nrows();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for kind in ["random", "images", "mixed"] {
        let mut per_neuron = vec![0usize; h];
        for _ in 0..2000 {
            let l = match kind {
                "random" => Line::random(&mut rng, 784),
                "images" => Line::near_images(&mut rng, &images).unwrap(),
                _ => {
                    let a = Line::near_images(&mut rng, &images).unwrap();
                    let b = Line::random(&mut rng, 784);
                    let x1: Vec<f64> = b.x0.clone();
                    let u = x1.iter().zip(&a.x0).map(|(p, q)| p - q).collect();
                    Line { x0: a.x0, u }
                }
            };
            let x1: Vec<f64> = l.x0.iter().zip(&l.u).map(|(a, u)| a + u).collect();
            for i in 0..h {
                let z = |x: &[f64]| {
                    w.row(i)
                        .iter()
                        .zip(x)
                        .map(|(a, b)| f64::from(*a) * b)
                        .sum::<f64>()
                        + f64::from(b[i])
                };
                if (z(&l.x0) > 0.0) != (z(&x1) > 0.0) {
                    per_neuron[i] += 1;
                }
            }
        }
        if kind == "mixed" {
            for (i, &c) in per_neuron.iter().enumerate().filter(|(_, c)| **c < 40) {
                let row = w.row(i);
                let lo: f64 =
                    f64::from(b[i]) + row.iter().map(|&v| f64::from(v.min(0.0))).sum::<f64>();
                let hi: f64 =
                    f64::from(b[i]) + row.iter().map(|&v| f64::from(v.max(0.0))).sum::<f64>();
                let zs: Vec<f64> = images
                    .iter()
                    .map(|x| {
                        row.iter()
                            .zip(x)
                            .map(|(a, b)| f64::from(*a) * b)
                            .sum::<f64>()
                            + f64::from(b[i])
                    })
                    .collect();
                let on = zs.iter().filter(|&&z| z > 0.0).count();
                eprintln!(
                    "neuron {i}: {c} crossings, z over the cube in [{lo:.2}, {hi:.2}], active on {on}/1000 images"
                );
            }
        }
        per_neuron.sort_unstable();
        eprintln!("{kind}: crossings per neuron over 2000 lines {per_neuron:?}");
    }
}
