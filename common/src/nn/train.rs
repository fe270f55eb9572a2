//! Training of multi-layer perceptrons (Dense/ReLU, softmax cross-entropy) with ndarray:
//! He initialisation, mini-batch Adam, an optional cosine learning-rate decay, a fresh
//! shuffle every epoch, optional random-shift augmentation of image inputs and optional
//! decoupled weight decay (AdamW). The loss is softmax cross-entropy on labels or, with
//! [`Targets::Outputs`], the mean squared error against target outputs (e.g. a victim's
//! logits, for model extraction); given rows of a dense layer can be held fixed
//! ([`FixedRow`]). Deterministic for a seed: every random choice comes from one
//! ChaCha8 stream seeded with it (bit-identical runs need the same CPU features too, since
//! the matrix kernels may use FMA where available).
//!
//! One step on a mini-batch X (rows are examples):
//! - forward: z_k = a_{k-1} W_k^T + b_k, a_k = max(0, z_k) (not after the last layer),
//!   p = softmax(z_L), loss = mean(-log p_y);
//! - backward: dz_L = (p - onehot(y)) / B; for each layer, dW_k = dz_k^T a_{k-1},
//!   db_k = sum over rows of dz_k, da_{k-1} = dz_k W_k, dz_{k-1} = da_{k-1} * [z_{k-1} > 0];
//! - with target outputs T instead: loss = mean((z_L - T)^2) over the B x C entries,
//!   dz_L = 2 (z_L - T) / (B C);
//! - a fixed row r of layer k: its weights and bias are never updated (no Adam step, no decay);
//! - Adam (Kingma & Ba 2015, Alg. 1): m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
//!   w -= lr_t * m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps).

use super::arch::{ArchError, Architecture};
use super::model::{Tensor, TrainingRecord};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The architecture cannot be built.
    #[error("training: {0}")]
    Architecture(#[from] ArchError),
    /// Examples and labels differ in number, or there are none.
    #[error("training: {examples} examples, {labels} labels")]
    Data {
        /// rows of inputs
        examples: usize,
        /// labels
        labels: usize,
    },
    /// A label outside 0..classes.
    #[error("training: label {label} of example {index} is not below {classes}")]
    Label {
        /// the example
        index: usize,
        /// its label
        label: u8,
        /// number of classes
        classes: usize,
    },
    /// Inputs of the wrong width.
    #[error("training: inputs have {actual} columns, the architecture needs {expected}")]
    InputWidth {
        /// columns expected
        expected: usize,
        /// columns given
        actual: usize,
    },
    /// A bad hyper-parameter.
    #[error("training: {0}")]
    Config(String),
    /// The loss became NaN or infinite.
    #[error("training diverged at step {step} (loss {loss})")]
    Diverged {
        /// the step
        step: usize,
        /// the loss
        loss: f32,
    },
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Cosine decay from the peak rate to zero over all steps.
    Cosine,
}

/// Hyper-parameters of a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Hidden layer widths (e.g. `[128, 128]`).
    pub hidden: Vec<usize>,
    /// Passes over the training set.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Peak learning rate of Adam.
    pub lr: f32,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Seed of the ChaCha8 stream behind initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Data augmentation: shift each image by a random offset of up to this many pixels
    /// in each direction (zero fill), drawn afresh each time it is used; 0 = none. Needs
    /// an image input shape (`[h, w]` or `[1, h, w]`).
    pub shift: usize,
    /// Decoupled weight decay (AdamW, Loshchilov & Hutter 2019) on the weights (not the
    /// biases), scaled by the learning rate's schedule; 0 = none.
    pub weight_decay: f32,
    /// Stop after this many steps (mini-batches) in all, if set.
    pub max_steps: Option<usize>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            hidden: vec![128, 128],
            epochs: 20,
            batch: 128,
            lr: 1e-3,
            schedule: Schedule::Cosine,
            seed: 1,
            shift: 0,
            weight_decay: 0.0,
            max_steps: None,
            progress: false,
        }
    }
}

