//! The `emu` device: the `.cu` kernels of `kernels/`, compiled for the host by build.rs against the
//! CUDA emulation header (`kernels/emu/cuda_emu.h`) and run by the fiber runtime
//! (`kernels/emu/emu_runtime.cpp`), launched by name like `cuLaunchKernel` (docs: emulator.md).
//! GEMMs run on the host (DESIGN.md, "GEMMs on the host"): gathered to f32, multiplied with the
//! `gemm` crate, epilogue applied, stored rounded to the storage dtype.
//!
//! Memory is host memory: an [`Addr`] is a host address, 256-byte aligned like `cudaMalloc`.

use super::kernel::{DeviceGraph, Dim3, KernelArgs, KernelDevice};
use super::{Addr, Buffer, GemmArgs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// The order in which the emulator runs a block's threads between barriers (and the blocks of a
/// grid). A race-free kernel gives bit-identical results under every schedule; a missing barrier
/// shows up as a difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Schedule {
    Forward,
    Reverse,
    /// Seeded pseudo-random order, reshuffled every pass.
    Random,
}

impl Schedule {
    /// Parses `forward`, `reverse`, `random`.
    pub fn parse(s: &str) -> Option<Schedule> {
        match s {
            "forward" => Some(Schedule::Forward),
            "reverse" => Some(Schedule::Reverse),
            "random" => Some(Schedule::Random),
            _ => None,
        }
    }
}

/// Emulator options of an [`EmuDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuOptions {
    pub schedule: Schedule,
    /// Seed of the random schedule.
    pub seed: u64,
    /// OS threads that run blocks in parallel (1: the launching thread alone).
    pub workers: u32,
    /// Fill dynamic shared memory at every block start, and fresh allocations, with 0xff bytes
    /// (NaN in every float type), so that reads of unwritten memory show.
    pub poison: bool,
}

impl Default for EmuOptions {
    fn default() -> Self {
        EmuOptions {
            schedule: Schedule::Forward,
            seed: 0,
            workers: 1,
            poison: true,
        }
    }
}

impl EmuOptions {
    /// The defaults, overridden by env `EMU_SCHEDULE` (forward|reverse|random), `EMU_SEED`
    /// (integer), `EMU_WORKERS` (>= 1) and `EMU_POISON` (0|1).
    pub fn from_env() -> Result<Self> {
        let mut o = EmuOptions::default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(s) = var("EMU_SCHEDULE") {
            o.schedule = Schedule::parse(&s).ok_or_else(|| {
                Error::Usage(format!(
                    "EMU_SCHEDULE={s:?}: expected forward, reverse or random"
                ))
            })?;
        }
        if let Some(s) = var("EMU_SEED") {
            o.seed = s
                .parse()
                .map_err(|_| Error::Usage(format!("EMU_SEED={s:?}: expected an integer")))?;
        }
        if let Some(s) = var("EMU_WORKERS") {
            o.workers = s.parse().ok().filter(|&w| w >= 1).ok_or_else(|| {
                Error::Usage(format!("EMU_WORKERS={s:?}: expected an integer >= 1"))
            })?;
        }
        if let Some(s) = var("EMU_POISON") {
            o.poison = match s.as_str() {
                "0" => false,
                "1" => true,
                _ => return Err(Error::Usage(format!("EMU_POISON={s:?}: expected 0 or 1"))),
            };
        }
        Ok(o)
    }
}

/// `EmuOptions` of kernels/emu/emu_runtime.cpp.
#[repr(C)]
struct EmuOptionsFfi {
    schedule: i32,
    poison: i32,
    workers: u32,
    reserved: u32,
    seed: u64,
}

extern "C" {
    fn emu_launch_ex(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: u32,
        params: *mut *mut c_void,
        nparams: u32,
        opts: *const EmuOptionsFfi,
    ) -> c_int;
    fn emu_last_error() -> *const c_char;
    fn emu_kernel_count() -> u32;
    fn emu_kernel_name(i: u32) -> *const c_char;
}

/// Whether the emulator records graphs ([`KernelDevice::begin_capture`]), like a CUDA stream
/// capture: launches and GEMMs are recorded instead of run, and replayed by the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmuGraphs {
    /// No graphs (the default): callers run ops eagerly.
    Off,
    /// Graphs are recorded and replayed.
    On,
    /// Captures record, then fail at the end like an invalidated CUDA capture
    /// (`cuStreamEndCapture` returning an error), to exercise the callers' fallback.
    FailCapture,
}

