//! The client.
#![forbid(unsafe_code)]

pub mod link;
pub mod attack;
