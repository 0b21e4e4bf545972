//! NIfTI reading and writing, and world↔voxel coordinates (src/io/nifti.rs, src/io/coords.rs).
//!
//! Synthetic files are built by a small NIfTI encoder written here independently of the
//! library (offsets from nifti1.h / nifti2.h), and the fixture CTs are cross-checked against a
//! direct decode (flate2 + header offsets).

mod common;

use segvol::io::coords::{self, Affine};
use segvol::io::nifti::{read_volume, write_mask, write_volume_f32, NiftiDtype, NiftiVersion};
use segvol::rng::SplitMix64 as Rng;
use segvol::Error;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const TINY_CT: &str = "tests/fixtures/data/example_ct_sm.nii.gz";
const TINY_SUB64: &str = "tests/fixtures/data/example_ct_sm_sub64.nii.gz";

// ---------------------------------------------------------------------------------------------
// helpers

fn shared_data(name: &str) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(f) = std::env::var("SEGVOL_FIXTURES") {
        dirs.push(Path::new(&f).join("../data"));
    }
    dirs.push(PathBuf::from("/work/shared/fixtures/data"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.exists())
}

/// A file of the full fixture set: `$SEGVOL_FIXTURES/<name>` (the common rule for full-size
/// fixtures), `None` when the variable is unset.
fn shared_full(name: &str) -> Option<PathBuf> {
    let dir = std::env::var("SEGVOL_FIXTURES").ok()?;
    Some(Path::new(&dir).join(name)).filter(|p| p.exists())
}

