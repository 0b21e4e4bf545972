//! The command line on bad input: every fault exits with status 2 and one message that names
//! it, never a panic, and never leaves an output file behind (DESIGN.md, "Errors").

mod common;

use segvol::io::nifti::{read_volume, Header};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::segvol;

/// Asserts exit status 2, no panic, and that stderr mentions every `needle`.
fn assert_fails(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2, got {:?}: {err}",
        out.status.code()
    );
    assert!(!err.contains("panicked"), "panic: {err}");
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

/// Copies the tiny model directory (safetensors only) into `dir`.
fn copy_model(dir: &Path) {
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(tiny_model().join(f), dir.join(f)).unwrap();
    }
}

/// A window input file holding `input` of `shape`, pseudo-random values in [0, 1].
fn window_input(path: &Path, shape: &[usize]) {
    let n: usize = shape.iter().product();
    let data = common::parity::random(n, 0.5, 7)
        .iter()
        .map(|v| v + 0.5)
        .collect();
    let t = segvol::tensor::HostTensor::new(shape.to_vec(), data);
    segvol::tensor::write_safetensors(path, &[("input", &t)]).unwrap();
}

fn write_prompt(path: &Path, json: &str) {
    std::fs::write(path, json).unwrap();
}

/// Runs `segvol window` with the tiny model in `model` and checks the failure.
fn window_fails(model: &Path, input_shape: &[usize], prompt: &str, needles: &[&str]) {
    window_fails_on(model, input_shape, prompt, &[], needles)
}

fn window_fails_on(
    model: &Path,
    input_shape: &[usize],
    prompt: &str,
    extra: &[&str],
    needles: &[&str],
) {
    let tmp = tempfile::tempdir().unwrap();
    let (input, prompt_path, out) = (
        tmp.path().join("in.safetensors"),
        tmp.path().join("p.json"),
        tmp.path().join("out.safetensors"),
    );
    window_input(&input, input_shape);
    write_prompt(&prompt_path, prompt);
    let mut args = vec![
        "window",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--prompt",
        prompt_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    assert_fails(&segvol(&args), needles);
    assert!(!out.exists(), "a failed run left {}", out.display());
}

const WINDOW: [usize; 5] = [1, 1, 32, 64, 64];

#[test]
fn window_runs_and_writes_the_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, prompt, out) = (
        tmp.path().join("in.safetensors"),
        tmp.path().join("p.json"),
        tmp.path().join("out.safetensors"),
    );
    window_input(&input, &WINDOW);
    write_prompt(
        &prompt,
        r#"{"text": "liver", "box": [0, 17, 22, 31, 57, 55]}"#,
    );
    let res = segvol(&[
        "window",
        "--model",
        tiny_model().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--prompt",
        prompt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--stages",
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let t = segvol::tensor::read_safetensors(&out).unwrap();
    for name in [
        "final_logits",
        "patch_embedding",
        "vit_block0",
        "image_embedding",
        "dense_pe",
        "text_pooled",
        "text_embedding",
        "sparse_embeddings",
        "decoder_tokens",
        "low_res_masks",
    ] {
        assert!(t.contains_key(name), "missing {name}");
    }
    assert_eq!(t["final_logits"].shape, WINDOW);
    assert_eq!(t["sparse_embeddings"].shape, [1, 3, 96]);
}

#[test]
fn truncated_safetensors_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let f = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    window_fails(
        tmp.path(),
        &WINDOW,
        r#"{"text": "liver"}"#,
        &["model.safetensors"],
    );
}

#[test]
fn config_with_a_wrong_field_type() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replacen("\"layers\": 2", "\"layers\": \"two\"", 1),
    )
    .unwrap();
    window_fails(
        tmp.path(),
        &WINDOW,
        r#"{"text": "liver"}"#,
        &["config.json", "layers", "positive integer"],
    );
}

#[test]
fn box_outside_the_window() {
    window_fails(
        &tiny_model(),
        &WINDOW,
        r#"{"box": [0, 0, 0, 31, 64, 10]}"#,
        &["box", "outside", "32x64x64"],
    );
}

