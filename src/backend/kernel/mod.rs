//! The launch code shared by every device that runs the hand-written kernels of `kernels/`:
//! the host emulator ([`super::emu::EmuDevice`]) and CUDA ([`super::cuda::CudaDevice`]).
//! A [`KernelDevice`] knows how to allocate, copy, launch a kernel by name and run a GEMM;
//! [`KernelBackend`] turns each op of [`super::Backend`] into launches, once for both devices;
//! one module per kernel family ([`attention`], [`elementwise`], [`norm`], [`conv`], [`interp`],
//! [`volume`]) holds the launch code of the matching `kernels/*.cu` file.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod embedded;
pub mod interp;
pub mod norm;
pub mod volume;

use super::{
    AccumulateArgs, ActArgs, AddArgs, Addr, AttentionArgs, BBox, Backend, Buffer, ClipZscoreArgs,
    ConvT3dArgs, CopyBoxArgs, EmbedArgs, ForegroundStats, GemmArgs, Interp3dArgs, LayerNormArgs,
    LayerNormJointArgs, PatchGatherArgs, ShiftScaleArgs,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::ffi::c_void;

/// A 3-D launch extent (grid or block).
pub type Dim3 = [u32; 3];

/// Kernel arguments as `cuLaunchKernel` takes them: one 8-byte slot per argument and an array
/// of pointers to the slots. Scalars are stored little-endian in the low bytes of their slot,
/// which is what a `void**` parameter array means on both the GPU and the emulator.
#[derive(Default)]
pub struct KernelArgs {
    slots: Vec<u64>,
    /// Which slots hold device addresses (so a graph recorder can check them at replay).
    ptr_slots: Vec<usize>,
    /// Each slot's kind, for [`embedded::check_args`]: `l` 8 bytes, `w` a 4-byte integer, `f`
    /// a float (empty for arguments rebuilt from a recording, which was checked when made).
    kinds: Vec<u8>,
}

impl KernelArgs {
    pub fn new() -> Self {
        Self::default()
    }
    /// A device address (`T*` parameter).
    pub fn ptr(&mut self, a: Addr) -> &mut Self {
        self.ptr_slots.push(self.slots.len());
        self.slots.push(a);
        self.kinds.push(b'l');
        self
    }
    /// An `int` parameter.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.slots.push(v as u32 as u64);
        self.kinds.push(b'w');
        self
    }
    /// An `unsigned` parameter.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.slots.push(v as u64);
        self.kinds.push(b'w');
        self
    }
    /// A `long long` / `size_t` parameter.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.slots.push(v as u64);
        self.kinds.push(b'l');
        self
    }
    /// A `float` parameter.
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.slots.push(v.to_bits() as u64);
        self.kinds.push(b'f');
        self
    }
    /// The raw slots (one per argument, in order).
    pub fn slots(&self) -> &[u64] {
        &self.slots
    }
    /// The indices of the slots that hold addresses ([`KernelArgs::ptr`]).
    pub fn ptr_slots(&self) -> &[usize] {
        &self.ptr_slots
    }
    /// The kind of each slot (see [`embedded::check_args`]).
    pub fn kinds(&self) -> &[u8] {
        &self.kinds
    }
    /// Arguments rebuilt from recorded slots (a graph replay).
    pub fn from_slots(slots: Vec<u64>, ptr_slots: Vec<usize>) -> Self {
        KernelArgs {
            slots,
            ptr_slots,
            kinds: Vec::new(),
        }
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
    /// One line for reports ([`super::Backend::description`]).
    fn description(&self) -> String {
        self.name()
    }
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
    /// Whether device addresses are host addresses (the emulator).
    fn host_addressable(&self) -> bool {
        false
    }
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

    /// Device memory free now, if the device knows.
    fn free_memory(&self) -> Option<usize> {
        None
    }
    /// Whether [`KernelDevice::begin_capture`] is supported.
    fn supports_graphs(&self) -> bool {
        false
    }
    /// Opens a named profiler range (NVTX).
    fn range_push(&self, name: &str) {
        let _ = name;
    }
    /// Closes the innermost profiler range.
    fn range_pop(&self) {}
    /// Starts recording the launches and GEMMs that follow into a graph instead of running
    /// them (a CUDA graph; DESIGN.md, "Program and memory plan"). Must be paired with
    /// [`KernelDevice::end_capture`], also after an error. Devices without graphs refuse.
    fn begin_capture(&self) -> Result<()> {
        Err(Error::device(self.name(), "graph capture is not supported"))
    }
    /// Ends the recording started by [`KernelDevice::begin_capture`] and returns the graph,
    /// ready to replay.
    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        Err(Error::device(self.name(), "graph capture is not supported"))
    }
}

