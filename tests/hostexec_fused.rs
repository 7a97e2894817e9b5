//! The fused layer kernels (`kernels/fused.cu`) through the host execution layer against the f64
//! reference [`mole::reference::forward`]: every method preset, every dtype, the single-launch
//! and split variants, random shapes (odd `d_in` / `d_out`, partial token tiles), per-expert
//! scales (zero and negative among them) on part of the cases, random thread schedules, `y`
//! random and non-zero, every output and workspace poisoned before the launch; and the fused path
//! against the grouped one (route-only fused launch, then the SGMV kernels).
//!
//! Checks, per case:
//! - routing: the kernel's ids equal the reference's on every token but at most one (router
//!   scores are f32 sums in the kernel, so an exact near-tie may flip), weights within 1e-5;
//! - `y`: against the reference mix and expand applied to the reference `h` with the kernel's
//!   routing, per element `|got - want| <= tolerance_with(u, 2^-23, n) · P`, where `P` is the same
//!   computation on absolute values (the sum of absolute terms), `u` the dtype's unit roundoff
//!   (`y` is rounded once), `n = d_in + R + slots + 16` the f32 operations on one path and 2^-23
//!   their unit roundoff when truncated (tensor cores; the default mma emulation);
//! - router statistics (summed per tile by the kernel, in tile order by `gating_stats_finalize`)
//!   against the reference statistics.

use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::fused::{self, FusedOutputs, FusedPlan, FusedVariant};
use mole::kernels::sgmv::{self, SgmvConfig, SgmvShape, SlotPlans};
use mole::model::{LayerSpec, Method, MethodShape, Mix};
use mole::reference::linalg::{expand, shrink};
use mole::reference::mix::{core_merge, expert_scale, scale_experts};
use mole::reference::{self, tolerance_with, Routing};
use mole::runtime::LayerConstants;
use mole::synth::{Rng, SyntheticLayer};
use mole::{DType, KernelElement, Scalar};
use mole_hostexec::{Buffer, Schedule};

mod host;
use host::HostBackend;
use proptest::prelude::*;

/// What a fused launch returned.
struct FusedResult {
    y: Vec<f64>,
    ids: Vec<i32>,
    weights: Vec<f32>,
    stats: Vec<f32>,
}

/// A buffer bound as `buf`, with its length.
fn bind<T: bytemuck::Pod>(binds: &mut Bindings, buf: Buf, b: &Option<Buffer<T>>) {
    if let Some(b) = b {
        binds.sized(buf, b.device_ptr(), b.len());
    }
}

