use super::*;
use crate::cuda::sources;
use crate::kernels::exec::{Bindings, Recorder};
use crate::kernels::Family;
use crate::model::Router;
use crate::plan::TokenSlot;
use std::mem::{offset_of, size_of};

fn routed(rule: RoutingRule) -> Gating {
    Gating::Routed { router: Router::Logits, rule }
}

fn topk(k: usize) -> Gating {
    routed(RoutingRule::SoftmaxTopK { k, temperature: 1.0, weights: TopKWeights::Renormalized })
}

/// gating.cu and the routing rules it includes (where the shared structs and enums live).
fn gating_cu() -> String {
    let file = |name| sources::source(name).unwrap_or_else(|| panic!("kernels/{name} is embedded"));
    format!("{}\n{}", file("gating.cu"), file("common/routing.cuh"))
}

/// Asserts that gating.cu checks `field` of `c_struct` at `offset`, so both sides agree.
fn assert_c_offset(c_struct: &str, field: &str, offset: usize) {
    let line = format!("MOLE_OFFSET_OF({c_struct}, {field}) == {offset}");
    assert!(gating_cu().contains(&line), "gating.cu lacks `{line}`");
}

#[test]
fn gating_params_layout_matches_the_c_struct() {
    assert_eq!(size_of::<GatingParams>(), 64);
    assert!(gating_cu().contains("sizeof(mole_gating_params) == 64"));
    let fields = [
        ("tokens", offset_of!(GatingParams, tokens)),
        ("experts", offset_of!(GatingParams, experts)),
        ("slots", offset_of!(GatingParams, slots)),
        ("k", offset_of!(GatingParams, k)),
        ("rule", offset_of!(GatingParams, rule)),
        ("weights", offset_of!(GatingParams, weights)),
        ("entropy", offset_of!(GatingParams, entropy)),
        ("use_bias", offset_of!(GatingParams, use_bias)),
        ("softmax_kept", offset_of!(GatingParams, softmax_kept)),
        ("temperature", offset_of!(GatingParams, temperature)),
        ("threshold", offset_of!(GatingParams, threshold)),
        ("q", offset_of!(GatingParams, q)),
        ("entropy_threshold", offset_of!(GatingParams, entropy_threshold)),
        ("entropy_scale", offset_of!(GatingParams, entropy_scale)),
        ("signed_select", offset_of!(GatingParams, signed_select)),
        ("entropy_eps", offset_of!(GatingParams, entropy_eps)),
    ];
    for (i, (name, off)) in fields.iter().enumerate() {
        assert_eq!(*off, 4 * i, "{name}");
        assert_c_offset("mole_gating_params", name, *off);
    }
}

#[test]
fn stats_and_plan_params_layout_match_the_c_structs() {
    assert_eq!(size_of::<StatsParams>(), 44);
    assert!(gating_cu().contains("sizeof(mole_stats_params) == 44"));
    let stats = [
        ("tokens", offset_of!(StatsParams, tokens)),
        ("experts", offset_of!(StatsParams, experts)),
        ("slots", offset_of!(StatsParams, slots)),
        ("chunk_tokens", offset_of!(StatsParams, chunk_tokens)),
        ("chunks", offset_of!(StatsParams, chunks)),
        ("has_probs", offset_of!(StatsParams, has_probs)),
        ("has_scores", offset_of!(StatsParams, has_scores)),
        ("entropy", offset_of!(StatsParams, entropy)),
        ("q", offset_of!(StatsParams, q)),
        ("entropy_scale", offset_of!(StatsParams, entropy_scale)),
        ("entropy_eps", offset_of!(StatsParams, entropy_eps)),
    ];
    for (i, (name, off)) in stats.iter().enumerate() {
        assert_eq!(*off, 4 * i, "{name}");
        assert_c_offset("mole_stats_params", name, *off);
    }
    assert_eq!(size_of::<PlanParams>(), 44);
    assert!(gating_cu().contains("sizeof(mole_plan_params) == 44"));
    let plan = [
        ("tokens", offset_of!(PlanParams, tokens)),
        ("slots", offset_of!(PlanParams, slots)),
        ("experts", offset_of!(PlanParams, experts)),
        ("block", offset_of!(PlanParams, block)),
        ("chunk_entries", offset_of!(PlanParams, chunk_entries)),
        ("chunks", offset_of!(PlanParams, chunks)),
        ("ids_stride", offset_of!(PlanParams, ids_stride)),
        ("column", offset_of!(PlanParams, column)),
        ("entry_stride", offset_of!(PlanParams, entry_stride)),
        ("expert_base", offset_of!(PlanParams, expert_base)),
        ("global_experts", offset_of!(PlanParams, global_experts)),
    ];
    for (i, (name, off)) in plan.iter().enumerate() {
        assert_eq!(*off, 4 * i, "{name}");
        assert_c_offset("mole_plan_params", name, *off);
    }
    assert_eq!((size_of::<TokenSlot>(), offset_of!(TokenSlot, slot)), (8, 4));
    assert!(gating_cu().contains("sizeof(mole_token_slot) == 8 && MOLE_OFFSET_OF(mole_token_slot, slot) == 4"));
}

