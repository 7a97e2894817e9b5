//! The f64 reference backward against central finite differences of the f64 forward, loss
//! `Σ dy · y + aux_loss`: every preset (CoMoL's core merge included), given weights (all, top-k,
//! softmaxed top-k), the logits router and the h router, every auxiliary loss in each form, and
//! frozen parameters, on small random shapes with ragged ranks (a rank-0 expert included) and
//! per-expert scales. Inputs whose selection changes within the step or the tie
//! margin are drawn again with another seed (the backward holds the selection constant).

use mole::model::{
    AuxLosses, Balance, Gating, LayerParam, LayerSpec, Method, MethodOptions, MethodShape, RankLayout, Router,
    RoutingRule, TopKWeights,
};
use mole::reference::{backward, forward, LayerGrads};
use mole::synth::{Rng, SyntheticLayer};

/// The differentiable inputs, each with its gradient.
const INPUTS: [&str; 8] = ["x", "A", "B", "router_weight", "router_bias", "logits", "weights", "cores"];

fn input_mut<'a>(data: &'a mut SyntheticLayer<f64>, name: &str) -> Option<&'a mut Vec<f64>> {
    match name {
        "x" => Some(&mut data.x),
        "A" => Some(&mut data.a),
        "B" => Some(&mut data.b),
        "router_weight" => data.router_weight.as_mut(),
        "router_bias" => data.router_bias.as_mut(),
        "logits" => data.logits.as_mut(),
        "cores" => data.cores.as_mut(),
        _ => data.weights.as_mut(),
    }
}

/// The parameter an input is, where the spec can freeze it.
fn param(name: &str) -> Option<LayerParam> {
    match name {
        "A" => Some(LayerParam::A),
        "B" => Some(LayerParam::B),
        "router_weight" | "router_bias" => Some(LayerParam::Router),
        "cores" => Some(LayerParam::Cores),
        _ => None,
    }
}

fn grad<'a>(g: &'a LayerGrads, name: &str) -> Option<&'a Vec<f64>> {
    match name {
        "x" => Some(&g.x),
        "A" => g.a.as_ref(),
        "B" => g.b.as_ref(),
        "router_weight" => g.router_weight.as_ref(),
        "router_bias" => g.router_bias.as_ref(),
        "logits" => g.logits.as_ref(),
        "cores" => g.cores.as_ref(),
        _ => g.weights.as_ref(),
    }
}

/// `(Σ dy · y + aux_loss, Σ |dy · y| + |aux_loss|, the routing ids)`.
fn loss(spec: &LayerSpec, data: &SyntheticLayer<f64>, dy: &[f64]) -> (f64, f64, Vec<i32>) {
    let out = forward(spec, &data.inputs()).unwrap();
    let l = out.y.iter().zip(dy).map(|(y, d)| y * d).sum::<f64>() + out.aux_loss;
    let abs = out.y.iter().zip(dy).map(|(y, d)| (y * d).abs()).sum::<f64>() + out.aux_loss.abs();
    (l, abs, out.routing.ids)
}

/// Whether the loss depends on the scores (else the router gets no gradient): the rule's weights
/// do, or an auxiliary loss reads them.
fn weights_follow_scores(spec: &LayerSpec) -> bool {
    spec.training.aux_losses.any()
        || !matches!(
            spec.rule(),
            Some(RoutingRule::SoftmaxTopK { weights: TopKWeights::Unit, .. } | RoutingRule::MagnitudeTopK { .. })
        )
}

