//! Fuzzing `mole eval`'s inputs: safetensors files of every preset's tensors in every float
//! dtype (ids as i32 or i64), with NaN and infinities, then truncated, corrupted, given foreign
//! headers (unsupported dtypes, huge or mismatched shapes), missing, extra or misshapen tensors
//! and out-of-range ids, with and without `dy` (the backward). Each case must give a typed error
//! or a correct result (`h = x · A` and `y = y0 + scale · h' · B`, recomputed here; with `dy`, a
//! `grad.x` shaped like `x`); nothing may panic or allocate beyond the bound.

mod fuzz;

use mole::model::LayerSpec;
use mole::synth::{Rng, SyntheticLayer};
use mole::tensors::{eval, load, Values};
use mole::MoleError;
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

#[global_allocator]
static ALLOC: fuzz::Bounded = fuzz::Bounded;

/// One tensor as stored: name, dtype, shape, bytes; and the exact values a reader must see.
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    values: Vec<f64>,
}

fn encode(name: &str, shape: Vec<usize>, v: &[f32], dtype: Dtype) -> Stored {
    let (bytes, values): (Vec<u8>, Vec<f64>) = match dtype {
        Dtype::F64 => {
            (v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(), v.iter().map(|&x| x as f64).collect())
        }
        Dtype::F32 => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), v.iter().map(|&x| x as f64).collect()),
        Dtype::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            (h.iter().flat_map(|x| x.to_le_bytes()).collect(), h.iter().map(|x| x.to_f64()).collect())
        }
        _ => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            (h.iter().flat_map(|x| x.to_le_bytes()).collect(), h.iter().map(|x| x.to_f64()).collect())
        }
    };
    Stored { name: name.into(), dtype, shape, bytes, values }
}

/// A float tensor of a synthetic layer: name, shape, values where the spec has it.
type Named<'a> = (&'a str, Vec<usize>, Option<&'a Vec<f32>>);

/// The tensors `spec` needs on `tokens` tokens (and `dy` when `with_dy`), each float one in
/// `dtypes[i % 4]`, with a NaN or an infinity planted where `poison` says.
fn layer_tensors(
    spec: &LayerSpec,
    tokens: usize,
    seed: u64,
    dtypes: &[Dtype; 4],
    poison: Option<(usize, usize)>,
    with_dy: bool,
) -> Vec<Stored> {
    let d = SyntheticLayer::<f32>::new(spec, tokens, seed);
    let dy = with_dy.then(|| Rng::new(seed ^ 1).fill::<f32>(tokens * spec.d_out, 1.0));
    let (r, e) = (spec.total_rank(), spec.routed_experts());
    let rows = if matches!(spec.router(), Some(mole::model::Router::H { .. })) { r } else { spec.d_in };
    let named: Vec<Named<'_>> = vec![
        ("x", vec![tokens, spec.d_in], Some(&d.x)),
        ("A", vec![spec.d_in, r], Some(&d.a)),
        ("B", vec![r, spec.d_out], Some(&d.b)),
        ("y", vec![tokens, spec.d_out], Some(&d.y)),
        ("router_weight", vec![rows, e], d.router_weight.as_ref()),
        ("router_bias", vec![e], d.router_bias.as_ref()),
        ("logits", vec![tokens, e], d.logits.as_ref()),
        ("weights", vec![tokens, e], d.weights.as_ref()),
        ("selection_bias", vec![e], d.selection_bias.as_ref()),
        ("cores", vec![e, r, r], d.cores.as_ref()),
        ("dy", vec![tokens, spec.d_out], dy.as_ref()),
    ];
    let mut out: Vec<Stored> = named
        .into_iter()
        .filter_map(|(n, s, v)| v.map(|v| (n, s, v.clone())))
        .enumerate()
        .map(|(i, (name, shape, mut v))| {
            if let Some((which, at)) = poison {
                if which % 11 == i && !v.is_empty() {
                    let len = v.len();
                    v[at % len] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][at % 3];
                }
            }
            encode(name, shape, &v, dtypes[i % 4])
        })
        .collect();
    if let Some(ids) = &d.adapter_ids {
        let wide = seed.is_multiple_of(2);
        let bytes = if wide {
            ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect()
        } else {
            ids.iter().flat_map(|&i| i.to_le_bytes()).collect()
        };
        let values = ids.iter().map(|&i| i as f64).collect();
        out.push(Stored {
            name: "adapter_ids".into(),
            dtype: if wide { Dtype::I64 } else { Dtype::I32 },
            shape: vec![tokens],
            bytes,
            values,
        });
    }
    out
}

