//! The gating kernels against the f64 reference (`mole::reference::routing`, `::stats`) and the
//! host routing plan, on random inputs with ties, NaN and infinities, for every dtype and block
//! size. Needs a GPU: without one each test prints a note and returns.
//!
//! The kernels compute in f32, the reference in f64, so the comparison allows what f32 cannot
//! decide: a different count of kept experts where a dynamic rule's cumulative sum or entropy
//! lies within 1e-4 of its threshold, and swapped experts whose f32-computed selection scores
//! (sigmoid + bias, |z + bias|) are within 1e-6. Rules ordered by the raw score must match
//! exactly, ties included.

mod gpu;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use mole::cuda::Device;
use mole::kernels::exec::Buf;
use mole::kernels::gating::{self, DeviceGateInput, GroupOutputs, InputKind, RouteOutputs, StatsInputs, StatsPlan};
use mole::kernels::KernelBuild;
use mole::model::{Entropy, Gating, RankSelection, Router, RoutingRule, TopKWeights};
use mole::plan::{RoutingPlan, TokenSlot};
use mole::reference::routing::{descending_order, normalized_entropy, route, sigmoid, GateInput, Routing};
use mole::reference::stats::router_stats;
use mole::{DType, KernelElement, MoleError};

fn device() -> Option<Device> {
    gpu::device_or_skip("the GPU gating tests")
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

/// A score: NaN, -inf or +inf with probability `special`, else from a tie-rich grid or continuous.
fn value(rng: &mut Rng, ties: bool, special: f64) -> f64 {
    let r = rng.unit();
    match r {
        _ if r < special / 3.0 => f64::NAN,
        _ if r < special * 2.0 / 3.0 => f64::NEG_INFINITY,
        _ if r < special => f64::INFINITY,
        _ if ties => (rng.below(9) as f64 - 4.0) / 2.0,
        _ => (rng.unit() - 0.5) * 8.0,
    }
}

fn random_gating(rng: &mut Rng, e: usize) -> Gating {
    let k = 1 + rng.below(e.min(8));
    let temperature = rng.pick(&[1.0, 0.5, 2.3]);
    let routed = |rule| Gating::Routed { router: Router::Logits, rule };
    match rng.below(9) {
        0 | 1 => {
            let weights = rng.pick(&[TopKWeights::Softmax, TopKWeights::Renormalized, TopKWeights::Unit]);
            routed(RoutingRule::SoftmaxTopK { k, temperature, weights })
        }
        2 => routed(RoutingRule::TopP { p: rng.pick(&[0.3, 0.9, 1.0]), temperature }),
        3 => routed(RoutingRule::DynMole {
            q: rng.pick(&[1.0, 0.5, 2.0, 1.3]),
            top_p: rng.pick(&[0.0, 0.5, 1.0]),
            keep_top_k: rng.below(e.min(3) + 1),
            entropy_threshold: rng.pick(&[0.0, 0.5, 0.9, 1.0]),
            entropy_eps: rng.pick(&[0.0, 1e-5]),
        }),
        4 => routed(RoutingRule::DenseSoftmax { temperature }),
        5 => routed(RoutingRule::SigmoidTopK { k, bias: rng.below(2) == 0 }),
        6 => {
            let selection = if rng.below(2) == 0 { RankSelection::Magnitude } else { RankSelection::Signed };
            routed(RoutingRule::MagnitudeTopK { k, bias: rng.below(2) == 0, selection })
        }
        7 => {
            let top = rng.below(3) > 0;
            Gating::Given { top_k: top.then_some(k), softmax_topk: top && rng.below(2) == 0 }
        }
        _ => Gating::AdapterIds,
    }
}

fn close(a: f64, b: f64, atol: f64, rtol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= atol + rtol * b.abs()
}

fn key(v: f64) -> f64 {
    if v.is_nan() {
        f64::NEG_INFINITY
    } else {
        v
    }
}

/// The f64 score each rule orders a token's experts by.
fn selection_scores(g: &Gating, z: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let b = |e: usize| bias.map_or(0.0, |b| b[e]);
    match g {
        Gating::Routed { rule: RoutingRule::SigmoidTopK { .. }, .. } => {
            z.iter().enumerate().map(|(e, &v)| key(sigmoid(v) + b(e))).collect()
        }
        Gating::Routed { rule: RoutingRule::MagnitudeTopK { selection, .. }, .. } => z
            .iter()
            .enumerate()
            .map(|(e, &v)| key(if *selection == RankSelection::Signed { v + b(e) } else { (v + b(e)).abs() }))
            .collect(),
        _ => z.iter().map(|&v| key(v)).collect(),
    }
}

/// Whether a dynamic rule's kept count may differ between f32 and f64 for this token.
fn borderline(g: &Gating, z: &[f64], p: &[f64], counts: (usize, usize)) -> bool {
    let (threshold, entropy) = match *g {
        Gating::Routed { rule: RoutingRule::TopP { p, .. }, .. } => (p, false),
        Gating::Routed { rule: RoutingRule::DynMole { q, top_p, entropy_threshold, entropy_eps, .. }, .. } => {
            (top_p, (normalized_entropy(p, Entropy { q, eps: entropy_eps }) - entropy_threshold).abs() < 1e-4)
        }
        _ => return false,
    };
    let cums: Vec<f64> = descending_order(z)
        .iter()
        .scan(0.0, |c, &i| {
            *c += p[i];
            Some(*c)
        })
        .collect();
    entropy
        || (counts.0.min(counts.1).saturating_sub(1)..counts.0.max(counts.1))
            .any(|m| (cums[m] - threshold).abs() < 1e-4)
}

/// Compares one token's slots; `Err` describes the first disagreement.
fn compare_token(g: &Gating, scores: &[f64], got: (&[i32], &[f32]), want: (&[i32], &[f64])) -> Result<(), String> {
    let kept = |ids: &[i32]| ids.iter().take_while(|&&i| i >= 0).count();
    let (ng, nw) = (kept(got.0), kept(want.0));
    if got.0[ng..].iter().any(|&i| i != -1) || got.1[ng..].iter().any(|&w| w != 0.0) {
        return Err(format!("empty slots not (-1, 0): {:?} {:?}", got.0, got.1));
    }
    let exact = !matches!(
        g,
        Gating::Routed { rule: RoutingRule::SigmoidTopK { .. } | RoutingRule::MagnitudeTopK { bias: true, .. }, .. }
    );
    for j in 0..ng.min(nw) {
        let (a, b) = (got.0[j] as usize, want.0[j] as usize);
        if a != b && (exact || !close(scores[a], scores[b], 1e-6, 1e-6)) {
            return Err(format!("slot {j}: expert {a} vs {b}\n got  {:?}\n want {:?}", got.0, want.0));
        }
        if got.0[..ng] == want.0[..nw] && !close(got.1[j] as f64, want.1[j], 2e-5, 1e-4) {
            return Err(format!(
                "slot {j}: weight {} vs {}\n got  {:?}\n want {:?}",
                got.1[j], want.1[j], got.1, want.1
            ));
        }
    }
    Ok(())
}

fn upload<T: DeviceRepr>(dev: &Device, v: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(v).expect("upload")
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &Device, n: usize) -> CudaSlice<T> {
    dev.stream().alloc_zeros(n.max(1)).expect("alloc")
}

fn download<T: DeviceRepr>(dev: &Device, v: &CudaSlice<T>) -> Vec<T> {
    dev.stream().clone_dtoh(v).expect("download")
}

/// One random case on `build`; returns a description or the disagreement.
fn case<T: KernelElement + DeviceRepr>(dev: &Device, build: &KernelBuild, rng: &mut Rng) -> Result<String, String> {
    let max_e = rng.pick(&[8usize, 40, 255]);
    let e = 1 + rng.below(max_e);
    let t = rng.pick(&[0, 1, 3, 17, 100, 777, 1999]);
    let gating = random_gating(rng, e);
    let (ties, special) = (rng.below(2) == 0, rng.pick(&[0.0, 0.0, 0.05, 0.3]));
    let threads = build.block_threads();
    let desc = format!("{build} T={t} E={e} ties={ties} special={special} {gating:?}");
    let mut z: Vec<T> = (0..t * e).map(|_| T::from_f64(value(rng, ties, special))).collect();
    for row in 0..t {
        match rng.below(12) {
            0 => z[row * e..(row + 1) * e].fill(T::from_f64(f64::NAN)),
            1 => z[row * e..(row + 1) * e].fill(T::from_f64(f64::NEG_INFINITY)),
            2 => z[row * e + rng.below(e)] = T::from_f64(f64::INFINITY),
            _ => {}
        }
    }
    let bias: Vec<T> = (0..e).map(|_| T::from_f64((rng.below(5) as f64 - 2.0) / 4.0)).collect();
    let adapters: Vec<i32> = (0..t).map(|_| rng.below(e + 1) as i32 - 1).collect();
    let (z64, b64) = (mole::dtype::to_f64_vec(&z), mole::dtype::to_f64_vec(&bias));

    let plan = gating::plan(&gating, t, e, threads).map_err(|err| format!("{desc}: {err}"))?;
    if t == 0 {
        // Nothing to launch (and CUDA has no zero-byte buffers to pass).
        return if plan.launch.is_none() { Ok(desc) } else { Err(format!("{desc}: a launch for zero tokens")) };
    }
    let bias_used = plan.uses_bias.then_some(&b64[..]);
    let reference = route(
        &gating,
        match plan.input {
            InputKind::Scores => GateInput::Scores(&z64, bias_used),
            InputKind::Weights => GateInput::Weights(&z64),
            InputKind::AdapterIds => GateInput::AdapterIds(&adapters),
        },
        t,
        e,
    )
    .map_err(|err| format!("{desc}: reference: {err}"))?;
    let (dz, db, da) = (upload(dev, &z), upload(dev, &bias), upload(dev, &adapters));
    let input = match plan.input {
        InputKind::Scores => DeviceGateInput::Scores { scores: &dz, selection_bias: plan.uses_bias.then_some(&db) },
        InputKind::Weights => DeviceGateInput::Weights(&dz),
        InputKind::AdapterIds => DeviceGateInput::AdapterIds(&da),
    };
    let slots = plan.slots;
    let (mut ids, mut w, mut probs) = (zeros::<i32>(dev, t * slots), zeros::<f32>(dev, t * slots), zeros(dev, t * e));
    let out = RouteOutputs { ids: &mut ids, weights: &mut w, probs: plan.writes_probs.then_some(&mut probs) };
    gating::route(dev, build, &gating, t, e, input, out).map_err(|err| format!("{desc}: route: {err}"))?;
    let gids = download(dev, &ids);
    let gw = download(dev, &w);
    for row in 0..t {
        let zr = &z64[row * e..(row + 1) * e];
        let got = (&gids[row * slots..(row + 1) * slots], &gw[row * slots..(row + 1) * slots]);
        let want = (&reference.ids[row * slots..(row + 1) * slots], &reference.weights[row * slots..(row + 1) * slots]);
        let scores =
            if plan.input == InputKind::AdapterIds { vec![0.0; e] } else { selection_scores(&gating, zr, bias_used) };
        if let Err(msg) = compare_token(&gating, &scores, got, want) {
            let kept = |ids: &[i32]| ids.iter().take_while(|&&i| i >= 0).count();
            let p = reference.probs.as_deref().map(|p| &p[row * e..(row + 1) * e]);
            if !p.is_some_and(|p| borderline(&gating, zr, p, (kept(got.0), kept(want.0)))) {
                return Err(format!("{desc}: token {row}: {msg}\n z {zr:?}"));
            }
        }
    }
    if let (Some(want), true) = (&reference.probs, plan.writes_probs) {
        let got = download(dev, &probs);
        if let Some(i) = (0..t * e).find(|&i| !close(got[i] as f64, want[i], 2e-6, 1e-4)) {
            return Err(format!("{desc}: probs[{i}] {} vs {}", got[i], want[i]));
        }
    }

    // Statistics from the kernel's own ids and probabilities.
    let sp = StatsPlan::for_gating(&gating, t, e, threads).map_err(|err| format!("{desc}: {err}"))?;
    let (mut ws, mut so) = (zeros::<u32>(dev, sp.workspace_words), zeros::<f32>(dev, sp.out_len));
    let inputs = StatsInputs {
        ids: &ids,
        probs: (sp.params.has_probs != 0).then_some(&probs),
        scores: (sp.params.has_scores != 0).then_some(&dz),
    };
    gating::router_stats(dev, build, &sp, inputs, &mut ws, &mut so).map_err(|err| format!("{desc}: stats: {err}"))?;
    let got = sp.decode(&download(dev, &so)).map_err(|err| err.to_string())?;
    let routing = Routing { ids: gids.clone(), ..reference.clone() };
    let want = router_stats(&routing, (sp.params.has_scores != 0).then_some(&z64[..]), sp.entropy);
    let pairs = got.selected_fraction.iter().zip(&want.selected_fraction);
    let mut checks: Vec<(&str, f64, f64)> = pairs.map(|(&g, &w)| ("selected_fraction", g, w)).collect();
    if let (Some(g), Some(w)) = (&got.mean_prob, &want.mean_prob) {
        checks.extend(g.iter().zip(w).map(|(&g, &w)| ("mean_prob", g, w)));
    }
    checks.extend(got.z_loss.zip(want.z_loss).map(|(g, w)| ("z_loss", g, w)));
    checks.extend(got.entropy.zip(want.entropy).map(|(g, w)| ("entropy", g, w)));
    if let Some((what, g, w)) = checks.into_iter().find(|&(_, g, w)| !close(g, w, 5e-5, 1e-4)) {
        return Err(format!("{desc}: stats {what}: {g} vs {w}"));
    }

    // The routing plan of the kernel's ids: exactly the host's.
    let block = rng.pick(&[1, 1, 4, 16]);
    let gp = gating::plan_grouping(t, slots, 0..e, e, block, threads).map_err(|err| format!("{desc}: {err}"))?;
    let mut gws = zeros::<u32>(dev, gp.lens.get(Buf::PlanWorkspace));
    let (mut counts, mut offsets, mut status) = (zeros::<u32>(dev, e), zeros::<u32>(dev, e + 1), zeros::<u32>(dev, 1));
    let mut entries = zeros::<TokenSlot>(dev, gp.lens.get(Buf::PlanEntries));
    let outs = GroupOutputs { counts: &mut counts, offsets: &mut offsets, entries: &mut entries, status: &mut status };
    gating::group(dev, build, &gp, &ids, &mut gws, outs).map_err(|err| format!("{desc}: group: {err}"))?;
    let host = RoutingPlan::build(&gids, t, slots, e, block).map_err(|err| format!("{desc}: host plan: {err}"))?;
    let got_entries = download(dev, &entries);
    let same = download(dev, &counts) == host.counts
        && download(dev, &offsets) == host.offsets
        && got_entries[..host.entries.len()] == host.entries[..]
        && download(dev, &status) == [0];
    if !same {
        return Err(format!("{desc}: the routing plan differs from the host's (block {block})"));
    }
    Ok(desc)
}

fn run_dtype<T: KernelElement + DeviceRepr>(dev: &Device, seed: u64, cases: usize) {
    // The sanitizer-sized run: still every candidate build once.
    let builds_len = gating::candidates().into_iter().filter(|b| b.dtype == T::DTYPE).count();
    let cases = if gpu::quick() { builds_len.max(cases / 8) } else { cases };
    let mut rng = Rng(seed);
    let builds: Vec<KernelBuild> = gating::candidates().into_iter().filter(|b| b.dtype == T::DTYPE).collect();
    let mut failures = Vec::new();
    for i in 0..cases {
        let build = &builds[i % builds.len()];
        if let Err(msg) = case::<T>(dev, build, &mut rng) {
            failures.push(msg);
        }
    }
    assert!(failures.is_empty(), "{} of {cases} cases failed:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn f32_gating_matches_the_reference() {
    let Some(dev) = device() else { return };
    run_dtype::<f32>(&dev, 0x1234_5678_9abc_def1, 120);
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn f16_gating_matches_the_reference() {
    let Some(dev) = device() else { return };
    run_dtype::<half::f16>(&dev, 0x0f0f_1234_5555_aaab, 120);
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn bf16_gating_matches_the_reference() {
    let Some(dev) = device() else { return };
    run_dtype::<half::bf16>(&dev, 0x7777_3333_1111_9999, 120);
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn gating_is_deterministic_and_validates_before_launching() {
    let Some(dev) = device() else { return };
    let build = gating::default_builds().into_iter().find(|b| b.dtype == DType::F32).unwrap();
    let (t, e) = (1500, 64);
    let mut rng = Rng(99);
    let z: Vec<f32> = (0..t * e).map(|_| value(&mut rng, true, 0.05) as f32).collect();
    let dz = upload(&dev, &z);
    let gating = Gating::Routed {
        router: Router::Logits,
        rule: RoutingRule::DynMole { q: 1.5, top_p: 0.6, keep_top_k: 1, entropy_threshold: 0.9, entropy_eps: 0.0 },
    };
    let run = || {
        let (mut ids, mut w, mut p) = (zeros::<i32>(&dev, t * e), zeros::<f32>(&dev, t * e), zeros::<f32>(&dev, t * e));
        let input = DeviceGateInput::Scores { scores: &dz, selection_bias: None };
        let out = RouteOutputs { ids: &mut ids, weights: &mut w, probs: Some(&mut p) };
        gating::route(&dev, &build, &gating, t, e, input, out).unwrap();
        let sp = StatsPlan::for_gating(&gating, t, e, gating::DEFAULT_BLOCK_THREADS).unwrap();
        let (mut ws, mut so) = (zeros::<u32>(&dev, sp.workspace_words), zeros::<f32>(&dev, sp.out_len));
        let inputs = StatsInputs { ids: &ids, probs: Some(&p), scores: Some(&dz) };
        gating::router_stats(&dev, &build, &sp, inputs, &mut ws, &mut so).unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        (download(&dev, &ids), bits(download(&dev, &w)), bits(download(&dev, &so)))
    };
    assert_eq!(run(), run());
    // A wrong length or dtype is a typed error before any launch.
    let (mut ids, mut w) = (zeros::<i32>(&dev, t * e - 1), zeros::<f32>(&dev, t * e));
    let input = DeviceGateInput::Scores { scores: &dz, selection_bias: None };
    let err =
        gating::route(&dev, &build, &gating, t, e, input, RouteOutputs { ids: &mut ids, weights: &mut w, probs: None });
    assert!(matches!(err, Err(MoleError::ShapeMismatch { .. })));
    let bf16_build = gating::default_builds().into_iter().find(|b| b.dtype == DType::BF16).unwrap();
    let input = DeviceGateInput::Scores { scores: &dz, selection_bias: None };
    let err = gating::route(
        &dev,
        &bf16_build,
        &gating,
        t,
        e,
        input,
        RouteOutputs { ids: &mut ids, weights: &mut w, probs: None },
    );
    assert!(matches!(err, Err(MoleError::InvalidParameter { .. })));
}
