//! The CUDA device (DESIGN.md, "Layers": `backend/cuda`): a thin runtime under the kernels of
//! `kernels/`, through cudarc's driver API with the libraries loaded at run time
//! (`dynamic-loading`), so the binary starts, and fails with a typed error, on machines without
//! a GPU.
//!
//! What it does, per call, is only what the op needs: a context bind (a no-op on the thread
//! that already has it), a hash lookup of the kernel by name and `cuLaunchKernel` on one
//! compute stream; GEMMs through cuBLASLt with cached descriptors and algorithms and a
//! workspace allocated once ([`gemm`]). Around that: CUDA graph capture and replay, a second
//! stream with a pinned staging buffer for uploads that overlap compute, NVTX ranges and the
//! device's memory and identity for planning and benchmarks.
//!
//! Kernels come from the modules `build.rs` embeds ([`embedded::MODULES`]): the `sm_90a` cubin
//! on compute capability 9.0 (H100/H200: no JIT), the `sm_80` PTX (JIT by the driver)
//! elsewhere.
//!
//! Not allowed while a graph is being captured (each is refused with an error, except frees,
//! which cannot report one): allocating, plain uploads and downloads, overlapped uploads,
//! synchronising, and dropping buffers.

mod gemm;

use super::kernel::embedded::{self, KernelModule};
use super::kernel::{DeviceGraph, Dim3, KernelArgs, KernelDevice};
use super::{Addr, Buffer, GemmArgs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::result::{self as drv, DriverError};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Whether the CUDA driver library (`libcuda.so`) can be loaded. Everything else in this
/// module requires it; cudarc panics if asked without it, so this is checked first.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { sys::is_culib_present() }
}

/// Identity and memory of a device: what `segvol plan --device cuda` uses for its default
/// memory budget (free memory minus a margin) and what `segvol bench` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    /// `NVIDIA H200`.
    pub name: String,
    /// `(9, 0)` on Hopper.
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// Bytes of device memory.
    pub total_bytes: usize,
    /// Bytes free now (`cuMemGetInfo`).
    pub free_bytes: usize,
    /// `cuDriverGetVersion`: `1000 * major + 10 * minor` (13000 for CUDA 13.0).
    pub driver_version: i32,
    /// `cublasLtGetVersion`.
    pub cublaslt_version: usize,
    /// Where the kernels came from: `cubin sm_90a` or `ptx sm_80 (JIT)`.
    pub kernel_image: &'static str,
}

/// One device allocation (`cuMemAlloc`, 256-byte aligned), freed on drop. Buffers own these
/// rather than cudarc's `CudaSlice`: that one allocates stream-ordered (`cuMemAllocAsync`) on
/// one stream, which the copy stream and graph capture would have to order against.
pub(crate) struct DeviceAlloc {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // A failure here (a dead context) cannot be reported; the memory goes with it.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `cuMemAlloc` in this context, freed once.
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory (`cuMemHostAlloc`, write-combined: the host only writes it).
struct PinnedHost {
    ptr: *mut u8,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain memory, accessed only under `Inner::staging`'s lock.
unsafe impl Send for PinnedHost {}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: from `cuMemHostAlloc`, freed once, after the copy stream finished
            // (`Inner::drop` synchronises it first).
            let _ = unsafe { drv::free_host(self.ptr.cast()) };
        }
    }
}

/// Bytes of each of the two halves of the pinned staging buffer.
const STAGING_HALF: usize = 32 << 20;

/// The staging buffer of [`CudaDevice::upload_overlapped`]: two halves used in turn, each with
/// the event of the last copy out of it.
struct Staging {
    host: Option<PinnedHost>,
    done: [CudaEvent; 2],
    next: usize,
}

/// A loaded module, unloaded on drop.
struct Module(sys::CUmodule);

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded once by `load_module`; `Inner::drop` made the context current.
        let _ = unsafe { drv::module::unload(self.0) };
    }
}

/// A kernel: its handle and the dynamic shared memory it may use, opted in once at load
/// (`cuFuncSetAttribute` per launch would race between threads launching the same kernel).
struct Function {
    f: sys::CUfunction,
    max_dynamic_smem: u32,
    /// Its parameters from the PTX ([`embedded::check_args`]).
    params: &'static str,
}

