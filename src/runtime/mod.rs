//! The layer runtime: what a framework calls. A [`CompiledLayer`] is built once per layer from a
//! device (or a framework's adopted context), a [`LayerSpec`], a dtype and an optional tuning
//! cache; it owns the layer's constants on the device ([`LayerConstants`]: the rank offsets and
//! the per-expert scales) and the loaded kernels,
//! chooses the strategy per token bucket and memoises plans per token count ([`LayerPlanner`]).
//!
//! [`CompiledLayer::forward`] runs on the caller's memory and stream: typed cudarc views
//! ([`LayerIo`]) or raw device pointers ([`CompiledLayer::forward_raw`]), plus one workspace of
//! [`CompiledLayer::workspace_bytes`] bytes (256-byte aligned, as every allocation is). A forward
//! allocates no device memory, copies nothing between host and device, never synchronises, and
//! launches the same kernels with the same arguments every time for a given token count and set of
//! addresses. [`CompiledLayer::forward_raw`] can therefore be captured in a CUDA graph (call
//! [`CompiledLayer::prepare`] for each token count first: the first forward of a new token bucket
//! may compile kernels). The typed [`CompiledLayer::forward`] goes through cudarc's stream-ordering
//! events of each view, which a capture would take in: capture the raw call. A captured graph
//! reads the layer's constants, so it must not outlive the layer; dropping a layer waits for the
//! work of its context first.

mod backward;
mod choice;
mod ffn;
mod memo;
mod plan;

pub use backward::{BackwardIo, BackwardLayerPlan, BackwardPointers, WgradJob};
pub use choice::{choose, default_build, heuristic, Choice, ChoiceSource};
pub use ffn::{CompiledFfn, FfnLayerPlan, FfnPlanner, FfnPointers, FfnStageBuffers};
pub use plan::{LayerPlan, LayerPlanner, Path};
/// What the runtime binds itself (the caller's buffers, the workspace regions and their
/// alignment), public API with the `internals` feature.
#[cfg(feature = "internals")]
pub use plan::{CALLER_BUFS, SAVED_BUFS, WORKSPACE_ALIGN, WORKSPACE_BUFS};

use crate::cuda::{cuda_err, Device};
use crate::kernels::exec::{Bindings, Buf, CudaBackend, LoadedBuild, TypedBindings};
use crate::kernels::KernelBuild;
use crate::model::LayerSpec;
use crate::tune::TuningCache;
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// The caller's tensors of a forward, as cudarc views (a `CudaSlice` gives one with `as_view()`,
/// a part of a larger buffer with `slice(..)`). Optional tensors are those the spec may take
/// (see [`LayerSpec`]'s tensor contract).
pub struct LayerIo<'a, T> {
    /// `x [T, d_in]`.
    pub x: CudaView<'a, T>,
    /// `A [d_in, R]` (an expert shard's: `[d_in, R_shard]`).
    pub a: CudaView<'a, T>,
    /// `B [R, d_out]` (an expert shard's: `[R_shard, d_out]`).
    pub b: CudaView<'a, T>,
    /// `y [T, d_out]`, updated in place.
    pub y: CudaViewMut<'a, T>,
    /// `router_weight` (`[d_in, E]` or `[R, E]`).
    pub router_weight: Option<CudaView<'a, T>>,
    /// `router_bias [E]`.
    pub router_bias: Option<CudaView<'a, T>>,
    /// Router logits or gate weights the caller computed, `[T, E]`.
    pub gate_input: Option<CudaView<'a, T>>,
    /// `adapter_ids [T]`.
    pub adapter_ids: Option<CudaView<'a, i32>>,
    /// `selection_bias [E]`.
    pub selection_bias: Option<CudaView<'a, T>>,
    /// `cores [C, R, R]` (CoMoL).
    pub cores: Option<CudaView<'a, T>>,
    /// The workspace, at least [`CompiledLayer::workspace_bytes`] bytes (need not be
    /// initialised; may be shared by layers that do not run concurrently).
    pub workspace: CudaViewMut<'a, u8>,
    /// For training: the buffer the forward saves the routing into for the backward, at least
    /// [`CompiledLayer::saved_bytes`] bytes, kept by the caller until the backward of this call
    /// (one per layer and call, unlike the workspace). `None`: inference.
    pub saved: Option<CudaViewMut<'a, u8>>,
}

