// Volume kernels of the pipeline (spec §6.2–§6.9): the foreground statistics of the intensity
// normalisation, clip + z-score, the min-max step, the foreground bounding box, box copies
// (crop, window extraction with zero padding, back-fill), the sliding-window accumulator, fill
// and the final threshold. Launch code and the exact contract: src/backend/kernel/volume.rs and
// src/backend/mod.rs ("Volume ops"); the CPU reference: src/backend/cpu/volume.rs.
//
// Design (volumes up to 512 x 512 x 1000 = 262 M voxels):
// - 64-bit indices everywhere, grid-stride loops over a grid sized by the host (enough blocks to
//   fill 132 SMs, capped so a block does real work);
// - flat ops read and write float4 (16-byte) vectors when every pointer is 16-byte aligned
//   (`vec`), then finish the last n % 4 values with scalar accesses;
// - box ops map one warp to one row of the box (lanes along W: coalesced), 8 rows per block;
// - reductions are deterministic: each thread accumulates its own values in a fixed order, a
//   block combines its threads in a fixed tree (shared memory, then warp 0), every block writes
//   one `Part` to scratch, and a one-block second stage combines the parts in a fixed order.
//   The only atomics are on integers (histogram counts, bounding-box min/max), whose result
//   does not depend on their order;
// - the foreground statistics reproduce numpy's float32 summation order exactly (see below), so
//   they equal the CPU reference bit for bit.
#include "cuda_compat.cuh"
#include "common.cuh"

