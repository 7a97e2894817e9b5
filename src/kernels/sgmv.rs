//! The segmented grouped LoRA kernels (`kernels/sgmv.cu`): the expert-scale layer's shrink and
//! expand over per-slot routing plans, with the semantics of
//! [`crate::reference::grouped_forward`]:
//! `y[t] += scale · Σ_s w[t,s] · (x[t] · A[:, cols(e)]) · B[cols(e), :]`, `e = ids[t,s]`.
//!
//! How a forward runs:
//! 1. **Plans**, one per slot: plan `s` is [`RoutingPlan::build`] over column `s` of `ids` with
//!    `block = BM` (the build's tile height), so that every tile of `BM` entries belongs to one
//!    expert. [`SlotPlans::build`] builds them on the host; on the device,
//!    [`super::gating::group_slots`] runs the gating plan kernels in column mode (`E <= 1024`),
//!    reading column `s` of `ids` in place and writing the packed `offsets [slots, E + 1]` and
//!    `entries [slots, entry_stride]` with `entry_stride = `[`entry_capacity`] (fits any routing).
//! 2. **Shrink**, one launch for all slots: `h_part [splits, T·slots, r_max]` (f32), each split-K
//!    slice of `d_in` in its own slice (no atomics).
//! 3. **Expand**, one launch per slot, in slot order: the splits are summed in order as `h` is
//!    loaded, and `y` is updated in place. A token appears at most once per slot plan, so there
//!    are no write conflicts and the sum over slots has a fixed order: results are deterministic.
//!    `y` is rounded to the element type after every pass (up to `slots` roundings).
//!
//! [`plan`] validates a call and computes grids, blocks and workspace without a GPU; the
//! `launch` child module runs it on a [`crate::cuda::Device`] ([`forward`], [`forward_raw`]).

mod launch;

pub use launch::{forward, forward_raw, run, RawSgmvPointers, SgmvBuffers};

use super::{Family, KernelBuild, BLOCK_THREADS_DEFINE};
use crate::exec::{Buf, BufLens, Dims, KernelDesc};
use crate::plan::{RoutingPlan, TokenSlot};
use crate::{DType, MoleError, Result};
use bytemuck::{Pod, Zeroable};

/// Largest rank of one expert (`MOLE_SGMV_MAX_RANK`).
pub const MAX_RANK: usize = 256;
/// Most experts (`MOLE_SGMV_MAX_EXPERTS`).
pub const MAX_EXPERTS: usize = 4096;
/// Most slots per token (the shrink grid's `z` extent stays far below the 65535 limit).
pub const MAX_SLOTS: usize = 4096;
/// Largest grid `y` / `z` extent.
const MAX_GRID_YZ: u64 = 65_535;

/// The entry points.
pub mod kernel {
    use crate::exec::{ArgDesc as A, Buf, KernelDesc};
    use crate::kernels::Family;

    const PARAMS_BYTES: usize = std::mem::size_of::<super::SgmvParams>();
    const SHRINK_ARGS: &[A] = &[
        A::input(Buf::X),
        A::input(Buf::A),
        A::input(Buf::RankOffsets),
        A::input(Buf::PlanOffsets),
        A::input(Buf::PlanEntries),
        A::output(Buf::Partials),
    ];
    const EXPAND_ARGS: &[A] = &[
        A::input(Buf::Partials),
        A::input(Buf::B),
        A::input(Buf::RankOffsets),
        A::input(Buf::PlanOffsets),
        A::input(Buf::PlanEntries),
        A::input(Buf::RouteWeights),
        A::output(Buf::Y),
    ];
    const fn sgmv(name: &'static str, args: &'static [A]) -> KernelDesc {
        KernelDesc { family: Family::Sgmv, name, params_type: "mole_sgmv_params", params_bytes: PARAMS_BYTES, args }
    }

    /// The split-K shrink of every slot.
    pub static SHRINK: KernelDesc = sgmv("sgmv_shrink", SHRINK_ARGS);
    /// The expand of one slot.
    pub static EXPAND: KernelDesc = sgmv("sgmv_expand", EXPAND_ARGS);
    /// The tensor-core shrink (f16 / bf16 builds only; `d_in % 8 == 0`, `x` 16-byte aligned).
    pub static SHRINK_MMA: KernelDesc = sgmv("sgmv_shrink_mma", SHRINK_ARGS);
    /// The tensor-core expand (f16 / bf16 builds only; `d_out % 8 == 0`, `b` 16-byte aligned).
    pub static EXPAND_MMA: KernelDesc = sgmv("sgmv_expand_mma", EXPAND_ARGS);

