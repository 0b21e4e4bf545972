//! Issue 12, first part: a [`Session`] keeps a volume's preprocessing and zoom-out embedding
//! and gives every prompt the same result as a fresh `segment`, whatever came before; `segvol
//! session` speaks JSON lines and survives bad requests.

mod common;

use segvol::io::nifti::read_volume;
use segvol::model::SegVol;
use segvol::pipeline::plan::Request;
use segvol::pipeline::{self, Options, Session, UserPrompt};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn tiny_ct() -> std::path::PathBuf {
    common::fixtures().join("data/example_ct_sm.nii.gz")
}

fn text(t: &str) -> UserPrompt {
    UserPrompt {
        text: Some(t.into()),
        ..UserPrompt::default()
    }
}

/// liver, box + liver, points, spleen: the sequence (voxel indices of the tiny CT).
fn sequence() -> Vec<UserPrompt> {
    vec![
        text("liver"),
        UserPrompt {
            bbox: Some([30, 30, 8, 80, 70, 22]),
            ..text("liver")
        },
        UserPrompt {
            points: vec![[60, 50, 15], [40, 45, 12]],
            positive: vec![true, false],
            ..UserPrompt::default()
        },
        text("spleen"),
    ]
}

/// Runs `f` on a session of the tiny CT on the first test device, with a 1 GiB cache.
fn with_session(f: impl FnOnce(&SegVol, &Session<'_>)) {
    let vol = read_volume(&tiny_ct()).unwrap();
    let model = SegVol::load(&common::tiny().join("model"), common::devices()[0].open()).unwrap();
    let session = Session::open(
        &model,
        &vol.data,
        vol.model_dims(),
        Request::default(),
        &Options::default(),
    )
    .unwrap();
    session.set_cache_limit(1 << 30);
    f(&model, &session);
}

#[test]
fn a_session_gives_every_prompt_the_bytes_of_a_fresh_segment() {
    let vol = read_volume(&tiny_ct()).unwrap();
    let opts = Options {
        batch: 2,
        ..Options::default()
    };
    for dut in common::devices() {
        let label = dut.label();
        let model = SegVol::load(&common::tiny().join("model"), dut.open()).unwrap();
        let session = Session::open(
            &model,
            &vol.data,
            vol.model_dims(),
            Request::default(),
            &opts,
        )
        .unwrap();
        // First a cache of two batches of two windows (fewer than a prompt's: every batch
        // evicts another), then one of eight batches (the sequence revisits its ROIs: hits).
        let batch_bytes = 2 * model.embedding_bytes();
        session.set_cache_limit(2 * batch_bytes);
        let mut hits = 0;
        let mut seq = sequence();
        seq.extend(sequence());
        for (n, p) in seq.iter().enumerate() {
            if n == 4 {
                session.set_cache_limit(8 * batch_bytes);
            }
            let got = session.segment(p, &mut |_, _| {}).unwrap();
            // A fresh run on a fresh model: nothing shared but the weights file.
            let fresh_model = SegVol::load(&common::tiny().join("model"), dut.open()).unwrap();
            let want = pipeline::segment(
                &fresh_model,
                &vol.data,
                vol.model_dims(),
                std::slice::from_ref(p),
                &opts,
                &mut |_, _| {},
            )
            .unwrap();
            let want = &want.prompts[0];
            assert!(got.windows.len() > 1, "{label}: prompt {n} ran no zoom-in");
            assert_eq!(got.roi, want.roi, "{label}: prompt {n} ROI");
            assert_eq!(
                got.zoom_out_logits, want.zoom_out_logits,
                "{label}: prompt {n} zoom-out logits"
            );
            assert!(
                got.logits
                    .iter()
                    .zip(&want.logits)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{label}: prompt {n} logits differ from a fresh segment"
            );
            assert_eq!(got.mask, want.mask, "{label}: prompt {n} mask");
            hits += got.cached_windows;
        }
        assert!(hits > 0, "{label}: no cached window was reused");
        assert!(session.cache_bytes() <= 8 * batch_bytes);
    }
}

#[test]
fn session_over_json_lines_survives_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny().join("model");
    let out = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let requests = [
        serde_json::json!({"text": "liver", "out": out("liver.nii.gz")}).to_string(),
        "{not json".to_string(),
        serde_json::json!({"points": [[500, 1, 1]]}).to_string(),
        serde_json::json!({"txt": "liver"}).to_string(),
        serde_json::json!({"box": [30, 30, 8, 80, 70, 22], "text": "liver", "out": out("box.nii.gz")})
            .to_string(),
        serde_json::json!({"points": [[60, 50, 15], [40, 45, 12]], "labels": [1, 0], "out": out("pts.nii.gz")})
            .to_string(),
        serde_json::json!({"text": "spleen", "out": out("spleen.nii.gz")}).to_string(),
    ];
    let mut child = Command::new(common::segvol_bin())
        .args([
            "session",
            tiny_ct().to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for r in &requests {
            writeln!(stdin, "{r}").unwrap();
        }
    }
    let replies: Vec<serde_json::Value> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(replies.len(), requests.len(), "{replies:?}");
    let ok: Vec<bool> = replies.iter().map(|r| r["ok"].as_bool().unwrap()).collect();
    assert_eq!(
        ok,
        [true, false, false, false, true, true, true],
        "{replies:?}"
    );
    assert!(replies[1]["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert!(replies[2]["error"]
        .as_str()
        .unwrap()
        .contains("point 500,1,1: lies outside"));
    assert!(replies[3]["error"]
        .as_str()
        .unwrap()
        .contains("unknown field `txt`"));
    // Each mask equals what a fresh `segment` writes for the same prompt.
    let ct = tiny_ct();
    let fresh = |args: &[&str], name: &str| {
        let f = tmp.path().join(format!("fresh-{name}"));
        let mut all = vec![
            "segment",
            ct.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let f_s = f.to_string_lossy().into_owned();
        all.extend(["--out", &f_s]);
        let res = common::segvol(&all);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        read_volume(&f).unwrap().data
    };
    let session_mask = |name: &str| read_volume(&tmp.path().join(name)).unwrap().data;
    assert_eq!(
        session_mask("liver.nii.gz"),
        fresh(&["--text", "liver"], "liver.nii.gz")
    );
    assert_eq!(
        session_mask("box.nii.gz"),
        fresh(
            &["--text", "liver", "--box", "30,30,8,80,70,22"],
            "box.nii.gz"
        )
    );
    assert_eq!(
        session_mask("pts.nii.gz"),
        fresh(
            &["--point", "60,50,15", "--negative-point", "40,45,12"],
            "pts.nii.gz"
        )
    );
    assert_eq!(
        session_mask("spleen.nii.gz"),
        fresh(&["--text", "spleen"], "spleen.nii.gz")
    );
}

/// `keep_roi` (a documented departure): a refinement inside the previous ROI keeps that ROI
/// and its windows, so with the cache on it runs no encoder pass; without a previous ROI the
/// prompt runs as usual and says so.
#[test]
fn keep_roi_refines_inside_the_previous_roi_without_encoder_passes() {
    use segvol::pipeline::PromptOptions;
    with_session(|model, session| {
        let keep = PromptOptions { keep_roi: true };
        let refine = UserPrompt {
            points: vec![[60, 50, 15]],
            positive: vec![true],
            ..text("liver")
        };
        let fresh = session.segment_with(&refine, keep, &mut |_, _| {}).unwrap();
        assert!(!fresh.roi_kept, "no previous ROI to keep");
        let first = session.segment(&text("liver"), &mut |_, _| {}).unwrap();
        let builds = model.runtime_stats().builds;
        let refined = session.segment_with(&refine, keep, &mut |_, _| {}).unwrap();
        assert!(refined.roi_kept);
        assert_eq!(refined.roi, first.roi);
        assert_eq!(refined.windows.len(), first.windows.len());
        assert_eq!(
            refined.cached_windows,
            refined.windows.len(),
            "an encoder pass ran"
        );
        assert_eq!(
            model.runtime_stats().builds,
            builds,
            "a new program was built"
        );
    });
}

/// `identify` ranks candidates by the mean sigmoid of their text-conditioned logits inside the
/// spatial prompt's mask: the same ranking as explicit per-candidate runs, which reuse every
/// cached window (no encoder pass).
#[test]
fn identify_ranks_as_explicit_per_candidate_runs() {
    use segvol::pipeline::{mean_sigmoid_inside, PromptOptions, DEFAULT_CANDIDATES};
    with_session(|_, session| {
        let spatial = UserPrompt {
            bbox: Some([30, 30, 8, 80, 70, 22]),
            ..UserPrompt::default()
        };
        let candidates: Vec<String> = DEFAULT_CANDIDATES[..8]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let id = session.identify(&spatial, &candidates).unwrap();
        assert_eq!(id.ranked.len(), candidates.len());
        let shares: f64 = id.ranked.iter().map(|r| r.2).sum();
        assert!((shares - 1.0).abs() < 1e-9, "shares sum to {shares}");
        assert!(id.ranked.windows(2).all(|w| w[0].1 >= w[1].1), "not sorted");
        // Explicit runs: the spatial prompt alone, then each candidate inside its ROI.
        let base = session.segment(&spatial, &mut |_, _| {}).unwrap();
        assert_eq!(base.voxels, id.mask_voxels);
        let mut explicit = Vec::new();
        for c in &candidates {
            session.segment(&spatial, &mut |_, _| {}).unwrap(); // the spatial prompt's ROI again
            let out = session
                .segment_with(
                    &UserPrompt {
                        text: Some(c.clone()),
                        ..spatial.clone()
                    },
                    PromptOptions { keep_roi: true },
                    &mut |_, _| {},
                )
                .unwrap();
            assert!(out.roi_kept && out.roi == base.roi, "{c}: ROI not kept");
            assert_eq!(
                out.cached_windows,
                out.windows.len(),
                "{c}: an encoder pass ran"
            );
            explicit.push((c.clone(), mean_sigmoid_inside(&out.logits, &base.mask)));
        }
        let best = explicit
            .iter()
            .fold(&explicit[0], |b, x| if x.1 > b.1 { x } else { b });
        assert_eq!(id.ranked[0].0, best.0);
        for (name, score, _) in &id.ranked {
            let e = explicit.iter().find(|x| &x.0 == name).unwrap();
            assert_eq!(
                *score, e.1,
                "{name}: identify and the explicit run disagree"
            );
        }
        // A text is not a spatial prompt.
        assert!(session.identify(&text("liver"), &candidates).is_err());
    });
}

/// `segment --identify` prints the top five and reports every candidate, best first, with the
/// spatial prompt's mask written as usual.
#[test]
fn segment_identify_ranks_a_candidates_file() {
    let tmp = tempfile::tempdir().unwrap();
    let names = tmp.path().join("names.txt");
    std::fs::write(
        &names,
        "# organs\nliver\nspleen\n\nleft kidney\npancreas\naorta\nstomach\n",
    )
    .unwrap();
    let out = tmp.path().join("m.nii.gz");
    let report = tmp.path().join("r.json");
    let model = common::tiny().join("model");
    let res = common::segvol(&[
        "segment",
        tiny_ct().to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--box",
        "30,30,8,80,70,22",
        "--identify",
        "--candidates",
        names.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert_eq!(err.matches("segvol: identify #").count(), 5, "{err}");
    assert!(out.is_file());
    let r = common::json(&report);
    let ranked = r["identify"].as_array().unwrap();
    let mut got: Vec<&str> = ranked.iter().map(|x| x[0].as_str().unwrap()).collect();
    let scores: Vec<f64> = ranked.iter().map(|x| x[1].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "not best first: {scores:?}"
    );
    got.sort();
    assert_eq!(
        got,
        [
            "aorta",
            "left kidney",
            "liver",
            "pancreas",
            "spleen",
            "stomach"
        ]
    );
    // --identify names a spatial prompt: a text is refused by the parser.
    let res = common::segvol(&[
        "segment",
        tiny_ct().to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--text",
        "liver",
        "--identify",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res.status.code(), Some(2));
}

/// `Engine` sessions own their share of the model: two opened on one engine, used on two
/// threads at once after the engine is gone, give the bytes of the one-shot run.
#[test]
fn engine_sessions_outlive_the_engine_and_run_on_other_threads() {
    let vol = read_volume(&tiny_ct()).unwrap();
    for dut in common::devices() {
        engine_sessions_on(&dut, &vol);
    }
}

// Before sessions took turns on the model (`SegVol::exclusive`) and the decoder's staging was
// done under the runtime's lock, this failed about one run in six: one thread's prompt tokens
// or reduction scratch overwritten by the other's.
fn engine_sessions_on(dut: &common::DeviceUnderTest, vol: &segvol::io::nifti::Volume) {
    let engine = pipeline::Engine::new(
        SegVol::load(&common::tiny().join("model"), dut.open()).unwrap(),
        Options::default(),
    );
    let prompts = sequence();
    let want = engine
        .segment(&vol.data, vol.model_dims(), &prompts, &mut |_, _| {})
        .unwrap();
    let sessions: Vec<_> = (0..2)
        .map(|_| {
            engine
                .open(&vol.data, vol.model_dims(), Request::default())
                .unwrap()
        })
        .collect();
    drop(engine);
    let got: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = sessions
            .into_iter()
            .map(|session| {
                let prompts = &prompts;
                s.spawn(move || {
                    let outs: Vec<_> = prompts
                        .iter()
                        .map(|p| session.segment(p, &mut |_, _| {}).unwrap())
                        .collect();
                    let outcome = session.outcome(outs);
                    (0..prompts.len()).map(|p| outcome.mask(p)).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, masks) in got.iter().enumerate() {
        for (p, mask) in masks.iter().enumerate() {
            assert_eq!(
                mask,
                &want.mask(p),
                "{}: thread {t}: prompt {p}",
                dut.label()
            );
        }
    }
}

/// The reference pipeline fixtures (fixtures README §4) through the library flow a server or
/// Python uses: one `Engine`, one session per CT, every case of that CT prompted on the same
/// session (later cases hit the cache of earlier ones): final logits within the fixtures'
/// tolerance and the reference mask (Dice >= 0.999 in f32).
fn pipeline_fixtures_through_one_session(
    model_dir: &std::path::Path,
    dir: &std::path::Path,
    cases: &[&str],
    logits_tol: f32,
) {
    let engine = pipeline::Engine::new(
        SegVol::load(model_dir, common::devices()[0].open()).unwrap(),
        Options {
            batch: 4,
            ..Options::default()
        },
    );
    let mut sessions: Vec<(String, Session<'static>, segvol::io::nifti::Volume)> = vec![];
    for case in cases {
        let meta = common::json(&dir.join(format!("pipeline-{case}.json")));
        let ct = meta["ct"].as_str().unwrap().to_string();
        if !sessions.iter().any(|(c, _, _)| *c == ct) {
            let vol = read_volume(&dir.join(&ct)).unwrap();
            let s = engine
                .open(
                    &vol.data,
                    vol.model_dims(),
                    Request {
                        cache_bytes: 1 << 30,
                        ..Request::default()
                    },
                )
                .unwrap();
            sessions.push((ct.clone(), s, vol));
        }
        let (_, session, vol) = sessions.iter().find(|(c, _, _)| *c == ct).unwrap();
        let prompts = &meta["prompts"];
        let bbox = prompts
            .get("box_original_ijk")
            .filter(|b| !b.is_null())
            .map(|b| {
                let v: Vec<usize> = b
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                [v[0], v[1], v[2], v[3], v[4], v[5]]
            });
        let p = UserPrompt {
            text: Some(prompts["text"].as_str().unwrap().into()),
            bbox,
            ..UserPrompt::default()
        };
        let got = session.segment(&p, &mut |_, _| {}).unwrap();
        let want = segvol::tensor::read_tensor(
            &dir.join(format!("pipeline-{case}.safetensors")),
            "final_logits",
        )
        .unwrap();
        let err =
            segvol::tensor::HostTensor::new(vec![got.logits.len()], got.logits.clone()).rel_err(
                &segvol::tensor::HostTensor::new(vec![want.data.len()], want.data),
            );
        assert!(err < logits_tol, "{case}: final logits {err:.3e}");
        let mask = session.outcome(vec![got]).mask(0);
        let reference = read_volume(&dir.join(meta["final"]["mask_nifti"].as_str().unwrap()))
            .unwrap()
            .data;
        assert_eq!(mask.len(), vol.len(), "{case}: mask on the original grid");
        let (mut tp, mut n) = (0usize, 0usize);
        for (&m, &r) in mask.iter().zip(&reference) {
            tp += (m != 0 && r != 0.0) as usize;
            n += (m != 0) as usize + (r != 0.0) as usize;
        }
        let dice = if n == 0 {
            1.0
        } else {
            2.0 * tp as f64 / n as f64
        };
        let exact = common::devices()[0].precision == segvol::DType::F32;
        let min = if exact { 0.999 } else { 0.99 };
        assert!(dice >= min, "{case}: Dice {dice}");
    }
}

#[test]
fn tiny_pipeline_fixtures_through_one_engine_session() {
    let dir = common::tiny();
    // box-text before text: the second prompt on the CT runs on the first one's session.
    pipeline_fixtures_through_one_session(
        &dir.join("model"),
        &dir,
        &["box-text", "text", "box-text-1win"],
        common::devices()[0].tolerance(),
    );
}

#[test]
#[ignore = "slow: full-size pipelines; run with SEGVOL_FIXTURES set"]
fn full_pipeline_fixtures_through_one_engine_session() {
    let Some(root) = common::full_fixtures() else {
        return;
    };
    // The full fixtures store final_logits as F16 (fixtures README §6: 2e-3).
    pipeline_fixtures_through_one_session(
        &common::full_model_dir(),
        &root.join("full"),
        &["box-text", "text"],
        2e-3,
    );
}
