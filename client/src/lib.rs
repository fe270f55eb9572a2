//! The client.
#![forbid(unsafe_code)]

pub mod attack;
pub mod link;
