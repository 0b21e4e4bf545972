//! Launch code of `kernels/conv_transpose.cu`: ConvTranspose3d with kernel 2 and stride 2
//! (spec §4.4, [`ConvT3dArgs`]) as a tiled GEMM `(V x Cin) @ (Cin x 8*Cout)` per sample whose
//! store scatters each column to its output voxel, with the bias and the activation fused in.

use super::elementwise::{
    aligned, bad, check_addr, need_storage, overlaps, to_i32, volume, MAX_GRID_YZ,
};
use super::{Dim3, KernelArgs, KernelDevice};
use crate::backend::ConvT3dArgs;
use crate::dtype::DType;
use crate::error::Result;

/// Block tile of the tensor-core kernel (f16/bf16): voxels x columns; 256 threads.
const MMA_TILE: (usize, usize) = (64, 128);
/// Its dynamic shared memory: two stages of the A tile (64 x 40 or 32 x 72 elements) and the
/// B tile (32 x 136), 16-bit (`MMA_SMEM_BYTES` in the kernel file).
const MMA_SMEM_BYTES: u32 = 2 * (64 * 40 + 32 * 136) * 2;
/// Block tile of the f32 kernel; 256 threads, static shared memory only.
const F32_TILE: (usize, usize) = (64, 64);

/// Runs [`ConvT3dArgs`] in the storage dtype.
///
/// Kernel `sv_conv_transpose3d_k2s2_<dtype>(const T* x, T* out, const T* w, const T* bias,
/// int cin, int cout, int d, int h, int w, int channels_last, int act, int vec)`, block 256,
/// grid `(ceil(V/64), ceil(8*Cout/BN), samples)` with BN = 128 (f16/bf16, mma.sync, 27,648 bytes
/// of dynamic shared memory) or 64 (f32, SIMT); batches beyond 65535 samples are split.
/// `vec` (f16/bf16): cp.async 16-byte tile loads, allowed when the input's contiguous axis
/// (Cin channels-last, V channels-first) is a multiple of 8 and x and w are 16-byte aligned;
/// else element-wise loads. The f32 kernel ignores it.
///
/// # Safety
/// As for [`crate::backend::Backend::conv_transpose3d_k2s2`].
pub unsafe fn conv_transpose3d_k2s2(
    dev: &dyn KernelDevice,
    dtype: DType,
    a: &ConvT3dArgs,
) -> Result<()> {
    const OP: &str = "conv_transpose3d_k2s2";
    need_storage(dev, OP, "storage", dtype)?;
    let [d, h, w] = a.dims;
    let voxels = volume(dev, OP, &a.dims)?;
    if a.batch == 0 || a.cout == 0 || voxels == 0 {
        return Ok(());
    }
    let esz = dtype.size();
    let n8 = volume(dev, OP, &[a.cout, 8])?;
    let in_len = volume(dev, OP, &[a.batch, a.cin, voxels])?;
    let out_len = volume(dev, OP, &[a.batch, n8, voxels])?;
    let w_len = volume(dev, OP, &[a.cin, n8])?;
    check_addr(dev, OP, "x", a.x, in_len, esz)?;
    check_addr(dev, OP, "weight", a.weight, w_len, esz)?;
    check_addr(dev, OP, "bias", a.bias, a.cout, esz)?;
    check_addr(dev, OP, "out", a.out, out_len, esz)?;
    if overlaps(a.out, out_len * esz, a.x, in_len * esz)
        || overlaps(a.out, out_len * esz, a.weight, w_len * esz)
        || overlaps(a.out, out_len * esz, a.bias, a.cout * esz)
    {
        return Err(bad(dev, OP, "out overlaps x, weight or bias"));
    }
    // Voxel indices are kernel ints; the output offsets are 64-bit.
    to_i32(dev, OP, "D * H * W", voxels)?;
    to_i32(dev, OP, "8 * cout", n8)?;
    let (tm, tn, smem) = if dtype == DType::F32 {
        (F32_TILE.0, F32_TILE.1, 0)
    } else {
        (MMA_TILE.0, MMA_TILE.1, MMA_SMEM_BYTES)
    };
    let grid_y = n8.div_ceil(tn);
    if grid_y > MAX_GRID_YZ {
        return Err(bad(
            dev,
            OP,
            format!(
                "cout = {} needs {grid_y} column tiles, more than the grid allows",
                a.cout
            ),
        ));
    }
    let contiguous = if a.channels_last_input { a.cin } else { voxels };
    let vec = dtype != DType::F32 && contiguous.is_multiple_of(8) && aligned(&[a.x, a.weight], 16);
    let name = format!("sv_conv_transpose3d_k2s2_{}", dtype.suffix());
    for b0 in (0..a.batch).step_by(MAX_GRID_YZ) {
        let nb = (a.batch - b0).min(MAX_GRID_YZ);
        let grid: Dim3 = [voxels.div_ceil(tm) as u32, grid_y as u32, nb as u32];
        let mut args = KernelArgs::new();
        args.ptr(a.x + (b0 * a.cin * voxels * esz) as u64)
            .ptr(a.out + (b0 * n8 * voxels * esz) as u64)
            .ptr(a.weight)
            .ptr(a.bias)
            .i32(to_i32(dev, OP, "cin", a.cin)?)
            .i32(a.cout as i32)
            .i32(d as i32)
            .i32(h as i32)
            .i32(w as i32)
            .i32(a.channels_last_input as i32)
            .i32(a.act.code())
            .i32(vec as i32);
        unsafe { dev.launch(&name, grid, [256, 1, 1], smem, &mut args)? };
    }
    Ok(())
}
