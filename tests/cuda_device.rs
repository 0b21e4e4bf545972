//! The CUDA device (`src/backend/cuda`).
//!
//! Everywhere: `CudaDevice::new` returns a typed error, never a panic, when it cannot open the
//! device (without a driver: "CUDA driver not found"), repeatedly and from several threads.
//!
//! With a GPU (each test prints `skipped: <reason>` and returns otherwise): GEMM parity for every
//! dtype and every `GemmArgs` case against an f64 host reference (f32: 1e-5, f16/bf16: 2e-2,
//! relative to max(1, |reference|)), including that nothing outside the output window changes;
//! a kernel launched by name; graph capture and replay giving bit-identical results; overlapped
//! uploads; `device_info`. GPU tests hold one lock so that captures and timings do not interleave.

mod common;

use segvol::backend::cuda::{driver_present, CudaDevice};
use segvol::backend::kernel::{embedded, KernelArgs, KernelDevice};
use segvol::backend::{Act, Buffer, GemmArgs, Residual};
use segvol::dtype::{decode_f32, encode_f32, DType};
use segvol::rng::SplitMix64 as Rng;
use segvol::Error;
use std::sync::Mutex;

static GPU: Mutex<()> = Mutex::new(());

/// Opens device 0, or says why not.
fn device() -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

/// What `CudaDevice::new` must return here: without a driver exactly the "not found" error;
/// with one, a device or a typed "unavailable" (no device, no kernels, no cuBLASLt).
fn check_open(r: segvol::Result<CudaDevice>) {
    if !driver_present() {
        match r {
            Err(Error::DeviceUnavailable { device, msg }) => {
                assert_eq!(device, "cuda:0");
                assert!(
                    msg.contains("CUDA driver not found"),
                    "unexpected message: {msg}"
                );
            }
            Err(e) => panic!("expected DeviceUnavailable, got {e:?}"),
            Ok(d) => panic!("opened {d:?} without a driver"),
        }
    } else {
        match r {
            Ok(_) | Err(Error::DeviceUnavailable { .. }) => {}
            Err(e) => panic!("opening cuda:0 failed: {e}"),
        }
    }
}

#[test]
fn opening_without_a_driver_is_a_typed_error_not_a_panic() {
    // Every test that opens a device holds the lock: a context created here must not
    // interleave with another test's capture or timing.
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..2 {
        let r = std::panic::catch_unwind(|| CudaDevice::new(0)).expect("CudaDevice::new panicked");
        check_open(r);
    }
    let threads: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| CudaDevice::new(0)))
        .collect();
    for t in threads {
        check_open(t.join().expect("CudaDevice::new panicked in a thread"));
    }
}

#[test]
fn an_ordinal_out_of_range_is_unavailable() {
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    match CudaDevice::new(999) {
        Err(Error::DeviceUnavailable { device, msg }) => {
            assert_eq!(device, "cuda:999");
            if driver_present() {
                assert!(
                    msg.contains("out of range") || msg.contains("no CUDA device"),
                    "{msg}"
                );
            } else {
                assert!(msg.contains("CUDA driver not found"), "{msg}");
            }
        }
        Err(e) => panic!("expected DeviceUnavailable, got {e:?}"),
        Ok(d) => panic!("opened {d:?}"),
    }
}

// ----- helpers for the GPU tests -----

/// A device buffer with its host contents, rounded to `dtype`.
struct Dev {
    buf: Buffer,
    host: Vec<f32>,
    dtype: DType,
}

impl Dev {
    fn new(dev: &CudaDevice, host: Vec<f32>, dtype: DType) -> Dev {
        let bytes = encode_f32(&host, dtype);
        let buf = dev.alloc(bytes.len()).expect("alloc");
        unsafe { dev.upload(buf.addr(), &bytes).expect("upload") };
        Dev {
            buf,
            host: decode_f32(&bytes, dtype),
            dtype,
        }
    }
    /// Address of element `i`.
    fn at(&self, i: usize) -> u64 {
        self.buf.at(i * self.dtype.size())
    }
    fn download(&self, dev: &CudaDevice) -> Vec<f32> {
        let mut bytes = vec![0u8; self.buf.len()];
        unsafe { dev.download(self.buf.addr(), &mut bytes).expect("download") };
        decode_f32(&bytes, self.dtype)
    }
}