impl EmuGraphs {
    /// `EMU_GRAPHS`: `0` (default), `1`, `fail`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("EMU_GRAPHS").ok().as_deref() {
            None | Some("") | Some("0") => Ok(EmuGraphs::Off),
            Some("1") => Ok(EmuGraphs::On),
            Some("fail") => Ok(EmuGraphs::FailCapture),
            Some(v) => Err(Error::Usage(format!(
                "EMU_GRAPHS={:?}: expected 0, 1 or fail",
                v.chars().take(40).collect::<String>()
            ))),
        }
    }
}

/// One recorded launch or GEMM, with the allocation each address pointed into when recorded.
#[derive(Debug)]
enum Recorded {
    Launch {
        kernel: String,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        slots: Vec<u64>,
        ptr_slots: Vec<usize>,
        allocs: Vec<Option<u64>>,
    },
    Gemm {
        args: GemmArgs,
        dtype: DType,
        allocs: Vec<Option<u64>>,
    },
}

/// Graph state shared by the clones of one [`EmuDevice`] (one "stream").
#[derive(Debug)]
struct GraphState {
    mode: EmuGraphs,
    recording: parking_lot::Mutex<Option<Vec<Recorded>>>,
    captures: AtomicU32,
    replays: AtomicU32,
}

/// The host emulator as a [`KernelDevice`].
#[derive(Clone, Debug)]
pub struct EmuDevice {
    opts: EmuOptions,
    graphs: Arc<GraphState>,
}

// ------------------------------------------------------------------------------------------------
// Live allocations
// ------------------------------------------------------------------------------------------------

/// Every live emulator allocation: start -> (end, id). Ids are never reused, so a graph that
/// recorded an address can tell at replay whether the allocation it pointed into still exists
/// (the host allocator may hand the same address to a later allocation).
static LIVE: parking_lot::Mutex<BTreeMap<Addr, (Addr, u64)>> =
    parking_lot::Mutex::new(BTreeMap::new());
static NEXT_ALLOC_ID: AtomicU64 = AtomicU64::new(1);

/// The id of the live allocation `addr` points into (or one past its end: empty views).
fn allocation_of(addr: Addr) -> Option<u64> {
    let live = LIVE.lock();
    let (_, &(end, id)) = live.range(..=addr).next_back()?;
    (addr <= end).then_some(id)
}

/// The allocations the addresses point into, in order (`None` for 0 or host memory that is not
/// an emulator allocation).
fn allocations_of(addrs: &[Addr]) -> Vec<Option<u64>> {
    addrs
        .iter()
        .map(|&a| if a == 0 { None } else { allocation_of(a) })
        .collect()
}

/// Checks that each address recorded inside an allocation still lies inside a live one. A
/// binding may legitimately be a new allocation at the same address (callers key graphs on
/// addresses), so only memory that is no longer allocated at all is refused.
fn check_live(what: &str, addrs: &[Addr], allocs: &[Option<u64>]) -> Result<()> {
    for (i, (&a, id)) in addrs.iter().zip(allocs).enumerate() {
        if id.is_some() && allocation_of(a).is_none() {
            return Err(dev_err(format!(
                "graph replay: {what} address {i} ({a:#x}) points into memory freed after \
                 the capture"
            )));
        }
    }
    Ok(())
}

/// The addresses a GEMM reads or writes.
fn gemm_addrs(g: &GemmArgs) -> Vec<Addr> {
    vec![
        g.a,
        g.b,
        g.c,
        g.bias.unwrap_or(0),
        g.residual.map_or(0, |r| r.addr),
    ]
}

impl EmuDevice {
    /// An emulator with options from the environment ([`EmuOptions::from_env`],
    /// [`EmuGraphs::from_env`]).
    pub fn new() -> Result<Self> {
        Ok(Self::with_options(EmuOptions::from_env()?).with_graphs(EmuGraphs::from_env()?))
    }

    /// An emulator with explicit options, without graphs.
    pub fn with_options(opts: EmuOptions) -> Self {
        EmuDevice {
            opts: EmuOptions {
                workers: opts.workers.max(1),
                ..opts
            },
            graphs: Arc::new(GraphState {
                mode: EmuGraphs::Off,
                recording: parking_lot::Mutex::new(None),
                captures: AtomicU32::new(0),
                replays: AtomicU32::new(0),
            }),
        }
    }

    /// The same emulator with graphs in `mode` (a new, unshared graph state).
    pub fn with_graphs(self, mode: EmuGraphs) -> Self {
        EmuDevice {
            graphs: Arc::new(GraphState {
                mode,
                recording: parking_lot::Mutex::new(None),
                captures: AtomicU32::new(0),
                replays: AtomicU32::new(0),
            }),
            ..self
        }
    }

