//! Launches of the fused layer kernels on a [`Device`]: typed buffers ([`forward`]) or
//! caller-owned device pointers ([`forward_raw`]). Every buffer is checked against the
//! [`FusedPlan`] first: present exactly where the plan needs it, with its exact length.

use super::{entry_name, FusedConfig, FusedLaunch, FusedLens, FusedPlan};
use crate::cuda::Device;
use crate::kernels::gating::{self, KernelLaunch};
use crate::kernels::{Family, KernelBuild};
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, SyncOnDrop};
use std::ffi::c_void;

/// The device buffers of a call; `None` where the plan takes none (see [`FusedLens`]).
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

/// Device pointers of a call (0 where the plan takes no buffer; element types as [`FusedLens`]:
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

impl RawFusedPointers {
    /// The pointers `l` takes, every other one null; a needed pointer that is null is an error.
    fn for_plan(&self, l: &FusedLens) -> Result<RawFusedPointers> {
        let take = |name: &'static str, p: CUdeviceptr, len: usize| match (len, p) {
            (0, _) => Ok(0),
            (_, 0) => Err(MoleError::MissingInput { name, needed_by: "the fused layer kernels" }),
            _ => Ok(p),
        };
        Ok(RawFusedPointers {
            x: take("x", self.x, l.x)?,
            a: take("a", self.a, l.a)?,
            b: take("b", self.b, l.b)?,
            y: take("y", self.y, l.y)?,
            router_weight: take("router_weight", self.router_weight, l.router_weight)?,
            router_bias: take("router_bias", self.router_bias, l.router_bias)?,
            gate_in: take("gate_in", self.gate_in, l.gate_in)?,
            adapter_ids: take("adapter_ids", self.adapter_ids, l.adapter_ids)?,
            selection_bias: take("selection_bias", self.selection_bias, l.selection_bias)?,
            rank_offsets: take("rank_offsets", self.rank_offsets, l.rank_offsets)?,
            cores: take("cores", self.cores, l.cores)?,
            ids: take("ids", self.ids, l.routing)?,
            weights: take("weights", self.weights, l.routing)?,
            probs: take("probs", self.probs, l.probs)?,
            stats_ws: take("stats_ws", self.stats_ws, l.stats_ws)?,
            stats_out: take("stats_out", self.stats_out, l.stats_out)?,
            hz_part: take("hz_part", self.hz_part, l.hz_part)?,
        })
    }
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

/// Checks that buffer `name` (length `got`, `None` when absent) is what the plan expects.
pub(crate) fn check_buffer(name: &'static str, got: Option<usize>, expected: usize) -> Result<()> {
    match (got, expected) {
        (None, 0) => Ok(()),
        (Some(_), 0) => Err(MoleError::Unsupported(format!("`{name}` was given, but this fused call takes none"))),
        (None, _) => Err(MoleError::MissingInput { name, needed_by: "the fused layer kernels" }),
        (Some(n), e) if n != e => Err(MoleError::ShapeMismatch { what: name, expected: vec![e], got: n }),
        _ => Ok(()),
    }
}

/// Checks one buffer and keeps its stream guard until the launches are enqueued.
fn take<'a>(
    guards: &mut Vec<SyncOnDrop<'a>>,
    name: &'static str,
    len: Option<usize>,
    ptr: Option<(CUdeviceptr, SyncOnDrop<'a>)>,
    want: usize,
) -> Result<CUdeviceptr> {
    check_buffer(name, len, want)?;
    Ok(ptr.map_or(0, |(p, g)| {
        guards.push(g);
        p
    }))
}

/// Runs `plan` (made by [`super::plan`] or [`super::plan_route_only`] for `build`) on the
/// device's stream, then the statistics' final sum when the plan has one.
pub fn forward<T: KernelElement>(
    device: &Device,
    build: &KernelBuild,
    plan: &FusedPlan,
    bufs: FusedBuffers<'_, T>,
) -> Result<()> {
    check_build(build, plan, T::DTYPE)?;
    let stream = device.stream();
    let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
    let l = plan.lens;
    macro_rules! dev {
        ($name:literal, $buf:expr, $want:expr) => {{
            let b = $buf;
            take(&mut guards, $name, b.map(|s| s.len()), b.map(|s| s.device_ptr(stream)), $want)?
        }};
    }
    macro_rules! dev_mut {
        ($name:literal, $buf:expr, $want:expr) => {{
            let b = $buf;
            let len = b.as_ref().map(|s| s.len());
            take(&mut guards, $name, len, b.map(|s| s.device_ptr_mut(stream)), $want)?
        }};
    }
    let ptrs = RawFusedPointers {
        x: dev!("x", bufs.x, l.x),
        a: dev!("a", bufs.a, l.a),
        b: dev!("b", bufs.b, l.b),
        y: dev_mut!("y", bufs.y, l.y),
        router_weight: dev!("router_weight", bufs.router_weight, l.router_weight),
        router_bias: dev!("router_bias", bufs.router_bias, l.router_bias),
        gate_in: dev!("gate_in", bufs.gate_in, l.gate_in),
        adapter_ids: dev!("adapter_ids", bufs.adapter_ids, l.adapter_ids),
        selection_bias: dev!("selection_bias", bufs.selection_bias, l.selection_bias),
        rank_offsets: dev!("rank_offsets", bufs.rank_offsets, l.rank_offsets),
        cores: dev!("cores", bufs.cores, l.cores),
        ids: dev_mut!("ids", bufs.ids, l.routing),
        weights: dev_mut!("weights", bufs.weights, l.routing),
        probs: dev_mut!("probs", bufs.probs, l.probs),
        stats_ws: dev_mut!("stats_ws", bufs.stats_ws, l.stats_ws),
        stats_out: dev_mut!("stats_out", bufs.stats_out, l.stats_out),
        hz_part: dev_mut!("hz_part", bufs.hz_part, l.hz_part),
    };
    // SAFETY: every pointer comes from a live CudaSlice of the device's context whose length was
    // checked against the plan above (absent where the plan takes none); `y` and the outputs are
    // distinct `&mut` borrows, so they overlap nothing; the guards keep cudarc's stream ordering
    // of each slice until the launches are enqueued.
    let r = unsafe { launch_all(device, build, plan, ptrs, stream.cu_stream()) };
    drop(guards);
    r
}

