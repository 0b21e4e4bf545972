//! Vectorisable f32 math for the CPU backend: the exact-erf GELU by table-driven polynomials
//! (within a few ulp of the libm-based reference [`Act::apply`], spec §7.3), a fast exp for
//! softmax, and the slice kernels built on them.
//!
//! Every hot slice kernel is compiled three times (AVX-512, AVX2+FMA, baseline) from one
//! generic body and picked at run time (`multiversion!`). Rust never contracts `a * b + c`
//! into an FMA, and FMAs are written as such (`mul_add`, or [`fmadd`] where the baseline
//! build may round twice), so the vector code rounds exactly like the scalar code.

#![allow(clippy::excessive_precision)]

use crate::backend::Act;

/// The machinery of [`multiversion!`] and [`multiversion_fma!`]: `$fast` is called by the
/// AVX-512 and AVX2+FMA builds, `$base` by the baseline build.
macro_rules! multiversion_impl {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?,
     fast: $fast:expr, base: $base:expr) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
                    unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                        $fast($($arg),*)
                    }
                    // SAFETY: the CPU supports every feature v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                        $fast($($arg),*)
                    }
                    // SAFETY: the CPU supports every feature v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            $base($($arg),*)
        }
    };
}
pub(crate) use multiversion_impl;

/// Defines `$vis fn $name(args) -> ret` that runs `$body` (an `#[inline(always)]` function)
/// compiled for the best instruction set this CPU has.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path;) => {
        $crate::backend::cpu::math::multiversion_impl! {
            $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)?, fast: $body, base: $body
        }
    };
}
pub(crate) use multiversion;

/// Like [`multiversion!`] for a body generic over `const FMA: bool`: the AVX-512 and AVX2
/// builds get `FMA = true`, the baseline build `false`.
macro_rules! multiversion_fma {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident;) => {
        $crate::backend::cpu::math::multiversion_impl! {
            $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)?,
            fast: $body::<true>, base: $body::<false>
        }
    };
}
pub(crate) use multiversion_fma;

/// Lane count the slice kernels process per step (one AVX-512 register of f32).
pub const LANES: usize = 16;

// ----- GELU: erfc by interval -----

/// Width of the intervals of `|x| / sqrt 2` on which `erfc` is one polynomial.
const ERFC_STEP: f32 = 0.25;
/// Intervals covering `[0, 4)`; from 4 on, `erfc < 1.6e-8` and GELU is `x` (or `-0`) to f32
/// precision, as with `1 + erff(x)` in f32.
const ERFC_INTERVALS: usize = 16;
/// Coefficients per interval (degree 7).
const ERFC_COEFS: usize = 8;
/// `1 / sqrt 2 - FRAC_1_SQRT_2` (f32), the low part of the split constant.
const SQRT_HALF_LO: f32 = 1.210_161_7e-8;

/// `[n][i]`: the coefficient of `t^n` on interval `i`, `t` the offset of `|x| / sqrt 2` from
/// the interval's centre.
pub type ErfcTable = [[f32; ERFC_INTERVALS]; ERFC_COEFS];

/// The interpolants of [`gelu`], computed once from `libm::erfc` (f64).
pub static ERFC_TABLE: std::sync::LazyLock<ErfcTable> = std::sync::LazyLock::new(erfc_table);

