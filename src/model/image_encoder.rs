//! The ViT image encoder (spec §1): patch embedding, 12 pre-norm transformer blocks, final
//! LayerNorm. Output: image tokens `(B, N, C)`, token `t = i*(H/16*W/16) + j*(W/16) + k`
//! (spec §1.4); the `(B, C, D/4, H/16, W/16)` view of the spec is this tensor transposed.

use super::ops::{self, attention, layer_norm, linear, linear_into, Mha, View};
use crate::backend::{Act, GemmArgs, PatchGatherArgs, Residual};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::program::{Op, Program, TensorId};

/// The encoder program's external tensors.
#[derive(Clone, Copy, Debug)]
pub struct EncoderIo {
    /// Input windows `(B, 1, D, H, W)`, f32 in [0, 1].
    pub image: TensorId,
    /// Output image tokens `(B, N, C)`.
    pub embedding: TensorId,
    /// With stages: `patch_embedding` and `vit_block0`, both `(B, N, C)`.
    pub stages: Option<(TensorId, TensorId)>,
}

/// Builds the encoder for `batch` windows.
pub fn build(cfg: &ModelConfig, batch: usize, dtype: DType, stages: bool) -> (Program, EncoderIo) {
    let mut p = Program::new(format!("image_encoder[b={batch}]"), dtype);
    let [d, h, w] = cfg.spatial_size;
    let c = cfg.encoder.hidden;
    let n = cfg.num_tokens();
    let pd = cfg.patch_dim();
    let rows = batch * n;
    let image = p.external("image", &[batch, 1, d, h, w], DType::F32);
    let embedding = p.external("image_embedding", &[batch, n, c], dtype);
    let stage_ts = stages.then(|| {
        (
            p.external("patch_embedding", &[batch, n, c], dtype),
            p.external("vit_block0", &[batch, n, c], dtype),
        )
    });

    // §1.2: the (4,16,16) patches in (a,b,c) order, Linear(1024 -> 768) + bias, + position
    // embedding (added as a GEMM residual broadcast over the batch).
    let patches = p.activation("patches", &[batch, n, pd]);
    let op = PatchGatherArgs {
        x: p.addr(image),
        x_dtype: DType::F32,
        out: p.addr(patches),
        batch,
        dims: cfg.spatial_size,
        patch: cfg.patch_size,
    };
    p.push("patch_embedding.gather", Op::PatchGather3d(op));
    let pe = "image_encoder.patch_embedding";
    let wp = p.weight(&format!("{pe}.patch_embeddings.1.weight"), &[c, pd]);
    let bp = p.weight(&format!("{pe}.patch_embeddings.1.bias"), &[c]);
    let pos = p.weight(&format!("{pe}.position_embeddings"), &[1, n, c]);
    let x = p.activation("x", &[batch, n, c]);
    let op = GemmArgs {
        batch,
        m: n,
        n: c,
        k: pd,
        a: p.addr(patches),
        lda: pd,
        batch_stride_a: n * pd,
        b: p.addr(wp),
        ldb: pd,
        batch_stride_b: 0,
        b_trans: true,
        c: p.addr(x),
        ldc: c,
        batch_stride_c: n * c,
        alpha: 1.0,
        bias: Some(p.addr(bp)),
        act: Act::None,
        residual: Some(Residual {
            addr: p.addr(pos),
            ld: c,
            batch_stride: 0,
        }),
    };
    p.push("patch_embedding.linear", Op::Gemm(op));
    if let Some((pe_out, _)) = stage_ts {
        ops::copy(&mut p, "stage.patch_embedding", x, 0, pe_out, rows * c);
    }

    // §1.3: pre-norm blocks. qkv has no bias; heads are `s*C + head*64 + e` in the packed
    // output, so q, k and v are column views of one buffer.
    let heads = cfg.encoder.heads;
    let hd = c / heads;
    let mha = Mha {
        batch,
        heads,
        head_dim: hd,
        scale: (hd as f32).powf(-0.5),
        causal: false,
    };
    for l in 0..cfg.encoder.layers {
        let b = format!("image_encoder.blocks.{l}");
        let hn = layer_norm(
            &mut p,
            &format!("{b}.norm1"),
            x,
            rows,
            c,
            &format!("{b}.norm1"),
        );
        let qkv = linear(
            &mut p,
            &format!("{b}.attn.qkv"),
            View::full(hn, rows, c),
            &format!("{b}.attn.qkv"),
            3 * c,
            false,
            Act::None,
        );
        let packed = |offset| ops::Seq {
            t: qkv,
            offset,
            len: n,
            row: 3 * c,
            batch: n * 3 * c,
        };
        let a = attention(
            &mut p,
            &format!("{b}.attn"),
            &mha,
            packed(0),
            packed(c),
            packed(2 * c),
        );
        linear_into(
            &mut p,
            &format!("{b}.attn.out_proj"),
            View::full(a, rows, c),
            &format!("{b}.attn.out_proj"),
            c,
            true,
            Act::None,
            View::full(x, rows, c),
            true,
        );
        let hn = layer_norm(
            &mut p,
            &format!("{b}.norm2"),
            x,
            rows,
            c,
            &format!("{b}.norm2"),
        );
        let m = linear(
            &mut p,
            &format!("{b}.mlp.linear1"),
            View::full(hn, rows, c),
            &format!("{b}.mlp.linear1"),
            cfg.encoder.mlp,
            true,
            Act::Gelu,
        );
        linear_into(
            &mut p,
            &format!("{b}.mlp.linear2"),
            View::full(m, rows, cfg.encoder.mlp),
            &format!("{b}.mlp.linear2"),
            c,
            true,
            Act::None,
            View::full(x, rows, c),
            true,
        );
        if l == 0 {
            if let Some((_, blk0)) = stage_ts {
                ops::copy(&mut p, "stage.vit_block0", x, 0, blk0, rows * c);
            }
        }
    }
    // §1.4: final LayerNorm, straight into the output.
    ops::layer_norm_into(
        &mut p,
        "image_encoder.norm",
        x,
        embedding,
        rows,
        c,
        "image_encoder.norm",
    );
    let io = EncoderIo {
        image,
        embedding,
        stages: stage_ts,
    };
    (p, io)
}
