//! `mole bench layer`: every method's layer at d = 4096 over the token counts, through
//! the strategy the library chooses (tuning cache, else heuristic), with the grouped path timed
//! in the same run for the ratio. With `--backward`, the layer backward instead (after one
//! training forward through the chosen strategy), checked against the f64 reference backward.

use clap::Args;
use cudarc::driver::DeviceRepr;
use mole::autotune::{DeviceBackward, DeviceLayer};
use mole::cuda::{time_on_device, Device};
use mole::model::STANDARD_METHODS;
use mole::model::{LayerSpec, MethodShape, Mix, Router};
use mole::runtime::{choose, default_build, Choice};
use mole::synth::SyntheticLayer;
use mole::tune::{GpuId, Strategy, TuningCache};
use mole::{DType, KernelElement, Result};

#[derive(Args)]
pub struct LayerArgs {
    /// Storage dtype.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Token counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,4096,16384")]
    tokens: Vec<usize>,
    /// Model dimension (d_in = d_out).
    #[arg(long, default_value_t = 4096)]
    d: usize,
    /// Also write every row, machine-readable, to this JSON file (the GPU kit's results).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Time the backward (every gradient of `Σ dy · y`) instead of the forward.
    #[arg(long)]
    backward: bool,
}

/// One measured shape, as written by `--json`.
#[derive(serde::Serialize)]
struct JsonRow {
    method: String,
    pass: &'static str,
    d_in: usize,
    d_out: usize,
    experts: usize,
    rank: usize,
    k: usize,
    tokens: usize,
    dtype: String,
    strategy: Option<String>,
    source: Option<String>,
    time_us: Option<f64>,
    gbs: Option<f64>,
    fraction_of_copy: Option<f64>,
    grouped_time_us: Option<f64>,
    check: Option<Check>,
    error: Option<String>,
}

/// The comparison with the f64 reference.
#[derive(serde::Serialize)]
struct Check {
    error: f64,
    tolerance: f64,
    ok: bool,
}

/// What a row measured, before formatting.
struct Measured {
    choice: Choice,
    ms: f64,
    gbs: f64,
    grouped_ms: Option<f64>,
    check: Option<Check>,
}

pub fn layer(device: &Device, args: &LayerArgs, copy_gbs: f64) -> Result<()> {
    let gpu = GpuId::of_device(device);
    let (cache, warnings) = TuningCache::load_for(&gpu);
    warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    println!("tuning cache: {} fresh entries for {}", cache.len(), gpu.file_name());
    println!(
        "{:<18} {:>6} | {:<28} {:>9} {:>8} {:>7} | {:>9} {:>7} | check",
        "method", "T", "chosen (source)", "time ms", "GB/s", "% copy", "grouped", "ratio"
    );
    let mut rows = Vec::new();
    for (method, experts, rank, k) in STANDARD_METHODS {
        let shape = MethodShape { d_in: args.d, d_out: args.d, experts, rank, k, alpha: 2.0 * rank as f64 };
        let spec = method.spec(shape)?;
        for &t in &args.tokens {
            let measured = match (args.dtype, args.backward) {
                (DType::F32, false) => measure::<f32>(device, &spec, t, args, &cache),
                (DType::F16, false) => measure::<half::f16>(device, &spec, t, args, &cache),
                (DType::BF16, false) => measure::<half::bf16>(device, &spec, t, args, &cache),
                (DType::F32, true) => measure_backward::<f32>(device, &spec, t, args, &cache),
                (DType::F16, true) => measure_backward::<half::f16>(device, &spec, t, args, &cache),
                (DType::BF16, true) => measure_backward::<half::bf16>(device, &spec, t, args, &cache),
            };
            let mut json = JsonRow {
                method: method.to_string(),
                pass: if args.backward { "backward" } else { "forward" },
                d_in: args.d,
                d_out: args.d,
                experts,
                rank,
                k,
                tokens: t,
                dtype: args.dtype.to_string(),
                strategy: None,
                source: None,
                time_us: None,
                gbs: None,
                fraction_of_copy: None,
                grouped_time_us: None,
                check: None,
                error: None,
            };
            match measured {
                Ok(m) => {
                    println!("{:<18} {t:>6} | {}", method.to_string(), format_row(&m, copy_gbs));
                    json.strategy = Some(m.choice.strategy.to_string());
                    json.source = Some(m.choice.source.name().to_string());
                    json.time_us = Some(m.ms * 1e3);
                    json.gbs = Some(m.gbs);
                    json.fraction_of_copy = Some(m.gbs / copy_gbs);
                    json.grouped_time_us = m.grouped_ms.map(|g| g * 1e3);
                    json.check = m.check;
                }
                Err(e) => {
                    println!("{:<18} {t:>6} | error: {e}", method.to_string());
                    json.error = Some(e.to_string());
                }
            }
            rows.push(json);
            // After every row: a run stopped part way still leaves what it measured.
            if let Some(path) = &args.json {
                let doc = serde_json::json!({
                    "device": device.name(),
                    "copy_gbs": copy_gbs,
                    "dtype": args.dtype.to_string(),
                    "rows": rows,
                });
                crate::write_json(path, &doc)?;
            }
        }
    }
    Ok(())
}

