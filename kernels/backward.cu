// The backward pass of one MoLE layer, stages 1 to 4, with the semantics of
// src/reference/backward.rs: the gradients of L = sum dy . y + aux_loss with the forward's
// selection (ids [T, slots], route_weights [T, slots]) held constant. The weight gradients
// (stage 5) read the f32 workspace these kernels leave: h, g, dh, hm [T, R] and w, dz [T, E].
//
//   bw_token (stage 1; one block per token, grid-stride): h = x A (recomputed, a thread per
//     column); w [E], the token's weights made dense; g = scale s_e dy B^T (a warp per column)
//     on the columns the mix uses (the selected experts' for the expert-scale mix, every column
//     for CoMoL; 0 elsewhere); the mix backward:
//       expert scale: dh = w_e g, hm = s_e w_e h, dw_e = sum_{c in cols(e)} h_c g_c (selected e);
//       CoMoL:        dh = sum_c w_c C_c g, hm = s_0 h sum_c w_c C_c, dw_c = h^T C_c g
//     (dw_c by a fixed-order block tree reduction).
//   bw_scores (stage 1, routed gating; one thread per (token, expert)): the router scores
//     z = x W_g (+ b) | h W_r (+ b) | h (low-rank: expert e is rank column e) | logits, stored
//     f32 with NaN as -inf (the order key every rule and loss reads).
//   bw_stats (stage 2, a load-balancing loss only; one warp per chunk of tokens): per expert
//     over the chunk's tokens in order, the selections, first-slot selections, probabilities and
//     probabilities where selected, into the chunk's row of partials [chunks, 4E].
//   bw_stats_sum (stage 2; one block): the chunk rows summed in chunk order, divided by T:
//     stats [4E] = selected fraction, top-1 fraction, mean probability, masked mean probability.
//   bw_gate (stage 3; one warp per token): dz = the rule's vector-Jacobian product of dw plus
//     the auxiliary losses' gradients (load balancing from the stats, entropy, z-loss); for given
//     weights their gradient (dw, or its softmax VJP); written to dz [T, E] (f32) and, for the
//     logits router and given weights, to d_gate_input in the dtype; the h router adds
//     dz W_r^T to dh, the low-rank router dz.
//   bw_dx (stage 4; one thread per element): dx = dh A^T (+ dz W_g^T for the x router).
//
// Every output element has one writer and every sum a fixed order (no atomics), so two runs are
// bit-identical. f32 arithmetic for every dtype; every index into a tensor is 64-bit. Mirrored
// by src/kernels/backward.rs.
#include "common/arch.cuh"
#include "common/dtype.cuh"
#include "common/routing.cuh"
#include "common/warp.cuh"

// Threads per block: a power of two (the block reduction halves it).
#ifndef MOLE_BLOCK_THREADS
#define MOLE_BLOCK_THREADS 128
#endif
static_assert(MOLE_BLOCK_THREADS >= 32 && MOLE_BLOCK_THREADS <= 1024 &&
                  (MOLE_BLOCK_THREADS & (MOLE_BLOCK_THREADS - 1)) == 0,
              "MOLE_BLOCK_THREADS must be a power of two in 32..1024");

#define MOLE_BW_MIX_EXPERT_SCALE 0u
#define MOLE_BW_MIX_CORE_MERGE 1u
#define MOLE_BW_ROUTER_NONE 0u
#define MOLE_BW_ROUTER_X 1u
#define MOLE_BW_ROUTER_H 2u
#define MOLE_BW_ROUTER_LOW_RANK 3u
#define MOLE_BW_ROUTER_LOGITS 4u
#define MOLE_BW_BALANCE_SWITCH 0u
#define MOLE_BW_BALANCE_DYNMOLE 1u
#define MOLE_BW_BALANCE_LLAVA_MOLE 2u
// Sections of a stats row [4E].
#define MOLE_BW_STAT_SELECTED 0u
#define MOLE_BW_STAT_TOP1 1u
#define MOLE_BW_STAT_PROB 2u
#define MOLE_BW_STAT_MASKED 3u

