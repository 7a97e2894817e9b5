//! The CUDA side: finding the driver and NVRTC at run time (dynamic loading, so the crate builds
//! and runs its CPU path with no CUDA installed), describing the GPUs, compiling the embedded
//! kernel sources with NVRTC, caching the results, and loading them on a [`Device`].
//!
//! NVRTC 12 or 13 is found at run time ([`NvrtcLibrary`]): `MOLE_NVRTC_PATH` ([`NVRTC_PATH_ENV`])
//! first, then the library search, a CUDA toolkit, and the PyPI wheels (the project's `.nvrtc/`,
//! virtual environments, `python3`'s `sys.path`).
//! Compiled cubins are cached in `MOLE_CACHE_DIR`, else `$XDG_CACHE_HOME/mole`, else
//! `$HOME/.cache/mole` ([`default_cache_dir`]).

mod arch;
mod compile;
mod device;
mod module_cache;
mod nvrtc;
mod probe;
mod ptxas;
pub mod sources;
mod timing;

pub use arch::{Arch, ArchLimits, Violation};
pub use compile::{compile, compile_options, compile_source, CompileUnit, Compiled, Output};
pub use device::{Device, ModuleSource};
pub use module_cache::{
    cache_dir_from, cubin_cached, default_cache_dir, CacheKey, CacheOutcome, DiskCache, CACHE_DIR_ENV,
};
pub use nvrtc::{nvrtc_library, nvrtc_present, nvrtc_status, nvrtc_version, NvrtcLibrary, NVRTC_PATH_ENV};
pub use probe::{driver_present, list_gpus, GpuInfo};
pub use ptxas::{parse_ptxas_log, EntryResources, FunctionFrame, PtxasReport};
pub use timing::{copy_bandwidth_gbs, time_on_device, Timing};

/// Maps a driver error of `call` to [`crate::MoleError::Cuda`].
pub(crate) fn cuda_err(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> crate::MoleError {
    move |e| crate::MoleError::Cuda { call, message: e.to_string() }
}