/// One GEMM case: sizes and the features it exercises.
#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    b_trans: bool,
    /// Padding added to each leading dimension and batch stride.
    pad: usize,
    bcast_a: bool,
    bcast_b: bool,
    bias: bool,
    act: Act,
    residual: Res,
    alpha: f32,
    /// Element offset of A, B, C and the bias inside their buffers (misaligned views).
    offset: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Res {
    None,
    InPlace,
    Other,
    BatchBroadcast,
    Ld0,
}

const BASE: Case = Case {
    name: "",
    batch: 1,
    m: 37,
    n: 45,
    k: 29,
    b_trans: true,
    pad: 0,
    bcast_a: false,
    bcast_b: false,
    bias: false,
    act: Act::None,
    residual: Res::None,
    alpha: 1.0,
    offset: 0,
};

fn cases() -> Vec<Case> {
    let mut v = vec![
        Case {
            name: "NN padded, no bias",
            b_trans: false,
            pad: 3,
            ..BASE
        },
        Case {
            name: "NT + bias",
            bias: true,
            ..BASE
        },
        Case {
            name: "ReLU without bias",
            act: Act::Relu,
            ..BASE
        },
        Case {
            name: "batched strided NN",
            batch: 3,
            b_trans: false,
            pad: 2,
            bias: true,
            ..BASE
        },
        Case {
            name: "batch broadcast A",
            batch: 2,
            bcast_a: true,
            bias: true,
            ..BASE
        },
        Case {
            name: "patch embedding: shared weight (folded) + pos residual, batch stride 0",
            batch: 3,
            bcast_b: true,
            bias: true,
            residual: Res::BatchBroadcast,
            ..BASE
        },
        Case {
            name: "in-place residual + bias (beta = 1)",
            bias: true,
            residual: Res::InPlace,
            ..BASE
        },
        Case {
            name: "in-place residual, batched",
            batch: 2,
            pad: 1,
            bias: true,
            residual: Res::InPlace,
            ..BASE
        },
        Case {
            name: "in-place residual + GELU (saved residual)",
            bias: true,
            act: Act::Gelu,
            residual: Res::InPlace,
            ..BASE
        },
        Case {
            name: "other residual",
            bias: true,
            residual: Res::Other,
            ..BASE
        },
        Case {
            name: "residual ld 0 (mask product)",
            batch: 2,
            b_trans: false,
            residual: Res::Ld0,
            ..BASE
        },
        Case {
            name: "alpha 0.125",
            alpha: 0.125,
            bias: true,
            ..BASE
        },
        Case {
            name: "misaligned views (unaligned bias -> kernel)",
            offset: 1,
            bias: true,
            pad: 1,
            ..BASE
        },
        Case {
            name: "misaligned in-place residual",
            offset: 3,
            bias: true,
            residual: Res::InPlace,
            ..BASE
        },
        Case {
            name: "ViT-sized MLP",
            m: 260,
            n: 768,
            k: 768,
            bias: true,
            act: Act::Gelu,
            ..BASE
        },
    ];
    for act in [Act::Gelu, Act::Relu, Act::QuickGelu] {
        v.push(Case {
            name: "activation + bias",
            bias: true,
            act,
            ..BASE
        });
    }
    v
}

