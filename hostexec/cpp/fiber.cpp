// Fibers: one per CUDA thread of the running block, on pooled 64 KiB stacks with a PROT_NONE
// guard page below each (an overflow faults and is reported instead of corrupting a neighbour).
//
// On x86-64 a context switch saves the callee-saved registers and the SSE/x87 control words on
// the old stack and swaps stack pointers (no signal-mask system call, unlike swapcontext, which
// matters: a warp collective costs 64 switches). Elsewhere, or with MOLE_HOSTEXEC_UCONTEXT,
// makecontext/swapcontext do the same job more slowly.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "internal.h"

namespace mole_host {

std::vector<Fiber> g_fibers(kMaxThreads);

namespace {

struct Stack {
    unsigned char* map;  // guard page, then kFiberStackBytes usable
};
std::vector<Stack> g_stacks;
std::size_t g_page = 0;

std::size_t page_size() {
    if (g_page == 0) g_page = (std::size_t)sysconf(_SC_PAGESIZE);
    return g_page;
}

void grow_pool(unsigned count) {
    const std::size_t page = page_size();
    while (g_stacks.size() < count) {
        void* m = mmap(nullptr, page + kFiberStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED || mprotect(m, page, PROT_NONE) != 0) {
            std::fprintf(stderr, "hostexec: cannot map a fiber stack\n");
            std::abort();
        }
        g_stacks.push_back(Stack{static_cast<unsigned char*>(m)});
    }
}

}  // namespace

bool in_fiber_stack_guard(const void* addr) {
    const auto a = reinterpret_cast<std::uintptr_t>(addr);
    for (const Stack& s : g_stacks) {
        const auto lo = reinterpret_cast<std::uintptr_t>(s.map);
        if (a >= lo && a < lo + g_page) return true;
    }
    return false;
}

#if defined(MOLE_HX_USE_UCONTEXT)

namespace {
ucontext_t g_scheduler;
void (*g_entry)(Fiber*) = nullptr;

// makecontext passes int arguments only: the fiber pointer travels as two halves.
void trampoline(unsigned hi, unsigned lo) {
    auto* f = reinterpret_cast<Fiber*>(((std::uintptr_t)hi << 32) | (std::uintptr_t)lo);
    g_entry(f);
}
}  // namespace

void prepare_fibers(unsigned count, unsigned first_stack, void (*entry)(Fiber*)) {
    grow_pool(first_stack + count);
    g_entry = entry;
    for (unsigned i = 0; i < count; ++i) {
        Fiber& f = g_fibers[i];
        f.stack = g_stacks[first_stack + i].map + page_size();
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = kFiberStackBytes;
        f.context.uc_link = nullptr;
        const auto p = reinterpret_cast<std::uintptr_t>(&f);
        makecontext(&f.context, reinterpret_cast<void (*)()>(&trampoline), 2, (unsigned)(p >> 32),
                    (unsigned)(p & 0xffffffffu));
    }
}

void resume(Fiber& f) { swapcontext(&g_scheduler, &f.context); }
void suspend(Fiber& f) { swapcontext(&f.context, &g_scheduler); }

#else

extern "C" void mole_hx_switch(void** save_sp, void* load_sp);
extern "C" void mole_hx_fiber_start();

// mole_hx_switch(save, load): push the callee-saved registers and the MXCSR / x87 control
// words, store rsp in *save, load rsp from `load`, pop the same. A new fiber's stack is laid out
// so that the first switch "returns" into mole_hx_fiber_start with r12 = fiber, r13 = entry.
asm(R"(
    .text
    .globl mole_hx_switch
    .hidden mole_hx_switch
    .type mole_hx_switch, @function
    .p2align 4
mole_hx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size mole_hx_switch, .-mole_hx_switch

    .globl mole_hx_fiber_start
    .hidden mole_hx_fiber_start
    .type mole_hx_fiber_start, @function
    .p2align 4
mole_hx_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size mole_hx_fiber_start, .-mole_hx_fiber_start
)");

namespace {
void* g_scheduler_sp = nullptr;
}

void prepare_fibers(unsigned count, unsigned first_stack, void (*entry)(Fiber*)) {
    grow_pool(first_stack + count);
    std::uint32_t control[2];  // the launcher's MXCSR and x87 control word, inherited by fibers
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    control[1] &= 0xffffu;
    for (unsigned i = 0; i < count; ++i) {
        Fiber& f = g_fibers[i];
        f.stack = g_stacks[first_stack + i].map + page_size();
        auto top = (reinterpret_cast<std::uintptr_t>(f.stack) + kFiberStackBytes) & ~std::uintptr_t{15};
        auto* sp = reinterpret_cast<std::uint64_t*>(top);
        *--sp = reinterpret_cast<std::uint64_t>(&mole_hx_fiber_start);  // return address
        *--sp = 0;                                                       // rbp
        *--sp = 0;                                                       // rbx
        *--sp = reinterpret_cast<std::uint64_t>(&f);                     // r12
        *--sp = reinterpret_cast<std::uint64_t>(entry);                  // r13
        *--sp = 0;                                                       // r14
        *--sp = 0;                                                       // r15
        *--sp = (std::uint64_t)control[0] | ((std::uint64_t)control[1] << 32);
        f.sp = sp;
    }
}

void resume(Fiber& f) { mole_hx_switch(&g_scheduler_sp, f.sp); }
void suspend(Fiber& f) { mole_hx_switch(&f.sp, g_scheduler_sp); }

#endif

}  // namespace mole_host
