//! The pure half of the runtime: what a forward of `T` tokens launches and which workspace it
//! needs, memoised, with no GPU. [`LayerPlanner::launch`] runs a plan through any
//! [`Backend`], so the whole sequence (routing, slot plans, SGMV) runs on the CPU execution
//! layer in tests and on a recorder in the host-cost benchmark.

use crate::kernels::exec::{Backend, Bindings, Buf, BufLens};
use crate::kernels::fused::{self, FusedConfig, FusedOutputs, FusedPlan, FusedVariant};
use crate::kernels::gating::{self, SlotGroupingPlan};
use crate::kernels::sgmv::{self, SgmvPlan, SgmvShape};
use crate::kernels::KernelBuild;
use crate::model::{ExpertShard, LayerSpec};
use crate::runtime::{choose, default_build, Choice, ChoiceSource};
use crate::tune::{token_bucket, Strategy, TuningCache};
use crate::{DType, MoleError, Result};
use std::sync::{Arc, Mutex};

/// Buffers the runtime carves out of the caller's workspace, in carving order.
pub const WORKSPACE_BUFS: [Buf; 9] = [
    Buf::Partials,
    Buf::Ids,
    Buf::RouteWeights,
    Buf::PlanWorkspace,
    Buf::PlanCounts,
    Buf::PlanOffsets,
    Buf::PlanEntries,
    Buf::PlanStatus,
    Buf::StatsWorkspace,
];

/// What a training forward saves for the backward ([`LayerPlanner::plan_training`]), in the
/// caller's saved buffer instead of the workspace: the routing, `ids [T, slots]` (i32) and
/// `weights [T, slots]` (f32).
pub const SAVED_BUFS: [Buf; 2] = [Buf::Ids, Buf::RouteWeights];

/// Alignment of each workspace region, bytes (what the tensor-core kernels' 16-byte loads and
/// the allocator's own alignment give every buffer).
pub const WORKSPACE_ALIGN: usize = 256;

/// Buffers the caller passes to a forward (the runtime owns the layer's constants,
/// [`super::LayerConstants`]).
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
pub const CALLER_BUFS: [Buf; 10] = [
    Buf::X,
    Buf::A,
    Buf::B,
    Buf::Y,
    Buf::RouterWeight,
    Buf::RouterBias,
    Buf::GateInput,
    Buf::AdapterIds,
    Buf::SelectionBias,
    Buf::Cores,
];

/// The launches of one strategy.
// Plans are built once per token count and shared behind an `Arc`: the size difference costs
// nothing where it matters.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Path {
    /// The fused kernels (one launch, or the split pair).
    Fused {
        /// The fused build.
        build: KernelBuild,
        /// Its plan.
        plan: FusedPlan,
    },
    /// Route-only fused launch, per-slot routing plans on the device, SGMV shrink and expands.
    Grouped {
        /// The fused build of the routing launch.
        route_build: KernelBuild,
        /// The routing launch.
        route: FusedPlan,
        /// The gating build of the slot plans.
        gating_build: KernelBuild,
        /// The slot plans.
        grouping: SlotGroupingPlan,
        /// The SGMV build.
        sgmv_build: KernelBuild,
        /// The SGMV launches.
        sgmv: SgmvPlan,
    },
}

impl Path {
    /// The builds the path launches kernels of.
    pub fn builds(&self) -> Vec<&KernelBuild> {
        match self {
            Path::Fused { build, .. } => vec![build],
            Path::Grouped { route_build, gating_build, sgmv_build, .. } => vec![route_build, gating_build, sgmv_build],
        }
    }

    /// Every buffer any launch of the path takes, with the largest length asked for.
    pub fn lens(&self) -> BufLens {
        let all: Vec<BufLens> = match self {
            Path::Fused { plan, .. } => vec![plan.lens],
            Path::Grouped { route, grouping, sgmv, .. } => vec![route.lens, *grouping.lens(), sgmv.lens],
        };
        let mut out = BufLens::new();
        for lens in &all {
            for (buf, n) in lens.taken() {
                out.set(buf, out.get(buf).max(n));
            }
        }
        out
    }
}

