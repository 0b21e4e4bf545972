//! Graph capture and replay on the emulator (`EmuGraphs`): the kernel backend's scratch outlives
//! its growth while a captured graph still addresses it, a failed capture falls back to eager
//! execution once per binding, and replayed model calls equal eager ones bit for bit.

mod common;

use segvol::backend::emu::{EmuDevice, EmuGraphs, EmuOptions};
use segvol::backend::kernel::{KernelArgs, KernelBackend, KernelDevice, Scratch};
use segvol::backend::{Act, Backend, Buffer, LayerNormJointArgs};
use segvol::dtype::DType;
use segvol::model::{SegVol, WindowPrompt};
use segvol::rng::SplitMix64 as Rng;
use segvol::tensor::read_safetensors;
use std::sync::Arc;

/// Model tests bind inputs by address; other tests allocating at the same time would change
/// which addresses the allocator hands out between calls, so the tests of this file run one at a time.
static MODEL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn emu(mode: EmuGraphs) -> EmuDevice {
    EmuDevice::with_options(EmuOptions::default()).with_graphs(mode)
}

fn upload(b: &dyn Backend, v: &[f32]) -> Buffer {
    let buf = b.alloc(v.len() * 4).unwrap();
    // SAFETY: the buffer was just allocated with room for `v`.
    unsafe { b.upload(buf.addr(), bytemuck::cast_slice(v)).unwrap() };
    buf
}

fn download(b: &dyn Backend, buf: &Buffer, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    // SAFETY: `buf` holds at least `n` f32.
    unsafe {
        b.download(buf.addr(), bytemuck::cast_slice_mut(&mut v))
            .unwrap()
    };
    v
}

/// LayerNorm over each of `batch` rows of `n`, in f64.
fn layer_norm_ref(x: &[f32], n: usize, w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(n)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            row.iter()
                .enumerate()
                .map(move |(j, &v)| ((v as f64 - mean) * inv * w[j] as f64 + b[j] as f64) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.unit_f64() as f32 * 2.0 - 1.0).collect()
}

/// The emulator's replay check itself: a graph whose buffer was freed after the capture is
/// refused at replay, not run into freed memory (so the scratch test below can fail).
#[test]
fn replay_into_freed_memory_is_refused() {
    let _g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = emu(EmuGraphs::On);
    // Large enough to be its own mapping, so no other test's allocation reuses the address.
    let buf = dev.alloc(3 << 20).unwrap();
    dev.begin_capture().unwrap();
    let mut args = KernelArgs::new();
    args.ptr(buf.addr()).i64(16).i32(0).f32(1.0);
    // SAFETY: only recorded; the replay below is refused before it runs.
    unsafe { dev.launch("sv_fill_f32", [1, 1, 1], [32, 1, 1], 0, &mut args) }.unwrap();
    let graph = dev.end_capture().unwrap();
    drop(buf);
    // SAFETY: the replay is checked before any access.
    let err = unsafe { graph.launch() }.unwrap_err().to_string();
    assert!(err.contains("freed after the capture"), "{err}");
}

/// Every address the scratch handed out stays the same live allocation after the scratch grows
/// (a captured graph may still address it): compared by allocation id, which a free followed by
/// a new allocation at the same address would change.
#[test]
fn scratch_growth_retires_instead_of_freeing() {
    let _g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = emu(EmuGraphs::Off);
    let scratch = Scratch::default();
    let mut handed_out = Vec::new();
    for bytes in [16, 4096, 4097, 100_000, 1 << 20] {
        let a = scratch.get(&dev, bytes).unwrap();
        handed_out.push((
            a,
            EmuDevice::allocation_id(a).expect("scratch is an allocation"),
        ));
        for &(a, id) in &handed_out {
            assert_eq!(
                EmuDevice::allocation_id(a),
                Some(id),
                "scratch {a:#x} was freed when growing to {bytes} bytes"
            );
        }
    }
    // Retired buffers are bounded: powers of two, so less than twice the current one.
    assert!(scratch.held_bytes() < 2 * (1 << 20) * 2);
}

