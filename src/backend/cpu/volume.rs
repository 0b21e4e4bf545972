//! Volume ops of the pipeline on f32 slices (spec §6.2, §6.3, §6.8).
//!
//! Placeholder: straightforward loops so that the CPU backend compiles and runs end to end;
//! the volume-ops owner's file replaces this one with the same signatures.

use crate::backend::{BBox, ForegroundStats};
use crate::error::{Error, Result};

/// numpy `percentile(v, q)` with linear interpolation on sorted `v`.
fn percentile_sorted(v: &[f32], q: f64) -> f64 {
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let t = pos - lo as f64;
    let (a, b) = (v[lo] as f64, v[hi] as f64);
    a + (b - a) * t
}

/// Foreground statistics (spec §6.2).
pub fn foreground_stats(x: &[f32]) -> Result<ForegroundStats> {
    if x.is_empty() {
        return Err(Error::Input(
            "foreground statistics of an empty volume".into(),
        ));
    }
    let threshold = (x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64) as f32;
    let mut fg: Vec<f32> = x.iter().copied().filter(|&v| v > threshold).collect();
    if fg.is_empty() {
        return Err(Error::Input(
            "the volume is constant: no voxel lies above its mean".into(),
        ));
    }
    fg.sort_by(f32::total_cmp);
    let n = fg.len() as f64;
    let mean = fg.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = fg.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    Ok(ForegroundStats {
        threshold,
        count: fg.len() as u64,
        p_lo: percentile_sorted(&fg, 0.05),
        p_hi: percentile_sorted(&fg, 99.95),
        mean: mean as f32,
        std: var.sqrt() as f32,
    })
}

/// `out = (clip(x, lo, hi) - mean) / std`; returns (min, max) of `out`.
pub fn clip_zscore(
    x: &[f32],
    out: &mut [f32],
    lo: f32,
    hi: f32,
    mean: f32,
    std: f32,
) -> (f32, f32) {
    let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v.max(lo).min(hi) - mean) / std;
        mn = mn.min(*o);
        mx = mx.max(*o);
    }
    (mn, mx)
}

/// `out = (x - sub) / div`.
pub fn shift_scale(x: &[f32], out: &mut [f32], sub: f32, div: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - sub) / div;
    }
}

/// Inclusive bounding box of `x > threshold` inside a sub-box, relative to its start.
pub fn bbox_above(
    x: &[f32],
    dims: [usize; 3],
    start: [usize; 3],
    extent: [usize; 3],
    threshold: f32,
) -> Option<BBox> {
    let mut b: Option<BBox> = None;
    for d in 0..extent[0] {
        for h in 0..extent[1] {
            for w in 0..extent[2] {
                let i = ((start[0] + d) * dims[1] + start[1] + h) * dims[2] + start[2] + w;
                if x[i] > threshold {
                    b = Some(match b {
                        None => [d, h, w, d, h, w],
                        Some(o) => [
                            o[0].min(d),
                            o[1].min(h),
                            o[2].min(w),
                            o[3].max(d),
                            o[4].max(h),
                            o[5].max(w),
                        ],
                    });
                }
            }
        }
    }
    b
}

/// Copies a box with padding where the source index falls outside the source.
#[allow(clippy::too_many_arguments)]
pub fn copy_box_f32(
    src: &[f32],
    src_dims: [usize; 3],
    src_start: [i64; 3],
    dst: &mut [f32],
    dst_dims: [usize; 3],
    dst_start: [usize; 3],
    extent: [usize; 3],
    pad: f32,
) {
    for d in 0..extent[0] {
        for h in 0..extent[1] {
            for w in 0..extent[2] {
                let s = [
                    src_start[0] + d as i64,
                    src_start[1] + h as i64,
                    src_start[2] + w as i64,
                ];
                let inside = (0..3).all(|a| s[a] >= 0 && (s[a] as usize) < src_dims[a]);
                let v = if inside {
                    src[((s[0] as usize) * src_dims[1] + s[1] as usize) * src_dims[2]
                        + s[2] as usize]
                } else {
                    pad
                };
                dst[((dst_start[0] + d) * dst_dims[1] + dst_start[1] + h) * dst_dims[2]
                    + dst_start[2]
                    + w] = v;
            }
        }
    }
}

/// `acc[start + p] += win[p]; cnt[start + p] += 1` for `p < window`.
pub fn accumulate_window(
    win: &[f32],
    window: [usize; 3],
    acc: &mut [f32],
    cnt: &mut [f32],
    dims: [usize; 3],
    start: [usize; 3],
) {
    for d in 0..window[0] {
        for h in 0..window[1] {
            for w in 0..window[2] {
                let i = ((start[0] + d) * dims[1] + start[1] + h) * dims[2] + start[2] + w;
                acc[i] += win[(d * window[1] + h) * window[2] + w];
                cnt[i] += 1.0;
            }
        }
    }
}

/// `out = acc / cnt` where `cnt > 0`, else `acc`.
pub fn divide_counts(acc: &[f32], cnt: &[f32], out: &mut [f32]) {
    for ((o, &a), &c) in out.iter_mut().zip(acc).zip(cnt) {
        *o = if c > 0.0 { a / c } else { a };
    }
}

/// `out = (x > threshold) as u8`.
pub fn threshold_u8(x: &[f32], out: &mut [u8], threshold: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v > threshold) as u8;
    }
}
