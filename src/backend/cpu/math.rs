//! Vectorisable f32 math for the CPU backend: branch-free ports of `libm`'s `expf` and `erff`
//! (bit-identical to the scalar functions, so [`Act::Gelu`] has one definition on every
//! backend, spec §7.3), a fast exp for softmax, and the slice kernels built on them.
//!
//! Every hot slice kernel is compiled three times (AVX-512, AVX2+FMA, baseline) from one
//! generic body and picked at run time (`multiversion!`). Rust never contracts `a * b + c`
//! into an FMA, so the vector code rounds exactly like the scalar code.

#![allow(clippy::excessive_precision)]

use crate::backend::Act;

/// Defines `$vis fn $name(args) -> ret` that runs `$body` (an `#[inline(always)]` function)
/// compiled for the best instruction set this CPU has.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path;) => {
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
                        $body($($arg),*)
                    }
                    // SAFETY: the CPU supports every feature v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                        $body($($arg),*)
                    }
                    // SAFETY: the CPU supports every feature v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Like [`multiversion!`] for a body generic over `const FMA: bool`: the AVX-512 and AVX2
/// builds get `FMA = true`, the baseline build `false`.
macro_rules! multiversion_fma {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident;) => {
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
                        $body::<true>($($arg),*)
                    }
                    // SAFETY: the CPU supports every feature v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                        $body::<true>($($arg),*)
                    }
                    // SAFETY: the CPU supports every feature v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body::<false>($($arg),*)
        }
    };
}
pub(crate) use multiversion_fma;

/// Lane count the slice kernels process per step (one AVX-512 register of f32).
pub const LANES: usize = 16;

#[inline(always)]
fn sel_f(c: bool, a: f32, b: f32) -> f32 {
    if c {
        a
    } else {
        b
    }
}

#[inline(always)]
fn sel_i(c: bool, a: i32, b: i32) -> i32 {
    if c {
        a
    } else {
        b
    }
}

// ----- expf: FreeBSD e_expf.c as in the `libm` crate, without branches -----

const LN2_HI: f32 = 6.9314575195e-01; // 0x3f317200
const LN2_LO: f32 = 1.4286067653e-06; // 0x35bfbe8e
const INV_LN2: f32 = 1.4426950216e+00; // 0x3fb8aa3b
const EXP_P1: f32 = 1.6666625440e-1; // 0xaaaa8f.0p-26
const EXP_P2: f32 = -2.7667332906e-3; // -0xb55215.0p-32

/// `y * 2^n` exactly as `libm::scalbnf` rounds it, for `n` in `[-228, 254]` (one pre-scaling
/// step; `expf` never needs two).
#[inline(always)]
fn scalbnf(y: f32, n: i32) -> f32 {
    let hi = n > 127;
    let lo = n < -126;
    let pre = sel_f(
        hi,
        f32::from_bits(0x7f00_0000),
        sel_f(lo, f32::from_bits(0x0c80_0000), 1.0),
    );
    let n1 = sel_i(hi, n.wrapping_sub(127), sel_i(lo, n.wrapping_add(102), n));
    let n1 = n1.clamp(-126, 127);
    let scale = f32::from_bits(((127 + n1) as u32) << 23);
    (y * pre) * scale
}

/// `1.5 * 2^23`: adding it to a float of magnitude below 2^22 rounds it to an integer that
/// can be read back from the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// `v as i32` for |v| < 2^22 (other lanes get an unspecified value), without the saturating
/// conversion that LLVM does not vectorise.
#[inline(always)]
fn trunc_to_i32(v: f32) -> i32 {
    let t = v.trunc().clamp(-4_194_304.0, 4_194_304.0) + MAGIC;
    (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32)
}

