//! Tests of every 2PC operation: both parties in-process over the memory channel, seeded,
//! against the plaintext function; costs against `cost.rs`; tampering; edge values.

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

use super::cost::{self, Cost, Extension, Params};
use super::*;
use crate::channel::{Counting, MemoryChannel, StepCost, memory_pair};
use crate::ot::ferret::tests::{TEST_BOOT, TEST_MAIN};
use crate::ot::{CoreOt, Ferret, KkotConfig};

type Ch = Counting<MemoryChannel>;
/// The session type of the tests: any core OT.
type Sess = MpcSession<CoreOt>;

/// The core OTs every protocol test runs over: IKNP, and Ferret with small (insecure,
/// fast) parameter sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ot {
    Iknp,
    Ferret,
}

const OTS: [Ot; 2] = [Ot::Iknp, Ot::Ferret];

fn cfg(m: u32, kn: KkotConfig) -> MpcConfig {
    MpcConfig {
        leaf_bits: m,
        kn,
        min_batch: 1,
    }
}

/// The configuration a test uses over `ot`: as given over IKNP; over Ferret the leaves'
/// 1-of-N OTs come from COTs (the cheap choice there).
fn cfg_for(ot: Ot, m: u32, kn: KkotConfig) -> MpcConfig {
    match ot {
        Ot::Iknp => cfg(m, kn),
        Ot::Ferret => cfg(m, KkotConfig::FromCots),
    }
}

/// The cost-formula parameters matching `cfg_for(ot, m, kn)` for a fresh session.
fn params_for(ot: Ot, m: u32, kn: KkotConfig) -> Params {
    let c = cfg_for(ot, m, kn);
    Params {
        leaf_bits: m,
        kk13: c.kn == KkotConfig::Kk13,
        ext: match ot {
            Ot::Iknp => Extension::Iknp,
            Ot::Ferret => Extension::ferret_after_setup(&TEST_BOOT, &TEST_MAIN),
        },
    }
}

fn setup(
    ch: &mut dyn crate::channel::Channel,
    party: Party,
    cfg: MpcConfig,
    ot: Ot,
    seed: u64,
) -> Sess {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let core = match ot {
        Ot::Iknp => CoreOt::Iknp(Box::new(
            crate::ot::Iknp::setup(ch, party, &mut rng).unwrap(),
        )),
        Ot::Ferret => CoreOt::Ferret(Box::new(
            Ferret::setup_with_params(ch, party, TEST_BOOT, TEST_MAIN, &mut rng).unwrap(),
        )),
    };
    MpcSession::setup_over(ch, party, cfg, core, &mut rng).unwrap()
}

/// Sets up a session per party (seeded) over `ot` and runs `s` / `c` on a freshly
/// counted channel.
fn run_on<A: Send + 'static, B: Send + 'static>(
    ot: Ot,
    cfg: MpcConfig,
    s: impl FnOnce(&mut Sess, &mut Ch) -> A + Send + 'static,
    c: impl FnOnce(&mut Sess, &mut Ch) -> B + Send + 'static,
) -> ((A, StepCost), (B, StepCost)) {
    let (a, b) = memory_pair();
    let h = std::thread::spawn(move || {
        let mut raw = b;
        let mut sess = setup(&mut raw, Party::Client, cfg, ot, 8);
        let mut ch = Counting::new(raw);
        let r = c(&mut sess, &mut ch);
        (r, ch.report().total("op"))
    });
    let mut raw = a;
    let mut sess = setup(&mut raw, Party::Server, cfg, ot, 7);
    let mut ch = Counting::new(raw);
    let r = s(&mut sess, &mut ch);
    let rs = (r, ch.report().total("op"));
    // hang up before waiting for the client (a fake peer may read until we do)
    drop(ch);
    (rs, h.join().unwrap())
}

/// [`run_on`] over IKNP.
fn run<A: Send + 'static, B: Send + 'static>(
    cfg: MpcConfig,
    s: impl FnOnce(&mut Sess, &mut Ch) -> A + Send + 'static,
    c: impl FnOnce(&mut Sess, &mut Ch) -> B + Send + 'static,
) -> ((A, StepCost), (B, StepCost)) {
    run_on(Ot::Iknp, cfg, s, c)
}

