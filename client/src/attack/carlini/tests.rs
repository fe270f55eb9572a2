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
        vec![Tensor::new(vec![h, d], w1).unwrap(), Tensor::new(vec![h], b1).unwrap()],
        Vec::new(),
        vec![Tensor::new(vec![c, h], w2).unwrap(), Tensor::new(vec![c], b2).unwrap()],
    ];
    Model::new(arch, params, FixedPoint::new(40, 12).unwrap()).unwrap()
}

#[test]
fn extracts_784_16_10_against_fixed_point() {
    let model = random_model(784, 16, 10, 7);
    let mut oracle = LocalFixedOracle::new(model.clone(), Policy::undefended());
    let cfg = CarliniConfig {
        points_per_neuron: 1200,
        ..CarliniConfig::default()
    };
    let arch = model.architecture().clone();
    let ex = carlini(&mut oracle, &arch, &cfg, Some((&model, Arithmetic::Fixed)), None, false).unwrap();
    let r = &ex.report;
    eprintln!("{r:#?}");
    let m = r.metrics.as_ref().unwrap();
    assert_eq!(m.matched_neurons, 16);
    assert!(m.row_rel_error_max < 1e-3, "{}", m.row_rel_error_max);
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
        let s = search::scan(o.as_mut(), &lines, 0, SearchParams { grid: 64, max_depth: 6, noise: 2f64.powi(-12) }).unwrap();
        let truth: usize = lines
            .iter()
            .map(|l| {
                let x1: Vec<f64> = l.x0.iter().zip(&l.u).map(|(a, u)| a + u).collect();
                (0..16)
                    .filter(|&i| {
                        let z = |x: &[f64]| w.row(i).iter().zip(x).map(|(a, b)| f64::from(*a) * b).sum::<f64>() + f64::from(b[i]);
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
