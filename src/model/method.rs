//! Presets: the published MoLE methods expressed as [`LayerSpec`]s.

use super::{
    Gating, LayerParam, LayerSpec, Mix, RankLayout, RankSelection, Router, RoutingRule, TopKWeights, Training,
};
use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A published MoLE method. [`Method::spec`] builds its layer as the authors' code computes it
/// (the README's preset table names the repository and file each preset follows);
/// [`Method::spec_with`] takes the options that code has ([`MethodOptions`]). Every field of
/// the result can be changed afterwards (or written as JSON) for settings no option covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// MixLoRA's routing (router on x, softmax top-k, renormalised; as MoLA) applied to one
    /// linear layer's LoRA deltas separately. It equals MixLoRA's FFN-expert block
    /// ([`super::FfnMethod::MixLora`]) only at k = 1; for k > 1 it is a different model (the
    /// block mixes whole expert FFNs, through the activation).
    MixLoraPerLinear,
    /// MixLoRA dynamic's routing (top-p, p = 0.8, over softmax probabilities) applied to one
    /// linear layer's LoRA deltas separately. A different model from the dynamic FFN-expert block
    /// ([`super::FfnMethod::MixLoraDynamic`]): there the raw weights scale whole expert FFNs
    /// (base included) and several experts mix through the activation.
    MixLoraDynamicPerLinear,
    /// DynMoLE: Tsallis-entropy switch (q = 1.1, threshold 0.9, `eps` 1e-5 added to the
    /// probabilities) between all experts and top-p (0.75) with keep-top-2.
    DynMole,
    /// LLaVA-MoLE sparse mode: router with bias, top-1, weight 1.
    LlavaMoleSparse,
    /// LLaVA-MoLE dense mode: router with bias, softmax over all experts.
    LlavaMoleDense,
    /// LoRAMoE: dense softmax router.
    LoraMoe,
    /// HydraLoRA: dense softmax over B heads; the shared A is stored once per expert in the bank.
    HydraLora,
    /// X-LoRA: caller-given scalings, dense (or top-k when k < E).
    XLora,
    /// MeteoRA: softmax top-k with temperature (1 by default), renormalised.
    MeteoRa,
    /// FlexOlmo-style: softmax top-k without renormalisation.
    FlexOlmo,
    /// SMoRA: rank-wise (or rank-group) experts, sigmoid gates with a load-balancing selection
    /// bias, top-k, weights normalised to sum k; scale alpha / k.
    Smora,
    /// FlyLoRA as its released `flylora.py`: rank-1 experts selected by |h + bias| (implicit
    /// router), weight 1; scale alpha / R.
    FlyLora,
    /// FlyLoRA as the paper's PEFT-based code: the k largest signed `h + bias`; the bias is
    /// updated between calls with [`crate::reference::flylora_bias_update`].
    FlyLoraPeft,
    /// CoMoL: shared A/B of rank r, `experts` r x r cores merged by a softmax top-k router on h.
    Comol,
    /// Multi-adapter serving: one adapter id per token.
    AdapterServing,
}

/// A setting of a preset that a caller chooses (a [`MethodShape`] field, a `mole run` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knob {
    /// [`MethodShape::experts`] (`--experts`).
    Experts,
    /// [`MethodShape::rank`] (`--rank`).
    Rank,
    /// [`MethodShape::k`] (`--k`).
    K,
}

/// The dimensions a preset is instantiated with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MethodShape {
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Experts (adapters, rank groups, or CoMoL cores).
    pub experts: usize,
    /// Rank per expert (rank-group size for SMoRA; must be 1 for FlyLoRA; shared rank for CoMoL).
    pub rank: usize,
    /// Experts per token for top-k methods.
    pub k: usize,
    /// LoRA alpha; the preset derives the scale from it.
    pub alpha: f64,
}

