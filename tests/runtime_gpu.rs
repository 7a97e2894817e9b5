//! The layer runtime (`mole::runtime::CompiledLayer`) on the GPU, as a framework uses it: its
//! own context adopted, its own stream, tensors as views into larger buffers (aligned and
//! misaligned), raw pointers, a forward captured in a CUDA graph and replayed on new inputs,
//! and per-expert scales (uploaded by the layer) through every strategy. Every output is compared with the f64 reference. Needs a GPU: without one each test
//! prints a note and returns.

mod gpu;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use mole::cuda::Device;
use mole::model::{ExpertShard, LayerInputs, LayerSpec, Method, MethodShape};
use mole::runtime::{CompiledLayer, LayerIo, LayerPointers};
use mole::synth::SyntheticLayer;
use mole::tune::Strategy;
use mole::{reference, DType, MoleError};
use std::sync::Arc;

/// A framework's context (the device's primary context) adopted by mole, and a stream of its own.
fn adopted() -> Option<(Device, Arc<CudaStream>)> {
    gpu::device_or_skip("the runtime GPU tests")?;
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    Some((Device::from_context(ctx).unwrap(), stream))
}

fn spec(method: Method) -> LayerSpec {
    method.spec(MethodShape { d_in: 512, d_out: 384, experts: 8, rank: 16, k: 2, alpha: 32.0 }).unwrap()
}

/// `data`'s tensors uploaded with `pad` leading elements each (views start `pad` in).
struct Uploaded {
    x: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    router_weight: Option<CudaSlice<bf16>>,
    router_bias: Option<CudaSlice<bf16>>,
    gate_input: Option<CudaSlice<bf16>>,
    selection_bias: Option<CudaSlice<bf16>>,
    cores: Option<CudaSlice<bf16>>,
    adapter_ids: Option<CudaSlice<i32>>,
    workspace: CudaSlice<u8>,
    pad: usize,
}

fn upload(stream: &Arc<CudaStream>, data: &SyntheticLayer<bf16>, pad: usize, workspace: usize) -> Uploaded {
    let put = |v: &[bf16]| {
        let mut host = vec![bf16::from_f32(f32::NAN); pad];
        host.extend_from_slice(v);
        stream.clone_htod(&host).unwrap()
    };
    Uploaded {
        x: put(&data.x),
        a: put(&data.a),
        b: put(&data.b),
        y: put(&data.y),
        router_weight: data.router_weight.as_deref().map(put),
        router_bias: data.router_bias.as_deref().map(put),
        gate_input: data.logits.as_deref().or(data.weights.as_deref()).map(put),
        selection_bias: data.selection_bias.as_deref().map(put),
        cores: data.cores.as_deref().map(put),
        adapter_ids: data.adapter_ids.as_deref().map(|ids| {
            let mut host = vec![-1i32; pad];
            host.extend_from_slice(ids);
            stream.clone_htod(&host).unwrap()
        }),
        workspace: stream.alloc_zeros::<u8>(workspace.max(1) + 256).unwrap(),
        pad,
    }
}

impl Uploaded {
    fn io(&mut self) -> LayerIo<'_, bf16> {
        let p = self.pad;
        let mut io = LayerIo::new(
            self.x.slice(p..),
            self.a.slice(p..),
            self.b.slice(p..),
            self.y.slice_mut(p..),
            self.workspace.slice_mut(..),
        );
        io.router_weight = self.router_weight.as_ref().map(|w| w.slice(p..));
        io.router_bias = self.router_bias.as_ref().map(|w| w.slice(p..));
        io.gate_input = self.gate_input.as_ref().map(|w| w.slice(p..));
        io.selection_bias = self.selection_bias.as_ref().map(|w| w.slice(p..));
        io.cores = self.cores.as_ref().map(|w| w.slice(p..));
        io.adapter_ids = self.adapter_ids.as_ref().map(|w| w.slice(p..));
        io
    }

    fn y(&self, stream: &Arc<CudaStream>) -> Vec<f64> {
        let host = stream.clone_dtoh(&self.y).unwrap();
        host[self.pad..].iter().map(|v| v.to_f64()).collect()
    }
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let err = reference::max_scaled_error(got, want);
    assert!(err <= tol, "{what}: error {err:.3e} > {tol:.3e}");
}

