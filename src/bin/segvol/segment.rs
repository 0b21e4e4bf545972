//! `segvol segment`: CT volumes in, masks in the original geometry out, through the official
//! zoom-out-zoom-in pipeline (spec §6). Prompts in file voxel indices (i,j,k), or in world
//! millimetres with `--mm`.

use crate::DeviceArgs;
use clap::Args;
use segvol::error::{Error, Result};
use segvol::io::nifti::{self, Volume};
use segvol::io::prompt::{Units, VolumePrompts};
use segvol::model::SegVol;
use segvol::pipeline::{self, plan::parse_size, Options, UserPrompt, VolumeOutcome};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The demo CT (TotalSegmentator test data, Apache-2.0; see assets/NOTICE.md).
const DEMO_CT: &[u8] = include_bytes!("../../../tests/fixtures/data/example_ct_sm.nii.gz");
/// Seed of the demo's generated full-size weights.
const DEMO_SEED: u64 = 0;

#[derive(Args)]
pub struct SegmentArgs {
    /// CT volumes (.nii, .nii.gz) or directories of them.
    inputs: Vec<PathBuf>,
    /// Model directory (Hugging Face layout) or weights file.
    #[arg(long, required_unless_present = "demo")]
    model: Option<PathBuf>,
    /// Output mask (.nii.gz or .nii) for a single input.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output directory: one mask per input (and per text with several --text).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Category name, e.g. "liver" (repeatable: several give a label map, or one file each with
    /// --out-dir).
    #[arg(long)]
    text: Vec<String>,
    /// Box i0,j0,k0,i1,j1,k1 (corners inclusive), file voxel indices (or mm with --mm).
    #[arg(long, value_name = "I0,J0,K0,I1,J1,K1", allow_hyphen_values = true)]
    r#box: Option<String>,
    /// Positive point i,j,k (repeatable).
    #[arg(long, value_name = "I,J,K", allow_hyphen_values = true)]
    point: Vec<String>,
    /// Negative point i,j,k (repeatable).
    #[arg(long, value_name = "I,J,K", allow_hyphen_values = true)]
    negative_point: Vec<String>,
    /// Box and point coordinates are world millimetres (through the sform, else the qform).
    #[arg(long)]
    mm: bool,
    /// Stop after the zoom-out (no sliding windows).
    #[arg(long)]
    no_zoom_in: bool,
    /// Windows per model call (the largest up to this that fits the memory budget).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Memory budget for the device (e.g. 40G).
    #[arg(long)]
    mem_limit: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Write a JSON report (voxels, millilitres, ROI, windows, stage times).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the final logits on the cropped grid (safetensors: `final_logits`,
    /// `zoom_out_logits`, one pair per prompt) for inspection.
    #[arg(long)]
    save_logits: Option<PathBuf>,
    /// Also name what the box/points segment (no --text): rank the candidate names
    /// (`Session::identify`) and print the top five; all go into --json.
    #[arg(long, conflicts_with = "text")]
    identify: bool,
    /// With --identify: a file of candidate names, one per line (default: FLARE22's organs,
    /// further TotalSegmentator organs and vessels, lesions).
    #[arg(long, requires = "identify")]
    candidates: Option<PathBuf>,
    /// Run the bundled example: a small CT, generated full-size random weights, "liver".
    #[arg(long, conflicts_with_all = ["inputs", "model"])]
    demo: bool,
    #[command(flatten)]
    shard: crate::shard::ShardArgs,
}

/// Per-input output: a single path, or a directory.
enum Output {
    File(PathBuf),
    Dir(PathBuf),
}

pub fn run(a: SegmentArgs) -> Result<()> {
    if a.demo {
        return demo(a);
    }
    let model_dir = a
        .model
        .clone()
        .expect("clap requires --model without --demo");
    let inputs = expand_inputs(&a.inputs)?;
    let output = match (&a.out, &a.out_dir) {
        (Some(_), Some(_)) => return Err(Error::Usage("give --out or --out-dir, not both".into())),
        (Some(f), None) if inputs.len() == 1 => Output::File(f.clone()),
        (Some(_), None) => {
            return Err(Error::Usage(format!(
                "{} inputs: use --out-dir",
                inputs.len()
            )))
        }
        (None, Some(d)) => Output::Dir(d.clone()),
        (None, None) => return Err(Error::Usage("give --out (one input) or --out-dir".into())),
    };
    if let Output::File(f) = &output {
        check_nifti_name(f)?;
        if a.text.len() > 255 {
            return Err(Error::Usage(format!(
                "{} --text into one --out file: a uint8 label map holds at most 255 labels (use --out-dir)",
                a.text.len()
            )));
        }
    }
    check_outputs(&inputs, &output, &a)?;
    let part = a.shard.part(matches!(output, Output::Dir(_)))?;
    let mut log = crate::shard::Log::open(a.shard.jsonl.as_deref(), part)?;
    let inputs = todo_inputs(inputs, part, &output, &a, &mut log)?;
    if inputs.is_empty() {
        return Ok(());
    }
    if !model_dir.exists() {
        return Err(Error::io(
            &model_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    let opts = options(&a)?;
    // Check every prompt argument before the model loads.
    let spec = prompts(&a)?;
    let t_load = Instant::now();
    let model = crate::load_model(&model_dir, &a.device)?;
    eprintln!(
        "segvol: model loaded on {} ({}) in {:.1} s",
        model.backend().name(),
        model.backend().dtype(),
        t_load.elapsed().as_secs_f64()
    );
    if inputs.len() == 1 {
        let report = segment_file(&model, &inputs[0], &output, &a, &opts, &spec);
        match &report {
            Ok(r) => log.done(&inputs[0], r)?,
            Err(e) => log.failed(&inputs[0], e)?,
        }
        return write_report(a.json.as_deref(), &report?);
    }
    // Several inputs: one bad file must not cost the others. Each failure is reported as it
    // happens, in the --json report and in the exit status.
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for input in &inputs {
        match segment_file(&model, input, &output, &a, &opts, &spec) {
            Ok(r) => {
                log.done(input, &r)?;
                reports.push(r)
            }
            Err(e) => {
                eprintln!("segvol: failed: {}: {e}", input.display());
                log.failed(input, &e)?;
                failures.push((input.clone(), e));
            }
        }
    }
    let summary =
        json!({"inputs": inputs.len(), "segmented": reports.len(), "failed": failures.len()});
    let failed: Vec<_> = failures
        .iter()
        .map(|(p, e)| json!({"input": p, "error": e.to_string(), "exit_code": e.exit_code()}))
        .collect();
    write_report(
        a.json.as_deref(),
        &json!({"volumes": reports, "failures": failed, "summary": summary}),
    )?;
    eprintln!(
        "segvol: {} of {} inputs segmented, {} failed",
        reports.len(),
        inputs.len(),
        failures.len()
    );
    match failures.iter().map(|(_, e)| e.exit_code()).min() {
        None => Ok(()),
        // An engine failure (1) outranks bad input (2): it is the one to look at first.
        Some(code) => Err(Error::Failed {
            failed: failures.len(),
            total: inputs.len(),
            code,
        }),
    }
}

/// Every file this run will write, with what it is (for messages), planned before any work.
fn planned_outputs(inputs: &[PathBuf], output: &Output, a: &SegmentArgs) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    match output {
        Output::File(f) => out.push((f.clone(), "--out".to_string())),
        Output::Dir(d) => {
            for input in inputs {
                for (n, name) in dir_names(input, &a.text).into_iter().enumerate() {
                    let what = match a.text.len() {
                        0 | 1 => format!("the mask of {}", input.display()),
                        _ => format!("the mask of {} for --text {:?}", input.display(), a.text[n]),
                    };
                    out.push((d.join(name), what));
                }
            }
        }
    }
    if let Some(j) = &a.json {
        out.push((j.clone(), "--json".into()));
    }
    if let Some(l) = &a.save_logits {
        out.push((l.clone(), "--save-logits".into()));
    }
    if let Some(j) = &a.shard.jsonl {
        out.push((j.clone(), "--jsonl".into()));
    }
    out
}

/// The inputs of this part ([`crate::shard::select`]) less, with `--skip-existing`, those whose
/// outputs all exist (each logged as skipped).
fn todo_inputs(
    inputs: Vec<PathBuf>,
    part: crate::shard::Part,
    output: &Output,
    a: &SegmentArgs,
    log: &mut crate::shard::Log,
) -> Result<Vec<PathBuf>> {
    let total = inputs.len();
    let mine = crate::shard::select(inputs, part);
    if part.count > 1 {
        eprintln!(
            "segvol: part {} of {} (0-based): {} of {total} inputs",
            part.id,
            part.count,
            mine.len()
        );
    }
    if !a.shard.skip_existing {
        return Ok(mine);
    }
    let mut todo = Vec::new();
    for input in mine {
        let files: Vec<PathBuf> = match output {
            Output::File(f) => vec![f.clone()],
            Output::Dir(d) => dir_names(&input, &a.text)
                .into_iter()
                .map(|n| d.join(n))
                .collect(),
        };
        if files.iter().all(|f| f.is_file()) {
            eprintln!("segvol: skipped {}: its outputs exist", input.display());
            log.skipped(&input, &files)?;
        } else {
            todo.push(input);
        }
    }
    Ok(todo)
}

/// The file names `--out-dir` gives one input: `<stem>_mask.nii.gz`, or with several texts
/// `<stem>_<slug of text>.nii.gz` each.
fn dir_names(input: &Path, texts: &[String]) -> Vec<String> {
    if texts.len() > 1 {
        texts
            .iter()
            .map(|t| format!("{}_{}.nii.gz", stem(input), slug(t)))
            .collect()
    } else {
        vec![format!("{}_mask.nii.gz", stem(input))]
    }
}

/// A path's canonical form and, when it exists, its (device, inode).
pub(crate) type FileId = (PathBuf, Option<(u64, u64)>);

/// A path's identity for collision checks: the canonical parent joined with the file name (the
/// file need not exist yet), and the device and inode when it exists (hard links).
pub(crate) fn identity(p: &Path) -> FileId {
    use std::os::unix::fs::MetadataExt;
    let parent = match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q,
        _ => Path::new("."),
    };
    let canon = match (parent.canonicalize(), p.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => p.to_path_buf(),
    };
    let inode = std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    (canon, inode)
}

pub(crate) fn same_file(a: &FileId, b: &FileId) -> bool {
    a.0 == b.0 || (a.1.is_some() && a.1 == b.1)
}

/// Refuses, before the model loads, every output that would overwrite an input or another
/// output (same canonical path or same inode), and every output whose directory is missing or
/// is not a directory: a bad output path must never cost a run, or the CT it was run on.
fn check_outputs(inputs: &[PathBuf], output: &Output, a: &SegmentArgs) -> Result<()> {
    if let Output::Dir(d) = output {
        if d.exists() && !d.is_dir() {
            return Err(Error::Usage(format!(
                "--out-dir {}: exists and is not a directory",
                d.display()
            )));
        }
    }
    let ins: Vec<_> = inputs.iter().map(|p| (p, identity(p))).collect();
    for (i, (p, ip)) in ins.iter().enumerate() {
        if let Some((q, _)) = ins[..i].iter().find(|(_, iq)| same_file(ip, iq)) {
            if matches!(output, Output::Dir(_)) {
                return Err(Error::Usage(format!(
                    "input {} is given twice (also as {}): its masks would overwrite each other",
                    p.display(),
                    q.display()
                )));
            }
        }
    }
    let outs = planned_outputs(inputs, output, a);
    let mut seen: Vec<(FileId, &str)> = Vec::new();
    let mut probed: Vec<PathBuf> = Vec::new();
    for (path, what) in &outs {
        let id = identity(path);
        if let Some((p, _)) = ins.iter().find(|(_, ip)| same_file(&id, ip)) {
            return Err(Error::Usage(format!(
                "{what} {}: is the input {} (refusing to overwrite it)",
                path.display(),
                p.display()
            )));
        }
        if let Some((_, other)) = seen.iter().find(|(s, _)| same_file(&id, s)) {
            return Err(Error::Usage(format!(
                "{what} and {other} would both write {}",
                path.display()
            )));
        }
        let in_out_dir = matches!(output, Output::Dir(d) if path.parent() == Some(d.as_path()));
        check_location(path, what, in_out_dir, &mut probed)?;
        seen.push((id, what.as_str()));
    }
    Ok(())
}

/// Refuses a file about to be written at `path` (`what` names it) when it is a directory or
/// its directory is missing or refuses new files. With `created` (a file of `--out-dir`, which
/// is created when missing) the nearest existing ancestor must accept them. `probed` lists the
/// directories already found writable.
pub(crate) fn check_location(
    path: &Path,
    what: &str,
    created: bool,
    probed: &mut Vec<PathBuf>,
) -> Result<()> {
    let parent = match path.parent() {
        Some(q) if !q.as_os_str().is_empty() => q,
        _ => Path::new("."),
    };
    let dir = if created {
        parent
            .ancestors()
            .find(|d| d.is_dir())
            .unwrap_or(Path::new("."))
    } else if parent.is_dir() {
        parent
    } else {
        return Err(Error::Usage(format!(
            "{what} {}: the directory {} does not exist",
            path.display(),
            parent.display()
        )));
    };
    if !probed.iter().any(|p| p == dir) {
        check_writable(dir).map_err(|e| {
            Error::Usage(format!(
                "{what} {}: cannot write in {}: {e}",
                path.display(),
                dir.display()
            ))
        })?;
        probed.push(dir.to_path_buf());
    }
    if path.is_dir() {
        return Err(Error::Usage(format!(
            "{what} {}: is a directory",
            path.display()
        )));
    }
    Ok(())
}

/// Whether files can be created in `dir`, by creating (and removing) one: permission bits do
/// not tell about read-only mounts, ACLs or a full inode table.
fn check_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".segvol-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

fn options(a: &SegmentArgs) -> Result<Options> {
    pipeline::plan::check_batch(a.batch)?;
    Ok(Options {
        batch: a.batch,
        zoom_in: !a.no_zoom_in,
        mem_limit: a.mem_limit.as_deref().map(parse_size).transpose()?,
    })
}

pub(crate) fn check_nifti_name(p: &Path) -> Result<()> {
    if is_nifti_name(p) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{}: the output must end in .nii.gz or .nii",
            p.display()
        )))
    }
}

