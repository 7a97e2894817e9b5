//! The device-only inline assembly of `kernels/common/mma.cuh` (mma.sync, ldmatrix) against its
//! emulation in `mole-hostexec`: the probe kernels (`hostexec/tests/kernels/mma.cu`) compiled
//! with NVRTC for the GPU's architecture, run on it, and compared with the emulation through
//! the comparison `hostexec_probes.rs` tests on the CPU (bit for bit on exact data). No CPU
//! build sees the device branch: a swapped operand there is caught only here.

mod gpu;
mod probes;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use mole::cuda::{compile_source, sources, Output};
use mole_hostexec::MmaAccumulation;
use probes::*;

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn probe_kernels_on_the_gpu_match_the_emulation() {
    let Some(dev) = gpu::device_or_skip("the hostexec probe kernels on the GPU") else { return };
    let headers: Vec<(&str, &str)> = sources::headers().collect();
    let options =
        vec!["-std=c++17".to_string(), format!("--gpu-architecture={}", dev.arch().name()), "-DMOLE_DTYPE_F32".into()];
    let cubin = compile_source("mma.cu", MMA_CU, &headers, &options, Output::Cubin).unwrap();
    let module = dev.context().load_module(Ptx::from_binary(cubin.image)).unwrap();
    let stream = dev.stream();
    let warp = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    for case in mma_cases() {
        let f = module.load_function(case.entry).unwrap();
        let (a, b, c) = (
            stream.clone_htod(&case.a).unwrap(),
            stream.clone_htod(&case.b).unwrap(),
            stream.clone_htod(&case.c).unwrap(),
        );
        let mut d = stream.alloc_zeros::<f32>(128).unwrap();
        // SAFETY: the arguments match mma_*_direct(const u16* a, const u16* b, const float* c,
        // float* d) with 256, 128, 128 and 128 elements, as one warp reads and writes them.
        unsafe { stream.launch_builder(&f).arg(&a).arg(&b).arg(&c).arg(&mut d).launch(warp) }.unwrap();
        let got = stream.clone_dtoh(&d).unwrap();
        compare_mma(&case, &got, &emulate_mma(&case, MmaAccumulation::Truncating)).unwrap();
    }
    let (tile, perm) = ldmatrix_input();
    let f = module.load_function("ldmatrix_modes").unwrap();
    let (t, p) = (stream.clone_htod(&tile).unwrap(), stream.clone_htod(&perm).unwrap());
    for mode in LDMATRIX_MODES {
        let mut out = stream.alloc_zeros::<u32>(128).unwrap();
        // SAFETY: ldmatrix_modes(const u16* tile, const int* perm, int mode, u32* out) with 256,
        // 32 and 128 elements; one warp.
        unsafe { stream.launch_builder(&f).arg(&t).arg(&p).arg(&mode).arg(&mut out).launch(warp) }.unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        assert_eq!(got, emulate_ldmatrix(&tile, &perm, mode), "ldmatrix mode {mode} against the emulation");
        assert_eq!(got, ldmatrix_expected(&tile, &perm, mode), "ldmatrix mode {mode} against the PTX ISA");
    }
}
