// cuda_compat.cuh: the one include of every kernel file. Under nvcc it pulls in the real CUDA
// headers; under a host C++ compiler (the `emu` device, built by build.rs) it pulls in the
// emulator (emu/cuda_emu.h). Design and measured costs: docs/emulator.md; build: build.rs.
//
// ================================ Kernel source conventions ================================
// One kernel tree, two compilers: nvcc (PTX for sm_90a and sm_80, C++17) and g++ (the host
// emulator, C++20, all kernels/*.cu in ONE translation unit). Every kernels/*.cu file must:
//
//  1. Start with `#include "cuda_compat.cuh"` (plus "common.cuh" / "ptx.cuh" as needed), and
//     only include those (the emulator build includes kernel files into one unity TU).
//  2. Make every kernel that Rust launches `extern "C" __global__ void sv_<name>(...)`, with the
//     `sv_` prefix (extern "C" names are global C symbols of the test binaries; `sv_` avoids
//     clashes with libc). Templates are instantiated through thin extern "C" wrappers, so the PTX
//     symbol and the emulator's registry key are the same string, e.g.
//         template <class T> __device__ void layer_norm(const T* x, ...) { ... }
//         extern "C" __global__ void sv_layer_norm_bf16(const __nv_bfloat16* x, ...) {
//             layer_norm(x, ...);
//         }
//         EMU_KERNEL(sv_layer_norm_bf16);
//     Kernel names carry the dtype suffix of `DType::suffix()` (f32, f16, bf16).
//  3. Follow each kernel with `EMU_KERNEL(name);` (nothing under nvcc; registers it with the
//     emulator). build.rs lists these names per file in `embedded::MODULES[..].kernels`.
//     A name registered twice is an error at its first launch.
//  4. Parameters: pointers, int, unsigned, long long, float (one 8-byte `KernelArgs` slot each;
//     no structs by value larger than 8 bytes). The emulator checks the parameter count at launch.
//  5. Dynamic shared memory: `EMU_DYN_SHARED(T, name);` inside the kernel (16-byte aligned; the
//     size is the launch's shared_bytes). Never `extern __shared__` directly: once `__shared__` is
//     a macro that cannot be expressed. Static `__shared__` arrays are fine; their types must be
//     trivial (no constructors; __half/__nv_bfloat16 are). Prefer dynamic shared memory for large
//     buffers: only it is poisoned per block (NaN), and every static __shared__ array of every
//     kernel is thread-local storage of every host thread in the emulator.
//  6. Emulator-only code goes under `#if EMU_HOST_EMULATION`, GPU-only code under
//     `#if !EMU_HOST_EMULATION` (may then test `__CUDA_ARCH__`). Never use `__CUDA_ARCH__` to
//     select the emulator path: nvcc's host pass parses device bodies too.
//  7. Inline PTX only through wrappers in ptx.cuh that carry an emulator model (mma.sync,
//     ldmatrix, cp.async). Hopper-only instructions (wgmma, TMA, mbarrier) need a portable
//     fallback path that the emulator runs.
//  8. File-scope helpers (constants, device functions, structs) go in a namespace named after the
//     file (`namespace attention { constexpr int TILE = 64; }`): all files share one emulator
//     translation unit, so two files' `constexpr int TILE` would clash. Anonymous namespaces do
//     not help (they are per TU).
//  9. Warp collectives (shuffles, votes, __syncwarp, wmma, mma/ldmatrix) use full masks
//     (0xffffffff): every lane that has not exited must reach the collective; lanes that returned
//     may be named in the mask (as in CUDA) and read as the caller's own value. Masks naming a
//     subset of the live lanes (partial-warp collectives) are not emulated: error. mma.sync and
//     ldmatrix need all 32 lanes. Every thread of a block must reach each __syncthreads: a thread
//     that returned early, or a barrier in divergent code, is reported as a deadlock.
// 10. Code must be C++17 (nvcc) and must not rely on warp lock-step (no implicit warp-synchronous
//     programming; use __syncwarp / *_sync intrinsics).
// 11. wmma fragments: only lane-independent element-wise use of `frag.x[i]` over
//     `frag.num_elements` (the emulator's fragment holds the whole tile).
// 12. Arithmetic: `__half`/`__nv_bfloat16` conversions and + - * / are bit-exact between the
//     emulator and the GPU; fast-math intrinsics (__expf, rsqrtf, ...) are exact on the host and
//     approximate on the GPU; nvcc contracts a*b+c into FMA, g++ does not. Compare kernel results
//     across devices with tolerances; compare emulator schedules bit-exactly.
// 13. Launch limits checked by the emulator: <= 1024 threads per block, <= 227 KiB of dynamic
//     shared memory. Blocks run one after another (or on `workers` threads), so kernels must not
//     wait on other blocks (no spin-waits, grid.sync, persistent producer/consumer schemes).
// 14. printf works in the emulator (not captured by the test harness); a failed `assert` ends the
//     launch with an error. Fiber stacks are 128 KiB (EMU_FIBER_STACK_KB): keep large per-thread
//     arrays in shared memory.
// 15. No std:: functions or constexpr host functions in device code (nvcc runs without
//     --expt-relaxed-constexpr): use CUDA's math (fminf, expf, min/max) and INFINITY. FLT_MAX
//     is not defined under nvcc without <cfloat>: write the constant (3.402823466e+38f).
//
// Emulator-only extras (under EMU_HOST_EMULATION): `emu::fail(fmt, ...)` ends the launch with an
// error naming the kernel, block and thread; EMU_KERNEL_AS("name", fn) registers under a name.
// ===========================================================================================
#pragma once

#if defined(__CUDACC__)

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <assert.h>
#include <stdint.h>

#define EMU_HOST_EMULATION 0
#define EMU_KERNEL(name)
#define EMU_DYN_SHARED(T, name)                                   \
    extern __shared__ __align__(16) unsigned char emu_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(emu_dyn_smem_)

#else

#define EMU_HOST_EMULATION 1
#include "emu/cuda_emu.h"

#endif