/// `libm::expf`, bit for bit, as straight-line code that vectorises.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = (bits >> 31) as i32;
    let hx = bits & 0x7fff_ffff;
    let half = sel_f(sign != 0, -0.5, 0.5);
    let k_big = trunc_to_i32(INV_LN2 * x + half);
    let k = sel_i(
        hx > 0x3f85_1592,
        k_big,
        sel_i(hx > 0x3eb1_7218, 1 - sign - sign, 0),
    );
    let kf = k as f32;
    // With k = 0 these reduce to hi = x, lo = 0, the small-argument path of the original.
    let hi = x - kf * LN2_HI;
    let lo = kf * LN2_LO;
    let xr = hi - lo;
    let xx = xr * xr;
    let c = xr - xx * (EXP_P1 + xx * EXP_P2);
    let y = 1. + (xr * c / (2. - c) - lo + hi);
    let r = scalbnf(y, k);
    let r = sel_f(hx <= 0x3900_0000, 1. + x, r);
    // Special cases, in the original's order of precedence.
    let big = hx >= 0x42ae_ac50;
    let r = sel_f(big && sign != 0 && hx >= 0x42cf_f1b5, 0.0, r);
    let r = sel_f(
        big && sign == 0 && hx >= 0x42b1_7218,
        x * f32::from_bits(0x7f00_0000),
        r,
    );
    sel_f(hx > 0x7f80_0000, x, r)
}

// ----- erff: FreeBSD s_erff.c as in the `libm` crate, without branches -----

// Coefficients as printed in FreeBSD s_erff.c (and the `libm` crate), so that the literals
// round to the same f32 values.
const ERX: f32 = 8.4506291151e-01;
const EFX8: f32 = 1.0270333290e+00;
// [0, 0.84375): r(z)/s(z), z = x^2. Padded with zeros to the shape of the [0.84375, 1.25)
// polynomials: `c + t * 0.0 == c` exactly for finite t, so the padding changes no bit.
const PP: [f32; 7] = [
    1.2837916613e-01,
    -3.2504209876e-01,
    -2.8481749818e-02,
    -5.7702702470e-03,
    -2.3763017452e-05,
    0.0,
    0.0,
];
const QQ: [f32; 6] = [
    3.9791721106e-01,
    6.5022252500e-02,
    5.0813062117e-03,
    1.3249473704e-04,
    -3.9602282413e-06,
    0.0,
];
// [0.84375, 1.25): erf(1 + s) - erx = p(s)/q(s).
const PA: [f32; 7] = [
    -2.3621185683e-03,
    4.1485610604e-01,
    -3.7220788002e-01,
    3.1834661961e-01,
    -1.1089469492e-01,
    3.5478305072e-02,
    -2.1663755178e-03,
];
const QA: [f32; 6] = [
    1.0642088205e-01,
    5.4039794207e-01,
    7.1828655899e-02,
    1.2617121637e-01,
    1.3637083583e-02,
    1.1984500103e-02,
];
// erfc on [1.25, 1/0.35) (RA/SA) and [1/0.35, 6) (RB/SB, zero-padded).
const RA: [f32; 8] = [
    -9.8649440333e-03,
    -6.9385856390e-01,
    -1.0558626175e+01,
    -6.2375331879e+01,
    -1.6239666748e+02,
    -1.8460508728e+02,
    -8.1287437439e+01,
    -9.8143291473e+00,
];
const SA: [f32; 8] = [
    1.9651271820e+01,
    1.3765776062e+02,
    4.3456588745e+02,
    6.4538726807e+02,
    4.2900814819e+02,
    1.0863500214e+02,
    6.5702495575e+00,
    -6.0424413532e-02,
];
const RB: [f32; 8] = [
    -9.8649431020e-03,
    -7.9928326607e-01,
    -1.7757955551e+01,
    -1.6063638306e+02,
    -6.3756646729e+02,
    -1.0250950928e+03,
    -4.8351919556e+02,
    0.0,
];
const SB: [f32; 8] = [
    3.0338060379e+01,
    3.2579251099e+02,
    1.5367296143e+03,
    3.1998581543e+03,
    2.5530502930e+03,
    4.7452853394e+02,
    -2.2440952301e+01,
    0.0,
];

