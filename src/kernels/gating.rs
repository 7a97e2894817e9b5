//! The gating kernels (`kernels/gating.cu`): routing rules, router statistics and the routing plan
//! on the GPU, with the semantics of [`crate::reference::routing`], [`crate::reference::stats`]
//! and [`crate::plan::RoutingPlan`].
//!
//! This module mirrors the `.cu` file: the `#[repr(C)]` parameter structs and `#[repr(u32)]`
//! enums match their C twins (both sides assert every size and offset), and the pure planning
//! functions ([`plan`], [`plan_stats`], [`plan_grouping`], [`plan_slot_grouping`]) validate a
//! call and compute its launches and the length of every buffer ([`crate::kernels::exec::BufLens`])
//! without touching a GPU. Each call kind runs on bound buffers through any
//! [`crate::kernels::exec::Backend`] ([`run_route`], [`run_stats`], [`run_group`], [`run_group_slots`]):
//! the typed functions ([`route`], [`router_stats`], [`group`], [`group_slots`]) and the raw-pointer
//! ones (`*_raw`) bind their buffers and call them, on a [`crate::cuda::Device`].

mod launch;
mod slots;

pub use slots::{
    group_slots, group_slots_raw, plan_slot_grouping, run_group_slots, SlotGroupOutputs, SlotGroupingPlan,
};

pub use launch::{
    group, group_raw, route, route_raw, router_stats, router_stats_raw, run_group, run_route, run_stats,
    DeviceGateInput, GroupOutputs, RawGroupPointers, RawRoutePointers, RawStatsPointers, RouteOutputs, StatsInputs,
};

use super::{BuildConfig, KernelBuild};
use crate::kernels::exec::{Buf, BufLens, Dims, KernelDesc};
use crate::model::{Entropy, Gating, RankSelection, RoutingRule, TopKWeights};
use crate::reference::RouterStats;
use crate::{DType, MoleError, Result};
use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Most experts a gating kernel takes (`MOLE_GATING_MAX_EXPERTS`).
pub const MAX_EXPERTS: usize = 1024;
/// Largest `k` of the top-k rules (`MOLE_GATING_MAX_K`).
pub const MAX_K: usize = 8;
/// The default threads per block (the `.cu` default of `MOLE_BLOCK_THREADS`).
pub const DEFAULT_BLOCK_THREADS: u32 = 128;
/// The block sizes [`candidates`] offers, the default first.
pub const BLOCK_THREADS_CANDIDATES: [u32; 4] = [128, 32, 64, 256];
/// Grid-stride loops cover any token count; more blocks than this add nothing.
const MAX_GRID_BLOCKS: u64 = 1 << 16;
/// Statistics and grouping split their input into at most this many chunks (one warp each), so
/// workspaces stay small and the final in-order passes short.
const MAX_CHUNKS: u64 = 1024;

/// The entry points.
pub mod kernel {
    use crate::kernels::exec::{ArgDesc as A, Buf, KernelDesc};
    use crate::kernels::Family;

    const fn gating(
        name: &'static str,
        params_type: &'static str,
        params_bytes: usize,
        args: &'static [A],
    ) -> KernelDesc {
        KernelDesc { family: Family::Gating, name, params_type, params_bytes, args }
    }
    const GATING: (&str, usize) = ("mole_gating_params", std::mem::size_of::<super::GatingParams>());
    const STATS: (&str, usize) = ("mole_stats_params", std::mem::size_of::<super::StatsParams>());
    const PLAN: (&str, usize) = ("mole_plan_params", std::mem::size_of::<super::PlanParams>());
    /// Scores (or given weights), the selection bias (null where the rule has none, or ignores
    /// it), ids, weights, and probabilities (null: not written).
    const SCORE_ARGS: &[A] = &[
        A::input(Buf::GateInput),
        A::optional_input(Buf::SelectionBias),
        A::output(Buf::Ids),
        A::output(Buf::RouteWeights),
        A::optional_output(Buf::Probs),
    ];

