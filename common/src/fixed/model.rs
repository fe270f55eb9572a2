//! A model encoded into the ring (what the secure backends compute with) and the batched
//! fixed-point evaluator.

use super::{FixedError, FixedPoint, REQUIRED_HEADROOM_BITS, headroom_bits};
use crate::nn::{Architecture, LayerSpec, ModelDigest, Tensor};
use zeroize::Zeroizing;

/// A dense layer in the ring: W (scale 2^f) row-major `[outputs][inputs]`, B (scale
/// 2^(2f)) of length `outputs`, all as ring elements. Secret to the server: zeroized on
/// drop and not printed by `Debug`.
#[derive(Clone)]
pub struct FixedDense {
    inputs: usize,
    outputs: usize,
    weight: Zeroizing<Vec<u64>>,
    bias: Zeroizing<Vec<u64>>,
    /// The signed readings of `weight`, for the evaluator's integer inner products.
    weight_signed: Zeroizing<Vec<i64>>,
    /// The signed readings of `bias`.
    bias_signed: Zeroizing<Vec<i64>>,
}

impl std::fmt::Debug for FixedDense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedDense")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("weight", &"[redacted]")
            .field("bias", &"[redacted]")
            .finish()
    }
}

impl FixedDense {
    /// Input length.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output length.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// W as ring elements at scale 2^f, row-major `[outputs][inputs]`.
    pub fn weight(&self) -> &[u64] {
        &self.weight
    }

    /// Row `o` of W (the weights of output `o`), or `None` if `o >= outputs`.
    pub fn weight_row(&self, o: usize) -> Option<&[u64]> {
        self.weight.get(o * self.inputs..(o + 1) * self.inputs)
    }

    /// B as ring elements at scale 2^(2f).
    pub fn bias(&self) -> &[u64] {
        &self.bias
    }
}

/// One layer of a [`FixedModel`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FixedLayer {
    /// acc = W x + B mod 2^l, then y = acc >> f (exact arithmetic shift).
    Dense(FixedDense),
    /// y = max(0, signed(x)).
    Relu,
    /// No-op on row-major data (kept so layer indices match the architecture).
    Flatten,
}

/// A model in the ring Z_{2^l}: the layers of an [`crate::nn::Model`] with their
/// parameters encoded at the model's fixed-point scale. This is what the secure backends
/// evaluate; [`eval_fixed`] is their plaintext reference, bit for bit.
#[derive(Debug, Clone)]
pub struct FixedModel {
    fixed: FixedPoint,
    architecture: Architecture,
    layers: Vec<FixedLayer>,
    digest: ModelDigest,
}

impl FixedModel {
    /// Encodes the parameters of a model (called by `Model::new`, which checks the tensors'
    /// shapes first). `params[i]` are layer i's tensors in `LayerSpec::params` order.
    pub(crate) fn encode(
        architecture: &Architecture,
        params: &[Vec<Tensor>],
        fixed: FixedPoint,
        digest: ModelDigest,
    ) -> Result<Self, FixedError> {
        let mut layers = Vec::with_capacity(architecture.layers().len());
        for (i, (spec, tensors)) in architecture.layers().iter().zip(params).enumerate() {
            let layer = match (*spec, tensors.as_slice()) {
                (LayerSpec::Dense { inputs, outputs }, [w, b]) => {
                    let weight = encode_tensor(&format!("{i}.weight"), w, |v| fixed.encode(v))?;
                    let bias = encode_tensor(&format!("{i}.bias"), b, |v| fixed.encode_bias(v))?;
                    let r = fixed.ring();
                    let weight_signed =
                        Zeroizing::new(weight.iter().map(|&x| r.to_signed(x)).collect());
                    let bias_signed =
                        Zeroizing::new(bias.iter().map(|&x| r.to_signed(x)).collect());
                    FixedLayer::Dense(FixedDense {
                        inputs,
                        outputs,
                        weight,
                        bias,
                        weight_signed,
                        bias_signed,
                    })
                }
                (LayerSpec::Relu, []) => FixedLayer::Relu,
                (LayerSpec::Flatten, []) => FixedLayer::Flatten,
                (other, _) => {
                    return Err(FixedError::UnsupportedLayer {
                        layer: i,
                        kind: other.kind(),
                    });
                }
            };
            layers.push(layer);
        }
        Ok(Self {
            fixed,
            architecture: architecture.clone(),
            layers,
            digest,
        })
    }

