//! 3-D resizing with PyTorch's CPU index arithmetic (spec §4.6, §6.4, §6.6, §7.9), channel-first
//! float path (`upsample_generic_Nd_kernel_impl`, which `F.interpolate` takes for C < 4):
//!
//! - scale per axis `in as f32 / out as f32`;
//! - trilinear, `align_corners=False`: `s = max(0, scale * (dst + 0.5) - 0.5)` in f32,
//!   `i0 = min(floor(s), in - 1)`, `l1 = clamp(s - i0, 0, 1)`, `l0 = 1 - l1`,
//!   `i1 = i0 + (i0 < in - 1)`; an axis with `in == out` is copied (`l0 = 1`, `l1 = 0`);
//!   values combine axis by axis, D outermost: `out = T(d0) l0d + T(d1) l1d`,
//!   `T(d) = U(d, h0) l0h + U(d, h1) l1h`, `U(d, h) = x[w0] l0w + x[w1] l1w`, where each
//!   `a l0 + b l1` is `fma(a, l0, b * l1)`: PyTorch's x86 kernels are compiled with FP
//!   contraction, and this form reproduces its output bit for bit (tested on the tiny
//!   fixture's `final_logits`; the plain form differs by an ulp in about a quarter of voxels);
//! - nearest-exact: `min(floor(scale * (dst + 0.5)), in - 1)`;
//! - nearest (legacy): `min(floor(dst * scale), in - 1)`.

use super::{bad_args, check_addr, math, overlaps, slice, volume_of, SendPtr};
use crate::backend::{Interp3dArgs, InterpMode};
use crate::error::Result;
use rayon::prelude::*;

const OP: &str = "interp3d";

/// Source indices and weights of one output index along one axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tap {
    pub i0: usize,
    pub i1: usize,
    pub l0: f32,
    pub l1: f32,
}

/// The trilinear (`align_corners=False`) taps of an axis resized from `input` to `output`.
pub fn linear_taps(input: usize, output: usize) -> Vec<Tap> {
    if input == output {
        return (0..output)
            .map(|o| Tap {
                i0: o,
                i1: o,
                l0: 1.0,
                l1: 0.0,
            })
            .collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let s = scale * (o as f32 + 0.5) - 0.5;
            let s = if s < 0.0 { 0.0 } else { s };
            let i0 = (s.floor() as usize).min(input - 1);
            let l1 = (s - i0 as f32).clamp(0.0, 1.0);
            let i1 = i0 + usize::from(i0 < input - 1);
            Tap {
                i0,
                i1,
                l0: 1.0 - l1,
                l1,
            }
        })
        .collect()
}

/// The source index of every output index along an axis, for a nearest mode.
pub fn nearest_indices(input: usize, output: usize, exact: bool) -> Vec<usize> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let s = if exact {
                scale * (o as f32 + 0.5)
            } else {
                o as f32 * scale
            };
            (s.floor() as usize).min(input - 1)
        })
        .collect()
}

/// `a * l0 + b * l1` as PyTorch's compiled kernel evaluates it.
#[inline(always)]
fn lerp(a: f32, l0: f32, b: f32, l1: f32) -> f32 {
    a.mul_add(l0, b * l1)
}

#[inline(always)]
fn trilinear_row_body(rows: [&[f32]; 4], tw: &[Tap], hy: Tap, dz: Tap, out: &mut [f32]) {
    let [r00, r01, r10, r11] = rows;
    for (o, wx) in out.iter_mut().zip(tw) {
        let u = |r: &[f32]| lerp(r[wx.i0], wx.l0, r[wx.i1], wx.l1);
        let t0 = lerp(u(r00), hy.l0, u(r01), hy.l1);
        let t1 = lerp(u(r10), hy.l0, u(r11), hy.l1);
        *o = lerp(t0, dz.l0, t1, dz.l1);
    }
}

math::multiversion! {
    /// One output row of the trilinear resize from the four source rows (d0h0, d0h1, d1h0,
    /// d1h1). The FMA-capable builds use the hardware FMA; the baseline build calls libm's
    /// correctly rounded `fmaf`, so every build gives the same bits.
    fn trilinear_row(rows: [&[f32]; 4], tw: &[Tap], hy: Tap, dz: Tap, out: &mut [f32]) => trilinear_row_body;
}

