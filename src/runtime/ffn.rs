//! The FFN-expert block (MixLoRA) at run time: [`FfnPlanner`], the pure half (what a forward of `T`
//! tokens launches and which workspace it needs, memoised, no GPU), and [`CompiledFfn`], what a
//! framework calls on its own memory and stream.
//!
//! A forward: the route-only fused launch (the block's router and rule on `x`), the per-slot
//! routing plans on the device, then the block's kernels ([`crate::kernels::ffn`]) around three
//! dense projections: `G = x·W_gate` and `U = x·W_up` before, `y = a_mix·W_down` after. Those run
//! through cuBLAS ([`CompiledFfn::forward`], [`CompiledFfn::forward_raw`]) or are the caller's
//! own GEMMs ([`CompiledFfn::activation_raw`], then the caller's `y = a_mix·W_down`, then
//! [`CompiledFfn::down_delta_raw`]); `G`, `U` and `a_mix` live in the workspace
//! ([`CompiledFfn::stage_buffers`]). `y` is the block's output (overwritten, as MixLoRA's block
//! returns it). The same guarantees as [`super::CompiledLayer`]: no allocation, no host copy, no
//! synchronisation in a forward once [`CompiledFfn::prepare`] (and, for the cuBLAS forward on a
//! stream, [`CompiledFfn::prepare_cublas`]) ran, so a forward can be captured in a CUDA graph;
//! deterministic for a given token count. Every input of a forward is checked before its first
//! launch.
//!
//! **The block's builds**: the ffn build is chosen per token bucket, as a layer's strategy is:
//! a fresh tuning-cache entry for the block's key ([`crate::tune::ShapeKey::for_ffn`], looked up
//! at the bucket's largest count) with the [`Strategy::FfnBlock`] strategy and a usable build
//! (the block's dtype, a valid ffn configuration whose `max_rank` holds every expert's rank and
//! whose tile height has an SGMV pair), else [`FfnConfig::DEFAULT`]. The SGMV build follows from
//! the ffn build ([`ffn::sgmv_build_for`]); the routing launch and the slot plans use their
//! families' defaults.

use crate::cuda::{cuda_err, Blas, Device, DeviceMatrix, Gemm};
use crate::kernels::exec::{Backend, Bindings, Buf, BufLens, CudaBackend, LoadedBuild};
use crate::kernels::ffn::{self, FfnBank, FfnConfig, FfnPlan, FfnShape};
use crate::kernels::fused::{self, FusedConfig, FusedOutputs, FusedPlan};
use crate::kernels::gating::{self, SlotGroupingPlan};
use crate::kernels::sgmv::SgmvConfig;
use crate::kernels::KernelBuild;
use crate::model::{FfnSpec, LayerSpec, Mix, RankLayout};
use crate::runtime::ChoiceSource;
use crate::tune::{token_bucket, ShapeKey, Strategy, TunedEntry, TuningCache};
use crate::{DType, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use std::sync::{Arc, Mutex};

use super::plan::WORKSPACE_ALIGN;

/// Buffers carved out of the workspace, in carving order: the routing and its plans, the
/// partials, and the stage buffers `G`, `U`, `a_mix`.
const FFN_WORKSPACE_BUFS: [Buf; 15] = [
    Buf::Ids,
    Buf::RouteWeights,
    Buf::PlanWorkspace,
    Buf::PlanCounts,
    Buf::PlanOffsets,
    Buf::PlanEntries,
    Buf::PlanStatus,
    Buf::StatsWorkspace,
    Buf::Partials,
    Buf::GatePartials,
    Buf::UpPartials,
    Buf::DownPartials,
    Buf::GateOut,
    Buf::UpOut,
    Buf::AMix,
];

/// A forward of a given token count: the launches and the workspace layout.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnLayerPlan {
    /// Tokens.
    pub tokens: usize,
    /// The fused build of the routing launch, and that launch.
    pub route: (KernelBuild, FusedPlan),
    /// The gating build of the slot plans, and their launches.
    pub grouping: (KernelBuild, SlotGroupingPlan),
    /// The SGMV build (shrinks, down expand).
    pub sgmv_build: KernelBuild,
    /// The ffn build and the block's launches.
    pub ffn: (KernelBuild, FfnPlan),
    /// Whether a tuning entry chose the ffn build ([`ChoiceSource::Tuned`]; also for a build
    /// forced with [`FfnPlanner::with_build`]), an entry at a nearby token bucket did
    /// ([`ChoiceSource::TunedNearby`]), or it is the default ([`ChoiceSource::Heuristic`]).
    pub source: ChoiceSource,
    /// Every buffer the launches take, with its length.
    pub lens: BufLens,
    /// `(buffer, byte offset)` of each workspace region.
    pub regions: Vec<(Buf, usize)>,
    /// Workspace bytes.
    pub workspace_bytes: usize,
}

