//! Typed launches of the SGMV kernels on a [`Device`], and a raw-pointer variant for frameworks
//! that own their buffers. Every buffer length is checked against the [`SgmvPlan`] first.

use super::{entry_name, SgmvLaunch, SgmvPlan};
use crate::cuda::cuda_err;
use crate::cuda::Device;
use crate::kernels::{Family, KernelBuild};
use crate::plan::TokenSlot;
use crate::{KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, PushKernelArg};
use std::ffi::c_void;

fn check(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(MoleError::ShapeMismatch { what, expected: vec![expected], got });
    }
    Ok(())
}

fn check_build(build: &KernelBuild, plan: &SgmvPlan, dtype: crate::DType) -> Result<()> {
    if build.family() != Family::Sgmv {
        return Err(MoleError::param("build", build, "is not an sgmv build"));
    }
    if build.dtype != dtype {
        return Err(MoleError::param("build", build, "its dtype differs from the buffers' element type"));
    }
    if super::SgmvConfig::of(build)? != plan.config {
        return Err(MoleError::param("build", build, "is not the build the plan was made for"));
    }
    Ok(())
}

/// The device buffers of a forward (lengths as [`SgmvPlan::lens`]).
pub struct SgmvBuffers<'a, T> {
    /// `x [T, d_in]`.
    pub x: &'a CudaSlice<T>,
    /// `A [d_in, R]`.
    pub a: &'a CudaSlice<T>,
    /// `B [R, d_out]`.
    pub b: &'a CudaSlice<T>,
    /// `rank_offsets [E + 1]`: the same values `plan` validated.
    pub rank_offsets: &'a CudaSlice<u32>,
    /// Slot plans' offsets `[slots, E + 1]` (see [`super::SlotPlans`]).
    pub plan_offsets: &'a CudaSlice<u32>,
    /// Slot plans' entries `[slots, entry_stride]`.
    pub plan_entries: &'a CudaSlice<TokenSlot>,
    /// Routing weights `[T, slots]`.
    pub weights: &'a CudaSlice<f32>,
    /// Workspace `[splits, T·slots, r_max]`, need not be initialised.
    pub h_part: &'a mut CudaSlice<f32>,
    /// `y [T, d_out]`, updated in place.
    pub y: &'a mut CudaSlice<T>,
}