/// Runs `case` in `dtype` and compares every element of the output buffer with the reference
/// (inside the window) or with its old value (outside). Returns the worst relative error.
fn run_case(dev: &CudaDevice, dtype: DType, case: &Case, rng: &mut Rng) -> f64 {
    let Case {
        batch,
        m,
        n,
        k,
        pad,
        ..
    } = *case;
    let off = case.offset;
    let lda = k + pad;
    let (b_rows, b_cols) = if case.b_trans { (n, k) } else { (k, n) };
    let ldb = b_cols + pad;
    let ldc = n + pad;
    let sa = if case.bcast_a {
        0
    } else if case.bcast_b {
        m * lda // packed: the folded patch-embedding layout
    } else {
        m * lda + pad
    };
    let sb = if case.bcast_b { 0 } else { b_rows * ldb + pad };
    let sc = if case.bcast_b { m * ldc } else { m * ldc + pad };
    let wscale = 1.0 / (k as f32).sqrt();
    let a = Dev::new(
        dev,
        rng.values(off + sa * (batch - 1) + m * lda, -1.0, 1.0),
        dtype,
    );
    let b = Dev::new(
        dev,
        rng.values(off + sb * (batch - 1) + b_rows * ldb, -wscale, wscale),
        dtype,
    );
    let c = Dev::new(
        dev,
        rng.values(off + sc * (batch - 1) + m * ldc, -1.0, 1.0),
        dtype,
    );
    let bias = case
        .bias
        .then(|| Dev::new(dev, rng.values(off + n, -0.5, 0.5), dtype));
    let (res, residual) = match case.residual {
        Res::None => (None, None),
        Res::InPlace => (
            None,
            Some(Residual {
                addr: c.at(off),
                ld: ldc,
                batch_stride: sc,
            }),
        ),
        Res::Other => {
            let r = Dev::new(dev, rng.values(batch * m * (n + 2), -1.0, 1.0), dtype);
            let res = Residual {
                addr: r.at(0),
                ld: n + 2,
                batch_stride: m * (n + 2),
            };
            (Some(r), Some(res))
        }
        Res::BatchBroadcast => {
            let r = Dev::new(dev, rng.values(m * n, -1.0, 1.0), dtype);
            let res = Residual {
                addr: r.at(0),
                ld: n,
                batch_stride: 0,
            };
            (Some(r), Some(res))
        }
        Res::Ld0 => {
            let r = Dev::new(dev, rng.values(batch * n, -1.0, 1.0), dtype);
            let res = Residual {
                addr: r.at(0),
                ld: 0,
                batch_stride: n,
            };
            (Some(r), Some(res))
        }
    };
    let args = GemmArgs {
        batch,
        m,
        n,
        k,
        a: a.at(off),
        lda,
        batch_stride_a: sa,
        b: b.at(off),
        ldb,
        batch_stride_b: sb,
        b_trans: case.b_trans,
        c: c.at(off),
        ldc,
        batch_stride_c: sc,
        alpha: case.alpha,
        bias: bias.as_ref().map(|x| x.at(off)),
        act: case.act,
        residual,
    };

    // The reference, from the rounded inputs, in f64.
    let mut want: Vec<f64> = c.host.iter().map(|&x| x as f64).collect();
    let mut inside = vec![false; want.len()];
    let r_host = match (&res, case.residual) {
        (_, Res::InPlace) => Some(&c.host[off..]),
        (Some(r), _) => Some(&r.host[..]),
        _ => None,
    };
    common::reference::gemm(
        &common::reference::Gemm {
            batch,
            m,
            n,
            k,
            a: &a.host[off..],
            lda,
            batch_stride_a: sa,
            b: &b.host[off..],
            ldb,
            batch_stride_b: sb,
            b_trans: case.b_trans,
            ldc,
            batch_stride_c: sc,
            alpha: case.alpha,
            bias: bias.as_ref().map(|x| &x.host[off..]),
            act: case.act,
            residual: r_host.zip(residual).map(|(h, r)| (h, r.ld, r.batch_stride)),
        },
        &mut want[off..],
    );
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                inside[off + bi * sc + i * ldc + j] = true;
            }
        }
    }

    unsafe { dev.gemm(&args, dtype) }
        .unwrap_or_else(|e| panic!("{dtype} `{}`: gemm failed: {e}", case.name));
    let got = c.download(dev);
    let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if inside[i] {
            let err = (g as f64 - w).abs() / w.abs().max(1.0);
            worst = worst.max(err);
            assert!(
                err <= tol,
                "{dtype} `{}`: element {i}: got {g}, want {w} (rel err {err:.2e} > {tol:e})",
                case.name
            );
        } else {
            assert_eq!(
                g.to_bits(),
                c.host[i].to_bits(),
                "{dtype} `{}`: element {i} outside the output changed",
                case.name
            );
        }
    }
    worst
}

#[test]
fn gemm_matches_the_f64_reference_for_every_dtype_and_case() {
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device() else { return };
    let mut rng = Rng(2024);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for case in cases() {
            let worst = run_case(&dev, dtype, &case, &mut rng);
            println!("{dtype:>4} {:<70} worst rel err {worst:.2e}", case.name);
        }
    }
}

#[test]
fn gemm_rejects_bad_arguments_with_typed_errors() {
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device() else { return };
    let buf = dev.alloc(1 << 12).unwrap();
    let args = GemmArgs {
        batch: 1,
        m: 4,
        n: 4,
        k: 4,
        a: buf.addr(),
        lda: 4,
        batch_stride_a: 0,
        b: buf.addr(),
        ldb: 4,
        batch_stride_b: 0,
        b_trans: true,
        c: buf.addr(),
        ldc: 3,
        batch_stride_c: 0,
        alpha: 1.0,
        bias: None,
        act: Act::None,
        residual: None,
    };
    let e = unsafe { dev.gemm(&args, DType::BF16) }.unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e:?}");
    // The device is still usable.
    dev.synchronize().unwrap();
}

