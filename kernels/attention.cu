// Fused multi-head attention (DESIGN.md op `attention`; `AttentionArgs` in src/backend/mod.rs;
// spec §1.3 ViT self-attention, §3 CLIP causal self-attention, §4.2 two-way transformer self and
// cross attention):
//   out[b][i][h*D + e] = Σ_j softmax_j(scale * q[b,i,h,:]·k[b,j,h,:]) v[b,j,h,e],  j <= i if causal,
// flash-attention style: online softmax (running max and sum in f32), f32 accumulation, no
// score matrix in memory. Element (b, i, h, e) of q is at q + b*q_batch + i*q_row + h*D + e
// (likewise k, v, out), so q, k and v may be column views of one packed QKV buffer.
//
// Kernels (launch code and the parameter list: src/backend/kernel/attention.rs):
//   sv_attention_d{16,32,48,64,96,128}_{bf16,f16}: tensor cores. One warp per 16 query rows, a
//     block of 4 warps (64 rows); K/V tiles of 64 keys in shared memory, double-buffered with
//     cp.async; S = Q·Kᵀ and O += P·V with mma.sync.m16n8k16 (ldmatrix fragments, f32
//     accumulators). The template head dim HDP is the padded head dim: head_dim == HDP with
//     16-byte aligned rows (`vec`) is the fast path (cp.async 16-byte copies, 32-bit stores);
//     anything else up to 128 (tiny-model dims 6, 12, 24, odd strides) is the general path:
//     element loads, zero padding to HDP, element stores.
//     Precision: P is rounded to the storage type before P·V (bf16: 8-bit significand, relative
//     error <= 2^-8 per weight; f16: <= 2^-11), and the row sum is taken over the rounded
//     weights, so the output is a convex combination of v rows with normalised weights within
//     ~2^-7 (bf16) / 2^-10 (f16) relative of the exact softmax, accumulated in f32; scores, max,
//     sum and O are f32. The output is then rounded to the storage type (another 2^-8 in bf16),
//     which dominates the measured error (docs/kernels.md).
//   sv_attention_f32: SIMT, f32 FMA (fmaf) throughout; a block of 4 warps owns 32 query rows (8
//     per warp), tiles of 32 keys (one key per lane for the scores, one output column per lane
//     for P·V). Head dims 1..128.
// The softmax is exp2f with the scale folded in: the launch passes scale * log2(e), scores are
// multiplied by it and p = exp2f(s - m). Masked keys (causal, or the tail of the last tile) score
// -inf and give p = 0; a row whose running max is still -inf uses 0 as its reference, so no
// -inf - -inf = NaN appears (rows with no valid key yet, padding rows).
#include "cuda_compat.cuh"
#include "common.cuh"
#include "ptx.cuh"

namespace attention {

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int BM = 16 * WARPS;  // query rows per block (tensor-core kernels)
constexpr int BN = 64;          // keys per tile (tensor-core kernels)

// Shared-memory row pitch in elements: HDP + 8 (16 bytes), so the 8 rows of every ldmatrix
// 8x8 matrix start in 8 different 16-byte bank groups (conflict-free for every HDP here).
template <int HDP>
struct Tc {
    static constexpr int PITCH = HDP + 8;
    static constexpr int TILE = BN * PITCH;  // elements of one K or V tile
    static constexpr int Q_ELEMS = BM * PITCH;
    // Q, then K[2], then V[2] (= tc_shared_bytes in the launch code).
    static constexpr int SMEM_BYTES = (Q_ELEMS + 4 * TILE) * 2;
};

// N mma.sync.m16n8k16 sharing the A fragment, d[n] += A * B[n] (one emulator warp exchange).
template <class T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
    template <int N>
    static __device__ __forceinline__ void run(float (&d)[N][4], const unsigned (&a)[4], const unsigned (&b)[N][2]) {
        ptx::mma_m16n8k16_bf16_xn<N>(d, a, b);
    }
};
template <>
struct Mma<__half> {
    template <int N>
    static __device__ __forceinline__ void run(float (&d)[N][4], const unsigned (&a)[4], const unsigned (&b)[N][2]) {
        ptx::mma_m16n8k16_f16_xn<N>(d, a, b);
    }
};

