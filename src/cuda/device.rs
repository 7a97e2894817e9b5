//! A GPU with its context, a stream, and the kernel modules loaded on it.

use super::arch::Arch;
use super::compile::CompileUnit;
use super::cuda_err;
use super::module_cache::{cubin_cached, CacheKey, DiskCache};
use super::nvrtc::nvrtc_version;
use super::probe::driver_present;
use crate::{MoleError, Result};
use cudarc::driver::{sys::CUdevice_attribute, CudaContext, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A kernel module the device can load: the unit NVRTC compiles for the device's own
/// architecture, and the PTX shipped for the same unit, which the driver JITs when NVRTC is
/// absent. The kernel registry implements it for its builds (`mole::kernels::KernelBuild`).
pub trait ModuleSource {
    /// The unit to compile (checked: an invalid configuration is an error here).
    fn unit(&self) -> Result<CompileUnit>;
    /// The shipped PTX of the unit; an error when none is shipped for it.
    fn shipped_ptx(&self) -> Result<&'static str>;
}

/// Where a module's code comes from on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CodeSource {
    /// Compiled by NVRTC for the device's own architecture (through the disk cache).
    Cubin(CacheKey),
    /// The shipped PTX, JIT-compiled by the driver (no NVRTC).
    ShippedPtx,
}

impl CodeSource {
    /// The in-process cache key: modules are per unit and per source of code.
    fn memo_key(&self, unit: &CompileUnit) -> String {
        match self {
            CodeSource::Cubin(key) => key.canonical().to_string(),
            CodeSource::ShippedPtx => format!("shipped-ptx {}", unit.identity),
        }
    }
}

/// Whether the NVRTC found can compile cubins for `arch`: sm_100 needs NVRTC 12.8 or newer;
/// an older one leaves the device on the shipped PTX, which the driver JITs.
fn nvrtc_targets(arch: Arch) -> bool {
    match nvrtc_version() {
        Ok(version) => arch != Arch::Sm100 || version >= (12, 8),
        Err(_) => false,
    }
}

