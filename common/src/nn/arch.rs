//! The public architecture of a model: its input shape and its list of layers with their
//! shapes. This is what a client may know (it is sent in `GetModelInfo`); the weights are
//! kept apart, in [`super::Model`], and only the server holds them (as in Delphi, where the
//! client knows the network's structure but not its parameters).
//!
//! A model is a sequence of layers; each layer takes the previous layer's output (the first
//! takes the input). Shapes are row-major, channels first for images (`[c, h, w]`), with the
//! batch dimension left out. Later layer kinds fit in without a rewrite: `Conv2d` and
//! `AvgPool`/`MaxPool` map `[c, h, w]` to `[c', h', w']`, a folded `BatchNorm` is a
//! per-channel affine map, and a residual `Add { from }` adds the output of an earlier layer
//! (by index) to the previous layer's output; the enum is `#[non_exhaustive]` for that.

use serde::{Deserialize, Serialize};

/// The largest number of elements one activation tensor may have (a sanity bound for
/// shapes read from files or peers, far above ResNet-50's largest activation).
pub const MAX_ELEMENTS: usize = 1 << 28;
/// The largest number of layers an architecture may have.
pub const MAX_LAYERS: usize = 4096;
/// The largest number of dimensions of a shape.
pub const MAX_DIMS: usize = 8;

/// Errors of architecture construction and decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArchError {
    /// The architecture has no layers.
    #[error("architecture has no layers")]
    NoLayers,
    /// Too many layers.
    #[error("architecture has {count} layers, at most {MAX_LAYERS} are allowed")]
    TooManyLayers {
        /// number of layers
        count: usize,
    },
    /// A shape with no dimensions, too many dimensions, or a zero dimension.
    #[error("bad shape {shape:?} at {place}")]
    BadShape {
        /// where the shape occurs (e.g. "input", "layer 3 (dense)")
        place: String,
        /// the shape
        shape: Vec<usize>,
    },
    /// A tensor with more than [`MAX_ELEMENTS`] elements.
    #[error("shape {shape:?} at {place} has more than {MAX_ELEMENTS} elements")]
    TooLarge {
        /// where the shape occurs
        place: String,
        /// the shape
        shape: Vec<usize>,
    },
    /// A layer does not accept the shape its predecessor produces.
    #[error("layer {layer} ({kind}) expects input shape {expected:?}, gets {actual:?}")]
    LayerInput {
        /// index of the layer
        layer: usize,
        /// kind of the layer
        kind: &'static str,
        /// the input shape the layer expects
        expected: Vec<usize>,
        /// the shape it gets
        actual: Vec<usize>,
    },
    /// The last layer does not produce a vector (a classifier's logits).
    #[error("the model's output shape {shape:?} is not a non-empty vector")]
    OutputNotVector {
        /// the output shape
        shape: Vec<usize>,
    },
}

/// One layer of a model: its kind and the shapes it fixes. Parameters (weights) are not
/// part of a spec; [`LayerSpec::params`] says which tensors a layer has and their shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum LayerSpec {
    /// Fully connected: y = W x + b with W of shape `[outputs, inputs]` (PyTorch's
    /// `nn.Linear` layout) and b of shape `[outputs]`. Input must be the vector `[inputs]`.
    Dense {
        /// input length
        inputs: usize,
        /// output length
        outputs: usize,
    },
    /// Elementwise max(0, x); any shape.
    Relu,
    /// Flattens any shape to a vector in row-major order (no data movement).
    Flatten,
}

/// A parameter tensor of a layer: its name suffix and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// `"weight"` or `"bias"` (the tensor in the file is named `"{layer}.{suffix}"`).
    pub suffix: &'static str,
    /// Shape of the tensor.
    pub shape: Vec<usize>,
}

