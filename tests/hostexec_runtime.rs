//! The layer runtime's launch sequence on the CPU execution layer: `LayerPlanner` plans a
//! forward (strategy, launches, workspace layout), the caller's tensors and a poisoned byte
//! workspace are bound exactly as `CompiledLayer::forward` binds them, and `LayerPlanner::launch`
//! runs every launch (fused; split; routing, device slot plans and SGMV) through the same packing
//! code the GPU uses. Every standard method, with and without per-expert scales, against the f64
//! reference, under the tolerance of f32 accumulation over `d_in + R` and one (fused) or
//! `slots + 1` (grouped) roundings of `y`. The layer's constants (rank offsets, per-expert scales)
//! are bound as `CompiledLayer` binds its device copies of them.

mod host;

use host::HostBackend;
use mole::kernels::exec::{Bindings, Buf};
use mole::model::STANDARD_METHODS;
use mole::model::{ExpertShard, LayerInputs, LayerSpec, MethodShape, Mix, RankLayout, Router};
use mole::reference;
use mole::runtime::{default_build, Choice, ChoiceSource};
use mole::runtime::{LayerConstants, LayerPlanner};
use mole::synth::{Rng, SyntheticLayer};
use mole::tune::Strategy;
use mole::{DType, KernelElement};
use mole_hostexec::{Buffer, Schedule};

fn buffer<T: bytemuck::Pod>(name: &str, v: &[T]) -> Buffer<T> {
    if v.is_empty() {
        Buffer::poisoned(name, 1)
    } else {
        Buffer::from_slice(name, v)
    }
}

/// Runs `spec` (or its expert shard `shard`) over `tokens` tokens with `choice` (the
/// heuristic's when `None`); returns the strategy, `y` and the reference `y`.
fn run<T: KernelElement>(
    spec: &LayerSpec,
    shard: Option<ExpertShard>,
    tokens: usize,
    choice: Option<Choice>,
    seed: u64,
) -> (Strategy, Vec<f64>, Vec<f64>) {
    // 132 SMs (an H100): small batches take the split variant.
    let mut planner = LayerPlanner::new(spec, T::DTYPE, 132, None).unwrap();
    if let Some(c) = choice {
        planner = planner.with_choice(c);
    }
    if let Some(s) = shard {
        planner = planner.with_shard(s).unwrap();
    }
    let plan = planner.plan(tokens).unwrap();
    let data = SyntheticLayer::<T>::new(spec, tokens, seed);
    let (a, b_shard) = match shard {
        Some(s) => s.take_bank(&spec.ranks, spec.d_in, &data.a, &data.b).unwrap(),
        None => (data.a.clone(), data.b.clone()),
    };
    let constants = LayerConstants::for_planner(&planner).unwrap();
    let gate_input = data.logits.as_deref().or(data.weights.as_deref());
    let tensors: Vec<(Buf, Option<Buffer<T>>)> = vec![
        (Buf::X, Some(buffer("x", &data.x))),
        (Buf::A, Some(buffer("a", &a))),
        (Buf::B, Some(buffer("b", &b_shard))),
        (Buf::Y, Some(buffer("y", &data.y))),
        (Buf::RouterWeight, data.router_weight.as_deref().map(|v| buffer("router_weight", v))),
        (Buf::RouterBias, data.router_bias.as_deref().map(|v| buffer("router_bias", v))),
        (Buf::GateInput, gate_input.map(|v| buffer("gate_input", v))),
        (Buf::SelectionBias, data.selection_bias.as_deref().map(|v| buffer("selection_bias", v))),
        (Buf::Cores, data.cores.as_deref().map(|v| buffer("cores", v))),
    ];
    let adapter_ids = data.adapter_ids.as_deref().map(|v| buffer("adapter_ids", v));
    let rank_offsets = buffer("rank_offsets", &constants.rank_offsets);
    let expert_scales = constants.expert_scales.as_deref().map(|s| buffer("expert_scales", s));
    let workspace = Buffer::<u8>::poisoned("workspace", plan.workspace_bytes.max(1));
    let mut b = Bindings::new();
    for (buf, t) in &tensors {
        if let Some(t) = t {
            b.sized(*buf, t.device_ptr(), t.len());
        }
    }
    if let Some(ids) = &adapter_ids {
        b.sized(Buf::AdapterIds, ids.device_ptr(), ids.len());
    }
    b.sized(Buf::RankOffsets, rank_offsets.device_ptr(), rank_offsets.len());
    if let Some(s) = &expert_scales {
        b.sized(Buf::ExpertScales, s.device_ptr(), s.len());
    }
    plan.bind_workspace(&mut b, workspace.device_ptr()).unwrap();
    let mut host = HostBackend::new(Schedule::Seeded(seed));
    // SAFETY: every bound address is a live host-execution buffer of the bound length; the
    // workspace holds the plan's bytes.
    unsafe { planner.launch(&plan, &b, &mut host) }.unwrap_or_else(|e| panic!("{}: {e}", plan.choice.strategy));
    assert!(host.launches > 0);
    let y = tensors[3].1.as_ref().unwrap().read().iter().map(|v| v.to_f64()).collect();
    let want = match shard {
        Some(s) => reference::forward_shard(spec, s, &LayerInputs { a: &a, b: &b_shard, ..data.inputs() }),
        None => reference::forward(spec, &data.inputs()),
    };
    (plan.choice.strategy, y, want.unwrap().y)
}

