//! Shared test helpers: fixture paths, the devices under test, tolerances.
#![allow(dead_code)]

pub mod fuzz;
pub mod host_pipeline;
pub mod parity;
pub mod reference;

use segvol::backend::Backend;
use segvol::dtype::DType;
use segvol::tensor::HostTensor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The repository's copy of the tiny fixtures.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// The repository's fixtures root (`tiny/`, `data/`, `pipeline-geometry.json`).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The full-size fixtures (`SEGVOL_FIXTURES`), or `None` with a printed reason.
pub fn full_fixtures() -> Option<PathBuf> {
    match std::env::var_os("SEGVOL_FIXTURES") {
        Some(p) if Path::new(&p).join("full").is_dir() => Some(PathBuf::from(p)),
        Some(p) => {
            eprintln!(
                "skipped: SEGVOL_FIXTURES={} has no full/ folder",
                Path::new(&p).display()
            );
            None
        }
        None => {
            eprintln!("skipped: set SEGVOL_FIXTURES to the shared fixtures folder to run the full-size tests");
            None
        }
    }
}

/// One device under test: a backend spec and a storage precision.
#[derive(Clone, Debug)]
pub struct DeviceUnderTest {
    pub spec: String,
    pub precision: DType,
}

impl DeviceUnderTest {
    /// Relative tolerance of stage tensors (fixtures README §6).
    pub fn tolerance(&self) -> f32 {
        if self.precision == DType::F32 {
            1e-4
        } else {
            2e-2
        }
    }
    pub fn open(&self) -> Arc<dyn Backend> {
        segvol::backend::open(&self.spec, Some(self.precision))
            .unwrap_or_else(|e| panic!("opening {}:{}: {e}", self.spec, self.precision))
    }
    pub fn label(&self) -> String {
        format!("{}:{}", self.spec, self.precision)
    }
}

/// The devices to test on: `SEGVOL_TEST_DEVICES`, a comma-separated list of `spec[:precision]`
/// (`cpu`, `emu:f32`, `emu:bf16`, `cuda:bf16`, ...). Default: the CPU and the emulator in f32
/// and bf16 — every device that needs no GPU. `tools/gpu-check.sh` sets it to the CUDA ones.
pub fn devices() -> Vec<DeviceUnderTest> {
    let list =
        std::env::var("SEGVOL_TEST_DEVICES").unwrap_or_else(|_| "cpu,emu:f32,emu:bf16".into());
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.trim();
            let (spec, prec) = match s.rsplit_once(':') {
                Some((a, b)) if DType::parse_precision(b).is_some() => {
                    (a.to_string(), DType::parse_precision(b).unwrap())
                }
                _ => (
                    s.to_string(),
                    if s == "cpu" { DType::F32 } else { DType::BF16 },
                ),
            };
            DeviceUnderTest {
                spec,
                precision: prec,
            }
        })
        .collect()
}

/// Asserts `max|got - want| / max|want| < tol`.
pub fn assert_close(got: &HostTensor, want: &HostTensor, tol: f32, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let err = got.rel_err(want);
    if std::env::var_os("SEGVOL_VERBOSE").is_some() {
        eprintln!("{what}: rel err {err:.2e}");
    }
    assert!(
        err < tol,
        "{what}: max|diff|/max|ref| = {err:.3e} >= {tol:.0e}"
    );
}

/// Reads a JSON file.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `segvol` binary under test: `SEGVOL_BIN` (the GPU bundle runs its tests where no cargo
/// build tree exists, tools/gpu-check.sh), else the one cargo built.
pub fn segvol_bin() -> PathBuf {
    match std::env::var_os("SEGVOL_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_segvol")),
    }
}

/// Runs the `segvol` binary ([`segvol_bin`]) with `args` and collects its output.
pub fn segvol(args: &[&str]) -> std::process::Output {
    std::process::Command::new(segvol_bin())
        .args(args)
        .output()
        .unwrap()
}

/// The decompressed bytes of a gzip file.
pub fn gunzip_file(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut v = Vec::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// A full-size `segvol-random-v1` model directory (seed 2), generated once per machine into
/// `target/` and reused.
pub fn full_model_dir() -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("segvol-full-seed2");
    let marker = dir.join(".complete");
    if !marker.exists() {
        segvol::weights::write_model_dir(
            &dir,
            &segvol::ModelConfig::full(),
            2,
            segvol::tokenizer::EMBEDDED_TOKENIZER_JSON,
        )
        .expect("generating the full-size model");
        std::fs::write(&marker, b"").unwrap();
    }
    dir
}