namespace volume {

constexpr int BLOCK = 256;          // threads of every flat kernel and reduction block
constexpr int ROWS = BLOCK / 32;    // box kernels: one warp per row, 8 rows per block
constexpr unsigned FULL = 0xffffffffu;

// Part flags.
constexpr unsigned FLAG_NON_FINITE = 1u;  // a NaN or infinite value was seen
constexpr unsigned FLAG_FRACTION = 2u;    // a finite non-integer value was seen

// One block's partial result of a count or min/max reduction. 24 bytes; the layout is read by
// `Part::from_bytes` in src/backend/kernel/volume.rs.
struct __align__(8) Part {
    unsigned long long count;  // offset 0
    float mn;                  // offset 8
    float mx;                  // offset 12
    unsigned flags;            // offset 16
    unsigned pad;              // offset 20
};
static_assert(sizeof(Part) == 24, "Part layout is shared with the Rust launch code");

__device__ __forceinline__ Part part_identity() {
    Part p;
    p.count = 0ull;
    p.mn = INFINITY;
    p.mx = -INFINITY;
    p.flags = 0u;
    p.pad = 0u;
    return p;
}

__device__ __forceinline__ Part part_combine(Part a, const Part& b) {
    a.count += b.count;
    a.mn = fminf(a.mn, b.mn);
    a.mx = fmaxf(a.mx, b.mx);
    a.flags |= b.flags;
    return a;
}

__device__ __forceinline__ Part part_shfl_xor(const Part& p, int o) {
    Part q;
    q.count = __shfl_xor_sync(FULL, p.count, o);
    q.mn = __shfl_xor_sync(FULL, p.mn, o);
    q.mx = __shfl_xor_sync(FULL, p.mx, o);
    q.flags = __shfl_xor_sync(FULL, p.flags, o);
    q.pad = 0u;
    return q;
}

// Combines the Parts of a block of BLOCK threads in a fixed order and returns the result in
// thread 0 (other threads: unspecified). `sh` is BLOCK Parts of shared memory. Thread t's part
// goes to sh[t]; lane l of warp 0 folds sh[l], sh[l + 32], ... left to right, then a xor
// butterfly (symmetric, so every lane holds the same bits) combines the 32 lanes. One barrier
// for the whole block; only warp 0 shuffles (cheap on the emulator too).
__device__ __forceinline__ Part block_reduce_part(Part p, Part* sh) {
    const int t = threadIdx.x + threadIdx.y * blockDim.x;
    sh[t] = p;
    __syncthreads();
    Part r = part_identity();
    if (t < 32) {
        r = sh[t];
        for (int j = t + 32; j < BLOCK; j += 32) r = part_combine(r, sh[j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) r = part_combine(r, part_shfl_xor(r, o));
    }
    return r;
}

// Calls f(v) for every value of x[0, n) that this thread owns under the grid-stride split: the
// float4 groups i = tid, tid + stride, ... (when `vec`), then the scalar tail. The assignment,
// and so each thread's accumulation order, depends only on n and the grid.
template <class F>
__device__ __forceinline__ void for_each_value(const float* __restrict__ x, long long n, int vec, F&& f) {
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    long long head = 0;
    if (vec) {
        const long long n4 = n >> 2;
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (long long i = tid; i < n4; i += stride) {
            const float4 v = x4[i];
            f(v.x);
            f(v.y);
            f(v.z);
            f(v.w);
        }
        head = n4 << 2;
    }
    for (long long i = head + tid; i < n; i += stride) f(x[i]);
}

// Finite: the exponent is not all ones (inf and NaN are).
__device__ __forceinline__ bool finite_f32(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

}  // namespace volume

// ================================ foreground statistics ======================================
// numpy's float32 sums, reproduced bit for bit (spec §6.2; the CPU reference's `numpy_sum_f32`):
// np.add.reduce walks the (X, Y, Z) array in C order, i.e. the (D, H, W) volume column-major
// (d fastest, w slowest), in chunks of 8192 values (the ufunc buffer), sums each chunk with
// numpy's pairwise tree and adds the chunk sums left to right in f32. On the device:
//   1. sv_vol_transpose_cm_f32: the column-major walk as a linear buffer t (a tiled transpose),
//      plus min, max and flags of every voxel;
//   2. sv_vol_chunk_sums_f32 on t: one f32 pairwise sum per full chunk; the host adds them (and
//      the partial last chunk) in order: threshold = total / n;
//   3. sv_vol_seg_count_f32 + sv_vol_seg_offsets + sv_vol_compact_f32: F = {v in t : v > thr} in
//      walk order (a stable compaction), its count, min and max;
//   4. sv_vol_chunk_sums_f32 on F (sum), then on (F - m)^2 with numpy's f32 mean m (sum of the
//      squared deviations), added in order on the host;
//   5. sv_vol_hist_f32: the histogram of an integer-valued F for the exact percentiles.

namespace volume {
constexpr int CHUNK = 8192;          // numpy's ufunc buffer: values per pairwise chunk
constexpr int LEAF = 128;            // numpy's PW_BLOCKSIZE: a leaf of the pairwise tree
constexpr int LEAVES = CHUNK / LEAF; // 64 leaves: a perfect binary tree over them
constexpr int SEG = 8192;            // values per compaction segment (one block)
constexpr int SEG_PER_THREAD = SEG / BLOCK;  // 32 consecutive values per thread
constexpr int TD = 32, TW = 128;     // transpose tile: 32 d x 128 w

// Block-wide exclusive prefix sum of one unsigned per thread (1-D block of BLOCK threads); the
// block total goes to *total. `sh` holds NWARP + 1 unsigneds. Two barriers; integer, so exact.
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned v, unsigned* sh, unsigned* total) {
    constexpr int NWARP = BLOCK / 32;
    const int t = threadIdx.x, lane = t & 31, w = t >> 5;
    unsigned inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned u = __shfl_up_sync(FULL, inc, o);
        if (lane >= o) inc += u;
    }
    if (lane == 31) sh[w] = inc;
    __syncthreads();
    if (t == 0) {
        unsigned acc = 0;
        for (int i = 0; i < NWARP; ++i) {
            const unsigned c = sh[i];
            sh[i] = acc;
            acc += c;
        }
        sh[NWARP] = acc;
    }
    __syncthreads();
    *total = sh[NWARP];
    return sh[w] + inc - v;
}
// Calls f(v) for the values t[b, e) of one thread's run (e - b <= 32) in order: eight float4
// loads for a full run (t is 16-byte aligned and b a multiple of 32), scalars for the last one.
template <class F>
__device__ __forceinline__ void for_run(const float* __restrict__ t, long long b, long long e, F&& f) {
    if (e - b == SEG_PER_THREAD) {
        const float4* t4 = reinterpret_cast<const float4*>(t + b);
#pragma unroll
        for (int k = 0; k < SEG_PER_THREAD / 4; ++k) {
            const float4 v = t4[k];
            f(v.x);
            f(v.y);
            f(v.z);
            f(v.w);
        }
    } else {
        for (long long i = b; i < e; ++i) f(t[i]);
    }
}
}  // namespace volume

