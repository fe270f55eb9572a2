//! Model files: safetensors, with the weights as F32 tensors named as PyTorch names the
//! state dict of the equivalent `nn.Sequential` (`"1.weight"`, `"1.bias"`, ...; W is
//! `[outputs, inputs]`) and the rest in the header's `__metadata__` (string values):
//!
//! | key | value |
//! |---|---|
//! | `format` | `"fusion-model/1"` |
//! | `architecture` | the [`Architecture`] as JSON |
//! | `ring_bits`, `frac_bits` | l and f, decimal |
//! | `model_digest` | the model digest, hex (checked on load) |
//! | `evaluation` | optional: [`Evaluation`] as JSON |
//! | `training` | optional: [`TrainingRecord`] as JSON |
//! | `public_pool` | optional: [`PublicPool`] as JSON (verified on load) |
//!
//! The header is written with its keys sorted so the same model gives the same bytes.

use super::arch::Architecture;
use super::model::{Evaluation, Model, ModelDigest, ModelError, Tensor, TrainingRecord};
use super::pool::PublicPool;
use crate::fixed::FixedPoint;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use zeroize::Zeroizing;

/// The value of the `format` metadata key.
pub const FORMAT: &str = "fusion-model/1";
/// The largest model file [`Model::load`] reads (1 GiB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// The largest safetensors header accepted (as the safetensors crate).
const MAX_HEADER_BYTES: u64 = 100_000_000;

const KEY_FORMAT: &str = "format";
const KEY_ARCH: &str = "architecture";
const KEY_RING_BITS: &str = "ring_bits";
const KEY_FRAC_BITS: &str = "frac_bits";
const KEY_DIGEST: &str = "model_digest";
const KEY_EVALUATION: &str = "evaluation";
const KEY_TRAINING: &str = "training";
const KEY_POOL: &str = "public_pool";

