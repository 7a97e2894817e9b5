//! `mole run --method mix-lora` (or `mix-lora-dynamic`): MixLoRA's FFN-expert block on synthetic
//! inputs. With a GPU the block runtime (`CompiledFfn::forward_raw`: cuBLAS for the three dense
//! projections, mole's kernels for the routing, the activation and the LoRA) is checked against
//! the f64 reference and timed. On the CPU the f64 reference (`ffn_forward`: base gate and up
//! once per token, the base down projection once on `a_mix`) is checked against the block as
//! MixLoRA's code runs it (per expert: the tokens routed to it, its whole LoRA FFN, a weighted
//! add; f64, no trick).

use crate::run::{not_taken, report, Outcome, RunArgs};
use cudarc::driver::DeviceRepr;
use mole::autotune::DeviceFfn;
use mole::cuda::{copy_bandwidth_gbs, time_on_device, Device};
use mole::dtype::to_f64_vec;
use mole::model::{FfnMethod, FfnShape, FfnSpec};
use mole::reference::linalg::matmul;
use mole::reference::{ffn_forward, max_scaled_error, tolerance_with, Routing};
use mole::synth::SyntheticFfn;
use mole::{limits, DType, KernelElement, Result, Scalar};
use std::time::Instant;

/// The multiply-adds a default CPU run spends on the block, about 20 s on 2 cores: the
/// reference and the per-expert check stream the three `d x f` base weights once per token and
/// once per token and slot (measured: 39 tokens at d = 4096, f = 11008, k = 2, 12 to 23 s).
const CPU_RUN_MADDS: f64 = 1.6e10;

/// The block's shape from the knobs: defaults where a knob is not given, and an error naming a
/// knob the preset does not read.
fn block_shape(method: FfnMethod, args: &RunArgs) -> Result<FfnShape> {
    if let (false, Some(k)) = (method.uses_k(), args.k) {
        return Err(not_taken("--k", k, method.name(), "its rule decides how many experts each token gets"));
    }
    limits::check_max("--d", args.d, limits::MAX_DIM)?;
    let f = args.f.unwrap_or(11008);
    limits::check_max("--f", f, limits::MAX_DIM)?;
    if let Some(t) = args.tokens {
        limits::check_max("--tokens", t, limits::MAX_TOKENS)?;
    }
    let (experts, rank, k) = (args.experts.unwrap_or(8), args.rank.unwrap_or(16), args.k.unwrap_or(2));
    let activation = args.activation.unwrap_or_default();
    Ok(FfnShape { d: args.d, f, experts, rank, k, alpha: 2.0 * rank as f64, activation })
}

/// The token count of a CPU run without `--tokens`: what [`CPU_RUN_MADDS`] affords, 1 to 2048.
/// Top-p's slots per token vary; half the experts is the estimate.
fn cpu_tokens(method: FfnMethod, shape: &FfnShape) -> usize {
    let slots = if method.uses_k() { shape.k } else { shape.experts.div_ceil(2) };
    let per_token = 3.0 * shape.d as f64 * shape.f as f64 * (1 + slots) as f64;
    ((CPU_RUN_MADDS / per_token) as usize).clamp(1, 2048)
}

/// Tokens of a GPU run without `--tokens`.
const GPU_TOKENS: usize = 2048;