    /// The fixed-point parameters (l, f).
    pub fn fixed_point(&self) -> FixedPoint {
        self.fixed
    }

    /// The public architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// The layers in evaluation order (indices match the architecture's).
    pub fn layers(&self) -> &[FixedLayer] {
        &self.layers
    }

    /// The digest of the model this was encoded from.
    pub fn digest(&self) -> &ModelDigest {
        &self.digest
    }

    /// Elements per input row.
    pub fn input_len(&self) -> usize {
        self.architecture.input_len()
    }

    /// Logits per row.
    pub fn output_len(&self) -> usize {
        self.architecture.output_len()
    }

    /// Encodes 8-bit images (row-major, `input_len` pixels each) as ring inputs.
    pub fn encode_images(&self, pixels: &[u8]) -> Vec<u64> {
        self.fixed.encode_pixels(pixels)
    }

    /// An upper bound on |acc| of every dense layer over all inputs whose elements (signed
    /// ring integers at scale 2^f) lie in [lo, hi], by interval arithmetic on the exact
    /// integers (assuming nothing wraps, which holds while the bound stays below
    /// 2^(l-1)). For pixels in [0, 1], lo = 0 and hi = 2^f. Unlike the accumulators
    /// measured on MNIST, this covers any input a client could send within the range.
    pub fn accumulator_bound(&self, lo: i64, hi: i64) -> u128 {
        let f = self.fixed.frac_bits();
        let width = self.input_len();
        let mut ivals: Vec<(i128, i128)> =
            vec![(i128::from(lo.min(hi)), i128::from(hi.max(lo))); width];
        let mut bound = 0u128;
        for layer in &self.layers {
            match layer {
                FixedLayer::Dense(d) => {
                    let mut next = Vec::with_capacity(d.outputs);
                    for (w, &b) in d
                        .weight_signed
                        .chunks_exact(d.inputs)
                        .zip(d.bias_signed.iter())
                    {
                        let (mut a, mut z) = (i128::from(b), i128::from(b));
                        for (&wj, &(l, h)) in w.iter().zip(&ivals) {
                            let (p, q) = (i128::from(wj) * l, i128::from(wj) * h);
                            a += p.min(q);
                            z += p.max(q);
                        }
                        bound = bound.max(a.unsigned_abs()).max(z.unsigned_abs());
                        // The arithmetic shift is monotone.
                        next.push((a >> f, z >> f));
                    }
                    ivals = next;
                }
                FixedLayer::Relu => {
                    for v in &mut ivals {
                        *v = (v.0.max(0), v.1.max(0));
                    }
                }
                FixedLayer::Flatten => {}
            }
        }
        bound
    }

    /// Runs [`eval_fixed`].
    pub fn eval(&self, inputs: &[u64]) -> Result<FixedEval, FixedError> {
        eval_fixed(self, inputs)
    }
}

fn encode_tensor(
    name: &str,
    t: &Tensor,
    enc: impl Fn(f64) -> Result<u64, FixedError>,
) -> Result<Zeroizing<Vec<u64>>, FixedError> {
    let mut out = Zeroizing::new(Vec::with_capacity(t.data().len()));
    for (index, &v) in t.data().iter().enumerate() {
        let x = enc(f64::from(v)).map_err(|e| FixedError::Param {
            tensor: name.to_string(),
            index,
            source: Box::new(e),
        })?;
        out.push(x);
    }
    Ok(out)
}

