//! Fusion's shared library: everything both parties need.
//!
//! One module per concern (see `shared/DESIGN.md`). Protocol modules (`ot`, `he`, `mpc`,
//! `backend`, `fusion`) know only the [`channel::Channel`] trait; only `net` knows gRPC.

pub mod backend;
pub mod channel;
pub mod cost;
pub(crate) mod files;
pub mod fixed;
pub mod fusion;
pub mod he;
pub mod mpc;
pub mod net;
pub mod nn;
pub mod ot;
pub mod ring;
