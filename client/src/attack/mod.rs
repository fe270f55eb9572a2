//! The client as attacker (issue 7): two model-extraction attacks run through an
//! [`oracle::Oracle`], and what the server's defence (labels only, a row budget) does to
//! them.
//!
//! - [`papernot`]: substitute training with Jacobian-based augmentation on labels
//!   (Papernot et al., AsiaCCS 2017), and the baseline "label N real images".
//! - [`carlini`]: cryptanalytic extraction from logits (Carlini, Jagielski, Mironov,
//!   CRYPTO 2020): a network with one hidden layer whole, the first layer (up to sign) of a
//!   deeper one; refuses a labels-only oracle at once.
//! - [`report`]: `report.json`, a Markdown table and a PNG plot of agreement against
//!   queries, merged over the runs in a report directory.
//!
//! - [`service`]: [`service::ServiceOracle`], the [`oracle::Oracle`] answered by the real
//!   secure service (real 2PC batches over gRPC and mutual TLS, split at the server's
//!   `max_rows`); the server's refusals become named errors
//!   ([`oracle::OracleError::BudgetExhausted`] for `RESOURCE_EXHAUSTED`,
//!   [`oracle::OracleError::LabelsOnly`] for logits of a labels-only server), so the
//!   attacks stop cleanly with their partial results.
//!
//! The experimenter measures with a local reference copy of the victim ([`reference`]):
//! those evaluations are never queries.

pub mod carlini;
pub mod cli;
pub mod data;
mod linalg;
pub mod oracle;
pub mod papernot;
mod progress;
pub mod reference;
pub mod report;
pub mod service;

pub use cli::{AttackArgs, run};