// Round to the storage type and back (the value the tensor core will see).
template <class T>
__device__ __forceinline__ float round_to(float x) {
    return to_float(from_float<T>(x));
}
// Two values already representable in T, packed as one 32-bit fragment register (lo first).
template <class T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    return ptx::pack_bf16x2(lo, hi);
}
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    return ptx::pack_half2(lo, hi);
}

// Loads rows [r0, r0 + ROWS) of a (n x head_dim) head slice `src` (row stride `ld`) into a shared
// tile of ROWS x PITCH; rows >= n and columns >= head_dim are zero (zero K columns add nothing to
// the scores, zero V rows nothing to P·V, and a NaN from unwritten shared memory cannot leak
// through a zero weight). VEC: cp.async 16-byte copies (head_dim == HDP, 16-byte aligned rows);
// else element loads. All threads of the block call it.
template <class T, int HDP, int ROWS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, long long ld, int r0, int n, int head_dim, bool vec) {
    constexpr int PITCH = Tc<HDP>::PITCH;
    if (vec) {
        constexpr int CH = HDP / 8;  // 16-byte chunks per row
        for (int c = threadIdx.x; c < ROWS * CH; c += THREADS) {
            const int r = c / CH, col = (c % CH) * 8;
            const bool ok = r0 + r < n;
            // A zero-filled chunk reads nothing; pass a valid address anyway.
            const T* s = ok ? src + static_cast<long long>(r0 + r) * ld + col : src;
            ptx::cp_async_16_zfill(dst + r * PITCH + col, s, ok);
        }
    } else {
        for (int c = threadIdx.x; c < ROWS * HDP; c += THREADS) {
            const int r = c / HDP, col = c % HDP;
            T x = from_float<T>(0.f);
            if (r0 + r < n && col < head_dim) x = src[static_cast<long long>(r0 + r) * ld + col];
            dst[r * PITCH + col] = x;
        }
    }
}

