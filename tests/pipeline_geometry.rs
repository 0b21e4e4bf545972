//! Zoom-out-zoom-in geometry against the reference (spec §6.5–§6.8, fixtures README §4–§6):
//! every case of `pipeline-geometry.json` (ROI, padding, scan interval, window list, window
//! boxes, blending), and the window lists and boxes of the tiny and full pipeline fixtures
//! recomputed from their own zoom-out logits.

use segvol::backend::BBox;
use segvol::pipeline::geometry::{self, box_prompt, Roi, SlidingWindows};
use segvol::tensor::read_tensor;
use serde_json::Value;

mod common;

use common::{fixtures, full_fixtures as shared_fixtures, json};

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not an index: {x}")) as usize)
        .collect()
}

fn dims3(v: &Value) -> [usize; 3] {
    usizes(v).try_into().unwrap()
}

fn bbox(v: &Value) -> BBox {
    usizes(v).try_into().unwrap()
}

/// A JSON box (`[-1]*6` for none) as the model's f32 prompt.
fn box_value(v: &Value) -> [f32; 6] {
    let a: Vec<f32> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as f32)
        .collect();
    a.try_into().unwrap()
}

/// `[[start, stop]; 3]` from JSON.
fn ranges(v: &Value) -> [[usize; 2]; 3] {
    let a: Vec<[usize; 2]> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| usizes(r).try_into().unwrap())
        .collect();
    a.try_into().unwrap()
}

fn idx(dims: [usize; 3], p: [usize; 3]) -> usize {
    (p[0] * dims[1] + p[1]) * dims[2] + p[2]
}

/// Fills the inclusive box with `v`.
fn fill_box(x: &mut [f32], dims: [usize; 3], b: BBox, v: f32) {
    for d in b[0]..=b[3].min(dims[0] - 1) {
        for h in b[1]..=b[4].min(dims[1] - 1) {
            for w in b[2]..=b[5].min(dims[2] - 1) {
                x[idx(dims, [d, h, w])] = v;
            }
        }
    }
}

/// splitmix64 in [0, 1): the stand-in ROI image of the blend check.
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    segvol::rng::SplitMix64(seed).values(n, 0.0, 1.0)
}

/// ROI bounds and shape against a case (`None` when the fixture bounds are null).
fn check_roi(roi: Option<Roi>, bounds: &Value, shape: Option<&Value>, what: &str) -> Option<Roi> {
    if bounds.as_array().unwrap().iter().all(Value::is_null) {
        assert_eq!(
            roi, None,
            "{what}: the prediction is empty, so there is no ROI"
        );
        return None;
    }
    let roi = roi.unwrap_or_else(|| panic!("{what}: expected an ROI"));
    assert_eq!(roi.bounds, bbox(bounds), "{what}: ROI bounds");
    if let Some(s) = shape {
        assert_eq!(roi.shape, dims3(s), "{what}: ROI shape");
    }
    Some(roi)
}

/// Spec §6.8 steps 6–7 with the stand-in predictor `window + 10 * index`: returns
/// `blended - input` on the ROI.
fn blend_check(sw: &SlidingWindows, input: &[f32]) -> Vec<f32> {
    let padded_n: usize = sw.padded.iter().product();
    let mut acc = vec![0f32; padded_n];
    let mut cnt = vec![0f32; padded_n];
    let mut win = vec![0f32; sw.window.iter().product()];
    for i in 0..sw.len() {
        sw.extract_window(i, input, &mut win);
        for v in win.iter_mut() {
            *v += 10.0 * i as f32;
        }
        sw.accumulate(i, &win, &mut acc, &mut cnt);
    }
    let out = sw.blend(&acc, &cnt);
    out.iter().zip(input).map(|(o, i)| o - i).collect()
}

