//! Parity of the volume kernels (`kernels/volume.cu`, spec §6.2–§6.9) with the CPU backend:
//! every volume op on fresh random volumes of odd sizes, outputs poisoned before the launch,
//! in-place and unaligned (scalar-path) cases, copy_box padding and f16/bf16 destinations, the
//! statistics' error cases, the tiny CT through the pipeline's device steps, and bit-identical
//! results under every emulator schedule.
//!
//! Statistics: the kernels reproduce numpy's float32 summation order, as the CPU reference does,
//! so every field must equal the CPU's bit for bit (the fixtures would accept threshold, mean
//! and std within 1e-6 relative; the differences are printed); the count and percentiles are
//! also checked against a sort of the foreground at the kernel's threshold.

mod common;

use common::parity::*;
use segvol::backend::cpu::volume::percentile_linear;
use segvol::backend::{
    AccumulateArgs, Addr, BBox, Backend, ClipZscoreArgs, CopyBoxArgs, ForegroundStats,
    ShiftScaleArgs,
};
use segvol::dtype::{encode_f32, DType};
use segvol::error::Error;
use segvol::rng::SplitMix64 as Rng;

/// The kernel devices, one per device spec: the volume ops are f32 whatever the storage
/// precision (copy_box takes its destination dtype as an argument and is run in all three).
fn volume_devices() -> Vec<OpDevice> {
    let mut out: Vec<OpDevice> = Vec::new();
    for d in op_devices() {
        let spec = d.label.split(':').next().unwrap_or("").to_string();
        if !out.iter().any(|o| o.label.starts_with(&format!("{spec}:"))) {
            out.push(d);
        }
    }
    out
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

/// A non-integer volume with a positive mean (relative errors stay meaningful).
fn float_volume(n: usize, seed: u64) -> Vec<f32> {
    random(n, 900.0, seed).iter().map(|v| v + 450.0).collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// `x` on the backend at a 16-byte aligned address, or 4 bytes past one (`misalign`: the
/// kernels' scalar path). The buffer must outlive the address.
fn upload_at(b: &dyn Backend, x: &[f32], misalign: bool) -> (DevBuf, Addr) {
    if misalign {
        let mut v = vec![0f32; x.len() + 1];
        v[0] = 7.0;
        v[1..].copy_from_slice(x);
        let d = upload(b, &v, DType::F32);
        let a = d.at(1);
        (d, a)
    } else {
        let d = upload(b, x, DType::F32);
        let a = d.addr();
        (d, a)
    }
}

fn download_at(b: &dyn Backend, addr: Addr, n: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; n * 4];
    unsafe { b.download(addr, &mut bytes).unwrap() };
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn download_bytes(b: &dyn Backend, addr: Addr, n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    unsafe { b.download(addr, &mut bytes).unwrap() };
    bytes
}

fn stats_on(b: &dyn Backend, x: &[f32], dims: [usize; 3], misalign: bool) -> ForegroundStats {
    let (_buf, a) = upload_at(b, x, misalign);
    unsafe { b.foreground_stats(a, dims) }.unwrap()
}

/// The kernel's statistics against the CPU's and against the exact count and percentiles of
/// the foreground at the kernel's own threshold. Returns the relative differences of
/// (threshold, mean, std) from the CPU.
fn check_stats(what: &str, x: &[f32], got: &ForegroundStats, want: &ForegroundStats) -> [f64; 3] {
    let d = [
        rel(got.threshold as f64, want.threshold as f64),
        rel(got.mean as f64, want.mean as f64),
        rel(got.std as f64, want.std as f64),
    ];
    eprintln!(
        "{what}: count {} p {} .. {}; rel diff from cpu: threshold {:.2e} mean {:.2e} std {:.2e}",
        got.count, got.p_lo, got.p_hi, d[0], d[1], d[2],
    );
    assert!(
        d.iter().all(|&e| e <= 1e-6),
        "{what}: {got:?} vs cpu {want:?}"
    );
    // numpy's order on both sides: bit-identical.
    assert_eq!(
        [got.threshold, got.mean, got.std].map(f32::to_bits),
        [want.threshold, want.mean, want.std].map(f32::to_bits),
        "{what}: {got:?} vs cpu {want:?}"
    );
    // Exact: the foreground at the kernel's threshold, sorted.
    let mut f: Vec<f32> = x.iter().copied().filter(|&v| v > got.threshold).collect();
    assert_eq!(got.count, f.len() as u64, "{what}: count");
    f.sort_by(f32::total_cmp);
    let p_lo = percentile_linear(f.len(), 0.05, |k| f[k]);
    let p_hi = percentile_linear(f.len(), 99.95, |k| f[k]);
    assert_eq!(
        (got.p_lo.to_bits(), got.p_hi.to_bits()),
        (p_lo.to_bits(), p_hi.to_bits()),
        "{what}: percentiles {} {} want {p_lo} {p_hi}",
        got.p_lo,
        got.p_hi
    );
    assert_eq!(
        (got.count, got.p_lo.to_bits(), got.p_hi.to_bits()),
        (want.count, want.p_lo.to_bits(), want.p_hi.to_bits()),
        "{what}: count and percentiles"
    );
    d
}

#[test]
fn foreground_stats_match_cpu() {
    let cpu = cpu();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let mut worst = [0f64; 3];
        let cases: Vec<([usize; 3], &str)> = vec![
            ([7, 33, 129], "hu"),
            ([7, 33, 129], "float"),
            ([30, 96, 121], "hu"),
            ([30, 96, 121], "float"),
            // Non-integer over seven decades: any change of the summation order shows.
            ([30, 96, 121], "decades"),
            // Integer, foreground span > the shared-memory histogram: global atomics.
            ([9, 31, 257], "wide"),
            // Integer, span > 2^20: the selection fallback.
            ([9, 31, 257], "huge"),
            ([1, 1, 1], "hu"),
            ([64, 256, 256], "hu"),
        ];
        for (dims, kind) in cases {
            let n: usize = dims.iter().product();
            let seed = next_seed();
            let mut r = Rng(seed);
            let x: Vec<f32> = match kind {
                "hu" if n == 1 => vec![42.0],
                "hu" => hu_volume(n, seed),
                "float" => float_volume(n, seed),
                "decades" => (0..n)
                    .map(|_| {
                        let m = 10f32.powf(r.unit() * 7.0 - 3.0);
                        if r.below(4) == 0 {
                            -m
                        } else {
                            m
                        }
                    })
                    .collect(),
                "wide" => (0..n).map(|_| r.below(100_000) as f32 - 5000.0).collect(),
                _ => (0..n).map(|_| r.below(1 << 22) as f32 - 1000.0).collect(),
            };
            for misalign in [false, true] {
                let what = format!(
                    "{} {dims:?} {kind} misalign={misalign} seed {seed:#x}",
                    dev.label
                );
                if n == 1 {
                    // One voxel is its own mean: nothing above it.
                    let (_buf, a) = upload_at(b, &x, misalign);
                    let e = unsafe { b.foreground_stats(a, dims) }.unwrap_err();
                    assert!(matches!(e, Error::Input(_)), "{what}: {e}");
                    continue;
                }
                let t = std::time::Instant::now();
                let got = stats_on(b, &x, dims, misalign);
                let secs = t.elapsed().as_secs_f64();
                let want = stats_on(cpu.as_ref(), &x, dims, false);
                let d = check_stats(&what, &x, &got, &want);
                eprintln!("{what}: {secs:.3} s on the device");
                for k in 0..3 {
                    worst[k] = worst[k].max(d[k]);
                }
            }
        }
        eprintln!(
            "{}: worst rel diff from cpu: threshold {:.2e} mean {:.2e} std {:.2e}",
            dev.label, worst[0], worst[1], worst[2]
        );
    }
}

#[test]
fn foreground_stats_errors_match_cpu() {
    let cpu = cpu();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let mut r = Rng(next_seed());
        let n = 5 * 7 * 9;
        let dims = [5, 7, 9];
        let mut nan = hu_volume(n, r.next_u64());
        nan[r.below(n as u64) as usize] = f32::NAN;
        let mut inf = float_volume(n, r.next_u64());
        inf[r.below(n as u64) as usize] = f32::NEG_INFINITY;
        let cases: Vec<(&str, Vec<f32>, [usize; 3])> = vec![
            ("constant", vec![2.5; n], dims),
            ("nan", nan, dims),
            ("inf", inf, dims),
            ("empty", vec![1.0], [0, 3, 3]),
        ];
        for (what, x, dims) in cases {
            let (_bd, ad) = upload_at(b, &x, false);
            let (_bc, ac) = upload_at(cpu.as_ref(), &x, false);
            let e = unsafe { b.foreground_stats(ad, dims) }.unwrap_err();
            let w = unsafe { cpu.foreground_stats(ac, dims) }.unwrap_err();
            eprintln!("{} {what}: {e}", dev.label);
            assert!(matches!(e, Error::Input(_)), "{what}: {e:?}");
            assert_eq!(e.to_string(), w.to_string(), "{what}");
        }
        // A single voxel above the mean: both percentiles are that voxel, std 0.
        let x = [0.0f32, 0.0, 0.0, 5.0, 0.0];
        let s = stats_on(b, &x, [1, 1, 5], false);
        assert_eq!(
            (s.count, s.p_lo, s.p_hi, s.mean, s.std),
            (1, 5.0, 5.0, 5.0, 0.0)
        );
    }
}