/// Files as given; a directory contributes its `.nii` / `.nii.gz` files, sorted.
fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if inputs.is_empty() {
        return Err(Error::Usage("no input volume given".into()));
    }
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && is_nifti_name(f))
                .collect();
            if found.is_empty() {
                return Err(Error::Input(format!(
                    "{}: no .nii or .nii.gz file in this directory",
                    p.display()
                )));
            }
            found.sort();
            out.extend(found);
        } else {
            // A missing input is refused before the model loads, not after the others ran.
            std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The prompt flags, checked without a volume ([`VolumePrompts::parse`]).
fn prompts(a: &SegmentArgs) -> Result<VolumePrompts> {
    let units = if a.mm {
        Units::Millimetres
    } else {
        Units::Voxels
    };
    VolumePrompts::parse(
        &a.text,
        a.r#box.as_deref(),
        &a.point,
        &a.negative_point,
        units,
    )
}

/// A terminal progress line on stderr, only when stderr is a terminal.
fn progress_line(label: String) -> impl FnMut(usize, usize) {
    let tty = std::io::stderr().is_terminal();
    move |done, total| {
        if tty {
            let width = 30;
            let filled = done * width / total.max(1);
            eprint!(
                "\r{label}: zoom-in [{}{}] {done}/{total} windows",
                "=".repeat(filled),
                " ".repeat(width - filled)
            );
            if done == total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

/// The file name without `.nii` / `.nii.gz` (in any case).
fn stem(p: &Path) -> String {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lower = n.to_ascii_lowercase();
    let cut = [".nii.gz", ".nii"]
        .iter()
        .find(|e| lower.ends_with(*e))
        .map_or(0, |e| e.len());
    n[..n.len() - cut].to_string()
}

/// A NIfTI file name, by its extension in any case (`.nii`, `.nii.gz`, `.NII.GZ`).
fn is_nifti_name(p: &Path) -> bool {
    let n = p.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

/// A text as a file-name part: letters and digits of any script, lower-cased; everything else
/// (spaces, separators, punctuation) becomes `_`. Distinct names stay distinct unless they
/// differ only in case or punctuation, which `check_outputs` refuses as a collision.
fn slug(s: &str) -> String {
    s.trim()
        .chars()
        .flat_map(|c| {
            if c.is_alphanumeric() {
                c.to_lowercase().collect::<Vec<_>>()
            } else {
                vec!['_']
            }
        })
        .collect()
}

fn segment_file(
    model: &SegVol,
    input: &Path,
    output: &Output,
    a: &SegmentArgs,
    opts: &Options,
    spec: &VolumePrompts,
) -> Result<serde_json::Value> {
    let t_all = Instant::now();
    let vol = {
        let _r = segvol::backend::range(model.backend().as_ref(), "read");
        segvol::io::read_input(input)?
    };
    segment_volume(model, &vol, output, a, opts, spec, t_all)
}

fn segment_volume(
    model: &SegVol,
    vol: &Volume,
    output: &Output,
    a: &SegmentArgs,
    opts: &Options,
    spec: &VolumePrompts,
    t_all: Instant,
) -> Result<serde_json::Value> {
    let prompts = spec
        .resolve(vol.dims, vol.affine.as_ref())
        .map_err(|e| in_file(e, &vol.path))?;
    let label = vol
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut progress = progress_line(label);
    let mut identified = None;
    let out = if a.identify {
        // A session: the spatial prompt's windows are encoded once and every candidate reuses
        // them (decoder passes only).
        let request = pipeline::plan::Request {
            cache_bytes: IDENTIFY_CACHE,
            ..pipeline::plan::Request::for_prompts(&prompts, |t| model.token_count(t))?
        };
        let session = pipeline::Session::open(model, &vol.data, vol.model_dims(), request, opts)
            .map_err(|e| in_file(e, &vol.path))?;
        let p = session
            .segment(&prompts[0], &mut progress)
            .map_err(|e| in_file(e, &vol.path))?;
        let candidates = candidate_names(a.candidates.as_deref())?;
        identified = Some(
            session
                .identify(&prompts[0], &candidates)
                .map_err(|e| in_file(e, &vol.path))?,
        );
        session.outcome(vec![p])
    } else {
        pipeline::segment(
            model,
            &vol.data,
            vol.model_dims(),
            &prompts,
            opts,
            &mut progress,
        )
        .map_err(|e| in_file(e, &vol.path))?
    };
    let t_write = Instant::now();
    let write_range = segvol::backend::range(model.backend().as_ref(), "write");
    let files = write_outputs(vol, &out, output, &prompts)?;
    if let Some(path) = &a.save_logits {
        save_logits(path, &out)?;
    }
    drop(write_range);
    let write_seconds = t_write.elapsed().as_secs_f64();
    let mut report = report(
        vol,
        &out,
        &files,
        write_seconds,
        t_all.elapsed().as_secs_f64(),
    );
    print_summary(vol, &out, &files, write_seconds);
    if let Some(id) = identified {
        for (rank, (name, score, share)) in id.ranked.iter().take(5).enumerate() {
            eprintln!(
                "segvol: identify #{}: {name} (score {score:.4}, share {:.1}%)",
                rank + 1,
                100.0 * share
            );
        }
        report["identify"] = json!(id
            .ranked
            .iter()
            .map(|(n, s, sh)| json!([n, s, sh]))
            .collect::<Vec<_>>());
    }
    Ok(report)
}

/// Device memory `--identify` keeps for the spatial prompt's window embeddings.
const IDENTIFY_CACHE: usize = 1 << 30;

/// Candidate names: one per line of `file` (blank lines and `#` comments skipped), else the
/// defaults.
fn candidate_names(file: Option<&Path>) -> Result<Vec<String>> {
    let Some(f) = file else {
        return Ok(pipeline::DEFAULT_CANDIDATES
            .iter()
            .map(|s| s.to_string())
            .collect());
    };
    let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
    if !meta.is_file() || meta.len() > 1 << 20 {
        return Err(Error::Input(format!(
            "--candidates {}: expected a text file of at most 1 MiB, one name per line",
            f.display()
        )));
    }
    let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(Error::Input(format!(
            "--candidates {}: no names in the file",
            f.display()
        )));
    }
    Ok(names)
}

/// Names the file in faults of its content (no foreground, a prompt outside it, ...).
fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Input(m) => Error::Input(format!("{}: {m}", path.display())),
        Error::Prompt(m) => Error::Prompt(format!("{}: {m}", path.display())),
        other => other,
    }
}

fn write_outputs(
    vol: &Volume,
    out: &VolumeOutcome,
    output: &Output,
    prompts: &[UserPrompt],
) -> Result<Vec<PathBuf>> {
    match output {
        Output::File(f) => {
            if out.prompts.len() == 1 {
                nifti::write_mask(f, vol, &out.mask(0))?;
            } else {
                nifti::write_label_map(f, vol, &out.label_map(), &label_names(prompts))?;
            }
            Ok(vec![f.clone()])
        }
        Output::Dir(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            let mut files = Vec::new();
            let texts: Vec<String> = prompts.iter().filter_map(|p| p.text.clone()).collect();
            for (i, name) in dir_names(&vol.path, &texts).into_iter().enumerate() {
                let f = d.join(name);
                nifti::write_mask(&f, vol, &out.mask(i))?;
                files.push(f);
            }
            Ok(files)
        }
    }
}

/// The name of each label of a label map (value n = prompt n-1): the text, or "prompt n".
fn label_names(prompts: &[UserPrompt]) -> Vec<String> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.text
                .clone()
                .unwrap_or_else(|| format!("prompt {}", i + 1))
        })
        .collect()
}

