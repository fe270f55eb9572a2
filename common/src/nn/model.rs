//! A model: the public architecture plus the weights only the server holds, its
//! fixed-point parameters, its digest and the claims recorded about it.

use super::arch::{ArchError, Architecture};
use super::pool::{PoolError, PublicPool};
use crate::fixed::{FixedError, FixedModel, FixedPoint, headroom_bits};
use ndarray::{ArrayView1, ArrayView2};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Errors of model construction, loading and saving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// Reading or writing the file failed.
    #[error("model file {path}: {source}")]
    Io {
        /// the file
        path: String,
        /// the I/O error
        source: std::io::Error,
    },
    /// The file is shorter than its header says.
    #[error("model file truncated: expected {expected} bytes, got {actual}")]
    Truncated {
        /// bytes the header accounts for
        expected: u64,
        /// bytes present
        actual: u64,
    },
    /// The file has bytes after the last tensor.
    #[error("model file has trailing data: expected {expected} bytes, got {actual}")]
    TrailingData {
        /// bytes the header accounts for
        expected: u64,
        /// bytes present
        actual: u64,
    },
    /// The safetensors container is malformed.
    #[error("model file is not valid safetensors: {reason}")]
    Format {
        /// what the safetensors reader said
        reason: String,
    },
    /// The file is not a Fusion model file, or of an unknown version.
    #[error("not a Fusion model file (format {found:?}, expected {expected:?})")]
    NotFusionModel {
        /// the format tag found, if any
        found: Option<String>,
        /// the format tag expected
        expected: String,
    },
    /// A required metadata key is absent.
    #[error("model metadata: key {key:?} is missing")]
    MissingMetadata {
        /// the key
        key: &'static str,
    },
    /// A metadata value does not parse or is inconsistent.
    #[error("model metadata: key {key:?}: {reason}")]
    BadMetadata {
        /// the key
        key: &'static str,
        /// why
        reason: String,
    },
    /// The declared architecture is invalid.
    #[error("model architecture: {0}")]
    Architecture(#[from] ArchError),
    /// A tensor the architecture needs is absent.
    #[error("model tensor {name:?} is missing")]
    MissingTensor {
        /// the tensor's name
        name: String,
    },
    /// A tensor the architecture does not have.
    #[error("model tensor {name:?} is not part of the architecture")]
    UnexpectedTensor {
        /// the tensor's name
        name: String,
    },
    /// A tensor of the wrong shape.
    #[error("model tensor {name:?} has shape {actual:?}, the architecture needs {expected:?}")]
    ShapeMismatch {
        /// the tensor's name
        name: String,
        /// the shape the architecture declares
        expected: Vec<usize>,
        /// the shape found
        actual: Vec<usize>,
    },
    /// A tensor of the wrong element type.
    #[error("model tensor {name:?} has dtype {actual}, expected {expected}")]
    DtypeMismatch {
        /// the tensor's name
        name: String,
        /// the dtype expected
        expected: &'static str,
        /// the dtype found
        actual: String,
    },
    /// The number of parameter tensors given for a layer is wrong.
    #[error("layer {layer} ({kind}) needs {expected} parameter tensors, got {actual}")]
    ParamCount {
        /// layer index
        layer: usize,
        /// layer kind
        kind: &'static str,
        /// tensors expected
        expected: usize,
        /// tensors given
        actual: usize,
    },
    /// A tensor's data length does not match its shape.
    #[error("tensor data: {len} values do not fill shape {shape:?}")]
    TensorData {
        /// the shape
        shape: Vec<usize>,
        /// values given
        len: usize,
    },
    /// A NaN or infinite parameter.
    #[error("model tensor {name:?} element {index} is not finite")]
    NonFinite {
        /// the tensor's name
        name: String,
        /// element index
        index: usize,
    },
    /// The digest stored in the file is not the digest of its contents.
    #[error("model digest mismatch: file says {stored}, contents hash to {computed}")]
    DigestMismatch {
        /// digest in the metadata
        stored: String,
        /// digest of the architecture, fixed-point parameters and weights read
        computed: String,
    },
    /// The parameters cannot be encoded at the model's fixed-point scale.
    #[error("model fixed-point encoding: {0}")]
    Fixed(#[from] FixedError),
    /// The public pool in the file does not verify.
    #[error("model public pool: {0}")]
    Pool(#[from] PoolError),
    /// An input batch of the wrong width.
    #[error("model input: {len} values is not a whole number of rows of {row_len}")]
    InputLength {
        /// values given
        len: usize,
        /// values per row
        row_len: usize,
    },
}

/// A dense f32 tensor (row-major). Parameters are secret to the server: zeroized on drop
/// and not printed by `Debug`.
#[derive(Clone, PartialEq, Zeroize, ZeroizeOnDrop)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("data", &"[redacted]")
            .finish()
    }
}