impl Model {
    /// Reads a model file (see the module doc) and checks it completely: container,
    /// format tag, architecture, every tensor's presence, dtype and shape, no extra
    /// tensors, the digest, the encodability at (l, f), and the public pool's binding.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let io = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_FILE_BYTES {
            return Err(ModelError::Format {
                reason: format!("file of {len} bytes exceeds the limit of {MAX_FILE_BYTES}"),
            });
        }
        // the file's bytes are the weights: zeroized once parsed
        let bytes = Zeroizing::new(std::fs::read(path).map_err(io)?);
        Self::from_bytes(&bytes)
    }

    /// Writes the model file (see the module doc). The weights are the server's secret:
    /// on Unix the file is readable by its owner only (mode 0600, also when it existed),
    /// and the serialised bytes are zeroized once written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let bytes = Zeroizing::new(self.to_bytes()?);
        crate::files::write_file(path, &bytes, true).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// The model file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let json = |key: &'static str, r: Result<String, serde_json::Error>| {
            r.map_err(|e| ModelError::BadMetadata {
                key,
                reason: e.to_string(),
            })
        };
        let mut meta = HashMap::new();
        meta.insert(KEY_FORMAT.to_string(), FORMAT.to_string());
        meta.insert(
            KEY_ARCH.to_string(),
            json(KEY_ARCH, serde_json::to_string(self.architecture()))?,
        );
        let fp = self.fixed_point();
        meta.insert(KEY_RING_BITS.to_string(), fp.ring_bits().to_string());
        meta.insert(KEY_FRAC_BITS.to_string(), fp.frac_bits().to_string());
        meta.insert(KEY_DIGEST.to_string(), self.digest().to_hex());
        if let Some(e) = self.evaluation() {
            meta.insert(
                KEY_EVALUATION.to_string(),
                json(KEY_EVALUATION, serde_json::to_string(e))?,
            );
        }
        if let Some(t) = self.training() {
            meta.insert(
                KEY_TRAINING.to_string(),
                json(KEY_TRAINING, serde_json::to_string(t))?,
            );
        }
        if let Some(p) = self.public_pool() {
            meta.insert(
                KEY_POOL.to_string(),
                json(KEY_POOL, serde_json::to_string(p))?,
            );
        }

        let specs = self.architecture().param_specs();
        let tensors: Vec<&Tensor> = self.params().iter().flatten().collect();
        let buffers: Vec<Vec<u8>> = tensors
            .iter()
            .map(|t| t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let mut views = Vec::with_capacity(specs.len());
        for (((name, _), t), buf) in specs.iter().zip(&tensors).zip(&buffers) {
            let view = TensorView::new(Dtype::F32, t.shape().to_vec(), buf).map_err(|e| {
                ModelError::Format {
                    reason: e.to_string(),
                }
            })?;
            views.push((name.clone(), view));
        }
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| ModelError::Format {
            reason: e.to_string(),
        })?;
        canonical_header(bytes)
    }

    /// Parses and checks a model file's bytes (see [`Model::load`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        check_length(bytes)?;
        let format_err = |e: safetensors::SafeTensorError| ModelError::Format {
            reason: e.to_string(),
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(format_err)?;
        let st = SafeTensors::deserialize(bytes).map_err(format_err)?;
        let empty = HashMap::new();
        let meta = header.metadata().as_ref().unwrap_or(&empty);
        let get = |key: &'static str| {
            meta.get(key)
                .map(String::as_str)
                .ok_or(ModelError::MissingMetadata { key })
        };

        let format = meta.get(KEY_FORMAT);
        if format.map(String::as_str) != Some(FORMAT) {
            return Err(ModelError::NotFusionModel {
                found: format.cloned(),
                expected: FORMAT.to_string(),
            });
        }
        let architecture: Architecture =
            serde_json::from_str(get(KEY_ARCH)?).map_err(|e| ModelError::BadMetadata {
                key: KEY_ARCH,
                reason: e.to_string(),
            })?;
        let ring_bits = parse_u32(KEY_RING_BITS, get(KEY_RING_BITS)?)?;
        let frac_bits = parse_u32(KEY_FRAC_BITS, get(KEY_FRAC_BITS)?)?;
        let fixed = FixedPoint::new(ring_bits, frac_bits).map_err(|e| ModelError::BadMetadata {
            key: KEY_RING_BITS,
            reason: e.to_string(),
        })?;
        let stored =
            ModelDigest::from_hex(get(KEY_DIGEST)?).map_err(|e| ModelError::BadMetadata {
                key: KEY_DIGEST,
                reason: e.to_string(),
            })?;

        // Tensors: exactly those the architecture declares, F32, of the declared shapes.
        let specs = architecture.param_specs();
        let mut params: Vec<Vec<Tensor>> = vec![Vec::new(); architecture.layers().len()];
        for (i, layer) in architecture.layers().iter().enumerate() {
            for p in layer.params() {
                let name = format!("{i}.{}", p.suffix);
                let view = st
                    .tensor(&name)
                    .map_err(|_| ModelError::MissingTensor { name: name.clone() })?;
                if view.dtype() != Dtype::F32 {
                    return Err(ModelError::DtypeMismatch {
                        name,
                        expected: "F32",
                        actual: view.dtype().to_string(),
                    });
                }
                if view.shape() != p.shape.as_slice() {
                    return Err(ModelError::ShapeMismatch {
                        name,
                        expected: p.shape,
                        actual: view.shape().to_vec(),
                    });
                }
                let data: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let t = Tensor::new(p.shape, data)?;
                if let Some(slot) = params.get_mut(i) {
                    slot.push(t);
                }
            }
        }
        for name in st.names() {
            if !specs.iter().any(|(n, _)| n == name) {
                return Err(ModelError::UnexpectedTensor {
                    name: name.to_string(),
                });
            }
        }

        // The digest first, so that any altered weight is reported as such.
        let computed = super::model::compute_digest(&architecture, fixed, &params);
        if computed != stored {
            return Err(ModelError::DigestMismatch {
                stored: stored.to_hex(),
                computed: computed.to_hex(),
            });
        }
        let mut model = Model::new(architecture, params, fixed)?;

        if let Some(s) = meta.get(KEY_EVALUATION) {
            let e: Evaluation = serde_json::from_str(s).map_err(|e| ModelError::BadMetadata {
                key: KEY_EVALUATION,
                reason: e.to_string(),
            })?;
            model = model.with_evaluation(e);
        }
        if let Some(s) = meta.get(KEY_TRAINING) {
            let t: TrainingRecord =
                serde_json::from_str(s).map_err(|e| ModelError::BadMetadata {
                    key: KEY_TRAINING,
                    reason: e.to_string(),
                })?;
            model = model.with_training(t);
        }
        if let Some(s) = meta.get(KEY_POOL) {
            let p: PublicPool = serde_json::from_str(s).map_err(|e| ModelError::BadMetadata {
                key: KEY_POOL,
                reason: e.to_string(),
            })?;
            model = model.with_public_pool(p)?;
        }
        Ok(model)
    }
}

