//! Tests of the OT session and every derived OT, both parties in-process.
#![allow(clippy::needless_range_loop)] // tests index parallel arrays

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

use super::*;
use crate::channel::{Channel, CostReport, Counting, MemoryChannel, memory_pair};
use crate::ring::Ring;

type Ch = Counting<MemoryChannel>;

/// Runs `s` as the server and `c` as the client on two threads over a counted memory pair,
/// each with its own OT session (IKNP, 1-of-N as `kk`); returns both results and reports
/// of the traffic after setup (counted afresh, so the first flight counts as a round).
pub(crate) fn run_pair<A: Send + 'static, B: Send + 'static>(
    kk: KkotConfig,
    s: impl FnOnce(&mut OtSession, &mut Ch) -> A + Send + 'static,
    c: impl FnOnce(&mut OtSession, &mut Ch) -> B + Send + 'static,
) -> ((A, CostReport), (B, CostReport)) {
    let (a, b) = memory_pair();
    let h = std::thread::spawn(move || {
        let mut ch = Counting::new(b);
        let mut rng = ChaCha12Rng::seed_from_u64(22);
        let mut ot = OtSession::setup_iknp(&mut ch, Party::Client, kk, &mut rng).unwrap();
        let mut ch = Counting::new(ch.into_parts().0);
        ch.set_step("op");
        let r = c(&mut ot, &mut ch);
        (r, ch.report())
    });
    let mut ch = Counting::new(a);
    let mut rng = ChaCha12Rng::seed_from_u64(11);
    let mut ot = OtSession::setup_iknp(&mut ch, Party::Server, kk, &mut rng).unwrap();
    let mut ch = Counting::new(ch.into_parts().0);
    ch.set_step("op");
    let r = s(&mut ot, &mut ch);
    let rs = (r, ch.report());
    (rs, h.join().unwrap())
}

fn op(r: &CostReport) -> crate::channel::StepCost {
    r.total_with_prefix("op")
}

#[test]
fn rot_keys_match_choice_and_reserve_costs_one_flight() {
    let ((s, rs), (c, rc)) = run_pair(
        KkotConfig::FromCots,
        |ot, ch| {
            ot.set_min_batch(1000);
            ot.reserve(ch, 300, 0).unwrap();
            ot.reserve(ch, 300, 0).unwrap(); // buffered: no traffic
            ot.rot_send(300).unwrap()
        },
        |ot, ch| {
            ot.set_min_batch(1000);
            ot.reserve(ch, 0, 300).unwrap();
            ot.reserve(ch, 0, 300).unwrap();
            let r = ot.rot_recv(300).unwrap();
            (r.bits.clone(), r.keys.clone())
        },
    );
    for i in 0..300 {
        assert_eq!(c.1[i], s[i][c.0[i] as usize]);
        assert_ne!(c.1[i], s[i][1 - c.0[i] as usize]);
    }
    // min batch 1000 -> 1024 COTs = 16 KiB, one flight client -> server.
    assert_eq!(
        (op(&rs).bytes_received, op(&rs).bytes_sent, op(&rs).rounds),
        (16 * 1024, 0, 1)
    );
    assert_eq!((op(&rc).bytes_sent, op(&rc).rounds), (16 * 1024, 1));
}

