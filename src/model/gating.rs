//! Gating: how router scores become per-token expert weights. The semantics written here are the
//! contract every implementation (CPU reference, GPU kernels) follows.
//!
//! Shared conventions:
//! - **Order.** Selected experts fill a token's slots in descending score order, ties broken toward
//!   the lower expert index. Scores are the raw logits `z` (softmax and sigmoid are monotone, so
//!   this equals ordering by probability, but stays exact where probabilities underflow).
//! - **NaN** scores are treated as `-inf`: such an expert gets probability 0 and is only ever
//!   selected after every expert with a larger score. A token whose scores are all `-inf`/NaN
//!   gets probability 0 everywhere (its delta is zero). `+inf` scores share probability 1 equally.
//! - **Empty slots** hold expert id `-1` and weight 0 (dynamic-k rules fill fewer than `slots`).

use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};

/// Where the router scores `z [T, E]` come from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Router {
    /// `z = x · W_g (+ b)`, `W_g [d_in, E]` (`router_weight`), `b [E]` (`router_bias`). Most methods.
    X {
        /// Whether `router_bias` is added.
        #[serde(default)]
        bias: bool,
    },
    /// `z = h · W_r (+ b)` on the low-rank activations, `W_r [R, E]` (CoMoL).
    H {
        /// Whether `router_bias` is added.
        #[serde(default)]
        bias: bool,
    },
    /// `z = h` itself: each rank-1 expert is scored by its own activation (FlyLoRA's implicit router).
    LowRank,
    /// The caller supplies `logits [T, E]`.
    Logits,
}

/// How a token's top-k selection is weighted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopKWeights {
    /// `w = p` (no renormalisation; FlexOlmo-style).
    Softmax,
    /// `w = p / Σ_top-k p` (MixLoRA, MoLA, Mixtral). A zero sum gives zero weights.
    #[default]
    Renormalized,
    /// `w = 1` (LLaVA-MoLE sparse mode with k = 1).
    Unit,
}

fn one() -> f64 {
    1.0
}

/// Which value of each rank FlyLoRA's top-k ranks (`magnitude_topk`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankSelection {
    /// The k largest `|z + selection_bias|` (FlyLoRA's released `flylora.py`).
    #[default]
    Magnitude,
    /// The k largest `z + selection_bias`, signed (the paper's PEFT-based code).
    Signed,
}

/// The normalised entropy of a token's probabilities, as DynMoLE defines it: Tsallis index `q`
/// (`q = 1`: Shannon) of `p + eps`, divided by the entropy of the uniform distribution (without
/// `eps`), then clamped to `[0, 1]` (so a threshold `>= 1` never switches every expert on).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Entropy {
    /// Tsallis index `q > 0`.
    pub q: f64,
    /// Added to every probability first (DynMoLE: `1e-5`; 0 elsewhere).
    pub eps: f64,
}

impl Entropy {
    /// Shannon entropy without `eps` (the statistic of the softmax rules other than DynMoLE).
    pub const SHANNON: Entropy = Entropy { q: 1.0, eps: 0.0 };
}

/// A routing rule: scores `z` of one token to `(expert, weight)` slots.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RoutingRule {
    /// `p = softmax(z / temperature)`; the k largest; weighted per [`TopKWeights`].
    #[serde(rename = "softmax_topk")]
    SoftmaxTopK {
        /// Experts per token.
        k: usize,
        /// Softmax temperature (MeteoRA); 1 by default.
        #[serde(default = "one")]
        temperature: f64,
        /// Weighting of the selected experts.
        #[serde(default)]
        weights: TopKWeights,
    },
    /// MixLoRA "dynamic": sort `p = softmax(z / temperature)` descending and keep experts up to
    /// and including the first whose cumulative sum exceeds `p`; weights are the raw `p`.
    TopP {
        /// Cumulative-probability threshold in `(0, 1]`; `p = 1` keeps every expert.
        p: f64,
        /// Softmax temperature; 1 by default.
        #[serde(default = "one")]
        temperature: f64,
    },
    /// DynMoLE: `p = softmax(z)`; if the normalised Tsallis entropy `S_q(p) / S_q(uniform)`
    /// exceeds `entropy_threshold`, every expert is active; otherwise keep the experts (in
    /// descending order) whose cumulative sum is `<= top_p` or whose position is `< keep_top_k`.
    /// Weights are `p` on the kept experts, not renormalised. `q = 1` is Shannon entropy.
    #[serde(rename = "dynmole")]
    DynMole {
        /// Tsallis entropic index `q > 0`.
        q: f64,
        /// Cumulative-probability threshold; `top_p = 1` keeps every expert.
        top_p: f64,
        /// Experts always kept, `0..=E`.
        keep_top_k: usize,
        /// Normalised-entropy threshold in `[0, 1]` above which all experts are used (the
        /// entropy is clamped to `[0, 1]`: a threshold of 1 never switches every expert on).
        entropy_threshold: f64,
        /// Added to each probability before the entropy (switch and statistic); DynMoLE's code
        /// uses `1e-5`. 0 by default.
        #[serde(default)]
        entropy_eps: f64,
    },
    /// `p = softmax(z / temperature)` on every expert (LoRAMoE, HydraLoRA, LLaVA-MoLE dense).
    DenseSoftmax {
        /// Softmax temperature; 1 by default.
        #[serde(default = "one")]
        temperature: f64,
    },
    /// SMoRA: `s = sigmoid(z)`; the k largest of `s + selection_bias` are selected (the bias
    /// balances load and only steers selection); `w = k · s / Σ_selected s`.
    #[serde(rename = "sigmoid_topk")]
    SigmoidTopK {
        /// Experts (ranks or rank groups) per token.
        k: usize,
        /// Whether the `selection_bias [E]` input is added for selection.
        #[serde(default)]
        bias: bool,
    },
    /// FlyLoRA: the k largest `|z + selection_bias|` (or `z + selection_bias`, per
    /// [`RankSelection`]), weight 1.
    #[serde(rename = "magnitude_topk")]
    MagnitudeTopK {
        /// Ranks per token.
        k: usize,
        /// Whether the `selection_bias [E]` input is added before the selection. Kernels only
        /// read it; FlyLoRA's load balancing moves it between calls
        /// ([`crate::reference::flylora_bias_update`]).
        #[serde(default)]
        bias: bool,
        /// Magnitude (default) or signed selection.
        #[serde(default)]
        selection: RankSelection,
    },
}

