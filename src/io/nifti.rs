//! NIfTI volumes in, masks on the original grid out (spec §6.1 and §6.9; DESIGN.md,
//! "Coordinates and conventions").
//!
//! Reading: `.nii` or `.nii.gz` (gzip found by its magic bytes, not by the name), NIfTI-1 or
//! NIfTI-2, either byte order, datatypes uint8/int8/int16/uint16/int32/float32/float64, with
//! `scl_slope`/`scl_inter` applied. The voxels come back as f32 in file order (i fastest), which
//! is the array MONAI's `LoadImage` yields before `DimTranspose` (spec §6.1). No reorientation and
//! no resampling.
//!
//! Writing: the mask (uint8, 0/1) or a float volume with the input's header (spec §6.9 (B)
//! step 4: the reference saves with the CT's affine and header through nibabel); see
//! [`write_mask`] for which fields change. For the fixture masks the result is byte for byte the
//! file nibabel wrote.
//!
//! What the `nifti` crate (0.18, default features off) does here and where it falls short:
//! - Used: parsing the NIfTI-1 header (`nifti::NiftiHeader::from_reader`). Its parser does not
//!   check `sizeof_hdr` and guesses the byte order from `dim[0]`, so the byte order is decided
//!   here from `sizeof_hdr` and the two are cross-checked.
//! - Not used for the voxels. Its readers pick gzip by the file name only, inflate through a
//!   streaming `GzDecoder` behind a `BufReader` into a growing `Vec`, and, without its `ndarray`
//!   feature, give f32 values one voxel at a time (`get_f32`: index arithmetic and a dtype
//!   dispatch per voxel). Measured with `cargo test --release --test nifti -- --ignored
//!   --nocapture read_speed` (2-core shared host, best of 5), on the 512x512x20 int16 CT: its
//!   read 42 ms + `get_f32` 56 ms (106 MB/s of decompressed data) against 38 ms (277 MB/s) here;
//!   on a 512x512x300 int16 file: 1.5 s (104 MB/s) against 0.70 s (225 MB/s).
//! - Missing: NIfTI-2; its writer needs the `ndarray` feature.
//!
//! Instead, only what the header declares is read: the header first (streamed through flate2
//! for gzip), then exactly `vox_offset + voxels x size` bytes, after bounding that size by
//! [`MAX_VOXELS`] and by what the file can hold (its size, or 1032x it for gzip). Only regular
//! files are read. A gzip file whose ISIZE trailer equals that size is inflated in one call with
//! libdeflate (~500-600 MB/s against ~350 MB/s with flate2 + zlib-rs, best runs), accepted only
//! with a matching CRC-32; anything else (several members, trailing data, a member over 4 GiB,
//! a corrupt stream) streams through flate2's `MultiGzDecoder` limited to that size, which is
//! also the authority on what is wrong with a corrupt or truncated stream. The conversion to
//! f32 runs in parallel chunks with the
//! non-finite check fused in.

use super::coords::{self, Affine};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Voxel types this reader accepts (NIfTI `datatype` codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NiftiDtype {
    /// `DT_UINT8` (2).
    U8,
    /// `DT_INT8` (256).
    I8,
    /// `DT_INT16` (4).
    I16,
    /// `DT_UINT16` (512).
    U16,
    /// `DT_INT32` (8).
    I32,
    /// `DT_FLOAT32` (16).
    F32,
    /// `DT_FLOAT64` (64).
    F64,
}

impl NiftiDtype {
    /// The type for a header `datatype` code, if supported.
    pub const fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            256 => Self::I8,
            4 => Self::I16,
            512 => Self::U16,
            8 => Self::I32,
            16 => Self::F32,
            64 => Self::F64,
            _ => return None,
        })
    }

    /// The header `datatype` code.
    pub const fn code(self) -> i16 {
        match self {
            Self::U8 => 2,
            Self::I8 => 256,
            Self::I16 => 4,
            Self::U16 => 512,
            Self::I32 => 8,
            Self::F32 => 16,
            Self::F64 => 64,
        }
    }

    /// Bytes per voxel.
    pub const fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    /// The standard's name (`uint8`, `int16`, ...).
    pub const fn name(self) -> &'static str {
        datatype_name(self.code())
    }
}

/// The name of any NIfTI datatype code, for messages.
const fn datatype_name(code: i16) -> &'static str {
    match code {
        0 => "unknown",
        1 => "binary",
        2 => "uint8",
        4 => "int16",
        8 => "int32",
        16 => "float32",
        32 => "complex64",
        64 => "float64",
        128 => "rgb24",
        256 => "int8",
        512 => "uint16",
        768 => "uint32",
        1024 => "int64",
        1280 => "uint64",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "rgba32",
        _ => "not a NIfTI datatype",
    }
}

/// Which header layout a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NiftiVersion {
    /// 348-byte header, magic `n+1`.
    One,
    /// 540-byte header, magic `n+2`.
    Two,
}

impl NiftiVersion {
    /// Header size in bytes (`sizeof_hdr`).
    pub const fn header_size(self) -> usize {
        match self {
            Self::One => 348,
            Self::Two => 540,
        }
    }
}

/// The ANALYZE 7.5 leftovers of a NIfTI-1 header (unused by NIfTI). Kept so that a rewritten
/// header is the input's byte for byte where it should be; all zero for NIfTI-2 input.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Analyze75 {
    pub data_type: [u8; 10],
    pub db_name: [u8; 18],
    pub extents: i32,
    pub session_error: i16,
    pub regular: u8,
    pub glmax: i32,
    pub glmin: i32,
}

/// Every header field of a NIfTI-1 or NIfTI-2 file, in the wider NIfTI-2 types (a NIfTI-1 value
/// converts exactly). Enough to rewrite the file's header; extensions are not kept.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub version: NiftiVersion,
    /// The byte order of the source file (output is always little-endian).
    pub big_endian: bool,
    pub dim_info: u8,
    /// `dim[0]` = number of dimensions, `dim[1..=dim[0]]` = sizes.
    pub dim: [i64; 8],
    pub intent_p: [f64; 3],
    pub intent_code: i32,
    pub datatype: i16,
    pub bitpix: i16,
    pub slice_start: i64,
    /// `pixdim[0]` = qfac, `pixdim[1..4]` = voxel size.
    pub pixdim: [f64; 8],
    /// Byte offset of the voxels (after the header and any extensions).
    pub vox_offset: i64,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub slice_end: i64,
    pub slice_code: i32,
    pub xyzt_units: i32,
    pub cal_max: f64,
    pub cal_min: f64,
    pub slice_duration: f64,
    pub toffset: f64,
    pub descrip: [u8; 80],
    pub aux_file: [u8; 24],
    pub qform_code: i32,
    pub sform_code: i32,
    /// `quatern_b`, `quatern_c`, `quatern_d`.
    pub quatern: [f64; 3],
    /// `qoffset_x`, `qoffset_y`, `qoffset_z`.
    pub qoffset: [f64; 3],
    /// `srow_x`, `srow_y`, `srow_z`.
    pub srow: [[f64; 4]; 3],
    pub intent_name: [u8; 16],
    pub analyze: Analyze75,
}