fn serialize(tensors: &[Stored]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// A safetensors file from a header written by hand (any dtype string, shape, offsets).
fn raw_file(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..data_len).map(|i| (i * 37 % 251) as u8));
    out
}

fn floats<'a>(m: &'a mole::tensors::TensorMap, name: &str) -> &'a [f64] {
    match &m[name].values {
        Values::Float(v) => v,
        Values::Int(_) => panic!("{name} is not float"),
    }
}

/// `c [n, m] = a [n, k] · b [k, m]` and the sums of absolute products (the error scale).
fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; n * m];
    let mut mag = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            for l in 0..k {
                c[i * m + j] += a[i * k + l] * b[l * m + j];
                mag[i * m + j] += (a[i * k + l] * b[l * m + j]).abs();
            }
        }
    }
    (c, mag)
}

fn close(got: &[f64], want: &[f64], mag: &[f64]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).zip(mag).all(|((g, w), m)| (g - w).abs() <= 1e-12 * (m + w.abs() + 1e-300))
}

const DTYPES: [Dtype; 4] = [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16];
const FOREIGN_DTYPES: [&str; 8] = ["U8", "BOOL", "I16", "F8_E4M3", "F32", "BF16", "I64", "NOPE"];

proptest! {
    #![proptest_config(fuzz::config(128))]

    #[test]
    fn eval_inputs_give_a_typed_error_or_the_right_layer(
        spec in fuzz::small_spec(),
        tokens in 0usize..5,
        seed in any::<u64>(),
        dtypes in [0usize..4, 0usize..4, 0usize..4, 0usize..4],
        poison in prop::option::weighted(0.2, (0usize..11, any::<usize>())),
        with_dy in any::<bool>(),
        mutation in 0usize..8,
        at in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        foreign in (0usize..FOREIGN_DTYPES.len(), prop::collection::vec(prop::sample::select(vec![0usize, 1, 3, 1 << 20, 1 << 31, 1 << 40, usize::MAX]), 0..4), 0usize..64),
    ) {
        let dtypes = dtypes.map(|i| DTYPES[i]);
        let mut tensors = layer_tensors(&spec, tokens, seed, &dtypes, poison, with_dy);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.safetensors");
        // What the outcome must be, where the mutation decides it.
        let mut must_fail_naming: Option<String> = None;
        let bytes = match mutation {
            1 => {
                let full = serialize(&tensors);
                let n = cut.index(full.len());
                must_fail_naming = Some("reading".into());
                full[..n].to_vec()
            }
            2 => {
                let mut full = serialize(&tensors);
                let header = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
                let i = 8 + cut.index(header.max(1));
                full[i] ^= byte | 1;
                full
            }
            3 => {
                let (d, shape, len) = &foreign;
                let header = format!(
                    r#"{{"x": {{"dtype": "{}", "shape": {:?}, "data_offsets": [0, {len}]}}}}"#,
                    FOREIGN_DTYPES[*d], shape
                );
                raw_file(&header, *len)
            }
            4 => {
                let i = at.index(tensors.len());
                let gone = tensors.remove(i);
                if gone.name != "y" && gone.name != "dy" {
                    must_fail_naming = Some(format!("`{}`", gone.name));
                }
                serialize(&tensors)
            }
            5 => {
                tensors.push(encode("bogus", vec![1], &[1.0], Dtype::F32));
                must_fail_naming = Some("`bogus`".into());
                serialize(&tensors)
            }
            6 => {
                let i = at.index(tensors.len());
                let t = &mut tensors[i];
                // Same bytes, one more (unit) dimension: a shape no input has.
                t.shape.insert(0, 1);
                must_fail_naming = Some(format!("`{}`", t.name));
                serialize(&tensors)
            }
            7 if tensors.iter().any(|t| t.name == "adapter_ids") && tokens > 0 => {
                let bad = [i64::from(i32::MAX) + 1, i64::MIN, -2, spec.routed_experts() as i64][cut.index(4)];
                let ids: Vec<i64> = (0..tokens).map(|t| if t == 0 { bad } else { 0 }).collect();
                let t = tensors.iter_mut().find(|t| t.name == "adapter_ids").unwrap();
                t.dtype = Dtype::I64;
                t.bytes = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
                must_fail_naming = Some(format!("expert id {bad} at token 0"));
                serialize(&tensors)
            }
            _ => serialize(&tensors),
        };
        std::fs::write(&path, &bytes).unwrap();
        let result = load(&path).and_then(|m| eval(&spec, &m).map(|out| (m, out)));
        match (&result, &must_fail_naming) {
            (Err(e), Some(name)) => prop_assert!(e.to_string().contains(name.as_str()), "{e} should name {name}"),
            (Ok(_), Some(name)) => prop_assert!(false, "mutation {mutation} should fail naming {name}"),
            (Err(e), None) if mutation == 0 || mutation == 7 => prop_assert!(false, "a valid file failed: {e}"),
            (Err(e), None) => prop_assert!(!matches!(e, MoleError::Cuda { .. }), "{e}"),
            (Ok((_, out)), None) if mutation == 0 || mutation == 7 => {
                let (t, r, e) = (tokens, spec.total_rank(), spec.routed_experts());
                let value = |name: &str| tensors.iter().find(|s| s.name == name).unwrap().values.clone();
                let ids = match &out["ids"].values { Values::Int(v) => v.clone(), _ => panic!("ids") };
                prop_assert!(ids.iter().all(|&i| (-1..e as i64).contains(&i)), "{ids:?}");
                prop_assert_eq!(&out["y"].shape, &vec![t, spec.d_out]);
                let has_dy = tensors.iter().any(|s| s.name == "dy");
                prop_assert_eq!(out.get("grad.x").map(|g| g.shape.clone()), has_dy.then(|| vec![t, spec.d_in]));
                if poison.is_none() {
                    let (h, mag) = matmul(&value("x"), &value("A"), t, spec.d_in, r);
                    prop_assert!(close(floats(out, "h"), &h, &mag), "h differs");
                    let (delta, mag) = matmul(floats(out, "h_mixed"), &value("B"), t, r, spec.d_out);
                    let y0 = value("y");
                    let want: Vec<f64> = y0.iter().zip(&delta).map(|(y, d)| y + spec.scale * d).collect();
                    let mag: Vec<f64> = mag.iter().zip(&y0).map(|(m, y)| spec.scale.abs() * m + y.abs()).collect();
                    prop_assert!(close(floats(out, "y"), &want, &mag), "y differs");
                }
            }
            (Ok(_), None) => {}
        }
    }
}

