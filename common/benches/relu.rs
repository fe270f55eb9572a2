//! Criterion benches of the 2PC ReLU (IKNP + KK13, default leaf width): 2^16 and 2^20
//! ReLUs at l = 32 and 37, both parties on two threads over the memory channel, one
//! session per benchmark (setup not timed). The 2^20 cases take seconds per iteration:
//! run them with `--sample-size 10 --warm-up-time 1 --measurement-time 3` or filter them
//! out (`-- relu/2^16`).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fusion_common::channel::memory_pair;
use fusion_common::mpc::{MpcConfig, MpcSession, Party};
use fusion_common::ring::Ring;

fn relu(c: &mut Criterion) {
    let mut g = c.benchmark_group("relu");
    g.sample_size(10);
    for (logn, bits) in [(16u32, 32u32), (16, 37), (20, 32), (20, 37)] {
        let n = 1usize << logn;
        let ring = match Ring::new(bits) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let mut rng = rand::rng();
        let x0: Vec<u64> = (0..n).map(|_| ring.random(&mut rng)).collect();
        let x1: Vec<u64> = (0..n).map(|_| ring.random(&mut rng)).collect();
        let (mut a, mut b) = memory_pair();
        // The client thread runs one ReLU batch per message on `go`.
        let (go, ready) = mpsc::channel::<bool>();
        let h = std::thread::spawn(move || {
            let mut s = MpcSession::setup(
                &mut b,
                Party::Client,
                MpcConfig::default(),
                &mut rand::rng(),
            )
            .ok()?;
            while let Ok(true) = ready.recv() {
                s.relu(&mut b, ring, &x1).ok()?;
            }
            Some(())
        });
        let mut s = match MpcSession::setup(
            &mut a,
            Party::Server,
            MpcConfig::default(),
            &mut rand::rng(),
        ) {
            Ok(s) => s,
            Err(e) => panic!("setup: {e}"),
        };
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("2^{logn}_l{bits}"), |bch| {
            bch.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = go.send(true);
                    let t = Instant::now();
                    let r = s.relu(&mut a, ring, &x0);
                    total += t.elapsed();
                    assert!(r.is_ok());
                }
                total
            })
        });
        let _ = go.send(false);
        let _ = h.join();
    }
    g.finish();
}

criterion_group!(benches, relu);
criterion_main!(benches);
