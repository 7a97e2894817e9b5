//! [`DeviceFfn`]: one FFN-expert block's synthetic tensors on the device, run through the block
//! runtime ([`CompiledFfn::forward_raw`]: cuBLAS for the three dense projections, the block's
//! kernels for the rest) with its chosen build or a fixed one (the autotuner's candidates), and
//! checked against the f64 reference; [`block_work`], the useful flops and floor bytes of a
//! forward. What `mole run --method mix-lora`, `mole bench ffn` and the autotuner time.

use super::device_layer::{row_error, upload, upload_opt};
use crate::cuda::{cuda_err, Blas, Device, DeviceMatrix, Gemm};
use crate::kernels::exec::Buf;
use crate::kernels::KernelBuild;
use crate::model::{FfnSpec, ProjectionLora};
use crate::reference::{self, ffn_forward};
use crate::runtime::{CompiledFfn, FfnLayerPlan, FfnPointers};
use crate::synth::SyntheticFfn;
use crate::{KernelElement, MoleError, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use std::sync::Arc;
use std::time::Instant;

/// Multiply-adds the f64 reference of a check may spend (about 20 s on 2 cores): the reference
/// streams the three `d x f` base weights once per token, so large blocks are checked on their
/// first [`check_tokens`] tokens.
const CHECK_MADDS: f64 = 1.6e10;

/// Most tokens a block's check compares, whatever the budget.
pub const CHECK_TOKENS: usize = 256;

/// Tokens a block's check compares: the first `min(T, CHECK_TOKENS)` while the reference stays
/// within `CHECK_MADDS`, else the first `CHECK_MADDS / (3·d·f)` (at least 1). Every token is
/// routed and computed on its own, so the rows of a prefix are exact rows of the whole batch.
pub fn check_tokens(spec: &FfnSpec, tokens: usize) -> usize {
    let per_token = 3.0 * spec.d as f64 * spec.f as f64;
    ((CHECK_MADDS / per_token.max(1.0)) as usize).clamp(1, CHECK_TOKENS).min(tokens)
}

/// What a forward must do at the least: `flops` useful (`2·T·3·d·f` for the base projections,
/// `2·r_e·(n_in + n_out)` per selected token and adapted projection for the LoRA), `bytes` that
/// must move (`x` read, `y` written, the router weight and the three base weights read once, `A`
/// and `B` of each expert that received a token read once, and the stage buffers `G`, `U` and
/// `a_mix` written and read once each).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockWork {
    /// Useful floating-point operations.
    pub flops: f64,
    /// Floor bytes.
    pub bytes: f64,
}

/// [`BlockWork`] of a forward of `spec` over `tokens` tokens in elements of `element_bytes`,
/// routed as `ids` (`[T, slots]`, `-1` for an empty slot; ids out of range count nothing).
pub fn block_work(spec: &FfnSpec, tokens: usize, ids: &[i32], element_bytes: usize) -> BlockWork {
    let (t, d, f) = (tokens as f64, spec.d as f64, spec.f as f64);
    let loras: Vec<&ProjectionLora> = spec.projections().iter().filter_map(|(_, l)| *l).collect();
    // Expert `e`'s LoRA columns over the three projections, each `r_e·(n_in + n_out)` elements.
    let lora_elements = |e: usize| -> f64 {
        let rank = |l: &ProjectionLora| if e < l.ranks.num_experts() { l.ranks.rank(e) } else { 0 };
        loras.iter().map(|l| rank(l) as f64 * (d + f)).sum()
    };
    let mut received = vec![false; spec.experts];
    let mut flops = 2.0 * t * 3.0 * d * f;
    for id in ids.iter().filter_map(|&id| usize::try_from(id).ok()).filter(|&id| id < spec.experts) {
        received[id] = true;
        flops += 2.0 * lora_elements(id);
    }
    let banks: f64 = (0..spec.experts).filter(|&e| received[e]).map(lora_elements).sum();
    let elements = 2.0 * t * d + d * spec.experts as f64 + 3.0 * d * f + banks + 3.0 * 2.0 * t * f;
    BlockWork { flops, bytes: element_bytes as f64 * elements }
}

/// The comparison of one forward with the f64 reference ([`DeviceFfn::check`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FfnCheck {
    /// Largest scaled error (`|got - want| / (1 + |want|)`, infinite for a non-finite row) over
    /// the checked tokens after the worst ones left out.
    pub error: f64,
    /// Its bound ([`DeviceFfn::tolerance`]).
    pub tolerance: f64,
    /// Tokens compared (the first [`check_tokens`]).
    pub tokens: usize,
    /// Of those, the worst left out (near-tie routing, see [`DeviceFfn::check`]).
    pub left_out: usize,
    /// Seconds the f64 reference took (0 when it was given).
    pub reference_seconds: f64,
}

