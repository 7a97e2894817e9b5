//! The backward kernels of stages 1 to 4 (`kernels/backward.cu`) through the host execution
//! layer against the f64 reference [`mole::reference::backward`]: every preset, given weights
//! (all, top-k, softmaxed top-k), the logits, h and low-rank routers under several rules, odd
//! shapes, ragged ranks with rank-0 experts, per-expert scales, every auxiliary loss in each
//! form, frozen parameters, every dtype and random thread schedules, with every output and
//! workspace poisoned (NaN) before the run. The routing is the reference forward's (`ids`, and
//! its weights rounded to f32), as the runtime hands the forward's selection to the backward.
//!
//! What is compared: `dx`, `d_gate_input` (the logits' or the given weights' gradient), and the
//! workspace `dh` and `dz` read back as f32. The expected `dz` is the reference's own: the
//! gradient of the logits of the same layer routed by the logits router on the forward's scores
//! (the same selection, rule and losses); the expected `dh` follows from it and the mix in f64
//! ([`expected_dh`]).
//!
//! Tolerance: `K · tolerance(dtype, n)` (`n = d_in + d_out + R + E + slots`, the longest chain
//! of f32 sums on one path; `K` = 8 for the stages chained) times each element's magnitude: the
//! absolute sums of its terms, with `dz`'s scale `S_t` per token the largest `|dw|` magnitude
//! through the rule (over the selected probability mass for renormalised weights, over the
//! temperature), plus the auxiliary losses' magnitudes, widened by the scores' own f32 error.

use half::{bf16, f16};
use mole::kernels::backward::{self, BackwardConfig};
use mole::kernels::exec::{Bindings, Buf};
use mole::model::{
    AuxLosses, Balance, Gating, LayerParam, LayerSpec, Method, MethodShape, Mix, RankLayout, Router, RoutingRule,
    TopKWeights,
};
use mole::reference::{backward as ref_backward, forward as ref_forward};
use mole::synth::{Rng, SyntheticLayer};
use mole::{DType, Scalar};
use mole_hostexec::{Buffer, Schedule};
use proptest::prelude::*;

mod host;
use host::HostBackend;

/// Gatings beyond the presets'.
const EXTRA: usize = 9;

#[derive(Clone, Debug)]
struct Case {
    /// `Method::ALL[i]`, or extra gating `i - 15`.
    variant: usize,
    tokens: usize,
    d_in: usize,
    d_out: usize,
    ragged: bool,
    scales: bool,
    aux: u8,
    frozen: u8,
    dtype: DType,
    seed: u64,
    schedule: Schedule,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        0..Method::ALL.len() + EXTRA,
        0usize..=20,
        1usize..=40,
        1usize..=40,
        any::<bool>(),
        any::<bool>(),
        0u8..8,
        0u8..16,
        0usize..3,
        any::<u64>(),
        0u8..3,
    )
        .prop_map(|(variant, tokens, d_in, d_out, ragged, scales, aux, frozen, dt, seed, sch)| Case {
            variant,
            tokens,
            d_in,
            d_out,
            ragged,
            scales,
            aux,
            frozen,
            dtype: DType::ALL[dt],
            seed,
            schedule: match sch {
                0 => Schedule::Forward,
                1 => Schedule::Reverse,
                _ => Schedule::Seeded(seed),
            },
        })
}