    /// Softmax top-k.
    pub static SOFTMAX_TOPK: KernelDesc = gating("gating_softmax_topk", GATING.0, GATING.1, SCORE_ARGS);
    /// Top-p, DynMoLE and dense softmax (a prefix of the descending order).
    pub static SOFTMAX_PREFIX: KernelDesc = gating("gating_softmax_prefix", GATING.0, GATING.1, SCORE_ARGS);
    /// SMoRA sigmoid top-k.
    pub static SIGMOID_TOPK: KernelDesc = gating("gating_sigmoid_topk", GATING.0, GATING.1, SCORE_ARGS);
    /// FlyLoRA magnitude top-k (its probabilities argument is never written).
    pub static MAGNITUDE_TOPK: KernelDesc = gating("gating_magnitude_topk", GATING.0, GATING.1, SCORE_ARGS);
    /// Given weights (in [`Buf::GateInput`]).
    pub static GIVEN: KernelDesc = gating("gating_given", GATING.0, GATING.1, SCORE_ARGS);
    /// Adapter ids.
    pub static ADAPTER_IDS: KernelDesc = gating(
        "gating_adapter_ids",
        GATING.0,
        GATING.1,
        &[A::input(Buf::AdapterIds), A::output(Buf::Ids), A::output(Buf::RouteWeights)],
    );
    /// Router statistics, per-chunk partials (probabilities and scores null where not given).
    pub static STATS_PARTIAL: KernelDesc = gating(
        "gating_stats_partial",
        STATS.0,
        STATS.1,
        &[
            A::input(Buf::Ids),
            A::optional_input(Buf::Probs),
            A::optional_input(Buf::GateInput),
            A::output(Buf::StatsWorkspace),
        ],
    );
    /// Router statistics, the in-order final sum.
    /// (No workspace when there are no rows: zero tokens in the fused statistics.)
    pub static STATS_FINALIZE: KernelDesc = gating(
        "gating_stats_finalize",
        STATS.0,
        STATS.1,
        &[A::optional_input(Buf::StatsWorkspace), A::output(Buf::StatsOut)],
    );
    /// Routing plan phase 1: per-chunk expert counts.
    pub static PLAN_COUNT: KernelDesc =
        gating("gating_plan_count", PLAN.0, PLAN.1, &[A::input(Buf::Ids), A::output(Buf::PlanWorkspace)]);
    /// Routing plan phase 2: scan, offsets, padding.
    pub static PLAN_SCAN: KernelDesc = gating(
        "gating_plan_scan",
        PLAN.0,
        PLAN.1,
        &[
            A::output(Buf::PlanWorkspace),
            A::output(Buf::PlanCounts),
            A::output(Buf::PlanOffsets),
            A::output(Buf::PlanEntries),
            A::output(Buf::PlanStatus),
        ],
    );
    /// Routing plan phase 3: in-order scatter.
    pub static PLAN_SCATTER: KernelDesc = gating(
        "gating_plan_scatter",
        PLAN.0,
        PLAN.1,
        &[A::input(Buf::Ids), A::input(Buf::PlanWorkspace), A::output(Buf::PlanEntries)],
    );

    /// Every entry point, in file order (every dtype builds them all).
    pub static ALL: [&KernelDesc; 11] = [
        &SOFTMAX_TOPK,
        &SOFTMAX_PREFIX,
        &SIGMOID_TOPK,
        &MAGNITUDE_TOPK,
        &GIVEN,
        &ADAPTER_IDS,
        &STATS_PARTIAL,
        &STATS_FINALIZE,
        &PLAN_COUNT,
        &PLAN_SCAN,
        &PLAN_SCATTER,
    ];
}

/// Every configuration worth compiling: each dtype at each of [`BLOCK_THREADS_CANDIDATES`]. The
/// first build of each dtype is its default.
pub fn candidates() -> Vec<KernelBuild> {
    DType::ALL.iter().flat_map(|&d| BLOCK_THREADS_CANDIDATES.iter().map(move |&t| build(d, t))).collect()
}

/// One build per dtype, at [`DEFAULT_BLOCK_THREADS`].
pub fn default_builds() -> Vec<KernelBuild> {
    DType::ALL.iter().map(|&d| build(d, DEFAULT_BLOCK_THREADS)).collect()
}

/// The build of `dtype` with `block_threads` threads per block.
pub fn build(dtype: DType, block_threads: u32) -> KernelBuild {
    KernelBuild::new(dtype, GatingConfig { block_threads })
}

/// The compile-time configuration of a gating build (the defines of `kernels/gating.cu`,
/// generated by [`BuildConfig::defines`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatingConfig {
    /// Threads per block (`MOLE_BLOCK_THREADS`).
    pub block_threads: u32,
}

impl GatingConfig {
    /// The `.cu` default.
    pub const DEFAULT: GatingConfig = GatingConfig { block_threads: DEFAULT_BLOCK_THREADS };

    /// Checks the block size: a multiple of 32 in `32..=1024`.
    pub fn validate(self) -> Result<()> {
        check_block_threads(self.block_threads)
    }

    /// The dynamic shared memory of the largest launch (`MOLE_DYNAMIC_SMEM_BYTES`): one word per
    /// expert per warp at [`MAX_EXPERTS`].
    pub fn dynamic_shared_bytes(self) -> u32 {
        (self.block_threads / 32).saturating_mul(MAX_EXPERTS as u32 * 4)
    }

