//! Neural networks on the server's side: the public architecture, models with their
//! secret weights, model files (safetensors), the f32 evaluator, training (ndarray), the
//! MNIST loader and the public pool.
//!
//! - [`Architecture`] / [`LayerSpec`]: what the client may know (shapes; sent in
//!   `GetModelInfo`).
//! - [`Model`]: architecture + weights (server only) + fixed-point parameters (l, f) +
//!   [`ModelDigest`] + recorded [`Evaluation`] and [`PublicPool`];
//!   [`Model::load`]/[`Model::save`] read and write safetensors files.
//! - [`Model::fixed_model`]: the model in the ring, evaluated by
//!   [`crate::fixed::eval_fixed`] with the exact semantics the secure backends reproduce.
//! - [`Model::forward_f32`] / [`Model::predict_f32`]: the f32 evaluator.
//! - [`train`]: mini-batch Adam on softmax cross-entropy, deterministic for a seed.
//! - [`mnist`]: the gzip IDX loader.

mod arch;
mod digest;
mod eval;
mod file;
mod grad;
pub mod mnist;
mod model;
mod pool;
#[cfg(test)]
mod tests;
pub mod train;
pub use arch::{ArchError, Architecture, LayerSpec, MAX_DIMS, MAX_ELEMENTS, MAX_LAYERS, ParamSpec};
pub use eval::{EvalReport, calibrate, evaluate};
pub use file::{FORMAT, MAX_FILE_BYTES};
pub use model::{Counts, Evaluation, Model, ModelDigest, ModelError, Tensor, TrainingRecord};
pub use pool::{MNIST_POOL_SIZE, MNIST_POOL_START, PoolDigest, PoolError, PublicPool};
