//! Whole layers through the layer API (`mole::autotune::DeviceLayer`) on the GPU against the f64
//! reference: every standard method, every strategy that can run it (fused single launch on
//! tensor cores and FMA widths, fused split, grouped), every dtype, with the tolerance
//! `DeviceLayer::tolerance` (f32 accumulation over `d_in + R`, one or `slots + 1` roundings of
//! `y`). Needs a GPU: without one each test prints a note and returns.

mod gpu;

use mole::autotune::DeviceLayer;
use mole::cuda::Device;
use mole::model::STANDARD_METHODS;
use mole::model::{LayerSpec, MethodShape, Mix, Router};
use mole::runtime::{default_build, Choice, ChoiceSource};
use mole::synth::SyntheticLayer;
use mole::tune::Strategy;
use mole::{DType, KernelElement};

fn device() -> Option<Device> {
    gpu::device_or_skip("the GPU layer tests")
}

fn strategies(spec: &LayerSpec) -> Vec<Strategy> {
    let grouped = spec.mix == Mix::ExpertScale && !matches!(spec.router(), Some(Router::H { .. } | Router::LowRank));
    let mut s = vec![Strategy::Fused, Strategy::FusedSplit];
    if grouped {
        s.push(Strategy::Grouped);
    }
    s
}

fn check<T: KernelElement + cudarc::driver::DeviceRepr>(device: &Device, spec: &LayerSpec, tokens: usize) {
    for strategy in strategies(spec) {
        let choice = Choice { strategy, build: default_build(strategy, T::DTYPE), source: ChoiceSource::Heuristic };
        let data = SyntheticLayer::<T>::new(spec, tokens, 11);
        let mut layer = DeviceLayer::new(device, spec, data, choice).unwrap_or_else(|e| panic!("{strategy}: {e}"));
        let (err, tol) = layer.check().unwrap_or_else(|e| panic!("{strategy}: {e}"));
        assert!(err <= tol, "{} {strategy} T={tokens}: error {err:.3e} > {tol:.3e}", T::DTYPE);
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn every_method_and_strategy_matches_the_reference() {
    let Some(device) = device() else { return };
    // The sanitizer-sized run keeps one token count that fills a partial tile.
    let token_counts: &[usize] = if gpu::quick() { &[37] } else { &[1, 37, 300] };
    for (method, experts, rank, k) in STANDARD_METHODS {
        // Widths that take the tensor-core kernel (multiples of 8) and ones that do not.
        for (d_in, d_out) in [(512, 384), (300, 250)] {
            let shape = MethodShape { d_in, d_out, experts, rank, k, alpha: 2.0 * rank as f64 };
            let spec = method.spec(shape).unwrap();
            for &tokens in token_counts {
                for dtype in DType::ALL {
                    match dtype {
                        DType::F32 => check::<f32>(&device, &spec, tokens),
                        DType::F16 => check::<half::f16>(&device, &spec, tokens),
                        DType::BF16 => check::<half::bf16>(&device, &spec, tokens),
                    }
                }
            }
        }
    }
}

/// Bit patterns of one forward's `y`, reset before the run.
fn run_bits<T: KernelElement + cudarc::driver::DeviceRepr>(layer: &mut DeviceLayer<'_, T>) -> Vec<u64> {
    let (y, _) = layer.run_and_reference().unwrap();
    y.into_iter().map(f64::to_bits).collect()
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn every_strategy_is_bit_identical_over_20_runs() {
    let Some(device) = device() else { return };
    let runs = if gpu::quick() { 3 } else { 20 };
    for (method, experts, rank, k) in STANDARD_METHODS {
        let shape = MethodShape { d_in: 1024, d_out: 1024, experts, rank, k, alpha: 2.0 * rank as f64 };
        let spec = method.spec(shape).unwrap();
        for strategy in strategies(&spec) {
            let choice =
                Choice { strategy, build: default_build(strategy, DType::BF16), source: ChoiceSource::Heuristic };
            // Enough tokens that every block of the grouped path holds several experts' rows.
            let data = SyntheticLayer::<half::bf16>::new(&spec, 777, 5);
            let mut layer = DeviceLayer::new(&device, &spec, data, choice).unwrap();
            let first = run_bits(&mut layer);
            assert!(first.iter().any(|&b| b != 0), "{method} {strategy}: y is all zeros");
            for run in 1..runs {
                assert!(run_bits(&mut layer) == first, "{method} {strategy}: run {run} differs from run 0");
            }
        }
    }
}
