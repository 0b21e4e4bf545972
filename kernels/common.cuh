// Helpers shared by the kernel files: dtype conversion, warp and block reductions, activations.
// Conventions: see the top of cuda_compat.cuh.
#pragma once
#include "cuda_compat.cuh"

// ---- storage <-> f32 (compute is always f32; DESIGN.md "Precision") ----
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even into the storage type.
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- activations: the codes of `Act::code()` in src/backend/mod.rs ----
enum ActCode : int { ACT_NONE = 0, ACT_GELU = 1, ACT_RELU = 2, ACT_QUICK_GELU = 3 };

// `Act::apply` in f32: exact-erf GELU (nn.GELU()), ReLU, quick_gelu (x * sigmoid(1.702 x)).
// GELU as 0.5 x erfc(-x / sqrt 2), the same function as 0.5 x (1 + erf(x / sqrt 2)) without
// the cancellation of 1 + erf for negative x (erfcf: 4 ulp at most, CUDA math API).
__device__ __forceinline__ float act_apply(int code, float x) {
    switch (code) {
        case ACT_GELU:
            return 0.5f * x * erfcf(-x * 0.70710678f);
        case ACT_RELU:
            return fmaxf(x, 0.f);
        case ACT_QUICK_GELU:
            return x / (1.f + expf(-1.702f * x));
        default:
            return x;
    }
}

// ---- warp reductions: xor butterflies, so every lane ends with the same (bit-identical) value ----
// The reduction operators: `apply` and its identity.
struct ReduceSum {
    __device__ __forceinline__ static float apply(float a, float b) { return a + b; }
    __device__ __forceinline__ static float identity() { return 0.f; }
};
struct ReduceMax {
    __device__ __forceinline__ static float apply(float a, float b) { return fmaxf(a, b); }
    __device__ __forceinline__ static float identity() { return -INFINITY; }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_reduce_sum(float v) { return warp_reduce<ReduceSum>(v); }
__device__ __forceinline__ float warp_reduce_max(float v) { return warp_reduce<ReduceMax>(v); }

// ---- block reductions over a 1-D block of exactly BLOCK threads (BLOCK a multiple of 32) ----
// Every thread must call them (they contain __syncthreads) and every thread gets the result.
// Two barriers: warp partials are read before the second one, and the next call writes them
// only after it, so back-to-back calls need no third barrier.
namespace common_detail {
template <int BLOCK>
__device__ __forceinline__ void check_block() {
    static_assert(BLOCK % 32 == 0 && BLOCK >= 32 && BLOCK <= 1024, "BLOCK must be a multiple of 32 in [32, 1024]");
#if EMU_HOST_EMULATION
    if (blockDim.x != BLOCK || blockDim.y != 1 || blockDim.z != 1) {
        emu::fail("block reduction for BLOCK=%d launched with block (%u,%u,%u)", BLOCK, blockDim.x, blockDim.y, blockDim.z);
    }
#endif
}
}  // namespace common_detail

template <int BLOCK, class Op>
__device__ __forceinline__ float block_reduce(float v) {
    common_detail::check_block<BLOCK>();
    constexpr int NW = BLOCK / 32;
    v = warp_reduce<Op>(v);
    if (NW == 1) return v;
    __shared__ float part[NW];
    __shared__ float total;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) part[wid] = v;
    __syncthreads();
    if (wid == 0) {
        float t = lane < NW ? part[lane] : Op::identity();
        t = warp_reduce<Op>(t);
        if (lane == 0) total = t;
    }
    __syncthreads();
    return total;
}
template <int BLOCK>
__device__ __forceinline__ float block_reduce_sum(float v) {
    return block_reduce<BLOCK, ReduceSum>(v);
}
template <int BLOCK>
__device__ __forceinline__ float block_reduce_max(float v) {
    return block_reduce<BLOCK, ReduceMax>(v);
}

// Two sums at once (e.g. sum and sum of squares for a norm), one pair of barriers.
template <int BLOCK>
__device__ __forceinline__ float2 block_reduce_sum2(float2 v) {
    common_detail::check_block<BLOCK>();
    constexpr int NW = BLOCK / 32;
    v.x = warp_reduce_sum(v.x);
    v.y = warp_reduce_sum(v.y);
    if (NW == 1) return v;
    __shared__ float2 part[NW];
    __shared__ float2 total;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) part[wid] = v;
    __syncthreads();
    if (wid == 0) {
        float2 t = lane < NW ? part[lane] : make_float2(0.f, 0.f);
        t.x = warp_reduce_sum(t.x);
        t.y = warp_reduce_sum(t.y);
        if (lane == 0) total = t;
    }
    __syncthreads();
    return total;
}
