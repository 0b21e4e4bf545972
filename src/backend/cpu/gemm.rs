//! Batched GEMM with the fused epilogue of [`GemmArgs`] (DESIGN.md, "linear"):
//! `C[b] = act(alpha * A[b] @ op(B[b]) + bias) + residual[b]`, f32.
//!
//! The product runs on the `gemm` crate (AVX-512 micro-kernels), single-threaded per block of C:
//! large products are split into one block of rows per rayon thread, small ones run whole batch
//! items as tasks. The epilogue is arranged around each block's product: without an activation,
//! bias and residual are loaded into C first and the product is accumulated onto them; with an
//! activation, the bias is loaded first and one pass applies the activation and adds the
//! residual while the block is still in cache.

use super::{bad_args, check_addr, math};
use crate::backend::{Act, GemmArgs};
use crate::error::Result;
use gemm::Parallelism;
use rayon::prelude::*;

const OP: &str = "gemm";

/// Below this many multiply-adds per batch item, batch items run in parallel, each on one
/// thread; above it, items run one after the other, each split between all threads.
const SMALL_WORK: usize = 1 << 21;

fn validate(a: &GemmArgs) -> Result<()> {
    let (m, n, k) = (a.m, a.n, a.k);
    if a.lda < k && m > 1 {
        return Err(bad_args(OP, format!("lda {} < k {k}", a.lda)));
    }
    if a.b_trans {
        if a.ldb < k && n > 1 {
            return Err(bad_args(OP, format!("ldb {} < k {k} (B is N x K)", a.ldb)));
        }
    } else if a.ldb < n && k > 1 {
        return Err(bad_args(OP, format!("ldb {} < n {n} (B is K x N)", a.ldb)));
    }
    if a.ldc < n && m > 1 {
        return Err(bad_args(OP, format!("ldc {} < n {n}", a.ldc)));
    }
    if a.batch > 1 && a.batch_stride_c == 0 {
        return Err(bad_args(OP, "batch_stride_c is 0 with batch > 1"));
    }
    let span = |rows: usize, ld: usize, bs: usize, cols: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (a.batch - 1) * bs + (rows - 1) * ld + cols
        }
    };
    check_addr::<f32>(OP, "a", a.a, span(m, a.lda, a.batch_stride_a, k))?;
    let (brows, bcols) = if a.b_trans { (n, k) } else { (k, n) };
    check_addr::<f32>(OP, "b", a.b, span(brows, a.ldb, a.batch_stride_b, bcols))?;
    check_addr::<f32>(OP, "c", a.c, span(m, a.ldc, a.batch_stride_c, n))?;
    if let Some(bias) = a.bias {
        check_addr::<f32>(OP, "bias", bias, n)?;
    }
    if let Some(r) = a.residual {
        // ld 0 broadcasts one residual row over every row (the text similarity, spec §4.5).
        if r.ld != 0 && r.ld < n && m > 1 {
            return Err(bad_args(OP, format!("residual ld {} < n {n}", r.ld)));
        }
        let alias = r.addr == a.c && r.ld == a.ldc && r.batch_stride == a.batch_stride_c;
        if r.addr == a.c && !alias {
            return Err(bad_args(
                OP,
                "residual starts at c but with a different layout (only exact aliasing is allowed)",
            ));
        }
        check_addr::<f32>(OP, "residual", r.addr, span(m, r.ld, r.batch_stride, n))?;
    }
    Ok(())
}

/// Runs one GEMM with its epilogue; see [`GemmArgs`] for the element addresses.
///
/// # Safety
/// Every element the arguments describe must lie in live f32 memory; `c` must not overlap `a`,
/// `b` or `bias`, and may coincide with the residual only exactly (same address, `ld` and
/// batch stride).
pub unsafe fn gemm_f32(args: &GemmArgs) -> Result<()> {
    if args.batch == 0 || args.m == 0 || args.n == 0 {
        return Ok(());
    }
    validate(args)?;
    #[cfg(target_arch = "x86_64")]
    if super::sgemm::available() {
        // SAFETY: validated above; the CPU has AVX-512F.
        unsafe { super::sgemm::run(args) };
        return Ok(());
    }
    // SAFETY: validated above.
    unsafe { gemm_portable(args) };
    Ok(())
}

