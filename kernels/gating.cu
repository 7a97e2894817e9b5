// Gating: router scores z [T, E] to per-token slots ids [T, slots] (int32, -1 = empty) and
// weights [T, slots] (f32), plus optional probabilities probs [T, E] (f32) for router statistics.
// The per-token rules live in common/routing.cuh (shared with the fused layer kernels); this
// file holds the standalone entry points: one warp routes one token, grid-stride over tokens,
// staging its keys in its slice of dynamic shared memory. Router statistics and the routing
// plan follow. Mirrored by src/kernels/gating.rs.
#include "common/arch.cuh"
#include "common/dtype.cuh"
#include "common/routing.cuh"
#include "common/warp.cuh"

// Threads per block of every kernel in this file (a multiple of 32, at most 1024).
#ifndef MOLE_BLOCK_THREADS
#define MOLE_BLOCK_THREADS 128
#endif
#if MOLE_BLOCK_THREADS % 32 != 0 || MOLE_BLOCK_THREADS < 32 || MOLE_BLOCK_THREADS > 1024
#error "MOLE_BLOCK_THREADS must be a multiple of 32 in 32..1024"
#endif
// Each warp owns E words of dynamic shared memory; a declared budget must cover E = 1024.
#if defined(MOLE_DYNAMIC_SMEM_BYTES) && MOLE_DYNAMIC_SMEM_BYTES < MOLE_BLOCK_THREADS / 32 * MOLE_GATING_MAX_EXPERTS * 4
#error "MOLE_DYNAMIC_SMEM_BYTES is below (MOLE_BLOCK_THREADS / 32) * 1024 * 4"
#endif

// The block's dynamic shared memory (the only shared memory this file uses), and the warp's
// `len` words of it.
MOLE_DEVICE mole_u32* block_smem() {
    extern __shared__ mole_u32 mole_smem[];
    return mole_smem;
}
MOLE_DEVICE mole_u32* warp_smem(mole_u32 len) { return block_smem() + (mole_u64)mole_warp_id() * len; }
MOLE_DEVICE float* as_floats(mole_u32* words) { return reinterpret_cast<float*>(words); }

// Warp-granular grid-stride loops (over tokens, or over chunks).
MOLE_DEVICE mole_u64 first_warp_item() { return (mole_u64)blockIdx.x * mole_warps_per_block() + mole_warp_id(); }
MOLE_DEVICE mole_u64 warp_item_stride() { return (mole_u64)gridDim.x * mole_warps_per_block(); }

// ---------------------------------------------------------------------------------------------
// Routing entry points. The scores kernels share one signature:
//   (params, scores [T, E], selection_bias [E] or null, ids [T, slots], weights [T, slots],
//    probs [T, E] or null)
// Launch: warps = tokens in flight per block, dynamic shared memory (threads / 32) * E * 4 bytes.
// ---------------------------------------------------------------------------------------------

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_softmax_topk)(const mole_gating_params p, const elem_t* __restrict__ scores,
                                    const elem_t* __restrict__ /* selection_bias: unused */, int* __restrict__ ids,
                                    float* __restrict__ weights, float* __restrict__ probs) {
    float* row = as_floats(warp_smem(p.experts));
    for (mole_u64 t = first_warp_item(); t < p.tokens; t += warp_item_stride())
        token_softmax_topk(p, row, scores + t * p.experts, ids + t * p.slots, weights + t * p.slots,
                           probs ? probs + t * p.experts : nullptr);
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_softmax_prefix)(const mole_gating_params p, const elem_t* __restrict__ scores,
                                      const elem_t* __restrict__ /* selection_bias: unused */, int* __restrict__ ids,
                                      float* __restrict__ weights, float* __restrict__ probs) {
    float* row = as_floats(warp_smem(p.experts));
    for (mole_u64 t = first_warp_item(); t < p.tokens; t += warp_item_stride())
        token_softmax_prefix(p, row, scores + t * p.experts, ids + t * p.slots, weights + t * p.slots,
                             probs ? probs + t * p.experts : nullptr);
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_sigmoid_topk)(const mole_gating_params p, const elem_t* __restrict__ scores,
                                    const elem_t* __restrict__ bias, int* __restrict__ ids,
                                    float* __restrict__ weights, float* __restrict__ probs) {
    float* row = as_floats(warp_smem(p.experts));
    for (mole_u64 t = first_warp_item(); t < p.tokens; t += warp_item_stride())
        token_sigmoid_topk(p, row, scores + t * p.experts, bias, ids + t * p.slots, weights + t * p.slots,
                           probs ? probs + t * p.experts : nullptr);
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_magnitude_topk)(const mole_gating_params p, const elem_t* __restrict__ scores,
                                      const elem_t* __restrict__ bias, int* __restrict__ ids,
                                      float* __restrict__ weights, float* __restrict__ /* probs: none */) {
    float* row = as_floats(warp_smem(p.experts));
    for (mole_u64 t = first_warp_item(); t < p.tokens; t += warp_item_stride())
        token_magnitude_topk(p, row, scores + t * p.experts, bias, ids + t * p.slots, weights + t * p.slots);
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_given)(const mole_gating_params p, const elem_t* __restrict__ scores,
                             const elem_t* __restrict__ /* selection_bias: unused */, int* __restrict__ ids,
                             float* __restrict__ weights, float* __restrict__ probs) {
    float* row = as_floats(warp_smem(p.experts));
    for (mole_u64 t = first_warp_item(); t < p.tokens; t += warp_item_stride())
        token_given(p, row, scores + t * p.experts, ids + t * p.slots, weights + t * p.slots,
                    probs ? probs + t * p.experts : nullptr);
}

