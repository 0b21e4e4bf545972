//! Backends run ops (DESIGN.md, "The op set"). This module is the contract between the model,
//! written once as a [`crate::program::Program`], and the devices that execute it:
//!
//! - [`cpu`]: f32, multi-threaded, SIMD GEMM; the numerical reference;
//! - [`kernel`]: the launch code shared by every device that runs the `.cu` kernels: the host
//!   emulator ([`emu`]) and CUDA ([`cuda`]).
//!
//! Memory model: every backend hands out [`Buffer`]s whose contents live at a 64-bit address
//! ([`Addr`]): a host address on `cpu` and `emu`, a `CUdeviceptr` on `cuda`. Op arguments are
//! addresses plus element strides, exactly what a kernel launch receives, so one argument
//! struct serves every backend. All strides and offsets are in elements, not bytes.
//!
//! Dtypes: model ops ([`Backend::gemm`] .. [`Backend::embed_gather`]) read and write the
//! backend's storage dtype ([`Backend::dtype`]) unless an argument says otherwise; compute and
//! accumulation are always f32. Volume ops (pipeline) work on f32 volumes.

pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod kernel;

use crate::dtype::DType;
use crate::error::Result;
use std::any::Any;

/// A device address: a host pointer on `cpu`/`emu`, a `CUdeviceptr` on `cuda`.
pub type Addr = u64;

/// A device allocation. Dropping it frees the memory.
pub struct Buffer {
    addr: Addr,
    bytes: usize,
    /// Keeps the allocation alive (a host vector, a `CudaSlice`, ...).
    _owner: Box<dyn Any + Send + Sync>,
}

impl Buffer {
    /// Wraps an allocation. `owner` must keep `[addr, addr + bytes)` valid while it lives.
    pub fn new(addr: Addr, bytes: usize, owner: Box<dyn Any + Send + Sync>) -> Self {
        Buffer {
            addr,
            bytes,
            _owner: owner,
        }
    }

    /// The start address.
    pub fn addr(&self) -> Addr {
        self.addr
    }

    /// The address `offset_bytes` into the buffer.
    pub fn at(&self, offset_bytes: usize) -> Addr {
        debug_assert!(offset_bytes <= self.bytes);
        self.addr + offset_bytes as u64
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({:#x}, {} bytes)", self.addr, self.bytes)
    }
}

/// The activation applied by an epilogue (spec §7.3 lists where each is used).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    None,
    /// Exact erf GELU (`nn.GELU()`): ViT MLP, decoder upscaling.
    Gelu,
    /// Two-way transformer MLP, hypernetworks.
    Relu,
    /// CLIP: x * sigmoid(1.702 x).
    QuickGelu,
}

impl Act {
    /// The activation in f32, as every backend must compute it.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Gelu => 0.5 * x * erfc_f32(-x * std::f32::consts::FRAC_1_SQRT_2),
            Act::Relu => x.max(0.0),
            Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        }
    }

    /// Index used in kernel arguments (matches `kernels/common.cuh`).
    pub fn code(self) -> i32 {
        match self {
            Act::None => 0,
            Act::Gelu => 1,
            Act::Relu => 2,
            Act::QuickGelu => 3,
        }
    }
}

/// erfc in f32 (musl's `erfcf` through the `libm` crate, < 1 ulp): the exact-GELU reference,
/// `0.5 x erfc(-x / sqrt 2)`, which is `0.5 x (1 + erf(x / sqrt 2))` without the cancellation
/// of `1 + erf` for negative `x`.
#[inline]
pub fn erfc_f32(x: f32) -> f32 {
    libm::erfcf(x)
}