/// Opts `f` in to all the dynamic shared memory the device allows a block (`optin` bytes per
/// block, less the kernel's static shared memory) and returns that amount.
///
/// # Safety
/// `f` must be a loaded function; its context current.
unsafe fn opt_in_shared_memory(
    f: sys::CUfunction,
    optin: i32,
) -> std::result::Result<u32, DriverError> {
    let mut static_bytes = 0i32;
    sys::cuFuncGetAttribute(
        &mut static_bytes,
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        f,
    )
    .result()?;
    let max = (optin - static_bytes).max(0);
    sys::cuFuncSetAttribute(
        f,
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        max,
    )
    .result()?;
    Ok(max as u32)
}

/// The scratch buffers of GEMM path 3 ([`gemm`]): grow-only, and old ones are kept, since a
/// captured graph may still address them.
#[derive(Default)]
struct Scratch {
    current: Option<DeviceAlloc>,
    retired: Vec<DeviceAlloc>,
}

struct Inner {
    label: String,
    ordinal: usize,
    lt: gemm::Lt,
    functions: HashMap<&'static str, Function>,
    _modules: Vec<Module>,
    scratch: parking_lot::Mutex<Scratch>,
    staging: parking_lot::Mutex<Staging>,
    /// Recorded on the copy stream after each overlapped upload.
    upload_done: CudaEvent,
    capturing: AtomicBool,
    /// `SEGVOL_CUDA_SYNC=1`: synchronise after every launch and GEMM, so that a faulting
    /// kernel is named (debugging; off by default).
    sync_each: bool,
    name: String,
    cc: (i32, i32),
    multiprocessors: i32,
    driver_version: i32,
    kernel_image: &'static str,
    /// `CU_FUNC_ATTRIBUTE_BINARY_VERSION` of the first kernel (`90` for sm_90 SASS).
    binary_version: i32,
    copy_stream: Arc<CudaStream>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the raw handles (`CUfunction`, `CUmodule`) are immutable after construction and valid
// on every thread once the context is bound, which every entry point does first.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // Work still queued may use the workspace, scratch or staging freed below.
        if self.ctx.bind_to_thread().is_ok() {
            let _ = self.copy_stream.synchronize();
            let _ = self.stream.synchronize();
        }
    }
}

/// A CUDA device: context, compute and copy streams, the embedded kernels and cuBLASLt.
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}: {}, sm_{}{})",
            self.inner.label, self.inner.name, self.inner.cc.0, self.inner.cc.1
        )
    }
}

/// `CUDA_ERROR_X (description)`.
fn describe(e: DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// Whether an `sm_<arch>` cubin runs on a device of compute capability `cc`: only the exact
/// architecture (`90a` on 9.0) is used; anything else goes through PTX.
fn cubin_matches(arch: &str, cc: (i32, i32)) -> bool {
    let digits = arch.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    digits.parse::<i32>().ok() == Some(cc.0 * 10 + cc.1)
}

/// Loads a module image (cubin or NUL-terminated PTX), keeping the JIT error log.
///
/// # Safety
/// `image` must point to a complete cubin or NUL-terminated PTX; a context must be current.
unsafe fn load_image(image: *const c_void) -> std::result::Result<sys::CUmodule, String> {
    let mut log = vec![0u8; 1 << 14];
    let mut opts = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    // Option values are passed in pointer-sized slots; the size is a value, not a pointer.
    let mut vals = [log.as_mut_ptr().cast::<c_void>(), log.len() as *mut c_void];
    let mut module = std::ptr::null_mut();
    let r = sys::cuModuleLoadDataEx(
        &mut module,
        image,
        opts.len() as u32,
        opts.as_mut_ptr(),
        vals.as_mut_ptr(),
    );
    match r.result() {
        Ok(()) => Ok(module),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            Err(if text.trim().is_empty() {
                describe(e)
            } else {
                format!("{}: {}", describe(e), text.trim())
            })
        }
    }
}

/// Loads one embedded module: the cubin when it matches the device, else the PTX.
///
/// # Safety
/// A context must be current.
unsafe fn load_module(
    m: &KernelModule,
    use_cubin: bool,
) -> std::result::Result<(Module, &'static str), String> {
    let mut errors = Vec::new();
    if use_cubin && !m.cubin_sm90a.is_empty() {
        // The driver parses the ELF in place: give it 8-byte aligned storage
        // (`include_bytes!` only guarantees 1).
        let mut aligned = vec![0u64; m.cubin_sm90a.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..m.cubin_sm90a.len()]
            .copy_from_slice(m.cubin_sm90a);
        match load_image(aligned.as_ptr().cast()) {
            Ok(h) => return Ok((Module(h), "cubin sm_90a")),
            Err(e) => errors.push(format!("cubin sm_90a: {e}")),
        }
    }
    // On 9.0 the sm_90a PTX is the fallback; elsewhere the portable sm_80 PTX.
    let (ptx, what) = if use_cubin && !m.ptx_sm90a.is_empty() {
        (m.ptx_sm90a, "ptx sm_90a (JIT)")
    } else {
        (m.ptx_sm80, "ptx sm_80 (JIT)")
    };
    if ptx.is_empty() {
        errors.push(format!("{what}: not embedded"));
    } else {
        match CString::new(ptx) {
            Err(_) => errors.push(format!("{what}: contains a NUL byte")),
            Ok(src) => match load_image(src.as_ptr().cast()) {
                Ok(h) => return Ok((Module(h), what)),
                Err(e) => errors.push(format!("{what}: {e}")),
            },
        }
    }
    Err(errors.join("; "))
}