// Adapter ids [T] to slots: (id, 1), or (-1, 0) for id -1; one thread per token, no shared memory.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_adapter_ids)(const mole_gating_params p, const int* __restrict__ adapter_ids,
                                   int* __restrict__ ids, float* __restrict__ weights) {
    const mole_u64 stride = (mole_u64)gridDim.x * blockDim.x;
    for (mole_u64 t = (mole_u64)blockIdx.x * blockDim.x + threadIdx.x; t < p.tokens; t += stride) {
        const int id = adapter_ids[t];
        for (mole_u32 j = 0; j < p.slots; ++j) {
            ids[t * p.slots + j] = j == 0 ? id : -1;
            weights[t * p.slots + j] = j == 0 && id != -1 ? 1.0f : 0.0f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Counting experts 32 entries at a time: lanes holding the same expert form a group (match_any);
// the group's first lane updates the expert's counter, so no two lanes write one counter and no
// atomics are needed. The experts counted are a window [base, base + E) of `global` experts (an
// expert-parallel shard; base 0 and global E for a whole layer) and are numbered from 0 within
// it. Other ids are skipped: -1 (an empty slot) and ids of other windows silently, ids outside
// -1..global as invalid.
// ---------------------------------------------------------------------------------------------

struct mole_experts {
    int base;    // first expert of the window
    int count;   // E: experts in the window
    int global;  // experts of the whole layer (ids in -1..global are valid)
};

struct mole_group {
    bool valid;      // the lane holds an expert id in the window
    int id;          // the id within the window (-1 when not valid)
    int rank;        // lanes of the same group below this one
    int size;        // lanes in the group
    bool invalid;    // the lane holds an id outside -1..global
};

MOLE_DEVICE mole_group group_entry(const int* ids, mole_u64 i, mole_u64 end, mole_experts x, mole_u64 stride = 1) {
    const int raw = i < end ? ids[i * stride] : -1;
    // raw >= base >= 0 first, so raw - base cannot overflow.
    const bool valid = raw >= x.base && raw - x.base < x.count;
    const int id = valid ? raw - x.base : -1;
    const mole_u32 peers = mole_match_any(id);
    return mole_group{valid, id, mole_popc(peers & mole_lanes_below()), mole_popc(peers), raw < -1 || raw >= x.global};
}

// Per-expert counts of ids[begin, end) into cnt[E]; returns whether any lane saw an invalid id.
MOLE_DEVICE bool count_experts(mole_u32* cnt, const int* ids, mole_u64 begin, mole_u64 end, mole_experts x,
                               mole_u64 stride = 1) {
    for (int e = mole_lane(); e < x.count; e += MOLE_WARP_SIZE) cnt[e] = 0;
    mole_syncwarp();
    bool invalid = false;
    for (mole_u64 base = begin; base < end; base += MOLE_WARP_SIZE) {
        const mole_group g = group_entry(ids, base + mole_lane(), end, x, stride);
        invalid = invalid || g.invalid;
        if (g.valid && g.rank == 0) cnt[g.id] += g.size;
        mole_syncwarp();
    }
    return mole_warp_any(invalid);
}

// ---------------------------------------------------------------------------------------------
// Router statistics (src/reference/stats.rs), reduced deterministically without atomics: warp c
// reduces token chunk c into row c of the workspace in a fixed order, then one block sums the
// rows in chunk order.
//   workspace: counts u32 [chunks][2E] (selections, first-slot selections), then sums
//   f32 [chunks][2E + 2] (probability sums, masked probability sums, z-loss sum, entropy sum).
//   out f32 [4E + 2]: selected_fraction [E], top1_fraction [E], mean_prob [E],
//   masked_mean_prob [E], z_loss, entropy (0 where absent).
// ---------------------------------------------------------------------------------------------

struct mole_stats_params {
    mole_u32 tokens;              // T
    mole_u32 experts;             // E
    mole_u32 slots;               // row length of ids
    mole_u32 chunk_tokens;        // tokens per chunk (one warp each)
    mole_u32 chunks;              // ceil(T / chunk_tokens)
    mole_u32 has_probs;           // 1: probs [T, E] given (mean_prob, masked_mean_prob, entropy)
    mole_u32 has_scores;          // 1: scores [T, E] given (z-loss)
    mole_entropy_kind entropy;    // entropy of the probabilities, or none
    float q;                      // Tsallis index
    float entropy_scale;          // 1 / entropy of the uniform distribution (ln E or 1 - E^(1-q))
    float entropy_eps;            // added to each probability before the entropy
};
static_assert(sizeof(mole_stats_params) == 44, "mole_stats_params layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, tokens) == 0, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, experts) == 4, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, slots) == 8, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, chunk_tokens) == 12, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, chunks) == 16, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, has_probs) == 20, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, has_scores) == 24, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, entropy) == 28, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, q) == 32, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, entropy_scale) == 36, "layout");
static_assert(MOLE_OFFSET_OF(mole_stats_params, entropy_eps) == 40, "layout");

// Grid: one warp per chunk; dynamic shared memory (threads / 32) * E * 4 bytes.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_stats_partial)(const mole_stats_params p, const int* __restrict__ ids,
                                     const float* __restrict__ probs, const elem_t* __restrict__ scores,
                                     mole_u32* __restrict__ workspace) {
    const int n = (int)p.experts;
    mole_u32* cnt = warp_smem(p.experts);
    for (mole_u64 c = first_warp_item(); c < p.chunks; c += warp_item_stride()) {
        const mole_u64 t0 = c * p.chunk_tokens;
        const mole_u32 len = (mole_u32)(p.tokens - t0 < p.chunk_tokens ? p.tokens - t0 : p.chunk_tokens);
        mole_u32* ws_cnt = workspace + c * 2 * p.experts;
        float* ws_sum = as_floats(workspace + (mole_u64)p.chunks * 2 * p.experts) + c * (2 * p.experts + 2);
        // Per token, in order; every lane holds the same sums. (First: after the per-expert passes
        // below, ptxas spills on sm_90.)
        float z_loss = 0.0f, entropy = 0.0f;
        if (p.has_scores)
            for (mole_u32 i = 0; i < len; ++i) z_loss += token_z_loss(scores + (t0 + i) * p.experts, n);
        if (p.has_probs && p.entropy != MOLE_ENTROPY_NONE)
            for (mole_u32 i = 0; i < len; ++i)
                entropy += token_entropy(probs + (t0 + i) * p.experts, n, p.entropy, p.q, p.entropy_eps,
                                         p.entropy_scale);
        if (mole_lane() == 0) {
            ws_sum[2 * n] = z_loss;
            ws_sum[2 * n + 1] = entropy;
        }
        count_experts(cnt, ids, t0 * p.slots, (t0 + len) * p.slots, mole_experts{0, n, n});
        // Per expert, tokens in order (lanes read neighbouring experts: coalesced).
        for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
            ws_cnt[e] = cnt[e];
            ws_cnt[n + e] = 0;
            float acc = 0.0f;
            if (p.has_probs) {
                const float* col = probs + t0 * p.experts + e;
                for (mole_u32 i = 0; i < len; ++i, col += p.experts) acc += *col;
            }
            ws_sum[e] = acc;
            ws_sum[n + e] = 0.0f;
        }
        // Tokens in order: the lane owning the first slot's expert counts it; with probabilities,
        // p ⊙ mask: the token's slots flag their experts in cnt (ids of one token are distinct; a
        // repeated id would write the same flag), then each lane adds its own flagged experts'
        // probabilities. Every lane touches only its own experts' workspace entries.
        MOLE_NO_UNROLL
        for (mole_u32 i = 0; i < len; ++i) {
            const mole_u64 t = t0 + i;
            const int first = ids[t * p.slots];
            if (first >= 0 && first < n && first % MOLE_WARP_SIZE == mole_lane()) ws_cnt[n + first] += 1;
            if (!p.has_probs) continue;
            for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) cnt[e] = 0;
            mole_syncwarp();
            for (mole_u32 j = mole_lane(); j < p.slots; j += MOLE_WARP_SIZE) {
                const int id = ids[t * p.slots + j];
                if (id >= 0 && id < n) cnt[id] = 1;
            }
            mole_syncwarp();
            for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE)
                if (cnt[e]) ws_sum[n + e] += probs[t * p.experts + e];
        }
        mole_syncwarp();  // cnt is reused by the next chunk
    }
}

