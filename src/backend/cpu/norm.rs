//! Layer norms (spec §1.3, §4.3, §4.4, §7.2, §7.7).
//!
//! - [`layer_norm_f32`]: per row over the last dim, f32 statistics (mean, then the biased
//!   variance around it: two passes, 16 partial sums each), `(x - mean) * rstd * w + b`.
//! - [`layer_norm_joint_f32`]: one normalisation over all `n` values of a sample (3,145,728 in
//!   the decoder's upscaling), statistics in f64 (two passes, chunk sums combined in a fixed
//!   order, so the result does not depend on the thread count), then elementwise affine and
//!   the activation in f32.

use super::{bad_args, check_addr, math, overlaps, slice, slice_mut, SendPtr};
use crate::backend::{Act, LayerNormArgs, LayerNormJointArgs};
use crate::error::Result;
use rayon::prelude::*;

/// Elements per task in the joint norm passes.
const CHUNK: usize = 1 << 15;

#[inline(always)]
fn row_stats_body(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mut acc = [0f32; math::LANES];
    let mut ch = x.chunks_exact(math::LANES);
    for c in &mut ch {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = ch.remainder().iter().sum::<f32>();
    s += acc.iter().sum::<f32>();
    let mean = s / n;
    let mut acc = [0f32; math::LANES];
    let mut ch = x.chunks_exact(math::LANES);
    for c in &mut ch {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = v - mean;
            *a += d * d;
        }
    }
    let mut q = ch
        .remainder()
        .iter()
        .map(|&v| (v - mean) * (v - mean))
        .sum::<f32>();
    q += acc.iter().sum::<f32>();
    (mean, q / n)
}

math::multiversion! {
    /// Mean and biased variance of a row, f32.
    fn row_stats(x: &[f32]) -> (f32, f32) => row_stats_body;
}

#[inline(always)]
fn normalize_body(x: &[f32], out: &mut [f32], mean: f32, rstd: f32, w: &[f32], b: &[f32]) {
    for (((o, &v), &wi), &bi) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * rstd * wi + bi;
    }
}

math::multiversion! {
    fn normalize(x: &[f32], out: &mut [f32], mean: f32, rstd: f32, w: &[f32], b: &[f32]) => normalize_body;
}

#[inline(always)]
fn normalize_inplace_body(x: &mut [f32], mean: f32, rstd: f32, w: &[f32], b: &[f32]) {
    for ((v, &wi), &bi) in x.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * rstd * wi + bi;
    }
}

math::multiversion! {
    fn normalize_inplace(x: &mut [f32], mean: f32, rstd: f32, w: &[f32], b: &[f32]) => normalize_inplace_body;
}

/// Row-wise LayerNorm ([`LayerNormArgs`]); `out` may equal `x`.
///
/// # Safety
/// `x`, `out` (rows x cols), `weight` and `bias` (cols) must be live f32 memory; `out` equals
/// `x` or does not overlap it.
pub unsafe fn layer_norm_f32(a: &LayerNormArgs) -> Result<()> {
    let op = "layer_norm";
    let (rows, cols) = (a.rows, a.cols);
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| bad_args(op, "rows * cols overflows"))?;
    check_addr::<f32>(op, "x", a.x, n)?;
    check_addr::<f32>(op, "out", a.out, n)?;
    check_addr::<f32>(op, "weight", a.weight, cols)?;
    check_addr::<f32>(op, "bias", a.bias, cols)?;
    let in_place = a.x == a.out;
    if !in_place && overlaps(a.x, n * 4, a.out, n * 4) {
        return Err(bad_args(op, "out partially overlaps x"));
    }
    // SAFETY: weight/bias are read-only here and do not overlap out (contract).
    let (w, b) = unsafe { (slice::<f32>(a.weight, cols), slice::<f32>(a.bias, cols)) };
    let eps = a.eps;
    let rows_per_task = (4096 / cols).max(1);
    if in_place {
        // SAFETY: x is exclusively ours for the duration of the op.
        let x = unsafe { slice_mut::<f32>(a.x, n) };
        x.par_chunks_mut(cols)
            .with_min_len(rows_per_task)
            .for_each(|row| {
                let (mean, var) = row_stats(row);
                normalize_inplace(row, mean, 1.0 / (var + eps).sqrt(), w, b);
            });
    } else {
        // SAFETY: disjoint (checked above).
        let (x, out) = unsafe { (slice::<f32>(a.x, n), slice_mut::<f32>(a.out, n)) };
        out.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .with_min_len(rows_per_task)
            .for_each(|(o, row)| {
                let (mean, var) = row_stats(row);
                normalize(row, o, mean, 1.0 / (var + eps).sqrt(), w, b);
            });
    }
    Ok(())
}

