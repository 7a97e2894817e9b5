//! Timing one candidate on the device: warm-up outside the timing (compilation and first touch),
//! an L2 flush before every timed run (outside the event pair), CUDA events around the run only,
//! and the median of many runs. Every strategy plugs in through [`TunableRun`].

use crate::autotune::{check_tokens, DeviceFfn, DeviceLayer};
use crate::cuda::{cuda_err, Device};
use crate::kernels::{Family, KernelBuild};
use crate::model::{FfnSpec, LayerSpec};
use crate::runtime::{Choice, ChoiceSource};
use crate::synth::{SyntheticFfn, SyntheticLayer};
use crate::tune::Strategy;
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::DeviceRepr;
use std::sync::Arc;

/// One prepared forward of a layer on the device, as the tuner drives it.
pub trait TunableRun {
    /// Enqueues one forward on the device's stream (no synchronisation).
    fn run(&mut self) -> Result<()>;
    /// Runs one forward from fresh inputs and compares it with the f64 reference:
    /// `(max scaled error, tolerance)`; the candidate is correct when `error <= tolerance`.
    fn check(&mut self) -> Result<(f64, f64)>;
    /// Bytes one forward must move (for GB/s).
    fn bytes(&self) -> f64;
}

/// How a candidate is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasureOptions {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs (the median is reported); at least 1.
    pub runs: usize,
    /// Write a buffer of twice the L2 size before each timed run.
    pub flush_l2: bool,
}

impl Default for MeasureOptions {
    /// 5 warm-up runs, 50 timed runs, L2 flushed.
    fn default() -> Self {
        MeasureOptions { warmup: 5, runs: 50, flush_l2: true }
    }
}

/// The timed runs of one candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Median of `samples`, ms.
    pub median_ms: f64,
    /// Every timed run, ms, in run order.
    pub samples: Vec<f64>,
}

impl Measurement {
    /// A measurement of `samples` (NaN median when empty).
    pub fn from_samples(samples: Vec<f64>) -> Self {
        Measurement { median_ms: median(&samples), samples }
    }

    /// `bytes` per median run, in GB/s.
    pub fn gbs(&self, bytes: f64) -> f64 {
        bytes / (self.median_ms * 1e-3) / 1e9
    }
}

/// The median of `samples` (mean of the middle two for an even count; NaN when empty).
pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// L2 size assumed when the driver does not report one.
pub const FALLBACK_L2_BYTES: usize = 64 << 20;

/// The device's L2 size (`CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE`), or [`FALLBACK_L2_BYTES`].
pub fn l2_cache_bytes(device: &Device) -> usize {
    match device.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE) {
        Ok(b) if b > 0 => b as usize,
        _ => FALLBACK_L2_BYTES,
    }
}

/// Times `run`: `warmup` untimed runs, then `runs` runs each preceded (outside the timing) by an
/// L2 flush when asked and bracketed by a pair of CUDA events.
pub fn measure(device: &Device, run: &mut dyn TunableRun, opts: &MeasureOptions) -> Result<Measurement> {
    if opts.runs == 0 {
        return Err(MoleError::param("runs", opts.runs, "must be positive"));
    }
    let stream = device.stream();
    for _ in 0..opts.warmup {
        run.run()?;
    }
    let mut flush = match opts.flush_l2 {
        true => Some(stream.alloc_zeros::<u8>(2 * l2_cache_bytes(device)).map_err(cuda_err("cuMemAlloc"))?),
        false => None,
    };
    stream.synchronize().map_err(cuda_err("cuStreamSynchronize"))?;
    let ctx = device.context();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = ctx.new_event(flags).map_err(cuda_err("cuEventCreate"))?;
    let end = ctx.new_event(flags).map_err(cuda_err("cuEventCreate"))?;
    let mut samples = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs {
        if let Some(buf) = flush.as_mut() {
            stream.memset_zeros(buf).map_err(cuda_err("cuMemsetD8Async"))?;
        }
        start.record(stream).map_err(cuda_err("cuEventRecord"))?;
        run.run()?;
        end.record(stream).map_err(cuda_err("cuEventRecord"))?;
        // Synchronises on both events, so they can be recorded again.
        samples.push(start.elapsed_ms(&end).map_err(cuda_err("cuEventElapsedTime"))? as f64);
    }
    Ok(Measurement::from_samples(samples))
}

/// Seed of the random inputs every candidate of a shape is checked and timed on.
pub const DATA_SEED: u64 = 0x7E57_AB1E;

/// The synthetic data every candidate of a shape runs on.
fn shape_data<T: KernelElement>(spec: &LayerSpec, tokens: usize) -> SyntheticLayer<T> {
    SyntheticLayer::new(spec, tokens, DATA_SEED)
}

/// The f64 reference output `y` of a shape's data ([`prepare_run`] checks every candidate
/// against it; computing it once per shape keeps large shapes affordable).
pub fn reference_y(spec: &LayerSpec, dtype: DType, tokens: usize) -> Result<Arc<Vec<f64>>> {
    fn typed<T: KernelElement>(spec: &LayerSpec, tokens: usize) -> Result<Arc<Vec<f64>>> {
        Ok(Arc::new(crate::reference::forward(spec, &shape_data::<T>(spec, tokens).inputs())?.y))
    }
    match dtype {
        DType::F32 => typed::<f32>(spec, tokens),
        DType::F16 => typed::<half::f16>(spec, tokens),
        DType::BF16 => typed::<half::bf16>(spec, tokens),
    }
}

