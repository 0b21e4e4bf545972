//! Issue 9, items 1-4 and 16: label maps, outputs that would overwrite an input or each other,
//! `--out-dir` name collisions, negative coordinates as the README writes them, and `--demo`
//! combinations. Each case runs the real binary with the tiny model.

mod common;

use segvol::io::nifti::read_volume;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::segvol;

fn tiny_model() -> String {
    common::tiny().join("model").to_string_lossy().into_owned()
}

fn tiny_ct() -> PathBuf {
    common::fixtures().join("data/example_ct_sm.nii.gz")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_usage(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "expected exit 2: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn several_texts_into_one_out_write_a_named_label_map() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("labels.nii.gz");
    let report = tmp.path().join("r.json");
    let res = segvol(&[
        "segment",
        s(&tiny_ct()),
        "--model",
        &tiny_model(),
        "--text",
        "liver",
        "--text",
        "spleen",
        "--no-zoom-in",
        "--out",
        s(&out),
        "--json",
        s(&report),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let map = read_volume(&out).unwrap();
    assert!(map.data.iter().all(|&v| v == 0.0 || v == 1.0 || v == 2.0));
    // The names travel in the header extension and in the report.
    let raw = common::gunzip_file(&out);
    let vox_offset = f32::from_le_bytes(raw[108..112].try_into().unwrap()) as usize;
    assert_eq!(raw[348], 1, "extension flag");
    assert!(vox_offset > 352 && vox_offset.is_multiple_of(16));
    let ext = String::from_utf8_lossy(&raw[360..vox_offset]);
    assert!(ext.contains(r#"<Label Key="1""#) && ext.contains("<![CDATA[liver]]>"));
    assert!(ext.contains(r#"<Label Key="2""#) && ext.contains("<![CDATA[spleen]]>"));
    let r = common::json(&report);
    assert_eq!(r["labels"]["1"], "liver");
    assert_eq!(r["labels"]["2"], "spleen");
}

#[test]
fn label_table_names_survive_cdata() {
    let x = segvol::io::nifti::label_table_xml(&["a]]>b".to_string()]);
    assert!(x.contains("<![CDATA[a]]]]><![CDATA[>b]]>"), "{x}");
}

#[test]
fn an_output_equal_to_an_input_or_another_output_is_refused_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ct = tmp.path().join("ct.nii.gz");
    std::fs::copy(tiny_ct(), &ct).unwrap();
    let before = std::fs::read(&ct).unwrap();
    let model = tiny_model();
    // --out is the input, spelled another way.
    let alias = tmp.path().join("sub/../ct.nii.gz");
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    let res = segvol(&[
        "segment",
        s(&ct),
        "--model",
        &model,
        "--text",
        "liver",
        "--out",
        s(&alias),
    ]);
    assert_usage(&res, &["--out", "is the input"]);
    // A hard link to the input.
    let link = tmp.path().join("link.nii.gz");
    std::fs::hard_link(&ct, &link).unwrap();
    let res = segvol(&[
        "segment",
        s(&ct),
        "--model",
        &model,
        "--text",
        "liver",
        "--out",
        s(&link),
    ]);
    assert_usage(&res, &["is the input"]);
    // --json equal to --out.
    let out = tmp.path().join("m.nii.gz");
    let res = segvol(&[
        "segment",
        s(&ct),
        "--model",
        &model,
        "--text",
        "liver",
        "--out",
        s(&out),
        "--json",
        s(&out),
    ]);
    assert_usage(&res, &["--json", "--out", "would both write"]);
    assert!(!out.exists());
    assert_eq!(
        std::fs::read(&ct).unwrap(),
        before,
        "the input is untouched"
    );
}

#[test]
fn out_dir_collisions_are_refused_naming_both_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let (c1, c2) = (tmp.path().join("c1"), tmp.path().join("c2"));
    std::fs::create_dir(&c1).unwrap();
    std::fs::create_dir(&c2).unwrap();
    std::fs::copy(tiny_ct(), c1.join("scan.nii.gz")).unwrap();
    let raw = common::gunzip_file(&tiny_ct());
    std::fs::write(c2.join("scan.NII"), raw).unwrap();
    let masks = tmp.path().join("masks");
    let model = tiny_model();
    let a = c1.join("scan.nii.gz");
    let b = c2.join("scan.NII");
    let res = segvol(&[
        "segment",
        s(&a),
        s(&b),
        "--model",
        &model,
        "--text",
        "liver",
        "--out-dir",
        s(&masks),
    ]);
    assert_usage(&res, &["c1/scan.nii.gz", "c2/scan.NII", "scan_mask.nii.gz"]);
    // Texts that map to one file name.
    let res = segvol(&[
        "segment",
        s(&a),
        "--model",
        &model,
        "--text",
        "left kidney",
        "--text",
        "Left_Kidney",
        "--out-dir",
        s(&masks),
    ]);
    assert_usage(&res, &["left kidney", "Left_Kidney"]);
    // The same input twice.
    let res = segvol(&[
        "segment",
        s(&a),
        s(&a),
        "--model",
        &model,
        "--text",
        "liver",
        "--out-dir",
        s(&masks),
    ]);
    assert_usage(&res, &["given twice"]);
    assert!(!masks.exists(), "nothing written");
}

#[test]
fn non_ascii_texts_get_distinct_readable_names() {
    let tmp = tempfile::tempdir().unwrap();
    let masks = tmp.path().join("masks");
    let res = segvol(&[
        "segment",
        s(&tiny_ct()),
        "--model",
        &tiny_model(),
        "--text",
        "Leber",
        "--text",
        "肝臓",
        "--text",
        "rate",
        "--no-zoom-in",
        "--out-dir",
        s(&masks),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for n in ["leber", "肝臓", "rate"] {
        assert!(
            masks.join(format!("example_ct_sm_{n}.nii.gz")).is_file(),
            "{n}"
        );
    }
}

#[test]
fn negative_coordinates_parse_as_the_readme_writes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.nii.gz");
    // A point in millimetres with negative components, as in the README: parsed, then mapped
    // (outside this small CT, so the prompt error names the point, not an "unexpected argument").
    let res = segvol(&[
        "segment",
        s(&tiny_ct()),
        "--model",
        &tiny_model(),
        "--mm",
        "--point",
        "-61.5,-190.2,1012.0",
        "--negative-point",
        "-1,-2,-3",
        "--box",
        "-10,-10,-10,10,10,10",
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    if !res.status.success() {
        assert_eq!(res.status.code(), Some(2), "{err}");
        assert!(err.contains("mm"), "{err}");
    }
}

#[test]
fn demo_refuses_inputs_and_model() {
    let res = segvol(&["segment", "--demo", s(&tiny_ct())]);
    assert_usage_clap(&res, "--demo");
    let res = segvol(&["segment", "--demo", "--model", &tiny_model()]);
    assert_usage_clap(&res, "--demo");
}

fn assert_usage_clap(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(needle) && err.contains("cannot be used with"),
        "{err}"
    );
}
