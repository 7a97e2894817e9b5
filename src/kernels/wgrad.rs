//! The backward pass's weight gradients (`kernels/wgrad.cu`): one generic, deterministic
//! reduction over tokens,
//!
//! ```text
//! out[b, m, n] = scale · Σ_t rw[t, b] · P[t, m] · Q[t, n]
//! ```
//!
//! which is every weight gradient of a MoLE layer (gradients overwritten, in the dtype):
//!
//! | gradient | `P` | `Q` | row weight | `scale` |
//! |---|---|---|---|---|
//! | `dA [d_in, R] = xᵀ·dh` | `x` (dtype) | `dh` (f32) | – | 1 |
//! | `dB [R, d_out] = hmᵀ·dy` | `hm` (f32) | `dy` (dtype) | – | the layer's scale |
//! | `dW_g [d_in, E] = xᵀ·dz` | `x` (dtype) | `dz` (f32) | – | 1 |
//! | `dW_r [R, E] = hᵀ·dz` | `h` (f32) | `dz` (f32) | – | 1 |
//! | `db [E] = Σ_t dz` | 1 ([`WgradOperand::Ones`]) | `dz` (f32) | – | 1 |
//! | `dC [C, R, R]`, `dC_c = Σ_t w[t,c]·h_tᵀ g_t` | `h` (f32) | `g` (f32) | `w`, `C` columns | 1 |
//!
//! `P` and `Q` are blocks of columns of row-major `[T, stride]` matrices, so a caller can take
//! one expert's columns or a slice of a wider workspace; a row weight is a block of columns of
//! an f32 `[T, stride]` matrix, one output per column (CoMoL's cores in one launch). A call binds
//! its operands as the generic buffers [`Buf::WgradP`] / [`Buf::WgradPFloat`], [`Buf::WgradQ`] /
//! [`Buf::WgradQFloat`], [`Buf::WgradRowWeight`], [`Buf::WgradPartials`] and [`Buf::WgradOut`];
//! a composed backward binds its own tensors under those names with [`Bindings::aliased`].
//!
//! Two launches ([`run`]): [`kernel::PARTIAL`] sums each of `splits` contiguous token ranges in
//! ascending token order, one thread per output element, into f32 partials
//! `[splits, outputs, M, N]`; [`kernel::REDUCE`] adds the splits in order, multiplies by `scale`
//! and rounds to the dtype. No float is ever added by two threads: for a given number of splits
//! two runs are bit-identical whatever the schedule. A token whose products in a block's tile are
//! all zero (its `Q` row zero there and its `P` row finite, or the reverse: a sparse top-k's `dh`
//! and `hm` outside the selected experts) is skipped, which changes no bit of the result.
//!
//! Bytes moved: per output, `P` (and the row weight) is read `⌈N/BN⌉` times and `Q` `⌈M/BM⌉`
//! times; the partials are written and read once (`2·splits·outputs·M·N·4`), the output written
//! once.
//!
//! [`plan`] validates a call and computes both launches and every buffer length without a GPU.
//!
//! [`Bindings::aliased`]: crate::kernels::exec::Bindings::aliased

mod launch;

pub use launch::run;

use super::{BuildConfig, KernelBuild};
use crate::kernels::exec::{Buf, BufLens, Dims};
use crate::{DType, MoleError, Result};
use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

/// The entry points.
pub mod kernel {
    use crate::kernels::exec::{ArgDesc as A, Buf, KernelDesc};
    use crate::kernels::Family;

    const PARAMS_BYTES: usize = std::mem::size_of::<super::WgradParams>();
    const fn wgrad(name: &'static str, args: &'static [A]) -> KernelDesc {
        KernelDesc { family: Family::Wgrad, name, params_type: "mole_wgrad_params", params_bytes: PARAMS_BYTES, args }
    }

