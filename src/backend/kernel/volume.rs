//! Launch code of `kernels/volume.cu`: the pipeline's volume ops (spec §6.2–§6.9, contract in
//! [`crate::backend`], "Volume ops"), on any [`KernelDevice`].
//!
//! Reductions run in two stages: each block writes one 24-byte partial (`Part`) to the
//! [`Scratch`] buffer, `sv_vol_reduce_parts_f32` combines them in a fixed order, and only that
//! one result is downloaded. Each thread's share of the data and every combination order depend
//! only on the problem size, so the results are bit-identical from run to run and under any
//! block schedule; the only atomics are integer ones (histogram counts, bounding-box bounds).
//!
//! [`foreground_stats`] reproduces numpy's float32 summation order (the chunked pairwise sums
//! of the CPU reference) on the device, so its statistics equal the CPU's bit for bit; its
//! percentiles come from a device histogram of the foreground for integer-valued volumes (CT in
//! HU), otherwise from the CPU's selection on the downloaded foreground.

use crate::backend::cpu::volume as cpu_volume;
use crate::backend::kernel::{Dim3, KernelArgs, KernelDevice, Scratch};
use crate::backend::*;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Threads per block of the flat kernels and reductions (`volume::BLOCK` in the `.cu`).
const BLOCK: u32 = 256;
/// Box kernels: a block of 8 warps, one box row per warp.
const BOX_BLOCK: Dim3 = [32, 8, 1];
const BOX_ROWS: usize = 8;
/// Bytes of one `volume::Part`.
const PART_BYTES: usize = 24;
/// At most this many reduction blocks (~8 per SM of an H200, 132 SMs): enough to saturate
/// HBM, few enough that each thread reduces many values and the second stage is one block.
const MAX_RED_BLOCKS: usize = 1024;
/// Values per thread below which a reduction uses fewer blocks.
const RED_MIN_PER_THREAD: usize = 16;
/// At most this many blocks for the flat elementwise and box kernels (grid-stride beyond).
const MAX_EW_BLOCKS: usize = 4096;
/// numpy's ufunc buffer: values per pairwise chunk (`volume::CHUNK`).
const CHUNK: usize = cpu_volume::NP_BUFSIZE;
const _: () = assert!(CHUNK == 8192, "volume.cu assumes 8192-value chunks");
/// Values per compaction segment (`volume::SEG`, one block).
const SEG: usize = 8192;
/// Transpose tile (`volume::TD`, `volume::TW`).
const TILE_D: usize = 32;
const TILE_W: usize = 128;
/// Integer foregrounds spanning at most this many values take the histogram path.
const HIST_MAX_BINS: usize = 1 << 20;
/// Histograms up to this many bins (48 KiB) are privatised per block in shared memory.
const SMEM_HIST_BINS: usize = 12 * 1024;
/// `volume::FLAG_*`.
const FLAG_NON_FINITE: u32 = 1;
const FLAG_FRACTION: u32 = 2;

/// One combined reduction result, as `volume::Part` lays it out.
#[derive(Clone, Copy, Debug)]
struct Part {
    count: u64,
    mn: f32,
    mx: f32,
    flags: u32,
}

impl Part {
    fn from_bytes(b: &[u8; PART_BYTES]) -> Part {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Part {
            count: u64_at(0),
            mn: f32::from_bits(u32_at(8)),
            mx: f32::from_bits(u32_at(12)),
            flags: u32_at(16),
        }
    }
}

/// An engine bug in the arguments of `op`.
fn bad(dev: &dyn KernelDevice, op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{} {op}: {msg}", dev.name()))
}

