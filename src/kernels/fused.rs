//! The fused MoLE layer kernels (`kernels/fused.cu`): router, gating, shrink, mix and expand of a
//! tile of tokens in one pass, for every mix, with the semantics of
//! [`crate::reference::forward`].
//!
//! Two variants of the same stages:
//! - [`FusedVariant::Single`]: one launch (`fused_layer`), one block per tile of `bt` tokens.
//!   It reads `x` once and reads and writes `y` once.
//! - [`FusedVariant::Split`]: for few tokens (decode), where one block per tile cannot fill the
//!   GPU. `fused_split_shrink` splits `d_in` over blocks into an f32 workspace, then
//!   `fused_split_expand` sums the slices in order, routes, mixes and expands one block of `d_out`
//!   columns per block.
//!
//! A route-only plan ([`plan_route_only`]) runs the router and the rule alone (no `A`, no mix,
//! no expand): the first stage of the grouped path. Router statistics come out of the same pass
//! as per-tile rows, summed in tile order by the gating kernels' `gating_stats_finalize`.
//!
//! [`plan`] validates a call and computes grids, shared memory and every buffer's length without a
//! GPU; [`run`] runs it through any [`crate::kernels::exec::Backend`], and [`forward`] / [`forward_raw`]
//! bind device buffers and call it.

mod launch;
#[cfg(test)]
mod tests;

pub use launch::{forward, forward_raw, run, stats_build, FusedBuffers, RawFusedPointers};

use super::gating::{self, EntropyKind, GatingParams, KernelLaunch, StatsParams, StatsPlan};
use super::{BuildConfig, KernelBuild};
use crate::kernels::exec::{Buf, BufLens, Dims, KernelDesc};
use crate::model::{Gating, LayerSpec, Mix, Router};
use crate::{DType, MoleError, Result};
use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

/// The entry points.
pub mod kernel {
    use crate::kernels::exec::{ArgDesc as A, Buf, KernelDesc};
    use crate::kernels::Family;

    const PARAMS_BYTES: usize = std::mem::size_of::<super::FusedParams>();

    /// `head`, then `MOLE_FUSED_GATE_ARGS`: every gate tensor is null where a plan takes none;
    /// `rank_offsets` is `$ro` (required by the kernels that always expand); `expert_scales` is
    /// null without per-expert scales (and for route-only plans).
    macro_rules! with_gate_args {
        ($ro:expr; $($head:expr),*) => {
            &[
                $($head,)*
                A::optional_input(Buf::RouterWeight),
                A::optional_input(Buf::RouterBias),
                A::optional_input(Buf::GateInput),
                A::optional_input(Buf::AdapterIds),
                A::optional_input(Buf::SelectionBias),
                $ro,
                A::optional_input(Buf::ExpertScales),
                A::optional_input(Buf::Cores),
                A::optional_output(Buf::Ids),
                A::optional_output(Buf::RouteWeights),
                A::optional_output(Buf::Probs),
                A::optional_output(Buf::StatsWorkspace),
            ]
        };
    }

    const fn fused(name: &'static str, args: &'static [A]) -> KernelDesc {
        KernelDesc { family: Family::Fused, name, params_type: "mole_fused_params", params_bytes: PARAMS_BYTES, args }
    }

    /// The whole layer, one launch. A route-only plan takes no `A`, `B`, `y` or `rank_offsets`,
    /// and no `x` when the router reads none.
    pub static LAYER: KernelDesc = fused(
        "fused_layer",
        with_gate_args!(A::optional_input(Buf::RankOffsets);
            A::optional_input(Buf::X), A::optional_input(Buf::A), A::optional_input(Buf::B), A::optional_output(Buf::Y)),
    );
    /// Split variant, stage 1: split-K shrink into the workspace (`router_weight`: x router only).
    pub static SPLIT_SHRINK: KernelDesc = fused(
        "fused_split_shrink",
        &[A::input(Buf::X), A::input(Buf::A), A::optional_input(Buf::RouterWeight), A::output(Buf::Partials)],
    );
    /// Split variant, stage 2: slice sum, routing, mix and a block of the expand (no workspace
    /// when nothing is shrunk).
    pub static SPLIT_EXPAND: KernelDesc = fused(
        "fused_split_expand",
        with_gate_args!(A::input(Buf::RankOffsets);
            A::optional_input(Buf::Partials), A::input(Buf::B), A::output(Buf::Y)),
    );
    /// The whole layer on tensor cores (16-bit builds whose tile is whole m16 tiles, see
    /// [`super::FusedConfig::has_tensor_cores`]; `x` and `B` 16-byte aligned).
    pub static LAYER_MMA: KernelDesc = fused(
        "fused_layer_mma",
        with_gate_args!(A::input(Buf::RankOffsets);
            A::input(Buf::X), A::input(Buf::A), A::input(Buf::B), A::output(Buf::Y)),
    );

