//! The state-dict schema: every key of the SegVol module with its shape and dtype, in PyTorch
//! `state_dict()` order (spec §5.1), for any [`ModelConfig`]. Keys carry no file prefix.

use crate::config::ModelConfig;

/// Element type of a checkpoint entry as the schema expects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpecDType {
    F32,
    /// Only `text_encoder.clip_text_model.text_model.embeddings.position_ids`.
    I64,
}

impl SpecDType {
    /// The safetensors name of the type.
    pub const fn name(self) -> &'static str {
        match self {
            SpecDType::F32 => "F32",
            SpecDType::I64 => "I64",
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            SpecDType::F32 => 4,
            SpecDType::I64 => 8,
        }
    }
}

/// One state-dict entry: key (no prefix), shape, dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub key: String,
    pub shape: Vec<usize>,
    pub dtype: SpecDType,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The part of the model the key belongs to (see [`PARTS`]).
    pub fn part(&self) -> &'static str {
        part_of(&self.key)
    }
}

/// The key of the one integer buffer; loaders skip it (it only holds `0..max_positions`).
pub const POSITION_IDS_KEY: &str =
    "text_encoder.clip_text_model.text_model.embeddings.position_ids";

/// The parts `segvol inspect` reports on, as key prefixes (spec §5.1 totals table).
pub const PARTS: [&str; 5] = [
    "image_encoder",
    "prompt_encoder",
    "mask_decoder",
    "text_encoder.clip_text_model",
    "text_encoder.dim_align",
];

/// The part (one of [`PARTS`]) a key belongs to, or `"other"`.
pub fn part_of(key: &str) -> &'static str {
    PARTS
        .iter()
        .find(|p| {
            key.strip_prefix(**p)
                .is_some_and(|rest| rest.starts_with('.'))
        })
        .copied()
        .unwrap_or("other")
}

/// Appends specs in order; keeps `schema` readable.
struct Builder {
    out: Vec<TensorSpec>,
}

impl Builder {
    fn f32(&mut self, key: String, shape: &[usize]) {
        self.out.push(TensorSpec {
            key,
            shape: shape.to_vec(),
            dtype: SpecDType::F32,
        });
    }

    /// `Linear(inp -> out)`: weight (out, inp) then bias (out).
    fn linear(&mut self, prefix: &str, inp: usize, out: usize) {
        self.f32(format!("{prefix}.weight"), &[out, inp]);
        self.f32(format!("{prefix}.bias"), &[out]);
    }

    /// A LayerNorm (or any per-channel affine pair) of shape `shape`.
    fn norm(&mut self, prefix: &str, shape: &[usize]) {
        self.f32(format!("{prefix}.weight"), shape);
        self.f32(format!("{prefix}.bias"), shape);
    }

    /// SAM `Attention(dim, heads, downsample)`: q, k, v project dim -> dim/ds, out back (§4.2).
    fn sam_attention(&mut self, prefix: &str, dim: usize, inner: usize) {
        self.linear(&format!("{prefix}.q_proj"), dim, inner);
        self.linear(&format!("{prefix}.k_proj"), dim, inner);
        self.linear(&format!("{prefix}.v_proj"), dim, inner);
        self.linear(&format!("{prefix}.out_proj"), inner, dim);
    }
}