#[test]
fn a_kernel_launches_by_name() {
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device() else { return };
    let name = "sv_gemm_epilogue_f32";
    if !embedded::MODULES.iter().any(|m| m.kernels.contains(&name)) {
        println!("skipped: no kernel module defines {name}");
        return;
    }
    let unknown = unsafe {
        dev.launch(
            "sv_no_such_kernel",
            [1, 1, 1],
            [1, 1, 1],
            0,
            &mut KernelArgs::new(),
        )
    }
    .unwrap_err();
    assert!(
        matches!(&unknown, Error::Device { msg, .. } if msg.contains("sv_no_such_kernel")),
        "{unknown:?}"
    );

    // c = relu(c + bias) + residual over 2 batches of 300 x 7 (ldc 9), launched directly.
    let (batch, m, n, ldc) = (2usize, 300usize, 7usize, 9usize);
    let mut rng = Rng(5);
    let c = Dev::new(&dev, rng.values(batch * m * ldc, -1.0, 1.0), DType::F32);
    let bias = Dev::new(&dev, rng.values(n, -1.0, 1.0), DType::F32);
    let r = Dev::new(&dev, rng.values(m * n, -1.0, 1.0), DType::F32);
    let mut args = KernelArgs::new();
    args.ptr(c.at(0))
        .i32(ldc as i32)
        .i64((m * ldc) as i64)
        .ptr(bias.at(0))
        .ptr(r.at(0))
        .i32(n as i32)
        .i64(0)
        .i32(batch as i32)
        .i32(m as i32)
        .i32(n as i32)
        .i32(Act::Relu.code());
    unsafe {
        dev.launch(
            name,
            [n.div_ceil(256) as u32, m as u32, batch as u32],
            [256, 1, 1],
            0,
            &mut args,
        )
    }
    .unwrap();
    let got = c.download(&dev);
    for b in 0..batch {
        for i in 0..m {
            for j in 0..ldc {
                let at = b * m * ldc + i * ldc + j;
                let want = if j < n {
                    (c.host[at] + bias.host[j]).max(0.0) + r.host[i * n + j]
                } else {
                    c.host[at]
                };
                assert_eq!(got[at], want, "batch {b} row {i} col {j}");
            }
        }
    }
}

/// Two GEMMs of a transformer MLP on `x`: `h = gelu(x W1ᵀ + b1)`, `x += h W2ᵀ + b2`.
unsafe fn mlp(
    dev: &CudaDevice,
    x: &Dev,
    h: &Dev,
    w1: &Dev,
    b1: &Dev,
    w2: &Dev,
    b2: &Dev,
) -> segvol::Result<()> {
    let (m, c, f) = (97usize, 64usize, 256usize);
    let g1 = GemmArgs {
        batch: 1,
        m,
        n: f,
        k: c,
        a: x.at(0),
        lda: c,
        batch_stride_a: 0,
        b: w1.at(0),
        ldb: c,
        batch_stride_b: 0,
        b_trans: true,
        c: h.at(0),
        ldc: f,
        batch_stride_c: 0,
        alpha: 1.0,
        bias: Some(b1.at(0)),
        act: Act::Gelu,
        residual: None,
    };
    let g2 = GemmArgs {
        batch: 1,
        m,
        n: c,
        k: f,
        a: h.at(0),
        lda: f,
        batch_stride_a: 0,
        b: w2.at(0),
        ldb: f,
        batch_stride_b: 0,
        b_trans: true,
        c: x.at(0),
        ldc: c,
        batch_stride_c: 0,
        alpha: 1.0,
        bias: Some(b2.at(0)),
        act: Act::None,
        residual: Some(Residual {
            addr: x.at(0),
            ld: c,
            batch_stride: 0,
        }),
    };
    dev.gemm(&g1, DType::BF16)?;
    dev.gemm(&g2, DType::BF16)
}

