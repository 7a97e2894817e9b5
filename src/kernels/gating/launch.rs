//! Running the gating kernels: each call kind on bound buffers through any [`Backend`]
//! ([`run_route`], [`run_stats`], [`run_group`]; per-slot plans in the `slots` module), on typed
//! device slices ([`route`], [`router_stats`], [`group`]) or on caller-owned device pointers and
//! stream (the `*_raw` functions). The typed and raw functions bind their buffers and call the
//! `run_*` function of their kind: there is one launch path, and it checks everything (build,
//! dtype, which buffers are present, their lengths, the launches' argument lists) before the
//! first launch.

use super::{build_threads_of, plan, GroupingPlan, InputKind, KernelLaunch, PlanParams, RoutePlan, StatsPlan};
use crate::cuda::Device;
use crate::kernels::exec::{Backend, Bindings, Buf, CudaBackend, Launch, LoadedBuild, TypedBindings};
use crate::kernels::{Family, KernelBuild};
use crate::model::Gating;
use crate::plan::TokenSlot;
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

// SAFETY: `TokenSlot` is `#[repr(C)]` {u32, u32} (Pod), the layout of `mole_token_slot`.
unsafe impl DeviceRepr for TokenSlot {}
// SAFETY: all-zero bits are a valid `TokenSlot` (token 0, slot 0).
unsafe impl ValidAsZeroBits for TokenSlot {}

/// Checks `build` against `dtype` and that a plan made for `plan_threads` threads per block
/// (`what`) suits it.
pub(super) fn check_plan_build(build: &KernelBuild, dtype: DType, what: &'static str, plan_threads: u32) -> Result<()> {
    if check_build(build, dtype)? != plan_threads {
        return Err(MoleError::param(what, plan_threads, "was made for another block size"));
    }
    Ok(())
}

/// The block size of a gating build, after checking that it is one and has the wanted dtype.
pub(super) fn check_build(build: &KernelBuild, dtype: DType) -> Result<u32> {
    if build.family() != Family::Gating {
        return Err(MoleError::param("build", build, "is not a gating build"));
    }
    if build.dtype != dtype {
        return Err(MoleError::param("build", build, "its dtype differs from the buffers' element type"));
    }
    build_threads_of(build)
}

/// `launch` packed with `params` and the pointers of `bindings`.
fn pack<P: bytemuck::Pod>(launch: &KernelLaunch, params: &P, bindings: &Bindings) -> Result<Launch> {
    Launch::pack(launch.kernel, launch.dims(), params, bindings)
}

/// `build` loaded on `device` with the kernels of `launches` resolved, the device's context made
/// current; `None` when nothing is launched (no module is loaded for that).
pub(super) fn load(
    device: &Device,
    build: &KernelBuild,
    launches: &[Option<KernelLaunch>],
) -> Result<Option<LoadedBuild>> {
    let kernels: Vec<_> = launches.iter().flatten().map(|l| l.kernel).collect();
    if kernels.is_empty() {
        return Ok(None);
    }
    let loaded = LoadedBuild::load(device, build, &kernels)?;
    device.bind()?;
    Ok(Some(loaded))
}

/// Runs the launches of `packed`, in order.
///
/// # Safety
/// As [`Backend::launch`] for every launch.
pub(super) unsafe fn launch_all(
    build: &KernelBuild,
    packed: &mut [Option<Launch>],
    backend: &mut dyn Backend,
) -> Result<()> {
    for launch in packed.iter_mut().flatten() {
        // SAFETY: forwarded from the caller's contract.
        unsafe { backend.launch(build, launch) }?;
    }
    Ok(())
}

