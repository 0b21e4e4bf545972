//! The official zoom-out-zoom-in pipeline on one volume (spec §6): intensity preprocessing and
//! foreground crop ([`preprocess`]), then the zoom-out call, the ROI, the sliding windows with
//! their box prompts, constant blending and back-fill ([`geometry`]); the memory plan of a
//! whole volume ([`plan`]).

pub mod geometry;
pub mod plan;
pub mod preprocess;
