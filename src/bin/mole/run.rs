//! `mole run`: the main job. A realistic layer (a per-linear preset) or FFN-expert block (a block
//! preset, `run_ffn`) through the best available backend, checked against the f64 reference,
//! with time and throughput.

use crate::run_ffn;
use clap::builder::PossibleValue;
use clap::{Args, ValueEnum};
use cudarc::driver::DeviceRepr;
use mole::autotune::DeviceLayer;
use mole::model::{Activation, FfnMethod, Knob, LayerSpec, Method, MethodShape, Mix};
use mole::plan::RoutingPlan;
use mole::reference::max_scaled_error;
use mole::reference::LayerOutput;
use mole::reference::{self, Bank};
use mole::synth::SyntheticLayer;
use mole::{limits, DType, KernelElement, MoleError, Result};
use std::sync::Arc;
use std::time::Instant;

/// What `mole run --method` names: an FFN-expert block preset or a per-linear preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMethod {
    /// MixLoRA's FFN-expert block (`mix-lora`, `mix-lora-dynamic`).
    Block(FfnMethod),
    /// A preset on one linear layer's LoRA deltas.
    Linear(Method),
}

impl RunMethod {
    /// Every preset `--method` takes: the block presets, then the per-linear ones.
    fn all() -> &'static [RunMethod] {
        static ALL: std::sync::LazyLock<Vec<RunMethod>> = std::sync::LazyLock::new(|| {
            let blocks = FfnMethod::ALL.into_iter().map(RunMethod::Block);
            blocks.chain(Method::ALL.into_iter().map(RunMethod::Linear)).collect()
        });
        &ALL
    }

    fn name(self) -> &'static str {
        match self {
            RunMethod::Block(m) => m.name(),
            RunMethod::Linear(m) => m.name(),
        }
    }
}

