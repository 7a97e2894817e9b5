//! The layer backward through the runtime's launch sequence on the CPU execution layer, as a
//! training framework drives it: `LayerPlanner::plan_training` runs a forward that saves the
//! routing into a poisoned caller-owned buffer (its `y` must be bit-identical to an inference
//! forward's), then `LayerPlanner::plan_backward` / `launch_backward` run the backward stages and one
//! weight-gradient reduction per trained parameter on the saved routing, with every gradient and
//! the workspace poisoned. Every method through both strategies, aux losses and frozen
//! parameters, in f32 and bf16, against the f64 reference backward; reruns under another thread
//! schedule are bit-identical.
//!
//! Tolerance of a weight gradient `Σ_t P[t, m] · Q[t, n]` (`dA`: `x` and `dh`; `dB`: `hm` and
//! `scale · dy`; the router's: `x` or `h` and `dz`; the cores': `w · h` and `g`):
//! `K · tolerance(dtype, T + n) · (Σ_t |P| · (|Q| + bound(Q)) + |want|)` with `n` the longest
//! chain of sums behind `Q` and `bound(Q)` the stages' own bound (`tests/backward_ref`): a wrong
//! operand, scale or output is off by the gradient's own size.

mod backward_ref;
mod host;

use backward_ref::expected;
use half::bf16;
use host::HostBackend;
use mole::kernels::exec::{Bindings, Buf};
use mole::model::STANDARD_METHODS;
use mole::model::{AuxLosses, Balance, LayerParam, LayerSpec, MethodShape, Mix, Router};
use mole::reference::{self, tolerance, LayerGrads};
use mole::runtime::{default_build, Choice, ChoiceSource, LayerConstants, LayerPlanner};
use mole::synth::{Rng, SyntheticLayer};
use mole::tune::Strategy;
use mole::{DType, KernelElement, MoleError};
use mole_hostexec::{Buffer, Schedule};

/// Headroom over one reduction's bound for the chained stages.
const K: f64 = 8.0;

fn buffer<T: bytemuck::Pod>(name: &str, v: &[T]) -> Buffer<T> {
    if v.is_empty() {
        Buffer::poisoned(name, 1)
    } else {
        Buffer::from_slice(name, v)
    }
}

/// What one run produced.
struct Run {
    y_inference: Vec<f64>,
    y_training: Vec<f64>,
    saved_ids: Vec<i32>,
    grads: Vec<(Buf, Vec<f64>)>,
}

/// The caller's tensors of `data` (and `dy`), as host-execution buffers.
struct Tensors<T: bytemuck::Pod> {
    bufs: Vec<(Buf, Buffer<T>)>,
    adapter_ids: Option<Buffer<i32>>,
    rank_offsets: Buffer<u32>,
    expert_scales: Option<Buffer<f32>>,
}

impl<T: KernelElement> Tensors<T> {
    fn new(planner: &LayerPlanner, data: &SyntheticLayer<T>, dy: &[T]) -> Self {
        let constants = LayerConstants::for_planner(planner).unwrap();
        let gate_input = data.logits.as_deref().or(data.weights.as_deref());
        let bufs = [
            (Buf::X, Some(&data.x[..])),
            (Buf::A, Some(&data.a[..])),
            (Buf::B, Some(&data.b[..])),
            (Buf::Dy, Some(dy)),
            (Buf::RouterWeight, data.router_weight.as_deref()),
            (Buf::RouterBias, data.router_bias.as_deref()),
            (Buf::GateInput, gate_input),
            (Buf::SelectionBias, data.selection_bias.as_deref()),
            (Buf::Cores, data.cores.as_deref()),
        ]
        .into_iter()
        .filter_map(|(b, v)| v.map(|v| (b, buffer(b.name(), v))))
        .collect();
        Tensors {
            bufs,
            adapter_ids: data.adapter_ids.as_deref().map(|v| buffer("adapter_ids", v)),
            rank_offsets: buffer("rank_offsets", &constants.rank_offsets),
            expert_scales: constants.expert_scales.as_deref().map(|s| buffer("expert_scales", s)),
        }
    }

    /// Bindings of the inputs and constants, with a fresh copy of `y` (the base output).
    fn bind(&self, y: &Buffer<T>) -> Bindings {
        let mut b = Bindings::new();
        for (buf, t) in &self.bufs {
            b.sized(*buf, t.device_ptr(), t.len());
        }
        b.sized(Buf::Y, y.device_ptr(), y.len());
        if let Some(ids) = &self.adapter_ids {
            b.sized(Buf::AdapterIds, ids.device_ptr(), ids.len());
        }
        b.sized(Buf::RankOffsets, self.rank_offsets.device_ptr(), self.rank_offsets.len());
        if let Some(s) = &self.expert_scales {
            b.sized(Buf::ExpertScales, s.device_ptr(), s.len());
        }
        b
    }
}

