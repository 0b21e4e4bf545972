// ConvTranspose3d with kernel 2 and stride 2 (spec §4.4; the op contract in src/backend/mod.rs):
//     out[b, o, 2d+a, 2h+p, 2w+c] = act(bias[o] + Σ_i in[b, i, d, h, w] * W[i, o, a, p, c]).
// Per sample this is a GEMM  Y (V x 8*Cout) = X (V x Cin) @ W (Cin x 8*Cout)  over the V = D*H*W
// input voxels, whose column j = o*8 + a*4 + p*2 + c is scattered to the output voxel above; the
// bias and the activation are applied in that store. X is the input read channels-last
// ((B, V, Cin), row-major X) or channels-first ((B, Cin, D, H, W), i.e. Xᵀ row-major); W is the
// weight (Cin, Cout, 2, 2, 2) as stored, already (Cin x 8*Cout) row-major.
//
// Store pattern: columns 2t and 2t+1 of an accumulator pair differ only in c, i.e. they are the
// adjacent output elements 2w and 2w+1, and consecutive tile rows are consecutive w; so each
// warp store covers whole 32-byte sectors when W is a multiple of 8 (it is in the model).
//
// - sv_conv_transpose3d_k2s2_{bf16,f16}: tensor cores (mma.sync m16n8k16, f32 accumulators).
//   Block tile 64 voxels x 128 columns, K step 32, 8 warps (2 x 4) of 32 x 32, operands staged
//   in shared memory through cp.async (double-buffered) and read with ldmatrix; channels-first
//   tiles are stored k-major and read with ldmatrix.trans.
// - sv_conv_transpose3d_k2s2_f32: SIMT f32 (exact f32 products and sums, like the reference):
//   block tile 64 x 64, K step 16, 256 threads with 4 x 4 outputs each.
// Launch code: src/backend/kernel/conv.rs.
#include "cuda_compat.cuh"
#include "common.cuh"
#include "ptx.cuh"

