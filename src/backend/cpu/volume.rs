//! Volume ops of the CPU backend (spec §6): safe, slice-based, multi-threaded with rayon.
//!
//! These are the reference implementations of the pipeline's volume ops
//! ([`crate::backend::Backend::foreground_stats`] .. [`crate::backend::Backend::threshold_u8`]).
//! Volumes are row-major `(D, H, W)` f32 slices. The arithmetic reproduces the official
//! preprocessing (numpy 1.x on float32 arrays, spec §6.2) bit for bit where the fixtures pin it:
//!
//! - `np.mean` / `np.std` of a float32 array sum in float32 with numpy's pairwise summation, run
//!   over consecutive chunks of 8192 values (the ufunc buffer size) whose partial sums are added
//!   sequentially: [`numpy_sum_f32`];
//! - `np.percentile` (method `linear`) selects the two neighbouring order statistics exactly and
//!   interpolates in f64 from their float32 difference: [`percentile_linear`];
//! - `np.clip(x, lo, hi)` with float64 bounds on a float32 array runs in float32 (numpy 1.x
//!   value-based casting rounds the bounds to f32), and so do `(x - mean) / std` and the min-max
//!   step.

use crate::backend::{BBox, ForegroundStats};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// numpy's ufunc buffer size: a float32 reduction is summed pairwise inside chunks of this many
/// values, and the chunk sums are accumulated left to right (spec §6.2, fixtures README §4).
/// Established against the fixtures: with this chunking the thresholds and stds of all three
/// CTs match bit for bit; one pairwise tree over the whole array misses two of them by an ulp.
pub const NP_BUFSIZE: usize = 8192;
/// numpy's `PW_BLOCKSIZE`: pairwise summation switches to 8 running sums below this size.
const PW_BLOCKSIZE: usize = 128;
/// Voxels per block of the foreground-count prefix (random access into the foreground).
const SEQ_BLOCK: usize = 1 << 16;
/// Integer-valued volumes whose foreground spans at most this many values use a histogram for
/// the percentiles instead of a copy + selection.
const HIST_MAX_BINS: usize = 1 << 18;
/// Elements per parallel task of the elementwise ops.
const PAR_CHUNK: usize = 1 << 15;

/// numpy's `pairwise_sum` for float32 (`loops_utils.h`): below 8 values a plain loop, up to 128
/// values eight interleaved running sums combined as a tree, above that a split at an even
/// multiple of 8 near the middle.
pub fn pairwise_sum_f32(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        // numpy starts from -0.0 so that a sum of negative zeros stays -0.0.
        let mut res = -0.0f32;
        for &v in a {
            res += v;
        }
        res
    } else if n <= PW_BLOCKSIZE {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        let mut i = 8;
        while i < full {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[full..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum_f32(&a[..n2]) + pairwise_sum_f32(&a[n2..])
    }
}

/// The order in which numpy visits the voxels of a volume when it reduces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traversal {
    /// Buffer order: element `i` of the slice is the `i`-th value.
    Linear,
    /// Column-major order of a row-major `(D, H, W)` volume: `d` fastest, `w` slowest. This is
    /// the C order of the `(X, Y, Z)` array that the official preprocessing flattens (spec §6.1,
    /// §6.2 run before `DimTranspose`), for a volume held as the model's `(Z, Y, X)`.
    ColumnMajor([usize; 3]),
}

impl Traversal {
    fn check(self, n: usize) -> Result<()> {
        if let Traversal::ColumnMajor(dims) = self {
            if dims.iter().product::<usize>() != n {
                return Err(Error::Input(format!(
                    "volume of {n} voxels does not match dims {dims:?}"
                )));
            }
        }
        Ok(())
    }
}

/// Transposes a row-major `(D, H, W)` volume into its column-major walk (`d` fastest, `w`
/// slowest): `out[(w * H + h) * D + d] = x[(d * H + h) * W + w]`. Cache-blocked: a task owns
/// the output of `T` consecutive `w` and, per `h`, reads `T x T` tiles of whole source lines.
pub fn column_major_copy(x: &[f32], dims: [usize; 3]) -> Vec<f32> {
    const T: usize = 16;
    let [dd, hh, ww] = dims;
    assert_eq!(x.len(), dd * hh * ww, "column_major_copy: dims");
    let mut out = vec![0f32; x.len()];
    if x.is_empty() {
        return out;
    }
    let plane = hh * dd;
    out.par_chunks_mut(T * plane)
        .enumerate()
        .for_each(|(g, part)| {
            let w0 = g * T;
            let nw = part.len() / plane;
            // Whole source lines are read into a tile and whole output lines written from it:
            // both strides are powers of two times a page, so touching a line twice would miss.
            let mut tile = [[0f32; T]; T];
            for h in 0..hh {
                for d0 in (0..dd).step_by(T) {
                    let nd = T.min(dd - d0);
                    for (dl, t) in tile.iter_mut().enumerate().take(nd) {
                        let src = &x[((d0 + dl) * hh + h) * ww + w0..][..nw];
                        t[..nw].copy_from_slice(src);
                    }
                    #[allow(clippy::needless_range_loop)] // wi picks a column of the tile
                    for wi in 0..nw {
                        let o = wi * plane + h * dd + d0;
                        for (dl, v) in part[o..o + nd].iter_mut().enumerate() {
                            *v = tile[dl][wi];
                        }
                    }
                }
            }
        });
    out
}