    /// The entry points of a `dtype` build, in file order.
    pub fn for_dtype(dtype: crate::DType) -> &'static [&'static KernelDesc] {
        static FMA: [&KernelDesc; 2] = [&SHRINK, &EXPAND];
        static ALL: [&KernelDesc; 4] = [&SHRINK, &EXPAND, &SHRINK_MMA, &EXPAND_MMA];
        match dtype {
            crate::DType::F32 => &FMA,
            _ => &ALL,
        }
    }
}

/// The compile-time tiling of a build (the defines of `kernels/sgmv.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SgmvConfig {
    /// Threads per block (`MOLE_BLOCK_THREADS`).
    pub block_threads: u32,
    /// Entries per tile, the plans' block (`MOLE_SGMV_BM`).
    pub bm: u32,
    /// Output columns per expand block (`MOLE_SGMV_BN`).
    pub bn: u32,
    /// Rank columns per shrink pass (`MOLE_SGMV_RC`).
    pub rc: u32,
    /// Reduction chunk staged in shared memory (`MOLE_SGMV_KC`).
    pub kc: u32,
    /// Split-K factor of the shrink (`MOLE_SGMV_SPLITS`), an upper bound: [`plan`] lowers it
    /// so that no split is empty.
    pub splits: u32,
    /// Pipeline stages of the tensor-core shrink's `x` tile (`MOLE_SGMV_STAGES`): 1, or 2 for
    /// `cp.async` double buffering.
    pub stages: u32,
}

impl SgmvConfig {
    /// The `.cu` defaults (what the host execution layer compiles).
    pub const DEFAULT: SgmvConfig =
        SgmvConfig { block_threads: 128, bm: 32, bn: 32, rc: 32, kc: 16, splits: 2, stages: 2 };