namespace conv_transpose {

// Output addressing: the element of GEMM row v (input voxel (vd, vh, vw)) and column
// j = o*8 + a*4 + p*2 + c of sample b is at
//     sample_base(b) + col_off(j) + vox_off(v),
// vox_off(v) = 2vd*OH*OW + 2vh*OW + 2vw and col_off(j) = o*(2D*OH*OW) + a*OH*OW + p*OW + c,
// so the integer divisions are done once per row and once per column, not per element.
// Voxel indices fit in int (the launch code checks V < 2^31); offsets are 64-bit.
struct OutGeom {
    int h, w;
    long long ow, ohw, vol;  // 2W, 4HW, 8DHW
};
__device__ __forceinline__ OutGeom out_geom(int d, int h, int w) {
    OutGeom g;
    g.h = h;
    g.w = w;
    g.ow = 2LL * w;
    g.ohw = 4LL * h * w;
    g.vol = 2LL * d * g.ohw;
    return g;
}
__device__ __forceinline__ long long vox_off(const OutGeom& g, int v) {
    const int hw = g.h * g.w;
    const int vd = v / hw, rem = v - vd * hw;
    const int vh = rem / g.w, vw = rem - vh * g.w;
    return 2LL * vd * g.ohw + 2LL * vh * g.ow + 2 * vw;
}
__device__ __forceinline__ long long col_off(const OutGeom& g, int j) {
    return (j >> 3) * g.vol + ((j >> 2) & 1) * g.ohw + ((j >> 1) & 1) * g.ow + (j & 1);
}
// Columns j (even) and j + 1 differ only in c: the output elements p[0] and p[1]. Their offset
// is even (every term of vox_off and col_off is), so one 2-element store serves both whenever
// the output base is aligned to two elements (it is for whole buffers); else two stores.
template <class T>
__device__ __forceinline__ void store_pair(T* p, const T* bias, int act, int j, float acc0, float acc1) {
    const float b = to_float(bias[j >> 3]);
    const float v0 = act_apply(act, acc0 + b), v1 = act_apply(act, acc1 + b);
    if ((reinterpret_cast<uintptr_t>(p) & (2 * sizeof(T) - 1)) == 0) {
        if (sizeof(T) == 4) {
            *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
        } else {
            T e[2] = {from_float<T>(v0), from_float<T>(v1)};
            *reinterpret_cast<unsigned*>(p) = *reinterpret_cast<const unsigned*>(e);
        }
    } else {
        p[0] = from_float<T>(v0);
        p[1] = from_float<T>(v1);
    }
}

// ------------------------------------------------------------------------------------------------
// Tensor-core kernel (16-bit storage).
// ------------------------------------------------------------------------------------------------
constexpr int BM = 64, BN = 128, BK = 32, THREADS = 256, PAD = 8;
constexpr int LDA_CL = BK + PAD;  // channels-last A tile: [BM][BK + PAD] (row = voxel)
constexpr int LDA_CF = BM + PAD;  // channels-first A tile: [BK][BM + PAD] (row = input channel)
constexpr int LDB = BN + PAD;     // B tile: [BK][BN + PAD] (row = input channel)
constexpr int A_STAGE = BM * LDA_CL > BK * LDA_CF ? BM * LDA_CL : BK * LDA_CF;
constexpr int B_STAGE = BK * LDB;
// Dynamic shared memory of the tensor-core kernel, bytes (two stages of A and B, 16-bit).
constexpr int MMA_SMEM_BYTES = 2 * (A_STAGE + B_STAGE) * 2;

// Loads the K-slice [k0, k0 + BK) of the A and B tiles into one stage. `vec` (host-checked):
// every 16-byte chunk of 8 elements along the contiguous axis is wholly inside or outside the
// operand (Cin % 8 == 0 channels-last, V % 8 == 0 channels-first; 8*Cout always) and the bases
// are 16-byte aligned: cp.async, zero-filled outside. Otherwise element-wise guarded loads.
template <class T, bool CL>
__device__ __forceinline__ void load_tiles(T* sA, T* sB, const T* x, const T* wt, long long nvox, int cin, int n8, long long m0,
                                           int n0, int k0, int vec) {
    const int tid = threadIdx.x;
    if (vec) {
        if (CL) {
            const int m = tid >> 2, kc = (tid & 3) * 8;  // 64 rows x 4 chunks
            const bool ok = m0 + m < nvox && k0 + kc < cin;
            const T* src = ok ? x + (m0 + m) * cin + k0 + kc : x;
            ptx::cp_async_16_zfill(sA + m * LDA_CL + kc, src, ok);
        } else {
            const int k = tid >> 3, mc = (tid & 7) * 8;  // 32 rows x 8 chunks
            const bool ok = k0 + k < cin && m0 + mc < nvox;
            const T* src = ok ? x + static_cast<long long>(k0 + k) * nvox + m0 + mc : x;
            ptx::cp_async_16_zfill(sA + k * LDA_CF + mc, src, ok);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int id = tid + r * THREADS;
            const int k = id >> 4, nc = (id & 15) * 8;  // 32 rows x 16 chunks
            const bool ok = k0 + k < cin && n0 + nc < n8;
            const T* src = ok ? wt + static_cast<long long>(k0 + k) * n8 + n0 + nc : wt;
            ptx::cp_async_16_zfill(sB + k * LDB + nc, src, ok);
        }
    } else {
        const T zero = from_float<T>(0.f);
        for (int e = tid; e < BM * BK; e += THREADS) {
            if (CL) {
                const int m = e / BK, k = e % BK;  // consecutive threads along Cin
                const bool ok = m0 + m < nvox && k0 + k < cin;
                sA[m * LDA_CL + k] = ok ? x[(m0 + m) * cin + k0 + k] : zero;
            } else {
                const int k = e / BM, m = e % BM;  // consecutive threads along V
                const bool ok = k0 + k < cin && m0 + m < nvox;
                sA[k * LDA_CF + m] = ok ? x[static_cast<long long>(k0 + k) * nvox + m0 + m] : zero;
            }
        }
        for (int e = tid; e < BK * BN; e += THREADS) {
            const int k = e / BN, n = e % BN;
            const bool ok = k0 + k < cin && n0 + n < n8;
            sB[k * LDB + n] = ok ? wt[static_cast<long long>(k0 + k) * n8 + n0 + n] : zero;
        }
    }
}

template <class T>
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    ptx::mma_m16n8k16_bf16(d, a, b, d);
}
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    ptx::mma_m16n8k16_f16(d, a, b, d);
}