/// Compares every gradient entry with the central difference; `Err` where a perturbation
/// changes the selection. Returns the largest `|fd - g| / tol` seen and the first entry over
/// its tolerance.
fn check(spec: &LayerSpec, data: &SyntheticLayer<f64>, dy: &[f64]) -> Result<(f64, Option<String>), String> {
    let grads = backward(spec, &data.inputs(), dy).unwrap();
    let (_, _, ids) = loss(spec, data, dy);
    // All tokens without an expert (or only experts of rank 0): nothing to check on this draw
    // (a backward that zeroes `dx` fails every draw, so the case still fails).
    if grads.x.iter().all(|&v| v == 0.0) {
        return Err("no token's delta reaches the output".into());
    }
    let mut worst = 0f64;
    let mut mismatch = None;
    for name in INPUTS {
        let mut probe = data.clone();
        let len = match input_mut(&mut probe, name) {
            Some(v) => v.len(),
            None => {
                assert!(grad(&grads, name).is_none(), "{name}: a gradient for an input the spec does not take");
                continue;
            }
        };
        if param(name).is_some_and(|p| !spec.training.trains(p)) {
            assert!(grad(&grads, name).is_none(), "{name}: a gradient for a frozen parameter");
            continue;
        }
        let g = grad(&grads, name).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.len(), len, "{name}");
        let router = matches!(name, "router_weight" | "router_bias" | "logits");
        if router && !weights_follow_scores(spec) {
            assert!(g.iter().all(|&v| v == 0.0), "{name}: weights that ignore the scores pass a gradient");
        } else {
            assert!(g.iter().any(|&v| v.abs() > 1e-6), "{name}: an all-zero gradient ({:?})", spec.gating);
        }
        for i in 0..len {
            let v = input_mut(&mut probe, name).unwrap()[i];
            // Step ~1e-6 relative; the tie margin 100 steps further out.
            let h = 1e-6 * (1.0 + v.abs());
            let mut at = |dv: f64| {
                input_mut(&mut probe, name).unwrap()[i] = v + dv;
                let r = loss(spec, &probe, dy);
                input_mut(&mut probe, name).unwrap()[i] = v;
                r
            };
            let (lp, abs_p, ids_p) = at(h);
            let (lm, abs_m, ids_m) = at(-h);
            let (_, _, far_p) = at(100.0 * h);
            let (_, _, far_m) = at(-100.0 * h);
            if [&ids_p, &ids_m, &far_p, &far_m].iter().any(|s| **s != ids) {
                return Err(format!("{name}[{i}] is within a margin of a selection tie"));
            }
            let step = (v + h) - (v - h);
            let fd = (lp - lm) / step;
            // Roundoff of the two losses (each within ~100 ulps of Σ|dy · y| plus 1) over the
            // step, and the O(h²) truncation with third derivatives of the loss's scale.
            let scale = abs_p.max(abs_m) + 1.0;
            let tol = 1e2 * f64::EPSILON * scale / step + 1e2 * h * h * scale;
            let err = (fd - g[i]).abs();
            if (err > tol || err.is_nan()) && mismatch.is_none() {
                let g = g[i];
                mismatch =
                    Some(format!("d{name}[{i}] = {g} by the backward, {fd} by differences ({err:.3e} > {tol:.3e})"));
            }
            worst = worst.max(err / tol);
        }
    }
    Ok((worst, mismatch))
}

/// Random ranks for `experts` experts, 0..=3 each, expert 1 of rank 0, at least one column.
fn ragged(rng: &mut Rng, experts: usize) -> RankLayout {
    let mut offsets = vec![0];
    for e in 0..experts {
        let r = if e == 1 { 0 } else { 1 + rng.below(3) };
        offsets.push(offsets[e] + r);
    }
    RankLayout::from_offsets(offsets).unwrap()
}

