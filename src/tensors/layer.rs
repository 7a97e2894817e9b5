//! `eval` of a MoLE layer. Input names: `x [T, d_in]`, `A [d_in, R]`, `B [R, d_out]`, optional
//! `y [T, d_out]` (zeros if absent), and what the spec needs of `router_weight`, `router_bias`,
//! `logits`, `weights`, `adapter_ids` (integer), `selection_bias`, `cores`; optional
//! `dy [T, d_out]` asks for the gradients. Output names: `y`, `h`, `h_mixed`, `scores`, the routing
//! and statistics of `insert_routing`, `aux_loss`, and with `dy` the gradients `grad.<input>`.

use super::{adapter_ids, check_names, float, insert_routing, tokens_of, HostTensor, TensorMap};
use crate::model::{LayerInputs, LayerSpec};
use crate::reference::LayerGrads;
use crate::{limits, reference};
use crate::{MoleError, Result};

/// Runs `spec` through the f64 reference on named tensors and returns the named outputs. With
/// `dy [T, d_out]` among the inputs it also runs the reference backward
/// ([`reference::backward()`]: the gradients of `Σ dy · y + aux_loss`, the selection held constant)
/// and writes `grad.<input>` for each input that has a gradient and is not frozen; `aux_loss` is
/// written with `dy` or when the spec declares auxiliary losses.
pub fn eval(spec: &LayerSpec, inputs: &TensorMap) -> Result<TensorMap> {
    spec.validate()?;
    let tokens = tokens_of(inputs, spec.d_in, "every layer")?;
    let (r, e, d_in, d_out) = (spec.total_rank(), spec.routed_experts(), spec.d_in, spec.d_out);
    // The reference's buffers and the encoded outputs, before any of them is allocated; as much
    // again for the backward and its gradients when `dy` asks for them.
    let passes = if inputs.contains_key("dy") { 4 } else { 2 };
    let need = crate::reference::host_bytes(spec, tokens)?.saturating_mul(passes);
    limits::check_host(&format!("this layer on {tokens} tokens (the f64 reference and its outputs)"), need)?;
    let required = |name: &'static str, shape: &[usize]| {
        float(inputs, name, shape)?.ok_or(MoleError::MissingInput { name, needed_by: "every layer" })
    };
    let x = required("x", &[tokens, d_in])?;
    let a = required("A", &[d_in, r])?;
    let b = required("B", &[r, d_out])?;
    let zeros = vec![0.0; tokens * d_out];
    let y = float(inputs, "y", &[tokens, d_out])?.unwrap_or(&zeros);
    let mut li = LayerInputs::new(tokens, x, a, b, y);
    li.router_weight = float(inputs, "router_weight", &[router_rows(spec), e])?;
    li.router_bias = float(inputs, "router_bias", &[e])?;
    li.logits = float(inputs, "logits", &[tokens, e])?;
    li.weights = float(inputs, "weights", &[tokens, e])?;
    li.selection_bias = float(inputs, "selection_bias", &[e])?;
    li.cores = float(inputs, "cores", &[e, r, r])?;
    let ids = adapter_ids(inputs, tokens, e)?;
    li.adapter_ids = ids.as_deref();
    let dy = float(inputs, "dy", &[tokens, d_out])?;
    check_names(inputs, &INPUT_NAMES)?;

    let out = reference::forward(spec, &li)?;
    let grads = dy.map(|dy| reference::backward(spec, &li, dy)).transpose()?;
    let mut m = TensorMap::new();
    m.insert("y".into(), HostTensor::float(vec![tokens, d_out], out.y));
    m.insert("h".into(), HostTensor::float(vec![tokens, r], out.h));
    m.insert("h_mixed".into(), HostTensor::float(vec![tokens, r], out.h_mixed));
    if let Some(z) = out.scores {
        m.insert("scores".into(), HostTensor::float(vec![tokens, e], z));
    }
    insert_routing(&mut m, out.routing, out.stats);
    if spec.training.aux_losses.any() || grads.is_some() {
        // A scalar, as `z_loss` and `entropy` are written.
        m.insert("aux_loss".into(), HostTensor::float(vec![], vec![out.aux_loss]));
    }
    if let Some(g) = grads {
        insert_grads(&mut m, g, spec, tokens);
    }
    Ok(m)
}

/// The gradients as `grad.<input>`, each shaped like its input; an absent one (an input the spec
/// does not take, or a frozen parameter) is not written.
fn insert_grads(m: &mut TensorMap, g: LayerGrads, spec: &LayerSpec, t: usize) {
    let (r, e, d_in, d_out, w_rows) =
        (spec.total_rank(), spec.routed_experts(), spec.d_in, spec.d_out, router_rows(spec));
    let named = [
        ("grad.x", Some(g.x), vec![t, d_in]),
        ("grad.A", g.a, vec![d_in, r]),
        ("grad.B", g.b, vec![r, d_out]),
        ("grad.router_weight", g.router_weight, vec![w_rows, e]),
        ("grad.router_bias", g.router_bias, vec![e]),
        ("grad.logits", g.logits, vec![t, e]),
        ("grad.weights", g.weights, vec![t, e]),
        ("grad.cores", g.cores, vec![e, r, r]),
    ];
    for (name, values, shape) in named {
        if let Some(v) = values {
            m.insert(name.into(), HostTensor::float(shape, v));
        }
    }
}

/// The rows of `router_weight`: `R` for an h router, else `d_in`.
fn router_rows(spec: &LayerSpec) -> usize {
    match spec.router() {
        Some(crate::model::Router::H { .. }) => spec.total_rank(),
        _ => spec.d_in,
    }
}

/// Every input name `eval` accepts.
pub const INPUT_NAMES: [&str; 12] = [
    "x",
    "y",
    "A",
    "B",
    "router_weight",
    "router_bias",
    "logits",
    "weights",
    "adapter_ids",
    "selection_bias",
    "cores",
    "dy",
];
