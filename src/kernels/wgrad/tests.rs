use super::*;
use crate::cuda::sources;
use crate::kernels::exec::{Bindings, Recorder};
use std::mem::{offset_of, size_of};

fn wgrad_cu() -> &'static str {
    sources::source("wgrad.cu").expect("kernels/wgrad.cu is embedded")
}

#[test]
fn params_layout_matches_the_c_struct() {
    assert_eq!(size_of::<WgradParams>(), 60);
    assert!(wgrad_cu().contains("sizeof(mole_wgrad_params) == 60"));
    for (name, off) in [
        ("tokens", offset_of!(WgradParams, tokens)),
        ("batch", offset_of!(WgradParams, batch)),
        ("tokens_per_split", offset_of!(WgradParams, tokens_per_split)),
        ("p_kind", offset_of!(WgradParams, p_kind)),
        ("q_kind", offset_of!(WgradParams, q_kind)),
        ("rw_stride", offset_of!(WgradParams, rw_stride)),
        ("rw_col", offset_of!(WgradParams, rw_col)),
        ("scale", offset_of!(WgradParams, scale)),
    ] {
        let line = format!("MOLE_OFFSET_OF(mole_wgrad_params, {name}) == {off}");
        assert!(wgrad_cu().contains(&line), "wgrad.cu lacks `{line}`");
    }
}

