//! `segvol`: SegVol from the command line. Every subcommand reports bad input as one line on
//! stderr and exit status 2, an engine failure as exit status 1 (DESIGN.md, "Errors").

mod bench;
mod plan;
mod segment;
mod serve;
mod session;
mod shard;
mod signals;

use clap::{Args, Parser, Subcommand};
use segvol::backend::{Backend, DeviceSpec};
use segvol::error::{Error, Result};
use segvol::model::SegVol;
use segvol::ModelConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "segvol",
    version,
    about = "SegVol: universal 3-D CT segmentation from text, box and point prompts"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment CT volumes (NIfTI) with the official zoom-out-zoom-in pipeline.
    Segment(segment::SegmentArgs),
    /// Open one volume and segment prompt after prompt: JSON lines on stdin, JSON lines out.
    Session(session::SessionArgs),
    /// Serve SegVol over MONAI Label's REST protocol (3D Slicer, OHIF) on resident sessions.
    Serve(serve::ServeArgs),
    /// One model call on one window tensor (safetensors in, safetensors out).
    Window(WindowArgs),
    /// Time model calls and their stages; report TFLOP/s against the counted floor.
    Bench(bench::BenchArgs),
    /// Print the memory plan of a model call, or of a whole volume with --shape.
    Plan(plan::PlanArgs),
    /// Summarise and validate a checkpoint (a model directory or a weights file).
    Inspect(InspectArgs),
    /// Write a model directory with deterministic segvol-random-v1 weights.
    GenWeights(GenWeightsArgs),
}

/// Where the model runs.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu, emu (the CUDA kernels run on the host emulator), or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage precision: f32, bf16 or f16 (default: f32 on cpu, bf16 elsewhere).
    #[arg(long)]
    pub precision: Option<String>,
}

impl DeviceArgs {
    /// The device and precision, parsed and checked once ([`DeviceSpec::parse`]).
    pub fn spec(&self) -> Result<DeviceSpec> {
        DeviceSpec::parse(&self.device, self.precision.as_deref())
    }

    /// Opens the backend.
    pub fn open(&self) -> Result<Arc<dyn Backend>> {
        self.spec()?.open()
    }
}

#[derive(Args)]
struct WindowArgs {
    /// Model directory (Hugging Face layout) or weights file.
    #[arg(long)]
    model: PathBuf,
    /// safetensors file holding `input`, shape (1,1,D,H,W) = the model's spatial size.
    #[arg(long)]
    input: PathBuf,
    /// Prompt JSON: {"text", "box", "points", "labels"} in window voxel coordinates.
    #[arg(long)]
    prompt: PathBuf,
    /// Output safetensors: `final_logits`, plus the stage tensors with --stages.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    /// Also write the intermediate tensors under the fixtures' names.
    #[arg(long)]
    stages: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// Model directory or weights file (.safetensors, .bin, .pth).
    model: PathBuf,
}

#[derive(Args)]
struct GenWeightsArgs {
    /// `full` (released architecture), `tiny` (test architecture) or a config.json.
    #[arg(long)]
    config: String,
    /// Generator seed.
    #[arg(long)]
    seed: u64,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    signals::install();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.cmd {
        Command::Segment(a) => segment::run(a),
        Command::Session(a) => session::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Window(a) => window(a),
        Command::Plan(a) => plan::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Inspect(a) => inspect(a),
        Command::GenWeights(a) => gen_weights(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("segvol: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Loads the model on the requested device.
pub fn load_model(dir: &Path, device: &DeviceArgs) -> Result<SegVol> {
    let backend = device.open()?;
    SegVol::load(dir, backend)
}

fn window(a: WindowArgs) -> Result<()> {
    let model = load_model(&a.model, &a.device)?;
    let cfg = model.config();
    let input = segvol::tensor::read_tensor(&a.input, "input")?;
    let [d, h, w] = cfg.spatial_size;
    if input.shape != [1, 1, d, h, w] {
        return Err(Error::Input(format!(
            "{}: tensor `input` has shape {:?}; this model takes (1, 1, {d}, {h}, {w})",
            a.input.display(),
            input.shape
        )));
    }
    if let Some(i) = input.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "{}: tensor `input` has a non-finite value at index {i}",
            a.input.display()
        )));
    }
    let prompt = segvol::io::prompt::read_window_prompt(&a.prompt, cfg.spatial_size)?;
    let out = model.call(&input.data, &prompt, a.stages)?;
    let mut tensors: Vec<(&str, &segvol::tensor::HostTensor)> = vec![("final_logits", &out.logits)];
    for (name, t) in &out.stages {
        tensors.push((name.as_str(), t));
    }
    segvol::tensor::write_safetensors(&a.out, &tensors)
}

fn inspect(a: InspectArgs) -> Result<()> {
    let (cfg, store) = segvol::weights::open_model_dir(&a.model)?;
    println!("{}", store.summary());
    print_config(&cfg);
    Ok(())
}

fn print_config(cfg: &ModelConfig) {
    println!(
        "configuration: window {:?}, patch {:?}, encoder {}x{} (heads {}, mlp {}), decoder dim {} depth {} heads {}, text {}x{} (vocab {})",
        cfg.spatial_size, cfg.patch_size, cfg.encoder.layers, cfg.encoder.hidden, cfg.encoder.heads, cfg.encoder.mlp,
        cfg.decoder.dim, cfg.decoder.depth, cfg.decoder.heads, cfg.text.layers, cfg.text.hidden, cfg.text.vocab
    );
}

/// `full`, `tiny` or a config file.
pub fn config_by_name(name: &str) -> Result<ModelConfig> {
    match name {
        "full" => Ok(ModelConfig::full()),
        "tiny" => Ok(ModelConfig::tiny()),
        path => ModelConfig::from_file(Path::new(path)),
    }
}

fn gen_weights(a: GenWeightsArgs) -> Result<()> {
    let cfg = config_by_name(&a.config)?;
    let t0 = std::time::Instant::now();
    segvol::weights::write_model_dir(
        &a.out,
        &cfg,
        a.seed,
        segvol::tokenizer::EMBEDDED_TOKENIZER_JSON,
    )?;
    eprintln!(
        "wrote {} (segvol-random-v1, seed {}) in {:.1} s",
        a.out.display(),
        a.seed,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