    /// Every entry point, in file order.
    pub static ALL: [&KernelDesc; 4] = [&LAYER, &SPLIT_SHRINK, &SPLIT_EXPAND, &LAYER_MMA];

    /// The entry points of a build of `dtype` with tiling `config`.
    pub fn for_config(dtype: crate::DType, config: super::FusedConfig) -> &'static [&'static KernelDesc] {
        if config.has_tensor_cores(dtype) {
            &ALL
        } else {
            &ALL[..3]
        }
    }
}

/// The most dynamic shared memory a launch may use without opting in (bytes).
pub const MAX_SHARED_BYTES: u64 = 48 * 1024;
/// Largest grid `y` extent.
const MAX_GRID_Y: u64 = 65_535;

/// The compile-time tiling of a build (the defines of `kernels/fused.cu`, generated by
/// [`BuildConfig::defines`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusedConfig {
    /// Threads per block (`MOLE_BLOCK_THREADS`).
    pub block_threads: u32,
    /// Tokens per tile (`MOLE_FUSED_BT`), a multiple of the warps per block.
    pub bt: u32,
    /// Reduction chunk of the shrink (`MOLE_FUSED_KC`).
    pub kc: u32,
    /// Most shrink columns, `R` plus `E` for the x router (`MOLE_FUSED_MAX_COLS`).
    pub max_cols: u32,
}

impl FusedConfig {
    /// The `.cu` defaults (what the host execution layer compiles).
    pub const DEFAULT: FusedConfig = FusedConfig { block_threads: 256, bt: 16, kc: 32, max_cols: 256 };

    /// Warps per block.
    pub fn warps(self) -> u32 {
        self.block_threads / 32
    }

    /// Whether a `dtype` build has the tensor-core layer kernel: 16-bit elements, a tile of whole
    /// m16 tiles and warps that split evenly over them.
    pub fn has_tensor_cores(self, dtype: DType) -> bool {
        dtype != DType::F32 && self.bt.is_multiple_of(16) && self.warps().is_multiple_of(self.bt / 16)
    }

    /// Output columns per block step of the tensor-core expand: one n16 strip per warp of an m16 tile.
    pub fn mma_bn(self) -> u32 {
        16 * (self.warps() / (self.bt / 16).max(1))
    }

    /// Checks the constraints the `.cu` file asserts.
    pub fn validate(self) -> Result<()> {
        let t = self.block_threads;
        if !t.is_multiple_of(32) || !(32..=1024).contains(&t) {
            return Err(MoleError::param("block_threads", t, "must be a multiple of 32 in 32..=1024"));
        }
        if self.bt == 0 || !self.bt.is_multiple_of(self.warps()) {
            return Err(MoleError::param("bt", self.bt, "must be a positive multiple of the warps per block"));
        }
        if self.kc == 0 {
            return Err(MoleError::ZeroDimension { name: "kc" });
        }
        if self.max_cols < 32 || !self.max_cols.is_multiple_of(32) {
            return Err(MoleError::param("max_cols", self.max_cols, "must be a positive multiple of 32"));
        }
        Ok(())
    }

    /// The configuration of a fused `build`, checked ([`FusedConfig::validate`]); an error for a
    /// build of another family.
    pub fn of(build: &KernelBuild) -> Result<FusedConfig> {
        let BuildConfig::Fused(c) = build.config else {
            return Err(MoleError::param("build", build, "is not a fused build"));
        };
        c.validate()?;
        Ok(c)
    }
}

/// The build of `dtype` with tiling `config`.
pub fn build(dtype: DType, config: FusedConfig) -> KernelBuild {
    KernelBuild::new(dtype, config)
}

