//! Prompts as users write them, checked before any model work.
//!
//! - Volume prompts ([`VolumePrompts`], `segvol segment`): texts, a box `i0,j0,k0,i1,j1,k1` and
//!   points `i,j,k` in the file's voxel indices, or in world millimetres (DESIGN.md,
//!   "Coordinates and conventions"), resolved against a volume's size and affine into the
//!   pipeline's [`UserPrompt`]s (spec §6).
//! - Window prompt files (`segvol window`): `{"text": "liver", "box": [d0,h0,w0,d1,h1,w1],
//!   "points": [[d,h,w], ...], "labels": [1, 0, ...]}` in window voxel coordinates. Every field
//!   is optional; at least one prompt is required.
//!
//! One rule for boxes everywhere: corners are inclusive and given min first, in the
//! coordinates they are written in; a box whose first corner exceeds its second on an axis is
//! refused, never swapped. (Millimetre corners are sorted after they become voxels, since a
//! flipped axis of the affine reverses their order.)

use super::coords::{self, Affine};
use crate::config::describe;
use crate::error::{clip, num, Error, Result};
use crate::model::WindowPrompt;
use crate::pipeline::UserPrompt;
use serde_json::Value;
use std::path::Path;

/// The coordinates volume prompts are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    /// The file's voxel indices (i,j,k): non-negative integers.
    Voxels,
    /// World millimetres, through the volume's affine to the nearest voxel.
    Millimetres,
}

/// N coordinates as written: the numbers and the text they came from (for messages).
#[derive(Clone, Debug, PartialEq)]
pub struct Coords<const N: usize> {
    pub values: [f64; N],
    pub given: String,
}

impl<const N: usize> Coords<N> {
    /// Coordinates given as numbers; `given` is how messages write them.
    pub fn new(values: [f64; N]) -> Self {
        let given = values.map(|v| v.to_string()).join(",");
        Coords { values, given }
    }

    /// Parses `N` comma-separated finite numbers; `field` names the prompt in errors.
    pub fn parse(s: &str, field: &str) -> Result<Self> {
        let bad = || {
            Error::Prompt(format!(
                "{field} {}: expected {N} comma-separated numbers",
                clip(s)
            ))
        };
        let vals: Vec<f64> = s
            .split(',')
            .map(|v| v.trim().parse::<f64>().ok().filter(|f| f.is_finite()))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        Ok(Coords {
            values: vals.try_into().map_err(|_| bad())?,
            given: s.trim().to_string(),
        })
    }
}

/// Volume prompts as written, checked for everything that does not need the volume: one model
/// prompt per text (or one without text), each with the same box and points.
#[derive(Clone, Debug)]
pub struct VolumePrompts {
    pub texts: Vec<String>,
    pub bbox: Option<Coords<6>>,
    /// Points with their sign (true = positive).
    pub points: Vec<(Coords<3>, bool)>,
    pub units: Units,
}

impl VolumePrompts {
    /// Parses and checks prompt strings: non-empty texts, six box and three point numbers,
    /// voxel indices that are non-negative integers, box corners min first.
    pub fn parse(
        texts: &[String],
        bbox: Option<&str>,
        points: &[String],
        negative_points: &[String],
        units: Units,
    ) -> Result<Self> {
        let bbox = bbox.map(|s| Coords::<6>::parse(s, "box")).transpose()?;
        let mut pts = Vec::new();
        for p in points {
            pts.push((Coords::<3>::parse(p, "point")?, true));
        }
        for p in negative_points {
            pts.push((Coords::<3>::parse(p, "negative point")?, false));
        }
        VolumePrompts {
            texts: texts.to_vec(),
            bbox,
            points: pts,
            units,
        }
        .checked()
    }

    /// Checks prompts built from numbers (a JSON request, a library caller) by the rules of
    /// [`VolumePrompts::parse`].
    pub fn checked(self) -> Result<Self> {
        let p = self;
        for t in &p.texts {
            if t.trim().is_empty() {
                return Err(Error::Prompt("text is empty".into()));
            }
        }
        if p.texts.is_empty() && p.bbox.is_none() && p.points.is_empty() {
            return Err(Error::Prompt(
                "no prompt: give a text, a box or a point".into(),
            ));
        }
        let units = p.units;
        if units == Units::Voxels {
            if let Some(b) = &p.bbox {
                check_indices(&b.values, "box", &b.given)?;
            }
            for (c, pos) in &p.points {
                check_indices(&c.values, point_field(*pos), &c.given)?;
            }
        }
        if let Some(b) = &p.bbox {
            let v = b.values;
            if let Some(a) = (0..3).find(|&a| v[a] > v[a + 3]) {
                return Err(Error::Prompt(format!(
                    "box {}: the first corner exceeds the second on axis {} (give the min \
                     corner first)",
                    clip(&b.given),
                    AXES[a]
                )));
            }
        }
        Ok(p)
    }

