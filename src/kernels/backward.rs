//! The backward pass's per-token stages (`kernels/backward.cu`), with the semantics of
//! [`fn@crate::reference::backward`] (the selection held constant; the loss `Σ dy·y + aux_loss`).
//!
//! A backward of one layer call, given `dy [T, d_out]` and the forward's selection (`ids`,
//! `route_weights`), runs in stream order:
//! 1. [`kernel::TOKEN`] (one block per token): `h = x·A`, `g = scale·s_e·dy·Bᵀ`, the dense
//!    weights `w`, the mix's backward (`dh`, `hm`, `dw`); then [`kernel::SCORES`] (routed gating):
//!    the router scores `z` (x, h, low-rank router or the caller's logits);
//! 2. with a load-balancing loss, [`kernel::STATS`] (one warp per chunk of tokens, per-chunk
//!    partial sums) and [`kernel::STATS_SUM`] (one block, the chunks summed in order): the
//!    selected and top-1 fractions and the mean and masked mean probabilities;
//! 3. [`kernel::GATE`] (one warp per token, routed or given gating): `dz`, the rule's
//!    vector-Jacobian product of `dw` plus the auxiliary losses' gradients (or the given weights'
//!    gradient), written to `d_gate_input` for the logits router and given weights; the h and
//!    low-rank routers add `dz·W_rᵀ` / `dz` into `dh`;
//! 4. [`kernel::DX`]: `dx = dh·Aᵀ (+ dz·W_gᵀ for the x router)`.
//!
//! They leave the f32 workspace the weight gradients read (`h`, `g`, `dh`, `hm`, `w`, `dz`:
//! [`Buf::BwH`] and the other `Bw*` buffers). Every element has one writer and every sum a fixed
//! order, so two runs are bit-identical. [`plan`] validates a call and computes every launch and
//! buffer length without a GPU; [`run`] launches it.

mod launch;

pub use launch::run;

use super::gating::{self, EntropyKind, RuleKind};
use super::{BuildConfig, KernelBuild};
use crate::kernels::exec::{Buf, BufLens, Dims};
use crate::model::{Balance, Gating, LayerSpec, Mix, Router};
use crate::{DType, MoleError, Result};
use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

/// The entry points.
pub mod kernel {
    use crate::kernels::exec::{ArgDesc as A, Buf, KernelDesc};
    use crate::kernels::Family;

    const PARAMS_BYTES: usize = std::mem::size_of::<super::BackwardParams>();
    const fn bw(name: &'static str, args: &'static [A]) -> KernelDesc {
        KernelDesc { family: Family::Backward, name, params_type: "mole_backward_params", params_bytes: PARAMS_BYTES, args }
    }

    /// Stage 1, per token: `h`, `g`, the dense weights and the mix's backward (`dh`, `hm`, `dw`).
    pub static TOKEN: KernelDesc = bw(
        "bw_token",
        &[
            A::input(Buf::X),
            A::input(Buf::A),
            A::input(Buf::B),
            A::input(Buf::Dy),
            A::input(Buf::RankOffsets),
            A::optional_input(Buf::ExpertScales),
            A::optional_input(Buf::Cores),
            A::input(Buf::Ids),
            A::input(Buf::RouteWeights),
            A::output(Buf::BwH),
            A::output(Buf::BwG),
            A::output(Buf::BwDh),
            A::output(Buf::BwHm),
            A::output(Buf::BwDw),
            A::output(Buf::BwW),
        ],
    );
    /// Stage 1, routed gating: the router scores `z`.
    pub static SCORES: KernelDesc = bw(
        "bw_scores",
        &[
            A::optional_input(Buf::X),
            A::optional_input(Buf::RouterWeight),
            A::optional_input(Buf::RouterBias),
            A::optional_input(Buf::GateInput),
            A::input(Buf::BwH),
            A::output(Buf::BwZ),
        ],
    );
    /// Stage 2 (a load-balancing loss): per-chunk partial sums of the router statistics.
    pub static STATS: KernelDesc =
        bw("bw_stats", &[A::input(Buf::Ids), A::input(Buf::BwZ), A::output(Buf::BwStatsPartials)]);
    /// Stage 2: the chunks summed in order, divided by `T`.
    pub static STATS_SUM: KernelDesc = bw("bw_stats_sum", &[A::input(Buf::BwStatsPartials), A::output(Buf::BwStats)]);
    /// Stage 3, per token: `dz` (or the given weights' gradient), the router's part of `dh`.
    pub static GATE: KernelDesc = bw(
        "bw_gate",
        &[
            A::input(Buf::Ids),
            A::optional_input(Buf::BwZ),
            A::input(Buf::BwDw),
            A::input(Buf::BwW),
            A::optional_input(Buf::BwStats),
            A::optional_input(Buf::RouterWeight),
            A::output(Buf::BwDz),
            A::output(Buf::BwDh),
            A::optional_output(Buf::DGateInput),
        ],
    );
    /// Stage 4: `dx = dh·Aᵀ (+ dz·W_gᵀ)`.
    pub static DX: KernelDesc = bw(
        "bw_dx",
        &[
            A::input(Buf::BwDh),
            A::input(Buf::A),
            A::optional_input(Buf::BwDz),
            A::optional_input(Buf::RouterWeight),
            A::output(Buf::DX),
        ],
    );