/// Bit patterns, so NaN poison compares equal to itself.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn clip_zscore_and_shift_scale_match_cpu() {
    let cpu = cpu();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        for n in [1usize, 7, 33, 129, 30 * 96 * 121 + 3] {
            let seed = next_seed();
            let x = float_volume(n, seed);
            let (lo, hi, mean, std) = (-300.5f32, 1100.25, 412.5, 287.3);
            for (misalign, in_place) in [(false, false), (true, false), (false, true), (true, true)]
            {
                let what = format!(
                    "{} n={n} misalign={misalign} in_place={in_place} seed {seed:#x}",
                    dev.label
                );
                let run = |be: &dyn Backend| {
                    let (xb, xa) = upload_at(be, &x, misalign);
                    let ob = poisoned(be, n + 1, DType::F32);
                    let oa = if in_place {
                        xa
                    } else if misalign {
                        ob.at(1)
                    } else {
                        ob.addr()
                    };
                    let args = ClipZscoreArgs {
                        x: xa,
                        out: oa,
                        n,
                        lo,
                        hi,
                        mean,
                        std,
                    };
                    let mm = unsafe { be.clip_zscore(&args) }.unwrap();
                    let z = download_at(be, oa, n);
                    // The min-max step after it, in place or into a second poisoned buffer.
                    let sb = poisoned(be, n + 1, DType::F32);
                    let sa = if in_place {
                        oa
                    } else {
                        sb.at(misalign as usize)
                    };
                    let args = ShiftScaleArgs {
                        x: oa,
                        out: sa,
                        n,
                        sub: mm.0,
                        div: mm.1 - mm.0,
                    };
                    unsafe { be.shift_scale(&args) }.unwrap();
                    let y = download_at(be, sa, n);
                    drop((xb, ob, sb));
                    (mm, z, y)
                };
                let (gmm, gz, gy) = run(b);
                let (wmm, wz, wy) = run(cpu.as_ref());
                // Plain IEEE f32 operations in the same order: bit-exact.
                assert_eq!(
                    (gmm.0.to_bits(), gmm.1.to_bits()),
                    (wmm.0.to_bits(), wmm.1.to_bits()),
                    "{what}: min/max"
                );
                assert_close(&gz, &wz, 0.0, &format!("{what}: clip_zscore"));
                assert_eq!(bits(&gz), bits(&wz), "{what}: clip_zscore bits");
                assert_eq!(bits(&gy), bits(&wy), "{what}: shift_scale bits");
                eprintln!("{what}: clip_zscore, min/max and shift_scale bit-exact (max err 0)");
            }
        }
    }
}

