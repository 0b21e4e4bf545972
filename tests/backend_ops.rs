//! Table-driven backend tests (the pattern of llama.cpp's `test-backend-ops`): ONE list of
//! cases, each an op of the [`Backend`] trait with its shapes, storage dtypes and flags
//! (activation, in place, unaligned views, odd sizes), run on every device under test against
//! the CPU backend on the same inputs (rounded as the device stores them), and, where an f64
//! reference exists (`common::reference`: GEMM, attention, the layer norms, the transposed
//! convolution, add, activation, the foreground count and percentiles), both the device and the
//! CPU against it.
//!
//! Every buffer is poisoned (0xff bytes: NaN, 255 for u8) before the launch, with one poisoned
//! element before (where a case asks for an unaligned view) and one after each operand: an op
//! that writes nothing, too little, or outside its output fails. Elements the CPU leaves NaN
//! (untouched) must stay NaN on the device; every other element must match within the storage
//! dtype's tolerance (1e-5 in f32, 2e-2 in f16 / bf16, relative to the largest reference value,
//! as in `tests/parity_*.rs`), or bit for bit for the ops that move values or compute exactly
//! the CPU's operations (gathers, interpolation, volume ops).
//!
//! Devices: `SEGVOL_TEST_DEVICES` (`tests/common/mod.rs::devices()`); when it is unset, the CPU
//! and the emulator in f32, f16 and bf16 (the union of `devices()` and the parity harness'
//! default, so every dtype the bespoke parity tests covered stays covered). Volume ops are f32
//! whatever the storage dtype and run on the first device of each spec.
//!
//! `SEGVOL_BACKEND_OPS_FILTER=substr` runs only the cases whose name contains `substr`.
//! `SEGVOL_BACKEND_OPS_PERF=1` also times each case on each device (one warm-up launch, then
//! `SEGVOL_BACKEND_OPS_PERF_ITERS` launches, default 20, each followed by `synchronize`) and
//! prints one line per case and device:
//! `perf <device> <case> <median_us> us <rate> GFLOP/s|GB/s`; it adds the model-size cases
//! (`heavy`), which are skipped on the emulator. Run it with
//! `-- --nocapture --test-threads=1` (docs/kernels.md, "Backend op tests").

mod common;

use common::parity::{next_seed, random};
use common::reference as r64;
use segvol::backend::cpu::CpuBackend;
use segvol::backend::{
    AccumulateArgs, Act, ActArgs, AddArgs, Addr, AttentionArgs, Backend, Buffer, ClipZscoreArgs,
    ConvT3dArgs, CopyBoxArgs, EmbedArgs, GemmArgs, Interp3dArgs, InterpMode, LayerNormArgs,
    LayerNormJointArgs, PatchGatherArgs, Residual, ShiftScaleArgs,
};
use segvol::dtype::{decode_f32, encode_f32, DType};
use segvol::error::{Error, Result};
use segvol::rng::SplitMix64 as Rng;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

// ------------------------------------------------------------------------------------------------
// Devices
// ------------------------------------------------------------------------------------------------

struct Device {
    label: String,
    backend: Arc<dyn Backend>,
    /// The CPU backend itself (f32 only: cases with an explicit f16 / bf16 operand skip it).
    is_cpu: bool,
    /// The emulator (slow: the `heavy` perf cases skip it).
    is_emu: bool,
    /// The first device of its spec (storage-independent cases run there only).
    first_of_spec: bool,
}

impl Device {
    fn dtype(&self) -> DType {
        self.backend.dtype()
    }
}

fn devices() -> &'static [Device] {
    static DEVICES: OnceLock<Vec<Device>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let mut list = common::devices();
        if std::env::var_os("SEGVOL_TEST_DEVICES").is_none() {
            let at = list.len().min(2);
            list.insert(
                at,
                common::DeviceUnderTest {
                    spec: "emu".into(),
                    precision: DType::F16,
                },
            );
        }
        let mut seen: Vec<String> = Vec::new();
        list.iter()
            .map(|d| {
                let first = !seen.contains(&d.spec);
                seen.push(d.spec.clone());
                Device {
                    label: d.label(),
                    backend: d.open(),
                    is_cpu: d.spec == "cpu",
                    is_emu: d.spec == "emu",
                    first_of_spec: first,
                }
            })
            .collect()
    })
}

fn cpu() -> &'static CpuBackend {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    CPU.get_or_init(CpuBackend::new)
}

/// `values` as stored in `dt` (integer dtypes hold exact small integers: unchanged).
fn round_through(values: &[f32], dt: DType) -> Vec<f32> {
    if dt.is_float() {
        segvol::dtype::round_through(values, dt)
    } else {
        values.to_vec()
    }
}

fn perf_mode() -> bool {
    std::env::var("SEGVOL_BACKEND_OPS_PERF").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Parity tolerance of a storage dtype (`tests/common/parity.rs`, `OpDevice::tol`).
fn tol(dt: DType) -> f64 {
    if dt == DType::F32 {
        1e-5
    } else {
        2e-2
    }
}

// ------------------------------------------------------------------------------------------------
// Operands
// ------------------------------------------------------------------------------------------------

/// The dtype an operand is stored in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum St {
    /// The device's storage dtype (f32 on the CPU).
    S,
    /// f32 on every device.
    F32,
    /// This dtype on every kernel device (f32 on the CPU reference run for float dtypes).
    Is(DType),
}

impl St {
    fn on(self, dev: DType) -> DType {
        match self {
            St::S => dev,
            St::F32 => DType::F32,
            St::Is(d) => d,
        }
    }
    /// The dtype of the CPU reference run: floats become f32.
    fn on_cpu(self) -> DType {
        match self {
            St::Is(d) if !d.is_float() => d,
            _ => DType::F32,
        }
    }
    fn tag(self) -> String {
        match self {
            St::S => "s".into(),
            St::F32 => "f32".into(),
            St::Is(d) => d.to_string(),
        }
    }
}

enum Init {
    Values(Vec<f32>),
    Bytes(Vec<u8>),
    Poison,
}

/// One buffer of a case: `len` elements of `st`, starting `offset` elements into the buffer
/// (a poisoned prefix: an unaligned view), followed by one poisoned guard element.
struct Operand {
    st: St,
    len: usize,
    offset: usize,
    init: Init,
}

fn input(st: St, values: Vec<f32>) -> Operand {
    input_at(st, values, 0)
}
fn input_at(st: St, values: Vec<f32>, offset: usize) -> Operand {
    Operand {
        st,
        len: values.len(),
        offset,
        init: Init::Values(values),
    }
}
fn output(st: St, len: usize) -> Operand {
    output_at(st, len, 0)
}
fn output_at(st: St, len: usize, offset: usize) -> Operand {
    Operand {
        st,
        len,
        offset,
        init: Init::Poison,
    }
}
fn raw(dt: DType, bytes: Vec<u8>) -> Operand {
    Operand {
        st: St::Is(dt),
        len: bytes.len() / dt.size(),
        offset: 0,
        init: Init::Bytes(bytes),
    }
}

impl Operand {
    fn total(&self) -> usize {
        self.offset + self.len + 1
    }
    /// The bytes of the whole buffer stored as `dt`, values rounded through `round` first.
    fn bytes(&self, dt: DType, round: DType) -> Vec<u8> {
        let mut b = vec![0xffu8; self.total() * dt.size()];
        let at = self.offset * dt.size();
        match &self.init {
            Init::Values(v) => {
                let e = encode_f32(&round_through(v, round), dt);
                b[at..at + e.len()].copy_from_slice(&e);
            }
            Init::Bytes(x) => b[at..at + x.len()].copy_from_slice(x),
            Init::Poison => {}
        }
        b
    }
    /// The whole buffer as f32 values rounded through `dt` (NaN where poisoned).
    fn host(&self, dt: DType) -> Vec<f32> {
        let mut h = vec![f32::NAN; self.total()];
        match &self.init {
            Init::Values(v) => {
                h[self.offset..self.offset + v.len()].copy_from_slice(&round_through(v, dt))
            }
            Init::Bytes(x) => {
                h[self.offset..self.offset + self.len].copy_from_slice(&decode_f32(x, dt))
            }
            Init::Poison => {}
        }
        h
    }
    fn is_input(&self) -> bool {
        !matches!(self.init, Init::Poison)
    }
}

/// What a case needs: its buffers, which of them the op writes (compared), and its work for
/// perf mode.
struct Spec {
    operands: Vec<Operand>,
    reads: Vec<usize>,
    flops: f64,
    /// Bytes moved, where the operand sizes overstate it (sub-boxes of volumes).
    bytes: Option<f64>,
}

/// The operands of one run on one backend.
struct Placed {
    _bufs: Vec<Buffer>,
    /// Address of each operand's first element.
    addr: Vec<Addr>,
    dt: Vec<DType>,
}

fn place(be: &dyn Backend, ops: &[Operand], dt: &[DType], contents: &[Vec<u8>]) -> Placed {
    let mut bufs = Vec::new();
    let mut addr = Vec::new();
    for ((o, &d), c) in ops.iter().zip(dt).zip(contents) {
        let b = be.alloc(c.len()).unwrap();
        unsafe { be.upload(b.addr(), c).unwrap() };
        addr.push(b.addr() + (o.offset * d.size()) as u64);
        bufs.push(b);
    }
    be.synchronize().unwrap();
    Placed {
        _bufs: bufs,
        addr,
        dt: dt.to_vec(),
    }
}

fn read_back(be: &dyn Backend, p: &Placed, ops: &[Operand], i: usize) -> Vec<f32> {
    let d = p.dt[i];
    let mut bytes = vec![0u8; ops[i].total() * d.size()];
    let start = p.addr[i] - (ops[i].offset * d.size()) as u64;
    unsafe { be.download(start, &mut bytes).unwrap() };
    be.synchronize().unwrap();
    decode_f32(&bytes, d)
}

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------

