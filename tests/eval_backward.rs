//! `mole eval` with `dy`: the gradients of `Σ dy · y + aux_loss` it writes, on bf16 and f32 files,
//! against the reference backward computed here on the same (dtype-rounded) inputs, and against
//! central differences of the f64 forward on small f32 inputs (each gradient under its input's
//! name); the exact set of outputs (no gradient for a frozen parameter, `aux_loss` where the spec
//! declares losses or `dy` is given, the forward's outputs unchanged) and the errors for a
//! misshapen `dy`.

mod eval_io;

use eval_io::{floats, mole_eval, scaled, write};
use mole::model::{
    AuxLosses, Balance, Gating, LayerParam, LayerSpec, Method, MethodShape, Router, RoutingRule, TopKWeights, Training,
};
use mole::reference::{backward, forward, LayerGrads};
use mole::synth::{Rng, SyntheticLayer};
use mole::tensors::{save, HostTensor, TensorMap};
use safetensors::Dtype;
use std::collections::BTreeSet;

/// A spec and the inputs `mole eval` must write a gradient of (`grad.<input>`), by hand.
struct Case {
    name: &'static str,
    spec: LayerSpec,
    grads: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    let shape = |experts, rank, k| MethodShape { d_in: 12, d_out: 9, experts, rank, k, alpha: 2.0 };
    let base = Method::MixLoraPerLinear.spec(shape(5, 2, 2)).unwrap();
    let with = |gating, training| {
        let spec = LayerSpec { gating, training, ..base.clone() };
        spec.validate().unwrap();
        spec
    };
    let renorm = RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized };
    let x_bias = Gating::Routed { router: Router::X { bias: true }, rule: renorm };
    let every_loss = AuxLosses { load_balancing: 0.3, z_loss: 0.05, entropy: 0.2, ..Default::default() };
    let dynmole_z = AuxLosses { load_balancing: 0.5, balance: Balance::DynMole, z_loss: 0.1, ..Default::default() };
    let aux = |aux_losses| Training { aux_losses, ..Default::default() };
    let frozen = Training { frozen: vec![LayerParam::Router], ..Default::default() };
    let given = Gating::Given { top_k: Some(3), softmax_topk: true };
    let logits = Gating::Routed { router: Router::Logits, rule: renorm };
    let fly = Method::FlyLora.spec(shape(6, 1, 2)).unwrap();
    assert_eq!(fly.training.frozen, vec![LayerParam::A], "FlyLoRA's preset freezes A");
    vec![
        Case {
            name: "x router with bias, switch balance, z-loss and entropy",
            spec: with(x_bias, aux(every_loss)),
            grads: &["x", "A", "B", "router_weight", "router_bias"],
        },
        Case {
            name: "comol (h router, cores)",
            spec: Method::Comol.spec(shape(4, 3, 2)).unwrap(),
            grads: &["x", "A", "B", "router_weight", "cores"],
        },
        Case {
            name: "given weights, softmaxed top-3",
            spec: with(given, Training::default()),
            grads: &["x", "A", "B", "weights"],
        },
        Case { name: "x router with bias, frozen", spec: with(x_bias, frozen), grads: &["x", "A", "B"] },
        Case {
            name: "logits, dynmole balance and z-loss",
            spec: with(logits, aux(dynmole_z)),
            grads: &["x", "A", "B", "logits"],
        },
        Case { name: "fly-lora (A frozen by the preset)", spec: fly, grads: &["x", "B"] },
    ]
}

/// A float input of a layer call: its `mole eval` name, its values where the spec takes it, its shape.
type Named<'a> = (&'static str, Option<&'a mut Vec<f64>>, Vec<usize>);

