//! The other half of "the same sources on both sides": the kernels that `mole-hostexec` runs on
//! the CPU in its own tests also compile as CUDA with NVRTC, against the embedded headers (so the
//! device branch of `common/mma.cuh` — inline PTX for mma, ldmatrix and cp.async — is checked
//! for sm_80 and sm_90). Skipped with a note when NVRTC is absent, unless `MOLE_REQUIRE_NVRTC=1`
//! (set by scripts/test.sh).

use mole::cuda::{self, compile_source, sources, Arch, Output};

const TEST_KERNELS: [(&str, &str); 5] = [
    ("basic.cu", include_str!("../hostexec/tests/kernels/basic.cu")),
    ("warp.cu", include_str!("../hostexec/tests/kernels/warp.cu")),
    ("mma.cu", include_str!("../hostexec/tests/kernels/mma.cu")),
    ("negative.cu", include_str!("../hostexec/tests/kernels/negative.cu")),
    ("dtype.cu", include_str!("../hostexec/tests/kernels/dtype.cu")),
];

#[test]
fn hostexec_test_kernels_compile_with_nvrtc_for_sm80_and_sm90() {
    if let Err(e) = cuda::nvrtc_status() {
        let required = std::env::var("MOLE_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(!required, "MOLE_REQUIRE_NVRTC=1 but {e}");
        eprintln!("note: hostexec_test_kernels_compile_with_nvrtc_for_sm80_and_sm90 skipped: {e}");
        return;
    }
    let headers: Vec<(&str, &str)> = sources::headers().collect();
    assert!(headers.iter().any(|(n, _)| *n == "common/mma.cuh"), "common/mma.cuh is embedded");
    for arch in [Arch::Sm80, Arch::Sm90] {
        for (name, text) in TEST_KERNELS {
            let options = vec![
                "-std=c++17".to_string(),
                format!("--gpu-architecture={}", arch.name()),
                "-DMOLE_DTYPE_F32".to_string(),
            ];
            let c = compile_source(name, text, &headers, &options, Output::Cubin)
                .unwrap_or_else(|e| panic!("{name} for {}: {e}", arch.name()));
            assert_eq!(&c.image[..4], b"\x7fELF", "{name}: a cubin");
        }
        // The tensor-core instructions are really emitted (not compiled away).
        let options = vec!["-std=c++17".to_string(), format!("--gpu-architecture=compute_{}", &arch.name()[3..])];
        let ptx = compile_source("mma.cu", TEST_KERNELS[2].1, &headers, &options, Output::Ptx).unwrap();
        let ptx = String::from_utf8(ptx.image).unwrap();
        for instr in [
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16",
            "cp.async.cg.shared.global",
            "cp.async.ca.shared.global",
            "cp.async.commit_group",
            "cp.async.wait_group 1",
            "cp.async.wait_all",
        ] {
            assert!(ptx.contains(instr), "{instr} missing from the {} PTX", arch.name());
        }
    }
}
