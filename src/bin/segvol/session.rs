//! `segvol session`: one process, one volume, many prompts. The volume is read, normalised,
//! cropped and its zoom-out window encoded once ([`segvol::pipeline::Session`]); then each
//! JSON line on stdin is one prompt and gets one JSON line on stdout. A bad request gets
//! `{"ok": false, "error": ...}` and the session goes on.
//!
//! Request (every field optional, at least one prompt): `{"text": "liver", "box":
//! [i0,j0,k0,i1,j1,k1], "points": [[i,j,k], ...], "labels": [1, 0, ...], "mm": false,
//! "keep_roi": false, "identify": false, "out": "mask.nii.gz"}`. `identify` (`true` for the
//! default candidates, or a list of names) ranks what a spatial prompt segments
//! ([`Session::identify`]): the reply holds `"identify": [[name, score, share], ...]`, best
//! first. `keep_roi` refines inside the previous ROI
//! ([`PromptOptions::keep_roi`], a documented departure). Coordinates are file voxel indices, or world millimetres with `"mm": true`,
//! by the rules of `segment` (`segvol::io::prompt`).
//!
//! Response: `{"ok": true, "voxels", "ml", "roi", "windows", "cached_windows", "roi_kept",
//! "seconds", "out"}`. Zoom-in image embeddings are kept per ROI within `--cache` bytes, so a prompt on
//! an ROI seen before skips those encoder passes, with bit-identical results.

use crate::segment::{check_location, check_nifti_name, identity, same_file, voxel_ml};
use crate::DeviceArgs;
use clap::Args;
use segvol::config::describe;
use segvol::error::{clip, Error, Result};
use segvol::io::nifti::{self, Volume};
use segvol::io::prompt::{json_numbers, Coords, Units, VolumePrompts};
use segvol::pipeline::{self, plan::parse_size, Options, PromptOptions, Session};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The longest request line read; a longer one is refused (and skipped) without being held.
const MAX_LINE: usize = 1 << 20;
/// Points the session's arena is planned for up front; a prompt with more grows it once.
const PLANNED_POINTS: usize = 16;

#[derive(Args)]
pub struct SessionArgs {
    /// The CT volume (.nii, .nii.gz).
    input: PathBuf,
    /// Model directory (Hugging Face layout) or weights file.
    #[arg(long)]
    model: PathBuf,
    /// Windows per model call in the zoom-in.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Memory budget for the device (e.g. 40G).
    #[arg(long)]
    mem_limit: Option<String>,
    /// Device memory for zoom-in image embeddings kept between prompts (e.g. 2G; 0: none). A
    /// prompt whose ROI was seen before skips those encoder passes; results are unchanged.
    #[arg(long, default_value = "1G")]
    cache: String,
    /// Stop each prompt after the zoom-out (no sliding windows).
    #[arg(long)]
    no_zoom_in: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: SessionArgs) -> Result<()> {
    pipeline::plan::check_batch(a.batch)?;
    let opts = Options {
        batch: a.batch,
        zoom_in: !a.no_zoom_in,
        mem_limit: a.mem_limit.as_deref().map(parse_size).transpose()?,
    };
    let t0 = Instant::now();
    let vol = segvol::io::read_input(&a.input)?;
    let model = crate::load_model(&a.model, &a.device)?;
    let cfg = model.config();
    // Planned for a text of the longest the tokenizer allows and PLANNED_POINTS points.
    let request = pipeline::plan::Request {
        prompts: 1,
        shares_budget: false,
        sparse_tokens: PLANNED_POINTS + 3,
        text_tokens: cfg.text.max_positions,
        cache_bytes: parse_size(&a.cache)?,
    };
    let session = Session::open(&model, &vol.data, vol.model_dims(), request, &opts)?;
    eprintln!(
        "segvol session: {} open on {} in {:.1} s; one JSON request per line on stdin",
        vol.path.display(),
        model.backend().name(),
        t0.elapsed().as_secs_f64()
    );
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = std::io::Read::take(&mut input, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("<stdin>", e))?;
        if n == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE && !line.ends_with(b"\n") {
            // Skip the rest of the overlong line, holding at most MAX_LINE of it.
            loop {
                line.clear();
                let m = std::io::Read::take(&mut input, MAX_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .map_err(|e| Error::io("<stdin>", e))?;
                if m == 0 || line.ends_with(b"\n") {
                    break;
                }
            }
            failure(&Error::Usage(format!(
                "request: a line longer than {MAX_LINE} bytes"
            )))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            match handle(&session, &vol, &a.input, &line) {
                Ok(v) => v,
                Err(e) => failure(&e),
            }
        };
        let mut out = stdout.lock();
        writeln!(out, "{reply}")
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("<stdout>", e))?;
    }
}

