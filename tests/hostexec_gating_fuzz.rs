//! Fuzzing of every kernel of `kernels/gating.cu` (routing rules, router statistics, routing plan
//! in full and column mode) through the host execution layer against the f64 reference: random shapes (T from 0 to a few
//! thousand, E from 1 to 256, k up to 8, odd sizes), every dtype, tie-heavy scores with NaN and
//! infinities, random thread schedules, outputs poisoned before every launch.
//!
//! Ids must match the reference exactly. The one exception is a token whose routing decision sits
//! within f32 rounding of a threshold in the f64 reference (a cumulative sum against `p`, the
//! entropy against its threshold, two distinct biased scores closer than f32 can tell apart):
//! there f32 and f64 may legitimately decide differently, so such tokens are checked for shape
//! only and counted; the test requires them to be rare.
//!
//! Every kernel runs through the library's launch path (`run_route`, `run_stats`, `run_group`,
//! `run_group_slots` of [`mole::kernels::gating`]) on the CPU backend.

mod common;
mod host;

use common::{bind, gating_build, Input};
use host::HostBackend;
use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::gating::{
    plan, plan_grouping, plan_slot_grouping, run_group, run_group_slots, run_route, run_stats, SlotGroupingPlan,
    StatsPlan,
};
use mole::kernels::sgmv::SlotPlans;
use mole::model::{Entropy, Gating, RankSelection, Router, RoutingRule, TopKWeights};
use mole::plan::{RoutingPlan, TokenSlot};
use mole::reference::routing::{descending_order, normalized_entropy, route, sigmoid, softmax, GateInput};
use mole::reference::{router_stats, tolerance_with, Routing};
use mole::synth::Rng;
use mole::DType;
use mole_hostexec::{Buffer, Schedule};
use proptest::prelude::*;
use std::ops::Range;

const BLOCK_THREADS: u32 = 128;
/// A decision closer than this to its threshold (in f64) may go either way in f32.
const BOUNDARY: f64 = 1e-5;

/// One fuzz case.
#[derive(Clone, Debug)]
struct Case {
    tokens: usize,
    experts: usize,
    gating: Gating,
    dtype: DType,
    seed: u64,
    schedule: Schedule,
}

fn rule_strategy() -> impl Strategy<Value = (u8, usize, f64, f64)> {
    (0u8..10, 1usize..=8, 0.05f64..1.0, 0.3f64..2.5)
}

fn make_gating(kind: u8, k: usize, a: f64, b: f64, experts: usize) -> Gating {
    let k = k.min(experts);
    let routed = |rule| Gating::Routed { router: Router::Logits, rule };
    match kind {
        0 => routed(RoutingRule::SoftmaxTopK { k, temperature: b, weights: TopKWeights::Renormalized }),
        1 => routed(RoutingRule::SoftmaxTopK { k, temperature: 1.0, weights: TopKWeights::Softmax }),
        2 => routed(RoutingRule::SoftmaxTopK { k, temperature: 1.0, weights: TopKWeights::Unit }),
        3 => routed(RoutingRule::TopP { p: a, temperature: b }),
        4 => routed(RoutingRule::DynMole {
            q: b,
            top_p: a,
            keep_top_k: k.min(2),
            entropy_threshold: 0.7,
            entropy_eps: if b > 1.4 { 1e-5 } else { 0.0 },
        }),
        5 => routed(RoutingRule::DenseSoftmax { temperature: b }),
        6 => routed(RoutingRule::SigmoidTopK { k, bias: a > 0.5 }),
        7 => {
            let selection = if b > 1.4 { RankSelection::Signed } else { RankSelection::Magnitude };
            routed(RoutingRule::MagnitudeTopK { k, bias: a > 0.5, selection })
        }
        8 => Gating::Given { top_k: (a > 0.3).then_some(k), softmax_topk: a > 0.6 },
        _ => Gating::AdapterIds,
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let tokens = prop_oneof![4 => 0usize..80, 2 => 80usize..400, 1 => 400usize..2500];
    let experts = prop_oneof![3 => 1usize..=40, 1 => 41usize..=256];
    (tokens, experts, rule_strategy(), 0usize..3, any::<u64>(), 0u8..3).prop_map(
        |(tokens, experts, (kind, k, a, b), d, seed, s)| {
            // Large shapes go through a fast schedule; dense rules on many experts stay small.
            let tokens = if experts > 64 { tokens.min(300) } else { tokens };
            Case {
                tokens,
                experts,
                gating: make_gating(kind, k, a, b, experts),
                dtype: DType::ALL[d],
                seed,
                schedule: match s {
                    0 => Schedule::Forward,
                    1 => Schedule::Reverse,
                    _ => Schedule::Seeded(seed),
                },
            }
        },
    )
}

/// Tie-heavy values on a grid of quarters (exact in every dtype), with NaN and infinities.
fn scores(rng: &mut Rng, n: usize, specials: bool) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(100) {
            0 if specials => f32::NAN,
            1 if specials => f32::NEG_INFINITY,
            2 if specials && rng.below(4) == 0 => f32::INFINITY,
            _ => (rng.below(17) as f32 - 8.0) / 4.0,
        })
        .collect()
}

