//! AVX-512 f32 GEMM, BLIS style (DESIGN.md "linear"; the op is [`GemmArgs`]):
//! `C[b] = act(alpha * A[b] @ op(B[b]) + bias) + residual[b]`.
//!
//! - `op(B)` is packed once per call into panels of `NR` columns, `KC` values of k at a time
//!   (`[k chunk][panel][k][NR]`, zero-padded past `n`), shared by every thread;
//! - each task owns `MC` rows of C (and, when there are few rows, a range of panels); per
//!   chunk of k it packs its rows of `alpha * A` into `MR`-row panels (`[panel][k][MR]`,
//!   zero-padded past `m`) and runs the micro-kernel over its tiles;
//! - the micro-kernel holds an `MR x NR` tile of C in 28 zmm registers (14 rows x 2 vectors)
//!   and, per k, loads two vectors of B̃ and broadcasts 14 values of Ã; the B̃ micro-panel
//!   (`KC x NR`, 32 KiB) stays in L1 while the Ã panels stream from L2;
//! - the epilogue is fused: the first k chunk starts its accumulators from
//!   `residual + bias` (no activation) or `bias` (with one), later chunks from C; with an
//!   activation, one pass over the task's block of C applies it and adds the residual while
//!   the block is still in cache. An activation with a residual that aliases C computes into a
//!   scratch block first (the tiles would otherwise overwrite the residual).
//!
//! Summation runs in k order within each chunk and chunk after chunk; `alpha` is applied to A
//! while packing.

use super::mem::Scratch;
use super::{math, SendPtr};
use crate::backend::{Act, GemmArgs};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows of the register tile.
pub(crate) const MR: usize = 14;
/// Vectors (of 16 f32) per row of the register tile.
const NV: usize = 2;
/// Columns of the register tile.
const NR: usize = 16 * NV;
/// Values of k per packed chunk: the B̃ micro-panel (`KC x NR` f32 = 32 KiB) stays in L1.
const KC: usize = 256;
/// Rows of C per task (a multiple of `MR`): the task's Ã chunk (`MC x KC`) stays in L2.
const MC: usize = MR * 10;
/// Most panels per sub-block of a task: the sub-block of C (`MC x NC_PANELS * NR`) and its
/// B̃ chunk (`KC x NC_PANELS * NR`) stay in L2 across k chunks.
const NC_PANELS: usize = 24;
/// Rows up to which a product with B stored N x K runs as row dot products ([`run_dot`]).
const DOT_M: usize = 8;
/// Columns of C per task of [`run_dot`].
const DOT_COLS: usize = 32;
/// Rows up to which B stored K x N is read in place rather than packed.
const DIRECT_M: usize = 2 * MR;
/// Largest Ã (f32) packed once for the whole of k and kept in L2 across sub-blocks.
const A_ALL_MAX: usize = 160 * 1024;

/// Whether this CPU runs the AVX-512 path.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

thread_local! {
    /// Each thread's packed Ã chunk.
    static A_PACK: RefCell<Scratch> = const { RefCell::new(Scratch::new()) };
}

/// The packed B̃ of the last calls, reused (a concurrent call packs into its own).
static B_PACK: std::sync::Mutex<Scratch> = std::sync::Mutex::new(Scratch::new());

