//! The f64 reference backward of the expert-scale mix: the gradients of the loss `Σ dy · y` with
//! respect to every differentiable input of one layer call, for a training framework (and later
//! the backward kernels) to check against.
//!
//! The forward is `h = x · A`, scores `z` from the router, weights `w(z)` of the selected
//! experts, `h'[t, cols(e)] = s_e · w_e · h[t, cols(e)]`, `y = y0 + scale · h' · B`. The
//! selection (top-k, top-p, DynMoLE's entropy switch and threshold, SMoRA's biased selection,
//! FlyLoRA's magnitude selection, adapter ids) is a constant of the backward, as in every
//! framework: gradients flow only through the weights of the selected experts, each rule's
//! weights differentiated exactly as [`super::routing`] computes them. The selection bias only
//! steers the selection, so it has no gradient; the gradient of the base output `y0` is `dy`
//! itself and is not returned.

use super::layer::{forward, host_bytes};
use super::linalg::{matmul, transpose};
use super::routing::{sigmoid, softmax};
use crate::dtype::{to_f64_vec, Scalar};
use crate::limits::check_len;
use crate::model::{Gating, LayerInputs, LayerSpec, Mix, Router, RoutingRule, TopKWeights};
use crate::{MoleError, Result};

/// The gradients of one layer call, in f64, each shaped like its input. An optional gradient is
/// present exactly when the spec takes that input; it is zero where the input does not reach the
/// output (a router whose rule weighs every selected expert 1, as LLaVA-MoLE's sparse top-1).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGrads {
    /// `dL/dx [T, d_in]`: through the shrink and, for the x and h routers, through the router.
    pub x: Vec<f64>,
    /// `dL/dA [d_in, R]`: through the mix and, for the h and low-rank routers, through the router.
    pub a: Vec<f64>,
    /// `dL/dB [R, d_out]`.
    pub b: Vec<f64>,
    /// `dL/d router_weight` (`[d_in, E]` or `[R, E]`) for the x and h routers.
    pub router_weight: Option<Vec<f64>>,
    /// `dL/d router_bias [E]` for a router with bias.
    pub router_bias: Option<Vec<f64>>,
    /// `dL/d logits [T, E]` for the logits router.
    pub logits: Option<Vec<f64>>,
    /// `dL/d weights [T, E]` for given gating (zero for the weights not kept).
    pub weights: Option<Vec<f64>>,
}