/// The options the methods' own code has, with that code's defaults ([`Default`]). Each applies
/// to the presets named in its documentation and is ignored by the others, except
/// [`MethodOptions::expert_scales`], which every preset takes.
#[derive(Clone, Debug, PartialEq)]
pub struct MethodOptions {
    /// LLaVA-MoLE: whether the router adds a bias (its `nn.Linear` router has one: `true`).
    pub router_bias: bool,
    /// DynMoLE: `eps` added to the probabilities before the entropy (its code: `1e-5`).
    pub entropy_eps: f64,
    /// MeteoRA: the gate temperature `T`, or `None` for none. Its accelerated forward (the
    /// default path) divides the gate logits by `T` (1 in its code); its per-adapter loop does
    /// not, which is `None`.
    pub temperature: Option<f64>,
    /// Every preset: per-expert scales `s_e` on top of the preset's global scale
    /// ([`LayerSpec::expert_scales`]: one per bank expert, so one for CoMoL; `None`, the default,
    /// means 1). For adapters with their own PEFT `lora_alpha_e / r_e`, pass
    /// [`super::peft_expert_scales`] and give the shape `alpha = rank` so the global scale of the
    /// rank-scaled presets is 1.
    pub expert_scales: Option<Vec<f64>>,
}

impl Default for MethodOptions {
    fn default() -> Self {
        MethodOptions { router_bias: true, entropy_eps: 1e-5, temperature: Some(1.0), expert_scales: None }
    }
}

impl Method {
    /// Every preset, in a fixed order.
    pub const ALL: [Method; 15] = [
        Method::MixLoraPerLinear,
        Method::MixLoraDynamicPerLinear,
        Method::DynMole,
        Method::LlavaMoleSparse,
        Method::LlavaMoleDense,
        Method::LoraMoe,
        Method::HydraLora,
        Method::XLora,
        Method::MeteoRa,
        Method::FlexOlmo,
        Method::Smora,
        Method::FlyLora,
        Method::FlyLoraPeft,
        Method::Comol,
        Method::AdapterServing,
    ];

    /// Builds and validates the layer spec of this method with its code's default options; the
    /// knobs are checked first ([`Method::check_shape`]).
    pub fn spec(self, s: MethodShape) -> Result<LayerSpec> {
        self.spec_with(s, MethodOptions::default())
    }

