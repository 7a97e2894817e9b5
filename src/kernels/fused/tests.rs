use super::*;
use crate::cuda::sources;
use crate::kernels::exec::{Bindings, Recorder};
use crate::model::{Method, MethodShape};
use std::mem::{offset_of, size_of};

fn fused_cu() -> &'static str {
    sources::source("fused.cu").expect("kernels/fused.cu is embedded")
}

fn shape() -> MethodShape {
    MethodShape { d_in: 4096, d_out: 4096, experts: 8, rank: 16, k: 2, alpha: 32.0 }
}

fn default_build() -> KernelBuild {
    build(DType::BF16, FusedConfig::DEFAULT)
}

#[test]
fn params_layout_matches_the_c_struct() {
    assert_eq!(size_of::<FusedParams>(), 148);
    assert!(fused_cu().contains("sizeof(mole_fused_params) == 148"));
    let fields = [
        ("d_in", offset_of!(FusedParams, d_in)),
        ("d_out", offset_of!(FusedParams, d_out)),
        ("rank", offset_of!(FusedParams, rank)),
        ("cols", offset_of!(FusedParams, cols)),
        ("shrink_cols", offset_of!(FusedParams, shrink_cols)),
        ("router", offset_of!(FusedParams, router)),
        ("mix", offset_of!(FusedParams, mix)),
        ("use_router_bias", offset_of!(FusedParams, use_router_bias)),
        ("expand", offset_of!(FusedParams, expand)),
        ("splits", offset_of!(FusedParams, splits)),
        ("k_per_split", offset_of!(FusedParams, k_per_split)),
        ("n_per_block", offset_of!(FusedParams, n_per_block)),
        ("stats", offset_of!(FusedParams, stats)),
        ("stats_probs", offset_of!(FusedParams, stats_probs)),
        ("stats_scores", offset_of!(FusedParams, stats_scores)),
        ("stats_entropy", offset_of!(FusedParams, stats_entropy)),
        ("stats_q", offset_of!(FusedParams, stats_q)),
        ("stats_entropy_scale", offset_of!(FusedParams, stats_entropy_scale)),
        ("scale", offset_of!(FusedParams, scale)),
        ("tiles", offset_of!(FusedParams, tiles)),
        ("stats_entropy_eps", offset_of!(FusedParams, stats_entropy_eps)),
    ];
    for (i, (name, off)) in fields.iter().enumerate() {
        assert_eq!(*off, 64 + 4 * i, "{name}");
        let line = format!("MOLE_OFFSET_OF(mole_fused_params, {name}) == {off}");
        assert!(fused_cu().contains(&line), "fused.cu lacks `{line}`");
    }
}

#[test]
fn enums_and_defaults_match_the_cu_file() {
    let cu = fused_cu();
    for (c, v) in [
        ("NONE", RouterKind::None),
        ("X", RouterKind::X),
        ("H", RouterKind::H),
        ("LOW_RANK", RouterKind::LowRank),
        ("LOGITS", RouterKind::Logits),
    ] {
        assert!(cu.contains(&format!("MOLE_ROUTER_{c} = {},", v as u32)), "{c}");
    }
    for (c, v) in [("EXPERT_SCALE", MixKind::ExpertScale), ("CORE_MERGE", MixKind::CoreMerge)] {
        assert!(cu.contains(&format!("MOLE_MIX_{c} = {},", v as u32)), "{c}");
    }
    let d = FusedConfig::DEFAULT;
    for (name, v) in crate::kernels::BuildConfig::Fused(d).defines() {
        assert!(cu.contains(&format!("#define {name} {v}\n")), "{name}");
    }
    for k in kernel::ALL {
        assert!(cu.contains(&format!("MOLE_ENTRY({})(", k.name)), "{}", k.name);
        assert_eq!(k.params_type, "mole_fused_params");
    }
    assert_eq!(kernel::for_config(DType::F32, d), &kernel::ALL[..3]);
    assert_eq!(kernel::for_config(DType::BF16, d), &kernel::ALL);
    for c in CONFIG_CANDIDATES {
        for dtype in DType::ALL {
            assert_eq!(build(dtype, c).kernels(), kernel::for_config(dtype, c), "{dtype} {c:?}");
        }
    }
    assert!(!FusedConfig { bt: 8, block_threads: 128, ..d }.has_tensor_cores(DType::F16));
}

