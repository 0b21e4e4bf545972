// Layer norms (spec §1.3, §4.3, §4.4, §7.2, §7.7; the op contract in src/backend/mod.rs).
// Launch code: src/backend/kernel/norm.rs.
//
// - sv_layer_norm_<T>: per row over the last dim, one warp per row (4 rows per 128-thread
//   block). f32 statistics as the CPU reference computes them: the mean, then the biased
//   variance of the centred values (two passes; the row is re-read from L1/L2, not cached in
//   registers, so any width works), then (x - mean) * rstd * w + b.
// - sv_layer_norm_joint_stats_<T> + sv_layer_norm_joint_apply_<T>: one normalisation over all
//   n values of each sample (3,145,728 in the decoder's upscaling, spec §4.4), two stages:
//   stage 1, `parts` blocks per sample each reduce a contiguous slice to (count, mean, M2),
//   merged with Chan et al.'s pairwise formula (robust: no sum-of-squares cancellation), into
//   scratch; stage 2, every block merges its sample's partials in one fixed order (so every
//   block gets bit-identical statistics) and normalises, applies the elementwise affine and
//   the activation over a grid-stride slice.
#include "cuda_compat.cuh"
#include "common.cuh"

namespace layer_norm {
constexpr int ROW_WARPS = 4;  // rows (warps) per block of the row kernel
constexpr int JOINT_BLOCK = 256;
constexpr int JOINT_WARPS = JOINT_BLOCK / 32;

template <class T>
struct Vec {
    static constexpr int N = 16 / sizeof(T);  // elements per 16-byte access
};

template <class T>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[16 / sizeof(T)]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) v[i] = to_float(e[i]);
}

