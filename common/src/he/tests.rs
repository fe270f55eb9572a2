//! Protocol tests of the HE linear layer: correctness against the plaintext product over
//! the in-memory channel, byte and round counts, refusals, edge values, flooding.

use std::sync::Arc;
use std::thread;

use num_bigint::BigUint;
use num_traits::{One, ToPrimitive, Zero};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

use super::packing::Packing;
use super::rns::RnsPoly;
use super::*;
use crate::channel::{Channel, CostReport, Counting, memory_pair};
use crate::ring::Ring;

/// W X + b mod 2^l, the reference: W is n_o x n_i, X is B x n_i, result B x n_o.
fn plain_linear(ring: Ring, w: &[u64], b: &[u64], x: &[u64], s: LinearShape) -> Vec<u64> {
    let mut y = vec![0; s.rows * s.outputs];
    for row in 0..s.rows {
        for o in 0..s.outputs {
            let mut acc = b[o];
            for j in 0..s.inputs {
                acc = ring.add(acc, ring.mul(w[o * s.inputs + j], x[row * s.inputs + j]));
            }
            y[row * s.outputs + o] = acc;
        }
    }
    y
}

fn random_vec(ring: Ring, n: usize, rng: &mut ChaCha12Rng) -> Vec<u64> {
    (0..n).map(|_| ring.random(rng)).collect()
}

/// One layer of a test: weights, bias, the true input and its shares.
struct Layer {
    shape: LinearShape,
    w: Vec<u64>,
    b: Vec<u64>,
    xc: Vec<u64>,
    xs: Option<Vec<u64>>,
}

impl Layer {
    fn random(ring: Ring, shape: LinearShape, shared: bool, rng: &mut ChaCha12Rng) -> Self {
        let w = random_vec(ring, shape.outputs * shape.inputs, rng);
        let b = random_vec(ring, shape.outputs, rng);
        let xc = random_vec(ring, shape.rows * shape.inputs, rng);
        let xs = shared.then(|| random_vec(ring, shape.rows * shape.inputs, rng));
        Self {
            shape,
            w,
            b,
            xc,
            xs,
        }
    }

    fn x(&self, ring: Ring) -> Vec<u64> {
        match &self.xs {
            None => self.xc.clone(),
            Some(xs) => self
                .xc
                .iter()
                .zip(xs)
                .map(|(a, b)| ring.add(*a, *b))
                .collect(),
        }
    }
}

/// Per layer (yc, ys), then the client's and the server's cost reports.
type SessionRun = (Vec<(Vec<u64>, Vec<u64>)>, CostReport, CostReport);

/// Runs setup and the layers over `memory_pair()` on two threads; returns per layer
/// (yc, ys) and both parties' cost reports.
fn run_session(params: &Arc<HeParams>, layers: &[Layer], seed: u64) -> SessionRun {
    let (a, b) = memory_pair();
    thread::scope(|scope| {
        let server = scope.spawn(|| {
            let mut ch = Counting::new(b);
            let mut rng = ChaCha12Rng::seed_from_u64(seed ^ 0xabcd);
            ch.set_step("setup");
            let sess = server_setup(&mut ch, params.clone()).unwrap();
            let mut ys = Vec::new();
            for (i, l) in layers.iter().enumerate() {
                ch.set_step(&format!("layer{i}"));
                ys.push(
                    server_linear(
                        &mut ch,
                        &sess,
                        &l.w,
                        &l.b,
                        l.xs.as_deref(),
                        l.shape,
                        &mut rng,
                    )
                    .unwrap(),
                );
            }
            (ys, ch.report())
        });
        let mut ch = Counting::new(a);
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        ch.set_step("setup");
        let sess = client_setup(&mut ch, params.clone(), &mut rng).unwrap();
        let mut yc = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            ch.set_step(&format!("layer{i}"));
            yc.push(client_linear(&mut ch, &sess, &l.xc, l.shape, &mut rng).unwrap());
        }
        let (ys, server_report) = server.join().unwrap();
        let out = yc.into_iter().zip(ys).collect();
        (out, ch.report(), server_report)
    })
}