fn parse_u32(key: &'static str, s: &str) -> Result<u32, ModelError> {
    s.parse()
        .map_err(|e: std::num::ParseIntError| ModelError::BadMetadata {
            key,
            reason: format!("{s:?}: {e}"),
        })
}

/// Checks the file's length against what its header accounts for, so that a truncated or
/// extended file gets its own error rather than a generic format error.
fn check_length(bytes: &[u8]) -> Result<(), ModelError> {
    let actual = bytes.len() as u64;
    let Some(n) = bytes.get(..8) else {
        return Err(ModelError::Truncated {
            expected: 8,
            actual,
        });
    };
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(n);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES {
        return Err(ModelError::Format {
            reason: format!("header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES}"),
        });
    }
    let header_end = 8 + n;
    let Some(header) = bytes.get(8..header_end as usize) else {
        return Err(ModelError::Truncated {
            expected: header_end,
            actual,
        });
    };
    // The data's end is the largest end offset of any tensor.
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| ModelError::Format {
            reason: format!("header is not a JSON object: {e}"),
        })?;
    let data_len = parsed
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let expected = header_end.saturating_add(data_len);
    if actual < expected {
        return Err(ModelError::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(ModelError::TrailingData { expected, actual });
    }
    Ok(())
}

/// Rewrites the JSON header of a safetensors buffer with its keys (and the metadata's
/// keys) in sorted order. The safetensors crate writes `__metadata__` from a `HashMap`, in
/// an order that changes from run to run; sorted, the same model gives the same bytes.
/// The header's length is unchanged (the same compact JSON, reordered).
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>, ModelError> {
    let bad = |reason: String| ModelError::Format { reason };
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(bytes.get(..8).ok_or_else(|| bad("short buffer".into()))?);
    let n = usize::try_from(u64::from_le_bytes(n8)).map_err(|e| bad(e.to_string()))?;
    let header = bytes
        .get(8..8 + n)
        .ok_or_else(|| bad("short header".into()))?;
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(e.to_string()))?;
    let mut sorted: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (k, v) in parsed {
        let v = if k == "__metadata__" {
            let m: BTreeMap<String, String> =
                serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
            serde_json::to_value(m).map_err(|e| bad(e.to_string()))?
        } else {
            v
        };
        sorted.insert(k, v);
    }
    let mut out_header = serde_json::to_vec(&sorted).map_err(|e| bad(e.to_string()))?;
    if out_header.len() > n {
        return Err(bad("canonical header longer than the original".into()));
    }
    out_header.resize(n, b' ');
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    out.extend_from_slice(&out_header);
    out.extend_from_slice(bytes.get(8 + n..).unwrap_or(&[]));
    Ok(out)
}