    /// Every entry point, in file order.
    pub static ALL: [&KernelDesc; 6] = [&TOKEN, &SCORES, &STATS, &STATS_SUM, &GATE, &DX];
}

/// The compile-time configuration of a build (the defines of `kernels/backward.cu`) and the
/// statistics' token chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackwardConfig {
    /// Threads per block (`MOLE_BLOCK_THREADS`): a power of two (the block reductions halve it).
    pub block_threads: u32,
    /// Tokens per chunk of the statistics' partial sums (one warp each; not a define).
    pub stats_chunk_tokens: u32,
}

impl BackwardConfig {
    /// The `.cu` defaults (what the host execution layer compiles).
    pub const DEFAULT: BackwardConfig = BackwardConfig { block_threads: 128, stats_chunk_tokens: 64 };

    /// Checks the constraints the `.cu` file asserts.
    pub fn validate(self) -> Result<()> {
        let t = self.block_threads;
        if !t.is_power_of_two() || !(32..=1024).contains(&t) {
            return Err(MoleError::param("block_threads", t, "must be a power of two in 32..=1024"));
        }
        if self.stats_chunk_tokens == 0 {
            return Err(MoleError::ZeroDimension { name: "stats_chunk_tokens" });
        }
        Ok(())
    }

    /// The configuration of a backward `build`, checked; an error for a build of another family.
    pub fn of(build: &KernelBuild) -> Result<BackwardConfig> {
        let BuildConfig::Backward(c) = build.config else {
            return Err(MoleError::param("build", build, "is not a backward build"));
        };
        c.validate()?;
        Ok(c)
    }
}

/// The build of `dtype` with `config`.
pub fn build(dtype: DType, config: BackwardConfig) -> KernelBuild {
    KernelBuild::new(dtype, config)
}

/// Every configuration worth compiling: each dtype at [`BackwardConfig::DEFAULT`].
pub fn candidates() -> Vec<KernelBuild> {
    default_builds()
}

/// One build per dtype, at [`BackwardConfig::DEFAULT`].
pub fn default_builds() -> Vec<KernelBuild> {
    DType::ALL.iter().map(|&d| build(d, BackwardConfig::DEFAULT)).collect()
}

/// The mix (C: `MOLE_BW_MIX_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MixKind {
    /// [`Mix::ExpertScale`].
    ExpertScale = 0,
    /// [`Mix::CoreMerge`].
    CoreMerge = 1,
}

/// Where the scores come from (C: `MOLE_BW_ROUTER_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RouterKind {
    /// No router (given weights, adapter ids).
    None = 0,
    /// [`Router::X`].
    X = 1,
    /// [`Router::H`].
    H = 2,
    /// [`Router::LowRank`].
    LowRank = 3,
    /// [`Router::Logits`].
    Logits = 4,
}

