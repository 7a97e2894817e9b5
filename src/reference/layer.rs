//! The composed layer forward: shrink → route → mix → expand, each step a call into the
//! modules beside this one.

use super::linalg::{expand, matmul, shrink};
use super::mix::{core_merge, expert_scale, scale_experts};
use super::routing::{route, GateInput, Routing};
use super::stats::{router_stats, RouterStats};
use crate::dtype::{to_f64_vec, Scalar};
use crate::model::{Gating, LayerInputs, LayerSpec, Mix, Router};
use crate::{MoleError, Result};

/// Everything one layer call produces, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerOutput {
    /// `y + scale · h_mixed · B`, `[T, d_out]`.
    pub y: Vec<f64>,
    /// The shrink output `h = x · A`, `[T, R]`.
    pub h: Vec<f64>,
    /// The mixed low-rank activations `h'` times the per-expert scales
    /// ([`LayerSpec::expert_scales`]), `[T, R]`: what the expand multiplies by `B`.
    pub h_mixed: Vec<f64>,
    /// Router scores `z [T, E]` where the gating has them (computed or given logits).
    pub scores: Option<Vec<f64>>,
    /// Per-token expert ids and weights.
    pub routing: Routing,
    /// Auxiliary-loss statistics.
    pub stats: RouterStats,
}

fn opt<T: Scalar>(v: Option<&[T]>) -> Option<Vec<f64>> {
    v.map(to_f64_vec)
}

/// Router scores `z [T, E]`: `x · W_g (+ b)`, `h · W_r (+ b)`, `h` itself, or given logits.
pub fn router_scores<T: Scalar>(
    spec: &LayerSpec,
    inputs: &LayerInputs<'_, T>,
    x: &[f64],
    h: &[f64],
) -> Option<Vec<f64>> {
    let (t, e) = (inputs.tokens, spec.routed_experts());
    let add_bias = |mut z: Vec<f64>| {
        if let Some(b) = inputs.router_bias {
            for row in z.chunks_mut(e) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b.to_f64());
            }
        }
        z
    };
    match spec.router()? {
        Router::X { .. } => Some(add_bias(matmul(x, &to_f64_vec(inputs.router_weight?), t, spec.d_in, e))),
        Router::H { .. } => Some(add_bias(matmul(h, &to_f64_vec(inputs.router_weight?), t, spec.total_rank(), e))),
        Router::LowRank => Some(h.to_vec()),
        Router::Logits => opt(inputs.logits),
    }
}

/// The f64 reference forward of one layer. Validates the spec and every input first, and checks
/// the memory it needs against what the host has ([`crate::limits::check_host`]); zero tokens
/// return empty outputs.
pub fn forward<T: Scalar>(spec: &LayerSpec, inputs: &LayerInputs<'_, T>) -> Result<LayerOutput> {
    inputs.validate(spec)?;
    let (t, r, e) = (inputs.tokens, spec.total_rank(), spec.routed_experts());
    let need = crate::limits::reference_bytes(spec, t)?;
    crate::limits::check_host(&format!("the f64 reference of this layer on {t} tokens"), need)?;
    let x = to_f64_vec(inputs.x);

    // Shrink.
    let h = shrink(&x, &to_f64_vec(inputs.a), t, spec.d_in, r);

    // Route.
    let scores = router_scores(spec, inputs, &x, &h);
    let given = opt(inputs.weights);
    let sel_bias = opt(inputs.selection_bias);
    let gate_input = match (&spec.gating, &scores, &given, inputs.adapter_ids) {
        (Gating::Routed { .. }, Some(z), _, _) => GateInput::Scores(z, sel_bias.as_deref()),
        (Gating::Given { .. }, _, Some(w), _) => GateInput::Weights(w),
        (_, _, _, Some(ids)) => GateInput::AdapterIds(ids),
        _ => return Err(MoleError::Unsupported("gating inputs do not match the gating".into())),
    };
    let routing = route(&spec.gating, gate_input, t, e)?;
    let entropy = spec.rule().and_then(|r| r.entropy());
    let z_scores = scores.as_deref().filter(|_| spec.rule().is_some_and(|r| r.has_z_loss()));
    let stats = router_stats(&routing, z_scores, entropy);

    // Mix, then the per-expert scales (for CoMoL, one scale over the shared expert's columns).
    let mut h_mixed = match spec.mix {
        Mix::ExpertScale => expert_scale(&h, &routing, &spec.ranks),
        Mix::CoreMerge { .. } => core_merge(&h, &routing, &to_f64_vec(inputs.cores.unwrap_or_default()), r),
    };
    if let Some(scales) = &spec.expert_scales {
        scale_experts(&mut h_mixed, &spec.ranks, scales);
    }

    // Expand.
    let y = expand(&h_mixed, &to_f64_vec(inputs.b), &to_f64_vec(inputs.y), spec.scale, t, r, spec.d_out);
    Ok(LayerOutput { y, h, h_mixed, scores, routing, stats })
}