/// The tilings [`candidates`] offers, the default first: taller tiles read `A` and `B` fewer
/// times per token, shorter ones give more blocks to small batches.
pub const CONFIG_CANDIDATES: [FusedConfig; 4] = [
    FusedConfig::DEFAULT,
    FusedConfig { block_threads: 256, bt: 32, kc: 32, max_cols: 128 },
    FusedConfig { block_threads: 128, bt: 8, kc: 32, max_cols: 128 },
    FusedConfig { block_threads: 256, bt: 8, kc: 64, max_cols: 256 },
];

/// Every configuration worth compiling: each dtype at each of [`CONFIG_CANDIDATES`].
pub fn candidates() -> Vec<KernelBuild> {
    DType::ALL.iter().flat_map(|&d| CONFIG_CANDIDATES.iter().map(move |&c| build(d, c))).collect()
}

/// One build per dtype, at [`FusedConfig::DEFAULT`].
pub fn default_builds() -> Vec<KernelBuild> {
    DType::ALL.iter().map(|&d| build(d, FusedConfig::DEFAULT)).collect()
}

/// Where the router scores come from (C: `mole_router_kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RouterKind {
    /// Given weights or adapter ids.
    None = 0,
    /// [`Router::X`]: the shrink's extra columns.
    X = 1,
    /// [`Router::H`].
    H = 2,
    /// [`Router::LowRank`].
    LowRank = 3,
    /// [`Router::Logits`].
    Logits = 4,
}

/// The mix (C: `mole_mix_kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MixKind {
    /// [`Mix::ExpertScale`].
    ExpertScale = 0,
    /// [`Mix::CoreMerge`].
    CoreMerge = 1,
}

/// Parameters of every fused kernel, by value (C: `mole_fused_params`, 148 bytes). Enum fields
/// hold the `as u32` of [`RouterKind`], [`MixKind`] and [`EntropyKind`]; booleans are 0 or 1.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct FusedParams {
    /// The routing rule (`tokens` = T, `experts` = E routed, `slots`).
    pub gate: GatingParams,
    /// Input features.
    pub d_in: u32,
    /// Output features.
    pub d_out: u32,
    /// Total rank `R` (0 for a route-only launch).
    pub rank: u32,
    /// `R + E`: the row length of the tile in shared memory.
    pub cols: u32,
    /// Columns the shrink computes: `R`, plus `E` for the x router.
    pub shrink_cols: u32,
    /// [`RouterKind`].
    pub router: u32,
    /// [`MixKind`].
    pub mix: u32,
    /// 1: `router_bias` is added to the scores.
    pub use_router_bias: u32,
    /// 0: route only.
    pub expand: u32,
    /// Split variant: `d_in` slices (1 otherwise).
    pub splits: u32,
    /// `d_in` per slice (a multiple of `kc`).
    pub k_per_split: u32,
    /// Split expand: `d_out` columns per block.
    pub n_per_block: u32,
    /// 1: per-tile statistics rows are written.
    pub stats: u32,
    /// Statistics: the rule has probabilities.
    pub stats_probs: u32,
    /// Statistics: the rule has raw scores (z-loss).
    pub stats_scores: u32,
    /// Statistics: [`EntropyKind`].
    pub stats_entropy: u32,
    /// Statistics: Tsallis index.
    pub stats_q: f32,
    /// Statistics: `1 / S(uniform)`.
    pub stats_entropy_scale: f32,
    /// Delta scale.
    pub scale: f32,
    /// Token tiles `ceil(T / bt)`.
    pub tiles: u32,
    /// Statistics: added to each probability before the entropy.
    pub stats_entropy_eps: f32,
}

// SAFETY: `FusedParams` is `#[repr(C)]`, Pod, and matches `mole_fused_params` (sizes and offsets
// asserted on both sides), so a pointer to one is what the kernels expect as their parameter.
unsafe impl cudarc::driver::DeviceRepr for FusedParams {}

/// Which variant a plan launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FusedVariant {
    /// One launch, one block per token tile.
    Single,
    /// Split-K shrink over `splits` slices of `d_in` (an upper bound, lowered so no slice is
    /// empty), then an expand over blocks of `n_per_block` output columns.
    Split {
        /// `d_in` slices.
        splits: u32,
        /// Output columns per expand block.
        n_per_block: u32,
    },
}

