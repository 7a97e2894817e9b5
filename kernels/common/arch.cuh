// The one wrapper around architecture primitives. Kernels use thread/block indices and dims,
// __syncthreads, static and dynamic shared memory, plain arithmetic and the mole_* functions
// below, and nothing else, so that the same sources can also be compiled as C++ for the CPU.
//
// No CUDA toolkit header is included: NVRTC alone compiles this file.
#pragma once

// Fixed-width integers (no <cstdint> under NVRTC).
typedef unsigned short mole_u16;
typedef int mole_i32;
typedef unsigned int mole_u32;
typedef long long mole_i64;
typedef unsigned long long mole_u64;
static_assert(sizeof(mole_u16) == 2 && sizeof(mole_i32) == 4 && sizeof(mole_u32) == 4, "integer widths");
static_assert(sizeof(mole_i64) == 8 && sizeof(mole_u64) == 8, "integer widths");

#define MOLE_WARP_SIZE 32
#define MOLE_FULL_MASK 0xffffffffu

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// ---------------------------------------------------------------------------------------------
// Device branch (NVRTC / nvcc).
// ---------------------------------------------------------------------------------------------
#define MOLE_GLOBAL extern "C" __global__
#define MOLE_DEVICE __device__ __forceinline__
// Upper bound on threads per block, so the compiler budgets registers for it, and one resident
// block per SM as the only occupancy target: without the explicit 1, NVRTC 13's ptxas aims at
// several blocks per SM and caps the tensor-core kernels at 48 registers, which spills.
#define MOLE_BOUNDS(threads) __launch_bounds__(threads, 1)
// Keeps the next loop rolled (where unrolling costs registers for nothing).
#define MOLE_NO_UNROLL _Pragma("unroll 1")
// Unrolls the next (constant-trip) loop fully, so an array it indexes stays in registers.
#define MOLE_UNROLL _Pragma("unroll")

// Warp shuffles and votes, always over the full warp: every kernel keeps all 32 lanes converged
// where it calls them.
MOLE_DEVICE float mole_shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(MOLE_FULL_MASK, v, lane_mask); }
MOLE_DEVICE int mole_shfl_xor(int v, int lane_mask) { return __shfl_xor_sync(MOLE_FULL_MASK, v, lane_mask); }
MOLE_DEVICE mole_u32 mole_shfl_xor(mole_u32 v, int lane_mask) {
    return __shfl_xor_sync(MOLE_FULL_MASK, v, lane_mask);
}
MOLE_DEVICE float mole_shfl(float v, int src_lane) { return __shfl_sync(MOLE_FULL_MASK, v, src_lane); }
MOLE_DEVICE int mole_shfl(int v, int src_lane) { return __shfl_sync(MOLE_FULL_MASK, v, src_lane); }
MOLE_DEVICE mole_u32 mole_shfl_up(mole_u32 v, int delta) { return __shfl_up_sync(MOLE_FULL_MASK, v, delta); }
MOLE_DEVICE mole_u32 mole_ballot(bool pred) { return __ballot_sync(MOLE_FULL_MASK, pred); }
// Lanes holding the same key (sm_70+).
MOLE_DEVICE mole_u32 mole_match_any(int key) { return __match_any_sync(MOLE_FULL_MASK, key); }
MOLE_DEVICE void mole_syncwarp() { __syncwarp(MOLE_FULL_MASK); }
MOLE_DEVICE int mole_popc(mole_u32 v) { return __popc(v); }

// Bit casts.
MOLE_DEVICE mole_u32 mole_float_bits(float v) { return __float_as_uint(v); }
MOLE_DEVICE float mole_bits_float(mole_u32 b) { return __uint_as_float(b); }

// Math (the accurate library versions: NVRTC is never given --use_fast_math).
MOLE_DEVICE float mole_expf(float x) { return expf(x); }
MOLE_DEVICE float mole_expm1f(float x) { return expm1f(x); }
MOLE_DEVICE float mole_logf(float x) { return logf(x); }
MOLE_DEVICE float mole_erff(float x) { return erff(x); }
MOLE_DEVICE float mole_fabsf(float x) { return fabsf(x); }

// Byte offset of a field, for layout asserts. NVRTC has no offsetof builtin, so there a constexpr
// probe sets the field of a value-initialised T to a non-zero value and finds the first non-zero
// 4-byte word of its bits (the params structs hold 4-byte fields only).
#if defined(__CUDACC_RTC__)
template <typename T>
struct mole_words {
    mole_u32 w[sizeof(T) / 4];
};
template <typename T, typename F>
__device__ constexpr int mole_offset_probe(F T::*field) {
    static_assert(sizeof(F) == 4 && sizeof(T) % 4 == 0, "4-byte fields only");
    T object{};
    object.*field = F(1);
    const mole_words<T> bits = __builtin_bit_cast(mole_words<T>, object);
    for (int i = 0; i < (int)(sizeof(T) / 4); ++i)
        if (bits.w[i] != 0u) return 4 * i;
    return -1;
}
#define MOLE_OFFSET_OF(T, field) mole_offset_probe(&T::field)
#else
#define MOLE_OFFSET_OF(T, field) __builtin_offsetof(T, field)
#endif

#elif defined(MOLE_HOST_ARCH_HEADER)
// ---------------------------------------------------------------------------------------------
// Host branch: the CPU port (each CUDA thread a fiber) supplies a header defining MOLE_GLOBAL,
// MOLE_DEVICE, MOLE_BOUNDS, threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __shared__,
// __restrict__ and every mole_* function above with the same signatures (MOLE_NO_UNROLL,
// MOLE_UNROLL and MOLE_OFFSET_OF default below), e.g.
//   -DMOLE_HOST_ARCH_HEADER='"common/host/runtime.h"'   (hostexec/build.rs does this)
// ---------------------------------------------------------------------------------------------
#include MOLE_HOST_ARCH_HEADER
#ifndef MOLE_NO_UNROLL
#define MOLE_NO_UNROLL
#endif
#ifndef MOLE_UNROLL
#define MOLE_UNROLL
#endif
#ifndef MOLE_OFFSET_OF
#define MOLE_OFFSET_OF(T, field) __builtin_offsetof(T, field)
#endif
#else
#error "arch.cuh: compile with NVRTC/nvcc, or define MOLE_HOST_ARCH_HEADER for the CPU port"
#endif

// Portable helpers built on the wrappers above.
MOLE_DEVICE float mole_inf() { return mole_bits_float(0x7f800000u); }
MOLE_DEVICE bool mole_isnan(float v) { return v != v; }
MOLE_DEVICE int mole_lane() { return (int)(threadIdx.x % MOLE_WARP_SIZE); }
MOLE_DEVICE int mole_warp_id() { return (int)(threadIdx.x / MOLE_WARP_SIZE); }
MOLE_DEVICE int mole_warps_per_block() { return (int)(blockDim.x / MOLE_WARP_SIZE); }
// Bit mask of the lanes below this one.
MOLE_DEVICE mole_u32 mole_lanes_below() { return (1u << mole_lane()) - 1u; }
