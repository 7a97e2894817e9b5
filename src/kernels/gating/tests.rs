use super::launch::{check_group, check_route, check_stats, RouteLens, StatsLens};
use super::*;
use crate::cuda::sources;
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
    assert_eq!(size_of::<PlanParams>(), 36);
    assert!(gating_cu().contains("sizeof(mole_plan_params) == 36"));
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
    for e in entry::ALL {
        assert!(cu.contains(&format!("MOLE_ENTRY({e})(")), "{e}");
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
            assert_eq!(b.entry_points().len(), entry::ALL.len());
            assert!(b.entry_points().iter().all(|e| e.ends_with(&format!("_{}", d.name()))));
            b.validate().unwrap();
        }
    }
    let defaults = default_builds();
    assert_eq!(defaults, Family::Gating.default_builds());
    assert!(defaults.iter().all(|b| b.block_threads() == DEFAULT_BLOCK_THREADS));
    assert_eq!(entry_name(entry::GIVEN, DType::BF16), "gating_given_bf16");
}

#[test]
fn plan_grid_block_and_shared_memory() {
    let p = plan(&topk(2), 1000, 64, 128).unwrap();
    let l = p.launch.unwrap();
    assert_eq!((l.entry, l.grid, l.block, l.shared_bytes), (entry::SOFTMAX_TOPK, 250, 128, 4 * 64 * 4));
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
    assert_eq!((l.entry, l.grid, l.shared_bytes, a.slots), (entry::ADAPTER_IDS, 4, 0, 1));
    assert!(!a.writes_probs && a.input == InputKind::AdapterIds);
    // Dynamic rules fill E slots from the prefix kernel.
    let d = plan(&routed(RoutingRule::TopP { p: 0.5, temperature: 2.0 }), 10, 1024, 256).unwrap();
    assert_eq!((d.entry, d.slots, d.params.temperature), (entry::SOFTMAX_PREFIX, 1024, 2.0));
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
    let g = plan_grouping(0, 2, 4, 8, 128).unwrap();
    assert!(g.count.is_none() && g.scatter.is_none() && g.max_entries == 0 && g.scan.grid == 1);
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
    let g = plan_grouping(1000, 2, 8, 16, 128).unwrap();
    assert_eq!((g.params.chunk_entries, g.params.chunks), (1024, 2));
    assert_eq!(g.max_entries, 2000 + 8 * 15);
    assert_eq!(g.workspace_words, 2 * 9);
    assert_eq!(g.count.unwrap().shared_bytes, 4 * 8 * 4);
    assert_eq!(g.scan.shared_bytes, 128);
    let big = plan_grouping(10_000_000, 8, 64, 1, 256).unwrap();
    assert!(big.params.chunks as u64 <= MAX_CHUNKS && big.params.chunk_entries.is_multiple_of(32));
    assert!(big.params.chunks as u64 * big.params.chunk_entries as u64 >= 80_000_000);
    assert!(plan_grouping(1, 1, 4, 0, 128).is_err());
    assert!(plan_grouping(1 << 30, 8, 4, 1, 128).is_err());
}

fn lens(input: InputKind, t: usize, e: usize, slots: usize) -> RouteLens {
    let input_len = if input == InputKind::AdapterIds { t } else { t * e };
    RouteLens { input, input_len, bias_len: None, ids_len: t * slots, weights_len: t * slots, probs_len: Some(t * e) }
}

