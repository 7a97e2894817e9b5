// Deterministic weight gradients of the backward pass (src/kernels/wgrad.rs):
//   out[b, m, n] = scale * sum_t rw[t, b] * P[t, m] * Q[t, n]
// the shape of every weight gradient of a MoLE layer: dA = x^T dh, dB = hm^T dy (scale),
// dW_g = x^T dz, dW_r = h^T dz, db = sum_t dz (P = 1), dC_c = sum_t w[t, c] h_t^T g_t (one output
// b per row-weight column c, in one launch).
//
// P and Q are each the build's element type or f32, read as a block of columns of a row-major
// [T, stride] matrix (P[t, m] = p[t * p_stride + p_col + m]); P may be 1 (column sums); the
// optional row weight rw[t, b] = row_weight[t * rw_stride + rw_col + b] is f32.
//
// Two kernels, so that no float is ever added by two threads in an unknown order:
//   wgrad_partial: grid (N tiles, M tiles, splits * batch). Split s owns the contiguous tokens
//     [s * tokens_per_split, min(T, (s + 1) * tokens_per_split)); one thread per output element
//     sums them in ascending token order, staged TK tokens at a time in shared memory (P as
//     rw * P, so a product is (rw * P) * Q), into partials[s, b, m, n] (f32). Every element of
//     the workspace is written, an empty split's as 0. A staged token whose products in the
//     block's tile are all +-0 (its Q row zero and P row finite there, or the reverse: dh and hm
//     outside the selected experts) is skipped, which leaves every sum bit-identical.
//   wgrad_reduce: out[b, m, n] = round(scale * sum_s partials[s, b, m, n]), splits in order.
// A result depends on the number of splits (the plan's), never on the thread schedule.
//
// FMA path, f32 math for every dtype; every index into a tensor is 64-bit. Mirrored by
// src/kernels/wgrad.rs.
#include "common/arch.cuh"
#include "common/dtype.cuh"

// Threads per block.
#ifndef MOLE_BLOCK_THREADS
#define MOLE_BLOCK_THREADS 256
#endif
// Output rows (of M) per block.
#ifndef MOLE_WGRAD_BM
#define MOLE_WGRAD_BM 64
#endif
// Output columns (of N) per block; a thread owns one column and BM * BN / threads rows.
#ifndef MOLE_WGRAD_BN
#define MOLE_WGRAD_BN 64
#endif
// Tokens staged per step.
#ifndef MOLE_WGRAD_TK
#define MOLE_WGRAD_TK 32
#endif

// Operand kinds (Rust: WgradOperand).
#define MOLE_WGRAD_ONES 0u
#define MOLE_WGRAD_DATA 1u
#define MOLE_WGRAD_F32 2u

static_assert(MOLE_BLOCK_THREADS % 32 == 0 && MOLE_BLOCK_THREADS >= 32 && MOLE_BLOCK_THREADS <= 1024,
              "MOLE_BLOCK_THREADS must be a multiple of 32 in 32..1024");
static_assert(MOLE_BLOCK_THREADS % MOLE_WGRAD_BN == 0 && (MOLE_WGRAD_BM * MOLE_WGRAD_BN) % MOLE_BLOCK_THREADS == 0,
              "threads must tile BM x BN exactly");
static_assert(MOLE_WGRAD_TK > 0, "MOLE_WGRAD_TK must be positive");