/// The load-balancing loss's form (C: `MOLE_BW_BALANCE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BalanceKind {
    /// [`Balance::Switch`].
    Switch = 0,
    /// [`Balance::DynMole`].
    DynMole = 1,
    /// [`Balance::LlavaMole`].
    LlavaMole = 2,
}

impl From<Balance> for BalanceKind {
    fn from(b: Balance) -> Self {
        match b {
            Balance::Switch => BalanceKind::Switch,
            Balance::DynMole => BalanceKind::DynMole,
            Balance::LlavaMole => BalanceKind::LlavaMole,
        }
    }
}

/// Parameters of every backward kernel, by value (C: `mole_backward_params`, 108 bytes). Enum
/// fields hold the `as u32` of [`MixKind`], [`RouterKind`], [`RuleKind`],
/// [`gating::WeightMode`], [`EntropyKind`] and [`BalanceKind`]; booleans are 0 or 1.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BackwardParams {
    /// Tokens `T`.
    pub tokens: u32,
    /// Input features.
    pub d_in: u32,
    /// Output features.
    pub d_out: u32,
    /// Total rank `R`.
    pub rank: u32,
    /// Routed experts `E` (cores for CoMoL).
    pub experts: u32,
    /// Bank experts (`rank_offsets` has one more entry).
    pub bank_experts: u32,
    /// Slots per token.
    pub slots: u32,
    /// [`MixKind`].
    pub mix: u32,
    /// [`RouterKind`].
    pub router: u32,
    /// [`RuleKind`] (given weights and adapter ids included).
    pub rule: u32,
    /// [`gating::WeightMode`] of softmax top-k.
    pub weights: u32,
    /// SMoRA's `k` (its weights are `k · s / Σ s`).
    pub k: u32,
    /// Given weights: 1 when the kept values were softmaxed.
    pub softmax_kept: u32,
    /// 1: `router_bias` is added to the scores.
    pub has_bias: u32,
    /// [`EntropyKind`] of the entropy loss (none without one).
    pub entropy: u32,
    /// [`BalanceKind`].
    pub balance: u32,
    /// Tokens per statistics chunk.
    pub chunk_tokens: u32,
    /// Statistics chunks (0 without a load-balancing loss).
    pub chunks: u32,
    /// The layer's `scale`.
    pub scale: f32,
    /// Softmax temperature (1 for DynMoLE and SMoRA).
    pub temperature: f32,
    /// Tsallis index `q` of the entropy loss.
    pub q: f32,
    /// Added to each probability before the entropy.
    pub entropy_eps: f32,
    /// [`EntropyKind::scale`]: `1 / S(uniform)`.
    pub entropy_scale: f32,
    /// `1 / T` (0 for no tokens).
    pub inv_t: f32,
    /// Coefficient of the load-balancing loss.
    pub lb_coef: f32,
    /// Coefficient of the z-loss.
    pub z_coef: f32,
    /// Coefficient of the entropy loss.
    pub entropy_coef: f32,
}

// SAFETY: `BackwardParams` is `#[repr(C)]`, Pod, and matches `mole_backward_params` (size and
// offsets asserted on both sides).
unsafe impl cudarc::driver::DeviceRepr for BackwardParams {}

/// The launches of stage 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsLaunches {
    /// [`kernel::STATS`]: one warp per chunk.
    pub partial: Dims,
    /// [`kernel::STATS_SUM`]: one block.
    pub sum: Dims,
}