impl FfnCheck {
    /// Whether the error is within the tolerance.
    pub fn ok(&self) -> bool {
        self.error <= self.tolerance
    }
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
    workspace: CudaSlice<u8>,
    ptrs: FfnPointers,
    /// The dense products of [`DeviceFfn::base_forward`], created on first use.
    blas: Option<Blas>,
    /// The f64 reference `y` of the first [`check_tokens`] tokens, computed on first use (or
    /// given, see [`DeviceFfn::with_reference`]).
    reference: Option<Arc<Vec<f64>>>,
}

impl<'d, T: KernelElement + DeviceRepr> DeviceFfn<'d, T> {
    /// Uploads `data` and prepares the block (kernels loaded, workspace allocated) to run
    /// `ffn_build`, or the block's own choice when `None` (the default build).
    ///
    /// Errors, before anything reaches the device: zero tokens, data that does not fit `spec`
    /// (checked by the reference's input rules), a build the block cannot run
    /// ([`crate::runtime::FfnPlanner::with_build`]), and the device memory it needs.
    pub fn new(
        device: &'d Device,
        spec: &FfnSpec,
        data: SyntheticFfn<T>,
        ffn_build: Option<KernelBuild>,
    ) -> Result<Self> {
        let t = data.tokens;
        if t == 0 {
            return Err(MoleError::ZeroDimension { name: "tokens" });
        }
        reference::check_ffn_inputs(spec, &data.inputs(t))?;
        let block = CompiledFfn::new(device, spec, T::DTYPE)?;
        let block = match ffn_build {
            Some(b) => block.with_build(b),
            None => block,
        };
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
            workspace,
            ptrs,
            reference: None,
            blas: None,
        })
    }

    /// The block runtime this runs.
    pub fn block(&self) -> &CompiledFfn {
        &self.block
    }

    /// The tokens of a forward.
    pub fn tokens(&self) -> usize {
        self.data.tokens
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

    /// Enqueues the dense base FFN alone on the same buffers: `G = x·W_gate`, `U = x·W_up` into
    /// the stage buffers and `y = a_mix·W_down` (the three cuBLAS products of a forward, without
    /// the routing, the activation and the LoRA): what the block's overhead is measured against.
    pub fn base_forward(&mut self) -> Result<()> {
        if self.blas.is_none() {
            self.blas = Some(Blas::new(self.device)?);
        }
        let blas = self.blas.as_ref().ok_or_else(|| MoleError::Unsupported("no cuBLAS handle".into()))?;
        let (t, d, f, dtype) = (self.data.tokens, self.spec.d, self.spec.f, T::DTYPE);
        let stage = self.block.stage_buffers(t, self.ptrs.workspace)?;
        let m = |ptr: u64, rows: usize, cols: usize| DeviceMatrix { ptr, len: rows * cols, ld: cols };
        let up_proj = Gemm { dtype, m: t, n: f, k: d, alpha: 1.0, beta: 0.0 };
        let down_proj = Gemm { dtype, m: t, n: d, k: f, alpha: 1.0, beta: 0.0 };
        let (p, stream) = (&self.ptrs, self.device.stream().cu_stream());
        // SAFETY: as in `forward`; the stage buffers are workspace regions of `T·f` elements.
        unsafe {
            blas.gemm(stream, &up_proj, m(p.x, t, d), m(p.base[0], d, f), m(stage.gate_out, t, f))?;
            blas.gemm(stream, &up_proj, m(p.x, t, d), m(p.base[1], d, f), m(stage.up_out, t, f))?;
            blas.gemm(stream, &down_proj, m(stage.a_mix, t, f), m(p.base[2], f, d), m(p.y, t, d))
        }
    }

    /// Runs one forward and returns the routing the device chose (`[T, slots]`, `-1` for an
    /// empty slot), read back from the workspace.
    pub fn routed_ids(&mut self) -> Result<Vec<i32>> {
        self.forward()?;
        let (_, off) = self
            .plan
            .regions
            .iter()
            .find(|(b, _)| *b == Buf::Ids)
            .copied()
            .ok_or_else(|| MoleError::Unsupported("the FFN block's workspace has no routing ids".into()))?;
        let len = self.plan.lens.get(Buf::Ids);
        let bytes = self.device.stream().clone_dtoh(&self.workspace.slice(off..off + 4 * len));
        let bytes = bytes.map_err(cuda_err("cuMemcpyDtoH"))?;
        Ok(bytes.chunks_exact(4).map(bytemuck::pod_read_unaligned).collect())
    }

    /// [`block_work`] of a forward, on the routing the device chose (runs one forward).
    pub fn work(&mut self) -> Result<BlockWork> {
        let ids = self.routed_ids()?;
        Ok(block_work(&self.spec, self.data.tokens, &ids, T::DTYPE.size_bytes()))
    }

    /// Poisons `y` (NaN), runs one forward and compares the first [`check_tokens`] rows with
    /// the f64 reference (computed once, or given by [`DeviceFfn::with_reference`]). The worst
    /// `ceil(n / 512)` of `n >= 100` compared tokens are left out, as in the layer's check:
    /// router scores are f32 sums on the device, so a token whose deciding scores tie within f32
    /// rounding may be routed differently from the f64 reference.
    pub fn check(&mut self) -> Result<FfnCheck> {
        let (t, d) = (self.data.tokens, self.spec.d);
        let stream = self.device.stream();
        let nan = vec![T::from_f64(f64::NAN); t * d];
        stream.memcpy_htod(&nan, &mut self.y).map_err(cuda_err("cuMemcpyHtoD"))?;
        self.forward()?;
        let got = crate::dtype::to_f64_vec(&stream.clone_dtoh(&self.y).map_err(cuda_err("cuMemcpyDtoH"))?);
        let n = check_tokens(&self.spec, t);
        let start = Instant::now();
        let want = match &self.reference {
            Some(y) => y.clone(),
            None => Arc::new(ffn_forward(&self.spec, &self.data.inputs(n))?.y),
        };
        let reference_seconds = if self.reference.is_some() { 0.0 } else { start.elapsed().as_secs_f64() };
        self.reference = Some(want.clone());
        let left_out = if n >= 100 { n.div_ceil(512) } else { 0 };
        let error = row_error(&got[..n * d], &want, d, n);
        Ok(FfnCheck { error, tolerance: self.tolerance(), tokens: n, left_out, reference_seconds })
    }

    /// The tolerance of [`DeviceFfn::check`]: f32 accumulation over the chained reductions
    /// (`d` for `G`, `U` and the gate and up shrinks, `f` for the down projection and its shrink,
    /// the largest expert rank for the expands), times the roundings to the dtype an element of
    /// `y` goes through: `G` and `U` (once, the activation's slope below 1.13), `a_mix` after
    /// every slot pass, `y` after the base product and after every down pass (`2·slots + 2`).
    pub fn tolerance(&self) -> f64 {
        let s = &self.spec;
        let rank = s.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.max_rank()).max().unwrap_or(0);
        reference::tolerance(T::DTYPE, s.d + s.f + rank) * (2.0 * s.slots() as f64 + 2.0)
    }

    /// [`block_work`]'s bytes with every expert receiving tokens (an upper bound of the floor
    /// when the routing is not read back; [`DeviceFfn::work`] counts the routing's experts).
    pub fn bytes(&self) -> f64 {
        let all: Vec<i32> = (0..self.spec.experts as i32).collect();
        block_work(&self.spec, self.data.tokens, &all, T::DTYPE.size_bytes()).bytes
    }
}

