//! Named host tensors and their safetensors files, and `eval`: one spec run by the reference on
//! named tensors, so any framework can cross-check its numbers against ours. [`EvalSpec`] tells
//! a MoLE layer (`layer`, [`eval`]) from an FFN-expert block (`ffn`, [`eval_ffn`]).
//! Float inputs may be f16, bf16, f32 or f64, ids i32 or i64; outputs are f64, ids i32.

mod ffn;
mod layer;

pub use ffn::{eval_ffn, FFN_INPUT_NAMES};
pub use layer::{eval, INPUT_NAMES};

use crate::limits;
use crate::model::{FfnSpec, LayerSpec};
use crate::reference::{RouterStats, Routing};
use crate::{MoleError, Result};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// The values of a host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// Floating point, widened exactly to f64.
    Float(Vec<f64>),
    /// Integer (i32 or i64 in the file).
    Int(Vec<i64>),
}

/// A named tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Values,
}

impl HostTensor {
    /// A float tensor.
    pub fn float(shape: Vec<usize>, v: Vec<f64>) -> Self {
        Self { shape, values: Values::Float(v) }
    }

    /// An integer tensor.
    pub fn int(shape: Vec<usize>, v: Vec<i64>) -> Self {
        Self { shape, values: Values::Int(v) }
    }
}

/// Tensors by name, sorted.
pub type TensorMap = BTreeMap<String, HostTensor>;

fn widen(dtype: StDtype, bytes: &[u8], name: &str) -> Result<Values> {
    let chunks = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        StDtype::F64 => Values::Float(chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()),
        StDtype::F32 => {
            Values::Float(chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64).collect())
        }
        StDtype::F16 => Values::Float(chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect()),
        StDtype::BF16 => Values::Float(chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect()),
        StDtype::I32 => {
            Values::Int(chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64).collect())
        }
        StDtype::I64 => Values::Int(chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()),
        other => {
            return Err(MoleError::io(format!("tensor `{name}`"), format!("unsupported dtype {other:?}")));
        }
    })
}

/// The largest safetensors header read from a stream (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Reads a safetensors stream (a pipe, a device): the 8-byte header length, the header, then
/// exactly the data the header's offsets cover, checked against host memory before it is read.
fn read_stream(file: &mut std::fs::File, path: &Path) -> Result<Vec<u8>> {
    let ctx = || format!("reading {}", path.display());
    let bad = |message: String| MoleError::Io { context: ctx(), message };
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| MoleError::io(ctx(), e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!("its header claims {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| MoleError::io(ctx(), e))?;
    let doc: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header is not JSON: {e}")))?;
    let data_len = doc
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, t)| t.get("data_offsets")?.as_array()?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    limits::check_host(&ctx(), 8 + header_len + data_len)?;
    let mut bytes = Vec::with_capacity((8 + header_len + data_len) as usize);
    bytes.extend_from_slice(&len);
    bytes.extend_from_slice(&header);
    file.take(data_len).read_to_end(&mut bytes).map_err(|e| MoleError::io(ctx(), e))?;
    Ok(bytes)
}

/// Reads every tensor of a safetensors file. The file, then the tensors widened to f64, are
/// checked against the host memory available before they are read.
pub fn load(path: &Path) -> Result<TensorMap> {
    let ctx = || format!("reading {}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| MoleError::io(ctx(), e))?;
    let meta = file.metadata().map_err(|e| MoleError::io(ctx(), e))?;
    let bytes = if meta.is_file() {
        limits::check_host(&format!("reading {}", path.display()), meta.len())?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| MoleError::io(ctx(), e))?;
        bytes
    } else {
        // A pipe or a device has no length: the header says how much follows.
        read_stream(&mut file, path)?
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| MoleError::io(ctx(), e))?;
    let widened = st
        .tensors()
        .iter()
        .try_fold(limits::Footprint::new(), |f, (name, view)| f.add(&format!("tensor `{name}`"), view.shape(), 8))?;
    limits::check_host(&format!("the tensors of {} widened to f64", path.display()), widened.bytes())?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = widen(view.dtype(), view.data(), &name)?;
            Ok((name, HostTensor { shape: view.shape().to_vec(), values }))
        })
        .collect()
}

/// Writes tensors to a safetensors file: floats as f64, integers as i32 when they fit, else i64.
/// The file is written as [`crate::outfile::write_atomic`] writes (a failure leaves `path` as it
/// was).
pub fn save(path: &Path, tensors: &TensorMap) -> Result<()> {
    let encoded: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = match &t.values {
                Values::Float(v) => (StDtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                Values::Int(v) if v.iter().all(|&x| i32::try_from(x).is_ok()) => {
                    (StDtype::I32, v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect())
                }
                Values::Int(v) => (StDtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let ctx = || format!("writing {}", path.display());
    let size = encoded.iter().map(|e| e.3.len() as u64).sum::<u64>();
    limits::check_host(&ctx(), size)?;
    let views = encoded
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| MoleError::io(ctx(), e))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| MoleError::io(ctx(), e))?;
    crate::outfile::write_atomic(path, &bytes)
}

fn float<'a>(m: &'a TensorMap, name: &str, shape: &[usize]) -> Result<Option<&'a [f64]>> {
    let Some(t) = m.get(name) else { return Ok(None) };
    if t.shape != shape {
        return Err(MoleError::WrongShape { name: name.into(), expected: shape.to_vec(), got: t.shape.clone() });
    }
    match &t.values {
        Values::Float(v) => Ok(Some(v)),
        Values::Int(_) => Err(MoleError::io(format!("tensor `{name}`"), "expected a float tensor, found integers")),
    }
}