/// Runs the whole op.
///
/// # Safety
/// `args` passed `gemm::validate` (every element lies in live f32 memory, C overlaps no
/// operand except an exactly aliased residual), `m`, `n` and `batch` are nonzero, and the CPU
/// has AVX-512F.
pub unsafe fn run(args: &GemmArgs) {
    if args.b_trans && args.m <= DOT_M {
        // SAFETY: as the caller guarantees.
        unsafe { run_dot(args) };
        return;
    }
    let alias = args.residual.is_some_and(|r| {
        r.addr == args.c && r.ld == args.ldc && r.batch_stride == args.batch_stride_c
    });
    if alias && args.act != Act::None {
        // SAFETY: as the caller guarantees.
        unsafe { run_act_aliased(args) };
        return;
    }
    let (m, n, k) = (args.m, args.n, args.k);
    let panels = n.div_ceil(NR);
    let npad = panels * NR;
    // Distinct B matrices: one, broadcast over the batch, or one per item.
    let b_items = if args.batch_stride_b == 0 {
        1
    } else {
        args.batch
    };
    // Few rows and B stored K x N: the kernel reads B in place (each element is used by few
    // tiles, so packing would cost more than it saves).
    let direct = !args.b_trans && m <= DIRECT_M;
    let per_item = if direct { 0 } else { k * npad };
    // A constant B (a weight the model declared) is packed once and kept; anything else is
    // packed on every call into a reused scratch buffer.
    let kept = if per_item > 0 && b_items == 1 {
        constants::panels(args, npad)
    } else {
        None
    };
    // The shared scratch is held (not just borrowed) until the tasks are done; only a call
    // that packs takes it.
    let mut guard = if kept.is_none() && per_item > 0 {
        B_PACK.try_lock().ok()
    } else {
        None
    };
    let mut local = Scratch::default();
    let bp = match &kept {
        Some(p) => SendPtr(p.ptr()),
        // B is read in place.
        None if per_item == 0 => SendPtr(std::ptr::null_mut()),
        None => {
            let bpack: &mut Scratch = match guard.as_deref_mut() {
                Some(s) => s,
                None => &mut local,
            };
            let bp = bpack.get(b_items * per_item);
            // SAFETY: `bp` holds `b_items * per_item` f32, 64-byte aligned.
            unsafe { pack_all(args, b_items, npad, bp.as_mut_ptr()) };
            SendPtr(bp.as_mut_ptr())
        }
    };

    // Tasks: (batch item, block of rows, range of panels). Row blocks of about MC rows, their
    // count a multiple of the thread count when there are enough, so that every thread gets
    // the same number of rows; few rows: the panels are split between tasks too.
    let threads = rayon::current_num_threads();
    let tiles_total = m.div_ceil(MR);
    let mut m_blocks = tiles_total.div_ceil(MC / MR);
    if m_blocks >= threads {
        m_blocks = m_blocks.next_multiple_of(threads).min(tiles_total);
    }
    let want = 4 * threads;
    let n_split = if args.batch * m_blocks < want {
        want.div_ceil(args.batch * m_blocks).min(panels)
    } else {
        1
    };
    let per_split = panels.div_ceil(n_split);
    let n_split = panels.div_ceil(per_split);
    let tasks = args.batch * m_blocks * n_split;
    let run_task = |t: usize| {
        let s = t % n_split;
        let ib = (t / n_split) % m_blocks;
        let bi = t / (n_split * m_blocks);
        let rows =
            (ib * tiles_total / m_blocks * MR)..m.min((ib + 1) * tiles_total / m_blocks * MR);
        let pans = s * per_split..panels.min((s + 1) * per_split);
        let item = if b_items == 1 { 0 } else { bi };
        let b = if direct {
            B::Direct(unsafe { (args.b as *const f32).add(item * args.batch_stride_b) })
        } else {
            B::Packed(unsafe { bp.add(item * per_item) }, npad)
        };
        // SAFETY: tasks write disjoint blocks of C; B̃ is complete and read-only now.
        unsafe { task(args, bi, rows, pans, b) };
    };
    if tasks == 1 {
        run_task(0);
    } else {
        (0..tasks).into_par_iter().for_each(run_task);
    }
}

/// Few rows with B stored N x K (the decoder's token linears, a few tokens against a weight
/// matrix): each C element is a dot product of a row of A and a row of B, both contiguous in
/// k, so B streams from memory once and unpacked. Tasks own blocks of `DOT_COLS` columns.
///
/// # Safety
/// As [`run`], with `b_trans` and `m <= DOT_M`.
unsafe fn run_dot(args: &GemmArgs) {
    let blocks = args.n.div_ceil(DOT_COLS);
    let tasks = args.batch * blocks;
    let body = |t: usize| {
        let (bi, jb) = (t / blocks, t % blocks);
        let cols = jb * DOT_COLS..args.n.min((jb + 1) * DOT_COLS);
        // SAFETY: tasks write disjoint columns of C; the operands are validated.
        unsafe {
            match args.m {
                1 => dot_block::<1>(args, bi, cols),
                2 => dot_block::<2>(args, bi, cols),
                3 => dot_block::<3>(args, bi, cols),
                4 => dot_block::<4>(args, bi, cols),
                5 => dot_block::<5>(args, bi, cols),
                6 => dot_block::<6>(args, bi, cols),
                7 => dot_block::<7>(args, bi, cols),
                _ => dot_block::<8>(args, bi, cols),
            }
        }
    };
    if tasks == 1 {
        body(0);
    } else {
        (0..tasks).into_par_iter().for_each(body);
    }
}