impl FfnLayerPlan {
    /// The builds whose kernels the plan launches.
    pub fn builds(&self) -> [&KernelBuild; 4] {
        [&self.route.0, &self.grouping.0, &self.sgmv_build, &self.ffn.0]
    }

    /// Binds the workspace regions at `base` (256-byte aligned) into `bindings`.
    pub fn bind_workspace(&self, bindings: &mut Bindings, base: u64) -> Result<()> {
        super::plan::bind_regions(&self.regions, &self.lens, bindings, base)
    }

    /// Byte offset of `buf`'s workspace region.
    fn offset(&self, buf: Buf) -> Option<usize> {
        self.regions.iter().find(|(b, _)| *b == buf).map(|&(_, o)| o)
    }
}

/// Plans of one block, memoised: the ffn build per token bucket (see the module documentation),
/// the launches per token count.
#[derive(Debug)]
pub struct FfnPlanner {
    spec: FfnSpec,
    dtype: DType,
    tuning: Option<TuningCache>,
    forced: Option<KernelBuild>,
    /// The ffn build of each token bucket.
    choices: Mutex<Vec<(u32, (KernelBuild, ChoiceSource))>>,
    /// The routing as a layer spec (the block's gating on `x`; its bank is never read).
    route_spec: LayerSpec,
    /// Rank offsets of the gate, up and down banks.
    offsets: [Option<Vec<u32>>; 3],
    plans: super::memo::PlanMemo<FfnLayerPlan>,
}

impl FfnPlanner {
    /// The planner of `spec` in `dtype` with the default builds: validates the spec.
    pub fn new(spec: &FfnSpec, dtype: DType) -> Result<Self> {
        spec.validate()?;
        let route_spec = LayerSpec {
            d_in: spec.d,
            d_out: spec.d,
            ranks: RankLayout::uniform(spec.experts, 1)?,
            scale: 1.0,
            gating: spec.gating,
            mix: Mix::ExpertScale,
            expert_scales: None,
            training: Default::default(),
        };
        let offs = |l: Option<&crate::model::ProjectionLora>| {
            l.map(|l| l.ranks.offsets().iter().map(|&o| o as u32).collect::<Vec<u32>>())
        };
        let offsets = [offs(spec.gate.as_ref()), offs(spec.up.as_ref()), offs(spec.down.as_ref())];
        Ok(FfnPlanner {
            spec: spec.clone(),
            dtype,
            tuning: None,
            forced: None,
            choices: Mutex::new(Vec::new()),
            route_spec,
            offsets,
            plans: Default::default(),
        })
    }

    /// The planner choosing each token bucket's ffn build from `tuning` where it has a usable
    /// entry for the block (the default otherwise; see the module documentation).
    pub fn with_tuning(self, tuning: Option<TuningCache>) -> Self {
        FfnPlanner { tuning, choices: Mutex::new(Vec::new()), plans: Default::default(), ..self }
    }

    /// The planner with every token count run by the ffn build `ffn_build` and its SGMV pair
    /// (the autotuner and the benchmarks time one build at a time). Errors at planning time when
    /// the build cannot run the block (another family or dtype, an invalid configuration, a
    /// `max_rank` below an expert's rank, a tile height without an SGMV pair).
    pub fn with_build(self, ffn_build: KernelBuild) -> Self {
        FfnPlanner { forced: Some(ffn_build), choices: Mutex::new(Vec::new()), plans: Default::default(), ..self }
    }

    /// Why `ffn_build` cannot run this block, or `Ok` with its SGMV pair.
    fn usable(&self, ffn_build: &KernelBuild) -> Result<KernelBuild> {
        if ffn_build.dtype != self.dtype {
            return Err(MoleError::param("ffn_build", ffn_build, "its dtype differs from the block's"));
        }
        let config = FfnConfig::of(ffn_build)?;
        let rank = self.offsets.iter().flatten().flat_map(|o| o.windows(2).map(|w| w[1] - w[0])).max().unwrap_or(0);
        if rank > config.max_rank {
            return Err(MoleError::param("ffn_build", ffn_build, "its max_rank is below an expert's rank"));
        }
        ffn::sgmv_build_for(ffn_build)
    }