impl<'a, T> LayerIo<'a, T> {
    /// The four tensors every layer takes, and the workspace; no optional tensor.
    pub fn new(
        x: CudaView<'a, T>,
        a: CudaView<'a, T>,
        b: CudaView<'a, T>,
        y: CudaViewMut<'a, T>,
        workspace: CudaViewMut<'a, u8>,
    ) -> Self {
        LayerIo {
            x,
            a,
            b,
            y,
            router_weight: None,
            router_bias: None,
            gate_input: None,
            adapter_ids: None,
            selection_bias: None,
            cores: None,
            workspace,
            saved: None,
        }
    }
}

/// Device addresses of the caller's tensors (0: absent), element types as [`LayerIo`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerPointers {
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
    /// Router logits or gate weights.
    pub gate_input: CUdeviceptr,
    /// `adapter_ids`.
    pub adapter_ids: CUdeviceptr,
    /// `selection_bias`.
    pub selection_bias: CUdeviceptr,
    /// `cores`.
    pub cores: CUdeviceptr,
    /// The workspace.
    pub workspace: CUdeviceptr,
    /// Its size in bytes.
    pub workspace_bytes: usize,
    /// The saved buffer of a training forward (0: inference; see [`LayerIo::saved`]).
    pub saved: CUdeviceptr,
    /// Its size in bytes.
    pub saved_bytes: usize,
}

impl LayerPointers {
    fn bind(&self, b: &mut Bindings) {
        for (buf, ptr) in [
            (Buf::X, self.x),
            (Buf::A, self.a),
            (Buf::B, self.b),
            (Buf::Y, self.y),
            (Buf::RouterWeight, self.router_weight),
            (Buf::RouterBias, self.router_bias),
            (Buf::GateInput, self.gate_input),
            (Buf::AdapterIds, self.adapter_ids),
            (Buf::SelectionBias, self.selection_bias),
            (Buf::Cores, self.cores),
        ] {
            b.raw(buf, ptr);
        }
    }
}

/// The constants of a layer that its kernels read from device memory, as the runtime uploads them
/// once per layer and binds them to every forward.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerConstants {
    /// `rank_offsets [E + 1]` (`Buf::RankOffsets`).
    pub rank_offsets: Vec<u32>,
    /// `expert_scales [bank experts]` in f32 (`Buf::ExpertScales`), when the spec has them.
    pub expert_scales: Option<Vec<f32>>,
}

impl LayerConstants {
    /// The constants of the whole layer `spec`.
    pub fn of(spec: &LayerSpec) -> Self {
        LayerConstants {
            rank_offsets: spec.ranks.offsets().iter().map(|&o| o as u32).collect(),
            expert_scales: spec.expert_scales.as_ref().map(|s| s.iter().map(|&v| v as f32).collect()),
        }
    }

    /// The constants `planner` runs with: its rank offsets and the spec's per-expert scales (a
    /// shard's own: offsets rebased to 0, the scales of its experts).
    pub fn for_planner(planner: &LayerPlanner) -> Result<Self> {
        let experts = planner.shard().map_or(0..planner.spec().ranks.num_experts(), |s| s.experts());
        let scales = planner.spec().expert_scales.as_ref();
        Ok(LayerConstants {
            rank_offsets: planner.rank_offsets()?,
            expert_scales: scales.map(|s| s[experts].iter().map(|&v| v as f32).collect()),
        })
    }
}

/// A constant on the device: the slice (kept alive) and its address.
struct DeviceConstant<T> {
    slice: CudaSlice<T>,
    ptr: CUdeviceptr,
}