/// The cases: `(name, spec)` on random small shapes.
fn cases(rng: &mut Rng) -> Vec<(String, LayerSpec)> {
    let mut out = Vec::new();
    let k_of = |experts: usize| 2.min(experts);
    let shape = |rng: &mut Rng, experts: usize, rank: usize, k: usize| MethodShape {
        d_in: 5 + rng.below(8),
        d_out: 5 + rng.below(8),
        experts,
        rank,
        k,
        alpha: 2.0,
    };
    for (i, method) in Method::ALL.into_iter().enumerate() {
        let experts = 3 + rng.below(4);
        let rank = if method.single_rank_experts() { 1 } else { 2 };
        if method == Method::Comol {
            let mut spec = method.spec(shape(rng, experts, 3, k_of(experts))).unwrap();
            out.push((format!("{method}"), spec.clone()));
            spec.expert_scales = Some(vec![-1.5]);
            spec.training.frozen = vec![LayerParam::Router];
            out.push((format!("{method}, scaled, router frozen"), spec.clone()));
            spec.training.frozen = vec![LayerParam::Cores, LayerParam::A];
            spec.training.aux_losses =
                AuxLosses { load_balancing: 0.3, z_loss: 0.2, entropy: 0.5, ..Default::default() };
            out.push((format!("{method}, cores and A frozen, every loss"), spec));
            continue;
        }
        let k = 2.min(experts);
        let mut spec = method.spec_with(shape(rng, experts, rank, k), MethodOptions::default()).unwrap();
        out.push((format!("{method}"), spec.clone()));
        // Ragged ranks (a rank-0 expert) with per-expert scales, where the router allows it.
        if !method.single_rank_experts() {
            spec.ranks = ragged(rng, experts);
            if i % 2 == 0 {
                spec.expert_scales = Some((0..experts).map(|_| rng.range(-2.0, 2.0)).collect());
            }
            out.push((format!("{method}, ragged ranks"), spec));
        }
    }
    let base = Method::MixLoraPerLinear.spec(shape(rng, 5, 2, 2)).unwrap();
    let mut with = |name: &str, gating: Gating, ranks: RankLayout| {
        let mut spec = LayerSpec { gating, ranks, ..base.clone() };
        spec.expert_scales = None;
        spec.validate().unwrap();
        out.push((name.to_string(), spec));
    };
    let renorm = |k, temperature| RoutingRule::SoftmaxTopK { k, temperature, weights: TopKWeights::Renormalized };
    let uniform = RankLayout::uniform(5, 2).unwrap();
    with("given, all", Gating::Given { top_k: None, softmax_topk: false }, uniform.clone());
    with("given, top-2", Gating::Given { top_k: Some(2), softmax_topk: false }, uniform.clone());
    with("given, softmaxed top-3", Gating::Given { top_k: Some(3), softmax_topk: true }, uniform.clone());
    let logits = |rule| Gating::Routed { router: Router::Logits, rule };
    with("logits, renormalised top-2 at t = 0.7", logits(renorm(2, 0.7)), uniform.clone());
    with("logits, top-p 0.6", logits(RoutingRule::TopP { p: 0.6, temperature: 1.3 }), uniform.clone());
    with("logits, sigmoid top-3", logits(RoutingRule::SigmoidTopK { k: 3, bias: false }), uniform.clone());
    let h_router = |bias, rule| Gating::Routed { router: Router::H { bias }, rule };
    with("h router with bias, renormalised top-2", h_router(true, renorm(2, 1.0)), uniform.clone());
    with("h router, dense softmax", h_router(false, RoutingRule::DenseSoftmax { temperature: 1.0 }), uniform);
    let low_rank = Gating::Routed { router: Router::LowRank, rule: renorm(2, 1.0) };
    with("low-rank router (z = h), renormalised top-2", low_rank, RankLayout::uniform(5, 1).unwrap());
    let dynmole = RoutingRule::DynMole { q: 1.1, top_p: 0.5, keep_top_k: 1, entropy_threshold: 1.0, entropy_eps: 1e-5 };
    let dynmole_gating = Gating::Routed { router: Router::X { bias: true }, rule: dynmole };
    with("dynmole's top-p branch (threshold 1)", dynmole_gating, {
        let mut r = Rng::new(5);
        ragged(&mut r, 5)
    });
    // The auxiliary losses, each form, on the rules that train with them.
    let mut aux = |name: &str, gating: Gating, losses: AuxLosses| {
        let mut spec = LayerSpec { gating, ranks: RankLayout::uniform(5, 2).unwrap(), ..base.clone() };
        spec.expert_scales = None;
        spec.training.aux_losses = losses;
        spec.validate().unwrap();
        out.push((name.to_string(), spec));
    };
    let lb = |balance| AuxLosses { load_balancing: 0.7, balance, ..Default::default() };
    let x_router = |rule| Gating::Routed { router: Router::X { bias: true }, rule };
    aux("switch balance, renormalised top-2", x_router(renorm(2, 1.0)), lb(Balance::Switch));
    aux("dynmole balance and Tsallis entropy", dynmole_gating, AuxLosses { entropy: 0.4, ..lb(Balance::DynMole) });
    let dense = RoutingRule::DenseSoftmax { temperature: 0.8 };
    aux("llava-mole balance, dense softmax at t = 0.8", x_router(dense), lb(Balance::LlavaMole));
    let unit = RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Unit };
    let balance_and_z = |balance| AuxLosses { z_loss: 0.05, ..lb(balance) };
    aux("llava-mole sparse (unit weights): balance and z-loss only", x_router(unit), balance_and_z(Balance::LlavaMole));
    let sigmoid = logits(RoutingRule::SigmoidTopK { k: 2, bias: false });
    aux("z-loss and switch balance, sigmoid top-2", sigmoid, balance_and_z(Balance::Switch));
    let top_p = logits(RoutingRule::TopP { p: 0.7, temperature: 1.0 });
    aux("shannon entropy, top-p on logits", top_p, AuxLosses { entropy: 0.9, ..Default::default() });
    // Frozen parameters: no gradient, the others unchanged.
    let mut frozen = LayerSpec { gating: x_router(renorm(2, 1.0)), ..base.clone() };
    frozen.expert_scales = None;
    frozen.training.frozen = vec![LayerParam::Router, LayerParam::B];
    out.push(("router and B frozen".into(), frozen));
    out
}