// Parameters of every backward kernel, by value (Rust: BackwardParams).
struct mole_backward_params {
    mole_u32 tokens;        // T
    mole_u32 d_in;          // row length of x, dx; rows of A, W_g
    mole_u32 d_out;         // row length of dy, B
    mole_u32 rank;          // R: row length of A, h, g, dh, hm
    mole_u32 experts;       // E routed (cores for CoMoL): row length of w, dw, z, dz
    mole_u32 bank_experts;  // rank_offsets has bank_experts + 1 entries
    mole_u32 slots;         // row length of ids, route_weights
    mole_u32 mix;           // MOLE_BW_MIX_*
    mole_u32 router;        // MOLE_BW_ROUTER_*
    mole_u32 rule;          // mole_rule (given weights and adapter ids included)
    mole_u32 weights;       // mole_weight_mode of softmax top-k
    mole_u32 k;             // SMoRA's k
    mole_u32 softmax_kept;  // given weights: the kept values were softmaxed
    mole_u32 has_bias;      // router_bias is added to z
    mole_u32 entropy;       // mole_entropy_kind of the entropy loss (none without one)
    mole_u32 balance;       // MOLE_BW_BALANCE_*
    mole_u32 chunk_tokens;  // tokens per stats chunk
    mole_u32 chunks;        // stats chunks (0 without a load-balancing loss)
    float scale;            // the layer's scale
    float temperature;      // softmax temperature
    float q;                // Tsallis index of the entropy loss
    float entropy_eps;      // added to each probability before the entropy
    float entropy_scale;    // 1 / entropy of the uniform distribution
    float inv_t;            // 1 / T
    float lb_coef;          // load-balancing coefficient (0: off)
    float z_coef;           // z-loss coefficient
    float entropy_coef;     // entropy-loss coefficient
};
static_assert(sizeof(mole_backward_params) == 108, "mole_backward_params layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, tokens) == 0, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, rank) == 12, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, bank_experts) == 20, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, mix) == 28, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, rule) == 36, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, softmax_kept) == 48, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, entropy) == 56, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, chunks) == 68, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, scale) == 72, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, entropy_scale) == 88, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, inv_t) == 92, "layout");
static_assert(MOLE_OFFSET_OF(mole_backward_params, entropy_coef) == 104, "layout");

// The bank expert owning rank column c: the last e with offsets[e] <= c (offsets non-decreasing
// from 0, offsets[n] = R > c; a rank-0 expert owns nothing).
MOLE_DEVICE mole_u32 bw_expert_of(const mole_u32* __restrict__ offsets, mole_u32 n, mole_u32 c) {
    mole_u32 lo = 0u, hi = n;
    while (hi - lo > 1u) {
        const mole_u32 mid = (lo + hi) / 2u;
        if (offsets[mid] <= c) lo = mid;
        else hi = mid;
    }
    return lo;
}

// Whether one of the token's slots holds expert e.
MOLE_DEVICE bool bw_selected(const int* __restrict__ ids, mole_u32 slots, mole_u32 e) {
    for (mole_u32 j = 0u; j < slots; ++j)
        if (ids[j] == (int)e) return true;
    return false;
}

// The block's sum of one value per thread, by a fixed tree (every thread gets it; `red` may be
// reused after the call).
MOLE_DEVICE float bw_block_sum(float* red, float v) {
    const mole_u32 tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (mole_u32 s = blockDim.x / 2u; s > 0u; s /= 2u) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    const float total = red[0];
    __syncthreads();
    return total;
}

// The rule's probability of an expert from its score key: sigmoid (SMoRA) or softmax.
MOLE_DEVICE float bw_prob(const mole_backward_params& p, const softmax_ctx& sm, float z) {
    return p.rule == MOLE_RULE_SIGMOID_TOPK ? sigmoid(z) : softmax_prob(sm, z);
}

// The token's softmax context (unused by the sigmoid rule, which reads no normaliser).
MOLE_DEVICE softmax_ctx bw_softmax(const mole_backward_params& p, const float* z) {
    if (p.rule == MOLE_RULE_SIGMOID_TOPK) return softmax_ctx{1.0f, 0.0f, 1.0f};
    return softmax_prepare(z, (int)p.experts, p.temperature);
}

// d/dp of the normalised entropy of p + eps (before its clamp): -(ln p' + 1) / ln E (Shannon)
// or -q p'^(q-1) / (1 - E^(1-q)) (Tsallis); the scale is the host's 1 / S(uniform).
MOLE_DEVICE float bw_entropy_grad(const mole_backward_params& p, float prob) {
    const float pe = prob + p.entropy_eps;
    if (p.entropy == MOLE_ENTROPY_SHANNON) return pe > 0.0f ? -(mole_logf(pe) + 1.0f) * p.entropy_scale : 0.0f;
    return -p.q * mole_expf((p.q - 1.0f) * mole_logf(pe)) * p.entropy_scale;
}

// dL_balance/dp_e of one token, from the stats [4E] (selection held constant).
MOLE_DEVICE float bw_balance_grad(const mole_backward_params& p, const float* __restrict__ stats, mole_u32 e,
                                  bool selected) {
    const mole_u32 n = p.experts;
    float g;
    if (p.balance == MOLE_BW_BALANCE_SWITCH) g = (float)n * stats[MOLE_BW_STAT_SELECTED * n + e];
    else if (p.balance == MOLE_BW_BALANCE_DYNMOLE)
        g = (float)n * (stats[MOLE_BW_STAT_MASKED * n + e] + (selected ? stats[MOLE_BW_STAT_PROB * n + e] : 0.0f));
    else g = stats[MOLE_BW_STAT_TOP1 * n + e];
    return p.lb_coef * p.inv_t * g;
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(bw_token)(const mole_backward_params p, const elem_t* __restrict__ x, const elem_t* __restrict__ a,
                         const elem_t* __restrict__ b, const elem_t* __restrict__ dy,
                         const mole_u32* __restrict__ rank_offsets, const float* __restrict__ expert_scales,
                         const elem_t* __restrict__ cores, const int* __restrict__ ids,
                         const float* __restrict__ route_weights, float* __restrict__ bw_h,
                         float* __restrict__ bw_g, float* __restrict__ bw_dh, float* __restrict__ bw_hm,
                         float* __restrict__ bw_dw, float* __restrict__ bw_w) {
    __shared__ float red[MOLE_BLOCK_THREADS];
    const mole_u32 R = p.rank, E = p.experts, tid = threadIdx.x, step = blockDim.x;
    const bool core_merge = p.mix == MOLE_BW_MIX_CORE_MERGE;
    for (mole_u64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        const elem_t* xt = x + t * p.d_in;
        const elem_t* dyt = dy + t * p.d_out;
        const int* it = ids + t * p.slots;
        const float* wt = route_weights + t * p.slots;
        float* h = bw_h + t * R;
        float* g = bw_g + t * R;
        float* dh = bw_dh + t * R;
        float* hm = bw_hm + t * R;
        float* dw = bw_dw + t * E;
        float* w = bw_w + t * E;
        bool any = false;  // CoMoL: the token selected a core
        for (mole_u32 j = 0u; j < p.slots; ++j) any = any || (it[j] >= 0 && it[j] < (int)E);
        for (mole_u32 e = tid; e < E; e += step) {
            float we = 0.0f;
            for (mole_u32 j = 0u; j < p.slots; ++j)
                if (it[j] == (int)e) we += wt[j];
            w[e] = we;
            dw[e] = 0.0f;
        }
        for (mole_u32 c = tid; c < R; c += step) {
            float hv = 0.0f;
            for (mole_u32 k = 0u; k < p.d_in; ++k) hv += load_f32(xt + k) * load_f32(a + (mole_u64)k * R + c);
            h[c] = hv;
            dh[c] = 0.0f;
        }
        // g: one warp per column, its lanes along the row of B (coalesced), a butterfly sum.
        for (mole_u32 c = mole_warp_id(); c < R; c += mole_warps_per_block()) {
            const mole_u32 e = bw_expert_of(rank_offsets, p.bank_experts, c);
            float gv = 0.0f;
            if (core_merge ? any : bw_selected(it, p.slots, e)) {  // uniform over the warp
                const elem_t* bc = b + (mole_u64)c * p.d_out;
                for (mole_u32 j = mole_lane(); j < p.d_out; j += MOLE_WARP_SIZE) gv += load_f32(dyt + j) * load_f32(bc + j);
                gv = mole_warp_sum(gv) * p.scale * (expert_scales ? expert_scales[e] : 1.0f);
            }
            if (mole_lane() == 0) g[c] = gv;
        }
        __syncthreads();  // h, g and w of the token written
        if (!core_merge) {
            for (mole_u32 c = tid; c < R; c += step) {
                const mole_u32 e = bw_expert_of(rank_offsets, p.bank_experts, c);
                const float we = w[e], s = expert_scales ? expert_scales[e] : 1.0f;
                dh[c] = we * g[c];
                hm[c] = s * we * h[c];
            }
            for (mole_u32 e = tid; e < E; e += step) {
                if (!bw_selected(it, p.slots, e)) continue;
                float acc = 0.0f;
                for (mole_u32 c = rank_offsets[e]; c < rank_offsets[e + 1u]; ++c) acc += h[c] * g[c];
                dw[e] = acc;
            }
        } else {
            const float s0 = expert_scales ? expert_scales[0] : 1.0f;
            // Slots in order: dh += w_c C_c g (each thread its own rows), dw_c = h^T C_c g.
            for (mole_u32 j = 0u; j < p.slots; ++j) {
                const int cc = it[j];
                if (cc < 0 || cc >= (int)E) continue;  // uniform over the block
                const elem_t* core = cores + (mole_u64)cc * R * R;
                const float wc = w[cc];
                float part = 0.0f;
                for (mole_u32 i = tid; i < R; i += step) {
                    float v = 0.0f;
                    for (mole_u32 jj = 0u; jj < R; ++jj) v += load_f32(core + (mole_u64)i * R + jj) * g[jj];
                    dh[i] += wc * v;
                    part += h[i] * v;
                }
                const float total = bw_block_sum(red, part);
                if (tid == 0u) dw[cc] = total;
            }
            for (mole_u32 col = tid; col < R; col += step) {
                float acc = 0.0f;
                for (mole_u32 j = 0u; j < p.slots; ++j) {
                    const int cc = it[j];
                    if (cc < 0 || cc >= (int)E) continue;
                    const elem_t* core = cores + (mole_u64)cc * R * R + col;
                    float v = 0.0f;
                    for (mole_u32 i = 0u; i < R; ++i) v += h[i] * load_f32(core + (mole_u64)i * R);
                    acc += w[cc] * v;
                }
                hm[col] = s0 * acc;
            }
        }
        __syncthreads();  // the token's rows are complete before the block moves on
    }
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(bw_scores)(const mole_backward_params p, const elem_t* __restrict__ x,
                          const elem_t* __restrict__ router_weight, const elem_t* __restrict__ router_bias,
                          const elem_t* __restrict__ gate_input, const float* __restrict__ bw_h,
                          float* __restrict__ bw_z) {
    const mole_u64 E = p.experts, n = (mole_u64)p.tokens * E;
    const mole_u64 stride = (mole_u64)gridDim.x * blockDim.x;
    for (mole_u64 i = (mole_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const mole_u64 t = i / E, e = i % E;
        float v = 0.0f;
        if (p.router == MOLE_BW_ROUTER_X) {
            for (mole_u32 k = 0u; k < p.d_in; ++k)
                v += load_f32(x + t * p.d_in + k) * load_f32(router_weight + (mole_u64)k * E + e);
        } else if (p.router == MOLE_BW_ROUTER_H) {
            for (mole_u32 c = 0u; c < p.rank; ++c) v += bw_h[t * p.rank + c] * load_f32(router_weight + (mole_u64)c * E + e);
        } else if (p.router == MOLE_BW_ROUTER_LOW_RANK) {
            v = bw_h[t * p.rank + e];
        } else {
            v = load_f32(gate_input + i);
        }
        if (p.has_bias && router_bias) v += load_f32(router_bias + e);
        bw_z[i] = order_key(v);
    }
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(bw_stats)(const mole_backward_params p, const int* __restrict__ ids, const float* __restrict__ bw_z,
                         float* __restrict__ partials) {
    const mole_u32 n = p.experts;
    const mole_u64 first = (mole_u64)blockIdx.x * mole_warps_per_block() + mole_warp_id();
    const mole_u64 stride = (mole_u64)gridDim.x * mole_warps_per_block();
    for (mole_u64 c = first; c < p.chunks; c += stride) {
        float* row = partials + c * 4u * n;
        for (mole_u32 e = mole_lane(); e < 4u * n; e += MOLE_WARP_SIZE) row[e] = 0.0f;
        mole_syncwarp();
        const mole_u64 t0 = c * p.chunk_tokens;
        const mole_u64 t1 = t0 + p.chunk_tokens < p.tokens ? t0 + p.chunk_tokens : (mole_u64)p.tokens;
        // Tokens in order; within a token each element has one writer (the ids of a token are
        // distinct), and the warp syncs between tokens, so every sum runs in token order.
        for (mole_u64 t = t0; t < t1; ++t) {
            const float* z = bw_z + t * n;
            const int* it = ids + t * p.slots;
            const softmax_ctx sm = bw_softmax(p, z);
            for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE) row[MOLE_BW_STAT_PROB * n + e] += bw_prob(p, sm, z[e]);
            for (mole_u32 j = mole_lane(); j < p.slots; j += MOLE_WARP_SIZE) {
                const int id = it[j];
                if (id < 0 || id >= (int)n) continue;
                row[MOLE_BW_STAT_SELECTED * n + id] += 1.0f;
                row[MOLE_BW_STAT_MASKED * n + id] += bw_prob(p, sm, z[id]);
                if (j == 0u) row[MOLE_BW_STAT_TOP1 * n + id] += 1.0f;
            }
            mole_syncwarp();
        }
    }
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(bw_stats_sum)(const mole_backward_params p, const float* __restrict__ partials,
                             float* __restrict__ stats) {
    const mole_u64 len = 4u * (mole_u64)p.experts;
    for (mole_u64 i = threadIdx.x; i < len; i += blockDim.x) {
        float s = 0.0f;
        for (mole_u64 c = 0; c < p.chunks; ++c) s += partials[c * len + i];
        stats[i] = s * p.inv_t;
    }
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(bw_gate)(const mole_backward_params p, const int* __restrict__ ids, const float* __restrict__ bw_z,
                        const float* __restrict__ bw_dw, const float* __restrict__ bw_w,
                        const float* __restrict__ stats, const elem_t* __restrict__ router_weight,
                        float* __restrict__ bw_dz, float* __restrict__ bw_dh, elem_t* __restrict__ d_gate_input) {
    const mole_u32 n = p.experts;
    const mole_u64 first = (mole_u64)blockIdx.x * mole_warps_per_block() + mole_warp_id();
    const mole_u64 stride = (mole_u64)gridDim.x * mole_warps_per_block();
    for (mole_u64 t = first; t < p.tokens; t += stride) {
        const int* it = ids + t * p.slots;
        const float* dw = bw_dw + t * n;
        const float* w = bw_w + t * n;
        float* dz = bw_dz + t * n;
        // The selection as flags in the token's dz row (each lane then reads its own experts').
        for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE) dz[e] = 0.0f;
        mole_syncwarp();
        for (mole_u32 j = mole_lane(); j < p.slots; j += MOLE_WARP_SIZE)
            if (it[j] >= 0 && it[j] < (int)n) dz[it[j]] = 1.0f;
        mole_syncwarp();

        if (p.rule == MOLE_RULE_GIVEN) {
            // The kept weights, raw or the softmax of the kept values: dg = dw or w (dw - w.dw).
            float dot = 0.0f;
            for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE)
                if (dz[e] != 0.0f) dot += w[e] * dw[e];
            dot = mole_warp_sum(dot);
            for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
                const float v = dz[e] == 0.0f ? 0.0f : (p.softmax_kept ? w[e] * (dw[e] - dot) : dw[e]);
                dz[e] = v;
                if (d_gate_input) store_from_f32(d_gate_input + t * n + e, v);
            }
            continue;
        }
        const float* z = bw_z + t * n;
        const bool sig = p.rule == MOLE_RULE_SIGMOID_TOPK;
        const bool magnitude = p.rule == MOLE_RULE_MAGNITUDE_TOPK;  // weight 1, no probabilities
        const softmax_ctx sm = bw_softmax(p, z);
        // Sums over the selected experts (renormalised weights) and the raw entropy.
        float psum = 0.0f, gdot = 0.0f, ent = 0.0f;
        bool nonzero = false;
        for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
            const float pe = bw_prob(p, sm, z[e]);
            if (dz[e] != 0.0f) {
                psum += pe;
                gdot += dw[e] * pe;
            }
            if (p.entropy != MOLE_ENTROPY_NONE) ent += entropy_term(pe, (mole_entropy_kind)p.entropy, p.q, p.entropy_eps);
            nonzero = nonzero || pe != 0.0f;
        }
        psum = mole_warp_sum(psum);
        gdot = mole_warp_sum(gdot);
        ent = mole_warp_sum(ent) * p.entropy_scale;
        nonzero = mole_warp_any(nonzero);
        // The entropy's gradient is 0 where it is clamped, for one expert and a masked token.
        const bool ent_on = p.entropy != MOLE_ENTROPY_NONE && p.entropy_coef != 0.0f && n > 1u && nonzero &&
                            ent >= 0.0f && ent <= 1.0f;
        const bool renorm = sig || (p.rule == MOLE_RULE_SOFTMAX_TOPK && p.weights == MOLE_WEIGHTS_RENORMALIZED);
        const bool raw = !renorm && !magnitude && !(p.rule == MOLE_RULE_SOFTMAX_TOPK && p.weights == MOLE_WEIGHTS_UNIT);
        const float num = sig ? (float)p.k : 1.0f;
        const float mean = psum > 0.0f ? gdot / psum : 0.0f;
        // dL/dp (kept in dz until the last pass) and p . dL/dp.
        float pdot = 0.0f;
        for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
            const bool sel = dz[e] != 0.0f;
            const float pe = bw_prob(p, sm, z[e]);
            float d = 0.0f;
            if (sel && renorm && psum > 0.0f) d = num * (dw[e] - mean) / psum;
            if (sel && raw) d = dw[e];
            if (stats && p.lb_coef != 0.0f) d += bw_balance_grad(p, stats, e, sel);
            if (ent_on) d += p.entropy_coef * p.inv_t * bw_entropy_grad(p, pe);
            dz[e] = magnitude ? 0.0f : d;
            pdot += pe * d;
        }
        pdot = mole_warp_sum(pdot);
        // The z-loss: 2 lse(z) softmax(z) / T on the raw scores (0 for a masked or infinite token).
        float zscale = 0.0f;
        softmax_ctx sm1{1.0f, 0.0f, 1.0f};
        if (p.z_coef != 0.0f) {
            sm1 = softmax_prepare(z, (int)n, 1.0f);
            if (sm1.max != mole_inf() && sm1.max != -mole_inf())
                zscale = 2.0f * (sm1.max + mole_logf(sm1.sum)) * p.z_coef * p.inv_t;
        }
        for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
            const float pe = bw_prob(p, sm, z[e]);
            const float d = dz[e];
            float v = magnitude ? 0.0f : (sig ? d * pe * (1.0f - pe) : pe * (d - pdot) / p.temperature);
            if (zscale != 0.0f) v += zscale * softmax_prob(sm1, z[e]);
            dz[e] = v;
            if (d_gate_input) store_from_f32(d_gate_input + t * n + e, v);
        }
        mole_syncwarp();  // the token's dz row complete
        float* dh = bw_dh + t * p.rank;
        if (p.router == MOLE_BW_ROUTER_LOW_RANK) {
            for (mole_u32 e = mole_lane(); e < n; e += MOLE_WARP_SIZE) dh[e] += dz[e];
        } else if (p.router == MOLE_BW_ROUTER_H) {
            for (mole_u32 c = mole_lane(); c < p.rank; c += MOLE_WARP_SIZE) {
                float acc = 0.0f;
                for (mole_u32 e = 0u; e < n; ++e) acc += dz[e] * load_f32(router_weight + (mole_u64)c * n + e);
                dh[c] += acc;
            }
        }
    }
}