fn gunzip_ref(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn le_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_i16(b: &[u8], at: usize) -> i16 {
    i16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

/// A synthetic NIfTI-1 or NIfTI-2 file.
#[derive(Clone)]
struct Synth {
    v2: bool,
    be: bool,
    datatype: i16,
    bitpix: i16,
    dim: [i64; 8],
    pixdim: [f64; 8],
    slope: f64,
    inter: f64,
    qform_code: i32,
    sform_code: i32,
    quatern: [f64; 3],
    qoffset: [f64; 3],
    srow: [[f64; 4]; 3],
    descrip: &'static str,
    xyzt_units: u8,
    /// Raw extension bytes (each extension: esize, ecode, data; esize a multiple of 16).
    ext: Vec<u8>,
    payload: Vec<u8>,
    magic1: [u8; 4],
}

impl Synth {
    fn new(dims: &[i64], datatype: i16, bitpix: i16, payload: Vec<u8>) -> Synth {
        let mut dim = [1i64; 8];
        dim[0] = dims.len() as i64;
        dim[1..=dims.len()].copy_from_slice(dims);
        Synth {
            v2: false,
            be: false,
            datatype,
            bitpix,
            dim,
            pixdim: [1.0, 0.8, 0.9, 2.5, 1.0, 1.0, 1.0, 1.0],
            slope: 1.0,
            inter: 0.0,
            qform_code: 0,
            sform_code: 2,
            quatern: [0.0; 3],
            qoffset: [-10.0, 20.0, 30.0],
            srow: [
                [0.8, 0.0, 0.0, -10.0],
                [0.0, 0.9, 0.0, 20.0],
                [0.0, 0.0, 2.5, 30.0],
            ],
            descrip: "segvol synthetic",
            xyzt_units: 2,
            ext: Vec::new(),
            payload,
            magic1: *b"n+1\0",
        }
    }

    fn put(&self, buf: &mut [u8], at: usize, le: &[u8]) {
        let mut v = le.to_vec();
        if self.be {
            v.reverse();
        }
        buf[at..at + v.len()].copy_from_slice(&v);
    }

    fn bytes(&self) -> Vec<u8> {
        let hsize = if self.v2 { 540 } else { 348 };
        let vox_offset = hsize + 4 + self.ext.len();
        let mut b = vec![0u8; vox_offset];
        if self.v2 {
            self.put(&mut b, 0, &540i32.to_le_bytes());
            b[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
            self.put(&mut b, 12, &self.datatype.to_le_bytes());
            self.put(&mut b, 14, &self.bitpix.to_le_bytes());
            for i in 0..8 {
                self.put(&mut b, 16 + 8 * i, &self.dim[i].to_le_bytes());
                self.put(&mut b, 104 + 8 * i, &self.pixdim[i].to_le_bytes());
            }
            self.put(&mut b, 168, &(vox_offset as i64).to_le_bytes());
            self.put(&mut b, 176, &self.slope.to_le_bytes());
            self.put(&mut b, 184, &self.inter.to_le_bytes());
            b[240..240 + self.descrip.len()].copy_from_slice(self.descrip.as_bytes());
            self.put(&mut b, 344, &self.qform_code.to_le_bytes());
            self.put(&mut b, 348, &self.sform_code.to_le_bytes());
            for i in 0..3 {
                self.put(&mut b, 352 + 8 * i, &self.quatern[i].to_le_bytes());
                self.put(&mut b, 376 + 8 * i, &self.qoffset[i].to_le_bytes());
                for c in 0..4 {
                    self.put(&mut b, 400 + 32 * i + 8 * c, &self.srow[i][c].to_le_bytes());
                }
            }
            self.put(&mut b, 500, &(self.xyzt_units as i32).to_le_bytes());
        } else {
            self.put(&mut b, 0, &348i32.to_le_bytes());
            for i in 0..8 {
                self.put(&mut b, 40 + 2 * i, &(self.dim[i] as i16).to_le_bytes());
                self.put(&mut b, 76 + 4 * i, &(self.pixdim[i] as f32).to_le_bytes());
            }
            self.put(&mut b, 70, &self.datatype.to_le_bytes());
            self.put(&mut b, 72, &self.bitpix.to_le_bytes());
            self.put(&mut b, 108, &(vox_offset as f32).to_le_bytes());
            self.put(&mut b, 112, &(self.slope as f32).to_le_bytes());
            self.put(&mut b, 116, &(self.inter as f32).to_le_bytes());
            b[123] = self.xyzt_units;
            b[148..148 + self.descrip.len()].copy_from_slice(self.descrip.as_bytes());
            self.put(&mut b, 252, &(self.qform_code as i16).to_le_bytes());
            self.put(&mut b, 254, &(self.sform_code as i16).to_le_bytes());
            for i in 0..3 {
                self.put(&mut b, 256 + 4 * i, &(self.quatern[i] as f32).to_le_bytes());
                self.put(&mut b, 268 + 4 * i, &(self.qoffset[i] as f32).to_le_bytes());
                for c in 0..4 {
                    self.put(
                        &mut b,
                        280 + 16 * i + 4 * c,
                        &(self.srow[i][c] as f32).to_le_bytes(),
                    );
                }
            }
            b[344..348].copy_from_slice(&self.magic1);
        }
        if !self.ext.is_empty() {
            b[hsize] = 1;
            b[hsize + 4..].copy_from_slice(&self.ext);
        }
        b.extend_from_slice(&self.payload);
        b
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        let bytes = self.bytes();
        let bytes = if name.ends_with(".gz") {
            gzip(&bytes)
        } else {
            bytes
        };
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Random voxels of a datatype, encoded in the given byte order, and their values.
fn random_payload(dtype: NiftiDtype, n: usize, be: bool, rng: &mut Rng) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    for _ in 0..n {
        let r = rng.next_u64();
        let (mut le, v): (Vec<u8>, f64) = match dtype {
            NiftiDtype::U8 => (vec![r as u8], (r as u8) as f64),
            NiftiDtype::I8 => (vec![r as u8], (r as u8 as i8) as f64),
            NiftiDtype::I16 => ((r as i16).to_le_bytes().to_vec(), (r as i16) as f64),
            NiftiDtype::U16 => ((r as u16).to_le_bytes().to_vec(), (r as u16) as f64),
            NiftiDtype::I32 => ((r as i32).to_le_bytes().to_vec(), (r as i32) as f64),
            NiftiDtype::F32 => {
                let v = ((rng.unit_f64() - 0.5) * 4000.0) as f32;
                (v.to_le_bytes().to_vec(), v as f64)
            }
            NiftiDtype::F64 => {
                let v = (rng.unit_f64() - 0.5) * 4000.0;
                (v.to_le_bytes().to_vec(), v)
            }
        };
        if be {
            le.reverse();
        }
        bytes.extend_from_slice(&le);
        vals.push(v);
    }
    (bytes, vals)
}

const ALL: [NiftiDtype; 7] = [
    NiftiDtype::U8,
    NiftiDtype::I8,
    NiftiDtype::I16,
    NiftiDtype::U16,
    NiftiDtype::I32,
    NiftiDtype::F32,
    NiftiDtype::F64,
];

fn bitpix(d: NiftiDtype) -> i16 {
    (d.size() * 8) as i16
}

fn format_msg(e: Error) -> String {
    match e {
        Error::Format { path, msg } => format!("{}: {msg}", path.display()),
        other => panic!("expected Error::Format, got {other:?}"),
    }
}

fn assert_affine_close(a: &Affine, b: &Affine, tol: f64) {
    for r in 0..4 {
        for c in 0..4 {
            assert!(
                (a[r][c] - b[r][c]).abs() <= tol,
                "affine [{r}][{c}]: {} vs {}\n{a:?}\n{b:?}",
                a[r][c],
                b[r][c]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fixture CTs

/// Reads a fixture CT and checks it against a direct decode of the gzip and the header.
fn check_fixture_ct(path: &Path, dims: [usize; 3]) {
    let vol = read_volume(path).unwrap();
    let raw = gunzip_ref(path);
    assert_eq!(le_i16(&raw, 70), 4, "fixture is int16");
    let off = le_f32(&raw, 108) as usize;
    assert_eq!(vol.dims, dims);
    assert_eq!(vol.model_dims(), [dims[2], dims[1], dims[0]]);
    assert_eq!(vol.source_dtype, NiftiDtype::I16);
    assert_eq!(vol.header.version, NiftiVersion::One);
    assert!(!vol.header.big_endian);
    assert_eq!(vol.data.len(), dims.iter().product::<usize>());
    assert_eq!(
        vol.spacing,
        [le_f32(&raw, 80), le_f32(&raw, 84), le_f32(&raw, 88)]
    );
    for (n, &v) in vol.data.iter().enumerate() {
        let want = le_i16(&raw, off + 2 * n) as f32;
        assert_eq!(v, want, "voxel {:?}", vol.ijk(n));
    }
    // A few voxels by (i,j,k): the index is i + X*(j + Y*k).
    let mut rng = Rng(7);
    for _ in 0..32 {
        let ijk = [0, 1, 2].map(|a| (rng.next_u64() % dims[a] as u64) as usize);
        let n = ijk[0] + dims[0] * (ijk[1] + dims[1] * ijk[2]);
        assert_eq!(vol.index(ijk), n);
        assert_eq!(vol.ijk(n), ijk);
        assert_eq!(vol.data[n], le_i16(&raw, off + 2 * n) as f32);
    }
    // sform_code > 0 in every fixture: the affine is srow_x/y/z.
    assert!(i16::from_le_bytes([raw[254], raw[255]]) > 0);
    let mut want = [[0.0, 0.0, 0.0, 1.0]; 4];
    for (r, row) in want.iter_mut().take(3).enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = le_f32(&raw, 280 + 16 * r + 4 * c) as f64;
        }
    }
    assert_eq!(vol.affine.unwrap(), want);
    assert!(vol.read_seconds > 0.0);
    // The data is HU: the range of a CT, not all one value.
    let (lo, hi) = vol
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(lo <= -900.0 && hi >= 500.0, "range {lo}..{hi}");
}

#[test]
fn reads_tiny_ct() {
    check_fixture_ct(Path::new(TINY_CT), [122, 101, 30]);
    check_fixture_ct(Path::new(TINY_SUB64), [64, 64, 30]);
    let vol = read_volume(Path::new(TINY_CT)).unwrap();
    assert_eq!(vol.spacing, [3.0, 3.0, 3.0]);
    assert_eq!(vol.header.sform_code, 2);
    assert_eq!(vol.header.qform_code, 0);
}

#[test]
fn reads_full_ct_with_qform_equal_to_sform() {
    let Some(p) = shared_data("example_ct_dicom_512x512x20.nii.gz") else {
        eprintln!("skipped: example_ct_dicom_512x512x20.nii.gz not found (/work/shared absent)");
        return;
    };
    check_fixture_ct(&p, [512, 512, 20]);
    let vol = read_volume(&p).unwrap();
    assert_eq!(vol.header.sform_code, 1);
    assert_eq!(vol.header.qform_code, 1);
    // LAS, qfac = -1, quaternion (0,1,0): the qform must reproduce the sform.
    assert_eq!(vol.header.pixdim[0], -1.0);
    let q = vol.header.qform_affine();
    assert_affine_close(&q, &vol.affine.unwrap(), 1e-6);
    assert_affine_close(
        &q,
        &[
            [-0.9765625, 0.0, 0.0, 249.51171875],
            [0.0, 0.9765625, 0.0, -61.51171875],
            [0.0, 0.0, 2.0, -804.5],
            [0.0, 0.0, 0.0, 1.0],
        ],
        1e-9,
    );
}

// ---------------------------------------------------------------------------------------------
// masks in the original geometry

/// Writes the fixture mask again from the CT's header: the decompressed file must be the one
/// nibabel wrote, byte for byte (header and voxels).
fn check_mask_rewrite(ct: &Path, mask: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let ctv = read_volume(ct).unwrap();
    let reference = read_volume(mask).unwrap();
    assert_eq!(reference.source_dtype, NiftiDtype::U8);
    assert_eq!(reference.dims, ctv.dims);
    let bits: Vec<u8> = reference.data.iter().map(|&v| v as u8).collect();
    assert!(bits.iter().all(|&b| b <= 1));
    assert!(bits.contains(&1), "fixture mask is not empty");
    for name in ["mask.nii.gz", "mask.nii"] {
        let out = dir.path().join(name);
        write_mask(&out, &ctv, &bits).unwrap();
        let written = std::fs::read(&out).unwrap();
        let gz = written.starts_with(&[0x1f, 0x8b]);
        assert_eq!(gz, name.ends_with(".gz"));
        let written = if gz { gunzip_ref(&out) } else { written };
        assert_eq!(written.len(), gunzip_ref(mask).len());
        let want = gunzip_ref(mask);
        for (n, (a, b)) in written[..352].iter().zip(&want[..352]).enumerate() {
            assert_eq!(a, b, "{}: header byte {n} differs", mask.display());
        }
        assert!(written[352..] == want[352..], "voxels differ");
        // Read back: same grid and geometry.
        let back = read_volume(&out).unwrap();
        assert_eq!(back.dims, ctv.dims);
        assert_eq!(back.affine, ctv.affine);
        assert_eq!(back.spacing, ctv.spacing);
        let mut h = back.header.clone();
        assert_eq!((h.datatype, h.bitpix), (2, 8));
        h.datatype = ctv.header.datatype;
        h.bitpix = ctv.header.bitpix;
        assert_eq!(h, ctv.header, "every other header field is the CT's");
        assert_eq!(back.data, reference.data);
    }
    // No temporary file is left beside the outputs.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn mask_header_matches_fixture_masks() {
    check_mask_rewrite(
        Path::new(TINY_CT),
        Path::new("tests/fixtures/tiny/pipeline-text-mask.nii.gz"),
    );
    check_mask_rewrite(
        Path::new(TINY_CT),
        Path::new("tests/fixtures/tiny/pipeline-box-text-mask.nii.gz"),
    );
    check_mask_rewrite(
        Path::new(TINY_SUB64),
        Path::new("tests/fixtures/tiny/pipeline-box-text-1win-mask.nii.gz"),
    );
}

/// `SEGVOL_FIXTURES=/work/shared/fixtures/full cargo test --release --test nifti -- --ignored`
#[test]
#[ignore]
fn mask_header_matches_full_fixture_masks() {
    let (Some(ct), Some(m1), Some(m2)) = (
        shared_data("example_ct_dicom_512x512x20.nii.gz"),
        shared_full("pipeline-text-mask.nii.gz"),
        shared_full("pipeline-box-text-mask.nii.gz"),
    ) else {
        eprintln!("skipped: SEGVOL_FIXTURES is unset or lacks the full masks");
        return;
    };
    check_mask_rewrite(&ct, &m1);
    check_mask_rewrite(&ct, &m2);
}

#[test]
fn mask_from_scaled_big_endian_input_resets_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let (payload, _) = random_payload(NiftiDtype::I16, 5 * 4 * 3, true, &mut rng);
    let mut s = Synth::new(&[5, 4, 3], 4, 16, payload);
    s.be = true;
    s.slope = 2.0;
    s.inter = -1024.0;
    let ct = read_volume(&s.write(dir.path(), "ct.nii")).unwrap();
    assert!(ct.header.big_endian);
    let mask: Vec<u8> = (0..60).map(|_| (rng.next_u64() % 2) as u8).collect();
    let out = dir.path().join("m.nii.gz");
    write_mask(&out, &ct, &mask).unwrap();
    let back = read_volume(&out).unwrap();
    assert!(!back.header.big_endian, "outputs are little-endian");
    assert_eq!((back.header.scl_slope, back.header.scl_inter), (1.0, 0.0));
    assert_eq!(
        back.data,
        mask.iter().map(|&v| v as f32).collect::<Vec<_>>()
    );
    assert_eq!(back.affine, ct.affine);
    assert_eq!(back.header.descrip, ct.header.descrip);
    assert_eq!(back.header.xyzt_units, 2);
}

#[test]
fn float_volume_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ct = read_volume(Path::new(TINY_SUB64)).unwrap();
    let mut rng = Rng(3);
    let probs: Vec<f32> = (0..ct.len()).map(|_| rng.unit_f64() as f32).collect();
    for name in ["p.nii.gz", "p.nii"] {
        let out = dir.path().join(name);
        write_volume_f32(&out, &ct, &probs).unwrap();
        let back = read_volume(&out).unwrap();
        assert_eq!(back.source_dtype, NiftiDtype::F32);
        assert_eq!((back.header.datatype, back.header.bitpix), (16, 32));
        assert_eq!(back.data, probs);
        assert_eq!(back.affine, ct.affine);
    }
}

#[test]
fn write_rejects_bad_masks_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let ct = read_volume(Path::new(TINY_SUB64)).unwrap();
    let out = dir.path().join("m.nii.gz");
    match write_mask(&out, &ct, &[0u8; 10]) {
        // A writer handed the wrong size is a bug of segvol, not the user's input (exit 1).
        Err(Error::Internal(m)) => {
            assert!(m.contains("10 voxels") && m.contains("64x64x30"), "{m}")
        }
        r => panic!("{r:?}"),
    }
    let mut mask = vec![0u8; ct.len()];
    mask[ct.index([3, 4, 5])] = 2;
    match write_mask(&out, &ct, &mask) {
        Err(Error::Internal(m)) => assert!(m.contains("(3,4,5) holds label 2"), "{m}"),
        r => panic!("{r:?}"),
    }
    mask[ct.index([3, 4, 5])] = 1;
    match write_mask(&dir.path().join("m.png"), &ct, &mask) {
        Err(Error::Usage(m)) => assert!(m.contains(".nii.gz"), "{m}"),
        r => panic!("{r:?}"),
    }
    match write_mask(&dir.path().join("no/such/dir/m.nii.gz"), &ct, &mask) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("m.nii.gz")),
        r => panic!("{r:?}"),
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------------
// every datatype, scaling, byte order, extensions, 4-D, NIfTI-2

#[test]
fn every_datatype_both_byte_orders_with_and_without_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    let dims = [7usize, 5, 3];
    let n = 105;
    let mut count = 0;
    for dtype in ALL {
        for be in [false, true] {
            for scale in [None, Some((0.5, -3.25)), Some((0.0, 100.0))] {
                for v2 in [false, true] {
                    let (payload, vals) = random_payload(dtype, n, be, &mut rng);
                    let mut s = Synth::new(&[7, 5, 3], dtype.code(), bitpix(dtype), payload);
                    s.be = be;
                    s.v2 = v2;
                    if let Some((m, b)) = scale {
                        s.slope = m;
                        s.inter = b;
                    }
                    let name = format!(
                        "{}-{be}-{count}.nii{}",
                        dtype.name(),
                        if count % 2 == 0 { ".gz" } else { "" }
                    );
                    count += 1;
                    let p = s.write(dir.path(), &name);
                    let vol = read_volume(&p).unwrap();
                    assert_eq!(vol.dims, dims);
                    assert_eq!(vol.source_dtype, dtype);
                    assert_eq!(vol.header.big_endian, be);
                    assert_eq!(
                        vol.header.version,
                        if v2 {
                            NiftiVersion::Two
                        } else {
                            NiftiVersion::One
                        }
                    );
                    let want: Vec<f32> = vals
                        .iter()
                        .map(|&v| match scale {
                            // slope 0 means no scaling (NIfTI standard)
                            Some((m, b)) if m != 0.0 => (v * m + b) as f32,
                            _ => v as f32,
                        })
                        .collect();
                    assert_eq!(vol.data, want, "{name}");
                    assert_eq!(vol.spacing, [0.8, 0.9, 2.5]);
                    assert_affine_close(
                        &vol.affine.unwrap(),
                        &[
                            [0.8, 0.0, 0.0, -10.0],
                            [0.0, 0.9, 0.0, 20.0],
                            [0.0, 0.0, 2.5, 30.0],
                            [0.0, 0.0, 0.0, 1.0],
                        ],
                        1e-6,
                    );
                }
            }
        }
    }
    assert_eq!(count, 7 * 2 * 3 * 2);
}

#[test]
fn nonfinite_slope_means_no_scaling_but_nonfinite_intercept_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let (payload, vals) = random_payload(NiftiDtype::I16, 24, false, &mut rng);
    let mut s = Synth::new(&[2, 3, 4], 4, 16, payload);
    s.slope = f64::NAN;
    s.inter = 5.0;
    let vol = read_volume(&s.write(dir.path(), "a.nii")).unwrap();
    assert_eq!(vol.data, vals.iter().map(|&v| v as f32).collect::<Vec<_>>());
    s.slope = 2.0;
    s.inter = f64::INFINITY;
    let m = format_msg(read_volume(&s.write(dir.path(), "b.nii")).unwrap_err());
    assert!(m.contains("b.nii") && m.contains("scl_inter"), "{m}");
}

#[test]
fn header_extensions_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(9);
    for v2 in [false, true] {
        let (payload, vals) = random_payload(NiftiDtype::F32, 60, false, &mut rng);
        let mut s = Synth::new(&[3, 4, 5], 16, 32, payload);
        s.v2 = v2;
        // Two extensions: a 32-byte comment (ecode 6) and a 16-byte one (ecode 4, AFNI).
        let mut ext = Vec::new();
        ext.extend_from_slice(&32i32.to_le_bytes());
        ext.extend_from_slice(&6i32.to_le_bytes());
        ext.extend_from_slice(b"a comment of 24 bytes!!\0");
        ext.extend_from_slice(&16i32.to_le_bytes());
        ext.extend_from_slice(&4i32.to_le_bytes());
        ext.extend_from_slice(&[0xAB; 8]);
        s.ext = ext;
        let p = s.write(dir.path(), "ext.nii.gz");
        let vol = read_volume(&p).unwrap();
        assert_eq!(vol.header.vox_offset, if v2 { 544 + 48 } else { 352 + 48 });
        assert_eq!(vol.data, vals.iter().map(|&v| v as f32).collect::<Vec<_>>());
        // The mask written from it has no extension.
        let out = dir.path().join("m.nii");
        write_mask(&out, &vol, &[1u8; 60]).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let hsize = if v2 { 540 } else { 348 };
        assert_eq!(bytes.len(), hsize + 4 + 60);
        assert_eq!(&bytes[hsize..hsize + 4], &[0, 0, 0, 0]);
        let back = read_volume(&out).unwrap();
        assert_eq!(back.header.version, vol.header.version);
        assert_eq!(back.affine, vol.affine);
        assert_eq!(back.data, vec![1.0; 60]);
    }
}

