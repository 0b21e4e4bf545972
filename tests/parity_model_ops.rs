//! Parity of the model's non-attention kernels (`kernels/{elementwise,layer_norm,
//! conv_transpose,interp}.cu`) with the CPU reference: every op, every storage dtype, odd sizes,
//! in-place and aliasing cases, both conv layouts, every interp mode and dtype pair, poisoned
//! outputs, and bit-identical results under every emulator schedule. The GEMM epilogue kernel
//! (launched by the CUDA GEMM) is checked directly on the emulator against a host reference.

mod common;

use common::parity::*;
use segvol::backend::emu::{EmuDevice, EmuOptions, Schedule};
use segvol::backend::kernel::{KernelArgs, KernelDevice};
use segvol::backend::{
    Act, ActArgs, AddArgs, Backend, ConvT3dArgs, EmbedArgs, Interp3dArgs, InterpMode,
    LayerNormArgs, LayerNormJointArgs, PatchGatherArgs,
};
use segvol::dtype::{decode_f32, encode_f32, DType};
use std::time::Instant;

const ACTS: [Act; 4] = [Act::None, Act::Gelu, Act::Relu, Act::QuickGelu];

/// `max|got - want| / max|want|`, printed, then [`assert_close`] with `tol`.
fn check(got: &[f32], want: &[f32], tol: f32, what: &str) -> f32 {
    let max_ref = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
        / max_ref;
    eprintln!("{what}: max rel err {err:.2e}");
    assert_close(got, want, tol, what);
    err
}

/// Asserts bit equality (ops that compute exactly what the reference computes).
fn check_exact(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let diff = got
        .iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count();
    eprintln!("{what}: {diff} of {} elements differ in bits", got.len());
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
    {
        panic!(
            "{what}: element {i} is {} but the reference gives {}",
            got[i], want[i]
        );
    }
}

/// An f32 CPU buffer of `values`.
fn cpu_buf(cpu: &dyn Backend, values: &[f32]) -> DevBuf {
    upload(cpu, values, DType::F32)
}

/// Runs `f` on the emulator under every schedule (forward, reverse, random, two workers) and
/// asserts that the outputs it returns are bit-identical.
fn schedule_identity(dtype: DType, what: &str, f: impl Fn(&dyn Backend) -> Vec<f32>) {
    let mut first: Option<(String, Vec<u32>)> = None;
    for d in emu_schedules(dtype) {
        let out: Vec<u32> = f(&*d.backend).iter().map(|v| v.to_bits()).collect();
        match &first {
            None => first = Some((d.label.clone(), out)),
            Some((label, want)) => assert!(
                *want == out,
                "{what}: {} differs from {label} (a race or an order-dependent reduction)",
                d.label
            ),
        }
    }
    eprintln!("{what}: bit-identical under every emulator schedule ({dtype})");
}

// ------------------------------------------------------------------------------------------------
// add / activation
// ------------------------------------------------------------------------------------------------

/// One add case: `out = a + b[i % period]`, `in_place`: out = a; `offset`: views that start one
/// element into their buffers (unaligned: the scalar path).
fn add_case(
    be: &dyn Backend,
    dt: DType,
    n: usize,
    period: usize,
    in_place: bool,
    offset: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let a = random(n, 2.0, seed);
    let b = random(period, 1.5, seed ^ 1);
    let mut ab = vec![0.5f32; offset];
    ab.extend(&a);
    let mut bb = vec![0.25f32; offset];
    bb.extend(&b);
    let ad = upload(be, &ab, dt);
    let bd = upload(be, &bb, dt);
    let od = poisoned(be, n + offset, dt);
    let out = if in_place {
        ad.at(offset)
    } else {
        od.at(offset)
    };
    let args = AddArgs {
        a: ad.at(offset),
        b: bd.at(offset),
        out,
        n,
        period,
    };
    unsafe { be.add(&args).unwrap() };
    let got = download(be, if in_place { &ad } else { &od })[offset..].to_vec();

    let cpu = cpu();
    let (ac, bc) = (
        cpu_buf(&*cpu, &rounded(&a, dt)),
        cpu_buf(&*cpu, &rounded(&b, dt)),
    );
    let oc = poisoned(&*cpu, n, DType::F32);
    let args = AddArgs {
        a: ac.addr(),
        b: bc.addr(),
        out: oc.addr(),
        n,
        period,
    };
    unsafe { cpu.add(&args).unwrap() };
    (got, download(&*cpu, &oc))
}

