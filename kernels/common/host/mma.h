// Host branch of common/mma.cuh: the tensor-core building blocks with the device branch's
// signatures, emulated by the host runtime (a warp-wide rendezvous for mma and ldmatrix; a
// per-thread queue of copies for cp.async that lands at the covering wait).
#pragma once

#include "api.h"

#define MOLE_HX_MMA_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void mole_mma_m16n8k16_bf16(float* d, const unsigned int* a, const unsigned int* b, const float* c,
                                   MOLE_HX_MMA_SITE) {
    ::mole_host::warp_mma_m16n8k16(::mole_host::MmaType::Bf16, d, a, b, c, file, line);
}
inline void mole_mma_m16n8k16_f16(float* d, const unsigned int* a, const unsigned int* b, const float* c,
                                  MOLE_HX_MMA_SITE) {
    ::mole_host::warp_mma_m16n8k16(::mole_host::MmaType::F16, d, a, b, c, file, line);
}

inline void mole_ldmatrix_x1(unsigned int* r, const void* row, MOLE_HX_MMA_SITE) {
    ::mole_host::warp_ldmatrix(1, false, row, r, file, line);
}
inline void mole_ldmatrix_x2(unsigned int* r, const void* row, MOLE_HX_MMA_SITE) {
    ::mole_host::warp_ldmatrix(2, false, row, r, file, line);
}
inline void mole_ldmatrix_x4(unsigned int* r, const void* row, MOLE_HX_MMA_SITE) {
    ::mole_host::warp_ldmatrix(4, false, row, r, file, line);
}
inline void mole_ldmatrix_x1_trans(unsigned int* r, const void* row, MOLE_HX_MMA_SITE) {
    ::mole_host::warp_ldmatrix(1, true, row, r, file, line);
}
inline void mole_ldmatrix_x2_trans(unsigned int* r, const void* row, MOLE_HX_MMA_SITE) {
    ::mole_host::warp_ldmatrix(2, true, row, r, file, line);
}
inline void mole_ldmatrix_x4_trans(unsigned int* r, const void* row, MOLE_HX_MMA_SITE) {
    ::mole_host::warp_ldmatrix(4, true, row, r, file, line);
}

inline void mole_cp_async_4(void* smem, const void* gmem, MOLE_HX_MMA_SITE) {
    ::mole_host::cp_async(smem, gmem, 4, 4, file, line);
}
inline void mole_cp_async_8(void* smem, const void* gmem, MOLE_HX_MMA_SITE) {
    ::mole_host::cp_async(smem, gmem, 8, 8, file, line);
}
inline void mole_cp_async_16(void* smem, const void* gmem, MOLE_HX_MMA_SITE) {
    ::mole_host::cp_async(smem, gmem, 16, 16, file, line);
}
inline void mole_cp_async_16_zfill(void* smem, const void* gmem, int src_bytes, MOLE_HX_MMA_SITE) {
    ::mole_host::cp_async(smem, gmem, 16, src_bytes, file, line);
}
inline void mole_cp_async_commit() { ::mole_host::cp_async_commit(); }
template <int N>
inline void mole_cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    ::mole_host::cp_async_wait(N);
}
inline void mole_cp_async_wait_all() {
    ::mole_host::cp_async_commit();
    ::mole_host::cp_async_wait(0);
}