/// The portable path: the `gemm` crate per block of C.
///
/// # Safety
/// As [`gemm_f32`], with the arguments validated and `m`, `n`, `batch` nonzero.
unsafe fn gemm_portable(args: &GemmArgs) {
    let (m, n) = (args.m, args.n);
    let work = m.saturating_mul(n).saturating_mul(args.k.max(1));
    let threads = rayon::current_num_threads();
    if work < SMALL_WORK || threads == 1 {
        // Small products: whole batch items as tasks (on the calling thread when batch = 1).
        if args.batch == 1 {
            // SAFETY: as the caller guarantees.
            unsafe { gemm_block(args, 0, 0..m, 0..n) };
            return;
        }
        (0..args.batch).into_par_iter().for_each(|b| {
            // SAFETY: batch items write disjoint C blocks (batch_stride_c != 0, checked).
            unsafe { gemm_block(args, b, 0..m, 0..n) }
        });
        return;
    }
    // Large products: one block of rows (or, for few rows, of columns) per thread, each a
    // single-threaded product with its own prologue and epilogue, so that the epilogue finds
    // its block still in cache. (Measured faster than the gemm crate's own threading for the
    // ViT shapes: 2048 x 768 x 3072 goes from 240 to 275 GFLOP/s on 2 cores.)
    let by_rows = m >= MIN_SPLIT * threads || m >= n;
    let len = if by_rows { m } else { n };
    let parts = threads.min(len.div_ceil(MIN_SPLIT)).max(1);
    let step = len.div_ceil(parts);
    for b in 0..args.batch {
        (0..parts).into_par_iter().for_each(|p| {
            let r = p * step..((p + 1) * step).min(len);
            // SAFETY: the blocks partition C.
            unsafe {
                if by_rows {
                    gemm_block(args, b, r, 0..n)
                } else {
                    gemm_block(args, b, 0..m, r)
                }
            }
        });
    }
}

/// Rows (or columns) of C below which a product is not split further between threads.
const MIN_SPLIT: usize = 64;

/// `C = beta * A @ op(B) (+ C if read_dst)` for the block `rows x cols` of one batch item:
/// single-threaded, pointers already at the block.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    args: &GemmArgs,
    m: usize,
    n: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    read_dst: bool,
) {
    let k = args.k;
    if k == 0 {
        if !read_dst {
            for i in 0..m {
                // SAFETY: row i of the C block lies in memory the caller provided.
                unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, n) };
            }
        }
        return;
    }
    let (rhs_cs, rhs_rs) = if args.b_trans {
        (args.ldb as isize, 1)
    } else {
        (1, args.ldb as isize)
    };
    // SAFETY: the strides describe memory the caller guarantees; dst is disjoint from lhs/rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            read_dst,
            a,
            1,
            args.lda as isize,
            b,
            rhs_cs,
            rhs_rs,
            1.0f32,
            args.alpha,
            false,
            false,
            false,
            Parallelism::None,
        )
    };
}

/// The whole op for the C block `rows x cols` of batch item `bi`, on the calling thread:
/// prologue (bias / residual loaded into C), product, epilogue (activation, residual).
unsafe fn gemm_block(
    args: &GemmArgs,
    bi: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    let (m, n) = (rows.len(), cols.len());
    if m == 0 || n == 0 {
        return;
    }
    let (i0, j0) = (rows.start, cols.start);
    let ldc = args.ldc;
    // SAFETY (whole function): offsets stay inside the ranges validated in `validate`, which
    // the caller guarantees are live; the block of C is written by this call only.
    let a = unsafe { (args.a as *const f32).add(bi * args.batch_stride_a + i0 * args.lda) };
    let b = unsafe {
        let off = if args.b_trans { j0 * args.ldb } else { j0 };
        (args.b as *const f32).add(bi * args.batch_stride_b + off)
    };
    let c = unsafe { (args.c as *mut f32).add(bi * args.batch_stride_c + i0 * ldc + j0) };
    let alias = args
        .residual
        .is_some_and(|r| r.addr == args.c && r.ld == ldc && r.batch_stride == args.batch_stride_c);
    let res = args.residual.map(|r| {
        let p = unsafe { (r.addr as *const f32).add(bi * r.batch_stride + i0 * r.ld + j0) };
        (p, r.ld)
    });
    let bias = args
        .bias
        .map(|p| unsafe { std::slice::from_raw_parts((p as *const f32).add(j0), n) });
    let row = |p: *mut f32, ld: usize, i: usize| unsafe {
        std::slice::from_raw_parts_mut(p.add(i * ld), n)
    };
    let row_ro = |p: *const f32, ld: usize, i: usize| unsafe {
        std::slice::from_raw_parts(p.add(i * ld), n)
    };

    if args.act == Act::None {
        // C = (residual + bias) + alpha * A @ op(B).
        let mut read_dst = alias;
        if let Some((r, ldr)) = res.filter(|_| !alias) {
            for i in 0..m {
                row(c, ldc, i).copy_from_slice(row_ro(r, ldr, i));
            }
            read_dst = true;
        }
        if let Some(bv) = bias {
            for i in 0..m {
                let ci = row(c, ldc, i);
                if read_dst {
                    add_into(ci, bv);
                } else {
                    ci.copy_from_slice(bv);
                }
            }
            read_dst = true;
        }
        unsafe { product(args, m, n, a, b, c, ldc, read_dst) };
        return;
    }

    // With an activation: T = alpha * A @ op(B) + bias, then C = act(T) + residual. When the
    // residual is C itself, T goes to a scratch block first.
    let mut scratch = Vec::new();
    let (t, ldt) = if alias {
        scratch.resize(m * n, 0f32);
        (scratch.as_mut_ptr(), n)
    } else {
        (c, ldc)
    };
    if let Some(bv) = bias {
        for i in 0..m {
            row(t, ldt, i).copy_from_slice(bv);
        }
    }
    unsafe { product(args, m, n, a, b, t, ldt, bias.is_some()) };
    for i in 0..m {
        let ti = row(t, ldt, i);
        math::act_slice(ti, args.act);
        if alias {
            add_into(row(c, ldc, i), ti);
        } else if let Some((r, ldr)) = res {
            add_into(ti, row_ro(r, ldr, i));
        }
    }
}