#[test]
fn chosen_cot_gives_arithmetic_correlation_at_every_width() {
    for bits in [1u32, 16, 32, 37, 62, 64] {
        let ring = Ring::new(bits).unwrap();
        let n = 200;
        let mut rng = ChaCha12Rng::seed_from_u64(bits as u64);
        let corr: Vec<u64> = (0..2 * n).map(|_| ring.random(&mut rng)).collect();
        let choices: Vec<u8> = (0..n).map(|i| (i % 3 == 0) as u8).collect();
        let cr = corr.clone();
        let ch2 = choices.clone();
        let ((r, rs), (y, rc)) = run_pair(
            KkotConfig::FromCots,
            move |ot, ch| {
                ot.reserve(ch, n, 0).unwrap();
                let d = ch.recv().unwrap();
                let (r, t) = ot.cot_respond(ring, &d, &cr, 2).unwrap();
                ch.send_vec(t).unwrap();
                r
            },
            move |ot, ch| {
                ot.reserve(ch, 0, n).unwrap();
                let (st, d) = ot.cot_choose(&ch2).unwrap();
                ch.send_vec(d).unwrap();
                let t = ch.recv().unwrap();
                ot.cot_finish(st, ring, &t, 2).unwrap()
            },
        );
        for i in 0..n {
            for v in 0..2 {
                let want = ring.add(
                    r[2 * i + v],
                    if choices[i] == 1 { corr[2 * i + v] } else { 0 },
                );
                assert_eq!(y[2 * i + v], want, "l={bits} i={i}");
            }
        }
        // extension 4096 COTs (min batch) + n/8 choice bits + 2n·l bits of reply
        let ext = 16 * 4096u64;
        let d = (n as u64).div_ceil(8);
        let t = ring.packed_len(2 * n) as u64;
        assert_eq!(op(&rc).bytes_sent, ext + d);
        assert_eq!(op(&rc).bytes_received, t);
        assert_eq!(op(&rs).bytes_sent, t);
        assert_eq!(op(&rc).rounds, 2); // client: [ext, d] then [t]
    }
}

#[test]
fn chosen_message_ot_and_truncated_reply_error() {
    let n = 150;
    let ((_, _), (res, _)) = run_pair(
        KkotConfig::FromCots,
        move |ot, ch| {
            ot.reserve(ch, n, 0).unwrap();
            let d = ch.recv().unwrap();
            let msgs: Vec<[u64; 2]> = (0..n as u64).map(|i| [i, 1000 + i]).collect();
            let e = ot.ot_respond(&d, &msgs, 11).unwrap();
            ch.send_vec(e.clone()).unwrap();
            ch.send_vec(e[..e.len() - 1].to_vec()).unwrap();
        },
        move |ot, ch| {
            ot.reserve(ch, 0, 2 * n).unwrap();
            let choices: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
            let (st, d) = ot.cot_choose(&choices).unwrap();
            ch.send_vec(d).unwrap();
            let e = ch.recv().unwrap();
            let x = ot.ot_finish(st, &e, 11).unwrap();
            let (st2, _) = ot.cot_choose(&choices).unwrap();
            let bad = ch.recv().unwrap();
            (x, ot.ot_finish(st2, &bad, 11))
        },
    );
    for (i, &x) in res.0.iter().enumerate() {
        assert_eq!(
            x,
            if i % 2 == 1 {
                1000 + i as u64
            } else {
                i as u64
            }
        );
    }
    assert!(matches!(
        res.1,
        Err(OtError::Malformed {
            what: "OT reply",
            ..
        })
    ));
}