#[test]
fn enums_match_the_c_enums() {
    let cu = gating_cu();
    let rules = [
        ("SOFTMAX_TOPK", RuleKind::SoftmaxTopK),
        ("TOP_P", RuleKind::TopP),
        ("DYNMOLE", RuleKind::DynMole),
        ("DENSE_SOFTMAX", RuleKind::DenseSoftmax),
        ("SIGMOID_TOPK", RuleKind::SigmoidTopK),
        ("MAGNITUDE_TOPK", RuleKind::MagnitudeTopK),
        ("GIVEN", RuleKind::Given),
        ("ADAPTER_IDS", RuleKind::AdapterIds),
    ];
    for (c, r) in rules {
        assert!(cu.contains(&format!("MOLE_RULE_{c} = {},", r as u32)), "{c}");
    }
    for (c, w) in
        [("SOFTMAX", WeightMode::Softmax), ("RENORMALIZED", WeightMode::Renormalized), ("UNIT", WeightMode::Unit)]
    {
        assert!(cu.contains(&format!("MOLE_WEIGHTS_{c} = {},", w as u32)), "{c}");
    }
    for (c, e) in [("NONE", EntropyKind::None), ("SHANNON", EntropyKind::Shannon), ("TSALLIS", EntropyKind::Tsallis)] {
        assert!(cu.contains(&format!("MOLE_ENTROPY_{c} = {},", e as u32)), "{c}");
    }
    assert!(cu.contains(&format!("#define MOLE_GATING_MAX_EXPERTS {MAX_EXPERTS}")));
    assert!(cu.contains(&format!("#define MOLE_GATING_MAX_K {MAX_K}")));
    assert!(cu.contains(&format!("#define MOLE_BLOCK_THREADS {DEFAULT_BLOCK_THREADS}")));
    for k in kernel::ALL {
        assert!(cu.contains(&format!("MOLE_ENTRY({})(", k.name)), "{}", k.name);
        assert_eq!(k.family, Family::Gating);
    }
}

#[test]
fn candidates_cover_every_dtype_and_block_size() {
    let c = candidates();
    assert_eq!(c.len(), DType::ALL.len() * BLOCK_THREADS_CANDIDATES.len());
    for d in DType::ALL {
        for t in BLOCK_THREADS_CANDIDATES {
            let b = c.iter().find(|b| b.dtype == d && b.block_threads() == t).expect("build");
            assert_eq!(b.family(), Family::Gating);
            assert_eq!(b.dynamic_shared_bytes(), (t / 32 * 4096) as u64);
            assert_eq!(b.entry_points().len(), kernel::ALL.len());
            assert!(b.entry_points().iter().all(|e| e.ends_with(&format!("_{}", d.name()))));
            b.validate().unwrap();
        }
    }
    let defaults = default_builds();
    assert_eq!(defaults, Family::Gating.default_builds());
    assert!(defaults.iter().all(|b| b.block_threads() == DEFAULT_BLOCK_THREADS));
    assert_eq!(kernel::GIVEN.entry_name(DType::BF16), "gating_given_bf16");
    assert_eq!(build(DType::F16, 64).kernels(), &kernel::ALL[..]);
}

