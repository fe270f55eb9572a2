//! The layer sequence a backend runs, derived from a model's public description.
//!
//! Each Dense layer opens a layer group k (1, 2, ...; the `layerk/...` step names) and is
//! followed by its truncation, fused with the ReLU when the next layer (Flatten skipped)
//! is one; any other ReLU runs on its own. Flatten is a no-op on row-major data.

use super::{BackendError, LayerKind, ModelSpec};
use crate::fixed::FixedPoint;
use crate::he::{LOG_LAYERS_PER_INFERENCE, LOG_MAX_OUTPUTS, MAX_DIM};

/// What follows a linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Post {
    /// max(0, acc >> f)
    ReluTrunc,
    /// acc >> f
    Trunc,
}

/// One step of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// A Dense layer (index `index` of the model), then its truncation.
    Linear {
        /// the layer group k
        group: usize,
        /// the model's layer index
        index: usize,
        /// n_i
        inputs: usize,
        /// n_o
        outputs: usize,
        /// the truncation that follows
        post: Post,
    },
    /// A ReLU that does not follow a Dense.
    Relu {
        /// the layer group (that of the last Dense before it, 0 if none)
        group: usize,
        /// values per row
        width: usize,
    },
}

/// The stages of a model, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) stages: Vec<Stage>,
    pub(crate) fixed: FixedPoint,
    pub(crate) input_len: usize,
    pub(crate) output_len: usize,
    /// rows per HE call: every call returns at most 2^LOG_MAX_OUTPUTS values
    pub(crate) chunk_rows: usize,
    /// values per 2PC call ([`MAX_MPC_VALUES`])
    pub(crate) mpc_values: usize,
}

/// The most values one 2PC call (truncation, ReLU, argmax) takes: a larger layer runs in
/// several calls, one after the other, which bounds the memory of the OT buffers (about
/// 2 KB per value; 1024 rows of 128 values fit in one call).
pub const MAX_MPC_VALUES: usize = 1 << 17;

impl Plan {
    /// The plan of `spec`, or the reason the backend cannot run it.
    pub(crate) fn new(spec: &ModelSpec) -> Result<Self, BackendError> {
        let f = spec.fixed.frac_bits();
        if f == 0 {
            // the argmax is exact only on truncated values (|x| < 2^(l-2))
            return Err(BackendError::UnsupportedModel(
                "a fixed-point scale of 0 fractional bits".into(),
            ));
        }
        if spec.input_len == 0 || spec.input_len > MAX_DIM {
            return Err(BackendError::UnsupportedModel(format!(
                "input length {} (1..={MAX_DIM})",
                spec.input_len
            )));
        }
        let mut stages = Vec::new();
        let mut width = spec.input_len;
        let mut group = 0;
        let mut max_outputs = 1;
        let mut fused = None;
        for (index, layer) in spec.layers.iter().enumerate() {
            match layer {
                LayerKind::Flatten => {}
                LayerKind::Relu if fused == Some(index) => {}
                LayerKind::Relu => stages.push(Stage::Relu { group, width }),
                LayerKind::Dense { inputs, outputs } => {
                    if *inputs != width {
                        return Err(BackendError::UnsupportedModel(format!(
                            "layer {index} (dense) takes {inputs} inputs but receives {width}"
                        )));
                    }
                    if *outputs == 0 || *outputs > MAX_DIM {
                        return Err(BackendError::UnsupportedModel(format!(
                            "layer {index} (dense) has {outputs} outputs (1..={MAX_DIM})"
                        )));
                    }
                    group += 1;
                    let next = spec.layers[index + 1..]
                        .iter()
                        .position(|l| *l != LayerKind::Flatten)
                        .map(|p| index + 1 + p);
                    let post = match next {
                        Some(n) if spec.layers[n] == LayerKind::Relu => {
                            fused = Some(n);
                            Post::ReluTrunc
                        }
                        _ => Post::Trunc,
                    };
                    stages.push(Stage::Linear {
                        group,
                        index,
                        inputs: *inputs,
                        outputs: *outputs,
                        post,
                    });
                    width = *outputs;
                    max_outputs = max_outputs.max(*outputs);
                }
                LayerKind::Other(kind) => {
                    return Err(BackendError::UnsupportedLayer {
                        index,
                        kind: kind.clone(),
                    });
                }
            }
        }
        if group == 0 {
            return Err(BackendError::UnsupportedModel(
                "no dense layer (the output must be a truncated layer)".into(),
            ));
        }
        // The HE flooding is sized for this many linear layers per inference (he module
        // doc, "noise and flooding", step 4).
        if group > 1 << LOG_LAYERS_PER_INFERENCE {
            return Err(BackendError::UnsupportedModel(format!(
                "{group} dense layers; the HE parameters are sized for at most {}",
                1 << LOG_LAYERS_PER_INFERENCE
            )));
        }
        Ok(Self {
            stages,
            fixed: spec.fixed,
            input_len: spec.input_len,
            output_len: width,
            chunk_rows: ((1usize << LOG_MAX_OUTPUTS) / max_outputs).min(MAX_DIM),
            mpc_values: MAX_MPC_VALUES,
        })
    }

    /// The sizes of the 2PC calls of a layer of `n` values (whole rows of `width`).
    pub(crate) fn mpc_parts(&self, n: usize, width: usize) -> impl Iterator<Item = usize> {
        let per = (self.mpc_values / width.max(1)).max(1) * width.max(1);
        (0..n.div_ceil(per)).map(move |i| per.min(n - i * per))
    }

    /// The row ranges of the HE calls of a batch of `rows` rows.
    pub(crate) fn chunks(&self, rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let c = self.chunk_rows.max(1);
        (0..rows.div_ceil(c)).map(move |i| i * c..((i + 1) * c).min(rows))
    }
}