    /// Builds and validates the layer spec of this method with `options`.
    pub fn spec_with(self, s: MethodShape, options: MethodOptions) -> Result<LayerSpec> {
        self.check_shape(&s)?;
        let x_router = Router::X { bias: false };
        let routed = |rule| Gating::Routed { router: x_router, rule };
        let topk = |weights| RoutingRule::SoftmaxTopK { k: s.k, temperature: 1.0, weights };
        let dense = RoutingRule::DenseSoftmax { temperature: 1.0 };
        let llava = |rule| Gating::Routed { router: Router::X { bias: options.router_bias }, rule };
        let per_rank = s.alpha / s.rank as f64;
        let (ranks, scale, gating, mix) = match self {
            Method::MixLoraPerLinear => (None, per_rank, routed(topk(TopKWeights::Renormalized)), None),
            Method::MeteoRa => {
                let temperature = options.temperature.unwrap_or(1.0);
                let rule = RoutingRule::SoftmaxTopK { k: s.k, temperature, weights: TopKWeights::Renormalized };
                (None, per_rank, routed(rule), None)
            }
            Method::FlexOlmo => (None, per_rank, routed(topk(TopKWeights::Softmax)), None),
            Method::MixLoraDynamicPerLinear => {
                (None, per_rank, routed(RoutingRule::TopP { p: 0.8, temperature: 1.0 }), None)
            }
            Method::DynMole => {
                let rule = RoutingRule::DynMole {
                    q: 1.1,
                    top_p: 0.75,
                    keep_top_k: 2.min(s.experts),
                    entropy_threshold: 0.9,
                    entropy_eps: options.entropy_eps,
                };
                (None, per_rank, routed(rule), None)
            }
            Method::LlavaMoleSparse => {
                let rule = RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Unit };
                (None, per_rank, llava(rule), None)
            }
            Method::LlavaMoleDense => (None, per_rank, llava(dense), None),
            Method::LoraMoe | Method::HydraLora => (None, per_rank, routed(dense), None),
            Method::XLora => {
                let top_k = (s.k < s.experts).then_some(s.k);
                (None, per_rank, Gating::Given { top_k, softmax_topk: false }, None)
            }
            Method::Smora => {
                let rule = RoutingRule::SigmoidTopK { k: s.k, bias: true };
                (None, s.alpha / s.k as f64, routed(rule), None)
            }
            Method::FlyLora | Method::FlyLoraPeft => {
                let selection = if self == Method::FlyLora { RankSelection::Magnitude } else { RankSelection::Signed };
                let rule = RoutingRule::MagnitudeTopK { k: s.k, bias: true, selection };
                let gating = Gating::Routed { router: Router::LowRank, rule };
                (None, s.alpha / s.experts as f64, gating, None)
            }
            Method::Comol => {
                let rule = RoutingRule::SoftmaxTopK { k: s.k, temperature: 1.0, weights: TopKWeights::Renormalized };
                let gating = Gating::Routed { router: Router::H { bias: false }, rule };
                (Some(RankLayout::uniform(1, s.rank)?), per_rank, gating, Some(Mix::CoreMerge { cores: s.experts }))
            }
            Method::AdapterServing => (None, per_rank, Gating::AdapterIds, None),
        };
        let spec = LayerSpec {
            d_in: s.d_in,
            d_out: s.d_out,
            ranks: match ranks {
                Some(r) => r,
                None => RankLayout::uniform(s.experts, s.rank)?,
            },
            scale,
            gating,
            mix: mix.unwrap_or_default(),
            expert_scales: options.expert_scales,
            // FlyLoRA's A is a fixed sparse random projection: never trained.
            training: Training {
                frozen: if self.single_rank_experts() { vec![LayerParam::A] } else { vec![] },
                ..Training::default()
            },
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Whether this preset reads `knob` from its [`MethodShape`]: `k` only where the rule takes
    /// a fixed number of experts per token from the caller, `rank` everywhere but FlyLoRA's
    /// presets (whose experts are single ranks). A caller that sets a knob the preset ignores should be told.
    pub fn uses(self, knob: Knob) -> bool {
        match knob {
            Knob::Experts => true,
            Knob::Rank => !self.single_rank_experts(),
            Knob::K => !matches!(
                self,
                Method::MixLoraDynamicPerLinear
                    | Method::DynMole
                    | Method::LlavaMoleSparse
                    | Method::LlavaMoleDense
                    | Method::LoraMoe
                    | Method::HydraLora
                    | Method::AdapterServing
            ),
        }
    }

    /// Checks the knobs this preset uses, naming the one that is wrong: positive dimensions
    /// within `crate::limits`, `1 <= k <= experts` where `k` is used, rank 1 for FlyLoRA, a
    /// finite alpha.
    pub fn check_shape(self, s: &MethodShape) -> Result<()> {
        use crate::limits::{check_max, MAX_DIM, MAX_EXPERTS};
        let dims = [("d_in", s.d_in, MAX_DIM), ("d_out", s.d_out, MAX_DIM), ("experts", s.experts, MAX_EXPERTS)];
        for (name, value, max) in dims.into_iter().chain([("rank", s.rank, crate::limits::MAX_TOTAL_RANK)]) {
            if value == 0 {
                return Err(MoleError::ZeroDimension { name });
            }
            check_max(name, value, max)?;
        }
        if self.single_rank_experts() && s.rank != 1 {
            return Err(MoleError::param("rank", s.rank, "FlyLoRA experts are single ranks (rank 1)"));
        }
        if self.uses(Knob::K) && (s.k == 0 || s.k > s.experts) {
            return Err(MoleError::InvalidK { k: s.k, experts: s.experts });
        }
        if !s.alpha.is_finite() {
            return Err(MoleError::param("alpha", s.alpha, "must be finite"));
        }
        Ok(())
    }

    /// Whether every expert of this method is a single rank (FlyLoRA's shape needs `rank = 1`).
    pub fn single_rank_experts(self) -> bool {
        matches!(self, Method::FlyLora | Method::FlyLoraPeft)
    }

    /// The kebab-case name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Method::MixLoraPerLinear => "mix-lora-per-linear",
            Method::MixLoraDynamicPerLinear => "mix-lora-dynamic-per-linear",
            Method::DynMole => "dyn-mole",
            Method::LlavaMoleSparse => "llava-mole-sparse",
            Method::LlavaMoleDense => "llava-mole-dense",
            Method::LoraMoe => "lora-moe",
            Method::HydraLora => "hydra-lora",
            Method::XLora => "x-lora",
            Method::MeteoRa => "meteo-ra",
            Method::FlexOlmo => "flex-olmo",
            Method::Smora => "smora",
            Method::FlyLora => "fly-lora",
            Method::FlyLoraPeft => "fly-lora-peft",
            Method::Comol => "comol",
            Method::AdapterServing => "adapter-serving",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The methods `mole bench layer`, `benches/layer.rs` and the runtime tests run, with their usual settings:
/// `(method, experts, rank per expert, k)`.
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
pub const STANDARD_METHODS: [(Method, usize, usize, usize); 11] = [
    (Method::MixLoraPerLinear, 8, 16, 2),
    (Method::MixLoraDynamicPerLinear, 8, 16, 2),
    (Method::DynMole, 6, 24, 2),
    (Method::LlavaMoleSparse, 8, 16, 1),
    (Method::LlavaMoleDense, 8, 16, 2),
    (Method::LoraMoe, 8, 16, 2),
    (Method::XLora, 8, 16, 8),
    (Method::Smora, 64, 1, 8),
    (Method::FlyLora, 64, 1, 8),
    (Method::Comol, 8, 16, 2),
    (Method::FlexOlmo, 8, 16, 2),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_builds_a_valid_spec() {
        for m in Method::ALL {
            let rank = if m.single_rank_experts() { 1 } else { 8 };
            let s = MethodShape { d_in: 64, d_out: 48, experts: 8, rank, k: 2, alpha: 16.0 };
            let spec = m.spec(s).unwrap_or_else(|e| panic!("{m}: {e}"));
            assert_eq!(spec.routed_experts(), 8, "{m}");
            let name = serde_json::to_string(&m).unwrap();
            assert_eq!(name, format!("\"{}\"", m.name()));
        }
        let bad = MethodShape { d_in: 64, d_out: 48, experts: 8, rank: 4, k: 2, alpha: 16.0 };
        assert!(Method::FlyLora.spec(bad).is_err());
        assert!(Method::MixLoraPerLinear.spec(MethodShape { k: 9, ..bad }).is_err());
    }

    #[test]
    fn knobs_are_checked_by_name_and_ignored_ones_are_known() {
        let s = MethodShape { d_in: 64, d_out: 48, experts: 8, rank: 4, k: 2, alpha: 16.0 };
        // SMoRA with k = 0 would divide alpha by zero: the knob is named instead.
        assert_eq!(Method::Smora.spec(MethodShape { k: 0, ..s }), Err(MoleError::InvalidK { k: 0, experts: 8 }));
        // X-LoRA with k > E is refused like every other top-k method, not run dense.
        assert_eq!(Method::XLora.spec(MethodShape { k: 9, ..s }), Err(MoleError::InvalidK { k: 9, experts: 8 }));
        // DynMoLE reads no k: one expert works whatever k says.
        let one = MethodShape { experts: 1, k: 2, ..s };
        assert!(Method::DynMole.spec(one).is_ok());
        assert!(!Method::DynMole.uses(Knob::K) && Method::Smora.uses(Knob::K));
        let e = Method::FlyLora.spec(MethodShape { rank: 16, ..s }).unwrap_err();
        assert!(e.to_string().contains("invalid rank = 16"), "{e}");
        assert!(!Method::FlyLora.uses(Knob::Rank));
        assert_eq!(
            Method::MixLoraPerLinear.spec(MethodShape { d_in: 0, ..s }),
            Err(MoleError::ZeroDimension { name: "d_in" })
        );
        assert!(Method::MixLoraPerLinear
            .spec(MethodShape { experts: 1 << 40, ..s })
            .unwrap_err()
            .to_string()
            .contains("experts"));
    }
}