#[test]
fn fill_threshold_divide_match_cpu() {
    let cpu = cpu();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        for n in [1usize, 7, 33, 129, 100_003] {
            let seed = next_seed();
            let x = random(n, 3.0, seed);
            for misalign in [false, true] {
                let what = format!("{} n={n} misalign={misalign} seed {seed:#x}", dev.label);
                let off = misalign as usize;
                let run = |be: &dyn Backend| {
                    // fill
                    let fb = poisoned(be, n + 1, DType::F32);
                    unsafe { be.fill(fb.at(off), n, -1.75) }.unwrap();
                    let f = download_at(be, fb.addr(), n + 1);
                    // threshold_u8 (out offset by one byte when misaligned)
                    let (xb, xa) = upload_at(be, &x, misalign);
                    let ub = upload_bytes(be, &vec![0xffu8; n + 1], n + 1, DType::U8);
                    let ua = ub.addr() + off as u64;
                    unsafe { be.threshold_u8(xa, ua, n, 0.25) }.unwrap();
                    let u = download_bytes(be, ub.addr(), n + 1);
                    // divide_counts: counts 0..3, some zero
                    let cnt: Vec<f32> = (0..n)
                        .map(|i| ((i * 7 + seed as usize) % 4) as f32)
                        .collect();
                    let (cb, ca) = upload_at(be, &cnt, misalign);
                    let ob = poisoned(be, n + 1, DType::F32);
                    let oa = ob.at(off);
                    unsafe { be.divide_counts(xa, ca, oa, n) }.unwrap();
                    let o = download_at(be, oa, n);
                    drop((xb, cb));
                    (f, u, o)
                };
                let (gf, gu, go) = run(b);
                let (wf, wu, wo) = run(cpu.as_ref());
                assert_eq!(
                    bits(&gf),
                    bits(&wf),
                    "{what}: fill (and the poison around it)"
                );
                assert_eq!(gu, wu, "{what}: threshold_u8 (and the byte around it)");
                assert_eq!(bits(&go), bits(&wo), "{what}: divide_counts");
            }
            eprintln!(
                "{}: fill, threshold_u8, divide_counts n={n}: bit-exact",
                dev.label
            );
        }
    }
}