    /// The configuration of a gating `build`, checked; an error for a build of another family.
    pub fn of(build: &KernelBuild) -> Result<GatingConfig> {
        let BuildConfig::Gating(c) = build.config else {
            return Err(MoleError::param("build", build, "is not a gating build"));
        };
        c.validate()?;
        Ok(c)
    }
}

/// Which rule a launch applies (C: `mole_rule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RuleKind {
    /// [`RoutingRule::SoftmaxTopK`].
    SoftmaxTopK = 0,
    /// [`RoutingRule::TopP`].
    TopP = 1,
    /// [`RoutingRule::DynMole`].
    DynMole = 2,
    /// [`RoutingRule::DenseSoftmax`].
    DenseSoftmax = 3,
    /// [`RoutingRule::SigmoidTopK`].
    SigmoidTopK = 4,
    /// [`RoutingRule::MagnitudeTopK`].
    MagnitudeTopK = 5,
    /// [`Gating::Given`].
    Given = 6,
    /// [`Gating::AdapterIds`].
    AdapterIds = 7,
}

/// Weighting of softmax top-k picks (C: `mole_weight_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum WeightMode {
    /// [`TopKWeights::Softmax`].
    Softmax = 0,
    /// [`TopKWeights::Renormalized`].
    Renormalized = 1,
    /// [`TopKWeights::Unit`].
    Unit = 2,
}

impl From<TopKWeights> for WeightMode {
    fn from(w: TopKWeights) -> Self {
        match w {
            TopKWeights::Softmax => WeightMode::Softmax,
            TopKWeights::Renormalized => WeightMode::Renormalized,
            TopKWeights::Unit => WeightMode::Unit,
        }
    }
}

/// Which entropy a kernel computes (C: `mole_entropy_kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum EntropyKind {
    /// No entropy.
    None = 0,
    /// Shannon (`q = 1`).
    Shannon = 1,
    /// Tsallis with index `q != 1`.
    Tsallis = 2,
}

impl EntropyKind {
    /// The kind for index `q`, deciding `q = 1` exactly as the reference does.
    pub fn for_q(q: f64) -> Self {
        if (q - 1.0).abs() < 1e-12 {
            EntropyKind::Shannon
        } else {
            EntropyKind::Tsallis
        }
    }

    /// `1 / S(uniform over experts)` in f64, rounded once: `1 / ln E` or `1 / (1 - E^(1-q))`
    /// (via `expm1`, accurate for `q` near 1); 0 for a single expert or no entropy.
    pub fn scale(self, q: f64, experts: usize) -> f32 {
        let ln_n = (experts as f64).ln();
        let s = match self {
            _ if experts <= 1 => return 0.0,
            EntropyKind::None => return 0.0,
            EntropyKind::Shannon => ln_n,
            EntropyKind::Tsallis => -((1.0 - q) * ln_n).exp_m1(),
        };
        (1.0 / s) as f32
    }
}

/// Parameters of every routing kernel, passed by value (C: `mole_gating_params`, 64 bytes).
/// Enum fields hold the `as u32` of [`RuleKind`], [`WeightMode`] and [`EntropyKind`]; booleans
/// are 0 or 1. Built by [`plan`].
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct GatingParams {
    /// Tokens `T`.
    pub tokens: u32,
    /// Experts `E`: the row length of scores and probabilities.
    pub experts: u32,
    /// Row length of ids and weights.
    pub slots: u32,
    /// Picks (top-k, given `top_k`, `E` for given weights without it) or DynMoLE `keep_top_k`.
    pub k: u32,
    /// [`RuleKind`].
    pub rule: u32,
    /// [`WeightMode`] (softmax top-k).
    pub weights: u32,
    /// [`EntropyKind`] (DynMoLE).
    pub entropy: u32,
    /// 1: the selection bias `[E]` is added to the selection score.
    pub use_bias: u32,
    /// 1: given weights are replaced by the softmax of the kept values.
    pub softmax_kept: u32,
    /// Softmax temperature (1 for DynMoLE).
    pub temperature: f32,
    /// Top-p `p` or DynMoLE `top_p`.
    pub threshold: f32,
    /// Tsallis index `q`.
    pub q: f32,
    /// DynMoLE: every expert is used above this normalised entropy.
    pub entropy_threshold: f32,
    /// [`EntropyKind::scale`].
    pub entropy_scale: f32,
    /// Magnitude top-k: 1 selects by the signed value ([`crate::model::RankSelection::Signed`]).
    pub signed_select: u32,
    /// DynMoLE: added to each probability before the entropy.
    pub entropy_eps: f32,
}