/// `C[b] = act(alpha * A[b] @ op(B[b]) + bias) + residual[b]`, f32 accumulation.
///
/// Element addresses (all in the backend dtype unless noted):
/// - `A[b][i][k]` at `a + b*batch_stride_a + i*lda + k` (row-major M x K);
/// - `B[b][k][j]`: if `b_trans` (a `nn.Linear` weight, N x K) at `b + b*batch_stride_b + j*ldb + k`,
///   else (K x N) at `b + b*batch_stride_b + k*ldb + j`;
/// - `C[b][i][j]` at `c + b*batch_stride_c + i*ldc + j`;
/// - `bias[j]` (length N) and `residual[b][i][j]` at `r + b*batch_stride_r + i*ldr + j`.
///
/// A batch stride of 0 broadcasts that operand over the batch (the position embedding is added
/// as a residual with `batch_stride_r = 0`). `residual` may alias `c` exactly (in-place
/// `x += f(x)`); no other operands may overlap `c`. A residual `ld` of 0 adds the same row to
/// every row of `C[b]` (the text similarity of spec §4.5).
#[derive(Clone, Copy, Debug)]
pub struct GemmArgs {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Addr,
    pub lda: usize,
    pub batch_stride_a: usize,
    pub b: Addr,
    pub ldb: usize,
    pub batch_stride_b: usize,
    pub b_trans: bool,
    pub c: Addr,
    pub ldc: usize,
    pub batch_stride_c: usize,
    pub alpha: f32,
    pub bias: Option<Addr>,
    pub act: Act,
    pub residual: Option<Residual>,
}

/// The residual operand of a GEMM epilogue.
#[derive(Clone, Copy, Debug)]
pub struct Residual {
    pub addr: Addr,
    pub ld: usize,
    pub batch_stride: usize,
}

/// Multi-head scaled-dot-product attention, fused (online softmax, f32 accumulation).
///
/// `out[b][i][h*head_dim + e] = Σ_j softmax_j(scale * q[b,i,h,:]·k[b,j,h,:]) v[b,j,h,e]`, with
/// `j <= i` when `causal`. Element `(b, i, h, e)` of `q` is at
/// `q + b*q_batch + i*q_row + h*head_dim + e`; likewise for `k`, `v` and `out`. So q, k and v
/// may be strided views of one packed QKV buffer (the address carries the column offset).
#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs {
    pub batch: usize,
    pub heads: usize,
    pub nq: usize,
    pub nk: usize,
    pub head_dim: usize,
    pub q: Addr,
    pub q_row: usize,
    pub q_batch: usize,
    pub k: Addr,
    pub k_row: usize,
    pub k_batch: usize,
    pub v: Addr,
    pub v_row: usize,
    pub v_batch: usize,
    pub out: Addr,
    pub o_row: usize,
    pub o_batch: usize,
    pub scale: f32,
    pub causal: bool,
}

/// Row-wise LayerNorm over the last dim: `out[r] = (x[r] - mean) / sqrt(var + eps) * w + b`,
/// biased variance, f32 statistics. `x` and `out` are contiguous `rows x cols`; `out` may
/// equal `x`.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormArgs {
    pub x: Addr,
    pub out: Addr,
    pub rows: usize,
    pub cols: usize,
    pub weight: Addr,
    pub bias: Addr,
    pub eps: f32,
}

/// One LayerNorm over all `n` values of each of `batch` samples with elementwise affine
/// `weight[n]`, `bias[n]`, then `act` (spec §4.4, `output_upscaling.1` + GELU). `out` may equal
/// `x`. Statistics in f32 with a two-stage reduction.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormJointArgs {
    pub x: Addr,
    pub out: Addr,
    pub batch: usize,
    pub n: usize,
    pub weight: Addr,
    pub bias: Addr,
    pub eps: f32,
    pub act: Act,
}

/// ConvTranspose3d with kernel 2, stride 2 (spec §4.4):
/// `out[b,o,2d+a,2h+p,2w+c] = act(bias[o] + Σ_i in[b,i,d,h,w] * W[i,o,a,p,c])`.
///
/// Input: channel-first `(B, Cin, D, H, W)`, or with `channels_last_input` the token layout
/// `(B, D*H*W, Cin)` that the two-way transformer produces. Weight `(Cin, Cout, 2, 2, 2)`,
/// bias `(Cout)`. Output always channel-first `(B, Cout, 2D, 2H, 2W)`.
#[derive(Clone, Copy, Debug)]
pub struct ConvT3dArgs {
    pub x: Addr,
    pub out: Addr,
    pub weight: Addr,
    pub bias: Addr,
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    /// Input spatial size (D, H, W).
    pub dims: [usize; 3],
    pub channels_last_input: bool,
    pub act: Act,
}

