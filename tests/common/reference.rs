//! f64 references for the ops whose CPU implementation must itself be checked (GEMM and its
//! epilogues, attention, the layer norms, the transposed convolution, add and activation).
//! Inputs are the f32 values a device actually read (already rounded through its storage
//! dtype); every sum, the softmax, the normalisation statistics and the activations are
//! computed in f64, so a reference is independent of every backend's summation order.
//!
//! Outputs are written into a caller-provided f64 buffer that holds the output's initial
//! contents (NaN for a poisoned output, the input values for an in-place one), so elements an
//! op must not touch (row padding, gaps between batches) keep what was there.
#![allow(dead_code)]

use segvol::backend::Act;

/// The activation in f64: exact erf GELU, ReLU, CLIP's QuickGELU.
pub fn act(a: Act, x: f64) -> f64 {
    match a {
        Act::None => x,
        Act::Gelu => 0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2),
        Act::Relu => x.max(0.0),
        Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
    }
}

/// One GEMM, laid out as [`segvol::backend::GemmArgs`] describes, on host slices that start at
/// each operand's first element (offsets already applied).
pub struct Gemm<'a> {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: &'a [f32],
    pub lda: usize,
    pub batch_stride_a: usize,
    pub b: &'a [f32],
    pub ldb: usize,
    pub batch_stride_b: usize,
    pub b_trans: bool,
    pub ldc: usize,
    pub batch_stride_c: usize,
    pub alpha: f32,
    pub bias: Option<&'a [f32]>,
    pub act: Act,
    /// `(values, ld, batch stride)`; for an in-place residual, the initial contents of C.
    pub residual: Option<(&'a [f32], usize, usize)>,
}

/// `c[b][i][j] = act(alpha * Σ_p A[b][i][p] B[b][p][j] + bias[j]) + R[b][i][j]` in f64.
pub fn gemm(g: &Gemm, c: &mut [f64]) {
    for bi in 0..g.batch {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0f64;
                for p in 0..g.k {
                    let x = g.a[bi * g.batch_stride_a + i * g.lda + p] as f64;
                    let y = if g.b_trans {
                        g.b[bi * g.batch_stride_b + j * g.ldb + p]
                    } else {
                        g.b[bi * g.batch_stride_b + p * g.ldb + j]
                    } as f64;
                    s += x * y;
                }
                let mut v = g.alpha as f64 * s;
                if let Some(bias) = g.bias {
                    v += bias[j] as f64;
                }
                v = act(g.act, v);
                if let Some((r, ld, bs)) = g.residual {
                    v += r[bi * bs + i * ld + j] as f64;
                }
                c[bi * g.batch_stride_c + i * g.ldc + j] = v;
            }
        }
    }
}

/// A strided `(batch, rows, heads * head_dim)` view: element `(b, i, h, e)` at
/// `b*batch + i*row + h*head_dim + e` of `data`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub row: usize,
    pub batch: usize,
}

/// Attention as [`segvol::backend::AttentionArgs`] describes: softmax in f64 (max-subtracted),
/// `j <= i` when causal. `out` is indexed like a view with `o_row`, `o_batch`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    batch: usize,
    heads: usize,
    nq: usize,
    nk: usize,
    hd: usize,
    q: View,
    k: View,
    v: View,
    scale: f32,
    causal: bool,
    out: &mut [f64],
    o_row: usize,
    o_batch: usize,
) {
    let mut s = vec![0f64; nk];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..nq {
                let keys = if causal { nk.min(i + 1) } else { nk };
                let qi = &q.data[b * q.batch + i * q.row + h * hd..][..hd];
                let mut mx = f64::NEG_INFINITY;
                for (j, sj) in s.iter_mut().enumerate().take(keys) {
                    let kj = &k.data[b * k.batch + j * k.row + h * hd..][..hd];
                    let dot: f64 = qi.iter().zip(kj).map(|(x, y)| *x as f64 * *y as f64).sum();
                    *sj = scale as f64 * dot;
                    mx = mx.max(*sj);
                }
                let mut den = 0f64;
                for sj in s.iter_mut().take(keys) {
                    *sj = (*sj - mx).exp();
                    den += *sj;
                }
                for e in 0..hd {
                    let mut acc = 0f64;
                    for (j, sj) in s.iter().enumerate().take(keys) {
                        acc += sj * v.data[b * v.batch + j * v.row + h * hd + e] as f64;
                    }
                    out[b * o_batch + i * o_row + h * hd + e] = acc / den;
                }
            }
        }
    }
}

