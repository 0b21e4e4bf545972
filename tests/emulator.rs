//! The host CUDA emulator (docs: emulator.md) through its selftest kernels (kernels/selftest.cu):
//! barriers, shuffles, votes, atomics, shared memory, cp.async, conversions, wmma, mma.sync,
//! planted bugs, schedules and workers; the host GEMM of `EmuDevice`; and the build's embedded
//! kernel table.

mod common;

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};
use segvol::backend::emu::{EmuDevice, EmuOptions, Schedule};
use segvol::backend::kernel::{embedded, Dim3, KernelArgs, KernelDevice};
use segvol::backend::{Act, Buffer, GemmArgs, Residual};
use segvol::dtype::DType;
use segvol::rng::SplitMix64 as Rng;
use segvol::Error;

// ------------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------------

/// The default device for a test: options from the environment (so CI can rerun the suite under
/// another schedule), falling back to the defaults.
fn dev() -> EmuDevice {
    EmuDevice::new().expect("EMU_* environment")
}

fn opts(schedule: Schedule, seed: u64, workers: u32) -> EmuOptions {
    EmuOptions {
        schedule,
        seed,
        workers,
        poison: true,
    }
}

/// Forward, reverse, two random seeds, and 2 workers (random schedule).
fn all_schedules() -> Vec<EmuDevice> {
    vec![
        EmuDevice::with_options(opts(Schedule::Forward, 0, 1)),
        EmuDevice::with_options(opts(Schedule::Reverse, 0, 1)),
        EmuDevice::with_options(opts(Schedule::Random, 1, 1)),
        EmuDevice::with_options(opts(Schedule::Random, 0xC0FFEE, 1)),
        EmuDevice::with_options(opts(Schedule::Random, 7, 2)),
    ]
}

fn up<T: Pod>(d: &EmuDevice, v: &[T]) -> Buffer {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let b = d.alloc(bytes.len()).unwrap();
    unsafe { d.upload(b.addr(), bytes).unwrap() };
    b
}

fn down<T: Pod + Zeroable>(d: &EmuDevice, b: &Buffer, n: usize) -> Vec<T> {
    let mut v = vec![T::zeroed(); n];
    unsafe {
        d.download(b.addr(), bytemuck::cast_slice_mut(&mut v))
            .unwrap()
    };
    v
}

fn launch(
    d: &EmuDevice,
    name: &str,
    grid: Dim3,
    block: Dim3,
    smem: u32,
    args: &mut KernelArgs,
) -> Result<(), Error> {
    unsafe { d.launch(name, grid, block, smem, args) }
}