    /// Each token split's sums into the partials: one of `wgrad_p` / `wgrad_p_float` (neither for
    /// `P = 1`) and one of `wgrad_q` / `wgrad_q_float`, as the plan's operand kinds say.
    pub static PARTIAL: KernelDesc = wgrad(
        "wgrad_partial",
        &[
            A::optional_input(Buf::WgradP),
            A::optional_input(Buf::WgradPFloat),
            A::optional_input(Buf::WgradQ),
            A::optional_input(Buf::WgradQFloat),
            A::optional_input(Buf::WgradRowWeight),
            A::output(Buf::WgradPartials),
        ],
    );
    /// `out = scale · Σ_s partials[s]`, splits in order, rounded to the dtype.
    pub static REDUCE: KernelDesc = wgrad("wgrad_reduce", &[A::input(Buf::WgradPartials), A::output(Buf::WgradOut)]);

    /// Every entry point, in file order.
    pub static ALL: [&KernelDesc; 2] = [&PARTIAL, &REDUCE];
}

/// The compile-time tiling of a build (the defines of `kernels/wgrad.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WgradConfig {
    /// Threads per block (`MOLE_BLOCK_THREADS`).
    pub block_threads: u32,
    /// Output rows per block (`MOLE_WGRAD_BM`).
    pub bm: u32,
    /// Output columns per block (`MOLE_WGRAD_BN`).
    pub bn: u32,
    /// Tokens staged per step (`MOLE_WGRAD_TK`).
    pub tk: u32,
}

impl WgradConfig {
    /// The `.cu` defaults (what the host execution layer compiles).
    pub const DEFAULT: WgradConfig = WgradConfig { block_threads: 256, bm: 64, bn: 64, tk: 32 };

    /// Checks the constraints the `.cu` file asserts, plus shared memory under the 48 KiB static
    /// limit.
    pub fn validate(self) -> Result<()> {
        let t = self.block_threads;
        if !t.is_multiple_of(32) || !(32..=1024).contains(&t) {
            return Err(MoleError::param("block_threads", t, "must be a multiple of 32 in 32..=1024"));
        }
        for (name, v) in [("bm", self.bm), ("bn", self.bn), ("tk", self.tk)] {
            if v == 0 {
                return Err(MoleError::ZeroDimension { name });
            }
        }
        if !t.is_multiple_of(self.bn) || !(self.bm as u64 * self.bn as u64).is_multiple_of(t as u64) {
            return Err(MoleError::param("block_threads", t, "must tile BM x BN exactly"));
        }
        if self.shared_bytes() > 48 * 1024 {
            return Err(MoleError::param("tk", self.tk, "tiles exceed 48 KiB of static shared memory"));
        }
        Ok(())
    }

    /// Static shared memory of [`kernel::PARTIAL`]: a `TK x BM` tile of `P` and a `TK x BN` tile
    /// of `Q`, f32, and two steps' four zero / non-finite marks per token (i32).
    pub fn shared_bytes(self) -> u64 {
        4 * self.tk as u64 * (self.bm as u64 + self.bn as u64 + 8)
    }

    /// The configuration of a wgrad `build`, checked; an error for a build of another family.
    pub fn of(build: &KernelBuild) -> Result<WgradConfig> {
        let BuildConfig::Wgrad(c) = build.config else {
            return Err(MoleError::param("build", build, "is not a wgrad build"));
        };
        c.validate()?;
        Ok(c)
    }
}

/// The build of `dtype` with tiling `config`.
pub fn build(dtype: DType, config: WgradConfig) -> KernelBuild {
    KernelBuild::new(dtype, config)
}

/// The tilings [`candidates`] offers, the default first (the small tile for narrow outputs such
/// as `dA` at a small total rank).
pub const CONFIG_CANDIDATES: [WgradConfig; 2] =
    [WgradConfig::DEFAULT, WgradConfig { block_threads: 128, bm: 32, bn: 32, tk: 32 }];

/// Every configuration worth compiling: each dtype at each of [`CONFIG_CANDIDATES`].
pub fn candidates() -> Vec<KernelBuild> {
    DType::ALL.iter().flat_map(|&d| CONFIG_CANDIDATES.iter().map(move |&c| build(d, c))).collect()
}

/// One build per dtype, at [`WgradConfig::DEFAULT`].
pub fn default_builds() -> Vec<KernelBuild> {
    DType::ALL.iter().map(|&d| build(d, WgradConfig::DEFAULT)).collect()
}

