//! The routing kernels of `kernels/gating.cu`, run on the CPU through `mole-hostexec` (the real
//! sources, unmodified), against the f64 reference: every routing rule on one small input with
//! ties, NaN, all-masked and +inf tokens, each under three thread schedules. The kernels run
//! through the library's launch path ([`mole::kernels::gating::run_route`]) on the CPU backend.

mod common;
mod host;

use common::{bind, gating_build, Input};
use host::HostBackend;
use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::gating::{plan, run_route, RoutePlan};
use mole::model::{Gating, RankSelection, Router, RoutingRule, TopKWeights};
use mole::reference::routing::{route, GateInput, Routing};
use mole::DType;
use mole_hostexec::{Buffer, Schedule};

const TOKENS: usize = 37; // more tokens than warps in a block: several blocks, grid-stride loops
const EXPERTS: usize = 40; // more experts than lanes: a lane owns several
const BLOCK_THREADS: u32 = 128;

/// Scores with the contract's corner cases: token 3 holds a NaN, token 5 is all NaN (fully
/// masked), token 7 has two +inf, token 9 ties experts 2, 17 and 33 for the maximum.
fn scores() -> Vec<f32> {
    let mut z: Vec<f32> = (0..TOKENS * EXPERTS).map(|i| ((i * 7919) % 101) as f32 / 16.0 - 3.0).collect();
    z[3 * EXPERTS + 4] = f32::NAN;
    z[5 * EXPERTS..6 * EXPERTS].fill(f32::NAN);
    z[7 * EXPERTS + 1] = f32::INFINITY;
    z[7 * EXPERTS + 30] = f32::INFINITY;
    for e in [2, 17, 33] {
        z[9 * EXPERTS + e] = 10.0;
    }
    z
}

fn close(got: f32, want: f64) -> bool {
    got as f64 == want || (got as f64 - want).abs() <= 2e-6 * want.abs().max(1.0) || (got.is_nan() && want.is_nan())
}

/// Runs the plan's kernel on the CPU and compares ids, weights and probabilities with `want`.
fn check(gating: &Gating, dtype: DType, input: &Input, bias: Option<&Input>, want: &Routing, schedule: Schedule) {
    let p: RoutePlan = plan(gating, TOKENS, EXPERTS, BLOCK_THREADS).unwrap();
    let ids = Buffer::<i32>::poisoned("ids", TOKENS * p.slots);
    let weights = Buffer::<f32>::poisoned("weights", TOKENS * p.slots);
    let probs = Buffer::<f32>::poisoned("probs", TOKENS * EXPERTS);
    let mut b = Bindings::new();
    input.bind(&mut b, Buf::GateInput);
    if let Some(bias) = bias {
        bias.bind(&mut b, Buf::SelectionBias);
    }
    bind(&mut b, Buf::Ids, &ids);
    bind(&mut b, Buf::RouteWeights, &weights);
    if p.writes_probs {
        bind(&mut b, Buf::Probs, &probs);
    }
    let mut host = HostBackend::new(schedule);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { run_route(&gating_build(dtype), &p, &b, &mut host) }
        .unwrap_or_else(|e| panic!("{gating:?} {dtype:?} {schedule:?}: {e}"));
    assert_eq!(host.launches, 1);
    let what = format!("{gating:?} {dtype:?} {schedule:?}");
    assert_eq!(ids.read(), want.ids, "ids of {what}");
    let w = weights.read();
    for (i, (&g, &r)) in w.iter().zip(&want.weights).enumerate() {
        assert!(close(g, r), "weight {i} of {what}: {g} vs {r}");
    }
    if let (true, Some(wp)) = (p.writes_probs, &want.probs) {
        for (i, (&g, &r)) in probs.read().iter().zip(wp).enumerate() {
            assert!(close(g, r), "prob {i} of {what}: {g} vs {r}");
        }
    }
}

fn routed(rule: RoutingRule) -> Gating {
    Gating::Routed { router: Router::Logits, rule }
}

#[test]
fn softmax_top_k_matches_the_reference_in_every_dtype() {
    let gating = routed(RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized });
    for dtype in DType::ALL {
        let (input, z) = Input::new("scores", dtype, &scores());
        let want = route(&gating, GateInput::Scores(&z, None), TOKENS, EXPERTS).unwrap();
        for schedule in Schedule::sweep([1]) {
            check(&gating, dtype, &input, None, &want, schedule);
        }
    }
}