/// Chebyshev interpolation of `erfc` at `ERFC_COEFS` nodes of each interval (near-minimax),
/// turned into monomial coefficients in the offset from the centre. With the coefficients
/// rounded to f32: relative error below 1e-7 on `[0, 3.5)` and 2.5e-7 beyond (measured by
/// `erfc_interpolants_are_accurate`).
fn erfc_table() -> ErfcTable {
    use std::f64::consts::PI;
    let n = ERFC_COEFS;
    let h = ERFC_STEP as f64 / 2.0;
    // Chebyshev polynomials T_0..T_{n-1} as monomial coefficients.
    let mut cheb = vec![[0f64; ERFC_COEFS]; n];
    cheb[0][0] = 1.0;
    cheb[1][1] = 1.0;
    for k in 2..n {
        for d in 0..n {
            let up = if d > 0 { 2.0 * cheb[k - 1][d - 1] } else { 0.0 };
            cheb[k][d] = up - cheb[k - 2][d];
        }
    }
    let node = |j: usize| PI * (j as f64 + 0.5) / n as f64;
    let interval = |i: usize| -> [f32; ERFC_COEFS] {
        let centre = (i as f64 + 0.5) * ERFC_STEP as f64;
        let f: Vec<f64> = (0..n)
            .map(|j| libm::erfc(centre + h * node(j).cos()))
            .collect();
        // p(s) = sum_k b_k T_k(s), s = t / h in [-1, 1].
        let mut mono = [0f64; ERFC_COEFS];
        for (k, tk) in cheb.iter().enumerate() {
            let mut b: f64 = f
                .iter()
                .enumerate()
                .map(|(j, fj)| fj * (k as f64 * node(j)).cos())
                .sum::<f64>()
                * 2.0
                / n as f64;
            if k == 0 {
                b /= 2.0;
            }
            for (m, t) in mono.iter_mut().zip(tk) {
                *m += b * t;
            }
        }
        let mut col = [0f32; ERFC_COEFS];
        for (d, (c, m)) in col.iter_mut().zip(mono).enumerate() {
            *c = (m / h.powi(d as i32)) as f32;
        }
        col
    };
    let cols: Vec<[f32; ERFC_COEFS]> = (0..ERFC_INTERVALS).map(interval).collect();
    let mut table = [[0f32; ERFC_INTERVALS]; ERFC_COEFS];
    for (d, row) in table.iter_mut().enumerate() {
        for (x, col) in row.iter_mut().zip(&cols) {
            *x = col[d];
        }
    }
    table
}

/// Exact-erf GELU, `0.5 x (1 + erf(x / sqrt 2))` (spec §7.3: `nn.GELU()`), as the CPU
/// backend computes it: `1 + erf(u)` is `erfc(|u|)` for `u < 0` and `2 - erfc(|u|)` else,
/// `erfc` from the interpolants of [`ERFC_TABLE`] by Horner's rule with FMAs, at the exact
/// `x / sqrt 2` (a two-part constant). Error: within `2^-22 |g| + 2^-26 |x|` of the exact
/// `g(x)` (the `|x|` term is the flush to `-0` below `x = -5.66`); a few ulp from the
/// reference [`Act::apply`]. No division and no `exp`: one table lookup per lane.
///
/// Bit-identical to the AVX-512 slice kernel (the same operations in the same order; the
/// centre and `|u| - centre` are exact).
#[inline(always)]
pub fn gelu_with(tab: &ErfcTable, x: f32) -> f32 {
    let u = x * std::f32::consts::FRAC_1_SQRT_2;
    // x / sqrt 2 - u, so that erfc sees the exact quotient: the rounding of u alone would
    // cost erfc up to 2 |u|^2 ulp of relative error in the tail.
    let u_lo = x.mul_add(SQRT_HALF_LO, x.mul_add(std::f32::consts::FRAC_1_SQRT_2, -u));
    let a = u.abs();
    // NaN lands on the last interval and stays NaN.
    let i = (a * 4.0).min((ERFC_INTERVALS - 1) as f32) as usize;
    let t = (a - (i as f32 * ERFC_STEP + ERFC_STEP / 2.0))
        + f32::from_bits(u_lo.to_bits() ^ (u.to_bits() & 0x8000_0000));
    let mut p = tab[ERFC_COEFS - 1][i];
    for row in tab[..ERFC_COEFS - 1].iter().rev() {
        p = p.mul_add(t, row[i]);
    }
    let e = if a >= 4.0 { 0.0 } else { p };
    let one_plus_erf = if u < 0.0 { e } else { 2.0 - e };
    (0.5 * x) * one_plus_erf
}

/// [`gelu_with`] the shared table.
#[inline]
pub fn gelu(x: f32) -> f32 {
    gelu_with(&ERFC_TABLE, x)
}

/// One activation as the CPU backend computes it: [`Act::apply`], except GELU, which is
/// [`gelu`].
#[inline]
pub fn act(x: f32, act: Act) -> f32 {
    match act {
        Act::Gelu => gelu(x),
        other => other.apply(x),
    }
}

/// GELU on AVX-512: the coefficients of all 16 intervals sit in 8 registers and each lane
/// picks its own with `vpermps`.
#[cfg(target_arch = "x86_64")]
mod gelu512 {
    use super::{ErfcTable, ERFC_COEFS, ERFC_INTERVALS, ERFC_STEP, SQRT_HALF_LO};
    use std::arch::x86_64::*;

