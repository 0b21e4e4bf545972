//! Backend-parity harness (the llama.cpp `test-backend-ops` pattern): run one op on a kernel
//! device and on the CPU reference with the same fresh random inputs, outputs poisoned before
//! the launch, and compare. Written once, generic over the device: `SEGVOL_TEST_DEVICES` picks
//! the devices (default: the emulator in f32, f16 and bf16; `tools/gpu-check.sh` adds CUDA).
#![allow(dead_code)]

use segvol::backend::emu::{EmuDevice, EmuOptions, Schedule};
use segvol::backend::kernel::KernelBackend;
use segvol::backend::{cpu::CpuBackend, Addr, Backend, Buffer};
use segvol::dtype::{decode_f32, encode_f32, DType};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A device under test for op parity.
pub struct OpDevice {
    pub label: String,
    pub backend: Arc<dyn Backend>,
}

impl OpDevice {
    pub fn dtype(&self) -> DType {
        self.backend.dtype()
    }
    /// The parity tolerance (relative to the largest reference value): 1e-5 in f32, 2e-2 in
    /// reduced precision (issue "kernels", Must show).
    pub fn tol(&self) -> f32 {
        if self.dtype() == DType::F32 {
            1e-5
        } else {
            2e-2
        }
    }
}

/// The kernel devices to check against the CPU. `SEGVOL_TEST_DEVICES` entries that name `cpu`
/// are skipped here (the CPU is the reference).
pub fn op_devices() -> Vec<OpDevice> {
    let list =
        std::env::var("SEGVOL_TEST_DEVICES").unwrap_or_else(|_| "emu:f32,emu:f16,emu:bf16".into());
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (spec, prec) = match item.rsplit_once(':') {
            Some((a, b)) if DType::parse_precision(b).is_some() => {
                (a, DType::parse_precision(b).unwrap())
            }
            _ => (item, DType::BF16),
        };
        if spec == "cpu" {
            continue;
        }
        let backend =
            segvol::backend::open(spec, Some(prec)).unwrap_or_else(|e| panic!("{item}: {e}"));
        out.push(OpDevice {
            label: format!("{spec}:{prec}"),
            backend,
        });
    }
    out
}

/// The emulator with each schedule (forward, reverse, random) and two workers, for the
/// schedule-identity check: a race-free kernel gives bit-identical output under all of them.
pub fn emu_schedules(dtype: DType) -> Vec<OpDevice> {
    let mut out = Vec::new();
    for (schedule, workers) in [
        (Schedule::Forward, 1),
        (Schedule::Reverse, 1),
        (Schedule::Random, 1),
        (Schedule::Random, 2),
    ] {
        let opts = EmuOptions {
            schedule,
            seed: next_seed(),
            workers,
            poison: true,
        };
        let backend = Arc::new(KernelBackend::new(EmuDevice::with_options(opts), dtype).unwrap());
        out.push(OpDevice {
            label: format!("emu:{dtype}:{schedule:?}x{workers}"),
            backend,
        });
    }
    out
}

/// The CPU reference.
pub fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new())
}

static SEED: AtomicU64 = AtomicU64::new(0);

/// A fresh seed per call, different on every run (time-based base), printed on failure by
/// the callers through their labels.
pub fn next_seed() -> u64 {
    if SEED.load(Ordering::Relaxed) == 0 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let _ = SEED.compare_exchange(0, t | 1, Ordering::Relaxed, Ordering::Relaxed);
    }
    SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// `n` uniform values in `[-scale, scale)`, never all zero.
pub fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    segvol::rng::SplitMix64(seed ^ 0xD1B5_4A32_D192_ED03).values(n, -scale, scale)
}

/// A device buffer holding values of one dtype.
pub struct DevBuf {
    pub buf: Buffer,
    pub n: usize,
    pub dtype: DType,
}

impl DevBuf {
    pub fn addr(&self) -> Addr {
        self.buf.addr()
    }
    /// The address of element `i`.
    pub fn at(&self, i: usize) -> Addr {
        self.buf.addr() + (i * self.dtype.size()) as u64
    }
}

/// Uploads `values` stored as `dtype`.
pub fn upload(b: &dyn Backend, values: &[f32], dtype: DType) -> DevBuf {
    let bytes = encode_f32(values, dtype);
    let buf = b.alloc(bytes.len().max(1)).unwrap();
    unsafe { b.upload(buf.addr(), &bytes).unwrap() };
    DevBuf {
        buf,
        n: values.len(),
        dtype,
    }
}

/// Uploads raw bytes (ids, masks).
pub fn upload_bytes(b: &dyn Backend, bytes: &[u8], n: usize, dtype: DType) -> DevBuf {
    let buf = b.alloc(bytes.len().max(1)).unwrap();
    unsafe { b.upload(buf.addr(), bytes).unwrap() };
    DevBuf { buf, n, dtype }
}

/// A buffer of `n` values filled with NaN (0xff bytes) so unwritten outputs show.
pub fn poisoned(b: &dyn Backend, n: usize, dtype: DType) -> DevBuf {
    let bytes = vec![0xffu8; (n * dtype.size()).max(1)];
    upload_bytes(b, &bytes, n, dtype)
}

/// Downloads a buffer as f32 values.
pub fn download(b: &dyn Backend, d: &DevBuf) -> Vec<f32> {
    let mut bytes = vec![0u8; d.n * d.dtype.size()];
    unsafe { b.download(d.addr(), &mut bytes).unwrap() };
    b.synchronize().unwrap();
    decode_f32(&bytes, d.dtype)
}

/// Asserts `max|got - want| / max|want| <= tol` and that nothing is NaN.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or overflow)", got[i]);
    }
    let max_ref = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d > worst {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst / max_ref <= tol,
        "{what}: max|diff|/max|ref| = {:.3e} > {tol:.0e} at element {at} (got {}, want {})",
        worst / max_ref,
        got[at],
        want[at]
    );
}

/// `values` rounded through `dtype` (what the device actually reads), for the CPU reference.
pub fn rounded(values: &[f32], dtype: DType) -> Vec<f32> {
    segvol::dtype::round_through(values, dtype)
}

/// A CT-like integer volume (HU): air around -1000, soft tissue, some bone up to 3071.
pub fn hu_volume(n: usize, seed: u64) -> Vec<f32> {
    let mut r = segvol::rng::SplitMix64(seed);
    (0..n)
        .map(|_| {
            let k = r.below(100);
            let v = if k < 40 {
                -1024 + r.below(60) as i64
            } else if k < 95 {
                -150 + r.below(400) as i64
            } else {
                200 + r.below(2872) as i64
            };
            v as f32
        })
        .collect()
}

/// A non-integer volume with a positive mean (relative errors stay meaningful).
pub fn float_volume(n: usize, seed: u64) -> Vec<f32> {
    random(n, 900.0, seed).iter().map(|v| v + 450.0).collect()
}