#[test]
fn four_d_with_one_volume_and_trailing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(13);
    for dims in [
        &[4i64, 3, 2, 1][..],
        &[4, 3, 2, 1, 1, 1][..],
        &[4, 3, 1][..],
    ] {
        let n: i64 = dims.iter().product();
        let (payload, vals) = random_payload(NiftiDtype::U16, n as usize, false, &mut rng);
        let s = Synth::new(dims, 512, 16, payload);
        let vol = read_volume(&s.write(dir.path(), "v.nii.gz")).unwrap();
        assert_eq!(vol.dims, [4, 3, dims[2] as usize]);
        assert_eq!(vol.data, vals.iter().map(|&v| v as f32).collect::<Vec<_>>());
        // A mask keeps the header's dims, trailing 1s included.
        let out = dir.path().join("m.nii.gz");
        write_mask(&out, &vol, &vec![0u8; vol.len()]).unwrap();
        let back = read_volume(&out).unwrap();
        assert_eq!(back.header.dim, vol.header.dim);
    }
}

#[test]
fn multi_member_gzip_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(17);
    let (payload, vals) = random_payload(NiftiDtype::I16, 1000, false, &mut rng);
    let s = Synth::new(&[10, 10, 10], 4, 16, payload);
    let bytes = s.bytes();
    let mut gz = gzip(&bytes[..500]);
    gz.extend_from_slice(&gzip(&bytes[500..]));
    let p = dir.path().join("multi.nii.gz");
    std::fs::write(&p, gz).unwrap();
    let vol = read_volume(&p).unwrap();
    assert_eq!(vol.data, vals.iter().map(|&v| v as f32).collect::<Vec<_>>());
}