impl CudaDevice {
    /// Opens device `ordinal`: driver, context, two streams, every embedded kernel module and
    /// cuBLASLt. Without a driver, a device, kernels or cuBLASLt this returns
    /// [`Error::DeviceUnavailable`] saying which; it never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        let label = format!("cuda:{ordinal}");
        let unavailable = |msg: String| Error::DeviceUnavailable {
            device: label.clone(),
            msg,
        };
        let failed =
            |what: &str, e: DriverError| Error::device(&label, format!("{what}: {}", describe(e)));
        if !driver_present() {
            return Err(unavailable(
                "CUDA driver not found (libcuda.so could not be loaded)".into(),
            ));
        }
        drv::init().map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => unavailable("no CUDA device found".into()),
            _ => unavailable(format!(
                "the CUDA driver failed to initialise: {}",
                describe(e)
            )),
        })?;
        let count = drv::device::get_count()
            .map_err(|e| unavailable(format!("cannot count CUDA devices: {}", describe(e))))?;
        if count <= 0 {
            return Err(unavailable("no CUDA device found".into()));
        }
        if ordinal >= count as usize {
            return Err(unavailable(format!(
                "device ordinal {ordinal} is out of range ({count} CUDA device(s))"
            )));
        }
        if !embedded::BUILT_WITH_KERNELS {
            return Err(unavailable(
                "this binary was built without CUDA kernels (nvcc not found at build time; \
                 see tools/install-cuda.sh)"
                    .into(),
            ));
        }
        // SAFETY: only tries to dlopen libcublasLt.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(unavailable(
                "cuBLASLt not found (libcublasLt.so.13 could not be loaded; add the CUDA 13 \
                 lib64 directory to LD_LIBRARY_PATH)"
                    .into(),
            ));
        }

        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("cannot create a context: {}", describe(e))))?;
        // We order work between our two streams ourselves (events below); cudarc's per-slice
        // event tracking would only add events to every allocation.
        // SAFETY: no CudaSlice is created by this device.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| failed("cuStreamCreate", e))?;
        let copy_stream = ctx.new_stream().map_err(|e| failed("cuStreamCreate", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| failed("compute capability", e))?;
        let name = ctx.name().map_err(|e| failed("cuDeviceGetName", e))?;
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| failed("multiprocessor count", e))?;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| failed("cuDriverGetVersion", e))?;

        let smem_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| failed("shared memory per block (opt-in)", e))?;
        let use_cubin = cubin_matches(embedded::CUDA_ARCH, cc);
        let mut modules = Vec::new();
        let mut functions = HashMap::new();
        let mut kernel_image = "none";
        for m in embedded::MODULES {
            // SAFETY: the context is current (CudaContext::new binds it).
            let (module, what) = unsafe { load_module(m, use_cubin) }.map_err(|e| {
                Error::device(
                    &label,
                    format!(
                        "cannot load kernel module `{}` on {name} (sm_{}{}): {e}",
                        m.name, cc.0, cc.1
                    ),
                )
            })?;
            kernel_image = what;
            for (n, &k) in m.kernels.iter().enumerate() {
                let cname = CString::new(k)
                    .map_err(|_| Error::Internal(format!("kernel name `{k}` has a NUL byte")))?;
                // SAFETY: the module is loaded.
                let f = unsafe { drv::module::get_function(module.0, cname) }.map_err(|e| {
                    Error::device(
                        &label,
                        format!("module `{}` has no kernel `{k}`: {}", m.name, describe(e)),
                    )
                })?;
                // SAFETY: `f` was just loaded; the context is current.
                let max_dynamic_smem = unsafe { opt_in_shared_memory(f, smem_optin) }
                    .map_err(|e| failed(&format!("{k}: shared memory opt-in"), e))?;
                functions.insert(
                    k,
                    Function {
                        f,
                        max_dynamic_smem,
                        params: m.params.get(n).copied().unwrap_or(""),
                    },
                );
            }
            modules.push(module);
        }

        let mut binary_version = 0;
        if let Some(f) = functions.values().next() {
            // SAFETY: writes one int for a loaded function.
            unsafe {
                sys::cuFuncGetAttribute(
                    &mut binary_version,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_BINARY_VERSION,
                    f.f,
                )
            }
            .result()
            .map_err(|e| failed("kernel binary version", e))?;
        }
        let workspace = raw_alloc(&ctx, gemm::WORKSPACE_BYTES)
            .map_err(|e| failed("cuBLASLt workspace allocation", e))?;
        let lt = gemm::Lt::new(workspace).map_err(|e| Error::device(&label, e))?;
        let event = || ctx.new_event(None).map_err(|e| failed("cuEventCreate", e));
        let staging = Staging {
            host: None,
            done: [event()?, event()?],
            next: 0,
        };
        let upload_done = event()?;
        let sync_each = std::env::var("SEGVOL_CUDA_SYNC").is_ok_and(|v| v == "1");

        Ok(CudaDevice {
            inner: Arc::new(Inner {
                label,
                ordinal,
                lt,
                functions,
                _modules: modules,
                scratch: parking_lot::Mutex::new(Scratch::default()),
                staging: parking_lot::Mutex::new(staging),
                upload_done,
                capturing: AtomicBool::new(false),
                sync_each,
                name,
                cc,
                multiprocessors,
                driver_version,
                kernel_image,
                binary_version,
                copy_stream,
                stream,
                ctx,
            }),
        })
    }

    /// Identity and current memory of the device.
    pub fn device_info(&self) -> Result<DeviceInfo> {
        let i = &self.inner;
        self.bind()?;
        let (free_bytes, total_bytes) =
            drv::mem_get_info().map_err(|e| self.fail("cuMemGetInfo", e))?;
        Ok(DeviceInfo {
            ordinal: i.ordinal,
            name: i.name.clone(),
            compute_capability: i.cc,
            multiprocessors: i.multiprocessors,
            total_bytes,
            free_bytes,
            driver_version: i.driver_version,
            cublaslt_version: gemm::Lt::version(),
            kernel_image: i.kernel_image,
        })
    }

    /// Whether the embedded modules define `kernel`.
    pub fn has_kernel(&self, kernel: &str) -> bool {
        self.inner.functions.contains_key(kernel)
    }

    fn bind(&self) -> Result<()> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| self.fail("cannot make the context current", e))
    }

    fn fail(&self, what: &str, e: DriverError) -> Error {
        Error::device(&self.inner.label, format!("{what}: {}", describe(e)))
    }

    fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.inner.capturing.load(Ordering::Acquire) {
            return Err(Error::device(
                &self.inner.label,
                format!("{what} is not allowed while a CUDA graph is being captured"),
            ));
        }
        Ok(())
    }

    /// After a launch or GEMM with `SEGVOL_CUDA_SYNC=1`: waits and names what failed.
    fn debug_sync(&self, what: &dyn Fn() -> String) -> Result<()> {
        if self.inner.sync_each && !self.inner.capturing.load(Ordering::Acquire) {
            self.inner
                .stream
                .synchronize()
                .map_err(|e| self.fail(&format!("{} failed", what()), e))?;
        }
        Ok(())
    }

    // ----- CUDA graphs -----

    /// Records the launches and GEMMs `f` enqueues on this device into a CUDA graph instead of
    /// running them, and returns the instantiated graph. Run the same work once before
    /// capturing (kernel and cuBLASLt first-use setup must not happen during capture), and
    /// keep every buffer it touches alive while the graph may be launched.
    pub fn capture(&self, f: impl FnOnce(&CudaDevice) -> Result<()>) -> Result<CudaGraph> {
        self.begin_capture_inner()?;
        // Ends the capture even if `f` panics, so the stream stays usable.
        struct Guard<'a>(&'a CudaDevice, bool);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if self.1 {
                    let _ = self.0.end_capture_inner();
                }
            }
        }
        let mut guard = Guard(self, true);
        let body = f(self);
        guard.1 = false;
        let graph = self.end_capture_inner();
        body?;
        graph
    }

    fn begin_capture_inner(&self) -> Result<()> {
        if self.inner.capturing.swap(true, Ordering::AcqRel) {
            return Err(Error::device(
                &self.inner.label,
                "a CUDA graph capture is already in progress",
            ));
        }
        let r = self.bind().and_then(|_| {
            // Thread-local mode: other threads (other devices, tests) may keep allocating.
            // SAFETY: the stream is live.
            unsafe {
                drv::stream::begin_capture(
                    self.inner.stream.cu_stream(),
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            }
            .map_err(|e| self.fail("cuStreamBeginCapture", e))
        });
        if r.is_err() {
            self.inner.capturing.store(false, Ordering::Release);
        }
        r
    }

    fn end_capture_inner(&self) -> Result<CudaGraph> {
        let ended = self.bind().and_then(|_| {
            // SAFETY: the stream is live and capturing.
            unsafe { drv::stream::end_capture(self.inner.stream.cu_stream()) }
                .map_err(|e| self.fail("cuStreamEndCapture (the capture was invalidated)", e))
        });
        self.inner.capturing.store(false, Ordering::Release);
        let graph = ended?;
        if graph.is_null() {
            return Err(Error::device(
                &self.inner.label,
                "the capture produced no graph",
            ));
        }
        // SAFETY: `graph` comes from the capture above.
        let exec = match unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
        {
            Ok(x) => x,
            Err(e) => {
                // SAFETY: ours, destroyed once.
                let _ = unsafe { drv::graph::destroy(graph) };
                return Err(self.fail("cuGraphInstantiate", e));
            }
        };
        let g = CudaGraph {
            graph,
            exec,
            dev: self.inner.clone(),
        };
        // Uploads the graph's resources now, so the first launch is as fast as the others.
        // SAFETY: both live.
        unsafe { drv::graph::upload(exec, self.inner.stream.cu_stream()) }
            .map_err(|e| self.fail("cuGraphUpload", e))?;
        Ok(g)
    }

    // ----- Overlapped uploads -----

    /// Copies `src` to device address `dst` on the copy stream, through the pinned staging
    /// buffer (2 x 32 MiB, allocated on first use), so the transfer overlaps kernels running on
    /// the compute stream. Returns once `src` has been copied into staging. Before compute
    /// uses `dst`, call [`CudaDevice::wait_uploads`]; [`KernelDevice::download`] and
    /// [`KernelDevice::synchronize`] also wait. The caller must not upload into memory that
    /// queued compute still reads (double-buffer window batches).
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must lie in a live buffer of this device.
    pub unsafe fn upload_overlapped(&self, dst: Addr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.refuse_in_capture("an overlapped upload")?;
        self.bind()?;
        let i = &self.inner;
        let mut st = i.staging.lock();
        if st.host.is_none() {
            let bytes = 2 * STAGING_HALF;
            let ptr = drv::malloc_host(bytes, sys::CU_MEMHOSTALLOC_WRITECOMBINED)
                .map_err(|e| self.fail("cuMemHostAlloc (pinned staging buffer)", e))?;
            st.host = Some(PinnedHost {
                ptr: ptr.cast(),
                ctx: i.ctx.clone(),
            });
        }
        let base = st.host.as_ref().map_or(std::ptr::null_mut(), |h| h.ptr);
        for (n, chunk) in src.chunks(STAGING_HALF).enumerate() {
            let half = st.next;
            st.next = 1 - half;
            // The previous copy out of this half must be done before it is overwritten.
            st.done[half]
                .synchronize()
                .map_err(|e| self.fail("waiting for the staging buffer", e))?;
            let stage = base.add(half * STAGING_HALF);
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), stage, chunk.len());
            sys::cuMemcpyHtoDAsync_v2(
                dst + (n * STAGING_HALF) as u64,
                stage.cast(),
                chunk.len(),
                i.copy_stream.cu_stream(),
            )
            .result()
            .map_err(|e| self.fail("cuMemcpyHtoDAsync (copy stream)", e))?;
            st.done[half]
                .record(&i.copy_stream)
                .map_err(|e| self.fail("cuEventRecord", e))?;
        }
        i.upload_done
            .record(&i.copy_stream)
            .map_err(|e| self.fail("cuEventRecord", e))
    }

    /// Makes the compute stream wait (on the device, not the host) for every overlapped upload
    /// enqueued so far.
    pub fn wait_uploads(&self) -> Result<()> {
        self.refuse_in_capture("waiting for overlapped uploads")?;
        self.bind()?;
        self.inner
            .stream
            .wait(&self.inner.upload_done)
            .map_err(|e| self.fail("cuStreamWaitEvent", e))
    }

    // ----- NVTX -----

    /// Opens a named NVTX range (shown by Nsight Systems), through cudarc's safe range guard
    /// kept on a per-thread stack. A no-op when libnvToolsExt is not installed (noted once on
    /// stderr if a profiler appears to be attached).
    pub fn range_push(&self, name: &str) {
        if nvtx_present() {
            let range = cudarc::nvtx::safe::scoped_range(name.replace('\0', " "));
            NVTX_RANGES.with(|r| r.borrow_mut().push(range));
        }
    }

    /// Closes the innermost range opened by [`CudaDevice::range_push`] on this thread.
    pub fn range_pop(&self) {
        // Dropping the guard ends the range.
        NVTX_RANGES.with(|r| drop(r.borrow_mut().pop()));
    }

    /// Enqueues one epilogue kernel computation (`gemm` paths 2 and 3).
    unsafe fn epilogue(&self, e: &gemm::EpilogueCall, scratch: Addr, dtype: DType) -> Result<()> {
        let kernel = gemm::epilogue_kernel(dtype);
        for l in gemm::epilogue_launches(e, e.resolved_residual(scratch), dtype.size()) {
            let mut args = KernelArgs::new();
            args.ptr(l.c)
                .i32(l.ldc)
                .i64(l.batch_stride_c)
                .ptr(l.bias)
                .ptr(l.residual)
                .i32(l.ldr)
                .i64(l.batch_stride_r)
                .i32(l.batch)
                .i32(l.m)
                .i32(l.n)
                .i32(l.act);
            self.launch(kernel, l.grid, [gemm::EPILOGUE_BLOCK, 1, 1], 0, &mut args)?;
        }
        Ok(())
    }

    /// Enqueues one GEMM plan. `Ok(Some(msg))`: cuBLASLt found no algorithm for its matmul
    /// (nothing of the matmul was enqueued); the caller falls back to a simpler plan.
    unsafe fn run_gemm_plan(&self, plan: &gemm::GemmPlan, dtype: DType) -> Result<Option<String>> {
        let scratch = match &plan.save {
            Some(s) => self.save_residual(s, dtype)?,
            None => 0,
        };
        match self
            .inner
            .lt
            .matmul(dtype, &plan.lt, self.inner.stream.cu_stream())
        {
            Ok(()) => {}
            Err(gemm::LtFailure::NoAlgorithm(m)) => return Ok(Some(m)),
            Err(gemm::LtFailure::Other(m)) => return Err(Error::device(&self.inner.label, m)),
        }
        if let Some(e) = &plan.epilogue {
            self.epilogue(e, scratch, dtype)?;
        }
        Ok(None)
    }

    /// Copies C into the scratch buffer before the GEMM overwrites it (`gemm` path 3).
    unsafe fn save_residual(&self, s: &gemm::SaveResidual, dtype: DType) -> Result<Addr> {
        let esz = dtype.size();
        let bytes = s.bytes(esz);
        let scratch = {
            let mut sc = self.inner.scratch.lock();
            if sc.current.as_ref().is_none_or(|a| a.bytes < bytes) {
                self.refuse_in_capture(
                    "growing the GEMM scratch buffer (run the work once before capturing)",
                )?;
                let a = raw_alloc(&self.inner.ctx, bytes.max(1 << 20))
                    .map_err(|e| self.fail("GEMM scratch allocation", e))?;
                if let Some(old) = sc.current.replace(a) {
                    sc.retired.push(old);
                }
            }
            sc.current.as_ref().map_or(0, |a| a.ptr)
        };
        for b in 0..s.batch {
            // SAFETY: plain-old-data struct, all fields set below or meant to be zero.
            let mut cp: sys::CUDA_MEMCPY2D = std::mem::zeroed();
            cp.srcMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
            cp.srcDevice = s.c + (b * s.batch_stride_c * esz) as u64;
            cp.srcPitch = s.ldc * esz;
            cp.dstMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
            cp.dstDevice = scratch + (b * s.m * s.n * esz) as u64;
            cp.dstPitch = s.n * esz;
            cp.WidthInBytes = s.n * esz;
            cp.Height = s.m;
            sys::cuMemcpy2DAsync_v2(&cp, self.inner.stream.cu_stream())
                .result()
                .map_err(|e| self.fail("cuMemcpy2DAsync (saving the in-place residual)", e))?;
        }
        Ok(scratch)
    }
}