/// Parameters of the statistics kernels (C: `mole_stats_params`, 44 bytes). Built by
/// [`plan_stats`].
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct StatsParams {
    /// Tokens `T`.
    pub tokens: u32,
    /// Experts `E`.
    pub experts: u32,
    /// Row length of ids.
    pub slots: u32,
    /// Tokens per chunk (one warp each).
    pub chunk_tokens: u32,
    /// `ceil(T / chunk_tokens)`.
    pub chunks: u32,
    /// 1: probabilities `[T, E]` are given.
    pub has_probs: u32,
    /// 1: scores `[T, E]` are given.
    pub has_scores: u32,
    /// [`EntropyKind`].
    pub entropy: u32,
    /// Tsallis index `q`.
    pub q: f32,
    /// [`EntropyKind::scale`].
    pub entropy_scale: f32,
    /// Added to each probability before the entropy.
    pub entropy_eps: f32,
}

/// A cumulative-probability or entropy threshold as the kernels compare it: values below 1 stay
/// below 1 in f32 (the kernels treat a threshold `>= 1` as "every expert", as the f64 reference
/// does, so rounding up to 1 would change the decision).
pub(crate) fn threshold_f32(v: f64) -> f32 {
    const BELOW_ONE: f32 = 1.0 - f32::EPSILON / 2.0;
    if v >= 1.0 {
        v as f32
    } else {
        (v as f32).min(BELOW_ONE)
    }
}

/// Parameters of the routing-plan kernels (C: `mole_plan_params`, 44 bytes). Built by
/// [`plan_grouping`] (the full plan) and [`plan_slot_grouping`] (column mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct PlanParams {
    /// Tokens `T`.
    pub tokens: u32,
    /// Row length of ids.
    pub slots: u32,
    /// Experts `E`.
    pub experts: u32,
    /// Segment granularity (1 = no padding).
    pub block: u32,
    /// Entries per chunk (one warp each).
    pub chunk_entries: u32,
    /// `ceil(T * slots / chunk_entries)`.
    pub chunks: u32,
    /// Element distance in `ids` between two entries: 1 for the full plan, the row length of
    /// `ids` in column mode.
    pub ids_stride: u32,
    /// Column of `ids` read and index of the plan written (0 for the full plan).
    pub column: u32,
    /// Entries between two column plans, every one written (0 for the full plan).
    pub entry_stride: u32,
    /// First expert planned: ids in `[expert_base, expert_base + experts)` become plan experts
    /// `id - expert_base` (0 for a whole layer; an expert-parallel shard's first expert).
    pub expert_base: u32,
    /// Experts of the whole layer: ids in `-1..global_experts` outside the planned window are
    /// skipped silently, ids outside it are skipped and reported in the status.
    pub global_experts: u32,
}

// SAFETY: plain `#[repr(C)]` structs of 4-byte scalars with no padding (Pod), laid out exactly as
// their C twins in kernels/gating.cu (sizes and offsets asserted on both sides), so passing a
// pointer to one as a kernel parameter is what the kernel expects.
unsafe impl cudarc::driver::DeviceRepr for GatingParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for StatsParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for PlanParams {}

/// One kernel launch: the kernel, its grid, block and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLaunch {
    /// The kernel (one of [`kernel`]).
    pub kernel: &'static KernelDesc,
    /// Blocks (x only).
    pub grid: u32,
    /// Threads per block (x only).
    pub block: u32,
    /// Dynamic shared memory, bytes.
    pub shared_bytes: u32,
}

impl KernelLaunch {
    /// As launch dimensions.
    pub fn dims(&self) -> Dims {
        Dims { grid: (self.grid, 1, 1), block: self.block, shared_bytes: self.shared_bytes }
    }

    /// As cudarc's launch configuration.
    pub fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: self.shared_bytes,
        }
    }
}

/// What a routing kernel reads per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Router scores `[T, E]` (plus `selection_bias [E]` when [`RoutePlan::uses_bias`]).
    Scores,
    /// Given weights `[T, E]`.
    Weights,
    /// Adapter ids `[T]` (i32).
    AdapterIds,
}

/// A validated routing launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutePlan {
    /// The kernel's parameters.
    pub params: GatingParams,
    /// The launch; `None` when there are no tokens (nothing is launched).
    pub launch: Option<KernelLaunch>,
    /// The kernel (also set when `launch` is `None`).
    pub kernel: &'static KernelDesc,
    /// Threads per block the plan was made for (the build's).
    pub block_threads: u32,
    /// What the kernel reads.
    pub input: InputKind,
    /// Whether `selection_bias [E]` is read.
    pub uses_bias: bool,
    /// Whether the kernel can write probabilities `[T, E]` (softmax, sigmoid, given weights).
    pub writes_probs: bool,
    /// Slots per token.
    pub slots: usize,
    /// Element counts of the buffers: the input ([`Buf::GateInput`] `[T, E]` or
    /// [`Buf::AdapterIds`] `[T]`), [`Buf::SelectionBias`] `[E]` when [`RoutePlan::uses_bias`],
    /// [`Buf::Ids`] and [`Buf::RouteWeights`] `[T, slots]`, and [`Buf::Probs`] `[T, E]` when
    /// [`RoutePlan::writes_probs`] (an optional output: the kernel skips it when absent).
    pub lens: BufLens,
}