/// The spec of a case: a preset or an extra gating at the case's shape, then ragged ranks,
/// per-expert scales, auxiliary losses and frozen parameters where the layer takes them.
fn spec_of(c: &Case) -> LayerSpec {
    let mut rng = Rng::new(c.seed ^ 0xbac4);
    let (d_in, d_out) = (c.d_in, c.d_out);
    let mut spec = if let Some(&method) = Method::ALL.get(c.variant) {
        let (experts, rank, k) = match method {
            Method::FlyLora | Method::FlyLoraPeft => (12, 1, 3),
            Method::Smora => (10, 1, 3),
            Method::Comol => (4, 5, 2),
            _ => (5, 3, 2),
        };
        method.spec(MethodShape { d_in, d_out, experts, rank, k, alpha: 2.0 }).unwrap()
    } else {
        let base = Method::MixLoraPerLinear.spec(MethodShape { d_in, d_out, experts: 5, rank: 2, k: 2, alpha: 3.0 });
        let renorm = |k, temperature| RoutingRule::SoftmaxTopK { k, temperature, weights: TopKWeights::Renormalized };
        let logits = |rule| Gating::Routed { router: Router::Logits, rule };
        let h = |bias, rule| Gating::Routed { router: Router::H { bias }, rule };
        let dynmole =
            RoutingRule::DynMole { q: 1.3, top_p: 0.5, keep_top_k: 1, entropy_threshold: 1.0, entropy_eps: 1e-5 };
        let (gating, ranks) = match c.variant - Method::ALL.len() {
            0 => (Gating::Given { top_k: None, softmax_topk: false }, None),
            1 => (Gating::Given { top_k: Some(2), softmax_topk: false }, None),
            2 => (Gating::Given { top_k: Some(3), softmax_topk: true }, None),
            3 => (logits(renorm(2, 0.7)), None),
            4 => (logits(RoutingRule::TopP { p: 0.6, temperature: 1.3 }), None),
            5 => (logits(RoutingRule::SigmoidTopK { k: 3, bias: false }), None),
            6 => (h(true, renorm(2, 1.0)), None),
            7 => (Gating::Routed { router: Router::LowRank, rule: renorm(2, 1.0) }, Some(RankLayout::uniform(5, 1))),
            _ => (Gating::Routed { router: Router::X { bias: true }, rule: dynmole }, None),
        };
        let mut spec = LayerSpec { gating, ..base.unwrap() };
        if let Some(r) = ranks {
            spec.ranks = r.unwrap();
        }
        spec
    };
    let rank_wise = matches!(spec.router(), Some(Router::LowRank));
    if c.ragged && !rank_wise && matches!(spec.mix, Mix::ExpertScale) {
        // 0..=4 per expert, expert 1 of rank 0, at least one column.
        let mut offsets = vec![0];
        for e in 0..spec.ranks.num_experts() {
            offsets.push(offsets[e] + if e == 1 { 0 } else { rng.below(5) });
        }
        if *offsets.last().unwrap() == 0 {
            *offsets.last_mut().unwrap() = 2;
        }
        spec.ranks = RankLayout::from_offsets(offsets).unwrap();
    }
    spec.expert_scales =
        c.scales.then(|| (0..spec.ranks.num_experts()).map(|_| [0.0, -1.5, 0.75, 2.0, 1.25][rng.below(5)]).collect());
    if let Some(rule) = spec.rule() {
        let probs = !matches!(rule, RoutingRule::MagnitudeTopK { .. });
        let balance = [Balance::Switch, Balance::DynMole, Balance::LlavaMole][rng.below(3)];
        let want = |bit: u8| c.aux & bit != 0;
        spec.training.aux_losses = AuxLosses {
            load_balancing: if want(1) && probs { 0.7 } else { 0.0 },
            balance,
            z_loss: if want(2) && rule.has_z_loss() { 0.05 } else { 0.0 },
            entropy: if want(4) && rule.entropy().is_some() { 0.4 } else { 0.0 },
        };
    }
    let candidates = [LayerParam::A, LayerParam::B, LayerParam::Router, LayerParam::Cores];
    spec.training.frozen = candidates
        .into_iter()
        .enumerate()
        .filter(|&(i, p)| {
            c.frozen & (1 << i) != 0
                && match p {
                    LayerParam::Router => matches!(spec.router(), Some(Router::X { .. } | Router::H { .. })),
                    LayerParam::Cores => matches!(spec.mix, Mix::CoreMerge { .. }),
                    _ => true,
                }
        })
        .map(|(_, p)| p)
        .collect();
    spec.validate().unwrap_or_else(|e| panic!("{e}: {spec:?}"));
    spec
}

/// `v` in f64.
fn wide<T: Scalar>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// The typed inputs in f64 (exact).
fn widened<T: Scalar>(d: &SyntheticLayer<T>) -> SyntheticLayer<f64> {
    let opt = |v: &Option<Vec<T>>| v.as_deref().map(wide);
    SyntheticLayer {
        tokens: d.tokens,
        x: wide(&d.x),
        a: wide(&d.a),
        b: wide(&d.b),
        y: wide(&d.y),
        router_weight: opt(&d.router_weight),
        router_bias: opt(&d.router_bias),
        logits: opt(&d.logits),
        weights: opt(&d.weights),
        adapter_ids: d.adapter_ids.clone(),
        selection_bias: opt(&d.selection_bias),
        cores: opt(&d.cores),
    }
}

