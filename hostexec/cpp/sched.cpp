// The block scheduler: runs one fiber at a time until it blocks (barrier, warp collective) or
// exits, then picks the next runnable one in the launch's order: lowest thread first
// (Forward), highest first (Reverse) or uniformly at random from a seed (Seeded). Because a
// fiber runs as far as it can, a missing barrier shows as a read of poisoned or stale shared
// memory under at least one order.
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "internal.h"

namespace mole_host {

uint3 g_thread_idx{0, 0, 0};
uint3 g_block_idx{0, 0, 0};
uint3 g_block_dim{1, 1, 1};
uint3 g_grid_dim{1, 1, 1};

constexpr unsigned kWords = kMaxThreads / 64;

std::uint64_t next_random(std::uint64_t& state) {
    // splitmix64: a full-period generator whose stream depends only on the seed.
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

namespace {

void clear_runnable(Launch& l, unsigned i) {
    const std::uint64_t bit = 1ull << (i % 64);
    if (l.runnable[i / 64] & bit) {
        l.runnable[i / 64] &= ~bit;
        --l.runnable_count;
    }
}

// The next fiber to resume, or -1 when none is runnable.
int pick(Launch& l) {
    if (l.runnable_count == 0) return -1;
    switch (l.schedule) {
        case Schedule::Forward:
            for (unsigned w = 0; w < kWords; ++w)
                if (l.runnable[w]) return (int)(w * 64 + (unsigned)__builtin_ctzll(l.runnable[w]));
            break;
        case Schedule::Reverse:
            for (unsigned w = kWords; w-- > 0;)
                if (l.runnable[w]) return (int)(w * 64 + 63 - (unsigned)__builtin_clzll(l.runnable[w]));
            break;
        case Schedule::Seeded: {
            unsigned k = (unsigned)(next_random(l.rng) % l.runnable_count);
            for (unsigned w = 0; w < kWords; ++w) {
                const unsigned n = (unsigned)__builtin_popcountll(l.runnable[w]);
                if (k >= n) {
                    k -= n;
                    continue;
                }
                std::uint64_t bits = l.runnable[w];
                for (; k > 0; --k) bits &= bits - 1;  // drop the k lowest set bits
                return (int)(w * 64 + (unsigned)__builtin_ctzll(bits));
            }
            break;
        }
    }
    return -1;
}

}  // namespace

std::string site(const char* file, int line) {
    if (!file) return "?";
    const char* base = file;
    for (const char* p = file; *p; ++p)
        if (*p == '/') base = p + 1;
    return std::string(base) + ":" + std::to_string(line);
}

std::string wait_text(const Fiber& f) {
    switch (f.wait) {
        case Wait::None:
            return "are runnable";
        case Wait::Exited:
            return "exited";
        case Wait::Barrier:
            return std::string("wait at __syncthreads (") + site(f.file, f.line) + ")";
        case Wait::Warp:
            return std::string("wait in ") + f.what + " (" + site(f.file, f.line) + ")";
    }
    return "?";
}

std::string describe_threads(unsigned first, unsigned end, std::string (*describe)(const Fiber&)) {
    std::string out;
    unsigned start = first;
    std::string prev;
    for (unsigned i = first; i <= end; ++i) {
        std::string cur = i < end ? describe(g_fibers[i]) : std::string();
        if (i > first && (i == end || cur != prev)) {
            if (!out.empty()) out += "; ";
            out += start + 1 == i ? "thread " + std::to_string(start)
                                  : "threads " + std::to_string(start) + "-" + std::to_string(i - 1);
            out += " " + prev;
            start = i;
        }
        prev = std::move(cur);
    }
    return out;
}

namespace {

std::string block_name(const Launch&) {
    return "block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "," +
           std::to_string(g_block_idx.z) + ")";
}

void release_barrier(Launch& l);

void fiber_main(Fiber* f) {
    Launch& l = *g_launch;
    l.kernel->invoker(l.kernel->fn, l.args);
    // Exit: leave the block and the warp; the exit may complete what the others wait for.
    f->wait = Wait::Exited;
    clear_runnable(l, f->linear);
    discard_copies(*f);
    --l.live;
    Warp& w = l.warps[f->warp];
    --w.live;
    if (w.arrived > 0 && w.arrived == w.live) complete_warp(w);
    if (l.at_barrier > 0 && l.at_barrier == l.live) release_barrier(l);
    suspend(*f);
    __builtin_unreachable();
}

void release_barrier(Launch& l) {
    // Every live thread is here: they must all be at the same __syncthreads.
    const Fiber* first = nullptr;
    int count = 0;
    bool all = true, any = false;
    for (unsigned i = 0; i < l.threads; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.wait != Wait::Barrier) continue;
        if (!first) first = &f;
        if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
            fail_current(ErrorKind::DivergentBarrier,
                         "divergent __syncthreads in " + block_name(l) + ": " +
                             describe_threads(0, l.threads, &wait_text));
        }
        count += f.pred != 0;
        all = all && f.pred != 0;
        any = any || f.pred != 0;
    }
    for (unsigned i = 0; i < l.threads; ++i) {
        Fiber& f = g_fibers[i];
        if (f.wait != Wait::Barrier) continue;
        switch (f.barrier_kind) {
            case BarrierKind::Plain:
                f.pred = 0;
                break;
            case BarrierKind::Count:
                f.pred = count;
                break;
            case BarrierKind::And:
                f.pred = all;
                break;
            case BarrierKind::Or:
                f.pred = any;
                break;
        }
        f.wait = Wait::None;
        make_runnable(i);
    }
    l.at_barrier = 0;
    l.released = true;
}

}  // namespace

