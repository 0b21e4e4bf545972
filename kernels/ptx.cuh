// Inline-PTX wrappers, one per instruction, each with a lane-exact emulator model
// (docs: emulator.md §3 "Inline PTX"). Kernels use these instead of writing asm themselves.
// All need sm_80+ (the oldest target build.rs compiles for).
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col (f16/bf16 inputs, f32 accumulators), for
// lane l with g = l / 4 and t = l % 4 (PTX ISA, "Matrix fragments for mma.m16n8k16"):
//   A (16x16, row-major), 4 regs of 2 elements (low half first):
//     a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, "col": consecutive k in one reg):
//     b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C/D (16x8 f32): c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
// ldmatrix.m8n8 (x1/x2/x4): lane 8j+r supplies the address of row r of matrix j (16-byte rows,
// 16-byte aligned); register j of lane l then holds row l/4, columns 2(l%4)..2(l%4)+1 of matrix j
// (with .trans: column l/4, rows 2(l%4)..2(l%4)+1). So ldmatrix_x4 on a 16x16 row-major tile with
// lane l pointing at row (l % 16), column 8 * (l / 16) yields exactly the A fragment above, and
// ldmatrix_x2 on an 8x16 (n x k) tile with lane l pointing at row (l % 8), column 8 * ((l / 8) % 2)
// yields the B fragment.
//
// The layout model has NOT yet been checked against hardware: the first GPU run must run the
// selftest `sv_selftest_mma_*` kernels on CUDA against the same host reference.
#pragma once
#include "cuda_compat.cuh"

namespace ptx {

// Two floats packed as a bf16x2 / f16x2 register (lo in the low 16 bits), round-to-nearest-even.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    return static_cast<unsigned>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<unsigned>(__half_as_ushort(__float2half_rn(hi))) << 16);
}

#if EMU_HOST_EMULATION
namespace model {
template <bool BF16>
inline float elem(unsigned reg, int hi) {
    const unsigned short h = static_cast<unsigned short>(hi ? reg >> 16 : reg & 0xffffu);
    return BF16 ? emu::bf16_bits_to_float(h) : emu::half_bits_to_float(h);
}
inline void need_full_warp(unsigned participants, const char* what) {
    if (participants != 0xffffffffu) emu::fail("%s needs all 32 lanes of the warp (lanes 0x%08x took part)", what, participants);
}
// N mma.sync.m16n8k16 sharing one A fragment, d[n] = A * B[n] + c[n] (d may alias c): one warp
// all-gather of the fragment registers (A, then the N B fragments: 16 + 8N <= 64 bytes, one
// exchange slot), then each lane computes its own 4 accumulators of each product, summing k in
// order in f32 (products of 16-bit floats are exact in f32). A lane decodes only what its
// outputs read: rows g and g + 8 of A (held by lanes 4g .. 4g+3) and columns 2t, 2t + 1 of B
// (held by lanes 8t .. 8t+3 and 8t+4 .. 8t+7).
template <int N, bool BF16>
inline void mma_16816(float (*d)[4], const unsigned (&a)[4], const unsigned (*b)[2], const float (*c)[4]) {
    static_assert(N >= 1 && 16 + 8 * N <= 64, "the fragments of one lane must fit one 64-byte exchange slot");
    unsigned mine[4 + 2 * N];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int n = 0; n < N; ++n) {
        mine[4 + 2 * n] = b[n][0];
        mine[5 + 2 * n] = b[n][1];
    }
    unsigned part;
    const unsigned char* s = emu::warp_exchange(0xffffffffu, mine, sizeof(mine), "mma.sync.m16n8k16", &part);
    need_full_warp(part, "mma.sync.m16n8k16");
    const int lane = static_cast<int>(emu::lane_id()), g = lane >> 2, t = lane & 3;
    // Ap[k] = (A[g][k], A[g][k], A[g+8][k], A[g+8][k]) and Bp[n][k] = (B[k][2t], B[k][2t+1], B[k][2t],
    // B[k][2t+1]) of product n: each product's 4 accumulators are one 4-wide multiply-add per k
    // (GCC vector extension: per-lane IEEE f32 multiply and add, no contraction).
    typedef float v4f __attribute__((vector_size(16)));
    v4f Ap[16];
    for (int q = 0; q < 4; ++q) {
        unsigned ar[4];
        std::memcpy(ar, s + 64 * (4 * g + q), sizeof(ar));  // lane 4g+q: columns 2q, 2q+1 (+8)
        for (int reg = 0; reg < 4; ++reg) {
            const int r = reg & 1, k = 2 * q + ((reg & 2) ? 8 : 0);
            Ap[k][2 * r] = Ap[k][2 * r + 1] = elem<BF16>(ar[reg], 0);
            Ap[k + 1][2 * r] = Ap[k + 1][2 * r + 1] = elem<BF16>(ar[reg], 1);
        }
    }
    v4f Bp[N][16];
    for (int n = 0; n < N; ++n) {
        for (int j = 0; j < 2; ++j) {
            for (int q = 0; q < 4; ++q) {
                unsigned br[2];
                std::memcpy(br, s + 64 * (4 * (2 * t + j) + q) + 16 + 8 * n, sizeof(br));  // rows 2q, 2q+1 (+8)
                Bp[n][2 * q][j] = Bp[n][2 * q][j + 2] = elem<BF16>(br[0], 0);
                Bp[n][2 * q + 1][j] = Bp[n][2 * q + 1][j + 2] = elem<BF16>(br[0], 1);
                Bp[n][2 * q + 8][j] = Bp[n][2 * q + 8][j + 2] = elem<BF16>(br[1], 0);
                Bp[n][2 * q + 9][j] = Bp[n][2 * q + 9][j + 2] = elem<BF16>(br[1], 1);
            }
        }
    }
    // N independent 4-wide chains (k outer), each summed in k order.
    v4f acc[N];
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) acc[n] = v4f{c[n][0], c[n][1], c[n][2], c[n][3]};
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) {
#pragma GCC unroll 8
        for (int n = 0; n < N; ++n) acc[n] += Ap[k] * Bp[n][k];
    }
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < 4; ++i) d[n][i] = acc[n][i];
}
// Each lane fetches only the row addresses it reads (every row is read by some lane, so every
// row address is still checked for alignment).
template <int N, bool TRANS>
inline void ldmatrix(unsigned (&r)[N], const void* p) {
    unsigned part;
    const unsigned char* s = emu::warp_exchange(0xffffffffu, &p, sizeof(p), "ldmatrix", &part);
    need_full_warp(part, "ldmatrix");
    const int lane = static_cast<int>(emu::lane_id());
    auto row = [s](int l) {
        const unsigned short* q;
        std::memcpy(&q, s + 64 * l, sizeof(q));
        if (reinterpret_cast<uintptr_t>(q) & 15u) emu::fail("ldmatrix: row address of lane %d is not 16-byte aligned", l);
        return q;
    };
    for (int j = 0; j < N; ++j) {
        unsigned lo, hi;
        if (!TRANS) {
            const unsigned short* q = row(8 * j + lane / 4);
            lo = q[2 * (lane % 4)];
            hi = q[2 * (lane % 4) + 1];
        } else {
            lo = row(8 * j + 2 * (lane % 4))[lane / 4];
            hi = row(8 * j + 2 * (lane % 4) + 1)[lane / 4];
        }
        r[j] = lo | (hi << 16);
    }
}
inline void check_align(const void* dst, const void* src, unsigned bytes, const char* what) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % bytes) {
        emu::fail("%s: addresses %p <- %p are not %u-byte aligned", what, dst, src, bytes);
    }
}
}  // namespace model
#else
__device__ __forceinline__ unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
#endif