/// Runs `plan` of `spec` on `data` through the library's launch path ([`fused::run`]) on the host
/// execution layer. Every tensor `data` has is bound, whether the plan takes it or not (the path
/// passes null for the others); the outputs and workspaces the plan takes are poisoned.
fn run_fused<T: KernelElement + bytemuck::Pod>(
    spec: &LayerSpec,
    data: &SyntheticLayer<T>,
    plan: &FusedPlan,
    schedule: Schedule,
) -> FusedResult {
    let build = fused::build(T::DTYPE, plan.config);
    let constants = LayerConstants::of(spec);
    let given = |name: &str, v: Option<&[T]>| v.map(|v| Buffer::from_slice(name, v));
    let (x, a, b) = (given("x", Some(&data.x)), given("a", Some(&data.a)), given("b", Some(&data.b)));
    let y = given("y", Some(&data.y));
    let rw = given("router_weight", data.router_weight.as_deref());
    let rb = given("router_bias", data.router_bias.as_deref());
    let gi = given("gate_in", data.logits.as_deref().or(data.weights.as_deref()));
    let ai = data.adapter_ids.as_deref().map(|v| Buffer::from_slice("adapter_ids", v));
    let sb = given("selection_bias", data.selection_bias.as_deref());
    let ro = Some(Buffer::from_slice("rank_offsets", &constants.rank_offsets));
    let es = constants.expert_scales.as_deref().map(|s| Buffer::from_slice("expert_scales", s));
    let co = given("cores", data.cores.as_deref());
    let len = |buf| plan.lens.get(buf);
    fn poisoned<U: bytemuck::Pod>(name: &str, n: usize) -> Option<Buffer<U>> {
        (n > 0).then(|| Buffer::poisoned(name, n))
    }
    let ids = poisoned::<i32>("ids", len(Buf::Ids));
    let w = poisoned::<f32>("weights", len(Buf::RouteWeights));
    let probs = poisoned::<f32>("probs", len(Buf::Probs));
    let ws = poisoned::<u32>("stats_ws", len(Buf::StatsWorkspace));
    let stats = poisoned::<f32>("stats_out", len(Buf::StatsOut));
    let hz = poisoned::<f32>("hz_part", len(Buf::Partials));
    let mut binds = Bindings::new();
    for (buf, t) in [
        (Buf::X, &x),
        (Buf::A, &a),
        (Buf::B, &b),
        (Buf::Y, &y),
        (Buf::RouterWeight, &rw),
        (Buf::RouterBias, &rb),
        (Buf::GateInput, &gi),
        (Buf::SelectionBias, &sb),
        (Buf::Cores, &co),
    ] {
        bind(&mut binds, buf, t);
    }
    bind(&mut binds, Buf::AdapterIds, &ai);
    bind(&mut binds, Buf::RankOffsets, &ro);
    bind(&mut binds, Buf::ExpertScales, &es);
    bind(&mut binds, Buf::Ids, &ids);
    for (buf, f) in [(Buf::RouteWeights, &w), (Buf::Probs, &probs), (Buf::StatsOut, &stats), (Buf::Partials, &hz)] {
        bind(&mut binds, buf, f);
    }
    bind(&mut binds, Buf::StatsWorkspace, &ws);
    let mut backend = HostBackend::new(schedule);
    // SAFETY: every bound address is a live host-execution buffer of its bound length.
    unsafe { fused::run(&build, plan, &binds, &mut backend) }.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(backend.launches, plan.launches.len() + plan.stats.is_some() as usize);
    let touched = plan.lens.get(Buf::Y) > 0;
    FusedResult {
        y: y.filter(|_| touched).map_or_else(Vec::new, |y| y.read().iter().map(|v| v.to_f64()).collect()),
        ids: ids.map_or_else(Vec::new, |b| b.read()),
        weights: w.map_or_else(Vec::new, |b| b.read()),
        stats: stats.map_or_else(Vec::new, |b| b.read()),
    }
}

/// `y0 + scale · (mix(h; routing) ⊙ s) · B` and the same on absolute values (the error scale).
fn expected<T: Scalar>(spec: &LayerSpec, data: &SyntheticLayer<T>, routing: &Routing) -> (Vec<f64>, Vec<f64>) {
    let f = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
    let abs = |v: Vec<f64>| v.into_iter().map(f64::abs).collect::<Vec<f64>>();
    let (t, r) = (data.tokens, spec.total_rank());
    let (x, a, b, y0) = (f(&data.x), f(&data.a), f(&data.b), f(&data.y));
    let mix = |h: &[f64], routing: &Routing, cores: &[f64], abs_scales: bool| {
        let mut mixed = match spec.mix {
            Mix::ExpertScale => expert_scale(h, routing, &spec.ranks),
            Mix::CoreMerge { .. } => core_merge(h, routing, cores, r),
        };
        if let Some(s) = &spec.expert_scales {
            let s: Vec<f64> = s.iter().map(|v| if abs_scales { v.abs() } else { *v }).collect();
            scale_experts(&mut mixed, &spec.ranks, &s);
        }
        mixed
    };
    let cores = data.cores.as_deref().map(f).unwrap_or_default();
    let h = shrink(&x, &a, t, spec.d_in, r);
    let want = expand(&mix(&h, routing, &cores, false), &b, &y0, spec.scale, t, r, spec.d_out);
    let abs_routing = Routing { weights: routing.weights.iter().map(|w| w.abs()).collect(), ..routing.clone() };
    let h_abs = shrink(&abs(x), &abs(a), t, spec.d_in, r);
    let mixed_abs = mix(&h_abs, &abs_routing, &abs(cores), true);
    let p = expand(&mixed_abs, &abs(b), &abs(y0), spec.scale.abs(), t, r, spec.d_out);
    (want, p)
}

