//! Issue 9, items 11, 12 and 15: a run of several inputs survives a bad one (and reports it),
//! SIGINT and SIGTERM leave no temporary files, and every output location is checked before
//! the model loads. Each case runs the real binary with the tiny model.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tiny_model() -> String {
    common::tiny().join("model").to_string_lossy().into_owned()
}

fn tiny_ct() -> PathBuf {
    common::fixtures().join("data/example_ct_sm.nii.gz")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn one_bad_file_does_not_stop_a_directory_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cts = tmp.path().join("cts");
    std::fs::create_dir(&cts).unwrap();
    std::fs::copy(tiny_ct(), cts.join("a.nii.gz")).unwrap();
    std::fs::write(cts.join("b.nii.gz"), b"not a gzip stream").unwrap();
    // Upper-case extensions are inputs like any other, and keep their stem.
    std::fs::copy(tiny_ct(), cts.join("C.NII.GZ")).unwrap();
    let out_dir = tmp.path().join("masks");
    let report = tmp.path().join("report.json");
    let res = common::segvol(&[
        "segment",
        s(&cts),
        "--model",
        &tiny_model(),
        "--text",
        "liver",
        "--no-zoom-in",
        "--out-dir",
        s(&out_dir),
        "--json",
        s(&report),
    ]);
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(2), "bad input exits 2: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("failed: ") && err.contains("b.nii.gz"),
        "{err}"
    );
    assert!(err.contains("2 of 3 inputs segmented, 1 failed"), "{err}");
    // The inputs after the bad one were still segmented.
    assert!(out_dir.join("a_mask.nii.gz").is_file());
    assert!(out_dir.join("C_mask.nii.gz").is_file());
    assert!(!out_dir.join("b_mask.nii.gz").exists());
    let r = common::json(&report);
    assert_eq!(r["summary"]["inputs"], 3);
    assert_eq!(r["summary"]["segmented"], 2);
    assert_eq!(r["summary"]["failed"], 1);
    assert_eq!(r["volumes"].as_array().unwrap().len(), 2);
    let f = &r["failures"][0];
    assert!(f["input"].as_str().unwrap().ends_with("b.nii.gz"), "{f}");
    assert!(f["error"].as_str().unwrap().contains("b.nii.gz"), "{f}");
    assert_eq!(f["exit_code"], 2);
}

#[test]
fn a_missing_input_is_refused_before_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.nii.gz");
    let res = common::segvol(&[
        "segment",
        s(&tiny_ct()),
        s(&missing),
        "--model",
        &tiny_model(),
        "--text",
        "liver",
        "--out-dir",
        s(&tmp.path().join("masks")),
    ]);
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nope.nii.gz") && !err.contains("model loaded"),
        "{err}"
    );
    assert!(!tmp.path().join("masks").exists());
}

/// `/proc` refuses new files even to root, so this holds however the tests run.
#[test]
fn unwritable_output_locations_are_refused_before_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = tmp.path().join("m.nii.gz");
    let cases: [(&[&str], &str); 4] = [
        (&["--out", "/proc/segvol-mask.nii.gz"], "--out"),
        (
            &["--out-dir", "/proc/segvol-masks"],
            "cannot write in /proc",
        ),
        (&["--out", s(&ok), "--json", "/proc/segvol.json"], "--json"),
        (
            &["--out", s(&ok), "--save-logits", "/proc/l.safetensors"],
            "--save-logits",
        ),
    ];
    let ct = tiny_ct();
    let model = tiny_model();
    for (args, needle) in cases {
        let mut all = vec!["segment", s(&ct), "--model", &model, "--text", "liver"];
        all.extend_from_slice(args);
        let res = common::segvol(&all);
        let err = stderr(&res);
        assert_eq!(res.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle) && err.contains("/proc"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("model loaded"), "checked too late: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!ok.exists(), "{args:?}: wrote the mask before refusing");
    }
}

/// Starts `segvol args` with the temporary-file hold, waits until a `.<name>.tmp-<pid>` file
/// appears in `dir`, sends `signal`, and returns the run's output.
fn signal_during_write(args: &[&str], dir: &Path, name: &str, signal: i32) -> Output {
    let child = Command::new(common::segvol_bin())
        .args(args)
        .env("SEGVOL_TEST_HOLD_TEMP_MS", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let prefix = format!(".{name}.tmp-{}", child.id());
    let t0 = Instant::now();
    let tmp_exists = || {
        std::fs::read_dir(dir)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy() == prefix)
    };
    while !tmp_exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no temporary file {prefix} appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's pid, which has not been reaped (we still own `child`).
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    child.wait_with_output().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn sigterm_and_sigint_remove_temporary_files() {
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.nii.gz");
        let res = signal_during_write(
            &[
                "segment",
                s(&tiny_ct()),
                "--model",
                &tiny_model(),
                "--text",
                "liver",
                "--no-zoom-in",
                "--out",
                s(&out),
            ],
            tmp.path(),
            "m.nii.gz",
            signal,
        );
        let err = stderr(&res);
        assert_eq!(res.status.code(), Some(code), "{err}");
        assert!(err.contains("1 unfinished output file(s) removed"), "{err}");
        assert_eq!(names(tmp.path()), Vec::<String>::new(), "left behind");
    }
}

#[test]
fn sigterm_during_gen_weights_removes_the_partial_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let res = signal_during_write(
        &[
            "gen-weights",
            "--config",
            "tiny",
            "--seed",
            "1",
            "--out",
            s(&dir),
        ],
        &dir_when_created(&dir),
        "model.safetensors",
        libc::SIGTERM,
    );
    assert_eq!(res.status.code(), Some(143), "{}", stderr(&res));
    assert_eq!(names(&dir), Vec::<String>::new(), "left behind");
}

/// `gen-weights` creates its directory itself: the directory to watch, created up front so
/// the watcher can list it (creating an existing directory is what gen-weights accepts).
fn dir_when_created(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    dir.to_path_buf()
}