/// The f64 reference backward of one layer: the gradients of `L = Σ dy · y` (`dy [T, d_out]`)
/// with respect to `x`, `A`, `B` and the gating inputs the spec takes, with the routing
/// selection held constant (see the module documentation).
///
/// Errors: [`MoleError::Unsupported`] for the core-merge mix (CoMoL), every error of
/// [`forward`], `dy` not of `[T, d_out]`, and the host memory check.
pub fn backward<T: Scalar>(spec: &LayerSpec, inputs: &LayerInputs<'_, T>, dy: &[T]) -> Result<LayerGrads> {
    if let Mix::CoreMerge { .. } = spec.mix {
        return Err(MoleError::Unsupported(
            "the reference backward of the core_merge mix (CoMoL) is not implemented: only the expert_scale mix".into(),
        ));
    }
    inputs.validate(spec)?;
    let (t, d_in, d_out, r, e) = (inputs.tokens, spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
    check_len("dy", dy, &[t, d_out])?;
    // The forward's buffers plus as many again for the gradients.
    let need = host_bytes(spec, t)?.saturating_mul(2);
    crate::limits::check_host(&format!("the f64 reference backward of this layer on {t} tokens"), need)?;
    let out = forward(spec, inputs)?;
    let dy = to_f64_vec(dy);
    let x = to_f64_vec(inputs.x);

    // Expand: y = y0 + scale · h' · B.
    let scaled = |v: Vec<f64>| v.into_iter().map(|g| spec.scale * g).collect::<Vec<_>>();
    let d_mixed = scaled(matmul(&dy, &transpose(&to_f64_vec(inputs.b), r, d_out), t, d_out, r));
    let db = scaled(matmul(&transpose(&out.h_mixed, t, r), &dy, r, t, d_out));

    // Mix: h'[t, cols(e)] = s_e · w_e · h[t, cols(e)], with w_e the summed weight of e's slots.
    let routing = &out.routing;
    let mut w = vec![0.0; t * e];
    for (slot, &id) in routing.ids.iter().enumerate() {
        if id >= 0 {
            w[slot / routing.slots * e + id as usize] += routing.weights[slot];
        }
    }
    let mut dh = vec![0.0; t * r];
    let mut dw = vec![0.0; t * e];
    for tok in 0..t {
        for ex in 0..e {
            let s = spec.expert_scale(ex);
            for c in spec.ranks.cols(ex) {
                dh[tok * r + c] = s * w[tok * e + ex] * d_mixed[tok * r + c];
                dw[tok * e + ex] += s * out.h[tok * r + c] * d_mixed[tok * r + c];
            }
        }
    }
    let selected = |tok: usize| -> Vec<usize> {
        let row = &routing.ids[tok * routing.slots..(tok + 1) * routing.slots];
        row.iter().filter(|&&id| id >= 0).map(|&id| id as usize).collect()
    };

    // Gating: the weights' gradient to the scores (or to the given weights).
    let mut grads = LayerGrads { x: vec![], a: vec![], b: db, router_weight: None, router_bias: None, logits: None, weights: None };
    match spec.gating {
        Gating::Routed { router, rule } => {
            let z = out.scores.as_deref().ok_or_else(|| MoleError::Unsupported("a routed gating without scores".into()))?;
            let mut dz = vec![0.0; t * e];
            for tok in 0..t {
                let row = tok * e..(tok + 1) * e;
                dz[row.clone()].copy_from_slice(&score_grad(rule, &z[row.clone()], &selected(tok), &dw[row]));
            }
            match router {
                Router::X { bias } => {
                    let wg = to_f64_vec(inputs.router_weight.unwrap_or_default());
                    grads.router_weight = Some(matmul(&transpose(&x, t, d_in), &dz, d_in, t, e));
                    grads.router_bias = bias.then(|| column_sums(&dz, e));
                    grads.x = matmul(&dz, &transpose(&wg, d_in, e), t, e, d_in);
                }
                Router::H { bias } => {
                    let wr = to_f64_vec(inputs.router_weight.unwrap_or_default());
                    grads.router_weight = Some(matmul(&transpose(&out.h, t, r), &dz, r, t, e));
                    grads.router_bias = bias.then(|| column_sums(&dz, e));
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
                let sel = selected(tok);
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
    grads.a = matmul(&transpose(&x, t, d_in), &dh, d_in, t, r);
    let dx_shrink = matmul(&dh, &transpose(&to_f64_vec(inputs.a), d_in, r), t, r, d_in);
    if grads.x.is_empty() {
        grads.x = dx_shrink;
    } else {
        grads.x.iter_mut().zip(dx_shrink).for_each(|(d, g)| *d += g);
    }
    Ok(grads)
}

/// `Σ_t m[t, :]` of `m [T, n]`.
fn column_sums(m: &[f64], n: usize) -> Vec<f64> {
    let mut sums = vec![0.0; n];
    for row in m.chunks(n) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    sums
}

/// `dL/dz` of one token's scores `z [E]` under `rule`, given `g = dL/dw` (read at the `selected`
/// experts only: the others have no weight) and the selection held constant.
fn score_grad(rule: RoutingRule, z: &[f64], selected: &[usize], g: &[f64]) -> Vec<f64> {
    let e = z.len();
    // Weights `p_j` of p = softmax(z / temperature) on the selected experts: dL/dp = g there.
    let raw = |temperature: f64| {
        let p = softmax(z, temperature);
        let mut dp = vec![0.0; e];
        selected.iter().for_each(|&j| dp[j] = g[j]);
        softmax_vjp(&p, &dp, temperature)
    };
    match rule {
        RoutingRule::SoftmaxTopK { weights: TopKWeights::Softmax, temperature, .. }
        | RoutingRule::TopP { temperature, .. }
        | RoutingRule::DenseSoftmax { temperature } => raw(temperature),
        RoutingRule::DynMole { .. } => raw(1.0),
        // w_j = p_j / Σ_sel p: dL/dp_j = (g_j - Σ_sel g_i w_i) / Σ_sel p on the selected.
        RoutingRule::SoftmaxTopK { weights: TopKWeights::Renormalized, temperature, .. } => {
            let p = softmax(z, temperature);
            let dp = renormalized_grad(&p, selected, g, 1.0);
            softmax_vjp(&p, &dp, temperature)
        }
        // w_j = k · s_j / Σ_sel s with s = sigmoid(z): ds_j as above times k, ds/dz = s (1 - s).
        RoutingRule::SigmoidTopK { k, .. } => {
            let s: Vec<f64> = z.iter().map(|&v| sigmoid(v)).collect();
            let ds = renormalized_grad(&s, selected, g, k as f64);
            ds.iter().zip(&s).map(|(d, s)| d * s * (1.0 - s)).collect()
        }
        // Weight 1 whatever the scores: no gradient reaches them.
        RoutingRule::SoftmaxTopK { weights: TopKWeights::Unit, .. } | RoutingRule::MagnitudeTopK { .. } => vec![0.0; e],
    }
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
    fn the_core_merge_mix_is_refused_by_name() {
        let shape = MethodShape { d_in: 6, d_out: 5, experts: 3, rank: 2, k: 2, alpha: 2.0 };
        let spec = Method::Comol.spec(shape).unwrap();
        let data = crate::synth::SyntheticLayer::<f64>::new(&spec, 2, 1);
        let err = backward(&spec, &data.inputs(), &[1.0; 10]).unwrap_err();
        assert!(matches!(&err, MoleError::Unsupported(m) if m.contains("core_merge")), "{err}");
    }

    #[test]
    fn dy_of_the_wrong_shape_is_named() {
        let shape = MethodShape { d_in: 6, d_out: 5, experts: 3, rank: 2, k: 2, alpha: 2.0 };
        let spec = Method::MixLoraPerLinear.spec(shape).unwrap();
        let data = crate::synth::SyntheticLayer::<f64>::new(&spec, 2, 1);
        let err = backward(&spec, &data.inputs(), &[1.0; 9]).unwrap_err();
        assert!(matches!(err, MoleError::ShapeMismatch { what: "dy", got: 9, .. }), "{err}");
    }
}