/// Recorded device work that can be replayed as a whole (a CUDA graph).
pub trait DeviceGraph: Send {
    /// Replays the recorded work on the device's stream, asynchronously.
    ///
    /// # Safety
    /// Every buffer the recorded work reads or writes must still be alive.
    unsafe fn launch(&self) -> Result<()>;
}

/// A device buffer for the partial results of multi-stage kernels (reductions, statistics),
/// kept by the backend and grown on demand, so steady-state launches allocate nothing. Launches
/// run in order on one stream, so consecutive ops may reuse it.
///
/// Growing retires the old buffer instead of freeing it: a CUDA graph captured earlier (the
/// joint LayerNorm of a program) holds the old address and replays into it. Retiring is the
/// sound choice because the scratch is also used outside programs (foreground statistics,
/// clip/z-score, bbox), so no plan knows its final size, and keying graphs on its address would
/// still leave graphs pointing at freed memory between growth and re-capture. Sizes are powers
/// of two, so everything retired together is smaller than the current buffer: less than twice
/// the current buffer stays allocated.
#[derive(Default)]
pub struct Scratch {
    bufs: parking_lot::Mutex<ScratchBufs>,
}

#[derive(Default)]
struct ScratchBufs {
    current: Option<Buffer>,
    retired: Vec<Buffer>,
}

impl Scratch {
    /// The address of at least `bytes` of scratch memory. Every address handed out stays
    /// allocated as long as the scratch lives (a captured graph may still use it); its contents
    /// are valid until the next request.
    pub fn get(&self, dev: &dyn KernelDevice, bytes: usize) -> Result<Addr> {
        let mut b = self.bufs.lock();
        if b.current.as_ref().is_none_or(|x| x.len() < bytes) {
            let new = dev.alloc(bytes.max(4096).next_power_of_two())?;
            if let Some(old) = b.current.replace(new) {
                b.retired.push(old);
            }
        }
        Ok(b.current.as_ref().map_or(0, |x| x.addr()))
    }

    /// Bytes held, current and retired.
    pub fn held_bytes(&self) -> usize {
        let b = self.bufs.lock();
        b.current.as_ref().map_or(0, |x| x.len()) + b.retired.iter().map(|x| x.len()).sum::<usize>()
    }
}

/// The op set on a [`KernelDevice`]: custom ops as launches of the `kernels/` kernels, GEMMs
/// through the device's GEMM (cuBLASLt on CUDA, the host GEMM on the emulator), with weights and
/// activations stored as `dtype`.
pub struct KernelBackend<D: KernelDevice> {
    dev: D,
    dtype: DType,
    scratch: Scratch,
}