/// Reads header fields at fixed offsets in either byte order.
struct Fields<'a> {
    b: &'a [u8],
    be: bool,
}

impl Fields<'_> {
    fn arr<const N: usize>(&self, at: usize) -> [u8; N] {
        self.b[at..at + N]
            .try_into()
            .expect("header bounds checked")
    }
    fn i16(&self, at: usize) -> i16 {
        let a = self.arr(at);
        if self.be {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }
    fn i32(&self, at: usize) -> i32 {
        let a = self.arr(at);
        if self.be {
            i32::from_be_bytes(a)
        } else {
            i32::from_le_bytes(a)
        }
    }
    fn i64(&self, at: usize) -> i64 {
        let a = self.arr(at);
        if self.be {
            i64::from_be_bytes(a)
        } else {
            i64::from_le_bytes(a)
        }
    }
    fn f64(&self, at: usize) -> f64 {
        f64::from_bits(self.i64(at) as u64)
    }
}

/// Little-endian header serialisation.
struct Out(Vec<u8>);

impl Out {
    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }
    fn i16(&mut self, at: usize, v: i16) {
        self.put(at, &v.to_le_bytes());
    }
    fn i32(&mut self, at: usize, v: i32) {
        self.put(at, &v.to_le_bytes());
    }
    fn i64(&mut self, at: usize, v: i64) {
        self.put(at, &v.to_le_bytes());
    }
    fn f32(&mut self, at: usize, v: f64) {
        self.put(at, &(v as f32).to_le_bytes());
    }
    fn f64(&mut self, at: usize, v: f64) {
        self.put(at, &v.to_le_bytes());
    }
}

const NIFTI2_MAGIC: &[u8; 8] = b"n+2\0\r\n\x1a\n";

