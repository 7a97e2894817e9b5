//! The FFN block's runtime sequence on the CPU execution layer: `FfnPlanner` plans a forward
//! (routing launch, device slot plans, the block's kernels, workspace layout), the caller's
//! tensors, the banks' rank offsets and a poisoned byte workspace are bound as `CompiledFfn`
//! binds them, and the test plays the dense projections (`G`, `U` into the workspace's stage
//! buffers, `y = a_mix·W_down`) between `launch_activation` and `launch_down_delta`, as a caller
//! of the caller-GEMM path does. Both block presets, SiLU and GELU, f32 and bf16, against the f64
//! reference: the routing ids exactly, the weights to f32 accuracy, and `a_mix` and `y` in
//! relative Frobenius norm under `4·(slots + 3)·u + 2·(d + f)·2^-24` (each element passes
//! through at most `slots + 3` roundings to the dtype: `G`/`U`, `a_mix` per pass, `y` after the
//! base and after each down pass, each relative `u`, with the activation's slope below 1.13 and a
//! factor 2 of headroom; the f32 sums over `d` and `f` add `2^-24` per term).

mod host;

use host::HostBackend;
use mole::kernels::exec::{Bindings, Buf};
use mole::model::{Activation, FfnMethod, FfnShape, FfnSpec};
use mole::reference::{ffn_forward, FfnInputs};
use mole::runtime::FfnPlanner;
use mole::synth::Rng;
use mole::{KernelElement, Scalar};
use mole_hostexec::{Buffer, Schedule};

fn buffer<T: bytemuck::Pod>(name: &str, v: &[T]) -> Buffer<T> {
    if v.is_empty() {
        Buffer::poisoned(name, 1)
    } else {
        Buffer::from_slice(name, v)
    }
}

fn rounded<T: Scalar>(v: &[f64]) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    let back = t.iter().map(|x| x.to_f64()).collect();
    (t, back)
}

fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..k {
            let av = a[i * k + j];
            out[i * n..(i + 1) * n].iter_mut().zip(&b[j * n..(j + 1) * n]).for_each(|(o, bv)| *o += av * bv);
        }
    }
    out
}

fn rel_frobenius(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// `bytes` as elements of `T` (unaligned reads).
fn from_bytes<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()
}

/// The elements of workspace region `buf` as `T` (f64).
fn region<T: Scalar + bytemuck::Pod>(ws: &[u8], plan: &mole::runtime::FfnLayerPlan, buf: Buf) -> Vec<f64> {
    let (_, off) = plan.regions.iter().find(|(b, _)| *b == buf).copied().expect("region");
    let n = plan.lens.get(buf) * std::mem::size_of::<T>();
    let bytes = &ws[off..off + n];
    from_bytes::<T>(bytes).iter().map(|v| v.to_f64()).collect()
}

