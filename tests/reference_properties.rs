//! Property tests of the reference: the identities that tie its formulations together.

use mole::model::{
    Gating, LayerInputs, LayerSpec, Method, MethodOptions, MethodShape, Mix, RankLayout, RankSelection, Router,
    RoutingRule, TopKWeights,
};
use mole::plan::RoutingPlan;
use mole::reference::linalg::matmul;
use mole::reference::mix::{core_merge, expert_scale};
use mole::reference::routing::{descending_order, softmax, softmax_topk};
use mole::reference::{forward, grouped_forward, route, Bank, GateInput, Routing};
use mole::synth::{Rng, SyntheticLayer};
use proptest::prelude::*;

fn cfg() -> ProptestConfig {
    ProptestConfig { cases: 64, ..ProptestConfig::default() }
}

/// Max of `|a - b| / (1 + |b|)`.
fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f64::max)
}

/// Logits drawn from a few integers so ties are common.
fn tie_heavy_logits(max_e: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec((-3i32..3).prop_map(|v| v as f64 * 0.5), 1..max_e)
}

/// Per-expert scales with zeros, negatives and general values: one per bank expert.
fn random_scales(rng: &mut Rng, experts: usize) -> Vec<f64> {
    (0..experts)
        .map(|_| match rng.below(4) {
            0 => 0.0,
            1 => rng.range(-3.0, -0.25),
            _ => rng.range(-3.0, 3.0),
        })
        .collect()
}

/// `B [R, d_out]` with the rows of expert `e` times `scales[e]`: the per-expert scales folded in.
fn fold_into_b(b: &[f64], ranks: &RankLayout, scales: &[f64], d_out: usize) -> Vec<f64> {
    let mut folded = b.to_vec();
    for (e, &s) in scales.iter().enumerate() {
        folded[ranks.cols(e).start * d_out..ranks.cols(e).end * d_out].iter_mut().for_each(|v| *v *= s);
    }
    folded
}