// Grid: one block. Sums the chunk rows in chunk order and divides by T (zeros when T = 0).
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_stats_finalize)(const mole_stats_params p, const mole_u32* __restrict__ workspace,
                                      float* __restrict__ out) {
    const mole_u64 counts = 2 * (mole_u64)p.experts, row = counts + 2;
    const float* sums = reinterpret_cast<const float*>(workspace + (mole_u64)p.chunks * counts);
    const float inv_t = p.tokens == 0 ? 0.0f : 1.0f / (float)p.tokens;
    for (mole_u64 e = threadIdx.x; e < row; e += blockDim.x) {
        mole_u64 count = 0;
        float sum = 0.0f;
        for (mole_u64 c = 0; c < p.chunks; ++c) {
            if (e < counts) count += workspace[c * counts + e];
            sum += sums[c * row + e];
        }
        if (e < counts) out[e] = (float)count * inv_t;  // selected_fraction [E], top1_fraction [E]
        out[counts + e] = sum * inv_t;  // mean_prob [E], masked_mean_prob [E], then z_loss and entropy
    }
}

// ---------------------------------------------------------------------------------------------
// Routing plan (src/plan.rs) as a three-phase counting sort, deterministic by construction:
//   1. plan_count: warp c counts the experts of entry chunk c -> workspace [chunks][E] (+ flags);
//   2. plan_scan (one block): per expert, exclusive prefix over chunks; counts; padded offsets;
//      padding entries; status;
//   3. plan_scatter: warp c writes its chunk's entries in order from its per-expert bases.
// Entry i = t * slots + s is (token t, slot s). Tokens are ascending inside each segment because
// chunks and the entries inside a chunk are visited in order. The plan covers experts
// [expert_base, expert_base + E) of global_experts, numbered from 0 (an expert-parallel shard;
// base 0 and global_experts = E for a whole layer); -1 and the other shards' ids are skipped,
// ids outside -1..global_experts are skipped and reported in status (1). Duplicate experts within
// a token are not detected here.
//   workspace: chunk counts u32 [chunks][E], then an invalid-id flag u32 [chunks].
// Column mode (slots = 1, ids_stride = row length): entry i = (token i, slot 0) reads
// ids[i * ids_stride + column]; counts, offsets, entries and status go to column * E,
// column * (E + 1), column * entry_stride and column, and entries [offsets[E], entry_stride) of
// the plan are filled with padding. The full plan is ids_stride = 1, column = entry_stride = 0.
// ---------------------------------------------------------------------------------------------

