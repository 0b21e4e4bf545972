//! Issue 11, the runtime layer: a whole-volume request builds each program once per shape key,
//! its arena is fixed by the plan before the first launch and never grows during the run, and
//! `segvol plan --shape` with the same prompts prints the arena the run used.

mod common;

use segvol::io::nifti::read_volume;
use segvol::model::SegVol;
use segvol::pipeline::plan::{human, Request, VolumePlan};
use segvol::pipeline::{self, Options, UserPrompt};

fn tiny_ct() -> std::path::PathBuf {
    common::fixtures().join("data/example_ct_sm.nii.gz")
}

/// Three prompts of different shapes: a text with a box, a long text with two points, a box
/// with a negative point and no text. Voxel coordinates (i,j,k) inside the tiny CT's
/// foreground.
fn prompts() -> Vec<UserPrompt> {
    vec![
        UserPrompt {
            text: Some("liver".into()),
            bbox: Some([30, 30, 8, 80, 70, 22]),
            points: vec![],
            positive: vec![],
        },
        UserPrompt {
            text: Some("left kidney and the adrenal gland beside it".into()),
            bbox: None,
            points: vec![[60, 50, 15], [40, 45, 12]],
            positive: vec![true, true],
        },
        UserPrompt {
            text: None,
            bbox: Some([20, 20, 5, 90, 80, 25]),
            points: vec![[55, 50, 14]],
            positive: vec![false],
        },
    ]
}

#[test]
fn a_request_builds_each_program_once_and_never_grows_its_arena() {
    let vol = read_volume(&tiny_ct()).unwrap();
    for dut in common::devices() {
        let model = SegVol::load(&common::tiny().join("model"), dut.open()).unwrap();
        let opts = Options {
            batch: 2,
            zoom_in: true,
            mem_limit: None,
        };
        let ps = prompts();
        let run = || {
            pipeline::segment(
                &model,
                &vol.data,
                vol.model_dims(),
                &ps,
                &opts,
                &mut |_, _| {},
            )
            .unwrap()
        };
        let out = run();
        let label = dut.label();
        let windows: usize = out.prompts.iter().map(|p| p.windows.len()).sum();
        assert!(
            windows > ps.len() && out.batch == 2,
            "{label}: the case must run several window batches ({windows} windows)"
        );
        assert_eq!(
            out.arena_growths, 0,
            "{label}: the arena grew during the run"
        );
        let stats = model.runtime_stats();
        assert_eq!(
            stats.arena_allocations, 1,
            "{label}: one arena for the request"
        );
        assert_eq!(
            stats.builds, stats.programs,
            "{label}: a program was built twice"
        );
        // Three texts of two lengths (plus none), encoder batches 1 and 2, decoders for every
        // sparse shape: more than a handful of keys, each built once.
        assert!(stats.programs >= 5, "{label}: {stats:?}");
        // The same request again: nothing is built or allocated anew.
        run();
        let again = model.runtime_stats();
        assert_eq!(again.builds, stats.builds, "{label}: rebuilt programs");
        assert_eq!(again.arena_allocations, 1, "{label}: reallocated the arena");

        // The plan of the same request reserves exactly the arena the run used.
        let request = Request::for_prompts(&ps, |t| model.token_count(t)).unwrap();
        let plan = VolumePlan::fit(
            model.config(),
            model.backend().dtype(),
            vol.model_dims(),
            2,
            None,
            request,
        )
        .unwrap();
        assert_eq!(plan.call.arena_bytes, out.arena_bytes, "{label}");
    }
}

/// `segvol plan --shape` with `segment`'s texts and point count prints the arena that
/// `segment --json` reports for the same request.
#[test]
fn plan_prints_the_arena_segment_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny().join("model");
    let report = tmp.path().join("r.json");
    let texts = ["liver", "left kidney and the adrenal gland beside it"];
    let mut args = vec![
        "segment".to_string(),
        tiny_ct().to_string_lossy().into_owned(),
        "--model".into(),
        model.to_string_lossy().into_owned(),
        "--point".into(),
        "60,50,15".into(),
        "--batch".into(),
        "2".into(),
        "--out".into(),
        tmp.path().join("m.nii.gz").to_string_lossy().into_owned(),
        "--json".into(),
        report.to_string_lossy().into_owned(),
    ];
    for t in texts {
        args.extend(["--text".into(), t.into()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let res = common::segvol(&refs);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let r = common::json(&report);
    let arena = r["memory"]["arena_bytes"].as_u64().unwrap() as usize;
    assert_eq!(r["memory"]["arena_growths"], 0);
    let vol = read_volume(&tiny_ct()).unwrap();
    let shape = format!("{}x{}x{}", vol.dims[0], vol.dims[1], vol.dims[2]);
    let mut plan_args = vec![
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--shape",
        &shape,
        "--batch",
        "2",
        "--points",
        "1",
    ];
    for t in texts {
        plan_args.extend(["--text", t]);
    }
    let res = common::segvol(&plan_args);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("model arena (batch  2)"))
        .unwrap_or_else(|| panic!("no arena line at batch 2:\n{stdout}"));
    assert!(
        line.trim_end().ends_with(&human(arena)),
        "{line} vs {}",
        human(arena)
    );
}

/// A session's embedding cache is part of the plan: `plan --cache` shows it and counts it in
/// the device total.
#[test]
fn plan_counts_a_session_cache() {
    let model = common::tiny().join("model");
    let m = model.to_str().unwrap();
    let total = |extra: &[&str]| -> String {
        let mut args = vec!["plan", "--model", m, "--shape", "122x101x30"];
        args.extend_from_slice(extra);
        let res = common::segvol(&args);
        let out = String::from_utf8_lossy(&res.stdout).into_owned();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        out
    };
    let without = total(&[]);
    let with = total(&["--cache", "1G"]);
    assert!(!without.contains("session embedding cache"));
    assert!(
        with.contains("session embedding cache") && with.contains("1.00 GiB"),
        "{with}"
    );
    let device = |s: &str| {
        s.lines()
            .find(|l| l.contains("device total"))
            .unwrap()
            .to_string()
    };
    assert_ne!(device(&with), device(&without));
}
