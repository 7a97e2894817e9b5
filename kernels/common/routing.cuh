// Routing rules of one token, shared by the gating kernels (kernels/gating.cu) and the fused
// layer kernels (kernels/fused.cu). The semantics are those of src/model/gating.rs and
// src/reference/routing.rs:
// - slots are filled in descending score order, ties toward the lower expert index;
// - NaN scores rank as -inf; an all -inf/NaN row has probability 0 everywhere; +inf scores
//   share probability 1;
// - empty slots hold (-1, 0);
// - the normalised entropy is clamped to [0, 1] (a DynMoLE threshold of 1 never switches every
//   expert on); a top-p / DynMoLE threshold >= 1 keeps every expert (the host passes values
//   below 1 rounded to floats below 1, so the f32 test decides as the f64 reference does).
//
// One warp routes one token. The warp stages the token's order keys in `row` (E floats of its
// own), lane l owning experts l, l + 32, ...; every pass reads only the lane's own experts, so no
// synchronisation is needed. Picks are made one at a time: each is the warp argmax over the
// experts after the previous pick in the order, so no "taken" marks are needed and the loop stops
// as soon as a dynamic rule stops keeping experts. Scores are read through load_f32, so they may
// be stored (elem_t) or computed (float).
#pragma once
#include "common/arch.cuh"
#include "common/dtype.cuh"
#include "common/warp.cuh"

#define MOLE_GATING_MAX_EXPERTS 1024
#define MOLE_GATING_MAX_K 8
// Which rule a launch applies (Rust: RuleKind).
enum mole_rule : mole_u32 {
    MOLE_RULE_SOFTMAX_TOPK = 0,
    MOLE_RULE_TOP_P = 1,
    MOLE_RULE_DYNMOLE = 2,
    MOLE_RULE_DENSE_SOFTMAX = 3,
    MOLE_RULE_SIGMOID_TOPK = 4,
    MOLE_RULE_MAGNITUDE_TOPK = 5,
    MOLE_RULE_GIVEN = 6,
    MOLE_RULE_ADAPTER_IDS = 7,
};

// Weighting of softmax top-k picks (Rust: WeightMode, from model::TopKWeights).
enum mole_weight_mode : mole_u32 {
    MOLE_WEIGHTS_SOFTMAX = 0,
    MOLE_WEIGHTS_RENORMALIZED = 1,
    MOLE_WEIGHTS_UNIT = 2,
};

// Which entropy a kernel computes (Rust: EntropyKind).
enum mole_entropy_kind : mole_u32 {
    MOLE_ENTROPY_NONE = 0,
    MOLE_ENTROPY_SHANNON = 1,
    MOLE_ENTROPY_TSALLIS = 2,
};

