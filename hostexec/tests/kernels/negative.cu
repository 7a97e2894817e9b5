// Kernels with one planted bug each, and their fixed twins. hostexec/tests/negative.rs checks
// that the layer catches every bug and passes every twin.
#include "common/arch.cuh"

// Rounds of "write my slot, barrier, read my neighbour's". Without a barrier after the read
// (kFixed = false), a thread that races ahead overwrites its slot for the next round before a
// slower neighbour has read it.
template <bool kFixed>
MOLE_DEVICE void neighbour_rounds(const float* x, float* out) {
    __shared__ float s[128];
    const unsigned int t = threadIdx.x, n = blockDim.x;
    float acc = 0.0f;
    for (int r = 0; r < 4; ++r) {
        s[t] = x[t] + (float)r;
        __syncthreads();
        acc += s[(t + 1) % n];
        if (kFixed) __syncthreads();
    }
    out[t] = acc;
}
MOLE_GLOBAL void rounds_missing_sync(const float* x, float* out) { neighbour_rounds<false>(x, out); }
MOLE_GLOBAL void rounds_fixed(const float* x, float* out) { neighbour_rounds<true>(x, out); }

// Bug: no bounds check; the grid covers more threads than y has elements.
MOLE_GLOBAL void copy_unguarded(const float* x, float* y, unsigned int n) {
    (void)n;
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i];
}
MOLE_GLOBAL void copy_guarded(const float* x, float* y, unsigned int n) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

// Bug: shifts left without skipping element 0, so thread 0 writes y[-1].
MOLE_GLOBAL void shift_unguarded(const float* x, float* y) {
    const int i = (int)threadIdx.x;
    y[i - 1] = x[i];
}
MOLE_GLOBAL void shift_guarded(const float* x, float* y) {
    const int i = (int)threadIdx.x;
    if (i > 0) y[i - 1] = x[i];
}

// Bug: only the first 48 of 64 staged values are written before they are read back reversed.
MOLE_GLOBAL void stage_partial(const float* x, float* y) {
    __shared__ float s[64];
    const unsigned int t = threadIdx.x;
    if (t < 48) s[t] = x[t];
    __syncthreads();
    y[t] = s[63 - t];
}
MOLE_GLOBAL void stage_full(const float* x, float* y) {
    __shared__ float s[64];
    const unsigned int t = threadIdx.x;
    s[t] = t < 48 ? x[t] : 0.0f;
    __syncthreads();
    y[t] = s[63 - t];
}

// Bug: reads dynamic shared memory nobody wrote.
MOLE_GLOBAL void dynamic_unwritten(float* y) {
    extern __shared__ float d[];
    y[threadIdx.x] = d[threadIdx.x];
}

// Bug: writes through a pointer the signature declares const.
MOLE_GLOBAL void write_through_const(const float* x) { const_cast<float*>(x)[threadIdx.x] = 0.0f; }

// Bug: unbounded recursion depth for a 64 KiB fiber stack (about 1 KiB per level).
MOLE_DEVICE float deep(int depth, float v) {
    volatile float frame[256];
    frame[depth % 256] = v;
    return depth == 0 ? frame[0] : deep(depth - 1, v + 1.0f) + frame[depth % 256];
}
MOLE_GLOBAL void recurse(float* y, int depth) { y[threadIdx.x] = deep(depth, 0.0f); }