#[test]
fn defaults_and_operand_kinds_match_the_cu_file() {
    let cu = wgrad_cu();
    let c = WgradConfig::DEFAULT;
    for (name, v) in
        [("MOLE_BLOCK_THREADS", c.block_threads), ("MOLE_WGRAD_BM", c.bm), ("MOLE_WGRAD_BN", c.bn), ("MOLE_WGRAD_TK", c.tk)]
    {
        assert!(cu.contains(&format!("#define {name} {v}\n")), "{name} {v}");
    }
    for (name, v) in [("ONES", KIND_ONES), ("DATA", KIND_DATA), ("F32", KIND_F32)] {
        assert!(cu.contains(&format!("#define MOLE_WGRAD_{name} {v}u")), "{name}");
    }
    // What ptxas reports for the default tiling (mole check-kernels).
    assert_eq!(c.shared_bytes(), 17_408);
    for c in CONFIG_CANDIDATES {
        c.validate().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    let e = WgradConfig { bn: 48, ..c }.validate().unwrap_err().to_string();
    assert!(e.contains("BM x BN"), "{e}");
    let e = WgradConfig { tk: 128, ..c }.validate().unwrap_err().to_string();
    assert!(e.contains("48 KiB"), "{e}");
    assert!(matches!(WgradConfig { tk: 0, ..c }.validate(), Err(MoleError::ZeroDimension { name: "tk" })));
}

fn bf16_build() -> KernelBuild {
    build(DType::BF16, WgradConfig::DEFAULT)
}

/// `dA = xᵀ·dh` at a MoLE layer's shape: `x [T, 4096]` in the dtype, `dh [T, 128]` f32.
fn d_a(tokens: usize, splits: usize) -> WgradShape {
    WgradShape {
        tokens,
        m: 4096,
        n: 128,
        splits,
        p: WgradOperand::Data { stride: 4096, col: 0 },
        q: WgradOperand::Float { stride: 128, col: 0 },
        row_weight: None,
        scale: 1.0,
    }
}

#[test]
fn plan_sizes_the_buffers_and_the_grids() {
    let b = bf16_build();
    let p = plan(&b, d_a(2048, 8)).unwrap();
    assert_eq!((p.splits(), p.params.tokens_per_split), (8, 256));
    assert_eq!(p.partial.grid, (2, 64, 8));
    assert_eq!(p.partials_len(), 8 * 4096 * 128);
    assert_eq!(p.out_len(), 4096 * 128);
    assert_eq!(p.lens.get(Buf::WgradP), 2048 * 4096);
    assert_eq!(p.lens.get(Buf::WgradQFloat), 2048 * 128);
    assert_eq!((p.lens.get(Buf::WgradPFloat), p.lens.get(Buf::WgradQ), p.lens.get(Buf::WgradRowWeight)), (0, 0, 0));
    assert_eq!((p.params.p_kind, p.params.q_kind), (KIND_DATA, KIND_F32));
    // No split is empty: 10 tokens in 4 splits are 3 + 3 + 3 + 1, in 8 splits 2 · 5.
    let p = plan(&b, d_a(10, 4)).unwrap();
    assert_eq!((p.splits(), p.params.tokens_per_split), (4, 3));
    let p = plan(&b, d_a(10, 8)).unwrap();
    assert_eq!((p.splits(), p.params.tokens_per_split, p.partial.grid.2), (5, 2, 5));
    // Zero tokens: one empty split, the output written as zeros.
    let p = plan(&b, d_a(0, 3)).unwrap();
    assert_eq!((p.splits(), p.lens.get(Buf::WgradP), p.partials_len()), (1, 0, 4096 * 128));

    // CoMoL's cores: dC_c = Σ_t w[t,c]·h_tᵀ g_t for 4 cores in one launch, the weights a block of
    // columns of a [T, 6] matrix.
    let cores = WgradShape {
        tokens: 100,
        m: 16,
        n: 16,
        splits: 3,
        p: WgradOperand::Float { stride: 16, col: 0 },
        q: WgradOperand::Float { stride: 16, col: 0 },
        row_weight: Some(WgradRowWeight { stride: 6, col: 2, count: 4 }),
        scale: 1.0,
    };
    let p = plan(&b, cores).unwrap();
    assert_eq!((p.partial.grid, p.params.batch, p.params.rw_col), ((1, 1, 12), 4, 2));
    assert_eq!((p.lens.get(Buf::WgradRowWeight), p.out_len(), p.partials_len()), (600, 4 * 256, 3 * 4 * 256));
    // The router bias: column sums of dz [T, E].
    let bias = WgradShape { m: 1, n: 8, p: WgradOperand::Ones, q: WgradOperand::Float { stride: 8, col: 0 }, ..d_a(64, 2) };
    let p = plan(&b, bias).unwrap();
    assert_eq!((p.params.p_kind, p.out_len(), p.partial.grid), (KIND_ONES, 8, (1, 1, 2)));
    assert_eq!((p.lens.get(Buf::WgradP), p.lens.get(Buf::WgradPFloat)), (0, 0));
}

#[test]
fn plan_names_what_it_refuses() {
    let b = bf16_build();
    let err = |shape: WgradShape| plan(&b, shape).unwrap_err().to_string();
    let ok = d_a(64, 2);
    assert!(plan(&b, ok).is_ok());
    assert!(matches!(plan(&b, WgradShape { m: 0, ..ok }), Err(MoleError::ZeroDimension { name: "m" })));
    assert!(matches!(plan(&b, WgradShape { splits: 0, ..ok }), Err(MoleError::ZeroDimension { name: "splits" })));
    assert!(err(WgradShape { p: WgradOperand::Ones, ..ok }).contains("ones"));
    assert!(err(WgradShape { q: WgradOperand::Ones, ..ok }).contains("only P"));
    let e = err(WgradShape { p: WgradOperand::Data { stride: 4096, col: 1 }, ..ok });
    assert!(e.contains("p.stride") && e.contains("column offset"), "{e}");
    let e = err(WgradShape { q: WgradOperand::Float { stride: 100, col: 0 }, ..ok });
    assert!(e.contains("q.stride"), "{e}");
    let rw = |stride, col, count| WgradShape { row_weight: Some(WgradRowWeight { stride, col, count }), ..ok };
    assert!(err(rw(4, 2, 3)).contains("row_weight.stride"));
    assert!(err(rw(4, 0, 0)).contains("row_weight.count"));
    assert!(plan(&b, rw(4, 1, 3)).is_ok());
    assert!(err(WgradShape { scale: f32::INFINITY, ..ok }).contains("scale"));
    assert!(err(WgradShape { tokens: usize::MAX / 2, ..ok }).contains("tokens"));
    // Grid limits: row tiles on y, splits times outputs on z.
    let tall = WgradShape { m: 65_536 * 64, p: WgradOperand::Data { stride: 65_536 * 64, col: 0 }, ..ok };
    assert!(err(tall).contains("y extent"));
    let e = err(WgradShape { tokens: 1 << 20, splits: 40_000, ..rw(4, 0, 2) });
    assert!(e.contains("z extent"), "{e}");
    // Sizes past 32 bits.
    let wide = WgradShape { tokens: 1, q: WgradOperand::Float { stride: 1 << 33, col: 0 }, ..ok };
    assert!(err(wide).contains("32 bits"));
    // Builds of another family.
    let other = crate::kernels::ffn::build(DType::BF16, crate::kernels::FfnConfig::DEFAULT);
    assert!(plan(&other, ok).unwrap_err().to_string().contains("not a wgrad build"));
}

#[test]
fn splits_for_fills_the_grid_within_its_limits() {
    let b = bf16_build();
    // dA at 4096 x 128: 128 tiles; 264 blocks wanted -> 3 splits, if the tokens allow.
    assert_eq!(splits_for(&b, 4096, 4096, 128, 1, 264).unwrap(), 3);
    assert_eq!(splits_for(&b, 200, 4096, 128, 1, 264).unwrap(), 1);
    // db (1 x 8): one tile; splits bounded by the tokens (no split under 4 · tk = 128).
    assert_eq!(splits_for(&b, 4096, 1, 8, 1, 264).unwrap(), 32);
    assert_eq!(splits_for(&b, 0, 1, 8, 1, 264).unwrap(), 1);
    // Many outputs: the grid's z extent.
    assert_eq!(splits_for(&b, 1 << 30, 1, 1, 40_000, 1 << 30).unwrap(), 1);
    assert!(splits_for(&crate::kernels::ffn::build(DType::BF16, crate::kernels::FfnConfig::DEFAULT), 1, 1, 1, 1, 1).is_err());
}

#[test]
fn run_checks_the_build_and_the_buffers_then_launches_twice() {
    let b = bf16_build();
    let p = plan(&b, d_a(64, 2)).unwrap();
    let mut binds = Bindings::new();
    binds
        .sized(Buf::WgradP, 0x1000, 64 * 4096)
        .sized(Buf::WgradQFloat, 0x2000, 64 * 128)
        .sized(Buf::WgradPartials, 0x3000, p.partials_len() + 7)
        .sized(Buf::WgradOut, 0x4000, p.out_len())
        // Not taken by this call: passed as null.
        .sized(Buf::WgradRowWeight, 0x5000, 64);
    let mut rec = Recorder::default();
    // SAFETY: the recorder runs nothing.
    unsafe { run(&b, &p, &binds, &mut rec) }.unwrap();
    assert_eq!(rec.launches.len(), 2);
    let (partial, reduce) = (&rec.launches[0].1, &rec.launches[1].1);
    assert_eq!(partial.kernel().name, "wgrad_partial");
    assert_eq!(partial.ptrs(), [0x1000, 0, 0, 0x2000, 0, 0x3000]);
    assert_eq!(reduce.ptrs(), [0x3000, 0x4000]);
    assert_eq!(partial.dims(), p.partial);

    // A wrong output length, a missing operand, another tiling: refused before any launch.
    let mut rec = Recorder::default();
    let mut short = binds;
    short.sized(Buf::WgradOut, 0x4000, p.out_len() - 1);
    // SAFETY: as above.
    let e = unsafe { run(&b, &p, &short, &mut rec) }.unwrap_err();
    assert!(matches!(e, MoleError::ShapeMismatch { what: "wgrad_out", .. }), "{e}");
    let mut missing = binds;
    missing.raw(Buf::WgradQFloat, 0);
    // SAFETY: as above.
    let e = unsafe { run(&b, &p, &missing, &mut rec) }.unwrap_err();
    assert!(matches!(e, MoleError::MissingInput { name: "wgrad_q_float", .. }), "{e}");
    let small = build(DType::BF16, CONFIG_CANDIDATES[1]);
    // SAFETY: as above.
    assert!(unsafe { run(&small, &p, &binds, &mut rec) }.is_err());
    assert_eq!(rec.count, 0);
}
