//! Routing rules in f64, one short function per rule, following the contract in
//! [`crate::model::RoutingRule`]: slots in descending score order, ties to the lower index,
//! NaN as `-inf`, empty slots `(-1, 0)`.

use crate::limits::check_len;
use crate::model::{Entropy, Gating, RankSelection, RoutingRule, TopKWeights};
use crate::plan::EMPTY_SLOT;
use crate::{MoleError, Result};
use rayon::prelude::*;

/// Per-token routing: `ids [T, slots]` (`-1` = empty) and `weights [T, slots]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Number of tokens.
    pub tokens: usize,
    /// Slots per token.
    pub slots: usize,
    /// Number of routed experts.
    pub experts: usize,
    /// Selected expert per slot, `-1` when empty.
    pub ids: Vec<i32>,
    /// Weight per slot (0 when empty).
    pub weights: Vec<f64>,
    /// The probabilities the rule computed, `[T, E]` (softmax, sigmoid or given weights), for
    /// router statistics; `None` where the rule has none (magnitude top-k, adapter ids).
    pub probs: Option<Vec<f64>>,
}

/// NaN ranks as `-inf`; `-0.0` equals `0.0`.
fn order_key(v: f64) -> f64 {
    if v.is_nan() {
        f64::NEG_INFINITY
    } else {
        v + 0.0
    }
}

/// Indices sorted by descending score, ties toward the lower index (a stable sort).
pub fn descending_order(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| order_key(scores[b]).total_cmp(&order_key(scores[a])));
    idx
}

/// `softmax(z / t)`; NaN as `-inf`; `+inf` entries share probability 1; no finite maximum
/// (all `-inf`/NaN) gives all zeros.
pub fn softmax(z: &[f64], t: f64) -> Vec<f64> {
    let s: Vec<f64> = z.iter().map(|&v| order_key(v) / t).collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return vec![0.0; z.len()];
    }
    if m == f64::INFINITY {
        let n = s.iter().filter(|&&v| v == f64::INFINITY).count() as f64;
        return s.iter().map(|&v| if v == f64::INFINITY { 1.0 / n } else { 0.0 }).collect();
    }
    let e: Vec<f64> = s.iter().map(|&v| (v - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// `log Σ exp(z)` with NaN as `-inf` (so `-inf` when every entry is masked).
pub fn logsumexp(z: &[f64]) -> f64 {
    let m = z.iter().map(|&v| order_key(v)).fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + z.iter().map(|&v| (order_key(v) - m).exp()).sum::<f64>().ln()
}

/// `S_q(p) / S_q(uniform over n)`: Tsallis entropy normalised to `[0, 1]`; `q = 1` is Shannon.
/// Zero for `n <= 1` and for an all-zero `p` (a fully masked token).
pub fn normalized_tsallis_entropy(p: &[f64], q: f64) -> f64 {
    normalized_entropy(p, Entropy { q, eps: 0.0 })
}

/// [`Entropy`] of `p`: `S_q(p + eps) / S_q(uniform over n)` (DynMoLE's definition), clamped to
/// `[0, 1]`. Zero for `n <= 1` and for an all-zero `p` (a fully masked token).
pub fn normalized_entropy(p: &[f64], entropy: Entropy) -> f64 {
    let Entropy { q, eps } = entropy;
    let n = p.len() as f64;
    if p.len() <= 1 || p.iter().all(|&v| v == 0.0) {
        return 0.0;
    }
    let ratio = if (q - 1.0).abs() < 1e-12 {
        let h: f64 = p.iter().map(|&v| v + eps).filter(|&v| v > 0.0).map(|v| -v * v.ln()).sum();
        h / n.ln()
    } else {
        // S_q = (1 - Σ p^q) / (q - 1); the (q - 1) cancels in the ratio.
        (1.0 - p.iter().map(|&v| (v + eps).powf(q)).sum::<f64>()) / (1.0 - n.powf(1.0 - q))
    };
    ratio.clamp(0.0, 1.0)
}

/// `1 / (1 + e^-z)` with NaN as `-inf` (so 0).
pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-order_key(z)).exp())
}

/// One token's selection: `(expert, weight)` in slot order.
type Selection = Vec<(usize, f64)>;

/// Softmax top-k (MixLoRA, MoLA, MeteoRA, FlexOlmo, LLaVA-MoLE sparse).
pub fn softmax_topk(z: &[f64], k: usize, temperature: f64, weights: TopKWeights) -> (Selection, Vec<f64>) {
    let p = softmax(z, temperature);
    let top: Vec<usize> = descending_order(z).into_iter().take(k).collect();
    let sum: f64 = top.iter().map(|&e| p[e]).sum();
    let weight = |e: usize| match weights {
        TopKWeights::Softmax => p[e],
        TopKWeights::Renormalized if sum > 0.0 => p[e] / sum,
        TopKWeights::Renormalized => 0.0,
        TopKWeights::Unit => 1.0,
    };
    (top.iter().map(|&e| (e, weight(e))).collect(), p)
}

