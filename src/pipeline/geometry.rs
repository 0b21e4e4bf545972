//! The geometry of the zoom-out-zoom-in pipeline (spec §6.5–§6.8): prompt mapping between the
//! cropped grid and the zoom-out frame, the ROI, the sliding windows and the box prompt of each
//! window, and the constant blending of window logits. Pure functions over slices: the
//! "prediction" inputs are logits on the cropped grid, so everything here is testable without a
//! model.
//!
//! Frames: the *cropped grid* `I_c` of `(d0, h0, w0)` voxels (spec §6.3); the *zoom-out frame*,
//! the window-sized nearest-exact resize of it (spec §6.4); the *ROI*, a box of the cropped grid
//! (spec §6.7); and the *padded ROI*, the ROI zero-padded symmetrically up to the window size,
//! where the sliding windows live (spec §6.8). All coordinates are `(D, H, W)`.

use crate::backend::cpu::volume;
use crate::backend::{BBox, InterpMode};
use crate::error::{Error, Result};
use crate::pipeline::preprocess::{nearest_exact_index, nearest_index, resize_nearest};

/// The box prompt value of "no box in this window": `[-1; 6]`, fed to the model anyway
/// (spec §6.8 step 5, §7.11).
pub const EMPTY_BOX: [f32; 6] = [-1.0; 6];

/// A window's box as the model's `(1, 6)` f32 prompt: the inclusive corners, or [`EMPTY_BOX`].
pub fn box_prompt(b: Option<BBox>) -> [f32; 6] {
    match b {
        Some(b) => b.map(|v| v as f32),
        None => EMPTY_BOX,
    }
}

fn check_grid(what: &str, dims: [usize; 3]) -> Result<()> {
    if dims.contains(&0) {
        return Err(Error::Input(format!("{what}: empty grid {dims:?}")));
    }
    Ok(())
}

fn check_box(what: &str, b: &BBox, dims: [usize; 3]) -> Result<()> {
    for a in 0..3 {
        if b[a] > b[a + 3] || b[a + 3] >= dims[a] {
            return Err(Error::Prompt(format!(
                "{what} {b:?} is not an inclusive box [d0,h0,w0,d1,h1,w1] inside the grid {dims:?}"
            )));
        }
    }
    Ok(())
}

// ----- Prompt mapping (spec §6.5) -----

