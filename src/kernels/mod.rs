//! The kernels: [`exec`], the description of every entry point and the one launch path;
//! [`gating`], [`sgmv`], [`fused`], [`ffn`], [`backward`] and [`wgrad`], one module per op family;
//! and the registry: which CUDA sources exist (one [`Family`] per file under `kernels/`) and
//! which configurations of each are compiled ([`KernelBuild`]).
//!
//! A build is typed: an element type and a [`BuildConfig`] (one tiling struct per family). The
//! NVRTC defines are generated from it in one place ([`BuildConfig::defines`]), with the
//! conventions shared with the `.cu` files:
//! - the element type arrives as exactly one of `MOLE_DTYPE_F32`, `MOLE_DTYPE_F16`,
//!   `MOLE_DTYPE_BF16`; every other define is passed as `-DNAME=VALUE`;
//! - every build declares the threads per block its kernels are launched with
//!   ([`BLOCK_THREADS_DEFINE`]), and a build that adds dynamic shared memory declares the bytes
//!   ([`DYNAMIC_SMEM_DEFINE`]); `mole check-kernels` checks both against the architecture.

pub mod backward;
pub mod exec;
pub mod ffn;
pub mod fused;
pub mod gating;
pub mod sgmv;
pub mod shipped;
pub mod wgrad;

pub use backward::BackwardConfig;
pub use ffn::FfnConfig;
pub use fused::FusedConfig;
pub use gating::GatingConfig;
pub use sgmv::SgmvConfig;
pub use wgrad::WgradConfig;

use crate::cuda::{sources, CompileUnit, ModuleSource};
use crate::kernels::exec::KernelDesc;
use crate::{DType, MoleError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Define naming the threads per block a build's kernels are launched with.
pub const BLOCK_THREADS_DEFINE: &str = "MOLE_BLOCK_THREADS";
/// Define naming the dynamic shared memory (bytes) a build's kernels are launched with.
pub const DYNAMIC_SMEM_DEFINE: &str = "MOLE_DYNAMIC_SMEM_BYTES";

/// A kernel source file and the kernels in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Router logits, top-k selection and normalisation (`kernels/gating.cu`).
    Gating,
    /// Segmented grouped LoRA shrink and expand (`kernels/sgmv.cu`).
    Sgmv,
    /// The fused layer: router, gating, shrink, mix and expand in one pass (`kernels/fused.cu`).
    Fused,
    /// The FFN-expert block's activation and down shrink between the dense projections
    /// (`kernels/ffn.cu`).
    Ffn,
    /// The backward pass's per-token stages: the mix and router gradients and `dx`
    /// (`kernels/backward.cu`).
    Backward,
    /// The backward pass's weight gradients, token-split sums and their fixed-order reduction
    /// (`kernels/wgrad.cu`).
    Wgrad,
}

impl Family {
    /// Every family, in a fixed order.
    pub const ALL: [Family; 6] =
        [Family::Gating, Family::Sgmv, Family::Fused, Family::Ffn, Family::Backward, Family::Wgrad];

