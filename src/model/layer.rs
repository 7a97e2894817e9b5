//! The layer descriptor: `y += scale · mix(x · A) · B`, with its gating and mix.

use super::{Gating, RankLayout, Router, RoutingRule};
use crate::{limits, MoleError, Result};
use serde::{Deserialize, Serialize};

/// What happens in the low-rank space once the weights are known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Mix {
    /// Each expert's rank columns are scaled by its weight, unselected ones zeroed:
    /// `h'[t, cols(e)] = w[t, e] · h[t, cols(e)]`. Expert and rank gating both use it.
    #[default]
    ExpertScale,
    /// CoMoL: one shared bank expert of rank `R`, `cores [C, R, R]` soft-merged per token:
    /// `h'[t] = h[t] · Σ_c w[t, c] · C_c`; gating runs over the `cores` cores.
    CoreMerge {
        /// Number of cores `C`.
        cores: usize,
    },
}

/// One MoLE layer: dimensions, bank layout, scale, gating and mix.
///
/// The tensor contract (row-major; names as in `mole eval` files):
/// `x [T, d_in]`, `y [T, d_out]` (base output, updated in place), `A [d_in, R]`, `B [R, d_out]`,
/// optional `router_weight` (`[d_in, E]` or `[R, E]`), `router_bias [E]`, `logits [T, E]`,
/// `weights [T, E]`, `adapter_ids [T]`, `selection_bias [E]`, `cores [C, R, R]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// The bank's rank layout (`rank_offsets`).
    pub ranks: RankLayout,
    /// The delta's scale (`alpha / r` for plain LoRA).
    pub scale: f64,
    /// How expert weights are obtained.
    pub gating: Gating,
    /// What happens in the low-rank space.
    #[serde(default)]
    pub mix: Mix,
}

impl LayerSpec {
    /// Number of routed experts: bank experts for [`Mix::ExpertScale`], cores for CoMoL.
    pub fn routed_experts(&self) -> usize {
        match self.mix {
            Mix::ExpertScale => self.ranks.num_experts(),
            Mix::CoreMerge { cores } => cores,
        }
    }

    /// CoMoL's cores: `C` for [`Mix::CoreMerge`] (each `[R, R]`), 0 for every other mix.
    pub fn core_count(&self) -> usize {
        match self.mix {
            Mix::ExpertScale => 0,
            Mix::CoreMerge { cores } => cores,
        }
    }

    /// Slots per token of the routing output.
    pub fn slots(&self) -> usize {
        self.gating.slots(self.routed_experts())
    }

    /// Total rank `R`.
    pub fn total_rank(&self) -> usize {
        self.ranks.total_rank()
    }

    /// The router, if scores are computed or supplied as logits.
    pub fn router(&self) -> Option<Router> {
        match self.gating {
            Gating::Routed { router, .. } => Some(router),
            _ => None,
        }
    }

    /// The routing rule, if any.
    pub fn rule(&self) -> Option<RoutingRule> {
        match self.gating {
            Gating::Routed { rule, .. } => Some(rule),
            _ => None,
        }
    }

    /// Validates every parameter and combination; shapes of data are checked by
    /// [`crate::model::LayerInputs::validate`].
    pub fn validate(&self) -> Result<()> {
        if self.d_in == 0 {
            return Err(MoleError::ZeroDimension { name: "d_in" });
        }
        if self.d_out == 0 {
            return Err(MoleError::ZeroDimension { name: "d_out" });
        }
        limits::check_max("d_in", self.d_in, limits::MAX_DIM)?;
        limits::check_max("d_out", self.d_out, limits::MAX_DIM)?;
        if !self.scale.is_finite() {
            return Err(MoleError::param("scale", self.scale, "must be finite"));
        }
        if let Mix::CoreMerge { cores } = self.mix {
            if cores == 0 {
                return Err(MoleError::ZeroDimension { name: "cores" });
            }
            limits::check_max("cores", cores, limits::MAX_EXPERTS)?;
            if self.ranks.num_experts() != 1 {
                return Err(MoleError::Unsupported(format!(
                    "core_merge needs one shared bank expert (ranks [0, R]), got {} experts",
                    self.ranks.num_experts()
                )));
            }
        }
        if self.router() == Some(Router::LowRank) {
            let ok = self.mix == Mix::ExpertScale && (0..self.ranks.num_experts()).all(|e| self.ranks.rank(e) == 1);
            if !ok {
                return Err(MoleError::Unsupported(
                    "the low_rank router scores each expert by its own activation: every expert must have rank 1"
                        .into(),
                ));
            }
        }
        self.gating.validate(self.routed_experts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TopKWeights;

    fn mixlora() -> LayerSpec {
        LayerSpec {
            d_in: 64,
            d_out: 32,
            ranks: RankLayout::uniform(8, 4).unwrap(),
            scale: 2.0,
            gating: Gating::Routed {
                router: Router::X { bias: false },
                rule: RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized },
            },
            mix: Mix::ExpertScale,
        }
    }

    #[test]
    fn validate_rejects_bad_specs() {
        assert!(mixlora().validate().is_ok());
        let mut s = mixlora();
        s.d_in = 0;
        assert_eq!(s.validate(), Err(MoleError::ZeroDimension { name: "d_in" }));
        let mut s = mixlora();
        s.scale = f64::INFINITY;
        assert!(s.validate().is_err());
        let mut s = mixlora();
        s.mix = Mix::CoreMerge { cores: 4 };
        assert!(matches!(s.validate(), Err(MoleError::Unsupported(_))));
        let mut s = mixlora();
        s.gating = Gating::Routed {
            router: Router::LowRank,
            rule: RoutingRule::MagnitudeTopK { k: 2, bias: false, selection: crate::model::RankSelection::Magnitude },
        };
        assert!(matches!(s.validate(), Err(MoleError::Unsupported(_))));
        s.ranks = RankLayout::uniform(8, 1).unwrap();
        assert!(s.validate().is_ok());
    }

    #[test]
    fn spec_json_round_trip() {
        let s = mixlora();
        let j = serde_json::to_string_pretty(&s).unwrap();
        let back: LayerSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<LayerSpec>(&j.replace("\"d_in\"", "\"d_inn\"")).is_err());
    }
}