/// Random and edge values (signed readings) for ring `r`.
fn values(r: Ring, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let mut v: Vec<u64> = [
        0i64,
        1,
        -1,
        2,
        -2,
        r.max_signed(),
        r.min_signed(),
        r.max_signed() - 1,
        r.min_signed() + 1,
    ]
    .iter()
    .map(|&s| r.from_signed(s))
    .collect();
    for k in [1u32, 5, 12, 13] {
        if k < r.bits() - 1 {
            for d in [-1i64, 0, 1] {
                v.push(r.from_signed((1i64 << k) + d));
                v.push(r.from_signed(-(1i64 << k) + d));
            }
        }
    }
    while v.len() < n {
        let x = r.random(&mut rng);
        // half uniform, half small magnitudes
        v.push(if v.len().is_multiple_of(2) {
            x
        } else {
            r.from_signed(r.to_signed(x) >> (r.bits() / 2))
        });
    }
    v
}

fn share(r: Ring, x: &[u64], seed: u64) -> (Vec<u64>, Vec<u64>) {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    x.iter().map(|&v| r.share(v, &mut rng)).unzip()
}

fn check_cost(what: &str, s: &StepCost, c: &StepCost, want: Cost) {
    assert_eq!(
        (c.bytes_sent, c.bytes_received, c.rounds),
        (want.sent, want.received, want.flights),
        "{what}: client"
    );
    assert_eq!(
        (s.bytes_sent, s.bytes_received),
        (want.received, want.sent),
        "{what}: server"
    );
}

type Op = fn(&mut Sess, &mut Ch, Ring, &[u64], u32) -> Result<Vec<u64>, MpcError>;

/// Runs `op` on shares of `x` and returns the reconstructed result and both costs.
fn run_op(
    ot: Ot,
    cfg: MpcConfig,
    r: Ring,
    x: &[u64],
    f: u32,
    op: Op,
) -> (Vec<u64>, StepCost, StepCost) {
    let (x0, x1) = share(r, x, 99);
    let ((y0, cs), (y1, cc)) = run_on(
        ot,
        cfg,
        move |s, ch| op(s, ch, r, &x0, f).unwrap(),
        move |s, ch| op(s, ch, r, &x1, f).unwrap(),
    );
    (
        y0.iter().zip(&y1).map(|(&a, &b)| r.add(a, b)).collect(),
        cs,
        cc,
    )
}

fn relu_op(s: &mut Sess, ch: &mut Ch, r: Ring, x: &[u64], _: u32) -> Result<Vec<u64>, MpcError> {
    s.relu(ch, r, x)
}
fn trunc_op(s: &mut Sess, ch: &mut Ch, r: Ring, x: &[u64], f: u32) -> Result<Vec<u64>, MpcError> {
    s.trunc(ch, r, x, f)
}
fn relu_trunc_op(
    s: &mut Sess,
    ch: &mut Ch,
    r: Ring,
    x: &[u64],
    f: u32,
) -> Result<Vec<u64>, MpcError> {
    s.relu_trunc(ch, r, x, f)
}
fn trunc_nonneg_op(
    s: &mut Sess,
    ch: &mut Ch,
    r: Ring,
    x: &[u64],
    f: u32,
) -> Result<Vec<u64>, MpcError> {
    s.trunc_nonneg(ch, r, x, f)
}
fn ashr(r: Ring, x: u64, f: u32) -> u64 {
    r.from_signed(r.to_signed(x) >> f)
}

#[test]
fn relu_matches_plaintext_with_counted_cost() {
    for ot in OTS {
        for bits in [16u32, 32, 37, 62, 64] {
            let r = Ring::new(bits).unwrap();
            let x = values(r, 300, bits as u64);
            let c = cfg_for(ot, 4, KkotConfig::Kk13);
            let (y, cs, cc) = run_op(ot, c, r, &x, 0, relu_op);
            for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
                assert_eq!(
                    yi,
                    r.from_signed(r.to_signed(xi).max(0)),
                    "{ot:?} l={bits} i={i}"
                );
            }
            check_cost(
                &format!("relu {ot:?} l={bits}"),
                &cs,
                &cc,
                cost::relu(params_for(ot, 4, KkotConfig::Kk13), r, x.len()),
            );
        }
    }
}

#[test]
fn relu_over_cots_and_other_leaf_widths() {
    let r = Ring::new(37).unwrap();
    let x = values(r, 150, 3);
    for (m, kn) in [
        (4, KkotConfig::FromCots),
        (1, KkotConfig::FromCots),
        (1, KkotConfig::Kk13),
        (3, KkotConfig::Kk13),
        (6, KkotConfig::Kk13),
        (8, KkotConfig::Kk13),
    ] {
        let (y, cs, cc) = run_op(Ot::Iknp, cfg(m, kn), r, &x, 0, relu_op);
        for (&xi, &yi) in x.iter().zip(&y) {
            assert_eq!(yi, r.from_signed(r.to_signed(xi).max(0)), "m={m} {kn:?}");
        }
        let p = Params {
            leaf_bits: m,
            kk13: kn == KkotConfig::Kk13,
            ext: Extension::Iknp,
        };
        check_cost(
            &format!("relu m={m} {kn:?}"),
            &cs,
            &cc,
            cost::relu(p, r, x.len()),
        );
    }
}