    /// The id of the live emulator allocation `addr` points into. Ids are never reused, so a
    /// changed id means the memory was freed (and maybe handed out again) in between.
    pub fn allocation_id(addr: Addr) -> Option<u64> {
        allocation_of(addr)
    }

    /// How many captures have begun on this device (and its clones).
    pub fn captures_begun(&self) -> u32 {
        self.graphs.captures.load(Ordering::Relaxed)
    }

    /// How many graph replays have begun on this device (and its clones).
    pub fn replays_begun(&self) -> u32 {
        self.graphs.replays.load(Ordering::Relaxed)
    }

    fn capturing(&self) -> bool {
        self.graphs.recording.lock().is_some()
    }

    /// Refuses what a CUDA stream capture refuses (allocation, copies, synchronisation).
    fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.capturing() {
            return Err(dev_err(format!(
                "{what} is not allowed while a graph is being captured"
            )));
        }
        Ok(())
    }

    /// Runs one launch now.
    unsafe fn launch_now(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut KernelArgs,
    ) -> Result<()> {
        let name = CString::new(kernel)
            .map_err(|_| dev_err(format!("kernel name {kernel:?} contains a NUL byte")))?;
        let mut params = args.as_params();
        let opts = self.ffi_options();
        let rc = emu_launch_ex(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            shared_bytes,
            params.as_mut_ptr(),
            params.len() as u32,
            &opts,
        );
        if rc != 0 {
            // The message is thread-local in the runtime and this thread made the launch.
            let msg = CStr::from_ptr(emu_last_error())
                .to_string_lossy()
                .into_owned();
            return Err(dev_err(msg));
        }
        Ok(())
    }

    /// The options launches use.
    pub fn options(&self) -> EmuOptions {
        self.opts
    }

    /// Names of every kernel registered with `EMU_KERNEL`, sorted.
    pub fn registered_kernels() -> Vec<String> {
        // SAFETY: the registry is filled during static initialisation and only read here; the
        // returned strings live as long as the process.
        unsafe {
            (0..emu_kernel_count())
                .filter_map(|i| {
                    let p = emu_kernel_name(i);
                    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
                })
                .collect()
        }
    }

    fn ffi_options(&self) -> EmuOptionsFfi {
        EmuOptionsFfi {
            schedule: match self.opts.schedule {
                Schedule::Forward => 0,
                Schedule::Reverse => 1,
                Schedule::Random => 2,
            },
            poison: self.opts.poison as i32,
            workers: self.opts.workers,
            reserved: 0,
            seed: self.opts.seed,
        }
    }
}

/// A 256-byte-aligned host allocation (the owner inside a [`Buffer`]).
struct HostAlloc {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is plain memory owned by this value; access goes through raw addresses
// whose synchronisation is the caller's (as for device memory).
unsafe impl Send for HostAlloc {}
unsafe impl Sync for HostAlloc {}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        LIVE.lock().remove(&(self.ptr.as_ptr() as Addr));
        // SAFETY: allocated in `EmuDevice::alloc` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn dev_err(msg: impl Into<String>) -> Error {
    Error::device("emu", msg)
}

