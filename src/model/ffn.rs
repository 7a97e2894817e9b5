//! The FFN-expert block (MixLoRA): expert `e` is the whole gated FFN with LoRA on its gate, up
//! and down projections, sharing the frozen base weights; the router mixes the experts' outputs:
//!
//! ```text
//! g_e = x·W_gate + s_g·(x·A^g_e)·B^g_e        u_e = x·W_up + s_u·(x·A^u_e)·B^u_e
//! a_e = act(g_e) ⊙ u_e                        out_e = a_e·W_down + s_d·(a_e·A^d_e)·B^d_e
//! y   = Σ_{selected e} w_e · out_e
//! ```
//!
//! [`FfnMethod`] builds the block of MixLoRA and MixLoRA dynamic from a few knobs ([`FfnShape`]).

use super::{Gating, RankLayout, Router, RoutingRule, TopKWeights};
use crate::{limits, MoleError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The activation applied to the gate projection, `a = act(g) ⊙ u`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `g · sigmoid(g)` (SwiGLU, as MixLoRA on LLaMA).
    #[default]
    Silu,
    /// PyTorch's exact GELU, `g/2 · (1 + erf(g/√2))` (GeGLU).
    Gelu,
}

impl Activation {
    /// The activation of one value, in f64. GELU's `erf` is computed from its everywhere
    /// convergent series of positive terms (no cancellation), accurate to a few f64 ulps
    /// absolutely; it is 1 beyond `|z| = 6` (where `erfc < 3e-17`).
    pub fn apply(self, g: f64) -> f64 {
        match self {
            Activation::Silu => g / (1.0 + (-g).exp()),
            Activation::Gelu => 0.5 * g * (1.0 + erf(g / std::f64::consts::SQRT_2)),
        }
    }
}

impl fmt::Display for Activation {
    /// The JSON and command-line name, `silu` or `gelu`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
        })
    }
}

/// `erf(z) = 2/√π · e^{-z²} · Σ_n 2^n z^{2n+1} / (1·3·…·(2n+1))`.
fn erf(z: f64) -> f64 {
    if z.is_nan() {
        return z;
    }
    if z.abs() >= 6.0 {
        return z.signum();
    }
    let (z2, mut term, mut sum) = (z * z, z, z);
    for n in 1..200 {
        term *= 2.0 * z2 / (2 * n + 1) as f64;
        sum += term;
        if term.abs() <= sum.abs() * 1e-17 {
            break;
        }
    }
    2.0 / std::f64::consts::PI.sqrt() * (-z2).exp() * sum
}

/// The LoRA bank on one projection of the block: one expert per routed expert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionLora {
    /// Which rank columns of this projection's `A` (rows of `B`) each expert owns.
    pub ranks: RankLayout,
    /// The delta's scale (`alpha / r` for plain LoRA).
    pub scale: f64,
}

/// One FFN-expert block: dimensions, activation, gating over `experts` experts, and the LoRA
/// bank of each adapted projection (`None`: that projection is the base alone).
///
/// The tensor contract (row-major, input-major weights): `x [T, d]`, `router_weight [d, E]`,
/// `router_bias [E]`, `base_gate [d, f]`, `base_up [d, f]`, `base_down [f, d]`, and per adapted
/// projection `gate_a [d, R_g]`, `gate_b [R_g, f]`, `up_a [d, R_u]`, `up_b [R_u, f]`,
/// `down_a [f, R_d]`, `down_b [R_d, d]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FfnSpec {
    /// Model features (the input and output width).
    pub d: usize,
    /// Intermediate features of the FFN.
    pub f: usize,
    /// The gate activation.
    #[serde(default)]
    pub activation: Activation,
    /// How expert weights are obtained: scores from `x` (the `x` router) or given logits,
    /// given weights, or adapter ids.
    pub gating: Gating,
    /// Number of routed experts `E`.
    pub experts: usize,
    /// LoRA on the gate projection.
    #[serde(default)]
    pub gate: Option<ProjectionLora>,
    /// LoRA on the up projection.
    #[serde(default)]
    pub up: Option<ProjectionLora>,
    /// LoRA on the down projection.
    #[serde(default)]
    pub down: Option<ProjectionLora>,
}