/// Residual layouts of a GEMM epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Res {
    None,
    /// Its own buffer, ld n + 1, one matrix per batch.
    Ld,
    /// ld 0: one row added to every row.
    Row,
    /// Batch stride 0: one matrix for every batch.
    Shared,
    /// The residual is C itself (`x += f(x)`).
    InPlace,
}

/// Operand layouts of attention (`tests/parity_attention.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// q, k, v, out in separate contiguous buffers.
    Contig,
    /// q, k, v column views of one packed (batch*n, 3*width) QKV buffer; out rows padded by
    /// `pad` (gaps that must stay untouched).
    Packed(usize),
    /// Separate buffers with odd offsets, row and batch strides (the general load path).
    Odd,
}

/// How `add` aliases its operands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Alias {
    None,
    /// out = a.
    OutA,
    /// a = b = out (`x += x`).
    All,
}

/// Volumes for the foreground statistics (`tests/parity_volume_ops.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Vol {
    /// CT-like integer HU: air, soft tissue, some bone.
    Hu,
    /// Non-integer with a positive mean.
    Float,
    /// Non-integer over seven decades (any change of summation order shows).
    Decades,
    /// Integer, foreground span beyond the shared-memory histogram.
    Wide,
    /// Integer, span beyond 2^20 (the selection fallback).
    Huge,
    /// One voxel above the mean: both percentiles are that voxel, std 0.
    Single,
    /// Errors (`Error::Input`, the CPU's message): constant, a NaN, an infinity, no voxels,
    /// one voxel (its own mean: nothing above).
    Constant,
    Nan,
    Inf,
    Empty,
    One,
}

impl Vol {
    fn is_error(self) -> bool {
        matches!(
            self,
            Vol::Constant | Vol::Nan | Vol::Inf | Vol::Empty | Vol::One
        )
    }
    fn values(self, n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng(seed);
        match self {
            Vol::Hu => hu_volume(n, seed),
            Vol::Float => float_volume(n, seed),
            Vol::Decades => (0..n)
                .map(|_| {
                    let m = 10f32.powf(r.unit() * 7.0 - 3.0);
                    if r.below(4) == 0 {
                        -m
                    } else {
                        m
                    }
                })
                .collect(),
            Vol::Wide => (0..n).map(|_| r.below(100_000) as f32 - 5000.0).collect(),
            Vol::Huge => (0..n).map(|_| r.below(1 << 22) as f32 - 1000.0).collect(),
            Vol::Single => vec![0.0, 0.0, 0.0, 5.0, 0.0],
            Vol::Constant => vec![2.5; n],
            Vol::Nan | Vol::Inf => {
                let mut v = hu_volume(n, seed);
                v[r.below(n as u64) as usize] = if self == Vol::Nan {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                };
                v
            }
            Vol::Empty => vec![1.0],
            Vol::One => vec![42.0],
        }
    }
}

/// A CT-like integer volume (HU): air around -1000, soft tissue, some bone up to 3071.
fn hu_volume(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| {
            let k = r.below(100);
            let v = if k < 40 {
                -1024 + r.below(60) as i64
            } else if k < 95 {
                -150 + r.below(400) as i64
            } else {
                200 + r.below(2872) as i64
            };
            v as f32
        })
        .collect()
}

/// A non-integer volume with a positive mean.
fn float_volume(n: usize, seed: u64) -> Vec<f32> {
    random(n, 900.0, seed).iter().map(|v| v + 450.0).collect()
}

/// Counts 0..3 (some zero) for `divide_counts` and the accumulators.
fn counts(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed as usize) % 4) as f32)
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Gemm {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        b_trans: bool,
        /// B shared by every batch (batch stride 0).
        bcast_b: bool,
        bias: bool,
        act: Act,
        res: Res,
        alpha: f32,
        /// Extra elements in every leading dimension and batch stride.
        pad: usize,
    },
    Attention {
        batch: usize,
        heads: usize,
        nq: usize,
        nk: usize,
        hd: usize,
        causal: bool,
        layout: Layout,
        /// `None`: 1 / sqrt(hd).
        scale: Option<f32>,
    },
    LayerNorm {
        rows: usize,
        cols: usize,
        in_place: bool,
    },
    LayerNormJoint {
        batch: usize,
        n: usize,
        act: Act,
        in_place: bool,
    },
    ConvT {
        batch: usize,
        cin: usize,
        cout: usize,
        dims: [usize; 3],
        channels_last: bool,
        act: Act,
        /// x and out start this many elements into their buffers (unaligned).
        offset: usize,
    },
    Interp {
        planes: usize,
        src: [usize; 3],
        dst: [usize; 3],
        mode: InterpMode,
        x: St,
        out: St,
    },
    PatchGather {
        batch: usize,
        dims: [usize; 3],
        patch: [usize; 3],
        x: St,
    },
    Add {
        n: usize,
        period: usize,
        alias: Alias,
        offset: usize,
    },
    Activation {
        n: usize,
        act: Act,
        in_place: bool,
    },
    Embed {
        vocab: usize,
        rows: usize,
        cols: usize,
    },
    ForegroundStats {
        dims: [usize; 3],
        vol: Vol,
        misalign: bool,
    },
    ClipZscore {
        n: usize,
        misalign: bool,
        in_place: bool,
    },
    ShiftScale {
        n: usize,
        misalign: bool,
        in_place: bool,
    },
    BboxAbove {
        dims: [usize; 3],
        start: [usize; 3],
        extent: [usize; 3],
        /// Positives per 1000 voxels (0: no box).
        density: u64,
        misalign: bool,
    },
    CopyBox {
        src_dims: [usize; 3],
        src_start: [i64; 3],
        dst_dims: [usize; 3],
        dst_start: [usize; 3],
        extent: [usize; 3],
        dst: St,
        misalign: bool,
    },
    Accumulate {
        dims: [usize; 3],
        window: [usize; 3],
        start: [usize; 3],
    },
    DivideCounts {
        n: usize,
        misalign: bool,
        in_place: bool,
    },
    Fill {
        n: usize,
        misalign: bool,
    },
    ThresholdU8 {
        n: usize,
        misalign: bool,
    },
}

/// The Backend ops the table must cover, by the names [`Op::name`] gives.
const ALL_OPS: [&str; 19] = [
    "gemm",
    "attention",
    "layer_norm",
    "layer_norm_joint",
    "conv_transpose3d_k2s2",
    "interp3d",
    "patch_gather3d",
    "add",
    "activation",
    "embed_gather",
    "foreground_stats",
    "clip_zscore",
    "shift_scale",
    "bbox_above",
    "copy_box",
    "accumulate_window",
    "divide_counts",
    "fill",
    "threshold_u8",
];

/// How a case's outputs are compared with the CPU's.
#[derive(Clone, Copy, PartialEq)]
enum Cmp {
    /// Within the storage dtype's tolerance.
    Tol,
    /// Bit for bit, after rounding the CPU's value through the output dtype.
    Exact,
}

fn act_tag(a: Act) -> &'static str {
    match a {
        Act::None => "none",
        Act::Gelu => "gelu",
        Act::Relu => "relu",
        Act::QuickGelu => "qgelu",
    }
}

