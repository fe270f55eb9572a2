//! Fusion end to end over real mutual TLS: an honest server's batches are verified and
//! equal the evaluator; every cheating strategy (cargo feature `adversary` of
//! fusion-server, enabled for this crate's tests) is caught with real parameters; with
//! tiny parameters the measured escape rate matches the exact probability.
//!
//! The smallest bundled model (784-32-10) keeps the trials cheap. To make every flip
//! effective (a flip to class c leaves a row already labelled c unchanged), the cheating
//! server here aims its flips at class 0 (`@0`), publishes a pool without rows labelled 0
//! (a valid pool: its digest binds it to the model) and the own inputs are images the
//! model does not label 0; then the escape probability is exactly the tuner's
//! `escape_rows`.

mod small;

use std::path::{Path, PathBuf};

use fusion_client::audit::{audit, clopper_pearson};
use fusion_client::verified::{
    FusionError, FusionOptions, Params, PublicRows, SessionOutcomes, run_sessions, run_verified,
};
use fusion_common::fixed::eval_fixed;
use fusion_common::fusion::check::CheckError;
use fusion_common::fusion::tune;
use fusion_common::nn::mnist::{self, Dataset, Split};
use fusion_server::adversary::Strategy;
use fusion_server::state::{Policy, ServedModel};
use fusion_tests::TestServer;
use rand::SeedableRng;
use rand::seq::IndexedRandom;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

const AIM: usize = 0;

fn test_set() -> Dataset {
    mnist::load(repo("data/mnist"), Split::Test).expect("MNIST")
}

/// The small model; with `restrict`, its pool without entries labelled `AIM`.
fn served(restrict: bool) -> ServedModel {
    small::served(restrict.then_some(AIM))
}

async fn start(adversary: Option<&str>, restrict: bool) -> TestServer {
    let policy = Policy {
        max_rows: 4096,
        ..Policy::default()
    };
    small::start(served(restrict), adversary, policy).await
}

/// Private own inputs (test images 1000..) the model does not label `AIM`, with their
/// labels: `n` batches of `b`.
fn own_inputs(test: &Dataset, n: usize, b: usize, seed: u64) -> (Vec<Vec<u8>>, Vec<Vec<usize>>) {
    let model = served(false);
    let fm = model.model.fixed_model();
    let cand: Vec<usize> = (1000..1600).collect();
    let px: Vec<u8> = cand
        .iter()
        .flat_map(|&i| test.image(i).expect("image").to_vec())
        .collect();
    let labels = eval_fixed(fm, &fm.encode_images(&px)).expect("eval").labels;
    let ok: Vec<(usize, usize)> = cand
        .iter()
        .zip(&labels)
        .filter(|(_, l)| **l != AIM)
        .map(|(&i, &l)| (i, l))
        .collect();
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(seed);
    let mut imgs = Vec::new();
    let mut labs = Vec::new();
    for _ in 0..n {
        let pick: Vec<(usize, usize)> = (0..b)
            .map(|_| *ok.choose(&mut rng).expect("candidates"))
            .collect();
        imgs.push(
            pick.iter()
                .flat_map(|(i, _)| test.image(*i).expect("image").to_vec())
                .collect(),
        );
        labs.push(pick.iter().map(|(_, l)| *l).collect());
    }
    (imgs, labs)
}

