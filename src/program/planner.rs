//! The memory planner: each activation's first and last use, then a packing of all activations
//! into one arena, greedy by size with best fit (DESIGN.md, "Program and memory plan").
//! Two tensors share bytes only if their lifetimes do not overlap.

use super::{split_vaddr, Program, TensorKind};
use crate::error::{Error, Result};

/// Arena alignment of every activation (matches `cudaMalloc` and the host allocators).
pub const ALIGN: usize = 256;

/// The memory plan of one program.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Byte offset in the arena of each activation (`None` for weights and externals).
    pub offsets: Vec<Option<usize>>,
    /// First and last step that use each tensor (`None` if unused).
    pub lifetimes: Vec<Option<(usize, usize)>>,
    /// Arena size in bytes.
    pub arena_bytes: usize,
}

impl Plan {
    /// The sum of all activation sizes: what the arena would need without reuse.
    pub fn unshared_bytes(&self, program: &Program) -> usize {
        program
            .tensors
            .iter()
            .zip(&self.offsets)
            .filter(|(_, o)| o.is_some())
            .map(|(t, _)| align(t.bytes()))
            .sum()
    }
}

pub(crate) fn align(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// Plans `program`: lifetimes, then arena offsets.
pub fn plan(program: &Program) -> Result<Plan> {
    let n = program.tensors.len();
    let mut lifetimes: Vec<Option<(usize, usize)>> = vec![None; n];
    for (i, step) in program.steps.iter().enumerate() {
        let mut op = step.op;
        let mut bad = None;
        op.for_each_addr(|a| match split_vaddr(*a) {
            Some((t, _)) if (t.0 as usize) < n => {
                let l = &mut lifetimes[t.0 as usize];
                *l = Some(match *l {
                    None => (i, i),
                    Some((f, _)) => (f, i),
                });
            }
            _ => bad = Some(*a),
        });
        if let Some(a) = bad {
            return Err(Error::Internal(format!(
                "program {}: step {} ({}) holds address {a:#x}, not a tensor of the program",
                program.name, i, step.label
            )));
        }
    }

    let items: Vec<(usize, usize, usize, usize)> = (0..n)
        .filter(|&i| program.tensors[i].kind == TensorKind::Activation)
        .filter_map(|i| lifetimes[i].map(|(f, l)| (i, program.tensors[i].bytes().max(1), f, l)))
        .collect();
    let (placed, arena) = pack(
        &items
            .iter()
            .map(|&(_, b, f, l)| (b, f, l))
            .collect::<Vec<_>>(),
    );
    let mut offsets = vec![None; n];
    for (&(i, ..), off) in items.iter().zip(placed) {
        offsets[i] = Some(off);
    }
    Ok(Plan {
        offsets,
        lifetimes,
        arena_bytes: arena,
    })
}

/// Packs buffers given as `(bytes, first_use, last_use)` into one region: greedy by size,
/// best fit. Buffers whose lifetimes overlap never share bytes. Returns each buffer's offset
/// (aligned to [`ALIGN`]) and the region's size.
pub fn pack(items: &[(usize, usize, usize)]) -> (Vec<usize>, usize) {
    // Largest first, each in the smallest gap left by the already placed buffers whose
    // lifetimes overlap it.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].0.cmp(&items[a].0).then(a.cmp(&b)));
    let mut offsets = vec![0; items.len()];
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // offset, size, first, last
    let mut total = 0usize;
    for i in order {
        let (bytes, first, last) = items[i];
        let size = align(bytes);
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|p| p.2 <= last && first <= p.3)
            .map(|p| (p.0, p.0 + p.1))
            .collect();
        busy.sort_unstable();
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = 0usize;
        for (start, end) in busy {
            if start >= cursor + size {
                let gap = start - cursor;
                if best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(end);
        }
        let offset = best.map(|(_, o)| o).unwrap_or(cursor);
        offsets[i] = offset;
        placed.push((offset, size, first, last));
        total = total.max(offset + size);
    }
    (offsets, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Act, ActArgs};
    use crate::dtype::DType;
    use crate::program::Op;

    fn copy(p: &mut Program, x: super::super::TensorId, y: super::super::TensorId, n: usize) {
        let (x, y) = (p.addr(x), p.addr(y));
        p.push(
            "copy",
            Op::Activation(ActArgs {
                x,
                out: y,
                n,
                scale: 1.0,
                act: Act::None,
            }),
        );
    }

    #[test]
    fn chain_reuses_memory_and_never_overlaps_live_tensors() {
        let mut p = Program::new("t", DType::F32);
        let input = p.external("in", &[1000], DType::F32);
        let mut prev = input;
        let mut ts = Vec::new();
        for i in 0..6 {
            let t = p.activation(format!("a{i}"), &[1000 * (i % 3 + 1)]);
            copy(&mut p, prev, t, 1000);
            ts.push(t);
            prev = t;
        }
        let out = p.external("out", &[1000], DType::F32);
        copy(&mut p, prev, out, 1000);
        let plan = plan(&p).unwrap();
        // Lower bound: the most bytes alive at any one step; reuse must beat no reuse.
        let live_max = (0..p.steps.len())
            .map(|s| {
                ts.iter()
                    .filter(|t| {
                        let (f, l) = plan.lifetimes[t.0 as usize].unwrap();
                        f <= s && s <= l
                    })
                    .map(|t| align(p.desc(*t).bytes()))
                    .sum::<usize>()
            })
            .max()
            .unwrap();
        assert!(plan.arena_bytes >= live_max);
        assert!(plan.arena_bytes < plan.unshared_bytes(&p));
        for (i, &a) in ts.iter().enumerate() {
            for &b in &ts[i + 1..] {
                let (la, lb) = (
                    plan.lifetimes[a.0 as usize].unwrap(),
                    plan.lifetimes[b.0 as usize].unwrap(),
                );
                if la.0 <= lb.1 && lb.0 <= la.1 {
                    let (oa, ob) = (
                        plan.offsets[a.0 as usize].unwrap(),
                        plan.offsets[b.0 as usize].unwrap(),
                    );
                    let (sa, sb) = (p.desc(a).bytes(), p.desc(b).bytes());
                    assert!(oa + sa <= ob || ob + sb <= oa, "live tensors overlap");
                }
            }
        }
        assert_eq!(plan.offsets[input.0 as usize], None);
    }

    #[test]
    fn real_addresses_are_rejected() {
        let mut p = Program::new("t", DType::F32);
        let t = p.activation("a", &[4]);
        let a = p.addr(t);
        p.push(
            "bad",
            Op::Activation(ActArgs {
                x: 0x1000,
                out: a,
                n: 4,
                scale: 1.0,
                act: Act::None,
            }),
        );
        assert!(plan(&p).is_err());
    }
}
