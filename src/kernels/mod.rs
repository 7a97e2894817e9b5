//! The kernel registry: which CUDA sources exist (one [`Family`] per file under `kernels/`) and
//! which configurations of each are compiled ([`KernelBuild`]).
//!
//! Conventions shared with the `.cu` files:
//! - the element type arrives as exactly one of `MOLE_DTYPE_F32`, `MOLE_DTYPE_F16`,
//!   `MOLE_DTYPE_BF16`; every other define of a build is passed as `-DNAME=VALUE`;
//! - a build whose kernels are launched with a fixed block size says so with the define
//!   [`BLOCK_THREADS_DEFINE`], and one that adds dynamic shared memory with
//!   [`DYNAMIC_SMEM_DEFINE`] (bytes); `mole check-kernels` checks both against the architecture.

pub mod fused;
pub mod gating;
pub mod sgmv;

use crate::cuda::sources;
use crate::exec::KernelDesc;
use crate::{DType, MoleError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The gating kernels described so far (the statistics' final sum the fused family launches).
static STATS_FINALIZE: &KernelDesc = &gating::kernel::STATS_FINALIZE;

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
}

impl Family {
    /// Every family, in a fixed order.
    pub const ALL: [Family; 3] = [Family::Gating, Family::Sgmv, Family::Fused];

    /// The source file, relative to `kernels/`.
    pub fn source_file(self) -> &'static str {
        match self {
            Family::Gating => "gating.cu",
            Family::Sgmv => "sgmv.cu",
            Family::Fused => "fused.cu",
        }
    }

    /// Lower-case name, used in file names (`ptx/gating_f16.ptx`) and tables.
    pub fn name(self) -> &'static str {
        match self {
            Family::Gating => "gating",
            Family::Sgmv => "sgmv",
            Family::Fused => "fused",
        }
    }

    /// Every configuration of this family worth compiling (the autotuning space).
    pub fn candidates(self) -> Vec<KernelBuild> {
        match self {
            Family::Gating => gating::candidates(),
            Family::Sgmv => sgmv::candidates(),
            Family::Fused => fused::candidates(),
        }
    }

    /// The entry points of `build` (a build of this family), as described for the launch path.
    /// Which exist depends on the build: the fused tensor-core kernel only in some tilings.
    pub fn kernels(self, build: &KernelBuild) -> &'static [&'static KernelDesc] {
        match self {
            Family::Gating => std::slice::from_ref(&STATS_FINALIZE),
            Family::Sgmv => sgmv::kernel::for_dtype(build.dtype),
            Family::Fused => fused::kernel::for_build(build),
        }
    }

    /// The configurations shipped as PTX (one per dtype at most): what runs when NVRTC is absent.
    pub fn default_builds(self) -> Vec<KernelBuild> {
        match self {
            Family::Gating => gating::default_builds(),
            Family::Sgmv => sgmv::default_builds(),
            Family::Fused => fused::default_builds(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One compilable configuration: a family, a dtype, compile-time defines, and its entry points.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelBuild {
    /// The source file.
    pub family: Family,
    /// Element type, passed as `-DMOLE_DTYPE_<DTYPE>`.
    pub dtype: DType,
    /// Extra defines, passed as `-DNAME=VALUE` in this order.
    pub defines: Vec<(String, String)>,
    /// The `extern "C"` kernels this configuration provides.
    pub entry_points: Vec<String>,
}

/// Whether `s` is a C identifier (what defines and `extern "C"` entry points must be).
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl KernelBuild {
    /// A build with no extra defines.
    pub fn new(family: Family, dtype: DType, entry_points: &[&str]) -> Self {
        KernelBuild {
            family,
            dtype,
            defines: Vec::new(),
            entry_points: entry_points.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Adds `-DNAME=VALUE`.
    pub fn define(mut self, name: &str, value: impl fmt::Display) -> Self {
        self.defines.push((name.to_string(), value.to_string()));
        self
    }

    /// The value of define `name`, if the build sets it.
    pub fn define_value(&self, name: &str) -> Option<&str> {
        self.defines.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The dtype define, e.g. `MOLE_DTYPE_BF16`.
    pub fn dtype_define(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "MOLE_DTYPE_F32",
            DType::F16 => "MOLE_DTYPE_F16",
            DType::BF16 => "MOLE_DTYPE_BF16",
        }
    }

    /// The NVRTC define options: the dtype first, then each define as `-DNAME=VALUE`.
    pub fn define_options(&self) -> Vec<String> {
        std::iter::once(format!("-D{}", self.dtype_define()))
            .chain(self.defines.iter().map(|(n, v)| format!("-D{n}={v}")))
            .collect()
    }

    /// Threads per block declared with [`BLOCK_THREADS_DEFINE`]; `Ok(None)` when not declared.
    pub fn block_threads(&self) -> Result<Option<u32>> {
        self.numeric_define(BLOCK_THREADS_DEFINE)
    }

    /// Dynamic shared memory declared with [`DYNAMIC_SMEM_DEFINE`]; 0 when not declared.
    pub fn dynamic_shared_bytes(&self) -> Result<u64> {
        Ok(self.numeric_define(DYNAMIC_SMEM_DEFINE)?.unwrap_or(0) as u64)
    }

    fn numeric_define(&self, name: &'static str) -> Result<Option<u32>> {
        self.define_value(name)
            .map(|v| v.trim().parse::<u32>().map_err(|_| MoleError::param(name, v, "expected an unsigned integer")))
            .transpose()
    }

    /// Checks that the build can be handed to NVRTC: defines and entry points are C identifiers,
    /// values hold no control characters, the dtype is not also defined by hand, and the source
    /// file is embedded in this crate.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in &self.defines {
            if !is_identifier(name) {
                return Err(MoleError::param("define name", name, "must be a C identifier"));
            }
            if name.starts_with("MOLE_DTYPE_") {
                return Err(MoleError::param("define name", name, "the dtype define comes from `dtype`"));
            }
            if value.chars().any(char::is_control) {
                return Err(MoleError::param("define value", value.escape_debug(), "must not hold control characters"));
            }
        }
        if self.entry_points.is_empty() {
            return Err(MoleError::Unsupported(format!("{self}: a build needs at least one entry point")));
        }
        if let Some(bad) = self.entry_points.iter().find(|e| !is_identifier(e)) {
            return Err(MoleError::param("entry point", bad, "must be a C identifier"));
        }
        if sources::source(self.family.source_file()).is_none() {
            return Err(MoleError::Unsupported(format!(
                "{self}: kernels/{} is not embedded in this build of mole",
                self.family.source_file()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for KernelBuild {
    /// `gating f16 [TOPK=2, BLOCK=128]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} [", self.family, self.dtype)?;
        for (i, (n, v)) in self.defines.iter().enumerate() {
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
mod tests {
    use super::*;

    #[test]
    fn family_names_and_serde() {
        for f in Family::ALL {
            assert_eq!(f.source_file(), format!("{}.cu", f.name()));
            assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{}\"", f.name()));
        }
    }

    #[test]
    fn define_options_put_the_dtype_first() {
        let b = KernelBuild::new(Family::Gating, DType::BF16, &["k_bf16"]).define("TOPK", 2).define("BLOCK", 128);
        assert_eq!(b.define_options(), ["-DMOLE_DTYPE_BF16", "-DTOPK=2", "-DBLOCK=128"]);
        assert_eq!(b.to_string(), "gating bf16 [TOPK=2, BLOCK=128]");
        assert_eq!(b.define_value("BLOCK"), Some("128"));
        assert_eq!(b.define_value("NOPE"), None);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<KernelBuild>(&json).unwrap(), b);
    }

    #[test]
    fn launch_defines_parse_or_error() {
        let b = KernelBuild::new(Family::Gating, DType::F32, &["k"]);
        assert_eq!(b.block_threads().unwrap(), None);
        assert_eq!(b.dynamic_shared_bytes().unwrap(), 0);
        let b = b.define(BLOCK_THREADS_DEFINE, 256).define(DYNAMIC_SMEM_DEFINE, 4096);
        assert_eq!(b.block_threads().unwrap(), Some(256));
        assert_eq!(b.dynamic_shared_bytes().unwrap(), 4096);
        let bad = KernelBuild::new(Family::Gating, DType::F32, &["k"]).define(BLOCK_THREADS_DEFINE, "2*64");
        assert!(matches!(bad.block_threads(), Err(MoleError::InvalidParameter { .. })));
    }

    #[test]
    fn validate_rejects_what_nvrtc_or_the_driver_would_choke_on() {
        let ok = KernelBuild::new(Family::Gating, DType::F16, &["k_f16"]).define("TOPK", 2);
        let bad = [
            ok.clone().define("2BAD", 1),
            ok.clone().define("A B", 1),
            ok.clone().define("MOLE_DTYPE_F32", 1),
            ok.clone().define("X", "1\0"),
            ok.clone().define("X", "1\n#define Y"),
            KernelBuild { entry_points: vec![], ..ok.clone() },
            KernelBuild { entry_points: vec!["k\0".into()], ..ok.clone() },
            KernelBuild { entry_points: vec!["k-1".into()], ..ok.clone() },
        ];
        for b in bad {
            assert!(b.validate().is_err(), "{b:?}");
        }
        // The well-formed build is rejected only if gating.cu is not there yet.
        assert_eq!(ok.validate().is_ok(), sources::source("gating.cu").is_some());
    }

    #[test]
    fn defaults_are_one_per_dtype_and_among_the_candidates() {
        let all = all_candidates();
        for b in default_builds() {
            assert!(all.contains(&b), "{b}");
        }
        for f in Family::ALL {
            let d = f.default_builds();
            assert!(DType::ALL.iter().all(|&t| d.iter().filter(|b| b.dtype == t).count() <= 1));
        }
    }
}
