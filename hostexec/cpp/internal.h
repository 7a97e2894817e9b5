// State shared by the runtime's translation units. One launch runs at a time (a process-wide
// mutex), so the launch, its block and its fibers live in globals.
#pragma once

#include <csetjmp>
#include <cstdint>
#include <mutex>
#include <pthread.h>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(MOLE_HOSTEXEC_UCONTEXT)
#define MOLE_HX_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#include "common/host/api.h"

namespace mole_host {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / kWarpSize;
// The largest opt-in dynamic shared memory of any supported GPU (sm_90: 227 KiB).
constexpr std::size_t kDynamicSharedMax = 232448;
constexpr std::size_t kFiberStackBytes = 64 * 1024;
constexpr unsigned char kPoison = 0xFF;  // all-ones: NaN as float, -1 as int

// Error classes reported to Rust (keep in sync with hostexec/src/error.rs).
enum class ErrorKind : int {
    None = 0,
    Launch = 1,
    OutOfBounds = 2,
    ReadOnlyWrite = 3,
    InvalidAddress = 4,
    StackOverflow = 5,
    Deadlock = 6,
    DivergentBarrier = 7,
    DivergentWarp = 8,
    Misuse = 9,
    SharedOverrun = 10,
};

enum class Schedule : std::uint32_t { Forward = 0, Reverse = 1, Seeded = 2 };

// How mma.sync sums (keep in sync with hostexec/src/lib.rs MmaAccumulation).
enum class MmaMode : std::uint32_t { Truncating = 0, Exact = 1 };

// What a fiber is blocked on.
enum class Wait : std::uint8_t { None, Barrier, Warp, Exited };

// A cp.async copy: the source bytes are read at issue, written to `dst` at the covering wait.
struct Copy {
    unsigned char* dst;
    std::uint32_t size;
    unsigned char data[16];
};

struct Fiber {
#if defined(MOLE_HX_USE_UCONTEXT)
    ucontext_t context;
#else
    void* sp = nullptr;
#endif
    unsigned char* stack = nullptr;  // lowest usable byte, just above the guard page
    uint3 tid{0, 0, 0};
    unsigned linear = 0, warp = 0, lane = 0;
    Wait wait = Wait::None;
    const char* what = nullptr;  // the collective waited in, for reports
    const char* file = nullptr;
    int line = 0;
    int pred = 0;  // barrier predicate in, barrier result out
    BarrierKind barrier_kind = BarrierKind::Plain;
    std::vector<Copy> open;                 // issued, not yet committed
    std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

// Collectives a lane can wait in: the WarpOp values, then these.
constexpr std::uint32_t kCollLdmatrix = 100;
constexpr std::uint32_t kCollMma = 101;

struct LaneSlot {
    std::uint32_t coll;  // WarpOp value or kColl*
    std::uint32_t mode;  // shuffle width; ldmatrix num * 2 + trans; mma type
    std::uint64_t value;
    int arg;
    const void* addr;
    std::uint32_t in[10];
    std::uint64_t result;
    std::uint32_t out[4];
};

struct Warp {
    unsigned first = 0;   // linear index of lane 0
    unsigned lanes = 0;   // lanes that exist (fewer than 32 in a partial last warp)
    unsigned live = 0;    // lanes not exited
    unsigned arrived = 0; // lanes waiting in the current collective
    std::uint32_t arrived_mask = 0;
    LaneSlot slot[kWarpSize];
};

// A buffer as one launch sees it (snapshot of the allocator's registry).
struct BufferView {
    std::string name;
    unsigned char* map;  // whole mapping, guard pages included
    std::size_t map_len;
    unsigned char* data;
    std::size_t bytes;
    std::size_t elem;
    int arg = -1;  // first kernel argument bound to it, or -1
    bool read_only = false;
};

// A registered kernel. The leading fields are the C view handed to Rust (hostexec/src/ffi.rs).
struct KernelInfo {
    const char* name;
    const char* file;
    const char* dtype;
    const ParamDesc* params;
    std::size_t param_count;
    AnyFn fn;
    Invoker invoker;
};

struct Launch {
    const KernelInfo* kernel = nullptr;
    dim3 grid, block;
    std::size_t dynamic_bytes = 0;
    Schedule schedule = Schedule::Forward;
    std::uint64_t rng = 0;
    MmaMode mma = MmaMode::Truncating;
    unsigned resident = 1;  // blocks in flight at once (interleaved at barriers when > 1)
    void* const* args = nullptr;
    std::vector<BufferView> buffers;
    pthread_t thread{};

    // The running block.
    unsigned threads = 0, live = 0, at_barrier = 0;
    bool released = false;  // a __syncthreads of the running block was released (a phase ended)
    Warp warps[kMaxWarps];
    std::uint64_t runnable[kMaxThreads / 64] = {};
    unsigned runnable_count = 0;
    int current = -1;
    volatile bool in_kernel = false;  // a fiber (or runtime code on its behalf) is running

    sigjmp_buf fault_jump;
    void* fault_addr = nullptr;
    int fault_write = -1;  // 1 write, 0 read, -1 unknown
    int fault_fiber = -1;

    ErrorKind error = ErrorKind::None;
    std::string message;
};

extern Launch* g_launch;
extern std::vector<Fiber> g_fibers;

// fiber.cpp
// Fibers 0..count-1 of g_fibers on pool stacks first_stack.. (each resident block its own).
void prepare_fibers(unsigned count, unsigned first_stack, void (*entry)(Fiber*));
void resume(Fiber& f);
void suspend(Fiber& f);
bool in_fiber_stack_guard(const void* addr);

// sched.cpp
Fiber& current_fiber();
// Runs every block of the grid (one after another, or `resident` at a time interleaved).
void run_grid(Launch& l);
std::uint64_t next_random(std::uint64_t& state);
void make_runnable(unsigned linear);
void block_current(Wait wait, const char* what, const char* file, int line);
[[noreturn]] void fail_current(ErrorKind kind, const std::string& message);
std::string thread_name(const Fiber& f);
// What a thread is doing, e.g. "wait at __syncthreads (k.cu:12)" or "exited".
std::string wait_text(const Fiber& f);
// Threads [first, end) grouped into runs of equal descriptions: "threads 0-15 exited; thread 16 ...".
std::string describe_threads(unsigned first, unsigned end, std::string (*describe)(const Fiber&));
// "file.cu:12": the call site of a collective, file name without its folder.
std::string site(const char* file, int line);
std::string lane_ranges(std::uint32_t mask, unsigned first);

// memory.cpp
// Holds the buffer registry for a whole launch, so that no buffer is freed (or mapped) while
// the launch's snapshot of them is in use.
std::unique_lock<std::mutex> lock_buffers();
void snapshot_buffers(std::vector<BufferView>& out);
BufferView* find_buffer(std::vector<BufferView>& views, const void* p);
std::string describe_fault(Launch& l);
ErrorKind fault_kind(Launch& l);
void prepare_shared(std::size_t dynamic_bytes);
void poison_shared();
// The running block's shared memory (static arena and dynamic region), saved and restored when
// blocks are interleaved.
void save_shared(std::vector<unsigned char>& out);
void restore_shared(const std::vector<unsigned char>& in);
std::string check_shared_tail();
std::string check_buffer_padding(const std::vector<BufferView>& views, ErrorKind& kind);
bool in_shared(const void* p, std::size_t bytes);
void set_read_only(BufferView& v, bool read_only);

// warp.cpp
void complete_warp(Warp& w);
void discard_copies(Fiber& f);

}  // namespace mole_host