// 1. t[(w * H + h) * D + d] = x[(d * H + h) * W + w], through 32 x 128 (d x w) shared-memory tiles
// (reads coalesced along w, writes along d), and each block's min, max and flags (non-finite,
// non-integer) in parts[block]. Grid (blocks, grid-stride over H * ceil(D/32) * ceil(W/128)
// tiles), block (32, 8); dynamic shared memory 32 * 129 * 4 + 256 * 24 bytes.
extern "C" __global__ void sv_vol_transpose_cm_f32(const float* __restrict__ x, long long D, long long H, long long W,
                                                   float* __restrict__ t, volume::Part* parts) {
    using namespace volume;
    EMU_DYN_SHARED(unsigned char, smem);
    float* tile = reinterpret_cast<float*>(smem);  // [TD][TW + 1]
    Part* sh = reinterpret_cast<Part*>(smem + TD * (TW + 1) * sizeof(float));
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long nd = (D + TD - 1) / TD, nw = (W + TW - 1) / TW;
    const long long ntiles = H * nd * nw;
    Part p = part_identity();
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long h = k / (nd * nw), rem = k - h * nd * nw;
        const long long d0 = rem / nw * TD, w0 = (rem % nw) * TW;
        // Load: warp ty reads rows d0 + ty + 8i, lanes along w (4 passes of 32).
        for (int i = ty; i < TD; i += 8) {
            const long long d = d0 + i;
#pragma unroll
            for (int j = tx; j < TW; j += 32) {
                const long long w = w0 + j;
                if (d < D && w < W) {
                    const float v = x[(d * H + h) * W + w];
                    tile[i * (TW + 1) + j] = v;
                    p.mn = fminf(p.mn, v);
                    p.mx = fmaxf(p.mx, v);
                    const bool fin = finite_f32(v);
                    // A finite value is an integer when rounding leaves it unchanged.
                    p.flags |= fin ? 0u : FLAG_NON_FINITE;
                    p.flags |= (fin && rintf(v) != v) ? FLAG_FRACTION : 0u;
                }
            }
        }
        __syncthreads();
        // Store: warp ty writes columns w0 + ty + 8i, lanes along d.
        for (int j = ty; j < TW; j += 8) {
            const long long w = w0 + j, d = d0 + tx;
            if (w < W && d < D) t[(w * H + h) * D + d] = tile[tx * (TW + 1) + j];
        }
        __syncthreads();
    }
    const Part r = block_reduce_part(p, sh);
    if (tx == 0 && ty == 0) parts[blockIdx.x] = r;
}
EMU_KERNEL(sv_vol_transpose_cm_f32);

