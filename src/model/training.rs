//! What training a layer involves beyond its forward: the parameters that stay frozen and the
//! router's auxiliary losses, declared in the spec ([`LayerSpec::training`]).

use super::{Gating, LayerSpec, Mix, Router, RoutingRule};
use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};

/// A trainable parameter of a layer (the inputs `x`, `logits` and `weights` always get a gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerParam {
    /// The bank's down projection `A [d_in, R]` (FlyLoRA freezes it).
    A,
    /// The bank's up projection `B [R, d_out]`.
    B,
    /// The router: `router_weight` and `router_bias`.
    Router,
    /// CoMoL's cores `[C, R, R]`.
    Cores,
}

/// Which load-balancing loss ([`crate::reference::RouterStats`] computes each):
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// `E · Σ_e f_e · P_e`, `f_e` the fraction of tokens that selected `e`, `P_e` its mean
    /// probability (Switch, Mixtral, MixLoRA, MoLA).
    #[default]
    Switch,
    /// `E · Σ_e M_e · P_e`, `M_e` the mean of `e`'s probability where selected (DynMoLE).
    #[serde(rename = "dynmole")]
    DynMole,
    /// `Σ_e f¹_e · P_e`, `f¹_e` the fraction of tokens whose first choice is `e` (LLaVA-MoLE).
    LlavaMole,
}

/// The router's auxiliary losses and their coefficients (0: off). The forward reports their
/// weighted sum (`aux_loss`); the backward adds its gradient to the router's. Each loss is a mean
/// over the call's tokens, with the selection held constant (so `f_e`, `M_e`'s mask and `f¹_e` are
/// constants, as in every framework): the gradients flow through the rule's probabilities
/// (softmax with its temperature, or SMoRA's sigmoid) and, for the z-loss, the raw scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuxLosses {
    /// Coefficient of the load-balancing loss.
    #[serde(default)]
    pub load_balancing: f64,
    /// Its form.
    #[serde(default)]
    pub balance: Balance,
    /// Coefficient of the ST-MoE z-loss, the mean of `logsumexp(z)²` over tokens.
    #[serde(default)]
    pub z_loss: f64,
    /// Coefficient of the entropy loss, the mean normalised entropy of the probabilities (the
    /// rule's own: DynMoLE's Tsallis entropy, Shannon for the other softmax rules).
    #[serde(default)]
    pub entropy: f64,
}

impl AuxLosses {
    /// Whether any coefficient is non-zero.
    pub fn any(&self) -> bool {
        self.load_balancing != 0.0 || self.z_loss != 0.0 || self.entropy != 0.0
    }
}

/// What training a layer involves: frozen parameters and auxiliary losses. The default (no
/// frozen parameter, no loss) is left out of a spec's JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// Parameters whose gradients are neither computed nor returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<LayerParam>,
    /// The router's auxiliary losses.
    #[serde(default, skip_serializing_if = "is_default")]
    pub aux_losses: AuxLosses,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Training {
    /// Whether this is the default (nothing frozen, no loss): left out of a spec's JSON.
    pub fn is_default(&self) -> bool {
        is_default(self)
    }

    /// Whether `param` is trained (not frozen).
    pub fn trains(&self, param: LayerParam) -> bool {
        !self.frozen.contains(&param)
    }

    /// Checks the declarations against the layer: each frozen parameter exists, the losses'
    /// coefficients are finite and the router has what each loss reads.
    pub(crate) fn validate(&self, spec: &LayerSpec) -> Result<()> {
        let router = spec.router();
        for &p in &self.frozen {
            let exists = match p {
                LayerParam::A | LayerParam::B => true,
                LayerParam::Router => matches!(router, Some(Router::X { .. } | Router::H { .. })),
                LayerParam::Cores => matches!(spec.mix, Mix::CoreMerge { .. }),
            };
            if !exists {
                return Err(MoleError::param("training.frozen", format!("{p:?}"), "this layer has no such parameter"));
            }
        }
        let l = self.aux_losses;
        for (name, v) in [("load_balancing", l.load_balancing), ("z_loss", l.z_loss), ("entropy", l.entropy)] {
            if !v.is_finite() {
                return Err(MoleError::param(aux_name(name), v, "must be finite"));
            }
        }
        if !l.any() {
            return Ok(());
        }
        let rule = match spec.gating {
            Gating::Routed { rule, .. } => rule,
            _ => {
                return Err(MoleError::Unsupported(
                    "training.aux_losses need a router (routed gating): given weights and adapter ids have none".into(),
                ))
            }
        };
        let no_probs = matches!(rule, RoutingRule::MagnitudeTopK { .. });
        if l.load_balancing != 0.0 && no_probs {
            return Err(MoleError::param(
                aux_name("load_balancing"),
                l.load_balancing,
                "magnitude_topk has no probabilities",
            ));
        }
        if l.z_loss != 0.0 && !rule.has_z_loss() {
            return Err(MoleError::param(aux_name("z_loss"), l.z_loss, "magnitude_topk's scores are not logits"));
        }
        if l.entropy != 0.0 && rule.entropy().is_none() {
            return Err(MoleError::param(aux_name("entropy"), l.entropy, "the rule's probabilities are not a softmax"));
        }
        Ok(())
    }
}

