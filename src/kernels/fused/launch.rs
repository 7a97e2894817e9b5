//! Running a [`FusedPlan`]: on bound buffers through any [`Backend`] ([`run`]), on typed device
//! slices ([`forward`]) or on caller-owned device pointers and stream ([`forward_raw`]). The last
//! two bind their buffers and call [`run`]: there is one launch path.

use super::{FusedConfig, FusedPlan};
use crate::cuda::Device;
use crate::kernels::exec::{Backend, Bindings, Buf, CudaBackend, Dims, Launch, LoadedBuild, TypedBindings};
use crate::kernels::{gating, Family, KernelBuild};
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::CudaSlice;

/// The device buffers of a call; `None` where the plan takes none (see [`FusedPlan::lens`]).
pub struct FusedBuffers<'a, T> {
    /// `x [T, d_in]`.
    pub x: Option<&'a CudaSlice<T>>,
    /// `A [d_in, R]`.
    pub a: Option<&'a CudaSlice<T>>,
    /// `B [R, d_out]`.
    pub b: Option<&'a CudaSlice<T>>,
    /// `y [T, d_out]`, updated in place.
    pub y: Option<&'a mut CudaSlice<T>>,
    /// `router_weight`.
    pub router_weight: Option<&'a CudaSlice<T>>,
    /// `router_bias [E]`.
    pub router_bias: Option<&'a CudaSlice<T>>,
    /// `logits` or given `weights` `[T, E]`.
    pub gate_in: Option<&'a CudaSlice<T>>,
    /// `adapter_ids [T]`.
    pub adapter_ids: Option<&'a CudaSlice<i32>>,
    /// `selection_bias [E]`.
    pub selection_bias: Option<&'a CudaSlice<T>>,
    /// `rank_offsets [E + 1]`: the values of the spec the plan was made for.
    pub rank_offsets: Option<&'a CudaSlice<u32>>,
    /// `expert_scales [bank experts]`: the spec's per-expert scales, in f32.
    pub expert_scales: Option<&'a CudaSlice<f32>>,
    /// `cores [C, R, R]`.
    pub cores: Option<&'a CudaSlice<T>>,
    /// Output `ids [T, slots]`.
    pub ids: Option<&'a mut CudaSlice<i32>>,
    /// Output `weights [T, slots]`.
    pub weights: Option<&'a mut CudaSlice<f32>>,
    /// Output `probs [T, E]`.
    pub probs: Option<&'a mut CudaSlice<f32>>,
    /// Statistics workspace (need not be initialised).
    pub stats_ws: Option<&'a mut CudaSlice<u32>>,
    /// Statistics output `[4E + 2]`.
    pub stats_out: Option<&'a mut CudaSlice<f32>>,
    /// Split workspace (need not be initialised).
    pub hz_part: Option<&'a mut CudaSlice<f32>>,
}

impl<T> Default for FusedBuffers<'_, T> {
    fn default() -> Self {
        FusedBuffers {
            x: None,
            a: None,
            b: None,
            y: None,
            router_weight: None,
            router_bias: None,
            gate_in: None,
            adapter_ids: None,
            selection_bias: None,
            rank_offsets: None,
            expert_scales: None,
            cores: None,
            ids: None,
            weights: None,
            probs: None,
            stats_ws: None,
            stats_out: None,
            hz_part: None,
        }
    }
}

/// Device pointers of a call (0 where the plan takes no buffer; element types as the [`Buf`]s of
/// [`FusedPlan::lens`]:
/// the build's dtype for tensors, i32 for ids, u32 for offsets and the statistics workspace, f32
/// for weights, probabilities, statistics and the split workspace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawFusedPointers {
    /// `x`.
    pub x: CUdeviceptr,
    /// `A`.
    pub a: CUdeviceptr,
    /// `B`.
    pub b: CUdeviceptr,
    /// `y`.
    pub y: CUdeviceptr,
    /// `router_weight`.
    pub router_weight: CUdeviceptr,
    /// `router_bias`.
    pub router_bias: CUdeviceptr,
    /// `logits` or given `weights`.
    pub gate_in: CUdeviceptr,
    /// `adapter_ids`.
    pub adapter_ids: CUdeviceptr,
    /// `selection_bias`.
    pub selection_bias: CUdeviceptr,
    /// `rank_offsets`.
    pub rank_offsets: CUdeviceptr,
    /// `expert_scales` (f32).
    pub expert_scales: CUdeviceptr,
    /// `cores`.
    pub cores: CUdeviceptr,
    /// Output `ids`.
    pub ids: CUdeviceptr,
    /// Output `weights`.
    pub weights: CUdeviceptr,
    /// Output `probs`.
    pub probs: CUdeviceptr,
    /// Statistics workspace.
    pub stats_ws: CUdeviceptr,
    /// Statistics output.
    pub stats_out: CUdeviceptr,
    /// Split workspace.
    pub hz_part: CUdeviceptr,
}

