// Tensor-core pieces shared by the SGMV and fused kernels (f16 / bf16 builds): the mma dispatch
// over the element type, the hi / lo split of f32 values with a per-row power-of-two scale, the
// hi + lo product against one B fragment, the m16n8 accumulator layout, and the cp.async staging
// of [16, BN] chunks of B. Built on common/mma.cuh, so it runs on the CPU port unmodified.
#pragma once
#include "common/dtype.cuh"
#include "common/mma.cuh"

// d += a * b on mma.sync m16n8k16 in the build's element type, f32 accumulate.
MOLE_DEVICE void mole_tc_mma(float* d, const mole_u32* a, const mole_u32* b) {
#if defined(MOLE_DTYPE_BF16)
    mole_mma_m16n8k16_bf16(d, a, b, d);
#else
    mole_mma_m16n8k16_f16(d, a, b, d);
#endif
}

// The scale of a chunk whose largest |h| is mx: 2^-E (E = mx's exponent) brings mx into [1, 2)
// (exact; keeps f16 clear of overflow and of subnormal lo parts). The biased exponent is kept in
// [1, 253] so that both the scale and its inverse (*inv) are normal; mx = 0 gives scale 1.
MOLE_DEVICE float mole_tc_chunk_scale(float mx, float* inv) {
    int be = mx > 0.0f ? 254 - (int)((mole_float_bits(mx) >> 23) & 0xffu) : 127;
    be = be < 1 ? 1 : (be > 253 ? 253 : be);
    *inv = mole_bits_float((mole_u32)(254 - be) << 23);
    return mole_bits_float((mole_u32)be << 23);
}

// hv = hi + lo with hi = round(hv), lo = round(hv - hi) in elem_t: about twice the dtype's
// precision. An infinite hv stays in hi alone (inf - inf would make the row NaN).
MOLE_DEVICE void mole_tc_split(elem_t* hi, elem_t* lo, float hv) {
    store_from_f32(hi, hv);
    const float h_hi = load_f32(hi);
    store_from_f32(lo, h_hi - h_hi == 0.0f ? hv - h_hi : 0.0f);
}

// acc[j] += (hi + lo) * B of n8 tile j (j = 0, 1 of the fragment bf from ldmatrix_x4_trans), the
// chunk's product unscaled per row: inv_lo for rows g, inv_hi for rows g + 8. lo goes first so
// that the small part is not absorbed by the large one.
MOLE_DEVICE void mole_tc_mma_hilo(float (*acc)[4], const mole_u32* ah, const mole_u32* al, const mole_u32* bf,
                                  float inv_lo, float inv_hi) {
    float part[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    for (int j = 0; j < 2; ++j) {
        mole_tc_mma(part[j], al, bf + 2 * j);
        mole_tc_mma(part[j], ah, bf + 2 * j);
    }
    for (int j = 0; j < 2; ++j)
        for (int q = 0; q < 4; ++q) acc[j][q] += part[j][q] * (q < 2 ? inv_lo : inv_hi);
}

// The m16n8 accumulator layout: float q of n8 tile j of lane l holds row acc_row(l, q) and column
// acc_col(l, j, q) of the warp's 16 x 16 tile (c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t],
// c3 = C[g+8][2t+1], g = l / 4, t = l % 4).
MOLE_DEVICE int mole_tc_acc_row(int lane, int q) { return lane / 4 + (q / 2) * 8; }
MOLE_DEVICE int mole_tc_acc_col(int lane, int j, int q) { return j * 8 + 2 * (lane % 4) + (q % 2); }

// Issues and commits the cp.async copies of rows c0 .. c0 + 16 and columns nb .. nb + BN of a
// row-major matrix b with d_out columns (row c at b + (row_base + c) * d_out) into dst (16 rows of
// BN + 8 elements: 16-byte aligned for ldmatrix, conflict-free). 16-byte segments; rows at or past
// `rows` and columns past d_out read nothing and are zero filled (whole segments: d_out % 8 == 0).
template <int BN>
MOLE_DEVICE void mole_tc_stage_b(elem_t* dst, const elem_t* __restrict__ b, mole_u32 row_base, mole_u32 c0,
                                 mole_u32 rows, mole_u64 nb, mole_u32 d_out) {
    for (int i = (int)threadIdx.x; i < 16 * (BN / 8); i += (int)blockDim.x) {
        const int kk = i / (BN / 8), seg = i % (BN / 8);
        const mole_u32 c = c0 + (mole_u32)kk;
        const mole_u64 n = nb + (mole_u64)seg * 8u;
        const bool live = c < rows && n < d_out;
        const elem_t* src = live ? b + (mole_u64)(row_base + c) * d_out + n : b;
        mole_cp_async_16_zfill(dst + kk * (BN + 8) + seg * 8, src, live ? 16 : 0);
    }
    mole_cp_async_commit();
}