/// The float inputs of a layer call by their `mole eval` names, with their shapes.
fn named<'a>(spec: &LayerSpec, d: &'a mut SyntheticLayer<f64>) -> Vec<Named<'a>> {
    let (t, r, e, d_in, d_out) = (d.tokens, spec.total_rank(), spec.routed_experts(), spec.d_in, spec.d_out);
    let rows = if matches!(spec.router(), Some(Router::H { .. })) { r } else { d_in };
    vec![
        ("x", Some(&mut d.x), vec![t, d_in]),
        ("A", Some(&mut d.a), vec![d_in, r]),
        ("B", Some(&mut d.b), vec![r, d_out]),
        ("y", Some(&mut d.y), vec![t, d_out]),
        ("router_weight", d.router_weight.as_mut(), vec![rows, e]),
        ("router_bias", d.router_bias.as_mut(), vec![e]),
        ("logits", d.logits.as_mut(), vec![t, e]),
        ("weights", d.weights.as_mut(), vec![t, e]),
        ("selection_bias", d.selection_bias.as_mut(), vec![e]),
        ("cores", d.cores.as_mut(), vec![spec.core_count(), r, r]),
    ]
}

/// Random inputs of `spec` with every value rounded to the file's dtype, and `dy` likewise.
fn inputs(spec: &LayerSpec, tokens: usize, seed: u64, round: fn(f64) -> f64) -> (SyntheticLayer<f64>, Vec<f64>) {
    let mut data = SyntheticLayer::<f64>::new(spec, tokens, seed);
    assert!(data.adapter_ids.is_none(), "no case here gates by adapter ids");
    for (_, v, _) in named(spec, &mut data) {
        v.into_iter().flatten().for_each(|v| *v = round(*v));
    }
    let dy = Rng::new(seed + 1000).fill::<f64>(tokens * spec.d_out, 1.0).into_iter().map(round).collect();
    (data, dy)
}

/// The input file's tensors (with `dy` when given).
fn tensor_map(spec: &LayerSpec, data: &SyntheticLayer<f64>, dy: Option<&[f64]>) -> TensorMap {
    let mut data = data.clone();
    let mut m: TensorMap = named(spec, &mut data)
        .into_iter()
        .filter_map(|(name, v, shape)| Some((name.to_string(), HostTensor::float(shape, v?.clone()))))
        .collect();
    if let Some(dy) = dy {
        m.insert("dy".into(), HostTensor::float(vec![data.tokens, spec.d_out], dy.to_vec()));
    }
    m
}

fn grad<'a>(g: &'a LayerGrads, name: &str) -> Option<&'a Vec<f64>> {
    match name {
        "x" => Some(&g.x),
        "A" => g.a.as_ref(),
        "B" => g.b.as_ref(),
        "router_weight" => g.router_weight.as_ref(),
        "router_bias" => g.router_bias.as_ref(),
        "logits" => g.logits.as_ref(),
        "weights" => g.weights.as_ref(),
        "cores" => g.cores.as_ref(),
        _ => None,
    }
}

/// Runs `mole eval` on `data` in `dtype` with and without `dy`; checks the names (exactly the
/// forward's, `aux_loss`, and the case's gradients) and that `dy` changes no forward output.
/// Returns the outputs with `dy`.
fn eval_with_dy(case: &Case, data: &SyntheticLayer<f64>, dy: &[f64], dtype: Dtype) -> TensorMap {
    let (spec, dir) = (&case.spec, tempfile::tempdir().unwrap());
    let json = serde_json::to_string(spec).unwrap();
    let path = dir.path().join("in.safetensors");
    write(&tensor_map(spec, data, None), dtype, &path);
    let plain = mole_eval(&json, &path).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    write(&tensor_map(spec, data, Some(dy)), dtype, &path);
    let out = mole_eval(&json, &path).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let declared = spec.training.aux_losses.any();
    assert_eq!(plain.contains_key("aux_loss"), declared, "{}: aux_loss without dy", case.name);
    assert!(plain.keys().all(|k| !k.starts_with("grad.")), "{}: a gradient without dy", case.name);
    let mut want: BTreeSet<String> = plain.keys().cloned().collect();
    want.insert("aux_loss".into());
    want.extend(case.grads.iter().map(|g| format!("grad.{g}")));
    assert_eq!(out.keys().cloned().collect::<BTreeSet<_>>(), want, "{}", case.name);
    for (name, t) in &plain {
        assert_eq!(&out[name], t, "{}: `{name}` changed with dy", case.name);
    }
    out
}

