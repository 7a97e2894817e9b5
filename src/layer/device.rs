//! [`DeviceLayer`]: one layer's tensors on the device and its forward through the chosen
//! strategy, with a check against the f64 reference.

use super::Choice;
use crate::cuda::{cuda_err, Device};
use crate::exec::Buf;
use crate::kernels::fused::{self, FusedBuffers, FusedConfig, FusedOutputs, FusedPlan, FusedVariant};
use crate::kernels::gating::{self, SlotGroupOutputs, SlotGroupingPlan};
use crate::kernels::sgmv::{self, SgmvBuffers, SgmvPlan, SgmvShape};
use crate::model::LayerSpec;
use crate::plan::TokenSlot;
use crate::reference::{self, max_scaled_error};
use crate::synth::SyntheticLayer;
use crate::tune::Strategy;
use crate::{KernelElement, MoleError, Result};
use cudarc::driver::{CudaSlice, DeviceRepr};
use std::sync::Arc;

/// The grouped path's extra state: routing outputs, slot plans and the SGMV workspace.
struct Grouped {
    route: FusedPlan,
    grouping: SlotGroupingPlan,
    gating_build: crate::kernels::KernelBuild,
    sgmv: SgmvPlan,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    workspace: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    entries: CudaSlice<TokenSlot>,
    status: CudaSlice<u32>,
    h_part: CudaSlice<f32>,
}

/// One layer on the device: inputs uploaded once, `y` updated by every [`DeviceLayer::forward`].
pub struct DeviceLayer<'d, T: DeviceRepr> {
    device: &'d Device,
    spec: LayerSpec,
    data: SyntheticLayer<T>,
    choice: Choice,
    fused: Option<FusedPlan>,
    grouped: Option<Grouped>,
    x: CudaSlice<T>,
    a: CudaSlice<T>,
    b: CudaSlice<T>,
    y: CudaSlice<T>,
    router_weight: Option<CudaSlice<T>>,
    router_bias: Option<CudaSlice<T>>,
    gate_in: Option<CudaSlice<T>>,
    adapter_ids: Option<CudaSlice<i32>>,
    selection_bias: Option<CudaSlice<T>>,
    rank_offsets: CudaSlice<u32>,
    cores: Option<CudaSlice<T>>,
    hz_part: Option<CudaSlice<f32>>,
    /// The f64 reference `y`, computed on first use (or given, see [`DeviceLayer::with_reference`]).
    reference: Option<Arc<Vec<f64>>>,
}

fn upload<T: DeviceRepr>(device: &Device, v: &[T]) -> Result<CudaSlice<T>> {
    device.stream().clone_htod(v).map_err(cuda_err("cuMemcpyHtoD"))
}

fn upload_opt<T: DeviceRepr>(device: &Device, v: Option<&[T]>) -> Result<Option<CudaSlice<T>>> {
    v.map(|v| upload(device, v)).transpose()
}

fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(device: &Device, n: usize) -> Result<CudaSlice<T>> {
    let bytes = crate::limits::Footprint::new().add("a workspace", &[n.max(1)], std::mem::size_of::<T>())?.bytes();
    crate::limits::check_device(device, &format!("a workspace of {n} elements"), bytes)?;
    device.stream().alloc_zeros::<T>(n.max(1)).map_err(cuda_err("cuMemAlloc"))
}

