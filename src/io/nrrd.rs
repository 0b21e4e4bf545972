//! NRRD volumes (Teem's "Nearly Raw Raster Data", format spec
//! <http://teem.sourceforge.net/nrrd/format.html>): 3-D Slicer's native volume and label file,
//! and the result format its MONAI Label module asks for (`result_extension: ".nrrd"`,
//! ../shared/docs/client-protocols.md §B.2).
//!
//! Read: an attached header (`NRRD0001`..`NRRD0005` magic, `field: value` lines, `#` comments,
//! `key:=value` pairs ignored) ending in a blank line, then the data: `raw`, `gzip` or `ascii`
//! encoding, any endianness, a 3-D grid of (u)int8, (u)int16, int32, float or double voxels,
//! first axis fastest (the NIfTI file order). Geometry comes from `space` (`left-posterior-
//! superior`, `right-anterior-superior` or `left-anterior-superior`), `space directions` (one
//! world vector per index step of each axis) and `space origin`, converted to the NIfTI RAS
//! affine convention ([`crate::io::coords`]): LPS to RAS negates x and y. A header with only
//! `spacings` gets a diagonal affine at the origin. Detached data (`data file`), `line skip`,
//! `byte skip` and other encodings are refused with an error naming the field.
//!
//! Write: uint8 masks, attached header, gzip, `space: left-posterior-superior` with the mask's
//! grid directions and origin (the geometry Slicer writes for its own volumes).

use super::coords::Affine;
use super::nifti::{NiftiDtype, Volume, MAX_VOXELS};
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

/// The longest header accepted; real headers are a few hundred bytes.
const MAX_HEADER: usize = 1 << 16;
/// Deflate's worst-case expansion bound: a gzip body of `n` bytes never inflates to more than
/// about 1032 n, so a header declaring more data than that is refused before allocating.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// The voxel types read, by every name the format spec gives them.
fn voxel_type(name: &str) -> Option<NiftiDtype> {
    Some(match name {
        "signed char" | "int8" | "int8_t" => NiftiDtype::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => NiftiDtype::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => {
            NiftiDtype::I16
        }
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => {
            NiftiDtype::U16
        }
        "int" | "signed int" | "int32" | "int32_t" => NiftiDtype::I32,
        "float" => NiftiDtype::F32,
        "double" => NiftiDtype::F64,
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Raw,
    Gzip,
    Ascii,
}

/// The header fields this reader uses, parsed and checked.
#[derive(Debug)]
struct Header {
    dtype: NiftiDtype,
    dims: [usize; 3],
    encoding: Encoding,
    big_endian: bool,
    affine: Affine,
    /// Bytes from the start of the file to the data.
    data_offset: usize,
}

/// Whether `bytes` start like an NRRD file (for messages about misnamed files).
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..7] == b"NRRD000" && (b'1'..=b'5').contains(&bytes[7])
}

/// Reads a 3-D NRRD volume (see the module documentation); every fault is an error naming the
/// file and the field.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            "is not a regular file; give a .nrrd file",
        ));
    }
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_volume_bytes(&raw, path)
}

