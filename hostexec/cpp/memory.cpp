// Global buffers with guard pages, the shared-memory regions, and turning a fault address into
// a report ("out-of-bounds write of buffer 'ids' at element 64 ...").
//
// A buffer is [guard page][data pages][guard page], all from one mmap. GuardAfter puts the data
// flush against the trailing guard (rounded down to its alignment), GuardBefore right after the
// leading guard. The bytes of the data pages outside the buffer (padding) hold poison and are
// checked after every launch, so a stray write there is reported too.
//
// Static __shared__ variables are carved from an arena on first use (build.rs rewrites their
// declarations into references to it); dynamic shared memory is a fixed region whose pages past
// the launch's request are PROT_NONE. Both are poisoned before every block.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <mutex>

#include "internal.h"

namespace mole_host {

namespace {

// Room for every static __shared__ variable of every kernel (a GPU allows 48 KiB per kernel).
constexpr std::size_t kStaticArenaBytes = std::size_t{16} << 20;
constexpr std::size_t kStaticAlign = 128;

std::size_t page() {
    static const std::size_t p = (std::size_t)sysconf(_SC_PAGESIZE);
    return p;
}

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

struct Record {
    std::string name;
    unsigned char* map;
    std::size_t map_len;
    std::size_t bytes;
    std::size_t elem;
};

std::mutex g_buffers_mutex;
std::map<unsigned char*, Record> g_buffers;  // by data pointer

// The dynamic shared region: guard page, kDynamicSharedMax rounded to pages, guard page.
unsigned char* g_dyn_map = nullptr;
std::size_t g_dyn_pages = 0;    // pages of the region that are accessible now
std::size_t g_dyn_bytes = 0;    // the launch's request

unsigned char* dyn_base() {
    static unsigned char* base = [] {
        const std::size_t len = round_up(kDynamicSharedMax, page()) + 2 * page();
        void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "hostexec: cannot map the dynamic shared memory region\n");
            std::abort();
        }
        g_dyn_map = static_cast<unsigned char*>(m);
        return g_dyn_map + page();
    }();
    return base;
}

std::mutex g_arena_mutex;
std::size_t g_arena_used = 0;

unsigned char* static_begin() {
    static unsigned char* base = [] {
        void* m = mmap(nullptr, kStaticArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "hostexec: cannot map the static shared memory arena\n");
            std::abort();
        }
        return static_cast<unsigned char*>(m);
    }();
    return base;
}
unsigned char* static_end() { return static_begin() + g_arena_used; }

std::string element_text(const BufferView& b, std::ptrdiff_t offset) {
    const std::ptrdiff_t e = (std::ptrdiff_t)b.elem;
    const std::ptrdiff_t index = offset >= 0 ? offset / e : -((-offset + e - 1) / e);
    return "buffer '" + b.name + "'" + (b.arg >= 0 ? " (argument " + std::to_string(b.arg) + ")" : "") +
           " at element " + std::to_string(index) + " (byte offset " + std::to_string(offset) + "; it holds " +
           std::to_string(b.bytes / b.elem) + " elements of " + std::to_string(b.elem) + " bytes)";
}

const char* access_text(int write) { return write == 1 ? "write" : write == 0 ? "read" : "access"; }

}  // namespace

void* dynamic_shared() { return dyn_base(); }

void* static_shared(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(g_arena_mutex);
    const std::size_t offset = round_up(g_arena_used, kStaticAlign);
    if (offset + bytes > kStaticArenaBytes) {
        std::fprintf(stderr, "hostexec: static __shared__ variables exceed %zu bytes\n", kStaticArenaBytes);
        std::abort();
    }
    g_arena_used = offset + bytes;
    unsigned char* p = static_begin() + offset;
    std::memset(p, kPoison, bytes);
    return p;
}

bool in_shared(const void* p, std::size_t bytes) {
    const auto* a = static_cast<const unsigned char*>(p);
    if (a >= static_begin() && a + bytes <= static_end()) return true;
    return a >= dyn_base() && a + bytes <= dyn_base() + g_dyn_bytes;
}

