//! Launch code of `kernels/elementwise.cu` (DESIGN.md "elementwise", spec §1.2, §3): broadcast
//! add, scale + activation, token embedding gather and the 3-D patch gather, plus the argument
//! checks shared by the launch code of the model-op kernel families ([`super::norm`],
//! [`super::conv`], [`super::interp`]).
//!
//! The file also holds `sv_gemm_epilogue_<dtype>`, which [`crate::backend::cuda`] launches
//! itself after a cuBLASLt call (`src/backend/cuda/gemm.rs`, `EpilogueLaunch`); no op here
//! launches it.
//!
//! Arguments are checked like the CPU reference checks them: a bad field is an
//! [`Error::Internal`] naming the op and the field (an engine bug), a dtype the op cannot take
//! an [`Error::Device`].

use super::{Dim3, KernelArgs, KernelDevice};
use crate::backend::{ActArgs, AddArgs, Addr, EmbedArgs, PatchGatherArgs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::fmt::Display;

/// Threads per block of the grid-stride kernels of this file.
pub(crate) const BLOCK: u32 = 256;
/// The most blocks a grid-stride kernel is launched with: about 15 per SM on an H200 (132
/// SMs), enough to saturate its memory bandwidth; larger inputs loop.
pub(crate) const MAX_BLOCKS: usize = 2048;
/// The largest grid y and z extents.
pub(crate) const MAX_GRID_YZ: usize = 65_535;

// ------------------------------------------------------------------------------------------------
// Argument checks shared by the model-op launch code.
// ------------------------------------------------------------------------------------------------

/// An engine bug in the arguments of `op`.
pub(crate) fn bad(dev: &dyn KernelDevice, op: &str, msg: impl Display) -> Error {
    Error::Internal(format!("{} {op}: {msg}", dev.name()))
}

/// Requires `dtype` to be a float storage type the kernels are instantiated for.
pub(crate) fn need_storage(
    dev: &dyn KernelDevice,
    op: &str,
    what: &str,
    dtype: DType,
) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::device(
            dev.name(),
            format!("{op}: {what} has dtype {dtype}; the kernels take f32, f16 or bf16"),
        ))
    }
}

/// Requires an operand dtype to be f32 or the storage dtype (the ops with a dtype argument).
pub(crate) fn need_f32_or(
    dev: &dyn KernelDevice,
    op: &str,
    what: &str,
    dtype: DType,
    storage: DType,
) -> Result<()> {
    if dtype == DType::F32 || dtype == storage {
        Ok(())
    } else {
        Err(Error::device(
            dev.name(),
            format!("{op}: {what} has dtype {dtype}; this backend stores {storage}, and the op takes f32 or {storage}"),
        ))
    }
}

/// Checks an operand address from which `n` elements of `esz` bytes are accessed: not null,
/// aligned to the element size.
pub(crate) fn check_addr(
    dev: &dyn KernelDevice,
    op: &str,
    what: &str,
    addr: Addr,
    n: usize,
    esz: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if addr == 0 {
        return Err(bad(dev, op, format!("{what} is a null address")));
    }
    if !addr.is_multiple_of(esz as u64) {
        return Err(bad(
            dev,
            op,
            format!("{what} address {addr:#x} is not aligned to its {esz}-byte elements"),
        ));
    }
    Ok(())
}

/// Whether the byte ranges `[a, a + an)` and `[b, b + bn)` overlap.
pub(crate) fn overlaps(a: Addr, an: usize, b: Addr, bn: usize) -> bool {
    an > 0 && bn > 0 && a < b + bn as u64 && b < a + an as u64
}

/// The product of `dims`, or an error when it overflows.
pub(crate) fn volume(dev: &dyn KernelDevice, op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(dev, op, format!("size {dims:?} overflows")))
}

/// `v` as a kernel `int`, or an error naming the field.
pub(crate) fn to_i32(dev: &dyn KernelDevice, op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        bad(
            dev,
            op,
            format!("{what} = {v} exceeds the kernel's int range"),
        )
    })
}

/// `v` as a kernel `long long`.
pub(crate) fn to_i64(dev: &dyn KernelDevice, op: &str, what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| {
        bad(
            dev,
            op,
            format!("{what} = {v} exceeds the kernel's long long range"),
        )
    })
}

/// Whether every address is a multiple of `align` bytes.
pub(crate) fn aligned(addrs: &[Addr], align: u64) -> bool {
    addrs.iter().all(|a| a.is_multiple_of(align))
}

/// The grid of a grid-stride launch over `units` work items, one per thread.
pub(crate) fn stride_grid(units: usize) -> Dim3 {
    [
        units.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32,
        1,
        1,
    ]
}

/// Elements of `dtype` in 16 bytes (the vector width of the 16-byte loads).
pub(crate) fn per16(dtype: DType) -> usize {
    16 / dtype.size()
}