/// Columns `cols` of batch item `bi` for `M = m` rows: `C[i][j] = act(alpha * A[i]·B[j] +
/// bias[j]) + residual[i][j]` (the residual read before C is written, so it may alias).
///
/// # Safety
/// As [`run_dot`]; `M == args.m`.
#[target_feature(enable = "avx512f")]
unsafe fn dot_block<const M: usize>(args: &GemmArgs, bi: usize, cols: std::ops::Range<usize>) {
    let k = args.k;
    // SAFETY (whole function): every offset lies in the ranges `gemm::validate` checked.
    unsafe {
        let a = (args.a as *const f32).add(bi * args.batch_stride_a);
        let b = (args.b as *const f32).add(bi * args.batch_stride_b);
        let c = (args.c as *mut f32).add(bi * args.batch_stride_c);
        let res = args
            .residual
            .map(|r| ((r.addr as *const f32).add(bi * r.batch_stride), r.ld));
        let tail = ((1u32 << (k % 16)) - 1) as __mmask16;
        for j in cols {
            let brow = b.add(j * args.ldb);
            let mut acc = [_mm512_setzero_ps(); M];
            let mut kk = 0;
            while kk + 16 <= k {
                let bv = _mm512_loadu_ps(brow.add(kk));
                for (i, s) in acc.iter_mut().enumerate() {
                    *s = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i * args.lda + kk)), bv, *s);
                }
                kk += 16;
            }
            if kk < k {
                let bv = _mm512_maskz_loadu_ps(tail, brow.add(kk));
                for (i, s) in acc.iter_mut().enumerate() {
                    let av = _mm512_maskz_loadu_ps(tail, a.add(i * args.lda + kk));
                    *s = _mm512_fmadd_ps(av, bv, *s);
                }
            }
            for (i, s) in acc.iter().enumerate() {
                let mut v = args.alpha * _mm512_reduce_add_ps(*s);
                if let Some(bias) = args.bias {
                    v += *(bias as *const f32).add(j);
                }
                v = math::act(v, args.act);
                if let Some((r, ld)) = res {
                    v += *r.add(i * ld + j);
                }
                *c.add(i * args.ldc + j) = v;
            }
        }
    }
}

/// An activation with a residual that aliases C: `T = act(alpha A op(B) + bias)` into scratch,
/// then `C += T` (the tiles overwrite C before the activation pass could read the residual).
unsafe fn run_act_aliased(args: &GemmArgs) {
    let (m, n) = (args.m, args.n);
    let mut t = vec![0f32; args.batch * m * n];
    let targs = GemmArgs {
        c: t.as_mut_ptr() as u64,
        ldc: n,
        batch_stride_c: m * n,
        residual: None,
        ..*args
    };
    // SAFETY: the scratch is a fresh, disjoint C with the layout given.
    unsafe { run(&targs) };
    let c = SendPtr(args.c as *mut f32);
    t.par_chunks(n).enumerate().for_each(|(r, src)| {
        let (b, i) = (r / m, r % m);
        // SAFETY: row i of batch item b of C lies in validated memory; rows are disjoint.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(c.add(b * args.batch_stride_c + i * args.ldc), n)
        };
        add_rows(dst, src);
    });
}

/// Where a task reads B from.
#[derive(Clone, Copy)]
enum B {
    /// Packed B̃ of the item, and its padded width.
    Packed(*const f32, usize),
    /// B of the item itself (K x N, row stride `ldb`).
    Direct(*const f32),
}