/// How a case launches: the plan's choice (tensor cores where it can), or the FMA kernels.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernels {
    Auto,
    Fma,
}

fn check_case<T: KernelElement + bytemuck::Pod>(
    spec: &LayerSpec,
    tokens: usize,
    seed: u64,
    variant: FusedVariant,
    kernels: Kernels,
    schedule: Schedule,
) -> Result<(), String> {
    let data = SyntheticLayer::<T>::new(spec, tokens, seed);
    let reference = reference::forward(spec, &data.inputs()).map_err(|e| e.to_string())?;
    let build = fused::build(T::DTYPE, fused::FusedConfig::DEFAULT);
    let outputs = FusedOutputs { routing: true, probs: true, stats: true };
    let mut plan = fused::plan(&build, spec, tokens, variant, outputs).map_err(|e| e.to_string())?;
    if kernels == Kernels::Fma {
        plan = plan.without_tensor_cores();
    }
    let got = run_fused(spec, &data, &plan, schedule);
    let want_routing = &reference.routing;
    let slots = want_routing.slots;
    // Routing.
    let mut flipped = 0;
    for t in 0..tokens {
        let row = t * slots..(t + 1) * slots;
        if got.ids[row.clone()] != want_routing.ids[row.clone()] {
            flipped += 1;
            continue;
        }
        for i in row {
            let (g, w) = (got.weights[i] as f64, want_routing.weights[i]);
            if (g - w).abs() > 1e-5 * (1.0 + w.abs()) {
                return Err(format!("token {t}: weight {g} != {w}"));
            }
        }
    }
    if flipped > 1 {
        return Err(format!("{flipped} of {tokens} tokens routed differently from the reference"));
    }
    // y, against the kernel's own routing.
    let kernel_routing = Routing {
        ids: got.ids.clone(),
        weights: got.weights.iter().map(|&w| w as f64).collect(),
        ..want_routing.clone()
    };
    let (want, scale) = expected(spec, &data, &kernel_routing);
    let n = spec.d_in + spec.total_rank() + slots + 16;
    // 2^-23 per f32 operation: the tensor cores truncate (the emulation does by default).
    let tol = tolerance_with(T::DTYPE.unit_roundoff(), f64::powi(2.0, -23), n);
    for (i, ((g, w), p)) in got.y.iter().zip(&want).zip(&scale).enumerate() {
        if (g - w).abs() > tol * p || g.is_nan() {
            return Err(format!("y[{i}] = {g}, expected {w} (bound {})", tol * p));
        }
    }
    // Statistics (exact selections when the routing agrees everywhere), decoded as the library
    // decodes them.
    let stats = &reference.stats;
    let got_stats = plan.stats.as_ref().ok_or("no statistics plan")?.decode(&got.stats).map_err(|e| e.to_string())?;
    let slack = flipped as f64 / tokens as f64;
    if flipped == 0 {
        let counts = [
            ("selected_fraction", &got_stats.selected_fraction, &stats.selected_fraction),
            ("top1_fraction", &got_stats.top1_fraction, &stats.top1_fraction),
        ];
        for (name, g, w) in counts {
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                if (g - w).abs() > 1e-6 {
                    return Err(format!("{name}[{i}] = {g}, expected {w}"));
                }
            }
        }
    }
    let close = |name: &str, g: f64, w: f64, rel: f64| {
        if (g - w).abs() > rel * (1.0 + w.abs()) {
            return Err(format!("{name} = {g}, expected {w}"));
        }
        Ok(())
    };
    let per_expert = [
        ("mean_prob", &got_stats.mean_prob, &stats.mean_prob),
        ("masked_mean_prob", &got_stats.masked_mean_prob, &stats.masked_mean_prob),
    ];
    for (name, g, w) in per_expert {
        if g.is_some() != w.is_some() {
            return Err(format!("{name}: {g:?}, expected {w:?}"));
        }
        if let (Some(g), Some(w)) = (g, w) {
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                close(&format!("{name}[{i}]"), g, w, 1e-4 + slack)?;
            }
        }
    }
    if let Some(z) = stats.z_loss {
        close("z_loss", got_stats.z_loss.ok_or("no z_loss")?, z, 1e-3)?;
    }
    if let Some(h) = stats.entropy {
        close("entropy", got_stats.entropy.ok_or("no entropy")?, h, 1e-4 + slack)?;
    }
    Ok(())
}

