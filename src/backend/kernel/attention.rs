//! Launch code of `kernels/attention.cu`: fused multi-head attention (DESIGN.md op `attention`,
//! [`AttentionArgs`]; spec §1.3 ViT self-attention, §3 CLIP causal self-attention, §4.2
//! two-way-transformer self and cross attention). Kernel design and costs:
//! docs/kernels.md.
//!
//! bf16 / f16 run the tensor-core kernels `sv_attention_d{16,32,48,64,96,128}_{bf16,f16}`, picked
//! by the head dim rounded up to the next of those sizes; f32 runs the SIMT kernel
//! `sv_attention_f32`.

use super::{Dim3, KernelArgs, KernelDevice};
use crate::backend::{Addr, AttentionArgs};
use crate::dtype::DType;
use crate::error::{Error, Result};

const OP: &str = "kernel attention";

/// Query rows per block of the tensor-core kernels (4 warps x 16 rows).
const TC_ROWS: usize = 64;
/// Keys per shared-memory tile of the tensor-core kernels.
const TC_KEYS: usize = 64;
/// Query rows per block (and keys per tile) of the f32 kernel.
const F32_ROWS: usize = 32;
/// Threads per block of every attention kernel.
const THREADS: u32 = 128;
/// The padded head dims the tensor-core kernels are compiled for.
const TC_DIMS: [usize; 6] = [16, 32, 48, 64, 96, 128];
/// The largest head dim any kernel takes.
pub const MAX_HEAD_DIM: usize = 128;
/// Grid y/z limit.
const GRID_YZ: usize = 65535;

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{OP}: {msg}"))
}

/// The tensor-core kernel's padded head dim for `head_dim` (the smallest compiled size that
/// holds it).
pub fn padded_head_dim(head_dim: usize) -> Option<usize> {
    TC_DIMS.iter().copied().find(|&d| d >= head_dim)
}

/// Dynamic shared memory of a tensor-core kernel: Q (64 rows) and two K and two V tiles (64
/// keys), rows padded by 8 elements, 2 bytes each (kernels/attention.cu, `Tc<HDP>`).
pub fn tc_shared_bytes(hdp: usize) -> usize {
    (TC_ROWS + 4 * TC_KEYS) * (hdp + 8) * 2
}

/// Dynamic shared memory of the f32 kernel: Q (32 x D), K (32 x (D+1)), V (32 x D), P (4 x 8 x 32)
/// floats.
pub fn f32_shared_bytes(head_dim: usize) -> usize {
    (3 * F32_ROWS * head_dim + F32_ROWS + 4 * 8 * 32) * 4
}

fn validate(a: &AttentionArgs, esize: usize) -> Result<()> {
    if a.head_dim > MAX_HEAD_DIM {
        return Err(bad(format!(
            "head_dim {} > {MAX_HEAD_DIM} (the largest the kernels take)",
            a.head_dim
        )));
    }
    if a.nk == 0 {
        return Err(bad("nk is 0: softmax over no keys"));
    }
    if a.nq > i32::MAX as usize || a.nk > i32::MAX as usize {
        return Err(bad(format!("nq {} / nk {} exceed i32", a.nq, a.nk)));
    }
    let width = a.heads * a.head_dim;
    for (name, ld, count) in [
        ("q", a.q_row, a.nq),
        ("k", a.k_row, a.nk),
        ("v", a.v_row, a.nk),
        ("out", a.o_row, a.nq),
    ] {
        if ld < width && count > 1 {
            return Err(bad(format!(
                "{name} row stride {ld} < heads * head_dim = {width}"
            )));
        }
    }
    if a.batch > 1 && a.o_batch == 0 {
        return Err(bad("o_batch is 0 with batch > 1"));
    }
    for (name, addr) in [("q", a.q), ("k", a.k), ("v", a.v), ("out", a.out)] {
        if addr == 0 {
            return Err(bad(format!("{name} is a null address")));
        }
        if !addr.is_multiple_of(esize as u64) {
            return Err(bad(format!(
                "{name} address {addr:#x} is not aligned to its {esize}-byte elements"
            )));
        }
    }
    for (name, v) in [
        ("q_row", a.q_row),
        ("q_batch", a.q_batch),
        ("k_row", a.k_row),
        ("k_batch", a.k_batch),
        ("v_row", a.v_row),
        ("v_batch", a.v_batch),
        ("o_row", a.o_row),
        ("o_batch", a.o_batch),
    ] {
        if v > i64::MAX as usize / 4 {
            return Err(bad(format!("{name} {v} is out of range")));
        }
    }
    Ok(())
}