/// Whether the f64 reference decision for this token sits within [`BOUNDARY`] of a threshold.
fn near_boundary(gating: &Gating, z: &[f64], bias: Option<&[f64]>) -> bool {
    let cum_near = |p: &[f64], order: &[usize], thr: f64| {
        let mut cum = 0.0;
        order.iter().any(|&e| {
            cum += p[e];
            (cum - thr).abs() < BOUNDARY
        })
    };
    let distinct_close = |s: &[f64]| {
        let mut v: Vec<f64> = s.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v.windows(2).any(|w| w[0] != w[1] && w[1] - w[0] < BOUNDARY)
    };
    match gating {
        Gating::Routed { rule: RoutingRule::TopP { p, temperature }, .. } => {
            cum_near(&softmax(z, *temperature), &descending_order(z), *p)
        }
        Gating::Routed { rule: RoutingRule::DynMole { q, top_p, entropy_threshold, entropy_eps, .. }, .. } => {
            let p = softmax(z, 1.0);
            (normalized_entropy(&p, Entropy { q: *q, eps: *entropy_eps }) - entropy_threshold).abs() < BOUNDARY
                || cum_near(&p, &descending_order(z), *top_p)
        }
        Gating::Routed { rule: RoutingRule::SigmoidTopK { .. }, .. } => {
            let s: Vec<f64> = z.iter().enumerate().map(|(e, &v)| sigmoid(v) + bias.map_or(0.0, |b| b[e])).collect();
            distinct_close(&s)
        }
        _ => false,
    }
}