struct mole_plan_params {
    mole_u32 tokens;          // T
    mole_u32 slots;           // row length of ids
    mole_u32 experts;         // E
    mole_u32 block;           // segment granularity (1 = no padding)
    mole_u32 chunk_entries;   // entries per chunk (one warp each)
    mole_u32 chunks;          // ceil(T * slots / chunk_entries)
    mole_u32 ids_stride;      // ids element distance between entries (1: the full plan)
    mole_u32 column;          // column of ids read, and the index of the plan written
    mole_u32 entry_stride;    // entries between two plans, all written (0: the full plan)
    mole_u32 expert_base;     // ids in [expert_base, expert_base + E) are planned, as id - expert_base
    mole_u32 global_experts;  // ids in -1..global_experts outside that window are skipped silently
};
static_assert(sizeof(mole_plan_params) == 44, "mole_plan_params layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, tokens) == 0, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, slots) == 4, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, experts) == 8, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, block) == 12, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, chunk_entries) == 16, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, chunks) == 20, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, ids_stride) == 24, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, column) == 28, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, entry_stride) == 32, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, expert_base) == 36, "layout");
static_assert(MOLE_OFFSET_OF(mole_plan_params, global_experts) == 40, "layout");

MOLE_DEVICE mole_experts plan_experts(const mole_plan_params& p) {
    return mole_experts{(int)p.expert_base, (int)p.experts, (int)p.global_experts};
}

// plan::TokenSlot.
struct mole_token_slot {
    mole_u32 token, slot;
};
static_assert(sizeof(mole_token_slot) == 8 && MOLE_OFFSET_OF(mole_token_slot, slot) == 4, "TokenSlot");

MOLE_DEVICE mole_u64 chunk_end(const mole_plan_params& p, mole_u64 c) {
    const mole_u64 total = (mole_u64)p.tokens * p.slots, end = (c + 1) * p.chunk_entries;
    return end < total ? end : total;
}

// Grid: one warp per chunk; dynamic shared memory (threads / 32) * E * 4 bytes.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_plan_count)(const mole_plan_params p, const int* __restrict__ ids,
                                  mole_u32* __restrict__ workspace) {
    mole_u32* cnt = warp_smem(p.experts);
    ids += p.column;
    for (mole_u64 c = first_warp_item(); c < p.chunks; c += warp_item_stride()) {
        const bool invalid =
            count_experts(cnt, ids, c * p.chunk_entries, chunk_end(p, c), plan_experts(p), p.ids_stride);
        for (mole_u32 e = mole_lane(); e < p.experts; e += MOLE_WARP_SIZE) workspace[c * p.experts + e] = cnt[e];
        if (mole_lane() == 0) workspace[(mole_u64)p.chunks * p.experts + c] = invalid ? 1u : 0u;
        mole_syncwarp();  // cnt is reused by the next chunk
    }
}