/// A small shape for `method`: rank-1 experts for the rank-wise methods.
fn method_spec(method: Method, d_in: usize, d_out: usize) -> LayerSpec {
    let (experts, rank, k) = match method {
        Method::FlyLora | Method::FlyLoraPeft => (24, 1, 4),
        Method::Smora => (16, 1, 4),
        Method::Comol => (4, 8, 2),
        Method::DynMole => (6, 4, 2),
        _ => (8, 4, 2),
    };
    let shape = MethodShape { d_in, d_out, experts, rank, k, alpha: 2.0 * rank as f64 };
    method.spec(shape).unwrap()
}

/// `spec` with random per-expert scales, one per bank expert, exact in f32: zero, negative,
/// fractional and large ones.
fn with_scales(spec: LayerSpec, seed: u64) -> LayerSpec {
    let mut rng = Rng::new(seed ^ 0x5ca1e);
    let scales = (0..spec.ranks.num_experts()).map(|_| [0.0, -1.5, 0.75, 2.0, -0.25, 3.5][rng.below(6)]).collect();
    LayerSpec { expert_scales: Some(scales), ..spec }
}

fn check_dtype(
    dtype: DType,
    spec: &LayerSpec,
    t: usize,
    seed: u64,
    v: FusedVariant,
    k: Kernels,
    s: Schedule,
) -> Result<(), String> {
    match dtype {
        DType::F32 => check_case::<f32>(spec, t, seed, v, k, s),
        DType::F16 => check_case::<half::f16>(spec, t, seed, v, k, s),
        DType::BF16 => check_case::<half::bf16>(spec, t, seed, v, k, s),
    }
}

#[test]
fn every_method_matches_the_reference_in_every_variant() {
    let split = FusedVariant::Split { splits: 3, n_per_block: 32 };
    let single = FusedVariant::Single;
    // (d_in, d_out, variant, kernels): widths that are multiples of 8 take the tensor-core
    // kernel in 16-bit builds (d_out = 200 spans two of its 128-column blocks), odd ones the FMA
    // kernel.
    let runs = [
        (96, 40, single, Kernels::Auto),
        (64, 200, single, Kernels::Auto),
        (96, 40, single, Kernels::Fma),
        (77, 45, single, Kernels::Auto),
        (77, 45, split, Kernels::Auto),
    ];
    // Forward and Reverse let one warp run ahead of the others as far as the barriers allow (a
    // copy issued into a buffer the others still read shows at once); seeded orders mix them.
    let mut case = 0;
    for (i, method) in Method::ALL.into_iter().enumerate() {
        for (j, dtype) in DType::ALL.into_iter().enumerate() {
            for (d_in, d_out, variant, kernels) in runs {
                let seed = (i * 7 + j) as u64;
                // Per-expert scales on every other case: each method and run sees both.
                let spec = method_spec(method, d_in, d_out);
                let spec = if case % 2 == 1 { with_scales(spec, seed) } else { spec };
                let schedule = [Schedule::Forward, Schedule::Reverse, Schedule::Seeded(seed)][case % 3];
                case += 1;
                check_dtype(dtype, &spec, 21, seed, variant, kernels, schedule).unwrap_or_else(|e| {
                    panic!("{method} {dtype} {d_in}x{d_out} {variant:?} {kernels:?} {schedule:?}: {e}")
                });
            }
        }
    }
}

