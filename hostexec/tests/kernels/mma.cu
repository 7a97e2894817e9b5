// Tensor-core building blocks: mma with fragments loaded by the PTX formulas, ldmatrix in every
// form, cp.async group semantics, and a small GEMM that stages tiles with cp.async, loads
// fragments with ldmatrix and accumulates with mma (the pattern tensor-core kernels use).
#include "common/arch.cuh"
#include "common/mma.cuh"

MOLE_DEVICE mole_u32 pack(mole_u16 lo, mole_u16 hi) { return (mole_u32)lo | ((mole_u32)hi << 16); }

// D = A B + C on one warp; A [16][16], B [16][8] (k x n) of 16-bit values, C and D [16][8] f32,
// all row-major, fragments built from the PTX ISA formulas directly.
template <bool kBf16>
MOLE_DEVICE void mma_direct(const mole_u16* a, const mole_u16* b, const float* c, float* d) {
    const int l = (int)threadIdx.x, g = l / 4, t = l % 4;
    mole_u32 af[4], bf[2];
    float cf[4], df[4];
    af[0] = pack(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
    af[1] = pack(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
    af[2] = pack(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
    af[3] = pack(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
    bf[0] = pack(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]);
    bf[1] = pack(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
    for (int i = 0; i < 4; ++i) cf[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)];
    if (kBf16) {
        mole_mma_m16n8k16_bf16(df, af, bf, cf);
    } else {
        mole_mma_m16n8k16_f16(df, af, bf, cf);
    }
    for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)] = df[i];
}

MOLE_GLOBAL void mma_bf16_direct(const mole_u16* a, const mole_u16* b, const float* c, float* d) {
    mma_direct<true>(a, b, c, d);
}
MOLE_GLOBAL void mma_f16_direct(const mole_u16* a, const mole_u16* b, const float* c, float* d) {
    mma_direct<false>(a, b, c, d);
}

// ldmatrix from a 32-row tile of 8 u16 per row; lane i passes row perm[i]. mode: 1, 2 or 4
// matrices, +8 for .trans. out[4 lane + m] = register m.
MOLE_GLOBAL void ldmatrix_modes(const mole_u16* tile, const int* perm, int mode, mole_u32* out) {
    __shared__ __align__(16) mole_u16 s[32][8];
    const int lane = (int)threadIdx.x;
    for (int c = 0; c < 8; ++c) s[lane][c] = tile[lane * 8 + c];
    __syncthreads();
    mole_u32 r[4] = {0u, 0u, 0u, 0u};
    const void* row = &s[perm[lane]][0];
    switch (mode) {
        case 1: mole_ldmatrix_x1(r, row); break;
        case 2: mole_ldmatrix_x2(r, row); break;
        case 4: mole_ldmatrix_x4(r, row); break;
        case 9: mole_ldmatrix_x1_trans(r, row); break;
        case 10: mole_ldmatrix_x2_trans(r, row); break;
        case 12: mole_ldmatrix_x4_trans(r, row); break;
        default: break;
    }
    for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}

// cp.async groups on one thread: 4 groups of 16 bytes, then reads after wait<2>, wait<0>, a
// zero-filling copy and 4/8-byte copies. out layout in hostexec/tests/mma.rs.
MOLE_GLOBAL void cp_async_groups(const float* src, float* out) {
    __shared__ __align__(16) float s[4][4];
    if (threadIdx.x != 0) return;
    for (int g = 0; g < 4; ++g) {
        mole_cp_async_16(&s[g][0], src + 4 * g);
        mole_cp_async_commit();
    }
    mole_cp_async_wait<2>();  // groups 0 and 1 have landed, 2 and 3 not yet
    for (int i = 0; i < 16; ++i) out[i] = s[i / 4][i % 4];
    mole_cp_async_wait<0>();
    for (int i = 0; i < 16; ++i) out[16 + i] = s[i / 4][i % 4];
    mole_cp_async_16_zfill(&s[0][0], src + 16, 8);  // two floats copied, two zeroed
    mole_cp_async_4(&s[1][0], src + 20);
    mole_cp_async_8(&s[2][2], src + 22);
    mole_cp_async_wait_all();  // commits the open group and waits for it
    for (int i = 0; i < 4; ++i) out[32 + i] = s[0][i];
    out[36] = s[1][0];
    out[37] = s[2][2];
    out[38] = s[2][3];
}

// Bug: cp.async into global memory.
MOLE_GLOBAL void cp_async_to_global(const float* src, float* dst) {
    mole_cp_async_16(dst + 4 * threadIdx.x, src + 4 * threadIdx.x);
    mole_cp_async_wait_all();
}

// D [32][8] = A [32][32] B [32][8] + C, bf16 in, f32 out; two warps, warp w owns rows 16w..16w+15.
// The K dimension arrives in two cp.async groups (k 0-15, k 16-31), consumed one at a time.
// kWaitSecond = false plants the bug: the second group is never waited for.
template <bool kWaitSecond>
MOLE_DEVICE void gemm_tile(const mole_u16* a, const mole_u16* b, const float* c, float* d) {
    __shared__ __align__(16) mole_u16 as[32][32];
    __shared__ __align__(16) mole_u16 bs[32][8];
    const int t = (int)threadIdx.x, lane = t % 32, warp = t / 32;
    for (int half = 0; half < 2; ++half) {
        // A: 32 rows x 16 columns of this half = 64 chunks of 8 values, one per thread.
        const int row = t / 2, col = 16 * half + 8 * (t % 2);
        mole_cp_async_16(&as[row][col], a + row * 32 + col);
        // B: 16 rows of this half, one chunk each.
        if (t < 16) mole_cp_async_16(&bs[16 * half + t][0], b + (16 * half + t) * 8);
        mole_cp_async_commit();
    }
    float acc[4];
    const int g = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; ++i) acc[i] = c[(16 * warp + g + 8 * (i / 2)) * 8 + 2 * q + (i & 1)];
    for (int half = 0; half < 2; ++half) {
        if (half == 0) {
            mole_cp_async_wait<1>();
        } else if (kWaitSecond) {
            mole_cp_async_wait<0>();
        }
        __syncthreads();
        // A fragments: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols
        // 8-15), (rows 8-15, cols 8-15) of the warp's 16 x 16 block; lane i gives row i % 8 of
        // matrix i / 8.
        const int m = lane / 8, r = lane % 8;
        mole_u32 af[4], bf[2];
        mole_ldmatrix_x4(af, &as[16 * warp + r + 8 * (m % 2)][16 * half + 8 * (m / 2)]);
        // B fragments: k rows 0-7 and 8-15 of this half, transposed (stored k-major).
        mole_ldmatrix_x2_trans(bf, &bs[16 * half + lane % 16][0]);
        mole_mma_m16n8k16_bf16(acc, af, bf, acc);
    }
    for (int i = 0; i < 4; ++i) d[(16 * warp + g + 8 * (i / 2)) * 8 + 2 * q + (i & 1)] = acc[i];
}

