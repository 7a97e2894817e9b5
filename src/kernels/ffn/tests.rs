use super::*;
use crate::cuda::sources;
use std::mem::{offset_of, size_of};

fn ffn_cu() -> &'static str {
    sources::source("ffn.cu").expect("kernels/ffn.cu is embedded")
}

#[test]
fn params_layout_matches_the_c_struct() {
    assert_eq!(size_of::<FfnParams>(), 68);
    assert!(ffn_cu().contains("sizeof(mole_ffn_params) == 68"));
    for (name, off) in [
        ("tokens", offset_of!(FfnParams, tokens)),
        ("f", offset_of!(FfnParams, f)),
        ("r_gate_max", offset_of!(FfnParams, r_gate_max)),
        ("up_splits", offset_of!(FfnParams, up_splits)),
        ("r_down_total", offset_of!(FfnParams, r_down_total)),
        ("f_per_split", offset_of!(FfnParams, f_per_split)),
        ("entry_stride", offset_of!(FfnParams, entry_stride)),
        ("slot", offset_of!(FfnParams, slot)),
        ("activation", offset_of!(FfnParams, activation)),
        ("scale_gate", offset_of!(FfnParams, scale_gate)),
        ("scale_up", offset_of!(FfnParams, scale_up)),
    ] {
        let line = format!("MOLE_OFFSET_OF(mole_ffn_params, {name}) == {off}");
        assert!(ffn_cu().contains(&line), "ffn.cu lacks `{line}`");
    }
}