#[test]
fn gzip_is_found_by_magic_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(19);
    let (payload, vals) = random_payload(NiftiDtype::U8, 27, false, &mut rng);
    let s = Synth::new(&[3, 3, 3], 2, 8, payload);
    // gzip data named .nii, plain data named .nii.gz
    let a = dir.path().join("a.nii");
    std::fs::write(&a, gzip(&s.bytes())).unwrap();
    let b = dir.path().join("b.nii.gz");
    std::fs::write(&b, s.bytes()).unwrap();
    let want: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
    assert_eq!(read_volume(&a).unwrap().data, want);
    assert_eq!(read_volume(&b).unwrap().data, want);
}

// ---------------------------------------------------------------------------------------------
// bad input

fn small_i16(dims: &[i64]) -> Synth {
    let n: i64 = dims.iter().product();
    let mut rng = Rng(23);
    let (payload, _) = random_payload(NiftiDtype::I16, n as usize, false, &mut rng);
    Synth::new(dims, 4, 16, payload)
}

#[test]
fn error_not_nifti() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(29);
    let junk: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    for (name, bytes) in [
        ("junk.nii", junk.clone()),
        ("junk.nii.gz", gzip(&junk)),
        ("short.nii", vec![1, 2]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let m = format_msg(read_volume(&p).unwrap_err());
        assert!(m.contains(name) && m.contains("not a NIfTI file"), "{m}");
    }
    // Right size field, wrong magic (an ANALYZE 7.5 header).
    let mut s = small_i16(&[2, 2, 2]);
    s.magic1 = [0; 4];
    let m = format_msg(read_volume(&s.write(dir.path(), "analyze.nii")).unwrap_err());
    assert!(m.contains("not a NIfTI-1 file: magic"), "{m}");
    s.magic1 = *b"ni1\0";
    let m = format_msg(read_volume(&s.write(dir.path(), "pair.nii")).unwrap_err());
    assert!(m.contains(".hdr/.img"), "{m}");
    match read_volume(&dir.path().join("missing.nii.gz")) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("missing.nii.gz")),
        r => panic!("{r:?}"),
    }
}

