// Host branch of common/arch.cuh: the CUDA vocabulary and every mole_* wrapper, for kernels
// compiled as C++ and run on the CPU by hostexec (each CUDA thread a fiber, blocks one after
// another). Selected with -DMOLE_HOST_ARCH_HEADER='"common/host/runtime.h"' (hostexec/build.rs).
//
// How the CUDA constructs map:
// - MOLE_GLOBAL (and __global__) and __shared__ expand to marker tokens that hostexec/build.rs
//   rewrites after preprocessing: a kernel is registered under its name; `extern __shared__ T
//   x[];` becomes a pointer to the fixed dynamic shared region; every other __shared__ variable
//   becomes a reference to storage in the runtime's shared arena, which is poisoned before each
//   block. One copy per declaration is enough: one block runs at a time (blocks in flight
//   together have their shared memory saved and restored as the scheduler switches).
// - Collectives (__syncthreads, shuffles, votes, ldmatrix, mma) take the caller's file and line
//   as defaulted arguments, so deadlock and divergence reports name the call site.
// - Atomics are plain read-modify-writes: fibers switch only inside collectives.
// Every mole_* function of the device branch needs its twin here with the same signature.
#pragma once

#include <math.h>

#include "api.h"
#include "mma.h"

#define MOLE_HOST_EXEC 1
#define MOLE_GLOBAL __mole_hx_global__
#define MOLE_DEVICE inline
#define MOLE_BOUNDS(threads)
#define MOLE_NO_UNROLL
#define MOLE_OFFSET_OF(T, field) __builtin_offsetof(T, field)

#define __global__ __mole_hx_global__
#define __shared__ __mole_hx_shared__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

#define threadIdx (static_cast<const ::mole_host::uint3&>(::mole_host::g_thread_idx))
#define blockIdx (static_cast<const ::mole_host::uint3&>(::mole_host::g_block_idx))
#define blockDim (static_cast<const ::mole_host::uint3&>(::mole_host::g_block_dim))
#define gridDim (static_cast<const ::mole_host::uint3&>(::mole_host::g_grid_dim))
#define warpSize 32

using dim3 = ::mole_host::dim3;
using uint3 = ::mole_host::uint3;

#define MOLE_HX_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

// ---------------------------------------------------------------------------------------------
// Barriers, shuffles and votes (CUDA names).
// ---------------------------------------------------------------------------------------------

