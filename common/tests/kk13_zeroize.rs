//! The 1-of-N OTs leave no pad behind in freed heap memory: every block the process frees
//! while the protocol runs is held back (not returned to the system) and, once both
//! parties are done, searched for the pads of the OTs. A pad of OT i, message j is
//! `reply(i, j) ⊕ table(i, j)` (64-bit messages, so the whole low half of the 128-bit pad
//! block), known to this test from the sender's table and the reply; the reply itself,
//! the tables and the outputs stay alive in the test, so only a copy of a pad that was
//! freed without being zeroized can match.
//!
//! This is the in-memory counterpart of `every_operation_zeroizes_the_cots_it_uses_at_once`
//! (`ot/tests.rs`, which checks the COT buffers): it covers the per-OT buffers that are
//! local to an operation (KK13's pad and row buffers on both sides, the receiver's pads of
//! the COT-based construction), which no debug accessor can see once they are dropped.
//! The chosen-message 1-of-2 OTs (`cot_choose` / `ot_respond` / `ot_finish`) are checked
//! the same way, for their pads and for the receiver's random choice bits (which, with the
//! corrections on the wire, give its choices), and IKNP's set-up for copies of Δ's bits
//! (its base-OT choices).
//!
//! The test allocator is the only `unsafe` of this file: a `GlobalAlloc` over `System`
//! that quarantines freed blocks while armed, and the read of those blocks (still owned by
//! the test: they were never handed back) before they are freed.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Freed blocks held back at most (more are freed at once and counted).
const SLOTS: usize = 1 << 16;

static ARMED: AtomicBool = AtomicBool::new(false);
static NEXT: AtomicUsize = AtomicUsize::new(0);
static OVERFLOW: AtomicUsize = AtomicUsize::new(0);
static PTRS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ALIGNS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// One armed run at a time (the test harness may run tests on several threads).
static RUN: Mutex<()> = Mutex::new(());

struct Quarantine;

// SAFETY: every call is forwarded to `System` with the caller's pointer and layout; a
// block freed while armed is only kept (with its layout) and freed by `release` later,
// exactly once.
unsafe impl GlobalAlloc for Quarantine {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::SeqCst) {
            let k = NEXT.fetch_add(1, Ordering::SeqCst);
            if k < SLOTS {
                SIZES[k].store(layout.size(), Ordering::SeqCst);
                ALIGNS[k].store(layout.align(), Ordering::SeqCst);
                PTRS[k].store(ptr as usize, Ordering::SeqCst);
                return;
            }
            OVERFLOW.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: `ptr` was allocated by `System` with `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Quarantine = Quarantine;

/// Disarms, then calls `f` on the bytes of every held block and frees them all.
fn release(mut f: impl FnMut(&[u8])) {
    ARMED.store(false, Ordering::SeqCst);
    let n = NEXT.swap(0, Ordering::SeqCst).min(SLOTS);
    for k in 0..n {
        let ptr = PTRS[k].swap(0, Ordering::SeqCst) as *mut u8;
        let (size, align) = (
            SIZES[k].load(Ordering::SeqCst),
            ALIGNS[k].load(Ordering::SeqCst),
        );
        if ptr.is_null() {
            continue;
        }
        if size > 0 {
            // SAFETY: the block was allocated with `size` bytes and never freed: held
            // here since its `dealloc`, nothing else refers to it.
            f(unsafe { std::slice::from_raw_parts(ptr, size) });
        }
        // SAFETY: as in `dealloc`: allocated by `System` with this layout, freed once.
        unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, align)) }
    }
}

// The helpers below panic on failure like the tests themselves (clippy's test
// allowances cover `#[cfg(test)]` code).
#[cfg(test)]
mod tests {
    use super::*;
    use fusion_common::channel::{Channel, memory_pair};
    use fusion_common::ot::{KkotConfig, OtSession, Party};
    use fusion_common::ring::Ring;
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;
    use std::collections::HashSet;

    /// The sender's messages: high-entropy values (a 0 message would put a pad on the wire).
    fn table(i: usize, j: usize) -> u64 {
        ((i as u64) << 8 | j as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29)
            ^ 0xD6E8_FEB8_6659_FD93
    }

