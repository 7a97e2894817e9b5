//! The layer backward on the runtime: what a training framework calls after a training forward
//! ([`LayerIo::saved`](super::LayerIo::saved)). [`LayerPlanner::plan_backward`] plans the stages
//! of `kernels/backward.cu` (the low-rank and router gradients, `dx`) and one weight-gradient
//! reduction of `kernels/wgrad.cu` per trained parameter, with their workspace, memoised per token
//! count and pure (no GPU); [`CompiledLayer::backward`] and [`CompiledLayer::backward_raw`] run it
//! on the caller's memory and stream with the forward's rules: no allocation, no copy, no
//! synchronisation, the same launches for the same token count and addresses (graph-capturable
//! after [`CompiledLayer::prepare_backward`]). Every gradient is overwritten, not accumulated, and
//! is bit-identical from run to run: the weight gradients are token-split sums reduced in split
//! order, never float atomics.

use super::plan::{bind_regions, carve_workspace, LayerPlanner};
use super::{check_bytes, check_region, CompiledLayer};
use crate::kernels::backward::{self as stages, BackwardConfig};
use crate::kernels::exec::{Backend, Bindings, Buf, BufLens, TypedBindings};
use crate::kernels::wgrad::{self, WgradConfig, WgradOperand, WgradPlan, WgradRowWeight, WgradShape};
use crate::kernels::KernelBuild;
use crate::model::{LayerParam, Router};
use crate::{KernelElement, MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// The backward's workspace regions, in carving order: the f32 tensors the stages hand to the
/// weight gradients, the load-balancing statistics and the weight gradients' split partials.
pub const BACKWARD_WORKSPACE_BUFS: [Buf; 11] = [
    Buf::BwH,
    Buf::BwG,
    Buf::BwDh,
    Buf::BwHm,
    Buf::BwDw,
    Buf::BwW,
    Buf::BwZ,
    Buf::BwDz,
    Buf::BwStatsPartials,
    Buf::BwStats,
    Buf::WgradPartials,
];

/// One weight gradient: its output buffer, its reduction and the layer buffers bound as the
/// reduction's operands.
#[derive(Clone, Debug, PartialEq)]
pub struct WgradJob {
    /// The gradient written (`Buf::DA`, `Buf::DB`, ...).
    pub output: Buf,
    /// The reduction.
    pub plan: WgradPlan,
    /// `(operand, layer buffer)` pairs bound for it (`Bindings::aliased`).
    pub aliases: Vec<(Buf, Buf)>,
}

/// A backward of a given token count: its launches and workspace layout.
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardLayerPlan {
    /// Tokens.
    pub tokens: usize,
    /// The build of stages 1 to 4.
    pub stages_build: KernelBuild,
    /// Stages 1 to 4.
    pub stages: stages::BackwardPlan,
    /// The weight-gradient build.
    pub wgrad_build: KernelBuild,
    /// One reduction per trained parameter, run after the stages.
    pub wgrads: Vec<WgradJob>,
    /// Every buffer the launches take (the caller's, the saved routing, the workspace's).
    pub lens: BufLens,
    /// `(buffer, byte offset)` of each workspace region.
    pub regions: Vec<(Buf, usize)>,
    /// Workspace bytes.
    pub workspace_bytes: usize,
    /// The saved buffer's regions, as the training forward of this token count wrote them.
    pub saved: Vec<(Buf, usize)>,
}

impl BackwardLayerPlan {
    /// The builds the plan launches kernels of.
    pub fn builds(&self) -> [&KernelBuild; 2] {
        [&self.stages_build, &self.wgrad_build]
    }

    /// The gradient buffers the plan writes, each with its element count: `dx`, the gating
    /// input's where the spec takes one, and each trained parameter's.
    pub fn outputs(&self) -> Vec<(Buf, usize)> {
        GRAD_BUFS.iter().map(|&b| (b, self.lens.get(b))).filter(|&(_, n)| n > 0).collect()
    }
}

/// Every gradient buffer a backward may write.
const GRAD_BUFS: [Buf; 7] =
    [Buf::DX, Buf::DGateInput, Buf::DA, Buf::DB, Buf::DRouterWeight, Buf::DRouterBias, Buf::DCores];

impl LayerPlanner {
    /// The plan of a backward over `tokens` tokens (memoised), reading the routing a training
    /// forward of the same count saved ([`LayerPlanner::plan_training`]). Errors: zero tokens, an
    /// expert shard (the backward runs whole layers), and every error of the stages' and the
    /// reductions' plans.
    pub fn plan_backward(&self, tokens: usize) -> Result<Arc<BackwardLayerPlan>> {
        self.backward_plans.get(tokens, || self.make_backward_plan(tokens))
    }

    fn make_backward_plan(&self, tokens: usize) -> Result<BackwardLayerPlan> {
        if self.shard().is_some() {
            return Err(MoleError::Unsupported("the backward of an expert shard: run the whole layer".into()));
        }
        let (spec, dtype) = (self.spec(), self.dtype());
        let forward = self.plan_training(tokens)?;
        let stages_build = stages::build(dtype, BackwardConfig::DEFAULT);
        let stages = stages::plan(&stages_build, spec, tokens)?;
        // The stages read the routing the training forward saved: the same lengths, or an error
        // here rather than reads past the saved regions.
        for buf in [Buf::Ids, Buf::RouteWeights] {
            if stages.lens.get(buf) != forward.lens.get(buf) {
                return Err(MoleError::Unsupported(format!(
                    "the backward reads {} of {} elements, the training forward saves {}",
                    buf.name(),
                    stages.lens.get(buf),
                    forward.lens.get(buf)
                )));
            }
        }
        let wgrad_build = wgrad::build(dtype, WgradConfig::DEFAULT);
        let (d_in, d_out, r, e) = (spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
        let trains = |p| spec.training.trains(p);
        let data = |stride| WgradOperand::Data { stride, col: 0 };
        let float = |stride| WgradOperand::Float { stride, col: 0 };
        // (output, m, n, P, Q, row weight, scale, aliases)
        type Job = (Buf, usize, usize, WgradOperand, WgradOperand, Option<WgradRowWeight>, f64, Vec<(Buf, Buf)>);
        let mut jobs: Vec<Job> = Vec::new();
        if trains(LayerParam::A) {
            let aliases = vec![(Buf::WgradP, Buf::X), (Buf::WgradQFloat, Buf::BwDh)];
            jobs.push((Buf::DA, d_in, r, data(d_in), float(r), None, 1.0, aliases));
        }
        if trains(LayerParam::B) {
            let aliases = vec![(Buf::WgradPFloat, Buf::BwHm), (Buf::WgradQ, Buf::Dy)];
            jobs.push((Buf::DB, r, d_out, float(r), data(d_out), None, spec.scale, aliases));
        }
        if trains(LayerParam::Router) {
            let weight = match spec.router() {
                Some(Router::X { bias }) => Some((data(d_in), d_in, Buf::WgradP, Buf::X, bias)),
                Some(Router::H { bias }) => Some((float(r), r, Buf::WgradPFloat, Buf::BwH, bias)),
                _ => None,
            };
            if let Some((p, m, operand, source, bias)) = weight {
                jobs.push((
                    Buf::DRouterWeight,
                    m,
                    e,
                    p,
                    float(e),
                    None,
                    1.0,
                    vec![(operand, source), (Buf::WgradQFloat, Buf::BwDz)],
                ));
                if bias {
                    jobs.push((
                        Buf::DRouterBias,
                        1,
                        e,
                        WgradOperand::Ones,
                        float(e),
                        None,
                        1.0,
                        vec![(Buf::WgradQFloat, Buf::BwDz)],
                    ));
                }
            }
        }
        if spec.core_count() > 0 && trains(LayerParam::Cores) {
            // dC_c = Σ_t w[t, c] · h_tᵀ g_t: one weighted reduction with an output per core.
            let rw = WgradRowWeight { stride: e, col: 0, count: e };
            let aliases =
                vec![(Buf::WgradPFloat, Buf::BwH), (Buf::WgradQFloat, Buf::BwG), (Buf::WgradRowWeight, Buf::BwW)];
            jobs.push((Buf::DCores, r, r, float(r), float(r), Some(rw), 1.0, aliases));
        }
        let mut wgrads = Vec::new();
        let mut lens = stages.lens;
        for (output, m, n, p, q, row_weight, scale, mut aliases) in jobs {
            let outputs = row_weight.map_or(1, |w| w.count);
            let splits = wgrad::splits_for(&wgrad_build, tokens, m, n, outputs, 2 * self.sm_count() as usize)?;
            let shape = WgradShape { tokens, m, n, splits, p, q, row_weight, scale: scale as f32 };
            let plan = wgrad::plan(&wgrad_build, shape)?;
            lens.set(output, plan.out_len());
            lens.set(Buf::WgradPartials, lens.get(Buf::WgradPartials).max(plan.partials_len()));
            aliases.push((Buf::WgradOut, output));
            wgrads.push(WgradJob { output, plan, aliases });
        }
        let (regions, workspace_bytes) = carve_workspace(&lens, dtype, &BACKWARD_WORKSPACE_BUFS);
        Ok(BackwardLayerPlan {
            tokens,
            stages_build,
            stages,
            wgrad_build,
            wgrads,
            lens,
            regions,
            workspace_bytes,
            saved: forward.saved.clone(),
        })
    }

    /// Runs `plan` through `backend` on `bindings`: the caller's tensors and gradients, the layer's
    /// constants, the saved routing and the workspace regions (bound by
    /// [`BackwardLayerPlan::bind`]). Checks every buffer against the plan before the first launch,
    /// and refuses a gradient the plan does not write (a frozen parameter's).
    ///
    /// # Safety
    /// As `Backend::launch`: every bound address holds at least the plan's length of its buffer;
    /// the saved routing is what the training forward of these inputs wrote; the gradients and the
    /// workspace overlap nothing else.
    pub unsafe fn launch_backward(
        &self,
        plan: &BackwardLayerPlan,
        bindings: &Bindings,
        backend: &mut dyn Backend,
    ) -> Result<()> {
        check_no_extra(plan, bindings)?;
        bindings.check(&plan.lens, "the layer backward")?;
        // SAFETY: forwarded from the caller's contract, checked against the plan above; the
        // reductions run after the stages in stream order, reading what they wrote.
        unsafe {
            stages::run(&plan.stages_build, &plan.stages, bindings, backend)?;
            for job in &plan.wgrads {
                wgrad::run(&plan.wgrad_build, &job.plan, &bindings.aliased(&job.aliases), backend)?;
            }
        }
        Ok(())
    }
}

impl BackwardLayerPlan {
    /// Binds the workspace regions at `workspace` and the saved buffer's at `saved`. Errors when
    /// either base is not 256-byte aligned.
    pub fn bind(&self, bindings: &mut Bindings, workspace: u64, saved: u64) -> Result<()> {
        bind_regions(&self.regions, &self.lens, bindings, workspace)?;
        bind_regions(&self.saved, &self.lens, bindings, saved)
    }
}

/// The caller's tensors of a backward, as cudarc views: the forward's inputs, `dy`, the routing
/// the training forward saved, the gradients to write and the workspace. Optional tensors are
/// those the spec takes; a gradient is given exactly where [`BackwardLayerPlan::outputs`] lists it
/// (none for a frozen parameter).
pub struct BackwardIo<'a, T> {
    /// `x [T, d_in]`.
    pub x: CudaView<'a, T>,
    /// `A [d_in, R]`.
    pub a: CudaView<'a, T>,
    /// `B [R, d_out]`.
    pub b: CudaView<'a, T>,
    /// `dy [T, d_out]`: the loss's gradient with respect to the layer's output.
    pub dy: CudaView<'a, T>,
    /// `router_weight` (`[d_in, E]` or `[R, E]`).
    pub router_weight: Option<CudaView<'a, T>>,
    /// `router_bias [E]`.
    pub router_bias: Option<CudaView<'a, T>>,
    /// Router logits or gate weights the caller computed, `[T, E]`.
    pub gate_input: Option<CudaView<'a, T>>,
    /// `cores [C, R, R]` (CoMoL).
    pub cores: Option<CudaView<'a, T>>,
    /// The saved buffer the training forward of this call wrote.
    pub saved: CudaView<'a, u8>,
    /// `dx [T, d_in]`, overwritten.
    pub dx: CudaViewMut<'a, T>,
    /// `dA [d_in, R]` unless `A` is frozen.
    pub da: Option<CudaViewMut<'a, T>>,
    /// `dB [R, d_out]` unless `B` is frozen.
    pub db: Option<CudaViewMut<'a, T>>,
    /// The router weight's gradient, for a trained x or h router.
    pub d_router_weight: Option<CudaViewMut<'a, T>>,
    /// The router bias's gradient, for a trained router with bias.
    pub d_router_bias: Option<CudaViewMut<'a, T>>,
    /// The logits' or given weights' gradient, `[T, E]`.
    pub d_gate_input: Option<CudaViewMut<'a, T>>,
    /// The cores' gradient unless they are frozen (CoMoL).
    pub d_cores: Option<CudaViewMut<'a, T>>,
    /// The workspace, at least [`CompiledLayer::backward_workspace_bytes`] bytes.
    pub workspace: CudaViewMut<'a, u8>,
}

/// Device addresses of a backward's tensors (0: absent), element types as [`BackwardIo`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackwardPointers {
    /// `x`.
    pub x: CUdeviceptr,
    /// `A`.
    pub a: CUdeviceptr,
    /// `B`.
    pub b: CUdeviceptr,
    /// `dy`.
    pub dy: CUdeviceptr,
    /// `router_weight`.
    pub router_weight: CUdeviceptr,
    /// `router_bias`.
    pub router_bias: CUdeviceptr,
    /// Router logits or gate weights.
    pub gate_input: CUdeviceptr,
    /// `cores`.
    pub cores: CUdeviceptr,
    /// The saved buffer.
    pub saved: CUdeviceptr,
    /// Its size in bytes.
    pub saved_bytes: usize,
    /// `dx`.
    pub dx: CUdeviceptr,
    /// `dA`.
    pub da: CUdeviceptr,
    /// `dB`.
    pub db: CUdeviceptr,
    /// The router weight's gradient.
    pub d_router_weight: CUdeviceptr,
    /// The router bias's gradient.
    pub d_router_bias: CUdeviceptr,
    /// The logits' or given weights' gradient.
    pub d_gate_input: CUdeviceptr,
    /// The cores' gradient.
    pub d_cores: CUdeviceptr,
    /// The workspace.
    pub workspace: CUdeviceptr,
    /// Its size in bytes.
    pub workspace_bytes: usize,
}