/// One task: rows `rows` of C, panels `pans`, of batch item `bi`, in sub-blocks of at most
/// `NC_PANELS` panels. With several sub-blocks, Ã is packed for the whole of k once when it
/// fits in `A_ALL_MAX` f32, else per sub-block and k chunk.
///
/// # Safety
/// As [`run`]; `bsrc` is this item's B (packed and complete, or in place); no other task
/// touches this block of C.
#[target_feature(enable = "avx512f")]
unsafe fn task(
    args: &GemmArgs,
    bi: usize,
    rows: std::ops::Range<usize>,
    pans: std::ops::Range<usize>,
    bsrc: B,
) {
    let k = args.k;
    let n = args.n;
    let mrows = rows.len();
    let tiles = mrows.div_ceil(MR);
    let (ldc, lda) = (args.ldc, args.lda);
    // SAFETY (whole function): offsets stay inside the ranges validated by the caller.
    let a = unsafe { (args.a as *const f32).add(bi * args.batch_stride_a + rows.start * lda) };
    let c = unsafe { (args.c as *mut f32).add(bi * args.batch_stride_c + rows.start * ldc) };
    let bias = args.bias.map_or(std::ptr::null(), |p| p as *const f32);
    // The residual that seeds the accumulators (no activation), and the one added after the
    // activation (never aliased here: `run` diverts that case).
    let res = args.residual.map(|r| {
        let p = unsafe { (r.addr as *const f32).add(bi * r.batch_stride + rows.start * r.ld) };
        (p, r.ld)
    });
    let (seed_res, post_res) = if args.act == Act::None {
        (res, None)
    } else {
        (None, res)
    };
    let chunks = k.div_ceil(KC).max(1);
    let subs = pans.len().div_ceil(NC_PANELS);
    let pack_all = subs > 1 && tiles * MR * k <= A_ALL_MAX;
    // Ã chunk pc (k0 = pc * KC) starts at tiles * MR * k0 when packed whole, else at 0.
    let pack = |ap: *mut f32, pc: usize| {
        let k0 = pc * KC;
        let kc = KC.min(k - k0.min(k));
        let base = if pack_all { tiles * MR * k0 } else { 0 };
        for t in 0..tiles {
            let r = MR.min(mrows - t * MR);
            let next = if t + 1 < tiles {
                MR.min(mrows - (t + 1) * MR)
            } else {
                0
            };
            // SAFETY: rows t*MR.. of the block and k0..k0+kc lie in A; the panel lies in the
            // scratch.
            unsafe {
                pack_a(
                    a.add(t * MR * lda + k0),
                    lda,
                    r,
                    kc,
                    args.alpha,
                    ap.add(base + t * MR * kc),
                    next,
                )
            };
        }
    };
    A_PACK.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let len = if pack_all {
            tiles * MR * k
        } else {
            tiles * MR * KC.min(k)
        };
        let ap = scratch.get(len.max(1)).as_mut_ptr();
        if pack_all {
            for pc in 0..chunks {
                pack(ap, pc);
            }
        }
        for sub in 0..subs {
            let p0 = pans.start + sub * NC_PANELS;
            let p1 = pans.end.min(p0 + NC_PANELS);
            for pc in 0..chunks {
                let k0 = pc * KC;
                let kc = KC.min(k - k0.min(k));
                if !pack_all {
                    pack(ap, pc);
                }
                let achunk = if pack_all {
                    unsafe { ap.add(tiles * MR * k0) }
                } else {
                    ap
                };
                for p in p0..p1 {
                    let j0 = p * NR;
                    let cols = NR.min(n - j0);
                    let masks = col_masks(cols);
                    // The panel (kc x NR from row k0), its stride per k, and the next panel,
                    // which the first tile pulls into L2.
                    let (bpanel, ldbk, next_panel) = match bsrc {
                        B::Packed(bp, npad) => {
                            let panel = unsafe { bp.add(k0 * npad + p * kc * NR) };
                            let next = if p + 1 < p1 {
                                panel.wrapping_add(kc * NR)
                            } else {
                                panel
                            };
                            (panel, NR, next)
                        }
                        B::Direct(b) => {
                            let panel = unsafe { b.add(k0 * args.ldb + j0) };
                            (panel, args.ldb, panel.wrapping_add(NR))
                        }
                    };
                    for t in 0..tiles {
                        let i0 = t * MR;
                        let r = MR.min(mrows - i0);
                        let seed = if pc > 0 {
                            Seed::C
                        } else {
                            Seed::Init {
                                bias: if bias.is_null() {
                                    bias
                                } else {
                                    unsafe { bias.add(j0) }
                                },
                                res: seed_res.map_or((std::ptr::null(), 0), |(p, ld)| unsafe {
                                    (p.add(i0 * ld + j0), ld)
                                }),
                            }
                        };
                        // The C tile of the next call, fetched while this one computes.
                        let next_c = if t + 1 < tiles {
                            c.wrapping_add((i0 + MR) * ldc + j0)
                        } else {
                            c.wrapping_add(j0 + NR)
                        };
                        let a_t = unsafe { achunk.add(i0 * kc) };
                        let c_t = unsafe { c.add(i0 * ldc + j0) };
                        let tile = Tile {
                            kc,
                            ldbk,
                            ldc,
                            rows: r,
                            masks,
                            seed,
                            next_b: next_panel,
                            next_c,
                        };
                        // SAFETY: the tile lies in this task's block of C; the panel holds kc
                        // rows of k.
                        unsafe {
                            match (t == 0, matches!(bsrc, B::Direct(_))) {
                                (true, false) => kernel::<true, false>(a_t, bpanel, c_t, &tile),
                                (false, false) => kernel::<false, false>(a_t, bpanel, c_t, &tile),
                                (true, true) => kernel::<true, true>(a_t, bpanel, c_t, &tile),
                                (false, true) => kernel::<false, true>(a_t, bpanel, c_t, &tile),
                            }
                        };
                    }
                }
            }
            // The activation pass over the sub-block, still in L2.
            if args.act != Act::None {
                let j0 = p0 * NR;
                let j1 = n.min(p1 * NR);
                for i in 0..mrows {
                    // SAFETY: row i of the block, columns j0..j1, belong to this task.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc + j0), j1 - j0) };
                    math::act_slice(row, args.act);
                    if let Some((p, ld)) = post_res {
                        let r = unsafe { std::slice::from_raw_parts(p.add(i * ld + j0), j1 - j0) };
                        add_rows(row, r);
                    }
                }
            }
        }
    });
}