    /// Runs `n` 1-of-2^m OTs of 64-bit messages (`kk` the construction) with every free held
    /// back; returns the pads found in freed memory (and how many pads there were).
    fn pads_left_in_freed_memory(kk: KkotConfig, n: usize, m: u32) -> (usize, usize) {
        let _one = RUN.lock().unwrap_or_else(|e| e.into_inner());
        let big_n = 1usize << m;
        let choices: Vec<u16> = (0..n).map(|i| ((i * 7 + 3) % big_n) as u16).collect();
        OVERFLOW.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        let (a, b) = memory_pair();
        let sender = std::thread::spawn(move || {
            let mut ch = a;
            let mut rng = ChaCha12Rng::seed_from_u64(11);
            let mut ot = OtSession::setup_iknp(&mut ch, Party::Server, kk, &mut rng).unwrap();
            ot.reserve(&mut ch, n * m as usize, 0).unwrap();
            let msg = ch.recv().unwrap();
            let reply = ot.kn_respond(&msg, n, m, 64, table).unwrap();
            ch.send_vec(reply).unwrap();
        });
        let mut ch = b;
        let mut rng = ChaCha12Rng::seed_from_u64(22);
        let mut ot = OtSession::setup_iknp(&mut ch, Party::Client, kk, &mut rng).unwrap();
        ot.reserve(&mut ch, 0, n * m as usize).unwrap();
        let (st, msg) = ot.kn_choose(&choices, m, 64).unwrap();
        ch.send_vec(msg).unwrap();
        let reply = ch.recv().unwrap();
        let got = ot.kn_finish(st, n, m, &reply, 64).unwrap();
        sender.join().unwrap();
        drop(ot);
        drop(ch);
        // the reply's entries (kept alive until the search)
        let words = Ring::new(64).unwrap().unpack(&reply, n * big_n).unwrap();
        // the control: one pad freed without zeroizing, as a pad block, must be found
        let canary = words[5 * big_n + 1] ^ table(5, 1);
        drop(vec![u128::from(canary) | (7 << 64); 1]);
        ARMED.store(false, Ordering::SeqCst);
        // every pad of every OT (the sender's N, of which the receiver's is one), collected
        // once nothing is held back any more (the set's own growth frees copies of them)
        let pads: HashSet<u64> = (0..n)
            .flat_map(|i| (0..big_n).map(move |j| (i, j)))
            .map(|(i, j)| words[i * big_n + j] ^ table(i, j))
            .collect();
        assert_eq!(OVERFLOW.load(Ordering::SeqCst), 0, "more frees than slots");
        // the OTs worked
        for (i, (&g, &c)) in got.iter().zip(&choices).enumerate() {
            assert_eq!(g, table(i, usize::from(c)), "OT {i}");
        }
        assert_eq!(pads.len(), n * big_n, "pads are distinct");
        let mut found = HashSet::new();
        release(|bytes| {
            for w in bytes.windows(8) {
                let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                if pads.contains(&v) {
                    found.insert(v);
                }
            }
        });
        assert!(found.contains(&canary), "the control pad was not found");
        (found.len() - 1, pads.len())
    }

    /// Runs `n` chosen-message 1-of-2 OTs of 64-bit messages (`cot_choose`, `ot_respond`,
    /// `ot_finish`, the OTs the MUX, B2A and truncation steps use) with every free held
    /// back; returns the pads (`e_{i,b} ⊕ x_{i,b}`) found in freed memory, the runs of 64
    /// of the receiver's random choice bits `b = c ⊕ d` (one per byte, as the COT buffers
    /// hold them) found there, and how many of each there were.
    fn chosen_ot_secrets_left_in_freed_memory(n: usize) -> (usize, usize, usize, usize) {
        const RUN_LEN: usize = 64;
        let _one = RUN.lock().unwrap_or_else(|e| e.into_inner());
        // pseudo-random choices (so that the random bits b are not a pattern)
        let choices: Vec<u8> = (0..n).map(|i| (table(i, 9) >> 17) as u8 & 1).collect();
        OVERFLOW.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        let (a, b) = memory_pair();
        let sender = std::thread::spawn(move || {
            let mut ch = a;
            let mut rng = ChaCha12Rng::seed_from_u64(11);
            let mut ot =
                OtSession::setup_iknp(&mut ch, Party::Server, KkotConfig::FromCots, &mut rng)
                    .unwrap();
            ot.reserve(&mut ch, n, 0).unwrap();
            let msg = ch.recv().unwrap();
            let msgs: Vec<[u64; 2]> = (0..n).map(|i| [table(i, 0), table(i, 1)]).collect();
            let reply = ot.ot_respond(&msg, &msgs, 64).unwrap();
            ch.send_vec(reply).unwrap();
        });
        let mut ch = b;
        let mut rng = ChaCha12Rng::seed_from_u64(22);
        let mut ot =
            OtSession::setup_iknp(&mut ch, Party::Client, KkotConfig::FromCots, &mut rng).unwrap();
        ot.reserve(&mut ch, 0, n).unwrap();
        let (st, msg) = ot.cot_choose(&choices).unwrap();
        ch.send_vec(msg.clone()).unwrap();
        let reply = ch.recv().unwrap();
        let got = ot.ot_finish(st, &reply, 64).unwrap();
        sender.join().unwrap();
        drop(ot);
        drop(ch);
        // the reply's entries and the corrections d (kept alive until the search)
        let words = Ring::new(64).unwrap().unpack(&reply, 2 * n).unwrap();
        let d = fusion_common::ring::unpack_bit_bytes(&msg, n).unwrap();
        // the control: one pad freed without zeroizing, as a pad block, must be found
        let canary = words[2 * 5 + 1] ^ table(5, 1);
        drop(vec![u128::from(canary) | (7 << 64); 1]);
        ARMED.store(false, Ordering::SeqCst);
        let pads: HashSet<u64> = (0..n)
            .flat_map(|i| (0..2).map(move |j| (i, j)))
            .map(|(i, j)| words[2 * i + j] ^ table(i, j))
            .collect();
        // the receiver's random choice bits, in runs of RUN_LEN, keyed by their first 8
        let bits: Vec<u8> = choices.iter().zip(&d).map(|(&c, &e)| c ^ e).collect();
        let runs: Vec<&[u8]> = bits.chunks_exact(RUN_LEN).collect();
        let mut by_prefix: std::collections::HashMap<[u8; 8], Vec<usize>> = Default::default();
        for (k, r) in runs.iter().enumerate() {
            by_prefix
                .entry(r[..8].try_into().unwrap())
                .or_default()
                .push(k);
        }
        assert_eq!(OVERFLOW.load(Ordering::SeqCst), 0, "more frees than slots");
        // the OTs worked
        for (i, (&g, &c)) in got.iter().zip(&choices).enumerate() {
            assert_eq!(g, table(i, usize::from(c)), "OT {i}");
        }
        assert_eq!(pads.len(), 2 * n, "pads are distinct");
        let (mut found, mut found_runs) = (HashSet::new(), HashSet::new());
        release(|bytes| {
            for w in bytes.windows(8) {
                let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                if pads.contains(&v) {
                    found.insert(v);
                }
            }
            for (at, w) in bytes.windows(8).enumerate() {
                let key: [u8; 8] = w.try_into().unwrap_or([0; 8]);
                for &k in by_prefix.get(&key).into_iter().flatten() {
                    if bytes.get(at..at + RUN_LEN) == Some(runs[k]) {
                        found_runs.insert(k);
                    }
                }
            }
        });
        assert!(found.contains(&canary), "the control pad was not found");
        (found.len() - 1, pads.len(), found_runs.len(), runs.len())
    }