impl RoutingRule {
    /// Slots per token this rule needs for `experts` experts (`k`, or `E` for dynamic rules).
    pub fn slots(&self, experts: usize) -> usize {
        match *self {
            RoutingRule::SoftmaxTopK { k, .. }
            | RoutingRule::SigmoidTopK { k, .. }
            | RoutingRule::MagnitudeTopK { k, .. } => k,
            RoutingRule::TopP { .. } | RoutingRule::DynMole { .. } | RoutingRule::DenseSoftmax { .. } => experts,
        }
    }

    /// The entropy the router statistics report: DynMoLE's own (`q`, `entropy_eps`), Shannon for
    /// the other softmax rules, none for the rest.
    pub fn entropy(&self) -> Option<Entropy> {
        match *self {
            RoutingRule::DynMole { q, entropy_eps, .. } => Some(Entropy { q, eps: entropy_eps }),
            RoutingRule::SoftmaxTopK { .. } | RoutingRule::TopP { .. } | RoutingRule::DenseSoftmax { .. } => {
                Some(Entropy::SHANNON)
            }
            RoutingRule::SigmoidTopK { .. } | RoutingRule::MagnitudeTopK { .. } => None,
        }
    }

    /// Whether the router statistics report a z-loss on the raw scores (every rule but FlyLoRA's
    /// magnitude top-k, whose scores are activations, not logits).
    pub fn has_z_loss(&self) -> bool {
        !matches!(self, RoutingRule::MagnitudeTopK { .. })
    }

    /// Whether the `selection_bias` input is used.
    pub fn uses_selection_bias(&self) -> bool {
        matches!(self, RoutingRule::SigmoidTopK { bias: true, .. } | RoutingRule::MagnitudeTopK { bias: true, .. })
    }

    /// Validates the rule's parameters for `experts` experts.
    pub fn validate(&self, experts: usize) -> Result<()> {
        let check_k = |k: usize| {
            if k == 0 || k > experts {
                Err(MoleError::InvalidK { k, experts })
            } else {
                Ok(())
            }
        };
        let check_temp = |t: f64| {
            if t.is_finite() && t > 0.0 {
                Ok(())
            } else {
                Err(MoleError::param("temperature", t, "must be finite and > 0"))
            }
        };
        match *self {
            RoutingRule::SoftmaxTopK { k, temperature, .. } => {
                check_k(k)?;
                check_temp(temperature)
            }
            RoutingRule::TopP { p, temperature } => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(MoleError::param("p", p, "must be in (0, 1]"));
                }
                check_temp(temperature)
            }
            RoutingRule::DynMole { q, top_p, keep_top_k, entropy_threshold, entropy_eps } => {
                if !(entropy_eps.is_finite() && (0.0..1.0).contains(&entropy_eps)) {
                    return Err(MoleError::param("entropy_eps", entropy_eps, "must be in [0, 1)"));
                }
                if !(q.is_finite() && q > 0.0) {
                    return Err(MoleError::param("q", q, "must be finite and > 0"));
                }
                if !(0.0..=1.0).contains(&top_p) {
                    return Err(MoleError::param("top_p", top_p, "must be in [0, 1]"));
                }
                if keep_top_k > experts {
                    return Err(MoleError::InvalidK { k: keep_top_k, experts });
                }
                if !(0.0..=1.0).contains(&entropy_threshold) {
                    return Err(MoleError::param("entropy_threshold", entropy_threshold, "must be in [0, 1]"));
                }
                Ok(())
            }
            RoutingRule::DenseSoftmax { temperature } => check_temp(temperature),
            RoutingRule::SigmoidTopK { k, .. } | RoutingRule::MagnitudeTopK { k, .. } => check_k(k),
        }
    }
}