#[test]
fn bbox_above_matches_cpu() {
    let cpu = cpu();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let seed = next_seed();
        let mut r = Rng(seed);
        for (trial, dims) in [[7usize, 33, 129], [30, 96, 121], [13, 29, 37], [1, 1, 5]]
            .into_iter()
            .cycle()
            .take(24)
            .enumerate()
        {
            let n: usize = dims.iter().product();
            // Sparse positives so the boxes vary (density 0: None).
            let density = [0u64, 1, 20, 500][trial % 4];
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    if r.below(1000) < density {
                        r.unit() + 0.01
                    } else {
                        -r.unit()
                    }
                })
                .collect();
            let start = dims.map(|d| r.below(d as u64 / 3 + 1) as usize);
            let extent = [0, 1, 2].map(|a| {
                if trial % 5 == 0 {
                    dims[a] - start[a]
                } else {
                    r.below((dims[a] - start[a]) as u64 + 1) as usize
                }
            });
            let run = |be: &dyn Backend| -> Option<BBox> {
                let (_xb, xa) = upload_at(be, &x, trial % 2 == 1);
                unsafe { be.bbox_above(xa, dims, start, extent, 0.0) }.unwrap()
            };
            let (g, w) = (run(b), run(cpu.as_ref()));
            assert_eq!(
                g, w,
                "{} trial {trial} {dims:?} {start:?}+{extent:?} seed {seed:#x}",
                dev.label
            );
        }
        // Whole-volume box of the realistic-size case (the pipeline's foreground crop).
        let dims = [64usize, 256, 256];
        let n: usize = dims.iter().product();
        let mut x = vec![-1.0f32; n];
        for _ in 0..50 {
            let i = r.below(n as u64) as usize;
            x[i] = 1.0;
        }
        let t = std::time::Instant::now();
        let (_xb, xa) = upload_at(b, &x, false);
        let g = unsafe { b.bbox_above(xa, dims, [0; 3], dims, 0.0) }.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let (_cb, ca) = upload_at(cpu.as_ref(), &x, false);
        let w = unsafe { cpu.bbox_above(ca, dims, [0; 3], dims, 0.0) }.unwrap();
        assert_eq!(g, w, "{} {dims:?} seed {seed:#x}", dev.label);
        eprintln!(
            "{}: bbox_above 24 random boxes exact; {dims:?} {secs:.3} s",
            dev.label
        );
    }
}

/// Whether destination voxel `i` of `dims` lies in the box `[start, start + extent)`.
fn in_box(i: usize, dims: [usize; 3], start: [usize; 3], extent: [usize; 3]) -> bool {
    let p = [
        i / (dims[1] * dims[2]),
        (i / dims[2]) % dims[1],
        i % dims[2],
    ];
    (0..3).all(|a| p[a] >= start[a] && p[a] < start[a] + extent[a])
}