fn tolerance(spec: &LayerSpec, dtype: DType, strategy: Strategy) -> f64 {
    let roundings = if strategy == Strategy::Grouped { spec.slots() as f64 + 1.0 } else { 2.0 };
    reference::tolerance(dtype, spec.d_in + spec.total_rank() + 16) * roundings
}

fn grouped_runs(spec: &LayerSpec) -> bool {
    spec.mix == Mix::ExpertScale && !matches!(spec.router(), Some(Router::H { .. } | Router::LowRank))
}

fn check<T: KernelElement>(spec: &LayerSpec, tokens: usize, choice: Option<Choice>, what: &str) {
    let (strategy, got, want) = run::<T>(spec, None, tokens, choice, tokens as u64 + 17);
    let err = reference::max_scaled_error(&got, &want);
    let tol = tolerance(spec, T::DTYPE, strategy);
    assert!(err <= tol, "{what} {} {strategy} T={tokens}: error {err:.3e} > {tol:.3e}", T::DTYPE);
}

/// `spec` with random per-expert scales (exact in f32; zero and negative among them).
fn with_scales(spec: LayerSpec, seed: u64) -> LayerSpec {
    let mut rng = Rng::new(seed);
    let scales = (0..spec.ranks.num_experts()).map(|_| [0.0, -1.5, 0.75, 2.0, -0.25, 3.5][rng.below(6)]).collect();
    LayerSpec { expert_scales: Some(scales), ..spec }
}

#[test]
fn every_method_through_the_runtime_matches_the_reference() {
    for (i, (method, experts, rank, k)) in STANDARD_METHODS.into_iter().enumerate() {
        let spec = method.spec(MethodShape { d_in: 48, d_out: 40, experts, rank, k, alpha: 2.0 }).unwrap();
        for (tokens, scaled) in [(3usize, false), (37, false), (5, true), (37, true)] {
            let spec = if scaled { with_scales(spec.clone(), i as u64 + tokens as u64) } else { spec.clone() };
            let what = format!("{method}{}", if scaled { " with expert scales" } else { "" });
            check::<half::bf16>(&spec, tokens, None, &what);
            if grouped_runs(&spec) {
                let choice = Choice {
                    strategy: Strategy::Grouped,
                    build: default_build(Strategy::Grouped, DType::BF16),
                    source: ChoiceSource::Heuristic,
                };
                check::<half::bf16>(&spec, tokens, Some(choice), &what);
            }
        }
    }
    let spec = STANDARD_METHODS[0];
    let spec =
        spec.0.spec(MethodShape { d_in: 32, d_out: 24, experts: spec.1, rank: 4, k: spec.3, alpha: 2.0 }).unwrap();
    check::<f32>(&spec, 20, None, "f32");
    check::<f32>(&with_scales(spec, 3), 20, None, "f32 with expert scales");
}

/// Each shard of a partition through the runtime against the shard reference, and their deltas,
/// summed, against the whole layer's: within the sum of the shards' bounds.
fn check_shards<T: KernelElement>(spec: &LayerSpec, shards: usize, tokens: usize, what: &str) {
    let seed = tokens as u64 + 5;
    let y0: Vec<f64> = SyntheticLayer::<T>::new(spec, tokens, seed).y.iter().map(|v| v.to_f64()).collect();
    let full = reference::forward(spec, &SyntheticLayer::<T>::new(spec, tokens, seed).inputs()).unwrap().y;
    let tol = tolerance(spec, T::DTYPE, Strategy::Grouped);
    let (mut sum, mut bound) = (y0.clone(), vec![0.0; y0.len()]);
    for shard in ExpertShard::partition(spec.ranks.num_experts(), shards).unwrap() {
        let (strategy, got, want) = run::<T>(spec, Some(shard), tokens, None, seed);
        assert_eq!(strategy, Strategy::Grouped);
        let err = reference::max_scaled_error(&got, &want);
        assert!(err <= tol, "{what} {} {shard:?} T={tokens}: error {err:.3e} > {tol:.3e}", T::DTYPE);
        assert!(want.iter().zip(&y0).any(|(w, y)| w != y), "{what} {shard:?}: the shard adds nothing");
        for i in 0..sum.len() {
            sum[i] += got[i] - y0[i];
            bound[i] += tol * (1.0 + want[i].abs());
        }
    }
    for (i, ((s, f), b)) in sum.iter().zip(&full).zip(&bound).enumerate() {
        assert!((s - f).abs() <= *b, "{what} {} in {shards} shards T={tokens}: y[{i}] {s} vs {f}", T::DTYPE);
    }
}