fn run_case(c: &Case) -> Result<usize, TestCaseError> {
    let (t, e) = (c.tokens, c.experts);
    let mut rng = Rng::new(c.seed);
    let rp = plan(&c.gating, t, e, BLOCK_THREADS).map_err(|err| TestCaseError::fail(err.to_string()))?;
    let slots = rp.slots;
    let specials = !matches!(c.gating, Gating::Given { .. });
    let raw = scores(&mut rng, t * e, specials);
    let given: Vec<f32> = raw.iter().map(|v| v.abs() / 2.0).collect();
    let (input, z) = Input::new("scores", c.dtype, if specials { &raw } else { &given });
    let bias_vals: Vec<f32> = (0..e).map(|_| (rng.below(9) as f32 - 4.0) / 8.0).collect();
    let (bias, b) = Input::new("selection_bias", c.dtype, &bias_vals);
    let adapter: Vec<i32> = (0..t).map(|_| rng.below(e + 1) as i32 - 1).collect();
    let adapter_buf = Buffer::from_slice("adapter_ids", &adapter);

    let bias_used = rp.uses_bias;
    let gate_input = match c.gating {
        Gating::Routed { .. } => GateInput::Scores(&z, bias_used.then_some(&b[..])),
        Gating::Given { .. } => GateInput::Weights(&z),
        Gating::AdapterIds => GateInput::AdapterIds(&adapter),
    };
    let want: Routing = route(&c.gating, gate_input, t, e).unwrap();

    // Routing kernel.
    let ids = Buffer::<i32>::poisoned("ids", t * slots);
    let weights = Buffer::<f32>::poisoned("weights", t * slots);
    let probs = Buffer::<f32>::poisoned("probs", t * e);
    let mut binds = Bindings::new();
    if c.gating == Gating::AdapterIds {
        bind(&mut binds, Buf::AdapterIds, &adapter_buf);
    } else {
        input.bind(&mut binds, Buf::GateInput);
    }
    if bias_used {
        bias.bind(&mut binds, Buf::SelectionBias);
    }
    bind(&mut binds, Buf::Ids, &ids);
    bind(&mut binds, Buf::RouteWeights, &weights);
    if rp.writes_probs {
        bind(&mut binds, Buf::Probs, &probs);
    }
    let mut host = HostBackend::new(c.schedule);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { run_route(&gating_build(c.dtype), &rp, &binds, &mut host) }
        .map_err(|err| TestCaseError::fail(format!("{c:?}: {err}")))?;
    prop_assert_eq!(host.launches, usize::from(t > 0), "{:?}", c);
    let (got_ids, got_w) = (ids.read(), weights.read());
    let tol = 4.0 * tolerance_with(f64::powi(2.0, -24), f64::powi(2.0, -24), e + 8);
    let close = |g: f32, w: f64| (g as f64 - w).abs() <= tol * w.abs().max(1.0);
    let mut boundary_tokens = 0;
    for tok in 0..t {
        let (gi, wi) = (&got_ids[tok * slots..(tok + 1) * slots], &want.ids[tok * slots..(tok + 1) * slots]);
        if gi != wi {
            prop_assert!(
                near_boundary(&c.gating, &z[tok * e..(tok + 1) * e], bias_used.then_some(&b[..])),
                "{c:?}: token {tok}: ids {gi:?} vs reference {wi:?}"
            );
            boundary_tokens += 1;
            // Shape only: filled slots first, then empty ones.
            let filled = gi.iter().take_while(|&&id| id >= 0).count();
            prop_assert!(gi[filled..].iter().all(|&id| id == -1), "{c:?}: token {tok}: {gi:?}");
            continue;
        }
        for s in 0..slots {
            let (g, w) = (got_w[tok * slots + s], want.weights[tok * slots + s]);
            prop_assert!(close(g, w), "{c:?}: token {tok} slot {s}: weight {g} vs {w}");
        }
    }
    if let (true, Some(wp)) = (rp.writes_probs, &want.probs) {
        for (i, (&g, &w)) in probs.read().iter().zip(wp).enumerate() {
            prop_assert!(close(g, w), "{c:?}: prob {i}: {g} vs {w}");
        }
    }
    if boundary_tokens == 0 {
        check_stats(c, &want, &input, &z)?;
    }
    check_plan(c, &want)?;
    check_slot_plans(c, &want)?;
    Ok(boundary_tokens)
}

