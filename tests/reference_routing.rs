//! Hand-computed cases for every routing rule, the statistics and the composed layer. The
//! expected numbers were worked out by hand (and with a calculator) from the rule definitions.

use mole::model::{
    Entropy, Gating, LayerInputs, LayerSpec, Mix, RankLayout, RankSelection, Router, RoutingRule, TopKWeights,
};
use mole::reference::routing::*;
use mole::reference::{forward, route, router_stats, GateInput};

const EPS: f64 = 1e-12;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + b.abs())
}

fn assert_sel(got: &[(usize, f64)], want: &[(usize, f64)]) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.0 == w.0 && close(g.1, w.1), "got {got:?}, want {want:?}");
    }
}

#[test]
fn softmax_topk_ties_go_to_the_lower_index() {
    // z = [1, 3, 2, 3]: p = e^(z-3) / Σ = [0.054065, 0.399486, 0.146963, 0.399486].
    let z = [1.0, 3.0, 2.0, 3.0];
    let p1 = 0.39948630465030277;
    let (s, p) = softmax_topk(&z, 2, 1.0, TopKWeights::Renormalized);
    assert_sel(&s, &[(1, 0.5), (3, 0.5)]);
    assert!(close(p[0], 0.05406459218899647) && close(p[2], 0.14696279851039795));
    assert_sel(&softmax_topk(&z, 2, 1.0, TopKWeights::Softmax).0, &[(1, p1), (3, p1)]);
    assert_sel(&softmax_topk(&z, 3, 1.0, TopKWeights::Unit).0, &[(1, 1.0), (3, 1.0), (2, 1.0)]);
}

#[test]
fn softmax_topk_temperature() {
    // softmax([2, 0] / 2) = [e / (e + 1), 1 / (e + 1)].
    assert_sel(&softmax_topk(&[2.0, 0.0], 1, 2.0, TopKWeights::Softmax).0, &[(0, 0.7310585786300049)]);
}

#[test]
fn top_p_keeps_through_the_first_expert_that_crosses() {
    let z = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()]; // p = [0.5, 0.3, 0.2]
    assert_sel(&top_p(&z, 0.6, 1.0).0, &[(0, 0.5), (1, 0.3)]);
    // 0.5 does not exceed 0.5, so the second expert is needed.
    assert_sel(&top_p(&z, 0.5, 1.0).0, &[(0, 0.5), (1, 0.3)]);
    assert_sel(&top_p(&z, 0.4, 1.0).0, &[(0, 0.5)]);
    assert_sel(&top_p(&z, 1.0, 1.0).0, &[(0, 0.5), (1, 0.3), (2, 0.2)]);
}

#[test]
fn tsallis_entropy_hand_values() {
    // q = 2: (1 - Σp²) / (1 - 1/3) = 0.46 / 0.6667 = 0.69; Shannon: 0.801819 / ln 3 = 0.729847.
    let p = [0.7, 0.2, 0.1];
    assert!(close(normalized_tsallis_entropy(&p, 2.0), 0.69));
    assert!(close(normalized_tsallis_entropy(&p, 1.0), 0.7298466991620974));
    assert!(close(normalized_tsallis_entropy(&[1.0 / 3.0; 3], 1.5), 1.0));
    assert_eq!(normalized_tsallis_entropy(&[1.0, 0.0, 0.0], 1.0), 0.0);
    assert_eq!(normalized_tsallis_entropy(&[0.0; 3], 2.0), 0.0);
}

#[test]
fn dynmole_switches_on_entropy() {
    let z = [0.7f64.ln(), 0.2f64.ln(), 0.1f64.ln()]; // p = [0.7, 0.2, 0.1], H_2 = 0.69
                                                     // Below the threshold: cumsum 0.7 <= 0.75 keeps expert 0; 0.9 and 1.0 exceed it.
    assert_sel(&dynmole(&z, Entropy { q: 2.0, eps: 0.0 }, 0.75, 1, 0.9).0, &[(0, 0.7)]);
    // keep_top_k = 2 keeps the second one too.
    assert_sel(&dynmole(&z, Entropy { q: 2.0, eps: 0.0 }, 0.75, 2, 0.9).0, &[(0, 0.7), (1, 0.2)]);
    // Above the threshold (0.69 > 0.6): every expert, raw p.
    assert_sel(&dynmole(&z, Entropy { q: 2.0, eps: 0.0 }, 0.75, 1, 0.6).0, &[(0, 0.7), (1, 0.2), (2, 0.1)]);
}