/// Runs routing `plan` (made by [`plan`] for `build`'s block size) on the buffers of `bindings`
/// through `backend`: the input ([`Buf::GateInput`] or [`Buf::AdapterIds`], as
/// [`RoutePlan::input`]), [`Buf::SelectionBias`] exactly when [`RoutePlan::uses_bias`],
/// [`Buf::Ids`], [`Buf::RouteWeights`], and [`Buf::Probs`] when wanted (only for rules that
/// [`RoutePlan::writes_probs`]). Lengths as [`RoutePlan::lens`], exact where bound with one.
/// Nothing is launched for zero tokens (the buffers are still checked).
///
/// Errors: the build (family, block size), a missing buffer, a selection bias the rule does not
/// add or probabilities it does not compute ([`MoleError::UnexpectedInput`]: a spec mistake), a
/// bound length that differs from the plan's.
///
/// # Safety
/// As [`Backend::launch`]: every bound address the plan takes holds at least the plan's element
/// count of its [`Buf`]'s type, and the outputs overlap nothing else.
pub unsafe fn run_route(
    build: &KernelBuild,
    plan: &RoutePlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_plan_build(build, build.dtype, "route plan", plan.block_threads)?;
    let given = |buf| bindings.ptr(buf) != 0;
    if given(Buf::SelectionBias) && !plan.uses_bias {
        return Err(MoleError::UnexpectedInput { name: "selection_bias", reason: "the rule has bias: false" });
    }
    if given(Buf::Probs) && !plan.writes_probs {
        return Err(MoleError::UnexpectedInput { name: "probs", reason: "the rule computes no probabilities" });
    }
    let mut lens = plan.lens;
    if !given(Buf::Probs) {
        lens.set(Buf::Probs, 0);
    }
    bindings.check(&lens, "the routing kernel")?;
    let mut packed = [plan.launch.map(|l| pack(&l, &plan.params, bindings)).transpose()?];
    // SAFETY: the caller's contract; the launch was packed from checked bindings.
    unsafe { launch_all(build, &mut packed, backend) }
}

/// The device buffers a routing call reads, by [`InputKind`].
#[derive(Clone, Copy, Debug)]
pub enum DeviceGateInput<'a, T> {
    /// Router scores `[T, E]` and the selection bias `[E]` of rules with `bias: true`.
    Scores {
        /// `z [T, E]`.
        scores: &'a CudaSlice<T>,
        /// `selection_bias [E]`.
        selection_bias: Option<&'a CudaSlice<T>>,
    },
    /// Given weights `[T, E]`.
    Weights(&'a CudaSlice<T>),
    /// Adapter ids `[T]`.
    AdapterIds(&'a CudaSlice<i32>),
}

/// The device buffers a routing call writes.
#[derive(Debug)]
pub struct RouteOutputs<'a> {
    /// `ids [T, slots]`, `-1` for empty slots.
    pub ids: &'a mut CudaSlice<i32>,
    /// `weights [T, slots]`.
    pub weights: &'a mut CudaSlice<f32>,
    /// `probs [T, E]`, for rules that compute probabilities (see [`RoutePlan::writes_probs`]).
    pub probs: Option<&'a mut CudaSlice<f32>>,
}

/// Routes `tokens` tokens over `experts` experts under `gating` with the kernels of `build`
/// (whose dtype must be `T`'s), on the device's stream, through [`run_route`]. Returns the plan
/// that was launched; nothing is launched for zero tokens.
pub fn route<T: KernelElement>(
    device: &Device,
    build: &KernelBuild,
    gating: &Gating,
    tokens: usize,
    experts: usize,
    input: DeviceGateInput<'_, T>,
    out: RouteOutputs<'_>,
) -> Result<RoutePlan> {
    let plan = plan(gating, tokens, experts, check_build(build, T::DTYPE)?)?;
    let stream = device.stream();
    let mut b = TypedBindings::new(stream, T::DTYPE);
    let kind = match input {
        DeviceGateInput::Scores { scores, selection_bias } => {
            b.input(Buf::GateInput, scores).input_opt(Buf::SelectionBias, selection_bias);
            InputKind::Scores
        }
        DeviceGateInput::Weights(w) => {
            b.input(Buf::GateInput, w);
            InputKind::Weights
        }
        DeviceGateInput::AdapterIds(a) => {
            b.input(Buf::AdapterIds, a);
            InputKind::AdapterIds
        }
    };
    // Scores and given weights bind the same buffer: the variant tells them apart.
    if kind != plan.input {
        return Err(MoleError::Unsupported(format!("gating {gating:?} reads {:?}, got {kind:?}", plan.input)));
    }
    b.output(Buf::Ids, out.ids).output(Buf::RouteWeights, out.weights).output_opt(Buf::Probs, out.probs);
    let loaded = load(device, build, &[plan.launch])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: every address comes from a live slice of the device's context with its length
    // bound (checked against the plan by `run_route`); the outputs are distinct `&mut` borrows;
    // the guards in `b` keep each slice's stream ordering until the launch is enqueued.
    unsafe { run_route(build, &plan, b.bindings()?, &mut CudaBackend::new(&builds, stream.cu_stream())) }?;
    Ok(plan)
}