fn one_of_n(kk: KkotConfig, m: u32, bits: u32) {
    let n = 300;
    let big_n = 1usize << m;
    let mut rng = ChaCha12Rng::seed_from_u64(5);
    let ring = Ring::new(bits).unwrap();
    let table: Vec<u64> = (0..n * big_n).map(|_| ring.random(&mut rng)).collect();
    let choices: Vec<u16> = (0..n).map(|i| ((i * 7 + 3) % big_n) as u16).collect();
    let (t2, c2) = (table.clone(), choices.clone());
    let ((_, rs), (got, rc)) = run_pair(
        kk,
        move |ot, ch| {
            let need = ot.kn_cots(n, m);
            ot.reserve(ch, need, 0).unwrap();
            let len = ot.kn_choose_len(n, m);
            let msg = ch.recv_exact(len).unwrap();
            let e = ot
                .kn_respond(&msg, n, m, bits, |i, j| t2[i * big_n + j])
                .unwrap();
            ch.send_vec(e).unwrap();
        },
        move |ot, ch| {
            let need = ot.kn_cots(n, m);
            ot.reserve(ch, 0, need).unwrap();
            let (st, msg) = ot.kn_choose(&c2, m, bits).unwrap();
            ch.send_vec(msg).unwrap();
            let e = ch.recv().unwrap();
            ot.kn_finish(st, n, m, &e, bits).unwrap()
        },
    );
    for i in 0..n {
        assert_eq!(
            got[i],
            table[i * big_n + choices[i] as usize],
            "m={m} i={i}"
        );
    }
    let reply = ((n * big_n) as u64 * bits as u64).div_ceil(8);
    let choose = match kk {
        KkotConfig::Kk13 => (n as u64).div_ceil(128) * 128 * 32,
        KkotConfig::FromCots => {
            16 * ((n * m as usize).max(4096) as u64).div_ceil(128) * 128
                + (n as u64 * m as u64).div_ceil(8)
        }
    };
    assert_eq!(op(&rc).bytes_sent, choose, "{kk:?} m={m}");
    assert_eq!(op(&rc).bytes_received, reply);
    assert_eq!(op(&rs).rounds, 2);
}

#[test]
fn one_of_n_from_cots_is_correct_with_counted_bytes() {
    for m in [1, 2, 4, 6] {
        one_of_n(KkotConfig::FromCots, m, 2);
    }
    one_of_n(KkotConfig::FromCots, 3, 37);
    // pads cut from several hash blocks, slices straddling block boundaries
    one_of_n(KkotConfig::FromCots, 5, 37);
    one_of_n(KkotConfig::FromCots, 7, 3);
    one_of_n(KkotConfig::FromCots, 8, 64);
}

#[test]
fn one_of_n_kk13_is_correct_with_counted_bytes() {
    for m in [1, 3, 4, 6, 8] {
        one_of_n(KkotConfig::Kk13, m, 2);
    }
    one_of_n(KkotConfig::Kk13, 2, 64);
}

#[test]
fn kk13_truncated_matrix_is_a_named_error_and_poisons() {
    let ((r, _), _) = run_pair(
        KkotConfig::Kk13,
        |ot, ch| {
            let msg = ch.recv().unwrap();
            let e = ot.kn_respond(&msg[1..], 10, 4, 2, |_, _| 0);
            let poisoned = ot.is_poisoned();
            let again = ot.reserve(ch, 1, 0);
            (e, poisoned, again)
        },
        |ot, ch| {
            let (_st, msg) = ot.kn_choose(&[1; 10], 4, 2).unwrap();
            ch.send_vec(msg).unwrap();
        },
    );
    assert!(matches!(
        r.0,
        Err(OtError::Message {
            what: "KK13 extension matrix",
            ..
        })
    ));
    assert!(r.1);
    assert!(matches!(r.2, Err(OtError::Poisoned)));
}

#[test]
fn use_without_reserve_is_refused() {
    let ((r, _), _) = run_pair(
        KkotConfig::FromCots,
        |ot, _| ot.rot_send(10).err(),
        |_, _| (),
    );
    assert!(matches!(r, Some(OtError::BadRequest(_))));
}