/// The statistics kernels on the reference routing (ids, probabilities as f32, raw scores).
fn check_stats(c: &Case, want: &Routing, scores: &Input, z: &[f64]) -> Result<(), TestCaseError> {
    let (t, e) = (c.tokens, c.experts);
    let sp =
        StatsPlan::for_gating(&c.gating, t, e, BLOCK_THREADS).map_err(|err| TestCaseError::fail(err.to_string()))?;
    let has_scores = sp.params.has_scores != 0;
    let reference = router_stats(want, has_scores.then_some(z), sp.entropy);
    let ids = Buffer::from_slice("ids", &want.ids);
    let probs_f32: Vec<f32> = want.probs.as_ref().map_or(vec![], |p| p.iter().map(|&v| v as f32).collect());
    let probs = Buffer::from_slice("probs", &probs_f32);
    let workspace = Buffer::<u32>::poisoned("workspace", sp.workspace_words);
    let out = Buffer::<f32>::poisoned("stats", sp.out_len);
    let mut binds = Bindings::new();
    bind(&mut binds, Buf::Ids, &ids);
    if sp.params.has_probs != 0 {
        bind(&mut binds, Buf::Probs, &probs);
    }
    if has_scores {
        scores.bind(&mut binds, Buf::GateInput);
    }
    bind(&mut binds, Buf::StatsWorkspace, &workspace);
    bind(&mut binds, Buf::StatsOut, &out);
    let mut host = HostBackend::new(c.schedule);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { run_stats(&gating_build(c.dtype), &sp, &binds, &mut host) }
        .map_err(|err| TestCaseError::fail(format!("{c:?}: {err}")))?;
    let got = sp.decode(&out.read()).map_err(|err| TestCaseError::fail(err.to_string()))?;
    // Sums over T tokens of f32 values: the reduction length is T (and E inside each term).
    let tol = 4.0 * tolerance_with(f64::powi(2.0, -24), f64::powi(2.0, -24), t + e + 8);
    let close = |g: f64, w: f64| (g - w).abs() <= tol * w.abs().max(1.0);
    for (name, g, w) in [
        ("selected_fraction", &got.selected_fraction, &reference.selected_fraction),
        ("top1_fraction", &got.top1_fraction, &reference.top1_fraction),
    ] {
        for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
            prop_assert!(close(g, w), "{c:?}: {name}[{i}] {g} vs {w}");
        }
    }
    for (name, g, w) in [
        ("mean_prob", &got.mean_prob, &reference.mean_prob),
        ("masked_mean_prob", &got.masked_mean_prob, &reference.masked_mean_prob),
    ] {
        prop_assert_eq!(g.is_some(), w.is_some(), "{:?}: {}", c, name);
        if let (Some(g), Some(w)) = (g, w) {
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                prop_assert!(close(g, w), "{c:?}: {name}[{i}] {g} vs {w}");
            }
        }
    }
    for (name, g, w) in [("z_loss", got.z_loss, reference.z_loss), ("entropy", got.entropy, reference.entropy)] {
        prop_assert_eq!(g.is_some(), w.is_some(), "{:?}: {}", c, name);
        if let (Some(g), Some(w)) = (g, w) {
            prop_assert!(close(g, w) || (g.is_infinite() && g == w), "{c:?}: {name} {g} vs {w}");
        }
    }
    Ok(())
}

/// The experts a plan covers, drawn from the seed: the whole layer half the time, else an
/// expert-parallel shard `lo..hi` of it.
fn expert_window(e: usize, seed: u64) -> Range<usize> {
    if (seed >> 40) & 1 == 0 || e == 1 {
        return 0..e;
    }
    let lo = (seed >> 41) as usize % e;
    lo..lo + 1 + (seed >> 52) as usize % (e - lo)
}

/// What a plan over `window` sees: ids of the window renumbered from 0, every other id empty.
fn window_ids(ids: &[i32], window: &Range<usize>) -> Vec<i32> {
    let local = |id: i32| usize::try_from(id).ok().filter(|i| window.contains(i)).map(|i| (i - window.start) as i32);
    ids.iter().map(|&id| local(id).unwrap_or(-1)).collect()
}