/// Maps a box given as inclusive cropped-grid voxels to the zoom-out frame (fixtures README §4):
/// the bounding box of the nearest-exact resize of a binary cube that is 1 inside the box. Per
/// axis, `q0` is the smallest `q` whose source voxel `nearest_exact_index(q)` is `>= p0` and
/// `q1` the largest whose source is `<= p1`.
///
/// A box thinner than one zoom-out voxel on an axis (possible when that axis shrinks) may
/// contain no sampled source voxel, and the resized cube is empty there; the official code would
/// then feed `[-1; 6]`, i.e. no box at all. We keep the user's box instead: on such an axis the
/// box becomes the single zoom-out voxel that contains the box's centre, by the point rule of
/// [`point_zoom_out_dhw`].
pub fn box_zoom_out_dhw(
    box_cropped: BBox,
    cropped_dims: [usize; 3],
    zoom_dims: [usize; 3],
) -> Result<BBox> {
    check_grid("cropped grid", cropped_dims)?;
    check_grid("zoom-out frame", zoom_dims)?;
    check_box("box", &box_cropped, cropped_dims)?;
    let mut out = [0usize; 6];
    for a in 0..3 {
        let (n_in, n_out) = (cropped_dims[a], zoom_dims[a]);
        let (p0, p1) = (box_cropped[a], box_cropped[a + 3]);
        let src = |q: usize| nearest_exact_index(q, n_in, n_out);
        // `src` is non-decreasing in q, so both ends are partition points.
        let q0 = (0..n_out).position(|q| src(q) >= p0);
        let q1 = (0..n_out).rposition(|q| src(q) <= p1);
        let (lo, hi) = match (q0, q1) {
            (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
            _ => {
                let q = point_axis(p0 + (p1 - p0) / 2, n_in, n_out);
                (q, q)
            }
        };
        out[a] = lo;
        out[a + 3] = hi;
    }
    Ok(out)
}

fn point_axis(p: usize, n_in: usize, n_out: usize) -> usize {
    // floor((p + 0.5) * out / in) in exact integer arithmetic.
    let q = ((2 * p as u128 + 1) * n_out as u128) / (2 * n_in as u128);
    (q as usize).min(n_out - 1)
}

/// Maps a cropped-grid voxel to the zoom-out frame, consistent with nearest-exact (spec §6.5,
/// last bullet): `q = clamp(floor((p + 0.5) * out / in), 0, out - 1)` per axis, computed
/// exactly.
pub fn point_zoom_out_dhw(
    p: [usize; 3],
    cropped_dims: [usize; 3],
    zoom_dims: [usize; 3],
) -> Result<[usize; 3]> {
    check_grid("cropped grid", cropped_dims)?;
    check_grid("zoom-out frame", zoom_dims)?;
    if (0..3).any(|a| p[a] >= cropped_dims[a]) {
        return Err(Error::Prompt(format!(
            "point {p:?} lies outside the cropped grid {cropped_dims:?}"
        )));
    }
    Ok([0, 1, 2].map(|a| point_axis(p[a], cropped_dims[a], zoom_dims[a])))
}

/// The cropped-grid range `[j0, j1]` (inclusive) whose legacy-nearest source lies in
/// `[lo, hi]` of the zoom-out axis, or `None` when the upsampled cube is empty on this axis.
fn upsampled_range(
    lo: usize,
    hi: usize,
    n_zoom: usize,
    n_cropped: usize,
) -> Option<(usize, usize)> {
    let src = |j: usize| nearest_index(j, n_zoom, n_cropped);
    let j0 = (0..n_cropped).position(|j| src(j) >= lo)?;
    let j1 = (0..n_cropped).rposition(|j| src(j) <= hi)?;
    (j0 <= j1).then_some((j0, j1))
}

/// `build_binary_cube(box)` upsampled to the cropped grid (spec §6.5): 1 inside the inclusive
/// zoom-out box, resized with legacy `nearest`. Returned as an f32 `(d0, h0, w0)` map.
pub fn build_binary_cube(
    zoom_box: BBox,
    zoom_dims: [usize; 3],
    cropped_dims: [usize; 3],
) -> Result<Vec<f32>> {
    check_grid("cropped grid", cropped_dims)?;
    check_grid("zoom-out frame", zoom_dims)?;
    check_box("zoom-out box", &zoom_box, zoom_dims)?;
    let mut cube = vec![0f32; zoom_dims.iter().product()];
    for d in zoom_box[0]..=zoom_box[3] {
        for h in zoom_box[1]..=zoom_box[4] {
            let o = (d * zoom_dims[1] + h) * zoom_dims[2];
            cube[o + zoom_box[2]..=o + zoom_box[5]].fill(1.0);
        }
    }
    resize_nearest(&cube, zoom_dims, cropped_dims, InterpMode::Nearest)
}

/// `build_binary_points(points, labels)` upsampled to the cropped grid (spec §6.5): 1 at the
/// **positive** zoom-out points only (label 1), resized with legacy `nearest`.
pub fn build_binary_points(
    points: &[[usize; 3]],
    labels: &[f32],
    zoom_dims: [usize; 3],
    cropped_dims: [usize; 3],
) -> Result<Vec<f32>> {
    check_grid("cropped grid", cropped_dims)?;
    check_grid("zoom-out frame", zoom_dims)?;
    if points.len() != labels.len() {
        return Err(Error::Prompt(format!(
            "{} points but {} labels",
            points.len(),
            labels.len()
        )));
    }
    let mut map = vec![0f32; zoom_dims.iter().product()];
    for (p, &l) in points.iter().zip(labels) {
        if l != 1.0 {
            continue;
        }
        if (0..3).any(|a| p[a] >= zoom_dims[a]) {
            return Err(Error::Prompt(format!(
                "point {p:?} lies outside the zoom-out frame {zoom_dims:?}"
            )));
        }
        map[(p[0] * zoom_dims[1] + p[1]) * zoom_dims[2] + p[2]] = 1.0;
    }
    resize_nearest(&map, zoom_dims, cropped_dims, InterpMode::Nearest)
}

// ----- ROI (spec §6.7) -----

/// The zoom-in region of interest on the cropped grid (spec §6.7, `logits2roi_coor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roi {
    /// `logits2roi_coor`'s `[min_d, min_h, min_w, max_d, max_h, max_w]`; a max may equal the
    /// grid size (the official upper clamp is to the size, not size - 1).
    pub bounds: [usize; 6],
    /// First voxel of the ROI: the mins.
    pub start: [usize; 3],
    /// `min(max + 1, size) - min` per axis: the `[min : max + 1]` crop clipped to the grid.
    pub shape: [usize; 3],
}

