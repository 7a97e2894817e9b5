//! The layer descriptor: `y += scale · (mix(x · A) ⊙ s) · B`, with its gating, mix and optional
//! per-expert scales `s`.

use super::{Gating, RankLayout, Router, RoutingRule, Training};
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
    /// Optional per-expert scales `s_e`, one per **bank** expert (`ranks.num_experts()`; one for
    /// CoMoL's shared expert), each finite: PEFT's per-adapter `lora_alpha / r` when adapters
    /// differ ([`peft_expert_scales`]). After the mix, expert `e`'s rank columns of `h'` are
    /// multiplied by `s_e`, before the expand:
    /// `y += scale · Σ_c h'[t, c] · s_{expert(c)} · B[c, :]`, i.e. `scale · Σ_e s_e · w_e · h_e · B_e`
    /// for the expert-scale mix and `s_0` times the whole delta for CoMoL. This is exactly
    /// folding `s_e` into the rows of `B` that expert `e` owns. `None` (the default, left out of
    /// the JSON) means 1 everywhere. The f64 reference ([`crate::reference`]), the fused and
    /// grouped kernels and the layer runtime ([`crate::runtime`]) apply them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_scales: Option<Vec<f64>>,
    /// Frozen parameters and the router's auxiliary losses, for the backward
    /// ([`crate::reference::backward()`], [`crate::runtime::CompiledLayer::backward`]). The default
    /// (everything trained, no loss) is left out of the JSON.
    #[serde(default, skip_serializing_if = "Training::is_default")]
    pub training: Training,
}

/// PEFT's per-adapter scale `lora_alpha_e / r_e` for a bank of adapters with their own alphas
/// (`alphas[e]` for bank expert `e` of `ranks`): the [`LayerSpec::expert_scales`] that reproduce
/// such a bank with a global `scale` of 1. An expert of rank 0 owns no columns, so its scale
/// multiplies nothing and is 1.
///
/// Errors: `alphas` not one per bank expert; an alpha that is not finite.
pub fn peft_expert_scales(alphas: &[f64], ranks: &RankLayout) -> Result<Vec<f64>> {
    let e = ranks.num_experts();
    if alphas.len() != e {
        return Err(MoleError::ShapeMismatch {
            what: "lora_alpha (one per bank expert)",
            expected: vec![e],
            got: alphas.len(),
        });
    }
    if let Some(a) = alphas.iter().find(|a| !a.is_finite()) {
        return Err(MoleError::param("lora_alpha", a, "every adapter's alpha must be finite"));
    }
    Ok(alphas
        .iter()
        .enumerate()
        .map(|(i, &a)| match ranks.rank(i) {
            0 => 1.0,
            r => a / r as f64,
        })
        .collect())
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

    /// The scale of bank expert `e`: `expert_scales[e]`, or 1 without per-expert scales.
    pub fn expert_scale(&self, e: usize) -> f64 {
        self.expert_scales.as_ref().and_then(|s| s.get(e).copied()).unwrap_or(1.0)
    }

    /// Whether the per-expert scales change the layer (some `s_e != 1`).
    pub fn has_expert_scales(&self) -> bool {
        self.expert_scales.as_ref().is_some_and(|s| s.iter().any(|&v| v != 1.0))
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
        if let Some(s) = &self.expert_scales {
            let e = self.ranks.num_experts();
            if s.len() != e {
                return Err(MoleError::ShapeMismatch {
                    what: "expert_scales (one per bank expert)",
                    expected: vec![e],
                    got: s.len(),
                });
            }
            if let Some((i, v)) = s.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(MoleError::param("expert_scales", format!("{v} (expert {i})"), "must be finite"));
            }
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
        self.gating.validate(self.routed_experts())?;
        self.training.validate(self)
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
            expert_scales: None,
            training: Default::default(),
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
    fn expert_scales_are_one_finite_value_per_bank_expert() {
        let mut s = mixlora();
        s.expert_scales = Some(vec![0.5, -1.0, 0.0, 2.0, 1.0, 1.0, 3.0, 1.0]);
        assert!(s.validate().is_ok());
        assert!(s.has_expert_scales() && s.expert_scale(1) == -1.0);
        s.expert_scales = Some(vec![1.0; 7]);
        let e = s.validate().unwrap_err();
        assert_eq!(
            e,
            MoleError::ShapeMismatch { what: "expert_scales (one per bank expert)", expected: vec![8], got: 7 }
        );
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut v = vec![1.0; 8];
            v[5] = bad;
            s.expert_scales = Some(v);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.starts_with("invalid expert_scales = ") && e.contains("(expert 5): must be finite"), "{e}");
        }
        // CoMoL: one bank expert, so one scale (not one per core).
        let mut c = mixlora();
        c.ranks = RankLayout::uniform(1, 8).unwrap();
        c.mix = Mix::CoreMerge { cores: 4 };
        c.expert_scales = Some(vec![0.25]);
        assert!(c.validate().is_ok());
        c.expert_scales = Some(vec![0.25; 4]);
        assert!(matches!(c.validate(), Err(MoleError::ShapeMismatch { got: 4, .. })));
        // Scales of 1 change nothing.
        s.expert_scales = Some(vec![1.0; 8]);
        assert!(!s.has_expert_scales());
        s.expert_scales = Some(vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]);
        assert!(s.has_expert_scales());
    }

    #[test]
    fn peft_scales_are_alpha_over_rank() {
        let ranks = RankLayout::from_offsets(vec![0, 4, 4, 12]).unwrap();
        assert_eq!(peft_expert_scales(&[8.0, 5.0, 4.0], &ranks).unwrap(), vec![2.0, 1.0, 0.5]);
        assert!(matches!(peft_expert_scales(&[8.0, 4.0], &ranks), Err(MoleError::ShapeMismatch { got: 2, .. })));
        let e = peft_expert_scales(&[8.0, f64::NAN, 4.0], &ranks).unwrap_err();
        assert!(e.to_string().contains("lora_alpha"), "{e}");
    }

    #[test]
    fn spec_json_round_trip() {
        let mut s = mixlora();
        let j = serde_json::to_string_pretty(&s).unwrap();
        assert!(!j.contains("expert_scales"), "None is left out: {j}");
        let back: LayerSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        s.expert_scales = Some(vec![0.5, -1.25, 0.0, 2.0, 1.0, 1e-3, 3.0, 1.0]);
        let back = LayerSpec::from_json(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<LayerSpec>(&j.replace("\"d_in\"", "\"d_inn\"")).is_err());
    }
}