/// Lane masks for the `NV` vectors of a tile row with `cols` valid columns.
#[inline(always)]
fn col_masks(cols: usize) -> [__mmask16; NV] {
    let mut m = [0; NV];
    for (v, mk) in m.iter_mut().enumerate() {
        let c = cols.saturating_sub(16 * v).min(16);
        *mk = ((1u32 << c) - 1) as __mmask16;
    }
    m
}

/// How a tile's accumulators start.
#[derive(Clone, Copy)]
enum Seed {
    /// From C (a later k chunk).
    C,
    /// From `res + bias` (either may be null; `res` is a pointer and its row stride).
    Init {
        bias: *const f32,
        res: (*const f32, usize),
    },
}

/// The scalar arguments of one [`kernel`] call.
struct Tile {
    /// Values of k.
    kc: usize,
    /// Row stride of B per k: `NR` when packed, `ldb` in place.
    ldbk: usize,
    ldc: usize,
    /// Rows of C written (the packed Ã has `MR`).
    rows: usize,
    /// Columns of C written, per vector.
    masks: [__mmask16; NV],
    seed: Seed,
    /// Prefetched (with `PF_B`) into L2: `kc` rows of `NR` f32, stride `ldbk`.
    next_b: *const f32,
    /// Prefetched into L1: the `MR x NR` tile, stride `ldc`.
    next_c: *const f32,
}