#[test]
fn error_truncated_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let raw = std::fs::read(TINY_CT).unwrap();
    // Cut in the deflate stream, just before the trailer, and inside the trailer.
    for cut in [raw.len() / 2, raw.len() - 8, raw.len() - 3] {
        let p = dir.path().join("cut.nii.gz");
        std::fs::write(&p, &raw[..cut]).unwrap();
        let m = format_msg(read_volume(&p).unwrap_err());
        assert!(m.contains("cut.nii.gz") && m.contains("gzip"), "{cut}: {m}");
    }
    // A corrupted byte in the middle.
    let mut bad = raw.clone();
    bad[raw.len() / 3] ^= 0x55;
    let p = dir.path().join("corrupt.nii.gz");
    std::fs::write(&p, &bad).unwrap();
    let m = format_msg(read_volume(&p).unwrap_err());
    assert!(m.contains("gzip"), "{m}");
}

#[test]
fn error_truncated_nii() {
    let dir = tempfile::tempdir().unwrap();
    let full = gunzip_ref(Path::new(TINY_CT));
    for (cut, name) in [(full.len() - 1, "a.nii"), (200, "b.nii")] {
        let p = dir.path().join(name);
        std::fs::write(&p, &full[..cut]).unwrap();
        let m = format_msg(read_volume(&p).unwrap_err());
        let want = if cut < 348 {
            "truncated header"
        } else {
            "truncated data"
        };
        assert!(m.contains(name) && m.contains(want), "{m}");
    }
    // A complete gzip of a truncated file says the same.
    let p = dir.path().join("c.nii.gz");
    std::fs::write(&p, gzip(&full[..full.len() - 100])).unwrap();
    let m = format_msg(read_volume(&p).unwrap_err());
    assert!(
        m.contains("truncated data") && m.contains("122x101x30 int16"),
        "{m}"
    );
}

#[test]
fn error_2d_image() {
    let dir = tempfile::tempdir().unwrap();
    let m = format_msg(read_volume(&small_i16(&[8, 8]).write(dir.path(), "flat.nii")).unwrap_err());
    assert!(m.contains("flat.nii") && m.contains("2-D image"), "{m}");
}

#[test]
fn error_4d_two_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let p = small_i16(&[4, 4, 3, 2]).write(dir.path(), "series.nii.gz");
    let m = format_msg(read_volume(&p).unwrap_err());
    assert!(
        m.contains("series.nii.gz") && m.contains("4-D image with 2 volumes"),
        "{m}"
    );
    let p = small_i16(&[4, 4, 3, 1, 3]).write(dir.path(), "five.nii.gz");
    let m = format_msg(read_volume(&p).unwrap_err());
    assert!(m.contains("5-D image with 3 volumes"), "{m}");
    let p = small_i16(&[4, 0, 3]).write(dir.path(), "zero.nii.gz");
    let m = format_msg(read_volume(&p).unwrap_err());
    assert!(m.contains("dim[2] = 0"), "{m}");
}

