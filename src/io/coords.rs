//! World (millimetre) ↔ voxel coordinates through a NIfTI affine (DESIGN.md, "Coordinates and
//! conventions").
//!
//! Voxel coordinates are the file's indices (i,j,k) = (X,Y,Z), with voxel centres at integer
//! positions (NIfTI-1 standard, "3D IMAGE (VOLUME) ORIENTATION AND LOCATION IN SPACE"). World
//! coordinates are the scanner/template millimetres the sform or qform maps them to:
//! `[x,y,z,1]ᵀ = A · [i,j,k,1]ᵀ`.

use crate::error::{Error, Result};
use std::path::Path;

/// A 4x4 voxel→world affine, row-major (`a[row][col]`), last row `[0,0,0,1]`.
pub type Affine = [[f64; 4]; 4];

/// The world position (mm) of voxel coordinates `ijk` (fractional allowed).
pub fn world_from_voxel(affine: &Affine, ijk: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (r, o) in out.iter_mut().enumerate() {
        let a = &affine[r];
        *o = a[0] * ijk[0] + a[1] * ijk[1] + a[2] * ijk[2] + a[3];
    }
    out
}

/// The (fractional) voxel coordinates of the world position `mm`, through the inverse of the
/// affine. Fails when the 3x3 part of the affine is singular (a corrupt header).
pub fn voxel_from_world(affine: &Affine, mm: [f64; 3]) -> Result<[f64; 3]> {
    let inv = invert_affine(affine)?;
    Ok(world_from_voxel(&inv, mm))
}

/// The inverse of an affine whose last row is `[0,0,0,1]`: `[M t; 0 1]⁻¹ = [M⁻¹ −M⁻¹t; 0 1]`.
pub fn invert_affine(affine: &Affine) -> Result<Affine> {
    let m = |r: usize, c: usize| affine[r][c];
    // Cofactors of the 3x3 linear part.
    let c00 = m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1);
    let c01 = m(1, 2) * m(2, 0) - m(1, 0) * m(2, 2);
    let c02 = m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0);
    let det = m(0, 0) * c00 + m(0, 1) * c01 + m(0, 2) * c02;
    let scale = (0..3)
        .flat_map(|r| (0..3).map(move |c| (r, c)))
        .map(|(r, c)| m(r, c).abs())
        .fold(0.0f64, f64::max);
    // Relative test: a voxel→world matrix with columns of ~1 mm has |det| ~ 1; a singular one
    // has |det| at rounding level relative to scale³.
    if !det.is_finite() || det.abs() <= 1e-12 * scale.powi(3) || scale == 0.0 {
        return Err(Error::Input(format!(
            "the voxel-to-world affine is singular (determinant {det:e}): {affine:?}"
        )));
    }
    let inv_det = 1.0 / det;
    let mut inv = [[0.0f64; 4]; 4];
    inv[0][0] = c00 * inv_det;
    inv[1][0] = c01 * inv_det;
    inv[2][0] = c02 * inv_det;
    inv[0][1] = (m(0, 2) * m(2, 1) - m(0, 1) * m(2, 2)) * inv_det;
    inv[1][1] = (m(0, 0) * m(2, 2) - m(0, 2) * m(2, 0)) * inv_det;
    inv[2][1] = (m(0, 1) * m(2, 0) - m(0, 0) * m(2, 1)) * inv_det;
    inv[0][2] = (m(0, 1) * m(1, 2) - m(0, 2) * m(1, 1)) * inv_det;
    inv[1][2] = (m(0, 2) * m(1, 0) - m(0, 0) * m(1, 2)) * inv_det;
    inv[2][2] = (m(0, 0) * m(1, 1) - m(0, 1) * m(1, 0)) * inv_det;
    for row in inv.iter_mut().take(3) {
        row[3] = -(row[0] * m(0, 3) + row[1] * m(1, 3) + row[2] * m(2, 3));
    }
    inv[3] = [0.0, 0.0, 0.0, 1.0];
    Ok(inv)
}

