//! (in progress)
pub mod plan;