/// A forward of a given token count: the strategy, its launches and the workspace layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPlan {
    /// Tokens.
    pub tokens: usize,
    /// The strategy and build, and whether a tuning entry chose them.
    pub choice: Choice,
    /// The launches.
    pub path: Path,
    /// Every buffer the launches take, with its length.
    pub lens: BufLens,
    /// `(buffer, byte offset)` of each workspace region.
    pub regions: Vec<(Buf, usize)>,
    /// Workspace bytes.
    pub workspace_bytes: usize,
    /// `(buffer, byte offset)` of each region of the saved buffer (a training forward's
    /// `SAVED_BUFS`; empty for inference).
    pub saved: Vec<(Buf, usize)>,
    /// Saved-buffer bytes (0 for inference).
    pub saved_bytes: usize,
}

impl LayerPlan {
    /// Binds the workspace regions at `base` into `bindings`, with their lengths. Errors when
    /// `base` is not `WORKSPACE_ALIGN` (256)-byte aligned (the regions' alignment is relative to it,
    /// and the kernels read them with aligned vector and 8-byte accesses) and the plan has a
    /// workspace.
    pub fn bind_workspace(&self, bindings: &mut Bindings, base: u64) -> Result<()> {
        bind_regions(&self.regions, &self.lens, bindings, base)
    }

    /// Binds the saved buffer's regions at `base` (a training plan's; nothing for inference).
    /// Errors as [`LayerPlan::bind_workspace`].
    pub fn bind_saved(&self, bindings: &mut Bindings, base: u64) -> Result<()> {
        bind_regions(&self.saved, &self.lens, bindings, base)
    }
}

/// The workspace regions of `bufs` (in carving order) that `lens` takes, each at a
/// [`WORKSPACE_ALIGN`]-aligned byte offset: `(regions, total bytes)`. Shared by both runtimes.
pub(crate) fn carve_workspace(lens: &BufLens, dtype: DType, bufs: &[Buf]) -> (Vec<(Buf, usize)>, usize) {
    let mut regions = Vec::new();
    let mut bytes = 0usize;
    for &buf in bufs {
        let n = lens.bytes(buf, dtype);
        if n > 0 {
            regions.push((buf, bytes));
            bytes = (bytes + n).div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN;
        }
    }
    (regions, bytes)
}

/// Binds `regions` at `base` into `bindings` with their lengths from `lens`. Errors when there
/// are regions and `base` is not [`WORKSPACE_ALIGN`]-byte aligned (the regions' alignment is
/// relative to it).
pub(crate) fn bind_regions(regions: &[(Buf, usize)], lens: &BufLens, bindings: &mut Bindings, base: u64) -> Result<()> {
    if !regions.is_empty() && !base.is_multiple_of(WORKSPACE_ALIGN as u64) {
        return Err(MoleError::param("workspace", format!("{base:#x}"), "must be 256-byte aligned"));
    }
    for &(buf, offset) in regions {
        bindings.sized(buf, base + offset as u64, lens.get(buf));
    }
    Ok(())
}

/// Plans of one layer, memoised: the strategy per token bucket, the launches per token count.
#[derive(Debug)]
pub struct LayerPlanner {
    spec: LayerSpec,
    dtype: DType,
    sm_count: u32,
    tuning: Option<TuningCache>,
    forced: Option<Choice>,
    shard: Option<ExpertShard>,
    choices: Mutex<Vec<(u32, Choice)>>,
    plans: super::memo::PlanMemo<LayerPlan>,
    training_plans: super::memo::PlanMemo<LayerPlan>,
    pub(super) backward_plans: super::memo::PlanMemo<super::BackwardLayerPlan>,
}

impl LayerPlanner {
    /// A planner for `spec` in `dtype` on a GPU with `sm_count` SMs, choosing from `tuning` where
    /// it has an entry and by the heuristic otherwise. Errors: an invalid spec, zero SMs.
    pub fn new(spec: &LayerSpec, dtype: DType, sm_count: u32, tuning: Option<TuningCache>) -> Result<Self> {
        spec.validate()?;
        if sm_count == 0 {
            return Err(MoleError::param("sm_count", 0, "a GPU has at least one SM"));
        }
        Ok(LayerPlanner {
            spec: spec.clone(),
            dtype,
            sm_count,
            tuning,
            forced: None,
            shard: None,
            choices: Mutex::new(Vec::new()),
            plans: Default::default(),
            training_plans: Default::default(),
            backward_plans: Default::default(),
        })
    }

