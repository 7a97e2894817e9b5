//! The CPU execution layer as a launch backend: the launches the library packs for the GPU
//! (argument order, null pointers, fallbacks) run unmodified on the host.

use mole::kernels::exec::{Backend, Launch};
use mole::kernels::KernelBuild;
use mole::MoleError;
use mole_hostexec::{Arg, Kernel, LaunchConfig, Schedule};

/// Runs each launch on the CPU under `schedule`; counts them.
pub struct HostBackend {
    /// Thread and block order.
    pub schedule: Schedule,
    /// Launches run.
    pub launches: usize,
    /// Blocks in flight at once (`None`: the schedule's default).
    pub resident_blocks: Option<u32>,
}

impl HostBackend {
    /// Launches in index order.
    pub fn new(schedule: Schedule) -> Self {
        HostBackend { schedule, launches: 0, resident_blocks: None }
    }
}

impl Backend for HostBackend {
    unsafe fn launch(&mut self, build: &KernelBuild, launch: &mut Launch) -> mole::Result<()> {
        // The host layer compiles each source with its defaults: only default builds run here.
        if !build.family().default_builds().contains(build) {
            return Err(MoleError::Unsupported(format!("{build} is not compiled for the CPU (defaults only)")));
        }
        let desc = launch.kernel();
        let name = desc.entry_name(build.dtype);
        let kernel = Kernel::find(desc.family.source_file(), build.dtype.name(), &name)
            .map_err(|e| MoleError::Unsupported(e.to_string()))?;
        let d = launch.dims();
        let mut cfg = LaunchConfig::new(d.grid, d.block).shared(d.shared_bytes).schedule(self.schedule);
        if let Some(n) = self.resident_blocks {
            cfg = cfg.resident_blocks(n);
        }
        let args: Vec<Arg<'_>> = std::iter::once(Arg::bytes(launch.params()))
            .chain(launch.ptrs().iter().map(|&p| Arg::pointer(p)))
            .collect();
        kernel.launch(&cfg, &args).map_err(|e| MoleError::Unsupported(format!("{name}: {e}")))?;
        self.launches += 1;
        Ok(())
    }
}
