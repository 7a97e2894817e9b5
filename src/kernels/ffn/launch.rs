//! Running an [`FfnPlan`] on bound buffers through any [`Backend`]: the activation half
//! ([`run_activation`]) before the caller's dense `y = a_mix·W_down`, the down-LoRA half
//! ([`run_down_delta`]) after it. The SGMV launches take the block's banks through
//! [`Bindings::aliased`]: one launch path for both families.

use super::{kernel, FfnConfig, FfnPlan};
use crate::kernels::exec::{Backend, Bindings, Buf, Launch};
use crate::kernels::{sgmv, KernelBuild};
use crate::{MoleError, Result};

/// The gate bank as the SGMV shrink's `a`.
const GATE: [(Buf, Buf); 3] = [(Buf::A, Buf::GateA), (Buf::RankOffsets, Buf::GateRankOffsets), (Buf::Partials, Buf::GatePartials)];
/// The up bank as the SGMV shrink's `a`.
const UP: [(Buf, Buf); 3] = [(Buf::A, Buf::UpA), (Buf::RankOffsets, Buf::UpRankOffsets), (Buf::Partials, Buf::UpPartials)];
/// The down bank as the SGMV expand's `b`.
const DOWN: [(Buf, Buf); 3] = [(Buf::B, Buf::DownB), (Buf::RankOffsets, Buf::DownRankOffsets), (Buf::Partials, Buf::DownPartials)];

fn check_builds(sgmv_build: &KernelBuild, ffn_build: &KernelBuild, plan: &FfnPlan) -> Result<()> {
    if FfnConfig::of(ffn_build)? != plan.config {
        return Err(MoleError::param("ffn_build", ffn_build, "is not the build the plan was made for"));
    }
    if sgmv_build.dtype != ffn_build.dtype {
        return Err(MoleError::param("sgmv_build", sgmv_build, "its dtype differs from the ffn build's"));
    }
    Ok(())
}

/// The buffers of the block's first half: everything but `down_b` and `y`.
fn activation_lens(plan: &FfnPlan) -> crate::kernels::exec::BufLens {
    let mut lens = plan.lens;
    lens.set(Buf::DownB, 0);
    lens.set(Buf::Y, 0);
    lens
}

/// The first half of a forward: the gate and up shrinks, `a_mix = 0`, then one act pass per slot
/// in slot order, leaving `a_mix [T, f]` for the caller's base down projection and the down
/// partials for [`run_down_delta`]. Every buffer it takes is checked before the first launch.
///
/// # Safety
/// As [`Backend::launch`]: every bound address the plan takes holds at least the plan's element
/// count of its [`Buf`]'s type; the rank offsets hold the values `plan` validated; the slot plans
/// are padded to the builds' `bm` with non-decreasing offsets, `offsets[s][E] <= entry_stride`,
/// and tokens `< T` or padding; the workspaces and `a_mix` overlap no other buffer.
pub unsafe fn run_activation(
    sgmv_build: &KernelBuild,
    ffn_build: &KernelBuild,
    plan: &FfnPlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_builds(sgmv_build, ffn_build, plan)?;
    let lens = activation_lens(plan);
    bindings.check(&lens, "the FFN block")?;
    let bindings = bindings.only(&lens);
    for (shrink, aliases) in [(&plan.gate, GATE), (&plan.up, UP)] {
        if let Some(p) = shrink {
            // SAFETY: the caller's contract, for the bank bound in place of `a`.
            unsafe { sgmv::run_shrink(sgmv_build, p, &bindings.aliased(&aliases), backend) }?;
        }
    }
    if let Some(dims) = plan.clear {
        let mut clear = Launch::pack(&kernel::CLEAR, dims, &plan.params, &bindings)?;
        // SAFETY: as above; `a_mix` holds T·f elements.
        unsafe { backend.launch(ffn_build, &mut clear) }?;
    }
    let Some(dims) = plan.act else { return Ok(()) };
    for s in 0..plan.params.slots as usize {
        let mut pass = Launch::pack(&kernel::ACT, dims, &plan.act_params(s), &bindings)?;
        // SAFETY: as above; passes run in stream order.
        unsafe { backend.launch(ffn_build, &mut pass) }?;
    }
    Ok(())
}

/// The second half: `y += s_d · w · h_d · B^d` per slot in slot order, from the down partials
/// [`run_activation`] wrote, on a `y` that holds the base down projection `a_mix·W_down`. A
/// no-op without a down bank.
///
/// # Safety
/// [`run_activation`]'s contract for `down_b`, `down_rank_offsets`, `down_partials` (written by
/// the first half of the same call), the plans, the routing weights and `y`.
pub unsafe fn run_down_delta(
    sgmv_build: &KernelBuild,
    ffn_build: &KernelBuild,
    plan: &FfnPlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_builds(sgmv_build, ffn_build, plan)?;
    let Some(down) = &plan.down else { return Ok(()) };
    // SAFETY: the caller's contract, for the down bank bound in place of `b`.
    unsafe { sgmv::run_expands(sgmv_build, down, &bindings.aliased(&DOWN), backend) }
}
