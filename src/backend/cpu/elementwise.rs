//! Glue ops (DESIGN.md "elementwise", spec §1.2, §3): broadcast add, scale + activation, token
//! embedding gather and the 3-D patch gather of the ViT input.

use super::{bad_args, check_addr, math, overlaps, slice, slice_mut, volume_of};
use crate::backend::{ActArgs, AddArgs, EmbedArgs, PatchGatherArgs};
use crate::error::Result;
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

#[inline(always)]
fn add_into_body(out: &mut [f32], b: &[f32]) {
    for (o, &y) in out.iter_mut().zip(b) {
        *o += y;
    }
}

math::multiversion! {
    fn add_into(out: &mut [f32], b: &[f32]) => add_into_body;
}

#[inline(always)]
fn add3_body(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

math::multiversion! {
    fn add3(a: &[f32], b: &[f32], out: &mut [f32]) => add3_body;
}

/// Splits `[start, start + len)` at multiples of `period` and calls `f(offset, b_start, n)`
/// for each piece (`offset` relative to `start`).
fn periodic_pieces(
    start: usize,
    len: usize,
    period: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let mut i = 0;
    while i < len {
        let bi = (start + i) % period;
        let n = (period - bi).min(len - i);
        f(i, bi, n);
        i += n;
    }
}

/// `out[i] = a[i] + b[i % period]` ([`AddArgs`]); `out` may equal `a`.
///
/// # Safety
/// `a`, `out` (n) and `b` (period) must be live f32 memory; `out` equals `a` or does not
/// overlap it.
pub unsafe fn add_f32(a: &AddArgs) -> Result<()> {
    let op = "add";
    let n = a.n;
    if n == 0 {
        return Ok(());
    }
    if a.period == 0 {
        return Err(bad_args(op, "period is 0"));
    }
    let p = a.period.min(n);
    check_addr::<f32>(op, "a", a.a, n)?;
    check_addr::<f32>(op, "b", a.b, p)?;
    check_addr::<f32>(op, "out", a.out, n)?;
    let in_place = a.out == a.a;
    if !in_place && overlaps(a.out, n * 4, a.a, n * 4) {
        return Err(bad_args(op, "out partially overlaps a"));
    }
    // `b` overlapping `out` (x + x in place): read b from a copy.
    let b_copy: Vec<f32>;
    // SAFETY: b is read-only; if it overlaps out, a private copy is read instead.
    let b: &[f32] = if overlaps(a.out, n * 4, a.b, p * 4) {
        b_copy = unsafe { slice::<f32>(a.b, p) }.to_vec();
        &b_copy
    } else {
        unsafe { slice::<f32>(a.b, p) }
    };
    let period = a.period;
    if in_place {
        // SAFETY: exclusive access to out == a.
        let out = unsafe { slice_mut::<f32>(a.out, n) };
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            periodic_pieces(c * CHUNK, o.len(), period, |i, bi, k| {
                add_into(&mut o[i..i + k], &b[bi..bi + k])
            });
        });
    } else {
        // SAFETY: out does not overlap a (checked).
        let (x, out) = unsafe { (slice::<f32>(a.a, n), slice_mut::<f32>(a.out, n)) };
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (o, xa))| {
                periodic_pieces(c * CHUNK, o.len(), period, |i, bi, k| {
                    add3(&xa[i..i + k], &b[bi..bi + k], &mut o[i..i + k])
                });
            });
    }
    Ok(())
}

/// `out[i] = act(x[i] * scale)` ([`ActArgs`]); `out` may equal `x`.
///
/// # Safety
/// `x` and `out` (n) must be live f32 memory, equal or disjoint.
pub unsafe fn activation_f32(a: &ActArgs) -> Result<()> {
    let op = "activation";
    let n = a.n;
    if n == 0 {
        return Ok(());
    }
    check_addr::<f32>(op, "x", a.x, n)?;
    check_addr::<f32>(op, "out", a.out, n)?;
    let (scale, act) = (a.scale, a.act);
    if a.x == a.out {
        // SAFETY: exclusive access.
        let x = unsafe { slice_mut::<f32>(a.x, n) };
        x.par_chunks_mut(CHUNK)
            .for_each(|c| math::scale_act_slice(c, scale, act));
    } else {
        if overlaps(a.x, n * 4, a.out, n * 4) {
            return Err(bad_args(op, "out partially overlaps x"));
        }
        // SAFETY: disjoint (checked).
        let (x, out) = unsafe { (slice::<f32>(a.x, n), slice_mut::<f32>(a.out, n)) };
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, c)| math::scale_act_copy(c, o, scale, act));
    }
    Ok(())
}