impl FusedVariant {
    /// The split variant sized for `tokens` tokens on a GPU with `sm_count` SMs: enough slices
    /// and column blocks that the small grid still gives every SM a few blocks.
    pub fn split_for(config: FusedConfig, tokens: usize, d_in: usize, d_out: usize, sm_count: u32) -> Self {
        let tiles = tokens.div_ceil(config.bt as usize).max(1) as u64;
        let target = 4 * sm_count.max(1) as u64;
        let splits = (target / tiles).clamp(1, (d_in as u64).div_ceil(config.kc as u64 * 4).max(1)).min(64);
        let n_blocks = (target / tiles).clamp(1, (d_out as u64).div_ceil(64).max(1));
        let n_per_block = (d_out as u64).div_ceil(n_blocks).div_ceil(32) * 32;
        FusedVariant::Split { splits: splits as u32, n_per_block: n_per_block.max(32) as u32 }
    }
}

/// What a fused call writes besides `y`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusedOutputs {
    /// `ids [T, slots]` (i32) and `weights [T, slots]` (f32).
    pub routing: bool,
    /// `probs [T, E]` (f32), for rules that have probabilities.
    pub probs: bool,
    /// Router statistics `[4E + 2]` (see [`StatsPlan::decode`]).
    pub stats: bool,
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedLaunch {
    /// The kernel (see [`kernel`]).
    pub kernel: &'static KernelDesc,
    /// Blocks `(x, y)`.
    pub grid: (u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory, bytes.
    pub shared_bytes: u32,
}

impl FusedLaunch {
    /// As launch dimensions.
    pub fn dims(&self) -> Dims {
        Dims { grid: (self.grid.0, self.grid.1, 1), block: self.block, shared_bytes: self.shared_bytes }
    }

    /// Whether this is the tensor-core kernel.
    pub fn uses_tensor_cores(&self) -> bool {
        std::ptr::eq(self.kernel, &kernel::LAYER_MMA)
    }
}

/// A validated fused call.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedPlan {
    /// Parameters of every launch.
    pub params: FusedParams,
    /// The build's tiling.
    pub config: FusedConfig,
    /// The variant (a route-only plan is always [`FusedVariant::Single`]).
    pub variant: FusedVariant,
    /// The launches, in order (empty for zero tokens).
    pub launches: Vec<FusedLaunch>,
    /// The FMA launch that replaces a tensor-core one (see [`FusedPlan::without_tensor_cores`]).
    pub fma_fallback: Option<FusedLaunch>,
    /// The statistics' final sum (the gating kernels' `gating_stats_finalize`), when asked for.
    pub stats: Option<StatsPlan>,
    /// Element counts of the buffers the call takes (0: none, passed as null): `x [T, d_in]`,
    /// `a [d_in, R]`, `b [R, d_out]`, `y [T, d_out]`, `router_weight` (`[d_in, E]` x router,
    /// `[R, E]` h router), `router_bias [E]`, `gate_input [T, E]` (logits or given weights),
    /// `adapter_ids [T]`, `selection_bias [E]`, `rank_offsets [E + 1]`, `expert_scales [bank experts]` (f32,
    /// when the spec has per-expert scales and the plan expands), `cores [C, R, R]`, the
    /// routing outputs `ids` and `route_weights [T, slots]`, `probs [T, E]`, the statistics
    /// workspace (u32 words: counts `[tiles, 2E]`, then f32 sums `[tiles, 2E + 2]`) and output
    /// `stats_out [4E + 2]`, and the split workspace `partials [splits, T, shrink_cols]` (f32).
    /// The workspaces need not be initialised.
    pub lens: BufLens,
}

impl FusedPlan {
    /// The plan with its tensor-core launch (if any) replaced by the FMA kernel: for views whose
    /// `x` or `B` are not 16-byte aligned, and for comparing the two.
    pub fn without_tensor_cores(mut self) -> FusedPlan {
        if let Some(fma) = self.fma_fallback.take() {
            for l in self.launches.iter_mut().filter(|l| l.uses_tensor_cores()) {
                *l = fma;
            }
        }
        self
    }

