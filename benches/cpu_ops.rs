//! CPU backend op throughput at the full-size SegVol shapes (spec §8.3): the ViT GEMMs with the
//! epilogues the model uses, fused attention 12 x 2048 x 2048 x 64, the two decoder
//! ConvTranspose3d layers and the joint LayerNorm between them, exact GELU, and one whole ViT
//! block.
//!
//! Criterion's throughput is set to each op's FLOP count, so its `thrpt` line reads directly in
//! GFLOP/s ("Gelem/s"); a table of medians in GFLOP/s follows at the end. Threads: rayon's
//! default (`RAYON_NUM_THREADS`, else one per core).
//!
//! `cargo bench --bench cpu_ops`

use criterion::{Criterion, Throughput};
use segvol::backend::cpu::CpuBackend;
use segvol::backend::{
    Act, AttentionArgs, Backend, Buffer, ConvT3dArgs, GemmArgs, LayerNormJointArgs, Residual,
};
use std::time::{Duration, Instant};

/// Deterministic values in [-0.5, 0.5) (never all zero).
fn filled(be: &CpuBackend, n: usize, seed: u64) -> Buffer {
    let v = segvol::rng::SplitMix64(seed).values(n, -0.5, 0.5);
    let b = be.alloc(n * 4).unwrap();
    unsafe { be.upload(b.addr(), bytemuck::cast_slice(&v)).unwrap() };
    b
}

/// One benchmarked op: name, FLOPs per run, and the run itself.
struct Op {
    group: &'static str,
    name: &'static str,
    flops: f64,
    run: Box<dyn Fn()>,
}