/// How a layer obtains its per-token expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Gating {
    /// Router scores, then a routing rule.
    Routed {
        /// Where the scores come from.
        router: Router,
        /// How scores become weights.
        rule: RoutingRule,
    },
    /// The caller supplies final weights `weights [T, E]` (X-LoRA scalings). With `top_k`, only
    /// the k largest are kept (ties toward the lower index); with `softmax_topk`, the kept values
    /// are replaced by their softmax (per token). Without `top_k` every expert is a slot.
    Given {
        /// Keep only the k largest weights.
        #[serde(default)]
        top_k: Option<usize>,
        /// Softmax over the kept weights.
        #[serde(default)]
        softmax_topk: bool,
    },
    /// Multi-adapter serving: `adapter_ids [T]` (i32), weight 1; id -1 means no adapter.
    AdapterIds,
}

impl Gating {
    /// Slots per token for `experts` routed experts.
    pub fn slots(&self, experts: usize) -> usize {
        match self {
            Gating::Routed { rule, .. } => rule.slots(experts),
            Gating::Given { top_k, .. } => top_k.unwrap_or(experts),
            Gating::AdapterIds => 1,
        }
    }

    /// Validates the parameters for `experts` routed experts.
    pub fn validate(&self, experts: usize) -> Result<()> {
        match self {
            Gating::Routed { rule, .. } => rule.validate(experts),
            Gating::Given { top_k: Some(k), .. } if *k == 0 || *k > experts => {
                Err(MoleError::InvalidK { k: *k, experts })
            }
            Gating::Given { top_k: None, softmax_topk: true } => {
                Err(MoleError::Unsupported("given weights: softmax_topk needs top_k".into()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_validation_catches_each_bad_parameter() {
        let e = 8;
        let topk = |k, t| RoutingRule::SoftmaxTopK { k, temperature: t, weights: TopKWeights::Renormalized };
        assert!(topk(2, 1.0).validate(e).is_ok());
        assert_eq!(topk(9, 1.0).validate(e), Err(MoleError::InvalidK { k: 9, experts: 8 }));
        assert!(topk(0, 1.0).validate(e).is_err());
        assert!(topk(2, 0.0).validate(e).is_err());
        assert!(topk(2, f64::NAN).validate(e).is_err());
        assert!(RoutingRule::TopP { p: 0.0, temperature: 1.0 }.validate(e).is_err());
        assert!(RoutingRule::TopP { p: 1.5, temperature: 1.0 }.validate(e).is_err());
        let dm = |q, k| RoutingRule::DynMole { q, top_p: 0.5, keep_top_k: k, entropy_threshold: 0.9, entropy_eps: 0.0 };
        assert!(dm(1.1, 2).validate(e).is_ok());
        let eps = |entropy_eps| RoutingRule::DynMole {
            q: 1.1,
            top_p: 0.5,
            keep_top_k: 2,
            entropy_threshold: 0.9,
            entropy_eps,
        };
        assert!(eps(1e-5).validate(e).is_ok());
        assert!(eps(-1e-5).validate(e).is_err());
        assert!(eps(f64::NAN).validate(e).is_err());
        assert!(dm(-1.0, 2).validate(e).is_err());
        assert!(dm(1.1, 9).validate(e).is_err());
        assert!(Gating::Given { top_k: Some(9), softmax_topk: false }.validate(e).is_err());
        assert!(Gating::Given { top_k: None, softmax_topk: true }.validate(e).is_err());
    }

    #[test]
    fn json_round_trip_and_defaults() {
        let g: Gating =
            serde_json::from_str(r#"{"type":"routed","router":{"type":"x"},"rule":{"type":"softmax_topk","k":2}}"#)
                .unwrap();
        assert_eq!(
            g,
            Gating::Routed {
                router: Router::X { bias: false },
                rule: RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized }
            }
        );
        let back: Gating = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
        assert_eq!(g.slots(8), 2);
        assert_eq!(Gating::AdapterIds.slots(8), 1);
    }

    #[test]
    fn specs_written_before_the_method_options_still_parse_with_the_old_meaning() {
        let dm: RoutingRule =
            serde_json::from_str(r#"{"type":"dynmole","q":1.1,"top_p":0.75,"keep_top_k":2,"entropy_threshold":0.9}"#)
                .unwrap();
        assert_eq!(
            dm,
            RoutingRule::DynMole { q: 1.1, top_p: 0.75, keep_top_k: 2, entropy_threshold: 0.9, entropy_eps: 0.0 }
        );
        let fly: RoutingRule = serde_json::from_str(r#"{"type":"magnitude_topk","k":4,"bias":true}"#).unwrap();
        assert_eq!(fly, RoutingRule::MagnitudeTopK { k: 4, bias: true, selection: RankSelection::Magnitude });
        let signed: RoutingRule =
            serde_json::from_str(r#"{"type":"magnitude_topk","k":4,"selection":"signed"}"#).unwrap();
        assert_eq!(signed, RoutingRule::MagnitudeTopK { k: 4, bias: false, selection: RankSelection::Signed });
        assert!(serde_json::from_str::<RoutingRule>(r#"{"type":"magnitude_topk","k":4,"selection":"abs"}"#).is_err());
    }
}