    /// Whether a launch runs on tensor cores.
    pub fn uses_tensor_cores(&self) -> bool {
        self.launches.iter().any(FusedLaunch::uses_tensor_cores)
    }
}

/// Bytes of dynamic shared memory of the tensor-core layer kernel (mirrors `fused_mma_carve`):
/// the common regions, then x stages, the W chunk, h' hi and lo, chunk scales and the two B
/// chunk stages, each 16-byte aligned, 2-byte elements.
pub fn mma_smem_bytes(config: FusedConfig, p: &FusedParams) -> u64 {
    let align = |b: u64| b.div_ceil(16) * 16;
    let (bt, km) = (config.bt as u64, 32u64);
    let (sc16, r16) = ((p.shrink_cols as u64).div_ceil(16) * 16, (p.rank as u64).div_ceil(16) * 16);
    let mut at = align(4 * smem_words(config, p, false));
    at = align(at + 2 * 2 * bt * (km + 8));
    at = align(at + 2 * km * (sc16 + 8));
    at = align(at + 2 * bt * (r16 + 8));
    at = align(at + 2 * bt * (r16 + 8));
    at = align(at + 4 * bt * (r16 / 16));
    at + 2 * 2 * 16 * (config.mma_bn() as u64 + 8)
}

/// 4-byte words of dynamic shared memory of a launch (mirrors `fused_carve` in the `.cu`).
pub fn smem_words(config: FusedConfig, p: &FusedParams, shrinks: bool) -> u64 {
    let (bt, kc) = (config.bt as u64, config.kc as u64);
    let (e, slots) = (p.gate.experts as u64, p.gate.slots as u64);
    let shrink = if shrinks { bt * kc + kc * p.shrink_cols as u64 } else { 0 };
    bt * p.cols as u64 + shrink + config.warps() as u64 * e + bt * e + 2 * bt * slots + 2 * bt
}

fn fits_u32(name: &'static str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| MoleError::param(name, v, "must fit in 32 bits"))
}

/// Validates a fused forward of `spec` over `tokens` tokens with `build` and computes its
/// launches and buffer lengths.
///
/// Errors: a build of another family or with an invalid tiling; an invalid spec; `R + E` (x router)
/// over the build's `max_cols`; more than [`gating::MAX_EXPERTS`] routed experts or `k` above
/// [`gating::MAX_K`]; shared memory over [`MAX_SHARED_BYTES`]; sizes past 32 bits.
pub fn plan(
    build: &KernelBuild,
    spec: &LayerSpec,
    tokens: usize,
    variant: FusedVariant,
    outputs: FusedOutputs,
) -> Result<FusedPlan> {
    plan_inner(build, spec, tokens, variant, outputs, true)
}

/// A route-only plan: the router and the rule of `spec` alone (no `A`, `B`, mix or expand; `y` is
/// not touched), writing `ids` / `weights` (always) and the other [`FusedOutputs`] asked for.
pub fn plan_route_only(
    build: &KernelBuild,
    spec: &LayerSpec,
    tokens: usize,
    outputs: FusedOutputs,
) -> Result<FusedPlan> {
    if matches!(spec.router(), Some(Router::H { .. } | Router::LowRank)) {
        return Err(MoleError::Unsupported(
            "a route-only launch cannot score on h: the router needs the shrink".into(),
        ));
    }
    plan_inner(build, spec, tokens, FusedVariant::Single, FusedOutputs { routing: true, ..outputs }, false)
}