fn run<T: KernelElement + Scalar + bytemuck::Pod>(spec: &FfnSpec, tokens: usize, seed: u64) {
    let planner = FfnPlanner::new(spec, T::DTYPE).unwrap();
    let plan = planner.plan(tokens).unwrap();
    let (d, f, e) = (spec.d, spec.f, spec.experts);
    let mut rng = Rng::new(seed);
    let mut gen = |n: usize, amp: f64| -> Vec<f64> { (0..n).map(|_| rng.range(-amp, amp)).collect() };
    let (x_t, x) = rounded::<T>(&gen(tokens * d, 1.0));
    let (rw_t, rw) = rounded::<T>(&gen(d * e, 1.0));
    let (_, wg) = rounded::<T>(&gen(d * f, 0.3));
    let (_, wu) = rounded::<T>(&gen(d * f, 0.3));
    let (_, wd) = rounded::<T>(&gen(f * d, 0.3));
    let dims = [(d, f), (d, f), (f, d)];
    // (A as T, A, B as T, B) of each projection.
    type Bank<T> = (Vec<T>, Vec<f64>, Vec<T>, Vec<f64>);
    let banks: Vec<Bank<T>> = spec
        .projections()
        .iter()
        .zip(dims)
        .map(|((_, l), (n_in, n_out))| {
            let r = l.expect("every projection adapted").ranks.total_rank();
            let (a_t, a) = rounded::<T>(&gen(n_in * r, 0.4));
            let (b_t, b) = rounded::<T>(&gen(r * n_out, 0.4));
            (a_t, a, b_t, b)
        })
        .collect();

    let x_buf = buffer("x", &x_t);
    let rw_buf = buffer("router_weight", &rw_t);
    let bank_bufs: Vec<(Buffer<T>, Buffer<T>)> =
        banks.iter().map(|(a, _, b, _)| (buffer("a", a), buffer("b", b))).collect();
    let offs_bufs: Vec<Buffer<u32>> =
        planner.rank_offsets().iter().map(|o| buffer("rank_offsets", o.as_ref().unwrap())).collect();
    let mut ws = Buffer::<u8>::poisoned("workspace", plan.workspace_bytes.max(1));
    let mut b = Bindings::new();
    b.sized(Buf::X, x_buf.device_ptr(), x_buf.len()).sized(Buf::RouterWeight, rw_buf.device_ptr(), rw_buf.len());
    let names = [
        (Buf::GateA, Buf::GateB, Buf::GateRankOffsets),
        (Buf::UpA, Buf::UpB, Buf::UpRankOffsets),
        (Buf::DownA, Buf::DownB, Buf::DownRankOffsets),
    ];
    for (((ab, bb, ob), (a, bm)), o) in names.into_iter().zip(&bank_bufs).zip(&offs_bufs) {
        b.sized(ab, a.device_ptr(), a.len()).sized(bb, bm.device_ptr(), bm.len()).sized(ob, o.device_ptr(), o.len());
    }
    plan.bind_workspace(&mut b, ws.device_ptr()).unwrap();
    // The caller's G and U, into the workspace's stage buffers.
    for (buf, w) in [(Buf::GateOut, &wg), (Buf::UpOut, &wu)] {
        let (t, _) = rounded::<T>(&matmul(&x, w, tokens, d, f));
        let (_, off) = plan.regions.iter().find(|(r, _)| *r == buf).copied().unwrap();
        ws.write_at(off, bytemuck::cast_slice(&t));
    }
    let mut host = HostBackend::new(Schedule::Seeded(seed));
    // SAFETY: every bound address is a live host-execution buffer of the plan's length.
    unsafe { planner.launch_activation(&plan, &b, &mut host) }.unwrap();
    let bytes = ws.read();
    let a_mix = region::<T>(&bytes, &plan, Buf::AMix);
    let (y0_t, _) = rounded::<T>(&matmul(&a_mix, &wd, tokens, f, d));
    let y_buf = buffer("y", &y0_t);
    b.sized(Buf::Y, y_buf.device_ptr(), y_buf.len());
    // SAFETY: as above, after the first half on the same workspace.
    unsafe { planner.launch_down_delta(&plan, &b, &mut host) }.unwrap();
    let y: Vec<f64> = y_buf.read().iter().map(|v| v.to_f64()).collect();

    let inputs = FfnInputs {
        router_weight: Some(&rw[..]),
        gate_a: Some(&banks[0].1[..]),
        gate_b: Some(&banks[0].3[..]),
        up_a: Some(&banks[1].1[..]),
        up_b: Some(&banks[1].3[..]),
        down_a: Some(&banks[2].1[..]),
        down_b: Some(&banks[2].3[..]),
        ..FfnInputs::new(tokens, &x[..], &wg[..], &wu[..], &wd[..])
    };
    let want = ffn_forward(spec, &inputs).unwrap();
    let ids: Vec<i32> = {
        let (_, off) = plan.regions.iter().find(|(r, _)| *r == Buf::Ids).copied().unwrap();
        from_bytes(&bytes[off..off + 4 * plan.lens.get(Buf::Ids)])
    };
    let weights = region::<f32>(&bytes, &plan, Buf::RouteWeights);
    let what = format!("{} {:?} T={tokens}", T::DTYPE, spec.activation);
    assert_eq!(ids, want.routing.ids, "{what}: routing ids");
    for (i, (g, w)) in weights.iter().zip(&want.routing.weights).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: weight {i}: {g} vs {w}");
    }
    let slots = want.routing.slots as f64;
    let tol = 4.0 * (slots + 3.0) * T::DTYPE.unit_roundoff() + 2.0 * (d + f) as f64 * f64::powi(2.0, -24);
    let (ea, ey) = (rel_frobenius(&a_mix, &want.a_mix), rel_frobenius(&y, &want.y));
    assert!(ea <= tol && ey <= tol, "{what}: a_mix {ea:.3e}, y {ey:.3e} (tolerance {tol:.3e})");
    assert!(want.y.iter().any(|v| v.abs() > 1e-2), "{what}: y is all but zero");
}

