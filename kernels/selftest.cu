// Emulator probe kernels (tests/emulator.rs): semantics of barriers, shuffles, votes, atomics,
// shared memory, conversions, wmma, mma.sync/ldmatrix/cp.async, and planted bugs the emulator
// must catch. They compile for the GPU too (sm_90a, sm_80), so the same probes can cross-check
// the emulator on CUDA; the `bug_*` kernels are emulator-only probes (on a GPU they hang or are
// undefined) and must never be launched there.
#include "cuda_compat.cuh"
#include "common.cuh"
#include "ptx.cuh"

namespace selftest {
constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ unsigned block_linear() { return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); }
__device__ __forceinline__ unsigned thread_linear() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
__device__ __forceinline__ unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }
__device__ __forceinline__ unsigned global_linear() { return block_linear() * block_threads() + thread_linear(); }
}  // namespace selftest

// ---- indices: every thread writes its thread and block linear index; thread 0 of block 0 the dims.
extern "C" __global__ void sv_selftest_indices(int* out, int* dims) {
    using namespace selftest;
    const unsigned g = global_linear();
    out[2 * g] = static_cast<int>(thread_linear());
    out[2 * g + 1] = static_cast<int>(block_linear());
    if (g == 0) {
        dims[0] = gridDim.x;
        dims[1] = gridDim.y;
        dims[2] = gridDim.z;
        dims[3] = blockDim.x;
        dims[4] = blockDim.y;
        dims[5] = blockDim.z;
    }
}
EMU_KERNEL(sv_selftest_indices);

// ---- barriers: reverse each block's slice through static shared memory. use_barrier = 0 plants
// a read-after-write race (uniform across the block, so not a divergent barrier).
extern "C" __global__ void sv_selftest_reverse(const float* in, float* out, int use_barrier) {
    __shared__ float s[1024];
    const int n = blockDim.x, t = threadIdx.x;
    const long long base = static_cast<long long>(blockIdx.x + gridDim.x * blockIdx.y) * n;
    s[t] = in[base + t];
    if (use_barrier) __syncthreads();
    out[base + t] = s[n - 1 - t];
}
EMU_KERNEL(sv_selftest_reverse);

// ---- __syncthreads_count / _and / _or.
extern "C" __global__ void sv_selftest_sync_count(const int* pred, int* out) {
    const unsigned g = selftest::global_linear();
    const int p = pred[g];
    out[3 * g] = __syncthreads_count(p);
    out[3 * g + 1] = __syncthreads_and(p);
    out[3 * g + 2] = __syncthreads_or(p);
}
EMU_KERNEL(sv_selftest_sync_count);

// ---- shuffles and votes. 26 outputs per thread (layout documented in tests/emulator.rs).
extern "C" __global__ void sv_selftest_shuffle(const int* in, int* out, int src_lane, int delta, int lane_mask) {
    using namespace selftest;
    const unsigned g = global_linear();
    const int v = in[g];
    int* o = out + 26 * g;
    const int widths[4] = {32, 16, 8, 4};
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
        const int w = widths[wi];
        o[wi * 4 + 0] = __shfl_sync(FULL, v, src_lane, w);
        o[wi * 4 + 1] = __shfl_up_sync(FULL, v, delta, w);
        o[wi * 4 + 2] = __shfl_down_sync(FULL, v, delta, w);
        o[wi * 4 + 3] = __shfl_xor_sync(FULL, v, lane_mask, w);
    }
    o[16] = static_cast<int>(__ballot_sync(FULL, v & 1));
    o[17] = __any_sync(FULL, v % 7 == 0);
    o[18] = __all_sync(FULL, v % 5 != 0);
    o[19] = static_cast<int>(__activemask());
    const float f = __shfl_xor_sync(FULL, static_cast<float>(v) * 0.5f, 1);
    o[20] = __float_as_int(f);
    const double d = __shfl_down_sync(FULL, static_cast<double>(v) + 0.25, delta);
    o[21] = static_cast<int>(d * 4.0);
    o[22] = __reduce_add_sync(FULL, v);
    o[23] = __reduce_max_sync(FULL, v);
    const long long ll = __shfl_sync(FULL, (static_cast<long long>(v) << 32) | static_cast<unsigned>(threadIdx.x), src_lane);
    o[24] = static_cast<int>(ll >> 32) ^ static_cast<int>(ll & 0xffffffff);
    const __half h = __shfl_xor_sync(FULL, __float2half(static_cast<float>(v & 1023)), 2);
    o[25] = __half_as_ushort(h);
}
EMU_KERNEL(sv_selftest_shuffle);