/// Device pointers of a routing call (0 for an absent optional buffer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRoutePointers {
    /// Scores, given weights (`[T, E]`, the build's dtype) or adapter ids (`[T]`, i32).
    pub input: CUdeviceptr,
    /// `selection_bias [E]` (build dtype), or 0.
    pub selection_bias: CUdeviceptr,
    /// `ids [T, slots]` (i32).
    pub ids: CUdeviceptr,
    /// `weights [T, slots]` (f32).
    pub weights: CUdeviceptr,
    /// `probs [T, E]` (f32), or 0.
    pub probs: CUdeviceptr,
}

/// [`route`] on caller-owned device memory and stream, through [`run_route`]. Presence is
/// checked (which pointers must be non-null, no bias or probabilities where the rule takes none);
/// lengths are the caller's promise. Returns the launched plan.
///
/// # Safety
/// - every non-zero pointer is a device allocation of the device's context, holding the element
///   count and type [`RawRoutePointers`] documents for `tokens`, `experts` and the plan's slots;
/// - outputs do not overlap each other or the inputs;
/// - `stream` is a live stream of the device's context (or null for the legacy default stream),
///   and the buffers stay alive and untouched by other work until the kernel has finished on it.
pub unsafe fn route_raw(
    device: &Device,
    build: &KernelBuild,
    gating: &Gating,
    tokens: usize,
    experts: usize,
    ptrs: RawRoutePointers,
    stream: CUstream,
) -> Result<RoutePlan> {
    let plan = plan(gating, tokens, experts, check_build(build, build.dtype)?)?;
    let input = if plan.input == InputKind::AdapterIds { Buf::AdapterIds } else { Buf::GateInput };
    let mut b = Bindings::new();
    b.raw(input, ptrs.input)
        .raw(Buf::SelectionBias, ptrs.selection_bias)
        .raw(Buf::Ids, ptrs.ids)
        .raw(Buf::RouteWeights, ptrs.weights)
        .raw(Buf::Probs, ptrs.probs);
    let loaded = load(device, build, &[plan.launch])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_route(build, &plan, &b, &mut CudaBackend::new(&builds, stream)) }?;
    Ok(plan)
}

/// Runs statistics `plan` on the buffers of `bindings` through `backend`: the per-chunk partials
/// (when there are tokens), then the in-order final sum into [`Buf::StatsOut`]. [`Buf::Probs`]
/// and [`Buf::GateInput`] (the raw scores of the z-loss) must be bound exactly when the plan takes
/// them; lengths as [`StatsPlan::lens`] (the workspace is a capacity).
///
/// # Safety
/// As [`run_route`].
pub unsafe fn run_stats(
    build: &KernelBuild,
    plan: &StatsPlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_plan_build(build, build.dtype, "stats plan", plan.finalize.block)?;
    for (buf, wanted) in [(Buf::Probs, plan.params.has_probs != 0), (Buf::GateInput, plan.params.has_scores != 0)] {
        match (bindings.ptr(buf) != 0, wanted) {
            (false, true) => {
                return Err(MoleError::MissingInput { name: buf.name(), needed_by: "the statistics plan" })
            }
            (true, false) => {
                return Err(MoleError::UnexpectedInput {
                    name: buf.name(),
                    reason: "the statistics plan does not use it",
                })
            }
            _ => {}
        }
    }
    bindings.check(&plan.lens(), "the statistics kernels")?;
    let mut packed = [
        plan.partial.map(|l| pack(&l, &plan.params, bindings)).transpose()?,
        Some(pack(&plan.finalize, &plan.params, bindings)?),
    ];
    // SAFETY: the caller's contract; the launches were packed from checked bindings.
    unsafe { launch_all(build, &mut packed, backend) }
}