#[test]
fn every_routing_rule_matches_the_reference() {
    let dtype = DType::F32;
    let (input, z) = Input::new("scores", dtype, &scores());
    let bias_values: Vec<f32> = (0..EXPERTS).map(|e| (e % 5) as f32 * 0.25 - 0.5).collect();
    let (bias, b) = Input::new("selection_bias", dtype, &bias_values);
    let rules = [
        RoutingRule::SoftmaxTopK { k: 3, temperature: 0.7, weights: TopKWeights::Softmax },
        RoutingRule::SoftmaxTopK { k: 1, temperature: 1.0, weights: TopKWeights::Unit },
        RoutingRule::TopP { p: 0.6, temperature: 1.0 },
        RoutingRule::DynMole { q: 1.5, top_p: 0.5, keep_top_k: 2, entropy_threshold: 0.9, entropy_eps: 0.0 },
        RoutingRule::DynMole { q: 1.0, top_p: 0.3, keep_top_k: 1, entropy_threshold: 0.99, entropy_eps: 0.0 },
        RoutingRule::DynMole { q: 1.1, top_p: 0.75, keep_top_k: 2, entropy_threshold: 0.9, entropy_eps: 1e-5 },
        RoutingRule::DynMole { q: 1.0, top_p: 0.3, keep_top_k: 1, entropy_threshold: 0.97, entropy_eps: 1e-5 },
        RoutingRule::DenseSoftmax { temperature: 2.0 },
        RoutingRule::SigmoidTopK { k: 2, bias: true },
        RoutingRule::MagnitudeTopK { k: 4, bias: true, selection: RankSelection::Magnitude },
        RoutingRule::MagnitudeTopK { k: 4, bias: true, selection: RankSelection::Signed },
    ];
    for rule in rules {
        let gating = routed(rule);
        let bias_used = rule.uses_selection_bias();
        let want = route(&gating, GateInput::Scores(&z, bias_used.then_some(&b[..])), TOKENS, EXPERTS).unwrap();
        for schedule in [Schedule::Reverse, Schedule::Seeded(2)] {
            check(&gating, dtype, &input, bias_used.then_some(&bias), &want, schedule);
        }
    }
    let given = Gating::Given { top_k: Some(3), softmax_topk: true };
    let want = route(&given, GateInput::Weights(&z), TOKENS, EXPERTS).unwrap();
    check(&given, dtype, &input, None, &want, Schedule::Forward);

    let adapter_ids: Vec<i32> = (0..TOKENS as i32).map(|t| if t % 4 == 3 { -1 } else { t % EXPERTS as i32 }).collect();
    let ids = Buffer::from_slice("adapter_ids", &adapter_ids);
    let want = route(&Gating::AdapterIds, GateInput::AdapterIds(&adapter_ids), TOKENS, EXPERTS).unwrap();
    let p = plan(&Gating::AdapterIds, TOKENS, EXPERTS, BLOCK_THREADS).unwrap();
    let (out_ids, out_w) = (Buffer::<i32>::poisoned("ids", TOKENS), Buffer::<f32>::poisoned("weights", TOKENS));
    let mut b = Bindings::new();
    bind(&mut b, Buf::AdapterIds, &ids);
    bind(&mut b, Buf::Ids, &out_ids);
    bind(&mut b, Buf::RouteWeights, &out_w);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { run_route(&gating_build(dtype), &p, &b, &mut HostBackend::new(Schedule::Forward)) }.unwrap();
    assert_eq!(out_ids.read(), want.ids);
    assert_eq!(out_w.read(), want.weights.iter().map(|&w| w as f32).collect::<Vec<_>>());
}