impl FfnSpec {
    /// Slots per token of the routing output.
    pub fn slots(&self) -> usize {
        self.gating.slots(self.experts)
    }

    /// The router, if scores are computed or supplied as logits.
    pub fn router(&self) -> Option<Router> {
        match self.gating {
            Gating::Routed { router, .. } => Some(router),
            _ => None,
        }
    }

    /// The adapted projections by name (`gate`, `up`, `down`).
    pub fn projections(&self) -> [(&'static str, Option<&ProjectionLora>); 3] {
        [("gate", self.gate.as_ref()), ("up", self.up.as_ref()), ("down", self.down.as_ref())]
    }

    /// Validates every parameter and combination; shapes of data are checked by the reference.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("d", self.d), ("f", self.f), ("experts", self.experts)] {
            if v == 0 {
                return Err(MoleError::ZeroDimension { name });
            }
        }
        limits::check_max("d", self.d, limits::MAX_DIM)?;
        limits::check_max("f", self.f, limits::MAX_DIM)?;
        limits::check_max("experts", self.experts, limits::MAX_EXPERTS)?;
        for (name, lora) in self.projections() {
            let Some(lora) = lora else { continue };
            if lora.ranks.num_experts() != self.experts {
                return Err(MoleError::InvalidRankOffsets {
                    reason: format!(
                        "{name}.ranks has {} experts, the block routes {}",
                        lora.ranks.num_experts(),
                        self.experts
                    ),
                });
            }
            if !lora.scale.is_finite() {
                let field = match name {
                    "gate" => "gate.scale",
                    "up" => "up.scale",
                    _ => "down.scale",
                };
                return Err(MoleError::param(field, lora.scale, "must be finite"));
            }
        }
        if matches!(self.router(), Some(Router::H { .. } | Router::LowRank)) {
            return Err(MoleError::Unsupported(
                "the FFN block routes on x (the x router) or on given logits, not on low-rank activations".into(),
            ));
        }
        self.gating.validate(self.experts)
    }
}

/// A published FFN-expert block: MixLoRA's experts are whole LoRA-adapted FFNs sharing the
/// frozen base. [`FfnMethod::spec`] builds the block as TUDB-Labs/MoE-PEFT
/// `moe_peft/adapters/mixlora/model.py` computes it (`MixtralSparseMoe`, `DynamicSparseMoe`): LoRA
/// of one rank on the gate, up and down projections, scale `alpha / rank`, a router on `x`
/// without bias, and the routing rule of the per-linear preset of the same name
/// ([`super::Method::MixLoraPerLinear`], [`super::Method::MixLoraDynamicPerLinear`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum FfnMethod {
    /// MixLoRA (`MixtralSparseMoe`): softmax top-k, renormalised.
    MixLora,
    /// MixLoRA dynamic (`DynamicSparseMoe`): top-p (p = 0.8) over the softmax probabilities, raw
    /// weights, through the first expert whose cumulative sum exceeds p.
    MixLoraDynamic,
}

/// The knobs an [`FfnMethod`] is instantiated with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FfnShape {
    /// Model features (the FFN's input and output width).
    pub d: usize,
    /// Intermediate features of the FFN (11008 on LLaMA-2-7B).
    pub f: usize,
    /// Routed experts.
    pub experts: usize,
    /// LoRA rank of every expert on every projection.
    pub rank: usize,
    /// Experts per token (MixLoRA's top-k; the dynamic block decides per token and ignores it).
    pub k: usize,
    /// LoRA alpha; the scale is `alpha / rank`.
    pub alpha: f64,
    /// The gate activation (SiLU on LLaMA).
    pub activation: Activation,
}

impl FfnMethod {
    /// Every block preset, in a fixed order.
    pub const ALL: [FfnMethod; 2] = [FfnMethod::MixLora, FfnMethod::MixLoraDynamic];

