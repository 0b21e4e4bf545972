//! The `gemm` op on CUDA (DESIGN.md, "The op set"; [`GemmArgs`]): the row-major arguments
//! mapped onto one cuBLASLt matmul (column-major), plus the `sv_gemm_epilogue_<dtype>` kernel
//! for the epilogues cuBLASLt cannot compute exactly.
//!
//! # Mapping row-major onto column-major
//!
//! A row-major `R x C` matrix with leading dimension `ld` *is*, read column-major, its transpose:
//! a `C x R` matrix with the same `ld`. We want `C = A · op(B)` (row-major, per batch).
//! Transposed, that is `Cᵀ = op(B)ᵀ · Aᵀ`, and every transpose in it is free, being just the
//! column-major reading of our buffers. cuBLASLt computes `D' = op(A') · op(B')` with
//! `M' x K'` times `K' x N'`:
//!
//! | cuBLASLt   | our buffer                                   | stored, column-major     | op  |
//! |------------|----------------------------------------------|--------------------------|-----|
//! | A'         | B, `b_trans` (`nn.Linear` weight, `N x K`)   | `K x N`, ld `ldb`  (= B)  | T   |
//! | A'         | B, not `b_trans` (`K x N`)                   | `N x K`, ld `ldb`  (= Bᵀ) | N   |
//! | B'         | A (`M x K`)                                  | `K x M`, ld `lda`  (= Aᵀ) | N   |
//! | C' = D'    | C (`M x N`)                                  | `N x M`, ld `ldc`  (= Cᵀ) |     |
//!
//! so `M' = n`, `N' = m`, `K' = k`. cuBLASLt's bias vector has one entry per row of `D'`,
//! i.e. per column `j` of our C: exactly the `nn.Linear` bias `bias[j]`. Batches map one to
//! one (`BATCH_COUNT` and `STRIDED_BATCH_OFFSET` on every layout; cuBLASLt accepts stride 0 for
//! A' and B', which is our broadcast). When B is shared by the batch (stride 0) and the A and C
//! batches are consecutive row blocks (`stride_a = m*lda`, `stride_c = m*ldc`), the batch folds
//! into one GEMM of `batch*m` rows (the patch embedding).
//!
//! # Epilogues
//!
//! cuBLASLt computes `D = epi(alpha·op(A')op(B') + beta·C + bias)`: bias *and* `beta·C` come
//! before the activation, while ours is `act(alpha·A@B + bias) + residual`. cuBLASLt's GELU is
//! the tanh approximation, not `nn.GELU()`'s erf. Hence three paths:
//!
//! 1. **Fused** (one cuBLASLt call): `act` is None or ReLU, the bias (if any) is 16-byte
//!    aligned, and there is either no residual or, with `act` None, a residual that is C itself
//!    (same address, ld and batch stride): `beta = 1` with C as the input matrix. Epilogue
//!    `DEFAULT`/`BIAS`/`RELU`/`RELU_BIAS`; the bias is in C's dtype (cuBLASLt's default bias
//!    type is D's type for non-fp8 outputs).
//! 2. **GEMM, then the epilogue kernel**: cuBLASLt writes `alpha·A@B` into C (adding C in place
//!    with `beta = 1` when the residual is C and `act` is None), then
//!    `sv_gemm_epilogue_<dtype>` computes `c = act(c + bias) + residual` in f32. Used for exact
//!    GELU, QuickGELU, a residual that is not C (another buffer, batch stride 0, ld 0), and an
//!    unaligned bias.
//! 3. **Save the residual first**: the residual is C but `act` is not None, so the GEMM would
//!    overwrite it: C is copied into a scratch buffer, then as path 2 with the scratch as the
//!    residual.
//!
//! The SegVol GEMMs (spec §1–§5, `src/model`): q/k/v/qkv and other plain linears and
//! ReLU linears (two-way MLP `lin1`, hypernetwork layers) take path 1 without residual;
//! `out_proj` and `fc2`/`lin2`/`c_proj` with the in-place residual `x += f(x)` take path 1 with
//! `beta = 1`; ViT and decoder GELU linears, CLIP QuickGELU `c_fc`, the patch embedding (the
//! position embedding is a residual with batch stride 0) and the mask product (text similarity
//! residual with ld 0) take path 2. Path 3 does not occur in the model.

use super::DeviceAlloc;
use crate::backend::kernel::Dim3;
use crate::backend::{Act, Addr, GemmArgs, Residual};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use std::collections::HashMap;
use std::ffi::c_void;

/// Threads per block of the epilogue kernel (grid `(ceil(n/256), rows, batch)`).
pub(crate) const EPILOGUE_BLOCK: u32 = 256;
/// The largest grid y and z extent.
pub(crate) const MAX_GRID_YZ: usize = 65_535;
/// Bias alignment required for cuBLASLt's fused bias (vectorised loads); others go to the
/// epilogue kernel.
pub(crate) const BIAS_ALIGN: u64 = 16;
/// cuBLASLt workspace, allocated once per device (NVIDIA's recommendation for Hopper).
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

/// cuBLASLt's epilogue for a fused call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LtEpilogue {
    Default,
    Bias,
    Relu,
    ReluBias,
}

/// One cuBLASLt matmul in its own column-major terms (module docs): the plan-cache key,
/// without the pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LtShape {
    /// `M'`, `N'`, `K'`.
    pub m: u64,
    pub n: u64,
    pub k: u64,
    /// Whether A' is transposed (our `b_trans`).
    pub trans_a: bool,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    /// Batch strides in elements (0 when `batch == 1`).
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub batch: u32,
    pub epilogue: LtEpilogue,
    /// `beta = 1` (C is read: the in-place residual), else `beta = 0`.
    pub accumulate: bool,
}