// The tensor-core kernel body. Grid (ceil(nq / 64), heads, batch), block 128, dynamic shared
// memory Tc<HDP>::SMEM_BYTES.
template <class T, int HDP>
__device__ __forceinline__ void flash_tc(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                                         int nq, int nk, int head_dim, long long q_row, long long q_batch, long long k_row,
                                         long long k_batch, long long v_row, long long v_batch, long long o_row, long long o_batch,
                                         float scale_log2, int causal, int vec_i) {
    static_assert(HDP % 16 == 0 && HDP <= 128, "HDP: a multiple of 16 up to 128");
    constexpr int PITCH = Tc<HDP>::PITCH;
    constexpr int KD = HDP / 16;  // k-steps of Q·Kᵀ, and 16-column pairs of O
    constexpr int NS = BN / 8;    // 8-key column blocks of S
    constexpr int SG = NS / 4;    // ... in groups of 4 (one A fragment, 4 B fragments)
    constexpr int NO = (2 * KD) % 4 == 0 ? 4 : 2;  // 8-column blocks of O per group
    constexpr int OG = 2 * KD / NO;                // groups of O
    EMU_DYN_SHARED(T, smem);
    T* sQ = smem;
    T* sK = smem + Tc<HDP>::Q_ELEMS;  // two tiles
    T* sV = sK + 2 * Tc<HDP>::TILE;   // two tiles

    const bool vec = vec_i != 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int q0 = blockIdx.x * BM;
    const long long col = static_cast<long long>(blockIdx.y) * head_dim;
    const T* qh = q + blockIdx.z * q_batch + col;
    const T* kh = k + blockIdx.z * k_batch + col;
    const T* vh = v + blockIdx.z * v_batch + col;

    // Causal: the block's last row q0 + BM - 1 sees keys up to itself.
    const int kend = causal ? min(nk, q0 + BM) : nk;
    const int ntiles = (kend + BN - 1) / BN;
    const int wrow0 = q0 + 16 * warp;  // the warp's first row
    const int row0 = wrow0 + g, row1 = row0 + 8;

    load_tile<T, HDP, BM>(sQ, qh, q_row, q0, nq, head_dim, vec);
    load_tile<T, HDP, BN>(sK, kh, k_row, 0, nk, head_dim, vec);
    load_tile<T, HDP, BN>(sV, vh, v_row, 0, nk, head_dim, vec);
    ptx::cp_async_commit();

    unsigned qf[KD][4];
    // O: 8-column block i = NO * og + n is o[og][n]; lane holds rows g (elements 0, 1) and g + 8 (2, 3),
    // columns 8i + 2t4 + {0, 1}.
    float o[OG][NO][4];
#pragma unroll
    for (int og = 0; og < OG; ++og)
#pragma unroll
        for (int n = 0; n < NO; ++n) o[og][n][0] = o[og][n][1] = o[og][n][2] = o[og][n][3] = 0.f;
    // Running max (in log2 units) and this lane's partial row sums of rows g and g + 8.
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    for (int tile = 0; tile < ntiles; ++tile) {
        const int buf = tile & 1;
        if (tile + 1 < ntiles) {
            // Prefetch the next tile into the other buffer (last read in the previous iteration,
            // which ended with a barrier).
            const int nb = (tile + 1) & 1;
            load_tile<T, HDP, BN>(sK + nb * Tc<HDP>::TILE, kh, k_row, (tile + 1) * BN, nk, head_dim, vec);
            load_tile<T, HDP, BN>(sV + nb * Tc<HDP>::TILE, vh, v_row, (tile + 1) * BN, nk, head_dim, vec);
        }
        ptx::cp_async_commit();  // possibly empty: keeps "all but the newest group" = this tile
        ptx::cp_async_wait<1>();
        __syncthreads();

        if (tile == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) ptx::ldmatrix_x4(qf[kk], sQ + (16 * warp + (lane & 15)) * PITCH + kk * 16 + 8 * (lane >> 4));
        }

        const int kbase = tile * BN;
        // Warp-uniform: skip tiles this warp cannot see (causal, above its last row) and warps
        // whose rows are all padding. Every lane still reaches the block barriers.
        const bool active = wrow0 < nq && !(causal && kbase > wrow0 + 15);
        if (active) {
            const T* tK = sK + buf * Tc<HDP>::TILE;
            const T* tV = sV + buf * Tc<HDP>::TILE;
            // ---- S = Q·Kᵀ: 16 rows x 64 keys per warp. Key block j = 4 sg + n is s[sg][n]; lane
            // holds S[g][8j + 2t4 + {0,1}] (elements 0, 1) and row g + 8 (elements 2, 3).
            float s[SG][4][4];
#pragma unroll
            for (int sg = 0; sg < SG; ++sg)
#pragma unroll
                for (int n = 0; n < 4; ++n) s[sg][n][0] = s[sg][n][1] = s[sg][n][2] = s[sg][n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
                for (int sg = 0; sg < SG; ++sg) {
                    // Two x4 loads, each keys 16 u + [0,8) / [8,16) (lanes 16-31) x columns +0 / +8
                    // (lanes 8-15, 24-31): the B fragments of 4 key blocks.
                    unsigned b[4][2];
#pragma unroll
                    for (int u = 0; u < 2; ++u) {
                        unsigned r[4];
                        ptx::ldmatrix_x4(r, tK + (32 * sg + 16 * u + (lane & 7) + 8 * (lane >> 4)) * PITCH + kk * 16 + 8 * ((lane >> 3) & 1));
                        b[2 * u][0] = r[0];
                        b[2 * u][1] = r[1];
                        b[2 * u + 1][0] = r[2];
                        b[2 * u + 1][1] = r[3];
                    }
                    Mma<T>::template run<4>(s[sg], qf[kk], b);
                }
            }
            // ---- online softmax.
            const bool need_mask = kbase + BN > nk || (causal && kbase + BN - 1 > wrow0);
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < NS; ++j) {
                float(&sj)[4] = s[j >> 2][j & 3];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = sj[e] * scale_log2;
                    if (need_mask) {
                        const int key = kbase + 8 * j + 2 * t4 + (e & 1);
                        const int row = e < 2 ? row0 : row1;
                        if (key >= nk || (causal && key > row)) x = -INFINITY;
                    }
                    sj[e] = x;
                }
                mx0 = fmaxf(mx0, fmaxf(sj[0], sj[1]));
                mx1 = fmaxf(mx1, fmaxf(sj[2], sj[3]));
            }
            // The 4 lanes of a quad hold one row.
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            const float r0 = n0 == -INFINITY ? 0.f : n0, r1 = n1 == -INFINITY ? 0.f : n1;
            const float c0 = exp2f(m0 - r0), c1 = exp2f(m1 - r1);  // 0 while m was -inf
            m0 = n0;
            m1 = n1;
            l0 *= c0;
            l1 *= c1;
