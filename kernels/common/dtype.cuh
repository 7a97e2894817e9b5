// Storage types and bit-exact conversions, in portable integer code (no <cuda_fp16.h>), and the
// per-build element type chosen by MOLE_DTYPE_F32 / MOLE_DTYPE_F16 / MOLE_DTYPE_BF16.
#pragma once
#include "common/arch.cuh"

// IEEE binary16 and bfloat16 as raw bits; layout-compatible with half::f16 / half::bf16.
struct mole_f16 {
    mole_u16 bits;
};
struct mole_bf16 {
    mole_u16 bits;
};
static_assert(sizeof(mole_f16) == 2 && sizeof(mole_bf16) == 2, "16-bit storage types");

// bf16 is the top half of an f32: widening is exact (NaN payloads and infinities kept).
MOLE_DEVICE float mole_bf16_to_f32(mole_bf16 h) { return mole_bits_float((mole_u32)h.bits << 16); }

// Round to nearest even. NaN stays NaN (quiet bit set, sign and top payload kept); values that
// round past the largest finite bf16 become infinity, as IEEE rounding requires.
MOLE_DEVICE mole_bf16 mole_f32_to_bf16(float v) {
    const mole_u32 x = mole_float_bits(v);
    mole_bf16 r;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (mole_u16)((x >> 16) | 0x0040u);
        return r;
    }
    const mole_u32 lsb = (x >> 16) & 1u;
    r.bits = (mole_u16)((x + 0x7fffu + lsb) >> 16);
    return r;
}

// Exact widening: normals rebias the exponent, subnormals (man * 2^-24) are exact in f32.
MOLE_DEVICE float mole_f16_to_f32(mole_f16 h) {
    const mole_u32 sign = ((mole_u32)h.bits & 0x8000u) << 16;
    const mole_u32 exp = ((mole_u32)h.bits >> 10) & 0x1fu;
    const mole_u32 man = (mole_u32)h.bits & 0x3ffu;
    if (exp == 0x1fu) return mole_bits_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0u) return mole_bits_float(sign | mole_float_bits((float)man * 0x1p-24f));
    return mole_bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, including into and out of the subnormal range; NaN stays NaN.
MOLE_DEVICE mole_f16 mole_f32_to_f16(float v) {
    const mole_u32 x = mole_float_bits(v);
    const mole_u32 sign = (x >> 16) & 0x8000u;
    const mole_u32 ax = x & 0x7fffffffu;
    mole_f16 r;
    if (ax > 0x7f800000u) {
        r.bits = (mole_u16)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    } else if (ax >= 0x477ff000u) {
        // >= 65520 (halfway between 65504 and 2^16, a tie that goes to the even infinity).
        r.bits = (mole_u16)(sign | 0x7c00u);
    } else if (ax >= 0x38800000u) {
        // Normal: rebias the exponent by 127 - 15, then round the 13 dropped bits.
        const mole_u32 m = ax - 0x38000000u;
        r.bits = (mole_u16)(sign | ((m + 0xfffu + ((m >> 13) & 1u)) >> 13));
    } else if (ax <= 0x33000000u) {
        // <= 2^-25: half the smallest subnormal or less rounds to (even) zero.
        r.bits = (mole_u16)sign;
    } else {
        // Subnormal: the value in units of 2^-24 is the 24-bit significand shifted right by
        // 126 - exponent (14..24 bits); a carry into bit 10 correctly yields the smallest normal.
        const mole_u32 shift = 126u - (ax >> 23);
        const mole_u32 sig = (ax & 0x7fffffu) | 0x800000u;
        const mole_u32 rem = sig & ((1u << shift) - 1u);
        const mole_u32 half = 1u << (shift - 1u);
        mole_u32 q = sig >> shift;
        if (rem > half || (rem == half && (q & 1u))) q += 1u;
        r.bits = (mole_u16)(sign | q);
    }
    return r;
}

// Loads and stores through f32, overloaded on the storage type.
MOLE_DEVICE float load_f32(const float* p) { return *p; }
MOLE_DEVICE float load_f32(const mole_f16* p) { return mole_f16_to_f32(*p); }
MOLE_DEVICE float load_f32(const mole_bf16* p) { return mole_bf16_to_f32(*p); }
MOLE_DEVICE void store_from_f32(float* p, float v) { *p = v; }
MOLE_DEVICE void store_from_f32(mole_f16* p, float v) { *p = mole_f32_to_f16(v); }
MOLE_DEVICE void store_from_f32(mole_bf16* p, float v) { *p = mole_f32_to_bf16(v); }

// The build's element type and entry-point suffix: MOLE_ENTRY(gating_x) is gating_x_bf16 etc.
#if (defined(MOLE_DTYPE_F32) + defined(MOLE_DTYPE_F16) + defined(MOLE_DTYPE_BF16)) != 1
#error "define exactly one of MOLE_DTYPE_F32, MOLE_DTYPE_F16, MOLE_DTYPE_BF16"
#endif
#if defined(MOLE_DTYPE_F32)
typedef float elem_t;
#define MOLE_DTYPE_SUFFIX _f32
#elif defined(MOLE_DTYPE_F16)
typedef mole_f16 elem_t;
#define MOLE_DTYPE_SUFFIX _f16
#else
typedef mole_bf16 elem_t;
#define MOLE_DTYPE_SUFFIX _bf16
#endif
#define MOLE_CAT_(a, b) a##b
#define MOLE_CAT(a, b) MOLE_CAT_(a, b)
#define MOLE_ENTRY(name) MOLE_CAT(name, MOLE_DTYPE_SUFFIX)
