use super::*;

#[test]
fn family_names_and_serde() {
    for f in Family::ALL {
        assert_eq!(f.source_file(), format!("{}.cu", f.name()));
        assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{}\"", f.name()));
    }
}

/// The exact NVRTC defines of one default build per family: what the `.cu` files and the
/// shipped PTX were generated with (names, values and order must not drift).
#[test]
fn default_builds_pass_the_same_defines_as_ever() {
    let opts = |b: KernelBuild| (b.to_string(), b.define_options());
    let gating = gating::build(DType::BF16, gating::DEFAULT_BLOCK_THREADS);
    assert_eq!(opts(gating).1, ["-DMOLE_DTYPE_BF16", "-DMOLE_BLOCK_THREADS=128", "-DMOLE_DYNAMIC_SMEM_BYTES=16384"]);
    let (name, sgmv) = opts(sgmv::build(DType::F16, SgmvConfig::DEFAULT));
    assert_eq!(
        sgmv,
        [
            "-DMOLE_DTYPE_F16",
            "-DMOLE_BLOCK_THREADS=128",
            "-DMOLE_SGMV_BM=32",
            "-DMOLE_SGMV_BN=32",
            "-DMOLE_SGMV_RC=32",
            "-DMOLE_SGMV_KC=16",
            "-DMOLE_SGMV_SPLITS=2",
            "-DMOLE_SGMV_STAGES=2",
        ]
    );
    assert!(name.starts_with("sgmv f16 [MOLE_BLOCK_THREADS=128, MOLE_SGMV_BM=32, "), "{name}");
    assert_eq!(
        opts(fused::build(DType::F32, FusedConfig::DEFAULT)).1,
        [
            "-DMOLE_DTYPE_F32",
            "-DMOLE_BLOCK_THREADS=256",
            "-DMOLE_FUSED_BT=16",
            "-DMOLE_FUSED_KC=32",
            "-DMOLE_FUSED_MAX_COLS=256"
        ]
    );
}

#[test]
fn entry_points_follow_family_dtype_and_tiling() {
    let g = gating::build(DType::F16, 64);
    assert_eq!(g.entry_points().len(), gating::kernel::ALL.len());
    assert_eq!(g.entry_points()[0], "gating_softmax_topk_f16");
    assert_eq!(sgmv::build(DType::F32, SgmvConfig::DEFAULT).entry_points(), ["sgmv_shrink_f32", "sgmv_expand_f32"]);
    assert_eq!(sgmv::build(DType::BF16, SgmvConfig::DEFAULT).entry_points().len(), 4);
    let f = fused::build(DType::BF16, FusedConfig::DEFAULT).entry_points();
    assert_eq!(f.last().map(String::as_str), Some("fused_layer_mma_bf16"));
    // A tile that is not whole m16 tiles has no tensor-core entry.
    let small = FusedConfig { block_threads: 128, bt: 8, ..FusedConfig::DEFAULT };
    assert_eq!(fused::build(DType::BF16, small).entry_points().len(), 3);
}

#[test]
fn launch_shape_comes_from_the_config() {
    let g = gating::build(DType::F32, 256);
    assert_eq!((g.block_threads(), g.dynamic_shared_bytes()), (256, 8 * 1024 * 4));
    let s = sgmv::build(DType::F32, SgmvConfig::DEFAULT);
    assert_eq!((s.block_threads(), s.dynamic_shared_bytes()), (128, 0));
    let f = fused::build(DType::F32, FusedConfig::DEFAULT);
    assert_eq!((f.block_threads(), f.dynamic_shared_bytes(), f.family()), (256, 0, Family::Fused));
}

#[test]
fn builds_round_trip_through_readable_json() {
    for b in all_candidates() {
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<KernelBuild>(&json).unwrap(), b, "{json}");
    }
    let b = sgmv::build(DType::BF16, SgmvConfig::DEFAULT);
    assert_eq!(
        serde_json::to_string(&b).unwrap(),
        r#"{"dtype":"bf16","config":{"family":"sgmv","block_threads":128,"bm":32,"bn":32,"rc":32,"kc":16,"splits":2,"stages":2}}"#
    );
    let g = serde_json::to_string(&gating::build(DType::F16, 64)).unwrap();
    assert_eq!(g, r#"{"dtype":"f16","config":{"family":"gating","block_threads":64}}"#);
}