fn check_layers(params: &Arc<HeParams>, layers: &[Layer], seed: u64) {
    let ring = params.ring();
    let (outs, client, server) = run_session(params, layers, seed);
    for (i, (l, (yc, ys))) in layers.iter().zip(&outs).enumerate() {
        let expected = plain_linear(ring, &l.w, &l.b, &l.x(ring), l.shape);
        let got: Vec<u64> = yc.iter().zip(ys).map(|(a, b)| ring.add(*a, *b)).collect();
        assert_eq!(got, expected, "layer {i} {:?}", l.shape);
        // The server's share is uniform and independent: not the result itself.
        assert_ne!(ys, &expected);
        // Bytes and flights against the formula.
        let cost = layer_cost(params, &l.shape).unwrap();
        let c = client
            .steps
            .iter()
            .find(|s| s.step == format!("layer{i}"))
            .unwrap();
        assert_eq!(c.bytes_sent as usize, cost.query_bytes, "{:?}", l.shape);
        assert_eq!(
            c.bytes_received as usize, cost.response_bytes,
            "{:?}",
            l.shape
        );
        assert_eq!(c.messages_sent as usize, cost.input_cts + 1);
        assert_eq!(c.messages_received as usize, cost.output_cts + 1);
        // The setup message and the first query travel in the same flight.
        assert_eq!(c.rounds, if i == 0 { 1 } else { 2 });
        let s = server
            .steps
            .iter()
            .find(|s| s.step == format!("layer{i}"))
            .unwrap();
        assert_eq!(
            (s.bytes_received, s.bytes_sent),
            (c.bytes_sent, c.bytes_received)
        );
    }
    let setup = client.steps.iter().find(|s| s.step == "setup").unwrap();
    assert_eq!(setup.bytes_sent as usize, setup_bytes(params));
    assert_eq!((setup.bytes_received, setup.rounds), (0, 1));
}

#[test]
fn small_layers_match_plaintext() {
    let mut rng = ChaCha12Rng::seed_from_u64(11);
    for l in [32, 37] {
        let params = Arc::new(HeParams::new(l, l).unwrap());
        let ring = params.ring();
        let layers = [
            Layer::random(ring, LinearShape::new(3, 20, 7), true, &mut rng),
            Layer::random(ring, LinearShape::new(1, 1, 1), false, &mut rng),
            Layer::random(ring, LinearShape::new(5, 9, 33), true, &mut rng),
        ];
        check_layers(&params, &layers, 100 + u64::from(l));
    }
}

#[test]
fn mnist_layers_match_plaintext_one_row() {
    let params = Arc::new(HeParams::new(37, 37).unwrap());
    let ring = params.ring();
    let mut rng = ChaCha12Rng::seed_from_u64(12);
    let layers = [
        Layer::random(ring, LinearShape::new(1, 784, 128), false, &mut rng),
        Layer::random(ring, LinearShape::new(1, 128, 128), true, &mut rng),
        Layer::random(ring, LinearShape::new(1, 128, 10), true, &mut rng),
    ];
    check_layers(&params, &layers, 12);
}

#[test]
fn mnist_layers_match_plaintext_batch() {
    // B = 20: several row blocks, short last blocks in every dimension.
    let params = Arc::new(HeParams::new(37, 37).unwrap());
    let ring = params.ring();
    let mut rng = ChaCha12Rng::seed_from_u64(13);
    let layers = [
        Layer::random(ring, LinearShape::new(20, 784, 128), false, &mut rng),
        Layer::random(ring, LinearShape::new(20, 128, 128), true, &mut rng),
        Layer::random(ring, LinearShape::new(20, 128, 10), true, &mut rng),
    ];
    check_layers(&params, &layers, 13);
}