#[test]
fn prompt_file_with_no_prompt() {
    window_fails(&tiny_model(), &WINDOW, r#"{"labels": []}"#, &["no prompt"]);
}

#[test]
fn input_tensor_of_the_wrong_shape() {
    window_fails(
        &tiny_model(),
        &[1, 1, 32, 64, 63],
        r#"{"text": "liver"}"#,
        &["input", "[1, 1, 32, 64, 63]", "(1, 1, 32, 64, 64)"],
    );
}

#[test]
fn window_on_cuda_without_a_driver() {
    if segvol::backend::cuda::driver_present() {
        eprintln!("skipped: a CUDA driver is present on this machine");
        return;
    }
    window_fails_on(
        &tiny_model(),
        &WINDOW,
        r#"{"text": "liver"}"#,
        &["--device", "cuda"],
        &["cuda", "CUDA driver not found"],
    );
}

// ----- segvol segment -----

/// Runs `segvol segment` on `input` with `extra` arguments and checks the failure and that
/// no mask was written.
fn segment_fails(input: &Path, extra: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mask.nii.gz");
    let model = tiny_model();
    let mut args = vec![
        "segment",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let res = segvol(&args);
    assert_fails(&res, needles);
    assert!(!out.exists(), "a failed run left {}", out.display());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed run left files: {left:?}");
}

/// Writes an uncompressed NIfTI-1 f32 volume with the tiny CT's header, new dims and data.
fn write_nii(path: &Path, dims: &[i64], data: &[f32], with_affine: bool) {
    let ct = read_volume(&tiny_ct()).unwrap();
    let mut h: Header = ct.header.clone();
    h.dim = [0; 8];
    h.dim[0] = dims.len() as i64;
    for (i, &d) in dims.iter().enumerate() {
        h.dim[i + 1] = d;
    }
    for i in dims.len() + 1..8 {
        h.dim[i] = 1;
    }
    h.datatype = 16;
    h.bitpix = 32;
    h.vox_offset = 352;
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    if !with_affine {
        h.qform_code = 0;
        h.sform_code = 0;
    }
    let mut bytes = h.to_bytes();
    bytes.resize(352, 0);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn ct_like(f: impl Fn(usize) -> f32) -> Vec<f32> {
    (0..40 * 36 * 20).map(f).collect()
}

#[test]
fn segment_runs_on_the_tiny_ct() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("liver.nii.gz");
    let report = tmp.path().join("r.json");
    let res = segvol(&[
        "segment",
        tiny_ct().to_str().unwrap(),
        "--model",
        tiny_model().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--text",
        "liver",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let mask = read_volume(&out).unwrap();
    assert_eq!(mask.dims, [122, 101, 30]);
    let r = common::json(&report);
    for stage in ["read", "preprocess", "zoom_out", "zoom_in", "write"] {
        assert!(r["seconds"][stage].as_f64().is_some(), "stage time {stage}");
    }
    assert_eq!(r["prompts"][0]["window_count"], 6);
    assert!(r["prompts"][0]["volume_ml"].as_f64().unwrap() > 0.0);
}

#[test]
fn not_a_nifti() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("noise.nii");
    std::fs::write(
        &f,
        common::parity::random(1000, 1.0, 3)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    segment_fails(&f, &["--text", "liver"], &["noise.nii"]);
}

#[test]
fn truncated_gzip() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("cut.nii.gz");
    let bytes = std::fs::read(tiny_ct()).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    segment_fails(&f, &["--text", "liver"], &["cut.nii.gz"]);
}

#[test]
fn two_dimensional_image() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("flat.nii");
    write_nii(
        &f,
        &[40, 36],
        &(0..40 * 36).map(|i| (i % 97) as f32).collect::<Vec<_>>(),
        true,
    );
    segment_fails(&f, &["--text", "liver"], &["flat.nii", "2-D"]);
}

#[test]
fn constant_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("flat.nii");
    write_nii(&f, &[40, 36, 20], &ct_like(|_| -1000.0), true);
    segment_fails(&f, &["--text", "liver"], &["flat.nii", "constant volume"]);
}

#[test]
fn nan_voxels() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("nan.nii");
    write_nii(
        &f,
        &[40, 36, 20],
        &ct_like(|i| if i == 777 { f32::NAN } else { (i % 300) as f32 }),
        true,
    );
    segment_fails(&f, &["--text", "liver"], &["nan.nii", "NaN"]);
}

#[test]
fn box_outside_the_volume() {
    segment_fails(
        &tiny_ct(),
        &["--box", "0,0,0,10,10,30"],
        &[
            "example_ct_sm",
            "box 0,0,0,10,10,30: lies outside",
            "122x101x30",
        ],
    );
}

#[test]
fn point_outside_the_volume() {
    segment_fails(
        &tiny_ct(),
        &["--point", "122,5,5"],
        &["point 122,5,5: lies outside", "122x101x30"],
    );
}

#[test]
fn millimetres_without_an_affine() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("noaffine.nii");
    write_nii(&f, &[40, 36, 20], &ct_like(|i| (i % 300) as f32), false);
    segment_fails(
        &f,
        &["--mm", "--point", "10,10,10"],
        &["noaffine.nii", "affine"],
    );
}

#[test]
fn missing_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.nii.gz");
    let res = segvol(&[
        "segment",
        tiny_ct().to_str().unwrap(),
        "--model",
        "/nonexistent/segvol-model",
        "--out",
        out.to_str().unwrap(),
        "--text",
        "liver",
    ]);
    assert_fails(&res, &["/nonexistent/segvol-model"]);
    assert!(!out.exists());
}

#[test]
fn segment_on_cuda_without_a_driver() {
    if segvol::backend::cuda::driver_present() {
        eprintln!("skipped: a CUDA driver is present on this machine");
        return;
    }
    segment_fails(
        &tiny_ct(),
        &["--text", "liver", "--device", "cuda"],
        &["CUDA driver not found"],
    );
}

#[test]
fn plan_for_a_large_ct_needs_no_device() {
    let res = segvol(&[
        "plan",
        "--shape",
        "512x512x1000",
        "--device",
        "cuda",
        "--precision",
        "bf16",
        "--batch",
        "8",
        "--mem-limit",
        "40G",
    ]);
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for needle in [
        "weights region",
        "volume region",
        "window batch 8",
        "sliding-window accumulator",
    ] {
        assert!(out.contains(needle), "plan lacks {needle:?}:\n{out}");
    }
    let res = segvol(&[
        "plan",
        "--shape",
        "512x512x1000",
        "--precision",
        "bf16",
        "--device",
        "cuda",
        "--mem-limit",
        "2G",
    ]);
    assert_fails(&res, &["even with one window"]);
}