impl KernelDevice for EmuDevice {
    fn name(&self) -> String {
        "emu".into()
    }

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        self.refuse_in_capture("allocating")?;
        let layout = Layout::from_size_align(bytes.max(1), 256)
            .map_err(|e| Error::OutOfMemory(format!("emu: cannot allocate {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe {
            if self.opts.poison {
                let p = std::alloc::alloc(layout);
                if !p.is_null() {
                    std::ptr::write_bytes(p, 0xff, layout.size());
                }
                p
            } else {
                std::alloc::alloc_zeroed(layout)
            }
        };
        let ptr = NonNull::new(p)
            .ok_or_else(|| Error::OutOfMemory(format!("emu: cannot allocate {bytes} bytes")))?;
        let start = ptr.as_ptr() as Addr;
        let id = NEXT_ALLOC_ID.fetch_add(1, Ordering::Relaxed);
        LIVE.lock().insert(start, (start + bytes as Addr, id));
        Ok(Buffer::new(
            ptr.as_ptr() as Addr,
            bytes,
            Box::new(HostAlloc { ptr, layout }),
        ))
    }

    unsafe fn upload(&self, dst: Addr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.refuse_in_capture("an upload")?;
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        Ok(())
    }

    unsafe fn download(&self, src: Addr, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.refuse_in_capture("a download")?;
        std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        // Launches are synchronous.
        self.refuse_in_capture("synchronising")
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut KernelArgs,
    ) -> Result<()> {
        crate::backend::kernel::embedded::check_args(kernel, args)?;
        let mut rec = self.graphs.recording.lock();
        if let Some(ops) = rec.as_mut() {
            let addrs: Vec<Addr> = args.ptr_slots().iter().map(|&i| args.slots()[i]).collect();
            ops.push(Recorded::Launch {
                kernel: kernel.to_string(),
                grid,
                block,
                shared_bytes,
                slots: args.slots().to_vec(),
                ptr_slots: args.ptr_slots().to_vec(),
                allocs: allocations_of(&addrs),
            });
            return Ok(());
        }
        drop(rec);
        self.launch_now(kernel, grid, block, shared_bytes, args)
    }

    unsafe fn gemm(&self, args: &GemmArgs, dtype: DType) -> Result<()> {
        let mut rec = self.graphs.recording.lock();
        if let Some(ops) = rec.as_mut() {
            ops.push(Recorded::Gemm {
                args: *args,
                dtype,
                allocs: allocations_of(&gemm_addrs(args)),
            });
            return Ok(());
        }
        drop(rec);
        host_gemm(args, dtype)
    }

    fn supports_graphs(&self) -> bool {
        self.graphs.mode != EmuGraphs::Off
    }

    fn begin_capture(&self) -> Result<()> {
        if self.graphs.mode == EmuGraphs::Off {
            return Err(dev_err("graph capture is not supported (EMU_GRAPHS=0)"));
        }
        let mut rec = self.graphs.recording.lock();
        if rec.is_some() {
            return Err(dev_err("a graph capture is already in progress"));
        }
        self.graphs.captures.fetch_add(1, Ordering::Relaxed);
        *rec = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        let ops = self
            .graphs
            .recording
            .lock()
            .take()
            .ok_or_else(|| dev_err("end_capture without begin_capture"))?;
        if self.graphs.mode == EmuGraphs::FailCapture {
            return Err(dev_err(
                "cuStreamEndCapture: the capture was invalidated (EMU_GRAPHS=fail)",
            ));
        }
        Ok(Box::new(EmuGraph {
            dev: self.clone(),
            ops,
        }))
    }
}

/// A recorded emulator graph: its launches and GEMMs, replayed in order. Before each, the
/// addresses are checked against the allocations they pointed into at capture, so a replay into
/// freed memory is an error rather than silent corruption (what compute-sanitizer reports on a
/// GPU).
pub struct EmuGraph {
    dev: EmuDevice,
    ops: Vec<Recorded>,
}

impl DeviceGraph for EmuGraph {
    unsafe fn launch(&self) -> Result<()> {
        if self.dev.capturing() {
            return Err(dev_err(
                "launching a graph while another is being captured is not supported",
            ));
        }
        self.dev.graphs.replays.fetch_add(1, Ordering::Relaxed);
        for op in &self.ops {
            match op {
                Recorded::Launch {
                    kernel,
                    grid,
                    block,
                    shared_bytes,
                    slots,
                    ptr_slots,
                    allocs,
                } => {
                    let addrs: Vec<Addr> = ptr_slots.iter().map(|&i| slots[i]).collect();
                    check_live(kernel, &addrs, allocs)?;
                    let mut args = KernelArgs::from_slots(slots.clone(), ptr_slots.clone());
                    self.dev
                        .launch_now(kernel, *grid, *block, *shared_bytes, &mut args)?;
                }
                Recorded::Gemm {
                    args,
                    dtype,
                    allocs,
                } => {
                    check_live("gemm", &gemm_addrs(args), allocs)?;
                    host_gemm(args, *dtype)?;
                }
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// GEMM on the host
// ------------------------------------------------------------------------------------------------

#[inline]
unsafe fn load(addr: Addr, idx: usize, dt: DType) -> f32 {
    match dt {
        DType::F32 => *(addr as *const f32).add(idx),
        DType::F16 => f16::from_bits(*(addr as *const u16).add(idx)).to_f32(),
        _ => bf16::from_bits(*(addr as *const u16).add(idx)).to_f32(),
    }
}

#[inline]
unsafe fn store(addr: Addr, idx: usize, dt: DType, v: f32) {
    match dt {
        DType::F32 => *(addr as *mut f32).add(idx) = v,
        DType::F16 => *(addr as *mut u16).add(idx) = f16::from_f32(v).to_bits(),
        _ => *(addr as *mut u16).add(idx) = bf16::from_f32(v).to_bits(),
    }
}

/// Rows of at least this many elements are worth a rayon task.
const PAR_MIN: usize = 1 << 14;

/// `C[b] = act(alpha * A[b] @ op(B[b]) + bias) + residual[b]` with every operand in `dtype`,
/// f32 accumulation, C rounded to `dtype` (RNE): the semantics of [`GemmArgs`]. f32 operands go
/// to the `gemm` crate in place (any strides); f16/bf16 operands are first gathered to f32.
///
/// # Safety
/// As for [`super::Backend::gemm`]: every element the arguments describe must lie in live host
/// memory of the right dtype, and `c` may overlap only `residual`, exactly.
pub unsafe fn host_gemm(g: &GemmArgs, dtype: DType) -> Result<()> {
    if !dtype.is_float() {
        return Err(dev_err(format!(
            "gemm: dtype {dtype} is not a float storage type"
        )));
    }
    let (m, n, k) = (g.m, g.n, g.k);
    if g.batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let mut acc = vec![0f32; m * n];
    let mut a32 = Vec::new();
    let mut b32 = Vec::new();
    let mut b_loaded: Option<usize> = None;
    for bi in 0..g.batch {
        let a_off = bi * g.batch_stride_a;
        let b_off = bi * g.batch_stride_b;
        // (pointer, column stride, row stride) of A (m x k) and B (k x n) as f32.
        let (lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs);
        if dtype == DType::F32 {
            lhs = (g.a as *const f32).add(a_off);
            (lhs_cs, lhs_rs) = (1isize, g.lda as isize);
            rhs = (g.b as *const f32).add(b_off);
            (rhs_cs, rhs_rs) = if g.b_trans {
                (g.ldb as isize, 1isize)
            } else {
                (1isize, g.ldb as isize)
            };
        } else {
            gather(&mut a32, g.a, a_off, m, k, g.lda, false, dtype);
            // B broadcast over the batch (stride 0) is gathered once.
            if b_loaded != Some(b_off) {
                gather(&mut b32, g.b, b_off, k, n, g.ldb, g.b_trans, dtype);
                b_loaded = Some(b_off);
            }
            lhs = a32.as_ptr();
            (lhs_cs, lhs_rs) = (1, k as isize);
            rhs = b32.as_ptr();
            (rhs_cs, rhs_rs) = (1, n as isize);
        }
        if k == 0 {
            acc.fill(0.0);
        } else {
            gemm::gemm(
                m,
                n,
                k,
                acc.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs,
                lhs_cs,
                lhs_rs,
                rhs,
                rhs_cs,
                rhs_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        epilogue(g, dtype, bi, &acc);
    }
    Ok(())
}

/// Gathers the `rows x cols` matrix `M[r][c]` (at `base + off + r*ld + c`, or `+ c*ld + r` when
/// `trans`) of `dt` into contiguous row-major f32.
#[allow(clippy::too_many_arguments)]
unsafe fn gather(
    dst: &mut Vec<f32>,
    base: Addr,
    off: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    trans: bool,
    dt: DType,
) {
    dst.resize(rows * cols, 0.0);
    let fill = |(r, row): (usize, &mut [f32])| {
        for (c, v) in row.iter_mut().enumerate() {
            let idx = if trans { c * ld + r } else { r * ld + c };
            // SAFETY: the caller guarantees the matrix lies in live memory.
            *v = unsafe { load(base, off + idx, dt) };
        }
    };
    if rows * cols >= PAR_MIN && cols > 0 {
        dst.par_chunks_mut(cols).enumerate().for_each(fill);
    } else if cols > 0 {
        dst.chunks_mut(cols).enumerate().for_each(fill);
    }
}

/// `C = act(alpha * acc + bias) + residual`, rounded to `dt`. The residual is read before C is
/// written, element by element, so it may alias C exactly.
unsafe fn epilogue(g: &GemmArgs, dt: DType, bi: usize, acc: &[f32]) {
    let n = g.n;
    let row = |(i, accr): (usize, &[f32])| {
        for (j, &v) in accr.iter().enumerate() {
            // SAFETY: the caller guarantees bias, residual and C lie in live memory.
            unsafe {
                let mut x = g.alpha * v;
                if let Some(bias) = g.bias {
                    x += load(bias, j, dt);
                }
                x = g.act.apply(x);
                if let Some(r) = g.residual {
                    x += load(r.addr, bi * r.batch_stride + i * r.ld + j, dt);
                }
                store(g.c, bi * g.batch_stride_c + i * g.ldc + j, dt, x);
            }
        }
    };
    if acc.len() >= PAR_MIN {
        acc.par_chunks(n).enumerate().for_each(row);
    } else {
        acc.chunks(n).enumerate().for_each(row);
    }
}