#[test]
fn geometry_fixture_every_case() {
    let fx = json(&fixtures().join("pipeline-geometry.json"));
    let overlap = fx["overlap"].as_f64().unwrap();
    assert_eq!(fx["blend_mode"], "constant");
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    let mut checked_windows = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let window = dims3(&case["spatial_size"]);
        let cropped = dims3(&case["cropped_shape"]);
        let n: usize = cropped.iter().product();

        // The synthetic zoom-out prediction: +1 inside the positive boxes, -1 elsewhere.
        let mut logits = vec![-1f32; n];
        for b in case["positive_boxes_dhw"].as_array().unwrap() {
            fill_box(&mut logits, cropped, bbox(b), 1.0);
        }
        let roi = geometry::roi_from_logits(&logits, cropped, window).unwrap();
        let Some(roi) = check_roi(roi, &case["roi_bounds_dhw"], Some(&case["roi_shape"]), name)
        else {
            assert!(case.get("windows").is_none());
            continue;
        };

        let sw = SlidingWindows::new(roi.shape, window, overlap).unwrap();
        assert_eq!(
            sw.pad_before,
            dims3(&case["pad_before_dhw"]),
            "{name}: pad before"
        );
        assert_eq!(
            sw.padded,
            dims3(&case["padded_image_size"]),
            "{name}: padded size"
        );
        assert_eq!(
            sw.interval,
            dims3(&case["scan_interval"]),
            "{name}: scan interval"
        );
        let want_windows = case["windows"].as_array().unwrap();
        assert_eq!(sw.len(), want_windows.len(), "{name}: number of windows");
        for (i, w) in want_windows.iter().enumerate() {
            assert_eq!(sw.padded_range(i), ranges(w), "{name}: window {i}");
        }
        checked_windows += sw.len();

        // Window boxes (spec §6.8 step 5).
        let use_box = case["use_box"].as_bool().unwrap();
        let prompt_map = case["prompt_cube_dhw"].as_array().map(|_| {
            let mut m = vec![0f32; n];
            fill_box(&mut m, cropped, bbox(&case["prompt_cube_dhw"]), 1.0);
            m
        });
        let boxes = case["window_boxes"].as_array().unwrap();
        for (i, want) in boxes.iter().enumerate() {
            if !use_box {
                assert!(want.is_null(), "{name}: text-only windows get no box");
                continue;
            }
            let got = if sw.len() == 1 {
                let m = prompt_map
                    .as_ref()
                    .expect("single-window box cases give the cube");
                sw.box_from_prompt_map(i, m, cropped, &roi)
            } else {
                sw.window_box(
                    i,
                    &roi,
                    cropped,
                    None,
                    &mut common::host_pipeline::host_prediction(&logits, cropped),
                )
                .unwrap()
            };
            assert_eq!(box_prompt(got), box_value(want), "{name}: window {i} box");
        }

        // Blending: blended output minus the ROI input is 10 x the mean index of the windows
        // covering each voxel (fixtures README §5).
        let roi_n: usize = roi.shape.iter().product();
        let input = pseudo_random(roi_n, 0x5eed ^ roi_n as u64);
        let value = blend_check(&sw, &input);
        // Every voxel against the exact value from the fixture's own window list.
        let mut idx_sum = vec![0f64; roi_n];
        let mut idx_cnt = vec![0u32; roi_n];
        for (i, w) in want_windows.iter().enumerate() {
            let r = ranges(w);
            for d in r[0][0]..r[0][1] {
                for h in r[1][0]..r[1][1] {
                    for x in r[2][0]..r[2][1] {
                        let p = [d, h, x];
                        let q: Vec<i64> = (0..3)
                            .map(|a| p[a] as i64 - sw.pad_before[a] as i64)
                            .collect();
                        if (0..3).all(|a| q[a] >= 0 && q[a] < roi.shape[a] as i64) {
                            let k = idx(roi.shape, [q[0] as usize, q[1] as usize, q[2] as usize]);
                            idx_sum[k] += i as f64;
                            idx_cnt[k] += 1;
                        }
                    }
                }
            }
        }
        // f32 error bound of summing `c` terms of magnitude <= m, dividing and subtracting:
        // (c + 2) rounding errors of at most eps * m each.
        let m = 1.0 + 10.0 * (sw.len() - 1) as f64;
        let mut worst = 0f64;
        for k in 0..roi_n {
            assert!(
                idx_cnt[k] > 0,
                "{name}: voxel {k} not covered by any window"
            );
            let err = (value[k] as f64 - 10.0 * idx_sum[k] / idx_cnt[k] as f64).abs();
            let tol = (idx_cnt[k] + 2) as f64 * m * f32::EPSILON as f64;
            assert!(
                err <= tol,
                "{name}: blend at voxel {k}: error {err:.2e} > {tol:.2e}"
            );
            worst = worst.max(err);
        }
        let bc = &case["blend_check"];
        for (p, v) in bc["probe_dhw"]
            .as_array()
            .unwrap()
            .iter()
            .zip(bc["probe_values"].as_array().unwrap())
        {
            let got = value[idx(roi.shape, dims3(p))] as f64;
            let want = v.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-4,
                "{name}: blend probe {p}: got {got}, want {want}"
            );
        }
        let sum: f64 = value.iter().map(|&v| v as f64).sum();
        let want = bc["sum_f64"].as_f64().unwrap();
        // Both sums carry the f32 rounding of (sum of window values) / count - input, at most a
        // few ulp of the largest value per voxel; 1e-9 relative is far below one voxel's worth.
        let tol = 1e-9 * want.abs().max(1.0);
        eprintln!(
            "{name}: {} windows, blend max error {worst:.2e}, sum {sum} (fixture {want}, diff {:.3e})",
            sw.len(),
            sum - want
        );
        assert!(
            (sum - want).abs() <= tol,
            "{name}: blend sum {sum}, want {want}"
        );
    }
    assert_eq!(checked_windows, 1 + 3 + 18 + 4 + 1 + 60 + 60);
}