#[test]
fn a_captured_graph_replays_bit_identically() {
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device() else { return };
    let (m, c, f) = (97usize, 64usize, 256usize);
    let mut rng = Rng(9);
    let bf = DType::BF16;
    let x = Dev::new(&dev, rng.values(m * c, -1.0, 1.0), bf);
    let h = Dev::new(&dev, vec![0.0; m * f], bf);
    let w1 = Dev::new(&dev, rng.values(f * c, -0.125, 0.125), bf);
    let b1 = Dev::new(&dev, rng.values(f, -0.5, 0.5), bf);
    let w2 = Dev::new(&dev, rng.values(c * f, -0.0625, 0.0625), bf);
    let b2 = Dev::new(&dev, rng.values(c, -0.5, 0.5), bf);
    let inputs = [
        encode_f32(&x.host, bf),
        encode_f32(&rng.values(m * c, -1.0, 1.0), bf),
    ];

    // Eager results for both inputs (this also warms up cuBLASLt and the kernels).
    let mut eager = Vec::new();
    for input in &inputs {
        unsafe {
            dev.upload(x.buf.addr(), input).unwrap();
            mlp(&dev, &x, &h, &w1, &b1, &w2, &b2).unwrap();
        }
        eager.push(x.download(&dev));
    }
    let graph = dev
        .capture(|d| unsafe { mlp(d, &x, &h, &w1, &b1, &w2, &b2) })
        .unwrap();
    for _ in 0..2 {
        for (input, want) in inputs.iter().zip(&eager) {
            unsafe {
                dev.upload(x.buf.addr(), input).unwrap();
                graph.launch().unwrap();
            }
            let got = x.download(&dev);
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "graph replay differs from the eager run"
            );
        }
    }
    // Work that cannot be captured is refused, and the device stays usable.
    let e = dev
        .capture(|d| unsafe { d.upload(x.buf.addr(), &inputs[0]) })
        .unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e:?}");
    unsafe { dev.upload(x.buf.addr(), &inputs[0]).unwrap() };
    unsafe { mlp(&dev, &x, &h, &w1, &b1, &w2, &b2).unwrap() };
    let again = x.download(&dev);
    assert!(again
        .iter()
        .zip(&eager[0])
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn overlapped_uploads_arrive_intact() {
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device() else { return };
    // 80 MiB (more than both staging halves) in two calls, with compute queued in between.
    let mut rng = Rng(77);
    let total = 80 << 20;
    let data: Vec<u8> = (0..total / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    let buf = dev.alloc(total).unwrap();
    let (m, c, f) = (97usize, 64usize, 256usize);
    let bf = DType::BF16;
    let x = Dev::new(&dev, rng.values(m * c, -1.0, 1.0), bf);
    let h = Dev::new(&dev, vec![0.0; m * f], bf);
    let w1 = Dev::new(&dev, rng.values(f * c, -0.125, 0.125), bf);
    let b1 = Dev::new(&dev, rng.values(f, -0.5, 0.5), bf);
    let w2 = Dev::new(&dev, rng.values(c * f, -0.0625, 0.0625), bf);
    let b2 = Dev::new(&dev, rng.values(c, -0.5, 0.5), bf);
    let split = 45 << 20;
    unsafe {
        dev.upload_overlapped(buf.addr(), &data[..split]).unwrap();
        mlp(&dev, &x, &h, &w1, &b1, &w2, &b2).unwrap();
        dev.upload_overlapped(buf.at(split), &data[split..])
            .unwrap();
    }
    dev.wait_uploads().unwrap();
    let mut back = vec![0u8; total];
    unsafe { dev.download(buf.addr(), &mut back).unwrap() };
    assert!(back == data, "overlapped upload corrupted the data");
}

#[test]
fn device_info_is_sane() {
    let _g = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device() else { return };
    let info = dev.device_info().unwrap();
    println!("{info:?}");
    assert!(!info.name.is_empty());
    assert!(info.compute_capability >= (7, 0), "{info:?}");
    assert!(info.multiprocessors > 0);
    assert!(info.total_bytes >= 1 << 30 && info.free_bytes <= info.total_bytes);
    assert!(info.driver_version >= 12000, "{info:?}");
    assert!(info.cublaslt_version > 0);
    if !embedded::MODULES.is_empty() {
        assert_ne!(info.kernel_image, "none");
    }
    // The preflight reads the loaded image from this line (the `segvol bench` header).
    let desc = KernelDevice::description(&dev);
    println!("{desc}");
    assert!(
        desc.contains(info.kernel_image) && desc.contains("binary sm_"),
        "{desc}"
    );
    // Allocation: empty is fine, absurd is a typed out-of-memory error.
    assert_eq!(dev.alloc(0).unwrap().len(), 0);
    match dev.alloc(1 << 52) {
        Err(Error::OutOfMemory(msg)) => assert!(msg.contains("cuda:0"), "{msg}"),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    let b = dev.alloc(1000).unwrap();
    assert_eq!(b.addr() % 256, 0);
    // NVTX ranges never fail, nested or with a NUL in the name.
    dev.range_push("segvol test range");
    dev.range_push("inner\0range");
    dev.range_pop();
    dev.range_pop();
    dev.range_pop(); // one too many: a no-op
}