/// Adam's constants (the paper's defaults).
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// A dense layer being trained, with its Adam moments.
struct Layer {
    w: Array2<f32>,
    b: Array1<f32>,
    mw: Array2<f32>,
    vw: Array2<f32>,
    mb: Array1<f32>,
    vb: Array1<f32>,
    /// rows held fixed (empty: none)
    frozen: Vec<bool>,
}

impl Layer {
    /// He initialisation: W ~ N(0, 2 / inputs), b = 0.
    fn he(inputs: usize, outputs: usize, rng: &mut ChaCha8Rng) -> Self {
        let std = (2.0 / inputs as f64).sqrt();
        let w = Array2::from_shape_simple_fn((outputs, inputs), || (std * normal(rng)) as f32);
        Self {
            w,
            b: Array1::zeros(outputs),
            mw: Array2::zeros((outputs, inputs)),
            vw: Array2::zeros((outputs, inputs)),
            mb: Array1::zeros(outputs),
            vb: Array1::zeros(outputs),
            frozen: Vec::new(),
        }
    }

    fn adam(&mut self, dw: &Array2<f32>, db: &Array1<f32>, lr: f32, decay: f32, t: i32) {
        if !self.frozen.is_empty() {
            self.adam_rows(dw, db, lr, decay, t);
            return;
        }
        if decay > 0.0 {
            self.w.mapv_inplace(|w| w * (1.0 - decay));
        }
        let c1 = 1.0 - BETA1.powi(t);
        let c2 = 1.0 - BETA2.powi(t);
        adam_update(
            self.w.iter_mut(),
            self.mw.iter_mut(),
            self.vw.iter_mut(),
            dw.iter(),
            lr,
            c1,
            c2,
        );
        adam_update(
            self.b.iter_mut(),
            self.mb.iter_mut(),
            self.vb.iter_mut(),
            db.iter(),
            lr,
            c1,
            c2,
        );
    }
}

impl Layer {
    /// As [`Layer::adam`], row by row, skipping the frozen rows.
    fn adam_rows(&mut self, dw: &Array2<f32>, db: &Array1<f32>, lr: f32, decay: f32, t: i32) {
        let c1 = 1.0 - BETA1.powi(t);
        let c2 = 1.0 - BETA2.powi(t);
        for r in 0..self.w.nrows() {
            if self.frozen.get(r).copied().unwrap_or(false) {
                continue;
            }
            let mut w = self.w.row_mut(r);
            if decay > 0.0 {
                w.mapv_inplace(|v| v * (1.0 - decay));
            }
            adam_update(
                w.iter_mut(),
                self.mw.row_mut(r).iter_mut(),
                self.vw.row_mut(r).iter_mut(),
                dw.row(r).iter(),
                lr,
                c1,
                c2,
            );
            adam_update(
                self.b.slice_mut(ndarray::s![r..r + 1]).iter_mut(),
                self.mb.slice_mut(ndarray::s![r..r + 1]).iter_mut(),
                self.vb.slice_mut(ndarray::s![r..r + 1]).iter_mut(),
                db.slice(ndarray::s![r..r + 1]).iter(),
                lr,
                c1,
                c2,
            );
        }
    }
}

fn adam_update<'a>(
    w: impl Iterator<Item = &'a mut f32>,
    m: impl Iterator<Item = &'a mut f32>,
    v: impl Iterator<Item = &'a mut f32>,
    g: impl Iterator<Item = &'a f32>,
    lr: f32,
    c1: f32,
    c2: f32,
) {
    for (((w, m), v), &g) in w.zip(m).zip(v).zip(g) {
        *m = BETA1 * *m + (1.0 - BETA1) * g;
        *v = BETA2 * *v + (1.0 - BETA2) * g * g;
        *w -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
    }
}