#[test]
fn plan_grid_block_and_shared_memory() {
    let p = plan(&topk(2), 1000, 64, 128).unwrap();
    let l = p.launch.unwrap();
    assert_eq!((l.kernel, l.grid, l.block, l.shared_bytes), (&kernel::SOFTMAX_TOPK, 250, 128, 4 * 64 * 4));
    let want = BufLens::new()
        .with(Buf::GateInput, 64_000)
        .with(Buf::Ids, 2000)
        .with(Buf::RouteWeights, 2000)
        .with(Buf::Probs, 64_000);
    assert_eq!((p.lens, p.block_threads), (want, 128));
    assert_eq!((p.params.tokens, p.params.experts, p.params.slots, p.params.k), (1000, 64, 2, 2));
    assert_eq!(p.params.rule, RuleKind::SoftmaxTopK as u32);
    assert_eq!(p.params.weights, WeightMode::Renormalized as u32);
    assert!(p.writes_probs && !p.uses_bias && p.input == InputKind::Scores);
    // Grid-stride loops: the grid is capped, never zero.
    assert_eq!(plan(&topk(2), 1, 8, 32).unwrap().launch.unwrap().grid, 1);
    assert_eq!(plan(&topk(2), u32::MAX as usize, 8, 32).unwrap().launch.unwrap().grid, 1 << 16);
    // Adapter ids: a thread per token, no shared memory.
    let a = plan(&Gating::AdapterIds, 1000, 4, 256).unwrap();
    let l = a.launch.unwrap();
    assert_eq!((l.kernel, l.grid, l.shared_bytes, a.slots), (&kernel::ADAPTER_IDS, 4, 0, 1));
    assert!(!a.writes_probs && a.input == InputKind::AdapterIds);
    let want = BufLens::new().with(Buf::AdapterIds, 1000).with(Buf::Ids, 1000).with(Buf::RouteWeights, 1000);
    assert_eq!(a.lens, want);
    let sig = plan(&routed(RoutingRule::SigmoidTopK { k: 2, bias: true }), 10, 8, 128).unwrap();
    assert_eq!((sig.lens.get(Buf::SelectionBias), sig.lens.get(Buf::Probs)), (8, 80));
    // Dynamic rules fill E slots from the prefix kernel.
    let d = plan(&routed(RoutingRule::TopP { p: 0.5, temperature: 2.0 }), 10, 1024, 256).unwrap();
    assert_eq!((d.kernel, d.slots, d.params.temperature), (&kernel::SOFTMAX_PREFIX, 1024, 2.0));
    assert_eq!(d.launch.unwrap().shared_bytes, 8 * 1024 * 4);
}

#[test]
fn zero_tokens_launch_nothing() {
    for g in [topk(1), Gating::AdapterIds, Gating::Given { top_k: None, softmax_topk: false }] {
        let p = plan(&g, 0, 4, 128).unwrap();
        assert!(p.launch.is_none(), "{g:?}");
    }
    let s = plan_stats(0, 4, 2, true, true, Some(Entropy::SHANNON), 128).unwrap();
    assert!(s.partial.is_none() && s.params.chunks == 0 && s.finalize.grid == 1);
    let g = plan_grouping(0, 2, 0..4, 4, 8, 128).unwrap();
    assert!(g.count.is_none() && g.scatter.is_none() && g.lens.get(Buf::PlanEntries) == 0 && g.scan.grid == 1);
}

#[test]
fn plan_rejects_out_of_limit_inputs() {
    let param = |r: Result<RoutePlan>| matches!(r, Err(MoleError::InvalidParameter { .. }));
    assert!(plan(&topk(2), 10, MAX_EXPERTS, 128).is_ok());
    assert!(param(plan(&topk(2), 10, MAX_EXPERTS + 1, 128)));
    assert!(matches!(plan(&topk(1), 10, 0, 128), Err(MoleError::ZeroDimension { .. })));
    assert!(plan(&topk(MAX_K), 10, 16, 128).is_ok());
    assert!(param(plan(&topk(MAX_K + 1), 10, 16, 128)));
    assert!(matches!(plan(&topk(5), 10, 4, 128), Err(MoleError::InvalidK { k: 5, experts: 4 })));
    assert!(param(plan(&routed(RoutingRule::SigmoidTopK { k: 9, bias: true }), 1, 16, 128)));
    assert!(param(plan(
        &routed(RoutingRule::MagnitudeTopK { k: 9, bias: false, selection: RankSelection::Magnitude }),
        1,
        16,
        128
    )));
    assert!(param(plan(&Gating::Given { top_k: Some(9), softmax_topk: true }, 1, 16, 128)));
    // keep_top_k is a position threshold, not a pick count: up to E is fine.
    let dm = |k| {
        routed(RoutingRule::DynMole { q: 1.5, top_p: 0.5, keep_top_k: k, entropy_threshold: 0.9, entropy_eps: 0.0 })
    };
    assert!(plan(&dm(16), 1, 16, 128).is_ok());
    // A temperature that is positive in f64 but zero in f32.
    let tiny = routed(RoutingRule::SoftmaxTopK { k: 1, temperature: 1e-60, weights: TopKWeights::Unit });
    assert!(param(plan(&tiny, 1, 4, 128)));
    for threads in [0, 16, 48, 2048] {
        assert!(param(plan(&topk(1), 1, 4, threads)), "{threads}");
    }
    assert!(param(plan(&topk(1), u32::MAX as usize + 1, 4, 128)));
}

