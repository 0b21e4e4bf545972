//! Model configuration: the Hugging Face `config.json` fields the engine needs plus the optional
//! `architecture` object of the test configurations (fixtures README §2). Without
//! `architecture`, the released SegVol architecture is assumed (spec §0).

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// ViT image encoder hyper-parameters (spec §1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
}

/// Mask decoder hyper-parameters (spec §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: usize,
    pub attention_downsample: usize,
    pub mask_tokens: usize,
    pub iou_hidden: usize,
}

/// CLIP text tower hyper-parameters (spec §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
}

/// Everything that fixes the model's shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Window size (D,H,W); every model call takes exactly this input.
    pub spatial_size: [usize; 3],
    /// ViT patch size (D,H,W).
    pub patch_size: [usize; 3],
    pub encoder: EncoderConfig,
    pub decoder: DecoderConfig,
    pub text: TextConfig,
    /// The prompt template, with `{}` standing for the category name (spec §3).
    pub text_template: String,
}

/// Upper bounds of the architecture fields (`config.json`), checked before anything is built:
/// generous multiples of the released model (spec §0) that keep every derived size (schema,
/// weights, activations) far from overflow. Not configurable: a checkpoint beyond them is not a
/// SegVol variant this engine targets. Spatial and patch sizes must also divide (window / patch),
/// heads must divide their width, and a window holds at most [`MAX_WINDOW_VOXELS`] voxels.
pub const LIMITS: [(&str, usize); 8] = [
    ("spatial_size", 1024),
    ("patch_size", 256),
    ("hidden", 8192),
    ("layers", 64),
    ("heads", 256),
    ("mlp", 65536),
    ("vocab", 1_000_000),
    ("max_positions", 4096),
];

/// At most this many voxels per model window (the released window holds 2,097,152).
pub const MAX_WINDOW_VOXELS: usize = 1 << 25;

/// The longest accepted prompt template.
pub const MAX_TEMPLATE_BYTES: usize = 1024;

/// The bound of a field, by the last word of its name (see [`LIMITS`]).
fn limit_of(name: &str) -> usize {
    let key = match name.rsplit('.').next().unwrap_or(name) {
        n if n.starts_with("spatial_size") => "spatial_size",
        n if n.starts_with("patch_size") => "patch_size",
        "dim" | "hidden" | "iou_hidden" => "hidden",
        "layers" | "depth" => "layers",
        "heads" | "mask_tokens" | "attention_downsample" => "heads",
        "mlp" | "intermediate" => "mlp",
        other => other,
    };
    LIMITS
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(usize::MAX, |&(_, v)| v)
}

pub const DEFAULT_TEMPLATE: &str = "A computerized tomography of a {}.";

impl ModelConfig {
    /// The released SegVol architecture (spec §0): 32x256x256 windows, ViT-B, CLIP ViT-B/32 text.
    pub fn full() -> Self {
        ModelConfig {
            spatial_size: [32, 256, 256],
            patch_size: [4, 16, 16],
            encoder: EncoderConfig {
                hidden: 768,
                layers: 12,
                heads: 12,
                mlp: 3072,
            },
            decoder: DecoderConfig {
                dim: 768,
                depth: 2,
                heads: 8,
                mlp: 2048,
                attention_downsample: 2,
                mask_tokens: 4,
                iou_hidden: 256,
            },
            text: TextConfig {
                vocab: 49408,
                hidden: 512,
                layers: 12,
                heads: 8,
                intermediate: 2048,
                max_positions: 77,
            },
            text_template: DEFAULT_TEMPLATE.to_string(),
        }
    }

    /// The tiny test architecture of the fixtures (fixtures README §2).
    pub fn tiny() -> Self {
        ModelConfig {
            spatial_size: [32, 64, 64],
            patch_size: [4, 16, 16],
            encoder: EncoderConfig {
                hidden: 96,
                layers: 2,
                heads: 4,
                mlp: 192,
            },
            decoder: DecoderConfig {
                dim: 96,
                depth: 2,
                heads: 8,
                mlp: 128,
                attention_downsample: 2,
                mask_tokens: 4,
                iou_hidden: 32,
            },
            text: TextConfig {
                vocab: 49408,
                hidden: 32,
                layers: 2,
                heads: 2,
                intermediate: 64,
                max_positions: 77,
            },
            text_template: DEFAULT_TEMPLATE.to_string(),
        }
    }

    /// ViT token grid (D/pd, H/ph, W/pw).
    pub fn token_grid(&self) -> [usize; 3] {
        [
            self.spatial_size[0] / self.patch_size[0],
            self.spatial_size[1] / self.patch_size[1],
            self.spatial_size[2] / self.patch_size[2],
        ]
    }

