//! The model owner.
#![forbid(unsafe_code)]
