// Segmented grouped LoRA (SGMV): the expert-scale layer's shrink and expand over per-slot routing
// plans, with the semantics of src/reference/grouped.rs:
//   y[t] += scale * sum_s s_e w[t,s] * (x[t] . A[:, cols(e)]) . B[cols(e), :],  e = ids[t,s],
// where s_e are the optional per-expert scales (expert_scales [E]; null: all 1).
//
// Plans: one per slot, plan s built from column s of ids (src/plan.rs with slots = 1, block =
// MOLE_SGMV_BM): offsets [slots, E+1] and entries [slots, entry_stride] (token; padding =
// 0xffffffff). Segments are padded to multiples of BM, so tile i of slot s holds entries
// [i*BM, (i+1)*BM) of one expert, found by binary search; tiles at or past offsets[E] exit.
//
// shrink (one launch, grid = tiles x splits x slots): h_part[split, t*slots+s, c] =
//   sum over the split's slice of d_in of x[t,k] * A[k, lo_e + c], in f32, c < r_e. Each split
//   writes its own slice: no atomics.
// expand (one launch per slot, in slot order, grid = tiles x d_out/BN): acc[t,n] = sum_c
//   (sum_split h_part[split, t*slots+s, c]) * B[lo_e + c, n], splits summed in order, then
//   y[t,n] = round(y[t,n] + (scale * (w[t,s] * s_e)) * acc). In pass s each token appears at
//   most once, so rows of y are updated without conflicts and the sum over slots has a fixed
//   order: the result is deterministic. y is rounded to elem_t after every pass (slots roundings).
//
// This is the FMA path (f32 math for every dtype): x/A (shrink) and h/B (expand) are staged in
// shared memory in chunks of KC along the reduction; every index into a tensor is 64-bit.
// Mirrored by src/kernels/sgmv.rs.
#include "common/arch.cuh"
#include "common/dtype.cuh"
#include "common/segments.cuh"

// Threads per block of both kernels.
#ifndef MOLE_BLOCK_THREADS
#define MOLE_BLOCK_THREADS 128
#endif
// Entries per tile (the plan's block): rows of x, h and y a block works on.
#ifndef MOLE_SGMV_BM
#define MOLE_SGMV_BM 32
#endif
// Output columns per expand block.
#ifndef MOLE_SGMV_BN
#define MOLE_SGMV_BN 32
#endif
// Rank columns per shrink pass over the tile.
#ifndef MOLE_SGMV_RC
#define MOLE_SGMV_RC 32
#endif
// Reduction chunk staged in shared memory (d_in for the shrink, rank for the expand).
#ifndef MOLE_SGMV_KC
#define MOLE_SGMV_KC 16
#endif
// Split-K factor of the shrink over d_in (read by the host planner; the kernels take it from
// the params so that a plan may lower it for short d_in).
#ifndef MOLE_SGMV_SPLITS
#define MOLE_SGMV_SPLITS 2
#endif

// Pipeline stages of the tensor-core shrink's x tile: 1 (load, wait, compute) or 2 (cp.async
// double buffering: the next step's x tile is in flight while the current one is consumed).
#ifndef MOLE_SGMV_STAGES
#define MOLE_SGMV_STAGES 2
#endif

#define MOLE_SGMV_MAX_RANK 256
#define MOLE_SGMV_MAX_EXPERTS 4096

static_assert(MOLE_BLOCK_THREADS % 32 == 0 && MOLE_BLOCK_THREADS >= 32 && MOLE_BLOCK_THREADS <= 1024,
              "MOLE_BLOCK_THREADS must be a multiple of 32 in 32..1024");
static_assert(MOLE_BLOCK_THREADS % MOLE_SGMV_BN == 0 && (MOLE_SGMV_BM * MOLE_SGMV_BN) % MOLE_BLOCK_THREADS == 0,
              "expand: threads must tile BM x BN exactly");