/// Median ms of `layer`'s forward.
fn time<T: KernelElement + DeviceRepr>(device: &Device, layer: &mut DeviceLayer<'_, T>, runs: usize) -> Result<f64> {
    Ok(time_on_device(device, 3, runs, || layer.forward())?.median_ms())
}

fn measure<T: KernelElement + DeviceRepr>(
    device: &Device,
    spec: &LayerSpec,
    tokens: usize,
    args: &LayerArgs,
    cache: &TuningCache,
) -> Result<Measured> {
    let choice = choose(spec, T::DTYPE, tokens, device.sm_count(), Some(cache))?;
    let data = SyntheticLayer::<T>::new(spec, tokens, 7);
    let mut layer = DeviceLayer::new(device, spec, data.clone(), choice.clone())?;
    // The f64 reference stays affordable up to a few thousand tokens.
    let check = if tokens <= 4096 {
        let (error, tolerance) = layer.check()?;
        Some(Check { error, tolerance, ok: error <= tolerance })
    } else {
        None
    };
    let ms = time(device, &mut layer, args.runs)?;
    let gbs = layer.bytes() / (ms * 1e-3) / 1e9;
    let grouped_ok = spec.mix == Mix::ExpertScale && !matches!(spec.router(), Some(Router::H { .. } | Router::LowRank));
    let grouped = if choice.strategy != Strategy::Grouped && grouped_ok {
        let g =
            Choice { strategy: Strategy::Grouped, build: default_build(Strategy::Grouped, T::DTYPE), ..choice.clone() };
        let mut layer = DeviceLayer::new(device, spec, data, g)?;
        Some(time(device, &mut layer, args.runs)?)
    } else {
        None
    };
    Ok(Measured { choice, ms, gbs, grouped_ms: grouped, check })
}

/// The backward of `spec` on `tokens` tokens after a training forward through the chosen
/// strategy: checked against the f64 reference backward (up to 256 tokens), then timed. The
/// check's error is reported as the worst error over its tolerance (tolerance 1).
fn measure_backward<T: KernelElement + DeviceRepr>(
    device: &Device,
    spec: &LayerSpec,
    tokens: usize,
    args: &LayerArgs,
    cache: &TuningCache,
) -> Result<Measured> {
    let choice = choose(spec, T::DTYPE, tokens, device.sm_count(), Some(cache))?;
    let data = SyntheticLayer::<T>::new(spec, tokens, 7);
    let mut layer = DeviceBackward::new(device, spec, data, choice.clone(), 8)?;
    // The f64 reference backward costs several of the forward's: checked up to 256 tokens.
    let check = if tokens <= 256 {
        let (ratio, _) = layer.check()?;
        Some(Check { error: ratio, tolerance: 1.0, ok: ratio <= 1.0 })
    } else {
        None
    };
    let ms = time_on_device(device, 3, args.runs, || layer.backward())?.median_ms();
    let gbs = layer.bytes() / (ms * 1e-3) / 1e9;
    Ok(Measured { choice, ms, gbs, grouped_ms: None, check })
}

fn format_row(m: &Measured, copy_gbs: f64) -> String {
    let label = format!("{} ({})", m.choice.strategy, m.choice.source.name());
    let (g_ms, ratio) = match m.grouped_ms {
        Some(g) => (format!("{g:>9.4}"), format!("{:>6.2}x", g / m.ms)),
        None => (format!("{:>9}", "-"), format!("{:>7}", "-")),
    };
    let check = match &m.check {
        Some(c) if c.ok => format!("ok ({:.1e})", c.error),
        Some(c) => format!("FAIL ({:.1e} > {:.1e})", c.error, c.tolerance),
        None => "-".into(),
    };
    format!("{label:<28} {:>9.4} {:>8.1} {:>6.1}% | {g_ms} {ratio} | {check}", m.ms, m.gbs, 100.0 * m.gbs / copy_gbs)
}