/// Builds every op; the buffers live in the closures.
fn ops() -> Vec<Op> {
    let be = CpuBackend::new();
    let t = 2048;
    let mut ops = Vec::new();

    // ViT linear layers: (name, n, k, bias, activation, residual aliasing C).
    let x = filled(&be, t * 3072, 1);
    let w = filled(&be, 3072 * 768, 2);
    let bias = filled(&be, 3072, 3);
    let out = filled(&be, t * 3072, 4);
    let (xa, wa, ba, oa) = (x.addr(), w.addr(), bias.addr(), out.addr());
    let keep = std::rc::Rc::new((x, w, bias, out));
    for (name, n, k, has_bias, act, res) in [
        ("qkv_2048x2304x768", 2304, 768, false, Act::None, false),
        (
            "out_proj_2048x768x768+bias+res",
            768,
            768,
            true,
            Act::None,
            true,
        ),
        (
            "mlp1_2048x3072x768+bias+gelu",
            3072,
            768,
            true,
            Act::Gelu,
            false,
        ),
        (
            "mlp2_2048x768x3072+bias+res",
            768,
            3072,
            true,
            Act::None,
            true,
        ),
    ] {
        let args = GemmArgs {
            batch: 1,
            m: t,
            n,
            k,
            a: xa,
            lda: k,
            batch_stride_a: 0,
            b: wa,
            ldb: k,
            batch_stride_b: 0,
            b_trans: true,
            c: oa,
            ldc: n,
            batch_stride_c: 0,
            alpha: 1.0,
            bias: has_bias.then_some(ba),
            act,
            residual: res.then_some(Residual {
                addr: oa,
                ld: n,
                batch_stride: 0,
            }),
        };
        let keep = keep.clone();
        ops.push(Op {
            group: "gemm_vit",
            name,
            flops: 2.0 * (t * n * k) as f64,
            run: Box::new(move || {
                let _ = &keep;
                unsafe { CpuBackend::new().gemm(&args).unwrap() }
            }),
        });
    }

    // Attention on a packed QKV buffer, as the ViT calls it.
    let qkv = filled(&be, t * 3 * 768, 5);
    let ao = filled(&be, t * 768, 6);
    let args = AttentionArgs {
        batch: 1,
        heads: 12,
        nq: t,
        nk: t,
        head_dim: 64,
        q: qkv.addr(),
        q_row: 2304,
        q_batch: 0,
        k: qkv.at(768 * 4),
        k_row: 2304,
        k_batch: 0,
        v: qkv.at(1536 * 4),
        v_row: 2304,
        v_batch: 0,
        out: ao.addr(),
        o_row: 768,
        o_batch: 0,
        scale: 0.125,
        causal: false,
    };
    ops.push(Op {
        group: "attention",
        name: "vit_12x2048x2048x64",
        // Two products of 2048 x 2048 x 64 per head.
        flops: 4.0 * 12.0 * (t * t * 64) as f64,
        run: Box::new(move || {
            let _ = (&qkv, &ao);
            unsafe { CpuBackend::new().attention(&args).unwrap() }
        }),
    });

    // Decoder upscaling: ConvT (768 -> 192) on the transformer's image tokens, the joint
    // LayerNorm + GELU over (192, 16, 32, 32), ConvT (192 -> 96) + GELU.
    let n = 192 * 16 * 32 * 32;
    let x0 = filled(&be, t * 768, 7);
    let w0 = filled(&be, 768 * 192 * 8, 8);
    let b0 = filled(&be, 192, 9);
    let y0 = filled(&be, n, 10);
    let lw = filled(&be, n, 11);
    let lb = filled(&be, n, 12);
    let w1 = filled(&be, 192 * 96 * 8, 13);
    let b1 = filled(&be, 96, 14);
    let y1 = filled(&be, 96 * 32 * 64 * 64, 15);
    let c0 = ConvT3dArgs {
        x: x0.addr(),
        out: y0.addr(),
        weight: w0.addr(),
        bias: b0.addr(),
        batch: 1,
        cin: 768,
        cout: 192,
        dims: [8, 16, 16],
        channels_last_input: true,
        act: Act::None,
    };
    let ln = LayerNormJointArgs {
        x: y0.addr(),
        out: y0.addr(),
        batch: 1,
        n,
        weight: lw.addr(),
        bias: lb.addr(),
        eps: 1e-5,
        act: Act::Gelu,
    };
    let c1 = ConvT3dArgs {
        x: y0.addr(),
        out: y1.addr(),
        weight: w1.addr(),
        bias: b1.addr(),
        batch: 1,
        cin: 192,
        cout: 96,
        dims: [16, 32, 32],
        channels_last_input: false,
        act: Act::Gelu,
    };
    let keep = std::rc::Rc::new((x0, w0, b0, y0, lw, lb, w1, b1, y1));
    let k0 = keep.clone();
    ops.push(Op {
        group: "decoder_upscaling",
        name: "convt0_768to192_8x16x16",
        flops: 2.0 * 2048.0 * 768.0 * 1536.0,
        run: Box::new(move || {
            let _ = &k0;
            unsafe { CpuBackend::new().conv_transpose3d_k2s2(&c0).unwrap() }
        }),
    });
    let k1 = keep.clone();
    ops.push(Op {
        group: "decoder_upscaling",
        // Memory bound: counted as one "FLOP" per element.
        name: "layer_norm_joint_gelu_3145728",
        flops: n as f64,
        run: Box::new(move || {
            let _ = &k1;
            unsafe { CpuBackend::new().layer_norm_joint(&ln).unwrap() }
        }),
    });
    ops.push(Op {
        group: "decoder_upscaling",
        name: "convt3_192to96_16x32x32_gelu",
        flops: 2.0 * 16384.0 * 192.0 * 768.0,
        run: Box::new(move || {
            let _ = &keep;
            unsafe { CpuBackend::new().conv_transpose3d_k2s2(&c1).unwrap() }
        }),
    });
    // Exact GELU at the MLP's size, out of place: inputs uniform in [-2.4, 2.4] (standard
    // deviation 1.4), about a third of them on erf's exp branch.
    let gx = filled(&be, t * 3072, 16);
    let go = filled(&be, t * 3072, 17);
    let ga = segvol::backend::ActArgs {
        x: gx.addr(),
        out: go.addr(),
        n: t * 3072,
        scale: 4.8,
        act: Act::Gelu,
    };
    ops.push(Op {
        group: "elementwise",
        // Counted as one "FLOP" per element.
        name: "gelu_6291456",
        flops: (t * 3072) as f64,
        run: Box::new(move || {
            let _ = (&gx, &go);
            unsafe { CpuBackend::new().activation(&ga).unwrap() }
        }),
    });
    ops.push(vit_layer(&be));
    ops
}