/// The device buffers [`router_stats`] reads.
#[derive(Clone, Copy, Debug)]
pub struct StatsInputs<'a, T> {
    /// `ids [T, slots]`.
    pub ids: &'a CudaSlice<i32>,
    /// `probs [T, E]` as written by [`route`], when the plan has probabilities.
    pub probs: Option<&'a CudaSlice<f32>>,
    /// Raw scores `[T, E]`, when the plan has a z-loss.
    pub scores: Option<&'a CudaSlice<T>>,
}

/// Router statistics of a routed batch into `out [4E + 2]` (decode with [`StatsPlan::decode`]),
/// reduced in a fixed order: the same inputs give bitwise the same output. Through [`run_stats`].
pub fn router_stats<T: KernelElement>(
    device: &Device,
    build: &KernelBuild,
    plan: &StatsPlan,
    inputs: StatsInputs<'_, T>,
    workspace: &mut CudaSlice<u32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    check_build(build, T::DTYPE)?;
    let stream = device.stream();
    let mut b = TypedBindings::new(stream, T::DTYPE);
    b.input(Buf::Ids, inputs.ids)
        .input_opt(Buf::Probs, inputs.probs)
        .input_opt(Buf::GateInput, inputs.scores)
        .output(Buf::StatsWorkspace, workspace)
        .output(Buf::StatsOut, out);
    let loaded = load(device, build, &[plan.partial, Some(plan.finalize)])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: as in `route`: live slices with their lengths bound, checked by `run_stats`.
    unsafe { run_stats(build, plan, b.bindings()?, &mut CudaBackend::new(&builds, stream.cu_stream())) }
}

/// Device pointers of a statistics call (0 for an absent optional buffer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawStatsPointers {
    /// `ids [T, slots]` (i32).
    pub ids: CUdeviceptr,
    /// `probs [T, E]` (f32), or 0.
    pub probs: CUdeviceptr,
    /// `scores [T, E]` (build dtype), or 0.
    pub scores: CUdeviceptr,
    /// The plan's workspace length, u32.
    pub workspace: CUdeviceptr,
    /// `out [4E + 2]` (f32).
    pub out: CUdeviceptr,
}

/// [`router_stats`] on caller-owned device memory and stream, through [`run_stats`].
///
/// # Safety
/// As [`route_raw`]: every non-zero pointer holds the count and type [`RawStatsPointers`]
/// documents for `plan`, the workspace and output overlap nothing else, and `stream` belongs to
/// the device's context.
pub unsafe fn router_stats_raw(
    device: &Device,
    build: &KernelBuild,
    plan: &StatsPlan,
    ptrs: RawStatsPointers,
    stream: CUstream,
) -> Result<()> {
    let mut b = Bindings::new();
    b.raw(Buf::Ids, ptrs.ids)
        .raw(Buf::Probs, ptrs.probs)
        .raw(Buf::GateInput, ptrs.scores)
        .raw(Buf::StatsWorkspace, ptrs.workspace)
        .raw(Buf::StatsOut, ptrs.out);
    check_build(build, build.dtype)?;
    let loaded = load(device, build, &[plan.partial, Some(plan.finalize)])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_stats(build, plan, &b, &mut CudaBackend::new(&builds, stream)) }
}

/// The three plan launches of `plan` (count and scatter when there are entries), packed with
/// `params`.
pub(super) fn pack_plan(plan: &GroupingPlan, params: &PlanParams, bindings: &Bindings) -> Result<[Option<Launch>; 3]> {
    Ok([
        plan.count.map(|l| pack(&l, params, bindings)).transpose()?,
        Some(pack(&plan.scan, params, bindings)?),
        plan.scatter.map(|l| pack(&l, params, bindings)).transpose()?,
    ])
}

/// Runs grouping `plan` on the buffers of `bindings` through `backend`: count, scan and scatter
/// (the scan alone when there are no entries). Lengths as [`GroupingPlan::lens`] (workspace and
/// entries are capacities).
///
/// # Safety
/// As [`run_route`].
pub unsafe fn run_group(
    build: &KernelBuild,
    plan: &GroupingPlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_plan_build(build, build.dtype, "grouping plan", plan.scan.block)?;
    bindings.check(&plan.lens, "the routing-plan kernels")?;
    let mut packed = pack_plan(plan, &plan.params, bindings)?;
    // SAFETY: the caller's contract; the launches were packed from checked bindings.
    unsafe { launch_all(build, &mut packed, backend) }
}

