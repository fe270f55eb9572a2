//! HE linear layer: time per side for the three MNIST layers (784->128, 128->128, 128->10)
//! at B = 1 and B = 256, and the bytes each way (printed first, from the formula the tests
//! assert against the counting channel).
//!
//! Run briefly (shared machine): `cargo bench -p fusion-common --bench he_linear --
//! --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fusion_common::he::{
    ClientSession, HeParams, LinearShape, ServerSession, layer_cost, setup_bytes,
};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

const LAYERS: [(&str, usize, usize); 3] = [("fc1", 784, 128), ("fc2", 128, 128), ("fc3", 128, 10)];

fn print_bytes(params: &HeParams) {
    eprintln!("HE parameters: {params:?}");
    eprintln!(
        "setup (client -> server, once): {} bytes",
        setup_bytes(params)
    );
    eprintln!(
        "{:>4} {:>5} {:>36} {:>11} {:>11} {:>12}",
        "B", "layer", "packing", "up", "down", "per row"
    );
    for b in [1usize, 16, 256] {
        let (mut up, mut down) = (0, 0);
        for (name, ni, no) in LAYERS {
            let Ok(c) = layer_cost(params, &LinearShape::new(b, ni, no)) else {
                continue;
            };
            up += c.query_bytes;
            down += c.response_bytes;
            eprintln!(
                "{b:>4} {name:>5} {:>36} {:>11} {:>11} {:>12.0}",
                format!(
                    "{:?}",
                    (c.packing.rows, c.packing.inputs, c.packing.outputs)
                ),
                c.query_bytes,
                c.response_bytes,
                (c.query_bytes + c.response_bytes) as f64 / b as f64
            );
        }
        eprintln!(
            "{b:>4} {:>5} {:>36} {up:>11} {down:>11} {:>12.0}",
            "all",
            "",
            (up + down) as f64 / b as f64
        );
    }
}

fn he_linear(c: &mut Criterion) {
    let params = Arc::new(HeParams::new(37, 37).expect("parameters"));
    print_bytes(&params);
    let ring = params.ring();
    let mut rng = ChaCha12Rng::seed_from_u64(1);
    let mut g = c.benchmark_group("he");
    g.sample_size(10);
    g.bench_function("setup/keygen+public_key", |bch| {
        bch.iter(|| ClientSession::generate(params.clone(), &mut rng))
    });
    let (client, setup) = ClientSession::generate(params.clone(), &mut rng);
    g.bench_function("setup/server_accepts_public_key", |bch| {
        bch.iter(|| ServerSession::from_setup(params.clone(), black_box(&setup)))
    });
    let server = ServerSession::from_setup(params.clone(), &setup).expect("setup");
    for b in [1usize, 256] {
        g.throughput(Throughput::Elements(b as u64));
        for (name, ni, no) in LAYERS {
            let shape = LinearShape::new(b, ni, no);
            let xc: Vec<u64> = (0..b * ni).map(|_| ring.random(&mut rng)).collect();
            let xs: Vec<u64> = (0..b * ni).map(|_| ring.random(&mut rng)).collect();
            let w: Vec<u64> = (0..no * ni).map(|_| ring.random(&mut rng)).collect();
            let bias: Vec<u64> = (0..no).map(|_| ring.random(&mut rng)).collect();
            let q = client.encrypt_layer(&xc, shape, &mut rng).expect("encrypt");
            let (r, _) = server
                .evaluate_layer(&w, &bias, Some(&xs), shape, &q[0], &q[1..], &mut rng)
                .expect("evaluate");
            g.bench_function(format!("{name}/B{b}/client_encrypt"), |bch| {
                bch.iter(|| client.encrypt_layer(black_box(&xc), shape, &mut rng))
            });
            g.bench_function(format!("{name}/B{b}/server_evaluate"), |bch| {
                bch.iter(|| {
                    server.evaluate_layer(&w, &bias, Some(&xs), shape, &q[0], &q[1..], &mut rng)
                })
            });
            g.bench_function(format!("{name}/B{b}/client_decrypt"), |bch| {
                bch.iter(|| client.decrypt_layer(shape, &r[0], black_box(&r[1..])))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, he_linear);
criterion_main!(benches);
