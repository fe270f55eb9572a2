//! Tests of the fixed-point evaluator: a hand-made network with every integer written out,
//! wrap-around, and an independent plain-integer reference on random networks.

use super::*;
use crate::nn::{Architecture, Model, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// The hand-made 3-4-2 network: Dense(3->4) -> ReLU -> Dense(4->2), weights multiples of
/// 1/16 and biases multiples of 1/256, so that at f = 4 the encoding is exact.
fn tiny_model(l: u32) -> Model {
    let arch = Architecture::mlp(&[3], &[4], 2).unwrap();
    #[rustfmt::skip]
    let w1 = vec![
        1.0, 0.5, -0.25,
        -1.0, 0.25, 0.5,
        0.0625, -0.0625, 0.125,
        -0.5, -0.5, -0.5,
    ];
    let b1 = vec![0.125, -0.0625, 1.0 / 256.0, 0.0];
    #[rustfmt::skip]
    let w2 = vec![
        1.0, 2.0, -1.5, -0.5,
        -0.75, 1.0, 0.25, 2.0,
    ];
    let b2 = vec![-3.0 / 256.0, 2.0 / 256.0];
    let params = vec![
        vec![
            Tensor::new(vec![4, 3], w1).unwrap(),
            Tensor::new(vec![4], b1).unwrap(),
        ],
        vec![],
        vec![
            Tensor::new(vec![2, 4], w2).unwrap(),
            Tensor::new(vec![2], b2).unwrap(),
        ],
    ];
    Model::new(arch, params, FixedPoint::new(l, 4).unwrap()).unwrap()
}

/// Inputs x_a = [0.5, -0.25, 1] and x_d = [-1, -1, -1], encoded at f = 4.
fn tiny_inputs(fp: FixedPoint) -> Vec<u64> {
    [0.5, -0.25, 1.0, -1.0, -1.0, -1.0]
        .iter()
        .map(|&v| fp.encode(v).unwrap())
        .collect()
}

#[test]
fn hand_made_network_gives_the_integers_computed_by_hand() {
    let model = tiny_model(16);
    let fm = model.fixed_model();
    let fp = fm.fixed_point();
    let r = fp.ring();
    let FixedLayer::Dense(d1) = &fm.layers()[0] else {
        panic!("layer 0 is dense")
    };
    let signed = |xs: &[u64]| xs.iter().map(|&x| r.to_signed(x)).collect::<Vec<_>>();
    // W1 at scale 16, B1 at scale 256.
    assert_eq!(
        signed(d1.weight()),
        vec![16, 8, -4, -16, 4, 8, 1, -1, 2, -8, -8, -8]
    );
    assert_eq!(signed(d1.bias()), vec![32, -16, 1, 0]);
    assert_eq!(d1.weight()[2], 65532); // -4 mod 2^16
    assert_eq!(signed(d1.weight_row(3).unwrap()), vec![-8, -8, -8]);
    assert_eq!(d1.weight_row(4), None);

    let x = tiny_inputs(fp);
    assert_eq!(signed(&x), vec![8, -4, 16, -16, -16, -16]);
    let out = eval_fixed(fm, &x).unwrap();
    // x_a: acc1 = [64, -32, 45, -160] -> >>4 = [4, -2, 2, -10] -> ReLU [4, 0, 2, 0];
    //      acc2 = [64 - 48 - 3, -48 + 8 + 2] = [13, -38] -> [0, -3] (floor(-2.375) = -3).
    // x_d: acc1 = [-288, 48, -31, 384] -> [-18, 3, -2, 24] -> ReLU [0, 3, 0, 24];
    //      acc2 = [96 - 192 - 3, 48 + 768 + 2] = [-99, 818] -> [-7, 51] (floor(-6.19) = -7).
    assert_eq!(out.signed_logits(0), Some(vec![0, -3]));
    assert_eq!(out.signed_logits(1), Some(vec![-7, 51]));
    assert_eq!(out.signed_logits(2), None);
    assert_eq!(out.labels, vec![0, 1]);
    assert_eq!(
        out.logits,
        vec![0, r.from_signed(-3), r.from_signed(-7), 51]
    );
    assert_eq!(out.max_abs_acc, 818);
    assert_eq!(out.layer_max_abs_acc, vec![(0, 384), (2, 818)]);
    assert_eq!(out.wrapped, 0);
    assert_eq!(out.headroom_bits(), 5); // 15 - bit_len(818) = 15 - 10
    assert_eq!(out.require_headroom(2), Ok(()));
    // Over all inputs in [-1, 1] (encoded [-16, 16]), by hand: layer 0 rows give
    // B +- 16 sum|W| = [-416, 480], [-464, 432], [-63, 65], [-384, 384] (bound 480);
    // >> 4 and ReLU: [0, 30], [0, 27], [0, 4], [0, 24]; layer 2 row 0 reaches
    // -3 + 16*30 + 32*27 = 1341 and at least -3 - 24*4 - 8*24 = -291, row 1 lies in
    // [2 - 12*30, 2 + 16*27 + 4*4 + 32*24] = [-358, 1218]. The measured 818 is inside.
    assert_eq!(fm.accumulator_bound(-16, 16), 1341);
    // Zero inputs: the accumulators are the biases, then [2, 0, 0, 0] gives [29, -22].
    assert_eq!(fm.accumulator_bound(0, 0), 32);

    // The f32 evaluator on the same network and inputs: the same labels, and logits
    // within the fixed-point error (computed by hand: [-0.025390625, -0.1357421875] and
    // [-0.38671875, 3.1953125]).
    let xf = ndarray::Array2::from_shape_vec((2, 3), vec![0.5f32, -0.25, 1.0, -1.0, -1.0, -1.0])
        .unwrap();
    let logits = model.forward_f32(xf.view()).unwrap();
    let want = [-0.025390625f64, -0.1357421875, -0.38671875, 3.1953125];
    for (got, want) in logits.iter().zip(want) {
        assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
    }
    assert_eq!(model.predict_f32(xf.view()).unwrap(), vec![0, 1]);
    for (row, fixed) in [(0, [0i64, -3]), (1, [-7, 51])] {
        for c in 0..2 {
            let diff = f64::from(logits[(row, c)]) - fp.decode(r.from_signed(fixed[c]));
            // Two truncations of at most one unit each, scaled through W2 (|W2| row sums
            // at most 4.5): well under one unit of 1/16 plus 4.5/16.
            assert!(diff.abs() < 0.4, "row {row} logit {c}: {diff}");
        }
    }
}

#[test]
fn wrap_around_is_the_ring_semantics_and_is_reported() {
    // l = 10: the signed range is [-512, 512). x_d's second output accumulator 818 wraps
    // to 818 - 1024 = -206, whose shift is floor(-206 / 16) = -13.
    let model = tiny_model(10);
    let fm = model.fixed_model();
    let out = eval_fixed(fm, &tiny_inputs(fm.fixed_point())).unwrap();
    assert_eq!(out.signed_logits(0), Some(vec![0, -3]));
    assert_eq!(out.signed_logits(1), Some(vec![-7, -13]));
    assert_eq!(out.labels, vec![0, 0]);
    assert_eq!(out.wrapped, 1);
    assert_eq!(out.max_abs_acc, 818);
    assert_eq!(out.headroom_bits(), -1);
    assert_eq!(
        out.require_headroom(REQUIRED_HEADROOM_BITS),
        Err(FixedError::Headroom {
            max_abs_acc: 818,
            ring_bits: 10,
            headroom_bits: -1,
            required: 2
        })
    );
    assert_eq!(
        reference_eval(fm, &tiny_inputs(fm.fixed_point())).0,
        out.logits
    );
}

#[test]
fn input_checks() {
    let model = tiny_model(16);
    let fm = model.fixed_model();
    assert_eq!(
        eval_fixed(fm, &[1, 2, 3, 4]),
        Err(FixedError::InputLength { len: 4, row_len: 3 })
    );
    assert_eq!(
        eval_fixed(fm, &[1, 1 << 16, 3]),
        Err(FixedError::Unreduced {
            index: 1,
            value: 1 << 16,
            ring_bits: 16
        })
    );
    let empty = eval_fixed(fm, &[]).unwrap();
    assert_eq!(empty.rows(), 0);
    assert!(empty.logits.is_empty());
}

#[test]
fn first_argmax_takes_the_smallest_index_of_ties() {
    assert_eq!(first_argmax(&[1, 5, 5, 2]), 1);
    assert_eq!(first_argmax(&[-3, -3]), 0);
    assert_eq!(first_argmax(&[0, -1, 7]), 2);
    assert_eq!(first_argmax(&[]), 0);
}

#[test]
fn all_equal_logits_give_label_zero() {
    // A network whose last layer is all zeros: every logit is the bias, all equal.
    let arch = Architecture::mlp(&[2], &[], 3).unwrap();
    let params = vec![vec![
        Tensor::new(vec![3, 2], vec![0.0; 6]).unwrap(),
        Tensor::new(vec![3], vec![0.5; 3]).unwrap(),
    ]];
    let model = Model::new(arch, params, FixedPoint::new(37, 12).unwrap()).unwrap();
    let fm = model.fixed_model();
    let out = eval_fixed(fm, &[5, 7, 0, 0]).unwrap();
    assert_eq!(out.labels, vec![0, 0]);
    assert_eq!(out.signed_logits(1), Some(vec![2048; 3])); // 0.5 * 2^24 >> 12
}

/// An independent plain-integer reference: i128 arithmetic, explicit reduction mod 2^l,
/// signed reading by comparison with 2^(l-1), floor division by `div_euclid`; one row at
/// a time, no blocking. Returns (logits, labels, exact max |acc|, wrapped count).
fn reference_eval(m: &FixedModel, inputs: &[u64]) -> (Vec<u64>, Vec<usize>, u128, usize) {
    let l = m.fixed_point().ring_bits();
    let f = m.fixed_point().frac_bits();
    let modulus: i128 = 1i128 << l;
    let half: i128 = 1i128 << (l - 1);
    let reduce = |v: i128| v.rem_euclid(modulus);
    let signed = |v: i128| {
        let v = reduce(v);
        if v >= half { v - modulus } else { v }
    };
    let mut logits = Vec::new();
    let mut labels = Vec::new();
    let mut max_abs = 0u128;
    let mut wrapped = 0;
    for row in inputs.chunks(m.input_len()) {
        let mut x: Vec<i128> = row.iter().map(|&v| i128::from(v)).collect();
        for layer in m.layers() {
            match layer {
                FixedLayer::Dense(d) => {
                    let mut y = Vec::with_capacity(d.outputs());
                    for o in 0..d.outputs() {
                        let w = d.weight_row(o).unwrap();
                        // The exact integer accumulator over signed readings (exact for
                        // the sizes compared below), and the ring accumulator over the
                        // unsigned representatives (products mod 2^128, then mod 2^l).
                        let mut exact: i128 = signed(i128::from(d.bias()[o]));
                        let mut ring: i128 = i128::from(d.bias()[o]);
                        for (wj, xj) in w.iter().zip(&x) {
                            exact = exact.wrapping_add(signed(i128::from(*wj)) * signed(*xj));
                            ring = reduce(ring.wrapping_add(i128::from(*wj).wrapping_mul(*xj)));
                        }
                        max_abs = max_abs.max(exact.unsigned_abs());
                        if signed(ring) != exact {
                            wrapped += 1;
                        }
                        y.push(reduce(signed(ring).div_euclid(1i128 << f)));
                    }
                    x = y;
                }
                FixedLayer::Relu => {
                    for v in &mut x {
                        if signed(*v) < 0 {
                            *v = 0;
                        }
                    }
                }
                FixedLayer::Flatten => {}
            }
        }
        let s: Vec<i128> = x.iter().map(|&v| signed(v)).collect();
        let mut best = 0;
        for (i, &v) in s.iter().enumerate() {
            if v > s[best] {
                best = i;
            }
        }
        labels.push(best);
        logits.extend(x.iter().map(|&v| v as u64));
    }
    (logits, labels, max_abs, wrapped)
}

fn random_model(rng: &mut ChaCha12Rng, widths: &[usize], l: u32, f: u32, wbits: u32) -> Model {
    let arch = Architecture::mlp(
        &[widths[0]],
        &widths[1..widths.len() - 1],
        widths[widths.len() - 1],
    )
    .unwrap();
    let fp = FixedPoint::new(l, f).unwrap();
    let scale = 2f32.powi(-(f as i32));
    let bscale = 2f32.powi(-(2 * f as i32));
    let wmax = 1i64 << (wbits - 1);
    let mut params = Vec::new();
    for spec in arch.layers() {
        let mut tensors = Vec::new();
        for (k, p) in spec.params().into_iter().enumerate() {
            let n: usize = p.shape.iter().product();
            let s = if k == 0 { scale } else { bscale };
            let data = (0..n)
                .map(|_| rng.random_range(-wmax..wmax) as f32 * s)
                .collect();
            tensors.push(Tensor::new(p.shape, data).unwrap());
        }
        params.push(tensors);
    }
    Model::new(arch, params, fp).unwrap()
}

#[test]
fn evaluator_matches_plain_integer_reference() {
    let mut rng = ChaCha12Rng::seed_from_u64(42);
    // (widths, l, f, bits of the integer weights, whether inputs span the whole ring)
    let cases: &[(&[usize], u32, u32, u32, bool)] = &[
        (&[5, 7, 6, 3], 14, 3, 8, true),       // heavy wrap-around
        (&[5, 7, 6, 3], 14, 3, 4, false),      // small values
        (&[9, 4, 2], 33, 12, 14, false),       // the MNIST parameters, no wrap
        (&[9, 4, 2], 20, 5, 11, true),         // wrap
        (&[3, 8, 8, 8, 4], 64, 20, 24, false), // the widest ring
        (&[1, 1], 8, 3, 6, true),
    ];
    for &(widths, l, f, wbits, full) in cases {
        let model = random_model(&mut rng, widths, l, f, wbits.min(l - 1));
        let fm = model.fixed_model();
        let r = fm.fixed_point().ring();
        // Row counts around the evaluator's block of 8.
        for rows in [0usize, 1, 7, 8, 9, 17] {
            let inputs: Vec<u64> = (0..rows * widths[0])
                .map(|_| {
                    if full {
                        r.random(&mut rng)
                    } else {
                        r.from_signed(rng.random_range(-(1i64 << f)..=(1i64 << f)))
                    }
                })
                .collect();
            let out = eval_fixed(fm, &inputs).unwrap();
            let (logits, labels, max_abs, wrapped) = reference_eval(fm, &inputs);
            if !full && l < 64 && wrapped == 0 {
                let b = fm.accumulator_bound(-(1i64 << f), 1i64 << f);
                assert!(max_abs <= b, "bound {b} below measured {max_abs}");
            }
            assert_eq!(out.logits, logits, "widths {widths:?} l {l} rows {rows}");
            assert_eq!(out.labels, labels);
            if l < 64 && rows > 0 {
                // The i64 accumulator is exact below 2^63.
                assert_eq!(u128::from(out.max_abs_acc), max_abs);
                assert_eq!(out.wrapped, wrapped);
            }
            if full && l <= 20 && rows >= 8 {
                assert!(out.wrapped > 0, "the wrap-around cases must wrap");
            }
        }
    }
}