fn check_block_threads(threads: u32) -> Result<()> {
    if threads == 0 || !threads.is_multiple_of(32) || threads > 1024 {
        return Err(MoleError::param("block threads", threads, "must be a multiple of 32 in 32..=1024"));
    }
    Ok(())
}

/// The threads per block of a gating `build`, checked.
fn build_threads_of(build: &KernelBuild) -> Result<u32> {
    Ok(GatingConfig::of(build)?.block_threads)
}

fn check_experts(experts: usize) -> Result<()> {
    if experts == 0 {
        return Err(MoleError::ZeroDimension { name: "experts" });
    }
    if experts > MAX_EXPERTS {
        return Err(MoleError::param("experts", experts, "the gating kernels take at most 1024 experts"));
    }
    Ok(())
}

/// Checks a planned window of experts within `global` experts; returns its base and length.
fn check_expert_window(window: &Range<usize>, global: usize) -> Result<(u32, usize)> {
    check_experts(window.len())?;
    if window.end > global {
        return Err(MoleError::param(
            "experts",
            format!("{window:?} of {global}"),
            "the planned experts must lie within the layer's",
        ));
    }
    if global > i32::MAX as usize {
        return Err(MoleError::param("global_experts", global, "must fit in 31 bits (expert ids are i32)"));
    }
    Ok((window.start as u32, window.len()))
}

fn check_tokens(tokens: usize) -> Result<u32> {
    u32::try_from(tokens).map_err(|_| MoleError::param("tokens", tokens, "must fit in 32 bits"))
}

fn check_top_k(k: usize) -> Result<()> {
    if k > MAX_K {
        return Err(MoleError::param("k", k, "the gating kernels take k <= 8"));
    }
    Ok(())
}

/// A positive, finite f64 parameter that must stay positive and finite as f32.
fn positive_f32(name: &'static str, v: f64) -> Result<f32> {
    let f = v as f32;
    if !(f.is_finite() && f > 0.0) {
        return Err(MoleError::param(name, v, "must be a positive finite f32"));
    }
    Ok(f)
}

/// Blocks for `items` work items at `per_block` items per block, capped (the kernels grid-stride).
fn grid_for(items: u64, per_block: u64) -> u32 {
    items.div_ceil(per_block).clamp(1, MAX_GRID_BLOCKS) as u32
}