// ---- atomics across blocks (layout documented in tests/emulator.rs).
extern "C" __global__ void sv_selftest_atomics(int* i32, unsigned* u32, unsigned long long* u64, float* f32, double* f64,
                                               unsigned short* h16) {
    const int g = static_cast<int>(selftest::global_linear());
    atomicAdd(&i32[0], 1);
    atomicMax(&i32[1], g);
    atomicMin(&i32[2], (g * 7919) % 1000 - 500);
    int old = i32[3], assumed;
    do {
        assumed = old;
        old = atomicCAS(&i32[3], assumed, assumed + 2);
    } while (old != assumed);
    atomicExch(&i32[4], g);
    atomicSub(&i32[5], 3);
    atomicSub(&u32[0], 1u);
    atomicOr(&u32[1], 1u << (g % 32));
    atomicXor(&u32[2], static_cast<unsigned>(g));
    atomicInc(&u32[3], 15u);
    atomicAnd(&u32[4], ~(1u << (g % 32)));
    atomicMax(&u32[5], static_cast<unsigned>(g) * 3u);
    atomicAdd(&u64[0], 1ull << 33);
    atomicMax(&u64[1], static_cast<unsigned long long>(g) << 40);
    atomicAdd(&f32[0], 1.0f);
    atomicAdd(&f32[1], 0.5f * static_cast<float>(g % 3));
    atomicExch(&f32[2], 2.5f);
    atomicAdd(&f64[0], static_cast<double>(g));
    if (g < 2048) atomicAdd(reinterpret_cast<__half*>(&h16[0]), __float2half(1.0f));
    if (g < 256) atomicAdd(reinterpret_cast<__nv_bfloat16*>(&h16[1]), __float2bfloat16(1.0f));
}
EMU_KERNEL(sv_selftest_atomics);

// ---- dynamic shared memory: with init = 0 each thread reads a slot nobody wrote (the emulator
// poisons dynamic shared memory with 0xff bytes, i.e. NaN).
extern "C" __global__ void sv_selftest_dyn_smem(float* out, int init) {
    EMU_DYN_SHARED(float, s);
    const int n = blockDim.x, t = threadIdx.x;
    if (init) s[t] = static_cast<float>(t + 1000 * blockIdx.x);
    __syncthreads();
    out[blockIdx.x * n + t] = s[n - 1 - t];
}
EMU_KERNEL(sv_selftest_dyn_smem);

// ---- cp.async: each thread copies 16-byte chunks of its block's slice into dynamic shared memory,
// then the block writes the chunks back in reverse order.
// mode 0: one group, then wait; mode 1: the wait is missing (planted bug); mode 2: two groups,
// wait<1> then read the first half, wait<0> then read the second half; chunks with index >=
// valid_chunks are zero-filled (zfill) instead of copied.
extern "C" __global__ void sv_selftest_cp_async(const float* in, float* out, int mode, int valid_chunks) {
    EMU_DYN_SHARED(float, s);
    const int n = blockDim.x, t = threadIdx.x;
    const float* src = in + static_cast<long long>(blockIdx.x) * 8 * n;
    float* dst = out + static_cast<long long>(blockIdx.x) * 8 * n;
    // chunk c covers floats 4c .. 4c+3; thread t owns chunks t (first half) and n + t (second half)
    ptx::cp_async_16_zfill(&s[4 * t], &src[4 * t], t < valid_chunks);
    if (mode == 2) ptx::cp_async_commit();
    ptx::cp_async_16_zfill(&s[4 * (n + t)], &src[4 * (n + t)], n + t < valid_chunks);
    ptx::cp_async_commit();
    if (mode == 0) ptx::cp_async_wait<0>();
    if (mode == 2) ptx::cp_async_wait<1>();
    __syncthreads();
    for (int j = 0; j < 4; ++j) dst[4 * t + j] = s[4 * (n - 1 - t) + j];
    if (mode == 2) {
        ptx::cp_async_wait<0>();
        __syncthreads();
    }
    for (int j = 0; j < 4; ++j) dst[4 * (n + t) + j] = s[4 * (2 * n - 1 - t) + j];
}
EMU_KERNEL(sv_selftest_cp_async);