async fn session(
    s: &TestServer,
    test: &Dataset,
    own: &[Vec<u8>],
    params: Params,
) -> SessionOutcomes {
    let client = s.client().await;
    let info = client.model_info().await.expect("info");
    let public = PublicRows::fetch(&client, &info, test).await.expect("pool");
    let refs: Vec<&[u8]> = own.iter().map(Vec::as_slice).collect();
    // the default confidence of check (c): it tests the published pool labels, the same
    // for every batch, so an honest server is never flagged by chance
    let opts = FusionOptions {
        params,
        ..FusionOptions::default()
    };
    run_sessions(&client, &info, &public, &refs, &opts)
        .await
        .expect("the session runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_server_is_verified_and_never_flagged() {
    let test = test_set();
    let s = start(None, false).await;
    let (own, labels) = own_inputs(&test, 4, 3, 1);
    let out = session(&s, &test, &own, Params::default()).await;
    assert_eq!(out.batches.len(), 4);
    let labels_first = labels[0].clone();
    for (b, want) in out.batches.into_iter().zip(labels) {
        let v = b.expect("an honest batch passes every check");
        assert_eq!(v.labels, want, "verified labels equal the evaluator's");
        // the real parameters: tuned to 2^-40 for B = 3
        assert_eq!((v.setting.t, v.setting.r, v.setting.rows), (13, 14, 55));
        assert!(v.setting.log2_escape <= -40.0);
    }

    // the one-batch call and the audit against the same honest server
    let client = s.client().await;
    let info = client.model_info().await.unwrap();
    let public = PublicRows::fetch(&client, &info, &test).await.unwrap();
    let opts = FusionOptions {
        params: Params::Fixed { t: 1, r: 2 },
        ..FusionOptions::default()
    };
    let (v, _) = run_verified(&client, &info, &public, &own[0], &opts)
        .await
        .unwrap();
    assert_eq!(v.batches.len(), 1);
    assert_eq!(v.batches[0].setting.rows, 7);
    assert_eq!(v.labels, labels_first, "one batch: the evaluator's labels");
    let r = audit(&client, &info, &public, &test, 3, 20, 10, &opts, None)
        .await
        .unwrap();
    assert_eq!((r.trials, r.detected, r.accepted), (20, 0, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_beyond_the_servers_largest_batch_are_verified_in_several_batches() {
    let test = test_set();
    let policy = Policy {
        max_rows: 40,
        ..Policy::default()
    };
    let opts = FusionOptions {
        params: Params::Fixed { t: 2, r: 2 },
        ..FusionOptions::default()
    };
    let (own, labels) = own_inputs(&test, 1, 25, 5);
    // 2 + 2*25 = 52 rows > 40: at most 19 inputs per batch, so 2 batches (13 + 12)
    let honest = small::start(served(false), None, policy.clone()).await;
    let client = honest.client().await;
    let info = client.model_info().await.unwrap();
    assert_eq!(info.max_rows, 40);
    let public = PublicRows::fetch(&client, &info, &test).await.unwrap();
    let (v, s) = run_verified(&client, &info, &public, &own[0], &opts)
        .await
        .expect("an honest server passes every batch");
    let sizes: Vec<(usize, usize)> = v
        .batches
        .iter()
        .map(|b| (b.setting.b, b.setting.rows))
        .collect();
    assert_eq!(sizes, [(13, 28), (12, 26)]);
    assert_eq!(
        v.labels, labels[0],
        "verified labels equal the evaluator's, in input order"
    );
    assert_eq!(
        s.batches.len(),
        0,
        "the outcomes moved into the verified output"
    );
    assert_eq!(
        v.escape(),
        v.batches[0].setting.escape.max(v.batches[1].setting.escape)
    );

    // a server that flips rows is caught in some batch, and nothing is returned
    let cheat = small::start(served(true), Some(&format!("flip-rows:2@{AIM}")), policy).await;
    let client = cheat.client().await;
    let info = client.model_info().await.unwrap();
    let public = PublicRows::fetch(&client, &info, &test).await.unwrap();
    let (own, _) = own_inputs(&test, 1, 25, 6);
    let strong = FusionOptions {
        params: Params::Fixed { t: 6, r: 3 },
        ..opts
    };
    match run_verified(&client, &info, &public, &own[0], &strong).await {
        Err(e) => assert!(e.is_detection(), "{e}"),
        Ok((v, _)) => panic!("a flipping server passed {} batches", v.batches.len()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_does_not_verify_is_refused() {
    let test = test_set();
    let s = start(None, false).await;
    let client = s.client().await;
    let info = client.model_info().await.unwrap();
    let mut pool = client.public_pool().await.unwrap();
    pool.entries[0].label = (pool.entries[0].label + 1) % 10;
    assert!(matches!(
        PublicRows::new(&info, &pool, &test),
        Err(FusionError::Pool(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_is_caught_with_real_parameters() {
    let test = test_set();
    let (own, _) = own_inputs(&test, 2, 3, 2);
    for strategy in Strategy::ALL {
        let name = match strategy {
            Strategy::FlipOne | Strategy::FlipRows(_) | Strategy::Constant => {
                format!("{strategy}@{AIM}")
            }
            _ => strategy.to_string(),
        };
        let s = start(Some(&name), true).await;
        // replay needs an earlier batch to replay: two batches, the first served honestly
        let out = session(&s, &test, &own, Params::default()).await;
        let last = out.batches.into_iter().last().expect("a batch");
        let err = match last {
            Ok(_) => panic!("{name} escaped with real parameters"),
            Err(e) => e,
        };
        assert!(err.is_detection(), "{name}: {err}");
        let FusionError::Detected(c) = &err else {
            unreachable!()
        };
        eprintln!("{name}: {err}");
        match strategy {
            // one altered row: a public row (a) or one copy of an own input (b)
            Strategy::FlipOne => assert!(matches!(
                c,
                CheckError::PublicMismatch { rows: 1, .. }
                    | CheckError::CopiesDisagree {
                        samples: 1,
                        rows: 14,
                        ..
                    }
            )),
            // every row labelled 0, no public row is: all 13 public rows differ
            Strategy::Constant => {
                assert_eq!(*c, CheckError::PublicMismatch { rows: 13, of: 13 })
            }
            _ => assert!(matches!(
                c,
                CheckError::PublicMismatch { .. } | CheckError::CopiesDisagree { .. }
            )),
        }
        s.handle.shutdown().await.unwrap();
    }
}

/// Runs `trials` tiny batches (T = 1, R = 2, B = 3) against `strategy` and checks the
/// number of escapes against the exact probability `p`.
async fn escape_rate(strategy: &str, trials: usize, p: f64, seed: u64) -> (usize, (f64, f64)) {
    let test = test_set();
    let s = start(Some(strategy), true).await;
    let (own, labels) = own_inputs(&test, trials, 3, seed);
    let out = session(&s, &test, &own, Params::Fixed { t: 1, r: 2 }).await;
    let mut escaped = 0;
    for (b, want) in out.batches.into_iter().zip(labels) {
        match b {
            Ok(v) => {
                escaped += 1;
                // an escape is a real one: one own input's result was moved to the aim
                let wrong: Vec<usize> = (0..3).filter(|&i| v.labels[i] != want[i]).collect();
                assert_eq!(wrong.len(), 1, "{:?} vs {want:?}", v.labels);
                assert_eq!(v.labels[wrong[0]], AIM);
            }
            Err(e) => assert!(e.is_detection(), "{e}"),
        }
    }
    let ci99 = clopper_pearson(escaped, trials, 0.99);
    eprintln!(
        "{strategy}: {escaped} escapes in {trials} (rate {:.4}, 99% CI [{:.4}, {:.4}]), exact {p:.4}",
        escaped as f64 / trials as f64,
        ci99.0,
        ci99.1
    );
    s.handle.shutdown().await.expect("shutdown");
    (escaped, ci99)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_parameters_measured_escape_rates_match_the_exact_values() {
    // flip-rows:2 escapes iff its 2 rows are the 2 copies of one own input:
    // C(3,1)/C(7,2) = 3/21 = 1/7 exactly.
    let p = tune::escape_rows(1, 2, 3, 2).to_f64();
    assert!((p - 1.0 / 7.0).abs() < 1e-15);
    let n = 210;
    let (k, ci99) = escape_rate("flip-rows:2@0", n, p, 3).await;
    // The 99% interval is what the audit reports; the assertion uses the 1 - 1e-6
    // interval so that the test fails only on a real discrepancy, not 1% of the time.
    let wide = clopper_pearson(k, n, 1.0 - 1e-6);
    assert!(
        wide.0 <= p && p <= wide.1,
        "{k} escapes of {n}: exact {p} outside [{}, {}] (99%: {ci99:?})",
        wide.0,
        wide.1
    );
    // flip-one can never escape when R >= 2: exactly 0 (one altered copy disagrees)
    assert_eq!(tune::escape_rows(1, 2, 3, 1).to_f64(), 0.0);
    let (k, _) = escape_rate("flip-one@0", 60, 0.0, 4).await;
    assert_eq!(k, 0, "flip-one escaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_parameters_wrong_model_escapes_exactly_when_its_public_row_agrees() {
    // A content-based deviation alters every copy of an input alike, so with T = 1 it
    // escapes iff the drawn public row gets the published label: probability = the weak
    // model's agreement with the published labels over the pool (check (c) cannot fire
    // with T = 1 at confidence 0.999 for a claim below 0.999).
    let test = test_set();
    let model = served(false);
    let weak = fusion_server::adversary::weakened(&model.model, 2).expect("weak model");
    let pool = model.model.public_pool().expect("pool");
    let px: Vec<u8> = pool
        .indices
        .iter()
        .flat_map(|&i| test.image(i as usize).expect("image").to_vec())
        .collect();
    let fm = weak.fixed_model();
    let got = eval_fixed(fm, &fm.encode_images(&px)).expect("eval").labels;
    let agree = got
        .iter()
        .zip(&pool.labels)
        .filter(|(a, b)| **a == **b as usize)
        .count();
    let p = agree as f64 / pool.len() as f64;
    assert!(model.summary.claimed_accuracy < 0.999);

    let s = start(Some("wrong-model"), false).await;
    let n = 150;
    let (own, _) = own_inputs(&test, n, 3, 5);
    let out = session(&s, &test, &own, Params::Fixed { t: 1, r: 2 }).await;
    let mut escaped = 0;
    for b in out.batches {
        match b {
            Ok(_) => escaped += 1,
            Err(FusionError::Detected(CheckError::PublicMismatch { rows: 1, of: 1 })) => {}
            Err(e) => panic!("only check (a) can catch it here: {e}"),
        }
    }
    let ci99 = clopper_pearson(escaped, n, 0.99);
    eprintln!(
        "wrong-model: {escaped} escapes in {n} (99% CI [{:.4}, {:.4}]), exact {p:.4}",
        ci99.0, ci99.1
    );
    let wide = clopper_pearson(escaped, n, 1.0 - 1e-6);
    assert!(wide.0 <= p && p <= wide.1, "{escaped}/{n} vs exact {p}");
    s.handle.shutdown().await.expect("shutdown");
}