#pragma unroll
            for (int og = 0; og < OG; ++og) {
#pragma unroll
                for (int n = 0; n < NO; ++n) {
                    o[og][n][0] *= c0;
                    o[og][n][1] *= c0;
                    o[og][n][2] *= c1;
                    o[og][n][3] *= c1;
                }
            }
            // P, rounded to T (what P·V multiplies), as A fragments: the C layout of two adjacent
            // 8-key blocks is the A layout of one 16-key step.
            unsigned pa[NS / 2][4];
#pragma unroll
            for (int j = 0; j < NS; ++j) {
                const float(&sj)[4] = s[j >> 2][j & 3];
                const float p0 = round_to<T>(exp2f(sj[0] - r0)), p1 = round_to<T>(exp2f(sj[1] - r0));
                const float p2 = round_to<T>(exp2f(sj[2] - r1)), p3 = round_to<T>(exp2f(sj[3] - r1));
                l0 += p0 + p1;
                l1 += p2 + p3;
                pa[j >> 1][(j & 1) * 2] = pack2<T>(p0, p1);
                pa[j >> 1][(j & 1) * 2 + 1] = pack2<T>(p2, p3);
            }
            // ---- O += P·V: 16 rows x HDP per warp.
#pragma unroll
            for (int kc = 0; kc < NS / 2; ++kc) {
#pragma unroll
                for (int og = 0; og < OG; ++og) {
                    // x4 .trans: keys 16 kc + [0,8) / [8,16) (lanes 8-15, 24-31) x columns +0 / +8
                    // (lanes 16-31): the B fragments of 2 column blocks per load.
                    unsigned b[NO][2];
#pragma unroll
                    for (int u = 0; u < NO / 2; ++u) {
                        unsigned r[4];
                        ptx::ldmatrix_x4_trans(r, tV + (16 * kc + (lane & 7) + 8 * ((lane >> 3) & 1)) * PITCH + (og * NO + 2 * u) * 8 + 8 * (lane >> 4));
                        b[2 * u][0] = r[0];
                        b[2 * u][1] = r[1];
                        b[2 * u + 1][0] = r[2];
                        b[2 * u + 1][1] = r[3];
                    }
                    Mma<T>::template run<NO>(o[og], pa[kc], b);
                }
            }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this tile's buffer
    }

    // ---- normalise and store. Row sums: add the quad's partial sums.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* oh = out + blockIdx.z * o_batch + col;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = half ? row1 : row0;
        if (row >= nq) continue;
        const float inv = half ? inv1 : inv0;
        T* orow = oh + static_cast<long long>(row) * o_row;