/// A graph captured while the scratch buffer was small must still replay correctly after a
/// larger request grew the scratch: the old buffer is retired, not freed.
#[test]
fn scratch_growth_keeps_captured_graphs_valid() {
    let _g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = KernelBackend::new(emu(EmuGraphs::On), DType::F32).unwrap();
    let mut rng = Rng(3);
    let (batch, n) = (2, 64);
    let w = random(&mut rng, n);
    let b = random(&mut rng, n);
    let (wb, bb) = (upload(&backend, &w), upload(&backend, &b));
    let x = random(&mut rng, batch * n);
    let (xb, ob) = (
        upload(&backend, &x),
        upload(&backend, &vec![0.0; batch * n]),
    );
    let args = LayerNormJointArgs {
        x: xb.addr(),
        out: ob.addr(),
        batch,
        n,
        weight: wb.addr(),
        bias: bb.addr(),
        eps: 1e-5,
        act: Act::None,
    };
    // Eager first (sizes the scratch), then capture the same op.
    // SAFETY: every buffer is live and sized for the op.
    unsafe { backend.layer_norm_joint(&args).unwrap() };
    let graph = backend
        .capture(&mut || unsafe { backend.layer_norm_joint(&args) })
        .unwrap()
        .expect("the emulator records graphs");
    let before = backend.scratch_held_bytes();

    // A larger request (600 samples x 16 bytes of partials > 4 KiB) grows the scratch.
    let (big_batch, big_n) = (600, 8);
    let wb2 = upload(&backend, &random(&mut rng, big_n));
    let bb2 = upload(&backend, &random(&mut rng, big_n));
    let xb2 = upload(&backend, &random(&mut rng, big_batch * big_n));
    let big = LayerNormJointArgs {
        x: xb2.addr(),
        out: xb2.addr(),
        batch: big_batch,
        n: big_n,
        weight: wb2.addr(),
        bias: bb2.addr(),
        eps: 1e-5,
        act: Act::None,
    };
    // SAFETY: as above.
    unsafe { backend.layer_norm_joint(&big).unwrap() };
    assert!(
        backend.scratch_held_bytes() > before,
        "the scratch did not grow; the test does not test growth"
    );

    // New input, then replay the graph captured before the growth.
    let x2 = random(&mut rng, batch * n);
    // SAFETY: `xb` holds batch * n f32.
    unsafe {
        backend
            .upload(xb.addr(), bytemuck::cast_slice(&x2))
            .unwrap()
    };
    // SAFETY: every buffer the graph recorded is alive (the old scratch is retired).
    unsafe { graph.launch() }.expect("replay after scratch growth");
    let got = download(&backend, &ob, batch * n);
    let want = layer_norm_ref(&x2, n, &w, &b, 1e-5);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-4, "element {i}: {g} != {w}");
    }
}

struct Call {
    image: Vec<f32>,
    prompt: WindowPrompt,
}

fn tiny_call() -> Call {
    let dir = common::tiny();
    let image = read_safetensors(&dir.join("call-image.safetensors")).unwrap();
    let meta = common::json(&dir.join("call-text.json"));
    Call {
        image: image["input"].data.clone(),
        prompt: WindowPrompt {
            text: meta["prompts"]["text"].as_str().map(String::from),
            ..Default::default()
        },
    }
}

fn model_on(dev: EmuDevice) -> SegVol {
    let backend: Arc<dyn Backend> = Arc::new(KernelBackend::new(dev, DType::F32).unwrap());
    SegVol::load(&common::tiny().join("model"), backend).unwrap()
}

/// Eager logits of one call on a device without graphs.
fn eager_logits(call: &Call) -> Vec<f32> {
    let model = model_on(emu(EmuGraphs::Off));
    model
        .call(&call.image, &call.prompt, false)
        .unwrap()
        .logits
        .data
}

/// A capture that fails (like an invalidated CUDA stream capture) costs one eager run of that
/// binding and a note, not the call; the binding is not captured again.
#[test]
fn failed_capture_falls_back_to_eager_once() {
    let _g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let call = tiny_call();
    let want = eager_logits(&call);
    let dev = emu(EmuGraphs::FailCapture);
    let model = model_on(dev.clone());
    let mut captures = Vec::new();
    for i in 0..12 {
        let out = model
            .call(&call.image, &call.prompt, false)
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(out.logits.data, want, "call {i}: logits differ from eager");
        captures.push(dev.captures_begun());
    }
    // Calls may bind inputs at new addresses (a new binding is captured once, when it is seen
    // again), so the count grows a little at unpredictable calls. A binding retried after
    // failing would instead start a capture of both programs on every call (>= 2 per call).
    assert!(captures[11] > 0, "no capture was attempted: {captures:?}");
    assert_eq!(dev.replays_begun(), 0, "a failed capture was replayed");
    assert!(
        captures[11] < 12,
        "failed bindings were captured again: {captures:?}"
    );
}

/// Graph replay on the emulator gives the eager logits bit for bit, and replays rather than
/// recaptures.
#[test]
fn replayed_calls_equal_eager_calls() {
    let _g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let call = tiny_call();
    let want = eager_logits(&call);
    let dev = emu(EmuGraphs::On);
    let model = model_on(dev.clone());
    let mut captures = Vec::new();
    for i in 0..8 {
        let out = model
            .call(&call.image, &call.prompt, false)
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(out.logits.data, want, "call {i}: logits differ from eager");
        captures.push(dev.captures_begun());
    }
    assert!(captures[4] > 0, "no graph was captured: {captures:?}");
    assert!(dev.replays_begun() > 0, "no graph was replayed");
}