/// [`read_volume`] on bytes in memory; `path` names them in messages.
pub fn read_volume_bytes(raw: &[u8], path: &Path) -> Result<Volume> {
    let t0 = Instant::now();
    let h = parse_header(raw, path)?;
    let n: usize = h.dims.iter().product();
    let size = h.dtype.size();
    let body = &raw[h.data_offset..];
    let data = match h.encoding {
        Encoding::Raw => {
            if body.len() < n * size {
                return Err(Error::format(
                    path,
                    format!(
                        "truncated: the header declares {n} voxels of {size} byte(s) ({} bytes) but {} bytes of data follow it",
                        n * size,
                        body.len()
                    ),
                ));
            }
            decode_binary(&body[..n * size], h.dtype, h.big_endian)
        }
        Encoding::Gzip => {
            let want = (n * size) as u64;
            if want > body.len() as u64 * DEFLATE_MAX_RATIO + 64 {
                return Err(Error::format(
                    path,
                    format!(
                        "the header declares {want} bytes of voxels but the {} compressed bytes cannot hold that many",
                        body.len()
                    ),
                ));
            }
            let mut out = Vec::with_capacity(n * size);
            flate2::read::MultiGzDecoder::new(body)
                .take(want)
                .read_to_end(&mut out)
                .map_err(|e| Error::format(path, format!("gzip data: {e}")))?;
            if out.len() < n * size {
                return Err(Error::format(
                    path,
                    format!(
                        "truncated: the gzip data holds {} bytes, the header declares {} ({n} voxels of {size} byte(s))",
                        out.len(),
                        n * size
                    ),
                ));
            }
            decode_binary(&out, h.dtype, h.big_endian)
        }
        Encoding::Ascii => {
            let text = std::str::from_utf8(body)
                .map_err(|_| Error::format(path, "ascii data: not text"))?;
            let mut vals = Vec::with_capacity(n);
            for tok in text.split(|c: char| c.is_ascii_whitespace() || c == ',') {
                if tok.is_empty() {
                    continue;
                }
                if vals.len() == n {
                    break;
                }
                let v: f64 = tok.parse().map_err(|_| {
                    Error::format(
                        path,
                        format!("ascii data: `{}` is not a number", crate::error::clip(tok)),
                    )
                })?;
                vals.push(v as f32);
            }
            if vals.len() < n {
                return Err(Error::format(
                    path,
                    format!(
                        "truncated: {} ascii values, the header declares {n}",
                        vals.len()
                    ),
                ));
            }
            vals
        }
    };
    let mut vol = Volume::from_grid(path.to_path_buf(), h.dims, data, h.affine, h.dtype)?;
    vol.read_seconds = t0.elapsed().as_secs_f64();
    Ok(vol)
}

fn decode_binary(bytes: &[u8], dtype: NiftiDtype, big: bool) -> Vec<f32> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            bytes
                .chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().expect("chunk of the type's size");
                    (if big {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    }) as f32
                })
                .collect()
        };
    }
    match dtype {
        NiftiDtype::U8 => bytes.iter().map(|&b| b as f32).collect(),
        NiftiDtype::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        NiftiDtype::I16 => conv!(i16, 2),
        NiftiDtype::U16 => conv!(u16, 2),
        NiftiDtype::I32 => conv!(i32, 4),
        NiftiDtype::F32 => conv!(f32, 4),
        NiftiDtype::F64 => conv!(f64, 8),
    }
}

