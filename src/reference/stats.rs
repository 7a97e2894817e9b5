//! Router statistics for auxiliary losses, computed from the same routing pass, and the
//! load-balancing losses of the methods that use them.

use super::routing::{logsumexp, normalized_entropy, Routing};
use crate::model::Method;
use crate::model::Entropy;
use serde::{Deserialize, Serialize};

/// What training needs for auxiliary losses, without a second pass over the router.
///
/// Each method's load-balancing loss reads different quantities (see the `*_loss` methods):
/// MixLoRA / Switch / Mixtral `E · Σ_e selected_fraction[e] · mean_prob[e]`, DynMoLE
/// `E · Σ_e masked_mean_prob[e] · mean_prob[e]`, LLaVA-MoLE `Σ_e top1_fraction[e] · mean_prob[e]`.
/// The ST-MoE z-loss is `z_loss`, and DynMoLE's entropy loss is `entropy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterStats {
    /// Fraction of tokens that selected each expert (any non-empty slot), `[E]`; sums to the mean
    /// number of experts per token.
    pub selected_fraction: Vec<f64>,
    /// Fraction of tokens whose first slot (the highest-scoring selection) is each expert, `[E]`.
    #[serde(default)]
    pub top1_fraction: Vec<f64>,
    /// Mean over tokens of each expert's probability (softmax, sigmoid or given weight), `[E]`.
    pub mean_prob: Option<Vec<f64>>,
    /// Mean over tokens of each expert's probability where the token selected it, 0 elsewhere
    /// (`p ⊙ mask`), `[E]`.
    #[serde(default)]
    pub masked_mean_prob: Option<Vec<f64>>,
    /// Mean over tokens of `logsumexp(z)^2` on the raw scores; fully masked tokens add 0.
    pub z_loss: Option<f64>,
    /// Mean over tokens of the normalised entropy of the softmax probabilities: the rule's own
    /// for DynMoLE (`q`, `entropy_eps`), Shannon for the other softmax rules.
    pub entropy: Option<f64>,
}

/// `scale · Σ_e a[e] · b[e]`.
fn weighted_dot(a: &[f64], b: &[f64], scale: f64) -> f64 {
    scale * a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>()
}

impl RouterStats {
    /// `method`'s load-balancing loss from these statistics of one call, the form its
    /// code computes (before its coefficient): MixLoRA (static and dynamic) the Switch form,
    /// DynMoLE its masked-probability form, LLaVA-MoLE its top-1 form (see the `*_load_balancing_loss` methods).
    /// `None` for methods whose code has no such loss, or without probabilities.
    pub fn load_balancing_loss(&self, method: Method) -> Option<f64> {
        match method {
            Method::MixLoraPerLinear | Method::MixLoraDynamicPerLinear => self.switch_load_balancing_loss(),
            Method::DynMole => self.dynmole_load_balancing_loss(),
            Method::LlavaMoleSparse | Method::LlavaMoleDense => self.llava_mole_load_balancing_loss(),
            _ => None,
        }
    }

    /// MixLoRA's, MoLA's and MixLoRA dynamic's load-balancing loss (the Switch / Mixtral form):
    /// `E · Σ_e selected_fraction[e] · mean_prob[e]`. `None` without probabilities.
    pub fn switch_load_balancing_loss(&self) -> Option<f64> {
        let e = self.selected_fraction.len() as f64;
        self.mean_prob.as_ref().map(|p| weighted_dot(&self.selected_fraction, p, e))
    }

    /// DynMoLE's load-balancing loss: `E · Σ_e masked_mean_prob[e] · mean_prob[e]` (its
    /// "tokens per expert" is the mean of the masked probabilities). `None` without
    /// probabilities.
    pub fn dynmole_load_balancing_loss(&self) -> Option<f64> {
        let e = self.selected_fraction.len() as f64;
        let masked = self.masked_mean_prob.as_ref()?;
        self.mean_prob.as_ref().map(|p| weighted_dot(masked, p, e))
    }

