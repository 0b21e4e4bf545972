//! `segvol bench`: times the model call and its stages on a device and reports achieved
//! throughput against the counted floor (spec §8.3: ~0.53 TFLOP per full-size call). Inputs are
//! pseudo-random windows in [0, 1] (never zeros); weights are the model's, or generated
//! full-size segvol-random-v1 weights when no --model is given.

use crate::DeviceArgs;
use clap::Args;
use segvol::error::{Error, Result};
use segvol::model::{SegVol, WindowPrompt};
use segvol::{DType, ModelConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory; default: full-size random weights generated in memory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Windows per call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed iterations (medians are reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Text prompt for the decoder.
    #[arg(long, default_value = "liver")]
    text: String,
    /// Also list the N slowest single ops of the profiled call (program, step, kind, time).
    #[arg(long, default_value_t = 0)]
    top: usize,
    /// Time a session on this CT instead: opening it, the first prompt (--text), exact
    /// re-prompts (the same text; a text with a point at the ROI's centre) with every window
    /// cached, and a keep_roi refinement (another point inside the ROI).
    #[arg(long, value_name = "CT")]
    session: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    segvol::pipeline::plan::check_batch(a.batch)?;
    if a.iters == 0 {
        return Err(Error::Usage(
            "--iters 0: at least one timed iteration is needed for a median".into(),
        ));
    }
    let spec = a.device.spec()?;
    // The full-size call's plan and its window inputs/outputs, checked against the host's
    // available memory before anything is allocated on a host device (with --model the
    // checkpoint's own architecture is only known once loaded).
    if spec.is_host() && a.model.is_none() {
        let cfg = ModelConfig::full();
        let plan = segvol::model::CallPlan::new(&cfg, spec.dtype, a.batch, 1, 0)?;
        let windows = 3 * a.batch * cfg.window_voxels() * 4;
        let need = plan.total_bytes() + windows;
        if let Some(avail) = segvol::pipeline::host_available_memory() {
            if need > avail {
                return Err(Error::OutOfMemory(format!(
                    "bench --batch {} needs {} of host memory; {} is available",
                    a.batch,
                    segvol::pipeline::plan::human(need),
                    segvol::pipeline::plan::human(avail)
                )));
            }
        }
    }
    let backend = spec.open()?;
    let session_ct = a.session.clone();
    let model = match &a.model {
        Some(dir) => SegVol::load(dir, backend)?,
        None => {
            let cfg = ModelConfig::full();
            let store = segvol::weights::WeightStore::random(&cfg, 2);
            let tok = segvol::tokenizer::TextTokenizer::for_model_dir(
                None,
                &cfg.text_template,
                cfg.text.max_positions,
            )?;
            SegVol::new(cfg, Arc::new(store), tok, backend)?
        }
    };
    if let Some(ct) = session_ct {
        return bench_session(&model, &ct, &a);
    }
    let b = model.backend().clone();
    let cfg = model.config().clone();
    let batch = a.batch;
    let win = cfg.window_voxels();
    // Pseudo-random windows in [0, 1].
    let images = segvol::rng::SplitMix64(0x2545_F491_4F6C_DD1D).values(batch * win, 0.0, 1.0);
    let img = b.alloc(images.len() * 4)?;
    let emb = b.alloc(batch * model.embedding_bytes())?;
    let logits = b.alloc(batch * win * 4)?;
    // SAFETY: sized for the images.
    unsafe { b.upload(img.addr(), bytemuck::cast_slice(&images))? };
    let prompt = WindowPrompt {
        text: Some(a.text.clone()),
        ..Default::default()
    };
    let prompts = vec![prompt.clone(); batch];

    // CLIP once, uncached (the cache serves every later call).
    let t0 = Instant::now();
    model.text_embedding(&a.text)?;
    let text_s = t0.elapsed().as_secs_f64();

    let (mut enc, mut dec, mut call) = (Vec::new(), Vec::new(), Vec::new());
    for it in 0..a.warmup + a.iters {
        let t0 = Instant::now();
        model.encode_into(img.addr(), batch, emb.addr())?;
        b.synchronize()?;
        let t1 = Instant::now();
        model.decode(emb.addr(), &prompts, logits.addr())?;
        b.synchronize()?;
        let t2 = Instant::now();
        if it >= a.warmup {
            enc.push((t1 - t0).as_secs_f64());
            dec.push((t2 - t1).as_secs_f64());
            call.push((t2 - t0).as_secs_f64());
        }
    }
    let plan = segvol::model::CallPlan::new(&cfg, b.dtype(), batch, 1, 0)?;
    let flops = plan.programs.iter().map(|(p, _)| p.flops()).sum::<f64>();
    let (enc_m, dec_m, call_m) = (median(&mut enc), median(&mut dec), median(&mut call));
    println!(
        "segvol bench: {} ({}), window {:?}, batch {batch}, text {:?}, {} iterations (median), {} threads",
        b.description(),
        b.dtype(),
        cfg.spatial_size,
        a.text,
        a.iters,
        rayon::current_num_threads()
    );
    println!(
        "  {:<28} {:>10} {:>12} {:>12}",
        "stage", "median", "per window", "TFLOP/s"
    );
    let row = |name: &str, s: f64, fl: Option<f64>| {
        let tf = fl.map_or(String::from("-"), |f| format!("{:.3}", f / s / 1e12));
        println!(
            "  {:<28} {:>8.3} s {:>10.3} s {:>12}",
            name,
            s,
            s / batch as f64,
            tf
        );
    };
    let enc_flops = plan.programs[0].0.flops();
    row("image encoder", enc_m, Some(enc_flops));
    row("mask decoder (text)", dec_m, Some(flops - enc_flops));
    row("model call", call_m, Some(flops));
    println!(
        "  {:<28} {:>8.3} s   (once per distinct text, then cached)",
        "text encoder (CLIP)", text_s
    );
    println!(
        "  counted floor: {:.1} GFLOP per window",
        flops / batch as f64 / 1e9
    );
    let packed = segvol::backend::cpu::CpuBackend::packed_weight_bytes();
    if packed > 0 {
        println!(
            "  packed weight panels kept by the CPU GEMM: {:.0} MiB",
            packed as f64 / (1 << 20) as f64
        );
    }

    // One profiled call: time per op kind (synchronised after every op).
    let ops = model.profile(img.addr(), batch, &prompt)?;
    let mut by_kind: BTreeMap<&str, (f64, f64, usize)> = BTreeMap::new();
    for o in &ops {
        let e = by_kind.entry(o.kind).or_default();
        e.0 += o.seconds;
        e.1 += o.flops;
        e.2 += 1;
    }
    let total: f64 = ops.iter().map(|o| o.seconds).sum();
    println!("  per op kind (one profiled call, {:.3} s):", total);
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (kind, (s, f, n)) in kinds {
        let tf = if f > 0.0 {
            format!("{:.3} TFLOP/s", f / s / 1e12)
        } else {
            String::new()
        };
        println!(
            "    {:<24} {:>4} ops {:>8.3} s {:>5.1}%  {}",
            kind,
            n,
            s,
            100.0 * s / total,
            tf
        );
    }
    if a.top > 0 {
        let mut slow: Vec<_> = ops.iter().collect();
        slow.sort_by(|x, y| y.seconds.total_cmp(&x.seconds));
        println!("  slowest ops:");
        for o in slow.iter().take(a.top) {
            let tf = if o.flops > 0.0 {
                format!("{:.3} TFLOP/s", o.flops / o.seconds / 1e12)
            } else {
                String::new()
            };
            println!(
                "    {:>9.3} ms  {:<22} {:<40} {}",
                o.seconds * 1e3,
                o.kind,
                format!("{}: {}", o.program, o.label),
                tf
            );
        }
    }
    if b.dtype() != DType::F32 && b.name() == "cpu" {
        println!("  note: the CPU computes in f32");
    }
    Ok(())
}

/// `bench --session CT`: what a resident session costs per prompt (issue 12), medians over
/// `--iters` rounds after the first prompt. Everything runs on one session with the embedding
/// cache on, as `segvol session` runs.
fn bench_session(model: &SegVol, ct: &std::path::Path, a: &BenchArgs) -> Result<()> {
    use segvol::pipeline::{plan::Request, Options, PromptOptions, Session, UserPrompt};
    let vol = segvol::io::read_input(ct)?;
    let opts = Options {
        batch: a.batch,
        ..Options::default()
    };
    let t0 = Instant::now();
    let request = Request {
        sparse_tokens: 8,
        text_tokens: model.config().text.max_positions,
        ..Request::default()
    };
    let session = Session::open(model, &vol.data, vol.model_dims(), request, &opts)?;
    session.set_cache_limit(usize::MAX);
    let open_s = t0.elapsed().as_secs_f64();
    let text = UserPrompt {
        text: Some(a.text.clone()),
        ..Default::default()
    };
    let t0 = Instant::now();
    let first = session.segment(&text, &mut |_, _| {})?;
    let first_s = t0.elapsed().as_secs_f64();
    let Some(roi) = first.roi else {
        return Err(Error::Input(format!(
            "{}: the first prompt found no foreground, so there is no ROI to re-prompt in",
            ct.display()
        )));
    };
    // File (i, j, k) of a point at a fraction of the ROI, from the cropped (d, h, w) grid.
    let outcome = session.outcome(vec![]);
    let at = |f: f64| -> [usize; 3] {
        let c: [usize; 3] = std::array::from_fn(|ax| {
            outcome.crop_start[ax] + roi.start[ax] + ((roi.shape[ax] - 1) as f64 * f) as usize
        });
        [c[2], c[1], c[0]]
    };
    let with_point = UserPrompt {
        points: vec![at(0.5)],
        positive: vec![true],
        ..text.clone()
    };
    let refine = UserPrompt {
        points: vec![at(0.5), at(0.4)],
        positive: vec![true, false],
        ..text.clone()
    };
    let cases: [(&str, &UserPrompt, PromptOptions); 3] = [
        (
            "exact re-prompt, same text",
            &text,
            PromptOptions::default(),
        ),
        (
            "exact re-prompt, text + point",
            &with_point,
            PromptOptions::default(),
        ),
        (
            "keep_roi refinement, + 2 points",
            &refine,
            PromptOptions { keep_roi: true },
        ),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    let mut cached = vec![(0, 0, false); cases.len()];
    // Identify: a click at the ROI's centre named among 20 default candidates.
    let click = UserPrompt {
        points: vec![at(0.5)],
        positive: vec![true],
        ..Default::default()
    };
    let candidates: Vec<String> = segvol::pipeline::DEFAULT_CANDIDATES[..20]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut identify_times = Vec::new();
    let mut top = String::new();
    for _ in 0..a.iters {
        for (i, (_, p, po)) in cases.iter().enumerate() {
            let t0 = Instant::now();
            let out = session.segment_with(p, *po, &mut |_, _| {})?;
            times[i].push(t0.elapsed().as_secs_f64());
            cached[i] = (out.cached_windows, out.windows.len(), out.roi_kept);
        }
        let t0 = Instant::now();
        let id = session.identify(&click, &candidates)?;
        identify_times.push(t0.elapsed().as_secs_f64());
        top = id.ranked.first().map(|r| r.0.clone()).unwrap_or_default();
    }
    println!(
        "segvol bench --session: {} on {} ({}), {} windows per batch, text {:?}, medians of {}",
        ct.display(),
        model.backend().name(),
        model.backend().dtype(),
        session.plan().batch,
        a.text,
        a.iters
    );
    println!(
        "  {:<36} {:>9}",
        "open (read excluded)",
        format!("{open_s:.3} s")
    );
    println!(
        "  {:<36} {:>9}  {} windows",
        "first prompt",
        format!("{first_s:.3} s"),
        first.windows.len()
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let m = median(&mut times[i]);
        let (c, w, kept) = cached[i];
        println!(
            "  {:<36} {:>9}  {:>5.1}% of the first; {c}/{w} windows cached{}",
            name,
            format!("{m:.3} s"),
            100.0 * m / first_s,
            if kept { ", ROI kept" } else { "" }
        );
    }
    let m = median(&mut identify_times);
    println!(
        "  {:<36} {:>9}  {:>5.1}% of the first; {:.3} s per candidate (the click alone, then 20 decoder-only prompts); top: {top}",
        "identify a click, 20 candidates",
        format!("{m:.3} s"),
        100.0 * m / first_s,
        m / 21.0
    );
    Ok(())
}
