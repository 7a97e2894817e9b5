//! The FFN-expert block's kernels (`kernels/ffn.cu`), between the dense base projections, with
//! the semantics of [`crate::reference::ffn_forward`] (MixLoRA: expert `e` is the whole gated FFN
//! with LoRA on gate, up and down, sharing the frozen base).
//!
//! The shared base down projection is linear, so `Σ_e w_e·a_e·W_down = (Σ_e w_e·a_e)·W_down`:
//! the block computes `a_mix = Σ_e w_e·a_e` and the base down projection runs once on it (`T`
//! rows, not `T·k`). A forward, given the base outputs `G = x·W_gate` and `U = x·W_up` (computed
//! once per token by cuBLAS or the caller) and the per-slot routing plans:
//! 1. [`run_activation`]: the SGMV shrinks `x·A^g`, `x·A^u` (`kernels/sgmv.cu`, the gate and up
//!    banks bound as its `a`), [`kernel::CLEAR`] (`a_mix = 0`), then [`kernel::ACT`] once per slot
//!    in slot order: for each tile of one expert's tokens and each f-slice, `g = G + s_g·h_g·B^g`,
//!    `u = U + s_u·h_u·B^u`, `a = act(g)·u` in f32, `a_mix += w·a` (rounded to the dtype after
//!    every pass), and the down shrink `h_d = a·A^d` per f-slice (f32 partials). No `[T·k, f]`
//!    activation tensor is written.
//! 2. The caller's `y = a_mix·W_down` (dense).
//! 3. [`run_down_delta`]: the SGMV expand of `h_d` by `B^d` per slot, `y += s_d·w·h_d·B^d`.
//!
//! Bytes each kernel moves (elements of `b` bytes; `k` slots, ranks `r`, `E'` experts that
//! received tokens): the shrinks read `x` once per slot (`T·k·d·b`) and the `A` columns of `E'`
//! experts; the clear writes `a_mix` (`T·f·b`); each act pass reads `G`, `U` and `a_mix` and
//! writes `a_mix` for its tokens (`4·T·f·b` over the `k` passes, per pass), plus the `B^g`, `B^u`
//! and `A^d` rows of its experts once per tile and f-slice, and writes `T·r` f32 down partials per
//! f-slice; the down expands read those and `B^d` and update `y` (`2·T·d·b` per pass).
//!
//! [`plan`] validates a call and computes every launch and buffer length without a GPU.

mod launch;

pub use launch::{run_activation, run_down_delta};

use super::sgmv::{self, SgmvConfig, SgmvPlan, SgmvShape};
use super::{BuildConfig, KernelBuild};
use crate::kernels::exec::{Buf, BufLens, Dims};
use crate::model::Activation;
use crate::{DType, MoleError, Result};
use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

/// The entry points.
pub mod kernel {
    use crate::kernels::exec::{ArgDesc as A, Buf, KernelDesc};
    use crate::kernels::Family;

    const PARAMS_BYTES: usize = std::mem::size_of::<super::FfnParams>();
    const fn ffn(name: &'static str, args: &'static [A]) -> KernelDesc {
        KernelDesc { family: Family::Ffn, name, params_type: "mole_ffn_params", params_bytes: PARAMS_BYTES, args }
    }

    /// `a_mix = 0`.
    pub static CLEAR: KernelDesc = ffn("ffn_clear", &[A::output(Buf::AMix)]);
    /// One slot pass: the gate/up deltas, the activation, `a_mix += w·a` and the down shrink.
    pub static ACT: KernelDesc = ffn(
        "ffn_act",
        &[
            A::input(Buf::GateOut),
            A::input(Buf::UpOut),
            A::optional_input(Buf::GatePartials),
            A::optional_input(Buf::UpPartials),
            A::optional_input(Buf::GateB),
            A::optional_input(Buf::UpB),
            A::optional_input(Buf::GateRankOffsets),
            A::optional_input(Buf::UpRankOffsets),
            A::optional_input(Buf::DownA),
            A::optional_input(Buf::DownRankOffsets),
            A::input(Buf::PlanOffsets),
            A::input(Buf::PlanEntries),
            A::input(Buf::RouteWeights),
            A::output(Buf::AMix),
            A::optional_output(Buf::DownPartials),
        ],
    );

    /// Every entry point, in file order.
    pub static ALL: [&KernelDesc; 2] = [&CLEAR, &ACT];
}