// Parameters of every gating kernel, by value (Rust: GatingParams).
struct mole_gating_params {
    mole_u32 tokens;              // T
    mole_u32 experts;             // E (row length of scores and probs)
    mole_u32 slots;               // row length of ids and weights
    mole_u32 k;                   // picks (top-k, given top_k) or DynMoLE keep_top_k
    mole_rule rule;               // the rule; picks the branch of the prefix kernel
    mole_weight_mode weights;     // softmax top-k weighting
    mole_entropy_kind entropy;    // DynMoLE: Shannon (q == 1) or Tsallis
    mole_u32 use_bias;            // 1: add selection_bias [E] to the selection score
    mole_u32 softmax_kept;        // given weights: softmax over the kept values
    float temperature;            // softmax temperature (1 for DynMoLE)
    float threshold;              // top-p p, DynMoLE top_p
    float q;                      // Tsallis index
    float entropy_threshold;      // DynMoLE: all experts above this normalised entropy
    float entropy_scale;          // 1 / entropy of the uniform distribution (ln E or 1 - E^(1-q))
    mole_u32 signed_select;       // magnitude top-k: 1 selects by the signed value, 0 by magnitude
    float entropy_eps;            // DynMoLE: added to each probability before the entropy
};
static_assert(sizeof(mole_gating_params) == 64, "mole_gating_params layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, tokens) == 0, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, experts) == 4, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, slots) == 8, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, k) == 12, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, rule) == 16, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, weights) == 20, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, entropy) == 24, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, use_bias) == 28, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, softmax_kept) == 32, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, temperature) == 36, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, threshold) == 40, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, q) == 44, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, entropy_threshold) == 48, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, entropy_scale) == 52, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, signed_select) == 56, "layout");
static_assert(MOLE_OFFSET_OF(mole_gating_params, entropy_eps) == 60, "layout");

// ---------------------------------------------------------------------------------------------
// Per-token building blocks. `row` is the warp's staged keys; lane l touches row[l + 32 i] only.
// ---------------------------------------------------------------------------------------------

// NaN ranks as -inf (-0.0 already compares equal to 0.0).
MOLE_DEVICE float order_key(float v) { return mole_isnan(v) ? -mole_inf() : v; }

MOLE_DEVICE float sigmoid(float z) { return 1.0f / (1.0f + mole_expf(-order_key(z))); }

struct pick {
    float key;
    int idx;  // 0x7fffffff when nothing is left
};

// The order starts before every pair: (+inf, -1).
MOLE_DEVICE pick first_pick() { return pick{mole_inf(), -1}; }

// The next expert after `prev` in descending key order, ties toward the lower index.
MOLE_DEVICE pick next_pick(const float* row, int n, pick prev) {
    pick best{-mole_inf(), 0x7fffffff};
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        const float key = row[e];
        if (mole_before(prev.key, prev.idx, key, e) && mole_before(key, e, best.key, best.idx)) best = pick{key, e};
    }
    mole_warp_argmax(best.key, best.idx);
    return best;
}

// softmax(key / t) of one token: the maximum, and the normaliser (the count of +inf entries when
// the maximum is +inf).
struct softmax_ctx {
    float t, max, sum;
};

MOLE_DEVICE softmax_ctx softmax_prepare(const float* row, int n, float t) {
    float m = -mole_inf();
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) m = row[e] / t > m ? row[e] / t : m;
    m = mole_warp_max(m);
    float sum = 0.0f;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        const float s = row[e] / t;
        if (m == mole_inf()) sum += s == m ? 1.0f : 0.0f;
        else if (m != -mole_inf()) sum += mole_expf(s - m);
    }
    return softmax_ctx{t, m, mole_warp_sum(sum)};
}

MOLE_DEVICE float softmax_prob(const softmax_ctx& c, float key) {
    const float s = key / c.t;
    if (c.max == -mole_inf()) return 0.0f;
    if (c.max == mole_inf()) return s == c.max ? 1.0f / c.sum : 0.0f;
    return mole_expf(s - c.max) / c.sum;
}

// Normalised entropy of p + eps (DynMoLE's definition; eps = 0 elsewhere), in two steps: each
// lane sums entropy_term over its experts, then entropy_finish scales the warp total by
// 1 / (the uniform distribution's entropy, without eps), precomputed on the host in f64, and
// clamps it to [0, 1]. With p' = p + eps, the Tsallis term p' - p'^q - eps is written
// p' * -expm1((q - 1) ln p') - eps: summed over a distribution it is 1 - sum p'^q, and it stays
// accurate as q approaches 1.
MOLE_DEVICE float entropy_term(float p, mole_entropy_kind kind, float q, float eps) {
    const float pe = p + eps;
    if (!(pe > 0.0f)) return 0.0f;
    const float l = mole_logf(pe);
    return kind == MOLE_ENTROPY_SHANNON ? -pe * l : -pe * mole_expm1f((q - 1.0f) * l) - eps;
}

// Zero for a single expert and for an all-zero row (a fully masked token).
MOLE_DEVICE float entropy_finish(float lane_sum, bool lane_nonzero, int n, float scale) {
    const float total = mole_warp_sum(lane_sum);
    const bool any = mole_warp_any(lane_nonzero);
    const float h = total * scale;
    return (n <= 1 || !any) ? 0.0f : (h < 0.0f ? 0.0f : (h > 1.0f ? 1.0f : h));
}