/// The qform affine from the quaternion parameters (NIfTI-1 standard, "METHOD 2", as in
/// `nifti_quatern_to_mat44` of nifti1_io.c).
///
/// - `quatern` = (b,c,d); `a = sqrt(1 − b² − c² − d²)`. When `1 − b² − c² − d² < 1e-7` the
///   quaternion is taken as a 180° rotation: `a = 0` and (b,c,d) is renormalised.
/// - `pixdim` = header `pixdim[0..4]`: `qfac = −1` when `pixdim[0] < 0`, else `+1` (0 counts as
///   +1); the step sizes `pixdim[1..4]` are used as given, a non-positive one as 1 (as nifti1_io).
/// - Column j of the linear part is `R[:,j] · pixdim[j+1]`, with the k column also times qfac;
///   the translation is `qoffset`.
pub fn qform_affine(quatern: [f64; 3], qoffset: [f64; 3], pixdim: [f64; 4]) -> Affine {
    let [mut b, mut c, mut d] = quatern;
    let mut a = 1.0 - (b * b + c * c + d * d);
    if a < 1e-7 {
        let n = 1.0 / (b * b + c * c + d * d).sqrt();
        b *= n;
        c *= n;
        d *= n;
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    let step = |p: f64| if p > 0.0 { p } else { 1.0 };
    let qfac = if pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let (dx, dy, dz) = (step(pixdim[1]), step(pixdim[2]), step(pixdim[3]) * qfac);
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let mut out = [[0.0; 4]; 4];
    for row in 0..3 {
        out[row] = [r[row][0] * dx, r[row][1] * dy, r[row][2] * dz, qoffset[row]];
    }
    out[3] = [0.0, 0.0, 0.0, 1.0];
    out
}

/// The qform parameters `(quatern, qoffset, pixdim[0..4])` of an affine: the inverse of
/// [`qform_affine`] (NIfTI-1 "METHOD 2"). Column norms give the step sizes; a left-handed
/// linear part gets `qfac = -1` (its k column negated before the rotation is read). The
/// rotation is the orthonormal polar factor only when the columns are orthogonal: for a
/// sheared affine the qform is an approximation and only the sform is exact.
pub fn qform_params(affine: &Affine) -> ([f64; 3], [f64; 3], [f64; 4]) {
    let col = |j: usize| [affine[0][j], affine[1][j], affine[2][j]];
    let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    let mut cols = [col(0), col(1), col(2)];
    let mut step = [0.0; 3];
    for (j, c) in cols.iter_mut().enumerate() {
        let n = norm(*c);
        step[j] = if n > 0.0 { n } else { 1.0 };
        for v in c.iter_mut() {
            *v /= step[j];
        }
    }
    let [x, y, z] = cols;
    let det = x[0] * (y[1] * z[2] - y[2] * z[1]) - y[0] * (x[1] * z[2] - x[2] * z[1])
        + z[0] * (x[1] * y[2] - x[2] * y[1]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    // r[row][col] with the k column flipped for a left-handed grid.
    let r = |row: usize, c: usize| cols[c][row] * if c == 2 { qfac } else { 1.0 };
    let trace = r(0, 0) + r(1, 1) + r(2, 2);
    // Shepperd's method: divide by the largest of the four candidate components.
    let (a, b, c, d);
    if trace > 0.0 {
        let s = 0.5 / (trace + 1.0).sqrt();
        a = 0.25 / s;
        b = (r(2, 1) - r(1, 2)) * s;
        c = (r(0, 2) - r(2, 0)) * s;
        d = (r(1, 0) - r(0, 1)) * s;
    } else if r(0, 0) > r(1, 1) && r(0, 0) > r(2, 2) {
        let s = 2.0 * (1.0 + r(0, 0) - r(1, 1) - r(2, 2)).sqrt();
        a = (r(2, 1) - r(1, 2)) / s;
        b = 0.25 * s;
        c = (r(0, 1) + r(1, 0)) / s;
        d = (r(0, 2) + r(2, 0)) / s;
    } else if r(1, 1) > r(2, 2) {
        let s = 2.0 * (1.0 + r(1, 1) - r(0, 0) - r(2, 2)).sqrt();
        a = (r(0, 2) - r(2, 0)) / s;
        b = (r(0, 1) + r(1, 0)) / s;
        c = 0.25 * s;
        d = (r(1, 2) + r(2, 1)) / s;
    } else {
        let s = 2.0 * (1.0 + r(2, 2) - r(0, 0) - r(1, 1)).sqrt();
        a = (r(1, 0) - r(0, 1)) / s;
        b = (r(0, 2) + r(2, 0)) / s;
        c = (r(1, 2) + r(2, 1)) / s;
        d = 0.25 * s;
    }
    // The standard keeps a >= 0 (q and -q are the same rotation).
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    (
        [b * sign, c * sign, d * sign],
        [affine[0][3], affine[1][3], affine[2][3]],
        [qfac, step[0], step[1], step[2]],
    )
}

/// The affine of a volume, or an error naming the file when it has none (neither
/// `sform_code > 0` nor `qform_code > 0`), e.g. for a prompt given in millimetres.
pub fn require_affine<'a>(affine: Option<&'a Affine>, path: &Path) -> Result<&'a Affine> {
    affine.ok_or_else(|| {
        Error::Input(format!(
            "{}: millimetre coordinates need the voxel-to-world affine, but the file has none \
             (sform_code and qform_code are both 0); give the prompt in voxel indices instead",
            path.display()
        ))
    })
}

/// The voxel containing fractional voxel coordinates `ijk`: the nearest voxel centre, i.e.
/// `floor(x + 0.5)` per axis (a point exactly halfway between two centres goes to the higher
/// index). Fails when that voxel lies outside a volume of `dims` = (X,Y,Z).
pub fn nearest_voxel(ijk: [f64; 3], dims: [usize; 3]) -> Result<[usize; 3]> {
    let mut out = [0usize; 3];
    for a in 0..3 {
        let r = (ijk[a] + 0.5).floor();
        if !r.is_finite() || r < 0.0 || r >= dims[a] as f64 {
            let [x, y, z] = ijk.map(crate::error::num);
            let [ri, rj, rk] = ijk.map(|v| match (v + 0.5).floor() {
                r if r.abs() < 1e15 => format!("{r}"),
                r => crate::error::num(r),
            });
            return Err(Error::Prompt(format!(
                "voxel coordinates ({x}, {y}, {z}) round to ({ri}, {rj}, {rk}), outside the \
                 {}x{}x{} volume",
                dims[0], dims[1], dims[2]
            )));
        }
        out[a] = r as usize;
    }
    Ok(out)
}
