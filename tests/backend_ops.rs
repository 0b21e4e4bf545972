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

use common::parity::{float_volume, hu_volume, next_seed, random};
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
// Ops: one struct per Backend op, its operands, launch and (optional) f64 reference together.
// ------------------------------------------------------------------------------------------------

/// How a case's outputs are compared with the CPU's.
#[derive(Clone, Copy, PartialEq)]
enum Cmp {
    /// Within the storage dtype's tolerance.
    Tol,
    /// Bit for bit, after rounding the CPU's value through the output dtype.
    Exact,
}

/// The f64 reference of a case: the compared outputs (whole buffers, NaN where untouched) and
/// the scalars as `(value, relative tolerance)` (tolerance 0: bit for bit).
type Reference = (Vec<Vec<f64>>, Vec<(f64, f64)>);

/// One op of the table.
trait OpCase {
    /// The Backend method.
    fn name(&self) -> &'static str;
    /// The parameters, without spaces.
    fn params(&self) -> String;
    /// The operands (fresh random inputs from `seed`), the outputs to compare, and the work.
    fn spec(&self, seed: u64) -> Spec;
    /// Launches the op on `be` with operand addresses `a` (dtypes `d`); returns its scalar
    /// results (statistics, min / max, a box).
    ///
    /// # Safety
    /// `a` and `d` come from [`place`] with this case's spec.
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], d: &[DType]) -> Result<Vec<f64>>;
    /// The f64 reference from the inputs as the device read them (`host`: whole buffers as
    /// f32, NaN where poisoned), given the run's own scalars `got`. `None`: the CPU backend is
    /// the reference of record.
    fn reference(&self, host: &[Vec<f32>], got: &[f64]) -> Option<Reference> {
        let _ = (host, got);
        None
    }
    fn cmp(&self) -> Cmp {
        Cmp::Tol
    }
    /// Volume ops compute in f32 whatever the storage dtype: one device per spec runs them.
    fn storage_independent(&self) -> bool {
        false
    }
    fn expects_error(&self) -> bool {
        false
    }
    /// Explicit operand dtypes (the CPU backend skips cases with an f16 / bf16 one).
    fn explicit(&self) -> Vec<St> {
        Vec::new()
    }
    fn label(&self) -> String {
        format!("{}/{}", self.name(), self.params())
    }
}

fn flag(on: bool, s: &str) -> String {
    if on {
        format!("_{s}")
    } else {
        String::new()
    }
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

/// The buffer `host[i]` as f64 with `vals` written from element `off` on.
fn written(host: &[Vec<f32>], i: usize, off: usize, vals: &[f64]) -> Vec<f64> {
    let mut b: Vec<f64> = host[i].iter().map(|&v| v as f64).collect();
    b[off..off + vals.len()].copy_from_slice(vals);
    b
}

fn plain(operands: Vec<Operand>, reads: Vec<usize>) -> Spec {
    Spec {
        operands,
        reads,
        flops: 0.0,
        bytes: None,
    }
}

// ----- gemm -----

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

/// `C = act(alpha A op(B) + bias) + R`; operands A, B, C, bias, R.
struct Gemm {
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
}

/// Strides and lengths of a GEMM case.
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

impl Gemm {
    fn layout(&self) -> GemmLayout {
        let (m, n, k, pad) = (self.m, self.n, self.k, self.pad);
        let lda = k + pad;
        let ldb = if self.b_trans { k + 2 * pad } else { n + pad };
        let ldc = n + 3 * pad;
        let brows = if self.b_trans { n } else { k };
        let bsa = m * lda + pad;
        let bsb = if self.bcast_b { 0 } else { brows * ldb + pad };
        let bsc = m * ldc + pad + 1;
        let b = self.batch;
        let (ldr, bsr, len_r) = match self.res {
            Res::None | Res::InPlace => (0, 0, 0),
            Res::Ld => (n + 1, m * (n + 1), b * m * (n + 1)),
            Res::Row => (0, n, b * n),
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
            len_a: ((b - 1) * bsa + m * lda).max(1),
            len_b: ((b - 1) * bsb + brows * ldb).max(1),
            len_c: (b - 1) * bsc + m * ldc,
            len_r,
        }
    }
}

impl OpCase for Gemm {
    fn name(&self) -> &'static str {
        "gemm"
    }
    fn params(&self) -> String {
        format!(
            "b{}_m{}_n{}_k{}{}{}{}_{}_res-{:?}{}{}",
            self.batch,
            self.m,
            self.n,
            self.k,
            flag(self.b_trans, "bt"),
            flag(self.bcast_b, "bcastb"),
            flag(self.bias, "bias"),
            act_tag(self.act),
            self.res,
            flag(self.alpha != 1.0, &format!("alpha{}", self.alpha)),
            flag(self.pad > 0, &format!("pad{}", self.pad)),
        )
    }
    fn spec(&self, seed: u64) -> Spec {
        let g = self.layout();
        let c = if self.res == Res::InPlace {
            input(St::S, random(g.len_c, 2.0, seed ^ 2))
        } else {
            output(St::S, g.len_c)
        };
        let operands = vec![
            input(St::S, random(g.len_a, 1.0, seed)),
            input(St::S, random(g.len_b, 1.0, seed ^ 1)),
            c,
            input(
                St::S,
                random(if self.bias { self.n } else { 1 }, 1.0, seed ^ 3),
            ),
            input(St::S, random(g.len_r.max(1), 1.0, seed ^ 4)),
        ];
        Spec {
            operands,
            reads: vec![2],
            flops: 2.0 * (self.batch * self.m * self.n * self.k) as f64,
            bytes: None,
        }
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let g = self.layout();
        let residual = match self.res {
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
            batch: self.batch,
            m: self.m,
            n: self.n,
            k: self.k,
            a: a[0],
            lda: g.lda,
            batch_stride_a: g.bsa,
            b: a[1],
            ldb: g.ldb,
            batch_stride_b: g.bsb,
            b_trans: self.b_trans,
            c: a[2],
            ldc: g.ldc,
            batch_stride_c: g.bsc,
            alpha: self.alpha,
            bias: self.bias.then_some(a[3]),
            act: self.act,
            residual,
        };
        unsafe { be.gemm(&args) }?;
        Ok(vec![])
    }
    fn reference(&self, host: &[Vec<f32>], _got: &[f64]) -> Option<Reference> {
        let g = self.layout();
        let mut c: Vec<f64> = host[2].iter().map(|&v| v as f64).collect();
        let residual = match self.res {
            Res::None => None,
            Res::InPlace => Some((&host[2][..], g.ldc, g.bsc)),
            _ => Some((&host[4][..], g.ldr, g.bsr)),
        };
        let args = r64::Gemm {
            batch: self.batch,
            m: self.m,
            n: self.n,
            k: self.k,
            a: &host[0],
            lda: g.lda,
            batch_stride_a: g.bsa,
            b: &host[1],
            ldb: g.ldb,
            batch_stride_b: g.bsb,
            b_trans: self.b_trans,
            ldc: g.ldc,
            batch_stride_c: g.bsc,
            alpha: self.alpha,
            bias: self.bias.then_some(&host[3][..]),
            act: self.act,
            residual,
        };
        r64::gemm(&args, &mut c);
        Some((vec![c], vec![]))
    }
}