    /// The ffn build of `tokens`' bucket and where it came from (memoised per bucket).
    fn choice(&self, tokens: usize) -> Result<(KernelBuild, ChoiceSource)> {
        if let Some(b) = &self.forced {
            self.usable(b)?;
            return Ok((b.clone(), ChoiceSource::Tuned));
        }
        let bucket = token_bucket(tokens);
        let mut choices = self.choices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = choices.iter().find(|(b, _)| *b == bucket) {
            return Ok(c.clone());
        }
        // Every count of a bucket runs what its largest would (as a layer's strategy): the
        // build, and so every reduction order, does not depend on which count came first.
        let key = ShapeKey::for_ffn(&self.spec, self.dtype, bucket as usize);
        let usable = |e: &TunedEntry| e.strategy == Strategy::FfnBlock && self.usable(&e.build).is_ok();
        let c = match self.tuning.as_ref().and_then(|t| t.nearest(&key, usable)) {
            Some(e) if e.key.token_bucket == key.token_bucket => (e.build.clone(), ChoiceSource::Tuned),
            Some(e) => (e.build.clone(), ChoiceSource::TunedNearby),
            None => (ffn::build(self.dtype, FfnConfig::DEFAULT), ChoiceSource::Heuristic),
        };
        choices.push((bucket, c.clone()));
        Ok(c)
    }