#[inline(always)]
fn sum_f64_body(x: &[f32], center: f64, square: bool) -> f64 {
    let mut acc = [0f64; math::LANES];
    let mut ch = x.chunks_exact(math::LANES);
    for c in &mut ch {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = v as f64 - center;
            *a += if square { d * d } else { d };
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in ch.remainder() {
        let d = v as f64 - center;
        s += if square { d * d } else { d };
    }
    s
}

math::multiversion! {
    /// Σ (x - center) or Σ (x - center)^2 in f64.
    fn sum_f64(x: &[f32], center: f64, square: bool) -> f64 => sum_f64_body;
}

#[inline(always)]
fn joint_affine_body(
    x: &[f32],
    out: &mut [f32],
    mean: f32,
    rstd: f32,
    w: &[f32],
    b: &[f32],
    act: Act,
) {
    normalize_body(x, out, mean, rstd, w, b);
    math::act_slice(out, act);
}

/// Joint LayerNorm over each sample ([`LayerNormJointArgs`]); `out` may equal `x`.
///
/// # Safety
/// `x`, `out` (batch x n), `weight` and `bias` (n) must be live f32 memory; `out` equals `x`
/// or does not overlap it.
pub unsafe fn layer_norm_joint_f32(a: &LayerNormJointArgs) -> Result<()> {
    let op = "layer_norm_joint";
    let n = a.n;
    if a.batch == 0 || n == 0 {
        return Ok(());
    }
    let total = a
        .batch
        .checked_mul(n)
        .ok_or_else(|| bad_args(op, "batch * n overflows"))?;
    check_addr::<f32>(op, "x", a.x, total)?;
    check_addr::<f32>(op, "out", a.out, total)?;
    check_addr::<f32>(op, "weight", a.weight, n)?;
    check_addr::<f32>(op, "bias", a.bias, n)?;
    let in_place = a.x == a.out;
    if !in_place && overlaps(a.x, total * 4, a.out, total * 4) {
        return Err(bad_args(op, "out partially overlaps x"));
    }
    // SAFETY: weight/bias are read-only and do not overlap out (contract).
    let (w, b) = unsafe { (slice::<f32>(a.weight, n), slice::<f32>(a.bias, n)) };
    let xp = SendPtr(a.x as *mut f32);
    let op_ = SendPtr(a.out as *mut f32);
    for s in 0..a.batch {
        let stats = {
            // SAFETY: read-only view of sample s; nothing writes while it lives.
            let x = unsafe { slice::<f32>(xp.add(s * n) as u64, n) };
            let sums: Vec<f64> = x
                .par_chunks(CHUNK)
                .map(|c| sum_f64(c, 0.0, false))
                .collect();
            let mean = sums.iter().sum::<f64>() / n as f64;
            let sq: Vec<f64> = x
                .par_chunks(CHUNK)
                .map(|c| sum_f64(c, mean, true))
                .collect();
            let var = sq.iter().sum::<f64>() / n as f64;
            (mean as f32, (1.0 / (var + a.eps as f64).sqrt()) as f32)
        };
        let (mean, rstd) = stats;
        let act = a.act;
        if in_place {
            // SAFETY: exclusive access to sample s.
            let x = unsafe { slice_mut::<f32>(xp.add(s * n) as u64, n) };
            x.par_chunks_mut(CHUNK)
                .zip(w.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(c, (wc, bc))| {
                    normalize_inplace(c, mean, rstd, wc, bc);
                    math::act_slice(c, act);
                });
        } else {
            // SAFETY: disjoint (checked above).
            let (x, out) = unsafe {
                (
                    slice::<f32>(xp.add(s * n) as u64, n),
                    slice_mut::<f32>(op_.add(s * n) as u64, n),
                )
            };
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .zip(w.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|((o, c), (wc, bc))| joint_affine(c, o, mean, rstd, wc, bc, act));
        }
    }
    Ok(())
}

math::multiversion! {
    fn joint_affine(x: &[f32], out: &mut [f32], mean: f32, rstd: f32, w: &[f32], b: &[f32], act: Act) => joint_affine_body;
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::CpuBackend;
    use super::*;
    use crate::backend::Backend;

    fn reference(x: &[f32], w: &[f32], b: &[f32], eps: f32, act: Act) -> Vec<f64> {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        x.iter()
            .zip(w)
            .zip(b)
            .map(|((&v, &wi), &bi)| {
                let y = (v as f64 - mean) * rstd * wi as f64 + bi as f64;
                if act == Act::None {
                    y
                } else {
                    act.apply(y as f32) as f64
                }
            })
            .collect()
    }

    #[test]
    fn rows_in_and_out_of_place() {
        let be = CpuBackend::new();
        for (rows, cols) in [(1, 1), (7, 13), (33, 768), (3, 97), (2050, 96)] {
            let mut rng = Rng(rows as u64 * 31 + cols as u64);
            // An offset mean, as real activations have: the two-pass variance must cope.
            let x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 3.0 + 5.0).collect();
            let w = rng.vec(cols);
            let bb = rng.vec(cols);
            let want: Vec<f64> = x
                .chunks(cols)
                .flat_map(|r| reference(r, &w, &bb, 1e-5, Act::None))
                .collect();
            let (xb, wb, bbb) = (buf(&be, &x), buf(&be, &w), buf(&be, &bb));
            let ob = be.alloc(rows * cols * 4).unwrap();
            for in_place in [false, true] {
                let out = if in_place { xb.addr() } else { ob.addr() };
                let args = LayerNormArgs {
                    x: xb.addr(),
                    out,
                    rows,
                    cols,
                    weight: wb.addr(),
                    bias: bbb.addr(),
                    eps: 1e-5,
                };
                unsafe { be.layer_norm(&args).unwrap() };
                let got = read(&be, out, rows * cols);
                // cols = 1: x - mean is exactly 0, so only the bias remains.
                assert_close(
                    &got,
                    &want,
                    3e-6,
                    &format!("layer_norm {rows}x{cols} in_place {in_place}"),
                );
            }
        }
    }

    #[test]
    fn joint_with_gelu_in_and_out_of_place() {
        let be = CpuBackend::new();
        for (batch, n) in [
            (1, 1),
            (2, 4097),
            (2, 3 * CHUNK + 11),
            (1, 192 * 16 * 32 * 32),
        ] {
            let mut rng = Rng(n as u64);
            // An offset of 40 on a spread of 2: naive f32 sums of squares would lose digits.
            let x: Vec<f32> = rng.vec(batch * n).iter().map(|v| v * 2.0 + 40.0).collect();
            let w = rng.vec(n);
            let bb = rng.vec(n);
            for act in [Act::Gelu, Act::None] {
                let want: Vec<f64> = x
                    .chunks(n)
                    .flat_map(|s| reference(s, &w, &bb, 1e-5, act))
                    .collect();
                for in_place in [false, true] {
                    let (xb, wb, bbb) = (buf(&be, &x), buf(&be, &w), buf(&be, &bb));
                    let ob = be.alloc(batch * n * 4).unwrap();
                    let out = if in_place { xb.addr() } else { ob.addr() };
                    let args = LayerNormJointArgs {
                        x: xb.addr(),
                        out,
                        batch,
                        n,
                        weight: wb.addr(),
                        bias: bbb.addr(),
                        eps: 1e-5,
                        act,
                    };
                    unsafe { be.layer_norm_joint(&args).unwrap() };
                    let got = read(&be, out, batch * n);
                    assert_close(
                        &got,
                        &want,
                        2e-6,
                        &format!("joint n{n} {act:?} in_place {in_place}"),
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_partial_overlap() {
        let be = CpuBackend::new();
        let x = buf(&be, &[1.0; 64]);
        let args = LayerNormArgs {
            x: x.addr(),
            out: x.addr() + 8,
            rows: 2,
            cols: 8,
            weight: x.addr(),
            bias: x.addr(),
            eps: 1e-5,
        };
        assert!(unsafe { be.layer_norm(&args) }.is_err());
    }
}
