//! Running `mole eval` from the tests: input files in a chosen dtype, the binary on a spec text,
//! and comparing its f64 outputs.

use mole::tensors::{load, TensorMap, Values};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;
use std::process::Command;

/// The float tensor `name` of `m` (panics when it is missing or integer).
pub fn floats<'a>(m: &'a TensorMap, name: &str) -> &'a [f64] {
    match &m.get(name).unwrap_or_else(|| panic!("no `{name}`")).values {
        Values::Float(v) => v,
        Values::Int(_) => panic!("{name} is not float"),
    }
}

/// The tensors as a safetensors file: floats in `dtype` (bf16 or f32; their values must be exact
/// in it), integers in i32.
pub fn write(m: &TensorMap, dtype: Dtype, path: &Path) {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = m
        .iter()
        .map(|(name, t)| {
            let (dt, bytes) = match &t.values {
                Values::Float(v) => (
                    dtype,
                    v.iter()
                        .flat_map(|&v| match dtype {
                            Dtype::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
                            Dtype::F32 => (v as f32).to_le_bytes().to_vec(),
                            _ => unreachable!("floats are written in bf16 or f32"),
                        })
                        .collect(),
                ),
                Values::Int(v) => (Dtype::I32, v.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect()),
            };
            (name.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        encoded.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// `mole eval` on a spec text and an input file (the spec and the outputs are written beside
/// it): the outputs, or stderr.
pub fn mole_eval(spec: &str, input: &Path) -> Result<TensorMap, String> {
    let dir = input.parent().unwrap();
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, spec).unwrap();
    let out_path = dir.join("out.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["eval", "--spec"])
        .arg(&spec_path)
        .arg("--inputs")
        .arg(input)
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(load(&out_path).unwrap())
}

/// Max of `|got - want| / (1 + max|want|)`.
pub fn scaled(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = 1.0 + want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max) / scale
}
