//! The prompt encoder (spec §2), on the host: a few sparse tokens and one dense positional
//! grid per model, far too small to be worth a launch. It reproduces the official f32
//! arithmetic step for step, quirks included (§2.1: a point (d,h,w) is normalised as
//! ((d+.5)/W, (h+.5)/D, (w+.5)/W) while the dense grid stacks (H, D, W)).

use super::HostWeights;
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// What each sparse token is (the fixtures' `sparse_token_kinds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    PointPos,
    PointNeg,
    /// A point with label -1: the padding point, or an official "no point" placeholder.
    PadPoint,
    BoxCornerMin,
    BoxCornerMax,
    Text,
}

impl TokenKind {
    /// The fixtures' name for the kind.
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::PointPos => "point_pos",
            TokenKind::PointNeg => "point_neg",
            TokenKind::PadPoint => "pad_point",
            TokenKind::BoxCornerMin => "box_corner_min",
            TokenKind::BoxCornerMax => "box_corner_max",
            TokenKind::Text => "text",
        }
    }
}

/// The prompt encoder's weights, copied out of the checkpoint.
pub struct PromptEncoder {
    dim: usize,
    features: usize,
    /// `positional_encoding_gaussian_matrix`, (3, F) row-major.
    gaussian: Vec<f32>,
    /// `point_embeddings.{0..3}`: negative, positive, box min corner, box max corner.
    point_embeddings: [Vec<f32>; 4],
    not_a_point: Vec<f32>,
    input_size: [usize; 3],
    grid: [usize; 3],
}

impl PromptEncoder {
    /// Reads the prompt-encoder weights.
    pub fn new(cfg: &ModelConfig, w: &dyn HostWeights) -> Result<Self> {
        let get = |k: &str| -> Result<Vec<f32>> {
            w.host_tensor(&format!("prompt_encoder.{k}"))
                .map(<[f32]>::to_vec)
                .ok_or_else(|| Error::Internal(format!("prompt_encoder.{k} not loaded")))
        };
        Ok(PromptEncoder {
            dim: cfg.decoder.dim,
            features: cfg.pe_features(),
            gaussian: get("pe_layer.positional_encoding_gaussian_matrix")?,
            point_embeddings: [
                get("point_embeddings.0.weight")?,
                get("point_embeddings.1.weight")?,
                get("point_embeddings.2.weight")?,
                get("point_embeddings.3.weight")?,
            ],
            not_a_point: get("not_a_point_embed.weight")?,
            input_size: cfg.spatial_size,
            grid: cfg.token_grid(),
        })
    }

    /// `_pe_encoding` (§2.1): `u = 2c - 1`, `v = 2π (u @ G)`, `[sin v, cos v]`, all f32.
    fn encode(&self, c: [f32; 3], out: &mut [f32]) {
        let f = self.features;
        let u = c.map(|x| 2.0 * x - 1.0);
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        for j in 0..f {
            let g = &self.gaussian;
            let v = u[0] * g[j] + u[1] * g[f + j] + u[2] * g[2 * f + j];
            let v = two_pi * v;
            out[j] = v.sin();
            out[f + j] = v.cos();
        }
    }

    /// `forward_with_coords` (§2.1): a (d,h,w) position, already shifted by 0.5, normalised
    /// by (input[1], input[0], input[2]) — the released weights' convention.
    fn encode_coords(&self, p: [f32; 3], out: &mut [f32]) {
        let s = self.input_size;
        let c = [p[0] / s[1] as f32, p[1] / s[0] as f32, p[2] / s[2] as f32];
        self.encode(c, out);
    }

    /// `get_dense_pe()` (§2.1) in token layout `(N, C)`: cell (i,j,k) encodes
    /// `((j+.5)/gH, (i+.5)/gD, (k+.5)/gW)`.
    pub fn dense_pe(&self) -> Vec<f32> {
        let [gd, gh, gw] = self.grid;
        let mut out = vec![0.0; gd * gh * gw * self.dim];
        for i in 0..gd {
            for j in 0..gh {
                for k in 0..gw {
                    let t = (i * gh + j) * gw + k;
                    let c = [
                        (j as f32 + 1.0 - 0.5) / gh as f32,
                        (i as f32 + 1.0 - 0.5) / gd as f32,
                        (k as f32 + 1.0 - 0.5) / gw as f32,
                    ];
                    self.encode(c, &mut out[t * self.dim..(t + 1) * self.dim]);
                }
            }
        }
        out
    }

    /// The sparse token sequence (§2.2–§2.4): points (plus the padding point when there is no
    /// box), box corners, then the raw text embedding. Points are (d,h,w) window voxels with
    /// labels 1 (positive), 0 (negative) or -1 (not a point); the box is
    /// `[d0,h0,w0,d1,h1,w1]`, corners inclusive.
    pub fn sparse(
        &self,
        points: &[[f32; 3]],
        labels: &[f32],
        bbox: Option<[f32; 6]>,
        text: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<TokenKind>)> {
        let c = self.dim;
        if points.len() != labels.len() {
            return Err(Error::Prompt(format!(
                "{} points but {} labels",
                points.len(),
                labels.len()
            )));
        }
        let mut out = Vec::new();
        let mut kinds = Vec::new();
        let mut token = vec![0.0f32; c];
        if !points.is_empty() {
            let mut pts: Vec<([f32; 3], f32)> = points
                .iter()
                .zip(labels)
                .map(|(p, &l)| (p.map(|x| x + 0.5), l))
                .collect();
            if bbox.is_none() {
                // The pad point is appended after the shift, so its coordinates are 0 (§2.2).
                pts.push(([0.0; 3], -1.0));
            }
            for (p, label) in pts {
                self.encode_coords(p, &mut token);
                let (add, kind) = if label == -1.0 {
                    token.fill(0.0);
                    (&self.not_a_point, TokenKind::PadPoint)
                } else if label == 0.0 {
                    (&self.point_embeddings[0], TokenKind::PointNeg)
                } else if label == 1.0 {
                    (&self.point_embeddings[1], TokenKind::PointPos)
                } else {
                    return Err(Error::Prompt(format!(
                        "point label {label} is not 1 (positive), 0 (negative) or -1"
                    )));
                };
                for (t, a) in token.iter_mut().zip(add) {
                    *t += a;
                }
                out.extend_from_slice(&token);
                kinds.push(kind);
            }
        }
        if let Some(b) = bbox {
            for (corner, (emb, kind)) in [
                (&self.point_embeddings[2], TokenKind::BoxCornerMin),
                (&self.point_embeddings[3], TokenKind::BoxCornerMax),
            ]
            .into_iter()
            .enumerate()
            {
                let p = [
                    b[3 * corner] + 0.5,
                    b[3 * corner + 1] + 0.5,
                    b[3 * corner + 2] + 0.5,
                ];
                self.encode_coords(p, &mut token);
                for (t, a) in token.iter_mut().zip(emb) {
                    *t += a;
                }
                out.extend_from_slice(&token);
                kinds.push(kind);
            }
        }
        if let Some(t) = text {
            if t.len() != c {
                return Err(Error::Internal(format!(
                    "text embedding of {} values, expected {c}",
                    t.len()
                )));
            }
            out.extend_from_slice(t);
            kinds.push(TokenKind::Text);
        }
        if kinds.is_empty() {
            return Err(Error::Prompt(
                "no prompt: give a text, a box or points".into(),
            ));
        }
        Ok((out, kinds))
    }
}