    #[test]
    fn chosen_one_of_two_ot_leaves_no_pad_or_choice_bits_in_freed_memory() {
        let (found, pads, runs_found, runs) = chosen_ot_secrets_left_in_freed_memory(2048);
        assert_eq!((pads, runs), (4096, 32));
        assert_eq!(found, 0, "{found} of {pads} pads left in freed memory");
        assert_eq!(
            runs_found, 0,
            "{runs_found} of {runs} runs of the receiver's random choice bits left in freed memory"
        );
    }

    /// Sets up IKNP in both directions with every free held back; returns how many
    /// copies of the server's Δ as base-OT choice bits (128 bytes of 0/1, as `Vec<bool>`)
    /// were found in freed memory.
    fn delta_bits_left_in_freed_memory() -> usize {
        use fusion_common::ot::{Iknp, RandomCot};
        let _one = RUN.lock().unwrap_or_else(|e| e.into_inner());
        OVERFLOW.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        let (a, b) = memory_pair();
        let server = std::thread::spawn(move || {
            let mut ch = a;
            let mut rng = ChaCha12Rng::seed_from_u64(11);
            Iknp::setup(&mut ch, Party::Server, &mut rng).unwrap()
        });
        let mut ch = b;
        let mut rng = ChaCha12Rng::seed_from_u64(22);
        let client = Iknp::setup(&mut ch, Party::Client, &mut rng).unwrap();
        let server = server.join().unwrap();
        let delta = server.delta();
        drop(ch);
        // the control: Δ's bits freed without zeroizing must be found
        let bits: Vec<u8> = (0..128).map(|j| ((delta >> j) & 1) as u8).collect();
        drop(bits.iter().map(|&b| b == 1).collect::<Vec<bool>>());
        ARMED.store(false, Ordering::SeqCst);
        assert_eq!(OVERFLOW.load(Ordering::SeqCst), 0, "more frees than slots");
        let mut found = 0;
        release(|bytes| {
            found += bytes.windows(128).filter(|w| *w == &bits[..]).count();
        });
        // the states are alive (and hold Δ) until here: only freed copies count
        drop((client, server));
        assert!(found >= 1, "the control copy was not found");
        found - 1
    }

    #[test]
    fn iknp_setup_leaves_no_copy_of_delta_bits_in_freed_memory() {
        let found = delta_bits_left_in_freed_memory();
        assert_eq!(found, 0, "{found} copies of Δ's bits left in freed memory");
    }

    #[test]
    fn kk13_one_of_n_leaves_no_pad_in_freed_memory() {
        let (found, pads) = pads_left_in_freed_memory(KkotConfig::Kk13, 1000, 4);
        assert_eq!(pads, 16_000);
        assert_eq!(found, 0, "{found} of {pads} pads left in freed memory");
    }

    #[test]
    fn cot_based_one_of_n_leaves_no_pad_in_freed_memory() {
        let (found, pads) = pads_left_in_freed_memory(KkotConfig::FromCots, 1000, 4);
        assert_eq!(pads, 16_000);
        assert_eq!(found, 0, "{found} of {pads} pads left in freed memory");
    }
}