impl ValueEnum for RunMethod {
    fn value_variants<'a>() -> &'a [Self] {
        RunMethod::all()
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// Method preset: an FFN-expert block (mix-lora, mix-lora-dynamic: MixLoRA's experts are
    /// whole LoRA FFNs) or a per-linear preset (the routing applied to one linear layer's LoRA).
    #[arg(long, value_enum, default_value = "mix-lora")]
    pub(crate) method: RunMethod,
    /// Tokens (0 is a no-op: nothing runs and no throughput is printed) [default: 2048; for a
    /// block on the CPU, a count that keeps the run to about 20 s on 2 cores].
    #[arg(long)]
    pub(crate) tokens: Option<usize>,
    /// Model dimension (d_in = d_out; the block's d).
    #[arg(long, default_value_t = 4096)]
    pub(crate) d: usize,
    /// The block's intermediate size (block presets only) [default: 11008, LLaMA-2-7B's MLP].
    #[arg(long)]
    pub(crate) f: Option<usize>,
    /// The block's gate activation (block presets only) [default: silu].
    #[arg(long, value_enum)]
    pub(crate) activation: Option<Activation>,
    /// Experts (adapters, rank groups for smora, cores for comol) [default: 8].
    #[arg(long)]
    pub(crate) experts: Option<usize>,
    /// Rank per expert; not taken by fly-lora, whose experts are single ranks [default: 16].
    #[arg(long)]
    pub(crate) rank: Option<usize>,
    /// Experts per token, 1..=experts; taken only by the top-k methods (mix-lora,
    /// mix-lora-per-linear, meteo-ra, flex-olmo, x-lora, smora, fly-lora, comol) [default: 2].
    #[arg(long)]
    pub(crate) k: Option<usize>,
    /// Storage dtype of the inputs.
    #[arg(long, value_enum, default_value_t = DType::BF16)]
    pub(crate) dtype: DType,
    /// Seed of the synthetic inputs.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

/// The error for a knob given to a preset that does not read it.
pub(crate) fn not_taken(flag: &str, value: impl std::fmt::Display, method: &str, why: &str) -> MoleError {
    MoleError::Unsupported(format!("{flag} {value}: {method} does not take {flag} ({why}); leave it out"))
}

/// The preset's shape from the knobs: defaults where a knob is not given, and an error naming
/// a knob given to a method that does not read it.
fn method_shape(method: Method, args: &RunArgs) -> Result<MethodShape> {
    for (knob, flag, given) in [(Knob::Rank, "--rank", args.rank), (Knob::K, "--k", args.k)] {
        if let (false, Some(v)) = (method.uses(knob), given) {
            let why = match knob {
                Knob::Rank => "its experts are single ranks",
                _ => "its rule decides how many experts each token gets",
            };
            return Err(not_taken(flag, v, method.name(), why));
        }
    }
    let block_only = "only the FFN-block presets (mix-lora, mix-lora-dynamic) have it";
    if let Some(f) = args.f {
        return Err(not_taken("--f", f, method.name(), block_only));
    }
    if let Some(a) = args.activation {
        return Err(not_taken("--activation", a, method.name(), block_only));
    }
    limits::check_max("--d", args.d, limits::MAX_DIM)?;
    limits::check_max("--tokens", tokens(args), limits::MAX_TOKENS)?;
    let rank = args.rank.unwrap_or(if method.uses(Knob::Rank) { 16 } else { 1 });
    let (experts, k) = (args.experts.unwrap_or(8), args.k.unwrap_or(2));
    Ok(MethodShape { d_in: args.d, d_out: args.d, experts, rank, k, alpha: 2.0 * rank as f64 })
}

/// The per-linear presets' token count.
fn tokens(args: &RunArgs) -> usize {
    args.tokens.unwrap_or(2048)
}

pub fn run(args: &RunArgs) -> Result<()> {
    let method = match args.method {
        RunMethod::Block(block) => return run_ffn::run(block, args),
        RunMethod::Linear(method) => method,
    };
    let spec = method.spec(method_shape(method, args)?)?;
    println!(
        "layer: {} d_in={} d_out={} E={} R={} slots/token={} T={} dtype={}",
        method,
        spec.d_in,
        spec.d_out,
        spec.routed_experts(),
        spec.total_rank(),
        spec.slots(),
        tokens(args),
        args.dtype
    );
    if tokens(args) == 0 {
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
    let tokens = tokens(args);
    let ref_bytes = mole::reference::host_bytes(spec, tokens)?;
    let need = SyntheticLayer::<T>::bytes(spec, tokens)?.saturating_add(ref_bytes.saturating_mul(2));
    let what = format!("mole run --tokens {tokens} --d {} (inputs, the f64 reference and its check)", args.d);
    limits::check_host(&what, need)?;
    let data = SyntheticLayer::<T>::new(spec, tokens, args.seed);
    let inputs = data.inputs();

    let start = Instant::now();
    let reference = reference::forward(spec, &inputs)?;
    let ref_time = start.elapsed().as_secs_f64();

    let device = mole::cuda::Device::new(0).ok();
    let outcome = match &device {
        Some(device) => gpu_layer(device, spec, &data, &reference.y)?,
        None => cpu_path(spec, &data, &reference, ref_time)?,
    };

    let selected: usize = reference.routing.ids.iter().filter(|&&id| id >= 0).count();
    let active_rank = selected as f64 * spec.total_rank() as f64 / spec.routed_experts() as f64;
    let flops = 2.0 * active_rank * (spec.d_in + spec.d_out) as f64;
    let (t, r) = (tokens as f64, spec.total_rank() as f64);
    let bytes =
        outcome.element_bytes as f64 * (t * (spec.d_in + 2 * spec.d_out) as f64 + r * (spec.d_in + spec.d_out) as f64);
    report(&outcome, tokens, flops, bytes, ("dense f64", ref_time))
}

/// Prints the path, its time and throughput (`flops` useful, `bytes` that must move) and the
/// reference's time (`reference`: its label and seconds), then checks the path's error against
/// its tolerance.
pub(crate) fn report(o: &Outcome, tokens: usize, flops: f64, bytes: f64, reference: (&str, f64)) -> Result<()> {
    println!("path: {}", o.path);
    println!(
        "time: {:.3} ms  ({:.0} tokens/s, {:.2} GFLOP/s useful, {:.2} GB/s of the {:.1} MB that must move)",
        o.time * 1e3,
        tokens as f64 / o.time,
        flops / o.time / 1e9,
        bytes / o.time / 1e9,
        bytes / 1e6
    );
    if let Some(copy) = o.copy_gbs {
        let gbs = bytes / o.time / 1e9;
        println!(
            "throughput: {:.2} TFLOP/s useful; {gbs:.1} GB/s = {:.1}% of the measured copy bandwidth ({copy:.0} GB/s)",
            flops / o.time / 1e12,
            100.0 * gbs / copy
        );
    }
    println!("reference ({}): {:.3} ms", reference.0, reference.1 * 1e3);
    let Some(max_err) = o.max_err else {
        println!("check: none (this path is the f64 reference itself; a GPU runs the kernels)");
        return Ok(());
    };
    println!("check: max scaled error {max_err:.3e} (tolerance {:.3e})", o.tol);
    if max_err > o.tol {
        return Err(MoleError::Unsupported(format!(
            "result differs from the reference: {max_err:.3e} > {:.3e}",
            o.tol
        )));
    }
    println!("check: PASS");
    Ok(())
}

/// What a backend ran, how long it took and how far it is from the reference.
pub(crate) struct Outcome {
    pub(crate) path: String,
    /// Max scaled error against the f64 reference (`|got - want| / (1 + |want|)`); `None` where
    /// the path is the reference itself.
    pub(crate) max_err: Option<f64>,
    /// Seconds per forward.
    pub(crate) time: f64,
    pub(crate) tol: f64,
    /// Bytes per element of the data the path moves (the storage dtype, or 8 for f64).
    pub(crate) element_bytes: usize,
    /// The device's measured copy bandwidth (GB/s), where the path reports its bandwidth and
    /// TFLOP/s against it.
    pub(crate) copy_gbs: Option<f64>,
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
        return Ok(Outcome { path, max_err: None, time: ref_time, tol, element_bytes: 8, copy_gbs: None });
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
    Ok(Outcome { path: "CPU grouped (f64)".into(), max_err, time, tol, element_bytes: 8, copy_gbs: None })
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
    let path = format!("GPU {} ({}; {})", choice.strategy, choice.source.name(), choice.build);
    let mut layer =
        DeviceLayer::new(device, spec, data.clone(), choice)?.with_reference(Arc::new(reference_y.to_vec()))?;
    // Over all tokens but the worst ceil(T / 512) of large batches: f32 router scores may route
    // a token whose deciding scores tie within f32 rounding differently from the f64 reference.
    let (err, tol) = layer.check()?;
    let timing = mole::cuda::time_on_device(device, 3, 20, || layer.forward())?;
    let element_bytes = std::mem::size_of::<T>();
    Ok(Outcome { path, max_err: Some(err), time: timing.median_ms() * 1e-3, tol, element_bytes, copy_gbs: None })
}
