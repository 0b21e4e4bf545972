//! The official preprocessing and zoom-out steps on host volumes, through the CPU backend's
//! device entry points (the very code the pipeline runs), for tests that compare each step
//! with the reference fixtures. Not part of the library: the pipeline runs on a device.

use segvol::backend::cpu::{volume, CpuBackend};
use segvol::backend::{BBox, Backend, ForegroundStats, InterpMode};
use segvol::error::Result;
use segvol::pipeline::preprocess::{
    crop_on_device, foreground_box_on_device, normalize_on_device, resize_nearest,
};

/// A preprocessed CT: the normalised volume cropped to its foreground (spec §6.2–§6.3).
#[derive(Clone, Debug)]
pub struct Preprocessed {
    /// The cropped grid `I_c`, `(d0, h0, w0)` row-major: the frame of every output.
    pub cropped: Vec<f32>,
    /// `(D, H, W)` of `cropped`.
    pub cropped_dims: [usize; 3],
    /// MONAI `foreground_start_coord`, `(D, H, W)` in the input volume.
    pub crop_start: [usize; 3],
    /// MONAI `foreground_end_coord` (exclusive).
    pub crop_end: [usize; 3],
    pub stats: ForegroundStats,
    pub zscore_min: f32,
    pub minmax_range: f32,
}

/// Spec §6.2–§6.3 on a host volume `(D, H, W)`, in the official order: statistics, clip +
/// z-score, min-max, foreground crop.
pub fn preprocess(volume: &[f32], dims: [usize; 3]) -> Result<Preprocessed> {
    assert_eq!(
        volume.len(),
        dims.iter().product::<usize>(),
        "dims {dims:?}"
    );
    let cpu = CpuBackend::new();
    let v = cpu.alloc(volume.len() * 4)?;
    // SAFETY: every address lies in a buffer sized for the volume or the crop.
    unsafe {
        cpu.upload(v.addr(), bytemuck::cast_slice(volume))?;
        let norm = normalize_on_device(&cpu, v.addr(), dims)?;
        let (crop_start, crop_end) = foreground_box_on_device(&cpu, v.addr(), dims)?;
        let cropped_dims = [0, 1, 2].map(|a| crop_end[a] - crop_start[a]);
        let n: usize = cropped_dims.iter().product();
        let c = cpu.alloc(n.max(1) * 4)?;
        crop_on_device(&cpu, v.addr(), dims, crop_start, crop_end, c.addr())?;
        let mut cropped = vec![0f32; n];
        cpu.download(c.addr(), bytemuck::cast_slice_mut(&mut cropped))?;
        Ok(Preprocessed {
            cropped,
            cropped_dims,
            crop_start,
            crop_end,
            stats: norm.stats,
            zscore_min: norm.zscore_min,
            minmax_range: norm.minmax_range,
        })
    }
}

/// Spec §6.2 steps 1–4 on a host volume: what numpy computes on the `(X, Y, Z)` array the
/// official code flattens.
pub fn foreground_statistics(v: &[f32], dims: [usize; 3]) -> Result<ForegroundStats> {
    volume::foreground_stats(v, dims)
}

/// Spec §6.4: the zoom-out model input, the cropped grid resized to the window with
/// `nearest-exact`.
pub fn zoom_out_input(cropped: &[f32], dims: [usize; 3], window: [usize; 3]) -> Result<Vec<f32>> {
    resize_nearest(cropped, dims, window, InterpMode::NearestExact)
}

/// Spec §6.6 step 3: the zoom-out logits upsampled to the cropped grid with legacy `nearest`
/// (`L_global`).
pub fn global_logits(
    zoom_logits: &[f32],
    window: [usize; 3],
    cropped_dims: [usize; 3],
) -> Result<Vec<f32>> {
    resize_nearest(zoom_logits, window, cropped_dims, InterpMode::Nearest)
}

/// The window boxes' prediction over cropped-grid logits held on the host.
pub fn host_prediction(
    logits: &[f32],
    cropped_dims: [usize; 3],
) -> impl FnMut([usize; 3], [usize; 3]) -> Result<Option<BBox>> + '_ {
    move |start, extent| Ok(volume::bbox_above(logits, cropped_dims, start, extent, 0.0))
}