#[test]
fn the_plan_takes_tensor_cores_where_it_can() {
    let spec = method_spec(Method::MixLoraPerLinear, 96, 40);
    for (dtype, want) in [(DType::F32, false), (DType::F16, true), (DType::BF16, true)] {
        let build = fused::build(dtype, fused::FusedConfig::DEFAULT);
        let plan = fused::plan(&build, &spec, 5, FusedVariant::Single, FusedOutputs::default()).unwrap();
        assert_eq!(plan.uses_tensor_cores(), want, "{dtype}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzzed_shapes_match_the_reference(
        method in prop::sample::select(Method::ALL.to_vec()),
        dtype in prop::sample::select(DType::ALL.to_vec()),
        d_in in prop_oneof![1usize..150, (1usize..20).prop_map(|v| 8 * v)],
        d_out in prop_oneof![1usize..90, (1usize..12).prop_map(|v| 8 * v)],
        fma in any::<bool>(),
        scaled in any::<bool>(),
        tokens in 1usize..40,
        split in prop::option::of((1u32..6, 1u32..4)),
        seed in any::<u64>(),
    ) {
        let spec = method_spec(method, d_in, d_out);
        let spec = if scaled { with_scales(spec, seed) } else { spec };
        let variant = split.map_or(FusedVariant::Single, |(s, n)| FusedVariant::Split { splits: s, n_per_block: 32 * n });
        let kernels = if fma { Kernels::Fma } else { Kernels::Auto };
        let r = check_dtype(dtype, &spec, tokens, seed, variant, kernels, Schedule::Seeded(seed));
        prop_assert!(r.is_ok(), "{} {} {}x{} {:?} {:?} T={}: {}", method, dtype, d_in, d_out, variant, kernels, tokens, r.unwrap_err());
    }
}

/// Route-only fused launch, slot plans on the host, then the SGMV shrink and expand passes.
fn grouped_y(spec: &LayerSpec, data: &SyntheticLayer<half::bf16>, schedule: Schedule) -> Vec<f64> {
    let dtype = DType::BF16;
    let build = fused::build(dtype, fused::FusedConfig::DEFAULT);
    let route = fused::plan_route_only(&build, spec, data.tokens, FusedOutputs::default()).unwrap();
    let routed = run_fused(spec, data, &route, schedule);
    let (t_n, slots, e_n) = (data.tokens, route.params.gate.slots as usize, spec.routed_experts());
    let sgmv_build = sgmv::build(dtype, SgmvConfig::DEFAULT);
    let plans = SlotPlans::build(&routed.ids, t_n, slots, e_n, SgmvConfig::DEFAULT.bm as usize).unwrap();
    let constants = LayerConstants::of(spec);
    let offs = &constants.rank_offsets;
    let (d_in, d_out, scale, expert_scales) =
        (spec.d_in, spec.d_out, spec.scale as f32, constants.expert_scales.is_some());
    let shape = SgmvShape { tokens: t_n, slots, d_in, d_out, scale, expert_scales };
    let p = sgmv::plan(&sgmv_build, shape, offs, plans.entry_stride).unwrap();
    let (x, a, b) =
        (Buffer::from_slice("x", &data.x), Buffer::from_slice("a", &data.a), Buffer::from_slice("b", &data.b));
    let y = Buffer::from_slice("y", &data.y);
    let ro = Buffer::from_slice("rank_offsets", offs);
    let es = constants.expert_scales.as_deref().map(|s| Buffer::from_slice("expert_scales", s));
    let po = Buffer::from_slice("plan_offsets", &plans.offsets);
    let pe = Buffer::from_slice("plan_entries", bytemuck::cast_slice::<_, [u32; 2]>(&plans.entries));
    let w = Buffer::from_slice("weights", &routed.weights);
    let h = Buffer::<f32>::poisoned("h_part", p.lens.get(Buf::Partials).max(1));
    let mut binds = Bindings::new();
    for (buf, addr) in [
        (Buf::X, x.device_ptr()),
        (Buf::A, a.device_ptr()),
        (Buf::B, b.device_ptr()),
        (Buf::RankOffsets, ro.device_ptr()),
        (Buf::PlanOffsets, po.device_ptr()),
        (Buf::PlanEntries, pe.device_ptr()),
        (Buf::RouteWeights, w.device_ptr()),
        (Buf::Partials, h.device_ptr()),
        (Buf::Y, y.device_ptr()),
    ] {
        binds.raw(buf, addr);
    }
    if let Some(es) = &es {
        binds.raw(Buf::ExpertScales, es.device_ptr());
    }
    // SAFETY: every bound address is a live host-execution buffer of the plan's length.
    unsafe { sgmv::run(&sgmv_build, &p, &binds, &mut HostBackend::new(schedule)) }.unwrap();
    y.read().iter().map(|v| v.to_f64()).collect()
}

#[test]
fn fused_and_grouped_paths_agree() {
    for (i, method) in [Method::MixLoraPerLinear, Method::DynMole, Method::XLora, Method::AdapterServing, Method::Smora]
        .into_iter()
        .enumerate()
    {
        // Per-expert scales on every other method.
        let spec = method_spec(method, 96, 64);
        let spec = if i % 2 == 1 { with_scales(spec, i as u64) } else { spec };
        let data = SyntheticLayer::<half::bf16>::new(&spec, 37, 100 + i as u64);
        let build = fused::build(DType::BF16, fused::FusedConfig::DEFAULT);
        let plan = fused::plan(&build, &spec, 37, FusedVariant::Single, FusedOutputs::default()).unwrap();
        let fused_y = run_fused(&spec, &data, &plan, Schedule::Forward).y;
        let grouped = grouped_y(&spec, &data, Schedule::Reverse);
        let reference = reference::forward(&spec, &data.inputs()).unwrap();
        // Both are within the bf16 bound of the reference; the grouped path rounds y once per
        // slot pass, so allow slots + 1 roundings between them.
        let slots = reference.routing.slots as f64;
        let tol = reference::tolerance(DType::BF16, spec.d_in + spec.total_rank()) * (slots + 2.0);
        let mut changed = 0;
        for (j, ((f, g), y0)) in fused_y.iter().zip(&grouped).zip(&data.y).enumerate() {
            assert!((f - g).abs() <= tol * (1.0 + g.abs()), "{method}: y[{j}] fused {f} vs grouped {g}");
            changed += (*f != y0.to_f64()) as usize;
        }
        assert!(changed > fused_y.len() / 4, "{method}: the delta barely touched y ({changed})");
    }
}

#[test]
fn zero_weight_rows_leave_y_bit_exact() {
    // Adapter id -1 gives a token no delta: its row of y must come back unchanged.
    let spec = method_spec(Method::AdapterServing, 40, 33);
    let mut data = SyntheticLayer::<half::bf16>::new(&spec, 9, 3);
    data.adapter_ids = Some(vec![-1, 0, -1, 1, 2, -1, 3, 0, -1]);
    let build = fused::build(DType::BF16, fused::FusedConfig::DEFAULT);
    let plan = fused::plan(&build, &spec, 9, FusedVariant::Single, FusedOutputs::default()).unwrap();
    let got = run_fused(&spec, &data, &plan, Schedule::Seeded(1)).y;
    for (t, id) in data.adapter_ids.as_ref().unwrap().iter().enumerate() {
        let row = t * 33..(t + 1) * 33;
        let same = got[row.clone()].iter().zip(&data.y[row]).all(|(g, y)| *g == y.to_f64());
        assert_eq!(same, *id == -1, "token {t} (adapter {id})");
    }
}

/// `n` values `k / denom` with `|k| <= span`, from a seed: exact in f16 and bf16 for the
/// denominators and spans used below.
fn dyadic<T: Scalar>(n: usize, seed: u64, span: i64, denom: f64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let k = ((s >> 33) % (2 * span as u64 + 1)) as i64 - span;
            T::from_f64(k as f64 / denom)
        })
        .collect()
}