fn wide<T: KernelElement>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

fn run<T: KernelElement>(
    spec: &LayerSpec,
    tokens: usize,
    choice: Option<Choice>,
    seed: u64,
    schedule: Schedule,
) -> (Run, SyntheticLayer<T>, Vec<T>) {
    let mut planner = LayerPlanner::new(spec, T::DTYPE, 132, None).unwrap();
    if let Some(c) = choice {
        planner = planner.with_choice(c);
    }
    let data = SyntheticLayer::<T>::new(spec, tokens, seed);
    let dy: Vec<T> = Rng::new(seed ^ 0xd7).fill(tokens * spec.d_out, 1.0);
    let tensors = Tensors::new(&planner, &data, &dy);
    let mut host = HostBackend::new(schedule);

    // Inference, then a training forward on the same inputs.
    let inference = planner.plan(tokens).unwrap();
    let y = buffer("y", &data.y);
    let mut b = tensors.bind(&y);
    let workspace = Buffer::<u8>::poisoned("workspace", inference.workspace_bytes.max(1));
    inference.bind_workspace(&mut b, workspace.device_ptr()).unwrap();
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { planner.launch(&inference, &b, &mut host) }.unwrap();
    let y_inference = wide(&y.read());

    let training = planner.plan_training(tokens).unwrap();
    let y = buffer("y", &data.y);
    let mut b = tensors.bind(&y);
    let workspace = Buffer::<u8>::poisoned("workspace", training.workspace_bytes.max(1));
    let saved = Buffer::<u8>::poisoned("saved", training.saved_bytes);
    training.bind_workspace(&mut b, workspace.device_ptr()).unwrap();
    training.bind_saved(&mut b, saved.device_ptr()).unwrap();
    // SAFETY: as above; the saved buffer holds the plan's saved bytes.
    unsafe { planner.launch(&training, &b, &mut host) }.unwrap();
    let y_training = wide(&y.read());
    let ids_at = training.saved.iter().find(|(b, _)| *b == Buf::Ids).unwrap().1;
    let saved_bytes = saved.read();
    let saved_ids: Vec<i32> =
        bytemuck::cast_slice(&saved_bytes[ids_at..ids_at + 4 * training.lens.get(Buf::Ids)]).to_vec();

    // The backward on the saved routing.
    let plan = planner.plan_backward(tokens).unwrap();
    let y = buffer("y", &data.y);
    let mut b = tensors.bind(&y);
    let outputs: Vec<(Buf, Buffer<T>)> =
        plan.outputs().into_iter().map(|(buf, n)| (buf, Buffer::<T>::poisoned(buf.name(), n))).collect();
    for (buf, g) in &outputs {
        b.sized(*buf, g.device_ptr(), g.len());
    }
    let workspace = Buffer::<u8>::poisoned("backward workspace", plan.workspace_bytes.max(1));
    plan.bind(&mut b, workspace.device_ptr(), saved.device_ptr()).unwrap();
    // SAFETY: as above; the saved buffer holds what the training forward wrote.
    unsafe { planner.launch_backward(&plan, &b, &mut host) }.unwrap();
    let grads = outputs.iter().map(|(buf, g)| (*buf, wide(&g.read()))).collect();
    (Run { y_inference, y_training, saved_ids, grads }, data, dy)
}

/// `Σ_t |P[t, m]| · Q[t, n]` for `P [T, M]`, `Q [T, N]` (with per-token row weights `rw [T, C]`:
/// one `[M, N]` block per column).
fn abs_sums(p: &[f64], q: &[f64], t: usize, m: usize, n: usize, rw: Option<(&[f64], usize)>) -> Vec<f64> {
    let outputs = rw.map_or(1, |(_, c)| c);
    let mut out = vec![0.0; outputs * m * n];
    for tok in 0..t {
        for o in 0..outputs {
            let w = rw.map_or(1.0, |(rw, c)| rw[tok * c + o].abs());
            for i in 0..m {
                let pi = w * p[tok * m + i].abs();
                for j in 0..n {
                    out[(o * m + i) * n + j] += pi * q[tok * n + j];
                }
            }
        }
    }
    out
}