/// One GPU: a CUDA context, a stream to launch on, and a cache of loaded kernel modules.
/// Cloning is cheap and shares the context, the stream and the loaded modules.
///
/// Creating one needs only the driver. Kernels are compiled with NVRTC for the device's exact
/// architecture (cubin, cached on disk across processes); without NVRTC the PTX shipped in
/// `ptx/` is used, which covers the default builds only.
#[derive(Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    arch: Arch,
    sm_count: u32,
    disk: Option<DiskCache>,
    use_nvrtc: bool,
    modules: Arc<Mutex<HashMap<String, Arc<CudaModule>>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("sm_count", &self.sm_count)
            .field("disk_cache", &self.disk)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens GPU `ordinal` with the disk cache of `DiskCache::from_env`. Errors with
    /// [`MoleError::CudaDriverNotFound`] when libcuda is missing, [`MoleError::Cuda`] when the
    /// driver fails (e.g. no such GPU), [`MoleError::Unsupported`] for an architecture the
    /// kernels do not target.
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc panics on the first driver call when libcuda cannot be loaded.
        if !driver_present() {
            return Err(MoleError::CudaDriverNotFound { detail: "dlopen of libcuda.so / libcuda.so.1 failed".into() });
        }
        let count = CudaContext::device_count().map_err(cuda_err("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(MoleError::Cuda {
                call: "cuDeviceGet",
                message: format!("no GPU {ordinal}: the driver sees {count}"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuCtxCreate"))?;
        Device::from_context(ctx)
    }

    /// Adopts a context the caller (a framework) already holds, e.g. candle's or its own
    /// `CudaContext::new(ordinal)` (cudarc contexts are the device's primary context, shared by
    /// everyone in the process). Kernels loaded through this device live in that context; the
    /// device's own stream is new, and every layer call takes the caller's stream anyway.
    /// Creating that stream is what cudarc does on any second stream: a context still in
    /// single-stream mode is synchronised once and cudarc's per-slice event tracking turns on.
    pub fn from_context(ctx: Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(cuda_err("cuDeviceGetAttribute"))?;
        let arch = Arch::from_compute_capability(major, minor)?;
        let name = ctx.name().map_err(cuda_err("cuDeviceGetName"))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("cuDeviceGetAttribute"))?;
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        Ok(Device {
            ordinal: ctx.ordinal(),
            ctx,
            stream,
            name,
            compute_capability: (major, minor),
            arch,
            sm_count: sm_count.max(0) as u32,
            disk: DiskCache::from_env(),
            use_nvrtc: nvrtc_targets(arch),
            modules: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Uses `cache` (or none) for compiled kernels instead of the environment's.
    pub fn with_disk_cache(mut self, cache: Option<DiskCache>) -> Self {
        self.disk = cache;
        self
    }

    /// Loads only the shipped PTX from now on, as on a machine without NVRTC (to exercise that
    /// path where NVRTC is installed).
    pub fn without_nvrtc(mut self) -> Self {
        self.use_nvrtc = false;
        self
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The architecture kernels are compiled for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream kernels are launched on (not the legacy default stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Checks that `bytes` of device memory are free for `what` before allocating them.
    pub fn check_memory(&self, what: &str, bytes: u64) -> Result<()> {
        let (free, _total) = self.ctx.mem_get_info().map_err(cuda_err("cuMemGetInfo"))?;
        if bytes > free as u64 {
            return Err(MoleError::OutOfMemory {
                what: what.to_string(),
                needed: bytes,
                available: free as u64,
                memory: "device",
            });
        }
        Ok(())
    }

    /// Makes the device's context current on the calling thread (launches need it).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))
    }

    /// Runs `f`, then makes the calling thread's current CUDA context the one that was current
    /// before (or none), even when `f` fails or panics. mole's CUDA calls (cudarc's) make the
    /// device's context current and leave it so; a caller on the CUDA runtime (a C++ engine,
    /// PyTorch), whose current device follows the current context, would otherwise find its
    /// device changed after a call on another GPU. The C and Python bindings run every call
    /// that touches a GPU through this. Without a driver, or when the current context cannot be
    /// read, just `f`.
    pub fn restoring_current<R>(f: impl FnOnce() -> R) -> R {
        use cudarc::driver::sys;
        struct Restore(sys::CUcontext);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: the context was current on entry and the caller keeps it alive for the
                // call (null: none was); setting it touches only this thread's binding.
                let _ = unsafe { sys::cuCtxSetCurrent(self.0) };
            }
        }
        if !driver_present() {
            return f();
        }
        let mut saved: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes the calling thread's current context (or null) into a local. Before the
        // driver is initialised the read fails: initialise it (what `f` would do first), read again.
        let read = unsafe {
            match sys::cuCtxGetCurrent(&mut saved) {
                sys::CUresult::CUDA_ERROR_NOT_INITIALIZED if sys::cuInit(0) == sys::CUresult::CUDA_SUCCESS => {
                    sys::cuCtxGetCurrent(&mut saved)
                }
                read => read,
            }
        };
        let _restore = (read == sys::CUresult::CUDA_SUCCESS).then_some(Restore(saved));
        f()
    }

    /// The disk cache in use, if any.
    pub fn disk_cache(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }

    /// The module of `source`, loaded once per device and unit.
    pub fn module(&self, source: &dyn ModuleSource) -> Result<Arc<CudaModule>> {
        let unit = source.unit()?;
        let code_source = if self.use_nvrtc {
            CodeSource::Cubin(CacheKey::for_cubin(&unit, self.arch)?)
        } else {
            CodeSource::ShippedPtx
        };
        let memo = code_source.memo_key(&unit);
        // A poisoned lock only means another thread panicked while inserting; the map is
        // still a valid map of loaded modules.
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = modules.get(&memo) {
            return Ok(module.clone());
        }
        let code = match code_source {
            CodeSource::Cubin(_) => Ptx::from_binary(cubin_cached(&unit, self.arch, self.disk.as_ref())?.0),
            CodeSource::ShippedPtx => Ptx::from_src(source.shipped_ptx()?),
        };
        let module = self.ctx.load_module(code).map_err(cuda_err("cuModuleLoadData"))?;
        modules.insert(memo, module.clone());
        Ok(module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm_100_compiles_only_with_an_nvrtc_that_knows_it() {
        use crate::cuda::nvrtc_present;
        assert_eq!(nvrtc_targets(Arch::Sm90), nvrtc_present());
        let new_enough = nvrtc_version().is_ok_and(|v| v >= (12, 8));
        assert_eq!(nvrtc_targets(Arch::Sm100), new_enough);
    }

    #[test]
    fn no_driver_is_a_typed_error() {
        match Device::new(0) {
            Err(MoleError::CudaDriverNotFound { .. }) => assert!(!driver_present()),
            // With a driver: either a GPU that opens, or a typed driver/architecture error.
            Ok(dev) => assert!(driver_present() && dev.sm_count() > 0),
            Err(e) => {
                assert!(driver_present() && matches!(e, MoleError::Cuda { .. } | MoleError::Unsupported(_)), "{e}")
            }
        }
        if driver_present() {
            assert!(matches!(Device::new(usize::MAX), Err(MoleError::Cuda { .. })));
        }
    }

    #[test]
    fn module_sources_have_distinct_memo_keys() {
        let unit = |stages: u32| CompileUnit {
            file: "sgmv.cu",
            defines: vec![format!("-DSTAGES={stages}")],
            identity: format!("{{\"stages\":{stages}}}"),
            stem: "sgmv_f32".into(),
            label: "sgmv".into(),
        };
        let key = CacheKey::new(&unit(1), Arch::Sm90, crate::cuda::Output::Cubin, &[], (12, 4), 1);
        let cubin = CodeSource::Cubin(key).memo_key(&unit(1));
        let ptx = CodeSource::ShippedPtx.memo_key(&unit(1));
        assert_ne!(cubin, ptx);
        assert_ne!(ptx, CodeSource::ShippedPtx.memo_key(&unit(2)));
    }
}
