//! The C ABI's reference calls against the Rust reference they wrap, on every method preset (so
//! every optional tensor of `MoleHostInputs` and every gradient of `MoleHostGrads` is routed to
//! its own field), and the thread-local error message.

use mole::{mole_last_error_message, mole_reference_backward, mole_reference_forward, mole_status};
use mole::{MoleHostGrads, MoleHostInputs};
use mole_core::model::{Gating, LayerInputs, LayerSpec, Method, MethodShape, Mix, Router};
use std::ffi::{CStr, CString};
use std::ptr::{null, null_mut};

/// Deterministic, non-zero test data.
fn data(n: usize, step: f64, phase: f64) -> Vec<f32> {
    (0..n).map(|i| (phase + step * i as f64).sin() as f32).collect()
}

/// The host tensors a spec takes, by name.
struct Tensors {
    x: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    y: Vec<f32>,
    router_weight: Option<Vec<f32>>,
    router_bias: Option<Vec<f32>>,
    logits: Option<Vec<f32>>,
    weights: Option<Vec<f32>>,
    adapter_ids: Option<Vec<i32>>,
    selection_bias: Option<Vec<f32>>,
    cores: Option<Vec<f32>>,
}

impl Tensors {
    fn for_spec(spec: &LayerSpec, t: usize) -> Self {
        let (d_in, d_out, r, e) = (spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
        let router = spec.router();
        Tensors {
            x: data(t * d_in, 0.37, 0.1),
            a: data(d_in * r, 0.11, 0.7),
            b: data(r * d_out, 0.23, 0.3),
            y: data(t * d_out, 0.5, 1.0),
            router_weight: match router {
                Some(Router::X { .. }) => Some(data(d_in * e, 0.7, 0.2)),
                Some(Router::H { .. }) => Some(data(r * e, 0.7, 0.2)),
                _ => None,
            },
            router_bias: matches!(router, Some(Router::X { bias: true } | Router::H { bias: true }))
                .then(|| data(e, 0.9, 0.4)),
            logits: (router == Some(Router::Logits)).then(|| data(t * e, 0.45, 0.6)),
            weights: matches!(spec.gating, Gating::Given { .. }).then(|| data(t * e, 0.29, 0.8)),
            adapter_ids: (spec.gating == Gating::AdapterIds)
                .then(|| (0..t).map(|i| (i % (e + 1)) as i32 - 1).collect()),
            selection_bias: spec.rule().is_some_and(|r| r.uses_selection_bias()).then(|| data(e, 0.61, 0.5)),
            cores: matches!(spec.mix, Mix::CoreMerge { .. }).then(|| data(e * r * r, 0.13, 0.35)),
        }
    }

    fn rust(&self, t: usize) -> LayerInputs<'_, f32> {
        let mut li = LayerInputs::new(t, &self.x, &self.a, &self.b, &self.y);
        li.router_weight = self.router_weight.as_deref();
        li.router_bias = self.router_bias.as_deref();
        li.logits = self.logits.as_deref();
        li.weights = self.weights.as_deref();
        li.adapter_ids = self.adapter_ids.as_deref();
        li.selection_bias = self.selection_bias.as_deref();
        li.cores = self.cores.as_deref();
        li
    }

    fn c(&self) -> MoleHostInputs {
        fn opt<T>(v: &Option<Vec<T>>) -> (*const T, usize) {
            v.as_ref().map_or((null(), 0), |v| (v.as_ptr(), v.len()))
        }
        let (router_weight, router_weight_len) = opt(&self.router_weight);
        let (router_bias, router_bias_len) = opt(&self.router_bias);
        let (logits, logits_len) = opt(&self.logits);
        let (weights, weights_len) = opt(&self.weights);
        let (adapter_ids, adapter_ids_len) = opt(&self.adapter_ids);
        let (selection_bias, selection_bias_len) = opt(&self.selection_bias);
        let (cores, cores_len) = opt(&self.cores);
        MoleHostInputs {
            x: self.x.as_ptr(),
            x_len: self.x.len(),
            a: self.a.as_ptr(),
            a_len: self.a.len(),
            b: self.b.as_ptr(),
            b_len: self.b.len(),
            y: self.y.as_ptr(),
            y_len: self.y.len(),
            router_weight,
            router_weight_len,
            router_bias,
            router_bias_len,
            logits,
            logits_len,
            weights,
            weights_len,
            adapter_ids,
            adapter_ids_len,
            selection_bias,
            selection_bias_len,
            cores,
            cores_len,
        }
    }
}

fn message() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(mole_last_error_message()) }.to_string_lossy().into_owned()
}