/// The compile-time tiling of a build (the defines of `kernels/ffn.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FfnConfig {
    /// Threads per block (`MOLE_BLOCK_THREADS`).
    pub block_threads: u32,
    /// Entries per tile (`MOLE_FFN_BM`): must equal the SGMV build's `bm` (the plans' block).
    pub bm: u32,
    /// Columns of `f` per step (`MOLE_FFN_BN`).
    pub bn: u32,
    /// Rank rows of `B^g` / `B^u` staged per step (`MOLE_FFN_KC`).
    pub kc: u32,
    /// Largest rank of one expert in any bank (`MOLE_FFN_MAX_RANK`).
    pub max_rank: u32,
    /// Most f-slices per pass (read by [`plan`], which lowers it so no slice is empty).
    pub f_splits: u32,
}

impl FfnConfig {
    /// The `.cu` defaults (what the host execution layer compiles).
    pub const DEFAULT: FfnConfig = FfnConfig { block_threads: 128, bm: 32, bn: 32, kc: 16, max_rank: 64, f_splits: 8 };

    /// Checks the constraints the `.cu` file asserts, plus shared memory under the 48 KiB static
    /// limit.
    pub fn validate(self) -> Result<()> {
        let t = self.block_threads;
        if !t.is_multiple_of(32) || !(32..=1024).contains(&t) {
            return Err(MoleError::param("block_threads", t, "must be a multiple of 32 in 32..=1024"));
        }
        let fields = [("bm", self.bm), ("bn", self.bn), ("kc", self.kc), ("max_rank", self.max_rank)];
        for (name, v) in fields.into_iter().chain([("f_splits", self.f_splits)]) {
            if v == 0 {
                return Err(MoleError::ZeroDimension { name });
            }
        }
        if !t.is_multiple_of(self.bn)
            || !(self.bm * self.bn).is_multiple_of(t)
            || !t.is_multiple_of(self.max_rank)
            || !(self.bm * self.max_rank).is_multiple_of(t)
        {
            return Err(MoleError::param("block_threads", t, "must tile BM x BN and BM x MAX_RANK exactly"));
        }
        // The act grid's `y` extent.
        if self.f_splits > 65_535 {
            return Err(MoleError::param("f_splits", self.f_splits, "at most 65535 (a grid's y extent)"));
        }
        if !self.max_rank.is_multiple_of(self.kc) {
            return Err(MoleError::param("max_rank", self.max_rank, "must be a multiple of kc"));
        }
        if self.shared_bytes() > 48 * 1024 {
            return Err(MoleError::param("max_rank", self.max_rank, "tiles exceed 48 KiB of static shared memory"));
        }
        Ok(())
    }

    /// Static shared memory of [`kernel::ACT`]: rows, the gate and up `h` tiles, a `B` chunk, the
    /// activation tile and an `A^d` chunk.
    pub fn shared_bytes(self) -> u64 {
        let (bm, bn, kc, r) = (self.bm as u64, self.bn as u64, self.kc as u64, self.max_rank as u64);
        4 * (bm + 2 * bm * r + kc * bn + bm * bn + bn * r)
    }

    /// The configuration of an ffn `build`, checked; an error for a build of another family.
    pub fn of(build: &KernelBuild) -> Result<FfnConfig> {
        let BuildConfig::Ffn(c) = build.config else {
            return Err(MoleError::param("build", build, "is not an ffn build"));
        };
        c.validate()?;
        Ok(c)
    }
}

/// The build of `dtype` with tiling `config`.
pub fn build(dtype: DType, config: FfnConfig) -> KernelBuild {
    KernelBuild::new(dtype, config)
}

/// The tilings [`candidates`] offers, the default first (`bm` 32 pairs with the SGMV defaults,
/// 16 with their small-tile candidate; `max_rank` 128 needs the smaller tile).
pub const CONFIG_CANDIDATES: [FfnConfig; 3] = [
    FfnConfig::DEFAULT,
    FfnConfig { block_threads: 256, bm: 32, bn: 64, kc: 16, max_rank: 64, f_splits: 16 },
    FfnConfig { block_threads: 128, bm: 16, bn: 32, kc: 16, max_rank: 128, f_splits: 8 },
];

/// Every configuration worth compiling: each dtype at each of [`CONFIG_CANDIDATES`].
pub fn candidates() -> Vec<KernelBuild> {
    DType::ALL.iter().flat_map(|&d| CONFIG_CANDIDATES.iter().map(move |&c| build(d, c))).collect()
}

/// One build per dtype, at [`FfnConfig::DEFAULT`].
pub fn default_builds() -> Vec<KernelBuild> {
    DType::ALL.iter().map(|&d| build(d, FfnConfig::DEFAULT)).collect()
}