impl<'d, T: KernelElement + DeviceRepr> DeviceLayer<'d, T> {
    /// Uploads `data` and plans `choice` for it. Fused split plans are sized for the device's SMs.
    ///
    /// Errors, before anything reaches the device: `data` that does not fit `spec` (shapes,
    /// tensors present or missing, adapter ids), per-expert scales other than 1
    /// ([`LayerSpec::check_kernel_support`]), zero tokens (a no-op has nothing to run or time), a
    /// build of another dtype, and every error of the chosen strategy's plans.
    pub fn new(device: &'d Device, spec: &LayerSpec, data: SyntheticLayer<T>, choice: Choice) -> Result<Self> {
        data.inputs().validate(spec)?;
        spec.check_kernel_support()?;
        if data.tokens == 0 {
            return Err(MoleError::ZeroDimension { name: "tokens" });
        }
        if choice.build.dtype != T::DTYPE {
            return Err(MoleError::param("build", &choice.build, "its dtype differs from the layer's element type"));
        }
        let t = data.tokens;
        let inputs = SyntheticLayer::<T>::bytes(spec, t)?;
        crate::limits::check_device(device, &format!("the layer's inputs on {t} tokens"), inputs)?;
        let offsets: Vec<u32> = spec.ranks.offsets().iter().map(|&o| o as u32).collect();
        let gate_in = data.logits.as_deref().or(data.weights.as_deref());
        let mut layer = DeviceLayer {
            device,
            spec: spec.clone(),
            x: upload(device, &data.x)?,
            a: upload(device, &data.a)?,
            b: upload(device, &data.b)?,
            y: upload(device, &data.y)?,
            router_weight: upload_opt(device, data.router_weight.as_deref())?,
            router_bias: upload_opt(device, data.router_bias.as_deref())?,
            gate_in: upload_opt(device, gate_in)?,
            adapter_ids: upload_opt(device, data.adapter_ids.as_deref())?,
            selection_bias: upload_opt(device, data.selection_bias.as_deref())?,
            rank_offsets: upload(device, &offsets)?,
            cores: upload_opt(device, data.cores.as_deref())?,
            hz_part: None,
            reference: None,
            fused: None,
            grouped: None,
            choice,
            data,
        };
        match layer.choice.strategy {
            Strategy::Fused | Strategy::FusedSplit => {
                let config = FusedConfig::of(&layer.choice.build)?;
                let variant = if layer.choice.strategy == Strategy::Fused {
                    FusedVariant::Single
                } else {
                    FusedVariant::split_for(config, t, spec.d_in, spec.d_out, device.sm_count())
                };
                let plan = fused::plan(&layer.choice.build, spec, t, variant, FusedOutputs::default())?;
                let partials = plan.lens.get(Buf::Partials);
                if partials > 0 {
                    layer.hz_part = Some(alloc(device, partials)?);
                }
                layer.fused = Some(plan);
            }
            Strategy::Grouped => layer.grouped = Some(layer.plan_grouped(&offsets)?),
        }
        Ok(layer)
    }

    fn plan_grouped(&self, offsets: &[u32]) -> Result<Grouped> {
        let (spec, t, dtype) = (&self.spec, self.data.tokens, T::DTYPE);
        let route =
            fused::plan_route_only(&fused::build(dtype, FusedConfig::DEFAULT), spec, t, FusedOutputs::default())?;
        let slots = route.params.gate.slots as usize;
        let config = sgmv::SgmvConfig::of(&self.choice.build)?;
        let gating_build = gating::default_builds()
            .into_iter()
            .find(|b| b.dtype == dtype)
            .ok_or_else(|| MoleError::Unsupported(format!("no gating build for {dtype}")))?;
        let threads = gating_build.block_threads();
        let e = spec.routed_experts();
        let grouping = gating::plan_slot_grouping(t, slots, e, config.bm as usize, threads)?;
        let shape = SgmvShape {
            tokens: t,
            slots,
            d_in: spec.d_in,
            d_out: spec.d_out,
            scale: spec.scale as f32,
            expert_scales: false,
        };
        let sgmv = sgmv::plan(&self.choice.build, shape, offsets, grouping.entry_stride)?;
        let d = self.device;
        Ok(Grouped {
            ids: alloc(d, route.lens.get(Buf::Ids))?,
            weights: alloc(d, route.lens.get(Buf::RouteWeights))?,
            workspace: alloc(d, grouping.lens().get(Buf::PlanWorkspace))?,
            counts: alloc(d, slots * e)?,
            offsets: alloc(d, slots * (e + 1))?,
            entries: alloc(d, slots * grouping.entry_stride)?,
            status: alloc(d, slots)?,
            h_part: alloc(d, sgmv.lens.get(Buf::Partials))?,
            route,
            grouping,
            gating_build,
            sgmv,
        })
    }

    /// The strategy and build this layer runs.
    pub fn choice(&self) -> &Choice {
        &self.choice
    }

