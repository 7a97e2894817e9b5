// The FFN-expert block (MixLoRA), between the dense base projections, with the semantics of
// src/reference/ffn.rs. Expert e is the whole gated FFN with LoRA on gate, up and down, sharing
// the frozen base; because W_down is shared, the base down projection runs once on
//   a_mix[t] = sum_s w[t,s] * a_e[t],   a_e = act(G[t] + s_g (x A^g_e) B^g_e) * (U[t] + s_u (x A^u_e) B^u_e),
// where G = x W_gate and U = x W_up are the base outputs (computed once per token, by cuBLAS or
// the caller), and the down-LoRA delta of every selected expert is added to y = a_mix W_down.
//
// A forward (src/kernels/ffn.rs):
//   1. sgmv_shrink (sgmv.cu) of x by A^g and by A^u over the per-slot plans: h_g, h_u partials
//      [splits, T*slots, r_max] (f32);
//   2. ffn_clear: a_mix = 0;
//   3. ffn_act, one launch per slot in slot order (grid = plan tiles x f-slices): for the tile's
//      BM tokens of one expert e and the slice's columns n, in chunks of BN,
//        g = G[t,n] + s_g sum_c h_g[t,s,c] B^g[lo_e + c, n],  u likewise,  a = act(g) * u (f32),
//        a_mix[t,n] = round(a_mix[t,n] + w[t,s] * a),
//        h_d[slice, t*slots+s, c] = sum_{n in slice} a[t,n] A^d[n, lo_e + c]  (f32, c < r_e);
//      a token appears at most once per slot plan and each column in one slice, so every element
//      has one writer per pass and the slot sum has a fixed order (deterministic; a_mix is
//      rounded to elem_t after every pass);
//   4. y = a_mix W_down (dense, outside this file);
//   5. sgmv_expand (sgmv.cu) per slot with B^d over the h_d slices: y += s_d w (sum_slices h_d) B^d.
// No [T*k, f] activation tensor is written: a_e lives in registers and shared memory.
//
// FMA path, f32 math for every dtype; every index into a tensor is 64-bit. Mirrored by
// src/kernels/ffn.rs.
#include "common/arch.cuh"
#include "common/dtype.cuh"
#include "common/segments.cuh"

// Threads per block.
#ifndef MOLE_BLOCK_THREADS
#define MOLE_BLOCK_THREADS 128
#endif
// Entries per tile: must equal the plans' block (the sgmv build's BM).
#ifndef MOLE_FFN_BM
#define MOLE_FFN_BM 32
#endif
// Columns of f per step.
#ifndef MOLE_FFN_BN
#define MOLE_FFN_BN 32
#endif
// Rank rows of B^g / B^u staged per step.
#ifndef MOLE_FFN_KC
#define MOLE_FFN_KC 16
#endif
// Largest rank of one expert in any of the three banks (h tiles and the down accumulators are
// sized by it).
#ifndef MOLE_FFN_MAX_RANK
#define MOLE_FFN_MAX_RANK 64
#endif

#define MOLE_FFN_SILU 0u
#define MOLE_FFN_GELU 1u

static_assert(MOLE_BLOCK_THREADS % 32 == 0 && MOLE_BLOCK_THREADS >= 32 && MOLE_BLOCK_THREADS <= 1024,
              "MOLE_BLOCK_THREADS must be a multiple of 32 in 32..1024");
static_assert(MOLE_BLOCK_THREADS % MOLE_FFN_BN == 0 && (MOLE_FFN_BM * MOLE_FFN_BN) % MOLE_BLOCK_THREADS == 0,
              "threads must tile BM x BN exactly");
static_assert(MOLE_BLOCK_THREADS % MOLE_FFN_MAX_RANK == 0 &&
                  (MOLE_FFN_BM * MOLE_FFN_MAX_RANK) % MOLE_BLOCK_THREADS == 0,
              "threads must tile BM x MAX_RANK exactly");
static_assert(MOLE_FFN_MAX_RANK % MOLE_FFN_KC == 0, "MAX_RANK must be a multiple of KC");