impl LayerSpec {
    /// A short name of the layer kind (`"dense"`, `"relu"`, `"flatten"`).
    pub fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Dense { .. } => "dense",
            LayerSpec::Relu => "relu",
            LayerSpec::Flatten => "flatten",
        }
    }

    /// The parameter tensors this layer needs, in canonical order.
    pub fn params(&self) -> Vec<ParamSpec> {
        match *self {
            LayerSpec::Dense { inputs, outputs } => vec![
                ParamSpec {
                    suffix: "weight",
                    shape: vec![outputs, inputs],
                },
                ParamSpec {
                    suffix: "bias",
                    shape: vec![outputs],
                },
            ],
            LayerSpec::Relu | LayerSpec::Flatten => Vec::new(),
        }
    }

    /// The output shape for the given input shape (`layer` is the index, for errors).
    pub fn output_shape(&self, layer: usize, input: &[usize]) -> Result<Vec<usize>, ArchError> {
        let out = match *self {
            LayerSpec::Dense { inputs, outputs } => {
                if input != [inputs] {
                    return Err(ArchError::LayerInput {
                        layer,
                        kind: self.kind(),
                        expected: vec![inputs],
                        actual: input.to_vec(),
                    });
                }
                vec![outputs]
            }
            LayerSpec::Relu => input.to_vec(),
            LayerSpec::Flatten => vec![input.iter().product()],
        };
        check_shape(&format!("layer {layer} ({})", self.kind()), &out)?;
        Ok(out)
    }
}

/// Checks that a shape has 1..=MAX_DIMS non-zero dimensions and at most MAX_ELEMENTS
/// elements.
fn check_shape(place: &str, shape: &[usize]) -> Result<(), ArchError> {
    if shape.is_empty() || shape.len() > MAX_DIMS || shape.contains(&0) {
        return Err(ArchError::BadShape {
            place: place.to_string(),
            shape: shape.to_vec(),
        });
    }
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS);
    if elements.is_none() {
        return Err(ArchError::TooLarge {
            place: place.to_string(),
            shape: shape.to_vec(),
        });
    }
    Ok(())
}

/// The public description of a model: input shape and layers. Always valid: every layer
/// accepts its predecessor's output and the model outputs a vector. Deserialising checks
/// the same, so an architecture read from a file or a peer is valid too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawArchitecture", into = "RawArchitecture")]
pub struct Architecture {
    input: Vec<usize>,
    layers: Vec<LayerSpec>,
    /// shapes[i] is the output shape of layer i (derived, not serialised).
    shapes: Vec<Vec<usize>>,
}

/// The serialised form of [`Architecture`], checked by `TryFrom`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArchitecture {
    input: Vec<usize>,
    layers: Vec<LayerSpec>,
}

impl TryFrom<RawArchitecture> for Architecture {
    type Error = ArchError;
    fn try_from(raw: RawArchitecture) -> Result<Self, ArchError> {
        Architecture::new(raw.input, raw.layers)
    }
}

impl From<Architecture> for RawArchitecture {
    fn from(a: Architecture) -> Self {
        RawArchitecture {
            input: a.input,
            layers: a.layers,
        }
    }
}

impl Architecture {
    /// An architecture with the given input shape and layers, checked.
    pub fn new(input: Vec<usize>, layers: Vec<LayerSpec>) -> Result<Self, ArchError> {
        check_shape("input", &input)?;
        if layers.is_empty() {
            return Err(ArchError::NoLayers);
        }
        if layers.len() > MAX_LAYERS {
            return Err(ArchError::TooManyLayers {
                count: layers.len(),
            });
        }
        let mut shapes = Vec::with_capacity(layers.len());
        let mut shape = input.clone();
        for (i, layer) in layers.iter().enumerate() {
            shape = layer.output_shape(i, &shape)?;
            shapes.push(shape.clone());
        }
        if shape.len() != 1 {
            return Err(ArchError::OutputNotVector { shape });
        }
        Ok(Self {
            input,
            layers,
            shapes,
        })
    }

    /// A multi-layer perceptron: `Flatten` (if the input is not a vector), then for each
    /// hidden width `Dense` + `Relu`, then a last `Dense` to `classes` outputs.
    pub fn mlp(input: &[usize], hidden: &[usize], classes: usize) -> Result<Self, ArchError> {
        let mut layers = Vec::with_capacity(2 * hidden.len() + 2);
        if input.len() != 1 {
            layers.push(LayerSpec::Flatten);
        }
        let mut width: usize = input.iter().product();
        for &h in hidden {
            layers.push(LayerSpec::Dense {
                inputs: width,
                outputs: h,
            });
            layers.push(LayerSpec::Relu);
            width = h;
        }
        layers.push(LayerSpec::Dense {
            inputs: width,
            outputs: classes,
        });
        Self::new(input.to_vec(), layers)
    }

    /// The input shape (without the batch dimension).
    pub fn input_shape(&self) -> &[usize] {
        &self.input
    }

