// The fused MoLE layer: router, gating, shrink, mix and expand of a tile of BT tokens in one
// pass, for every mix, with the semantics of src/reference/layer.rs:
//   hz[t]     = x[t] . [A | W_g]             shrink, plus the router columns when the router reads x
//   z[t]      = router scores                x router: those columns (+ b); h router: h . W_r (+ b);
//                                            low-rank router: h; logits or given weights: loaded
//   ids, w[t] = rule(z[t])                   common/routing.cuh, one warp per token
//   h'[t]     = mix(h[t]; ids, w)            expert scale: each column times the summed weights of
//                                            the selected experts owning it; core merge (CoMoL):
//                                            h . sum_s w_s C_ids
//   h'[t, c] *= s_e                          optional per-expert scales (expert_scales, one per
//                                            bank expert; null: all 1): e the bank expert owning
//                                            column c (core merge: expert 0 owns every column)
//   y[t]      = round(y[t] + scale h'[t] . B)  each y element read once and written once
//
// The tile's hz [BT, R + E] (f32) lives in shared memory from the shrink to the expand: x is read
// once, y read and written once, and every sum has a fixed order, so results are deterministic.
// Entry points:
//   fused_layer          one launch, grid = token tiles: the whole layer;
//   fused_split_shrink   small T: grid = token tiles x d_in slices, partial hz into a workspace;
//   fused_split_expand   then grid = token tiles x d_out blocks: sums the slices in order, routes
//                        and mixes (every d_out block redundantly; the first writes the routing
//                        outputs and statistics) and expands its d_out columns.
// Route-only launches (expand = 0, R = 0) compute the router columns and the routing alone: the
// first stage of the grouped path. Optional outputs: ids / weights [T, slots], probabilities
// [T, E], and per-tile router-statistics rows in the layout of gating_stats_finalize.
// Mirrored by src/kernels/fused.rs.
#include "common/arch.cuh"
#include "common/dtype.cuh"
#include "common/routing.cuh"
#include "common/warp.cuh"

// Threads per block of every kernel in this file.
#ifndef MOLE_BLOCK_THREADS
#define MOLE_BLOCK_THREADS 256
#endif
// Tokens per tile (a multiple of the warps per block).
#ifndef MOLE_FUSED_BT
#define MOLE_FUSED_BT 16
#endif
// Reduction chunk of the shrink staged in shared memory.
#ifndef MOLE_FUSED_KC
#define MOLE_FUSED_KC 32
#endif
// Most shrink columns (R, plus E for the x router) a build holds in registers.
#ifndef MOLE_FUSED_MAX_COLS
#define MOLE_FUSED_MAX_COLS 256
#endif

#define MOLE_FUSED_WARPS (MOLE_BLOCK_THREADS / MOLE_WARP_SIZE)
static_assert(MOLE_BLOCK_THREADS % 32 == 0 && MOLE_BLOCK_THREADS >= 32 && MOLE_BLOCK_THREADS <= 1024,
              "MOLE_BLOCK_THREADS must be a multiple of 32 in 32..1024");
static_assert(MOLE_FUSED_BT % MOLE_FUSED_WARPS == 0, "MOLE_FUSED_BT must be a multiple of the warps per block");
static_assert(MOLE_FUSED_KC >= 1 && MOLE_FUSED_MAX_COLS % 32 == 0 && MOLE_FUSED_MAX_COLS >= 32, "tile sizes");

// Where the router scores come from (Rust: RouterKind).
enum mole_router_kind : mole_u32 {
    MOLE_ROUTER_NONE = 0,      // given weights or adapter ids (the gate input is loaded as is)
    MOLE_ROUTER_X = 1,         // x . W_g: the shrink's extra columns
    MOLE_ROUTER_H = 2,         // h . W_r
    MOLE_ROUTER_LOW_RANK = 3,  // h itself (rank-1 experts)
    MOLE_ROUTER_LOGITS = 4,    // given logits
};

// The mix in the low-rank space (Rust: MixKind).
enum mole_mix_kind : mole_u32 {
    MOLE_MIX_EXPERT_SCALE = 0,
    MOLE_MIX_CORE_MERGE = 1,
};

