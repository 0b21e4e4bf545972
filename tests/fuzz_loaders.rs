//! Structure-aware fuzzing of the model loaders (issue 9, "A fuzz harness that stays"):
//! mutations of the tiny model's valid files (model.safetensors header and data, config.json
//! values, the pickle of pytorch_model.bin, tokenizer.json ids). Every case must end in `Ok` or
//! a typed `segvol::Error`, under a memory cap, never a panic or an abort. More cases:
//! `SEGVOL_FUZZ_CASES=10000 cargo test --release --test fuzz_loaders`.

mod common;

use proptest::prelude::*;
use segvol::weights::WeightStore;
use segvol::ModelConfig;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn tiny_model() -> PathBuf {
    common::tiny().join("model")
}

fn file(name: &str) -> &'static [u8] {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    let files = FILES.get_or_init(|| {
        [
            "model.safetensors",
            "pytorch_model.bin",
            "config.json",
            "tokenizer.json",
        ]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(tiny_model().join(n)).unwrap()))
        .collect()
    });
    &files.iter().find(|(n, _)| n == name).unwrap().1
}

/// Byte edits: `(position as a fraction of the region, new byte)`.
fn edits() -> impl Strategy<Value = Vec<(f64, u8)>> {
    prop::collection::vec((0.0..1.0f64, any::<u8>()), 1..6)
}

fn apply(bytes: &mut [u8], region: std::ops::Range<usize>, edits: &[(f64, u8)]) {
    let n = region.len();
    for &(at, b) in edits {
        let i = region.start + ((at * n as f64) as usize).min(n - 1);
        bytes[i] = b;
    }
}

fn open(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    // Ok or a typed error; a panic fails the property.
    let _ = WeightStore::open(path, &ModelConfig::tiny()).map(|s| s.len());
}

proptest! {
    #![proptest_config(common::fuzz::config(24))]

    #[test]
    fn safetensors_mutations(e in edits(), in_header in any::<bool>(), cut in prop::option::of(0.0..1.0f64)) {
        common::fuzz::cap_memory();
        let mut bytes = file("model.safetensors").to_vec();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let region = if in_header { 0..8 + header_len } else { 0..bytes.len() };
        apply(&mut bytes, region, &e);
        if let Some(c) = cut {
            bytes.truncate((c * bytes.len() as f64) as usize);
        }
        let tmp = tempfile::tempdir().unwrap();
        open(&tmp.path().join("model.safetensors"), &bytes);
    }

    #[test]
    fn safetensors_header_values(key in 0usize..200, field in 0usize..3, value in prop_oneof![
        Just(serde_json::json!(0)), Just(serde_json::json!(-1)), Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(1u64 << 40)), Just(serde_json::json!("F64")), Just(serde_json::json!("I8")),
        Just(serde_json::json!([1u64 << 33, 1u64 << 33])), Just(serde_json::json!([])), Just(serde_json::Value::Null),
    ]) {
        common::fuzz::cap_memory();
        let bytes = file("model.safetensors");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let keys: Vec<String> = header.as_object().unwrap().keys().cloned().collect();
        let k = &keys[key % keys.len()];
        let name = ["dtype", "shape", "data_offsets"][field];
        header[k][name] = value;
        let h = header.to_string().into_bytes();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(&h);
        out.extend(&bytes[8 + n..]);
        let tmp = tempfile::tempdir().unwrap();
        open(&tmp.path().join("model.safetensors"), &out);
    }

    #[test]
    fn config_values(section in 0usize..4, key in 0usize..8, value in prop_oneof![
        Just(serde_json::json!(0)), Just(serde_json::json!(-3)), Just(serde_json::json!(1_000_000_000u64)),
        Just(serde_json::json!(u64::MAX)), Just(serde_json::json!(1e300)), Just(serde_json::json!(2.5)),
        Just(serde_json::json!("two")), Just(serde_json::Value::Null), Just(serde_json::json!([4, 16])),
        Just(serde_json::json!(65536)), Just(serde_json::json!(7)), Just(serde_json::json!(1)),
    ], remove in any::<bool>()) {
        common::fuzz::cap_memory();
        let mut v: serde_json::Value = serde_json::from_slice(file("config.json")).unwrap();
        let target = match section {
            0 => &mut v,
            1 => &mut v["architecture"]["encoder"],
            2 => &mut v["architecture"]["decoder"],
            _ => &mut v["architecture"]["text"],
        };
        let keys: Vec<String> = target.as_object().unwrap().keys().cloned().collect();
        let k = keys[key % keys.len()].clone();
        if remove {
            target.as_object_mut().unwrap().remove(&k);
        } else {
            target[&k] = value;
        }
        if let Ok(cfg) = ModelConfig::from_json(&v, Path::new("config.json")) {
            // An accepted configuration keeps every size small enough to plan.
            let values: usize = segvol::weights::schema(&cfg).iter().map(|s| s.numel()).sum();
            prop_assert!(values < 1 << 34, "{values}");
        }
    }

    #[test]
    fn pickle_mutations(e in edits(), cut in prop::option::of(0.0..1.0f64)) {
        common::fuzz::cap_memory();
        let bin = file("pytorch_model.bin");
        // The local header of data.pkl (sizes in a trailing data descriptor), then the pickle.
        let name_len = u16::from_le_bytes([bin[26], bin[27]]) as usize;
        let extra_len = u16::from_le_bytes([bin[28], bin[29]]) as usize;
        let start = 30 + name_len + extra_len;
        let end = start + bin[start..].windows(4).position(|w| w == b"PK\x07\x08").unwrap();
        let mut pkl = bin[start..end].to_vec();
        let n = pkl.len();
        apply(&mut pkl, 0..n, &e);
        let mut direct = pkl.clone();
        if let Some(c) = cut {
            direct.truncate((c * direct.len() as f64) as usize);
        }
        let _ = segvol::weights::pickle::load(&direct);
        // The same edits inside the checkpoint file (its length unchanged).
        let mut whole = bin.to_vec();
        whole[start..end].copy_from_slice(&pkl);
        let tmp = tempfile::tempdir().unwrap();
        open(&tmp.path().join("pytorch_model.bin"), &whole);
    }
}

proptest! {
    #![proptest_config(common::fuzz::config(6))]

    #[test]
    fn tokenizer_ids(ids in prop::collection::vec((0usize..49408, any::<u32>()), 1..4)) {
        common::fuzz::cap_memory();
        let mut v: serde_json::Value = serde_json::from_slice(file("tokenizer.json")).unwrap();
        let vocab = v["model"]["vocab"].as_object_mut().unwrap();
        let keys: Vec<String> = vocab.keys().take(49408).cloned().collect();
        for (k, id) in ids {
            vocab[&keys[k % keys.len()]] = serde_json::json!(id);
        }
        let bytes = v.to_string().into_bytes();
        if let Ok(t) = segvol::tokenizer::TextTokenizer::from_bytes(&bytes, "tokenizer.json", segvol::config::DEFAULT_TEMPLATE, 77) {
            if t.check_vocab(49408).is_ok() {
                if let Ok(tokens) = t.encode("liver") {
                    prop_assert!(tokens.ids.iter().all(|&i| i < 49408));
                }
            }
        }
    }
}