/// A layer of dyadic `x` (quantum 2^-4), `A` (2^-8), `B` (2^-3) and `y` (2^-2).
fn exact_layer<T: KernelElement + bytemuck::Pod>(spec: &LayerSpec, tokens: usize, seed: u64) -> SyntheticLayer<T> {
    let mut data = SyntheticLayer::<T>::new(spec, tokens, seed);
    data.x = dyadic(data.x.len(), seed, 16, 16.0);
    data.a = dyadic(data.a.len(), seed + 1, 32, 256.0);
    data.b = dyadic(data.b.len(), seed + 2, 8, 8.0);
    data.y = dyadic(data.y.len(), seed + 3, 8, 4.0);
    data
}

/// On data where every product and sum is exact in f32 (dyadic values, unit routing weights, a
/// power-of-two scale) the tensor-core kernel, the FMA kernel, the split variant and (one slot)
/// the grouped path must agree bit for bit. `h` needs more bits than the dtype holds (its
/// quantum is 2^-12 at magnitudes near 1), so an expand that drops the `lo` half of its hi/lo
/// split, or any other lost bit, shows.
fn paths_agree_on_exact_data<T: KernelElement + bytemuck::Pod>(method: Method, seed: u64) -> Vec<f64> {
    let mut spec = method_spec(method, 64, 48);
    spec.scale = 2.0; // a power of two keeps the expand exact
    let tokens = 21;
    let data = exact_layer::<T>(&spec, tokens, seed);
    let build = fused::build(T::DTYPE, fused::FusedConfig::DEFAULT);
    let plan = |variant| fused::plan(&build, &spec, tokens, variant, FusedOutputs::default()).unwrap();
    let tensor_cores = plan(FusedVariant::Single);
    assert!(tensor_cores.uses_tensor_cores());
    let split = plan(FusedVariant::Split { splits: 2, n_per_block: 32 });
    let schedule = Schedule::Seeded(seed);
    let tc = run_fused(&spec, &data, &tensor_cores, schedule).y;
    let fma = run_fused(&spec, &data, &tensor_cores.clone().without_tensor_cores(), schedule).y;
    let sp = run_fused(&spec, &data, &split, schedule).y;
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
    assert_eq!(bits(&tc), bits(&fma), "{method} {}: tensor-core and FMA kernels", T::DTYPE);
    assert_eq!(bits(&sp), bits(&fma), "{method} {}: split and single-launch kernels", T::DTYPE);
    let changed = tc.iter().zip(&data.y).filter(|(g, y0)| **g != y0.to_f64()).count();
    assert!(changed > tc.len() / 2, "{method} {}: the delta barely touched y ({changed})", T::DTYPE);
    tc
}

