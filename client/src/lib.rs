//! The client: the library other commands build on ([`Client`]: connect over mutual
//! TLS, `model_info`, `public_pool`, `session`) and the `info` and `demo` commands.
#![forbid(unsafe_code)]

pub mod args;
pub mod attack;
pub mod bench;
pub mod client;
pub mod demo;
pub mod echo;
pub mod info_cmd;
pub mod link;
pub mod tune_cmd;

pub use client::{Client, ClientError, ClientOptions, SessionOutput};