// D = A * B + C, m16n8k16, bf16 inputs, f32 accumulators (d may alias c).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
#if EMU_HOST_EMULATION
    model::mma_16816<1, true>(&d, a, &b, &c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// D = A * B + C, m16n8k16, f16 inputs, f32 accumulators (d may alias c).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
#if EMU_HOST_EMULATION
    model::mma_16816<1, false>(&d, a, &b, &c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// N (1..6) independent mma.sync.m16n8k16 sharing the A fragment, accumulating in place:
// d[n] += A * B[n]. On the GPU these are N instructions; the emulator models them with one warp
// exchange instead of N (same per-lane arithmetic as the single-instruction model).
template <int N>
__device__ __forceinline__ void mma_m16n8k16_bf16_xn(float (&d)[N][4], const unsigned (&a)[4], const unsigned (&b)[N][2]) {
#if EMU_HOST_EMULATION
    model::mma_16816<N, true>(d, a, b, d);
#else
#pragma unroll
    for (int n = 0; n < N; ++n) mma_m16n8k16_bf16(d[n], a, b[n], d[n]);
#endif
}
template <int N>
__device__ __forceinline__ void mma_m16n8k16_f16_xn(float (&d)[N][4], const unsigned (&a)[4], const unsigned (&b)[N][2]) {
#if EMU_HOST_EMULATION
    model::mma_16816<N, false>(d, a, b, d);
#else
#pragma unroll
    for (int n = 0; n < N; ++n) mma_m16n8k16_f16(d[n], a, b[n], d[n]);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: `row` is this lane's row address in
// shared memory (see the layout note at the top).
__device__ __forceinline__ void ldmatrix_x1(unsigned (&r)[1], const void* row) {
#if EMU_HOST_EMULATION
    model::ldmatrix<1, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row)) : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* row) {
#if EMU_HOST_EMULATION
    model::ldmatrix<2, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)) : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
#if EMU_HOST_EMULATION
    model::ldmatrix<4, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row))
                 : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned (&r)[2], const void* row) {
#if EMU_HOST_EMULATION
    model::ldmatrix<2, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(row))
                 : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
#if EMU_HOST_EMULATION
    model::ldmatrix<4, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row))
                 : "memory");
#endif
}

// cp.async global -> shared. The emulator queues each copy and performs it only at the
// cp_async_wait that covers its group (copies still pending at thread exit are dropped), so
// reading the destination before the wait reads the old (poisoned) contents, as it may on the GPU.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if EMU_HOST_EMULATION
    model::check_align(smem, gmem, 16, "cp.async.cg 16");
    emu::async_copy(smem, gmem, 16, 16);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
#endif
}
// As cp_async_16, but copies nothing and zero-fills the 16 bytes when !valid (gmem is not read).
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
#if EMU_HOST_EMULATION
    model::check_align(smem, valid ? gmem : smem, 16, "cp.async.cg 16 (zfill)");
    emu::async_copy(smem, gmem, 16, valid ? 16 : 0);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
#if EMU_HOST_EMULATION
    model::check_align(smem, gmem, 8, "cp.async.ca 8");
    emu::async_copy(smem, gmem, 8, 8);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
#if EMU_HOST_EMULATION
    model::check_align(smem, gmem, 4, "cp.async.ca 4");
    emu::async_copy(smem, gmem, 4, 4);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if EMU_HOST_EMULATION
    emu::async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight. Other threads'
// copies need a __syncthreads after their wait, as on the GPU.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if EMU_HOST_EMULATION
    emu::async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// Commits the pending copies and waits for all of them.
__device__ __forceinline__ void cp_async_wait_all() {
#if EMU_HOST_EMULATION
    emu::async_commit();
    emu::async_wait(0);
#else
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace ptx