static_assert(MOLE_BLOCK_THREADS % MOLE_SGMV_RC == 0 && (MOLE_SGMV_BM * MOLE_SGMV_RC) % MOLE_BLOCK_THREADS == 0,
              "shrink: threads must tile BM x RC exactly");
static_assert(MOLE_SGMV_BM >= 1 && MOLE_SGMV_KC >= 1 && MOLE_SGMV_SPLITS >= 1, "positive tile sizes");
static_assert(MOLE_SGMV_STAGES == 1 || MOLE_SGMV_STAGES == 2, "MOLE_SGMV_STAGES must be 1 or 2");

// Parameters of both kernels, by value (Rust: SgmvParams).
struct mole_sgmv_params {
    mole_u32 tokens;        // T
    mole_u32 slots;         // row length of ids / weights; plans per launch
    mole_u32 experts;       // E
    mole_u32 d_in;          // row length of x, rows of A
    mole_u32 d_out;         // row length of y and B
    mole_u32 r_total;       // R: row length of A, rows of B
    mole_u32 r_max;         // max rank: row length of h_part
    mole_u32 splits;        // split-K slices of d_in
    mole_u32 k_per_split;   // d_in per split (a multiple of KC)
    mole_u32 entry_stride;  // entries per slot plan
    mole_u32 slot;          // expand: the slot of this pass
    float scale;            // delta scale
};
static_assert(sizeof(mole_sgmv_params) == 48, "mole_sgmv_params layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, tokens) == 0, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, slots) == 4, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, experts) == 8, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, d_in) == 12, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, d_out) == 16, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, r_total) == 20, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, r_max) == 24, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, splits) == 28, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, k_per_split) == 32, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, entry_stride) == 36, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, slot) == 40, "layout");
static_assert(MOLE_OFFSET_OF(mole_sgmv_params, scale) == 44, "layout");

typedef mole_plan_entry mole_sgmv_entry;

// The tile a block works on: its plan tile and its expert's rank columns.
struct sgmv_tile {
    bool live;         // false: past the plan's end (the whole block exits)
    mole_u32 begin;    // first entry
    mole_u32 end;      // one past the expert's last entry (padding included)
    mole_u32 col_lo;   // the expert's first column in A / B
    mole_u32 rank;     // r_e (<= r_max)
    mole_u32 expert;   // e
};

// Tile `tile` of plan `offs` [E+1] (mole_find_plan_tile) with its expert's columns.
MOLE_DEVICE sgmv_tile sgmv_find_tile(const mole_sgmv_params& p, const mole_u32* __restrict__ offs,
                                     const mole_u32* __restrict__ rank_offsets, mole_u32 tile) {
    sgmv_tile r = {false, 0u, 0u, 0u, 0u, 0u};
    const mole_plan_tile t = mole_find_plan_tile(offs, p.experts, tile, MOLE_SGMV_BM);
    if (!t.live) return r;
    const mole_u32 lo = t.expert;
    r.live = true;
    r.begin = t.begin;
    r.end = t.end;
    r.col_lo = rank_offsets[lo];
    r.expert = lo;
    const mole_u32 rank = rank_offsets[lo + 1u] - rank_offsets[lo];
    // The host validated rank_offsets; the clamp keeps a corrupted copy from writing past h.
    r.rank = rank < p.r_max ? rank : p.r_max;
    return r;
}

// The tile's expert scale s_e (1 without per-expert scales: multiplying by it is exact).
MOLE_DEVICE float sgmv_expert_scale(const sgmv_tile& tile, const float* __restrict__ expert_scales) {
    return expert_scales ? expert_scales[tile.expert] : 1.0f;
}

// Loads the tile's tokens into `rows` (-1 for padding and for entries past the expert's end).
MOLE_DEVICE void sgmv_load_rows(const sgmv_tile& tile, const mole_sgmv_entry* __restrict__ entries, mole_u32 tokens,
                                int* rows) {
    const mole_plan_tile t = {tile.live, tile.begin, tile.end, tile.expert};
    mole_load_plan_rows(t, entries, tokens, MOLE_SGMV_BM, rows);
}

// h_part[split, t*slots + s, c] = x[t, k range of split] . A[k range, col_lo + c], c < r_e.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(sgmv_shrink)(const mole_sgmv_params p, const elem_t* __restrict__ x, const elem_t* __restrict__ a,
                            const mole_u32* __restrict__ rank_offsets, const mole_u32* __restrict__ plan_offsets,
                            const mole_sgmv_entry* __restrict__ plan_entries, float* __restrict__ h_part) {
    __shared__ int rows[MOLE_SGMV_BM];
    __shared__ float xs[MOLE_SGMV_BM][MOLE_SGMV_KC];
    __shared__ float as[MOLE_SGMV_KC][MOLE_SGMV_RC];
    const mole_u32 s = blockIdx.z;
    const mole_u32 split = blockIdx.y;
    const mole_u32* offs = plan_offsets + (mole_u64)s * (p.experts + 1u);
    const mole_sgmv_entry* entries = plan_entries + (mole_u64)s * p.entry_stride;
    const sgmv_tile tile = sgmv_find_tile(p, offs, rank_offsets, blockIdx.x);
    if (!tile.live || tile.rank == 0u) return;  // uniform over the block
    sgmv_load_rows(tile, entries, p.tokens, rows);
    __syncthreads();  // rows are read before any chunk barrier when the split's range is empty
    const mole_u64 k_begin = (mole_u64)split * p.k_per_split;
    const mole_u64 k_end_raw = k_begin + p.k_per_split;
    const mole_u64 k_end = k_end_raw < p.d_in ? k_end_raw : (mole_u64)p.d_in;
    const mole_u64 rows_total = (mole_u64)p.tokens * p.slots;
    constexpr int ROW_STEP = MOLE_BLOCK_THREADS / MOLE_SGMV_RC;
    constexpr int PER_THREAD = MOLE_SGMV_BM * MOLE_SGMV_RC / MOLE_BLOCK_THREADS;
    const int col = (int)threadIdx.x % MOLE_SGMV_RC;
    const int row0 = (int)threadIdx.x / MOLE_SGMV_RC;
    MOLE_NO_UNROLL
    for (mole_u32 c0 = 0u; c0 < tile.rank; c0 += MOLE_SGMV_RC) {
        float acc[PER_THREAD];
        for (int j = 0; j < PER_THREAD; ++j) acc[j] = 0.0f;
        MOLE_NO_UNROLL
        for (mole_u64 k0 = k_begin; k0 < k_end; k0 += MOLE_SGMV_KC) {
            __syncthreads();  // rows written / the previous chunk consumed
            for (int i = (int)threadIdx.x; i < MOLE_SGMV_BM * MOLE_SGMV_KC; i += (int)blockDim.x) {
                const int r = i / MOLE_SGMV_KC, kk = i % MOLE_SGMV_KC;
                const int t = rows[r];
                const mole_u64 k = k0 + (mole_u64)kk;
                xs[r][kk] = (t >= 0 && k < k_end) ? load_f32(x + (mole_u64)t * p.d_in + k) : 0.0f;
            }
            for (int i = (int)threadIdx.x; i < MOLE_SGMV_KC * MOLE_SGMV_RC; i += (int)blockDim.x) {
                const int kk = i / MOLE_SGMV_RC, c = i % MOLE_SGMV_RC;
                const mole_u64 k = k0 + (mole_u64)kk;
                const mole_u32 cc = c0 + (mole_u32)c;
                as[kk][c] = (k < k_end && cc < tile.rank)
                                ? load_f32(a + k * p.r_total + tile.col_lo + cc)
                                : 0.0f;
            }
            __syncthreads();
            for (int kk = 0; kk < MOLE_SGMV_KC; ++kk) {
                const float av = as[kk][col];
                for (int j = 0; j < PER_THREAD; ++j) acc[j] += xs[row0 + j * ROW_STEP][kk] * av;
            }
        }
        const mole_u32 cc = c0 + (mole_u32)col;
        if (cc < tile.rank) {
            for (int j = 0; j < PER_THREAD; ++j) {
                const int t = rows[row0 + j * ROW_STEP];
                if (t < 0) continue;
                const mole_u64 ts = (mole_u64)t * p.slots + s;
                h_part[((mole_u64)split * rows_total + ts) * p.r_max + cc] = acc[j];
            }
        }
    }
}