/// Interpolation mode with PyTorch's exact index arithmetic (spec §4.6, §6.4, §6.6, §7.9).
/// Scales are `in/out` computed in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterpMode {
    /// `mode='trilinear', align_corners=False`: `s = max(0, (dst + 0.5) * scale - 0.5)`,
    /// upper neighbour clamped to `in - 1`.
    Trilinear,
    /// `mode='nearest-exact'`: `src = min(floor((dst + 0.5) * scale), in - 1)`.
    NearestExact,
    /// Legacy `mode='nearest'`: `src = min(floor(dst * scale), in - 1)`.
    Nearest,
}

/// Resizes `planes` independent 3-D planes (B*C) from `src` to `dst` size. `x` has dtype
/// `x_dtype`, `out` has dtype `out_dtype` (each f32 or the backend dtype).
#[derive(Clone, Copy, Debug)]
pub struct Interp3dArgs {
    pub x: Addr,
    pub x_dtype: DType,
    pub out: Addr,
    pub out_dtype: DType,
    pub planes: usize,
    pub src: [usize; 3],
    pub dst: [usize; 3],
    pub mode: InterpMode,
}

/// Gathers 3-D patches into rows for the patch-embedding GEMM (spec §1.2): input
/// `(B, 1, D, H, W)` of dtype `x_dtype`, output `(B, N, pd*ph*pw)` in the backend dtype, with
/// token `t = i*(H/ph*W/pw) + j*(W/pw) + k` and feature `f = a*ph*pw + b*pw + c`.
#[derive(Clone, Copy, Debug)]
pub struct PatchGatherArgs {
    pub x: Addr,
    pub x_dtype: DType,
    pub out: Addr,
    pub batch: usize,
    pub dims: [usize; 3],
    pub patch: [usize; 3],
}

/// `out[i] = a[i] + b[i % period]` for `i < n`: plain add (`period = n`), row broadcast
/// (`period = cols`) or batch broadcast (`period = rows*cols`). `out` may equal `a`.
#[derive(Clone, Copy, Debug)]
pub struct AddArgs {
    pub a: Addr,
    pub b: Addr,
    pub out: Addr,
    pub n: usize,
    pub period: usize,
}

/// `out[i] = act(x[i] * scale)` for `i < n`; `out` may equal `x`.
#[derive(Clone, Copy, Debug)]
pub struct ActArgs {
    pub x: Addr,
    pub out: Addr,
    pub n: usize,
    pub scale: f32,
    pub act: Act,
}

/// Token embedding: `out[r] = table[ids[r]] + pos[r]` for `r < rows`, rows of `cols`.
/// `ids` are i32 on the device; `pos` is `rows x cols` (the first rows of the position table).
#[derive(Clone, Copy, Debug)]
pub struct EmbedArgs {
    pub ids: Addr,
    pub table: Addr,
    pub vocab: usize,
    pub pos: Addr,
    pub out: Addr,
    pub rows: usize,
    pub cols: usize,
}

// ----- Volume ops (pipeline, spec §6). Outputs never alias inputs unless an op says so. -----

/// Foreground intensity statistics (spec §6.2), computed over a whole f32 volume.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForegroundStats {
    /// Mean of all voxels, the foreground threshold: numpy's float32 `np.mean` (chunked pairwise
    /// f32 sum, `cpu::volume::numpy_sum_f32`; an f64 sum agrees within the fixtures' 1e-6).
    pub threshold: f32,
    /// Voxels strictly above the threshold.
    pub count: u64,
    /// `percentile(F, 0.05)` and `percentile(F, 99.95)`, numpy linear interpolation, f64.
    pub p_lo: f64,
    pub p_hi: f64,
    /// Mean and population std of the foreground, as numpy computes them in float32 (same
    /// summation as `threshold`).
    pub mean: f32,
    pub std: f32,
}