// Exclusive prefix sum over the block of one value per thread; `total` gets the sum of all.
// Uses the first 32 words of dynamic shared memory.
MOLE_DEVICE mole_u32 block_exclusive_scan(mole_u32 v, mole_u32& total) {
    mole_u32* warp_sums = block_smem();
    const mole_u32 incl = mole_warp_inclusive_scan(v);
    if (mole_lane() == MOLE_WARP_SIZE - 1) warp_sums[mole_warp_id()] = incl;
    __syncthreads();
    mole_u32 before = 0;
    total = 0;
    for (int w = 0; w < mole_warps_per_block(); ++w) {
        if (w < mole_warp_id()) before += warp_sums[w];
        total += warp_sums[w];
    }
    __syncthreads();  // warp_sums may be reused by a later call
    return before + incl - v;
}

MOLE_DEVICE mole_u32 padded(mole_u32 count, mole_u32 block) { return (count + block - 1) / block * block; }

// Grid: one block; dynamic shared memory 128 bytes. Writes counts [E], offsets [E + 1], the
// padding entries and status [1] (1 when an id outside -1..global_experts was skipped).
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_plan_scan)(const mole_plan_params p, mole_u32* __restrict__ workspace,
                                 mole_u32* __restrict__ counts, mole_u32* __restrict__ offsets,
                                 mole_token_slot* __restrict__ entries, mole_u32* __restrict__ status) {
    const mole_u32 n = p.experts, tid = threadIdx.x;
    counts += (mole_u64)p.column * n;
    offsets += (mole_u64)p.column * (n + 1);
    entries += (mole_u64)p.column * p.entry_stride;
    status += p.column;
    // Per expert: exclusive prefix of its chunk counts (in chunk order) and its total.
    for (mole_u32 e = tid; e < n; e += blockDim.x) {
        mole_u32 run = 0;
        for (mole_u64 c = 0; c < p.chunks; ++c) {
            const mole_u32 v = workspace[c * n + e];
            workspace[c * n + e] = run;
            run += v;
        }
        counts[e] = run;
    }
    __syncthreads();
    // Padded segment starts: each thread scans a contiguous range of experts.
    const mole_u32 per = (n + blockDim.x - 1) / blockDim.x;
    const mole_u32 lo = tid * per < n ? tid * per : n, hi = lo + per < n ? lo + per : n;
    mole_u32 sum = 0, total = 0;
    for (mole_u32 e = lo; e < hi; ++e) sum += padded(counts[e], p.block);
    mole_u32 start = block_exclusive_scan(sum, total);
    for (mole_u32 e = lo; e < hi; ++e) {
        offsets[e] = start;
        start += padded(counts[e], p.block);
    }
    if (tid == 0) {
        offsets[n] = total;
        mole_u32 invalid = 0;
        for (mole_u64 c = 0; c < p.chunks; ++c) invalid |= workspace[(mole_u64)p.chunks * n + c];
        status[0] = invalid;
    }
    __syncthreads();
    // Chunk bases become absolute; padding fills each segment's tail (and a column plan's tail).
    const mole_token_slot padding{0xffffffffu, 0xffffffffu};  // TokenSlot::PADDING
    for (mole_u32 e = tid; e < n; e += blockDim.x) {
        const mole_u32 o = offsets[e];
        for (mole_u64 c = 0; c < p.chunks; ++c) workspace[c * n + e] += o;
        for (mole_u32 i = o + counts[e]; i < offsets[e + 1]; ++i) entries[i] = padding;
    }
    for (mole_u32 i = offsets[n] + tid; i < p.entry_stride; i += blockDim.x) entries[i] = padding;
}