#[test]
fn relu_over_ferret_at_every_leaf_width_and_with_kk13() {
    let r = Ring::new(37).unwrap();
    let x = values(r, 150, 3);
    for m in [1u32, 2, 3, 5, 6, 8] {
        let (y, cs, cc) = run_op(Ot::Ferret, cfg(m, KkotConfig::FromCots), r, &x, 0, relu_op);
        for (&xi, &yi) in x.iter().zip(&y) {
            assert_eq!(yi, r.from_signed(r.to_signed(xi).max(0)), "m={m}");
        }
        let p = params_for(Ot::Ferret, m, KkotConfig::FromCots);
        check_cost(
            &format!("relu ferret m={m}"),
            &cs,
            &cc,
            cost::relu(p, r, x.len()),
        );
    }
    // KK13 runs over Ferret too (its bootstrap takes 2·256 ROTs from the core OT)
    let (y, _, _) = run_op(Ot::Ferret, cfg(4, KkotConfig::Kk13), r, &x, 0, relu_op);
    for (&xi, &yi) in x.iter().zip(&y) {
        assert_eq!(
            yi,
            r.from_signed(r.to_signed(xi).max(0)),
            "KK13 over Ferret"
        );
    }
}

#[test]
fn drelu_matches_sign() {
    for (ot, bits) in OTS.iter().flat_map(|&o| [16u32, 37, 62].map(|b| (o, b))) {
        let r = Ring::new(bits).unwrap();
        let x = values(r, 200, 40 + bits as u64);
        let (x0, x1) = share(r, &x, 41);
        let ((d0, cs), (d1, cc)) = run_on(
            ot,
            cfg_for(ot, 4, KkotConfig::Kk13),
            move |s, ch| s.drelu(ch, r, &x0).unwrap(),
            move |s, ch| s.drelu(ch, r, &x1).unwrap(),
        );
        for i in 0..x.len() {
            assert_eq!(
                d0[i] ^ d1[i],
                u8::from(r.to_signed(x[i]) >= 0),
                "{ot:?} l={bits} x={}",
                r.to_signed(x[i])
            );
        }
        let p = params_for(ot, 4, KkotConfig::Kk13);
        check_cost("drelu", &cs, &cc, cost::drelu(p, r, x.len()));
    }
}

#[test]
fn b2a_converts_shared_bits() {
    for (ot, bits) in OTS.iter().flat_map(|&o| [1u32, 16, 37, 64].map(|b| (o, b))) {
        let r = Ring::new(bits).unwrap();
        let d: Vec<u8> = (0..130).map(|i| (i % 3 == 0) as u8).collect();
        let d0: Vec<u8> = (0..130).map(|i| (i % 5 < 2) as u8).collect();
        let d1: Vec<u8> = d.iter().zip(&d0).map(|(a, b)| a ^ b).collect();
        let ((y0, cs), (y1, cc)) = run_on(
            ot,
            cfg_for(ot, 4, KkotConfig::Kk13),
            move |s, ch| s.b2a(ch, r, &d0).unwrap(),
            move |s, ch| s.b2a(ch, r, &d1).unwrap(),
        );
        for i in 0..d.len() {
            assert_eq!(r.add(y0[i], y1[i]), u64::from(d[i]), "l={bits}");
        }
        let p = params_for(ot, 4, KkotConfig::Kk13);
        check_cost("b2a", &cs, &cc, cost::b2a(p, r, d.len()));
    }
}

#[test]
fn mux_selects_by_shared_bit() {
    for ot in OTS {
        let r = Ring::new(32).unwrap();
        let x = values(r, 100, 5);
        let (x0, x1) = share(r, &x, 6);
        let d: Vec<u8> = (0..100).map(|i| (i % 3 == 1) as u8).collect();
        let d0: Vec<u8> = (0..100).map(|i| (i % 2) as u8).collect();
        let d1: Vec<u8> = d.iter().zip(&d0).map(|(a, b)| a ^ b).collect();
        let ((y0, cs), (y1, cc)) = run_on(
            ot,
            cfg_for(ot, 4, KkotConfig::Kk13),
            move |s, ch| s.mux(ch, r, &d0, &x0).unwrap(),
            move |s, ch| s.mux(ch, r, &d1, &x1).unwrap(),
        );
        for i in 0..100 {
            assert_eq!(
                r.add(y0[i], y1[i]),
                if d[i] == 1 { x[i] } else { 0 },
                "{ot:?}"
            );
        }
        let p = params_for(ot, 4, KkotConfig::Kk13);
        check_cost("mux", &cs, &cc, cost::mux(p, r, 100));
    }
}

