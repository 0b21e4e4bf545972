//! Structure-aware fuzzing of the NIfTI reader (issue 9, "A fuzz harness that stays"):
//! proptest mutations of the fixture CTs (gunzipped, and re-gzipped) — header fields (dims,
//! datatype, bitpix, vox_offset, pixdim, scl_slope/inter, qform/sform codes and values, magic,
//! sizeof_hdr), random byte flips, truncation and trailing data — through
//! `read_volume_bytes` and `read_volume` on temporary files. Every case must end in `Ok` or a
//! typed error, under the 4 GiB address-space cap, never a panic. More cases:
//! `SEGVOL_FUZZ_CASES=20000 cargo test --release --test fuzz_nifti`.

mod common;

use proptest::prelude::*;
use segvol::io::nifti::{read_volume, read_volume_bytes};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::OnceLock;

/// The fixture CTs, decompressed.
fn seeds() -> &'static [Vec<u8>] {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        ["example_ct_sm_sub64.nii.gz", "example_ct_sm.nii.gz"]
            .iter()
            .map(|n| {
                let raw = std::fs::read(common::fixtures().join("data").join(n)).unwrap();
                let mut out = Vec::new();
                flate2::read::MultiGzDecoder::new(&raw[..])
                    .read_to_end(&mut out)
                    .unwrap();
                out
            })
            .collect()
    })
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// One mutation of a NIfTI-1 file (offsets from nifti1.h).
#[derive(Clone, Debug)]
enum Mutation {
    /// A 16-bit header field: sizeof_hdr halves, dim[0..8], datatype, bitpix, qform/sform codes.
    I16 { at: usize, value: i16 },
    /// A 32-bit float field: pixdim, vox_offset, scl_slope/inter, quatern, qoffset, srow.
    F32 { at: usize, value: f32 },
    /// The magic.
    Magic([u8; 4]),
    /// sizeof_hdr.
    SizeofHdr(i32),
    /// A byte anywhere.
    Byte { at: usize, value: u8 },
    /// Keep only this fraction (per mille) of the file.
    Truncate(u16),
    /// Append this many bytes.
    Trailing(u32),
}

fn i16_field() -> impl Strategy<Value = usize> {
    // dim[0..8], datatype, bitpix, qform_code, sform_code
    prop_oneof![
        (0usize..8).prop_map(|i| 40 + 2 * i),
        Just(70),
        Just(72),
        Just(252),
        Just(254),
    ]
}

fn f32_field() -> impl Strategy<Value = usize> {
    prop_oneof![
        (0usize..8).prop_map(|i| 76 + 4 * i),   // pixdim
        Just(108),                              // vox_offset
        Just(112),                              // scl_slope
        Just(116),                              // scl_inter
        (0usize..6).prop_map(|i| 256 + 4 * i),  // quatern, qoffset
        (0usize..12).prop_map(|i| 280 + 4 * i), // srow
    ]
}

fn interesting_i16() -> impl Strategy<Value = i16> {
    prop_oneof![
        any::<i16>(),
        Just(0),
        Just(1),
        Just(-1),
        Just(i16::MAX),
        Just(i16::MIN),
        prop::sample::select(vec![
            2i16, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 2304
        ]),
        0i16..8,
    ]
}

fn interesting_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<f32>(),
        Just(0.0),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(1e30),
        Just(-1e30),
        Just(352.0),
        Just(1e12),
        -1e4f32..1e4,
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (i16_field(), interesting_i16()).prop_map(|(at, value)| Mutation::I16 { at, value }),
        3 => (f32_field(), interesting_f32()).prop_map(|(at, value)| Mutation::F32 { at, value }),
        1 => prop::sample::select(vec![*b"n+1\0", *b"ni1\0", *b"n+2\0", *b"xxxx"]).prop_map(Mutation::Magic),
        1 => prop_oneof![Just(348), Just(540), Just(0), any::<i32>(), Just(0x5c01_0000)].prop_map(Mutation::SizeofHdr),
        2 => (0usize..400, any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        1 => (0u16..1000).prop_map(Mutation::Truncate),
        1 => (0u32..100_000).prop_map(Mutation::Trailing),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| {
        if at + v.len() <= b.len() {
            b[at..at + v.len()].copy_from_slice(v);
        }
    };
    match m {
        Mutation::I16 { at, value } => put(b, *at, &value.to_le_bytes()),
        Mutation::F32 { at, value } => put(b, *at, &value.to_le_bytes()),
        Mutation::Magic(v) => put(b, 344, v),
        Mutation::SizeofHdr(v) => put(b, 0, &v.to_le_bytes()),
        Mutation::Byte { at, value } => put(b, *at, &[*value]),
        Mutation::Truncate(pm) => {
            let n = b.len() * *pm as usize / 1000;
            b.truncate(n);
        }
        Mutation::Trailing(n) => b.resize(b.len() + *n as usize, 0xA5),
    }
}

/// Every outcome is a value: Ok with consistent dims, or a typed error (never a panic).
fn check(r: segvol::Result<segvol::io::nifti::Volume>) -> Result<(), TestCaseError> {
    match r {
        Ok(v) => {
            prop_assert_eq!(v.data.len(), v.dims.iter().product::<usize>());
            prop_assert!(v.data.iter().all(|x| x.is_finite()));
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(!msg.is_empty() && !msg.contains('\n'), "{}", msg);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(common::fuzz::config(256))]

    #[test]
    fn mutated_nifti_bytes_read_or_fail_cleanly(
        seed in 0usize..2,
        muts in prop::collection::vec(mutation(), 1..5),
        gz in any::<bool>(),
    ) {
        common::fuzz::cap_memory();
        let mut b = seeds()[seed].clone();
        for m in &muts {
            apply(&mut b, m);
        }
        let b = if gz { gzip(&b) } else { b };
        check(read_volume_bytes(b, Path::new("fuzz.nii")))?;
    }

    #[test]
    fn mutated_nifti_files_read_or_fail_cleanly(
        muts in prop::collection::vec(mutation(), 1..4),
        gz in any::<bool>(),
        cut_gz in prop::option::of(0u16..1000),
    ) {
        common::fuzz::cap_memory();
        let mut b = seeds()[0].clone();
        for m in &muts {
            apply(&mut b, m);
        }
        let mut b = if gz { gzip(&b) } else { b };
        if let (true, Some(pm)) = (gz, cut_gz) {
            let n = b.len() * pm as usize / 1000;
            b.truncate(n);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(if gz { "f.nii.gz" } else { "f.nii" });
        std::fs::write(&p, &b).unwrap();
        let r = read_volume(&p);
        if let Err(e) = &r {
            let m = e.to_string();
            prop_assert!(m.contains("f.nii"), "{}", m);
        }
        check(r)?;
    }
}