    /// The defines of this configuration, as `(name, value)`.
    fn defines(self) -> [(&'static str, u32); 7] {
        [
            (BLOCK_THREADS_DEFINE, self.block_threads),
            ("MOLE_SGMV_BM", self.bm),
            ("MOLE_SGMV_BN", self.bn),
            ("MOLE_SGMV_RC", self.rc),
            ("MOLE_SGMV_KC", self.kc),
            ("MOLE_SGMV_SPLITS", self.splits),
            ("MOLE_SGMV_STAGES", self.stages),
        ]
    }

    /// Checks the constraints the `.cu` file asserts, plus shared memory under the 48 KiB static
    /// limit.
    pub fn validate(self) -> Result<()> {
        let t = self.block_threads;
        if !t.is_multiple_of(32) || !(32..=1024).contains(&t) {
            return Err(MoleError::param("block_threads", t, "must be a multiple of 32 in 32..=1024"));
        }
        for (name, v) in [("bm", self.bm), ("bn", self.bn), ("rc", self.rc), ("kc", self.kc), ("splits", self.splits)] {
            if v == 0 {
                return Err(MoleError::ZeroDimension { name });
            }
        }
        if !(1..=2).contains(&self.stages) {
            return Err(MoleError::param("stages", self.stages, "must be 1 or 2"));
        }
        if !t.is_multiple_of(self.bn)
            || !(self.bm * self.bn).is_multiple_of(t)
            || !t.is_multiple_of(self.rc)
            || !(self.bm * self.rc).is_multiple_of(t)
        {
            return Err(MoleError::param("block_threads", t, "must tile BM x BN and BM x RC exactly"));
        }
        let smem = 4 * (self.bm + self.bm * self.kc + self.kc * self.bn.max(self.rc)) as u64;
        // The tensor-core shrink: rows, `stages` x tiles of BM x (32 + 8) and an A tile of
        // 32 x (16 · warps / (BM / 16) + 8), 16-bit elements.
        let mma_rc = 16 * (t / 32) / (self.bm / 16).max(1);
        let mma_smem = 4 * self.bm as u64 + 2 * (self.stages * self.bm * 40 + 32 * (mma_rc + 8)) as u64;
        if smem.max(mma_smem) > 48 * 1024 {
            return Err(MoleError::param("bm", self.bm, "tiles exceed 48 KiB of static shared memory"));
        }
        Ok(())
    }

    /// Output columns per block of the tensor-core expand: `16 · warps / (bm / 16)` (one
    /// 16-column strip per warp, `bm / 16` warps down the tile).
    pub fn mma_bn(self) -> u32 {
        16 * (self.block_threads / 32) / (self.bm / 16).max(1)
    }

    /// The configuration a build declares (defaults for absent defines).
    pub fn of(build: &KernelBuild) -> Result<SgmvConfig> {
        if build.family != Family::Sgmv {
            return Err(MoleError::param("build", build, "is not an sgmv build"));
        }
        let mut c = SgmvConfig::DEFAULT;
        let fields = [
            (BLOCK_THREADS_DEFINE, &mut c.block_threads),
            ("MOLE_SGMV_BM", &mut c.bm),
            ("MOLE_SGMV_BN", &mut c.bn),
            ("MOLE_SGMV_RC", &mut c.rc),
            ("MOLE_SGMV_KC", &mut c.kc),
            ("MOLE_SGMV_SPLITS", &mut c.splits),
            ("MOLE_SGMV_STAGES", &mut c.stages),
        ];
        for (name, field) in fields {
            if let Some(v) = build.define_value(name) {
                *field = v.trim().parse().map_err(|_| MoleError::param(name, v, "expected an unsigned integer"))?;
            }
        }
        c.validate()?;
        // The tensor-core shrink of 16-bit builds: whole m16 tiles, warps covering them, and
        // split boundaries on 16-byte segments.
        let warps = c.block_threads / 32;
        if build.dtype != DType::F32
            && (!c.bm.is_multiple_of(16) || !warps.is_multiple_of((c.bm / 16).max(1)) || !c.kc.is_multiple_of(8))
        {
            return Err(MoleError::param(
                "bm",
                c.bm,
                "16-bit builds need BM % 16 == 0, warps % (BM / 16) == 0, KC % 8 == 0",
            ));
        }
        Ok(c)
    }
}

/// The build of `dtype` with tiling `config`.
pub fn build(dtype: DType, config: SgmvConfig) -> KernelBuild {
    let entries: Vec<String> = kernel::for_dtype(dtype).iter().map(|k| k.entry_name(dtype)).collect();
    let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
    config.defines().into_iter().fold(KernelBuild::new(Family::Sgmv, dtype, &refs), |b, (n, v)| b.define(n, v))
}

/// The tilings [`candidates`] offers, the default first.
pub const CONFIG_CANDIDATES: [SgmvConfig; 4] = [
    SgmvConfig::DEFAULT,
    SgmvConfig { block_threads: 64, bm: 16, bn: 32, rc: 32, kc: 16, splits: 1, stages: 1 },
    SgmvConfig { block_threads: 256, bm: 64, bn: 32, rc: 32, kc: 16, splits: 4, stages: 2 },
    SgmvConfig { block_threads: 128, bm: 16, bn: 64, rc: 16, kc: 32, splits: 8, stages: 1 },
];

/// Every configuration worth compiling: each dtype at each of [`CONFIG_CANDIDATES`]; the first
/// of each dtype is its default.
pub fn candidates() -> Vec<KernelBuild> {
    DType::ALL.iter().flat_map(|&d| CONFIG_CANDIDATES.iter().map(move |&c| build(d, c))).collect()
}

/// One build per dtype, at [`SgmvConfig::DEFAULT`].
pub fn default_builds() -> Vec<KernelBuild> {
    DType::ALL.iter().map(|&d| build(d, SgmvConfig::DEFAULT)).collect()
}

/// Parameters of both kernels, by value (C: `mole_sgmv_params`, 48 bytes). Built by [`plan`];
/// `slot` is set per expand pass.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct SgmvParams {
    /// Tokens `T`.
    pub tokens: u32,
    /// Slots per token.
    pub slots: u32,
    /// Experts `E`.
    pub experts: u32,
    /// Input features.
    pub d_in: u32,
    /// Output features.
    pub d_out: u32,
    /// Total rank `R`.
    pub r_total: u32,
    /// Largest expert rank: the row length of `h_part`.
    pub r_max: u32,
    /// Split-K slices of `d_in`.
    pub splits: u32,
    /// `d_in` per split (a multiple of the build's `kc`).
    pub k_per_split: u32,
    /// Entries per slot plan.
    pub entry_stride: u32,
    /// The slot of an expand pass.
    pub slot: u32,
    /// Delta scale.
    pub scale: f32,
}