#pragma unroll
        for (int i = 0; i < 2 * KD; ++i) {
            const int c = 8 * i + 2 * t4;
            const float x0 = o[i / NO][i % NO][2 * half] * inv, x1 = o[i / NO][i % NO][2 * half + 1] * inv;
            if (vec) {
                // head_dim == HDP and 16-byte aligned rows: c, c + 1 are in range, 4-byte aligned.
                *reinterpret_cast<unsigned*>(orow + c) = pack2<T>(round_to<T>(x0), round_to<T>(x1));
            } else {
                if (c < head_dim) orow[c] = from_float<T>(x0);
                if (c + 1 < head_dim) orow[c + 1] = from_float<T>(x1);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f32 SIMT kernel. Grid (ceil(nq / 32), heads, batch), block 128, dynamic shared memory
// f32_smem_floats(head_dim) * 4 bytes: Q (32 x D), K (32 x (D+1): the +1 makes lane j's reads of
// K[j][e] conflict-free), V (32 x D), P (4 warps x 8 rows x 32 keys).
constexpr int F_BM = 32;  // query rows per block, 8 per warp
constexpr int F_BN = 32;  // keys per tile, one per lane
constexpr int F_RW = F_BM / WARPS;

__device__ __forceinline__ void load_f32(float* dst, int pitch, const float* src, long long ld, int r0, int n, int head_dim, bool vec) {
    if (vec) {
        const int ch = head_dim / 4;  // float4 per row
        for (int c = threadIdx.x; c < F_BN * ch; c += THREADS) {
            const int r = c / ch, e = (c % ch) * 4;
            float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
            if (r0 + r < n) x = *reinterpret_cast<const float4*>(src + static_cast<long long>(r0 + r) * ld + e);
            float* d = dst + r * pitch + e;
            d[0] = x.x;
            d[1] = x.y;
            d[2] = x.z;
            d[3] = x.w;
        }
    } else {
        for (int c = threadIdx.x; c < F_BN * head_dim; c += THREADS) {
            const int r = c / head_dim, e = c % head_dim;
            dst[r * pitch + e] = r0 + r < n ? src[static_cast<long long>(r0 + r) * ld + e] : 0.f;
        }
    }
}

__device__ __forceinline__ void flash_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                          float* __restrict__ out, int nq, int nk, int head_dim, long long q_row, long long q_batch,
                                          long long k_row, long long k_batch, long long v_row, long long v_batch, long long o_row,
                                          long long o_batch, float scale_log2, int causal, int vec_i) {
    static_assert(F_BM == F_BN, "load_f32 loads F_BN rows for Q as well");
    EMU_DYN_SHARED(float, smem);
    const int D = head_dim;
    float* sQ = smem;
    float* sK = sQ + F_BM * D;
    float* sV = sK + F_BN * (D + 1);
    float* sP = sV + F_BN * D;
    const bool vec = vec_i != 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * F_BM;
    const long long col = static_cast<long long>(blockIdx.y) * D;
    const float* kh = k + blockIdx.z * k_batch + col;
    const float* vh = v + blockIdx.z * v_batch + col;
    const int kend = causal ? min(nk, q0 + F_BM) : nk;
    const int wrow0 = q0 + F_RW * warp;
    float* wP = sP + warp * F_RW * F_BN;

    load_f32(sQ, D, q + blockIdx.z * q_batch + col, q_row, q0, nq, D, vec);

    float o[F_RW][4];
    float m[F_RW], l[F_RW];
#pragma unroll
    for (int i = 0; i < F_RW; ++i) {
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
        m[i] = -INFINITY;
        l[i] = 0.f;
    }
    for (int kbase = 0; kbase < kend; kbase += F_BN) {
        load_f32(sK, D + 1, kh, k_row, kbase, nk, D, vec);
        load_f32(sV, D, vh, v_row, kbase, nk, D, vec);
        __syncthreads();
        if (wrow0 < nq && !(causal && kbase > wrow0 + F_RW - 1)) {
            const int key = kbase + lane;
            float s[F_RW];
#pragma unroll
            for (int i = 0; i < F_RW; ++i) s[i] = 0.f;
            const float* kr = sK + lane * (D + 1);
            for (int e = 0; e < D; ++e) {
                const float ke = kr[e];
#pragma unroll
                for (int i = 0; i < F_RW; ++i) s[i] = fmaf(sQ[(F_RW * warp + i) * D + e], ke, s[i]);
            }
#pragma unroll
            for (int i = 0; i < F_RW; ++i) {
                float x = s[i] * scale_log2;
                if (key >= nk || (causal && key > wrow0 + i)) x = -INFINITY;
                const float nm = fmaxf(m[i], warp_reduce_max(x));
                const float ref = nm == -INFINITY ? 0.f : nm;
                const float c = exp2f(m[i] - ref);
                m[i] = nm;
                const float p = exp2f(x - ref);
                l[i] = fmaf(l[i], c, p);  // this lane's partial sum over its keys
                wP[i * F_BN + lane] = p;
#pragma unroll
                for (int cc = 0; cc < 4; ++cc) o[i][cc] *= c;
            }
            __syncwarp();
#pragma unroll
            for (int cc = 0; cc < 4; ++cc) {
                const int e = lane + 32 * cc;
                if (e < D) {
                    for (int j = 0; j < F_BN; ++j) {
                        const float ve = sV[j * D + e];
#pragma unroll
                        for (int i = 0; i < F_RW; ++i) o[i][cc] = fmaf(wP[i * F_BN + j], ve, o[i][cc]);
                    }
                }
            }
        }
        __syncthreads();  // the next tile overwrites sK, sV, sP
    }
    float* oh = out + blockIdx.z * o_batch + col;
#pragma unroll
    for (int i = 0; i < F_RW; ++i) {
        const float sum = warp_reduce_sum(l[i]);
        const int row = wrow0 + i;
        if (row >= nq) continue;
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
            const int e = lane + 32 * cc;
            if (e < D) oh[static_cast<long long>(row) * o_row + e] = o[i][cc] * inv;
        }
    }
}

}  // namespace attention

