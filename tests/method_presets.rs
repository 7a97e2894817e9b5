//! Each method preset against what its authors' code computes, by hand-computed cases on the f64
//! reference: LLaVA-MoLE's router bias and top-1 loss, FlyLoRA's magnitude and signed selection
//! and its bias update, DynMoLE's entropy eps and masked-probability loss, MeteoRA's temperature,
//! the MixLoRA (Switch) loss; and the defined edges (entropy clamped to [0, 1], top-p >= 1 keeps
//! every expert).

use mole::model::{
    Entropy, Gating, LayerInputs, Method, MethodOptions, MethodShape, RankSelection, Router, RoutingRule, TopKWeights,
};
use mole::reference::routing::{dynmole, magnitude_topk, normalized_entropy, softmax, top_p};
use mole::reference::{flylora_bias_update, forward, route, router_stats, GateInput};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

fn shape(rank: usize) -> MethodShape {
    MethodShape { d_in: 2, d_out: 2, experts: 2, rank, k: 1, alpha: 1.0 }
}

fn routed(rule: RoutingRule) -> Gating {
    Gating::Routed { router: Router::Logits, rule }
}

#[test]
fn llava_mole_routes_with_its_router_bias() {
    // x = [1, 0], W_g = [[1, 0.5], [0, 0]]: x·W_g = [1, 0.5]. The bias [0, 1] makes z = [1, 1.5],
    // so top-1 is expert 1 (weight 1) with the bias and expert 0 without it.
    let sparse = Method::LlavaMoleSparse.spec(shape(1)).unwrap();
    assert_eq!(sparse.router(), Some(Router::X { bias: true }));
    assert_eq!(Method::LlavaMoleDense.spec(shape(1)).unwrap().router(), Some(Router::X { bias: true }));
    let (x, a, b, y) = ([1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0]);
    let (w_g, bias) = ([1.0, 0.5, 0.0, 0.0], [0.0, 1.0]);
    let mut inputs = LayerInputs::new(1, &x[..], &a[..], &b[..], &y[..]);
    inputs.router_weight = Some(&w_g);
    inputs.router_bias = Some(&bias);
    let out = forward(&sparse, &inputs).unwrap();
    assert_eq!(out.scores.as_deref(), Some(&[1.0, 1.5][..]));
    assert_eq!((out.routing.ids.clone(), out.routing.weights.clone()), (vec![1], vec![1.0]));
    // h = [1, 1]; h' keeps expert 1's column; y = scale · h' · B = [0, 1] (scale = alpha / r = 1).
    assert_eq!(out.y, vec![0.0, 1.0]);

    let no_bias = MethodOptions { router_bias: false, ..MethodOptions::default() };
    let plain = Method::LlavaMoleSparse.spec_with(shape(1), no_bias).unwrap();
    assert_eq!(plain.router(), Some(Router::X { bias: false }));
    inputs.router_bias = None;
    assert_eq!(forward(&plain, &inputs).unwrap().routing.ids, vec![0]);
}

#[test]
fn flylora_presets_select_by_magnitude_or_by_signed_value() {
    let rule = |m: Method| Method::spec(m, shape(1)).unwrap().rule().unwrap();
    assert_eq!(
        rule(Method::FlyLora),
        RoutingRule::MagnitudeTopK { k: 1, bias: true, selection: RankSelection::Magnitude }
    );
    assert_eq!(
        rule(Method::FlyLoraPeft),
        RoutingRule::MagnitudeTopK { k: 1, bias: true, selection: RankSelection::Signed }
    );
    // z + b = [0.5, -2, 1, 1.4]: by magnitude ranks 1 and 3 win, by signed value ranks 3 and 2.
    let (z, b) = ([0.5, -2.0, 1.0, -0.1], [0.0, 0.0, 0.0, 1.5]);
    assert_eq!(magnitude_topk(&z, 2, Some(&b), RankSelection::Magnitude), vec![(1, 1.0), (3, 1.0)]);
    assert_eq!(magnitude_topk(&z, 2, Some(&b), RankSelection::Signed), vec![(3, 1.0), (2, 1.0)]);
}