impl LtShape {
    /// Stored rows and columns of A' (before `op`).
    pub fn a_dims(&self) -> (u64, u64) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }
}

/// A cuBLASLt call: shape plus pointers. `a` is A' (our B), `b` is B' (our A), `c` is C' = D'.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LtCall {
    pub shape: LtShape,
    pub a: Addr,
    pub b: Addr,
    pub c: Addr,
    pub bias: Option<Addr>,
    pub alpha: f32,
}

/// One `sv_gemm_epilogue_<dtype>` computation over a whole GEMM output:
/// `c[b][i][j] = act(c[b][i][j] + bias[j]) + residual[b][i][j]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EpilogueCall {
    pub c: Addr,
    pub ldc: usize,
    pub batch_stride_c: usize,
    pub bias: Option<Addr>,
    /// The residual; ignored when `residual_is_scratch` (path 3).
    pub residual: Option<Residual>,
    pub residual_is_scratch: bool,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub act: Act,
}

impl EpilogueCall {
    /// The residual once the scratch address is known (packed `m x n` per batch).
    pub fn resolved_residual(&self, scratch: Addr) -> Option<Residual> {
        if self.residual_is_scratch {
            Some(Residual {
                addr: scratch,
                ld: self.n,
                batch_stride: self.m * self.n,
            })
        } else {
            self.residual
        }
    }
}

/// Path 3: copy C (`batch` blocks of `m x n`, ld `ldc`, stride `batch_stride_c`) into the
/// packed scratch buffer before the GEMM overwrites it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SaveResidual {
    pub c: Addr,
    pub ldc: usize,
    pub batch_stride_c: usize,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
}

impl SaveResidual {
    /// Scratch bytes needed.
    pub fn bytes(&self, esz: usize) -> usize {
        self.batch * self.m * self.n * esz
    }
}

/// How one [`GemmArgs`] runs: an optional residual copy, one cuBLASLt call, an optional
/// epilogue kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmPlan {
    pub save: Option<SaveResidual>,
    pub lt: LtCall,
    pub epilogue: Option<EpilogueCall>,
}

fn bad(msg: String) -> Error {
    Error::Input(format!("gemm: {msg}"))
}

fn fits_i32(v: usize) -> bool {
    v <= i32::MAX as usize
}

/// How much of a GEMM is left to cuBLASLt: each level is the fallback of the one before when
/// cuBLASLt's heuristic finds no algorithm (misaligned views, stride-0 batches, fused
/// epilogues on some shapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    /// Paths 1-3 of the module docs.
    Fused,
    /// No cuBLASLt epilogue: a plain matmul and the epilogue kernel (paths 2-3).
    Unfused,
    /// As `Unfused`, one batch-1 matmul per batch ([`split_batches`]).
    PerBatch,
}

/// What to try after cuBLASLt found no algorithm for `failed` at `level`; `None` when nothing
/// simpler is left (the error stands).
pub(crate) fn next_level(level: Level, failed: &GemmPlan) -> Option<Level> {
    let s = &failed.lt.shape;
    let fused = s.epilogue != LtEpilogue::Default;
    match level {
        Level::Fused if fused => Some(Level::Unfused),
        Level::Fused | Level::Unfused if s.batch > 1 => Some(Level::PerBatch),
        _ => None,
    }
}

/// `a` as one batch-1 GEMM per batch, the addresses advanced by `esz`-byte elements.
pub(crate) fn split_batches(a: &GemmArgs, esz: usize) -> Vec<GemmArgs> {
    let off = |base: Addr, stride: usize, b: usize| base + (b * stride * esz) as Addr;
    (0..a.batch)
        .map(|b| GemmArgs {
            batch: 1,
            a: off(a.a, a.batch_stride_a, b),
            b: off(a.b, a.batch_stride_b, b),
            c: off(a.c, a.batch_stride_c, b),
            batch_stride_a: 0,
            batch_stride_b: 0,
            batch_stride_c: 0,
            residual: a.residual.map(|r| Residual {
                addr: off(r.addr, r.batch_stride, b),
                batch_stride: 0,
                ..r
            }),
            ..*a
        })
        .collect()
}

/// Validates `a` and decides how it runs (module docs). `None`: nothing to compute (an empty
/// output).
#[cfg(test)]
pub(crate) fn plan(a: &GemmArgs, dtype: DType) -> Result<Option<GemmPlan>> {
    plan_at(a, dtype, Level::Fused)
}