// ----- attention -----

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

/// Operands: the input buffers of the layout (q, k, v or one packed QKV), then out.
struct Attention {
    batch: usize,
    heads: usize,
    nq: usize,
    nk: usize,
    hd: usize,
    causal: bool,
    layout: Layout,
    /// `None`: 1 / sqrt(hd).
    scale: Option<f32>,
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

impl Attention {
    fn layout(&self) -> AttnLayout {
        let (batch, nq, nk) = (self.batch, self.nq, self.nk);
        let w = self.heads * self.hd;
        let scale = self.scale.unwrap_or(1.0 / (self.hd as f32).sqrt());
        let view = |buf, off, row, batch| AView {
            buf,
            off,
            row,
            batch,
        };
        match self.layout {
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

impl OpCase for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn params(&self) -> String {
        let layout = match self.layout {
            Layout::Contig => "contig".to_string(),
            Layout::Packed(p) => format!("packed-pad{p}"),
            Layout::Odd => "odd".to_string(),
        };
        format!(
            "b{}_h{}_nq{}_nk{}_d{}{}_{layout}{}",
            self.batch,
            self.heads,
            self.nq,
            self.nk,
            self.hd,
            flag(self.causal, "causal"),
            self.scale.map_or(String::new(), |s| format!("_scale{s}")),
        )
    }
    fn spec(&self, seed: u64) -> Spec {
        let l = self.layout();
        let mut operands: Vec<Operand> = l
            .inputs
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let scale = if i == 2 { 1.0 } else { 1.5 };
                input(St::S, random(len, scale, seed.wrapping_add(i as u64)))
            })
            .collect();
        operands.push(output(St::S, l.out_len));
        let keys: f64 = if self.causal {
            (0..self.nq).map(|i| self.nk.min(i + 1) as f64).sum()
        } else {
            (self.nq * self.nk) as f64
        };
        Spec {
            reads: vec![operands.len() - 1],
            operands,
            flops: 4.0 * (self.batch * self.heads * self.hd) as f64 * keys,
            bytes: None,
        }
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], d: &[DType]) -> Result<Vec<f64>> {
        let l = self.layout();
        let o = l.inputs.len();
        let at = |v: AView, buf: usize| a[buf] + (v.off * d[buf].size()) as u64;
        let args = AttentionArgs {
            batch: self.batch,
            heads: self.heads,
            nq: self.nq,
            nk: self.nk,
            head_dim: self.hd,
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
            causal: self.causal,
        };
        unsafe { be.attention(&args) }?;
        Ok(vec![])
    }
    fn reference(&self, host: &[Vec<f32>], _got: &[f64]) -> Option<Reference> {
        let l = self.layout();
        let view = |x: AView| r64::View {
            data: &host[x.buf][x.off..],
            row: x.row,
            batch: x.batch,
        };
        let mut out: Vec<f64> = host[l.inputs.len()].iter().map(|&v| v as f64).collect();
        r64::attention(
            self.batch,
            self.heads,
            self.nq,
            self.nk,
            self.hd,
            view(l.q),
            view(l.k),
            view(l.v),
            l.scale,
            self.causal,
            &mut out[l.out.off..],
            l.out.row,
            l.out.batch,
        );
        Some((vec![out], vec![]))
    }
}

// ----- layer norms -----

/// Operands x (offset mean: the two-pass variance must cope), weight, bias, out.
struct LayerNorm {
    rows: usize,
    cols: usize,
    in_place: bool,
}

impl OpCase for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn params(&self) -> String {
        format!(
            "{}x{}{}",
            self.rows,
            self.cols,
            flag(self.in_place, "inplace")
        )
    }
    fn spec(&self, seed: u64) -> Spec {
        let n = self.rows * self.cols;
        let x = random(n, 3.0, seed).iter().map(|v| v + 5.0).collect();
        let operands = vec![
            input(St::S, x),
            input(St::S, random(self.cols, 1.0, seed ^ 1)),
            input(St::S, random(self.cols, 0.5, seed ^ 2)),
            output(St::S, n),
        ];
        plain(operands, vec![if self.in_place { 0 } else { 3 }])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let args = LayerNormArgs {
            x: a[0],
            out: a[if self.in_place { 0 } else { 3 }],
            rows: self.rows,
            cols: self.cols,
            weight: a[1],
            bias: a[2],
            eps: 1e-5,
        };
        unsafe { be.layer_norm(&args) }?;
        Ok(vec![])
    }
    fn reference(&self, host: &[Vec<f32>], _got: &[f64]) -> Option<Reference> {
        let (r, c) = (self.rows, self.cols);
        let y = r64::layer_norm(&host[0], r, c, &host[1], &host[2], 1e-5);
        let out = written(host, if self.in_place { 0 } else { 3 }, 0, &y);
        Some((vec![out], vec![]))
    }
}