#[test]
fn flylora_bias_update_moves_each_rank_toward_the_mean_load() {
    // Fractions [0.5, 0.25, 0.25, 0]: mean 0.25, so rank 0 (over) goes down, rank 3 (under) up,
    // ranks 1 and 2 (at the mean) stay.
    let mut bias = [0.1, 0.2, 0.3, 0.4];
    flylora_bias_update(&mut bias, &[0.5, 0.25, 0.25, 0.0], 4, 0.01);
    assert!(close(bias[0], 0.09) && bias[1] == 0.2 && bias[2] == 0.3 && close(bias[3], 0.41), "{bias:?}");
    // Counts [5, 13, 18, 8, 4, 0] of 22 tokens (mean 8): the mean of the fractions rounds
    // 5.6e-17 away from 8/22, yet rank 3, exactly at the mean load, must stay.
    let counts = [5.0, 13.0, 18.0, 8.0, 4.0, 0.0];
    let fractions: Vec<f64> = counts.iter().map(|c| c / 22.0).collect();
    assert_ne!(fractions.iter().sum::<f64>() / 6.0, fractions[3], "the case must exercise the rounding");
    let mut bias = [0.0; 6];
    flylora_bias_update(&mut bias, &fractions, 22, 1.0);
    assert_eq!(bias, [1.0, -1.0, -1.0, 0.0, 1.0, 1.0]);
    // It is the update of the selection counts: the stats of a signed top-1 call over 4 tokens.
    let gating = routed(RoutingRule::MagnitudeTopK { k: 1, bias: false, selection: RankSelection::Signed });
    let z = [3.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    let r = route(&gating, GateInput::Scores(&z, None), 4, 4).unwrap();
    let stats = router_stats(&r, None, None);
    assert_eq!(stats.selected_fraction, vec![0.75, 0.0, 0.25, 0.0]);
    let mut bias = [0.0; 4];
    flylora_bias_update(&mut bias, &stats.selected_fraction, 4, 0.5);
    assert_eq!(bias, [-0.5, 0.5, 0.0, 0.5]);
}

#[test]
fn dynmole_adds_its_eps_before_the_entropy() {
    assert_eq!(Method::DynMole.spec(shape(1)).unwrap().rule().unwrap().entropy(), Some(Entropy { q: 1.1, eps: 1e-5 }));
    // p = [0.7, 0.2, 0.1], q = 2: without eps (1 - 0.54) / (2 / 3) = 0.69; with eps = 1e-5
    // Σ (p + eps)^2 = 0.4900140001 + 0.0400040001 + 0.0100020001 = 0.5400200003, so
    // (1 - 0.5400200003) · 3 / 2 = 0.68996999955.
    let p = [0.7, 0.2, 0.1];
    let z: Vec<f64> = p.iter().map(|v: &f64| v.ln()).collect();
    let plain = Entropy { q: 2.0, eps: 0.0 };
    let eps = Entropy { q: 2.0, eps: 1e-5 };
    assert!((normalized_entropy(&p, plain) - 0.69).abs() < 1e-12);
    assert!((normalized_entropy(&p, eps) - 0.68996999955).abs() < 1e-12);
    // A threshold between the two: without eps every expert switches on, with eps only top-p.
    let threshold = 0.68998;
    assert_eq!(dynmole(&z, plain, 0.75, 1, threshold).0.len(), 3);
    assert_eq!(dynmole(&z, eps, 0.75, 1, threshold).0.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0]);
    // The statistic uses the same eps.
    let rule =
        RoutingRule::DynMole { q: 2.0, top_p: 0.75, keep_top_k: 1, entropy_threshold: threshold, entropy_eps: 1e-5 };
    let r = route(&routed(rule), GateInput::Scores(&z, None), 1, 3).unwrap();
    assert!((router_stats(&r, None, rule.entropy()).entropy.unwrap() - 0.68996999955).abs() < 1e-12);
}

#[test]
fn meteora_temperature_is_an_option() {
    let rule = |temperature| Method::MeteoRa.spec_with(shape(1), MethodOptions { temperature, ..Default::default() });
    let temperature_of = |r: RoutingRule| match r {
        RoutingRule::SoftmaxTopK { temperature, .. } => temperature,
        other => panic!("{other:?}"),
    };
    assert_eq!(temperature_of(rule(Some(2.0)).unwrap().rule().unwrap()), 2.0);
    assert_eq!(temperature_of(rule(None).unwrap().rule().unwrap()), 1.0);
    assert!(rule(Some(0.0)).is_err());
    // z = [ln 4, 0]: p = [0.8, 0.2] without a temperature, softmax([ln 2, 0]) = [2/3, 1/3] with T = 2.
    let z = [4f64.ln(), 0.0];
    let on = rule(Some(2.0)).unwrap();
    let r = route(&on.gating, GateInput::Scores(&z, None), 1, 2).unwrap();
    assert!(close(r.probs.unwrap()[0], 2.0 / 3.0));
    let off = rule(None).unwrap();
    assert!(close(route(&off.gating, GateInput::Scores(&z, None), 1, 2).unwrap().probs.unwrap()[0], 0.8));
}