impl BackwardPointers {
    fn bind(&self, b: &mut Bindings) {
        for (buf, ptr) in [
            (Buf::X, self.x),
            (Buf::A, self.a),
            (Buf::B, self.b),
            (Buf::Dy, self.dy),
            (Buf::RouterWeight, self.router_weight),
            (Buf::RouterBias, self.router_bias),
            (Buf::GateInput, self.gate_input),
            (Buf::Cores, self.cores),
            (Buf::DX, self.dx),
            (Buf::DA, self.da),
            (Buf::DB, self.db),
            (Buf::DRouterWeight, self.d_router_weight),
            (Buf::DRouterBias, self.d_router_bias),
            (Buf::DGateInput, self.d_gate_input),
            (Buf::DCores, self.d_cores),
        ] {
            b.raw(buf, ptr);
        }
    }
}

/// Refuses a gradient the plan does not write (a frozen parameter's, or one the layer lacks):
/// the caller would read a buffer nothing filled.
fn check_no_extra(plan: &BackwardLayerPlan, bindings: &Bindings) -> Result<()> {
    for buf in GRAD_BUFS {
        if plan.lens.get(buf) == 0 && bindings.ptr(buf) != 0 {
            return Err(MoleError::param(
                buf.name(),
                "given",
                "this layer's backward does not write it (a frozen parameter, or one the spec lacks)",
            ));
        }
    }
    Ok(())
}