/// `MOLE_WGRAD_ONES`, `MOLE_WGRAD_DATA`, `MOLE_WGRAD_F32`.
const KIND_ONES: u32 = 0;
const KIND_DATA: u32 = 1;
const KIND_F32: u32 = 2;

/// Parameters of both kernels, by value (C: `mole_wgrad_params`, 60 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct WgradParams {
    /// Tokens `T`.
    pub tokens: u32,
    /// Output rows `M` (`P`'s columns).
    pub m: u32,
    /// Output columns `N` (`Q`'s columns).
    pub n: u32,
    /// Outputs, one per row-weight column (1 without a row weight).
    pub batch: u32,
    /// Token splits.
    pub splits: u32,
    /// Tokens of every split but the last.
    pub tokens_per_split: u32,
    /// `P`'s kind: 0 ones, 1 the dtype, 2 f32.
    pub p_kind: u32,
    /// Row length of `P`'s matrix.
    pub p_stride: u32,
    /// `P`'s first column in it.
    pub p_col: u32,
    /// `Q`'s kind: 1 the dtype, 2 f32.
    pub q_kind: u32,
    /// Row length of `Q`'s matrix.
    pub q_stride: u32,
    /// `Q`'s first column in it.
    pub q_col: u32,
    /// Row length of the row weight's matrix (0 without one).
    pub rw_stride: u32,
    /// The row-weight column of output 0.
    pub rw_col: u32,
    /// The factor of the sum.
    pub scale: f32,
}

// SAFETY: `WgradParams` is `#[repr(C)]`, Pod, and matches `mole_wgrad_params` (size and offsets
// asserted on both sides).
unsafe impl cudarc::driver::DeviceRepr for WgradParams {}

/// One operand of the product, read per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgradOperand {
    /// 1 for every token (`P` only, with `M = 1`: column sums, the router bias's gradient).
    Ones,
    /// Columns `col..col + count` of a `[T, stride]` matrix in the build's dtype
    /// ([`Buf::WgradP`] / [`Buf::WgradQ`]); `count` is `M` for `P`, `N` for `Q`.
    Data {
        /// Row length of the matrix.
        stride: usize,
        /// First column taken.
        col: usize,
    },
    /// The same in f32 ([`Buf::WgradPFloat`] / [`Buf::WgradQFloat`]): the backward's workspace
    /// tensors.
    Float {
        /// Row length of the matrix.
        stride: usize,
        /// First column taken.
        col: usize,
    },
}

impl WgradOperand {
    fn kind(self) -> u32 {
        match self {
            WgradOperand::Ones => KIND_ONES,
            WgradOperand::Data { .. } => KIND_DATA,
            WgradOperand::Float { .. } => KIND_F32,
        }
    }

    /// `(stride, col)`, `(0, 0)` for ones.
    fn layout(self) -> (usize, usize) {
        match self {
            WgradOperand::Ones => (0, 0),
            WgradOperand::Data { stride, col } | WgradOperand::Float { stride, col } => (stride, col),
        }
    }
}

/// Per-token row weights: columns `col..col + count` of an f32 `[T, stride]` matrix
/// ([`Buf::WgradRowWeight`]), output `b` weighted by column `col + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgradRowWeight {
    /// Row length of the matrix.
    pub stride: usize,
    /// The column of output 0.
    pub col: usize,
    /// Outputs (one per column).
    pub count: usize,
}

/// The problem a call solves (everything but the buffers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WgradShape {
    /// Tokens `T` (0: the outputs are written as zeros).
    pub tokens: usize,
    /// Output rows `M`.
    pub m: usize,
    /// Output columns `N`.
    pub n: usize,
    /// Token splits asked for (the plan may use fewer: none is empty, see [`WgradPlan::splits`]).
    pub splits: usize,
    /// The left operand `P [T, M]`.
    pub p: WgradOperand,
    /// The right operand `Q [T, N]` (not [`WgradOperand::Ones`]).
    pub q: WgradOperand,
    /// Per-token row weights (`None`: one output, unweighted).
    pub row_weight: Option<WgradRowWeight>,
    /// The factor of the sum.
    pub scale: f32,
}