#[test]
fn error_nonfinite_voxels_name_the_first_one() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, bad, name) in [
        (NiftiDtype::F32, f64::NAN, "nan.nii.gz"),
        (NiftiDtype::F64, f64::NEG_INFINITY, "inf.nii"),
    ] {
        let mut rng = Rng(31);
        let mut vals: Vec<f64> = (0..120).map(|_| rng.unit_f64()).collect();
        let (i, j, k) = (2, 3, 1);
        let first = i + 6 * (j + 5 * k);
        vals[first] = bad;
        vals[first + 40] = bad;
        let payload: Vec<u8> = vals
            .iter()
            .flat_map(|&v| match dtype {
                NiftiDtype::F32 => (v as f32).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            })
            .collect();
        let s = Synth::new(&[6, 5, 4], dtype.code(), bitpix(dtype), payload);
        match read_volume(&s.write(dir.path(), name)) {
            Err(Error::Input(m)) => {
                assert!(m.contains(name) && m.contains("(i,j,k) = (2,3,1)"), "{m}");
                assert!(m.contains(if bad.is_nan() { "NaN" } else { "inf" }), "{m}");
            }
            r => panic!("{r:?}"),
        }
    }
    // Scaling that overflows f32 is caught too.
    let mut s = small_i16(&[2, 2, 2]);
    s.slope = 3e38;
    let m = match read_volume(&s.write(dir.path(), "overflow.nii")) {
        Err(Error::Input(m)) => m,
        r => panic!("{r:?}"),
    };
    assert!(m.contains("inf"), "{m}");
}

