//! What the backward kernels' workspace should hold, in f64, and each compared element's error
//! bound (see `tests/hostexec_backward.rs`).

use mole::model::{Gating, LayerParam, LayerSpec, Mix, Router, RoutingRule, TopKWeights};
use mole::reference::{backward, tolerance, LayerGrads, LayerOutput};
use mole::synth::SyntheticLayer;
use mole::DType;

/// Headroom over one reduction's bound for the stages chained (shrink, expand, mix, rule, dx).
const K: f64 = 8.0;

/// The expected `dh` and `dz` and the bounds of `dx`, `dh` and `dz` (also `d_gate_input`'s).
pub struct Expected {
    /// `dL/dh [T, R]`.
    pub dh: Vec<f64>,
    /// Its bound per element.
    pub dh_bound: Vec<f64>,
    /// `dL/dz [T, E]` (given weights: their gradient); `None` without gating inputs.
    pub dz: Option<Vec<f64>>,
    /// Its bound per element (f32 workspace).
    pub dz_bound: Vec<f64>,
    /// The bound of `d_gate_input` (`dz` stored in the dtype) per element.
    pub gate_bound: Vec<f64>,
    /// `dx`'s bound per element.
    pub dx_bound: Vec<f64>,
}

/// The rule's softmax temperature (1 for DynMoLE and SMoRA's sigmoid).
fn temperature(rule: RoutingRule) -> f64 {
    match rule {
        RoutingRule::SoftmaxTopK { temperature, .. }
        | RoutingRule::TopP { temperature, .. }
        | RoutingRule::DenseSoftmax { temperature } => temperature,
        _ => 1.0,
    }
}

/// The reference's `dz`: the logits' gradient of the same layer routed by the logits router on
/// the forward's scores (the same selection, rule and losses; the router is not frozen there).
fn reference_dz(
    spec: &LayerSpec,
    data: &SyntheticLayer<f64>,
    dy: &[f64],
    out: &LayerOutput,
) -> Result<Vec<f64>, String> {
    let Gating::Routed { rule, .. } = spec.gating else { return Err("not routed".into()) };
    let mut logits_spec = spec.clone();
    logits_spec.gating = Gating::Routed { router: Router::Logits, rule };
    logits_spec.training.frozen.retain(|&p| p != LayerParam::Router);
    let mut d = data.clone();
    d.logits = out.scores.clone();
    d.router_weight = None;
    d.router_bias = None;
    let g = backward(&logits_spec, &d.inputs(), dy).map_err(|e| e.to_string())?;
    g.logits.ok_or_else(|| "no logits gradient".into())
}