// ------------------------------------------------------------------------------------------------
// Ops.
// ------------------------------------------------------------------------------------------------

/// `out[i] = a[i] + b[i % period]` ([`AddArgs`]) in the storage dtype; `out` may equal `a`,
/// and `b` may equal `out` when `period >= n` (each element is read by the thread that writes
/// it). Other overlaps would race and are refused.
///
/// Kernel `sv_add_<dtype>(const T* a, const T* b, T* out, long long n, long long period,
/// int vec)`: grid-stride, block 256; `vec` = 16-byte chunks (n and period multiples of
/// 16 / sizeof(T), every address 16-byte aligned), else single elements.
///
/// # Safety
/// As for [`crate::backend::Backend::add`].
pub unsafe fn add(dev: &dyn KernelDevice, dtype: DType, a: &AddArgs) -> Result<()> {
    const OP: &str = "add";
    need_storage(dev, OP, "storage", dtype)?;
    let n = a.n;
    if n == 0 {
        return Ok(());
    }
    if a.period == 0 {
        return Err(bad(dev, OP, "period is 0"));
    }
    // Only b[0 .. min(period, n)) is read: with period >= n, i % period is i for every i < n.
    let p = a.period.min(n);
    let esz = dtype.size();
    check_addr(dev, OP, "a", a.a, n, esz)?;
    check_addr(dev, OP, "b", a.b, p, esz)?;
    check_addr(dev, OP, "out", a.out, n, esz)?;
    if a.out != a.a && overlaps(a.out, n * esz, a.a, n * esz) {
        return Err(bad(dev, OP, "out partially overlaps a"));
    }
    if overlaps(a.out, n * esz, a.b, p * esz) && !(a.b == a.out && p == n) {
        return Err(bad(
            dev,
            OP,
            format!(
                "b (period {}) overlaps out other than as the same {n} elements",
                a.period
            ),
        ));
    }
    let v = per16(dtype);
    let vec = n.is_multiple_of(v) && p.is_multiple_of(v) && aligned(&[a.a, a.b, a.out], 16);
    let units = if vec { n / v } else { n };
    let mut args = KernelArgs::new();
    args.ptr(a.a)
        .ptr(a.b)
        .ptr(a.out)
        .i64(to_i64(dev, OP, "n", n)?)
        .i64(to_i64(dev, OP, "period", p)?)
        .i32(vec as i32);
    unsafe {
        dev.launch(
            &format!("sv_add_{}", dtype.suffix()),
            stride_grid(units),
            [BLOCK, 1, 1],
            0,
            &mut args,
        )
    }
}

/// `out[i] = act(x[i] * scale)` ([`ActArgs`]); `out` may equal `x`.
///
/// Kernel `sv_activation_<dtype>(const T* x, T* out, long long n, float scale, int act,
/// int vec)`: as [`add`].
///
/// # Safety
/// As for [`crate::backend::Backend::activation`].
pub unsafe fn activation(dev: &dyn KernelDevice, dtype: DType, a: &ActArgs) -> Result<()> {
    const OP: &str = "activation";
    need_storage(dev, OP, "storage", dtype)?;
    let n = a.n;
    if n == 0 {
        return Ok(());
    }
    let esz = dtype.size();
    check_addr(dev, OP, "x", a.x, n, esz)?;
    check_addr(dev, OP, "out", a.out, n, esz)?;
    if a.out != a.x && overlaps(a.out, n * esz, a.x, n * esz) {
        return Err(bad(dev, OP, "out partially overlaps x"));
    }
    let v = per16(dtype);
    let vec = n.is_multiple_of(v) && aligned(&[a.x, a.out], 16);
    let units = if vec { n / v } else { n };
    let mut args = KernelArgs::new();
    args.ptr(a.x)
        .ptr(a.out)
        .i64(to_i64(dev, OP, "n", n)?)
        .f32(a.scale)
        .i32(a.act.code())
        .i32(vec as i32);
    unsafe {
        dev.launch(
            &format!("sv_activation_{}", dtype.suffix()),
            stride_grid(units),
            [BLOCK, 1, 1],
            0,
            &mut args,
        )
    }
}