    /// Builds and validates the block of this method; the knobs are checked first, each error
    /// naming the knob (`d`, `f`, `experts`, `rank`, `k`, `alpha`).
    pub fn spec(self, s: FfnShape) -> Result<FfnSpec> {
        let dims =
            [("d", s.d, limits::MAX_DIM), ("f", s.f, limits::MAX_DIM), ("experts", s.experts, limits::MAX_EXPERTS)];
        for (name, value, max) in dims.into_iter().chain([("rank", s.rank, limits::MAX_TOTAL_RANK)]) {
            if value == 0 {
                return Err(MoleError::ZeroDimension { name });
            }
            limits::check_max(name, value, max)?;
        }
        if self.uses_k() && (s.k == 0 || s.k > s.experts) {
            return Err(MoleError::InvalidK { k: s.k, experts: s.experts });
        }
        if !s.alpha.is_finite() {
            return Err(MoleError::param("alpha", s.alpha, "must be finite"));
        }
        let rule = match self {
            FfnMethod::MixLora => {
                RoutingRule::SoftmaxTopK { k: s.k, temperature: 1.0, weights: TopKWeights::Renormalized }
            }
            FfnMethod::MixLoraDynamic => RoutingRule::TopP { p: 0.8, temperature: 1.0 },
        };
        let lora = || -> Result<Option<ProjectionLora>> {
            Ok(Some(ProjectionLora { ranks: RankLayout::uniform(s.experts, s.rank)?, scale: s.alpha / s.rank as f64 }))
        };
        let spec = FfnSpec {
            d: s.d,
            f: s.f,
            activation: s.activation,
            gating: Gating::Routed { router: Router::X { bias: false }, rule },
            experts: s.experts,
            gate: lora()?,
            up: lora()?,
            down: lora()?,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Whether this preset reads [`FfnShape::k`] (MixLoRA's top-k does; the dynamic block's
    /// top-p decides per token).
    pub fn uses_k(self) -> bool {
        self == FfnMethod::MixLora
    }

    /// The kebab-case name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            FfnMethod::MixLora => "mix-lora",
            FfnMethod::MixLoraDynamic => "mix-lora-dynamic",
        }
    }
}

impl fmt::Display for FfnMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixlora(k: usize) -> FfnSpec {
        let lora = |rank, scale| Some(ProjectionLora { ranks: RankLayout::uniform(4, rank).unwrap(), scale });
        FfnSpec {
            d: 16,
            f: 24,
            activation: Activation::Silu,
            gating: Gating::Routed {
                router: Router::X { bias: false },
                rule: RoutingRule::SoftmaxTopK { k, temperature: 1.0, weights: TopKWeights::Renormalized },
            },
            experts: 4,
            gate: lora(4, 2.0),
            up: lora(2, 0.5),
            down: lora(3, 1.5),
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert!(mixlora(2).validate().is_ok());
        let mut s = mixlora(2);
        s.f = 0;
        assert_eq!(s.validate(), Err(MoleError::ZeroDimension { name: "f" }));
        let mut s = mixlora(2);
        s.d = limits::MAX_DIM + 1;
        assert!(s.validate().unwrap_err().to_string().starts_with("d = "), "{:?}", s.validate());
        let mut s = mixlora(2);
        s.up.as_mut().unwrap().ranks = RankLayout::uniform(3, 2).unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("up.ranks has 3 experts"), "{:?}", s.validate());
        let mut s = mixlora(2);
        s.down.as_mut().unwrap().scale = f64::NAN;
        assert!(matches!(s.validate(), Err(MoleError::InvalidParameter { name: "down.scale", .. })));
        assert_eq!(mixlora(5).validate(), Err(MoleError::InvalidK { k: 5, experts: 4 }));
        let mut s = mixlora(2);
        s.gating = Gating::Routed { router: Router::LowRank, rule: RoutingRule::DenseSoftmax { temperature: 1.0 } };
        assert!(matches!(s.validate(), Err(MoleError::Unsupported(_))));
    }

