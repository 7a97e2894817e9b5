//! Running a [`WgradPlan`] on bound buffers through any [`Backend`]. A composed backward binds
//! its own tensors under the generic operand names with [`Bindings::aliased`] (for `dA`: `x` as
//! [`Buf::WgradP`], its `dh` workspace as [`Buf::WgradQFloat`], the gradient of `A` as
//! [`Buf::WgradOut`]), one aliasing per gradient, and the same kernels serve them all.
//!
//! [`Buf::WgradP`]: crate::kernels::exec::Buf::WgradP
//! [`Buf::WgradQFloat`]: crate::kernels::exec::Buf::WgradQFloat
//! [`Buf::WgradOut`]: crate::kernels::exec::Buf::WgradOut

use super::{kernel, WgradConfig, WgradPlan};
use crate::kernels::exec::{Backend, Bindings, Launch};
use crate::kernels::KernelBuild;
use crate::{MoleError, Result};

/// One weight gradient: the token splits' partial sums, then their reduction in split order into
/// the output (overwritten). Every buffer the plan takes is checked before the first launch;
/// buffers it does not take are passed as null.
///
/// # Safety
/// As [`Backend::launch`]: every bound address the plan takes holds at least the plan's element
/// count of its [`crate::kernels::exec::Buf`]'s type; the partials workspace and the output
/// overlap no other buffer.
pub unsafe fn run(build: &KernelBuild, plan: &WgradPlan, bindings: &Bindings, backend: &mut dyn Backend) -> Result<()> {
    if WgradConfig::of(build)? != plan.config {
        return Err(MoleError::param("build", build, "is not the build the plan was made for"));
    }
    bindings.check(&plan.lens, "the weight gradient")?;
    let bindings = bindings.only(&plan.lens);
    let mut partial = Launch::pack(&kernel::PARTIAL, plan.partial, &plan.params, &bindings)?;
    let mut reduce = Launch::pack(&kernel::REDUCE, plan.reduce, &plan.params, &bindings)?;
    // SAFETY: the caller's contract; the plan sized every buffer the launches index.
    unsafe { backend.launch(build, &mut partial) }?;
    // SAFETY: as above; the reduction runs after the partials in stream order.
    unsafe { backend.launch(build, &mut reduce) }
}
