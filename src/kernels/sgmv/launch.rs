//! Running a [`SgmvPlan`]: on bound buffers through any [`Backend`] ([`run`]), on typed device
//! slices ([`forward`]) or on caller-owned device pointers and stream ([`forward_raw`]). The last
//! two bind their buffers and call [`run`]: there is one launch path.

use super::{kernel, SgmvConfig, SgmvPlan};
use crate::cuda::Device;
use crate::kernels::exec::{Backend, Bindings, Buf, CudaBackend, Launch, LoadedBuild};
use crate::kernels::{Family, KernelBuild};
use crate::plan::TokenSlot;
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::CudaSlice;

fn check_build(build: &KernelBuild, plan: &SgmvPlan, dtype: DType) -> Result<()> {
    if build.family() != Family::Sgmv {
        return Err(MoleError::param("build", build, "is not an sgmv build"));
    }
    if build.dtype != dtype {
        return Err(MoleError::param("build", build, "its dtype differs from the buffers' element type"));
    }
    if SgmvConfig::of(build)? != plan.config {
        return Err(MoleError::param("build", build, "is not the build the plan was made for"));
    }
    Ok(())
}

/// Runs `plan` (made by [`super::plan`] for `build`) on the buffers of `bindings` through
/// `backend`: the shrink, then one expand per slot in slot order. Everything is checked before the
/// first launch: the build, every buffer the plan takes (present; exact lengths where bound with
/// one), and the launches' argument lists. The tensor-core kernels read `x` (shrink) and `b`
/// (expand) in 16-byte segments: a binding not 16-byte aligned takes the FMA kernel instead.
///
/// # Safety
/// As [`Backend::launch`]: every bound address the plan takes holds at least the plan's element
/// count of its [`Buf`]'s type; `rank_offsets` holds the values `plan` validated;
/// `expert_scales` (where taken) holds one value per expert; the slot plans
/// have non-decreasing offsets with `offsets[s][E] <= entry_stride` and tokens `< T` or padding
/// (what [`super::SlotPlans::build`] and the device grouping produce); `partials` and `y` overlap
/// no other buffer.
pub unsafe fn run(build: &KernelBuild, plan: &SgmvPlan, bindings: &Bindings, backend: &mut dyn Backend) -> Result<()> {
    check_build(build, plan, build.dtype)?;
    bindings.check(&plan.lens, "the sgmv kernels")?;
    // SAFETY: the caller's contract.
    unsafe {
        run_shrink(build, plan, bindings, backend)?;
        run_expands(build, plan, bindings, backend)
    }
}

/// The shrink of [`run`] alone (`h_part` from `x` and `A`): the buffers its kernel takes are
/// checked, the others ignored. For a composed forward that consumes `h_part` itself.
///
/// # Safety
/// [`run`]'s contract for the buffers the shrink takes.
pub unsafe fn run_shrink(
    build: &KernelBuild,
    plan: &SgmvPlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_build(build, plan, build.dtype)?;
    let Some(mut shrink) = plan.shrink else { return Ok(()) };
    if std::ptr::eq(shrink.kernel, &kernel::SHRINK_MMA) && !bindings.ptr(Buf::X).is_multiple_of(16) {
        shrink.kernel = &kernel::SHRINK;
    }
    let lens = plan.lens.for_kernel(shrink.kernel);
    bindings.check(&lens, "the sgmv shrink")?;
    let mut launch = Launch::pack(shrink.kernel, shrink.dims(), &plan.params, &bindings.only(&lens))?;
    // SAFETY: the caller's contract; the launch was packed from checked bindings.
    unsafe { backend.launch(build, &mut launch) }
}