// Grid: one warp per chunk; dynamic shared memory (threads / 32) * E * 4 bytes.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(gating_plan_scatter)(const mole_plan_params p, const int* __restrict__ ids,
                                    const mole_u32* __restrict__ workspace, mole_token_slot* __restrict__ entries) {
    mole_u32* cursor = warp_smem(p.experts);
    ids += p.column;
    entries += (mole_u64)p.column * p.entry_stride;
    for (mole_u64 c = first_warp_item(); c < p.chunks; c += warp_item_stride()) {
        for (mole_u32 e = mole_lane(); e < p.experts; e += MOLE_WARP_SIZE) cursor[e] = workspace[c * p.experts + e];
        mole_syncwarp();
        const mole_u64 end = chunk_end(p, c);
        for (mole_u64 base = c * p.chunk_entries; base < end; base += MOLE_WARP_SIZE) {
            const mole_u64 i = base + mole_lane();
            const mole_group g = group_entry(ids, i, end, plan_experts(p), p.ids_stride);
            const mole_token_slot entry{(mole_u32)(i / p.slots), (mole_u32)(i % p.slots)};
            if (g.valid) entries[cursor[g.id] + g.rank] = entry;
            mole_syncwarp();  // every lane has read its cursor before the group's first lane moves it
            if (g.valid && g.rank == 0) cursor[g.id] += g.size;
            mole_syncwarp();
        }
    }
}
