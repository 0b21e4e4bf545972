// Glue kernels of the model (DESIGN.md "elementwise"; the op contract in src/backend/mod.rs):
// broadcast add, scale + activation, token embedding gather, the 3-D patch gather of the ViT
// input (spec §1.2), and the GEMM epilogue that src/backend/cuda/gemm.rs launches after a
// cuBLASLt call it cannot fuse. Launch code: src/backend/kernel/elementwise.rs.
//
// Every kernel computes in f32 and stores with one rounding to the storage type.
#include "cuda_compat.cuh"
#include "common.cuh"

namespace elementwise {
constexpr int BLOCK = 256;

// 16 bytes of T as f32 values (the vector path of add/activation: one 128-bit load per thread).
template <class T>
struct V16 {
    static constexpr int N = 16 / sizeof(T);
};

template <class T>
__device__ __forceinline__ void load16(const T* p, float (&v)[16 / sizeof(T)]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V16<T>::N; ++i) v[i] = to_float(e[i]);
}

template <class T>
__device__ __forceinline__ void store16(T* p, const float (&v)[16 / sizeof(T)]) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < V16<T>::N; ++i) e[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// Four consecutive values (patch gather): one 16-byte (f32) or 8-byte (16-bit) access.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
template <class T>
__device__ __forceinline__ float4 load4(const T* p) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
    return make_float4(to_float(e[0]), to_float(e[1]), to_float(e[2]), to_float(e[3]));
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
template <class T>
__device__ __forceinline__ void store4(T* p, float4 v) {
    uint2 raw;
    T* e = reinterpret_cast<T*>(&raw);
    e[0] = from_float<T>(v.x);
    e[1] = from_float<T>(v.y);
    e[2] = from_float<T>(v.z);
    e[3] = from_float<T>(v.w);
    *reinterpret_cast<uint2*>(p) = raw;
}

__device__ __forceinline__ long long global_thread() {
    return static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x;
}
__device__ __forceinline__ long long grid_threads() { return static_cast<long long>(gridDim.x) * BLOCK; }

// out[i] = a[i] + b[i % period]. `vec` (host-checked): n and period are multiples of
// V16<T>::N and a, b, out are 16-byte aligned, so a 16-byte chunk never straddles a period.
// Each element is read and written by one thread, so out == a (and b == out when period == n)
// is safe.
template <class T>
__device__ void add(const T* a, const T* b, T* out, long long n, long long period, int vec) {
    const long long stride = grid_threads();
    if (vec) {
        constexpr int N = V16<T>::N;
        const long long chunks = n / N;
        for (long long ch = global_thread(); ch < chunks; ch += stride) {
            const long long i = ch * N;
            const long long bi = period == n ? i : i % period;
            float x[N], y[N];
            load16(a + i, x);
            load16(b + bi, y);
#pragma unroll
            for (int k = 0; k < N; ++k) x[k] += y[k];
            store16(out + i, x);
        }
    } else {
        for (long long i = global_thread(); i < n; i += stride) {
            const long long bi = period == n ? i : i % period;
            out[i] = from_float<T>(to_float(a[i]) + to_float(b[bi]));
        }
    }
}

// out[i] = act(x[i] * scale); `vec` as for add.
template <class T>
__device__ void activation(const T* x, T* out, long long n, float scale, int act, int vec) {
    const long long stride = grid_threads();
    if (vec) {
        constexpr int N = V16<T>::N;
        const long long chunks = n / N;
        for (long long ch = global_thread(); ch < chunks; ch += stride) {
            float v[N];
            load16(x + ch * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] = act_apply(act, v[k] * scale);
            store16(out + ch * N, v);
        }
    } else {
        for (long long i = global_thread(); i < n; i += stride) out[i] = from_float<T>(act_apply(act, to_float(x[i]) * scale));
    }
}

// out[r][c] = table[ids[r]][c] + pos[r][c]. Grid (ceil(cols/BLOCK), min(rows, 65535)); rows
// beyond gridDim.y are looped. An id outside [0, vocab) cannot be reported from here: its row is
// written as NaN instead of reading out of bounds (ids come from our tokenizer; the launch code
// documents this).
template <class T>
__device__ void embed_gather(const int* ids, const T* table, int vocab, const T* pos, T* out, int rows, int cols) {
    const int c = blockIdx.x * BLOCK + threadIdx.x;
    if (c >= cols) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const int id = ids[r];
        const long long o = static_cast<long long>(r) * cols + c;
        float v;
        if (id >= 0 && id < vocab) {
            v = to_float(table[static_cast<long long>(id) * cols + c]) + to_float(pos[o]);
        } else {
            v = __int_as_float(0x7fc00000);  // quiet NaN
        }
        out[o] = from_float<T>(v);
    }
}