/// `np.add.reduce` of a float32 sequence of `n` values: pairwise sums of consecutive chunks of
/// [`NP_BUFSIZE`] values, accumulated left to right from 0 in f32. `cursor(k)` returns a
/// filler that writes the sequence from its `k`-th value on, `buf.len()` values per call. The
/// chunk sums are computed in parallel; the result does not depend on the thread count.
pub fn numpy_sum_f32<F, C>(n: usize, cursor: F) -> f32
where
    F: Fn(usize) -> C + Sync,
    C: FnMut(&mut [f32]),
{
    const GROUP: usize = 16;
    let chunks = n.div_ceil(NP_BUFSIZE);
    let sums: Vec<Vec<f32>> = (0..chunks.div_ceil(GROUP))
        .into_par_iter()
        .map(|g| {
            let c0 = g * GROUP;
            let c1 = (c0 + GROUP).min(chunks);
            let mut fill = cursor(c0 * NP_BUFSIZE);
            let mut buf = vec![0f32; NP_BUFSIZE];
            (c0..c1)
                .map(|c| {
                    let len = NP_BUFSIZE.min(n - c * NP_BUFSIZE);
                    fill(&mut buf[..len]);
                    pairwise_sum_f32(&buf[..len])
                })
                .collect()
        })
        .collect();
    sums.iter().flatten().fold(0.0f32, |acc, &s| acc + s)
}

/// A cursor over the foreground `{v in x : v > threshold}` in buffer order.
struct FgCursor<'a> {
    x: &'a [f32],
    pos: usize,
    threshold: f32,
}

impl<'a> FgCursor<'a> {
    /// The cursor at foreground value `k`, found through `prefix` (foreground values before
    /// each [`SEQ_BLOCK`] of `x`).
    fn at(x: &'a [f32], threshold: f32, prefix: &[usize], k: usize) -> Self {
        let b = prefix.partition_point(|&p| p <= k) - 1;
        let mut pos = b * SEQ_BLOCK;
        let mut skip = k - prefix[b];
        while skip > 0 {
            skip -= (x[pos] > threshold) as usize;
            pos += 1;
        }
        FgCursor { x, pos, threshold }
    }

    /// Writes the next `out.len()` foreground values. Branch-free compaction: every value is
    /// stored and the write index advances only past foreground ones; scanning at most as many
    /// values as are still missing keeps the index inside `out`.
    fn fill(&mut self, out: &mut [f32]) {
        let mut j = 0;
        while j < out.len() {
            let m = (out.len() - j).min(self.x.len() - self.pos);
            // The prefix counts guarantee enough foreground values; running out is a bug.
            assert!(m > 0, "foreground cursor ran past the volume");
            for &v in &self.x[self.pos..self.pos + m] {
                out[j] = v;
                j += (v > self.threshold) as usize;
            }
            self.pos += m;
        }
    }
}

/// numpy's `np.percentile(F, q)` with the default `linear` method, for a sorted sequence of `n`
/// values given by `kth(i)` (the `i`-th smallest): virtual index `(n-1) * (q/100)` in f64, the
/// float32 difference of the two neighbours, then `a + diff*g` (g < 0.5) or `b - diff*(1-g)`
/// in f64 (numpy's `_lerp`).
pub fn percentile_linear(n: usize, q_percent: f64, mut kth: impl FnMut(usize) -> f32) -> f64 {
    debug_assert!(n > 0);
    let q = q_percent / 100.0;
    let v = (n - 1) as f64 * q;
    if v >= (n - 1) as f64 {
        return kth(n - 1) as f64;
    }
    let lo = v.floor();
    let g = v - lo;
    let i = lo as usize;
    let a = kth(i);
    let b = kth(i + 1);
    let diff = (b - a) as f64;
    if g >= 0.5 {
        b as f64 - diff * (1.0 - g)
    } else {
        a as f64 + diff * g
    }
}

/// One pass of facts about a block of voxels: the number above the threshold, the smallest of
/// those, the largest voxel, whether every voxel is a finite integer and whether any is not
/// finite. Eight independent lanes so that the loop vectorises.
#[derive(Clone, Copy)]
struct BlockScan {
    count: usize,
    fg_min: f32,
    max: f32,
    integral: bool,
    non_finite: bool,
}

impl BlockScan {
    fn of(x: &[f32], threshold: f32) -> BlockScan {
        const L: usize = 8;
        // 2^23: adding and subtracting it rounds any smaller magnitude to an integer.
        const TWO23: f32 = 8_388_608.0;
        let mut cnt = [0u32; L];
        let mut mn = [f32::INFINITY; L];
        let mut mx = [f32::NEG_INFINITY; L];
        let mut frac = [0u32; L];
        let mut bad = [0u32; L];
        let lanes = x.chunks_exact(L);
        let tail = lanes.remainder();
        let mut step = |l: usize, v: f32| {
            let k = v > threshold;
            cnt[l] += k as u32;
            let m = if k { v } else { f32::INFINITY };
            mn[l] = if m < mn[l] { m } else { mn[l] };
            mx[l] = if v > mx[l] { v } else { mx[l] };
            let t = v.abs();
            bad[l] |= (t.is_nan() | (t > f32::MAX)) as u32;
            frac[l] |= ((t < TWO23) & ((t + TWO23) - TWO23 != t)) as u32;
        };
        for c in lanes {
            for (l, &v) in c.iter().enumerate() {
                step(l, v);
            }
        }
        for (l, &v) in tail.iter().enumerate() {
            step(l, v);
        }
        BlockScan {
            count: cnt.iter().map(|&c| c as usize).sum(),
            fg_min: mn.iter().fold(f32::INFINITY, |a, &b| a.min(b)),
            max: mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
            integral: frac.iter().all(|&f| f == 0),
            non_finite: bad.iter().any(|&b| b != 0),
        }
    }