#[test]
fn dynmole_entropy_parameters() {
    let dm =
        |q| routed(RoutingRule::DynMole { q, top_p: 0.75, keep_top_k: 2, entropy_threshold: 0.9, entropy_eps: 0.0 });
    let p = plan(&dm(1.0), 5, 8, 128).unwrap().params;
    assert_eq!((p.entropy, p.k, p.threshold, p.temperature), (EntropyKind::Shannon as u32, 2, 0.75, 1.0));
    assert!((p.entropy_scale as f64 - 1.0 / 8f64.ln()).abs() < 1e-7);
    let p = plan(&dm(2.0), 5, 8, 128).unwrap().params;
    assert_eq!(p.entropy, EntropyKind::Tsallis as u32);
    assert!((p.entropy_scale as f64 - 1.0 / (1.0 - 8f64.powf(-1.0))).abs() < 1e-6);
    assert_eq!(EntropyKind::for_q(1.0 + 1e-13), EntropyKind::Shannon);
    assert_eq!(EntropyKind::for_q(1.0 + 1e-9), EntropyKind::Tsallis);
    assert_eq!(EntropyKind::Shannon.scale(1.0, 1), 0.0);
    // Near q = 1 the Tsallis normaliser approaches the Shannon one (expm1 keeps it accurate).
    let near = EntropyKind::Tsallis.scale(1.0 + 1e-9, 8) as f64 * 1e-9;
    assert!((near - 1.0 / 8f64.ln()).abs() < 1e-6, "{near}");
}

#[test]
fn stats_plan_chunks_and_decode() {
    let s = plan_stats(100_000, 16, 2, true, true, Some(Entropy::SHANNON), 128).unwrap();
    assert!(s.params.chunks as u64 <= MAX_CHUNKS && s.params.chunks * s.params.chunk_tokens >= 100_000);
    assert_eq!(s.workspace_words, s.params.chunks as usize * 66);
    let want = BufLens::new()
        .with(Buf::Ids, 200_000)
        .with(Buf::Probs, 1_600_000)
        .with(Buf::GateInput, 1_600_000)
        .with(Buf::StatsWorkspace, s.workspace_words)
        .with(Buf::StatsOut, 66);
    assert_eq!(s.lens(), want);
    assert_eq!(s.partial.unwrap().grid, s.params.chunks.div_ceil(4));
    assert_eq!(s.params.entropy, EntropyKind::Shannon as u32);
    let small = plan_stats(10, 4, 1, false, true, Some(Entropy::SHANNON), 64).unwrap();
    assert_eq!((small.params.chunk_tokens, small.params.chunks, small.params.entropy), (32, 1, 0));
    let out: Vec<f32> = (0..18).map(|i| i as f32).collect();
    let r = small.decode(&out).unwrap();
    assert_eq!(r.selected_fraction, vec![0.0, 1.0, 2.0, 3.0]);
    assert_eq!(r.top1_fraction, vec![4.0, 5.0, 6.0, 7.0]);
    assert_eq!((r.mean_prob, r.masked_mean_prob, r.z_loss, r.entropy), (None, None, Some(16.0), Some(17.0)));
    assert!(small.decode(&out[..17]).is_err());
    let with_probs = plan_stats(10, 4, 1, true, true, Some(Entropy::SHANNON), 64).unwrap();
    let r = with_probs.decode(&out).unwrap();
    assert_eq!(r.mean_prob, Some(vec![8.0, 9.0, 10.0, 11.0]));
    assert_eq!(r.masked_mean_prob, Some(vec![12.0, 13.0, 14.0, 15.0]));
    // The reference layer's choices per rule.
    let sig = StatsPlan::for_gating(&routed(RoutingRule::SigmoidTopK { k: 2, bias: false }), 3, 4, 128).unwrap();
    assert!(sig.params.has_probs == 1 && sig.params.has_scores == 1 && sig.entropy.is_none());
    let mag = StatsPlan::for_gating(
        &routed(RoutingRule::MagnitudeTopK { k: 2, bias: false, selection: RankSelection::Magnitude }),
        3,
        4,
        128,
    )
    .unwrap();
    assert!(mag.params.has_probs == 0 && mag.params.has_scores == 0);
    let given = StatsPlan::for_gating(&Gating::Given { top_k: None, softmax_topk: false }, 3, 4, 128).unwrap();
    assert!(given.params.has_probs == 1 && given.params.has_scores == 0 && given.params.slots == 4);
}