/// Top-p (MixLoRA dynamic): up to and including the first expert whose cumulative `p` exceeds
/// `p_threshold`; raw `p` weights. `p_threshold >= 1` keeps every expert (a running sum may
/// round past 1 before the last one).
pub fn top_p(z: &[f64], p_threshold: f64, temperature: f64) -> (Selection, Vec<f64>) {
    let p = softmax(z, temperature);
    let mut cum = 0.0;
    let mut sel = Vec::new();
    for e in descending_order(z) {
        sel.push((e, p[e]));
        cum += p[e];
        if cum > p_threshold && p_threshold < 1.0 {
            break;
        }
    }
    (sel, p)
}

/// DynMoLE: all experts when the [`normalized_entropy`] exceeds the threshold, else those with
/// cumulative `p <= top_p` (every expert for `top_p >= 1`) or position `< keep_top_k`; weights `p`.
pub fn dynmole(
    z: &[f64],
    entropy: Entropy,
    top_p: f64,
    keep_top_k: usize,
    entropy_threshold: f64,
) -> (Selection, Vec<f64>) {
    let p = softmax(z, 1.0);
    let all = normalized_entropy(&p, entropy) > entropy_threshold || top_p >= 1.0;
    let mut cum = 0.0;
    let mut sel = Vec::new();
    for (pos, e) in descending_order(z).into_iter().enumerate() {
        cum += p[e];
        if all || cum <= top_p || pos < keep_top_k {
            sel.push((e, p[e]));
        }
    }
    (sel, p)
}

/// Dense softmax (LoRAMoE, HydraLoRA, LLaVA-MoLE dense): every expert, weight `p`.
pub fn dense_softmax(z: &[f64], temperature: f64) -> (Selection, Vec<f64>) {
    let p = softmax(z, temperature);
    (descending_order(z).into_iter().map(|e| (e, p[e])).collect(), p)
}

/// SMoRA: `s = sigmoid(z)`, the k largest `s + bias` selected, `w = k · s / Σ_selected s`.
pub fn sigmoid_topk(z: &[f64], k: usize, bias: Option<&[f64]>) -> (Selection, Vec<f64>) {
    let s: Vec<f64> = z.iter().map(|&v| sigmoid(v)).collect();
    let biased: Vec<f64> = s.iter().enumerate().map(|(e, &v)| v + bias.map_or(0.0, |b| b[e])).collect();
    let top: Vec<usize> = descending_order(&biased).into_iter().take(k).collect();
    let sum: f64 = top.iter().map(|&e| s[e]).sum();
    let sel = top.iter().map(|&e| (e, if sum > 0.0 { k as f64 * s[e] / sum } else { 0.0 })).collect();
    (sel, s)
}

/// FlyLoRA: the k largest `|z + bias|` (or `z + bias`, signed), weight 1.
pub fn magnitude_topk(z: &[f64], k: usize, bias: Option<&[f64]>, selection: RankSelection) -> Selection {
    let key = |v: f64| match selection {
        RankSelection::Magnitude => v.abs(),
        RankSelection::Signed => v,
    };
    let score: Vec<f64> = z.iter().enumerate().map(|(e, &v)| key(v + bias.map_or(0.0, |b| b[e]))).collect();
    descending_order(&score).into_iter().take(k).map(|e| (e, 1.0)).collect()
}

/// X-LoRA given scalings: all experts, or the `top_k` largest (optionally softmaxed).
pub fn given(w: &[f64], top_k: Option<usize>, softmax_topk: bool) -> Selection {
    let order = descending_order(w);
    let kept: Vec<usize> = order.into_iter().take(top_k.unwrap_or(w.len())).collect();
    if softmax_topk {
        let vals: Vec<f64> = kept.iter().map(|&e| w[e]).collect();
        kept.iter().copied().zip(softmax(&vals, 1.0)).collect()
    } else {
        kept.iter().map(|&e| (e, w[e])).collect()
    }
}

