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

/// The AVX-512 path, FlashAttention-style with GEMM register tiles. Per (batch, head), K is
/// packed transposed (`Kt[e][key]`, keys zero-padded to whole blocks) and V row-major with
/// padded width (`V[key][d]`), once per call. A task owns `T` tiles of `MR` = 14 queries of
/// one head and walks the keys in blocks of `KB`:
/// - `S = (scale Q) Kt` per tile with the 14 x 32 register tile of the GEMM (`tile`), Q packed
///   as `[e][14]`;
/// - the online softmax per tile, vectorised across the tile's 14 rows for the running max,
///   its correction factor and the running sum;
/// - `O += P V` with the same register tile, P broadcast from its rows.
///
/// Kt / V blocks (`KB x 64` f32 each, 16 KiB) are shared by the task's tiles from L1; the
/// task's S, P and O stay in L1 too.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::math::{EXP_LN2, EXP_POLY};
    use super::super::mem::Scratch;
    use super::super::sgemm::{pack_a, transpose16};
    use super::{AttentionArgs, SendPtr};
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Query rows of a register tile (the GEMM's, whose Ã packing packs Q).
    const MR: usize = super::super::sgemm::MR;
    /// Columns of a register tile: keys of S, dims of O.
    const NR: usize = 32;
    /// Keys per online-softmax step.
    const KB: usize = 64;
    /// Register tiles of queries per task.
    const T: usize = 16;
    /// Largest `s - running max` the lazy softmax lets through (`e^16` ~ 9e6: no overflow of
    /// the f32 sums, whose relative precision does not depend on the reference). After the
    /// first block, a tile's running max is only raised when a score exceeds it by this much;
    /// the result is the same softmax (the reference cancels in the normalisation).
    const LAZY_MAX: f32 = 16.0;

    thread_local! {
        static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch::new()) };
    }

    /// The packed K / V of the last calls, reused (a concurrent call packs into its own).
    static PACK: std::sync::Mutex<Scratch> = std::sync::Mutex::new(Scratch::new());

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// `e^x` for `x <= 0` (AVX-512): Cody-Waite reduction, degree-6 polynomial and `vscalefps`
    /// for the power of two (which also flushes the far tail to 0); same accuracy as
    /// [`super::math::exp_nonpos`]. The rounding of `x log2 e` to an integer is an add of
    /// 1.5 * 2^23 (exact below 2^22, which the clamp guarantees), cheaper than `vrndscaleps`.
    #[inline(always)]
    unsafe fn exp512(x: __m512) -> __m512 {
        const MAGIC: f32 = 12_582_912.0;
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let t = _mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(MAGIC),
        );
        let n = _mm512_sub_ps(t, _mm512_set1_ps(MAGIC));
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

    /// `C[r][0..NR] (+)= Σ_{k < kk} A(r, k) B[k][0..NR]` for the `MR` rows, `A(r, k)` at
    /// `a + r*ARS + k*ACS`, B rows `ldb` apart (64-byte aligned), C rows `ldc` apart.
    #[inline(always)]
    unsafe fn tile<const ARS: usize, const ACS: usize>(
        kk: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_load_ps(c.add(r * ldc + 16 * v));
                    }
                }
            }
            let (mut a, mut b) = (a, b);
            for _ in 0..kk {
                let b0 = _mm512_load_ps(b);
                let b1 = _mm512_load_ps(b.add(16));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.add(r * ARS));
                    row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(x, b1, row[1]);
                }
                a = a.add(ACS);
                b = b.add(ldb);
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    _mm512_store_ps(c.add(r * ldc + 16 * v), *x);
                }
            }
        }
    }

    /// `S = Q Kt` for one tile and `NR` keys (as [`tile`] with `A` = Q packed `[e][MR]`),
    /// with the softmax fused into the epilogue against the running max `m_ref` (lane `r` for
    /// row `r`): writes `p = exp(s - m_ref)` to `p_out` (rows `KB` apart) and adds `p` to the
    /// row's partial sums `rsum[r]`. Returns the rows where some `s - m_ref > LAZY_MAX`: their
    /// `p` may be too large, and the caller redoes the block with the exact max.
    #[inline(always)]
    unsafe fn s_tile_exp(
        hd: usize,
        q: *const f32,
        kt: *const f32,
        p_out: *mut f32,
        m_ref: __m512,
        rsum: &mut [__m512; MR],
    ) -> __mmask16 {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let (mut a, mut b) = (q, kt);
            for _ in 0..hd {
                let b0 = _mm512_load_ps(b);
                let b1 = _mm512_load_ps(b.add(16));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.add(r));
                    row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(x, b1, row[1]);
                }
                a = a.add(MR);
                b = b.add(KB);
            }
            let lim = _mm512_set1_ps(LAZY_MAX);
            let mut over: __mmask16 = 0;
            for (r, row) in acc.iter().enumerate() {
                let mv = _mm512_permutexvar_ps(_mm512_set1_epi32(r as i32), m_ref);
                let d0 = _mm512_sub_ps(row[0], mv);
                let d1 = _mm512_sub_ps(row[1], mv);
                let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_max_ps(d0, d1), lim);
                over |= ((big != 0) as u16) << r;
                let p0 = exp512(d0);
                let p1 = exp512(d1);
                _mm512_store_ps(p_out.add(r * KB), p0);
                _mm512_store_ps(p_out.add(r * KB + 16), p1);
                rsum[r] = _mm512_add_ps(rsum[r], _mm512_add_ps(p0, p1));
            }
            over
        }
    }

    /// Geometry of one call, shared by every task.
    struct Geo {
        hd: usize,
        /// `hd` rounded up to whole register tiles (`NR`).
        hdp: usize,
        /// Keys rounded up to whole blocks (`KB`).
        nkp: usize,
    }

    /// Packs K and V of every (batch, head) and runs the tasks.
    ///
    /// # Safety
    /// Validated arguments; the CPU has AVX-512F.
    pub unsafe fn run(a: &AttentionArgs) {
        let hd = a.head_dim;
        let hdp = hd.div_ceil(NR) * NR;
        let nkp = a.nk.div_ceil(KB) * KB;
        let per = hd * nkp + nkp * hdp;
        let g = Geo { hd, hdp, nkp };
        let mut guard = PACK.try_lock().ok();
        let mut local = Scratch::new();
        let pack: &mut Scratch = match guard.as_deref_mut() {
            Some(s) => s,
            None => &mut local,
        };
        let pack = pack.get(a.batch * a.heads * per);
        let (kp, vp) = (SendPtr(a.k as *mut f32), SendPtr(a.v as *mut f32));
        pack.par_chunks_mut(per).enumerate().for_each(|(t, buf)| {
            let (b, h) = (t / a.heads, t % a.heads);
            // SAFETY: the rows of head h lie in the validated k / v ranges.
            unsafe {
                pack_kv(
                    kp.add(b * a.k_batch + h * hd),
                    a.k_row,
                    vp.add(b * a.v_batch + h * hd),
                    a.v_row,
                    a.nk,
                    &g,
                    buf,
                )
            };
        });
        let q_blocks = a.nq.div_ceil(MR * T);
        let out = SendPtr(a.out as *mut f32);
        let pack = &*pack;
        // Task order: head-major, so that each thread walks through whole heads and their
        // packed K / V stay in its L2.
        (0..a.batch * a.heads * q_blocks)
            .into_par_iter()
            .for_each(|t| {
                let qb = t % q_blocks;
                let bh = t / q_blocks;
                let kv = &pack[bh * per..(bh + 1) * per];
                // SAFETY: the task writes only the out rows of its own (batch, head, block).
                unsafe { block(a, &g, bh / a.heads, bh % a.heads, qb * MR * T, kv, out) };
            });
    }

    /// Packs one head into `buf`: Kt by key blocks (`[j / KB][e][j % KB]`, so that each
    /// block is one contiguous `hd x KB` panel; zero past `nk`), then `V[j][d]` (`hdp` wide,
    /// zero past `nk` and `hd`). K is transposed 16 x 16 at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_kv(
        k: *const f32,
        k_row: usize,
        v: *const f32,
        v_row: usize,
        nk: usize,
        g: &Geo,
        buf: &mut [f32],
    ) {
        let hd = g.hd;
        let (kt, vm) = buf.split_at_mut(hd * g.nkp);
        // SAFETY (whole function): rows j < nk of this head lie in the validated k / v
        // ranges; the stores stay inside `buf`.
        unsafe {
            let mut j0 = 0;
            while j0 < g.nkp {
                let live = 16.min(nk.saturating_sub(j0));
                let blk = kt.as_mut_ptr().add(j0 / KB * KB * hd + j0 % KB);
                let mut e0 = 0;
                while e0 < hd {
                    let w = 16.min(hd - e0);
                    let em = ((1u32 << w) - 1) as __mmask16;
                    let mut x = [_mm512_setzero_ps(); 16];
                    for (j, xv) in x.iter_mut().enumerate().take(live) {
                        *xv = _mm512_maskz_loadu_ps(em, k.add((j0 + j) * k_row + e0));
                    }
                    let y = transpose16(x);
                    for (e, yv) in y.iter().enumerate().take(w) {
                        _mm512_store_ps(blk.add((e0 + e) * KB), *yv);
                    }
                    e0 += 16;
                }
                j0 += 16;
            }
            for j in 0..g.nkp {
                let dst = vm.as_mut_ptr().add(j * g.hdp);
                let mut d0 = 0;
                while d0 < g.hdp {
                    let w = if j < nk {
                        16.min(hd.saturating_sub(d0))
                    } else {
                        0
                    };
                    let dm = ((1u32 << w) - 1) as __mmask16;
                    let x = _mm512_maskz_loadu_ps(dm, v.add(j * v_row + d0));
                    _mm512_store_ps(dst.add(d0), x);
                    d0 += 16;
                }
            }
        }
    }

    /// One task: queries `q0 .. q0 + MR*T` (fewer at the end) of head `h`, batch item `b`.
    #[target_feature(enable = "avx512f")]
    unsafe fn block(
        a: &AttentionArgs,
        g: &Geo,
        b: usize,
        h: usize,
        q0: usize,
        kv: &[f32],
        out: SendPtr<f32>,
    ) {
        let (hd, hdp) = (g.hd, g.hdp);
        let rows = (MR * T).min(a.nq - q0);
        let tiles = rows.div_ceil(MR);
        let (kt, vm) = kv.split_at(hd * g.nkp);
        // Causal: the block's last query sees keys up to q0 + rows - 1.
        let kend = if a.causal { a.nk.min(q0 + rows) } else { a.nk };
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            // Per tile: Q packed [e][MR], S / P [MR][KB], O [MR][hdp]; then the running max
            // and sum, 16 lanes per tile.
            let (qsz, ssz, osz) = (hd * MR, MR * KB, MR * hdp);
            let qsz = qsz.next_multiple_of(16);
            let buf = scratch.get(T * (qsz + osz) + ssz + 2 * T * 16);
            let (qp, rest) = buf.split_at_mut(T * qsz);
            let (sp, rest) = rest.split_at_mut(ssz);
            let (op, rest) = rest.split_at_mut(T * osz);
            let (mx, sum) = rest.split_at_mut(T * 16);
            mx.fill(f32::NEG_INFINITY);
            sum.fill(0.0);
            op.fill(0.0);
            // Q tiles, scaled, packed [e][MR] (the GEMM's Ã packing); rows past the end are
            // zero.
            for t in 0..tiles {
                let r0 = t * MR;
                // SAFETY: query rows q0 + r0 .. of head h lie in the validated q range; the
                // tile's slot holds hd x MR.
                unsafe {
                    pack_a(
                        (a.q as *const f32).add(b * a.q_batch + (q0 + r0) * a.q_row + h * hd),
                        a.q_row,
                        MR.min(rows - r0),
                        hd,
                        a.scale,
                        qp[t * qsz..].as_mut_ptr(),
                        0,
                    )
                };
            }
            let mut kb = 0;
            while kb < kend {
                let keys = KB.min(kend - kb);
                // Groups of G tiles: each phase over the group before the next, so that the
                // tiles' independent work overlaps in the out-of-order window while the
                // group's S stays in L1 (one S buffer of G tiles serves every group).
                // Blocks after the first without masked keys: the softmax runs in the S
                // kernel's epilogue against the running max (see `LAZY_MAX`).
                let masked = keys < KB || (a.causal && kb + KB > q0 + 1);
                let lazy = kb > 0 && !masked;
                for t in 0..tiles {
                    let s = sp.as_mut_ptr();
                    let q = qp[t * qsz..].as_ptr();
                    let msl = &mut mx[t * 16..(t + 1) * 16];
                    let ssl = &mut sum[t * 16..(t + 1) * 16];
                    let mut exact = !lazy;
                    if lazy {
                        let mut rsum = [_mm512_setzero_ps(); MR];
                        let m_ref = unsafe { _mm512_loadu_ps(msl.as_ptr()) };
                        let mut over = 0;
                        for jc in (0..KB).step_by(NR) {
                            // SAFETY: Kt holds the block of keys kb.. (hd x KB); S has
                            // MR x KB.
                            over |= unsafe {
                                s_tile_exp(
                                    hd,
                                    q,
                                    kt.as_ptr().add(kb * hd + jc),
                                    s.add(jc),
                                    m_ref,
                                    &mut rsum,
                                )
                            };
                        }
                        if over == 0 {
                            // SAFETY: 16 lanes in the tile's sum slots.
                            unsafe {
                                let mut r16 = [_mm512_setzero_ps(); 16];
                                r16[..MR].copy_from_slice(&rsum);
                                let l = _mm512_add_ps(
                                    _mm512_loadu_ps(ssl.as_ptr()),
                                    hreduce16(r16, |x, y| _mm512_add_ps(x, y)),
                                );
                                _mm512_storeu_ps(ssl.as_mut_ptr(), l);
                            }
                        } else {
                            exact = true;
                        }
                    }
                    if exact {
                        for jc in (0..KB).step_by(NR) {
                            // SAFETY: as above.
                            unsafe {
                                tile::<1, MR>(
                                    hd,
                                    q,
                                    kt.as_ptr().add(kb * hd + jc),
                                    KB,
                                    s.add(jc),
                                    KB,
                                    false,
                                )
                            };
                        }
                        // SAFETY: the tile's S, O, max and sum slots.
                        unsafe {
                            softmax_tile(
                                &mut sp[..ssz],
                                &mut op[t * osz..(t + 1) * osz],
                                hdp,
                                msl,
                                ssl,
                                |r| {
                                    let valid = if a.causal {
                                        (q0 + t * MR + r + 1).saturating_sub(kb)
                                    } else {
                                        usize::MAX
                                    };
                                    valid.min(keys)
                                },
                            )
                        };
                    }
                    for dc in (0..hdp).step_by(NR) {
                        // SAFETY: V has nkp >= kb + KB rows of hdp; O has MR x hdp.
                        unsafe {
                            tile::<KB, 1>(
                                KB,
                                sp.as_ptr(),
                                vm.as_ptr().add(kb * hdp + dc),
                                hdp,
                                op[t * osz..].as_mut_ptr().add(dc),
                                hdp,
                                true,
                            )
                        };
                    }
                }
                kb += KB;
            }
            for i in 0..rows {
                let (t, r) = (i / MR, i % MR);
                let l = sum[t * 16 + r];
                // SAFETY: this task owns out row q0 + i, columns h*hd .. (h+1)*hd.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.add(b * a.o_batch + (q0 + i) * a.o_row + h * hd),
                        hd,
                    )
                };
                let o = &op[t * osz + r * hdp..t * osz + r * hdp + hd];
                for (d, &x) in dst.iter_mut().zip(o) {
                    *d = x / l;
                }
            }
        });
    }

    /// `out` lane `r` = `op` over the 16 lanes of `x[r]`: a butterfly of 30 shuffles and 15
    /// `op`s, all in registers (14 horizontal reductions and a gather through memory would
    /// cost more, and stall on store forwarding).
    #[inline(always)]
    unsafe fn hreduce16(x: [__m512; 16], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
        unsafe {
            let pd = _mm512_castps_pd;
            let ps = _mm512_castpd_ps;
            // Lanes 4L..4L+3 of 128-bit chunk L: pairs of rows interleaved.
            let mut x1 = [_mm512_setzero_ps(); 8];
            for (i, y) in x1.iter_mut().enumerate() {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                *y = op(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            }
            // Per chunk: four rows, each reduced over the chunk.
            let mut x2 = [_mm512_setzero_ps(); 4];
            for (i, y) in x2.iter_mut().enumerate() {
                let (c, d) = (pd(x1[2 * i]), pd(x1[2 * i + 1]));
                *y = op(ps(_mm512_unpacklo_pd(c, d)), ps(_mm512_unpackhi_pd(c, d)));
            }
            // Chunks paired up, then all four.
            let mut x3 = [_mm512_setzero_ps(); 2];
            for (i, y) in x3.iter_mut().enumerate() {
                let (e, f) = (x2[2 * i], x2[2 * i + 1]);
                *y = op(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(e, f),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(e, f),
                );
            }
            op(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x3[0], x3[1]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x3[0], x3[1]),
            )
        }
    }

    /// The online-softmax step of one tile: for each of its `MR` rows, with `valid(r)` live
    /// keys (the rest of the block's `KB` masked), updates the running max (lane `r` of `mx`)
    /// and sum (of `sum`), overwrites the scores with `p = exp(s - max)` (0 where masked) and
    /// rescales the row of O by `exp(old max - new max)`.
    #[inline(always)]
    unsafe fn softmax_tile(
        s: &mut [f32],
        o: &mut [f32],
        hdp: usize,
        mx: &mut [f32],
        sum: &mut [f32],
        valid: impl Fn(usize) -> usize,
    ) {
        unsafe {
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut masks = [[0 as __mmask16; KB / 16]; MR];
            let mut rmax = [ninf; 16];
            for r in 0..MR {
                let live = valid(r);
                let row = s.as_ptr().add(r * KB);
                let mut m = ninf;
                for (v, mk) in masks[r].iter_mut().enumerate() {
                    let c = live.saturating_sub(16 * v).min(16);
                    *mk = ((1u32 << c) - 1) as __mmask16;
                    m = _mm512_max_ps(m, _mm512_mask_load_ps(ninf, *mk, row.add(16 * v)));
                }
                rmax[r] = m;
            }
            let m_old = _mm512_loadu_ps(mx.as_ptr());
            let m_new = _mm512_max_ps(m_old, hreduce16(rmax, |a, b| _mm512_max_ps(a, b)));
            // exp(-inf) = 0 for a first block; rows still without a live key keep -inf and
            // a correction of 1 (their sum and O are 0 anyway).
            let same = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_old, m_new);
            let corr = _mm512_mask_blend_ps(
                same,
                exp512(_mm512_sub_ps(m_old, m_new)),
                _mm512_set1_ps(1.0),
            );
            _mm512_storeu_ps(mx.as_mut_ptr(), m_new);
            let mut rsum = [_mm512_setzero_ps(); 16];
            for r in 0..MR {
                let row = s.as_mut_ptr().add(r * KB);
                // Lane r of m_new, broadcast.
                let mv = _mm512_permutexvar_ps(_mm512_set1_epi32(r as i32), m_new);
                let mut acc = _mm512_setzero_ps();
                for (v, &mk) in masks[r].iter().enumerate() {
                    let x = _mm512_load_ps(row.add(16 * v));
                    let p = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(x, mv)));
                    _mm512_store_ps(row.add(16 * v), p);
                    acc = _mm512_add_ps(acc, p);
                }
                rsum[r] = acc;
            }
            let l = _mm512_fmadd_ps(
                _mm512_loadu_ps(sum.as_ptr()),
                corr,
                hreduce16(rsum, |a, b| _mm512_add_ps(a, b)),
            );
            _mm512_storeu_ps(sum.as_mut_ptr(), l);
            let rescale = !same & ((1u32 << MR) - 1) as __mmask16;
            if rescale != 0 {
                for r in 0..MR {
                    if rescale & (1 << r) != 0 {
                        let c = _mm512_permutexvar_ps(_mm512_set1_epi32(r as i32), corr);
                        let row = o.as_mut_ptr().add(r * hdp);
                        for v in 0..hdp / 16 {
                            let p = row.add(16 * v);
                            _mm512_store_ps(p, _mm512_mul_ps(_mm512_load_ps(p), c));
                        }
                    }
                }
            }
        }
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
        check_scaled(
            batch,
            heads,
            nq,
            nk,
            hd,
            causal,
            packed,
            seed,
            1.0,
            (0, 0, 1.0),
        )
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
        boost: (usize, usize, f32),
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
        let mut kv = if packed {
            qv.clone()
        } else {
            rng.vec(batch * k_batch)
        };
        // Keys boost.0 .. boost.1 scaled by boost.2 (unpacked K only): scores that jump.
        if !packed {
            for b in 0..batch {
                for j in boost.0..boost.1 {
                    let row = b * k_batch + j * k_row;
                    kv[row..row + width].iter_mut().for_each(|x| *x *= boost.2);
                }
            }
        }
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
        check_scaled(1, 2, 100, 1100, 64, false, false, 7, 60.0, (0, 0, 1.0));
        check_scaled(1, 2, 600, 600, 48, true, true, 8, 60.0, (0, 0, 1.0));
    }

    #[test]
    fn scores_that_jump_in_a_later_block() {
        // The AVX-512 path keeps the running max lazily after the first key block and redoes a
        // block exactly when a score exceeds it by more than LAZY_MAX: keys 300..310 (block 4
        // of 64) score far above the rest for many queries (by more than exp's f32 range,
        // so that skipping the redo overflows), keys 650.. (the partial last block) above.
        for (boost, sharp, seed) in [((300, 310, 12.0), 60.0, 21), ((650, 700, 3.0), 20.0, 22)] {
            check_scaled(1, 2, 60, 700, 64, false, false, seed, sharp, boost);
            check_scaled(2, 1, 300, 700, 32, true, false, seed + 10, sharp, boost);
        }
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