#[test]
fn trunc_is_exact_arithmetic_shift() {
    for (ot, bits) in OTS
        .iter()
        .flat_map(|&o| [16u32, 32, 37, 62, 64].map(|b| (o, b)))
    {
        let r = Ring::new(bits).unwrap();
        let x = values(r, 200, 60 + bits as u64);
        for f in [1, 12, bits - 2, bits - 1] {
            let c = cfg_for(ot, 4, KkotConfig::Kk13);
            let (y, cs, cc) = run_op(ot, c, r, &x, f, trunc_op);
            for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
                assert_eq!(
                    yi,
                    ashr(r, xi, f),
                    "{ot:?} l={bits} f={f} i={i} x={}",
                    r.to_signed(xi)
                );
            }
            let p = params_for(ot, 4, KkotConfig::Kk13);
            check_cost("trunc", &cs, &cc, cost::trunc(p, r, x.len(), f));
        }
    }
}

#[test]
fn trunc_over_cots_is_exact() {
    let r = Ring::new(37).unwrap();
    let x = values(r, 150, 61);
    for ot in OTS {
        let (y, cs, cc) = run_op(ot, cfg(4, KkotConfig::FromCots), r, &x, 12, trunc_op);
        for (&xi, &yi) in x.iter().zip(&y) {
            assert_eq!(yi, ashr(r, xi, 12), "{ot:?}");
        }
        let p = params_for(ot, 4, KkotConfig::FromCots);
        check_cost("trunc cots", &cs, &cc, cost::trunc(p, r, x.len(), 12));
    }
}

#[test]
fn relu_trunc_is_exact() {
    for (ot, bits) in OTS
        .iter()
        .flat_map(|&o| [16u32, 32, 37, 62].map(|b| (o, b)))
    {
        let r = Ring::new(bits).unwrap();
        let x = values(r, 200, 70 + bits as u64);
        for f in [1, 12] {
            let c = cfg_for(ot, 4, KkotConfig::Kk13);
            let (y, cs, cc) = run_op(ot, c, r, &x, f, relu_trunc_op);
            for (&xi, &yi) in x.iter().zip(&y) {
                assert_eq!(
                    yi,
                    r.from_signed((r.to_signed(xi) >> f).max(0)),
                    "{ot:?} l={bits} f={f} x={}",
                    r.to_signed(xi)
                );
            }
            let p = params_for(ot, 4, KkotConfig::Kk13);
            check_cost("relu_trunc", &cs, &cc, cost::relu_trunc(p, r, x.len(), f));
        }
    }
    // f = 0 is ReLU
    for ot in OTS {
        let r = Ring::new(32).unwrap();
        let x = values(r, 50, 1);
        let (y, _, _) = run_op(
            ot,
            cfg_for(ot, 4, KkotConfig::Kk13),
            r,
            &x,
            0,
            relu_trunc_op,
        );
        assert!(
            x.iter()
                .zip(&y)
                .all(|(&a, &b)| b == r.from_signed(r.to_signed(a).max(0)))
        );
    }
}

#[test]
fn trunc_nonneg_is_exact_for_non_negative_values() {
    for (ot, bits) in OTS
        .iter()
        .flat_map(|&o| [16u32, 32, 37, 62].map(|b| (o, b)))
    {
        let r = Ring::new(bits).unwrap();
        let x: Vec<u64> = values(r, 200, 80 + bits as u64)
            .into_iter()
            .map(|v| r.from_signed(r.to_signed(v).max(0)))
            .collect();
        for f in [1, 12] {
            let c = cfg_for(ot, 4, KkotConfig::Kk13);
            let (y, cs, cc) = run_op(ot, c, r, &x, f, trunc_nonneg_op);
            for (&xi, &yi) in x.iter().zip(&y) {
                assert_eq!(yi, xi >> f, "{ot:?} l={bits} f={f}");
            }
            let p = params_for(ot, 4, KkotConfig::Kk13);
            check_cost(
                "trunc_nonneg",
                &cs,
                &cc,
                cost::trunc_nonneg(p, r, x.len(), f),
            );
        }
    }
}

fn first_argmax(r: Ring, row: &[u64]) -> usize {
    let mut best = 0;
    for j in 1..row.len() {
        if r.to_signed(row[j]) > r.to_signed(row[best]) {
            best = j;
        }
    }
    best
}

