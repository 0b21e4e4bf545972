//! The volume kernels (`kernels/volume.cu`, spec §6.2–§6.9) beyond the parity table of
//! `tests/backend_ops.rs` (which runs every volume op on odd sizes, unaligned and in place,
//! copy_box padding into f32/f16/bf16, the statistics and their error cases, bit for bit
//! against the CPU and the count, percentiles and moments against a sort and f64 sums): bad
//! arguments, the tiny CT through the pipeline's device steps, bit-identical results under
//! every emulator schedule, and the full-size CT against the reference fixture.
//!
//! Statistics: the kernels reproduce numpy's float32 summation order, as the CPU reference does,
//! so every field must equal the CPU's bit for bit (the fixtures would accept threshold, mean
//! and std within 1e-6 relative; the differences are printed); the count and percentiles are
//! also checked against a sort of the foreground at the kernel's threshold.

mod common;

use common::parity::*;
use segvol::backend::cpu::volume::percentile_linear;
use segvol::backend::{
    AccumulateArgs, Addr, Backend, ClipZscoreArgs, CopyBoxArgs, ForegroundStats, ShiftScaleArgs,
};
use segvol::dtype::DType;
use segvol::error::Error;
use segvol::rng::SplitMix64 as Rng;

/// The kernel devices, one per device spec: the volume ops are f32 whatever the storage
/// precision.
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