/// The result of a fixed-point evaluation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedEval {
    /// Logits as ring elements at scale 2^f, row-major `[rows][classes]`.
    pub logits: Vec<u64>,
    /// The label of each row: the first index of its largest signed logit.
    pub labels: Vec<usize>,
    /// Logits per row.
    pub classes: usize,
    /// l.
    pub ring_bits: u32,
    /// The largest |acc| over every dense layer's accumulators (before truncation), as
    /// exact integers (not reduced mod 2^l).
    pub max_abs_acc: u64,
    /// Per dense layer: (layer index, largest |acc| in that layer).
    pub layer_max_abs_acc: Vec<(usize, u64)>,
    /// Number of accumulators whose exact value fell outside the ring's signed range
    /// (wrapped around mod 2^l). Zero whenever the headroom is non-negative.
    pub wrapped: usize,
}

impl FixedEval {
    /// Number of rows evaluated.
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// The logits of row `r` as signed integers (scale 2^f), or `None` past the end.
    pub fn signed_logits(&self, r: usize) -> Option<Vec<i64>> {
        let shift = 64 - self.ring_bits;
        self.logits
            .get(r * self.classes..(r + 1) * self.classes)
            .map(|row| {
                row.iter()
                    .map(|&x| ((x << shift) as i64) >> shift)
                    .collect()
            })
    }

    /// Bits between the largest |acc| and the sign bit: (l - 1) - bit_len(max |acc|).
    pub fn headroom_bits(&self) -> i64 {
        headroom_bits(self.ring_bits, self.max_abs_acc)
    }

    /// Errs unless every accumulator kept at least `required` bits of headroom.
    pub fn require_headroom(&self, required: u32) -> Result<(), FixedError> {
        let h = self.headroom_bits();
        if h < i64::from(required) {
            return Err(FixedError::Headroom {
                max_abs_acc: self.max_abs_acc,
                ring_bits: self.ring_bits,
                headroom_bits: h,
                required,
            });
        }
        Ok(())
    }
}

