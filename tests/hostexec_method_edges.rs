//! The defined edges of the routing rules and each method's router statistics, in the gating
//! kernels (`kernels/gating.cu`, whose rules `kernels/common/routing.cuh` shares with the fused
//! kernels) run on the CPU through `mole-hostexec`, against the f64 reference: a DynMoLE entropy
//! threshold of 1 never switches every expert on, top-p of 1 keeps every expert, and the
//! statistics give each method's load-balancing loss. The kernels run through the library's
//! launch path ([`mole::kernels::gating::run_route`], [`mole::kernels::gating::run_stats`]) on
//! the CPU backend.

mod common;
mod host;

use common::{bind, gating_build, Input};
use host::HostBackend;
use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::gating::{self, plan, StatsPlan};
use mole::model::{Gating, Method, MethodShape, Router, RoutingRule, TopKWeights};
use mole::reference::routing::{route, GateInput, Routing};
use mole::reference::{router_stats, tolerance_with, RouterStats};
use mole::DType;
use mole_hostexec::{Buffer, Schedule};

const BLOCK_THREADS: u32 = 128;

fn routed(rule: RoutingRule) -> Gating {
    Gating::Routed { router: Router::Logits, rule }
}

/// Runs the routing kernel of `gating` on f32 scores; returns ids, weights and probabilities.
fn run_route(gating: &Gating, scores: &[f32], tokens: usize, experts: usize) -> (Vec<i32>, Vec<f32>, Vec<f32>) {
    let p = plan(gating, tokens, experts, BLOCK_THREADS).unwrap();
    let (input, _) = Input::new("scores", DType::F32, scores);
    let ids = Buffer::<i32>::poisoned("ids", tokens * p.slots);
    let weights = Buffer::<f32>::poisoned("weights", tokens * p.slots);
    let probs = Buffer::<f32>::poisoned("probs", tokens * experts);
    let mut b = Bindings::new();
    input.bind(&mut b, Buf::GateInput);
    bind(&mut b, Buf::Ids, &ids);
    bind(&mut b, Buf::RouteWeights, &weights);
    if p.writes_probs {
        bind(&mut b, Buf::Probs, &probs);
    }
    let mut host = HostBackend::new(Schedule::Reverse);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { gating::run_route(&gating_build(DType::F32), &p, &b, &mut host) }
        .unwrap_or_else(|e| panic!("{gating:?}: {e}"));
    (ids.read(), weights.read(), if p.writes_probs { probs.read() } else { vec![] })
}

