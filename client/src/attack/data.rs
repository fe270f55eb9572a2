//! The attacker's data and the evaluation split.
//!
//! MNIST test set (10,000 images):
//! - `0..1000`: the public pool (the server publishes its labels; Fusion's check rows).
//!   The attacks never use it, so that their figures say nothing about the pool.
//! - `1000..2000` ([`ATTACKER`]): the attacker's own few real images; Papernot's 150 seed
//!   images are drawn from here (a seeded random choice).
//! - `2000..10000` ([`EVAL`]): held out for measurement only: the stolen model's test
//!   accuracy (true labels) and its top-1 agreement with the victim. Never queried.
//!
//! The simple baseline ("label N real images") draws its N unlabelled images from the
//! MNIST training set (a seeded random choice): the victim's own training distribution,
//! i.e. the strongest data an attacker could hope for.
//!
//! The victim's labels on the evaluation images come from a local reference copy of the
//! model, evaluated in the oracle's arithmetic (fixed point or f32). They are measurement,
//! not queries, and are not counted (against the real service the lead's experimenter has
//! the bundled model file to measure with).

use anyhow::Context;
use fusion_common::fixed::eval_fixed;
use fusion_common::nn::Model;
use fusion_common::nn::mnist::{self, Dataset, PIXELS, Split};
use ndarray::Array2;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::ops::Range;
use std::path::Path;

/// Test images the attacker may use as its own real data.
pub const ATTACKER: Range<usize> = 1000..2000;
/// Test images held out for evaluation.
pub const EVAL: Range<usize> = 2000..10_000;

/// Which arithmetic the victim is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arithmetic {
    /// the fixed-point evaluator (what the service computes)
    Fixed,
    /// the f32 evaluator
    F32,
}

/// MNIST split for the attacks, with the victim's labels on the evaluation images.
#[derive(Debug, Clone)]
pub struct AttackData {
    /// test images `ATTACKER`
    pub attacker: Dataset,
    /// test images `EVAL`
    pub eval: Dataset,
    /// `eval` as f32 rows in [0, 1]
    pub eval_x: Array2<f32>,
    /// the victim's labels on `eval`
    pub victim_eval_labels: Vec<usize>,
    /// the training images (for the baseline), if loaded
    pub train: Option<Dataset>,
}

impl AttackData {
    /// Loads MNIST from `dir` and labels the evaluation images with `victim`.
    pub fn load(
        dir: &Path,
        victim: &Model,
        arithmetic: Arithmetic,
        with_train: bool,
    ) -> anyhow::Result<Self> {
        let test = mnist::load(dir, Split::Test).context("loading the MNIST test set")?;
        let train = if with_train {
            Some(mnist::load(dir, Split::Train).context("loading the MNIST training set")?)
        } else {
            None
        };
        Self::from_sets(&test, train, victim, arithmetic)
    }

    /// From already loaded sets (`test` must have 10,000 images).
    pub fn from_sets(
        test: &Dataset,
        train: Option<Dataset>,
        victim: &Model,
        arithmetic: Arithmetic,
    ) -> anyhow::Result<Self> {
        let attacker = test.slice(ATTACKER)?;
        let eval = test.slice(EVAL)?;
        let eval_x = eval.to_f32();
        let victim_eval_labels = victim_labels(victim, arithmetic, &eval)?;
        Ok(Self {
            attacker,
            eval,
            eval_x,
            victim_eval_labels,
            train,
        })
    }

    /// `n` attacker images (seeded random choice from `ATTACKER`) as rows in [0, 1].
    pub fn seeds(&self, n: usize, seed: u64) -> Vec<Vec<f32>> {
        pick(&self.attacker, n, seed)
    }

    /// `n` training images (seeded random choice) as rows in [0, 1], for the baseline.
    pub fn real_images(&self, n: usize, seed: u64) -> anyhow::Result<Vec<Vec<f32>>> {
        let train = self
            .train
            .as_ref()
            .context("the baseline needs the MNIST training images")?;
        Ok(pick(train, n, seed))
    }
}

fn pick(d: &Dataset, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    idx.into_iter()
        .take(n)
        .filter_map(|i| d.image(i))
        .map(|img| img.iter().map(|&p| f32::from(p) / 255.0).collect())
        .collect()
}

/// The victim's labels on a dataset in the given arithmetic (pixels encoded exactly as
/// the service encodes them).
pub fn victim_labels(
    victim: &Model,
    arithmetic: Arithmetic,
    d: &Dataset,
) -> anyhow::Result<Vec<usize>> {
    Ok(match arithmetic {
        Arithmetic::Fixed => {
            let fm = victim.fixed_model();
            eval_fixed(fm, &fm.encode_images(d.images()))?.labels
        }
        Arithmetic::F32 => victim.predict_f32(d.to_f32().view())?,
    })
}

/// Accuracy against true labels and agreement with the victim of a stolen model's labels
/// on the evaluation images.
pub fn score(data: &AttackData, labels: &[usize]) -> (f64, f64) {
    let n = labels.len().max(1) as f64;
    let correct = labels
        .iter()
        .zip(data.eval.labels())
        .filter(|&(&a, &b)| a == usize::from(b))
        .count();
    let agree = labels
        .iter()
        .zip(&data.victim_eval_labels)
        .filter(|&(a, b)| a == b)
        .count();
    (correct as f64 / n, agree as f64 / n)
}

/// Rows of `PIXELS` values as an `[n, PIXELS]` array (rows of another width are skipped).
pub fn to_array(rows: &[Vec<f32>]) -> Array2<f32> {
    let ok: Vec<&Vec<f32>> = rows.iter().filter(|r| r.len() == PIXELS).collect();
    let flat: Vec<f32> = ok.iter().flat_map(|r| r.iter().copied()).collect();
    Array2::from_shape_vec((ok.len(), PIXELS), flat).unwrap_or_else(|_| Array2::zeros((0, PIXELS)))
}