#[test]
fn add_matches_cpu() {
    for d in op_devices() {
        let dt = d.dtype();
        // (n, period): plain, row broadcast, batch broadcast; odd sizes take the scalar path,
        // multiples of 8 the 16-byte path.
        let cases = [
            (1, 1),
            (7, 7),
            (33, 33),
            (129, 129),
            (4096, 4096),
            (7 * 5, 5),
            (768 * 9, 768),
            (3 * 2048 * 8, 2048 * 8),
            (100, 1000), // period beyond n: b[i]
        ];
        for (n, period) in cases {
            for in_place in [false, true] {
                for offset in [0, 1] {
                    let (got, want) =
                        add_case(&*d.backend, dt, n, period, in_place, offset, next_seed());
                    check(
                        &got,
                        &want,
                        d.tol(),
                        &format!(
                            "{} add n{n} p{period} in_place {in_place} offset {offset}",
                            d.label
                        ),
                    );
                }
            }
        }
        // x + x in place (b == a == out).
        let be = &*d.backend;
        let x = random(136, 3.0, next_seed());
        let xd = upload(be, &x, dt);
        let args = AddArgs {
            a: xd.addr(),
            b: xd.addr(),
            out: xd.addr(),
            n: 136,
            period: 136,
        };
        unsafe { be.add(&args).unwrap() };
        let want: Vec<f32> = rounded(&x, dt).iter().map(|v| v + v).collect();
        check(
            &download(be, &xd),
            &want,
            d.tol(),
            &format!("{} add x += x", d.label),
        );
        // b overlapping out elsewhere would race: refused.
        let args = AddArgs {
            a: xd.addr(),
            b: xd.at(8),
            out: xd.addr(),
            n: 64,
            period: 64,
        };
        assert!(unsafe { be.add(&args) }.is_err());
        let args = AddArgs { period: 0, ..args };
        assert!(unsafe { be.add(&args) }.is_err());
    }
    for dt in [DType::F32, DType::BF16] {
        let seed = next_seed();
        schedule_identity(dt, "add", |be| {
            add_case(be, dt, 768 * 3 + 8, 768, false, 0, seed).0
        });
    }
}

fn activation_case(
    be: &dyn Backend,
    dt: DType,
    n: usize,
    act: Act,
    in_place: bool,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let x = random(n, 4.0, seed);
    let xd = upload(be, &x, dt);
    let od = poisoned(be, n, dt);
    let out = if in_place { xd.addr() } else { od.addr() };
    let args = ActArgs {
        x: xd.addr(),
        out,
        n,
        scale: 0.8,
        act,
    };
    unsafe { be.activation(&args).unwrap() };
    let got = download(be, if in_place { &xd } else { &od });
    let cpu = cpu();
    let xc = cpu_buf(&*cpu, &rounded(&x, dt));
    let oc = poisoned(&*cpu, n, DType::F32);
    let args = ActArgs {
        x: xc.addr(),
        out: oc.addr(),
        ..args
    };
    unsafe { cpu.activation(&args).unwrap() };
    (got, download(&*cpu, &oc))
}

#[test]
fn activation_matches_cpu() {
    for d in op_devices() {
        for act in ACTS {
            for n in [1, 7, 33, 129, 4104] {
                for in_place in [false, true] {
                    let (got, want) =
                        activation_case(&*d.backend, d.dtype(), n, act, in_place, next_seed());
                    check(
                        &got,
                        &want,
                        d.tol(),
                        &format!("{} activation {act:?} n{n} in_place {in_place}", d.label),
                    );
                }
            }
        }
    }
    let seed = next_seed();
    schedule_identity(DType::BF16, "activation", |be| {
        activation_case(be, DType::BF16, 4104, Act::Gelu, true, seed).0
    });
}

// ------------------------------------------------------------------------------------------------
// embed_gather
// ------------------------------------------------------------------------------------------------