#[test]
fn argmax_reveals_first_argmax_to_client_only() {
    for (ot, bits) in OTS.iter().flat_map(|&o| [16u32, 37].map(|b| (o, b))) {
        let r = Ring::new(bits).unwrap();
        let lim = 1i64 << (bits - 2);
        for cols in [1usize, 2, 3, 10] {
            let mut rows: Vec<Vec<i64>> = vec![
                vec![0; cols],
                vec![-1; cols],
                vec![lim - 1; cols],
                vec![-lim; cols],
                (0..cols as i64)
                    .map(|j| if j % 2 == 0 { 5 } else { -5 })
                    .collect(),
                (0..cols as i64).map(|j| -(j % 3)).collect(),
                (0..cols as i64)
                    .map(|j| if j == cols as i64 - 1 { lim - 1 } else { -lim })
                    .collect(),
            ];
            let mut rng = ChaCha12Rng::seed_from_u64(cols as u64);
            for _ in 0..20 {
                rows.push(
                    (0..cols)
                        .map(|_| r.to_signed(r.random(&mut rng)) >> 2)
                        .collect(),
                );
                rows.push(
                    (0..cols)
                        .map(|_| (r.random(&mut rng) % 4) as i64 - 2)
                        .collect(),
                );
            }
            let flat: Vec<i64> = rows.concat();
            assert!(argmax_precondition(r, &flat));
            let x: Vec<u64> = flat.iter().map(|&v| r.from_signed(v)).collect();
            let (x0, x1) = share(r, &x, 3);
            let ((s_out, cs), (c_out, cc)) = run_on(
                ot,
                cfg_for(ot, 4, KkotConfig::Kk13),
                move |s, ch| s.argmax_reveal(ch, r, &x0, cols, Party::Client).unwrap(),
                move |s, ch| s.argmax_reveal(ch, r, &x1, cols, Party::Client).unwrap(),
            );
            assert!(s_out.is_none());
            let labels = c_out.unwrap();
            for (k, row) in x.chunks(cols).enumerate() {
                assert_eq!(
                    labels[k],
                    first_argmax(r, row),
                    "{ot:?} l={bits} cols={cols} row={:?}",
                    &flat[k * cols..(k + 1) * cols]
                );
            }
            check_cost(
                "argmax",
                &cs,
                &cc,
                cost::argmax_reveal(params_for(ot, 4, KkotConfig::Kk13), r, rows.len(), cols),
            );
        }
    }
    let r = Ring::new(16).unwrap();
    assert!(!argmax_precondition(r, &[1 << 14]));
    assert!(argmax_precondition(r, &[-(1 << 14), (1 << 14) - 1]));
}

#[test]
fn reveal_to_server_and_shares_of_argmax() {
    let r = Ring::new(32).unwrap();
    let x: Vec<u64> = [3i64, 9, 9, -4, 0, 0]
        .iter()
        .map(|&v| r.from_signed(v))
        .collect();
    let (x0, x1) = share(r, &x, 4);
    let ((s_out, _), (c_out, cc)) = run(
        cfg(4, KkotConfig::Kk13),
        move |s, ch| {
            let i = s.argmax(ch, r, &x0, 3).unwrap();
            let v = s.reveal(ch, r, &x0, Party::Server).unwrap();
            (i, v)
        },
        move |s, ch| {
            let i = s.argmax(ch, r, &x1, 3).unwrap();
            let v = s.reveal(ch, r, &x1, Party::Server).unwrap();
            (i, v)
        },
    );
    assert_eq!(s_out.1.unwrap(), x);
    assert!(c_out.1.is_none());
    let idx: Vec<u64> = s_out
        .0
        .iter()
        .zip(&c_out.0)
        .map(|(&a, &b)| r.add(a, b))
        .collect();
    assert_eq!(idx, vec![1, 1]);
    assert!(cc.bytes_sent > 0);
}

#[test]
fn truncated_leaf_message_is_a_named_error_and_poisons_the_session() {
    let r = Ring::new(32).unwrap();
    let ((res, _), _) = run(
        cfg(4, KkotConfig::Kk13),
        move |s, ch| {
            let e = s.relu(ch, r, &[1, 2, 3]);
            let again = s.relu(ch, r, &[1]);
            (e, again, s.is_poisoned())
        },
        move |_s, ch| {
            // A peer that runs the extension, then sends a short leaf message.
            let (_ext_s, _ext_c) = (ch.recv(), ());
            let _ = ch.send(&[0u8; 16 * 128]);
            let _ = ch.send(&[0u8; 10]);
        },
    );
    assert!(
        matches!(
            res.0,
            Err(MpcError::Message {
                what: "millionaire leaf OT",
                ..
            }) | Err(MpcError::Ot(_))
        ),
        "{:?}",
        res.0
    );
    assert!(matches!(res.1, Err(MpcError::Poisoned)));
    assert!(res.2);
}

