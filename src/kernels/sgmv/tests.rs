use super::*;
use crate::cuda::sources;
use std::mem::{offset_of, size_of};

fn sgmv_cu() -> &'static str {
    sources::source("sgmv.cu").expect("kernels/sgmv.cu is embedded")
}

#[test]
fn params_layout_matches_the_c_struct() {
    assert_eq!(size_of::<SgmvParams>(), 48);
    assert!(sgmv_cu().contains("sizeof(mole_sgmv_params) == 48"));
    let fields = [
        ("tokens", offset_of!(SgmvParams, tokens)),
        ("slots", offset_of!(SgmvParams, slots)),
        ("experts", offset_of!(SgmvParams, experts)),
        ("d_in", offset_of!(SgmvParams, d_in)),
        ("d_out", offset_of!(SgmvParams, d_out)),
        ("r_total", offset_of!(SgmvParams, r_total)),
        ("r_max", offset_of!(SgmvParams, r_max)),
        ("splits", offset_of!(SgmvParams, splits)),
        ("k_per_split", offset_of!(SgmvParams, k_per_split)),
        ("entry_stride", offset_of!(SgmvParams, entry_stride)),
        ("slot", offset_of!(SgmvParams, slot)),
        ("scale", offset_of!(SgmvParams, scale)),
    ];
    for (field, offset) in fields {
        let line = format!("MOLE_OFFSET_OF(mole_sgmv_params, {field}) == {offset}");
        assert!(sgmv_cu().contains(&line), "sgmv.cu lacks `{line}`");
    }
    assert_eq!(size_of::<TokenSlot>(), 8);
}

#[test]
fn defaults_match_the_cu_file() {
    for (name, v) in BuildConfig::Sgmv(SgmvConfig::DEFAULT).defines() {
        let line = format!("#define {name} {v}");
        assert!(sgmv_cu().contains(&line), "sgmv.cu lacks `{line}`");
    }
    for b in candidates() {
        let c = SgmvConfig::of(&b).unwrap();
        assert!(CONFIG_CANDIDATES.contains(&c), "{b}");
        assert_eq!(build(b.dtype, c), b);
        b.validate().unwrap();
    }
    assert_eq!(default_builds().len(), 3);
    // Both pipeline depths are compiled by the candidates.
    assert!(CONFIG_CANDIDATES.iter().any(|c| c.stages == 1) && CONFIG_CANDIDATES.iter().any(|c| c.stages == 2));
    // Another family's build has no sgmv configuration.
    assert!(SgmvConfig::of(&crate::kernels::gating::build(DType::F32, 128)).is_err());
}

fn shape(tokens: usize, slots: usize, d_in: usize, d_out: usize) -> SgmvShape {
    SgmvShape { tokens, slots, d_in, d_out, scale: 2.0, expert_scales: false }
}

