//! Router statistics for auxiliary losses, computed from the same routing pass.

use super::routing::{logsumexp, normalized_tsallis_entropy, Routing};
use serde::{Deserialize, Serialize};

/// What training needs for auxiliary losses, without a second pass over the router.
///
/// With `E` experts, the Switch/Mixtral load-balancing loss is
/// `E · Σ_e selected_fraction[e] · mean_prob[e]`, the ST-MoE z-loss is `z_loss`, and DynMoLE's
/// entropy loss is `entropy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterStats {
    /// Fraction of tokens that selected each expert (any non-empty slot), `[E]`; sums to the mean
    /// number of experts per token.
    pub selected_fraction: Vec<f64>,
    /// Mean over tokens of each expert's probability (softmax, sigmoid or given weight), `[E]`.
    pub mean_prob: Option<Vec<f64>>,
    /// Mean over tokens of `logsumexp(z)^2` on the raw scores; fully masked tokens add 0.
    pub z_loss: Option<f64>,
    /// Mean over tokens of the normalised Tsallis entropy of the softmax probabilities, with the
    /// rule's `q` for DynMoLE and `q = 1` (Shannon) for the other softmax rules.
    pub entropy: Option<f64>,
}

/// Computes the statistics. `scores` are the raw router scores when the rule has them,
/// `entropy_q` is `Some(q)` for rules whose probabilities are a softmax distribution.
pub fn router_stats(routing: &Routing, scores: Option<&[f64]>, entropy_q: Option<f64>) -> RouterStats {
    let (t, e) = (routing.tokens, routing.experts);
    // Means over zero tokens are defined as 0 (a no-op call reports zeros, not NaN).
    let inv_t = if t == 0 { 0.0 } else { 1.0 / t as f64 };
    let mut selected_fraction = vec![0.0; e];
    for &id in routing.ids.iter().filter(|&&id| id >= 0) {
        selected_fraction[id as usize] += inv_t;
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
    let z_loss = scores.map(|z| {
        z.chunks(e.max(1))
            .map(logsumexp)
            .map(|l| if l.is_finite() || l == f64::INFINITY { l * l } else { 0.0 })
            .sum::<f64>()
            * inv_t
    });
    let entropy = match (entropy_q, routing.probs.as_ref()) {
        (Some(q), Some(p)) => Some(p.chunks(e).map(|row| normalized_tsallis_entropy(row, q)).sum::<f64>() * inv_t),
        (Some(_), None) => Some(0.0),
        _ => None,
    };
    RouterStats { selected_fraction, mean_prob, z_loss, entropy }
}