impl Header {
    /// Parses the header at the start of `bytes` (decompressed file content). `path` is only
    /// used in error messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Header> {
        let bad = |msg: String| Error::format(path, msg);
        if bytes.len() < 4 {
            return Err(bad(format!("not a NIfTI file: only {} bytes", bytes.len())));
        }
        let first: [u8; 4] = bytes[..4].try_into().expect("length checked");
        let (le, be) = (i32::from_le_bytes(first), i32::from_be_bytes(first));
        let (version, big_endian) = match (le, be) {
            (348, _) => (NiftiVersion::One, false),
            (_, 348) => (NiftiVersion::One, true),
            (540, _) => (NiftiVersion::Two, false),
            (_, 540) => (NiftiVersion::Two, true),
            _ => {
                return Err(bad(format!(
                    "not a NIfTI file: sizeof_hdr reads {le} (little-endian) or {be} \
                     (big-endian), expected 348 (NIfTI-1) or 540 (NIfTI-2)"
                )))
            }
        };
        let need = version.header_size();
        if bytes.len() < need {
            return Err(bad(format!(
                "truncated header: {} bytes, a NIfTI-{} header has {need}",
                bytes.len(),
                if version == NiftiVersion::One { 1 } else { 2 }
            )));
        }
        let h = match version {
            NiftiVersion::One => Self::parse_v1(&bytes[..need], big_endian, path)?,
            NiftiVersion::Two => Self::parse_v2(&bytes[..need], big_endian, path)?,
        };
        let nd = h.dim[0];
        if !(1..=7).contains(&nd) {
            return Err(bad(format!(
                "dim[0] = {nd} is not a number of dimensions (1..7)"
            )));
        }
        Ok(h)
    }

    /// NIfTI-1 through the `nifti` crate's parser (which picks the byte order from `dim[0]`).
    fn parse_v1(b: &[u8], big_endian: bool, path: &Path) -> Result<Header> {
        let h = ::nifti::NiftiHeader::from_reader(b).map_err(|e| match e {
            ::nifti::NiftiError::InvalidFormat => Error::format(
                path,
                format!(
                    "not a NIfTI-1 file: magic {:?}, expected \"n+1\"",
                    String::from_utf8_lossy(&b[344..348])
                ),
            ),
            e => Error::format(path, format!("bad NIfTI-1 header: {e}")),
        })?;
        let parsed_be = h.endianness == ::nifti::Endianness::Big;
        if parsed_be != big_endian || h.sizeof_hdr != 348 {
            // The crate flips the byte order when dim[0] > 7 in the order sizeof_hdr gave.
            let f = Fields { b, be: big_endian };
            return Err(Error::format(
                path,
                format!(
                    "dim[0] = {} is not a number of dimensions (1..7)",
                    f.i16(40)
                ),
            ));
        }
        if &h.magic == b"ni1\0" {
            return Err(Error::format(
                path,
                "is the header of a .hdr/.img pair (magic \"ni1\"); only single-file .nii / \
                 .nii.gz is supported",
            ));
        }
        if !h.vox_offset.is_finite() || h.vox_offset.fract() != 0.0 {
            return Err(Error::format(
                path,
                format!("vox_offset = {} is not a byte offset", h.vox_offset),
            ));
        }
        let mut descrip = [0u8; 80];
        descrip.copy_from_slice(&h.descrip[..80]);
        let w = |a: [f32; 4]| a.map(f64::from);
        Ok(Header {
            version: NiftiVersion::One,
            big_endian,
            dim_info: h.dim_info,
            // The crate reads dim as u16; the standard's type is int16.
            dim: h.dim.map(|d| d as i16 as i64),
            intent_p: [h.intent_p1, h.intent_p2, h.intent_p3].map(f64::from),
            intent_code: h.intent_code.into(),
            datatype: h.datatype,
            bitpix: h.bitpix,
            slice_start: h.slice_start.into(),
            pixdim: h.pixdim.map(f64::from),
            vox_offset: h.vox_offset as i64,
            scl_slope: h.scl_slope.into(),
            scl_inter: h.scl_inter.into(),
            slice_end: h.slice_end.into(),
            slice_code: h.slice_code.into(),
            xyzt_units: h.xyzt_units.into(),
            cal_max: h.cal_max.into(),
            cal_min: h.cal_min.into(),
            slice_duration: h.slice_duration.into(),
            toffset: h.toffset.into(),
            descrip,
            aux_file: h.aux_file,
            qform_code: h.qform_code.into(),
            sform_code: h.sform_code.into(),
            quatern: [h.quatern_b, h.quatern_c, h.quatern_d].map(f64::from),
            qoffset: [h.quatern_x, h.quatern_y, h.quatern_z].map(f64::from),
            srow: [w(h.srow_x), w(h.srow_y), w(h.srow_z)],
            intent_name: h.intent_name,
            analyze: Analyze75 {
                data_type: h.data_type,
                db_name: h.db_name,
                extents: h.extents,
                session_error: h.session_error,
                regular: h.regular,
                glmax: h.glmax,
                glmin: h.glmin,
            },
        })
    }

    /// NIfTI-2 (the `nifti` crate has no NIfTI-2 support). Offsets from `nifti2.h`.
    fn parse_v2(b: &[u8], big_endian: bool, path: &Path) -> Result<Header> {
        if &b[4..8] != b"n+2\0" {
            let msg = if &b[4..8] == b"ni2\0" {
                "is the header of a .hdr/.img pair (magic \"ni2\"); only single-file .nii / \
                 .nii.gz is supported"
                    .to_string()
            } else {
                format!(
                    "not a NIfTI-2 file: magic {:?}, expected \"n+2\"",
                    String::from_utf8_lossy(&b[4..12])
                )
            };
            return Err(Error::format(path, msg));
        }
        if &b[4..12] != NIFTI2_MAGIC {
            return Err(Error::format(
                path,
                "NIfTI-2 magic is damaged (bytes 8..12 should be \\r\\n\\x1a\\n): the file was \
                 probably transferred in text mode",
            ));
        }
        let f = Fields { b, be: big_endian };
        let f8 = |at: usize| -> [f64; 8] { std::array::from_fn(|i| f.f64(at + 8 * i)) };
        let f3 = |at: usize| -> [f64; 3] { std::array::from_fn(|i| f.f64(at + 8 * i)) };
        let f4 = |at: usize| -> [f64; 4] { std::array::from_fn(|i| f.f64(at + 8 * i)) };
        Ok(Header {
            version: NiftiVersion::Two,
            big_endian,
            datatype: f.i16(12),
            bitpix: f.i16(14),
            dim: std::array::from_fn(|i| f.i64(16 + 8 * i)),
            intent_p: f3(80),
            pixdim: f8(104),
            vox_offset: f.i64(168),
            scl_slope: f.f64(176),
            scl_inter: f.f64(184),
            cal_max: f.f64(192),
            cal_min: f.f64(200),
            slice_duration: f.f64(208),
            toffset: f.f64(216),
            slice_start: f.i64(224),
            slice_end: f.i64(232),
            descrip: f.arr(240),
            aux_file: f.arr(320),
            qform_code: f.i32(344),
            sform_code: f.i32(348),
            quatern: f3(352),
            qoffset: f3(376),
            srow: [f4(400), f4(432), f4(464)],
            slice_code: f.i32(496),
            xyzt_units: f.i32(500),
            intent_code: f.i32(504),
            intent_name: f.arr(508),
            dim_info: b[524],
            analyze: Analyze75::default(),
        })
    }

    /// The header in its own version's layout, little-endian, followed by the 4-byte extender
    /// `[0,0,0,0]` (no extensions), with `vox_offset` = header size + 4 (352 or 544).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self.version {
            NiftiVersion::One => self.to_bytes_v1(),
            NiftiVersion::Two => self.to_bytes_v2(),
        }
    }

    fn to_bytes_v1(&self) -> Vec<u8> {
        // A NIfTI-1 header only ever comes from a NIfTI-1 file, so every value fits its field.
        let mut o = Out(vec![0u8; 352]);
        let a = &self.analyze;
        o.i32(0, 348);
        o.put(4, &a.data_type);
        o.put(14, &a.db_name);
        o.i32(32, a.extents);
        o.i16(36, a.session_error);
        o.put(38, &[a.regular, self.dim_info]);
        for (i, &d) in self.dim.iter().enumerate() {
            o.i16(40 + 2 * i, d as i16);
        }
        for (i, &p) in self.intent_p.iter().enumerate() {
            o.f32(56 + 4 * i, p);
        }
        o.i16(68, self.intent_code as i16);
        o.i16(70, self.datatype);
        o.i16(72, self.bitpix);
        o.i16(74, self.slice_start as i16);
        for (i, &p) in self.pixdim.iter().enumerate() {
            o.f32(76 + 4 * i, p);
        }
        o.f32(108, 352.0);
        o.f32(112, self.scl_slope);
        o.f32(116, self.scl_inter);
        o.i16(120, self.slice_end as i16);
        o.put(122, &[self.slice_code as u8, self.xyzt_units as u8]);
        o.f32(124, self.cal_max);
        o.f32(128, self.cal_min);
        o.f32(132, self.slice_duration);
        o.f32(136, self.toffset);
        o.i32(140, a.glmax);
        o.i32(144, a.glmin);
        o.put(148, &self.descrip);
        o.put(228, &self.aux_file);
        o.i16(252, self.qform_code as i16);
        o.i16(254, self.sform_code as i16);
        for i in 0..3 {
            o.f32(256 + 4 * i, self.quatern[i]);
            o.f32(268 + 4 * i, self.qoffset[i]);
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                o.f32(280 + 16 * r + 4 * c, v);
            }
        }
        o.put(328, &self.intent_name);
        o.put(344, b"n+1\0");
        o.0
    }

    fn to_bytes_v2(&self) -> Vec<u8> {
        let mut o = Out(vec![0u8; 544]);
        o.i32(0, 540);
        o.put(4, NIFTI2_MAGIC);
        o.i16(12, self.datatype);
        o.i16(14, self.bitpix);
        for (i, &d) in self.dim.iter().enumerate() {
            o.i64(16 + 8 * i, d);
        }
        for (i, &p) in self.intent_p.iter().enumerate() {
            o.f64(80 + 8 * i, p);
        }
        for (i, &p) in self.pixdim.iter().enumerate() {
            o.f64(104 + 8 * i, p);
        }
        o.i64(168, 544);
        o.f64(176, self.scl_slope);
        o.f64(184, self.scl_inter);
        o.f64(192, self.cal_max);
        o.f64(200, self.cal_min);
        o.f64(208, self.slice_duration);
        o.f64(216, self.toffset);
        o.i64(224, self.slice_start);
        o.i64(232, self.slice_end);
        o.put(240, &self.descrip);
        o.put(320, &self.aux_file);
        o.i32(344, self.qform_code);
        o.i32(348, self.sform_code);
        for i in 0..3 {
            o.f64(352 + 8 * i, self.quatern[i]);
            o.f64(376 + 8 * i, self.qoffset[i]);
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                o.f64(400 + 32 * r + 8 * c, v);
            }
        }
        o.i32(496, self.slice_code);
        o.i32(500, self.xyzt_units);
        o.i32(504, self.intent_code);
        o.put(508, &self.intent_name);
        o.put(524, &[self.dim_info]);
        o.0
    }

    /// The sform affine (`srow_x/y/z`), regardless of `sform_code`.
    pub fn sform_affine(&self) -> Affine {
        let s = &self.srow;
        [s[0], s[1], s[2], [0.0, 0.0, 0.0, 1.0]]
    }

    /// The qform affine from the quaternion, `pixdim` and `qoffset`, regardless of `qform_code`
    /// (see [`coords::qform_affine`]).
    pub fn qform_affine(&self) -> Affine {
        coords::qform_affine(
            self.quatern,
            self.qoffset,
            [
                self.pixdim[0],
                self.pixdim[1],
                self.pixdim[2],
                self.pixdim[3],
            ],
        )
    }

    /// The voxel→world affine: the sform when `sform_code > 0`, else the qform when
    /// `qform_code > 0`, else none (the standard's "method 1" pixdim scaling is not a world
    /// position, so millimetre prompts are refused on such files).
    pub fn affine(&self) -> Option<Affine> {
        if self.sform_code > 0 {
            Some(self.sform_affine())
        } else if self.qform_code > 0 {
            Some(self.qform_affine())
        } else {
            None
        }
    }

    /// The three spatial sizes (X,Y,Z) after checking that the image is one 3-D volume: 3-D,
    /// or more dimensions all of size 1 beyond the third.
    pub fn volume_dims(&self, path: &Path) -> Result<[usize; 3]> {
        let nd = self.dim[0];
        let shown = &self.dim[1..=(nd.clamp(1, 7) as usize)];
        if nd < 3 {
            return Err(Error::format(
                path,
                format!("a {nd}-D image (dim {shown:?}) is not a 3-D volume"),
            ));
        }
        for a in 1..=nd as usize {
            if self.dim[a] < 1 {
                return Err(Error::format(
                    path,
                    format!(
                        "dim[{a}] = {} is not a positive size (dim {shown:?})",
                        self.dim[a]
                    ),
                ));
            }
        }
        let extra: i64 = self.dim[4..=nd as usize].iter().product();
        if extra != 1 {
            return Err(Error::format(
                path,
                format!(
                    "a {nd}-D image with {extra} volumes (dim {shown:?}); only a single 3-D \
                     volume is supported"
                ),
            ));
        }
        Ok([0, 1, 2].map(|a| self.dim[a + 1] as usize))
    }

    /// `Some((slope, inter))` when the stored values must be scaled. As the standard says, a
    /// slope of 0 means no scaling; like nibabel, a non-finite slope also means none, while a
    /// valid slope with a non-finite intercept is an error.
    pub fn scaling(&self, path: &Path) -> Result<Option<(f64, f64)>> {
        let (m, b) = (self.scl_slope, self.scl_inter);
        if m == 0.0 || !m.is_finite() {
            return Ok(None);
        }
        if !b.is_finite() {
            return Err(Error::format(
                path,
                format!("scl_slope = {m} with a non-finite scl_inter = {b}"),
            ));
        }
        Ok(if m == 1.0 && b == 0.0 {
            None
        } else {
            Some((m, b))
        })
    }
}