#[test]
fn edge_values_round_trip_through_an_identity_layer() {
    // Encode / decode at the ring's edges: 0, -1, 2^(l-1) - 1, -2^(l-1), 1, through the
    // packing, encryption, product by the identity, switching, trimming and decryption.
    let mut rng = ChaCha12Rng::seed_from_u64(14);
    for l in [MIN_RING_BITS, 32, 37, MAX_RING_BITS] {
        let params = Arc::new(HeParams::new(l, l).unwrap());
        let ring = params.ring();
        let edges = [
            0,
            ring.from_signed(-1),
            ring.from_signed(ring.max_signed()),
            ring.from_signed(ring.min_signed()),
            1,
        ];
        let n = edges.len();
        let shape = LinearShape::new(3, n, n);
        let mut w = vec![0; n * n];
        for i in 0..n {
            w[i * n + i] = 1;
        }
        let mut xc = Vec::new();
        for _ in 0..3 {
            xc.extend_from_slice(&edges);
        }
        let layers = [
            Layer {
                shape,
                w: w.clone(),
                b: vec![0; n],
                xc: xc.clone(),
                xs: None,
            },
            // the same through a shared input whose client share is at the edges
            Layer {
                shape,
                w,
                b: edges.to_vec(),
                xc,
                xs: Some(random_vec(ring, 3 * n, &mut rng)),
            },
        ];
        check_layers(&params, &layers, u64::from(l));
    }
}

