//! [`DeviceFfn`]: one FFN-expert block's synthetic tensors on the device, run through the block
//! runtime ([`CompiledFfn`], cuBLAS forward) with a fixed ffn build (and its SGMV pair), and
//! checked against the f64 reference. What the autotuner times for a block.

use super::device_layer::{row_error, upload, upload_opt};
use crate::cuda::{cuda_err, Device};
use crate::kernels::KernelBuild;
use crate::model::FfnSpec;
use crate::reference::{self, ffn_forward};
use crate::runtime::{CompiledFfn, FfnLayerPlan, FfnPointers};
use crate::synth::SyntheticFfn;
use crate::{KernelElement, MoleError, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use std::sync::Arc;

/// Multiply-adds the f64 reference of a check may spend (about 20 s on 2 cores): the reference
/// streams the three `d x f` base weights once per token, so large blocks are checked on their
/// first [`check_tokens`] tokens.
const CHECK_MADDS: f64 = 1.6e10;

/// Tokens a block's check compares: all of them while the reference stays within
/// `CHECK_MADDS`, else the first `CHECK_MADDS / (3·d·f)` (at least 1). Every token is routed
/// and computed on its own, so the rows of a prefix are exact rows of the whole batch.
pub fn check_tokens(spec: &FfnSpec, tokens: usize) -> usize {
    let per_token = 3.0 * spec.d as f64 * spec.f as f64;
    ((CHECK_MADDS / per_token.max(1.0)) as usize).clamp(1, tokens.max(1)).min(tokens)
}

/// One block on the device: inputs uploaded once, `y` overwritten by every
/// [`DeviceFfn::forward`].
pub struct DeviceFfn<'d, T: DeviceRepr> {
    device: &'d Device,
    spec: FfnSpec,
    data: SyntheticFfn<T>,
    block: CompiledFfn,
    plan: Arc<FfnLayerPlan>,
    /// The device tensors (kept alive: `ptrs` points into them).
    _tensors: Vec<CudaSlice<T>>,
    _adapter_ids: Option<CudaSlice<i32>>,
    y: CudaSlice<T>,
    _workspace: CudaSlice<u8>,
    ptrs: FfnPointers,
    /// The f64 reference `y` of the first [`check_tokens`] tokens, computed on first use (or
    /// given, see [`DeviceFfn::with_reference`]).
    reference: Option<Arc<Vec<f64>>>,
}

impl<'d, T: KernelElement + DeviceRepr> DeviceFfn<'d, T> {
    /// Uploads `data` and prepares the block to run `ffn_build` (kernels loaded, workspace
    /// allocated).
    ///
    /// Errors, before anything reaches the device: zero tokens, data of another token count than
    /// `tokens` in `spec`'s shapes (checked by the reference's input rules), and a build the
    /// block cannot run ([`crate::runtime::FfnPlanner::with_build`]).
    pub fn new(device: &'d Device, spec: &FfnSpec, data: SyntheticFfn<T>, ffn_build: KernelBuild) -> Result<Self> {
        let t = data.tokens;
        if t == 0 {
            return Err(MoleError::ZeroDimension { name: "tokens" });
        }
        reference::check_ffn_inputs(spec, &data.inputs(t))?;
        let block = CompiledFfn::new(device, spec, T::DTYPE)?.with_build(ffn_build);
        let plan = block.prepare(t)?;
        let inputs = SyntheticFfn::<T>::bytes(spec, t)?;
        device.check_memory(&format!("the block's inputs on {t} tokens"), inputs)?;
        let ws = plan.workspace_bytes.max(1);
        device.check_memory(&format!("a workspace of {ws} bytes"), ws as u64)?;
        let stream = device.stream();
        let workspace = stream.alloc_zeros::<u8>(ws).map_err(cuda_err("cuMemAlloc"))?;
        // Poisoned: the block overwrites `y`, so a row it misses is NaN and fails the check.
        let y = upload(device, &vec![T::from_f64(f64::NAN); t * spec.d])?;
        // The addresses are taken once: the slices live as long as `self`, and every use is on
        // the device's stream, in order.
        let ptr = |s: &CudaSlice<T>| -> CUdeviceptr { s.device_ptr(stream).0 };
        let mut tensors = Vec::new();
        let mut keep = |s: Option<CudaSlice<T>>| -> CUdeviceptr {
            s.map_or(0, |s| {
                let p = ptr(&s);
                tensors.push(s);
                p
            })
        };
        let x = keep(Some(upload(device, &data.x)?));
        let gating = [
            keep(upload_opt(device, data.router_weight.as_deref())?),
            keep(upload_opt(device, data.router_bias.as_deref())?),
            keep(upload_opt(device, data.logits.as_deref().or(data.weights.as_deref()))?),
            0,
            keep(upload_opt(device, data.selection_bias.as_deref())?),
        ];
        let base = [
            keep(Some(upload(device, &data.base[0])?)),
            keep(Some(upload(device, &data.base[1])?)),
            keep(Some(upload(device, &data.base[2])?)),
        ];
        let mut banks = [(0, 0); 3];
        for (slot, bank) in banks.iter_mut().zip(&data.banks) {
            if let Some((a, b)) = bank {
                *slot = (keep(Some(upload(device, a)?)), keep(Some(upload(device, b)?)));
            }
        }
        let adapter_ids = upload_opt(device, data.adapter_ids.as_deref())?;
        let mut ptrs = FfnPointers {
            x,
            gating,
            base,
            banks,
            y: ptr(&y),
            workspace: workspace.device_ptr(stream).0,
            workspace_bytes: ws,
        };
        ptrs.gating[3] = adapter_ids.as_ref().map_or(0, |s| s.device_ptr(stream).0);
        Ok(DeviceFfn {
            device,
            spec: spec.clone(),
            data,
            block,
            plan,
            _tensors: tensors,
            _adapter_ids: adapter_ids,
            y,
            _workspace: workspace,
            ptrs,
            reference: None,
        })
    }