#[test]
fn gradients_match_the_reference_backward_in_bf16_and_f32() {
    let bf16 = |v: f64| half::bf16::from_f64(v).to_f64();
    let f32 = |v: f64| v as f32 as f64;
    for (seed, case) in (1..).zip(cases()) {
        let spec = &case.spec;
        for (dtype, round) in [(Dtype::BF16, bf16 as fn(f64) -> f64), (Dtype::F32, f32 as fn(f64) -> f64)] {
            let (mut data, dy) = inputs(spec, 11, seed, round);
            let out = eval_with_dy(&case, &data, &dy, dtype);
            let grads = backward(spec, &data.inputs(), &dy).unwrap();
            let aux = forward(spec, &data.inputs()).unwrap().aux_loss;
            // Both sides are f64 on the same (exactly widened) inputs: at most the summation order
            // differs, over reductions of at most T + d_in + d_out + R + E terms.
            let n = 11 + spec.d_in + spec.d_out + spec.total_rank() + spec.routed_experts();
            let tol = 16.0 * n as f64 * f64::EPSILON;
            let what = format!("{} ({dtype:?})", case.name);
            assert_eq!(out["aux_loss"].shape, Vec::<usize>::new(), "{what}: aux_loss is a scalar");
            assert!(scaled(floats(&out, "aux_loss"), &[aux]) <= tol, "{what}: aux_loss");
            assert_eq!(aux != 0.0, spec.training.aux_losses.any(), "{what}: aux_loss {aux}");
            let shapes = named(spec, &mut data);
            let mut worst = 0f64;
            for &g in case.grads {
                let want = grad(&grads, g).unwrap_or_else(|| panic!("{what}: the reference has no d{g}"));
                let name = format!("grad.{g}");
                let shape = &shapes.iter().find(|s| s.0 == g).unwrap().2;
                assert_eq!(&out[&name].shape, shape, "{what}: `{name}` is shaped like `{g}`");
                assert!(want.iter().any(|v| v.abs() > 1e-6), "{what}: d{g} is all but zero");
                let err = scaled(floats(&out, &name), want);
                assert!(err <= tol, "{what}: `{name}` is {err:.2e} off the reference (> {tol:.2e})");
                worst = worst.max(err);
            }
            eprintln!("{what}: {} gradients, worst scaled error {worst:.1e} (tolerance {tol:.1e})", case.grads.len());
        }
    }
}

/// `Σ dy · y + aux_loss` of the f64 forward and the routing ids.
fn loss(spec: &LayerSpec, data: &SyntheticLayer<f64>, dy: &[f64]) -> (f64, f64, Vec<i32>) {
    let out = forward(spec, &data.inputs()).unwrap();
    let l = out.y.iter().zip(dy).map(|(y, d)| y * d).sum::<f64>() + out.aux_loss;
    let abs = out.y.iter().zip(dy).map(|(y, d)| (y * d).abs()).sum::<f64>() + out.aux_loss.abs();
    (l, abs, out.routing.ids)
}