// Parameters of every kernel in this file, by value (Rust: FusedParams). The first 64 bytes are
// the routing rule's parameters (gate.tokens = T, gate.experts = E routed, gate.slots).
struct mole_fused_params {
    mole_gating_params gate;
    mole_u32 d_in;                  // row length of x, rows of A and W_g
    mole_u32 d_out;                 // row length of y and B
    mole_u32 rank;                  // R: columns of A, rows of B (0 for a route-only launch)
    mole_u32 cols;                  // R + E: row length of the hz tile
    mole_u32 shrink_cols;           // columns the shrink computes: R, plus E for the x router
    mole_router_kind router;        // the score source
    mole_mix_kind mix;              // the mix
    mole_u32 use_router_bias;       // 1: add router_bias [E] to the scores
    mole_u32 expand;                // 0: route only (no mix, no expand, y untouched)
    mole_u32 splits;                // split variant: d_in slices (1 otherwise)
    mole_u32 k_per_split;           // d_in per slice (a multiple of KC)
    mole_u32 n_per_block;           // split expand: d_out columns per block
    mole_u32 stats;                 // 1: write per-tile statistics rows
    mole_u32 stats_probs;           // statistics: probabilities exist (mean_prob, entropy)
    mole_u32 stats_scores;          // statistics: raw scores exist (z-loss)
    mole_entropy_kind stats_entropy;  // statistics: the entropy of the probabilities, or none
    float stats_q;                  // Tsallis index of the statistics' entropy
    float stats_entropy_scale;      // 1 / entropy of the uniform distribution
    float scale;                    // delta scale
    mole_u32 tiles;                 // ceil(T / BT): rows of the statistics workspace
    float stats_entropy_eps;        // statistics: added to each probability before the entropy
};
static_assert(sizeof(mole_fused_params) == 148, "mole_fused_params layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, d_in) == 64, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, d_out) == 68, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, rank) == 72, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, cols) == 76, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, shrink_cols) == 80, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, router) == 84, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, mix) == 88, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, use_router_bias) == 92, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, expand) == 96, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, splits) == 100, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, k_per_split) == 104, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, n_per_block) == 108, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, stats) == 112, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, stats_probs) == 116, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, stats_scores) == 120, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, stats_entropy) == 124, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, stats_q) == 128, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, stats_entropy_scale) == 132, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, scale) == 136, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, tiles) == 140, "layout");
static_assert(MOLE_OFFSET_OF(mole_fused_params, stats_entropy_eps) == 144, "layout");

// The tensors after the shrink's, in one struct so the stages take them together.
struct fused_gate_tensors {
    const elem_t* router_weight;   // W_g [d_in, E] (x router, read by the shrink) or W_r [R, E]
    const elem_t* router_bias;     // [E]
    const elem_t* gate_in;         // logits or given weights [T, E]
    const int* adapter_ids;        // [T]
    const elem_t* selection_bias;  // [E]
    const mole_u32* rank_offsets;  // [E + 1]
    const float* expert_scales;    // [bank experts] or null (all 1)
    const elem_t* cores;           // CoMoL [C, R, R]
    int* out_ids;                  // [T, slots] or null
    float* out_weights;            // [T, slots] or null
    float* out_probs;              // [T, E] or null
    mole_u32* stats_ws;            // counts u32 [tiles][2E], then sums f32 [tiles][2E + 2]; or null
};

// The block's dynamic shared memory, carved as src/kernels/fused.rs::smem_words counts it (in
// 4-byte words): hz [BT, cols], the shrink's x and W chunks (shrinking launches only), the
// warps' routing rows [warps, E], probabilities [BT, E], ids and weights [BT, slots], and
// per-token z-loss and entropy [BT] each.
struct fused_smem {
    float* hz;
    float* xs;
    float* ws;
    float* row;
    float* probs;
    int* ids;
    float* w;
    float* z_loss;
    float* entropy;
    float* end;  // the first word after the common regions (the tensor-core kernel's start)
};

MOLE_DEVICE fused_smem fused_carve(const mole_fused_params& p, bool shrinks) {
    // 16-byte aligned: the tensor-core regions (cp.async, ldmatrix) are carved from it.
    extern __shared__ __align__(16) float mole_fused_smem[];
    float* at = mole_fused_smem;
    fused_smem s;
    s.hz = at;
    at += MOLE_FUSED_BT * p.cols;
    s.xs = at;
    s.ws = at + (shrinks ? MOLE_FUSED_BT * MOLE_FUSED_KC : 0);
    if (shrinks) at += MOLE_FUSED_BT * MOLE_FUSED_KC + MOLE_FUSED_KC * p.shrink_cols;
    s.row = at;
    at += MOLE_FUSED_WARPS * p.gate.experts;
    s.probs = at;
    at += MOLE_FUSED_BT * p.gate.experts;
    s.ids = reinterpret_cast<int*>(at);
    at += MOLE_FUSED_BT * p.gate.slots;
    s.w = at;
    at += MOLE_FUSED_BT * p.gate.slots;
    s.z_loss = at;
    s.entropy = at + MOLE_FUSED_BT;
    s.end = at + 2 * MOLE_FUSED_BT;
    return s;
}

// out[i * stride + c] = sum over k in [k_begin, k_end) of x[t0 + i, k] * W[k, c] for the BT rows
// and c < shrink_cols, W = [A | W_g]; rows past T come out zero. Warp w owns rows w, w + warps,
// ...; lane l owns columns l, l + 32, ...
MOLE_DEVICE void shrink_tile(const mole_fused_params& p, const elem_t* __restrict__ x, const elem_t* __restrict__ a,
                             const elem_t* __restrict__ wg, mole_u64 t0, mole_u64 k_begin, mole_u64 k_end,
                             const fused_smem& s, float* out, mole_u32 stride, bool rows_past_t) {
    constexpr int ROWS = MOLE_FUSED_BT / MOLE_FUSED_WARPS;
    constexpr int GROUPS = MOLE_FUSED_MAX_COLS / MOLE_WARP_SIZE;
    const int lane = mole_lane(), warp = mole_warp_id();
    const mole_u32 sc = p.shrink_cols, r = p.rank, e_n = p.gate.experts;
    float acc[ROWS][GROUPS];
    for (int j = 0; j < ROWS; ++j)
        for (int g = 0; g < GROUPS; ++g) acc[j][g] = 0.0f;
    MOLE_NO_UNROLL
    for (mole_u64 k0 = k_begin; k0 < k_end; k0 += MOLE_FUSED_KC) {
        __syncthreads();  // the previous chunk is consumed
        for (int i = (int)threadIdx.x; i < MOLE_FUSED_BT * MOLE_FUSED_KC; i += (int)blockDim.x) {
            const mole_u64 t = t0 + (mole_u64)(i / MOLE_FUSED_KC), k = k0 + (mole_u64)(i % MOLE_FUSED_KC);
            s.xs[i] = (t < p.gate.tokens && k < k_end) ? load_f32(x + t * p.d_in + k) : 0.0f;
        }
        for (mole_u32 i = threadIdx.x; i < MOLE_FUSED_KC * sc; i += blockDim.x) {
            const mole_u32 c = i % sc;
            const mole_u64 k = k0 + (mole_u64)(i / sc);
            float v = 0.0f;
            if (k < k_end) v = c < r ? load_f32(a + k * r + c) : load_f32(wg + k * e_n + (c - r));
            s.ws[i] = v;
        }
        __syncthreads();
        for (int kk = 0; kk < MOLE_FUSED_KC; ++kk) {
            float xv[ROWS];
            for (int j = 0; j < ROWS; ++j) xv[j] = s.xs[(warp + j * MOLE_FUSED_WARPS) * MOLE_FUSED_KC + kk];
            for (int g = 0; g < GROUPS; ++g) {
                const mole_u32 c = (mole_u32)(lane + g * MOLE_WARP_SIZE);
                if ((mole_u32)(g * MOLE_WARP_SIZE) >= sc) break;  // uniform over the warp
                const float wv = c < sc ? s.ws[kk * sc + c] : 0.0f;
                for (int j = 0; j < ROWS; ++j) acc[j][g] += xv[j] * wv;
            }
        }
    }
    for (int j = 0; j < ROWS; ++j) {
        const int i = warp + j * MOLE_FUSED_WARPS;
        if (!rows_past_t && t0 + (mole_u64)i >= p.gate.tokens) continue;
        for (int g = 0; g < GROUPS; ++g) {
            const mole_u32 c = (mole_u32)(lane + g * MOLE_WARP_SIZE);
            if (c < sc) out[(mole_u64)i * stride + c] = acc[j][g];
        }
    }
}

// Router scores of the tile's tokens into hz columns [R, R + E) (one warp per token).
MOLE_DEVICE void scores_tile(const mole_fused_params& p, const fused_gate_tensors& g, mole_u64 t0,
                             const fused_smem& s) {
    if (p.gate.rule == MOLE_RULE_ADAPTER_IDS) return;  // no scores: ids are read by route_tile
    const mole_u32 n = p.gate.experts;
    for (int i = mole_warp_id(); i < MOLE_FUSED_BT; i += MOLE_FUSED_WARPS) {
        const mole_u64 t = t0 + (mole_u64)i;
        if (t >= p.gate.tokens) continue;
        const float* h = s.hz + (mole_u64)i * p.cols;
        float* z = s.hz + (mole_u64)i * p.cols + p.rank;
        for (mole_u32 e = (mole_u32)mole_lane(); e < n; e += MOLE_WARP_SIZE) {
            float v = 0.0f;
            switch (p.router) {
                case MOLE_ROUTER_X: v = z[e]; break;
                case MOLE_ROUTER_H:
                    for (mole_u32 c = 0; c < p.rank; ++c) v += h[c] * load_f32(g.router_weight + (mole_u64)c * n + e);
                    break;
                case MOLE_ROUTER_LOW_RANK: v = h[e]; break;
                default: v = load_f32(g.gate_in + t * n + e); break;  // logits, given weights
            }
            if (p.use_router_bias) v += load_f32(g.router_bias + e);
            z[e] = v;
        }
    }
}

// The routing rule of each of the tile's tokens (one warp per token): ids and weights into
// shared memory (empty rows past T), the optional outputs, and per-token statistics terms.
MOLE_DEVICE void route_tile(const mole_fused_params& p, const fused_gate_tensors& g, mole_u64 t0,
                            const fused_smem& s, bool writer) {
    const int lane = mole_lane();
    const int n = (int)p.gate.experts, slots = (int)p.gate.slots;
    float* row = s.row + (mole_u64)mole_warp_id() * n;
    for (int i = mole_warp_id(); i < MOLE_FUSED_BT; i += MOLE_FUSED_WARPS) {
        const mole_u64 t = t0 + (mole_u64)i;
        int* ids = s.ids + i * slots;
        float* w = s.w + i * slots;
        float* probs = s.probs + i * n;
        const float* z = s.hz + (mole_u64)i * p.cols + p.rank;
        if (t >= p.gate.tokens) {
            fill_empty(ids, w, 0, slots);
            continue;
        }
        switch (p.gate.rule) {
            case MOLE_RULE_SOFTMAX_TOPK: token_softmax_topk(p.gate, row, z, ids, w, probs); break;
            case MOLE_RULE_TOP_P:
            case MOLE_RULE_DYNMOLE:
            case MOLE_RULE_DENSE_SOFTMAX: token_softmax_prefix(p.gate, row, z, ids, w, probs); break;
            case MOLE_RULE_SIGMOID_TOPK: token_sigmoid_topk(p.gate, row, z, g.selection_bias, ids, w, probs); break;
            case MOLE_RULE_MAGNITUDE_TOPK: token_magnitude_topk(p.gate, row, z, g.selection_bias, ids, w); break;
            case MOLE_RULE_GIVEN: token_given(p.gate, row, z, ids, w, probs); break;
            default: {  // adapter ids: (id, 1) in slot 0, or (-1, 0)
                const int id = g.adapter_ids[t];
                for (int j = lane; j < slots; j += MOLE_WARP_SIZE) {
                    ids[j] = j == 0 ? id : -1;
                    w[j] = j == 0 && id != -1 ? 1.0f : 0.0f;
                }
            }
        }
        mole_syncwarp();  // slots and probabilities were written by other lanes
        if (!writer) continue;
        if (g.out_ids)
            for (int j = lane; j < slots; j += MOLE_WARP_SIZE) {
                g.out_ids[t * slots + j] = ids[j];
                g.out_weights[t * slots + j] = w[j];
            }
        if (g.out_probs && p.stats_probs)
            for (int e = lane; e < n; e += MOLE_WARP_SIZE) g.out_probs[t * n + e] = probs[e];
        if (p.stats) {
            const float zl = p.stats_scores ? token_z_loss(z, n) : 0.0f;
            const float ent = p.stats_probs && p.stats_entropy != MOLE_ENTROPY_NONE
                                  ? token_entropy(probs, n, p.stats_entropy, p.stats_q, p.stats_entropy_eps,
                                                  p.stats_entropy_scale)
                                  : 0.0f;
            if (lane == 0) {
                s.z_loss[i] = zl;
                s.entropy[i] = ent;
            }
        }
    }
}

// Row `tile` of the statistics workspace (the layout of gating_stats_finalize): per-expert
// selections, first-slot selections, probability sums and masked probability sums, then z-loss
// and entropy sums, each over the tile's tokens in order.
MOLE_DEVICE void stats_tile(const mole_fused_params& p, const fused_gate_tensors& g, mole_u64 t0, mole_u32 tile,
                            const fused_smem& s) {
    const mole_u32 n = p.gate.experts, slots = p.gate.slots;
    const mole_u64 left = p.gate.tokens - t0;
    const int rows = left < MOLE_FUSED_BT ? (int)left : MOLE_FUSED_BT;
    mole_u32* counts = g.stats_ws + (mole_u64)tile * 2 * n;
    float* sums = reinterpret_cast<float*>(g.stats_ws + (mole_u64)p.tiles * 2 * n) + (mole_u64)tile * (2 * n + 2);
    for (mole_u32 e = threadIdx.x; e < n; e += blockDim.x) {
        mole_u32 count = 0, top1 = 0;
        float prob = 0.0f, masked = 0.0f;
        for (int i = 0; i < rows; ++i) {
            bool selected = false;
            for (mole_u32 j = 0; j < slots; ++j) {
                const bool hit = s.ids[i * slots + j] == (int)e;
                count += hit ? 1u : 0u;
                top1 += hit && j == 0 ? 1u : 0u;
                selected = selected || hit;
            }
            if (p.stats_probs) {
                prob += s.probs[i * n + e];
                if (selected) masked += s.probs[i * n + e];
            }
        }
        counts[e] = count;
        counts[n + e] = top1;
        sums[e] = prob;
        sums[n + e] = masked;
    }
    if (threadIdx.x == 0) {
        float zl = 0.0f, ent = 0.0f;
        for (int i = 0; i < rows; ++i) {
            zl += s.z_loss[i];
            ent += s.entropy[i];
        }
        sums[2 * n] = zl;
        sums[2 * n + 1] = ent;
    }
}

// Whether expert `id` of a slot can be used (ids outside 0..E contribute nothing).
MOLE_DEVICE bool valid_expert(int id, mole_u32 experts) { return id >= 0 && (mole_u32)id < experts; }

// h' in place in hz columns [0, R) (one warp per token), times the per-expert scales. A scale
// of 1 (no expert_scales) multiplies exactly: nothing changes.
MOLE_DEVICE void mix_tile(const mole_fused_params& p, const fused_gate_tensors& g, const fused_smem& s) {
    constexpr int GROUPS = MOLE_FUSED_MAX_COLS / MOLE_WARP_SIZE;
    const int lane = mole_lane(), slots = (int)p.gate.slots;
    const mole_u32 r = p.rank;
    // Core merge: the one bank expert's scale covers every column.
    const float merged_scale = p.mix == MOLE_MIX_CORE_MERGE && g.expert_scales ? g.expert_scales[0] : 1.0f;
    for (int i = mole_warp_id(); i < MOLE_FUSED_BT; i += MOLE_FUSED_WARPS) {
        float* h = s.hz + (mole_u64)i * p.cols;
        const int* ids = s.ids + i * slots;
        const float* w = s.w + i * slots;
        float out[GROUPS];  // in registers: every loop over gi is unrolled
        MOLE_UNROLL
        for (int gi = 0; gi < GROUPS; ++gi) {
            const mole_u32 c = (mole_u32)(lane + gi * MOLE_WARP_SIZE);
            out[gi] = 0.0f;
            if (c >= r || p.mix != MOLE_MIX_EXPERT_SCALE) continue;
            // The column's bank expert scales it; an unselected one leaves weight 0 anyway.
            float weight = 0.0f, scale = 1.0f;
            for (int j = 0; j < slots; ++j) {
                const int id = ids[j];
                if (valid_expert(id, p.gate.experts) && g.rank_offsets[id] <= c && c < g.rank_offsets[id + 1]) {
                    weight += w[j];
                    if (g.expert_scales) scale = g.expert_scales[id];
                }
            }
            out[gi] = weight * h[c] * scale;
        }
        if (p.mix == MOLE_MIX_CORE_MERGE) {
            // h'[c] = sum_i h[i] * (sum_s w_s C_s[i][c]), the merged core built on the fly.
            for (mole_u32 ii = 0; ii < r; ++ii) {
                const float hv = h[ii];
                MOLE_UNROLL
                for (int gi = 0; gi < GROUPS; ++gi) {
                    const mole_u32 c = (mole_u32)(lane + gi * MOLE_WARP_SIZE);
                    if ((mole_u32)(gi * MOLE_WARP_SIZE) >= r) break;
                    if (c >= r) continue;
                    float merged = 0.0f;
                    for (int j = 0; j < slots; ++j)
                        if (valid_expert(ids[j], p.gate.experts))
                            merged += w[j] * load_f32(g.cores + ((mole_u64)ids[j] * r + ii) * r + c);
                    out[gi] += hv * merged;
                }
            }
        }
        mole_syncwarp();  // every lane has read h before any lane overwrites it
        MOLE_UNROLL
        for (int gi = 0; gi < GROUPS; ++gi) {
            const mole_u32 c = (mole_u32)(lane + gi * MOLE_WARP_SIZE);
            if (c < r) h[c] = out[gi] * merged_scale;
        }
    }
}

// y[t0 + i, n] = round(y + scale * sum_c h'[i, c] B[c, n]) for n in [n_begin, n_end), rows < T.
MOLE_DEVICE void expand_tile(const mole_fused_params& p, const elem_t* __restrict__ b, elem_t* __restrict__ y,
                             mole_u64 t0, mole_u32 n_begin, mole_u32 n_end, const fused_smem& s) {
    const mole_u64 left = p.gate.tokens - t0;
    const int rows = left < MOLE_FUSED_BT ? (int)left : MOLE_FUSED_BT;
    for (mole_u64 n = (mole_u64)n_begin + threadIdx.x; n < n_end; n += blockDim.x) {
        float acc[MOLE_FUSED_BT];  // in registers: every loop over i is unrolled
        MOLE_UNROLL
        for (int i = 0; i < MOLE_FUSED_BT; ++i) acc[i] = 0.0f;
        MOLE_NO_UNROLL
        for (mole_u32 c = 0; c < p.rank; ++c) {
            const float bv = load_f32(b + (mole_u64)c * p.d_out + n);
            MOLE_UNROLL
            for (int i = 0; i < MOLE_FUSED_BT; ++i) acc[i] += s.hz[(mole_u64)i * p.cols + c] * bv;
        }
        MOLE_UNROLL
        for (int i = 0; i < MOLE_FUSED_BT; ++i) {
            if (i >= rows) break;
            elem_t* dst = y + (t0 + (mole_u64)i) * p.d_out + n;
            store_from_f32(dst, load_f32(dst) + p.scale * acc[i]);
        }
    }
}

// Between the shrink and the expand: scores, routing (+ outputs, statistics) and, when the launch
// expands, the mix. Returns whether an expand follows.
MOLE_DEVICE bool gate_tile(const mole_fused_params& p, const fused_gate_tensors& g, mole_u32 tile, bool writer,
                           const fused_smem& s) {
    const mole_u64 t0 = (mole_u64)tile * MOLE_FUSED_BT;
    scores_tile(p, g, t0, s);
    __syncthreads();
    route_tile(p, g, t0, s, writer);
    __syncthreads();
    if (writer && p.stats) stats_tile(p, g, t0, tile, s);
    if (!p.expand) return false;
    mix_tile(p, g, s);
    __syncthreads();
    return true;
}

// Everything after the shrink, with the FMA expand.
MOLE_DEVICE void finish_tile(const mole_fused_params& p, const fused_gate_tensors& g, const elem_t* __restrict__ b,
                             elem_t* __restrict__ y, mole_u32 tile, mole_u32 n_begin, mole_u32 n_end, bool writer,
                             const fused_smem& s) {
    if (gate_tile(p, g, tile, writer, s)) expand_tile(p, b, y, (mole_u64)tile * MOLE_FUSED_BT, n_begin, n_end, s);
}

#define MOLE_FUSED_GATE_ARGS                                                                                   \
    const elem_t *__restrict__ router_weight, const elem_t *__restrict__ router_bias,                         \
        const elem_t *__restrict__ gate_in, const int *__restrict__ adapter_ids,                              \
        const elem_t *__restrict__ selection_bias, const mole_u32 *__restrict__ rank_offsets,                 \
        const float *__restrict__ expert_scales, const elem_t *__restrict__ cores, int *__restrict__ out_ids, \
        float *__restrict__ out_weights, float *__restrict__ out_probs, mole_u32 *__restrict__ stats_ws
#define MOLE_FUSED_GATE_TENSORS                                                                                \
    fused_gate_tensors{router_weight, router_bias, gate_in,     adapter_ids, selection_bias, rank_offsets,   \
                       expert_scales, cores,       out_ids,     out_weights, out_probs,      stats_ws}

// Grid: ceil(T / BT) blocks. The whole layer for one tile of tokens.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(fused_layer)(const mole_fused_params p, const elem_t* __restrict__ x, const elem_t* __restrict__ a,
                            const elem_t* __restrict__ b, elem_t* __restrict__ y, MOLE_FUSED_GATE_ARGS) {
    const fused_smem s = fused_carve(p, true);
    const mole_u64 t0 = (mole_u64)blockIdx.x * MOLE_FUSED_BT;
    if (p.shrink_cols > 0) shrink_tile(p, x, a, router_weight, t0, 0, p.d_in, s, s.hz, p.cols, true);
    __syncthreads();
    finish_tile(p, MOLE_FUSED_GATE_TENSORS, b, y, blockIdx.x, 0, p.d_out, true, s);
}