// ---- row softmax + activation + row statistics through common.cuh's block reductions (the
// schedule-determinism probe): y = act(softmax(x)), stats = (mean, mean of squares) of x.
namespace selftest {
template <class T, int BLOCK>
__device__ void softmax_rows(const T* x, T* y, float* stats, int cols, int act) {
    const T* xr = x + static_cast<long long>(blockIdx.x) * cols;
    T* yr = y + static_cast<long long>(blockIdx.x) * cols;
    float m = -INFINITY;
    float2 s2 = make_float2(0.f, 0.f);
    for (int c = threadIdx.x; c < cols; c += BLOCK) {
        const float v = to_float(xr[c]);
        m = fmaxf(m, v);
        s2.x += v;
        s2.y += v * v;
    }
    m = block_reduce_max<BLOCK>(m);
    s2 = block_reduce_sum2<BLOCK>(s2);
    float sum = 0.f;
    for (int c = threadIdx.x; c < cols; c += BLOCK) sum += expf(to_float(xr[c]) - m);
    sum = block_reduce_sum<BLOCK>(sum);
    const float inv = 1.f / sum;
    for (int c = threadIdx.x; c < cols; c += BLOCK) yr[c] = from_float<T>(act_apply(act, expf(to_float(xr[c]) - m) * inv));
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = s2.x / cols;
        stats[2 * blockIdx.x + 1] = s2.y / cols;
    }
}
}  // namespace selftest
extern "C" __global__ void sv_selftest_softmax_f32(const float* x, float* y, float* stats, int cols, int act) {
    selftest::softmax_rows<float, 256>(x, y, stats, cols, act);
}
EMU_KERNEL(sv_selftest_softmax_f32);
extern "C" __global__ void sv_selftest_softmax_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, float* stats, int cols, int act) {
    selftest::softmax_rows<__nv_bfloat16, 256>(x, y, stats, cols, act);
}
EMU_KERNEL(sv_selftest_softmax_bf16);
extern "C" __global__ void sv_selftest_softmax_f16_w32(const __half* x, __half* y, float* stats, int cols, int act) {
    selftest::softmax_rows<__half, 32>(x, y, stats, cols, act);
}
EMU_KERNEL(sv_selftest_softmax_f16_w32);

// ---- act_apply (common.cuh) against Act::apply.
extern "C" __global__ void sv_selftest_act(const float* x, float* y, int n, int code) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = act_apply(code, x[i]);
}
EMU_KERNEL(sv_selftest_act);

// ---- half / bf16 conversions and arithmetic (bit patterns in and out).
// (grid-stride loops: a few threads convert many values, for the exhaustive sweeps)
extern "C" __global__ void sv_selftest_to_float(const unsigned short* in, float* out, int n, int bf16) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = bf16 ? __bfloat162float(__ushort_as_bfloat16(in[i])) : __half2float(__ushort_as_half(in[i]));
    }
}
EMU_KERNEL(sv_selftest_to_float);
extern "C" __global__ void sv_selftest_from_float(const float* in, unsigned short* out, int n, int bf16) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(in[i])) : __half_as_ushort(__float2half_rn(in[i]));
    }
}
EMU_KERNEL(sv_selftest_from_float);
namespace selftest {
template <class H>
__device__ H arith(H a, H b, int op) {
    switch (op) {
        case 0:
            return __hadd(a, b);
        case 1:
            return __hsub(a, b);
        case 2:
            return __hmul(a, b);
        case 3:
            return __hdiv(a, b);
        case 4:
            return a * b + a;  // operators: two roundings
        default:
            return __hmax(a, b);
    }
}
}  // namespace selftest
extern "C" __global__ void sv_selftest_half_arith(const unsigned short* a, const unsigned short* b, unsigned short* out, int n, int op,
                                                  int bf16) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (bf16) {
            out[i] = __bfloat16_as_ushort(selftest::arith(__ushort_as_bfloat16(a[i]), __ushort_as_bfloat16(b[i]), op));
        } else {
            out[i] = __half_as_ushort(selftest::arith(__ushort_as_half(a[i]), __ushort_as_half(b[i]), op));
        }
    }
}
EMU_KERNEL(sv_selftest_half_arith);