impl<T: KernelElement + DeviceRepr> super::TunableRun for DeviceFfn<'_, T> {
    fn run(&mut self) -> Result<()> {
        self.forward()
    }

    /// See [`DeviceFfn::check`].
    fn check(&mut self) -> Result<(f64, f64)> {
        DeviceFfn::check(self).map(|c| (c.error, c.tolerance))
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
        assert_eq!(check_tokens(&spec(256, 704), 200), 200);
        assert_eq!(check_tokens(&spec(256, 704), 1), 1);
        // LLaMA-3-8B: 1.6e10 / (3 · 4096 · 14336) = 90 tokens.
        assert_eq!(check_tokens(&spec(4096, 14336), 4096), 90);
        assert_eq!(check_tokens(&spec(4096, 14336), 16), 16);
        assert!(check_tokens(&spec(4096, 14336), 4096) as f64 * 3.0 * 4096.0 * 14336.0 <= CHECK_MADDS);
        // Never more than CHECK_TOKENS.
        assert_eq!(check_tokens(&spec(64, 96), 4096), CHECK_TOKENS);
    }

    #[test]
    fn the_work_counts_the_selected_experts_only() {
        let shape = FfnShape { d: 10, f: 30, experts: 4, rank: 2, k: 2, alpha: 4.0, activation: Default::default() };
        let spec = FfnMethod::MixLora.spec(shape).unwrap();
        // Three tokens, two slots: experts 0 and 2 receive tokens (5 selections), 1 and 3 none.
        let ids = [0, 2, 2, -1, 0, 2];
        let w = block_work(&spec, 3, &ids, 2);
        let (t, d, f) = (3.0, 10.0, 30.0);
        let lora_per_slot = 3.0 * 2.0 * 2.0 * (d + f);
        assert_eq!(w.flops, 2.0 * t * 3.0 * d * f + 5.0 * lora_per_slot);
        let banks = 2.0 * 3.0 * 2.0 * (d + f);
        let elements = 2.0 * t * d + d * 4.0 + 3.0 * d * f + banks + 6.0 * t * f;
        assert_eq!(w.bytes, 2.0 * elements);
        // An expert that receives a token adds its banks once, whatever its token count.
        let more = block_work(&spec, 3, &[0, 1, 0, 1, 0, 1], 2);
        assert_eq!(more.bytes, w.bytes);
        assert!(block_work(&spec, 3, &[0, 1, 2, 3, 0, 1], 2).bytes > w.bytes);
    }
}