// 2./4. numpy's pairwise_sum of each full chunk c < nchunks of v (16-byte aligned): sums[c] =
// tree(v[8192c .. 8192c + 8192)), of the values themselves or (square) of __fmul_rn(v - m, v - m)
// (numpy squares the deviations into an f32 array first: never fused into the add). A chunk is
// 64 leaves of 128 values; a leaf is numpy's 8 running sums r[j] = a[j] + a[j+8] + ... + a[j+120]
// in order, combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)); 8192 halves exactly down to the
// leaves, so the chunk is the perfect binary tree over them: thread l of the chunk's 64 computes
// leaf l, xor butterflies (1, 2, .., 16) build the trees of 32 leaves per warp, and the two
// warp sums are added last. Grid (blocks, 4 chunks per block, grid-stride), block (256);
// dynamic shared memory 8 floats.
extern "C" __global__ void sv_vol_chunk_sums_f32(const float* __restrict__ v, long long nchunks, int square, float m,
                                                 float* __restrict__ sums) {
    using namespace volume;
    EMU_DYN_SHARED(float, sh);  // [8]: the warp sums
    const int t = threadIdx.x, lane = t & 31, w = t >> 5, leaf = t & (LEAVES - 1), cb = t / LEAVES;
    auto val = [&](float a) { return square ? __fmul_rn(a - m, a - m) : a; };
    for (long long base = static_cast<long long>(blockIdx.x) * 4; base < nchunks; base += static_cast<long long>(gridDim.x) * 4) {
        const long long c = base + cb;
        float s = 0.f;
        if (c < nchunks) {
            const float4* a4 = reinterpret_cast<const float4*>(v + c * CHUNK + leaf * LEAF);
            const float4 q0 = a4[0], q1 = a4[1];
            float r0 = val(q0.x), r1 = val(q0.y), r2 = val(q0.z), r3 = val(q0.w);
            float r4 = val(q1.x), r5 = val(q1.y), r6 = val(q1.z), r7 = val(q1.w);
#pragma unroll 4
            for (int k = 2; k < LEAF / 4; k += 2) {
                const float4 e = a4[k], o = a4[k + 1];
                r0 += val(e.x);
                r1 += val(e.y);
                r2 += val(e.z);
                r3 += val(e.w);
                r4 += val(o.x);
                r5 += val(o.y);
                r6 += val(o.z);
                r7 += val(o.w);
            }
            s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7));
        }
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) s += __shfl_xor_sync(FULL, s, o);
        if (lane == 0) sh[w] = s;
        __syncthreads();
        if (leaf == 0 && c < nchunks) sums[c] = sh[2 * cb] + sh[2 * cb + 1];
        __syncthreads();
    }
}
EMU_KERNEL(sv_vol_chunk_sums_f32);

// 3a. Per segment s of 8192 values of t (one block each): parts[s] = the count, min and max of
// its values > thr. Thread i owns values [32 i, 32 i + 32) of the segment. Grid (segments),
// block (256); dynamic shared memory 256 * 24 bytes.
extern "C" __global__ void sv_vol_seg_count_f32(const float* __restrict__ t, long long n, float thr,
                                                volume::Part* parts) {
    using namespace volume;
    EMU_DYN_SHARED(Part, sh);
    const long long b = static_cast<long long>(blockIdx.x) * SEG + static_cast<long long>(threadIdx.x) * SEG_PER_THREAD;
    const long long e = min(b + SEG_PER_THREAD, n);
    Part p = part_identity();
    for_run(t, b, e, [&](float v) {
        if (v > thr) {
            p.count += 1ull;
            p.mn = fminf(p.mn, v);
            p.mx = fmaxf(p.mx, v);
        }
    });
    const Part r = block_reduce_part(p, sh);
    if (threadIdx.x == 0) parts[blockIdx.x] = r;
}
EMU_KERNEL(sv_vol_seg_count_f32);

// 3b. offsets[s] = sum of parts[0 .. s).count (exclusive), offsets[nseg] = the total. One block
// of 256 threads; thread i owns a contiguous run of segments. Dynamic shared memory 128 bytes.
extern "C" __global__ void sv_vol_seg_offsets(const volume::Part* parts, int nseg, unsigned long long* offsets) {
    using namespace volume;
    EMU_DYN_SHARED(unsigned long long, sh);  // [NWARP + 1]
    const int t = threadIdx.x, lane = t & 31, w = t >> 5;
    const int per = (nseg + BLOCK - 1) / BLOCK;
    const int s0 = min(t * per, nseg), s1 = min(s0 + per, nseg);
    unsigned long long own = 0;
    for (int s = s0; s < s1; ++s) own += parts[s].count;
    unsigned long long inc = own;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long u = __shfl_up_sync(FULL, inc, o);
        if (lane >= o) inc += u;
    }
    if (lane == 31) sh[w] = inc;
    __syncthreads();
    if (t == 0) {
        unsigned long long acc = 0;
        for (int i = 0; i < BLOCK / 32; ++i) {
            const unsigned long long c = sh[i];
            sh[i] = acc;
            acc += c;
        }
        sh[BLOCK / 32] = acc;
    }
    __syncthreads();
    unsigned long long off = sh[w] + inc - own;
    for (int s = s0; s < s1; ++s) {
        offsets[s] = off;
        off += parts[s].count;
    }
    if (t == 0) offsets[nseg] = sh[BLOCK / 32];
}
EMU_KERNEL(sv_vol_seg_offsets);