fn parse_header(raw: &[u8], path: &Path) -> Result<Header> {
    let bad = |msg: String| Error::format(path, msg);
    if !has_magic(raw) {
        return Err(bad(
            "not an NRRD file (it does not start with NRRD0001..NRRD0005)".into(),
        ));
    }
    // The header ends at the first empty line (LF or CRLF).
    let scan = &raw[..raw.len().min(MAX_HEADER + 2)];
    let mut end = None;
    let mut i = 0;
    while i < scan.len() {
        if scan[i] == b'\n' {
            let next = &scan[i + 1..];
            if next.first() == Some(&b'\n') {
                end = Some((i + 1, i + 2));
                break;
            }
            if next.starts_with(b"\r\n") {
                end = Some((i + 1, i + 3));
                break;
            }
        }
        i += 1;
    }
    let Some((header_end, data_offset)) = end else {
        return Err(bad(if raw.len() > MAX_HEADER {
            format!("no end of header (an empty line) in the first {MAX_HEADER} bytes")
        } else {
            "no data: the header does not end with an empty line".into()
        }));
    };
    let text = std::str::from_utf8(&raw[..header_end])
        .map_err(|_| bad("the header is not text (UTF-8)".into()))?;
    let mut fields: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(p) = line.find(": ") {
            // `key:=value` lines are key/value pairs, not fields: skip them.
            if line[..p].contains(":=") {
                continue;
            }
            let key = line[..p].trim().to_ascii_lowercase();
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(bad(format!(
                    "header line {}: field `{key}` given twice",
                    n + 1
                )));
            }
            fields.push((key, line[p + 2..].trim().to_string()));
        } else if line.contains(":=") {
            continue;
        } else {
            return Err(bad(format!(
                "header line {}: `{}` is neither `field: value` nor a comment",
                n + 1,
                crate::error::clip(line)
            )));
        }
    }
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let need = |k: &str| get(k).ok_or_else(|| bad(format!("the header has no `{k}` field")));

    for unsupported in [
        "data file",
        "datafile",
        "line skip",
        "lineskip",
        "byte skip",
        "byteskip",
    ] {
        if let Some(v) = get(unsupported) {
            let zero = v.trim() == "0";
            if !(unsupported.contains("skip") && zero) {
                return Err(bad(format!(
                    "`{unsupported}: {}` is not supported (give one .nrrd file with the data attached)",
                    crate::error::clip(v)
                )));
            }
        }
    }
    let type_name = need("type")?;
    let dtype = voxel_type(type_name).ok_or_else(|| {
        bad(format!(
            "type `{}` is not supported (int8, uint8, int16, uint16, int32, float, double)",
            crate::error::clip(type_name)
        ))
    })?;
    let dimension: usize = need("dimension")?.parse().map_err(|_| {
        bad(format!(
            "dimension `{}` is not a number",
            need("dimension").unwrap_or("")
        ))
    })?;
    if dimension != 3 {
        return Err(bad(format!(
            "dimension {dimension}: only 3-D volumes are read"
        )));
    }
    let sizes: Vec<usize> = need("sizes")?
        .split_whitespace()
        .map(|s| s.parse::<usize>().ok().filter(|&v| v > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            bad(format!(
                "sizes `{}`: expected 3 positive integers",
                need("sizes").unwrap_or("")
            ))
        })?;
    let dims: [usize; 3] = sizes
        .try_into()
        .map_err(|_| bad("sizes: expected 3 positive integers (dimension is 3)".into()))?;
    let voxels = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match voxels {
        Some(v) if v <= MAX_VOXELS => {}
        _ => {
            return Err(bad(format!(
                "sizes {}x{}x{}: more than {MAX_VOXELS} voxels",
                dims[0], dims[1], dims[2]
            )))
        }
    }
    let encoding = match need("encoding")? {
        "raw" => Encoding::Raw,
        "gzip" | "gz" => Encoding::Gzip,
        "ascii" | "text" | "txt" => Encoding::Ascii,
        other => {
            return Err(bad(format!(
                "encoding `{}` is not supported (raw, gzip, ascii)",
                crate::error::clip(other)
            )))
        }
    };
    let big_endian = match get("endian") {
        None => {
            if dtype.size() > 1 && encoding != Encoding::Ascii {
                return Err(bad(format!(
                    "the header has no `endian` field, which {} data needs",
                    type_name
                )));
            }
            false
        }
        Some("little") => false,
        Some("big") => true,
        Some(other) => {
            return Err(bad(format!(
                "endian `{}`: expected little or big",
                crate::error::clip(other)
            )))
        }
    };
    let affine = geometry(&get, path)?;
    Ok(Header {
        dtype,
        dims,
        encoding,
        big_endian,
        affine,
        data_offset,
    })
}

