//! Intensity preprocessing, foreground crop and the zoom-out resize (spec §6.1–§6.4), as host
//! functions over the CPU volume ops ([`crate::backend::cpu::volume`]). Each official step is
//! its own function so that it maps onto one backend op.
//!
//! Volumes are row-major `(D, H, W)` f32 slices: a NIfTI voxel buffer in file order (`i`
//! fastest) is already the model's `(Z, Y, X)` volume (spec §6.1, no reorientation, no
//! resampling).

use crate::backend::cpu::CpuBackend;
use crate::backend::{
    Addr, Backend, ClipZscoreArgs, CopyBoxArgs, ForegroundStats, Interp3dArgs, InterpMode,
    ShiftScaleArgs,
};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The `max(std, 1e-8)` / `clip(max, 1e-8)` floors of spec §6.2, applied as numpy applies them:
/// the floor replaces the value only when the value is smaller, and the division runs in f32.
const NORM_EPS: f64 = 1e-8;

fn floor_eps(v: f32) -> f32 {
    if (v as f64) < NORM_EPS {
        NORM_EPS as f32
    } else {
        v
    }
}

fn check_dims(what: &str, len: usize, dims: [usize; 3]) -> Result<()> {
    if dims.contains(&0) || dims.iter().product::<usize>() != len {
        return Err(Error::Input(format!(
            "{what}: {len} voxels do not form a non-empty volume of dims {dims:?}"
        )));
    }
    Ok(())
}

/// The scalars of the intensity normalisation (spec §6.2): what the device steps computed.
#[derive(Clone, Copy, Debug)]
pub struct NormStats {
    pub stats: ForegroundStats,
    /// `min((clip(x) - mean) / std)`: the shift of the min-max step.
    pub zscore_min: f32,
    /// The maximum after the shift (before the `1e-8` floor): the divisor of the min-max step.
    pub minmax_range: f32,
}

/// Spec §6.2, in place on the device volume at `volume` (`(D, H, W)` f32): statistics
/// (numpy's summation order, exact percentiles), `z = (clip(x, lo, hi) - mean) / max(std,
/// 1e-8)` with the bounds rounded to f32 (numpy 1.x clips a float32 array in float32), then the
/// min-max step `(z - min z) / max(max z - min z, 1e-8)`; subtraction rounds monotonically, so
/// the shifted maximum is `zmax - zmin` rounded once.
///
/// # Safety
/// `volume` must hold `dims` f32 values in a live buffer of `b`.
pub unsafe fn normalize_on_device(
    b: &dyn Backend,
    volume: Addr,
    dims: [usize; 3],
) -> Result<NormStats> {
    let n: usize = dims.iter().product();
    let stats = unsafe { b.foreground_stats(volume, dims)? };
    let args = ClipZscoreArgs {
        x: volume,
        out: volume,
        n,
        lo: stats.p_lo as f32,
        hi: stats.p_hi as f32,
        mean: stats.mean,
        std: floor_eps(stats.std),
    };
    let (zmin, zmax) = unsafe { b.clip_zscore(&args)? };
    let range = zmax - zmin;
    let args = ShiftScaleArgs {
        x: volume,
        out: volume,
        n,
        sub: zmin,
        div: floor_eps(range),
    };
    unsafe { b.shift_scale(&args)? };
    Ok(NormStats {
        stats,
        zscore_min: zmin,
        minmax_range: range,
    })
}

/// Spec §6.3: MONAI `CropForeground` box of `normalized > 0` (margin 0), as `(start, end)` with
/// the end exclusive. The official `SpatialPadd` before it only adds zeros, which are never
/// foreground, so it is skipped. Errors when no voxel is positive.
///
/// # Safety
/// As for [`normalize_on_device`].
pub unsafe fn foreground_box_on_device(
    b: &dyn Backend,
    volume: Addr,
    dims: [usize; 3],
) -> Result<([usize; 3], [usize; 3])> {
    let bb = unsafe { b.bbox_above(volume, dims, [0; 3], dims, 0.0)? }.ok_or_else(|| {
        Error::Input("no foreground: every voxel is at the minimum after normalisation".into())
    })?;
    Ok(([bb[0], bb[1], bb[2]], [bb[3] + 1, bb[4] + 1, bb[5] + 1]))
}

/// Copies the box `[start, end)` of a `(D, H, W)` f32 volume at `src` to `dst` (spec §6.3,
/// `I_c`; also the ROI of §6.8).
///
/// # Safety
/// `src` must hold `dims` f32 values and `dst` the box's.
pub unsafe fn crop_on_device(
    b: &dyn Backend,
    src: Addr,
    dims: [usize; 3],
    start: [usize; 3],
    end: [usize; 3],
    dst: Addr,
) -> Result<()> {
    if (0..3).any(|a| start[a] >= end[a] || end[a] > dims[a]) {
        return Err(Error::Input(format!(
            "crop box {start:?}..{end:?} is empty or outside the volume {dims:?}"
        )));
    }
    let extent = [0, 1, 2].map(|a| end[a] - start[a]);
    let args = CopyBoxArgs {
        src,
        src_dims: dims,
        src_start: start.map(|v| v as i64),
        dst,
        dst_dtype: DType::F32,
        dst_dims: extent,
        dst_start: [0; 3],
        extent,
        pad: 0.0,
    };
    unsafe { b.copy_box(&args) }
}