/// Normalises `x` with f64 statistics (mean, biased variance), then `* w + b` and `act`;
/// `x`, `w`, `b` and `out` have one length.
fn normalize(x: &[f32], w: &[f32], b: &[f32], eps: f32, a: Act, out: &mut [f64]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for (i, o) in out.iter_mut().enumerate() {
        *o = act(a, (x[i] as f64 - mean) * inv * w[i] as f64 + b[i] as f64);
    }
}

/// Row-wise LayerNorm of a contiguous `rows x cols` matrix.
pub fn layer_norm(x: &[f32], rows: usize, cols: usize, w: &[f32], b: &[f32], eps: f32) -> Vec<f64> {
    let mut out = vec![0f64; rows * cols];
    for r in 0..rows {
        let s = r * cols..(r + 1) * cols;
        normalize(&x[s.clone()], w, b, eps, Act::None, &mut out[s]);
    }
    out
}

/// One LayerNorm over all `n` values of each of `batch` samples, elementwise affine, then
/// `act`.
pub fn layer_norm_joint(
    x: &[f32],
    batch: usize,
    n: usize,
    w: &[f32],
    b: &[f32],
    eps: f32,
    a: Act,
) -> Vec<f64> {
    let mut out = vec![0f64; batch * n];
    for s in 0..batch {
        let r = s * n..(s + 1) * n;
        normalize(&x[r.clone()], w, b, eps, a, &mut out[r]);
    }
    out
}

/// ConvTranspose3d, kernel 2, stride 2: input `(B, Cin, D, H, W)` or, `channels_last`,
/// `(B, D*H*W, Cin)`; weight `(Cin, Cout, 2, 2, 2)`; output `(B, Cout, 2D, 2H, 2W)`.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose3d_k2s2(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    batch: usize,
    cin: usize,
    cout: usize,
    dims: [usize; 3],
    channels_last: bool,
    a: Act,
) -> Vec<f64> {
    let [d, h, wd] = dims;
    let vox = d * h * wd;
    let (od, oh, ow) = (2 * d, 2 * h, 2 * wd);
    let mut out = vec![0f64; batch * cout * 8 * vox];
    for b in 0..batch {
        for o in 0..cout {
            for z in 0..od {
                for y in 0..oh {
                    for xx in 0..ow {
                        let s = (z / 2) * h * wd + (y / 2) * wd + xx / 2;
                        let tap = (z % 2) * 4 + (y % 2) * 2 + xx % 2;
                        let mut acc = bias[o] as f64;
                        for i in 0..cin {
                            let xv = if channels_last {
                                x[b * vox * cin + s * cin + i]
                            } else {
                                x[(b * cin + i) * vox + s]
                            };
                            acc += xv as f64 * w[(i * cout + o) * 8 + tap] as f64;
                        }
                        out[((b * cout + o) * od + z) * oh * ow + y * ow + xx] = act(a, acc);
                    }
                }
            }
        }
    }
    out
}

/// `out[i] = a[i] + b[i % period]`.
pub fn add(a: &[f32], b: &[f32], n: usize, period: usize) -> Vec<f64> {
    (0..n).map(|i| a[i] as f64 + b[i % period] as f64).collect()
}

/// `out[i] = act(x[i] * scale)`.
pub fn activation(x: &[f32], n: usize, scale: f32, a: Act) -> Vec<f64> {
    (0..n).map(|i| act(a, x[i] as f64 * scale as f64)).collect()
}

/// Foreground count and percentiles `(0.05, 99.95)` of `x > threshold`, from a sort of the
/// foreground (numpy's linear interpolation, `cpu::volume::percentile_linear`, on the sorted
/// values; the threshold is the device's, checked bit for bit against the CPU's).
pub fn foreground_count_percentiles(x: &[f32], threshold: f32) -> (u64, f64, f64) {
    use segvol::backend::cpu::volume::percentile_linear;
    let mut f: Vec<f32> = x.iter().copied().filter(|&v| v > threshold).collect();
    if f.is_empty() {
        return (0, f64::NAN, f64::NAN);
    }
    f.sort_by(f32::total_cmp);
    let p_lo = percentile_linear(f.len(), 0.05, |k| f[k]);
    let p_hi = percentile_linear(f.len(), 99.95, |k| f[k]);
    (f.len() as u64, p_lo, p_hi)
}

/// The mean of all voxels (the foreground threshold) in f64, and the mean and population
/// standard deviation in f64 of the voxels above `threshold` (the device's f32 threshold, so
/// that the foreground is the one the device selected).
pub fn foreground_moments(x: &[f32], threshold: f32) -> (f64, f64, f64) {
    let all = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    let f: Vec<f64> = x
        .iter()
        .filter(|&&v| v > threshold)
        .map(|&v| v as f64)
        .collect();
    let mean = f.iter().sum::<f64>() / f.len() as f64;
    let var = f.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / f.len() as f64;
    (all, mean, var.sqrt())
}
