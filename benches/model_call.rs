//! One full-size SegVol model call (text prompt "liver") on the CPU backend: image encoder +
//! decoder on one 32x256x256 window, the text embedding cached as in every call after the first
//! (spec §3). Weights: full-size segvol-random-v1 (seed 2), generated in memory. Input: a
//! pseudo-random window in [0, 1], never zeros.
//!
//! `cargo bench --bench model_call`; the reference PyTorch SegVol takes ~7.4 s (median) for the
//! same call on this 2-core machine (`../shared/fixtures/full/timings.json`, `timing_run`).

use criterion::{criterion_group, criterion_main, Criterion};
use segvol::backend::cpu::CpuBackend;
use segvol::backend::Backend;
use segvol::model::{SegVol, WindowPrompt};
use segvol::tokenizer::TextTokenizer;
use segvol::weights::WeightStore;
use segvol::ModelConfig;
use std::sync::Arc;
use std::time::Duration;

fn model_call(c: &mut Criterion) {
    let cfg = ModelConfig::full();
    let store = WeightStore::random(&cfg, 2);
    let tok =
        TextTokenizer::for_model_dir(None, &cfg.text_template, cfg.text.max_positions).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let model = SegVol::new(cfg.clone(), Arc::new(store), tok, backend.clone()).unwrap();
    let n = cfg.window_voxels();
    let window = segvol::rng::SplitMix64(1).values(n, 0.0, 1.0);
    let img = backend.alloc(n * 4).unwrap();
    let emb = backend.alloc(model.embedding_bytes()).unwrap();
    let logits = backend.alloc(n * 4).unwrap();
    unsafe {
        backend
            .upload(img.addr(), bytemuck::cast_slice(&window))
            .unwrap()
    };
    let prompt = [WindowPrompt {
        text: Some("liver".into()),
        ..Default::default()
    }];
    model.text_embedding("liver").unwrap();

    let mut g = c.benchmark_group("cpu");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .warm_up_time(Duration::from_secs(3));
    g.bench_function("model_call_full_text", |b| {
        b.iter(|| {
            model.encode_into(img.addr(), 1, emb.addr()).unwrap();
            model.decode(emb.addr(), &prompt, logits.addr()).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, model_call);
criterion_main!(benches);
