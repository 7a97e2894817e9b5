//! The autotuner: per GPU and per shape, the fastest correct kernel configuration and strategy,
//! found once by measurement and kept by value in a JSON cache.
//!
//! - [`key`]: [`ShapeKey`], what a result is valid for (exact dimensions, E, k, dtype, method;
//!   tokens bucketed to powers of two).
//! - [`space`]: the [`Candidate`]s of a shape (candidate 0 is the default) and their pruning from
//!   the ptxas report before any timing.
//! - `measure` (feature `cli`): timing on the device through `TunableRun` (warm-up, L2 flush,
//!   CUDA events, median) and `prepare_run`, where each [`Strategy`] plugs in.
//! - `tuner` (feature `cli`): `tune_shape`, the search of one shape with its per-candidate
//!   `Outcome`s.
//! - [`cache`]: [`TuningCache`] and [`store`], one file per GPU, user results over shipped ones,
//!   stale and corrupt data ignored with a warning, atomic merged writes.
//!
//! Without the `cli` feature only the lookup is compiled (keys, candidates, the cache): what a
//! framework needs to run tuned layers. `mole autotune` drives all of it for the standard shapes
//! of common models.

pub mod cache;
pub mod key;
#[cfg(feature = "cli")]
pub mod measure;
pub mod space;
#[cfg(feature = "cli")]
pub mod tuner;

pub use cache::{store, GpuId, Provenance, Stored, TunedEntry, TuningCache, TuningFile, FORMAT_VERSION};
pub use key::{token_bucket, ShapeKey};
#[cfg(feature = "cli")]
pub use measure::{measure, prepare_run, reference_y, MeasureOptions, Measurement, TunableRun};
pub use space::{candidates, candidates_for, Candidate, Pruner};
#[cfg(feature = "cli")]
pub use tuner::{tune_shape, CandidateReport, Outcome, ShapeResult, TuneOptions};

use serde::{Deserialize, Serialize};
use std::fmt;

/// How a layer is computed on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Gating, then the segmented grouped shrink and expand (`Family::Sgmv`).
    Grouped,
    /// One fused launch for the whole layer (the fused family).
    Fused,
    /// The fused layer in two launches, for small token counts.
    FusedSplit,
}

impl Strategy {
    /// Every strategy, in search order.
    pub const ALL: [Strategy; 3] = [Strategy::Grouped, Strategy::Fused, Strategy::FusedSplit];

    /// The snake_case name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Grouped => "grouped",
            Strategy::Fused => "fused",
            Strategy::FusedSplit => "fused_split",
        }
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
    }
}