/// The voxel-to-RAS affine from `space`, `space directions` and `space origin` (or `spacings`).
fn geometry<'a>(get: &impl Fn(&str) -> Option<&'a str>, path: &Path) -> Result<Affine> {
    let bad = |msg: String| Error::format(path, msg);
    // Sign flips from the file's space to RAS, per world axis.
    let flip: [f64; 3] = match get("space") {
        None => {
            if get("space dimension").is_some() {
                return Err(bad(
                    "`space dimension` without a named `space`: the orientation is unknown (give space: left-posterior-superior or right-anterior-superior)".into(),
                ));
            }
            if get("space directions").is_some() {
                return Err(bad("`space directions` without `space`".into()));
            }
            let spacing: Vec<f64> = match get("spacings") {
                None => vec![1.0; 3],
                Some(s) => s
                    .split_whitespace()
                    .map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite() && *x != 0.0))
                    .collect::<Option<Vec<_>>>()
                    .filter(|v| v.len() == 3)
                    .ok_or_else(|| bad(format!("spacings `{}`: expected 3 non-zero numbers", crate::error::clip(s))))?,
            };
            let mut a = [[0.0; 4]; 4];
            for i in 0..3 {
                a[i][i] = spacing[i];
            }
            a[3][3] = 1.0;
            return Ok(a);
        }
        Some(s) => match s.to_ascii_lowercase().as_str() {
            "left-posterior-superior" | "lps" => [-1.0, -1.0, 1.0],
            "right-anterior-superior" | "ras" => [1.0, 1.0, 1.0],
            "left-anterior-superior" | "las" => [-1.0, 1.0, 1.0],
            other => {
                return Err(bad(format!(
                    "space `{}` is not supported (left-posterior-superior, right-anterior-superior, left-anterior-superior)",
                    crate::error::clip(other)
                )))
            }
        },
    };
    let dirs_text = get("space directions")
        .ok_or_else(|| bad("the header names a `space` but has no `space directions`".into()))?;
    let dirs = vectors(dirs_text).filter(|v| v.len() == 3).ok_or_else(|| {
        bad(format!(
            "space directions `{}`: expected three vectors (x,y,z)",
            crate::error::clip(dirs_text)
        ))
    })?;
    let origin = match get("space origin") {
        None => [0.0; 3],
        Some(o) => vectors(o)
            .filter(|v| v.len() == 1)
            .map(|v| v[0])
            .ok_or_else(|| {
                bad(format!(
                    "space origin `{}`: expected one vector (x,y,z)",
                    crate::error::clip(o)
                ))
            })?,
    };
    let mut a = [[0.0; 4]; 4];
    for r in 0..3 {
        for (c, d) in dirs.iter().enumerate() {
            a[r][c] = flip[r] * d[r];
        }
        a[r][3] = flip[r] * origin[r];
    }
    a[3][3] = 1.0;
    let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    if det == 0.0 || !det.is_finite() {
        return Err(bad(format!(
            "space directions `{}` are degenerate (a zero or parallel vector)",
            crate::error::clip(dirs_text)
        )));
    }
    Ok(a)
}

/// `(a,b,c) (d,e,f) ...` as vectors of three finite numbers; `None` on any fault.
fn vectors(s: &str) -> Option<Vec<[f64; 3]>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('(')?;
        let close = inner.find(')')?;
        let nums: Vec<f64> = inner[..close]
            .split(',')
            .map(|v| v.trim().parse::<f64>().ok().filter(|x| x.is_finite()))
            .collect::<Option<_>>()?;
        out.push(nums.try_into().ok()?);
        rest = inner[close + 1..].trim_start();
    }
    Some(out)
}