impl<T> Drop for DeviceConstant<T> {
    /// Kernels on the caller's streams (or a replayed graph) may still read the constant: wait
    /// for the context's work before it is freed.
    fn drop(&mut self) {
        let _ = self.slice.context().synchronize();
    }
}

/// One MoLE layer, ready to run on caller-owned memory (see the module documentation).
pub struct CompiledLayer {
    ctx: Arc<CudaContext>,
    device: Device,
    planner: LayerPlanner,
    /// The rank offsets on the device (uploaded before construction returns).
    rank_offsets: DeviceConstant<u32>,
    /// The per-expert scales on the device, when the spec has them.
    expert_scales: Option<DeviceConstant<f32>>,
    loaded: memo::LoadedBuilds,
}

impl std::fmt::Debug for CompiledLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledLayer").field("planner", &self.planner).finish_non_exhaustive()
    }
}

impl CompiledLayer {
    /// Builds the layer on `device` (see [`Device::new`], or [`Device::from_context`] to adopt a
    /// framework's context): validates the spec, uploads its [`LayerConstants`] (synchronously,
    /// on the device's stream) and keeps `tuning` for the strategy choices. Kernels are loaded on
    /// first use of each build ([`CompiledLayer::prepare`]).
    pub fn new(device: &Device, spec: &LayerSpec, dtype: DType, tuning: Option<TuningCache>) -> Result<Self> {
        let planner = LayerPlanner::new(spec, dtype, device.sm_count(), tuning)?;
        let (rank_offsets, expert_scales) = upload_constants(device, &planner)?;
        Ok(CompiledLayer {
            ctx: device.context().clone(),
            device: device.clone(),
            planner,
            rank_offsets,
            expert_scales,
            loaded: memo::LoadedBuilds::default(),
        })
    }

    /// The layer as the expert shard `shard` (expert parallelism; see
    /// [`LayerPlanner::with_shard`]): forwards take the shard's `A [d_in, R_shard]` and
    /// `B [R_shard, d_out]` and add the shard's part of the delta. Uploads the shard's rank
    /// offsets (synchronously). Errors: as [`LayerPlanner::with_shard`].
    pub fn with_shard(self, shard: crate::model::ExpertShard) -> Result<Self> {
        let planner = self.planner.with_shard(shard)?;
        let (rank_offsets, expert_scales) = upload_constants(&self.device, &planner)?;
        Ok(CompiledLayer { planner, rank_offsets, expert_scales, ..self })
    }

    /// The layer with every token count run by `choice` (see [`LayerPlanner::with_choice`]).
    pub fn with_choice(self, choice: crate::runtime::Choice) -> Self {
        CompiledLayer { planner: self.planner.with_choice(choice), ..self }
    }

    /// The planner (strategy choices and plans; no GPU needed).
    pub fn planner(&self) -> &LayerPlanner {
        &self.planner
    }

    /// The plan of a forward over `tokens` tokens, with its kernels loaded: after this, a
    /// forward of `tokens` tokens compiles nothing (what a CUDA graph capture needs).
    pub fn prepare(&self, tokens: usize) -> Result<Arc<LayerPlan>> {
        let plan = self.planner.plan(tokens)?;
        for build in plan.path.builds() {
            self.loaded(build)?;
        }
        Ok(plan)
    }

    /// Workspace bytes a forward over `tokens` tokens needs.
    pub fn workspace_bytes(&self, tokens: usize) -> Result<usize> {
        self.planner.workspace_bytes(tokens)
    }

    /// Bytes of the saved buffer a training forward over `tokens` tokens writes for the backward
    /// ([`LayerIo::saved`]): the routing, `8 · T · slots` bytes plus alignment.
    pub fn saved_bytes(&self, tokens: usize) -> Result<usize> {
        Ok(self.planner.plan_training(tokens)?.saved_bytes)
    }

