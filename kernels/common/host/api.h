// The interface between kernels compiled as C++ for the CPU and the host execution runtime
// (hostexec/cpp). Kernels never include this directly: runtime.h (the host branch of arch.cuh)
// and mma.h build the CUDA vocabulary on top of it.
//
// Execution model: one launch at a time per process, on the launching OS thread; each CUDA thread
// of a block is a fiber. A fiber runs until it blocks (barrier, warp collective) or exits; the
// scheduler then resumes another in the launch's order. Blocks run one after another, or several
// interleaved at barrier releases (each with its own shared memory, swapped in when it runs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace mole_host {

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The running fiber's coordinates, rewritten by the scheduler before every resume. Plain globals
// are enough because launches are serialised and every fiber of a launch runs on one OS thread.
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern uint3 g_block_dim;
extern uint3 g_grid_dim;

// Block barrier (__syncthreads and its counting forms). `file:line` name the call site: threads
// meeting at different sites are reported as a divergent barrier.
enum class BarrierKind : std::uint32_t { Plain, Count, And, Or };
int barrier(BarrierKind kind, int pred, const char* file, int line);

// Warp collectives: every live lane of the warp deposits its operand and waits until all have.
enum class WarpOp : std::uint32_t { Shfl, ShflUp, ShflDown, ShflXor, Ballot, All, Any, MatchAny, SyncWarp };
std::uint64_t warp_exchange(WarpOp op, std::uint32_t mask, std::uint64_t value, int arg, int width, const char* file,
                            int line);
// Mask of the lanes of the calling warp that have not exited.
std::uint32_t active_mask();

// ldmatrix .m8n8 .b16: `num` matrices (1, 2, 4); lanes 0..8*num-1 give row addresses.
void warp_ldmatrix(int num, bool trans, const void* row, std::uint32_t* out, const char* file, int line);

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 with PTX fragment layouts.
enum class MmaType : std::uint32_t { Bf16, F16 };
void warp_mma_m16n8k16(MmaType type, float* d, const std::uint32_t* a, const std::uint32_t* b, const float* c,
                       const char* file, int line);

// cp.async: `size` bytes (4, 8, 16) of which the first `src_size` are read from `src` at issue;
// the data reaches `dst` (shared memory) only when a wait covers its group.
void cp_async(void* dst, const void* src, int size, int src_size, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int pending);

// Base of the block's dynamic shared memory (`extern __shared__`). Fixed for the process, so a
// namespace-scope declaration may capture it once.
void* dynamic_shared();
// Storage for one static `__shared__` variable (128-byte aligned), allocated once per
// declaration and poisoned before every block.
void* static_shared(std::size_t bytes);

// Ends the launch with an error attributed to the running thread (printf-style message).
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------------------------
// Kernel registration: the build appends one call per kernel to each compiled unit.
// ---------------------------------------------------------------------------------------------

// One kernel parameter as the launcher checks it.
struct ParamDesc {
    std::uint32_t size;          // sizeof the parameter
    std::uint32_t pointee_size;  // element size behind a pointer (0 for void*)
    std::uint8_t is_pointer;
    std::uint8_t pointee_const;  // const T*: the buffer is made read-only for the launch
};

using AnyFn = void (*)();
// Calls `fn` with each argument copied from the launch's argument storage.
using Invoker = void (*)(AnyFn fn, void* const* args);

void register_kernel_raw(void* registrar, const char* name, AnyFn fn, Invoker invoker, const ParamDesc* params,
                         std::size_t count);

template <class E>
constexpr std::uint32_t size_or_zero() {
    if constexpr (std::is_void_v<E>) {
        return 0;
    } else {
        return (std::uint32_t)sizeof(E);
    }
}

template <class T>
constexpr ParamDesc param_desc() {
    if constexpr (std::is_pointer_v<T>) {
        using E = std::remove_pointer_t<T>;
        return ParamDesc{(std::uint32_t)sizeof(T), size_or_zero<E>(), 1, (std::uint8_t)(std::is_const_v<E> ? 1 : 0)};
    } else {
        static_assert(std::is_trivially_copyable_v<T>, "kernel parameters must be trivially copyable");
        return ParamDesc{(std::uint32_t)sizeof(T), 0, 0, 0};
    }
}

template <class... A>
struct KernelThunk {
    template <std::size_t... I>
    static void call(AnyFn fn, void* const* args, std::index_sequence<I...>) {
        auto f = reinterpret_cast<void (*)(A...)>(fn);
        f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
    static void invoke(AnyFn fn, void* const* args) { call(fn, args, std::index_sequence_for<A...>{}); }
};

template <class... A>
void register_kernel(void* registrar, const char* name, void (*fn)(A...)) {
    static constexpr ParamDesc params[sizeof...(A) + 1] = {param_desc<std::remove_cv_t<A>>()..., ParamDesc{0, 0, 0, 0}};
    register_kernel_raw(registrar, name, reinterpret_cast<AnyFn>(fn), &KernelThunk<A...>::invoke, params,
                        sizeof...(A));
}

}  // namespace mole_host