Fiber& current_fiber() { return g_fibers[(unsigned)g_launch->current]; }

void make_runnable(unsigned i) {
    Launch& l = *g_launch;
    const std::uint64_t bit = 1ull << (i % 64);
    if (!(l.runnable[i / 64] & bit)) {
        l.runnable[i / 64] |= bit;
        ++l.runnable_count;
    }
}

void block_current(Wait wait, const char* what, const char* file, int line) {
    Launch& l = *g_launch;
    Fiber& f = current_fiber();
    f.wait = wait;
    f.what = what;
    f.file = file;
    f.line = line;
    clear_runnable(l, f.linear);
}

void fail_current(ErrorKind kind, const std::string& message) {
    Launch& l = *g_launch;
    if (l.error == ErrorKind::None) {
        l.error = kind;
        l.message = message;
    }
    suspend(current_fiber());  // never resumed: the scheduler sees the error and stops
    __builtin_unreachable();
}

std::string thread_name(const Fiber& f) {
    return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) +
           ") of " + block_name(*g_launch);
}

std::string lane_ranges(std::uint32_t mask, unsigned first) {
    std::string out;
    for (unsigned i = 0; i < kWarpSize;) {
        if (!(mask >> i & 1u)) {
            ++i;
            continue;
        }
        unsigned j = i;
        while (j + 1 < kWarpSize && (mask >> (j + 1) & 1u)) ++j;
        if (!out.empty()) out += ",";
        out += std::to_string(first + i) + (j > i ? "-" + std::to_string(first + j) : "");
        i = j + 1;
    }
    return out.empty() ? "none" : out;
}

int barrier(BarrierKind kind, int pred, const char* file, int line) {
    Launch& l = *g_launch;
    block_current(Wait::Barrier, "__syncthreads", file, line);
    Fiber& f = current_fiber();
    f.barrier_kind = kind;
    f.pred = pred;
    if (++l.at_barrier == l.live) release_barrier(l);
    suspend(f);
    return f.pred;
}

void fail(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fail_current(ErrorKind::Misuse, std::string(buf) + " (" + thread_name(current_fiber()) + ")");
}

namespace {

// Starts block `idx` in the live state, on the stacks of resident slot `slot`.
void start_block(Launch& l, uint3 idx, unsigned slot) {
    const unsigned n = l.threads;
    g_block_idx = idx;
    prepare_fibers(n, slot * n, &fiber_main);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = g_fibers[i];
        f.linear = i;
        f.tid = uint3{i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
        f.warp = i / kWarpSize;
        f.lane = i % kWarpSize;
        f.wait = Wait::None;
        f.what = nullptr;
        f.file = nullptr;
        f.pred = 0;
        f.open.clear();
        f.groups.clear();
    }
    for (unsigned w = 0; w * kWarpSize < n; ++w) {
        Warp& warp = l.warps[w];
        warp.first = w * kWarpSize;
        warp.lanes = n - warp.first < kWarpSize ? n - warp.first : kWarpSize;
        warp.live = warp.lanes;
        warp.arrived = 0;
        warp.arrived_mask = 0;
    }
    l.live = n;
    l.at_barrier = 0;
    for (auto& word : l.runnable) word = 0;
    l.runnable_count = 0;
    for (unsigned i = 0; i < n; ++i) make_runnable(i);
    poison_shared();
}

// Resumes the next runnable fiber of the live block; false when none is runnable.
bool step(Launch& l) {
    const int next = pick(l);
    if (next < 0) return false;
    l.current = next;
    g_thread_idx = g_fibers[(unsigned)next].tid;
    l.in_kernel = true;
    resume(g_fibers[(unsigned)next]);
    l.in_kernel = false;
    return true;
}

// The live block has nothing left to run: it exited, or it is stuck.
void finish_block(Launch& l) {
    if (l.live > 0) {
        l.error = ErrorKind::Deadlock;
        l.message = "deadlock in " + block_name(l) + ": " + describe_threads(0, l.threads, &wait_text);
        return;
    }
    std::string overrun = check_shared_tail();
    if (!overrun.empty()) {
        l.error = ErrorKind::SharedOverrun;
        l.message = overrun + " in " + block_name(l);
    }
}

// A block that is started but not running: everything the live state holds of it.
struct Parked {
    uint3 idx{0, 0, 0};
    unsigned live = 0, at_barrier = 0, runnable_count = 0;
    std::uint64_t runnable[kWords] = {};
    std::vector<Warp> warps;
    std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);  // swapped with g_fibers
    std::vector<unsigned char> shared;
    bool busy = false;
};