    fn loaded(&self, build: &KernelBuild) -> Result<Arc<LoadedBuild>> {
        self.loaded.get(&self.device, build)
    }

    /// Refuses tensors of another element type than the layer's, and a stream of another context.
    fn check_stream<T: KernelElement>(&self, stream: &CudaStream) -> Result<()> {
        if T::DTYPE != self.planner.dtype() {
            return Err(MoleError::Unsupported(format!(
                "the layer was built for {}, the tensors are {}",
                self.planner.dtype(),
                T::DTYPE
            )));
        }
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(MoleError::Unsupported("the stream belongs to another context than the layer's".into()));
        }
        Ok(())
    }

    /// Binds the layer's device constants (rank offsets, per-expert scales).
    fn bind_constants(&self, bindings: &mut Bindings) {
        bindings.sized(Buf::RankOffsets, self.rank_offsets.ptr, self.rank_offsets.slice.len());
        if let Some(DeviceConstant { slice, ptr }) = &self.expert_scales {
            bindings.sized(Buf::ExpertScales, *ptr, slice.len());
        }
    }

    /// Runs `plan` on `bindings` (caller buffers and workspace bound) on `stream`.
    ///
    /// # Safety
    /// [`LayerPlanner::launch`]'s contract, with `stream` a live stream of the layer's context.
    unsafe fn launch(&self, plan: &LayerPlan, bindings: &mut Bindings, stream: CUstream) -> Result<()> {
        self.bind_constants(bindings);
        let builds: Vec<Arc<LoadedBuild>> =
            plan.path.builds().into_iter().map(|b| self.loaded(b)).collect::<Result<_>>()?;
        let refs: Vec<&LoadedBuild> = builds.iter().map(|b| b.as_ref()).collect();
        self.ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))?;
        // SAFETY: forwarded from the caller's contract; the constants are the layer's own.
        unsafe { self.planner.launch(plan, bindings, &mut CudaBackend::new(&refs, stream)) }
    }

    /// One forward over `tokens` tokens on the caller's typed views and `stream` (which must
    /// belong to the layer's context): `y += delta`. Checks every view's length and element type
    /// against the plan before launching anything.
    pub fn forward<T: KernelElement>(&self, stream: &CudaStream, tokens: usize, io: LayerIo<'_, T>) -> Result<()> {
        self.check_stream::<T>(stream)?;
        let plan = match io.saved {
            Some(_) => self.planner.plan_training(tokens)?,
            None => self.planner.plan(tokens)?,
        };
        let LayerIo {
            x,
            a,
            b,
            mut y,
            router_weight,
            router_bias,
            gate_input,
            adapter_ids,
            selection_bias,
            cores,
            mut workspace,
            mut saved,
        } = io;
        check_bytes("workspace", workspace.len(), plan.workspace_bytes)?;
        if let Some(saved) = &saved {
            check_bytes("saved", saved.len(), plan.saved_bytes)?;
        }
        let mut tb = TypedBindings::new(stream, T::DTYPE);
        tb.input(Buf::X, &x).input(Buf::A, &a).input(Buf::B, &b).output(Buf::Y, &mut y);
        tb.input_opt(Buf::RouterWeight, router_weight.as_ref())
            .input_opt(Buf::RouterBias, router_bias.as_ref())
            .input_opt(Buf::GateInput, gate_input.as_ref())
            .input_opt(Buf::AdapterIds, adapter_ids.as_ref())
            .input_opt(Buf::SelectionBias, selection_bias.as_ref())
            .input_opt(Buf::Cores, cores.as_ref());
        let (base, workspace_guard) = workspace.device_ptr_mut(stream);
        let saved_guard = saved.as_mut().map(|s| s.device_ptr_mut(stream));
        let mut bindings = *tb.bindings()?;
        plan.bind_workspace(&mut bindings, base)?;
        if let Some((saved_base, _)) = &saved_guard {
            plan.bind_saved(&mut bindings, *saved_base)?;
        }
        // SAFETY: every address comes from a live view of the stream's context with its length
        // bound and checked against the plan; `y`, the workspace and the saved buffer are
        // distinct `&mut` views; the guards keep each view's stream ordering until the launches
        // are enqueued.
        let r = unsafe { self.launch(&plan, &mut bindings, stream.cu_stream()) };
        drop((tb, workspace_guard, saved_guard));
        r
    }

    /// [`CompiledLayer::forward`] on raw device pointers and a raw stream.
    ///
    /// # Safety
    /// Every non-zero pointer is a device allocation of the layer's context holding at least the
    /// plan's element count of its buffer ([`LayerPlan::lens`], element types as [`LayerIo`]);
    /// the workspace holds `workspace_bytes >= ` [`CompiledLayer::workspace_bytes`] bytes and
    /// a non-zero saved buffer `saved_bytes >=` [`CompiledLayer::saved_bytes`] bytes; `y`, the
    /// workspace and the saved buffer overlap nothing else; `stream` is a live stream of the layer's
    /// context (or null for the legacy default stream), and the buffers stay alive and untouched
    /// by other work until the kernels have finished.
    pub unsafe fn forward_raw(&self, stream: CUstream, tokens: usize, ptrs: LayerPointers) -> Result<()> {
        let plan = match ptrs.saved {
            0 => self.planner.plan(tokens)?,
            _ => self.planner.plan_training(tokens)?,
        };
        check_region("workspace", ptrs.workspace, ptrs.workspace_bytes, plan.workspace_bytes)?;
        check_region("saved", ptrs.saved, ptrs.saved_bytes, plan.saved_bytes)?;
        let mut bindings = Bindings::new();
        ptrs.bind(&mut bindings);
        plan.bind_workspace(&mut bindings, ptrs.workspace)?;
        plan.bind_saved(&mut bindings, ptrs.saved)?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.launch(&plan, &mut bindings, stream) }
    }
}

