//! The layer backward on the GPU through the runtime, as a training framework runs it: a
//! training forward through each strategy saves the routing, then `CompiledLayer::backward`
//! writes every gradient (poisoned first), checked against the f64 reference backward; two
//! backward runs are bit-identical (no float atomics anywhere), and so are a captured backward's
//! graph replays. Needs a GPU: without one each
//! test prints a note and returns.

mod gpu;
#[path = "backward_gpu/wgrad.rs"]
mod wgrad;

use half::bf16;
use mole::autotune::DeviceBackward;
use mole::model::{AuxLosses, LayerParam, LayerSpec, Method, MethodShape, Mix, Router};
use mole::runtime::{default_build, Choice, ChoiceSource};
use mole::synth::SyntheticLayer;
use mole::tune::Strategy;
use mole::DType;

fn spec(method: Method) -> LayerSpec {
    method.spec(MethodShape { d_in: 512, d_out: 384, experts: 8, rank: 16, k: 2, alpha: 32.0 }).unwrap()
}

fn strategies(spec: &LayerSpec) -> Vec<Strategy> {
    let grouped = spec.mix == Mix::ExpertScale && !matches!(spec.router(), Some(Router::H { .. } | Router::LowRank));
    Strategy::LAYER.into_iter().filter(|&s| grouped || s != Strategy::Grouped).collect()
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn every_gradient_matches_the_reference_through_each_strategy() {
    let Some(device) = gpu::device_or_skip("the backward GPU tests") else { return };
    let tokens: &[usize] = if gpu::quick() { &[5] } else { &[1, 37, 300] };
    for method in [Method::MixLoraPerLinear, Method::XLora, Method::Smora, Method::Comol, Method::DynMole] {
        let mut spec = spec(method);
        if spec.rule().is_some_and(|r| r.has_z_loss()) {
            spec.training.aux_losses = AuxLosses { load_balancing: 0.01, z_loss: 1e-3, ..Default::default() };
        }
        for strategy in strategies(&spec) {
            for &t in tokens {
                let choice =
                    Choice { strategy, build: default_build(strategy, DType::BF16), source: ChoiceSource::Heuristic };
                let data = SyntheticLayer::<bf16>::new(&spec, t, 3);
                let mut layer = DeviceBackward::new(&device, &spec, data, choice, 4).unwrap();
                let (ratio, worst) = layer.check().unwrap();
                assert!(ratio <= 1.0, "{method}, {strategy}, T={t}: {worst} at {ratio:.3} of its tolerance");
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn two_backward_runs_are_bit_identical_and_frozen_parameters_get_nothing() {
    let Some(device) = gpu::device_or_skip("the backward GPU tests") else { return };
    let mut spec = spec(Method::MixLoraPerLinear);
    spec.training.frozen = vec![LayerParam::A];
    let t = if gpu::quick() { 33 } else { 1000 };
    let choice = Choice {
        strategy: Strategy::Fused,
        build: default_build(Strategy::Fused, DType::BF16),
        source: ChoiceSource::Heuristic,
    };
    let mut layer = DeviceBackward::new(&device, &spec, SyntheticLayer::<bf16>::new(&spec, t, 5), choice, 6).unwrap();
    let first = layer.gradients().unwrap();
    let again = layer.gradients().unwrap();
    assert!(first.iter().all(|(b, _)| b.name() != "d_a"), "a gradient for the frozen A");
    for ((buf, a), (_, b)) in first.iter().zip(&again) {
        assert!(a.iter().all(|v| v.is_finite()), "{}: not every element written", buf.name());
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{} differs between runs", buf.name());
    }
}

/// A backward captured in a CUDA graph (after the eager one, as a training framework's graphs
/// are): nothing runs during the capture, and each replay writes the eager run's gradients bit
/// for bit. Run it with `--test-threads=1` (as the kit does): another test's module loads on the
/// same context during the capture could invalidate it.
#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn a_captured_backward_replays_the_eager_gradients() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(device) = gpu::device_or_skip("the backward GPU tests") else { return };
    let spec = spec(Method::MixLoraPerLinear);
    let t = if gpu::quick() { 16 } else { 256 };
    let choice = Choice {
        strategy: Strategy::Fused,
        build: default_build(Strategy::Fused, DType::BF16),
        source: ChoiceSource::Heuristic,
    };
    let mut layer = DeviceBackward::new(&device, &spec, SyntheticLayer::<bf16>::new(&spec, t, 7), choice, 8).unwrap();
    let eager = layer.gradients().unwrap();
    layer.poison().unwrap();
    let stream = device.stream();
    let graph = {
        let (compiled, pointers) = layer.raw();
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        // SAFETY: the pointers are the layer's live buffers of the plan's sizes, the saved routing
        // the one its training forward wrote on these inputs.
        unsafe { compiled.backward_raw(stream.cu_stream(), t, pointers) }.unwrap();
        stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).unwrap()
    };
    let graph = graph.expect("a graph");
    let unwritten = layer.written().unwrap();
    assert!(unwritten.iter().all(|(_, g)| g.iter().all(|v| v.is_nan())), "the capture ran the backward");
    for replay in 0..2 {
        layer.poison().unwrap();
        graph.launch().unwrap();
        for ((buf, got), (_, want)) in layer.written().unwrap().iter().zip(&eager) {
            let same = got.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "replay {replay}: {} differs from the eager backward", buf.name());
        }
    }
}
