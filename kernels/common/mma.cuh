// Tensor-core building blocks: mma.sync m16n8k16 (f32 accumulate), ldmatrix and cp.async.
// The device branch is inline PTX (sm_80+); the CPU port (hostexec) supplies the same functions
// with the per-lane fragment layouts of the PTX ISA, so kernels using them run there unmodified.
//
// Fragments (lane l, g = l / 4, t = l % 4; a .b32 register holds two 16-bit values, the lower
// column or row in the low half):
//   A 16x16 row-major, 4 regs: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
//                              a3 = A[g+8][2t+8..]
//   B 16x8 (k x n), 2 regs:    b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C, D 16x8 f32, 4 floats:   c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// ldmatrix: lanes 8m..8m+7 give the row addresses of matrix m (16-byte aligned rows of eight
// 16-bit values); register m of lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of matrix
// m, or with .trans rows 2(l%4) and 2(l%4)+1 of column l/4.
// cp.async: the copy lands in shared memory only once a wait covers its group.
#pragma once
#include "common/arch.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// Shared-memory address of a generic pointer into shared memory.
MOLE_DEVICE mole_u32 mole_smem_addr(const void* p) {
    mole_u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// D = A * B + C, bf16 inputs, f32 accumulate.
MOLE_DEVICE void mole_mma_m16n8k16_bf16(float* d, const mole_u32* a, const mole_u32* b, const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

// D = A * B + C, f16 inputs, f32 accumulate.
MOLE_DEVICE void mole_mma_m16n8k16_f16(float* d, const mole_u32* a, const mole_u32* b, const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

// ldmatrix: `row` is this lane's row address (lanes 0-7 for x1, 0-15 for x2, all for x4). Like
// cp.async below, it touches shared memory behind the compiler's back: the "memory" clobber
// keeps ordinary shared-memory loads and stores on their side of it.
MOLE_DEVICE void mole_ldmatrix_x1(mole_u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(mole_smem_addr(row))
                 : "memory");
}
MOLE_DEVICE void mole_ldmatrix_x2(mole_u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(mole_smem_addr(row))
                 : "memory");
}
MOLE_DEVICE void mole_ldmatrix_x4(mole_u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mole_smem_addr(row))
                 : "memory");
}
MOLE_DEVICE void mole_ldmatrix_x1_trans(mole_u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                 : "=r"(r[0])
                 : "r"(mole_smem_addr(row))
                 : "memory");
}
MOLE_DEVICE void mole_ldmatrix_x2_trans(mole_u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(mole_smem_addr(row))
                 : "memory");
}
MOLE_DEVICE void mole_ldmatrix_x4_trans(mole_u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mole_smem_addr(row))
                 : "memory");
}

// cp.async global -> shared. .ca (cached in L1) takes 4, 8 or 16 bytes, .cg (L2 only) 16. The
// _zfill forms copy `src_bytes` (0..size) and zero the rest (bounds handling without branches).
MOLE_DEVICE void mole_cp_async_4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(mole_smem_addr(smem)), "l"(gmem) : "memory");
}
MOLE_DEVICE void mole_cp_async_8(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(mole_smem_addr(smem)), "l"(gmem) : "memory");
}
MOLE_DEVICE void mole_cp_async_16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(mole_smem_addr(smem)), "l"(gmem) : "memory");
}
MOLE_DEVICE void mole_cp_async_16_zfill(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(mole_smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}
MOLE_DEVICE void mole_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
MOLE_DEVICE void mole_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// Commits the open group and waits for everything.
MOLE_DEVICE void mole_cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

#else
// CPU port: the same functions, emulated per warp by the host runtime.
#include "common/host/mma.h"
#endif
