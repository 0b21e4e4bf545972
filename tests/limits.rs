//! Resource limits of the command line (issue 9 items 5, 9, 14 and the minor `bench --iters 0`):
//! absurd batches, unknown devices and precisions, overflowing shapes are refused up front with
//! exit 2; a batch is clamped to the volume's windows; on the CPU the host buffers count
//! against `--mem-limit`, and the measured peak RSS of a run stays within its budget plus a
//! fixed overhead.

mod common;

use segvol::io::nifti::{read_volume, write_volume_f32, Volume};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn segvol<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(common::segvol_bin())
        .args(args)
        .output()
        .unwrap()
}

fn assert_fails(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "expected exit 2: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn tiny_model() -> PathBuf {
    common::tiny().join("model")
}

fn tiny_ct() -> PathBuf {
    common::fixtures().join("data/example_ct_sm.nii.gz")
}

/// A synthetic CT of file dims `xyz` on the tiny CT's header: a bright ellipsoid in air.
fn synthetic_ct(path: &Path, xyz: [usize; 3]) {
    let like = read_volume(&tiny_ct()).unwrap();
    let mut header = like.header.clone();
    header.dim[1] = xyz[0] as i64;
    header.dim[2] = xyz[1] as i64;
    header.dim[3] = xyz[2] as i64;
    let n = xyz.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| {
            let (x, y, z) = (i % xyz[0], (i / xyz[0]) % xyz[1], i / (xyz[0] * xyz[1]));
            let r = [x, y, z]
                .iter()
                .zip(xyz)
                .map(|(&c, d)| (c as f64 / d as f64 - 0.5).powi(2))
                .sum::<f64>();
            if r < 0.1 {
                40.0 + (i % 7) as f32
            } else {
                -1000.0
            }
        })
        .collect();
    let vol = Volume {
        dims: xyz,
        data: vec![],
        header,
        ..like
    };
    write_volume_f32(path, &vol, &data).unwrap_or_else(|e| panic!("{e}"));
}

/// Parses a size that `segvol plan` printed (`12.3 MiB`) into bytes (rounded as printed).
fn printed_size(plan: &str, row: &str) -> f64 {
    let line = plan
        .lines()
        .find(|l| l.trim_start().starts_with(row))
        .unwrap_or_else(|| panic!("no row {row:?} in:\n{plan}"));
    let mut it = line[line.find(row).unwrap() + row.len()..].split_whitespace();
    let v: f64 = it.next().unwrap().parse().unwrap();
    let unit = match it.next().unwrap() {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u}"),
    };
    v * unit
}

#[test]
fn unknown_devices_and_precisions_are_refused_by_every_command() {
    let model = tiny_model();
    let m = model.to_str().unwrap();
    let ct = tiny_ct();
    let ct = ct.to_str().unwrap();
    for (dev, prec, needle) in [
        ("tpu", None, "device tpu"),
        ("cuda:x", None, "device cuda:x"),
        ("cpu", Some("bf16"), "f32 only"),
    ] {
        let mut tail = vec!["--device", dev];
        if let Some(p) = prec {
            tail.extend(["--precision", p]);
        }
        let with = |head: &[&str]| -> Vec<String> {
            head.iter().chain(&tail).map(|s| s.to_string()).collect()
        };
        assert_fails(&segvol(&with(&["plan", "--brief"])), &[needle]);
        assert_fails(
            &segvol(&with(&["plan", "--shape", "512x512x100"])),
            &[needle],
        );
        assert_fails(&segvol(&with(&["bench", "--iters", "1"])), &[needle]);
        assert_fails(
            &segvol(&with(&[
                "segment",
                ct,
                "--model",
                m,
                "--text",
                "liver",
                "--out",
                "/tmp/x.nii.gz",
            ])),
            &[needle],
        );
    }
}