#[test]
fn invalid_builds_from_json_are_errors() {
    let sgmv = |fields: &str| format!(r#"{{"dtype":"bf16","config":{{"family":"sgmv",{fields}}}}}"#);
    let ok = r#""block_threads":128,"bm":32,"bn":32,"rc":32,"kc":16,"splits":2,"stages":2"#;
    assert!(serde_json::from_str::<KernelBuild>(&sgmv(ok)).is_ok());
    let bad = [
        // Each constraint of the configuration, as the `.cu` file asserts it.
        sgmv(&ok.replace(r#""stages":2"#, r#""stages":3"#)),
        sgmv(&ok.replace(r#""bm":32"#, r#""bm":0"#)),
        sgmv(&ok.replace(r#""block_threads":128"#, r#""block_threads":100"#)),
        // 16-bit builds need whole m16 tiles.
        sgmv(&ok.replace(r#""bm":32"#, r#""bm":8"#).replace(r#""block_threads":128"#, r#""block_threads":64"#)),
        // Malformed: a missing or unknown field, a string where a number goes, a negative.
        sgmv(&ok.replace(r#","stages":2"#, "")),
        sgmv(&format!(r#"{ok},"warps":4"#)),
        sgmv(&ok.replace(r#""bm":32"#, r#""bm":"32""#)),
        sgmv(&ok.replace(r#""bm":32"#, r#""bm":-32"#)),
        r#"{"dtype":"bf16","config":{"family":"gating","block_threads":48}}"#.into(),
        r#"{"dtype":"bf16","config":{"family":"gating","block_threads":4096}}"#.into(),
        r#"{"dtype":"bf16","config":{"family":"nope","block_threads":128}}"#.into(),
        r#"{"dtype":"f32","config":{"family":"fused","block_threads":256,"bt":12,"kc":32,"max_cols":256}}"#.into(),
        r#"{"dtype":"f32","config":{"family":"fused","block_threads":256,"bt":16,"kc":32,"max_cols":40}}"#.into(),
        r#"{"dtype":"f64","config":{"family":"gating","block_threads":128}}"#.into(),
        r#"{"dtype":"f32","config":{"family":"gating","block_threads":128},"defines":[]}"#.into(),
    ];
    for json in bad {
        assert!(serde_json::from_str::<KernelBuild>(&json).is_err(), "{json}");
    }
    // The message names what is wrong.
    let e = serde_json::from_str::<KernelBuild>(&sgmv(&ok.replace(r#""stages":2"#, r#""stages":3"#))).unwrap_err();
    assert!(e.to_string().contains("stages"), "{e}");
}

#[test]
fn validate_checks_the_config() {
    let ok = sgmv::build(DType::F16, SgmvConfig::DEFAULT);
    assert_eq!(ok.validate().is_ok(), sources::source("sgmv.cu").is_some());
    let bad = [
        KernelBuild::new(DType::F16, SgmvConfig { stages: 0, ..SgmvConfig::DEFAULT }),
        KernelBuild::new(DType::F16, SgmvConfig { bm: 8, block_threads: 64, ..SgmvConfig::DEFAULT }),
        KernelBuild::new(DType::F16, FusedConfig { max_cols: 0, ..FusedConfig::DEFAULT }),
        KernelBuild::new(DType::F16, GatingConfig { block_threads: 0 }),
        KernelBuild::new(DType::F16, GatingConfig { block_threads: 2048 }),
    ];
    for b in bad {
        assert!(
            matches!(b.validate(), Err(MoleError::InvalidParameter { .. } | MoleError::ZeroDimension { .. })),
            "{b}"
        );
    }
    // The 16-bit tiling constraint does not apply to f32 builds.
    let f32_small =
        KernelBuild::new(DType::F32, SgmvConfig { bm: 8, block_threads: 64, bn: 32, rc: 32, ..SgmvConfig::DEFAULT });
    f32_small.config.validate(DType::F32).unwrap();
}

#[test]
fn defaults_are_one_per_dtype_and_among_the_candidates() {
    let all = all_candidates();
    for b in &all {
        b.validate().unwrap_or_else(|e| panic!("{b}: {e}"));
    }
    for b in default_builds() {
        assert!(all.contains(&b), "{b}");
    }
    for f in Family::ALL {
        let d = f.default_builds();
        assert!(DType::ALL.iter().all(|&t| d.iter().filter(|b| b.dtype == t).count() <= 1));
        assert!(f.candidates().iter().all(|b| b.family() == f));
    }
}