/// Checks every gradient the run wrote against the reference, and that it wrote exactly the
/// gradients the reference has.
fn check<T: KernelElement>(spec: &LayerSpec, run: &Run, data: &SyntheticLayer<T>, dy: &[T], what: &str) {
    let data64 = SyntheticLayer::<f64> {
        tokens: data.tokens,
        x: wide(&data.x),
        a: wide(&data.a),
        b: wide(&data.b),
        y: wide(&data.y),
        router_weight: data.router_weight.as_deref().map(wide),
        router_bias: data.router_bias.as_deref().map(wide),
        logits: data.logits.as_deref().map(wide),
        weights: data.weights.as_deref().map(wide),
        adapter_ids: data.adapter_ids.clone(),
        selection_bias: data.selection_bias.as_deref().map(wide),
        cores: data.cores.as_deref().map(wide),
    };
    let dy = wide(dy);
    let out = reference::forward(spec, &data64.inputs()).unwrap();
    let want: LayerGrads = reference::backward(spec, &data64.inputs(), &dy).unwrap();
    let stages = expected(spec, T::DTYPE, &data64, &dy, &out, &want).unwrap();
    assert_eq!(run.saved_ids, out.routing.ids, "{what}: the saved routing");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&run.y_training), bits(&run.y_inference), "{what}: a training forward's y");

    let (t, d_in, d_out, r, e) = (data.tokens, spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
    let n = d_in + d_out + r + e + out.routing.slots;
    let tol = K * tolerance(T::DTYPE, t + n);
    let mag = |v: &[f64], bound: &[f64]| v.iter().zip(bound).map(|(v, b)| v.abs() + b).collect::<Vec<_>>();
    let dh = mag(&stages.dh, &stages.dh_bound);
    let dz = stages.dz.as_ref().map(|dz| mag(dz, &stages.dz_bound));
    let dy_abs: Vec<f64> = dy.iter().map(|v| (spec.scale * v).abs()).collect();
    let ones = vec![1.0; t];
    let mut w = vec![0.0; t * e];
    for (i, &id) in out.routing.ids.iter().enumerate() {
        if id >= 0 {
            w[i / out.routing.slots * e + id as usize] += out.routing.weights[i];
        }
    }
    // g = scale · s_0 · dy · Bᵀ, for the cores.
    let g: Vec<f64> = (0..t * r)
        .map(|i| {
            let (tok, c) = (i / r, i % r);
            let s = spec.scale * spec.expert_scale(spec.ranks.expert_of_col(c));
            (0..d_out).map(|j| (s * dy[tok * d_out + j] * data64.b[c * d_out + j]).abs()).sum::<f64>()
        })
        .collect();
    let mut expected_outputs = vec![Buf::DX];
    for (buf, got) in &run.grads {
        let (want_v, sums): (&Vec<f64>, Vec<f64>) = match buf {
            Buf::DX => (&want.x, stages.dx_bound.iter().map(|b| b / tol * K).collect()),
            Buf::DGateInput => {
                let g = want.logits.as_ref().or(want.weights.as_ref()).unwrap();
                (g, stages.gate_bound.iter().map(|b| b / tol * K).collect())
            }
            Buf::DA => (want.a.as_ref().unwrap(), abs_sums(&data64.x, &dh, t, d_in, r, None)),
            Buf::DB => (want.b.as_ref().unwrap(), abs_sums(&out.h_mixed, &dy_abs, t, r, d_out, None)),
            Buf::DRouterWeight => {
                let p = if matches!(spec.router(), Some(Router::H { .. })) { &out.h } else { &data64.x };
                let m = p.len() / t;
                (want.router_weight.as_ref().unwrap(), abs_sums(p, dz.as_ref().unwrap(), t, m, e, None))
            }
            Buf::DRouterBias => {
                (want.router_bias.as_ref().unwrap(), abs_sums(&ones, dz.as_ref().unwrap(), t, 1, e, None))
            }
            Buf::DCores => (want.cores.as_ref().unwrap(), abs_sums(&out.h, &g, t, r, r, Some((&w, e)))),
            other => panic!("{what}: an unexpected gradient {}", other.name()),
        };
        assert_eq!(got.len(), want_v.len(), "{what}: {} length", buf.name());
        for (i, ((g, w), s)) in got.iter().zip(want_v).zip(&sums).enumerate() {
            let bound = tol * (s + w.abs());
            assert!((g - w).abs() <= bound, "{what}: {}[{i}] = {g}, want {w} (bound {bound:.3e})", buf.name());
        }
        assert!(want_v.iter().all(|&v| v == 0.0) || got.iter().any(|&v| v != 0.0), "{what}: {} all zero", buf.name());
    }
    // Exactly the reference's gradients (a frozen parameter's is neither computed nor written).
    let has = |o: &Option<Vec<f64>>| o.is_some();
    for (buf, present) in [
        (Buf::DGateInput, has(&want.logits) || has(&want.weights)),
        (Buf::DA, has(&want.a)),
        (Buf::DB, has(&want.b)),
        (Buf::DRouterWeight, has(&want.router_weight)),
        (Buf::DRouterBias, has(&want.router_bias)),
        (Buf::DCores, has(&want.cores)),
    ] {
        if present {
            expected_outputs.push(buf);
        }
    }
    let mut got_outputs: Vec<Buf> = run.grads.iter().map(|(b, _)| *b).collect();
    got_outputs.sort_by_key(|b| b.name());
    expected_outputs.sort_by_key(|b| b.name());
    assert_eq!(got_outputs, expected_outputs, "{what}: the gradients written");
}