/// `C[r][0..cols] = seed + Σ_k Ã[k][r] B[k][..]` for `r < rows`, the columns given by `masks`,
/// with B packed (64-byte aligned, zero-padded, read whole) or in place (`DIRECT`: read under
/// the column masks).
///
/// # Safety
/// `a` holds `kc x MR` f32; `b` holds `kc` rows (stride `ldbk`) of `NR` f32, or of the masked
/// columns when `DIRECT`; the tile rows and masked columns of `c` (and of the seed operands)
/// lie in live memory. The prefetch addresses need not be valid.
#[inline(always)]
unsafe fn kernel<const PF_B: bool, const DIRECT: bool>(
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    t: &Tile,
) {
    let (kc, ldbk, ldc, rows, masks, seed) = (t.kc, t.ldbk, t.ldc, t.rows, t.masks, t.seed);
    unsafe {
        for r in 0..MR {
            let p = t.next_c.wrapping_add(r * ldc);
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(NR - 1) as *const i8);
        }
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        match seed {
            Seed::C => {
                for (r, row) in acc.iter_mut().enumerate().take(rows) {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + 16 * v));
                    }
                }
            }
            Seed::Init { bias, res } => {
                if !res.0.is_null() {
                    for (r, row) in acc.iter_mut().enumerate().take(rows) {
                        for (v, x) in row.iter_mut().enumerate() {
                            *x = _mm512_maskz_loadu_ps(masks[v], res.0.add(r * res.1 + 16 * v));
                        }
                    }
                }
                if !bias.is_null() {
                    for v in 0..NV {
                        let bv = _mm512_maskz_loadu_ps(masks[v], bias.add(16 * v));
                        for row in acc.iter_mut() {
                            row[v] = _mm512_add_ps(row[v], bv);
                        }
                    }
                }
            }
        }
        let mut a = a;
        let mut b = b;
        let mut pf = t.next_b;
        for _ in 0..kc {
            if PF_B {
                _mm_prefetch::<_MM_HINT_T1>(pf as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(NR - 1) as *const i8);
                pf = pf.wrapping_add(ldbk);
            }
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = if DIRECT {
                    _mm512_maskz_loadu_ps(masks[v], b.add(16 * v))
                } else {
                    _mm512_load_ps(b.add(16 * v))
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r));
                for (y, bb) in row.iter_mut().zip(&bv) {
                    *y = _mm512_fmadd_ps(x, *bb, *y);
                }
            }
            a = a.add(MR);
            b = b.add(ldbk);
        }
        for (r, row) in acc.iter().enumerate().take(rows) {
            for (v, x) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], *x);
            }
        }
    }
}

