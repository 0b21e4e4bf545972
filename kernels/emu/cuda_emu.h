// Host emulation of the CUDA device language, so that kernels/*.cu compile with g++ and run on
// the CPU (docs: emulator.md §1 "Emulation header", §5). Kernel files never include this
// directly: they include "cuda_compat.cuh", which picks the real CUDA headers under nvcc and
// this file under a host compiler. The conventions kernels must follow are documented at the
// top of cuda_compat.cuh.
//
// Execution model (emu_runtime.cpp): one block at a time per OS thread; its threads are fibers
// switched only at __syncthreads, warp collectives (shuffles, votes, __syncwarp, wmma load/store,
// mma/ldmatrix models) and thread exit. So between two barriers each thread runs its whole
// segment alone, which turns a missing barrier into a deterministic wrong result.
#pragma once

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Qualifiers. `__noinline__` is deliberately not defined: libstdc++ spells
// `__attribute__((__noinline__))`, which such a macro would break (emulator.md §4 pitfall 1).
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Block-shared storage: one copy per OS thread, and the block's fibers share the OS thread.
// Shared types must be trivial (a constructor would run once per OS thread, not per block).
#define __shared__ static thread_local

// ---------------------------------------------------------------------------------------------
// Built-in variables (trivial types: a constructor would put a TLS wrapper call on every access).
// ---------------------------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local uint3 blockDim;
inline thread_local uint3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Runtime interface (emu_runtime.cpp). Every entry that can switch fibers is out of line: the
// opaque call is what keeps g++ from caching shared memory in registers across a barrier.
// ---------------------------------------------------------------------------------------------
namespace emu {
void syncthreads();
// __syncthreads_count: the number of threads of the block that passed a non-zero predicate.
int syncthreads_count(int pred);
void syncwarp(unsigned mask);
// Warp collective: copies `bytes` (<= 64) from `src` into this lane's slot, waits until every
// lane of the warp that has not exited arrives, and returns the warp's 32 slots of 64 bytes each
// (slot i = lane i). `*participants` receives the lanes that took part: as in CUDA, lanes that
// exited are allowed in `mask`; every participant must be in `mask` (partial-warp collectives are
// not emulated: error).
const unsigned char* warp_exchange(unsigned mask, const void* src, unsigned bytes, const char* what, unsigned* participants);
// Existing lanes of the calling thread's warp (the last warp of a block may be partial).
unsigned warp_lanes();
// Existing lanes that have not exited.
unsigned active_mask();
// Ends the launch with an error that names the kernel, block and thread.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// The block's dynamic shared memory (128-byte aligned; 0xff-poisoned per block by default).
unsigned char* dyn_smem();
unsigned dyn_smem_bytes();
// cp.async model: copies are queued per thread and only land at the wait that covers them.
void async_copy(void* dst, const void* src, unsigned bytes, unsigned src_bytes);
void async_commit();
void async_wait(int pending_groups);

inline unsigned linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
inline unsigned lane_id() { return linear_tid() & 31u; }

template <class To, class From>
inline To bit_cast(const From& f) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast size mismatch");
    To t;
    std::memcpy(&t, &f, sizeof(To));
    return t;
}

// ---- kernel registry ----
struct KernelInfo {
    const char* name;
    void* (*make_args)(void* const* params);  // copies the arguments (cuLaunchKernel semantics)
    void (*free_args)(void* args);
    void (*run)(const void* args);  // runs the kernel body for the current thread
    unsigned nparams;
    const unsigned* param_sizes;
    const char* file;
    int line;
};
int register_kernel(const KernelInfo* info);

template <auto F>
struct Thunk;
template <class... A, void (*F)(A...)>
struct Thunk<F> {
    using Tuple = std::tuple<std::decay_t<A>...>;
    static constexpr unsigned sizes[sizeof...(A) + 1] = {static_cast<unsigned>(sizeof(std::decay_t<A>))..., 0u};
    template <std::size_t... I>
    static void* make(void* const* p, std::index_sequence<I...>) {
        // Each parameter is read from its slot with memcpy: slots are only 8-byte aligned.
        return new Tuple(load<std::decay_t<A>>(p[I])...);
    }
    template <class T>
    static T load(const void* p) {
        static_assert(std::is_trivially_copyable_v<T>, "kernel parameters must be trivially copyable");
        T v;
        std::memcpy(&v, p, sizeof(T));
        return v;
    }
    static void* make_args(void* const* p) { return make(p, std::index_sequence_for<A...>{}); }
    static void free_args(void* t) { delete static_cast<Tuple*>(t); }
    static void run(const void* t) { std::apply(F, *static_cast<const Tuple*>(t)); }
    // One record per registration (never freed), so that aliases of one function stay distinct.
    static const KernelInfo* info(const char* name, const char* file, int line) {
        return new KernelInfo{name, &make_args, &free_args, &run, unsigned(sizeof...(A)), sizes, file, line};
    }
};
}  // namespace emu

#define EMU_CAT2_(a, b) a##b
#define EMU_CAT_(a, b) EMU_CAT2_(a, b)
// Registers kernel `fn` under the name "fn" (the PTX symbol of an extern "C" kernel).
#define EMU_KERNEL(fn) EMU_KERNEL_AS(#fn, fn)
// Registers kernel `fn` under another name (emulator-only; used by the duplicate-name probe).
#define EMU_KERNEL_AS(name, fn)                                                   \
    [[maybe_unused]] static const int EMU_CAT_(emu_registered_, __COUNTER__) = \
        ::emu::register_kernel(::emu::Thunk<&fn>::info(name, __FILE__, __LINE__))