    /// Number of image tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_grid().iter().product()
    }

    /// Values per patch (the patch-embedding input width).
    pub fn patch_dim(&self) -> usize {
        self.patch_size.iter().product()
    }

    /// Voxels per window.
    pub fn window_voxels(&self) -> usize {
        self.spatial_size.iter().product()
    }

    /// Channels after the first and second ConvTranspose3d (dim/4, dim/8; spec §4.4).
    pub fn upscale_channels(&self) -> (usize, usize) {
        (self.decoder.dim / 4, self.decoder.dim / 8)
    }

    /// Grid after the first upscaling (2x the token grid) and after the second (4x).
    pub fn upscale_grids(&self) -> ([usize; 3], [usize; 3]) {
        let g = self.token_grid();
        (
            [2 * g[0], 2 * g[1], 2 * g[2]],
            [4 * g[0], 4 * g[1], 4 * g[2]],
        )
    }

    /// Half the prompt-encoder width: the Fourier feature count of the gaussian matrix (3, F).
    pub fn pe_features(&self) -> usize {
        self.decoder.dim / 2
    }

    /// Reads `config.json` of a model directory (or a standalone config file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::config(path, "is not a regular file"));
        }
        // A configuration is a few hundred bytes; refuse anything huge before reading it.
        if meta.len() > 1 << 20 {
            return Err(Error::config(
                path,
                "is larger than 1 MiB; not a config.json",
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&value, path)
    }

    /// Builds a configuration from parsed `config.json`; `path` only names the file in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config(path, "top level must be a JSON object"))?;
        let mut cfg = ModelConfig::full();
        if let Some(v) = obj.get("spatial_size") {
            cfg.spatial_size = triple(v, "spatial_size", path)?;
        }
        if let Some(v) = obj.get("patch_size") {
            cfg.patch_size = triple(v, "patch_size", path)?;
        }
        if let Some(arch) = obj.get("architecture") {
            let arch = arch
                .as_object()
                .ok_or_else(|| Error::config(path, "field `architecture` must be an object"))?;
            if let Some(e) = arch.get("encoder") {
                let e = section(e, "architecture.encoder", path)?;
                let c = &mut cfg.encoder;
                read_usize(e, "hidden", "architecture.encoder", path, &mut c.hidden)?;
                read_usize(e, "layers", "architecture.encoder", path, &mut c.layers)?;
                read_usize(e, "heads", "architecture.encoder", path, &mut c.heads)?;
                read_usize(e, "mlp", "architecture.encoder", path, &mut c.mlp)?;
            }
            if let Some(d) = arch.get("decoder") {
                let d = section(d, "architecture.decoder", path)?;
                let c = &mut cfg.decoder;
                let s = "architecture.decoder";
                read_usize(d, "dim", s, path, &mut c.dim)?;
                read_usize(d, "depth", s, path, &mut c.depth)?;
                read_usize(d, "heads", s, path, &mut c.heads)?;
                read_usize(d, "mlp", s, path, &mut c.mlp)?;
                read_usize(
                    d,
                    "attention_downsample",
                    s,
                    path,
                    &mut c.attention_downsample,
                )?;
                read_usize(d, "mask_tokens", s, path, &mut c.mask_tokens)?;
                read_usize(d, "iou_hidden", s, path, &mut c.iou_hidden)?;
            }
            if let Some(t) = arch.get("text") {
                let t = section(t, "architecture.text", path)?;
                let c = &mut cfg.text;
                let s = "architecture.text";
                read_usize(t, "vocab", s, path, &mut c.vocab)?;
                read_usize(t, "hidden", s, path, &mut c.hidden)?;
                read_usize(t, "layers", s, path, &mut c.layers)?;
                read_usize(t, "heads", s, path, &mut c.heads)?;
                read_usize(t, "intermediate", s, path, &mut c.intermediate)?;
                read_usize(t, "max_positions", s, path, &mut c.max_positions)?;
            }
            if let Some(t) = arch.get("text_template") {
                let t = t.as_str().ok_or_else(|| {
                    Error::config(path, "field `architecture.text_template` must be a string")
                })?;
                cfg.text_template = t.to_string();
            }
        }
        cfg.validate().map_err(|msg| Error::config(path, msg))?;
        Ok(cfg)
    }

    /// Checks the relations between fields that the model relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.check_bounds()?;
        for a in 0..3 {
            if self.patch_size[a] == 0 || !self.spatial_size[a].is_multiple_of(self.patch_size[a]) {
                return Err(format!(
                    "spatial_size {:?} is not a multiple of patch_size {:?}",
                    self.spatial_size, self.patch_size
                ));
            }
        }
        let e = &self.encoder;
        if !e.hidden.is_multiple_of(e.heads) {
            return Err(format!(
                "architecture.encoder: hidden {} is not divisible by heads {}",
                e.hidden, e.heads
            ));
        }
        let d = &self.decoder;
        if d.dim != e.hidden {
            return Err(format!(
                "architecture: decoder dim {} must equal encoder hidden {}",
                d.dim, e.hidden
            ));
        }
        if !d.dim.is_multiple_of(8) || !d.dim.is_multiple_of(d.attention_downsample) {
            return Err(format!(
                "architecture.decoder: dim {} must be a multiple of 8 and of attention_downsample",
                d.dim
            ));
        }
        if !(d.dim / d.attention_downsample).is_multiple_of(d.heads)
            || !d.dim.is_multiple_of(d.heads)
        {
            return Err(format!(
                "architecture.decoder: dim {} (and dim/attention_downsample) must be divisible by heads {}",
                d.dim, d.heads
            ));
        }
        if d.mask_tokens == 0 {
            return Err("architecture.decoder: mask_tokens must be at least 1".into());
        }
        let t = &self.text;
        if !t.hidden.is_multiple_of(t.heads) {
            return Err(format!(
                "architecture.text: hidden {} is not divisible by heads {}",
                t.hidden, t.heads
            ));
        }
        if !self.text_template.contains("{}") {
            return Err("architecture.text_template must contain `{}`".into());
        }
        Ok(())
    }

    /// Refuses values outside [`LIMITS`] before any size is derived from them, so a hostile
    /// `config.json` cannot make the schema, the generator or the planner allocate without limit.
    fn check_bounds(&self) -> std::result::Result<(), String> {
        let e = &self.encoder;
        let d = &self.decoder;
        let t = &self.text;
        let fields: [(&str, usize); 20] = [
            ("spatial_size[0]", self.spatial_size[0]),
            ("spatial_size[1]", self.spatial_size[1]),
            ("spatial_size[2]", self.spatial_size[2]),
            ("patch_size[0]", self.patch_size[0]),
            ("patch_size[1]", self.patch_size[1]),
            ("patch_size[2]", self.patch_size[2]),
            ("architecture.encoder.hidden", e.hidden),
            ("architecture.encoder.layers", e.layers),
            ("architecture.encoder.heads", e.heads),
            ("architecture.encoder.mlp", e.mlp),
            ("architecture.decoder.depth", d.depth),
            ("architecture.decoder.heads", d.heads),
            ("architecture.decoder.mlp", d.mlp),
            ("architecture.decoder.mask_tokens", d.mask_tokens),
            ("architecture.decoder.iou_hidden", d.iou_hidden),
            ("architecture.text.vocab", t.vocab),
            ("architecture.text.hidden", t.hidden),
            ("architecture.text.layers", t.layers),
            ("architecture.text.heads", t.heads),
            ("architecture.text.intermediate", t.intermediate),
        ];
        for (name, v) in fields.into_iter().chain([
            ("architecture.text.max_positions", t.max_positions),
            (
                "architecture.decoder.attention_downsample",
                d.attention_downsample,
            ),
            ("architecture.decoder.dim", d.dim),
        ]) {
            let max = limit_of(name);
            if v == 0 || v > max {
                return Err(format!("field `{name}` is {v}; it must be in 1..={max}"));
            }
        }
        self.spatial_size
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .filter(|&n| n <= MAX_WINDOW_VOXELS)
            .ok_or_else(|| {
                format!(
                    "spatial_size {:?} is more than {MAX_WINDOW_VOXELS} voxels per window",
                    self.spatial_size
                )
            })?;
        if self.text_template.len() > MAX_TEMPLATE_BYTES {
            return Err(format!(
                "architecture.text_template is longer than {MAX_TEMPLATE_BYTES} bytes"
            ));
        }
        Ok(())
    }

    /// `config.json` as written by `segvol gen-weights`: the released Hugging Face fields, the
    /// `architecture` object, and the random-weights provenance.
    pub fn to_json(&self, random_seed: Option<u64>) -> Value {
        let mut v = json!({
            "architectures": ["SegVolModel"],
            "auto_map": {
                "AutoConfig": "model_segvol_single.SegVolConfig",
                "AutoModel": "model_segvol_single.SegVolModel"
            },
            "model_type": "segvol",
            "patch_size": self.patch_size,
            "spatial_size": self.spatial_size,
            "test_mode": true,
            "torch_dtype": "float32",
            "transformers_version": "4.18.0",
            "architecture": {
                "encoder": {
                    "hidden": self.encoder.hidden, "layers": self.encoder.layers,
                    "heads": self.encoder.heads, "mlp": self.encoder.mlp
                },
                "decoder": {
                    "dim": self.decoder.dim, "depth": self.decoder.depth,
                    "heads": self.decoder.heads, "mlp": self.decoder.mlp,
                    "attention_downsample": self.decoder.attention_downsample,
                    "mask_tokens": self.decoder.mask_tokens, "iou_hidden": self.decoder.iou_hidden
                },
                "text": {
                    "vocab": self.text.vocab, "hidden": self.text.hidden,
                    "layers": self.text.layers, "heads": self.text.heads,
                    "intermediate": self.text.intermediate,
                    "max_positions": self.text.max_positions
                },
                "text_template": self.text_template,
            }
        });
        if let Some(seed) = random_seed {
            v["random_weights"] = json!({"generator": "segvol-random-v1", "seed": seed});
        }
        v
    }
}

