//! ConvTranspose3d with kernel 2 and stride 2 (spec §4.4), as a GEMM plus a scatter:
//! for a chunk of input voxels `V`, `Y[(o,a,p,c)][v] = Σ_i W[i][(o,a,p,c)] X[i][v]`, then
//! `out[o, 2d+a, 2h+p, 2w+c] = act(bias[o] + Y[(o,a,p,c)][(d,h,w)])`.
//!
//! Chunks are runs of whole input rows (fixed `d`, `h`; all `w`) of one sample, processed in
//! parallel, each with a single-threaded `gemm` into a per-thread tile that stays in cache for
//! the scatter, bias and activation.

use super::{bad_args, check_addr, math, volume_of, SendPtr};
use crate::backend::ConvT3dArgs;
use crate::error::Result;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

const OP: &str = "conv_transpose3d_k2s2";

/// Input voxels per chunk (rounded to whole rows).
const CHUNK_VOXELS: usize = 512;

thread_local! {
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs [`ConvT3dArgs`].
///
/// # Safety
/// `x`, `weight` (cin x cout x 8), `bias` (cout) and `out` (batch x cout x 8 x voxels) must be
/// live f32 memory; `out` must not overlap the inputs.
pub unsafe fn conv_transpose3d_k2s2_f32(a: &ConvT3dArgs) -> Result<()> {
    let [d, h, w] = a.dims;
    let voxels = volume_of(OP, &a.dims)?;
    if a.batch == 0 || a.cout == 0 || voxels == 0 {
        return Ok(());
    }
    let n8 = a.cout * 8;
    let in_len = volume_of(OP, &[a.batch, a.cin, voxels])?;
    let out_len = volume_of(OP, &[a.batch, n8, voxels])?;
    check_addr::<f32>(OP, "x", a.x, in_len)?;
    check_addr::<f32>(OP, "weight", a.weight, a.cin * n8)?;
    check_addr::<f32>(OP, "bias", a.bias, a.cout)?;
    check_addr::<f32>(OP, "out", a.out, out_len)?;
    if super::overlaps(a.out, out_len * 4, a.x, in_len * 4) {
        return Err(bad_args(OP, "out overlaps x"));
    }
    let rows_per_chunk = (CHUNK_VOXELS / w).clamp(1, d * h);
    let chunks_per_sample = (d * h).div_ceil(rows_per_chunk);
    let out = SendPtr(a.out as *mut f32);
    (0..a.batch * chunks_per_sample)
        .into_par_iter()
        .for_each(|t| {
            let s = t / chunks_per_sample;
            let r0 = (t % chunks_per_sample) * rows_per_chunk;
            let nrows = rows_per_chunk.min(d * h - r0);
            // SAFETY: each chunk writes the output voxels of its own input rows only.
            unsafe { chunk(a, s, r0, nrows, out) };
        });
    Ok(())
}

/// Input rows `r0 .. r0 + nrows` (row = d * H + h) of sample `s`.
unsafe fn chunk(a: &ConvT3dArgs, s: usize, r0: usize, nrows: usize, out: SendPtr<f32>) {
    let [d, h, w] = a.dims;
    let voxels = d * h * w;
    let (cin, cout) = (a.cin, a.cout);
    let n8 = cout * 8;
    let nv = nrows * w;
    let v0 = r0 * w;
    TILE.with(|cell| {
        let mut tile = cell.borrow_mut();
        if tile.len() < nv * n8 {
            tile.resize(nv * n8, 0.0);
        }
        let y = &mut tile[..nv * n8];
        // Y (nv x n8, column-major: element (v, j) at j * nv + v) = X_chunk (nv x cin) @ W.
        // SAFETY: strides stay inside x and weight as validated.
        let (x, x_rs, x_cs) = if a.channels_last_input {
            let p = unsafe { (a.x as *const f32).add((s * voxels + v0) * cin) };
            (p, cin as isize, 1)
        } else {
            let p = unsafe { (a.x as *const f32).add(s * cin * voxels + v0) };
            (p, 1, voxels as isize)
        };
        if cin == 0 {
            y.fill(0.0);
        } else {
            // SAFETY: as above; y has nv * n8 elements.
            unsafe {
                gemm::gemm(
                    nv,
                    n8,
                    cin,
                    y.as_mut_ptr(),
                    nv as isize,
                    1,
                    false,
                    x,
                    x_cs,
                    x_rs,
                    a.weight as *const f32,
                    1,
                    n8 as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            };
        }
        // SAFETY: bias holds cout values.
        let bias = unsafe { std::slice::from_raw_parts(a.bias as *const f32, cout) };
        let (od, oh, ow) = (2 * d, 2 * h, 2 * w);
        // Runs of input rows with the same depth d: their outputs in plane (o, 2d+a) are the
        // consecutive rows 2h0 .. 2h1, so bias and activation run over one contiguous region.
        let mut r = 0;
        while r < nrows {
            let (di, h0) = ((r0 + r) / h, (r0 + r) % h);
            let run = (h - h0).min(nrows - r);
            for (o, &bo) in bias.iter().enumerate() {
                for ka in 0..2 {
                    let off = ((s * cout + o) * od + 2 * di + ka) * oh * ow + 2 * h0 * ow;
                    // SAFETY: rows 2h0 .. 2(h0+run) of plane (o, 2d+a) belong to this chunk.
                    let region =
                        unsafe { std::slice::from_raw_parts_mut(out.add(off), 2 * run * ow) };
                    for (i, dst) in region.chunks_exact_mut(ow).enumerate() {
                        let (hr, kp) = (r + i / 2, i % 2);
                        let col = o * 8 + ka * 4 + kp * 2;
                        let y0 = &y[col * nv + hr * w..col * nv + (hr + 1) * w];
                        let y1 = &y[(col + 1) * nv + hr * w..(col + 1) * nv + (hr + 1) * w];
                        interleave_bias(y0, y1, dst, bo);
                    }
                    math::act_slice(region, a.act);
                }
            }
            r += run;
        }
    });
}

#[inline(always)]
fn interleave_bias_body(y0: &[f32], y1: &[f32], dst: &mut [f32], bias: f32) {
    for ((pair, &e), &f) in dst.chunks_exact_mut(2).zip(y0).zip(y1) {
        pair[0] = e + bias;
        pair[1] = f + bias;
    }
}

math::multiversion! {
    /// `dst[2w] = y0[w] + bias`, `dst[2w+1] = y1[w] + bias`.
    fn interleave_bias(y0: &[f32], y1: &[f32], dst: &mut [f32], bias: f32) => interleave_bias_body;
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::CpuBackend;
    use super::*;
    use crate::backend::{Act, Backend};

    fn check(batch: usize, cin: usize, cout: usize, dims: [usize; 3], cl: bool, act: Act) {
        let be = CpuBackend::new();
        let mut rng = Rng((cin * 1000 + cout) as u64 + cl as u64);
        let [d, h, w] = dims;
        let vox = d * h * w;
        let x = rng.vec(batch * cin * vox);
        let wt = rng.vec(cin * cout * 8);
        let bias = rng.vec(cout);
        let (xb, wb, bb) = (buf(&be, &x), buf(&be, &wt), buf(&be, &bias));
        let n_out = batch * cout * 8 * vox;
        let ob = be.alloc(n_out * 4).unwrap();
        let args = ConvT3dArgs {
            x: xb.addr(),
            out: ob.addr(),
            weight: wb.addr(),
            bias: bb.addr(),
            batch,
            cin,
            cout,
            dims,
            channels_last_input: cl,
            act,
        };
        unsafe { be.conv_transpose3d_k2s2(&args).unwrap() };
        let got = read(&be, ob.addr(), n_out);
        let mut want = vec![0f64; n_out];
        for b in 0..batch {
            for o in 0..cout {
                for z in 0..2 * d {
                    for y in 0..2 * h {
                        for xx in 0..2 * w {
                            let (di, ka, hi, kp, wi, kc) =
                                (z / 2, z % 2, y / 2, y % 2, xx / 2, xx % 2);
                            let v = (di * h + hi) * w + wi;
                            let mut s = bias[o] as f64;
                            for i in 0..cin {
                                let xin = if cl {
                                    x[(b * vox + v) * cin + i]
                                } else {
                                    x[(b * cin + i) * vox + v]
                                };
                                s += xin as f64
                                    * wt[((i * cout + o) * 2 + ka) * 4 + kp * 2 + kc] as f64;
                            }
                            let s = if act == Act::None {
                                s
                            } else {
                                act.apply(s as f32) as f64
                            };
                            want[(((b * cout + o) * 2 * d + z) * 2 * h + y) * 2 * w + xx] = s;
                        }
                    }
                }
            }
        }
        assert_close(
            &got,
            &want,
            2e-6 * (cin as f64).sqrt(),
            &format!("convT cin{cin} cout{cout} {dims:?} cl {cl}"),
        );
    }

    #[test]
    fn both_layouts_odd_sizes() {
        check(2, 7, 5, [3, 2, 5], false, Act::Gelu);
        check(2, 7, 5, [3, 2, 5], true, Act::None);
        check(1, 33, 3, [2, 9, 70], true, Act::Gelu);
        check(1, 33, 3, [2, 9, 70], false, Act::Relu);
        check(1, 1, 1, [1, 1, 1], false, Act::None);
        check(1, 24, 12, [4, 4, 4], true, Act::Gelu);
    }
}