/// Applies a rule to one token's scores.
pub fn route_token(rule: &RoutingRule, z: &[f64], bias: Option<&[f64]>) -> (Selection, Option<Vec<f64>>) {
    match *rule {
        RoutingRule::SoftmaxTopK { k, temperature, weights } => {
            let (s, p) = softmax_topk(z, k, temperature, weights);
            (s, Some(p))
        }
        RoutingRule::TopP { p, temperature } => {
            let (s, p) = top_p(z, p, temperature);
            (s, Some(p))
        }
        RoutingRule::DynMole { q, top_p, keep_top_k, entropy_threshold, entropy_eps } => {
            let (s, p) = dynmole(z, Entropy { q, eps: entropy_eps }, top_p, keep_top_k, entropy_threshold);
            (s, Some(p))
        }
        RoutingRule::DenseSoftmax { temperature } => {
            let (s, p) = dense_softmax(z, temperature);
            (s, Some(p))
        }
        RoutingRule::SigmoidTopK { k, .. } => {
            let (s, p) = sigmoid_topk(z, k, bias);
            (s, Some(p))
        }
        RoutingRule::MagnitudeTopK { k, selection, .. } => (magnitude_topk(z, k, bias, selection), None),
    }
}

/// The per-token input of gating: scores, given weights or adapter ids.
pub enum GateInput<'a> {
    /// Router scores `z [T, E]` and the optional selection bias `[E]`.
    Scores(&'a [f64], Option<&'a [f64]>),
    /// Given weights `[T, E]`.
    Weights(&'a [f64]),
    /// Adapter ids `[T]`.
    AdapterIds(&'a [i32]),
}

/// Checks that `input` is the kind `gating` reads, with `tokens x experts` values (and a bias of
/// `experts`, adapter ids in `-1..experts`).
fn check_gate_input(gating: &Gating, input: &GateInput<'_>, tokens: usize, experts: usize) -> Result<()> {
    match (gating, input) {
        (Gating::Routed { .. }, GateInput::Scores(z, bias)) => {
            check_len("scores", z, &[tokens, experts])?;
            bias.map_or(Ok(()), |b| check_len("selection_bias", b, &[experts]))
        }
        (Gating::Given { .. }, GateInput::Weights(w)) => check_len("weights", w, &[tokens, experts]),
        (Gating::AdapterIds, GateInput::AdapterIds(ids)) => {
            check_len("adapter_ids", ids, &[tokens])?;
            match ids.iter().enumerate().find(|(_, &id)| id < -1 || id as i64 >= experts as i64) {
                Some((token, &id)) => Err(MoleError::ExpertIdOutOfRange { token, slot: 0, id: id as i64, experts }),
                None => Ok(()),
            }
        }
        _ => Err(MoleError::Unsupported(format!("{gating:?} cannot route this kind of input"))),
    }
}

/// Routes every token (in parallel) under `gating`, `experts` routed experts. Validates the
/// input against the gating first (kind, lengths, adapter ids).
pub fn route(gating: &Gating, input: GateInput<'_>, tokens: usize, experts: usize) -> Result<Routing> {
    check_gate_input(gating, &input, tokens, experts)?;
    let slots = gating.slots(experts);
    let per_token: Vec<(Selection, Option<Vec<f64>>)> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            let row = |m: &[f64]| m[t * experts..(t + 1) * experts].to_vec();
            match (gating, &input) {
                (Gating::Routed { rule, .. }, GateInput::Scores(z, bias)) => route_token(rule, &row(z), *bias),
                (Gating::Given { top_k, softmax_topk }, GateInput::Weights(w)) => {
                    (given(&row(w), *top_k, *softmax_topk), Some(row(w)))
                }
                (_, GateInput::AdapterIds(ids)) if ids[t] == EMPTY_SLOT => (vec![], None),
                (_, GateInput::AdapterIds(ids)) => (vec![(ids[t] as usize, 1.0)], None),
                // Unreachable: check_gate_input matched the input to the gating.
                _ => (vec![], None),
            }
        })
        .collect();
    let mut ids = vec![EMPTY_SLOT; tokens * slots];
    let mut weights = vec![0.0; tokens * slots];
    // Known from the gating, so that zero tokens still report (empty) probabilities.
    let has_probs = match gating {
        Gating::Routed { rule, .. } => !matches!(rule, RoutingRule::MagnitudeTopK { .. }),
        Gating::Given { .. } => true,
        Gating::AdapterIds => false,
    };
    let mut probs = has_probs.then(|| Vec::with_capacity(tokens * experts));
    for (t, (sel, p)) in per_token.into_iter().enumerate() {
        for (s, (e, w)) in sel.into_iter().enumerate() {
            ids[t * slots + s] = e as i32;
            weights[t * slots + s] = w;
        }
        if let (Some(all), Some(p)) = (probs.as_mut(), p) {
            all.extend(p);
        }
    }
    Ok(Routing { tokens, slots, experts, ids, weights, probs })
}