#[test]
fn route_arguments_are_validated() {
    let b = build(DType::F16, 64);
    let g = topk(2);
    let ok = lens(InputKind::Scores, 10, 8, 2);
    assert!(check_route(&b, DType::F16, &g, 10, 8, ok).is_ok());
    assert!(check_route(&b, DType::F16, &g, 10, 8, RouteLens { probs_len: None, ..ok }).is_ok());
    let shape = |l| matches!(check_route(&b, DType::F16, &g, 10, 8, l), Err(MoleError::ShapeMismatch { .. }));
    assert!(shape(RouteLens { input_len: 79, ..ok }));
    assert!(shape(RouteLens { ids_len: 21, ..ok }));
    assert!(shape(RouteLens { weights_len: 10, ..ok }));
    assert!(shape(RouteLens { probs_len: Some(1), ..ok }));
    // Wrong dtype, family or input kind.
    assert!(matches!(check_route(&b, DType::F32, &g, 10, 8, ok), Err(MoleError::InvalidParameter { .. })));
    let other = crate::kernels::sgmv::build(DType::F16, crate::kernels::SgmvConfig::DEFAULT);
    assert!(check_route(&other, DType::F16, &g, 10, 8, ok).is_err());
    let w = lens(InputKind::Weights, 10, 8, 2);
    assert!(matches!(check_route(&b, DType::F16, &g, 10, 8, w), Err(MoleError::Unsupported(_))));
    // Bias presence follows the rule; magnitude top-k has no probabilities.
    let sig = routed(RoutingRule::SigmoidTopK { k: 2, bias: true });
    assert!(matches!(check_route(&b, DType::F16, &sig, 10, 8, ok), Err(MoleError::MissingInput { .. })));
    assert!(check_route(&b, DType::F16, &sig, 10, 8, RouteLens { bias_len: Some(8), ..ok }).is_ok());
    assert!(check_route(&b, DType::F16, &g, 10, 8, RouteLens { bias_len: Some(8), ..ok }).is_err());
    let mag = routed(RoutingRule::MagnitudeTopK { k: 2, bias: false, selection: RankSelection::Magnitude });
    assert!(matches!(check_route(&b, DType::F16, &mag, 10, 8, ok), Err(MoleError::UnexpectedInput { .. })));
    let a = lens(InputKind::AdapterIds, 10, 8, 1);
    assert!(check_route(&b, DType::F16, &Gating::AdapterIds, 10, 8, RouteLens { probs_len: None, ..a }).is_ok());
    // A build with a bad block size is a typed error, not a panic.
    let bad = build(DType::F16, 100);
    assert!(matches!(check_route(&bad, DType::F16, &g, 10, 8, ok), Err(MoleError::InvalidParameter { .. })));
}

#[test]
fn stats_and_group_arguments_are_validated() {
    let b = build(DType::F32, 128);
    let s = plan_stats(10, 4, 2, true, false, Some(Entropy::SHANNON), 128).unwrap();
    let ok = StatsLens { ids: 20, probs: Some(40), scores: None, workspace: s.workspace_words, out: 18 };
    assert!(check_stats(&b, DType::F32, &s, ok).is_ok());
    assert!(matches!(
        check_stats(&b, DType::F32, &s, StatsLens { probs: None, ..ok }),
        Err(MoleError::MissingInput { .. })
    ));
    assert!(check_stats(&b, DType::F32, &s, StatsLens { scores: Some(40), ..ok }).is_err());
    assert!(check_stats(&b, DType::F32, &s, StatsLens { workspace: 0, ..ok }).is_err());
    assert!(check_stats(&b, DType::F32, &s, StatsLens { out: 17, ..ok }).is_err());
    assert!(check_stats(&build(DType::F32, 64), DType::F32, &s, ok).is_err());
    // No slot to read the top-1 expert from, and an eps the reference would refuse.
    assert!(matches!(plan_stats(10, 4, 0, true, false, None, 128), Err(MoleError::ZeroDimension { name: "slots" })));
    for eps in [f64::NAN, -1e-5, 1.0] {
        let h = Some(Entropy { q: 1.5, eps });
        assert!(plan_stats(10, 4, 2, true, false, h, 128).is_err(), "eps {eps}");
    }
    let g = plan_grouping(10, 2, 4, 4, 128).unwrap();
    let outs = [4, 5, g.max_entries, 1];
    assert!(check_group(&b, &g, 20, g.workspace_words, outs).is_ok());
    assert!(check_group(&b, &g, 19, g.workspace_words, outs).is_err());
    assert!(check_group(&b, &g, 20, 0, outs).is_err());
    assert!(check_group(&b, &g, 20, g.workspace_words, [4, 5, g.max_entries - 1, 1]).is_err());
    assert!(check_group(&b, &g, 20, g.workspace_words, [4, 4, g.max_entries, 1]).is_err());
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