// Grid (ceil(V/BM), ceil(8*Cout/BN), batch), block THREADS, MMA_SMEM_BYTES of dynamic shared
// memory. x and out point at sample 0 of the launch (the launch code splits batches > 65535).
template <class T, bool CL>
__device__ void mma_kernel(const T* x, T* out, const T* wt, const T* bias, int cin, int cout, int d, int h, int w, int act,
                           int vec) {
    EMU_DYN_SHARED(T, smem);
    // Stage s: A at smem + s*A_STAGE, B at smem + 2*A_STAGE + s*B_STAGE (computed, not indexed
    // from an array, which would put the pointers on the stack).
    T* const sA0 = smem;
    T* const sB0 = smem + 2 * A_STAGE;
    const long long nvox = static_cast<long long>(d) * h * w;
    const int n8 = cout * 8;
    const int b = blockIdx.z;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const int n0 = blockIdx.y * BN;
    const T* xb = x + static_cast<long long>(b) * nvox * cin;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;  // the warp's 32 x 32 sub-tile

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

    const int nk = (cin + BK - 1) / BK;
    if (nk > 0) {
        load_tiles<T, CL>(sA0, sB0, xb, wt, nvox, cin, n8, m0, n0, 0, vec);
        ptx::cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
        const int s = kt & 1;
        if (kt + 1 < nk) {
            // The other stage was last read in iteration kt - 1, which ended with a barrier.
            load_tiles<T, CL>(sA0 + (s ^ 1) * A_STAGE, sB0 + (s ^ 1) * B_STAGE, xb, wt, nvox, cin, n8, m0, n0, (kt + 1) * BK, vec);
            ptx::cp_async_commit();
            ptx::cp_async_wait<1>();
        } else {
            ptx::cp_async_wait<0>();
        }
        __syncthreads();
        const T* A = sA0 + s * A_STAGE;
        const T* B = sB0 + s * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const int r0 = wm + mt * 16;
                if (CL) {
                    // Lane l: row (l % 16), column 8 * (l / 16) of the 16 x 16 tile.
                    ptx::ldmatrix_x4(af[mt], A + (r0 + (lane & 15)) * LDA_CL + kk + 8 * (lane >> 4));
                } else {
                    // Matrix j = l / 8 covers voxels r0 + 8*(j & 1) .. +8 and channels
                    // kk + 8*(j >> 1) .. +8, stored channel-major: lane l points at channel row
                    // l % 8 of it; .trans turns it into the A fragment.
                    const int j = lane >> 3, r = lane & 7;
                    ptx::ldmatrix_x4_trans(af[mt], A + (kk + 8 * (j >> 1) + r) * LDA_CF + r0 + 8 * (j & 1));
                }
            }
            unsigned bf[4][2];
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                // Matrix j: channels kk + 8*(j & 1) .. +8, columns wn + 16*np + 8*(j >> 1) .. +8;
                // registers 0, 1 are the B fragment of n-tile 2*np, registers 2, 3 of 2*np + 1.
                const int j = lane >> 3, r = lane & 7;
                unsigned q[4];
                ptx::ldmatrix_x4_trans(q, B + (kk + 8 * (j & 1) + r) * LDB + wn + 16 * np + 8 * (j >> 1));
                bf[2 * np][0] = q[0];
                bf[2 * np][1] = q[1];
                bf[2 * np + 1][0] = q[2];
                bf[2 * np + 1][1] = q[3];
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma<T>(acc[mt][nt], af[mt], bf[nt]);
        }
        __syncthreads();
    }

    // Accumulator (mt, nt): c[0], c[1] at row g, columns 2t, 2t+1; c[2], c[3] at row g + 8.
    const OutGeom geo = out_geom(d, h, w);
    T* ob = out + static_cast<long long>(b) * cout * geo.vol;
    const int g = lane >> 2, t = lane & 3;
    long long coff[4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) coff[nt] = col_off(geo, n0 + wn + nt * 8 + 2 * t);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const long long v = m0 + wm + mt * 16 + g + 8 * half;
            if (v >= nvox) continue;
            T* ov = ob + vox_off(geo, static_cast<int>(v));
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int j = n0 + wn + nt * 8 + 2 * t;
                if (j >= n8) continue;  // n8 is even, so j + 1 < n8 too
                store_pair(ov + coff[nt], bias, act, j, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// SIMT f32 kernel.
// ------------------------------------------------------------------------------------------------
constexpr int FM = 64, FN = 64, FK = 16, FTHREADS = 256;
constexpr int FLDA = FM + 1;  // A tile [FK][FM + 1]: the transposing stores of the channels-last
                              // load hit distinct banks

// Grid (ceil(V/FM), ceil(8*Cout/FN), batch), block FTHREADS. Thread (tm = tid % 16, tn = tid / 16)
// computes rows tm + 16*i and columns 4*tn + q (i, q < 4): a warp's 16 row threads are 16
// consecutive voxels, so the scattered stores stay contiguous along w.
template <bool CL>
__device__ void f32_kernel(const float* x, float* out, const float* wt, const float* bias, int cin, int cout, int d, int h, int w,
                           int act) {
    __shared__ float sA[FK][FLDA];
    __shared__ __align__(16) float sB[FK][FN];
    const long long nvox = static_cast<long long>(d) * h * w;
    const int n8 = cout * 8;
    const int b = blockIdx.z;
    const long long m0 = static_cast<long long>(blockIdx.x) * FM;
    const int n0 = blockIdx.y * FN;
    const float* xb = x + static_cast<long long>(b) * nvox * cin;
    const int tid = threadIdx.x, tm = tid & 15, tn = tid >> 4;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][q] = 0.f;

    for (int k0 = 0; k0 < cin; k0 += FK) {
#pragma unroll
        for (int r = 0; r < FM * FK / FTHREADS; ++r) {
            const int e = tid + r * FTHREADS;
            if (CL) {
                const int m = e / FK, k = e % FK;  // coalesced along Cin
                const bool ok = m0 + m < nvox && k0 + k < cin;
                sA[k][m] = ok ? xb[(m0 + m) * cin + k0 + k] : 0.f;
            } else {
                const int k = e / FM, m = e % FM;  // coalesced along V
                const bool ok = k0 + k < cin && m0 + m < nvox;
                sA[k][m] = ok ? xb[static_cast<long long>(k0 + k) * nvox + m0 + m] : 0.f;
            }
            const int k = e / FN, n = e % FN;
            const bool ok = k0 + k < cin && n0 + n < n8;
            sB[k][n] = ok ? wt[static_cast<long long>(k0 + k) * n8 + n0 + n] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < FK; ++k) {
            float a[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = sA[k][tm + 16 * i];
            const float4 bv = *reinterpret_cast<const float4*>(&sB[k][4 * tn]);
            const float bq[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[i][q] += a[i] * bq[q];
        }
        __syncthreads();
    }
    const OutGeom geo = out_geom(d, h, w);
    float* ob = out + static_cast<long long>(b) * cout * geo.vol;
    const long long coff[2] = {col_off(geo, n0 + 4 * tn), col_off(geo, n0 + 4 * tn + 2)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long v = m0 + tm + 16 * i;
        if (v >= nvox) continue;
        float* ov = ob + vox_off(geo, static_cast<int>(v));
#pragma unroll
        for (int q = 0; q < 4; q += 2) {
            const int j = n0 + 4 * tn + q;  // even; n8 is even, so j + 1 < n8 when j < n8
            if (j < n8) store_pair(ov + coff[q / 2], bias, act, j, acc[i][q], acc[i][q + 1]);
        }
    }
}
}  // namespace conv_transpose

// ---- extern "C" entry points (parameter lists documented in src/backend/kernel/conv.rs) ----
// Each `EMU_KERNEL(name);` is on its own line: build.rs reads the kernel names from those lines.

extern "C" __global__ void __launch_bounds__(256) sv_conv_transpose3d_k2s2_f32(const float* x, float* out, const float* wt, const float* bias, int cin,
                                                        int cout, int d, int h, int w, int channels_last, int act, int vec) {
    (void)vec;
    if (channels_last) {
        conv_transpose::f32_kernel<true>(x, out, wt, bias, cin, cout, d, h, w, act);
    } else {
        conv_transpose::f32_kernel<false>(x, out, wt, bias, cin, cout, d, h, w, act);
    }
}
EMU_KERNEL(sv_conv_transpose3d_k2s2_f32);

#define SV_CONV_T_MMA(SUF, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) sv_conv_transpose3d_k2s2_##SUF(const T* x, T* out, const T* wt, const T* bias, int cin, \
                                                              int cout, int d, int h, int w, int channels_last,        \
                                                              int act, int vec) {                                      \
        if (channels_last) {                                                                                           \
            conv_transpose::mma_kernel<T, true>(x, out, wt, bias, cin, cout, d, h, w, act, vec);                       \
        } else {                                                                                                       \
            conv_transpose::mma_kernel<T, false>(x, out, wt, bias, cin, cout, d, h, w, act, vec);                      \
        }                                                                                                              \
    }

SV_CONV_T_MMA(f16, __half)
EMU_KERNEL(sv_conv_transpose3d_k2s2_f16);
SV_CONV_T_MMA(bf16, __nv_bfloat16)
EMU_KERNEL(sv_conv_transpose3d_k2s2_bf16);