fn check_build(build: &KernelBuild, plan: &FusedPlan, dtype: DType) -> Result<()> {
    if build.family() != Family::Fused {
        return Err(MoleError::param("build", build, "is not a fused build"));
    }
    if build.dtype != dtype {
        return Err(MoleError::param("build", build, "its dtype differs from the buffers' element type"));
    }
    if FusedConfig::of(build)? != plan.config {
        return Err(MoleError::param("build", build, "is not the build the plan was made for"));
    }
    Ok(())
}

/// The build whose `gating_stats_finalize` sums a `dtype` plan's statistics rows: the gating
/// family's default build of that dtype. A backend running a plan with statistics needs it too.
pub fn stats_build(dtype: DType) -> Result<KernelBuild> {
    gating::default_builds()
        .into_iter()
        .find(|b| b.dtype == dtype)
        .ok_or_else(|| MoleError::Unsupported(format!("no gating build for {dtype}")))
}

/// Runs `plan` (made by [`super::plan`] or [`super::plan_route_only`] for `build`) on the
/// buffers of `bindings` through `backend`: the plan's launches in order, then, when the plan has
/// statistics, their final sum (`gating_stats_finalize` of [`stats_build`]). Everything is checked
/// before the first launch: the build, every buffer the plan takes (present; exact lengths, or at
/// least for the workspaces, where bound with one), and every launch's argument list. Buffers
/// the plan does not take are passed as null. The tensor-core kernel reads `x` and `b` in 16-byte
/// segments: bindings of either not 16-byte aligned take the FMA kernel instead.
///
/// # Safety
/// As [`Backend::launch`]: every bound address the plan takes holds at least the plan's element
/// count of its [`Buf`]'s type; `rank_offsets` holds the offsets of the spec the plan was made
/// for, `expert_scales` (where the plan takes them) one finite value per bank expert
/// (`adapter_ids` may hold any value: ids outside `0..E` contribute nothing); `y`, the outputs
/// and the workspaces overlap no other buffer.
pub unsafe fn run(build: &KernelBuild, plan: &FusedPlan, bindings: &Bindings, backend: &mut dyn Backend) -> Result<()> {
    check_build(build, plan, build.dtype)?;
    bindings.check(&plan.lens, "the fused layer kernels")?;
    let mut plan = std::borrow::Cow::Borrowed(plan);
    if plan.uses_tensor_cores()
        && (!bindings.ptr(Buf::X).is_multiple_of(16) || !bindings.ptr(Buf::B).is_multiple_of(16))
    {
        plan = std::borrow::Cow::Owned(plan.into_owned().without_tensor_cores());
    }
    let bindings = bindings.only(&plan.lens);
    let mut launches = plan
        .launches
        .iter()
        .map(|l| Launch::pack(l.kernel, l.dims(), &plan.params, &bindings))
        .collect::<Result<Vec<_>>>()?;
    let finalize = match &plan.stats {
        Some(stats) => {
            let f = stats.finalize;
            let dims = Dims { grid: (f.grid, 1, 1), block: f.block, shared_bytes: f.shared_bytes };
            let launch = Launch::pack(&gating::kernel::STATS_FINALIZE, dims, &stats.params, &bindings)?;
            Some((stats_build(build.dtype)?, launch))
        }
        None => None,
    };
    for launch in &mut launches {
        // SAFETY: the caller's contract; the launches were packed from checked bindings.
        unsafe { backend.launch(build, launch) }?;
    }
    if let Some((stats_build, mut launch)) = finalize {
        // SAFETY: as above; the workspace holds the rows the launches above wrote (in stream
        // order), `chunks = tiles`.
        unsafe { backend.launch(&stats_build, &mut launch) }?;
    }
    Ok(())
}