    /// The block.
    pub fn spec(&self) -> &FfnSpec {
        &self.spec
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Rank offsets of the gate, up and down banks (`None` where the projection has no LoRA).
    pub fn rank_offsets(&self) -> &[Option<Vec<u32>>; 3] {
        &self.offsets
    }

    /// The plan of a forward over `tokens` tokens (memoised).
    pub fn plan(&self, tokens: usize) -> Result<Arc<FfnLayerPlan>> {
        self.plans.get(tokens, || self.make_plan(tokens))
    }

    /// Workspace bytes a forward over `tokens` tokens needs.
    pub fn workspace_bytes(&self, tokens: usize) -> Result<usize> {
        Ok(self.plan(tokens)?.workspace_bytes)
    }

    fn make_plan(&self, tokens: usize) -> Result<FfnLayerPlan> {
        crate::limits::check_max("tokens", tokens, crate::limits::MAX_TOKENS)?;
        let (spec, dtype) = (&self.spec, self.dtype);
        let route_build = fused::build(dtype, FusedConfig::DEFAULT);
        let route = fused::plan_route_only(&route_build, &self.route_spec, tokens, FusedOutputs::default())?;
        let slots = route.params.gate.slots as usize;
        let gating_build = gating::default_builds()
            .into_iter()
            .find(|b| b.dtype == dtype)
            .ok_or_else(|| MoleError::Unsupported(format!("no gating build for {dtype}")))?;
        let (ffn_build, source) = self.choice(tokens)?;
        let sgmv_build = self.usable(&ffn_build)?;
        let bm = SgmvConfig::of(&sgmv_build)?.bm as usize;
        let e = spec.experts;
        let grouping = gating::plan_slot_grouping(tokens, slots, 0..e, e, bm, gating_build.block_threads())?;
        let bank = |i: usize, scale: Option<f64>| {
            self.offsets[i].as_deref().zip(scale).map(|(o, s)| FfnBank { rank_offsets: o, scale: s as f32 })
        };
        let shape = FfnShape {
            tokens,
            slots,
            experts: e,
            d: spec.d,
            f: spec.f,
            activation: spec.activation,
            gate: bank(0, spec.gate.as_ref().map(|l| l.scale)),
            up: bank(1, spec.up.as_ref().map(|l| l.scale)),
            down: bank(2, spec.down.as_ref().map(|l| l.scale)),
        };
        let ffn_plan = ffn::plan(&sgmv_build, &ffn_build, shape, grouping.entry_stride)?;
        let mut lens = BufLens::new();
        for l in [&route.lens, grouping.lens(), &ffn_plan.lens] {
            for (buf, n) in l.taken() {
                lens.set(buf, lens.get(buf).max(n));
            }
        }
        let (regions, bytes) = super::plan::carve_workspace(&lens, dtype, &FFN_WORKSPACE_BUFS);
        Ok(FfnLayerPlan {
            tokens,
            route: (route_build, route),
            grouping: (gating_build, grouping),
            sgmv_build,
            ffn: (ffn_build, ffn_plan),
            source,
            lens,
            regions,
            workspace_bytes: bytes,
        })
    }

    /// The first half of a forward through `backend`: routing, slot plans, the gate and up
    /// shrinks and the act passes, leaving `a_mix` (and the down partials) in the workspace.
    /// `G` and `U` must be in their workspace regions.
    ///
    /// # Safety
    /// As `Backend::launch`: every bound address holds at least the plan's length of its buffer
    /// ([`FfnLayerPlan::lens`]); the rank offsets are [`FfnPlanner::rank_offsets`]; the workspace
    /// overlaps nothing else.
    pub unsafe fn launch_activation(
        &self,
        plan: &FfnLayerPlan,
        bindings: &Bindings,
        backend: &mut dyn Backend,
    ) -> Result<()> {
        let mut lens = plan.lens;
        lens.set(Buf::Y, 0);
        lens.set(Buf::DownB, 0);
        bindings.check(&lens, "the FFN block")?;
        let (route_build, route) = &plan.route;
        let (gating_build, grouping) = &plan.grouping;
        let (ffn_build, ffn_plan) = &plan.ffn;
        // SAFETY: forwarded from the caller's contract, checked above; the stages run in stream
        // order, each reading what the previous one wrote into the workspace.
        unsafe {
            fused::run(route_build, route, bindings, backend)?;
            gating::run_group_slots(gating_build, grouping, bindings, backend)?;
            ffn::run_activation(&plan.sgmv_build, ffn_build, ffn_plan, bindings, backend)
        }
    }

    /// The second half: `y += s_d·w·(a_e·A^d_e)·B^d_e` per selected expert on a `y` that holds
    /// `a_mix·W_down`, from the down partials of the first half.
    ///
    /// # Safety
    /// [`FfnPlanner::launch_activation`]'s contract, after it ran on the same workspace.
    pub unsafe fn launch_down_delta(
        &self,
        plan: &FfnLayerPlan,
        bindings: &Bindings,
        backend: &mut dyn Backend,
    ) -> Result<()> {
        let (ffn_build, ffn_plan) = &plan.ffn;
        // SAFETY: forwarded from the caller's contract.
        unsafe { ffn::run_down_delta(&plan.sgmv_build, ffn_build, ffn_plan, bindings, backend) }
    }
}

/// Device addresses of the caller's tensors of a block forward (0: absent); elements of the
/// block's dtype except `adapter_ids` (i32). Shapes as [`FfnSpec`]'s tensor contract.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FfnPointers {
    /// `x [T, d]`.
    pub x: CUdeviceptr,
    /// `router_weight [d, E]`, `router_bias [E]`, router logits or gate weights `[T, E]`,
    /// `adapter_ids [T]`, `selection_bias [E]`, as the gating takes them.
    pub gating: [CUdeviceptr; 5],
    /// `base_gate [d, f]`, `base_up [d, f]`, `base_down [f, d]` (read by the cuBLAS forward only).
    pub base: [CUdeviceptr; 3],
    /// `(A, B)` of the gate, up and down banks, where the projection has LoRA.
    pub banks: [(CUdeviceptr, CUdeviceptr); 3],
    /// `y [T, d]`: the block's output.
    pub y: CUdeviceptr,
    /// The workspace.
    pub workspace: CUdeviceptr,
    /// Its size in bytes.
    pub workspace_bytes: usize,
}

/// Where the stage buffers of a forward live in its workspace (for a caller running its own
/// GEMMs): write `G = x·W_gate` and `U = x·W_up` (`[T, f]`, row-major) before
/// [`CompiledFfn::activation_raw`], read `a_mix [T, f]` after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FfnStageBuffers {
    /// `G [T, f]`.
    pub gate_out: CUdeviceptr,
    /// `U [T, f]`.
    pub up_out: CUdeviceptr,
    /// `a_mix [T, f]`.
    pub a_mix: CUdeviceptr,
}

/// The block's constants on the device: the banks' rank offsets.
struct Constants {
    slices: Vec<cudarc::driver::CudaSlice<u32>>,
    ptrs: [Option<(CUdeviceptr, usize)>; 3],
}

impl Drop for Constants {
    /// Kernels (or a replayed graph) may still read them: wait for the context first.
    fn drop(&mut self) {
        if let Some(s) = self.slices.first() {
            let _ = s.context().synchronize();
        }
    }
}

/// One FFN-expert block, ready to run on caller-owned memory (see the module documentation).
pub struct CompiledFfn {
    device: Device,
    planner: FfnPlanner,
    constants: Constants,
    loaded: super::memo::LoadedBuilds,
    blas: Mutex<Option<Arc<Blas>>>,
}