impl CompiledLayer {
    /// The plan of a backward over `tokens` tokens, with its kernels loaded: after this, a
    /// backward of `tokens` tokens compiles nothing.
    pub fn prepare_backward(&self, tokens: usize) -> Result<Arc<BackwardLayerPlan>> {
        let plan = self.planner.plan_backward(tokens)?;
        for build in plan.builds() {
            self.loaded(build)?;
        }
        Ok(plan)
    }

    /// Workspace bytes a backward over `tokens` tokens needs.
    pub fn backward_workspace_bytes(&self, tokens: usize) -> Result<usize> {
        Ok(self.planner.plan_backward(tokens)?.workspace_bytes)
    }

    /// The backward of a training forward over `tokens` tokens on the caller's typed views and
    /// `stream`: overwrites `dx` and the gradients of the trained parameters and gating inputs
    /// (see [`crate::reference::backward()`] for what each is). Checks every view's length and
    /// element type against the plan before launching anything.
    pub fn backward<T: KernelElement>(&self, stream: &CudaStream, tokens: usize, io: BackwardIo<'_, T>) -> Result<()> {
        self.check_stream::<T>(stream)?;
        let plan = self.planner.plan_backward(tokens)?;
        let BackwardIo {
            x,
            a,
            b,
            dy,
            router_weight,
            router_bias,
            gate_input,
            cores,
            saved,
            mut dx,
            mut da,
            mut db,
            mut d_router_weight,
            mut d_router_bias,
            mut d_gate_input,
            mut d_cores,
            mut workspace,
        } = io;
        check_bytes("workspace", workspace.len(), plan.workspace_bytes)?;
        check_bytes("saved", saved.len(), self.planner.plan_training(tokens)?.saved_bytes)?;
        let mut tb = TypedBindings::new(stream, T::DTYPE);
        tb.input(Buf::X, &x).input(Buf::A, &a).input(Buf::B, &b).input(Buf::Dy, &dy).output(Buf::DX, &mut dx);
        tb.input_opt(Buf::RouterWeight, router_weight.as_ref())
            .input_opt(Buf::RouterBias, router_bias.as_ref())
            .input_opt(Buf::GateInput, gate_input.as_ref())
            .input_opt(Buf::Cores, cores.as_ref())
            .output_opt(Buf::DA, da.as_mut())
            .output_opt(Buf::DB, db.as_mut())
            .output_opt(Buf::DRouterWeight, d_router_weight.as_mut())
            .output_opt(Buf::DRouterBias, d_router_bias.as_mut())
            .output_opt(Buf::DGateInput, d_gate_input.as_mut())
            .output_opt(Buf::DCores, d_cores.as_mut());
        let (saved_base, saved_guard) = saved.device_ptr(stream);
        let (base, workspace_guard) = workspace.device_ptr_mut(stream);
        let mut bindings = *tb.bindings()?;
        plan.bind(&mut bindings, base, saved_base)?;
        // SAFETY: every address comes from a live view of the stream's context with its length
        // bound and checked against the plan; the gradients and the workspace are distinct `&mut`
        // views; the guards keep each view's stream ordering until the launches are enqueued. The
        // saved routing cannot be checked, but every kernel bounds-checks the ids it reads: a
        // saved buffer the forward did not write gives wrong gradients, never an access outside
        // a buffer.
        let r = unsafe { self.launch_backward(&plan, &mut bindings, stream.cu_stream()) };
        drop((tb, saved_guard, workspace_guard));
        r
    }