#[test]
fn dense_softmax_orders_by_score() {
    let z = [0.2f64.ln(), 0.5f64.ln(), 0.3f64.ln()];
    assert_sel(&dense_softmax(&z, 1.0).0, &[(1, 0.5), (2, 0.3), (0, 0.2)]);
}

#[test]
fn smora_bias_steers_selection_not_weights() {
    // s = sigmoid([0, 2, -1, 1]) = [0.5, 0.880797, 0.268941, 0.731059]; s + b = [1.0, 0.88, 0.27, 0.73].
    // Without the bias experts 1 and 3 win; with it, 0 and 1. Weights: 2 · s / (s0 + s1).
    let z = [0.0, 2.0, -1.0, 1.0];
    let (s, _) = sigmoid_topk(&z, 2, Some(&[0.5, 0.0, 0.0, 0.0]));
    assert_sel(&s, &[(0, 0.7242193773066619), (1, 1.2757806226933384)]);
    let (s, _) = sigmoid_topk(&z, 2, None);
    assert_eq!(s.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!(close(s.iter().map(|x| x.1).sum::<f64>(), 2.0));
}

#[test]
fn flylora_selects_by_biased_magnitude() {
    // |z + b| = [0.5, 2, 1, 1.4].
    let s = magnitude_topk(&[0.5, -2.0, 1.0, -0.1], 2, Some(&[0.0, 0.0, 0.0, 1.5]), RankSelection::Magnitude);
    assert_sel(&s, &[(1, 1.0), (3, 1.0)]);
}

#[test]
fn given_weights_top_k_and_softmax() {
    assert_sel(&given(&[0.1, 0.4, 0.4, 0.1], Some(2), false), &[(1, 0.4), (2, 0.4)]);
    assert_sel(&given(&[0.1, 0.4, 0.4, 0.1], Some(2), true), &[(1, 0.5), (2, 0.5)]);
    // softmax([0.5, 0.3]) = [0.549834, 0.450166].
    assert_sel(&given(&[0.2, 0.5, 0.3], Some(2), true), &[(1, 0.549833997312478), (2, 0.450166002687522)]);
    assert_sel(&given(&[0.2, 0.5, 0.3], None, false), &[(1, 0.5), (2, 0.3), (0, 0.2)]);
}

#[test]
fn nan_and_infinities_are_defined() {
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    // NaN ranks as -inf: ties with the -inf entry, lower index first.
    let (s, p) = softmax_topk(&[nan, 1.0, -inf], 2, 1.0, TopKWeights::Renormalized);
    assert_sel(&s, &[(1, 1.0), (0, 0.0)]);
    assert_eq!(p, vec![0.0, 1.0, 0.0]);
    // +inf entries share probability 1.
    assert_eq!(softmax(&[inf, 0.0, inf], 1.0), vec![0.5, 0.0, 0.5]);
    // A fully masked token: zero probabilities, zero weights, no NaN.
    let (s, p) = softmax_topk(&[-inf, nan], 2, 1.0, TopKWeights::Renormalized);
    assert_sel(&s, &[(0, 0.0), (1, 0.0)]);
    assert_eq!(p, vec![0.0, 0.0]);
    assert_eq!(logsumexp(&[-inf, nan]), -inf);
    assert_eq!(sigmoid(nan), 0.0);
    // -0.0 and 0.0 tie.
    assert_eq!(descending_order(&[-0.0, 0.0]), vec![0, 1]);
}

#[test]
fn route_fills_slots_and_marks_empty_ones() {
    let gating = Gating::Routed { router: Router::Logits, rule: RoutingRule::TopP { p: 0.6, temperature: 1.0 } };
    let z = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln(), 0.0, 0.0, 1e3];
    let r = route(&gating, GateInput::Scores(&z, None), 2, 3).unwrap();
    assert_eq!(r.slots, 3);
    assert_eq!(r.ids, vec![0, 1, -1, 2, -1, -1]);
    assert!(close(r.weights[1], 0.3) && r.weights[2] == 0.0 && close(r.weights[3], 1.0));
    let ids = route(&Gating::AdapterIds, GateInput::AdapterIds(&[2, -1, 0]), 3, 3).unwrap();
    assert_eq!(ids.ids, vec![2, -1, 0]);
    assert_eq!(ids.weights, vec![1.0, 0.0, 1.0]);
}

