//! MONAI Label infer `params` to SegVol prompts (../shared/docs/client-protocols.md §B.2-B.3,
//! read against the Slicer module's `onClickDeepgrow` and `getROIPointsXYZ`).
//!
//! - `label` (the segment's name) is the text prompt. Slicer's default names `Segment_N`
//!   carry no meaning and give no text prompt; an empty label neither.
//! - `foreground` / `background`: `[[i,j,k], ...]`, IJK voxel indices of the uploaded image
//!   (Slicer rounds RASToIJK), become positive / negative points, positives first (the order
//!   `segvol segment --point ... --negative-point ...` gives them). A point outside the image
//!   is refused.
//! - `roi`: `[i0,i1,j0,j1,k0,k1]`, the IJK images of the ROI node's min and max RAS corners,
//!   rounded. On an image whose axes run against RAS (every LPS-stored CT) a "min" corner can
//!   be the larger index, so each axis is sorted; both ends are inclusive (SegVol's box
//!   convention, `io::prompt`), and the box is clipped to the image (a Slicer ROI may reach
//!   past it). A box entirely outside the image is refused.
//! - `result_extension`: `.nrrd` (default, what Slicer asks for), `.nii.gz` or `.nii`;
//!   `result_dtype`: `uint8` (the only type a binary mask needs).
//! - Every other key (`client_id`, `reset_state`, `slice`, model config keys) is accepted and
//!   ignored, as MONAI Label's server passes unknown keys to its tasks.

use segvol::config::describe;
use segvol::error::clip;
use segvol::io::prompt::{Coords, Units, VolumePrompts};
use serde_json::Value;

/// The result file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultFormat {
    Nrrd,
    NiftiGz,
    Nifti,
}

impl ResultFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ResultFormat::Nrrd => ".nrrd",
            ResultFormat::NiftiGz => ".nii.gz",
            ResultFormat::Nifti => ".nii",
        }
    }
}

/// An infer request's prompt and reply format.
#[derive(Clone, Debug)]
pub struct InferParams {
    pub prompts: VolumePrompts,
    pub format: ResultFormat,
    /// What the log line lists: `text`, `points`, `box`.
    pub kinds: Vec<&'static str>,
    /// The text prompt, if any (the reply's `label_names`).
    pub text: Option<String>,
}

/// Whether `s` is one of Slicer's default segment names (`Segment_1`, `Segment_2`, ...).
fn default_segment_name(s: &str) -> bool {
    s.strip_prefix("Segment_")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses the `params` JSON of an infer request for an image of `dims` (i,j,k) voxels.
/// Errors name the field and value at fault.
pub fn parse(raw: &str, dims: [usize; 3]) -> Result<InferParams, String> {
    let v: Value = if raw.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_str(raw).map_err(|e| format!("params: not valid JSON: {e}"))?
    };
    let obj = v
        .as_object()
        .ok_or_else(|| format!("params: expected a JSON object, found {}", describe(&v)))?;
    let field = |k: &str| obj.get(k).filter(|x| !x.is_null());
    let mut kinds = Vec::new();
    let text = match field("label") {
        None => None,
        Some(Value::String(s)) => {
            let t = s.trim();
            if t.is_empty() || default_segment_name(t) {
                None
            } else {
                Some(t.to_string())
            }
        }
        Some(other) => {
            return Err(format!(
                "params: `label` must be a string (the segment name), found {}",
                describe(other)
            ))
        }
    };
    if text.is_some() {
        kinds.push("text");
    }
    let mut points = Vec::new();
    for (key, positive) in [("foreground", true), ("background", false)] {
        let list = match field(key) {
            None => continue,
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(format!(
                    "params: `{key}` must be an array of [i,j,k] points, found {}",
                    describe(other)
                ))
            }
        };
        for (n, p) in list.iter().enumerate() {
            let ijk = index_triple(p).ok_or_else(|| {
                format!(
                    "params: {key}[{n}] = {}: expected [i,j,k], three integer voxel indices",
                    clip(&p.to_string())
                )
            })?;
            if (0..3).any(|a| ijk[a] < 0 || ijk[a] >= dims[a] as i64) {
                return Err(format!(
                    "params: {key}[{n}] = [{},{},{}] lies outside the image of {}x{}x{} voxels (i,j,k)",
                    ijk[0], ijk[1], ijk[2], dims[0], dims[1], dims[2]
                ));
            }
            points.push((Coords::new(ijk.map(|x| x as f64)), positive));
        }
    }
    if !points.is_empty() {
        kinds.push("points");
    }
    let bbox = match field("roi") {
        None => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(r) => {
            let vals: Option<Vec<i64>> = r
                .as_array()
                .filter(|a| a.len() == 6)
                .and_then(|a| a.iter().map(integer).collect());
            let v = vals.ok_or_else(|| {
                format!(
                    "params: roi = {}: expected [i0,i1,j0,j1,k0,k1], six integer voxel indices",
                    clip(&r.to_string())
                )
            })?;
            let mut lo = [0f64; 3];
            let mut hi = [0f64; 3];
            for a in 0..3 {
                let (x0, x1) = (v[2 * a].min(v[2 * a + 1]), v[2 * a].max(v[2 * a + 1]));
                let last = dims[a] as i64 - 1;
                if x1 < 0 || x0 > last {
                    return Err(format!(
                        "params: roi = {}: lies outside the image of {}x{}x{} voxels (i,j,k) on axis {}",
                        clip(&r.to_string()),
                        dims[0],
                        dims[1],
                        dims[2],
                        ["i", "j", "k"][a]
                    ));
                }
                lo[a] = x0.max(0) as f64;
                hi[a] = x1.min(last) as f64;
            }
            kinds.push("box");
            Some(Coords::new([lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]]))
        }
    };
    let format = match field("result_extension") {
        None => ResultFormat::Nrrd,
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            ".nrrd" | "nrrd" => ResultFormat::Nrrd,
            ".nii.gz" | "nii.gz" => ResultFormat::NiftiGz,
            ".nii" | "nii" => ResultFormat::Nifti,
            _ => {
                return Err(format!(
                    "params: result_extension `{}` is not supported (.nrrd, .nii.gz, .nii)",
                    clip(s)
                ))
            }
        },
        Some(other) => {
            return Err(format!(
                "params: `result_extension` must be a string, found {}",
                describe(other)
            ))
        }
    };
    match field("result_dtype") {
        None => {}
        Some(Value::String(s)) if s == "uint8" => {}
        Some(other) => {
            return Err(format!(
                "params: result_dtype {}: only uint8 is written (a binary mask)",
                clip(&other.to_string())
            ))
        }
    }
    let prompts = VolumePrompts {
        texts: text.iter().cloned().collect(),
        bbox,
        points,
        units: Units::Voxels,
    }
    .checked()
    .map_err(|e| match e {
        segvol::Error::Prompt(m) if m.starts_with("no prompt") => {
            "params: no prompt: give a label (the segment name), foreground/background points or an roi".to_string()
        }
        other => format!("params: {other}"),
    })?;
    Ok(InferParams {
        prompts,
        format,
        kinds,
        text,
    })
}