/// 16 x 16 transpose: `out[c]` lane `r` = `x[r]` lane `c`.
#[inline(always)]
pub(crate) unsafe fn transpose16(x: [__m512; 16]) -> [__m512; 16] {
    unsafe {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        for i in 0..4 {
            u[4 * i] = ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
            u[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
            u[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
            u[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
        }
        // u[4i + j], 128-bit lane L = rows 4i..4i+3 at column 4L + j.
        let mut out = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let xlo = _mm512_shuffle_f32x4::<0x44>(u[j], u[4 + j]);
            let xhi = _mm512_shuffle_f32x4::<0xEE>(u[j], u[4 + j]);
            let ylo = _mm512_shuffle_f32x4::<0x44>(u[8 + j], u[12 + j]);
            let yhi = _mm512_shuffle_f32x4::<0xEE>(u[8 + j], u[12 + j]);
            out[j] = _mm512_shuffle_f32x4::<0x88>(xlo, ylo);
            out[4 + j] = _mm512_shuffle_f32x4::<0xDD>(xlo, ylo);
            out[8 + j] = _mm512_shuffle_f32x4::<0x88>(xhi, yhi);
            out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(xhi, yhi);
        }
        out
    }
}

/// Packs `rows <= MR` rows of `alpha * A` (row stride `lda`), `kc` values of k from `a`, into
/// `out[k][MR]`, rows past `rows` zero; prefetches the same columns of the `next_rows` rows
/// that follow (the next tile).
///
/// # Safety
/// The source rows lie in live memory; `out` has room for `kc * MR` f32.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack_a(
    a: *const f32,
    lda: usize,
    rows: usize,
    kc: usize,
    alpha: f32,
    out: *mut f32,
    next_rows: usize,
) {
    unsafe {
        let al = _mm512_set1_ps(alpha);
        let mut k0 = 0;
        while k0 < kc {
            let w = 16.min(kc - k0);
            let km = ((1u32 << w) - 1) as __mmask16;
            for r in 0..next_rows {
                let p = a.wrapping_add((MR + r) * lda + k0);
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
            }
            let mut x = [_mm512_setzero_ps(); 16];
            for (r, v) in x.iter_mut().enumerate().take(rows) {
                *v = _mm512_maskz_loadu_ps(km, a.add(r * lda + k0));
                if alpha != 1.0 {
                    *v = _mm512_mul_ps(*v, al);
                }
            }
            let y = transpose16(x);
            // Each store writes MR lanes (the other two fall on the next k, rewritten next).
            for (j, v) in y.iter().enumerate().take(w) {
                _mm512_mask_storeu_ps(out.add((k0 + j) * MR), 0x3fff, *v);
            }
            k0 += 16;
        }
    }
}

/// Packs `op(B)` of every one of `b_items` batch items into `dst` (`k * npad` f32 per item).
///
/// # Safety
/// As [`run`]; `dst` holds `b_items * k * npad` f32, 64-byte aligned.
unsafe fn pack_all(args: &GemmArgs, b_items: usize, npad: usize, dst: *mut f32) {
    let panels = npad / NR;
    let per_item = args.k * npad;
    let bsrc = SendPtr(args.b as *mut f32);
    let dst = SendPtr(dst);
    // One task per (item, panel): the panel's source is a few contiguous KiB per row of k,
    // read front to back.
    (0..b_items * panels).into_par_iter().for_each(|t| {
        let (item, p) = (t / panels, t % panels);
        // SAFETY: each task writes only its panel's slots of the packing buffer; the source
        // lies in the validated B range.
        unsafe {
            pack_b(
                args,
                bsrc.add(item * args.batch_stride_b),
                p,
                npad,
                dst.add(item * per_item),
            )
        };
    });
}

/// Packed panels of constant weights ([`crate::backend::Backend::retain_constant`]).
///
/// The CPU backend is stateless (`CpuBackend` is `Copy`), so the registry is per process:
/// the model retains its weight tensors when it loads and releases them when it is dropped.
/// A GEMM whose `b` is the start of a retained tensor, read whole or in part, finds its
/// panels here (packed by the first call with that shape); the panels of the full-size
/// image encoder and decoder take ~0.37 GB beside the weights themselves.
pub(crate) mod constants {
    use super::{pack_all, GemmArgs, Scratch};
    use parking_lot::RwLock;
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock};

    /// The shape of a packed `op(B)`: address, k, n, ldb, whether B is stored N x K.
    type Key = (u64, usize, usize, usize, bool);

    /// One weight's packed `op(B)`.
    pub(crate) struct Panels {
        _buf: Scratch,
        ptr: *mut f32,
        len: usize,
    }

    // SAFETY: written once before it is shared, read-only afterwards.
    unsafe impl Send for Panels {}
    unsafe impl Sync for Panels {}

    impl Panels {
        pub(crate) fn ptr(&self) -> *mut f32 {
            self.ptr
        }
    }

    #[derive(Default)]
    struct Registry {
        /// Retained tensors: start address → (bytes, retain count).
        regions: HashMap<u64, (usize, usize)>,
        panels: HashMap<Key, Arc<Panels>>,
    }

    static REGISTRY: LazyLock<RwLock<Registry>> = LazyLock::new(Default::default);

    pub(crate) fn retain(addr: u64, bytes: usize) {
        let mut r = REGISTRY.write();
        let e = r.regions.entry(addr).or_insert((bytes, 0));
        e.0 = e.0.max(bytes);
        e.1 += 1;
    }

    pub(crate) fn release(addr: u64) {
        let mut r = REGISTRY.write();
        let gone = match r.regions.get_mut(&addr) {
            Some(e) => {
                e.1 -= 1;
                e.1 == 0
            }
            None => false,
        };
        if gone {
            r.regions.remove(&addr);
            r.panels.retain(|k, _| k.0 != addr);
        }
    }

    /// Bytes of packed panels held now.
    pub fn bytes() -> usize {
        REGISTRY.read().panels.values().map(|p| p.len * 4).sum()
    }

    /// The packed `op(B)` of a retained weight (packing it on first use), or `None` when `b`
    /// is not one.
    ///
    /// # Safety
    /// As [`super::run`], with one B for the whole batch.
    pub(crate) unsafe fn panels(args: &GemmArgs, npad: usize) -> Option<Arc<Panels>> {
        let key = (args.b, args.k, args.n, args.ldb, args.b_trans);
        let (rows, cols) = if args.b_trans {
            (args.n, args.k)
        } else {
            (args.k, args.n)
        };
        let extent = ((rows - 1) * args.ldb + cols) * 4;
        {
            let r = REGISTRY.read();
            if r.regions
                .get(&args.b)
                .is_none_or(|&(bytes, _)| extent > bytes)
            {
                return None;
            }
            if let Some(p) = r.panels.get(&key) {
                return Some(p.clone());
            }
        }
        let len = args.k * npad;
        let mut buf = Scratch::new();
        let ptr = buf.get(len).as_mut_ptr();
        // SAFETY: `ptr` holds `k * npad` f32, 64-byte aligned; B is validated.
        unsafe { pack_all(args, 1, npad, ptr) };
        let p = Arc::new(Panels {
            _buf: buf,
            ptr,
            len,
        });
        let mut r = REGISTRY.write();
        // Released meanwhile: use the panels for this call only.
        if !r.regions.contains_key(&args.b) {
            return Some(p);
        }
        Some(r.panels.entry(key).or_insert(p).clone())
    }
}