    /// GELU in place on `x` (any length), bit-identical to [`super::gelu_with`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_slice(tab: &ErfcTable, x: &mut [f32]) {
        let mut coef = [_mm512_setzero_ps(); ERFC_COEFS];
        for (c, row) in coef.iter_mut().zip(tab) {
            // SAFETY: a row holds 16 f32.
            *c = unsafe { _mm512_loadu_ps(row.as_ptr()) };
        }
        let one = |v: __m512| -> __m512 {
            let c = _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2);
            let u = _mm512_mul_ps(v, c);
            let u_lo = _mm512_fmadd_ps(v, _mm512_set1_ps(SQRT_HALF_LO), _mm512_fmsub_ps(v, c, u));
            let a = _mm512_abs_ps(u);
            let a4 = _mm512_mul_ps(a, _mm512_set1_ps(4.0));
            // min(NaN, 15) = 15, as in the scalar code.
            let i = _mm512_cvttps_epi32(_mm512_min_ps(
                a4,
                _mm512_set1_ps((ERFC_INTERVALS - 1) as f32),
            ));
            let centre = _mm512_add_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(ERFC_STEP)),
                _mm512_set1_ps(ERFC_STEP / 2.0),
            );
            let sign = _mm512_and_si512(_mm512_castps_si512(u), _mm512_set1_epi32(i32::MIN));
            let t = _mm512_add_ps(
                _mm512_sub_ps(a, centre),
                _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(u_lo), sign)),
            );
            let mut p = _mm512_permutexvar_ps(i, coef[ERFC_COEFS - 1]);
            for c in coef[..ERFC_COEFS - 1].iter().rev() {
                p = _mm512_fmadd_ps(p, t, _mm512_permutexvar_ps(i, *c));
            }
            let far = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, _mm512_set1_ps(4.0));
            let e = _mm512_mask_mov_ps(p, far, _mm512_setzero_ps());
            let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(u, _mm512_setzero_ps());
            let ope = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(2.0), e), neg, e);
            _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5), v), ope)
        };
        let mut chunks = x.chunks_exact_mut(16);
        for ch in &mut chunks {
            // SAFETY: 16 f32.
            unsafe { _mm512_storeu_ps(ch.as_mut_ptr(), one(_mm512_loadu_ps(ch.as_ptr()))) };
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let k = ((1u32 << tail.len()) - 1) as __mmask16;
            // SAFETY: the masked lanes lie in `tail`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(k, tail.as_ptr());
                _mm512_mask_storeu_ps(tail.as_mut_ptr(), k, one(v));
            }
        }
    }
}

/// `1.5 * 2^23`: adding it to a float of magnitude below 2^22 rounds it to an integer that
/// can be read back from the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

// ----- fast exp for softmax (not bit-matched to anything) -----

/// `a * b + c`, fused when `FMA` (the AVX2 / AVX-512 builds), else two roundings (the
/// baseline build, where `mul_add` would be a slow library call).
#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// ln 2 split for the Cody-Waite reduction of the softmax exp: `ln 2 = [0] + [1]`, with `[0]`
/// short enough that `n * [0]` is exact.
pub const EXP_LN2: [f32; 2] = [0.693_359_4, -2.121_944_4e-4];

/// Cephes' `expf` polynomial: `e^r ~ 1 + r + r^2 (c0 r^5 + ... + c5)` on |r| <= ln2 / 2.
pub const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5.000_000_1e-1,
];

/// `e^x` for `x <= 0` (softmax weights): Cody-Waite reduction and a degree-6 polynomial,
/// relative error below 3e-7 down to 2^-126; 0 below about -87.4 (and for -inf).
#[inline(always)]
pub fn exp_nonpos<const FMA: bool>(x: f32) -> f32 {
    // Below -88.5 the exponent n reaches -128 and the scale below becomes 0.
    let xc = x.max(-88.5);
    let t = fmadd::<FMA>(xc, std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = fmadd::<FMA>(n, -EXP_LN2[0], xc);
    let r = fmadd::<FMA>(n, -EXP_LN2[1], r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = fmadd::<FMA>(p, r, c);
    }
    let p = fmadd::<FMA>(p, r * r, r) + 1.0;
    // n sits in the low mantissa bits of t; 2^n as bits, 0 when n < -126.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127).max(0) as u32) << 23);
    p * scale
}

// ----- slice kernels -----

#[inline(always)]
fn act_slice_body(x: &mut [f32], act: Act) {
    match act {
        Act::None => {}
        Act::Gelu => {
            let tab = &*ERFC_TABLE;
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the feature.
                unsafe { gelu512::gelu_slice(tab, x) };
                return;
            }
            for v in x.iter_mut() {
                *v = gelu_with(tab, *v);
            }
        }
        Act::Relu => {
            for v in x.iter_mut() {
                *v = v.max(0.0);
            }
        }
        // CLIP only (a few hundred thousand values per call): the scalar definition itself.
        Act::QuickGelu => {
            for v in x.iter_mut() {
                *v = act.apply(*v);
            }
        }
    }
}