/// [`plan`] with the fused cuBLASLt epilogues allowed only at [`Level::Fused`].
pub(crate) fn plan_at(a: &GemmArgs, dtype: DType, level: Level) -> Result<Option<GemmPlan>> {
    if !dtype.is_float() {
        return Err(bad(format!("dtype {dtype} is not a float type")));
    }
    if a.batch == 0 || a.m == 0 || a.n == 0 {
        return Ok(None);
    }
    if a.k == 0 {
        return Err(bad(format!(
            "k = 0 (m = {}, n = {}): an empty inner dimension is not supported",
            a.m, a.n
        )));
    }
    let b_row = if a.b_trans { a.k } else { a.n };
    if a.lda < a.k || a.ldb < b_row || a.ldc < a.n {
        return Err(bad(format!(
            "leading dimensions too small: lda {} (k = {}), ldb {} (needs {b_row}), ldc {} (n = {})",
            a.lda, a.k, a.ldb, a.ldc, a.n
        )));
    }
    if a.batch > 1 && a.batch_stride_c < (a.m - 1) * a.ldc + a.n {
        return Err(bad(format!(
            "output batches overlap: batch_stride_c {} < (m - 1) * ldc + n = {}",
            a.batch_stride_c,
            (a.m - 1) * a.ldc + a.n
        )));
    }
    let dims = [
        a.batch,
        a.m,
        a.n,
        a.k,
        a.lda,
        a.ldb,
        a.ldc,
        a.residual.map_or(0, |r| r.ld),
    ];
    if !dims.iter().all(|&d| fits_i32(d)) || !fits_i32(a.batch * a.m) {
        return Err(bad(format!(
            "a dimension exceeds i32 (batch {}, m {}, n {}, k {}, lda {}, ldb {}, ldc {})",
            a.batch, a.m, a.n, a.k, a.lda, a.ldb, a.ldc
        )));
    }

    let res_is_c = a.residual.is_some_and(|r| {
        r.addr == a.c && r.ld == a.ldc && (a.batch == 1 || r.batch_stride == a.batch_stride_c)
    });
    let bias_fusable = a.bias.is_none_or(|b| b % BIAS_ALIGN == 0);
    let act_fusable = matches!(a.act, Act::None | Act::Relu);
    let fused = level == Level::Fused
        && act_fusable
        && bias_fusable
        && (a.residual.is_none() || (res_is_c && a.act == Act::None));

    let (epilogue, lt_bias, accumulate, kernel, save) = if fused {
        let epi = match (a.bias.is_some(), a.act) {
            (false, Act::Relu) => LtEpilogue::Relu,
            (true, Act::Relu) => LtEpilogue::ReluBias,
            (true, _) => LtEpilogue::Bias,
            (false, _) => LtEpilogue::Default,
        };
        (epi, a.bias, res_is_c, None, None)
    } else {
        let kernel = EpilogueCall {
            c: a.c,
            ldc: a.ldc,
            batch_stride_c: a.batch_stride_c,
            bias: a.bias,
            residual: None,
            residual_is_scratch: false,
            batch: a.batch,
            m: a.m,
            n: a.n,
            act: a.act,
        };
        if res_is_c && a.act == Act::None {
            // Only the bias is left (unaligned): C += A@B in cuBLASLt, bias in the kernel.
            (LtEpilogue::Default, None, true, Some(kernel), None)
        } else if res_is_c {
            let save = SaveResidual {
                c: a.c,
                ldc: a.ldc,
                batch_stride_c: a.batch_stride_c,
                batch: a.batch,
                m: a.m,
                n: a.n,
            };
            let kernel = EpilogueCall {
                residual_is_scratch: true,
                ..kernel
            };
            (LtEpilogue::Default, None, false, Some(kernel), Some(save))
        } else {
            let kernel = EpilogueCall {
                residual: a.residual,
                ..kernel
            };
            (LtEpilogue::Default, None, false, Some(kernel), None)
        }
    };

    let fold = a.batch > 1
        && a.batch_stride_b == 0
        && a.batch_stride_a == a.m * a.lda
        && a.batch_stride_c == a.m * a.ldc;
    let (rows, batch) = if fold {
        (a.batch * a.m, 1)
    } else {
        (a.m, a.batch)
    };
    let stride = |s: usize| if batch == 1 { 0 } else { s as i64 };
    let shape = LtShape {
        m: a.n as u64,
        n: rows as u64,
        k: a.k as u64,
        trans_a: a.b_trans,
        lda: a.ldb as i64,
        ldb: a.lda as i64,
        ldc: a.ldc as i64,
        stride_a: stride(a.batch_stride_b),
        stride_b: stride(a.batch_stride_a),
        stride_c: stride(a.batch_stride_c),
        batch: batch as u32,
        epilogue,
        accumulate,
    };
    Ok(Some(GemmPlan {
        save,
        lt: LtCall {
            shape,
            a: a.b,
            b: a.a,
            c: a.c,
            bias: lt_bias,
            alpha: a.alpha,
        },
        epilogue: kernel,
    }))
}

/// One launch of `sv_gemm_epilogue_<dtype>`: the grid and the kernel's arguments. Rows and
/// batches are split into chunks of at most 65535 (the grid y/z limit), each chunk's `c` and
/// `residual` pointers advanced to its first row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EpilogueLaunch {
    pub grid: Dim3,
    pub c: Addr,
    pub ldc: i32,
    pub batch_stride_c: i64,
    pub bias: Addr,
    pub residual: Addr,
    pub ldr: i32,
    pub batch_stride_r: i64,
    pub batch: i32,
    pub m: i32,
    pub n: i32,
    pub act: i32,
}

