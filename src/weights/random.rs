//! The `segvol-random-v1` generator (random-weights.md): deterministic weights that any
//! implementation regenerates bit-for-bit from a seed, and the writer of a model directory laid
//! out like the released Hugging Face export.

use super::schema::{schema, SpecDType, TensorSpec};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::rng::{mix, GAMMA};
use rayon::prelude::*;
use std::path::Path;

/// The generator's name, as written into `config.json`.
pub const GENERATOR: &str = "segvol-random-v1";

/// Elements per rayon task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

/// FNV-1a 64 of the key's bytes (random-weights.md, step 1).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Which rule of the table in random-weights.md applies, with its `(center, scale)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// 1..=7 as numbered in random-weights.md.
    pub number: u8,
    pub center: f32,
    pub scale: f32,
}

/// Names whose `.weight` / `.bias` are LayerNorm affine parameters (rules 1 and 2).
const NORM_SUFFIXES: [&str; 8] = [
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "norm4",
    "norm_final_attn",
    "layer_norm1",
    "layer_norm2",
];
/// LayerNorm modules that are not named `*norm*` (the decoder's joint LayerNorm, the prompt
/// encoder's LayerNorm2d).
const NORM_MODULES: [&str; 3] = [
    "mask_decoder.output_upscaling.1",
    "prompt_encoder.mask_downscaling.1",
    "prompt_encoder.mask_downscaling.4",
];

fn is_norm_module(module: &str) -> bool {
    // `final_layer_norm` and the ViT's `norm` both end in `norm`.
    NORM_SUFFIXES.iter().any(|s| module.ends_with(s)) || NORM_MODULES.contains(&module)
}

/// `1/sqrt(n)` evaluated in f64 and rounded once to f32 (random-weights.md, step 3).
fn inv_sqrt(n: usize) -> f32 {
    (1.0 / (n as f64).sqrt()) as f32
}

/// The first matching rule of the table in random-weights.md for an F32 tensor.
pub fn rule_for(key: &str, shape: &[usize]) -> Rule {
    let rule = |number, center, scale| Rule {
        number,
        center,
        scale,
    };
    if let Some(module) = key.strip_suffix(".weight") {
        if is_norm_module(module) {
            return rule(1, 1.0, 0.1);
        }
    }
    if let Some(module) = key.strip_suffix(".bias") {
        if is_norm_module(module) {
            return rule(2, 0.0, 0.1);
        }
    }
    if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" {
        return rule(3, 0.0, 1.0);
    }
    match shape.len() {
        5 => rule(4, 0.0, inv_sqrt(shape[0])),
        4 => rule(5, 0.0, inv_sqrt(shape[1] * shape[2] * shape[3])),
        2.. => rule(6, 0.0, inv_sqrt(shape[shape.len() - 1])),
        _ => rule(7, 0.0, 0.02),
    }
}

/// Fills `out` with the values of element `first .. first + out.len()` of F32 tensor `key`
/// (random-weights.md, steps 1-3). Every element depends only on its index, so chunks can be
/// generated independently.
pub fn fill_f32(key: &str, shape: &[usize], seed: u64, first: usize, out: &mut [f32]) {
    let Rule { center, scale, .. } = rule_for(key, shape);
    let base = seed ^ fnv1a64(key.as_bytes());
    // The state before element i has been advanced i times; element i adds one more GAMMA.
    let mut state = base.wrapping_add((first as u64).wrapping_mul(GAMMA));
    for v in out.iter_mut() {
        state = state.wrapping_add(GAMMA);
        let u = (mix(state) >> 40) as f32 / 16_777_216.0;
        let r = 2.0 * u - 1.0;
        // Two separate f32 roundings; Rust never contracts these into a fused multiply-add.
        let scaled: f32 = scale * r;
        *v = center + scaled;
    }
}

/// All values of F32 tensor `key` with `shape`, generated in parallel.
pub fn generate_f32(key: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| fill_f32(key, shape, seed, i * CHUNK, chunk));
    out
}

