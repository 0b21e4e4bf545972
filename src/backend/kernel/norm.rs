//! Launch code of `kernels/layer_norm.cu` (spec §1.3, §4.3, §4.4, §7.2, §7.7): the row-wise
//! LayerNorm and the joint LayerNorm of the decoder's upscaling (one normalisation over all
//! `n` values of a sample, two-stage reduction through [`Scratch`]).

use super::elementwise::{
    aligned, bad, check_addr, need_storage, overlaps, per16, to_i32, to_i64, volume, MAX_GRID_YZ,
};
use super::{KernelArgs, KernelDevice, Scratch};
use crate::backend::{LayerNormArgs, LayerNormJointArgs};
use crate::dtype::DType;
use crate::error::Result;

/// Rows (one warp each) per block of `sv_layer_norm_<dtype>`.
const ROW_WARPS: usize = 4;
/// Threads per block of the joint kernels.
const JOINT_BLOCK: u32 = 256;
/// Elements each stage-1 block of the joint norm reduces (about): 8192 values = 32 per thread.
const JOINT_SLICE: usize = 8192;
/// At most this many stage-1 partials per sample (stage 2 merges them in every block).
const JOINT_MAX_PARTS: usize = 512;
/// At most this many stage-2 blocks per sample.
const JOINT_MAX_APPLY: usize = 1024;

/// Row-wise LayerNorm ([`LayerNormArgs`]); `out` may equal `x`.
///
/// Kernel `sv_layer_norm_<dtype>(const T* x, T* out, const T* w, const T* b, int rows,
/// int cols, float eps, int vec)`: block 128 (4 warps, one row each), grid `ceil(rows/4)`;
/// `vec` = 16-byte loads (cols a multiple of 16 / sizeof(T), all four bases 16-byte aligned).
///
/// # Safety
/// As for [`crate::backend::Backend::layer_norm`].
pub unsafe fn layer_norm(dev: &dyn KernelDevice, dtype: DType, a: &LayerNormArgs) -> Result<()> {
    const OP: &str = "layer_norm";
    need_storage(dev, OP, "storage", dtype)?;
    let (rows, cols) = (a.rows, a.cols);
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let esz = dtype.size();
    let n = volume(dev, OP, &[rows, cols])?;
    check_addr(dev, OP, "x", a.x, n, esz)?;
    check_addr(dev, OP, "out", a.out, n, esz)?;
    check_addr(dev, OP, "weight", a.weight, cols, esz)?;
    check_addr(dev, OP, "bias", a.bias, cols, esz)?;
    if a.out != a.x && overlaps(a.out, n * esz, a.x, n * esz) {
        return Err(bad(dev, OP, "out partially overlaps x"));
    }
    let vec = cols.is_multiple_of(per16(dtype)) && aligned(&[a.x, a.out, a.weight, a.bias], 16);
    let mut args = KernelArgs::new();
    args.ptr(a.x)
        .ptr(a.out)
        .ptr(a.weight)
        .ptr(a.bias)
        .i32(to_i32(dev, OP, "rows", rows)?)
        .i32(to_i32(dev, OP, "cols", cols)?)
        .f32(a.eps)
        .i32(vec as i32);
    let grid = [rows.div_ceil(ROW_WARPS) as u32, 1, 1];
    unsafe {
        dev.launch(
            &format!("sv_layer_norm_{}", dtype.suffix()),
            grid,
            [32 * ROW_WARPS as u32, 1, 1],
            0,
            &mut args,
        )
    }
}

/// Joint LayerNorm + activation ([`LayerNormJointArgs`]); `out` may equal `x`.
///
/// Two launches per group of at most 65535 samples (the grid's y extent):
/// 1. `sv_layer_norm_joint_stats_<dtype>(const T* x, float* part, long long n, int parts,
///    int vec)`, grid `(parts, samples)`, block 256: block `p` reduces its slice of a sample
///    to `(count, mean, M2, 0)` at `part[(s*parts + p)*4]` (in `scratch`);
/// 2. `sv_layer_norm_joint_apply_<dtype>(const T* x, T* out, const T* w, const T* b,
///    const float* part, long long n, int parts, float eps, int act, int vec)`, grid
///    `(blocks, samples)`, block 256: every block merges the partials of its sample in the same
///    order, then normalises a grid-stride share of it.
///
/// `parts = clamp(ceil(n / 8192), 1, 512)`; `vec` = 16-byte loads (n a multiple of
/// 16 / sizeof(T), the bases 16-byte aligned).
///
/// # Safety
/// As for [`crate::backend::Backend::layer_norm_joint`].
pub unsafe fn layer_norm_joint(
    dev: &dyn KernelDevice,
    dtype: DType,
    a: &LayerNormJointArgs,
    scratch: &Scratch,
) -> Result<()> {
    const OP: &str = "layer_norm_joint";
    need_storage(dev, OP, "storage", dtype)?;
    let n = a.n;
    if a.batch == 0 || n == 0 {
        return Ok(());
    }
    let esz = dtype.size();
    let total = volume(dev, OP, &[a.batch, n])?;
    check_addr(dev, OP, "x", a.x, total, esz)?;
    check_addr(dev, OP, "out", a.out, total, esz)?;
    check_addr(dev, OP, "weight", a.weight, n, esz)?;
    check_addr(dev, OP, "bias", a.bias, n, esz)?;
    if a.out != a.x && overlaps(a.out, total * esz, a.x, total * esz) {
        return Err(bad(dev, OP, "out partially overlaps x"));
    }
    let v = per16(dtype);
    let vec = n.is_multiple_of(v) && aligned(&[a.x, a.out, a.weight, a.bias], 16);
    let parts = n.div_ceil(JOINT_SLICE).clamp(1, JOINT_MAX_PARTS);
    let units = if vec { n / v } else { n };
    let apply_blocks = units
        .div_ceil(JOINT_BLOCK as usize * 4)
        .clamp(1, JOINT_MAX_APPLY);
    let n64 = to_i64(dev, OP, "n", n)?;
    let suffix = dtype.suffix();
    for s0 in (0..a.batch).step_by(MAX_GRID_YZ) {
        let ns = (a.batch - s0).min(MAX_GRID_YZ);
        let part = scratch.get(dev, ns * parts * 16)?;
        let off = (s0 * n * esz) as u64;
        let (x, out) = (a.x + off, a.out + off);
        let mut args = KernelArgs::new();
        args.ptr(x)
            .ptr(part)
            .i64(n64)
            .i32(parts as i32)
            .i32(vec as i32);
        unsafe {
            dev.launch(
                &format!("sv_layer_norm_joint_stats_{suffix}"),
                [parts as u32, ns as u32, 1],
                [JOINT_BLOCK, 1, 1],
                0,
                &mut args,
            )?;
        }
        let mut args = KernelArgs::new();
        args.ptr(x)
            .ptr(out)
            .ptr(a.weight)
            .ptr(a.bias)
            .ptr(part)
            .i64(n64)
            .i32(parts as i32)
            .f32(a.eps)
            .i32(a.act.code())
            .i32(vec as i32);
        unsafe {
            dev.launch(
                &format!("sv_layer_norm_joint_apply_{suffix}"),
                [apply_blocks as u32, ns as u32, 1],
                [JOINT_BLOCK, 1, 1],
                0,
                &mut args,
            )?;
        }
    }
    Ok(())
}
