//! `mole bench layer`: every method's layer at d = 4096 over the token counts, through
//! the strategy the library chooses (tuning cache, else heuristic), with the grouped path timed
//! in the same run for the ratio.

use clap::Args;
use cudarc::driver::DeviceRepr;
use mole::cuda::{time_on_device, Device};
use mole::layer::{choose, default_build, Choice, ChoiceSource, DeviceLayer, STANDARD_METHODS};
use mole::model::{LayerSpec, MethodShape, Mix, Router};
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
    for (method, experts, rank, k) in STANDARD_METHODS {
        let shape = MethodShape { d_in: args.d, d_out: args.d, experts, rank, k, alpha: 2.0 * rank as f64 };
        let spec = method.spec(shape)?;
        for &t in &args.tokens {
            let row = match args.dtype {
                DType::F32 => row::<f32>(device, &spec, t, args, &cache, copy_gbs),
                DType::F16 => row::<half::f16>(device, &spec, t, args, &cache, copy_gbs),
                DType::BF16 => row::<half::bf16>(device, &spec, t, args, &cache, copy_gbs),
            };
            match row {
                Ok(r) => println!("{:<18} {t:>6} | {r}", method.to_string()),
                Err(e) => println!("{:<18} {t:>6} | error: {e}", method.to_string()),
            }
        }
    }
    Ok(())
}

/// Median ms of `layer`'s forward.
fn time<T: KernelElement + DeviceRepr>(device: &Device, layer: &mut DeviceLayer<'_, T>, runs: usize) -> Result<f64> {
    Ok(time_on_device(device, 3, runs, || layer.forward())?.median_ms())
}

fn row<T: KernelElement + DeviceRepr>(
    device: &Device,
    spec: &LayerSpec,
    tokens: usize,
    args: &LayerArgs,
    cache: &TuningCache,
    copy_gbs: f64,
) -> Result<String> {
    let choice = choose(spec, T::DTYPE, tokens, device.sm_count(), Some(cache))?;
    let label =
        format!("{} ({})", choice.strategy, if choice.source == ChoiceSource::Tuned { "tuned" } else { "heuristic" });
    let data = SyntheticLayer::<T>::new(spec, tokens, 7);
    let mut layer = DeviceLayer::new(device, spec, data.clone(), choice.clone())?;
    // The f64 reference stays affordable up to a few thousand tokens.
    let check = if tokens <= 4096 {
        let (err, tol) = layer.check()?;
        if err <= tol {
            format!("ok ({err:.1e})")
        } else {
            format!("FAIL ({err:.1e} > {tol:.1e})")
        }
    } else {
        "-".into()
    };
    let ms = time(device, &mut layer, args.runs)?;
    let gbs = layer.bytes() / (ms * 1e-3) / 1e9;
    let grouped_ok = spec.mix == Mix::ExpertScale && !matches!(spec.router(), Some(Router::H { .. } | Router::LowRank));
    let grouped = if choice.strategy != Strategy::Grouped && grouped_ok {
        let g = Choice { strategy: Strategy::Grouped, build: default_build(Strategy::Grouped, T::DTYPE), ..choice };
        let mut layer = DeviceLayer::new(device, spec, data, g)?;
        Some(time(device, &mut layer, args.runs)?)
    } else {
        None
    };
    let (g_ms, ratio) = match grouped {
        Some(g) => (format!("{g:>9.4}"), format!("{:>6.2}x", g / ms)),
        None => (format!("{:>9}", "-"), format!("{:>7}", "-")),
    };
    Ok(format!("{label:<28} {ms:>9.4} {gbs:>8.1} {:>6.1}% | {g_ms} {ratio} | {check}", 100.0 * gbs / copy_gbs))
}