    /// The ffn build this block runs.
    pub fn build(&self) -> &KernelBuild {
        &self.plan.ffn.0
    }

    /// Enqueues one forward (cuBLAS base projections and the block's kernels) on the device's
    /// stream.
    pub fn forward(&mut self) -> Result<()> {
        let stream = self.device.stream().cu_stream();
        // SAFETY: every pointer is a live allocation of this struct on the device's context,
        // uploaded from data checked against the spec for `tokens` tokens; the workspace holds
        // the plan's bytes (256-byte aligned, as every allocation); `y` and the workspace overlap
        // nothing; all work runs on the device's stream.
        unsafe { self.block.forward_raw(stream, self.data.tokens, self.ptrs) }
    }

    /// Uses `y` as the f64 reference output of the first [`check_tokens`] tokens (shared between
    /// the candidates of one tuned shape, so the reference runs once).
    pub fn with_reference(mut self, y: Arc<Vec<f64>>) -> Result<Self> {
        let n = check_tokens(&self.spec, self.data.tokens);
        crate::limits::check_len("reference y", &y, &[n, self.spec.d])?;
        self.reference = Some(y);
        Ok(self)
    }

    /// Runs one forward and compares the first [`check_tokens`] rows of `y` with the f64
    /// reference: `(error, tolerance)`, the error as [`super::DeviceLayer::check`]'s.
    pub fn check(&mut self) -> Result<(f64, f64)> {
        let stream = self.device.stream();
        self.forward()?;
        let got = crate::dtype::to_f64_vec(&stream.clone_dtoh(&self.y).map_err(cuda_err("cuMemcpyDtoH"))?);
        let n = check_tokens(&self.spec, self.data.tokens);
        let want = match &self.reference {
            Some(y) => y.clone(),
            None => Arc::new(ffn_forward(&self.spec, &self.data.inputs(n))?.y),
        };
        self.reference = Some(want.clone());
        Ok((row_error(&got[..n * self.spec.d], &want, self.spec.d, n), self.tolerance()))
    }

    /// The tolerance of [`DeviceFfn::check`]: f32 accumulation over `d + f + R`, and up to
    /// `slots + 3` roundings to the dtype on an element's way (`G`/`U`, `a_mix` per pass, `y`
    /// after the base and after each down pass).
    pub fn tolerance(&self) -> f64 {
        let rank = crate::tune::ShapeKey::for_ffn(&self.spec, T::DTYPE, 1).total_rank;
        reference::tolerance(T::DTYPE, self.spec.d + self.spec.f + rank) * (self.spec.slots() as f64 + 3.0)
    }

    /// Bytes a forward must move at least: `x` read, the base weights, the LoRA banks and the
    /// router read once, `G` and `U` written and read, `a_mix` written and read, `y` written.
    pub fn bytes(&self) -> f64 {
        let el = T::DTYPE.size_bytes() as f64;
        let (s, t) = (&self.spec, self.data.tokens as f64);
        let (d, f) = (s.d as f64, s.f as f64);
        let banks: f64 = s.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.total_rank() as f64).sum();
        let router = self.data.router_weight.as_ref().map_or(0, Vec::len) as f64;
        el * (t * d + 3.0 * d * f + banks * (d + f) + router + 6.0 * t * f + t * d)
    }
}

impl<T: KernelElement + DeviceRepr> super::TunableRun for DeviceFfn<'_, T> {
    fn run(&mut self) -> Result<()> {
        self.forward()
    }

    /// See [`DeviceFfn::check`].
    fn check(&mut self) -> Result<(f64, f64)> {
        DeviceFfn::check(self)
    }

    fn bytes(&self) -> f64 {
        DeviceFfn::bytes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FfnMethod, FfnShape};

    #[test]
    fn large_blocks_are_checked_on_a_prefix() {
        let spec = |d, f| {
            let s = FfnShape { d, f, experts: 8, rank: 16, k: 2, alpha: 32.0, activation: Default::default() };
            FfnMethod::MixLora.spec(s).unwrap()
        };
        // Small: every token.
        assert_eq!(check_tokens(&spec(256, 704), 4096), 4096);
        assert_eq!(check_tokens(&spec(256, 704), 1), 1);
        // LLaMA-3-8B: 1.6e10 / (3 · 4096 · 14336) = 90 tokens.
        assert_eq!(check_tokens(&spec(4096, 14336), 4096), 90);
        assert_eq!(check_tokens(&spec(4096, 14336), 16), 16);
        assert!(check_tokens(&spec(4096, 14336), 4096) as f64 * 3.0 * 4096.0 * 14336.0 <= CHECK_MADDS);
    }
}