/// `z = (clip(x, lo, hi) - mean) / std` elementwise, f32 (spec §6.2). Returns min and max of z.
#[derive(Clone, Copy, Debug)]
pub struct ClipZscoreArgs {
    pub x: Addr,
    pub out: Addr,
    pub n: usize,
    pub lo: f32,
    pub hi: f32,
    pub mean: f32,
    pub std: f32,
}

/// `out = (x - sub) / div` elementwise, f32 (the min-max step of spec §6.2).
#[derive(Clone, Copy, Debug)]
pub struct ShiftScaleArgs {
    pub x: Addr,
    pub out: Addr,
    pub n: usize,
    pub sub: f32,
    pub div: f32,
}

/// Copies a box of `extent` voxels between two 3-D f32 volumes, with zero padding where the
/// source index falls outside the source: for every `p < extent`,
/// `dst[dst_start + p] = src_in_bounds(src_start + p) ? src[src_start + p] : pad`.
/// `src_start` may be negative or run past the source (padding); the destination box must lie
/// inside `dst_dims`. `dst` has dtype `dst_dtype` (f32, or the backend dtype for a model
/// input window). Used for the foreground crop, window extraction and back-fill.
#[derive(Clone, Copy, Debug)]
pub struct CopyBoxArgs {
    pub src: Addr,
    pub src_dims: [usize; 3],
    pub src_start: [i64; 3],
    pub dst: Addr,
    pub dst_dtype: DType,
    pub dst_dims: [usize; 3],
    pub dst_start: [usize; 3],
    pub extent: [usize; 3],
    pub pad: f32,
}

/// Adds one window's f32 logits into the sliding-window accumulator and counts it (constant
/// blending, spec §6.8 step 7): for `p < window`, `acc[start + p] += win[p]; cnt[start + p] += 1`.
#[derive(Clone, Copy, Debug)]
pub struct AccumulateArgs {
    pub win: Addr,
    pub window: [usize; 3],
    pub acc: Addr,
    pub cnt: Addr,
    pub dims: [usize; 3],
    pub start: [usize; 3],
}

/// Checks that the box `[start, start + extent)` lies inside a volume of `dims` (the
/// argument check every backend shares for `bbox_above`, `copy_box`'s destination and
/// `accumulate_window`).
pub fn check_sub_box(
    dims: [usize; 3],
    start: [usize; 3],
    extent: [usize; 3],
) -> std::result::Result<(), String> {
    for ax in 0..3 {
        if start[ax]
            .checked_add(extent[ax])
            .is_none_or(|e| e > dims[ax])
        {
            return Err(format!(
                "box start {start:?} + extent {extent:?} exceeds dims {dims:?}"
            ));
        }
    }
    Ok(())
}

/// Inclusive bounding box `[d0, h0, w0, d1, h1, w1]`.
pub type BBox = [usize; 6];