/// `cuMemAlloc` of `bytes` in `ctx` (current).
fn raw_alloc(
    ctx: &Arc<CudaContext>,
    bytes: usize,
) -> std::result::Result<DeviceAlloc, DriverError> {
    ctx.bind_to_thread()?;
    // SAFETY: a plain allocation.
    let ptr = unsafe { drv::malloc_sync(bytes) }?;
    Ok(DeviceAlloc {
        ptr,
        bytes,
        ctx: ctx.clone(),
    })
}

thread_local! {
    /// The NVTX ranges opened by [`CudaDevice::range_push`] on this thread, innermost last.
    static NVTX_RANGES: std::cell::RefCell<Vec<cudarc::nvtx::safe::Range>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether libnvToolsExt loads (checked once).
fn nvtx_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: only tries to dlopen the library.
        let ok = unsafe { cudarc::nvtx::sys::is_culib_present() };
        let profiling = std::env::var_os("NSYS_PROFILING_SESSION_ID").is_some()
            || std::env::var_os("NVTX_INJECTION64_PATH").is_some();
        if !ok && profiling {
            eprintln!(
                "note: libnvToolsExt (NVTX) not found: segvol's profiler ranges are disabled"
            );
        }
        ok
    })
}

impl KernelDevice for CudaDevice {
    fn name(&self) -> String {
        self.inner.label.clone()
    }

