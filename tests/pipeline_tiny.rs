//! Whole zoom-out-zoom-in runs through `segvol segment` against the reference pipeline
//! (fixtures README §4): crop, ROI, window list and window boxes exact, final logits within
//! tolerance, and the mask NIfTI on the original grid with the input's geometry and Dice >=
//! 0.999 (0.99 in reduced precision).

mod common;

use common::{devices, json, DeviceUnderTest};
use segvol::io::nifti::read_volume;
use segvol::tensor::{read_tensor, HostTensor};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn dice(a: &[u8], b: &[u8]) -> f64 {
    let (mut tp, mut pa, mut pb) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        pa += (x != 0) as usize;
        pb += (y != 0) as usize;
        tp += (x != 0 && y != 0) as usize;
    }
    if pa + pb == 0 {
        1.0
    } else {
        2.0 * tp as f64 / (pa + pb) as f64
    }
}

/// Runs one pipeline fixture (`dir/pipeline-<case>.json`) with the model at `model_dir`.
fn check_pipeline(
    model_dir: &Path,
    dir: &Path,
    case: &str,
    dut: &DeviceUnderTest,
    logits_tol: f32,
) {
    let meta = json(&dir.join(format!("pipeline-{case}.json")));
    let ct = dir.join(meta["ct"].as_str().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let (mask_path, report_path, logits_path) = (
        tmp.path().join("mask.nii.gz"),
        tmp.path().join("report.json"),
        tmp.path().join("logits.safetensors"),
    );
    let mut cmd = Command::new(common::segvol_bin());
    cmd.arg("segment")
        .arg(&ct)
        .arg("--model")
        .arg(model_dir)
        .arg("--out")
        .arg(&mask_path);
    cmd.args([
        "--json",
        report_path.to_str().unwrap(),
        "--save-logits",
        logits_path.to_str().unwrap(),
    ]);
    cmd.args([
        "--device",
        &dut.spec,
        "--precision",
        &dut.precision.to_string(),
        "--batch",
        "4",
    ]);
    let prompts = &meta["prompts"];
    cmd.args(["--text", prompts["text"].as_str().unwrap()]);
    if let Some(b) = prompts.get("box_original_ijk").filter(|b| !b.is_null()) {
        let b: Vec<String> = usizes(b).iter().map(|v| v.to_string()).collect();
        cmd.args(["--box", &b.join(",")]);
    }
    let out = cmd.output().unwrap();
    let label = format!("{} {case}", dut.label());
    assert!(
        out.status.success(),
        "{label}: segvol failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&report_path);
    let p = &report["prompts"][0];
    let exact = dut.precision == segvol::DType::F32;

    // Geometry: crop, ROI, windows, boxes (fixtures README §6: exact).
    assert_eq!(
        usizes(&report["crop"]["start_dhw"]),
        usizes(&meta["crop"]["start"]),
        "{label}: crop start"
    );
    assert_eq!(
        usizes(&report["crop"]["end_dhw"]),
        usizes(&meta["crop"]["end"]),
        "{label}: crop end"
    );
    if let Some(zb) = prompts.get("box_zoom_out_dhw") {
        assert_eq!(
            usizes(&p["zoom_out_box_dhw"]),
            usizes(zb),
            "{label}: zoom-out box"
        );
    }
    assert_eq!(
        usizes(&p["roi"]["official_bounds_dhw"]),
        usizes(&meta["roi"]["official_bounds_dhw"]),
        "{label}: ROI"
    );
    let want_windows = meta["sliding_window"]["windows"].as_array().unwrap();
    let got_windows = p["windows"].as_array().unwrap();
    assert_eq!(
        got_windows.len(),
        want_windows.len(),
        "{label}: window count"
    );
    for (i, (g, w)) in got_windows.iter().zip(want_windows).enumerate() {
        assert_eq!(
            g["padded_roi_range"], w["padded_roi_range"],
            "{label}: window {i} range"
        );
        match (g["box"].as_array(), w["box"].as_array()) {
            (None, None) => {}
            (Some(gb), Some(wb)) => {
                let gb: Vec<f64> = gb.iter().map(|v| v.as_f64().unwrap()).collect();
                let wb: Vec<f64> = wb.iter().map(|v| v.as_f64().unwrap()).collect();
                if exact {
                    assert_eq!(gb, wb, "{label}: window {i} box");
                } else {
                    // Boxes are bboxes of thresholded reduced-precision logits: a voxel or two.
                    assert!(
                        gb.iter().zip(&wb).all(|(a, b)| (a - b).abs() <= 2.0),
                        "{label}: window {i} box {gb:?} vs {wb:?}"
                    );
                }
            }
            (g, w) => panic!("{label}: window {i} box {g:?} vs {w:?}"),
        }
    }

    // Logits on the cropped grid.
    let got = read_tensor(&logits_path, "final_logits").unwrap();
    let want = read_tensor(
        &dir.join(format!("pipeline-{case}.safetensors")),
        "final_logits",
    )
    .unwrap();
    let want = HostTensor::new(usizes(&meta["tensors"]["final_logits"]["shape"]), want.data);
    let err = got.rel_err(&want);
    eprintln!("{label}: final logits max|diff|/max|ref| = {err:.2e}");
    assert!(
        err < logits_tol,
        "{label}: final logits {err:.3e} >= {logits_tol:.0e}"
    );

    // The mask on the original grid, with the input's geometry.
    let ours = read_volume(&mask_path).unwrap();
    let reference = read_volume(&dir.join(meta["final"]["mask_nifti"].as_str().unwrap())).unwrap();
    let input = read_volume(&ct).unwrap();
    assert_eq!(ours.dims, input.dims, "{label}: mask dims");
    assert_eq!(ours.affine, input.affine, "{label}: mask affine");
    let (h, r) = (&ours.header, &reference.header);
    assert_eq!((h.datatype, h.bitpix), (2, 8), "{label}: uint8 mask");
    assert_eq!(
        (h.qform_code, h.sform_code, h.pixdim, h.srow, h.xyzt_units),
        (r.qform_code, r.sform_code, r.pixdim, r.srow, r.xyzt_units),
        "{label}: header fields"
    );
    let a: Vec<u8> = ours.data.iter().map(|&v| v as u8).collect();
    let b: Vec<u8> = reference.data.iter().map(|&v| v as u8).collect();
    assert!(a.iter().all(|&v| v <= 1), "{label}: mask values are 0/1");
    let d = dice(&a, &b);
    eprintln!("{label}: Dice {d:.5}");
    assert!(d >= if exact { 0.999 } else { 0.99 }, "{label}: Dice {d}");
}

#[test]
fn tiny_pipeline_fixtures_through_the_cli() {
    let dir = common::tiny();
    for dut in devices() {
        for case in ["text", "box-text", "box-text-1win"] {
            check_pipeline(&dir.join("model"), &dir, case, &dut, dut.tolerance());
        }
    }
}

#[test]
#[ignore = "slow: full-size pipelines; run with SEGVOL_FIXTURES set"]
fn full_pipeline_fixtures_through_the_cli() {
    let Some(root) = common::full_fixtures() else {
        return;
    };
    let model = common::full_model_dir();
    for dut in devices().into_iter().filter(|d| d.spec != "emu") {
        for case in ["text", "box-text"] {
            // The full fixtures store final_logits as F16 (fixtures README §6: 2e-3).
            let tol = if dut.precision == segvol::DType::F32 {
                2e-3
            } else {
                2e-2
            };
            check_pipeline(&model, &root.join("full"), case, &dut, tol);
        }
    }
}
