//! Shared by the fuzz suites (`tests/fuzz_*.rs`): a bound on every allocation, the case count,
//! and small layers to mutate.
//!
//! `cargo test` runs each suite with a case count that keeps it within seconds; a longer run is
//! `PROPTEST_CASES=20000 cargo test --release --test 'fuzz_*'` (the variable sets every suite's
//! count).

#![allow(dead_code)]

use mole::model::{LayerSpec, Method, MethodShape};
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a fuzzed input may cause. The library refuses inputs that need
/// more than [`MEMORY_LIMIT`] in all; anything above this bound got past its checks.
pub const MAX_ALLOCATION: usize = 256 << 20;

/// The host memory the library is told it may use while fuzzing.
pub const MEMORY_LIMIT: u64 = 64 << 20;

/// The system allocator, refusing any single request over [`MAX_ALLOCATION`]: the process then
/// aborts with "memory allocation of N bytes failed", which fails the suite.
pub struct Bounded;

// SAFETY: every call is forwarded unchanged to the system allocator, except requests over the
// bound, which return null (a documented allocation failure).
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded; `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The proptest configuration: `default_cases` unless `PROPTEST_CASES` says otherwise, and the
/// library's host memory capped at [`MEMORY_LIMIT`].
pub fn config(default_cases: u32) -> Config {
    mole::limits::set_host_memory_limit(Some(MEMORY_LIMIT));
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// A small valid layer of any preset, some with per-expert scales.
pub fn small_spec() -> impl Strategy<Value = LayerSpec> {
    let scales = prop::option::of(prop::collection::vec(-3.0f64..3.0, 5));
    (0..Method::ALL.len(), 1usize..6, 1usize..6, 1usize..5, 1usize..4, 1usize..4, scales).prop_filter_map(
        "a valid preset shape",
        |(m, d_in, d_out, experts, rank, k, scales)| {
            let method = Method::ALL[m];
            let rank = if method.single_rank_experts() { 1 } else { rank };
            let mut spec =
                method.spec(MethodShape { d_in, d_out, experts, rank, k: k.min(experts), alpha: 2.0 }).ok()?;
            // Per-expert scales on some specs, one per bank expert.
            spec.expert_scales = scales.map(|s| s[..spec.ranks.num_experts()].to_vec());
            Some(spec)
        },
    )
}

/// The umask of this process (from `/proc/self/status`), where the system says.
pub fn umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
}
