//! `fusion-client`.
#![forbid(unsafe_code)]

fn main() {}