impl Header {
    /// A NIfTI-1 header for a float32 volume of `dims` (X,Y,Z) on `affine`, for volumes that
    /// come from another format (DICOM, NRRD, an array): the sform is `affine` exactly
    /// (`sform_code` 1, scanner), the qform its rotation and steps ([`coords::qform_params`],
    /// `qform_code` 1), units millimetres and seconds. Masks written on such a volume carry
    /// this geometry.
    pub fn for_grid(dims: [usize; 3], affine: &Affine) -> Header {
        let (quatern, qoffset, pd) = coords::qform_params(affine);
        let mut descrip = [0u8; 80];
        let text = concat!("segvol ", env!("CARGO_PKG_VERSION"));
        descrip[..text.len()].copy_from_slice(text.as_bytes());
        Header {
            version: NiftiVersion::One,
            big_endian: false,
            dim_info: 0,
            dim: [
                3,
                dims[0] as i64,
                dims[1] as i64,
                dims[2] as i64,
                1,
                1,
                1,
                1,
            ],
            intent_p: [0.0; 3],
            intent_code: 0,
            datatype: NiftiDtype::F32.code(),
            bitpix: 32,
            slice_start: 0,
            pixdim: [pd[0], pd[1], pd[2], pd[3], 0.0, 0.0, 0.0, 0.0],
            vox_offset: 352,
            scl_slope: 1.0,
            scl_inter: 0.0,
            slice_end: 0,
            slice_code: 0,
            // NIFTI_UNITS_MM | NIFTI_UNITS_SEC
            xyzt_units: 2 | 8,
            cal_max: 0.0,
            cal_min: 0.0,
            slice_duration: 0.0,
            toffset: 0.0,
            descrip,
            aux_file: [0; 24],
            qform_code: 1,
            sform_code: 1,
            quatern,
            qoffset,
            srow: [affine[0], affine[1], affine[2]],
            intent_name: [0; 16],
            analyze: Analyze75::default(),
        }
    }
}

/// A CT volume as read from a NIfTI file.
///
/// `data` is in file order, i fastest: element `i + X*(j + Y*k)` is voxel (i,j,k). Read as a
/// row-major array that is exactly the model's (D,H,W) = (Z,Y,X) volume (spec §6.1: MONAI loads
/// (X,Y,Z) and `DimTranspose` swaps the first and last axes), so no transpose is needed
/// anywhere: use [`Volume::model_dims`] as its shape.
#[derive(Clone)]
pub struct Volume {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// (X,Y,Z) = the file's (i,j,k) sizes.
    pub dims: [usize; 3],
    /// Voxels after `scl_slope`/`scl_inter`, file order, i fastest; all finite.
    pub data: Vec<f32>,
    /// `pixdim[1..4]` (voxel size along i, j, k, in the file's spatial unit).
    pub spacing: [f32; 3],
    /// The full header, to write outputs on the same grid.
    pub header: Header,
    /// The voxel→world affine (sform if `sform_code > 0`, else qform if `qform_code > 0`).
    pub affine: Option<Affine>,
    /// Wall time of [`read_volume`], seconds.
    pub read_seconds: f64,
    /// The stored voxel type.
    pub source_dtype: NiftiDtype,
}