#[test]
fn an_entropy_threshold_of_one_never_switches_every_expert_on() {
    // Uniform tokens: the f32 entropy of a uniform distribution may round to just above 1.
    for experts in [3, 5, 6, 7, 10, 12, 24, 40, 100] {
        for q in [1.0, 1.1, 1.5, 2.0] {
            for entropy_eps in [0.0, 1e-5] {
                let rule = RoutingRule::DynMole { q, top_p: 0.0, keep_top_k: 1, entropy_threshold: 1.0, entropy_eps };
                let tokens = 3;
                let (ids, _, _) = run_route(&routed(rule), &vec![0.5; tokens * experts], tokens, experts);
                for t in 0..tokens {
                    let row = &ids[t * experts..(t + 1) * experts];
                    assert_eq!(row[0], 0, "E = {experts}, q = {q}, eps = {entropy_eps}");
                    assert!(
                        row[1..].iter().all(|&id| id == -1),
                        "E = {experts}, q = {q}, eps = {entropy_eps}: {row:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn dynmole_switches_on_the_entropy_of_p_plus_eps() {
    // p = [0.7, 0.2, 0.1], q = 2: normalised entropy 0.69 without eps, 0.68997 with eps = 1e-5
    // (tests/method_presets.rs works it out). At a threshold between them, eps keeps top-p alone.
    let z: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|v| v.ln()).collect();
    for (entropy_eps, want) in [(1e-5, vec![0, -1, -1]), (0.0, vec![0, 1, 2])] {
        let rule = RoutingRule::DynMole { q: 2.0, top_p: 0.75, keep_top_k: 1, entropy_threshold: 0.68998, entropy_eps };
        let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
        let reference = route(&routed(rule), GateInput::Scores(&z64, None), 1, 3).unwrap();
        assert_eq!(reference.ids, want, "reference, eps = {entropy_eps}");
        assert_eq!(run_route(&routed(rule), &z, 1, 3).0, want, "kernel, eps = {entropy_eps}");
    }
}

/// Scores whose last expert of each token lies far below the others: their probabilities sum to
/// 1 up to rounding, so a running sum may pass 1 before the last expert.
fn tail_scores(tokens: usize, experts: usize) -> Vec<f32> {
    (0..tokens * experts)
        .map(|i| if i % experts == experts - 1 { -60.0 } else { ((i * 7919 + 13) % 97) as f32 / 12.0 - 4.0 })
        .collect()
}

#[test]
fn top_p_of_one_keeps_every_expert() {
    let (tokens, experts) = (64, 40);
    let z = tail_scores(tokens, experts);
    let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    let rules = [
        RoutingRule::TopP { p: 1.0, temperature: 1.0 },
        RoutingRule::DynMole { q: 1.1, top_p: 1.0, keep_top_k: 0, entropy_threshold: 1.0, entropy_eps: 1e-5 },
    ];
    for rule in rules {
        let gating = routed(rule);
        let want = route(&gating, GateInput::Scores(&z64, None), tokens, experts).unwrap();
        assert!(want.ids.iter().all(|&id| id >= 0), "{rule:?}: the reference drops an expert");
        let (ids, weights, _) = run_route(&gating, &z, tokens, experts);
        assert_eq!(ids, want.ids, "{rule:?}");
        for (i, (&g, &w)) in weights.iter().zip(&want.weights).enumerate() {
            assert!((g as f64 - w).abs() <= 2e-6 * w.max(1e-30) + 1e-37, "{rule:?}: weight {i}: {g} vs {w}");
        }
    }
}

/// Runs the statistics kernels on the reference routing (ids and probabilities as f32, raw scores).
fn run_stats(gating: &Gating, want: &Routing, scores: &[f32]) -> (StatsPlan, RouterStats) {
    let (t, e) = (want.tokens, want.experts);
    let sp = StatsPlan::for_gating(gating, t, e, BLOCK_THREADS).unwrap();
    let ids = Buffer::from_slice("ids", &want.ids);
    let probs_f32: Vec<f32> = want.probs.as_ref().map_or(vec![], |p| p.iter().map(|&v| v as f32).collect());
    let probs = Buffer::from_slice("probs", &probs_f32);
    let (scores, _) = Input::new("scores", DType::F32, scores);
    let workspace = Buffer::<u32>::poisoned("workspace", sp.workspace_words);
    let out = Buffer::<f32>::poisoned("stats", sp.out_len);
    let mut b = Bindings::new();
    bind(&mut b, Buf::Ids, &ids);
    if sp.params.has_probs != 0 {
        bind(&mut b, Buf::Probs, &probs);
    }
    if sp.params.has_scores != 0 {
        scores.bind(&mut b, Buf::GateInput);
    }
    bind(&mut b, Buf::StatsWorkspace, &workspace);
    bind(&mut b, Buf::StatsOut, &out);
    let mut host = HostBackend::new(Schedule::Seeded(5));
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { gating::run_stats(&gating_build(DType::F32), &sp, &b, &mut host) }.unwrap();
    assert_eq!(host.launches, 2);
    let got = sp.decode(&out.read()).unwrap();
    (sp, got)
}

#[test]
fn the_statistics_kernels_give_each_methods_loss() {
    let (tokens, experts) = (300, 8);
    let z: Vec<f32> = (0..tokens * experts).map(|i| ((i * 7919 + 5) % 89) as f32 / 16.0 - 2.5).collect();
    let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    let shape = MethodShape { d_in: 16, d_out: 16, experts, rank: 4, k: 2, alpha: 8.0 };
    // Sums over T tokens of f32 values.
    let tol = 4.0 * tolerance_with(f64::powi(2.0, -24), f64::powi(2.0, -24), tokens + experts + 8);
    let close = |g: f64, w: f64| (g - w).abs() <= tol * w.abs().max(1.0);
    let methods = [
        Method::MixLoraPerLinear,
        Method::MixLoraDynamicPerLinear,
        Method::DynMole,
        Method::LlavaMoleSparse,
        Method::LlavaMoleDense,
    ];
    for method in methods {
        // The preset's rule on given logits (the router itself is not under test here).
        let gating = routed(method.spec(shape).unwrap().rule().unwrap());
        let want = route(&gating, GateInput::Scores(&z64, None), tokens, experts).unwrap();
        let (sp, got) = run_stats(&gating, &want, &z);
        let reference = router_stats(&want, (sp.params.has_scores != 0).then_some(&z64[..]), sp.entropy);
        let per_expert = [
            ("selected_fraction", &got.selected_fraction, &reference.selected_fraction),
            ("top1_fraction", &got.top1_fraction, &reference.top1_fraction),
            ("mean_prob", got.mean_prob.as_ref().unwrap(), reference.mean_prob.as_ref().unwrap()),
            ("masked_mean_prob", got.masked_mean_prob.as_ref().unwrap(), reference.masked_mean_prob.as_ref().unwrap()),
        ];
        for (name, g, w) in per_expert {
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                assert!(close(g, w), "{method}: {name}[{i}] {g} vs {w}");
            }
        }
        let (g, w) = (got.entropy.unwrap(), reference.entropy.unwrap());
        assert!(close(g, w), "{method}: entropy {g} vs {w}");
        let (g, w) = (got.load_balancing_loss(method).unwrap(), reference.load_balancing_loss(method).unwrap());
        assert!(close(g, w), "{method}: loss {g} vs {w}");
    }
    // The three forms differ on the same statistics (so each method's test pins its own).
    let gating = routed(RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized });
    let want = route(&gating, GateInput::Scores(&z64, None), tokens, experts).unwrap();
    let s = run_stats(&gating, &want, &z).1;
    let losses = [
        s.switch_load_balancing_loss().unwrap(),
        s.dynmole_load_balancing_loss().unwrap(),
        s.llava_mole_load_balancing_loss().unwrap(),
    ];
    assert!(losses[0] != losses[1] && losses[1] != losses[2] && losses[0] != losses[2], "{losses:?}");
}
