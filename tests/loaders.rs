//! Checkpoint, config and tokenizer loaders on hostile or damaged input (issue 9, items 6, 7
//! and 10): every fault is refused with one line naming the file and what is wrong, before
//! anything large is allocated, and non-finite results never pass as success.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny_model() -> PathBuf {
    common::tiny().join("model")
}

/// Copies the tiny model directory (safetensors only) into `dir`.
fn copy_model(dir: &Path) {
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(tiny_model().join(f), dir.join(f)).unwrap();
    }
}

/// Overwrites the f32 values of tensor `key` in a safetensors file with `f(i)`.
fn patch_tensor(file: &Path, key: &str, f: impl Fn(usize) -> f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[key];
    assert_eq!(t["dtype"], "F32", "{key}");
    let start = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + n + t["data_offsets"][1].as_u64().unwrap() as usize;
    for (i, c) in bytes[start..end].chunks_exact_mut(4).enumerate() {
        c.copy_from_slice(&f(i).to_le_bytes());
    }
    std::fs::write(file, bytes).unwrap();
}

use common::segvol;

// ----- item 6: config.json bounds -----

#[test]
fn huge_layer_count_is_refused_before_anything_is_built() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let cfg = tmp.path().join("config.json");
    let mut v = common::json(&cfg);
    v["architecture"]["encoder"]["layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&cfg, v.to_string()).unwrap();
    // In-process under the memory cap: today's code builds a schema of 10^9 layers here.
    common::fuzz::cap_memory();
    let msg = segvol::weights::open_model_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("architecture.encoder.layers"), "{msg}");
    assert!(msg.contains("1000000000"), "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
    for cmd in [
        vec!["inspect", tmp.path().to_str().unwrap()],
        vec![
            "gen-weights",
            "--config",
            cfg.to_str().unwrap(),
            "--seed",
            "1",
            "--out",
            tmp.path().join("out").to_str().unwrap(),
        ],
    ] {
        let out = segvol(&cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
        assert!(err.contains("architecture.encoder.layers"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn a_config_json_directory_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let cfg = tmp.path().join("config.json");
    std::fs::remove_file(&cfg).unwrap();
    std::fs::create_dir(&cfg).unwrap();
    let msg = segvol::weights::open_model_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("config.json"), "{msg}");
    assert!(msg.contains("not a regular file"), "{msg}");
}

// ----- item 10: non-finite weights, logits and tokenizer ids -----

#[test]
fn a_nan_weight_is_refused_at_load_naming_tensor_and_element() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let key = "model.image_encoder.norm.weight";
    patch_tensor(&tmp.path().join("model.safetensors"), key, |i| {
        if i == 5 {
            f32::NAN
        } else {
            1.0
        }
    });
    let msg = segvol::weights::open_model_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("image_encoder.norm.weight"), "{msg}");
    assert!(msg.contains("element 5"), "{msg}");
    let out = segvol(&["inspect", tmp.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("non-finite"), "{err}");
}

#[test]
fn every_non_finite_tensor_is_named_not_only_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let weights = tmp.path().join("model.safetensors");
    patch_tensor(&weights, "model.image_encoder.norm.weight", |i| {
        if i % 2 == 0 {
            f32::INFINITY
        } else {
            1.0
        }
    });
    patch_tensor(&weights, "model.mask_decoder.iou_token.weight", |_| {
        f32::NAN
    });
    let msg = segvol::weights::open_model_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("2 tensor(s) hold non-finite values"), "{msg}");
    assert!(
        msg.contains("`image_encoder.norm.weight` (48 value(s)"),
        "{msg}"
    );
    assert!(msg.contains("the first inf at element 0"), "{msg}");
    assert!(
        msg.contains("`mask_decoder.iou_token.weight` (96 value(s), the first NaN"),
        "{msg}"
    );
}

#[test]
fn huge_finite_weights_fail_the_finite_logits_check() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    // 1e38 is finite, so the load accepts it; the patch embedding then overflows f32.
    patch_tensor(
        &tmp.path().join("model.safetensors"),
        "model.image_encoder.patch_embedding.patch_embeddings.1.weight",
        |_| 1e38,
    );
    let out_file = tmp.path().join("mask.nii.gz");
    let out = segvol(&[
        "segment",
        common::fixtures()
            .join("data/example_ct_sm.nii.gz")
            .to_str()
            .unwrap(),
        "--model",
        tmp.path().to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
        "--text",
        "liver",
        "--no-zoom-in",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not finite"), "{err}");
    assert!(err.contains("zoom-out"), "{err}");
    assert!(err.contains("liver"), "{err}");
    assert!(!out_file.exists());
}

#[test]
fn a_tokenizer_id_outside_the_vocabulary_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let tok = tmp.path().join("tokenizer.json");
    let mut v = common::json(&tok);
    v["model"]["vocab"]["liver</w>"] = serde_json::json!(60000);
    std::fs::write(&tok, v.to_string()).unwrap();
    let backend = segvol::backend::open("cpu", None).unwrap();
    let Err(err) = segvol::model::SegVol::load(tmp.path(), backend) else {
        panic!("a tokenizer id beyond the vocabulary was accepted");
    };
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 2, "{msg}");
    assert!(msg.contains("tokenizer.json"), "{msg}");
    assert!(msg.contains("60000"), "{msg}");
}

// ----- item 13: a checkpoint truncated while mapped -----

/// Set in the child process of `truncating_a_mapped_checkpoint_names_the_file`.
const SIGBUS_CHILD: &str = "SEGVOL_TEST_SIGBUS_CHILD";

/// The child half: maps the checkpoint, truncates the file, then reads every tensor. Does
/// nothing unless run as that child.
#[test]
fn sigbus_child() {
    let Some(file) = std::env::var_os(SIGBUS_CHILD) else {
        return;
    };
    let file = PathBuf::from(file);
    let store = segvol::weights::WeightStore::open(&file, &segvol::ModelConfig::tiny()).unwrap();
    assert!(store.is_mapped("image_encoder.norm.weight"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    let sum: f64 = store
        .iter()
        .map(|(_, _, v)| v.iter().map(|&x| x as f64).sum::<f64>())
        .sum();
    // Unreachable: the first read of a page past the new end of the file raises SIGBUS.
    println!("read {sum} from a truncated file");
}

#[test]
fn truncating_a_mapped_checkpoint_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    std::fs::copy(tiny_model().join("model.safetensors"), &file).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigbus_child", "--nocapture", "--test-threads=1"])
        .env(SIGBUS_CHILD, &file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("SIGBUS"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

// ----- item 7: the pickle's size is capped before it is read -----

#[test]
fn a_huge_data_pkl_is_refused_with_the_limit_named() {
    let mut bin = std::fs::read(tiny_model().join("pytorch_model.bin")).unwrap();
    let name = b"pytorch_model/data.pkl";
    // The central-directory record of data.pkl: sizes at +20 (compressed) and +24.
    let at = bin
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"PK\x01\x02")
        .map(|(i, _)| i)
        .find(|&i| bin[i + 46..].starts_with(name))
        .unwrap();
    let huge = (100u32 << 20).to_le_bytes();
    bin[at + 20..at + 24].copy_from_slice(&huge);
    bin[at + 24..at + 28].copy_from_slice(&huge);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    std::fs::write(&path, &bin).unwrap();
    let msg = segvol::weights::WeightStore::open(&path, &segvol::ModelConfig::tiny())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("data.pkl"), "{msg}");
    assert!(msg.contains("67108864 (limit)"), "{msg}");
}