pub fn run(method: FfnMethod, args: &RunArgs) -> Result<()> {
    let shape = block_shape(method, args)?;
    let spec = method.spec(shape)?;
    let device = mole::cuda::Device::new(0);
    let tokens = match (args.tokens, &device) {
        (Some(t), _) => t,
        (None, Ok(_)) => {
            println!("tokens: {GPU_TOKENS} (no --tokens: the GPU default)");
            GPU_TOKENS
        }
        (None, Err(_)) => {
            let t = cpu_tokens(method, &shape);
            println!(
                "tokens: {t} (no --tokens: on the CPU the f64 reference and its per-expert check run \
                 the whole d x f FFN per token and slot, so the count keeps them near {CPU_RUN_MADDS:.1e} \
                 multiply-adds, about 20 s on 2 cores; at most 2048)"
            );
            t
        }
    };
    println!(
        "block: {method} d={} f={} E={} r={} slots/token={} activation={} T={tokens} dtype={}",
        spec.d,
        spec.f,
        spec.experts,
        shape.rank,
        spec.slots(),
        spec.activation,
        args.dtype
    );
    if tokens == 0 {
        println!("tokens = 0: nothing to run (a no-op), so no time or throughput to report");
        return Ok(());
    }
    match device {
        Ok(device) => {
            println!(
                "backend: GPU {} (the block runtime: cuBLAS for the dense projections, mole kernels)",
                device.name()
            );
            match args.dtype {
                DType::F32 => gpu_typed::<f32>(&device, &spec, tokens, args),
                DType::F16 => gpu_typed::<half::f16>(&device, &spec, tokens, args),
                DType::BF16 => gpu_typed::<half::bf16>(&device, &spec, tokens, args),
            }
        }
        Err(e) => {
            println!("backend: CPU ({e})");
            match args.dtype {
                DType::F32 => run_typed::<f32>(&spec, tokens, args),
                DType::F16 => run_typed::<half::f16>(&spec, tokens, args),
                DType::BF16 => run_typed::<half::bf16>(&spec, tokens, args),
            }
        }
    }
}

/// The GPU path: the block runtime on device copies of the synthetic inputs, checked against the
/// f64 reference on at most `mole::autotune::CHECK_TOKENS` tokens spread over the batch (`DeviceFfn::check`:
/// tolerance from the dtype and the reductions over d and f), timed as the median of 20
/// event-timed forwards.
fn gpu_typed<T: KernelElement + DeviceRepr>(
    device: &Device,
    spec: &FfnSpec,
    tokens: usize,
    args: &RunArgs,
) -> Result<()> {
    let what = format!("mole run --tokens {tokens} --d {} --f {} (the block's inputs)", spec.d, spec.f);
    limits::check_host(&what, SyntheticFfn::<T>::bytes(spec, tokens)?)?;
    let data = SyntheticFfn::<T>::new(spec, tokens, args.seed);
    let mut block = DeviceFfn::new(device, spec, data, None)?;
    let check = block.check()?;
    let work = block.work()?;
    let timing = time_on_device(device, 3, 20, || block.forward())?;
    let copy_gbs = copy_bandwidth_gbs(device, 1 << 30)?;
    let outcome = Outcome {
        path: "GPU FFN block (cuBLAS + mole kernels)".into(),
        max_err: Some(check.error),
        time: timing.median_ms() * 1e-3,
        tol: check.tolerance,
        element_bytes: T::DTYPE.size_bytes(),
        copy_gbs: Some(copy_gbs),
    };
    let label = format!(
        "f64 on {} of the {tokens} tokens, spread over the batch; the worst {} left out",
        check.tokens, check.left_out
    );
    report(&outcome, tokens, work.flops, work.bytes, (&label, check.reference_seconds))
}