// Dynamic shared memory (the size is the launch's shared_bytes).
#define EMU_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dyn_smem())

// A failed device-side assert ends the launch with an error (on the GPU it traps the kernel)
// instead of aborting the host process.
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : ::emu::fail("assertion `%s` failed at %s:%d", #e, __FILE__, __LINE__))
#endif

// ---------------------------------------------------------------------------------------------
// Vector types (CUDA's alignments).
// ---------------------------------------------------------------------------------------------
#define EMU_VEC2(name, T, A) \
    struct __attribute__((aligned(A))) name { T x, y; };
#define EMU_VEC3(name, T) \
    struct name { T x, y, z; };
#define EMU_VEC4(name, T, A) \
    struct __attribute__((aligned(A))) name { T x, y, z, w; };
EMU_VEC2(char2, signed char, 2)
EMU_VEC2(uchar2, unsigned char, 2)
EMU_VEC4(char4, signed char, 4)
EMU_VEC4(uchar4, unsigned char, 4)
EMU_VEC2(short2, short, 4)
EMU_VEC2(ushort2, unsigned short, 4)
EMU_VEC4(short4, short, 8)
EMU_VEC4(ushort4, unsigned short, 8)
EMU_VEC2(int2, int, 8)
EMU_VEC3(int3, int)
EMU_VEC4(int4, int, 16)
EMU_VEC2(uint2, unsigned int, 8)
EMU_VEC4(uint4, unsigned int, 16)
EMU_VEC2(float2, float, 8)
EMU_VEC3(float3, float)
EMU_VEC4(float4, float, 16)
EMU_VEC2(double2, double, 16)
EMU_VEC2(longlong2, long long, 16)
EMU_VEC2(ulonglong2, unsigned long long, 16)
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) { return {x, y, z, w}; }
inline short2 make_short2(short x, short y) { return {x, y}; }
inline ushort2 make_ushort2(unsigned short x, unsigned short y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline longlong2 make_longlong2(long long x, long long y) { return {x, y}; }
inline ulonglong2 make_ulonglong2(unsigned long long x, unsigned long long y) { return {x, y}; }

// ---------------------------------------------------------------------------------------------
// CUDA's global min/max overload set (std::min(int, unsigned) would not compile).
// ---------------------------------------------------------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(long long a, unsigned long long b) { return min(static_cast<unsigned long long>(a), b); }
inline unsigned long long max(long long a, unsigned long long b) { return max(static_cast<unsigned long long>(a), b); }
inline unsigned long long min(unsigned long long a, long long b) { return min(a, static_cast<unsigned long long>(b)); }
inline unsigned long long max(unsigned long long a, long long b) { return max(a, static_cast<unsigned long long>(b)); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(static_cast<double>(a), b); }
inline double max(float a, double b) { return fmax(static_cast<double>(a), b); }
inline double min(double a, float b) { return fmin(a, static_cast<double>(b)); }
inline double max(double a, float b) { return fmax(a, static_cast<double>(b)); }

// ---------------------------------------------------------------------------------------------
// Math intrinsics. The fast-math ones are computed exactly here (the GPU's are approximate, a few
// ulp): compare kernel results that use them with a tolerance.
// ---------------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
    *s = sinf(x);
    *c = cosf(x);
}
inline float __tanhf(float x) { return tanhf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
// NaN -> 0, then clamp to [0, 1].
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline float saturate(float x) { return __saturatef(x); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }

// Float -> integer conversions saturate and map NaN to 0, like cvt.rni/rzi.sat on the GPU.
namespace emu {
template <class I, class F>
inline I sat_convert(F v) {
    if (v != v) return 0;
    if (v <= static_cast<F>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
    if (v >= static_cast<F>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
    return static_cast<I>(v);
}
}  // namespace emu
inline int __float2int_rn(float x) { return emu::sat_convert<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return emu::sat_convert<int>(truncf(x)); }
inline int __float2int_rd(float x) { return emu::sat_convert<int>(floorf(x)); }
inline int __float2int_ru(float x) { return emu::sat_convert<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return emu::sat_convert<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return emu::sat_convert<unsigned>(truncf(x)); }
inline long long __float2ll_rn(float x) { return emu::sat_convert<long long>(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return emu::sat_convert<long long>(truncf(x)); }
inline int __double2int_rn(double x) { return emu::sat_convert<int>(nearbyint(x)); }
inline int __double2int_rz(double x) { return emu::sat_convert<int>(trunc(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __ull2float_rn(unsigned long long x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }

// Bit casts.
inline int __float_as_int(float x) { return emu::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return emu::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return emu::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return emu::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return emu::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return emu::bit_cast<double>(x); }
inline int __double2hiint(double x) { return static_cast<int>(emu::bit_cast<unsigned long long>(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(emu::bit_cast<unsigned long long>(x)); }
inline double __hiloint2double(int hi, int lo) {
    return emu::bit_cast<double>((static_cast<unsigned long long>(static_cast<unsigned>(hi)) << 32) |
                                 static_cast<unsigned>(lo));
}

// Integer intrinsics.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
    return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) | __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) {
        unsigned sel = (s >> (4 * i)) & 7u;
        r |= static_cast<unsigned>((v >> (8 * sel)) & 0xffu) << (8 * i);
    }
    return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
    unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned>(v >> (shift & 31u));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
    unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned>((v << (shift > 32u ? 32u : shift)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
    unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned>(v >> (shift > 32u ? 32u : shift));
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }

// Cache-hinted loads and stores are plain accesses.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// Memory fences: blocks of a launch may run on different OS threads.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------------------------------------
// Barriers, warp shuffles and votes.
// ---------------------------------------------------------------------------------------------
inline void __syncthreads() { emu::syncthreads(); }
inline int __syncthreads_count(int pred) { return emu::syncthreads_count(pred); }
inline int __syncthreads_and(int pred) {
    return emu::syncthreads_count(pred) == static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred) { return emu::syncthreads_count(pred) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }
inline unsigned __activemask() { return emu::active_mask(); }

namespace emu {
enum class Shfl { Idx, Up, Down, Xor };
// PTX shfl.sync semantics with c = ((32 - width) << 8) | clamp: the source lane j is computed
// inside the caller's width-segment; an out-of-segment source (and a lane that does not exist)
// yields the caller's own value.
template <class T>
inline T shfl(Shfl op, unsigned mask, T var, int b, int width, const char* what) {
    static_assert(sizeof(T) <= 64 && std::is_trivially_copyable_v<T>, "shuffle type");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
        fail("%s: width %d is not a power of two in [1, 32]", what, width);
    }
    unsigned part;
    const unsigned char* slots = warp_exchange(mask, &var, sizeof(T), what, &part);
    const int lane = static_cast<int>(lane_id());
    const int segmask = 32 - width;  // high bits select the segment
    const int seg_lo = lane & segmask;
    const int seg_hi = seg_lo | (31 & ~segmask);
    int j;
    bool ok;
    switch (op) {
        case Shfl::Idx:
            j = seg_lo | (b & 31 & ~segmask);
            ok = j <= seg_hi;
            break;
        case Shfl::Up:
            j = lane - b;
            ok = j >= seg_lo;
            break;
        case Shfl::Down:
            j = lane + b;
            ok = j <= seg_hi;
            break;
        default:
            j = lane ^ (b & 31);
            ok = j <= seg_hi;
            break;
    }
    // A source outside the segment, or one that did not take part (exited, or beyond a partial
    // last warp; undefined in CUDA), yields the caller's own value.
    if (!ok || j < 0 || j > 31 || !((part >> j) & 1u)) return var;
    T r;
    std::memcpy(&r, slots + 64 * j, sizeof(T));
    return r;
}
template <class T>
inline unsigned match_any(unsigned mask, T v) {
    unsigned lanes, r = 0;
    const unsigned char* s = warp_exchange(mask, &v, sizeof(T), "__match_any_sync", &lanes);
    for (int j = 0; j < 32; ++j) {
        if ((lanes >> j) & 1u) {
            if (std::memcmp(s + 64 * j, &v, sizeof(T)) == 0) r |= 1u << j;
        }
    }
    return r;
}
template <class T>
inline unsigned match_all(unsigned mask, T v, int* pred) {
    unsigned lanes;
    const unsigned char* s = warp_exchange(mask, &v, sizeof(T), "__match_all_sync", &lanes);
    for (int j = 0; j < 32; ++j) {
        if (((lanes >> j) & 1u) && std::memcmp(s + 64 * j, &v, sizeof(T)) != 0) {
            *pred = 0;
            return 0;
        }
    }
    *pred = 1;
    return lanes;
}
// Reads every existing lane's int from an exchange (votes, __reduce_*_sync).
template <class F>
inline void for_lanes(const unsigned char* slots, unsigned lanes, F f) {
    for (int j = 0; j < 32; ++j) {
        if ((lanes >> j) & 1u) {
            int v;
            std::memcpy(&v, slots + 64 * j, sizeof(int));
            f(j, v);
        }
    }
}
}  // namespace emu

#define EMU_SHFL_OVERLOADS(T)                                                                   \
    inline T __shfl_sync(unsigned mask, T var, int src, int width = 32) {                       \
        return emu::shfl<T>(emu::Shfl::Idx, mask, var, src, width, "__shfl_sync");               \
    }                                                                                           \
    inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {             \
        return emu::shfl<T>(emu::Shfl::Up, mask, var, static_cast<int>(delta), width, "__shfl_up_sync"); \
    }                                                                                           \
    inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {           \
        return emu::shfl<T>(emu::Shfl::Down, mask, var, static_cast<int>(delta), width, "__shfl_down_sync"); \
    }                                                                                           \
    inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {             \
        return emu::shfl<T>(emu::Shfl::Xor, mask, var, lane_mask, width, "__shfl_xor_sync");     \
    }
EMU_SHFL_OVERLOADS(int)
EMU_SHFL_OVERLOADS(unsigned int)
EMU_SHFL_OVERLOADS(long)
EMU_SHFL_OVERLOADS(unsigned long)
EMU_SHFL_OVERLOADS(long long)
EMU_SHFL_OVERLOADS(unsigned long long)
EMU_SHFL_OVERLOADS(float)
EMU_SHFL_OVERLOADS(double)

namespace emu {
// Ballot over the participating lanes; *part receives them.
inline unsigned vote(unsigned mask, int pred, const char* what, unsigned* part) {
    int p = pred != 0;
    const unsigned char* s = warp_exchange(mask, &p, sizeof(int), what, part);
    unsigned r = 0;
    for_lanes(s, *part, [&](int j, int v) { r |= static_cast<unsigned>(v) << j; });
    return r;
}
}  // namespace emu
inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned part;
    return emu::vote(mask, pred, "__ballot_sync", &part);
}
inline int __any_sync(unsigned mask, int pred) {
    unsigned part;
    return emu::vote(mask, pred, "__any_sync", &part) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
    unsigned part;
    return emu::vote(mask, pred, "__all_sync", &part) == part;
}
inline int __uni_sync(unsigned mask, int pred) {
    unsigned part;
    const unsigned b = emu::vote(mask, pred, "__uni_sync", &part);
    return b == 0 || b == part;
}
inline unsigned __match_any_sync(unsigned mask, unsigned v) { return emu::match_any(mask, v); }
inline unsigned __match_any_sync(unsigned mask, int v) { return emu::match_any(mask, v); }
inline unsigned __match_any_sync(unsigned mask, unsigned long long v) { return emu::match_any(mask, v); }
inline unsigned __match_any_sync(unsigned mask, long long v) { return emu::match_any(mask, v); }
inline unsigned __match_any_sync(unsigned mask, float v) { return emu::match_any(mask, v); }
inline unsigned __match_any_sync(unsigned mask, double v) { return emu::match_any(mask, v); }
inline unsigned __match_all_sync(unsigned mask, unsigned v, int* pred) { return emu::match_all(mask, v, pred); }
inline unsigned __match_all_sync(unsigned mask, int v, int* pred) { return emu::match_all(mask, v, pred); }
inline unsigned __match_all_sync(unsigned mask, unsigned long long v, int* pred) { return emu::match_all(mask, v, pred); }
inline unsigned __match_all_sync(unsigned mask, long long v, int* pred) { return emu::match_all(mask, v, pred); }
inline unsigned __match_all_sync(unsigned mask, float v, int* pred) { return emu::match_all(mask, v, pred); }
inline unsigned __match_all_sync(unsigned mask, double v, int* pred) { return emu::match_all(mask, v, pred); }

#define EMU_REDUCE_SYNC(name, T, init, OP)                                                     \
    inline T name(unsigned mask, T value) {                                                    \
        unsigned part;                                                                         \
        const unsigned char* s = emu::warp_exchange(mask, &value, sizeof(T), #name, &part);    \
        T r = init;                                                                            \
        emu::for_lanes(s, part, [&](int, int raw) {                                            \
            T v = static_cast<T>(raw);                                                         \
            r = OP;                                                                            \
        });                                                                                    \
        return r;                                                                              \
    }
EMU_REDUCE_SYNC(__reduce_add_sync, unsigned, 0u, r + v)
EMU_REDUCE_SYNC(__reduce_add_sync, int, 0, static_cast<int>(static_cast<unsigned>(r) + static_cast<unsigned>(v)))
EMU_REDUCE_SYNC(__reduce_min_sync, unsigned, 0xffffffffu, (v < r ? v : r))
EMU_REDUCE_SYNC(__reduce_min_sync, int, INT_MAX, (v < r ? v : r))
EMU_REDUCE_SYNC(__reduce_max_sync, unsigned, 0u, (v > r ? v : r))
EMU_REDUCE_SYNC(__reduce_max_sync, int, INT_MIN, (v > r ? v : r))
EMU_REDUCE_SYNC(__reduce_and_sync, unsigned, 0xffffffffu, r & v)
EMU_REDUCE_SYNC(__reduce_or_sync, unsigned, 0u, r | v)
EMU_REDUCE_SYNC(__reduce_xor_sync, unsigned, 0u, r ^ v)
#undef EMU_REDUCE_SYNC

// ---------------------------------------------------------------------------------------------
// Atomics on std::atomic_ref: blocks may run in parallel (workers > 1), so they must be real.
// The set of overloads is CUDA's (no float atomicMax, for example).
// ---------------------------------------------------------------------------------------------
namespace emu {
template <class T>
inline std::atomic_ref<T> aref(T* p) {
    return std::atomic_ref<T>(*p);
}
template <class T, class F>
inline T atomic_update(T* p, F f) {
    auto a = aref(p);
    T old = a.load(std::memory_order_relaxed);
    while (!a.compare_exchange_weak(old, f(old), std::memory_order_seq_cst, std::memory_order_relaxed)) {
    }
    return old;
}
}  // namespace emu

inline int atomicAdd(int* p, int v) { return emu::aref(p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu::aref(p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return emu::aref(p).fetch_add(v); }
inline float atomicAdd(float* p, float v) {
    return emu::atomic_update(p, [v](float o) { return o + v; });
}
inline double atomicAdd(double* p, double v) {
    return emu::atomic_update(p, [v](double o) { return o + v; });
}
inline int atomicSub(int* p, int v) { return emu::aref(p).fetch_sub(v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return emu::aref(p).fetch_sub(v); }
inline int atomicExch(int* p, int v) { return emu::aref(p).exchange(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return emu::aref(p).exchange(v); }
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) { return emu::aref(p).exchange(v); }
inline float atomicExch(float* p, float v) { return emu::aref(p).exchange(v); }
#define EMU_ATOMIC_MINMAX(T)                                                                  \
    inline T atomicMin(T* p, T v) {                                                          \
        return emu::atomic_update(p, [v](T o) { return v < o ? v : o; });                    \
    }                                                                                        \
    inline T atomicMax(T* p, T v) {                                                          \
        return emu::atomic_update(p, [v](T o) { return v > o ? v : o; });                    \
    }
EMU_ATOMIC_MINMAX(int)
EMU_ATOMIC_MINMAX(unsigned)
EMU_ATOMIC_MINMAX(long long)
EMU_ATOMIC_MINMAX(unsigned long long)
#undef EMU_ATOMIC_MINMAX
#define EMU_ATOMIC_CAS(T)                                                   \
    inline T atomicCAS(T* p, T compare, T v) {                             \
        emu::aref(p).compare_exchange_strong(compare, v);                  \
        return compare;                                                    \
    }
EMU_ATOMIC_CAS(int)
EMU_ATOMIC_CAS(unsigned)
EMU_ATOMIC_CAS(unsigned long long)
EMU_ATOMIC_CAS(unsigned short)
#undef EMU_ATOMIC_CAS
#define EMU_ATOMIC_BITS(T)                                                                   \
    inline T atomicAnd(T* p, T v) { return emu::aref(p).fetch_and(v); }                     \
    inline T atomicOr(T* p, T v) { return emu::aref(p).fetch_or(v); }                       \
    inline T atomicXor(T* p, T v) { return emu::aref(p).fetch_xor(v); }
EMU_ATOMIC_BITS(int)
EMU_ATOMIC_BITS(unsigned)
EMU_ATOMIC_BITS(unsigned long long)
#undef EMU_ATOMIC_BITS
// ((old >= limit) ? 0 : old + 1) and (((old == 0) || (old > limit)) ? limit : old - 1).
inline unsigned atomicInc(unsigned* p, unsigned limit) {
    return emu::atomic_update(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
    return emu::atomic_update(p, [limit](unsigned o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: bit-exact conversions, round-to-nearest-even, any NaN -> 0x7fff and a
// half NaN -> float 0x7fffffff (CUDA's cuda_fp16.hpp / cuda_bf16.hpp host path). Trivial default
// constructors, so that __shared__ arrays of them are allowed.
// ---------------------------------------------------------------------------------------------
namespace emu {
inline unsigned short float_to_half_bits(float f) {
    const unsigned x = bit_cast<unsigned>(f);
    const unsigned sign = (x >> 16) & 0x8000u;
    const unsigned a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;                          // NaN
    if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
    if (a >= 0x38800000u) {                                       // normal half
        unsigned r = a - 0x38000000u;                             // rebias the exponent (127 -> 15)
        r += 0x0fffu + ((r >> 13) & 1u);                          // round to nearest even
        return static_cast<unsigned short>(sign | (r >> 13));
    }
    if (a <= 0x33000000u) return static_cast<unsigned short>(sign);  // <= 2^-25 rounds to 0
    // Subnormal half: the value in units of 2^-24 is m >> (126 - e).
    const unsigned e = a >> 23;
    const unsigned m = (a & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126u - e;  // 14 ..= 24
    unsigned q = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1u);
    const unsigned halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<unsigned short>(sign | q);
}
inline float half_bits_to_float(unsigned short h) {
    const unsigned sign = static_cast<unsigned>(h & 0x8000u) << 16;
    const unsigned em = h & 0x7fffu;
    if (em >= 0x7c00u) return bit_cast<float>(em == 0x7c00u ? (sign | 0x7f800000u) : 0x7fffffffu);
    if (em >= 0x0400u) return bit_cast<float>(sign | ((em << 13) + 0x38000000u));
    // Zero or subnormal: em * 2^-24 is exact in f32.
    return bit_cast<float>(sign | bit_cast<unsigned>(static_cast<float>(em) * 5.9604644775390625e-8f));
}
inline unsigned short float_to_bf16_bits(float f) {
    const unsigned x = bit_cast<unsigned>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(unsigned short b) { return bit_cast<float>(static_cast<unsigned>(b) << 16); }
}  // namespace emu

struct __half_raw {
    unsigned short x;
};
struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __align__(2) __half {
    unsigned short __x;
    __half() = default;
    __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(emu::float_to_half_bits(f)) {}
    __half(double d) : __x(emu::float_to_half_bits(static_cast<float>(d))) {}
    __half(int i) : __x(emu::float_to_half_bits(static_cast<float>(i))) {}
    __half(unsigned int i) : __x(emu::float_to_half_bits(static_cast<float>(i))) {}
    __half(long long i) : __x(emu::float_to_half_bits(static_cast<float>(i))) {}
    __half(unsigned long long i) : __x(emu::float_to_half_bits(static_cast<float>(i))) {}
    __half(short i) : __x(emu::float_to_half_bits(static_cast<float>(i))) {}
    __half(unsigned short i) : __x(emu::float_to_half_bits(static_cast<float>(i))) {}
    operator float() const { return emu::half_bits_to_float(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
    __half& operator=(const __half_raw& r) {
        __x = r.x;
        return *this;
    }
};
struct __align__(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(emu::float_to_bf16_bits(f)) {}
    __nv_bfloat16(double d) : __x(emu::float_to_bf16_bits(static_cast<float>(d))) {}
    __nv_bfloat16(int i) : __x(emu::float_to_bf16_bits(static_cast<float>(i))) {}
    __nv_bfloat16(unsigned int i) : __x(emu::float_to_bf16_bits(static_cast<float>(i))) {}
    __nv_bfloat16(long long i) : __x(emu::float_to_bf16_bits(static_cast<float>(i))) {}
    __nv_bfloat16(unsigned long long i) : __x(emu::float_to_bf16_bits(static_cast<float>(i))) {}
    __nv_bfloat16(short i) : __x(emu::float_to_bf16_bits(static_cast<float>(i))) {}
    __nv_bfloat16(unsigned short i) : __x(emu::float_to_bf16_bits(static_cast<float>(i))) {}
    operator float() const { return emu::bf16_bits_to_float(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) {
        __x = r.x;
        return *this;
    }
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;
struct __align__(4) __half2 {
    __half x, y;
};
struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
using half2 = __half2;
using nv_bfloat162 = __nv_bfloat162;

namespace emu {
inline __half mkh(unsigned short b) {
    __half h;
    h.__x = b;
    return h;
}
inline __nv_bfloat16 mkb(unsigned short b) {
    __nv_bfloat16 h;
    h.__x = b;
    return h;
}
inline float f(__half h) { return half_bits_to_float(h.__x); }
inline float f(__nv_bfloat16 h) { return bf16_bits_to_float(h.__x); }
// An fp16/bf16 fma computed in double and rounded once more (near-exact: a double-rounding tie
// can differ in rare cases).
inline float fma_round(float a, float b, float c) {
    return static_cast<float>(fma(static_cast<double>(a), static_cast<double>(b), static_cast<double>(c)));
}
}  // namespace emu

// Conversions.
inline __half __float2half(float f) { return emu::mkh(emu::float_to_half_bits(f)); }
inline __half __float2half_rn(float f) { return emu::mkh(emu::float_to_half_bits(f)); }
inline float __half2float(__half h) { return emu::f(h); }
inline __half __double2half(double d) { return __float2half(static_cast<float>(d)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return emu::mkb(emu::float_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return emu::mkb(emu::float_to_bf16_bits(f)); }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::f(h); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16(static_cast<float>(d)); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) { return emu::mkh(b); }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __short_as_half(short b) { return emu::mkh(static_cast<unsigned short>(b)); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return emu::mkb(b); }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return static_cast<short>(h.__x); }
inline __nv_bfloat16 __short_as_bfloat16(short b) { return emu::mkb(static_cast<unsigned short>(b)); }
inline __half __int2half_rn(int i) { return __float2half(static_cast<float>(i)); }
inline int __half2int_rn(__half h) { return __float2int_rn(emu::f(h)); }
inline int __half2int_rz(__half h) { return __float2int_rz(emu::f(h)); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __float2bfloat16(static_cast<float>(i)); }
inline int __bfloat162int_rn(__nv_bfloat16 h) { return __float2int_rn(emu::f(h)); }
inline int __bfloat162int_rz(__nv_bfloat16 h) { return __float2int_rz(emu::f(h)); }
inline __nv_bfloat16 __half2bfloat16(__half h) { return __float2bfloat16(emu::f(h)); }
// Pairs.
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 make_half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }
inline __half2 __float2half2_rn(float a) { return __half2{__float2half(a), __float2half(a)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return float2{emu::f(h.x), emu::f(h.y)}; }
inline float __low2float(__half2 h) { return emu::f(h.x); }
inline float __high2float(__half2 h) { return emu::f(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162{a, a}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(a)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{emu::f(h.x), emu::f(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return emu::f(h.x); }
inline float __high2float(__nv_bfloat162 h) { return emu::f(h.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }

// Arithmetic: computed in f32 and rounded once, which is exact for + - * / (24 >= 2*11 + 2).
#define EMU_HALF_ARITH(H, TOF, FROM)                                                              \
    inline H __hadd(H a, H b) { return FROM(TOF(a) + TOF(b)); }                                   \
    inline H __hsub(H a, H b) { return FROM(TOF(a) - TOF(b)); }                                   \
    inline H __hmul(H a, H b) { return FROM(TOF(a) * TOF(b)); }                                   \
    inline H __hdiv(H a, H b) { return FROM(TOF(a) / TOF(b)); }                                   \
    inline H __hadd_rn(H a, H b) { return FROM(TOF(a) + TOF(b)); }                                \
    inline H __hsub_rn(H a, H b) { return FROM(TOF(a) - TOF(b)); }                                \
    inline H __hmul_rn(H a, H b) { return FROM(TOF(a) * TOF(b)); }                                \
    inline H __hfma(H a, H b, H c) { return FROM(emu::fma_round(TOF(a), TOF(b), TOF(c))); }       \
    inline H __hneg(H a) { H r = a; r.__x ^= 0x8000u; return r; }                                 \
    inline H __habs(H a) { H r = a; r.__x &= 0x7fffu; return r; }                                 \
    inline H __hmax(H a, H b) { return FROM(fmaxf(TOF(a), TOF(b))); }                             \
    inline H __hmin(H a, H b) { return FROM(fminf(TOF(a), TOF(b))); }                             \
    inline bool __heq(H a, H b) { return TOF(a) == TOF(b); }                                      \
    inline bool __hne(H a, H b) { return TOF(a) != TOF(b); }                                      \
    inline bool __hlt(H a, H b) { return TOF(a) < TOF(b); }                                       \
    inline bool __hle(H a, H b) { return TOF(a) <= TOF(b); }                                      \
    inline bool __hgt(H a, H b) { return TOF(a) > TOF(b); }                                       \
    inline bool __hge(H a, H b) { return TOF(a) >= TOF(b); }                                      \
    inline bool __hisnan(H a) { return (a.__x & 0x7fffu) > INF_BITS; }                            \
    inline int __hisinf(H a) { return (a.__x & 0x7fffu) == INF_BITS ? ((a.__x & 0x8000u) ? -1 : 1) : 0; } \
    inline H operator+(const H& a, const H& b) { return __hadd(a, b); }                           \
    inline H operator-(const H& a, const H& b) { return __hsub(a, b); }                           \
    inline H operator*(const H& a, const H& b) { return __hmul(a, b); }                           \
    inline H operator/(const H& a, const H& b) { return __hdiv(a, b); }                           \
    inline H operator-(const H& a) { return __hneg(a); }                                          \
    inline H operator+(const H& a) { return a; }                                                  \
    inline H& operator+=(H& a, const H& b) { return a = __hadd(a, b); }                           \
    inline H& operator-=(H& a, const H& b) { return a = __hsub(a, b); }                           \
    inline H& operator*=(H& a, const H& b) { return a = __hmul(a, b); }                           \
    inline H& operator/=(H& a, const H& b) { return a = __hdiv(a, b); }                           \
    inline bool operator==(const H& a, const H& b) { return __heq(a, b); }                        \
    inline bool operator!=(const H& a, const H& b) { return __hne(a, b); }                        \
    inline bool operator<(const H& a, const H& b) { return __hlt(a, b); }                         \
    inline bool operator<=(const H& a, const H& b) { return __hle(a, b); }                        \
    inline bool operator>(const H& a, const H& b) { return __hgt(a, b); }                         \
    inline bool operator>=(const H& a, const H& b) { return __hge(a, b); }
#define INF_BITS 0x7c00u
EMU_HALF_ARITH(__half, emu::f, __float2half)
#undef INF_BITS
#define INF_BITS 0x7f80u
EMU_HALF_ARITH(__nv_bfloat16, emu::f, __float2bfloat16)
#undef INF_BITS
#undef EMU_HALF_ARITH

#define EMU_HALF2_ARITH(H2, H)                                                                 \
    inline H2 __hadd2(H2 a, H2 b) { return H2{__hadd(a.x, b.x), __hadd(a.y, b.y)}; }           \
    inline H2 __hsub2(H2 a, H2 b) { return H2{__hsub(a.x, b.x), __hsub(a.y, b.y)}; }           \
    inline H2 __hmul2(H2 a, H2 b) { return H2{__hmul(a.x, b.x), __hmul(a.y, b.y)}; }           \
    inline H2 __h2div(H2 a, H2 b) { return H2{__hdiv(a.x, b.x), __hdiv(a.y, b.y)}; }           \
    inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
    inline H2 __hneg2(H2 a) { return H2{__hneg(a.x), __hneg(a.y)}; }                           \
    inline H2 __habs2(H2 a) { return H2{__habs(a.x), __habs(a.y)}; }                           \
    inline H2 __hmax2(H2 a, H2 b) { return H2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }           \
    inline H2 __hmin2(H2 a, H2 b) { return H2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }           \
    inline H2 operator+(const H2& a, const H2& b) { return __hadd2(a, b); }                    \
    inline H2 operator-(const H2& a, const H2& b) { return __hsub2(a, b); }                    \
    inline H2 operator*(const H2& a, const H2& b) { return __hmul2(a, b); }                    \
    inline H2 operator/(const H2& a, const H2& b) { return __h2div(a, b); }                    \
    inline H2& operator+=(H2& a, const H2& b) { return a = __hadd2(a, b); }                    \
    inline H2& operator*=(H2& a, const H2& b) { return a = __hmul2(a, b); }
EMU_HALF2_ARITH(__half2, __half)
EMU_HALF2_ARITH(__nv_bfloat162, __nv_bfloat16)
#undef EMU_HALF2_ARITH
inline __half2 __lowhigh2highlow(__half2 a) { return __half2{a.y, a.x}; }
inline __nv_bfloat162 __lowhigh2highlow(__nv_bfloat162 a) { return __nv_bfloat162{a.y, a.x}; }
// Elementary functions of half values, through f32 (hexp, hsqrt, ...).
inline __half hexp(__half a) { return __float2half(expf(emu::f(a))); }
inline __half hlog(__half a) { return __float2half(logf(emu::f(a))); }
inline __half hsqrt(__half a) { return __float2half(sqrtf(emu::f(a))); }
inline __half hrsqrt(__half a) { return __float2half(1.0f / sqrtf(emu::f(a))); }
inline __half hrcp(__half a) { return __float2half(1.0f / emu::f(a)); }
inline __nv_bfloat16 hexp(__nv_bfloat16 a) { return __float2bfloat16(expf(emu::f(a))); }
inline __nv_bfloat16 hlog(__nv_bfloat16 a) { return __float2bfloat16(logf(emu::f(a))); }
inline __nv_bfloat16 hsqrt(__nv_bfloat16 a) { return __float2bfloat16(sqrtf(emu::f(a))); }
inline __nv_bfloat16 hrsqrt(__nv_bfloat16 a) { return __float2bfloat16(1.0f / sqrtf(emu::f(a))); }
inline __nv_bfloat16 hrcp(__nv_bfloat16 a) { return __float2bfloat16(1.0f / emu::f(a)); }

EMU_SHFL_OVERLOADS(__half)
EMU_SHFL_OVERLOADS(__half2)
EMU_SHFL_OVERLOADS(__nv_bfloat16)
EMU_SHFL_OVERLOADS(__nv_bfloat162)
#undef EMU_SHFL_OVERLOADS

inline __half atomicAdd(__half* p, __half v) {
    unsigned short old = emu::atomic_update(&p->__x, [v](unsigned short o) {
        return emu::float_to_half_bits(emu::half_bits_to_float(o) + emu::f(v));
    });
    return emu::mkh(old);
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
    unsigned short old = emu::atomic_update(&p->__x, [v](unsigned short o) {
        return emu::float_to_bf16_bits(emu::bf16_bits_to_float(o) + emu::f(v));
    });
    return emu::mkb(old);
}
inline __half2 atomicAdd(__half2* p, __half2 v) {
    unsigned* w = reinterpret_cast<unsigned*>(p);
    unsigned old = emu::atomic_update(w, [v](unsigned o) {
        __half2 a = emu::bit_cast<__half2>(o);
        return emu::bit_cast<unsigned>(__hadd2(a, v));
    });
    return emu::bit_cast<__half2>(old);
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* p, __nv_bfloat162 v) {
    unsigned* w = reinterpret_cast<unsigned*>(p);
    unsigned old = emu::atomic_update(w, [v](unsigned o) {
        __nv_bfloat162 a = emu::bit_cast<__nv_bfloat162>(o);
        return emu::bit_cast<unsigned>(__hadd2(a, v));
    });
    return emu::bit_cast<__nv_bfloat162>(old);
}

// ---------------------------------------------------------------------------------------------
// nvcuda::wmma. A fragment holds the WHOLE tile (num_elements = rows * cols, not the per-lane
// share of the GPU), so only lane-independent element-wise use of x[] is portable: code that
// assumes which elements a lane holds is unspecified in CUDA and breaks here, as it should.
// load/store are warp collectives ("waits until all warp lanes have arrived"); every lane does
// the whole operation redundantly (stores write identical values).
// ---------------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct dims<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};
template <int M, int N, int K>
constexpr bool shape_ok = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) || (M == 8 && N == 32 && K == 16);
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(detail::shape_ok<M, N, K>, "wmma: supported shapes are 16x16x16, 32x8x16, 8x32x16");
    using element_type = T;
    using storage_element_type = T;
    static constexpr int rows = detail::dims<Use, M, N, K>::rows;
    static constexpr int cols = detail::dims<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    // Element (r, c) of the tile is x[r * cols + c].
    T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
    const T t = static_cast<T>(v);
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = t;
}

// matrix_a / matrix_b: the layout is part of the fragment type.
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
    static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "matrix fragment needs a layout");
    emu::syncwarp(0xffffffffu);
    using F = fragment<Use, M, N, K, T, L>;
    for (int r = 0; r < F::rows; ++r) {
        for (int c = 0; c < F::cols; ++c) {
            f.x[r * F::cols + c] = std::is_same_v<L, row_major> ? p[static_cast<size_t>(r) * ldm + c]
                                                                 : p[static_cast<size_t>(c) * ldm + r];
        }
    }
}
// Accumulators: the memory layout is an argument.
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
    emu::syncwarp(0xffffffffu);
    for (int r = 0; r < M; ++r) {
        for (int c = 0; c < N; ++c) {
            f.x[r * N + c] = layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r];
        }
    }
}
template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
    emu::syncwarp(0xffffffffu);
    for (int r = 0; r < M; ++r) {
        for (int c = 0; c < N; ++c) {
            T& d = layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r];
            d = f.x[r * N + c];
        }
    }
}
// D = A * B + C with f32 accumulation (inputs converted to f32 once per call). D may alias C.
template <int M, int N, int K, class TA, class LA, class LB, class TC, class TD>
inline void mma_sync(fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
    static_assert(std::is_same_v<TA, __half> || std::is_same_v<TA, __nv_bfloat16>, "wmma inputs: __half or __nv_bfloat16");
    static_assert(std::is_same_v<TD, float> || std::is_same_v<TA, __half>, "bf16 wmma accumulates in float");
    float fa[M * K], fb[K * N], acc[M * N];
    for (int i = 0; i < M * K; ++i) fa[i] = static_cast<float>(a.x[i]);
    for (int i = 0; i < K * N; ++i) fb[i] = static_cast<float>(b.x[i]);
    for (int i = 0; i < M * N; ++i) acc[i] = static_cast<float>(c.x[i]);
    for (int r = 0; r < M; ++r) {
        for (int k = 0; k < K; ++k) {
            const float av = fa[r * K + k];
            for (int col = 0; col < N; ++col) acc[r * N + col] += av * fb[k * N + col];
        }
    }
    for (int i = 0; i < M * N; ++i) d.x[i] = static_cast<TD>(acc[i]);
}
}  // namespace wmma
}  // namespace nvcuda