// Pass `p.slot`:
//   y[t, n] = round(y[t, n] + (scale * (w[t, s] * s_e)) * sum_c h[t, s, c] * B[col_lo + c, n]).
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(sgmv_expand)(const mole_sgmv_params p, const float* __restrict__ h_part, const elem_t* __restrict__ b,
                            const mole_u32* __restrict__ rank_offsets, const float* __restrict__ expert_scales,
                            const mole_u32* __restrict__ plan_offsets,
                            const mole_sgmv_entry* __restrict__ plan_entries, const float* __restrict__ weights,
                            elem_t* __restrict__ y) {
    __shared__ int rows[MOLE_SGMV_BM];
    __shared__ float hs[MOLE_SGMV_BM][MOLE_SGMV_KC];
    __shared__ float bs[MOLE_SGMV_KC][MOLE_SGMV_BN];
    const mole_u32 s = p.slot;
    const mole_u32* offs = plan_offsets + (mole_u64)s * (p.experts + 1u);
    const mole_sgmv_entry* entries = plan_entries + (mole_u64)s * p.entry_stride;
    const sgmv_tile tile = sgmv_find_tile(p, offs, rank_offsets, blockIdx.x);
    // Rank 0: the delta is exactly zero and y is left untouched (no rounding pass either).
    if (!tile.live || tile.rank == 0u) return;
    sgmv_load_rows(tile, entries, p.tokens, rows);
    __syncthreads();
    const mole_u64 n0 = (mole_u64)blockIdx.y * MOLE_SGMV_BN;
    const mole_u64 rows_total = (mole_u64)p.tokens * p.slots;
    constexpr int ROW_STEP = MOLE_BLOCK_THREADS / MOLE_SGMV_BN;
    constexpr int PER_THREAD = MOLE_SGMV_BM * MOLE_SGMV_BN / MOLE_BLOCK_THREADS;
    const int col = (int)threadIdx.x % MOLE_SGMV_BN;
    const int row0 = (int)threadIdx.x / MOLE_SGMV_BN;
    float acc[PER_THREAD];
    for (int j = 0; j < PER_THREAD; ++j) acc[j] = 0.0f;
    MOLE_NO_UNROLL
    for (mole_u32 c0 = 0u; c0 < tile.rank; c0 += MOLE_SGMV_KC) {
        __syncthreads();  // rows written / the previous chunk consumed
        for (int i = (int)threadIdx.x; i < MOLE_SGMV_BM * MOLE_SGMV_KC; i += (int)blockDim.x) {
            const int r = i / MOLE_SGMV_KC, kk = i % MOLE_SGMV_KC;
            const int t = rows[r];
            const mole_u32 c = c0 + (mole_u32)kk;
            float v = 0.0f;
            if (t >= 0 && c < tile.rank) {
                // Split-K partials summed in split order: deterministic.
                const mole_u64 base = ((mole_u64)t * p.slots + s) * p.r_max + c;
                MOLE_NO_UNROLL
                for (mole_u32 sp = 0u; sp < p.splits; ++sp) v += h_part[(mole_u64)sp * rows_total * p.r_max + base];
            }
            hs[r][kk] = v;
        }
        for (int i = (int)threadIdx.x; i < MOLE_SGMV_KC * MOLE_SGMV_BN; i += (int)blockDim.x) {
            const int kk = i / MOLE_SGMV_BN, n = i % MOLE_SGMV_BN;
            const mole_u32 c = c0 + (mole_u32)kk;
            const mole_u64 nn = n0 + (mole_u64)n;
            bs[kk][n] = (c < tile.rank && nn < p.d_out) ? load_f32(b + (mole_u64)(tile.col_lo + c) * p.d_out + nn)
                                                         : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < MOLE_SGMV_KC; ++kk) {
            const float bv = bs[kk][col];
            for (int j = 0; j < PER_THREAD; ++j) acc[j] += hs[row0 + j * ROW_STEP][kk] * bv;
        }
    }
    const mole_u64 n = n0 + (mole_u64)col;
    if (n >= p.d_out) return;
    const float se = sgmv_expert_scale(tile, expert_scales);
    for (int j = 0; j < PER_THREAD; ++j) {
        const int t = rows[row0 + j * ROW_STEP];
        if (t < 0) continue;
        const float w = weights[(mole_u64)t * p.slots + s] * se;
        elem_t* out = y + (mole_u64)t * p.d_out + n;
        store_from_f32(out, load_f32(out) + (p.scale * w) * acc[j]);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core shrink (f16 / bf16 builds): the same contract as sgmv_shrink, with the x tile
// staged by cp.async (16-byte rows: needs d_in % 8 == 0 and x 16-byte aligned, which the host
// planner checks) and A staged by plain loads (ragged rank offsets are not 16-byte aligned), then
// mma.sync m16n8k16 on fragments read by ldmatrix. With MOLE_SGMV_STAGES == 2 the x tile is
// double buffered: step i+1's copies are committed before step i waits (cp.async.wait_group 1). Warp w computes rows 16*(w / WN) .. +16 and
// rank columns 16*(w % WN) .. +16 of each MMA_RC-column chunk; KM = 32 of d_in per step.
// ---------------------------------------------------------------------------------------------
#if !defined(MOLE_DTYPE_F32)
#include "common/tc.cuh"

#define MOLE_SGMV_MMA_WARPS (MOLE_BLOCK_THREADS / 32)
#define MOLE_SGMV_MMA_WM (MOLE_SGMV_BM / 16)
#define MOLE_SGMV_MMA_WN (MOLE_SGMV_MMA_WARPS / MOLE_SGMV_MMA_WM)
#define MOLE_SGMV_MMA_RC (16 * MOLE_SGMV_MMA_WN)
#define MOLE_SGMV_MMA_KM 32
// Shared rows padded by 8 elements (16 bytes): rows stay 16-byte aligned for ldmatrix and
// consecutive rows fall in different banks.
#define MOLE_SGMV_MMA_XS (MOLE_SGMV_MMA_KM + 8)
#define MOLE_SGMV_MMA_AS (MOLE_SGMV_MMA_RC + 8)
static_assert(MOLE_SGMV_BM % 16 == 0 && MOLE_SGMV_MMA_WARPS % MOLE_SGMV_MMA_WM == 0,
              "mma shrink: BM must be a multiple of 16 and the warps a multiple of BM / 16");
static_assert(MOLE_SGMV_KC % 8 == 0, "mma shrink: split boundaries must stay 8-element aligned");

// Issues (and commits, as one group) the cp.async copies of x[rows, k0 .. k0 + KM) into `xs`:
// 16-byte segments of 8 elements; padding rows and k past the split read nothing (zero fill).
// Segments are whole because k_end and k0 are multiples of 8.
MOLE_DEVICE void sgmv_stage_x(elem_t (*xs)[MOLE_SGMV_MMA_XS], const int* rows, const elem_t* __restrict__ x,
                              mole_u32 d_in, mole_u64 k0, mole_u64 k_end) {
    for (int i = (int)threadIdx.x; i < MOLE_SGMV_BM * (MOLE_SGMV_MMA_KM / 8); i += (int)blockDim.x) {
        const int r = i / (MOLE_SGMV_MMA_KM / 8), seg = i % (MOLE_SGMV_MMA_KM / 8);
        const int t = rows[r];
        const mole_u64 k = k0 + (mole_u64)seg * 8u;
        const bool live = t >= 0 && k < k_end;
        const elem_t* src = live ? x + (mole_u64)t * d_in + k : x;
        mole_cp_async_16_zfill(&xs[r][seg * 8], src, live ? 16 : 0);
    }
    mole_cp_async_commit();
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(sgmv_shrink_mma)(const mole_sgmv_params p, const elem_t* __restrict__ x,
                                const elem_t* __restrict__ a, const mole_u32* __restrict__ rank_offsets,
                                const mole_u32* __restrict__ plan_offsets,
                                const mole_sgmv_entry* __restrict__ plan_entries, float* __restrict__ h_part) {
    __shared__ int rows[MOLE_SGMV_BM];
    __shared__ __align__(16) elem_t xs[MOLE_SGMV_STAGES][MOLE_SGMV_BM][MOLE_SGMV_MMA_XS];
    __shared__ __align__(16) elem_t as[MOLE_SGMV_MMA_KM][MOLE_SGMV_MMA_AS];
    const mole_u32 s = blockIdx.z;
    const mole_u32 split = blockIdx.y;
    const mole_u32* offs = plan_offsets + (mole_u64)s * (p.experts + 1u);
    const mole_sgmv_entry* entries = plan_entries + (mole_u64)s * p.entry_stride;
    const sgmv_tile tile = sgmv_find_tile(p, offs, rank_offsets, blockIdx.x);
    if (!tile.live || tile.rank == 0u) return;  // uniform over the block
    sgmv_load_rows(tile, entries, p.tokens, rows);
    __syncthreads();
    const mole_u64 k_begin = (mole_u64)split * p.k_per_split;
    const mole_u64 k_end_raw = k_begin + p.k_per_split;
    const mole_u64 k_end = k_end_raw < p.d_in ? k_end_raw : (mole_u64)p.d_in;
    const mole_u64 rows_total = (mole_u64)p.tokens * p.slots;
    const int lane = mole_lane();
    const int m0 = 16 * (mole_warp_id() / MOLE_SGMV_MMA_WN);
    const int n0 = 16 * (mole_warp_id() % MOLE_SGMV_MMA_WN);
    MOLE_NO_UNROLL
    for (mole_u32 c0 = 0u; c0 < tile.rank; c0 += MOLE_SGMV_MMA_RC) {
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        int st = 0;  // the stage holding this step's x tile
#if MOLE_SGMV_STAGES == 2
        __syncthreads();  // the previous rank chunk's fragments are read
        sgmv_stage_x(xs[0], rows, x, p.d_in, k_begin, k_end);
#endif
        MOLE_NO_UNROLL
        for (mole_u64 k0 = k_begin; k0 < k_end; k0 += MOLE_SGMV_MMA_KM) {
            __syncthreads();  // the previous step's fragments are read
#if MOLE_SGMV_STAGES == 2
            // Prefetch the next step into the other stage (an empty group after the last step,
            // so that the wait below always leaves exactly the newest group in flight).
            if (k0 + MOLE_SGMV_MMA_KM < k_end)
                sgmv_stage_x(xs[st ^ 1], rows, x, p.d_in, k0 + MOLE_SGMV_MMA_KM, k_end);
            else
                mole_cp_async_commit();
#else
            sgmv_stage_x(xs[0], rows, x, p.d_in, k0, k_end);
#endif
            for (int i = (int)threadIdx.x; i < MOLE_SGMV_MMA_KM * MOLE_SGMV_MMA_RC; i += (int)blockDim.x) {
                const int kk = i / MOLE_SGMV_MMA_RC, c = i % MOLE_SGMV_MMA_RC;
                const mole_u64 k = k0 + (mole_u64)kk;
                const mole_u32 cc = c0 + (mole_u32)c;
                float v = 0.0f;
                if (k < k_end && cc < tile.rank) v = load_f32(a + k * p.r_total + tile.col_lo + cc);
                store_from_f32(&as[kk][c], v);  // exact: v is an elem_t value
            }
            mole_cp_async_wait<MOLE_SGMV_STAGES - 1>();  // this step's x tile has landed
            __syncthreads();
            for (int kk = 0; kk < MOLE_SGMV_MMA_KM; kk += 16) {
                mole_u32 af[4], bf[4];
                mole_ldmatrix_x4(af, &xs[st][m0 + (lane % 16)][kk + (lane / 16) * 8]);
                mole_ldmatrix_x4_trans(bf, &as[kk + (lane % 16)][n0 + (lane / 16) * 8]);
                mole_tc_mma(acc[0], af, bf);
                mole_tc_mma(acc[1], af, bf + 2);
            }
            st = (st + 1) % MOLE_SGMV_STAGES;
        }
        for (int j = 0; j < 2; ++j) {
            for (int q = 0; q < 4; ++q) {
                const int r = m0 + mole_tc_acc_row(lane, q);
                const mole_u32 cc = c0 + (mole_u32)(n0 + mole_tc_acc_col(lane, j, q));
                const int t = rows[r];
                if (t < 0 || cc >= tile.rank) continue;
                const mole_u64 ts = (mole_u64)t * p.slots + s;
                h_part[((mole_u64)split * rows_total + ts) * p.r_max + cc] = acc[j][q];
            }
        }
    }
}
// ---------------------------------------------------------------------------------------------
// Tensor-core expand (f16 / bf16 builds): the same contract as sgmv_expand. Per 16-rank chunk,
// each row's h values (split sums, f32) are scaled by a power of two that brings the row's
// largest |h| of the chunk into [1, 2) (exact; keeps f16 clear of overflow and of subnormal lo
// parts), then split as h = hi + lo with hi = round(h), lo = round(h - hi) in elem_t, so that
// hi + lo carries about twice the dtype's precision. Two mma.sync m16n8k16 (hi, lo) against the
// same B fragment accumulate the chunk in f32; the chunk is unscaled per row into the running
// f32 sum. B is staged by cp.async in 16-byte segments (needs d_out % 8 == 0 and b 16-byte
// aligned, checked by the host planner) and read by ldmatrix.trans. Ranks past r_e and columns
// past d_out are zero filled; warp w computes rows 16*(w / WN) .. +16 and columns
// 16*(w % WN) .. +16 of the block's MMA_BN = 16 * WN columns.
// ---------------------------------------------------------------------------------------------
#define MOLE_SGMV_MMA_BN (16 * MOLE_SGMV_MMA_WN)
#define MOLE_SGMV_MMA_HS (16 + 8)
#define MOLE_SGMV_MMA_BS (MOLE_SGMV_MMA_BN + 8)

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(sgmv_expand_mma)(const mole_sgmv_params p, const float* __restrict__ h_part,
                                const elem_t* __restrict__ b, const mole_u32* __restrict__ rank_offsets,
                                const float* __restrict__ expert_scales, const mole_u32* __restrict__ plan_offsets,
                                const mole_sgmv_entry* __restrict__ plan_entries, const float* __restrict__ weights,
                                elem_t* __restrict__ y) {
    __shared__ int rows[MOLE_SGMV_BM];
    __shared__ float rinv[MOLE_SGMV_BM];  // the inverse of each row's chunk scale
    __shared__ __align__(16) elem_t hhi[MOLE_SGMV_BM][MOLE_SGMV_MMA_HS];
    __shared__ __align__(16) elem_t hlo[MOLE_SGMV_BM][MOLE_SGMV_MMA_HS];
    __shared__ __align__(16) elem_t bs[16][MOLE_SGMV_MMA_BS];
    const mole_u32 s = p.slot;
    const mole_u32* offs = plan_offsets + (mole_u64)s * (p.experts + 1u);
    const mole_sgmv_entry* entries = plan_entries + (mole_u64)s * p.entry_stride;
    const sgmv_tile tile = sgmv_find_tile(p, offs, rank_offsets, blockIdx.x);
    if (!tile.live || tile.rank == 0u) return;  // as sgmv_expand: rank 0 leaves y untouched
    sgmv_load_rows(tile, entries, p.tokens, rows);
    __syncthreads();
    const mole_u64 nb = (mole_u64)blockIdx.y * MOLE_SGMV_MMA_BN;
    const mole_u64 rows_total = (mole_u64)p.tokens * p.slots;
    const int lane = mole_lane();
    const int m0 = 16 * (mole_warp_id() / MOLE_SGMV_MMA_WN);
    const int n0 = 16 * (mole_warp_id() % MOLE_SGMV_MMA_WN);
    const int g = lane / 4;
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    MOLE_NO_UNROLL
    for (mole_u32 c0 = 0u; c0 < tile.rank; c0 += 16u) {
        __syncthreads();  // the previous chunk's fragments and scales are read
        mole_tc_stage_b<MOLE_SGMV_MMA_BN>(&bs[0][0], b, tile.col_lo, c0, tile.rank, nb, p.d_out);
        // Four threads per row, four ranks each (whole warps: BM * 4 is a multiple of 64).
        for (int i = (int)threadIdx.x; i < MOLE_SGMV_BM * 4; i += (int)blockDim.x) {
            const int r = i / 4, q = i % 4;
            const int t = rows[r];
            float v[4];
            float m = 0.0f;
            for (int j = 0; j < 4; ++j) {
                const mole_u32 c = c0 + (mole_u32)(4 * q + j);
                v[j] = 0.0f;
                if (t >= 0 && c < tile.rank) {
                    // Split-K partials summed in split order: deterministic.
                    const mole_u64 base = ((mole_u64)t * p.slots + s) * p.r_max + c;
                    MOLE_NO_UNROLL
                    for (mole_u32 sp = 0u; sp < p.splits; ++sp)
                        v[j] += h_part[(mole_u64)sp * rows_total * p.r_max + base];
                }
                const float a = mole_fabsf(v[j]);
                m = a > m ? a : m;
            }
            for (int d = 1; d < 4; d *= 2) {
                const float o = mole_shfl_xor(m, d);
                m = o > m ? o : m;
            }
            float inv;
            const float sc = mole_tc_chunk_scale(m, &inv);
            if (q == 0) rinv[r] = inv;
            for (int j = 0; j < 4; ++j) mole_tc_split(&hhi[r][4 * q + j], &hlo[r][4 * q + j], v[j] * sc);
        }
        mole_cp_async_wait_all();
        __syncthreads();
        mole_u32 ah[4], al[4], bf[4];
        mole_ldmatrix_x4(ah, &hhi[m0 + (lane % 16)][(lane / 16) * 8]);
        mole_ldmatrix_x4(al, &hlo[m0 + (lane % 16)][(lane / 16) * 8]);
        mole_ldmatrix_x4_trans(bf, &bs[lane % 16][n0 + (lane / 16) * 8]);
        mole_tc_mma_hilo(acc, ah, al, bf, rinv[m0 + g], rinv[m0 + g + 8]);
    }
    const float se = sgmv_expert_scale(tile, expert_scales);
    for (int j = 0; j < 2; ++j) {
        for (int q = 0; q < 4; ++q) {
            const int r = m0 + mole_tc_acc_row(lane, q);
            const mole_u64 n = nb + (mole_u64)(n0 + mole_tc_acc_col(lane, j, q));
            const int t = rows[r];
            if (t < 0 || n >= p.d_out) continue;
            const float w = weights[(mole_u64)t * p.slots + s] * se;
            elem_t* out = y + (mole_u64)t * p.d_out + n;
            store_from_f32(out, load_f32(out) + (p.scale * w) * acc[j][q]);
        }
    }
}
#endif