template <class T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[16 / sizeof(T)]) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// ---------------------------------------------------------------------------------------------
// Row LayerNorm. `vec` (host-checked): cols % Vec<T>::N == 0 and x, out, w, b 16-byte aligned;
// lane l then handles the 16-byte chunks l, l + 32, ... of its row, else elements l, l + 32, ...
// In place is safe: every lane finishes reading the row (both reductions are butterflies over
// all 32 lanes) before any lane writes, and each element is rewritten by the lane that read it.
// ---------------------------------------------------------------------------------------------
template <class T>
__device__ void rows(const T* x, T* out, const T* w, const T* b, int nrows, int cols, float eps, int vec) {
    const int lane = threadIdx.x & 31;
    const long long row = static_cast<long long>(blockIdx.x) * ROW_WARPS + (threadIdx.x >> 5);
    if (row >= nrows) return;  // whole warps leave together; the kernel has no block barrier
    const T* xr = x + row * cols;
    T* orow = out + row * cols;
    const float n = static_cast<float>(cols);
    constexpr int N = Vec<T>::N;
    float s = 0.f;
    if (vec) {
        for (int c = lane * N; c < cols; c += 32 * N) {
            float v[N];
            load_vec(xr + c, v);
#pragma unroll
            for (int k = 0; k < N; ++k) s += v[k];
        }
    } else {
        for (int c = lane; c < cols; c += 32) s += to_float(xr[c]);
    }
    const float mean = warp_reduce_sum(s) / n;
    float q = 0.f;
    if (vec) {
        for (int c = lane * N; c < cols; c += 32 * N) {
            float v[N];
            load_vec(xr + c, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float d = v[k] - mean;
                q += d * d;
            }
        }
    } else {
        for (int c = lane; c < cols; c += 32) {
            const float d = to_float(xr[c]) - mean;
            q += d * d;
        }
    }
    const float var = warp_reduce_sum(q) / n;
    const float rstd = 1.f / sqrtf(var + eps);
    if (vec) {
        for (int c = lane * N; c < cols; c += 32 * N) {
            float v[N], wv[N], bv[N];
            load_vec(xr + c, v);
            load_vec(w + c, wv);
            load_vec(b + c, bv);
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] = (v[k] - mean) * rstd * wv[k] + bv[k];
            store_vec(orow + c, v);
        }
    } else {
        for (int c = lane; c < cols; c += 32) {
            orow[c] = from_float<T>((to_float(xr[c]) - mean) * rstd * to_float(w[c]) + to_float(b[c]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Joint LayerNorm.
// ---------------------------------------------------------------------------------------------

// Running statistics of a set of values: count, mean, sum of squared deviations from the mean.
struct Stats {
    float n, mean, m2;
};

// Chan, Golub & LeVeque's pairwise update: merges `o` into `s`.
__device__ __forceinline__ void merge(Stats& s, const Stats& o) {
    if (o.n == 0.f) return;
    if (s.n == 0.f) {
        s = o;
        return;
    }
    const float n = s.n + o.n;
    const float d = o.mean - s.mean;
    const float f = o.n / n;
    s.mean += d * f;
    s.m2 += o.m2 + d * d * s.n * f;
    s.n = n;
}

// Merges lane statistics down to lane 0 (a shfl_down tree: lane 0's result does not depend on
// what the other lanes end with).
__device__ __forceinline__ Stats warp_merge(Stats s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Stats t;
        t.n = __shfl_down_sync(0xffffffffu, s.n, o);
        t.mean = __shfl_down_sync(0xffffffffu, s.mean, o);
        t.m2 = __shfl_down_sync(0xffffffffu, s.m2, o);
        if ((threadIdx.x & 31) + o < 32) merge(s, t);
    }
    return s;
}

// Merges the statistics of every thread of a JOINT_BLOCK block; the result is valid in thread 0.
__device__ __forceinline__ Stats block_merge(Stats s) {
    __shared__ float part[3][JOINT_WARPS];
    s = warp_merge(s);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) {
        part[0][wid] = s.n;
        part[1][wid] = s.mean;
        part[2][wid] = s.m2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < JOINT_WARPS; ++k) merge(s, Stats{part[0][k], part[1][k], part[2][k]});
    }
    return s;
}

// Stage 1: grid (parts, batch), block JOINT_BLOCK. Block p of sample s reduces the elements
// [p*chunk, min((p+1)*chunk, n)) of the sample (chunk = ceil(n / parts), rounded up to a whole
// number of vectors) and writes (count, mean, M2, 0) to part[(s*parts + p)*4 ..]. With `vec`
// (host-checked: n % Vec<T>::N == 0, x 16-byte aligned) threads take 16-byte chunks, each reduced
// in registers and merged once; else single values (Welford's update).
template <class T>
__device__ void joint_stats(const T* x, float* part, long long n, int parts, int vec) {
    const int s_idx = blockIdx.y, p = blockIdx.x;
    const T* xs = x + static_cast<long long>(s_idx) * n;
    constexpr int N = Vec<T>::N;
    long long chunk = (n + parts - 1) / parts;
    if (vec) chunk = (chunk + N - 1) / N * N;
    const long long start = static_cast<long long>(p) * chunk;
    const long long end = min(start + chunk, n);
    Stats st{0.f, 0.f, 0.f};
    if (vec) {
        for (long long i = start + static_cast<long long>(threadIdx.x) * N; i < end; i += static_cast<long long>(JOINT_BLOCK) * N) {
            float v[N];
            load_vec(xs + i, v);
            // The chunk's own statistics (two passes over registers), then one merge.
            float sum = 0.f;
#pragma unroll
            for (int k = 0; k < N; ++k) sum += v[k];
            const float cm = sum / static_cast<float>(N);
            float cm2 = 0.f;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float d = v[k] - cm;
                cm2 += d * d;
            }
            merge(st, Stats{static_cast<float>(N), cm, cm2});
        }
    } else {
        for (long long i = start + threadIdx.x; i < end; i += JOINT_BLOCK) {
            // Welford's single-value update.
            const float v = to_float(xs[i]);
            st.n += 1.f;
            const float d = v - st.mean;
            st.mean += d / st.n;
            st.m2 += d * (v - st.mean);
        }
    }
    st = block_merge(st);
    if (threadIdx.x == 0) {
        float* o = part + (static_cast<long long>(s_idx) * parts + p) * 4;
        o[0] = st.n;
        o[1] = st.mean;
        o[2] = st.m2;
        o[3] = 0.f;
    }
}