#[test]
fn configs_validate_and_round_trip_through_builds() {
    for c in CONFIG_CANDIDATES {
        c.validate().unwrap();
        assert_eq!(FusedConfig::of(&build(DType::F16, c)).unwrap(), c);
    }
    let bad = [
        FusedConfig { bt: 12, ..FusedConfig::DEFAULT },
        FusedConfig { block_threads: 48, ..FusedConfig::DEFAULT },
        FusedConfig { kc: 0, ..FusedConfig::DEFAULT },
        FusedConfig { max_cols: 40, ..FusedConfig::DEFAULT },
    ];
    for c in bad {
        assert!(c.validate().is_err(), "{c:?}");
    }
    let sgmv = crate::kernels::sgmv::default_builds().remove(0);
    assert!(FusedConfig::of(&sgmv).is_err());
}

#[test]
fn mixlora_plan_has_one_launch_and_exact_lengths() {
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let outputs = FusedOutputs { routing: true, probs: true, stats: true };
    let p = plan(&default_build(), &spec, 1000, FusedVariant::Single, outputs).unwrap();
    assert_eq!(p.launches.len(), 1);
    let l = p.launches[0];
    assert_eq!((l.kernel, l.grid, l.block), (&kernel::LAYER_MMA, (63, 1), 256));
    // Common: hz 16 x 136, rows 8 x 8, probs 16 x 8, ids/w 2 x 16 x 2, z-loss/entropy 2 x 16 words
    // (9856 bytes); then x stages 2 x 16 x 40, W 32 x 152, hi and lo 16 x 136 each (2 bytes), chunk
    // scales 16 x 8 (4 bytes), two B stages 16 x 136 (2 bytes).
    assert_eq!(l.shared_bytes, 9856 + 2560 + 9728 + 4352 + 4352 + 512 + 2 * 4352);
    let fma = p.clone().without_tensor_cores();
    let l = fma.launches[0];
    assert_eq!((l.kernel, l.grid), (&kernel::LAYER, (63, 1)));
    // FMA: hz 16 x 136, x 16 x 32, W 32 x 136 and the same routing regions.
    let words = 16 * 136 + 16 * 32 + 32 * 136 + 8 * 8 + 16 * 8 + 2 * 16 * 2 + 2 * 16;
    assert_eq!(l.shared_bytes, 4 * words);
    // f32 builds and odd widths have no tensor-core launch.
    let f32_build = build(DType::F32, FusedConfig::DEFAULT);
    assert!(!plan(&f32_build, &spec, 1000, FusedVariant::Single, outputs).unwrap().uses_tensor_cores());
    let odd = Method::MixLoraPerLinear.spec(MethodShape { d_in: 4095, ..shape() }).unwrap();
    assert!(!plan(&default_build(), &odd, 1000, FusedVariant::Single, outputs).unwrap().uses_tensor_cores());
    assert_eq!((p.params.rank, p.params.cols, p.params.shrink_cols), (128, 136, 136));
    assert_eq!(p.params.router, RouterKind::X as u32);
    let lens = |bufs: &[Buf]| bufs.iter().map(|&b| p.lens.get(b)).collect::<Vec<_>>();
    assert_eq!(lens(&[Buf::X, Buf::A, Buf::B, Buf::Y]), [1000 * 4096, 4096 * 128, 128 * 4096, 1000 * 4096]);
    assert_eq!(lens(&[Buf::RouterWeight, Buf::RouterBias, Buf::GateInput]), [4096 * 8, 0, 0]);
    assert_eq!(
        lens(&[Buf::Ids, Buf::RouteWeights, Buf::Probs, Buf::RankOffsets, Buf::Cores]),
        [2000, 2000, 8000, 9, 0]
    );
    assert_eq!(lens(&[Buf::StatsWorkspace, Buf::StatsOut, Buf::Partials]), [63 * 34, 34, 0]);
    let stats = p.stats.unwrap();
    assert_eq!(
        (stats.params.chunks, stats.params.chunk_tokens, stats.entropy),
        (63, 16, Some(crate::model::Entropy::SHANNON))
    );
}

