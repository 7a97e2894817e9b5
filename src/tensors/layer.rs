//! `eval` of a MoLE layer. Input names: `x [T, d_in]`, `A [d_in, R]`, `B [R, d_out]`, optional
//! `y [T, d_out]` (zeros if absent), and what the spec needs of `router_weight`, `router_bias`,
//! `logits`, `weights`, `adapter_ids` (integer), `selection_bias`, `cores`. Output names: `y`,
//! `h`, `h_mixed`, `scores`, and the routing and statistics of `insert_routing`.

use super::{adapter_ids, check_names, float, insert_routing, tokens_of, HostTensor, TensorMap};
use crate::model::{LayerInputs, LayerSpec};
use crate::{limits, reference};
use crate::{MoleError, Result};

/// Runs `spec` through the f64 reference on named tensors and returns the named outputs.
pub fn eval(spec: &LayerSpec, inputs: &TensorMap) -> Result<TensorMap> {
    spec.validate()?;
    let tokens = tokens_of(inputs, spec.d_in, "every layer")?;
    let (r, e, d_in, d_out) = (spec.total_rank(), spec.routed_experts(), spec.d_in, spec.d_out);
    // The reference's buffers and the encoded outputs, before any of them is allocated.
    let need = crate::reference::host_bytes(spec, tokens)?.saturating_mul(2);
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
    let w_rows = match spec.router() {
        Some(crate::model::Router::H { .. }) => r,
        _ => d_in,
    };
    li.router_weight = float(inputs, "router_weight", &[w_rows, e])?;
    li.router_bias = float(inputs, "router_bias", &[e])?;
    li.logits = float(inputs, "logits", &[tokens, e])?;
    li.weights = float(inputs, "weights", &[tokens, e])?;
    li.selection_bias = float(inputs, "selection_bias", &[e])?;
    li.cores = float(inputs, "cores", &[e, r, r])?;
    let ids = adapter_ids(inputs, tokens, e)?;
    li.adapter_ids = ids.as_deref();
    check_names(inputs, &INPUT_NAMES)?;

    let out = reference::forward(spec, &li)?;
    let mut m = TensorMap::new();
    m.insert("y".into(), HostTensor::float(vec![tokens, d_out], out.y));
    m.insert("h".into(), HostTensor::float(vec![tokens, r], out.h));
    m.insert("h_mixed".into(), HostTensor::float(vec![tokens, r], out.h_mixed));
    if let Some(z) = out.scores {
        m.insert("scores".into(), HostTensor::float(vec![tokens, e], z));
    }
    insert_routing(&mut m, out.routing, out.stats);
    Ok(m)
}

/// Every input name `eval` accepts.
pub const INPUT_NAMES: [&str; 11] =
    ["x", "y", "A", "B", "router_weight", "router_bias", "logits", "weights", "adapter_ids", "selection_bias", "cores"];
