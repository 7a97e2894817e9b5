//! The f64 reference backward of one layer: the gradients of the loss `Σ dy · y + aux_loss`
//! with respect to every differentiable input of one layer call, for a training framework and the
//! backward kernels to check against.
//!
//! The forward is `h = x · A`, scores `z` from the router, weights `w(z)` of the selected
//! experts, the mix (`h'[t, cols(e)] = w_e · h[t, cols(e)]`, or CoMoL's
//! `h'[t] = h[t] · Σ_c w_c · C_c`), the per-expert scales `s_e`, `y = y0 + scale · h' · B`. The
//! selection (top-k, top-p, DynMoLE's entropy switch and threshold, SMoRA's biased selection,
//! FlyLoRA's magnitude selection, adapter ids) is a constant of the backward, as in every
//! framework: gradients flow only through the weights of the selected experts, each rule's
//! weights differentiated exactly as [`super::routing`] computes them, and through the rule's
//! probabilities for the auxiliary losses ([`crate::model::AuxLosses`]). The selection bias only
//! steers the selection, so it has no gradient; the gradient of the base output `y0` is `dy`
//! itself and is not returned; frozen parameters ([`crate::model::Training::frozen`]) get none.

use super::layer::{forward, host_bytes, LayerOutput};
use super::linalg::{matmul, transpose};
use super::routing::{logsumexp, sigmoid, softmax, Routing};
use super::stats::RouterStats;
use crate::dtype::{to_f64_vec, Scalar};
use crate::limits::check_len;
use crate::model::{
    AuxLosses, Balance, Entropy, Gating, LayerInputs, LayerParam, LayerSpec, Mix, Router, RoutingRule, TopKWeights,
};
use crate::{MoleError, Result};

/// The gradients of one layer call, in f64, each shaped like its input. An optional gradient is
/// present exactly when the spec takes that input and does not freeze it
/// ([`crate::model::Training::frozen`]); it is zero where the input does not reach the loss (a
/// router whose rule weighs every selected expert 1, as LLaVA-MoLE's sparse top-1, and no
/// auxiliary loss).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGrads {
    /// `dL/dx [T, d_in]`: through the shrink and, for the x router, through the router.
    pub x: Vec<f64>,
    /// `dL/dA [d_in, R]`: through the mix and, for the h and low-rank routers, through the router.
    pub a: Option<Vec<f64>>,
    /// `dL/dB [R, d_out]`.
    pub b: Option<Vec<f64>>,
    /// `dL/d router_weight` (`[d_in, E]` or `[R, E]`) for the x and h routers.
    pub router_weight: Option<Vec<f64>>,
    /// `dL/d router_bias [E]` for a router with bias.
    pub router_bias: Option<Vec<f64>>,
    /// `dL/d logits [T, E]` for the logits router.
    pub logits: Option<Vec<f64>>,
    /// `dL/d weights [T, E]` for given gating (zero for the weights not kept).
    pub weights: Option<Vec<f64>>,
    /// `dL/d cores [C, R, R]` for the core-merge mix (CoMoL).
    pub cores: Option<Vec<f64>>,
}

