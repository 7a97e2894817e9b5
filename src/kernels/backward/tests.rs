use super::*;
use crate::cuda::sources;
use crate::kernels::{ffn, FfnConfig};
use crate::model::{AuxLosses, LayerParam, Method, MethodShape};
use std::mem::{offset_of, size_of};

fn backward_cu() -> &'static str {
    sources::source("backward.cu").expect("kernels/backward.cu is embedded")
}

#[test]
fn params_layout_matches_the_c_struct() {
    assert_eq!(size_of::<BackwardParams>(), 108);
    assert!(backward_cu().contains("sizeof(mole_backward_params) == 108"));
    for (name, off) in [
        ("tokens", offset_of!(BackwardParams, tokens)),
        ("rank", offset_of!(BackwardParams, rank)),
        ("bank_experts", offset_of!(BackwardParams, bank_experts)),
        ("mix", offset_of!(BackwardParams, mix)),
        ("rule", offset_of!(BackwardParams, rule)),
        ("softmax_kept", offset_of!(BackwardParams, softmax_kept)),
        ("entropy", offset_of!(BackwardParams, entropy)),
        ("chunks", offset_of!(BackwardParams, chunks)),
        ("scale", offset_of!(BackwardParams, scale)),
        ("entropy_scale", offset_of!(BackwardParams, entropy_scale)),
        ("inv_t", offset_of!(BackwardParams, inv_t)),
        ("entropy_coef", offset_of!(BackwardParams, entropy_coef)),
    ] {
        let line = format!("MOLE_OFFSET_OF(mole_backward_params, {name}) == {off}");
        assert!(backward_cu().contains(&line), "backward.cu lacks `{line}`");
    }
}

#[test]
fn defaults_and_codes_match_the_cu_file() {
    let cu = backward_cu();
    assert!(cu.contains(&format!("#define MOLE_BLOCK_THREADS {}\n", BackwardConfig::DEFAULT.block_threads)));
    for (name, v) in [
        ("MIX_EXPERT_SCALE", MixKind::ExpertScale as u32),
        ("MIX_CORE_MERGE", MixKind::CoreMerge as u32),
        ("ROUTER_NONE", RouterKind::None as u32),
        ("ROUTER_X", RouterKind::X as u32),
        ("ROUTER_H", RouterKind::H as u32),
        ("ROUTER_LOW_RANK", RouterKind::LowRank as u32),
        ("ROUTER_LOGITS", RouterKind::Logits as u32),
        ("BALANCE_SWITCH", BalanceKind::Switch as u32),
        ("BALANCE_DYNMOLE", BalanceKind::DynMole as u32),
        ("BALANCE_LLAVA_MOLE", BalanceKind::LlavaMole as u32),
    ] {
        assert!(cu.contains(&format!("#define MOLE_BW_{name} {v}u\n")), "{name} {v}");
    }
    // Every entry point is in the file, with the argument count its description says.
    for k in kernel::ALL {
        assert!(cu.contains(&format!("MOLE_ENTRY({})(const mole_backward_params p", k.name)), "{}", k.name);
        assert!(k.args.len() <= crate::kernels::exec::MAX_ARGS);
    }
    BackwardConfig::DEFAULT.validate().unwrap();
    let e = BackwardConfig { block_threads: 96, ..BackwardConfig::DEFAULT }.validate().unwrap_err().to_string();
    assert!(e.contains("power of two"), "{e}");
    assert!(BackwardConfig { stats_chunk_tokens: 0, ..BackwardConfig::DEFAULT }.validate().is_err());
}

fn shape() -> MethodShape {
    MethodShape { d_in: 10, d_out: 7, experts: 4, rank: 3, k: 2, alpha: 2.0 }
}

fn default_build() -> KernelBuild {
    build(DType::BF16, BackwardConfig::DEFAULT)
}

