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
    /// Per kernel, its parameters as the PTX declares them (`l` 8 bytes, `w` a 4-byte
    /// integer, `f` a float); empty without nvcc.
    pub params: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module that defines `kernel`.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.kernels.contains(&kernel))
}

/// The parameters `kernel` takes (see [`KernelModule::params`]); `None` for an unknown kernel
/// or a build without nvcc (no PTX to read them from).
pub fn params_of(kernel: &str) -> Option<&'static str> {
    let m = module_of(kernel)?;
    let i = m.kernels.iter().position(|k| *k == kernel)?;
    m.params
        .get(i)
        .copied()
        .filter(|p| !p.is_empty() || BUILT_WITH_KERNELS)
}

/// Refuses a launch whose arguments do not match the kernel's parameters as its PTX declares
/// them (count and kind): on a GPU such a launch reads garbage or faults, on the emulator it
/// reads past the slots. Checked on every launch of both devices, so every emulator test also
/// checks the launch code against the prototypes nvcc compiled.
pub fn check_args(kernel: &str, args: &super::KernelArgs) -> crate::error::Result<()> {
    let Some(want) = params_of(kernel) else {
        return Ok(());
    };
    let got = args.kinds();
    if got != want.as_bytes() {
        return Err(crate::error::Error::Internal(format!(
            "kernel `{kernel}` launched with {} arguments `{}` but its PTX declares {} `{want}` \
             (l: 8-byte pointer or long long, w: 4-byte int, f: float)",
            got.len(),
            String::from_utf8_lossy(got),
            want.len()
        )));
    }
    Ok(())
}