#[test]
fn split_plan_lowers_splits_and_sizes_the_workspace() {
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let variant = FusedVariant::Split { splits: 8, n_per_block: 512 };
    let p = plan(&default_build(), &spec, 3, variant, FusedOutputs::default()).unwrap();
    assert_eq!(p.launches.len(), 2);
    assert_eq!((p.launches[0].kernel, p.launches[0].grid), (&kernel::SPLIT_SHRINK, (1, 8)));
    assert_eq!((p.launches[1].kernel, p.launches[1].grid), (&kernel::SPLIT_EXPAND, (1, 8)));
    assert_eq!((p.params.splits, p.params.k_per_split), (8, 512));
    assert_eq!(p.lens.get(Buf::Partials), 8 * 3 * 136);
    // d_in = 100 in 8 slices of whole 32-wide chunks: 4 slices of 32 (the last partial).
    let small = Method::MixLoraPerLinear.spec(MethodShape { d_in: 100, ..shape() }).unwrap();
    let p = plan(&default_build(), &small, 3, variant, FusedOutputs::default()).unwrap();
    assert_eq!((p.params.splits, p.params.k_per_split), (4, 32));
    let v = FusedVariant::split_for(FusedConfig::DEFAULT, 1, 4096, 4096, 132);
    let FusedVariant::Split { splits, n_per_block } = v else { panic!("{v:?}") };
    assert!(splits > 1 && n_per_block % 32 == 0 && n_per_block < 4096, "{v:?}");
}

#[test]
fn every_method_plans_and_needs_exactly_its_tensors() {
    for m in Method::ALL {
        let rank = if m.single_rank_experts() { 1 } else { 16 };
        let experts = if m.single_rank_experts() { 64 } else { 8 };
        let spec = m.spec(MethodShape { rank, experts, ..shape() }).unwrap();
        let p = plan(&default_build(), &spec, 10, FusedVariant::Single, FusedOutputs::default())
            .unwrap_or_else(|e| panic!("{m}: {e}"));
        let l = |b| p.lens.get(b);
        let e = spec.routed_experts();
        assert_eq!(l(Buf::GateInput) > 0, matches!(m, Method::XLora), "{m}");
        assert_eq!(l(Buf::AdapterIds) > 0, m == Method::AdapterServing, "{m}");
        assert_eq!(l(Buf::Cores), if m == Method::Comol { 8 * 16 * 16 } else { 0 }, "{m}");
        let selection_bias = matches!(m, Method::Smora | Method::FlyLora | Method::FlyLoraPeft);
        assert_eq!(l(Buf::SelectionBias), if selection_bias { e } else { 0 }, "{m}");
        let router_bias = matches!(m, Method::LlavaMoleSparse | Method::LlavaMoleDense);
        assert_eq!(l(Buf::RouterBias), if router_bias { e } else { 0 }, "{m}");
        let router_rows = match m {
            Method::Comol => 16,
            Method::XLora | Method::AdapterServing | Method::FlyLora | Method::FlyLoraPeft => 0,
            _ => 4096,
        };
        assert_eq!(l(Buf::RouterWeight), router_rows * e, "{m}");
    }
}

