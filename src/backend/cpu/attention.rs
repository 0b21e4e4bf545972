//! Fused multi-head attention (spec §1.3, §3, §4.2; DESIGN.md "attention"): online softmax over
//! blocks of keys, f32 throughout; a task never holds more than one (query block x key block)
//! tile of scores, so the 12 x 2048 x 2048 score tensor of the ViT is never materialised.
//!
//! Work is split over (batch, head, block of queries) with rayon. Two implementations:
//! - AVX-512 (module `avx512`): K^T and V of each head are packed once per call; register-tiled
//!   micro-kernels compute `S = scale * Q K^T` and `O += P V`, with the online softmax
//!   (vectorised exp, running max and sum per query) in between;
//! - portable: the same loop with single-threaded `gemm` crate products per key block.

use super::{bad_args, check_addr, math, SendPtr};
use crate::backend::AttentionArgs;
use crate::error::Result;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

const OP: &str = "attention";

/// Queries per task (portable path).
const Q_BLOCK: usize = 128;
/// Keys per step of the online softmax (portable path).
const K_BLOCK: usize = 512;

thread_local! {
    /// Per-thread tiles: scores (Q_BLOCK x K_BLOCK), output accumulator, row max and sum.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn validate(a: &AttentionArgs) -> Result<()> {
    let width = a.heads * a.head_dim;
    let rows = |name: &str, ld: usize, count: usize| {
        if ld < width && count > 1 {
            Err(bad_args(
                OP,
                format!("{name} row stride {ld} < heads * head_dim = {width}"),
            ))
        } else {
            Ok(())
        }
    };
    rows("q", a.q_row, a.nq)?;
    rows("k", a.k_row, a.nk)?;
    rows("v", a.v_row, a.nk)?;
    rows("out", a.o_row, a.nq)?;
    if a.batch > 1 && a.o_batch == 0 {
        return Err(bad_args(OP, "o_batch is 0 with batch > 1"));
    }
    let span = |bs: usize, ld: usize, n: usize| (a.batch - 1) * bs + (n - 1) * ld + width;
    check_addr::<f32>(OP, "q", a.q, span(a.q_batch, a.q_row, a.nq))?;
    check_addr::<f32>(OP, "k", a.k, span(a.k_batch, a.k_row, a.nk))?;
    check_addr::<f32>(OP, "v", a.v, span(a.v_batch, a.v_row, a.nk))?;
    check_addr::<f32>(OP, "out", a.out, span(a.o_batch, a.o_row, a.nq))?;
    Ok(())
}

/// Runs [`AttentionArgs`]: `out = softmax(scale * q k^T) v` per batch and head.
///
/// # Safety
/// Every element the arguments describe must lie in live f32 memory; `out` must not overlap
/// `q`, `k` or `v`.
pub unsafe fn attention_f32(a: &AttentionArgs) -> Result<()> {
    if a.batch == 0 || a.heads == 0 || a.nq == 0 || a.head_dim == 0 {
        return Ok(());
    }
    if a.nk == 0 {
        return Err(bad_args(OP, "nk is 0: softmax over no keys"));
    }
    validate(a)?;
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: validated above; the CPU has AVX-512F.
        unsafe { avx512::run(a) };
        return Ok(());
    }
    // SAFETY: validated above.
    unsafe { run_gemm(a) };
    Ok(())
}

/// The portable path: `gemm` crate products per key block.
///
/// # Safety
/// As [`attention_f32`], with the arguments validated.
unsafe fn run_gemm(a: &AttentionArgs) {
    let q_blocks = a.nq.div_ceil(Q_BLOCK);
    let tasks = a.batch * a.heads * q_blocks;
    let out = SendPtr(a.out as *mut f32);
    (0..tasks).into_par_iter().for_each(|t| {
        let qb = t % q_blocks;
        let h = (t / q_blocks) % a.heads;
        let b = t / (q_blocks * a.heads);
        // SAFETY: each task writes the out rows of its own (batch, head, query block).
        unsafe { attention_block(a, b, h, qb * Q_BLOCK, out) };
    });
}