/// The NRRD bytes of `data` (raw little-endian voxels of `type_name`, first axis fastest) on a
/// grid of `dims` with the voxel-to-RAS `affine` (written as LPS), gzip-compressed when `gzip`.
/// Without an affine the header carries no geometry.
pub fn encode(
    dims: [usize; 3],
    affine: Option<&Affine>,
    type_name: &str,
    data: &[u8],
    gzip: bool,
) -> Vec<u8> {
    let mut h = String::from(
        "NRRD0004\n# written by segvol (format: http://teem.sourceforge.net/nrrd/format.html)\n",
    );
    h += &format!("type: {type_name}\ndimension: 3\n");
    if affine.is_some() {
        h += "space: left-posterior-superior\n";
    }
    h += &format!("sizes: {} {} {}\n", dims[0], dims[1], dims[2]);
    if let Some(a) = affine {
        // RAS to LPS: negate x and y of every direction and of the origin.
        let flip = [-1.0, -1.0, 1.0];
        let v = |x: [f64; 3]| format!("({},{},{})", x[0] + 0.0, x[1] + 0.0, x[2] + 0.0);
        let dir = |c: usize| v([0, 1, 2].map(|r| flip[r] * a[r][c]));
        h += &format!("space directions: {} {} {}\n", dir(0), dir(1), dir(2));
        h += "kinds: domain domain domain\n";
        h += &format!(
            "space origin: {}\n",
            v([0, 1, 2].map(|r| flip[r] * a[r][3]))
        );
    }
    h += "endian: little\n";
    h += if gzip {
        "encoding: gzip\n\n"
    } else {
        "encoding: raw\n\n"
    };
    let mut out = h.into_bytes();
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(3));
        enc.write_all(data).expect("writing into memory");
        out = enc.finish().expect("writing into memory");
    } else {
        out.extend_from_slice(data);
    }
    out
}

/// The NRRD bytes of a uint8 mask on the grid and geometry of `like` (gzip).
pub fn mask_bytes(like: &Volume, mask: &[u8]) -> Result<Vec<u8>> {
    if mask.len() != like.len() {
        return Err(Error::Internal(format!(
            "a mask of {} voxels for a volume of {}",
            mask.len(),
            like.len()
        )));
    }
    Ok(encode(like.dims, like.affine.as_ref(), "uint8", mask, true))
}