    fn merge(self, o: BlockScan) -> BlockScan {
        BlockScan {
            count: self.count + o.count,
            fg_min: self.fg_min.min(o.fg_min),
            max: self.max.max(o.max),
            integral: self.integral && o.integral,
            non_finite: self.non_finite || o.non_finite,
        }
    }
}

/// The statistics error for a volume without voxels (shared with the kernel backend).
pub(crate) fn err_empty_volume() -> Error {
    Error::Input("empty volume: no voxels".into())
}

/// The statistics error for a NaN or infinite voxel (shared with the kernel backend).
pub(crate) fn err_non_finite() -> Error {
    Error::Input("volume contains NaN or infinite values".into())
}

/// The statistics error for a volume with no voxel above its mean `threshold` (shared with the
/// kernel backend).
pub(crate) fn err_no_foreground(threshold: f32) -> Error {
    Error::Input(format!(
        "no voxel above the mean intensity {threshold} (constant volume): nothing to normalise"
    ))
}

/// Foreground statistics of a `(D, H, W)` volume read from a NIfTI file (spec §6.2), summed in
/// the official order: numpy's C order of the `(X, Y, Z)` array, [`Traversal::ColumnMajor`].
pub fn foreground_stats(x: &[f32], dims: [usize; 3]) -> Result<ForegroundStats> {
    if x.len() != dims.iter().product::<usize>() {
        return Err(Error::Internal(format!(
            "foreground_stats: {} values for dims {dims:?}",
            x.len()
        )));
    }
    foreground_stats_ordered(x, Traversal::ColumnMajor(dims))
}

/// Foreground statistics (spec §6.2, `ForegroundNormalization.normalize`), exactly as numpy 1.x
/// computes them on the float32 array whose C order is `order`:
///
/// 1. `threshold = np.mean(x)`: f32 chunked pairwise sum, divided by the count in f64, rounded
///    to f32;
/// 2. `F = x[x > threshold]` (strict, compared in f32), kept in traversal order;
/// 3. `p_lo, p_hi = np.percentile(F, 0.05), np.percentile(F, 99.95)` ([`percentile_linear`]),
///    from a histogram when `F` is integer-valued with a small range, else by selection;
/// 4. `mean = np.mean(F)`; `std = np.std(F)`: the mean subtracted is the f32 sum divided by
///    the f32 count, the squared deviations are summed pairwise in f32, divided in f64,
///    rounded to f32 and square-rooted in f32.
///
/// Errors ([`Error::Input`]) on an empty volume, a NaN or infinite voxel, or a volume with no
/// voxel above its mean (constant).
pub fn foreground_stats_ordered(x: &[f32], order: Traversal) -> Result<ForegroundStats> {
    let n = x.len();
    if n == 0 {
        return Err(err_empty_volume());
    }
    order.check(n)?;
    match order {
        Traversal::Linear => foreground_stats_linear(x),
        // Walking the volume column-major touches one value per cache line; a blocked
        // transposed copy (freed before the normalised volume is allocated) is much faster.
        Traversal::ColumnMajor(dims) => foreground_stats_linear(&column_major_copy(x, dims)),
    }
}

/// [`foreground_stats_ordered`] in buffer order.
fn foreground_stats_linear(x: &[f32]) -> Result<ForegroundStats> {
    let n = x.len();

    // 1. Threshold: the mean of all voxels (the order of `x` fixes the f32 rounding). A NaN
    //    or infinity poisons it; the scan below reports those.
    let total = numpy_sum_f32(n, |k| {
        let mut pos = k;
        move |buf: &mut [f32]| {
            buf.copy_from_slice(&x[pos..pos + buf.len()]);
            pos += buf.len();
        }
    });
    let threshold = (total as f64 / n as f64) as f32;

    // 2. One scan: foreground counts per block (random access into F), its range, and
    //    whether the volume is finite and integer-valued.
    let blocks: Vec<BlockScan> = x
        .par_chunks(SEQ_BLOCK)
        .map(|c| BlockScan::of(c, threshold))
        .collect();
    let scan = blocks
        .iter()
        .fold(BlockScan::of(&[], threshold), |a, &b| a.merge(b));
    if scan.non_finite {
        return Err(err_non_finite());
    }
    let count = scan.count;
    if count == 0 {
        return Err(err_no_foreground(threshold));
    }
    let mut prefix = Vec::with_capacity(blocks.len() + 1);
    let mut acc = 0usize;
    prefix.push(0);
    for b in &blocks {
        acc += b.count;
        prefix.push(acc);
    }

    // 3. Percentiles.
    let (p_lo, p_hi) =
        foreground_percentiles(x, threshold, count, scan.fg_min, scan.max, scan.integral);

    // 4. Mean and population std of F.
    let sum_f = numpy_sum_f32(count, |k| {
        let mut cur = FgCursor::at(x, threshold, &prefix, k);
        move |buf: &mut [f32]| cur.fill(buf)
    });
    let mean = (sum_f as f64 / count as f64) as f32;
    // `_var` divides the keepdims sum array by the count in float32.
    let arrmean = sum_f / count as f32;
    let sq = numpy_sum_f32(count, |k| {
        let mut cur = FgCursor::at(x, threshold, &prefix, k);
        move |buf: &mut [f32]| {
            cur.fill(buf);
            for v in buf.iter_mut() {
                let d = *v - arrmean;
                *v = d * d;
            }
        }
    });
    let var = (sq as f64 / count as f64) as f32;
    let std = var.sqrt();

    Ok(ForegroundStats {
        threshold,
        count: count as u64,
        p_lo,
        p_hi,
        mean,
        std,
    })
}