/// The SGMV build a block runs with the ffn build `ffn_build` (its shrinks and down expand): the
/// first of [`sgmv::CONFIG_CANDIDATES`] with the same tile height `bm` (the plans' block, which
/// [`plan`] requires to match), in the same dtype. So `bm` 32 pairs with [`SgmvConfig::DEFAULT`]
/// and 16 with the small-tile candidate. The one rule that turns a block choice (an ffn build)
/// into the block's builds.
///
/// Errors: a build of another family or with an invalid configuration, and a `bm` no SGMV
/// candidate has.
pub fn sgmv_build_for(ffn_build: &KernelBuild) -> Result<KernelBuild> {
    let config = FfnConfig::of(ffn_build)?;
    sgmv::CONFIG_CANDIDATES
        .iter()
        .find(|c| c.bm == config.bm)
        .map(|&c| sgmv::build(ffn_build.dtype, c))
        .ok_or_else(|| MoleError::param("ffn_build", ffn_build, "no SGMV candidate has its bm (the plans' tile height)"))
}

/// `MOLE_FFN_SILU` / `MOLE_FFN_GELU`.
fn activation_code(a: Activation) -> u32 {
    match a {
        Activation::Silu => 0,
        Activation::Gelu => 1,
    }
}

/// Parameters of the block's kernels, by value (C: `mole_ffn_params`, 68 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct FfnParams {
    /// Tokens `T`.
    pub tokens: u32,
    /// Slots per token.
    pub slots: u32,
    /// Experts `E`.
    pub experts: u32,
    /// Intermediate features `f`.
    pub f: u32,
    /// Row length of the gate's `h` partials.
    pub r_gate_max: u32,
    /// Their split-K slices.
    pub gate_splits: u32,
    /// Row length of the up's `h` partials.
    pub r_up_max: u32,
    /// Their split-K slices.
    pub up_splits: u32,
    /// Row length of `A^d`.
    pub r_down_total: u32,
    /// Row length of the down partials.
    pub r_down_max: u32,
    /// f-slices per pass.
    pub f_splits: u32,
    /// Columns per f-slice.
    pub f_per_split: u32,
    /// Entries per slot plan.
    pub entry_stride: u32,
    /// The slot of an act pass.
    pub slot: u32,
    /// `MOLE_FFN_SILU` (0) or `MOLE_FFN_GELU` (1).
    pub activation: u32,
    /// `s_g`.
    pub scale_gate: f32,
    /// `s_u`.
    pub scale_up: f32,
}

// SAFETY: `FfnParams` is `#[repr(C)]`, Pod, and matches `mole_ffn_params` (size and offsets
// asserted on both sides).
unsafe impl cudarc::driver::DeviceRepr for FfnParams {}

/// The LoRA bank of one projection as the kernels see it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FfnBank<'a> {
    /// `rank_offsets [E + 1]` (host copy of what the kernels read).
    pub rank_offsets: &'a [u32],
    /// The delta's scale.
    pub scale: f32,
}

/// The problem a forward solves (everything but the buffers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FfnShape<'a> {
    /// Tokens `T`.
    pub tokens: usize,
    /// Slots per token.
    pub slots: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Model features `d`.
    pub d: usize,
    /// Intermediate features `f`.
    pub f: usize,
    /// The gate activation.
    pub activation: Activation,
    /// The gate bank (`None`: the base alone).
    pub gate: Option<FfnBank<'a>>,
    /// The up bank.
    pub up: Option<FfnBank<'a>>,
    /// The down bank.
    pub down: Option<FfnBank<'a>>,
}

/// A validated forward: parameters, the SGMV plans of the shrinks and the down expand, the
/// block's launches, and the element count of every buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnPlan {
    /// The act passes' parameters (`slot` = 0; each pass sets its own).
    pub params: FfnParams,
    /// The tiling of the ffn build.
    pub config: FfnConfig,
    /// The gate shrink (`x·A^g`; its `a`, `rank_offsets` and `partials` are the gate bank's).
    pub gate: Option<SgmvPlan>,
    /// The up shrink.
    pub up: Option<SgmvPlan>,
    /// The down expand (its `h` partials are the act passes' f-slices).
    pub down: Option<SgmvPlan>,
    /// The clear of `a_mix` (`None` for zero tokens).
    pub clear: Option<Dims>,
    /// One act pass (`None` when no plan has a tile: zero tokens).
    pub act: Option<Dims>,
    /// Element counts of every buffer of the block (`x`, the banks, their rank offsets, `G`, `U`,
    /// `a_mix`, the plans, the routing weights, the three partials workspaces and `y`).
    pub lens: BufLens,
}