impl Volume {
    /// A volume read from a format other than NIfTI (DICOM, NRRD, an array): `data` in file
    /// order (i fastest) on a grid of `dims` (X,Y,Z) with the voxel→world `affine` (RAS mm,
    /// the NIfTI convention). Its header is [`Header::for_grid`], so masks written on it are
    /// NIfTI files with this geometry; `path` names it in messages.
    pub fn from_grid(
        path: PathBuf,
        dims: [usize; 3],
        data: Vec<f32>,
        affine: Affine,
        source_dtype: NiftiDtype,
    ) -> Result<Volume> {
        let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if dims.contains(&0) || n != Some(data.len()) {
            return Err(Error::format(
                &path,
                format!(
                    "a {}x{}x{} grid needs {} voxels, {} given",
                    dims[0],
                    dims[1],
                    dims[2],
                    n.map_or("too many".into(), |n| n.to_string()),
                    data.len()
                ),
            ));
        }
        let header = Header::for_grid(dims, &affine);
        let spacing = [1, 2, 3].map(|a| header.pixdim[a] as f32);
        let v = Volume {
            path,
            dims,
            data,
            spacing,
            header,
            affine: Some(affine),
            read_seconds: 0.0,
            source_dtype,
        };
        v.check_finite()?;
        Ok(v)
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .field("dims", &self.dims)
            .field("spacing", &self.spacing)
            .field("affine", &self.affine)
            .field("source_dtype", &self.source_dtype)
            .field("read_seconds", &self.read_seconds)
            .finish_non_exhaustive()
    }
}

impl Volume {
    /// The shape of `data` as the model's row-major (D,H,W) = (Z,Y,X) volume.
    pub fn model_dims(&self) -> [usize; 3] {
        [self.dims[2], self.dims[1], self.dims[0]]
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the volume has no voxel (never true for a volume that was read).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index into `data` of voxel (i,j,k).
    pub fn index(&self, ijk: [usize; 3]) -> usize {
        ijk[0] + self.dims[0] * (ijk[1] + self.dims[1] * ijk[2])
    }

    /// Voxel (i,j,k) of a flat index into `data`.
    pub fn ijk(&self, index: usize) -> [usize; 3] {
        let [x, y, _] = self.dims;
        [index % x, (index / x) % y, index / (x * y)]
    }

    /// An `Error::Input` naming the file and the first voxel (i,j,k) that is NaN or infinite.
    pub fn check_finite(&self) -> Result<()> {
        match self.data.par_iter().position_first(|v| !v.is_finite()) {
            None => Ok(()),
            Some(n) => {
                let [i, j, k] = self.ijk(n);
                Err(Error::Input(format!(
                    "{}: voxel (i,j,k) = ({i},{j},{k}) is {} (the volume must be finite)",
                    self.path.display(),
                    self.data[n]
                )))
            }
        }
    }

    /// The affine, or an error naming the file when it has none (for millimetre prompts).
    pub fn require_affine(&self) -> Result<&Affine> {
        coords::require_affine(self.affine.as_ref(), &self.path)
    }

    /// Fractional voxel coordinates (i,j,k) of a world position in millimetres.
    /// A singular affine is an error naming the file.
    pub fn voxel_from_world(&self, mm: [f64; 3]) -> Result<[f64; 3]> {
        coords::voxel_from_world(self.require_affine()?, mm).map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("{}: {m}", self.path.display())),
            e => e,
        })
    }

    /// The voxel (i,j,k) nearest to a world position in millimetres ([`coords::nearest_voxel`]).
    pub fn nearest_voxel_from_world(&self, mm: [f64; 3]) -> Result<[usize; 3]> {
        coords::nearest_voxel(self.voxel_from_world(mm)?, self.dims)
    }

    /// World position (mm) of voxel coordinates (i,j,k).
    pub fn world_from_voxel(&self, ijk: [f64; 3]) -> Result<[f64; 3]> {
        Ok(coords::world_from_voxel(self.require_affine()?, ijk))
    }
}

/// The largest volume this reader accepts: 2^31 voxels (8 GiB as f32; a 512x512x8192 CT). A
/// header that declares more is refused before anything is allocated.
pub const MAX_VOXELS: usize = 1 << 31;

/// Deflate expands at most ~1032:1, so a gzip stream of `n` bytes never decompresses to more
/// than this: a header declaring more data than that is refused before allocating.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// Decompressed bytes read past the voxels of a gzip file to reach its CRC trailer; a longer
/// tail (trailing data) is left unread and unverified rather than inflated.
const GZIP_TAIL_CHECK: u64 = 1 << 20;

/// Reads a 3-D NIfTI volume (spec §6.1): see the module documentation for what is accepted.
/// Everything else is an error naming the file and the fault; a NaN or infinite voxel is an
/// `Error::Input` naming the first one. Only regular files are read (a FIFO, a device such as
/// `/dev/zero` or a directory is refused), and only the header and the `vox_offset +
/// voxels x size` bytes it declares: trailing data is never read into memory.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let t0 = Instant::now();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(Error::format(
            path,
            format!("is {kind}; give a .nii or .nii.gz file"),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    parse_volume(Source::File(file, meta.len()), path, t0)
}

/// [`read_volume`] on the bytes of a `.nii` or `.nii.gz` file already in memory (an embedded
/// example); `name` stands for the file in messages.
pub fn read_volume_bytes(raw: Vec<u8>, name: &Path) -> Result<Volume> {
    parse_volume(Source::Bytes(raw), name, Instant::now())
}