/// The checks of one `pipeline-<case>.json` given its zoom-out logits on the window.
fn check_pipeline_case(
    meta: &Value,
    zoom_logits: &[f32],
    window: [usize; 3],
    global_ref: Option<&[f32]>,
) {
    let case = meta["case"].as_str().unwrap().to_string();
    let cropped = dims3(&meta["cropped_shape"]);

    // Spec §6.6 step 3: L_global is the nearest (legacy) upsampling of the zoom-out logits.
    let global = common::host_pipeline::global_logits(zoom_logits, window, cropped).unwrap();
    if let Some(r) = global_ref {
        assert!(
            global
                .iter()
                .zip(r)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{case}: global_logits_nearest differs"
        );
    }

    // Prompts: the user's box, mapped to the zoom-out frame (fixtures README §4).
    let prompts = &meta["prompts"];
    let zoom_box = if prompts.get("box_cropped_dhw").is_some() {
        let ijk = usizes(&prompts["box_original_ijk"]);
        let dhw = bbox(&prompts["box_original_dhw"]);
        assert_eq!(
            dhw,
            [ijk[2], ijk[1], ijk[0], ijk[5], ijk[4], ijk[3]],
            "{case}: ijk -> dhw"
        );
        let start = dims3(&meta["crop"]["start"]);
        let bc = bbox(&prompts["box_cropped_dhw"]);
        assert_eq!(
            bc,
            [0, 1, 2, 3, 4, 5].map(|k| dhw[k] - start[k % 3]),
            "{case}: crop offset"
        );
        let zb = geometry::box_zoom_out_dhw(bc, cropped, window).unwrap();
        assert_eq!(
            zb,
            bbox(&prompts["box_zoom_out_dhw"]),
            "{case}: box_zoom_out_dhw"
        );
        assert_eq!(zb, bbox(&meta["zoom_out"]["box"]), "{case}: zoom-out box");
        Some(zb)
    } else {
        assert!(meta["zoom_out"]["box"].is_null());
        None
    };

    // Spec §6.7.
    let roi = geometry::roi_from_logits(&global, cropped, window).unwrap();
    let roi = check_roi(
        roi,
        &meta["roi"]["official_bounds_dhw"],
        Some(&meta["roi"]["shape"]),
        &case,
    )
    .expect("the random-weight pipelines always find an ROI");

    // Spec §6.8.
    let s = &meta["sliding_window"];
    assert_eq!(dims3(&s["roi_size"]), window);
    let sw = SlidingWindows::new(roi.shape, window, s["overlap"].as_f64().unwrap()).unwrap();
    assert_eq!(
        sw.padded,
        dims3(&s["padded_image_size"]),
        "{case}: padded size"
    );
    assert_eq!(
        sw.pad_before,
        dims3(&s["pad_before_dhw"]),
        "{case}: pad before"
    );
    assert_eq!(
        sw.interval,
        dims3(&s["scan_interval"]),
        "{case}: scan interval"
    );
    let wins = s["windows"].as_array().unwrap();
    assert_eq!(sw.len(), wins.len(), "{case}: number of windows");
    assert_eq!(sw.len() as u64, s["num_windows"].as_u64().unwrap());
    let source = s["box_prompt_source"].as_str();
    for (i, w) in wins.iter().enumerate() {
        assert_eq!(w["index"].as_u64().unwrap() as usize, i);
        assert_eq!(
            sw.padded_range(i),
            ranges(&w["padded_roi_range"]),
            "{case}: window {i}"
        );
        assert_eq!(
            sw.roi_range(i),
            ranges(&w["roi_range"]),
            "{case}: window {i} ROI range"
        );
        match source {
            None => assert!(w["box"].is_null() && zoom_box.is_none()),
            Some(src) => {
                let zb = zoom_box.expect("box cases carry a box");
                if sw.len() == 1 {
                    assert!(src.contains("binary cube"), "{case}: {src}");
                } else {
                    assert!(src.contains("prediction"), "{case}: {src}");
                }
                let got = sw
                    .window_box(
                        i,
                        &roi,
                        cropped,
                        Some((zb, window)),
                        &mut common::host_pipeline::host_prediction(&global, cropped),
                    )
                    .unwrap();
                assert_eq!(
                    box_prompt(got),
                    box_value(&w["box"]),
                    "{case}: window {i} box"
                );
                if sw.len() == 1 {
                    // The analytic cube box equals the box of the built, upsampled cube.
                    let cube = geometry::build_binary_cube(zb, window, cropped).unwrap();
                    assert_eq!(got, sw.box_from_prompt_map(i, &cube, cropped, &roi));
                }
            }
        }
    }
    eprintln!("{case}: ROI {:?}, {} windows checked", roi.bounds, sw.len());
}