/// [`run`] on a CUDA stream of `device`, with `build` (and the statistics' build when the plan
/// has statistics) loaded.
///
/// # Safety
/// [`run`]'s contract; `stream` is a live stream of the device's context (or null for the legacy
/// default stream) and the buffers stay alive and untouched by other work until the kernels have
/// finished.
unsafe fn run_on_device(
    device: &Device,
    build: &KernelBuild,
    plan: &FusedPlan,
    bindings: &Bindings,
    stream: CUstream,
) -> Result<()> {
    check_build(build, plan, build.dtype)?;
    bindings.check(&plan.lens, "the fused layer kernels")?;
    let fused = LoadedBuild::load(device, build, build.kernels())?;
    let stats = match plan.stats {
        Some(_) => Some(LoadedBuild::load(device, &stats_build(build.dtype)?, &[&gating::kernel::STATS_FINALIZE])?),
        None => None,
    };
    let loaded: Vec<&LoadedBuild> = std::iter::once(&fused).chain(&stats).collect();
    device.bind()?;
    // SAFETY: forwarded from the caller's contract.
    unsafe { run(build, plan, bindings, &mut CudaBackend::new(&loaded, stream)) }
}

/// [`run`] on typed device buffers, on the device's stream. Buffers the plan does not take are
/// ignored.
pub fn forward<T: KernelElement>(
    device: &Device,
    build: &KernelBuild,
    plan: &FusedPlan,
    bufs: FusedBuffers<'_, T>,
) -> Result<()> {
    check_build(build, plan, T::DTYPE)?;
    let stream = device.stream();
    let mut b = TypedBindings::new(stream, T::DTYPE);
    b.input_opt(Buf::X, bufs.x)
        .input_opt(Buf::A, bufs.a)
        .input_opt(Buf::B, bufs.b)
        .output_opt(Buf::Y, bufs.y)
        .input_opt(Buf::RouterWeight, bufs.router_weight)
        .input_opt(Buf::RouterBias, bufs.router_bias)
        .input_opt(Buf::GateInput, bufs.gate_in)
        .input_opt(Buf::AdapterIds, bufs.adapter_ids)
        .input_opt(Buf::SelectionBias, bufs.selection_bias)
        .input_opt(Buf::RankOffsets, bufs.rank_offsets)
        .input_opt(Buf::ExpertScales, bufs.expert_scales)
        .input_opt(Buf::Cores, bufs.cores)
        .output_opt(Buf::Ids, bufs.ids)
        .output_opt(Buf::RouteWeights, bufs.weights)
        .output_opt(Buf::Probs, bufs.probs)
        .output_opt(Buf::StatsWorkspace, bufs.stats_ws)
        .output_opt(Buf::StatsOut, bufs.stats_out)
        .output_opt(Buf::Partials, bufs.hz_part);
    // SAFETY: every address comes from a live slice of the device's context with its length
    // bound (checked against the plan by `run`); `y`, the outputs and the workspaces are distinct
    // `&mut` borrows, so they overlap nothing; the guards in `b` keep each slice's stream
    // ordering until the launches are enqueued.
    unsafe { run_on_device(device, build, plan, b.bindings()?, stream.cu_stream()) }
}

/// [`run`] on caller-owned device memory and stream. Pointers the plan does not take are
/// ignored (passed as null).
///
/// # Safety
/// [`run`]'s contract for these pointers, which belong to the device's context; `stream` is a
/// live stream of that context (or null for the legacy default stream), and the buffers stay
/// alive and untouched by other work until the kernels have finished.
pub unsafe fn forward_raw(
    device: &Device,
    build: &KernelBuild,
    plan: &FusedPlan,
    ptrs: RawFusedPointers,
    stream: CUstream,
) -> Result<()> {
    let mut b = Bindings::new();
    b.raw(Buf::X, ptrs.x)
        .raw(Buf::A, ptrs.a)
        .raw(Buf::B, ptrs.b)
        .raw(Buf::Y, ptrs.y)
        .raw(Buf::RouterWeight, ptrs.router_weight)
        .raw(Buf::RouterBias, ptrs.router_bias)
        .raw(Buf::GateInput, ptrs.gate_in)
        .raw(Buf::AdapterIds, ptrs.adapter_ids)
        .raw(Buf::SelectionBias, ptrs.selection_bias)
        .raw(Buf::RankOffsets, ptrs.rank_offsets)
        .raw(Buf::ExpertScales, ptrs.expert_scales)
        .raw(Buf::Cores, ptrs.cores)
        .raw(Buf::Ids, ptrs.ids)
        .raw(Buf::RouteWeights, ptrs.weights)
        .raw(Buf::Probs, ptrs.probs)
        .raw(Buf::StatsWorkspace, ptrs.stats_ws)
        .raw(Buf::StatsOut, ptrs.stats_out)
        .raw(Buf::Partials, ptrs.hz_part);
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_on_device(device, build, plan, &b, stream) }
}