// ---- nvcuda::wmma GEMM: C = alpha * A @ B, A (M x K) row-major, B given as Bt (N x K) row-major
// (a col-major K x N operand). One warp per 16x16 tile of C; grid (N/16, M/16), block 32.
namespace selftest {
template <class T>
__device__ void wmma_gemm(const T* A, const T* Bt, float* C, int N, int K, float alpha) {
    using namespace nvcuda;
    const int tm = blockIdx.y * 16, tn = blockIdx.x * 16;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < K; k += 16) {
        wmma::load_matrix_sync(a, A + static_cast<long long>(tm) * K + k, K);
        wmma::load_matrix_sync(b, Bt + static_cast<long long>(tn) * K + k, K);
        wmma::mma_sync(acc, a, b, acc);
    }
    for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= alpha;
    wmma::store_matrix_sync(C + static_cast<long long>(tm) * N + tn, acc, N, wmma::mem_row_major);
}
}  // namespace selftest
extern "C" __global__ void sv_selftest_wmma_f16(const __half* A, const __half* Bt, float* C, int N, int K, float alpha) {
    selftest::wmma_gemm(A, Bt, C, N, K, alpha);
}
EMU_KERNEL(sv_selftest_wmma_f16);
extern "C" __global__ void sv_selftest_wmma_bf16(const __nv_bfloat16* A, const __nv_bfloat16* Bt, float* C, int N, int K, float alpha) {
    selftest::wmma_gemm(A, Bt, C, N, K, alpha);
}
EMU_KERNEL(sv_selftest_wmma_bf16);

// ---- mma.sync.m16n8k16 GEMM through cp.async + ldmatrix: C = A @ B, A (M x K) row-major; B is
// (N x K) row-major when b_kn = 0 (an nn.Linear weight) or (K x N) row-major when b_kn = 1 (loaded
// with ldmatrix .trans). One warp per 16x8 tile of C; grid (N/8, M/16), block 32. M % 16 == 0,
// N % 8 == 0, K % 16 == 0.
namespace selftest {
template <bool BF16>
__device__ void mma_gemm(const unsigned short* A, const unsigned short* B, float* C, int N, int K, int b_kn) {
    __shared__ __align__(16) unsigned short sA[16 * 16];
    __shared__ __align__(16) unsigned short sB[16 * 8];
    const int lane = threadIdx.x;
    const int tm = blockIdx.y * 16, tn = blockIdx.x * 8;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < K; k0 += 16) {
        // A tile: 16 rows of 32 bytes = 32 chunks of 16 bytes, one per lane.
        ptx::cp_async_16(&sA[(lane / 2) * 16 + (lane % 2) * 8], A + static_cast<long long>(tm + lane / 2) * K + k0 + (lane % 2) * 8);
        if (lane < 16) {
            if (!b_kn) {
                ptx::cp_async_16(&sB[(lane / 2) * 16 + (lane % 2) * 8], B + static_cast<long long>(tn + lane / 2) * K + k0 + (lane % 2) * 8);
            } else {
                ptx::cp_async_16(&sB[lane * 8], B + static_cast<long long>(k0 + lane) * N + tn);
            }
        }
        ptx::cp_async_wait_all();
        __syncwarp();
        unsigned a[4], b[2];
        ptx::ldmatrix_x4(a, &sA[(lane % 16) * 16 + 8 * (lane / 16)]);
        if (!b_kn) {
            ptx::ldmatrix_x2(b, &sB[(lane % 8) * 16 + 8 * ((lane / 8) % 2)]);
        } else {
            ptx::ldmatrix_x2_trans(b, &sB[(lane % 16) * 8]);
        }
        if (BF16) {
            ptx::mma_m16n8k16_bf16(acc, a, b, acc);
        } else {
            ptx::mma_m16n8k16_f16(acc, a, b, acc);
        }
        __syncwarp();  // the next iteration overwrites the tiles
    }
    const int g = lane >> 2, t = lane & 3;
    C[static_cast<long long>(tm + g) * N + tn + 2 * t] = acc[0];
    C[static_cast<long long>(tm + g) * N + tn + 2 * t + 1] = acc[1];
    C[static_cast<long long>(tm + g + 8) * N + tn + 2 * t] = acc[2];
    C[static_cast<long long>(tm + g + 8) * N + tn + 2 * t + 1] = acc[3];
}
}  // namespace selftest
extern "C" __global__ void sv_selftest_mma_bf16(const unsigned short* A, const unsigned short* B, float* C, int N, int K, int b_kn) {
    selftest::mma_gemm<true>(A, B, C, N, K, b_kn);
}
EMU_KERNEL(sv_selftest_mma_bf16);
extern "C" __global__ void sv_selftest_mma_f16(const unsigned short* A, const unsigned short* B, float* C, int N, int K, int b_kn) {
    selftest::mma_gemm<false>(A, B, C, N, K, b_kn);
}
EMU_KERNEL(sv_selftest_mma_f16);