#[test]
fn defaults_and_activation_codes_match_the_cu_file() {
    let cu = ffn_cu();
    let c = FfnConfig::DEFAULT;
    for (name, v) in [
        ("MOLE_BLOCK_THREADS", c.block_threads),
        ("MOLE_FFN_BM", c.bm),
        ("MOLE_FFN_BN", c.bn),
        ("MOLE_FFN_KC", c.kc),
        ("MOLE_FFN_MAX_RANK", c.max_rank),
    ] {
        assert!(cu.contains(&format!("#define {name} {v}\n")), "{name} {v}");
    }
    assert!(cu.contains(&format!("#define MOLE_FFN_SILU {}u", activation_code(Activation::Silu))));
    assert!(cu.contains(&format!("#define MOLE_FFN_GELU {}u", activation_code(Activation::Gelu))));
    // The FFN tiles the SGMV plans: the default heights agree.
    assert_eq!(c.bm, SgmvConfig::DEFAULT.bm);
    for c in CONFIG_CANDIDATES {
        c.validate().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    // A grid's y extent bounds the f-slices; shared memory bounds the tiles.
    let e = FfnConfig { f_splits: 70_000, ..c }.validate().unwrap_err().to_string();
    assert!(e.contains("f_splits"), "{e}");
    let e = FfnConfig { max_rank: 128, ..c }.validate().unwrap_err().to_string();
    assert!(e.contains("48 KiB"), "{e}");
}

fn builds() -> (KernelBuild, KernelBuild) {
    (sgmv::build(DType::BF16, SgmvConfig::DEFAULT), build(DType::BF16, FfnConfig::DEFAULT))
}

#[test]
fn plan_sizes_the_buffers_and_slices_f() {
    let (s, f) = builds();
    let offs: Vec<u32> = (0..=8).map(|e| 16 * e).collect();
    let bank = Some(FfnBank { rank_offsets: &offs, scale: 2.0 });
    let shape = FfnShape {
        tokens: 100,
        slots: 2,
        experts: 8,
        d: 4096,
        f: 11008,
        activation: Activation::Silu,
        gate: bank,
        up: bank,
        down: bank,
    };
    let stride = sgmv::entry_capacity(100, 8, 32);
    let p = plan(&s, &f, shape, stride).unwrap();
    // 11008 = 344 chunks of 32: 8 slices of 43 chunks.
    assert_eq!((p.params.f_splits, p.params.f_per_split), (8, 43 * 32));
    assert_eq!(p.act.unwrap().grid, (stride.div_ceil(32) as u32, 8, 1));
    assert_eq!(p.lens.get(Buf::AMix), 100 * 11008);
    assert_eq!(p.lens.get(Buf::DownPartials), 8 * 200 * 16);
    let down = p.down.as_ref().unwrap();
    assert_eq!((down.params.splits, down.params.k_per_split, down.params.d_out), (8, 43 * 32, 4096));
    assert!(down.shrink.is_none() && down.expand.is_some());
    assert_eq!(p.lens.get(Buf::GatePartials), p.gate.as_ref().unwrap().lens.get(Buf::Partials));
    // f smaller than a slice: one slice, never an empty one.
    let small = plan(&s, &f, FfnShape { f: 20, ..shape }, stride).unwrap();
    assert_eq!((small.params.f_splits, small.params.f_per_split), (1, 32));
    // No LoRA at all: the base FFN through the act passes alone.
    let base = plan(&s, &f, FfnShape { gate: None, up: None, down: None, ..shape }, stride).unwrap();
    assert!(base.gate.is_none() && base.down.is_none() && base.act.is_some());
    assert_eq!(base.lens.get(Buf::GateRankOffsets), 0);
    // Zero tokens: nothing to launch.
    let none = plan(&s, &f, FfnShape { tokens: 0, ..shape }, 8 * 31).unwrap();
    assert!(none.clear.is_none());
}

#[test]
fn plan_names_what_it_refuses() {
    let (s, f) = builds();
    let offs: Vec<u32> = (0..=4).map(|e| 16 * e).collect();
    let bank = Some(FfnBank { rank_offsets: &offs, scale: 1.0 });
    let shape = FfnShape {
        tokens: 4,
        slots: 2,
        experts: 4,
        d: 64,
        f: 96,
        activation: Activation::Gelu,
        gate: bank,
        up: None,
        down: bank,
    };
    assert!(plan(&s, &f, shape, 128).is_ok());
    let err = |shape, s: &KernelBuild, f: &KernelBuild| plan(s, f, shape, 128).unwrap_err().to_string();
    let wide: Vec<u32> = vec![0, 65, 65, 65, 65];
    let e = err(FfnShape { down: Some(FfnBank { rank_offsets: &wide, scale: 1.0 }), ..shape }, &s, &f);
    assert!(e.contains("down.rank_offsets") && e.contains("max_rank"), "{e}");
    let short = &offs[..4];
    let e = err(FfnShape { gate: Some(FfnBank { rank_offsets: short, scale: 1.0 }), ..shape }, &s, &f);
    assert!(e.contains("gate.rank_offsets"), "{e}");
    let e = err(FfnShape { f: 0, ..shape }, &s, &f);
    assert!(e.contains('f'), "{e}");
    // Without any bank the SGMV plans check nothing: the block's own checks name the input.
    let bare = FfnShape { gate: None, down: None, ..shape };
    assert!(err(FfnShape { slots: 5000, ..bare }, &s, &f).contains("slots"));
    assert!(err(FfnShape { tokens: usize::MAX / 2, ..bare }, &s, &f).contains("tokens"));
    let e = err(FfnShape { gate: Some(FfnBank { rank_offsets: &offs, scale: f32::NAN }), ..shape }, &s, &f);
    assert!(e.contains("scale"), "{e}");
    let small = build(DType::BF16, CONFIG_CANDIDATES[2]);
    assert!(err(shape, &s, &small).contains("bm"));
    let f32_sgmv = sgmv::build(DType::F32, SgmvConfig::DEFAULT);
    assert!(err(shape, &f32_sgmv, &f).contains("dtype"));
    assert!(err(shape, &f, &f).contains("sgmv"));
}

#[test]
fn every_candidate_pairs_with_the_sgmv_build_of_its_tile_height() {
    let bm16 = sgmv::CONFIG_CANDIDATES.iter().copied().find(|c| c.bm == 16).unwrap();
    for dtype in DType::ALL {
        let default = sgmv_build_for(&build(dtype, FfnConfig::DEFAULT)).unwrap();
        assert_eq!(default, sgmv::build(dtype, SgmvConfig::DEFAULT), "{dtype}");
        let small = CONFIG_CANDIDATES.iter().copied().find(|c| c.bm == 16).unwrap();
        assert_eq!(sgmv_build_for(&build(dtype, small)).unwrap(), sgmv::build(dtype, bm16), "{dtype}");
        for c in CONFIG_CANDIDATES {
            let ffn = build(dtype, c);
            let paired = sgmv_build_for(&ffn).unwrap();
            assert_eq!((SgmvConfig::of(&paired).unwrap().bm, paired.dtype), (c.bm, dtype));
            // What `plan` accepts: the pair plans a forward.
            let offs = [0u32, 4, 8];
            let bank = Some(FfnBank { rank_offsets: &offs, scale: 1.0 });
            let shape = FfnShape {
                tokens: 5,
                slots: 1,
                experts: 2,
                d: 64,
                f: 96,
                activation: Activation::Silu,
                gate: bank,
                up: bank,
                down: bank,
            };
            assert!(plan(&paired, &ffn, shape, 64).is_ok(), "{c:?}");
        }
    }
    // A tile height no SGMV candidate has, and a build of another family, are refused.
    let bm8 = FfnConfig { bm: 8, ..FfnConfig::DEFAULT };
    assert!(bm8.validate().is_ok());
    let e = sgmv_build_for(&build(DType::BF16, bm8)).unwrap_err().to_string();
    assert!(e.contains("no SGMV candidate"), "{e}");
    assert!(sgmv_build_for(&sgmv::build(DType::BF16, SgmvConfig::DEFAULT)).is_err());
}