// Patch gather (spec §1.2): x (B, 1, D, H, W) -> out (B, N, pd*ph*pw) with token
// t = i*(H/ph*W/pw) + j*(W/pw) + k and feature f = a*ph*pw + b*pw + c. Threads walk the output in
// order, so both sides are contiguous along W within a patch row (runs of pw elements). With
// `vec4` (pw % 4 == 0, 4-element-aligned x and out) each thread moves 4 consecutive values.
template <class Ti, class To>
__device__ void patch_gather3d(const Ti* x, To* out, long long total, int d, int h, int w, int pd, int ph, int pw, int vec4) {
    (void)d;
    const int gh = h / ph, gw = w / pw;
    const int feat = pd * ph * pw;
    const long long vox = static_cast<long long>(d) * h * w;
    const long long per_sample = vox / feat;  // tokens per sample
    const int step = vec4 ? 4 : 1;
    const long long units = total / step;
    const long long stride = grid_threads();
    for (long long u = global_thread(); u < units; u += stride) {
        const long long o = u * step;
        const long long tg = o / feat;  // global token
        const int f = static_cast<int>(o - tg * feat);
        const long long b = tg / per_sample;
        const int tok = static_cast<int>(tg - b * per_sample);
        const int i = tok / (gh * gw), j = (tok / gw) % gh, k = tok % gw;
        const int za = f / (ph * pw), yb = (f / pw) % ph, c = f % pw;
        const long long src = b * vox + (static_cast<long long>(i * pd + za) * h + (j * ph + yb)) * w + k * pw + c;
        if (vec4) {
            store4(out + o, load4(x + src));
        } else {
            out[o] = from_float<To>(to_float(x[src]));
        }
    }
}

// GEMM epilogue, in place (src/backend/cuda/gemm.rs `EpilogueLaunch`): c already holds
// alpha*A@B; c[b][i][j] = act(c[b][i][j] + bias[j]) + residual[b][i][j], with residual element
// (b, i, j) at residual + b*batch_stride_r + i*ldr + j (ldr 0: one row for every row; batch
// stride 0: one matrix for every batch). bias and residual may be null. residual may equal c.
// Block (256, 1, 1), grid (ceil(n/256), m, batch): thread (column, row, batch).
template <class T>
__device__ void gemm_epilogue(T* c, int ldc, long long batch_stride_c, const T* bias, const T* residual, int ldr,
                              long long batch_stride_r, int batch, int m, int n, int act) {
    const int j = blockIdx.x * BLOCK + threadIdx.x;
    const int i = blockIdx.y, b = blockIdx.z;
    if (j >= n || i >= m || b >= batch) return;
    T* p = c + b * batch_stride_c + static_cast<long long>(i) * ldc + j;
    float v = to_float(*p);
    if (bias) v += to_float(bias[j]);
    v = act_apply(act, v);
    if (residual) v += to_float(residual[b * batch_stride_r + static_cast<long long>(i) * ldr + j]);
    *p = from_float<T>(v);
}
}  // namespace elementwise

// ---- extern "C" entry points (parameter lists documented in src/backend/kernel/elementwise.rs) ----
// The macros define the entry points; each `EMU_KERNEL(name);` is written out on its own line
// because build.rs reads the kernel names from those lines.