    #[test]
    fn activations_match_known_values() {
        // PyTorch: F.gelu(torch.tensor(1., dtype=float64)), F.silu likewise.
        assert!((Activation::Gelu.apply(1.0) - 0.8413447460685429).abs() < 1e-15);
        assert!((Activation::Gelu.apply(-2.0) - -0.04550026389635842).abs() < 1e-15);
        assert!((Activation::Silu.apply(1.0) - 0.7310585786300049).abs() < 1e-15);
        assert!((erf(0.5) - 0.5204998778130465).abs() < 1e-15);
        assert!((erf(3.0) - 0.9999779095030014).abs() < 1e-15);
        assert_eq!(Activation::Gelu.apply(-40.0), 0.0);
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let s = mixlora(2);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<FfnSpec>(&text).unwrap(), s);
        let base: FfnSpec =
            serde_json::from_str(r#"{"d":8,"f":16,"activation":"gelu","experts":2,"gating":{"type":"adapter_ids"}}"#)
                .unwrap();
        assert_eq!((base.activation, base.gate, base.down), (Activation::Gelu, None, None));
        assert!(serde_json::from_str::<FfnSpec>(
            r#"{"d":8,"f":16,"experts":2,"gating":{"type":"adapter_ids"},"rank":4}"#
        )
        .is_err());
    }

    fn shape() -> FfnShape {
        FfnShape { d: 64, f: 96, experts: 8, rank: 4, k: 2, alpha: 16.0, activation: Activation::Gelu }
    }

    #[test]
    fn block_presets_follow_mixlora() {
        let spec = FfnMethod::MixLora.spec(shape()).unwrap();
        let rule = RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized };
        assert_eq!(spec.gating, Gating::Routed { router: Router::X { bias: false }, rule });
        assert_eq!((spec.d, spec.f, spec.experts, spec.activation, spec.slots()), (64, 96, 8, Activation::Gelu, 2));
        for (name, lora) in spec.projections() {
            let lora = lora.unwrap_or_else(|| panic!("{name} has no LoRA"));
            assert_eq!((lora.ranks.clone(), lora.scale), (RankLayout::uniform(8, 4).unwrap(), 4.0), "{name}");
        }
        let dynamic = FfnMethod::MixLoraDynamic.spec(FfnShape { k: 0, ..shape() }).unwrap();
        let rule = RoutingRule::TopP { p: 0.8, temperature: 1.0 };
        assert_eq!(dynamic.gating, Gating::Routed { router: Router::X { bias: false }, rule });
        assert_eq!(dynamic.slots(), 8);
        // The block's rules are the per-linear presets' rules.
        let linear = |m: crate::model::Method| {
            let s = crate::model::MethodShape { d_in: 64, d_out: 64, experts: 8, rank: 4, k: 2, alpha: 16.0 };
            m.spec(s).unwrap().gating
        };
        assert_eq!(linear(crate::model::Method::MixLoraPerLinear), spec.gating);
        assert_eq!(linear(crate::model::Method::MixLoraDynamicPerLinear), dynamic.gating);
        for m in FfnMethod::ALL {
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
    }

    #[test]
    fn block_knobs_are_checked_by_name() {
        let s = shape();
        assert_eq!(FfnMethod::MixLora.spec(FfnShape { f: 0, ..s }), Err(MoleError::ZeroDimension { name: "f" }));
        assert_eq!(FfnMethod::MixLora.spec(FfnShape { rank: 0, ..s }), Err(MoleError::ZeroDimension { name: "rank" }));
        assert_eq!(FfnMethod::MixLora.spec(FfnShape { k: 9, ..s }), Err(MoleError::InvalidK { k: 9, experts: 8 }));
        assert_eq!(FfnMethod::MixLora.spec(FfnShape { k: 0, ..s }), Err(MoleError::InvalidK { k: 0, experts: 8 }));
        let e = FfnMethod::MixLoraDynamic.spec(FfnShape { d: limits::MAX_DIM + 1, ..s }).unwrap_err();
        assert!(e.to_string().starts_with("d = "), "{e}");
        let e = FfnMethod::MixLora.spec(FfnShape { alpha: f64::INFINITY, ..s }).unwrap_err();
        assert!(matches!(e, MoleError::InvalidParameter { name: "alpha", .. }), "{e}");
        assert!(!FfnMethod::MixLoraDynamic.uses_k() && FfnMethod::MixLora.uses_k());
    }
}