/// Large logits (around 500, spread over ±120) under temperatures far from 1: the softmax must
/// take its maximum of `z / t`, or `exp` overflows or underflows the whole row.
#[test]
fn softmax_rules_hold_with_large_logits_and_any_temperature() {
    let big: Vec<f32> = scores().iter().map(|&v| if v.is_finite() { 500.0 + 30.0 * v } else { v }).collect();
    for dtype in [DType::F32, DType::BF16] {
        let (input, z) = Input::new("scores", dtype, &big);
        for t in [0.05, 1.0, 7.0] {
            let rules = [
                RoutingRule::SoftmaxTopK { k: 2, temperature: t, weights: TopKWeights::Renormalized },
                RoutingRule::SoftmaxTopK { k: 3, temperature: t, weights: TopKWeights::Softmax },
                RoutingRule::TopP { p: 0.7, temperature: t },
                RoutingRule::DenseSoftmax { temperature: t },
                RoutingRule::DynMole { q: 1.5, top_p: 0.5, keep_top_k: 1, entropy_threshold: 0.5, entropy_eps: 0.0 },
            ];
            for rule in rules {
                let gating = routed(rule);
                let want = route(&gating, GateInput::Scores(&z, None), TOKENS, EXPERTS).unwrap();
                assert!(want.weights.iter().all(|w| w.is_finite()), "{rule:?}: the reference stays finite");
                check(&gating, dtype, &input, None, &want, Schedule::Seeded(4));
            }
        }
        let given = Gating::Given { top_k: Some(2), softmax_topk: true };
        let want = route(&given, GateInput::Weights(&z), TOKENS, EXPERTS).unwrap();
        check(&given, dtype, &input, None, &want, Schedule::Reverse);
    }
}

/// Thresholds met exactly: token 0 has four equal scores (probabilities exactly 1/4, cumulative
/// sums 1/4, 1/2, 3/4 exact in f32), token 1 one finite score (one-hot: entropy exactly 0),
/// token 2 a single +inf, the others the general scores. Top-p at 1/4, 1/2 and 3/4 stops
/// through the first expert that exceeds it, DynMoLE keeps while the cumulative sum is at most
/// its top-p, and a DynMoLE entropy threshold of 0 takes every expert only above it: never for
/// a one-hot token.
#[test]
fn thresholded_rules_at_their_exact_thresholds() {
    let mut z = scores();
    z[..3 * EXPERTS].fill(f32::NEG_INFINITY);
    for e in [3, 9, 20, 31] {
        z[e] = 1.5;
    }
    z[EXPERTS + 11] = -2.0;
    z[2 * EXPERTS + 6] = f32::INFINITY;
    let (input, zf) = Input::new("scores", DType::F32, &z);
    let mut rules = Vec::new();
    for p in [0.25, 0.5, 0.75] {
        rules.push(RoutingRule::TopP { p, temperature: 1.0 });
        rules.push(RoutingRule::DynMole { q: 1.5, top_p: p, keep_top_k: 1, entropy_threshold: 0.99, entropy_eps: 0.0 });
    }
    rules.push(RoutingRule::DynMole { q: 1.5, top_p: 0.5, keep_top_k: 1, entropy_threshold: 0.0, entropy_eps: 0.0 });
    rules.push(RoutingRule::DynMole { q: 2.0, top_p: 0.25, keep_top_k: 2, entropy_threshold: 0.0, entropy_eps: 0.0 });
    for rule in rules {
        let gating = routed(rule);
        let want = route(&gating, GateInput::Scores(&zf, None), TOKENS, EXPERTS).unwrap();
        check(&gating, DType::F32, &input, None, &want, Schedule::Seeded(8));
    }
    // The cases are the ones meant: top-p 1/2 on token 0 keeps 3 experts, DynMoLE top-p 1/2 keeps
    // 2, and a one-hot token under entropy threshold 0 keeps 1.
    let kept = |rule: RoutingRule, t: usize| {
        let want = route(&routed(rule), GateInput::Scores(&zf, None), TOKENS, EXPERTS).unwrap();
        want.ids[t * want.slots..(t + 1) * want.slots].iter().filter(|&&i| i >= 0).count()
    };
    assert_eq!(kept(RoutingRule::TopP { p: 0.5, temperature: 1.0 }, 0), 3);
    let dyn_mole = |top_p, entropy_threshold| RoutingRule::DynMole {
        q: 1.5,
        top_p,
        keep_top_k: 1,
        entropy_threshold,
        entropy_eps: 0.0,
    };
    assert_eq!(kept(dyn_mole(0.5, 0.99), 0), 2);
    assert_eq!(kept(dyn_mole(0.5, 0.0), 1), 1);
    assert_eq!(kept(dyn_mole(0.5, 0.0), 0), EXPERTS);
}
