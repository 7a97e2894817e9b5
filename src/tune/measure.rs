//! Timing one candidate on the device: warm-up outside the timing (compilation and first touch),
//! an L2 flush before every timed run (outside the event pair), CUDA events around the run only,
//! and the median of many runs. Every strategy plugs in through [`TunableRun`].

use super::Strategy;
use crate::bench::{max_scaled_error, random_routing, GroupedData, GroupedRun};
use crate::cuda::{cuda_err, Device};
use crate::kernels::{Family, KernelBuild};
use crate::layer::{Choice, ChoiceSource, DeviceLayer};
use crate::model::{LayerSpec, Mix};
use crate::reference::{self, Routing};
use crate::synth::Rng;
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::DeviceRepr;

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

/// Random inputs of a grouped forward of `spec` over `tokens` tokens, seeded by `seed`:
/// unit-scale `x` and `y`, weights scaled by `1/sqrt(fan_in)`, the spec's rank layout and scale,
/// and `spec.slots()` distinct uniform experts per token. A CoMoL layer (core merge) is its
/// shrink and expand: one bank expert of rank `R`, one slot of weight 1 (the core merge itself
/// is not part of the grouped kernels).
pub fn grouped_data<T: KernelElement>(spec: &LayerSpec, tokens: usize, seed: u64) -> Result<GroupedData<T>> {
    spec.validate()?;
    let mut rng = Rng::new(seed ^ tokens as u64);
    let ranks = spec.ranks.clone();
    let (d_in, d_out, r) = (spec.d_in, spec.d_out, ranks.total_rank());
    let r_max = (0..ranks.num_experts()).map(|e| ranks.cols(e).len()).max().unwrap_or(1).max(1);
    let routing = match spec.mix {
        Mix::ExpertScale => random_routing(tokens, ranks.num_experts(), spec.slots(), &mut rng),
        Mix::CoreMerge { .. } => Routing {
            tokens,
            slots: 1,
            experts: ranks.num_experts(),
            ids: vec![0; tokens],
            weights: vec![1.0; tokens],
            probs: None,
        },
    };
    Ok(GroupedData {
        x: rng.fill(tokens * d_in, 1.0),
        a: rng.fill(d_in * r, (3.0 / d_in as f64).sqrt()),
        b: rng.fill(r * d_out, (3.0 / r_max as f64).sqrt()),
        y: rng.fill(tokens * d_out, 1.0),
        routing,
        ranks,
        d_in,
        d_out,
        scale: spec.scale,
    })
}

/// Bytes a grouped forward of `data` must move in `dtype`: `x` once per slot, `A` and `B` of
/// every expert that received a token once, `y` read and written once.
pub fn grouped_bytes<T>(data: &GroupedData<T>, dtype: DType) -> f64 {
    let r = &data.routing;
    let mut touched = vec![false; data.ranks.num_experts()];
    r.ids.iter().filter_map(|&id| usize::try_from(id).ok()).for_each(|e| {
        if let Some(t) = touched.get_mut(e) {
            *t = true;
        }
    });
    let ranks: usize = touched.iter().enumerate().filter(|(_, &t)| t).map(|(e, _)| data.ranks.cols(e).len()).sum();
    let el = dtype.size_bytes() as f64;
    let elements = r.tokens * r.slots * data.d_in + ranks * (data.d_in + data.d_out) + 2 * r.tokens * data.d_out;
    el * elements as f64
}

/// The tolerance of a grouped forward of `data` in `dtype` against the f64 reference.
pub fn grouped_tolerance<T>(data: &GroupedData<T>, dtype: DType) -> f64 {
    let r_max = (0..data.ranks.num_experts()).map(|e| data.ranks.cols(e).len()).max().unwrap_or(0);
    reference::tolerance(dtype, data.d_in + r_max) * (data.routing.slots as f64 + 1.0) * data.scale.abs().max(1.0)
}

/// The grouped (SGMV) path as a [`TunableRun`].
pub struct GroupedTunable<'d, T: DeviceRepr> {
    run: GroupedRun<'d, T>,
    bytes: f64,
    tolerance: f64,
}

impl<'d, T: KernelElement + DeviceRepr> GroupedTunable<'d, T> {
    /// Uploads `data` to run with `build` (an sgmv build of dtype `T`).
    pub fn new(device: &'d Device, data: GroupedData<T>, build: KernelBuild) -> Result<Self> {
        let bytes = grouped_bytes(&data, T::DTYPE);
        let tolerance = grouped_tolerance(&data, T::DTYPE);
        Ok(GroupedTunable { run: GroupedRun::with_build(device, data, build)?, bytes, tolerance })
    }
}

impl<T: KernelElement + DeviceRepr> TunableRun for GroupedTunable<'_, T> {
    fn run(&mut self) -> Result<()> {
        self.run.forward()
    }

    fn check(&mut self) -> Result<(f64, f64)> {
        let (got, want) = self.run.check()?;
        Ok((max_scaled_error(&got, &want), self.tolerance))
    }

    fn bytes(&self) -> f64 {
        self.bytes
    }
}

