//! The CUDA side: finding the driver and NVRTC at run time (dynamic loading, so the crate builds
//! and runs its CPU path with no CUDA installed), describing the GPUs, compiling the embedded
//! kernel sources with NVRTC, caching the results, and loading them on a [`Device`].
//!
//! NVRTC 12 or 13 is found at run time ([`NvrtcLibrary`]): `MOLE_NVRTC_PATH` ([`NVRTC_PATH_ENV`])
//! first, then the library search, a CUDA toolkit, and the PyPI wheels (the project's `.nvrtc/`,
//! virtual environments, `python3`'s `sys.path`).
//! Compiled cubins are cached in `MOLE_CACHE_DIR`, else `$XDG_CACHE_HOME/mole`, else
//! `$HOME/.cache/mole` (`default_cache_dir`).
//! cuBLAS 12 or 13, for the dense base products of the FFN-expert block, is found the same way
//! (`MOLE_CUBLAS_PATH` first; `Blas`, with the `internals` feature).

mod arch;
// cuBLAS serves only the `internals` API for now (the FFN-expert block's base products).
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
mod blas;
// Parts of these serve only the `internals` API (the command line's tools and the tests).
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
mod compile;
mod device;
mod dylib;
mod module_cache;
mod nvrtc;
mod probe;
mod ptxas;
crate::internal_mod!(sources);
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
mod timing;

pub use arch::Arch;
pub use device::Device;
pub use nvrtc::{nvrtc_present, nvrtc_status, NvrtcLibrary, NVRTC_PATH_ENV};
pub use probe::{driver_present, list_gpus, GpuInfo};

/// Re-exports of the compile internals, public API with the `internals` feature.
#[cfg_attr(not(feature = "internals"), allow(unused_imports))]
mod internal {
    pub use super::arch::{ArchLimits, Violation};
    pub use super::blas::{cublas_library, Blas, CublasLibrary, DeviceMatrix, Gemm, CUBLAS_PATH_ENV};
    pub use super::compile::{compile, compile_options, compile_source, CompileUnit, Compiled, Output};
    pub use super::device::ModuleSource;
    pub use super::module_cache::{
        cache_dir_from, cubin_cached, default_cache_dir, CacheKey, CacheOutcome, DiskCache, CACHE_DIR_ENV,
    };
    pub use super::nvrtc::{nvrtc_library, nvrtc_version};
    pub use super::ptxas::{parse_ptxas_log, EntryResources, FunctionFrame, PtxasReport};
    pub use super::timing::{copy_bandwidth_gbs, time_on_device, Timing};
}
#[cfg(feature = "internals")]
pub use internal::*;
#[cfg(not(feature = "internals"))]
#[allow(unused_imports)]
pub(crate) use internal::*;

/// Maps a driver error of `call` to [`crate::MoleError::Cuda`].
pub(crate) fn cuda_err(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> crate::MoleError {
    move |e| crate::MoleError::Cuda { call, message: e.to_string() }
}