/// Whether `erff` takes its expensive branch (`1.25 <= |x| < 6`: two `expf`) for these bits.
#[inline(always)]
fn erff_is_hard(bits: u32) -> bool {
    let ix = bits & 0x7fff_ffff;
    (0x3fa0_0000..0x40c0_0000).contains(&ix)
}

/// `libm::erff` except on its expensive branch (`1.25 <= |x| < 6`, see [`erff_is_hard`]),
/// where the result is unspecified.
#[inline(always)]
fn erff_easy(x: f32) -> f32 {
    let bits = x.to_bits();
    let neg = (bits >> 31) != 0;
    let ix = bits & 0x7fff_ffff;
    let ax = f32::from_bits(ix);
    // |x| < 0.84375 (small) or < 1.25 (erfc1): one rational function, coefficients by lane.
    let small = ix < 0x3f58_0000;
    let t = sel_f(small, x * x, ax - 1.0);
    let c = |i: usize| sel_f(small, PP[i], PA[i]);
    let d = |i: usize| sel_f(small, QQ[i], QA[i]);
    let p = c(0) + t * (c(1) + t * (c(2) + t * (c(3) + t * (c(4) + t * (c(5) + t * c(6))))));
    let q = 1.0 + t * (d(0) + t * (d(1) + t * (d(2) + t * (d(3) + t * (d(4) + t * d(5))))));
    let pq = p / q;
    let y_small = x + x * pq;
    let y_small = sel_f(ix < 0x3180_0000, 0.125 * (8.0 * x + EFX8 * x), y_small);
    let y_mid = 1.0 - (1.0 - ERX - pq);
    let y_big = 1.0 - f32::from_bits(0x0380_0000);
    let y = sel_f(ix < 0x40c0_0000, y_mid, y_big);
    let y = sel_f(neg, -y, y);
    let y = sel_f(small, y_small, y);
    // erf(NaN) = NaN (the quieted input, as `1/x` gives), erf(+-inf) = +-1.
    let special = sel_f(ix > 0x7f80_0000, x + x, sel_f(neg, -1.0, 1.0));
    sel_f(ix >= 0x7f80_0000, special, y)
}

/// `libm::erff` on its expensive branch, `1.25 <= |x| < 6`: `1 - erfc(|x|)` with erfc from
/// `exp(-x^2)` and a rational correction.
#[inline(always)]
fn erff_hard(x: f32) -> f32 {
    let bits = x.to_bits();
    let neg = (bits >> 31) != 0;
    let ix = bits & 0x7fff_ffff;
    let ax = f32::from_bits(ix);
    let ra = ix < 0x4036_db6d;
    let s = 1.0 / (ax * ax);
    let r_ = |i: usize| sel_f(ra, RA[i], RB[i]);
    let s_ = |i: usize| sel_f(ra, SA[i], SB[i]);
    let r = r_(0)
        + s * (r_(1)
            + s * (r_(2) + s * (r_(3) + s * (r_(4) + s * (r_(5) + s * (r_(6) + s * r_(7)))))));
    let big_s = 1.0
        + s * (s_(0)
            + s * (s_(1)
                + s * (s_(2) + s * (s_(3) + s * (s_(4) + s * (s_(5) + s * (s_(6) + s * s_(7))))))));
    let z = f32::from_bits(ix & 0xffff_e000);
    let erfc2 = expf(-z * z - 0.5625) * expf((z - ax) * (z + ax) + r / big_s) / ax;
    let y = 1.0 - erfc2;
    sel_f(neg, -y, y)
}

/// `libm::erff`, bit for bit, as straight-line code that vectorises.
#[inline(always)]
pub fn erff(x: f32) -> f32 {
    sel_f(erff_is_hard(x.to_bits()), erff_hard(x), erff_easy(x))
}

