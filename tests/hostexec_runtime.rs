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
use mole::exec::{Bindings, Buf};
use mole::layer::{default_build, Choice, ChoiceSource, STANDARD_METHODS};
use mole::model::{LayerSpec, MethodShape, Mix, Router};
use mole::reference;
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

/// Runs `spec` over `tokens` tokens with `choice` (the heuristic's when `None`); returns the
/// strategy, `y` and the reference `y`.
fn run<T: KernelElement>(
    spec: &LayerSpec,
    tokens: usize,
    choice: Option<Choice>,
    seed: u64,
) -> (Strategy, Vec<f64>, Vec<f64>) {
    // 132 SMs (an H100): small batches take the split variant.
    let mut planner = LayerPlanner::new(spec, T::DTYPE, 132, None).unwrap();
    if let Some(c) = choice {
        planner = planner.with_choice(c);
    }
    let plan = planner.plan(tokens).unwrap();
    let data = SyntheticLayer::<T>::new(spec, tokens, seed);
    let constants = LayerConstants::of(spec);
    let gate_input = data.logits.as_deref().or(data.weights.as_deref());
    let tensors: Vec<(Buf, Option<Buffer<T>>)> = vec![
        (Buf::X, Some(buffer("x", &data.x))),
        (Buf::A, Some(buffer("a", &data.a))),
        (Buf::B, Some(buffer("b", &data.b))),
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
    plan.bind_workspace(&mut b, workspace.device_ptr());
    let mut host = HostBackend::new(Schedule::Seeded(seed));
    // SAFETY: every bound address is a live host-execution buffer of the bound length; the
    // workspace holds the plan's bytes.
    unsafe { planner.launch(&plan, &b, &mut host) }.unwrap_or_else(|e| panic!("{}: {e}", plan.choice.strategy));
    assert!(host.launches > 0);
    let y = tensors[3].1.as_ref().unwrap().read().iter().map(|v| v.to_f64()).collect();
    let want = reference::forward(spec, &data.inputs()).unwrap().y;
    (plan.choice.strategy, y, want)
}

fn tolerance(spec: &LayerSpec, dtype: DType, strategy: Strategy) -> f64 {
    let roundings = if strategy == Strategy::Grouped { spec.slots() as f64 + 1.0 } else { 2.0 };
    reference::tolerance(dtype, spec.d_in + spec.total_rank() + 16) * roundings
}

fn grouped_runs(spec: &LayerSpec) -> bool {
    spec.mix == Mix::ExpertScale && !matches!(spec.router(), Some(Router::H { .. } | Router::LowRank))
}

fn check<T: KernelElement>(spec: &LayerSpec, tokens: usize, choice: Option<Choice>, what: &str) {
    let (strategy, got, want) = run::<T>(spec, tokens, choice, tokens as u64 + 17);
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

#[test]
fn a_misaligned_or_missing_tensor_is_refused_before_any_launch() {
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
}