multiversion! {
    /// Applies `act` in place to every element (bit-identical to [`act`]).
    pub fn act_slice(x: &mut [f32], act: Act) => act_slice_body;
}

#[inline(always)]
fn scale_act_body(x: &mut [f32], scale: f32, act: Act) {
    if scale != 1.0 {
        for v in x.iter_mut() {
            *v *= scale;
        }
    }
    act_slice_body(x, act);
}

multiversion! {
    /// `x[i] = act(x[i] * scale)` in place.
    pub fn scale_act_slice(x: &mut [f32], scale: f32, act: Act) => scale_act_body;
}

#[inline(always)]
fn scale_act_copy_body(x: &[f32], out: &mut [f32], scale: f32, act: Act) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * scale;
    }
    act_slice_body(out, act);
}

multiversion! {
    /// `out[i] = act(x[i] * scale)`.
    pub fn scale_act_copy(x: &[f32], out: &mut [f32], scale: f32, act: Act) => scale_act_copy_body;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Runs `check(x, y)` for the bit patterns `start, start + step, ...` (`y`: the slice
    /// kernel's result for `x`); returns the first failure.
    fn sweep(
        step: u64,
        vec_fn: impl Fn(&mut [f32]) + Sync,
        check: impl Fn(f32, f32) -> bool + Sync,
    ) -> Option<(f32, f32)> {
        let n = (1u64 << 32) / step;
        let block = 1u64 << 16;
        (0..n.div_ceil(block)).into_par_iter().find_map_any(|bi| {
            let lo = bi * block;
            let hi = (lo + block).min(n);
            let xs: Vec<f32> = (lo..hi)
                .map(|i| f32::from_bits((i * step) as u32))
                .collect();
            let mut ys = xs.clone();
            vec_fn(&mut ys);
            xs.iter()
                .zip(&ys)
                .find_map(|(&x, &y)| (!check(x, y)).then_some((x, y)))
        })
    }

    /// GELU in f64 from the exact `erfc`.
    fn gelu64(x: f32) -> f64 {
        let x = x as f64;
        0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    /// The documented bound of [`gelu`]: `|y - g| <= 2^-22 |g| + 2^-26 |x|` (plus the
    /// smallest subnormal, for results that round there); NaN for NaN and -inf.
    fn gelu_ok(x: f32, y: f32) -> bool {
        if x.is_nan() || x == f32::NEG_INFINITY {
            return y.is_nan();
        }
        if x == f32::INFINITY {
            return y == f32::INFINITY;
        }
        let g = gelu64(x);
        let tol = g.abs() * 2f64.powi(-22) + (x as f64).abs() * 2f64.powi(-26) + 2f64.powi(-149);
        ((y as f64) - g).abs() <= tol
    }

    /// The slice kernel is accurate and bit-identical to the scalar [`gelu`].
    fn gelu_check(x: f32, y: f32) -> bool {
        gelu_ok(x, y) && same(y, gelu(x))
    }

    #[test]
    fn gelu_is_accurate_on_a_sweep_of_bit_patterns() {
        // 33 million inputs spread over every exponent and sign.
        let bad = sweep(127, |v| act_slice(v, Act::Gelu), gelu_check);
        assert!(bad.is_none(), "gelu(x) (x, got) = {bad:?}");
        let mut specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            // Interval edges, the end of the table and the flush to -0.
            0.25 * std::f32::consts::SQRT_2,
            3.75 * std::f32::consts::SQRT_2,
            4.0 * std::f32::consts::SQRT_2,
            -4.0 * std::f32::consts::SQRT_2,
            -5.9,
            88.0,
            -88.0,
            f32::MAX,
            f32::MIN,
        ];
        let xs = specials;
        act_slice(&mut specials, Act::Gelu);
        for (&x, &y) in xs.iter().zip(&specials) {
            assert!(gelu_check(x, y), "gelu({x}) = {y}");
        }
        assert!(same(gelu(-0.0), -0.0) && same(gelu(0.0), 0.0));
        assert!(same(gelu(-10.0), -0.0) && gelu(10.0) == 10.0);
    }

    #[test]
    fn erfc_interpolants_are_accurate() {
        // The f32 coefficients evaluated in f64 against libm's erfc, 64 points per interval.
        let tab = &*ERFC_TABLE;
        let mut worst = [0f64; ERFC_INTERVALS];
        for (i, w) in worst.iter_mut().enumerate() {
            let centre = (i as f64 + 0.5) * ERFC_STEP as f64;
            for j in 0..=64 {
                let t = (j as f64 / 64.0 - 0.5) * ERFC_STEP as f64;
                let p = (0..ERFC_COEFS)
                    .rev()
                    .fold(0f64, |p, d| p * t + tab[d][i] as f64);
                let e = libm::erfc(centre + t);
                *w = w.max(((p - e) / e).abs());
            }
        }
        let shown: Vec<String> = worst.iter().map(|w| format!("{w:.1e}")).collect();
        eprintln!("erfc interpolants, worst relative error per interval: {shown:?}");
        assert!(worst[..14].iter().all(|&w| w < 1e-7), "{shown:?}");
        assert!(worst.iter().all(|&w| w < 5e-7), "{shown:?}");
    }

    #[test]
    fn gelu_agrees_with_the_reference_definition() {
        // Relative errors against f64 where GELU is not tiny: ours stays within a few ulp;
        // the reference `Act::apply` (libm erfcf) within those of rounding x / sqrt 2 to f32
        // (up to 2 u^2 ulp of erfc in the tail).
        let (mut ours, mut reference) = (0f64, 0f64);
        let mut x = -4.0f32;
        while x <= 4.0 {
            let g = gelu64(x);
            if g.abs() > 1e-4 {
                ours = ours.max(((gelu(x) as f64 - g) / g).abs());
                reference = reference.max(((Act::Gelu.apply(x) as f64 - g) / g).abs());
            }
            x += 0.000_77;
        }
        let eps = f32::EPSILON as f64;
        assert!(ours < 4.0 * eps, "ours: {ours:e}");
        assert!(
            ours <= reference,
            "ours {ours:e} vs reference {reference:e}"
        );
    }

    /// Every one of the 2^32 inputs (about a minute on two cores).
    #[test]
    #[ignore]
    fn gelu_is_accurate_exhaustively() {
        let bad = sweep(1, |v| act_slice(v, Act::Gelu), gelu_check);
        assert!(bad.is_none(), "gelu(x) (x, got) = {bad:?}");
    }

    #[test]
    fn gelu_on_every_short_length() {
        // Partial vectors: lengths 0..=600 over values on every interval and past the table.
        let xs: Vec<f32> = (0..600)
            .map(|i| ((i * 37) % 601) as f32 * 0.05 - 15.0)
            .collect();
        for len in 0..=xs.len() {
            let mut y = xs[..len].to_vec();
            act_slice(&mut y, Act::Gelu);
            for (g, &x) in y.iter().zip(&xs) {
                assert!(same(*g, gelu(x)), "len {len}: gelu({x}) = {g}");
            }
        }
    }

    #[test]
    fn relu_and_quick_gelu_match_the_definition() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.3) * 0.037).collect();
        for act in [Act::Relu, Act::QuickGelu, Act::None] {
            let mut ys = xs.clone();
            act_slice(&mut ys, act);
            for (x, y) in xs.iter().zip(&ys) {
                assert!(same(*y, act.apply(*x)), "{act:?}({x})");
            }
        }
    }

    #[test]
    fn exp_nonpos_is_accurate() {
        for fma in [false, true] {
            let mut worst = 0.0f64;
            let mut x = -87.0f32;
            while x <= 0.0 {
                let e = (x as f64).exp();
                let got = if fma {
                    exp_nonpos::<true>(x)
                } else {
                    exp_nonpos::<false>(x)
                } as f64;
                worst = worst.max(((got - e) / e).abs());
                x += 0.000_37;
            }
            assert!(worst < 3e-7, "fma {fma}: worst relative error {worst:e}");
        }
        assert_eq!(exp_nonpos::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos::<false>(-100.0), 0.0);
        assert_eq!(exp_nonpos::<false>(0.0), 1.0);
        assert_eq!(exp_nonpos::<true>(-0.0), 1.0);
    }
}