fn grouped_runs(spec: &LayerSpec) -> bool {
    spec.mix == Mix::ExpertScale && !matches!(spec.router(), Some(Router::H { .. } | Router::LowRank))
}

fn with_training(mut spec: LayerSpec, seed: usize) -> LayerSpec {
    let rule = spec.rule();
    if let Some(rule) = rule {
        let probs = !matches!(rule, mole::model::RoutingRule::MagnitudeTopK { .. });
        spec.training.aux_losses = AuxLosses {
            load_balancing: if probs { 0.3 } else { 0.0 },
            balance: [Balance::Switch, Balance::DynMole, Balance::LlavaMole][seed % 3],
            z_loss: if rule.has_z_loss() { 0.02 } else { 0.0 },
            entropy: if rule.entropy().is_some() { 0.2 } else { 0.0 },
        };
    }
    if seed % 2 == 1 && spec.router().is_some_and(|r| matches!(r, Router::X { .. } | Router::H { .. })) {
        spec.training.frozen.push(LayerParam::Router);
    }
    if seed % 3 == 2 {
        spec.training.frozen.push(LayerParam::B);
    }
    spec.validate().unwrap();
    spec
}

#[test]
fn every_method_through_both_strategies_matches_the_reference_backward() {
    for (i, &(method, experts, rank, k)) in STANDARD_METHODS.iter().enumerate() {
        let shape = MethodShape { d_in: 24, d_out: 20, experts, rank: rank.min(4), k, alpha: 8.0 };
        let plain = method.spec(shape).unwrap();
        for (j, spec) in [plain.clone(), with_training(plain, i)].into_iter().enumerate() {
            let strategies: Vec<Strategy> =
                Strategy::LAYER.into_iter().filter(|&s| grouped_runs(&spec) || s != Strategy::Grouped).collect();
            for strategy in strategies {
                let dtype = if (i + j) % 2 == 0 { DType::F32 } else { DType::BF16 };
                let build = default_build(strategy, dtype);
                let choice = Some(Choice { strategy, build, source: ChoiceSource::Heuristic });
                let what = format!("{method}, {strategy}, {dtype}, training {j}");
                let seed = 3 + i as u64;
                match dtype {
                    DType::BF16 => {
                        let (r, data, dy) = run::<bf16>(&spec, 37, choice, seed, Schedule::Seeded(seed));
                        check(&spec, &r, &data, &dy, &what);
                    }
                    _ => {
                        let (r, data, dy) = run::<f32>(&spec, 37, choice, seed, Schedule::Seeded(seed));
                        check(&spec, &r, &data, &dy, &what);
                    }
                }
            }
        }
    }
}

/// Gatings and layouts the presets above leave out: adapter ids, per-expert scales, an h router
/// with bias on CoMoL, and enough tokens for the weight gradients to sum several token splits.
#[test]
fn adapter_ids_scales_h_router_bias_and_many_token_splits() {
    use mole::model::{Gating, Method};
    let shape = MethodShape { d_in: 24, d_out: 20, experts: 6, rank: 3, k: 2, alpha: 8.0 };
    let serving = Method::AdapterServing.spec(shape).unwrap();
    let mut scaled = Method::MixLoraPerLinear.spec(shape).unwrap();
    scaled.expert_scales = Some(vec![0.5, -1.0, 0.0, 2.0, 1.25, 0.75]);
    let mut comol = Method::Comol.spec(shape).unwrap();
    if let Gating::Routed { rule, .. } = comol.gating {
        comol.gating = Gating::Routed { router: Router::H { bias: true }, rule };
    }
    comol.expert_scales = Some(vec![-1.5]);
    let many = with_training(Method::MixLoraPerLinear.spec(shape).unwrap(), 0);
    for (name, spec, tokens) in [
        ("adapter serving", serving, 37),
        ("scaled", scaled, 37),
        ("comol, h bias", comol, 37),
        ("700 tokens", many, 700),
    ] {
        spec.validate().unwrap();
        let strategies: Vec<Strategy> =
            Strategy::LAYER.into_iter().filter(|&s| grouped_runs(&spec) || s != Strategy::Grouped).collect();
        for strategy in strategies {
            let choice =
                Some(Choice { strategy, build: default_build(strategy, DType::F32), source: ChoiceSource::Heuristic });
            let (r, data, dy) = run::<f32>(&spec, tokens, choice, 5, Schedule::Seeded(5));
            check(&spec, &r, &data, &dy, &format!("{name}, {strategy}"));
        }
    }
    // 700 tokens take several token splits in every weight gradient.
    let planner =
        LayerPlanner::new(&with_training(Method::MixLoraPerLinear.spec(shape).unwrap(), 0), DType::F32, 132, None);
    let plan = planner.unwrap().plan_backward(700).unwrap();
    assert!(
        plan.wgrads.iter().all(|j| j.plan.splits() > 1),
        "{:?}",
        plan.wgrads.iter().map(|j| j.plan.splits()).collect::<Vec<_>>()
    );
}

