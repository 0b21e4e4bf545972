//! Batched GEMM with the fused epilogue of [`GemmArgs`] (DESIGN.md, "linear"):
//! `C[b] = act(alpha * A[b] @ op(B[b]) + bias) + residual[b]`, f32.
//!
//! The product runs on the `gemm` crate (AVX-512 micro-kernels, rayon threads). The epilogue is
//! arranged around it so that no extra pass is needed where it can be avoided: without an
//! activation, bias and residual are loaded into C first and the product is accumulated onto
//! them; with an activation, the bias is loaded first and one pass applies the activation and
//! adds the residual.

use super::{bad_args, check_addr, math, SendPtr};
use crate::backend::{Act, GemmArgs};
use crate::error::Result;
use gemm::Parallelism;
use rayon::prelude::*;

const OP: &str = "gemm";

/// Below this many multiply-adds per batch item, batch items run in parallel, each on one
/// thread; above it, items run one after the other on all threads.
const SMALL_WORK: usize = 1 << 21;

/// Rows of the epilogue passes handled by one task.
const ROWS_PER_TASK: usize = 16;

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
    let small = args.m.saturating_mul(args.n).saturating_mul(args.k.max(1)) < SMALL_WORK;
    if args.batch > 1 && small {
        (0..args.batch).into_par_iter().for_each(|b| {
            // SAFETY: batch items write disjoint C blocks (batch_stride_c != 0, checked).
            unsafe { gemm_item(args, b, false) }
        });
    } else {
        for b in 0..args.batch {
            // SAFETY: as the caller guarantees.
            unsafe { gemm_item(args, b, !small) };
        }
    }
    Ok(())
}

/// `C = beta * A @ op(B) (+ C if read_dst)` for one batch item.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    args: &GemmArgs,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    read_dst: bool,
    parallel: bool,
) {
    let (m, n, k) = (args.m, args.n, args.k);
    if k == 0 {
        if !read_dst {
            for i in 0..m {
                // SAFETY: row i of C lies in memory the caller provided.
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
    let par = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
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
            par,
        )
    };
}

/// Runs `f(i)` for every row `i < m`, in parallel when asked.
fn for_rows(m: usize, parallel: bool, f: impl Fn(usize) + Send + Sync) {
    if parallel && m > ROWS_PER_TASK {
        (0..m)
            .into_par_iter()
            .with_min_len(ROWS_PER_TASK)
            .for_each(f);
    } else {
        (0..m).for_each(f);
    }
}

unsafe fn gemm_item(args: &GemmArgs, bi: usize, parallel: bool) {
    let (m, n) = (args.m, args.n);
    // SAFETY (whole function): offsets stay inside the ranges validated in `validate`, which
    // the caller guarantees are live; rows of C are written by one task each.
    let a = unsafe { (args.a as *const f32).add(bi * args.batch_stride_a) };
    let b = unsafe { (args.b as *const f32).add(bi * args.batch_stride_b) };
    let c = SendPtr(unsafe { (args.c as *mut f32).add(bi * args.batch_stride_c) });
    let ldc = args.ldc;
    let bias = args.bias.map(|p| SendPtr(p as *mut f32));
    let res = args.residual.map(|r| {
        (
            SendPtr(unsafe { (r.addr as *mut f32).add(bi * r.batch_stride) }),
            r.ld,
        )
    });
    let alias = args
        .residual
        .is_some_and(|r| r.addr == args.c && r.ld == ldc && r.batch_stride == args.batch_stride_c);
    let row = |p: SendPtr<f32>, ld: usize, i: usize| unsafe {
        std::slice::from_raw_parts_mut(p.add(i * ld), n)
    };
    let bias_row = bias.map(|p| unsafe { std::slice::from_raw_parts(p.0 as *const f32, n) });

    if args.act == Act::None {
        // C = (residual + bias) + alpha * A @ op(B).
        let mut read_dst = alias;
        if let Some((r, ldr)) = res.filter(|_| !alias) {
            for_rows(m, parallel, |i| {
                row(c, ldc, i).copy_from_slice(row(r, ldr, i))
            });
            read_dst = true;
        }
        if let Some(bv) = bias_row {
            let load = read_dst;
            for_rows(m, parallel, |i| {
                let ci = row(c, ldc, i);
                if load {
                    ci.iter_mut().zip(bv).for_each(|(x, &y)| *x += y);
                } else {
                    ci.copy_from_slice(bv);
                }
            });
            read_dst = true;
        }
        unsafe { product(args, a, b, c.0, ldc, read_dst, parallel) };
        return;
    }

    // With an activation: T = alpha * A @ op(B) + bias, then C = act(T) + residual. When the
    // residual is C itself, T goes to a scratch matrix first.
    let mut scratch = Vec::new();
    let (t, ldt) = if alias {
        scratch.resize(m * n, 0f32);
        (SendPtr(scratch.as_mut_ptr()), n)
    } else {
        (c, ldc)
    };
    let read_dst = if let Some(bv) = bias_row {
        for_rows(m, parallel, |i| row(t, ldt, i).copy_from_slice(bv));
        true
    } else {
        false
    };
    unsafe { product(args, a, b, t.0, ldt, read_dst, parallel) };
    let act = args.act;
    for_rows(m, parallel, |i| {
        let ti = row(t, ldt, i);
        math::act_slice(ti, act);
        if alias {
            row(c, ldc, i)
                .iter_mut()
                .zip(ti.iter())
                .for_each(|(x, &y)| *x += y);
        } else if let Some((r, ldr)) = res {
            ti.iter_mut()
                .zip(row(r, ldr, i).iter())
                .for_each(|(x, &y)| *x += y);
        }
    });
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

    fn run(c: &Case, seed: u64) {
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
                    ld: ldr,
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
        unsafe { be.gemm(&args).unwrap() };
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
                        Some(false) => v += rv[i * ldr + j] as f64,
                        None => {}
                    }
                    want[b * bsc + i * ldc + j] = v;
                }
            }
        }
        // Activations amplify the f32 rounding of their input by at most |act'| ~ 1.13.
        let scale = (k as f64).sqrt().max(1.0);
        assert_close(&got, &want, 2e-6 * scale, &format!("gemm m{m} n{n} k{k}"));
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

    #[test]
    fn large_parallel_path() {
        // Above SMALL_WORK: the threaded product and parallel epilogue passes.
        for (act, residual, bias) in [
            (Act::None, Some(true), true),
            (Act::Gelu, None, true),
            (Act::Relu, Some(false), false),
        ] {
            run(
                &Case {
                    batch: 2,
                    m: 131,
                    n: 259,
                    k: 97,
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
