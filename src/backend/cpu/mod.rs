//! The CPU backend: f32 storage, multi-threaded (rayon), SIMD (AVX-512 / AVX2 chosen at run
//! time). It is the numerical reference for the other backends and fast enough to run the full
//! model (DESIGN.md, "The op set"; spec §8.3 for the work per call).
//!
//! Addresses are host pointers into buffers from [`CpuBackend::alloc`]; every op turns them
//! into slices after checking the arguments, then runs the implementation in a submodule:
//! [`gemm`], [`attention`], [`norm`], [`conv`], [`interp`], [`elementwise`], and the volume
//! ops of `volume` (spec §6). Bad arguments are an [`Error::Internal`] naming the op (they are
//! engine bugs); an operand in a dtype other than f32 is an [`Error::Device`].

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod interp;
pub mod math;
mod mem;
pub mod norm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod sgemm;
pub mod volume;

use super::{
    AccumulateArgs, ActArgs, AddArgs, Addr, AttentionArgs, BBox, Backend, Buffer, ClipZscoreArgs,
    ConvT3dArgs, CopyBoxArgs, EmbedArgs, ForegroundStats, GemmArgs, Interp3dArgs, LayerNormArgs,
    LayerNormJointArgs, PatchGatherArgs, ShiftScaleArgs,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::alloc::Layout;

/// The device name used in errors.
pub(crate) const DEVICE: &str = "cpu";

/// Alignment of every allocation (the contract promises 256 bytes).
const ALIGN: usize = 256;

/// The f32, multi-threaded CPU backend. Threads come from rayon's global pool
/// (`RAYON_NUM_THREADS`, default: one per core).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// A CPU backend.
    pub fn new() -> Self {
        CpuBackend
    }

    /// Bytes of packed GEMM panels kept for constant weights, in this process
    /// ([`Backend::retain_constant`]).
    pub fn packed_weight_bytes() -> usize {
        #[cfg(target_arch = "x86_64")]
        return sgemm::constants::bytes();
        #[cfg(not(target_arch = "x86_64"))]
        0
    }
}

/// A host allocation that frees itself.
struct HostAlloc {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the allocation is plain memory owned by this value; access goes through addresses
// whose synchronisation is the caller's business, as for any device buffer.
unsafe impl Send for HostAlloc {}
unsafe impl Sync for HostAlloc {}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        // SAFETY: allocated in `CpuBackend::alloc` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// A raw pointer that may cross threads: parallel loops hand each task disjoint elements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: only used for disjoint accesses from parallel tasks (see each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer `i` elements on.
    ///
    /// # Safety
    /// As for `pointer::add`.
    #[inline(always)]
    pub unsafe fn add(self, i: usize) -> *mut T {
        unsafe { self.0.add(i) }
    }
}

/// An engine bug in the arguments of `op`.
pub(crate) fn bad_args(op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Internal(format!("cpu {op}: {msg}"))
}

/// Requires an operand to be f32, the only dtype this backend stores.
pub(crate) fn need_f32(op: &str, what: &str, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        Ok(())
    } else {
        Err(Error::device(
            DEVICE,
            format!("{op}: {what} has dtype {dtype}, but the cpu backend only holds f32"),
        ))
    }
}

/// Checks an address that `n` elements of `T` are read from or written to.
pub(crate) fn check_addr<T>(op: &str, what: &str, addr: Addr, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if addr == 0 {
        return Err(bad_args(op, format!("{what} is a null address")));
    }
    if !(addr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(bad_args(
            op,
            format!(
                "{what} address {addr:#x} is not aligned for {}",
                std::any::type_name::<T>()
            ),
        ));
    }
    Ok(())
}

/// `n` elements at `addr`, read-only.
///
/// # Safety
/// `addr .. addr + n` must hold initialised `T`s that nobody writes while the slice lives.
pub(crate) unsafe fn slice<'a, T>(addr: Addr, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(addr as *const T, n) }
    }
}