// Slot j of a token is written by lane j % 32, which is also the lane that rereads it.
MOLE_DEVICE bool owns_slot(int j) { return mole_lane() == j % MOLE_WARP_SIZE; }

MOLE_DEVICE void fill_empty(int* ids, float* w, int from, int slots) {
    for (int j = from + mole_lane(); j < slots; j += MOLE_WARP_SIZE) {
        ids[j] = -1;
        w[j] = 0.0f;
    }
}

// Rescales the weights of the picks: w[j] <- w[j] * num / sum, or 0 when sum is not positive.
MOLE_DEVICE void renormalize(float* w, int picks, float num, float sum) {
    for (int j = mole_lane(); j < picks; j += MOLE_WARP_SIZE) w[j] = sum > 0.0f ? num * w[j] / sum : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// One token per rule family.
// ---------------------------------------------------------------------------------------------

// Softmax top-k: p = softmax(z / t); the k largest z; w = p, p / sum(top-k p), or 1.
template <typename S>
MOLE_DEVICE void token_softmax_topk(const mole_gating_params& p, float* row, const S* z, int* ids, float* w,
                                    float* probs) {
    const int n = (int)p.experts, k = (int)p.k;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) row[e] = order_key(load_f32(z + e));
    const softmax_ctx sm = softmax_prepare(row, n, p.temperature);
    if (probs)
        for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) probs[e] = softmax_prob(sm, row[e]);
    pick cur = first_pick();
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        cur = next_pick(row, n, cur);
        const float pj = softmax_prob(sm, cur.key);
        sum += pj;  // in pick order, as the reference sums
        if (owns_slot(j)) {
            ids[j] = cur.idx;
            w[j] = p.weights == MOLE_WEIGHTS_UNIT ? 1.0f : pj;
        }
    }
    if (p.weights == MOLE_WEIGHTS_RENORMALIZED) renormalize(w, k, 1.0f, sum);
    fill_empty(ids, w, k, (int)p.slots);
}

// Top-p, DynMoLE and dense softmax: the kept experts are a prefix of the descending order, so
// picking stops at the first expert not kept. Weights are the raw probabilities.
template <typename S>
MOLE_DEVICE void token_softmax_prefix(const mole_gating_params& p, float* row, const S* z, int* ids, float* w,
                                      float* probs) {
    const int n = (int)p.experts;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) row[e] = order_key(load_f32(z + e));
    const softmax_ctx sm = softmax_prepare(row, n, p.temperature);
    float h = 0.0f;
    bool nonzero = false;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        const float pe = softmax_prob(sm, row[e]);
        if (probs) probs[e] = pe;
        if (p.entropy != MOLE_ENTROPY_NONE) h += entropy_term(pe, p.entropy, p.q, p.entropy_eps);  // DynMoLE
        nonzero = nonzero || pe != 0.0f;
    }
    // A threshold >= 1 keeps every expert, whatever the rounding of the running sum.
    bool all = p.rule == MOLE_RULE_DENSE_SOFTMAX || p.threshold >= 1.0f;
    if (p.rule == MOLE_RULE_DYNMOLE)
        all = entropy_finish(h, nonzero, n, p.entropy_scale) > p.entropy_threshold || all;
    pick cur = first_pick();
    float cum = 0.0f;
    int kept = 0;
    for (; kept < n; ++kept) {
        cur = next_pick(row, n, cur);
        const float pj = softmax_prob(sm, cur.key);
        const float before = cum;
        cum += pj;
        const bool keep = all || (p.rule == MOLE_RULE_TOP_P ? !(before > p.threshold)  // up to the first crossing
                                                            : cum <= p.threshold || kept < (int)p.k);
        if (!keep) break;
        if (owns_slot(kept)) {
            ids[kept] = cur.idx;
            w[kept] = pj;
        }
    }
    fill_empty(ids, w, kept, (int)p.slots);
}