/// `got` bytes of the caller's `what` buffer against the `need` of a plan.
fn check_bytes(what: &'static str, got: usize, need: usize) -> Result<()> {
    if got < need {
        return Err(MoleError::ShapeMismatch { what, expected: vec![need], got });
    }
    Ok(())
}

/// A raw buffer `what` at `ptr` of `bytes` bytes against the `need` of a plan: large enough, and
/// present where needed.
fn check_region(what: &'static str, ptr: CUdeviceptr, bytes: usize, need: usize) -> Result<()> {
    check_bytes(what, bytes, need)?;
    if need > 0 && ptr == 0 {
        return Err(MoleError::MissingInput { name: what, needed_by: "the layer" });
    }
    Ok(())
}

/// Uploads `planner`'s [`LayerConstants`] on the device's stream and waits for them: forwards on
/// other streams read them without waiting on anything.
fn upload_constants(
    device: &Device,
    planner: &LayerPlanner,
) -> Result<(DeviceConstant<u32>, Option<DeviceConstant<f32>>)> {
    let constants = LayerConstants::for_planner(planner)?;
    let stream = device.stream();
    let rank_offsets = upload(stream, &constants.rank_offsets)?;
    let expert_scales = constants.expert_scales.as_deref().map(|s| upload(stream, s)).transpose()?;
    stream.synchronize().map_err(cuda_err("cuStreamSynchronize"))?;
    Ok((rank_offsets, expert_scales))
}

/// Copies `values` to a new device slice on `stream` (asynchronously: the caller synchronises).
fn upload<T: cudarc::driver::DeviceRepr>(stream: &Arc<CudaStream>, values: &[T]) -> Result<DeviceConstant<T>> {
    let slice = stream.clone_htod(values).map_err(cuda_err("cuMemcpyHtoD"))?;
    let (ptr, guard) = slice.device_ptr(stream);
    drop(guard);
    Ok(DeviceConstant { slice, ptr })
}
