//! Prompt files for `segvol window`: `{"text": "liver", "box": [d0,h0,w0,d1,h1,w1],
//! "points": [[d,h,w], ...], "labels": [1, 0, ...]}` in window voxel coordinates (box corners
//! inclusive). Every field is optional; at least one prompt is required.

use crate::config::describe;
use crate::error::{Error, Result};
use crate::model::WindowPrompt;
use serde_json::Value;
use std::path::Path;

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
                "unknown field `{key}` (expected text, box, points, labels)"
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
        let vals = numbers(b, 6, "box")?;
        let bbox: [f32; 6] = std::array::from_fn(|i| vals[i] as f32);
        check_box(&bbox, window)?;
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
            let vals = numbers(pt, 3, &format!("points[{i}]"))?;
            let q = [vals[0] as f32, vals[1] as f32, vals[2] as f32];
            check_inside(q, window).map_err(|axis| {
                Error::Prompt(format!(
                    "points[{i}] = {q:?} lies outside the {}x{}x{} window on axis {axis}",
                    window[0], window[1], window[2]
                ))
            })?;
            p.points.push(q);
        }
    }
    match obj.get("labels").filter(|x| !x.is_null()) {
        Some(l) => {
            let vals = numbers(l, p.points.len(), "labels")?;
            for (i, &x) in vals.iter().enumerate() {
                if x != 0.0 && x != 1.0 {
                    return Err(Error::Prompt(format!(
                        "labels[{i}] = {x}: a label is 1 (positive) or 0 (negative)"
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

fn numbers(v: &Value, n: usize, what: &str) -> Result<Vec<f64>> {
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

/// The axis on which `q` leaves `[0, size)`, if any.
fn check_inside(q: [f32; 3], window: [usize; 3]) -> std::result::Result<(), usize> {
    for a in 0..3 {
        if q[a] < 0.0 || q[a] > (window[a] - 1) as f32 {
            return Err(a);
        }
    }
    Ok(())
}

fn check_box(b: &[f32; 6], window: [usize; 3]) -> Result<()> {
    for (corner, name) in [(0, "first"), (3, "second")] {
        let q = [b[corner], b[corner + 1], b[corner + 2]];
        check_inside(q, window).map_err(|axis| {
            Error::Prompt(format!(
                "box {b:?}: its {name} corner lies outside the {}x{}x{} window on axis {axis}",
                window[0], window[1], window[2]
            ))
        })?;
    }
    for a in 0..3 {
        if b[a] > b[a + 3] {
            return Err(Error::Prompt(format!(
                "box {b:?}: min corner exceeds max corner on axis {a}"
            )));
        }
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
            (json!({"box": [5, 0, 0, 4, 10, 10]}), "exceeds"),
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