// SAFETY: `SgmvParams` is `#[repr(C)]`, Pod, and matches `mole_sgmv_params` (sizes and offsets
// asserted on both sides), so passing a pointer to one as a kernel parameter is what the kernel
// expects.
unsafe impl cudarc::driver::DeviceRepr for SgmvParams {}

/// Grid and block of one launch (the kernels use static shared memory only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgmvLaunch {
    /// The kernel.
    pub kernel: &'static KernelDesc,
    /// Blocks `(x, y, z)`.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
}

impl SgmvLaunch {
    /// As launch dimensions.
    pub fn dims(&self) -> Dims {
        Dims { grid: self.grid, block: self.block, shared_bytes: 0 }
    }
}

/// The problem a forward solves (everything but the buffers and the rank layout).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgmvShape {
    /// Tokens `T`.
    pub tokens: usize,
    /// Slots per token (row length of `ids` / `weights`).
    pub slots: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Delta scale.
    pub scale: f32,
}

/// A validated forward: parameters, launches and the element count of every buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct SgmvPlan {
    /// Parameters (`slot` = 0; each expand pass sets its own).
    pub params: SgmvParams,
    /// The tiling of the build.
    pub config: SgmvConfig,
    /// The shrink launch (`None` when there is no work: zero tokens or all ranks 0).
    pub shrink: Option<SgmvLaunch>,
    /// The expand launch of one slot, run `slots` times (`None` as for `shrink`).
    pub expand: Option<SgmvLaunch>,
    /// Element counts of the buffers: `x`, `a`, `b`, `y`, `rank_offsets [E+1]`,
    /// `plan_offsets [slots·(E+1)]`, `plan_entries [slots·entry_stride]`, `route_weights
    /// [T·slots]` and the `partials [splits·T·slots·r_max]` workspace (f32, need not be
    /// initialised).
    pub lens: BufLens,
}

impl SgmvPlan {
    /// The parameters of expand pass `slot`.
    pub fn expand_params(&self, slot: usize) -> SgmvParams {
        SgmvParams { slot: slot as u32, ..self.params }
    }

    /// The plan with the FMA shrink in place of the tensor-core one (for an `x` that is not
    /// 16-byte aligned, and for comparing the two).
    pub fn with_fma_shrink(mut self) -> SgmvPlan {
        if let Some(s) = &mut self.shrink {
            s.kernel = &kernel::SHRINK;
        }
        self
    }

    /// The plan with the FMA expand in place of the tensor-core one (for a `b` that is not
    /// 16-byte aligned, and for comparing the two).
    pub fn with_fma_expand(mut self) -> SgmvPlan {
        if let Some(e) = self.expand {
            self.expand = Some(expand_launch(self.config, e.grid.0, self.params.d_out, false));
        }
        self
    }
}

/// Most entries a slot plan of `tokens` tokens over `experts` experts can hold with segment
/// padding `block`: `tokens + experts · (block - 1)`. The `entry_stride` that fits any routing.
pub fn entry_capacity(tokens: usize, experts: usize, block: usize) -> usize {
    tokens.saturating_add(experts.saturating_mul(block.saturating_sub(1)))
}

fn fits_u32(name: &'static str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| MoleError::param(name, v, "must fit in 32 bits"))
}