#[test]
fn plan_computes_grids_splits_and_lengths() {
    let b = build(DType::BF16, SgmvConfig::DEFAULT);
    let offs = [0u32, 4, 4, 12];
    let p = plan(&b, shape(10, 2, 70, 33), &offs, 96).unwrap();
    // 70 = 5 chunks of 16, at most 2 splits: 48 + 22.
    assert_eq!((p.params.splits, p.params.k_per_split), (2, 48));
    assert_eq!(p.params.r_max, 8);
    assert_eq!(p.params.r_total, 12);
    assert_eq!(p.shrink.unwrap().grid, (3, 2, 2));
    assert_eq!(p.expand.unwrap().grid, (3, 2, 1));
    assert_eq!(p.lens.get(Buf::Partials), 2 * 10 * 2 * 8);
    assert_eq!(p.lens.get(Buf::PlanOffsets), 2 * 4);
    assert_eq!(p.lens.get(Buf::PlanEntries), 2 * 96);
    assert_eq!(p.lens.get(Buf::ExpertScales), 0);
    let scaled = plan(&b, SgmvShape { expert_scales: true, ..shape(10, 2, 70, 33) }, &offs, 96).unwrap();
    assert_eq!(scaled.lens.get(Buf::ExpertScales), 3);
    assert_eq!(scaled.lens, p.lens.with(Buf::ExpertScales, 3));
    assert_eq!(p.expand_params(1).slot, 1);
    // 16-bit builds shrink on tensor cores when d_in is a multiple of 8.
    assert_eq!(p.shrink.unwrap().kernel.name, kernel::SHRINK.name);
    assert_eq!(plan(&b, shape(10, 2, 64, 33), &offs, 96).unwrap().shrink.unwrap().kernel.name, kernel::SHRINK_MMA.name);
    let f32_build = build(DType::F32, SgmvConfig::DEFAULT);
    assert_eq!(
        plan(&f32_build, shape(10, 2, 64, 33), &offs, 96).unwrap().shrink.unwrap().kernel.name,
        kernel::SHRINK.name
    );
    // 16-bit builds expand on tensor cores when d_out is a multiple of 8 (mma_bn columns a block).
    assert_eq!(p.expand.unwrap().kernel.name, kernel::EXPAND.name);
    let e = plan(&b, shape(10, 2, 70, 40), &offs, 96).unwrap().expand.unwrap();
    assert_eq!((e.kernel.name, e.grid), (kernel::EXPAND_MMA.name, (3, 2, 1)));
    let f16_build = build(DType::F16, SgmvConfig::DEFAULT);
    assert_eq!(
        plan(&f16_build, shape(10, 2, 70, 8), &offs, 96).unwrap().expand.unwrap().kernel.name,
        kernel::EXPAND_MMA.name
    );
    assert_eq!(
        plan(&f32_build, shape(10, 2, 70, 40), &offs, 96).unwrap().expand.unwrap().kernel.name,
        kernel::EXPAND.name
    );
    let wide = build(DType::BF16, CONFIG_CANDIDATES[3]);
    assert_eq!(CONFIG_CANDIDATES[3].mma_bn(), 64);
    let e = plan(&wide, shape(10, 2, 70, 136), &offs, 96).unwrap().expand.unwrap();
    assert_eq!((e.kernel.name, e.grid), (kernel::EXPAND_MMA.name, (6, 3, 1)));
    assert_eq!(expand_launch(CONFIG_CANDIDATES[3], 6, 136, false).grid, (6, 3, 1));
    assert_eq!(CONFIG_CANDIDATES.map(|c| c.mma_bn()), [32, 32, 32, 64]);
    // Short d_in: one split.
    let p = plan(&b, shape(10, 1, 5, 8), &offs, 32).unwrap();
    assert_eq!((p.params.splits, p.params.k_per_split), (1, 16));
    // No work: zero tokens, all ranks zero.
    assert!(plan(&b, shape(0, 1, 5, 8), &offs, 0).unwrap().shrink.is_none());
    assert!(plan(&b, shape(3, 1, 5, 8), &[0, 0, 0], 64).unwrap().expand.is_none());
}

#[test]
fn plan_rejects_bad_arguments() {
    let b = build(DType::F32, SgmvConfig::DEFAULT);
    let ok = [0u32, 4, 8];
    assert!(plan(&b, shape(4, 1, 8, 8), &ok, 64).is_ok());
    let bad: Vec<Result<SgmvPlan>> = vec![
        plan(&b, shape(4, 1, 8, 8), &[0], 64),
        plan(&b, shape(4, 1, 8, 8), &[1, 4], 64),
        plan(&b, shape(4, 1, 8, 8), &[0, 4, 3], 64),
        plan(&b, shape(4, 1, 8, 8), &[0, 257], 64),
        plan(&b, shape(4, 1, 8, 8), &vec![0u32; MAX_EXPERTS + 2], 64),
        plan(&b, shape(4, 0, 8, 8), &ok, 64),
        plan(&b, shape(4, MAX_SLOTS + 1, 8, 8), &ok, 64),
        plan(&b, shape(4, 1, 0, 8), &ok, 64),
        plan(&b, shape(4, 1, 8, 0), &ok, 64),
        plan(&b, SgmvShape { scale: f32::NAN, ..shape(4, 1, 8, 8) }, &ok, 64),
        plan(&b, shape(1 << 31, 1, 8, 8), &ok, 64),
        plan(&b, shape(4, 1, 1 << 32, 8), &ok, 64),
        plan(&b, shape(4, 1, 8, 32 * 65_536), &ok, 64),
        plan(&b, shape(4, 1, 8, 8), &ok, 1 << 32),
        plan(&crate::kernels::gating::default_builds()[0], shape(4, 1, 8, 8), &ok, 64),
        plan(&build(DType::F32, SgmvConfig { bm: 3, ..SgmvConfig::DEFAULT }), shape(4, 1, 8, 8), &ok, 64),
        plan(&build(DType::F32, SgmvConfig { stages: 3, ..SgmvConfig::DEFAULT }), shape(4, 1, 8, 8), &ok, 64),
        plan(&build(DType::F32, SgmvConfig { stages: 0, ..SgmvConfig::DEFAULT }), shape(4, 1, 8, 8), &ok, 64),
        // A tiling valid for f32 but not for the tensor-core shrink of a 16-bit build.
        plan(
            &build(DType::BF16, SgmvConfig { block_threads: 64, bm: 8, ..SgmvConfig::DEFAULT }),
            shape(4, 1, 8, 8),
            &ok,
            64,
        ),
    ];
    for (i, r) in bad.into_iter().enumerate() {
        assert!(r.is_err(), "case {i} should fail");
    }
}