/// Writes a uint8 mask as NRRD on the grid and geometry of `like`, atomically.
pub fn write_mask(path: &Path, like: &Volume, mask: &[u8]) -> Result<()> {
    let bytes = mask_bytes(like, mask)?;
    super::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lps_ct_affine() -> Affine {
        // A typical CT: i to the left... in RAS, i runs towards -x, j towards -y.
        [
            [-0.7, 0.0, 0.0, 120.5],
            [0.0, -0.7, 0.0, 95.25],
            [0.0, 0.0, 2.5, -300.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    #[test]
    fn round_trip_raw_and_gzip_with_geometry() {
        let dims = [4, 3, 2];
        let vals: Vec<i16> = (0..24).map(|v| v * 37 - 400).collect();
        let raw: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        for gzip in [false, true] {
            let bytes = encode(dims, Some(&lps_ct_affine()), "short", &raw, gzip);
            let v = read_volume_bytes(&bytes, Path::new("t.nrrd")).unwrap();
            assert_eq!(v.dims, dims);
            assert_eq!(v.source_dtype, NiftiDtype::I16);
            assert_eq!(v.data, vals.iter().map(|&x| x as f32).collect::<Vec<_>>());
            assert_eq!(v.affine.unwrap(), lps_ct_affine());
        }
    }

    #[test]
    fn lps_header_becomes_ras_affine() {
        let hdr = "NRRD0004\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 1\nspace directions: (0.5,0,0) (0,0.5,0) (0,0,3)\nspace origin: (10,20,30)\nencoding: raw\n\n";
        let mut b = hdr.as_bytes().to_vec();
        b.extend_from_slice(&[1, 2, 3, 4]);
        let v = read_volume_bytes(&b, Path::new("x.nrrd")).unwrap();
        let a = v.affine.unwrap();
        assert_eq!(a[0], [-0.5, 0.0, 0.0, -10.0]);
        assert_eq!(a[1], [0.0, -0.5, 0.0, -20.0]);
        assert_eq!(a[2], [0.0, 0.0, 3.0, 30.0]);
        assert_eq!(v.data, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn big_endian_float_and_ascii() {
        let vals = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0, 9.0, 10.0];
        let mut b =
            b"NRRD0005\ntype: float\ndimension: 3\nsizes: 2 2 2\nendian: big\nencoding: raw\n\n"
                .to_vec();
        for v in vals {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let v = read_volume_bytes(&b, Path::new("x.nrrd")).unwrap();
        assert_eq!(v.data, vals.to_vec());
        let a = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 1 1\nspacings: 2 3 4\nencoding: ascii\n\n-5 6\n";
        let v = read_volume_bytes(a, Path::new("x.nrrd")).unwrap();
        assert_eq!(v.data, vec![-5.0, 6.0]);
        assert_eq!(v.affine.unwrap()[1][1], 3.0);
    }

    #[test]
    fn mask_written_with_the_volume_geometry() {
        let vol = Volume::from_grid(
            "ct.nii.gz".into(),
            [3, 2, 2],
            vec![0.0; 12],
            lps_ct_affine(),
            NiftiDtype::I16,
        )
        .unwrap();
        let mask: Vec<u8> = (0..12).map(|i| (i % 2) as u8).collect();
        let bytes = mask_bytes(&vol, &mask).unwrap();
        // The header: everything before the blank line that ends it.
        let end = bytes.windows(2).position(|w| w == b"\n\n").unwrap();
        let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
        assert!(text.contains("space: left-posterior-superior"), "{text}");
        assert!(
            text.contains("space directions: (0.7,0,0) (0,0.7,0) (0,0,2.5)"),
            "{text}"
        );
        assert!(
            text.contains("space origin: (-120.5,-95.25,-300)"),
            "{text}"
        );
        let back = read_volume_bytes(&bytes, Path::new("m.nrrd")).unwrap();
        assert_eq!(back.dims, vol.dims);
        assert_eq!(back.affine, vol.affine);
        assert_eq!(
            back.data,
            mask.iter().map(|&m| m as f32).collect::<Vec<_>>()
        );
    }

    fn err(bytes: &[u8]) -> String {
        read_volume_bytes(bytes, Path::new("bad.nrrd"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn malformed_headers_are_refused_by_name() {
        let ok = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n\n";
        assert!(read_volume_bytes(&[ok.as_bytes(), &[1, 2]].concat(), Path::new("a")).is_ok());
        let cases: &[(&str, &str)] = &[
            ("NIFTI\n\n", "not an NRRD file"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n", "does not end with an empty line"),
            ("NRRD0004\ntype: complex\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n\n", "type `complex`"),
            ("NRRD0004\ntype: uint8\ndimension: 2\nsizes: 2 1\nencoding: raw\n\n", "dimension 2"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 0 1\nencoding: raw\n\n", "sizes"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: bzip2\n\n", "encoding `bzip2`"),
            ("NRRD0004\ntype: short\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n\n", "`endian`"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n\n\u{1}", "truncated"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: gzip\n\nnotgzip", "gzip"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\ndata file: x.raw\nencoding: raw\n\n", "data file"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\nspace: scanner-xyz\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n\n", "space `scanner-xyz`"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\nspace: LPS\nspace directions: (1,0,0) (0,1,0)\n\n", "space directions"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\nspace: LPS\nspace directions: (1,0,0) (1,0,0) (0,0,1)\n\n", "degenerate"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\nbogus line\n\n", "neither"),
            ("NRRD0004\ntype: uint8\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n\n", "twice"),
            ("NRRD0004\ntype: uint8\ndimension: 3\nencoding: raw\n\n", "no `sizes`"),
        ];
        for (text, want) in cases {
            let e = err(text.as_bytes());
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("bad.nrrd: "), "{e}");
        }
        // A gzip body far too small for the declared size is refused before inflating.
        let huge = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4096 4096 64\nencoding: gzip\n\nxx";
        assert!(err(huge.as_bytes()).contains("cannot hold"));
    }
}