/// Validates a forward of `build` over the rank layout `rank_offsets [E+1]` (host copy of what
/// the kernels read) with slot plans `entry_stride` entries apart, and computes its launches.
///
/// Errors: wrong family, bad tiling defines, `rank_offsets` not starting at 0 or decreasing, a
/// rank above [`MAX_RANK`], `E` outside `1..=`[`MAX_EXPERTS`], `slots` outside
/// `1..=`[`MAX_SLOTS`], zero `d_in`/`d_out`, a non-finite scale, sizes past the kernels' 32-bit
/// parameters (`T < 2^31`, `d_in`, `d_out`, `R`, `entry_stride < 2^32`) or the grid limits.
/// f16 / bf16 builds with `d_in % 8 == 0` shrink on tensor cores ([`kernel::SHRINK_MMA`]), which
/// reads `x` in 16-byte segments: `x` must then be 16-byte aligned (device allocations are;
/// [`forward_raw`] falls back to the FMA shrink otherwise). f16 / bf16 builds with
/// `d_out % 8 == 0` expand on tensor cores ([`kernel::EXPAND_MMA`]: `h` split into hi + lo 16-bit
/// parts, f32 accumulation), which reads `b` in 16-byte segments: `b` must then be 16-byte
/// aligned ([`forward_raw`] falls back to the FMA expand otherwise). f32 builds and other
/// `d_out` use the FMA expand. Every other buffer needs only the alignment of its element type.
pub fn plan(build: &KernelBuild, shape: SgmvShape, rank_offsets: &[u32], entry_stride: usize) -> Result<SgmvPlan> {
    let config = SgmvConfig::of(build)?;
    let SgmvShape { tokens, slots, d_in, d_out, scale } = shape;
    let experts = rank_offsets.len().saturating_sub(1);
    if experts == 0 {
        return Err(MoleError::ZeroDimension { name: "experts" });
    }
    if experts > MAX_EXPERTS {
        return Err(MoleError::param("experts", experts, "at most 4096"));
    }
    if rank_offsets[0] != 0 {
        return Err(MoleError::param("rank_offsets", rank_offsets[0], "must start at 0"));
    }
    let mut r_max = 0u32;
    for w in rank_offsets.windows(2) {
        let r = w[1].checked_sub(w[0]).ok_or_else(|| MoleError::param("rank_offsets", w[1], "must not decrease"))?;
        if r as usize > MAX_RANK {
            return Err(MoleError::param("rank", r, "an expert's rank is at most 256"));
        }
        r_max = r_max.max(r);
    }
    let r_total = rank_offsets[experts];
    if slots == 0 {
        return Err(MoleError::ZeroDimension { name: "slots" });
    }
    if slots > MAX_SLOTS {
        return Err(MoleError::param("slots", slots, "at most 4096"));
    }
    if d_in == 0 {
        return Err(MoleError::ZeroDimension { name: "d_in" });
    }
    if d_out == 0 {
        return Err(MoleError::ZeroDimension { name: "d_out" });
    }
    if !scale.is_finite() {
        return Err(MoleError::param("scale", scale, "must be finite"));
    }
    // The kernels keep tokens in `int` (-1 marks padding rows).
    if tokens > i32::MAX as usize {
        return Err(MoleError::param("tokens", tokens, "must be below 2^31"));
    }
    let d_in32 = fits_u32("d_in", d_in as u64)?;
    let d_out32 = fits_u32("d_out", d_out as u64)?;
    let stride32 = fits_u32("entry_stride", entry_stride as u64)?;
    let (bm, kc) = (config.bm as u64, config.kc as u64);
    // No empty split: at most one per KC chunk, and the last split takes the remainder.
    let chunks = (d_in as u64).div_ceil(kc);
    let per = chunks.div_ceil((config.splits as u64).min(chunks)) * kc;
    let splits = (d_in as u64).div_ceil(per);
    let k_per_split = fits_u32("d_in", per)?;
    let rows = (tokens as u64) * slots as u64;
    let partials = usize::try_from(splits * rows * r_max as u64)
        .map_err(|_| MoleError::param("tokens", tokens, "h workspace exceeds the address space"))?;
    let lens = BufLens::new()
        .with(Buf::X, tokens * d_in)
        .with(Buf::A, d_in * r_total as usize)
        .with(Buf::B, r_total as usize * d_out)
        .with(Buf::RankOffsets, experts + 1)
        .with(Buf::PlanOffsets, slots * (experts + 1))
        .with(Buf::PlanEntries, slots * entry_stride)
        .with(Buf::RouteWeights, tokens * slots)
        .with(Buf::Partials, partials)
        .with(Buf::Y, tokens * d_out);
    let params = SgmvParams {
        tokens: tokens as u32,
        slots: slots as u32,
        experts: experts as u32,
        d_in: d_in32,
        d_out: d_out32,
        r_total,
        r_max,
        splits: splits as u32,
        k_per_split,
        entry_stride: stride32,
        slot: 0,
        scale,
    };
    let tiles = (entry_stride as u64).div_ceil(bm);
    let expand_mma = build.dtype != DType::F32 && d_out % 8 == 0;
    let col_blocks = (d_out as u64).div_ceil(config.bn as u64);
    let mma_col_blocks = (d_out as u64).div_ceil(config.mma_bn() as u64);
    if tiles > i32::MAX as u64 {
        return Err(MoleError::param("entry_stride", entry_stride, "more tiles than a grid holds"));
    }
    // Both expands are checked: `forward_raw` may fall back from the tensor-core one.
    if col_blocks.max(if expand_mma { mma_col_blocks } else { 0 }) > MAX_GRID_YZ {
        return Err(MoleError::param("d_out", d_out, "more column blocks than a grid holds"));
    }
    let work = tokens > 0 && tiles > 0 && r_max > 0;
    let shrink_kernel = if build.dtype != DType::F32 && d_in % 8 == 0 { &kernel::SHRINK_MMA } else { &kernel::SHRINK };
    let shrink = work.then_some(SgmvLaunch {
        kernel: shrink_kernel,
        grid: (tiles as u32, splits as u32, slots as u32),
        block: config.block_threads,
    });
    let expand = work.then(|| expand_launch(config, tiles as u32, d_out32, expand_mma));
    Ok(SgmvPlan { params, config, shrink, expand, lens })
}