#[test]
fn grouping_plan_bounds() {
    let g = plan_grouping(1000, 2, 0..8, 8, 16, 128).unwrap();
    assert_eq!((g.params.chunk_entries, g.params.chunks), (1024, 2));
    let want = BufLens::new()
        .with(Buf::Ids, 2000)
        .with(Buf::PlanWorkspace, 2 * 9)
        .with(Buf::PlanCounts, 8)
        .with(Buf::PlanOffsets, 9)
        .with(Buf::PlanEntries, 2000 + 8 * 15)
        .with(Buf::PlanStatus, 1);
    assert_eq!(g.lens, want);
    assert_eq!(g.count.unwrap().shared_bytes, 4 * 8 * 4);
    assert_eq!(g.scan.shared_bytes, 128);
    let big = plan_grouping(10_000_000, 8, 0..64, 64, 1, 256).unwrap();
    assert!(big.params.chunks as u64 <= MAX_CHUNKS && big.params.chunk_entries.is_multiple_of(32));
    assert!(big.params.chunks as u64 * big.params.chunk_entries as u64 >= 80_000_000);
    assert!(plan_grouping(1, 1, 0..4, 4, 0, 128).is_err());
    assert!(plan_grouping(1 << 30, 8, 0..4, 4, 1, 128).is_err());
}

#[test]
fn grouping_plan_over_an_expert_window() {
    // A shard of experts 8..11 of 16: the plan is sized by the window, ids keep their global
    // numbering in `ids` and the kernels get the base and the layer's expert count.
    let g = plan_grouping(1000, 2, 8..11, 16, 16, 128).unwrap();
    assert_eq!((g.params.experts, g.params.expert_base, g.params.global_experts), (3, 8, 16));
    assert_eq!((g.lens.get(Buf::PlanCounts), g.lens.get(Buf::PlanOffsets)), (3, 4));
    assert_eq!(g.lens.get(Buf::PlanEntries), 2000 + 3 * 15);
    assert_eq!(g.count.unwrap().shared_bytes, 4 * 3 * 4);
    let whole = plan_grouping(1000, 2, 0..8, 8, 16, 128).unwrap();
    assert_eq!((whole.params.expert_base, whole.params.global_experts), (0, 8));
    let param = |r: Result<GroupingPlan>| matches!(r, Err(MoleError::InvalidParameter { .. }));
    assert!(matches!(plan_grouping(10, 2, 5..5, 16, 4, 128), Err(MoleError::ZeroDimension { .. })));
    assert!(param(plan_grouping(10, 2, 14..17, 16, 4, 128)));
    assert!(param(plan_grouping(10, 2, 0..2, 1 << 31, 4, 128)));
    assert!(param(plan_grouping(10, 2, 0..MAX_EXPERTS + 1, 4096, 4, 128)));
    assert!(plan_grouping(10, 2, 3000..3000 + MAX_EXPERTS, 4096, 4, 128).is_ok());
}

/// Every buffer of `lens` bound at a distinct fake address with its exact length.
pub(super) fn bound(lens: &BufLens) -> Bindings {
    let mut b = Bindings::new();
    for (buf, n) in lens.taken() {
        b.sized(buf, 0x1000 * (buf as u64 + 1), n);
    }
    b
}