MOLE_GLOBAL void MOLE_BOUNDS(MOLE_BLOCK_THREADS)
    MOLE_ENTRY(bw_dx)(const mole_backward_params p, const float* __restrict__ bw_dh, const elem_t* __restrict__ a,
                      const float* __restrict__ bw_dz, const elem_t* __restrict__ router_weight,
                      elem_t* __restrict__ dx) {
    const mole_u64 n = (mole_u64)p.tokens * p.d_in;
    const mole_u64 stride = (mole_u64)gridDim.x * blockDim.x;
    const bool x_router = p.router == MOLE_BW_ROUTER_X && bw_dz && router_weight;
    for (mole_u64 i = (mole_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const mole_u64 t = i / p.d_in, k = i % p.d_in;
        const float* dh = bw_dh + t * p.rank;
        const elem_t* ak = a + k * p.rank;
        float acc = 0.0f;
        for (mole_u32 c = 0u; c < p.rank; ++c) acc += dh[c] * load_f32(ak + c);
        if (x_router) {
            const float* dz = bw_dz + t * p.experts;
            const elem_t* wk = router_weight + k * p.experts;
            for (mole_u32 e = 0u; e < p.experts; ++e) acc += dz[e] * load_f32(wk + e);
        }
        store_from_f32(dx + i, acc);
    }
}