#[test]
fn truncated_mux_reply_is_a_named_error() {
    let r = Ring::new(32).unwrap();
    let ((_, _), (res, _)) = run(
        cfg(4, KkotConfig::Kk13),
        move |s, ch| {
            s.ot().reserve(ch, 8, 8).unwrap();
            let (_st, msg) = s.ot().cot_choose(&[0; 8]).unwrap();
            ch.send_vec(msg).unwrap();
            let _ = ch.recv();
            ch.send(&[0u8; 31]).unwrap(); // 8 elements of 32 bits need 32 bytes
            let _ = ch.recv();
        },
        move |s, ch| s.mux(ch, r, &[1; 8], &[5; 8]),
    );
    assert!(
        matches!(
            res,
            Err(MpcError::Message {
                what: "mux COT reply",
                ..
            })
        ),
        "{res:?}"
    );
}

#[test]
fn flipped_bits_in_replies_are_undetectable_semi_honest_only_lengths_are_checked() {
    // Semi-honest protocol: a flipped bit in a COT reply changes the result silently.
    // What is checked is the length of every message (tests above); here the error-free
    // path with an honest peer returns the right value after an earlier short message
    // was refused in another session.
    let r = Ring::new(16).unwrap();
    let x = values(r, 20, 9);
    let (y, _, _) = run_op(Ot::Iknp, cfg(4, KkotConfig::Kk13), r, &x, 0, relu_op);
    assert!(
        x.iter()
            .zip(&y)
            .all(|(&a, &b)| b == r.from_signed(r.to_signed(a).max(0)))
    );
}

#[test]
fn bad_inputs_are_refused() {
    let r = Ring::new(16).unwrap();
    let ((res, _), _) = run(
        cfg(4, KkotConfig::Kk13),
        move |s, ch| (s.relu(ch, r, &[1 << 16]).err(), s.is_poisoned()),
        |_, _| (),
    );
    assert!(matches!(res.0, Some(MpcError::BadInput(_))));
    assert!(res.1);
    let ((res, _), _) = run(
        cfg(4, KkotConfig::Kk13),
        move |s, ch| s.trunc(ch, r, &[1], 16).err(),
        |_, _| (),
    );
    assert!(matches!(res, Some(MpcError::BadInput(_))));
    let ((res, _), _) = run(
        cfg(4, KkotConfig::Kk13),
        move |s, ch| s.argmax(ch, r, &[1, 2, 3], 2).err(),
        |_, _| (),
    );
    assert!(matches!(res, Some(MpcError::BadInput(_))));
    let (a, _b) = memory_pair();
    let mut a = a;
    let mut rng = ChaCha12Rng::seed_from_u64(1);
    let bad = MpcConfig {
        leaf_bits: 9,
        ..MpcConfig::default()
    };
    assert!(matches!(
        MpcSession::setup(&mut a, Party::Server, bad, &mut rng),
        Err(MpcError::BadInput(_))
    ));
}

#[test]
fn empty_batches_cost_nothing() {
    let r = Ring::new(32).unwrap();
    let ((y, cs), _) = run(
        cfg(4, KkotConfig::Kk13),
        move |s, ch| s.relu(ch, r, &[]).unwrap(),
        move |s, ch| s.relu(ch, r, &[]).unwrap(),
    );
    assert!(y.is_empty());
    assert_eq!(cs.bytes_sent, 0);
}

/// A test-only ideal random-COT functionality: both parties derive the same COTs from a
/// shared seed (a trusted dealer, never in product code). It shows that the protocols run
/// unchanged over any [`RandomCot`], as Ferret's will.
struct DealerCot {
    party: Party,
    deltas: [crate::ot::Block; 2],
    prgs: [crate::ot::Prg; 2],
}

impl DealerCot {
    fn new(party: Party) -> Self {
        Self {
            party,
            deltas: [
                0x1234_5678_9abc_def0_0fed_cba9_8765_4321,
                0xdead_beef_0000_1111_2222_3333_4444_5555,
            ],
            prgs: [crate::ot::Prg::new(1), crate::ot::Prg::new(2)],
        }
    }

    /// n COTs of direction d (0: server sends): (keys, bits, m).
    fn draw(
        &mut self,
        d: usize,
        n: usize,
    ) -> (Vec<crate::ot::Block>, Vec<u8>, Vec<crate::ot::Block>) {
        let mut k = vec![0; n];
        self.prgs[d].fill_blocks(&mut k);
        let bits = self.prgs[d].bits(n);
        let m = k
            .iter()
            .zip(&bits)
            .map(|(&k, &b)| if b == 1 { k ^ self.deltas[d] } else { k })
            .collect();
        (k, bits, m)
    }
}

