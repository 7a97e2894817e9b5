//! [`DeviceFfn`]: one FFN-expert block's synthetic tensors on the device, run through the block
//! runtime ([`CompiledFfn::forward_raw`]: cuBLAS for the three dense projections, mole's kernels
//! for the rest) and checked against the f64 reference; [`block_work`], the useful flops and the
//! floor bytes of a forward. What `mole run --method mix-lora` and `mole bench ffn` time.

use crate::cuda::{cuda_err, Blas, Device, DeviceMatrix, Gemm};
use crate::kernels::exec::Buf;
use crate::model::{FfnSpec, ProjectionLora};
use crate::reference::{self, ffn_forward};
use crate::runtime::{CompiledFfn, FfnPointers};
use crate::synth::SyntheticFfn;
use crate::{KernelElement, MoleError, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use std::time::Instant;

/// Most tokens [`DeviceFfn::check`] compares with the f64 reference, spread evenly over the batch
/// (the reference streams the three `d x f` weights per token, in f64).
pub const CHECK_TOKENS: usize = 256;

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
    /// Largest scaled error (`|got - want| / (1 + |want|)`, infinite for a non-finite output)
    /// over the checked tokens after the worst ones left out.
    pub error: f64,
    /// Its bound ([`DeviceFfn::tolerance`]).
    pub tolerance: f64,
    /// Tokens compared.
    pub tokens: usize,
    /// Of those, the worst left out (near-tie routing, see [`DeviceFfn::check`]).
    pub left_out: usize,
    /// Seconds the f64 reference took on the compared tokens.
    pub reference_seconds: f64,
}

impl FfnCheck {
    /// Whether the error is within the tolerance.
    pub fn ok(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// One block on the device: the first `tokens` tokens of a [`SyntheticFfn`] uploaded once, `y`
/// overwritten by every [`DeviceFfn::forward`].
pub struct DeviceFfn<'a, T: DeviceRepr> {
    device: &'a Device,
    spec: FfnSpec,
    data: &'a SyntheticFfn<T>,
    tokens: usize,
    ffn: CompiledFfn,
    // The device tensors `ptrs` points into (kept alive, never read from the host but `y`).
    _inputs: Vec<CudaSlice<T>>,
    y: CudaSlice<T>,
    workspace: CudaSlice<u8>,
    ptrs: FfnPointers,
    /// The dense products of [`DeviceFfn::base_forward`], created on first use.
    blas: Option<Blas>,
}

fn upload<T: DeviceRepr>(device: &Device, v: &[T]) -> Result<CudaSlice<T>> {
    device.stream().clone_htod(v).map_err(cuda_err("cuMemcpyHtoD"))
}

impl<'a, T: KernelElement + DeviceRepr> DeviceFfn<'a, T> {
    /// Uploads the first `tokens` tokens of `data` with its weights and prepares the block
    /// (kernels loaded, workspace allocated).
    ///
    /// Errors, before anything reaches the device: zero tokens (nothing to run or time), more
    /// tokens than `data` has, tensors that do not fit `spec`, and the device memory they need.
    pub fn new(device: &'a Device, spec: &FfnSpec, data: &'a SyntheticFfn<T>, tokens: usize) -> Result<Self> {
        if tokens == 0 {
            return Err(MoleError::ZeroDimension { name: "tokens" });
        }
        if tokens > data.tokens {
            return Err(MoleError::ShapeMismatch {
                what: "tokens (at most the data's)",
                expected: vec![data.tokens],
                got: tokens,
            });
        }
        let (d, f) = (spec.d, spec.f);
        crate::limits::check_len("router_weight", &data.router_weight, &[d, spec.experts])?;
        for (name, w) in ["base_gate", "base_up", "base_down"].into_iter().zip(&data.base) {
            crate::limits::check_len(name, w, &[d, f])?;
        }
        for ((name, lora), bank) in spec.projections().iter().zip(&data.banks) {
            let (n_in, n_out) = if *name == "down" { (f, d) } else { (d, f) };
            match (lora, bank) {
                (Some(l), Some((a, b))) => {
                    crate::limits::check_len("LoRA A", a, &[n_in, l.ranks.total_rank()])?;
                    crate::limits::check_len("LoRA B", b, &[l.ranks.total_rank(), n_out])?;
                }
                (None, None) => {}
                (Some(_), None) => return Err(MoleError::MissingInput { name, needed_by: "its LoRA in the spec" }),
                (None, Some(_)) => return Err(MoleError::UnexpectedInput { name, reason: "no LoRA in the spec" }),
            }
        }
        let ffn = CompiledFfn::new(device, spec, T::DTYPE)?;
        let ws = ffn.prepare(tokens)?.workspace_bytes;
        let inputs =
            SyntheticFfn::<T>::bytes(spec, tokens)?.saturating_add((tokens * d * T::DTYPE.size_bytes()) as u64);
        device.check_memory(&format!("the block's tensors on {tokens} tokens"), inputs.saturating_add(ws as u64))?;
        let stream = device.stream();
        let x = upload(device, &data.x[..tokens * d])?;
        let router = upload(device, &data.router_weight)?;
        let base = data.base.iter().map(|w| upload(device, w)).collect::<Result<Vec<_>>>()?;
        let mut banks = [(0, 0); 3];
        let mut inputs = vec![x, router];
        let ptr = |s: &CudaSlice<T>| s.device_ptr(stream).0;
        for (i, bank) in data.banks.iter().enumerate() {
            if let Some((a, b)) = bank {
                let (a, b) = (upload(device, a)?, upload(device, b)?);
                banks[i] = (ptr(&a), ptr(&b));
                inputs.extend([a, b]);
            }
        }
        // NaN until the first forward writes it.
        let mut y = upload(device, &vec![T::from_f64(f64::NAN); tokens * d])?;
        let mut workspace = stream.alloc_zeros::<u8>(ws.max(1)).map_err(cuda_err("cuMemAlloc"))?;
        let ptrs = FfnPointers {
            x: ptr(&inputs[0]),
            gating: [ptr(&inputs[1]), 0, 0, 0, 0],
            base: [ptr(&base[0]), ptr(&base[1]), ptr(&base[2])],
            banks,
            y: y.device_ptr_mut(stream).0,
            workspace: workspace.device_ptr_mut(stream).0,
            workspace_bytes: ws,
        };
        inputs.extend(base);
        Ok(DeviceFfn { device, spec: spec.clone(), data, tokens, ffn, _inputs: inputs, y, workspace, ptrs, blas: None })
    }