#[test]
fn each_method_computes_its_own_load_balancing_loss() {
    // Two tokens over three experts: p = [0.5, 0.3, 0.2] and [0.2, 0.5, 0.3] (mean [0.35, 0.4, 0.25]).
    let z: Vec<f64> = [0.5, 0.3, 0.2, 0.2, 0.5, 0.3].iter().map(|v: &f64| v.ln()).collect();
    let stats_of = |rule| {
        let r = route(&routed(rule), GateInput::Scores(&z, None), 2, 3).unwrap();
        router_stats(&r, Some(&z), Some(Entropy::SHANNON))
    };
    // LLaVA-MoLE dense: every expert selected, top-1 fraction [0.5, 0.5, 0]; its loss has no E:
    // 0.5 · 0.35 + 0.5 · 0.4 = 0.375 (the Switch form would give 3 · Σ P = 3).
    let dense = stats_of(RoutingRule::DenseSoftmax { temperature: 1.0 });
    assert_eq!(dense.top1_fraction, vec![0.5, 0.5, 0.0]);
    assert!(close(dense.load_balancing_loss(Method::LlavaMoleDense).unwrap(), 0.375));
    assert!(close(dense.switch_load_balancing_loss().unwrap(), 3.0));
    // DynMoLE with top_p 0.6, keep 1, threshold 1 (never switches): token 0 keeps expert 0,
    // token 1 expert 1. Masked mean [0.25, 0.25, 0]: 3 · (0.25 · 0.35 + 0.25 · 0.4) = 0.5625;
    // the Switch form on the selections [0.5, 0.5, 0] gives 3 · (0.175 + 0.2) = 1.125.
    let rule = RoutingRule::DynMole { q: 1.1, top_p: 0.6, keep_top_k: 1, entropy_threshold: 1.0, entropy_eps: 1e-5 };
    let dm = stats_of(rule);
    let masked = dm.masked_mean_prob.clone().unwrap();
    assert!(close(masked[0], 0.25) && close(masked[1], 0.25) && masked[2] == 0.0, "{masked:?}");
    assert!(close(dm.load_balancing_loss(Method::DynMole).unwrap(), 0.5625));
    assert!(close(dm.load_balancing_loss(Method::MixLoraPerLinear).unwrap(), 1.125));
    // MixLoRA top-1 selects the same experts: the Switch form, 1.125.
    let top1 = stats_of(RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Renormalized });
    assert!(close(top1.load_balancing_loss(Method::MixLoraPerLinear).unwrap(), 1.125));
    assert!(close(top1.load_balancing_loss(Method::MixLoraDynamicPerLinear).unwrap(), 1.125));
    assert_eq!(top1.load_balancing_loss(Method::HydraLora), None);
}

#[test]
fn a_uniform_distribution_never_exceeds_an_entropy_threshold_of_one() {
    // In f64 the entropy of a uniform distribution can round to 1 + 2.2e-16; clamped, a
    // threshold of 1 never switches every expert on, whatever q and E.
    let mut over_one = 0;
    for n in 2..=64usize {
        let p = vec![1.0 / n as f64; n];
        for q in [1.0, 1.1, 1.5, 2.0, 0.5] {
            let raw = if q == 1.0 {
                -p.iter().map(|v| v * v.ln()).sum::<f64>() / (n as f64).ln()
            } else {
                (1.0 - p.iter().map(|v| v.powf(q)).sum::<f64>()) / (1.0 - (n as f64).powf(1.0 - q))
            };
            over_one += (raw > 1.0) as usize;
            let h = normalized_entropy(&p, Entropy { q, eps: 0.0 });
            assert!((0.0..=1.0).contains(&h) && (h - 1.0).abs() < 1e-12, "n = {n}, q = {q}: {h}");
            let sel = dynmole(&vec![0.0; n], Entropy { q, eps: 0.0 }, 0.0, 1, 1.0).0;
            assert_eq!(sel.len(), 1, "n = {n}, q = {q}");
        }
    }
    assert!(over_one > 0, "no case rounds past 1: the edge is not exercised");
    // One-hot with eps: Σ (p + eps)^q > 1 makes the raw ratio negative; clamped to 0.
    assert_eq!(normalized_entropy(&[1.0, 0.0, 0.0], Entropy { q: 1.1, eps: 1e-5 }), 0.0);
}

/// Deterministic logits: a fixed linear congruential sequence over [-4, 4).
fn logits(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 8.0 - 4.0
        })
        .collect()
}

#[test]
fn top_p_of_one_keeps_every_expert() {
    let mut rounded_past_one = 0;
    for seed in 0..400u64 {
        let n = 3 + (seed as usize % 61);
        let mut z = logits(n, seed);
        // A last expert far below the others: the sum of the rest is 1 up to rounding.
        z[n - 1] = -60.0;
        // Whether the running sum of this token rounds past 1 before its last expert.
        let p = softmax(&z, 1.0);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
        let mut cum = 0.0;
        rounded_past_one += order[..n - 1].iter().any(|&e| {
            cum += p[e];
            cum > 1.0
        }) as usize;
        assert_eq!(top_p(&z, 1.0, 1.0).0.len(), n, "seed {seed}");
        assert_eq!(dynmole(&z, Entropy::SHANNON, 1.0, 0, 1.0).0.len(), n, "seed {seed}");
    }
    assert!(rounded_past_one > 0, "no token's running sum rounds past 1: the edge is not exercised");
}
