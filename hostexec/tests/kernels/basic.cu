// Small kernels exercising the launch path: indexing, arguments, static and dynamic shared
// memory, barriers and atomics.
#include "common/arch.cuh"

struct scale_params {
    float a;
    unsigned int n;
};

MOLE_GLOBAL void scale_f32(const float* x, float* y, float a) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = a * x[i];
}

// Writes each thread's coordinates: out[linear] = (tid.x, tid.y, tid.z, block.x, block.y, block.z).
MOLE_GLOBAL void coords(unsigned int* out) {
    const unsigned int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned int* o = out + 6 * (b * blockDim.x * blockDim.y * blockDim.z + t);
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
}

// Block sum through a static shared array and a tree of barriers; the struct parameter is
// passed by value.
MOLE_GLOBAL void block_sum(const float* x, float* out, scale_params p) {
    __shared__ float partial[256];
    const unsigned int t = threadIdx.x;
    partial[t] = t < p.n ? x[blockIdx.x * p.n + t] : 0.0f;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s /= 2) {
        if (t < s) partial[t] += partial[t + s];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = p.a * partial[0];
}

// Reverses x within each block through dynamic shared memory.
MOLE_GLOBAL void reverse_dynamic(const int* x, int* y) {
    extern __shared__ int buf[];
    const unsigned int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    buf[t] = x[base + t];
    __syncthreads();
    y[base + t] = buf[blockDim.x - 1 - t];
}

// Histogram with atomics and the counting barrier.
MOLE_GLOBAL void histogram(const unsigned int* x, unsigned int* bins, int* counted) {
    const unsigned int v = x[threadIdx.x];
    atomicAdd(&bins[v % 8], 1u);
    const int n = __syncthreads_count(v % 2 == 0);
    if (threadIdx.x == 0) *counted = n;
}

// atomicMax / atomicMin on int, atomicCAS on unsigned (the first thread to run wins), atomicAdd
// on float.
MOLE_GLOBAL void atomics(int* extremes, unsigned int* first, float* sum) {
    const int t = (int)threadIdx.x;
    atomicMax(&extremes[0], (t * 7) % 23 - 11);
    atomicMin(&extremes[1], (t * 7) % 23 - 11);
    atomicCAS(first, 0u, (unsigned int)t + 1u);
    atomicAdd(sum, 0.5f);
}

// Bug: each block adds its sum to out[0] with a read before its reduction and a write after it,
// not an atomic: blocks in flight together lose each other's updates.
MOLE_GLOBAL void racy_accumulate(const float* x, float* out) {
    __shared__ float partial[64];
    const unsigned int t = threadIdx.x;
    const float before = out[0];
    partial[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s /= 2) {
        if (t < s) partial[t] += partial[t + s];
        __syncthreads();
    }
    if (t == 0) out[0] = before + partial[0];
}

// Bug: block b reads block b-1's output (nothing orders blocks): right only when blocks run in
// index order.
MOLE_GLOBAL void chained_blocks(const float* x, float* out) {
    const unsigned int b = blockIdx.x;
    if (threadIdx.x == 0) out[b] = x[b] + (b > 0 ? out[b - 1] : 0.0f);
}