#[test]
fn expert_shards_through_the_runtime_sum_to_the_layer() {
    let shape = |experts, rank, k| MethodShape { d_in: 40, d_out: 24, experts, rank, k, alpha: 2.0 };
    let mut n = 0;
    for (method, experts, rank, k) in STANDARD_METHODS {
        let spec = method.spec(shape(experts, rank.min(8), k)).unwrap();
        if grouped_runs(&spec) {
            check_shards::<half::bf16>(&spec, 2 + n % 2, 19, &method.to_string());
            n += 1;
        }
    }
    assert!(n >= 8, "{n} methods shard");
    let (method, experts, _, k) = STANDARD_METHODS[0];
    let mut uneven = method.spec(shape(experts, 4, k)).unwrap();
    uneven.ranks = RankLayout::from_offsets(vec![0, 3, 3, 10, 12, 20, 21, 29, 32]).unwrap();
    check_shards::<f32>(&uneven, 3, 41, "uneven ranks");
    check_shards::<half::f16>(&uneven, 2, 7, "uneven ranks");
    // What an all-to-all shard runs: the gate weights it received, over the global experts.
    uneven.gating = mole::model::Gating::Given { top_k: Some(1), softmax_topk: false };
    check_shards::<half::bf16>(&uneven, 3, 23, "given weights");
}

#[test]
fn a_shard_refuses_what_the_grouped_path_cannot_run() {
    let shape = MethodShape { d_in: 16, d_out: 16, experts: 8, rank: 4, k: 2, alpha: 2.0 };
    let planner = |m: mole::model::Method| LayerPlanner::new(&m.spec(shape).unwrap(), DType::BF16, 132, None).unwrap();
    let unsupported = |r: mole::Result<LayerPlanner>| matches!(r, Err(mole::MoleError::Unsupported(_)));
    assert!(unsupported(planner(mole::model::Method::Comol).with_shard(ExpertShard { first: 0, count: 1 })));
    let fly = MethodShape { experts: 64, rank: 1, k: 8, ..shape };
    let fly = LayerPlanner::new(&mole::model::Method::FlyLora.spec(fly).unwrap(), DType::BF16, 132, None).unwrap();
    assert!(unsupported(fly.with_shard(ExpertShard { first: 0, count: 32 })));
    let mix = || planner(mole::model::Method::MixLoraPerLinear);
    assert!(matches!(
        mix().with_shard(ExpertShard { first: 6, count: 3 }),
        Err(mole::MoleError::InvalidParameter { .. })
    ));
    assert!(matches!(mix().with_shard(ExpertShard { first: 6, count: 0 }), Err(mole::MoleError::ZeroDimension { .. })));
    // A forced fused choice is refused at planning time; the shard's offsets are its own.
    let fused = Choice {
        strategy: Strategy::Fused,
        build: default_build(Strategy::Fused, DType::BF16),
        source: ChoiceSource::Heuristic,
    };
    let sharded = mix().with_choice(fused).with_shard(ExpertShard { first: 2, count: 3 }).unwrap();
    assert!(matches!(sharded.plan(4), Err(mole::MoleError::Unsupported(_))));
    assert_eq!(sharded.rank_offsets().unwrap(), [0, 4, 8, 12]);
    let plan = mix().with_shard(ExpertShard { first: 2, count: 3 }).unwrap().plan(4).unwrap();
    assert_eq!((plan.lens.get(Buf::A), plan.lens.get(Buf::B)), (16 * 12, 12 * 16));
}

#[test]
fn a_short_or_missing_tensor_or_a_misaligned_workspace_is_refused_before_any_launch() {
    let (method, experts, rank, k) = STANDARD_METHODS[0];
    let spec = method.spec(MethodShape { d_in: 16, d_out: 16, experts, rank, k, alpha: 2.0 }).unwrap();
    let planner = LayerPlanner::new(&spec, DType::BF16, 132, None).unwrap();
    let plan = planner.plan(4).unwrap();
    let x = Buffer::<half::bf16>::poisoned("x", 4 * 16 - 1);
    let mut b = Bindings::new();
    b.sized(Buf::X, x.device_ptr(), x.len());
    let mut host = HostBackend::new(Schedule::Forward);
    // SAFETY: the call is refused before any launch (x is one element short).
    let err = unsafe { planner.launch(&plan, &b, &mut host) }.unwrap_err();
    assert!(matches!(err, mole::MoleError::ShapeMismatch { what: "x", .. }), "{err}");
    b.raw(Buf::X, x.device_ptr());
    // SAFETY: refused before any launch (A is missing).
    let err = unsafe { planner.launch(&plan, &b, &mut host) }.unwrap_err();
    assert!(matches!(err, mole::MoleError::MissingInput { name: "a", .. }), "{err}");
    assert_eq!(host.launches, 0);
    // The workspace's regions are aligned relative to its base: the base must be aligned too.
    let split = planner.plan(1).unwrap();
    assert!(split.workspace_bytes > 0, "the split variant has a workspace");
    let workspace = Buffer::<u8>::poisoned("workspace", split.workspace_bytes + 256);
    split.bind_workspace(&mut b, workspace.device_ptr()).unwrap();
    let err = split.bind_workspace(&mut b, workspace.device_ptr() + 4).unwrap_err();
    assert!(matches!(err, mole::MoleError::InvalidParameter { name: "workspace", .. }), "{err}");
}