/// Every state-dict key of SegVol for `cfg`, in `state_dict()` order, without a file prefix
/// (spec §5.1; order pinned by the fixtures' `weights-checksums.json`, fixtures README §2).
pub fn schema(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut b = Builder { out: Vec::new() };
    let e = &cfg.encoder;
    let d = &cfg.decoder;
    let t = &cfg.text;
    let dim = d.dim;
    let (up1, up2) = cfg.upscale_channels();
    let (grid2, _) = cfg.upscale_grids();

    // Image encoder (§1): MONAI ViT. Within a block the modules were registered as mlp, norm1,
    // attn (out_proj before qkv), norm2, which is the order state_dict() follows.
    let ie = "image_encoder";
    b.f32(
        format!("{ie}.patch_embedding.position_embeddings"),
        &[1, cfg.num_tokens(), e.hidden],
    );
    b.linear(
        &format!("{ie}.patch_embedding.patch_embeddings.1"),
        cfg.patch_dim(),
        e.hidden,
    );
    for i in 0..e.layers {
        let p = format!("{ie}.blocks.{i}");
        b.linear(&format!("{p}.mlp.linear1"), e.hidden, e.mlp);
        b.linear(&format!("{p}.mlp.linear2"), e.mlp, e.hidden);
        b.norm(&format!("{p}.norm1"), &[e.hidden]);
        b.linear(&format!("{p}.attn.out_proj"), e.hidden, e.hidden);
        b.f32(format!("{p}.attn.qkv.weight"), &[3 * e.hidden, e.hidden]);
        b.norm(&format!("{p}.norm2"), &[e.hidden]);
    }
    b.norm(&format!("{ie}.norm"), &[e.hidden]);

    // Mask decoder (§4).
    let md = "mask_decoder";
    let inner = dim / d.attention_downsample;
    for i in 0..d.depth {
        let p = format!("{md}.transformer.layers.{i}");
        b.sam_attention(&format!("{p}.self_attn"), dim, dim);
        b.norm(&format!("{p}.norm1"), &[dim]);
        b.sam_attention(&format!("{p}.cross_attn_token_to_image"), dim, inner);
        b.norm(&format!("{p}.norm2"), &[dim]);
        b.linear(&format!("{p}.mlp.lin1"), dim, d.mlp);
        b.linear(&format!("{p}.mlp.lin2"), d.mlp, dim);
        b.norm(&format!("{p}.norm3"), &[dim]);
        b.norm(&format!("{p}.norm4"), &[dim]);
        b.sam_attention(&format!("{p}.cross_attn_image_to_token"), dim, inner);
    }
    b.sam_attention(
        &format!("{md}.transformer.final_attn_token_to_image"),
        dim,
        inner,
    );
    b.norm(&format!("{md}.transformer.norm_final_attn"), &[dim]);
    b.f32(format!("{md}.iou_token.weight"), &[1, dim]);
    b.f32(format!("{md}.mask_tokens.weight"), &[d.mask_tokens, dim]);
    // Upscaling (§4.4): ConvTranspose3d weights are (in, out, 2, 2, 2); index 1 is the joint
    // LayerNorm over (C, D, H, W) of the 2x grid.
    b.f32(
        format!("{md}.output_upscaling.0.weight"),
        &[dim, up1, 2, 2, 2],
    );
    b.f32(format!("{md}.output_upscaling.0.bias"), &[up1]);
    b.norm(
        &format!("{md}.output_upscaling.1"),
        &[up1, grid2[0], grid2[1], grid2[2]],
    );
    b.f32(
        format!("{md}.output_upscaling.3.weight"),
        &[up1, up2, 2, 2, 2],
    );
    b.f32(format!("{md}.output_upscaling.3.bias"), &[up2]);
    // Hypernetwork MLPs (§4.5): three layers each, one per mask token.
    for j in 0..d.mask_tokens {
        let p = format!("{md}.output_hypernetworks_mlps.{j}.layers");
        b.linear(&format!("{p}.0"), dim, dim);
        b.linear(&format!("{p}.1"), dim, dim);
        b.linear(&format!("{p}.2"), dim, up2);
    }
    let p = format!("{md}.iou_prediction_head.layers");
    b.linear(&format!("{p}.0"), dim, d.iou_hidden);
    b.linear(&format!("{p}.1"), d.iou_hidden, d.iou_hidden);
    b.linear(&format!("{p}.2"), d.iou_hidden, d.mask_tokens);
    b.linear(&format!("{md}.txt_align_upscaled_embedding"), dim, up2);

    // Prompt encoder (§2). `mask_downscaling` has fixed SAM widths (mask_in_chans 16, 16/4).
    let pe = "prompt_encoder";
    b.f32(
        format!("{pe}.pe_layer.positional_encoding_gaussian_matrix"),
        &[3, cfg.pe_features()],
    );
    for i in 0..4 {
        b.f32(format!("{pe}.point_embeddings.{i}.weight"), &[1, dim]);
    }
    b.f32(format!("{pe}.not_a_point_embed.weight"), &[1, dim]);
    b.f32(format!("{pe}.mask_downscaling.0.weight"), &[4, 1, 2, 2]);
    b.f32(format!("{pe}.mask_downscaling.0.bias"), &[4]);
    b.norm(&format!("{pe}.mask_downscaling.1"), &[4]);
    b.f32(format!("{pe}.mask_downscaling.3.weight"), &[16, 4, 2, 2]);
    b.f32(format!("{pe}.mask_downscaling.3.bias"), &[16]);
    b.norm(&format!("{pe}.mask_downscaling.4"), &[16]);
    b.f32(format!("{pe}.mask_downscaling.6.weight"), &[dim, 16, 1, 1]);
    b.f32(format!("{pe}.mask_downscaling.6.bias"), &[dim]);
    b.f32(format!("{pe}.no_mask_embed.weight"), &[1, dim]);

    // Text encoder (§3): HF CLIPTextModel, then dim_align. Attention projections are
    // registered k, v, q, out in HF's CLIPAttention.
    let tm = "text_encoder.clip_text_model.text_model";
    b.out.push(TensorSpec {
        key: POSITION_IDS_KEY.to_string(),
        shape: vec![1, t.max_positions],
        dtype: SpecDType::I64,
    });
    b.f32(
        format!("{tm}.embeddings.token_embedding.weight"),
        &[t.vocab, t.hidden],
    );
    b.f32(
        format!("{tm}.embeddings.position_embedding.weight"),
        &[t.max_positions, t.hidden],
    );
    for i in 0..t.layers {
        let p = format!("{tm}.encoder.layers.{i}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            b.linear(&format!("{p}.self_attn.{proj}"), t.hidden, t.hidden);
        }
        b.norm(&format!("{p}.layer_norm1"), &[t.hidden]);
        b.linear(&format!("{p}.mlp.fc1"), t.hidden, t.intermediate);
        b.linear(&format!("{p}.mlp.fc2"), t.intermediate, t.hidden);
        b.norm(&format!("{p}.layer_norm2"), &[t.hidden]);
    }
    b.norm(&format!("{tm}.final_layer_norm"), &[t.hidden]);
    b.linear("text_encoder.dim_align", t.hidden, dim);
    b.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(cfg: &ModelConfig) -> (usize, usize) {
        let s = schema(cfg);
        (s.len(), s.iter().map(TensorSpec::numel).sum())
    }

    #[test]
    fn key_and_value_counts() {
        // Fixtures README §2 table and spec §5.1 totals.
        assert_eq!(totals(&ModelConfig::full()), (475, 180_891_293));
        assert_eq!(totals(&ModelConfig::tiny()), (205, 2_240_669));
    }

    #[test]
    fn part_totals_match_spec() {
        let mut sums = std::collections::HashMap::new();
        for s in schema(&ModelConfig::full()) {
            *sums.entry(s.part()).or_insert(0usize) += s.numel();
        }
        assert_eq!(sums["image_encoder"], 87_388_416);
        assert_eq!(sums["mask_decoder"], 29_923_716);
        assert_eq!(sums["prompt_encoder"], 19_148);
        assert_eq!(sums["text_encoder.clip_text_model"], 63_166_029);
        assert_eq!(sums["text_encoder.dim_align"], 393_984);
        assert!(!sums.contains_key("other"));
    }

    #[test]
    fn keys_are_unique() {
        let s = schema(&ModelConfig::full());
        let set: std::collections::HashSet<_> = s.iter().map(|t| &t.key).collect();
        assert_eq!(set.len(), s.len());
    }

    #[test]
    fn part_of_needs_a_dot() {
        assert_eq!(part_of("image_encoder.norm.weight"), "image_encoder");
        assert_eq!(
            part_of("text_encoder.dim_align.bias"),
            "text_encoder.dim_align"
        );
        assert_eq!(part_of("image_encoderX.norm.weight"), "other");
    }
}