/// Runs [`Interp3dArgs`] on f32 data.
///
/// # Safety
/// `x` (planes x src) and `out` (planes x dst) must be live f32 memory that does not overlap.
pub unsafe fn interp3d_f32(a: &Interp3dArgs) -> Result<()> {
    let n_in = volume_of(OP, &a.src)?;
    let n_out = volume_of(OP, &a.dst)?;
    if a.planes == 0 || n_out == 0 {
        return Ok(());
    }
    if n_in == 0 {
        return Err(bad_args(
            OP,
            format!("empty source {:?} for destination {:?}", a.src, a.dst),
        ));
    }
    let tot_in = volume_of(OP, &[a.planes, n_in])?;
    let tot_out = volume_of(OP, &[a.planes, n_out])?;
    check_addr::<f32>(OP, "x", a.x, tot_in)?;
    check_addr::<f32>(OP, "out", a.out, tot_out)?;
    if overlaps(a.x, tot_in * 4, a.out, tot_out * 4) {
        return Err(bad_args(OP, "out overlaps x"));
    }
    // SAFETY: read-only, disjoint from out (checked).
    let x = unsafe { slice::<f32>(a.x, tot_in) };
    let out = SendPtr(a.out as *mut f32);
    let [id, ih, iw] = a.src;
    let [od, oh, ow] = a.dst;
    let slab = oh * ow;
    match a.mode {
        InterpMode::Trilinear => {
            let (td, th, tw) = (
                linear_taps(id, od),
                linear_taps(ih, oh),
                linear_taps(iw, ow),
            );
            (0..a.planes * od).into_par_iter().for_each(|t| {
                let (p, z) = (t / od, t % od);
                let xp = &x[p * n_in..(p + 1) * n_in];
                // SAFETY: each task writes its own output slab (plane p, depth z).
                let o = unsafe { std::slice::from_raw_parts_mut(out.add(t * slab), slab) };
                let dz = td[z];
                for (y, orow) in o.chunks_exact_mut(ow).enumerate() {
                    let hy = th[y];
                    let row = |d: usize, h: usize| &xp[(d * ih + h) * iw..(d * ih + h + 1) * iw];
                    let (r00, r01) = (row(dz.i0, hy.i0), row(dz.i0, hy.i1));
                    let (r10, r11) = (row(dz.i1, hy.i0), row(dz.i1, hy.i1));
                    trilinear_row([r00, r01, r10, r11], &tw, hy, dz, orow);
                }
            });
        }
        InterpMode::NearestExact | InterpMode::Nearest => {
            let exact = a.mode == InterpMode::NearestExact;
            let (sd, sh, sw) = (
                nearest_indices(id, od, exact),
                nearest_indices(ih, oh, exact),
                nearest_indices(iw, ow, exact),
            );
            (0..a.planes * od).into_par_iter().for_each(|t| {
                let (p, z) = (t / od, t % od);
                let xp = &x[p * n_in..(p + 1) * n_in];
                // SAFETY: each task writes its own output slab (plane p, depth z).
                let o = unsafe { std::slice::from_raw_parts_mut(out.add(t * slab), slab) };
                for (y, orow) in o.chunks_exact_mut(ow).enumerate() {
                    let r = &xp[(sd[z] * ih + sh[y]) * iw..(sd[z] * ih + sh[y] + 1) * iw];
                    for (ov, &sx) in orow.iter_mut().zip(&sw) {
                        *ov = r[sx];
                    }
                }
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::CpuBackend;
    use super::*;
    use crate::backend::Backend;
    use crate::dtype::DType;

    fn run(
        x: &[f32],
        planes: usize,
        src: [usize; 3],
        dst: [usize; 3],
        mode: InterpMode,
    ) -> Vec<f32> {
        let be = CpuBackend::new();
        let xb = buf(&be, x);
        let n = planes * dst.iter().product::<usize>();
        let ob = be.alloc(n * 4).unwrap();
        let a = Interp3dArgs {
            x: xb.addr(),
            x_dtype: DType::F32,
            out: ob.addr(),
            out_dtype: DType::F32,
            planes,
            src,
            dst,
            mode,
        };
        unsafe { be.interp3d(&a).unwrap() };
        read(&be, ob.addr(), n)
    }

    #[test]
    fn pytorch_nearest_index_lists() {
        // F.interpolate(torch.arange(2.).view(1,1,2), size=5, mode=...) on a 1-D axis:
        // nearest:       scale 0.4, floor([0, .4, .8, 1.2, 1.6]) = [0, 0, 0, 1, 1]
        // nearest-exact: floor([.2, .6, 1.0, 1.4, 1.8])           = [0, 0, 1, 1, 1]
        assert_eq!(nearest_indices(2, 5, false), vec![0, 0, 0, 1, 1]);
        assert_eq!(nearest_indices(2, 5, true), vec![0, 0, 1, 1, 1]);
        // Downsampling 5 -> 2: scale 2.5; nearest [0, 2]; nearest-exact floor([1.25, 3.75]).
        assert_eq!(nearest_indices(5, 2, false), vec![0, 2]);
        assert_eq!(nearest_indices(5, 2, true), vec![1, 3]);
        // 3 -> 7 (scale 3/7 in f32): nearest floor(k * 0.42857143), nearest-exact
        // floor([.21, .64, 1.07, 1.5, 1.93, 2.36, 2.79])
        assert_eq!(nearest_indices(3, 7, false), vec![0, 0, 0, 1, 1, 2, 2]);
        assert_eq!(nearest_indices(3, 7, true), vec![0, 0, 1, 1, 1, 2, 2]);
        // The whole op on a 3-D volume picks those indices along every axis.
        let x: Vec<f32> = (0..2 * 3 * 5).map(|i| i as f32 + 0.25).collect();
        let got = run(&x, 1, [2, 3, 5], [5, 7, 2], InterpMode::NearestExact);
        let (sd, sh, sw) = (
            nearest_indices(2, 5, true),
            nearest_indices(3, 7, true),
            nearest_indices(5, 2, true),
        );
        for z in 0..5 {
            for y in 0..7 {
                for w in 0..2 {
                    assert_eq!(got[(z * 7 + y) * 2 + w], x[(sd[z] * 3 + sh[y]) * 5 + sw[w]]);
                }
            }
        }
    }

    #[test]
    fn pytorch_linear_taps() {
        // 2 -> 5: scale 0.4, s = 0.4 (o + 0.5) - 0.5 = [-.3 -> 0, .1, .5, .9, 1.3]
        let t = linear_taps(2, 5);
        let i0: Vec<usize> = t.iter().map(|t| t.i0).collect();
        let i1: Vec<usize> = t.iter().map(|t| t.i1).collect();
        assert_eq!(i0, vec![0, 0, 0, 0, 1]);
        assert_eq!(i1, vec![1, 1, 1, 1, 1]);
        let l1: Vec<f32> = t.iter().map(|t| t.l1).collect();
        let want = [
            0.0,
            0.4f32 * 1.5 - 0.5,
            0.5,
            0.4f32 * 3.5 - 0.5,
            0.4f32 * 4.5 - 0.5 - 1.0,
        ];
        assert_eq!(l1, want);
        // 64 -> 256 (the model's H/W): scale 0.25, s = o / 4 - 0.375; o = 0, 1 clamp to 0,
        // then l1 cycles 0.125, 0.375, 0.625, 0.875; the last two outputs use i0 = i1 = 63.
        let t = linear_taps(64, 256);
        assert_eq!(
            t[0],
            Tap {
                i0: 0,
                i1: 1,
                l0: 1.0,
                l1: 0.0
            }
        );
        assert_eq!(
            t[1],
            Tap {
                i0: 0,
                i1: 1,
                l0: 1.0,
                l1: 0.0
            }
        );
        assert_eq!(
            t[2],
            Tap {
                i0: 0,
                i1: 1,
                l0: 0.875,
                l1: 0.125
            }
        );
        assert_eq!(
            t[5],
            Tap {
                i0: 0,
                i1: 1,
                l0: 0.125,
                l1: 0.875
            }
        );
        assert_eq!(
            t[7],
            Tap {
                i0: 1,
                i1: 2,
                l0: 0.625,
                l1: 0.375
            }
        );
        assert_eq!(
            t[253],
            Tap {
                i0: 62,
                i1: 63,
                l0: 0.125,
                l1: 0.875
            }
        );
        assert_eq!(
            t[254],
            Tap {
                i0: 63,
                i1: 63,
                l0: 0.875,
                l1: 0.125
            }
        );
        assert_eq!(
            t[255],
            Tap {
                i0: 63,
                i1: 63,
                l0: 0.625,
                l1: 0.375
            }
        );
        // in == out (the model's D, 32 -> 32): identity taps.
        assert!(linear_taps(32, 32).iter().enumerate().all(|(o, t)| *t
            == Tap {
                i0: o,
                i1: o,
                l0: 1.0,
                l1: 0.0
            }));
    }

    #[test]
    fn trilinear_identity_along_depth_and_separable_elsewhere() {
        // D 3 -> 3 is copied bit for bit; H, W resized: compare with an f64 separable reference
        // using the same taps.
        let mut rng = Rng(77);
        let (src, dst) = ([3, 4, 6], [3, 9, 13]);
        let planes = 2;
        let x = rng.vec(planes * 3 * 4 * 6);
        let got = run(&x, planes, src, dst, InterpMode::Trilinear);
        let (th, tw) = (linear_taps(4, 9), linear_taps(6, 13));
        let mut want = Vec::new();
        for p in 0..planes {
            for z in 0..3 {
                for hy in &th {
                    for wx in &tw {
                        let v = |h: usize, w: usize| x[((p * 3 + z) * 4 + h) * 6 + w] as f64;
                        let u = |h| v(h, wx.i0) * wx.l0 as f64 + v(h, wx.i1) * wx.l1 as f64;
                        want.push(u(hy.i0) * hy.l0 as f64 + u(hy.i1) * hy.l1 as f64);
                    }
                }
            }
        }
        assert_close(&got, &want, 1e-6, "trilinear");
        // Same size everywhere: exact copy.
        let same = run(&x, planes, src, src, InterpMode::Trilinear);
        assert_eq!(same, x);
    }

    #[test]
    fn trilinear_downsampling_all_axes() {
        let mut rng = Rng(78);
        let (src, dst) = ([7, 5, 9], [3, 2, 4]);
        let x = rng.vec(7 * 5 * 9);
        let got = run(&x, 1, src, dst, InterpMode::Trilinear);
        let (td, th, tw) = (linear_taps(7, 3), linear_taps(5, 2), linear_taps(9, 4));
        let mut want = Vec::new();
        for dz in &td {
            for hy in &th {
                for wx in &tw {
                    let mut s = 0f64;
                    for (d, ld) in [(dz.i0, dz.l0), (dz.i1, dz.l1)] {
                        for (h, lh) in [(hy.i0, hy.l0), (hy.i1, hy.l1)] {
                            for (w, lw) in [(wx.i0, wx.l0), (wx.i1, wx.l1)] {
                                s += x[(d * 5 + h) * 9 + w] as f64 * (ld * lh * lw) as f64;
                            }
                        }
                    }
                    want.push(s);
                }
            }
        }
        assert_close(&got, &want, 1e-6, "trilinear down");
    }

    /// The tiny fixture's model output is PyTorch's trilinear resize of mask channel 0
    /// (1, 1, 32, 16, 16) -> (1, 1, 32, 64, 64), computed by PyTorch on CPU.
    #[test]
    fn matches_pytorch_fixture_trilinear() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let bytes = std::fs::read(dir.join("call-text.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let get = |name: &str| {
            let t = st.tensor(name).unwrap();
            (
                t.shape().to_vec(),
                crate::dtype::decode_f32(t.data(), DType::F32),
            )
        };
        let (ls, low) = get("low_res_masks");
        let (fs, fin) = get("final_logits");
        assert_eq!(ls, vec![1, 4, 32, 16, 16]);
        assert_eq!(fs, vec![1, 1, 32, 64, 64]);
        let ch0 = &low[..32 * 16 * 16];
        let got = run(ch0, 1, [32, 16, 16], [32, 64, 64], InterpMode::Trilinear);
        let mut max_ulp = 0u32;
        for (g, w) in got.iter().zip(&fin) {
            let d = (g.to_bits() as i64 - w.to_bits() as i64).unsigned_abs() as u32;
            max_ulp = max_ulp.max(if g == w { 0 } else { d });
        }
        assert_eq!(
            max_ulp, 0,
            "trilinear differs from PyTorch by up to {max_ulp} ulp"
        );
    }

    /// The tiny fixture's model input is PyTorch's nearest-exact resize of the cropped,
    /// normalised volume to (32, 64, 64).
    #[test]
    fn matches_pytorch_fixture_nearest_exact() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let pre = std::fs::read(dir.join("pipeline-preprocess.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&pre).unwrap();
        let t = st.tensor("cropped").unwrap();
        let shape = t.shape().to_vec();
        let cropped = crate::dtype::decode_f32(t.data(), DType::F32);
        let img = std::fs::read(dir.join("call-image.safetensors")).unwrap();
        let st2 = safetensors::SafeTensors::deserialize(&img).unwrap();
        let t2 = st2.tensor("input").unwrap();
        let input = crate::dtype::decode_f32(t2.data(), DType::F32);
        let src = [
            shape[shape.len() - 3],
            shape[shape.len() - 2],
            shape[shape.len() - 1],
        ];
        let got = run(&cropped, 1, src, [32, 64, 64], InterpMode::NearestExact);
        assert_eq!(got, input, "nearest-exact {src:?} -> [32, 64, 64]");
    }
}