/// The residues of the input polynomial round-trip through the packing positions.
#[test]
fn packing_positions_round_trip() {
    let params = HeParams::new(37, 37).unwrap();
    let ring = params.ring();
    let mut rng = ChaCha12Rng::seed_from_u64(15);
    for shape in [
        LinearShape::new(1, 784, 128),
        LinearShape::new(20, 128, 10),
        LinearShape::new(256, 784, 128),
    ] {
        let pk = Packing::choose(&params, &shape).unwrap();
        let x = random_vec(ring, shape.rows * shape.inputs, &mut rng);
        let mut seen = vec![false; shape.rows * shape.inputs];
        for rb in 0..pk.row_blocks(&shape) {
            for j in 0..pk.in_blocks(&shape) {
                let mut poly = vec![0u64; DEGREE];
                for b in 0..pk.rows_in(&shape, rb) {
                    for jj in 0..pk.inputs_in(&shape, j) {
                        let src = (rb * pk.rows + b) * shape.inputs + j * pk.inputs + jj;
                        assert_eq!(poly[pk.input_pos(b, jj)], 0);
                        poly[pk.input_pos(b, jj)] = x[src];
                        seen[src] = true;
                    }
                }
                for b in 0..pk.rows_in(&shape, rb) {
                    for jj in 0..pk.inputs_in(&shape, j) {
                        let src = (rb * pk.rows + b) * shape.inputs + j * pk.inputs + jj;
                        assert_eq!(poly[pk.input_pos(b, jj)], x[src]);
                    }
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}

#[test]
fn no_residual_noise_with_extreme_weights_and_shares() {
    // Every weight -2^(l-1) (the largest magnitude), shares uniform over the whole ring,
    // a shape whose packing puts close to the maximum number of weight terms in one
    // coefficient; the raw decryption stays well inside the rounding interval.
    let params = Arc::new(HeParams::new(37, 37).unwrap());
    let ring = params.ring();
    let mut rng = ChaCha12Rng::seed_from_u64(16);
    let shape = LinearShape::new(2, 300, 24);
    let pk = Packing::choose(&params, &shape).unwrap();
    assert!(
        pk.weight_terms(&shape) > 1 << (LOG_MAX_WEIGHT_TERMS - 3),
        "{pk:?}"
    );
    let min = ring.from_signed(ring.min_signed());
    let max = ring.from_signed(ring.max_signed());
    let layer = Layer {
        shape,
        w: vec![min; shape.outputs * shape.inputs],
        b: vec![max; shape.outputs],
        xc: (0..shape.rows * shape.inputs)
            .map(|i| {
                if i % 3 == 0 {
                    max
                } else {
                    ring.random(&mut rng)
                }
            })
            .collect(),
        xs: Some(random_vec(ring, shape.rows * shape.inputs, &mut rng)),
    };
    let (client, setup) = ClientSession::generate(params.clone(), &mut rng);
    let server = ServerSession::from_setup(params.clone(), &setup).unwrap();
    let q = client.encrypt_layer(&layer.xc, shape, &mut rng).unwrap();
    let (resp, ys) = server
        .evaluate_layer(
            &layer.w,
            &layer.b,
            layer.xs.as_deref(),
            shape,
            &q[0],
            &q[1..],
            &mut rng,
        )
        .unwrap();
    let raw = client.decrypt_raw(shape, &resp[0], &resp[1..]).unwrap();
    let yc = client.decrypt_layer(shape, &resp[0], &resp[1..]).unwrap();
    let expected = plain_linear(ring, &layer.w, &layer.b, &layer.x(ring), shape);
    let shift = params.c1_bits() - ring.bits();
    let k1 = params.c1_bits();
    let mut worst = 0i64;
    for i in 0..expected.len() {
        assert_eq!(ring.add(yc[i], ys[i]), expected[i]);
        let m = ring.sub(expected[i], ys[i]);
        let noise = raw[i].wrapping_sub(m << shift) & ((1 << k1) - 1);
        let noise = ((noise << (64 - k1)) as i64) >> (64 - k1);
        worst = worst.max(noise.abs());
    }
    assert!(
        worst < 1 << (shift - 1),
        "noise {worst} reaches the rounding bound"
    );
}

/// The integer in [0, Q) with the given residues.
fn crt(p: &HeParams, poly: &RnsPoly, j: usize) -> BigUint {
    let q = p
        .moduli()
        .iter()
        .fold(BigUint::one(), |a, m| a * BigUint::from(*m));
    let mut acc = BigUint::zero();
    for (i, m) in p.moduli().iter().enumerate() {
        let mb = BigUint::from(*m);
        let inv = BigUint::from(p.qhat_inv[i].0);
        acc += BigUint::from(poly.data[i * DEGREE + j]) * inv % &mb * (&q / &mb);
    }
    acc % q
}

#[test]
fn flooding_noise_is_present_and_exceeds_the_claimed_bound() {
    // Measured with the client's secret key at modulus Q before switching: the noise of
    // every returned coefficient should look uniform on [-B_f, B_f], with B_f >= 2^59 E.
    let params = Arc::new(HeParams::new(37, 37).unwrap());
    let ring = params.ring();
    let mut rng = ChaCha12Rng::seed_from_u64(17);
    let shape = LinearShape::new(4, 30, 50);
    let layer = Layer::random(ring, shape, true, &mut rng);
    let (client, setup) = ClientSession::generate(params.clone(), &mut rng);
    let server = ServerSession::from_setup(params.clone(), &setup).unwrap();
    let qmsgs = client.encrypt_layer(&layer.xc, shape, &mut rng).unwrap();
    let pk = Packing::choose(&params, &shape).unwrap();
    let mut at_q: Vec<(Vec<BigUint>, Vec<usize>)> = Vec::new();
    let sk = client.secret_key();
    let ys = server
        .evaluate_core(
            &layer.w,
            &layer.b,
            layer.xs.as_deref(),
            shape,
            &qmsgs[0],
            &qmsgs[1..],
            &mut rng,
            |c0, c1, kept| {
                let mut v = c1.clone();
                v.ntt(&params);
                sk.mul_into(&mut v, &params);
                v.intt(&params);
                v.add_assign(c0, &params);
                at_q.push((
                    kept.iter().map(|j| crt(&params, &v, *j)).collect(),
                    kept.to_vec(),
                ));
            },
        )
        .unwrap();
    let q = params
        .moduli()
        .iter()
        .fold(BigUint::one(), |a, m| a * BigUint::from(*m));
    let t = BigUint::one() << ring.bits() as usize;
    let expected = plain_linear(ring, &layer.w, &layer.b, &layer.x(ring), shape);
    let bf = params.flood_bound() as f64;
    let e = params.noise_bound() as f64;
    assert!(bf >= e * 2f64.powi(59));
    let (mut n, mut big, mut max) = (0usize, 0usize, 0f64);
    let mut sum_sq = 0f64;
    let rbs = pk.row_blocks(&shape);
    for (idx, (vals, _)) in at_q.iter().enumerate() {
        let (k, rb) = (idx / rbs, idx % rbs);
        let outs = pk.outputs_in(&shape, k);
        for (pos, v) in vals.iter().enumerate() {
            let (b, r) = (pos / outs, pos % outs);
            let i = (rb * pk.rows + b) * shape.outputs + k * pk.outputs + r;
            let m = ring.sub(expected[i], ys[i]);
            let enc = (&q * BigUint::from(m) + (&t >> 1usize)) / &t;
            let d = ((v + &q) - enc) % &q;
            let noise = if d > (&q >> 1usize) {
                -(&q - d).to_f64().unwrap()
            } else {
                d.to_f64().unwrap()
            };
            n += 1;
            max = max.max(noise.abs());
            sum_sq += noise * noise;
            assert!(noise.abs() <= bf + e, "noise beyond B_f + E");
            if noise.abs() > bf / 4.0 {
                big += 1;
            }
        }
    }
    assert_eq!(n, shape.rows * shape.outputs);
    // Uniform on [-B_f, B_f]: 75% beyond B_f/4, standard deviation B_f/sqrt(3).
    assert!(big * 100 > n * 65, "{big} of {n} beyond B_f/4");
    let std = (sum_sq / n as f64).sqrt();
    assert!(
        std > 0.5 * bf && std < 0.65 * bf,
        "std {std:e} vs B_f {bf:e}"
    );
    // Every coefficient's noise is far above the claimed bound E on the product noise.
    assert!(max > e * 2f64.powi(STAT_SEC as i32));
}

fn setup_pair(params: &Arc<HeParams>, rng: &mut ChaCha12Rng) -> (ClientSession, ServerSession) {
    let (c, m) = ClientSession::generate(params.clone(), rng);
    (c, ServerSession::from_setup(params.clone(), &m).unwrap())
}

#[test]
fn other_parameters_are_refused() {
    let mut rng = ChaCha12Rng::seed_from_u64(18);
    let p37 = Arc::new(HeParams::new(37, 37).unwrap());
    let p38 = Arc::new(HeParams::new(38, 38).unwrap());
    let p37w = Arc::new(HeParams::new(37, 20).unwrap());
    // A setup message (public key) for other parameters.
    let (_c, setup) = ClientSession::generate(p38.clone(), &mut rng);
    assert!(matches!(
        ServerSession::from_setup(p37.clone(), &setup),
        Err(HeError::WrongParameters { .. })
    ));
    // A query encrypted under another parameter set (same shape).
    let shape = LinearShape::new(2, 10, 4);
    let (_, server) = setup_pair(&p37, &mut rng);
    let (other, _) = setup_pair(&p37w, &mut rng);
    let q = other.encrypt_layer(&[0; 20], shape, &mut rng).unwrap();
    let r = server.evaluate_layer(&[0; 40], &[0; 4], None, shape, &q[0], &q[1..], &mut rng);
    assert!(matches!(r, Err(HeError::WrongParameters { .. })), "{r:?}");
    // A response made under other parameters.
    let (client, server) = setup_pair(&p37, &mut rng);
    let (_, other_server) = setup_pair(&p37w, &mut rng);
    let q = client.encrypt_layer(&[1; 20], shape, &mut rng).unwrap();
    let (resp, _) = server
        .evaluate_layer(&[0; 40], &[0; 4], None, shape, &q[0], &q[1..], &mut rng)
        .unwrap();
    let mut forged = resp.clone();
    forged[0][1..33].copy_from_slice(&other_server.params().id().0);
    assert!(matches!(
        client.decrypt_layer(shape, &forged[0], &forged[1..]),
        Err(HeError::WrongParameters { .. })
    ));
    assert!(client.decrypt_layer(shape, &resp[0], &resp[1..]).is_ok());
}

#[test]
fn short_tampered_and_miscounted_messages_are_refused() {
    let mut rng = ChaCha12Rng::seed_from_u64(19);
    let params = Arc::new(HeParams::new(37, 37).unwrap());
    let (client, server) = setup_pair(&params, &mut rng);
    let shape = LinearShape::new(3, 200, 40);
    let ring = params.ring();
    let xc = random_vec(ring, 600, &mut rng);
    let (w, b) = (
        random_vec(ring, 8000, &mut rng),
        random_vec(ring, 40, &mut rng),
    );
    let q = client.encrypt_layer(&xc, shape, &mut rng).unwrap();
    let eval = |hdr: &[u8], cts: &[Vec<u8>]| {
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        server.evaluate_layer(&w, &b, None, shape, hdr, cts, &mut rng)
    };
    // A short ciphertext.
    let mut cts = q[1..].to_vec();
    cts[0].pop();
    assert!(matches!(
        eval(&q[0], &cts),
        Err(HeError::MalformedLength { .. })
    ));
    // A short header.
    assert!(matches!(
        eval(&q[0][..50], &q[1..]),
        Err(HeError::MalformedLength { .. })
    ));
    // A residue not below its prime (the first residue of prime 0 set to all ones).
    let mut cts = q[1..].to_vec();
    let bits = 64 - (params.moduli()[0] - 1).leading_zeros() as usize;
    for bit in 0..bits {
        cts[0][bit / 8] |= 1 << (bit % 8);
    }
    assert!(matches!(
        eval(&q[0], &cts),
        Err(HeError::CoefficientOutOfRange {
            prime: 0,
            index: 0,
            ..
        })
    ));
    // A wrong row count in the header.
    let mut hdr = q[0].clone();
    hdr[33..37].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(
        eval(&hdr, &q[1..]),
        Err(HeError::ShapeMismatch { expected, actual })
            if expected.rows == 3 && actual.rows == 4
    ));
    // A wrong packing and a wrong count in the header.
    let mut hdr = q[0].clone();
    hdr[45] ^= 1;
    assert!(matches!(
        eval(&hdr, &q[1..]),
        Err(HeError::PackingMismatch { .. })
    ));
    let mut hdr = q[0].clone();
    hdr[57..61].copy_from_slice(&99u32.to_le_bytes());
    let expected = Packing::choose(&params, &shape).unwrap().input_cts(&shape);
    assert!(matches!(
        eval(&hdr, &q[1..]),
        Err(HeError::CountMismatch { expected: e, actual: 99 }) if e == expected
    ));
    // Fewer ciphertexts than declared.
    assert!(matches!(
        eval(&q[0], &q[2..]),
        Err(HeError::CountMismatch { .. })
    ));
    // Another message kind.
    let mut hdr = q[0].clone();
    hdr[0] = 0x53;
    assert!(matches!(
        eval(&hdr, &q[1..]),
        Err(HeError::WrongMessage { .. })
    ));

    // The client side: the untampered response decrypts; tampered ones are refused.
    let (resp, ys) = eval(&q[0], &q[1..]).unwrap();
    let yc = client.decrypt_layer(shape, &resp[0], &resp[1..]).unwrap();
    let expected = plain_linear(ring, &w, &b, &xc, shape);
    assert!(
        yc.iter()
            .zip(&ys)
            .zip(&expected)
            .all(|((a, b), e)| ring.add(*a, *b) == *e)
    );
    let mut short = resp.clone();
    short[1].truncate(100);
    assert!(matches!(
        client.decrypt_layer(shape, &short[0], &short[1..]),
        Err(HeError::MalformedLength { .. })
    ));
    assert!(matches!(
        client.decrypt_layer(LinearShape::new(4, 200, 40), &resp[0], &resp[1..]),
        Err(HeError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        client.decrypt_layer(shape, &resp[0], &resp[2..]),
        Err(HeError::CountMismatch { .. })
    ));
}

#[test]
fn local_inputs_are_checked() {
    let mut rng = ChaCha12Rng::seed_from_u64(20);
    let params = Arc::new(HeParams::new(32, 16).unwrap());
    let (client, server) = setup_pair(&params, &mut rng);
    let shape = LinearShape::new(1, 4, 2);
    assert!(matches!(
        client.encrypt_layer(&[0; 3], shape, &mut rng),
        Err(HeError::InputLength {
            expected: 4,
            actual: 3,
            ..
        })
    ));
    assert!(matches!(
        client.encrypt_layer(&[0, 0, 1 << 32, 0], shape, &mut rng),
        Err(HeError::NotInRing { index: 2, .. })
    ));
    let q = client
        .encrypt_layer(&[1, 2, 3, 4], shape, &mut rng)
        .unwrap();
    // Weight bound 16 bits: -2^15 is fine, 2^15 is not.
    let ring = params.ring();
    let w = [
        ring.from_signed(-(1 << 15)),
        5,
        0,
        1,
        2,
        3,
        4,
        ring.from_signed(1 << 15),
    ];
    assert!(matches!(
        server.evaluate_layer(&w, &[0, 0], None, shape, &q[0], &q[1..], &mut rng),
        Err(HeError::WeightOutOfRange { index: 7, bits: 16 })
    ));
    let w = [
        ring.from_signed(-(1 << 15)),
        5,
        0,
        1,
        2,
        3,
        4,
        ring.from_signed((1 << 15) - 1),
    ];
    let (resp, ys) = server
        .evaluate_layer(&w, &[7, 9], None, shape, &q[0], &q[1..], &mut rng)
        .unwrap();
    let yc = client.decrypt_layer(shape, &resp[0], &resp[1..]).unwrap();
    let expected = plain_linear(ring, &w, &[7, 9], &[1, 2, 3, 4], shape);
    assert_eq!(
        vec![ring.add(yc[0], ys[0]), ring.add(yc[1], ys[1])],
        expected
    );
    assert!(matches!(
        server.evaluate_layer(&w, &[0], None, shape, &q[0], &q[1..], &mut rng),
        Err(HeError::InputLength { what: "bias", .. })
    ));
}

#[test]
fn a_wrong_row_count_over_the_channel_poisons_the_server_session() {
    let params = Arc::new(HeParams::new(37, 37).unwrap());
    let (a, b) = memory_pair();
    thread::scope(|scope| {
        let server = scope.spawn(|| {
            let mut ch = b;
            let mut rng = ChaCha12Rng::seed_from_u64(21);
            let sess = server_setup(&mut ch, params.clone()).unwrap();
            let shape = LinearShape::new(4, 10, 3);
            let r = server_linear(&mut ch, &sess, &[0; 30], &[0; 3], None, shape, &mut rng);
            assert!(matches!(r, Err(HeError::ShapeMismatch { .. })), "{r:?}");
            assert!(sess.is_poisoned());
            let r = server_linear(&mut ch, &sess, &[0; 30], &[0; 3], None, shape, &mut rng);
            assert!(matches!(r, Err(HeError::Poisoned)));
        });
        let mut ch = a;
        let mut rng = ChaCha12Rng::seed_from_u64(22);
        let sess = client_setup(&mut ch, params.clone(), &mut rng).unwrap();
        // The client declares 3 rows where the server expects 4.
        let msgs = sess
            .encrypt_layer(&[0; 30], LinearShape::new(3, 10, 3), &mut rng)
            .unwrap();
        for m in msgs {
            // The server may already have hung up.
            let _ = ch.send_vec(m);
        }
        server.join().unwrap();
        // The server hung up without answering: the client's receive fails and poisons.
        let r = client_linear(
            &mut ch,
            &sess,
            &[0; 30],
            LinearShape::new(3, 10, 3),
            &mut rng,
        );
        assert!(r.is_err());
        assert!(sess.is_poisoned());
    });
}

#[test]
fn debug_output_redacts_the_secret_key() {
    let mut rng = ChaCha12Rng::seed_from_u64(23);
    let params = Arc::new(HeParams::new(32, 32).unwrap());
    let (client, server) = setup_pair(&params, &mut rng);
    let d = format!("{client:?}");
    assert!(d.contains("[redacted]"));
    assert!(format!("{:?}", client.secret_key()).contains("[redacted]"));
    assert!(format!("{server:?}").contains("PublicKey"));
}

#[test]
fn nonzero_padding_in_a_result_is_refused() {
    // l = 32: K0 = 35 bits, so 3 kept values leave 7 padding bits.
    let mut rng = ChaCha12Rng::seed_from_u64(24);
    let params = Arc::new(HeParams::new(32, 32).unwrap());
    let (client, server) = setup_pair(&params, &mut rng);
    let shape = LinearShape::new(1, 2, 3);
    let q = client.encrypt_layer(&[5, 6], shape, &mut rng).unwrap();
    let (resp, _) = server
        .evaluate_layer(&[1; 6], &[0; 3], None, shape, &q[0], &q[1..], &mut rng)
        .unwrap();
    assert_eq!(resp.len(), 2);
    assert!(client.decrypt_layer(shape, &resp[0], &resp[1..]).is_ok());
    let mut padded = resp.clone();
    let last = padded[1].len() - 1;
    padded[1][last] |= 0x80;
    assert!(matches!(
        client.decrypt_layer(shape, &padded[0], &padded[1..]),
        Err(HeError::Malformed { .. })
    ));
}

#[test]
fn a_query_ciphertext_of_the_wrong_length_is_refused_before_the_next_is_read() {
    // the server holds a layer's queries until all are in: each is checked as it comes
    let params = HeParams::new(32, 16).unwrap();
    let n = params.upload_ct_bytes();
    let (mut a, mut b) = memory_pair();
    for len in [n, n - 1, n + 1, 0, 4 * n] {
        a.send_vec(vec![7; len]).unwrap();
    }
    a.send(b"next").unwrap();
    assert_eq!(recv_query_ct(&mut b, &params).unwrap().len(), n);
    for len in [n - 1, n + 1, 0, 4 * n] {
        let r = recv_query_ct(&mut b, &params);
        assert!(
            matches!(r, Err(HeError::MalformedLength { what: "input ciphertext", expected, actual }) if expected == n && actual == len),
            "{len}: {r:?}"
        );
    }
    assert_eq!(b.recv().unwrap(), b"next");
}

#[test]
fn a_result_ciphertext_of_the_wrong_length_is_refused_before_the_next_is_read() {
    // the client holds a layer's response until all is in: each ciphertext is checked as
    // it comes, against the coefficients its block keeps
    let mut rng = ChaCha12Rng::seed_from_u64(31);
    let params = Arc::new(HeParams::new(37, 37).unwrap());
    let (client, server) = setup_pair(&params, &mut rng);
    let shape = LinearShape::new(3, 200, 40);
    let ring = params.ring();
    let xc = random_vec(ring, 600, &mut rng);
    let (w, b) = (
        random_vec(ring, 8000, &mut rng),
        random_vec(ring, 40, &mut rng),
    );
    let q = client.encrypt_layer(&xc, shape, &mut rng).unwrap();
    let (resp, _) = server
        .evaluate_layer(&w, &b, None, shape, &q[0], &q[1..], &mut rng)
        .unwrap();
    let (header, cts) = (&resp[0], &resp[1..]);
    let count = Packing::choose(&params, &shape).unwrap().output_cts(&shape);
    assert_eq!(cts.len(), count);
    assert!(count >= 2, "{count}");
    // the whole response is taken and decrypts as the messages do
    let (mut a, mut bch) = memory_pair();
    for m in &resp {
        a.send(m).unwrap();
    }
    let (h, got) = recv_response(&mut bch, &params, shape).unwrap();
    assert_eq!((&h, got.as_slice()), (header, cts));
    assert_eq!(
        client.decrypt_layer(shape, &h, &got).unwrap(),
        client.decrypt_layer(shape, header, cts).unwrap()
    );
    // a wrong length at the first or the last ciphertext: refused by name, the message
    // after it unread
    for at in [0, count - 1] {
        let n = cts[at].len();
        for len in [n - 1, n + 1, 0, 4 * n] {
            let (mut a, mut bch) = memory_pair();
            a.send(header).unwrap();
            for ct in &cts[..at] {
                a.send(ct).unwrap();
            }
            a.send_vec(vec![7; len]).unwrap();
            a.send(b"next").unwrap();
            let r = recv_response(&mut bch, &params, shape);
            assert!(
                matches!(r, Err(HeError::MalformedLength { what: "result ciphertext", expected, actual }) if expected == n && actual == len),
                "{at} {len}: {r:?}"
            );
            assert_eq!(bch.recv().unwrap(), b"next");
        }
    }
    // a header announcing another count is refused before any ciphertext is read
    let mut bad = header.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let (mut a, mut bch) = memory_pair();
    a.send(&bad).unwrap();
    a.send(&cts[0]).unwrap();
    let r = recv_response(&mut bch, &params, shape);
    assert!(matches!(r, Err(HeError::CountMismatch { .. })), "{r:?}");
    assert_eq!(&bch.recv().unwrap(), &cts[0]);
}
