//! The mask decoder (spec §4): the two-way transformer (post-norm, layer 0 without residual
//! and without query PE in its self-attention), the upscaling stack with the joint LayerNorm,
//! the hypernetworks with the text-similarity term, and the trilinear resize to the window
//! (spec §4.6). The IoU head is not built: its output is unused (spec §4.5).

use super::ops::{self, add, attention, layer_norm_into, linear, linear_into, seq, Mha, View};
use crate::backend::{
    Act, ConvT3dArgs, GemmArgs, Interp3dArgs, InterpMode, LayerNormJointArgs, Residual,
};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::program::{Op, Program, TensorId};

/// What one decoder program takes: batch size, sparse token count, whether there is text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecoderKey {
    pub batch: usize,
    pub sparse: usize,
    pub text: bool,
}

/// The decoder program's external tensors.
#[derive(Clone, Copy, Debug)]
pub struct DecoderIo {
    /// Image tokens `(B, N, C)` from the encoder.
    pub image_embedding: TensorId,
    /// `[iou_token; mask_tokens; sparse]`, `(B, T, C)`, built on the host.
    pub tokens: TensorId,
    /// Text embeddings `(B, C)`, when the key has text.
    pub text_embedding: Option<TensorId>,
    /// Output logits `(B, 1, D, H, W)`, f32.
    pub logits: TensorId,
    /// With stages: `decoder_tokens (B,T,C)`, `decoder_image (B,N,C)`, `upscaled_embedding`,
    /// `low_res_masks (B,M,4g)`.
    pub stages: Option<[TensorId; 4]>,
}

const T: &str = "mask_decoder.transformer";