#[test]
fn plans_reject_what_the_kernels_cannot_take() {
    let wide = Method::MixLoraPerLinear.spec(MethodShape { experts: 64, rank: 16, ..shape() }).unwrap();
    let err = plan(&default_build(), &wide, 10, FusedVariant::Single, FusedOutputs::default()).unwrap_err();
    assert!(err.to_string().contains("grouped path"), "{err}");
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let bad = FusedVariant::Split { splits: 0, n_per_block: 64 };
    assert!(plan(&default_build(), &spec, 10, bad, FusedOutputs::default()).is_err());
    let sgmv = crate::kernels::sgmv::default_builds().remove(0);
    assert!(plan(&sgmv, &spec, 10, FusedVariant::Single, FusedOutputs::default()).is_err());
    let comol = Method::Comol.spec(shape()).unwrap();
    assert!(plan_route_only(&default_build(), &comol, 10, FusedOutputs::default()).is_err());
    // Zero tokens: nothing to launch, but statistics still come out (as zeros).
    let p = plan(&default_build(), &spec, 0, FusedVariant::Single, FusedOutputs { stats: true, ..Default::default() })
        .unwrap();
    assert!(p.launches.is_empty() && p.stats.is_some());
}

#[test]
fn route_only_plans_skip_the_bank() {
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let p = plan_route_only(&default_build(), &spec, 100, FusedOutputs::default()).unwrap();
    assert_eq!((p.params.rank, p.params.cols, p.params.shrink_cols, p.params.expand), (0, 8, 8, 0));
    let lens = |bufs: &[Buf]| bufs.iter().map(|&b| p.lens.get(b)).collect::<Vec<_>>();
    assert_eq!(lens(&[Buf::A, Buf::B, Buf::Y, Buf::RankOffsets, Buf::Ids, Buf::RouteWeights]), [0, 0, 0, 0, 200, 200]);
    let xlora = Method::XLora.spec(shape()).unwrap();
    let p = plan_route_only(&default_build(), &xlora, 100, FusedOutputs::default()).unwrap();
    assert_eq!((p.params.shrink_cols, p.lens.get(Buf::X), p.lens.get(Buf::GateInput)), (0, 0, 800));
}

/// Binds every buffer `plan` takes at distinct 16-byte-aligned fake addresses (`0x1000 · (buf + 1)`).
fn bind_all(plan: &FusedPlan) -> Bindings {
    let mut b = Bindings::new();
    for (buf, len) in plan.lens.taken() {
        b.sized(buf, 0x1000 * (buf as u64 + 1), len);
    }
    b
}

fn record(build: &KernelBuild, plan: &FusedPlan, bindings: &Bindings) -> Result<Recorder> {
    let mut rec = Recorder::default();
    // SAFETY: the recorder keeps the launches and dereferences nothing.
    unsafe { run(build, plan, bindings, &mut rec) }?;
    Ok(rec)
}