// 3c. Stable compaction: the values > thr of segment s, in order, to f[offsets[s] ..]. Thread i
// writes its own values after those of threads < i (block exclusive scan of the counts).
// Grid (segments), block (256); dynamic shared memory 128 bytes.
extern "C" __global__ void sv_vol_compact_f32(const float* __restrict__ t, long long n, float thr,
                                              const unsigned long long* __restrict__ offsets, float* __restrict__ f) {
    using namespace volume;
    EMU_DYN_SHARED(unsigned, sh);  // [NWARP + 1]
    const long long b = static_cast<long long>(blockIdx.x) * SEG + static_cast<long long>(threadIdx.x) * SEG_PER_THREAD;
    const long long e = min(b + SEG_PER_THREAD, n);
    unsigned c = 0;
    for_run(t, b, e, [&](float v) { c += v > thr; });
    unsigned total;
    const unsigned before = block_exclusive_scan(c, sh, &total);
    float* out = f + offsets[blockIdx.x] + before;
    for_run(t, b, e, [&](float v) {
        if (v > thr) *out++ = v;
    });
}
EMU_KERNEL(sv_vol_compact_f32);

// 5. hist[v - base] += 1 for the n integer values of f (base = min, bins = max - base + 1; hist
// zeroed by the host). With smem_hist each block counts into a private shared-memory histogram
// and adds its non-zero bins to hist at the end; otherwise every value is a global atomic (wide
// ranges). Integer atomics: the counts do not depend on their order. Grid (blocks), block
// (256); dynamic shared memory smem_hist ? bins * 4 : 0.
extern "C" __global__ void sv_vol_hist_f32(const float* __restrict__ f, long long n, int vec, float base, int bins,
                                           int smem_hist, unsigned* hist) {
    using namespace volume;
    EMU_DYN_SHARED(unsigned, sh_hist);
    const int t = threadIdx.x;
    if (smem_hist) {
        for (int b = t; b < bins; b += BLOCK) sh_hist[b] = 0u;
        __syncthreads();
    }
    unsigned* h = smem_hist ? sh_hist : hist;
    for_each_value(f, n, vec, [&](float v) {
        // v and base are integers: v - base is exact in f32 below 2^24. Out-of-range values
        // (impossible for a correct base) are dropped, and the host's total check reports them.
        const float fb = v - base;
        if (fb >= 0.f && fb < static_cast<float>(bins)) atomicAdd(&h[static_cast<int>(fb)], 1u);
    });
    if (smem_hist) {
        __syncthreads();
        for (int b = t; b < bins; b += BLOCK) {
            const unsigned c = sh_hist[b];
            if (c) atomicAdd(&hist[b], c);
        }
    }
}
EMU_KERNEL(sv_vol_hist_f32);

// Second stage of every reduction: one block of 256 threads; thread t folds parts t, t + 256, ...
// in order, then the block combines the threads in a fixed order. Dynamic shared memory
// 256 * 24 bytes. `out` is one Part.
extern "C" __global__ void sv_vol_reduce_parts_f32(const volume::Part* parts, int nparts, volume::Part* out) {
    using namespace volume;
    EMU_DYN_SHARED(Part, sh);
    Part p = part_identity();
    for (int i = threadIdx.x; i < nparts; i += BLOCK) p = part_combine(p, parts[i]);
    const Part r = block_reduce_part(p, sh);
    if (threadIdx.x == 0) *out = r;
}
EMU_KERNEL(sv_vol_reduce_parts_f32);

// ================================ elementwise ops ============================================
// Grid (blocks), block (256), no shared memory unless stated. `vec`: every pointer is 16-byte
// aligned (threshold_u8: x 16, out 4), so the body runs on float4 groups; the tail is scalar.
// out may equal x (in place): each element is read before it is written, by the same thread,
// so no pointer is __restrict__.

