//! `mole run`: the main job. A realistic layer through the best available backend, checked
//! against the f64 reference, with time and throughput.

use clap::Args;
use cudarc::driver::DeviceRepr;
use mole::autotune::DeviceLayer;
use mole::model::{Knob, LayerSpec, Method, MethodShape, Mix};
use mole::plan::RoutingPlan;
use mole::reference::max_scaled_error;
use mole::reference::LayerOutput;
use mole::reference::{self, Bank};
use mole::runtime::ChoiceSource;
use mole::synth::SyntheticLayer;
use mole::{limits, DType, KernelElement, MoleError, Result};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct RunArgs {
    /// Method preset.
    #[arg(long, value_enum, default_value_t = Method::MixLoraPerLinear)]
    method: Method,
    /// Tokens (0 is a no-op: nothing runs and no throughput is printed).
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Model dimension (d_in = d_out).
    #[arg(long, default_value_t = 4096)]
    d: usize,
    /// Experts (adapters, rank groups for smora, cores for comol) [default: 8].
    #[arg(long)]
    experts: Option<usize>,
    /// Rank per expert; not taken by fly-lora, whose experts are single ranks [default: 16].
    #[arg(long)]
    rank: Option<usize>,
    /// Experts per token, 1..=experts; taken only by the top-k methods (mix-lora-per-linear, meteo-ra,
    /// flex-olmo, x-lora, smora, fly-lora, comol) [default: 2].
    #[arg(long)]
    k: Option<usize>,
    /// Storage dtype of the inputs.
    #[arg(long, value_enum, default_value_t = DType::BF16)]
    dtype: DType,
    /// Seed of the synthetic inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The preset's shape from the knobs: defaults where a knob is not given, and an error naming
/// a knob given to a method that does not read it.
fn method_shape(args: &RunArgs) -> Result<MethodShape> {
    let method = args.method;
    for (knob, flag, given) in [(Knob::Rank, "--rank", args.rank), (Knob::K, "--k", args.k)] {
        if let (false, Some(v)) = (method.uses(knob), given) {
            return Err(MoleError::Unsupported(format!(
                "{flag} {v}: {method} does not take {flag} ({}); leave it out",
                match knob {
                    Knob::Rank => "its experts are single ranks",
                    _ => "its rule decides how many experts each token gets",
                }
            )));
        }
    }
    limits::check_max("--d", args.d, limits::MAX_DIM)?;
    limits::check_max("--tokens", args.tokens, limits::MAX_TOKENS)?;
    let rank = args.rank.unwrap_or(if method.uses(Knob::Rank) { 16 } else { 1 });
    let (experts, k) = (args.experts.unwrap_or(8), args.k.unwrap_or(2));
    Ok(MethodShape { d_in: args.d, d_out: args.d, experts, rank, k, alpha: 2.0 * rank as f64 })
}

pub fn run(args: &RunArgs) -> Result<()> {
    let spec = args.method.spec(method_shape(args)?)?;
    println!(
        "layer: {} d_in={} d_out={} E={} R={} slots/token={} T={} dtype={}",
        args.method,
        spec.d_in,
        spec.d_out,
        spec.routed_experts(),
        spec.total_rank(),
        spec.slots(),
        args.tokens,
        args.dtype
    );
    if args.tokens == 0 {
        println!("tokens = 0: nothing to run (a no-op), so no time or throughput to report");
        return Ok(());
    }
    match mole::cuda::Device::new(0) {
        Ok(d) => println!("backend: GPU {} (the layer API: fused or grouped kernels)", d.name()),
        Err(e) => println!("backend: CPU ({e})"),
    }
    match args.dtype {
        DType::F32 => run_typed::<f32>(&spec, args),
        DType::F16 => run_typed::<half::f16>(&spec, args),
        DType::BF16 => run_typed::<half::bf16>(&spec, args),
    }
}

fn run_typed<T: KernelElement + DeviceRepr>(spec: &LayerSpec, args: &RunArgs) -> Result<()> {
    // The synthetic inputs, the f64 reference and the CPU path's f64 copies, before any of them.
    let ref_bytes = mole::reference::host_bytes(spec, args.tokens)?;
    let need = SyntheticLayer::<T>::bytes(spec, args.tokens)?.saturating_add(ref_bytes.saturating_mul(2));
    let what = format!("mole run --tokens {} --d {} (inputs, the f64 reference and its check)", args.tokens, args.d);
    limits::check_host(&what, need)?;
    let data = SyntheticLayer::<T>::new(spec, args.tokens, args.seed);
    let inputs = data.inputs();

    let start = Instant::now();
    let reference = reference::forward(spec, &inputs)?;
    let ref_time = start.elapsed().as_secs_f64();

    let device = mole::cuda::Device::new(0).ok();
    let Outcome { path, max_err, time, tol, element_bytes } = match &device {
        Some(device) => gpu_layer(device, spec, &data, &reference.y)?,
        None => cpu_path(spec, &data, &reference, ref_time)?,
    };

    let selected: usize = reference.routing.ids.iter().filter(|&&id| id >= 0).count();
    let active_rank = selected as f64 * spec.total_rank() as f64 / spec.routed_experts() as f64;
    let flops = 2.0 * active_rank * (spec.d_in + spec.d_out) as f64;
    let (t, r) = (args.tokens as f64, spec.total_rank() as f64);
    let bytes = element_bytes as f64 * (t * (spec.d_in + 2 * spec.d_out) as f64 + r * (spec.d_in + spec.d_out) as f64);
    println!("path: {path}");
    println!(
        "time: {:.3} ms  ({:.0} tokens/s, {:.2} GFLOP/s useful, {:.2} GB/s of the {:.1} MB that must move)",
        time * 1e3,
        args.tokens as f64 / time,
        flops / time / 1e9,
        bytes / time / 1e9,
        bytes / 1e6
    );
    println!("reference (dense f64): {:.3} ms", ref_time * 1e3);
    let Some(max_err) = max_err else {
        println!("check: none (this path is the f64 reference itself; a GPU runs the kernels)");
        return Ok(());
    };
    println!("check: max scaled error {max_err:.3e} (tolerance {tol:.3e})");
    if max_err > tol {
        return Err(MoleError::Unsupported(format!("result differs from the reference: {max_err:.3e} > {tol:.3e}")));
    }
    println!("check: PASS");
    Ok(())
}

/// What a backend ran, how long it took and how far it is from the reference.
struct Outcome {
    path: String,
    /// Max scaled error against the f64 reference (`|got - want| / (1 + |want|)`); `None` where
    /// the path is the reference itself.
    max_err: Option<f64>,
    /// Seconds per forward.
    time: f64,
    tol: f64,
    /// Bytes per element of the data the path moves (the storage dtype, or 8 for f64).
    element_bytes: usize,
}

/// The CPU path: the grouped formulation (per-expert segments of the routing plan, the strategy
/// of the SGMV kernels) in f64; the mixes it does not cover fall back to the dense reference.
fn cpu_path<T: KernelElement>(
    spec: &LayerSpec,
    data: &SyntheticLayer<T>,
    reference: &LayerOutput,
    ref_time: f64,
) -> Result<Outcome> {
    // Both sides are f64: the bound is f64 roundoff over the reduction length.
    let tol = reference::tolerance_with(f64::EPSILON / 2.0, f64::EPSILON / 2.0, spec.d_in + spec.total_rank()) * 16.0;
    if spec.mix != Mix::ExpertScale {
        let path = "CPU dense reference (f64)".into();
        return Ok(Outcome { path, max_err: None, time: ref_time, tol, element_bytes: 8 });
    }
    let f = |v: &[T]| mole::dtype::to_f64_vec(v);
    let (x, a, b, y0) = (f(&data.x), f(&data.a), f(&data.b), f(&data.y));
    let start = Instant::now();
    let routing = &reference.routing;
    let plan = RoutingPlan::build(&routing.ids, routing.tokens, routing.slots, routing.experts, 1)?;
    let bank = Bank {
        a: &a,
        b: &b,
        ranks: &spec.ranks,
        scale: spec.scale,
        expert_scales: spec.expert_scales.as_deref(),
        d_in: spec.d_in,
        d_out: spec.d_out,
    };
    let y = reference::grouped_forward(&x, &y0, bank, routing, &plan);
    let time = start.elapsed().as_secs_f64();
    let max_err = Some(max_scaled_error(&y, &reference.y));
    Ok(Outcome { path: "CPU grouped (f64)".into(), max_err, time, tol, element_bytes: 8 })
}

/// The GPU path: the layer runtime ([`mole::runtime`], through `DeviceLayer`) with the strategy
/// the tuning cache or the heuristic picks; routing, mix and expand all run on the device. Time
/// is the median of 20 event-timed runs.
fn gpu_layer<T: KernelElement + DeviceRepr>(
    device: &mole::cuda::Device,
    spec: &LayerSpec,
    data: &SyntheticLayer<T>,
    reference_y: &[f64],
) -> Result<Outcome> {
    let gpu = mole::tune::GpuId::of_device(device);
    let (cache, warnings) = mole::tune::TuningCache::load_for(&gpu);
    warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    let choice = mole::runtime::choose(spec, T::DTYPE, data.tokens, device.sm_count(), Some(&cache))?;
    let source = if choice.source == ChoiceSource::Tuned { "tuned" } else { "heuristic" };
    let path = format!("GPU {} ({source}; {})", choice.strategy, choice.build);
    let mut layer =
        DeviceLayer::new(device, spec, data.clone(), choice)?.with_reference(Arc::new(reference_y.to_vec()))?;
    // Over all tokens but the worst ceil(T / 512) of large batches: f32 router scores may route
    // a token whose deciding scores tie within f32 rounding differently from the f64 reference.
    let (err, tol) = layer.check()?;
    let timing = mole::cuda::time_on_device(device, 3, 20, || layer.forward())?;
    let element_bytes = std::mem::size_of::<T>();
    Ok(Outcome { path, max_err: Some(err), time: timing.median_ms() * 1e-3, tol, element_bytes })
}
