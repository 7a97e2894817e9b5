//! What a layer takes and gives back, from its spec: the spec itself (JSON or a method preset),
//! the shape of every tensor a forward reads (the tensor contract of [`LayerSpec`]) and of every
//! gradient a backward writes.

use crate::errors::IntoPy;
use mole::kernels::exec::Buf;
use mole::model::{LayerSpec, Method, MethodShape};
use mole::runtime::LayerPlanner;
use mole::{DType, MoleError};
use pyo3::prelude::*;

/// One tensor of a call: its name (as `mole eval` files and [`mole::model::LayerInputs`] name
/// it), its shape, and whether it holds int32 (`adapter_ids`) rather than the layer's dtype.
pub type TensorShape = (&'static str, Vec<usize>, bool);

/// Parses a spec (strict: errors name the field).
pub fn parse(spec_json: &str) -> PyResult<LayerSpec> {
    LayerSpec::from_json(spec_json).py()
}

/// Parses a dtype name (`f32`, `f16`, `bf16` and their long names).
pub fn parse_dtype(dtype: &str) -> PyResult<DType> {
    dtype.parse::<DType>().py()
}

/// The spec in canonical JSON, after parsing and validating it.
#[pyfunction]
pub fn spec_json(spec: &str) -> PyResult<String> {
    let spec = parse(spec)?;
    serde_json::to_string(&spec).map_err(|e| crate::errors::to_py(MoleError::Unsupported(e.to_string())))
}

/// Every method preset's name.
#[pyfunction]
pub fn presets() -> Vec<&'static str> {
    Method::ALL.iter().map(|m| m.name()).collect()
}

/// The spec of preset `method` at a shape, in JSON.
#[pyfunction]
pub fn preset_json(
    method: &str,
    d_in: usize,
    d_out: usize,
    experts: usize,
    rank: usize,
    k: usize,
    alpha: f64,
) -> PyResult<String> {
    let Some(&m) = Method::ALL.iter().find(|m| m.name() == method) else {
        return Err(crate::errors::to_py(MoleError::InvalidParameter {
            name: "method",
            value: method.to_string(),
            reason: "not a method preset (mole.presets() lists them)",
        }));
    };
    let spec = m.spec(MethodShape { d_in, d_out, experts, rank, k, alpha }).py()?;
    serde_json::to_string(&spec).map_err(|e| crate::errors::to_py(MoleError::Unsupported(e.to_string())))
}

/// The tensors a forward of `tokens` tokens reads, each with its shape ([`LayerSpec::input_shapes`],
/// what [`mole::model::LayerInputs::validate`] requires), `adapter_ids` marked int32.
pub fn input_shapes(spec: &LayerSpec, tokens: usize) -> Vec<TensorShape> {
    spec.input_shapes(tokens).into_iter().map(|(name, shape)| (name, shape, name == "adapter_ids")).collect()
}

/// The gradients a backward of `tokens` tokens writes (`planner`'s backward plan), named and
/// shaped as the tensors they are the gradients of.
pub fn gradient_shapes(planner: &LayerPlanner, tokens: usize) -> PyResult<Vec<(&'static str, Vec<usize>)>> {
    let spec = planner.spec();
    let inputs = input_shapes(spec, tokens);
    let plan = planner.plan_backward(tokens).py()?;
    let gate = inputs.iter().find(|(n, _, _)| *n == "logits" || *n == "weights").map_or("logits", |(n, _, _)| *n);
    let mut out = Vec::new();
    for (buf, _) in plan.outputs() {
        let name = match buf {
            Buf::DX => "x",
            Buf::DA => "a",
            Buf::DB => "b",
            Buf::DRouterWeight => "router_weight",
            Buf::DRouterBias => "router_bias",
            Buf::DGateInput => gate,
            Buf::DCores => "cores",
            _ => continue,
        };
        if let Some((_, shape, _)) = inputs.iter().find(|(n, _, _)| *n == name) {
            out.push((name, shape.clone()));
        }
    }
    Ok(out)
}

/// [`input_shapes`] of a spec in JSON.
#[pyfunction]
pub fn tensors(spec: &str, tokens: usize) -> PyResult<Vec<TensorShape>> {
    Ok(input_shapes(&parse(spec)?, tokens))
}

/// [`gradient_shapes`] of a spec in JSON at `dtype` (no GPU needed).
#[pyfunction]
pub fn gradients(spec: &str, dtype: &str, tokens: usize) -> PyResult<Vec<(&'static str, Vec<usize>)>> {
    let planner = LayerPlanner::new(&parse(spec)?, parse_dtype(dtype)?, 1, None).py()?;
    gradient_shapes(&planner, tokens)
}

/// The sizes of a layer's buffers over `tokens` tokens in `dtype` on a GPU with `sm_count` SMs,
/// without a GPU: `(workspace, saved, backward workspace)` bytes, what a layer on such a GPU
/// gives (`CompiledLayer::workspace_bytes`, `saved_bytes`, `backward_workspace_bytes`).
#[pyfunction]
pub fn plan_sizes(spec: &str, dtype: &str, sm_count: u32, tokens: usize) -> PyResult<(usize, usize, usize)> {
    let planner = LayerPlanner::new(&parse(spec)?, parse_dtype(dtype)?, sm_count, None).py()?;
    Ok((
        planner.workspace_bytes(tokens).py()?,
        planner.plan_training(tokens).py()?.saved_bytes,
        planner.plan_backward(tokens).py()?.workspace_bytes,
    ))
}
