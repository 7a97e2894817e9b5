//! [`DeviceLayer`]: one layer's synthetic tensors on the device, run through the layer runtime
//! ([`CompiledLayer`]) with a fixed strategy and build, and checked against the f64 reference.
//! What `mole run`, the benchmarks and the autotuner time.

use crate::cuda::{cuda_err, Device};
use crate::model::LayerSpec;
use crate::reference::{self, max_scaled_error};
use crate::runtime::Choice;
use crate::runtime::{CompiledLayer, LayerIo, LayerPlan};
use crate::synth::SyntheticLayer;
use crate::tune::Strategy;
use crate::{KernelElement, MoleError, Result};
use cudarc::driver::{CudaSlice, DeviceRepr};
use std::sync::Arc;

/// One layer on the device: inputs uploaded once, `y` updated by every [`DeviceLayer::forward`].
pub struct DeviceLayer<'d, T: DeviceRepr> {
    device: &'d Device,
    spec: LayerSpec,
    data: SyntheticLayer<T>,
    layer: CompiledLayer,
    plan: Arc<LayerPlan>,
    x: CudaSlice<T>,
    a: CudaSlice<T>,
    b: CudaSlice<T>,
    y: CudaSlice<T>,
    router_weight: Option<CudaSlice<T>>,
    router_bias: Option<CudaSlice<T>>,
    gate_input: Option<CudaSlice<T>>,
    adapter_ids: Option<CudaSlice<i32>>,
    selection_bias: Option<CudaSlice<T>>,
    cores: Option<CudaSlice<T>>,
    workspace: CudaSlice<u8>,
    /// The f64 reference `y`, computed on first use (or given, see [`DeviceLayer::with_reference`]).
    reference: Option<Arc<Vec<f64>>>,
}

pub(super) fn upload<T: DeviceRepr>(device: &Device, v: &[T]) -> Result<CudaSlice<T>> {
    device.stream().clone_htod(v).map_err(cuda_err("cuMemcpyHtoD"))
}

pub(super) fn upload_opt<T: DeviceRepr>(device: &Device, v: Option<&[T]>) -> Result<Option<CudaSlice<T>>> {
    v.map(|v| upload(device, v)).transpose()
}

/// The check's error of `got` against `want` (`tokens` rows of `width`): the largest scaled
/// error (`|got - want| / (1 + |want|)`) over the rows, after dropping the worst `ceil(T / 512)`
/// rows from batches of 100 tokens or more: router scores are f32 sums on the device, so a token
/// whose deciding scores are tied to within f32 rounding may be routed differently from the f64
/// reference. A row with a non-finite value has an infinite error (`max_scaled_error` alone
/// would pass over a NaN).
pub(super) fn row_error(got: &[f64], want: &[f64], width: usize, tokens: usize) -> f64 {
    let row = |(g, w): (&[f64], &[f64])| {
        if g.iter().all(|v| v.is_finite()) {
            max_scaled_error(g, w)
        } else {
            f64::INFINITY
        }
    };
    let mut rows: Vec<f64> = got.chunks(width.max(1)).zip(want.chunks(width.max(1))).map(row).collect();
    rows.sort_by(|a, b| b.total_cmp(a));
    let skip = if tokens >= 100 { tokens.div_ceil(512) } else { 0 };
    rows.get(skip).copied().unwrap_or(0.0)
}

impl<'d, T: KernelElement + DeviceRepr> DeviceLayer<'d, T> {
    /// Uploads `data` and prepares `choice` for it (kernels loaded, workspace allocated). Fused
    /// split plans are sized for the device's SMs.
    ///
    /// Errors, before anything reaches the device: `data` that does not fit `spec` (shapes,
    /// tensors present or missing, adapter ids), zero tokens (a no-op has nothing to run or time), a
    /// build of another dtype, and every error of the chosen strategy's plans.
    pub fn new(device: &'d Device, spec: &LayerSpec, data: SyntheticLayer<T>, choice: Choice) -> Result<Self> {
        data.inputs().validate(spec)?;
        if data.tokens == 0 {
            return Err(MoleError::ZeroDimension { name: "tokens" });
        }
        if choice.build.dtype != T::DTYPE {
            return Err(MoleError::param("build", &choice.build, "its dtype differs from the layer's element type"));
        }
        let t = data.tokens;
        let inputs = SyntheticLayer::<T>::bytes(spec, t)?;
        device.check_memory(&format!("the layer's inputs on {t} tokens"), inputs)?;
        let layer = CompiledLayer::new(device, spec, T::DTYPE, None)?.with_choice(choice);
        let plan = layer.prepare(t)?;
        let ws = plan.workspace_bytes.max(1);
        device.check_memory(&format!("a workspace of {ws} bytes"), ws as u64)?;
        let workspace = device.stream().alloc_zeros::<u8>(ws).map_err(cuda_err("cuMemAlloc"))?;
        let gate_input = data.logits.as_deref().or(data.weights.as_deref());
        Ok(DeviceLayer {
            device,
            spec: spec.clone(),
            x: upload(device, &data.x)?,
            a: upload(device, &data.a)?,
            b: upload(device, &data.b)?,
            y: upload(device, &data.y)?,
            router_weight: upload_opt(device, data.router_weight.as_deref())?,
            router_bias: upload_opt(device, data.router_bias.as_deref())?,
            gate_input: upload_opt(device, gate_input)?,
            adapter_ids: upload_opt(device, data.adapter_ids.as_deref())?,
            selection_bias: upload_opt(device, data.selection_bias.as_deref())?,
            cores: upload_opt(device, data.cores.as_deref())?,
            workspace,
            reference: None,
            layer,
            plan,
            data,
        })
    }

