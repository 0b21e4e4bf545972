//! Typed errors. Every variant names what is at fault (file, key, shape, prompt) so the CLI can
//! print one clear line and exit with the right status (DESIGN.md, "Errors").

use std::path::PathBuf;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, split by who is at fault: the user's input or configuration
/// (exit status 2) or the engine / device (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what it claims to be (truncated, bad header, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A checkpoint tensor is missing.
    #[error("checkpoint {path}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
    },
    /// A checkpoint holds a tensor the model does not know.
    #[error("checkpoint {path}: unexpected tensor `{key}` with shape {shape:?}")]
    UnexpectedTensor {
        path: PathBuf,
        key: String,
        shape: Vec<usize>,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("checkpoint {path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A configuration file or value is invalid.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A prompt (text, box, points) is invalid.
    #[error("prompt: {0}")]
    Prompt(String),
    /// An input tensor or volume has the wrong shape or content.
    #[error("input: {0}")]
    Input(String),
    /// A command-line usage error that clap could not catch.
    #[error("{0}")]
    Usage(String),
    /// The requested device is not available (no driver, built without kernels, ...).
    #[error("device {device}: {msg}")]
    DeviceUnavailable { device: String, msg: String },
    /// The memory plan does not fit the budget.
    #[error("memory: {0}")]
    OutOfMemory(String),
    /// A device call failed while running (kernel launch, cuBLAS, emulator deadlock, ...).
    #[error("device {device}: {msg}")]
    Device { device: String, msg: String },
    /// A bug: an invariant of the engine did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The process exit status for this error: 2 for bad input or configuration, 1 for a
    /// failure of the engine or the device.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Device { .. } | Error::Internal(_) => 1,
            _ => 2,
        }
    }

    /// Shorthand for an I/O error on a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for a format error on a path.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for a configuration error.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for a device failure.
    pub fn device(device: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Device {
            device: device.into(),
            msg: msg.into(),
        }
    }
}