// z = (min(max(x, lo), hi) - mean) / std, and each block's (min, max) of z in parts[block].mn/.mx
// (numpy's clip is minimum(maximum(x, lo), hi); fminf/fmaxf ignore a NaN operand as Rust's
// min/max do). Dynamic shared memory 256 * 24 bytes.
extern "C" __global__ void sv_clip_zscore_f32(const float* x, float* out, long long n, int vec, float lo, float hi,
                                              float mean, float std, volume::Part* parts) {
    using namespace volume;
    EMU_DYN_SHARED(Part, sh);
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    float mn = INFINITY, mx = -INFINITY;
    auto z = [&](float v) {
        const float r = (fminf(fmaxf(v, lo), hi) - mean) / std;
        mn = fminf(mn, r);
        mx = fmaxf(mx, r);
        return r;
    };
    long long head = 0;
    if (vec) {
        const long long n4 = n >> 2;
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (long long i = tid; i < n4; i += stride) {
            const float4 v = x4[i];
            o4[i] = make_float4(z(v.x), z(v.y), z(v.z), z(v.w));
        }
        head = n4 << 2;
    }
    for (long long i = head + tid; i < n; i += stride) out[i] = z(x[i]);
    Part p = part_identity();
    p.mn = mn;
    p.mx = mx;
    const Part r = block_reduce_part(p, sh);
    if (threadIdx.x == 0) parts[blockIdx.x] = r;
}
EMU_KERNEL(sv_clip_zscore_f32);

// out = (x - sub) / div (the min-max step).
extern "C" __global__ void sv_shift_scale_f32(const float* x, float* out, long long n, int vec, float sub, float div) {
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    long long head = 0;
    if (vec) {
        const long long n4 = n >> 2;
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (long long i = tid; i < n4; i += stride) {
            const float4 v = x4[i];
            o4[i] = make_float4((v.x - sub) / div, (v.y - sub) / div, (v.z - sub) / div, (v.w - sub) / div);
        }
        head = n4 << 2;
    }
    for (long long i = head + tid; i < n; i += stride) out[i] = (x[i] - sub) / div;
}
EMU_KERNEL(sv_shift_scale_f32);

// dst[i] = value.
extern "C" __global__ void sv_fill_f32(float* dst, long long n, int vec, float value) {
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    long long head = 0;
    if (vec) {
        const long long n4 = n >> 2;
        float4* d4 = reinterpret_cast<float4*>(dst);
        const float4 v = make_float4(value, value, value, value);
        for (long long i = tid; i < n4; i += stride) d4[i] = v;
        head = n4 << 2;
    }
    for (long long i = head + tid; i < n; i += stride) dst[i] = value;
}
EMU_KERNEL(sv_fill_f32);

// out[i] = x[i] > thr (u8).
extern "C" __global__ void sv_threshold_u8_f32(const float* __restrict__ x, unsigned char* __restrict__ out, long long n,
                                               int vec, float thr) {
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    long long head = 0;
    if (vec) {
        const long long n4 = n >> 2;
        const float4* x4 = reinterpret_cast<const float4*>(x);
        uchar4* o4 = reinterpret_cast<uchar4*>(out);
        for (long long i = tid; i < n4; i += stride) {
            const float4 v = x4[i];
            o4[i] = make_uchar4(v.x > thr, v.y > thr, v.z > thr, v.w > thr);
        }
        head = n4 << 2;
    }
    for (long long i = head + tid; i < n; i += stride) out[i] = x[i] > thr;
}
EMU_KERNEL(sv_threshold_u8_f32);

// out[i] = cnt[i] > 0 ? acc[i] / cnt[i] : acc[i] (the sliding-window average, spec §6.8 step 7).
// `out` may equal `acc` (in place: each element is read, then written, by the same thread),
// so neither is __restrict__.
extern "C" __global__ void sv_divide_counts_f32(const float* acc, const float* __restrict__ cnt,
                                                float* out, long long n, int vec) {
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    auto avg = [](float a, float c) { return c > 0.f ? a / c : a; };
    long long head = 0;
    if (vec) {
        const long long n4 = n >> 2;
        const float4* a4 = reinterpret_cast<const float4*>(acc);
        const float4* c4 = reinterpret_cast<const float4*>(cnt);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (long long i = tid; i < n4; i += stride) {
            const float4 a = a4[i], c = c4[i];
            o4[i] = make_float4(avg(a.x, c.x), avg(a.y, c.y), avg(a.z, c.z), avg(a.w, c.w));
        }
        head = n4 << 2;
    }
    for (long long i = head + tid; i < n; i += stride) out[i] = avg(acc[i], cnt[i]);
}
EMU_KERNEL(sv_divide_counts_f32);

