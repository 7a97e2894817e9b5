//! Loading every default build on the GPU, from NVRTC's cubin and from the shipped PTX (the
//! path of a machine without NVRTC).

mod gpu;

use mole::cuda::{self, DiskCache};
use mole::kernels::default_builds;
use mole::kernels::exec::LoadedBuild;

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn device_loads_every_default_build_from_cubin_and_from_shipped_ptx() {
    let Some(dev) = gpu::device_or_skip("module loading") else { return };
    // The GPU kit shares one kernel cache between its steps (MOLE_CACHE_DIR); alone, a fresh one.
    let dir = tempfile::tempdir().unwrap();
    let dev = match std::env::var_os(cuda::CACHE_DIR_ENV) {
        Some(_) => dev,
        None => dev.with_disk_cache(Some(DiskCache::at(dir.path()))),
    };
    eprintln!("{} ({}, {} SMs)", dev.name(), dev.arch(), dev.sm_count());
    let without = gpu::device_or_skip("module loading").unwrap().without_nvrtc();
    for build in default_builds() {
        // Every entry point the build's descriptions name resolves in the loaded module.
        if cuda::nvrtc_present() {
            LoadedBuild::load(&dev, &build, build.kernels()).unwrap_or_else(|e| panic!("{build}: {e}"));
        }
        LoadedBuild::load(&without, &build, build.kernels()).unwrap_or_else(|e| panic!("shipped PTX {build}: {e}"));
        // The module is loaded once per build.
        assert!(std::sync::Arc::ptr_eq(&without.module(&build).unwrap(), &without.module(&build).unwrap()));
    }
}
