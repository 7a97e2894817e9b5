//! `eval` of an FFN-expert block ([`FfnSpec`]). Input names: `x [T, d]`, `base.gate [d, f]`,
//! `base.up [d, f]`, `base.down [f, d]`, per adapted projection `gate.A [d, R_g]`, `gate.B [R_g,
//! f]`, `up.A [d, R_u]`, `up.B [R_u, f]`, `down.A [f, R_d]`, `down.B [R_d, d]`, and what the
//! gating needs of `router_weight [d, E]`, `router_bias [E]`, `logits [T, E]`, `weights [T, E]`,
//! `adapter_ids [T]`, `selection_bias [E]`. Outputs: `y [T, d]`, `a_mix [T, f]` and the routing and
//! statistics of the layer eval.

use super::{adapter_ids, check_names, float, insert_routing, tokens_of, HostTensor, TensorMap};
use crate::model::{FfnSpec, Gating, Router};
use crate::reference::{ffn_forward, FfnInputs};
use crate::{MoleError, Result};

/// Every input name [`eval_ffn`] accepts.
pub const FFN_INPUT_NAMES: [&str; 16] = [
    "x",
    "router_weight",
    "router_bias",
    "logits",
    "weights",
    "adapter_ids",
    "selection_bias",
    "base.gate",
    "base.up",
    "base.down",
    "gate.A",
    "gate.B",
    "up.A",
    "up.B",
    "down.A",
    "down.B",
];

/// Presence of a tensor the spec needs (`needed`, by `by`) or does not use: an error naming it.
fn need(inputs: &TensorMap, name: &'static str, needed: bool, by: &'static str) -> Result<()> {
    match (inputs.contains_key(name), needed) {
        (false, true) => Err(MoleError::MissingInput { name, needed_by: by }),
        (true, false) => Err(MoleError::UnexpectedInput { name, reason: by }),
        _ => Ok(()),
    }
}

/// Runs the FFN-expert block `spec` through the f64 reference ([`ffn_forward`]) on named tensors
/// and returns the named outputs. Every tensor the spec needs must be present with its shape,
/// and no other: errors name the tensor.
pub fn eval_ffn(spec: &FfnSpec, inputs: &TensorMap) -> Result<TensorMap> {
    spec.validate()?;
    let (d, f, e) = (spec.d, spec.f, spec.experts);
    let tokens = tokens_of(inputs, d, "every FFN block")?;
    check_names(inputs, &FFN_INPUT_NAMES)?;
    let router = spec.router();
    let rule_bias = matches!(spec.gating, Gating::Routed { rule, .. } if rule.uses_selection_bias());
    let gating = [
        ("router_weight", matches!(router, Some(Router::X { .. })), "the x router", vec![d, e]),
        ("router_bias", router == Some(Router::X { bias: true }), "a router with bias: true", vec![e]),
        ("logits", router == Some(Router::Logits), "the logits router", vec![tokens, e]),
        ("weights", matches!(spec.gating, Gating::Given { .. }), "given gating", vec![tokens, e]),
        ("selection_bias", rule_bias, "a rule with bias: true", vec![e]),
    ];
    for (name, needed, by, _) in &gating {
        need(inputs, name, *needed, by)?;
    }
    need(inputs, "adapter_ids", spec.gating == Gating::AdapterIds, "adapter_ids gating")?;
    let get = |name: &'static str, shape: &[usize]| -> Result<Option<&[f64]>> { float(inputs, name, shape) };
    let base = |name: &'static str, shape: [usize; 2]| {
        get(name, &shape)?.ok_or(MoleError::MissingInput { name, needed_by: "every FFN block" })
    };
    let mut fi = FfnInputs::new(
        tokens,
        base("x", [tokens, d])?,
        base("base.gate", [d, f])?,
        base("base.up", [d, f])?,
        base("base.down", [f, d])?,
    );
    let [w, b, logits, weights, sel] = gating.map(|(name, _, _, shape)| get(name, &shape));
    (fi.router_weight, fi.router_bias, fi.logits, fi.weights, fi.selection_bias) = (w?, b?, logits?, weights?, sel?);
    let ids = adapter_ids(inputs, tokens, e)?;
    fi.adapter_ids = ids.as_deref();
    let banks = [
        (spec.gate.as_ref(), ["gate.A", "gate.B"], [d, f]),
        (spec.up.as_ref(), ["up.A", "up.B"], [d, f]),
        (spec.down.as_ref(), ["down.A", "down.B"], [f, d]),
    ];
    let mut loaded = [(None, None), (None, None), (None, None)];
    for ((lora, [a_name, b_name], [n_in, n_out]), slot) in banks.into_iter().zip(&mut loaded) {
        need(inputs, a_name, lora.is_some(), "a projection with LoRA in the spec")?;
        need(inputs, b_name, lora.is_some(), "a projection with LoRA in the spec")?;
        if let Some(lora) = lora {
            let r = lora.ranks.total_rank();
            *slot = (get(a_name, &[n_in, r])?, get(b_name, &[r, n_out])?);
        }
    }
    [(fi.gate_a, fi.gate_b), (fi.up_a, fi.up_b), (fi.down_a, fi.down_b)] = loaded;

    let out = ffn_forward(spec, &fi)?;
    let mut m = TensorMap::new();
    m.insert("y".into(), HostTensor::float(vec![tokens, d], out.y));
    m.insert("a_mix".into(), HostTensor::float(vec![tokens, f], out.a_mix));
    insert_routing(&mut m, out.routing, out.stats);
    Ok(m)
}