// ================================ box ops ====================================================
// Block (32, 8): warp y handles box rows r = blockIdx.x * 8 + y, + gridDim.x * 8, ...; a row is
// (d, h) = (r / e1, r % e1) and lane x walks its e2 values with stride 32 (coalesced).

// Sets the bounding-box accumulator: min d, h, w = 0xffffffff (none yet), max d, h, w = 0.
// Grid (1), block (32).
extern "C" __global__ void sv_bbox_init_u32(unsigned* box) {
    if (threadIdx.x < 6) box[threadIdx.x] = threadIdx.x < 3 ? 0xffffffffu : 0u;
}
EMU_KERNEL(sv_bbox_init_u32);

// Inclusive bounding box of x > thr inside the sub-box [s, s + e) of a (D, H, W) volume,
// relative to s: box = {min d, min h, min w, max d, max h, max w}, combined into `box` with
// integer atomicMin/atomicMax once per block (order-independent). Extents are < 2^31. Block
// (32, 8); dynamic shared memory 6 * 256 * 4 bytes (the block's min/max tree).
extern "C" __global__ void sv_bbox_above_f32(const float* __restrict__ x, long long H, long long W, long long s0,
                                             long long s1, long long s2, long long e0, long long e1, long long e2,
                                             float thr, unsigned* box) {
    using namespace volume;
    EMU_DYN_SHARED(unsigned, sh);  // [6][BLOCK]
    const int lane = threadIdx.x, y = threadIdx.y, t = lane + 32 * y;
    unsigned b[6] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0u, 0u, 0u};
    const long long rows = e0 * e1;
    for (long long r = static_cast<long long>(blockIdx.x) * ROWS + y; r < rows; r += static_cast<long long>(gridDim.x) * ROWS) {
        const long long d = r / e1, h = r - d * e1;
        const float* row = x + ((s0 + d) * H + (s1 + h)) * W + s2;
        unsigned wmin = 0xffffffffu, wmax = 0u;
        bool any = false;
        for (long long w = lane; w < e2; w += 32) {
            if (row[w] > thr) {
                wmin = min(wmin, static_cast<unsigned>(w));
                wmax = max(wmax, static_cast<unsigned>(w));
                any = true;
            }
        }
        if (any) {
            b[0] = min(b[0], static_cast<unsigned>(d));
            b[1] = min(b[1], static_cast<unsigned>(h));
            b[2] = min(b[2], wmin);
            b[3] = max(b[3], static_cast<unsigned>(d));
            b[4] = max(b[4], static_cast<unsigned>(h));
            b[5] = max(b[5], wmax);
        }
    }
#pragma unroll
    for (int k = 0; k < 6; ++k) sh[k * BLOCK + t] = b[k];
    __syncthreads();
    if (t < 32) {
#pragma unroll
        for (int k = 0; k < 6; ++k) {
            unsigned v = sh[k * BLOCK + t];
            for (int j = t + 32; j < BLOCK; j += 32) v = k < 3 ? min(v, sh[k * BLOCK + j]) : max(v, sh[k * BLOCK + j]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const unsigned u = __shfl_xor_sync(FULL, v, o);
                v = k < 3 ? min(v, u) : max(v, u);
            }
            b[k] = v;
        }
        // A block that found nothing leaves min = 0xffffffff; its max (0) changes nothing.
        if (t == 0 && b[0] != 0xffffffffu) {
            atomicMin(&box[0], b[0]);
            atomicMin(&box[1], b[1]);
            atomicMin(&box[2], b[2]);
            atomicMax(&box[3], b[3]);
            atomicMax(&box[4], b[4]);
            atomicMax(&box[5], b[5]);
        }
    }
}
EMU_KERNEL(sv_bbox_above_f32);