impl Tensor {
    /// A tensor of the given shape; `data` must have exactly the product of the shape.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ModelError> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            return Err(ModelError::TensorData {
                shape,
                len: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

super::digest::hex_digest! {
    /// The 32-byte BLAKE3 digest of a model: architecture, fixed-point parameters and weights
    /// (see [`Model::digest`]). Shown and serialised as lowercase hex.
    ModelDigest
}

/// BLAKE3 key-derivation context of model digests.
const MODEL_DIGEST_CONTEXT: &str = "fusion 2025-11 model digest v1";

/// Counts behind accuracy figures on a set of labelled images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    /// Images evaluated.
    pub images: usize,
    /// Images whose f32 label is the true label.
    pub f32_correct: usize,
    /// Images whose fixed-point label is the true label.
    pub fixed_correct: usize,
    /// Images whose f32 and fixed-point labels agree.
    pub agree: usize,
}

impl Counts {
    fn ratio(n: usize, d: usize) -> f64 {
        if d == 0 { 0.0 } else { n as f64 / d as f64 }
    }

    /// f32 accuracy in [0, 1].
    pub fn f32_accuracy(&self) -> f64 {
        Self::ratio(self.f32_correct, self.images)
    }

    /// Fixed-point accuracy in [0, 1].
    pub fn fixed_accuracy(&self) -> f64 {
        Self::ratio(self.fixed_correct, self.images)
    }

    /// Fraction of images whose f32 and fixed-point labels agree.
    pub fn agreement(&self) -> f64 {
        Self::ratio(self.agree, self.images)
    }

    /// Counts from true, f32 and fixed-point labels of the same images.
    pub fn tally(truth: &[u8], f32_labels: &[usize], fixed_labels: &[usize]) -> Self {
        let mut c = Counts::default();
        for ((&t, &a), &b) in truth.iter().zip(f32_labels).zip(fixed_labels) {
            c.images += 1;
            c.f32_correct += usize::from(a == usize::from(t));
            c.fixed_correct += usize::from(b == usize::from(t));
            c.agree += usize::from(a == b);
        }
        c
    }
}

/// Evaluation figures recorded in a model file (claims: not covered by the model digest;
/// `fusion-server eval` recomputes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// The evaluation set, e.g. `"mnist-t10k"`.
    pub dataset: String,
    /// On the whole evaluation set.
    pub test: Counts,
    /// Index of the first held-out image: images `heldout_from..` are not in the public
    /// pool.
    pub heldout_from: usize,
    /// On the held-out part.
    pub heldout: Counts,
    /// The largest |accumulator| of the fixed-point evaluation over the calibration images.
    pub max_abs_acc: u64,
    /// Which images calibrated `max_abs_acc`, e.g. `"mnist-train+mnist-t10k"`.
    pub calibration: String,
}

impl Evaluation {
    /// The accuracy the server claims for its model (Fusion's check (c)): the fixed-point
    /// accuracy on the held-out part of the evaluation set.
    pub fn claimed_accuracy(&self) -> f64 {
        self.heldout.fixed_accuracy()
    }