/// The first index of the largest value (the label of a row of signed logits).
pub fn first_argmax(values: &[i64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Rows handled together by the dense kernel (each weight row is loaded once per block).
const ROW_BLOCK: usize = 8;

/// Evaluates the model on a batch of ring inputs (row-major, `input_len` elements per row,
/// each reduced mod 2^l) with exactly the semantics of the module doc: products and sums
/// wrap mod 2^l, truncation is the exact arithmetic shift of the signed reading, ReLU acts
/// on the signed reading. Also measures the accumulators; logs a warning when the headroom
/// is below [`REQUIRED_HEADROOM_BITS`] (use [`FixedEval::require_headroom`] to refuse).
///
/// Inner products are computed over the signed readings in i64 with wrapping arithmetic,
/// which is congruent mod 2^64 (hence mod 2^l) to the ring computation, and is the exact
/// integer value whenever it does not overflow i64; the ring result is that value mod
/// 2^l, and comparing the two tells whether the ring wrapped.
pub fn eval_fixed(model: &FixedModel, inputs: &[u64]) -> Result<FixedEval, FixedError> {
    let fp = model.fixed;
    let ring = fp.ring();
    let f = fp.frac_bits();
    let row_len = model.input_len();
    if !inputs.len().is_multiple_of(row_len) {
        return Err(FixedError::InputLength {
            len: inputs.len(),
            row_len,
        });
    }
    if let Some((index, &value)) = inputs.iter().enumerate().find(|&(_, &x)| x > ring.mask()) {
        return Err(FixedError::Unreduced {
            index,
            value,
            ring_bits: ring.bits(),
        });
    }
    let rows = inputs.len() / row_len;
    // Activations are kept as signed readings of ring elements.
    let mut act: Vec<i64> = inputs.iter().map(|&x| ring.to_signed(x)).collect();
    let mut width = row_len;
    let mut max_abs_acc = 0u64;
    let mut layer_max_abs_acc = Vec::new();
    let mut wrapped = 0usize;

    for (index, layer) in model.layers.iter().enumerate() {
        match layer {
            FixedLayer::Dense(d) => {
                let mut out = vec![0i64; rows * d.outputs];
                let mut layer_max = 0u64;
                for (x_block, y_block) in act
                    .chunks(ROW_BLOCK * width)
                    .zip(out.chunks_mut(ROW_BLOCK * d.outputs))
                {
                    dense_block(d, x_block, y_block, |acc| {
                        // acc is the exact integer accumulator (barring i64 overflow).
                        let ring_acc = ring.to_signed(acc as u64);
                        if ring_acc != acc {
                            wrapped += 1;
                        }
                        layer_max = layer_max.max(acc.unsigned_abs());
                        // y = floor(signed(acc mod 2^l) / 2^f), read back mod 2^l.
                        ring.to_signed(ring.from_signed(ring_acc >> f))
                    });
                }
                max_abs_acc = max_abs_acc.max(layer_max);
                layer_max_abs_acc.push((index, layer_max));
                act = out;
                width = d.outputs;
            }
            FixedLayer::Relu => {
                for v in &mut act {
                    *v = (*v).max(0);
                }
            }
            FixedLayer::Flatten => {}
        }
    }

    let classes = width;
    let labels = if classes == 0 {
        Vec::new()
    } else {
        act.chunks(classes).map(first_argmax).collect()
    };
    let logits = act.iter().map(|&v| ring.from_signed(v)).collect();
    let result = FixedEval {
        logits,
        labels,
        classes,
        ring_bits: ring.bits(),
        max_abs_acc,
        layer_max_abs_acc,
        wrapped,
    };
    let h = result.headroom_bits();
    // Warned when a wrap happened, else only at a new lowest headroom in this process: an
    // attack evaluating millions of random rows would otherwise log every batch.
    static LOWEST_WARNED: std::sync::atomic::AtomicI64 =
        std::sync::atomic::AtomicI64::new(i64::MAX);
    let new_low = LOWEST_WARNED.fetch_min(h, std::sync::atomic::Ordering::Relaxed) > h;
    if h < i64::from(REQUIRED_HEADROOM_BITS) && (wrapped > 0 || new_low) {
        tracing::warn!(
            max_abs_acc,
            headroom_bits = h,
            wrapped,
            required = REQUIRED_HEADROOM_BITS,
            "fixed-point evaluation: accumulator headroom below the required bits"
        );
    }
    Ok(result)
}

/// One block of up to ROW_BLOCK rows through a dense layer: `post` maps each exact
/// accumulator W_o . x_r + B_o to the layer's output.
fn dense_block(d: &FixedDense, x: &[i64], y: &mut [i64], mut post: impl FnMut(i64) -> i64) {
    let n = d.inputs;
    let rows = x.len() / n;
    if rows == ROW_BLOCK {
        let xr: [&[i64]; ROW_BLOCK] = std::array::from_fn(|r| &x[r * n..(r + 1) * n]);
        for (o, (w, &b)) in d
            .weight_signed
            .chunks_exact(n)
            .zip(d.bias_signed.iter())
            .enumerate()
        {
            let mut acc = [b; ROW_BLOCK];
            for (j, &wj) in w.iter().enumerate() {
                for r in 0..ROW_BLOCK {
                    acc[r] = acc[r].wrapping_add(wj.wrapping_mul(xr[r][j]));
                }
            }
            for (r, &a) in acc.iter().enumerate() {
                y[r * d.outputs + o] = post(a);
            }
        }
    } else {
        for (xrow, yrow) in x.chunks_exact(n).zip(y.chunks_exact_mut(d.outputs)) {
            for ((w, &b), yo) in d
                .weight_signed
                .chunks_exact(n)
                .zip(d.bias_signed.iter())
                .zip(yrow.iter_mut())
            {
                let acc = w
                    .iter()
                    .zip(xrow)
                    .fold(b, |a, (&wj, &xj)| a.wrapping_add(wj.wrapping_mul(xj)));
                *yo = post(acc);
            }
        }
    }
}
