// Warp collectives: every shuffle flavour and vote, the mole_* wrappers of warp.cuh, and the
// misuses the layer must report (a shuffle some lanes skip, lanes in different collectives,
// threads at different barriers).
#include "common/arch.cuh"
#include "common/warp.cuh"

// out[12 t + j]: result j of thread t (see hostexec/tests/warp.rs for the expected values).
MOLE_GLOBAL void warp_ops(const int* x, int* out) {
    const int t = (int)threadIdx.x, lane = t % 32;
    const int v = x[t];
    int* o = out + 12 * t;
    o[0] = __shfl_sync(0xffffffffu, v, (lane * 7) % 32);
    o[1] = __shfl_up_sync(0xffffffffu, v, 3);
    o[2] = __shfl_down_sync(0xffffffffu, v, 5);
    o[3] = __shfl_xor_sync(0xffffffffu, v, 6);
    o[4] = __shfl_sync(0xffffffffu, v, 3, 8);
    o[5] = __shfl_up_sync(0xffffffffu, v, 2, 16);
    o[6] = __shfl_down_sync(0xffffffffu, v, 2, 16);
    o[7] = __shfl_xor_sync(0xffffffffu, v, 9, 8);
    o[8] = (int)__ballot_sync(0xffffffffu, v % 3 == 0);
    o[9] = __all_sync(0xffffffffu, v >= 0);
    o[10] = __any_sync(0xffffffffu, v == 5);
    o[11] = (int)__match_any_sync(0xffffffffu, v % 4);
}

// The helpers of common/warp.cuh on one warp: out = [sum, max, argmax key, argmax index, scan...].
MOLE_GLOBAL void warp_helpers(const float* x, const unsigned int* u, float* out, unsigned int* scan) {
    const int lane = mole_lane();
    const float v = x[lane];
    const float sum = mole_warp_sum(v);
    const float max = mole_warp_max(v);
    float key = v;
    int idx = lane;
    mole_warp_argmax(key, idx);
    if (lane == 0) {
        out[0] = sum;
        out[1] = max;
        out[2] = key;
        out[3] = (float)idx;
    }
    scan[lane] = mole_warp_inclusive_scan(u[lane]);
}

// Lanes 16-31 exit first; a shuffle reading them hands back poison.
MOLE_GLOBAL void shfl_from_exited(const int* x, int* out) {
    const int lane = mole_lane();
    if (lane >= 16) return;
    out[lane] = __shfl_xor_sync(0xffffffffu, x[lane], 16);
}

// Bug: only half the warp reaches the shuffle; the other half waits at the barrier.
MOLE_GLOBAL void shfl_divergent(const float* x, float* out) {
    float v = x[threadIdx.x];
    if (mole_lane() < 16) v = mole_shfl_xor(v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

// Bug: the two halves of the warp meet in different votes.
MOLE_GLOBAL void vote_mismatch(int* out) {
    const int lane = mole_lane();
    int r;
    if (lane < 16) {
        r = (int)__ballot_sync(0xffffffffu, 1);
    } else {
        r = __any_sync(0xffffffffu, 1);
    }
    out[lane] = r;
}

// Bug: warp 0 and warp 1 wait at different __syncthreads calls.
MOLE_GLOBAL void barrier_divergent(int* out) {
    if (threadIdx.x < 32) {
        out[threadIdx.x] = 1;
        __syncthreads();
    } else {
        out[threadIdx.x] = 2;
        __syncthreads();
    }
}

// Lane and delta operands outside 0..31: shfl.sync reads only their low five bits.
// out[8 t + j]: see hostexec/tests/warp.rs.
MOLE_GLOBAL void shfl_wide_operands(const int* x, int* out) {
    const int t = (int)threadIdx.x, v = x[t];
    int* o = out + 8 * t;
    o[0] = __shfl_down_sync(0xffffffffu, v, 33u);
    o[1] = __shfl_up_sync(0xffffffffu, v, 34u);
    o[2] = __shfl_xor_sync(0xffffffffu, v, 35);
    o[3] = __shfl_sync(0xffffffffu, v, -1);
    o[4] = __shfl_sync(0xffffffffu, v, 45, 8);
    o[5] = __shfl_down_sync(0xffffffffu, v, 0xffffffffu);
    o[6] = __shfl_up_sync(0xffffffffu, v, 0xffffffffu, 16);
    o[7] = __shfl_xor_sync(0xffffffffu, v, 40, 16);
}