/// The launches for `e` with elements of `esz` bytes; `residual` already resolved.
/// Kernel contract: block `(256, 1, 1)`, grid `(ceil(n/256), m, batch)`; thread
/// `(blockIdx.x*256 + threadIdx.x, blockIdx.y, blockIdx.z)` handles column, row, batch.
pub(crate) fn epilogue_launches(
    e: &EpilogueCall,
    residual: Option<Residual>,
    esz: usize,
) -> Vec<EpilogueLaunch> {
    let (raddr, ldr, bsr) = residual.map_or((0, 0, 0), |r| (r.addr, r.ld, r.batch_stride));
    let gx = e.n.div_ceil(EPILOGUE_BLOCK as usize) as u32;
    let mut out = Vec::new();
    for b0 in (0..e.batch).step_by(MAX_GRID_YZ) {
        let nb = (e.batch - b0).min(MAX_GRID_YZ);
        for r0 in (0..e.m).step_by(MAX_GRID_YZ) {
            let nr = (e.m - r0).min(MAX_GRID_YZ);
            let c_off = (b0 * e.batch_stride_c + r0 * e.ldc) * esz;
            let r_off = (b0 * bsr + r0 * ldr) * esz;
            out.push(EpilogueLaunch {
                grid: [gx, nr as u32, nb as u32],
                c: e.c + c_off as u64,
                ldc: e.ldc as i32,
                batch_stride_c: e.batch_stride_c as i64,
                bias: e.bias.unwrap_or(0),
                residual: if residual.is_some() {
                    raddr + r_off as u64
                } else {
                    0
                },
                ldr: ldr as i32,
                batch_stride_r: bsr as i64,
                batch: nb as i32,
                m: nr as i32,
                n: e.n as i32,
                act: e.act.code(),
            });
        }
    }
    out
}

/// The epilogue kernel's name for `dtype`.
pub(crate) fn epilogue_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "sv_gemm_epilogue_f32",
        DType::F16 => "sv_gemm_epilogue_f16",
        _ => "sv_gemm_epilogue_bf16",
    }
}

// ----- cuBLASLt -----

fn lt_dtype(dtype: DType) -> ltsys::cudaDataType {
    match dtype {
        DType::F32 => ltsys::cudaDataType::CUDA_R_32F,
        DType::F16 => ltsys::cudaDataType::CUDA_R_16F,
        _ => ltsys::cudaDataType::CUDA_R_16BF,
    }
}

/// The largest power of two (at most 256) dividing `addr`: what cuBLASLt may assume.
pub(crate) fn alignment(addr: Addr) -> u32 {
    if addr == 0 {
        256
    } else {
        (1u64 << addr.trailing_zeros().min(8)) as u32
    }
}

/// Descriptors and the chosen algorithm for one [`LtShape`], dtype and pointer alignments.
struct LtPlan {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    c: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

// The descriptors are plain host objects, used only under `Lt::plans`' lock.
unsafe impl Send for LtPlan {}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: created by `LtPlan::new`, destroyed once. Failures cannot be reported here.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

fn lt_err(what: &str, e: lt::CublasError) -> String {
    format!("{what}: {:?}", e.0)
}

/// Why a cuBLASLt call could not be made.
#[derive(Debug)]
pub(crate) enum LtFailure {
    /// The heuristic found no algorithm for this shape, dtype and alignment ([`next_level`]).
    NoAlgorithm(String),
    /// Anything else.
    Other(String),
}

impl From<String> for LtFailure {
    fn from(s: String) -> Self {
        LtFailure::Other(s)
    }
}

impl std::fmt::Display for LtFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LtFailure::NoAlgorithm(s) | LtFailure::Other(s) => f.write_str(s),
        }
    }
}

impl LtPlan {
    /// # Safety
    /// `handle` must be a live cuBLASLt handle.
    unsafe fn new(
        handle: ltsys::cublasLtHandle_t,
        dtype: DType,
        s: &LtShape,
        align: [u32; 3],
    ) -> std::result::Result<Self, LtFailure> {
        let dt = lt_dtype(dtype);
        let mut plan = LtPlan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: plain data, overwritten by the heuristic below.
            algo: std::mem::zeroed(),
        };
        // f32 compute and scale for every dtype; for f32 storage this keeps TF32 off
        // (`CUBLAS_COMPUTE_32F`, not `_FAST_TF32`).
        plan.desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ltsys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err("cublasLtMatmulDescCreate", e))?;
        let set_desc = |attr, v: *const c_void, size: usize| {
            lt::set_matmul_desc_attribute(plan.desc, attr, v, size)
                .map_err(|e| lt_err(&format!("cublasLtMatmulDescSetAttribute({attr:?})"), e))
        };
        use ltsys::cublasLtMatmulDescAttributes_t as D;
        let trans_a: i32 = s.trans_a as i32; // CUBLAS_OP_T = 1, CUBLAS_OP_N = 0
        let trans_b: i32 = 0;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans_a as *const i32).cast(),
            4,
        )?;
        set_desc(
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            (&trans_b as *const i32).cast(),
            4,
        )?;
        let epi = match s.epilogue {
            LtEpilogue::Default => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            LtEpilogue::Bias => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            LtEpilogue::Relu => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU,
            LtEpilogue::ReluBias => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
        };
        set_desc(
            D::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epi as *const ltsys::cublasLtEpilogue_t).cast(),
            std::mem::size_of::<ltsys::cublasLtEpilogue_t>(),
        )?;

        let layout = |rows: u64, cols: u64, ld: i64, stride: i64| {
            let l = lt::create_matrix_layout(dt, rows, cols, ld)
                .map_err(|e| lt_err("cublasLtMatrixLayoutCreate", e))?;
            if s.batch > 1 {
                use ltsys::cublasLtMatrixLayoutAttribute_t as L;
                let count = s.batch as i32;
                let set = |attr, v: *const c_void, size| {
                    lt::set_matrix_layout_attribute(l, attr, v, size)
                        .map_err(|e| lt_err("cublasLtMatrixLayoutSetAttribute", e))
                };
                let r = set(
                    L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    (&count as *const i32).cast(),
                    4,
                )
                .and_then(|_| {
                    set(
                        L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride as *const i64).cast(),
                        8,
                    )
                });
                if let Err(e) = r {
                    let _ = lt::destroy_matrix_layout(l);
                    return Err(e);
                }
            }
            Ok(l)
        };
        let (ar, ac) = s.a_dims();
        plan.a = layout(ar, ac, s.lda, s.stride_a)?;
        plan.b = layout(s.k, s.n, s.ldb, s.stride_b)?;
        plan.c = layout(s.m, s.n, s.ldc, s.stride_c)?;

        let pref =
            lt::create_matmul_pref().map_err(|e| lt_err("cublasLtMatmulPreferenceCreate", e))?;
        let heuristic = (|| {
            use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
            let set = |attr, v: *const c_void, size| {
                lt::set_matmul_pref_attribute(pref, attr, v, size)
                    .map_err(|e| lt_err("cublasLtMatmulPreferenceSetAttribute", e))
            };
            let ws = WORKSPACE_BYTES as u64;
            set(
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const u64).cast(),
                8,
            )?;
            // cuBLASLt assumes 256-byte aligned pointers unless told otherwise; views into the
            // arena (q/k/v column slices, offset rows) are often less aligned.
            let [aa, ab, ac] = align;
            for (attr, v) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aa),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ab),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ac),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ac),
            ] {
                set(attr, (&v as *const u32).cast(), 4)?;
            }
            lt::get_matmul_algo_heuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref)
                .map_err(|e| {
                    LtFailure::NoAlgorithm(lt_err(
                        "cublasLtMatmulAlgoGetHeuristic (no algorithm)",
                        e,
                    ))
                })
        })();
        let _ = lt::destroy_matmul_pref(pref);
        plan.algo = heuristic?.algo;
        Ok(plan)
    }
}

