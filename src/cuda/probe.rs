//! Discovery of libcuda, libnvrtc and the GPUs. Every function checks that the library is
//! present before touching it, because cudarc panics when asked to load a missing library.

use super::cuda_err;
use crate::{MoleError, Result};
use cudarc::driver::{result as drv, sys as drv_sys};
use std::sync::OnceLock;

/// One GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// Global memory in bytes.
    pub total_memory: usize,
}

/// Whether libcuda can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library under its usual names; nothing is called.
    unsafe { drv_sys::is_culib_present() }
}

/// Environment variable naming the absolute path of a `libnvrtc.so.*` to use.
///
/// When set, that file is loaded first (and kept loaded), so cudarc's own lookup by soname
/// finds the already-loaded library instead of searching `LD_LIBRARY_PATH`. This works when the
/// library's soname is one cudarc looks for (`libnvrtc.so.12`, `.11`, ...; the pip wheel
/// `nvidia-cuda-nvrtc-cu12` qualifies); for other majors put the folder on `LD_LIBRARY_PATH`.
/// The wheel's `libnvrtc.so.12` finds its `libnvrtc-builtins` next to itself (RUNPATH `$ORIGIN`).
pub const NVRTC_PATH_ENV: &str = "MOLE_NVRTC_PATH";

/// The outcome of looking for NVRTC, decided once per process.
fn nvrtc_lookup() -> &'static std::result::Result<(), String> {
    static LOOKUP: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    static PRELOADED: OnceLock<libloading::Library> = OnceLock::new();
    LOOKUP.get_or_init(|| {
        let preloaded = match std::env::var_os(NVRTC_PATH_ENV).filter(|p| !p.is_empty()) {
            None => None,
            Some(path) => {
                let path = std::path::PathBuf::from(path);
                if !path.is_absolute() {
                    return Err(format!("{NVRTC_PATH_ENV}={} is not an absolute path", path.display()));
                }
                // SAFETY: loading libnvrtc runs only its own initialisers, which have no
                // preconditions; the handle is kept for the life of the process.
                let lib = unsafe { libloading::Library::new(&path) }
                    .map_err(|e| format!("{NVRTC_PATH_ENV}={}: {e}", path.display()))?;
                let _ = PRELOADED.set(lib);
                Some(path)
            }
        };
        // SAFETY: only tries to dlopen the library under its usual names; nothing is called.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Ok(());
        }
        Err(match preloaded {
            Some(path) => format!(
                "{} was loaded from {NVRTC_PATH_ENV} but its soname is not one cudarc looks for \
                 (libnvrtc.so, libnvrtc.so.12, ...); put its folder on LD_LIBRARY_PATH instead",
                path.display()
            ),
            None => format!(
                "dlopen of libnvrtc.so / libnvrtc.so.12 failed (searched LD_LIBRARY_PATH; {NVRTC_PATH_ENV} unset)"
            ),
        })
    })
}

/// Whether libnvrtc can be loaded (honouring [`NVRTC_PATH_ENV`]).
pub fn nvrtc_present() -> bool {
    nvrtc_lookup().is_ok()
}

/// `Ok` when NVRTC can be used, else [`MoleError::NvrtcNotFound`] saying what was tried. Call
/// this before any NVRTC function: cudarc panics when the library is missing.
pub fn nvrtc_status() -> Result<()> {
    nvrtc_lookup().clone().map_err(|detail| MoleError::NvrtcNotFound { detail })
}

/// NVRTC's version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_status()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(MoleError::Cuda { call: "nvrtcVersion", message: format!("{status:?}") });
    }
    Ok((major, minor))
}

/// Every GPU the driver sees. Errors (not panics) when libcuda is missing or fails to init.
pub fn list_gpus() -> Result<Vec<GpuInfo>> {
    if !driver_present() {
        return Err(MoleError::CudaDriverNotFound { detail: "dlopen of libcuda failed".into() });
    }
    drv::init().map_err(cuda_err("cuInit"))?;
    let count = drv::device::get_count().map_err(cuda_err("cuDeviceGetCount"))?;
    (0..count)
        .map(|ordinal| {
            let dev = drv::device::get(ordinal).map_err(cuda_err("cuDeviceGet"))?;
            let name = drv::device::get_name(dev).map_err(cuda_err("cuDeviceGetName"))?;
            use drv_sys::CUdevice_attribute as A;
            // SAFETY: `dev` is a valid device handle from cuDeviceGet after a successful cuInit.
            let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(cuda_err("cuDeviceGetAttribute"));
            let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            // SAFETY: as above.
            let total_memory = unsafe { drv::device::total_mem(dev) }.map_err(cuda_err("cuDeviceTotalMem"))?;
            Ok(GpuInfo { ordinal: ordinal as usize, name, compute_capability: (major, minor), sm_count, total_memory })
        })
        .collect()
}