fn embed_case(
    be: &dyn Backend,
    dt: DType,
    vocab: usize,
    rows: usize,
    cols: usize,
    ids: &[i32],
    seed: u64,
) -> Vec<f32> {
    let table = random(vocab * cols, 1.0, seed);
    let pos = random(rows * cols, 0.5, seed ^ 7);
    let td = upload(be, &table, dt);
    let pd = upload(be, &pos, dt);
    let idd = upload_bytes(be, bytemuck::cast_slice(ids), rows, DType::I32);
    let od = poisoned(be, rows * cols, dt);
    let args = EmbedArgs {
        ids: idd.addr(),
        table: td.addr(),
        vocab,
        pos: pd.addr(),
        out: od.addr(),
        rows,
        cols,
    };
    unsafe { be.embed_gather(&args).unwrap() };
    download(be, &od)
}

#[test]
fn embed_gather_matches_cpu() {
    for d in op_devices() {
        let dt = d.dtype();
        for (vocab, rows, cols) in [(1, 1, 1), (50, 7, 33), (300, 77, 64), (11, 3, 512)] {
            let seed = next_seed();
            let ids: Vec<i32> = (0..rows)
                .map(|r| ((r * 37 + seed as usize) % vocab) as i32)
                .collect();
            let got = embed_case(&*d.backend, dt, vocab, rows, cols, &ids, seed);
            let cpu = cpu();
            let want = embed_case(&*cpu, DType::F32, vocab, rows, cols, &ids, seed);
            // The CPU run read the same values rounded through dt only if dt is f32; round the
            // table and positions the same way by recomputing from rounded inputs.
            let table = rounded(&random(vocab * cols, 1.0, seed), dt);
            let pos = rounded(&random(rows * cols, 0.5, seed ^ 7), dt);
            let want_r: Vec<f32> = (0..rows * cols)
                .map(|i| table[ids[i / cols] as usize * cols + i % cols] + pos[i])
                .collect();
            if dt == DType::F32 {
                check_exact(&want_r, &want, "embed reference");
            }
            check(
                &got,
                &want_r,
                d.tol(),
                &format!("{} embed_gather v{vocab} r{rows} c{cols}", d.label),
            );
        }
        // An id outside the vocabulary cannot be reported by the kernel: its row is NaN, the
        // others are intact (the CPU backend reports an error instead).
        let (vocab, rows, cols) = (10, 4, 9);
        let ids = [3, 10, -1, 9];
        let got = embed_case(&*d.backend, dt, vocab, rows, cols, &ids, 5);
        for r in 0..rows {
            let row = &got[r * cols..(r + 1) * cols];
            let bad = !(0..vocab as i32).contains(&ids[r]);
            assert!(
                row.iter().all(|v| v.is_nan() == bad),
                "{} embed row {r} (id {}): {row:?}",
                d.label,
                ids[r]
            );
        }
    }
    schedule_identity(DType::F16, "embed_gather", |be| {
        let ids: Vec<i32> = (0..77).map(|r| r * 13 % 300).collect();
        embed_case(be, DType::F16, 300, 77, 64, &ids, 99)
    });
}

// ------------------------------------------------------------------------------------------------
// patch_gather3d
// ------------------------------------------------------------------------------------------------

fn patch_case(
    be: &dyn Backend,
    dt: DType,
    x_dt: DType,
    batch: usize,
    dims: [usize; 3],
    patch: [usize; 3],
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let total = batch * dims.iter().product::<usize>();
    let x = random(total, 1.0, seed);
    let xd = upload(be, &x, x_dt);
    let od = poisoned(be, total, dt);
    let args = PatchGatherArgs {
        x: xd.addr(),
        x_dtype: x_dt,
        out: od.addr(),
        batch,
        dims,
        patch,
    };
    unsafe { be.patch_gather3d(&args).unwrap() };
    let got = download(be, &od);
    let cpu = cpu();
    let xc = cpu_buf(&*cpu, &rounded(&x, x_dt));
    let oc = poisoned(&*cpu, total, DType::F32);
    let args = PatchGatherArgs {
        x: xc.addr(),
        x_dtype: DType::F32,
        out: oc.addr(),
        ..args
    };
    unsafe { cpu.patch_gather3d(&args).unwrap() };
    // A gather moves values: the only change is the final rounding to the storage dtype.
    (got, rounded(&download(&*cpu, &oc), dt))
}