/// [`forward`] on caller-owned device memory and stream.
///
/// # Safety
/// - every pointer the plan needs (a non-zero length in [`FusedPlan::lens`]) is a device
///   allocation of the device's context holding at least that many elements of its type (see
///   [`RawFusedPointers`]); the others are ignored;
/// - `rank_offsets` holds the spec's rank offsets; `adapter_ids` may hold any value (ids
///   outside `0..E` contribute nothing);
/// - `y`, the outputs and the workspaces overlap no other buffer;
/// - `stream` is a live stream of the device's context (or null for the legacy default stream),
///   and the buffers stay alive and untouched by other work until the kernels have finished.
pub unsafe fn forward_raw(
    device: &Device,
    build: &KernelBuild,
    plan: &FusedPlan,
    ptrs: RawFusedPointers,
    stream: CUstream,
) -> Result<()> {
    check_build(build, plan, build.dtype)?;
    // The tensor-core kernel reads x and B in 16-byte segments; misaligned views take the FMA one.
    let aligned_plan;
    let plan = if plan.uses_tensor_cores() && (!ptrs.x.is_multiple_of(16) || !ptrs.b.is_multiple_of(16)) {
        aligned_plan = plan.clone().without_tensor_cores();
        &aligned_plan
    } else {
        plan
    };
    let ptrs = ptrs.for_plan(&plan.lens)?;
    // SAFETY: forwarded from the caller's contract; absent buffers are passed as null, which the
    // kernels never dereference for this plan.
    unsafe { launch_all(device, build, plan, ptrs, stream) }
}

/// Launches `launch` with `args` (pointers to the parameter values).
///
/// # Safety
/// `args` must match the kernel's parameter list, each pointing at a live value.
unsafe fn launch_one(
    device: &Device,
    build: &KernelBuild,
    launch: &FusedLaunch,
    stream: CUstream,
    args: &mut [*mut c_void],
) -> Result<()> {
    let func = device.function(build, &entry_name(launch.entry, build.dtype))?;
    // SAFETY: forwarded from the caller's contract.
    unsafe { device.launch_raw(&func, launch.config(), stream, args) }
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// # Safety
/// The pointers satisfy [`forward_raw`]'s contract for `plan`.
unsafe fn launch_all(
    device: &Device,
    build: &KernelBuild,
    plan: &FusedPlan,
    p: RawFusedPointers,
    stream: CUstream,
) -> Result<()> {
    let mut params = plan.params;
    for launch in &plan.launches {
        let mut gate = [
            p.router_weight,
            p.router_bias,
            p.gate_in,
            p.adapter_ids,
            p.selection_bias,
            p.rank_offsets,
            p.cores,
            p.ids,
            p.weights,
            p.probs,
            p.stats_ws,
        ];
        let mut head: Vec<CUdeviceptr> = match launch.entry {
            super::entry::LAYER | super::entry::LAYER_MMA => vec![p.x, p.a, p.b, p.y],
            super::entry::SPLIT_SHRINK => vec![p.x, p.a, p.router_weight, p.hz_part],
            _ => vec![p.hz_part, p.b, p.y],
        };
        let mut args: Vec<*mut c_void> = vec![arg(&mut params)];
        args.extend(head.iter_mut().map(arg));
        if launch.entry != super::entry::SPLIT_SHRINK {
            args.extend(gate.iter_mut().map(arg));
        }
        // SAFETY: the argument lists match fused.cu's signatures (params, then the pointers in
        // declaration order) and the pointers satisfy the caller's contract.
        unsafe { launch_one(device, build, launch, stream, &mut args) }?;
    }
    if let Some(stats) = &plan.stats {
        let gating_build = gating::default_builds()
            .into_iter()
            .find(|b| b.dtype == build.dtype)
            .ok_or_else(|| MoleError::Unsupported(format!("no gating build for {}", build.dtype)))?;
        let finalize: &KernelLaunch = &stats.finalize;
        let func = device.function(&gating_build, &finalize.kernel.entry_name(build.dtype))?;
        let mut sp = stats.params;
        let (mut ws, mut out) = (p.stats_ws, p.stats_out);
        let mut args = [arg(&mut sp), arg(&mut ws), arg(&mut out)];
        // SAFETY: gating_stats_finalize(params, workspace, out); the workspace holds the rows the
        // fused launches wrote for `chunks = tiles`, `out` holds 4E + 2 floats.
        unsafe { device.launch_raw(&func, finalize.config(), stream, &mut args) }?;
    }
    Ok(())
}