/// The launches `run` hands to a recorder (which dereferences no pointer), or its error.
pub(super) fn record(run: impl FnOnce(&mut Recorder) -> Result<()>) -> Result<Vec<crate::kernels::exec::Launch>> {
    let mut r = Recorder::default();
    run(&mut r)?;
    Ok(r.launches.into_iter().map(|(_, l)| l).collect())
}

fn route_with(b: &KernelBuild, p: &RoutePlan, binds: &Bindings) -> Result<Vec<crate::kernels::exec::Launch>> {
    // SAFETY: the recorder keeps the launches without touching the fake addresses.
    record(|r| unsafe { run_route(b, p, binds, r) })
}

#[test]
fn route_arguments_are_validated() {
    let b = build(DType::F16, 64);
    let p = plan(&topk(2), 10, 8, 64).unwrap();
    let ok = bound(&p.lens);
    let launches = route_with(&b, &p, &ok).unwrap();
    assert_eq!(launches.len(), 1);
    // The pointers go in the kernel's order; the absent bias is null.
    let addr = |buf: Buf| ok.ptr(buf);
    let want = [addr(Buf::GateInput), 0, addr(Buf::Ids), addr(Buf::RouteWeights), addr(Buf::Probs)];
    assert_eq!(launches[0].ptrs(), want);
    assert_eq!(launches[0].params(), bytemuck::bytes_of(&p.params));
    // Probabilities are optional: passed as null when not bound.
    let mut no_probs = ok;
    no_probs.raw(Buf::Probs, 0);
    assert_eq!(route_with(&b, &p, &no_probs).unwrap()[0].ptrs()[4], 0);
    let shape = |buf: Buf, n: usize| {
        let mut bad = ok;
        bad.sized(buf, ok.ptr(buf), n);
        matches!(route_with(&b, &p, &bad), Err(MoleError::ShapeMismatch { .. }))
    };
    assert!(shape(Buf::GateInput, 79));
    assert!(shape(Buf::Ids, 21));
    assert!(shape(Buf::RouteWeights, 10));
    assert!(shape(Buf::Probs, 1));
    let mut missing = ok;
    missing.raw(Buf::Ids, 0);
    assert_eq!(
        route_with(&b, &p, &missing).unwrap_err(),
        MoleError::MissingInput { name: "ids", needed_by: "the routing kernel" }
    );
    // The plan suits any dtype's build of its block size (the typed calls check the elements);
    // not another family or block size.
    assert!(route_with(&build(DType::F32, 64), &p, &ok).is_ok());
    let other = crate::kernels::sgmv::build(DType::F16, crate::kernels::SgmvConfig::DEFAULT);
    assert!(route_with(&other, &p, &ok).is_err());
    assert!(route_with(&build(DType::F16, 128), &p, &ok).is_err());
    // Bias presence follows the rule; magnitude top-k has no probabilities.
    let sig = plan(&routed(RoutingRule::SigmoidTopK { k: 2, bias: true }), 10, 8, 64).unwrap();
    assert!(matches!(route_with(&b, &sig, &ok), Err(MoleError::MissingInput { name: "selection_bias", .. })));
    let with_bias = bound(&sig.lens);
    assert_eq!(route_with(&b, &sig, &with_bias).unwrap()[0].ptrs()[1], with_bias.ptr(Buf::SelectionBias));
    assert!(matches!(route_with(&b, &p, &with_bias), Err(MoleError::UnexpectedInput { name: "selection_bias", .. })));
    let mag = routed(RoutingRule::MagnitudeTopK { k: 2, bias: false, selection: RankSelection::Magnitude });
    let mag = plan(&mag, 10, 8, 64).unwrap();
    assert!(matches!(route_with(&b, &mag, &ok), Err(MoleError::UnexpectedInput { name: "probs", .. })));
    assert_eq!(route_with(&b, &mag, &no_probs).unwrap()[0].ptrs()[4], 0);
    let a = plan(&Gating::AdapterIds, 10, 8, 64).unwrap();
    assert!(matches!(route_with(&b, &a, &no_probs), Err(MoleError::MissingInput { name: "adapter_ids", .. })));
    let l = route_with(&b, &a, &bound(&a.lens)).unwrap();
    assert_eq!(l[0].kernel(), &kernel::ADAPTER_IDS);
    // Zero tokens: checked, nothing launched.
    let none = plan(&topk(2), 0, 8, 64).unwrap();
    assert!(route_with(&b, &none, &Bindings::new()).unwrap().is_empty());
    // A build with a bad block size is a typed error, not a panic.
    assert!(route_with(&build(DType::F16, 100), &p, &ok).is_err());
}