    /// LLaVA-MoLE's load-balancing loss: `Σ_e top1_fraction[e] · mean_prob[e]`, with no `E`
    /// factor, in sparse and dense mode alike. `None` without probabilities.
    pub fn llava_mole_load_balancing_loss(&self) -> Option<f64> {
        self.mean_prob.as_ref().map(|p| weighted_dot(&self.top1_fraction, p, 1.0))
    }
}

/// FlyLoRA's load-balancing update of the selection bias, applied by the caller between calls
/// (the kernels only read `selection_bias`): `bias[i] += rate · sign(mean(c) - c[i])` with `c`
/// the per-rank selection counts of the call, as the paper's PEFT-based code does after every
/// forward (`sign(0) = 0`). The counts are recovered from the selected fractions of
/// [`RouterStats`] over `tokens` tokens (`c = round(fraction · tokens)`) and compared in integers,
/// so a rank exactly at the mean load is left alone whatever the rounding of the fractions.
pub fn flylora_bias_update(bias: &mut [f64], selected_fraction: &[f64], tokens: usize, rate: f64) {
    let counts: Vec<u128> = selected_fraction.iter().map(|f| (f * tokens as f64).round().max(0.0) as u128).collect();
    let (n, total) = (counts.len() as u128, counts.iter().sum::<u128>());
    for (b, &c) in bias.iter_mut().zip(&counts) {
        // sign(mean - c) = sign(total - n·c), exactly.
        *b += rate
            * match total.cmp(&(n * c)) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Less => -1.0,
                std::cmp::Ordering::Equal => 0.0,
            };
    }
}

/// Computes the statistics. `scores` are the raw router scores when the rule has them,
/// `entropy` is `Some` for rules whose probabilities are a softmax distribution.
pub fn router_stats(routing: &Routing, scores: Option<&[f64]>, entropy: Option<Entropy>) -> RouterStats {
    let (t, e, slots) = (routing.tokens, routing.experts, routing.slots);
    // Means over zero tokens are defined as 0 (a no-op call reports zeros, not NaN).
    let inv_t = if t == 0 { 0.0 } else { 1.0 / t as f64 };
    let mut selected_fraction = vec![0.0; e];
    for &id in routing.ids.iter().filter(|&&id| id >= 0) {
        selected_fraction[id as usize] += inv_t;
    }
    let mut top1_fraction = vec![0.0; e];
    for &id in routing.ids.iter().step_by(slots.max(1)).filter(|&&id| id >= 0) {
        top1_fraction[id as usize] += inv_t;
    }
    let mean_prob = routing.probs.as_ref().map(|p| {
        let mut m = vec![0.0; e];
        for row in p.chunks(e) {
            for (acc, v) in m.iter_mut().zip(row) {
                *acc += v * inv_t;
            }
        }
        m
    });
    let masked_mean_prob = routing.probs.as_ref().map(|p| {
        let mut m = vec![0.0; e];
        for (row, ids) in p.chunks(e).zip(routing.ids.chunks(slots.max(1))) {
            for (x, acc) in m.iter_mut().enumerate() {
                if ids.contains(&(x as i32)) {
                    *acc += row[x] * inv_t;
                }
            }
        }
        m
    });
    let z_loss = scores.map(|z| {
        z.chunks(e.max(1))
            .map(logsumexp)
            .map(|l| if l.is_finite() || l == f64::INFINITY { l * l } else { 0.0 })
            .sum::<f64>()
            * inv_t
    });
    let entropy = match (entropy, routing.probs.as_ref()) {
        (Some(h), Some(p)) => Some(p.chunks(e).map(|row| normalized_entropy(row, h)).sum::<f64>() * inv_t),
        (Some(_), None) => Some(0.0),
        _ => None,
    };
    RouterStats { selected_fraction, top1_fraction, mean_prob, masked_mean_prob, z_loss, entropy }
}
