// The storage conversions of common/dtype.cuh, one value per thread: every store (f32 -> f16,
// bf16, f32) and every load (f16, bf16 -> f32), for bit-exact comparison with the `half` crate.
#include "common/arch.cuh"
#include "common/dtype.cuh"

MOLE_GLOBAL void dtype_stores(const float* in, mole_f16* h, mole_bf16* b, float* f, unsigned int n) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    store_from_f32(h + i, in[i]);
    store_from_f32(b + i, in[i]);
    store_from_f32(f + i, in[i]);
}

MOLE_GLOBAL void dtype_loads(const mole_f16* h, const mole_bf16* b, float* hf, float* bf, unsigned int n) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    hf[i] = load_f32(h + i);
    bf[i] = load_f32(b + i);
}