impl Roi {
    /// One past the last voxel of the ROI.
    pub fn end(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.start[a] + self.shape[a])
    }
}

/// `logits2roi_coor` (spec §6.7 steps 3–6) from the inclusive bbox of the zoom-out prediction on
/// the cropped grid (`L_global > 0`): each axis is padded by `floor(pad/2)` on both sides,
/// `pad = max(0, window - extent)`, and clamped to `[0, size]`. `None` when the prediction is
/// empty (step 2: the pipeline then returns `L_global` unchanged).
pub fn roi_bounds(
    pred_bbox: Option<BBox>,
    cropped_dims: [usize; 3],
    window: [usize; 3],
) -> Option<Roi> {
    let b = pred_bbox?;
    let mut bounds = [0usize; 6];
    let mut shape = [0usize; 3];
    for a in 0..3 {
        let extent = b[a + 3] - b[a] + 1;
        let half = window[a].saturating_sub(extent) / 2;
        let lo = b[a].saturating_sub(half);
        let hi = (b[a + 3] + half).min(cropped_dims[a]);
        bounds[a] = lo;
        bounds[a + 3] = hi;
        shape[a] = (hi + 1).min(cropped_dims[a]) - lo;
    }
    Some(Roi {
        bounds,
        start: [bounds[0], bounds[1], bounds[2]],
        shape,
    })
}

/// Spec §6.7 from the logits: the bbox of `L_global > 0` (equivalent to sigmoid > 0.5, §7.10),
/// then [`roi_bounds`].
pub fn roi_from_logits(
    global_logits: &[f32],
    cropped_dims: [usize; 3],
    window: [usize; 3],
) -> Result<Option<Roi>> {
    check_grid("cropped grid", cropped_dims)?;
    if global_logits.len() != cropped_dims.iter().product::<usize>() {
        return Err(Error::Input(format!(
            "zoom-out logits of {} values do not match the cropped grid {cropped_dims:?}",
            global_logits.len()
        )));
    }
    let b = volume::bbox_above(global_logits, cropped_dims, [0; 3], cropped_dims, 0.0);
    Ok(roi_bounds(b, cropped_dims, window))
}

// ----- Sliding windows (spec §6.8) -----

/// The zoom-out prediction as the window boxes need it: `(start, extent)` of a box of the
/// cropped grid to the bbox of `L_global > 0` inside it, relative to `start`.
pub type Prediction<'a> = dyn FnMut([usize; 3], [usize; 3]) -> Result<Option<BBox>> + 'a;

/// One window of the sliding-window scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Execution index (D slowest).
    pub index: usize,
    /// First voxel in the padded ROI.
    pub start: [usize; 3],
}

/// The sliding-window scan over an ROI (MONAI 0.9.0 `sliding_window_inference` as modified by
/// SegVol, spec §6.8 steps 1–4).
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindows {
    pub roi_shape: [usize; 3],
    pub window: [usize; 3],
    /// Zero padding before / after the ROI on each axis smaller than the window:
    /// `floor(diff/2)` before, the rest after.
    pub pad_before: [usize; 3],
    pub pad_after: [usize; 3],
    /// `max(roi, window)` per axis.
    pub padded: [usize; 3],
    /// The window itself on an axis equal to it, else `int(window * (1 - overlap))` (min 1).
    pub interval: [usize; 3],
    /// In execution order: `meshgrid(..., indexing='ij')`, D slowest.
    pub windows: Vec<Window>,
}

