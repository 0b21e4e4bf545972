//! # segvol
//!
//! A runtime for SegVol (universal, interactive 3-D CT segmentation): the model written once as
//! ops on a [`program::Program`], run by a [`backend::Backend`] (CPU reference, the CUDA kernels
//! through a host emulator, or CUDA), with the official zoom-out-zoom-in [`pipeline`].
//!
//! Layers, top to bottom (docs/architecture.md): `bin/segvol/` (CLI) → [`pipeline`] (with
//! [`io`] for files and prompts) → [`model`] (programs and typed IO) → [`runtime`] (program
//! cache, arena, staging, graphs) → [`program`] (ops, plans, binding) → [`backend`] →
//! `kernels/`. The pipeline still calls the backend directly for its volume ops (issue 11).

pub mod backend;
pub mod config;
pub mod dtype;
pub mod error;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod program;
pub mod rng;
pub mod runtime;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use dtype::DType;
pub use error::{Error, Result};