#[test]
fn the_backward_matches_central_differences_of_the_forward() {
    let specs = cases(&mut Rng::new(2026));
    assert!(specs.len() >= 30, "{} cases", specs.len());
    let mut failed = Vec::new();
    for (name, spec) in &specs {
        let mut seed = 11;
        let (worst, mismatch) = loop {
            let data = SyntheticLayer::<f64>::new(spec, 4, seed);
            let dy: Vec<f64> = Rng::new(seed + 1000).fill(4 * spec.d_out, 1.0);
            match check(spec, &data, &dy) {
                Ok(worst) => break worst,
                Err(why) if seed < 40 => {
                    eprintln!("{name}, seed {seed}: {why}; another seed");
                    seed += 1;
                }
                Err(why) => panic!("{name}: no seed without a near tie ({why})"),
            }
        };
        eprintln!("{name}: worst |fd - g| / tol = {worst:.3e} (seed {seed})");
        if let Some(m) = mismatch {
            failed.push(format!("{name}: {m}"));
        }
    }
    assert!(failed.is_empty(), "{} of {} cases fail:\n{}", failed.len(), specs.len(), failed.join("\n"));
}

#[test]
fn a_selection_tie_is_detected_not_differentiated() {
    // Logits with experts 1 and 2 tied for the second place of a top-2: a step on either
    // changes the selection, which the check must report instead of comparing.
    let spec = Method::MixLoraPerLinear.spec(MethodShape { d_in: 6, d_out: 5, experts: 4, rank: 2, k: 2, alpha: 2.0 });
    let mut spec = spec.unwrap();
    spec.gating = Gating::Routed {
        router: Router::Logits,
        rule: RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized },
    };
    let mut data = SyntheticLayer::<f64>::new(&spec, 2, 3);
    data.logits = Some(vec![2.0, 1.0, 1.0, -1.0, 0.5, 1.5, -0.5, 2.5]);
    let dy: Vec<f64> = Rng::new(4).fill(2 * spec.d_out, 1.0);
    let why = check(&spec, &data, &dy).unwrap_err();
    // x, A and B do not move the given logits; logits[0] leads by a margin; logits[1] ties.
    assert!(why.starts_with("logits[1] "), "{why}");
}