#[test]
fn buffer_lengths_follow_the_spec() {
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let p = plan(&default_build(), &spec, 5).unwrap();
    let (t, r, e) = (5, 12, 4);
    for (buf, len) in [
        (Buf::X, t * 10),
        (Buf::A, 10 * r),
        (Buf::B, r * 7),
        (Buf::Dy, t * 7),
        (Buf::RankOffsets, e + 1),
        (Buf::RouterWeight, 10 * e),
        (Buf::RouterBias, 0),
        (Buf::GateInput, 0),
        (Buf::Ids, t * 2),
        (Buf::RouteWeights, t * 2),
        (Buf::DX, t * 10),
        (Buf::DGateInput, 0),
        (Buf::BwH, t * r),
        (Buf::BwG, t * r),
        (Buf::BwDh, t * r),
        (Buf::BwHm, t * r),
        (Buf::BwDw, t * e),
        (Buf::BwW, t * e),
        (Buf::BwZ, t * e),
        (Buf::BwDz, t * e),
        (Buf::BwStatsPartials, 0),
        (Buf::BwStats, 0),
        (Buf::Cores, 0),
    ] {
        assert_eq!(p.lens.get(buf), len, "{buf:?}");
    }
    assert!(p.token.is_some() && p.scores.is_some() && p.gate.is_some() && p.dx.is_some() && p.stats.is_none());
    assert_eq!(p.params.router, RouterKind::X as u32);

    // CoMoL: cores, the h router [R, E] over the cores.
    let comol = Method::Comol.spec(shape()).unwrap();
    let p = plan(&default_build(), &comol, 3).unwrap();
    let (r, c) = (comol.total_rank(), comol.routed_experts());
    assert_eq!(p.lens.get(Buf::Cores), c * r * r);
    assert_eq!(p.params.mix, MixKind::CoreMerge as u32);
    assert_eq!(p.lens.get(Buf::BwDz), 3 * c);

    // Adapter ids: no gate stage, no scores.
    let serving = Method::AdapterServing.spec(shape()).unwrap();
    let p = plan(&default_build(), &serving, 3).unwrap();
    assert!(p.scores.is_none() && p.gate.is_none() && p.lens.get(Buf::BwDz) == 0 && p.lens.get(Buf::BwZ) == 0);
}

#[test]
fn a_load_balancing_loss_adds_the_statistics_stage() {
    let mut spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    spec.training.aux_losses = AuxLosses { load_balancing: 0.01, ..Default::default() };
    spec.training.frozen = vec![LayerParam::A];
    let config = BackwardConfig { stats_chunk_tokens: 4, ..BackwardConfig::DEFAULT };
    let p = plan(&build(DType::F32, config), &spec, 9).unwrap();
    assert_eq!(p.params.chunks, 3);
    assert_eq!(p.lens.get(Buf::BwStatsPartials), 3 * 4 * 4);
    assert_eq!(p.lens.get(Buf::BwStats), 16);
    let s = p.stats.unwrap();
    assert_eq!((s.partial.grid.0, s.sum.grid.0), (1, 1));
    assert!((p.params.lb_coef - 0.01).abs() < 1e-9 && (p.params.inv_t - 1.0 / 9.0).abs() < 1e-9);
}

#[test]
fn zero_tokens_launch_nothing() {
    let spec = Method::DynMole.spec(shape()).unwrap();
    let p = plan(&default_build(), &spec, 0).unwrap();
    assert!(p.token.is_none() && p.scores.is_none() && p.stats.is_none() && p.gate.is_none() && p.dx.is_none());
    assert_eq!(p.params.inv_t, 0.0);
}

#[test]
fn wrong_builds_and_inputs_are_named() {
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let other = ffn::build(DType::BF16, FfnConfig::DEFAULT);
    let e = plan(&other, &spec, 4).unwrap_err().to_string();
    assert!(e.contains("not a backward build"), "{e}");
    let e = plan(&default_build(), &spec, crate::limits::MAX_TOKENS + 1).unwrap_err().to_string();
    assert!(e.contains("tokens"), "{e}");
    let mut bad = spec.clone();
    bad.scale = f64::NAN;
    assert!(matches!(plan(&default_build(), &bad, 4), Err(MoleError::InvalidParameter { name: "scale", .. })));
}

#[test]
fn run_checks_the_build_and_the_bindings_before_any_launch() {
    use crate::kernels::exec::{Bindings, Recorder};
    let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
    let p = plan(&default_build(), &spec, 4).unwrap();
    let mut rec = Recorder::default();
    let other = build(DType::F16, BackwardConfig { stats_chunk_tokens: 8, ..BackwardConfig::DEFAULT });
    // SAFETY: nothing is launched (the recorder runs nothing, and the calls fail first).
    let e = unsafe { run(&other, &p, &Bindings::new(), &mut rec) }.unwrap_err().to_string();
    assert!(e.contains("not the build"), "{e}");
    // SAFETY: as above.
    let e = unsafe { run(&default_build(), &p, &Bindings::new(), &mut rec) }.unwrap_err();
    assert!(matches!(e, MoleError::MissingInput { .. }), "{e}");
    assert_eq!(rec.count, 0);
    let mut binds = Bindings::new();
    for (buf, len) in p.lens.taken() {
        binds.sized(buf, 0x1000 + buf as u64 * 0x10_0000, len);
    }
    // SAFETY: the recorder only keeps the launches.
    unsafe { run(&default_build(), &p, &binds, &mut rec) }.unwrap();
    let names: Vec<&str> = rec.launches.iter().map(|(_, l)| l.kernel().name).collect();
    assert_eq!(names, ["bw_token", "bw_scores", "bw_gate", "bw_dx"]);
}