/// A validated call: parameters, both launches, and the element count of every buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct WgradPlan {
    /// Both kernels' parameters.
    pub params: WgradParams,
    /// The tiling of the build.
    pub config: WgradConfig,
    /// [`kernel::PARTIAL`]: (`N` tiles, `M` tiles, splits · outputs).
    pub partial: Dims,
    /// [`kernel::REDUCE`].
    pub reduce: Dims,
    /// Element counts: the operands taken (`T · stride` each), the partials workspace
    /// `[splits, outputs, M, N]` and the output `[outputs, M, N]`.
    pub lens: BufLens,
}

impl WgradPlan {
    /// The token splits the sums use: `⌈T / ⌈T / splits⌉⌉` of the asked number (1 for `T = 0`);
    /// the results are a function of this number and the inputs alone.
    pub fn splits(&self) -> usize {
        self.params.splits as usize
    }

    /// Elements of the f32 partials workspace ([`Buf::WgradPartials`]).
    pub fn partials_len(&self) -> usize {
        self.lens.get(Buf::WgradPartials)
    }

    /// Elements of the output ([`Buf::WgradOut`]).
    pub fn out_len(&self) -> usize {
        self.lens.get(Buf::WgradOut)
    }
}

/// The most blocks a grid's `y` or `z` extent holds.
const GRID_YZ: u64 = 65_535;

fn to_u32(name: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| MoleError::param(name, v, "must fit in 32 bits"))
}

/// Elements of a `[tokens, stride]` matrix whose columns `col..col + count` are read, checked.
fn operand_len(name: &'static str, tokens: usize, stride: usize, col: usize, count: usize) -> Result<usize> {
    if col.checked_add(count).is_none_or(|end| end > stride) {
        return Err(MoleError::param(name, stride, "the row stride must hold the column offset plus the columns taken"));
    }
    to_u32(name, stride)?;
    tokens.checked_mul(stride).ok_or_else(|| MoleError::param(name, stride, "the matrix exceeds the address space"))
}