// Grid: (tiles, splits). hz_part [splits, T, shrink_cols] (f32): slice `split` of d_in.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(fused_split_shrink)(const mole_fused_params p, const elem_t* __restrict__ x,
                                   const elem_t* __restrict__ a, const elem_t* __restrict__ router_weight,
                                   float* __restrict__ hz_part) {
    const fused_smem s = fused_carve(p, true);
    const mole_u64 t0 = (mole_u64)blockIdx.x * MOLE_FUSED_BT;
    const mole_u64 k_begin = (mole_u64)blockIdx.y * p.k_per_split;
    const mole_u64 k_end_raw = k_begin + p.k_per_split;
    const mole_u64 k_end = k_end_raw < p.d_in ? k_end_raw : (mole_u64)p.d_in;
    float* out = hz_part + ((mole_u64)blockIdx.y * p.gate.tokens + t0) * p.shrink_cols;
    shrink_tile(p, x, a, router_weight, t0, k_begin, k_end, s, out, p.shrink_cols, false);
}

// Grid: (tiles, ceil(d_out / n_per_block)). Sums the slices in order, then finishes the tile
// for its d_out columns; blocks with blockIdx.y == 0 write the routing outputs and statistics.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(fused_split_expand)(const mole_fused_params p, const float* __restrict__ hz_part,
                                   const elem_t* __restrict__ b, elem_t* __restrict__ y, MOLE_FUSED_GATE_ARGS) {
    const fused_smem s = fused_carve(p, false);
    const mole_u64 t0 = (mole_u64)blockIdx.x * MOLE_FUSED_BT;
    const mole_u64 slice = (mole_u64)p.gate.tokens * p.shrink_cols;
    for (mole_u32 i = threadIdx.x; i < MOLE_FUSED_BT * p.shrink_cols; i += blockDim.x) {
        const mole_u64 t = t0 + i / p.shrink_cols;
        const mole_u32 c = i % p.shrink_cols;
        float v = 0.0f;
        if (t < p.gate.tokens)
            for (mole_u32 k = 0; k < p.splits; ++k) v += hz_part[k * slice + t * p.shrink_cols + c];
        s.hz[(mole_u64)(i / p.shrink_cols) * p.cols + c] = v;
    }
    __syncthreads();
    const mole_u64 n_begin = (mole_u64)blockIdx.y * p.n_per_block;
    const mole_u64 n_end = n_begin + p.n_per_block < p.d_out ? n_begin + p.n_per_block : (mole_u64)p.d_out;
    finish_tile(p, MOLE_FUSED_GATE_TENSORS, b, y, blockIdx.x, (mole_u32)n_begin, (mole_u32)n_end, blockIdx.y == 0, s);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core single launch (f16 / bf16 builds with BT a multiple of 16 and the warps a multiple
// of BT / 16): fused_layer with both GEMMs on mma.sync m16n8k16, the stages between them
// unchanged. The host planner picks it when d_in % 8 == 0, d_out % 8 == 0, x and B are 16-byte
// aligned and its shared memory fits.
// - shrink: x [BT, KM] tiles by cp.async, double buffered; W = [A | W_g] chunks [KM, SC16]
//   copied as stored (exact); warp w owns the (m16 tile, n16 strip) pairs w, w + warps, ...;
//   f32 accumulators land in hz as in the FMA kernel.
// - expand: per row and 16-rank chunk, h' is scaled by a power of two that brings the chunk's
//   largest |h'| into [1, 2) and split as hi + lo in elem_t (about twice the dtype's precision,
//   as sgmv_expand_mma); B chunks [16, BN] by cp.async, double buffered; warp w owns m16 tile
//   w / WN and n16 strip w % WN of each BN-column block; y is read and written once.
// ---------------------------------------------------------------------------------------------
#if !defined(MOLE_DTYPE_F32) && MOLE_FUSED_BT % 16 == 0 && MOLE_FUSED_WARPS % (MOLE_FUSED_BT / 16) == 0
#include "common/tc.cuh"

#define MOLE_FUSED_KM 32
#define MOLE_FUSED_MT (MOLE_FUSED_BT / 16)
#define MOLE_FUSED_WN (MOLE_FUSED_WARPS / MOLE_FUSED_MT)
#define MOLE_FUSED_BN (16 * MOLE_FUSED_WN)
#define MOLE_FUSED_PAIRS ((MOLE_FUSED_MT * (MOLE_FUSED_MAX_COLS / 16) + MOLE_FUSED_WARPS - 1) / MOLE_FUSED_WARPS)
#define MOLE_FUSED_XS (MOLE_FUSED_KM + 8)  // padded rows: 16-byte aligned, conflict-free ldmatrix

MOLE_DEVICE mole_u32 round16(mole_u32 v) { return (v + 15u) / 16u * 16u; }

// The tensor-core regions after the common ones, each 16-byte aligned (mirrors
// src/kernels/fused.rs::mma_smem_bytes).
struct fused_mma_smem {
    elem_t* xs;     // [2][BT][KM + 8]
    elem_t* ws;     // [KM][SC16 + 8]
    elem_t* hhi;    // [BT][R16 + 8]
    elem_t* hlo;    // [BT][R16 + 8]
    float* rinv;    // [BT][R16 / 16]
    elem_t* bs;     // [2][16][BN + 8]
};

MOLE_DEVICE char* align16(char* at) {
    const mole_u64 a = reinterpret_cast<mole_u64>(at);
    return reinterpret_cast<char*>((a + 15u) & ~(mole_u64)15u);
}

MOLE_DEVICE fused_mma_smem fused_mma_carve(const mole_fused_params& p, const fused_smem& s) {
    const mole_u32 sc16 = round16(p.shrink_cols), r16 = round16(p.rank);
    char* at = align16(reinterpret_cast<char*>(s.end));
    fused_mma_smem m;
    m.xs = reinterpret_cast<elem_t*>(at);
    at = align16(at + 2u * MOLE_FUSED_BT * MOLE_FUSED_XS * sizeof(elem_t));
    m.ws = reinterpret_cast<elem_t*>(at);
    at = align16(at + (mole_u64)MOLE_FUSED_KM * (sc16 + 8u) * sizeof(elem_t));
    m.hhi = reinterpret_cast<elem_t*>(at);
    at = align16(at + (mole_u64)MOLE_FUSED_BT * (r16 + 8u) * sizeof(elem_t));
    m.hlo = reinterpret_cast<elem_t*>(at);
    at = align16(at + (mole_u64)MOLE_FUSED_BT * (r16 + 8u) * sizeof(elem_t));
    m.rinv = reinterpret_cast<float*>(at);
    at = align16(at + (mole_u64)MOLE_FUSED_BT * (r16 / 16u) * sizeof(float));
    m.bs = reinterpret_cast<elem_t*>(at);
    return m;
}

// Issues and commits the copies of x[t0 .. t0 + BT, k0 .. k0 + KM) into `xs` (16-byte segments;
// rows past T and k past d_in read nothing and are zero filled).
MOLE_DEVICE void fused_stage_x(elem_t* xs, const elem_t* __restrict__ x, const mole_fused_params& p, mole_u64 t0,
                               mole_u64 k0) {
    for (int i = (int)threadIdx.x; i < MOLE_FUSED_BT * (MOLE_FUSED_KM / 8); i += (int)blockDim.x) {
        const int r = i / (MOLE_FUSED_KM / 8), seg = i % (MOLE_FUSED_KM / 8);
        const mole_u64 t = t0 + (mole_u64)r, k = k0 + (mole_u64)seg * 8u;
        const bool live = t < p.gate.tokens && k < p.d_in;
        mole_cp_async_16_zfill(xs + r * MOLE_FUSED_XS + seg * 8, live ? x + t * p.d_in + k : x, live ? 16 : 0);
    }
    mole_cp_async_commit();
}

MOLE_DEVICE void shrink_tile_mma(const mole_fused_params& p, const elem_t* __restrict__ x,
                                 const elem_t* __restrict__ a, const elem_t* __restrict__ wg, mole_u64 t0,
                                 const fused_smem& s, const fused_mma_smem& m) {
    const mole_u32 sc = p.shrink_cols, sc16 = round16(sc), r = p.rank, e_n = p.gate.experts;
    const int lane = mole_lane(), warp = mole_warp_id();
    const int strips = (int)(sc16 / 16u), pairs = MOLE_FUSED_MT * strips;
    float acc[MOLE_FUSED_PAIRS][2][4];
    for (int pi = 0; pi < MOLE_FUSED_PAIRS; ++pi)
        for (int j = 0; j < 2; ++j)
            for (int q = 0; q < 4; ++q) acc[pi][j][q] = 0.0f;
    fused_stage_x(m.xs, x, p, t0, 0);
    int st = 0;
    MOLE_NO_UNROLL
    for (mole_u64 k0 = 0; k0 < p.d_in; k0 += MOLE_FUSED_KM) {
        __syncthreads();  // the previous step's fragments are read
        // Prefetch the next step (an empty group after the last, so the wait below always
        // leaves exactly the newest group in flight).
        if (k0 + MOLE_FUSED_KM < p.d_in)
            fused_stage_x(m.xs + (st ^ 1) * MOLE_FUSED_BT * MOLE_FUSED_XS, x, p, t0, k0 + MOLE_FUSED_KM);
        else
            mole_cp_async_commit();
        for (mole_u32 i = threadIdx.x; i < MOLE_FUSED_KM * sc16; i += blockDim.x) {
            const mole_u32 kk = i / sc16, c = i % sc16;
            const mole_u64 k = k0 + kk;
            elem_t v;
            store_from_f32(&v, 0.0f);
            if (k < p.d_in && c < sc) v = c < r ? a[k * r + c] : wg[k * e_n + (c - r)];
            m.ws[kk * (sc16 + 8u) + c] = v;
        }
        mole_cp_async_wait<1>();  // this step's x tile has landed
        __syncthreads();
        const elem_t* xs = m.xs + st * MOLE_FUSED_BT * MOLE_FUSED_XS;
        for (int kk = 0; kk < MOLE_FUSED_KM; kk += 16) {
            for (int pi = 0; pi < MOLE_FUSED_PAIRS; ++pi) {
                const int pair = warp + pi * MOLE_FUSED_WARPS;
                if (pair >= pairs) break;  // uniform over the warp
                const int mt = pair / strips, strip = pair % strips;
                mole_u32 af[4], bf[4];
                mole_ldmatrix_x4(af, xs + (mt * 16 + lane % 16) * MOLE_FUSED_XS + kk + (lane / 16) * 8);
                mole_ldmatrix_x4_trans(bf, m.ws + (kk + lane % 16) * (sc16 + 8u) + strip * 16 + (lane / 16) * 8);
                mole_tc_mma(acc[pi][0], af, bf);
                mole_tc_mma(acc[pi][1], af, bf + 2);
            }
        }
        st ^= 1;
    }
    for (int pi = 0; pi < MOLE_FUSED_PAIRS; ++pi) {
        const int pair = warp + pi * MOLE_FUSED_WARPS;
        if (pair >= pairs) break;
        const int mt = pair / strips, strip = pair % strips;
        for (int j = 0; j < 2; ++j)
            for (int q = 0; q < 4; ++q) {
                const int row = mt * 16 + mole_tc_acc_row(lane, q);
                const mole_u32 c = (mole_u32)(strip * 16 + mole_tc_acc_col(lane, j, q));
                if (c < sc) s.hz[(mole_u64)row * p.cols + c] = acc[pi][j][q];
            }
    }
}

// hi / lo halves of each row's 16-rank chunks of h', scaled by a power of two per chunk.
MOLE_DEVICE void split_h(const mole_fused_params& p, const fused_smem& s, const fused_mma_smem& m) {
    const mole_u32 r16 = round16(p.rank), chunks = r16 / 16u;
    for (mole_u32 i = threadIdx.x; i < MOLE_FUSED_BT * chunks; i += blockDim.x) {
        const mole_u32 row = i / chunks, ch = i % chunks;
        const float* h = s.hz + (mole_u64)row * p.cols + ch * 16u;
        float mx = 0.0f;
        for (mole_u32 j = 0; j < 16u; ++j) {
            const float v = ch * 16u + j < p.rank ? mole_fabsf(h[j]) : 0.0f;
            mx = v > mx ? v : mx;
        }
        const float sc = mole_tc_chunk_scale(mx, &m.rinv[row * chunks + ch]);
        elem_t* hi = m.hhi + row * (r16 + 8u) + ch * 16u;
        elem_t* lo = m.hlo + row * (r16 + 8u) + ch * 16u;
        for (mole_u32 j = 0; j < 16u; ++j) mole_tc_split(hi + j, lo + j, ch * 16u + j < p.rank ? h[j] * sc : 0.0f);
    }
}

// Issues and commits the copies of B[ch*16 .. +16, nb .. nb + BN) into `bs` (ranks past R and
// columns past d_out zero filled).
MOLE_DEVICE void fused_stage_b(elem_t* bs, const elem_t* __restrict__ b, const mole_fused_params& p, mole_u32 ch,
                               mole_u64 nb) {
    mole_tc_stage_b<MOLE_FUSED_BN>(bs, b, 0u, ch * 16u, p.rank, nb, p.d_out);
}

// Steps over (column block, 16-rank chunk) in order; the next step's B chunk is copied into the
// other stage while the current one is consumed (cp.async.wait_group 1), and a column block's
// outputs are written after its last chunk.
MOLE_DEVICE void expand_tile_mma(const mole_fused_params& p, const elem_t* __restrict__ b, elem_t* __restrict__ y,
                                 mole_u64 t0, const fused_smem& s, const fused_mma_smem& m) {
    split_h(p, s, m);
    const mole_u32 r16 = round16(p.rank), chunks = r16 / 16u;
    const int lane = mole_lane(), warp = mole_warp_id(), g = lane / 4;
    const int mt = warp / MOLE_FUSED_WN, n0 = 16 * (warp % MOLE_FUSED_WN);
    const mole_u64 blocks = ((mole_u64)p.d_out + MOLE_FUSED_BN - 1) / MOLE_FUSED_BN, steps = blocks * chunks;
    constexpr int STAGE = 16 * (MOLE_FUSED_BN + 8);
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    fused_stage_b(m.bs, b, p, 0, 0);
    int st = 0;
    MOLE_NO_UNROLL
    for (mole_u64 step = 0; step < steps; ++step) {
        const mole_u32 ch = (mole_u32)(step % chunks);
        const mole_u64 nb = step / chunks * MOLE_FUSED_BN;
        __syncthreads();  // split_h is done / the other stage's fragments are read
        if (step + 1 < steps)
            fused_stage_b(m.bs + (st ^ 1) * STAGE, b, p, (mole_u32)((step + 1) % chunks),
                          (step + 1) / chunks * MOLE_FUSED_BN);
        else
            mole_cp_async_commit();  // an empty group keeps the wait below exact
        mole_cp_async_wait<1>();     // this step's chunk has landed
        __syncthreads();
        mole_u32 ah[4], al[4], bf[4];
        const int hrow = (mt * 16 + lane % 16) * (int)(r16 + 8u) + (int)ch * 16 + (lane / 16) * 8;
        mole_ldmatrix_x4(ah, m.hhi + hrow);
        mole_ldmatrix_x4(al, m.hlo + hrow);
        mole_ldmatrix_x4_trans(bf, m.bs + st * STAGE + (lane % 16) * (MOLE_FUSED_BN + 8) + n0 + (lane / 16) * 8);
        mole_tc_mma_hilo(acc, ah, al, bf, m.rinv[(mt * 16 + g) * chunks + ch], m.rinv[(mt * 16 + g + 8) * chunks + ch]);
        st ^= 1;
        if (ch + 1 < chunks) continue;
        for (int j = 0; j < 2; ++j)
            for (int q = 0; q < 4; ++q) {
                const mole_u64 t = t0 + (mole_u64)(mt * 16 + mole_tc_acc_row(lane, q));
                const mole_u64 n = nb + (mole_u64)(n0 + mole_tc_acc_col(lane, j, q));
                if (t < p.gate.tokens && n < p.d_out) {
                    elem_t* dst = y + t * p.d_out + n;
                    store_from_f32(dst, load_f32(dst) + p.scale * acc[j][q]);
                }
                acc[j][q] = 0.0f;
            }
    }
}

// Grid: ceil(T / BT) blocks. fused_layer on tensor cores.
MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(fused_layer_mma)(const mole_fused_params p, const elem_t* __restrict__ x,
                                const elem_t* __restrict__ a, const elem_t* __restrict__ b, elem_t* __restrict__ y,
                                MOLE_FUSED_GATE_ARGS) {
    const fused_smem s = fused_carve(p, false);
    const fused_mma_smem m = fused_mma_carve(p, s);
    const mole_u64 t0 = (mole_u64)blockIdx.x * MOLE_FUSED_BT;
    if (p.shrink_cols > 0) shrink_tile_mma(p, x, a, router_weight, t0, s, m);
    __syncthreads();
    if (gate_tile(p, MOLE_FUSED_GATE_TENSORS, blockIdx.x, true, s) && p.rank > 0) expand_tile_mma(p, b, y, t0, s, m);
}
#endif