#[test]
fn patch_gather_matches_cpu_exactly() {
    for d in op_devices() {
        let dt = d.dtype();
        let mut x_dts = vec![DType::F32];
        if dt != DType::F32 {
            x_dts.push(dt);
        }
        for x_dt in x_dts {
            for (batch, dims, patch) in [
                (2, [8, 12, 16], [2, 3, 4]), // pw % 4 == 0: 4 values per thread
                (1, [4, 6, 6], [2, 3, 2]),   // scalar
                (3, [3, 5, 7], [1, 5, 7]),   // odd
                (1, [1, 1, 1], [1, 1, 1]),
            ] {
                let (got, want) =
                    patch_case(&*d.backend, dt, x_dt, batch, dims, patch, next_seed());
                check_exact(
                    &got,
                    &want,
                    &format!(
                        "{} patch_gather x {x_dt} b{batch} {dims:?}/{patch:?}",
                        d.label
                    ),
                );
            }
        }
        // The model's input: (1, 1, 32, 256, 256) in f32, patches (4, 16, 16).
        let t = Instant::now();
        let (got, want) = patch_case(
            &*d.backend,
            dt,
            DType::F32,
            1,
            [32, 256, 256],
            [4, 16, 16],
            next_seed(),
        );
        let secs = t.elapsed().as_secs_f64();
        check_exact(
            &got,
            &want,
            &format!("{} patch_gather full size ({secs:.2} s incl. CPU)", d.label),
        );
        // A volume that is not a whole number of patches, and an x dtype the op cannot take.
        let be = &*d.backend;
        let xd = upload(be, &random(64, 1.0, 1), DType::F32);
        let od = poisoned(be, 64, dt);
        let args = PatchGatherArgs {
            x: xd.addr(),
            x_dtype: DType::F32,
            out: od.addr(),
            batch: 1,
            dims: [4, 4, 4],
            patch: [3, 2, 2],
        };
        assert!(unsafe { be.patch_gather3d(&args) }.is_err());
        let args = PatchGatherArgs {
            x_dtype: DType::U8,
            patch: [2, 2, 2],
            ..args
        };
        assert!(unsafe { be.patch_gather3d(&args) }.is_err());
    }
    schedule_identity(DType::BF16, "patch_gather3d", |be| {
        patch_case(be, DType::BF16, DType::F32, 2, [8, 12, 16], [2, 3, 4], 42).0
    });
}

// ------------------------------------------------------------------------------------------------
// gemm epilogue (launched directly, as src/backend/cuda/gemm.rs does)
// ------------------------------------------------------------------------------------------------

/// Residual layouts of the epilogue.
#[derive(Clone, Copy, Debug)]
enum Res {
    None,
    /// Its own buffer, ld n + 3, per-batch matrices.
    Ld,
    /// ld 0: one row for every row.
    Row,
    /// Batch stride 0: one matrix for every batch.
    Shared,
    /// The residual is C itself.
    InPlace,
}

#[allow(clippy::too_many_arguments)]
fn epilogue_case(
    dev: &EmuDevice,
    dt: DType,
    batch: usize,
    m: usize,
    n: usize,
    bias: bool,
    res: Res,
    act: Act,
    seed: u64,
) -> Vec<f32> {
    let ldc = n + 2;
    let bsc = m * ldc + 5;
    let c_len = (batch - 1) * bsc + m * ldc;
    let c = random(c_len, 3.0, seed);
    let bias_v = random(n, 1.0, seed ^ 3);
    let (ldr, bsr, r_len) = match res {
        Res::None | Res::InPlace => (0, 0, 0),
        Res::Ld => (n + 3, m * (n + 3), batch * m * (n + 3)),
        Res::Row => (0, n, batch * n),
        Res::Shared => (n, 0, m * n),
    };
    let r = random(r_len.max(1), 1.0, seed ^ 5);
    let put = |v: &[f32]| {
        let bytes = encode_f32(v, dt);
        let b = dev.alloc(bytes.len()).unwrap();
        unsafe { dev.upload(b.addr(), &bytes).unwrap() };
        b
    };
    let (cb, bb, rb) = (put(&c), put(&bias_v), put(&r));
    let (rd, ldr, bsr) = match res {
        Res::None => (0, 0, 0),
        Res::InPlace => (cb.addr(), ldc, bsc),
        _ => (rb.addr(), ldr, bsr),
    };
    let mut args = KernelArgs::new();
    args.ptr(cb.addr())
        .i32(ldc as i32)
        .i64(bsc as i64)
        .ptr(if bias { bb.addr() } else { 0 })
        .ptr(rd)
        .i32(ldr as i32)
        .i64(bsr as i64)
        .i32(batch as i32)
        .i32(m as i32)
        .i32(n as i32)
        .i32(act.code());
    let grid = [n.div_ceil(256) as u32, m as u32, batch as u32];
    let name = format!("sv_gemm_epilogue_{}", dt.suffix());
    unsafe { dev.launch(&name, grid, [256, 1, 1], 0, &mut args).unwrap() };
    let mut bytes = vec![0u8; c_len * dt.size()];
    unsafe { dev.download(cb.addr(), &mut bytes).unwrap() };
    let got = decode_f32(&bytes, dt);
    // Host reference on the values the kernel read; elements outside the m x n blocks (the ldc
    // padding and the gaps between batches) must be untouched.
    let (c0, b0, r0) = (rounded(&c, dt), rounded(&bias_v, dt), rounded(&r, dt));
    let mut want = c0.clone();
    for b in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let ci = b * bsc + i * ldc + j;
                let mut v = c0[ci];
                if bias {
                    v += b0[j];
                }
                v = act.apply(v);
                match res {
                    Res::None => {}
                    Res::InPlace => v += c0[ci],
                    _ => v += r0[b * bsr + i * ldr + j],
                }
                want[ci] = v;
            }
        }
    }
    let want = rounded(&want, dt);
    let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
    check(
        &got,
        &want,
        tol,
        &format!("gemm_epilogue {dt} b{batch} {m}x{n} bias {bias} {res:?} {act:?}"),
    );
    got
}

