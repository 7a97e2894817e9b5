//! Tuning results and their lookup: per GPU and per shape, the strategy and kernel build that
//! measured fastest, kept by value in a JSON cache. This is what a framework needs to run tuned
//! layers; the search that fills the cache is `mole::autotune` (feature `cli`).
//!
//! - `key`: `ShapeKey`, what a result is valid for (exact dimensions, E, k, dtype, method;
//!   tokens bucketed to powers of two); a block's key has `f` and the activation.
//! - `cache`: `TuningCache` and `store`, one file per GPU, user results over shipped ones,
//!   stale and corrupt data ignored with a warning, atomic merged writes.
//! - [`Strategy`] and [`Candidate`]: how a layer (or an FFN-expert block) is computed, and a
//!   strategy with its build.

crate::internal_mod!(cache);
crate::internal_mod!(key);

/// Writing tuning files (the autotuner's side), public API with the `internals` feature.
#[cfg(feature = "internals")]
pub use cache::{store, Provenance, Stored, TuningFile};
pub use cache::{user_tuning_dir, EntrySource, GpuId, TunedEntry, TuningCache, FORMAT_VERSION};
pub use key::{token_bucket, ShapeKey};

use crate::kernels::KernelBuild;
use serde::{Deserialize, Serialize};
use std::fmt;

/// How a layer (or an FFN-expert block) is computed on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Gating, then the segmented grouped shrink and expand (`Family::Sgmv`).
    Grouped,
    /// One fused launch for the whole layer (the fused family).
    Fused,
    /// The fused layer in two launches, for small token counts.
    FusedSplit,
    /// The FFN-expert block (`runtime::CompiledFfn`): its build is the block's ffn build
    /// (`Family::Ffn`); the SGMV build follows from it (`kernels::ffn::sgmv_build_for`). Never a
    /// layer's strategy, and a block has no other.
    FfnBlock,
}

impl Strategy {
    /// Every strategy, in search order.
    pub const ALL: [Strategy; 4] = [Strategy::Grouped, Strategy::Fused, Strategy::FusedSplit, Strategy::FfnBlock];
    /// The strategies of a layer (every one but [`Strategy::FfnBlock`]), in search order.
    pub const LAYER: [Strategy; 3] = [Strategy::Grouped, Strategy::Fused, Strategy::FusedSplit];

    /// Whether this strategy computes an FFN-expert block rather than a layer.
    pub fn is_block(self) -> bool {
        self == Strategy::FfnBlock
    }

    /// The snake_case name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Grouped => "grouped",
            Strategy::Fused => "fused",
            Strategy::FusedSplit => "fused_split",
            Strategy::FfnBlock => "ffn_block",
        }
    }
}

/// One point of the search space: a strategy and the kernel build it runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// How the layer is computed.
    pub strategy: Strategy,
    /// The kernel configuration, by value.
    pub build: KernelBuild,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.strategy, self.build)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_are_the_serde_names() {
        for s in Strategy::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<Strategy>(&format!("\"{}\"", s.name())).unwrap(), s);
        }
        assert_eq!(Strategy::FusedSplit.name(), "fused_split");
        assert_eq!(Strategy::FfnBlock.name(), "ffn_block");
        // The layer strategies are every strategy but the block's.
        let layer: Vec<Strategy> = Strategy::ALL.into_iter().filter(|s| !s.is_block()).collect();
        assert_eq!(layer, Strategy::LAYER);
    }
}