fn plan_inner(
    build: &KernelBuild,
    spec: &LayerSpec,
    tokens: usize,
    variant: FusedVariant,
    outputs: FusedOutputs,
    expand: bool,
) -> Result<FusedPlan> {
    let config = FusedConfig::of(build)?;
    spec.validate()?;
    let (e, r) = (spec.routed_experts(), if expand { spec.total_rank() } else { 0 });
    let route = gating::plan(&spec.gating, tokens, e, 32)?;
    let router = match spec.gating {
        Gating::Routed { router, .. } => match router {
            Router::X { .. } => RouterKind::X,
            Router::H { .. } => RouterKind::H,
            Router::LowRank => RouterKind::LowRank,
            Router::Logits => RouterKind::Logits,
        },
        _ => RouterKind::None,
    };
    let router_bias = matches!(spec.router(), Some(Router::X { bias: true } | Router::H { bias: true }));
    let shrink_cols = r + if router == RouterKind::X { e } else { 0 };
    if shrink_cols > config.max_cols as usize {
        return Err(MoleError::Unsupported(format!(
            "R (+ E for an x router) = {shrink_cols} exceeds the build's {} shrink columns: use the grouped path",
            config.max_cols
        )));
    }
    let t = fits_u32("tokens", tokens as u64)?;
    let d_in = fits_u32("d_in", spec.d_in as u64)?;
    let d_out = fits_u32("d_out", spec.d_out as u64)?;
    let tiles = (tokens as u64).div_ceil(config.bt as u64);
    // What the reference's statistics report for this rule.
    let has_probs = route.writes_probs;
    let has_scores = spec.rule().is_some_and(|r| r.has_z_loss());
    let entropy_of = spec.rule().and_then(|r| r.entropy()).filter(|_| has_probs);
    let entropy = entropy_of.map_or(EntropyKind::None, |h| EntropyKind::for_q(h.q));
    let (splits, k_per_split, n_per_block) = match variant {
        FusedVariant::Single => (1, d_in.max(1), d_out.max(1)),
        FusedVariant::Split { splits, n_per_block } => {
            if splits == 0 || n_per_block == 0 {
                return Err(MoleError::param(
                    "split variant",
                    format!("{variant:?}"),
                    "needs splits, n_per_block >= 1",
                ));
            }
            let kc = config.kc as u64;
            let per = (spec.d_in as u64).div_ceil(splits as u64).div_ceil(kc) * kc;
            let splits = (spec.d_in as u64).div_ceil(per) as u32;
            (splits, per as u32, n_per_block)
        }
    };
    let params = FusedParams {
        gate: route.params,
        d_in,
        d_out,
        rank: r as u32,
        cols: (r + e) as u32,
        shrink_cols: shrink_cols as u32,
        router: router as u32,
        mix: match spec.mix {
            Mix::ExpertScale => MixKind::ExpertScale,
            Mix::CoreMerge { .. } => MixKind::CoreMerge,
        } as u32,
        use_router_bias: router_bias as u32,
        expand: expand as u32,
        splits,
        k_per_split,
        n_per_block,
        stats: outputs.stats as u32,
        stats_probs: has_probs as u32,
        stats_scores: has_scores as u32,
        stats_entropy: entropy as u32,
        stats_q: entropy_of.map_or(1.0, |h| h.q) as f32,
        stats_entropy_scale: entropy.scale(entropy_of.map_or(1.0, |h| h.q), e),
        scale: spec.scale as f32,
        tiles: fits_u32("token tiles", tiles)?,
        stats_entropy_eps: entropy_of.map_or(0.0, |h| h.eps) as f32,
    };
    // spec.validate() checked the f64 scale; it must also survive the cast.
    if !params.scale.is_finite() {
        return Err(MoleError::param("scale", spec.scale, "must be finite in f32"));
    }
    let shrink_smem = 4 * smem_words(config, &params, true);
    let expand_smem = 4 * smem_words(config, &params, false);
    let mut launches = Vec::new();
    let mut fma_fallback = None;
    if tokens > 0 {
        let tiles32 = params.tiles;
        match variant {
            FusedVariant::Single => {
                let fma = FusedLaunch {
                    kernel: &kernel::LAYER,
                    grid: (tiles32, 1),
                    block: config.block_threads,
                    shared_bytes: shrink_smem as u32,
                };
                let mma_bytes = mma_smem_bytes(config, &params);
                let mma = expand
                    && config.has_tensor_cores(build.dtype)
                    && spec.d_in.is_multiple_of(8)
                    && spec.d_out.is_multiple_of(8)
                    && mma_bytes <= MAX_SHARED_BYTES;
                if mma {
                    launches.push(FusedLaunch { kernel: &kernel::LAYER_MMA, shared_bytes: mma_bytes as u32, ..fma });
                    fma_fallback = Some(fma);
                } else {
                    launches.push(fma);
                }
            }
            FusedVariant::Split { .. } => {
                let n_blocks = (spec.d_out as u64).div_ceil(n_per_block as u64);
                if splits as u64 > MAX_GRID_Y || n_blocks > MAX_GRID_Y {
                    return Err(MoleError::param("split variant", format!("{variant:?}"), "grid y over 65535"));
                }
                if shrink_cols > 0 {
                    launches.push(FusedLaunch {
                        kernel: &kernel::SPLIT_SHRINK,
                        grid: (tiles32, splits),
                        block: config.block_threads,
                        shared_bytes: shrink_smem as u32,
                    });
                }
                launches.push(FusedLaunch {
                    kernel: &kernel::SPLIT_EXPAND,
                    grid: (tiles32, n_blocks as u32),
                    block: config.block_threads,
                    shared_bytes: expand_smem as u32,
                });
            }
        }
    }
    if let Some(l) = launches.iter().chain(&fma_fallback).find(|l| l.shared_bytes as u64 > MAX_SHARED_BYTES) {
        return Err(MoleError::Unsupported(format!(
            "{}: {} bytes of shared memory exceed {MAX_SHARED_BYTES}: use a smaller tile or the grouped path",
            l.kernel.name, l.shared_bytes
        )));
    }
    let stats = outputs.stats.then(|| StatsPlan {
        params: StatsParams {
            tokens: t,
            experts: e as u32,
            slots: params.gate.slots,
            chunk_tokens: config.bt,
            chunks: params.tiles,
            has_probs: has_probs as u32,
            has_scores: has_scores as u32,
            entropy: entropy as u32,
            q: params.stats_q,
            entropy_scale: params.stats_entropy_scale,
            entropy_eps: params.stats_entropy_eps,
        },
        partial: None,
        finalize: KernelLaunch {
            kernel: &gating::kernel::STATS_FINALIZE,
            grid: 1,
            block: gating::DEFAULT_BLOCK_THREADS,
            shared_bytes: 0,
        },
        workspace_words: gating::stats_workspace_words(tiles as usize, e),
        out_len: gating::stats_out_len(e),
        entropy: entropy_of,
    });
    let n = tokens;
    let split_ws = matches!(variant, FusedVariant::Split { .. }) && shrink_cols > 0;
    let routing = if outputs.routing { n * params.gate.slots as usize } else { 0 };
    let lens = BufLens::new()
        .with(Buf::X, if shrink_cols > 0 { n * spec.d_in } else { 0 })
        .with(Buf::A, if expand { spec.d_in * r } else { 0 })
        .with(Buf::B, if expand { r * spec.d_out } else { 0 })
        .with(Buf::Y, if expand { n * spec.d_out } else { 0 })
        .with(
            Buf::RouterWeight,
            match router {
                RouterKind::X => spec.d_in * e,
                RouterKind::H => spec.total_rank() * e,
                _ => 0,
            },
        )
        .with(Buf::RouterBias, if router_bias { e } else { 0 })
        .with(
            Buf::GateInput,
            if matches!(router, RouterKind::Logits) || matches!(spec.gating, Gating::Given { .. }) { n * e } else { 0 },
        )
        .with(Buf::AdapterIds, if spec.gating == Gating::AdapterIds { n } else { 0 })
        .with(Buf::SelectionBias, if spec.rule().is_some_and(|r| r.uses_selection_bias()) { e } else { 0 })
        .with(Buf::RankOffsets, if expand { spec.ranks.num_experts() + 1 } else { 0 })
        .with(Buf::ExpertScales, if expand && spec.expert_scales.is_some() { spec.ranks.num_experts() } else { 0 })
        .with(
            Buf::Cores,
            match spec.mix {
                Mix::CoreMerge { cores } if expand => cores * r * r,
                _ => 0,
            },
        )
        .with(Buf::Ids, routing)
        .with(Buf::RouteWeights, routing)
        .with(Buf::Probs, if outputs.probs && has_probs { n * e } else { 0 })
        .with(Buf::StatsWorkspace, stats.as_ref().map_or(0, |s| s.workspace_words))
        .with(Buf::StatsOut, stats.as_ref().map_or(0, |s| s.out_len))
        .with(Buf::Partials, if split_ws { splits as usize * n * shrink_cols } else { 0 });
    let variant = if expand { variant } else { FusedVariant::Single };
    Ok(FusedPlan { params, config, variant, launches, fma_fallback, stats, lens })
}