/// Shifts every row of `x` (an h x w image) by a random (dy, dx) in [-k, k]^2, filling
/// with zeros.
fn shift_images(x: &mut Array2<f32>, h: usize, w: usize, k: usize, rng: &mut ChaCha8Rng) {
    let k = k as i64;
    let mut src = vec![0.0f32; h * w];
    for mut row in x.axis_iter_mut(Axis(0)) {
        let dy = rng.random_range(-k..=k) as isize;
        let dx = rng.random_range(-k..=k) as isize;
        if dy == 0 && dx == 0 {
            continue;
        }
        for (s, v) in src.iter_mut().zip(row.iter()) {
            *s = *v;
        }
        for (i, out) in row.iter_mut().enumerate() {
            let (r, c) = ((i / w) as isize - dy, (i % w) as isize - dx);
            *out = if (0..h as isize).contains(&r) && (0..w as isize).contains(&c) {
                src[r as usize * w + c as usize]
            } else {
                0.0
            };
        }
    }
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // u1 in (0, 1] so that ln(u1) is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Loss and correct predictions of a batch of logits, and dz = (softmax - onehot) / B.
fn softmax_cross_entropy(logits: &Array2<f32>, labels: &[u8]) -> (f32, usize, Array2<f32>) {
    let n = logits.nrows().max(1) as f32;
    let mut grad = logits.clone();
    let mut loss = 0.0f64;
    let mut correct = 0;
    for (mut row, &y) in grad.axis_iter_mut(Axis(0)).zip(labels) {
        let y = usize::from(y);
        let (mut best, mut max) = (0, f32::NEG_INFINITY);
        for (i, &v) in row.iter().enumerate() {
            if v > max {
                best = i;
                max = v;
            }
        }
        correct += usize::from(best == y);
        row.mapv_inplace(|v| (v - max).exp());
        let sum: f32 = row.sum();
        row.mapv_inplace(|v| v / sum);
        let py = row.get(y).copied().unwrap_or(1.0);
        loss -= f64::from(py.max(1e-30).ln());
        if let Some(g) = row.get_mut(y) {
            *g -= 1.0;
        }
        row.mapv_inplace(|v| v / n);
    }
    ((loss / f64::from(n)) as f32, correct, grad)
}

/// Mean squared error of a batch of outputs against `targets` (same shape), the number
/// of rows whose argmax agrees with the target's, and dz = 2 (z - T) / (B C).
fn mean_squared_error(
    out: &Array2<f32>,
    targets: ArrayView2<'_, f32>,
) -> (f32, usize, Array2<f32>) {
    let n = out.len().max(1) as f32;
    let diff = out - &targets;
    let loss = diff
        .iter()
        .map(|&d| f64::from(d) * f64::from(d))
        .sum::<f64>()
        / f64::from(n);
    let argmax = |r: ndarray::ArrayView1<'_, f32>| {
        r.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0
    };
    let agree = out
        .rows()
        .into_iter()
        .zip(targets.rows())
        .filter(|(a, b)| argmax(*a) == argmax(*b))
        .count();
    (loss as f32, agree, diff.mapv(|d| 2.0 * d / n))
}

/// What the network is fitted to.
#[derive(Debug, Clone, Copy)]
pub enum Targets<'a> {
    /// class labels, one per row: softmax cross-entropy
    Labels(&'a [u8]),
    /// target outputs, `[rows, classes]` (e.g. a victim's logits): mean squared error
    Outputs(ArrayView2<'a, f32>),
}

impl Targets<'_> {
    fn len(&self) -> usize {
        match self {
            Targets::Labels(y) => y.len(),
            Targets::Outputs(t) => t.nrows(),
        }
    }
}

/// A row of a dense layer given and held fixed during training (e.g. a first-layer row
/// recovered by cryptanalytic extraction).
#[derive(Debug, Clone, PartialEq)]
pub struct FixedRow {
    /// the dense layer (0 = the first)
    pub layer: usize,
    /// the row (output unit)
    pub row: usize,
    /// its weights (the layer's input width)
    pub w: Vec<f32>,
    /// its bias
    pub b: f32,
}

/// The result of training: architecture, parameter tensors, and the training record.
#[derive(Debug)]
pub struct Trained {
    /// The architecture trained.
    pub architecture: Architecture,
    /// Per layer, its parameter tensors (for `Model::new`).
    pub params: Vec<Vec<Tensor>>,
    /// How it was trained.
    pub record: TrainingRecord,
    /// Steps taken.
    pub steps: usize,
}

/// Trains an MLP with input shape `input_shape`, `config.hidden` hidden ReLU layers and
/// `classes` outputs on rows `x` (one example per row, flattened) with labels `y`.
pub fn train(
    config: &TrainConfig,
    input_shape: &[usize],
    classes: usize,
    x: ArrayView2<'_, f32>,
    y: &[u8],
) -> Result<Trained, TrainError> {
    train_from(config, input_shape, classes, x, y, None)
}

