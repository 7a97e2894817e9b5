//! Discovery of libcuda and the GPUs (NVRTC: [`super::nvrtc`]). Every function checks that the library is
//! present before touching it, because cudarc panics when asked to load a missing library.

use super::cuda_err;
use crate::{MoleError, Result};
use cudarc::driver::{result as drv, sys as drv_sys};

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

/// Whether libcuda can be loaded (probed once per process: the bindings ask on every call).
pub fn driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to dlopen the library under its usual names; nothing is called.
    *PRESENT.get_or_init(|| unsafe { drv_sys::is_culib_present() })
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