    /// Headroom bits of the calibration's largest accumulator in a ring of `ring_bits`.
    pub fn headroom_bits(&self, ring_bits: u32) -> i64 {
        headroom_bits(ring_bits, self.max_abs_acc)
    }
}

/// How a model was trained (informative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingRecord {
    /// The trainer, e.g. `"fusion nn::train (ndarray), Adam, softmax cross-entropy"`.
    pub trainer: String,
    /// Training images.
    pub images: usize,
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Learning-rate schedule.
    pub schedule: String,
    /// RNG seed.
    pub seed: u64,
    /// Random-shift augmentation, in pixels (0: none).
    pub shift: usize,
    /// Decoupled weight decay (0: none).
    pub weight_decay: f32,
    /// Mean training loss of the last epoch.
    pub final_loss: f32,
    /// Training accuracy of the last epoch (on the shuffled mini-batches, during training).
    pub final_train_accuracy: f32,
}

/// A model: architecture, weights, fixed-point parameters, digest, and recorded claims.
/// The weights are secret to the server; `Debug` does not print them.
#[derive(Clone)]
pub struct Model {
    architecture: Architecture,
    params: Vec<Vec<Tensor>>,
    fixed: FixedPoint,
    digest: ModelDigest,
    fixed_model: FixedModel,
    evaluation: Option<Evaluation>,
    training: Option<TrainingRecord>,
    pool: Option<PublicPool>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.architecture)
            .field("fixed_point", &self.fixed)
            .field("digest", &self.digest)
            .field("weights", &"[redacted]")
            .field("evaluation", &self.evaluation)
            .field("training", &self.training)
            .field("public_pool", &self.pool.as_ref().map(PublicPool::len))
            .finish()
    }
}

impl Model {
    /// A model from its architecture, the parameter tensors of each layer (`params[i]` in
    /// `LayerSpec::params` order) and its fixed-point parameters. Checks every tensor's
    /// shape against the architecture, refuses non-finite values and values that do not
    /// encode at scale 2^f (weights) and 2^(2f) (biases) in Z_{2^l}.
    pub fn new(
        architecture: Architecture,
        params: Vec<Vec<Tensor>>,
        fixed: FixedPoint,
    ) -> Result<Self, ModelError> {
        check_params(&architecture, &params)?;
        let digest = compute_digest(&architecture, fixed, &params);
        let fixed_model = FixedModel::encode(&architecture, &params, fixed, digest)?;
        Ok(Self {
            architecture,
            params,
            fixed,
            digest,
            fixed_model,
            evaluation: None,
            training: None,
            pool: None,
        })
    }

    /// The same weights with other fixed-point parameters (a new digest; recorded claims
    /// and the public pool are dropped, since they belong to the old digest).
    pub fn with_fixed_point(&self, fixed: FixedPoint) -> Result<Self, ModelError> {
        let mut m = Self::new(self.architecture.clone(), self.params.clone(), fixed)?;
        m.training = self.training.clone();
        Ok(m)
    }

    /// Records evaluation figures.
    pub fn with_evaluation(mut self, evaluation: Evaluation) -> Self {
        self.evaluation = Some(evaluation);
        self
    }

    /// Records how the model was trained.
    pub fn with_training(mut self, training: TrainingRecord) -> Self {
        self.training = Some(training);
        self
    }

    /// Attaches the public pool; refuses a pool that is not bound to this model's digest.
    pub fn with_public_pool(mut self, pool: PublicPool) -> Result<Self, ModelError> {
        pool.verify(&self.digest)?;
        self.pool = Some(pool);
        Ok(self)
    }

    /// The public architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// The fixed-point parameters (l, f).
    pub fn fixed_point(&self) -> FixedPoint {
        self.fixed
    }

    /// BLAKE3 (derive-key mode, context `"fusion 2025-11 model digest v1"`) over the
    /// architecture's canonical bytes, l and f (u64 LE each), then for every parameter
    /// tensor in canonical order: its name's length and bytes, its rank and dimensions
    /// (u64 LE) and its values (f32 LE).
    pub fn digest(&self) -> &ModelDigest {
        &self.digest
    }