#[test]
fn router_stats_hand_values() {
    // Token 0: z = [0, 0, 0], p = 1/3 each, top-1 = expert 0. Token 1: z = [0, ln 3, 0],
    // p = [0.2, 0.6, 0.2], top-1 = expert 1.
    let rule = RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Renormalized };
    let gating = Gating::Routed { router: Router::Logits, rule };
    let z = [0.0, 0.0, 0.0, 0.0, 3f64.ln(), 0.0];
    let r = route(&gating, GateInput::Scores(&z, None), 2, 3).unwrap();
    let s = router_stats(&r, Some(&z), Some(Entropy::SHANNON));
    assert_eq!(s.selected_fraction, vec![0.5, 0.5, 0.0]);
    let mp = s.mean_prob.unwrap();
    assert!(close(mp[0], (1.0 / 3.0 + 0.2) / 2.0) && close(mp[1], (1.0 / 3.0 + 0.6) / 2.0));
    // z-loss = (ln²3 + ln²5) / 2; entropy = (1 + 0.864974) / 2.
    assert!(close(s.z_loss.unwrap(), 1.8986196773964084));
    assert!(close(s.entropy.unwrap(), 0.9324867603589636));
}

fn tiny_spec(gating: Gating, mix: Mix, ranks: RankLayout, scale: f64) -> LayerSpec {
    LayerSpec { d_in: 2, d_out: 2, ranks, scale, gating, mix, expert_scales: None, training: Default::default() }
}

#[test]
fn layer_forward_hand_computed() {
    // A = I, x = [2, 4] so h = [2, 4]; z = [0, ln 3] gives renormalised weights [0.25, 0.75];
    // h' = [0.5, 3]; h'·B = [0.5 + 9, 1 + 12] = [9.5, 13]; y = 1 + 0.5 · that = [5.75, 7.5].
    let rule = RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized };
    let spec = tiny_spec(
        Gating::Routed { router: Router::Logits, rule },
        Mix::ExpertScale,
        RankLayout::uniform(2, 1).unwrap(),
        0.5,
    );
    let (x, a, b, y) = ([2.0, 4.0], [1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0]);
    let z = [0.0, 3f64.ln()];
    let mut inputs = LayerInputs::new(1, &x[..], &a[..], &b[..], &y[..]);
    inputs.logits = Some(&z);
    let out = forward(&spec, &inputs).unwrap();
    assert!(close(out.y[0], 5.75) && close(out.y[1], 7.5), "{:?}", out.y);
    assert_eq!(out.routing.ids, vec![1, 0]);
    assert!(close(out.h_mixed[0], 0.5) && close(out.h_mixed[1], 3.0));
}