    /// [`CompiledLayer::backward`] on raw device pointers and a raw stream.
    ///
    /// # Safety
    /// Every non-zero pointer is a device allocation of the layer's context holding at least the
    /// plan's element count of its buffer ([`BackwardLayerPlan::lens`], element types as
    /// [`BackwardIo`]); the saved buffer holds what the training forward of these inputs wrote;
    /// the workspace holds `workspace_bytes >=` [`CompiledLayer::backward_workspace_bytes`] bytes;
    /// the gradients and the workspace overlap nothing else; `stream` is a live stream of the
    /// layer's context (or null for the legacy default stream), and the buffers stay alive and
    /// untouched by other work until the kernels have finished.
    pub unsafe fn backward_raw(&self, stream: CUstream, tokens: usize, ptrs: BackwardPointers) -> Result<()> {
        let plan = self.planner.plan_backward(tokens)?;
        check_region("workspace", ptrs.workspace, ptrs.workspace_bytes, plan.workspace_bytes)?;
        check_region("saved", ptrs.saved, ptrs.saved_bytes, self.planner.plan_training(tokens)?.saved_bytes)?;
        let mut bindings = Bindings::new();
        ptrs.bind(&mut bindings);
        plan.bind(&mut bindings, ptrs.workspace, ptrs.saved)?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.launch_backward(&plan, &mut bindings, stream) }
    }

    /// Runs `plan` on `bindings` (caller buffers, saved routing and workspace bound) on `stream`.
    ///
    /// # Safety
    /// [`LayerPlanner::launch_backward`]'s contract, with `stream` a live stream of the layer's
    /// context.
    unsafe fn launch_backward(
        &self,
        plan: &BackwardLayerPlan,
        bindings: &mut Bindings,
        stream: CUstream,
    ) -> Result<()> {
        self.bind_constants(bindings);
        let builds = plan.builds().map(|b| self.loaded(b));
        let refs: Vec<Arc<crate::kernels::exec::LoadedBuild>> = builds.into_iter().collect::<Result<_>>()?;
        let refs: Vec<&crate::kernels::exec::LoadedBuild> = refs.iter().map(|b| b.as_ref()).collect();
        self.ctx.bind_to_thread().map_err(crate::cuda::cuda_err("cuCtxSetCurrent"))?;
        // SAFETY: forwarded from the caller's contract; the constants are the layer's own.
        unsafe {
            self.planner.launch_backward(plan, bindings, &mut crate::kernels::exec::CudaBackend::new(&refs, stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of `BackwardPointers` lands on its own buffer.
    #[test]
    fn raw_pointers_bind_to_their_buffers() {
        let ptrs = BackwardPointers {
            x: 1,
            a: 2,
            b: 3,
            dy: 4,
            router_weight: 5,
            router_bias: 6,
            gate_input: 7,
            cores: 8,
            saved: 9,
            saved_bytes: 0,
            dx: 10,
            da: 11,
            db: 12,
            d_router_weight: 13,
            d_router_bias: 14,
            d_gate_input: 15,
            d_cores: 16,
            workspace: 17,
            workspace_bytes: 0,
        };
        let mut b = Bindings::new();
        ptrs.bind(&mut b);
        let want = [
            (Buf::X, 1),
            (Buf::A, 2),
            (Buf::B, 3),
            (Buf::Dy, 4),
            (Buf::RouterWeight, 5),
            (Buf::RouterBias, 6),
            (Buf::GateInput, 7),
            (Buf::Cores, 8),
            (Buf::DX, 10),
            (Buf::DA, 11),
            (Buf::DB, 12),
            (Buf::DRouterWeight, 13),
            (Buf::DRouterBias, 14),
            (Buf::DGateInput, 15),
            (Buf::DCores, 16),
        ];
        for (buf, ptr) in want {
            assert_eq!(b.ptr(buf), ptr, "{}", buf.name());
        }
    }
}