impl<D: KernelDevice> KernelBackend<D> {
    /// A backend storing weights and activations as `dtype` (f32, f16 or bf16).
    pub fn new(dev: D, dtype: DType) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::Usage(format!(
                "precision {dtype} is not a float type"
            )));
        }
        Ok(KernelBackend {
            dev,
            dtype,
            scratch: Scratch::default(),
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Bytes of scratch memory held, current and retired ([`Scratch`]).
    pub fn scratch_held_bytes(&self) -> usize {
        self.scratch.held_bytes()
    }
}

impl<D: KernelDevice + Clone + 'static> Backend for KernelBackend<D> {
    fn name(&self) -> String {
        self.dev.name()
    }
    fn description(&self) -> String {
        self.dev.description()
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn host_addressable(&self) -> bool {
        self.dev.host_addressable()
    }
    fn with_dtype(&self, dtype: DType) -> Result<std::sync::Arc<dyn Backend>> {
        Ok(std::sync::Arc::new(KernelBackend::new(
            self.dev.clone(),
            dtype,
        )?))
    }
    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        self.dev.alloc(bytes)
    }
    unsafe fn upload(&self, dst: Addr, src: &[u8]) -> Result<()> {
        unsafe { self.dev.upload(dst, src) }
    }
    unsafe fn download(&self, src: Addr, dst: &mut [u8]) -> Result<()> {
        unsafe { self.dev.download(src, dst) }
    }
    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }
    fn capture(
        &self,
        issue: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Box<dyn DeviceGraph>>> {
        if !self.dev.supports_graphs() {
            return Ok(None);
        }
        self.dev.begin_capture()?;
        let issued = issue();
        // End the capture even when issuing failed, so the stream is usable again.
        let graph = self.dev.end_capture();
        issued?;
        graph.map(Some)
    }
    fn range_push(&self, name: &str) {
        self.dev.range_push(name)
    }
    fn range_pop(&self) {
        self.dev.range_pop()
    }
    unsafe fn gemm(&self, a: &GemmArgs) -> Result<()> {
        unsafe { self.dev.gemm(a, self.dtype) }
    }
    unsafe fn attention(&self, a: &AttentionArgs) -> Result<()> {
        unsafe { attention::attention(&self.dev, self.dtype, a) }
    }
    unsafe fn layer_norm(&self, a: &LayerNormArgs) -> Result<()> {
        unsafe { norm::layer_norm(&self.dev, self.dtype, a) }
    }
    unsafe fn layer_norm_joint(&self, a: &LayerNormJointArgs) -> Result<()> {
        unsafe { norm::layer_norm_joint(&self.dev, self.dtype, a, &self.scratch) }
    }
    unsafe fn conv_transpose3d_k2s2(&self, a: &ConvT3dArgs) -> Result<()> {
        unsafe { conv::conv_transpose3d_k2s2(&self.dev, self.dtype, a) }
    }
    unsafe fn interp3d(&self, a: &Interp3dArgs) -> Result<()> {
        unsafe { interp::interp3d(&self.dev, self.dtype, a) }
    }
    unsafe fn patch_gather3d(&self, a: &PatchGatherArgs) -> Result<()> {
        unsafe { elementwise::patch_gather3d(&self.dev, self.dtype, a) }
    }
    unsafe fn add(&self, a: &AddArgs) -> Result<()> {
        unsafe { elementwise::add(&self.dev, self.dtype, a) }
    }
    unsafe fn activation(&self, a: &ActArgs) -> Result<()> {
        unsafe { elementwise::activation(&self.dev, self.dtype, a) }
    }
    unsafe fn embed_gather(&self, a: &EmbedArgs) -> Result<()> {
        unsafe { elementwise::embed_gather(&self.dev, self.dtype, a) }
    }
    unsafe fn foreground_stats(&self, x: Addr, dims: [usize; 3]) -> Result<ForegroundStats> {
        unsafe { volume::foreground_stats(&self.dev, &self.scratch, x, dims) }
    }
    unsafe fn clip_zscore(&self, a: &ClipZscoreArgs) -> Result<(f32, f32)> {
        unsafe { volume::clip_zscore(&self.dev, &self.scratch, a) }
    }
    unsafe fn shift_scale(&self, a: &ShiftScaleArgs) -> Result<()> {
        unsafe { volume::shift_scale(&self.dev, a) }
    }
    unsafe fn bbox_above(
        &self,
        x: Addr,
        dims: [usize; 3],
        start: [usize; 3],
        extent: [usize; 3],
        threshold: f32,
    ) -> Result<Option<BBox>> {
        unsafe { volume::bbox_above(&self.dev, &self.scratch, x, dims, start, extent, threshold) }
    }
    unsafe fn copy_box(&self, a: &CopyBoxArgs) -> Result<()> {
        unsafe { volume::copy_box(&self.dev, a) }
    }
    unsafe fn accumulate_window(&self, a: &AccumulateArgs) -> Result<()> {
        unsafe { volume::accumulate_window(&self.dev, a) }
    }
    unsafe fn divide_counts(&self, acc: Addr, cnt: Addr, out: Addr, n: usize) -> Result<()> {
        unsafe { volume::divide_counts(&self.dev, acc, cnt, out, n) }
    }
    unsafe fn fill(&self, dst: Addr, n: usize, value: f32) -> Result<()> {
        unsafe { volume::fill(&self.dev, dst, n, value) }
    }
    unsafe fn threshold_u8(&self, x: Addr, out: Addr, n: usize, threshold: f32) -> Result<()> {
        unsafe { volume::threshold_u8(&self.dev, x, out, n, threshold) }
    }
}
