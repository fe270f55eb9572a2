//! Criterion benches of the OT layer: base OT (both directions, 128 each) and 2^20 IKNP
//! random COTs (one direction), both parties on two threads over the memory channel.
//! Short runs: `cargo bench -p fusion-common --bench ot -- --warm-up-time 1 --measurement-time 3`.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fusion_common::channel::memory_pair;
use fusion_common::ot::{Iknp, Party, RandomCot};

fn base_ot(c: &mut Criterion) {
    let mut g = c.benchmark_group("ot");
    g.sample_size(10);
    g.bench_function("base_ot_2x128_chou_orlandi", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut a, mut bb) = memory_pair();
                let h = std::thread::spawn(move || {
                    Iknp::setup(&mut bb, Party::Client, &mut rand::rng()).map(|_| ())
                });
                let t = Instant::now();
                let r = Iknp::setup(&mut a, Party::Server, &mut rand::rng());
                let _ = h.join();
                total += t.elapsed();
                assert!(r.is_ok());
            }
            total
        })
    });
    const N: usize = 1 << 20;
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("iknp_cot_2^20", |b| {
        let (mut a, mut bb) = memory_pair();
        let h = std::thread::spawn(move || {
            let mut c = Iknp::setup(&mut bb, Party::Client, &mut rand::rng()).ok()?;
            // Serve extensions until the server hangs up.
            while c.extend(&mut bb, 0, N).is_ok() {}
            Some(())
        });
        let mut s = match Iknp::setup(&mut a, Party::Server, &mut rand::rng()) {
            Ok(s) => s,
            Err(e) => panic!("setup: {e}"),
        };
        b.iter(|| {
            let r = s.extend(&mut a, N, 0);
            assert!(r.is_ok());
            r
        });
        drop(a);
        let _ = h.join();
    });
    g.finish();
}

criterion_group!(benches, base_ot);
criterion_main!(benches);