/// A nearest resize of an f32 `(D, H, W)` volume on the device (PyTorch `F.interpolate`, no
/// anti-aliasing): `nearest-exact` for the zoom-out input (spec §6.4), legacy `nearest` for the
/// logits back to the cropped grid (spec §6.6) and the prompt maps (spec §6.5).
///
/// # Safety
/// `src` and `dst` must hold `src_dims` and `dst_dims` f32 values.
pub unsafe fn resize_on_device(
    b: &dyn Backend,
    src: Addr,
    src_dims: [usize; 3],
    dst: Addr,
    dst_dims: [usize; 3],
    mode: InterpMode,
) -> Result<()> {
    let args = Interp3dArgs {
        x: src,
        x_dtype: DType::F32,
        out: dst,
        out_dtype: DType::F32,
        planes: 1,
        src: src_dims,
        dst: dst_dims,
        mode,
    };
    unsafe { b.interp3d(&args) }
}

/// Host volumes through the CPU backend: the same steps as the device pipeline, for tests and
/// tools that hold a volume in memory.
struct HostBuf {
    buf: crate::backend::Buffer,
}

impl HostBuf {
    fn new(values: &[f32]) -> Result<Self> {
        let cpu = CpuBackend::new();
        let buf = cpu.alloc(values.len().max(1) * 4)?;
        // SAFETY: sized for the values.
        unsafe { cpu.upload(buf.addr(), bytemuck::cast_slice(values))? };
        Ok(HostBuf { buf })
    }
    fn zeros(n: usize) -> Result<Self> {
        Self::new(&vec![0.0; n])
    }
    fn to_vec(&self, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        // SAFETY: the buffer holds at least n values.
        unsafe { CpuBackend::new().download(self.buf.addr(), bytemuck::cast_slice_mut(&mut out))? };
        Ok(out)
    }
}

/// PyTorch's scale for a resize of `in_size` to `out_size` without `scale_factor`:
/// `(float)in / out` in f32 (`compute_scales_value`).
fn scale_f32(in_size: usize, out_size: usize) -> f32 {
    in_size as f32 / out_size as f32
}

/// Source index of output voxel `dst` for `mode='nearest-exact'` (spec §6.4, §7.9):
/// `min(floor((dst + 0.5) * scale), in - 1)` with the f32 scale. PyTorch forms the product in
/// double from the f32 scale and rounds it to float before `floorf`; that is the correctly
/// rounded f32 product, reproduced here.
pub fn nearest_exact_index(dst: usize, in_size: usize, out_size: usize) -> usize {
    let scale = scale_f32(in_size, out_size);
    let src = (((dst as f64) + 0.5) * scale as f64) as f32;
    (src.floor() as usize).min(in_size.saturating_sub(1))
}

/// Source index of output voxel `dst` for legacy `mode='nearest'` (spec §6.5, §6.6, §7.9):
/// `min(floor(dst * scale), in - 1)`, product and scale in f32.
pub fn nearest_index(dst: usize, in_size: usize, out_size: usize) -> usize {
    let scale = scale_f32(in_size, out_size);
    ((dst as f32 * scale).floor() as usize).min(in_size.saturating_sub(1))
}

/// The per-axis source index table of a nearest resize.
pub fn nearest_table(in_size: usize, out_size: usize, mode: InterpMode) -> Result<Vec<usize>> {
    let f = match mode {
        InterpMode::NearestExact => nearest_exact_index,
        InterpMode::Nearest => nearest_index,
        InterpMode::Trilinear => {
            return Err(Error::Internal(
                "resize_nearest called with trilinear mode".into(),
            ))
        }
    };
    Ok((0..out_size).map(|j| f(j, in_size, out_size)).collect())
}

