//! Launch code of `kernels/interp.cu`: 3-D resizing with PyTorch's index arithmetic
//! ([`Interp3dArgs`], spec §4.6, §6.4, §6.6, §7.9), the same operations in the same order as
//! the CPU reference (`src/backend/cpu/interp.rs`), so f32 results agree bit for bit.

use super::elementwise::{
    bad, check_addr, need_f32_or, need_storage, overlaps, to_i32, volume, MAX_GRID_YZ,
};
use super::{KernelArgs, KernelDevice};
use crate::backend::{Interp3dArgs, InterpMode};
use crate::dtype::DType;
use crate::error::Result;

/// Threads per block (one output element each, consecutive along W).
const BLOCK: u32 = 128;

/// The kernel-name part of a mode.
fn mode_name(m: InterpMode) -> &'static str {
    match m {
        InterpMode::Trilinear => "trilinear",
        InterpMode::NearestExact => "nearest_exact",
        InterpMode::Nearest => "nearest",
    }
}

/// Runs [`Interp3dArgs`]: `x` and `out` each in f32 or the storage dtype.
///
/// Kernel `sv_interp3d_<mode>_<x dtype>_<out dtype>(const Tx* x, To* out, int planes,
/// int id, int ih, int iw, int od, int oh, int ow)`: block 128, grid
/// `(ceil(OW/128), min(OH, 65535), min(planes*OD, 65535))`, the y and z extents looped in the
/// kernel; plane offsets and indices 64-bit.
///
/// # Safety
/// As for [`crate::backend::Backend::interp3d`].
pub unsafe fn interp3d(dev: &dyn KernelDevice, dtype: DType, a: &Interp3dArgs) -> Result<()> {
    const OP: &str = "interp3d";
    need_storage(dev, OP, "storage", dtype)?;
    need_f32_or(dev, OP, "x", a.x_dtype, dtype)?;
    need_f32_or(dev, OP, "out", a.out_dtype, dtype)?;
    let n_in = volume(dev, OP, &a.src)?;
    let n_out = volume(dev, OP, &a.dst)?;
    if a.planes == 0 || n_out == 0 {
        return Ok(());
    }
    if n_in == 0 {
        return Err(bad(
            dev,
            OP,
            format!("empty source {:?} for destination {:?}", a.src, a.dst),
        ));
    }
    let (xs, os) = (a.x_dtype.size(), a.out_dtype.size());
    let tot_in = volume(dev, OP, &[a.planes, n_in])?;
    let tot_out = volume(dev, OP, &[a.planes, n_out])?;
    check_addr(dev, OP, "x", a.x, tot_in, xs)?;
    check_addr(dev, OP, "out", a.out, tot_out, os)?;
    if overlaps(a.x, tot_in * xs, a.out, tot_out * os) {
        return Err(bad(dev, OP, "out overlaps x"));
    }
    let [id, ih, iw] = a.src;
    let [od, oh, ow] = a.dst;
    let dims = [
        ("planes", a.planes),
        ("src D", id),
        ("src H", ih),
        ("src W", iw),
        ("dst D", od),
        ("dst H", oh),
        ("dst W", ow),
    ];
    let mut args = KernelArgs::new();
    args.ptr(a.x).ptr(a.out);
    for (what, v) in dims {
        args.i32(to_i32(dev, OP, what, v)?);
    }
    let grid = [
        ow.div_ceil(BLOCK as usize) as u32,
        oh.min(MAX_GRID_YZ) as u32,
        (a.planes * od).min(MAX_GRID_YZ) as u32,
    ];
    let name = format!(
        "sv_interp3d_{}_{}_{}",
        mode_name(a.mode),
        a.x_dtype.suffix(),
        a.out_dtype.suffix()
    );
    unsafe { dev.launch(&name, grid, [BLOCK, 1, 1], 0, &mut args) }
}
