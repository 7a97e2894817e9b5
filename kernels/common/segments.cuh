// Per-slot routing plans as the grouped kernels read them (src/plan.rs with slots = 1): offsets
// [E+1] and entries, each expert's segment padded to a multiple of the tile height, so that every
// tile of `bm` entries belongs to one expert. Shared by sgmv.cu and ffn.cu.
#pragma once
#include "arch.cuh"

#define MOLE_PLAN_PADDING 0xffffffffu

// A plan entry (Rust: plan::TokenSlot); only the token is read, the pass gives the slot.
struct mole_plan_entry {
    mole_u32 token;
    mole_u32 slot;
};
static_assert(sizeof(mole_plan_entry) == 8 && MOLE_OFFSET_OF(mole_plan_entry, slot) == 4, "TokenSlot");

// The entries of one tile: [begin, end) of `expert`'s segment; live = false past the plan's end.
struct mole_plan_tile {
    bool live;
    mole_u32 begin;   // first entry
    mole_u32 end;     // one past the expert's last entry (padding included)
    mole_u32 expert;  // e
};

// Tile `tile` of plan `offs` [experts + 1] with tiles of `bm` entries: its expert is the last e
// with offs[e] <= start (empty experts share their successor's offset and are skipped by taking
// the last).
MOLE_DEVICE mole_plan_tile mole_find_plan_tile(const mole_u32* __restrict__ offs, mole_u32 experts, mole_u32 tile,
                                               mole_u32 bm) {
    mole_plan_tile r = {false, 0u, 0u, 0u};
    const mole_u64 start = (mole_u64)tile * bm;
    if (start >= (mole_u64)offs[experts]) return r;
    mole_u32 lo = 0u, hi = experts;  // invariant: offs[lo] <= start < offs[hi]
    while (hi - lo > 1u) {
        const mole_u32 mid = lo + (hi - lo) / 2u;
        if ((mole_u64)offs[mid] <= start) lo = mid;
        else hi = mid;
    }
    r.live = true;
    r.begin = (mole_u32)start;
    r.end = offs[lo + 1u];
    r.expert = lo;
    return r;
}

// Loads the tile's `bm` tokens into `rows` (-1 for padding and for entries past the expert's end).
MOLE_DEVICE void mole_load_plan_rows(const mole_plan_tile& tile, const mole_plan_entry* __restrict__ entries,
                                     mole_u32 tokens, int bm, int* rows) {
    for (int i = (int)threadIdx.x; i < bm; i += (int)blockDim.x) {
        const mole_u32 e = tile.begin + (mole_u32)i;
        int t = -1;
        if (e < tile.end) {
            const mole_u32 tok = entries[e].token;
            if (tok != MOLE_PLAN_PADDING && tok < tokens) t = (int)tok;
        }
        rows[i] = t;
    }
}