#[test]
fn copy_box_matches_cpu_with_padding_and_dtypes() {
    let cpu = cpu();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let seed = next_seed();
        let mut r = Rng(seed);
        let sdims = [7usize, 33, 129];
        let src = random(sdims.iter().product(), 50.0, r.next_u64());
        let ddims = [9usize, 40, 131];
        let nd: usize = ddims.iter().product();
        for trial in 0..18 {
            let extent = ddims.map(|d| 1 + r.below(d as u64) as usize);
            let dst_start = [0, 1, 2].map(|a| r.below((ddims[a] - extent[a]) as u64 + 1) as usize);
            // Negative, inside and overrunning starts (zero padding).
            let src_start = [0, 1, 2].map(|a| {
                let s = sdims[a] as i64;
                r.below(2 * s as u64 + 1) as i64 - s
            });
            // The CPU's f32 result, poisoned where it does not write.
            let cb = poisoned(cpu.as_ref(), nd, DType::F32);
            let (_cs, csa) = upload_at(cpu.as_ref(), &src, false);
            let args = CopyBoxArgs {
                src: csa,
                src_dims: sdims,
                src_start,
                dst: cb.addr(),
                dst_dtype: DType::F32,
                dst_dims: ddims,
                dst_start,
                extent,
                pad: 0.0,
            };
            unsafe { cpu.copy_box(&args) }.unwrap();
            let want = download_at(cpu.as_ref(), cb.addr(), nd);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let what = format!(
                    "{} {dtype} trial {trial}: src_start {src_start:?} dst_start {dst_start:?} extent {extent:?} seed {seed:#x}",
                    dev.label
                );
                let (_gs, gsa) = upload_at(b, &src, trial % 2 == 1);
                let gb = poisoned(b, nd, dtype);
                let args = CopyBoxArgs {
                    src: gsa,
                    dst: gb.addr(),
                    dst_dtype: dtype,
                    ..args
                };
                unsafe { b.copy_box(&args) }.unwrap();
                let got = download_bytes(b, gb.addr(), nd * dtype.size());
                // Inside the box: the CPU value rounded to the dtype (RNE), bit for bit;
                // outside: the poison, untouched.
                let sz = dtype.size();
                for i in 0..nd {
                    let g = &got[i * sz..(i + 1) * sz];
                    if in_box(i, ddims, dst_start, extent) {
                        assert_eq!(
                            g,
                            &encode_f32(&want[i..i + 1], dtype)[..],
                            "{what}: voxel {i}"
                        );
                    } else {
                        assert!(
                            g.iter().all(|&v| v == 0xff),
                            "{what}: voxel {i} outside the box written"
                        );
                    }
                }
            }
        }
        eprintln!(
            "{}: copy_box 18 random boxes x f32/f16/bf16: bit-exact (max err 0)",
            dev.label
        );
        // A realistic window: 32x256x256 out of a 64x300x280 volume, padded on two sides.
        let sdims = [64usize, 300, 280];
        let src = random(sdims.iter().product(), 1.0, r.next_u64());
        let window = [32usize, 256, 256];
        let nw: usize = window.iter().product();
        let src_start = [40i64, -20, 100];
        let run = |be: &dyn Backend, dtype: DType| {
            let (_s, sa) = upload_at(be, &src, false);
            let d = poisoned(be, nw, dtype);
            let args = CopyBoxArgs {
                src: sa,
                src_dims: sdims,
                src_start,
                dst: d.addr(),
                dst_dtype: dtype,
                dst_dims: window,
                dst_start: [0; 3],
                extent: window,
                pad: 0.0,
            };
            let t = std::time::Instant::now();
            unsafe { be.copy_box(&args) }.unwrap();
            let secs = t.elapsed().as_secs_f64();
            (download_bytes(be, d.addr(), nw * dtype.size()), secs)
        };
        let (want, _) = run(cpu.as_ref(), DType::F32);
        let want: Vec<f32> = want
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for dtype in [DType::F32, DType::BF16] {
            let (got, secs) = run(b, dtype);
            assert_eq!(
                got,
                encode_f32(&want, dtype),
                "{} window {dtype}",
                dev.label
            );
            eprintln!(
                "{}: copy_box window {window:?} {dtype}: exact, {secs:.3} s",
                dev.label
            );
        }
    }
}