    /// The model encoded into the ring, for the fixed-point evaluator and the backends.
    pub fn fixed_model(&self) -> &FixedModel {
        &self.fixed_model
    }

    /// The parameter tensors of layer `i` (empty for parameterless layers).
    pub fn layer_params(&self, i: usize) -> Option<&[Tensor]> {
        self.params.get(i).map(Vec::as_slice)
    }

    /// W (`[outputs, inputs]`) and b of layer `i` if it is dense.
    pub fn dense(&self, i: usize) -> Option<(ArrayView2<'_, f32>, ArrayView1<'_, f32>)> {
        match (
            self.architecture.layers().get(i)?,
            self.params.get(i)?.as_slice(),
        ) {
            (&super::LayerSpec::Dense { inputs, outputs }, [w, b]) => {
                let w = ArrayView2::from_shape((outputs, inputs), w.data()).ok()?;
                let b = ArrayView1::from(b.data());
                Some((w, b))
            }
            _ => None,
        }
    }

    /// Recorded evaluation figures, if any.
    pub fn evaluation(&self) -> Option<&Evaluation> {
        self.evaluation.as_ref()
    }

    /// The accuracy the server claims (fixed-point, held-out part), if recorded.
    pub fn claimed_accuracy(&self) -> Option<f64> {
        self.evaluation.as_ref().map(Evaluation::claimed_accuracy)
    }

    /// How the model was trained, if recorded.
    pub fn training(&self) -> Option<&TrainingRecord> {
        self.training.as_ref()
    }

    /// The public pool, if attached.
    pub fn public_pool(&self) -> Option<&PublicPool> {
        self.pool.as_ref()
    }

    pub(crate) fn params(&self) -> &[Vec<Tensor>] {
        &self.params
    }
}

/// Checks the parameter tensors against the architecture: count per layer, shapes,
/// finiteness.
pub(crate) fn check_params(
    architecture: &Architecture,
    params: &[Vec<Tensor>],
) -> Result<(), ModelError> {
    if params.len() != architecture.layers().len() {
        return Err(ModelError::BadMetadata {
            key: "architecture",
            reason: format!(
                "{} layers declared, parameters given for {}",
                architecture.layers().len(),
                params.len()
            ),
        });
    }
    for (i, (layer, tensors)) in architecture.layers().iter().zip(params).enumerate() {
        let specs = layer.params();
        if specs.len() != tensors.len() {
            return Err(ModelError::ParamCount {
                layer: i,
                kind: layer.kind(),
                expected: specs.len(),
                actual: tensors.len(),
            });
        }
        for (spec, t) in specs.iter().zip(tensors) {
            let name = format!("{i}.{}", spec.suffix);
            if t.shape() != spec.shape.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    name,
                    expected: spec.shape.clone(),
                    actual: t.shape().to_vec(),
                });
            }
            if let Some(index) = t.data().iter().position(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite { name, index });
            }
        }
    }
    Ok(())
}

/// The model digest (see [`Model::digest`]).
pub(crate) fn compute_digest(
    architecture: &Architecture,
    fixed: FixedPoint,
    params: &[Vec<Tensor>],
) -> ModelDigest {
    let mut h = blake3::Hasher::new_derive_key(MODEL_DIGEST_CONTEXT);
    h.update(&architecture.canonical_bytes());
    h.update(&u64::from(fixed.ring_bits()).to_le_bytes());
    h.update(&u64::from(fixed.frac_bits()).to_le_bytes());
    for (i, (layer, tensors)) in architecture.layers().iter().zip(params).enumerate() {
        for (spec, t) in layer.params().iter().zip(tensors) {
            let name = format!("{i}.{}", spec.suffix);
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(&(t.shape().len() as u64).to_le_bytes());
            for &d in t.shape() {
                h.update(&(d as u64).to_le_bytes());
            }
            let mut buf = Vec::with_capacity(4 * t.data().len());
            for v in t.data() {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            h.update(&buf);
        }
    }
    ModelDigest(*h.finalize().as_bytes())
}