MOLE_GLOBAL void gemm_cp_async(const mole_u16* a, const mole_u16* b, const float* c, float* d) {
    gemm_tile<true>(a, b, c, d);
}
MOLE_GLOBAL void gemm_cp_async_missing_wait(const mole_u16* a, const mole_u16* b, const float* c, float* d) {
    gemm_tile<false>(a, b, c, d);
}

// Sums `chunks` chunks of 64 floats, chunk c + 1 copied by cp.async into the other of two buffers
// while chunk c is read; thread t adds element (t + 7c) % 64 of each. kBarrier = false plants the
// bug: no barrier before a copy into the buffer other threads read in the previous step.
template <bool kBarrier>
MOLE_DEVICE void pipelined_sum(const float* src, int chunks, float* out) {
    __shared__ __align__(16) float buf[2][64];
    const int t = (int)threadIdx.x;
    if (t < 16) mole_cp_async_16(&buf[0][4 * t], src + 4 * t);
    mole_cp_async_commit();
    float acc = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        if (kBarrier) __syncthreads();  // every thread has read the buffer chunk c + 1 goes to
        if (c + 1 < chunks && t < 16) mole_cp_async_16(&buf[(c + 1) % 2][4 * t], src + 64 * (c + 1) + 4 * t);
        mole_cp_async_commit();
        mole_cp_async_wait<1>();  // chunk c has landed
        __syncthreads();
        acc += buf[c % 2][(t + 7 * c) % 64];
    }
    out[t] = acc;
}

MOLE_GLOBAL void pipelined_sum_ok(const float* src, int chunks, float* out) { pipelined_sum<true>(src, chunks, out); }
MOLE_GLOBAL void pipelined_sum_missing_barrier(const float* src, int chunks, float* out) {
    pipelined_sum<false>(src, chunks, out);
}
