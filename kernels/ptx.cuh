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
inline float elem(unsigned reg, int hi, bool bf16) {
    const unsigned short h = static_cast<unsigned short>(hi ? reg >> 16 : reg & 0xffffu);
    return bf16 ? emu::bf16_bits_to_float(h) : emu::half_bits_to_float(h);
}
inline void need_full_warp(unsigned participants, const char* what) {
    if (participants != 0xffffffffu) emu::fail("%s needs all 32 lanes of the warp (lanes 0x%08x took part)", what, participants);
}
// One warp all-gather of the fragment registers, then each lane computes its own 4 accumulators,
// summing k in order in f32 (products of 16-bit floats are exact in f32).
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4], bool bf16) {
    struct Frag {
        unsigned a[4];
        unsigned b[2];
    };
    const Frag mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
    unsigned part;
    const unsigned char* s = emu::warp_exchange(0xffffffffu, &mine, sizeof(Frag), "mma.sync.m16n8k16", &part);
    need_full_warp(part, "mma.sync.m16n8k16");
    Frag all[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&all[l], s + 64 * l, sizeof(Frag));
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int reg = 0; reg < 4; ++reg) {
            const int row = g + ((reg & 1) ? 8 : 0), col = 2 * t + ((reg & 2) ? 8 : 0);
            A[row][col] = elem(all[l].a[reg], 0, bf16);
            A[row][col + 1] = elem(all[l].a[reg], 1, bf16);
        }
        for (int reg = 0; reg < 2; ++reg) {
            const int k = 2 * t + (reg ? 8 : 0);
            B[k][g] = elem(all[l].b[reg], 0, bf16);
            B[k + 1][g] = elem(all[l].b[reg], 1, bf16);
        }
    }
    const int lane = static_cast<int>(emu::lane_id()), g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[i] = acc;
    }
}
template <int N, bool TRANS>
inline void ldmatrix(unsigned (&r)[N], const void* p) {
    unsigned part;
    const unsigned char* s = emu::warp_exchange(0xffffffffu, &p, sizeof(p), "ldmatrix", &part);
    need_full_warp(part, "ldmatrix");
    const unsigned short* rows[32];
    for (int l = 0; l < 8 * N; ++l) {
        std::memcpy(&rows[l], s + 64 * l, sizeof(void*));
        if (reinterpret_cast<uintptr_t>(rows[l]) & 15u) emu::fail("ldmatrix: row address of lane %d is not 16-byte aligned", l);
    }
    const int lane = static_cast<int>(emu::lane_id());
    for (int j = 0; j < N; ++j) {
        unsigned lo, hi;
        if (!TRANS) {
            const unsigned short* row = rows[8 * j + lane / 4];
            lo = row[2 * (lane % 4)];
            hi = row[2 * (lane % 4) + 1];
        } else {
            lo = rows[8 * j + 2 * (lane % 4)][lane / 4];
            hi = rows[8 * j + 2 * (lane % 4) + 1][lane / 4];
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
    model::mma_16816(d, a, b, c, true);
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
    model::mma_16816(d, a, b, c, false);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
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