#[test]
fn overflowing_shapes_and_absurd_batches_are_refused_up_front() {
    assert_fails(
        &segvol(&["plan", "--shape", "4294967296x4294967296x1"]),
        &["too large to plan"],
    );
    // Within 64-bit sizes: planned in full (262192 GiB of volume buffers, not 0 B) and refused
    // against the budget.
    assert_fails(
        &segvol(&["plan", "--shape", "4294967296x1x1", "--mem-limit", "1T"]),
        &["262192.03 GiB volume buffers", "the limit is 1024.00 GiB"],
    );
    for b in ["0", "10000000", "1000000000000"] {
        assert_fails(&segvol(&["plan", "--batch", b]), &["batch", b]);
        assert_fails(
            &segvol(&["plan", "--shape", "64x64x32", "--batch", b]),
            &["batch"],
        );
        assert_fails(&segvol(&["bench", "--batch", b]), &["batch"]);
    }
    assert_fails(&segvol(&["plan", "--batch", "2000"]), &["at most 1024"]);
    assert_fails(&segvol(&["bench", "--iters", "0"]), &["--iters 0"]);
    // A batch within the limit but beyond the host's memory: refused before allocating.
    assert_fails(
        &segvol(&["bench", "--batch", "1024", "--iters", "1"]),
        &["bench --batch 1024 needs", "available"],
    );
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.nii.gz");
    for b in ["0", "100000", "1000000000000"] {
        let res = segvol(&[
            "segment",
            tiny_ct().to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--text",
            "liver",
            "--batch",
            b,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_fails(&res, &["batch"]);
        assert!(!out.exists());
    }
}

/// A batch larger than the volume's windows is clamped to them (the tiny CT has 6 zoom-in
/// windows with the tiny model).
#[test]
fn batch_is_clamped_to_the_windows() {
    let dir = tempfile::tempdir().unwrap();
    let (out, json) = (dir.path().join("m.nii.gz"), dir.path().join("r.json"));
    let model = tiny_model();
    let res = segvol(&[
        "segment",
        tiny_ct().to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--text",
        "liver",
        "--batch",
        "1000",
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let windows = r["prompts"][0]["window_count"].as_u64().unwrap();
    let batch = r["window_batch"].as_u64().unwrap();
    // The worst case of this 122x101x30 volume with 32x64x64 windows (ROI = whole volume) is
    // 1 x 3 x 3 windows: the batch of 1000 becomes 9, which covers the 6 this run had.
    assert_eq!(batch, 9, "{r}");
    assert!(windows <= batch, "{r}");
}

/// Runs `segvol` and returns its output with the child's peak RSS (bytes, from wait4).
// The child is reaped by wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_measured(args: &[&str]) -> (std::process::ExitStatus, String, u64) {
    use std::os::unix::process::ExitStatusExt;
    let child = Command::new(common::segvol_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    let mut status = 0;
    // SAFETY: waits for our own child; `ru` is a valid out-pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid);
    (
        std::process::ExitStatus::from_raw(status),
        err,
        ru.ru_maxrss as u64 * 1024,
    )
}

/// What a run holds beyond its plan: the binary, the allocator's and threads' overhead, the
/// tokenizer and the model's host-side bookkeeping (documented in docs/reliability.md).
const FIXED_OVERHEAD: f64 = 160.0 * 1024.0 * 1024.0;

/// Issue 9 item 9: on the CPU the host buffers count against `--mem-limit`: a limit between the
/// device plan and device + host plan is refused up front, and a run under a limit that fits
/// keeps its measured peak RSS within the limit plus a fixed overhead.
#[test]
fn cpu_mem_limit_counts_host_buffers_and_bounds_peak_rss() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii");
    let xyz = [256usize, 256, 128];
    synthetic_ct(&ct, xyz);
    let model = tiny_model();
    let m = model.to_str().unwrap();
    let plan = segvol(&[
        "plan",
        "--model",
        m,
        "--shape",
        "256x256x128",
        "--prompts",
        "2",
    ]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    let device = printed_size(&plan, "device total");
    let both = printed_size(&plan, "total (device + host)");
    assert!(both > device * 1.3, "{plan}");
    // --out-dir: one mask per text (a label map with --out is another item's concern).
    let out = dir.path().join("masks");
    let args = |limit: &str| -> Vec<String> {
        [
            "segment",
            ct.to_str().unwrap(),
            "--model",
            m,
            "--text",
            "liver",
            "--text",
            "spleen",
            "--mem-limit",
            limit,
            "--out-dir",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let between = format!("{}", ((device + both) / 2.0) as u64);
    let res = Command::new(common::segvol_bin())
        .args(args(&between))
        .output()
        .unwrap();
    assert_fails(&res, &["host buffers", "the limit is"]);
    assert!(!out.exists());
    // A limit that fits (with room for the printed rounding): the run succeeds and its peak
    // RSS stays within the limit plus the fixed overhead.
    let limit = both * 1.02 + 1024.0 * 1024.0;
    let a = args(&format!("{}", limit as u64));
    let (status, err, peak) = run_measured(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(status.success(), "{err}");
    eprintln!(
        "peak RSS {:.1} MiB, budget {:.1} MiB (device {:.1} MiB)",
        peak as f64 / 1048576.0,
        limit / 1048576.0,
        device / 1048576.0
    );
    assert!(
        (peak as f64) <= limit + FIXED_OVERHEAD,
        "peak RSS {peak} over budget {limit} + overhead"
    );
}