fn dims_tag(d: [usize; 3]) -> String {
    format!("{}x{}x{}", d[0], d[1], d[2])
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Gemm { .. } => "gemm",
            Op::Attention { .. } => "attention",
            Op::LayerNorm { .. } => "layer_norm",
            Op::LayerNormJoint { .. } => "layer_norm_joint",
            Op::ConvT { .. } => "conv_transpose3d_k2s2",
            Op::Interp { .. } => "interp3d",
            Op::PatchGather { .. } => "patch_gather3d",
            Op::Add { .. } => "add",
            Op::Activation { .. } => "activation",
            Op::Embed { .. } => "embed_gather",
            Op::ForegroundStats { .. } => "foreground_stats",
            Op::ClipZscore { .. } => "clip_zscore",
            Op::ShiftScale { .. } => "shift_scale",
            Op::BboxAbove { .. } => "bbox_above",
            Op::CopyBox { .. } => "copy_box",
            Op::Accumulate { .. } => "accumulate_window",
            Op::DivideCounts { .. } => "divide_counts",
            Op::Fill { .. } => "fill",
            Op::ThresholdU8 { .. } => "threshold_u8",
        }
    }

    /// A name without spaces: the op, then its parameters.
    fn label(&self) -> String {
        let f = |b: bool, s: &str| if b { format!("_{s}") } else { String::new() };
        let p = match self {
            Op::Gemm {
                batch,
                m,
                n,
                k,
                b_trans,
                bcast_b,
                bias,
                act,
                res,
                alpha,
                pad,
            } => format!(
                "b{batch}_m{m}_n{n}_k{k}{}{}{}_{}_res-{res:?}{}{}",
                f(*b_trans, "bt"),
                f(*bcast_b, "bcastb"),
                f(*bias, "bias"),
                act_tag(*act),
                if *alpha != 1.0 {
                    format!("_alpha{alpha}")
                } else {
                    String::new()
                },
                f(*pad > 0, &format!("pad{pad}")),
            ),
            Op::Attention {
                batch,
                heads,
                nq,
                nk,
                hd,
                causal,
                layout,
                scale,
            } => format!(
                "b{batch}_h{heads}_nq{nq}_nk{nk}_d{hd}{}_{}{}",
                f(*causal, "causal"),
                match layout {
                    Layout::Contig => "contig".to_string(),
                    Layout::Packed(p) => format!("packed-pad{p}"),
                    Layout::Odd => "odd".to_string(),
                },
                scale.map_or(String::new(), |s| format!("_scale{s}")),
            ),
            Op::LayerNorm {
                rows,
                cols,
                in_place,
            } => format!("{rows}x{cols}{}", f(*in_place, "inplace")),
            Op::LayerNormJoint {
                batch,
                n,
                act,
                in_place,
            } => format!("b{batch}_n{n}_{}{}", act_tag(*act), f(*in_place, "inplace")),
            Op::ConvT {
                batch,
                cin,
                cout,
                dims,
                channels_last,
                act,
                offset,
            } => format!(
                "b{batch}_cin{cin}_cout{cout}_{}_{}_{}{}",
                dims_tag(*dims),
                if *channels_last { "cl" } else { "cf" },
                act_tag(*act),
                f(*offset > 0, &format!("off{offset}")),
            ),
            Op::Interp {
                planes,
                src,
                dst,
                mode,
                x,
                out,
            } => format!(
                "{mode:?}_p{planes}_{}-{}_{}-{}",
                dims_tag(*src),
                dims_tag(*dst),
                x.tag(),
                out.tag()
            ),
            Op::PatchGather {
                batch,
                dims,
                patch,
                x,
            } => format!(
                "b{batch}_{}_p{}_x-{}",
                dims_tag(*dims),
                dims_tag(*patch),
                x.tag()
            ),
            Op::Add {
                n,
                period,
                alias,
                offset,
            } => format!(
                "n{n}_p{period}_alias-{alias:?}{}",
                f(*offset > 0, &format!("off{offset}"))
            ),
            Op::Activation { n, act, in_place } => {
                format!("n{n}_{}{}", act_tag(*act), f(*in_place, "inplace"))
            }
            Op::Embed { vocab, rows, cols } => format!("v{vocab}_r{rows}_c{cols}"),
            Op::ForegroundStats {
                dims,
                vol,
                misalign,
            } => format!("{}_{vol:?}{}", dims_tag(*dims), f(*misalign, "misalign")),
            Op::ClipZscore {
                n,
                misalign,
                in_place,
            }
            | Op::ShiftScale {
                n,
                misalign,
                in_place,
            }
            | Op::DivideCounts {
                n,
                misalign,
                in_place,
            } => format!(
                "n{n}{}{}",
                f(*misalign, "misalign"),
                f(*in_place, "inplace")
            ),
            Op::BboxAbove {
                dims,
                start,
                extent,
                density,
                misalign,
            } => format!(
                "{}_at{}_ext{}_d{density}{}",
                dims_tag(*dims),
                dims_tag(*start),
                dims_tag(*extent),
                f(*misalign, "misalign")
            ),
            Op::CopyBox {
                src_dims,
                src_start,
                dst_dims,
                dst_start,
                extent,
                dst,
                misalign,
            } => format!(
                "{}_from{},{},{}_to{}_at{}_ext{}_{}{}",
                dims_tag(*src_dims),
                src_start[0],
                src_start[1],
                src_start[2],
                dims_tag(*dst_dims),
                dims_tag(*dst_start),
                dims_tag(*extent),
                dst.tag(),
                f(*misalign, "misalign")
            ),
            Op::Accumulate {
                dims,
                window,
                start,
            } => format!(
                "{}_win{}_at{}",
                dims_tag(*dims),
                dims_tag(*window),
                dims_tag(*start)
            ),
            Op::Fill { n, misalign } | Op::ThresholdU8 { n, misalign } => {
                format!("n{n}{}", f(*misalign, "misalign"))
            }
        };
        format!("{}/{p}", self.name())
    }

    fn cmp(&self) -> Cmp {
        match self {
            Op::Gemm { .. }
            | Op::Attention { .. }
            | Op::LayerNorm { .. }
            | Op::LayerNormJoint { .. }
            | Op::ConvT { .. }
            | Op::Add { .. }
            | Op::Activation { .. }
            | Op::Embed { .. } => Cmp::Tol,
            _ => Cmp::Exact,
        }
    }

    /// Volume ops compute in f32 whatever the storage dtype: one device per spec runs them.
    fn storage_independent(&self) -> bool {
        matches!(
            self,
            Op::ForegroundStats { .. }
                | Op::ClipZscore { .. }
                | Op::ShiftScale { .. }
                | Op::BboxAbove { .. }
                | Op::CopyBox { .. }
                | Op::Accumulate { .. }
                | Op::DivideCounts { .. }
                | Op::Fill { .. }
                | Op::ThresholdU8 { .. }
        )
    }

    fn expects_error(&self) -> bool {
        matches!(self, Op::ForegroundStats { vol, .. } if vol.is_error())
    }

    /// The operands (fresh random inputs from `seed`), the outputs to compare, and the work.
    fn spec(&self, seed: u64) -> Spec {
        let plain = |operands: Vec<Operand>, reads: Vec<usize>| Spec {
            operands,
            reads,
            flops: 0.0,
            bytes: None,
        };
        match *self {
            Op::Gemm {
                batch,
                m,
                n,
                k,
                bias,
                res,
                ..
            } => {
                let g = GemmLayout::new(self);
                let a = random(g.len_a, 1.0, seed);
                let b = random(g.len_b, 1.0, seed ^ 1);
                let c = if res == Res::InPlace {
                    input(St::S, random(g.len_c, 2.0, seed ^ 2))
                } else {
                    output(St::S, g.len_c)
                };
                let ops = vec![
                    input(St::S, a),
                    input(St::S, b),
                    c,
                    input(St::S, random(if bias { n } else { 1 }, 1.0, seed ^ 3)),
                    input(St::S, random(g.len_r.max(1), 1.0, seed ^ 4)),
                ];
                Spec {
                    operands: ops,
                    reads: vec![2],
                    flops: 2.0 * (batch * m * n * k) as f64,
                    bytes: None,
                }
            }
            Op::Attention {
                batch,
                heads,
                nq,
                nk,
                hd,
                causal,
                ..
            } => {
                let l = AttnLayout::new(self);
                let mut ops: Vec<Operand> = l
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| {
                        let scale = if i == 2 { 1.0 } else { 1.5 };
                        input(St::S, random(len, scale, seed.wrapping_add(i as u64)))
                    })
                    .collect();
                ops.push(output(St::S, l.out_len));
                let keys: f64 = if causal {
                    (0..nq).map(|i| nk.min(i + 1) as f64).sum()
                } else {
                    (nq * nk) as f64
                };
                Spec {
                    reads: vec![ops.len() - 1],
                    operands: ops,
                    flops: 4.0 * (batch * heads * hd) as f64 * keys,
                    bytes: None,
                }
            }
            Op::LayerNorm { rows, cols, .. } => {
                let x: Vec<f32> = random(rows * cols, 3.0, seed)
                    .iter()
                    .map(|v| v + 5.0)
                    .collect();
                let ops = vec![
                    input(St::S, x),
                    input(St::S, random(cols, 1.0, seed ^ 1)),
                    input(St::S, random(cols, 0.5, seed ^ 2)),
                    output(St::S, rows * cols),
                ];
                plain(ops, vec![self.out_index(3)])
            }
            Op::LayerNormJoint { batch, n, .. } => {
                let x: Vec<f32> = random(batch * n, 2.0, seed)
                    .iter()
                    .map(|v| v - 0.7)
                    .collect();
                let ops = vec![
                    input(St::S, x),
                    input(St::S, random(n, 1.0, seed ^ 1)),
                    input(St::S, random(n, 0.5, seed ^ 2)),
                    output(St::S, batch * n),
                ];
                plain(ops, vec![self.out_index(3)])
            }
            Op::ConvT {
                batch,
                cin,
                cout,
                dims,
                offset,
                ..
            } => {
                let vox: usize = dims.iter().product();
                let ws = 1.0 / (cin as f32).sqrt().max(1.0);
                let ops = vec![
                    input_at(St::S, random(batch * cin * vox, 1.0, seed), offset),
                    input(St::S, random(cin * cout * 8, ws, seed ^ 1)),
                    input(St::S, random(cout, 0.5, seed ^ 2)),
                    output_at(St::S, batch * cout * 8 * vox, offset),
                ];
                Spec {
                    operands: ops,
                    reads: vec![3],
                    flops: 2.0 * (batch * cin * cout * 8 * vox) as f64,
                    bytes: None,
                }
            }
            Op::Interp {
                planes,
                src,
                dst,
                x,
                out,
                ..
            } => {
                let n_in = planes * src.iter().product::<usize>();
                let n_out = planes * dst.iter().product::<usize>();
                plain(
                    vec![input(x, random(n_in, 4.0, seed)), output(out, n_out)],
                    vec![1],
                )
            }
            Op::PatchGather { batch, dims, x, .. } => {
                let total = batch * dims.iter().product::<usize>();
                plain(
                    vec![input(x, random(total, 1.0, seed)), output(St::S, total)],
                    vec![1],
                )
            }
            Op::Add {
                n,
                period,
                alias,
                offset,
            } => {
                let ops = vec![
                    input_at(St::S, random(n, 2.0, seed), offset),
                    input_at(St::S, random(period, 1.5, seed ^ 1), offset),
                    output_at(St::S, n, offset),
                ];
                let read = if alias == Alias::None { 2 } else { 0 };
                plain(ops, vec![read])
            }
            Op::Activation { n, in_place, .. } => {
                let ops = vec![input(St::S, random(n, 4.0, seed)), output(St::S, n)];
                plain(ops, vec![if in_place { 0 } else { 1 }])
            }
            Op::Embed { vocab, rows, cols } => {
                let ids: Vec<i32> = (0..rows)
                    .map(|r| ((r * 37 + seed as usize) % vocab) as i32)
                    .collect();
                let ops = vec![
                    raw(DType::I32, bytemuck::cast_slice(&ids).to_vec()),
                    input(St::S, random(vocab * cols, 1.0, seed ^ 1)),
                    input(St::S, random(rows * cols, 0.5, seed ^ 2)),
                    output(St::S, rows * cols),
                ];
                plain(ops, vec![3])
            }
            Op::ForegroundStats {
                dims,
                vol,
                misalign,
            } => {
                let n = dims.iter().product::<usize>();
                plain(
                    vec![input_at(St::F32, vol.values(n, seed), misalign as usize)],
                    vec![],
                )
            }
            Op::ClipZscore {
                n,
                misalign,
                in_place,
            }
            | Op::ShiftScale {
                n,
                misalign,
                in_place,
            } => {
                let off = misalign as usize;
                let ops = vec![
                    input_at(St::F32, float_volume(n, seed), off),
                    output_at(St::F32, n, off),
                ];
                plain(ops, vec![if in_place { 0 } else { 1 }])
            }
            Op::BboxAbove {
                dims,
                density,
                misalign,
                extent,
                ..
            } => {
                let n: usize = dims.iter().product();
                let mut r = Rng(seed);
                let x: Vec<f32> = (0..n)
                    .map(|_| {
                        if r.below(1000) < density {
                            r.unit() + 0.01
                        } else {
                            -r.unit()
                        }
                    })
                    .collect();
                Spec {
                    operands: vec![input_at(St::F32, x, misalign as usize)],
                    reads: vec![],
                    flops: 0.0,
                    bytes: Some(4.0 * extent.iter().product::<usize>() as f64),
                }
            }
            Op::CopyBox {
                src_dims,
                dst_dims,
                extent,
                dst,
                misalign,
                ..
            } => {
                let ns: usize = src_dims.iter().product();
                let nd: usize = dst_dims.iter().product();
                let ne: usize = extent.iter().product();
                Spec {
                    operands: vec![
                        input_at(St::F32, random(ns, 50.0, seed), misalign as usize),
                        output(dst, nd),
                    ],
                    reads: vec![1],
                    flops: 0.0,
                    bytes: Some(ne as f64 * (4 + dst.on(DType::F32).size()) as f64),
                }
            }
            Op::Accumulate { dims, window, .. } => {
                let n: usize = dims.iter().product();
                let nw: usize = window.iter().product();
                Spec {
                    operands: vec![
                        input(St::F32, random(nw, 4.0, seed)),
                        input(St::F32, random(n, 2.0, seed ^ 1)),
                        input(St::F32, counts(n, seed)),
                    ],
                    reads: vec![1, 2],
                    flops: 0.0,
                    bytes: Some(nw as f64 * 4.0 * 5.0),
                }
            }
            Op::DivideCounts {
                n,
                misalign,
                in_place,
            } => {
                let off = misalign as usize;
                let ops = vec![
                    input_at(St::F32, random(n, 3.0, seed), off),
                    input_at(St::F32, counts(n, seed), off),
                    output_at(St::F32, n, off),
                ];
                plain(ops, vec![if in_place { 0 } else { 2 }])
            }
            Op::Fill { n, misalign } => {
                plain(vec![output_at(St::F32, n, misalign as usize)], vec![0])
            }
            Op::ThresholdU8 { n, misalign } => {
                let off = misalign as usize;
                plain(
                    vec![
                        input_at(St::F32, random(n, 3.0, seed), off),
                        output_at(St::Is(DType::U8), n, off),
                    ],
                    vec![1],
                )
            }
        }
    }

    /// The operand an in-place op writes: its input 0, else `out`.
    fn out_index(&self, out: usize) -> usize {
        match self {
            Op::LayerNorm { in_place, .. } | Op::LayerNormJoint { in_place, .. } if *in_place => 0,
            _ => out,
        }
    }

    /// Launches the op on `be` with operand addresses `a` (dtypes `d`); returns its scalar
    /// results (statistics, min / max, a box).
    ///
    /// # Safety
    /// `a` and `d` come from [`place`] with this case's spec.
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], d: &[DType]) -> Result<Vec<f64>> {
        let none = Ok(Vec::new());
        match *self {
            Op::Gemm {
                batch,
                m,
                n,
                k,
                b_trans,
                bias,
                act,
                res,
                alpha,
                ..
            } => {
                let g = GemmLayout::new(self);
                let residual = match res {
                    Res::None => None,
                    Res::InPlace => Some(Residual {
                        addr: a[2],
                        ld: g.ldc,
                        batch_stride: g.bsc,
                    }),
                    _ => Some(Residual {
                        addr: a[4],
                        ld: g.ldr,
                        batch_stride: g.bsr,
                    }),
                };
                let args = GemmArgs {
                    batch,
                    m,
                    n,
                    k,
                    a: a[0],
                    lda: g.lda,
                    batch_stride_a: g.bsa,
                    b: a[1],
                    ldb: g.ldb,
                    batch_stride_b: g.bsb,
                    b_trans,
                    c: a[2],
                    ldc: g.ldc,
                    batch_stride_c: g.bsc,
                    alpha,
                    bias: bias.then_some(a[3]),
                    act,
                    residual,
                };
                unsafe { be.gemm(&args) }?;
                none
            }
            Op::Attention {
                batch,
                heads,
                nq,
                nk,
                hd,
                causal,
                ..
            } => {
                let l = AttnLayout::new(self);
                let o = l.inputs.len();
                let at = |v: AView, buf: usize| a[buf] + (v.off * d[buf].size()) as u64;
                let args = AttentionArgs {
                    batch,
                    heads,
                    nq,
                    nk,
                    head_dim: hd,
                    q: at(l.q, l.q.buf),
                    q_row: l.q.row,
                    q_batch: l.q.batch,
                    k: at(l.k, l.k.buf),
                    k_row: l.k.row,
                    k_batch: l.k.batch,
                    v: at(l.v, l.v.buf),
                    v_row: l.v.row,
                    v_batch: l.v.batch,
                    out: at(l.out, o),
                    o_row: l.out.row,
                    o_batch: l.out.batch,
                    scale: l.scale,
                    causal,
                };
                unsafe { be.attention(&args) }?;
                none
            }
            Op::LayerNorm { rows, cols, .. } => {
                let args = LayerNormArgs {
                    x: a[0],
                    out: a[self.out_index(3)],
                    rows,
                    cols,
                    weight: a[1],
                    bias: a[2],
                    eps: 1e-5,
                };
                unsafe { be.layer_norm(&args) }?;
                none
            }
            Op::LayerNormJoint { batch, n, act, .. } => {
                let args = LayerNormJointArgs {
                    x: a[0],
                    out: a[self.out_index(3)],
                    batch,
                    n,
                    weight: a[1],
                    bias: a[2],
                    eps: 1e-5,
                    act,
                };
                unsafe { be.layer_norm_joint(&args) }?;
                none
            }
            Op::ConvT {
                batch,
                cin,
                cout,
                dims,
                channels_last,
                act,
                ..
            } => {
                let args = ConvT3dArgs {
                    x: a[0],
                    out: a[3],
                    weight: a[1],
                    bias: a[2],
                    batch,
                    cin,
                    cout,
                    dims,
                    channels_last_input: channels_last,
                    act,
                };
                unsafe { be.conv_transpose3d_k2s2(&args) }?;
                none
            }
            Op::Interp {
                planes,
                src,
                dst,
                mode,
                ..
            } => {
                let args = Interp3dArgs {
                    x: a[0],
                    x_dtype: d[0],
                    out: a[1],
                    out_dtype: d[1],
                    planes,
                    src,
                    dst,
                    mode,
                };
                unsafe { be.interp3d(&args) }?;
                none
            }
            Op::PatchGather {
                batch, dims, patch, ..
            } => {
                let args = PatchGatherArgs {
                    x: a[0],
                    x_dtype: d[0],
                    out: a[1],
                    batch,
                    dims,
                    patch,
                };
                unsafe { be.patch_gather3d(&args) }?;
                none
            }
            Op::Add {
                n, period, alias, ..
            } => {
                let (b, out) = match alias {
                    Alias::None => (a[1], a[2]),
                    Alias::OutA => (a[1], a[0]),
                    Alias::All => (a[0], a[0]),
                };
                let args = AddArgs {
                    a: a[0],
                    b,
                    out,
                    n,
                    period,
                };
                unsafe { be.add(&args) }?;
                none
            }
            Op::Activation { n, act, in_place } => {
                let args = ActArgs {
                    x: a[0],
                    out: if in_place { a[0] } else { a[1] },
                    n,
                    scale: 0.8,
                    act,
                };
                unsafe { be.activation(&args) }?;
                none
            }
            Op::Embed { vocab, rows, cols } => {
                let args = EmbedArgs {
                    ids: a[0],
                    table: a[1],
                    vocab,
                    pos: a[2],
                    out: a[3],
                    rows,
                    cols,
                };
                unsafe { be.embed_gather(&args) }?;
                none
            }
            Op::ForegroundStats { dims, .. } => {
                let s = unsafe { be.foreground_stats(a[0], dims) }?;
                Ok(vec![
                    s.threshold as f64,
                    s.count as f64,
                    s.p_lo,
                    s.p_hi,
                    s.mean as f64,
                    s.std as f64,
                ])
            }
            Op::ClipZscore { n, in_place, .. } => {
                let args = ClipZscoreArgs {
                    x: a[0],
                    out: if in_place { a[0] } else { a[1] },
                    n,
                    lo: -300.5,
                    hi: 1100.25,
                    mean: 412.5,
                    std: 287.3,
                };
                let (lo, hi) = unsafe { be.clip_zscore(&args) }?;
                Ok(vec![lo as f64, hi as f64])
            }
            Op::ShiftScale { n, in_place, .. } => {
                let args = ShiftScaleArgs {
                    x: a[0],
                    out: if in_place { a[0] } else { a[1] },
                    n,
                    sub: -25.75,
                    div: 1790.3,
                };
                unsafe { be.shift_scale(&args) }?;
                none
            }
            Op::BboxAbove {
                dims,
                start,
                extent,
                ..
            } => {
                let b = unsafe { be.bbox_above(a[0], dims, start, extent, 0.0) }?;
                Ok(match b {
                    None => vec![-1.0],
                    Some(b) => b.iter().map(|&v| v as f64).collect(),
                })
            }
            Op::CopyBox {
                src_dims,
                src_start,
                dst_dims,
                dst_start,
                extent,
                ..
            } => {
                let args = CopyBoxArgs {
                    src: a[0],
                    src_dims,
                    src_start,
                    dst: a[1],
                    dst_dtype: d[1],
                    dst_dims,
                    dst_start,
                    extent,
                    pad: 0.0,
                };
                unsafe { be.copy_box(&args) }?;
                none
            }
            Op::Accumulate {
                dims,
                window,
                start,
            } => {
                let args = AccumulateArgs {
                    win: a[0],
                    window,
                    acc: a[1],
                    cnt: a[2],
                    dims,
                    start,
                };
                unsafe { be.accumulate_window(&args) }?;
                none
            }
            Op::DivideCounts { n, in_place, .. } => {
                let out = if in_place { a[0] } else { a[2] };
                unsafe { be.divide_counts(a[0], a[1], out, n) }?;
                none
            }
            Op::Fill { n, .. } => {
                unsafe { be.fill(a[0], n, -1.75) }?;
                none
            }
            Op::ThresholdU8 { n, .. } => {
                unsafe { be.threshold_u8(a[0], a[1], n, 0.25) }?;
                none
            }
        }
    }

    /// The f64 reference of the compared outputs (whole buffers, NaN where untouched) from the
    /// inputs as the device read them (`host`: whole buffers as f32, NaN where poisoned), and of
    /// the scalars as `(value, relative tolerance)` (0: bit for bit) given the run's own
    /// scalars `got`. `None`: the CPU backend
    /// is the reference of record.
    #[allow(clippy::type_complexity)]
    fn reference(
        &self,
        host: &[Vec<f32>],
        got: &[f64],
    ) -> Option<(Vec<Vec<f64>>, Vec<(f64, f64)>)> {
        let view = |i: usize, off: usize| &host[i][off..];
        let init = |i: usize| -> Vec<f64> { host[i].iter().map(|&v| v as f64).collect() };
        // Writes `vals` into a copy of buffer `i` from element `off`.
        let into = |i: usize, off: usize, vals: Vec<f64>| {
            let mut b = init(i);
            b[off..off + vals.len()].copy_from_slice(&vals);
            b
        };
        let outs = match *self {
            Op::Gemm {
                batch,
                m,
                n,
                k,
                b_trans,
                bias,
                act,
                res,
                alpha,
                ..
            } => {
                let g = GemmLayout::new(self);
                let mut c = init(2);
                let residual = match res {
                    Res::None => None,
                    Res::InPlace => Some((view(2, 0), g.ldc, g.bsc)),
                    _ => Some((view(4, 0), g.ldr, g.bsr)),
                };
                r64::gemm(
                    &r64::Gemm {
                        batch,
                        m,
                        n,
                        k,
                        a: view(0, 0),
                        lda: g.lda,
                        batch_stride_a: g.bsa,
                        b: view(1, 0),
                        ldb: g.ldb,
                        batch_stride_b: g.bsb,
                        b_trans,
                        ldc: g.ldc,
                        batch_stride_c: g.bsc,
                        alpha,
                        bias: bias.then(|| view(3, 0)),
                        act,
                        residual,
                    },
                    &mut c,
                );
                vec![c]
            }
            Op::Attention {
                batch,
                heads,
                nq,
                nk,
                hd,
                causal,
                ..
            } => {
                let l = AttnLayout::new(self);
                let o = l.inputs.len();
                let v = |x: AView| r64::View {
                    data: view(x.buf, x.off),
                    row: x.row,
                    batch: x.batch,
                };
                let mut out = init(o);
                r64::attention(
                    batch,
                    heads,
                    nq,
                    nk,
                    hd,
                    v(l.q),
                    v(l.k),
                    v(l.v),
                    l.scale,
                    causal,
                    &mut out[l.out.off..],
                    l.out.row,
                    l.out.batch,
                );
                vec![out]
            }
            Op::LayerNorm { rows, cols, .. } => {
                let y = r64::layer_norm(view(0, 0), rows, cols, view(1, 0), view(2, 0), 1e-5);
                vec![into(self.out_index(3), 0, y)]
            }
            Op::LayerNormJoint { batch, n, act, .. } => {
                let y =
                    r64::layer_norm_joint(view(0, 0), batch, n, view(1, 0), view(2, 0), 1e-5, act);
                vec![into(self.out_index(3), 0, y)]
            }
            Op::ConvT {
                batch,
                cin,
                cout,
                dims,
                channels_last,
                act,
                offset,
            } => {
                let y = r64::conv_transpose3d_k2s2(
                    view(0, offset),
                    view(1, 0),
                    view(2, 0),
                    batch,
                    cin,
                    cout,
                    dims,
                    channels_last,
                    act,
                );
                vec![into(3, offset, y)]
            }
            Op::Add {
                n,
                period,
                alias,
                offset,
            } => {
                let (b, read) = match alias {
                    Alias::None => (view(1, offset), 2),
                    Alias::OutA => (view(1, offset), 0),
                    Alias::All => (view(0, offset), 0),
                };
                vec![into(read, offset, r64::add(view(0, offset), b, n, period))]
            }
            Op::Activation { n, act, in_place } => {
                let y = r64::activation(view(0, 0), n, 0.8, act);
                vec![into(if in_place { 0 } else { 1 }, 0, y)]
            }
            Op::ForegroundStats { dims, misalign, .. } if !self.expects_error() => {
                let n: usize = dims.iter().product();
                let x = &host[0][misalign as usize..][..n];
                let (count, p_lo, p_hi) = r64::foreground_count_percentiles(x, got[0] as f32);
                let (threshold, mean, std) = r64::foreground_moments(x, got[0] as f32);
                // numpy's float32 sums against f64 ones: within the fixtures' 1e-6 relative;
                // count and percentiles exact.
                return Some((
                    vec![],
                    vec![
                        (threshold, 1e-6),
                        (count as f64, 0.0),
                        (p_lo, 0.0),
                        (p_hi, 0.0),
                        (mean, 1e-6),
                        (std, 1e-6),
                    ],
                ));
            }
            _ => return None,
        };
        Some((outs, vec![]))
    }
}