#[test]
fn accumulate_window_matches_cpu() {
    let cpu = cpu();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let seed = next_seed();
        let mut r = Rng(seed);
        for (dims, window) in [
            ([11usize, 19, 23], [5usize, 7, 9]),
            ([30, 96, 121], [7, 33, 64]),
        ] {
            let n: usize = dims.iter().product();
            let nw: usize = window.iter().product();
            let wins: Vec<(Vec<f32>, [usize; 3])> = (0..6)
                .map(|_| {
                    let start =
                        [0, 1, 2].map(|a| r.below((dims[a] - window[a]) as u64 + 1) as usize);
                    (random(nw, 4.0, r.next_u64()), start)
                })
                .collect();
            let run = |be: &dyn Backend| {
                let acc = upload(be, &vec![0.0; n], DType::F32);
                let cnt = upload(be, &vec![0.0; n], DType::F32);
                unsafe { be.fill(acc.addr(), n, 0.0) }.unwrap();
                for (w, start) in &wins {
                    let wb = upload(be, w, DType::F32);
                    let args = AccumulateArgs {
                        win: wb.addr(),
                        window,
                        acc: acc.addr(),
                        cnt: cnt.addr(),
                        dims,
                        start: *start,
                    };
                    unsafe { be.accumulate_window(&args) }.unwrap();
                }
                let out = poisoned(be, n, DType::F32);
                unsafe { be.divide_counts(acc.addr(), cnt.addr(), out.addr(), n) }.unwrap();
                (download(be, &acc), download(be, &cnt), download(be, &out))
            };
            let (ga, gc, go) = run(b);
            let (wa, wc, wo) = run(cpu.as_ref());
            assert!(
                wc.contains(&0.0) && wc.iter().any(|&c| c > 1.0),
                "windows overlap and miss"
            );
            let what = format!("{} {dims:?} window {window:?} seed {seed:#x}", dev.label);
            assert_eq!(bits(&ga), bits(&wa), "{what}: acc");
            assert_eq!(bits(&gc), bits(&wc), "{what}: cnt");
            assert_eq!(bits(&go), bits(&wo), "{what}: average");
            eprintln!("{what}: accumulate + divide bit-exact");
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let x = upload(b, &random(64, 1.0, next_seed()), DType::F32);
        // Box outside the volume.
        let e =
            unsafe { b.bbox_above(x.addr(), [4, 4, 4], [2, 0, 0], [3, 4, 4], 0.0) }.unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
        // A u8 destination for copy_box: a dtype the op cannot take.
        let args = CopyBoxArgs {
            src: x.addr(),
            src_dims: [4, 4, 4],
            src_start: [0; 3],
            dst: x.addr() + 1024,
            dst_dtype: DType::U8,
            dst_dims: [1, 1, 1],
            dst_start: [0; 3],
            extent: [1, 1, 1],
            pad: 0.0,
        };
        let e = unsafe { b.copy_box(&args) }.unwrap_err();
        assert!(matches!(e, Error::Device { .. }), "{e:?}");
        // Destination box past the destination.
        let d = poisoned(b, 8, DType::F32);
        let args = CopyBoxArgs {
            dst: d.addr(),
            dst_dtype: DType::F32,
            dst_dims: [2, 2, 2],
            extent: [2, 2, 3],
            ..args
        };
        let e = unsafe { b.copy_box(&args) }.unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
        // Partial overlap of out and x.
        let args = ShiftScaleArgs {
            x: x.addr(),
            out: x.at(1),
            n: 32,
            sub: 0.0,
            div: 1.0,
        };
        let e = unsafe { b.shift_scale(&args) }.unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
        // Misaligned f32 address.
        let e = unsafe { b.fill(x.addr() + 2, 4, 0.0) }.unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
        eprintln!("{}: bad arguments rejected", dev.label);
    }
}

/// The tiny CT through the pipeline's device steps (normalise, foreground box, crop) on each
/// kernel device and on the CPU backend.
#[test]
fn tiny_ct_pipeline_steps_match_cpu() {
    use segvol::pipeline::preprocess::{
        crop_on_device, foreground_box_on_device, normalize_on_device,
    };
    let path = common::fixtures().join("data/example_ct_sm.nii.gz");
    let vol = segvol::io::nifti::read_volume(&path).unwrap();
    let dims = vol.model_dims();
    let n = vol.data.len();
    let run = |be: &dyn Backend| {
        let v = upload(be, &vol.data, DType::F32);
        let t = std::time::Instant::now();
        let norm = unsafe { normalize_on_device(be, v.addr(), dims) }.unwrap();
        let (s, e) = unsafe { foreground_box_on_device(be, v.addr(), dims) }.unwrap();
        let cd = [0, 1, 2].map(|a| e[a] - s[a]);
        let c = poisoned(be, cd.iter().product(), DType::F32);
        unsafe { crop_on_device(be, v.addr(), dims, s, e, c.addr()) }.unwrap();
        let secs = t.elapsed().as_secs_f64();
        (norm, (s, e), download(be, &v), download(be, &c), secs)
    };
    let (wn, wbox, wv, wc, _) = run(cpu().as_ref());
    for dev in volume_devices() {
        let (gn, gbox, gv, gc, secs) = run(dev.backend.as_ref());
        let what = format!("{} tiny CT {dims:?}", dev.label);
        check_stats(&what, &vol.data, &gn.stats, &wn.stats);
        assert_eq!(gn.stats.p_lo, wn.stats.p_lo, "{what}: p_lo");
        assert_eq!(gn.stats.p_hi, wn.stats.p_hi, "{what}: p_hi");
        let zr = rel(gn.zscore_min as f64, wn.zscore_min as f64);
        let rr = rel(gn.minmax_range as f64, wn.minmax_range as f64);
        assert!(
            zr <= 1e-5 && rr <= 1e-5,
            "{what}: zmin {zr:.2e} range {rr:.2e}"
        );
        assert_eq!(gbox, wbox, "{what}: crop box");
        assert_eq!(gv.len(), n);
        let err =
            |g: &[f32], w: &[f32]| g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let (ev, ec) = (err(&gv, &wv), err(&gc, &wc));
        eprintln!(
            "{what}: box {gbox:?}; normalised volume max abs diff {ev:.2e}, crop {ec:.2e}; zmin rel {zr:.2e}, range rel {rr:.2e}; {secs:.3} s"
        );
        assert_close(&gv, &wv, 1e-5, &format!("{what}: normalised volume"));
        assert_close(&gc, &wc, 1e-5, &format!("{what}: crop"));
        // Voxels at the minimum are exactly 0 on both (they define the box).
        assert!(
            gv.iter().zip(&wv).all(|(a, b)| (*a == 0.0) == (*b == 0.0)),
            "{what}: zeros"
        );
    }
}