    /// Enqueues one forward on the device's stream (`y` accumulates across calls).
    pub fn forward(&mut self) -> Result<()> {
        // Every tensor the layer has; each plan takes the ones it needs (the others pass as null).
        let bufs = FusedBuffers {
            x: Some(&self.x),
            router_weight: self.router_weight.as_ref(),
            router_bias: self.router_bias.as_ref(),
            gate_in: self.gate_in.as_ref(),
            adapter_ids: self.adapter_ids.as_ref(),
            selection_bias: self.selection_bias.as_ref(),
            rank_offsets: Some(&self.rank_offsets),
            cores: self.cores.as_ref(),
            ..FusedBuffers::default()
        };
        if let Some(plan) = &self.fused {
            let bufs = FusedBuffers {
                a: Some(&self.a),
                b: Some(&self.b),
                y: Some(&mut self.y),
                hz_part: self.hz_part.as_mut(),
                ..bufs
            };
            return fused::forward(self.device, &self.choice.build, plan, bufs);
        }
        let g = self.grouped.as_mut().ok_or_else(|| MoleError::Unsupported("layer has no plan".into()))?;
        let route_build = fused::build(T::DTYPE, FusedConfig::DEFAULT);
        let bufs = FusedBuffers { ids: Some(&mut g.ids), weights: Some(&mut g.weights), ..bufs };
        fused::forward(self.device, &route_build, &g.route, bufs)?;
        let out = SlotGroupOutputs {
            counts: &mut g.counts,
            offsets: &mut g.offsets,
            entries: &mut g.entries,
            status: &mut g.status,
        };
        gating::group_slots(self.device, &g.gating_build, &g.grouping, &g.ids, &mut g.workspace, out)?;
        let bufs = SgmvBuffers {
            x: &self.x,
            a: &self.a,
            b: &self.b,
            rank_offsets: &self.rank_offsets,
            expert_scales: None,
            plan_offsets: &g.offsets,
            plan_entries: &g.entries,
            weights: &g.weights,
            h_part: &mut g.h_part,
            y: &mut self.y,
        };
        sgmv::forward(self.device, &self.choice.build, &g.sgmv, bufs)
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
        crate::error::check_len("reference y", &y, &[self.data.tokens, self.spec.d_out])?;
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
        let d_out = self.spec.d_out.max(1);
        let mut rows: Vec<f64> =
            got.chunks(d_out).zip(want.chunks(d_out)).map(|(g, w)| max_scaled_error(g, w)).collect();
        rows.sort_by(|a, b| b.total_cmp(a));
        let t = self.data.tokens;
        let skip = if t >= 100 { t.div_ceil(512) } else { 0 };
        Ok((rows.get(skip).copied().unwrap_or(0.0), self.tolerance()))
    }

    /// The tolerance of [`DeviceLayer::check`]: f32 accumulation over `d_in + R`, and `y`
    /// rounded once (fused) or once per slot pass (grouped).
    pub fn tolerance(&self) -> f64 {
        let slots = self.spec.slots() as f64;
        let roundings = if self.grouped.is_some() { slots + 1.0 } else { 2.0 };
        reference::tolerance(T::DTYPE, self.spec.d_in + self.spec.total_rank() + 16) * roundings
    }

    /// Bytes a forward must move: `x` once, `A`, `B` and the router weights once, `y` read and
    /// written once; the grouped path reads `x` once more per slot.
    pub fn bytes(&self) -> f64 {
        let el = T::DTYPE.size_bytes() as f64;
        let (s, t) = (&self.spec, self.data.tokens as f64);
        let x_reads = if self.grouped.is_some() { 1.0 + s.slots() as f64 } else { 1.0 };
        let weights = (s.total_rank() * (s.d_in + s.d_out)) as f64
            + self.router_weight.as_ref().map_or(0, CudaSlice::len) as f64
            + self.cores.as_ref().map_or(0, CudaSlice::len) as f64;
        el * (x_reads * t * s.d_in as f64 + weights + 2.0 * t * s.d_out as f64)
    }
}

#[cfg(feature = "cli")]
impl<T: KernelElement + DeviceRepr> crate::tune::TunableRun for DeviceLayer<'_, T> {
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
