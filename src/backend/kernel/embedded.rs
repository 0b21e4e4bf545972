//! TEMPORARY stand-in for the file `build.rs` generates (`$OUT_DIR/kernels.rs`), with the same
//! items, as a build without nvcc produces them. Replaced at merge by the generated file.

/// One `kernels/<stem>.cu` compiled for the device.
pub struct KernelModule {
    /// The `.cu` stem.
    pub name: &'static str,
    /// PTX for `sm_90a` (empty without nvcc).
    pub ptx_sm90a: &'static str,
    /// PTX for `sm_80`, JIT-compiled on devices other than compute capability 9.0.
    pub ptx_sm80: &'static str,
    /// The `sm_90a` cubin, loaded without JIT on compute capability 9.0.
    pub cubin_sm90a: &'static [u8],
    /// The `extern "C"` kernel names the module defines.
    pub kernels: &'static [&'static str],
}

/// Whether nvcc compiled the kernels into this binary.
pub const BUILT_WITH_KERNELS: bool = false;
/// `nvcc --version`'s release line ("" without nvcc).
pub const NVCC_VERSION: &str = "";
/// The cubin architecture (`90a`).
pub const CUDA_ARCH: &str = "";
/// Every kernel module.
pub static MODULES: &[KernelModule] = &[];