fn run_typed<T: Scalar>(spec: &FfnSpec, tokens: usize, args: &RunArgs) -> Result<()> {
    // The synthetic inputs, then the f64 copies of the reference and of the check, before any.
    let f64_copies = SyntheticFfn::<f64>::bytes(spec, tokens)?.saturating_mul(2);
    let outputs = limits::Footprint::new().add("y and a_mix, twice", &[4, tokens, spec.d + spec.f], 8)?.bytes();
    let need = SyntheticFfn::<T>::bytes(spec, tokens)?.saturating_add(f64_copies).saturating_add(outputs);
    let what =
        format!("mole run --tokens {tokens} --d {} --f {} (inputs, the f64 reference and its check)", spec.d, spec.f);
    limits::check_host(&what, need)?;
    let data = SyntheticFfn::<T>::new(spec, tokens, args.seed);

    let start = Instant::now();
    let reference = ffn_forward(spec, &data.inputs(tokens))?;
    let ref_time = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let y = per_expert(spec, &data, &reference.routing);
    let time = start.elapsed().as_secs_f64();
    let max_err = Some(max_scaled_error(&y, &reference.y));
    // Both sides are f64: the bound is f64 roundoff over the longest reduction.
    let tol = tolerance_with(f64::EPSILON / 2.0, f64::EPSILON / 2.0, spec.d + spec.f) * 16.0;
    let path = "CPU per expert, as MixLoRA runs it (f64)".into();
    let outcome = Outcome { path, max_err, time, tol, element_bytes: 8, copy_gbs: None };

    // Useful work: the base gate, up and down once per token, every selected expert's LoRA.
    let (t, d, f) = (tokens as f64, spec.d as f64, spec.f as f64);
    let lora_cols: f64 = spec.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.total_rank() as f64).sum();
    let selected = reference.routing.ids.iter().filter(|&&id| id >= 0).count() as f64;
    let flops = 2.0 * (3.0 * t * d * f + selected * lora_cols / spec.experts as f64 * (d + f));
    let weights = 3.0 * d * f + lora_cols * (d + f) + d * spec.experts as f64;
    let bytes = outcome.element_bytes as f64 * (2.0 * t * d + weights);
    report(&outcome, tokens, flops, bytes, ("f64, base down once on a_mix", ref_time))
}

/// The block as MixLoRA's code runs it (`MixtralSparseMoe.forward`): per expert, the tokens routed
/// to it, its whole LoRA FFN on them (`act(x·W_g + s·x·A_g·B_g) ⊙ (x·W_u + ...)`, then the down
/// projection with its LoRA), and `y[token] += w · out`; f64, the base down once per slot.
fn per_expert<T: Scalar>(spec: &FfnSpec, data: &SyntheticFfn<T>, routing: &Routing) -> Vec<f64> {
    let (d, f) = (spec.d, spec.f);
    let x = to_f64_vec(&data.x);
    let base = data.base.each_ref().map(|w| to_f64_vec(w));
    let banks = data.banks.each_ref().map(|b| b.as_ref().map(|(a, b)| (to_f64_vec(a), to_f64_vec(b))));
    let loras = spec.projections().map(|(_, l)| l);
    let mut y = vec![0.0; routing.tokens * d];
    for e in 0..spec.experts {
        let rows: Vec<(usize, f64)> = (0..routing.ids.len())
            .filter(|&i| routing.ids[i] == e as i32)
            .map(|i| (i / routing.slots, routing.weights[i]))
            .collect();
        let n = rows.len();
        if n == 0 {
            continue;
        }
        // `v [n, n_in] · W_p + s_p · (v · A_p[:, cols_e]) · B_p[cols_e, :]` for projection p.
        let project = |p: usize, v: &[f64], n_in: usize, n_out: usize| -> Vec<f64> {
            let mut out = matmul(v, &base[p], n, n_in, n_out);
            if let (Some(lora), Some((a, b))) = (loras[p], &banks[p]) {
                let (cols, r) = (lora.ranks.cols(e), lora.ranks.total_rank());
                let a_e: Vec<f64> = a.chunks(r).flat_map(|row| row[cols.clone()].iter().copied()).collect();
                let h = matmul(v, &a_e, n, n_in, cols.len());
                let delta = matmul(&h, &b[cols.start * n_out..cols.end * n_out], n, cols.len(), n_out);
                out.iter_mut().zip(delta).for_each(|(o, dl)| *o += lora.scale * dl);
            }
            out
        };
        let xe: Vec<f64> = rows.iter().flat_map(|&(t, _)| x[t * d..(t + 1) * d].iter().copied()).collect();
        let (g, u) = (project(0, &xe, d, f), project(1, &xe, d, f));
        let a: Vec<f64> = g.iter().zip(&u).map(|(&g, u)| spec.activation.apply(g) * u).collect();
        let out = project(2, &a, f, d);
        for (&(t, w), o) in rows.iter().zip(out.chunks(d)) {
            y[t * d..(t + 1) * d].iter_mut().zip(o).for_each(|(y, o)| *y += w * o);
        }
    }
    y
}