/// Validates a routing call and plans its launch: `tokens` tokens, `experts` routed experts,
/// `block_threads` threads per block (the build's [`GatingConfig::block_threads`]). The rule must pass
/// [`Gating::validate`], with at most [`MAX_EXPERTS`] experts and `k <= MAX_K` for the top-k rules.
pub fn plan(gating: &Gating, tokens: usize, experts: usize, block_threads: u32) -> Result<RoutePlan> {
    check_block_threads(block_threads)?;
    check_experts(experts)?;
    gating.validate(experts)?;
    let t = check_tokens(tokens)?;
    let slots = gating.slots(experts);
    let mut p = GatingParams {
        tokens: t,
        experts: experts as u32,
        slots: slots as u32,
        k: 0,
        rule: 0,
        weights: WeightMode::Renormalized as u32,
        entropy: EntropyKind::None as u32,
        use_bias: 0,
        softmax_kept: 0,
        temperature: 1.0,
        threshold: 0.0,
        q: 1.0,
        entropy_threshold: 0.0,
        entropy_scale: 0.0,
        signed_select: 0,
        entropy_eps: 0.0,
    };
    let (kind, kernel, input, writes_probs): (_, &'static KernelDesc, _, _) = match *gating {
        Gating::Routed { rule, .. } => match rule {
            RoutingRule::SoftmaxTopK { k, temperature, weights } => {
                check_top_k(k)?;
                p.k = k as u32;
                p.temperature = positive_f32("temperature", temperature)?;
                p.weights = WeightMode::from(weights) as u32;
                (RuleKind::SoftmaxTopK, &kernel::SOFTMAX_TOPK, InputKind::Scores, true)
            }
            RoutingRule::TopP { p: threshold, temperature } => {
                p.temperature = positive_f32("temperature", temperature)?;
                p.threshold = threshold_f32(threshold);
                (RuleKind::TopP, &kernel::SOFTMAX_PREFIX, InputKind::Scores, true)
            }
            RoutingRule::DynMole { q, top_p, keep_top_k, entropy_threshold, entropy_eps } => {
                let kind = EntropyKind::for_q(q);
                p.k = keep_top_k as u32;
                p.q = positive_f32("q", q)?;
                p.threshold = threshold_f32(top_p);
                p.entropy = kind as u32;
                p.entropy_threshold = threshold_f32(entropy_threshold);
                p.entropy_scale = kind.scale(q, experts);
                p.entropy_eps = entropy_eps as f32;
                (RuleKind::DynMole, &kernel::SOFTMAX_PREFIX, InputKind::Scores, true)
            }
            RoutingRule::DenseSoftmax { temperature } => {
                p.temperature = positive_f32("temperature", temperature)?;
                (RuleKind::DenseSoftmax, &kernel::SOFTMAX_PREFIX, InputKind::Scores, true)
            }
            RoutingRule::SigmoidTopK { k, bias } => {
                check_top_k(k)?;
                p.k = k as u32;
                p.use_bias = bias as u32;
                (RuleKind::SigmoidTopK, &kernel::SIGMOID_TOPK, InputKind::Scores, true)
            }
            RoutingRule::MagnitudeTopK { k, bias, selection } => {
                check_top_k(k)?;
                p.k = k as u32;
                p.use_bias = bias as u32;
                p.signed_select = (selection == RankSelection::Signed) as u32;
                (RuleKind::MagnitudeTopK, &kernel::MAGNITUDE_TOPK, InputKind::Scores, false)
            }
        },
        Gating::Given { top_k, softmax_topk } => {
            if let Some(k) = top_k {
                check_top_k(k)?;
            }
            p.k = top_k.unwrap_or(experts) as u32;
            p.softmax_kept = softmax_topk as u32;
            (RuleKind::Given, &kernel::GIVEN, InputKind::Weights, true)
        }
        Gating::AdapterIds => (RuleKind::AdapterIds, &kernel::ADAPTER_IDS, InputKind::AdapterIds, false),
    };
    p.rule = kind as u32;
    let launch = (tokens > 0).then(|| match kind {
        // One thread per token, no shared memory.
        RuleKind::AdapterIds => KernelLaunch {
            kernel,
            grid: grid_for(tokens as u64, block_threads as u64),
            block: block_threads,
            shared_bytes: 0,
        },
        // One warp per token, E staged floats per warp.
        _ => KernelLaunch {
            kernel,
            grid: grid_for(tokens as u64, (block_threads / 32) as u64),
            block: block_threads,
            shared_bytes: block_threads / 32 * experts as u32 * 4,
        },
    });
    let uses_bias = p.use_bias != 0;
    let input_buf =
        if input == InputKind::AdapterIds { (Buf::AdapterIds, tokens) } else { (Buf::GateInput, tokens * experts) };
    let lens = BufLens::new()
        .with(input_buf.0, input_buf.1)
        .with(Buf::SelectionBias, if uses_bias { experts } else { 0 })
        .with(Buf::Ids, tokens * slots)
        .with(Buf::RouteWeights, tokens * slots)
        .with(Buf::Probs, if writes_probs { tokens * experts } else { 0 });
    Ok(RoutePlan { params: p, launch, kernel, block_threads, input, uses_bias, writes_probs, slots, lens })
}

/// A validated router-statistics launch: per-chunk partials into a workspace, then one block sums
/// the chunks in order into `out [4E + 2]` (see [`StatsPlan::decode`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StatsPlan {
    /// The kernels' parameters.
    pub params: StatsParams,
    /// The partials; `None` when there are no tokens.
    pub partial: Option<KernelLaunch>,
    /// The final sum (always launched: with no tokens it writes zeros, as the reference defines).
    pub finalize: KernelLaunch,
    /// Workspace size in 4-byte words.
    pub workspace_words: usize,
    /// Output length in f32: `4E + 2`.
    pub out_len: usize,
    /// The entropy the statistics report, as the reference's `entropy` argument (`None`: no
    /// entropy, or no probabilities to take it of).
    pub entropy: Option<Entropy>,
}

/// The statistics output length for `experts` experts: `4E + 2` (see [`StatsPlan::decode`]).
pub fn stats_out_len(experts: usize) -> usize {
    4 * experts + 2
}

/// Workspace words of the statistics of `rows` chunks (or tiles): counts `[rows][2E]`, then sums
/// `[rows][2E + 2]`.
pub fn stats_workspace_words(rows: usize, experts: usize) -> usize {
    rows * (4 * experts + 2)
}