fn tolerance(spec: &LayerSpec, strategy: Strategy) -> f64 {
    let roundings = if strategy == Strategy::Grouped { spec.slots() as f64 + 1.0 } else { 2.0 };
    reference::tolerance(DType::BF16, spec.d_in + spec.total_rank() + 16) * roundings
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn forward_on_views_in_an_adopted_context_matches_the_reference() {
    let Some((device, stream)) = adopted() else { return };
    for method in [Method::MixLoraPerLinear, Method::XLora, Method::Smora, Method::Comol] {
        let spec = spec(method);
        // The grouped path needs the expert-scale mix and a router that does not read h.
        let grouped = spec.mix == mole::model::Mix::ExpertScale
            && !matches!(spec.router(), Some(mole::model::Router::H { .. } | mole::model::Router::LowRank));
        for tokens in [1usize, 37, 300] {
            let data = SyntheticLayer::<bf16>::new(&spec, tokens, 5);
            let want = reference::forward(&spec, &data.inputs()).unwrap().y;
            for strategy in Strategy::LAYER.into_iter().filter(|&s| grouped || s != Strategy::Grouped) {
                let choice = mole::runtime::Choice {
                    strategy,
                    build: mole::runtime::default_build(strategy, DType::BF16),
                    source: mole::runtime::ChoiceSource::Heuristic,
                };
                let layer = CompiledLayer::new(&device, &spec, DType::BF16, None).unwrap().with_choice(choice);
                let plan = layer.prepare(tokens).unwrap();
                // Padding 8 keeps 16-byte alignment (tensor cores); 3 does not (FMA fallbacks).
                for pad in [0usize, 8, 3] {
                    let mut u = upload(&stream, &data, pad, plan.workspace_bytes);
                    layer.forward(&stream, tokens, u.io()).unwrap();
                    let what = format!("{method} T={tokens} pad={pad} {strategy}");
                    assert_close(&u.y(&stream), &want, tolerance(&spec, strategy), &what);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn grouped_and_fused_choices_agree_with_the_reference() {
    let Some((device, stream)) = adopted() else { return };
    let plain = spec(Method::MixLoraPerLinear);
    // Per-expert scales, zero and negative among them: the layer uploads and binds them.
    let scaled = LayerSpec { expert_scales: Some(vec![0.5, -1.0, 0.0, 2.0, 1.0, -0.25, 3.0, 1.5]), ..plain.clone() };
    let tokens = 300;
    for spec in [plain, scaled] {
        let data = SyntheticLayer::<bf16>::new(&spec, tokens, 9);
        let want = reference::forward(&spec, &data.inputs()).unwrap().y;
        for strategy in Strategy::LAYER {
            let choice = mole::runtime::Choice {
                strategy,
                build: mole::runtime::default_build(strategy, DType::BF16),
                source: mole::runtime::ChoiceSource::Heuristic,
            };
            let layer = CompiledLayer::new(&device, &spec, DType::BF16, None).unwrap().with_choice(choice);
            let bytes = layer.workspace_bytes(tokens).unwrap();
            let mut u = upload(&stream, &data, 0, bytes);
            layer.forward(&stream, tokens, u.io()).unwrap();
            let what = format!("{strategy} scales {:?}", spec.expert_scales);
            assert_close(&u.y(&stream), &want, tolerance(&spec, strategy), &what);
        }
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn expert_shards_match_their_reference_and_sum_to_the_layer() {
    let Some((device, stream)) = adopted() else { return };
    let spec = spec(Method::MixLoraPerLinear);
    let tokens = 300;
    let data = SyntheticLayer::<bf16>::new(&spec, tokens, 13);
    let y0: Vec<f64> = data.y.iter().map(|v| v.to_f64()).collect();
    let full = reference::forward(&spec, &data.inputs()).unwrap().y;
    let tol = tolerance(&spec, Strategy::Grouped);
    let mut sum = y0.clone();
    for shard in ExpertShard::partition(spec.ranks.num_experts(), 3).unwrap() {
        let layer = CompiledLayer::new(&device, &spec, DType::BF16, None).unwrap().with_shard(shard).unwrap();
        let (a, b) = shard.take_bank(&spec.ranks, spec.d_in, &data.a, &data.b).unwrap();
        let want = reference::forward_shard(&spec, shard, &LayerInputs { a: &a, b: &b, ..data.inputs() }).unwrap().y;
        let shard_data = SyntheticLayer { a, b, ..data.clone() };
        let mut u = upload(&stream, &shard_data, 0, layer.workspace_bytes(tokens).unwrap());
        layer.forward(&stream, tokens, u.io()).unwrap();
        let got = u.y(&stream);
        assert_close(&got, &want, tol, &format!("{shard:?}"));
        sum.iter_mut().zip(got.iter().zip(&y0)).for_each(|(s, (g, y))| *s += g - y);
    }
    assert_close(&sum, &full, 3.0 * tol, "the shards' deltas summed");
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn a_captured_graph_replays_on_new_inputs() {
    let Some((device, stream)) = adopted() else { return };
    let spec = spec(Method::MixLoraPerLinear);
    let tokens = 16;
    let layer = CompiledLayer::new(&device, &spec, DType::BF16, None).unwrap();
    let plan = layer.prepare(tokens).unwrap();
    let first = SyntheticLayer::<bf16>::new(&spec, tokens, 1);
    let mut u = upload(&stream, &first, 0, plan.workspace_bytes);
    let ptrs = {
        let ptr = |s: &CudaSlice<bf16>| s.device_ptr(&stream).0;
        LayerPointers {
            x: ptr(&u.x),
            a: ptr(&u.a),
            b: ptr(&u.b),
            y: u.y.device_ptr_mut(&stream).0,
            router_weight: u.router_weight.as_ref().map_or(0, ptr),
            workspace: u.workspace.device_ptr_mut(&stream).0,
            workspace_bytes: plan.workspace_bytes,
            ..LayerPointers::default()
        }
    };
    stream.synchronize().unwrap();
    stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    // SAFETY: the pointers are live allocations of the adopted context with the plan's lengths.
    unsafe { layer.forward_raw(stream.cu_stream(), tokens, ptrs) }.unwrap();
    let graph = stream
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("a graph");
    // Nothing ran during the capture; each replay runs on what the buffers hold then.
    for seed in [2u64, 3] {
        let next = SyntheticLayer::<bf16>::new(&spec, tokens, seed);
        stream.memcpy_htod(&next.x, &mut u.x).unwrap();
        stream.memcpy_htod(&next.y, &mut u.y).unwrap();
        graph.launch().unwrap();
        let mut inputs = next.inputs();
        inputs.a = &first.a;
        inputs.b = &first.b;
        inputs.router_weight = first.router_weight.as_deref();
        let want = reference::forward(&spec, &inputs).unwrap().y;
        assert_close(&u.y(&stream), &want, tolerance(&spec, plan.choice.strategy), &format!("replay {seed}"));
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn bad_calls_are_typed_errors_before_any_launch() {
    let Some((device, stream)) = adopted() else { return };
    let spec = spec(Method::MixLoraPerLinear);
    let layer = CompiledLayer::new(&device, &spec, DType::BF16, None).unwrap();
    let tokens = 8;
    let bytes = layer.workspace_bytes(tokens).unwrap();
    let data = SyntheticLayer::<bf16>::new(&spec, tokens, 4);
    // Room for the workspace of one token more, so that the short `x` is what is refused.
    let mut u = upload(&stream, &data, 0, layer.workspace_bytes(tokens + 1).unwrap().max(bytes));
    let err = layer.forward(&stream, tokens + 1, u.io()).unwrap_err();
    assert!(matches!(err, MoleError::ShapeMismatch { what: "x", .. }), "{err}");
    let mut io = u.io();
    io.router_weight = None;
    assert!(matches!(layer.forward(&stream, tokens, io), Err(MoleError::MissingInput { name: "router_weight", .. })));
    let mut small = u.workspace.slice_mut(..bytes - 1);
    let io = LayerIo::new(u.x.slice(..), u.a.slice(..), u.b.slice(..), u.y.slice_mut(..), small.slice_mut(..));
    assert!(matches!(layer.forward(&stream, tokens, io), Err(MoleError::ShapeMismatch { what: "workspace", .. })));
    let mut shifted = u.workspace.slice_mut(4..);
    let io = LayerIo::new(u.x.slice(..), u.a.slice(..), u.b.slice(..), u.y.slice_mut(..), shifted.slice_mut(..));
    let err = layer.forward(&stream, tokens, io).unwrap_err();
    assert!(matches!(err, MoleError::InvalidParameter { name: "workspace", .. }), "{err}");
    // None of the refused calls launched anything: y is what was uploaded.
    stream.synchronize().unwrap();
    let untouched: Vec<f64> = data.y.iter().map(|v| v.to_f64()).collect();
    assert_eq!(u.y(&stream), untouched);
}

/// `Device::restoring_current` (what the C and Python bindings wrap every GPU call in) puts back
/// the thread's current context, none included, after calls that make the layer's current.
#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn restoring_current_puts_back_the_callers_context() {
    use cudarc::driver::sys;
    let Some((device, stream)) = adopted() else { return };
    let current = || {
        let mut c: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes the thread's current context (or null) into a local.
        unsafe { sys::cuCtxGetCurrent(&mut c) }.result().unwrap();
        c
    };
    let spec = spec(Method::MixLoraPerLinear);
    let unbind = || {
        // SAFETY: unbinds the thread's context; nothing else runs on this thread meanwhile.
        unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) }.result().unwrap()
    };
    // Without the wrapper, uploading the layer's constants leaves its context current.
    unbind();
    let bare = CompiledLayer::new(&device, &spec, DType::BF16, None).unwrap();
    assert_eq!(current(), stream.context().cu_ctx());
    unbind();
    let layer = Device::restoring_current(|| CompiledLayer::new(&device, &spec, DType::BF16, None)).unwrap();
    assert!(current().is_null(), "creating a layer left a context current");
    Device::restoring_current(|| layer.prepare(16)).unwrap();
    assert!(current().is_null(), "preparing a layer left a context current");
    Device::restoring_current(|| drop((bare, layer)));
    assert!(current().is_null(), "dropping layers left a context current");
}