/// One writer per element and fixed-order sums: the gradients are bit-identical under another
/// thread schedule.
#[test]
fn the_backward_is_bit_identical_across_schedules() {
    for &(method, experts, rank, k) in &STANDARD_METHODS[..4] {
        let spec =
            with_training(method.spec(MethodShape { d_in: 40, d_out: 33, experts, rank, k, alpha: 8.0 }).unwrap(), 0);
        let (a, ..) = run::<bf16>(&spec, 150, None, 9, Schedule::Forward);
        let (b, ..) = run::<bf16>(&spec, 150, None, 9, Schedule::Seeded(77));
        for ((buf, x), (_, y)) in a.grads.iter().zip(&b.grads) {
            assert!(x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()), "{method}: {} differs", buf.name());
        }
    }
}

/// A gradient the backward would not write, or a missing `dy`, is refused before any launch.
#[test]
fn a_gradient_of_a_frozen_parameter_or_a_missing_input_is_refused() {
    let (method, experts, rank, k) = STANDARD_METHODS[0];
    let mut spec = method.spec(MethodShape { d_in: 16, d_out: 16, experts, rank, k, alpha: 8.0 }).unwrap();
    spec.training.frozen = vec![LayerParam::A];
    let planner = LayerPlanner::new(&spec, DType::F32, 132, None).unwrap();
    let plan = planner.plan_backward(5).unwrap();
    assert!(plan.outputs().iter().all(|(b, _)| *b != Buf::DA));
    let data = SyntheticLayer::<f32>::new(&spec, 5, 1);
    let dy: Vec<f32> = Rng::new(2).fill(5 * 16, 1.0);
    let tensors = Tensors::new(&planner, &data, &dy);
    let y = buffer("y", &data.y);
    let workspace = Buffer::<u8>::poisoned("workspace", plan.workspace_bytes);
    let saved = Buffer::<u8>::poisoned("saved", planner.plan_training(5).unwrap().saved_bytes);
    let outputs: Vec<(Buf, Buffer<f32>)> =
        plan.outputs().into_iter().map(|(b, n)| (b, Buffer::<f32>::poisoned(b.name(), n))).collect();
    let bind = || {
        let mut b = tensors.bind(&y);
        for (buf, g) in &outputs {
            b.sized(*buf, g.device_ptr(), g.len());
        }
        plan.bind(&mut b, workspace.device_ptr(), saved.device_ptr()).unwrap();
        b
    };
    let launch = |b: &Bindings| {
        let mut host = HostBackend::new(Schedule::Forward);
        // SAFETY: every bound address is a live host-execution buffer of the bound length.
        let r = unsafe { planner.launch_backward(&plan, b, &mut host) };
        (r, host.launches)
    };
    let da = Buffer::<f32>::poisoned("d_a", 16 * spec.total_rank());
    let mut with_da = bind();
    with_da.sized(Buf::DA, da.device_ptr(), da.len());
    let (r, launches) = launch(&with_da);
    assert!(matches!(r, Err(MoleError::InvalidParameter { name: "d_a", .. })), "{r:?}");
    assert_eq!(launches, 0);
    let mut no_dy = bind();
    no_dy.raw(Buf::Dy, 0);
    let (r, launches) = launch(&no_dy);
    assert!(matches!(r, Err(MoleError::MissingInput { name: "dy", .. })), "{r:?}");
    assert_eq!(launches, 0);
    assert!(launch(&bind()).0.is_ok());
}