/// Checks an address that `n` elements of `align`-byte alignment are accessed at.
fn check_addr(
    dev: &dyn KernelDevice,
    op: &str,
    what: &str,
    addr: Addr,
    n: usize,
    align: u64,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if addr == 0 {
        return Err(bad(dev, op, format!("{what} is a null address")));
    }
    if !addr.is_multiple_of(align) {
        return Err(bad(
            dev,
            op,
            format!("{what} address {addr:#x} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

/// Whether `[a, a + an)` and `[b, b + bn)` (bytes) overlap.
fn overlaps(a: Addr, an: usize, b: Addr, bn: usize) -> bool {
    an > 0 && bn > 0 && a < b + bn as u64 && b < a + an as u64
}

/// Product of dims, or an error naming `op` on overflow (or beyond 64-bit kernel indices).
fn volume_of(dev: &dyn KernelDevice, op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n.checked_mul(4).is_some_and(|b| b <= i64::MAX as usize))
        .ok_or_else(|| bad(dev, op, format!("size {dims:?} overflows")))
}

/// A flat length whose bytes fit 64-bit kernel indices.
fn check_len(dev: &dyn KernelDevice, op: &str, n: usize) -> Result<()> {
    if n.checked_mul(4).is_none_or(|b| b > i64::MAX as usize) {
        return Err(bad(dev, op, format!("n = {n} overflows")));
    }
    Ok(())
}

/// Whether every address is 16-byte aligned (the float4 path).
fn aligned16(addrs: &[Addr]) -> bool {
    addrs.iter().all(|a| a.is_multiple_of(16))
}

/// Blocks of a reduction over `n` values.
fn red_blocks(n: usize) -> usize {
    n.div_ceil(BLOCK as usize * RED_MIN_PER_THREAD)
        .clamp(1, MAX_RED_BLOCKS)
}

/// Blocks of a flat elementwise kernel over `n` values (4 per thread when vectorised).
fn ew_blocks(n: usize) -> u32 {
    n.div_ceil(4 * BLOCK as usize).clamp(1, MAX_EW_BLOCKS) as u32
}

/// Blocks of a box kernel over `rows` rows.
fn box_blocks(rows: usize) -> u32 {
    rows.div_ceil(BOX_ROWS).clamp(1, MAX_EW_BLOCKS) as u32
}

/// Box extents must fit the kernels' 32-bit relative indices.
fn check_extent(dev: &dyn KernelDevice, op: &str, extent: [usize; 3]) -> Result<()> {
    if extent.iter().any(|&e| e > i32::MAX as usize) {
        return Err(bad(dev, op, format!("box extent {extent:?} is too large")));
    }
    Ok(())
}

/// Downloads one `Part` at `addr`.
unsafe fn read_part(dev: &dyn KernelDevice, addr: Addr) -> Result<Part> {
    let mut b = [0u8; PART_BYTES];
    unsafe { dev.download(addr, &mut b)? };
    Ok(Part::from_bytes(&b))
}

/// The second stage: combines `nparts` Parts at `parts` into one at `out`.
///
/// `sv_vol_reduce_parts_f32(const Part* parts, int nparts, Part* out)`: grid 1, block 256,
/// 256 * 24 bytes of shared memory.
unsafe fn reduce_parts(
    dev: &dyn KernelDevice,
    parts: Addr,
    nparts: usize,
    out: Addr,
) -> Result<()> {
    let mut a = KernelArgs::new();
    a.ptr(parts).i32(nparts as i32).ptr(out);
    unsafe {
        dev.launch(
            "sv_vol_reduce_parts_f32",
            [1, 1, 1],
            [BLOCK, 1, 1],
            BLOCK * PART_BYTES as u32,
            &mut a,
        )
    }
}

/// Sums `len` f32 values at `v` (16-byte aligned) exactly as numpy's `np.add.reduce` does
/// ([`cpu_volume::numpy_sum_f32`]): `sv_vol_chunk_sums_f32` computes the pairwise sum of every
/// full 8192-value chunk on the device, the host adds the chunk sums left to right in f32 and
/// then the pairwise sum of the partial last chunk (downloaded, < 32 KiB). With `square` the
/// values summed are `(v - m)^2` rounded to f32 (numpy's `_var`).
///
/// `sv_vol_chunk_sums_f32(const float* v, long long nchunks, int square, float m, float* sums)`:
/// grid `min(ceil(nchunks / 4), 4096)`, block 256 (4 chunks of 64 leaves), 32 bytes of shared
/// memory.
unsafe fn numpy_sum(
    dev: &dyn KernelDevice,
    v: Addr,
    len: usize,
    square: bool,
    m: f32,
    sums: Addr,
) -> Result<f32> {
    let full = len / CHUNK;
    let mut acc = 0f32;
    if full > 0 {
        let mut a = KernelArgs::new();
        a.ptr(v)
            .i64(full as i64)
            .i32(square as i32)
            .f32(m)
            .ptr(sums);
        let grid = full.div_ceil(4).min(MAX_EW_BLOCKS) as u32;
        unsafe {
            dev.launch(
                "sv_vol_chunk_sums_f32",
                [grid, 1, 1],
                [BLOCK, 1, 1],
                32,
                &mut a,
            )?
        };
        for s in unsafe { download_f32(dev, sums, full)? } {
            acc += s;
        }
    }
    let rest = len - full * CHUNK;
    if rest > 0 {
        let mut tail = unsafe { download_f32(dev, v + (full * CHUNK * 4) as u64, rest)? };
        if square {
            for x in tail.iter_mut() {
                let d = *x - m;
                *x = d * d;
            }
        }
        acc += cpu_volume::pairwise_sum_f32(&tail);
    }
    Ok(acc)
}

/// Downloads `n` f32 values.
unsafe fn download_f32(dev: &dyn KernelDevice, src: Addr, n: usize) -> Result<Vec<f32>> {
    let mut bytes = vec![0u8; n * 4];
    unsafe { dev.download(src, &mut bytes)? };
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

/// Foreground statistics of the `(D, H, W)` f32 volume at `x` (spec §6.2; see
/// [`ForegroundStats`]), bit-identical to the CPU reference, which reproduces numpy 1.x: every
/// sum is numpy's float32 chunked pairwise sum over the official order, the column-major walk
/// of the volume ([`cpu_volume::Traversal::ColumnMajor`]).
///
/// 1. `sv_vol_transpose_cm_f32`: the walk as a linear temporary `t` (n floats), with the min,
///    max and non-finite / non-integer flags of the volume (parts + `sv_vol_reduce_parts_f32`);
/// 2. [`numpy_sum`] of `t`: `threshold = (total / n) as f32` (f64 division, as numpy);
/// 3. `sv_vol_seg_count_f32` (per 8192-value segment: count, min, max of `v > threshold`),
///    `sv_vol_seg_offsets` (exclusive prefix), `sv_vol_compact_f32`: the foreground `F` in walk
///    order (a temporary of `count` floats);
/// 4. [`numpy_sum`] of `F` (`mean`), then of `(F - sum/count)^2` in f32 (`std`, as numpy's
///    `_var`: f64 division, f32 square root);
/// 5. percentiles, exact: for an integer-valued volume whose foreground spans at most 2^20
///    values, `sv_vol_hist_f32` (shared-memory privatised up to 12 Ki bins, global atomics above)
///    and numpy's interpolation on the host ([`cpu_volume::percentiles_from_histogram`]); else
///    `F` is downloaded and selected ([`cpu_volume::percentiles_by_selection`]).
///
/// Errors as the CPU backend's: [`Error::Input`] for an empty volume, a NaN or infinite voxel,
/// or no voxel above the mean.
///
/// # Safety
/// `x` must hold `dims` f32 values on `dev`.
pub unsafe fn foreground_stats(
    dev: &dyn KernelDevice,
    scratch: &Scratch,
    x: Addr,
    dims: [usize; 3],
) -> Result<ForegroundStats> {
    let op = "foreground_stats";
    let n = volume_of(dev, op, &dims)?;
    if n == 0 {
        return Err(cpu_volume::err_empty_volume());
    }
    check_addr(dev, op, "x", x, n, 4)?;
    let [dd, hh, ww] = dims;
    let ntiles = hh * dd.div_ceil(TILE_D) * ww.div_ceil(TILE_W);
    let tgrid = ntiles.clamp(1, MAX_EW_BLOCKS);
    let nseg = n.div_ceil(SEG);
    if nseg > i32::MAX as usize {
        return Err(bad(dev, op, format!("volume {dims:?} is too large")));
    }
    let nchunks = n / CHUNK;
    // Scratch: [parts][final][offsets: nseg + 1 u64][chunk sums][histogram], 256-byte aligned.
    let fin_off = (tgrid.max(nseg) * PART_BYTES).next_multiple_of(256);
    let offs_off = fin_off + 256;
    let sums_off = (offs_off + (nseg + 1) * 8).next_multiple_of(256);
    let hist_off = (sums_off + nchunks * 4).next_multiple_of(256);

    // 1. The walk order and the volume's facts.
    let t = dev.alloc(n * 4)?;
    let s = scratch.get(dev, hist_off)?;
    let (parts, fin, sums) = (s, s + fin_off as u64, s + sums_off as u64);
    // sv_vol_transpose_cm_f32(const float* x, long long D, long long H, long long W, float* t,
    //                         Part* parts)
    let mut a = KernelArgs::new();
    a.ptr(x)
        .i64(dd as i64)
        .i64(hh as i64)
        .i64(ww as i64)
        .ptr(t.addr())
        .ptr(parts);
    let smem = (TILE_D * (TILE_W + 1) * 4 + BLOCK as usize * PART_BYTES) as u32;
    unsafe {
        dev.launch(
            "sv_vol_transpose_cm_f32",
            [tgrid as u32, 1, 1],
            BOX_BLOCK,
            smem,
            &mut a,
        )?;
        reduce_parts(dev, parts, tgrid, fin)?;
    }
    let all = unsafe { read_part(dev, fin)? };
    if all.flags & FLAG_NON_FINITE != 0 {
        return Err(cpu_volume::err_non_finite());
    }
    // 2. The threshold.
    let total = unsafe { numpy_sum(dev, t.addr(), n, false, 0.0, sums)? };
    let threshold = (total as f64 / n as f64) as f32;
    let integral = all.flags & FLAG_FRACTION == 0;
    // The foreground spans at most the volume's range: make room for its histogram now (the
    // scratch may move; nothing in it is live between the passes).
    let span_all = all.mx as f64 - all.mn as f64 + 1.0;
    let hist_cap = if integral && span_all <= HIST_MAX_BINS as f64 && n <= u32::MAX as usize {
        span_all as usize
    } else {
        0
    };
    let s = scratch.get(dev, hist_off + hist_cap * 4)?;
    let (parts, fin, offs, sums, hist) = (
        s,
        s + fin_off as u64,
        s + offs_off as u64,
        s + sums_off as u64,
        s + hist_off as u64,
    );

    // 3. The foreground, compacted in walk order.
    let seg_grid = [nseg as u32, 1, 1];
    // sv_vol_seg_count_f32(const float* t, long long n, float thr, Part* parts)
    let mut a = KernelArgs::new();
    a.ptr(t.addr()).i64(n as i64).f32(threshold).ptr(parts);
    unsafe {
        dev.launch(
            "sv_vol_seg_count_f32",
            seg_grid,
            [BLOCK, 1, 1],
            BLOCK * PART_BYTES as u32,
            &mut a,
        )?;
        reduce_parts(dev, parts, nseg, fin)?;
    }
    let fg = unsafe { read_part(dev, fin)? };
    if fg.count == 0 {
        return Err(cpu_volume::err_no_foreground(threshold));
    }
    let count = fg.count as usize;
    let f = dev.alloc(count * 4)?;
    // sv_vol_seg_offsets(const Part* parts, int nseg, unsigned long long* offsets)
    let mut a = KernelArgs::new();
    a.ptr(parts).i32(nseg as i32).ptr(offs);
    // sv_vol_compact_f32(const float* t, long long n, float thr,
    //                    const unsigned long long* offsets, float* f)
    let mut c = KernelArgs::new();
    c.ptr(t.addr())
        .i64(n as i64)
        .f32(threshold)
        .ptr(offs)
        .ptr(f.addr());
    unsafe {
        dev.launch("sv_vol_seg_offsets", [1, 1, 1], [BLOCK, 1, 1], 128, &mut a)?;
        dev.launch("sv_vol_compact_f32", seg_grid, [BLOCK, 1, 1], 128, &mut c)?;
    }
    drop(t);

    // 4. Mean and std of F, as numpy's `mean` and `_var` compute them in float32.
    let sum_f = unsafe { numpy_sum(dev, f.addr(), count, false, 0.0, sums)? };
    let mean = (sum_f as f64 / count as f64) as f32;
    let arrmean = sum_f / count as f32;
    let sq = unsafe { numpy_sum(dev, f.addr(), count, true, arrmean, sums)? };
    let std = ((sq as f64 / count as f64) as f32).sqrt();

    // 5. Percentiles.
    let span_fg = fg.mx as f64 - fg.mn as f64 + 1.0;
    let bins = if hist_cap > 0 && span_fg <= hist_cap as f64 {
        span_fg as usize
    } else {
        0
    };
    let (p_lo, p_hi) = if bins > 0 {
        let smem_hist = bins <= SMEM_HIST_BINS;
        // Zero the histogram (0.0f32 is all-zero bits).
        unsafe { fill(dev, hist, bins, 0.0)? };
        // sv_vol_hist_f32(const float* f, long long n, int vec, float base, int bins,
        //                 int smem_hist, unsigned* hist)
        let mut a = KernelArgs::new();
        a.ptr(f.addr())
            .i64(count as i64)
            .i32(1)
            .f32(fg.mn)
            .i32(bins as i32)
            .i32(smem_hist as i32)
            .ptr(hist);
        let smem_h = if smem_hist { bins as u32 * 4 } else { 0 };
        let grid = red_blocks(count) as u32;
        unsafe {
            dev.launch(
                "sv_vol_hist_f32",
                [grid, 1, 1],
                [BLOCK, 1, 1],
                smem_h,
                &mut a,
            )?
        };
        let mut bytes = vec![0u8; bins * 4];
        unsafe { dev.download(hist, &mut bytes)? };
        let h: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let total: u64 = h.iter().map(|&c| c as u64).sum();
        if total != fg.count {
            return Err(bad(
                dev,
                op,
                format!(
                    "the foreground histogram holds {total} values, the count is {}",
                    fg.count
                ),
            ));
        }
        cpu_volume::percentiles_from_histogram(&h, fg.mn, count)
    } else {
        // Non-integer (or very wide) values: exact selection on the host.
        let fv = unsafe { download_f32(dev, f.addr(), count)? };
        cpu_volume::percentiles_by_selection(&fv, threshold, count)
    };

    Ok(ForegroundStats {
        threshold,
        count: fg.count,
        p_lo,
        p_hi,
        mean,
        std,
    })
}

/// `out = (clip(x, lo, hi) - mean) / std` and the `(min, max)` of `out` (spec §6.2); `out` may
/// equal `x`.
///
/// `sv_clip_zscore_f32(const float* x, float* out, long long n, int vec, float lo, float hi,
/// float mean, float std, Part* parts)`: grid `min(ceil(n / 1024), 1024)`, block 256, 6 KiB of
/// shared memory; then `sv_vol_reduce_parts_f32`.
///
/// # Safety
/// `x` and `out` must hold `a.n` f32 values on `dev`.
pub unsafe fn clip_zscore(
    dev: &dyn KernelDevice,
    scratch: &Scratch,
    a: &ClipZscoreArgs,
) -> Result<(f32, f32)> {
    let op = "clip_zscore";
    check_len(dev, op, a.n)?;
    check_addr(dev, op, "x", a.x, a.n, 4)?;
    check_addr(dev, op, "out", a.out, a.n, 4)?;
    if a.x != a.out && overlaps(a.x, a.n * 4, a.out, a.n * 4) {
        return Err(bad(dev, op, "out partially overlaps x"));
    }
    if a.n == 0 {
        return Ok((f32::INFINITY, f32::NEG_INFINITY));
    }
    // Like the elementwise kernels (4 values per thread), capped as a reduction.
    let nb = a.n.div_ceil(4 * BLOCK as usize).clamp(1, MAX_RED_BLOCKS);
    let fin_off = (nb * PART_BYTES).next_multiple_of(256);
    let parts = scratch.get(dev, fin_off + PART_BYTES)?;
    let fin = parts + fin_off as u64;
    let mut k = KernelArgs::new();
    k.ptr(a.x)
        .ptr(a.out)
        .i64(a.n as i64)
        .i32(aligned16(&[a.x, a.out]) as i32)
        .f32(a.lo)
        .f32(a.hi)
        .f32(a.mean)
        .f32(a.std)
        .ptr(parts);
    unsafe {
        dev.launch(
            "sv_clip_zscore_f32",
            [nb as u32, 1, 1],
            [BLOCK, 1, 1],
            BLOCK * PART_BYTES as u32,
            &mut k,
        )?;
        reduce_parts(dev, parts, nb, fin)?;
    }
    let r = unsafe { read_part(dev, fin)? };
    Ok((r.mn, r.mx))
}

/// `out = (x - sub) / div` (the min-max step of spec §6.2); `out` may equal `x`.
///
/// `sv_shift_scale_f32(const float* x, float* out, long long n, int vec, float sub, float div)`:
/// grid `min(ceil(n / 1024), 4096)`, block 256.
///
/// # Safety
/// `x` and `out` must hold `a.n` f32 values on `dev`.
pub unsafe fn shift_scale(dev: &dyn KernelDevice, a: &ShiftScaleArgs) -> Result<()> {
    let op = "shift_scale";
    check_len(dev, op, a.n)?;
    check_addr(dev, op, "x", a.x, a.n, 4)?;
    check_addr(dev, op, "out", a.out, a.n, 4)?;
    if a.x != a.out && overlaps(a.x, a.n * 4, a.out, a.n * 4) {
        return Err(bad(dev, op, "out partially overlaps x"));
    }
    if a.n == 0 {
        return Ok(());
    }
    let mut k = KernelArgs::new();
    k.ptr(a.x)
        .ptr(a.out)
        .i64(a.n as i64)
        .i32(aligned16(&[a.x, a.out]) as i32)
        .f32(a.sub)
        .f32(a.div);
    unsafe {
        dev.launch(
            "sv_shift_scale_f32",
            [ew_blocks(a.n), 1, 1],
            [BLOCK, 1, 1],
            0,
            &mut k,
        )
    }
}

/// Bounding box of `x > threshold` inside `[start, start + extent)` of the `(D, H, W)` f32
/// volume at `x`, relative to `start`; `None` when no voxel qualifies (spec §6.3, §6.7).
///
/// `sv_bbox_init_u32(unsigned* box)` (grid 1, block 32), then `sv_bbox_above_f32(const float* x,
/// long long H, long long W, long long s0, long long s1, long long s2, long long e0,
/// long long e1, long long e2, float thr, unsigned* box)`: grid `min(ceil(rows / 8), 4096)`
/// for `rows = e0 * e1`, block (32, 8), 6 KiB of shared memory; the 6 bounds are downloaded.
///
/// # Safety
/// `x` must hold `dims` f32 values on `dev`.
pub unsafe fn bbox_above(
    dev: &dyn KernelDevice,
    scratch: &Scratch,
    x: Addr,
    dims: [usize; 3],
    start: [usize; 3],
    extent: [usize; 3],
    threshold: f32,
) -> Result<Option<BBox>> {
    let op = "bbox_above";
    let n = volume_of(dev, op, &dims)?;
    crate::backend::check_sub_box(dims, start, extent).map_err(|m| bad(dev, op, m))?;
    check_extent(dev, op, extent)?;
    check_addr(dev, op, "x", x, n, 4)?;
    if extent.contains(&0) {
        return Ok(None);
    }
    let bx = scratch.get(dev, 6 * 4)?;
    let mut k = KernelArgs::new();
    k.ptr(bx);
    unsafe { dev.launch("sv_bbox_init_u32", [1, 1, 1], [32, 1, 1], 0, &mut k)? };
    let rows = extent[0] * extent[1];
    let mut k = KernelArgs::new();
    k.ptr(x)
        .i64(dims[1] as i64)
        .i64(dims[2] as i64)
        .i64(start[0] as i64)
        .i64(start[1] as i64)
        .i64(start[2] as i64)
        .i64(extent[0] as i64)
        .i64(extent[1] as i64)
        .i64(extent[2] as i64)
        .f32(threshold)
        .ptr(bx);
    unsafe {
        dev.launch(
            "sv_bbox_above_f32",
            [box_blocks(rows), 1, 1],
            BOX_BLOCK,
            6 * BLOCK * 4,
            &mut k,
        )?
    };
    let mut b = [0u8; 24];
    unsafe { dev.download(bx, &mut b)? };
    let v: Vec<usize> = b
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect();
    if v[0] == u32::MAX as usize {
        return Ok(None);
    }
    Ok(Some([v[0], v[1], v[2], v[3], v[4], v[5]]))
}

/// Copies a box between two 3-D volumes with zero padding where the source index falls outside
/// the source, converting to `a.dst_dtype` (f32, f16 or bf16; round to nearest even): the crop
/// of spec §6.3, window extraction (§6.8 step 1) and back-fill (§6.8 step 8).
///
/// `sv_copy_box_f32_<dst>(const float* src, long long sD, long long sH, long long sW,
/// long long ss0, long long ss1, long long ss2, T* dst, long long dH, long long dW,
/// long long ds0, long long ds1, long long ds2, long long e0, long long e1, long long e2,
/// float pad)`: grid `min(ceil(e0 * e1 / 8), 4096)`, block (32, 8).
///
/// # Safety
/// `src` must hold `a.src_dims` f32 values and `dst` `a.dst_dims` values of `a.dst_dtype`.
pub unsafe fn copy_box(dev: &dyn KernelDevice, a: &CopyBoxArgs) -> Result<()> {
    let op = "copy_box";
    let kernel = match a.dst_dtype {
        DType::F32 => "sv_copy_box_f32_f32",
        DType::F16 => "sv_copy_box_f32_f16",
        DType::BF16 => "sv_copy_box_f32_bf16",
        t => {
            return Err(Error::device(
                dev.name(),
                format!("{op}: destination dtype {t} is not f32, f16 or bf16"),
            ))
        }
    };
    let esz = a.dst_dtype.size();
    let ns = volume_of(dev, op, &a.src_dims)?;
    let nd = volume_of(dev, op, &a.dst_dims)?;
    crate::backend::check_sub_box(a.dst_dims, a.dst_start, a.extent)
        .map_err(|m| bad(dev, op, format!("destination {m}")))?;
    // Keeps every source index within 64 bits.
    if a.src_start
        .iter()
        .any(|s| s.unsigned_abs() > i32::MAX as u64)
    {
        return Err(bad(
            dev,
            op,
            format!("source start {:?} is out of range", a.src_start),
        ));
    }
    check_extent(dev, op, a.extent)?;
    check_addr(dev, op, "src", a.src, ns, 4)?;
    check_addr(dev, op, "dst", a.dst, nd, esz as u64)?;
    if overlaps(a.src, ns * 4, a.dst, nd * esz) {
        return Err(bad(dev, op, "dst overlaps src"));
    }
    if a.extent.contains(&0) {
        return Ok(());
    }
    let mut k = KernelArgs::new();
    k.ptr(a.src)
        .i64(a.src_dims[0] as i64)
        .i64(a.src_dims[1] as i64)
        .i64(a.src_dims[2] as i64)
        .i64(a.src_start[0])
        .i64(a.src_start[1])
        .i64(a.src_start[2])
        .ptr(a.dst)
        .i64(a.dst_dims[1] as i64)
        .i64(a.dst_dims[2] as i64)
        .i64(a.dst_start[0] as i64)
        .i64(a.dst_start[1] as i64)
        .i64(a.dst_start[2] as i64)
        .i64(a.extent[0] as i64)
        .i64(a.extent[1] as i64)
        .i64(a.extent[2] as i64)
        .f32(a.pad);
    let rows = a.extent[0] * a.extent[1];
    unsafe { dev.launch(kernel, [box_blocks(rows), 1, 1], BOX_BLOCK, 0, &mut k) }
}

/// Adds one window's logits into the sliding-window sum and counts it (spec §6.8 step 7).
///
/// `sv_accumulate_window_f32(const float* win, long long e0, long long e1, long long e2,
/// float* acc, float* cnt, long long H, long long W, long long s0, long long s1, long long s2)`:
/// grid `min(ceil(e0 * e1 / 8), 4096)`, block (32, 8).
///
/// # Safety
/// `win` must hold `a.window` f32 values, `acc` and `cnt` `a.dims` each, on `dev`.
pub unsafe fn accumulate_window(dev: &dyn KernelDevice, a: &AccumulateArgs) -> Result<()> {
    let op = "accumulate_window";
    let nw = volume_of(dev, op, &a.window)?;
    let n = volume_of(dev, op, &a.dims)?;
    crate::backend::check_sub_box(a.dims, a.start, a.window)
        .map_err(|m| bad(dev, op, format!("window: {m}")))?;
    check_extent(dev, op, a.window)?;
    check_addr(dev, op, "win", a.win, nw, 4)?;
    check_addr(dev, op, "acc", a.acc, n, 4)?;
    check_addr(dev, op, "cnt", a.cnt, n, 4)?;
    if overlaps(a.acc, n * 4, a.cnt, n * 4)
        || overlaps(a.win, nw * 4, a.acc, n * 4)
        || overlaps(a.win, nw * 4, a.cnt, n * 4)
    {
        return Err(bad(dev, op, "win, acc and cnt must not overlap"));
    }
    if nw == 0 {
        return Ok(());
    }
    let mut k = KernelArgs::new();
    k.ptr(a.win)
        .i64(a.window[0] as i64)
        .i64(a.window[1] as i64)
        .i64(a.window[2] as i64)
        .ptr(a.acc)
        .ptr(a.cnt)
        .i64(a.dims[1] as i64)
        .i64(a.dims[2] as i64)
        .i64(a.start[0] as i64)
        .i64(a.start[1] as i64)
        .i64(a.start[2] as i64);
    let rows = a.window[0] * a.window[1];
    unsafe {
        dev.launch(
            "sv_accumulate_window_f32",
            [box_blocks(rows), 1, 1],
            BOX_BLOCK,
            0,
            &mut k,
        )
    }
}

/// `out[i] = cnt[i] > 0 ? acc[i] / cnt[i] : acc[i]` (spec §6.8 step 7).
///
/// `sv_divide_counts_f32(const float* acc, const float* cnt, float* out, long long n, int vec)`:
/// grid `min(ceil(n / 1024), 4096)`, block 256.
///
/// # Safety
/// `acc`, `cnt` and `out` must hold `n` f32 values each on `dev`.
pub unsafe fn divide_counts(
    dev: &dyn KernelDevice,
    acc: Addr,
    cnt: Addr,
    out: Addr,
    n: usize,
) -> Result<()> {
    let op = "divide_counts";
    check_len(dev, op, n)?;
    check_addr(dev, op, "acc", acc, n, 4)?;
    check_addr(dev, op, "cnt", cnt, n, 4)?;
    check_addr(dev, op, "out", out, n, 4)?;
    // In place (out == acc) is allowed; any other overlap is not.
    if (out != acc && overlaps(out, n * 4, acc, n * 4)) || overlaps(out, n * 4, cnt, n * 4) {
        return Err(bad(
            dev,
            op,
            "out overlaps acc or cnt (only out == acc is allowed)",
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let mut k = KernelArgs::new();
    k.ptr(acc)
        .ptr(cnt)
        .ptr(out)
        .i64(n as i64)
        .i32(aligned16(&[acc, cnt, out]) as i32);
    unsafe {
        dev.launch(
            "sv_divide_counts_f32",
            [ew_blocks(n), 1, 1],
            [BLOCK, 1, 1],
            0,
            &mut k,
        )
    }
}

/// `dst[i] = value` for `n` f32 values.
///
/// `sv_fill_f32(float* dst, long long n, int vec, float value)`: grid `min(ceil(n / 1024),
/// 4096)`, block 256.
///
/// # Safety
/// `dst` must hold `n` f32 values on `dev`.
pub unsafe fn fill(dev: &dyn KernelDevice, dst: Addr, n: usize, value: f32) -> Result<()> {
    check_len(dev, "fill", n)?;
    check_addr(dev, "fill", "dst", dst, n, 4)?;
    if n == 0 {
        return Ok(());
    }
    let mut k = KernelArgs::new();
    k.ptr(dst)
        .i64(n as i64)
        .i32(aligned16(&[dst]) as i32)
        .f32(value);
    unsafe {
        dev.launch(
            "sv_fill_f32",
            [ew_blocks(n), 1, 1],
            [BLOCK, 1, 1],
            0,
            &mut k,
        )
    }
}

/// `out[i] = (x[i] > threshold) as u8` (the final mask, spec §6.9).
///
/// `sv_threshold_u8_f32(const float* x, unsigned char* out, long long n, int vec, float thr)`:
/// grid `min(ceil(n / 1024), 4096)`, block 256; vectorised when `x` is 16- and `out` 4-byte
/// aligned.
///
/// # Safety
/// `x` must hold `n` f32 values and `out` `n` bytes on `dev`.
pub unsafe fn threshold_u8(
    dev: &dyn KernelDevice,
    x: Addr,
    out: Addr,
    n: usize,
    threshold: f32,
) -> Result<()> {
    let op = "threshold_u8";
    check_len(dev, op, n)?;
    check_addr(dev, op, "x", x, n, 4)?;
    check_addr(dev, op, "out", out, n, 1)?;
    if overlaps(x, n * 4, out, n) {
        return Err(bad(dev, op, "out overlaps x"));
    }
    if n == 0 {
        return Ok(());
    }
    let vec = x.is_multiple_of(16) && out.is_multiple_of(4);
    let mut k = KernelArgs::new();
    k.ptr(x)
        .ptr(out)
        .i64(n as i64)
        .i32(vec as i32)
        .f32(threshold);
    unsafe {
        dev.launch(
            "sv_threshold_u8_f32",
            [ew_blocks(n), 1, 1],
            [BLOCK, 1, 1],
            0,
            &mut k,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::emu::{EmuDevice, EmuOptions, Schedule};
    use crate::rng::SplitMix64 as Rng;

    /// Values over seven decades, both signs: every change of the summation grouping shows.
    fn wide_range(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng(seed);
        (0..n)
            .map(|_| {
                let m = 10f64.powf(r.unit_f64() * 7.0 - 3.0);
                (if r.next_u64() & 1 == 0 { m } else { -0.3 * m }) as f32
            })
            .collect()
    }

    fn seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    /// The device's chunked pairwise sums (plain and squared deviations) equal numpy's order as
    /// the CPU reference computes it, bit for bit, for partial, single and many chunks.
    #[test]
    fn numpy_sum_matches_cpu_bit_for_bit() {
        let s0 = seed();
        for (k, schedule) in [Schedule::Forward, Schedule::Reverse, Schedule::Random]
            .into_iter()
            .enumerate()
        {
            let dev = EmuDevice::with_options(EmuOptions {
                schedule,
                seed: s0,
                workers: 1 + k as u32 % 2,
                poison: true,
            });
            for n in [1usize, 7, 129, 8191, 8192, 8193, 3 * 8192 + 517, 37 * 8192] {
                let x = wide_range(n, s0 ^ n as u64);
                let buf = dev.alloc(n * 4).unwrap();
                let sums = dev.alloc((n / CHUNK + 1) * 4).unwrap();
                unsafe { dev.upload(buf.addr(), bytemuck::cast_slice(&x)).unwrap() };
                let m = x[n / 2];
                for square in [false, true] {
                    let got =
                        unsafe { numpy_sum(&dev, buf.addr(), n, square, m, sums.addr()) }.unwrap();
                    let v: Vec<f32> = if square {
                        x.iter().map(|&a| (a - m) * (a - m)).collect()
                    } else {
                        x.clone()
                    };
                    let want = cpu_volume::numpy_sum_f32(n, |k| {
                        let mut pos = k;
                        let v = &v;
                        move |b: &mut [f32]| {
                            b.copy_from_slice(&v[pos..pos + b.len()]);
                            pos += b.len();
                        }
                    });
                    // A plain f64 sum differs: the check can tell the orders apart.
                    let f64_sum = v.iter().map(|&a| a as f64).sum::<f64>() as f32;
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "n={n} square={square} {schedule:?} seed {s0:#x}: {got} vs {want} (f64 {f64_sum})"
                    );
                }
            }
        }
    }
}