void park(Launch& l, Parked& p) {
    p.idx = g_block_idx;
    p.live = l.live;
    p.at_barrier = l.at_barrier;
    p.runnable_count = l.runnable_count;
    std::memcpy(p.runnable, l.runnable, sizeof p.runnable);
    p.warps.assign(l.warps, l.warps + (l.threads + kWarpSize - 1) / kWarpSize);
    p.fibers.swap(g_fibers);  // the Fiber objects keep their addresses (their stacks hold them)
    save_shared(p.shared);
}

void unpark(Launch& l, Parked& p) {
    g_block_idx = p.idx;
    l.live = p.live;
    l.at_barrier = p.at_barrier;
    l.runnable_count = p.runnable_count;
    std::memcpy(l.runnable, p.runnable, sizeof p.runnable);
    std::copy(p.warps.begin(), p.warps.end(), l.warps);
    p.fibers.swap(g_fibers);
    restore_shared(p.shared);
}

uint3 block_at(const Launch& l, std::uint64_t linear) {
    return uint3{(unsigned)(linear % l.grid.x), (unsigned)(linear / l.grid.x % l.grid.y),
                 (unsigned)(linear / ((std::uint64_t)l.grid.x * l.grid.y))};
}

// The order blocks start in: as numbered (Forward), reversed (Reverse) or shuffled (Seeded; up
// to 2^16 blocks, beyond that as numbered).
std::vector<std::uint64_t> block_order(Launch& l, std::uint64_t count) {
    std::vector<std::uint64_t> order;
    if (l.schedule == Schedule::Forward || count > (1u << 16)) return order;  // empty: as numbered
    order.resize(count);
    for (std::uint64_t i = 0; i < count; ++i) order[i] = l.schedule == Schedule::Reverse ? count - 1 - i : i;
    if (l.schedule == Schedule::Seeded)
        for (std::uint64_t i = count; i > 1; --i) std::swap(order[i - 1], order[next_random(l.rng) % i]);
    return order;
}

}  // namespace

void run_grid(Launch& l) {
    const std::uint64_t count = (std::uint64_t)l.grid.x * l.grid.y * l.grid.z;
    const std::vector<std::uint64_t> order = block_order(l, count);
    auto linear = [&](std::uint64_t i) { return order.empty() ? i : order[i]; };
    if (l.resident <= 1) {
        for (std::uint64_t i = 0; i < count && l.error == ErrorKind::None; ++i) {
            start_block(l, block_at(l, linear(i)), 0);
            while (l.error == ErrorKind::None && step(l)) {
            }
            if (l.error == ErrorKind::None) finish_block(l);
        }
        return;
    }
    // Up to `resident` blocks in flight. The running one runs until a barrier of it is released
    // (a phase ends), then the scheduler may switch to another: a block's reads and writes of
    // global memory in one phase meet another block's between two of its phases.
    static std::vector<Parked> slots;
    if (slots.size() < l.resident) slots.resize(l.resident);
    for (Parked& p : slots) p.busy = false;
    int running = -1;  // the slot whose block is in the live state
    std::uint64_t next = 0;
    for (;;) {
        // Fill free slots with the next blocks.
        for (unsigned s = 0; s < l.resident && next < count; ++s) {
            if (slots[s].busy) continue;
            if (running >= 0) park(l, slots[(unsigned)running]);
            start_block(l, block_at(l, linear(next++)), s);
            slots[s].busy = true;
            running = (int)s;
        }
        if (running < 0) {
            unsigned busy = 0;
            for (unsigned s = 0; s < l.resident; ++s) busy += slots[s].busy;
            if (busy == 0) return;
            unsigned k = (unsigned)(next_random(l.rng) % busy);
            for (unsigned s = 0; s < l.resident; ++s) {
                if (!slots[s].busy || k-- != 0) continue;
                unpark(l, slots[s]);
                running = (int)s;
                break;
            }
        }
        l.released = false;
        while (l.error == ErrorKind::None && !l.released && step(l)) {
        }
        if (l.error != ErrorKind::None) return;
        if (!l.released) {  // nothing runnable: the block is done (or stuck)
            finish_block(l);
            if (l.error != ErrorKind::None) return;
            slots[(unsigned)running].busy = false;
            running = -1;
            continue;
        }
        // A phase ended: switch to another block in flight half of the time.
        if (next_random(l.rng) % 2 == 0) {
            park(l, slots[(unsigned)running]);
            running = -1;
        }
    }
}

}  // namespace mole_host