/// A validated backward: parameters, the configuration, each stage's launch (`None` where the
/// stage does not run: no tokens, no router, no load-balancing loss, adapter ids) and the element
/// count of every buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardPlan {
    /// The kernels' parameters.
    pub params: BackwardParams,
    /// The build's configuration.
    pub config: BackwardConfig,
    /// [`kernel::TOKEN`].
    pub token: Option<Dims>,
    /// [`kernel::SCORES`] (routed gating).
    pub scores: Option<Dims>,
    /// Stage 2 (a load-balancing loss).
    pub stats: Option<StatsLaunches>,
    /// [`kernel::GATE`] (routed gating and given weights).
    pub gate: Option<Dims>,
    /// [`kernel::DX`].
    pub dx: Option<Dims>,
    /// Element counts: the inputs (`x`, `A`, `B`, `dy`, `rank_offsets`, `expert_scales`, `cores`,
    /// `router_weight`, `router_bias`, `gate_input`, `ids`, `route_weights`), the outputs (`dx`,
    /// `d_gate_input`) and the f32 workspace: `bw_h`, `bw_g`, `bw_dh`, `bw_hm` `[T, R]`;
    /// `bw_dw`, `bw_w` `[T, E]`; `bw_z` `[T, E]` (routed); `bw_dz` `[T, E]` (routed or given);
    /// `bw_stats_partials` `[chunks, 4E]` and `bw_stats` `[4E]` (a load-balancing loss).
    pub lens: BufLens,
}

/// `a · b` elements, named on overflow.
fn elems(name: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).filter(|&v| v <= isize::MAX as usize).ok_or_else(|| {
        MoleError::param(name, a, "the tensor exceeds the address space")
    })
}

/// A grid of `items / per_block` blocks, at least 1, at most 65535 · 256 (kernels grid-stride).
fn grid(items: u64, per_block: u64) -> u32 {
    items.div_ceil(per_block).clamp(1, 65_535 * 256) as u32
}