    /// The planner with every token count run by `choice` (benchmarks and the autotuner time
    /// one strategy and build at a time). Errors at planning time when `choice` cannot run the
    /// layer.
    pub fn with_choice(self, choice: Choice) -> Self {
        LayerPlanner {
            forced: Some(choice),
            choices: Mutex::new(Vec::new()),
            plans: Default::default(),
            training_plans: Default::default(),
            backward_plans: Default::default(),
            ..self
        }
    }

    /// The planner of the expert shard `shard` of the layer (expert parallelism, see
    /// [`ExpertShard`]): the caller's `A` and `B` hold the shard's rank columns only, the router
    /// still scores every expert, and a forward adds the shard's part of the delta. A shard runs
    /// the grouped path: the default SGMV build, or [`LayerPlanner::with_choice`]'s when it is a
    /// grouped choice. Errors: the shard's ([`ExpertShard::validate`], a layer the grouped path
    /// cannot run), and a shard without rank columns.
    pub fn with_shard(self, shard: ExpertShard) -> Result<Self> {
        shard.validate(&self.spec)?;
        shard.ranks(&self.spec.ranks)?;
        Ok(LayerPlanner {
            shard: Some(shard),
            choices: Mutex::new(Vec::new()),
            plans: Default::default(),
            training_plans: Default::default(),
            backward_plans: Default::default(),
            ..self
        })
    }

    /// The expert shard the planner plans for (`None`: the whole layer).
    pub fn shard(&self) -> Option<ExpertShard> {
        self.shard
    }

    /// The rank offsets the kernels read (`Buf::RankOffsets`): the spec's, or the shard's
    /// rebased to 0 (`[count + 1]`).
    pub fn rank_offsets(&self) -> Result<Vec<u32>> {
        let ranks = match self.shard {
            Some(shard) => shard.ranks(&self.spec.ranks)?,
            None => self.spec.ranks.clone(),
        };
        Ok(ranks.offsets().iter().map(|&o| o as u32).collect())
    }

    /// The layer.
    pub fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    /// The SMs of the GPU the planner plans for.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The element type of `x`, `A`, `B`, `y` and the router tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The plan of a forward over `tokens` tokens (memoised). Errors: zero tokens, and every
    /// error of the chosen strategy's plans.
    pub fn plan(&self, tokens: usize) -> Result<Arc<LayerPlan>> {
        self.plans.get(tokens, || self.make_plan(tokens, false))
    }

    /// The plan of a training forward over `tokens` tokens (memoised): the same launches as
    /// [`LayerPlanner::plan`]'s, which also write the routing into the caller's saved buffer
    /// (`SAVED_BUFS`, [`LayerPlan::saved`]) for the backward. Errors: as [`LayerPlanner::plan`].
    pub fn plan_training(&self, tokens: usize) -> Result<Arc<LayerPlan>> {
        self.training_plans.get(tokens, || self.make_plan(tokens, true))
    }

    fn choice(&self, tokens: usize) -> Result<Choice> {
        if let Some(c) = &self.forced {
            if c.build.dtype != self.dtype {
                return Err(MoleError::param("build", &c.build, "its dtype differs from the layer's"));
            }
            if self.shard.is_some() && c.strategy != Strategy::Grouped {
                return Err(MoleError::Unsupported(format!(
                    "an expert shard runs the grouped path only, not the {} strategy",
                    c.strategy
                )));
            }
            return Ok(c.clone());
        }
        if self.shard.is_some() {
            // The tuning cache times whole layers; a shard's shape is not one of them.
            let build = default_build(Strategy::Grouped, self.dtype);
            return Ok(Choice { strategy: Strategy::Grouped, build, source: ChoiceSource::Heuristic });
        }
        let bucket = token_bucket(tokens);
        let mut choices = self.choices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = choices.iter().find(|(b, _)| *b == bucket) {
            return Ok(c.clone());
        }
        // Every token count of a bucket runs what the bucket's largest one would: the choice (and
        // so the order of every reduction) does not depend on which count was planned first.
        let c = choose(&self.spec, self.dtype, bucket as usize, self.sm_count, self.tuning.as_ref())?;
        choices.push((bucket, c.clone()));
        Ok(c)
    }

