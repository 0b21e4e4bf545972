//! The CLIP text tower and `dim_align` (spec §3): token + position embedding, pre-LN causal
//! transformer layers with quick_gelu, final LayerNorm, the hidden state at the first EOS
//! (`argmax(input_ids)`), then `Linear(512 -> 768)`.

use super::ops::{self, attention, layer_norm, linear, linear_into, seq, Mha, View};
use crate::backend::{Act, EmbedArgs};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::program::{Op, Program, TensorId};

/// Key prefix of the CLIP text model in the checkpoint.
pub const CLIP: &str = "text_encoder.clip_text_model.text_model";

/// The text program's external tensors.
#[derive(Clone, Copy, Debug)]
pub struct TextIo {
    /// Token ids `(L)`, i32.
    pub ids: TensorId,
    /// Pooled CLIP output `(1, text.hidden)` (the `text_pooled` stage).
    pub pooled: TensorId,
    /// `dim_align` output `(1, C)`: the text embedding.
    pub embedding: TensorId,
}

/// Builds the text tower for one prompt of `len` tokens whose first EOS is at `eos`.
pub fn build(cfg: &ModelConfig, len: usize, eos: usize, dtype: DType) -> (Program, TextIo) {
    let t = &cfg.text;
    let w = t.hidden;
    let mut p = Program::new(format!("text_encoder[l={len}]"), dtype);
    let ids = p.external("input_ids", &[len], DType::I32);
    let pooled = p.external("text_pooled", &[1, w], dtype);
    let embedding = p.external("text_embedding", &[1, cfg.decoder.dim], dtype);

    let table = p.weight(
        &format!("{CLIP}.embeddings.token_embedding.weight"),
        &[t.vocab, w],
    );
    let pos = p.weight(
        &format!("{CLIP}.embeddings.position_embedding.weight"),
        &[t.max_positions, w],
    );
    let h = p.activation("hidden", &[len, w]);
    let op = EmbedArgs {
        ids: p.addr(ids),
        table: p.addr(table),
        vocab: t.vocab,
        pos: p.addr(pos),
        out: p.addr(h),
        rows: len,
        cols: w,
    };
    p.push("clip.embeddings", Op::Embed(op));

    let hd = w / t.heads;
    let mha = Mha {
        batch: 1,
        heads: t.heads,
        head_dim: hd,
        scale: (hd as f32).powf(-0.5),
        causal: true,
    };
    let full = |x| View::full(x, len, w);
    for l in 0..t.layers {
        let b = format!("{CLIP}.encoder.layers.{l}");
        let x = layer_norm(
            &mut p,
            &format!("{b}.layer_norm1"),
            h,
            len,
            w,
            &format!("{b}.layer_norm1"),
        );
        let q = linear(
            &mut p,
            &format!("{b}.q"),
            full(x),
            &format!("{b}.self_attn.q_proj"),
            w,
            true,
            Act::None,
        );
        let k = linear(
            &mut p,
            &format!("{b}.k"),
            full(x),
            &format!("{b}.self_attn.k_proj"),
            w,
            true,
            Act::None,
        );
        let v = linear(
            &mut p,
            &format!("{b}.v"),
            full(x),
            &format!("{b}.self_attn.v_proj"),
            w,
            true,
            Act::None,
        );
        let a = attention(
            &mut p,
            &format!("{b}.self_attn"),
            &mha,
            seq(q, len, w),
            seq(k, len, w),
            seq(v, len, w),
        );
        linear_into(
            &mut p,
            &format!("{b}.out_proj"),
            full(a),
            &format!("{b}.self_attn.out_proj"),
            w,
            true,
            Act::None,
            full(h),
            true,
        );
        let x = layer_norm(
            &mut p,
            &format!("{b}.layer_norm2"),
            h,
            len,
            w,
            &format!("{b}.layer_norm2"),
        );
        let f = linear(
            &mut p,
            &format!("{b}.mlp.fc1"),
            full(x),
            &format!("{b}.mlp.fc1"),
            t.intermediate,
            true,
            Act::QuickGelu,
        );
        linear_into(
            &mut p,
            &format!("{b}.mlp.fc2"),
            View::full(f, len, t.intermediate),
            &format!("{b}.mlp.fc2"),
            w,
            true,
            Act::None,
            full(h),
            true,
        );
    }
    let f = layer_norm(
        &mut p,
        "clip.final_layer_norm",
        h,
        len,
        w,
        &format!("{CLIP}.final_layer_norm"),
    );
    ops::copy(&mut p, "clip.pool_eos", f, eos * w, pooled, w);
    linear_into(
        &mut p,
        "text_encoder.dim_align",
        View::full(pooled, 1, w),
        "text_encoder.dim_align",
        cfg.decoder.dim,
        true,
        Act::None,
        View::full(embedding, 1, cfg.decoder.dim),
        false,
    );
    (
        p,
        TextIo {
            ids,
            pooled,
            embedding,
        },
    )
}