/// A random rank layout with 1..=6 experts of rank 0..=5 (at least one positive).
fn ragged_layout() -> impl Strategy<Value = RankLayout> {
    prop::collection::vec(0usize..=5, 1..=6).prop_map(|ranks| {
        let mut offsets = vec![0];
        for r in &ranks {
            offsets.push(offsets.last().unwrap() + r);
        }
        if *offsets.last().unwrap() == 0 {
            *offsets.last_mut().unwrap() = 1;
        }
        RankLayout::from_offsets(offsets).unwrap()
    })
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn softmax_is_a_distribution(z in prop::collection::vec(-50.0f64..50.0, 1..64), t in 0.1f64..4.0) {
        let p = softmax(&z, t);
        prop_assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        prop_assert!(p.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn topk_agrees_with_a_full_sort(z in tie_heavy_logits(40), k_frac in 0.0f64..1.0) {
        let k = 1 + (k_frac * (z.len() - 1) as f64) as usize;
        let (sel, _) = softmax_topk(&z, k, 1.0, TopKWeights::Renormalized);
        let mut full: Vec<(f64, usize)> = z.iter().enumerate().map(|(i, &v)| (-v, i)).collect();
        full.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let want: Vec<usize> = full.iter().take(k).map(|&(_, i)| i).collect();
        prop_assert_eq!(sel.iter().map(|s| s.0).collect::<Vec<_>>(), want);
        prop_assert!((sel.iter().map(|s| s.1).sum::<f64>() - 1.0).abs() < 1e-12);
        prop_assert_eq!(descending_order(&z).len(), z.len());
    }

    #[test]
    fn plan_is_a_permutation_matching_the_ids(
        tokens in 0usize..60, experts in 1usize..12, slots in 1usize..4, block in 1usize..9, seed in any::<u64>()
    ) {
        let slots = slots.min(experts);
        let mut rng = Rng::new(seed);
        let mut ids = Vec::with_capacity(tokens * slots);
        for _ in 0..tokens {
            let mut row: Vec<i32> = Vec::new();
            for _ in 0..slots {
                let e = rng.below(experts) as i32;
                row.push(if rng.below(5) == 0 || row.contains(&e) { -1 } else { e });
            }
            ids.extend(row);
        }
        let plan = RoutingPlan::build(&ids, tokens, slots, experts, block).unwrap();
        let mut seen = vec![false; tokens * slots];
        for e in 0..experts {
            prop_assert_eq!(plan.offsets[e + 1] - plan.offsets[e], plan.counts[e].div_ceil(block as u32) * block as u32);
            let seg = plan.segment(e);
            prop_assert!(seg.windows(2).all(|w| w[0].token < w[1].token), "tokens ascending");
            for ts in seg {
                let i = ts.token as usize * slots + ts.slot as usize;
                prop_assert_eq!(ids[i], e as i32);
                prop_assert!(!seen[i]);
                seen[i] = true;
            }
            let pad = &plan.entries[plan.offsets[e] as usize + seg.len()..plan.offsets[e + 1] as usize];
            prop_assert!(pad.iter().all(|p| p.is_padding()));
        }
        for (i, &id) in ids.iter().enumerate() {
            prop_assert_eq!(seen[i], id >= 0, "entry {} of id {}", i, id);
        }
    }

    #[test]
    fn grouped_equals_dense_masked(
        ranks in ragged_layout(), tokens in 0usize..24, d_in in 1usize..20, d_out in 1usize..20,
        k_frac in 0.0f64..1.0, renorm in any::<bool>(), seed in any::<u64>()
    ) {
        let e = ranks.num_experts();
        let k = 1 + (k_frac * (e - 1) as f64) as usize;
        let weights = if renorm { TopKWeights::Renormalized } else { TopKWeights::Softmax };
        let rule = RoutingRule::SoftmaxTopK { k, temperature: 1.0, weights };
        // Per-expert scales on every other case (zeros and negatives among them).
        let scales = (seed % 2 == 0).then(|| random_scales(&mut Rng::new(seed ^ 0x5ca1e), e));
        let spec = LayerSpec {
            d_in, d_out, ranks: ranks.clone(), scale: 0.75,
            gating: Gating::Routed { router: Router::X { bias: true }, rule }, mix: Mix::ExpertScale,
            expert_scales: scales.clone(), training: Default::default(),
        };
        let data = SyntheticLayer::<f64>::new(&spec, tokens, seed);
        let dense = forward(&spec, &data.inputs()).unwrap();
        let r = &dense.routing;
        let plan = RoutingPlan::build(&r.ids, tokens, r.slots, e, 1).unwrap();
        let bank = Bank { a: &data.a, b: &data.b, ranks: &ranks, scale: 0.75, expert_scales: scales.as_deref(), d_in, d_out };
        let grouped = grouped_forward(&data.x, &data.y, bank, r, &plan);
        prop_assert!(max_rel(&grouped, &dense.y) < 1e-12);
        // The delta is not trivially zero whenever some token selected an expert of positive rank.
        let live = r.ids.iter().zip(&r.weights).any(|(&id, &w)| {
            id >= 0 && w != 0.0 && ranks.rank(id as usize) > 0 && spec.expert_scale(id as usize) != 0.0
        });
        if live {
            prop_assert!(max_rel(&dense.y, &data.y) > 0.0);
        }
    }

    #[test]
    fn expert_scales_equal_folding_them_into_b(
        method in 0usize..Method::ALL.len(), experts in 1usize..7, rank in 1usize..5, k_frac in 0.0f64..1.0,
        ragged in any::<bool>(), tokens in 1usize..12, d_in in 1usize..16, d_out in 1usize..16, seed in any::<u64>()
    ) {
        let method = Method::ALL[method];
        let rank = if method.single_rank_experts() { 1 } else { rank };
        let k = 1 + (k_frac * (experts - 1) as f64) as usize;
        let shape = MethodShape { d_in, d_out, experts, rank, k, alpha: 3.0 };
        let mut rng = Rng::new(seed ^ 0x5ca1e);
        let mut spec = method.spec(shape).unwrap();
        // Ragged ranks (zero-rank experts included) where the method allows any layout.
        if ragged && spec.mix == Mix::ExpertScale && spec.router() != Some(Router::LowRank) {
            let mut offsets = vec![0];
            for _ in 0..experts {
                offsets.push(offsets.last().unwrap() + rng.below(5));
            }
            *offsets.last_mut().unwrap() += 1;
            spec.ranks = RankLayout::from_offsets(offsets).unwrap();
        }
        let bank_experts = spec.ranks.num_experts();
        let scales = random_scales(&mut rng, bank_experts);
        let options = MethodOptions { expert_scales: Some(scales.clone()), ..MethodOptions::default() };
        let scaled_spec = LayerSpec { ranks: spec.ranks.clone(), ..method.spec_with(shape, options).unwrap() };
        prop_assert_eq!(&scaled_spec, &LayerSpec { expert_scales: Some(scales.clone()), ..spec.clone() });

        let data = SyntheticLayer::<f64>::new(&spec, tokens, seed);
        let scaled = forward(&scaled_spec, &data.inputs()).unwrap();
        let folded_b = fold_into_b(&data.b, &spec.ranks, &scales, d_out);
        let mut folded_inputs = data.inputs();
        folded_inputs.b = &folded_b;
        let folded = forward(&spec, &folded_inputs).unwrap();
        prop_assert_eq!(&scaled.routing, &folded.routing);
        prop_assert!(max_rel(&scaled.y, &folded.y) < 1e-12, "{}: {:?} vs {:?}", method, scaled.y, folded.y);
        // The scaled h' is what the expand multiplies: y = y0 + scale · h' · B.
        let delta = matmul(&scaled.h_mixed, &data.b, tokens, spec.total_rank(), d_out);
        let want: Vec<f64> = data.y.iter().zip(delta).map(|(y, d)| y + spec.scale * d).collect();
        prop_assert!(max_rel(&scaled.y, &want) < 1e-12);
        // Unscaled differs wherever a scaled expert contributes (the scales are not all 1).
        let plain = forward(&spec, &data.inputs()).unwrap();
        let moved = (0..bank_experts).any(|e| {
            let cols = spec.ranks.cols(e);
            scales[e] != 1.0
                && (0..tokens).any(|t| plain.h_mixed[t * spec.total_rank()..][cols.clone()].iter().any(|&v| v != 0.0))
        });
        if moved {
            prop_assert!(max_rel(&scaled.y, &plain.y) > 0.0, "{}: the scales changed nothing", method);
        }
    }

    #[test]
    fn merged_core_equals_sum_of_core_products(r in 1usize..8, cores in 1usize..6, tokens in 1usize..10, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let h: Vec<f64> = rng.fill(tokens * r, 1.0);
        let c: Vec<f64> = rng.fill(cores * r * r, 1.0);
        let z: Vec<f64> = rng.fill(tokens * cores, 2.0);
        let k = 1 + rng.below(cores);
        let rule = RoutingRule::SoftmaxTopK { k, temperature: 1.0, weights: TopKWeights::Renormalized };
        let gating = Gating::Routed { router: Router::Logits, rule };
        let routing = route(&gating, GateInput::Scores(&z, None), tokens, cores).unwrap();
        let merged = core_merge(&h, &routing, &c, r);
        let mut summed = vec![0.0; tokens * r];
        for t in 0..tokens {
            for s in 0..routing.slots {
                let (id, w) = (routing.ids[t * routing.slots + s] as usize, routing.weights[t * routing.slots + s]);
                let prod = matmul(&h[t * r..(t + 1) * r], &c[id * r * r..(id + 1) * r * r], 1, r, r);
                summed[t * r..(t + 1) * r].iter_mut().zip(prod).for_each(|(a, p)| *a += w * p);
            }
        }
        prop_assert!(max_rel(&merged, &summed) < 1e-12);
    }

    #[test]
    fn rank_one_experts_equal_rank_masking(r in 1usize..16, tokens in 1usize..10, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let h: Vec<f64> = rng.fill(tokens * r, 1.0);
        let z: Vec<f64> = rng.fill(tokens * r, 1.0);
        let k = 1 + rng.below(r);
        let gating = Gating::Routed { router: Router::LowRank, rule: RoutingRule::MagnitudeTopK { k, bias: false, selection: RankSelection::Magnitude } };
        let routing = route(&gating, GateInput::Scores(&z, None), tokens, r).unwrap();
        let scaled = expert_scale(&h, &routing, &RankLayout::uniform(r, 1).unwrap());
        // Rank masking: keep the k columns of largest |z| of each token, zero the rest.
        for t in 0..tokens {
            let mut mags: Vec<(f64, usize)> = (0..r).map(|c| (-z[t * r + c].abs(), c)).collect();
            mags.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let kept: Vec<usize> = mags.iter().take(k).map(|m| m.1).collect();
            for c in 0..r {
                let want = if kept.contains(&c) { h[t * r + c] } else { 0.0 };
                prop_assert_eq!(scaled[t * r + c], want);
            }
        }
    }

    #[test]
    fn all_weight_on_one_expert_is_a_plain_lora(
        ranks in ragged_layout(), tokens in 1usize..12, d_in in 1usize..16, d_out in 1usize..16, seed in any::<u64>()
    ) {
        let e = ranks.num_experts();
        let target = (seed % e as u64) as usize;
        let spec = LayerSpec {
            d_in, d_out, ranks: ranks.clone(), scale: 1.5,
            gating: Gating::Given { top_k: None, softmax_topk: false }, mix: Mix::ExpertScale,
            expert_scales: None, training: Default::default(),
        };
        let data = SyntheticLayer::<f64>::new(&spec, tokens, seed);
        let one_hot: Vec<f64> = (0..tokens * e).map(|i| if i % e == target { 1.0 } else { 0.0 }).collect();
        let mut inputs: LayerInputs<'_, f64> = data.inputs();
        inputs.weights = Some(&one_hot);
        let out = forward(&spec, &inputs).unwrap();
        // Plain LoRA with the target's slices of A and B.
        let (cols, rt) = (ranks.cols(target), ranks.total_rank());
        let a_e: Vec<f64> = (0..d_in).flat_map(|i| cols.clone().map(move |c| (i, c))).map(|(i, c)| data.a[i * rt + c]).collect();
        let b_e: Vec<f64> = data.b[cols.start * d_out..cols.end * d_out].to_vec();
        let h = matmul(&data.x, &a_e, tokens, d_in, cols.len());
        let delta = matmul(&h, &b_e, tokens, cols.len(), d_out);
        let want: Vec<f64> = data.y.iter().zip(delta).map(|(y, d)| y + 1.5 * d).collect();
        prop_assert!(max_rel(&out.y, &want) < 1e-12);
    }

    #[test]
    fn dynamic_rules_keep_weights_bounded(z in prop::collection::vec(-4.0f64..4.0, 2..32), top_p in 0.05f64..1.0, q in 0.5f64..3.0) {
        let e = z.len();
        for rule in [
            RoutingRule::TopP { p: top_p, temperature: 1.0 },
            RoutingRule::DynMole { q, top_p, keep_top_k: 1, entropy_threshold: 0.8 , entropy_eps: 0.0 },
        ] {
            let gating = Gating::Routed { router: Router::Logits, rule };
            let r: Routing = route(&gating, GateInput::Scores(&z, None), 1, e).unwrap();
            let kept: Vec<f64> = r.weights.iter().zip(&r.ids).filter(|(_, &id)| id >= 0).map(|(w, _)| *w).collect();
            prop_assert!(!kept.is_empty());
            prop_assert!(kept.iter().sum::<f64>() <= 1.0 + 1e-12);
            prop_assert!(kept.windows(2).all(|w| w[0] >= w[1]), "descending");
        }
    }
}