namespace volume {
// dst[ds + p] = src in bounds at (ss + p) ? src[ss + p] : pad for p < e, converted to T (RNE).
// src is (sD, sH, sW) f32, dst (·, dH, dW) of T; ss may be negative or run past the source.
template <class T>
__device__ __forceinline__ void copy_box(const float* __restrict__ src, long long sD, long long sH, long long sW,
                                         long long ss0, long long ss1, long long ss2, T* __restrict__ dst,
                                         long long dH, long long dW, long long ds0, long long ds1, long long ds2,
                                         long long e0, long long e1, long long e2, float pad) {
    const int lane = threadIdx.x, y = threadIdx.y;
    const long long rows = e0 * e1;
    for (long long r = static_cast<long long>(blockIdx.x) * ROWS + y; r < rows; r += static_cast<long long>(gridDim.x) * ROWS) {
        const long long pd = r / e1, ph = r - pd * e1;
        const long long sd = ss0 + pd, sh = ss1 + ph;
        const bool row_ok = sd >= 0 && sd < sD && sh >= 0 && sh < sH;
        const float* srow = src + (row_ok ? (sd * sH + sh) * sW : 0);
        T* drow = dst + ((ds0 + pd) * dH + (ds1 + ph)) * dW + ds2;
        for (long long pw = lane; pw < e2; pw += 32) {
            const long long sw = ss2 + pw;
            const float v = (row_ok && sw >= 0 && sw < sW) ? srow[sw] : pad;
            drow[pw] = from_float<T>(v);
        }
    }
}
}  // namespace volume

// Box copy with zero padding and conversion of the destination (f32 -> f32 / f16 / bf16).
// Grid (blocks), block (32, 8), no shared memory.
extern "C" __global__ void sv_copy_box_f32_f32(const float* __restrict__ src, long long sD, long long sH, long long sW,
                                               long long ss0, long long ss1, long long ss2, float* __restrict__ dst,
                                               long long dH, long long dW, long long ds0, long long ds1, long long ds2,
                                               long long e0, long long e1, long long e2, float pad) {
    volume::copy_box(src, sD, sH, sW, ss0, ss1, ss2, dst, dH, dW, ds0, ds1, ds2, e0, e1, e2, pad);
}
EMU_KERNEL(sv_copy_box_f32_f32);

extern "C" __global__ void sv_copy_box_f32_f16(const float* __restrict__ src, long long sD, long long sH, long long sW,
                                               long long ss0, long long ss1, long long ss2, __half* __restrict__ dst,
                                               long long dH, long long dW, long long ds0, long long ds1, long long ds2,
                                               long long e0, long long e1, long long e2, float pad) {
    volume::copy_box(src, sD, sH, sW, ss0, ss1, ss2, dst, dH, dW, ds0, ds1, ds2, e0, e1, e2, pad);
}
EMU_KERNEL(sv_copy_box_f32_f16);

extern "C" __global__ void sv_copy_box_f32_bf16(const float* __restrict__ src, long long sD, long long sH, long long sW,
                                                long long ss0, long long ss1, long long ss2,
                                                __nv_bfloat16* __restrict__ dst, long long dH, long long dW,
                                                long long ds0, long long ds1, long long ds2, long long e0, long long e1,
                                                long long e2, float pad) {
    volume::copy_box(src, sD, sH, sW, ss0, ss1, ss2, dst, dH, dW, ds0, ds1, ds2, e0, e1, e2, pad);
}
EMU_KERNEL(sv_copy_box_f32_bf16);

// acc[s + p] += win[p]; cnt[s + p] += 1 for p < e (one window per launch: no two threads touch
// the same voxel). win is (e0, e1, e2), acc and cnt (·, H, W). Grid (blocks), block (32, 8).
extern "C" __global__ void sv_accumulate_window_f32(const float* __restrict__ win, long long e0, long long e1,
                                                    long long e2, float* __restrict__ acc, float* __restrict__ cnt,
                                                    long long H, long long W, long long s0, long long s1,
                                                    long long s2) {
    using namespace volume;
    const int lane = threadIdx.x, y = threadIdx.y;
    const long long rows = e0 * e1;
    for (long long r = static_cast<long long>(blockIdx.x) * ROWS + y; r < rows; r += static_cast<long long>(gridDim.x) * ROWS) {
        const long long pd = r / e1, ph = r - pd * e1;
        const float* wrow = win + r * e2;
        const long long o = ((s0 + pd) * H + (s1 + ph)) * W + s2;
        for (long long pw = lane; pw < e2; pw += 32) {
            acc[o + pw] += wrow[pw];
            cnt[o + pw] += 1.f;
        }
    }
}
EMU_KERNEL(sv_accumulate_window_f32);