fn spec(method: FfnMethod, activation: Activation) -> FfnSpec {
    method.spec(FfnShape { d: 48, f: 200, experts: 6, rank: 8, k: 2, alpha: 16.0, activation }).unwrap()
}

#[test]
fn both_block_presets_run_through_the_runtime_sequence() {
    for (method, activation) in [(FfnMethod::MixLora, Activation::Silu), (FfnMethod::MixLoraDynamic, Activation::Gelu)]
    {
        let s = spec(method, activation);
        for (tokens, seed) in [(1, 1), (9, 2), (45, 3)] {
            run::<f32>(&s, tokens, seed);
            run::<half::bf16>(&s, tokens, seed + 10);
        }
    }
}

/// A tuning file holding the bm-16 ffn build for the block's bucket: the planner plans with it
/// and its SGMV pair (the host execution layer compiles default builds only, so the plan's
/// contents are checked here, not its execution); the other buckets keep the defaults that the
/// sequence above runs.
#[test]
fn a_tuned_block_plans_with_the_cached_build_and_its_sgmv_pair() {
    use mole::kernels::{ffn, sgmv};
    use mole::tune::{Candidate, GpuId, Provenance, ShapeKey, Strategy, TunedEntry, TuningCache, TuningFile};
    use mole::DType;
    let s = spec(FfnMethod::MixLora, Activation::Gelu);
    let small = ffn::build(DType::BF16, ffn::CONFIG_CANDIDATES.into_iter().find(|c| c.bm == 16).unwrap());
    let gpu = GpuId { name: "NVIDIA H100 80GB HBM3".into(), compute_capability: (9, 0), sm_count: 132 };
    let p = Provenance::current();
    let key = ShapeKey::for_ffn(&s, DType::BF16, 45);
    let entry =
        TunedEntry::new(key, Candidate { strategy: Strategy::FfnBlock, build: small.clone() }, 1.0, None, 1.0, &p);
    let file = TuningFile { format_version: mole::tune::FORMAT_VERSION, gpu: gpu.clone(), entries: vec![entry] };
    let text = serde_json::to_string(&file).unwrap();
    let (cache, warnings) = TuningCache::load_with(&gpu, None, &[(gpu.file_name().as_str(), text.as_str())], &p);
    assert!(warnings.is_empty(), "{warnings:?}");
    let planner = FfnPlanner::new(&s, DType::BF16).unwrap().with_tuning(Some(cache));
    let pair = sgmv::build(DType::BF16, sgmv::CONFIG_CANDIDATES.into_iter().find(|c| c.bm == 16).unwrap());
    for tokens in [33, 45, 64] {
        let plan = planner.plan(tokens).unwrap();
        assert_eq!((&plan.ffn.0, &plan.sgmv_build), (&small, &pair), "T={tokens}");
        assert_eq!(plan.source, mole::runtime::ChoiceSource::Tuned);
        // The builds the plan launches are the pair, the plans padded to its tile.
        assert!(plan.builds().contains(&&small) && plan.builds().contains(&&pair));
        assert_eq!(plan.grouping.1.entry_stride, sgmv::entry_capacity(tokens, s.experts, 16));
        assert_eq!(plan.ffn.1.gate.as_ref().unwrap().config.bm, 16);
    }
    // T = 16 (bucket 16, two powers of two away) runs the entry as "tuned nearby"; T = 8
    // (three away) the defaults, as the sequence test runs them.
    assert_eq!(planner.plan(16).unwrap().source, mole::runtime::ChoiceSource::TunedNearby);
    let plan = planner.plan(8).unwrap();
    assert_eq!(plan.ffn.0, ffn::build(DType::BF16, ffn::FfnConfig::DEFAULT));
    assert_eq!(plan.sgmv_build, sgmv::build(DType::BF16, sgmv::SgmvConfig::DEFAULT));
}
