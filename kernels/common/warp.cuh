// Warp reductions and scans. Butterfly (xor) reductions leave the identical result in every lane:
// each step combines the same two operands in both lanes, and the combiners are commutative.
#pragma once
#include "common/arch.cuh"

MOLE_DEVICE float mole_warp_max(float v) {
    for (int m = MOLE_WARP_SIZE / 2; m > 0; m /= 2) {
        const float o = mole_shfl_xor(v, m);
        v = o > v ? o : v;
    }
    return v;
}

MOLE_DEVICE float mole_warp_sum(float v) {
    for (int m = MOLE_WARP_SIZE / 2; m > 0; m /= 2) v += mole_shfl_xor(v, m);
    return v;
}

MOLE_DEVICE mole_u32 mole_warp_sum(mole_u32 v) {
    for (int m = MOLE_WARP_SIZE / 2; m > 0; m /= 2) v += mole_shfl_xor(v, m);
    return v;
}

MOLE_DEVICE bool mole_warp_any(bool pred) { return mole_ballot(pred) != 0u; }

// Whether (key_a, idx_a) comes before (key_b, idx_b) in descending order with ties toward the
// lower index. Keys are never NaN here (callers map NaN to -inf first), so this is a strict
// total order on pairs with distinct indices.
MOLE_DEVICE bool mole_before(float key_a, int idx_a, float key_b, int idx_b) {
    return key_a > key_b || (key_a == key_b && idx_a < idx_b);
}

// The first pair of the warp in that order; every lane gets it. Lanes with nothing to offer pass
// (-inf, INT_MAX), which comes after every real pair.
MOLE_DEVICE void mole_warp_argmax(float& key, int& idx) {
    for (int m = MOLE_WARP_SIZE / 2; m > 0; m /= 2) {
        const float ok = mole_shfl_xor(key, m);
        const int oi = mole_shfl_xor(idx, m);
        if (mole_before(ok, oi, key, idx)) {
            key = ok;
            idx = oi;
        }
    }
}

// Inclusive prefix sum over the lanes.
MOLE_DEVICE mole_u32 mole_warp_inclusive_scan(mole_u32 v) {
    for (int d = 1; d < MOLE_WARP_SIZE; d *= 2) {
        const mole_u32 o = mole_shfl_up(v, d);
        if (mole_lane() >= d) v += o;
    }
    return v;
}
