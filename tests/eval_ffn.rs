//! `mole eval` on FFN-expert blocks: safetensors inputs in bf16 and f32, checked against the block
//! recomputed here by plain loops (routing included, not through `ffn_forward`), and errors that
//! name the tensor.

mod eval_io;

use eval_io::{floats, mole_eval, scaled, write};
use mole::model::{FfnSpec, ProjectionLora};
use mole::synth::Rng;
use mole::tensors::{EvalSpec, HostTensor, TensorMap, Values};
use safetensors::Dtype;

/// Top-2 renormalised, SiLU, a router with bias, ragged gate and down ranks (expert 1 has no
/// gate columns, expert 4 no down columns).
const SILU_TOP2: &str = r#"{"d": 24, "f": 40, "experts": 5, "activation": "silu",
    "gating": {"type": "routed", "router": {"type": "x", "bias": true},
               "rule": {"type": "softmax_topk", "k": 2, "weights": "renormalized"}},
    "gate": {"ranks": [0, 3, 3, 7, 8, 12], "scale": 1.5},
    "up": {"ranks": {"experts": 5, "rank": 2}, "scale": 0.75},
    "down": {"ranks": [0, 1, 4, 6, 9, 9], "scale": 2.0}}"#;

/// Top-p 0.8 (raw weights), GELU, no router bias, the up projection without LoRA.
const GELU_TOP_P: &str = r#"{"d": 24, "f": 40, "experts": 5, "activation": "gelu",
    "gating": {"type": "routed", "router": {"type": "x", "bias": false},
               "rule": {"type": "top_p", "p": 0.8}},
    "gate": {"ranks": [0, 2, 5, 5, 6, 10], "scale": 0.5},
    "down": {"ranks": {"experts": 5, "rank": 3}, "scale": 1.25}}"#;

const TOKENS: usize = 23;

fn ffn(text: &str) -> FfnSpec {
    match EvalSpec::from_json(text).unwrap() {
        EvalSpec::Ffn(spec) => spec,
        EvalSpec::Layer(_) => panic!("a spec with \"f\" is an FFN block"),
    }
}