/// One (batch, head, query block) task.
unsafe fn attention_block(a: &AttentionArgs, b: usize, h: usize, q0: usize, out: SendPtr<f32>) {
    let hd = a.head_dim;
    let rows = Q_BLOCK.min(a.nq - q0);
    let col = h * hd;
    // SAFETY (whole function): all offsets stay in the ranges checked by `validate`.
    let qp = unsafe { (a.q as *const f32).add(b * a.q_batch + q0 * a.q_row + col) };
    let kp = unsafe { (a.k as *const f32).add(b * a.k_batch + col) };
    let vp = unsafe { (a.v as *const f32).add(b * a.v_batch + col) };
    // Causal: row i sees keys j <= i, so the block needs keys below q0 + rows.
    let kend = if a.causal { a.nk.min(q0 + rows) } else { a.nk };

    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        let need = Q_BLOCK * K_BLOCK + Q_BLOCK * hd + 2 * Q_BLOCK;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (s, rest) = buf.split_at_mut(Q_BLOCK * K_BLOCK);
        let (o, rest) = rest.split_at_mut(Q_BLOCK * hd);
        let (mx, rest) = rest.split_at_mut(Q_BLOCK);
        let sum = &mut rest[..Q_BLOCK];
        mx.fill(f32::NEG_INFINITY);
        sum.fill(0.0);

        let mut kb = 0;
        while kb < kend {
            let cols = K_BLOCK.min(kend - kb);
            // S = scale * Q K^T (rows x cols, row stride K_BLOCK).
            // SAFETY: k rows kb..kb+cols exist; s has room for rows x K_BLOCK.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    hd,
                    s.as_mut_ptr(),
                    1,
                    K_BLOCK as isize,
                    false,
                    qp,
                    1,
                    a.q_row as isize,
                    kp.add(kb * a.k_row),
                    a.k_row as isize,
                    1,
                    0.0f32,
                    a.scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            };
            for r in 0..rows {
                let srow = &mut s[r * K_BLOCK..r * K_BLOCK + cols];
                let valid = if a.causal {
                    (q0 + r + 1).saturating_sub(kb).min(cols)
                } else {
                    cols
                };
                if valid == 0 {
                    // Every key of this block is masked for this row: P = 0, state unchanged.
                    srow.fill(0.0);
                    continue;
                }
                let (m_new, psum) = softmax_block(srow, valid, mx[r]);
                let corr = (mx[r] - m_new).exp();
                sum[r] = sum[r] * corr + psum;
                mx[r] = m_new;
                if kb > 0 && corr != 1.0 {
                    o[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= corr);
                }
            }
            // O (+)= P V.
            // SAFETY: v rows kb..kb+cols exist; o has room for rows x hd.
            unsafe {
                gemm::gemm(
                    rows,
                    hd,
                    cols,
                    o.as_mut_ptr(),
                    1,
                    hd as isize,
                    kb > 0,
                    s.as_ptr(),
                    1,
                    K_BLOCK as isize,
                    vp.add(kb * a.v_row),
                    1,
                    a.v_row as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            };
            kb += cols;
        }
        for r in 0..rows {
            let l = sum[r];
            // SAFETY: this task owns out row q0 + r, columns col..col+hd.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out.add(b * a.o_batch + (q0 + r) * a.o_row + col),
                    hd,
                )
            };
            for (d, &x) in dst.iter_mut().zip(&o[r * hd..(r + 1) * hd]) {
                *d = x / l;
            }
        }
    });
}

/// Partial maxima / sums kept per step: four registers' worth, so that the max and sum
/// chains do not serialise on one register's latency.
const WIDE: usize = 4 * math::LANES;

