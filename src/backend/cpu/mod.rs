//! (in progress)

pub mod volume;