// ---- lanes that exited may be named in a full mask ("all non-exited threads named in mask must
// execute the same intrinsic"): lanes >= 20 of every warp return, the others shuffle and vote.
extern "C" __global__ void sv_selftest_exited_lanes(int* out) {
    const int lane = threadIdx.x & 31;
    if (lane >= 20) return;
    int* o = out + 5 * threadIdx.x;
    o[0] = __shfl_xor_sync(0xffffffffu, 10 * lane, 1);
    o[1] = static_cast<int>(__ballot_sync(0xffffffffu, lane & 1));
    o[2] = static_cast<int>(__activemask());
    o[3] = __reduce_add_sync(0xffffffffu, lane);
    __syncwarp();
    o[4] = __shfl_down_sync(0xffffffffu, lane, 4);  // lanes 16..19 read lanes 20..23: own value
}
EMU_KERNEL(sv_selftest_exited_lanes);

// ---- a device-side assert.
extern "C" __global__ void sv_selftest_assert(int* out, int v) {
    assert(v != 3);
    out[threadIdx.x] = v;
}
EMU_KERNEL(sv_selftest_assert);

// ---- timing probe: `iters` rounds of one __syncthreads and one shuffle per thread.
extern "C" __global__ void sv_selftest_bench(float* out, int iters) {
    float v = static_cast<float>(threadIdx.x);
    for (int i = 0; i < iters; ++i) {
        __syncthreads();
        v += __shfl_xor_sync(0xffffffffu, v, 1) * 0.5f;
    }
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}
EMU_KERNEL(sv_selftest_bench);

// ---- planted bugs (emulator-only probes; never launch these on a GPU) ----
// A barrier in divergent code: half the block waits forever.
extern "C" __global__ void sv_selftest_bug_divergent_barrier(int* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}
EMU_KERNEL(sv_selftest_bug_divergent_barrier);
// Half a warp in a shuffle, the other half at __syncthreads.
extern "C" __global__ void sv_selftest_bug_divergent_warp_collective(int* out) {
    int v = static_cast<int>(threadIdx.x);
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
EMU_KERNEL(sv_selftest_bug_divergent_warp_collective);
// A partial-warp mask (not emulated: reported as an error).
extern "C" __global__ void sv_selftest_bug_partial_mask(int* out) {
    out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}
EMU_KERNEL(sv_selftest_bug_partial_mask);

#if EMU_HOST_EMULATION
// Two different kernels under one name: the first launch of the name must fail.
EMU_KERNEL_AS("sv_selftest_dup", sv_selftest_act);
EMU_KERNEL_AS("sv_selftest_dup", sv_selftest_indices);
#endif