    /// Number of input elements per row.
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }

    /// The layers, in evaluation order.
    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    /// The output shape of layer `i`, or `None` if there is no such layer.
    pub fn layer_output_shape(&self, i: usize) -> Option<&[usize]> {
        self.shapes.get(i).map(Vec::as_slice)
    }

    /// The input shape of layer `i`, or `None` if there is no such layer.
    pub fn layer_input_shape(&self, i: usize) -> Option<&[usize]> {
        match i {
            0 => Some(&self.input),
            _ if i < self.layers.len() => self.shapes.get(i - 1).map(Vec::as_slice),
            _ => None,
        }
    }

    /// Number of outputs (classes) per row.
    pub fn output_len(&self) -> usize {
        // `new` guarantees at least one layer and a vector output.
        self.shapes.last().map_or(0, |s| s.iter().product())
    }

    /// All parameter tensors of the model in canonical order (layer by layer, weight before
    /// bias), with their names as stored in model files: `"{layer index}.{suffix}"`, the
    /// names PyTorch gives the state dict of the equivalent `nn.Sequential`.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.params()
                    .into_iter()
                    .map(move |p| (format!("{i}.{}", p.suffix), p.shape))
            })
            .collect()
    }

    /// Number of scalar parameters of the model.
    pub fn param_count(&self) -> usize {
        self.param_specs()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// A canonical byte encoding (for digests): a version tag, the input shape, and each
    /// layer as a tag byte followed by its dimensions, all integers little-endian u64.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |x: usize| out.extend_from_slice(&(x as u64).to_le_bytes());
        put(1); // encoding version
        put(self.input.len());
        for &d in &self.input {
            put(d);
        }
        put(self.layers.len());
        for layer in &self.layers {
            match *layer {
                LayerSpec::Dense { inputs, outputs } => {
                    put(1);
                    put(inputs);
                    put(outputs);
                }
                LayerSpec::Relu => put(2),
                LayerSpec::Flatten => put(3),
            }
        }
        out
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "input {:?}", self.input)?;
        for (layer, shape) in self.layers.iter().zip(&self.shapes) {
            write!(f, " -> {} {:?}", layer.kind(), shape)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_shapes_and_names() {
        let a = Architecture::mlp(&[1, 28, 28], &[128, 128], 10).unwrap();
        assert_eq!(a.layers().len(), 6);
        assert_eq!(a.input_len(), 784);
        assert_eq!(a.output_len(), 10);
        assert_eq!(a.layer_output_shape(0), Some(&[784][..]));
        assert_eq!(a.layer_input_shape(1), Some(&[784][..]));
        assert_eq!(a.layer_input_shape(6), None);
        let names: Vec<String> = a.param_specs().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"
            ]
        );
        assert_eq!(
            a.param_count(),
            784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
        );
        assert_eq!(
            a.to_string(),
            "input [1, 28, 28] -> flatten [784] -> dense [128] -> relu [128] -> dense [128] \
             -> relu [128] -> dense [10]"
        );
    }

    #[test]
    fn json_round_trip_and_checked_decoding() {
        let a = Architecture::mlp(&[784], &[32], 10).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"input":[784],"layers":[{"type":"dense","inputs":784,"outputs":32},{"type":"relu"},{"type":"dense","inputs":32,"outputs":10}]}"#
        );
        assert_eq!(serde_json::from_str::<Architecture>(&json).unwrap(), a);
        // A layer that does not fit its input is refused while decoding.
        let bad = json.replace("\"inputs\":32", "\"inputs\":33");
        assert!(serde_json::from_str::<Architecture>(&bad).is_err());
        let unknown = json.replace("relu", "sigmoid");
        assert!(serde_json::from_str::<Architecture>(&unknown).is_err());
    }

    #[test]
    fn refusals() {
        assert_eq!(Architecture::new(vec![4], vec![]), Err(ArchError::NoLayers));
        assert!(matches!(
            Architecture::new(vec![0], vec![LayerSpec::Relu]),
            Err(ArchError::BadShape { .. })
        ));
        assert!(matches!(
            Architecture::new(vec![1 << 20, 1 << 20], vec![LayerSpec::Flatten]),
            Err(ArchError::TooLarge { .. })
        ));
        assert_eq!(
            Architecture::new(
                vec![2, 2],
                vec![LayerSpec::Dense {
                    inputs: 4,
                    outputs: 1
                }]
            ),
            Err(ArchError::LayerInput {
                layer: 0,
                kind: "dense",
                expected: vec![4],
                actual: vec![2, 2]
            })
        );
        assert!(matches!(
            Architecture::new(vec![2, 2], vec![LayerSpec::Relu]),
            Err(ArchError::OutputNotVector { .. })
        ));
    }
}