#[test]
fn comol_forward_hand_computed() {
    // Cores C0 = I, C1 = swap; weights [0.25, 0.75] merge to [[0.25, 0.75], [0.75, 0.25]];
    // h = [2, 4] gives h' = [3.5, 2.5]; h'·B = [3.5 + 7.5, 7 + 10] = [11, 17].
    let rule = RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized };
    let spec = tiny_spec(
        Gating::Routed { router: Router::Logits, rule },
        Mix::CoreMerge { cores: 2 },
        RankLayout::uniform(1, 2).unwrap(),
        1.0,
    );
    let (x, a, b, y) = ([2.0, 4.0], [1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0]);
    let (z, cores) = ([0.0, 3f64.ln()], [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
    let mut inputs = LayerInputs::new(1, &x[..], &a[..], &b[..], &y[..]);
    inputs.logits = Some(&z);
    inputs.cores = Some(&cores);
    let out = forward(&spec, &inputs).unwrap();
    assert!(close(out.h_mixed[0], 3.5) && close(out.h_mixed[1], 2.5), "{:?}", out.h_mixed);
    assert!(close(out.y[0], 11.0) && close(out.y[1], 17.0), "{:?}", out.y);
}

#[test]
fn zero_tokens_is_a_no_op() {
    let rule = RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Unit };
    let spec = tiny_spec(
        Gating::Routed { router: Router::Logits, rule },
        Mix::ExpertScale,
        RankLayout::uniform(2, 1).unwrap(),
        1.0,
    );
    let (a, b) = ([1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]);
    let mut inputs = LayerInputs::new(0, &[][..], &a[..], &b[..], &[][..]);
    inputs.logits = Some(&[]);
    let out = forward(&spec, &inputs).unwrap();
    assert!(out.y.is_empty() && out.routing.ids.is_empty());
    assert_eq!(out.stats.selected_fraction, vec![0.0, 0.0]);
    assert!(out.stats.z_loss.unwrap().abs() < EPS);
}

#[test]
fn inputs_are_validated_with_typed_errors() {
    use mole::MoleError;
    let rule = RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Unit };
    let spec = tiny_spec(
        Gating::Routed { router: Router::X { bias: false }, rule },
        Mix::ExpertScale,
        RankLayout::uniform(2, 1).unwrap(),
        1.0,
    );
    let (x, a, b, y, w) = ([1.0; 2], [1.0; 4], [1.0; 4], [1.0; 2], [1.0; 4]);
    let base = LayerInputs::new(1, &x[..], &a[..], &b[..], &y[..]);
    assert!(matches!(forward(&spec, &base), Err(MoleError::MissingInput { name: "router_weight", .. })));
    let mut i = base;
    i.router_weight = Some(&w[..3]);
    assert!(matches!(forward(&spec, &i), Err(MoleError::ShapeMismatch { what: "router_weight", .. })));
    i.router_weight = Some(&w);
    i.logits = Some(&w[..2]);
    assert!(matches!(forward(&spec, &i), Err(MoleError::UnexpectedInput { name: "logits", .. })));
    let mut i = LayerInputs::new(1, &x[..1], &a[..], &b[..], &y[..]);
    i.router_weight = Some(&w);
    assert!(matches!(forward(&spec, &i), Err(MoleError::ShapeMismatch { what: "x", .. })));
    let ids_spec = tiny_spec(Gating::AdapterIds, Mix::ExpertScale, RankLayout::uniform(2, 1).unwrap(), 1.0);
    let mut i = base;
    i.adapter_ids = Some(&[2]);
    assert!(matches!(forward(&ids_spec, &i), Err(MoleError::ExpertIdOutOfRange { id: 2, experts: 2, .. })));
}

#[test]
fn route_rejects_inputs_that_do_not_fit_the_gating() {
    use mole::MoleError;
    let rule = RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Unit };
    let gating = Gating::Routed { router: Router::Logits, rule };
    let z = [0.0; 6];
    assert!(matches!(route(&gating, GateInput::Scores(&z[..5], None), 2, 3), Err(MoleError::ShapeMismatch { .. })));
    assert!(matches!(route(&gating, GateInput::Weights(&z), 2, 3), Err(MoleError::Unsupported(_))));
    assert!(matches!(
        route(&gating, GateInput::Scores(&z, Some(&[0.0; 2])), 2, 3),
        Err(MoleError::ShapeMismatch { what: "selection_bias", .. })
    ));
    assert!(matches!(
        route(&Gating::AdapterIds, GateInput::AdapterIds(&[0, 3]), 2, 3),
        Err(MoleError::ExpertIdOutOfRange { token: 1, id: 3, .. })
    ));
}
