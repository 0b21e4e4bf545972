//! CPU backend op throughput at the full-size SegVol shapes (spec §8.3): the ViT GEMMs with the
//! epilogues the model uses, fused attention 12 x 2048 x 2048 x 64, and the two decoder
//! ConvTranspose3d layers. Criterion's throughput is set to the op's FLOP count, so its
//! `thrpt` line reads directly in GFLOP/s ("Gelem/s"). Threads: rayon's default
//! (`RAYON_NUM_THREADS`, else one per core).
//!
//! `cargo bench --bench cpu_ops`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segvol::backend::cpu::CpuBackend;
use segvol::backend::{
    Act, AttentionArgs, Backend, Buffer, ConvT3dArgs, GemmArgs, LayerNormJointArgs, Residual,
};
use std::time::Duration;

/// Deterministic values in [-0.5, 0.5) (never all zero).
fn filled(be: &CpuBackend, n: usize, seed: u64) -> Buffer {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let b = be.alloc(n * 4).unwrap();
    unsafe { be.upload(b.addr(), bytemuck::cast_slice(&v)).unwrap() };
    b
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    g
}

fn gemm_vit(c: &mut Criterion) {
    let be = CpuBackend::new();
    let t = 2048;
    let x = filled(&be, t * 3072, 1);
    let wq = filled(&be, 3072 * 768, 2);
    let bias = filled(&be, 3072, 3);
    let out = filled(&be, t * 3072, 4);
    let mut g = group(c, "gemm_vit");
    // (name, n, k, bias, act, residual aliasing C)
    let cases = [
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
    ];
    for (name, n, k, has_bias, act, res) in cases {
        let args = GemmArgs {
            batch: 1,
            m: t,
            n,
            k,
            a: x.addr(),
            lda: k,
            batch_stride_a: 0,
            b: wq.addr(),
            ldb: k,
            batch_stride_b: 0,
            b_trans: true,
            c: out.addr(),
            ldc: n,
            batch_stride_c: 0,
            alpha: 1.0,
            bias: has_bias.then(|| bias.addr()),
            act,
            residual: res.then(|| Residual {
                addr: out.addr(),
                ld: n,
                batch_stride: 0,
            }),
        };
        g.throughput(Throughput::Elements((2 * t * n * k) as u64));
        g.bench_function(name, |bch| bch.iter(|| unsafe { be.gemm(&args).unwrap() }));
    }
    g.finish();
}

fn attention_vit(c: &mut Criterion) {
    let be = CpuBackend::new();
    let (t, heads, hd) = (2048, 12, 64);
    let qkv = filled(&be, t * 3 * 768, 5);
    let out = filled(&be, t * 768, 6);
    let args = AttentionArgs {
        batch: 1,
        heads,
        nq: t,
        nk: t,
        head_dim: hd,
        q: qkv.addr(),
        q_row: 2304,
        q_batch: 0,
        k: qkv.at(768 * 4),
        k_row: 2304,
        k_batch: 0,
        v: qkv.at(1536 * 4),
        v_row: 2304,
        v_batch: 0,
        out: out.addr(),
        o_row: 768,
        o_batch: 0,
        scale: 0.125,
        causal: false,
    };
    let mut g = group(c, "attention");
    // Two GEMMs of 2048 x 2048 x 64 per head.
    g.throughput(Throughput::Elements((2 * 2 * heads * t * t * hd) as u64));
    g.bench_function("vit_12x2048x2048x64", |b| {
        b.iter(|| unsafe { be.attention(&args).unwrap() })
    });
    g.finish();
}

fn decoder_upscaling(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut g = group(c, "decoder_upscaling");
    // ConvT 0: the two-way transformer's image tokens (1, 2048, 768) -> (1, 192, 16, 32, 32).
    let x0 = filled(&be, 2048 * 768, 7);
    let w0 = filled(&be, 768 * 192 * 8, 8);
    let b0 = filled(&be, 192, 9);
    let y0 = filled(&be, 192 * 8 * 2048, 10);
    let a0 = ConvT3dArgs {
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
    g.throughput(Throughput::Elements(2 * 2048 * 768 * 192 * 8u64));
    g.bench_function("convt0_768to192_8x16x16", |b| {
        b.iter(|| unsafe { be.conv_transpose3d_k2s2(&a0).unwrap() })
    });
    // Joint LayerNorm over (192, 16, 32, 32) + GELU, in place (memory bound; FLOPs ~ 10/elem).
    let n = 192 * 16 * 32 * 32;
    let lw = filled(&be, n, 11);
    let lb = filled(&be, n, 12);
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
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("layer_norm_joint_gelu_3145728", |b| {
        b.iter(|| unsafe { be.layer_norm_joint(&ln).unwrap() })
    });
    // ConvT 3: (1, 192, 16, 32, 32) -> (1, 96, 32, 64, 64), GELU.
    let w1 = filled(&be, 192 * 96 * 8, 13);
    let b1 = filled(&be, 96, 14);
    let y1 = filled(&be, 96 * 8 * n / 192, 15);
    let a1 = ConvT3dArgs {
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
    g.throughput(Throughput::Elements(2 * 16384 * 192 * 96 * 8u64));
    g.bench_function("convt3_192to96_16x32x32_gelu", |b| {
        b.iter(|| unsafe { be.conv_transpose3d_k2s2(&a1).unwrap() })
    });
    g.finish();
}

criterion_group!(benches, gemm_vit, attention_vit, decoder_upscaling);
criterion_main!(benches);