// Parameters of both kernels, by value (Rust: WgradParams).
struct mole_wgrad_params {
    mole_u32 tokens;            // T
    mole_u32 m;                 // output rows: P's column count
    mole_u32 n;                 // output columns: Q's column count
    mole_u32 batch;             // outputs, one per row-weight column (1 without a row weight)
    mole_u32 splits;            // token splits
    mole_u32 tokens_per_split;  // tokens of every split but the last
    mole_u32 p_kind;            // MOLE_WGRAD_ONES, _DATA or _F32
    mole_u32 p_stride;          // row length of P's matrix
    mole_u32 p_col;             // P's first column in it
    mole_u32 q_kind;            // MOLE_WGRAD_DATA or _F32
    mole_u32 q_stride;          // row length of Q's matrix
    mole_u32 q_col;             // Q's first column in it
    mole_u32 rw_stride;         // row length of the row weight's matrix
    mole_u32 rw_col;            // the column of output 0
    float scale;                // wgrad_reduce: the factor of the sum
};
static_assert(sizeof(mole_wgrad_params) == 60, "mole_wgrad_params layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, tokens) == 0, "layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, batch) == 12, "layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, tokens_per_split) == 20, "layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, p_kind) == 24, "layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, q_kind) == 36, "layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, rw_stride) == 48, "layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, rw_col) == 52, "layout");
static_assert(MOLE_OFFSET_OF(mole_wgrad_params, scale) == 56, "layout");

// Element i of an operand of `kind` (DATA or F32), as f32.
MOLE_DEVICE float wgrad_load(mole_u32 kind, const elem_t* __restrict__ data, const float* __restrict__ f32,
                             mole_u64 i) {
    return kind == MOLE_WGRAD_F32 ? f32[i] : load_f32(data + i);
}