/// The 0.05th and 99.95th percentiles of the `count` values `{v in x : v > threshold}`, which
/// span `[fg_min, fg_max]` (order-independent).
fn foreground_percentiles(
    x: &[f32],
    threshold: f32,
    count: usize,
    fg_min: f32,
    fg_max: f32,
    integral: bool,
) -> (f64, f64) {
    let span_f = fg_max as f64 - fg_min as f64 + 1.0;
    if integral && span_f <= HIST_MAX_BINS as f64 {
        let span = span_f as usize;
        // Histogram of the integer values, one per parallel part, then merged. Background
        // voxels land in an extra last bin, so the loop has no branch.
        let base = fg_min as f64;
        let parts = rayon::current_num_threads().max(1) * 2;
        let part_len = x.len().div_ceil(parts).max(1);
        let hist = x
            .par_chunks(part_len)
            .map(|c| {
                let mut h = vec![0u32; span + 1];
                for &v in c {
                    let bin = if v > threshold {
                        (v as f64 - base) as usize
                    } else {
                        span
                    };
                    h[bin] += 1;
                }
                h
            })
            .reduce(
                || vec![0u32; span + 1],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += y;
                    }
                    a
                },
            );
        percentiles_from_histogram(&hist[..span], fg_min, count)
    } else {
        percentiles_by_selection(x, threshold, count)
    }
}

/// The 0.05th and 99.95th percentiles of `count` integer values given as a histogram: `hist[b]`
/// values equal `base + b` (`count` = the sum of `hist`). The `k`-th smallest is the first bin
/// whose cumulative count exceeds `k`. Shared with the kernel backend, whose device builds
/// the histogram.
pub(crate) fn percentiles_from_histogram(hist: &[u32], base: f32, count: usize) -> (f64, f64) {
    let base = base as f64;
    let mut cum = Vec::with_capacity(hist.len());
    let mut acc = 0u64;
    for &c in hist {
        acc += c as u64;
        cum.push(acc);
    }
    debug_assert_eq!(acc, count as u64);
    let kth = |k: usize| {
        let bin = cum.partition_point(|&c| c <= k as u64);
        (base + bin as f64) as f32
    };
    (
        percentile_linear(count, 0.05, kth),
        percentile_linear(count, 99.95, kth),
    )
}

/// The 0.05th and 99.95th percentiles of the `count` values `{v in x : v > threshold}` by
/// copy and selection (any values). Shared with the kernel backend for non-integer volumes.
pub(crate) fn percentiles_by_selection(x: &[f32], threshold: f32, count: usize) -> (f64, f64) {
    let mut f: Vec<f32> = x.par_iter().copied().filter(|&v| v > threshold).collect();
    debug_assert_eq!(f.len(), count);
    let lo = order_stats(&mut f, count, 0.05);
    let hi = order_stats(&mut f, count, 99.95);
    (lo, hi)
}

/// One percentile of `f` by selection (reorders `f`).
fn order_stats(f: &mut [f32], n: usize, q: f64) -> f64 {
    percentile_linear(n, q, |k| {
        let (_, v, _) = f.select_nth_unstable_by(k, f32::total_cmp);
        *v
    })
}

/// One voxel of [`clip_zscore`].
#[inline]
fn zscore(v: f32, lo: f32, hi: f32, mean: f32, std: f32) -> f32 {
    (v.max(lo).min(hi) - mean) / std
}

fn min_max_pair(a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    (a.0.min(b.0), a.1.max(b.1))
}

/// `out = (min(max(x, lo), hi) - mean) / std` in f32 (spec §6.2 steps 5–6; numpy's `clip` is
/// `minimum(maximum(x, lo), hi)`, so `lo > hi` gives `hi` and never panics). Returns the
/// `(min, max)` of `out`.
pub fn clip_zscore(
    x: &[f32],
    out: &mut [f32],
    lo: f32,
    hi: f32,
    mean: f32,
    std: f32,
) -> (f32, f32) {
    assert_eq!(
        x.len(),
        out.len(),
        "clip_zscore: input and output lengths differ"
    );
    out.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .map(|(o, i)| {
            let mut mm = (f32::INFINITY, f32::NEG_INFINITY);
            for (o, &v) in o.iter_mut().zip(i) {
                *o = zscore(v, lo, hi, mean, std);
                mm = min_max_pair(mm, (*o, *o));
            }
            mm
        })
        .reduce(|| (f32::INFINITY, f32::NEG_INFINITY), min_max_pair)
}

/// [`clip_zscore`] in place (the pipeline normalises the uploaded volume where it lies).
pub fn clip_zscore_in_place(x: &mut [f32], lo: f32, hi: f32, mean: f32, std: f32) -> (f32, f32) {
    x.par_chunks_mut(PAR_CHUNK)
        .map(|c| {
            let mut mm = (f32::INFINITY, f32::NEG_INFINITY);
            for v in c {
                *v = zscore(*v, lo, hi, mean, std);
                mm = min_max_pair(mm, (*v, *v));
            }
            mm
        })
        .reduce(|| (f32::INFINITY, f32::NEG_INFINITY), min_max_pair)
}

