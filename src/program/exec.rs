//! Running a planned program: bind every virtual address to a real one (weights region, arena,
//! caller buffers), check that every operand stays inside its tensor, then hand the ops to the
//! backend in order.

use super::planner::Plan;
use super::{split_vaddr, Op, Program, TensorKind};
use crate::backend::{Addr, Backend};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::time::{Duration, Instant};

/// Resolves weight keys to device addresses.
pub trait WeightTable {
    /// The address of the weight `key` in the backend's weights region.
    fn weight_addr(&self, key: &str) -> Option<Addr>;
}

/// A program with every address bound: ready to run as often as wanted while the bound
/// buffers live.
#[derive(Clone, Debug)]
pub struct Bound {
    pub ops: Vec<Op>,
    pub labels: Vec<String>,
}

/// Binds `program`'s virtual addresses. `arena` must hold `plan.arena_bytes`; `externals`
/// gives the address of every external tensor the program uses.
pub fn bind(
    program: &Program,
    plan: &Plan,
    arena: Addr,
    weights: &dyn WeightTable,
    externals: &[(super::TensorId, Addr)],
) -> Result<Bound> {
    let mut base: Vec<Option<Addr>> = vec![None; program.tensors.len()];
    for (i, t) in program.tensors.iter().enumerate() {
        base[i] = match &t.kind {
            TensorKind::Activation => plan.offsets[i].map(|o| arena + o as u64),
            TensorKind::Weight(key) => weights.weight_addr(key),
            TensorKind::External => externals
                .iter()
                .find(|(id, _)| id.0 as usize == i)
                .map(|&(_, a)| a),
        };
    }
    let mut ops = Vec::with_capacity(program.steps.len());
    let mut labels = Vec::with_capacity(program.steps.len());
    for (i, step) in program.steps.iter().enumerate() {
        check_spans(program, i, &step.op)?;
        let mut op = step.op;
        let mut missing = None;
        op.for_each_addr(|a| {
            let (t, off) = split_vaddr(*a).expect("checked by check_spans");
            match base[t.0 as usize] {
                Some(b) => *a = b + off as u64,
                None => missing = Some(t),
            }
        });
        if let Some(t) = missing {
            let d = program.desc(t);
            return Err(Error::Internal(format!(
                "program {}: tensor `{}` ({:?}) is not bound",
                program.name, d.name, d.kind
            )));
        }
        ops.push(op);
        labels.push(step.label.clone());
    }
    Ok(Bound { ops, labels })
}

/// Runs bound ops in order.
///
/// # Safety
/// The buffers the program was bound to must still be alive and belong to `backend`.
pub unsafe fn run(backend: &dyn Backend, bound: &Bound) -> Result<()> {
    for op in &bound.ops {
        dispatch(backend, op)?;
    }
    Ok(())
}

/// Runs bound ops, synchronising after each and returning its wall time (for `segvol bench`).
///
/// # Safety
/// As for [`run`].
pub unsafe fn run_timed(backend: &dyn Backend, bound: &Bound) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(bound.ops.len());
    for op in &bound.ops {
        let t0 = Instant::now();
        dispatch(backend, op)?;
        backend.synchronize()?;
        times.push(t0.elapsed());
    }
    Ok(times)
}

/// Hands one op to the backend.
///
/// # Safety
/// Every address of `op` must be valid for the backend as the op's documentation requires.
pub unsafe fn dispatch(backend: &dyn Backend, op: &Op) -> Result<()> {
    match op {
        Op::Gemm(a) => backend.gemm(a),
        Op::Attention(a) => backend.attention(a),
        Op::LayerNorm(a) => backend.layer_norm(a),
        Op::LayerNormJoint(a) => backend.layer_norm_joint(a),
        Op::ConvTranspose3d(a) => backend.conv_transpose3d_k2s2(a),
        Op::Interp3d(a) => backend.interp3d(a),
        Op::PatchGather3d(a) => backend.patch_gather3d(a),
        Op::Add(a) => backend.add(a),
        Op::Activation(a) => backend.activation(a),
        Op::Embed(a) => backend.embed_gather(a),
    }
}