#[test]
fn run_packs_the_plans_launches_then_the_statistics_sum() {
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let outputs = FusedOutputs { routing: true, probs: true, stats: true };
    let p = plan(&default_build(), &spec, 40, FusedVariant::Single, outputs).unwrap();
    let b = bind_all(&p);
    let rec = record(&default_build(), &p, &b).unwrap();
    let kernels: Vec<&str> = rec.launches.iter().map(|(_, l)| l.kernel().name).collect();
    assert_eq!(kernels, ["fused_layer_mma", "gating_stats_finalize"]);
    let (gating_build, finalize) = &rec.launches[1];
    assert_eq!(*gating_build, stats_build(DType::BF16).unwrap());
    assert_eq!(finalize.ptrs(), [b.ptr(Buf::StatsWorkspace), b.ptr(Buf::StatsOut)]);
    // x, a, b, y, then the gate tensors: an x router without bias, no logits, adapters,
    // selection bias or cores (null), then the routing outputs and the statistics rows.
    let l = &rec.launches[0].1;
    let at = |buf: Buf| b.ptr(buf);
    assert_eq!(
        l.ptrs(),
        [
            at(Buf::X),
            at(Buf::A),
            at(Buf::B),
            at(Buf::Y),
            at(Buf::RouterWeight),
            0,
            0,
            0,
            0,
            at(Buf::RankOffsets),
            0,
            0,
            at(Buf::Ids),
            at(Buf::RouteWeights),
            at(Buf::Probs),
            at(Buf::StatsWorkspace)
        ]
    );
    assert_eq!(l.params(), bytemuck::bytes_of(&p.params));
    // A buffer the plan does not take is passed as null even when bound.
    let mut extra = b;
    extra.sized(Buf::Cores, 0x50_0000, 3);
    assert_eq!(record(&default_build(), &p, &extra).unwrap().launches[0].1.ptrs()[11], 0);
    // Per-expert scales: after `rank_offsets` in every expanding launch (single and split).
    let scaled = LayerSpec { expert_scales: Some(vec![0.5; 8]), ..spec };
    for variant in [FusedVariant::Single, FusedVariant::Split { splits: 2, n_per_block: 512 }] {
        let p = plan(&default_build(), &scaled, 40, variant, outputs).unwrap();
        assert_eq!(p.lens.get(Buf::ExpertScales), 8);
        let b = bind_all(&p);
        let rec = record(&default_build(), &p, &b).unwrap();
        let expand = &rec.launches[rec.launches.len() - 2].1;
        let (ro, es) = match variant {
            FusedVariant::Single => (9, 10),
            _ => (8, 9),
        };
        assert_eq!(&expand.ptrs()[ro..=es], [b.ptr(Buf::RankOffsets), b.ptr(Buf::ExpertScales)], "{variant:?}");
        let mut missing = b;
        missing.raw(Buf::ExpertScales, 0);
        let err = record(&default_build(), &p, &missing).unwrap_err();
        assert!(matches!(err, MoleError::MissingInput { name: "expert_scales", .. }), "{err}");
    }
}

#[test]
fn run_falls_back_to_fma_for_unaligned_views_and_checks_before_launching() {
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let p = plan(&default_build(), &spec, 40, FusedVariant::Single, FusedOutputs::default()).unwrap();
    assert!(p.uses_tensor_cores());
    for buf in [Buf::X, Buf::B] {
        let mut b = bind_all(&p);
        b.sized(buf, b.ptr(buf) + 2, p.lens.get(buf));
        let rec = record(&default_build(), &p, &b).unwrap();
        assert_eq!(rec.launches.len(), 1);
        assert!(std::ptr::eq(rec.launches[0].1.kernel(), &kernel::LAYER), "{buf:?}");
    }
    // Missing or mis-sized buffers, and another build, fail before anything is launched.
    let mut b = bind_all(&p);
    b.raw(Buf::RankOffsets, 0);
    assert!(matches!(record(&default_build(), &p, &b), Err(MoleError::MissingInput { name: "rank_offsets", .. })));
    let mut b = bind_all(&p);
    b.sized(Buf::Y, b.ptr(Buf::Y), p.lens.get(Buf::Y) - 1);
    assert!(matches!(record(&default_build(), &p, &b), Err(MoleError::ShapeMismatch { what: "y", .. })));
    let other = build(DType::BF16, CONFIG_CANDIDATES[1]);
    assert!(record(&other, &p, &bind_all(&p)).is_err());
    // Zero tokens: only the statistics' sum, with no workspace (it writes zeros).
    let stats = FusedOutputs { stats: true, ..FusedOutputs::default() };
    let p = plan(&default_build(), &spec, 0, FusedVariant::Single, stats).unwrap();
    let rec = record(&default_build(), &p, &bind_all(&p)).unwrap();
    assert_eq!(rec.launches.len(), 1);
    assert_eq!(rec.launches[0].1.ptrs(), [0, 0x1000 * (Buf::StatsOut as u64 + 1)]);
}
