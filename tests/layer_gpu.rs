//! Whole layers through the layer API (`mole::layer::DeviceLayer`) on the GPU against the f64
//! reference: every standard method, every strategy that can run it (fused single launch on
//! tensor cores and FMA widths, fused split, grouped), every dtype, with the tolerance
//! `DeviceLayer::tolerance` (f32 accumulation over `d_in + R`, one or `slots + 1` roundings of
//! `y`). Needs a GPU: without one each test prints a note and returns.

mod gpu;

use mole::cuda::Device;
use mole::layer::{default_build, Choice, ChoiceSource, DeviceLayer, STANDARD_METHODS};
use mole::model::{LayerSpec, MethodShape, Mix, Router};
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
fn every_method_and_strategy_matches_the_reference() {
    let Some(device) = device() else { return };
    for (method, experts, rank, k) in STANDARD_METHODS {
        // Widths that take the tensor-core kernel (multiples of 8) and ones that do not.
        for (d_in, d_out) in [(512, 384), (300, 250)] {
            let shape = MethodShape { d_in, d_out, experts, rank, k, alpha: 2.0 * rank as f64 };
            let spec = method.spec(shape).unwrap();
            for tokens in [1, 37, 300] {
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