/// The f64 reference backward of one layer: the gradients of
/// `L = Σ dy · y + aux_loss` (`dy [T, d_out]`, `aux_loss` the weighted auxiliary losses of
/// [`crate::model::AuxLosses`], as [`forward`] reports it) with respect to `x`, the trained
/// parameters and the gating inputs the spec takes, with the routing selection held constant
/// (see the module documentation).
///
/// Errors: every error of [`forward`], `dy` not of `[T, d_out]`, and the host memory check.
pub fn backward<T: Scalar>(spec: &LayerSpec, inputs: &LayerInputs<'_, T>, dy: &[T]) -> Result<LayerGrads> {
    inputs.validate(spec)?;
    let (t, d_in, d_out, r, e) = (inputs.tokens, spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
    check_len("dy", dy, &[t, d_out])?;
    // The forward's buffers plus as many again for the gradients.
    let need = host_bytes(spec, t)?.saturating_mul(2);
    crate::limits::check_host(&format!("the f64 reference backward of this layer on {t} tokens"), need)?;
    let out = forward(spec, inputs)?;
    let dy = to_f64_vec(dy);
    let x = to_f64_vec(inputs.x);
    let trains = |p: LayerParam| spec.training.trains(p);

    // Expand: y = y0 + scale · h_mixed · B, h_mixed = mix(h) with expert e's columns times s_e.
    let scaled = |v: Vec<f64>| v.into_iter().map(|g| spec.scale * g).collect::<Vec<_>>();
    let mut g = scaled(matmul(&dy, &transpose(&to_f64_vec(inputs.b), r, d_out), t, d_out, r));
    let db = trains(LayerParam::B).then(|| scaled(matmul(&transpose(&out.h_mixed, t, r), &dy, r, t, d_out)));
    for ex in 0..spec.ranks.num_experts() {
        let s = spec.expert_scale(ex);
        g.chunks_mut(r.max(1)).for_each(|row| row[spec.ranks.cols(ex)].iter_mut().for_each(|v| *v *= s));
    }

    // Mix: g = dL/d mix(h); dh and dw = dL/dw[t, e] summed over e's slots.
    let routing = &out.routing;
    let mut w = vec![0.0; t * e];
    for (slot, &id) in routing.ids.iter().enumerate() {
        if id >= 0 {
            w[slot / routing.slots * e + id as usize] += routing.weights[slot];
        }
    }
    let mut dh = vec![0.0; t * r];
    let mut dw = vec![0.0; t * e];
    let mut dcores = None;
    match spec.mix {
        // h'[t, cols(e)] = w_e · h[t, cols(e)].
        Mix::ExpertScale => {
            for tok in 0..t {
                for ex in 0..e {
                    for c in spec.ranks.cols(ex) {
                        dh[tok * r + c] = w[tok * e + ex] * g[tok * r + c];
                        dw[tok * e + ex] += out.h[tok * r + c] * g[tok * r + c];
                    }
                }
            }
        }
        // h'[t] = h[t] · Σ_c w_c · C_c.
        Mix::CoreMerge { .. } => {
            let cores = to_f64_vec(inputs.cores.unwrap_or_default());
            let core = |c: usize| &cores[c * r * r..(c + 1) * r * r];
            let mut dc = vec![0.0; e * r * r];
            for tok in 0..t {
                let (h_t, g_t) = (&out.h[tok * r..(tok + 1) * r], &g[tok * r..(tok + 1) * r]);
                for c in selected(routing, tok) {
                    let (wc, cc) = (w[tok * e + c], core(c));
                    for i in 0..r {
                        let row = &cc[i * r..(i + 1) * r];
                        dh[tok * r + i] += wc * row.iter().zip(g_t).map(|(m, g)| m * g).sum::<f64>();
                        dw[tok * e + c] += h_t[i] * row.iter().zip(g_t).map(|(m, g)| m * g).sum::<f64>();
                        dc[c * r * r + i * r..c * r * r + (i + 1) * r]
                            .iter_mut()
                            .zip(g_t)
                            .for_each(|(d, g)| *d += wc * h_t[i] * g);
                    }
                }
            }
            dcores = trains(LayerParam::Cores).then_some(dc);
        }
    }

    // Gating: the weights' gradient (and the auxiliary losses') to the scores, or to the given weights.
    let mut grads = LayerGrads {
        x: vec![],
        a: None,
        b: db,
        router_weight: None,
        router_bias: None,
        logits: None,
        weights: None,
        cores: dcores,
    };
    let router_trained = trains(LayerParam::Router);
    match spec.gating {
        Gating::Routed { router, rule } => {
            let z = out.scores.as_deref().ok_or_else(|| MoleError::Unsupported("a routed gating without scores".into()))?;
            let aux = AuxGrad::new(spec, &out);
            let mut dz = vec![0.0; t * e];
            for tok in 0..t {
                let row = tok * e..(tok + 1) * e;
                let sel = selected(routing, tok);
                dz[row.clone()].copy_from_slice(&score_grad(rule, &z[row.clone()], &sel, &dw[row], &aux));
            }
            match router {
                Router::X { bias } => {
                    let wg = to_f64_vec(inputs.router_weight.unwrap_or_default());
                    if router_trained {
                        grads.router_weight = Some(matmul(&transpose(&x, t, d_in), &dz, d_in, t, e));
                        grads.router_bias = bias.then(|| column_sums(&dz, e));
                    }
                    grads.x = matmul(&dz, &transpose(&wg, d_in, e), t, e, d_in);
                }
                Router::H { bias } => {
                    let wr = to_f64_vec(inputs.router_weight.unwrap_or_default());
                    if router_trained {
                        grads.router_weight = Some(matmul(&transpose(&out.h, t, r), &dz, r, t, e));
                        grads.router_bias = bias.then(|| column_sums(&dz, e));
                    }
                    let dh_router = matmul(&dz, &transpose(&wr, r, e), t, e, r);
                    dh.iter_mut().zip(dh_router).for_each(|(d, g)| *d += g);
                }
                // z = h: every expert is one rank column (checked by the spec), expert e column e.
                Router::LowRank => dh.iter_mut().zip(&dz).for_each(|(d, g)| *d += g),
                Router::Logits => grads.logits = Some(dz),
            }
        }
        Gating::Given { softmax_topk, .. } => {
            let mut dg = vec![0.0; t * e];
            for tok in 0..t {
                let sel = selected(routing, tok);
                let row = |m: &[f64], ex: usize| m[tok * e + ex];
                // With softmax_topk the kept weights are the softmax of the kept values.
                let dot: f64 = sel.iter().map(|&ex| row(&w, ex) * row(&dw, ex)).sum();
                for &ex in &sel {
                    dg[tok * e + ex] =
                        if softmax_topk { row(&w, ex) * (row(&dw, ex) - dot) } else { row(&dw, ex) };
                }
            }
            grads.weights = Some(dg);
        }
        Gating::AdapterIds => {}
    }

    // Shrink: h = x · A.
    grads.a = trains(LayerParam::A).then(|| matmul(&transpose(&x, t, d_in), &dh, d_in, t, r));
    let dx_shrink = matmul(&dh, &transpose(&to_f64_vec(inputs.a), d_in, r), t, r, d_in);
    if grads.x.is_empty() {
        grads.x = dx_shrink;
    } else {
        grads.x.iter_mut().zip(dx_shrink).for_each(|(d, g)| *d += g);
    }
    Ok(grads)
}

/// The experts token `tok` selected.
fn selected(routing: &Routing, tok: usize) -> Vec<usize> {
    let row = &routing.ids[tok * routing.slots..(tok + 1) * routing.slots];
    row.iter().filter(|&&id| id >= 0).map(|&id| id as usize).collect()
}

/// `Σ_t m[t, :]` of `m [T, n]`.
fn column_sums(m: &[f64], n: usize) -> Vec<f64> {
    let mut sums = vec![0.0; n];
    for row in m.chunks(n) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    sums
}

/// The auxiliary losses' per-token gradients, from the call's statistics (each a mean over the
/// `T` tokens, the selection held constant).
struct AuxGrad {
    coefs: AuxLosses,
    inv_t: f64,
    experts: f64,
    stats: RouterStats,
    entropy: Option<Entropy>,
}

impl AuxGrad {
    fn new(spec: &LayerSpec, out: &LayerOutput) -> Self {
        let t = out.routing.tokens;
        AuxGrad {
            coefs: spec.training.aux_losses,
            inv_t: if t == 0 { 0.0 } else { 1.0 / t as f64 },
            experts: spec.routed_experts() as f64,
            stats: out.stats.clone(),
            entropy: spec.rule().and_then(|r| r.entropy()),
        }
    }

    /// `dL_aux/dp` of one token's probabilities `p` (selected experts `sel`).
    fn prob_grad(&self, p: &[f64], sel: &[usize]) -> Vec<f64> {
        let c = self.coefs;
        let mut dp = vec![0.0; p.len()];
        if c.load_balancing != 0.0 {
            let s = &self.stats;
            let mean = s.mean_prob.as_deref().unwrap_or_default();
            for (j, d) in dp.iter_mut().enumerate() {
                *d += c.load_balancing
                    * self.inv_t
                    * match c.balance {
                        Balance::Switch => self.experts * s.selected_fraction[j],
                        Balance::DynMole => {
                            let masked = s.masked_mean_prob.as_deref().unwrap_or_default();
                            self.experts * (masked[j] + if sel.contains(&j) { mean[j] } else { 0.0 })
                        }
                        Balance::LlavaMole => s.top1_fraction[j],
                    };
            }
        }
        if let (true, Some(h)) = (c.entropy != 0.0, self.entropy) {
            entropy_grad(p, h).iter().zip(dp.iter_mut()).for_each(|(g, d)| *d += c.entropy * self.inv_t * g);
        }
        dp
    }

    /// `dL_aux/dz` of the z-loss on one token's raw scores: `2 · lse(z) · softmax(z) / T`.
    fn z_grad(&self, z: &[f64]) -> Option<Vec<f64>> {
        if self.coefs.z_loss == 0.0 {
            return None;
        }
        let lse = logsumexp(z);
        let scale = if lse.is_finite() { 2.0 * lse * self.coefs.z_loss * self.inv_t } else { 0.0 };
        Some(softmax(z, 1.0).into_iter().map(|p| scale * p).collect())
    }
}

/// `d/dp` of the normalised entropy [`normalized_entropy`] (0 where it is clamped, for a
/// fully masked token, or one expert).
fn entropy_grad(p: &[f64], h: Entropy) -> Vec<f64> {
    let n = p.len() as f64;
    let raw = normalized_entropy_unclamped(p, h);
    if p.len() <= 1 || p.iter().all(|&v| v == 0.0) || !(0.0..=1.0).contains(&raw) {
        return vec![0.0; p.len()];
    }
    if (h.q - 1.0).abs() < 1e-12 {
        p.iter().map(|&v| if v + h.eps > 0.0 { -((v + h.eps).ln() + 1.0) / n.ln() } else { 0.0 }).collect()
    } else {
        p.iter().map(|&v| -h.q * (v + h.eps).powf(h.q - 1.0) / (1.0 - n.powf(1.0 - h.q))).collect()
    }
}

/// [`normalized_entropy`] before its clamp to `[0, 1]` (for the clamp's zero gradient).
fn normalized_entropy_unclamped(p: &[f64], h: Entropy) -> f64 {
    let n = p.len() as f64;
    if (h.q - 1.0).abs() < 1e-12 {
        p.iter().map(|&v| v + h.eps).filter(|&v| v > 0.0).map(|v| -v * v.ln()).sum::<f64>() / n.ln()
    } else {
        (1.0 - p.iter().map(|&v| (v + h.eps).powf(h.q)).sum::<f64>()) / (1.0 - n.powf(1.0 - h.q))
    }
}

/// `dL/dz` of one token's scores `z [E]` under `rule`, given `g = dL/dw` (read at the `selected`
/// experts only: the others have no weight) and the auxiliary losses, the selection held
/// constant.
fn score_grad(rule: RoutingRule, z: &[f64], selected: &[usize], g: &[f64], aux: &AuxGrad) -> Vec<f64> {
    let e = z.len();
    let from_g = || {
        let mut dp = vec![0.0; e];
        selected.iter().for_each(|&j| dp[j] = g[j]);
        dp
    };
    // The rule's probabilities and dL/dp from its weights.
    let (p, mut dp, temperature) = match rule {
        RoutingRule::SoftmaxTopK { weights, temperature, .. } => {
            let p = softmax(z, temperature);
            let dp = match weights {
                TopKWeights::Softmax => from_g(),
                // w_j = p_j / Σ_sel p.
                TopKWeights::Renormalized => renormalized_grad(&p, selected, g, 1.0),
                // Weight 1 whatever the scores.
                TopKWeights::Unit => vec![0.0; e],
            };
            (p, dp, Some(temperature))
        }
        RoutingRule::TopP { temperature, .. } | RoutingRule::DenseSoftmax { temperature } => {
            let p = softmax(z, temperature);
            let dp = from_g();
            (p, dp, Some(temperature))
        }
        RoutingRule::DynMole { .. } => {
            let p = softmax(z, 1.0);
            let dp = from_g();
            (p, dp, Some(1.0))
        }
        // w_j = k · s_j / Σ_sel s with s = sigmoid(z).
        RoutingRule::SigmoidTopK { k, .. } => {
            let s: Vec<f64> = z.iter().map(|&v| sigmoid(v)).collect();
            let ds = renormalized_grad(&s, selected, g, k as f64);
            (s, ds, None)
        }
        // Weight 1 whatever the scores, and no probabilities for a loss to read.
        RoutingRule::MagnitudeTopK { .. } => return vec![0.0; e],
    };
    dp.iter_mut().zip(aux.prob_grad(&p, selected)).for_each(|(d, a)| *d += a);
    let mut dz = match temperature {
        Some(t) => softmax_vjp(&p, &dp, t),
        None => dp.iter().zip(&p).map(|(d, s)| d * s * (1.0 - s)).collect(),
    };
    if let Some(zg) = aux.z_grad(z) {
        dz.iter_mut().zip(zg).for_each(|(d, g)| *d += g);
    }
    dz
}

/// `dL/dp` for `w_j = c · p_j / Σ_sel p` (`j` selected): `c · (g_j - Σ_sel g_i p_i / Σ_sel p) / Σ_sel p`
/// on the selected, 0 elsewhere and where the sum is 0 (the forward's weights are then 0).
fn renormalized_grad(p: &[f64], selected: &[usize], g: &[f64], c: f64) -> Vec<f64> {
    let mut dp = vec![0.0; p.len()];
    let sum: f64 = selected.iter().map(|&j| p[j]).sum();
    if sum > 0.0 {
        let mean: f64 = selected.iter().map(|&j| g[j] * p[j]).sum::<f64>() / sum;
        selected.iter().for_each(|&j| dp[j] = c * (g[j] - mean) / sum);
    }
    dp
}

/// The vector-Jacobian product of `p = softmax(z / t)`: `dz_j = p_j (dp_j - Σ_i p_i dp_i) / t`.
fn softmax_vjp(p: &[f64], dp: &[f64], t: f64) -> Vec<f64> {
    let dot: f64 = p.iter().zip(dp).map(|(p, d)| p * d).sum();
    p.iter().zip(dp).map(|(p, d)| p * (d - dot) / t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape};

    #[test]
    fn dy_of_the_wrong_shape_is_named() {
        let shape = MethodShape { d_in: 6, d_out: 5, experts: 3, rank: 2, k: 2, alpha: 2.0 };
        let spec = Method::MixLoraPerLinear.spec(shape).unwrap();
        let data = crate::synth::SyntheticLayer::<f64>::new(&spec, 2, 1);
        let err = backward(&spec, &data.inputs(), &[1.0; 9]).unwrap_err();
        assert!(matches!(err, MoleError::ShapeMismatch { what: "dy", got: 9, .. }), "{err}");
    }
}