/// The shrink, then one expand per slot, each with its pointers in the described order: the
/// expands take `expert_scales` after `rank_offsets` when the plan has them, null otherwise.
#[test]
fn run_packs_the_shrink_then_one_expand_per_slot() {
    use crate::kernels::exec::{Bindings, Recorder};
    let b = build(DType::BF16, SgmvConfig::DEFAULT);
    let offs = [0u32, 4, 4, 12];
    for expert_scales in [false, true] {
        let p = plan(&b, SgmvShape { expert_scales, ..shape(10, 2, 64, 40) }, &offs, 96).unwrap();
        let mut binds = Bindings::new();
        for buf in Buf::ALL {
            binds.raw(buf, 0x1000 * (buf as u64 + 1));
        }
        let mut rec = Recorder::default();
        // SAFETY: the recorder keeps the launches and dereferences nothing.
        unsafe { run(&b, &p, &binds, &mut rec) }.unwrap();
        let at = |buf: Buf| binds.ptr(buf);
        let names: Vec<&str> = rec.launches.iter().map(|(_, l)| l.kernel().name).collect();
        assert_eq!(names, ["sgmv_shrink_mma", "sgmv_expand_mma", "sgmv_expand_mma"]);
        let shrink = [Buf::X, Buf::A, Buf::RankOffsets, Buf::PlanOffsets, Buf::PlanEntries, Buf::Partials];
        assert_eq!(rec.launches[0].1.ptrs(), shrink.map(at));
        let scales = if expert_scales { at(Buf::ExpertScales) } else { 0 };
        for (slot, (_, l)) in rec.launches[1..].iter().enumerate() {
            let want = [
                at(Buf::Partials),
                at(Buf::B),
                at(Buf::RankOffsets),
                scales,
                at(Buf::PlanOffsets),
                at(Buf::PlanEntries),
                at(Buf::RouteWeights),
                at(Buf::Y),
            ];
            assert_eq!(l.ptrs(), want, "expert_scales {expert_scales}");
            assert_eq!(l.params(), bytemuck::bytes_of(&p.expand_params(slot)));
        }
        // A plan with scales refuses to run without them.
        if expert_scales {
            binds.raw(Buf::ExpertScales, 0);
            // SAFETY: refused before any launch.
            let err = unsafe { run(&b, &p, &binds, &mut Recorder::default()) }.unwrap_err();
            assert_eq!(err, MoleError::MissingInput { name: "expert_scales", needed_by: "the sgmv kernels" });
        }
    }
}

#[test]
fn slot_plans_split_ids_by_column() {
    // 3 tokens, 2 slots, 3 experts.
    let ids = [2, 0, 0, -1, 2, 1];
    let p = SlotPlans::build(&ids, 3, 2, 3, 2).unwrap();
    // Slot 0: experts 2, 0, 2 -> counts [1, 0, 2]; slot 1: 0, -, 1 -> [1, 1, 0].
    assert_eq!(p.offsets, vec![0, 2, 2, 4, 0, 2, 4, 4]);
    assert_eq!(p.entry_stride, 4);
    let tok: Vec<u32> = p.entries.iter().map(|e| e.token).collect();
    let pad = u32::MAX;
    assert_eq!(tok, vec![1, pad, 0, 2, 0, pad, 2, pad]);
    assert!(p.entry_stride <= entry_capacity(3, 3, 2));
    assert!(SlotPlans::build(&[1, 1], 1, 2, 3, 2).is_err());
    assert!(SlotPlans::build(&[1], 2, 1, 3, 2).is_err());
}
