// 3-D resizing with PyTorch's index arithmetic (spec §4.6, §6.4, §6.6, §7.9; the op contract
// in src/backend/mod.rs), matching the CPU reference src/backend/cpu/interp.rs operation for
// operation, so f32 results agree bit for bit:
//
// - scale per axis: (float)in / (float)out;
// - trilinear, align_corners=False: s = max(0, scale * (dst + 0.5) - 0.5) (a rounded product,
//   then a rounded difference: never contracted into an FMA), i0 = min(floor(s), in - 1),
//   l1 = clamp(s - i0, 0, 1), l0 = 1 - l1, i1 = i0 + (i0 < in - 1); an axis with in == out is a
//   copy (l0 = 1, l1 = 0). Values combine axis by axis, D outermost, each `a*l0 + b*l1` as
//   fmaf(a, l0, b*l1) (PyTorch's contracted CPU kernel; see the reference's notes);
// - nearest-exact: min(floor(scale * (dst + 0.5)), in - 1);
// - nearest: min(floor(dst * scale), in - 1).
//
// Launch: block (128, 1, 1), grid (ceil(OW/128), min(OH, 65535), min(planes*OD, 65535)); the y
// and z extents are looped, so any size runs. Thread (x, y, plane*OD + z) writes one output.
// Plane offsets and volume indices are 64-bit (pipeline volumes reach 512 x 512 x 1000).
// Launch code: src/backend/kernel/interp.rs.
#include "cuda_compat.cuh"
#include "common.cuh"

namespace interp {
constexpr int BLOCK = 128;
constexpr int TRILINEAR = 0, NEAREST_EXACT = 1, NEAREST = 2;

struct Tap {
    int i0, i1;
    float l0, l1;
};

__device__ __forceinline__ Tap linear_tap(int in, int out, int o) {
    Tap t;
    if (in == out) {
        t.i0 = t.i1 = o;
        t.l0 = 1.f;
        t.l1 = 0.f;
        return t;
    }
    const float scale = __fdiv_rn(static_cast<float>(in), static_cast<float>(out));
    float s = __fsub_rn(__fmul_rn(scale, __fadd_rn(static_cast<float>(o), 0.5f)), 0.5f);
    if (s < 0.f) s = 0.f;
    t.i0 = min(static_cast<int>(floorf(s)), in - 1);
    t.l1 = fminf(fmaxf(__fsub_rn(s, static_cast<float>(t.i0)), 0.f), 1.f);
    t.l0 = __fsub_rn(1.f, t.l1);
    t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
    return t;
}

template <int MODE>
__device__ __forceinline__ int nearest_index(int in, int out, int o) {
    const float scale = __fdiv_rn(static_cast<float>(in), static_cast<float>(out));
    const float s = MODE == NEAREST_EXACT ? __fmul_rn(scale, __fadd_rn(static_cast<float>(o), 0.5f))
                                          : __fmul_rn(static_cast<float>(o), scale);
    return min(static_cast<int>(floorf(s)), in - 1);
}

// a*l0 + b*l1 as the reference computes it: b*l1 rounded, then one fused multiply-add.
__device__ __forceinline__ float lerp(float a, float l0, float b, float l1) { return fmaf(a, l0, __fmul_rn(b, l1)); }

template <int MODE, class Ti, class To>
__device__ void resize(const Ti* x, To* out, int planes, int id, int ih, int iw, int od, int oh, int ow) {
    const int ox = blockIdx.x * BLOCK + threadIdx.x;
    if (ox >= ow) return;
    const long long n_in = static_cast<long long>(id) * ih * iw;
    const long long n_out = static_cast<long long>(od) * oh * ow;
    const long long pz_total = static_cast<long long>(planes) * od;
    if (MODE == TRILINEAR) {
        const Tap tw = linear_tap(iw, ow, ox);
        for (long long pz = blockIdx.z; pz < pz_total; pz += gridDim.z) {
            const long long p = pz / od;
            const int oz = static_cast<int>(pz - p * od);
            const Tap td = linear_tap(id, od, oz);
            const Ti* xp = x + p * n_in;
            for (int oy = blockIdx.y; oy < oh; oy += gridDim.y) {
                const Tap th = linear_tap(ih, oh, oy);
                const Ti* r00 = xp + (static_cast<long long>(td.i0) * ih + th.i0) * iw;
                const Ti* r01 = xp + (static_cast<long long>(td.i0) * ih + th.i1) * iw;
                const Ti* r10 = xp + (static_cast<long long>(td.i1) * ih + th.i0) * iw;
                const Ti* r11 = xp + (static_cast<long long>(td.i1) * ih + th.i1) * iw;
                const float u00 = lerp(to_float(r00[tw.i0]), tw.l0, to_float(r00[tw.i1]), tw.l1);
                const float u01 = lerp(to_float(r01[tw.i0]), tw.l0, to_float(r01[tw.i1]), tw.l1);
                const float u10 = lerp(to_float(r10[tw.i0]), tw.l0, to_float(r10[tw.i1]), tw.l1);
                const float u11 = lerp(to_float(r11[tw.i0]), tw.l0, to_float(r11[tw.i1]), tw.l1);
                const float t0 = lerp(u00, th.l0, u01, th.l1);
                const float t1 = lerp(u10, th.l0, u11, th.l1);
                out[p * n_out + (static_cast<long long>(oz) * oh + oy) * ow + ox] = from_float<To>(lerp(t0, td.l0, t1, td.l1));
            }
        }
    } else {
        const int sx = nearest_index<MODE>(iw, ow, ox);
        for (long long pz = blockIdx.z; pz < pz_total; pz += gridDim.z) {
            const long long p = pz / od;
            const int oz = static_cast<int>(pz - p * od);
            const int sz = nearest_index<MODE>(id, od, oz);
            const Ti* xp = x + p * n_in;
            for (int oy = blockIdx.y; oy < oh; oy += gridDim.y) {
                const int sy = nearest_index<MODE>(ih, oh, oy);
                const float v = to_float(xp[(static_cast<long long>(sz) * ih + sy) * iw + sx]);
                out[p * n_out + (static_cast<long long>(oz) * oh + oy) * ow + ox] = from_float<To>(v);
            }
        }
    }
}
}  // namespace interp

