//! Criterion benches of Ferret (the product parameter sets): session setup (base OTs, IKNP
//! bootstrap stock, one bootstrap iteration, both directions) and 2^24 random COTs in one
//! direction (server as COT sender), both parties on two threads over the memory channel.
//! Throughput is in COTs; the bits per COT of the 2^24 batch and the machine's load
//! average are printed first (the machine is shared: say so with the figures).
//!
//! Short runs: `cargo bench -p fusion-common --bench ferret -- --warm-up-time 1
//! --measurement-time 3` (the 2^24 case takes about a second per iteration).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fusion_common::channel::{Channel, Counting, memory_pair};
use fusion_common::ot::{Ferret, Party, RandomCot};

const N: usize = 1 << 24;

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Bits per COT of one 2^24 extension (both directions of traffic counted).
fn bits_per_cot() -> f64 {
    let (a, b) = memory_pair();
    let h = std::thread::spawn(move || {
        let mut ch = b;
        let mut c = Ferret::setup(&mut ch, Party::Client, &mut rand::rng()).ok()?;
        c.extend(&mut ch, 0, N).ok().map(|_| ())
    });
    let mut ch = Counting::new(a);
    let mut s = match Ferret::setup(&mut ch, Party::Server, &mut rand::rng()) {
        Ok(s) => s,
        Err(e) => panic!("setup: {e}"),
    };
    ch.set_step("ext");
    let r = s.extend(&mut ch, N, 0);
    assert!(r.is_ok());
    let _ = h.join();
    let e = ch.report().total_with_prefix("ext");
    (e.bytes_sent + e.bytes_received) as f64 * 8.0 / N as f64
}

fn ferret(c: &mut Criterion) {
    eprintln!(
        "ferret: {:.4} bits per COT for 2^24 COTs (parameter formula {:.4} per usable COT of \
         a MAIN iteration); load average {}",
        bits_per_cot(),
        fusion_common::ot::ferret::MAIN.bits_per_cot(),
        load_average()
    );
    let mut g = c.benchmark_group("ferret");
    g.sample_size(10);
    g.bench_function("setup_both_directions", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut a, mut bb) = memory_pair();
                let h = std::thread::spawn(move || {
                    Ferret::setup(&mut bb, Party::Client, &mut rand::rng()).map(|_| ())
                });
                let t = Instant::now();
                let r = Ferret::setup(&mut a, Party::Server, &mut rand::rng());
                let _ = h.join();
                total += t.elapsed();
                assert!(r.is_ok());
            }
            total
        })
    });
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("cot_2^24", |b| {
        let (mut a, mut bb) = memory_pair();
        // An extension hands out whole iterations; like a session, each side keeps the
        // surplus and asks only for what it lacks (both compute the same counts).
        let h = std::thread::spawn(move || -> Option<()> {
            let mut c = Ferret::setup(&mut bb, Party::Client, &mut rand::rng()).ok()?;
            let mut surplus = 0;
            // Serve extensions until the server hangs up.
            loop {
                let need = N.saturating_sub(surplus);
                let got = c.extend(&mut bb, 0, need).ok()?.recv.len();
                surplus = surplus + got - N;
            }
        });
        let mut s = match Ferret::setup(&mut a, Party::Server, &mut rand::rng()) {
            Ok(s) => s,
            Err(e) => panic!("setup: {e}"),
        };
        let mut surplus = 0;
        b.iter(|| {
            let need = N.saturating_sub(surplus);
            let r = s.extend(&mut a, need, 0);
            assert!(r.is_ok());
            let got = r.as_ref().map_or(0, |b| b.send.len());
            surplus = surplus + got - N;
            r
        });
        let _ = a.flush();
        drop(a);
        let _ = h.join();
    });
    g.finish();
    eprintln!("ferret: load average after {}", load_average());
}

criterion_group!(benches, ferret);
criterion_main!(benches);