/// GEMM strides for a case: every leading dimension and batch stride padded by `pad`.
struct GemmLayout {
    lda: usize,
    ldb: usize,
    ldc: usize,
    bsa: usize,
    bsb: usize,
    bsc: usize,
    ldr: usize,
    bsr: usize,
    len_a: usize,
    len_b: usize,
    len_c: usize,
    len_r: usize,
}

impl GemmLayout {
    fn new(op: &Op) -> Self {
        let Op::Gemm {
            batch,
            m,
            n,
            k,
            b_trans,
            bcast_b,
            res,
            pad,
            ..
        } = *op
        else {
            unreachable!()
        };
        let lda = k + pad;
        let ldb = if b_trans { k + 2 * pad } else { n + pad };
        let ldc = n + 3 * pad;
        let brows = if b_trans { n } else { k };
        let bsa = m * lda + pad;
        let bsb = if bcast_b { 0 } else { brows * ldb + pad };
        let bsc = m * ldc + pad + 1;
        let (ldr, bsr, len_r) = match res {
            Res::None | Res::InPlace => (0, 0, 0),
            Res::Ld => (n + 1, m * (n + 1), batch * m * (n + 1)),
            Res::Row => (0, n, batch * n),
            Res::Shared => (n, 0, m * n),
        };
        GemmLayout {
            lda,
            ldb,
            ldc,
            bsa,
            bsb,
            bsc,
            ldr,
            bsr,
            len_a: ((batch - 1) * bsa + m * lda).max(1),
            len_b: ((batch - 1) * bsb + brows * ldb).max(1),
            len_c: (batch - 1) * bsc + m * ldc,
            len_r,
        }
    }
}

