//! `segvol segment --num-parts N --part-id I --skip-existing --jsonl`: three parts run at once
//! over a folder of six CTs share one JSON-lines report; every case is done by exactly one
//! part, and a rerun with --skip-existing redoes nothing (docs/scale-out.md).

mod common;

use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const CASES: usize = 6;
const PARTS: usize = 3;

fn segvol() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_segvol"));
    // A test run inside a Slurm array job must not pick up its task numbers.
    for k in [
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
    ] {
        c.env_remove(k);
    }
    c
}

fn part(input: &Path, out: &Path, jsonl: &Path, id: usize, extra: &[&str]) -> Child {
    segvol()
        .arg("segment")
        .arg(input)
        .arg("--model")
        .arg(common::tiny().join("model"))
        .args(["--text", "liver", "--out-dir"])
        .arg(out)
        .arg("--jsonl")
        .arg(jsonl)
        .args([
            "--num-parts",
            &PARTS.to_string(),
            "--part-id",
            &id.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the three parts at once (they append to the same report file concurrently).
fn run_parts(input: &Path, out: &Path, jsonl: &Path, extra: &[&str]) {
    let children: Vec<Child> = (0..PARTS)
        .map(|id| part(input, out, jsonl, id, extra))
        .collect();
    for (id, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "part {id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn lines(jsonl: &Path) -> Vec<Value> {
    std::fs::read_to_string(jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Output file -> (inode, modification time in ns).
fn stamps(out: &Path) -> BTreeMap<PathBuf, (u64, i128)> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let m = std::fs::metadata(&p).unwrap();
            let t = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            (p, (m.ino(), t))
        })
        .collect()
}

#[test]
fn three_parts_do_every_case_once_and_a_rerun_skips_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out, jsonl) = (
        tmp.path().join("cts"),
        tmp.path().join("masks"),
        tmp.path().join("report.jsonl"),
    );
    std::fs::create_dir(&input).unwrap();
    let ct = common::fixtures().join("data/example_ct_sm.nii.gz");
    for n in 0..CASES {
        std::fs::copy(&ct, input.join(format!("case_{n}.nii.gz"))).unwrap();
    }

    run_parts(&input, &out, &jsonl, &[]);
    let report = lines(&jsonl);
    assert_eq!(report.len(), CASES, "one line per case: {report:?}");
    let mut parts_of: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in &report {
        assert_eq!(l["status"], "done", "{l}");
        assert!(l["error"].is_null(), "{l}");
        assert_eq!(l["num_parts"], PARTS as u64);
        assert!(l["voxels"][0].as_u64().unwrap() > 0, "{l}");
        assert!(l["seconds"]["total"].as_f64().unwrap() > 0.0, "{l}");
        let name = Path::new(l["input"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let stem = name.trim_end_matches(".nii.gz");
        assert_eq!(
            l["outputs"][0].as_str().map(PathBuf::from),
            Some(out.join(format!("{stem}_mask.nii.gz"))),
            "{l}"
        );
        parts_of
            .entry(name)
            .or_default()
            .push(l["part"].as_u64().unwrap());
    }
    // Every case exactly once, by the part its place in the sorted list gives.
    let want: BTreeMap<String, Vec<u64>> = (0..CASES)
        .map(|n| (format!("case_{n}.nii.gz"), vec![(n % PARTS) as u64]))
        .collect();
    assert_eq!(parts_of, want);

    // The masks are those of one plain run on the same CT.
    let single = tmp.path().join("single.nii.gz");
    let o = segvol()
        .arg("segment")
        .arg(&ct)
        .arg("--model")
        .arg(common::tiny().join("model"))
        .args(["--text", "liver", "--out"])
        .arg(&single)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = segvol::io::nifti::read_volume(&single).unwrap().data;
    let before = stamps(&out);
    assert_eq!(before.len(), CASES, "{before:?}");
    for p in before.keys() {
        let m = segvol::io::nifti::read_volume(p).unwrap();
        assert!(
            m.data == reference,
            "{}: differs from a plain run",
            p.display()
        );
    }

    // A rerun with --skip-existing writes nothing and logs six skips.
    run_parts(&input, &out, &jsonl, &["--skip-existing"]);
    assert_eq!(stamps(&out), before, "a rerun rewrote a finished mask");
    let report = lines(&jsonl);
    assert_eq!(report.len(), 2 * CASES);
    assert!(
        report[CASES..].iter().all(|l| l["status"] == "skipped"),
        "{report:?}"
    );

    // A missing mask is the only one redone.
    let gone = out.join("case_4_mask.nii.gz");
    std::fs::remove_file(&gone).unwrap();
    run_parts(&input, &out, &jsonl, &["--skip-existing"]);
    let report = lines(&jsonl);
    let done: Vec<&Value> = report[2 * CASES..]
        .iter()
        .filter(|l| l["status"] == "done")
        .collect();
    assert_eq!(done.len(), 1, "{report:?}");
    assert!(done[0]["input"]
        .as_str()
        .unwrap()
        .ends_with("case_4.nii.gz"));
    let after = stamps(&out);
    for (p, s) in &before {
        if *p != gone {
            assert_eq!(after.get(p), Some(s), "{} was rewritten", p.display());
        }
    }
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = segvol();
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn slurm_array_variables_pick_the_part_and_bad_parts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("cts");
    std::fs::create_dir(&input).unwrap();
    let ct = common::fixtures().join("data/example_ct_sm.nii.gz");
    for n in 0..4 {
        std::fs::copy(&ct, input.join(format!("c{n}.nii.gz"))).unwrap();
    }
    let model = common::tiny().join("model");
    let out = tmp.path().join("out");
    let base = [
        "segment",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--text",
        "liver",
        "--out-dir",
        out.to_str().unwrap(),
    ];
    // --array=1-2: task 2 is part 1 of 2, i.e. c1 and c3.
    let o = run(
        &base,
        &[
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["c1_mask.nii.gz", "c3_mask.nii.gz"]);

    // (flags, environment, what the error names)
    type Refusal<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let refused: [Refusal; 4] = [
        (
            &["--num-parts", "3", "--part-id", "3"],
            &[],
            "--part-id 3 with --num-parts 3: parts are numbered 0 to 2",
        ),
        (&["--num-parts", "2"], &[], "--num-parts without --part-id"),
        (
            &[],
            &[
                ("SLURM_ARRAY_TASK_COUNT", "3"),
                ("SLURM_ARRAY_TASK_ID", "7"),
            ],
            "from SLURM_ARRAY_TASK_*",
        ),
        (
            &[],
            &[
                ("SLURM_ARRAY_TASK_COUNT", "many"),
                ("SLURM_ARRAY_TASK_ID", "0"),
            ],
            "SLURM_ARRAY_TASK_COUNT=many: expected a non-negative integer",
        ),
    ];
    for (flags, envs, want) in refused {
        let args: Vec<&str> = base.iter().copied().chain(flags.iter().copied()).collect();
        let o = run(&args, envs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flags:?} {envs:?}: {err}");
        assert!(err.contains(want), "{flags:?} {envs:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    // One --out file cannot be split.
    let o = run(
        &[
            "segment",
            ct.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--text",
            "liver",
            "--out",
            tmp.path().join("m.nii.gz").to_str().unwrap(),
            "--num-parts",
            "2",
            "--part-id",
            "0",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("use --out-dir"));
}