    /// The source file, relative to `kernels/`.
    pub fn source_file(self) -> &'static str {
        match self {
            Family::Gating => "gating.cu",
            Family::Sgmv => "sgmv.cu",
            Family::Fused => "fused.cu",
            Family::Ffn => "ffn.cu",
            Family::Backward => "backward.cu",
            Family::Wgrad => "wgrad.cu",
        }
    }

    /// Lower-case name, used in file names (`ptx/gating_f16.ptx`) and tables.
    pub fn name(self) -> &'static str {
        match self {
            Family::Gating => "gating",
            Family::Sgmv => "sgmv",
            Family::Fused => "fused",
            Family::Ffn => "ffn",
            Family::Backward => "backward",
            Family::Wgrad => "wgrad",
        }
    }

    /// Every configuration of this family worth compiling (the autotuning space).
    pub fn candidates(self) -> Vec<KernelBuild> {
        match self {
            Family::Gating => gating::candidates(),
            Family::Sgmv => sgmv::candidates(),
            Family::Fused => fused::candidates(),
            Family::Ffn => ffn::candidates(),
            Family::Backward => backward::candidates(),
            Family::Wgrad => wgrad::candidates(),
        }
    }

    /// The configurations shipped as PTX (one per dtype at most): what runs when NVRTC is absent.
    pub fn default_builds(self) -> Vec<KernelBuild> {
        match self {
            Family::Gating => gating::default_builds(),
            Family::Sgmv => sgmv::default_builds(),
            Family::Fused => fused::default_builds(),
            Family::Ffn => ffn::default_builds(),
            Family::Backward => backward::default_builds(),
            Family::Wgrad => wgrad::default_builds(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The compile-time configuration of a build: one tiling struct per family. Serialised with the
/// family as a tag, e.g. `{"family":"sgmv","block_threads":128,"bm":32,...}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum BuildConfig {
    /// `kernels/gating.cu`.
    Gating(GatingConfig),
    /// `kernels/sgmv.cu`.
    Sgmv(SgmvConfig),
    /// `kernels/fused.cu`.
    Fused(FusedConfig),
    /// `kernels/ffn.cu`.
    Ffn(FfnConfig),
    /// `kernels/backward.cu`.
    Backward(BackwardConfig),
    /// `kernels/wgrad.cu`.
    Wgrad(WgradConfig),
}

impl BuildConfig {
    /// The source file family.
    pub fn family(&self) -> Family {
        match self {
            BuildConfig::Gating(_) => Family::Gating,
            BuildConfig::Sgmv(_) => Family::Sgmv,
            BuildConfig::Fused(_) => Family::Fused,
            BuildConfig::Ffn(_) => Family::Ffn,
            BuildConfig::Backward(_) => Family::Backward,
            BuildConfig::Wgrad(_) => Family::Wgrad,
        }
    }

    /// Threads per block the kernels are launched with ([`BLOCK_THREADS_DEFINE`]).
    pub fn block_threads(&self) -> u32 {
        match self {
            BuildConfig::Gating(c) => c.block_threads,
            BuildConfig::Sgmv(c) => c.block_threads,
            BuildConfig::Fused(c) => c.block_threads,
            BuildConfig::Ffn(c) => c.block_threads,
            BuildConfig::Backward(c) => c.block_threads,
            BuildConfig::Wgrad(c) => c.block_threads,
        }
    }

    /// Dynamic shared memory (bytes) declared for every launch ([`DYNAMIC_SMEM_DEFINE`]); 0
    /// when the family sizes it per call (fused) or uses static shared memory only (sgmv).
    pub fn dynamic_shared_bytes(&self) -> u64 {
        match self {
            BuildConfig::Gating(c) => c.dynamic_shared_bytes() as u64,
            BuildConfig::Sgmv(_)
            | BuildConfig::Fused(_)
            | BuildConfig::Ffn(_)
            | BuildConfig::Backward(_)
            | BuildConfig::Wgrad(_) => 0,
        }
    }

    /// The defines of this configuration as `(name, value)`, in the order they are passed to
    /// NVRTC (the dtype define comes from [`KernelBuild::dtype`]). The one place a typed
    /// configuration becomes `.cu` defines.
    pub fn defines(&self) -> Vec<(&'static str, u32)> {
        match *self {
            BuildConfig::Gating(c) => {
                vec![(BLOCK_THREADS_DEFINE, c.block_threads), (DYNAMIC_SMEM_DEFINE, c.dynamic_shared_bytes())]
            }
            BuildConfig::Sgmv(c) => vec![
                (BLOCK_THREADS_DEFINE, c.block_threads),
                ("MOLE_SGMV_BM", c.bm),
                ("MOLE_SGMV_BN", c.bn),
                ("MOLE_SGMV_RC", c.rc),
                ("MOLE_SGMV_KC", c.kc),
                ("MOLE_SGMV_SPLITS", c.splits),
                ("MOLE_SGMV_STAGES", c.stages),
            ],
            BuildConfig::Fused(c) => vec![
                (BLOCK_THREADS_DEFINE, c.block_threads),
                ("MOLE_FUSED_BT", c.bt),
                ("MOLE_FUSED_KC", c.kc),
                ("MOLE_FUSED_MAX_COLS", c.max_cols),
            ],
            BuildConfig::Ffn(c) => vec![
                (BLOCK_THREADS_DEFINE, c.block_threads),
                ("MOLE_FFN_BM", c.bm),
                ("MOLE_FFN_BN", c.bn),
                ("MOLE_FFN_KC", c.kc),
                ("MOLE_FFN_MAX_RANK", c.max_rank),
            ],
            BuildConfig::Backward(c) => vec![(BLOCK_THREADS_DEFINE, c.block_threads)],
            BuildConfig::Wgrad(c) => vec![
                (BLOCK_THREADS_DEFINE, c.block_threads),
                ("MOLE_WGRAD_BM", c.bm),
                ("MOLE_WGRAD_BN", c.bn),
                ("MOLE_WGRAD_TK", c.tk),
            ],
        }
    }

    /// Checks the constraints the family's `.cu` file asserts for a `dtype` build.
    pub fn validate(&self, dtype: DType) -> Result<()> {
        match self {
            BuildConfig::Gating(c) => c.validate(),
            BuildConfig::Sgmv(c) => c.validate_for(dtype),
            BuildConfig::Fused(c) => c.validate(),
            BuildConfig::Ffn(c) => c.validate(),
            BuildConfig::Backward(c) => c.validate(),
            BuildConfig::Wgrad(c) => c.validate(),
        }
    }
}

impl From<GatingConfig> for BuildConfig {
    fn from(c: GatingConfig) -> Self {
        BuildConfig::Gating(c)
    }
}

impl From<SgmvConfig> for BuildConfig {
    fn from(c: SgmvConfig) -> Self {
        BuildConfig::Sgmv(c)
    }
}

impl From<FfnConfig> for BuildConfig {
    fn from(c: FfnConfig) -> Self {
        BuildConfig::Ffn(c)
    }
}

impl From<BackwardConfig> for BuildConfig {
    fn from(c: BackwardConfig) -> Self {
        BuildConfig::Backward(c)
    }
}

impl From<WgradConfig> for BuildConfig {
    fn from(c: WgradConfig) -> Self {
        BuildConfig::Wgrad(c)
    }
}

impl From<FusedConfig> for BuildConfig {
    fn from(c: FusedConfig) -> Self {
        BuildConfig::Fused(c)
    }
}

/// One compilable configuration: an element type and a typed family configuration. The family,
/// the NVRTC defines and the entry points all follow from these two.
///
/// Deserialising checks the configuration ([`BuildConfig::validate`]): an invalid one from a
/// file is an error, never a build that fails later.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "UncheckedBuild")]
pub struct KernelBuild {
    /// Element type, passed as `-DMOLE_DTYPE_<DTYPE>`.
    pub dtype: DType,
    /// The family and its compile-time configuration.
    pub config: BuildConfig,
}

/// What a serialised [`KernelBuild`] holds before it is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UncheckedBuild {
    dtype: DType,
    config: BuildConfig,
}

impl TryFrom<UncheckedBuild> for KernelBuild {
    type Error = MoleError;

    fn try_from(b: UncheckedBuild) -> Result<Self> {
        b.config.validate(b.dtype)?;
        Ok(KernelBuild { dtype: b.dtype, config: b.config })
    }
}

impl KernelBuild {
    /// The build of `dtype` with `config` (unchecked: see [`KernelBuild::validate`]).
    pub fn new(dtype: DType, config: impl Into<BuildConfig>) -> Self {
        KernelBuild { dtype, config: config.into() }
    }

    /// The source file family.
    pub fn family(&self) -> Family {
        self.config.family()
    }

    /// The `extern "C"` kernels this build provides: the family's entry points for the dtype
    /// (and, for fused builds, the tiling), with the dtype suffix.
    pub fn entry_points(&self) -> Vec<String> {
        self.kernels().iter().map(|k| k.entry_name(self.dtype)).collect()
    }

    /// The entry points of this build, as described for the launch path (see [`crate::kernels::exec`]):
    /// the fused tensor-core kernel exists only in 16-bit builds of some tilings.
    pub fn kernels(&self) -> &'static [&'static KernelDesc] {
        match self.config {
            BuildConfig::Gating(_) => &gating::kernel::ALL,
            BuildConfig::Sgmv(_) => sgmv::kernel::for_dtype(self.dtype),
            BuildConfig::Fused(c) => fused::kernel::for_config(self.dtype, c),
            BuildConfig::Ffn(_) => &ffn::kernel::ALL,
            BuildConfig::Backward(_) => &backward::kernel::ALL,
            BuildConfig::Wgrad(_) => &wgrad::kernel::ALL,
        }
    }

    /// What NVRTC compiles for this build (validated first): the family's source file, the
    /// define options, and the build's canonical JSON as its identity.
    pub fn unit(&self) -> Result<CompileUnit> {
        self.validate()?;
        let identity = serde_json::to_string(self).map_err(|e| MoleError::io("serialising a kernel build", e))?;
        Ok(CompileUnit {
            file: self.family().source_file(),
            defines: self.define_options(),
            identity,
            stem: format!("{}_{}", self.family(), self.dtype),
            label: self.to_string(),
        })
    }

    /// The dtype define, e.g. `MOLE_DTYPE_BF16`.
    pub fn dtype_define(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "MOLE_DTYPE_F32",
            DType::F16 => "MOLE_DTYPE_F16",
            DType::BF16 => "MOLE_DTYPE_BF16",
        }
    }

    /// The NVRTC define options: the dtype first, then each of [`BuildConfig::defines`] as
    /// `-DNAME=VALUE`.
    pub fn define_options(&self) -> Vec<String> {
        std::iter::once(format!("-D{}", self.dtype_define()))
            .chain(self.config.defines().into_iter().map(|(n, v)| format!("-D{n}={v}")))
            .collect()
    }

    /// Threads per block the kernels are launched with.
    pub fn block_threads(&self) -> u32 {
        self.config.block_threads()
    }

    /// Dynamic shared memory (bytes) the build declares for every launch.
    pub fn dynamic_shared_bytes(&self) -> u64 {
        self.config.dynamic_shared_bytes()
    }

    /// Checks that the build can be handed to NVRTC: the configuration is valid for the dtype
    /// ([`BuildConfig::validate`]) and the source file is embedded in this crate.
    pub fn validate(&self) -> Result<()> {
        self.config.validate(self.dtype)?;
        if sources::source(self.family().source_file()).is_none() {
            return Err(MoleError::Unsupported(format!(
                "{self}: kernels/{} is not embedded in this build of mole",
                self.family().source_file()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for KernelBuild {
    /// `gating f16 [MOLE_BLOCK_THREADS=128, MOLE_DYNAMIC_SMEM_BYTES=16384]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} [", self.family(), self.dtype)?;
        for (i, (n, v)) in self.config.defines().iter().enumerate() {
            write!(f, "{}{n}={v}", if i == 0 { "" } else { ", " })?;
        }
        f.write_str("]")
    }
}

/// Every configuration of every family: each family's candidates, concatenated.
pub fn all_candidates() -> Vec<KernelBuild> {
    Family::ALL.iter().flat_map(|f| f.candidates()).collect()
}

/// The configurations shipped as PTX in `ptx/`, each family's defaults concatenated.
pub fn default_builds() -> Vec<KernelBuild> {
    Family::ALL.iter().flat_map(|f| f.default_builds()).collect()
}

#[cfg(test)]
mod tests;

impl ModuleSource for KernelBuild {
    fn unit(&self) -> Result<CompileUnit> {
        KernelBuild::unit(self)
    }

    fn shipped_ptx(&self) -> Result<&'static str> {
        shipped::shipped_ptx(self)
    }
}