/// Plans [`router_stats`] for `ids [T, slots]`, optional `probs [T, E]` (f32) and optional raw
/// `scores [T, E]`, with `entropy` (as [`crate::reference::router_stats`]).
pub fn plan_stats(
    tokens: usize,
    experts: usize,
    slots: usize,
    has_probs: bool,
    has_scores: bool,
    entropy: Option<Entropy>,
    block_threads: u32,
) -> Result<StatsPlan> {
    check_block_threads(block_threads)?;
    check_experts(experts)?;
    let t = check_tokens(tokens)?;
    // The kernel reads each token's first slot (the top-1 fraction).
    if slots == 0 {
        return Err(MoleError::ZeroDimension { name: "slots" });
    }
    if tokens.checked_mul(slots).is_none_or(|n| n > u32::MAX as usize) {
        return Err(MoleError::param("tokens", tokens, "tokens * slots must fit in 32 bits"));
    }
    if let Some(h) = entropy {
        if !(h.eps.is_finite() && (0.0..1.0).contains(&h.eps)) {
            return Err(MoleError::param("entropy_eps", h.eps, "must be in [0, 1)"));
        }
    }
    let taken = entropy.filter(|_| has_probs);
    let (kind, q) = match taken {
        Some(h) => (EntropyKind::for_q(h.q), positive_f32("q", h.q)?),
        None => (EntropyKind::None, 1.0),
    };
    let chunk_tokens = (tokens as u64).div_ceil(MAX_CHUNKS).max(32);
    let chunks = (tokens as u64).div_ceil(chunk_tokens);
    let params = StatsParams {
        tokens: t,
        experts: experts as u32,
        slots: slots as u32,
        chunk_tokens: chunk_tokens as u32,
        chunks: chunks as u32,
        has_probs: has_probs as u32,
        has_scores: has_scores as u32,
        entropy: kind as u32,
        q,
        entropy_scale: kind.scale(taken.map_or(1.0, |h| h.q), experts),
        entropy_eps: taken.map_or(0.0, |h| h.eps as f32),
    };
    let warps = (block_threads / 32) as u64;
    let partial = (chunks > 0).then(|| KernelLaunch {
        kernel: &kernel::STATS_PARTIAL,
        grid: grid_for(chunks, warps),
        block: block_threads,
        shared_bytes: block_threads / 32 * experts as u32 * 4,
    });
    let finalize = KernelLaunch { kernel: &kernel::STATS_FINALIZE, grid: 1, block: block_threads, shared_bytes: 0 };
    let workspace_words = stats_workspace_words(chunks as usize, experts).max(1);
    Ok(StatsPlan { params, partial, finalize, workspace_words, out_len: stats_out_len(experts), entropy })
}

impl StatsPlan {
    /// Plans the statistics of a routing call exactly as the reference layer does: probabilities
    /// when the rule has them, scores for every routed rule but magnitude top-k, and the entropy
    /// of softmax rules (`q` for DynMoLE, Shannon otherwise).
    pub fn for_gating(gating: &Gating, tokens: usize, experts: usize, block_threads: u32) -> Result<Self> {
        let route = plan(gating, tokens, experts, block_threads)?;
        let (has_scores, entropy) = match *gating {
            Gating::Routed { rule, .. } => (rule.has_z_loss(), rule.entropy()),
            _ => (false, None),
        };
        plan_stats(tokens, experts, route.slots, route.writes_probs, has_scores, entropy, block_threads)
    }

    /// Element counts of the buffers: [`Buf::Ids`] `[T, slots]`, [`Buf::Probs`] and
    /// [`Buf::GateInput`] (the scores of the z-loss) `[T, E]` when the plan takes them,
    /// [`Buf::StatsWorkspace`] (at least `workspace_words`) and [`Buf::StatsOut`] `[4E + 2]`.
    /// Derived from the fields, which the fused kernels also fill in for their own statistics.
    pub fn lens(&self) -> BufLens {
        let p = &self.params;
        let (t, e) = (p.tokens as usize, p.experts as usize);
        BufLens::new()
            .with(Buf::Ids, t * p.slots as usize)
            .with(Buf::Probs, if p.has_probs != 0 { t * e } else { 0 })
            .with(Buf::GateInput, if p.has_scores != 0 { t * e } else { 0 })
            .with(Buf::StatsWorkspace, self.workspace_words)
            .with(Buf::StatsOut, self.out_len)
    }