#[inline(always)]
fn add_into_body(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

math::multiversion! {
    /// `x += y` elementwise.
    fn add_into(x: &mut [f32], y: &[f32]) => add_into_body;
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::CpuBackend;
    use super::*;
    use crate::backend::{Backend, Residual};

    /// Element offsets and a naive f64 reference for one configuration.
    struct Case {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        b_trans: bool,
        bcast_b: bool,
        bias: bool,
        act: Act,
        residual: Option<bool>, // Some(true): aliases C; Some(false): separate (broadcast)
        alpha: f32,
        pad: usize,
    }

    /// Runs `c` through the dispatcher (the AVX-512 path where the CPU has it) and through the
    /// portable path, checking both against the f64 reference.
    fn run(c: &Case, seed: u64) {
        run_as(c, seed, false, false);
        run_as(c, seed, true, false);
    }

    /// One run of `c`: `portable` calls the `gemm` crate path directly; `res_ld0` makes the
    /// separate residual one row added to every row (ld 0).
    fn run_as(c: &Case, seed: u64, portable: bool, res_ld0: bool) {
        let be = CpuBackend::new();
        let mut rng = Rng(seed);
        let (m, n, k) = (c.m, c.n, c.k);
        let lda = k + c.pad;
        let ldb = if c.b_trans { k + 2 * c.pad } else { n + c.pad };
        let ldc = n + 3 * c.pad;
        let bsa = m * lda + c.pad;
        let brows = if c.b_trans { n } else { k };
        let bsb = if c.bcast_b { 0 } else { brows * ldb + 1 };
        let bsc = m * ldc + 5;
        let av = rng.vec(c.batch * bsa);
        let bv = rng.vec(c.batch.max(1) * brows * ldb + c.batch);
        let biasv = rng.vec(n);
        let c0 = rng.vec(c.batch * bsc);
        // Separate residual: broadcast over the batch with its own ld.
        let ldr = n + 1;
        let rv = rng.vec(m * ldr);
        let (ab, bb, cb, biasb, rb) = (
            buf(&be, &av),
            buf(&be, &bv),
            buf(&be, &c0),
            buf(&be, &biasv),
            buf(&be, &rv),
        );
        let residual = c.residual.map(|alias| {
            if alias {
                Residual {
                    addr: cb.addr(),
                    ld: ldc,
                    batch_stride: bsc,
                }
            } else {
                Residual {
                    addr: rb.addr(),
                    ld: if res_ld0 { 0 } else { ldr },
                    batch_stride: 0,
                }
            }
        });
        let args = GemmArgs {
            batch: c.batch,
            m,
            n,
            k,
            a: ab.addr(),
            lda,
            batch_stride_a: bsa,
            b: bb.addr(),
            ldb,
            batch_stride_b: bsb,
            b_trans: c.b_trans,
            c: cb.addr(),
            ldc,
            batch_stride_c: bsc,
            alpha: c.alpha,
            bias: c.bias.then(|| biasb.addr()),
            act: c.act,
            residual,
        };
        if portable {
            unsafe { gemm_portable(&args) };
        } else {
            unsafe { be.gemm(&args).unwrap() };
        }
        let got = read(&be, cb.addr(), c0.len());
        // Reference, and the untouched gaps of C.
        let mut want: Vec<f64> = c0.iter().map(|&x| x as f64).collect();
        for b in 0..c.batch {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0f64;
                    for p in 0..k {
                        let x = av[b * bsa + i * lda + p] as f64;
                        let y = if c.b_trans {
                            bv[b * bsb + j * ldb + p]
                        } else {
                            bv[b * bsb + p * ldb + j]
                        } as f64;
                        s += x * y;
                    }
                    let mut v = c.alpha as f64 * s;
                    if c.bias {
                        v += biasv[j] as f64;
                    }
                    // The activation in f32 (its definition), on the f64 pre-activation.
                    let mut v = if c.act == Act::None {
                        v
                    } else {
                        c.act.apply(v as f32) as f64
                    };
                    match c.residual {
                        Some(true) => v += c0[b * bsc + i * ldc + j] as f64,
                        Some(false) => v += rv[if res_ld0 { j } else { i * ldr + j }] as f64,
                        None => {}
                    }
                    want[b * bsc + i * ldc + j] = v;
                }
            }
        }
        // Activations amplify the f32 rounding of their input by at most |act'| ~ 1.13.
        let scale = (k as f64).sqrt().max(1.0);
        let path = if portable { "portable" } else { "dispatch" };
        assert_close(
            &got,
            &want,
            2e-6 * scale,
            &format!("gemm m{m} n{n} k{k} b_trans {} ({path})", c.b_trans),
        );
    }

    #[test]
    fn odd_sizes_every_epilogue() {
        let mut seed = 1;
        for (m, n, k) in [
            (7, 13, 33),
            (1, 1, 1),
            (1, 5, 9),
            (6, 1, 4),
            (33, 17, 65),
            (2, 3, 0),
        ] {
            for b_trans in [false, true] {
                for (bias, act, residual) in [
                    (false, Act::None, None),
                    (true, Act::None, None),
                    (true, Act::None, Some(true)),
                    (false, Act::None, Some(false)),
                    (true, Act::Gelu, None),
                    (false, Act::Relu, Some(false)),
                    (true, Act::QuickGelu, Some(true)),
                    (true, Act::Gelu, Some(true)),
                ] {
                    seed += 1;
                    run(
                        &Case {
                            batch: 3,
                            m,
                            n,
                            k,
                            b_trans,
                            bcast_b: seed % 3 == 0,
                            bias,
                            act,
                            residual,
                            alpha: if seed % 2 == 0 { 1.0 } else { 0.37 },
                            pad: (seed % 3) as usize,
                        },
                        seed,
                    );
                }
            }
        }
    }

    /// The AVX-512 blocking (`sgemm`): several row blocks, panel sub-blocks with Ã packed once
    /// for all of k or per k chunk, several k chunks seeding from C, the in-place-B and
    /// dot-product paths for few rows, and the scratch path of an activation with an aliased
    /// residual. On 1- and 2-thread pools, so that the decomposition does not depend on the
    /// machine's core count.
    #[test]
    fn blocked_paths_every_epilogue() {
        #[rustfmt::skip]
        let big = [
            // (batch, m, n, k, b_trans, bias, act, residual, alpha)
            (1, 430, 1600, 300, true, true, Act::Gelu, None, 1.0),
            (1, 430, 1600, 300, false, true, Act::None, Some(true), 0.37),
            (4, 140, 800, 1200, true, false, Act::Relu, Some(false), 1.0),
        ];
        #[rustfmt::skip]
        let small = [
            (3, 20, 300, 300, false, true, Act::None, Some(false), 1.0),
            (2, 27, 45, 40, false, false, Act::Gelu, Some(true), 0.5),
            (2, 3, 70, 100, true, true, Act::Gelu, Some(true), 1.0),
            (1, 8, 70, 35, true, false, Act::Relu, Some(false), 0.37),
            (2, 40, 50, 300, true, true, Act::Gelu, Some(true), 1.0),
            (1, 150, 33, 520, false, true, Act::QuickGelu, None, 1.0),
        ];
        let mut seed = 500;
        for (threads, cases) in [(1, &big[..]), (1, &small[..]), (2, &small[..])] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for &(batch, m, n, k, b_trans, bias, act, residual, alpha) in cases {
                    seed += 1;
                    let case = Case {
                        batch,
                        m,
                        n,
                        k,
                        b_trans,
                        bcast_b: seed % 2 == 0,
                        bias,
                        act,
                        residual,
                        alpha,
                        pad: (seed % 3) as usize,
                    };
                    run_as(&case, seed, false, seed % 3 == 0);
                }
            });
        }
    }

    #[test]
    fn large_parallel_path() {
        // Above SMALL_WORK: blocks of rows (m = 131) or of columns (m = 5) per thread.
        for (m, n, k, act, residual, bias) in [
            (131, 259, 97, Act::None, Some(true), true),
            (131, 259, 97, Act::Gelu, None, true),
            (131, 259, 97, Act::Relu, Some(false), false),
            (5, 1001, 600, Act::Gelu, Some(true), true),
            (5, 1001, 600, Act::None, Some(false), true),
        ] {
            run(
                &Case {
                    batch: 2,
                    m,
                    n,
                    k,
                    b_trans: true,
                    bcast_b: true,
                    bias,
                    act,
                    residual,
                    alpha: 1.0,
                    pad: 1,
                },
                99,
            );
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn retained_weights_are_packed_once_and_released() {
        // A weight declared constant is packed by the first call and its panels reused: a
        // (contract-breaking) change of the weight in place is invisible until it is released.
        if !super::super::sgemm::available() {
            eprintln!("skipped: the packed-panel path needs AVX-512");
            return;
        }
        let be = CpuBackend::new();
        let (m, n, k) = (40, 70, 300);
        let mut rng = Rng(11);
        let (av, bv, bv2) = (rng.vec(m * k), rng.vec(n * k), rng.vec(n * k));
        let (ab, bb, cb) = (buf(&be, &av), buf(&be, &bv), buf(&be, &vec![0.0; m * n]));
        let args = GemmArgs {
            batch: 1,
            m,
            n,
            k,
            a: ab.addr(),
            lda: k,
            batch_stride_a: 0,
            b: bb.addr(),
            ldb: k,
            batch_stride_b: 0,
            b_trans: true,
            c: cb.addr(),
            ldc: n,
            batch_stride_c: 0,
            alpha: 1.0,
            bias: None,
            act: Act::None,
            residual: None,
        };
        let gemm = || {
            unsafe { be.gemm(&args).unwrap() };
            read(&be, cb.addr(), m * n)
        };
        let fresh = gemm();
        be.retain_constant(bb.addr(), n * k * 4);
        let first = gemm();
        assert_eq!(first, fresh, "kept panels give the same bits");
        let write_b = |v: &[f32]| unsafe { be.upload(bb.addr(), bytemuck::cast_slice(v)).unwrap() };
        write_b(&bv2);
        assert_eq!(
            gemm(),
            first,
            "the panels packed from the old weight are reused"
        );
        be.release_constant(bb.addr());
        let after = gemm();
        write_b(&bv);
        be.retain_constant(bb.addr(), n * k * 4);
        write_b(&bv2);
        assert_eq!(after, gemm(), "released: the new weight is packed afresh");
        be.release_constant(bb.addr());
        assert_ne!(after, first);
    }

    #[test]
    fn rejects_bad_layouts() {
        let be = CpuBackend::new();
        let x = buf(&be, &[1.0; 64]);
        let base = GemmArgs {
            batch: 1,
            m: 4,
            n: 4,
            k: 4,
            a: x.addr(),
            lda: 4,
            batch_stride_a: 0,
            b: x.addr(),
            ldb: 4,
            batch_stride_b: 0,
            b_trans: false,
            c: x.addr() + 64 * 2,
            ldc: 4,
            batch_stride_c: 16,
            alpha: 1.0,
            bias: None,
            act: Act::None,
            residual: None,
        };
        let mut a = base;
        a.lda = 3;
        assert!(unsafe { be.gemm(&a) }
            .unwrap_err()
            .to_string()
            .contains("lda"));
        let mut a = base;
        a.batch = 2;
        a.batch_stride_c = 0;
        assert!(unsafe { be.gemm(&a) }.is_err());
        let mut a = base;
        a.residual = Some(Residual {
            addr: a.c,
            ld: 5,
            batch_stride: 16,
        });
        assert!(unsafe { be.gemm(&a) }.is_err());
        let mut a = base;
        a.b = 0;
        assert!(unsafe { be.gemm(&a) }
            .unwrap_err()
            .to_string()
            .contains("null"));
    }
}
