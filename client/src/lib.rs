//! The client.
#![forbid(unsafe_code)]

pub mod link;