void prepare_shared(std::size_t dynamic_bytes) {
    const std::size_t pages = round_up(dynamic_bytes, page()) / page();
    unsigned char* base = dyn_base();
    if (pages != g_dyn_pages) {
        const std::size_t all = round_up(kDynamicSharedMax, page());
        mprotect(base, all, PROT_NONE);
        if (pages > 0) mprotect(base, pages * page(), PROT_READ | PROT_WRITE);
        g_dyn_pages = pages;
    }
    g_dyn_bytes = dynamic_bytes;
}

void poison_shared() {
    std::memset(static_begin(), kPoison, (std::size_t)(static_end() - static_begin()));
    std::memset(dyn_base(), kPoison, g_dyn_pages * page());
}

void save_shared(std::vector<unsigned char>& out) {
    const std::size_t arena = g_arena_used, dyn = g_dyn_pages * page();
    out.resize(arena + dyn);
    std::memcpy(out.data(), static_begin(), arena);
    std::memcpy(out.data() + arena, dyn_base(), dyn);
}

void restore_shared(const std::vector<unsigned char>& in) {
    const std::size_t dyn = g_dyn_pages * page();
    const std::size_t arena = in.size() - dyn;
    std::memcpy(static_begin(), in.data(), arena);
    // Variables another block allocated since the save are as this block left them: untouched.
    std::memset(static_begin() + arena, kPoison, g_arena_used - arena);
    std::memcpy(dyn_base(), in.data() + arena, dyn);
}

std::string check_shared_tail() {
    const unsigned char* base = dyn_base();
    for (std::size_t i = g_dyn_bytes; i < g_dyn_pages * page(); ++i)
        if (base[i] != kPoison)
            return "write past the end of dynamic shared memory at byte offset " + std::to_string(i) +
                   " (the launch asked for " + std::to_string(g_dyn_bytes) + " bytes)";
    return {};
}

std::unique_lock<std::mutex> lock_buffers() { return std::unique_lock<std::mutex>(g_buffers_mutex); }

void snapshot_buffers(std::vector<BufferView>& out) {
    out.clear();
    for (const auto& [data, r] : g_buffers) out.push_back(BufferView{r.name, r.map, r.map_len, data, r.bytes, r.elem});
}

BufferView* find_buffer(std::vector<BufferView>& views, const void* p) {
    const auto* a = static_cast<const unsigned char*>(p);
    for (BufferView& v : views)
        if (a >= v.data && a <= v.data + v.bytes) return &v;
    return nullptr;
}

void set_read_only(BufferView& v, bool read_only) {
    const std::size_t len = v.map_len - 2 * page();
    if (len > 0) mprotect(v.map + page(), len, read_only ? PROT_READ : PROT_READ | PROT_WRITE);
}

ErrorKind fault_kind(Launch& l) {
    const auto* a = static_cast<const unsigned char*>(l.fault_addr);
    for (const BufferView& b : l.buffers) {
        if (a < b.map || a >= b.map + b.map_len) continue;
        const bool guard = a < b.map + page() || a >= b.map + b.map_len - page();
        return guard ? ErrorKind::OutOfBounds : b.read_only ? ErrorKind::ReadOnlyWrite : ErrorKind::InvalidAddress;
    }
    if (g_dyn_map && a >= g_dyn_map && a < g_dyn_map + round_up(kDynamicSharedMax, page()) + 2 * page())
        return ErrorKind::SharedOverrun;
    if (in_fiber_stack_guard(a)) return ErrorKind::StackOverflow;
    return ErrorKind::InvalidAddress;
}