/// `dh`, `dz` and the bounds of a case (`data` the typed inputs in f64, `out` and `grads` the
/// reference's forward and backward).
pub fn expected(
    spec: &LayerSpec,
    dtype: DType,
    data: &SyntheticLayer<f64>,
    dy: &[f64],
    out: &LayerOutput,
    grads: &LayerGrads,
) -> Result<Expected, String> {
    let (t_n, d_in, d_out, r, e) = (data.tokens, spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
    let slots = out.routing.slots;
    // The outputs are stored in the dtype; the workspace stays f32 (inputs exact in both).
    let n = d_in + d_out + r + e + slots;
    let (tol, tol_ws) = (K * tolerance(dtype, n), K * tolerance(DType::F32, n));
    let mut w = vec![0.0; t_n * e];
    for (i, &id) in out.routing.ids.iter().enumerate() {
        if id >= 0 {
            w[i / slots * e + id as usize] += out.routing.weights[i];
        }
    }
    // g = scale · s_e · dy · Bᵀ and h = x · A, with their absolute sums.
    let (mut g, mut g_abs, mut h_abs) = (vec![0.0; t_n * r], vec![0.0; t_n * r], vec![0.0; t_n * r]);
    for t in 0..t_n {
        for c in 0..r {
            let s = spec.scale * spec.expert_scale(spec.ranks.expert_of_col(c));
            let (mut v, mut m) = (0.0, 0.0);
            for j in 0..d_out {
                v += dy[t * d_out + j] * data.b[c * d_out + j];
                m += (dy[t * d_out + j] * data.b[c * d_out + j]).abs();
            }
            g[t * r + c] = s * v;
            g_abs[t * r + c] = s.abs() * m;
            h_abs[t * r + c] = (0..d_in).map(|k| (data.x[t * d_in + k] * data.a[k * r + c]).abs()).sum();
        }
    }
    // The mix: dh and its magnitude, and dw's magnitude.
    let (mut dh, mut dh_mag, mut dw_abs) = (vec![0.0; t_n * r], vec![0.0; t_n * r], vec![0.0; t_n * e]);
    for t in 0..t_n {
        let row = t * r..(t + 1) * r;
        match spec.mix {
            Mix::ExpertScale => {
                for ex in 0..e {
                    let we = w[t * e + ex];
                    for c in spec.ranks.cols(ex) {
                        dh[t * r + c] = we * g[t * r + c];
                        dh_mag[t * r + c] = we.abs() * g_abs[t * r + c];
                        dw_abs[t * e + ex] += h_abs[t * r + c] * g_abs[t * r + c];
                    }
                }
            }
            Mix::CoreMerge { .. } => {
                let cores = data.cores.as_ref().ok_or("CoMoL without cores")?;
                for ex in 0..e {
                    let wc = w[t * e + ex];
                    let core = &cores[ex * r * r..(ex + 1) * r * r];
                    for i in 0..r {
                        let cg: f64 = (0..r).map(|j| core[i * r + j] * g[row.start + j]).sum();
                        let cg_abs: f64 = (0..r).map(|j| (core[i * r + j]).abs() * g_abs[row.start + j]).sum();
                        dh[t * r + i] += wc * cg;
                        dh_mag[t * r + i] += wc.abs() * cg_abs;
                        dw_abs[t * e + ex] += h_abs[t * r + i] * cg_abs;
                    }
                }
            }
        }
    }
    // dz and its per-token scale S_t.
    let dz = match spec.gating {
        Gating::Routed { .. } => Some(reference_dz(spec, data, dy, out)?),
        Gating::Given { .. } => grads.weights.clone(),
        Gating::AdapterIds => None,
    };
    let mut scale_t = vec![0.0; t_n];
    let aux = spec.training.aux_losses;
    let inv_t = 1.0 / t_n.max(1) as f64;
    for (t, st) in scale_t.iter_mut().enumerate() {
        let dw_max = dw_abs[t * e..(t + 1) * e].iter().fold(0.0f64, |m, &v| m.max(v));
        let sel: Vec<usize> =
            out.routing.ids[t * slots..(t + 1) * slots].iter().filter(|&&i| i >= 0).map(|&i| i as usize).collect();
        *st = match spec.gating {
            Gating::Routed { router, rule } => {
                let p = out.routing.probs.as_deref().unwrap_or_default();
                let psum: f64 = sel.iter().map(|&j| p.get(t * e + j).copied().unwrap_or(0.0)).sum();
                let cw = match rule {
                    RoutingRule::SoftmaxTopK { weights: TopKWeights::Renormalized, .. } if psum > 0.0 => 1.0 / psum,
                    RoutingRule::SigmoidTopK { k, .. } if psum > 0.0 => k as f64 / psum,
                    RoutingRule::MagnitudeTopK { .. } => 0.0,
                    _ => 1.0,
                };
                let z = out.scores.as_deref().unwrap_or_default();
                let zrow = &z[t * e..(t + 1) * e];
                let lse = zrow.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v)).abs();
                // The entropy's gradient is p · ln p (Shannon) or q · p^q (Tsallis) over the
                // uniform distribution's entropy.
                let q = rule.entropy().map_or(1.0, |h| h.q);
                let n = e as f64;
                let uniform = if (q - 1.0).abs() < 1e-12 { n.ln() } else { 1.0 - n.powf(1.0 - q) };
                let aux_mag = inv_t
                    * (2.0 * aux.load_balancing.abs() * n
                        + aux.z_loss.abs() * 2.0 * (lse + n.ln() + 1.0)
                        + aux.entropy.abs() * (4.0 + q) / uniform.abs().max(1e-6));
                // The scores' own f32 error moves the probabilities by up to n·u·|z| / τ.
                let z_abs = (0..e)
                    .map(|ex| match router {
                        Router::X { .. } => {
                            let wg = data.router_weight.as_deref().unwrap_or_default();
                            (0..d_in).map(|k| (data.x[t * d_in + k] * wg[k * e + ex]).abs()).sum::<f64>()
                                + data.router_bias.as_ref().map_or(0.0, |b| b[ex].abs())
                        }
                        Router::H { .. } => {
                            let wr = data.router_weight.as_deref().unwrap_or_default();
                            (0..r).map(|c| h_abs[t * r + c] * wr[c * e + ex].abs()).sum::<f64>()
                                + data.router_bias.as_ref().map_or(0.0, |b| b[ex].abs())
                        }
                        Router::LowRank => h_abs[t * r + ex],
                        Router::Logits => zrow[ex].abs(),
                    })
                    .fold(0.0f64, f64::max);
                let tau = temperature(rule);
                (cw * dw_max / tau + aux_mag) * (1.0 + z_abs / tau)
            }
            Gating::Given { .. } => dw_max * (1.0 + w[t * e..(t + 1) * e].iter().map(|v| v.abs()).sum::<f64>()),
            Gating::AdapterIds => 0.0,
        };
    }
    let bound = |tol: f64| match &dz {
        Some(dz) => dz.iter().enumerate().map(|(i, v)| tol * (scale_t[i / e] + v.abs())).collect(),
        None => vec![],
    };
    let (dz_bound, gate_bound) = (bound(tol_ws), bound(tol));
    // The router's part of dh, with the magnitude of dz's error.
    let dz_mag = |t: usize, ex: usize| dz.as_ref().map_or(0.0, |d| d[t * e + ex].abs()) + scale_t[t];
    match spec.router() {
        Some(Router::H { .. }) => {
            let wr = data.router_weight.as_deref().unwrap_or_default();
            let dz = dz.as_ref().ok_or("no dz")?;
            for t in 0..t_n {
                for c in 0..r {
                    dh[t * r + c] += (0..e).map(|ex| dz[t * e + ex] * wr[c * e + ex]).sum::<f64>();
                    dh_mag[t * r + c] += (0..e).map(|ex| dz_mag(t, ex) * wr[c * e + ex].abs()).sum::<f64>();
                }
            }
        }
        Some(Router::LowRank) => {
            let dz = dz.as_ref().ok_or("no dz")?;
            for t in 0..t_n {
                for c in 0..r {
                    dh[t * r + c] += dz[t * e + c];
                    dh_mag[t * r + c] += dz_mag(t, c);
                }
            }
        }
        _ => {}
    }
    let dh_bound: Vec<f64> = dh_mag.iter().zip(&dh).map(|(m, v)| tol_ws * (m + v.abs())).collect();
    let mut dx_bound = vec![0.0; t_n * d_in];
    for t in 0..t_n {
        for k in 0..d_in {
            let mut m: f64 = (0..r).map(|c| (dh_mag[t * r + c] + dh[t * r + c].abs()) * data.a[k * r + c].abs()).sum();
            if let Some(Router::X { .. }) = spec.router() {
                let wg = data.router_weight.as_deref().unwrap_or_default();
                m += (0..e).map(|ex| dz_mag(t, ex) * wg[k * e + ex].abs()).sum::<f64>();
            }
            dx_bound[t * d_in + k] = tol * m;
        }
    }
    Ok(Expected { dh, dh_bound, dz, dz_bound, gate_bound, dx_bound })
}