/// Operands x, weight, bias, out.
struct LayerNormJoint {
    batch: usize,
    n: usize,
    act: Act,
    in_place: bool,
}

impl OpCase for LayerNormJoint {
    fn name(&self) -> &'static str {
        "layer_norm_joint"
    }
    fn params(&self) -> String {
        let inplace = flag(self.in_place, "inplace");
        format!("b{}_n{}_{}{inplace}", self.batch, self.n, act_tag(self.act))
    }
    fn spec(&self, seed: u64) -> Spec {
        let total = self.batch * self.n;
        let x = random(total, 2.0, seed).iter().map(|v| v - 0.7).collect();
        let operands = vec![
            input(St::S, x),
            input(St::S, random(self.n, 1.0, seed ^ 1)),
            input(St::S, random(self.n, 0.5, seed ^ 2)),
            output(St::S, total),
        ];
        plain(operands, vec![if self.in_place { 0 } else { 3 }])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let args = LayerNormJointArgs {
            x: a[0],
            out: a[if self.in_place { 0 } else { 3 }],
            batch: self.batch,
            n: self.n,
            weight: a[1],
            bias: a[2],
            eps: 1e-5,
            act: self.act,
        };
        unsafe { be.layer_norm_joint(&args) }?;
        Ok(vec![])
    }
    fn reference(&self, host: &[Vec<f32>], _got: &[f64]) -> Option<Reference> {
        let (b, n, act) = (self.batch, self.n, self.act);
        let y = r64::layer_norm_joint(&host[0], b, n, &host[1], &host[2], 1e-5, act);
        let out = written(host, if self.in_place { 0 } else { 3 }, 0, &y);
        Some((vec![out], vec![]))
    }
}

// ----- conv_transpose3d_k2s2 -----

/// Operands x, weight, bias, out; `offset` > 0 puts x and out that many elements into their
/// buffers (unaligned: element-wise loads and single-element stores).
struct ConvT {
    batch: usize,
    cin: usize,
    cout: usize,
    dims: [usize; 3],
    channels_last: bool,
    act: Act,
    offset: usize,
}

impl ConvT {
    fn vox(&self) -> usize {
        self.dims.iter().product()
    }
}

impl OpCase for ConvT {
    fn name(&self) -> &'static str {
        "conv_transpose3d_k2s2"
    }
    fn params(&self) -> String {
        format!(
            "b{}_cin{}_cout{}_{}_{}_{}{}",
            self.batch,
            self.cin,
            self.cout,
            dims_tag(self.dims),
            if self.channels_last { "cl" } else { "cf" },
            act_tag(self.act),
            flag(self.offset > 0, &format!("off{}", self.offset)),
        )
    }
    fn spec(&self, seed: u64) -> Spec {
        let (b, cin, cout, vox, off) = (self.batch, self.cin, self.cout, self.vox(), self.offset);
        let ws = 1.0 / (cin as f32).sqrt().max(1.0);
        let operands = vec![
            input_at(St::S, random(b * cin * vox, 1.0, seed), off),
            input(St::S, random(cin * cout * 8, ws, seed ^ 1)),
            input(St::S, random(cout, 0.5, seed ^ 2)),
            output_at(St::S, b * cout * 8 * vox, off),
        ];
        Spec {
            operands,
            reads: vec![3],
            flops: 2.0 * (b * cin * cout * 8 * vox) as f64,
            bytes: None,
        }
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let args = ConvT3dArgs {
            x: a[0],
            out: a[3],
            weight: a[1],
            bias: a[2],
            batch: self.batch,
            cin: self.cin,
            cout: self.cout,
            dims: self.dims,
            channels_last_input: self.channels_last,
            act: self.act,
        };
        unsafe { be.conv_transpose3d_k2s2(&args) }?;
        Ok(vec![])
    }
    fn reference(&self, host: &[Vec<f32>], _got: &[f64]) -> Option<Reference> {
        let y = r64::conv_transpose3d_k2s2(
            &host[0][self.offset..],
            &host[1],
            &host[2],
            self.batch,
            self.cin,
            self.cout,
            self.dims,
            self.channels_last,
            self.act,
        );
        Some((vec![written(host, 3, self.offset, &y)], vec![]))
    }
}

// ----- interp3d, patch_gather3d, add, activation, embed_gather -----

/// Operands x (dtype `x`), out (dtype `out`). Exact: the kernels compute the CPU's operations.
struct Interp {
    planes: usize,
    src: [usize; 3],
    dst: [usize; 3],
    mode: InterpMode,
    x: St,
    out: St,
}

impl OpCase for Interp {
    fn name(&self) -> &'static str {
        "interp3d"
    }
    fn params(&self) -> String {
        format!(
            "{:?}_p{}_{}-{}_{}-{}",
            self.mode,
            self.planes,
            dims_tag(self.src),
            dims_tag(self.dst),
            self.x.tag(),
            self.out.tag()
        )
    }
    fn spec(&self, seed: u64) -> Spec {
        let n_in = self.planes * self.src.iter().product::<usize>();
        let n_out = self.planes * self.dst.iter().product::<usize>();
        let operands = vec![
            input(self.x, random(n_in, 4.0, seed)),
            output(self.out, n_out),
        ];
        plain(operands, vec![1])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], d: &[DType]) -> Result<Vec<f64>> {
        let args = Interp3dArgs {
            x: a[0],
            x_dtype: d[0],
            out: a[1],
            out_dtype: d[1],
            planes: self.planes,
            src: self.src,
            dst: self.dst,
            mode: self.mode,
        };
        unsafe { be.interp3d(&args) }?;
        Ok(vec![])
    }
    fn cmp(&self) -> Cmp {
        Cmp::Exact
    }
    fn explicit(&self) -> Vec<St> {
        vec![self.x, self.out]
    }
}

/// Operands x (dtype `x`), out. Exact: a gather moves values.
struct PatchGather {
    batch: usize,
    dims: [usize; 3],
    patch: [usize; 3],
    x: St,
}