/// The tokens of `x [T, d]` (an error naming `x` when it is missing or not `[T, d]`), at most
/// [`limits::MAX_TOKENS`].
fn tokens_of(inputs: &TensorMap, d: usize, needed_by: &'static str) -> Result<usize> {
    let x_t = inputs.get("x").ok_or(MoleError::MissingInput { name: "x", needed_by })?;
    let tokens = match x_t.shape.as_slice() {
        [t, w] if *w == d => *t,
        _ => return Err(MoleError::WrongShape { name: "x".into(), expected: vec![0, d], got: x_t.shape.clone() }),
    };
    limits::check_max("tokens (rows of `x`)", tokens, limits::MAX_TOKENS)?;
    Ok(tokens)
}

/// `adapter_ids [T]` as i32, each in `-1..experts` (else the error the reference gives).
fn adapter_ids(inputs: &TensorMap, tokens: usize, experts: usize) -> Result<Option<Vec<i32>>> {
    let Some(t) = inputs.get("adapter_ids") else { return Ok(None) };
    match &t.values {
        Values::Int(v) if t.shape == [tokens] => v
            .iter()
            .enumerate()
            .map(|(token, &id)| match i32::try_from(id) {
                // In range (experts <= MAX_EXPERTS) or out of it, as the reference reports it.
                Ok(id) if id >= -1 && (id as i64) < experts as i64 => Ok(id),
                _ => Err(MoleError::ExpertIdOutOfRange { token, slot: 0, id, experts }),
            })
            .collect::<Result<_>>()
            .map(Some),
        Values::Int(_) => {
            Err(MoleError::WrongShape { name: "adapter_ids".into(), expected: vec![tokens], got: t.shape.clone() })
        }
        Values::Float(_) => Err(MoleError::io("tensor `adapter_ids`", "expected integers (i32 or i64)")),
    }
}

/// An error naming the first input that is not one of `names`.
fn check_names(inputs: &TensorMap, names: &[&str]) -> Result<()> {
    match inputs.keys().find(|k| !names.contains(&k.as_str())) {
        Some(extra) => {
            Err(MoleError::io(format!("tensor `{extra}`"), format!("unknown input name; expected one of {names:?}")))
        }
        None => Ok(()),
    }
}

/// The routing and router-statistics outputs every eval writes: `ids`, `weights`, `probs`,
/// `selected_fraction`, `top1_fraction`, `mean_prob`, `masked_mean_prob`, `z_loss`, `entropy`.
fn insert_routing(m: &mut TensorMap, routing: Routing, stats: RouterStats) {
    let (tokens, slots, e) = (routing.tokens, routing.slots, routing.experts);
    m.insert("ids".into(), HostTensor::int(vec![tokens, slots], routing.ids.iter().map(|&i| i as i64).collect()));
    m.insert("weights".into(), HostTensor::float(vec![tokens, slots], routing.weights));
    if let Some(p) = routing.probs {
        m.insert("probs".into(), HostTensor::float(vec![tokens, e], p));
    }
    m.insert("selected_fraction".into(), HostTensor::float(vec![e], stats.selected_fraction));
    m.insert("top1_fraction".into(), HostTensor::float(vec![e], stats.top1_fraction));
    if let Some(p) = stats.mean_prob {
        m.insert("mean_prob".into(), HostTensor::float(vec![e], p));
    }
    if let Some(p) = stats.masked_mean_prob {
        m.insert("masked_mean_prob".into(), HostTensor::float(vec![e], p));
    }
    if let Some(z) = stats.z_loss {
        m.insert("z_loss".into(), HostTensor::float(vec![], vec![z]));
    }
    if let Some(h) = stats.entropy {
        m.insert("entropy".into(), HostTensor::float(vec![], vec![h]));
    }
}

/// What `mole eval` runs: a MoLE layer, or an FFN-expert block when the spec's JSON object has
/// the field `"f"` (the FFN's intermediate size, which no layer spec has).
#[derive(Clone, Debug, PartialEq)]
pub enum EvalSpec {
    /// A MoLE layer ([`LayerSpec::from_json`]), run by [`eval`].
    Layer(LayerSpec),
    /// An FFN-expert block ([`FfnSpec::from_json`]), run by [`eval_ffn`].
    Ffn(FfnSpec),
}

impl EvalSpec {
    /// Parses a spec file: an FFN block when its top-level object has `"f"`, else a layer.
    pub fn from_json(text: &str) -> Result<EvalSpec> {
        let is_ffn = serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.get("f").is_some());
        Ok(if is_ffn { EvalSpec::Ffn(FfnSpec::from_json(text)?) } else { EvalSpec::Layer(LayerSpec::from_json(text)?) })
    }

    /// Runs the spec through the f64 reference on named tensors.
    pub fn eval(&self, inputs: &TensorMap) -> Result<TensorMap> {
        match self {
            EvalSpec::Layer(spec) => eval(spec, inputs),
            EvalSpec::Ffn(spec) => eval_ffn(spec, inputs),
        }
    }
}
