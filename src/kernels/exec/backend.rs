//! Where packed launches go: a CUDA stream ([`CudaBackend`]), or a recorder for tests and for
//! measuring the host side alone ([`Recorder`]). The CPU execution layer of the test suite is one
//! more backend.

use super::bind::Launch;
use super::desc::KernelDesc;
use crate::cuda::{cuda_err, Device};
use crate::kernels::KernelBuild;
use crate::{MoleError, Result};
use cudarc::driver::sys::CUstream;
use cudarc::driver::CudaFunction;

/// Runs launches.
pub trait Backend {
    /// Enqueues `launch`, a kernel of `build`.
    ///
    /// # Safety
    /// Every non-null pointer of `launch` is valid for the accesses its kernel makes under its
    /// parameters, with the element type its [`super::Buf`] names, and outputs overlap no other
    /// argument. Launches made by the families' planning functions from checked
    /// [`super::Bindings`] meet this when the bound addresses hold the lengths bound (or promised).
    unsafe fn launch(&mut self, build: &KernelBuild, launch: &mut Launch) -> Result<()>;
}

/// A build loaded on a device, with every entry point resolved once.
#[derive(Debug)]
pub struct LoadedBuild {
    build: KernelBuild,
    functions: Vec<(&'static KernelDesc, CudaFunction)>,
}

impl LoadedBuild {
    /// Loads `build` on `device` (compiling it or reading the disk cache on first use) and
    /// resolves its entry points `kernels`.
    pub fn load(device: &Device, build: &KernelBuild, kernels: &[&'static KernelDesc]) -> Result<Self> {
        let module = device.module(build)?;
        let functions = kernels
            .iter()
            .map(|&k| {
                let f = module.load_function(&k.entry_name(build.dtype)).map_err(cuda_err("cuModuleGetFunction"))?;
                Ok((k, f))
            })
            .collect::<Result<_>>()?;
        Ok(LoadedBuild { build: build.clone(), functions })
    }

    /// The build.
    pub fn build(&self) -> &KernelBuild {
        &self.build
    }

    fn function(&self, kernel: &'static KernelDesc) -> Option<&CudaFunction> {
        self.functions.iter().find(|(k, _)| std::ptr::eq(*k, kernel)).map(|(_, f)| f)
    }
}

/// Launches on a CUDA stream, with functions from a set of loaded builds.
pub struct CudaBackend<'a> {
    builds: &'a [&'a LoadedBuild],
    stream: CUstream,
}

impl<'a> CudaBackend<'a> {
    /// Launches on `stream` (null: the legacy default stream) with the functions of `builds`.
    /// The builds' context must be current on the calling thread.
    pub fn new(builds: &'a [&'a LoadedBuild], stream: CUstream) -> Self {
        CudaBackend { builds, stream }
    }
}

impl Backend for CudaBackend<'_> {
    unsafe fn launch(&mut self, build: &KernelBuild, launch: &mut Launch) -> Result<()> {
        let kernel = launch.kernel();
        let func = self
            .builds
            .iter()
            .find(|b| b.build == *build)
            .and_then(|b| b.function(kernel))
            .ok_or_else(|| MoleError::Unsupported(format!("kernel {} is not loaded for {build}", kernel.name)))?;
        let dims = launch.dims();
        let (mut args, n) = launch.arg_pointers();
        // SAFETY: `args[..n]` point at the parameter struct and the pointer slots of `launch`,
        // alive for the call, in the order the kernel declares (its description); the pointers
        // themselves are the caller's contract; `func` belongs to the current context.
        unsafe {
            cudarc::driver::result::launch_kernel(
                func.cu_function(),
                dims.grid,
                (dims.block, 1, 1),
                dims.shared_bytes,
                self.stream,
                &mut args[..n],
            )
        }
        .map_err(cuda_err("cuLaunchKernel"))
    }
}

/// Keeps every launch instead of running it: for tests of the launch path and for timing the
/// host work of a call on its own.
#[derive(Debug, Default)]
pub struct Recorder {
    /// The launches, in order, with their builds.
    pub launches: Vec<(KernelBuild, Launch)>,
    /// Count launches only (no copies kept): the host-cost measurement.
    pub count_only: bool,
    /// Launches seen.
    pub count: usize,
}

impl Backend for Recorder {
    unsafe fn launch(&mut self, build: &KernelBuild, launch: &mut Launch) -> Result<()> {
        self.count += 1;
        if !self.count_only {
            self.launches.push((build.clone(), *launch));
        }
        Ok(())
    }
}