/// Element `(b, i, h, e)` at `off + b*batch + i*row + h*hd + e` of input `buf` (or, for the
/// output, of the output operand).
#[derive(Clone, Copy)]
struct AView {
    buf: usize,
    off: usize,
    row: usize,
    batch: usize,
}

struct AttnLayout {
    inputs: Vec<usize>,
    q: AView,
    k: AView,
    v: AView,
    out: AView,
    out_len: usize,
    scale: f32,
}

impl AttnLayout {
    fn new(op: &Op) -> Self {
        let Op::Attention {
            batch,
            heads,
            nq,
            nk,
            hd,
            layout,
            scale,
            ..
        } = *op
        else {
            unreachable!()
        };
        let w = heads * hd;
        let scale = scale.unwrap_or(1.0 / (hd as f32).sqrt());
        let view = |buf, off, row, batch| AView {
            buf,
            off,
            row,
            batch,
        };
        match layout {
            Layout::Contig => AttnLayout {
                inputs: vec![batch * nq * w, batch * nk * w, batch * nk * w],
                q: view(0, 0, w, nq * w),
                k: view(1, 0, w, nk * w),
                v: view(2, 0, w, nk * w),
                out: view(0, 0, w, nq * w),
                out_len: batch * nq * w,
                scale,
            },
            Layout::Packed(pad) => {
                assert_eq!(nq, nk, "packed attention has nq == nk");
                let (row, bs) = (3 * w, nq * 3 * w);
                let orow = w + pad;
                AttnLayout {
                    inputs: vec![batch * nq * 3 * w],
                    q: view(0, 0, row, bs),
                    k: view(0, w, row, bs),
                    v: view(0, 2 * w, row, bs),
                    out: view(0, pad, orow, nq * orow + pad),
                    out_len: batch * (nq * orow + pad) + pad,
                    scale,
                }
            }
            Layout::Odd => {
                let v = |buf, off, row, n: usize, extra| view(buf, off, row, n * row + extra);
                let (q, k, vv) = (
                    v(0, 1, w + 3, nq, 5),
                    v(1, 3, w + 1, nk, 7),
                    v(2, 5, w + 5, nk, 1),
                );
                let len = |x: AView, n: usize| x.off + (batch - 1) * x.batch + (n - 1) * x.row + w;
                let out = v(0, 3, w + 7, nq, 3);
                AttnLayout {
                    inputs: vec![len(q, nq), len(k, nk), len(vv, nk)],
                    q,
                    k,
                    v: vv,
                    out,
                    out_len: len(out, nq),
                    scale,
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The case list
// ------------------------------------------------------------------------------------------------

/// One row of the table.
struct Case {
    op: Op,
    /// Model-size shapes for perf mode only (never on the emulator).
    heavy: bool,
}

const ACTS: [Act; 4] = [Act::None, Act::Gelu, Act::Relu, Act::QuickGelu];

#[allow(clippy::too_many_arguments)]
fn gemm(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    b_trans: bool,
    bias: bool,
    act: Act,
    res: Res,
) -> Op {
    Op::Gemm {
        batch,
        m,
        n,
        k,
        b_trans,
        bcast_b: false,
        bias,
        act,
        res,
        alpha: 1.0,
        pad: 0,
    }
}

fn attn(batch: usize, heads: usize, nq: usize, nk: usize, hd: usize, causal: bool) -> Op {
    Op::Attention {
        batch,
        heads,
        nq,
        nk,
        hd,
        causal,
        layout: Layout::Contig,
        scale: None,
    }
}

fn cases() -> Vec<Case> {
    let mut v: Vec<Op> = Vec::new();
    let mut heavy: Vec<Op> = Vec::new();

    // --- gemm: odd sizes x both B layouts x every epilogue (bias, act, residual layouts),
    // padded leading dimensions, alpha, B broadcast over the batch.
    let epilogues = [
        (false, Act::None, Res::None),
        (true, Act::None, Res::None),
        (true, Act::None, Res::InPlace),
        (false, Act::None, Res::Ld),
        (true, Act::Gelu, Res::None),
        (false, Act::Relu, Res::Row),
        (true, Act::QuickGelu, Res::InPlace),
        (true, Act::Gelu, Res::Shared),
    ];
    let sizes = [
        (1, 1, 1, 1),
        (1, 7, 13, 33),
        (1, 1, 5, 9),
        (1, 6, 1, 4),
        (2, 33, 17, 65),
        (1, 2, 3, 0),
        (3, 64, 96, 128),
        (2, 129, 70, 200),
    ];
    for (si, &(b, m, n, k)) in sizes.iter().enumerate() {
        for bt in [false, true] {
            for (ei, &(bias, act, res)) in epilogues.iter().enumerate() {
                v.push(Op::Gemm {
                    batch: b,
                    m,
                    n,
                    k,
                    b_trans: bt,
                    bcast_b: b > 1 && ei % 3 == 1,
                    bias,
                    act,
                    res,
                    alpha: if ei % 4 == 3 { 0.375 } else { 1.0 },
                    pad: (si + ei) % 3,
                });
            }
        }
    }
    // The model's GEMM shapes at a small token count: QKV, MLP up (GELU), MLP down + residual.
    v.push(gemm(1, 65, 3 * 96, 96, true, true, Act::None, Res::None));
    v.push(gemm(1, 65, 384, 96, true, true, Act::Gelu, Res::None));
    v.push(gemm(1, 65, 96, 384, true, true, Act::None, Res::InPlace));
    // Full-size ViT GEMMs (2048 tokens, width 768): perf only.
    heavy.push(gemm(1, 2048, 2304, 768, true, true, Act::None, Res::None));
    heavy.push(gemm(1, 2048, 3072, 768, true, true, Act::Gelu, Res::None));
    heavy.push(gemm(
        1,
        2048,
        768,
        3072,
        true,
        true,
        Act::None,
        Res::InPlace,
    ));

    // --- attention: the head dims of the full and the tiny model over odd query / key counts
    // both ways, causal and not (batch and heads varied), then the ViT's packed QKV views with
    // output gaps, odd strides, head dims between the compiled sizes, and peaky softmax.
    const HEAD_DIMS: [usize; 8] = [6, 12, 16, 24, 32, 48, 64, 96];
    const SHAPES: [(usize, usize, bool); 9] = [
        (1, 1, false),
        (1, 1, true),
        (7, 7, true),
        (1, 300, false),
        (300, 1, true),
        (7, 129, true),
        (129, 33, false),
        (33, 300, true),
        (300, 129, false),
    ];
    for hd in HEAD_DIMS {
        for (i, &(nq, nk, causal)) in SHAPES.iter().enumerate() {
            v.push(attn(1 + i % 2, 1 + (i + hd) % 3, nq, nk, hd, causal));
        }
    }
    let with = |op: Op, l: Layout, s: Option<f32>| match op {
        Op::Attention {
            batch,
            heads,
            nq,
            nk,
            hd,
            causal,
            ..
        } => Op::Attention {
            batch,
            heads,
            nq,
            nk,
            hd,
            causal,
            layout: l,
            scale: s,
        },
        _ => unreachable!(),
    };
    for (hd, causal) in [
        (64, false),
        (24, true),
        (96, false),
        (48, true),
        (12, false),
    ] {
        v.push(with(
            attn(2, 3, 129, 129, hd, causal),
            Layout::Packed(5),
            None,
        ));
    }
    for (hd, nq, nk, causal) in [(64, 33, 129, false), (32, 129, 7, true), (96, 7, 33, false)] {
        v.push(with(attn(2, 2, nq, nk, hd, causal), Layout::Odd, None));
    }
    for hd in [1, 7, 40, 80, 100, 128] {
        v.push(attn(2, 2, 67, 45, hd, hd % 2 == 1));
    }
    for (hd, causal) in [(64, false), (16, true)] {
        v.push(with(
            attn(1, 2, 129, 129, hd, causal),
            Layout::Contig,
            Some(1.0),
        ));
    }
    heavy.push(with(
        attn(1, 12, 2048, 2048, 64, false),
        Layout::Packed(0),
        None,
    ));
    heavy.push(with(attn(1, 8, 1, 77, 64, true), Layout::Contig, None));

    // --- layer norms.
    for (rows, cols) in [
        (1, 1),
        (1, 16),
        (7, 33),
        (33, 768),
        (5, 3072),
        (3, 4100),
        (129, 96),
        (2, 512),
    ] {
        for in_place in [false, true] {
            v.push(Op::LayerNorm {
                rows,
                cols,
                in_place,
            });
        }
    }
    heavy.push(Op::LayerNorm {
        rows: 2048,
        cols: 768,
        in_place: false,
    });
    for (batch, n) in [
        (1, 1),
        (1, 7),
        (2, 4097),
        (2, 24_576),
        (1, 3 * 8192 + 11),
        (3, 129),
    ] {
        for act in [Act::Gelu, Act::None] {
            for in_place in [false, true] {
                v.push(Op::LayerNormJoint {
                    batch,
                    n,
                    act,
                    in_place,
                });
            }
        }
    }
    heavy.push(Op::LayerNormJoint {
        batch: 2,
        n: 192 * 16 * 32 * 32,
        act: Act::Gelu,
        in_place: true,
    });

    // --- conv_transpose3d_k2s2: (batch, cin, cout, dims, act, offset) x both input layouts.
    let conv = |batch, cin, cout, dims, act, offset, channels_last| Op::ConvT {
        batch,
        cin,
        cout,
        dims,
        channels_last,
        act,
        offset,
    };
    for (batch, cin, cout, dims, act, offset) in [
        (2, 7, 5, [3, 2, 5], Act::Gelu, 0),
        (1, 33, 3, [2, 9, 7], Act::Relu, 0),
        (1, 24, 12, [4, 4, 4], Act::None, 0),
        (2, 16, 4, [2, 4, 8], Act::Gelu, 0),
        (2, 16, 4, [2, 4, 8], Act::QuickGelu, 1),
        (1, 1, 1, [1, 1, 1], Act::None, 0),
        (1, 0, 3, [2, 2, 2], Act::Gelu, 0),
        (1, 64, 40, [3, 5, 8], Act::Relu, 3),
        (1, 192, 96, [4, 8, 8], Act::Gelu, 0),
        (1, 768, 192, [1, 4, 16], Act::None, 0),
    ] {
        for cl in [true, false] {
            v.push(conv(batch, cin, cout, dims, act, offset, cl));
        }
    }
    heavy.push(conv(1, 768, 192, [8, 16, 16], Act::None, 0, true));
    heavy.push(conv(1, 192, 96, [16, 32, 32], Act::Gelu, 0, false));

    // --- interp3d: every mode x dtype pair (f32 or storage, in and out).
    let modes = [
        InterpMode::Trilinear,
        InterpMode::NearestExact,
        InterpMode::Nearest,
    ];
    let pairs = [
        (St::F32, St::F32),
        (St::S, St::F32),
        (St::F32, St::S),
        (St::S, St::S),
    ];
    for mode in modes {
        for (x, out) in pairs {
            for (planes, src, dst) in [
                (1, [32, 16, 16], [32, 64, 64]),
                (2, [3, 4, 6], [3, 9, 13]),
                (1, [7, 5, 9], [3, 2, 4]),
                (3, [2, 3, 5], [5, 7, 2]),
                (1, [1, 1, 1], [2, 3, 129]),
                (1, [5, 6, 7], [5, 6, 7]),
            ] {
                v.push(Op::Interp {
                    planes,
                    src,
                    dst,
                    mode,
                    x,
                    out,
                });
            }
        }
    }
    heavy.push(Op::Interp {
        planes: 1,
        src: [32, 64, 64],
        dst: [32, 256, 256],
        mode: InterpMode::Trilinear,
        x: St::S,
        out: St::F32,
    });

    // --- patch_gather3d.
    for x in [St::F32, St::S] {
        for (batch, dims, patch) in [
            (2, [8, 12, 16], [2, 3, 4]),
            (1, [4, 6, 6], [2, 3, 2]),
            (3, [3, 5, 7], [1, 5, 7]),
            (1, [1, 1, 1], [1, 1, 1]),
        ] {
            v.push(Op::PatchGather {
                batch,
                dims,
                patch,
                x,
            });
        }
    }
    heavy.push(Op::PatchGather {
        batch: 1,
        dims: [32, 256, 256],
        patch: [4, 16, 16],
        x: St::F32,
    });

    // --- add: plain, row and batch broadcast, period beyond n; out = a; unaligned views.
    for (n, period) in [
        (1, 1),
        (7, 7),
        (33, 33),
        (129, 129),
        (4096, 4096),
        (7 * 5, 5),
        (768 * 9, 768),
        (3 * 2048 * 8, 2048 * 8),
        (100, 1000),
    ] {
        for alias in [Alias::None, Alias::OutA] {
            for offset in [0, 1] {
                v.push(Op::Add {
                    n,
                    period,
                    alias,
                    offset,
                });
            }
        }
    }
    v.push(Op::Add {
        n: 136,
        period: 136,
        alias: Alias::All,
        offset: 0,
    });
    heavy.push(Op::Add {
        n: 2048 * 768,
        period: 2048 * 768,
        alias: Alias::OutA,
        offset: 0,
    });

    // --- activation.
    for act in ACTS {
        for n in [1, 7, 33, 129, 4104] {
            for in_place in [false, true] {
                v.push(Op::Activation { n, act, in_place });
            }
        }
    }
    heavy.push(Op::Activation {
        n: 2048 * 3072,
        act: Act::Gelu,
        in_place: true,
    });

    // --- embed_gather.
    for (vocab, rows, cols) in [(1, 1, 1), (50, 7, 33), (300, 77, 64), (11, 3, 512)] {
        v.push(Op::Embed { vocab, rows, cols });
    }

    // --- volume ops (f32; run once per device spec).
    for (dims, vol) in [
        ([7, 33, 129], Vol::Hu),
        ([7, 33, 129], Vol::Float),
        ([30, 96, 121], Vol::Hu),
        ([30, 96, 121], Vol::Float),
        ([30, 96, 121], Vol::Decades),
        ([9, 31, 257], Vol::Wide),
        ([9, 31, 257], Vol::Huge),
        ([64, 256, 256], Vol::Hu),
        ([1, 1, 5], Vol::Single),
        ([5, 7, 9], Vol::Constant),
        ([5, 7, 9], Vol::Nan),
        ([5, 7, 9], Vol::Inf),
        ([0, 3, 3], Vol::Empty),
        ([1, 1, 1], Vol::One),
    ] {
        for misalign in [false, true] {
            v.push(Op::ForegroundStats {
                dims,
                vol,
                misalign,
            });
        }
    }
    for n in [1, 7, 33, 129, 30 * 96 * 121 + 3] {
        for (misalign, in_place) in [(false, false), (true, false), (false, true), (true, true)] {
            v.push(Op::ClipZscore {
                n,
                misalign,
                in_place,
            });
            v.push(Op::ShiftScale {
                n,
                misalign,
                in_place,
            });
        }
    }
    for n in [1, 7, 33, 129, 100_003] {
        for misalign in [false, true] {
            v.push(Op::Fill { n, misalign });
            v.push(Op::ThresholdU8 { n, misalign });
            v.push(Op::DivideCounts {
                n,
                misalign,
                in_place: false,
            });
        }
        v.push(Op::DivideCounts {
            n,
            misalign: false,
            in_place: true,
        });
    }
    // bbox_above: sub-boxes (whole, interior, thin, one voxel) at densities 0 (no box) to 50%.
    for (i, (dims, start, extent)) in [
        ([7, 33, 129], [0, 0, 0], [7, 33, 129]),
        ([7, 33, 129], [2, 5, 40], [3, 20, 77]),
        ([30, 96, 121], [9, 31, 3], [21, 65, 118]),
        ([30, 96, 121], [0, 0, 0], [30, 96, 121]),
        ([13, 29, 37], [4, 0, 11], [1, 29, 1]),
        ([13, 29, 37], [6, 7, 8], [1, 1, 1]),
        ([13, 29, 37], [0, 3, 0], [13, 0, 37]),
        ([1, 1, 5], [0, 0, 1], [1, 1, 4]),
    ]
    .into_iter()
    .enumerate()
    {
        for density in [0, 1, 20, 500] {
            v.push(Op::BboxAbove {
                dims,
                start,
                extent,
                density,
                misalign: (i + density as usize) % 2 == 1,
            });
        }
    }
    // Random boxes (a fixed seed, so that the names stay stable), as the pipeline draws them.
    let mut r = Rng(0x0B0C_5EED);
    for dims in [[7usize, 33, 129], [30, 96, 121], [13, 29, 37], [1, 1, 5]] {
        for density in [0, 1, 20, 500] {
            let start = dims.map(|d| r.below(d as u64 / 3 + 1) as usize);
            let extent = [0, 1, 2].map(|a| r.below((dims[a] - start[a]) as u64 + 1) as usize);
            v.push(Op::BboxAbove {
                dims,
                start,
                extent,
                density,
                misalign: r.below(2) == 1,
            });
        }
    }
    v.push(Op::BboxAbove {
        dims: [64, 256, 256],
        start: [0; 3],
        extent: [64, 256, 256],
        density: 1,
        misalign: false,
    });
    // copy_box: negative, inside and overrunning source starts (zero padding), into f32, f16
    // and bf16 destinations; a realistic padded window.
    for (i, (src_start, dst_start, extent)) in [
        ([0, 0, 0], [0, 0, 0], [7, 33, 129]),
        ([-3, -10, -50], [1, 2, 0], [8, 38, 131]),
        ([4, 20, 100], [0, 0, 0], [9, 40, 131]),
        ([-7, 30, 128], [2, 5, 7], [5, 30, 100]),
        ([6, -33, 0], [8, 39, 130], [1, 1, 1]),
        ([-1, 1, -1], [3, 0, 60], [6, 17, 71]),
    ]
    .into_iter()
    .enumerate()
    {
        for dst in [St::F32, St::Is(DType::F16), St::Is(DType::BF16)] {
            v.push(Op::CopyBox {
                src_dims: [7, 33, 129],
                src_start,
                dst_dims: [9, 40, 131],
                dst_start,
                extent,
                dst,
                misalign: i % 2 == 1,
            });
        }
    }
    let (sdims, ddims) = ([7usize, 33, 129], [9usize, 40, 131]);
    for i in 0..12 {
        let extent = ddims.map(|d| 1 + r.below(d as u64) as usize);
        let dst_start = [0, 1, 2].map(|a| r.below((ddims[a] - extent[a]) as u64 + 1) as usize);
        let src_start = [0, 1, 2].map(|a| {
            let s = sdims[a] as i64;
            r.below(2 * s as u64 + 1) as i64 - s
        });
        for dst in [St::F32, St::Is(DType::F16), St::Is(DType::BF16)] {
            v.push(Op::CopyBox {
                src_dims: sdims,
                src_start,
                dst_dims: ddims,
                dst_start,
                extent,
                dst,
                misalign: i % 2 == 1,
            });
        }
    }
    for dst in [St::F32, St::Is(DType::BF16)] {
        v.push(Op::CopyBox {
            src_dims: [64, 300, 280],
            src_start: [40, -20, 100],
            dst_dims: [32, 256, 256],
            dst_start: [0; 3],
            extent: [32, 256, 256],
            dst,
            misalign: false,
        });
    }
    for (dims, window, start) in [
        ([11, 19, 23], [5, 7, 9], [0, 0, 0]),
        ([11, 19, 23], [5, 7, 9], [6, 12, 14]),
        ([11, 19, 23], [11, 19, 23], [0, 0, 0]),
        ([30, 96, 121], [7, 33, 64], [20, 50, 3]),
    ] {
        v.push(Op::Accumulate {
            dims,
            window,
            start,
        });
    }
    heavy.push(Op::Accumulate {
        dims: [64, 300, 280],
        window: [32, 256, 256],
        start: [16, 22, 12],
    });

    let mut out: Vec<Case> = v.into_iter().map(|op| Case { op, heavy: false }).collect();
    out.extend(heavy.into_iter().map(|op| Case { op, heavy: true }));
    out
}

// ------------------------------------------------------------------------------------------------
// Running a case
// ------------------------------------------------------------------------------------------------

/// Compares `got` with `want` (whole buffers): NaN in `want` (untouched) must stay NaN; every
/// other element within `tol` of the largest reference value, or bit for bit (`Exact`).
/// Returns the max relative error.
fn compare(got: &[f32], want: &[f64], cmp: Cmp, tol: f64) -> std::result::Result<f64, String> {
    assert_eq!(got.len(), want.len());
    let max_ref = want
        .iter()
        .filter(|w| !w.is_nan())
        .fold(0f64, |m, w| m.max(w.abs()))
        .max(f64::MIN_POSITIVE);
    if !want.iter().any(|w| !w.is_nan()) {
        return Err("the reference wrote nothing".into());
    }
    let mut worst = (0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() != g.is_nan() {
            return Err(if w.is_nan() {
                format!("element {i} is {g} but must stay untouched (poison)")
            } else {
                format!("element {i} is NaN (unwritten?) but the reference gives {w}")
            });
        }
        if w.is_nan() {
            continue;
        }
        match cmp {
            Cmp::Exact if g.to_bits() != (w as f32).to_bits() => {
                return Err(format!(
                    "element {i} is {g} but the reference gives {w} (bits)"
                ));
            }
            _ => {
                let e = (g as f64 - w).abs() / max_ref;
                if e > worst.0 {
                    worst = (e, i);
                }
            }
        }
    }
    if cmp == Cmp::Tol && worst.0 > tol {
        let i = worst.1;
        return Err(format!(
            "max|diff|/max|ref| = {:.3e} > {tol:.0e} at element {i} (got {}, want {})",
            worst.0, got[i], want[i]
        ));
    }
    Ok(worst.0)
}

/// Scalars bit for bit (NaN in `want`: not checked).
fn compare_scalars(got: &[f64], want: &[f64]) -> std::result::Result<(), String> {
    if want.is_empty() {
        return Ok(());
    }
    if got.len() != want.len() {
        return Err(format!("scalars {got:?}, reference {want:?}"));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !w.is_nan() && g.to_bits() != w.to_bits() {
            return Err(format!(
                "scalar {i}: {g} but the reference gives {w} ({got:?} vs {want:?})"
            ));
        }
    }
    Ok(())
}

/// Scalars against `(value, relative tolerance)` pairs (tolerance 0: bit for bit).
fn compare_scalars_approx(got: &[f64], want: &[(f64, f64)]) -> std::result::Result<(), String> {
    if want.is_empty() {
        return Ok(());
    }
    if got.len() != want.len() {
        return Err(format!("scalars {got:?}, reference {want:?}"));
    }
    for (i, (g, &(w, t))) in got.iter().zip(want).enumerate() {
        let ok = if t == 0.0 {
            g.to_bits() == w.to_bits()
        } else {
            (g - w).abs() <= t * w.abs()
        };
        if std::env::var_os("SEGVOL_VERBOSE").is_some() && t > 0.0 {
            eprintln!(
                "scalar {i}: {g} vs f64 {w}: rel {:.2e}",
                (g - w).abs() / w.abs()
            );
        }
        if !ok {
            return Err(format!(
                "scalar {i}: {g} but the reference gives {w} (tolerance {t:e}; {got:?})"
            ));
        }
    }
    Ok(())
}

/// Runs one case on one device: device vs CPU, both vs the f64 reference; in perf mode, the
/// timing line. Returns the failure, if any.
fn run_case(dev: &Device, case: &Case, perf: bool) -> std::result::Result<(), String> {
    let op = &case.op;
    let seed = next_seed();
    let spec = op.spec(seed);
    let ddt = dev.dtype();
    let dts: Vec<DType> = spec.operands.iter().map(|o| o.st.on(ddt)).collect();
    let cdts: Vec<DType> = spec.operands.iter().map(|o| o.st.on_cpu()).collect();
    let contents: Vec<Vec<u8>> = spec
        .operands
        .iter()
        .zip(&dts)
        .map(|(o, &d)| o.bytes(d, d))
        .collect();
    let cpu_contents: Vec<Vec<u8>> = spec
        .operands
        .iter()
        .zip(dts.iter().zip(&cdts))
        .map(|(o, (&d, &c))| o.bytes(c, d))
        .collect();
    let host: Vec<Vec<f32>> = spec
        .operands
        .iter()
        .zip(&dts)
        .map(|(o, &d)| o.host(d))
        .collect();
    let ctx = format!("{} {} (seed {seed:#x})", dev.label, op.label());

    let be = dev.backend.as_ref();
    let p = place(be, &spec.operands, &dts, &contents);
    let got = unsafe { op.launch(be, &p.addr, &p.dt) }.and_then(|s| be.synchronize().map(|_| s));
    let cpu = cpu();
    let pc = place(cpu, &spec.operands, &cdts, &cpu_contents);
    let want = unsafe { op.launch(cpu, &pc.addr, &pc.dt) };

    // Error cases: both refuse, with the CPU's message and kind.
    let (got_s, want_s) = match (got, want) {
        (Ok(g), Ok(w)) if !op.expects_error() => (g, w),
        (Err(g), Err(w)) if op.expects_error() => {
            if !matches!(g, Error::Input(_)) || g.to_string() != w.to_string() {
                return Err(format!("{ctx}: error {g:?}, the CPU's {w:?}"));
            }
            return Ok(());
        }
        (g, w) => {
            return Err(format!(
                "{ctx}: {} on the device, {} on the CPU ({})",
                g.map_or_else(|e| format!("error `{e}`"), |_| "ok".into()),
                w.map_or_else(|e| format!("error `{e}`"), |_| "ok".into()),
                if op.expects_error() {
                    "both must refuse"
                } else {
                    "both must succeed"
                }
            ))
        }
    };

    let cmp = op.cmp();
    let mut worst = 0f64;
    let (mut dev_outs, mut cpu_outs) = (Vec::new(), Vec::new());
    for &i in &spec.reads {
        let g = read_back(be, &p, &spec.operands, i);
        let w = read_back(cpu, &pc, &spec.operands, i);
        // The CPU's value stored as the device stores it.
        let w64: Vec<f64> = if cmp == Cmp::Exact {
            round_through(&w, dts[i])
                .iter()
                .map(|&x| x as f64)
                .collect()
        } else {
            w.iter().map(|&x| x as f64).collect()
        };
        let e = compare(&g, &w64, cmp, tol(ddt)).map_err(|e| format!("{ctx}: vs cpu: {e}"))?;
        worst = worst.max(e);
        dev_outs.push(g);
        cpu_outs.push(w);
    }
    compare_scalars(&got_s, &want_s).map_err(|e| format!("{ctx}: vs cpu: {e}"))?;

    // The f64 reference: the device (its dtype's tolerance) and the CPU (f32's).
    if !case.heavy {
        for (who, scalars, t, outs) in [
            ("device", &got_s, tol(ddt), &dev_outs),
            ("cpu", &want_s, tol(DType::F32), &cpu_outs),
        ] {
            let Some((ref_outs, ref_s)) = op.reference(&host, scalars) else {
                break;
            };
            for (g, r) in outs.iter().zip(&ref_outs) {
                compare(g, r, Cmp::Tol, t)
                    .map_err(|e| format!("{ctx}: {who} vs the f64 reference: {e}"))?;
            }
            compare_scalars_approx(scalars, &ref_s)
                .map_err(|e| format!("{ctx}: {who} vs the f64 reference: {e}"))?;
        }
    }
    if std::env::var_os("SEGVOL_VERBOSE").is_some() {
        eprintln!("{ctx}: ok, max rel err vs cpu {worst:.2e}");
    }

    if perf {
        time_case(dev, case, &spec, &dts, &p);
    }
    Ok(())
}

fn perf_iters() -> usize {
    std::env::var("SEGVOL_BACKEND_OPS_PERF_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(20)
}

/// Times `iters` launches (after one warm-up), each followed by `synchronize`; prints
/// `perf <device> <case> <median_us> us <rate> GFLOP/s|GB/s`.
fn time_case(dev: &Device, case: &Case, spec: &Spec, dts: &[DType], p: &Placed) {
    let be = dev.backend.as_ref();
    let launch = || {
        unsafe { case.op.launch(be, &p.addr, &p.dt) }.unwrap();
        be.synchronize().unwrap();
    };
    launch();
    let mut t: Vec<f64> = (0..perf_iters())
        .map(|_| {
            let s = Instant::now();
            launch();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    let med = t[t.len() / 2];
    let rate = if spec.flops > 0.0 {
        format!("{:.1} GFLOP/s", spec.flops / med / 1e9)
    } else {
        let bytes = spec.bytes.unwrap_or_else(|| {
            let size = |i: usize| (spec.operands[i].len * dts[i].size()) as f64;
            let inputs: f64 = (0..spec.operands.len())
                .filter(|&i| spec.operands[i].is_input())
                .map(size)
                .sum();
            inputs + spec.reads.iter().map(|&i| size(i)).sum::<f64>()
        });
        format!("{:.2} GB/s", bytes / med / 1e9)
    };
    println!(
        "perf {} {} {:.1} us {rate}",
        dev.label,
        case.op.label(),
        med * 1e6
    );
}

/// Runs every case of `op_name` on every device; panics with the list of failures.
fn run_op(op_name: &str) {
    let perf = perf_mode();
    let filter = std::env::var("SEGVOL_BACKEND_OPS_FILTER").unwrap_or_default();
    let all = cases();
    let mut failures = Vec::new();
    let mut ran = 0;
    let t = Instant::now();
    for dev in devices() {
        for case in all.iter().filter(|c| c.op.name() == op_name) {
            if case.heavy && (!perf || dev.is_emu) {
                continue;
            }
            if case.op.storage_independent() && !dev.first_of_spec {
                continue;
            }
            let explicit_reduced = case
                .op
                .spec_dtypes()
                .iter()
                .any(|s| matches!(s, St::Is(DType::F16 | DType::BF16)));
            if dev.is_cpu && explicit_reduced {
                continue;
            }
            let label = case.op.label();
            if !filter.is_empty() && !label.contains(&filter) {
                continue;
            }
            ran += 1;
            if let Err(e) = run_case(dev, case, perf) {
                failures.push(e);
            }
        }
    }
    eprintln!(
        "{op_name}: {ran} case runs on {} devices, {} failed, {:.2} s",
        devices().len(),
        failures.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {ran} {op_name} case runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

impl Op {
    /// The explicit storage of every operand (without building inputs).
    fn spec_dtypes(&self) -> Vec<St> {
        match self {
            Op::CopyBox { dst, .. } => vec![St::F32, *dst],
            Op::Interp { x, out, .. } => vec![*x, *out],
            Op::PatchGather { x, .. } => vec![*x, St::S],
            _ => vec![],
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Tests: one per op, so that the harness runs them in parallel.
// ------------------------------------------------------------------------------------------------

/// The table covers every op of the Backend trait, every op at least once per dtype class.
#[test]
fn table_covers_every_backend_op() {
    let all = cases();
    for name in ALL_OPS {
        let n = all
            .iter()
            .filter(|c| !c.heavy && c.op.name() == name)
            .count();
        assert!(n > 0, "no case for {name}");
        eprintln!("{name}: {n} cases");
    }
    assert!(all.iter().all(|c| ALL_OPS.contains(&c.op.name())));
    let mut names: Vec<String> = all.iter().map(|c| c.op.label()).collect();
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n, "case names are unique");
    assert!(
        names.iter().all(|s| !s.contains(' ')),
        "names have no spaces"
    );
}

macro_rules! op_tests {
    ($($test:ident => $op:literal,)*) => {
        $(
            #[test]
            fn $test() {
                run_op($op);
            }
        )*
    };
}

op_tests! {
    table_gemm => "gemm",
    table_attention => "attention",
    table_layer_norm => "layer_norm",
    table_layer_norm_joint => "layer_norm_joint",
    table_conv_transpose3d_k2s2 => "conv_transpose3d_k2s2",
    table_interp3d => "interp3d",
    table_patch_gather3d => "patch_gather3d",
    table_add => "add",
    table_activation => "activation",
    table_embed_gather => "embed_gather",
    table_foreground_stats => "foreground_stats",
    table_clip_zscore => "clip_zscore",
    table_shift_scale => "shift_scale",
    table_bbox_above => "bbox_above",
    table_copy_box => "copy_box",
    table_accumulate_window => "accumulate_window",
    table_divide_counts => "divide_counts",
    table_fill => "fill",
    table_threshold_u8 => "threshold_u8",
}
