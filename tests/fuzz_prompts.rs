//! Structure-aware fuzzing of the prompt parsers (issue 9, "A fuzz harness that stays"):
//! `segment`'s volume prompts (texts, `--box`, `--point` strings in voxels or millimetres,
//! resolved against random volume sizes and affines) and `window`'s prompt JSON (mutations of a
//! valid prompt and arbitrary JSON values). Every case must end in `Ok` or a typed prompt or
//! input error of one short line, never a panic; an accepted prompt lies inside its volume or
//! window with its box min-first. More cases:
//! `SEGVOL_FUZZ_CASES=100000 cargo test --release --test fuzz_prompts`.

mod common;

use proptest::prelude::*;
use segvol::io::prompt::{parse_window_prompt, Units, VolumePrompts};
use segvol::Error;
use serde_json::{json, Value};

/// The longest message a prompt error may print (one line, numbers compact, text clipped).
const MAX_MESSAGE: usize = 400;

fn check_message(e: &Error) {
    assert!(
        matches!(e, Error::Prompt(_) | Error::Input(_)),
        "not a prompt or input error: {e:?}"
    );
    let m = e.to_string();
    assert!(!m.contains('\n'), "a message of several lines: {m:?}");
    assert!(
        m.len() <= MAX_MESSAGE,
        "a message of {} bytes: {m}",
        m.len()
    );
    assert!(
        !m.contains("18446744073709551615"),
        "a saturated number: {m}"
    );
}

/// One number as users (and typos) write it: integers, decimals, signs, exponents up to
/// overflow, non-numbers.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u32..200).prop_map(|v| v.to_string()),
        2 => (-500.0..500.0f64).prop_map(|v| format!("{v:.2}")),
        1 => (-400i32..400).prop_map(|e| format!("1e{e}")),
        1 => Just("18446744073709551616".to_string()),
        1 => prop::sample::select(vec!["", " ", "nan", "inf", "-0", "+3", "1_0", "0x10", "٣", "1,"])
            .prop_map(str::to_string),
    ]
}

/// A coordinate list: usually the right count, sometimes one more or less, odd separators.
fn coords(n: usize) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(number(), n.saturating_sub(1)..n + 2),
        prop::sample::select(vec![",", ", ", " ,", ";"]),
    )
        .prop_map(|(v, sep)| v.join(sep))
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z ]{1,20}",
        1 => "\\PC{0,40}",
        1 => (1usize..12_000).prop_map(|n| "é".repeat(n)),
        1 => Just(String::new()),
    ]
}

/// A voxel→world affine: diagonal with flips and a translation, occasionally singular or huge.
fn affine() -> impl Strategy<Value = Option<[[f64; 4]; 4]>> {
    let diag = prop_oneof![
        6 => prop::sample::select(vec![-1.5, -0.8, 0.7, 1.0, 2.5]),
        1 => Just(0.0),
        1 => Just(1e300),
    ];
    prop::option::weighted(
        0.8,
        (
            prop::array::uniform3(diag),
            prop::array::uniform3(-300.0..300.0f64),
        )
            .prop_map(|(d, t)| {
                let mut a = [[0.0; 4]; 4];
                for i in 0..3 {
                    a[i][i] = d[i];
                    a[i][3] = t[i];
                }
                a[3][3] = 1.0;
                a
            }),
    )
}

proptest! {
    #![proptest_config(common::fuzz::config(2048))]

    #[test]
    fn volume_prompts_are_ok_or_a_prompt_error(
        texts in prop::collection::vec(text(), 0..3),
        bbox in prop::option::of(coords(6)),
        points in prop::collection::vec(coords(3), 0..3),
        negative in prop::collection::vec(coords(3), 0..2),
        mm in any::<bool>(),
        dims in prop::array::uniform3(1usize..600),
        affine in affine(),
    ) {
        let units = if mm { Units::Millimetres } else { Units::Voxels };
        let parsed = VolumePrompts::parse(&texts, bbox.as_deref(), &points, &negative, units);
        let spec = match parsed {
            Ok(s) => s,
            Err(e) => {
                check_message(&e);
                return Ok(());
            }
        };
        match spec.resolve(dims, affine.as_ref()) {
            Err(e) => check_message(&e),
            Ok(prompts) => {
                prop_assert_eq!(prompts.len(), texts.len().max(1));
                for p in &prompts {
                    prop_assert_eq!(p.points.len(), points.len() + negative.len());
                    for q in &p.points {
                        prop_assert!((0..3).all(|a| q[a] < dims[a]), "{:?} outside {:?}", q, dims);
                    }
                    if let Some(b) = p.bbox {
                        prop_assert!((0..3).all(|a| b[a] <= b[a + 3] && b[a + 3] < dims[a]), "box {:?}", b);
                    }
                }
            }
        }
    }

    #[test]
    fn window_prompt_mutations_are_ok_or_a_prompt_error(
        value in window_prompt(),
        window in prop::array::uniform3(1usize..128),
    ) {
        match parse_window_prompt(&value, window) {
            Err(e) => check_message(&e),
            Ok(p) => {
                prop_assert_eq!(p.points.len(), p.labels.len());
                for q in &p.points {
                    prop_assert!((0..3).all(|a| q[a] >= 0.0 && q[a] <= (window[a] - 1) as f32));
                }
                if let Some(b) = p.bbox {
                    prop_assert!((0..3).all(|a| b[a] <= b[a + 3]), "box {:?}", b);
                }
            }
        }
    }

    #[test]
    fn arbitrary_json_is_ok_or_a_prompt_error(value in any_json()) {
        if let Err(e) = parse_window_prompt(&value, [32, 64, 64]) {
            check_message(&e);
        }
    }
}

fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u32..70).prop_map(|v| json!(v)),
        2 => (-10.0..70.0f64).prop_map(|v| json!(v)),
        1 => Just(json!(1e308)),
        1 => Just(json!(-1e308)),
        1 => Just(json!(1.8446744073709552e19)),
        1 => Just(json!(i64::MIN)),
    ]
}

/// A valid-looking prompt with each field possibly dropped, null, mistyped or of the wrong
/// length, plus an occasional unknown field.
fn window_prompt() -> impl Strategy<Value = Value> {
    let field = |n: usize| {
        prop_oneof![
            5 => prop::collection::vec(json_number(), n.saturating_sub(1)..n + 2).prop_map(Value::Array),
            1 => Just(Value::Null),
            1 => "\\PC{0,60}".prop_map(Value::String),
            1 => Just(json!({"x": 1})),
        ]
    };
    (
        prop::option::of(prop_oneof![
            text().prop_map(Value::String),
            json_number(),
            Just(Value::Null)
        ]),
        prop::option::of(field(6)),
        prop::option::of(prop::collection::vec(field(3), 0..4).prop_map(Value::Array)),
        prop::option::of(field(2)),
        prop::option::of("\\PC{1,30}"),
    )
        .prop_map(|(text, bbox, points, labels, extra)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("text", text),
                ("box", bbox),
                ("points", points),
                ("labels", labels),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            if let Some(k) = extra {
                m.insert(k, json!(1));
            }
            Value::Object(m)
        })
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        "\\PC{0,50}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The README's millimetre example parses as written (negative coordinates), and the rules
/// the fuzz properties rely on hold on fixed cases.
#[test]
fn fixed_cases() {
    let eye = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let p = VolumePrompts::parse(
        &[],
        None,
        &["-61.5,-190.2,1012.0".to_string()],
        &[],
        Units::Millimetres,
    )
    .unwrap();
    assert_eq!(p.points[0].0.values, [-61.5, -190.2, 1012.0]);
    // An inverted box is refused in voxels, as in `window`, never swapped.
    let e = VolumePrompts::parse(&[], Some("5,0,0,4,9,9"), &[], &[], Units::Voxels).unwrap_err();
    assert!(
        e.to_string()
            .contains("first corner exceeds the second on axis i"),
        "{e}"
    );
    // A huge index is refused as written, not saturated.
    let e = VolumePrompts::parse(&[], None, &["1e300,0,0".into()], &[], Units::Voxels)
        .unwrap()
        .resolve([10, 10, 10], None)
        .unwrap_err();
    assert!(
        e.to_string().contains("point 1e300,0,0: lies outside"),
        "{e}"
    );
    // Millimetres through a flipped axis: corners min first in mm, sorted in voxels.
    let mut flip = eye;
    flip[0][0] = -1.0;
    flip[0][3] = 9.0;
    let b = VolumePrompts::parse(&[], Some("0,1,1,4,3,3"), &[], &[], Units::Millimetres)
        .unwrap()
        .resolve([10, 10, 10], Some(&flip))
        .unwrap()[0]
        .bbox
        .unwrap();
    assert_eq!(b, [5, 1, 1, 9, 3, 3]);
    // A 10k-character text is clipped in messages.
    let long = "é".repeat(10_000);
    let e = VolumePrompts::parse(&[], Some(&long), &[], &[], Units::Voxels).unwrap_err();
    check_message(&e);
}