/// The routing-plan kernels on the reference ids (over a window of the experts, see
/// [`expert_window`]), against `RoutingPlan::build` of the window's ids.
fn check_plan(c: &Case, want: &Routing) -> Result<(), TestCaseError> {
    let (t, slots) = (c.tokens, want.slots);
    let window = expert_window(c.experts, c.seed);
    let e = window.len();
    let block = 1 + (c.seed % 5) as usize * 3;
    let expected = RoutingPlan::build(&window_ids(&want.ids, &window), t, slots, e, block)
        .map_err(|err| TestCaseError::fail(err.to_string()))?;
    let gp = plan_grouping(t, slots, window.clone(), c.experts, block, BLOCK_THREADS)
        .map_err(|err| TestCaseError::fail(err.to_string()))?;
    let ids = Buffer::from_slice("ids", &want.ids);
    let workspace = Buffer::<u32>::poisoned("workspace", gp.lens.get(Buf::PlanWorkspace));
    let counts = Buffer::<u32>::poisoned("counts", e);
    let offsets = Buffer::<u32>::poisoned("offsets", e + 1);
    let entries = Buffer::<TokenSlot>::poisoned("entries", gp.lens.get(Buf::PlanEntries).max(1));
    let status = Buffer::<u32>::poisoned("status", 1);
    let mut binds = Bindings::new();
    bind(&mut binds, Buf::Ids, &ids);
    bind(&mut binds, Buf::PlanWorkspace, &workspace);
    bind(&mut binds, Buf::PlanCounts, &counts);
    bind(&mut binds, Buf::PlanOffsets, &offsets);
    bind(&mut binds, Buf::PlanEntries, &entries);
    bind(&mut binds, Buf::PlanStatus, &status);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { run_group(&gating_build(c.dtype), &gp, &binds, &mut HostBackend::new(c.schedule)) }
        .map_err(|err| TestCaseError::fail(format!("{c:?}: {err}")))?;
    prop_assert_eq!(status.read(), vec![0], "{:?} {:?}", c, window);
    prop_assert_eq!(counts.read(), expected.counts.clone(), "{:?} {:?}", c, window);
    prop_assert_eq!(offsets.read(), expected.offsets.clone(), "{:?}", c);
    let got_entries = entries.read();
    prop_assert_eq!(&got_entries[..expected.entries.len()], &expected.entries[..], "{:?}", c);
    Ok(())
}

/// The outputs of the column-mode plan kernels.
struct SlotPlanOutputs {
    counts: Vec<u32>,
    offsets: Vec<u32>,
    entries: Vec<TokenSlot>,
    status: Vec<u32>,
    launches: usize,
}

/// Runs the plan kernels in column mode over `ids [t, slots]` for the experts `window` of
/// `global` on the CPU, outputs poisoned (entries with garbage that is not padding).
fn run_slot_plans(
    ids: &[i32],
    t: usize,
    slots: usize,
    (window, global): (Range<usize>, usize),
    bm: usize,
    dtype: DType,
    schedule: Schedule,
) -> mole::Result<(SlotGroupingPlan, SlotPlanOutputs)> {
    let sp = plan_slot_grouping(t, slots, window, global, bm, BLOCK_THREADS)?;
    let ids = Buffer::from_slice("ids", ids);
    let lens = sp.lens();
    let workspace = Buffer::<u32>::poisoned("workspace", lens.get(Buf::PlanWorkspace));
    let counts = Buffer::<u32>::poisoned("counts", lens.get(Buf::PlanCounts));
    let offsets = Buffer::<u32>::poisoned("offsets", lens.get(Buf::PlanOffsets));
    // Not the poison bytes (0xFF, which equal padding): the kernels must write every padding entry.
    let garbage = TokenSlot { token: 0xDEAD, slot: 0xBEEF };
    let entries = Buffer::from_slice("entries", &vec![garbage; lens.get(Buf::PlanEntries).max(1)]);
    let status = Buffer::<u32>::poisoned("status", slots);
    let mut binds = Bindings::new();
    bind(&mut binds, Buf::Ids, &ids);
    bind(&mut binds, Buf::PlanWorkspace, &workspace);
    bind(&mut binds, Buf::PlanCounts, &counts);
    bind(&mut binds, Buf::PlanOffsets, &offsets);
    bind(&mut binds, Buf::PlanEntries, &entries);
    bind(&mut binds, Buf::PlanStatus, &status);
    let mut host = HostBackend::new(schedule);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { run_group_slots(&gating_build(dtype), &sp, &binds, &mut host) }?;
    let out = SlotPlanOutputs {
        counts: counts.read(),
        offsets: offsets.read(),
        entries: entries.read(),
        status: status.read(),
        launches: host.launches,
    };
    Ok((sp, out))
}