/// As [`train`], but starting from the parameters `init` (per layer, in
/// `LayerSpec::params` order, as in [`Trained::params`]) instead of a fresh He
/// initialisation when given (warm start, e.g. substitute training that continues across
/// rounds on a growing dataset). The Adam moments start at zero either way.
pub fn train_from(
    config: &TrainConfig,
    input_shape: &[usize],
    classes: usize,
    x: ArrayView2<'_, f32>,
    y: &[u8],
    init: Option<&[Vec<Tensor>]>,
) -> Result<Trained, TrainError> {
    fit(
        config,
        input_shape,
        classes,
        x,
        Targets::Labels(y),
        init,
        &[],
    )
}

/// The general form of [`train_from`]: fits `targets` (labels or target outputs) with the
/// rows `fixed` set after initialisation and held fixed throughout.
pub fn fit(
    config: &TrainConfig,
    input_shape: &[usize],
    classes: usize,
    x: ArrayView2<'_, f32>,
    targets: Targets<'_>,
    init: Option<&[Vec<Tensor>]>,
    fixed: &[FixedRow],
) -> Result<Trained, TrainError> {
    let architecture = Architecture::mlp(input_shape, &config.hidden, classes)?;
    if x.nrows() != targets.len() || targets.len() == 0 {
        return Err(TrainError::Data {
            examples: x.nrows(),
            labels: targets.len(),
        });
    }
    let y: &[u8] = match targets {
        Targets::Labels(y) => y,
        Targets::Outputs(t) if t.ncols() != classes => {
            return Err(TrainError::Config(format!(
                "target outputs have {} columns, the architecture has {classes} outputs",
                t.ncols()
            )));
        }
        Targets::Outputs(_) => &[],
    };
    if x.ncols() != architecture.input_len() {
        return Err(TrainError::InputWidth {
            expected: architecture.input_len(),
            actual: x.ncols(),
        });
    }
    if let Some((index, &label)) = y
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= classes)
    {
        return Err(TrainError::Label {
            index,
            label,
            classes,
        });
    }
    if config.batch == 0 || config.epochs == 0 || !(config.lr > 0.0 && config.lr.is_finite()) {
        return Err(TrainError::Config(format!(
            "batch {} and epochs {} must be positive and lr {} positive and finite",
            config.batch, config.epochs, config.lr
        )));
    }

    let image_dims = match (config.shift, input_shape) {
        (0, _) => None,
        (_, &[h, w]) | (_, &[1, h, w]) => Some((h, w)),
        _ => {
            return Err(TrainError::Config(format!(
                "shift augmentation needs an image input shape, not {input_shape:?}"
            )));
        }
    };
    if !(config.weight_decay >= 0.0 && config.weight_decay < 1.0) {
        return Err(TrainError::Config(format!(
            "weight decay {} outside [0, 1)",
            config.weight_decay
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut widths = vec![architecture.input_len()];
    widths.extend_from_slice(&config.hidden);
    widths.push(classes);
    let mut layers: Vec<Layer> = widths
        .windows(2)
        .map(|w| Layer::he(w[0], w[1], &mut rng))
        .collect();
    if let Some(init) = init {
        warm_start(&mut layers, &architecture, init)?;
    }
    fix_rows(&mut layers, fixed)?;

    let n = targets.len();
    let steps_per_epoch = n.div_ceil(config.batch);
    let total_steps = config
        .max_steps
        .map_or(steps_per_epoch * config.epochs, |m| {
            m.min(steps_per_epoch * config.epochs)
        });
    let bar = progress_bar(config.progress, total_steps);
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0usize;
    let (mut last_loss, mut last_acc) = (0.0f32, 0.0f32);

    'epochs: for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        bar.set_message(format!("epoch {}/{}", epoch + 1, config.epochs));
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for idx in order.chunks(config.batch) {
            if step >= total_steps {
                break 'epochs;
            }
            step += 1;
            let mut xb = x.select(Axis(0), idx);
            if let Some((h, w)) = image_dims {
                shift_images(&mut xb, h, w, config.shift, &mut rng);
            }
            let yb = match targets {
                Targets::Labels(_) => Batch::Labels(idx.iter().map(|&i| y[i]).collect()),
                Targets::Outputs(t) => Batch::Outputs(t.select(Axis(0), idx)),
            };
            let lr = match config.schedule {
                Schedule::Constant => config.lr,
                Schedule::Cosine => {
                    let progress = (step - 1) as f64 / total_steps as f64;
                    (f64::from(config.lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
                        as f32
                }
            };
            let decay = lr * config.weight_decay;
            let (loss, ok) = train_step(&mut layers, xb.view(), &yb, lr, decay, step as i32);
            if !loss.is_finite() {
                bar.abandon();
                return Err(TrainError::Diverged { step, loss });
            }
            loss_sum += f64::from(loss) * idx.len() as f64;
            correct += ok;
            seen += idx.len();
            last_loss = (loss_sum / seen as f64) as f32;
            last_acc = correct as f32 / seen as f32;
            bar.inc(1);
            if step.is_multiple_of(20) || seen == n {
                bar.set_message(format!(
                    "epoch {}/{}  loss {:.4}  acc {:.2}%",
                    epoch + 1,
                    config.epochs,
                    last_loss,
                    100.0 * last_acc
                ));
            }
        }
        if config.progress {
            let line = format!(
                "epoch {:>3}/{}: loss {:.4}, train accuracy {:.2}%",
                epoch + 1,
                config.epochs,
                last_loss,
                100.0 * last_acc
            );
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    }
    bar.finish_and_clear();

    let mut params = Vec::with_capacity(architecture.layers().len());
    let mut trained = layers.into_iter();
    for spec in architecture.layers() {
        if spec.params().is_empty() {
            params.push(Vec::new());
            continue;
        }
        let Some(layer) = trained.next() else {
            return Err(TrainError::Config("layer count mismatch".into()));
        };
        let w = Tensor::new(layer.w.shape().to_vec(), layer.w.iter().copied().collect())
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let b = Tensor::new(vec![layer.b.len()], layer.b.to_vec())
            .map_err(|e| TrainError::Config(e.to_string()))?;
        params.push(vec![w, b]);
    }
    let record = TrainingRecord {
        trainer: match targets {
            Targets::Labels(_) => {
                "fusion nn::train (ndarray): He init, Adam, softmax cross-entropy"
            }
            Targets::Outputs(_) => "fusion nn::train (ndarray): He init, Adam, mean squared error",
        }
        .into(),
        images: n,
        epochs: config.epochs,
        batch: config.batch,
        lr: config.lr,
        schedule: match config.schedule {
            Schedule::Constant => "constant".into(),
            Schedule::Cosine => "cosine".into(),
        },
        seed: config.seed,
        shift: config.shift,
        weight_decay: config.weight_decay,
        final_loss: last_loss,
        final_train_accuracy: last_acc,
    };
    Ok(Trained {
        architecture,
        params,
        record,
        steps: step,
    })
}

/// Overwrites freshly initialised layers with the parameters `init` (checked against the
/// architecture).
fn warm_start(
    layers: &mut [Layer],
    architecture: &Architecture,
    init: &[Vec<Tensor>],
) -> Result<(), TrainError> {
    super::model::check_params(architecture, init)
        .map_err(|e| TrainError::Config(format!("initial parameters: {e}")))?;
    let dense = init.iter().filter(|t| !t.is_empty());
    for (layer, tensors) in layers.iter_mut().zip(dense) {
        if let [w, b] = tensors.as_slice() {
            layer.w = Array2::from_shape_vec(layer.w.raw_dim(), w.data().to_vec())
                .map_err(|e| TrainError::Config(format!("initial weights: {e}")))?;
            layer.b = Array1::from(b.data().to_vec());
        }
    }
    Ok(())
}

/// Sets the `fixed` rows and marks them frozen (checked against the layers' shapes).
fn fix_rows(layers: &mut [Layer], fixed: &[FixedRow]) -> Result<(), TrainError> {
    for f in fixed {
        let Some(layer) = layers.get_mut(f.layer) else {
            return Err(TrainError::Config(format!(
                "fixed row of dense layer {}: there are {} dense layers",
                f.layer,
                layers.len()
            )));
        };
        let (outputs, inputs) = layer.w.dim();
        if f.row >= outputs || f.w.len() != inputs {
            return Err(TrainError::Config(format!(
                "fixed row {} of dense layer {} with {} weights: the layer has {outputs} rows \
                 of {inputs}",
                f.row,
                f.layer,
                f.w.len()
            )));
        }
        layer
            .w
            .row_mut(f.row)
            .iter_mut()
            .zip(&f.w)
            .for_each(|(w, v)| *w = *v);
        layer.b[f.row] = f.b;
        layer.frozen.resize(outputs, false);
        layer.frozen[f.row] = true;
    }
    Ok(())
}

/// The targets of one mini-batch.
enum Batch {
    Labels(Vec<u8>),
    Outputs(Array2<f32>),
}

/// One forward/backward pass and Adam update; returns the batch's loss and correct count
/// (labels: correct predictions; target outputs: rows whose argmax agrees).
fn train_step(
    layers: &mut [Layer],
    x: ArrayView2<'_, f32>,
    y: &Batch,
    lr: f32,
    decay: f32,
    t: i32,
) -> (f32, usize) {
    // Forward, keeping every layer's input (activations) for the backward pass.
    let mut inputs: Vec<Array2<f32>> = Vec::with_capacity(layers.len());
    let mut a = x.to_owned();
    let last = layers.len() - 1;
    for (k, layer) in layers.iter().enumerate() {
        let mut z = a.dot(&layer.w.t()) + &layer.b;
        if k != last {
            z.mapv_inplace(|v| v.max(0.0));
        }
        inputs.push(std::mem::replace(&mut a, z));
    }
    let (loss, correct, mut dz) = match y {
        Batch::Labels(y) => softmax_cross_entropy(&a, y),
        Batch::Outputs(t) => mean_squared_error(&a, t.view()),
    };

    // Backward. For hidden layers, a_k = relu(z_k) > 0 exactly where z_k > 0, so the ReLU
    // mask can be read off the stored activations.
    for k in (0..layers.len()).rev() {
        let a_prev = &inputs[k];
        let dw = dz.t().dot(a_prev);
        let db = dz.sum_axis(Axis(0));
        if k > 0 {
            let mut da = dz.dot(&layers[k].w);
            da.zip_mut_with(a_prev, |g, &act| {
                if act <= 0.0 {
                    *g = 0.0;
                }
            });
            layers[k].adam(&dw, &db, lr, decay, t);
            dz = da;
        } else {
            layers[k].adam(&dw, &db, lr, decay, t);
        }
    }
    (loss, correct)
}

fn progress_bar(show: bool, len: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len as u64),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta}]",
    ) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_cross_entropy_gradient_matches_finite_differences() {
        let logits = Array2::from_shape_vec((2, 3), vec![0.5, -1.0, 2.0, 0.1, 0.2, -0.3]).unwrap();
        let y = [2u8, 0];
        let (loss, correct, grad) = softmax_cross_entropy(&logits, &y);
        assert_eq!(correct, 1);
        let h = 1e-3;
        check_gradient(&logits, &grad, h, |z| softmax_cross_entropy(z, &y).0);
        assert!(loss > 0.0);
    }

    /// Central differences of `loss` at `z` (step `h`) against `grad`, entry by entry.
    fn check_gradient(
        z: &Array2<f32>,
        grad: &Array2<f32>,
        h: f32,
        loss: impl Fn(&Array2<f32>) -> f32,
    ) {
        for ((r, c), g) in grad.indexed_iter() {
            let mut plus = z.clone();
            plus[(r, c)] += h;
            let mut minus = z.clone();
            minus[(r, c)] -= h;
            let num = (loss(&plus) - loss(&minus)) / (2.0 * h);
            assert!((num - g).abs() < 1e-3, "{r},{c}: {num} vs {g}");
        }
    }

    #[test]
    fn deterministic_for_a_seed_and_refuses_bad_input() {
        // A tiny separable problem: the label is the index of the largest input.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x = Array2::from_shape_simple_fn((64, 3), || rng.random::<f32>());
        let y: Vec<u8> = x
            .axis_iter(Axis(0))
            .map(|r| {
                crate::nn::eval::argmax_rows(r.insert_axis(Axis(0)))
                    .first()
                    .copied()
                    .unwrap_or(0) as u8
            })
            .collect();
        let config = TrainConfig {
            hidden: vec![8],
            epochs: 3,
            batch: 16,
            ..TrainConfig::default()
        };
        let a = train(&config, &[3], 3, x.view(), &y).unwrap();
        let b = train(&config, &[3], 3, x.view(), &y).unwrap();
        assert_eq!(a.params, b.params);
        assert_eq!(a.steps, 12);
        let c = train(
            &TrainConfig {
                seed: 2,
                ..config.clone()
            },
            &[3],
            3,
            x.view(),
            &y,
        )
        .unwrap();
        assert_ne!(a.params, c.params);
        assert!(matches!(
            train(&config, &[3], 2, x.view(), &y),
            Err(TrainError::Label { classes: 2, .. })
        ));
        assert!(matches!(
            train(&config, &[4], 3, x.view(), &y),
            Err(TrainError::InputWidth {
                expected: 4,
                actual: 3
            })
        ));
        assert!(matches!(
            train(&config, &[3], 3, x.view(), &y[1..]),
            Err(TrainError::Data { .. })
        ));
    }

    #[test]
    fn mean_squared_error_gradient_matches_finite_differences() {
        let out = Array2::from_shape_vec((2, 3), vec![0.5, -1.0, 2.0, 0.1, 0.2, -0.3]).unwrap();
        let t = Array2::from_shape_vec((2, 3), vec![0.0, -1.5, 1.0, 0.3, 0.1, 0.4]).unwrap();
        let (loss, agree, grad) = mean_squared_error(&out, t.view());
        assert_eq!(agree, 1);
        check_gradient(&out, &grad, 1e-3, |z| mean_squared_error(z, t.view()).0);
        assert!(loss > 0.0);
    }

    /// Regression on a teacher's outputs with two first-layer rows fixed: the fixed rows
    /// come out bit for bit as given, the loss falls, and a misshapen fixed row is refused.
    #[test]
    fn fits_target_outputs_with_fixed_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = Array2::from_shape_simple_fn((256, 4), || rng.random::<f32>());
        let teacher = Array2::from_shape_simple_fn((4, 3), || rng.random::<f32>() - 0.5);
        let t = x.dot(&teacher);
        let config = TrainConfig {
            hidden: vec![6],
            epochs: 60,
            batch: 32,
            lr: 1e-2,
            ..TrainConfig::default()
        };
        let fixed = vec![
            FixedRow {
                layer: 0,
                row: 1,
                w: vec![0.25, -0.5, 0.125, 1.0],
                b: 0.375,
            },
            FixedRow {
                layer: 0,
                row: 4,
                w: vec![-1.0, 0.5, 0.0, 0.25],
                b: -0.125,
            },
        ];
        let r = fit(
            &config,
            &[4],
            3,
            x.view(),
            Targets::Outputs(t.view()),
            None,
            &fixed,
        )
        .unwrap();
        let (w1, b1) = (r.params[0][0].data(), r.params[0][1].data());
        for f in &fixed {
            assert_eq!(&w1[f.row * 4..f.row * 4 + 4], f.w.as_slice());
            assert_eq!(b1[f.row], f.b);
        }
        let mean_sq = t.iter().map(|v| v * v).sum::<f32>() / t.len() as f32;
        assert!(
            r.record.final_loss < 0.05 * mean_sq,
            "loss {} vs target power {mean_sq}",
            r.record.final_loss
        );
        let bad = FixedRow {
            w: vec![0.0; 3],
            ..fixed[0].clone()
        };
        assert!(matches!(
            fit(
                &config,
                &[4],
                3,
                x.view(),
                Targets::Outputs(t.view()),
                None,
                &[bad]
            ),
            Err(TrainError::Config(_))
        ));
        assert!(matches!(
            fit(
                &config,
                &[4],
                2,
                x.view(),
                Targets::Outputs(t.view()),
                None,
                &[]
            ),
            Err(TrainError::Config(_))
        ));
    }
}
