//! Small builders that append ops to a [`Program`]: the vocabulary the model is written in.
//! Every helper takes and returns tensor ids; shapes are explicit so each step reads like the
//! PyTorch line it mirrors.

use crate::backend::{Act, ActArgs, AddArgs, AttentionArgs, GemmArgs, LayerNormArgs, Residual};
use crate::program::{Op, Program, TensorId};

/// LayerNorm epsilon everywhere except the unused LayerNorm2d (spec §7.7).
pub const LN_EPS: f32 = 1e-5;

/// A row-major matrix view: `rows x cols` starting at element `offset` of `t`, rows `ld` apart.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub t: TensorId,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl View {
    /// The whole of a contiguous `rows x cols` tensor.
    pub fn full(t: TensorId, rows: usize, cols: usize) -> Self {
        View {
            t,
            offset: 0,
            rows,
            cols,
            ld: cols,
        }
    }
}

/// `nn.Linear`: `out = act(x @ W^T + b)`, into a new activation `name` of `rows x out_dim`.
pub fn linear(
    p: &mut Program,
    name: &str,
    x: View,
    prefix: &str,
    out_dim: usize,
    bias: bool,
    act: Act,
) -> TensorId {
    let out = p.activation(name, &[x.rows, out_dim]);
    linear_into(
        p,
        name,
        x,
        prefix,
        out_dim,
        bias,
        act,
        View::full(out, x.rows, out_dim),
        false,
    );
    out
}

/// `nn.Linear` writing into `out`; with `residual`, `out += x @ W^T + b` in place.
#[allow(clippy::too_many_arguments)]
pub fn linear_into(
    p: &mut Program,
    label: &str,
    x: View,
    prefix: &str,
    out_dim: usize,
    bias: bool,
    act: Act,
    out: View,
    residual: bool,
) {
    let w = p.weight(&format!("{prefix}.weight"), &[out_dim, x.cols]);
    let b = bias.then(|| p.weight(&format!("{prefix}.bias"), &[out_dim]));
    let c = p.at(out.t, out.offset);
    let op = GemmArgs {
        batch: 1,
        m: x.rows,
        n: out_dim,
        k: x.cols,
        a: p.at(x.t, x.offset),
        lda: x.ld,
        batch_stride_a: 0,
        b: p.addr(w),
        ldb: x.cols,
        batch_stride_b: 0,
        b_trans: true,
        c,
        ldc: out.ld,
        batch_stride_c: 0,
        alpha: 1.0,
        bias: b.map(|b| p.addr(b)),
        act,
        residual: residual.then_some(Residual {
            addr: c,
            ld: out.ld,
            batch_stride: 0,
        }),
    };
    p.push(label, Op::Gemm(op));
}

/// Row-wise LayerNorm of `rows x cols` with weights `{prefix}.weight/bias`; `out` may be `x`.
pub fn layer_norm_into(
    p: &mut Program,
    label: &str,
    x: TensorId,
    out: TensorId,
    rows: usize,
    cols: usize,
    prefix: &str,
) {
    let w = p.weight(&format!("{prefix}.weight"), &[cols]);
    let b = p.weight(&format!("{prefix}.bias"), &[cols]);
    let op = LayerNormArgs {
        x: p.addr(x),
        out: p.addr(out),
        rows,
        cols,
        weight: p.addr(w),
        bias: p.addr(b),
        eps: LN_EPS,
    };
    p.push(label, Op::LayerNorm(op));
}

/// LayerNorm into a new activation.
pub fn layer_norm(
    p: &mut Program,
    name: &str,
    x: TensorId,
    rows: usize,
    cols: usize,
    prefix: &str,
) -> TensorId {
    let out = p.activation(name, &[rows, cols]);
    layer_norm_into(p, name, x, out, rows, cols, prefix);
    out
}

/// `out = a + b[i % period]` into a new activation of `a`'s shape.
pub fn add(p: &mut Program, name: &str, a: TensorId, b: TensorId, period: usize) -> TensorId {
    let shape = p.desc(a).shape.clone();
    let n = p.desc(a).numel();
    let out = p.activation(name, &shape);
    let op = AddArgs {
        a: p.addr(a),
        b: p.addr(b),
        out: p.addr(out),
        n,
        period,
    };
    p.push(name, Op::Add(op));
    out
}

/// Copies `n` elements from `x` (at element `offset`) into `out` (a stage output).
pub fn copy(p: &mut Program, label: &str, x: TensorId, offset: usize, out: TensorId, n: usize) {
    let op = ActArgs {
        x: p.at(x, offset),
        out: p.addr(out),
        n,
        scale: 1.0,
        act: Act::None,
    };
    p.push(label, Op::Activation(op));
}

/// Multi-head attention over `batch` sequences. Each of q/k/v is `(batch, n, heads*head_dim)`
/// with rows `*_row` elements apart and sequences `*_batch` apart, starting at a view offset.
pub struct Mha {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
}

/// One operand of [`attention`]: a tensor, an element offset, sequence length, row and batch
/// strides.
#[derive(Clone, Copy, Debug)]
pub struct Seq {
    pub t: TensorId,
    pub offset: usize,
    pub len: usize,
    pub row: usize,
    pub batch: usize,
}

/// Fused attention writing `(batch, nq, heads*head_dim)` contiguous into a new activation.
pub fn attention(p: &mut Program, name: &str, m: &Mha, q: Seq, k: Seq, v: Seq) -> TensorId {
    let width = m.heads * m.head_dim;
    let out = p.activation(name, &[m.batch, q.len, width]);
    let op = AttentionArgs {
        batch: m.batch,
        heads: m.heads,
        nq: q.len,
        nk: k.len,
        head_dim: m.head_dim,
        q: p.at(q.t, q.offset),
        q_row: q.row,
        q_batch: q.batch,
        k: p.at(k.t, k.offset),
        k_row: k.row,
        k_batch: k.batch,
        v: p.at(v.t, v.offset),
        v_row: v.row,
        v_batch: v.batch,
        out: p.addr(out),
        o_row: width,
        o_batch: q.len * width,
        scale: m.scale,
        causal: m.causal,
    };
    p.push(name, Op::Attention(op));
    out
}

/// A contiguous `(batch, len, width)` sequence operand.
pub fn seq(t: TensorId, len: usize, width: usize) -> Seq {
    Seq {
        t,
        offset: 0,
        len,
        row: width,
        batch: len * width,
    }
}