impl OpCase for PatchGather {
    fn name(&self) -> &'static str {
        "patch_gather3d"
    }
    fn params(&self) -> String {
        let (d, p) = (dims_tag(self.dims), dims_tag(self.patch));
        format!("b{}_{d}_p{p}_x-{}", self.batch, self.x.tag())
    }
    fn spec(&self, seed: u64) -> Spec {
        let total = self.batch * self.dims.iter().product::<usize>();
        let operands = vec![
            input(self.x, random(total, 1.0, seed)),
            output(St::S, total),
        ];
        plain(operands, vec![1])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], d: &[DType]) -> Result<Vec<f64>> {
        let args = PatchGatherArgs {
            x: a[0],
            x_dtype: d[0],
            out: a[1],
            batch: self.batch,
            dims: self.dims,
            patch: self.patch,
        };
        unsafe { be.patch_gather3d(&args) }?;
        Ok(vec![])
    }
    fn cmp(&self) -> Cmp {
        Cmp::Exact
    }
    fn explicit(&self) -> Vec<St> {
        vec![self.x]
    }
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

/// `out = a + b[i % period]`; operands a, b, out, views `offset` elements into their buffers.
struct Add {
    n: usize,
    period: usize,
    alias: Alias,
    offset: usize,
}

impl OpCase for Add {
    fn name(&self) -> &'static str {
        "add"
    }
    fn params(&self) -> String {
        let off = flag(self.offset > 0, &format!("off{}", self.offset));
        format!("n{}_p{}_alias-{:?}{off}", self.n, self.period, self.alias)
    }
    fn spec(&self, seed: u64) -> Spec {
        let operands = vec![
            input_at(St::S, random(self.n, 2.0, seed), self.offset),
            input_at(St::S, random(self.period, 1.5, seed ^ 1), self.offset),
            output_at(St::S, self.n, self.offset),
        ];
        plain(
            operands,
            vec![if self.alias == Alias::None { 2 } else { 0 }],
        )
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let (b, out) = match self.alias {
            Alias::None => (a[1], a[2]),
            Alias::OutA => (a[1], a[0]),
            Alias::All => (a[0], a[0]),
        };
        let args = AddArgs {
            a: a[0],
            b,
            out,
            n: self.n,
            period: self.period,
        };
        unsafe { be.add(&args) }?;
        Ok(vec![])
    }
    fn reference(&self, host: &[Vec<f32>], _got: &[f64]) -> Option<Reference> {
        let off = self.offset;
        let (b, read) = match self.alias {
            Alias::None => (1, 2),
            Alias::OutA => (1, 0),
            Alias::All => (0, 0),
        };
        let y = r64::add(&host[0][off..], &host[b][off..], self.n, self.period);
        Some((vec![written(host, read, off, &y)], vec![]))
    }
}

/// `out = act(0.8 x)`; operands x, out.
struct Activation {
    n: usize,
    act: Act,
    in_place: bool,
}

impl OpCase for Activation {
    fn name(&self) -> &'static str {
        "activation"
    }
    fn params(&self) -> String {
        let inplace = flag(self.in_place, "inplace");
        format!("n{}_{}{inplace}", self.n, act_tag(self.act))
    }
    fn spec(&self, seed: u64) -> Spec {
        let operands = vec![
            input(St::S, random(self.n, 4.0, seed)),
            output(St::S, self.n),
        ];
        plain(operands, vec![if self.in_place { 0 } else { 1 }])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let args = ActArgs {
            x: a[0],
            out: a[if self.in_place { 0 } else { 1 }],
            n: self.n,
            scale: 0.8,
            act: self.act,
        };
        unsafe { be.activation(&args) }?;
        Ok(vec![])
    }
    fn reference(&self, host: &[Vec<f32>], _got: &[f64]) -> Option<Reference> {
        let y = r64::activation(&host[0], self.n, 0.8, self.act);
        Some((
            vec![written(host, if self.in_place { 0 } else { 1 }, 0, &y)],
            vec![],
        ))
    }
}

/// `out[r] = table[ids[r]] + pos[r]`; operands ids (i32), table, pos, out.
struct Embed {
    vocab: usize,
    rows: usize,
    cols: usize,
}

impl OpCase for Embed {
    fn name(&self) -> &'static str {
        "embed_gather"
    }
    fn params(&self) -> String {
        format!("v{}_r{}_c{}", self.vocab, self.rows, self.cols)
    }
    fn spec(&self, seed: u64) -> Spec {
        let (vocab, rows, cols) = (self.vocab, self.rows, self.cols);
        let ids: Vec<i32> = (0..rows)
            .map(|r| ((r * 37 + seed as usize) % vocab) as i32)
            .collect();
        let operands = vec![
            raw(DType::I32, bytemuck::cast_slice(&ids).to_vec()),
            input(St::S, random(vocab * cols, 1.0, seed ^ 1)),
            input(St::S, random(rows * cols, 0.5, seed ^ 2)),
            output(St::S, rows * cols),
        ];
        plain(operands, vec![3])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let args = EmbedArgs {
            ids: a[0],
            table: a[1],
            vocab: self.vocab,
            pos: a[2],
            out: a[3],
            rows: self.rows,
            cols: self.cols,
        };
        unsafe { be.embed_gather(&args) }?;
        Ok(vec![])
    }
}

// ----- volume ops (f32, bit for bit) -----

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
                let bad = if self == Vol::Nan {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                };
                v[r.below(n as u64) as usize] = bad;
                v
            }
            Vol::Empty => vec![1.0],
            Vol::One => vec![42.0],
        }
    }
}

/// Counts 0..3 (some zero) for `divide_counts` and the accumulators.
fn counts(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed as usize) % 4) as f32)
        .collect()
}

/// The common trait items of the volume ops.
macro_rules! volume_op {
    () => {
        fn cmp(&self) -> Cmp {
            Cmp::Exact
        }
        fn storage_independent(&self) -> bool {
            true
        }
    };
}

/// Statistics of operand x (unaligned with `misalign`); scalars threshold, count, p_lo, p_hi,
/// mean, std.
struct ForegroundStats {
    dims: [usize; 3],
    vol: Vol,
    misalign: bool,
}