#[test]
fn stats_and_group_arguments_are_validated() {
    let b = build(DType::F32, 128);
    let s = plan_stats(10, 4, 2, true, false, Some(Entropy::SHANNON), 128).unwrap();
    // SAFETY: the recorder keeps the launches without touching the fake addresses.
    let stats = |binds: &Bindings, b: &KernelBuild| record(|r| unsafe { run_stats(b, &s, binds, r) });
    let ok = bound(&s.lens());
    let l = stats(&ok, &b).unwrap();
    assert_eq!((l.len(), l[0].kernel(), l[1].kernel()), (2, &kernel::STATS_PARTIAL, &kernel::STATS_FINALIZE));
    assert_eq!(l[0].ptrs(), [ok.ptr(Buf::Ids), ok.ptr(Buf::Probs), 0, ok.ptr(Buf::StatsWorkspace)]);
    assert_eq!(l[1].ptrs(), [ok.ptr(Buf::StatsWorkspace), ok.ptr(Buf::StatsOut)]);
    let with = |buf: Buf, ptr: u64, n: usize| {
        let mut x = ok;
        x.sized(buf, ptr, n);
        stats(&x, &b)
    };
    assert!(matches!(with(Buf::Probs, 0, 40), Err(MoleError::MissingInput { name: "probs", .. })));
    assert!(matches!(with(Buf::GateInput, 0x99, 40), Err(MoleError::UnexpectedInput { name: "gate_input", .. })));
    assert!(matches!(with(Buf::StatsWorkspace, 0x99, 0), Err(MoleError::ShapeMismatch { .. })));
    assert!(with(Buf::StatsWorkspace, 0x99, s.workspace_words + 5).is_ok());
    assert!(matches!(with(Buf::StatsOut, 0x99, 17), Err(MoleError::ShapeMismatch { .. })));
    assert!(stats(&ok, &build(DType::F32, 64)).is_err());
    // No slot to read the top-1 expert from, and an eps the reference would refuse.
    assert!(matches!(plan_stats(10, 4, 0, true, false, None, 128), Err(MoleError::ZeroDimension { name: "slots" })));
    for eps in [f64::NAN, -1e-5, 1.0] {
        let h = Some(Entropy { q: 1.5, eps });
        assert!(plan_stats(10, 4, 2, true, false, h, 128).is_err(), "eps {eps}");
    }
    let g = plan_grouping(10, 2, 0..4, 4, 4, 128).unwrap();
    // SAFETY: as above.
    let group = |binds: &Bindings| record(|r| unsafe { run_group(&b, &g, binds, r) });
    let ok = bound(&g.lens);
    let l = group(&ok).unwrap();
    let kernels: Vec<_> = l.iter().map(|l| l.kernel().name).collect();
    assert_eq!(kernels, ["gating_plan_count", "gating_plan_scan", "gating_plan_scatter"]);
    let scan = [Buf::PlanWorkspace, Buf::PlanCounts, Buf::PlanOffsets, Buf::PlanEntries, Buf::PlanStatus];
    assert_eq!(l[1].ptrs(), scan.map(|buf| ok.ptr(buf)));
    let with = |buf: Buf, n: usize| {
        let mut x = ok;
        x.sized(buf, ok.ptr(buf), n);
        group(&x)
    };
    assert!(with(Buf::Ids, 19).is_err());
    assert!(with(Buf::PlanWorkspace, 0).is_err());
    let entries = g.lens.get(Buf::PlanEntries);
    assert!(with(Buf::PlanEntries, entries - 1).is_err());
    assert!(with(Buf::PlanEntries, entries + 3).is_ok());
    assert!(with(Buf::PlanOffsets, 4).is_err());
}

#[test]
fn thresholds_just_below_one_stay_below_one_in_f32() {
    // f32 would round 1 - 1e-9 up to 1.0, which the kernels read as "every expert".
    assert_eq!((1.0f64 - 1e-9) as f32, 1.0);
    assert!(threshold_f32(1.0 - 1e-9) < 1.0);
    assert_eq!(threshold_f32(1.0), 1.0);
    assert_eq!(threshold_f32(2.5), 2.5);
    assert_eq!(threshold_f32(0.75), 0.75);
}