/// Distance (f32) of the software prefetch ahead along a row of B being packed (weights
/// come from DRAM: about 250 ns ahead).
const PF_AHEAD: usize = 256;

/// Packs panel `p` (columns `p*NR..p*NR+NR` of `op(B)`, zero past `n`) for every k into its
/// slots of `out` (`[k chunk][panel][k][NR]`, row stride `npad` between chunks).
///
/// # Safety
/// `b` is this batch item's B; `out` is this item's packing buffer (`k * npad` f32, 64-byte
/// aligned).
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(args: &GemmArgs, b: *const f32, p: usize, npad: usize, out: *mut f32) {
    unsafe {
        let k = args.k;
        let j0 = p * NR;
        let cols = NR.min(args.n - j0);
        let ldb = args.ldb;
        // Start of row kk (a multiple of 16, so never straddling a chunk) of this panel.
        let slot = |kk: usize| {
            let k0 = kk / KC * KC;
            let kc = KC.min(k - k0);
            out.add(k0 * npad + p * kc * NR + (kk - k0) * NR)
        };
        if !args.b_trans {
            let masks = col_masks(cols);
            for kk in 0..k {
                let src = b.add(kk * ldb + j0);
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(8 * ldb) as *const i8);
                let dst = slot(kk / 16 * 16).add(kk % 16 * NR);
                for (v, &mk) in masks.iter().enumerate() {
                    _mm512_store_ps(dst.add(16 * v), _mm512_maskz_loadu_ps(mk, src.add(16 * v)));
                }
            }
            return;
        }
        // B is N x K: row j of the stored matrix holds column j of op(B); 16 rows at a time
        // are read front to back and transposed in 16 x 16 blocks.
        for v in 0..NV {
            let jv = j0 + 16 * v;
            let live = cols.saturating_sub(16 * v).min(16);
            let mut kk = 0;
            while kk < k {
                let w = 16.min(k - kk);
                let km = ((1u32 << w) - 1) as __mmask16;
                for j in 0..live {
                    let pf = b.wrapping_add((jv + j) * ldb + kk + PF_AHEAD);
                    _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
                }
                let mut x = [_mm512_setzero_ps(); 16];
                for (j, xv) in x.iter_mut().enumerate().take(live) {
                    *xv = _mm512_maskz_loadu_ps(km, b.add((jv + j) * ldb + kk));
                }
                let y = transpose16(x);
                let dst = slot(kk);
                for (e, yv) in y.iter().enumerate().take(w) {
                    _mm512_store_ps(dst.add(e * NR + 16 * v), *yv);
                }
                kk += 16;
            }
        }
    }
}

#[inline(always)]
fn add_rows_body(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

math::multiversion! {
    /// `x += y` elementwise.
    fn add_rows(x: &mut [f32], y: &[f32]) => add_rows_body;
}