/// Validates a backward of `spec` on `tokens` tokens with `build` and computes its launches.
///
/// Errors: a build of another family or an invalid configuration, an invalid spec, more tokens
/// than [`crate::limits::MAX_TOKENS`], a gating the routing kernels refuse (more than 1024
/// experts, `k` above 8: [`gating::plan`]), and a tensor beyond the address space.
pub fn plan(build: &KernelBuild, spec: &LayerSpec, tokens: usize) -> Result<BackwardPlan> {
    let config = BackwardConfig::of(build)?;
    spec.validate()?;
    crate::limits::check_max("tokens", tokens, crate::limits::MAX_TOKENS)?;
    let (d_in, d_out, r, e) = (spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
    let bank = spec.ranks.num_experts();
    let route = gating::plan(&spec.gating, tokens, e, gating::DEFAULT_BLOCK_THREADS)?.params;
    let slots = route.slots as usize;
    let (mix, cores) = match spec.mix {
        Mix::ExpertScale => (MixKind::ExpertScale, 0),
        Mix::CoreMerge { cores } => (MixKind::CoreMerge, cores),
    };
    let (router, has_bias) = match spec.router() {
        None => (RouterKind::None, false),
        Some(Router::X { bias }) => (RouterKind::X, bias),
        Some(Router::H { bias }) => (RouterKind::H, bias),
        Some(Router::LowRank) => (RouterKind::LowRank, false),
        Some(Router::Logits) => (RouterKind::Logits, false),
    };
    let routed = matches!(spec.gating, Gating::Routed { .. });
    let given = matches!(spec.gating, Gating::Given { .. });
    let aux = spec.training.aux_losses;
    // Only a routed rule has probabilities for the losses (checked by the spec).
    let entropy = spec.rule().and_then(|rule| rule.entropy()).filter(|_| aux.entropy != 0.0);
    let entropy_kind = entropy.map_or(EntropyKind::None, |h| EntropyKind::for_q(h.q));
    let lb = routed && aux.load_balancing != 0.0;
    let chunks = if lb { (tokens as u64).div_ceil(config.stats_chunk_tokens as u64) as usize } else { 0 };
    let u32_ = |name: &'static str, v: usize| u32::try_from(v).map_err(|_| MoleError::param(name, v, "must fit in 32 bits"));
    let params = BackwardParams {
        tokens: u32_("tokens", tokens)?,
        d_in: u32_("d_in", d_in)?,
        d_out: u32_("d_out", d_out)?,
        rank: u32_("rank", r)?,
        experts: u32_("experts", e)?,
        bank_experts: u32_("bank experts", bank)?,
        slots: route.slots,
        mix: mix as u32,
        router: router as u32,
        rule: route.rule,
        weights: route.weights,
        k: route.k,
        softmax_kept: route.softmax_kept,
        has_bias: has_bias as u32,
        entropy: entropy_kind as u32,
        balance: BalanceKind::from(aux.balance) as u32,
        chunk_tokens: config.stats_chunk_tokens,
        chunks: u32_("chunks", chunks)?,
        scale: spec.scale as f32,
        temperature: if route.rule == RuleKind::SigmoidTopK as u32 { 1.0 } else { route.temperature },
        q: entropy.map_or(1.0, |h| h.q as f32),
        entropy_eps: entropy.map_or(0.0, |h| h.eps as f32),
        entropy_scale: entropy_kind.scale(entropy.map_or(1.0, |h| h.q), e),
        inv_t: if tokens == 0 { 0.0 } else { (1.0 / tokens as f64) as f32 },
        lb_coef: if lb { aux.load_balancing as f32 } else { 0.0 },
        z_coef: aux.z_loss as f32,
        entropy_coef: if entropy.is_some() { aux.entropy as f32 } else { 0.0 },
    };

    let (tr, te) = (elems("tokens", tokens, r)?, elems("tokens", tokens, e)?);
    let router_rows = match router {
        RouterKind::X => d_in,
        RouterKind::H => r,
        _ => 0,
    };
    let gate_input = matches!(router, RouterKind::Logits) || given;
    let stats_len = elems("experts", e, 4)?;
    let lens = BufLens::new()
        .with(Buf::X, elems("tokens", tokens, d_in)?)
        .with(Buf::A, elems("d_in", d_in, r)?)
        .with(Buf::B, elems("rank", r, d_out)?)
        .with(Buf::Dy, elems("tokens", tokens, d_out)?)
        .with(Buf::RankOffsets, bank + 1)
        .with(Buf::ExpertScales, if spec.expert_scales.is_some() { bank } else { 0 })
        .with(Buf::Cores, elems("cores", cores, elems("rank", r, r)?)?)
        .with(Buf::RouterWeight, elems("router_weight", router_rows, e)?)
        .with(Buf::RouterBias, if has_bias { e } else { 0 })
        .with(Buf::GateInput, if gate_input { te } else { 0 })
        .with(Buf::Ids, elems("tokens", tokens, slots)?)
        .with(Buf::RouteWeights, tokens * slots)
        .with(Buf::DX, tokens * d_in)
        .with(Buf::DGateInput, if gate_input { te } else { 0 })
        .with(Buf::BwH, tr)
        .with(Buf::BwG, tr)
        .with(Buf::BwDh, tr)
        .with(Buf::BwHm, tr)
        .with(Buf::BwDw, te)
        .with(Buf::BwW, te)
        .with(Buf::BwZ, if routed { te } else { 0 })
        .with(Buf::BwDz, if routed || given { te } else { 0 })
        .with(Buf::BwStatsPartials, if lb { elems("tokens", chunks, stats_len)? } else { 0 })
        .with(Buf::BwStats, if lb { stats_len } else { 0 });

    let threads = config.block_threads;
    let warps = (threads / 32) as u64;
    let live = tokens > 0;
    let dims = |grid: u32| Dims { grid: (grid, 1, 1), block: threads, shared_bytes: 0 };
    let t = tokens as u64;
    Ok(BackwardPlan {
        params,
        config,
        token: live.then(|| dims(grid(t, 1))),
        scores: (live && routed).then(|| dims(grid(t * e as u64, threads as u64))),
        stats: (live && lb).then(|| StatsLaunches { partial: dims(grid(chunks as u64, warps)), sum: dims(1) }),
        gate: (live && (routed || given)).then(|| dims(grid(t, warps))),
        dx: live.then(|| dims(grid(t * d_in as u64, threads as u64))),
        lens,
    })
}

#[cfg(test)]
mod tests;