impl crate::ot::RandomCot for DealerCot {
    fn delta(&self) -> crate::ot::Block {
        self.deltas[usize::from(self.party == Party::Client)]
    }
    fn extend(
        &mut self,
        _ch: &mut dyn crate::channel::Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<crate::ot::CotBatch, crate::ot::OtError> {
        let ds = usize::from(self.party == Party::Client);
        let (ns, nr) = if self.party == Party::Server {
            (n_send, n_recv)
        } else {
            (n_recv, n_send)
        };
        // Both parties draw both directions in the same order.
        let a = self.draw(0, ns);
        let b = self.draw(1, nr);
        let (mine, theirs) = if ds == 0 { (a, b) } else { (b, a) };
        Ok(crate::ot::CotBatch {
            send: mine.0.clone(),
            recv_bits: theirs.1.clone(),
            recv: theirs.2.clone(),
        })
    }
    fn extend_cost(&self, _: usize, _: usize) -> (usize, usize) {
        (0, 0)
    }
    fn name(&self) -> &'static str {
        "dealer (test only)"
    }
}

#[test]
fn relu_trunc_and_argmax_run_unchanged_over_another_random_cot() {
    let r = Ring::new(37).unwrap();
    let x = values(r, 100, 12);
    let (x0, x1) = share(r, &x, 13);
    let go = move |party: Party, mut ch: MemoryChannel, xs: Vec<u64>| {
        let mut rng = ChaCha12Rng::seed_from_u64(party as u64);
        let ot = crate::ot::OtSession::new(DealerCot::new(party), party, [7; 32]);
        let cfg = MpcConfig {
            kn: KkotConfig::FromCots,
            ..MpcConfig::default()
        };
        let mut s = MpcSession::from_ot(ot, cfg, &mut rng).unwrap();
        let a = s.relu(&mut ch, r, &xs).unwrap();
        let b = s.relu_trunc(&mut ch, r, &xs, 12).unwrap();
        let t = s.trunc(&mut ch, r, &xs, 12).unwrap();
        let c = s.argmax(&mut ch, r, &t, 10).unwrap();
        (a, b, c)
    };
    let (a, b) = memory_pair();
    let h = std::thread::spawn(move || go(Party::Client, b, x1));
    let s = go(Party::Server, a, x0);
    let c = h.join().unwrap();
    let open = |u: &[u64], v: &[u64]| -> Vec<u64> {
        u.iter().zip(v).map(|(&a, &b)| r.add(a, b)).collect()
    };
    let relu = open(&s.0, &c.0);
    let rt = open(&s.1, &c.1);
    let am = open(&s.2, &c.2);
    for i in 0..x.len() {
        assert_eq!(relu[i], r.from_signed(r.to_signed(x[i]).max(0)));
        assert_eq!(rt[i], r.from_signed((r.to_signed(x[i]) >> 12).max(0)));
    }
    for (k, row) in x.chunks(10).enumerate() {
        let t: Vec<u64> = row.iter().map(|&v| ashr(r, v, 12)).collect();
        assert_eq!(am[k] as usize, first_argmax(r, &t));
    }
}

#[test]
fn one_of_n_reply_with_nonzero_padding_is_malformed() {
    let ((_, _), (res, _)) = run(
        cfg(4, KkotConfig::Kk13),
        |s, ch| {
            let msg = ch.recv().unwrap();
            let mut e = s.ot().kn_respond(&msg, 3, 1, 1, |_, _| 0).unwrap(); // 6 bits: 2 padding bits
            e[0] |= 0x80;
            ch.send_vec(e).unwrap();
        },
        |s, ch| {
            let (st, msg) = s.ot().kn_choose(&[0, 1, 0], 1, 1).unwrap();
            ch.send_vec(msg).unwrap();
            let e = ch.recv().unwrap();
            s.ot().kn_finish(st, 3, 1, &e, 1).err()
        },
    );
    assert!(
        matches!(
            res,
            Some(crate::ot::OtError::Malformed {
                what: "1-of-N reply",
                ..
            })
        ),
        "{res:?}"
    );
}