// partials[s, b, m0 .. m0 + BM, n0 .. n0 + BN] for s, b = blockIdx.z / batch, % batch (see the top
// of the file).
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(wgrad_partial)(const mole_wgrad_params p, const elem_t* __restrict__ p_data,
                              const float* __restrict__ p_float, const elem_t* __restrict__ q_data,
                              const float* __restrict__ q_float, const float* __restrict__ row_weight,
                              float* __restrict__ partials) {
    __shared__ float ps[MOLE_WGRAD_TK][MOLE_WGRAD_BM];
    __shared__ float qs[MOLE_WGRAD_TK][MOLE_WGRAD_BN];
    // Per staged token, double-buffered by step parity: [P nonzero, P non-finite, Q nonzero,
    // Q non-finite] over the tile's live rows and columns (set by any thread that sees one).
    __shared__ int marks[2][4][MOLE_WGRAD_TK];
    constexpr int ROW_STEP = MOLE_BLOCK_THREADS / MOLE_WGRAD_BN;
    constexpr int PER_THREAD = MOLE_WGRAD_BM * MOLE_WGRAD_BN / MOLE_BLOCK_THREADS;
    const mole_u32 split = blockIdx.z / p.batch;
    const mole_u32 b = blockIdx.z % p.batch;
    const mole_u64 m0 = (mole_u64)blockIdx.y * MOLE_WGRAD_BM;
    const mole_u64 n0 = (mole_u64)blockIdx.x * MOLE_WGRAD_BN;
    const mole_u64 t_begin = (mole_u64)split * p.tokens_per_split;
    const mole_u64 t_end_raw = t_begin + p.tokens_per_split;
    const mole_u64 t_end = t_end_raw < p.tokens ? t_end_raw : (mole_u64)p.tokens;
    const int col = (int)threadIdx.x % MOLE_WGRAD_BN;
    const int row0 = (int)threadIdx.x / MOLE_WGRAD_BN;
    float acc[PER_THREAD];
    for (int j = 0; j < PER_THREAD; ++j) acc[j] = 0.0f;
    for (int i = (int)threadIdx.x; i < 4 * MOLE_WGRAD_TK; i += (int)blockDim.x)
        marks[0][i / MOLE_WGRAD_TK][i % MOLE_WGRAD_TK] = 0;

    int par = 0;
    MOLE_NO_UNROLL
    for (mole_u64 t0 = t_begin; t0 < t_end; t0 += MOLE_WGRAD_TK, par ^= 1) {
        __syncthreads();  // the previous step's tiles consumed, this step's marks cleared
        for (int i = (int)threadIdx.x; i < MOLE_WGRAD_TK * MOLE_WGRAD_BM; i += (int)blockDim.x) {
            const int k = i / MOLE_WGRAD_BM, r = i % MOLE_WGRAD_BM;
            const mole_u64 t = t0 + (mole_u64)k, m = m0 + (mole_u64)r;
            float v = 0.0f;
            if (t < t_end && m < p.m) {
                v = p.p_kind == MOLE_WGRAD_ONES ? 1.0f
                                                : wgrad_load(p.p_kind, p_data, p_float, t * p.p_stride + p.p_col + m);
                if (row_weight) v *= row_weight[t * p.rw_stride + p.rw_col + b];
                if (v != 0.0f) marks[par][0][k] = 1;
                if (!(mole_fabsf(v) < mole_inf())) marks[par][1][k] = 1;
            }
            ps[k][r] = v;
        }
        for (int i = (int)threadIdx.x; i < MOLE_WGRAD_TK * MOLE_WGRAD_BN; i += (int)blockDim.x) {
            const int k = i / MOLE_WGRAD_BN, c = i % MOLE_WGRAD_BN;
            const mole_u64 t = t0 + (mole_u64)k, nn = n0 + (mole_u64)c;
            float v = 0.0f;
            if (t < t_end && nn < p.n) {
                v = wgrad_load(p.q_kind, q_data, q_float, t * p.q_stride + p.q_col + nn);
                if (v != 0.0f) marks[par][2][k] = 1;
                if (!(mole_fabsf(v) < mole_inf())) marks[par][3][k] = 1;
            }
            qs[k][c] = v;
        }
        __syncthreads();
        // The next step's marks, cleared here: every thread is past this step's staging, and the
        // next step's staging waits at its first barrier.
        for (int i = (int)threadIdx.x; i < 4 * MOLE_WGRAD_TK; i += (int)blockDim.x)
            marks[par ^ 1][i / MOLE_WGRAD_TK][i % MOLE_WGRAD_TK] = 0;
        // Only the step's live tokens: the sum is over the split's tokens and nothing else.
        const mole_u64 left = t_end - t0;
        const int live = left < (mole_u64)MOLE_WGRAD_TK ? (int)left : MOLE_WGRAD_TK;
        for (int k = 0; k < live; ++k) {
            // A token whose tile products are all +-0 (one side all zero, the other finite; a
            // sparse top-k's dh or hm) is skipped for the whole block: acc + (+-0) is acc, bit for
            // bit, as acc starts at +0 and is never -0. A zero times an infinity or NaN is not
            // skipped, so it stays NaN.
            const bool p_zero = !marks[par][0][k] && !marks[par][3][k];
            const bool q_zero = !marks[par][2][k] && !marks[par][1][k];
            if (p_zero || q_zero) continue;
            const float qv = qs[k][col];
            for (int j = 0; j < PER_THREAD; ++j) acc[j] += ps[k][row0 + j * ROW_STEP] * qv;
        }
    }
    const mole_u64 nn = n0 + (mole_u64)col;
    if (nn >= p.n) return;
    const mole_u64 out_base = ((mole_u64)split * p.batch + b) * p.m;
    for (int j = 0; j < PER_THREAD; ++j) {
        const mole_u64 m = m0 + (mole_u64)(row0 + j * ROW_STEP);
        if (m < p.m) partials[(out_base + m) * p.n + nn] = acc[j];
    }
}

// out[i] = round(scale * sum_s partials[s, i]) over the batch * M * N outputs, splits in order.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(wgrad_reduce)(const mole_wgrad_params p, const float* __restrict__ partials,
                             elem_t* __restrict__ out) {
    const mole_u64 total = (mole_u64)p.batch * p.m * p.n;
    const mole_u64 stride = (mole_u64)gridDim.x * blockDim.x;
    for (mole_u64 i = (mole_u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        float v = 0.0f;
        MOLE_NO_UNROLL
        for (mole_u32 s = 0u; s < p.splits; ++s) v += partials[(mole_u64)s * total + i];
        store_from_f32(out + i, p.scale * v);
    }
}