impl OpCase for ForegroundStats {
    volume_op!();
    fn name(&self) -> &'static str {
        "foreground_stats"
    }
    fn params(&self) -> String {
        let m = flag(self.misalign, "misalign");
        format!("{}_{:?}{m}", dims_tag(self.dims), self.vol)
    }
    fn expects_error(&self) -> bool {
        self.vol.is_error()
    }
    fn spec(&self, seed: u64) -> Spec {
        let n = self.dims.iter().product::<usize>();
        let x = self.vol.values(n, seed);
        plain(vec![input_at(St::F32, x, self.misalign as usize)], vec![])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let s = unsafe { be.foreground_stats(a[0], self.dims) }?;
        Ok(vec![
            s.threshold as f64,
            s.count as f64,
            s.p_lo,
            s.p_hi,
            s.mean as f64,
            s.std as f64,
        ])
    }
    fn reference(&self, host: &[Vec<f32>], got: &[f64]) -> Option<Reference> {
        let n: usize = self.dims.iter().product();
        let x = &host[0][self.misalign as usize..][..n];
        let (count, p_lo, p_hi) = r64::foreground_count_percentiles(x, got[0] as f32);
        let (threshold, mean, std) = r64::foreground_moments(x, got[0] as f32);
        // numpy's float32 pairwise sums against f64 ones: within 1e-5 (their error grows like
        // log2(n) * 2^-24 * sum|x| / |sum x|: 1.0e-6 was seen on 4 M HU voxels, whose mean
        // cancels); count and percentiles exact.
        let s = vec![
            (threshold, 1e-5),
            (count as f64, 0.0),
            (p_lo, 0.0),
            (p_hi, 0.0),
            (mean, 1e-5),
            (std, 1e-5),
        ];
        Some((vec![], s))
    }
}

/// Elementwise volume ops on operand x (unaligned views with `misalign`), out (or x in place).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Elementwise {
    /// `clip_zscore` (scalars min, max).
    ClipZscore,
    ShiftScale,
    /// `divide_counts` (operand 1: counts).
    DivideCounts,
}

struct VolElementwise {
    op: Elementwise,
    n: usize,
    misalign: bool,
    in_place: bool,
}

impl OpCase for VolElementwise {
    volume_op!();
    fn name(&self) -> &'static str {
        match self.op {
            Elementwise::ClipZscore => "clip_zscore",
            Elementwise::ShiftScale => "shift_scale",
            Elementwise::DivideCounts => "divide_counts",
        }
    }
    fn params(&self) -> String {
        let (m, i) = (
            flag(self.misalign, "misalign"),
            flag(self.in_place, "inplace"),
        );
        format!("n{}{m}{i}", self.n)
    }
    fn spec(&self, seed: u64) -> Spec {
        let (n, off) = (self.n, self.misalign as usize);
        let x = if self.op == Elementwise::DivideCounts {
            random(n, 3.0, seed)
        } else {
            float_volume(n, seed)
        };
        let operands = vec![
            input_at(St::F32, x, off),
            input_at(St::F32, counts(n, seed), off),
            output_at(St::F32, n, off),
        ];
        plain(operands, vec![if self.in_place { 0 } else { 2 }])
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let (x, n) = (a[0], self.n);
        let out = if self.in_place { a[0] } else { a[2] };
        match self.op {
            Elementwise::ClipZscore => {
                let args = ClipZscoreArgs {
                    x,
                    out,
                    n,
                    lo: -300.5,
                    hi: 1100.25,
                    mean: 412.5,
                    std: 287.3,
                };
                let (lo, hi) = unsafe { be.clip_zscore(&args) }?;
                Ok(vec![lo as f64, hi as f64])
            }
            Elementwise::ShiftScale => {
                let args = ShiftScaleArgs {
                    x,
                    out,
                    n,
                    sub: -25.75,
                    div: 1790.3,
                };
                unsafe { be.shift_scale(&args) }?;
                Ok(vec![])
            }
            Elementwise::DivideCounts => {
                unsafe { be.divide_counts(x, a[1], out, n) }?;
                Ok(vec![])
            }
        }
    }
}

/// `fill` (operand 0, value -1.75) or `threshold_u8` (x, then a u8 out at the same offset).
struct FillOrThreshold {
    threshold: bool,
    n: usize,
    misalign: bool,
}

impl OpCase for FillOrThreshold {
    volume_op!();
    fn name(&self) -> &'static str {
        if self.threshold {
            "threshold_u8"
        } else {
            "fill"
        }
    }
    fn params(&self) -> String {
        format!("n{}{}", self.n, flag(self.misalign, "misalign"))
    }
    fn spec(&self, seed: u64) -> Spec {
        let (n, off) = (self.n, self.misalign as usize);
        if self.threshold {
            let x = input_at(St::F32, random(n, 3.0, seed), off);
            plain(vec![x, output_at(St::Is(DType::U8), n, off)], vec![1])
        } else {
            plain(vec![output_at(St::F32, n, off)], vec![0])
        }
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        if self.threshold {
            unsafe { be.threshold_u8(a[0], a[1], self.n, 0.25) }?;
        } else {
            unsafe { be.fill(a[0], self.n, -1.75) }?;
        }
        Ok(vec![])
    }
}

/// Bounding box of `x > 0` in a sub-box of operand x; scalars the box (or -1: none).
struct BboxAbove {
    dims: [usize; 3],
    start: [usize; 3],
    extent: [usize; 3],
    /// Positives per 1000 voxels (0: no box).
    density: u64,
    misalign: bool,
}