fn device_layer<'d, T: KernelElement + DeviceRepr>(
    device: &'d Device,
    spec: &LayerSpec,
    tokens: usize,
    choice: Choice,
    reference: Option<Arc<Vec<f64>>>,
) -> Result<Box<dyn TunableRun + 'd>> {
    let layer = DeviceLayer::new(device, spec, shape_data::<T>(spec, tokens), choice)?;
    Ok(Box::new(match reference {
        Some(y) => layer.with_reference(y)?,
        None => layer,
    }))
}

/// Prepares `spec` over `tokens` tokens to run with `strategy` and `build` on `device`: a whole
/// layer ([`DeviceLayer`]) in every strategy, so candidates are compared on the same work
/// (routing included), on the same data. `reference` is the shape's [`reference_y`] (computed
/// by the run's first check when `None`). Grouped candidates run sgmv builds (after the
/// route-only fused launch and the device slot plans), fused ones fused builds; a strategy that
/// cannot run the layer (grouped for a core-merge mix or an h router) is an error, which the
/// tuner records.
pub fn prepare_run<'d>(
    device: &'d Device,
    spec: &LayerSpec,
    strategy: Strategy,
    build: &KernelBuild,
    tokens: usize,
    reference: Option<Arc<Vec<f64>>>,
) -> Result<Box<dyn TunableRun + 'd>> {
    let family = match strategy {
        Strategy::Grouped => Family::Sgmv,
        Strategy::Fused | Strategy::FusedSplit => Family::Fused,
        Strategy::FfnBlock => {
            return Err(MoleError::param("strategy", strategy, "runs an FFN-expert block, not a layer"))
        }
    };
    if build.family() != family {
        return Err(MoleError::param("build", build, "is not a build of the strategy's kernel family"));
    }
    let choice = Choice { strategy, build: build.clone(), source: ChoiceSource::Tuned };
    match build.dtype {
        DType::F32 => device_layer::<f32>(device, spec, tokens, choice, reference),
        DType::F16 => device_layer::<half::f16>(device, spec, tokens, choice, reference),
        DType::BF16 => device_layer::<half::bf16>(device, spec, tokens, choice, reference),
    }
}

/// The f64 reference `y` of a block's data over its first [`check_tokens`] tokens (what
/// [`prepare_block_run`] checks every candidate against; computed once per shape).
pub fn block_reference_y(spec: &FfnSpec, dtype: DType, tokens: usize) -> Result<Arc<Vec<f64>>> {
    fn typed<T: KernelElement>(spec: &FfnSpec, tokens: usize) -> Result<Arc<Vec<f64>>> {
        let data = SyntheticFfn::<T>::new(spec, tokens, DATA_SEED);
        Ok(Arc::new(crate::reference::ffn_forward(spec, &data.inputs(check_tokens(spec, tokens)))?.y))
    }
    match dtype {
        DType::F32 => typed::<f32>(spec, tokens),
        DType::F16 => typed::<half::f16>(spec, tokens),
        DType::BF16 => typed::<half::bf16>(spec, tokens),
    }
}

fn device_ffn<'d, T: KernelElement + DeviceRepr>(
    device: &'d Device,
    spec: &FfnSpec,
    tokens: usize,
    build: &KernelBuild,
    reference: Option<Arc<Vec<f64>>>,
) -> Result<Box<dyn TunableRun + 'd>> {
    let block = DeviceFfn::new(device, spec, SyntheticFfn::<T>::new(spec, tokens, DATA_SEED), Some(build.clone()))?;
    Ok(Box::new(match reference {
        Some(y) => block.with_reference(y)?,
        None => block,
    }))
}

/// Prepares the FFN-expert block `spec` over `tokens` tokens to run the ffn build `build` (with
/// its SGMV pair, `kernels::ffn::sgmv_build_for`) on `device`: the whole block ([`DeviceFfn`]:
/// routing, slot plans, cuBLAS base projections, the block's kernels), on the same data for every
/// candidate. `reference` is the shape's [`block_reference_y`] (computed by the first check when
/// `None`). Errors for a build the block cannot run.
pub fn prepare_block_run<'d>(
    device: &'d Device,
    spec: &FfnSpec,
    build: &KernelBuild,
    tokens: usize,
    reference: Option<Arc<Vec<f64>>>,
) -> Result<Box<dyn TunableRun + 'd>> {
    match build.dtype {
        DType::F32 => device_ffn::<f32>(device, spec, tokens, build, reference),
        DType::F16 => device_ffn::<half::f16>(device, spec, tokens, build, reference),
        DType::BF16 => device_ffn::<half::bf16>(device, spec, tokens, build, reference),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        let m = Measurement::from_samples(vec![2.0, 1.0, 100.0]);
        assert_eq!(m.median_ms, 2.0);
        assert_eq!(m.gbs(2e6), 1.0); // 2 MB in 2 ms
    }
}