    /// `cuda:0 (NVIDIA H200, sm_90, kernels: cubin sm_90a, binary sm_90, cuBLASLt 130000,
    /// driver 13000)`: the image is what the driver loaded (the load path), and the binary
    /// version is `CU_FUNC_ATTRIBUTE_BINARY_VERSION` of a loaded kernel (the SASS it runs).
    fn description(&self) -> String {
        let i = &self.inner;
        format!(
            "{} ({}, sm_{}{}, kernels: {}, binary sm_{}, cuBLASLt {}, driver {})",
            i.label,
            i.name,
            i.cc.0,
            i.cc.1,
            i.kernel_image,
            i.binary_version,
            gemm::Lt::version(),
            i.driver_version
        )
    }

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        if bytes == 0 {
            return Ok(Buffer::new(0, 0, Box::new(())));
        }
        self.refuse_in_capture("allocating")?;
        let a = raw_alloc(&self.inner.ctx, bytes).map_err(|e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let (free, total) = drv::mem_get_info().unwrap_or((0, 0));
                Error::OutOfMemory(format!(
                    "{}: cannot allocate {bytes} bytes ({free} of {total} bytes free)",
                    self.inner.label
                ))
            } else {
                self.fail(&format!("cuMemAlloc({bytes})"), e)
            }
        })?;
        if a.ptr % 256 != 0 {
            return Err(Error::Internal(format!(
                "cuMemAlloc returned {:#x}, not 256-byte aligned",
                a.ptr
            )));
        }
        Ok(Buffer::new(a.ptr, bytes, Box::new(a)))
    }

    unsafe fn upload(&self, dst: Addr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.refuse_in_capture("an upload")?;
        self.bind()?;
        // From pageable memory the driver stages `src` before returning, so the caller may
        // reuse it at once; the copy is ordered with the kernels on the stream.
        drv::memcpy_htod_async(dst, src, self.inner.stream.cu_stream())
            .map_err(|e| self.fail("cuMemcpyHtoDAsync", e))
    }

    unsafe fn download(&self, src: Addr, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.refuse_in_capture("a download")?;
        self.bind()?;
        let i = &self.inner;
        i.stream
            .wait(&i.upload_done)
            .map_err(|e| self.fail("cuStreamWaitEvent", e))?;
        drv::memcpy_dtoh_async(dst, src, i.stream.cu_stream())
            .map_err(|e| self.fail("cuMemcpyDtoHAsync", e))?;
        i.stream.synchronize().map_err(|e| {
            self.fail("download (this error may come from an earlier kernel or GEMM; rerun with SEGVOL_CUDA_SYNC=1 to name it)", e)
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture("synchronising")?;
        self.bind()?;
        let i = &self.inner;
        i.copy_stream
            .synchronize()
            .and_then(|_| i.stream.synchronize())
            .map_err(|e| {
                self.fail("synchronize (this error may come from an earlier kernel or GEMM; rerun with SEGVOL_CUDA_SYNC=1 to name it)", e)
            })
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut KernelArgs,
    ) -> Result<()> {
        let i = &self.inner;
        let Some(func) = i.functions.get(kernel) else {
            return Err(Error::device(
                &i.label,
                format!("unknown kernel `{kernel}` (not in the embedded kernel modules)"),
            ));
        };
        if func.params.as_bytes() != args.kinds() {
            embedded::check_args(kernel, args)?;
        }
        if grid.contains(&0) {
            return Ok(()); // an empty problem: nothing to launch
        }
        self.bind()?;
        if shared_bytes > func.max_dynamic_smem {
            return Err(Error::device(
                &i.label,
                format!(
                    "{kernel}: {shared_bytes} bytes of dynamic shared memory exceed the {} this \
                     device allows it",
                    func.max_dynamic_smem
                ),
            ));
        }
        let mut params = args.as_params();
        drv::launch_kernel(
            func.f,
            (grid[0], grid[1], grid[2]),
            (block[0], block[1], block[2]),
            shared_bytes,
            i.stream.cu_stream(),
            &mut params,
        )
        .map_err(|e| {
            self.fail(
                &format!("launch {kernel} grid {grid:?} block {block:?} shared {shared_bytes}"),
                e,
            )
        })?;
        self.debug_sync(&|| format!("kernel {kernel} grid {grid:?} block {block:?}"))
    }

    unsafe fn gemm(&self, args: &GemmArgs, dtype: DType) -> Result<()> {
        self.bind()?;
        let mut level = gemm::Level::Fused;
        loop {
            let Some(plan) = gemm::plan_at(args, dtype, level)? else {
                return Ok(());
            };
            let run = if level == gemm::Level::PerBatch && plan.lt.shape.batch > 1 {
                let mut failed = None;
                for a in gemm::split_batches(args, dtype.size()) {
                    if let Some(p) = gemm::plan_at(&a, dtype, level)? {
                        failed = self.run_gemm_plan(&p, dtype)?;
                        if failed.is_some() {
                            break;
                        }
                    }
                }
                Ok(failed)
            } else {
                self.run_gemm_plan(&plan, dtype)
            };
            match run? {
                None => break,
                // No algorithm: a simpler plan, or the error. The heuristic runs before anything
                // of this plan's matmul is enqueued, and a repeated residual save copies the
                // same unchanged C, so retrying is safe.
                Some(msg) => match gemm::next_level(level, &plan) {
                    Some(next) => level = next,
                    None => return Err(Error::device(&self.inner.label, msg)),
                },
            }
        }
        self.debug_sync(&|| format!("gemm {dtype} {args:?}"))
    }

    fn supports_graphs(&self) -> bool {
        true
    }

    fn free_memory(&self) -> Option<usize> {
        self.device_info().ok().map(|i| i.free_bytes)
    }

    fn range_push(&self, name: &str) {
        CudaDevice::range_push(self, name)
    }

    fn range_pop(&self) {
        CudaDevice::range_pop(self)
    }

    fn begin_capture(&self) -> Result<()> {
        self.begin_capture_inner()
    }

    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        Ok(Box::new(self.end_capture_inner()?))
    }
}

