//! Input gradients of the f32 evaluator: for each row x and a chosen output class c, the
//! gradient of logit c with respect to x. Used by the Papernot et al. substitute attack
//! (Jacobian-based dataset augmentation, AsiaCCS 2017 §4.2) on the attacker's own
//! substitute model.
//!
//! For an MLP, z_k = a_{k-1} W_k^T + b_k and a_k = relu(z_k); the gradient of logit c is
//! W_1^T D_1 W_2^T D_2 ... W_L[c, :]^T with D_k = diag(z_k > 0), computed backward row by
//! row as in the trainer's backward pass.

use super::LayerSpec;
use super::model::{Model, ModelError};
use ndarray::{Array2, ArrayView2, Axis};

impl Model {
    /// The gradient of logit `classes[r]` with respect to input row r, for every row of
    /// `x` (`[rows, input_len]`); returns `[rows, input_len]`.
    pub fn logit_input_gradients(
        &self,
        x: ArrayView2<'_, f32>,
        classes: &[usize],
    ) -> Result<Array2<f32>, ModelError> {
        let arch = self.architecture();
        if x.ncols() != arch.input_len() || classes.len() != x.nrows() {
            return Err(ModelError::InputLength {
                len: x.len(),
                row_len: arch.input_len(),
            });
        }
        if let Some(&c) = classes.iter().find(|&&c| c >= arch.output_len()) {
            return Err(ModelError::BadMetadata {
                key: "classes",
                reason: format!("class {c} is not below {}", arch.output_len()),
            });
        }
        // Forward, keeping each ReLU's input (its sign is the mask of the backward pass).
        let mut a = x.to_owned();
        let mut relu_inputs: Vec<Option<Array2<f32>>> = Vec::new();
        for (i, layer) in arch.layers().iter().enumerate() {
            match layer {
                LayerSpec::Dense { .. } => {
                    if let Some((w, b)) = self.dense(i) {
                        a = a.dot(&w.t()) + b;
                    }
                    relu_inputs.push(None);
                }
                LayerSpec::Relu => {
                    relu_inputs.push(Some(a.clone()));
                    a.mapv_inplace(|v| v.max(0.0));
                }
                LayerSpec::Flatten => relu_inputs.push(None),
            }
        }
        // Backward from one-hot(c) at the logits.
        let mut g = Array2::<f32>::zeros(a.raw_dim());
        for (mut row, &c) in g.axis_iter_mut(Axis(0)).zip(classes) {
            if let Some(v) = row.get_mut(c) {
                *v = 1.0;
            }
        }
        for (i, layer) in arch.layers().iter().enumerate().rev() {
            match layer {
                LayerSpec::Dense { .. } => {
                    if let Some((w, _)) = self.dense(i) {
                        g = g.dot(&w);
                    }
                }
                LayerSpec::Relu => {
                    if let Some(Some(z)) = relu_inputs.get(i) {
                        g.zip_mut_with(z, |gv, &zv| {
                            if zv <= 0.0 {
                                *gv = 0.0;
                            }
                        });
                    }
                }
                LayerSpec::Flatten => {}
            }
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use crate::fixed::FixedPoint;
    use crate::nn::train::{TrainConfig, train, train_from};
    use crate::nn::{Architecture, Model, Tensor};
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_model(rng: &mut ChaCha8Rng) -> Model {
        let arch = Architecture::mlp(&[6], &[5, 4], 3).unwrap();
        let params = arch
            .layers()
            .iter()
            .map(|l| {
                l.params()
                    .into_iter()
                    .map(|p| {
                        let n = p.shape.iter().product();
                        let data = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                        Tensor::new(p.shape, data).unwrap()
                    })
                    .collect()
            })
            .collect();
        Model::new(arch, params, FixedPoint::new(40, 12).unwrap()).unwrap()
    }

    #[test]
    fn logit_gradients_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let model = random_model(&mut rng);
        let x = Array2::from_shape_simple_fn((8, 6), || rng.random_range(0.0f32..1.0));
        let classes: Vec<usize> = (0..8).map(|r| r % 3).collect();
        let g = model.logit_input_gradients(x.view(), &classes).unwrap();
        let h = 1e-3f32;
        for r in 0..8 {
            for j in 0..6 {
                let mut p = x.clone();
                p[(r, j)] += h;
                let mut m = x.clone();
                m[(r, j)] -= h;
                let fp = model.forward_f32(p.view()).unwrap()[(r, classes[r])];
                let fm = model.forward_f32(m.view()).unwrap()[(r, classes[r])];
                let num = (fp - fm) / (2.0 * h);
                assert!(
                    (num - g[(r, j)]).abs() < 2e-2,
                    "{r},{j}: {num} vs {}",
                    g[(r, j)]
                );
            }
        }
        assert!(model.logit_input_gradients(x.view(), &[0]).is_err());
        assert!(model.logit_input_gradients(x.view(), &[3; 8]).is_err());
    }

    #[test]
    fn warm_start_continues_from_the_given_parameters() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x = Array2::from_shape_simple_fn((32, 3), || rng.random::<f32>());
        let y: Vec<u8> = (0..32).map(|i| (i % 3) as u8).collect();
        let config = TrainConfig {
            hidden: vec![4],
            epochs: 1,
            batch: 32,
            lr: 1e-7,
            ..TrainConfig::default()
        };
        let a = train(&config, &[3], 3, x.view(), &y).unwrap();
        let other = TrainConfig {
            seed: 99,
            ..config.clone()
        };
        let b = train_from(&other, &[3], 3, x.view(), &y, Some(&a.params)).unwrap();
        for (ta, tb) in a.params.iter().flatten().zip(b.params.iter().flatten()) {
            for (va, vb) in ta.data().iter().zip(tb.data()) {
                assert!((va - vb).abs() < 1e-5);
            }
        }
        let fresh = train(&other, &[3], 3, x.view(), &y).unwrap();
        assert_ne!(fresh.params, b.params);
        let wrong = train_from(&config, &[3], 2, x.view(), &[0; 32], Some(&a.params));
        assert!(wrong.is_err());
    }
}
