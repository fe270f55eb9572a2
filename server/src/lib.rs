//! The model owner: the gRPC service over mutual TLS, its policy and budgets, the
//! backend registry, and the `serve` / `certs` commands.
//!
//! - [`state`]: [`state::ServerState`] (served model, policy, budgets, limits);
//! - [`runner`]: [`runner::Registry`] of backends and the [`runner::SessionRunner`] trait;
//! - [`backends`]: the secure-inference runners (`cheetah`) over `fusion_common::backend`;
//! - [`service`]: the tonic service (`GetModelInfo`, `GetPublicPool`, `Session`);
//! - [`server`]: [`server::spawn`] binds and serves, returning a [`server::ServerHandle`];
//! - [`serve_cmd`], [`certs_cmd`]: the `serve` and `certs` subcommands;
//! - [`model_cmd`]: `train` and `eval` (the model engineer's);
//! - `adversary` (cargo feature `adversary`, evaluation only): cheating servers.
#![forbid(unsafe_code)]

#[cfg(feature = "adversary")]
pub mod adversary;
pub mod backends;
pub mod certs_cmd;
pub mod cli;
mod listener;
pub mod model_cmd;
pub mod runner;
pub mod serve_cmd;
pub mod server;
pub mod service;
pub mod state;

pub use runner::{Registry, RunnerError, SessionRunner, StartInfo};
pub use server::{ServerError, ServerHandle, spawn};
pub use state::{Policy, ServedModel, ServerState, SessionLimits};