impl OpCase for BboxAbove {
    volume_op!();
    fn name(&self) -> &'static str {
        "bbox_above"
    }
    fn params(&self) -> String {
        format!(
            "{}_at{}_ext{}_d{}{}",
            dims_tag(self.dims),
            dims_tag(self.start),
            dims_tag(self.extent),
            self.density,
            flag(self.misalign, "misalign")
        )
    }
    fn spec(&self, seed: u64) -> Spec {
        let n: usize = self.dims.iter().product();
        let mut r = Rng(seed);
        let x: Vec<f32> = (0..n)
            .map(|_| {
                if r.below(1000) < self.density {
                    r.unit() + 0.01
                } else {
                    -r.unit()
                }
            })
            .collect();
        Spec {
            operands: vec![input_at(St::F32, x, self.misalign as usize)],
            reads: vec![],
            flops: 0.0,
            bytes: Some(4.0 * self.extent.iter().product::<usize>() as f64),
        }
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let b = unsafe { be.bbox_above(a[0], self.dims, self.start, self.extent, 0.0) }?;
        Ok(b.map_or(vec![-1.0], |b| b.iter().map(|&v| v as f64).collect()))
    }
}

/// A box from operand src (zero padding outside it) into operand dst of dtype `dst`.
struct CopyBox {
    src_dims: [usize; 3],
    src_start: [i64; 3],
    dst_dims: [usize; 3],
    dst_start: [usize; 3],
    extent: [usize; 3],
    dst: St,
    misalign: bool,
}

impl OpCase for CopyBox {
    volume_op!();
    fn name(&self) -> &'static str {
        "copy_box"
    }
    fn params(&self) -> String {
        let s = self.src_start;
        format!(
            "{}_from{},{},{}_to{}_at{}_ext{}_{}{}",
            dims_tag(self.src_dims),
            s[0],
            s[1],
            s[2],
            dims_tag(self.dst_dims),
            dims_tag(self.dst_start),
            dims_tag(self.extent),
            self.dst.tag(),
            flag(self.misalign, "misalign")
        )
    }
    fn explicit(&self) -> Vec<St> {
        vec![self.dst]
    }
    fn spec(&self, seed: u64) -> Spec {
        let ns: usize = self.src_dims.iter().product();
        let nd: usize = self.dst_dims.iter().product();
        let ne: usize = self.extent.iter().product();
        let src = random(ns, 50.0, seed);
        Spec {
            operands: vec![
                input_at(St::F32, src, self.misalign as usize),
                output(self.dst, nd),
            ],
            reads: vec![1],
            flops: 0.0,
            bytes: Some(ne as f64 * (4 + self.dst.on(DType::F32).size()) as f64),
        }
    }
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], d: &[DType]) -> Result<Vec<f64>> {
        let args = CopyBoxArgs {
            src: a[0],
            src_dims: self.src_dims,
            src_start: self.src_start,
            dst: a[1],
            dst_dtype: d[1],
            dst_dims: self.dst_dims,
            dst_start: self.dst_start,
            extent: self.extent,
            pad: 0.0,
        };
        unsafe { be.copy_box(&args) }?;
        Ok(vec![])
    }
}

/// One window (operand win) added into accumulators acc and cnt holding earlier windows.
struct Accumulate {
    dims: [usize; 3],
    window: [usize; 3],
    start: [usize; 3],
}

impl OpCase for Accumulate {
    volume_op!();
    fn name(&self) -> &'static str {
        "accumulate_window"
    }
    fn params(&self) -> String {
        let (d, w, s) = (
            dims_tag(self.dims),
            dims_tag(self.window),
            dims_tag(self.start),
        );
        format!("{d}_win{w}_at{s}")
    }
    fn spec(&self, seed: u64) -> Spec {
        let n: usize = self.dims.iter().product();
        let nw: usize = self.window.iter().product();
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
    unsafe fn launch(&self, be: &dyn Backend, a: &[Addr], _d: &[DType]) -> Result<Vec<f64>> {
        let args = AccumulateArgs {
            win: a[0],
            window: self.window,
            acc: a[1],
            cnt: a[2],
            dims: self.dims,
            start: self.start,
        };
        unsafe { be.accumulate_window(&args) }?;
        Ok(vec![])
    }
}

/// The Backend ops the table must cover, by the names [`OpCase::name`] gives.
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

// ------------------------------------------------------------------------------------------------
// The case list
// ------------------------------------------------------------------------------------------------

/// One row of the table.
struct Case {
    op: Box<dyn OpCase>,
    /// Model-size shapes for perf mode only (never on the emulator).
    heavy: bool,
}

const ACTS: [Act; 4] = [Act::None, Act::Gelu, Act::Relu, Act::QuickGelu];

/// A GEMM without padding, alpha 1, B per batch.
#[allow(clippy::too_many_arguments)]
fn gemm(b: usize, m: usize, n: usize, k: usize, bt: bool, bias: bool, act: Act, res: Res) -> Gemm {
    Gemm {
        batch: b,
        m,
        n,
        k,
        b_trans: bt,
        bcast_b: false,
        bias,
        act,
        res,
        alpha: 1.0,
        pad: 0,
    }
}

/// Contiguous attention, scale 1/sqrt(hd).
fn attn(b: usize, heads: usize, nq: usize, nk: usize, hd: usize, causal: bool) -> Attention {
    Attention {
        batch: b,
        heads,
        nq,
        nk,
        hd,
        causal,
        layout: Layout::Contig,
        scale: None,
    }
}

fn conv(b: usize, cin: usize, cout: usize, dims: [usize; 3], act: Act, offset: usize) -> ConvT {
    ConvT {
        batch: b,
        cin,
        cout,
        dims,
        channels_last: true,
        act,
        offset,
    }
}

fn vol_ew(op: Elementwise, n: usize, misalign: bool, in_place: bool) -> VolElementwise {
    VolElementwise {
        op,
        n,
        misalign,
        in_place,
    }
}

fn bbox(dims: [usize; 3], start: [usize; 3], extent: [usize; 3], density: u64) -> BboxAbove {
    BboxAbove {
        dims,
        start,
        extent,
        density,
        misalign: false,
    }
}

fn copy_box(src_start: [i64; 3], dst_start: [usize; 3], extent: [usize; 3], dst: St) -> CopyBox {
    CopyBox {
        src_dims: [7, 33, 129],
        src_start,
        dst_dims: [9, 40, 131],
        dst_start,
        extent,
        dst,
        misalign: false,
    }
}