/// Every gradient `mole eval` writes against central differences of the f64 forward on the input
/// of the same name; `Err` when a step changes the selection (the backward holds it constant).
fn central_differences(case: &Case, seed: u64) -> Result<f64, String> {
    let spec = &case.spec;
    let (data, dy) = inputs(spec, 4, seed, |v| v as f32 as f64);
    let out = eval_with_dy(case, &data, &dy, Dtype::F32);
    let (_, _, ids) = loss(spec, &data, &dy);
    let mut worst = 0f64;
    for &g in case.grads {
        let got = floats(&out, &format!("grad.{g}"));
        let mut probe = data.clone();
        let at = |probe: &mut SyntheticLayer<f64>, i: usize, v: f64| {
            let mut slots = named(spec, probe);
            slots.iter_mut().find(|s| s.0 == g).unwrap().1.as_mut().unwrap()[i] = v;
        };
        let len = named(spec, &mut probe).into_iter().find(|s| s.0 == g).unwrap().1.unwrap().len();
        assert_eq!(got.len(), len, "{}: `grad.{g}` has the length of `{g}`", case.name);
        for (i, &gi) in got.iter().enumerate() {
            let v = named(spec, &mut probe).into_iter().find(|s| s.0 == g).unwrap().1.unwrap()[i];
            // Step ~1e-6 relative; the selection must hold 100 steps further out.
            let h = 1e-6 * (1.0 + v.abs());
            let mut eval_at = |dv: f64| {
                at(&mut probe, i, v + dv);
                let r = loss(spec, &probe, &dy);
                at(&mut probe, i, v);
                r
            };
            let ((lp, ap, ip), (lm, am, im)) = (eval_at(h), eval_at(-h));
            let (far_p, far_m) = (eval_at(100.0 * h).2, eval_at(-100.0 * h).2);
            if [&ip, &im, &far_p, &far_m].iter().any(|s| **s != ids) {
                return Err(format!("{g}[{i}] is within a margin of a selection tie"));
            }
            let step = (v + h) - (v - h);
            let fd = (lp - lm) / step;
            // The two losses' roundoff over the step and the O(h²) truncation, at the loss's scale.
            let scale = ap.max(am) + 1.0;
            let tol = 1e2 * f64::EPSILON * scale / step + 1e2 * h * h * scale;
            let err = (fd - gi).abs();
            assert!(err <= tol, "{}: grad.{g}[{i}] = {gi}, differences {fd} ({err:.2e} > {tol:.2e})", case.name);
            worst = worst.max(err / tol);
        }
    }
    Ok(worst)
}

#[test]
fn each_gradient_is_the_derivative_of_the_loss_by_its_input() {
    for case in cases() {
        let mut seed = 21;
        let worst = loop {
            match central_differences(&case, seed) {
                Ok(worst) => break worst,
                Err(why) if seed < 40 => eprintln!("{}, seed {seed}: {why}; another seed", case.name),
                Err(why) => panic!("{}: no seed without a near tie ({why})", case.name),
            }
            seed += 1;
        };
        eprintln!("{}: worst |fd - grad| / tol = {worst:.2e} (seed {seed})", case.name);
    }
}

#[test]
fn a_misshapen_dy_is_named() {
    let case = cases().remove(0);
    let spec = &case.spec;
    let (t, d_out) = (5, spec.d_out);
    let (data, dy) = inputs(spec, t, 3, |v| v);
    let json = serde_json::to_string(spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.safetensors");
    let run = |dy: HostTensor| {
        let mut m = tensor_map(spec, &data, None);
        m.insert("dy".into(), dy);
        save(&path, &m).unwrap();
        mole_eval(&json, &path)
    };
    assert!(run(HostTensor::float(vec![t, d_out], dy.clone())).is_ok());
    for shape in [vec![t, d_out + 1], vec![t + 1, d_out], vec![t * d_out], vec![d_out, t]] {
        let n = shape.iter().product();
        let e = run(HostTensor::float(shape.clone(), vec![0.5; n])).unwrap_err();
        let want = format!("tensor `dy`: expected shape [{t}, {d_out}], got {shape:?}");
        assert!(e.contains(&want), "{shape:?}: {e}");
    }
    let e = run(HostTensor::int(vec![t, d_out], vec![1; t * d_out])).unwrap_err();
    assert!(e.contains("tensor `dy`") && e.contains("float"), "{e}");
}

#[test]
fn the_help_documents_dy_and_the_gradients() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mole")).args(["eval", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in
        ["`dy [T, d_out]`", "Σ dy · y + aux_loss", "selection held constant", "grad.cores", "frozen", "aux_loss"]
    {
        assert!(help.contains(word), "`mole eval --help` does not say {word}:\n{help}");
    }
}
