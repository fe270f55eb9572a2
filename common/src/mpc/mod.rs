//! (being written)
pub use crate::ot::Party;