    /// The block runtime this runs.
    pub fn block(&self) -> &CompiledFfn {
        &self.ffn
    }

    /// The tokens of a forward.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Enqueues one forward on the device's stream: `y = block(x)`.
    pub fn forward(&mut self) -> Result<()> {
        // SAFETY: every pointer is a live allocation of the device's context owned by `self`
        // with its tensor's length for `self.tokens` tokens, the workspace of the plan's size
        // (allocations are 256-byte aligned); all work runs on the device's stream.
        unsafe { self.ffn.forward_raw(self.device.stream().cu_stream(), self.tokens, self.ptrs) }
    }

    /// Enqueues the dense base FFN alone on the same buffers: `G = x·W_gate`, `U = x·W_up` into
    /// the stage buffers and `y = a_mix·W_down` (the three cuBLAS products of a forward, without
    /// the routing, the activation and the LoRA): what the block's overhead is measured against.
    pub fn base_forward(&mut self) -> Result<()> {
        if self.blas.is_none() {
            self.blas = Some(Blas::new(self.device)?);
        }
        let blas = self.blas.as_ref().expect("created above");
        let (t, d, f, dtype) = (self.tokens, self.spec.d, self.spec.f, T::DTYPE);
        let stage = self.ffn.stage_buffers(t, self.ptrs.workspace)?;
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
        let plan = self.ffn.prepare(self.tokens)?;
        let (_, off) = plan
            .regions
            .iter()
            .find(|(b, _)| *b == Buf::Ids)
            .copied()
            .ok_or_else(|| MoleError::Unsupported("the FFN block's workspace has no routing ids".into()))?;
        let len = plan.lens.get(Buf::Ids);
        let bytes = self.device.stream().clone_dtoh(&self.workspace.slice(off..off + 4 * len));
        let bytes = bytes.map_err(cuda_err("cuMemcpyDtoH"))?;
        Ok(bytes.chunks_exact(4).map(bytemuck::pod_read_unaligned).collect())
    }

    /// [`block_work`] of a forward, on the routing the device chose (runs one forward).
    pub fn work(&mut self) -> Result<BlockWork> {
        let ids = self.routed_ids()?;
        Ok(block_work(&self.spec, self.tokens, &ids, T::DTYPE.size_bytes()))
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

    /// Poisons `y` (NaN), runs one forward and compares it with the f64 reference on at most
    /// [`CHECK_TOKENS`] tokens spread evenly over the batch (every token up to that many; a
    /// block's tokens are independent of each other, so a strided sample reaches every tile).
    /// The worst `ceil(n / 512)` of `n >= 100` compared tokens are left out, as in the layer's
    /// check: router scores are f32 sums on the device, so a token whose deciding scores tie to
    /// within f32 rounding may be routed differently from the f64 reference.
    pub fn check(&mut self) -> Result<FfnCheck> {
        let (t, d) = (self.tokens, self.spec.d);
        let stream = self.device.stream();
        let nan = vec![T::from_f64(f64::NAN); t * d];
        stream.memcpy_htod(&nan, &mut self.y).map_err(cuda_err("cuMemcpyHtoD"))?;
        self.forward()?;
        let got = stream.clone_dtoh(&self.y).map_err(cuda_err("cuMemcpyDtoH"))?;
        let n = t.min(CHECK_TOKENS);
        let rows: Vec<usize> = (0..n).map(|i| i * t / n).collect();
        let x: Vec<T> = rows.iter().flat_map(|&r| self.data.x[r * d..(r + 1) * d].iter().copied()).collect();
        let start = Instant::now();
        let want = ffn_forward(&self.spec, &self.data.inputs_on(n, &x))?.y;
        let reference_seconds = start.elapsed().as_secs_f64();
        let mut errors: Vec<f64> = rows
            .iter()
            .zip(want.chunks(d))
            .map(|(&r, w)| {
                let g: Vec<f64> = got[r * d..(r + 1) * d].iter().map(|v| v.to_f64()).collect();
                if g.iter().all(|v| v.is_finite()) {
                    reference::max_scaled_error(&g, w)
                } else {
                    f64::INFINITY
                }
            })
            .collect();
        errors.sort_by(|a, b| b.total_cmp(a));
        let left_out = if n >= 100 { n.div_ceil(512) } else { 0 };
        let error = errors.get(left_out).copied().unwrap_or(0.0);
        Ok(FfnCheck { error, tolerance: self.tolerance(), tokens: n, left_out, reference_seconds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FfnMethod, FfnShape};

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