#[inline(always)]
fn softmax_block_body<const FMA: bool>(row: &mut [f32], valid: usize, m_old: f32) -> (f32, f32) {
    let (live, masked) = row.split_at_mut(valid);
    let mut mxl = [f32::NEG_INFINITY; WIDE];
    let mut chunks = live.chunks_exact(WIDE);
    for ch in &mut chunks {
        for (m, &v) in mxl.iter_mut().zip(ch) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut m_new = max2(tree::<WIDE>(mxl, max2), m_old);
    for &v in chunks.remainder() {
        m_new = max2(v, m_new);
    }
    let mut sl = [0f32; WIDE];
    let mut chunks = live.chunks_exact_mut(WIDE);
    for ch in &mut chunks {
        for (s, v) in sl.iter_mut().zip(ch.iter_mut()) {
            *v = math::exp_nonpos::<FMA>(*v - m_new);
            *s += *v;
        }
    }
    let mut total = 0f32;
    for v in chunks.into_remainder() {
        *v = math::exp_nonpos::<FMA>(*v - m_new);
        total += *v;
    }
    total += tree::<WIDE>(sl, |a, b| a + b);
    masked.fill(0.0);
    (m_new, total)
}

#[inline(always)]
fn max2(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Pairwise (tree) reduction of `N` (a power of two) partial results: log2(N) dependent
/// steps instead of N, and vector shuffles instead of scalar code.
#[inline(always)]
fn tree<const N: usize>(mut v: [f32; N], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut half = N / 2;
    while half > 0 {
        for i in 0..half {
            v[i] = f(v[i], v[i + half]);
        }
        half /= 2;
    }
    v[0]
}

math::multiversion_fma! {
    /// Online-softmax step on one row of scores: returns the new running max and the sum of
    /// `p = exp(s - max)` over the first `valid` entries; writes `p` there and 0 after.
    pub(crate) fn softmax_block(row: &mut [f32], valid: usize, m_old: f32) -> (f32, f32) => softmax_block_body;
}

/// The AVX-512 path: K^T and V of every head are packed once (K transposed so that keys are
/// contiguous), then register-tiled micro-kernels compute `S = scale * Q K^T` (6 queries x up
/// to 64 keys) and `O += P V` (6 queries x up to 64 dims) per block, with the online softmax
/// in between.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::math::{EXP_LN2, EXP_POLY};
    use super::{AttentionArgs, SendPtr};
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Queries per task (a multiple of the micro-tile height).
    const QB: usize = 48;
    /// Keys per online-softmax step.
    const KB: usize = 512;
    /// Query rows of a micro-tile.
    const MR: usize = 6;

    thread_local! {
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    static PACK: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

    /// Row stride of packed K^T: keys rounded up to 16, plus 16 so that consecutive rows do
    /// not map to the same L1 sets when the key count is a power of two.
    fn ldk(nk: usize) -> usize {
        nk.div_ceil(16) * 16 + 16
    }

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// `e^x` for `x <= 0` (AVX-512): Cody-Waite reduction, degree-6 polynomial and `vscalefps`
    /// for the power of two (which also flushes the far tail to 0); same accuracy as
    /// [`super::math::exp_nonpos`].
    #[inline(always)]
    unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[0]), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[1]), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(p, n)
    }

    /// [`super::softmax_block`] for the AVX-512 path: `row.len()` is a multiple of 16.
    #[inline(always)]
    unsafe fn softmax_row(row: &mut [f32], valid: usize, m_old: f32) -> (f32, f32) {
        unsafe {
            let p = row.as_mut_ptr();
            let full = valid / 16;
            let tail = (valid % 16) as u32;
            let tail_mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let (mut m0, mut m1) = (ninf, ninf);
            let mut i = 0;
            while i + 1 < full {
                m0 = _mm512_max_ps(m0, _mm512_loadu_ps(p.add(16 * i)));
                m1 = _mm512_max_ps(m1, _mm512_loadu_ps(p.add(16 * i + 16)));
                i += 2;
            }
            if i < full {
                m0 = _mm512_max_ps(m0, _mm512_loadu_ps(p.add(16 * i)));
            }
            if tail > 0 {
                m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(ninf, tail_mask, p.add(16 * full)));
            }
            let m_new = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1)).max(m_old);
            let mv = _mm512_set1_ps(m_new);
            let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 1 < full {
                let y0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i)), mv));
                let y1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i + 16)), mv));
                _mm512_storeu_ps(p.add(16 * i), y0);
                _mm512_storeu_ps(p.add(16 * i + 16), y1);
                s0 = _mm512_add_ps(s0, y0);
                s1 = _mm512_add_ps(s1, y1);
                i += 2;
            }
            if i < full {
                let y = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i)), mv));
                _mm512_storeu_ps(p.add(16 * i), y);
                s0 = _mm512_add_ps(s0, y);
            }
            let mut next = full;
            if tail > 0 {
                // Masked-off lanes become exact zeros (keys past `valid`).
                let x = _mm512_maskz_loadu_ps(tail_mask, p.add(16 * full));
                let y = _mm512_maskz_mov_ps(tail_mask, exp512(_mm512_sub_ps(x, mv)));
                _mm512_storeu_ps(p.add(16 * full), y);
                s1 = _mm512_add_ps(s1, y);
                next += 1;
            }
            for v in next..row.len() / 16 {
                _mm512_storeu_ps(p.add(16 * v), _mm512_setzero_ps());
            }
            (m_new, _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)))
        }
    }

    /// `S[r][16v + l] = scale * Σ_e Q[r][e] Kt[e][16v + l]` for `r < R`, `v < V`.
    #[inline(always)]
    unsafe fn s_tile<const R: usize, const V: usize>(
        q: *const f32,
        hd: usize,
        kt: *const f32,
        ldk: usize,
        s: *mut f32,
        lds: usize,
        scale: f32,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for e in 0..hd {
                let mut kv = [_mm512_setzero_ps(); V];
                for (v, k) in kv.iter_mut().enumerate() {
                    *k = _mm512_loadu_ps(kt.add(e * ldk + 16 * v));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(*q.add(r * hd + e));
                    for (c, k) in row.iter_mut().zip(&kv) {
                        *c = _mm512_fmadd_ps(qb, *k, *c);
                    }
                }
            }
            let sc = _mm512_set1_ps(scale);
            for (r, row) in acc.iter().enumerate() {
                for (v, c) in row.iter().enumerate() {
                    _mm512_storeu_ps(s.add(r * lds + 16 * v), _mm512_mul_ps(*c, sc));
                }
            }
        }
    }

    /// `O[r][16v + l] (+)= Σ_{j < keys} P[r][j] Vm[j][16v + l]` for `r < R`, `v < V`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_tile<const R: usize, const V: usize>(
        p: *const f32,
        ldp: usize,
        vm: *const f32,
        ldv: usize,
        o: *mut f32,
        ldo: usize,
        keys: usize,
        accumulate: bool,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, c) in row.iter_mut().enumerate() {
                        *c = _mm512_loadu_ps(o.add(r * ldo + 16 * v));
                    }
                }
            }
            for j in 0..keys {
                let mut vv = [_mm512_setzero_ps(); V];
                for (v, x) in vv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(vm.add(j * ldv + 16 * v));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let pb = _mm512_set1_ps(*p.add(r * ldp + j));
                    for (c, x) in row.iter_mut().zip(&vv) {
                        *c = _mm512_fmadd_ps(pb, *x, *c);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, c) in row.iter().enumerate() {
                    _mm512_storeu_ps(o.add(r * ldo + 16 * v), *c);
                }
            }
        }
    }

    macro_rules! by_rv {
        ($f:ident, $r:expr, $v:expr, $($arg:expr),*) => {
            match ($r, $v) {
                (1, 1) => $f::<1, 1>($($arg),*), (1, 2) => $f::<1, 2>($($arg),*),
                (1, 3) => $f::<1, 3>($($arg),*), (1, 4) => $f::<1, 4>($($arg),*),
                (2, 1) => $f::<2, 1>($($arg),*), (2, 2) => $f::<2, 2>($($arg),*),
                (2, 3) => $f::<2, 3>($($arg),*), (2, 4) => $f::<2, 4>($($arg),*),
                (3, 1) => $f::<3, 1>($($arg),*), (3, 2) => $f::<3, 2>($($arg),*),
                (3, 3) => $f::<3, 3>($($arg),*), (3, 4) => $f::<3, 4>($($arg),*),
                (4, 1) => $f::<4, 1>($($arg),*), (4, 2) => $f::<4, 2>($($arg),*),
                (4, 3) => $f::<4, 3>($($arg),*), (4, 4) => $f::<4, 4>($($arg),*),
                (5, 1) => $f::<5, 1>($($arg),*), (5, 2) => $f::<5, 2>($($arg),*),
                (5, 3) => $f::<5, 3>($($arg),*), (5, 4) => $f::<5, 4>($($arg),*),
                (6, 1) => $f::<6, 1>($($arg),*), (6, 2) => $f::<6, 2>($($arg),*),
                (6, 3) => $f::<6, 3>($($arg),*), (6, 4) => $f::<6, 4>($($arg),*),
                _ => unreachable!("tile {} x {}", $r, $v),
            }
        };
    }

    /// Packs, per (batch, head), K^T as `hd x ldk` (keys contiguous, zero-padded) followed by
    /// V as `nk x hd16` (zero-padded columns), then runs the query blocks in parallel.
    ///
    /// # Safety
    /// Validated arguments; the CPU has AVX-512F.
    pub unsafe fn run(a: &AttentionArgs) {
        let hd = a.head_dim;
        let hd16 = hd.div_ceil(16) * 16;
        let nk16 = ldk(a.nk);
        let per = hd * nk16 + a.nk * hd16;
        let total = a.batch * a.heads * per;
        // One packing buffer reused across calls (a concurrent call packs into its own).
        let mut guard = PACK.try_lock().ok();
        let mut local = Vec::new();
        let pack: &mut Vec<f32> = match guard.as_deref_mut() {
            Some(v) => v,
            None => &mut local,
        };
        if pack.len() < total {
            pack.resize(total, 0.0);
        }
        let pack = &mut pack[..total];
        let (kp, vp) = (SendPtr(a.k as *mut f32), SendPtr(a.v as *mut f32));
        pack.par_chunks_mut(per).enumerate().for_each(|(t, buf)| {
            let (b, h) = (t / a.heads, t % a.heads);
            let (kt, vm) = buf.split_at_mut(hd * nk16);
            // Padding keys and dims must read as zeros.
            for e in 0..hd {
                kt[e * nk16 + a.nk..(e + 1) * nk16].fill(0.0);
            }
            for j in 0..a.nk {
                vm[j * hd16 + hd..(j + 1) * hd16].fill(0.0);
                // SAFETY: row j of head h lies in the validated k / v ranges.
                let (krow, vrow) = unsafe {
                    (
                        std::slice::from_raw_parts(
                            kp.add(b * a.k_batch + j * a.k_row + h * hd),
                            hd,
                        ),
                        std::slice::from_raw_parts(
                            vp.add(b * a.v_batch + j * a.v_row + h * hd),
                            hd,
                        ),
                    )
                };
                for (e, &x) in krow.iter().enumerate() {
                    kt[e * nk16 + j] = x;
                }
                vm[j * hd16..j * hd16 + hd].copy_from_slice(vrow);
            }
        });
        let q_blocks = a.nq.div_ceil(QB);
        let out = SendPtr(a.out as *mut f32);
        let pack = &*pack;
        (0..a.batch * a.heads * q_blocks)
            .into_par_iter()
            .for_each(|t| {
                let qb = t % q_blocks;
                let bh = t / q_blocks;
                let (kt, vm) = pack[bh * per..(bh + 1) * per].split_at(hd * nk16);
                // SAFETY: the task writes only the out rows of its own (batch, head, block).
                unsafe { block(a, bh / a.heads, bh % a.heads, qb * QB, kt, vm, out) };
            });
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn block(
        a: &AttentionArgs,
        b: usize,
        h: usize,
        q0: usize,
        kt: &[f32],
        vm: &[f32],
        out: SendPtr<f32>,
    ) {
        let hd = a.head_dim;
        let hd16 = hd.div_ceil(16) * 16;
        let nk16 = ldk(a.nk);
        let rows = QB.min(a.nq - q0);
        let kend = if a.causal { a.nk.min(q0 + rows) } else { a.nk };
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            let need = QB * hd + QB * KB + QB * hd16 + 2 * QB;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let (qp, rest) = buf.split_at_mut(QB * hd);
            let (s, rest) = rest.split_at_mut(QB * KB);
            let (o, rest) = rest.split_at_mut(QB * hd16);
            let (mx, sum) = rest.split_at_mut(QB);
            mx.fill(f32::NEG_INFINITY);
            sum.fill(0.0);
            for r in 0..rows {
                // SAFETY: query row q0 + r of head h lies in the validated q range.
                let src = unsafe {
                    std::slice::from_raw_parts(
                        (a.q as *const f32).add(b * a.q_batch + (q0 + r) * a.q_row + h * hd),
                        hd,
                    )
                };
                qp[r * hd..(r + 1) * hd].copy_from_slice(src);
            }
            let mut kb = 0;
            while kb < kend {
                let cols = KB.min(kend - kb);
                let cols16 = cols.div_ceil(16) * 16;
                let mut jc = 0;
                while jc < cols16 {
                    let nv = ((cols16 - jc) / 16).min(4);
                    let mut i0 = 0;
                    while i0 < rows {
                        let mr = (rows - i0).min(MR);
                        // SAFETY: Kt has nk16 >= kb + cols16 columns; s has QB x KB.
                        unsafe {
                            by_rv!(
                                s_tile,
                                mr,
                                nv,
                                qp.as_ptr().add(i0 * hd),
                                hd,
                                kt.as_ptr().add(kb + jc),
                                nk16,
                                s.as_mut_ptr().add(i0 * KB + jc),
                                KB,
                                a.scale
                            )
                        };
                        i0 += mr;
                    }
                    jc += nv * 16;
                }
                for r in 0..rows {
                    let srow = &mut s[r * KB..r * KB + cols16];
                    let valid = if a.causal {
                        (q0 + r + 1).saturating_sub(kb).min(cols)
                    } else {
                        cols
                    };
                    if valid == 0 {
                        srow.fill(0.0);
                        continue;
                    }
                    // SAFETY: srow has cols16 (a multiple of 16) elements, valid <= cols16.
                    let (m_new, psum) = unsafe { softmax_row(srow, valid, mx[r]) };
                    let corr = (mx[r] - m_new).exp();
                    sum[r] = sum[r] * corr + psum;
                    mx[r] = m_new;
                    if kb > 0 && corr != 1.0 {
                        o[r * hd16..(r + 1) * hd16]
                            .iter_mut()
                            .for_each(|x| *x *= corr);
                    }
                }
                let mut i0 = 0;
                while i0 < rows {
                    let mr = (rows - i0).min(MR);
                    let mut cc = 0;
                    while cc < hd16 {
                        let nv = ((hd16 - cc) / 16).min(4);
                        // SAFETY: V has rows kb..kb+cols and hd16 columns; o has QB x hd16.
                        unsafe {
                            by_rv!(
                                pv_tile,
                                mr,
                                nv,
                                s.as_ptr().add(i0 * KB),
                                KB,
                                vm.as_ptr().add(kb * hd16 + cc),
                                hd16,
                                o.as_mut_ptr().add(i0 * hd16 + cc),
                                hd16,
                                cols,
                                kb > 0
                            )
                        };
                        cc += nv * 16;
                    }
                    i0 += mr;
                }
                kb += cols;
            }
            for r in 0..rows {
                let l = sum[r];
                // SAFETY: this task owns out row q0 + r, columns h*hd .. (h+1)*hd.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.add(b * a.o_batch + (q0 + r) * a.o_row + h * hd),
                        hd,
                    )
                };
                for (d, &x) in dst.iter_mut().zip(&o[r * hd16..r * hd16 + hd]) {
                    *d = x / l;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::CpuBackend;
    use super::*;
    use crate::backend::Backend;

    #[allow(clippy::too_many_arguments)]
    fn check(
        batch: usize,
        heads: usize,
        nq: usize,
        nk: usize,
        hd: usize,
        causal: bool,
        packed: bool,
        seed: u64,
    ) {
        check_scaled(batch, heads, nq, nk, hd, causal, packed, seed, 1.0)
    }

    /// As `check`, with the softmax scale multiplied by `sharp` (large: near one-hot rows).
    #[allow(clippy::too_many_arguments)]
    fn check_scaled(
        batch: usize,
        heads: usize,
        nq: usize,
        nk: usize,
        hd: usize,
        causal: bool,
        packed: bool,
        seed: u64,
        sharp: f32,
    ) {
        let be = CpuBackend::new();
        let mut rng = Rng(seed);
        let width = heads * hd;
        // Packed: q, k, v are column slices of one (rows x 3*width + 3) buffer, as the ViT's QKV.
        let (q_row, k_row, v_row) = if packed {
            (3 * width + 3, 3 * width + 3, 3 * width + 3)
        } else {
            (width + 1, width + 2, width)
        };
        let q_batch = nq * q_row + 7;
        let k_batch = nk * k_row + 3;
        let v_batch = nk * v_row + 1;
        let o_row = width + 5;
        let o_batch = nq * o_row + 2;
        let qv = rng.vec(batch * q_batch.max(k_batch).max(v_batch) + 3 * width + 3);
        let kv = if packed {
            qv.clone()
        } else {
            rng.vec(batch * k_batch)
        };
        let vv = if packed {
            qv.clone()
        } else {
            rng.vec(batch * v_batch)
        };
        let (k_off, v_off) = if packed { (width, 2 * width) } else { (0, 0) };
        let (k_batch, v_batch) = if packed {
            (q_batch, q_batch)
        } else {
            (k_batch, v_batch)
        };
        let qb = buf(&be, &qv);
        let kb = if packed { None } else { Some(buf(&be, &kv)) };
        let vb = if packed { None } else { Some(buf(&be, &vv)) };
        let kaddr = kb
            .as_ref()
            .map_or(qb.addr() + 4 * k_off as u64, |b| b.addr());
        let vaddr = vb
            .as_ref()
            .map_or(qb.addr() + 4 * v_off as u64, |b| b.addr());
        let o0 = rng.vec(batch * o_batch);
        let ob = buf(&be, &o0);
        let scale = sharp / (hd as f32).sqrt();
        let args = AttentionArgs {
            batch,
            heads,
            nq,
            nk,
            head_dim: hd,
            q: qb.addr(),
            q_row,
            q_batch,
            k: kaddr,
            k_row,
            k_batch,
            v: vaddr,
            v_row,
            v_batch,
            out: ob.addr(),
            o_row,
            o_batch,
            scale,
            causal,
        };
        unsafe { be.attention(&args).unwrap() };
        let got = read(&be, ob.addr(), o0.len());
        let mut want: Vec<f64> = o0.iter().map(|&x| x as f64).collect();
        let mut max_score = 0f64;
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..nq {
                    let qi = |e: usize| qv[b * q_batch + i * q_row + h * hd + e] as f64;
                    let kj = |j: usize, e: usize| {
                        kv[k_off + b * k_batch + j * k_row + h * hd + e] as f64
                    };
                    let vj = |j: usize, e: usize| {
                        vv[v_off + b * v_batch + j * v_row + h * hd + e] as f64
                    };
                    let jmax = if causal { nk.min(i + 1) } else { nk };
                    let s: Vec<f64> = (0..jmax)
                        .map(|j| scale as f64 * (0..hd).map(|e| qi(e) * kj(j, e)).sum::<f64>())
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    max_score = s.iter().fold(max_score, |a, x| a.max(x.abs()));
                    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let l: f64 = p.iter().sum();
                    for e in 0..hd {
                        want[b * o_batch + i * o_row + h * hd + e] =
                            (0..jmax).map(|j| p[j] * vj(j, e)).sum::<f64>() / l;
                    }
                }
            }
        }
        let what = format!("attention b{batch} h{heads} nq{nq} nk{nk} d{hd} causal {causal}");
        // f32 scores carry a rounding error of about |s| 2^-24 per accumulation step, and the
        // softmax turns an absolute score error into the same relative weight error: with
        // scores of order 1 this is far below 2e-6, with sharp scores it sets the bound.
        let tol = 2e-6f64.max(max_score * (hd as f64).sqrt() * 2f64.powi(-24));
        assert_close(&got, &want, tol, &what);
        // The portable path too (the dispatcher picks AVX-512 where available).
        let ob2 = buf(&be, &o0);
        let args2 = AttentionArgs {
            out: ob2.addr(),
            ..args
        };
        unsafe { run_gemm(&args2) };
        assert_close(
            &read(&be, ob2.addr(), o0.len()),
            &want,
            tol,
            &format!("{what} (gemm path)"),
        );
    }

    #[test]
    fn odd_shapes() {
        let mut seed = 10;
        for (nq, nk, hd) in [
            (1, 1, 64),
            (7, 2048, 48),
            (2048, 7, 48),
            (130, 515, 96),
            (5, 1, 32),
            (1, 9, 17),
            (257, 1029, 64),
            (20, 37, 130),
        ] {
            for causal in [false, true] {
                seed += 1;
                check(2, 3, nq, nk, hd, causal, seed % 2 == 0, seed);
            }
        }
    }

    #[test]
    fn clip_like_causal_packed() {
        check(1, 8, 12, 12, 64, true, true, 5);
        check(2, 2, 77, 77, 32, true, false, 6);
    }

    #[test]
    fn sharp_softmax_is_stable() {
        // Scores of several hundred: exp would overflow without the running max, and most
        // weights underflow to 0 across key blocks.
        check_scaled(1, 2, 100, 1100, 64, false, false, 7, 60.0);
        check_scaled(1, 2, 600, 600, 48, true, true, 8, 60.0);
    }

    #[test]
    fn rejects_bad_arguments() {
        let be = CpuBackend::new();
        let x = buf(&be, &[0.5; 64]);
        let o = be.alloc(256).unwrap();
        let mut a = AttentionArgs {
            batch: 1,
            heads: 2,
            nq: 2,
            nk: 2,
            head_dim: 4,
            q: x.addr(),
            q_row: 8,
            q_batch: 16,
            k: x.addr(),
            k_row: 8,
            k_batch: 16,
            v: x.addr(),
            v_row: 8,
            v_batch: 16,
            out: o.addr(),
            o_row: 8,
            o_batch: 16,
            scale: 0.5,
            causal: false,
        };
        unsafe { be.attention(&a).unwrap() };
        let got = read(&be, o.addr(), 16);
        assert!(got.iter().all(|&v| (v - 0.5).abs() < 1e-7), "{got:?}");
        a.nk = 0;
        assert!(unsafe { be.attention(&a) }.is_err());
        a.nk = 2;
        a.k_row = 7;
        assert!(unsafe { be.attention(&a) }
            .unwrap_err()
            .to_string()
            .contains("k row stride"));
    }
}