/// Where the (possibly compressed) file content comes from.
enum Source {
    /// A regular file and its size.
    File(std::fs::File, u64),
    Bytes(Vec<u8>),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::File(_, n) => *n,
            Source::Bytes(b) => b.len() as u64,
        }
    }

    /// A reader from the start of the content.
    fn reader(&mut self, path: &Path) -> Result<Box<dyn std::io::Read + '_>> {
        use std::io::Seek;
        match self {
            Source::File(f, _) => {
                f.seek(std::io::SeekFrom::Start(0))
                    .map_err(|e| Error::io(path, e))?;
                Ok(Box::new(std::io::BufReader::with_capacity(1 << 16, f)))
            }
            Source::Bytes(b) => Ok(Box::new(&b[..])),
        }
    }

    /// Up to `n` bytes from `at`.
    fn bytes_at(&mut self, at: u64, n: usize, path: &Path) -> Result<Vec<u8>> {
        use std::io::{Read, Seek};
        match self {
            Source::File(f, _) => {
                f.seek(std::io::SeekFrom::Start(at))
                    .map_err(|e| Error::io(path, e))?;
                let mut out = Vec::with_capacity(n);
                f.take(n as u64)
                    .read_to_end(&mut out)
                    .map_err(|e| Error::io(path, e))?;
                Ok(out)
            }
            Source::Bytes(b) => {
                let s = (at as usize).min(b.len());
                Ok(b[s..(s + n).min(b.len())].to_vec())
            }
        }
    }
}

/// Reads up to `n` bytes (fewer only at the end of the stream).
fn read_up_to(r: impl std::io::Read, n: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    r.take(n).read_to_end(out).map(|_| ())
}

fn gzip_error(path: &Path, e: std::io::Error) -> Error {
    Error::format(path, format!("corrupt or truncated gzip data: {e}"))
}

fn parse_volume(mut src: Source, path: &Path, t0: Instant) -> Result<Volume> {
    let total = src.len();
    let gz = src.bytes_at(0, 2, path)? == [0x1f, 0x8b];
    // The header first (the larger NIfTI-2 size is enough for either version).
    let mut head = Vec::with_capacity(NiftiVersion::Two.header_size());
    {
        let mut r = src.reader(path)?;
        let n = NiftiVersion::Two.header_size() as u64;
        if gz {
            read_up_to(&mut flate2::read::MultiGzDecoder::new(r), n, &mut head)
                .map_err(|e| gzip_error(path, e))?;
        } else {
            read_up_to(&mut r, n, &mut head).map_err(|e| Error::io(path, e))?;
        }
    }
    let header = Header::parse(&head, path)?;
    let dims = header.volume_dims(path)?;
    let dtype = NiftiDtype::from_code(header.datatype).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "unsupported datatype {} ({}); supported: uint8, int8, int16, uint16, int32, \
                 float32, float64",
                header.datatype,
                datatype_name(header.datatype)
            ),
        )
    })?;
    let min_offset = header.version.header_size() as i64;
    if header.vox_offset < min_offset {
        return Err(Error::format(
            path,
            format!(
                "vox_offset = {} points inside the {min_offset}-byte header",
                header.vox_offset
            ),
        ));
    }
    let [x, y, z] = dims;
    let nvox = x
        .checked_mul(y)
        .and_then(|n| n.checked_mul(z))
        .filter(|&n| n <= MAX_VOXELS)
        .ok_or_else(|| {
            Error::format(
                path,
                format!("a {x}x{y}x{z} image exceeds the reader's limit of {MAX_VOXELS} voxels"),
            )
        })?;
    let offset = u64::try_from(header.vox_offset).expect("checked non-negative");
    let need = (nvox * dtype.size()) as u64;
    let end = offset
        .checked_add(need)
        .ok_or_else(|| Error::format(path, format!("vox_offset = {offset} overflows")))?;
    let truncated = |have: u64| {
        Error::format(
            path,
            format!(
                "truncated data: a {x}x{y}x{z} {} image needs {need} bytes from offset {offset}, \
                 the {} has {have} bytes in all",
                dtype.name(),
                if gz { "decompressed file" } else { "file" },
            ),
        )
    };
    // Bound what the header declares by what the file can hold, before allocating.
    if !gz && total < end {
        return Err(truncated(total));
    }
    if gz && end > total.saturating_mul(DEFLATE_MAX_RATIO) {
        return Err(Error::format(
            path,
            format!(
                "a {x}x{y}x{z} {} image from offset {offset} needs {end} bytes, more than a \
                 {total}-byte gzip file can hold",
                dtype.name()
            ),
        ));
    }
    let end_us = usize::try_from(end).map_err(|_| truncated(total))?;
    let bytes = if gz {
        gunzip(&mut src, path, end_us, &truncated)?
    } else {
        let mut out = Vec::with_capacity(end_us);
        read_up_to(&mut src.reader(path)?, end, &mut out).map_err(|e| Error::io(path, e))?;
        if out.len() < end_us {
            // The file shrank while being read.
            return Err(truncated(out.len() as u64));
        }
        out
    };
    drop(src);
    let offset = offset as usize;
    let scaling = header.scaling(path)?;
    let (data, all_finite) = convert(&bytes[offset..end_us], dtype, header.big_endian, scaling);
    if let Some((m, b)) = scaling {
        check_scaling_precision(
            &data,
            &bytes[offset..end_us],
            dtype,
            header.big_endian,
            (m, b),
            path,
        )?;
    }
    drop(bytes);
    let affine = header.affine();
    let spacing = [1, 2, 3].map(|a| header.pixdim[a] as f32);
    let mut vol = Volume {
        path: path.to_path_buf(),
        dims,
        data,
        spacing,
        header,
        affine,
        read_seconds: 0.0,
        source_dtype: dtype,
    };
    if !all_finite {
        vol.check_finite()?;
    }
    vol.read_seconds = t0.elapsed().as_secs_f64();
    Ok(vol)
}

/// A scaled volume that came out constant in f32 although its stored values differ: the
/// intercept (or slope) swamped the data range at f32's 24-bit precision. Reported as what it
/// is instead of passing on a volume that the pipeline would call constant.
fn check_scaling_precision(
    data: &[f32],
    stored: &[u8],
    dtype: NiftiDtype,
    be: bool,
    (m, b): (f64, f64),
    path: &Path,
) -> Result<()> {
    let first = match data.first() {
        Some(v) => *v,
        None => return Ok(()),
    };
    if data.par_iter().any(|v| *v != first) {
        return Ok(());
    }
    let (raw, _) = convert(stored, dtype, be, None);
    let (lo, hi) = raw
        .par_iter()
        .fold(
            || (f32::INFINITY, f32::NEG_INFINITY),
            |(l, h), &v| (l.min(v), h.max(v)),
        )
        .reduce(
            || (f32::INFINITY, f32::NEG_INFINITY),
            |a, c| (a.0.min(c.0), a.1.max(c.1)),
        );
    if lo == hi {
        return Ok(());
    }
    Err(Error::format(
        path,
        format!(
            "scl_inter = {b} (scl_slope = {m}) swamps the data range in f32: stored values \
             {lo}..{hi} all become {first}"
        ),
    ))
}