/// Exact-erf GELU, bit-identical to [`Act::apply`] with [`Act::Gelu`].
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_easy(x: f32) -> f32 {
    0.5 * x * (1.0 + erff_easy(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_hard(x: f32) -> f32 {
    0.5 * x * (1.0 + erff_hard(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU with AVX-512 lane compaction: the inputs that need `erff`'s expensive branch are
/// compressed into a side buffer, computed there densely, and expanded back, so that each
/// element pays only for its own branch.
#[cfg(target_arch = "x86_64")]
mod gelu512 {
    use super::{gelu_easy, gelu_hard};
    use std::arch::x86_64::*;

    /// Elements per compaction round.
    const BLOCK: usize = 512;

    /// GELU in place on `x` (any length).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/DQ/BW/VL.
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn gelu_slice(x: &mut [f32]) {
        // The hard lanes, rounded up to whole vectors (the padding lanes hold stale values
        // and are computed and discarded).
        let mut hard = [0f32; BLOCK + 16];
        let mut masks = [0u16; BLOCK / 16];
        let mut blocks = x.chunks_exact_mut(BLOCK);
        for block in &mut blocks {
            // SAFETY: BLOCK / 16 whole vectors.
            unsafe { vectors(block, &mut hard, &mut masks) };
        }
        let rest = blocks.into_remainder();
        let nv = rest.len() / 16;
        let (full, tail) = rest.split_at_mut(nv * 16);
        // SAFETY: whole vectors.
        unsafe { vectors(full, &mut hard, &mut masks) };
        if !tail.is_empty() {
            // The last partial vector goes through a zero-padded copy.
            let mut v = [0f32; 16];
            v[..tail.len()].copy_from_slice(tail);
            // SAFETY: one whole vector.
            unsafe { vectors(&mut v, &mut hard, &mut masks) };
            tail.copy_from_slice(&v[..tail.len()]);
        }
    }

    /// GELU on `x.len() / 16 <= BLOCK / 16` whole vectors.
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
    unsafe fn vectors(x: &mut [f32], hard: &mut [f32; BLOCK + 16], masks: &mut [u16; BLOCK / 16]) {
        let nv = x.len() / 16;
        debug_assert!(nv * 16 == x.len() && nv <= BLOCK / 16);
        let scale = _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2);
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let (lo, hi) = (
            _mm512_set1_epi32(0x3fa0_0000),
            _mm512_set1_epi32(0x40c0_0000),
        );
        // Compress the inputs that need erff's exp branch (1.25 <= |x / sqrt 2| < 6).
        let mut m = 0usize;
        for (v, mask) in masks.iter_mut().enumerate().take(nv) {
            // SAFETY: vector v lies in x; `hard` has room for every lane of the block.
            unsafe {
                let xv = _mm512_loadu_ps(x.as_ptr().add(16 * v));
                let ix = _mm512_and_si512(_mm512_castps_si512(_mm512_mul_ps(xv, scale)), abs);
                let k = _mm512_cmpge_epu32_mask(ix, lo) & _mm512_cmplt_epu32_mask(ix, hi);
                *mask = k;
                _mm512_mask_compressstoreu_ps(hard.as_mut_ptr().add(m).cast(), k, xv);
                m += k.count_ones() as usize;
            }
        }
        for v in x.iter_mut() {
            *v = gelu_easy(*v);
        }
        for v in hard[..m.div_ceil(16) * 16].iter_mut() {
            *v = gelu_hard(*v);
        }
        // Expand the hard results back into their lanes.
        let mut pos = 0usize;
        for (v, &k) in masks.iter().enumerate().take(nv) {
            if k != 0 {
                // SAFETY: as above; pos + popcount(k) <= m.
                unsafe {
                    let p = x.as_mut_ptr().add(16 * v);
                    let y =
                        _mm512_mask_expandloadu_ps(_mm512_loadu_ps(p), k, hard.as_ptr().add(pos));
                    _mm512_storeu_ps(p, y);
                }
                pos += k.count_ones() as usize;
            }
        }
    }
}

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
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the CPU has the features.
                unsafe { gelu512::gelu_slice(x) };
                return;
            }
            let mut chunks = x.chunks_exact_mut(LANES);
            for ch in &mut chunks {
                for v in ch.iter_mut() {
                    *v = gelu(*v);
                }
            }
            for v in chunks.into_remainder() {
                *v = gelu(*v);
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
    /// Applies `act` in place to every element (bit-identical to [`Act::apply`]).
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

    /// Checks `f_vec` (run through a vectorised slice kernel) against `f_ref` on the bit
    /// patterns `start, start + step, ...`; returns the first mismatch.
    fn sweep(
        step: u64,
        vec_fn: impl Fn(&mut [f32]) + Sync,
        ref_fn: impl Fn(f32) -> f32 + Sync,
    ) -> Option<(f32, f32, f32)> {
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
            xs.iter().zip(&ys).find_map(|(&x, &y)| {
                let r = ref_fn(x);
                (!same(y, r)).then_some((x, y, r))
            })
        })
    }

    #[test]
    fn gelu_matches_libm_on_a_sweep_of_bit_patterns() {
        // 33 million inputs spread over every exponent and sign, plus the special values.
        let bad = sweep(127, |v| act_slice(v, Act::Gelu), |x| Act::Gelu.apply(x));
        assert!(bad.is_none(), "gelu(x) mismatch (x, vec, ref) = {bad:?}");
        let mut specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            0.84375 * std::f32::consts::SQRT_2,
            1.25 * std::f32::consts::SQRT_2,
            6.0 * std::f32::consts::SQRT_2,
            -5.9,
            88.0,
            -88.0,
            f32::MAX,
            f32::MIN,
        ];
        let expect: Vec<f32> = specials.iter().map(|&x| Act::Gelu.apply(x)).collect();
        act_slice(&mut specials, Act::Gelu);
        for (a, b) in specials.iter().zip(&expect) {
            assert!(same(*a, *b), "{a} vs {b}");
        }
    }

    #[test]
    fn generic_gelu_matches_libm_on_a_sweep_of_bit_patterns() {
        // The branch-free body used by the AVX2 and baseline builds (and for remainders).
        let bad = sweep(
            131,
            |v| {
                for x in v.iter_mut() {
                    *x = gelu(*x);
                }
            },
            |x| Act::Gelu.apply(x),
        );
        assert!(bad.is_none(), "gelu(x) mismatch (x, vec, ref) = {bad:?}");
    }

    #[test]
    fn expf_matches_libm_on_a_sweep_of_bit_patterns() {
        let bad = sweep(
            61,
            |v| {
                for x in v.iter_mut() {
                    *x = expf(*x);
                }
            },
            libm::expf,
        );
        assert!(bad.is_none(), "expf mismatch (x, got, libm) = {bad:?}");
    }

    /// Every one of the 2^32 inputs (about a minute on two cores).
    #[test]
    #[ignore]
    fn gelu_matches_libm_exhaustively() {
        let bad = sweep(1, |v| act_slice(v, Act::Gelu), |x| Act::Gelu.apply(x));
        assert!(bad.is_none(), "gelu(x) mismatch (x, vec, ref) = {bad:?}");
    }

    #[test]
    fn gelu_on_every_short_length() {
        // Partial vectors and blocks: lengths 0..=600 over values that hit every erff branch.
        let xs: Vec<f32> = (0..600)
            .map(|i| ((i * 37) % 601) as f32 * 0.05 - 15.0)
            .collect();
        for len in 0..=xs.len() {
            let mut y = xs[..len].to_vec();
            act_slice(&mut y, Act::Gelu);
            for (g, &x) in y.iter().zip(&xs) {
                assert!(same(*g, Act::Gelu.apply(x)), "len {len}: gelu({x}) = {g}");
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