#define SV_ADD(SUF, T)                                                                                               \
    extern "C" __global__ void sv_add_##SUF(const T* a, const T* b, T* out, long long n, long long period, int vec) { \
        elementwise::add(a, b, out, n, period, vec);                                                                 \
    }
#define SV_ACTIVATION(SUF, T)                                                                                        \
    extern "C" __global__ void sv_activation_##SUF(const T* x, T* out, long long n, float scale, int act, int vec) { \
        elementwise::activation(x, out, n, scale, act, vec);                                                         \
    }
#define SV_EMBED_GATHER(SUF, T)                                                                                      \
    extern "C" __global__ void sv_embed_gather_##SUF(const int* ids, const T* table, int vocab, const T* pos, T* out, \
                                                     int rows, int cols) {                                           \
        elementwise::embed_gather(ids, table, vocab, pos, out, rows, cols);                                          \
    }
#define SV_GEMM_EPILOGUE(SUF, T)                                                                                     \
    extern "C" __global__ void sv_gemm_epilogue_##SUF(T* c, int ldc, long long batch_stride_c, const T* bias,        \
                                                      const T* residual, int ldr, long long batch_stride_r,          \
                                                      int batch, int m, int n, int act) {                            \
        elementwise::gemm_epilogue(c, ldc, batch_stride_c, bias, residual, ldr, batch_stride_r, batch, m, n, act);   \
    }
#define SV_PATCH_GATHER(SUF, TI, TO)                                                                                 \
    extern "C" __global__ void sv_patch_gather3d_##SUF(const TI* x, TO* out, long long total, int d, int h, int w,   \
                                                       int pd, int ph, int pw, int vec4) {                           \
        elementwise::patch_gather3d(x, out, total, d, h, w, pd, ph, pw, vec4);                                       \
    }

SV_ADD(f32, float)
EMU_KERNEL(sv_add_f32);
SV_ADD(f16, __half)
EMU_KERNEL(sv_add_f16);
SV_ADD(bf16, __nv_bfloat16)
EMU_KERNEL(sv_add_bf16);

SV_ACTIVATION(f32, float)
EMU_KERNEL(sv_activation_f32);
SV_ACTIVATION(f16, __half)
EMU_KERNEL(sv_activation_f16);
SV_ACTIVATION(bf16, __nv_bfloat16)
EMU_KERNEL(sv_activation_bf16);

SV_EMBED_GATHER(f32, float)
EMU_KERNEL(sv_embed_gather_f32);
SV_EMBED_GATHER(f16, __half)
EMU_KERNEL(sv_embed_gather_f16);
SV_EMBED_GATHER(bf16, __nv_bfloat16)
EMU_KERNEL(sv_embed_gather_bf16);

SV_GEMM_EPILOGUE(f32, float)
EMU_KERNEL(sv_gemm_epilogue_f32);
SV_GEMM_EPILOGUE(f16, __half)
EMU_KERNEL(sv_gemm_epilogue_f16);
SV_GEMM_EPILOGUE(bf16, __nv_bfloat16)
EMU_KERNEL(sv_gemm_epilogue_bf16);

// x in f32 (the model input) or in the storage dtype; out in the storage dtype.
SV_PATCH_GATHER(f32_f32, float, float)
EMU_KERNEL(sv_patch_gather3d_f32_f32);
SV_PATCH_GATHER(f32_f16, float, __half)
EMU_KERNEL(sv_patch_gather3d_f32_f16);
SV_PATCH_GATHER(f32_bf16, float, __nv_bfloat16)
EMU_KERNEL(sv_patch_gather3d_f32_bf16);
SV_PATCH_GATHER(f16_f16, __half, __half)
EMU_KERNEL(sv_patch_gather3d_f16_f16);
SV_PATCH_GATHER(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
EMU_KERNEL(sv_patch_gather3d_bf16_bf16);