/// The expand launch of a plan with `tiles` tiles: the tensor-core expand ([`kernel::EXPAND_MMA`],
/// `mma_bn` columns per block) when `mma`, else the FMA expand (`bn` columns per block).
pub fn expand_launch(config: SgmvConfig, tiles: u32, d_out: u32, mma: bool) -> SgmvLaunch {
    let (kernel, bn) = if mma { (&kernel::EXPAND_MMA, config.mma_bn()) } else { (&kernel::EXPAND, config.bn) };
    SgmvLaunch { kernel, grid: (tiles, d_out.div_ceil(bn), 1), block: config.block_threads }
}

/// Per-slot routing plans, packed as the kernels read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlans {
    /// Slots (plans).
    pub slots: usize,
    /// Experts.
    pub experts: usize,
    /// Entries between two plans (the largest plan's length).
    pub entry_stride: usize,
    /// `[slots, E + 1]`: plan `s`'s segment offsets.
    pub offsets: Vec<u32>,
    /// `[slots, entry_stride]`: plan `s`'s entries (token; slot 0), padded with
    /// [`TokenSlot::PADDING`].
    pub entries: Vec<TokenSlot>,
}

impl SlotPlans {
    /// Builds plan `s` from column `s` of `ids [tokens, slots]` with segments padded to `block`
    /// (the build's `bm`). Errors as [`RoutingPlan::build`].
    pub fn build(ids: &[i32], tokens: usize, slots: usize, experts: usize, block: usize) -> Result<Self> {
        crate::error::check_len("ids", ids, &[tokens, slots])?;
        // Duplicates across slots of one token are an error of the routing, as in the reference.
        RoutingPlan::build(ids, tokens, slots, experts, 1)?;
        let plans: Vec<RoutingPlan> = (0..slots)
            .map(|s| {
                let column: Vec<i32> = (0..tokens).map(|t| ids[t * slots + s]).collect();
                RoutingPlan::build(&column, tokens, 1, experts, block)
            })
            .collect::<Result<_>>()?;
        let entry_stride = plans.iter().map(|p| p.entries.len()).max().unwrap_or(0);
        let mut offsets = Vec::with_capacity(slots * (experts + 1));
        let mut entries = vec![TokenSlot::PADDING; slots * entry_stride];
        for (s, p) in plans.iter().enumerate() {
            offsets.extend_from_slice(&p.offsets);
            entries[s * entry_stride..s * entry_stride + p.entries.len()].copy_from_slice(&p.entries);
        }
        Ok(SlotPlans { slots, experts, entry_stride, offsets, entries })
    }
}

#[cfg(test)]
mod tests;