// ---- extern "C" entry points (parameter lists documented in src/backend/kernel/interp.rs) ----
// sv_interp3d_<mode>_<x dtype>_<out dtype>: every mode for x, out each f32 or a 16-bit storage
// dtype. Each `EMU_KERNEL(name);` is on its own line: build.rs reads the kernel names there.

#define SV_INTERP(NAME, MODE, TI, TO)                                                                                  \
    extern "C" __global__ void sv_interp3d_##NAME(const TI* x, TO* out, int planes, int id, int ih, int iw, int od,    \
                                                  int oh, int ow) {                                                    \
        interp::resize<MODE, TI, TO>(x, out, planes, id, ih, iw, od, oh, ow);                                          \
    }

SV_INTERP(trilinear_f32_f32, interp::TRILINEAR, float, float)
EMU_KERNEL(sv_interp3d_trilinear_f32_f32);
SV_INTERP(trilinear_bf16_f32, interp::TRILINEAR, __nv_bfloat16, float)
EMU_KERNEL(sv_interp3d_trilinear_bf16_f32);
SV_INTERP(trilinear_f16_f32, interp::TRILINEAR, __half, float)
EMU_KERNEL(sv_interp3d_trilinear_f16_f32);
SV_INTERP(trilinear_f32_bf16, interp::TRILINEAR, float, __nv_bfloat16)
EMU_KERNEL(sv_interp3d_trilinear_f32_bf16);
SV_INTERP(trilinear_f32_f16, interp::TRILINEAR, float, __half)
EMU_KERNEL(sv_interp3d_trilinear_f32_f16);
SV_INTERP(trilinear_bf16_bf16, interp::TRILINEAR, __nv_bfloat16, __nv_bfloat16)
EMU_KERNEL(sv_interp3d_trilinear_bf16_bf16);
SV_INTERP(trilinear_f16_f16, interp::TRILINEAR, __half, __half)
EMU_KERNEL(sv_interp3d_trilinear_f16_f16);

SV_INTERP(nearest_exact_f32_f32, interp::NEAREST_EXACT, float, float)
EMU_KERNEL(sv_interp3d_nearest_exact_f32_f32);
SV_INTERP(nearest_exact_bf16_f32, interp::NEAREST_EXACT, __nv_bfloat16, float)
EMU_KERNEL(sv_interp3d_nearest_exact_bf16_f32);
SV_INTERP(nearest_exact_f16_f32, interp::NEAREST_EXACT, __half, float)
EMU_KERNEL(sv_interp3d_nearest_exact_f16_f32);
SV_INTERP(nearest_exact_f32_bf16, interp::NEAREST_EXACT, float, __nv_bfloat16)
EMU_KERNEL(sv_interp3d_nearest_exact_f32_bf16);
SV_INTERP(nearest_exact_f32_f16, interp::NEAREST_EXACT, float, __half)
EMU_KERNEL(sv_interp3d_nearest_exact_f32_f16);
SV_INTERP(nearest_exact_bf16_bf16, interp::NEAREST_EXACT, __nv_bfloat16, __nv_bfloat16)
EMU_KERNEL(sv_interp3d_nearest_exact_bf16_bf16);
SV_INTERP(nearest_exact_f16_f16, interp::NEAREST_EXACT, __half, __half)
EMU_KERNEL(sv_interp3d_nearest_exact_f16_f16);

SV_INTERP(nearest_f32_f32, interp::NEAREST, float, float)
EMU_KERNEL(sv_interp3d_nearest_f32_f32);
SV_INTERP(nearest_bf16_f32, interp::NEAREST, __nv_bfloat16, float)
EMU_KERNEL(sv_interp3d_nearest_bf16_f32);
SV_INTERP(nearest_f16_f32, interp::NEAREST, __half, float)
EMU_KERNEL(sv_interp3d_nearest_f16_f32);
SV_INTERP(nearest_f32_bf16, interp::NEAREST, float, __nv_bfloat16)
EMU_KERNEL(sv_interp3d_nearest_f32_bf16);
SV_INTERP(nearest_f32_f16, interp::NEAREST, float, __half)
EMU_KERNEL(sv_interp3d_nearest_f32_f16);
SV_INTERP(nearest_bf16_bf16, interp::NEAREST, __nv_bfloat16, __nv_bfloat16)
EMU_KERNEL(sv_interp3d_nearest_bf16_bf16);
SV_INTERP(nearest_f16_f16, interp::NEAREST, __half, __half)
EMU_KERNEL(sv_interp3d_nearest_f16_f16);