#[test]
fn tensor_core_and_fma_paths_agree_bit_for_bit_on_exact_data() {
    for (i, method) in [Method::AdapterServing, Method::FlyLora].into_iter().enumerate() {
        paths_agree_on_exact_data::<half::f16>(method, 40 + i as u64);
        let tc = paths_agree_on_exact_data::<half::bf16>(method, 50 + i as u64);
        if method == Method::AdapterServing {
            // One slot: the grouped path rounds y once too.
            let mut spec = method_spec(method, 64, 48);
            spec.scale = 2.0;
            let data = exact_layer::<half::bf16>(&spec, 21, 50 + i as u64);
            let grouped = grouped_y(&spec, &data, Schedule::Seeded(5));
            assert_eq!(tc, grouped, "{method}: fused and grouped paths");
        }
    }
}

/// An infinite `h'` through every fused expand: the tensor-core one (16-bit dtypes; its hi / lo
/// split must keep the infinity in hi, not make `lo = inf - inf`), the FMA one and the split one.
/// One `A` entry is +inf, so `h = x · A` is ±inf in one rank column of expert 0, and every token
/// is routed to expert 0 (the kernel's mix multiplies `h` by the summed weight of the column's
/// expert, 0 when unselected, where the reference skips the expert: `0 · inf` would differ).
/// Where the f64 reference gives ±inf the kernel must give the same infinity.
#[test]
fn infinite_h_reaches_y_as_the_reference_infinity() {
    let spec = method_spec(Method::AdapterServing, 64, 40);
    let runs = [
        (FusedVariant::Single, Kernels::Auto),
        (FusedVariant::Single, Kernels::Fma),
        (FusedVariant::Split { splits: 2, n_per_block: 32 }, Kernels::Auto),
    ];
    for (variant, kernels) in runs {
        for dtype in DType::ALL {
            let r = match dtype {
                DType::F32 => infinite_h::<f32>(&spec, variant, kernels),
                DType::F16 => infinite_h::<half::f16>(&spec, variant, kernels),
                DType::BF16 => infinite_h::<half::bf16>(&spec, variant, kernels),
            };
            r.unwrap_or_else(|e| panic!("{dtype} {variant:?} {kernels:?}: {e}"));
        }
    }
}