/// The expands of [`run`] alone, one per slot in slot order, from a `h_part` already written
/// (`plan.params.splits` slices): the buffers the expand takes are checked, the others ignored.
///
/// # Safety
/// [`run`]'s contract for the buffers the expand takes; `h_part` holds every slice of every
/// planned `(token, slot)` row.
pub unsafe fn run_expands(
    build: &KernelBuild,
    plan: &SgmvPlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_build(build, plan, build.dtype)?;
    let mut plan = std::borrow::Cow::Borrowed(plan);
    if plan.expand.is_some_and(|e| std::ptr::eq(e.kernel, &kernel::EXPAND_MMA))
        && !bindings.ptr(Buf::B).is_multiple_of(16)
    {
        plan = std::borrow::Cow::Owned(plan.into_owned().with_fma_expand());
    }
    let Some(expand) = plan.expand else { return Ok(()) };
    let lens = plan.lens.for_kernel(expand.kernel);
    bindings.check(&lens, "the sgmv expand")?;
    let bindings = bindings.only(&lens);
    for s in 0..plan.params.slots as usize {
        let mut pass = Launch::pack(expand.kernel, expand.dims(), &plan.expand_params(s), &bindings)?;
        // SAFETY: the caller's contract; passes run in stream order.
        unsafe { backend.launch(build, &mut pass) }?;
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
    /// `expert_scales [E]` (f32), when the plan takes them ([`super::SgmvShape::expert_scales`]).
    pub expert_scales: Option<&'a CudaSlice<f32>>,
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

/// [`run`] on typed device buffers, on the device's stream.
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
    let stream = device.stream();
    let mut b = crate::kernels::exec::TypedBindings::new(stream, T::DTYPE);
    b.input(Buf::X, bufs.x)
        .input(Buf::A, bufs.a)
        .input(Buf::B, bufs.b)
        .input(Buf::RankOffsets, bufs.rank_offsets)
        .input_opt(Buf::ExpertScales, bufs.expert_scales)
        .input(Buf::PlanOffsets, bufs.plan_offsets)
        .input(Buf::PlanEntries, bufs.plan_entries)
        .input(Buf::RouteWeights, bufs.weights)
        .output(Buf::Partials, bufs.h_part)
        .output(Buf::Y, bufs.y);
    // SAFETY: every address comes from a live slice of the device's context with its length
    // bound (checked against the plan by `run`); `h_part` and `y` are distinct `&mut` borrows;
    // the guards in `b` keep each slice's stream ordering until the launches are enqueued.
    unsafe { run_on_device(device, build, plan, b.bindings()?, stream.cu_stream()) }
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
    /// `expert_scales [E]` (f32; 0 when the plan takes none).
    pub expert_scales: CUdeviceptr,
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

/// [`run`] on caller-owned device memory and stream; `build`'s dtype is the element type of
/// `x`, `a`, `b` and `y`.
///
/// # Safety
/// [`run`]'s contract for these pointers, which belong to the device's context; `stream` is a
/// live stream of that context (or null for the legacy default stream), and the buffers stay
/// alive and untouched by other work until the kernels have finished.
pub unsafe fn forward_raw(
    device: &Device,
    build: &KernelBuild,
    plan: &SgmvPlan,
    ptrs: RawSgmvPointers,
    stream: CUstream,
) -> Result<()> {
    let mut b = Bindings::new();
    b.raw(Buf::X, ptrs.x)
        .raw(Buf::A, ptrs.a)
        .raw(Buf::B, ptrs.b)
        .raw(Buf::RankOffsets, ptrs.rank_offsets)
        .raw(Buf::ExpertScales, ptrs.expert_scales)
        .raw(Buf::PlanOffsets, ptrs.plan_offsets)
        .raw(Buf::PlanEntries, ptrs.plan_entries)
        .raw(Buf::RouteWeights, ptrs.weights)
        .raw(Buf::Partials, ptrs.h_part)
        .raw(Buf::Y, ptrs.y);
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_on_device(device, build, plan, &b, stream) }
}

/// [`run`] on `device` with `build` loaded, on `stream`.
///
/// # Safety
/// [`run`]'s contract, with the addresses in `device`'s context and `stream` one of its streams.
unsafe fn run_on_device(
    device: &Device,
    build: &KernelBuild,
    plan: &SgmvPlan,
    bindings: &Bindings,
    stream: CUstream,
) -> Result<()> {
    let loaded = LoadedBuild::load(device, build, build.kernels())?;
    device.bind()?;
    // SAFETY: forwarded from the caller's contract.
    unsafe { run(build, plan, bindings, &mut CudaBackend::new(&[&loaded], stream)) }
}