// Stage 2: grid (blocks, batch), block JOINT_BLOCK. Merges the sample's `parts` partials
// (thread t takes partials t, t + 256, ...; then the warp and block trees: a fixed order), then
// out = act((x - mean) * rstd * w + b) over a grid-stride slice of the sample. In place is
// safe: stage 1 has finished reading, and each element is rewritten by the thread that read it.
template <class T>
__device__ void joint_apply(const T* x, T* out, const T* w, const T* b, const float* part, long long n, int parts, float eps,
                            int act, int vec) {
    __shared__ float stat[2];
    const int s_idx = blockIdx.y;
    Stats st{0.f, 0.f, 0.f};
    const float* ps = part + static_cast<long long>(s_idx) * parts * 4;
    for (int k = threadIdx.x; k < parts; k += JOINT_BLOCK) merge(st, Stats{ps[4 * k], ps[4 * k + 1], ps[4 * k + 2]});
    st = block_merge(st);
    if (threadIdx.x == 0) {
        stat[0] = st.mean;
        stat[1] = 1.f / sqrtf(st.m2 / st.n + eps);  // biased variance
    }
    __syncthreads();
    const float mean = stat[0], rstd = stat[1];
    const T* xs = x + static_cast<long long>(s_idx) * n;
    T* os = out + static_cast<long long>(s_idx) * n;
    const long long tid = static_cast<long long>(blockIdx.x) * JOINT_BLOCK + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * JOINT_BLOCK;
    constexpr int N = Vec<T>::N;
    if (vec) {
        for (long long i = tid * N; i < n; i += stride * N) {
            float v[N], wv[N], bv[N];
            load_vec(xs + i, v);
            load_vec(w + i, wv);
            load_vec(b + i, bv);
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] = act_apply(act, (v[k] - mean) * rstd * wv[k] + bv[k]);
            store_vec(os + i, v);
        }
    } else {
        for (long long i = tid; i < n; i += stride) {
            os[i] = from_float<T>(act_apply(act, (to_float(xs[i]) - mean) * rstd * to_float(w[i]) + to_float(b[i])));
        }
    }
}
}  // namespace layer_norm

// ---- extern "C" entry points (parameter lists documented in src/backend/kernel/norm.rs) ----
// Each `EMU_KERNEL(name);` is on its own line: build.rs reads the kernel names from those lines.

#define SV_LAYER_NORM(SUF, T)                                                                                    \
    extern "C" __global__ void sv_layer_norm_##SUF(const T* x, T* out, const T* w, const T* b, int rows, int cols, \
                                                   float eps, int vec) {                                         \
        layer_norm::rows(x, out, w, b, rows, cols, eps, vec);                                                    \
    }
#define SV_LAYER_NORM_JOINT(SUF, T)                                                                                   \
    extern "C" __global__ void sv_layer_norm_joint_stats_##SUF(const T* x, float* part, long long n, int parts,       \
                                                               int vec) {                                             \
        layer_norm::joint_stats(x, part, n, parts, vec);                                                              \
    }                                                                                                                 \
    extern "C" __global__ void sv_layer_norm_joint_apply_##SUF(const T* x, T* out, const T* w, const T* b,            \
                                                               const float* part, long long n, int parts, float eps,  \
                                                               int act, int vec) {                                    \
        layer_norm::joint_apply(x, out, w, b, part, n, parts, eps, act, vec);                                         \
    }

SV_LAYER_NORM(f32, float)
EMU_KERNEL(sv_layer_norm_f32);
SV_LAYER_NORM(f16, __half)
EMU_KERNEL(sv_layer_norm_f16);
SV_LAYER_NORM(bf16, __nv_bfloat16)
EMU_KERNEL(sv_layer_norm_bf16);

SV_LAYER_NORM_JOINT(f32, float)
EMU_KERNEL(sv_layer_norm_joint_stats_f32);
EMU_KERNEL(sv_layer_norm_joint_apply_f32);
SV_LAYER_NORM_JOINT(f16, __half)
EMU_KERNEL(sv_layer_norm_joint_stats_f16);
EMU_KERNEL(sv_layer_norm_joint_apply_f16);
SV_LAYER_NORM_JOINT(bf16, __nv_bfloat16)
EMU_KERNEL(sv_layer_norm_joint_stats_bf16);
EMU_KERNEL(sv_layer_norm_joint_apply_bf16);