inline void __syncthreads(MOLE_HX_SITE) { ::mole_host::barrier(::mole_host::BarrierKind::Plain, 1, file, line); }
inline int __syncthreads_count(int pred, MOLE_HX_SITE) {
    return ::mole_host::barrier(::mole_host::BarrierKind::Count, pred, file, line);
}
inline int __syncthreads_and(int pred, MOLE_HX_SITE) {
    return ::mole_host::barrier(::mole_host::BarrierKind::And, pred, file, line);
}
inline int __syncthreads_or(int pred, MOLE_HX_SITE) {
    return ::mole_host::barrier(::mole_host::BarrierKind::Or, pred, file, line);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu, MOLE_HX_SITE) {
    ::mole_host::warp_exchange(::mole_host::WarpOp::SyncWarp, mask, 0, 0, 32, file, line);
}
// Global and block memory fences order nothing here: fibers interleave only at collectives.
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace mole_host {
template <class T>
inline T shuffle(WarpOp op, unsigned int mask, T v, int arg, int width, const char* file, int line) {
    static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "shuffle of 4 or 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = warp_exchange(op, mask, bits, arg, width, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace mole_host

template <class T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane, int width = 32, MOLE_HX_SITE) {
    return ::mole_host::shuffle(::mole_host::WarpOp::Shfl, mask, v, src_lane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32, MOLE_HX_SITE) {
    return ::mole_host::shuffle(::mole_host::WarpOp::ShflUp, mask, v, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32, MOLE_HX_SITE) {
    return ::mole_host::shuffle(::mole_host::WarpOp::ShflDown, mask, v, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32, MOLE_HX_SITE) {
    return ::mole_host::shuffle(::mole_host::WarpOp::ShflXor, mask, v, lane_mask, width, file, line);
}
inline unsigned int __ballot_sync(unsigned int mask, int pred, MOLE_HX_SITE) {
    return (unsigned int)::mole_host::warp_exchange(::mole_host::WarpOp::Ballot, mask, pred != 0, 0, 32, file, line);
}
inline int __all_sync(unsigned int mask, int pred, MOLE_HX_SITE) {
    return (int)::mole_host::warp_exchange(::mole_host::WarpOp::All, mask, pred != 0, 0, 32, file, line);
}
inline int __any_sync(unsigned int mask, int pred, MOLE_HX_SITE) {
    return (int)::mole_host::warp_exchange(::mole_host::WarpOp::Any, mask, pred != 0, 0, 32, file, line);
}
template <class T>
inline unsigned int __match_any_sync(unsigned int mask, T value, MOLE_HX_SITE) {
    static_assert(std::is_integral_v<T> && sizeof(T) <= 8, "match on an integer");
    return (unsigned int)::mole_host::warp_exchange(::mole_host::WarpOp::MatchAny, mask, (std::uint64_t)value, 0, 32,
                                                    file, line);
}
inline unsigned int __activemask() { return ::mole_host::active_mask(); }

// ---------------------------------------------------------------------------------------------
// Bits, casts, loads.
// ---------------------------------------------------------------------------------------------

inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned int)v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned int __brev(unsigned int v) {
    unsigned int r = 0;
    for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned int __float_as_uint(float v) {
    unsigned int b;
    std::memcpy(&b, &v, 4);
    return b;
}
inline float __uint_as_float(unsigned int b) {
    float v;
    std::memcpy(&v, &b, 4);
    return v;
}
inline int __float_as_int(float v) { return (int)__float_as_uint(v); }
inline float __int_as_float(int b) { return __uint_as_float((unsigned int)b); }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

// ---------------------------------------------------------------------------------------------
// Atomics: one OS thread, and no fiber switch inside, so a plain read-modify-write is atomic.
// ---------------------------------------------------------------------------------------------

template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T atomicSub(T* p, T v) {
    const T old = *p;
    *p = old - v;
    return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
    const T old = *p;
    *p = v;
    return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
    const T old = *p;
    *p = old > v ? old : v;
    return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
    const T old = *p;
    *p = old < v ? old : v;
    return old;
}
template <class T>
inline T atomicCAS(T* p, T compare, T v) {
    const T old = *p;
    if (old == compare) *p = v;
    return old;
}
template <class T>
inline T atomicAnd(T* p, T v) {
    const T old = *p;
    *p = old & v;
    return old;
}
template <class T>
inline T atomicOr(T* p, T v) {
    const T old = *p;
    *p = old | v;
    return old;
}
template <class T>
inline T atomicXor(T* p, T v) {
    const T old = *p;
    *p = old ^ v;
    return old;
}
// ((old >= v) ? 0 : old + 1) and ((old == 0 || old > v) ? v : old - 1), as CUDA defines them.
inline unsigned int atomicInc(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = old >= v ? 0u : old + 1u;
    return old;
}
inline unsigned int atomicDec(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = (old == 0u || old > v) ? v : old - 1u;
    return old;
}

// ---------------------------------------------------------------------------------------------
// The mole_* wrappers of arch.cuh's device branch, same signatures (plus the defaulted site).
// ---------------------------------------------------------------------------------------------

inline float mole_shfl_xor(float v, int lane_mask, MOLE_HX_SITE) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, 32, file, line);
}
inline int mole_shfl_xor(int v, int lane_mask, MOLE_HX_SITE) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, 32, file, line);
}
inline unsigned int mole_shfl_xor(unsigned int v, int lane_mask, MOLE_HX_SITE) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, 32, file, line);
}
inline float mole_shfl(float v, int src_lane, MOLE_HX_SITE) {
    return __shfl_sync(0xffffffffu, v, src_lane, 32, file, line);
}
inline int mole_shfl(int v, int src_lane, MOLE_HX_SITE) {
    return __shfl_sync(0xffffffffu, v, src_lane, 32, file, line);
}
inline unsigned int mole_shfl_up(unsigned int v, int delta, MOLE_HX_SITE) {
    return __shfl_up_sync(0xffffffffu, v, (unsigned int)delta, 32, file, line);
}
inline unsigned int mole_ballot(bool pred, MOLE_HX_SITE) { return __ballot_sync(0xffffffffu, pred, file, line); }
inline unsigned int mole_match_any(int key, MOLE_HX_SITE) { return __match_any_sync(0xffffffffu, key, file, line); }
inline void mole_syncwarp(MOLE_HX_SITE) { __syncwarp(0xffffffffu, file, line); }
inline int mole_popc(unsigned int v) { return __popc(v); }

inline unsigned int mole_float_bits(float v) { return __float_as_uint(v); }
inline float mole_bits_float(unsigned int b) { return __uint_as_float(b); }

// The C library's single-precision functions; CUDA's differ by up to 2 ulp (see hostexec docs).
inline float mole_expf(float x) { return ::expf(x); }
inline float mole_expm1f(float x) { return ::expm1f(x); }
inline float mole_logf(float x) { return ::logf(x); }
inline float mole_erff(float x) { return ::erff(x); }
inline float mole_fabsf(float x) { return ::fabsf(x); }