fn failure(e: &Error) -> Value {
    json!({"ok": false, "error": e.to_string(), "exit_code": e.exit_code()})
}

/// One request line to one response.
fn handle(session: &Session<'_>, vol: &Volume, input: &Path, line: &[u8]) -> Result<Value> {
    let t0 = Instant::now();
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| Error::Usage(format!("request: not valid JSON: {e}")))?;
    let (prompts, popts, out) = parse_request(&v)?;
    let identify = identify_candidates(&v)?;
    if identify.is_some() && out.is_some() {
        return Err(Error::Usage(
            "request: `identify` ranks names and writes no mask: drop `out`".into(),
        ));
    }
    if let Some(o) = &out {
        check_out(o, input)?;
    }
    let user = prompts
        .resolve(vol.dims, vol.affine.as_ref())?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Internal("a request resolved to no prompt".into()))?;
    if let Some(candidates) = identify {
        let id = session.identify(&user, &candidates)?;
        let ranked: Vec<Value> = id
            .ranked
            .iter()
            .map(|(name, score, share)| json!([name, score, share]))
            .collect();
        return Ok(json!({
            "ok": true,
            "voxels": id.mask_voxels,
            "ml": id.mask_voxels as f64 * voxel_ml(vol),
            "identify": ranked,
            "seconds": {"total": t0.elapsed().as_secs_f64()},
        }));
    }
    let p = session.segment_with(&user, popts, &mut |_, _| {})?;
    let (voxels, roi, windows, cached) = (p.voxels, p.roi, p.windows.len(), p.cached_windows);
    let roi_kept = p.roi_kept;
    let (zoom_out, zoom_in) = (p.zoom_out_seconds, p.zoom_in_seconds);
    let t_write = Instant::now();
    if let Some(o) = &out {
        let outcome = session.outcome(vec![p]);
        nifti::write_mask(o, vol, &outcome.mask(0))?;
    }
    Ok(json!({
        "ok": true,
        "voxels": voxels,
        "ml": voxels as f64 * voxel_ml(vol),
        "roi": roi.map(|r| json!({"start_dhw": r.start, "shape_dhw": r.shape})),
        "windows": windows,
        "cached_windows": cached,
        "roi_kept": roi_kept,
        "seconds": {
            "zoom_out": zoom_out,
            "zoom_in": zoom_in,
            "write": t_write.elapsed().as_secs_f64(),
            "total": t0.elapsed().as_secs_f64(),
        },
        "out": out,
    }))
}