fn buffer<T: bytemuck::Pod>(name: &str, v: &[T]) -> Buffer<T> {
    if v.is_empty() {
        Buffer::poisoned(name, 1)
    } else {
        Buffer::from_slice(name, v)
    }
}

/// What the kernels produced, in f64: `dx`, `d_gate_input`, `dh`, `dz` and the rest of the
/// workspace (for the determinism check).
type Outputs = Vec<Vec<f64>>;

mod backward_ref;
use backward_ref::{expected, Expected};

fn run_case(c: &Case) -> Result<Outputs, TestCaseError> {
    match c.dtype {
        DType::F32 => run_typed::<f32>(c),
        DType::F16 => run_typed::<f16>(c),
        DType::BF16 => run_typed::<bf16>(c),
    }
}

fn run_typed<T: Scalar + bytemuck::Pod>(c: &Case) -> Result<Outputs, TestCaseError> {
    let spec = spec_of(c);
    let fail = |e: String| TestCaseError::fail(format!("{e}\n{c:?}\n{spec:?}"));
    let t_n = c.tokens;
    let data = SyntheticLayer::<T>::new(&spec, t_n, c.seed);
    let dy_t: Vec<T> = Rng::new(c.seed ^ 0xd1).fill(t_n * spec.d_out, 1.0);
    let data64 = widened(&data);
    let dy = wide(&dy_t);
    let out = ref_forward(&spec, &data64.inputs()).map_err(|e| fail(e.to_string()))?;
    let grads = ref_backward(&spec, &data64.inputs(), &dy).map_err(|e| fail(e.to_string()))?;
    let want: Expected = expected(&spec, c.dtype, &data64, &dy, &out, &grads).map_err(fail)?;

    let build = backward::build(c.dtype, BackwardConfig::DEFAULT);
    let p = backward::plan(&build, &spec, t_n).map_err(|e| fail(e.to_string()))?;
    let offsets: Vec<u32> = spec.ranks.offsets().iter().map(|&o| o as u32).collect();
    let scales: Vec<f32> = spec.expert_scales.iter().flatten().map(|&s| s as f32).collect();
    let weights32: Vec<f32> = out.routing.weights.iter().map(|&w| w as f32).collect();
    let gate_input = data.logits.as_ref().or(data.weights.as_ref()).cloned().unwrap_or_default();
    let data_bufs: Vec<(Buf, Buffer<T>)> = [
        (Buf::X, Some(&data.x)),
        (Buf::A, Some(&data.a)),
        (Buf::B, Some(&data.b)),
        (Buf::Dy, Some(&dy_t)),
        (Buf::Cores, data.cores.as_ref()),
        (Buf::RouterWeight, data.router_weight.as_ref()),
        (Buf::RouterBias, data.router_bias.as_ref()),
        (Buf::GateInput, Some(&gate_input)),
    ]
    .into_iter()
    .filter_map(|(b, v)| v.map(|v| (b, buffer(b.name(), v))))
    .collect();
    let offsets_buf = buffer("rank_offsets", &offsets);
    let scales_buf = buffer("expert_scales", &scales);
    let ids_buf = buffer("ids", &out.routing.ids);
    let weights_buf = buffer("route_weights", &weights32);
    const WORKSPACE: [Buf; 10] = [
        Buf::BwH,
        Buf::BwG,
        Buf::BwDh,
        Buf::BwHm,
        Buf::BwDw,
        Buf::BwW,
        Buf::BwZ,
        Buf::BwDz,
        Buf::BwStatsPartials,
        Buf::BwStats,
    ];
    let outs_t = [Buf::DX, Buf::DGateInput].map(|b| Buffer::<T>::poisoned(b.name(), p.lens.get(b).max(1)));
    let work = WORKSPACE.map(|b| Buffer::<f32>::poisoned(b.name(), p.lens.get(b).max(1)));

    let mut binds = Bindings::new();
    for (b, buf) in &data_bufs {
        binds.sized(*b, buf.device_ptr(), p.lens.get(*b));
    }
    binds.sized(Buf::RankOffsets, offsets_buf.device_ptr(), offsets.len());
    binds.sized(Buf::ExpertScales, scales_buf.device_ptr(), scales.len());
    binds.sized(Buf::Ids, ids_buf.device_ptr(), out.routing.ids.len());
    binds.sized(Buf::RouteWeights, weights_buf.device_ptr(), weights32.len());
    for (b, buf) in [Buf::DX, Buf::DGateInput].into_iter().zip(&outs_t) {
        binds.sized(b, buf.device_ptr(), p.lens.get(b));
    }
    for (b, buf) in WORKSPACE.into_iter().zip(&work) {
        binds.sized(b, buf.device_ptr(), buf.len());
    }
    let mut host = HostBackend::new(c.schedule);
    // SAFETY: every bound address is a live host-execution buffer of the bound length; the
    // routing is the reference forward's.
    unsafe { backward::run(&build, &p, &binds, &mut host) }.map_err(|e| fail(e.to_string()))?;

    let read_t = |i: usize, b: Buf| wide(&outs_t[i].read()[..p.lens.get(b)]);
    let read_w =
        |i: usize| -> Vec<f64> { work[i].read()[..p.lens.get(WORKSPACE[i])].iter().map(|&v| v as f64).collect() };
    let dx = read_t(0, Buf::DX);
    let dgate = read_t(1, Buf::DGateInput);
    let (dh, dz) = (read_w(2), read_w(7));
    let check = |what: &str, got: &[f64], want: &[f64], bound: &[f64]| -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), want.len(), "{} length", what);
        for (i, ((g, w), b)) in got.iter().zip(want).zip(bound).enumerate() {
            let err = (g - w).abs();
            prop_assert!(
                err <= *b,
                "{}[{}] = {}, want {} (|err| {:.3e} > {:.3e})\n{:?}\n{:?}",
                what,
                i,
                g,
                w,
                err,
                b,
                c,
                spec
            );
        }
        Ok(())
    };
    check("dx", &dx, &grads.x, &want.dx_bound)?;
    check("dh", &dh, &want.dh, &want.dh_bound)?;
    if let Some(dz_want) = &want.dz {
        check("dz", &dz, dz_want, &want.dz_bound)?;
    }
    if let Some(g) = grads.logits.as_ref().or(grads.weights.as_ref()) {
        check("d_gate_input", &dgate, g, &want.gate_bound)?;
    }
    let mut all = vec![dx, dgate];
    all.extend((0..WORKSPACE.len()).map(read_w));
    Ok(all)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn backward_stages_match_the_reference(c in case_strategy()) {
        run_case(&c)?;
    }

    /// One writer per element, every sum in a fixed order: bit-identical under any thread
    /// schedule (and any rayon pool size of the host side).
    #[test]
    fn backward_stages_are_deterministic_across_schedules(c in case_strategy()) {
        let pool = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let first = pool(1).install(|| run_case(&Case { schedule: Schedule::Forward, ..c.clone() }))?;
        let seeded = Case { schedule: Schedule::Seeded(c.seed.wrapping_add(7)), ..c.clone() };
        let again = pool(3).install(|| run_case(&seeded))?;
        for (i, (a, b)) in first.iter().zip(&again).enumerate() {
            prop_assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "output {} differs\n{:?}", i, c);
        }
    }
}

/// Every preset and extra gating once, with every loss, ragged ranks and scales, in bf16, with
/// more tokens than a statistics chunk (several chunks summed).
#[test]
fn every_gating_with_every_loss_over_several_chunks() {
    for variant in 0..Method::ALL.len() + EXTRA {
        let c = Case {
            variant,
            tokens: 150,
            d_in: 19,
            d_out: 23,
            ragged: true,
            scales: true,
            aux: 7,
            frozen: 0,
            dtype: DType::BF16,
            seed: 40 + variant as u64,
            schedule: Schedule::Seeded(variant as u64),
        };
        let outs = run_case(&c).unwrap_or_else(|e| panic!("{e}"));
        assert!(outs[0].iter().any(|v| v.abs() > 1e-3), "variant {variant}: dx all but zero");
    }
}