/// The plan kernels in column mode (one launch set per slot, into shared packed buffers) on the
/// reference ids (over a window of the experts, see [`expert_window`]), against
/// `SlotPlans::build` of the window's ids repacked at the device's entry stride: offsets and
/// entries, padding included, must be equal.
fn check_slot_plans(c: &Case, want: &Routing) -> Result<(), TestCaseError> {
    let (t, slots) = (c.tokens, want.slots);
    let window = expert_window(c.experts, c.seed >> 1);
    let bm = [1, 4, 16, 32][(c.seed >> 8) as usize % 4];
    let expected = SlotPlans::build(&window_ids(&want.ids, &window), t, slots, window.len(), bm)
        .map_err(|err| TestCaseError::fail(err.to_string()))?;
    let (sp, got) = run_slot_plans(&want.ids, t, slots, (window.clone(), c.experts), bm, c.dtype, c.schedule)
        .map_err(|err| TestCaseError::fail(format!("{c:?}: {err}")))?;
    let stride = sp.entry_stride;
    prop_assert!(stride >= expected.entry_stride, "{:?}: stride {} < {}", c, stride, expected.entry_stride);
    let mut expected_entries = vec![TokenSlot::PADDING; slots * stride];
    for s in 0..slots {
        let from = &expected.entries[s * expected.entry_stride..(s + 1) * expected.entry_stride];
        expected_entries[s * stride..s * stride + from.len()].copy_from_slice(from);
    }
    let per_slot = if sp.grouping.count.is_some() { 3 } else { 1 };
    prop_assert_eq!(got.launches, slots * per_slot, "{:?}", c);
    prop_assert_eq!(got.status, vec![0; slots], "{:?} {:?}", c, window);
    prop_assert_eq!(got.offsets, expected.offsets, "{:?} {:?} bm {}", c, window, bm);
    prop_assert_eq!(&got.entries[..slots * stride], &expected_entries[..], "{:?} {:?} bm {}", c, window, bm);
    Ok(())
}

/// A shard's plans skip the other shards' ids without a word and flag only ids outside
/// `-1..E_global`: column 0 holds the shard's ids, other shards' ids and empty slots; column 1
/// also an id of E_global; column 2 a negative id other than -1.
#[test]
fn shard_plans_skip_other_shards_and_flag_only_invalid_ids() {
    let (global, window, t) = (12usize, 4..8usize, 40usize);
    let mut ids = Vec::with_capacity(t * 3);
    for i in 0..t as i32 {
        ids.push([-1, 2, 4, 5, 6, 7, 8, 11, 0][i as usize % 9]);
        ids.push(if i == 17 { global as i32 } else { (i * 5) % global as i32 });
        ids.push(if i == 3 { -2 } else { 4 + i % 4 });
    }
    for (bm, schedule) in [(1, Schedule::Forward), (4, Schedule::Seeded(3))] {
        let (_, got) = run_slot_plans(&ids, t, 3, (window.clone(), global), bm, DType::F32, schedule).unwrap();
        assert_eq!(got.status, [0, 1, 1], "bm {bm}");
        // Counts are the window's own ids, renumbered from 0; the flagged ids are skipped.
        let mut want = vec![0u32; 3 * window.len()];
        for (i, &id) in ids.iter().enumerate() {
            if id >= 0 && window.contains(&(id as usize)) {
                want[(i % 3) * window.len() + id as usize - window.start] += 1;
            }
        }
        assert_eq!(got.counts, want, "bm {bm}");
        assert!(want.iter().all(|&n| n > 0));
    }
    // The whole layer flags what the shard skipped silently only when it is past E_global.
    let (_, whole) = run_slot_plans(&ids, t, 3, (0..global, global), 1, DType::F32, Schedule::Forward).unwrap();
    assert_eq!(whole.status, [0, 1, 1]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn gating_kernels_match_the_reference(c in case_strategy()) {
        let boundary = run_case(&c)?;
        // Boundary tokens need an f64 decision within 1e-5 of its threshold: rare by construction.
        prop_assert!(boundary * 20 <= c.tokens.max(1), "{:?}: {} boundary tokens", c, boundary);
    }
}

#[test]
fn a_few_thousand_tokens_in_every_dtype() {
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let experts = [7, 64, 256][i];
        let c = Case {
            tokens: [3001, 1500, 257][i],
            experts,
            gating: make_gating(0, 8, 0.5, 1.0, experts),
            dtype,
            seed: 17 + i as u64,
            schedule: Schedule::Seeded(5),
        };
        run_case(&c).unwrap();
    }
}