impl std::fmt::Debug for CompiledFfn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledFfn").field("planner", &self.planner).finish_non_exhaustive()
    }
}

impl CompiledFfn {
    /// Builds the block on `device`: validates the spec and uploads the banks' rank offsets
    /// (synchronously). Kernels load on first use ([`CompiledFfn::prepare`]); cuBLAS loads on the
    /// first cuBLAS forward (the caller-GEMM path never needs it).
    pub fn new(device: &Device, spec: &FfnSpec, dtype: DType) -> Result<Self> {
        let planner = FfnPlanner::new(spec, dtype)?;
        let stream = device.stream();
        let mut slices = Vec::new();
        let mut ptrs = [None; 3];
        for (i, offs) in planner.rank_offsets().iter().enumerate() {
            if let Some(o) = offs {
                let slice = stream.clone_htod(o).map_err(cuda_err("cuMemcpyHtoD"))?;
                let (ptr, guard) = cudarc::driver::DevicePtr::device_ptr(&slice, stream);
                drop(guard);
                ptrs[i] = Some((ptr, o.len()));
                slices.push(slice);
            }
        }
        stream.synchronize().map_err(cuda_err("cuStreamSynchronize"))?;
        Ok(CompiledFfn {
            device: device.clone(),
            planner,
            constants: Constants { slices, ptrs },
            loaded: super::memo::LoadedBuilds::default(),
            blas: Mutex::new(None),
        })
    }

    /// The block choosing its ffn build per token bucket from `tuning` (see
    /// [`FfnPlanner::with_tuning`]; [`CompiledFfn::new`] runs the defaults).
    pub fn with_tuning(self, tuning: Option<TuningCache>) -> Self {
        CompiledFfn { planner: self.planner.with_tuning(tuning), ..self }
    }

    /// The block with every token count run by `ffn_build` (see [`FfnPlanner::with_build`]).
    pub fn with_build(self, ffn_build: KernelBuild) -> Self {
        CompiledFfn { planner: self.planner.with_build(ffn_build), ..self }
    }

    /// The planner (plans and workspace sizes; no GPU needed).
    pub fn planner(&self) -> &FfnPlanner {
        &self.planner
    }

    /// Workspace bytes a forward over `tokens` tokens needs.
    pub fn workspace_bytes(&self, tokens: usize) -> Result<usize> {
        self.planner.workspace_bytes(tokens)
    }

    /// The plan of `tokens` tokens with its kernels loaded (a forward then compiles nothing).
    pub fn prepare(&self, tokens: usize) -> Result<Arc<FfnLayerPlan>> {
        let plan = self.planner.plan(tokens)?;
        for build in plan.builds() {
            self.loaded(build)?;
        }
        Ok(plan)
    }

    /// Where `G`, `U` and `a_mix` of a forward over `tokens` tokens live in a workspace at
    /// `workspace` (for the caller-GEMM path).
    pub fn stage_buffers(&self, tokens: usize, workspace: CUdeviceptr) -> Result<FfnStageBuffers> {
        let plan = self.planner.plan(tokens)?;
        if !workspace.is_multiple_of(WORKSPACE_ALIGN as u64) {
            return Err(MoleError::param("workspace", format!("{workspace:#x}"), "must be 256-byte aligned"));
        }
        let at = |buf: Buf| plan.offset(buf).map(|o| workspace + o as u64).unwrap_or(0);
        Ok(FfnStageBuffers { gate_out: at(Buf::GateOut), up_out: at(Buf::UpOut), a_mix: at(Buf::AMix) })
    }

    fn loaded(&self, build: &KernelBuild) -> Result<Arc<LoadedBuild>> {
        self.loaded.get(&self.device, build)
    }

    /// Loads cuBLAS for the cuBLAS forward and allocates `stream`'s cuBLAS workspace, which the
    /// first [`CompiledFfn::forward_raw`] on `stream` would otherwise do: with
    /// [`CompiledFfn::prepare`] for the token count, what a CUDA graph capture of `forward_raw`
    /// on `stream` needs first (a capture cannot allocate). The workspace lives as long as the
    /// block.
    pub fn prepare_cublas(&self, stream: CUstream) -> Result<()> {
        self.blas()?.reserve(stream)
    }

    fn blas(&self) -> Result<Arc<Blas>> {
        let mut blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = blas.as_ref() {
            return Ok(b.clone());
        }
        let b = Arc::new(Blas::new(&self.device)?);
        *blas = Some(b.clone());
        Ok(b)
    }