/// `out = (x - sub) / div` in f32 (the min-max step of spec §6.2).
pub fn shift_scale(x: &[f32], out: &mut [f32], sub: f32, div: f32) {
    assert_eq!(
        x.len(),
        out.len(),
        "shift_scale: input and output lengths differ"
    );
    out.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|(o, i)| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = (v - sub) / div;
            }
        });
}

/// [`shift_scale`] in place: `x = (x - sub) / div` (saves a volume in the host pipeline).
pub fn shift_scale_in_place(x: &mut [f32], sub: f32, div: f32) {
    x.par_chunks_mut(PAR_CHUNK).for_each(|c| {
        for v in c {
            *v = (*v - sub) / div;
        }
    });
}

fn check_box(what: &str, dims: [usize; 3], start: [usize; 3], extent: [usize; 3]) {
    if let Err(m) = crate::backend::check_sub_box(dims, start, extent) {
        panic!("{what}: {m}");
    }
}

/// Inclusive bounding box `[d0, h0, w0, d1, h1, w1]` of `x > threshold` inside the sub-box
/// `[start, start + extent)` of a `(D, H, W)` volume, relative to `start`; `None` when no voxel
/// qualifies (MONAI/SegVol `generate_box` and `logits2roi_coor` bounds, spec §6.7, §6.8).
pub fn bbox_above(
    x: &[f32],
    dims: [usize; 3],
    start: [usize; 3],
    extent: [usize; 3],
    threshold: f32,
) -> Option<BBox> {
    assert_eq!(x.len(), dims.iter().product::<usize>(), "bbox_above: dims");
    check_box("bbox_above", dims, start, extent);
    let [_, hh, ww] = dims;
    (0..extent[0])
        .into_par_iter()
        .filter_map(|d| {
            let mut b: Option<BBox> = None;
            for h in 0..extent[1] {
                let row0 = ((start[0] + d) * hh + start[1] + h) * ww + start[2];
                let row = &x[row0..row0 + extent[2]];
                let Some(first) = row.iter().position(|&v| v > threshold) else {
                    continue;
                };
                // `first` exists, so a last one does too.
                let last = row.iter().rposition(|&v| v > threshold).unwrap_or(first);
                b = Some(match b {
                    None => [d, h, first, d, h, last],
                    Some(p) => [d, p[1], p[2].min(first), d, h, p[5].max(last)],
                });
            }
            b
        })
        .reduce_with(|a, b| {
            [
                a[0].min(b[0]),
                a[1].min(b[1]),
                a[2].min(b[2]),
                a[3].max(b[3]),
                a[4].max(b[4]),
                a[5].max(b[5]),
            ]
        })
}

/// Copies a box of `extent` voxels between two `(D, H, W)` f32 volumes: for every `p < extent`,
/// `dst[dst_start + p] = src[src_start + p]` when that source voxel exists, else `pad`.
/// `src_start` may be negative or run past the source (zero padding of the sliding window,
/// spec §6.8 step 1); the destination box must lie inside `dst_dims`.
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
    assert_eq!(
        src.len(),
        src_dims.iter().product::<usize>(),
        "copy_box: src dims"
    );
    assert_eq!(
        dst.len(),
        dst_dims.iter().product::<usize>(),
        "copy_box: dst dims"
    );
    check_box("copy_box", dst_dims, dst_start, extent);
    if extent.contains(&0) {
        return;
    }
    // Source range on an axis that exists: [lo, hi) of p, and p's source index.
    let valid = |a: usize| -> (usize, usize) {
        let s = src_start[a];
        let lo = (-s).clamp(0, extent[a] as i64) as usize;
        let hi = (src_dims[a] as i64 - s).clamp(lo as i64, extent[a] as i64) as usize;
        (lo, hi)
    };
    let (wlo, whi) = valid(2);
    let plane = dst_dims[1] * dst_dims[2];
    dst.par_chunks_mut(plane)
        .skip(dst_start[0])
        .take(extent[0])
        .enumerate()
        .for_each(|(pd, dplane)| {
            let sd = src_start[0] + pd as i64;
            let d_ok = sd >= 0 && (sd as usize) < src_dims[0];
            for ph in 0..extent[1] {
                let sh = src_start[1] + ph as i64;
                let h_ok = sh >= 0 && (sh as usize) < src_dims[1];
                let o = (dst_start[1] + ph) * dst_dims[2] + dst_start[2];
                let row = &mut dplane[o..o + extent[2]];
                if !(d_ok && h_ok) || wlo >= whi {
                    row.fill(pad);
                    continue;
                }
                row[..wlo].fill(pad);
                row[whi..].fill(pad);
                let s0 = ((sd as usize * src_dims[1] + sh as usize) * src_dims[2]) as i64
                    + src_start[2]
                    + wlo as i64;
                let s0 = s0 as usize;
                row[wlo..whi].copy_from_slice(&src[s0..s0 + (whi - wlo)]);
            }
        });
}

