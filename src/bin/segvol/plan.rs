//! `segvol plan`: the memory plan of one model call (every activation with its size, lifetime
//! and arena offset), or with `--shape` of a whole volume with the batch that fits the budget.
//! Planning is arithmetic: it needs neither weights nor a device.

use crate::{config_by_name, DeviceArgs};
use clap::Args;
use segvol::error::{Error, Result};
use segvol::pipeline::plan::{check_batch, human, parse_size, Request, VolumePlan, STAGES};
use segvol::program::TensorKind;
use segvol::DType;
use std::path::PathBuf;

#[derive(Args)]
pub struct PlanArgs {
    /// Model directory whose config.json to use (default: --config).
    #[arg(long)]
    model: Option<PathBuf>,
    /// `full`, `tiny` or a config.json, when no --model is given.
    #[arg(long, default_value = "full")]
    config: String,
    /// Windows per model call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// A whole volume: file dims XxYxZ (e.g. 512x512x1000).
    #[arg(long)]
    shape: Option<String>,
    /// Memory budget (e.g. 40G); with --shape, the batch is the largest up to --batch that fits.
    #[arg(long)]
    mem_limit: Option<String>,
    /// With --shape: prompts per volume (each keeps its logits and mask on the host).
    #[arg(long, default_value_t = 1, conflicts_with = "text")]
    prompts: usize,
    /// With --shape: the request's texts, one prompt each (as `segment --text`): their token
    /// counts size the text program, so the plan is the run's.
    #[arg(long)]
    text: Vec<String>,
    /// With --shape: points per prompt (as `segment --point`, counted, not placed).
    #[arg(long, default_value_t = 0)]
    points: usize,
    /// With --shape: a session's embedding cache (as `segvol session --cache`), counted in
    /// the device total and the budget.
    #[arg(long)]
    cache: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Only the per-program summary, not every activation.
    #[arg(long)]
    brief: bool,
}

pub fn run(a: PlanArgs) -> Result<()> {
    let cfg = match &a.model {
        Some(dir) => {
            let cfg_path = if dir.is_dir() {
                dir.join("config.json")
            } else {
                dir.clone()
            };
            if cfg_path.is_file() {
                segvol::ModelConfig::from_file(&cfg_path)?
            } else {
                segvol::ModelConfig::full()
            }
        }
        None => config_by_name(&a.config)?,
    };
    let spec = a.device.spec()?;
    let dtype = spec.dtype;
    check_batch(a.batch)?;
    let limit = match &a.mem_limit {
        Some(s) => Some(parse_size(s)?),
        // The host's available memory on a host device; a GPU's free memory when one is at
        // hand (planning itself needs no device).
        None if spec.is_host() => segvol::pipeline::host_available_memory()
            .map(|f| f.saturating_sub(segvol::pipeline::MEMORY_MARGIN)),
        None => spec
            .open()
            .ok()
            .and_then(|b| b.free_memory())
            .map(|f| f.saturating_sub(segvol::pipeline::MEMORY_MARGIN)),
    };
    match &a.shape {
        Some(shape) => {
            let xyz = parse_shape(shape)?;
            // Model frame (D, H, W) = file (Z, Y, X), spec §6.1.
            let mut host = request(&a, &cfg, spec.is_host())?;
            host.cache_bytes = a.cache.as_deref().map(parse_size).transpose()?.unwrap_or(0);
            let plan =
                VolumePlan::fit(&cfg, dtype, [xyz[2], xyz[1], xyz[0]], a.batch, limit, host)?;
            let windows = VolumePlan::max_windows(&cfg, plan.dims);
            print_volume(&plan, xyz, limit, windows);
        }
        None => {
            let plan = segvol::model::CallPlan::new(&cfg, dtype, a.batch, 3, 16)?;
            if let Some(l) = limit {
                if plan.total_bytes() > l {
                    return Err(Error::OutOfMemory(format!(
                        "one call at batch {} needs {}; the limit is {}",
                        a.batch,
                        human(plan.total_bytes()),
                        human(l)
                    )));
                }
            }
            print_call(&plan, a.batch, dtype, !a.brief);
        }
    }
    Ok(())
}

/// The request `segment` would make with these prompt flags: each text (or `--prompts`
/// prompts without text) with a box and `--points` points, tokenized by the model's
/// tokenizer (or the bundled one).
fn request(a: &PlanArgs, cfg: &segvol::ModelConfig, shares_budget: bool) -> Result<Request> {
    if a.text.is_empty() && a.points == 0 {
        return Ok(Request {
            prompts: a.prompts,
            shares_budget,
            ..Request::default()
        });
    }
    // A plan of more clicks than anyone gives is refused rather than allocated.
    const MAX_POINTS: usize = 4096;
    if a.points > MAX_POINTS {
        return Err(Error::Usage(format!(
            "--points {}: at most {MAX_POINTS} points per prompt",
            a.points
        )));
    }
    let texts: Vec<Option<String>> = if a.text.is_empty() {
        vec![None; a.prompts.max(1)]
    } else {
        a.text.iter().cloned().map(Some).collect()
    };
    let prompts: Vec<segvol::pipeline::UserPrompt> = texts
        .into_iter()
        .map(|text| segvol::pipeline::UserPrompt {
            text,
            bbox: Some([0; 6]),
            points: vec![[0; 3]; a.points],
            positive: vec![true; a.points],
        })
        .collect();
    let tok_dir = a.model.as_deref().map(|m| {
        if m.is_dir() {
            m
        } else {
            m.parent().unwrap_or(m)
        }
    });
    let tokenizer = segvol::tokenizer::TextTokenizer::for_model_dir(
        tok_dir,
        &cfg.text_template,
        cfg.text.max_positions,
    )?;
    Ok(Request {
        shares_budget,
        ..Request::for_prompts(&prompts, |t| Ok(tokenizer.encode(t)?.ids.len()))?
    })
}