// The common parameter list of every attention kernel (KernelArgs order in the launch code):
//   (q, k, v, out, int nq, int nk, int head_dim, long long q_row, long long q_batch,
//    long long k_row, long long k_batch, long long v_row, long long v_batch, long long o_row,
//    long long o_batch, float scale_log2, int causal, int vec)
#define SV_ATTENTION_PARAMS(T)                                                                                                       \
    const T *q, const T *k, const T *v, T *out, int nq, int nk, int head_dim, long long q_row, long long q_batch, long long k_row, \
        long long k_batch, long long v_row, long long v_batch, long long o_row, long long o_batch, float scale_log2, int causal, int vec
#define SV_ATTENTION_ARGS \
    q, k, v, out, nq, nk, head_dim, q_row, q_batch, k_row, k_batch, v_row, v_batch, o_row, o_batch, scale_log2, causal, vec

// Blocks per SM the register allocator must allow: 4 up to head dim 48 (<= 128 registers), 3 at
// 64 (<= 168: at 128 ptxas spills), 2 above (the O accumulator alone is HDP / 2 registers).
#define SV_ATTENTION_TC(HDP, T, SUF)                                                                                           \
    extern "C" __global__ void __launch_bounds__(attention::THREADS, (HDP) <= 48 ? 4 : (HDP) <= 64 ? 3 : 2) sv_attention_d##HDP##_##SUF(SV_ATTENTION_PARAMS(T)) { \
        attention::flash_tc<T, HDP>(SV_ATTENTION_ARGS);                                                                        \
    }

SV_ATTENTION_TC(16, __nv_bfloat16, bf16)
EMU_KERNEL(sv_attention_d16_bf16);
SV_ATTENTION_TC(32, __nv_bfloat16, bf16)
EMU_KERNEL(sv_attention_d32_bf16);
SV_ATTENTION_TC(48, __nv_bfloat16, bf16)
EMU_KERNEL(sv_attention_d48_bf16);
SV_ATTENTION_TC(64, __nv_bfloat16, bf16)
EMU_KERNEL(sv_attention_d64_bf16);
SV_ATTENTION_TC(96, __nv_bfloat16, bf16)
EMU_KERNEL(sv_attention_d96_bf16);
SV_ATTENTION_TC(128, __nv_bfloat16, bf16)
EMU_KERNEL(sv_attention_d128_bf16);
SV_ATTENTION_TC(16, __half, f16)
EMU_KERNEL(sv_attention_d16_f16);
SV_ATTENTION_TC(32, __half, f16)
EMU_KERNEL(sv_attention_d32_f16);
SV_ATTENTION_TC(48, __half, f16)
EMU_KERNEL(sv_attention_d48_f16);
SV_ATTENTION_TC(64, __half, f16)
EMU_KERNEL(sv_attention_d64_f16);
SV_ATTENTION_TC(96, __half, f16)
EMU_KERNEL(sv_attention_d96_f16);
SV_ATTENTION_TC(128, __half, f16)
EMU_KERNEL(sv_attention_d128_f16);

extern "C" __global__ void __launch_bounds__(attention::THREADS) sv_attention_f32(SV_ATTENTION_PARAMS(float)) {
    attention::flash_f32(SV_ATTENTION_ARGS);
}
EMU_KERNEL(sv_attention_f32);

#undef SV_ATTENTION_TC
#undef SV_ATTENTION_ARGS
#undef SV_ATTENTION_PARAMS