fn rounded(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Every preset: the C forward writes the Rust reference's `y` rounded to f32, bit for bit, and
/// its aux loss; the C backward writes each gradient the Rust backward computes into its own
/// field, bit for bit, from NaN-poisoned buffers.
#[test]
fn every_preset_matches_the_rust_reference_field_for_field() {
    let t = 5;
    let shape = MethodShape { d_in: 8, d_out: 6, experts: 4, rank: 2, k: 2, alpha: 4.0 };
    for method in Method::ALL {
        // Rank-wise experts (FlyLoRA, SMoRA) are of rank 1.
        let spec = method.spec(shape).or_else(|_| method.spec(MethodShape { rank: 1, experts: 8, ..shape })).unwrap();
        let json = CString::new(serde_json::to_string(&spec).unwrap()).unwrap();
        let tensors = Tensors::for_spec(&spec, t);
        let want = mole_core::reference::forward(&spec, &tensors.rust(t)).unwrap();
        let mut y = vec![f32::NAN; t * spec.d_out];
        let mut aux = f64::NAN;
        let inputs = tensors.c();
        // SAFETY: every pointer holds its count of elements and outlives the call.
        let status = unsafe { mole_reference_forward(json.as_ptr(), t, &inputs, y.as_mut_ptr(), y.len(), &mut aux) };
        assert_eq!(status, mole_status::MOLE_OK, "{method:?}: {}", message());
        assert_eq!(y, rounded(&want.y), "{method:?}: y");
        assert_eq!(aux.to_bits(), want.aux_loss.to_bits(), "{method:?}: aux_loss");
        assert!(
            want.y.iter().zip(&tensors.y).any(|(&w, &y0)| w != y0 as f64),
            "{method:?}: a zero delta tests nothing"
        );

        let dy = data(t * spec.d_out, 0.31, 0.9);
        let grads = mole_core::reference::backward(&spec, &tensors.rust(t), &dy).unwrap();
        let mut bufs: Vec<Option<Vec<f32>>> = [
            Some(&grads.x),
            grads.a.as_ref(),
            grads.b.as_ref(),
            grads.router_weight.as_ref(),
            grads.router_bias.as_ref(),
            grads.logits.as_ref(),
            grads.weights.as_ref(),
            grads.cores.as_ref(),
        ]
        .iter()
        .map(|g| g.map(|g| vec![f32::NAN; g.len()]))
        .collect();
        let mut ptr = |i: usize| bufs[i].as_mut().map_or((null_mut(), 0), |v| (v.as_mut_ptr(), v.len()));
        let ((x, x_len), (a, a_len), (b, b_len)) = (ptr(0), ptr(1), ptr(2));
        let ((router_weight, router_weight_len), (router_bias, router_bias_len)) = (ptr(3), ptr(4));
        let ((logits, logits_len), (weights, weights_len), (cores, cores_len)) = (ptr(5), ptr(6), ptr(7));
        let g = MoleHostGrads {
            x,
            x_len,
            a,
            a_len,
            b,
            b_len,
            router_weight,
            router_weight_len,
            router_bias,
            router_bias_len,
            logits,
            logits_len,
            weights,
            weights_len,
            cores,
            cores_len,
        };
        // SAFETY: every pointer holds its count of elements and outlives the call.
        let status = unsafe { mole_reference_backward(json.as_ptr(), t, &inputs, dy.as_ptr(), dy.len(), &g) };
        assert_eq!(status, mole_status::MOLE_OK, "{method:?}: {}", message());
        let want = [
            Some(&grads.x),
            grads.a.as_ref(),
            grads.b.as_ref(),
            grads.router_weight.as_ref(),
            grads.router_bias.as_ref(),
            grads.logits.as_ref(),
            grads.weights.as_ref(),
            grads.cores.as_ref(),
        ];
        for (i, (got, want)) in bufs.iter().zip(want).enumerate() {
            assert_eq!(got.as_deref(), want.map(|w| rounded(w)).as_deref(), "{method:?}: gradient {i}");
        }
    }
}

/// The message is per thread: a failure on one thread leaves another's message empty, and a
/// success clears the thread's own.
#[test]
fn the_last_error_message_is_per_thread_and_cleared_by_a_success() {
    // SAFETY: null arguments are refused before any is read.
    let status = unsafe { mole_reference_forward(null(), 0, null(), null_mut(), 0, null_mut()) };
    assert_eq!(status, mole_status::MOLE_ERROR_NULL_POINTER);
    assert!(message().contains("spec_json"), "{}", message());
    let other = std::thread::spawn(message).join().unwrap();
    assert_eq!(other, "", "another thread sees this thread's error");
    assert!(message().contains("spec_json"), "the message did not survive another thread's read");

    let spec = Method::LoraMoe.spec(MethodShape { d_in: 2, d_out: 2, experts: 2, rank: 1, k: 2, alpha: 1.0 }).unwrap();
    let json = CString::new(serde_json::to_string(&spec).unwrap()).unwrap();
    let tensors = Tensors::for_spec(&spec, 1);
    let mut y = [0f32; 2];
    // SAFETY: every pointer holds its count of elements and outlives the call.
    let status = unsafe { mole_reference_forward(json.as_ptr(), 1, &tensors.c(), y.as_mut_ptr(), 2, null_mut()) };
    assert_eq!(status, mole_status::MOLE_OK, "{}", message());
    assert_eq!(message(), "");
}