/// The first `end` decompressed bytes of a gzip file. Fast path: when the last ISIZE trailer
/// says the stream holds exactly `end` bytes, libdeflate inflates the whole file in one call,
/// accepted only when it fills the buffer exactly and the CRC-32 equals the last trailer (so a
/// multi-member file never passes as its first member). Anything else streams through flate2's
/// multi-member decoder, limited to `end` bytes (trailing data is never inflated into memory),
/// then reads on up to [`GZIP_TAIL_CHECK`] bytes into nothing so that a stream ending there has
/// its CRC checked; a truncated or corrupt stream is an error, never a short result.
fn gunzip(
    src: &mut Source,
    path: &Path,
    end: usize,
    truncated: &dyn Fn(u64) -> Error,
) -> Result<Vec<u8>> {
    let total = src.len();
    if total >= 18 {
        let trailer = src.bytes_at(total - 8, 8, path)?;
        let crc = u32::from_le_bytes(trailer[..4].try_into().expect("8 bytes"));
        let isize = u32::from_le_bytes(trailer[4..].try_into().expect("8 bytes")) as usize;
        // A compressed stream is never much larger than its content: the bound keeps a file
        // with a huge compressed tail off this path.
        if isize == end && total <= end as u64 + end as u64 / 8 + (1 << 20) {
            let mut out = vec![0u8; end];
            let raw = match src {
                Source::Bytes(b) => std::borrow::Cow::Borrowed(&b[..]),
                Source::File(..) => {
                    std::borrow::Cow::Owned(src.bytes_at(0, total as usize, path)?)
                }
            };
            let got = libdeflater::Decompressor::new().gzip_decompress(&raw, &mut out);
            if got.ok() == Some(end) && libdeflater::crc32(&out) == crc {
                return Ok(out);
            }
        }
    }
    use std::io::Read;
    let mut dec = flate2::read::MultiGzDecoder::new(src.reader(path)?);
    let mut out = Vec::with_capacity(end);
    read_up_to(&mut dec, end as u64, &mut out).map_err(|e| gzip_error(path, e))?;
    if out.len() < end {
        return Err(truncated(out.len() as u64));
    }
    std::io::copy(&mut (&mut dec).take(GZIP_TAIL_CHECK), &mut std::io::sink())
        .map_err(|e| gzip_error(path, e))?;
    Ok(out)
}

/// One stored voxel type: its size and how to load it.
trait Stored: Copy + Send + Sync {
    const N: usize;
    fn load(b: &[u8], be: bool) -> Self;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
}