#[test]
fn gemm_epilogue_matches_host_reference() {
    let dev = EmuDevice::new().unwrap();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for act in ACTS {
            for res in [Res::None, Res::Ld, Res::Row, Res::Shared, Res::InPlace] {
                for bias in [false, true] {
                    epilogue_case(&dev, dt, 2, 5, 300, bias, res, act, next_seed());
                }
            }
        }
        epilogue_case(&dev, dt, 1, 1, 1, true, Res::Ld, Act::Gelu, next_seed());
        epilogue_case(
            &dev,
            dt,
            3,
            7,
            33,
            true,
            Res::Row,
            Act::QuickGelu,
            next_seed(),
        );
    }
    // Schedule identity (the kernel has no cross-thread traffic; this guards the residual == c
    // case and future changes).
    let seed = next_seed();
    let mut first: Option<Vec<u32>> = None;
    for (schedule, workers) in [
        (Schedule::Forward, 1),
        (Schedule::Reverse, 1),
        (Schedule::Random, 1),
        (Schedule::Random, 2),
    ] {
        let dev = EmuDevice::with_options(EmuOptions {
            schedule,
            seed,
            workers,
            poison: true,
        });
        let got: Vec<u32> = epilogue_case(
            &dev,
            DType::BF16,
            3,
            9,
            300,
            true,
            Res::InPlace,
            Act::Gelu,
            seed,
        )
        .iter()
        .map(|v| v.to_bits())
        .collect();
        match &first {
            None => first = Some(got),
            Some(want) => assert!(
                *want == got,
                "gemm_epilogue differs under {schedule:?} x{workers}"
            ),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// layer_norm
// ------------------------------------------------------------------------------------------------

fn layer_norm_case(
    be: &dyn Backend,
    dt: DType,
    rows: usize,
    cols: usize,
    in_place: bool,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    // An offset mean, as real activations have: the two-pass variance must cope.
    let x: Vec<f32> = random(rows * cols, 3.0, seed)
        .iter()
        .map(|v| v + 5.0)
        .collect();
    let w = random(cols, 1.0, seed ^ 1);
    let b = random(cols, 0.5, seed ^ 2);
    let (xd, wd, bd) = (upload(be, &x, dt), upload(be, &w, dt), upload(be, &b, dt));
    let od = poisoned(be, rows * cols, dt);
    let out = if in_place { xd.addr() } else { od.addr() };
    let args = LayerNormArgs {
        x: xd.addr(),
        out,
        rows,
        cols,
        weight: wd.addr(),
        bias: bd.addr(),
        eps: 1e-5,
    };
    unsafe { be.layer_norm(&args).unwrap() };
    let got = download(be, if in_place { &xd } else { &od });
    let cpu = cpu();
    let (xc, wc, bc) = (
        cpu_buf(&*cpu, &rounded(&x, dt)),
        cpu_buf(&*cpu, &rounded(&w, dt)),
        cpu_buf(&*cpu, &rounded(&b, dt)),
    );
    let oc = poisoned(&*cpu, rows * cols, DType::F32);
    let args = LayerNormArgs {
        x: xc.addr(),
        out: oc.addr(),
        weight: wc.addr(),
        bias: bc.addr(),
        ..args
    };
    unsafe { cpu.layer_norm(&args).unwrap() };
    (got, download(&*cpu, &oc))
}

#[test]
fn layer_norm_matches_cpu() {
    for d in op_devices() {
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
                let (got, want) =
                    layer_norm_case(&*d.backend, d.dtype(), rows, cols, in_place, next_seed());
                check(
                    &got,
                    &want,
                    d.tol(),
                    &format!("{} layer_norm {rows}x{cols} in_place {in_place}", d.label),
                );
            }
        }
    }
    for dt in [DType::F32, DType::BF16] {
        let seed = next_seed();
        schedule_identity(dt, "layer_norm", |be| {
            layer_norm_case(be, dt, 9, 768, true, seed).0
        });
    }
}