/// `identify`: absent, `true` (the default candidates) or an array of names.
fn identify_candidates(v: &Value) -> Result<Option<Vec<String>>> {
    match v.get("identify") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(
            pipeline::DEFAULT_CANDIDATES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, n)| match n {
                Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                other => Err(Error::Prompt(format!(
                    "request: identify[{i}] must be a category name, found {}",
                    describe(other)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(Error::Prompt(format!(
            "request: `identify` must be true or an array of names, found {}",
            describe(other)
        ))),
    }
}

/// The request's prompt and output path, every field checked and named in errors.
fn parse_request(v: &Value) -> Result<(VolumePrompts, PromptOptions, Option<PathBuf>)> {
    let obj = v.as_object().ok_or_else(|| {
        Error::Usage(format!(
            "request: expected a JSON object, found {}",
            describe(v)
        ))
    })?;
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "text" | "box" | "points" | "labels" | "mm" | "out" | "keep_roi" | "identify"
        ) {
            return Err(Error::Usage(format!(
                "request: unknown field `{}` (expected text, box, points, labels, mm, out, keep_roi, identify)",
                clip(key)
            )));
        }
    }
    let field = |k: &str| obj.get(k).filter(|x| !x.is_null());
    let texts = match field("text") {
        None => vec![],
        Some(Value::String(t)) => vec![t.clone()],
        Some(other) => {
            return Err(Error::Prompt(format!(
                "request: `text` must be a string, found {}",
                describe(other)
            )))
        }
    };
    let bbox = field("box")
        .map(|b| numbers::<6>(b, "box").map(Coords::new))
        .transpose()?;
    let points: Vec<[f64; 3]> = match field("points") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, q)| numbers::<3>(q, &format!("points[{i}]")))
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::Prompt(format!(
                "request: `points` must be an array of [i,j,k], found {}",
                describe(other)
            )))
        }
    };
    let labels: Vec<bool> = match field("labels") {
        // Points without labels are positive clicks.
        None => vec![true; points.len()],
        Some(Value::Array(a)) if a.len() == points.len() => a
            .iter()
            .enumerate()
            .map(|(i, l)| match l.as_f64() {
                Some(1.0) => Ok(true),
                Some(0.0) => Ok(false),
                _ => Err(Error::Prompt(format!(
                    "request: labels[{i}] = {}: a label is 1 (positive) or 0 (negative)",
                    describe(l)
                ))),
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::Prompt(format!(
                "request: `labels` must be an array of {} labels (one per point), found {}",
                points.len(),
                describe(other)
            )))
        }
    };
    let units = match field("mm") {
        None | Some(Value::Bool(false)) => Units::Voxels,
        Some(Value::Bool(true)) => Units::Millimetres,
        Some(other) => {
            return Err(Error::Prompt(format!(
                "request: `mm` must be true or false, found {}",
                describe(other)
            )))
        }
    };
    let keep_roi = match field("keep_roi") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(Error::Prompt(format!(
                "request: `keep_roi` must be true or false, found {}",
                describe(other)
            )))
        }
    };
    let out = match field("out") {
        None => None,
        Some(Value::String(s)) => Some(PathBuf::from(s)),
        Some(other) => {
            return Err(Error::Prompt(format!(
                "request: `out` must be a file path, found {}",
                describe(other)
            )))
        }
    };
    let prompts = VolumePrompts {
        texts,
        bbox,
        points: points
            .into_iter()
            .zip(labels)
            .map(|(p, l)| (Coords::new(p), l))
            .collect(),
        units,
    }
    .checked()?;
    Ok((prompts, PromptOptions { keep_roi }, out))
}

/// `N` finite numbers ([`segvol::io::prompt::json_numbers`], the window prompt's rule).
fn numbers<const N: usize>(v: &Value, what: &str) -> Result<[f64; N]> {
    let vals = json_numbers(v, N, what)?;
    vals.try_into()
        .map_err(|_| Error::Internal(format!("`{what}`: not {N} numbers after checking")))
}

/// An output path: a NIfTI name, not the input, in an existing writable directory.
fn check_out(out: &Path, input: &Path) -> Result<()> {
    check_nifti_name(out)?;
    if same_file(&identity(out), &identity(input)) {
        return Err(Error::Usage(format!(
            "out {}: is the input (refusing to overwrite it)",
            out.display()
        )));
    }
    check_location(out, "out", false, &mut Vec::new())
}