#[test]
fn error_unsupported_datatype() {
    let dir = tempfile::tempdir().unwrap();
    for (code, bits, name) in [
        (32i16, 64i16, "complex64"),
        (128, 24, "rgb24"),
        (1024, 64, "int64"),
    ] {
        let s = Synth::new(&[2, 2, 2], code, bits, vec![0u8; 8 * bits as usize / 8]);
        let m = format_msg(read_volume(&s.write(dir.path(), "t.nii")).unwrap_err());
        assert!(
            m.contains("t.nii") && m.contains(&format!("unsupported datatype {code} ({name})")),
            "{m}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// coordinates

fn check_round_trips(affine: &Affine, rng: &mut Rng) {
    for _ in 0..100 {
        let ijk = [0, 1, 2].map(|_| (rng.unit_f64() - 0.2) * 300.0);
        let mm = coords::world_from_voxel(affine, ijk);
        let back = coords::voxel_from_world(affine, mm).unwrap();
        for a in 0..3 {
            assert!(
                (back[a] - ijk[a]).abs() < 1e-9,
                "{ijk:?} -> {mm:?} -> {back:?}"
            );
        }
    }
}

#[test]
fn coords_round_trip_sform_ras_and_las() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(37);
    // RAS tiny CT (sform), and a LAS sform with a flip on x.
    let ras = read_volume(Path::new(TINY_CT)).unwrap();
    check_round_trips(&ras.affine.unwrap(), &mut rng);
    // Voxel (0,0,0) is at the sform offset; +1 along i is +3 mm in x (RAS).
    let o = ras.world_from_voxel([0.0, 0.0, 0.0]).unwrap();
    assert_eq!(o, [-177.95632934570312, 11.319000244140625, 94.3017578125]);
    let x1 = ras.world_from_voxel([1.0, 0.0, 0.0]).unwrap();
    assert_eq!(x1[0] - o[0], 3.0);
    let mut s = small_i16(&[4, 4, 4]);
    s.srow = [
        [-0.75, 0.0, 0.0, 120.0],
        [0.0, 0.75, 0.1, -30.0],
        [0.0, 0.0, 1.5, 5.0],
    ];
    let las = read_volume(&s.write(dir.path(), "las.nii")).unwrap();
    let a = las.affine.unwrap();
    check_round_trips(&a, &mut rng);
    // A world point in voxel (2,1,3), 0.3 voxel off the centre: the nearest voxel is (2,1,3).
    let mm = coords::world_from_voxel(&a, [2.3, 0.7, 3.4]);
    assert_eq!(las.nearest_voxel_from_world(mm).unwrap(), [2, 1, 3]);
}

#[test]
fn coords_qform_rotation_and_qfac() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(41);
    // Rotation by theta about z: quaternion (cos(t/2), 0, 0, sin(t/2)).
    let t = 0.3f64;
    let mut s = small_i16(&[4, 4, 4]);
    s.sform_code = 0;
    s.qform_code = 1;
    s.quatern = [0.0, 0.0, (t / 2.0).sin()];
    s.qoffset = [1.0, 2.0, 3.0];
    s.pixdim = [-1.0, 0.5, 0.75, 2.0, 1.0, 1.0, 1.0, 1.0];
    let vol = read_volume(&s.write(dir.path(), "q.nii")).unwrap();
    let a = vol.affine.unwrap();
    let (c, sn) = (t.cos(), t.sin());
    // Quaternion values are stored as f32, hence the tolerance.
    assert_affine_close(
        &a,
        &[
            [c * 0.5, -sn * 0.75, 0.0, 1.0],
            [sn * 0.5, c * 0.75, 0.0, 2.0],
            [0.0, 0.0, -2.0, 3.0], // qfac = -1 flips k
            [0.0, 0.0, 0.0, 1.0],
        ],
        1e-6,
    );
    check_round_trips(&a, &mut rng);
    // Random unit quaternions, both qfac: columns have the pixdim lengths and are orthogonal.
    for _ in 0..20 {
        let mut q = [0, 1, 2, 3].map(|_| rng.unit_f64() - 0.5);
        let n = q.iter().map(|v| v * v).sum::<f64>().sqrt();
        q.iter_mut().for_each(|v| *v /= n);
        if q[0] < 0.0 {
            q.iter_mut().for_each(|v| *v = -*v);
        }
        let qfac = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
        let pix = [qfac, 0.7, 1.1, 3.0];
        let a = coords::qform_affine([q[1], q[2], q[3]], [5.0, -6.0, 7.0], pix);
        let col = |j: usize| [a[0][j], a[1][j], a[2][j]];
        let dot = |u: [f64; 3], v: [f64; 3]| u[0] * v[0] + u[1] * v[1] + u[2] * v[2];
        for j in 0..3 {
            assert!((dot(col(j), col(j)).sqrt() - pix[j + 1]).abs() < 1e-12);
            for k in 0..j {
                assert!(dot(col(j), col(k)).abs() < 1e-12);
            }
        }
        // det sign = qfac (a proper rotation times diag(dx, dy, qfac*dz)).
        let (c0, c1, c2) = (col(0), col(1), col(2));
        let det = c0[0] * (c1[1] * c2[2] - c1[2] * c2[1]) - c1[0] * (c0[1] * c2[2] - c0[2] * c2[1])
            + c2[0] * (c0[1] * c1[2] - c0[2] * c1[1]);
        assert_eq!(det.signum(), qfac);
        check_round_trips(&a, &mut rng);
    }
}

#[test]
fn coords_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = small_i16(&[4, 4, 4]);
    s.sform_code = 0;
    s.qform_code = 0;
    let vol = read_volume(&s.write(dir.path(), "noaffine.nii.gz")).unwrap();
    assert!(vol.affine.is_none());
    match vol.voxel_from_world([1.0, 2.0, 3.0]) {
        Err(Error::Input(m)) => {
            assert!(
                m.contains("noaffine.nii.gz") && m.contains("sform_code and qform_code"),
                "{m}"
            )
        }
        r => panic!("{r:?}"),
    }
    // Outside the grid, and a singular affine.
    match coords::nearest_voxel([3.6, 0.0, 0.0], [4, 4, 4]) {
        Err(Error::Prompt(m)) => assert!(m.contains("(4, 0, 0)") && m.contains("4x4x4"), "{m}"),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        coords::nearest_voxel([3.49, -0.5, 0.5], [4, 4, 4]).unwrap(),
        [3, 0, 1]
    );
    assert!(coords::nearest_voxel([-0.51, 0.0, 0.0], [4, 4, 4]).is_err());
    let singular = [
        [1.0, 2.0, 0.0, 0.0],
        [2.0, 4.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert!(matches!(
        coords::voxel_from_world(&singular, [0.0; 3]),
        Err(Error::Input(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// speed (run by hand): cargo test --release --test nifti -- --ignored --nocapture read_speed

#[test]
#[ignore]
fn read_speed() {
    use nifti::{NiftiObject, RandomAccessNiftiVolume};
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = vec![PathBuf::from(TINY_CT)];
    if let Some(p) = shared_data("example_ct_dicom_512x512x20.nii.gz") {
        files.push(p.clone());
        // 512x512x300 int16: the 20 CT slices repeated (a realistic compression ratio),
        // written by nibabel's default gzip level (1).
        let raw = gunzip_ref(&p);
        let mut big = raw[..352].to_vec();
        big[46..48].copy_from_slice(&300i16.to_le_bytes());
        for _ in 0..15 {
            big.extend_from_slice(&raw[352..]);
        }
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        e.write_all(&big).unwrap();
        let q = dir.path().join("big_512x512x300.nii.gz");
        std::fs::write(&q, e.finish().unwrap()).unwrap();
        files.push(q);
    }
    for p in &files {
        let mb = |v: &segvol::io::nifti::Volume| (352 + v.len() * 2) as f64 / 1e6;
        let mut best = f64::MAX;
        let mut vol = None;
        for _ in 0..5 {
            let v = read_volume(p).unwrap();
            best = best.min(v.read_seconds);
            vol = Some(v);
        }
        let v = vol.unwrap();
        println!(
            "{}: read_volume {:.1} MB decompressed in {:.1} ms = {:.0} MB/s",
            p.display(),
            mb(&v),
            best * 1e3,
            mb(&v) / best
        );
        // The nifti crate: its in-memory reader, then f32 per voxel.
        let t = Instant::now();
        let obj = nifti::ReaderOptions::new().read_file(p).unwrap();
        let t_read = t.elapsed().as_secs_f64();
        let vol_n = obj.volume();
        let [x, y, z] = v.dims;
        let mut data = Vec::with_capacity(v.len());
        for k in 0..z as u16 {
            for j in 0..y as u16 {
                for i in 0..x as u16 {
                    data.push(vol_n.get_f32(&[i, j, k]).unwrap());
                }
            }
        }
        let total = t.elapsed().as_secs_f64();
        assert_eq!(data, v.data);
        println!(
            "    nifti crate: read {:.1} ms + get_f32 {:.1} ms = {:.0} MB/s",
            t_read * 1e3,
            (total - t_read) * 1e3,
            mb(&v) / total
        );
    }
}

/// Issue 9 item 8: trailing data behind the voxels is never read into memory, and a header
/// declaring more data than the file can hold is refused before anything is allocated.
#[test]
fn trailing_data_is_not_read_and_declared_sizes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let full = gunzip_ref(Path::new(TINY_CT));
    // 5 GiB of sparse trailing data: reading it whole cannot fit under the 4 GiB address-space
    // cap; reading exactly the header and voxels takes a few hundred KiB.
    common::fuzz::cap_memory();
    let p = dir.path().join("tail.nii");
    std::fs::write(&p, &full).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(full.len() as u64 + (5 << 30)).unwrap();
    let v = read_volume(&p).unwrap();
    assert_eq!(v.dims, [122, 101, 30]);
    // The same behind a gzip stream: 64 MiB of zeros after the voxels, gzipped.
    let mut tail = full.clone();
    tail.resize(full.len() + (64 << 20), 0);
    let pz = dir.path().join("tail.nii.gz");
    std::fs::write(&pz, gzip(&tail)).unwrap();
    let vz = read_volume(&pz).unwrap();
    assert_eq!(vz.data, v.data);
    // dims declaring 2^40 voxels: refused naming the limit, no allocation attempted.
    let mut big = full.clone();
    for (at, d) in [(42, 32767i16), (44, 32767), (46, 32767)] {
        big[at..at + 2].copy_from_slice(&d.to_le_bytes());
    }
    let pb = dir.path().join("huge.nii");
    std::fs::write(&pb, &big).unwrap();
    let m = format_msg(read_volume(&pb).unwrap_err());
    assert!(m.contains("huge.nii") && m.contains("limit"), "{m}");
    // Within the voxel limit but more than a small gzip file can inflate to.
    let mut mid = full[..352].to_vec();
    for (at, d) in [(42, 2048i16), (44, 2048), (46, 256)] {
        mid[at..at + 2].copy_from_slice(&d.to_le_bytes());
    }
    let pm = dir.path().join("mid.nii.gz");
    std::fs::write(&pm, gzip(&mid)).unwrap();
    let m = format_msg(read_volume(&pm).unwrap_err());
    assert!(
        m.contains("mid.nii.gz") && m.contains("gzip file can hold"),
        "{m}"
    );
    // Uncompressed: checked against the file size first.
    let pu = dir.path().join("mid.nii");
    std::fs::write(&pu, &mid).unwrap();
    let m = format_msg(read_volume(&pu).unwrap_err());
    assert!(m.contains("truncated data"), "{m}");
}

/// Issue 9 item 8: only regular files are inputs (a device that never ends, a FIFO, a
/// directory are refused with one line).
#[test]
fn non_regular_files_are_refused() {
    for p in ["/dev/zero", "/dev/null"] {
        if Path::new(p).exists() {
            let m = format_msg(read_volume(Path::new(p)).unwrap_err());
            assert!(m.contains(p) && m.contains("not a regular file"), "{m}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let m = format_msg(read_volume(dir.path()).unwrap_err());
    assert!(m.contains("directory"), "{m}");
    let fifo = dir.path().join("pipe.nii");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } == 0 {
        let m = format_msg(read_volume(&fifo).unwrap_err());
        assert!(
            m.contains("pipe.nii") && m.contains("not a regular file"),
            "{m}"
        );
    }
}

/// Issue 9 (minor): a huge `scl_inter` that makes every voxel equal in f32 is reported as
/// such, not as a constant volume passed on to the pipeline.
#[test]
fn scl_inter_swamping_the_range_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut full = gunzip_ref(Path::new(TINY_CT));
    // scl_slope 1, scl_inter 1e12 (NIfTI-1 float32 fields at 112 and 116).
    full[112..116].copy_from_slice(&1.0f32.to_le_bytes());
    full[116..120].copy_from_slice(&1e12f32.to_le_bytes());
    let p = dir.path().join("swamped.nii");
    std::fs::write(&p, &full).unwrap();
    let m = format_msg(read_volume(&p).unwrap_err());
    assert!(
        m.contains("swamped.nii") && m.contains("swamps the data range"),
        "{m}"
    );
    // A moderate intercept still reads.
    full[116..120].copy_from_slice(&(-1024f32).to_le_bytes());
    std::fs::write(&p, &full).unwrap();
    read_volume(&p).unwrap();
}

/// Issue 9 (minor): a singular affine is an error naming the file.
#[test]
fn singular_affine_error_names_the_file() {
    let mut v = read_volume(Path::new(TINY_CT)).unwrap();
    v.affine = Some([[0.0; 4], [0.0; 4], [0.0; 4], [0.0, 0.0, 0.0, 1.0]]);
    let e = v
        .nearest_voxel_from_world([1.0, 2.0, 3.0])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("example_ct_sm.nii.gz") && e.contains("singular"),
        "{e}"
    );
}

/// `coords::qform_params` inverts `qform_affine` for rotations of either handedness, and a
/// volume made by `Volume::from_grid` writes a mask that reads back with the same affine.
#[test]
fn a_grid_from_another_format_keeps_its_affine_through_a_written_mask() {
    use segvol::io::coords::{qform_affine, qform_params};
    let rot = |ax: f64, ay: f64, az: f64| {
        let (sx, cx, sy, cy, sz, cz) = (ax.sin(), ax.cos(), ay.sin(), ay.cos(), az.sin(), az.cos());
        [
            [cy * cz, sx * sy * cz - cx * sz, cx * sy * cz + sx * sz],
            [cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - sx * cz],
            [-sy, sx * cy, cx * cy],
        ]
    };
    let mut cases = vec![];
    for (n, angles) in [
        (0.0, 0.0, 0.0),
        (0.3, -1.2, 2.9),
        (3.1, 0.1, -0.2),
        (1.5, 3.0, 0.0),
    ]
    .into_iter()
    .enumerate()
    {
        for flip in [1.0, -1.0] {
            let r = rot(angles.0, angles.1, angles.2);
            let steps = [0.7, 0.9 + n as f64 * 0.1, 2.5];
            let mut a = [[0.0; 4]; 4];
            for row in 0..3 {
                for c in 0..3 {
                    a[row][c] = r[row][c] * steps[c] * if c == 2 { flip } else { 1.0 };
                }
                a[row][3] = [-120.5, 30.25, 410.0][row];
            }
            a[3][3] = 1.0;
            cases.push(a);
        }
    }
    for a in &cases {
        let (q, off, pd) = qform_params(a);
        let back = qform_affine(q, off, pd);
        for r in 0..4 {
            for c in 0..4 {
                assert!((back[r][c] - a[r][c]).abs() < 1e-9, "{a:?} -> {back:?}");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let dims = [5, 4, 3];
    let data: Vec<f32> = (0..60).map(|v| v as f32 - 1000.0).collect();
    let vol = segvol::io::nifti::Volume::from_grid(
        "grid".into(),
        dims,
        data,
        cases[3],
        segvol::io::nifti::NiftiDtype::I16,
    )
    .unwrap();
    let mask: Vec<u8> = (0..60).map(|v| (v % 2) as u8).collect();
    let out = dir.path().join("m.nii.gz");
    segvol::io::nifti::write_mask(&out, &vol, &mask).unwrap();
    let back = segvol::io::nifti::read_volume(&out).unwrap();
    assert_eq!(back.dims, dims);
    let (s, q) = (back.header.sform_affine(), back.header.qform_affine());
    for r in 0..4 {
        for c in 0..4 {
            // f32 header fields.
            assert!((s[r][c] - cases[3][r][c]).abs() < 1e-4, "sform {s:?}");
            assert!((q[r][c] - cases[3][r][c]).abs() < 1e-4, "qform {q:?}");
        }
    }
    assert_eq!(
        back.data,
        mask.iter().map(|&m| m as f32).collect::<Vec<_>>()
    );
    // A grid that does not match its data is refused, naming it.
    let err = segvol::io::nifti::Volume::from_grid(
        "grid".into(),
        dims,
        vec![0.0; 59],
        cases[0],
        segvol::io::nifti::NiftiDtype::I16,
    )
    .unwrap_err();
    assert!(err.to_string().contains("grid"), "{err}");
}