    fn make_plan(&self, tokens: usize, training: bool) -> Result<LayerPlan> {
        let (spec, dtype) = (&self.spec, self.dtype);
        let choice = self.choice(tokens)?;
        let path = match choice.strategy {
            Strategy::Fused | Strategy::FusedSplit => {
                let config = FusedConfig::of(&choice.build)?;
                let variant = if choice.strategy == Strategy::Fused {
                    FusedVariant::Single
                } else {
                    FusedVariant::split_for(config, tokens, spec.d_in, spec.d_out, self.sm_count)
                };
                let outputs = FusedOutputs { routing: training, ..FusedOutputs::default() };
                let plan = fused::plan(&choice.build, spec, tokens, variant, outputs)?;
                Path::Fused { build: choice.build.clone(), plan }
            }
            Strategy::Grouped => {
                let route_build = fused::build(dtype, FusedConfig::DEFAULT);
                let route = fused::plan_route_only(&route_build, spec, tokens, FusedOutputs::default())?;
                let slots = route.params.gate.slots as usize;
                let config = sgmv::SgmvConfig::of(&choice.build)?;
                let gating_build = gating::default_builds()
                    .into_iter()
                    .find(|b| b.dtype == dtype)
                    .ok_or_else(|| MoleError::Unsupported(format!("no gating build for {dtype}")))?;
                let threads = gating_build.block_threads();
                let e = spec.routed_experts();
                // A shard plans its own experts out of the global ids the route writes.
                let window = self.shard.map_or(0..e, |s| s.experts());
                let grouping = gating::plan_slot_grouping(tokens, slots, window, e, config.bm as usize, threads)?;
                let (d_in, d_out, scale) = (spec.d_in, spec.d_out, spec.scale as f32);
                let shape =
                    SgmvShape { tokens, slots, d_in, d_out, scale, expert_scales: spec.expert_scales.is_some() };
                let offsets = self.rank_offsets()?;
                let sgmv = sgmv::plan(&choice.build, shape, &offsets, grouping.entry_stride)?;
                Path::Grouped { route_build, route, gating_build, grouping, sgmv_build: choice.build.clone(), sgmv }
            }
            Strategy::FfnBlock => {
                return Err(MoleError::Unsupported(
                    "the ffn_block strategy runs an FFN-expert block (runtime::CompiledFfn), not a layer".into(),
                ))
            }
        };
        let lens = path.lens();
        let (workspace_bufs, saved_bufs): (Vec<Buf>, Vec<Buf>) = match training {
            true => WORKSPACE_BUFS.iter().partition(|b| !SAVED_BUFS.contains(b)),
            false => (WORKSPACE_BUFS.to_vec(), vec![]),
        };
        let (regions, workspace_bytes) = carve_workspace(&lens, dtype, &workspace_bufs);
        let (saved, saved_bytes) = carve_workspace(&lens, dtype, &saved_bufs);
        Ok(LayerPlan { tokens, choice, path, lens, regions, workspace_bytes, saved, saved_bytes })
    }

    /// Workspace bytes a forward over `tokens` tokens needs (0 when it needs none).
    pub fn workspace_bytes(&self, tokens: usize) -> Result<usize> {
        Ok(self.plan(tokens)?.workspace_bytes)
    }