/// Resizes a host `(D, H, W)` f32 volume to `dst_dims` with `nearest-exact` or legacy
/// `nearest` (PyTorch `F.interpolate`, no anti-aliasing; spec §6.4, §6.6), through the CPU
/// backend's `interp3d`.
pub fn resize_nearest(
    src: &[f32],
    src_dims: [usize; 3],
    dst_dims: [usize; 3],
    mode: InterpMode,
) -> Result<Vec<f32>> {
    check_dims("resize source", src.len(), src_dims)?;
    if dst_dims.contains(&0) {
        return Err(Error::Input(format!(
            "resize to an empty size {dst_dims:?}"
        )));
    }
    if mode == InterpMode::Trilinear {
        return Err(Error::Internal(
            "resize_nearest called with trilinear mode".into(),
        ));
    }
    let n: usize = dst_dims.iter().product();
    let (s, d) = (HostBuf::new(src)?, HostBuf::zeros(n)?);
    // SAFETY: both buffers are sized for their dims.
    unsafe {
        resize_on_device(
            &CpuBackend::new(),
            s.buf.addr(),
            src_dims,
            d.buf.addr(),
            dst_dims,
            mode,
        )?
    };
    d.to_vec(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_functions_match_pytorch_formulas() {
        // Exact rational reference: floor((2j+1) * in / (2 out)) agrees with the f32 formula
        // away from ties; check a spread of sizes and the f32 behaviour at known points.
        for (i, o) in [
            (30usize, 32usize),
            (96, 64),
            (121, 64),
            (340, 256),
            (506, 256),
            (20, 32),
            (64, 64),
            (7, 3),
            (3, 7),
            (1000, 32),
        ] {
            let mut prev = 0;
            for j in 0..o {
                let e = nearest_exact_index(j, i, o);
                let n = nearest_index(j, i, o);
                assert!(e < i && n < i);
                assert!(e >= prev, "nearest-exact must be monotone");
                prev = e;
                let exact_e = ((2 * j + 1) * i) / (2 * o);
                let exact_n = (j * i) / o;
                // f32 rounding may only move an index by one, and only at a near-tie.
                assert!(e.abs_diff(exact_e.min(i - 1)) <= 1, "{i}->{o} j={j}");
                assert!(n.abs_diff(exact_n.min(i - 1)) <= 1, "{i}->{o} j={j}");
            }
            if o == i {
                assert!((0..o).all(|j| nearest_index(j, i, o) == j));
                assert!((0..o).all(|j| nearest_exact_index(j, i, o) == j));
            }
        }
        // 30 -> 32 (tiny D zoom-out input): scale 0.9375, (j+0.5)*0.9375.
        assert_eq!(nearest_exact_index(0, 30, 32), 0);
        assert_eq!(nearest_exact_index(15, 30, 32), 14);
        assert_eq!(nearest_exact_index(16, 30, 32), 15);
        assert_eq!(nearest_exact_index(31, 30, 32), 29);
        // 32 -> 30 legacy: floor(j * 1.0666666), j = 29 -> 30.
        assert_eq!(nearest_index(29, 32, 30), 30);
        assert_eq!(nearest_index(15, 32, 30), 16);
        // Where the f32 scale differs from exact arithmetic: 2/41 rounds down in f32, so
        // (20 + 0.5) * scale lands just below 1 (exact: 1); likewise 41 * (2/82) for legacy.
        assert_eq!(nearest_exact_index(20, 2, 41), 0);
        assert_eq!(nearest_index(41, 2, 82), 0);
    }

    #[test]
    fn resize_uses_per_axis_tables() {
        let src_dims = [5usize, 7, 9];
        let src: Vec<f32> = (0..315).map(|i| (i * 37 % 101) as f32 * 0.5).collect();
        let dst_dims = [8usize, 3, 13];
        for mode in [InterpMode::NearestExact, InterpMode::Nearest] {
            let out = resize_nearest(&src, src_dims, dst_dims, mode).unwrap();
            let td = nearest_table(5, 8, mode).unwrap();
            let th = nearest_table(7, 3, mode).unwrap();
            let tw = nearest_table(9, 13, mode).unwrap();
            for d in 0..8 {
                for h in 0..3 {
                    for w in 0..13 {
                        assert_eq!(
                            out[(d * 3 + h) * 13 + w],
                            src[(td[d] * 7 + th[h]) * 9 + tw[w]]
                        );
                    }
                }
            }
        }
        assert!(resize_nearest(&src, src_dims, dst_dims, InterpMode::Trilinear).is_err());
        assert!(resize_nearest(&src, [5, 7, 8], dst_dims, InterpMode::Nearest).is_err());
    }

    #[test]
    fn crop_rejects_bad_boxes() {
        let cpu = CpuBackend::new();
        let v = HostBuf::new(&[0.5f32; 24]).unwrap();
        let out = HostBuf::zeros(24).unwrap();
        let crop =
            |s, e| unsafe { crop_on_device(&cpu, v.buf.addr(), [2, 3, 4], s, e, out.buf.addr()) };
        assert!(crop([0, 0, 0], [2, 3, 5]).is_err());
        assert!(crop([1, 0, 0], [1, 3, 4]).is_err());
        crop([1, 1, 1], [2, 3, 3]).unwrap();
        assert_eq!(out.to_vec(4).unwrap(), [0.5; 4]);
        let zeros = HostBuf::zeros(24).unwrap();
        assert!(unsafe { foreground_box_on_device(&cpu, zeros.buf.addr(), [2, 3, 4]) }.is_err());
    }
}