std::string describe_fault(Launch& l) {
    const auto* a = static_cast<const unsigned char*>(l.fault_addr);
    const char* what = access_text(l.fault_write);
    for (const BufferView& b : l.buffers) {
        if (a < b.map || a >= b.map + b.map_len) continue;
        const std::ptrdiff_t off = a - b.data;
        if (a >= b.map + page() && a < b.map + b.map_len - page() && b.read_only)
            return "write to " + element_text(b, off) + ", which the kernel takes through a const pointer";
        return std::string("out-of-bounds ") + what + " of " + element_text(b, off);
    }
    if (g_dyn_map && a >= g_dyn_map && a < g_dyn_map + round_up(kDynamicSharedMax, page()) + 2 * page()) {
        const std::ptrdiff_t off = a - dyn_base();
        return std::string("out-of-bounds ") + what + " of dynamic shared memory at byte offset " +
               std::to_string(off) + " (the launch asked for " + std::to_string(g_dyn_bytes) + " bytes)";
    }
    if (in_fiber_stack_guard(a))
        return "stack overflow: a CUDA thread used more than its " + std::to_string(kFiberStackBytes / 1024) +
               " KiB fiber stack";
    char buf[96];
    std::snprintf(buf, sizeof buf, "%s of address %p, which is in no buffer", what, l.fault_addr);
    return buf;
}

std::string check_buffer_padding(const std::vector<BufferView>& views, ErrorKind& kind) {
    for (const BufferView& b : views) {
        if (b.arg < 0) continue;  // only the buffers handed to the kernel are its to blame
        const unsigned char* lo = b.map + page();
        const unsigned char* hi = b.map + b.map_len - page();
        for (const unsigned char* p = lo; p < hi; ++p) {
            if (p == b.data) p += b.bytes;
            if (p < hi && *p != kPoison) {
                kind = ErrorKind::OutOfBounds;
                return "out-of-bounds write of " + element_text(b, p - b.data) +
                       ", into the padding next to its guard page (found after the launch)";
            }
        }
    }
    return {};
}

}  // namespace mole_host

using mole_host::page;

extern "C" {

// A buffer of `bytes` (a multiple of `elem`) between guard pages; see the file comment.
// `align` is a power of two. Returns the data pointer; the data bytes are poisoned, or with
// `lazy` left as the kernel's zero pages (a huge buffer then costs only the pages written).
void* mole_hx_alloc(const char* name, std::size_t bytes, std::size_t elem, std::size_t align, int guard_before,
                    int lazy) {
    using namespace mole_host;
    const std::size_t data_len = round_up(bytes + align, page());  // room to align the end down
    const std::size_t map_len = data_len + 2 * page();
    // A lazy buffer reserves no swap: only the pages written are ever backed, so it maps even
    // under strict overcommit.
    const int flags = MAP_PRIVATE | MAP_ANONYMOUS | (lazy ? MAP_NORESERVE : 0);
    void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    auto* map = static_cast<unsigned char*>(m);
    mprotect(map, page(), PROT_NONE);
    mprotect(map + map_len - page(), page(), PROT_NONE);
    unsigned char* data;
    if (guard_before) {
        data = map + page();
    } else {
        const auto end = reinterpret_cast<std::uintptr_t>(map + map_len - page());
        data = reinterpret_cast<unsigned char*>((end - bytes) & ~(std::uintptr_t)(align - 1));
    }
    if (lazy) {  // poison the padding only: it is checked after every launch
        std::memset(map + page(), kPoison, (std::size_t)(data - (map + page())));
        std::memset(data + bytes, kPoison, (std::size_t)(map + map_len - page() - (data + bytes)));
    } else {
        std::memset(map + page(), kPoison, data_len);
    }
    std::lock_guard<std::mutex> lock(g_buffers_mutex);
    g_buffers[data] = Record{name ? name : "?", map, map_len, bytes, elem ? elem : 1};
    return data;
}

void mole_hx_free(void* data) {
    using namespace mole_host;
    std::lock_guard<std::mutex> lock(g_buffers_mutex);
    auto it = g_buffers.find(static_cast<unsigned char*>(data));
    if (it == g_buffers.end()) return;
    munmap(it->second.map, it->second.map_len);
    g_buffers.erase(it);
}

}  // extern "C"