    /// The plan of `tokens` and the bindings of `ptrs` (caller buffers, constants, workspace).
    fn bind(&self, tokens: usize, ptrs: &FfnPointers) -> Result<(Arc<FfnLayerPlan>, Bindings)> {
        let plan = self.planner.plan(tokens)?;
        if ptrs.workspace_bytes < plan.workspace_bytes {
            return Err(MoleError::ShapeMismatch {
                what: "workspace",
                expected: vec![plan.workspace_bytes],
                got: ptrs.workspace_bytes,
            });
        }
        if ptrs.workspace == 0 {
            return Err(MoleError::MissingInput { name: "workspace", needed_by: "the FFN block" });
        }
        let mut b = Bindings::new();
        b.raw(Buf::X, ptrs.x).raw(Buf::Y, ptrs.y);
        let gating = [Buf::RouterWeight, Buf::RouterBias, Buf::GateInput, Buf::AdapterIds, Buf::SelectionBias];
        for (buf, ptr) in gating.into_iter().zip(ptrs.gating) {
            b.raw(buf, ptr);
        }
        let banks = [(Buf::GateA, Buf::GateB), (Buf::UpA, Buf::UpB), (Buf::DownA, Buf::DownB)];
        let offsets = [Buf::GateRankOffsets, Buf::UpRankOffsets, Buf::DownRankOffsets];
        for (i, ((a, bb), (pa, pb))) in banks.into_iter().zip(ptrs.banks).enumerate() {
            b.raw(a, pa).raw(bb, pb);
            if let Some((ptr, len)) = self.constants.ptrs[i] {
                b.sized(offsets[i], ptr, len);
            }
        }
        plan.bind_workspace(&mut b, ptrs.workspace)?;
        Ok((plan, b))
    }

    /// Runs one half of the block on `stream`.
    ///
    /// # Safety
    /// [`CompiledFfn::forward_raw`]'s contract.
    unsafe fn run_half(&self, plan: &FfnLayerPlan, b: &Bindings, stream: CUstream, first: bool) -> Result<()> {
        let builds: Vec<Arc<LoadedBuild>> = plan.builds().into_iter().map(|b| self.loaded(b)).collect::<Result<_>>()?;
        let refs: Vec<&LoadedBuild> = builds.iter().map(|b| b.as_ref()).collect();
        self.device.bind()?;
        let mut backend = CudaBackend::new(&refs, stream);
        // SAFETY: forwarded from the caller's contract; the constants are the block's own.
        unsafe {
            if first {
                self.planner.launch_activation(plan, b, &mut backend)
            } else {
                self.planner.launch_down_delta(plan, b, &mut backend)
            }
        }
    }

    /// The caller-GEMM path, first half: with `G` and `U` written into the workspace's stage
    /// buffers ([`CompiledFfn::stage_buffers`]), routes, plans and computes `a_mix` there. The
    /// caller then writes `y = a_mix·W_down` and calls [`CompiledFfn::down_delta_raw`].
    ///
    /// # Safety
    /// [`CompiledFfn::forward_raw`]'s contract (the base weights are not read), with the stage
    /// buffers `G` and `U` written.
    pub unsafe fn activation_raw(&self, stream: CUstream, tokens: usize, ptrs: FfnPointers) -> Result<()> {
        let (plan, b) = self.bind(tokens, &ptrs)?;
        // SAFETY: the caller's contract.
        unsafe { self.run_half(&plan, &b, stream, true) }
    }

    /// The caller-GEMM path, second half: adds the down-LoRA delta of every selected expert to
    /// `y` (which holds `a_mix·W_down`), on the same workspace as [`CompiledFfn::activation_raw`].
    ///
    /// # Safety
    /// [`CompiledFfn::forward_raw`]'s contract, after `activation_raw` on the same workspace.
    pub unsafe fn down_delta_raw(&self, stream: CUstream, tokens: usize, ptrs: FfnPointers) -> Result<()> {
        let (plan, b) = self.bind(tokens, &ptrs)?;
        // SAFETY: the caller's contract.
        unsafe { self.run_half(&plan, &b, stream, false) }
    }

