//! The f32 evaluator, and evaluation of a model on MNIST in both arithmetics.

use super::LayerSpec;
use super::mnist::Dataset;
use super::model::{Counts, Model, ModelError};
use crate::fixed::{FixedEval, FixedPoint, eval_fixed};
use ndarray::{Array2, ArrayView2, Axis, s};

/// Rows evaluated at once by the f32 evaluator.
const F32_CHUNK: usize = 1024;

impl Model {
    /// The f32 logits of a batch: `x` has one row per input (`input_len` values each, row
    /// major, pixels scaled to [0, 1]); returns `[rows, classes]`.
    pub fn forward_f32(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        let arch = self.architecture();
        if x.ncols() != arch.input_len() {
            return Err(ModelError::InputLength {
                len: x.len(),
                row_len: arch.input_len(),
            });
        }
        let mut out = Array2::zeros((x.nrows(), arch.output_len()));
        let mut start = 0;
        while start < x.nrows() {
            let end = (start + F32_CHUNK).min(x.nrows());
            let y = self.forward_chunk(x.slice(s![start..end, ..]));
            out.slice_mut(s![start..end, ..]).assign(&y);
            start = end;
        }
        Ok(out)
    }

    fn forward_chunk(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut a = x.to_owned();
        for (i, layer) in self.architecture().layers().iter().enumerate() {
            match layer {
                LayerSpec::Dense { .. } => {
                    if let Some((w, b)) = self.dense(i) {
                        // y = x W^T + b (W is [outputs, inputs]).
                        a = a.dot(&w.t()) + b;
                    }
                }
                LayerSpec::Relu => a.mapv_inplace(|v| v.max(0.0)),
                LayerSpec::Flatten => {}
            }
        }
        a
    }

    /// The f32 labels of a batch (first index of the largest logit).
    pub fn predict_f32(&self, x: ArrayView2<'_, f32>) -> Result<Vec<usize>, ModelError> {
        Ok(argmax_rows(self.forward_f32(x)?.view()))
    }
}

/// First index of the largest value in each row.
pub(crate) fn argmax_rows(a: ArrayView2<'_, f32>) -> Vec<usize> {
    a.axis_iter(Axis(0))
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// A model evaluated on a labelled dataset in f32 and in fixed point.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// f32 labels of every image.
    pub f32_labels: Vec<usize>,
    /// The fixed-point evaluation of every image (logits, labels, accumulator figures).
    pub fixed: FixedEval,
    /// Counts over the whole dataset.
    pub all: Counts,
    /// Counts over images `heldout_from..`.
    pub heldout: Counts,
    /// First held-out image.
    pub heldout_from: usize,
}

/// Evaluates `model` on `data` with the f32 evaluator and the fixed-point evaluator at the
/// model's (l, f); counts accuracy and agreement on all images and on `heldout_from..`.
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    heldout_from: usize,
) -> Result<EvalReport, ModelError> {
    let f32_labels = model.predict_f32(data.to_f32().view())?;
    let fixed_model = model.fixed_model();
    let fixed = eval_fixed(fixed_model, &fixed_model.encode_images(data.images()))?;
    let all = Counts::tally(data.labels(), &f32_labels, &fixed.labels);
    let from = heldout_from.min(data.len());
    let heldout = Counts::tally(
        &data.labels()[from..],
        &f32_labels[from..],
        &fixed.labels[from..],
    );
    Ok(EvalReport {
        f32_labels,
        fixed,
        all,
        heldout,
        heldout_from: from,
    })
}

/// The largest |accumulator| of the model's fixed-point evaluation at `frac_bits` over the
/// given datasets, measured in Z_{2^64} (where no MNIST accumulator wraps), together with
/// the number of accumulators that wrapped there (expected 0). The smallest ring keeping h
/// bits of headroom is then `crate::fixed::ring_bits_for(max, h)`.
pub fn calibrate(
    model: &Model,
    frac_bits: u32,
    data: &[&Dataset],
) -> Result<(u64, usize), ModelError> {
    let wide = model.with_fixed_point(FixedPoint::new(64, frac_bits)?)?;
    let fm = wide.fixed_model();
    let mut max = 0u64;
    let mut wrapped = 0usize;
    for d in data {
        // In chunks, to bound memory on the 60k training images.
        for start in (0..d.len()).step_by(10_000) {
            let end = (start + 10_000).min(d.len());
            let part = d.slice(start..end).map_err(|e| ModelError::BadMetadata {
                key: "calibration",
                reason: e.to_string(),
            })?;
            let r = eval_fixed(fm, &fm.encode_images(part.images()))?;
            max = max.max(r.max_abs_acc);
            wrapped += r.wrapped;
        }
    }
    Ok((max, wrapped))
}
