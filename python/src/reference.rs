//! The f64 reference ([`mole::reference`]) on host buffers: the Python layer passes each array
//! as the little-endian bytes of a contiguous f64 (or, for `adapter_ids`, int32) array, after
//! checking its shape against [`crate::contract`]; results come back the same way.

use crate::contract::{input_shapes, parse};
use crate::errors::IntoPy;
use mole::model::LayerInputs;
use mole::MoleError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::collections::HashMap;

/// One result array: its bytes, its shape and its NumPy type string.
type Array<'py> = (Bound<'py, PyBytes>, Vec<usize>, &'static str);

/// The little-endian values of `N` bytes each in `bytes` (the caller's array `name`).
fn decode<const N: usize, T>(name: &str, bytes: &[u8], what: &str, from: fn([u8; N]) -> T) -> PyResult<Vec<T>> {
    if !bytes.len().is_multiple_of(N) {
        return Err(crate::errors::to_py(MoleError::InvalidOperand {
            operand: name.to_string(),
            reason: format!("{} bytes is not a whole number of {what}", bytes.len()),
        }));
    }
    Ok(bytes.chunks_exact(N).map(|c| from(c.try_into().expect("chunks_exact gives N bytes"))).collect())
}

fn f64s(name: &str, bytes: &[u8]) -> PyResult<Vec<f64>> {
    decode(name, bytes, "f64", f64::from_le_bytes)
}

fn i32s(name: &str, bytes: &[u8]) -> PyResult<Vec<i32>> {
    decode(name, bytes, "int32", i32::from_le_bytes)
}

fn f64_array<'py>(py: Python<'py>, v: &[f64], shape: Vec<usize>) -> Array<'py> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    (PyBytes::new(py, &bytes), shape, "<f8")
}

fn i32_array<'py>(py: Python<'py>, v: &[i32], shape: Vec<usize>) -> Array<'py> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    (PyBytes::new(py, &bytes), shape, "<i4")
}

/// The caller's arrays, decoded: the layer's tensors in f64 and the adapter ids.
struct Decoded {
    f: HashMap<String, Vec<f64>>,
    ids: Option<Vec<i32>>,
}

impl Decoded {
    fn new(arrays: HashMap<String, Vec<u8>>) -> PyResult<Self> {
        let mut f = HashMap::new();
        let mut ids = None;
        for (name, bytes) in arrays {
            if name == "adapter_ids" {
                ids = Some(i32s(&name, &bytes)?);
            } else {
                let v = f64s(&name, &bytes)?;
                f.insert(name, v);
            }
        }
        Ok(Decoded { f, ids })
    }

    fn get(&self, name: &str) -> Option<&[f64]> {
        self.f.get(name).map(Vec::as_slice)
    }

    /// The inputs of a call of `tokens` tokens; an absent required tensor is an empty slice,
    /// which [`LayerInputs::validate`] reports by name.
    fn inputs(&self, tokens: usize) -> LayerInputs<'_, f64> {
        let req = |n: &str| self.get(n).unwrap_or(&[]);
        let mut i = LayerInputs::new(tokens, req("x"), req("a"), req("b"), req("y"));
        i.router_weight = self.get("router_weight");
        i.router_bias = self.get("router_bias");
        i.logits = self.get("logits");
        i.weights = self.get("weights");
        i.selection_bias = self.get("selection_bias");
        i.cores = self.get("cores");
        i.adapter_ids = self.ids.as_deref();
        i
    }
}

/// The reference forward of `spec` (JSON) over `tokens` tokens: a dict of `y`, `h`, `h_mixed`,
/// `ids`, `weights`, and `scores` and `probs` where the gating has them, each
/// `(bytes, shape, typestr)`, `aux_loss` as a float, and `stats`: the router statistics the
/// auxiliary losses are made of ([`mole::reference::RouterStats`], the per-expert ones `[E]`).
#[pyfunction]
pub fn reference_forward<'py>(
    py: Python<'py>,
    spec: &str,
    tokens: usize,
    arrays: HashMap<String, Vec<u8>>,
) -> PyResult<Bound<'py, PyDict>> {
    let spec = parse(spec)?;
    let d = Decoded::new(arrays)?;
    let out = mole::reference::forward(&spec, &d.inputs(tokens)).py()?;
    let (t, r, e, slots) = (tokens, spec.total_rank(), spec.routed_experts(), out.routing.slots);
    let dict = PyDict::new(py);
    dict.set_item("y", f64_array(py, &out.y, vec![t, spec.d_out]))?;
    dict.set_item("h", f64_array(py, &out.h, vec![t, r]))?;
    dict.set_item("h_mixed", f64_array(py, &out.h_mixed, vec![t, r]))?;
    dict.set_item("ids", i32_array(py, &out.routing.ids, vec![t, slots]))?;
    dict.set_item("weights", f64_array(py, &out.routing.weights, vec![t, slots]))?;
    if let Some(z) = &out.scores {
        dict.set_item("scores", f64_array(py, z, vec![t, e]))?;
    }
    if let Some(p) = &out.routing.probs {
        dict.set_item("probs", f64_array(py, p, vec![t, e]))?;
    }
    dict.set_item("aux_loss", out.aux_loss)?;
    let stats = PyDict::new(py);
    let st = &out.stats;
    stats.set_item("selected_fraction", f64_array(py, &st.selected_fraction, vec![e]))?;
    stats.set_item("top1_fraction", f64_array(py, &st.top1_fraction, vec![e]))?;
    for (name, v) in [("mean_prob", &st.mean_prob), ("masked_mean_prob", &st.masked_mean_prob)] {
        if let Some(v) = v {
            stats.set_item(name, f64_array(py, v, vec![e]))?;
        }
    }
    for (name, v) in [("z_loss", st.z_loss), ("entropy", st.entropy)] {
        if let Some(v) = v {
            stats.set_item(name, v)?;
        }
    }
    dict.set_item("stats", stats)?;
    Ok(dict)
}

/// The reference backward: the gradients of `L = Σ dy · y + aux_loss` that the spec's layer
/// has (`x` always; the trained parameters and gating inputs), keyed by the tensor's name.
#[pyfunction]
pub fn reference_backward<'py>(
    py: Python<'py>,
    spec: &str,
    tokens: usize,
    arrays: HashMap<String, Vec<u8>>,
    dy: Vec<u8>,
) -> PyResult<Bound<'py, PyDict>> {
    let spec = parse(spec)?;
    let d = Decoded::new(arrays)?;
    let dy = f64s("dy", &dy)?;
    let g = mole::reference::backward(&spec, &d.inputs(tokens), &dy).py()?;
    let shapes = input_shapes(&spec, tokens);
    let dict = PyDict::new(py);
    for (name, grad) in [
        ("x", Some(&g.x)),
        ("a", g.a.as_ref()),
        ("b", g.b.as_ref()),
        ("router_weight", g.router_weight.as_ref()),
        ("router_bias", g.router_bias.as_ref()),
        ("logits", g.logits.as_ref()),
        ("weights", g.weights.as_ref()),
        ("cores", g.cores.as_ref()),
    ] {
        if let (Some(grad), Some((_, shape, _))) = (grad, shapes.iter().find(|(n, _, _)| *n == name)) {
            dict.set_item(name, f64_array(py, grad, shape.clone()))?;
        }
    }
    Ok(dict)
}