// SMoRA: s = sigmoid(z); the k largest s + bias; w = k * s / sum(selected s); probs = s.
template <typename S>
MOLE_DEVICE void token_sigmoid_topk(const mole_gating_params& p, float* row, const S* z, const elem_t* bias,
                                    int* ids, float* w, float* probs) {
    const int n = (int)p.experts, k = (int)p.k;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        const float s = sigmoid(load_f32(z + e));
        row[e] = order_key(s + (p.use_bias ? load_f32(bias + e) : 0.0f));
        if (probs) probs[e] = s;
    }
    pick cur = first_pick();
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        cur = next_pick(row, n, cur);
        const float s = sigmoid(load_f32(z + cur.idx));
        sum += s;
        if (owns_slot(j)) {
            ids[j] = cur.idx;
            w[j] = s;
        }
    }
    renormalize(w, k, (float)k, sum);
    fill_empty(ids, w, k, (int)p.slots);
}

// FlyLoRA: the k largest |z + bias| (or z + bias, signed), weight 1. No probabilities.
template <typename S>
MOLE_DEVICE void token_magnitude_topk(const mole_gating_params& p, float* row, const S* z, const elem_t* bias,
                                      int* ids, float* w) {
    const int n = (int)p.experts, k = (int)p.k;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        const float v = load_f32(z + e) + (p.use_bias ? load_f32(bias + e) : 0.0f);
        row[e] = order_key(p.signed_select ? v : mole_fabsf(v));
    }
    pick cur = first_pick();
    for (int j = 0; j < k; ++j) {
        cur = next_pick(row, n, cur);
        if (owns_slot(j)) {
            ids[j] = cur.idx;
            w[j] = 1.0f;
        }
    }
    fill_empty(ids, w, k, (int)p.slots);
}

// Given weights: the k largest (k = E without top_k) with their raw values, or the softmax of
// the kept values. probs = the raw weights.
template <typename S>
MOLE_DEVICE void token_given(const mole_gating_params& p, float* row, const S* g, int* ids, float* w,
                             float* probs) {
    const int n = (int)p.experts, k = (int)p.k;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        const float v = load_f32(g + e);
        row[e] = order_key(v);
        if (probs) probs[e] = v;
    }
    pick cur = first_pick();
    float max = 0.0f, sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        cur = next_pick(row, n, cur);
        if (j == 0) max = cur.key;  // the kept values arrive in descending order
        // softmax over the kept values; the three cases of the softmax contract
        float e = 0.0f;
        if (max == mole_inf()) e = cur.key == max ? 1.0f : 0.0f;
        else if (max != -mole_inf()) e = mole_expf(cur.key - max);
        sum += e;
        if (owns_slot(j)) {
            ids[j] = cur.idx;
            w[j] = p.softmax_kept ? e : load_f32(g + cur.idx);
        }
    }
    if (p.softmax_kept) renormalize(w, k, 1.0f, sum);
    fill_empty(ids, w, k, (int)p.slots);
}

// logsumexp(z)^2 of one token, NaN as -inf: a fully masked token adds 0, a +inf one inf.
template <typename S>
MOLE_DEVICE float token_z_loss(const S* z, int n) {
    float m = -mole_inf();
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        const float v = order_key(load_f32(z + e));
        m = v > m ? v : m;
    }
    m = mole_warp_max(m);
    if (m == -mole_inf()) return 0.0f;
    if (m == mole_inf()) return m;
    float s = 0.0f;
    MOLE_NO_UNROLL  // unrolled, this loop makes ptxas spill in the f16 build
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) s += mole_expf(order_key(load_f32(z + e)) - m);
    const float lse = m + mole_logf(mole_warp_sum(s));
    return lse * lse;
}

// Normalised entropy of one token's probability row.
MOLE_DEVICE float token_entropy(const float* probs, int n, mole_entropy_kind kind, float q, float eps, float scale) {
    float h = 0.0f;
    bool nonzero = false;
    for (int e = mole_lane(); e < n; e += MOLE_WARP_SIZE) {
        h += entropy_term(probs[e], kind, q, eps);
        nonzero = nonzero || probs[e] != 0.0f;
    }
    return entropy_finish(h, nonzero, n, scale);
}
