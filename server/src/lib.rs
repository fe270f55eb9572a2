//! The model owner.
#![forbid(unsafe_code)]

pub mod model_cmd;