impl SlidingWindows {
    /// The scan of an ROI of `roi_shape` with windows of `window` and the given overlap (the
    /// official pipeline uses 0.5).
    pub fn new(roi_shape: [usize; 3], window: [usize; 3], overlap: f64) -> Result<Self> {
        check_grid("ROI", roi_shape)?;
        check_grid("window", window)?;
        if !(0.0..1.0).contains(&overlap) {
            return Err(Error::Input(format!(
                "overlap {overlap} must be >= 0 and < 1"
            )));
        }
        let mut pad_before = [0; 3];
        let mut pad_after = [0; 3];
        let mut padded = [0; 3];
        let mut interval = [0; 3];
        let mut starts: [Vec<usize>; 3] = Default::default();
        for a in 0..3 {
            let diff = window[a].saturating_sub(roi_shape[a]);
            pad_before[a] = diff / 2;
            pad_after[a] = diff - diff / 2;
            padded[a] = roi_shape[a].max(window[a]);
            interval[a] = if window[a] == padded[a] {
                window[a]
            } else {
                ((window[a] as f64 * (1.0 - overlap)) as usize).max(1)
            };
            // MONAI dense_patch_slices: the first k with k*interval + window >= size, plus one;
            // every start shifted back so the window ends inside the image.
            let num = padded[a].div_ceil(interval[a]);
            let count = (0..num)
                .position(|k| k * interval[a] + window[a] >= padded[a])
                .map_or(1, |k| k + 1);
            starts[a] = (0..count)
                .map(|k| {
                    let s = k * interval[a];
                    s - (s + window[a]).saturating_sub(padded[a])
                })
                .collect();
        }
        let mut windows = Vec::new();
        for &d in &starts[0] {
            for &h in &starts[1] {
                for &w in &starts[2] {
                    windows.push(Window {
                        index: windows.len(),
                        start: [d, h, w],
                    });
                }
            }
        }
        Ok(SlidingWindows {
            roi_shape,
            window,
            pad_before,
            pad_after,
            padded,
            interval,
            windows,
        })
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether there are no windows (never, for a valid scan).
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Window `i`'s `[start, stop)` per axis in the padded ROI.
    pub fn padded_range(&self, i: usize) -> [[usize; 2]; 3] {
        let s = self.windows[i].start;
        [0, 1, 2].map(|a| [s[a], s[a] + self.window[a]])
    }

    /// Window `i`'s range clipped to the unpadded ROI, in ROI coordinates.
    pub fn roi_range(&self, i: usize) -> [[usize; 2]; 3] {
        let s = self.windows[i].start;
        [0, 1, 2].map(|a| {
            let clip = |v: usize| v.saturating_sub(self.pad_before[a]).min(self.roi_shape[a]);
            [clip(s[a]), clip(s[a] + self.window[a])]
        })
    }

    /// Multi-window box prompt (spec §6.8 step 5): `generate_box` of the padded zoom-out
    /// prediction (`L_global > 0` inside the ROI, zero in the padding) inside window `i`, in
    /// window coordinates; `None` (fed as `[-1; 6]`) when the window holds no positive voxel.
    /// `prediction(start, extent)` is the bbox of `L_global > 0` in that box of the cropped
    /// grid, relative to `start` (a device's `bbox_above`, or a host one in the tests).
    pub fn box_from_prediction(
        &self,
        i: usize,
        roi: &Roi,
        prediction: &mut Prediction<'_>,
    ) -> Result<Option<BBox>> {
        let r = self.roi_range(i);
        if r.iter().any(|x| x[0] >= x[1]) {
            return Ok(None);
        }
        let start = [0, 1, 2].map(|a| roi.start[a] + r[a][0]);
        let extent = [0, 1, 2].map(|a| r[a][1] - r[a][0]);
        let Some(b) = prediction(start, extent)? else {
            return Ok(None);
        };
        // From the clipped range back to the window: ROI offset + pad - window start.
        let off = [0, 1, 2].map(|a| r[a][0] + self.pad_before[a] - self.windows[i].start[a]);
        Ok(Some([0, 1, 2, 3, 4, 5].map(|k| b[k] + off[k % 3])))
    }

    /// Single-window box prompt (spec §6.8 step 5, §7.13): `generate_box` of the cropped-grid
    /// prompt map (the upsampled binary cube) cut to the ROI and sliced with window `i`'s
    /// **padded** range on the **unpadded** map, so the box carries no pad offset.
    pub fn box_from_prompt_map(
        &self,
        i: usize,
        prompt_map: &[f32],
        cropped_dims: [usize; 3],
        roi: &Roi,
    ) -> Option<BBox> {
        let s = self.windows[i].start;
        let lo = [0, 1, 2].map(|a| s[a].min(roi.shape[a]));
        let hi = [0, 1, 2].map(|a| (s[a] + self.window[a]).min(roi.shape[a]));
        if (0..3).any(|a| lo[a] >= hi[a]) {
            return None;
        }
        let start = [0, 1, 2].map(|a| roi.start[a] + lo[a]);
        let extent = [0, 1, 2].map(|a| hi[a] - lo[a]);
        let b = volume::bbox_above(prompt_map, cropped_dims, start, extent, 0.0)?;
        Some([0, 1, 2, 3, 4, 5].map(|k| b[k] + lo[k % 3] - s[k % 3]))
    }

    /// [`Self::box_from_prompt_map`] for the binary cube of a zoom-out box, computed per axis
    /// without building the cropped-grid map.
    pub fn box_from_zoom_out_box(
        &self,
        i: usize,
        zoom_box: BBox,
        zoom_dims: [usize; 3],
        cropped_dims: [usize; 3],
        roi: &Roi,
    ) -> Option<BBox> {
        let s = self.windows[i].start;
        let mut b = [0usize; 6];
        for a in 0..3 {
            let (j0, j1) =
                upsampled_range(zoom_box[a], zoom_box[a + 3], zoom_dims[a], cropped_dims[a])?;
            // The window's slice of the unpadded ROI map, in cropped-grid coordinates.
            let lo = roi.start[a] + s[a].min(roi.shape[a]);
            let hi = roi.start[a] + (s[a] + self.window[a]).min(roi.shape[a]);
            let (c0, c1) = (j0.max(lo), j1.min(hi.checked_sub(1)?));
            if c0 > c1 {
                return None;
            }
            b[a] = c0 - roi.start[a] - s[a];
            b[a + 3] = c1 - roi.start[a] - s[a];
        }
        Some(b)
    }

    /// The box prompt of window `i` when a box or points are in use (spec §6.8 step 5): with a
    /// box and exactly one window, the box of the zoom-out box's binary cube
    /// (`single_window_box = Some((zoom_box, zoom_dims))`); otherwise (several windows, or point
    /// mode: pass `None`) the box of the zoom-out prediction. Text-only windows get no box.
    pub fn window_box(
        &self,
        i: usize,
        roi: &Roi,
        cropped_dims: [usize; 3],
        single_window_box: Option<(BBox, [usize; 3])>,
        prediction: &mut Prediction<'_>,
    ) -> Result<Option<BBox>> {
        match single_window_box {
            Some((zb, zd)) if self.len() == 1 => {
                Ok(self.box_from_zoom_out_box(i, zb, zd, cropped_dims, roi))
            }
            _ => self.box_from_prediction(i, roi, prediction),
        }
    }

    /// Window `i`'s model input (spec §6.8 steps 1 and 6): the window of the zero-padded ROI,
    /// read from the ROI volume (`roi_shape`, row-major) into `out` (`window`).
    pub fn extract_window(&self, i: usize, roi_volume: &[f32], out: &mut [f32]) {
        let s = self.windows[i].start;
        let src_start = [0, 1, 2].map(|a| s[a] as i64 - self.pad_before[a] as i64);
        volume::copy_box_f32(
            roi_volume,
            self.roi_shape,
            src_start,
            out,
            self.window,
            [0; 3],
            self.window,
            0.0,
        );
    }

    /// Adds window `i`'s logits (`window`) into the padded-ROI accumulators (`padded`;
    /// constant blending, spec §6.8 step 7).
    pub fn accumulate(&self, i: usize, logits: &[f32], acc: &mut [f32], cnt: &mut [f32]) {
        volume::accumulate_window(
            logits,
            self.window,
            acc,
            cnt,
            self.padded,
            self.windows[i].start,
        );
    }

    /// The blended ROI logits (spec §6.8 step 7): the padded-ROI sums divided by their counts,
    /// with the padding cropped off. Returns a `roi_shape` volume.
    pub fn blend(&self, acc: &[f32], cnt: &[f32]) -> Vec<f32> {
        let mut avg = vec![0f32; acc.len()];
        volume::divide_counts(acc, cnt, &mut avg);
        let mut out = vec![0f32; self.roi_shape.iter().product()];
        volume::copy_box_f32(
            &avg,
            self.padded,
            self.pad_before.map(|v| v as i64),
            &mut out,
            self.roi_shape,
            [0; 3],
            self.roi_shape,
            0.0,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roi_clamps_to_size_and_pads_half() {
        // Small organ: pad (32 - 7) / 2 = 12 each side, D clamped to [0, 20] with size 20.
        let r = roi_bounds(
            Some([5, 100, 200, 11, 179, 259]),
            [20, 340, 506],
            [32, 256, 256],
        )
        .unwrap();
        assert_eq!(r.bounds, [0, 12, 102, 20, 267, 357]);
        assert_eq!(r.shape, [20, 256, 256]);
        assert_eq!(roi_bounds(None, [20, 340, 506], [32, 256, 256]), None);
        // Odd padding loses a voxel: extent 6 in a window of 9 pads 1 each side.
        let r = roi_bounds(Some([10, 10, 10, 15, 15, 15]), [40, 40, 40], [9, 9, 9]).unwrap();
        assert_eq!(r.shape, [8, 8, 8]);
    }

    #[test]
    fn windows_follow_dense_patch_slices() {
        let sw = SlidingWindows::new([60, 64, 64], [32, 64, 64], 0.5).unwrap();
        let d: Vec<usize> = sw.windows.iter().map(|w| w.start[0]).collect();
        assert_eq!(d, vec![0, 16, 28]);
        assert_eq!(sw.interval, [16, 64, 64]);
        let sw = SlidingWindows::new([20, 300, 100], [32, 256, 256], 0.5).unwrap();
        assert_eq!(sw.pad_before, [6, 0, 78]);
        assert_eq!(sw.pad_after, [6, 0, 78]);
        assert_eq!(sw.padded, [32, 300, 256]);
        assert_eq!(sw.len(), 2);
        assert_eq!(sw.roi_range(1), [[0, 20], [44, 300], [0, 100]]);
        assert!(SlidingWindows::new([20, 30, 40], [32, 64, 64], 1.0).is_err());
        assert!(SlidingWindows::new([0, 30, 40], [32, 64, 64], 0.5).is_err());
    }

    #[test]
    fn zoom_out_box_analytic_matches_the_map() {
        let cropped = [30usize, 96, 121];
        let zoom = [32usize, 64, 64];
        for zb in [
            [0usize, 17, 22, 31, 57, 55],
            [3, 0, 0, 5, 63, 1],
            [31, 63, 63, 31, 63, 63],
        ] {
            let map = build_binary_cube(zb, zoom, cropped).unwrap();
            for roi_b in [[0usize, 0, 0, 29, 95, 120], [2, 10, 30, 20, 60, 90]] {
                let roi = roi_bounds(Some(roi_b), cropped, zoom).unwrap();
                let sw = SlidingWindows::new(roi.shape, zoom, 0.5).unwrap();
                for i in 0..sw.len() {
                    assert_eq!(
                        sw.box_from_zoom_out_box(i, zb, zoom, cropped, &roi),
                        sw.box_from_prompt_map(i, &map, cropped, &roi),
                        "box {zb:?} roi {roi_b:?} window {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn box_and_point_mapping() {
        // Identity axis keeps the box; 30 -> 32 stretches D to the full frame.
        assert_eq!(
            box_zoom_out_dhw([0, 1, 0, 29, 62, 61], [30, 64, 64], [32, 64, 64]).unwrap(),
            [0, 1, 0, 31, 62, 61]
        );
        // A one-voxel-thick box on a 4x shrinking axis that no sample hits: 400 -> 100 samples
        // sources 2, 6, 10, ...; voxel 4 is never sampled, so the box snaps to its voxel.
        let b = box_zoom_out_dhw([4, 0, 0, 4, 9, 9], [400, 10, 10], [100, 10, 10]).unwrap();
        assert_eq!(b, [1, 0, 0, 1, 9, 9]);
        assert!(box_zoom_out_dhw([5, 0, 0, 4, 9, 9], [400, 10, 10], [100, 10, 10]).is_err());
        assert!(box_zoom_out_dhw([0, 0, 0, 400, 9, 9], [400, 10, 10], [100, 10, 10]).is_err());
        assert_eq!(
            point_zoom_out_dhw([29, 0, 120], [30, 96, 121], [32, 64, 64]).unwrap(),
            [31, 0, 63]
        );
        assert_eq!(
            point_zoom_out_dhw([4, 47, 60], [400, 96, 121], [100, 64, 64]).unwrap(),
            [1, 31, 32]
        );
        assert!(point_zoom_out_dhw([30, 0, 0], [30, 96, 121], [32, 64, 64]).is_err());
        // Points: only positives are marked.
        let m = build_binary_points(&[[1, 2, 3], [0, 0, 0]], &[1.0, 0.0], [4, 4, 4], [4, 4, 4])
            .unwrap();
        assert_eq!(m.iter().filter(|&&v| v == 1.0).count(), 1);
        assert_eq!(m[(4 + 2) * 4 + 3], 1.0);
    }
}