/// Builds the decoder for `key`.
pub fn build(
    cfg: &ModelConfig,
    key: DecoderKey,
    dtype: DType,
    stages: bool,
) -> (Program, DecoderIo) {
    let DecoderKey {
        batch,
        sparse,
        text,
    } = key;
    let dec = &cfg.decoder;
    let c = dec.dim;
    let n = cfg.num_tokens();
    let m_tok = dec.mask_tokens;
    let t = 1 + m_tok + sparse;
    let (c4, c8) = cfg.upscale_channels();
    let (g2, g4) = cfg.upscale_grids();
    let v2: usize = g2.iter().product();
    let v4: usize = g4.iter().product();
    let mut p = Program::new(format!("mask_decoder[b={batch},t={t},text={text}]"), dtype);

    let image_embedding = p.external("image_embedding", &[batch, n, c], dtype);
    let tokens = p.external("tokens", &[batch, t, c], dtype);
    let text_embedding = text.then(|| p.external("text_embedding", &[batch, c], dtype));
    let logits = p.external(
        "logits",
        &[
            batch,
            1,
            cfg.spatial_size[0],
            cfg.spatial_size[1],
            cfg.spatial_size[2],
        ],
        DType::F32,
    );
    let stage_ts = stages.then(|| {
        [
            p.external("decoder_tokens", &[batch, t, c], dtype),
            p.external("decoder_image", &[batch, n, c], dtype),
            p.external(
                "upscaled_embedding",
                &[batch, c8, g4[0], g4[1], g4[2]],
                dtype,
            ),
            p.external("low_res_masks", &[batch, m_tok, g4[0], g4[1], g4[2]], dtype),
        ]
    });

    // §4.1: src = image embedding + no_mask_embed (the dense prompt), pos = dense PE.
    let no_mask = p.weight("prompt_encoder.no_mask_embed.weight", &[1, c]);
    let keys = add(&mut p, "src", image_embedding, no_mask, c);
    let dense_pe = p.weight(super::DENSE_PE_KEY, &[n, c]);
    let (qrows, krows) = (batch * t, batch * n);

    // One SAM `Attention` (§4.2): projections to dim/r, 8 heads, out_proj back, added to
    // `target` in place (or written to a new tensor when `target` is None: layer 0's
    // self-attention replaces the queries).
    let attn = |p: &mut Program,
                prefix: &str,
                r: usize,
                q: (TensorId, usize),
                k: (TensorId, usize),
                v: TensorId,
                target: Option<TensorId>|
     -> TensorId {
        let inner = c / r;
        let hd = inner / dec.heads;
        let (qt, nq) = q;
        let (kt, nk) = k;
        let qp = linear(
            p,
            &format!("{prefix}.q"),
            View::full(qt, batch * nq, c),
            &format!("{prefix}.q_proj"),
            inner,
            true,
            Act::None,
        );
        let kp = linear(
            p,
            &format!("{prefix}.k"),
            View::full(kt, batch * nk, c),
            &format!("{prefix}.k_proj"),
            inner,
            true,
            Act::None,
        );
        let vp = linear(
            p,
            &format!("{prefix}.v"),
            View::full(v, batch * nk, c),
            &format!("{prefix}.v_proj"),
            inner,
            true,
            Act::None,
        );
        let mha = Mha {
            batch,
            heads: dec.heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            causal: false,
        };
        let a = attention(
            p,
            prefix,
            &mha,
            seq(qp, nq, inner),
            seq(kp, nk, inner),
            seq(vp, nk, inner),
        );
        let (out, residual) = match target {
            Some(x) => (x, true),
            None => (
                p.activation(format!("{prefix}.result"), &[batch * nq, c]),
                false,
            ),
        };
        linear_into(
            p,
            &format!("{prefix}.out_proj"),
            View::full(a, batch * nq, inner),
            &format!("{prefix}.out_proj"),
            c,
            true,
            Act::None,
            View::full(out, batch * nq, c),
            residual,
        );
        out
    };

    // §4.3: the two-way blocks. QPE is the original token tensor; KPE the dense PE.
    let mut queries = tokens;
    let mut k_with_pe = add(&mut p, "keys+pe", keys, dense_pe, n * c);
    for l in 0..dec.depth {
        let b = format!("{T}.layers.{l}");
        if l == 0 {
            queries = attn(
                &mut p,
                &format!("{b}.self_attn"),
                1,
                (tokens, t),
                (tokens, t),
                tokens,
                None,
            );
        } else {
            let qp = add(&mut p, &format!("{b}.q+pe"), queries, tokens, batch * t * c);
            attn(
                &mut p,
                &format!("{b}.self_attn"),
                1,
                (qp, t),
                (qp, t),
                queries,
                Some(queries),
            );
        }
        layer_norm_into(
            &mut p,
            &format!("{b}.norm1"),
            queries,
            queries,
            qrows,
            c,
            &format!("{b}.norm1"),
        );
        let qp = add(&mut p, &format!("{b}.q+pe"), queries, tokens, batch * t * c);
        if l > 0 {
            k_with_pe = add(&mut p, &format!("{b}.k+pe"), keys, dense_pe, n * c);
        }
        attn(
            &mut p,
            &format!("{b}.cross_attn_token_to_image"),
            dec.attention_downsample,
            (qp, t),
            (k_with_pe, n),
            keys,
            Some(queries),
        );
        layer_norm_into(
            &mut p,
            &format!("{b}.norm2"),
            queries,
            queries,
            qrows,
            c,
            &format!("{b}.norm2"),
        );
        let hmid = linear(
            &mut p,
            &format!("{b}.mlp.lin1"),
            View::full(queries, qrows, c),
            &format!("{b}.mlp.lin1"),
            dec.mlp,
            true,
            Act::Relu,
        );
        linear_into(
            &mut p,
            &format!("{b}.mlp.lin2"),
            View::full(hmid, qrows, dec.mlp),
            &format!("{b}.mlp.lin2"),
            c,
            true,
            Act::None,
            View::full(queries, qrows, c),
            true,
        );
        layer_norm_into(
            &mut p,
            &format!("{b}.norm3"),
            queries,
            queries,
            qrows,
            c,
            &format!("{b}.norm3"),
        );
        // Keys have not changed since k_with_pe was formed, so it is reused (§4.3 step 4).
        let qp = add(
            &mut p,
            &format!("{b}.q+pe.2"),
            queries,
            tokens,
            batch * t * c,
        );
        attn(
            &mut p,
            &format!("{b}.cross_attn_image_to_token"),
            dec.attention_downsample,
            (k_with_pe, n),
            (qp, t),
            queries,
            Some(keys),
        );
        layer_norm_into(
            &mut p,
            &format!("{b}.norm4"),
            keys,
            keys,
            krows,
            c,
            &format!("{b}.norm4"),
        );
    }
    let qp = add(&mut p, "final.q+pe", queries, tokens, batch * t * c);
    let kp = add(&mut p, "final.k+pe", keys, dense_pe, n * c);
    attn(
        &mut p,
        &format!("{T}.final_attn_token_to_image"),
        dec.attention_downsample,
        (qp, t),
        (kp, n),
        keys,
        Some(queries),
    );
    layer_norm_into(
        &mut p,
        "norm_final_attn",
        queries,
        queries,
        qrows,
        c,
        &format!("{T}.norm_final_attn"),
    );
    if let Some(s) = stage_ts {
        ops::copy(&mut p, "stage.decoder_tokens", queries, 0, s[0], qrows * c);
        ops::copy(&mut p, "stage.decoder_image", keys, 0, s[1], krows * c);
    }

    // §4.4: upscaling. The keys are already (B, N, C) = channels-last over the token grid.
    let up = "mask_decoder.output_upscaling";
    let u1 = p.activation("upscaled.1", &[batch, c4, g2[0], g2[1], g2[2]]);
    let w0 = p.weight(&format!("{up}.0.weight"), &[c, c4, 2, 2, 2]);
    let b0 = p.weight(&format!("{up}.0.bias"), &[c4]);
    let op = ConvT3dArgs {
        x: p.addr(keys),
        out: p.addr(u1),
        weight: p.addr(w0),
        bias: p.addr(b0),
        batch,
        cin: c,
        cout: c4,
        dims: cfg.token_grid(),
        channels_last_input: true,
        act: Act::None,
    };
    p.push(format!("{up}.0"), Op::ConvTranspose3d(op));
    let lnw = p.weight(&format!("{up}.1.weight"), &[c4, g2[0], g2[1], g2[2]]);
    let lnb = p.weight(&format!("{up}.1.bias"), &[c4, g2[0], g2[1], g2[2]]);
    let op = LayerNormJointArgs {
        x: p.addr(u1),
        out: p.addr(u1),
        batch,
        n: c4 * v2,
        weight: p.addr(lnw),
        bias: p.addr(lnb),
        eps: ops::LN_EPS,
        act: Act::Gelu,
    };
    p.push(format!("{up}.1+gelu"), Op::LayerNormJoint(op));
    let u = p.activation("upscaled", &[batch, c8, g4[0], g4[1], g4[2]]);
    let w3 = p.weight(&format!("{up}.3.weight"), &[c4, c8, 2, 2, 2]);
    let b3 = p.weight(&format!("{up}.3.bias"), &[c8]);
    let op = ConvT3dArgs {
        x: p.addr(u1),
        out: p.addr(u),
        weight: p.addr(w3),
        bias: p.addr(b3),
        batch,
        cin: c4,
        cout: c8,
        dims: g2,
        channels_last_input: false,
        act: Act::Gelu,
    };
    p.push(format!("{up}.3+gelu"), Op::ConvTranspose3d(op));
    if let Some(s) = stage_ts {
        ops::copy(
            &mut p,
            "stage.upscaled_embedding",
            u,
            0,
            s[2],
            batch * c8 * v4,
        );
    }

    // §4.5: hypernetworks on the mask tokens (rows 1..=M of each sequence).
    let hyper = p.activation("hyper_in", &[batch, m_tok, c8]);
    for m in 0..m_tok {
        let pre = format!("mask_decoder.output_hypernetworks_mlps.{m}.layers");
        let row = View {
            t: queries,
            offset: (1 + m) * c,
            rows: batch,
            cols: c,
            ld: t * c,
        };
        let h0 = linear(
            &mut p,
            &format!("{pre}.0"),
            row,
            &format!("{pre}.0"),
            c,
            true,
            Act::Relu,
        );
        let h1 = linear(
            &mut p,
            &format!("{pre}.1"),
            View::full(h0, batch, c),
            &format!("{pre}.1"),
            c,
            true,
            Act::Relu,
        );
        let out = View {
            t: hyper,
            offset: m * c8,
            rows: batch,
            cols: c8,
            ld: m_tok * c8,
        };
        linear_into(
            &mut p,
            &format!("{pre}.2"),
            View::full(h1, batch, c),
            &format!("{pre}.2"),
            c8,
            true,
            Act::None,
            out,
            false,
        );
    }
    // masks = hyper_in @ U (per sample), plus the text similarity t96 @ U broadcast over the
    // mask channels (added as a residual whose rows are all the same: ld = 0).
    let sim = text_embedding.map(|te| {
        let t96 = linear(
            &mut p,
            "mask_decoder.txt_align_upscaled_embedding",
            View::full(te, batch, c),
            "mask_decoder.txt_align_upscaled_embedding",
            c8,
            true,
            Act::None,
        );
        let sim = p.activation("similarity", &[batch, 1, v4]);
        let op = batched_matmul(&p, t96, 1, u, sim, c8, v4, None);
        p.push("text_similarity", Op::Gemm(op));
        sim
    });
    let masks = p.activation("low_res_masks", &[batch, m_tok, v4]);
    let op = batched_matmul(&p, hyper, m_tok, u, masks, c8, v4, sim);
    p.push("masks", Op::Gemm(op));
    if let Some(s) = stage_ts {
        ops::copy(
            &mut p,
            "stage.low_res_masks",
            masks,
            0,
            s[3],
            batch * m_tok * v4,
        );
    }

    // §4.6: channel 0, trilinear (align_corners=False) to the window, f32 out.
    let win: usize = cfg.window_voxels();
    for b in 0..batch {
        let op = Interp3dArgs {
            x: p.at(masks, b * m_tok * v4),
            x_dtype: dtype,
            out: p.at(logits, b * win),
            out_dtype: DType::F32,
            planes: 1,
            src: g4,
            dst: cfg.spatial_size,
            mode: InterpMode::Trilinear,
        };
        p.push(format!("interpolate[{b}]"), Op::Interp3d(op));
    }
    let io = DecoderIo {
        image_embedding,
        tokens,
        text_embedding,
        logits,
        stages: stage_ts,
    };
    (p, io)
}

/// `out[b] = a[b] (rows x k) @ u[b] (k x v)`, plus a row-broadcast residual `(B, 1, v)`.
#[allow(clippy::too_many_arguments)]
fn batched_matmul(
    p: &Program,
    a: TensorId,
    rows: usize,
    u: TensorId,
    out: TensorId,
    k: usize,
    v: usize,
    residual: Option<TensorId>,
) -> GemmArgs {
    let batch = p.desc(a).shape[0];
    GemmArgs {
        batch,
        m: rows,
        n: v,
        k,
        a: p.addr(a),
        lda: k,
        batch_stride_a: rows * k,
        b: p.addr(u),
        ldb: v,
        batch_stride_b: k * v,
        b_trans: false,
        c: p.addr(out),
        ldc: v,
        batch_stride_c: rows * v,
        alpha: 1.0,
        bias: None,
        act: Act::None,
        residual: residual.map(|r| Residual {
            addr: p.addr(r),
            ld: 0,
            batch_stride: v,
        }),
    }
}
