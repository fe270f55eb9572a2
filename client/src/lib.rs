//! The client: the library other commands build on ([`Client`]: connect over mutual
//! TLS, `model_info`, `public_pool`, `session`; [`infer::run`]: a secure inference) and
//! the `info`, `infer`, `demo` and `bench` commands.
#![forbid(unsafe_code)]

pub mod args;
pub mod attack;
pub mod audit;
pub mod bench;
pub mod charts;
pub mod cli;
pub mod client;
pub mod demo;
pub mod echo;
pub mod infer;
pub mod info_cmd;
pub mod link;
pub mod local;
pub mod report;
pub mod trust;
pub mod tune_cmd;
pub mod verified;

pub use client::{Client, ClientError, ClientOptions, SessionOutput};