/// The device buffers [`group`] writes.
#[derive(Debug)]
pub struct GroupOutputs<'a> {
    /// Tokens per expert, `[E]`.
    pub counts: &'a mut CudaSlice<u32>,
    /// Segment starts, `[E + 1]`.
    pub offsets: &'a mut CudaSlice<u32>,
    /// At least the plan's [`Buf::PlanEntries`] length (see [`GroupingPlan::lens`]).
    pub entries: &'a mut CudaSlice<TokenSlot>,
    /// `[1]`: 1 when an id outside `-1..global_experts` was skipped, else 0.
    pub status: &'a mut CudaSlice<u32>,
}

/// The bindings of a grouping call's typed buffers.
pub(super) fn bind_group<'a>(
    device: &'a Device,
    build: &KernelBuild,
    ids: &'a CudaSlice<i32>,
    workspace: &'a mut CudaSlice<u32>,
    out: [&'a mut CudaSlice<u32>; 3],
    entries: &'a mut CudaSlice<TokenSlot>,
) -> TypedBindings<'a> {
    let [counts, offsets, status] = out;
    let mut b = TypedBindings::new(device.stream(), build.dtype);
    b.input(Buf::Ids, ids)
        .output(Buf::PlanWorkspace, workspace)
        .output(Buf::PlanCounts, counts)
        .output(Buf::PlanOffsets, offsets)
        .output(Buf::PlanEntries, entries)
        .output(Buf::PlanStatus, status);
    b
}

/// Builds the routing plan of `ids` on the device (see [`crate::plan::RoutingPlan`]): the same
/// counts, offsets and entries as the host, padding included, through [`run_group`]. Any build
/// dtype will do.
pub fn group(
    device: &Device,
    build: &KernelBuild,
    plan: &GroupingPlan,
    ids: &CudaSlice<i32>,
    workspace: &mut CudaSlice<u32>,
    out: GroupOutputs<'_>,
) -> Result<()> {
    check_build(build, build.dtype)?;
    let b = bind_group(device, build, ids, workspace, [out.counts, out.offsets, out.status], out.entries);
    let loaded = load(device, build, &[plan.count, Some(plan.scan), plan.scatter])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: as in `route`: live slices with their lengths bound, checked by `run_group`.
    unsafe { run_group(build, plan, b.bindings()?, &mut CudaBackend::new(&builds, device.stream().cu_stream())) }
}

/// Device pointers of a grouping call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawGroupPointers {
    /// `ids [T, slots]` (i32).
    pub ids: CUdeviceptr,
    /// The plan's workspace length, u32.
    pub workspace: CUdeviceptr,
    /// `counts [E]` (u32).
    pub counts: CUdeviceptr,
    /// `offsets [E + 1]` (u32).
    pub offsets: CUdeviceptr,
    /// The plan's [`Buf::PlanEntries`] capacity, [`TokenSlot`]s.
    pub entries: CUdeviceptr,
    /// `status [1]` (u32).
    pub status: CUdeviceptr,
}

impl RawGroupPointers {
    /// The pointers as bindings (lengths unknown).
    pub(super) fn bindings(&self) -> Bindings {
        let mut b = Bindings::new();
        b.raw(Buf::Ids, self.ids)
            .raw(Buf::PlanWorkspace, self.workspace)
            .raw(Buf::PlanCounts, self.counts)
            .raw(Buf::PlanOffsets, self.offsets)
            .raw(Buf::PlanEntries, self.entries)
            .raw(Buf::PlanStatus, self.status);
        b
    }
}

/// [`group`] on caller-owned device memory and stream, through [`run_group`].
///
/// # Safety
/// As [`route_raw`]: every pointer holds the count and type [`RawGroupPointers`] documents for
/// `plan`, outputs and workspace overlap nothing else, and `stream` belongs to the device's
/// context.
pub unsafe fn group_raw(
    device: &Device,
    build: &KernelBuild,
    plan: &GroupingPlan,
    ptrs: RawGroupPointers,
    stream: CUstream,
) -> Result<()> {
    check_build(build, build.dtype)?;
    let loaded = load(device, build, &[plan.count, Some(plan.scan), plan.scatter])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_group(build, plan, &ptrs.bindings(), &mut CudaBackend::new(&builds, stream)) }
}
