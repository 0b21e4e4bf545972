//! The CUDA kernels of `kernels/*.cu` as build.rs compiled them (docs: toolchain.md §3): per file,
//! PTX for the primary arch (`CUDA_ARCH`, sm_90a unless the build set env `CUDA_ARCH`) and for
//! sm_80, an assembled cubin for the primary arch, and the kernel names (`EMU_KERNEL(name)`).
//!
//! Built without nvcc, [`BUILT_WITH_KERNELS`] is false, [`NVCC_VERSION`] and [`CUDA_ARCH`] are
//! empty and every module's PTX and cubin are empty (the kernel names are still listed; the
//! emulator runs the same kernels).

/// One `kernels/<name>.cu` file compiled by nvcc.
#[derive(Debug)]
pub struct KernelModule {
    /// The file stem (`selftest` for `kernels/selftest.cu`).
    pub name: &'static str,
    /// PTX for the primary arch ([`CUDA_ARCH`], normally sm_90a); empty without nvcc.
    pub ptx_sm90a: &'static str,
    /// PTX for sm_80 (JIT-compiled on Ampere and later); empty without nvcc.
    pub ptx_sm80: &'static str,
    /// The primary-arch cubin (loads without PTX JIT); empty without nvcc.
    pub cubin_sm90a: &'static [u8],
    /// The `extern "C"` kernels of the file, in source order.
    pub kernels: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module that defines `kernel`.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.kernels.contains(&kernel))
}
