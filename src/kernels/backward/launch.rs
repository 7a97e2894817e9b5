//! Running a [`BackwardPlan`] on bound buffers through any [`Backend`].

use super::{kernel, BackwardConfig, BackwardPlan};
use crate::kernels::exec::{Backend, Bindings, Dims, KernelDesc, Launch};
use crate::kernels::KernelBuild;
use crate::{MoleError, Result};

/// Stages 1 to 4 of a backward in stream order ([`super`]): every buffer the plan takes is
/// checked before the first launch; a plan with no tokens launches nothing. Overwrites `dx`,
/// `d_gate_input` and the f32 workspace (`bw_*`), which the weight gradients then read.
///
/// # Safety
/// As [`Backend::launch`]: every bound address the plan takes holds at least the plan's element
/// count of its buffer's type; `rank_offsets` holds the spec's offsets; `ids` holds the forward's
/// selection (ids in `-1..E`, distinct within a token); the outputs and the workspace overlap no
/// other buffer.
pub unsafe fn run(build: &KernelBuild, plan: &BackwardPlan, bindings: &Bindings, backend: &mut dyn Backend) -> Result<()> {
    if BackwardConfig::of(build)? != plan.config {
        return Err(MoleError::param("build", build, "is not the build the plan was made for"));
    }
    bindings.check(&plan.lens, "the layer backward")?;
    let bindings = bindings.only(&plan.lens);
    let steps: [(&'static KernelDesc, Option<Dims>); 6] = [
        (&kernel::TOKEN, plan.token),
        (&kernel::SCORES, plan.scores),
        (&kernel::STATS, plan.stats.map(|s| s.partial)),
        (&kernel::STATS_SUM, plan.stats.map(|s| s.sum)),
        (&kernel::GATE, plan.gate),
        (&kernel::DX, plan.dx),
    ];
    for (desc, dims) in steps {
        let Some(dims) = dims else { continue };
        let mut launch = Launch::pack(desc, dims, &plan.params, &bindings)?;
        // SAFETY: the caller's contract; the bindings were checked against the plan's lengths,
        // and the launches run in stream order (each stage reads what the previous wrote).
        unsafe { backend.launch(build, &mut launch) }?;
    }
    Ok(())
}