/// Every op's outputs (bytes), for the schedule-identity check.
fn all_outputs(be: &dyn Backend, seed: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let stats_bytes = |s: ForegroundStats| {
        let mut v = Vec::new();
        v.extend(s.threshold.to_le_bytes());
        v.extend(s.count.to_le_bytes());
        v.extend(s.p_lo.to_le_bytes());
        v.extend(s.p_hi.to_le_bytes());
        v.extend(s.mean.to_le_bytes());
        v.extend(s.std.to_le_bytes());
        v
    };
    let dims = [30usize, 96, 121];
    let n: usize = dims.iter().product();
    let mut r = Rng(seed);
    // Statistics: histogram in shared memory, global histogram, float selection.
    let hu = hu_volume(n, r.next_u64());
    let wide: Vec<f32> = (0..n).map(|_| r.below(100_000) as f32).collect();
    let fl = float_volume(n, r.next_u64());
    let mut res = Vec::new();
    for x in [&hu, &wide, &fl] {
        res.push(stats_bytes(stats_on(be, x, dims, false)));
    }
    out.extend(res);
    // clip_zscore in place, then shift_scale, bbox, threshold.
    let v = upload(be, &hu, DType::F32);
    let args = ClipZscoreArgs {
        x: v.addr(),
        out: v.addr(),
        n,
        lo: -900.0,
        hi: 2000.0,
        mean: 100.0,
        std: 300.0,
    };
    let mm = unsafe { be.clip_zscore(&args) }.unwrap();
    let args = ShiftScaleArgs {
        x: v.addr(),
        out: v.addr(),
        n,
        sub: mm.0,
        div: mm.1 - mm.0,
    };
    unsafe { be.shift_scale(&args) }.unwrap();
    out.push([mm.0.to_le_bytes(), mm.1.to_le_bytes()].concat());
    out.push(download_bytes(be, v.addr(), n * 4));
    let bb = unsafe { be.bbox_above(v.addr(), dims, [3, 5, 7], [20, 80, 100], 0.5) }.unwrap();
    out.push(format!("{bb:?}").into_bytes());
    let m = upload_bytes(be, &vec![0xffu8; n], n, DType::U8);
    unsafe { be.threshold_u8(v.addr(), m.addr(), n, 0.3) }.unwrap();
    out.push(download_bytes(be, m.addr(), n));
    // copy_box to bf16 with padding, accumulate + divide.
    let window = [16usize, 64, 64];
    let nw: usize = window.iter().product();
    {
        let d = poisoned(be, nw, DType::BF16);
        let args = CopyBoxArgs {
            src: v.addr(),
            src_dims: dims,
            src_start: [20, -10, 90],
            dst: d.addr(),
            dst_dtype: DType::BF16,
            dst_dims: window,
            dst_start: [0; 3],
            extent: window,
            pad: 0.0,
        };
        unsafe { be.copy_box(&args) }.unwrap();
        out.push(download_bytes(be, d.addr(), nw * 2));
    }
    let acc = poisoned(be, n, DType::F32);
    let cnt = poisoned(be, n, DType::F32);
    unsafe { be.fill(acc.addr(), n, 0.0) }.unwrap();
    unsafe { be.fill(cnt.addr(), n, 0.0) }.unwrap();
    for k in 0..3 {
        let w = upload(be, &random(nw, 2.0, r.next_u64()), DType::F32);
        let args = AccumulateArgs {
            win: w.addr(),
            window,
            acc: acc.addr(),
            cnt: cnt.addr(),
            dims,
            start: [7 * k, 16 * k, 20 * k],
        };
        unsafe { be.accumulate_window(&args) }.unwrap();
    }
    let avg = poisoned(be, n, DType::F32);
    unsafe { be.divide_counts(acc.addr(), cnt.addr(), avg.addr(), n) }.unwrap();
    out.push(download_bytes(be, avg.addr(), n * 4));
    out
}