/// An instantiated CUDA graph recorded by [`CudaDevice::capture`], replayed on the device's
/// compute stream. It keeps the device alive.
pub struct CudaGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    dev: Arc<Inner>,
}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaGraph({}, {:p})", self.dev.label, self.exec)
    }
}

// SAFETY: graph objects may move between threads; `launch` takes `&self` but CudaGraph is not
// Sync, so two threads never use one graph at once (CUDA requires that serialisation).
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Replays the graph on the device's stream, asynchronously.
    ///
    /// # Safety
    /// Every buffer the captured work reads or writes must still be alive.
    pub unsafe fn launch(&self) -> Result<()> {
        let d = &self.dev;
        let fail = |what: &str, e: DriverError| {
            Error::device(&d.label, format!("{what}: {}", describe(e)))
        };
        if d.capturing.load(Ordering::Acquire) {
            return Err(Error::device(
                &d.label,
                "launching a graph while another is being captured is not supported",
            ));
        }
        d.ctx
            .bind_to_thread()
            .map_err(|e| fail("cannot make the context current", e))?;
        drv::graph::launch(self.exec, d.stream.cu_stream())
            .map_err(|e| fail("cuGraphLaunch", e))?;
        if d.sync_each {
            d.stream
                .synchronize()
                .map_err(|e| fail("graph replay failed", e))?;
        }
        Ok(())
    }
}

impl DeviceGraph for CudaGraph {
    unsafe fn launch(&self) -> Result<()> {
        CudaGraph::launch(self)
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if self.dev.ctx.bind_to_thread().is_ok() {
            // SAFETY: created by `end_capture_inner`, destroyed once. A replay still queued
            // keeps its own reference to the executable graph (CUDA defers the destruction).
            unsafe {
                let _ = drv::graph::exec_destroy(self.exec);
                let _ = drv::graph::destroy(self.graph);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubin_is_used_only_for_its_exact_architecture() {
        assert!(cubin_matches("90a", (9, 0)));
        assert!(cubin_matches("90", (9, 0)));
        assert!(!cubin_matches("90a", (8, 0)));
        assert!(!cubin_matches("90a", (10, 0)));
        assert!(!cubin_matches("", (9, 0)));
        assert!(cubin_matches("80", (8, 0)));
    }
}