// ------------------------------------------------------------------------------------------------
// layer_norm_joint
// ------------------------------------------------------------------------------------------------

fn joint_case(
    be: &dyn Backend,
    dt: DType,
    batch: usize,
    n: usize,
    act: Act,
    in_place: bool,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, f64) {
    let x: Vec<f32> = random(batch * n, 2.0, seed)
        .iter()
        .map(|v| v - 0.7)
        .collect();
    let w = random(n, 1.0, seed ^ 1);
    let b = random(n, 0.5, seed ^ 2);
    let (xd, wd, bd) = (upload(be, &x, dt), upload(be, &w, dt), upload(be, &b, dt));
    let od = poisoned(be, batch * n, dt);
    let out = if in_place { xd.addr() } else { od.addr() };
    let args = LayerNormJointArgs {
        x: xd.addr(),
        out,
        batch,
        n,
        weight: wd.addr(),
        bias: bd.addr(),
        eps: 1e-5,
        act,
    };
    let t = Instant::now();
    unsafe { be.layer_norm_joint(&args).unwrap() };
    be.synchronize().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let got = download(be, if in_place { &xd } else { &od });
    let cpu = cpu();
    let (xc, wc, bc) = (
        cpu_buf(&*cpu, &rounded(&x, dt)),
        cpu_buf(&*cpu, &rounded(&w, dt)),
        cpu_buf(&*cpu, &rounded(&b, dt)),
    );
    let oc = poisoned(&*cpu, batch * n, DType::F32);
    let args = LayerNormJointArgs {
        x: xc.addr(),
        out: oc.addr(),
        weight: wc.addr(),
        bias: bc.addr(),
        ..args
    };
    unsafe { cpu.layer_norm_joint(&args).unwrap() };
    (got, download(&*cpu, &oc), secs)
}

#[test]
fn layer_norm_joint_matches_cpu() {
    for d in op_devices() {
        // The tiny model's upscaling norm is 24*16*8*8 = 24,576 values.
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
                    let (got, want, _) =
                        joint_case(&*d.backend, d.dtype(), batch, n, act, in_place, next_seed());
                    check(
                        &got,
                        &want,
                        d.tol(),
                        &format!(
                            "{} layer_norm_joint b{batch} n{n} {act:?} in_place {in_place}",
                            d.label
                        ),
                    );
                }
            }
        }
    }
    for dt in [DType::F32, DType::BF16] {
        let seed = next_seed();
        schedule_identity(dt, "layer_norm_joint", |be| {
            joint_case(be, dt, 2, 3 * 8192 + 16, Act::Gelu, true, seed).0
        });
    }
}

/// The full-size decoder norm: n = 192*16*32*32 = 3,145,728 values per sample, batch 2, in f32
/// and bf16 (in place, GELU, as the model runs it), with the emulator time.
#[test]
fn layer_norm_joint_full_size() {
    let n = 192 * 16 * 32 * 32;
    for d in op_devices() {
        let dt = d.dtype();
        if dt == DType::F16 {
            continue; // f32 and bf16 are the model's precisions; f16 is covered above
        }
        let (got, want, secs) = joint_case(&*d.backend, dt, 2, n, Act::Gelu, true, next_seed());
        check(
            &got,
            &want,
            d.tol(),
            &format!(
                "{} layer_norm_joint full size 2 x {n} ({secs:.2} s on the device)",
                d.label
            ),
        );
    }
}