fn cases() -> Vec<Case> {
    let mut v: Vec<Box<dyn OpCase>> = Vec::new();
    let mut heavy: Vec<Box<dyn OpCase>> = Vec::new();
    let (t, f) = (true, false);

    // --- gemm: odd sizes x both B layouts x every epilogue (bias, act, residual layouts),
    // padded leading dimensions, alpha, B broadcast over the batch.
    let epilogues = [
        (f, Act::None, Res::None),
        (t, Act::None, Res::None),
        (t, Act::None, Res::InPlace),
        (f, Act::None, Res::Ld),
        (t, Act::Gelu, Res::None),
        (f, Act::Relu, Res::Row),
        (t, Act::QuickGelu, Res::InPlace),
        (t, Act::Gelu, Res::Shared),
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
        for bt in [f, t] {
            for (ei, &(bias, act, res)) in epilogues.iter().enumerate() {
                v.push(Box::new(Gemm {
                    bcast_b: b > 1 && ei % 3 == 1,
                    alpha: if ei % 4 == 3 { 0.375 } else { 1.0 },
                    pad: (si + ei) % 3,
                    ..gemm(b, m, n, k, bt, bias, act, res)
                }));
            }
        }
    }
    // The ViT's GEMMs at 65 tokens, width 96 (QKV, MLP up + GELU, MLP down + residual), and at
    // full size (2048 tokens, width 768: perf only).
    v.push(Box::new(gemm(1, 65, 288, 96, t, t, Act::None, Res::None)));
    v.push(Box::new(gemm(1, 65, 384, 96, t, t, Act::Gelu, Res::None)));
    v.push(Box::new(gemm(
        1,
        65,
        96,
        384,
        t,
        t,
        Act::None,
        Res::InPlace,
    )));
    heavy.push(Box::new(gemm(
        1,
        2048,
        2304,
        768,
        t,
        t,
        Act::None,
        Res::None,
    )));
    heavy.push(Box::new(gemm(
        1,
        2048,
        3072,
        768,
        t,
        t,
        Act::Gelu,
        Res::None,
    )));
    heavy.push(Box::new(gemm(
        1,
        2048,
        768,
        3072,
        t,
        t,
        Act::None,
        Res::InPlace,
    )));

    // --- attention: the head dims of the full and the tiny model over odd query / key counts
    // both ways, causal and not (batch and heads varied); head dims between the compiled sizes;
    // the ViT's packed QKV views with output gaps; odd strides (the general load path); peaky
    // softmax (scale 1).
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
            v.push(Box::new(attn(
                1 + i % 2,
                1 + (i + hd) % 3,
                nq,
                nk,
                hd,
                causal,
            )));
        }
    }
    for (hd, causal) in [(64, f), (24, t), (96, f), (48, t), (12, f)] {
        let packed = Layout::Packed(5);
        v.push(Box::new(Attention {
            layout: packed,
            ..attn(2, 3, 129, 129, hd, causal)
        }));
    }
    for (hd, nq, nk, causal) in [(64, 33, 129, f), (32, 129, 7, t), (96, 7, 33, f)] {
        let layout = Layout::Odd;
        v.push(Box::new(Attention {
            layout,
            ..attn(2, 2, nq, nk, hd, causal)
        }));
    }
    for hd in [1, 7, 40, 80, 100, 128] {
        v.push(Box::new(attn(2, 2, 67, 45, hd, hd % 2 == 1)));
    }
    for (hd, causal) in [(64, f), (16, t)] {
        let scale = Some(1.0);
        v.push(Box::new(Attention {
            scale,
            ..attn(1, 2, 129, 129, hd, causal)
        }));
    }
    let packed = Layout::Packed(0);
    heavy.push(Box::new(Attention {
        layout: packed,
        ..attn(1, 12, 2048, 2048, 64, f)
    }));
    heavy.push(Box::new(attn(1, 8, 77, 77, 64, t)));

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
        for in_place in [f, t] {
            v.push(Box::new(LayerNorm {
                rows,
                cols,
                in_place,
            }));
        }
    }
    heavy.push(Box::new(LayerNorm {
        rows: 2048,
        cols: 768,
        in_place: f,
    }));
    for (batch, n) in [
        (1, 1),
        (1, 7),
        (2, 4097),
        (2, 24_576),
        (1, 3 * 8192 + 11),
        (3, 129),
    ] {
        for act in [Act::Gelu, Act::None] {
            for in_place in [f, t] {
                v.push(Box::new(LayerNormJoint {
                    batch,
                    n,
                    act,
                    in_place,
                }));
            }
        }
    }
    heavy.push(Box::new(LayerNormJoint {
        batch: 2,
        n: 192 * 16 * 32 * 32,
        act: Act::Gelu,
        in_place: t,
    }));

    // --- conv_transpose3d_k2s2 in both input layouts: odd sizes (element-wise loads), several
    // K tiles, 16-byte loads, unaligned views, no input channels (act(bias)), the model's
    // channels on small grids.
    for c in [
        conv(2, 7, 5, [3, 2, 5], Act::Gelu, 0),
        conv(1, 33, 3, [2, 9, 7], Act::Relu, 0),
        conv(1, 24, 12, [4, 4, 4], Act::None, 0),
        conv(2, 16, 4, [2, 4, 8], Act::Gelu, 0),
        conv(2, 16, 4, [2, 4, 8], Act::QuickGelu, 1),
        conv(1, 1, 1, [1, 1, 1], Act::None, 0),
        conv(1, 0, 3, [2, 2, 2], Act::Gelu, 0),
        conv(1, 64, 40, [3, 5, 8], Act::Relu, 3),
        conv(1, 192, 96, [4, 8, 8], Act::Gelu, 0),
        conv(1, 768, 192, [1, 4, 16], Act::None, 0),
    ] {
        for channels_last in [t, f] {
            v.push(Box::new(ConvT { channels_last, ..c }));
        }
    }
    heavy.push(Box::new(conv(1, 768, 192, [8, 16, 16], Act::None, 0)));
    heavy.push(Box::new(ConvT {
        channels_last: f,
        ..conv(1, 192, 96, [16, 32, 32], Act::Gelu, 0)
    }));

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
                v.push(Box::new(Interp {
                    planes,
                    src,
                    dst,
                    mode,
                    x,
                    out,
                }));
            }
        }
    }
    heavy.push(Box::new(Interp {
        planes: 1,
        src: [32, 64, 64],
        dst: [32, 256, 256],
        mode: InterpMode::Trilinear,
        x: St::S,
        out: St::F32,
    }));

    // --- patch_gather3d: 4 values per thread, scalar, odd, one voxel.
    for x in [St::F32, St::S] {
        for (batch, dims, patch) in [
            (2, [8, 12, 16], [2, 3, 4]),
            (1, [4, 6, 6], [2, 3, 2]),
            (3, [3, 5, 7], [1, 5, 7]),
            (1, [1, 1, 1], [1, 1, 1]),
        ] {
            v.push(Box::new(PatchGather {
                batch,
                dims,
                patch,
                x,
            }));
        }
    }
    heavy.push(Box::new(PatchGather {
        batch: 1,
        dims: [32, 256, 256],
        patch: [4, 16, 16],
        x: St::F32,
    }));

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
                v.push(Box::new(Add {
                    n,
                    period,
                    alias,
                    offset,
                }));
            }
        }
    }
    let (n, period, alias, offset) = (136, 136, Alias::All, 0);
    v.push(Box::new(Add {
        n,
        period,
        alias,
        offset,
    }));
    let (n, period, alias) = (2048 * 768, 2048 * 768, Alias::OutA);
    heavy.push(Box::new(Add {
        n,
        period,
        alias,
        offset,
    }));

    // --- activation.
    for act in ACTS {
        for n in [1, 7, 33, 129, 4104] {
            for in_place in [f, t] {
                v.push(Box::new(Activation { n, act, in_place }));
            }
        }
    }
    let (n, act, in_place) = (2048 * 3072, Act::Gelu, t);
    heavy.push(Box::new(Activation { n, act, in_place }));

    // --- embed_gather.
    for (vocab, rows, cols) in [(1, 1, 1), (50, 7, 33), (300, 77, 64), (11, 3, 512)] {
        v.push(Box::new(Embed { vocab, rows, cols }));
    }

    // --- volume ops (f32; run once per device spec). Statistics: every summation and
    // selection path, and the error cases.
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
        for misalign in [f, t] {
            v.push(Box::new(ForegroundStats {
                dims,
                vol,
                misalign,
            }));
        }
    }
    for n in [1, 7, 33, 129, 30 * 96 * 121 + 3] {
        for (misalign, in_place) in [(f, f), (t, f), (f, t), (t, t)] {
            v.push(Box::new(vol_ew(
                Elementwise::ClipZscore,
                n,
                misalign,
                in_place,
            )));
            v.push(Box::new(vol_ew(
                Elementwise::ShiftScale,
                n,
                misalign,
                in_place,
            )));
        }
    }
    for n in [1, 7, 33, 129, 100_003] {
        for misalign in [f, t] {
            for threshold in [f, t] {
                v.push(Box::new(FillOrThreshold {
                    threshold,
                    n,
                    misalign,
                }));
            }
            v.push(Box::new(vol_ew(Elementwise::DivideCounts, n, misalign, f)));
        }
        v.push(Box::new(vol_ew(Elementwise::DivideCounts, n, f, t)));
    }
    // bbox_above: sub-boxes (whole, interior, thin, one voxel, empty) at densities 0 (no box)
    // to 50%, then random boxes (a fixed seed, so that the names stay stable).
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
            let misalign = (i + density as usize) % 2 == 1;
            v.push(Box::new(BboxAbove {
                misalign,
                ..bbox(dims, start, extent, density)
            }));
        }
    }
    let mut r = Rng(0x0B0C_5EED);
    for dims in [[7usize, 33, 129], [30, 96, 121], [13, 29, 37], [1, 1, 5]] {
        for density in [0, 1, 20, 500] {
            let start = dims.map(|d| r.below(d as u64 / 3 + 1) as usize);
            let extent = [0, 1, 2].map(|a| r.below((dims[a] - start[a]) as u64 + 1) as usize);
            let misalign = r.below(2) == 1;
            v.push(Box::new(BboxAbove {
                misalign,
                ..bbox(dims, start, extent, density)
            }));
        }
    }
    v.push(Box::new(bbox([64, 256, 256], [0; 3], [64, 256, 256], 1)));
    // copy_box from a 7x33x129 source into 9x40x131: negative, inside and overrunning source
    // starts (zero padding), f32 / f16 / bf16 destinations; random boxes; a padded window.
    let dsts = [St::F32, St::Is(DType::F16), St::Is(DType::BF16)];
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
        for dst in dsts {
            let misalign = i % 2 == 1;
            v.push(Box::new(CopyBox {
                misalign,
                ..copy_box(src_start, dst_start, extent, dst)
            }));
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
        for dst in dsts {
            let misalign = i % 2 == 1;
            v.push(Box::new(CopyBox {
                misalign,
                ..copy_box(src_start, dst_start, extent, dst)
            }));
        }
    }
    for dst in [St::F32, St::Is(DType::BF16)] {
        v.push(Box::new(CopyBox {
            src_dims: [64, 300, 280],
            dst_dims: [32, 256, 256],
            ..copy_box([40, -20, 100], [0; 3], [32, 256, 256], dst)
        }));
    }
    for (dims, window, start) in [
        ([11, 19, 23], [5, 7, 9], [0, 0, 0]),
        ([11, 19, 23], [5, 7, 9], [6, 12, 14]),
        ([11, 19, 23], [11, 19, 23], [0, 0, 0]),
        ([30, 96, 121], [7, 33, 64], [20, 50, 3]),
    ] {
        v.push(Box::new(Accumulate {
            dims,
            window,
            start,
        }));
    }
    heavy.push(Box::new(Accumulate {
        dims: [64, 300, 280],
        window: [32, 256, 256],
        start: [16, 22, 12],
    }));

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
                .explicit()
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