#[test]
fn one_session_serves_many_operations_with_default_buffering() {
    for ot in OTS {
        let r = Ring::new(37).unwrap();
        let sizes = [1usize, 5000, 3, 700];
        let xs: Vec<Vec<u64>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| values(r, n, 200 + k as u64)[..n].to_vec())
            .collect();
        let shares: Vec<(Vec<u64>, Vec<u64>)> = xs
            .iter()
            .enumerate()
            .map(|(k, x)| share(r, x, 300 + k as u64))
            .collect();
        let s_sh: Vec<Vec<u64>> = shares.iter().map(|p| p.0.clone()).collect();
        let c_sh: Vec<Vec<u64>> = shares.iter().map(|p| p.1.clone()).collect();
        let work = move |s: &mut Sess, ch: &mut Ch, mine: Vec<Vec<u64>>| {
            let mut out = Vec::new();
            for x in &mine {
                out.push(s.relu(ch, r, x).unwrap());
                out.push(s.relu_trunc(ch, r, x, 12).unwrap());
                out.push(s.trunc(ch, r, x, 12).unwrap());
            }
            (out, s.ot().available())
        };
        let cfg = match ot {
            Ot::Iknp => MpcConfig::default(),
            Ot::Ferret => MpcConfig::recommended(OtKind::Ferret),
        };
        let ((s_out, _), (c_out, _)) = run_on(
            ot,
            cfg,
            move |s, ch| work(s, ch, s_sh),
            move |s, ch| work(s, ch, c_sh),
        );
        assert_eq!(s_out.1, (c_out.1.1, c_out.1.0)); // buffers mirror each other
        for (k, x) in xs.iter().enumerate() {
            let o = |j: usize| -> Vec<u64> {
                s_out.0[3 * k + j]
                    .iter()
                    .zip(&c_out.0[3 * k + j])
                    .map(|(&a, &b)| r.add(a, b))
                    .collect()
            };
            let (relu, rt, t) = (o(0), o(1), o(2));
            for i in 0..x.len() {
                let v = r.to_signed(x[i]);
                assert_eq!(relu[i], r.from_signed(v.max(0)), "{ot:?}");
                assert_eq!(rt[i], r.from_signed((v >> 12).max(0)), "{ot:?}");
                assert_eq!(t[i], r.from_signed(v >> 12), "{ot:?}");
            }
        }
    }
}

#[test]
fn short_ferret_extension_message_is_a_named_error_and_poisons() {
    let r = Ring::new(32).unwrap();
    let x = values(r, 200, 17);
    let ((res, _), _) = run_on(
        Ot::Ferret,
        cfg(4, KkotConfig::FromCots),
        move |s, ch| {
            let e = s.relu(ch, r, &x);
            let again = s.relu(ch, r, &[1]);
            (e, again, s.is_poisoned())
        },
        |_s, ch| {
            // a peer whose SPCOT message is cut short; it takes whatever the server sends
            // (one message per Ferret iteration) until the server hangs up
            let _ = ch.send(&[0u8; 10]);
            while ch.recv().is_ok() {}
        },
    );
    assert!(
        matches!(
            res.0,
            Err(MpcError::Ot(crate::ot::OtError::Message {
                what: "Ferret SPCOT messages",
                ..
            }))
        ),
        "{:?}",
        res.0
    );
    assert!(matches!(res.1, Err(MpcError::Poisoned)));
    assert!(res.2);
}

#[test]
fn setup_with_selects_the_core_ot_and_the_recommended_config() {
    assert_eq!(OtKind::default(), OtKind::Ferret);
    assert_eq!(MpcConfig::recommended(OtKind::Iknp), MpcConfig::default());
    assert_eq!(
        MpcConfig::recommended(OtKind::Ferret).kn,
        KkotConfig::FromCots
    );
    // IKNP through setup_with (the product entry point) runs the protocols as `setup` does
    let r = Ring::new(16).unwrap();
    let x = values(r, 40, 2);
    let (x0, x1) = share(r, &x, 3);
    let go = move |party: Party, mut ch: MemoryChannel, xs: Vec<u64>| {
        let mut rng = ChaCha12Rng::seed_from_u64(party as u64);
        let cfg = MpcConfig::recommended(OtKind::Iknp);
        let mut s = MpcSession::setup_with(&mut ch, party, cfg, OtKind::Iknp, &mut rng).unwrap();
        let name = s.ot().ot_name();
        (s.relu(&mut ch, r, &xs).unwrap(), name)
    };
    let (a, b) = memory_pair();
    let h = std::thread::spawn(move || go(Party::Client, b, x1));
    let (y0, name) = go(Party::Server, a, x0);
    let (y1, _) = h.join().unwrap();
    assert_eq!(name, "iknp");
    for i in 0..x.len() {
        assert_eq!(r.add(y0[i], y1[i]), r.from_signed(r.to_signed(x[i]).max(0)));
    }
}