    /// One whole forward over `tokens` tokens on raw pointers, the dense projections through
    /// cuBLAS: `y = block(x)`.
    ///
    /// # Safety
    /// Every non-zero pointer is a device allocation of the block's context holding its tensor
    /// ([`FfnSpec`]'s shapes for `tokens` tokens); the workspace holds `workspace_bytes >=`
    /// [`CompiledFfn::workspace_bytes`] bytes, 256-byte aligned; `y` and the workspace overlap
    /// nothing else; `stream` is a live stream of the block's context, and the buffers stay
    /// alive and untouched by other work until the kernels have finished.
    pub unsafe fn forward_raw(&self, stream: CUstream, tokens: usize, ptrs: FfnPointers) -> Result<()> {
        let (plan, b) = self.bind(tokens, &ptrs)?;
        let (d, f, dtype) = (self.planner.spec.d, self.planner.spec.f, self.planner.dtype);
        for (name, p) in [("base_gate", ptrs.base[0]), ("base_up", ptrs.base[1]), ("base_down", ptrs.base[2])] {
            if p == 0 {
                return Err(MoleError::MissingInput { name, needed_by: "the cuBLAS forward of the FFN block" });
            }
        }
        // Everything both halves and the three products take, before the first launch.
        b.check(&plan.lens, "the FFN block")?;
        let blas = self.blas()?;
        let m = |ptr: u64, rows: usize, cols: usize| DeviceMatrix { ptr, len: rows * cols, ld: cols };
        let up_proj = Gemm { dtype, m: tokens, n: f, k: d, alpha: 1.0, beta: 0.0 };
        let down_proj = Gemm { dtype, m: tokens, n: d, k: f, alpha: 1.0, beta: 0.0 };
        let (x, gate_out, up_out, a_mix) = (b.ptr(Buf::X), b.ptr(Buf::GateOut), b.ptr(Buf::UpOut), b.ptr(Buf::AMix));
        let products = [
            (&up_proj, m(x, tokens, d), m(ptrs.base[0], d, f), m(gate_out, tokens, f)),
            (&up_proj, m(x, tokens, d), m(ptrs.base[1], d, f), m(up_out, tokens, f)),
            (&down_proj, m(a_mix, tokens, f), m(ptrs.base[2], f, d), m(ptrs.y, tokens, d)),
        ];
        for (op, a, w, c) in &products {
            blas.validate(stream, op, a, w, c)?;
        }
        let [gate, up, down] = products;
        // SAFETY: the caller's contract for x, the base weights and y; the stage buffers are
        // workspace regions of T·f elements each, bound above; all on `stream`, in order.
        unsafe {
            blas.gemm(stream, gate.0, gate.1, gate.2, gate.3)?;
            blas.gemm(stream, up.0, up.1, up.2, up.3)?;
            self.run_half(&plan, &b, stream, true)?;
            blas.gemm(stream, down.0, down.1, down.2, down.3)?;
            self.run_half(&plan, &b, stream, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sgmv;
    use crate::model::{FfnMethod, FfnShape as Shape};
    use crate::tune::cache::Provenance;
    use crate::tune::{Candidate, GpuId, TunedEntry};

    fn spec() -> FfnSpec {
        let shape = Shape { d: 256, f: 704, experts: 8, rank: 16, k: 2, alpha: 32.0, activation: Default::default() };
        FfnMethod::MixLora.spec(shape).unwrap()
    }

    fn planner() -> FfnPlanner {
        FfnPlanner::new(&spec(), DType::BF16).unwrap()
    }

    /// The bm-16 ffn candidate.
    fn small_tile(dtype: DType) -> KernelBuild {
        ffn::build(dtype, ffn::CONFIG_CANDIDATES.into_iter().find(|c| c.bm == 16).unwrap())
    }

    /// A cache with one entry per `(tokens, strategy, build)` under the block's key.
    fn cache(entries: &[(usize, Strategy, KernelBuild)]) -> TuningCache {
        let p = Provenance::current();
        let entries = entries
            .iter()
            .map(|(t, strategy, build)| {
                let key = ShapeKey::for_ffn(&spec(), DType::BF16, *t);
                TunedEntry::new(key, Candidate { strategy: *strategy, build: build.clone() }, 1.0, None, 1.0, &p)
            })
            .collect();
        TuningCache::from_entries(GpuId { name: "test".into(), compute_capability: (9, 0), sm_count: 132 }, entries)
    }

    #[test]
    fn a_tuned_entry_chooses_the_ffn_build_and_its_sgmv_pair_per_bucket() {
        let tuned = small_tile(DType::BF16);
        let p = planner().with_tuning(Some(cache(&[(128, Strategy::FfnBlock, tuned.clone())])));
        let bm16 = sgmv::CONFIG_CANDIDATES.into_iter().find(|c| c.bm == 16).unwrap();
        // Every count of the bucket (65..=128) runs the entry's build.
        for t in [65, 100, 128] {
            let plan = p.plan(t).unwrap();
            assert_eq!((&plan.ffn.0, plan.source), (&tuned, ChoiceSource::Tuned), "T={t}");
            assert_eq!(plan.sgmv_build, sgmv::build(DType::BF16, bm16), "T={t}");
            assert_eq!(plan.ffn.1.config.bm, 16);
            // The slot plans are padded to the pair's tile height (segments of 16, not 32).
            assert_eq!(plan.grouping.1.entry_stride, sgmv::entry_capacity(t, 8, 16), "T={t}");
            assert_eq!(plan.ffn.1.params.entry_stride as usize, plan.grouping.1.entry_stride);
        }
        // Buckets up to two powers of two away (32 ..= 512) run it as "tuned nearby"; farther
        // ones have no entry: the defaults.
        for t in [17, 64, 129, 512] {
            let plan = p.plan(t).unwrap();
            assert_eq!((&plan.ffn.0, plan.source), (&tuned, ChoiceSource::TunedNearby), "T={t}");
            assert_eq!(plan.sgmv_build, sgmv::build(DType::BF16, bm16), "T={t}");
        }
        for t in [16, 513] {
            let plan = p.plan(t).unwrap();
            assert_eq!(plan.ffn.0, ffn::build(DType::BF16, FfnConfig::DEFAULT), "T={t}");
            assert_eq!(
                (plan.sgmv_build.clone(), plan.source),
                (sgmv::build(DType::BF16, SgmvConfig::DEFAULT), ChoiceSource::Heuristic)
            );
        }
        // Without a cache, the defaults everywhere.
        assert_eq!(planner().plan(100).unwrap().ffn.0, ffn::build(DType::BF16, FfnConfig::DEFAULT));
    }

    #[test]
    fn unusable_entries_are_passed_over_for_the_default() {
        let default = ffn::build(DType::BF16, FfnConfig::DEFAULT);
        let tiny_rank = ffn::build(DType::BF16, FfnConfig { max_rank: 8, kc: 8, ..FfnConfig::DEFAULT });
        let no_pair = ffn::build(DType::BF16, FfnConfig { bm: 8, ..FfnConfig::DEFAULT });
        let bad = [
            (Strategy::FfnBlock, small_tile(DType::F16)),
            (Strategy::FfnBlock, tiny_rank.clone()),
            (Strategy::FfnBlock, no_pair.clone()),
            (Strategy::Grouped, sgmv::build(DType::BF16, SgmvConfig::DEFAULT)),
            (Strategy::Grouped, small_tile(DType::BF16)),
        ];
        for (strategy, build) in bad {
            let p = planner().with_tuning(Some(cache(&[(128, strategy, build.clone())])));
            let plan = p.plan(100).unwrap();
            assert_eq!((&plan.ffn.0, plan.source), (&default, ChoiceSource::Heuristic), "{strategy} {build}");
        }
        // Forced, the same builds are errors, not silent substitutes.
        for build in [small_tile(DType::F16), tiny_rank, no_pair, sgmv::build(DType::BF16, SgmvConfig::DEFAULT)] {
            assert!(planner().with_build(build.clone()).plan(100).is_err(), "{build}");
        }
        let forced = planner().with_build(small_tile(DType::BF16)).plan(3).unwrap();
        assert_eq!((forced.ffn.0.clone(), forced.ffn.1.config.bm), (small_tile(DType::BF16), 16));
    }

    #[test]
    fn the_workspace_holds_every_region_aligned_and_apart() {
        let p = planner();
        let plan = p.plan(100).unwrap();
        let mut end = 0;
        for (i, &(buf, off)) in plan.regions.iter().enumerate() {
            assert!(off.is_multiple_of(WORKSPACE_ALIGN) && off >= end, "{buf:?} at {off}");
            end = off + plan.lens.bytes(buf, DType::BF16);
            assert!(i == 0 || plan.regions[i - 1].0 != buf);
        }
        assert!(end <= plan.workspace_bytes);
        for buf in [Buf::GateOut, Buf::UpOut, Buf::AMix, Buf::DownPartials, Buf::PlanEntries, Buf::Ids] {
            assert!(plan.offset(buf).is_some(), "{buf:?} has no region");
        }
        assert_eq!(plan.lens.get(Buf::AMix), 100 * 704);
        // Memoised: the same plan again.
        assert!(Arc::ptr_eq(&plan, &p.plan(100).unwrap()));
        assert_eq!(p.plan(0).unwrap_err(), MoleError::ZeroDimension { name: "tokens" });
    }
}