/// Runs `plan` (made by [`super::plan`] for `build`) on the device's stream: the shrink, then one
/// expand per slot in slot order.
///
/// The plans in `plan_offsets` / `plan_entries` must be per-slot routing plans padded to the
/// build's `bm` with non-decreasing offsets and every `offsets[s][E] <= entry_stride` (what
/// [`super::SlotPlans::build`] produces). The kernels trust the offsets (they index
/// `plan_entries`); entries naming a token outside `0..T` are skipped.
pub fn forward<T: KernelElement>(
    device: &Device,
    build: &KernelBuild,
    plan: &SgmvPlan,
    bufs: SgmvBuffers<'_, T>,
) -> Result<()> {
    check_build(build, plan, T::DTYPE)?;
    let l = plan.lens;
    check("x", bufs.x.len(), l.x)?;
    check("a", bufs.a.len(), l.a)?;
    check("b", bufs.b.len(), l.b)?;
    check("rank_offsets", bufs.rank_offsets.len(), l.rank_offsets)?;
    check("plan_offsets", bufs.plan_offsets.len(), l.plan_offsets)?;
    check("plan_entries", bufs.plan_entries.len(), l.plan_entries)?;
    check("weights", bufs.weights.len(), l.weights)?;
    check("h_part", bufs.h_part.len(), l.h_part)?;
    check("y", bufs.y.len(), l.y)?;
    let (Some(shrink), Some(expand)) = (plan.shrink, plan.expand) else { return Ok(()) };
    let stream = device.stream();
    let f = device.function(build, &entry_name(shrink.entry, build.dtype))?;
    let mut args = stream.launch_builder(&f);
    args.arg(&plan.params).arg(bufs.x).arg(bufs.a).arg(bufs.rank_offsets).arg(bufs.plan_offsets);
    args.arg(bufs.plan_entries).arg(&mut *bufs.h_part);
    // SAFETY: the arguments match `sgmv_shrink`'s signature in sgmv.cu, and every buffer's length
    // was checked against the plan, whose parameters bound every access.
    unsafe { args.launch(shrink.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
    let f = device.function(build, &entry_name(expand.entry, build.dtype))?;
    for s in 0..plan.params.slots as usize {
        let params = plan.expand_params(s);
        let mut args = stream.launch_builder(&f);
        args.arg(&params).arg(&*bufs.h_part).arg(bufs.b).arg(bufs.rank_offsets).arg(bufs.plan_offsets);
        args.arg(bufs.plan_entries).arg(bufs.weights).arg(&mut *bufs.y);
        // SAFETY: as above, for `sgmv_expand`; passes run in stream order.
        unsafe { args.launch(expand.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
    }
    Ok(())
}

/// Device pointers of a forward (element types and counts as [`SgmvPlan::lens`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawSgmvPointers {
    /// `x [T, d_in]` (build dtype).
    pub x: CUdeviceptr,
    /// `A [d_in, R]` (build dtype).
    pub a: CUdeviceptr,
    /// `B [R, d_out]` (build dtype).
    pub b: CUdeviceptr,
    /// `rank_offsets [E + 1]` (u32).
    pub rank_offsets: CUdeviceptr,
    /// `plan_offsets [slots, E + 1]` (u32).
    pub plan_offsets: CUdeviceptr,
    /// `plan_entries [slots, entry_stride]` ([`TokenSlot`]).
    pub plan_entries: CUdeviceptr,
    /// `weights [T, slots]` (f32).
    pub weights: CUdeviceptr,
    /// `h_part [splits, T·slots, r_max]` (f32 workspace).
    pub h_part: CUdeviceptr,
    /// `y [T, d_out]` (build dtype), updated in place.
    pub y: CUdeviceptr,
}

/// Launches `launch` of `build` with raw kernel arguments on `stream`.
///
/// # Safety
/// `args` must point to live values matching the kernel's parameter list, and every pointer among
/// them must satisfy [`forward_raw`]'s contract.
unsafe fn launch_raw(
    device: &Device,
    build: &KernelBuild,
    launch: &SgmvLaunch,
    stream: CUstream,
    args: &mut [*mut c_void],
) -> Result<()> {
    let func = device.function(build, &entry_name(launch.entry, build.dtype))?;
    // SAFETY: forwarded from the caller's contract (arguments, pointers, stream).
    unsafe { device.launch_raw(&func, launch.config(), stream, args) }
}

/// [`forward`] on caller-owned device memory and stream; `build`'s dtype is the element type of
/// `x`, `a`, `b` and `y`.
///
/// # Safety
/// - every pointer is a device allocation of the device's context holding at least the element
///   count of [`SgmvPlan::lens`] (`x`, `a`, `b`, `y`: the build's dtype; `rank_offsets`,
///   `plan_offsets`: u32; `plan_entries`: [`TokenSlot`]; `weights`, `h_part`: f32);
/// - `rank_offsets` holds the values `plan` validated; the slot plans satisfy [`forward`]'s
///   contract (`offsets[s][E] <= entry_stride`, tokens `< T` or padding);
/// - `h_part` and `y` overlap no other buffer;
/// - `stream` is a live stream of the device's context (or null for the legacy default stream),
///   and the buffers stay alive and untouched by other work until the kernels have finished.
pub unsafe fn forward_raw(
    device: &Device,
    build: &KernelBuild,
    plan: &SgmvPlan,
    ptrs: RawSgmvPointers,
    stream: CUstream,
) -> Result<()> {
    check_build(build, plan, build.dtype)?;
    let fields = [
        ("x", ptrs.x),
        ("a", ptrs.a),
        ("b", ptrs.b),
        ("rank_offsets", ptrs.rank_offsets),
        ("plan_offsets", ptrs.plan_offsets),
        ("plan_entries", ptrs.plan_entries),
        ("weights", ptrs.weights),
        ("h_part", ptrs.h_part),
        ("y", ptrs.y),
    ];
    if let Some((name, _)) = fields.iter().find(|(_, p)| *p == 0) {
        return Err(MoleError::MissingInput { name, needed_by: "the sgmv kernels" });
    }
    let (Some(mut shrink), Some(mut expand)) = (plan.shrink, plan.expand) else { return Ok(()) };
    // The tensor-core shrink reads x in 16-byte segments; a misaligned view takes the FMA path.
    if shrink.entry == super::entry::SHRINK_MMA && !ptrs.x.is_multiple_of(16) {
        shrink.entry = super::entry::SHRINK;
    }
    // The tensor-core expand reads b in 16-byte segments; likewise (with the FMA expand's grid).
    if expand.entry == super::entry::EXPAND_MMA && !ptrs.b.is_multiple_of(16) {
        expand = super::expand_launch(plan.config, expand.grid.0, plan.params.d_out, false);
    }
    let mut params = plan.params;
    let mut p = [ptrs.x, ptrs.a, ptrs.rank_offsets, ptrs.plan_offsets, ptrs.plan_entries, ptrs.h_part];
    let mut args: Vec<*mut c_void> = std::iter::once(&mut params as *mut _ as *mut c_void)
        .chain(p.iter_mut().map(|v| v as *mut CUdeviceptr as *mut c_void))
        .collect();
    // SAFETY: `args` point to the params and six pointers of `sgmv_shrink`, alive for the call;
    // the pointers satisfy this function's contract.
    unsafe { launch_raw(device, build, &shrink, stream, &mut args) }?;
    for s in 0..plan.params.slots as usize {
        let mut params = plan.expand_params(s);
        let mut p =
            [ptrs.h_part, ptrs.b, ptrs.rank_offsets, ptrs.plan_offsets, ptrs.plan_entries, ptrs.weights, ptrs.y];
        let mut args: Vec<*mut c_void> = std::iter::once(&mut params as *mut _ as *mut c_void)
            .chain(p.iter_mut().map(|v| v as *mut CUdeviceptr as *mut c_void))
            .collect();
        // SAFETY: as above, for `sgmv_expand`'s params and seven pointers.
        unsafe { launch_raw(device, build, &expand, stream, &mut args) }?;
    }
    Ok(())
}
