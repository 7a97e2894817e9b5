//! [`DeviceBackward`]: one layer's synthetic tensors on the device, a training forward run once
//! (its routing saved), then the layer backward ([`CompiledLayer::backward`]) timed and checked
//! against the f64 reference backward. What `mole bench layer --backward` and the GPU tests run.

use super::device_layer::{row_error, upload, upload_opt};
use crate::cuda::{cuda_err, Device};
use crate::kernels::exec::Buf;
use crate::model::LayerSpec;
use crate::reference::{self, max_scaled_error, LayerGrads};
use crate::runtime::{BackwardIo, BackwardLayerPlan, BackwardPointers, Choice, CompiledLayer, LayerIo};
use crate::synth::{Rng, SyntheticLayer};
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use std::sync::Arc;

/// One layer's backward on the device: inputs, `dy` and the saved routing uploaded or computed
/// once; every [`DeviceBackward::backward`] overwrites the gradients.
pub struct DeviceBackward<'d, T: DeviceRepr> {
    device: &'d Device,
    spec: LayerSpec,
    data: SyntheticLayer<T>,
    dy: Vec<T>,
    layer: CompiledLayer,
    plan: Arc<BackwardLayerPlan>,
    inputs: Vec<(Buf, CudaSlice<T>)>,
    dy_dev: CudaSlice<T>,
    saved: CudaSlice<u8>,
    grads: Vec<(Buf, CudaSlice<T>)>,
    workspace: CudaSlice<u8>,
}

impl<'d, T: KernelElement + DeviceRepr> DeviceBackward<'d, T> {
    /// Uploads `data` and a random `dy` (seed `seed`), runs one training forward with `choice`
    /// (which saves the routing) and prepares the backward (kernels loaded, gradients and
    /// workspace allocated).
    ///
    /// Errors, before anything reaches the device: `data` that does not fit `spec`, zero tokens,
    /// an expert shard, and every error of the forward's and the backward's plans.
    pub fn new(
        device: &'d Device,
        spec: &LayerSpec,
        data: SyntheticLayer<T>,
        choice: Choice,
        seed: u64,
    ) -> Result<Self> {
        data.inputs().validate(spec)?;
        let t = data.tokens;
        if t == 0 {
            return Err(MoleError::ZeroDimension { name: "tokens" });
        }
        let layer = CompiledLayer::new(device, spec, T::DTYPE, None)?.with_choice(choice);
        let forward = layer.prepare(t)?;
        let plan = layer.prepare_backward(t)?;
        let saved_bytes = layer.saved_bytes(t)?;
        let bytes = SyntheticLayer::<T>::bytes(spec, t)?.saturating_mul(2)
            + (forward.workspace_bytes + plan.workspace_bytes + saved_bytes) as u64;
        device.check_memory(&format!("the layer's inputs, gradients and workspaces on {t} tokens"), bytes)?;
        let stream = device.stream();
        let alloc = |n: usize| stream.alloc_zeros::<u8>(n.max(1)).map_err(cuda_err("cuMemAlloc"));
        let dy: Vec<T> = Rng::new(seed).fill(t * spec.d_out, 1.0).into_iter().map(T::from_f64).collect();
        let gate_input = data.logits.as_deref().or(data.weights.as_deref());
        let mut inputs = vec![
            (Buf::X, upload(device, &data.x)?),
            (Buf::A, upload(device, &data.a)?),
            (Buf::B, upload(device, &data.b)?),
        ];
        for (buf, v) in [
            (Buf::RouterWeight, data.router_weight.as_deref()),
            (Buf::RouterBias, data.router_bias.as_deref()),
            (Buf::GateInput, gate_input),
            (Buf::SelectionBias, data.selection_bias.as_deref()),
            (Buf::Cores, data.cores.as_deref()),
        ] {
            if let Some(s) = upload_opt(device, v)? {
                inputs.push((buf, s));
            }
        }
        let grads = plan
            .outputs()
            .into_iter()
            // Poisoned: a gradient the backward fails to write reads as NaN.
            .map(|(buf, n)| Ok((buf, upload(device, &vec![T::from_f64(f64::NAN); n])?)))
            .collect::<Result<Vec<_>>>()?;
        let mut me = DeviceBackward {
            device,
            spec: spec.clone(),
            dy_dev: upload(device, &dy)?,
            dy,
            layer,
            plan,
            inputs,
            saved: alloc(saved_bytes)?,
            grads,
            workspace: alloc(forward.workspace_bytes.max(1))?,
            data,
        };
        me.training_forward()?;
        let ws = me.plan.workspace_bytes;
        me.workspace = alloc(ws.max(me.workspace.len()))?;
        Ok(me)
    }