macro_rules! stored {
    ($t:ty) => {
        impl Stored for $t {
            const N: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn load(b: &[u8], be: bool) -> Self {
                let a = b.try_into().expect("chunk of the element size");
                if be {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                }
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
stored!(u8);
stored!(i8);
stored!(i16);
stored!(u16);
stored!(i32);
stored!(f32);
stored!(f64);

/// Converts stored voxels to f32, in parallel chunks; returns the data and whether every value
/// is finite (integers without scaling always are, so that check is skipped).
///
/// Scaling is computed in f64 and rounded once to f32. Unscaled values are cast directly
/// (`i32 as f32` rounds to nearest, as numpy's `astype(float32)` in MONAI's loader does).
fn convert(src: &[u8], dtype: NiftiDtype, be: bool, scale: Option<(f64, f64)>) -> (Vec<f32>, bool) {
    fn run<T: Stored>(
        src: &[u8],
        be: bool,
        scale: Option<(f64, f64)>,
        check: bool,
    ) -> (Vec<f32>, bool) {
        const CHUNK: usize = 1 << 16;
        let n = src.len() / T::N;
        let mut out = vec![0f32; n];
        let ok = out
            .par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK * T::N))
            .map(|(o, s)| {
                // Separate monomorphic loops so each one vectorises.
                let words = s.chunks_exact(T::N);
                match (scale, be) {
                    (None, false) => o
                        .iter_mut()
                        .zip(words)
                        .for_each(|(o, w)| *o = T::load(w, false).to_f32()),
                    (None, true) => o
                        .iter_mut()
                        .zip(words)
                        .for_each(|(o, w)| *o = T::load(w, true).to_f32()),
                    (Some((m, b)), false) => o
                        .iter_mut()
                        .zip(words)
                        .for_each(|(o, w)| *o = (T::load(w, false).to_f64() * m + b) as f32),
                    (Some((m, b)), true) => o
                        .iter_mut()
                        .zip(words)
                        .for_each(|(o, w)| *o = (T::load(w, true).to_f64() * m + b) as f32),
                }
                !check || o.iter().fold(true, |acc, v| acc & v.is_finite())
            })
            .reduce(|| true, |a, b| a && b);
        (out, ok)
    }
    let float = matches!(dtype, NiftiDtype::F32 | NiftiDtype::F64);
    let check = float || scale.is_some();
    match dtype {
        NiftiDtype::U8 => run::<u8>(src, be, scale, check),
        NiftiDtype::I8 => run::<i8>(src, be, scale, check),
        NiftiDtype::I16 => run::<i16>(src, be, scale, check),
        NiftiDtype::U16 => run::<u16>(src, be, scale, check),
        NiftiDtype::I32 => run::<i32>(src, be, scale, check),
        NiftiDtype::F32 => run::<f32>(src, be, scale, check),
        NiftiDtype::F64 => run::<f64>(src, be, scale, check),
    }
}

/// Gzip level for outputs: libdeflate level 3 compressed a 512x512x300 mask at the speed of its
/// level 1 (~360 MB/s) to 15% fewer bytes than zlib level 3, and was 3x faster than level 6.
const GZIP_LEVEL: i32 = 3;

/// Writes a binary mask (spec §6.9) on the grid of `like`: uint8 (datatype 2, bitpix 8), one
/// byte per voxel in `like`'s file order (i fastest; equally the (D,H,W) = (Z,Y,X) model order),
/// each 0 or 1.
///
/// The header is `like`'s with only what the data changes: datatype, bitpix, `scl_slope` = 1,
/// `scl_inter` = 0, `cal_min` = `cal_max` = 0 (a CT display window means nothing for a mask),
/// no extensions (`vox_offset` 352, or 544 for NIfTI-2), little-endian. Dims, pixdim,
/// qform/sform codes and parameters, xyzt_units, descrip, intent and the rest are kept: this is
/// byte for byte the header nibabel wrote for the reference masks
/// (`tests/fixtures/tiny/pipeline-*-mask.nii.gz`). A name ending in `.gz` is gzip-compressed.
/// The file is written atomically (temporary file and rename).
pub fn write_mask(path: &Path, like: &Volume, mask: &[u8]) -> Result<()> {
    check_len(path, like, mask.len())?;
    check_labels(path, like, mask, 1)?;
    write_like(path, like, NiftiDtype::U8, 8, mask, None)
}

/// Writes a label map (uint8: 0 = background, `n` = the voxels of `names[n - 1]`) on the grid
/// of `like`, with the header rules of [`write_mask`] plus one header extension that names the
/// labels: ecode 0 holding the label table as XML in the layout TotalSegmentator writes
/// (`<CaretExtension>` with a `<LabelTable>` of `<Label Key="n">name</Label>`), so tools that
/// read TotalSegmentator's multi-label files show the names. nibabel reads it as an ordinary
/// extension; readers that ignore extensions see a plain uint8 volume.
pub fn write_label_map(path: &Path, like: &Volume, map: &[u8], names: &[String]) -> Result<()> {
    check_len(path, like, map.len())?;
    if names.is_empty() || names.len() > 255 {
        return Err(Error::Internal(format!(
            "{}: a uint8 label map holds 1 to 255 labels, {} given",
            path.display(),
            names.len()
        )));
    }
    check_labels(path, like, map, names.len())?;
    let xml = label_table_xml(names);
    write_like(
        path,
        like,
        NiftiDtype::U8,
        8,
        map,
        Some((0, xml.as_bytes())),
    )
}

/// The label-table XML of [`write_label_map`]. Names go into CDATA sections; a `]]>` inside a
/// name is split across two sections, the one sequence CDATA cannot hold.
pub fn label_table_xml(names: &[String]) -> String {
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CaretExtension>\n<VolumeInformation Index=\"0\">\n<LabelTable>\n",
    );
    x.push_str("<Label Key=\"0\" Red=\"0\" Green=\"0\" Blue=\"0\" Alpha=\"0\"><![CDATA[background]]></Label>\n");
    for (i, name) in names.iter().enumerate() {
        // A fixed, well-spread palette: golden-ratio hue steps, full saturation.
        let h = (i as f64 * 0.618_033_988_75).fract() * 6.0;
        let c = |o: f64| ((((h + o) % 6.0) - 3.0).abs() - 1.0).clamp(0.0, 1.0);
        let (r, g, b) = (c(0.0), c(4.0), c(2.0));
        x.push_str(&format!(
            "<Label Key=\"{}\" Red=\"{r:.3}\" Green=\"{g:.3}\" Blue=\"{b:.3}\" Alpha=\"1\"><![CDATA[{}]]></Label>\n",
            i + 1,
            name.replace("]]>", "]]]]><![CDATA[>")
        ));
    }
    x.push_str("</LabelTable>\n<VolumeType><![CDATA[Label]]></VolumeType>\n</VolumeInformation>\n</CaretExtension>\n");
    x
}

/// Writes a float32 volume (e.g. probabilities) on the grid of `like`, with the same header
/// rules as [`write_mask`] (datatype 16, bitpix 32).
pub fn write_volume_f32(path: &Path, like: &Volume, data: &[f32]) -> Result<()> {
    check_len(path, like, data.len())?;
    let mut payload = Vec::with_capacity(data.len() * 4);
    for v in data {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    write_like(path, like, NiftiDtype::F32, 32, &payload, None)
}

// The writers receive what segvol computed on the grid it read: a mismatch is a bug of segvol
// (exit 1), never the user's input.
fn check_len(path: &Path, like: &Volume, n: usize) -> Result<()> {
    if n != like.len() {
        let [x, y, z] = like.dims;
        return Err(Error::Internal(format!(
            "{}: {n} voxels given for a {x}x{y}x{z} grid ({} voxels)",
            path.display(),
            like.len()
        )));
    }
    Ok(())
}

fn check_labels(path: &Path, like: &Volume, map: &[u8], max: usize) -> Result<()> {
    if let Some(n) = map.iter().position(|&v| v as usize > max) {
        let [i, j, k] = like.ijk(n);
        return Err(Error::Internal(format!(
            "{}: voxel (i,j,k) = ({i},{j},{k}) holds label {}, but only 0..={max} are defined",
            path.display(),
            map[n]
        )));
    }
    Ok(())
}

fn write_like(
    path: &Path,
    like: &Volume,
    dtype: NiftiDtype,
    bitpix: i16,
    payload: &[u8],
    extension: Option<(i32, &[u8])>,
) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let gz = name.ends_with(".nii.gz");
    if !gz && !name.ends_with(".nii") {
        return Err(Error::Usage(format!(
            "{}: an output NIfTI file name must end in .nii or .nii.gz",
            path.display()
        )));
    }
    let mut h = like.header.clone();
    h.datatype = dtype.code();
    h.bitpix = bitpix;
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    let mut bytes = h.to_bytes();
    if let Some((ecode, content)) = extension {
        // The extender's first byte flags extensions; each is (esize, ecode, content) with
        // esize a multiple of 16, and vox_offset moves past them (NIfTI-1 §extensions).
        let n = bytes.len();
        bytes[n - 4] = 1;
        let esize = (8 + content.len()).div_ceil(16) * 16;
        bytes.extend_from_slice(&(esize as i32).to_le_bytes());
        bytes.extend_from_slice(&ecode.to_le_bytes());
        bytes.extend_from_slice(content);
        bytes.resize(n + esize, 0);
        let offset = bytes.len();
        match h.version {
            NiftiVersion::One => bytes[108..112].copy_from_slice(&(offset as f32).to_le_bytes()),
            NiftiVersion::Two => bytes[168..176].copy_from_slice(&(offset as i64).to_le_bytes()),
        }
    }
    bytes.extend_from_slice(payload);
    if gz {
        let mut c = libdeflater::Compressor::new(
            libdeflater::CompressionLvl::new(GZIP_LEVEL).expect("valid libdeflate level"),
        );
        let mut out = vec![0u8; c.gzip_compress_bound(bytes.len())];
        let n = c
            .gzip_compress(&bytes, &mut out)
            .map_err(|e| Error::Internal(format!("gzip of {}: {e}", path.display())))?;
        out.truncate(n);
        bytes = out;
    }
    super::write_atomic(path, &bytes)
}