/// `n` elements at `addr`, writable.
///
/// # Safety
/// `addr .. addr + n` must hold `T`s that nobody else accesses while the slice lives.
pub(crate) unsafe fn slice_mut<'a, T>(addr: Addr, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        unsafe { std::slice::from_raw_parts_mut(addr as *mut T, n) }
    }
}

/// Whether `[a, a + an)` and `[b, b + bn)` (in bytes) overlap.
pub(crate) fn overlaps(a: Addr, an: usize, b: Addr, bn: usize) -> bool {
    an > 0 && bn > 0 && a < b + bn as u64 && b < a + an as u64
}

/// Product of dims, or an error naming `op` on overflow.
pub(crate) fn volume_of(op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad_args(op, format!("size {dims:?} overflows")))
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        DEVICE.to_string()
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn host_addressable(&self) -> bool {
        true
    }

    fn retain_constant(&self, addr: Addr, bytes: usize) {
        #[cfg(target_arch = "x86_64")]
        sgemm::constants::retain(addr, bytes);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (addr, bytes);
    }

    fn release_constant(&self, addr: Addr) {
        #[cfg(target_arch = "x86_64")]
        sgemm::constants::release(addr);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = addr;
    }

    fn with_dtype(&self, dtype: DType) -> Result<std::sync::Arc<dyn Backend>> {
        match dtype {
            DType::F32 => Ok(std::sync::Arc::new(*self)),
            other => Err(Error::Device {
                device: DEVICE.into(),
                msg: format!("the CPU backend computes in f32 only, not {other}"),
            }),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        let layout = mem::layout(bytes, ALIGN)
            .ok_or_else(|| Error::OutOfMemory(format!("cpu: cannot allocate {bytes} bytes")))?;
        // Zeroed, which makes every read defined; large blocks on huge pages (see `mem`).
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { mem::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::OutOfMemory(format!(
                "cpu: allocation of {bytes} bytes failed"
            )));
        }
        Ok(Buffer::new(
            ptr as Addr,
            bytes,
            Box::new(HostAlloc { ptr, layout }),
        ))
    }

    unsafe fn upload(&self, dst: Addr, src: &[u8]) -> Result<()> {
        check_addr::<u8>("upload", "dst", dst, src.len())?;
        // SAFETY: the caller guarantees dst .. dst + len lies in a live buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn download(&self, src: Addr, dst: &mut [u8]) -> Result<()> {
        check_addr::<u8>("download", "src", src, dst.len())?;
        // SAFETY: the caller guarantees src .. src + len lies in a live buffer.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    unsafe fn gemm(&self, a: &GemmArgs) -> Result<()> {
        unsafe { gemm::gemm_f32(a) }
    }

    unsafe fn attention(&self, a: &AttentionArgs) -> Result<()> {
        unsafe { attention::attention_f32(a) }
    }

    unsafe fn layer_norm(&self, a: &LayerNormArgs) -> Result<()> {
        unsafe { norm::layer_norm_f32(a) }
    }

    unsafe fn layer_norm_joint(&self, a: &LayerNormJointArgs) -> Result<()> {
        unsafe { norm::layer_norm_joint_f32(a) }
    }

    unsafe fn conv_transpose3d_k2s2(&self, a: &ConvT3dArgs) -> Result<()> {
        unsafe { conv::conv_transpose3d_k2s2_f32(a) }
    }

    unsafe fn interp3d(&self, a: &Interp3dArgs) -> Result<()> {
        need_f32("interp3d", "x", a.x_dtype)?;
        need_f32("interp3d", "out", a.out_dtype)?;
        unsafe { interp::interp3d_f32(a) }
    }

    unsafe fn patch_gather3d(&self, a: &PatchGatherArgs) -> Result<()> {
        need_f32("patch_gather3d", "x", a.x_dtype)?;
        unsafe { elementwise::patch_gather3d_f32(a) }
    }

    unsafe fn add(&self, a: &AddArgs) -> Result<()> {
        unsafe { elementwise::add_f32(a) }
    }

    unsafe fn activation(&self, a: &ActArgs) -> Result<()> {
        unsafe { elementwise::activation_f32(a) }
    }

    unsafe fn embed_gather(&self, a: &EmbedArgs) -> Result<()> {
        unsafe { elementwise::embed_gather_f32(a) }
    }

    unsafe fn foreground_stats(&self, x: Addr, dims: [usize; 3]) -> Result<ForegroundStats> {
        let n = dims.iter().product();
        check_addr::<f32>("foreground_stats", "x", x, n)?;
        // SAFETY: the caller guarantees n f32s at x.
        volume::foreground_stats(unsafe { slice(x, n) }, dims)
    }

    unsafe fn clip_zscore(&self, a: &ClipZscoreArgs) -> Result<(f32, f32)> {
        let op = "clip_zscore";
        check_addr::<f32>(op, "x", a.x, a.n)?;
        check_addr::<f32>(op, "out", a.out, a.n)?;
        if a.x == a.out {
            // SAFETY: the caller guarantees the range.
            let x = unsafe { slice_mut(a.x, a.n) };
            return Ok(volume::clip_zscore_in_place(x, a.lo, a.hi, a.mean, a.std));
        }
        if overlaps(a.x, a.n * 4, a.out, a.n * 4) {
            return Err(bad_args(op, "out partially overlaps x"));
        }
        // SAFETY: caller guarantees both ranges; they do not overlap (checked).
        let (x, out) = unsafe { (slice(a.x, a.n), slice_mut(a.out, a.n)) };
        Ok(volume::clip_zscore(x, out, a.lo, a.hi, a.mean, a.std))
    }

    unsafe fn shift_scale(&self, a: &ShiftScaleArgs) -> Result<()> {
        let op = "shift_scale";
        check_addr::<f32>(op, "x", a.x, a.n)?;
        check_addr::<f32>(op, "out", a.out, a.n)?;
        if a.x == a.out {
            // SAFETY: the caller guarantees the range.
            volume::shift_scale_in_place(unsafe { slice_mut(a.x, a.n) }, a.sub, a.div);
            return Ok(());
        }
        if overlaps(a.x, a.n * 4, a.out, a.n * 4) {
            return Err(bad_args(op, "out partially overlaps x"));
        }
        // SAFETY: caller guarantees both ranges; they do not overlap (checked).
        let (x, out) = unsafe { (slice(a.x, a.n), slice_mut(a.out, a.n)) };
        volume::shift_scale(x, out, a.sub, a.div);
        Ok(())
    }

    unsafe fn bbox_above(
        &self,
        x: Addr,
        dims: [usize; 3],
        start: [usize; 3],
        extent: [usize; 3],
        threshold: f32,
    ) -> Result<Option<BBox>> {
        let op = "bbox_above";
        let n = volume_of(op, &dims)?;
        super::check_sub_box(dims, start, extent).map_err(|m| bad_args(op, m))?;
        check_addr::<f32>(op, "x", x, n)?;
        // SAFETY: caller guarantees the volume.
        Ok(volume::bbox_above(
            unsafe { slice(x, n) },
            dims,
            start,
            extent,
            threshold,
        ))
    }

    unsafe fn copy_box(&self, a: &CopyBoxArgs) -> Result<()> {
        let op = "copy_box";
        need_f32(op, "dst", a.dst_dtype)?;
        let ns = volume_of(op, &a.src_dims)?;
        let nd = volume_of(op, &a.dst_dims)?;
        super::check_sub_box(a.dst_dims, a.dst_start, a.extent)
            .map_err(|m| bad_args(op, format!("destination {m}")))?;
        check_addr::<f32>(op, "src", a.src, ns)?;
        check_addr::<f32>(op, "dst", a.dst, nd)?;
        if overlaps(a.src, ns * 4, a.dst, nd * 4) {
            return Err(bad_args(op, "dst overlaps src"));
        }
        // SAFETY: caller guarantees both volumes; they do not overlap (checked).
        let (src, dst) = unsafe { (slice(a.src, ns), slice_mut(a.dst, nd)) };
        volume::copy_box_f32(
            src,
            a.src_dims,
            a.src_start,
            dst,
            a.dst_dims,
            a.dst_start,
            a.extent,
            a.pad,
        );
        Ok(())
    }

    unsafe fn accumulate_window(&self, a: &AccumulateArgs) -> Result<()> {
        let op = "accumulate_window";
        let nw = volume_of(op, &a.window)?;
        let n = volume_of(op, &a.dims)?;
        super::check_sub_box(a.dims, a.start, a.window)
            .map_err(|m| bad_args(op, format!("window: {m}")))?;
        check_addr::<f32>(op, "win", a.win, nw)?;
        check_addr::<f32>(op, "acc", a.acc, n)?;
        check_addr::<f32>(op, "cnt", a.cnt, n)?;
        if overlaps(a.acc, n * 4, a.cnt, n * 4)
            || overlaps(a.win, nw * 4, a.acc, n * 4)
            || overlaps(a.win, nw * 4, a.cnt, n * 4)
        {
            return Err(bad_args(op, "win, acc and cnt must not overlap"));
        }
        // SAFETY: caller guarantees the three ranges; they do not overlap (checked).
        let (win, acc, cnt) =
            unsafe { (slice(a.win, nw), slice_mut(a.acc, n), slice_mut(a.cnt, n)) };
        volume::accumulate_window(win, a.window, acc, cnt, a.dims, a.start);
        Ok(())
    }

    unsafe fn divide_counts(&self, acc: Addr, cnt: Addr, out: Addr, n: usize) -> Result<()> {
        let op = "divide_counts";
        check_addr::<f32>(op, "acc", acc, n)?;
        check_addr::<f32>(op, "cnt", cnt, n)?;
        check_addr::<f32>(op, "out", out, n)?;
        if overlaps(out, n * 4, cnt, n * 4) {
            return Err(bad_args(op, "out overlaps cnt"));
        }
        if out == acc {
            // SAFETY: caller guarantees the ranges; acc and cnt do not overlap (checked).
            let (a, c) = unsafe { (slice_mut(acc, n), slice(cnt, n)) };
            volume::divide_counts_in_place(a, c);
            return Ok(());
        }
        if overlaps(out, n * 4, acc, n * 4) {
            return Err(bad_args(op, "out partially overlaps acc"));
        }
        // SAFETY: caller guarantees the ranges; out overlaps neither input (checked).
        let (a, c, o) = unsafe { (slice(acc, n), slice(cnt, n), slice_mut(out, n)) };
        volume::divide_counts(a, c, o);
        Ok(())
    }

    unsafe fn fill(&self, dst: Addr, n: usize, value: f32) -> Result<()> {
        check_addr::<f32>("fill", "dst", dst, n)?;
        // SAFETY: the caller guarantees n f32s at dst.
        unsafe { slice_mut(dst, n) }.fill(value);
        Ok(())
    }

    unsafe fn threshold_u8(&self, x: Addr, out: Addr, n: usize, threshold: f32) -> Result<()> {
        let op = "threshold_u8";
        check_addr::<f32>(op, "x", x, n)?;
        check_addr::<u8>(op, "out", out, n)?;
        if overlaps(x, n * 4, out, n) {
            return Err(bad_args(op, "out overlaps x"));
        }
        // SAFETY: caller guarantees both ranges; they do not overlap (checked).
        let (xs, o) = unsafe { (slice(x, n), slice_mut(out, n)) };
        volume::threshold_u8(xs, o, threshold);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Shared helpers for the CPU op tests: deterministic random data and a host-side buffer.

    use super::*;

    pub use crate::rng::SplitMix64 as Rng;

    /// The CPU op tests' data: uniform in [-1, 1), never exactly zero.
    pub trait OpData {
        fn f32(&mut self) -> f32;
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    impl OpData for Rng {
        fn f32(&mut self) -> f32 {
            let v = 2.0 * self.unit() - 1.0;
            if v == 0.0 {
                0.5
            } else {
                v
            }
        }
    }

    /// Uploads `v` into a fresh buffer.
    pub fn buf(be: &CpuBackend, v: &[f32]) -> Buffer {
        let b = be.alloc(v.len() * 4).unwrap();
        unsafe { be.upload(b.addr(), bytemuck::cast_slice(v)).unwrap() };
        b
    }

    /// Downloads `n` f32s at `addr`.
    pub fn read(be: &CpuBackend, addr: Addr, n: usize) -> Vec<f32> {
        let mut v = vec![0f32; n];
        unsafe { be.download(addr, bytemuck::cast_slice_mut(&mut v)).unwrap() };
        v
    }

    /// Asserts `|got - want| <= tol * max(1, |want|)` elementwise, naming the first failure.
    pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(
                err <= tol * w.abs().max(1.0),
                "{what}: element {i}: got {g}, want {w} (error {err:e})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn alloc_is_aligned_and_round_trips() {
        let be = CpuBackend::new();
        for bytes in [0usize, 1, 4, 1000, 1 << 20] {
            let b = be.alloc(bytes).unwrap();
            assert_eq!(b.addr() % 256, 0);
            assert_eq!(b.len(), bytes);
            let data: Vec<u8> = (0..bytes).map(|i| (i * 7 + 3) as u8).collect();
            unsafe { be.upload(b.addr(), &data).unwrap() };
            let mut back = vec![0u8; bytes];
            unsafe { be.download(b.addr(), &mut back).unwrap() };
            assert_eq!(back, data);
        }
        assert_eq!(be.dtype(), DType::F32);
        assert_eq!(be.name(), "cpu");
    }

    #[test]
    fn non_f32_operands_are_device_errors() {
        let be = CpuBackend::new();
        let x = buf(&be, &[1.0; 8]);
        let o = be.alloc(64 * 4).unwrap();
        let a = Interp3dArgs {
            x: x.addr(),
            x_dtype: DType::BF16,
            out: o.addr(),
            out_dtype: DType::F32,
            planes: 1,
            src: [2, 2, 2],
            dst: [4, 4, 4],
            mode: super::super::InterpMode::Trilinear,
        };
        let e = unsafe { be.interp3d(&a) }.unwrap_err();
        assert!(matches!(e, Error::Device { .. }), "{e}");
        assert!(e.to_string().contains("interp3d"), "{e}");
        let a = CopyBoxArgs {
            src: x.addr(),
            src_dims: [2, 2, 2],
            src_start: [0, 0, 0],
            dst: o.addr(),
            dst_dtype: DType::F16,
            dst_dims: [2, 2, 2],
            dst_start: [0, 0, 0],
            extent: [2, 2, 2],
            pad: 0.0,
        };
        let e = unsafe { be.copy_box(&a) }.unwrap_err();
        assert!(e.to_string().contains("copy_box"), "{e}");
        let a = PatchGatherArgs {
            x: x.addr(),
            x_dtype: DType::F16,
            out: o.addr(),
            batch: 1,
            dims: [2, 2, 2],
            patch: [1, 1, 1],
        };
        let e = unsafe { be.patch_gather3d(&a) }.unwrap_err();
        assert!(e.to_string().contains("patch_gather3d"), "{e}");
    }

    #[test]
    fn volume_ops_check_boxes() {
        let be = CpuBackend::new();
        let x = buf(&be, &[1.0; 27]);
        let e = unsafe { be.bbox_above(x.addr(), [3, 3, 3], [1, 0, 0], [3, 3, 3], 0.0) };
        assert!(e.is_err());
        let r = unsafe { be.bbox_above(x.addr(), [3, 3, 3], [0, 0, 0], [3, 3, 3], 0.0) };
        assert_eq!(r.unwrap(), Some([0, 0, 0, 2, 2, 2]));
    }
}