fn save_logits(path: &Path, out: &VolumeOutcome) -> Result<()> {
    let cd = out.cropped_dims.to_vec();
    let mut tensors = Vec::new();
    for (i, p) in out.prompts.iter().enumerate() {
        let suffix = if out.prompts.len() > 1 {
            format!("_{i}")
        } else {
            String::new()
        };
        tensors.push((
            format!("final_logits{suffix}"),
            segvol::tensor::HostTensor::new(cd.clone(), p.logits.clone()),
        ));
        let [d, h, w] = out.window;
        tensors.push((
            format!("zoom_out_logits{suffix}"),
            segvol::tensor::HostTensor::new(vec![1, 1, d, h, w], p.zoom_out_logits.clone()),
        ));
    }
    let refs: Vec<(&str, &segvol::tensor::HostTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    segvol::tensor::write_safetensors(path, &refs)
}

pub(crate) fn voxel_ml(vol: &Volume) -> f64 {
    vol.spacing.iter().map(|&s| s.abs() as f64).product::<f64>() / 1000.0
}

fn report(
    vol: &Volume,
    out: &VolumeOutcome,
    files: &[PathBuf],
    write_s: f64,
    total_s: f64,
) -> serde_json::Value {
    let ml = voxel_ml(vol);
    let prompts: Vec<_> = out
        .prompts
        .iter()
        .map(|p| {
            json!({
                "text": p.prompt.text,
                "box_ijk": p.prompt.bbox,
                "points_ijk": p.prompt.points,
                "points_positive": p.prompt.positive,
                "zoom_out_box_dhw": p.zoom_out_box,
                "zoom_out_points_dhw": p.zoom_out_points,
                "voxels": p.voxels,
                "volume_ml": p.voxels as f64 * ml,
                "roi": p.roi.map(|r| json!({"official_bounds_dhw": r.bounds, "start_dhw": r.start, "shape_dhw": r.shape})),
                "pad_before_dhw": p.pad_before,
                "window_count": p.windows.len(),
                "windows": p.windows.iter().map(|w| json!({"padded_roi_range": w.padded_range, "box": w.bbox, "points": w.points})).collect::<Vec<_>>(),
                "seconds": {"zoom_out": p.zoom_out_seconds, "zoom_in": p.zoom_in_seconds},
            })
        })
        .collect();
    let zoom_out: f64 =
        out.zoom_out_encode_seconds + out.prompts.iter().map(|p| p.zoom_out_seconds).sum::<f64>();
    let zoom_in: f64 = out.prompts.iter().map(|p| p.zoom_in_seconds).sum();
    // The values of a label map (several prompts into one --out file), as in its header extension.
    let labels = if out.prompts.len() > 1 {
        let names: Vec<UserPrompt> = out.prompts.iter().map(|p| p.prompt.clone()).collect();
        let map: serde_json::Map<String, serde_json::Value> = label_names(&names)
            .into_iter()
            .enumerate()
            .map(|(i, n)| ((i + 1).to_string(), json!(n)))
            .collect();
        serde_json::Value::Object(map)
    } else {
        serde_json::Value::Null
    };
    json!({
        "input": vol.path,
        "outputs": files,
        "dims_ijk": vol.dims,
        "spacing": vol.spacing,
        "crop": {"start_dhw": out.crop_start, "end_dhw": out.crop_end, "shape_dhw": out.cropped_dims},
        "normalization": {
            "threshold_mean": out.norm.stats.threshold, "num_voxels_above_threshold": out.norm.stats.count,
            "p0_05": out.norm.stats.p_lo, "p99_95": out.norm.stats.p_hi,
            "mean_above": out.norm.stats.mean, "std_above": out.norm.stats.std,
        },
        "window_batch": out.batch,
        "memory": {"arena_bytes": out.arena_bytes, "volume_region_bytes": out.volume_region_bytes, "arena_growths": out.arena_growths},
        "labels": labels,
        "prompts": prompts,
        "seconds": {"read": vol.read_seconds, "preprocess": out.preprocess_seconds, "zoom_out": zoom_out, "zoom_in": zoom_in, "write": write_s, "total": total_s},
    })
}

fn print_summary(vol: &Volume, out: &VolumeOutcome, files: &[PathBuf], write_s: f64) {
    let ml = voxel_ml(vol);
    for p in &out.prompts {
        let roi = p
            .roi
            .map_or("none (zoom-out found no foreground)".to_string(), |r| {
                format!("{:?} at {:?}", r.shape, r.start)
            });
        eprintln!(
            "segvol: {}: {}: {} voxels ({:.1} mL), ROI {roi}, {} windows",
            vol.path.display(),
            p.prompt.describe(),
            p.voxels,
            p.voxels as f64 * ml,
            p.windows.len()
        );
    }
    let zoom_out: f64 =
        out.zoom_out_encode_seconds + out.prompts.iter().map(|p| p.zoom_out_seconds).sum::<f64>();
    let zoom_in: f64 = out.prompts.iter().map(|p| p.zoom_in_seconds).sum();
    eprintln!(
        "segvol: times: read {:.2} s, preprocess {:.2} s, zoom-out {:.2} s, zoom-in {:.2} s, write {:.2} s",
        vol.read_seconds, out.preprocess_seconds, zoom_out, zoom_in, write_s
    );
    for f in files {
        eprintln!("segvol: wrote {}", f.display());
    }
}

fn write_report(path: Option<&Path>, report: &serde_json::Value) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::Internal(e.to_string()))?;
    segvol::io::write_atomic(path, text.as_bytes())
}