    fn input(&self, buf: Buf) -> Option<&CudaSlice<T>> {
        self.inputs.iter().find(|(b, _)| *b == buf).map(|(_, s)| s)
    }

    /// The training forward that saves the routing (on a scratch `y`).
    fn training_forward(&mut self) -> Result<()> {
        let stream = self.device.stream();
        let mut y = upload(self.device, &self.data.y)?;
        let ids = upload_opt(self.device, self.data.adapter_ids.as_deref())?;
        let inputs = &self.inputs;
        let view = |b| inputs.iter().find(|(x, _)| *x == b).map(|(_, s)| s.as_view());
        let need =
            |b: Buf| view(b).ok_or(MoleError::MissingInput { name: b.name(), needed_by: "the training forward" });
        let mut io =
            LayerIo::new(need(Buf::X)?, need(Buf::A)?, need(Buf::B)?, y.as_view_mut(), self.workspace.as_view_mut());
        io.router_weight = view(Buf::RouterWeight);
        io.router_bias = view(Buf::RouterBias);
        io.gate_input = view(Buf::GateInput);
        io.selection_bias = view(Buf::SelectionBias);
        io.cores = view(Buf::Cores);
        io.adapter_ids = ids.as_ref().map(|s| s.as_view());
        io.saved = Some(self.saved.as_view_mut());
        self.layer.forward(stream, self.data.tokens, io)?;
        stream.synchronize().map_err(cuda_err("cuStreamSynchronize"))
    }