/// Seed of the random inputs every candidate of a shape is checked and timed on.
pub const DATA_SEED: u64 = 0x7E57_AB1E;

/// A layer on the device with synthetic data for a fused candidate.
fn fused_layer<'d, T: KernelElement + DeviceRepr>(
    device: &'d Device,
    spec: &LayerSpec,
    tokens: usize,
    choice: Choice,
) -> Result<DeviceLayer<'d, T>> {
    DeviceLayer::new(device, spec, crate::synth::SyntheticLayer::new(spec, tokens, DATA_SEED), choice)
}

/// Prepares `spec` over `tokens` tokens to run with `strategy` and `build` on `device`.
///
/// This is where a strategy plugs in: one arm per [`Strategy`]. The fused strategies run a
/// [`DeviceLayer`] (fused builds), the grouped one the SGMV kernels on a given routing.
pub fn prepare_run<'d>(
    device: &'d Device,
    spec: &LayerSpec,
    strategy: Strategy,
    build: &KernelBuild,
    tokens: usize,
) -> Result<Box<dyn TunableRun + 'd>> {
    match strategy {
        Strategy::Grouped => {
            if build.family != Family::Sgmv {
                return Err(MoleError::param("build", build, "the grouped strategy runs sgmv builds"));
            }
            let b = build.clone();
            Ok(match build.dtype {
                DType::F32 => Box::new(GroupedTunable::<f32>::new(device, grouped_data(spec, tokens, DATA_SEED)?, b)?),
                DType::F16 => {
                    Box::new(GroupedTunable::<half::f16>::new(device, grouped_data(spec, tokens, DATA_SEED)?, b)?)
                }
                DType::BF16 => {
                    Box::new(GroupedTunable::<half::bf16>::new(device, grouped_data(spec, tokens, DATA_SEED)?, b)?)
                }
            })
        }
        Strategy::Fused | Strategy::FusedSplit => {
            if build.family != Family::Fused {
                return Err(MoleError::param("build", build, "the fused strategies run fused builds"));
            }
            let choice = Choice { strategy, build: build.clone(), source: ChoiceSource::Tuned };
            Ok(match build.dtype {
                DType::F32 => Box::new(fused_layer::<f32>(device, spec, tokens, choice)?),
                DType::F16 => Box::new(fused_layer::<half::f16>(device, spec, tokens, choice)?),
                DType::BF16 => Box::new(fused_layer::<half::bf16>(device, spec, tokens, choice)?),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape};
    use crate::plan::RoutingPlan;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        let m = Measurement::from_samples(vec![2.0, 1.0, 100.0]);
        assert_eq!(m.median_ms, 2.0);
        assert_eq!(m.gbs(2e6), 1.0); // 2 MB in 2 ms
    }

    fn spec(m: Method, experts: usize, rank: usize, k: usize) -> LayerSpec {
        m.spec(MethodShape { d_in: 32, d_out: 24, experts, rank, k, alpha: 16.0 }).unwrap()
    }

    #[test]
    fn grouped_data_follows_the_spec() {
        let s = spec(Method::MixLora, 8, 4, 2);
        let d = grouped_data::<f32>(&s, 10, DATA_SEED).unwrap();
        assert_eq!((d.x.len(), d.a.len(), d.b.len(), d.y.len()), (320, 32 * 32, 32 * 24, 240));
        assert_eq!((d.routing.slots, d.routing.experts), (2, 8));
        assert!(RoutingPlan::build(&d.routing.ids, 10, 2, 8, 1).is_ok());
        // Deterministic: every candidate of a shape sees the same data.
        assert_eq!(grouped_data::<f32>(&s, 10, DATA_SEED).unwrap().x, d.x);
        // Dense dynamic rules route every token to every expert.
        let dense = grouped_data::<f32>(&spec(Method::DynMole, 6, 4, 2), 5, 1).unwrap();
        assert_eq!(dense.routing.slots, 6);
        // CoMoL: the shrink and expand of the shared expert.
        let comol = grouped_data::<f32>(&spec(Method::Comol, 8, 4, 2), 5, 1).unwrap();
        assert_eq!((comol.routing.slots, comol.routing.experts, comol.a.len()), (1, 1, 32 * 4));
        assert!(comol.routing.ids.iter().all(|&i| i == 0));
    }

    #[test]
    fn grouped_bytes_by_hand() {
        let s = spec(Method::MixLora, 8, 4, 2);
        let d = grouped_data::<f32>(&s, 1, 3).unwrap();
        // 1 token, 2 slots: x 2*32, two experts of rank 4 touched: 8*(32+24), y 2*24; f32.
        assert_eq!(grouped_bytes(&d, DType::F32), 4.0 * (64.0 + 8.0 * 56.0 + 48.0));
        assert!(grouped_tolerance(&d, DType::BF16) > grouped_tolerance(&d, DType::F32));
    }
}
