//! Host cost of one layer forward, the launches themselves replaced by a no-op: what a decode
//! step pays on the CPU per layer before the GPU does anything.
//!
//! - `runtime/*`: the layer runtime's path — the memoised plan for the token count, binding the
//!   caller's tensors, the rank offsets and the workspace regions, checking them against the
//!   plan, packing every launch (parameters and pointers in the described order) and handing it
//!   to the backend (here a counting recorder).
//! - `before/*`: the per-forward host work of the launch path the runtime replaced, driver calls
//!   excluded: for every launch, the build validated, the module cache key (NVRTC options, NVRTC
//!   version, JSON, hash) and the entry-point name rebuilt, as the per-launch function lookup
//!   did. Needs NVRTC; skipped without it.
//!
//! Run: `cargo bench --bench host_cost` (no GPU needed).

use criterion::{criterion_group, criterion_main, Criterion};
use mole::cuda::{Arch, CacheKey};
use mole::kernels::exec::{Bindings, Buf, Recorder};
use mole::model::{LayerSpec, Method, MethodShape};
use mole::runtime::{default_build, Choice, ChoiceSource};
use mole::runtime::{LayerPlanner, CALLER_BUFS};
use mole::tune::Strategy;
use mole::DType;
use std::hint::black_box;

fn spec() -> LayerSpec {
    Method::MixLoraPerLinear
        .spec(MethodShape { d_in: 4096, d_out: 4096, experts: 8, rank: 16, k: 2, alpha: 32.0 })
        .unwrap()
}

/// Caller tensors at made-up, 256-byte aligned addresses (nothing is dereferenced).
fn caller_bindings() -> Bindings {
    let mut b = Bindings::new();
    for (i, buf) in CALLER_BUFS.into_iter().enumerate() {
        b.raw(buf, 0x7f00_0000_0000 + (i as u64) * 0x1000_0000);
    }
    b.raw(Buf::RankOffsets, 0x7e00_0000_0000);
    b
}

fn bench(c: &mut Criterion) {
    let spec = spec();
    let cases: [(&str, usize, Option<Strategy>); 3] =
        [("fused_split_t1", 1, None), ("fused_t4096", 4096, None), ("grouped_t1", 1, Some(Strategy::Grouped))];
    for (name, tokens, forced) in cases {
        let mut planner = LayerPlanner::new(&spec, DType::BF16, 132, None).unwrap();
        if let Some(strategy) = forced {
            let build = default_build(strategy, DType::BF16);
            planner = planner.with_choice(Choice { strategy, build, source: ChoiceSource::Heuristic });
        }
        let plan = planner.plan(tokens).unwrap();
        let launches = {
            let mut rec = Recorder::default();
            let mut b = caller_bindings();
            plan.bind_workspace(&mut b, 0x7d00_0000_0000).unwrap();
            // SAFETY: the recorder dereferences nothing.
            unsafe { planner.launch(&plan, &b, &mut rec) }.unwrap();
            rec.launches
        };
        println!("{name}: {} launches ({})", launches.len(), plan.choice.strategy);
        let base = caller_bindings();
        c.bench_function(&format!("runtime/{name}"), |bench| {
            bench.iter(|| {
                let plan = planner.plan(black_box(tokens)).unwrap();
                let mut b = base;
                plan.bind_workspace(&mut b, 0x7d00_0000_0000).unwrap();
                let mut rec = Recorder { count_only: true, ..Recorder::default() };
                // SAFETY: the recorder dereferences nothing.
                unsafe { planner.launch(&plan, &b, &mut rec) }.unwrap();
                black_box(rec.count)
            })
        });
        if mole::cuda::nvrtc_present() {
            c.bench_function(&format!("before/{name}"), |bench| {
                bench.iter(|| {
                    let mut n = 0;
                    for (build, launch) in &launches {
                        let key = CacheKey::for_cubin(&build.unit().unwrap(), Arch::Sm90).unwrap();
                        n ^= key.hash() as usize ^ launch.kernel().entry_name(build.dtype).len();
                    }
                    black_box(n)
                })
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