    /// Runs `plan` through `backend` on `bindings`, which hold the caller's buffers, the rank
    /// offsets and the workspace regions ([`LayerPlan::bind_workspace`]).
    ///
    /// # Safety
    /// As `Backend::launch`: every bound address holds at least the plan's length of its
    /// buffer ([`LayerPlan::lens`]); the rank offsets are [`LayerPlanner::rank_offsets`]; `y` and the workspace
    /// overlap nothing else.
    pub unsafe fn launch(&self, plan: &LayerPlan, bindings: &Bindings, backend: &mut dyn Backend) -> Result<()> {
        bindings.check(&plan.lens, "the layer")?;
        match &plan.path {
            // SAFETY: forwarded from the caller's contract, checked against the plan above.
            Path::Fused { build, plan } => unsafe { fused::run(build, plan, bindings, backend) },
            Path::Grouped { route_build, route, gating_build, grouping, sgmv_build, sgmv } => {
                // SAFETY: as above; the three stages run in stream order, each reading what the
                // previous one wrote into the workspace.
                unsafe {
                    fused::run(route_build, route, bindings, backend)?;
                    gating::run_group_slots(gating_build, grouping, bindings, backend)?;
                    sgmv::run(sgmv_build, sgmv, bindings, backend)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape};

    /// The strategy of a token count does not depend on which counts were planned before it:
    /// a bucket runs what its largest count would (fused split below `2 · ceil(T / 16) < SMs`).
    #[test]
    fn choices_do_not_depend_on_the_planning_order() {
        let spec = Method::MixLoraPerLinear
            .spec(MethodShape { d_in: 256, d_out: 256, experts: 8, rank: 16, k: 2, alpha: 32.0 })
            .unwrap();
        let planner = |order: &[usize]| {
            let p = LayerPlanner::new(&spec, DType::BF16, 132, None).unwrap();
            for &t in order {
                p.plan(t).unwrap();
            }
            p
        };
        let (up, down) = (planner(&[1030, 2048]), planner(&[2048, 1030]));
        for t in [1030, 1500, 2048] {
            assert_eq!(up.plan(t).unwrap().choice, down.plan(t).unwrap().choice, "T={t}");
        }
        assert_eq!(up.plan(1030).unwrap().choice.strategy, Strategy::Fused);
        assert_eq!(up.plan(16).unwrap().choice.strategy, Strategy::FusedSplit);
    }

    #[test]
    fn workspace_regions_are_aligned_and_disjoint() {
        let spec = Method::MixLoraPerLinear
            .spec(MethodShape { d_in: 256, d_out: 256, experts: 64, rank: 16, k: 2, alpha: 32.0 })
            .unwrap();
        let p = LayerPlanner::new(&spec, DType::BF16, 132, None).unwrap().plan(37).unwrap();
        assert!(matches!(p.path, Path::Grouped { .. }));
        let mut end = 0;
        for &(buf, offset) in &p.regions {
            assert!(offset % WORKSPACE_ALIGN == 0 && offset >= end, "{buf:?} at {offset}");
            end = offset + p.lens.bytes(buf, DType::BF16);
        }
        assert!(end <= p.workspace_bytes && p.regions.len() >= 6);
    }

    /// A training plan launches what the inference plan does, and moves the routing out of the
    /// workspace into the saved buffer, for both strategies.
    #[test]
    fn a_training_plan_saves_the_routing_outside_the_workspace() {
        for experts in [8, 64] {
            let spec = Method::MixLoraPerLinear
                .spec(MethodShape { d_in: 256, d_out: 256, experts, rank: 16, k: 2, alpha: 32.0 })
                .unwrap();
            let planner = LayerPlanner::new(&spec, DType::BF16, 132, None).unwrap();
            let (inference, training) = (planner.plan(37).unwrap(), planner.plan_training(37).unwrap());
            assert_eq!(inference.choice, training.choice);
            assert!(inference.saved.is_empty() && inference.saved_bytes == 0);
            let saved: Vec<Buf> = training.saved.iter().map(|&(b, _)| b).collect();
            assert_eq!(saved, SAVED_BUFS, "{:?}", training.choice.strategy);
            assert!(training.regions.iter().all(|(b, _)| !SAVED_BUFS.contains(b)));
            // i32 ids and f32 weights of 37 tokens x 2 slots, each region aligned.
            assert_eq!(training.saved_bytes, 2 * (37 * 2 * 4usize).div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN);
            assert!(training.workspace_bytes <= inference.workspace_bytes);
        }
    }
}