/// The adapted projections: `(name, LoRA, n_in, n_out)`.
fn projections(s: &FfnSpec) -> [(&'static str, Option<&ProjectionLora>, usize, usize); 3] {
    [("gate", s.gate.as_ref(), s.d, s.f), ("up", s.up.as_ref(), s.d, s.f), ("down", s.down.as_ref(), s.f, s.d)]
}

fn has_bias(s: &FfnSpec) -> bool {
    s.router() == Some(mole::model::Router::X { bias: true })
}

/// Random non-zero inputs for `spec`, each value rounded to the file's dtype by `round`.
fn inputs(spec: &FfnSpec, seed: u64, round: fn(f64) -> f64) -> TensorMap {
    let mut rng = Rng::new(seed);
    let mut m = TensorMap::new();
    let mut put = |name: String, shape: Vec<usize>, amp: f64| {
        let v = rng.fill::<f64>(shape.iter().product(), amp).into_iter().map(round).collect();
        m.insert(name, HostTensor::float(shape, v));
    };
    let (d, f, e) = (spec.d, spec.f, spec.experts);
    put("x".into(), vec![TOKENS, d], 1.0);
    put("router_weight".into(), vec![d, e], 1.0);
    if has_bias(spec) {
        put("router_bias".into(), vec![e], 1.0);
    }
    put("base.gate".into(), vec![d, f], 0.4);
    put("base.up".into(), vec![d, f], 0.4);
    put("base.down".into(), vec![f, d], 0.4);
    for (name, lora, n_in, n_out) in projections(spec) {
        if let Some(l) = lora {
            let r = l.ranks.total_rank();
            put(format!("{name}.A"), vec![n_in, r], 0.5);
            put(format!("{name}.B"), vec![r, n_out], 0.5);
        }
    }
    m
}

/// What the block must compute, by plain loops: `(y, a_mix, ids, weights)`.
fn naive(spec: &FfnSpec, m: &TensorMap) -> (Vec<f64>, Vec<f64>, Vec<i64>, Vec<f64>) {
    let (d, f, e) = (spec.d, spec.f, spec.experts);
    let x = floats(m, "x");
    let w_r = floats(m, "router_weight");
    let mut out = (vec![], vec![], vec![], vec![]);
    for t in 0..TOKENS {
        let xt = &x[t * d..(t + 1) * d];
        let z: Vec<f64> = (0..e)
            .map(|j| {
                let b = if has_bias(spec) { floats(m, "router_bias")[j] } else { 0.0 };
                (0..d).map(|i| xt[i] * w_r[i * e + j]).sum::<f64>() + b
            })
            .collect();
        let zmax = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|z| (z - zmax).exp()).sum();
        let p: Vec<f64> = z.iter().map(|z| (z - zmax).exp() / sum).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a])); // stable: ties to the lower index
        let (chosen, weights, slots): (Vec<usize>, Vec<f64>, usize) = match spec.gating {
            mole::model::Gating::Routed { rule: mole::model::RoutingRule::SoftmaxTopK { k, .. }, .. } => {
                let top = &order[..k];
                let s: f64 = top.iter().map(|&j| p[j]).sum();
                (top.to_vec(), top.iter().map(|&j| p[j] / s).collect(), k)
            }
            mole::model::Gating::Routed { rule: mole::model::RoutingRule::TopP { p: top_p, .. }, .. } => {
                let (mut cum, mut n) = (0.0, 0);
                while n < e && cum <= top_p {
                    cum += p[order[n]];
                    n += 1;
                }
                (order[..n].to_vec(), order[..n].iter().map(|&j| p[j]).collect(), e)
            }
            ref g => panic!("no plain loop for {g:?}"),
        };
        let (mut y, mut a_mix) = (vec![0.0; d], vec![0.0; f]);
        for (&ex, &w) in chosen.iter().zip(&weights) {
            // v [n_in] · W [n_in, n_out] + s · (v · A[:, cols]) · B[cols, :] of projection p.
            let project = |p: usize, v: &[f64]| -> Vec<f64> {
                let (name, lora, n_in, n_out) = projections(spec)[p];
                let base = floats(m, &format!("base.{name}"));
                let mut o: Vec<f64> = (0..n_out).map(|j| (0..n_in).map(|i| v[i] * base[i * n_out + j]).sum()).collect();
                if let Some(l) = lora {
                    let (a, b, r) =
                        (floats(m, &format!("{name}.A")), floats(m, &format!("{name}.B")), l.ranks.total_rank());
                    for c in l.ranks.cols(ex) {
                        let h: f64 = (0..n_in).map(|i| v[i] * a[i * r + c]).sum();
                        (0..n_out).for_each(|j| o[j] += l.scale * h * b[c * n_out + j]);
                    }
                }
                o
            };
            let (g, u) = (project(0, xt), project(1, xt));
            let a: Vec<f64> = (0..f).map(|j| spec.activation.apply(g[j]) * u[j]).collect();
            let o = project(2, &a);
            (0..d).for_each(|j| y[j] += w * o[j]);
            (0..f).for_each(|j| a_mix[j] += w * a[j]);
        }
        out.0.extend(y);
        out.1.extend(a_mix);
        out.2.extend(chosen.iter().map(|&j| j as i64).chain(std::iter::repeat(-1)).take(slots));
        out.3.extend(weights.iter().cloned().chain(std::iter::repeat(0.0)).take(slots));
    }
    out
}