fn section<'a>(v: &'a Value, name: &str, path: &Path) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| Error::config(path, format!("field `{name}` must be an object")))
}

fn read_usize(
    obj: &Map<String, Value>,
    key: &str,
    section: &str,
    path: &Path,
    out: &mut usize,
) -> Result<()> {
    if let Some(v) = obj.get(key) {
        *out = positive(v).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "field `{section}.{key}` must be a positive integer, found {}",
                    describe(v)
                ),
            )
        })?;
    }
    Ok(())
}

fn positive(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&x| x > 0).map(|x| x as usize)
}

fn triple(v: &Value, name: &str, path: &Path) -> Result<[usize; 3]> {
    let bad = || {
        Error::config(
            path,
            format!(
                "field `{name}` must be an array of 3 positive integers, found {}",
                describe(v)
            ),
        )
    };
    let arr = v.as_array().ok_or_else(bad)?;
    if arr.len() != 3 {
        return Err(bad());
    }
    let mut out = [0; 3];
    for (o, x) in out.iter_mut().zip(arr) {
        *o = positive(x).ok_or_else(bad)?;
    }
    Ok(out)
}

/// A short description of a JSON value for error messages.
pub fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    // Cut by characters, not bytes: a byte cut can split a multi-byte character (a panic).
    let s = v.to_string();
    let s = if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    };
    format!("{kind} ({s})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        ModelConfig::full().validate().unwrap();
        ModelConfig::tiny().validate().unwrap();
        assert_eq!(ModelConfig::full().num_tokens(), 2048);
        assert_eq!(ModelConfig::tiny().num_tokens(), 128);
    }

    #[test]
    fn json_round_trip() {
        for cfg in [ModelConfig::full(), ModelConfig::tiny()] {
            let back = ModelConfig::from_json(&cfg.to_json(Some(1)), Path::new("x")).unwrap();
            assert_eq!(back, cfg);
        }
    }

    #[test]
    fn wrong_field_type_is_named() {
        let mut v = ModelConfig::tiny().to_json(None);
        v["architecture"]["encoder"]["layers"] = json!("two");
        let err = ModelConfig::from_json(&v, Path::new("m/config.json")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("architecture.encoder.layers"), "{msg}");
        assert!(msg.contains("m/config.json"), "{msg}");
        v = ModelConfig::tiny().to_json(None);
        v["spatial_size"] = json!([32, 64]);
        let msg = ModelConfig::from_json(&v, Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("spatial_size"), "{msg}");
    }

    #[test]
    fn huge_or_zero_fields_are_refused() {
        for (section, key, v) in [
            ("encoder", "layers", 1_000_000_000u64),
            ("text", "vocab", 1u64 << 40),
            ("decoder", "depth", 65),
            ("text", "max_positions", 100_000),
        ] {
            let mut j = ModelConfig::tiny().to_json(None);
            j["architecture"][section][key] = json!(v);
            let msg = ModelConfig::from_json(&j, Path::new("c.json"))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&format!("architecture.{section}.{key}")),
                "{msg}"
            );
            assert!(msg.contains(&v.to_string()), "{msg}");
        }
        let mut j = ModelConfig::tiny().to_json(None);
        j["spatial_size"] = json!([1024, 1024, 1024]);
        let msg = ModelConfig::from_json(&j, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("voxels per window"), "{msg}");
    }

    #[test]
    fn a_directory_is_not_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let msg = ModelConfig::from_file(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("not a regular file"), "{msg}");
    }

    #[test]
    fn missing_architecture_means_released() {
        let v = json!({"spatial_size": [32, 256, 256], "patch_size": [4, 16, 16]});
        assert_eq!(
            ModelConfig::from_json(&v, Path::new("c")).unwrap(),
            ModelConfig::full()
        );
    }
}
