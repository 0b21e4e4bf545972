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
    /// Some inputs of a run of several failed (each reported as it happened); `code` is the
    /// exit status of the gravest failure.
    #[error("{failed} of {total} inputs failed (each is reported above)")]
    Failed {
        failed: usize,
        total: usize,
        code: i32,
    },
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
            Error::Failed { code, .. } => *code,
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

/// The longest user text an error message echoes, in characters.
const ECHO_CHARS: usize = 80;

/// User text as echoed in a one-line message: as given up to [`ECHO_CHARS`] characters, longer
/// text cut there with its length noted, so a 10k-character prompt never makes a 10 kB line.
pub fn clip(s: &str) -> String {
    let n = s.chars().count();
    if n <= ECHO_CHARS {
        s.to_string()
    } else {
        let head: String = s.chars().take(ECHO_CHARS).collect();
        format!("{head}… ({n} characters)")
    }
}

/// A number for a message: three decimals at ordinary magnitudes, scientific notation beyond,
/// so 1e308 prints as `1.000e308` rather than 309 digits.
pub fn num(x: f64) -> String {
    if x.is_finite() && x.abs() < 1e7 {
        format!("{x:.3}")
    } else {
        format!("{x:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stay_short() {
        assert_eq!(clip("liver"), "liver");
        let long = "x".repeat(10_000);
        let c = clip(&long);
        assert!(c.len() < 120 && c.ends_with("(10000 characters)"), "{c}");
        // Multi-byte text is cut on a character boundary.
        assert!(clip(&"é".repeat(100)).starts_with(&"é".repeat(80)));
        assert_eq!(num(1.5), "1.500");
        assert_eq!(num(1e308), "1.000e308");
        assert_eq!(num(-2.5e9), "-2.500e9");
    }
}