/// An integer-valued JSON number.
fn integer(v: &Value) -> Option<i64> {
    let f = v.as_f64()?;
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15).then_some(f as i64)
}

fn index_triple(v: &Value) -> Option<[i64; 3]> {
    let a = v.as_array().filter(|a| a.len() == 3)?;
    Some([integer(&a[0])?, integer(&a[1])?, integer(&a[2])?])
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: [usize; 3] = [64, 48, 20];

    #[test]
    fn slicer_deepgrow_params() {
        let p = parse(
            r#"{"label":"liver","foreground":[[10,20,5],[11,21,6]],"background":[[1,2,3]],
                "roi":[40,5,30,2,0,99],"result_extension":".nrrd","result_dtype":"uint8",
                "client_id":"user-xyz","reset_state":false}"#,
            DIMS,
        )
        .unwrap();
        assert_eq!(p.text.as_deref(), Some("liver"));
        assert_eq!(p.format, ResultFormat::Nrrd);
        assert_eq!(p.kinds, vec!["text", "points", "box"]);
        let b = p.prompts.bbox.unwrap().values;
        // Sorted per axis, clipped to the image (k up to 19).
        assert_eq!(b, [5.0, 2.0, 0.0, 40.0, 30.0, 19.0]);
        let signs: Vec<bool> = p.prompts.points.iter().map(|(_, s)| *s).collect();
        assert_eq!(signs, vec![true, true, false]);
    }

    #[test]
    fn default_segment_names_are_no_text() {
        let p = parse(r#"{"label":"Segment_3","foreground":[[1,1,1]]}"#, DIMS).unwrap();
        assert!(p.text.is_none());
        assert!(parse(r#"{"label":"Segment_1"}"#, DIMS)
            .unwrap_err()
            .contains("no prompt"));
        assert_eq!(
            parse(r#"{"label":"Segment_x"}"#, DIMS)
                .unwrap()
                .text
                .as_deref(),
            Some("Segment_x")
        );
    }

    #[test]
    fn faults_are_named() {
        let cases = [
            ("{not json", "not valid JSON"),
            ("[1,2]", "expected a JSON object"),
            (r#"{"label":3}"#, "`label` must be a string"),
            (
                r#"{"foreground":[[64,0,0]]}"#,
                "foreground[0] = [64,0,0] lies outside",
            ),
            (
                r#"{"background":[[-1,0,0]]}"#,
                "background[0] = [-1,0,0] lies outside",
            ),
            (r#"{"foreground":[[1.5,0,0]]}"#, "foreground[0]"),
            (r#"{"foreground":"x"}"#, "`foreground` must be an array"),
            (r#"{"roi":[1,2,3]}"#, "roi = [1,2,3]"),
            (r#"{"roi":[100,120,0,4,0,4]}"#, "outside the image"),
            (
                r#"{"label":"liver","result_extension":".png"}"#,
                "result_extension `.png`",
            ),
            (
                r#"{"label":"liver","result_dtype":"float32"}"#,
                "result_dtype",
            ),
            ("{}", "no prompt"),
        ];
        for (raw, want) in cases {
            let e = parse(raw, DIMS).unwrap_err();
            assert!(e.contains(want), "{raw}: {e}");
        }
    }
}