fn parse_shape(s: &str) -> Result<[usize; 3]> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let bad = || Error::Usage(format!("--shape {s}: expected XxYxZ, e.g. 512x512x1000"));
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut out = [0; 3];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p
            .trim()
            .parse()
            .ok()
            .filter(|&v: &usize| v > 0)
            .ok_or_else(bad)?;
    }
    Ok(out)
}

fn print_call(plan: &segvol::model::CallPlan, batch: usize, dtype: DType, verbose: bool) {
    println!("model call, batch {batch}, {dtype} storage (a box + text prompt: 3 sparse tokens, 16 text tokens)");
    for (p, pl) in &plan.programs {
        let acts = p
            .tensors
            .iter()
            .filter(|t| t.kind == TensorKind::Activation)
            .count();
        println!(
            "  {:<40} {:>4} ops {:>4} activations  arena {:>10}  (without reuse {})  {:.1} GFLOP",
            p.name,
            p.steps.len(),
            acts,
            human(pl.arena_bytes),
            human(pl.unshared_bytes(p)),
            p.flops() / 1e9
        );
        if verbose {
            println!(
                "    {:<44} {:>22} {:>6} {:>10} {:>12} {:>11}",
                "activation", "shape", "dtype", "bytes", "offset", "steps"
            );
            for (i, t) in p.tensors.iter().enumerate() {
                if t.kind != TensorKind::Activation {
                    continue;
                }
                let (Some(off), Some((f, l))) = (pl.offsets[i], pl.lifetimes[i]) else {
                    continue;
                };
                println!(
                    "    {:<44} {:>22} {:>6} {:>10} {:>12} {:>5}..{:<5}",
                    t.name,
                    format!("{:?}", t.shape),
                    t.dtype.to_string(),
                    human(t.bytes()),
                    off,
                    f,
                    l
                );
            }
        }
    }
    println!("  weights region      {:>12}", human(plan.weight_bytes));
    println!("  arena (peak)        {:>12}", human(plan.arena_bytes));
    println!("  call buffers        {:>12}", human(plan.io_bytes));
    println!("  total               {:>12}", human(plan.total_bytes()));
    println!("  counted work        {:>9.1} GFLOP", plan.flops() / 1e9);
}

fn print_volume(plan: &VolumePlan, xyz: [usize; 3], limit: Option<usize>, windows: usize) {
    println!(
        "volume {}x{}x{} (model frame {}x{}x{}), {} storage, worst case: crop and ROI = whole volume",
        xyz[0], xyz[1], xyz[2], plan.dims[0], plan.dims[1], plan.dims[2], plan.dtype
    );
    println!(
        "  {:<36} {:>12} {:>14}  stages",
        "volume buffer", "bytes", "offset"
    );
    for b in &plan.buffers {
        println!(
            "  {:<36} {:>12} {:>14}  {} .. {}",
            b.name,
            human(b.bytes),
            b.offset,
            STAGES[b.first],
            STAGES[b.last]
        );
    }
    println!(
        "  volume region (packed)               {:>12}",
        human(plan.volume_bytes)
    );
    println!(
        "  weights region                       {:>12}",
        human(plan.call.weight_bytes)
    );
    println!(
        "  model arena (batch {:>2})               {:>12}",
        plan.batch,
        human(plan.call.arena_bytes)
    );
    println!(
        "  call buffers                         {:>12}",
        human(plan.call.io_bytes)
    );
    if plan.request.cache_bytes > 0 {
        println!(
            "  session embedding cache              {:>12}",
            human(plan.request.cache_bytes)
        );
    }
    println!(
        "  device total                         {:>12}",
        human(plan.total_bytes())
    );
    let p = plan.request.prompts;
    println!(
        "  host buffer ({p} prompt{})",
        if p == 1 { "" } else { "s" }
    );
    for h in &plan.host {
        println!("    {:<34} {:>12}", h.name, human(h.bytes));
    }
    println!(
        "  host buffers                         {:>12}",
        human(plan.host_bytes)
    );
    println!(
        "  total (device + host)                {:>12}",
        human(plan.total_bytes() + plan.host_bytes)
    );
    println!(
        "  held to the budget                   {:>12}  ({})",
        human(plan.budget_bytes()),
        if plan.request.shares_budget {
            "host device: device and host buffers share it"
        } else {
            "the device's; host buffers apart"
        }
    );
    match limit {
        Some(l) => println!(
            "  budget {} -> window batch {} (at most the volume's {} windows)",
            human(l),
            plan.batch,
            windows
        ),
        None => println!(
            "  no budget given (--mem-limit): window batch {}",
            plan.batch
        ),
    }
}