/// A device that runs ops. Implementations: [`cpu::CpuBackend`], [`kernel::KernelBackend`] over
/// [`emu::EmuDevice`] or [`cuda::CudaDevice`].
///
/// # Safety
///
/// The op methods take raw device addresses. A caller must pass addresses that lie, together
/// with every element the arguments describe, inside live [`Buffer`]s allocated by this
/// backend, holding the dtypes the op documents, with no overlap between outputs and inputs
/// except where an op allows it.
pub trait Backend: Send + Sync {
    /// `cpu`, `emu`, `cuda:0`.
    fn name(&self) -> String;
    /// Storage dtype of weights and activations.
    fn dtype(&self) -> DType;
    /// The same device storing `dtype` instead (sharing its memory, streams and kernels), for
    /// the parts of the model worth running in another precision (the CLIP tower runs in f32:
    /// it costs ~1 GFLOP once per distinct text).
    fn with_dtype(&self, dtype: DType) -> Result<std::sync::Arc<dyn Backend>>;
    /// Whether device addresses are host addresses, so that f32 weights already in host
    /// memory (a memory-mapped checkpoint) can be used in place instead of copied.
    fn host_addressable(&self) -> bool {
        false
    }
    /// Declares the `bytes` at `addr` a constant (a weight tensor): unchanged until
    /// [`Backend::release_constant`] for the same address. A backend may keep layouts derived
    /// from it; the CPU backend keeps the packed GEMM panels of weights read as `b`, so that
    /// they are packed once per model rather than on every call. Default: nothing.
    fn retain_constant(&self, _addr: Addr, _bytes: usize) {}
    /// Ends [`Backend::retain_constant`] for `addr`: what was derived from it is dropped (the
    /// memory may hold something else next).
    fn release_constant(&self, _addr: Addr) {}
    /// Allocates `bytes` (256-byte aligned). Contents are unspecified.
    fn alloc(&self, bytes: usize) -> Result<Buffer>;
    /// Copies host bytes to `dst`.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must lie in a live buffer of this backend.
    unsafe fn upload(&self, dst: Addr, src: &[u8]) -> Result<()>;
    /// Copies device bytes at `src` to the host.
    ///
    /// # Safety
    /// `src .. src + dst.len()` must lie in a live buffer of this backend.
    unsafe fn download(&self, src: Addr, dst: &mut [u8]) -> Result<()>;
    /// Waits for queued work (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<()>;
    /// One line naming the device for reports (`segvol bench`): the name, and on CUDA the GPU,
    /// compute capability, the kernel image the driver loaded and library versions.
    fn description(&self) -> String {
        self.name()
    }
    /// Device memory free now, where the device reports it (the default memory budget of a
    /// whole-volume run on CUDA). `None` on the host backends.
    fn free_memory(&self) -> Option<usize> {
        None
    }
    /// Records the ops that `issue` submits into a replayable graph instead of running them
    /// (CUDA graphs). `Ok(None)` where the backend has no graphs: the caller then runs the ops
    /// directly.
    fn capture(
        &self,
        issue: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Box<dyn kernel::DeviceGraph>>> {
        let _ = issue;
        Ok(None)
    }
    /// Opens a named range on the profiler's timeline (NVTX on CUDA; nothing elsewhere).
    fn range_push(&self, name: &str) {
        let _ = name;
    }
    /// Closes the innermost range opened by [`Backend::range_push`].
    fn range_pop(&self) {}

    /// # Safety
    /// See the trait documentation.
    unsafe fn gemm(&self, a: &GemmArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn attention(&self, a: &AttentionArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn layer_norm(&self, a: &LayerNormArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn layer_norm_joint(&self, a: &LayerNormJointArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn conv_transpose3d_k2s2(&self, a: &ConvT3dArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn interp3d(&self, a: &Interp3dArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn patch_gather3d(&self, a: &PatchGatherArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn add(&self, a: &AddArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn activation(&self, a: &ActArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn embed_gather(&self, a: &EmbedArgs) -> Result<()>;

    /// Foreground statistics of an f32 volume of model-frame `dims` (D, H, W). The dims fix
    /// the summation order that reproduces numpy's float32 sums (spec §6.2).
    ///
    /// # Safety
    /// See the trait documentation.
    unsafe fn foreground_stats(&self, x: Addr, dims: [usize; 3]) -> Result<ForegroundStats>;
    /// # Safety
    /// See the trait documentation. Returns `(min, max)` of the output. `out` may equal `x`.
    unsafe fn clip_zscore(&self, a: &ClipZscoreArgs) -> Result<(f32, f32)>;
    /// # Safety
    /// See the trait documentation. `out` may equal `x`.
    unsafe fn shift_scale(&self, a: &ShiftScaleArgs) -> Result<()>;
    /// Bounding box of `x > threshold` inside the sub-box `[start, start + extent)` of an f32
    /// volume of `dims`, relative to `start`.
    ///
    /// # Safety
    /// See the trait documentation.
    unsafe fn bbox_above(
        &self,
        x: Addr,
        dims: [usize; 3],
        start: [usize; 3],
        extent: [usize; 3],
        threshold: f32,
    ) -> Result<Option<BBox>>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn copy_box(&self, a: &CopyBoxArgs) -> Result<()>;
    /// # Safety
    /// See the trait documentation.
    unsafe fn accumulate_window(&self, a: &AccumulateArgs) -> Result<()>;
    /// `out[i] = acc[i] / cnt[i]` where `cnt[i] > 0`, else `acc[i]` (f32). `out` may equal
    /// `acc`.
    ///
    /// # Safety
    /// See the trait documentation.
    unsafe fn divide_counts(&self, acc: Addr, cnt: Addr, out: Addr, n: usize) -> Result<()>;
    /// `dst[i] = value` for `n` f32 values (zeroing the sliding-window accumulators).
    ///
    /// # Safety
    /// See the trait documentation.
    unsafe fn fill(&self, dst: Addr, n: usize, value: f32) -> Result<()>;
    /// `out[i] = (x[i] > threshold) as u8` for an f32 `x`.
    ///
    /// # Safety
    /// See the trait documentation.
    unsafe fn threshold_u8(&self, x: Addr, out: Addr, n: usize, threshold: f32) -> Result<()>;
}

/// A profiler range that closes when dropped (NVTX on CUDA): `let _r = range(b, "zoom-in");`.
pub struct Range<'a>(&'a dyn Backend);

/// Opens a profiler range on `b` until the returned guard drops.
pub fn range<'a>(b: &'a dyn Backend, name: &str) -> Range<'a> {
    b.range_push(name);
    Range(b)
}

impl Drop for Range<'_> {
    fn drop(&mut self) {
        self.0.range_pop();
    }
}

/// The highest CUDA ordinal `--device cuda:N` accepts (a typo such as `cuda:100000` is
/// refused as usage rather than sent to the driver).
pub const MAX_CUDA_ORDINAL: usize = 63;

/// Which device a command runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The multi-threaded CPU backend (f32 only).
    Cpu,
    /// The CUDA kernels on the host emulator.
    Emu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

/// A device and the storage precision on it, parsed once from `--device` / `--precision`
/// and used by every command (segment, window, plan, bench): the one place that decides which
/// combinations exist. The CPU computes in f32 only; `emu` and `cuda` take f32, bf16 or f16
/// (default bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub dtype: DType,
}

impl DeviceSpec {
    /// Parses `--device` (`cpu`, `emu`, `cuda`, `cuda:N`) and `--precision` (`f32`, `bf16`,
    /// `f16`; `None` for the device's default). Unknown names, bad ordinals and unsupported
    /// combinations are `Error::Usage` naming the flag.
    pub fn parse(device: &str, precision: Option<&str>) -> Result<Self> {
        use crate::error::Error;
        let shown = |s: &str| -> String { s.chars().take(40).collect() };
        let kind = match device {
            "cpu" => DeviceKind::Cpu,
            "emu" => DeviceKind::Emu,
            "cuda" => DeviceKind::Cuda(0),
            d => match d.strip_prefix("cuda:") {
                Some(n) => DeviceKind::Cuda(
                    n.parse::<usize>()
                        .ok()
                        .filter(|&o| o <= MAX_CUDA_ORDINAL && !n.starts_with('+'))
                        .ok_or_else(|| {
                            Error::Usage(format!(
                                "device {}: expected cuda:N with N a GPU ordinal 0..{MAX_CUDA_ORDINAL}",
                                shown(d)
                            ))
                        })?,
                ),
                None => {
                    return Err(Error::Usage(format!(
                        "device {}: expected cpu, emu, cuda or cuda:N",
                        shown(d)
                    )))
                }
            },
        };
        let dtype = match precision {
            None => None,
            Some(p) => Some(DType::parse_precision(p).ok_or_else(|| {
                Error::Usage(format!("precision {}: expected f32, bf16 or f16", shown(p)))
            })?),
        };
        let dtype = match (kind, dtype) {
            (DeviceKind::Cpu, None | Some(DType::F32)) => DType::F32,
            (DeviceKind::Cpu, Some(p)) => {
                return Err(Error::Usage(format!(
                    "precision {p}: the cpu device computes in f32 only (use device emu or cuda for {p})"
                )))
            }
            (_, p) => p.unwrap_or(DType::BF16),
        };
        Ok(DeviceSpec { kind, dtype })
    }

    /// Whether the device's memory is the host's (cpu, emu): then the host buffers of a run
    /// and its device region share one budget.
    pub fn is_host(&self) -> bool {
        !matches!(self.kind, DeviceKind::Cuda(_))
    }

    /// Opens the backend.
    pub fn open(&self) -> Result<std::sync::Arc<dyn Backend>> {
        match self.kind {
            DeviceKind::Cpu => Ok(std::sync::Arc::new(cpu::CpuBackend::new())),
            DeviceKind::Emu => {
                let dev = emu::EmuDevice::new()?;
                Ok(std::sync::Arc::new(kernel::KernelBackend::new(
                    dev, self.dtype,
                )?))
            }
            DeviceKind::Cuda(ordinal) => {
                let dev = cuda::CudaDevice::new(ordinal)?;
                Ok(std::sync::Arc::new(kernel::KernelBackend::new(
                    dev, self.dtype,
                )?))
            }
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            DeviceKind::Cpu => write!(f, "cpu ({})", self.dtype),
            DeviceKind::Emu => write!(f, "emu ({})", self.dtype),
            DeviceKind::Cuda(n) => write!(f, "cuda:{n} ({})", self.dtype),
        }
    }
}

/// Opens a backend by name (`--device`): `cpu`, `emu` or `cuda[:N]`, storing weights and
/// activations as `precision` (default f32 on the CPU, bf16 elsewhere; the CPU runs f32 only).
/// Parsed by [`DeviceSpec::parse`].
pub fn open(device: &str, precision: Option<DType>) -> Result<std::sync::Arc<dyn Backend>> {
    let p = precision.map(|p| p.to_string());
    DeviceSpec::parse(device, p.as_deref())?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_known_values() {
        // 0.5 x (1 + erf(x / sqrt 2)), evaluated in high precision.
        let cases = [
            (1.0f32, 0.841_344_8_f32),
            (-1.0, -0.158_655_25),
            (0.5, 0.345_731_23),
            (3.0, 2.995_950_3),
        ];
        for (x, e) in cases {
            assert!(
                (Act::Gelu.apply(x) - e).abs() <= 1e-6 * e.abs().max(1.0),
                "gelu({x}) = {}",
                Act::Gelu.apply(x)
            );
        }
        assert_eq!(Act::Relu.apply(-2.0), 0.0);
    }

    /// Issue 9 item 14: one parser refuses unknown devices, bad ordinals and the CPU in
    /// anything but f32, for every command.
    #[test]
    fn device_spec_parses_and_refuses() {
        let ok = |d: &str, p: Option<&str>| DeviceSpec::parse(d, p).unwrap();
        assert_eq!(ok("cpu", None).dtype, DType::F32);
        assert_eq!(ok("cpu", Some("f32")).kind, DeviceKind::Cpu);
        assert_eq!(ok("emu", None).dtype, DType::BF16);
        assert_eq!(ok("cuda", Some("f16")).kind, DeviceKind::Cuda(0));
        assert_eq!(ok("cuda:3", None).kind, DeviceKind::Cuda(3));
        for (d, p, needle) in [
            ("tpu", None, "device tpu"),
            ("cuda:x", None, "device cuda:x"),
            ("cuda:", None, "cuda:N"),
            ("cuda:-1", None, "cuda:N"),
            ("cuda:99999999999999999999", None, "cuda:N"),
            ("cpu", Some("bf16"), "f32 only"),
            ("cpu", Some("f16"), "f32 only"),
            ("emu", Some("f8"), "precision f8"),
        ] {
            let e = DeviceSpec::parse(d, p).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{d} {p:?}: {e}");
            assert!(e.to_string().contains(needle), "{d} {p:?}: {e}");
        }
    }
}