    /// The model prompts for a volume of `dims` voxels (i,j,k) with voxel→world `affine`:
    /// voxel indices as given (each inside the volume), millimetres to the nearest voxel.
    pub fn resolve(&self, dims: [usize; 3], affine: Option<&Affine>) -> Result<Vec<UserPrompt>> {
        let inverse = match self.units {
            Units::Voxels => None,
            Units::Millimetres => Some(coords::invert_affine(affine.ok_or_else(|| {
                Error::Prompt(
                    "millimetre coordinates need the voxel-to-world affine, but the volume has \
                     none (sform_code and qform_code are both 0); give voxel indices instead"
                        .into(),
                )
            })?)?),
        };
        let voxel =
            |p: [f64; 3], field: &str, given: &str| -> Result<[usize; 3]> {
                match &inverse {
                    Some(inv) => coords::nearest_voxel(coords::world_from_voxel(inv, p), dims)
                        .map_err(|e| match e {
                            Error::Prompt(m) => {
                                Error::Prompt(format!("{field} {} mm: {m}", clip(given)))
                            }
                            other => other,
                        }),
                    None => {
                        // Compared as numbers: no cast can saturate a huge index into a wrong one.
                        if (0..3).any(|a| p[a] >= dims[a] as f64) {
                            return Err(Error::Prompt(format!(
                                "{field} {}: lies outside the volume of {}x{}x{} voxels (i,j,k)",
                                clip(given),
                                dims[0],
                                dims[1],
                                dims[2]
                            )));
                        }
                        Ok(p.map(|x| x as usize))
                    }
                }
            };
        let bbox = match &self.bbox {
            None => None,
            Some(b) => {
                let v = b.values;
                let c0 = voxel([v[0], v[1], v[2]], "box", &b.given)?;
                let c1 = voxel([v[3], v[4], v[5]], "box", &b.given)?;
                // Millimetre corners min first can map to voxels max first (a flipped axis).
                Some(std::array::from_fn(|i| {
                    let a = i % 3;
                    if i < 3 {
                        c0[a].min(c1[a])
                    } else {
                        c0[a].max(c1[a])
                    }
                }))
            }
        };
        let mut points = Vec::new();
        let mut positive = Vec::new();
        for (c, pos) in &self.points {
            points.push(voxel(c.values, point_field(*pos), &c.given)?);
            positive.push(*pos);
        }
        let base = UserPrompt {
            text: None,
            bbox,
            points,
            positive,
        };
        if self.texts.is_empty() {
            return Ok(vec![base]);
        }
        Ok(self
            .texts
            .iter()
            .map(|t| UserPrompt {
                text: Some(t.clone()),
                ..base.clone()
            })
            .collect())
    }
}

const AXES: [&str; 3] = ["i", "j", "k"];

fn point_field(positive: bool) -> &'static str {
    if positive {
        "point"
    } else {
        "negative point"
    }
}

/// Voxel indices are non-negative integers; the fault names the value as written.
fn check_indices(v: &[f64], field: &str, given: &str) -> Result<()> {
    match v.iter().find(|x| x.fract() != 0.0 || **x < 0.0) {
        None => Ok(()),
        Some(x) => Err(Error::Prompt(format!(
            "{field} {}: {} is not a voxel index (a non-negative integer; give millimetres \
             as such)",
            clip(given),
            num(*x)
        ))),
    }
}

