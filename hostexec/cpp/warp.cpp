// Warp collectives (shuffles, votes, __syncwarp, ldmatrix, mma) and cp.async.
//
// A collective is a rendezvous: each lane deposits its operands in its slot and blocks; the
// lane that completes the set (the last live lane to arrive, or an exit that leaves only waiting
// lanes) computes every lane's result, and the scheduler resumes them in the launch's order.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "internal.h"

namespace mole_host {

namespace {

constexpr std::uint64_t kPoison64 = ~0ull;

const char* collective_name(std::uint32_t coll) {
    switch (coll) {
        case (std::uint32_t)WarpOp::Shfl:
            return "__shfl_sync";
        case (std::uint32_t)WarpOp::ShflUp:
            return "__shfl_up_sync";
        case (std::uint32_t)WarpOp::ShflDown:
            return "__shfl_down_sync";
        case (std::uint32_t)WarpOp::ShflXor:
            return "__shfl_xor_sync";
        case (std::uint32_t)WarpOp::Ballot:
            return "__ballot_sync";
        case (std::uint32_t)WarpOp::All:
            return "__all_sync";
        case (std::uint32_t)WarpOp::Any:
            return "__any_sync";
        case (std::uint32_t)WarpOp::MatchAny:
            return "__match_any_sync";
        case (std::uint32_t)WarpOp::SyncWarp:
            return "__syncwarp";
        case kCollLdmatrix:
            return "ldmatrix";
        case kCollMma:
            return "mma.sync";
    }
    return "?";
}

std::string warp_name(const Warp& w) {
    return "warp " + std::to_string(w.first / kWarpSize) + " (threads " + std::to_string(w.first) + "-" +
           std::to_string(w.first + w.lanes - 1) + ")";
}

// The calling lane's slot, to be filled before join().
LaneSlot& my_slot(std::uint32_t coll, std::uint32_t mode) {
    Fiber& f = current_fiber();
    LaneSlot& s = g_launch->warps[f.warp].slot[f.lane];
    s.coll = coll;
    s.mode = mode;
    return s;
}

void join(std::uint32_t coll, const char* file, int line) {
    Launch& l = *g_launch;
    Fiber& f = current_fiber();
    Warp& w = l.warps[f.warp];
    block_current(Wait::Warp, collective_name(coll), file, line);
    ++w.arrived;
    w.arrived_mask |= 1u << f.lane;
    if (w.arrived == w.live) complete_warp(w);
    suspend(f);
}

// .aligned instructions (ldmatrix, mma) need every lane of a full warp.
void require_full_warp(const Warp& w, std::uint32_t coll) {
    if (w.lanes == kWarpSize && w.live == kWarpSize) return;
    const std::uint32_t exited = (w.lanes == kWarpSize ? ~0u : ((1u << w.lanes) - 1u)) & ~w.arrived_mask;
    fail_current(ErrorKind::Misuse, std::string(collective_name(coll)) + " needs all 32 lanes of " + warp_name(w) +
                                         (w.lanes < kWarpSize ? ", a partial warp"
                                                              : ", but threads " + lane_ranges(exited, w.first) +
                                                                    " have exited"));
}

std::uint32_t load_u16(const unsigned char* p) {
    std::uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

// The lane a shuffle reads, as shfl.sync defines it (PTX ISA) for the operands CUDA's
// __shfl*_sync pass: c = ((32 - width) << 8) | (up ? 0 : 31). Only the low five bits of the lane
// operand count (a delta of 33 moves by 1); a source outside the lane's segment yields its own
// value.
unsigned shuffle_source(WarpOp op, unsigned lane, unsigned operand, unsigned width) {
    const unsigned segmask = (kWarpSize - width) & 31u, b = operand & 31u;
    const unsigned cval = op == WarpOp::ShflUp ? 0u : 31u;
    const int min_lane = (int)(lane & segmask), max_lane = (int)((lane & segmask) | (cval & ~segmask));
    int j = (int)lane;
    bool ok = false;
    switch (op) {
        case WarpOp::ShflUp:
            j = (int)lane - (int)b;
            ok = j >= max_lane;
            break;
        case WarpOp::ShflDown:
            j = (int)lane + (int)b;
            ok = j <= max_lane;
            break;
        case WarpOp::ShflXor:
            j = (int)(lane ^ b);
            ok = j <= max_lane;
            break;
        case WarpOp::Shfl:
            j = min_lane | (int)(b & ~segmask);
            ok = j <= max_lane;
            break;
        default:
            break;
    }
    return ok ? (unsigned)j : lane;
}

void complete_exchange(Warp& w, WarpOp op) {
    const std::uint32_t mask = w.arrived_mask;
    std::uint32_t votes = 0;
    for (unsigned l = 0; l < kWarpSize; ++l)
        if ((mask >> l & 1u) && w.slot[l].value != 0) votes |= 1u << l;
    for (unsigned l = 0; l < kWarpSize; ++l) {
        if (!(mask >> l & 1u)) continue;
        LaneSlot& s = w.slot[l];
        const unsigned src = shuffle_source(op, l, (unsigned)s.arg, s.mode);
        switch (op) {
            case WarpOp::Shfl:
            case WarpOp::ShflUp:
            case WarpOp::ShflDown:
            case WarpOp::ShflXor:
                // Reading an exited (or absent) lane is undefined in CUDA: hand back poison.
                s.result = (mask >> src & 1u) ? w.slot[src].value : kPoison64;
                break;
            case WarpOp::Ballot:
                s.result = votes;
                break;
            case WarpOp::All:
                s.result = votes == mask;
                break;
            case WarpOp::Any:
                s.result = votes != 0;
                break;
            case WarpOp::MatchAny: {
                std::uint32_t same = 0;
                for (unsigned k = 0; k < kWarpSize; ++k)
                    if ((mask >> k & 1u) && w.slot[k].value == s.value) same |= 1u << k;
                s.result = same;
                break;
            }
            case WarpOp::SyncWarp:
                s.result = 0;
                break;
        }
    }
}

void complete_ldmatrix(Warp& w) {
    require_full_warp(w, kCollLdmatrix);
    const unsigned num = w.slot[0].mode / 2;
    const bool trans = w.slot[0].mode & 1u;
    const unsigned char* rows[kWarpSize];
    for (unsigned i = 0; i < 8 * num; ++i) {
        const void* p = w.slot[i].addr;
        if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0 || !in_shared(p, 16)) {
            char buf[160];
            std::snprintf(buf, sizeof buf,
                          "ldmatrix row address %p of thread %u is not a 16-byte aligned row of shared memory", p,
                          w.first + i);
            fail_current(ErrorKind::Misuse, buf);
        }
        rows[i] = static_cast<const unsigned char*>(p);
    }
    for (unsigned l = 0; l < kWarpSize; ++l) {
        for (unsigned m = 0; m < num; ++m) {
            const unsigned char* const* mat = rows + 8 * m;
            std::uint32_t lo, hi;
            if (!trans) {  // row l/4, columns 2(l%4), 2(l%4)+1
                lo = load_u16(mat[l / 4] + 2 * (2 * (l % 4)));
                hi = load_u16(mat[l / 4] + 2 * (2 * (l % 4) + 1));
            } else {  // column l/4 of rows 2(l%4), 2(l%4)+1
                lo = load_u16(mat[2 * (l % 4)] + 2 * (l / 4));
                hi = load_u16(mat[2 * (l % 4) + 1] + 2 * (l / 4));
            }
            w.slot[l].out[m] = lo | (hi << 16);
        }
    }
}

double half_to_double(std::uint32_t h, MmaType type) {
    if (type == MmaType::Bf16) {
        const std::uint32_t bits = h << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    const double sign = (h & 0x8000u) ? -1.0 : 1.0;
    const int exp = (int)((h >> 10) & 0x1fu);
    const double man = (double)(h & 0x3ffu);
    if (exp == 0x1f) return man == 0 ? sign * __builtin_inf() : __builtin_nan("");
    if (exp == 0) return sign * man * 0x1p-24;
    return sign * (1024.0 + man) * __builtin_ldexp(1.0, exp - 25);
}

// The tensor-core sum of c and products p[0..n) (each exact: 16-bit by 16-bit), modelled on the
// measurements of Fasi, Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor
// cores" (2021) for A100: blocks of 8 products are added to the running sum in one step; the
// terms are aligned to the largest, each truncated (toward zero) 3 bits below the f32
// significand of that one, summed exactly, and the result truncated to f32.
float truncating_sum(float c, const double* p, unsigned n) {
    constexpr unsigned kBlock = 8;
    constexpr int kKeep = 24 + 3;
    float acc = c;
    for (unsigned start = 0; start < n; start += kBlock) {
        double terms[kBlock + 1];
        unsigned count = 0;
        terms[count++] = acc;
        for (unsigned k = start; k < start + kBlock && k < n; ++k) terms[count++] = p[k];
        double big = 0;
        bool special = false;
        for (unsigned i = 0; i < count; ++i) {
            special = special || !__builtin_isfinite(terms[i]);
            big = std::max(big, std::fabs(terms[i]));
        }
        if (special || big == 0) {  // inf/NaN propagate as IEEE sums do; zeros stay exact
            double s = 0;
            for (unsigned i = 0; i < count; ++i) s += terms[i];
            acc = (float)s;
            continue;
        }
        const double quantum = std::ldexp(1.0, std::ilogb(big) - (kKeep - 1));
        double sum = 0;  // at most 9 terms of 27 bits on one grid: exact in f64
        for (unsigned i = 0; i < count; ++i) sum += std::trunc(terms[i] / quantum) * quantum;
        float r = (float)sum;  // round to nearest, then step toward zero if that went away from it
        if (std::fabs((double)r) > std::fabs(sum)) r = std::nextafter(r, 0.0f);
        acc = r;
    }
    return acc;
}

// D = A B + C for the m16n8k16 fragments of every lane: exact products, summed as the launch
// asks (hardware-like truncation, or exactly with one rounding to f32).
void complete_mma(Warp& w) {
    require_full_warp(w, kCollMma);
    const auto type = (MmaType)w.slot[0].mode;
    double a[16][16], b[16][8], c[16][8];
    for (unsigned l = 0; l < kWarpSize; ++l) {
        const std::uint32_t* in = w.slot[l].in;
        const unsigned g = l / 4, t = l % 4;
        auto lo = [&](std::uint32_t r) { return half_to_double(r & 0xffffu, type); };
        auto hi = [&](std::uint32_t r) { return half_to_double(r >> 16, type); };
        for (unsigned r = 0; r < 4; ++r) {  // a0: (g, 2t), a1: (g+8, 2t), a2: (g, 2t+8), a3: (g+8, 2t+8)
            const unsigned row = g + 8 * (r & 1u), col = 2 * t + 8 * (r >> 1);
            a[row][col] = lo(in[r]);
            a[row][col + 1] = hi(in[r]);
        }
        for (unsigned r = 0; r < 2; ++r) {  // b0: rows 2t, 2t+1 of column g; b1: rows 2t+8, 2t+9
            b[2 * t + 8 * r][g] = lo(in[4 + r]);
            b[2 * t + 8 * r + 1][g] = hi(in[4 + r]);
        }
        for (unsigned r = 0; r < 4; ++r) {  // c0, c1: row g; c2, c3: row g+8; columns 2t, 2t+1
            float v;
            std::memcpy(&v, &in[6 + r], 4);
            c[g + 8 * (r / 2)][2 * t + (r & 1u)] = v;
        }
    }
    for (unsigned l = 0; l < kWarpSize; ++l) {
        const unsigned g = l / 4, t = l % 4;
        for (unsigned r = 0; r < 4; ++r) {
            const unsigned row = g + 8 * (r / 2), col = 2 * t + (r & 1u);
            double p[16];
            for (unsigned k = 0; k < 16; ++k) p[k] = a[row][k] * b[k][col];
            float d;
            if (g_launch->mma == MmaMode::Truncating) {
                d = truncating_sum((float)c[row][col], p, 16);
            } else {
                double acc = c[row][col];
                for (unsigned k = 0; k < 16; ++k) acc += p[k];
                d = (float)acc;
            }
            std::memcpy(&w.slot[l].out[r], &d, 4);
        }
    }
}

void apply(const std::vector<Copy>& group) {
    for (const Copy& c : group) std::memcpy(c.dst, c.data, c.size);
}

}  // namespace

void complete_warp(Warp& w) {
    const std::uint32_t mask = w.arrived_mask;
    const LaneSlot& first = w.slot[__builtin_ctz(mask)];
    for (unsigned l = 0; l < kWarpSize; ++l) {
        if (!(mask >> l & 1u)) continue;
        if (w.slot[l].coll != first.coll || w.slot[l].mode != first.mode) {
            fail_current(ErrorKind::DivergentWarp,
                         "divergent warp collective in " + warp_name(w) + ": " +
                             describe_threads(w.first, w.first + w.lanes, &wait_text));
        }
    }
    if (first.coll == kCollLdmatrix) {
        complete_ldmatrix(w);
    } else if (first.coll == kCollMma) {
        complete_mma(w);
    } else {
        complete_exchange(w, (WarpOp)first.coll);
    }
    for (unsigned l = 0; l < kWarpSize; ++l) {
        if (!(mask >> l & 1u)) continue;
        g_fibers[w.first + l].wait = Wait::None;
        make_runnable(w.first + l);
    }
    w.arrived = 0;
    w.arrived_mask = 0;
}

std::uint64_t warp_exchange(WarpOp op, std::uint32_t mask, std::uint64_t value, int arg, int width, const char* file,
                            int line) {
    if (mask != 0xffffffffu)
        fail("%s at %s with mask 0x%08x: the host layer supports full-warp masks only",
             collective_name((std::uint32_t)op), site(file, line).c_str(), mask);
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail("shuffle at %s: width %d is not a power of two in 1..32", site(file, line).c_str(), width);
    LaneSlot& s = my_slot((std::uint32_t)op, (std::uint32_t)width);
    s.value = value;
    s.arg = arg;
    join((std::uint32_t)op, file, line);
    return s.result;
}

std::uint32_t active_mask() {
    const Fiber& f = current_fiber();
    const Warp& w = g_launch->warps[f.warp];
    std::uint32_t mask = 0;
    for (unsigned l = 0; l < w.lanes; ++l)
        if (g_fibers[w.first + l].wait != Wait::Exited) mask |= 1u << l;
    return mask;
}

void warp_ldmatrix(int num, bool trans, const void* row, std::uint32_t* out, const char* file, int line) {
    LaneSlot& s = my_slot(kCollLdmatrix, (std::uint32_t)(num * 2 + (trans ? 1 : 0)));
    s.addr = row;
    join(kCollLdmatrix, file, line);
    for (int m = 0; m < num; ++m) out[m] = s.out[m];
}

void warp_mma_m16n8k16(MmaType type, float* d, const std::uint32_t* a, const std::uint32_t* b, const float* c,
                       const char* file, int line) {
    LaneSlot& s = my_slot(kCollMma, (std::uint32_t)type);
    std::memcpy(s.in, a, 16);
    std::memcpy(s.in + 4, b, 8);
    std::memcpy(s.in + 6, c, 16);
    join(kCollMma, file, line);
    std::memcpy(d, s.out, 16);
}

void cp_async(void* dst, const void* src, int size, int src_size, const char* file, int line) {
    const std::string at = site(file, line);
    if (size != 4 && size != 8 && size != 16) fail("cp.async of %d bytes at %s (4, 8 or 16)", size, at.c_str());
    if (src_size < 0 || src_size > size)
        fail("cp.async at %s: source size %d outside 0..%d", at.c_str(), src_size, size);
    if (reinterpret_cast<std::uintptr_t>(dst) % (unsigned)size != 0 ||
        reinterpret_cast<std::uintptr_t>(src) % (unsigned)size != 0)
        fail("cp.async at %s: %p <- %p is not %d-byte aligned", at.c_str(), dst, src, size);
    if (!in_shared(dst, (std::size_t)size))
        fail("cp.async at %s: destination %p is not in shared memory", at.c_str(), dst);
    Copy c;
    c.dst = static_cast<unsigned char*>(dst);
    c.size = (std::uint32_t)size;
    std::memcpy(c.data, src, (std::size_t)src_size);  // an out-of-bounds source faults here, in this thread
    std::memset(c.data + src_size, 0, (std::size_t)(size - src_size));
    // Until the covering wait the destination holds neither old nor new data: poison it now, so
    // a copy issued into a buffer other threads still read (a missing barrier) shows.
    std::memset(dst, kPoison, (std::size_t)size);
    current_fiber().open.push_back(c);
}

void cp_async_commit() {
    Fiber& f = current_fiber();
    f.groups.push_back(f.open);
    f.open.clear();
}

void cp_async_wait(int pending) {
    Fiber& f = current_fiber();
    std::size_t done = 0;
    while (f.groups.size() - done > (std::size_t)pending) apply(f.groups[done++]);
    f.groups.erase(f.groups.begin(), f.groups.begin() + (std::ptrdiff_t)done);
}

void discard_copies(Fiber& f) {
    // Copies never waited for never land: relying on them is the bug this layer exists to show.
    f.open.clear();
    f.groups.clear();
}

}  // namespace mole_host