#[test]
fn block_eval_matches_plain_loops_in_bf16_and_f32() {
    let bf16 = |v: f64| half::bf16::from_f64(v).to_f64();
    let f32 = |v: f64| v as f32 as f64;
    let dir = tempfile::tempdir().unwrap();
    for (text, seed) in [(SILU_TOP2, 1), (GELU_TOP_P, 2)] {
        let spec = ffn(text);
        for (dtype, round) in [(Dtype::BF16, bf16 as fn(f64) -> f64), (Dtype::F32, f32 as fn(f64) -> f64)] {
            let m = inputs(&spec, seed, round);
            let path = dir.path().join("in.safetensors");
            write(&m, dtype, &path);
            let out = mole_eval(text, &path).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
            let (y, a_mix, ids, weights) = naive(&spec, &m);
            assert!(y.iter().any(|v| v.abs() > 0.1), "y is all but zero");
            // Both sides are f64 on the same (exactly widened) inputs: only the summation order
            // differs, over reductions of at most d + f + R terms.
            let tol = 8.0 * (spec.d + spec.f + 16) as f64 * f64::EPSILON;
            let (ey, ea) = (scaled(floats(&out, "y"), &y), scaled(floats(&out, "a_mix"), &a_mix));
            assert!(ey <= tol && ea <= tol, "{dtype:?} {text}: y {ey:.2e}, a_mix {ea:.2e} > {tol:.2e}");
            assert_eq!(out["ids"].values, Values::Int(ids.clone()), "{dtype:?}");
            assert_eq!(out["ids"].shape, vec![TOKENS, ids.len() / TOKENS]);
            assert!(scaled(floats(&out, "weights"), &weights) <= tol, "{dtype:?}");
            assert_eq!(out["a_mix"].shape, vec![TOKENS, spec.f]);
            // The router statistics, under the layer eval's names.
            let selected: Vec<f64> = (0..spec.experts)
                .map(|e| ids.iter().filter(|&&id| id == e as i64).count() as f64 / TOKENS as f64)
                .collect();
            assert!(scaled(floats(&out, "selected_fraction"), &selected) <= tol);
            assert!(out.contains_key("mean_prob") && out.contains_key("entropy") && out.contains_key("probs"));
            // Top-p picks a varying number of experts on these tokens (the rule is exercised).
            let counts: Vec<usize> =
                ids.chunks(ids.len() / TOKENS).map(|r| r.iter().filter(|&&i| i >= 0).count()).collect();
            if text == GELU_TOP_P {
                assert!(counts.iter().min() < counts.iter().max(), "{counts:?}");
            }
        }
    }
}

#[test]
fn block_eval_names_the_tensor() {
    let spec = ffn(GELU_TOP_P);
    let good = inputs(&spec, 3, |v| v);
    assert!(EvalSpec::Ffn(spec.clone()).eval(&good).is_ok());
    let err = |edit: &dyn Fn(&mut TensorMap)| {
        let mut m = good.clone();
        edit(&mut m);
        EvalSpec::from_json(GELU_TOP_P).unwrap().eval(&m).unwrap_err().to_string()
    };
    let e = err(&|m| drop(m.remove("gate.B")));
    assert!(e.contains("missing input `gate.B`"), "{e}");
    let e = err(&|m| drop(m.insert("up.A".into(), HostTensor::float(vec![24, 2], vec![1.0; 48]))));
    assert!(e.contains("unexpected input `up.A`"), "{e}");
    let e = err(&|m| drop(m.insert("base.down".into(), HostTensor::float(vec![24, 40], vec![1.0; 960]))));
    assert!(e.contains("tensor `base.down`: expected shape [40, 24], got [24, 40]"), "{e}");
    let e = err(&|m| drop(m.insert("router_bias".into(), HostTensor::float(vec![5], vec![1.0; 5]))));
    assert!(e.contains("unexpected input `router_bias`"), "{e}");
    let e = err(&|m| drop(m.remove("router_weight")));
    assert!(e.contains("missing input `router_weight`"), "{e}");
    let e = err(&|m| drop(m.insert("y".into(), HostTensor::float(vec![TOKENS, 24], vec![1.0; TOKENS * 24]))));
    assert!(e.contains("tensor `y`: unknown input name"), "{e}");
    let e = err(&|m| drop(m.insert("down.A".into(), HostTensor::float(vec![40, 14], vec![1.0; 560]))));
    assert!(e.contains("tensor `down.A`: expected shape [40, 15], got [40, 14]"), "{e}");
    let e = err(&|m| drop(m.insert("x".into(), HostTensor::float(vec![2, 23], vec![1.0; 46]))));
    assert!(e.contains("`x`"), "{e}");
    // A spec without "f" is a layer.
    let layer = r#"{"d_in": 2, "d_out": 2, "ranks": [0, 1, 2], "scale": 1.0, "gating": {"type": "adapter_ids"}}"#;
    assert!(matches!(EvalSpec::from_json(layer).unwrap(), EvalSpec::Layer(_)));
    // The binary says the same.
    let dir = tempfile::tempdir().unwrap();
    let mut m = good.clone();
    m.remove("base.up");
    let path = dir.path().join("in.safetensors");
    write(&m, Dtype::F32, &path);
    let e = mole_eval(GELU_TOP_P, &path).unwrap_err();
    assert!(e.contains("missing input `base.up`"), "{e}");
}
