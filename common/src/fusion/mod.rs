//! Fusion's mix-and-check: catching a server that deviates from the protocol.
//!
//! The client mixes T public rows (known results) with R copies of each of its B own
//! inputs in a secret uniform order ([`mix`]), runs the semi-honest secure inference on the
//! mixed batch, then checks the public rows, the agreement of copies and the accuracy
//! ([`check`]). [`tune`] computes the exact escape probability of a cheating server,
//! C(B, m) / C(T + R*B, R*m), and the cheapest parameters for a target.

pub mod check;
pub mod mix;
pub mod tune;