#[test]
fn one_of_n_from_cots_pads_have_no_linear_relation() {
    // With all-zero tables the reply is the pads. A 1-of-4 OT from 2 ROTs with
    // pad_j = H(K_{0,j_0}) ⊕ H(K_{1,j_1}) would give pad_00 ⊕ pad_01 ⊕ pad_10 ⊕ pad_11 = 0
    // and leak the XOR of the unchosen messages; slices of one string per key do not.
    let n = 64;
    let ((_, _), (reply, _)) = run_pair(
        KkotConfig::FromCots,
        move |ot, ch| {
            ot.reserve(ch, 2 * n, 0).unwrap();
            let msg = ch.recv_exact(ot.kn_choose_len(n, 2)).unwrap();
            let e = ot.kn_respond(&msg, n, 2, 32, |_, _| 0).unwrap();
            ch.send_vec(e).unwrap();
        },
        move |ot, ch| {
            ot.reserve(ch, 0, 2 * n).unwrap();
            let (_st, msg) = ot.kn_choose(&vec![1; n], 2, 32).unwrap();
            ch.send_vec(msg).unwrap();
            ch.recv().unwrap()
        },
    );
    let pads = Ring::new(32).unwrap().unpack(&reply, 4 * n).unwrap();
    for p in pads.chunks(4) {
        assert_ne!(p[0] ^ p[1] ^ p[2] ^ p[3], 0);
        let distinct: std::collections::HashSet<_> = p.iter().collect();
        assert_eq!(distinct.len(), 4);
    }
}

#[test]
fn every_operation_zeroizes_the_cots_it_uses_at_once() {
    // one session per party, every kind of use on it; the COTs left stay
    let (n, m, bits) = (100, 2, 4);
    let ring = Ring::new(16).unwrap();
    let ((s, _), (c, _)) = run_pair(
        KkotConfig::FromCots,
        move |ot, ch| {
            ot.reserve(ch, 2000, 0).unwrap();
            let _ = ot.rot_send(n).unwrap();
            let d = ch.recv().unwrap();
            let corr: Vec<u64> = (0..n as u64).collect();
            let (_, t) = ot.cot_respond(ring, &d, &corr, 1).unwrap();
            ch.send_vec(t).unwrap();
            let d = ch.recv().unwrap();
            let msgs: Vec<[u64; 2]> = (0..n as u64).map(|i| [i, i + 1]).collect();
            ch.send_vec(ot.ot_respond(&d, &msgs, 8).unwrap()).unwrap();
            let msg = ch.recv().unwrap();
            let e = ot.kn_respond(&msg, n, m, bits, |i, j| (i + j) as u64 % 16);
            ch.send_vec(e.unwrap()).unwrap();
            let msg = ch.recv().unwrap();
            let e = ot.kn_respond_row(&msg, n, m, bits, |i| i as u128);
            ch.send_vec(e.unwrap()).unwrap();
            (ot.nonzero_used_unused(), ot.available())
        },
        move |ot, ch| {
            ot.reserve(ch, 0, 2000).unwrap();
            let _ = ot.rot_recv(n).unwrap();
            let choices: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
            let (st, d) = ot.cot_choose(&choices).unwrap();
            ch.send_vec(d).unwrap();
            let _ = ot.cot_finish(st, ring, &ch.recv().unwrap(), 1).unwrap();
            let (st, d) = ot.cot_choose(&choices).unwrap();
            ch.send_vec(d).unwrap();
            let _ = ot.ot_finish(st, &ch.recv().unwrap(), 8).unwrap();
            let kn: Vec<u16> = (0..n).map(|i| (i % 4) as u16).collect();
            for _ in 0..2 {
                let (st, msg) = ot.kn_choose(&kn, m, bits).unwrap();
                ch.send_vec(msg).unwrap();
                let _ = ot.kn_finish(st, n, m, &ch.recv().unwrap(), bits).unwrap();
            }
            (ot.nonzero_used_unused(), ot.available())
        },
    );
    // used: 3n single COTs and 2n·m for the 1-of-N OTs, of 4,096 (the default min batch)
    let used = 3 * n + 2 * n * m as usize;
    assert_eq!(s.1, (4096 - used, 0));
    assert_eq!(c.1, (0, 4096 - used));
    // nothing of the used ones is left in the buffers, the unused ones are there
    assert_eq!(s.0.0, 0);
    assert_eq!(c.0.0, 0);
    assert!(s.0.1 > 4000 - used && c.0.1 > 4000 - used, "{s:?} {c:?}");
}