// ------------------------------------------------------------------------------------------------
// conv_transpose3d_k2s2
// ------------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
/// One conv case; `offset` > 0 puts x and out that many elements into their buffers
/// (unaligned: element-wise loads and single-element stores).
fn conv_case(
    be: &dyn Backend,
    dt: DType,
    batch: usize,
    cin: usize,
    cout: usize,
    dims: [usize; 3],
    cl: bool,
    act: Act,
    offset: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let vox: usize = dims.iter().product();
    let x = random(batch * cin * vox, 1.0, seed);
    let w = random(cin * cout * 8, 1.0 / (cin as f32).sqrt().max(1.0), seed ^ 1);
    let b = random(cout, 0.5, seed ^ 2);
    let mut xo = vec![0.5f32; offset];
    xo.extend(&x);
    let (xd, wd, bd) = (upload(be, &xo, dt), upload(be, &w, dt), upload(be, &b, dt));
    let n_out = batch * cout * 8 * vox;
    let od = poisoned(be, n_out + offset, dt);
    let args = ConvT3dArgs {
        x: xd.at(offset),
        out: od.at(offset),
        weight: wd.addr(),
        bias: bd.addr(),
        batch,
        cin,
        cout,
        dims,
        channels_last_input: cl,
        act,
    };
    unsafe { be.conv_transpose3d_k2s2(&args).unwrap() };
    let all = download(be, &od);
    assert!(
        all[..offset].iter().all(|v| v.is_nan()),
        "conv wrote before its output"
    );
    let got = all[offset..].to_vec();
    let cpu = cpu();
    let (xc, wc, bc) = (
        cpu_buf(&*cpu, &rounded(&x, dt)),
        cpu_buf(&*cpu, &rounded(&w, dt)),
        cpu_buf(&*cpu, &rounded(&b, dt)),
    );
    let oc = poisoned(&*cpu, n_out, DType::F32);
    let args = ConvT3dArgs {
        x: xc.addr(),
        out: oc.addr(),
        weight: wc.addr(),
        bias: bc.addr(),
        ..args
    };
    unsafe { cpu.conv_transpose3d_k2s2(&args).unwrap() };
    (got, download(&*cpu, &oc))
}

#[test]
fn conv_transpose_matches_cpu() {
    for d in op_devices() {
        let dt = d.dtype();
        // (batch, cin, cout, dims, act, offset of x and out in elements)
        let cases: [(usize, usize, usize, [usize; 3], Act, usize); 10] = [
            (2, 7, 5, [3, 2, 5], Act::Gelu, 0),   // odd: element-wise loads
            (1, 33, 3, [2, 9, 7], Act::Relu, 0),  // several K tiles, ragged
            (1, 24, 12, [4, 4, 4], Act::None, 0), // 16-byte loads in both layouts
            (2, 16, 4, [2, 4, 8], Act::Gelu, 0),
            (2, 16, 4, [2, 4, 8], Act::QuickGelu, 1), // unaligned views: scalar loads and stores
            (1, 1, 1, [1, 1, 1], Act::None, 0),
            (1, 0, 3, [2, 2, 2], Act::Gelu, 0), // no input channels: act(bias)
            (1, 64, 40, [3, 5, 8], Act::Relu, 3),
            // The model's second upscaling conv at a quarter of its depth and width:
            // Cin 192 -> Cout 96, several tiles in every direction.
            (1, 192, 96, [4, 8, 8], Act::Gelu, 0),
            // The first one's channels (768 -> 192) on a small grid.
            (1, 768, 192, [1, 4, 16], Act::None, 0),
        ];
        for (batch, cin, cout, dims, act, offset) in cases {
            for cl in [true, false] {
                let t = Instant::now();
                let (got, want) = conv_case(
                    &*d.backend,
                    dt,
                    batch,
                    cin,
                    cout,
                    dims,
                    cl,
                    act,
                    offset,
                    next_seed(),
                );
                check(
                    &got,
                    &want,
                    d.tol(),
                    &format!(
                        "{} conv_transpose b{batch} cin{cin} cout{cout} {dims:?} channels_last {cl} {act:?} offset {offset} ({:.2} s)",
                        d.label,
                        t.elapsed().as_secs_f64()
                    ),
                );
            }
        }
    }
    for dt in [DType::F32, DType::BF16] {
        for cl in [true, false] {
            let seed = next_seed();
            schedule_identity(dt, "conv_transpose3d_k2s2", |be| {
                conv_case(be, dt, 2, 40, 20, [2, 4, 8], cl, Act::Gelu, 0, seed).0
            });
        }
    }
}