/// Reads and validates a prompt file against a window of `window` voxels (D, H, W).
pub fn read_window_prompt(path: &Path, window: [usize; 3]) -> Result<WindowPrompt> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Prompt(format!("{}: not valid JSON: {e}", path.display())))?;
    parse_window_prompt(&v, window).map_err(|e| match e {
        Error::Prompt(m) => Error::Prompt(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Validates a parsed prompt object (see [`read_window_prompt`]).
pub fn parse_window_prompt(v: &Value, window: [usize; 3]) -> Result<WindowPrompt> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::Prompt(format!("expected a JSON object, found {}", describe(v))))?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "text" | "box" | "points" | "labels") {
            return Err(Error::Prompt(format!(
                "unknown field `{}` (expected text, box, points, labels)",
                clip(key)
            )));
        }
    }
    let mut p = WindowPrompt::default();
    if let Some(t) = obj.get("text").filter(|t| !t.is_null()) {
        let t = t.as_str().ok_or_else(|| {
            Error::Prompt(format!("`text` must be a string, found {}", describe(t)))
        })?;
        if t.trim().is_empty() {
            return Err(Error::Prompt("`text` is empty".into()));
        }
        p.text = Some(t.to_string());
    }
    if let Some(b) = obj.get("box").filter(|b| !b.is_null()) {
        let vals = json_numbers(b, 6, "box")?;
        check_box(&vals, window)?;
        let bbox: [f32; 6] = std::array::from_fn(|i| vals[i] as f32);
        p.bbox = Some(bbox);
    }
    if let Some(pts) = obj.get("points").filter(|x| !x.is_null()) {
        let arr = pts.as_array().ok_or_else(|| {
            Error::Prompt(format!(
                "`points` must be an array of [d,h,w], found {}",
                describe(pts)
            ))
        })?;
        for (i, pt) in arr.iter().enumerate() {
            let vals = json_numbers(pt, 3, &format!("points[{i}]"))?;
            check_inside(&vals, window).map_err(|axis| {
                Error::Prompt(format!(
                    "points[{i}] = [{}] lies outside the {}x{}x{} window on axis {axis}",
                    nums(&vals),
                    window[0],
                    window[1],
                    window[2]
                ))
            })?;
            p.points
                .push([vals[0] as f32, vals[1] as f32, vals[2] as f32]);
        }
    }
    match obj.get("labels").filter(|x| !x.is_null()) {
        Some(l) => {
            let vals = json_numbers(l, p.points.len(), "labels")?;
            for (i, &x) in vals.iter().enumerate() {
                if x != 0.0 && x != 1.0 {
                    return Err(Error::Prompt(format!(
                        "labels[{i}] = {}: a label is 1 (positive) or 0 (negative)",
                        num(x)
                    )));
                }
            }
            p.labels = vals.iter().map(|&x| x as f32).collect();
        }
        // Points without labels are positive clicks.
        None => p.labels = vec![1.0; p.points.len()],
    }
    if p.is_empty() {
        return Err(Error::Prompt(
            "no prompt: give at least one of `text`, `box` or `points`".into(),
        ));
    }
    Ok(p)
}

/// `n` finite numbers of a JSON array, or a prompt error naming the field `what`.
pub fn json_numbers(v: &Value, n: usize, what: &str) -> Result<Vec<f64>> {
    let arr = v.as_array().filter(|a| a.len() == n).ok_or_else(|| {
        Error::Prompt(format!(
            "`{what}` must be an array of {n} numbers, found {}",
            describe(v)
        ))
    })?;
    arr.iter()
        .map(|x| {
            x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
                Error::Prompt(format!("`{what}` must hold numbers, found {}", describe(x)))
            })
        })
        .collect()
}

/// Numbers for a message, comma-separated.
fn nums(v: &[f64]) -> String {
    v.iter().map(|&x| num(x)).collect::<Vec<_>>().join(", ")
}

/// The axis on which `q` leaves `[0, size - 1]`, if any (checked in f64, before any cast).
fn check_inside(q: &[f64], window: [usize; 3]) -> std::result::Result<(), usize> {
    (0..3)
        .find(|&a| q[a] < 0.0 || q[a] > (window[a] - 1) as f64)
        .map_or(Ok(()), Err)
}

fn check_box(b: &[f64], window: [usize; 3]) -> Result<()> {
    for (corner, name) in [(0, "first"), (3, "second")] {
        check_inside(&b[corner..corner + 3], window).map_err(|axis| {
            Error::Prompt(format!(
                "box [{}]: its {name} corner lies outside the {}x{}x{} window on axis {axis}",
                nums(b),
                window[0],
                window[1],
                window[2]
            ))
        })?;
    }
    if let Some(a) = (0..3).find(|&a| b[a] > b[a + 3]) {
        return Err(Error::Prompt(format!(
            "box [{}]: the first corner exceeds the second on axis {a} (give the min corner \
             first)",
            nums(b)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const W: [usize; 3] = [32, 64, 64];

    #[test]
    fn full_prompt_parses() {
        let p = parse_window_prompt(
            &json!({"text": "liver", "box": [0, 17, 22, 31, 57, 55], "points": [[1, 2, 3]], "labels": [0]}),
            W,
        )
        .unwrap();
        assert_eq!(p.text.as_deref(), Some("liver"));
        assert_eq!(p.bbox, Some([0.0, 17.0, 22.0, 31.0, 57.0, 55.0]));
        assert_eq!(p.labels, [0.0]);
    }

    #[test]
    fn bad_prompts_name_the_fault() {
        let cases = [
            (json!({}), "no prompt"),
            (json!({"box": [0, 0, 0, 32, 10, 10]}), "outside"),
            (json!({"box": [5, 0, 0, 4, 10, 10]}), "first corner exceeds"),
            (json!({"box": [1, 2, 3]}), "6 numbers"),
            (json!({"points": [[1, 2, 99]]}), "points[0]"),
            (json!({"points": [[1, 2, 3]], "labels": [2]}), "labels[0]"),
            (json!({"points": [[1, 2, 3]], "labels": [1, 1]}), "labels"),
            (json!({"text": 5}), "`text` must be a string"),
            (json!({"txt": "liver"}), "unknown field `txt`"),
        ];
        for (v, want) in cases {
            let msg = parse_window_prompt(&v, W).unwrap_err().to_string();
            assert!(msg.contains(want), "{v}: {msg}");
        }
    }
}