/// Adds one window's logits into the sliding-window sum and counts it (constant blending,
/// spec §6.8 step 7): for `p < window`, `acc[start + p] += win[p]; cnt[start + p] += 1`.
pub fn accumulate_window(
    win: &[f32],
    window: [usize; 3],
    acc: &mut [f32],
    cnt: &mut [f32],
    dims: [usize; 3],
    start: [usize; 3],
) {
    assert_eq!(
        win.len(),
        window.iter().product::<usize>(),
        "accumulate: window"
    );
    assert_eq!(
        acc.len(),
        dims.iter().product::<usize>(),
        "accumulate: acc dims"
    );
    assert_eq!(cnt.len(), acc.len(), "accumulate: count dims");
    check_box("accumulate_window", dims, start, window);
    let plane = dims[1] * dims[2];
    let wplane = window[1] * window[2];
    if plane == 0 || wplane == 0 {
        return;
    }
    acc.par_chunks_mut(plane)
        .zip(cnt.par_chunks_mut(plane))
        .skip(start[0])
        .take(window[0])
        .enumerate()
        .for_each(|(pd, (ap, cp))| {
            let wp = &win[pd * wplane..(pd + 1) * wplane];
            for ph in 0..window[1] {
                let o = (start[1] + ph) * dims[2] + start[2];
                let src = &wp[ph * window[2]..(ph + 1) * window[2]];
                for ((a, c), &v) in ap[o..o + window[2]]
                    .iter_mut()
                    .zip(&mut cp[o..o + window[2]])
                    .zip(src)
                {
                    *a += v;
                    *c += 1.0;
                }
            }
        });
}

/// `out[i] = acc[i] / cnt[i]` where `cnt[i] > 0`, else `acc[i]` (f32; spec §6.8 step 7).
pub fn divide_counts(acc: &[f32], cnt: &[f32], out: &mut [f32]) {
    assert!(
        acc.len() == cnt.len() && acc.len() == out.len(),
        "divide_counts: lengths differ"
    );
    out.par_chunks_mut(PAR_CHUNK)
        .zip(acc.par_chunks(PAR_CHUNK).zip(cnt.par_chunks(PAR_CHUNK)))
        .for_each(|(o, (a, c))| {
            for ((o, &a), &c) in o.iter_mut().zip(a).zip(c) {
                *o = if c > 0.0 { a / c } else { a };
            }
        });
}

/// [`divide_counts`] in place: `acc[i] /= cnt[i]` where `cnt[i] > 0`.
pub fn divide_counts_in_place(acc: &mut [f32], cnt: &[f32]) {
    assert_eq!(acc.len(), cnt.len(), "divide_counts: lengths differ");
    acc.par_chunks_mut(PAR_CHUNK)
        .zip(cnt.par_chunks(PAR_CHUNK))
        .for_each(|(a, c)| {
            for (a, &c) in a.iter_mut().zip(c) {
                if c > 0.0 {
                    *a /= c;
                }
            }
        });
}