/// `out[r] = table[ids[r]] + pos[r]` ([`EmbedArgs`]); an id outside `[0, vocab)` is an error.
///
/// # Safety
/// `ids` (rows i32), `table` (vocab x cols), `pos` and `out` (rows x cols) must be live memory;
/// `out` must not overlap the inputs.
pub unsafe fn embed_gather_f32(a: &EmbedArgs) -> Result<()> {
    let op = "embed_gather";
    if a.rows == 0 || a.cols == 0 {
        return Ok(());
    }
    let n = volume_of(op, &[a.rows, a.cols])?;
    let tn = volume_of(op, &[a.vocab, a.cols])?;
    check_addr::<i32>(op, "ids", a.ids, a.rows)?;
    check_addr::<f32>(op, "table", a.table, tn)?;
    check_addr::<f32>(op, "pos", a.pos, n)?;
    check_addr::<f32>(op, "out", a.out, n)?;
    if overlaps(a.out, n * 4, a.table, tn * 4) || overlaps(a.out, n * 4, a.pos, n * 4) {
        return Err(bad_args(op, "out overlaps table or pos"));
    }
    // SAFETY: read-only inputs, out disjoint (checked).
    let (ids, table, pos, out) = unsafe {
        (
            slice::<i32>(a.ids, a.rows),
            slice::<f32>(a.table, tn),
            slice::<f32>(a.pos, n),
            slice_mut::<f32>(a.out, n),
        )
    };
    if let Some((r, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= a.vocab)
    {
        return Err(bad_args(
            op,
            format!(
                "token id {id} at row {r} is outside the vocabulary (size {})",
                a.vocab
            ),
        ));
    }
    let cols = a.cols;
    out.par_chunks_mut(cols)
        .zip(pos.par_chunks(cols))
        .zip(ids.par_iter())
        .for_each(|((o, p), &id)| {
            let id = id as usize;
            add3(&table[id * cols..(id + 1) * cols], p, o)
        });
    Ok(())
}

/// Gathers (pd, ph, pw) patches of `(B, 1, D, H, W)` into rows `(B, N, pd*ph*pw)`
/// ([`PatchGatherArgs`], spec §1.2).
///
/// # Safety
/// `x` (batch x D x H x W) and `out` (same count) must be live, disjoint f32 memory.
pub unsafe fn patch_gather3d_f32(a: &PatchGatherArgs) -> Result<()> {
    let op = "patch_gather3d";
    let [d, h, w] = a.dims;
    let [pd, ph, pw] = a.patch;
    if pd == 0 || ph == 0 || pw == 0 || d % pd != 0 || h % ph != 0 || w % pw != 0 {
        return Err(bad_args(
            op,
            format!(
                "volume {:?} is not a whole number of patches {:?}",
                a.dims, a.patch
            ),
        ));
    }
    let vox = volume_of(op, &a.dims)?;
    let total = volume_of(op, &[a.batch, vox])?;
    if total == 0 {
        return Ok(());
    }
    check_addr::<f32>(op, "x", a.x, total)?;
    check_addr::<f32>(op, "out", a.out, total)?;
    if overlaps(a.x, total * 4, a.out, total * 4) {
        return Err(bad_args(op, "out overlaps x"));
    }
    let (gh, gw) = (h / ph, w / pw);
    let feat = pd * ph * pw;
    // SAFETY: disjoint (checked).
    let (x, out) = unsafe { (slice::<f32>(a.x, total), slice_mut::<f32>(a.out, total)) };
    let tokens = total / feat;
    let per_sample = vox / feat;
    out.par_chunks_mut(feat)
        .with_min_len(16)
        .enumerate()
        .for_each(|(t, row)| {
            debug_assert!(t < tokens);
            let (b, tok) = (t / per_sample, t % per_sample);
            let (i, j, k) = (tok / (gh * gw), (tok / gw) % gh, tok % gw);
            let xs = &x[b * vox..(b + 1) * vox];
            for za in 0..pd {
                for yb in 0..ph {
                    let src = ((i * pd + za) * h + j * ph + yb) * w + k * pw;
                    let dst = (za * ph + yb) * pw;
                    row[dst..dst + pw].copy_from_slice(&xs[src..src + pw]);
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::CpuBackend;
    use super::*;
    use crate::backend::{Act, Backend};
    use crate::dtype::DType;

    #[test]
    fn add_broadcasts_and_aliases() {
        let be = CpuBackend::new();
        let mut rng = Rng(3);
        for (n, period) in [
            (1, 1),
            (13, 13),
            (7 * 5, 5),
            (3 * CHUNK + 17, 768),
            (2 * CHUNK + 9, CHUNK + 5),
        ] {
            let x = rng.vec(n);
            let b = rng.vec(period);
            let want: Vec<f64> = (0..n).map(|i| x[i] as f64 + b[i % period] as f64).collect();
            for in_place in [false, true] {
                let (xb, bb) = (buf(&be, &x), buf(&be, &b));
                let ob = be.alloc(n * 4).unwrap();
                let out = if in_place { xb.addr() } else { ob.addr() };
                let args = AddArgs {
                    a: xb.addr(),
                    b: bb.addr(),
                    out,
                    n,
                    period,
                };
                unsafe { be.add(&args).unwrap() };
                // f32 addition of two f32s is exact to half an ulp of the result.
                assert_close(
                    &read(&be, out, n),
                    &want,
                    1.2e-7,
                    &format!("add n{n} p{period}"),
                );
            }
        }
        // x += x (b aliases out).
        let x = rng.vec(100);
        let xb = buf(&be, &x);
        let args = AddArgs {
            a: xb.addr(),
            b: xb.addr(),
            out: xb.addr(),
            n: 100,
            period: 100,
        };
        unsafe { be.add(&args).unwrap() };
        assert_eq!(
            read(&be, xb.addr(), 100),
            x.iter().map(|v| v + v).collect::<Vec<_>>()
        );
        let args = AddArgs {
            a: xb.addr(),
            b: xb.addr(),
            out: xb.addr(),
            n: 100,
            period: 0,
        };
        assert!(unsafe { be.add(&args) }.is_err());
    }

    #[test]
    fn activation_in_and_out_of_place() {
        let be = CpuBackend::new();
        let mut rng = Rng(4);
        let n = CHUNK + 37;
        let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 6.0).collect();
        for act in [Act::None, Act::Gelu, Act::Relu, Act::QuickGelu] {
            for in_place in [false, true] {
                let xb = buf(&be, &x);
                let ob = be.alloc(n * 4).unwrap();
                let out = if in_place { xb.addr() } else { ob.addr() };
                let args = ActArgs {
                    x: xb.addr(),
                    out,
                    n,
                    scale: 0.7,
                    act,
                };
                unsafe { be.activation(&args).unwrap() };
                let got = read(&be, out, n);
                for (g, &v) in got.iter().zip(&x) {
                    assert_eq!(
                        g.to_bits(),
                        super::math::act(v * 0.7, act).to_bits(),
                        "{act:?}({v} * 0.7)"
                    );
                }
            }
        }
    }

    #[test]
    fn embed_gather_and_bad_ids() {
        let be = CpuBackend::new();
        let mut rng = Rng(5);
        let (vocab, cols, rows) = (11, 7, 5);
        let table = rng.vec(vocab * cols);
        let pos = rng.vec(rows * cols);
        let ids: Vec<i32> = vec![3, 0, 10, 3, 7];
        let (tb, pb) = (buf(&be, &table), buf(&be, &pos));
        let ib = be.alloc(rows * 4).unwrap();
        unsafe { be.upload(ib.addr(), bytemuck::cast_slice(&ids)).unwrap() };
        let ob = be.alloc(rows * cols * 4).unwrap();
        let mut args = EmbedArgs {
            ids: ib.addr(),
            table: tb.addr(),
            vocab,
            pos: pb.addr(),
            out: ob.addr(),
            rows,
            cols,
        };
        unsafe { be.embed_gather(&args).unwrap() };
        let got = read(&be, ob.addr(), rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let want = table[ids[r] as usize * cols + c] + pos[r * cols + c];
                assert_eq!(got[r * cols + c], want);
            }
        }
        args.vocab = 10;
        let e = unsafe { be.embed_gather(&args) }.unwrap_err().to_string();
        assert!(e.contains("token id 10 at row 2"), "{e}");
        let bad: Vec<i32> = vec![1, -1, 0, 0, 0];
        unsafe { be.upload(ib.addr(), bytemuck::cast_slice(&bad)).unwrap() };
        args.vocab = 11;
        assert!(unsafe { be.embed_gather(&args) }.is_err());
    }

    #[test]
    fn patch_gather_token_and_feature_order() {
        let be = CpuBackend::new();
        let (b, dims, patch) = (2, [4, 6, 8], [2, 3, 4]);
        let vox = 4 * 6 * 8;
        let x: Vec<f32> = (0..b * vox).map(|i| i as f32 + 0.5).collect();
        let xb = buf(&be, &x);
        let ob = be.alloc(b * vox * 4).unwrap();
        let args = PatchGatherArgs {
            x: xb.addr(),
            x_dtype: DType::F32,
            out: ob.addr(),
            batch: b,
            dims,
            patch,
        };
        unsafe { be.patch_gather3d(&args).unwrap() };
        let got = read(&be, ob.addr(), b * vox);
        let (gd, gh, gw) = (2, 2, 2);
        let feat = 24;
        for s in 0..b {
            for i in 0..gd {
                for j in 0..gh {
                    for k in 0..gw {
                        let t = i * gh * gw + j * gw + k;
                        for za in 0..2 {
                            for yb in 0..3 {
                                for c in 0..4 {
                                    let f = za * 12 + yb * 4 + c;
                                    let src =
                                        s * vox + ((i * 2 + za) * 6 + j * 3 + yb) * 8 + k * 4 + c;
                                    assert_eq!(got[(s * 8 + t) * feat + f], x[src]);
                                }
                            }
                        }
                    }
                }
            }
        }
        let bad = PatchGatherArgs {
            patch: [3, 3, 4],
            ..args
        };
        assert!(unsafe { be.patch_gather3d(&bad) }.is_err());
    }
}