/// Validates a call of `build` and computes its launches.
///
/// Errors: a build of another family or with an invalid tiling; zero `m`, `n`, `splits` or row
/// weight columns; `P = 1` with `m ≠ 1`; `Q = 1`; an operand or row weight whose column block
/// does not fit its stride; a non-finite scale; sizes past 32 bits, grids past their limits
/// (`⌈M/BM⌉` and splits · outputs at most 65535), and workspaces past the address space.
pub fn plan(build: &KernelBuild, shape: WgradShape) -> Result<WgradPlan> {
    let config = WgradConfig::of(build)?;
    let WgradShape { tokens, m, n, splits, p, q, row_weight, scale } = shape;
    for (name, v) in [("m", m), ("n", n), ("splits", splits)] {
        if v == 0 {
            return Err(MoleError::ZeroDimension { name });
        }
    }
    if p == WgradOperand::Ones && m != 1 {
        return Err(MoleError::param("m", m, "must be 1 when P is ones (column sums)"));
    }
    if q == WgradOperand::Ones {
        return Err(MoleError::param("q", "ones", "must be a matrix (only P may be ones)"));
    }
    if !scale.is_finite() {
        return Err(MoleError::param("scale", scale, "must be finite"));
    }
    if tokens > i32::MAX as usize {
        return Err(MoleError::param("tokens", tokens, "must be below 2^31"));
    }
    let (p_stride, p_col) = p.layout();
    let (q_stride, q_col) = q.layout();
    let p_len = if p == WgradOperand::Ones { 0 } else { operand_len("p.stride", tokens, p_stride, p_col, m)? };
    let q_len = operand_len("q.stride", tokens, q_stride, q_col, n)?;
    let (batch, rw_len) = match row_weight {
        None => (1, 0),
        Some(rw) => {
            if rw.count == 0 {
                return Err(MoleError::ZeroDimension { name: "row_weight.count" });
            }
            (rw.count, operand_len("row_weight.stride", tokens, rw.stride, rw.col, rw.count)?)
        }
    };

    // Contiguous token ranges of `per` tokens, none empty (one empty one for T = 0).
    let per = tokens.div_ceil(splits).max(1);
    let used = tokens.div_ceil(per).max(1);
    let (bm, bn) = (config.bm as u64, config.bn as u64);
    let m_tiles = (m as u64).div_ceil(bm);
    let n_tiles = (n as u64).div_ceil(bn);
    if m_tiles > GRID_YZ {
        return Err(MoleError::param("m", m, "more row tiles than a grid's y extent holds"));
    }
    let z = used as u64 * batch as u64;
    if z > GRID_YZ {
        return Err(MoleError::param("splits", used, "splits times outputs exceed a grid's z extent (65535)"));
    }
    if n_tiles > i32::MAX as u64 {
        return Err(MoleError::param("n", n, "more column tiles than a grid holds"));
    }
    let space = |name: &'static str| MoleError::param(name, m, "the output exceeds the address space");
    let out_len = (batch as u64)
        .checked_mul(m as u64)
        .and_then(|v| v.checked_mul(n as u64))
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| space("m"))?;
    let partials_len = (used as u64)
        .checked_mul(out_len as u64)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| space("splits"))?;
    let row_weight = row_weight.unwrap_or(WgradRowWeight { stride: 0, col: 0, count: 1 });
    let params = WgradParams {
        tokens: to_u32("tokens", tokens)?,
        m: to_u32("m", m)?,
        n: to_u32("n", n)?,
        batch: to_u32("row_weight.count", batch)?,
        splits: used as u32,
        tokens_per_split: to_u32("tokens", per)?,
        p_kind: p.kind(),
        p_stride: to_u32("p.stride", p_stride)?,
        p_col: to_u32("p.col", p_col)?,
        q_kind: q.kind(),
        q_stride: to_u32("q.stride", q_stride)?,
        q_col: to_u32("q.col", q_col)?,
        rw_stride: to_u32("row_weight.stride", row_weight.stride)?,
        rw_col: to_u32("row_weight.col", row_weight.col)?,
        scale,
    };
    let (p_buf, q_buf) = (operand_buf(p, Buf::WgradP, Buf::WgradPFloat), operand_buf(q, Buf::WgradQ, Buf::WgradQFloat));
    let mut lens = BufLens::new().with(Buf::WgradRowWeight, rw_len).with(Buf::WgradPartials, partials_len);
    if let Some(b) = p_buf {
        lens.set(b, p_len);
    }
    if let Some(b) = q_buf {
        lens.set(b, q_len);
    }
    lens.set(Buf::WgradOut, out_len);
    let threads = config.block_threads;
    let partial = Dims { grid: (n_tiles as u32, m_tiles as u32, z as u32), block: threads, shared_bytes: 0 };
    let reduce_blocks = (out_len as u64).div_ceil(threads as u64).clamp(1, GRID_YZ * 4) as u32;
    let reduce = Dims { grid: (reduce_blocks, 1, 1), block: threads, shared_bytes: 0 };
    Ok(WgradPlan { params, config, partial, reduce, lens })
}

/// The buffer an operand binds to (`None` for ones).
fn operand_buf(op: WgradOperand, data: Buf, float: Buf) -> Option<Buf> {
    match op {
        WgradOperand::Ones => None,
        WgradOperand::Data { .. } => Some(data),
        WgradOperand::Float { .. } => Some(float),
    }
}

/// A number of token splits for a call of `build` (checked) over `tokens` tokens into `outputs`
/// outputs of `[m, n]`: enough for about `blocks_wanted` blocks of [`kernel::PARTIAL`] (say, a few
/// per multiprocessor), no split under `4 · tk` tokens, within the grid's limit. A pure function
/// of its arguments, so a caller that keeps them keeps bit-identical results.
pub fn splits_for(build: &KernelBuild, tokens: usize, m: usize, n: usize, outputs: usize, blocks_wanted: usize) -> Result<usize> {
    let c = WgradConfig::of(build)?;
    let tiles = (m.max(1) as u64).div_ceil(c.bm as u64) * (n.max(1) as u64).div_ceil(c.bn as u64) * outputs.max(1) as u64;
    let by_blocks = (blocks_wanted as u64).div_ceil(tiles);
    let by_tokens = tokens as u64 / (4 * c.tk as u64);
    let by_grid = GRID_YZ / outputs.max(1) as u64;
    Ok(by_blocks.min(by_tokens).min(by_grid).max(1) as usize)
}

#[cfg(test)]
mod tests;