#[test]
fn a_layer_too_large_for_memory_is_refused_before_it_is_allocated() {
    let _ = fuzz::config(1);
    let spec = LayerSpec::from_json(
        r#"{"d_in": 4, "d_out": 1048576, "ranks": {"experts": 2, "rank": 8}, "scale": 1.0,
            "gating": {"type": "routed", "router": {"type": "logits"}, "rule": {"type": "softmax_topk", "k": 1}}}"#,
    )
    .unwrap();
    let mut inputs = mole::tensors::TensorMap::new();
    inputs.insert("x".into(), mole::tensors::HostTensor::float(vec![64, 4], vec![0.5; 256]));
    // y [64, 2^20] alone would be 512 MiB of f64: the check comes before any of it.
    let e = eval(&spec, &inputs).unwrap_err();
    assert!(matches!(e, MoleError::OutOfMemory { memory: "host", .. }), "{e}");
    assert!(e.to_string().contains("this layer on 64 tokens"), "{e}");
}

proptest! {
    #![proptest_config(fuzz::config(128))]

    #[test]
    fn adapter_ids_of_any_width_are_used_or_named(
        experts in 1usize..6,
        ids in prop::collection::vec(
            prop_oneof![4 => -1i64..6, 1 => prop::sample::select(vec![-2i64, i64::from(i32::MIN), i64::from(i32::MAX) + 1, 1 << 40, i64::MIN, i64::MAX])],
            1..6,
        ),
        wide in any::<bool>(),
    ) {
        let spec = mole::model::Method::AdapterServing
            .spec(mole::model::MethodShape { d_in: 3, d_out: 2, experts, rank: 2, k: 1, alpha: 2.0 })
            .unwrap();
        let tokens = ids.len();
        let mut tensors = layer_tensors(&spec, tokens, 7, &DTYPES, None, false);
        let fits = ids.iter().all(|&i| i32::try_from(i).is_ok());
        let t = tensors.iter_mut().find(|t| t.name == "adapter_ids").unwrap();
        (t.dtype, t.bytes) = if wide || !fits {
            (Dtype::I64, ids.iter().flat_map(|i| i.to_le_bytes()).collect())
        } else {
            (Dtype::I32, ids.iter().flat_map(|&i| (i as i32).to_le_bytes()).collect())
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.safetensors");
        std::fs::write(&path, serialize(&tensors)).unwrap();
        let result = load(&path).and_then(|m| eval(&spec, &m));
        match ids.iter().position(|&i| i < -1 || i >= experts as i64) {
            None => {
                let out = result.unwrap();
                prop_assert_eq!(&out["ids"].values, &Values::Int(ids.clone()));
            }
            Some(token) => {
                let want = MoleError::ExpertIdOutOfRange { token, slot: 0, id: ids[token], experts };
                prop_assert_eq!(result.unwrap_err(), want);
            }
        }
    }
}
