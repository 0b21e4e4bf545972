//! Fused multi-head attention (spec §1.3, §3, §4.2; DESIGN.md "attention"): online softmax over
//! blocks of keys, f32 throughout, never holding more than a `Q_BLOCK x K_BLOCK` tile of scores.
//!
//! Work is split over (batch, head, block of queries) with rayon. For each task, a loop over key
//! blocks computes `S = scale * Q K^T` and `O += P V` with single-threaded `gemm` calls (packed
//! AVX-512 micro-kernels), with the running max / sum of the softmax in between.

use super::{bad_args, check_addr, math, SendPtr};
use crate::backend::AttentionArgs;
use crate::error::Result;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

const OP: &str = "attention";

/// Queries per task.
const Q_BLOCK: usize = 128;
/// Keys per step of the online softmax.
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
    Ok(())
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

#[inline(always)]
fn softmax_block_body(row: &mut [f32], valid: usize, m_old: f32) -> (f32, f32) {
    let (live, masked) = row.split_at_mut(valid);
    let mut mxl = [f32::NEG_INFINITY; math::LANES];
    let mut chunks = live.chunks_exact(math::LANES);
    for ch in &mut chunks {
        for (m, &v) in mxl.iter_mut().zip(ch) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut m_new = m_old;
    for &v in mxl.iter().chain(chunks.remainder()) {
        m_new = if v > m_new { v } else { m_new };
    }
    let mut sl = [0f32; math::LANES];
    let mut chunks = live.chunks_exact_mut(math::LANES);
    for ch in &mut chunks {
        for (s, v) in sl.iter_mut().zip(ch.iter_mut()) {
            *v = math::exp_fast(*v - m_new);
            *s += *v;
        }
    }
    let mut total = 0f32;
    for v in chunks.into_remainder() {
        *v = math::exp_fast(*v - m_new);
        total += *v;
    }
    total += sl.iter().sum::<f32>();
    masked.fill(0.0);
    (m_new, total)
}

math::multiversion! {
    /// Online-softmax step on one row of scores: returns the new running max and the sum of
    /// `p = exp(s - max)` over the first `valid` entries; writes `p` there and 0 after.
    fn softmax_block(row: &mut [f32], valid: usize, m_old: f32) -> (f32, f32) => softmax_block_body;
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
        let scale = 1.0 / (hd as f32).sqrt();
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
                    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let l: f64 = p.iter().sum();
                    for e in 0..hd {
                        want[b * o_batch + i * o_row + h * hd + e] =
                            (0..jmax).map(|j| p[j] * vj(j, e)).sum::<f64>() / l;
                    }
                }
            }
        }
        assert_close(
            &got,
            &want,
            2e-6,
            &format!("attention b{batch} h{heads} nq{nq} nk{nk} d{hd} causal {causal}"),
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
