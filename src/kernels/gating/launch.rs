//! Typed launches of the gating kernels on a [`Device`], and raw-pointer variants for frameworks
//! that own their buffers. Every argument is validated (build, dtype, lengths, rule limits) by
//! pure functions before anything touches the GPU.

use super::{build_threads_of, entry_name, plan, GroupingPlan, InputKind, KernelLaunch, RoutePlan, StatsPlan};
use crate::cuda::cuda_err;
use crate::cuda::Device;
use crate::kernels::{Family, KernelBuild};
use crate::model::Gating;
use crate::plan::TokenSlot;
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};
use std::ffi::c_void;

// SAFETY: `TokenSlot` is `#[repr(C)]` {u32, u32} (Pod), the layout of `mole_token_slot`.
unsafe impl DeviceRepr for TokenSlot {}
// SAFETY: all-zero bits are a valid `TokenSlot` (token 0, slot 0).
unsafe impl ValidAsZeroBits for TokenSlot {}

/// The block size of a gating build, after checking that it is one and has the wanted dtype.
/// Checks `build` against `dtype` and that a plan made for `plan_threads` threads per block
/// (`what`) suits it.
pub(super) fn check_plan_build(build: &KernelBuild, dtype: DType, what: &'static str, plan_threads: u32) -> Result<()> {
    if check_build(build, dtype)? != plan_threads {
        return Err(MoleError::param(what, plan_threads, "was made for another block size"));
    }
    Ok(())
}

pub(super) fn check_build(build: &KernelBuild, dtype: DType) -> Result<u32> {
    if build.family() != Family::Gating {
        return Err(MoleError::param("build", build, "is not a gating build"));
    }
    if build.dtype != dtype {
        return Err(MoleError::param("build", build, "its dtype differs from the buffers' element type"));
    }
    build_threads_of(build)
}

pub(super) fn check_buffer(what: &'static str, len: usize, expected: &[usize]) -> Result<()> {
    let n: usize = expected.iter().product();
    if len != n {
        return Err(MoleError::ShapeMismatch { what, expected: expected.to_vec(), got: len });
    }
    Ok(())
}

/// Element counts of the buffers of a routing call, for validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RouteLens {
    pub input: InputKind,
    pub input_len: usize,
    pub bias_len: Option<usize>,
    pub ids_len: usize,
    pub weights_len: usize,
    pub probs_len: Option<usize>,
}