/// One whole pre-norm ViT block at full size (spec §1.3): LayerNorm, QKV, attention,
/// out-projection + residual, LayerNorm, MLP with GELU, MLP + residual: 41.9 GFLOP.
fn vit_layer(be: &CpuBackend) -> Op {
    use segvol::backend::LayerNormArgs;
    let t = 2048;
    let x = filled(be, t * 768, 21);
    let h = filled(be, t * 768, 22);
    let qkv = filled(be, t * 2304, 23);
    let att = filled(be, t * 768, 24);
    let mlp = filled(be, t * 3072, 25);
    let wqkv = filled(be, 2304 * 768, 26);
    let wo = filled(be, 768 * 768, 27);
    let w1 = filled(be, 3072 * 768, 28);
    let w2 = filled(be, 768 * 3072, 29);
    // Weights of order 1/sqrt(fan-in) and LayerNorm gains near 1, so that activations stay
    // of order 1 across repeats; the MLP's GELU sees pre-activations of standard deviation
    // about 1.4 (a realistic share of inputs on erf's expensive branch).
    let rescale = |b: &Buffer, n: usize, s: f32, offset: f32| {
        let mut v = vec![0f32; n];
        unsafe {
            be.download(b.addr(), bytemuck::cast_slice_mut(&mut v))
                .unwrap()
        };
        v.iter_mut().for_each(|x| *x = *x * s + offset);
        unsafe { be.upload(b.addr(), bytemuck::cast_slice(&v)).unwrap() };
    };
    let fan = |k: usize| 1.0 / (k as f32).sqrt();
    rescale(&wqkv, 2304 * 768, 2.0 * fan(768), 0.0);
    rescale(&wo, 768 * 768, 2.0 * fan(768), 0.0);
    rescale(&w1, 3072 * 768, 5.0 * fan(768), 0.0);
    rescale(&w2, 768 * 3072, 2.0 * fan(3072), 0.0);
    let bias = filled(be, 3072, 30);
    let lnw = filled(be, 768, 31);
    rescale(&lnw, 768, 0.2, 1.0);
    let lnb = filled(be, 768, 32);
    let lin =
        |a: u64, w: u64, c: u64, n: usize, k: usize, b: Option<u64>, act, res: bool| GemmArgs {
            batch: 1,
            m: t,
            n,
            k,
            a,
            lda: k,
            batch_stride_a: 0,
            b: w,
            ldb: k,
            batch_stride_b: 0,
            b_trans: true,
            c,
            ldc: n,
            batch_stride_c: 0,
            alpha: 1.0,
            bias: b,
            act,
            residual: res.then_some(Residual {
                addr: c,
                ld: n,
                batch_stride: 0,
            }),
        };
    let ln = LayerNormArgs {
        x: x.addr(),
        out: h.addr(),
        rows: t,
        cols: 768,
        weight: lnw.addr(),
        bias: lnb.addr(),
        eps: 1e-5,
    };
    let g_qkv = lin(
        h.addr(),
        wqkv.addr(),
        qkv.addr(),
        2304,
        768,
        None,
        Act::None,
        false,
    );
    let attn = AttentionArgs {
        batch: 1,
        heads: 12,
        nq: t,
        nk: t,
        head_dim: 64,
        q: qkv.addr(),
        q_row: 2304,
        q_batch: 0,
        k: qkv.at(768 * 4),
        k_row: 2304,
        k_batch: 0,
        v: qkv.at(1536 * 4),
        v_row: 2304,
        v_batch: 0,
        out: att.addr(),
        o_row: 768,
        o_batch: 0,
        scale: 0.125,
        causal: false,
    };
    let g_o = lin(
        att.addr(),
        wo.addr(),
        x.addr(),
        768,
        768,
        Some(bias.addr()),
        Act::None,
        true,
    );
    let g_1 = lin(
        h.addr(),
        w1.addr(),
        mlp.addr(),
        3072,
        768,
        Some(bias.addr()),
        Act::Gelu,
        false,
    );
    let g_2 = lin(
        mlp.addr(),
        w2.addr(),
        x.addr(),
        768,
        3072,
        Some(bias.addr()),
        Act::None,
        true,
    );
    let keep = (x, h, qkv, att, mlp, wqkv, wo, w1, w2, bias, lnw, lnb);
    Op {
        group: "vit",
        name: "block_2048x768_12heads_mlp3072",
        flops: 41.9e9,
        run: Box::new(move || {
            let _ = &keep;
            let be = CpuBackend::new();
            unsafe {
                be.layer_norm(&ln).unwrap();
                be.gemm(&g_qkv).unwrap();
                be.attention(&attn).unwrap();
                be.gemm(&g_o).unwrap();
                be.layer_norm(&ln).unwrap();
                be.gemm(&g_1).unwrap();
                be.gemm(&g_2).unwrap();
            }
        }),
    }
}

fn main() {
    let ops = ops();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    for op in &ops {
        let mut g = c.benchmark_group(op.group);
        g.throughput(Throughput::Elements(op.flops as u64));
        g.bench_function(op.name, |b| b.iter(|| (op.run)()));
        g.finish();
    }
    c.final_summary();

    // Medians of 11 timed runs, in GFLOP/s.
    println!(
        "\nthreads: {}\n{:<50} {:>10} {:>10}",
        rayon::current_num_threads(),
        "op",
        "median ms",
        "GFLOP/s"
    );
    for op in &ops {
        (op.run)();
        let mut t: Vec<f64> = (0..11)
            .map(|_| {
                let s = Instant::now();
                (op.run)();
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        println!(
            "{:<50} {:>10.2} {:>10.1}",
            format!("{}/{}", op.group, op.name),
            med * 1e3,
            op.flops / med / 1e9
        );
    }
}