fn tiny_case(name: &str) {
    let dir = fixtures().join("tiny");
    let meta = json(&dir.join(format!("pipeline-{name}.json")));
    let st = dir.join(format!("pipeline-{name}.safetensors"));
    let zl = read_tensor(&st, "zoom_out_logits").unwrap();
    assert_eq!(zl.shape, vec![1, 1, 32, 64, 64]);
    let gl = read_tensor(&st, "global_logits_nearest").unwrap();
    assert_eq!(gl.shape, usizes(&meta["cropped_shape"]));
    check_pipeline_case(&meta, &zl.data, [32, 64, 64], Some(&gl.data));
}

#[test]
fn tiny_pipeline_text() {
    tiny_case("text");
}

#[test]
fn tiny_pipeline_box_text() {
    tiny_case("box-text");
}

#[test]
fn tiny_pipeline_box_text_single_window() {
    tiny_case("box-text-1win");
}

fn full_case(name: &str) {
    let Some(root) = shared_fixtures() else {
        return;
    };
    let dir = root.join("full");
    let meta = json(&dir.join(format!("pipeline-{name}.json")));
    // The zoom-out call of `text` / `box-text` is exactly `call-<case>` (fixtures README §4).
    assert_eq!(meta["zoom_out"]["equals_call_fixture"], name);
    let zl = read_tensor(
        &dir.join(format!("call-{name}.safetensors")),
        "final_logits",
    )
    .unwrap();
    assert_eq!(zl.shape, vec![1, 1, 32, 256, 256]);
    check_pipeline_case(&meta, &zl.data, [32, 256, 256], None);
}

#[test]
#[ignore = "full-size fixtures: set SEGVOL_FIXTURES"]
fn full_pipeline_text() {
    full_case("text");
}

#[test]
#[ignore = "full-size fixtures: set SEGVOL_FIXTURES"]
fn full_pipeline_box_text() {
    full_case("box-text");
}
