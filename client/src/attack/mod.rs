//! The client as attacker (issue 7): two model-extraction attacks run through an
//! [`oracle::Oracle`], and what the server's defence (labels only, a row budget) does to
//! them.
//!
//! - [`papernot`]: substitute training with Jacobian-based augmentation on labels
//!   (Papernot et al., AsiaCCS 2017), and the baseline "label N real images".
//! - [`carlini`]: cryptanalytic extraction from logits (Carlini, Jagielski, Mironov,
//!   CRYPTO 2020) of a network with one hidden layer; refuses a labels-only oracle at once.
//! - [`report`]: `report.json`, a Markdown table and a PNG plot of agreement against
//!   queries, merged over the runs in a report directory.
//!
//! ## Plugging in the secure service
//!
//! A `ServiceOracle` implements [`oracle::Oracle`] with one real 2PC batch per call:
//! - `mode()`: the policy announced by `GetModelInfo` (`labels` or `logits`);
//!   `input_len()`/`classes()` from the announced architecture; `max_batch()` = the
//!   server's `max_rows` (minus the Fusion check rows T + (R - 1) B if the batch is mixed:
//!   the oracle's rows are the client's own samples); `budget()` from the announced
//!   budget.
//! - inputs: each value v in [0, 1] encoded as `FixedPoint::encode(v)` (round(v 2^f), ties
//!   away from zero) in the model's ring; logits decoded as signed ring elements times 2^-f;
//!   labels are the first argmax computed inside 2PC.
//! - errors: `logits()` under a labels policy returns [`oracle::OracleError::LabelsOnly`]
//!   before sending anything; a refusal `RESOURCE_EXHAUSTED` (budget) becomes
//!   [`oracle::OracleError::BudgetExhausted`] `{ used, budget }` with the server's figures;
//!   a batch over `max_rows` or a value outside [0, 1] is `BadInput` (checked locally);
//!   every other failure (transport, TLS, protocol abort, Fusion check failure) is
//!   `Service(message)`.
//! - `queries()`: rows of accepted batches (the server charges a batch when it accepts it).
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

pub use cli::{AttackArgs, run};
