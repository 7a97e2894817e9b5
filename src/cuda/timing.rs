//! Timing on the device: CUDA events around each run, the median of many, after warm-up; and the
//! device's measured copy bandwidth, the yardstick every memory-bound kernel is reported against.

use super::{cuda_err, Device};
use crate::{MoleError, Result};
use cudarc::driver::sys::CUevent_flags;

/// Run times of one measured operation, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Every timed run, in run order.
    pub samples_ms: Vec<f64>,
}

impl Timing {
    /// The median run time.
    pub fn median_ms(&self) -> f64 {
        let mut s = self.samples_ms.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        }
    }

    /// The fastest run.
    pub fn min_ms(&self) -> f64 {
        self.samples_ms.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

/// Runs `op` `warmup` times untimed (compilation and first-touch costs stay outside), then
/// `runs` times, each bracketed by a pair of events on the device's stream.
pub fn time_on_device(
    device: &Device,
    warmup: usize,
    runs: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    if runs == 0 {
        return Err(MoleError::param("runs", runs, "must be positive"));
    }
    let stream = device.stream();
    for _ in 0..warmup {
        op()?;
    }
    stream.synchronize().map_err(cuda_err("cuStreamSynchronize"))?;
    let ctx = device.context();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut samples_ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = ctx.new_event(flags).map_err(cuda_err("cuEventCreate"))?;
        let end = ctx.new_event(flags).map_err(cuda_err("cuEventCreate"))?;
        start.record(stream).map_err(cuda_err("cuEventRecord"))?;
        op()?;
        end.record(stream).map_err(cuda_err("cuEventRecord"))?;
        samples_ms.push(start.elapsed_ms(&end).map_err(cuda_err("cuEventElapsedTime"))? as f64);
    }
    Ok(Timing { samples_ms })
}

/// Device-to-device copy bandwidth in GB/s (bytes read plus bytes written per second), measured
/// with a `bytes`-byte copy, median of 20 runs.
pub fn copy_bandwidth_gbs(device: &Device, bytes: usize) -> Result<f64> {
    if bytes == 0 {
        return Err(MoleError::ZeroDimension { name: "bytes" });
    }
    let stream = device.stream();
    let src = stream.alloc_zeros::<u8>(bytes).map_err(cuda_err("cuMemAlloc"))?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(cuda_err("cuMemAlloc"))?;
    let t = time_on_device(device, 3, 20, || stream.memcpy_dtod(&src, &mut dst).map_err(cuda_err("cuMemcpyDtoD")))?;
    Ok(2.0 * bytes as f64 / (t.median_ms() * 1e-3) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_min() {
        let t = Timing { samples_ms: vec![3.0, 1.0, 2.0, 10.0] };
        assert_eq!(t.median_ms(), 2.5);
        assert_eq!(t.min_ms(), 1.0);
        assert_eq!(Timing { samples_ms: vec![4.0, 1.0, 2.0] }.median_ms(), 2.0);
        assert!(Timing { samples_ms: vec![] }.median_ms().is_nan());
    }
}