    /// Enqueues one backward on the device's stream (the gradients are overwritten).
    pub fn backward(&mut self) -> Result<()> {
        let view = |b| self.inputs.iter().find(|(x, _)| *x == b).map(|(_, s)| s.as_view());
        let need = |b: Buf| view(b).ok_or(MoleError::MissingInput { name: b.name(), needed_by: "the backward" });
        let mut grads: Vec<(Buf, cudarc::driver::CudaViewMut<'_, T>)> =
            self.grads.iter_mut().map(|(b, s)| (*b, s.as_view_mut())).collect();
        let mut take = |b: Buf| grads.iter().position(|(x, _)| *x == b).map(|i| grads.swap_remove(i).1);
        let io = BackwardIo {
            x: need(Buf::X)?,
            a: need(Buf::A)?,
            b: need(Buf::B)?,
            dy: self.dy_dev.as_view(),
            router_weight: view(Buf::RouterWeight),
            router_bias: view(Buf::RouterBias),
            gate_input: view(Buf::GateInput),
            cores: view(Buf::Cores),
            saved: self.saved.as_view(),
            dx: take(Buf::DX).ok_or(MoleError::MissingInput { name: "dx", needed_by: "the backward" })?,
            da: take(Buf::DA),
            db: take(Buf::DB),
            d_router_weight: take(Buf::DRouterWeight),
            d_router_bias: take(Buf::DRouterBias),
            d_gate_input: take(Buf::DGateInput),
            d_cores: take(Buf::DCores),
            workspace: self.workspace.as_view_mut(),
        };
        self.layer.backward(self.device.stream(), self.data.tokens, io)
    }

    /// Runs one backward and returns every gradient it wrote, in f64, by buffer.
    pub fn gradients(&mut self) -> Result<Vec<(Buf, Vec<f64>)>> {
        self.backward()?;
        self.written()
    }

    /// Every gradient buffer as it holds now, in f64, by buffer (after the device's stream).
    pub fn written(&self) -> Result<Vec<(Buf, Vec<f64>)>> {
        let stream = self.device.stream();
        self.grads
            .iter()
            .map(|(b, s)| Ok((*b, crate::dtype::to_f64_vec(&stream.clone_dtoh(s).map_err(cuda_err("cuMemcpyDtoH"))?))))
            .collect()
    }

    /// Fills every gradient buffer with NaN (a gradient a backward fails to write reads as NaN).
    pub fn poison(&mut self) -> Result<()> {
        let stream = self.device.stream();
        for (_, s) in &mut self.grads {
            let nan = vec![T::from_f64(f64::NAN); s.len()];
            stream.memcpy_htod(&nan, s).map_err(cuda_err("cuMemcpyHtoD"))?;
        }
        stream.synchronize().map_err(cuda_err("cuStreamSynchronize"))
    }

    /// The layer and the device addresses of the buffers [`DeviceBackward::backward`] runs on,
    /// for a caller that enqueues the backward itself ([`CompiledLayer::backward_raw`]), e.g.
    /// inside a CUDA-graph capture, where the typed views' stream bookkeeping may not run.
    pub fn raw(&self) -> (&CompiledLayer, BackwardPointers) {
        let stream = self.device.stream();
        let ptr = |list: &[(Buf, CudaSlice<T>)], b: Buf| {
            list.iter().find(|(x, _)| *x == b).map_or(0, |(_, s)| s.device_ptr(stream).0)
        };
        let (input, grad) = (|b| ptr(&self.inputs, b), |b| ptr(&self.grads, b));
        let pointers = BackwardPointers {
            x: input(Buf::X),
            a: input(Buf::A),
            b: input(Buf::B),
            dy: self.dy_dev.device_ptr(stream).0,
            router_weight: input(Buf::RouterWeight),
            router_bias: input(Buf::RouterBias),
            gate_input: input(Buf::GateInput),
            cores: input(Buf::Cores),
            saved: self.saved.device_ptr(stream).0,
            saved_bytes: self.saved.len(),
            dx: grad(Buf::DX),
            da: grad(Buf::DA),
            db: grad(Buf::DB),
            d_router_weight: grad(Buf::DRouterWeight),
            d_router_bias: grad(Buf::DRouterBias),
            d_gate_input: grad(Buf::DGateInput),
            d_cores: grad(Buf::DCores),
            workspace: self.workspace.device_ptr(stream).0,
            workspace_bytes: self.workspace.len(),
        };
        (&self.layer, pointers)
    }

    /// Runs one backward and compares every gradient with the f64 reference backward:
    /// `(worst error over tolerance, the gradient it was in)`; within tolerance when the ratio is
    /// at most 1. `dx` and the gating input's gradient are compared per token (dropping the worst
    /// `ceil(T / 512)` rows of 100 tokens or more, as the forward's check does); the parameters'
    /// gradients, sums over every token, as a whole.
    pub fn check(&mut self) -> Result<(f64, &'static str)> {
        let got = self.gradients()?;
        let want = reference::backward(&self.spec, &self.data.inputs(), &self.dy)?;
        let (t, e) = (self.data.tokens, self.spec.routed_experts());
        let mut worst = (0.0, "dx");
        for (buf, g) in &got {
            let (w, tol) = expected(&want, *buf, &self.spec, T::DTYPE, t);
            let w =
                w.ok_or(MoleError::Unsupported(format!("the backward wrote {}, the reference has none", buf.name())))?;
            let err = match buf {
                // Rows are dropped for near-ties of the routing only: an unwritten (poisoned)
                // element never is.
                _ if !g.iter().all(|v| v.is_finite()) => f64::INFINITY,
                Buf::DX => row_error(g, w, self.spec.d_in, t),
                Buf::DGateInput => row_error(g, w, e, t),
                _ => max_scaled_error(g, w),
            };
            if err / tol > worst.0 || !(err / tol).is_finite() {
                worst = (err / tol, buf.name());
            }
        }
        Ok(worst)
    }

    /// Bytes a backward must move: `x` and `dy` read and `dx` written; `A`, `B`, the router
    /// weight and the cores read once and each trained one's gradient written once; the gating
    /// input read and its gradient written (the count `benches/peers` uses for its baselines).
    pub fn bytes(&self) -> f64 {
        let el = T::DTYPE.size_bytes() as f64;
        let s = &self.spec;
        let t = self.data.tokens as f64;
        let read: usize = [Buf::A, Buf::B, Buf::RouterWeight, Buf::RouterBias, Buf::Cores, Buf::GateInput]
            .iter()
            .filter_map(|&b| self.input(b).map(CudaSlice::len))
            .sum();
        let written: usize = self.grads.iter().filter(|(b, _)| *b != Buf::DX).map(|(_, g)| g.len()).sum();
        el * (t * (2 * s.d_in + s.d_out) as f64 + (read + written) as f64)
    }
}

/// The reference's gradient for `buf`, and the check's tolerance: f32 accumulation over the
/// reduction behind it (the tokens for a parameter's gradient, the layer's widths for `dx` and
/// the gating input's), the output's rounding, and the recomputed routing's.
fn expected<'g>(
    g: &'g LayerGrads,
    buf: Buf,
    spec: &LayerSpec,
    dtype: DType,
    tokens: usize,
) -> (Option<&'g Vec<f64>>, f64) {
    let widths = spec.d_in + spec.d_out + spec.total_rank() + spec.routed_experts();
    let (grad, reduction) = match buf {
        Buf::DX => (Some(&g.x), widths),
        Buf::DGateInput => (g.logits.as_ref().or(g.weights.as_ref()), widths),
        Buf::DA => (g.a.as_ref(), widths + tokens),
        Buf::DB => (g.b.as_ref(), widths + tokens),
        Buf::DRouterWeight => (g.router_weight.as_ref(), widths + tokens),
        Buf::DRouterBias => (g.router_bias.as_ref(), widths + tokens),
        Buf::DCores => (g.cores.as_ref(), widths + tokens),
        _ => (None, 0),
    };
    (grad, 4.0 * reference::tolerance(dtype, reduction))
}