#[test]
fn schedule_identity() {
    let seed = next_seed();
    let mut first: Option<(String, Vec<Vec<u8>>)> = None;
    for dev in emu_schedules(DType::F32) {
        let got = all_outputs(dev.backend.as_ref(), seed);
        match &first {
            None => first = Some((dev.label.clone(), got)),
            Some((l0, ref0)) => {
                assert_eq!(ref0.len(), got.len());
                for (i, (a, b)) in ref0.iter().zip(&got).enumerate() {
                    assert!(
                        a == b,
                        "output {i} differs between {l0} and {} (seed {seed:#x})",
                        dev.label
                    );
                }
            }
        }
    }
    eprintln!("volume ops: bit-identical under forward/reverse/random/2 workers (seed {seed:#x})");
}

/// Emulator time of the statistics of a 200x512x512 volume (52 M voxels, integer HU), against
/// the CPU backend. Run with `--ignored`.
#[test]
#[ignore]
fn timing_stats_200x512x512() {
    let dims = [200usize, 512, 512];
    let n: usize = dims.iter().product();
    let x = hu_volume(n, next_seed());
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let (_buf, a) = upload_at(b, &x, false);
        let t = std::time::Instant::now();
        let got = unsafe { b.foreground_stats(a, dims) }.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let want = stats_on(cpu().as_ref(), &x, dims, false);
        let cpu_secs = t.elapsed().as_secs_f64();
        check_stats(&format!("{} {dims:?}", dev.label), &x, &got, &want);
        eprintln!(
            "{}: stats {dims:?} {secs:.2} s (cpu backend {cpu_secs:.2} s)",
            dev.label
        );
        let fl = float_volume(n, next_seed());
        let (_fb, fa) = upload_at(b, &fl, false);
        let t = std::time::Instant::now();
        let got = unsafe { b.foreground_stats(fa, dims) }.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let want = stats_on(cpu().as_ref(), &fl, dims, false);
        check_stats(&format!("{} {dims:?} float", dev.label), &fl, &got, &want);
        eprintln!(
            "{}: stats {dims:?} non-integer (host selection) {secs:.2} s",
            dev.label
        );
    }
}

/// The full-size CT (512 x 512 x 20) through the device steps against the reference fixture's
/// statistics, bit for bit (numpy's f32 values), and its crop box. Runs when `SEGVOL_FIXTURES`
/// is set.
#[test]
fn full_ct_statistics_match_the_fixture() {
    use segvol::pipeline::preprocess::{foreground_box_on_device, normalize_on_device};
    let Some(root) = common::full_fixtures() else {
        return;
    };
    let vol = segvol::io::nifti::read_volume(&root.join("data/example_ct_dicom_512x512x20.nii.gz"))
        .unwrap();
    let meta = common::json(&root.join("full/pipeline-preprocess.json"));
    let nm = &meta["normalization"];
    let f = |k: &str| nm[k].as_f64().unwrap();
    let dims = vol.model_dims();
    for dev in volume_devices() {
        let b = dev.backend.as_ref();
        let v = upload(b, &vol.data, DType::F32);
        let t = std::time::Instant::now();
        let norm = unsafe { normalize_on_device(b, v.addr(), dims) }.unwrap();
        let (start, end) = unsafe { foreground_box_on_device(b, v.addr(), dims) }.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let s = norm.stats;
        let what = format!("{} full CT {dims:?}", dev.label);
        eprintln!("{what}: {s:?}, box {start:?}..{end:?}, {secs:.2} s");
        assert_eq!(s.threshold, f("threshold_mean") as f32, "{what}: threshold");
        assert_eq!(
            s.count,
            f("num_voxels_above_threshold") as u64,
            "{what}: count"
        );
        assert_eq!(
            (s.p_lo, s.p_hi),
            (f("p0_05"), f("p99_95")),
            "{what}: percentiles"
        );
        assert_eq!(s.mean, f("mean_above") as f32, "{what}: mean");
        assert_eq!(s.std, f("std_above") as f32, "{what}: std");
        assert_eq!(
            norm.zscore_min,
            f("zscore_min") as f32,
            "{what}: zscore_min"
        );
        assert_eq!(
            norm.minmax_range,
            f("minmax_range_after_shift") as f32,
            "{what}: range"
        );
        let crop = &meta["crop"];
        let arr = |k: &str| -> Vec<usize> {
            crop[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect()
        };
        assert_eq!(
            (start.to_vec(), end.to_vec()),
            (arr("start"), arr("end")),
            "{what}: crop"
        );
    }
}