/// The values of one generated tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    /// `position_ids`: `0, 1, 2, ...`.
    I64(Vec<i64>),
}

impl TensorData {
    /// Row-major little-endian bytes, as stored in a safetensors file.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// One tensor of the schema: random F32 values, or `0..n` for the I64 `position_ids`.
pub fn generate_tensor(spec: &TensorSpec, seed: u64) -> TensorData {
    match spec.dtype {
        SpecDType::F32 => TensorData::F32(generate_f32(&spec.key, &spec.shape, seed)),
        SpecDType::I64 => TensorData::I64((0..spec.numel() as i64).collect()),
    }
}

/// Little-endian bytes of a generated tensor, produced in parallel straight into the byte
/// buffer (the file writer's only copy).
fn generate_le_bytes(spec: &TensorSpec, seed: u64) -> Vec<u8> {
    let n = spec.numel();
    let mut bytes = vec![0u8; n * spec.dtype.size()];
    match spec.dtype {
        SpecDType::F32 => {
            bytes
                .par_chunks_mut(CHUNK * 4)
                .enumerate()
                .for_each(|(i, chunk)| {
                    let mut vals = vec![0f32; chunk.len() / 4];
                    fill_f32(&spec.key, &spec.shape, seed, i * CHUNK, &mut vals);
                    for (dst, v) in chunk.chunks_exact_mut(4).zip(&vals) {
                        dst.copy_from_slice(&v.to_le_bytes());
                    }
                });
        }
        SpecDType::I64 => {
            for (i, dst) in bytes.chunks_exact_mut(8).enumerate() {
                dst.copy_from_slice(&(i as i64).to_le_bytes());
            }
        }
    }
    bytes
}

/// Writes `model.safetensors` with the `segvol-random-v1` weights of `cfg` (keys prefixed
/// `model.` as in the released export, random-weights.md "Files"), streamed one generated
/// tensor at a time through [`crate::io::write_atomic_with`] (a temporary file, renamed when
/// complete, removed on failure or a signal).
pub fn write_safetensors(path: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    let mut specs = schema(cfg);
    // The safetensors layout, byte for byte as the reference `safetensors` writers produce it:
    // an 8-byte little-endian header length; a JSON header with `__metadata__` first, then per
    // tensor its dtype, shape and data offsets, padded with spaces to a multiple of 8; then the
    // tensors back to back. Tensors go by descending dtype alignment, then by name.
    specs.sort_by(|a, b| (b.dtype.size().cmp(&a.dtype.size())).then_with(|| a.key.cmp(&b.key)));
    // `format: pt` is what the Hugging Face converter writes; loaders use it to pick PyTorch
    // semantics.
    let mut head = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for spec in &specs {
        let len = spec.numel() * spec.dtype.size();
        let dtype = match spec.dtype {
            SpecDType::F32 => "F32",
            SpecDType::I64 => "I64",
        };
        let name = serde_json::to_string(&format!("model.{}", spec.key))
            .map_err(|e| Error::Internal(format!("safetensors header: {e}")))?;
        let shape: Vec<String> = spec.shape.iter().map(|d| d.to_string()).collect();
        head.push_str(&format!(
            r#",{name}:{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{offset},{}]}}"#,
            shape.join(","),
            offset + len
        ));
        offset += len;
    }
    head.push('}');
    let mut head = head.into_bytes();
    head.resize(head.len().div_ceil(8) * 8, b' ');
    crate::io::write_atomic_with(path, |tmp| {
        use std::io::Write;
        let file = std::fs::File::create(tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for spec in &specs {
            w.write_all(&generate_le_bytes(spec, seed))?;
        }
        w.flush()?;
        drop(w);
        file.sync_all()
    })
}

/// Writes a model directory like the Hugging Face `BAAI/SegVol` export: `model.safetensors`
/// (segvol-random-v1 weights for `seed`), `config.json` (`cfg` with the `architecture` object
/// and the generator provenance, pretty-printed) and `tokenizer.json` (`tokenizer_json`, the
/// caller passes [`crate::tokenizer::EMBEDDED_TOKENIZER_JSON`]). Each file is written to a
/// temporary name and renamed.
pub fn write_model_dir(
    dir: &Path,
    cfg: &ModelConfig,
    seed: u64,
    tokenizer_json: &[u8],
) -> Result<()> {
    cfg.validate()
        .map_err(|msg| Error::config(dir.join("config.json"), msg))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_safetensors(&dir.join("model.safetensors"), cfg, seed)?;
    let mut config = serde_json::to_string_pretty(&cfg.to_json(Some(seed)))
        .map_err(|e| Error::Internal(format!("serialising config.json: {e}")))?;
    config.push('\n');
    crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
    crate::io::write_atomic(&dir.join("tokenizer.json"), tokenizer_json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight transcription of random-weights.md, element by element, as the oracle for the
    /// chunked, parallel version.
    fn reference(key: &str, shape: &[usize], seed: u64) -> Vec<f32> {
        let Rule { center, scale, .. } = rule_for(key, shape);
        let mut state = seed ^ fnv1a64(key.as_bytes());
        let n: usize = shape.iter().product();
        (0..n)
            .map(|_| {
                state = state.wrapping_add(GAMMA);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / 16777216.0;
                let r = 2.0 * u - 1.0;
                let p = scale * r;
                center + p
            })
            .collect()
    }

    #[test]
    fn chunked_equals_sequential() {
        // 3 chunks and a remainder, so chunk boundaries are crossed.
        let shape = [3 * CHUNK / 100 + 7, 100];
        let key = "image_encoder.blocks.0.mlp.linear1.weight";
        assert_eq!(generate_f32(key, &shape, 42), reference(key, &shape, 42));
    }

    #[test]
    fn fnv_known_values() {
        // FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn rules() {
        let r = |k: &str, s: &[usize]| rule_for(k, s).number;
        assert_eq!(r("image_encoder.norm.weight", &[8]), 1);
        assert_eq!(r("image_encoder.blocks.3.norm2.bias", &[8]), 2);
        assert_eq!(
            r(
                "text_encoder.clip_text_model.text_model.final_layer_norm.weight",
                &[8]
            ),
            1
        );
        assert_eq!(r("mask_decoder.output_upscaling.1.bias", &[2, 3, 4, 5]), 2);
        assert_eq!(r("prompt_encoder.mask_downscaling.4.weight", &[16]), 1);
        assert_eq!(
            r(
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                &[3, 4]
            ),
            3
        );
        assert_eq!(
            r("mask_decoder.output_upscaling.0.weight", &[8, 2, 2, 2, 2]),
            4
        );
        assert_eq!(
            r("prompt_encoder.mask_downscaling.6.weight", &[8, 16, 1, 1]),
            5
        );
        assert_eq!(r("mask_decoder.iou_token.weight", &[1, 8]), 6);
        assert_eq!(r("mask_decoder.output_upscaling.0.bias", &[8]), 7);
        // 1/sqrt(24) rounded once from f64 differs from the f32 computation (README §2).
        assert_ne!(inv_sqrt(24), 1.0 / 24f32.sqrt());
    }

    #[test]
    fn scale_is_f32_of_f64() {
        assert_eq!(inv_sqrt(96), (1.0f64 / 96f64.sqrt()) as f32);
        assert_eq!(rule_for("x.weight", &[3, 96]).scale, inv_sqrt(96));
    }

    #[test]
    fn values_are_in_range_and_vary_with_seed() {
        let key = "mask_decoder.transformer.layers.0.norm1.weight";
        let a = generate_f32(key, &[1000], 1);
        let b = generate_f32(key, &[1000], 2);
        assert_ne!(a, b);
        assert!(a.iter().all(|&v| (0.9..=1.1).contains(&v)), "rule 1 range");
    }
}
