//! The victim as the experimenter sees it, for measurement only (never counted as
//! queries): its logits and labels in the oracle's arithmetic, and its parameters as the
//! oracle computes with them (for fixed point: the weights decoded from the ring).

use super::data::Arithmetic;
use fusion_common::fixed::{FixedLayer, eval_fixed};
use fusion_common::nn::{LayerSpec, Model};
use ndarray::{Array1, Array2};

/// Logits of `xs` (rows in [0, 1]) in the given arithmetic; inputs encoded exactly as the
/// oracle encodes them.
pub fn logits(
    model: &Model,
    arithmetic: Arithmetic,
    xs: &[Vec<f32>],
) -> anyhow::Result<Vec<Vec<f64>>> {
    match arithmetic {
        Arithmetic::Fixed => {
            let fm = model.fixed_model();
            let fp = fm.fixed_point();
            let mut enc = Vec::with_capacity(xs.len() * fm.input_len());
            for x in xs {
                for &v in x {
                    enc.push(fp.encode(f64::from(v))?);
                }
            }
            let r = eval_fixed(fm, &enc)?;
            let scale = 2f64.powi(-(fp.frac_bits() as i32));
            Ok((0..r.rows())
                .filter_map(|i| r.signed_logits(i))
                .map(|l| l.into_iter().map(|v| v as f64 * scale).collect())
                .collect())
        }
        Arithmetic::F32 => {
            let d = model.architecture().input_len();
            let flat: Vec<f32> = xs.iter().flatten().copied().collect();
            let x = Array2::from_shape_vec((xs.len(), d), flat)?;
            let y = model.forward_f32(x.view())?;
            Ok(y.rows()
                .into_iter()
                .map(|r| r.iter().map(|&v| f64::from(v)).collect())
                .collect())
        }
    }
}

/// The dense layers (W `[outputs, inputs]`, b) as the oracle computes with them.
pub fn dense_layers(model: &Model, arithmetic: Arithmetic) -> Vec<(Array2<f64>, Array1<f64>)> {
    let arch = model.architecture();
    let mut out = Vec::new();
    for (i, spec) in arch.layers().iter().enumerate() {
        let LayerSpec::Dense { inputs, outputs } = *spec else {
            continue;
        };
        match arithmetic {
            Arithmetic::F32 => {
                if let Some((w, b)) = model.dense(i) {
                    out.push((w.mapv(f64::from), b.mapv(f64::from)));
                }
            }
            Arithmetic::Fixed => {
                let fm = model.fixed_model();
                let fp = fm.fixed_point();
                if let Some(FixedLayer::Dense(d)) = fm.layers().get(i) {
                    let w = Array2::from_shape_fn((outputs, inputs), |(o, j)| {
                        fp.decode(d.weight()[o * inputs + j])
                    });
                    let b = Array1::from_shape_fn(outputs, |o| {
                        fp.decode_scaled(d.bias()[o], 2 * fp.frac_bits())
                    });
                    out.push((w, b));
                }
            }
        }
    }
    out
}