/// Each operand of an op: its (virtual) address, how many elements it spans from there, and
/// the dtype it must have (`None`: the program's storage dtype).
fn operand_spans(op: &Op) -> Vec<(Addr, usize, Option<DType>, &'static str)> {
    fn span(batch: usize, bs: usize, rows: usize, ld: usize, cols: usize) -> usize {
        if batch == 0 || rows == 0 || cols == 0 {
            0
        } else {
            (batch - 1) * bs + (rows - 1) * ld + cols
        }
    }
    match op {
        Op::Gemm(g) => {
            let b_span = if g.b_trans {
                span(g.batch, g.batch_stride_b, g.n, g.ldb, g.k)
            } else {
                span(g.batch, g.batch_stride_b, g.k, g.ldb, g.n)
            };
            let mut v = vec![
                (
                    g.a,
                    span(g.batch, g.batch_stride_a, g.m, g.lda, g.k),
                    None,
                    "a",
                ),
                (g.b, b_span, None, "b"),
                (
                    g.c,
                    span(g.batch, g.batch_stride_c, g.m, g.ldc, g.n),
                    None,
                    "c",
                ),
            ];
            if let Some(b) = g.bias {
                v.push((b, g.n, None, "bias"));
            }
            if let Some(r) = g.residual {
                v.push((
                    r.addr,
                    span(g.batch, r.batch_stride, g.m, r.ld, g.n),
                    None,
                    "residual",
                ));
            }
            v
        }
        Op::Attention(a) => {
            let w = a.heads * a.head_dim;
            vec![
                (a.q, span(a.batch, a.q_batch, a.nq, a.q_row, w), None, "q"),
                (a.k, span(a.batch, a.k_batch, a.nk, a.k_row, w), None, "k"),
                (a.v, span(a.batch, a.v_batch, a.nk, a.v_row, w), None, "v"),
                (
                    a.out,
                    span(a.batch, a.o_batch, a.nq, a.o_row, w),
                    None,
                    "out",
                ),
            ]
        }
        Op::LayerNorm(a) => vec![
            (a.x, a.rows * a.cols, None, "x"),
            (a.out, a.rows * a.cols, None, "out"),
            (a.weight, a.cols, None, "weight"),
            (a.bias, a.cols, None, "bias"),
        ],
        Op::LayerNormJoint(a) => vec![
            (a.x, a.batch * a.n, None, "x"),
            (a.out, a.batch * a.n, None, "out"),
            (a.weight, a.n, None, "weight"),
            (a.bias, a.n, None, "bias"),
        ],
        Op::ConvTranspose3d(a) => {
            let vox: usize = a.dims.iter().product();
            vec![
                (a.x, a.batch * a.cin * vox, None, "x"),
                (a.out, a.batch * a.cout * vox * 8, None, "out"),
                (a.weight, a.cin * a.cout * 8, None, "weight"),
                (a.bias, a.cout, None, "bias"),
            ]
        }
        Op::Interp3d(a) => vec![
            (
                a.x,
                a.planes * a.src.iter().product::<usize>(),
                Some(a.x_dtype),
                "x",
            ),
            (
                a.out,
                a.planes * a.dst.iter().product::<usize>(),
                Some(a.out_dtype),
                "out",
            ),
        ],
        Op::PatchGather3d(a) => {
            let vox: usize = a.dims.iter().product();
            vec![
                (a.x, a.batch * vox, Some(a.x_dtype), "x"),
                (a.out, a.batch * vox, None, "out"),
            ]
        }
        Op::Add(a) => vec![
            (a.a, a.n, None, "a"),
            (a.b, a.period, None, "b"),
            (a.out, a.n, None, "out"),
        ],
        Op::Activation(a) => vec![(a.x, a.n, None, "x"), (a.out, a.n, None, "out")],
        Op::Embed(a) => vec![
            (a.ids, a.rows, Some(DType::I32), "ids"),
            (a.table, a.vocab * a.cols, None, "table"),
            (a.pos, a.rows * a.cols, None, "pos"),
            (a.out, a.rows * a.cols, None, "out"),
        ],
    }
}

/// Checks that every operand of step `i` is a tensor of the program, of the right dtype, and
/// that the elements the op touches stay inside that tensor. The backends receive raw
/// addresses; this is what makes that safe.
fn check_spans(program: &Program, i: usize, op: &Op) -> Result<()> {
    for (addr, elems, want, what) in operand_spans(op) {
        let fail = |msg: String| {
            Error::Internal(format!(
                "program {}: step {i} ({}, {}): operand `{what}`: {msg}",
                program.name,
                program.steps[i].label,
                op.kind()
            ))
        };
        let (t, off) =
            split_vaddr(addr).ok_or_else(|| fail(format!("{addr:#x} is not a program tensor")))?;
        let d = program
            .tensors
            .get(t.0 as usize)
            .ok_or_else(|| fail(format!("no tensor {}", t.0)))?;
        let want = want.unwrap_or(program.dtype());
        if d.dtype != want {
            return Err(fail(format!(
                "tensor `{}` is {} but the op reads {}",
                d.name, d.dtype, want
            )));
        }
        if off % d.dtype.size() != 0 || off + elems * d.dtype.size() > d.bytes() {
            return Err(fail(format!(
                "elements {}..{} lie outside tensor `{}` of {} elements",
                off / d.dtype.size(),
                off / d.dtype.size() + elems,
                d.name,
                d.numel()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Act, GemmArgs};

    #[test]
    fn out_of_bounds_views_are_caught() {
        let mut p = Program::new("t", DType::F32);
        let x = p.activation("x", &[4, 8]);
        let w = p.weight("w", &[8, 8]);
        let y = p.activation("y", &[4, 8]);
        let (xa, wa, ya) = (p.addr(x), p.addr(w), p.at(y, 1));
        p.push(
            "linear",
            Op::Gemm(GemmArgs {
                batch: 1,
                m: 4,
                n: 8,
                k: 8,
                a: xa,
                lda: 8,
                batch_stride_a: 0,
                b: wa,
                ldb: 8,
                batch_stride_b: 0,
                b_trans: true,
                c: ya,
                ldc: 8,
                batch_stride_c: 0,
                alpha: 1.0,
                bias: None,
                act: Act::None,
                residual: None,
            }),
        );
        let err = check_spans(&p, 0, &p.steps[0].op).unwrap_err().to_string();
        assert!(
            err.contains("operand `c`") && err.contains("outside tensor `y`"),
            "{err}"
        );
    }
}