impl FfnPlan {
    /// The parameters of act pass `slot`.
    pub fn act_params(&self, slot: usize) -> FfnParams {
        FfnParams { slot: slot as u32, ..self.params }
    }
}

/// Most rank of any expert in `offsets`, checked to be non-decreasing from 0.
fn max_rank(name: &'static str, offsets: &[u32], experts: usize) -> Result<u32> {
    if offsets.len() != experts + 1 {
        return Err(MoleError::ShapeMismatch { what: name, expected: vec![experts + 1], got: offsets.len() });
    }
    if offsets[0] != 0 {
        return Err(MoleError::param(name, offsets[0], "must start at 0"));
    }
    offsets.windows(2).try_fold(0u32, |m, w| {
        w[1].checked_sub(w[0]).map(|r| m.max(r)).ok_or_else(|| MoleError::param(name, w[1], "must not decrease"))
    })
}

/// Validates a forward of `ffn_build` with the SGMV kernels of `sgmv_build` over per-slot plans
/// `entry_stride` entries apart (padded to the SGMV build's `bm`, which must equal the ffn
/// build's), and computes its launches.
///
/// Errors: wrong families or dtypes, different tile heights, zero `d`/`f`/`experts`/`slots`, a
/// bank whose rank offsets are not `E + 1` non-decreasing values from 0, an expert rank above the
/// build's `max_rank`, a non-finite scale, and what [`sgmv::plan`] refuses for the shrinks
/// (`d` by the gate/up ranks) and the down expand (`f` by `d`).
pub fn plan(sgmv_build: &KernelBuild, ffn_build: &KernelBuild, shape: FfnShape<'_>, entry_stride: usize) -> Result<FfnPlan> {
    let config = FfnConfig::of(ffn_build)?;
    let sgmv_config = SgmvConfig::of(sgmv_build)?;
    if sgmv_build.dtype != ffn_build.dtype {
        return Err(MoleError::param("sgmv_build", sgmv_build, "its dtype differs from the ffn build's"));
    }
    if sgmv_config.bm != config.bm {
        return Err(MoleError::param("ffn_build", ffn_build, "its bm differs from the sgmv build's (the plans' block)"));
    }
    let FfnShape { tokens, slots, experts, d, f, activation, gate, up, down } = shape;
    for (name, v) in [("d", d), ("f", f), ("experts", experts), ("slots", slots)] {
        if v == 0 {
            return Err(MoleError::ZeroDimension { name });
        }
    }
    // What the SGMV plans check for banks that are present, checked here for a block without.
    if slots > sgmv::MAX_SLOTS {
        return Err(MoleError::param("slots", slots, "at most 4096"));
    }
    if experts > sgmv::MAX_EXPERTS {
        return Err(MoleError::param("experts", experts, "at most 4096"));
    }
    let elems = |name: &'static str, a: usize, b: usize| {
        (a as u64)
            .checked_mul(b as u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| MoleError::param(name, a, "the tensor exceeds the address space"))
    };
    let (td, tf) = (elems("tokens", tokens, d)?, elems("tokens", tokens, f)?);
    let banks = [("gate.rank_offsets", gate), ("up.rank_offsets", up), ("down.rank_offsets", down)];
    let mut ranks = [0u32; 3];
    for (i, (name, bank)) in banks.iter().enumerate() {
        let Some(bank) = bank else { continue };
        ranks[i] = max_rank(name, bank.rank_offsets, experts)?;
        if ranks[i] > config.max_rank {
            return Err(MoleError::param(name, ranks[i], "an expert's rank exceeds the build's max_rank"));
        }
        if !bank.scale.is_finite() {
            return Err(MoleError::param("scale", bank.scale, "must be finite"));
        }
    }
    let shrink = |bank: Option<FfnBank<'_>>| {
        bank.map(|b| {
            let s = SgmvShape { tokens, slots, d_in: d, d_out: f, scale: b.scale, expert_scales: false };
            sgmv::plan(sgmv_build, s, b.rank_offsets, entry_stride)
        })
        .transpose()
    };
    let (gate_plan, up_plan) = (shrink(gate)?, shrink(up)?);

    // f-slices: at most `f_splits`, none empty, each a whole number of BN columns.
    let bn = config.bn as u64;
    let chunks = (f as u64).div_ceil(bn);
    let per = chunks.div_ceil((config.f_splits as u64).min(chunks)) * bn;
    let f_splits = (f as u64).div_ceil(per);
    let rows = tokens as u64 * slots as u64;
    let down_plan = down
        .map(|b| -> Result<SgmvPlan> {
            let s = SgmvShape { tokens, slots, d_in: f, d_out: d, scale: b.scale, expert_scales: false };
            let mut p = sgmv::plan(sgmv_build, s, b.rank_offsets, entry_stride)?;
            // The expand reads the act passes' f-slices as its split-K partials.
            p.params.splits = f_splits as u32;
            p.params.k_per_split = u32::try_from(per).map_err(|_| MoleError::param("f", f, "must fit in 32 bits"))?;
            p.shrink = None;
            let partials = f_splits
                .checked_mul(rows)
                .and_then(|v| v.checked_mul(p.params.r_max as u64))
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| MoleError::param("tokens", tokens, "down workspace exceeds the address space"))?;
            p.lens.set(Buf::Partials, partials);
            Ok(p)
        })
        .transpose()?;

    let f32_ = |name: &'static str, v: usize| u32::try_from(v).map_err(|_| MoleError::param(name, v, "must fit in 32 bits"));
    let partials_of = |p: &Option<SgmvPlan>| p.as_ref().map_or(0, |p| p.lens.get(Buf::Partials));
    let splits_of = |p: &Option<SgmvPlan>| p.as_ref().map_or(0, |p| p.params.splits);
    let r_max_of = |p: &Option<SgmvPlan>| p.as_ref().map_or(0, |p| p.params.r_max);
    let r_total = |b: Option<FfnBank<'_>>| b.map_or(0, |b| b.rank_offsets[experts] as usize);
    let params = FfnParams {
        tokens: f32_("tokens", tokens)?,
        slots: f32_("slots", slots)?,
        experts: f32_("experts", experts)?,
        f: f32_("f", f)?,
        r_gate_max: r_max_of(&gate_plan),
        gate_splits: splits_of(&gate_plan),
        r_up_max: r_max_of(&up_plan),
        up_splits: splits_of(&up_plan),
        r_down_total: f32_("down rank", r_total(down))?,
        r_down_max: ranks[2],
        f_splits: f_splits as u32,
        f_per_split: u32::try_from(per).map_err(|_| MoleError::param("f", f, "must fit in 32 bits"))?,
        entry_stride: f32_("entry_stride", entry_stride)?,
        slot: 0,
        activation: activation_code(activation),
        scale_gate: gate.map_or(0.0, |b| b.scale),
        scale_up: up.map_or(0.0, |b| b.scale),
    };
    if tokens > i32::MAX as usize {
        return Err(MoleError::param("tokens", tokens, "must be below 2^31"));
    }
    let lens = BufLens::new()
        .with(Buf::X, td)
        .with(Buf::GateA, d * r_total(gate))
        .with(Buf::GateB, r_total(gate) * f)
        .with(Buf::UpA, d * r_total(up))
        .with(Buf::UpB, r_total(up) * f)
        .with(Buf::DownA, f * r_total(down))
        .with(Buf::DownB, r_total(down) * d)
        .with(Buf::GateRankOffsets, if gate.is_some() { experts + 1 } else { 0 })
        .with(Buf::UpRankOffsets, if up.is_some() { experts + 1 } else { 0 })
        .with(Buf::DownRankOffsets, if down.is_some() { experts + 1 } else { 0 })
        .with(Buf::GateOut, tf)
        .with(Buf::UpOut, tf)
        .with(Buf::AMix, tf)
        .with(Buf::PlanOffsets, slots * (experts + 1))
        .with(Buf::PlanEntries, slots * entry_stride)
        .with(Buf::RouteWeights, tokens * slots)
        .with(Buf::GatePartials, partials_of(&gate_plan))
        .with(Buf::UpPartials, partials_of(&up_plan))
        .with(Buf::DownPartials, partials_of(&down_plan))
        .with(Buf::Y, td);
    let tiles = (entry_stride as u64).div_ceil(config.bm as u64);
    if tiles > i32::MAX as u64 {
        return Err(MoleError::param("entry_stride", entry_stride, "more tiles than a grid holds"));
    }
    let threads = config.block_threads;
    let clear_blocks = (tf as u64).div_ceil(threads as u64).clamp(1, 65_535 * 4) as u32;
    let live = tokens > 0 && tiles > 0;
    let clear = (tokens > 0).then_some(Dims { grid: (clear_blocks, 1, 1), block: threads, shared_bytes: 0 });
    let act = live.then_some(Dims { grid: (tiles as u32, f_splits as u32, 1), block: threads, shared_bytes: 0 });
    Ok(FfnPlan { params, config, gate: gate_plan, up: up_plan, down: down_plan, clear, act, lens })
}

#[cfg(test)]
mod tests;