fn infinite_h<T: KernelElement + bytemuck::Pod>(
    spec: &LayerSpec,
    variant: FusedVariant,
    kernels: Kernels,
) -> Result<(), String> {
    let tokens = 21;
    let mut data = SyntheticLayer::<T>::new(spec, tokens, 11);
    data.adapter_ids = Some(vec![0; tokens]);
    let (k0, c0) = (5, spec.ranks.cols(0).start + 1);
    data.a[k0 * spec.total_rank() + c0] = T::from_f64(f64::INFINITY);
    for t in 0..tokens {
        // x[t, k0] · inf must be an infinity, never 0 · inf.
        data.x[t * spec.d_in + k0] = T::from_f64(if t % 2 == 0 { 0.5 } else { -0.75 });
    }
    let reference = reference::forward(spec, &data.inputs()).map_err(|e| e.to_string())?;
    let build = fused::build(T::DTYPE, fused::FusedConfig::DEFAULT);
    let mut plan = fused::plan(&build, spec, tokens, variant, FusedOutputs::default()).map_err(|e| e.to_string())?;
    if kernels == Kernels::Fma {
        plan = plan.without_tensor_cores();
    }
    let tensor_cores = T::DTYPE != DType::F32 && kernels == Kernels::Auto && variant == FusedVariant::Single;
    if plan.uses_tensor_cores() != tensor_cores {
        return Err(format!("the plan's tensor cores: {}", plan.uses_tensor_cores()));
    }
    let got = run_fused(spec, &data, &plan, Schedule::Seeded(4)).y;
    let (_, bound) = expected(spec, &data, &reference.routing);
    let want = &reference.y;
    let infinite = want.iter().filter(|v| v.is_infinite()).count();
    if infinite < tokens * spec.d_out / 2 {
        return Err(format!("the reference has only {infinite} infinities"));
    }
    let n = spec.d_in + spec.total_rank() + reference.routing.slots + 16;
    let tol = tolerance_with(T::DTYPE.unit_roundoff(), f64::powi(2.0, -23), n);
    for (i, ((&g, &w), &p)) in got.iter().zip(want).zip(&bound).enumerate() {
        let ok = if w.is_finite() { (g - w).abs() <= tol * p } else { g == w || (w.is_nan() && g.is_nan()) };
        if !ok {
            return Err(format!("y[{}, {}] = {g}, reference {w}", i / spec.d_out, i % spec.d_out));
        }
    }
    Ok(())
}