/// Whether every row of every head slice starts `align` elements apart from a `bytes`-aligned
/// address: the condition of the kernels' vector loads (16-byte cp.async, float4) and stores.
fn vector_ok(a: &AttentionArgs, esize: usize, align_elems: usize) -> bool {
    let bytes = (align_elems * esize) as u64;
    let stride_ok = |ld: usize, count: usize| count <= 1 || ld.is_multiple_of(align_elems);
    let batch_ok = |bs: usize| a.batch <= 1 || bs.is_multiple_of(align_elems);
    a.head_dim.is_multiple_of(align_elems)
        && [a.q, a.k, a.v, a.out]
            .iter()
            .all(|p| p.is_multiple_of(bytes))
        && stride_ok(a.q_row, a.nq)
        && stride_ok(a.k_row, a.nk)
        && stride_ok(a.v_row, a.nk)
        && stride_ok(a.o_row, a.nq)
        && batch_ok(a.q_batch)
        && batch_ok(a.k_batch)
        && batch_ok(a.v_batch)
        && batch_ok(a.o_batch)
}

/// Runs [`AttentionArgs`] with q, k, v and out stored as `dtype`.
///
/// Kernel parameter list (kernels/attention.cu, `SV_ATTENTION_PARAMS`):
/// `(const T* q, const T* k, const T* v, T* out, int nq, int nk, int head_dim,
///   long long q_row, long long q_batch, long long k_row, long long k_batch,
///   long long v_row, long long v_batch, long long o_row, long long o_batch,
///   float scale_log2, int causal, int vec)`
/// with `scale_log2 = scale * log2(e)` (the kernels use `exp2f`). Grid
/// `(ceil(nq / rows), heads, batch)` with 64 rows per block (bf16/f16) or 32 (f32), block 128;
/// more than 65535 heads or batches are launched in chunks with offset base addresses.
///
/// # Safety
/// Every element the arguments describe must lie in live device memory of `dev` holding
/// `dtype`; `out` must not overlap `q`, `k` or `v`.
pub unsafe fn attention(dev: &dyn KernelDevice, dtype: DType, a: &AttentionArgs) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::device(
            dev.name(),
            format!("attention: dtype {dtype} is not supported (f32, f16, bf16)"),
        ));
    }
    if a.batch == 0 || a.heads == 0 || a.nq == 0 || a.head_dim == 0 {
        return Ok(());
    }
    let esize = dtype.size();
    validate(a, esize)?;

    let (kernel, rows, shared, vec) = if dtype == DType::F32 {
        let vec = vector_ok(a, esize, 4);
        (
            "sv_attention_f32".to_string(),
            F32_ROWS,
            f32_shared_bytes(a.head_dim),
            vec,
        )
    } else {
        // validate() bounds head_dim by 128, the largest padded size.
        let hdp = padded_head_dim(a.head_dim).ok_or_else(|| bad("no kernel for head_dim"))?;
        let vec = a.head_dim == hdp && vector_ok(a, esize, 8);
        (
            format!("sv_attention_d{hdp}_{}", dtype.suffix()),
            TC_ROWS,
            tc_shared_bytes(hdp),
            vec,
        )
    };
    let scale_log2 = (a.scale as f64 * std::f64::consts::LOG2_E) as f32;
    let block: Dim3 = [THREADS, 1, 1];
    let gx = a.nq.div_ceil(rows) as u32;
    let off = |base: Addr, elems: usize| base + (elems * esize) as u64;

    let mut b0 = 0;
    while b0 < a.batch {
        let nb = (a.batch - b0).min(GRID_YZ);
        let mut h0 = 0;
        while h0 < a.heads {
            let nh = (a.heads - h0).min(GRID_YZ);
            let col = h0 * a.head_dim;
            let mut args = KernelArgs::new();
            args.ptr(off(a.q, b0 * a.q_batch + col))
                .ptr(off(a.k, b0 * a.k_batch + col))
                .ptr(off(a.v, b0 * a.v_batch + col))
                .ptr(off(a.out, b0 * a.o_batch + col))
                .i32(a.nq as i32)
                .i32(a.nk as i32)
                .i32(a.head_dim as i32)
                .i64(a.q_row as i64)
                .i64(a.q_batch as i64)
                .i64(a.k_row as i64)
                .i64(a.k_batch as i64)
                .i64(a.v_row as i64)
                .i64(a.v_batch as i64)
                .i64(a.o_row as i64)
                .i64(a.o_batch as i64)
                .f32(scale_log2)
                .i32(a.causal as i32)
                .i32(vec as i32);
            // SAFETY: arguments validated above; the parameter list matches the kernel's, and
            // the caller guarantees the memory ranges.
            unsafe {
                dev.launch(
                    &kernel,
                    [gx, nh as u32, nb as u32],
                    block,
                    shared as u32,
                    &mut args,
                )?
            };
            h0 += nh;
        }
        b0 += nb;
    }
    Ok(())
}