    /// The strategy and build this layer runs.
    pub fn choice(&self) -> &Choice {
        &self.plan.choice
    }

    /// Enqueues one forward on the device's stream (`y` accumulates across calls).
    pub fn forward(&mut self) -> Result<()> {
        let mut io = LayerIo::new(
            self.x.as_view(),
            self.a.as_view(),
            self.b.as_view(),
            self.y.as_view_mut(),
            self.workspace.as_view_mut(),
        );
        io.router_weight = self.router_weight.as_ref().map(|s| s.as_view());
        io.router_bias = self.router_bias.as_ref().map(|s| s.as_view());
        io.gate_input = self.gate_input.as_ref().map(|s| s.as_view());
        io.adapter_ids = self.adapter_ids.as_ref().map(|s| s.as_view());
        io.selection_bias = self.selection_bias.as_ref().map(|s| s.as_view());
        io.cores = self.cores.as_ref().map(|s| s.as_view());
        self.layer.forward(self.device.stream(), self.data.tokens, io)
    }

    /// Resets `y`, runs one forward and returns `(y, reference y)` in f64.
    pub fn run_and_reference(&mut self) -> Result<(Vec<f64>, Vec<f64>)> {
        let stream = self.device.stream();
        stream.memcpy_htod(&self.data.y, &mut self.y).map_err(cuda_err("cuMemcpyHtoD"))?;
        self.forward()?;
        let got = stream.clone_dtoh(&self.y).map_err(cuda_err("cuMemcpyDtoH"))?;
        let want = match &self.reference {
            Some(y) => y.clone(),
            None => Arc::new(reference::forward(&self.spec, &self.data.inputs())?.y),
        };
        self.reference = Some(want.clone());
        Ok((crate::dtype::to_f64_vec(&got), want.to_vec()))
    }

    /// Uses `y` as the f64 reference output of this layer's data (shared between the candidates
    /// of one tuned shape, so the reference runs once).
    pub fn with_reference(mut self, y: Arc<Vec<f64>>) -> Result<Self> {
        crate::limits::check_len("reference y", &y, &[self.data.tokens, self.spec.d_out])?;
        self.reference = Some(y);
        Ok(self)
    }

    /// Resets `y`, runs one forward and compares it with the f64 reference:
    /// `(error, tolerance)`. The error is the largest scaled error (`|got - want| / (1 + |want|)`)
    /// over the tokens, after dropping the worst `ceil(T / 512)` rows from batches of 100 tokens
    /// or more: router scores are f32 sums on the device, so a token whose deciding scores are
    /// tied to within f32 rounding may be routed differently from the f64 reference.
    pub fn check(&mut self) -> Result<(f64, f64)> {
        let (got, want) = self.run_and_reference()?;
        Ok((row_error(&got, &want, self.spec.d_out, self.data.tokens), self.tolerance()))
    }

    /// The tolerance of [`DeviceLayer::check`]: f32 accumulation over `d_in + R`, and `y`
    /// rounded once (fused) or once per slot pass (grouped).
    pub fn tolerance(&self) -> f64 {
        let slots = self.spec.slots() as f64;
        let roundings = if self.plan.choice.strategy == Strategy::Grouped { slots + 1.0 } else { 2.0 };
        reference::tolerance(T::DTYPE, self.spec.d_in + self.spec.total_rank() + 16) * roundings
    }

    /// Bytes a forward must move: `x` once, `A`, `B` and the router weights once, `y` read and
    /// written once; the grouped path reads `x` once more per slot.
    pub fn bytes(&self) -> f64 {
        let el = T::DTYPE.size_bytes() as f64;
        let (s, t) = (&self.spec, self.data.tokens as f64);
        let x_reads = if self.plan.choice.strategy == Strategy::Grouped { 1.0 + s.slots() as f64 } else { 1.0 };
        let weights = (s.total_rank() * (s.d_in + s.d_out)) as f64
            + self.router_weight.as_ref().map_or(0, CudaSlice::len) as f64
            + self.cores.as_ref().map_or(0, CudaSlice::len) as f64;
        el * (x_reads * t * s.d_in as f64 + weights + 2.0 * t * s.d_out as f64)
    }
}

#[cfg(feature = "cli")]
impl<T: KernelElement + DeviceRepr> crate::autotune::TunableRun for DeviceLayer<'_, T> {
    fn run(&mut self) -> Result<()> {
        self.forward()
    }

    /// See [`DeviceLayer::check`].
    fn check(&mut self) -> Result<(f64, f64)> {
        DeviceLayer::check(self)
    }

    fn bytes(&self) -> f64 {
        DeviceLayer::bytes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::row_error;

    #[test]
    fn row_error_drops_a_few_rows_of_large_batches_and_never_a_nan() {
        let want = vec![1.0; 200 * 2];
        let mut got = want.clone();
        got[3] = 1.5; // row 1: 0.25
        assert_eq!(row_error(&got[..20], &want[..20], 2, 10), 0.25);
        // 200 tokens: the worst ceil(200 / 512) = 1 row is dropped.
        assert_eq!(row_error(&got, &want, 2, 200), 0.0);
        got[7] = 1.2; // row 3: 0.1
        assert!((row_error(&got, &want, 2, 200) - 0.1).abs() < 1e-12);
        // NaN is an infinite error, even where a row may be dropped.
        got[9] = f64::NAN;
        got[11] = f64::NAN;
        assert_eq!(row_error(&got, &want, 2, 200), f64::INFINITY);
    }
}