    /// Turns the kernel output `out [4E + 2]` into [`RouterStats`] with the reference's
    /// `Option`s: `mean_prob` and `masked_mean_prob` with probabilities, `z_loss` with scores,
    /// `entropy` when an entropy was asked for.
    pub fn decode(&self, out: &[f32]) -> Result<RouterStats> {
        crate::limits::check_len("router stats output", out, &[self.out_len])?;
        let e = self.params.experts as usize;
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let probs = self.params.has_probs != 0;
        Ok(RouterStats {
            selected_fraction: f(&out[..e]),
            top1_fraction: f(&out[e..2 * e]),
            mean_prob: probs.then(|| f(&out[2 * e..3 * e])),
            masked_mean_prob: probs.then(|| f(&out[3 * e..4 * e])),
            z_loss: (self.params.has_scores != 0).then_some(out[4 * e] as f64),
            entropy: self.entropy.map(|_| out[4 * e + 1] as f64),
        })
    }
}

/// A validated routing-plan launch (the GPU version of [`crate::plan::RoutingPlan::build`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupingPlan {
    /// The kernels' parameters.
    pub params: PlanParams,
    /// Phase 1 (per-chunk counts); `None` when there are no entries.
    pub count: Option<KernelLaunch>,
    /// Phase 2 (always launched: it writes counts, offsets and status even for no entries).
    pub scan: KernelLaunch,
    /// Phase 3 (in-order scatter); `None` when there are no entries.
    pub scatter: Option<KernelLaunch>,
    /// Element counts of the buffers: [`Buf::Ids`] `[T, slots]`, the [`Buf::PlanWorkspace`]
    /// (capacity), [`Buf::PlanCounts`] `[E]`, [`Buf::PlanOffsets`] `[E + 1]`, [`Buf::PlanStatus`]
    /// `[1]` and the [`Buf::PlanEntries`] capacity `T * slots + min(E, T * slots) * (block - 1)`
    /// (the plan's real length is `offsets[E]`; entries past it are left untouched).
    pub lens: BufLens,
}

/// Plans the routing plan of `ids [T, slots]` over the experts `experts` of `global_experts`,
/// with segments padded to a multiple of `block`: ids in `experts` become plan experts
/// `id - experts.start` (`0..E, E` for a whole layer; an expert-parallel shard's range
/// otherwise), -1 and ids of other experts are skipped, ids outside `-1..global_experts` are
/// skipped and reported in the status.
///
/// Errors: an empty range, more than [`MAX_EXPERTS`] experts in it, a range past
/// `global_experts` or `global_experts` past `i32`, `block` zero, a bad block size, or a plan
/// past 2^32 entries.
pub fn plan_grouping(
    tokens: usize,
    slots: usize,
    experts: Range<usize>,
    global_experts: usize,
    block: usize,
    block_threads: u32,
) -> Result<GroupingPlan> {
    check_block_threads(block_threads)?;
    let (base, experts) = check_expert_window(&experts, global_experts)?;
    if block == 0 {
        return Err(MoleError::ZeroDimension { name: "block" });
    }
    let t = check_tokens(tokens)?;
    let n = tokens as u128 * slots as u128;
    let max_entries = n + n.min(experts as u128) * (block as u128 - 1);
    if max_entries > u32::MAX as u128 || block > u32::MAX as usize {
        return Err(MoleError::param("tokens", tokens, "routing plan exceeds 2^32 entries"));
    }
    let n = n as u64;
    let chunk_entries = n.div_ceil(MAX_CHUNKS).next_multiple_of(32).max(1024);
    let chunks = n.div_ceil(chunk_entries);
    let params = PlanParams {
        tokens: t,
        slots: slots as u32,
        experts: experts as u32,
        block: block as u32,
        chunk_entries: chunk_entries as u32,
        chunks: chunks as u32,
        ids_stride: 1,
        column: 0,
        entry_stride: 0,
        expert_base: base,
        global_experts: global_experts as u32,
    };
    let warp_launch = |kernel| KernelLaunch {
        kernel,
        grid: grid_for(chunks, (block_threads / 32) as u64),
        block: block_threads,
        shared_bytes: block_threads / 32 * experts as u32 * 4,
    };
    Ok(GroupingPlan {
        params,
        count: (chunks > 0).then(|| warp_launch(&kernel::PLAN_COUNT)),
        scan: KernelLaunch { kernel: &kernel::PLAN_SCAN, grid: 1, block: block_threads, shared_bytes: 32 * 4 },
        scatter: (chunks > 0).then(|| warp_launch(&kernel::PLAN_SCATTER)),
        lens: BufLens::new()
            .with(Buf::Ids, tokens * slots)
            .with(Buf::PlanWorkspace, (chunks as usize * (experts + 1)).max(1))
            .with(Buf::PlanCounts, experts)
            .with(Buf::PlanOffsets, experts + 1)
            .with(Buf::PlanEntries, max_entries as usize)
            .with(Buf::PlanStatus, 1),
    })
}

#[cfg(test)]
mod tests;