/// `out[i] = (x[i] > threshold) as u8` (the final mask, spec §6.9).
pub fn threshold_u8(x: &[f32], out: &mut [u8], threshold: f32) {
    assert_eq!(x.len(), out.len(), "threshold_u8: lengths differ");
    out.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|(o, i)| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = (v > threshold) as u8;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64 as Rng;

    fn idx(dims: [usize; 3], d: usize, h: usize, w: usize) -> usize {
        (d * dims[1] + h) * dims[2] + w
    }

    /// The textbook percentile on a sorted copy, with numpy's `_lerp`.
    fn percentile_sorted(v: &[f32], q: f64) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f32::total_cmp);
        percentile_linear(s.len(), q, |k| s[k])
    }

    #[test]
    fn pairwise_matches_a_direct_tree() {
        // Recompute numpy's tree with explicit recursion over index ranges.
        fn tree(a: &[f32], lo: usize, hi: usize) -> f32 {
            let n = hi - lo;
            if n <= 128 {
                return pairwise_sum_f32(&a[lo..hi]);
            }
            let mut n2 = n / 2;
            n2 -= n2 % 8;
            tree(a, lo, lo + n2) + tree(a, lo + n2, hi)
        }
        let mut r = Rng(7);
        for n in [0usize, 1, 7, 8, 9, 127, 128, 129, 1000, 8191, 8193, 20011] {
            let a: Vec<f32> = (0..n).map(|_| r.unit() * 200.0 - 100.0).collect();
            assert_eq!(
                pairwise_sum_f32(&a).to_bits(),
                tree(&a, 0, n).to_bits(),
                "n={n}"
            );
            // Small blocks: the 8-accumulator scheme by hand.
            if (8..=128).contains(&n) {
                let mut acc = [0f32; 8];
                for (i, v) in a[..n - n % 8].iter().enumerate() {
                    acc[i % 8] += v;
                }
                let mut res = ((acc[0] + acc[1]) + (acc[2] + acc[3]))
                    + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                for v in &a[n - n % 8..] {
                    res += v;
                }
                assert_eq!(pairwise_sum_f32(&a).to_bits(), res.to_bits());
            }
        }
    }

    #[test]
    fn numpy_sum_is_chunked_and_thread_independent() {
        let mut r = Rng(11);
        let n = 3 * NP_BUFSIZE + 517;
        let a: Vec<f32> = (0..n).map(|_| r.unit() * 3000.0 - 1000.0).collect();
        let mut expect = 0f32;
        for c in a.chunks(NP_BUFSIZE) {
            expect += pairwise_sum_f32(c);
        }
        let slice_cursor = |k: usize| {
            let mut pos = k;
            let a = &a;
            move |buf: &mut [f32]| {
                buf.copy_from_slice(&a[pos..pos + buf.len()]);
                pos += buf.len();
            }
        };
        let got = numpy_sum_f32(n, slice_cursor);
        assert_eq!(got.to_bits(), expect.to_bits());
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| numpy_sum_f32(n, slice_cursor));
        assert_eq!(got.to_bits(), single.to_bits());
    }

    #[test]
    fn column_major_copy_visits_d_fastest() {
        for dims in [[3usize, 4, 5], [17, 33, 19], [1, 1, 40], [40, 2, 1]] {
            let n = dims.iter().product::<usize>();
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let mut expect = Vec::new();
            for w in 0..dims[2] {
                for h in 0..dims[1] {
                    for d in 0..dims[0] {
                        expect.push(x[idx(dims, d, h, w)]);
                    }
                }
            }
            assert_eq!(column_major_copy(&x, dims), expect, "{dims:?}");
        }
    }

    /// Statistics recomputed naively (sorted copy, explicit numpy order) on random volumes.
    fn check_stats(x: &[f32], dims: [usize; 3]) {
        let s = foreground_stats_ordered(x, Traversal::ColumnMajor(dims)).unwrap();
        let mut seq = Vec::with_capacity(x.len());
        for w in 0..dims[2] {
            for h in 0..dims[1] {
                for d in 0..dims[0] {
                    seq.push(x[idx(dims, d, h, w)]);
                }
            }
        }
        let mut total = 0f32;
        for c in seq.chunks(NP_BUFSIZE) {
            total += pairwise_sum_f32(c);
        }
        let thr = (total as f64 / seq.len() as f64) as f32;
        assert_eq!(s.threshold.to_bits(), thr.to_bits());
        let f: Vec<f32> = seq.iter().copied().filter(|&v| v > thr).collect();
        assert_eq!(s.count, f.len() as u64);
        assert_eq!(s.p_lo, percentile_sorted(&f, 0.05));
        assert_eq!(s.p_hi, percentile_sorted(&f, 99.95));
        let mut sf = 0f32;
        for c in f.chunks(NP_BUFSIZE) {
            sf += pairwise_sum_f32(c);
        }
        assert_eq!(
            s.mean.to_bits(),
            ((sf as f64 / f.len() as f64) as f32).to_bits()
        );
        let m = sf / f.len() as f32;
        let sq: Vec<f32> = f.iter().map(|v| (v - m) * (v - m)).collect();
        let mut ss = 0f32;
        for c in sq.chunks(NP_BUFSIZE) {
            ss += pairwise_sum_f32(c);
        }
        let sd = ((ss as f64 / f.len() as f64) as f32).sqrt();
        assert_eq!(s.std.to_bits(), sd.to_bits());
    }

    #[test]
    fn stats_integer_histogram_path() {
        let mut r = Rng(3);
        // Large enough for several parallel groups of chunks and foreground blocks.
        let dims = [40usize, 97, 151];
        let x: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|_| r.below(2000) as f32 - 1024.0)
            .collect();
        check_stats(&x, dims);
    }

    #[test]
    fn stats_float_selection_path() {
        let mut r = Rng(5);
        let dims = [9usize, 31, 257];
        let x: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|_| r.unit() * 1500.0 - 900.0)
            .collect();
        check_stats(&x, dims);
        // Integer-valued but with a range too wide for the histogram.
        let y: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|_| r.below(1 << 20) as f32 - 1000.0)
            .collect();
        check_stats(&y, dims);
    }

    #[test]
    fn stats_reject_bad_volumes() {
        assert!(matches!(
            foreground_stats(&[], [0, 0, 0]),
            Err(Error::Input(_))
        ));
        assert!(matches!(
            foreground_stats(&[3.0; 100], [1, 1, 100]),
            Err(Error::Input(_))
        ));
        let mut v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        v[7] = f32::NAN;
        assert!(matches!(
            foreground_stats(&v, [1, 1, v.len()]),
            Err(Error::Input(_))
        ));
        assert!(matches!(
            foreground_stats_ordered(&[1.0, 2.0, 3.0], Traversal::ColumnMajor([2, 2, 2])),
            Err(Error::Input(_))
        ));
        // A single voxel above the mean: both percentiles are that voxel.
        let s = foreground_stats(&[0.0, 0.0, 0.0, 5.0], [1, 1, 4]).unwrap();
        assert_eq!(
            (s.count, s.p_lo, s.p_hi, s.mean, s.std),
            (1, 5.0, 5.0, 5.0, 0.0)
        );
    }

    #[test]
    fn clip_zscore_and_shift_scale_elementwise() {
        let mut r = Rng(9);
        let x: Vec<f32> = (0..100_003).map(|_| r.unit() * 2000.0 - 1000.0).collect();
        let mut z = vec![0f32; x.len()];
        let (mn, mx) = clip_zscore(&x, &mut z, -300.5, 700.25, 12.5, 87.3);
        let mut emn = f32::INFINITY;
        let mut emx = f32::NEG_INFINITY;
        for (v, o) in x.iter().zip(&z) {
            let e = (v.clamp(-300.5, 700.25) - 12.5) / 87.3;
            assert_eq!(o.to_bits(), e.to_bits());
            emn = emn.min(e);
            emx = emx.max(e);
        }
        assert_eq!((mn, mx), (emn, emx));
        let mut y = vec![0f32; x.len()];
        shift_scale(&z, &mut y, mn, mx - mn);
        for (o, v) in y.iter().zip(&z) {
            assert_eq!(o.to_bits(), ((v - mn) / (mx - mn)).to_bits());
        }
        shift_scale_in_place(&mut z, mn, mx - mn);
        assert_eq!(y, z);
    }

    #[test]
    fn bbox_above_matches_brute_force() {
        let mut r = Rng(21);
        let dims = [13usize, 29, 37];
        for trial in 0..40 {
            let n = dims.iter().product::<usize>();
            // Sparse positives so boxes vary.
            let density = [0u64, 1, 5, 50][trial % 4];
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    if r.below(1000) < density {
                        r.unit() + 0.01
                    } else {
                        -r.unit()
                    }
                })
                .collect();
            let start = [
                r.below(5) as usize,
                r.below(9) as usize,
                r.below(11) as usize,
            ];
            let extent = [
                r.below((dims[0] - start[0]) as u64 + 1) as usize,
                r.below((dims[1] - start[1]) as u64 + 1) as usize,
                r.below((dims[2] - start[2]) as u64 + 1) as usize,
            ];
            let mut expect: Option<BBox> = None;
            for d in 0..extent[0] {
                for h in 0..extent[1] {
                    for w in 0..extent[2] {
                        if x[idx(dims, start[0] + d, start[1] + h, start[2] + w)] > 0.0 {
                            expect = Some(match expect {
                                None => [d, h, w, d, h, w],
                                Some(b) => [
                                    b[0].min(d),
                                    b[1].min(h),
                                    b[2].min(w),
                                    b[3].max(d),
                                    b[4].max(h),
                                    b[5].max(w),
                                ],
                            });
                        }
                    }
                }
            }
            assert_eq!(
                bbox_above(&x, dims, start, extent, 0.0),
                expect,
                "trial {trial}"
            );
        }
    }

    #[test]
    fn copy_box_matches_brute_force_with_padding() {
        let mut r = Rng(33);
        let sdims = [7usize, 11, 13];
        let src: Vec<f32> = (0..sdims.iter().product::<usize>())
            .map(|_| r.unit())
            .collect();
        let ddims = [9usize, 10, 17];
        for trial in 0..60 {
            let extent = [
                1 + r.below(ddims[0] as u64) as usize,
                1 + r.below(ddims[1] as u64) as usize,
                1 + r.below(ddims[2] as u64) as usize,
            ];
            let dst_start = [
                r.below((ddims[0] - extent[0]) as u64 + 1) as usize,
                r.below((ddims[1] - extent[1]) as u64 + 1) as usize,
                r.below((ddims[2] - extent[2]) as u64 + 1) as usize,
            ];
            let src_start = [
                r.below(20) as i64 - 10,
                r.below(26) as i64 - 13,
                r.below(30) as i64 - 15,
            ];
            let fill = -2.5f32;
            let mut dst = vec![fill; ddims.iter().product()];
            copy_box_f32(
                &src, sdims, src_start, &mut dst, ddims, dst_start, extent, 0.0,
            );
            for d in 0..ddims[0] {
                for h in 0..ddims[1] {
                    for w in 0..ddims[2] {
                        let p = [
                            d as i64 - dst_start[0] as i64,
                            h as i64 - dst_start[1] as i64,
                            w as i64 - dst_start[2] as i64,
                        ];
                        let inside = (0..3).all(|a| p[a] >= 0 && p[a] < extent[a] as i64);
                        let expect = if !inside {
                            fill
                        } else {
                            let s = [
                                p[0] + src_start[0],
                                p[1] + src_start[1],
                                p[2] + src_start[2],
                            ];
                            if (0..3).all(|a| s[a] >= 0 && s[a] < sdims[a] as i64) {
                                src[idx(sdims, s[0] as usize, s[1] as usize, s[2] as usize)]
                            } else {
                                0.0
                            }
                        };
                        assert_eq!(
                            dst[idx(ddims, d, h, w)],
                            expect,
                            "trial {trial} at {d},{h},{w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn accumulate_and_divide() {
        let mut r = Rng(45);
        let dims = [11usize, 19, 23];
        let window = [5usize, 7, 9];
        let n = dims.iter().product::<usize>();
        let mut acc = vec![0f32; n];
        let mut cnt = vec![0f32; n];
        let mut eacc = vec![0f32; n];
        let mut ecnt = vec![0f32; n];
        for _ in 0..12 {
            let start = [
                r.below((dims[0] - window[0]) as u64 + 1) as usize,
                r.below((dims[1] - window[1]) as u64 + 1) as usize,
                r.below((dims[2] - window[2]) as u64 + 1) as usize,
            ];
            let win: Vec<f32> = (0..window.iter().product::<usize>())
                .map(|_| r.unit() * 4.0 - 2.0)
                .collect();
            accumulate_window(&win, window, &mut acc, &mut cnt, dims, start);
            for d in 0..window[0] {
                for h in 0..window[1] {
                    for w in 0..window[2] {
                        let i = idx(dims, start[0] + d, start[1] + h, start[2] + w);
                        eacc[i] += win[idx(window, d, h, w)];
                        ecnt[i] += 1.0;
                    }
                }
            }
        }
        assert_eq!(acc, eacc);
        assert_eq!(cnt, ecnt);
        assert!(cnt.contains(&0.0) && cnt.iter().any(|&c| c > 1.0));
        let mut out = vec![0f32; n];
        divide_counts(&acc, &cnt, &mut out);
        for i in 0..n {
            let e = if cnt[i] > 0.0 {
                acc[i] / cnt[i]
            } else {
                acc[i]
            };
            assert_eq!(out[i].to_bits(), e.to_bits());
        }
        let mut m = vec![7u8; n];
        threshold_u8(&out, &mut m, 0.0);
        for i in 0..n {
            assert_eq!(m[i], (out[i] > 0.0) as u8);
        }
    }
}