fn err_msg(r: Result<(), Error>) -> String {
    match r {
        Ok(()) => panic!("the launch should have failed"),
        Err(e @ Error::Device { .. }) => e.to_string(),
        Err(e) => panic!("expected Error::Device, got {e:?}"),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ------------------------------------------------------------------------------------------------
// execution model
// ------------------------------------------------------------------------------------------------

#[test]
fn indices_cover_3d_grids_and_blocks() {
    let d = dev();
    let (grid, block) = ([3u32, 2, 2], [8u32, 4, 2]);
    let total = 12 * 64;
    let out = up(&d, &vec![-1i32; 2 * total]);
    let dims = up(&d, &[0i32; 6]);
    launch(
        &d,
        "sv_selftest_indices",
        grid,
        block,
        0,
        KernelArgs::new().ptr(out.addr()).ptr(dims.addr()),
    )
    .unwrap();
    let o: Vec<i32> = down(&d, &out, 2 * total);
    for g in 0..total {
        assert_eq!(o[2 * g], (g % 64) as i32, "thread index of {g}");
        assert_eq!(o[2 * g + 1], (g / 64) as i32, "block index of {g}");
    }
    assert_eq!(down::<i32>(&d, &dims, 6), vec![3, 2, 2, 8, 4, 2]);
}

fn reverse_case(d: &EmuDevice, n: usize, use_barrier: bool, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let grid = [4u32, 2, 1];
    let blocks = 8;
    let mut rng = Rng(seed);
    let input: Vec<f32> = (0..blocks * n).map(|_| rng.range(-1.0, 1.0)).collect();
    let expected: Vec<f32> = (0..blocks * n)
        .map(|i| input[(i / n) * n + (n - 1 - i % n)])
        .collect();
    let a = up(d, &input);
    let o = up(d, &vec![0f32; blocks * n]);
    launch(
        d,
        "sv_selftest_reverse",
        grid,
        [n as u32, 1, 1],
        0,
        KernelArgs::new()
            .ptr(a.addr())
            .ptr(o.addr())
            .i32(use_barrier as i32),
    )
    .unwrap();
    (down(d, &o, blocks * n), expected)
}

#[test]
fn barrier_block_reversal_under_every_schedule() {
    for d in all_schedules() {
        for n in [1024usize, 256, 33] {
            let (got, want) = reverse_case(&d, n, true, n as u64);
            assert_eq!(bits(&got), bits(&want), "n={n} {:?}", d.options());
        }
    }
}

#[test]
fn planted_race_missing_barrier_is_caught() {
    for d in all_schedules() {
        let (got, want) = reverse_case(&d, 256, false, 5);
        let wrong = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert!(
            wrong >= 8 * 64,
            "a missing __syncthreads went unnoticed under {:?}: only {wrong} of {} wrong",
            d.options(),
            got.len()
        );
    }
}

#[test]
fn syncthreads_count_and_or() {
    let d = dev();
    let n = 100; // three full warps and a partial one
    let blocks = 3;
    let mut rng = Rng(3);
    let mut pred: Vec<i32> = (0..blocks * n)
        .map(|_| (rng.below(3) == 0) as i32 * (1 + rng.below(5) as i32))
        .collect();
    pred[n..2 * n].fill(7); // block 1: all true
    pred[2 * n..].fill(0); // block 2: all false
    let p = up(&d, &pred);
    let o = up(&d, &vec![-1i32; 3 * blocks * n]);
    launch(
        &d,
        "sv_selftest_sync_count",
        [blocks as u32, 1, 1],
        [n as u32, 1, 1],
        0,
        KernelArgs::new().ptr(p.addr()).ptr(o.addr()),
    )
    .unwrap();
    let out: Vec<i32> = down(&d, &o, 3 * blocks * n);
    for b in 0..blocks {
        let count = pred[b * n..(b + 1) * n].iter().filter(|&&x| x != 0).count() as i32;
        for t in 0..n {
            let g = b * n + t;
            assert_eq!(out[3 * g], count, "count, block {b}");
            assert_eq!(out[3 * g + 1], (count == n as i32) as i32, "and, block {b}");
            assert_eq!(out[3 * g + 2], (count > 0) as i32, "or, block {b}");
        }
    }
}

/// The PTX shfl.sync rule: source lane computed inside the caller's width-segment; out-of-segment
/// sources and lanes that do not exist yield the caller's own value.
fn shfl_src(lane: i32, op: usize, b: i32, width: i32, lanes: i32) -> i32 {
    let segmask = 32 - width;
    let lo = lane & segmask;
    let hi = lo | (31 & !segmask);
    let (j, ok) = match op {
        0 => {
            let j = lo | (b & 31 & !segmask);
            (j, j <= hi)
        }
        1 => (lane - b, lane - b >= lo),
        2 => (lane + b, lane + b <= hi),
        _ => {
            let j = lane ^ (b & 31);
            (j, j <= hi)
        }
    };
    if ok && (0..lanes).contains(&j) {
        j
    } else {
        lane
    }
}

fn shuffle_case(d: &EmuDevice, n: usize, src_lane: i32, delta: i32, lane_mask: i32, seed: u64) {
    let blocks = 2;
    let mut rng = Rng(seed);
    let input: Vec<i32> = (0..blocks * n).map(|_| rng.below(2000) as i32).collect();
    let a = up(d, &input);
    let o = up(d, &vec![0i32; 26 * blocks * n]);
    launch(
        d,
        "sv_selftest_shuffle",
        [blocks as u32, 1, 1],
        [n as u32, 1, 1],
        0,
        KernelArgs::new()
            .ptr(a.addr())
            .ptr(o.addr())
            .i32(src_lane)
            .i32(delta)
            .i32(lane_mask),
    )
    .unwrap();
    let out: Vec<i32> = down(d, &o, 26 * blocks * n);
    for g in 0..blocks * n {
        let t = g % n;
        let warp_base = g - t % 32; // global index of lane 0 of this warp
        let lanes = (n - (t / 32) * 32).min(32) as i32;
        let lane = (t % 32) as i32;
        let val = |j: i32| input[warp_base + j as usize];
        let o = &out[26 * g..26 * g + 26];
        let ctx = format!("n={n} thread {t} src={src_lane} delta={delta} mask={lane_mask}");
        for (wi, w) in [32, 16, 8, 4].into_iter().enumerate() {
            for op in 0..4 {
                let b = [src_lane, delta, delta, lane_mask][op];
                let j = shfl_src(lane, op, b, w, lanes);
                assert_eq!(o[wi * 4 + op], val(j), "op {op} width {w} {ctx}");
            }
        }
        let existing = 0..lanes;
        let ballot = existing
            .clone()
            .filter(|&j| val(j) & 1 != 0)
            .fold(0u32, |m, j| m | 1 << j);
        assert_eq!(o[16] as u32, ballot, "ballot {ctx}");
        assert_eq!(
            o[17],
            existing.clone().any(|j| val(j) % 7 == 0) as i32,
            "any {ctx}"
        );
        assert_eq!(
            o[18],
            existing.clone().all(|j| val(j) % 5 != 0) as i32,
            "all {ctx}"
        );
        let active = if lanes == 32 {
            u32::MAX
        } else {
            (1u32 << lanes) - 1
        };
        assert_eq!(o[19] as u32, active, "activemask {ctx}");
        let jx = shfl_src(lane, 3, 1, 32, lanes);
        assert_eq!(
            o[20] as u32,
            (val(jx) as f32 * 0.5).to_bits(),
            "float {ctx}"
        );
        let jd = shfl_src(lane, 2, delta, 32, lanes);
        assert_eq!(
            o[21],
            ((val(jd) as f64 + 0.25) * 4.0) as i32,
            "double {ctx}"
        );
        let sum = existing.clone().map(val).fold(0i32, i32::wrapping_add);
        assert_eq!(o[22], sum, "reduce_add {ctx}");
        assert_eq!(
            o[23],
            existing.clone().map(val).max().unwrap(),
            "reduce_max {ctx}"
        );
        let ji = shfl_src(lane, 0, src_lane, 32, lanes);
        let tid_j = (t / 32 * 32) as i32 + ji;
        assert_eq!(o[24], val(ji) ^ tid_j, "long long {ctx}");
        let jh = shfl_src(lane, 3, 2, 32, lanes);
        let h = f16::from_f32((val(jh) & 1023) as f32).to_bits();
        assert_eq!(o[25] as u16, h, "half {ctx}");
    }
}

#[test]
fn shuffles_and_votes_with_widths() {
    let d = dev();
    shuffle_case(&d, 96, 5, 3, 6, 1);
    shuffle_case(&d, 96, 37, 1, 1, 2); // srcLane wraps modulo 32
    shuffle_case(&d, 64, 30, 9, 17, 3); // xor and down leave 4/8/16-lane segments
    shuffle_case(&d, 48, 3, 2, 5, 4); // a partial warp (16 lanes)
}

#[test]
fn atomics_across_blocks_and_workers() {
    for workers in [1, 2] {
        let d = EmuDevice::with_options(opts(Schedule::Random, 11, workers));
        let (blocks, n) = (8usize, 125usize); // partial warps too
        let total = (blocks * n) as i64;
        let i32s = up(&d, &[0i32, i32::MIN, i32::MAX, 0, -1, 0]);
        let u32s = up(&d, &[u32::MAX, 0, 0, 0, u32::MAX, 0]);
        let u64s = up(&d, &[0u64, 0]);
        let f32s = up(&d, &[0f32, 0.0, 0.0]);
        let f64s = up(&d, &[0f64]);
        let h16 = up(&d, &[0u16, 0]);
        launch(
            &d,
            "sv_selftest_atomics",
            [blocks as u32, 1, 1],
            [n as u32, 1, 1],
            0,
            KernelArgs::new()
                .ptr(i32s.addr())
                .ptr(u32s.addr())
                .ptr(u64s.addr())
                .ptr(f32s.addr())
                .ptr(f64s.addr())
                .ptr(h16.addr()),
        )
        .unwrap();
        let i: Vec<i32> = down(&d, &i32s, 6);
        let u: Vec<u32> = down(&d, &u32s, 6);
        let l: Vec<u64> = down(&d, &u64s, 2);
        let f: Vec<f32> = down(&d, &f32s, 3);
        let x: Vec<f64> = down(&d, &f64s, 1);
        let h: Vec<u16> = down(&d, &h16, 2);
        let gs = 0..total;
        assert_eq!(i[0], total as i32, "atomicAdd int");
        assert_eq!(i[1], total as i32 - 1, "atomicMax int");
        let min = gs.clone().map(|g| (g * 7919) % 1000 - 500).min().unwrap();
        assert_eq!(i[2] as i64, min, "atomicMin int");
        assert_eq!(i[3], 2 * total as i32, "atomicCAS loop");
        assert!(
            (0..total as i32).contains(&i[4]),
            "atomicExch int: {}",
            i[4]
        );
        assert_eq!(i[5], -3 * total as i32, "atomicSub int");
        assert_eq!(u[0], u32::MAX - total as u32, "atomicSub unsigned");
        assert_eq!(u[1], u32::MAX, "atomicOr");
        assert_eq!(
            u[2],
            gs.clone().fold(0u32, |a, g| a ^ g as u32),
            "atomicXor"
        );
        assert_eq!(u[3], total as u32 % 16, "atomicInc");
        assert_eq!(u[4], 0, "atomicAnd");
        assert_eq!(u[5], (total as u32 - 1) * 3, "atomicMax unsigned");
        assert_eq!(l[0], (total as u64) << 33, "atomicAdd u64");
        assert_eq!(l[1], (total as u64 - 1) << 40, "atomicMax u64");
        assert_eq!(f[0], total as f32, "atomicAdd float");
        let half_sum: f32 = gs.clone().map(|g| 0.5 * (g % 3) as f32).sum();
        assert_eq!(f[1], half_sum, "atomicAdd float (exact multiples of 0.5)");
        assert_eq!(f[2], 2.5, "atomicExch float");
        assert_eq!(x[0], (total * (total - 1) / 2) as f64, "atomicAdd double");
        assert_eq!(
            h[0],
            f16::from_f32(total as f32).to_bits(),
            "atomicAdd __half"
        );
        assert_eq!(h[1], bf16::from_f32(256.0).to_bits(), "atomicAdd bf16");
    }
}

#[test]
fn dynamic_shared_memory_is_poisoned_per_block() {
    let d = dev();
    let n = 128usize;
    let o = up(&d, &vec![0f32; 3 * n]);
    let smem = (n * 4) as u32;
    launch(
        &d,
        "sv_selftest_dyn_smem",
        [3, 1, 1],
        [n as u32, 1, 1],
        smem,
        KernelArgs::new().ptr(o.addr()).i32(1),
    )
    .unwrap();
    let got: Vec<f32> = down(&d, &o, 3 * n);
    for (i, v) in got.iter().enumerate() {
        let (b, t) = (i / n, i % n);
        assert_eq!(*v, (n - 1 - t + 1000 * b) as f32);
    }
    // Uninitialised: every read is the 0xff poison (a NaN), in every block, although the previous
    // launch left real values in the buffer.
    launch(
        &d,
        "sv_selftest_dyn_smem",
        [3, 1, 1],
        [n as u32, 1, 1],
        smem,
        KernelArgs::new().ptr(o.addr()).i32(0),
    )
    .unwrap();
    let got: Vec<f32> = down(&d, &o, 3 * n);
    assert!(got.iter().all(|v| v.to_bits() == 0xffff_ffff), "{got:?}");
}

fn cp_async_case(d: &EmuDevice, mode: i32, valid_chunks: usize) -> (Vec<f32>, Vec<f32>) {
    let (blocks, n) = (3usize, 64usize);
    let mut rng = Rng(9);
    let input: Vec<f32> = (0..blocks * 8 * n).map(|_| rng.range(-4.0, 4.0)).collect();
    let a = up(d, &input);
    let o = up(d, &vec![0f32; blocks * 8 * n]);
    launch(
        d,
        "sv_selftest_cp_async",
        [blocks as u32, 1, 1],
        [n as u32, 1, 1],
        (8 * n * 4) as u32,
        KernelArgs::new()
            .ptr(a.addr())
            .ptr(o.addr())
            .i32(mode)
            .i32(valid_chunks as i32),
    )
    .unwrap();
    let mut want = vec![0f32; blocks * 8 * n];
    for b in 0..blocks {
        for t in 0..n {
            for (dst_chunk, src_chunk) in [(t, n - 1 - t), (n + t, 2 * n - 1 - t)] {
                for j in 0..4 {
                    want[b * 8 * n + 4 * dst_chunk + j] = if src_chunk < valid_chunks {
                        input[b * 8 * n + 4 * src_chunk + j]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
    (down(d, &o, blocks * 8 * n), want)
}

#[test]
fn cp_async_groups_zfill_and_missing_wait() {
    for d in all_schedules() {
        let (got, want) = cp_async_case(&d, 0, 128);
        assert_eq!(bits(&got), bits(&want), "one group {:?}", d.options());
        let (got, want) = cp_async_case(&d, 2, 128);
        assert_eq!(bits(&got), bits(&want), "two groups {:?}", d.options());
        let (got, want) = cp_async_case(&d, 2, 77);
        assert_eq!(bits(&got), bits(&want), "zfill {:?}", d.options());
        // Reading the destination without cp.async.wait sees the poisoned shared memory.
        let (got, _) = cp_async_case(&d, 1, 128);
        assert!(got.iter().all(|v| v.is_nan()), "missing wait not caught");
    }
}

// ------------------------------------------------------------------------------------------------
// errors
// ------------------------------------------------------------------------------------------------

#[test]
fn divergent_barrier_is_a_deadlock_error() {
    let d = dev();
    let o = up(&d, &[0i32; 64]);
    let msg = err_msg(launch(
        &d,
        "sv_selftest_bug_divergent_barrier",
        [2, 1, 1],
        [64, 1, 1],
        0,
        KernelArgs::new().ptr(o.addr()),
    ));
    assert!(msg.contains("deadlock"), "{msg}");
    assert!(msg.contains("16 wait in __syncthreads"), "{msg}");
    assert!(msg.contains("48 exited"), "{msg}");
    assert!(msg.starts_with("device emu:"), "{msg}");

    let msg = err_msg(launch(
        &d,
        "sv_selftest_bug_divergent_warp_collective",
        [1, 1, 1],
        [64, 1, 1],
        0,
        KernelArgs::new().ptr(o.addr()),
    ));
    assert!(
        msg.contains("deadlock")
            && msg.contains("32 wait in __syncthreads, 32 in a warp collective"),
        "{msg}"
    );
    // The device stays usable after an aborted launch.
    let (got, want) = reverse_case(&d, 64, true, 1);
    assert_eq!(bits(&got), bits(&want));
}

#[test]
fn exited_lanes_may_be_named_in_full_masks() {
    for d in all_schedules() {
        let n = 64usize;
        let o = up(&d, &vec![-7i32; 5 * n]);
        launch(
            &d,
            "sv_selftest_exited_lanes",
            [1, 1, 1],
            [n as u32, 1, 1],
            0,
            KernelArgs::new().ptr(o.addr()),
        )
        .unwrap();
        let out: Vec<i32> = down(&d, &o, 5 * n);
        for t in 0..n {
            let lane = (t % 32) as i32;
            let got = &out[5 * t..5 * t + 5];
            if lane >= 20 {
                assert!(
                    got.iter().all(|&v| v == -7),
                    "exited lane {t} wrote {got:?}"
                );
                continue;
            }
            let down = if lane + 4 < 20 { lane + 4 } else { lane };
            let want = [10 * (lane ^ 1), 0xaaaaa, 0xfffff, (0..20).sum(), down];
            assert_eq!(got, want, "thread {t} {:?}", d.options());
        }
    }
}

#[test]
fn failed_device_assert_is_an_error() {
    let d = dev();
    let o = up(&d, &[0i32; 32]);
    launch(
        &d,
        "sv_selftest_assert",
        [1, 1, 1],
        [32, 1, 1],
        0,
        KernelArgs::new().ptr(o.addr()).i32(2),
    )
    .unwrap();
    assert_eq!(down::<i32>(&d, &o, 32), vec![2; 32]);
    let msg = err_msg(launch(
        &d,
        "sv_selftest_assert",
        [2, 1, 1],
        [32, 1, 1],
        0,
        KernelArgs::new().ptr(o.addr()).i32(3),
    ));
    assert!(
        msg.contains("assertion `v != 3` failed at") && msg.contains("selftest.cu"),
        "{msg}"
    );
    assert!(
        msg.contains("kernel `sv_selftest_assert`, block (0,0,0), thread (0,0,0)"),
        "{msg}"
    );
}

#[test]
fn partial_mask_is_an_error() {
    let d = dev();
    let o = up(&d, &[0i32; 32]);
    let msg = err_msg(launch(
        &d,
        "sv_selftest_bug_partial_mask",
        [1, 1, 1],
        [32, 1, 1],
        0,
        KernelArgs::new().ptr(o.addr()),
    ));
    assert!(msg.contains("partial-warp masks are not emulated"), "{msg}");
    assert!(msg.contains("sv_selftest_bug_partial_mask"), "{msg}");
}

#[test]
fn launch_errors_are_clear() {
    let d = dev();
    let o = up(&d, &[0i32; 2048]);
    let dims = up(&d, &[0i32; 6]);
    let mut args = KernelArgs::new();
    args.ptr(o.addr()).ptr(dims.addr());
    let msg = err_msg(launch(
        &d,
        "sv_no_such_kernel",
        [1, 1, 1],
        [1, 1, 1],
        0,
        &mut args,
    ));
    assert!(msg.contains("unknown kernel `sv_no_such_kernel`"), "{msg}");
    let msg = err_msg(launch(
        &d,
        "sv_selftest_indices",
        [1, 1, 1],
        [1025, 1, 1],
        0,
        &mut args,
    ));
    assert!(
        msg.contains("invalid launch configuration") && msg.contains("1025"),
        "{msg}"
    );
    let msg = err_msg(launch(
        &d,
        "sv_selftest_indices",
        [1, 1, 1],
        [32, 32, 2],
        0,
        &mut args,
    ));
    assert!(msg.contains("invalid launch configuration"), "{msg}");
    let msg = err_msg(launch(
        &d,
        "sv_selftest_indices",
        [0, 1, 1],
        [32, 1, 1],
        0,
        &mut args,
    ));
    assert!(msg.contains("grid (0,1,1)"), "{msg}");
    let msg = err_msg(launch(
        &d,
        "sv_selftest_indices",
        [1, 1, 1],
        [32, 1, 1],
        300_000,
        &mut args,
    ));
    assert!(msg.contains("dynamic shared memory"), "{msg}");
    // A wrong argument list: with nvcc's PTX in the build, refused before the launch by the
    // prototype check (count and kind); without it, the emulator counts the parameters.
    let short = launch(
        &d,
        "sv_selftest_indices",
        [1, 1, 1],
        [32, 1, 1],
        0,
        KernelArgs::new().ptr(o.addr()),
    );
    if segvol::backend::kernel::embedded::BUILT_WITH_KERNELS {
        let internal = |r: Result<(), Error>| match r {
            Err(Error::Internal(m)) => m,
            other => panic!("expected the prototype check's Error::Internal, got {other:?}"),
        };
        let msg = internal(short);
        assert!(
            msg.contains(
                "`sv_selftest_indices` launched with 1 arguments `l` but its PTX declares 2 `ll`"
            ),
            "{msg}"
        );
        // The right count with a 4-byte integer where the kernel takes a pointer.
        let msg = internal(launch(
            &d,
            "sv_selftest_indices",
            [1, 1, 1],
            [32, 1, 1],
            0,
            KernelArgs::new().ptr(o.addr()).i32(7),
        ));
        assert!(msg.contains("`lw`") && msg.contains("`ll`"), "{msg}");
    } else {
        let msg = err_msg(short);
        assert!(
            msg.contains("takes 2 parameters, the launch passed 1"),
            "{msg}"
        );
    }
    let msg = err_msg(launch(
        &d,
        "sv_selftest_dup",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &mut args,
    ));
    assert!(
        msg.contains("`sv_selftest_dup` is registered 2 times"),
        "{msg}"
    );
    assert!(msg.contains("selftest.cu:"), "{msg}");
    // Still fine afterwards, on the same thread.
    launch(
        &d,
        "sv_selftest_indices",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &mut args,
    )
    .unwrap();
}

#[test]
fn options_parse() {
    assert_eq!(Schedule::parse("reverse"), Some(Schedule::Reverse));
    assert_eq!(Schedule::parse("random"), Some(Schedule::Random));
    assert_eq!(Schedule::parse("backwards"), None);
    let d = EmuDevice::with_options(opts(Schedule::Random, 3, 0));
    assert_eq!(d.options().workers, 1, "workers are at least 1");
    assert_eq!(d.name(), "emu");
}

// ------------------------------------------------------------------------------------------------
// determinism, common.cuh, concurrency
// ------------------------------------------------------------------------------------------------

/// Runs one of the softmax probes; returns (y as f32, stats).
fn softmax_case(
    d: &EmuDevice,
    dt: DType,
    rows: usize,
    cols: usize,
    act: Act,
    x: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (name, block) = match dt {
        DType::F32 => ("sv_selftest_softmax_f32", 256),
        DType::BF16 => ("sv_selftest_softmax_bf16", 256),
        _ => ("sv_selftest_softmax_f16_w32", 32),
    };
    let xb = up(d, &segvol::dtype::encode_f32(x, dt));
    let yb = d.alloc(rows * cols * dt.size()).unwrap();
    let sb = up(d, &vec![0f32; 2 * rows]);
    launch(
        d,
        name,
        [rows as u32, 1, 1],
        [block, 1, 1],
        0,
        KernelArgs::new()
            .ptr(xb.addr())
            .ptr(yb.addr())
            .ptr(sb.addr())
            .i32(cols as i32)
            .i32(act.code()),
    )
    .unwrap();
    let y: Vec<u8> = down(d, &yb, rows * cols * dt.size());
    (segvol::dtype::decode_f32(&y, dt), down(d, &sb, 2 * rows))
}

#[test]
fn schedules_and_workers_give_bit_identical_results() {
    let (rows, cols) = (37usize, 1000usize);
    let mut rng = Rng(21);
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.range(-6.0, 6.0)).collect();
    for (dt, act) in [
        (DType::F32, Act::Gelu),
        (DType::BF16, Act::QuickGelu),
        (DType::F16, Act::Relu),
    ] {
        let runs: Vec<_> = all_schedules()
            .iter()
            .map(|d| softmax_case(d, dt, rows, cols, act, &x))
            .collect();
        for r in &runs[1..] {
            assert_eq!(
                bits(&r.0),
                bits(&runs[0].0),
                "{dt} outputs differ between schedules"
            );
            assert_eq!(
                bits(&r.1),
                bits(&runs[0].1),
                "{dt} stats differ between schedules"
            );
        }
        // And the values are right.
        let xs = segvol::dtype::round_through(&x, dt);
        for r in 0..rows {
            let row = &xs[r * cols..(r + 1) * cols];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
            for (c, &xv) in row.iter().enumerate() {
                let want = act.apply((((xv - m) as f64).exp() / s) as f32);
                let got = runs[0].0[r * cols + c];
                // One rounding to the storage dtype (f16 subnormals below 6e-5).
                let tol = match dt {
                    DType::F32 => 1e-5 * want.abs() + 1e-9,
                    DType::BF16 => 2f32.powi(-8) * want.abs() + 1e-9,
                    _ => 2f32.powi(-10) * want.abs() + 6e-8,
                };
                assert!(
                    (got - want).abs() <= tol,
                    "{dt} row {r} col {c}: {got} vs {want}"
                );
            }
            let mean: f64 = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let msq: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            assert!(
                (runs[0].1[2 * r] as f64 - mean).abs() < 1e-5,
                "mean row {r}"
            );
            assert!(
                (runs[0].1[2 * r + 1] as f64 - msq).abs() < 1e-4 * msq,
                "mean sq row {r}"
            );
        }
    }
}

#[test]
fn act_codes_match_act_apply() {
    let d = dev();
    let mut rng = Rng(4);
    let mut x: Vec<f32> = (0..20_000).map(|_| rng.range(-10.0, 10.0)).collect();
    x.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        50.0,
        -50.0,
        88.0,
        -88.0,
        f32::MAX,
        f32::MIN,
    ]);
    let n = x.len();
    let xb = up(&d, &x);
    let yb = up(&d, &vec![0f32; n]);
    for act in [Act::None, Act::Gelu, Act::Relu, Act::QuickGelu] {
        launch(
            &d,
            "sv_selftest_act",
            [n.div_ceil(256) as u32, 1, 1],
            [256, 1, 1],
            0,
            KernelArgs::new()
                .ptr(xb.addr())
                .ptr(yb.addr())
                .i32(n as i32)
                .i32(act.code()),
        )
        .unwrap();
        let y: Vec<f32> = down(&d, &yb, n);
        for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
            let want = act.apply(xi);
            // Two correct erff (glibc here, musl in Act::apply) differ by an ulp of erf, which
            // 0.5 x (1 + erf) carries into the result unreduced where 1 + erf cancels.
            let erf_ulp = if act == Act::Gelu {
                0.5 * xi.abs() * 2.0 * f32::EPSILON
            } else {
                0.0
            };
            let tol = 4.0 * f32::EPSILON * want.abs() + erf_ulp + 1e-37;
            assert!(
                (yi - want).abs() <= tol || yi.to_bits() == want.to_bits(),
                "{act:?}({xi}) = {yi}, Act::apply gives {want} (#{i})"
            );
        }
    }
}

#[test]
fn concurrent_launches_from_several_threads() {
    let (rows, cols) = (16usize, 700usize);
    let inputs: Vec<Vec<f32>> = (0..4)
        .map(|t| {
            let mut rng = Rng(100 + t);
            (0..rows * cols).map(|_| rng.range(-3.0, 3.0)).collect()
        })
        .collect();
    let single: Vec<_> = inputs
        .iter()
        .map(|x| softmax_case(&dev(), DType::F32, rows, cols, Act::Gelu, x).0)
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(t, x)| {
                s.spawn(move || {
                    let d = EmuDevice::with_options(opts(
                        Schedule::Random,
                        t as u64,
                        1 + (t as u32 % 2),
                    ));
                    (0..5)
                        .map(|_| softmax_case(&d, DType::F32, rows, cols, Act::Gelu, x).0)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            for r in h.join().unwrap() {
                assert_eq!(bits(&r), bits(&single[t]), "thread {t}");
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------
// half / bf16
// ------------------------------------------------------------------------------------------------

fn to_float(d: &EmuDevice, v: &[u16], bf: bool) -> Vec<f32> {
    let a = up(d, v);
    let o = d.alloc(v.len() * 4).unwrap();
    launch(
        d,
        "sv_selftest_to_float",
        [64, 1, 1],
        [256, 1, 1],
        0,
        KernelArgs::new()
            .ptr(a.addr())
            .ptr(o.addr())
            .i32(v.len() as i32)
            .i32(bf as i32),
    )
    .unwrap();
    down(d, &o, v.len())
}

fn from_float(d: &EmuDevice, v: &[f32], bf: bool) -> Vec<u16> {
    let a = up(d, v);
    let o = d.alloc(v.len() * 2).unwrap();
    launch(
        d,
        "sv_selftest_from_float",
        [64, 1, 1],
        [256, 1, 1],
        0,
        KernelArgs::new()
            .ptr(a.addr())
            .ptr(o.addr())
            .i32(v.len() as i32)
            .i32(bf as i32),
    )
    .unwrap();
    down(d, &o, v.len())
}

/// CUDA's host conversion: RNE, any NaN -> 0x7fff.
fn want_from_float(x: f32, bf: bool) -> u16 {
    if x.is_nan() {
        0x7fff
    } else if bf {
        bf16::from_f32(x).to_bits()
    } else {
        f16::from_f32(x).to_bits()
    }
}

fn check_from_float(d: &EmuDevice, xs: &[f32]) {
    for bf in [false, true] {
        let got = from_float(d, xs, bf);
        for (x, g) in xs.iter().zip(&got) {
            let w = want_from_float(*x, bf);
            assert_eq!(
                *g,
                w,
                "float {x:e} ({:#010x}) -> {} {g:#06x}, want {w:#06x}",
                x.to_bits(),
                if bf { "bf16" } else { "half" }
            );
        }
    }
}

#[test]
fn half_and_bf16_to_float_all_65536() {
    let d = dev();
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let h = to_float(&d, &all, false);
    let b = to_float(&d, &all, true);
    for (i, &v) in all.iter().enumerate() {
        let w = f16::from_bits(v).to_f32();
        if w.is_nan() {
            assert_eq!(h[i].to_bits(), 0x7fff_ffff, "half NaN {v:#06x}");
        } else {
            assert_eq!(h[i].to_bits(), w.to_bits(), "half {v:#06x}");
        }
        assert_eq!(b[i].to_bits(), (v as u32) << 16, "bf16 {v:#06x}");
        let wb = bf16::from_bits(v).to_f32();
        assert!(wb.to_bits() == b[i].to_bits() || (wb.is_nan() && b[i].is_nan()));
    }
}

#[test]
fn float_to_half_and_bf16_rounding_sweep() {
    let d = dev();
    let mut xs: Vec<f32> = Vec::new();
    // Around every representable half and bf16 value: the value, the midpoints to its
    // neighbours and one f32 ulp either side of them (the round-to-nearest-even cases).
    for v in 0..=u16::MAX {
        for (lo, hi) in [
            (
                f16::from_bits(v).to_f32(),
                f16::from_bits(v.wrapping_add(1)).to_f32(),
            ),
            (
                bf16::from_bits(v).to_f32(),
                bf16::from_bits(v.wrapping_add(1)).to_f32(),
            ),
        ] {
            if !lo.is_finite() || !hi.is_finite() || (lo < 0.0) != (hi < 0.0) {
                continue;
            }
            let mid = ((lo as f64 + hi as f64) / 2.0) as f32;
            xs.extend([
                lo,
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ]);
        }
    }
    let mut rng = Rng(77);
    xs.extend((0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc0_1234),
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        65504.0,
        65519.996,
        65520.0,
        2.0f32.powi(-24),
        2.0f32.powi(-25),
        f32::from_bits(2.0f32.powi(-25).to_bits() + 1),
        2.0f32.powi(-14),
    ]);
    assert!(xs.len() > 500_000, "{}", xs.len());
    check_from_float(&d, &xs);
}

/// Every f32 (2^32 values; ~4 min of CPU in release): `cargo test --release --test emulator -- --ignored`.
#[test]
#[ignore]
fn float_to_half_and_bf16_all_floats() {
    let d = dev();
    let chunk = 1usize << 24;
    for c in 0..(1usize << 32) / chunk {
        let xs: Vec<f32> = (0..chunk)
            .map(|i| f32::from_bits((c * chunk + i) as u32))
            .collect();
        check_from_float(&d, &xs);
    }
}

#[test]
fn half_and_bf16_arithmetic_is_exact() {
    let d = dev();
    let mut rng = Rng(5);
    let n = 50_000usize;
    for bf in [false, true] {
        // Finite operands, spread over the exponent range of each type.
        let gen = |rng: &mut Rng| loop {
            let b = rng.next_u64() as u16;
            let f = if bf {
                bf16::from_bits(b).to_f32()
            } else {
                f16::from_bits(b).to_f32()
            };
            if f.is_finite() && (bf || f.abs() < 3000.0) {
                return b;
            }
        };
        let a: Vec<u16> = (0..n).map(|_| gen(&mut rng)).collect();
        let b: Vec<u16> = (0..n).map(|_| gen(&mut rng)).collect();
        let ab = up(&d, &a);
        let bb = up(&d, &b);
        let o = d.alloc(2 * n).unwrap();
        for op in 0..6 {
            launch(
                &d,
                "sv_selftest_half_arith",
                [32, 1, 1],
                [256, 1, 1],
                0,
                KernelArgs::new()
                    .ptr(ab.addr())
                    .ptr(bb.addr())
                    .ptr(o.addr())
                    .i32(n as i32)
                    .i32(op)
                    .i32(bf as i32),
            )
            .unwrap();
            let got: Vec<u16> = down(&d, &o, n);
            for i in 0..n {
                let want: f32 = if bf {
                    let (x, y) = (bf16::from_bits(a[i]), bf16::from_bits(b[i]));
                    match op {
                        0 => x + y,
                        1 => x - y,
                        2 => x * y,
                        3 => x / y,
                        4 => x * y + x,
                        _ => x.max(y),
                    }
                    .to_f32()
                } else {
                    let (x, y) = (f16::from_bits(a[i]), f16::from_bits(b[i]));
                    match op {
                        0 => x + y,
                        1 => x - y,
                        2 => x * y,
                        3 => x / y,
                        4 => x * y + x,
                        _ => x.max(y),
                    }
                    .to_f32()
                };
                let g = if bf {
                    bf16::from_bits(got[i]).to_f32()
                } else {
                    f16::from_bits(got[i]).to_f32()
                };
                if want.is_nan() {
                    assert_eq!(
                        got[i], 0x7fff,
                        "op {op} bf={bf} #{i}: NaN must be canonical"
                    );
                } else if op == 5 {
                    assert_eq!(g, want, "max bf={bf} #{i}");
                } else {
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "op {op} bf={bf} #{i}: {:#06x} {:#06x}",
                        a[i],
                        b[i]
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// wmma and mma.sync
// ------------------------------------------------------------------------------------------------

/// Row-major reference `A (m x k) @ B (k x n)` in f64, from values already in the input dtype.
fn matmul_ref(a: &[f32], b_kn: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    common::reference::gemm(
        &common::reference::Gemm {
            batch: 1,
            m,
            n,
            k,
            a,
            lda: k,
            batch_stride_a: 0,
            b: b_kn,
            ldb: n,
            batch_stride_b: 0,
            b_trans: false,
            ldc: n,
            batch_stride_c: 0,
            alpha: 1.0,
            bias: None,
            act: Act::None,
            residual: None,
        },
        &mut c,
    );
    c
}

fn assert_gemm_close(
    got: &[f32],
    want: &[f64],
    a: &[f32],
    b_kn: &[f32],
    (m, n, k): (usize, usize, usize),
    what: &str,
) {
    for i in 0..m {
        for j in 0..n {
            // f32 accumulation: error bound relative to sum |a||b|.
            let mag: f64 = (0..k)
                .map(|p| (a[i * k + p] as f64 * b_kn[p * n + j] as f64).abs())
                .sum();
            let e = (got[i * n + j] as f64 - want[i * n + j]).abs();
            assert!(
                e <= 1e-6 * mag + 1e-30,
                "{what} C[{i}][{j}] = {} want {}",
                got[i * n + j],
                want[i * n + j]
            );
        }
    }
}

#[test]
fn wmma_gemm_f16_and_bf16() {
    let (m, n, k) = (32usize, 48usize, 64usize);
    for dt in [DType::F16, DType::BF16] {
        let mut rng = Rng(31);
        let a = segvol::dtype::round_through(
            &(0..m * k).map(|_| rng.range(-2.0, 2.0)).collect::<Vec<_>>(),
            dt,
        );
        let bt = segvol::dtype::round_through(
            &(0..n * k).map(|_| rng.range(-2.0, 2.0)).collect::<Vec<_>>(),
            dt,
        );
        let b_kn: Vec<f32> = (0..k * n).map(|i| bt[(i % n) * k + i / n]).collect();
        let alpha = 0.375f32;
        let want: Vec<f64> = matmul_ref(&a, &b_kn, m, n, k)
            .iter()
            .map(|v| v * alpha as f64)
            .collect();
        for d in all_schedules() {
            let ab = up(&d, &segvol::dtype::encode_f32(&a, dt));
            let bb = up(&d, &segvol::dtype::encode_f32(&bt, dt));
            let cb = d.alloc(m * n * 4).unwrap();
            let name = if dt == DType::F16 {
                "sv_selftest_wmma_f16"
            } else {
                "sv_selftest_wmma_bf16"
            };
            launch(
                &d,
                name,
                [(n / 16) as u32, (m / 16) as u32, 1],
                [32, 1, 1],
                0,
                KernelArgs::new()
                    .ptr(ab.addr())
                    .ptr(bb.addr())
                    .ptr(cb.addr())
                    .i32(n as i32)
                    .i32(k as i32)
                    .f32(alpha),
            )
            .unwrap();
            let got: Vec<f32> = down(&d, &cb, m * n);
            let scaled_a: Vec<f32> = a.iter().map(|v| v * alpha).collect();
            assert_gemm_close(&got, &want, &scaled_a, &b_kn, (m, n, k), name);
        }
    }
}

#[test]
fn mma_sync_m16n8k16_gemm_with_ldmatrix_and_cp_async() {
    let (m, n, k) = (32usize, 24usize, 48usize);
    for dt in [DType::BF16, DType::F16] {
        for b_kn_layout in [false, true] {
            let mut rng = Rng(41 + b_kn_layout as u64);
            let a = segvol::dtype::round_through(
                &(0..m * k).map(|_| rng.range(-2.0, 2.0)).collect::<Vec<_>>(),
                dt,
            );
            let b_kn = segvol::dtype::round_through(
                &(0..k * n).map(|_| rng.range(-2.0, 2.0)).collect::<Vec<_>>(),
                dt,
            );
            // Stored as (N x K) for the ldmatrix path, as (K x N) for the .trans path.
            let stored: Vec<f32> = if b_kn_layout {
                b_kn.clone()
            } else {
                (0..n * k).map(|i| b_kn[(i % k) * n + i / k]).collect()
            };
            let want = matmul_ref(&a, &b_kn, m, n, k);
            let name = if dt == DType::BF16 {
                "sv_selftest_mma_bf16"
            } else {
                "sv_selftest_mma_f16"
            };
            for d in all_schedules() {
                let ab = up(&d, &segvol::dtype::encode_f32(&a, dt));
                let bb = up(&d, &segvol::dtype::encode_f32(&stored, dt));
                let cb = d.alloc(m * n * 4).unwrap();
                launch(
                    &d,
                    name,
                    [(n / 8) as u32, (m / 16) as u32, 1],
                    [32, 1, 1],
                    0,
                    KernelArgs::new()
                        .ptr(ab.addr())
                        .ptr(bb.addr())
                        .ptr(cb.addr())
                        .i32(n as i32)
                        .i32(k as i32)
                        .i32(b_kn_layout as i32),
                )
                .unwrap();
                let got: Vec<f32> = down(&d, &cb, m * n);
                assert_gemm_close(
                    &got,
                    &want,
                    &a,
                    &b_kn,
                    (m, n, k),
                    &format!("{name} b_kn={b_kn_layout}"),
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// host GEMM
// ------------------------------------------------------------------------------------------------

struct GemmCase {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    b_trans: bool,
    broadcast_b: bool,
    bias: bool,
    act: Act,
    residual: Option<bool>, // Some(true): residual aliases C
    alpha: f32,
}

/// Runs `EmuDevice::gemm` on pseudo-random data of `dt` and checks it against a naive reference
/// computed in f64 from the same (rounded) inputs.
fn gemm_case(c: &GemmCase, dt: DType, seed: u64) {
    let d = dev();
    let mut rng = Rng(seed);
    let mut rand = |len: usize| -> Vec<f32> {
        segvol::dtype::round_through(
            &(0..len).map(|_| rng.range(-1.5, 1.5)).collect::<Vec<_>>(),
            dt,
        )
    };
    let (b_rows, b_cols) = if c.b_trans { (c.n, c.k) } else { (c.k, c.n) };
    let sa = c.m * c.lda;
    let sb = if c.broadcast_b { 0 } else { b_rows * c.ldb };
    let sc = c.m * c.ldc + 3;
    let a = rand(c.batch * sa);
    let b = rand(c.batch.max(1) * b_rows * c.ldb);
    let bias = rand(c.n);
    let c0 = rand(c.batch * sc); // initial C (the residual when it aliases C)
    let r_sep = rand(c.batch * sc);
    let ab = up(&d, &segvol::dtype::encode_f32(&a, dt));
    let bb = up(&d, &segvol::dtype::encode_f32(&b, dt));
    let biasb = up(&d, &segvol::dtype::encode_f32(&bias, dt));
    let cb = up(&d, &segvol::dtype::encode_f32(&c0, dt));
    let rb = up(&d, &segvol::dtype::encode_f32(&r_sep, dt));
    let residual = c.residual.map(|alias| Residual {
        addr: if alias { cb.addr() } else { rb.addr() },
        ld: c.ldc,
        batch_stride: sc,
    });
    let args = GemmArgs {
        batch: c.batch,
        m: c.m,
        n: c.n,
        k: c.k,
        a: ab.addr(),
        lda: c.lda,
        batch_stride_a: sa,
        b: bb.addr(),
        ldb: c.ldb,
        batch_stride_b: sb,
        b_trans: c.b_trans,
        c: cb.addr(),
        ldc: c.ldc,
        batch_stride_c: sc,
        alpha: c.alpha,
        bias: c.bias.then(|| biasb.addr()),
        act: c.act,
        residual,
    };
    unsafe { d.gemm(&args, dt).unwrap() };
    let got = segvol::dtype::decode_f32(&down::<u8>(&d, &cb, c.batch * sc * dt.size()), dt);
    let _ = b_cols;
    for bi in 0..c.batch {
        for i in 0..c.m {
            for j in 0..c.n {
                let mut acc = 0f64;
                let mut mag = 0f64;
                for p in 0..c.k {
                    let av = a[bi * sa + i * c.lda + p] as f64;
                    let bv = if c.b_trans {
                        b[bi * sb + j * c.ldb + p]
                    } else {
                        b[bi * sb + p * c.ldb + j]
                    } as f64;
                    acc += av * bv;
                    mag += (av * bv).abs();
                }
                let mut x = c.alpha as f64 * acc;
                if c.bias {
                    x += bias[j] as f64;
                }
                let mut y = c.act.apply(x as f32) as f64;
                let idx = bi * sc + i * c.ldc + j;
                if let Some(alias) = c.residual {
                    y += if alias { c0[idx] } else { r_sep[idx] } as f64;
                }
                let g = got[idx] as f64;
                // f32 accumulation error, the activation's slope (<= 1.13), and one rounding
                // to the storage dtype.
                let unit = match dt {
                    DType::F32 => f32::EPSILON as f64,
                    DType::F16 => 2f64.powi(-10),
                    _ => 2f64.powi(-7),
                };
                let tol = 2e-6 * (c.alpha.abs() as f64 * mag + 1.0) + unit * y.abs() + 1e-30;
                assert!(
                    (g - y).abs() <= tol,
                    "{dt} batch {bi} C[{i}][{j}] = {g}, want {y} (tol {tol})"
                );
            }
        }
        // Padding between rows and after the batch stays untouched.
        for i in 0..c.m {
            for j in c.n..c.ldc {
                let idx = bi * sc + i * c.ldc + j;
                assert_eq!(
                    got[idx].to_bits(),
                    c0[idx].to_bits(),
                    "padding C[{i}][{j}] written"
                );
            }
        }
    }
}

#[test]
fn host_gemm_f32_matches_naive_reference() {
    let cases = [
        GemmCase {
            batch: 1,
            m: 37,
            n: 29,
            k: 53,
            lda: 53,
            ldb: 29,
            ldc: 29,
            b_trans: false,
            broadcast_b: false,
            bias: false,
            act: Act::None,
            residual: None,
            alpha: 1.0,
        },
        GemmCase {
            batch: 3,
            m: 20,
            n: 33,
            k: 17,
            lda: 19,
            ldb: 21,
            ldc: 40,
            b_trans: true,
            broadcast_b: true,
            bias: true,
            act: Act::Gelu,
            residual: Some(true),
            alpha: 0.5,
        },
        GemmCase {
            batch: 2,
            m: 64,
            n: 48,
            k: 96,
            lda: 100,
            ldb: 50,
            ldc: 48,
            b_trans: false,
            broadcast_b: false,
            bias: true,
            act: Act::QuickGelu,
            residual: Some(false),
            alpha: -1.25,
        },
        GemmCase {
            batch: 1,
            m: 130,
            n: 150,
            k: 70,
            lda: 70,
            ldb: 70,
            ldc: 150,
            b_trans: true,
            broadcast_b: false,
            bias: true,
            act: Act::Relu,
            residual: None,
            alpha: 2.0,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        gemm_case(c, DType::F32, 1000 + i as u64);
    }
}

#[test]
fn host_gemm_bf16_and_f16_match_naive_reference() {
    let cases = [
        GemmCase {
            batch: 2,
            m: 31,
            n: 40,
            k: 64,
            lda: 64,
            ldb: 64,
            ldc: 44,
            b_trans: true,
            broadcast_b: false,
            bias: true,
            act: Act::Gelu,
            residual: Some(true),
            alpha: 1.0,
        },
        GemmCase {
            batch: 3,
            m: 17,
            n: 25,
            k: 33,
            lda: 35,
            ldb: 27,
            ldc: 25,
            b_trans: false,
            broadcast_b: true,
            bias: false,
            act: Act::None,
            residual: Some(false),
            alpha: 0.125,
        },
        GemmCase {
            batch: 1,
            m: 150,
            n: 130,
            k: 96,
            lda: 96,
            ldb: 96,
            ldc: 130,
            b_trans: true,
            broadcast_b: false,
            bias: true,
            act: Act::QuickGelu,
            residual: None,
            alpha: 1.0,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        gemm_case(c, DType::BF16, 2000 + i as u64);
        gemm_case(c, DType::F16, 3000 + i as u64);
    }
}

#[test]
fn host_gemm_rejects_non_float_dtypes() {
    let d = dev();
    let args = GemmArgs {
        batch: 1,
        m: 1,
        n: 1,
        k: 1,
        a: 0,
        lda: 1,
        batch_stride_a: 0,
        b: 0,
        ldb: 1,
        batch_stride_b: 0,
        b_trans: false,
        c: 0,
        ldc: 1,
        batch_stride_c: 0,
        alpha: 1.0,
        bias: None,
        act: Act::None,
        residual: None,
    };
    let e = unsafe { d.gemm(&args, DType::I32) }.unwrap_err();
    assert!(e.to_string().contains("not a float storage type"), "{e}");
}

// ------------------------------------------------------------------------------------------------
// build products
// ------------------------------------------------------------------------------------------------

/// What build.rs's nvcc lookup sees (toolchain.md §3), evaluated with the build's environment.
fn nvcc_candidate_works() -> Option<String> {
    let mut cands: Vec<std::path::PathBuf> = Vec::new();
    if let Some(p) = option_env!("NVCC") {
        cands.push(p.into());
    }
    for home in [option_env!("CUDA_HOME"), option_env!("CUDA_PATH")]
        .into_iter()
        .flatten()
    {
        cands.push(std::path::Path::new(home).join("bin/nvcc"));
    }
    cands.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cuda/nvidia/cu13/bin/nvcc"));
    if let Some(path) = option_env!("PATH") {
        cands.extend(std::env::split_paths(path).map(|p| p.join("nvcc")));
    }
    cands.push("/usr/local/cuda/bin/nvcc".into());
    cands.into_iter().find_map(|c| {
        let o = std::process::Command::new(&c)
            .arg("--version")
            .output()
            .ok()?;
        o.status.success().then(|| c.display().to_string())
    })
}

#[test]
fn embedded_kernels_agree_with_nvcc_presence() {
    let found = nvcc_candidate_works();
    println!(
        "BUILT_WITH_KERNELS={} NVCC_VERSION={:?} CUDA_ARCH={:?} nvcc={found:?}",
        embedded::BUILT_WITH_KERNELS,
        embedded::NVCC_VERSION,
        embedded::CUDA_ARCH
    );
    assert_eq!(
        embedded::BUILT_WITH_KERNELS,
        found.is_some(),
        "build.rs and this lookup disagree about nvcc (a kernel compile error makes the build \
         fall back to no kernels: see the build warnings)"
    );
    let required = option_env!("REQUIRE_CUDA_KERNELS").is_some_and(|v| !v.is_empty() && v != "0");
    if required && !embedded::BUILT_WITH_KERNELS {
        panic!("REQUIRE_CUDA_KERNELS was set for the build, yet it has no kernels");
    }
    let selftest = embedded::MODULES
        .iter()
        .find(|m| m.name == "selftest")
        .expect("selftest module");
    assert!(selftest.kernels.contains(&"sv_selftest_mma_bf16"));
    assert!(
        !selftest.kernels.contains(&"sv_selftest_dup"),
        "EMU_KERNEL_AS is emulator-only"
    );
    assert_eq!(
        embedded::module_of("sv_selftest_wmma_f16").map(|m| m.name),
        Some("selftest")
    );
    for m in embedded::MODULES {
        if embedded::BUILT_WITH_KERNELS {
            assert!(
                embedded::NVCC_VERSION.contains("release"),
                "{}",
                embedded::NVCC_VERSION
            );
            assert!(
                m.ptx_sm90a
                    .contains(&format!(".target sm_{}", embedded::CUDA_ARCH)),
                "{}",
                m.name
            );
            assert!(m.ptx_sm80.contains(".target sm_80"), "{}", m.name);
            assert_eq!(&m.cubin_sm90a[..4], b"\x7fELF", "{}", m.name);
            for k in m.kernels {
                assert!(
                    m.ptx_sm90a.contains(&format!(".entry {k}(")),
                    "{k} missing from {} PTX",
                    m.name
                );
                assert!(
                    m.ptx_sm80.contains(&format!(".entry {k}(")),
                    "{k} missing from {} sm_80 PTX",
                    m.name
                );
            }
        } else {
            assert!(m.ptx_sm90a.is_empty() && m.ptx_sm80.is_empty() && m.cubin_sm90a.is_empty());
        }
    }
}

#[test]
fn every_listed_kernel_is_registered_in_the_emulator() {
    let registered = EmuDevice::registered_kernels();
    for m in embedded::MODULES {
        for k in m.kernels {
            assert!(
                registered.iter().any(|r| r == k),
                "{k} ({}) is not registered",
                m.name
            );
        }
    }
    assert!(registered.iter().any(|r| r == "sv_selftest_dup"));
}

// ------------------------------------------------------------------------------------------------
// timing (printed, not asserted)
// ------------------------------------------------------------------------------------------------

#[test]
fn timing_probe() {
    let (blocks, threads, iters) = (64u32, 256u32, 16);
    for d in [
        EmuDevice::with_options(opts(Schedule::Forward, 0, 1)),
        EmuDevice::with_options(opts(Schedule::Random, 0, 1)),
        EmuDevice::with_options(opts(Schedule::Forward, 0, 2)),
    ] {
        let o = up(&d, &vec![0f32; blocks as usize]);
        let run = |it: i32| {
            let t = std::time::Instant::now();
            launch(
                &d,
                "sv_selftest_bench",
                [blocks, 1, 1],
                [threads, 1, 1],
                0,
                KernelArgs::new().ptr(o.addr()).i32(it),
            )
            .unwrap();
            t.elapsed().as_secs_f64()
        };
        run(iters);
        let empty = (0..3).map(|_| run(0)).fold(f64::MAX, f64::min);
        let full = (0..3).map(|_| run(iters)).fold(f64::MAX, f64::min);
        let per = (full - empty) / (blocks * threads) as f64 / iters as f64 * 1e9;
        println!(
            "{:?}: launch {blocks}x{threads} with no barrier {:.2} ms ({:.0} ns/thread); \
             {per:.1} ns per thread per (__syncthreads + __shfl_xor)",
            d.options(),
            empty * 1e3,
            empty / (blocks * threads) as f64 * 1e9
        );
    }
}
