//! The launch code shared by every device that runs the hand-written kernels of `kernels/`:
//! the host emulator ([`super::emu::EmuDevice`]) and CUDA ([`super::cuda::CudaDevice`]).
//! A [`KernelDevice`] knows how to allocate, copy, launch a kernel by name and run a GEMM;
//! [`KernelBackend`] turns each op of [`super::Backend`] into launches, once for both devices.

pub mod embedded;

use super::{Addr, Buffer, GemmArgs};
use crate::dtype::DType;
use crate::error::Result;
use std::ffi::c_void;

/// A 3-D launch extent (grid or block).
pub type Dim3 = [u32; 3];

/// Kernel arguments as `cuLaunchKernel` takes them: one 8-byte slot per argument and an array
/// of pointers to the slots. Scalars are stored little-endian in the low bytes of their slot,
/// which is what a `void**` parameter array means on both the GPU and the emulator.
#[derive(Default)]
pub struct KernelArgs {
    slots: Vec<u64>,
}

impl KernelArgs {
    pub fn new() -> Self {
        Self::default()
    }
    /// A device address (`T*` parameter).
    pub fn ptr(&mut self, a: Addr) -> &mut Self {
        self.slots.push(a);
        self
    }
    /// An `int` parameter.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.slots.push(v as u32 as u64);
        self
    }
    /// An `unsigned` parameter.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.slots.push(v as u64);
        self
    }
    /// A `long long` / `size_t` parameter.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.slots.push(v as u64);
        self
    }
    /// A `float` parameter.
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.slots.push(v.to_bits() as u64);
        self
    }
    /// Number of arguments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// Whether there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// The `void**` array; valid while `self` is neither moved nor modified.
    pub fn as_params(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect()
    }
}

/// A device that runs the `.cu` kernels.
pub trait KernelDevice: Send + Sync {
    /// `emu`, `cuda:0`.
    fn name(&self) -> String;
    /// Allocates `bytes`, 256-byte aligned.
    fn alloc(&self, bytes: usize) -> Result<Buffer>;
    /// # Safety
    /// `dst .. dst + src.len()` must lie in a live buffer of this device.
    unsafe fn upload(&self, dst: Addr, src: &[u8]) -> Result<()>;
    /// # Safety
    /// `src .. src + dst.len()` must lie in a live buffer of this device.
    unsafe fn download(&self, src: Addr, dst: &mut [u8]) -> Result<()>;
    /// Waits for queued work.
    fn synchronize(&self) -> Result<()>;
    /// Launches `kernel` (its `extern "C"` name) like `cuLaunchKernel`.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list, and every address must be valid
    /// for what the kernel accesses.
    unsafe fn launch(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut KernelArgs,
    ) -> Result<()>;
    /// A GEMM with every operand in `dtype` (see [`GemmArgs`]): cuBLAS(Lt) on CUDA, the host
    /// GEMM on the emulator.
    ///
    /// # Safety
    /// As for [`super::Backend::gemm`].
    unsafe fn gemm(&self, args: &GemmArgs, dtype: DType) -> Result<()>;
}