// Parameters of the block's kernels, by value (Rust: FfnParams).
struct mole_ffn_params {
    mole_u32 tokens;        // T
    mole_u32 slots;         // row length of the routing; plans per forward
    mole_u32 experts;       // E
    mole_u32 f;             // intermediate features: row length of G, U, a_mix, B^g, B^u; rows of A^d
    mole_u32 r_gate_max;    // row length of the gate's h partials
    mole_u32 gate_splits;   // their split-K slices
    mole_u32 r_up_max;      // row length of the up's h partials
    mole_u32 up_splits;     // their split-K slices
    mole_u32 r_down_total;  // row length of A^d
    mole_u32 r_down_max;    // row length of the down h partials
    mole_u32 f_splits;      // f-slices (the down partials' slices)
    mole_u32 f_per_split;   // columns per f-slice
    mole_u32 entry_stride;  // entries per slot plan
    mole_u32 slot;          // ffn_act: the slot of this pass
    mole_u32 activation;    // MOLE_FFN_SILU or MOLE_FFN_GELU
    float scale_gate;       // s_g
    float scale_up;         // s_u
};
static_assert(sizeof(mole_ffn_params) == 68, "mole_ffn_params layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, tokens) == 0, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, f) == 12, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, r_gate_max) == 16, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, up_splits) == 28, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, r_down_total) == 32, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, f_per_split) == 44, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, entry_stride) == 48, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, slot) == 52, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, activation) == 56, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, scale_gate) == 60, "layout");
static_assert(MOLE_OFFSET_OF(mole_ffn_params, scale_up) == 64, "layout");

// act(g): SiLU g * sigmoid(g), or PyTorch's exact GELU g/2 * (1 + erf(g / sqrt 2)).
MOLE_DEVICE float ffn_activation(mole_u32 kind, float g) {
    if (kind == MOLE_FFN_GELU) return 0.5f * g * (1.0f + mole_erff(g * 0.70710678118654752f));
    return g / (1.0f + mole_expf(-g));
}

// Expert e's rank columns [lo, lo + rank) of a bank (rank 0 without the bank), rank clamped to
// the partials' row length and the build's maximum (the host validated both; the clamp keeps a
// corrupted copy from indexing past them).
MOLE_DEVICE mole_u32 ffn_rank(const mole_u32* __restrict__ offsets, mole_u32 e, mole_u32 r_max, mole_u32* lo) {
    *lo = 0u;
    if (!offsets) return 0u;
    *lo = offsets[e];
    mole_u32 r = offsets[e + 1u] - offsets[e];
    r = r < r_max ? r : r_max;
    return r < MOLE_FFN_MAX_RANK ? r : MOLE_FFN_MAX_RANK;
}

// hs[i][c] = sum over the split-K slices of h_part[split, t_i*slots + s, c] (in slice order),
// 0 for c >= rank and for padding rows.
MOLE_DEVICE void ffn_load_h(const mole_ffn_params& p, const float* __restrict__ h_part, mole_u32 splits,
                            mole_u32 r_max, mole_u32 rank, const int* rows, float (*hs)[MOLE_FFN_MAX_RANK]) {
    const mole_u64 rows_total = (mole_u64)p.tokens * p.slots;
    for (int i = (int)threadIdx.x; i < MOLE_FFN_BM * MOLE_FFN_MAX_RANK; i += (int)blockDim.x) {
        const int r = i / MOLE_FFN_MAX_RANK, c = i % MOLE_FFN_MAX_RANK;
        const int t = rows[r];
        float v = 0.0f;
        if (t >= 0 && (mole_u32)c < rank) {
            const mole_u64 base = ((mole_u64)t * p.slots + p.slot) * r_max + (mole_u64)c;
            MOLE_NO_UNROLL
            for (mole_u32 sp = 0u; sp < splits; ++sp) v += h_part[(mole_u64)sp * rows_total * r_max + base];
        }
        hs[r][c] = v;
    }
}

// acc[j] += sum_c hs[row_j][c] * B[lo + c, n0 + col] over c < rank, B [., f] staged by KC rows.
MOLE_DEVICE void ffn_delta(const mole_ffn_params& p, const elem_t* __restrict__ b, mole_u32 lo, mole_u32 rank,
                           mole_u64 n0, mole_u64 n_end, const float (*hs)[MOLE_FFN_MAX_RANK],
                           float (*bs)[MOLE_FFN_BN], float* acc) {
    constexpr int ROW_STEP = MOLE_BLOCK_THREADS / MOLE_FFN_BN;
    constexpr int PER_THREAD = MOLE_FFN_BM * MOLE_FFN_BN / MOLE_BLOCK_THREADS;
    const int col = (int)threadIdx.x % MOLE_FFN_BN;
    const int row0 = (int)threadIdx.x / MOLE_FFN_BN;
    MOLE_NO_UNROLL
    for (mole_u32 c0 = 0u; c0 < rank; c0 += MOLE_FFN_KC) {
        __syncthreads();  // the previous chunk consumed
        for (int i = (int)threadIdx.x; i < MOLE_FFN_KC * MOLE_FFN_BN; i += (int)blockDim.x) {
            const int kk = i / MOLE_FFN_BN, n = i % MOLE_FFN_BN;
            const mole_u32 c = c0 + (mole_u32)kk;
            const mole_u64 nn = n0 + (mole_u64)n;
            bs[kk][n] = (c < rank && nn < n_end) ? load_f32(b + (mole_u64)(lo + c) * p.f + nn) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < MOLE_FFN_KC; ++kk) {
            const float bv = bs[kk][col];
            for (int j = 0; j < PER_THREAD; ++j) acc[j] += hs[row0 + j * ROW_STEP][c0 + kk] * bv;
        }
    }
}

// a_mix = 0 (the passes accumulate into it; a token whose slot 0 is empty is in no plan 0).
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(ffn_clear)(const mole_ffn_params p, elem_t* __restrict__ a_mix) {
    const mole_u64 n = (mole_u64)p.tokens * p.f;
    const mole_u64 stride = (mole_u64)gridDim.x * blockDim.x;
    for (mole_u64 i = (mole_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        store_from_f32(a_mix + i, 0.0f);
}

// Pass `p.slot` over one tile of its plan and one f-slice (see the top of the file).
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(ffn_act)(const mole_ffn_params p, const elem_t* __restrict__ gate_out, const elem_t* __restrict__ up_out,
                        const float* __restrict__ gate_partials, const float* __restrict__ up_partials,
                        const elem_t* __restrict__ gate_b, const elem_t* __restrict__ up_b,
                        const mole_u32* __restrict__ gate_rank_offsets, const mole_u32* __restrict__ up_rank_offsets,
                        const elem_t* __restrict__ down_a, const mole_u32* __restrict__ down_rank_offsets,
                        const mole_u32* __restrict__ plan_offsets, const mole_plan_entry* __restrict__ plan_entries,
                        const float* __restrict__ weights, elem_t* __restrict__ a_mix,
                        float* __restrict__ down_partials) {
    __shared__ int rows[MOLE_FFN_BM];
    __shared__ float hg[MOLE_FFN_BM][MOLE_FFN_MAX_RANK];
    __shared__ float hu[MOLE_FFN_BM][MOLE_FFN_MAX_RANK];
    __shared__ float bs[MOLE_FFN_KC][MOLE_FFN_BN];
    __shared__ float as[MOLE_FFN_BM][MOLE_FFN_BN];
    __shared__ float ads[MOLE_FFN_BN][MOLE_FFN_MAX_RANK];
    const mole_u32 s = p.slot;
    const mole_u32* offs = plan_offsets + (mole_u64)s * (p.experts + 1u);
    const mole_plan_entry* entries = plan_entries + (mole_u64)s * p.entry_stride;
    const mole_plan_tile tile = mole_find_plan_tile(offs, p.experts, blockIdx.x, MOLE_FFN_BM);
    if (!tile.live) return;  // uniform over the block
    const mole_u32 e = tile.expert;
    mole_u32 lo_g, lo_u, lo_d;
    const mole_u32 rg = gate_b && gate_partials ? ffn_rank(gate_rank_offsets, e, p.r_gate_max, &lo_g) : 0u;
    const mole_u32 ru = up_b && up_partials ? ffn_rank(up_rank_offsets, e, p.r_up_max, &lo_u) : 0u;
    const mole_u32 rd = down_a && down_partials ? ffn_rank(down_rank_offsets, e, p.r_down_max, &lo_d) : 0u;
    mole_load_plan_rows(tile, entries, p.tokens, MOLE_FFN_BM, rows);
    __syncthreads();
    if (rg > 0u) ffn_load_h(p, gate_partials, p.gate_splits, p.r_gate_max, rg, rows, hg);
    if (ru > 0u) ffn_load_h(p, up_partials, p.up_splits, p.r_up_max, ru, rows, hu);

    const mole_u64 f0 = (mole_u64)blockIdx.y * p.f_per_split;
    const mole_u64 f1_raw = f0 + p.f_per_split;
    const mole_u64 f1 = f1_raw < p.f ? f1_raw : (mole_u64)p.f;
    constexpr int ROW_STEP = MOLE_BLOCK_THREADS / MOLE_FFN_BN;
    constexpr int PER_THREAD = MOLE_FFN_BM * MOLE_FFN_BN / MOLE_BLOCK_THREADS;
    constexpr int D_STEP = MOLE_BLOCK_THREADS / MOLE_FFN_MAX_RANK;
    constexpr int D_PER_THREAD = MOLE_FFN_BM * MOLE_FFN_MAX_RANK / MOLE_BLOCK_THREADS;
    const int col = (int)threadIdx.x % MOLE_FFN_BN;
    const int row0 = (int)threadIdx.x / MOLE_FFN_BN;
    const int dcol = (int)threadIdx.x % MOLE_FFN_MAX_RANK;
    const int drow0 = (int)threadIdx.x / MOLE_FFN_MAX_RANK;
    float hd[D_PER_THREAD];
    for (int j = 0; j < D_PER_THREAD; ++j) hd[j] = 0.0f;

    MOLE_NO_UNROLL
    for (mole_u64 n0 = f0; n0 < f1; n0 += MOLE_FFN_BN) {
        float ag[PER_THREAD], au[PER_THREAD];
        for (int j = 0; j < PER_THREAD; ++j) ag[j] = au[j] = 0.0f;
        ffn_delta(p, gate_b, lo_g, rg, n0, f1, hg, bs, ag);
        ffn_delta(p, up_b, lo_u, ru, n0, f1, hu, bs, au);
        __syncthreads();  // the previous step's `as` and `ads` consumed (also when no delta synced)
        const mole_u64 n = n0 + (mole_u64)col;
        for (int j = 0; j < PER_THREAD; ++j) {
            const int r = row0 + j * ROW_STEP;
            const int t = rows[r];
            float a = 0.0f;
            if (t >= 0 && n < f1) {
                const mole_u64 i = (mole_u64)t * p.f + n;
                const float g = load_f32(gate_out + i) + p.scale_gate * ag[j];
                const float u = load_f32(up_out + i) + p.scale_up * au[j];
                a = ffn_activation(p.activation, g) * u;
                const float w = weights[(mole_u64)t * p.slots + s];
                store_from_f32(a_mix + i, load_f32(a_mix + i) + w * a);
            }
            as[r][col] = a;
        }
        if (rd == 0u) continue;  // uniform over the block
        for (int i = (int)threadIdx.x; i < MOLE_FFN_BN * MOLE_FFN_MAX_RANK; i += (int)blockDim.x) {
            const int nn = i / MOLE_FFN_MAX_RANK, c = i % MOLE_FFN_MAX_RANK;
            const mole_u64 row = n0 + (mole_u64)nn;
            ads[nn][c] =
                ((mole_u32)c < rd && row < f1) ? load_f32(down_a + row * p.r_down_total + lo_d + (mole_u32)c) : 0.0f;
        }
        __syncthreads();
        for (int nn = 0; nn < MOLE_FFN_BN; ++nn) {
            const float av = ads[nn][dcol];
            for (int j = 0; j < D_PER_THREAD; ++j) hd[j] += as[drow0 + j * D_STEP][nn] * av;
        }
    }
    if (rd == 0u || (mole_u32)dcol >= rd) return;
    const mole_u64 rows_total = (mole_u64)p.tokens * p.slots;
    for (int j = 0; j < D_PER_THREAD; ++j) {
        const int t = rows[drow0 + j * D_STEP];
        if (t < 0) continue;
        const mole_u64 ts = (mole_u64)t * p.slots + s;
        down_partials[((mole_u64)blockIdx.y * rows_total + ts) * p.r_down_max + (mole_u32)dcol] = hd[j];
    }
}