fn aux_name(name: &str) -> &'static str {
    match name {
        "load_balancing" => "training.aux_losses.load_balancing",
        "z_loss" => "training.aux_losses.z_loss",
        _ => "training.aux_losses.entropy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape};

    fn shape() -> MethodShape {
        MethodShape { d_in: 8, d_out: 8, experts: 4, rank: 1, k: 2, alpha: 2.0 }
    }

    #[test]
    fn the_default_is_left_out_of_the_json_and_parsed_back() {
        let spec = Method::MixLoraPerLinear.spec(shape()).unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("training"), "{json}");
        let mut trained = spec.clone();
        trained.training.frozen = vec![LayerParam::Router];
        trained.training.aux_losses = AuxLosses { load_balancing: 0.01, z_loss: 1e-3, ..Default::default() };
        let json = serde_json::to_string(&trained).unwrap();
        assert!(json.contains(r#""frozen":["router"]"#), "{json}");
        assert_eq!(serde_json::from_str::<LayerSpec>(&json).unwrap(), trained);
        assert!(serde_json::from_str::<Training>(r#"{"frozen":["bias"]}"#).is_err());
        let strict = LayerSpec::from_json;
        let base = json.trim_end_matches('}').split(r#","training""#).next().unwrap().to_string();
        let err = strict(&format!(r#"{base},"training":{{"frozen":["routr"]}}}}"#)).unwrap_err().to_string();
        assert!(err.contains("training.frozen[0]") && err.contains("did you mean `router`"), "{err}");
        let ok = strict(&format!(r#"{base},"training":{{"aux_losses":{{"balance":"dynmole","z_loss":0.001}}}}}}"#));
        assert_eq!(ok.unwrap().training.aux_losses.balance, Balance::DynMole);
        assert!(serde_json::from_str::<Training>(r#"{"aux_losses":{"z":1}}"#).is_err());
    }

    #[test]
    fn declarations_the_layer_cannot_honour_are_named() {
        let check = |method: Method, training: Training| {
            let mut spec = method.spec(shape()).unwrap();
            spec.training = training;
            spec.validate()
        };
        let frozen = |p| Training { frozen: vec![p], ..Default::default() };
        let aux = |l| Training { aux_losses: l, ..Default::default() };
        assert!(check(Method::MixLoraPerLinear, frozen(LayerParam::Router)).is_ok());
        assert!(check(Method::Comol, frozen(LayerParam::Cores)).is_ok());
        let err = check(Method::MixLoraPerLinear, frozen(LayerParam::Cores)).unwrap_err();
        assert!(matches!(err, MoleError::InvalidParameter { name: "training.frozen", .. }), "{err}");
        assert!(check(Method::AdapterServing, frozen(LayerParam::Router)).is_err());
        let z = AuxLosses { z_loss: 1e-3, ..Default::default() };
        assert!(check(Method::MixLoraPerLinear, aux(z)).is_ok());
        let err = check(Method::FlyLora, aux(z)).unwrap_err();
        assert!(matches!(err, MoleError::InvalidParameter { name: "training.aux_losses.z_loss", .. }), "{err}");
        let lb = AuxLosses { load_balancing: 0.01, ..Default::default() };
        assert!(check(Method::AdapterServing, aux(lb)).is_err());
        let nan = AuxLosses { entropy: f64::NAN, ..Default::default() };
        assert!(check(Method::DynMole, aux(nan)).is_err());
        let ent = AuxLosses { entropy: 0.1, ..Default::default() };
        assert!(check(Method::DynMole, aux(ent)).is_ok());
        assert!(check(Method::Smora, aux(ent)).is_err());
    }
}