type PlanKey = (DType, LtShape, [u32; 3]);

/// The cuBLASLt handle, its workspace and the plan cache of one device.
pub(crate) struct Lt {
    handle: ltsys::cublasLtHandle_t,
    workspace: DeviceAlloc,
    plans: parking_lot::Mutex<HashMap<PlanKey, LtPlan>>,
}

// The handle is used only under `plans`' lock (cuBLASLt handles must not be used concurrently
// with the same descriptors, and the bias pointer is set on a cached descriptor per call).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.get_mut().clear();
        // SAFETY: created in `Lt::new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Plans kept before the cache is cleared (a program has a few dozen GEMM shapes).
const MAX_PLANS: usize = 4096;

impl Lt {
    /// Creates the handle. The caller has checked that libcublasLt loads.
    pub fn new(workspace: DeviceAlloc) -> std::result::Result<Self, String> {
        let handle = lt::create_handle().map_err(|e| lt_err("cublasLtCreate", e))?;
        Ok(Lt {
            handle,
            workspace,
            plans: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// `cublasLtGetVersion()`.
    pub fn version() -> usize {
        // SAFETY: no arguments; the library is loaded (checked before `Lt::new`).
        unsafe { ltsys::cublasLtGetVersion() }
    }

    /// Enqueues `call` on `stream`.
    ///
    /// # Safety
    /// Every pointer of `call` must address device memory holding the described operands, and
    /// the device context must be current.
    pub unsafe fn matmul(
        &self,
        dtype: DType,
        call: &LtCall,
        stream: cudarc::driver::sys::CUstream,
    ) -> std::result::Result<(), LtFailure> {
        let key = (
            dtype,
            call.shape,
            [alignment(call.a), alignment(call.b), alignment(call.c)],
        );
        let mut plans = self.plans.lock();
        if !plans.contains_key(&key) {
            if plans.len() >= MAX_PLANS {
                plans.clear();
            }
            let p = LtPlan::new(self.handle, dtype, &call.shape, key.2).map_err(|e| match e {
                LtFailure::NoAlgorithm(m) => {
                    LtFailure::NoAlgorithm(format!("{m} for {dtype} {:?}", call.shape))
                }
                LtFailure::Other(m) => {
                    LtFailure::Other(format!("{m} for {dtype} {:?}", call.shape))
                }
            })?;
            plans.insert(key, p);
        }
        let p = &plans[&key];
        if let Some(bias) = call.bias {
            lt::set_matmul_desc_attribute(
                p.desc,
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias as *const u64).cast(),
                8,
            )
            .map_err(|e| LtFailure::Other(lt_err("set bias pointer", e)))?;
        }
        let alpha = call.alpha;
        let beta: f32 = if call.shape.accumulate { 1.0 } else { 0.0 };
        lt::matmul(
            self.handle,
            p.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            call.a as *const c_void,
            p.a,
            call.b as *const c_void,
            p.b,
            call.c as *const c_void,
            p.c,
            call.c as *mut c_void,
            p.c,
            &p.algo,
            self.workspace.ptr as *mut c_void,
            self.workspace.bytes,
            stream as ltsys::cudaStream_t,
        )
        .map_err(|e| {
            LtFailure::Other(format!(
                "cublasLtMatmul {dtype} {:?}: {:?}",
                call.shape, e.0
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    //! The mapping and the path choice, checked on the host: a column-major interpreter of the
    //! cuBLASLt call and of the epilogue kernel's documented grid must reproduce the row-major
    //! definition of [`GemmArgs`] on random problems. Addresses here are element indices into
    //! one f64 "memory" (element size 1), which is all `plan` needs.
    use super::*;
    use crate::rng::SplitMix64 as Rng;

    /// The activations in f64 (both sides of each comparison use this).
    fn act64(act: Act, x: f64) -> f64 {
        match act {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Gelu => 0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)),
            Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        }
    }

    /// Row-major definition of `GemmArgs` on `mem`.
    fn reference(mem: &mut [f64], a: &GemmArgs) {
        let before = mem.to_vec();
        for b in 0..a.batch {
            for i in 0..a.m {
                for j in 0..a.n {
                    let mut acc = 0.0;
                    for l in 0..a.k {
                        let x = before[a.a as usize + b * a.batch_stride_a + i * a.lda + l];
                        let bi = if a.b_trans {
                            j * a.ldb + l
                        } else {
                            l * a.ldb + j
                        };
                        acc += x * before[a.b as usize + b * a.batch_stride_b + bi];
                    }
                    let mut v = a.alpha as f64 * acc;
                    if let Some(bias) = a.bias {
                        v += before[bias as usize + j];
                    }
                    v = act64(a.act, v);
                    if let Some(r) = a.residual {
                        v += before[r.addr as usize + b * r.batch_stride + i * r.ld + j];
                    }
                    mem[a.c as usize + b * a.batch_stride_c + i * a.ldc + j] = v;
                }
            }
        }
    }

    /// What cuBLASLt does with `call` (column-major, module docs).
    fn run_lt(mem: &mut [f64], call: &LtCall) {
        let s = &call.shape;
        let before = mem.to_vec();
        for p in 0..s.batch as i64 {
            for i in 0..s.m as i64 {
                for j in 0..s.n as i64 {
                    let mut acc = 0.0;
                    for l in 0..s.k as i64 {
                        let (r, c) = if s.trans_a { (l, i) } else { (i, l) };
                        let av = before[(call.a as i64 + p * s.stride_a + c * s.lda + r) as usize];
                        let bv = before[(call.b as i64 + p * s.stride_b + j * s.ldb + l) as usize];
                        acc += av * bv;
                    }
                    let ci = (call.c as i64 + p * s.stride_c + j * s.ldc + i) as usize;
                    let mut v = call.alpha as f64 * acc;
                    if s.accumulate {
                        v += before[ci];
                    }
                    match s.epilogue {
                        LtEpilogue::Default => {}
                        LtEpilogue::Bias => v += before[call.bias.unwrap() as usize + i as usize],
                        LtEpilogue::Relu => v = v.max(0.0),
                        LtEpilogue::ReluBias => {
                            v = (v + before[call.bias.unwrap() as usize + i as usize]).max(0.0)
                        }
                    }
                    mem[ci] = v;
                }
            }
        }
    }

    /// What the epilogue kernel does for one launch, thread by thread over the grid.
    fn run_epilogue(mem: &mut [f64], l: &EpilogueLaunch) {
        for z in 0..l.grid[2] as usize {
            for y in 0..l.grid[1] as usize {
                for x in 0..(l.grid[0] * EPILOGUE_BLOCK) as usize {
                    if x >= l.n as usize || y >= l.m as usize || z >= l.batch as usize {
                        continue;
                    }
                    let ci = l.c as usize + z * l.batch_stride_c as usize + y * l.ldc as usize + x;
                    let mut v = mem[ci];
                    if l.bias != 0 {
                        v += mem[l.bias as usize + x];
                    }
                    v = act64(
                        [Act::None, Act::Gelu, Act::Relu, Act::QuickGelu][l.act as usize],
                        v,
                    );
                    if l.residual != 0 {
                        v += mem[l.residual as usize
                            + z * l.batch_stride_r as usize
                            + y * l.ldr as usize
                            + x];
                    }
                    mem[ci] = v;
                }
            }
        }
    }

    /// Runs `plan(a)` the way `CudaDevice::gemm` does, with scratch at `scratch`.
    fn run_plan(mem: &mut [f64], a: &GemmArgs, scratch: usize, level: Level) -> GemmPlan {
        let p = plan_at(a, DType::F32, level).unwrap().unwrap();
        if level == Level::PerBatch && p.lt.shape.batch > 1 {
            // As `CudaDevice::gemm`: one batch-1 plan per batch, in order.
            for one in split_batches(a, 1) {
                run_plan(mem, &one, scratch, level);
            }
            return p;
        }
        if let Some(s) = p.save {
            for b in 0..s.batch {
                for i in 0..s.m {
                    for j in 0..s.n {
                        mem[scratch + (b * s.m + i) * s.n + j] =
                            mem[s.c as usize + b * s.batch_stride_c + i * s.ldc + j];
                    }
                }
            }
        }
        run_lt(mem, &p.lt);
        if let Some(e) = p.epilogue {
            for l in epilogue_launches(&e, e.resolved_residual(scratch as u64), 1) {
                run_epilogue(mem, &l);
            }
        }
        p
    }

    #[derive(Clone, Copy)]
    struct Case {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        b_trans: bool,
        bcast_a: bool,
        bcast_b: bool,
        packed: bool,
        bias: Option<bool>, // Some(aligned)
        act: Act,
        residual: u8, // 0 none, 1 in place, 2 other buffer, 3 other with batch stride 0, 4 ld 0
        alpha: f32,
        level: Level,
    }

    impl Case {
        /// A random fused case with dimensions in 1..=`max_dim`.
        fn random(rng: &mut Rng, max_dim: u64, alpha: f32) -> Case {
            let acts = [Act::None, Act::Gelu, Act::Relu, Act::QuickGelu];
            Case {
                batch: 1 + rng.below(3) as usize,
                m: 1 + rng.below(max_dim) as usize,
                n: 1 + rng.below(max_dim) as usize,
                k: 1 + rng.below(max_dim) as usize,
                b_trans: rng.below(2) == 0,
                bcast_a: rng.below(5) == 0,
                bcast_b: rng.below(3) == 0,
                packed: rng.below(2) == 0,
                bias: match rng.below(3) {
                    0 => None,
                    1 => Some(true),
                    _ => Some(false),
                },
                act: acts[rng.below(4) as usize],
                residual: rng.below(5) as u8,
                alpha,
                level: Level::Fused,
            }
        }
    }

    /// Builds the arguments of `case` in a fresh memory, runs the plan and the reference, and
    /// compares every element (outputs and everything else).
    fn check(case: Case, rng: &mut Rng) -> GemmPlan {
        let Case {
            batch,
            m,
            n,
            k,
            b_trans,
            ..
        } = case;
        let pad = if case.packed { 0 } else { 3 };
        let lda = k + pad;
        let ldb = if b_trans { k } else { n } + pad;
        let ldc = n + pad;
        let sa = if case.bcast_a {
            0
        } else if case.packed {
            m * lda
        } else {
            m * lda + 5
        };
        let sb = if case.bcast_b {
            0
        } else {
            (if b_trans { n } else { k }) * ldb + 7
        };
        let sc = if case.packed { m * ldc } else { m * ldc + 2 };
        let mut top = 0usize;
        let mut region = |len: usize, align: usize| {
            let start = top.div_ceil(align) * align;
            top = start + len;
            start
        };
        let a0 = region(sa * (batch - 1) + m * lda, 1);
        let b0 = region(sb * (batch - 1) + (if b_trans { n } else { k }) * ldb, 1);
        let c0 = region(sc * (batch - 1) + m * ldc, 1);
        let bias = case.bias.map(|aligned| {
            let at = region(n + 1, 16);
            if aligned {
                at
            } else {
                at + 1
            }
        });
        let residual = match case.residual {
            0 => None,
            1 => Some(Residual {
                addr: c0 as u64,
                ld: ldc,
                batch_stride: sc,
            }),
            2 => Some(Residual {
                addr: region(batch * m * (n + 1), 1) as u64,
                ld: n + 1,
                batch_stride: m * (n + 1),
            }),
            3 => Some(Residual {
                addr: region(m * n, 1) as u64,
                ld: n,
                batch_stride: 0,
            }),
            _ => Some(Residual {
                addr: region(batch * n, 1) as u64,
                ld: 0,
                batch_stride: n,
            }),
        };
        let scratch = region(batch * m * n, 1);
        let mut mem: Vec<f64> = (0..top).map(|_| rng.unit_f64() * 2.0 - 1.0).collect();
        let args = GemmArgs {
            batch,
            m,
            n,
            k,
            a: a0 as u64,
            lda,
            batch_stride_a: sa,
            b: b0 as u64,
            ldb,
            batch_stride_b: sb,
            b_trans,
            c: c0 as u64,
            ldc,
            batch_stride_c: sc,
            alpha: case.alpha,
            bias: bias.map(|b| b as u64),
            act: case.act,
            residual,
        };
        let mut want = mem.clone();
        reference(&mut want, &args);
        let p = run_plan(&mut mem, &args, scratch, case.level);
        for (i, (g, w)) in mem.iter().zip(&want).enumerate() {
            if i >= scratch && i < scratch + batch * m * n {
                continue; // scratch contents are not part of the contract
            }
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                "element {i}: {g} != {w}; plan {p:?}"
            );
        }
        p
    }

    #[test]
    fn every_case_matches_the_row_major_definition() {
        let mut rng = Rng(7);
        let mut paths = [0usize; 3];
        for trial in 0..400 {
            let case = Case::random(&mut rng, 9, if trial % 4 == 0 { 0.5 } else { 1.0 });
            let p = check(case, &mut rng);
            let path = match (p.save.is_some(), p.epilogue.is_some()) {
                (true, _) => 2,
                (false, true) => 1,
                (false, false) => 0,
            };
            paths[path] += 1;
        }
        assert!(
            paths.iter().all(|&c| c > 10),
            "paths not all exercised: {paths:?}"
        );
    }

    fn base() -> Case {
        Case {
            batch: 1,
            m: 5,
            n: 6,
            k: 4,
            b_trans: true,
            bcast_a: false,
            bcast_b: false,
            packed: true,
            bias: Some(true),
            act: Act::None,
            residual: 0,
            alpha: 1.0,
            level: Level::Fused,
        }
    }

    /// The fallbacks of a heuristic without algorithm: every level computes the same result on
    /// every case (the unfused matmul + epilogue kernel, and per-batch matmuls, equal the fused
    /// plan and the definition), and the level chain goes fused -> unfused -> per batch -> error.
    #[test]
    fn every_fallback_level_matches_the_row_major_definition() {
        let mut rng = Rng(23);
        for _ in 0..300 {
            let case = Case::random(&mut rng, 7, 1.0);
            let fused = check(case, &mut rng);
            let unfused = check(
                Case {
                    level: Level::Unfused,
                    ..case
                },
                &mut rng,
            );
            assert_eq!(unfused.lt.shape.epilogue, LtEpilogue::Default);
            assert!(unfused.lt.bias.is_none());
            check(
                Case {
                    level: Level::PerBatch,
                    ..case
                },
                &mut rng,
            );
            // The chain after "no algorithm".
            let after_fused = next_level(Level::Fused, &fused);
            if fused.lt.shape.epilogue != LtEpilogue::Default {
                assert_eq!(after_fused, Some(Level::Unfused));
            } else if fused.lt.shape.batch > 1 {
                assert_eq!(after_fused, Some(Level::PerBatch));
            } else {
                assert_eq!(after_fused, None);
            }
            let after_unfused = next_level(Level::Unfused, &unfused);
            let want = (unfused.lt.shape.batch > 1).then_some(Level::PerBatch);
            assert_eq!(after_unfused, want);
            assert_eq!(next_level(Level::PerBatch, &unfused), None);
        }
    }

    #[test]
    fn model_cases_take_the_documented_paths() {
        let mut rng = Rng(11);
        // Plain linear with bias: one fused call.
        let p = check(base(), &mut rng);
        assert_eq!(p.lt.shape.epilogue, LtEpilogue::Bias);
        assert!(p.epilogue.is_none() && !p.lt.shape.accumulate);
        // ReLU linear: RELU_BIAS.
        let p = check(
            Case {
                act: Act::Relu,
                ..base()
            },
            &mut rng,
        );
        assert_eq!(p.lt.shape.epilogue, LtEpilogue::ReluBias);
        assert!(p.epilogue.is_none());
        // In-place residual: beta = 1, still one call.
        let p = check(
            Case {
                residual: 1,
                ..base()
            },
            &mut rng,
        );
        assert!(p.lt.shape.accumulate && p.epilogue.is_none());
        // Exact GELU: GEMM then the kernel.
        let p = check(
            Case {
                act: Act::Gelu,
                ..base()
            },
            &mut rng,
        );
        assert_eq!(p.lt.shape.epilogue, LtEpilogue::Default);
        assert!(p.epilogue.is_some() && p.save.is_none());
        // GELU with the residual in place: save C first.
        let p = check(
            Case {
                act: Act::Gelu,
                residual: 1,
                ..base()
            },
            &mut rng,
        );
        assert!(p.save.is_some());
        // Patch embedding: shared weight, packed batches, position embedding broadcast over
        // the batch: folded into one GEMM of batch*m rows, then the kernel.
        let p = check(
            Case {
                batch: 3,
                bcast_b: true,
                residual: 3,
                ..base()
            },
            &mut rng,
        );
        assert_eq!((p.lt.shape.batch, p.lt.shape.n), (1, 15));
        assert!(p.epilogue.is_some());
        // Mask product with an ld-0 residual: batched, then the kernel.
        let p = check(
            Case {
                batch: 2,
                b_trans: false,
                bias: None,
                residual: 4,
                ..base()
            },
            &mut rng,
        );
        assert_eq!(p.lt.shape.batch, 2);
        assert!(p.epilogue.is_some());
        // Unaligned bias with an in-place residual: C += A@B in cuBLASLt, the bias in the kernel.
        let p = check(
            Case {
                bias: Some(false),
                residual: 1,
                ..base()
            },
            &mut rng,
        );
        assert!(p.lt.shape.accumulate && p.lt.bias.is_none() && p.epilogue.is_some());
    }

    #[test]
    fn epilogue_splits_rows_and_batches_at_the_grid_limit() {
        let e = EpilogueCall {
            c: 1000,
            ldc: 3,
            batch_stride_c: 3 * 70_000,
            bias: None,
            residual: Some(Residual {
                addr: 5_000_000,
                ld: 2,
                batch_stride: 2 * 70_000,
            }),
            residual_is_scratch: false,
            batch: 2,
            m: 70_000,
            n: 2,
            act: Act::Relu,
        };
        let l = epilogue_launches(&e, e.residual, 2);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].grid, [1, 65_535, 2]);
        assert_eq!(l[1].grid, [1, 70_000 - 65_535, 2]);
        assert_eq!(l[1].c, 1000 + 65_535 * 3 * 2);
        assert_eq!(l[1].residual, 5_000_000 + 65_535 * 2 * 2);
        assert_eq!((l[1].m, l[1].batch, l[1].act), (4465, 2, 2));
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let mut a = GemmArgs {
            batch: 1,
            m: 2,
            n: 3,
            k: 4,
            a: 0,
            lda: 4,
            batch_stride_a: 0,
            b: 0,
            ldb: 4,
            batch_stride_b: 0,
            b_trans: true,
            c: 0,
            ldc: 2, // < n
            batch_stride_c: 0,
            alpha: 1.0,
            bias: None,
            act: Act::None,
            residual: None,
        };
        let e = plan(&a, DType::BF16).unwrap_err();
        assert!(
            matches!(e, Error::Input(ref m) if m.contains("ldc 2")),
            "{e}"
        );
        a.ldc = 3;
        a.k = 0;
        assert!(matches!(plan(&a, DType::F16), Err(Error::Input(_))));
        a.k = 4;
        assert!(matches!(plan(&a, DType::U8), Err(Error::Input(_))));
        a.batch = 2; // output batches overlap (stride 0)
        assert!(matches!(plan(&a, DType::F32), Err(Error::Input(_))));
        a.m = 0;
        assert!(plan(&a, DType::F32).unwrap().is_none());
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(0x7f00_0000_1000), 256);
        assert_eq!(alignment(0x1000 + 2), 2);
        assert_eq!(alignment(0x1000 + 48), 16);
    }
}