// ------------------------------------------------------------------------------------------------
// interp3d
// ------------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn interp_case(
    be: &dyn Backend,
    x_dt: DType,
    out_dt: DType,
    planes: usize,
    src: [usize; 3],
    dst: [usize; 3],
    mode: InterpMode,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let n_in = planes * src.iter().product::<usize>();
    let n_out = planes * dst.iter().product::<usize>();
    let x = random(n_in, 4.0, seed);
    let xd = upload(be, &x, x_dt);
    let od = poisoned(be, n_out, out_dt);
    let args = Interp3dArgs {
        x: xd.addr(),
        x_dtype: x_dt,
        out: od.addr(),
        out_dtype: out_dt,
        planes,
        src,
        dst,
        mode,
    };
    unsafe { be.interp3d(&args).unwrap() };
    let got = download(be, &od);
    let cpu = cpu();
    let xc = cpu_buf(&*cpu, &rounded(&x, x_dt));
    let oc = poisoned(&*cpu, n_out, DType::F32);
    let args = Interp3dArgs {
        x: xc.addr(),
        x_dtype: DType::F32,
        out: oc.addr(),
        out_dtype: DType::F32,
        ..args
    };
    unsafe { cpu.interp3d(&args).unwrap() };
    (got, rounded(&download(&*cpu, &oc), out_dt))
}

/// Interpolation computes exactly the reference's operations, so every dtype pair agrees bit
/// for bit (after the one rounding of the output).
#[test]
fn interp3d_matches_cpu_exactly() {
    let modes = [
        InterpMode::Trilinear,
        InterpMode::NearestExact,
        InterpMode::Nearest,
    ];
    for d in op_devices() {
        let dt = d.dtype();
        let mut pairs = vec![(DType::F32, DType::F32)];
        if dt != DType::F32 {
            pairs.extend([(dt, DType::F32), (DType::F32, dt), (dt, dt)]);
        }
        for mode in modes {
            for &(xt, ot) in &pairs {
                for (planes, src, dst) in [
                    (1, [32, 16, 16], [32, 64, 64]), // the tiny model's final resize
                    (2, [3, 4, 6], [3, 9, 13]),
                    (1, [7, 5, 9], [3, 2, 4]), // downsampling every axis
                    (3, [2, 3, 5], [5, 7, 2]),
                    (1, [1, 1, 1], [2, 3, 129]),
                    (1, [5, 6, 7], [5, 6, 7]), // same size: a copy
                ] {
                    let (got, want) =
                        interp_case(&*d.backend, xt, ot, planes, src, dst, mode, next_seed());
                    check_exact(
                        &got,
                        &want,
                        &format!(
                            "{} interp3d {mode:?} {xt}->{ot} p{planes} {src:?}->{dst:?}",
                            d.label
                        ),
                    );
                }
            }
        }
        // The full-size final resize of one window, storage -> f32 logits.
        let t = Instant::now();
        let (got, want) = interp_case(
            &*d.backend,
            dt,
            DType::F32,
            1,
            [32, 64, 64],
            [32, 256, 256],
            InterpMode::Trilinear,
            next_seed(),
        );
        let secs = t.elapsed().as_secs_f64();
        check_exact(
            &got,
            &want,
            &format!(
                "{} interp3d full-size final resize ({secs:.2} s incl. CPU)",
                d.label
            ),
        );
        // A dtype pair the op does not take.
        let be = &*d.backend;
        let xd = upload(be, &[1.0; 8], DType::F32);
        let od = poisoned(be, 8, DType::F32);
        let args = Interp3dArgs {
            x: xd.addr(),
            x_dtype: DType::U8,
            out: od.addr(),
            out_dtype: DType::F32,
            planes: 1,
            src: [2, 2, 2],
            dst: [2, 2, 2],
            mode: InterpMode::Trilinear,
        };
        assert!(unsafe { be.interp3d(&args) }.is_err());
    }
    for mode in modes {
        let seed = next_seed();
        schedule_identity(DType::BF16, "interp3d", |be| {
            interp_case(
                be,
                DType::BF16,
                DType::F32,
                2,
                [5, 6, 7],
                [9, 13, 4],
                mode,
                seed,
            )
            .0
        });
    }
}