/// Plans a routing call and checks every buffer against the plan.
pub(super) fn check_route(
    build: &KernelBuild,
    dtype: DType,
    gating: &Gating,
    tokens: usize,
    experts: usize,
    lens: RouteLens,
) -> Result<RoutePlan> {
    let threads = check_build(build, dtype)?;
    let plan = plan(gating, tokens, experts, threads)?;
    if lens.input != plan.input {
        return Err(MoleError::Unsupported(format!("gating {gating:?} reads {:?}, got {:?}", plan.input, lens.input)));
    }
    match lens.input {
        InputKind::Scores => check_buffer("scores", lens.input_len, &[tokens, experts])?,
        InputKind::Weights => check_buffer("weights", lens.input_len, &[tokens, experts])?,
        InputKind::AdapterIds => check_buffer("adapter_ids", lens.input_len, &[tokens])?,
    }
    match (plan.uses_bias, lens.bias_len) {
        (true, Some(n)) => check_buffer("selection_bias", n, &[experts])?,
        (true, None) => {
            return Err(MoleError::MissingInput { name: "selection_bias", needed_by: "the rule (bias: true)" })
        }
        (false, Some(_)) => {
            return Err(MoleError::UnexpectedInput { name: "selection_bias", reason: "the rule has bias: false" })
        }
        (false, None) => {}
    }
    check_buffer("ids", lens.ids_len, &[tokens, plan.slots])?;
    check_buffer("routing weights", lens.weights_len, &[tokens, plan.slots])?;
    match (plan.writes_probs, lens.probs_len) {
        (true, Some(n)) => check_buffer("probs", n, &[tokens, experts])?,
        (false, Some(_)) => {
            return Err(MoleError::UnexpectedInput { name: "probs", reason: "the rule computes no probabilities" })
        }
        _ => {}
    }
    Ok(plan)
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

pub(super) fn function(device: &Device, build: &KernelBuild, launch: &KernelLaunch) -> Result<CudaFunction> {
    device.function(build, &entry_name(launch.entry, build.dtype))
}

/// Routes `tokens` tokens over `experts` experts under `gating` with the kernels of `build`
/// (whose dtype must be `T`'s), on the device's stream. Returns the plan that was launched;
/// nothing is launched for zero tokens.
pub fn route<T: KernelElement>(
    device: &Device,
    build: &KernelBuild,
    gating: &Gating,
    tokens: usize,
    experts: usize,
    input: DeviceGateInput<'_, T>,
    out: RouteOutputs<'_>,
) -> Result<RoutePlan> {
    let (kind, input_len, bias_len) = match input {
        DeviceGateInput::Scores { scores, selection_bias } => {
            (InputKind::Scores, scores.len(), selection_bias.map(CudaSlice::len))
        }
        DeviceGateInput::Weights(w) => (InputKind::Weights, w.len(), None),
        DeviceGateInput::AdapterIds(a) => (InputKind::AdapterIds, a.len(), None),
    };
    let lens = RouteLens {
        input: kind,
        input_len,
        bias_len,
        ids_len: out.ids.len(),
        weights_len: out.weights.len(),
        probs_len: out.probs.as_ref().map(|p| p.len()),
    };
    let plan = check_route(build, T::DTYPE, gating, tokens, experts, lens)?;
    let Some(launch) = plan.launch else { return Ok(plan) };
    let func = function(device, build, &launch)?;
    let stream = device.stream();
    let null: CUdeviceptr = 0;
    let mut args = stream.launch_builder(&func);
    args.arg(&plan.params);
    match input {
        DeviceGateInput::Scores { scores, selection_bias } => {
            args.arg(scores);
            match selection_bias {
                Some(b) => args.arg(b),
                None => args.arg(&null),
            };
        }
        DeviceGateInput::Weights(w) => {
            args.arg(w).arg(&null);
        }
        DeviceGateInput::AdapterIds(a) => {
            args.arg(a);
        }
    }
    args.arg(out.ids).arg(out.weights);
    if kind != InputKind::AdapterIds {
        match out.probs {
            Some(p) => args.arg(p),
            None => args.arg(&null),
        };
    }
    // SAFETY: the argument list matches the kernel's signature in gating.cu (params by value,
    // then the input, bias, ids, weights and probs pointers; adapter ids take no bias or probs),
    // and every buffer's length was checked against the plan, which bounds every access.
    unsafe { args.launch(launch.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
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

/// Launches `launch` of `build` with raw kernel arguments on `stream`.
///
/// # Safety
/// `args` must point to live values matching the kernel's parameter list, and every pointer among
/// them must satisfy the calling function's contract.
pub(super) unsafe fn launch_raw(
    device: &Device,
    build: &KernelBuild,
    launch: &KernelLaunch,
    stream: CUstream,
    args: &mut [*mut c_void],
) -> Result<()> {
    let func = function(device, build, launch)?;
    // SAFETY: forwarded from the caller's contract (arguments, pointers, stream).
    unsafe { device.launch_raw(&func, launch.config(), stream, args) }
}

pub(super) fn require(name: &'static str, ptr: CUdeviceptr) -> Result<()> {
    if ptr == 0 {
        return Err(MoleError::MissingInput { name, needed_by: "the gating kernel" });
    }
    Ok(())
}

/// [`route`] on caller-owned device memory and stream.
///
/// The call validates everything it can see (build, rule, limits, which pointers must be
/// non-null, no bias or probs where the rule takes none) and returns the launched plan.
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
    let threads = check_build(build, build.dtype)?;
    let plan = plan(gating, tokens, experts, threads)?;
    let Some(launch) = plan.launch else { return Ok(plan) };
    require("input", ptrs.input)?;
    require("ids", ptrs.ids)?;
    require("weights", ptrs.weights)?;
    if plan.uses_bias {
        require("selection_bias", ptrs.selection_bias)?;
    } else if ptrs.selection_bias != 0 {
        return Err(MoleError::UnexpectedInput { name: "selection_bias", reason: "the rule has bias: false" });
    }
    if !plan.writes_probs && ptrs.probs != 0 {
        return Err(MoleError::UnexpectedInput { name: "probs", reason: "the rule computes no probabilities" });
    }
    let mut params = plan.params;
    let mut p = ptrs;
    let a = |v: &mut CUdeviceptr| v as *mut CUdeviceptr as *mut c_void;
    let mut args: Vec<*mut c_void> = vec![&mut params as *mut _ as *mut c_void, a(&mut p.input)];
    if plan.input == InputKind::AdapterIds {
        args.extend([a(&mut p.ids), a(&mut p.weights)]);
    } else {
        args.extend([a(&mut p.selection_bias), a(&mut p.ids), a(&mut p.weights), a(&mut p.probs)]);
    }
    // SAFETY: the argument list matches the kernel signature (see `route`); the pointers are the
    // caller's responsibility per this function's contract.
    unsafe { launch_raw(device, build, &launch, stream, &mut args) }?;
    Ok(plan)
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

/// Checks that `plan` suits the build and which optional inputs are present.
pub(super) fn check_stats_plan(
    build: &KernelBuild,
    dtype: DType,
    plan: &StatsPlan,
    has_probs: bool,
    has_scores: bool,
) -> Result<()> {
    check_plan_build(build, dtype, "stats plan", plan.finalize.block)?;
    for (name, present, wanted) in
        [("probs", has_probs, plan.params.has_probs != 0), ("scores", has_scores, plan.params.has_scores != 0)]
    {
        match (present, wanted) {
            (false, true) => return Err(MoleError::MissingInput { name, needed_by: "the statistics plan" }),
            (true, false) => {
                return Err(MoleError::UnexpectedInput { name, reason: "the statistics plan does not use it" })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Element counts of the buffers of a statistics call, for validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StatsLens {
    pub ids: usize,
    pub probs: Option<usize>,
    pub scores: Option<usize>,
    pub workspace: usize,
    pub out: usize,
}

/// Checks a statistics call's buffers against `plan` and the build.
pub(super) fn check_stats(build: &KernelBuild, dtype: DType, plan: &StatsPlan, lens: StatsLens) -> Result<()> {
    check_stats_plan(build, dtype, plan, lens.probs.is_some(), lens.scores.is_some())?;
    let (t, e, s) = (plan.params.tokens as usize, plan.params.experts as usize, plan.params.slots as usize);
    check_buffer("ids", lens.ids, &[t, s])?;
    if let Some(n) = lens.probs {
        check_buffer("probs", n, &[t, e])?;
    }
    if let Some(n) = lens.scores {
        check_buffer("scores", n, &[t, e])?;
    }
    if lens.workspace < plan.workspace_words {
        let (what, expected) = ("stats workspace", vec![plan.workspace_words]);
        return Err(MoleError::ShapeMismatch { what, expected, got: lens.workspace });
    }
    check_buffer("stats output", lens.out, &[plan.out_len])
}

/// Router statistics of a routed batch into `out [4E + 2]` (decode with [`StatsPlan::decode`]),
/// reduced in a fixed order: the same inputs give bitwise the same output.
pub fn router_stats<T: KernelElement>(
    device: &Device,
    build: &KernelBuild,
    plan: &StatsPlan,
    inputs: StatsInputs<'_, T>,
    workspace: &mut CudaSlice<u32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let lens = StatsLens {
        ids: inputs.ids.len(),
        probs: inputs.probs.map(CudaSlice::len),
        scores: inputs.scores.map(CudaSlice::len),
        workspace: workspace.len(),
        out: out.len(),
    };
    check_stats(build, T::DTYPE, plan, lens)?;
    let stream = device.stream();
    let null: CUdeviceptr = 0;
    if let Some(launch) = plan.partial {
        let func = function(device, build, &launch)?;
        let mut args = stream.launch_builder(&func);
        args.arg(&plan.params).arg(inputs.ids);
        match inputs.probs {
            Some(p) => args.arg(p),
            None => args.arg(&null),
        };
        match inputs.scores {
            Some(s) => args.arg(s),
            None => args.arg(&null),
        };
        args.arg(&mut *workspace);
        // SAFETY: arguments match gating_stats_partial; buffer lengths were checked above.
        unsafe { args.launch(launch.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
    }
    let func = function(device, build, &plan.finalize)?;
    let mut args = stream.launch_builder(&func);
    args.arg(&plan.params).arg(&*workspace).arg(out);
    // SAFETY: arguments match gating_stats_finalize; buffer lengths were checked above.
    unsafe { args.launch(plan.finalize.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
    Ok(())
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
    /// `workspace_words` u32.
    pub workspace: CUdeviceptr,
    /// `out [4E + 2]` (f32).
    pub out: CUdeviceptr,
}

/// [`router_stats`] on caller-owned device memory and stream.
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
    // Lengths are the caller's promise; presence is checked here.
    check_stats_plan(build, build.dtype, plan, ptrs.probs != 0, ptrs.scores != 0)?;
    require("out", ptrs.out)?;
    require("workspace", ptrs.workspace)?;
    let mut params = plan.params;
    let mut p = ptrs;
    let a = |v: &mut CUdeviceptr| v as *mut CUdeviceptr as *mut c_void;
    if let Some(launch) = plan.partial {
        require("ids", p.ids)?;
        let mut args = [
            &mut params as *mut _ as *mut c_void,
            a(&mut p.ids),
            a(&mut p.probs),
            a(&mut p.scores),
            a(&mut p.workspace),
        ];
        // SAFETY: arguments match gating_stats_partial; pointers per this function's contract.
        unsafe { launch_raw(device, build, &launch, stream, &mut args) }?;
    }
    let mut args = [&mut params as *mut _ as *mut c_void, a(&mut p.workspace), a(&mut p.out)];
    // SAFETY: arguments match gating_stats_finalize; pointers per this function's contract.
    unsafe { launch_raw(device, build, &plan.finalize, stream, &mut args) }
}

/// The device buffers [`group`] writes.
#[derive(Debug)]
pub struct GroupOutputs<'a> {
    /// Tokens per expert, `[E]`.
    pub counts: &'a mut CudaSlice<u32>,
    /// Segment starts, `[E + 1]`.
    pub offsets: &'a mut CudaSlice<u32>,
    /// At least [`GroupingPlan::max_entries`] entries.
    pub entries: &'a mut CudaSlice<TokenSlot>,
    /// `[1]`: 1 when an id outside `-1..E` was skipped, else 0.
    pub status: &'a mut CudaSlice<u32>,
}

pub(super) fn check_group(
    build: &KernelBuild,
    plan: &GroupingPlan,
    ids_len: usize,
    workspace_len: usize,
    out_lens: [usize; 4],
) -> Result<()> {
    check_plan_build(build, build.dtype, "grouping plan", plan.scan.block)?;
    let (t, s, e) = (plan.params.tokens as usize, plan.params.slots as usize, plan.params.experts as usize);
    check_buffer("ids", ids_len, &[t, s])?;
    let [counts, offsets, entries, status] = out_lens;
    check_buffer("counts", counts, &[e])?;
    check_buffer("offsets", offsets, &[e + 1])?;
    check_buffer("status", status, &[1])?;
    for (what, got, need) in
        [("entries", entries, plan.max_entries), ("plan workspace", workspace_len, plan.workspace_words)]
    {
        if got < need {
            return Err(MoleError::ShapeMismatch { what, expected: vec![need], got });
        }
    }
    Ok(())
}

/// Builds the routing plan of `ids` on the device (see [`crate::plan::RoutingPlan`]): the same
/// counts, offsets and entries as the host, padding included. Any build dtype will do.
pub fn group(
    device: &Device,
    build: &KernelBuild,
    plan: &GroupingPlan,
    ids: &CudaSlice<i32>,
    workspace: &mut CudaSlice<u32>,
    out: GroupOutputs<'_>,
) -> Result<()> {
    let out_lens = [out.counts.len(), out.offsets.len(), out.entries.len(), out.status.len()];
    check_group(build, plan, ids.len(), workspace.len(), out_lens)?;
    let stream = device.stream();
    if let Some(launch) = plan.count {
        let func = function(device, build, &launch)?;
        // SAFETY: arguments match gating_plan_count; lengths checked above.
        unsafe { stream.launch_builder(&func).arg(&plan.params).arg(ids).arg(&mut *workspace).launch(launch.config()) }
            .map_err(cuda_err("cuLaunchKernel"))?;
    }
    let func = function(device, build, &plan.scan)?;
    let mut args = stream.launch_builder(&func);
    args.arg(&plan.params).arg(&mut *workspace).arg(out.counts).arg(out.offsets).arg(&mut *out.entries).arg(out.status);
    // SAFETY: arguments match gating_plan_scan; lengths checked above.
    unsafe { args.launch(plan.scan.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
    if let Some(launch) = plan.scatter {
        let func = function(device, build, &launch)?;
        let mut args = stream.launch_builder(&func);
        args.arg(&plan.params).arg(ids).arg(&*workspace).arg(out.entries);
        // SAFETY: arguments match gating_plan_scatter; lengths checked above.
        unsafe { args.launch(launch.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
    }
    Ok(())
}

/// Device pointers of a grouping call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawGroupPointers {
    /// `ids [T, slots]` (i32).
    pub ids: CUdeviceptr,
    /// `workspace_words` u32.
    pub workspace: CUdeviceptr,
    /// `counts [E]` (u32).
    pub counts: CUdeviceptr,
    /// `offsets [E + 1]` (u32).
    pub offsets: CUdeviceptr,
    /// `max_entries` [`TokenSlot`]s.
    pub entries: CUdeviceptr,
    /// `status [1]` (u32).
    pub status: CUdeviceptr,
}

/// [`group`] on caller-owned device memory and stream.
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
    let mut p = ptrs;
    for (name, v) in [("workspace", p.workspace), ("counts", p.counts), ("offsets", p.offsets), ("status", p.status)] {
        require(name, v)?;
    }
    let mut params = plan.params;
    let a = |v: &mut CUdeviceptr| v as *mut CUdeviceptr as *mut c_void;
    if let Some(launch) = plan.count {
        require("ids", p.ids)?;
        require("entries", p.entries)?;
        let mut args = [&mut params as *mut _ as *mut c_void, a(&mut p.ids), a(&mut p.workspace)];
        // SAFETY: arguments match gating_plan_count; pointers per this function's contract.
        unsafe { launch_raw(device, build, &launch, stream, &mut args) }?;
    }
    let mut args = [
        &mut params as *mut _ as *mut c_void,
        a(&mut p.workspace),
        a(&mut p.counts),
        a(&mut p.offsets),
        a(&mut p.entries),
        a(&mut p.status),
    ];
    // SAFETY: arguments match gating_plan_scan; pointers per this function's contract.
    unsafe { launch_raw(device, build, &plan.scan, stream, &mut args) }?;
    if let Some(launch) = plan.scatter {
        let mut args = [&mut params as *mut _ as *mut c_void, a(&mut p.ids), a(&mut p.workspace), a(&mut p.entries)];
        // SAFETY: arguments match gating_plan_scatter; pointers per this function's contract.
        unsafe { launch_raw(device, build, &launch, stream, &mut args) }?;
    }
    Ok(())
}