/// `--demo`: the bundled CT, full-size segvol-random-v1 weights generated in memory, "liver".
fn demo(mut a: SegmentArgs) -> Result<()> {
    eprintln!("segvol demo: the weights are RANDOM (segvol-random-v1, seed {DEMO_SEED}), so the mask is meaningless;");
    eprintln!("             it exercises the whole pipeline at full size. Use --model with the released SegVol weights for real masks.");
    if a.text.is_empty() && a.r#box.is_none() && a.point.is_empty() {
        a.text = vec!["liver".into()];
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("segvol-demo-mask.nii.gz"));
    check_nifti_name(&out)?;
    let opts = options(&a)?;
    let spec = prompts(&a)?;
    let t0 = Instant::now();
    let cfg = segvol::ModelConfig::full();
    let store = segvol::weights::WeightStore::random(&cfg, DEMO_SEED);
    let tokenizer = segvol::tokenizer::TextTokenizer::for_model_dir(
        None,
        &cfg.text_template,
        cfg.text.max_positions,
    )?;
    let model = SegVol::new(cfg, Arc::new(store), tokenizer, a.device.open()?)?;
    eprintln!(
        "segvol demo: generated full-size weights on {} in {:.1} s",
        model.backend().name(),
        t0.elapsed().as_secs_f64()
    );
    let t_all = Instant::now();
    let vol = nifti::read_volume_bytes(
        DEMO_CT.to_vec(),
        Path::new("example_ct_sm.nii.gz (bundled)"),
    )?;
    let report = segment_volume(&model, &vol, &Output::File(out), &a, &opts, &spec, t_all)?;
    write_report(a.json.as_deref(), &report)
}