/// Token embedding `out[r] = table[ids[r]] + pos[r]` ([`EmbedArgs`]).
///
/// The ids live on the device, so they are not checked here (that would take a copy and a
/// synchronisation): a row whose id is outside `[0, vocab)` is written as NaN instead of
/// reading outside the table (the ids come from our tokenizer; this is a guard, and the NaN
/// makes such a bug visible downstream).
///
/// Kernel `sv_embed_gather_<dtype>(const int* ids, const T* table, int vocab, const T* pos,
/// T* out, int rows, int cols)`: block 256, grid `(ceil(cols/256), min(rows, 65535))`, rows
/// beyond the grid looped.
///
/// # Safety
/// As for [`crate::backend::Backend::embed_gather`].
pub unsafe fn embed_gather(dev: &dyn KernelDevice, dtype: DType, a: &EmbedArgs) -> Result<()> {
    const OP: &str = "embed_gather";
    need_storage(dev, OP, "storage", dtype)?;
    if a.rows == 0 || a.cols == 0 {
        return Ok(());
    }
    let esz = dtype.size();
    let n = volume(dev, OP, &[a.rows, a.cols])?;
    let tn = volume(dev, OP, &[a.vocab, a.cols])?;
    check_addr(dev, OP, "ids", a.ids, a.rows, 4)?;
    check_addr(dev, OP, "table", a.table, tn, esz)?;
    check_addr(dev, OP, "pos", a.pos, n, esz)?;
    check_addr(dev, OP, "out", a.out, n, esz)?;
    if overlaps(a.out, n * esz, a.table, tn * esz)
        || overlaps(a.out, n * esz, a.pos, n * esz)
        || overlaps(a.out, n * esz, a.ids, a.rows * 4)
    {
        return Err(bad(dev, OP, "out overlaps ids, table or pos"));
    }
    let grid = [
        a.cols.div_ceil(BLOCK as usize) as u32,
        a.rows.min(MAX_GRID_YZ) as u32,
        1,
    ];
    let mut args = KernelArgs::new();
    args.ptr(a.ids)
        .ptr(a.table)
        .i32(to_i32(dev, OP, "vocab", a.vocab)?)
        .ptr(a.pos)
        .ptr(a.out)
        .i32(to_i32(dev, OP, "rows", a.rows)?)
        .i32(to_i32(dev, OP, "cols", a.cols)?);
    unsafe {
        dev.launch(
            &format!("sv_embed_gather_{}", dtype.suffix()),
            grid,
            [BLOCK, 1, 1],
            0,
            &mut args,
        )
    }
}

/// The 3-D patch gather of the ViT input ([`PatchGatherArgs`], spec §1.2): `x` in f32 or the
/// storage dtype, `out` in the storage dtype.
///
/// Kernel `sv_patch_gather3d_<x dtype>_<dtype>(const Tx* x, T* out, long long total, int d,
/// int h, int w, int pd, int ph, int pw, int vec4)`: grid-stride over the output in order,
/// block 256; `vec4` (pw % 4 == 0 and both bases aligned to 4 elements): 4 consecutive values
/// per thread (one 16-byte f32 load), else one.
///
/// # Safety
/// As for [`crate::backend::Backend::patch_gather3d`].
pub unsafe fn patch_gather3d(
    dev: &dyn KernelDevice,
    dtype: DType,
    a: &PatchGatherArgs,
) -> Result<()> {
    const OP: &str = "patch_gather3d";
    need_storage(dev, OP, "storage", dtype)?;
    need_f32_or(dev, OP, "x", a.x_dtype, dtype)?;
    let [d, h, w] = a.dims;
    let [pd, ph, pw] = a.patch;
    if pd == 0 || ph == 0 || pw == 0 || d % pd != 0 || h % ph != 0 || w % pw != 0 {
        return Err(bad(
            dev,
            OP,
            format!(
                "volume {:?} is not a whole number of patches {:?}",
                a.dims, a.patch
            ),
        ));
    }
    let vox = volume(dev, OP, &a.dims)?;
    let total = volume(dev, OP, &[a.batch, vox])?;
    if total == 0 {
        return Ok(());
    }
    let (xs, os) = (a.x_dtype.size(), dtype.size());
    check_addr(dev, OP, "x", a.x, total, xs)?;
    check_addr(dev, OP, "out", a.out, total, os)?;
    if overlaps(a.x, total * xs, a.out, total * os) {
        return Err(bad(dev, OP, "out overlaps x"));
    }
    // Token and feature indices are kernel ints: one sample's voxel count must fit.
    to_i32(dev, OP, "D * H * W", vox)?;
    let vec4 = pw.is_multiple_of(4)
        && a.x.is_multiple_of(4 * xs as u64)
        && a.out.is_multiple_of(4 * os as u64);
    let units = if vec4 { total / 4 } else { total };
    let mut args = KernelArgs::new();
    args.ptr(a.x)
        .ptr(a.out)
        .i64(to_i64(dev, OP, "batch * D * H * W", total)?)
        .i32(to_i32(dev, OP, "D", d)?)
        .i32(to_i32(dev, OP, "H", h)?)
        .i32(to_i32(dev, OP, "W", w)?)
        .i32(to_i32(dev, OP, "pd", pd)?)
        .i32(to_i32(dev, OP, "ph", ph)?)
        .i32(to_i32(dev, OP, "pw", pw)?)
        .i32(vec4 as i32);
    unsafe {
        dev.launch(
            &format!(
                "sv_patch_gather3d_{}_{}",
                a.x_dtype.suffix(),
                dtype.suffix()
            ),
            stride_grid(units),
            [BLOCK, 1, 1],
            0,
            &mut args,
        )
    }
}
