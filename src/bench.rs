//! Benchmark drivers shared by `mole bench` and the criterion benches: the standard shapes, the
//! bytes each must move, and one timed run on the device with a correctness check against the
//! reference for the shapes small enough to check on the CPU.

use crate::cuda::{cuda_err, time_on_device, Device};
use crate::kernels::sgmv::{self, SgmvBuffers, SgmvPlan, SgmvShape, SlotPlans};
use crate::kernels::KernelBuild;
use crate::model::RankLayout;
use crate::plan::{RoutingPlan, TokenSlot};
use crate::reference::max_scaled_error;
use crate::reference::{self, Bank, Routing};
use crate::synth::Rng;
use crate::{DType, KernelElement, MoleError, Result};
use cudarc::driver::{CudaSlice, DeviceRepr};

/// One grouped (SGMV) benchmark shape: uniform rank, `k` distinct random experts per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedCase {
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Rank per expert.
    pub rank: usize,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub k: usize,
    /// Tokens.
    pub tokens: usize,
}

/// `(d_in, d_out)` of the standard shapes: a square projection and the MLP projections of
/// Llama-2-7B (11008) and Llama-3-8B (14336).
pub const STANDARD_DIMS: [(usize, usize); 5] =
    [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)];

impl GroupedCase {
    /// The standard shapes: every combination of [`STANDARD_DIMS`], r in {8, 16, 64},
    /// E in {8, 64, 512}, k in {1, 2}, T in {1, 16, 256, 4096, 16384} when `all`; otherwise the
    /// square projection at r = 16 over every E, k and T.
    pub fn standard(all: bool) -> Vec<GroupedCase> {
        let dims: &[(usize, usize)] = if all { &STANDARD_DIMS } else { &STANDARD_DIMS[..1] };
        let ranks: &[usize] = if all { &[8, 16, 64] } else { &[16] };
        let mut out = Vec::new();
        for &(d_in, d_out) in dims {
            for &rank in ranks {
                for experts in [8, 64, 512] {
                    for k in [1, 2] {
                        for tokens in [1, 16, 256, 4096, 16384] {
                            out.push(GroupedCase { d_in, d_out, rank, experts, k, tokens });
                        }
                    }
                }
            }
        }
        out
    }

    /// Bytes that must move: `x` read once per selected slot, `A` and `B` of each expert that
    /// received a token read once, `y` read and written once.
    pub fn bytes(&self, dtype: DType, touched_experts: usize) -> f64 {
        let el = dtype.size_bytes() as f64;
        let x = (self.tokens * self.k * self.d_in) as f64;
        let ab = (touched_experts * self.rank * (self.d_in + self.d_out)) as f64;
        let y = 2.0 * (self.tokens * self.d_out) as f64;
        el * (x + ab + y)
    }

    /// Useful floating-point operations: `2 · T · k · r · (d_in + d_out)`.
    pub fn flops(&self) -> f64 {
        2.0 * (self.tokens * self.k * self.rank * (self.d_in + self.d_out)) as f64
    }
}

/// One measured shape.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupedResult {
    /// The shape.
    pub case: GroupedCase,
    /// Median time of a forward (shrink + one expand per slot), ms.
    pub median_ms: f64,
    /// Effective bandwidth over [`GroupedCase::bytes`], GB/s.
    pub gbs: f64,
    /// Useful TFLOP/s.
    pub tflops: f64,
    /// `Some(max scaled error)` when the shape was checked against the reference.
    pub checked_error: Option<f64>,
}

/// Random distinct experts per token (uniform), weights in `(0, 1)`.
pub fn random_routing(tokens: usize, experts: usize, k: usize, rng: &mut Rng) -> Routing {
    let mut ids = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        while row.len() < k {
            let e = rng.below(experts) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids.extend(row);
    }
    let weights = (0..tokens * k).map(|_| rng.range(0.05, 1.0)).collect();
    Routing { tokens, slots: k, experts, ids, weights, probs: None }
}

/// Host inputs of one grouped forward: the bank, the routing, and `x`, `y` in storage type `T`.
#[derive(Clone, Debug)]
pub struct GroupedData<T> {
    /// `x [T, d_in]`.
    pub x: Vec<T>,
    /// `A [d_in, R]`.
    pub a: Vec<T>,
    /// `B [R, d_out]`.
    pub b: Vec<T>,
    /// `y [T, d_out]` before the update.
    pub y: Vec<T>,
    /// The bank's rank layout.
    pub ranks: RankLayout,
    /// Per-token expert ids and weights.
    pub routing: Routing,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Delta scale.
    pub scale: f64,
}

impl<T: KernelElement> GroupedData<T> {
    /// Random inputs and routing for `case`: unit-scale activations, weights scaled by
    /// `1/sqrt(fan_in)`, `k` distinct uniform experts per token.
    pub fn random(case: &GroupedCase) -> Result<Self> {
        let c = *case;
        if c.k == 0 || c.k > c.experts {
            return Err(MoleError::InvalidK { k: c.k, experts: c.experts });
        }
        let mut rng = Rng::new(0x5EED ^ c.tokens as u64);
        let ranks = RankLayout::uniform(c.experts, c.rank)?;
        let r = ranks.total_rank();
        Ok(Self {
            x: rng.fill(c.tokens * c.d_in, 1.0),
            a: rng.fill(c.d_in * r, (3.0 / c.d_in as f64).sqrt()),
            b: rng.fill(r * c.d_out, (3.0 / c.rank as f64).sqrt()),
            y: rng.fill(c.tokens * c.d_out, 1.0),
            routing: random_routing(c.tokens, c.experts, c.k, &mut rng),
            ranks,
            d_in: c.d_in,
            d_out: c.d_out,
            scale: 1.0,
        })
    }
}

/// One grouped forward prepared on the device: the data uploaded, the per-slot plans built on
/// the host, and the default build of the storage type `T`.
pub struct GroupedRun<'d, T: DeviceRepr> {
    device: &'d Device,
    build: KernelBuild,
    plan: SgmvPlan,
    data: GroupedData<T>,
    x: CudaSlice<T>,
    a: CudaSlice<T>,
    b: CudaSlice<T>,
    rank_offsets: CudaSlice<u32>,
    plan_offsets: CudaSlice<u32>,
    plan_entries: CudaSlice<TokenSlot>,
    weights: CudaSlice<f32>,
    h_part: CudaSlice<f32>,
    y: CudaSlice<T>,
}

impl<'d, T: KernelElement + DeviceRepr> GroupedRun<'d, T> {
    /// Random data for `case` (see [`GroupedData::random`]), uploaded.
    pub fn new(device: &'d Device, case: &GroupedCase) -> Result<Self> {
        Self::with_data(device, GroupedData::random(case)?)
    }

    /// Uploads `data` for the default build of `T` (see [`GroupedRun::with_build`]).
    pub fn with_data(device: &'d Device, data: GroupedData<T>) -> Result<Self> {
        let build = sgmv::default_builds()
            .into_iter()
            .find(|b| b.dtype == T::DTYPE)
            .ok_or_else(|| MoleError::Unsupported(format!("no default sgmv build for {}", T::DTYPE)))?;
        Self::with_build(device, data, build)
    }

    /// Uploads `data` to run with `build` (an sgmv build of dtype `T`, e.g. an autotuning
    /// candidate); validates the call through [`SlotPlans::build`] and [`sgmv::plan`].
    pub fn with_build(device: &'d Device, data: GroupedData<T>, build: KernelBuild) -> Result<Self> {
        if build.dtype != T::DTYPE {
            return Err(MoleError::param("build", &build, "its dtype is not the storage type of the data"));
        }
        let r = &data.routing;
        let config = sgmv::SgmvConfig::of(&build)?;
        let plans = SlotPlans::build(&r.ids, r.tokens, r.slots, r.experts, config.bm as usize)?;
        let offsets: Vec<u32> = data.ranks.offsets().iter().map(|&o| o as u32).collect();
        let shape = SgmvShape {
            tokens: r.tokens,
            slots: r.slots,
            d_in: data.d_in,
            d_out: data.d_out,
            scale: data.scale as f32,
            expert_scales: false,
        };
        let plan = sgmv::plan(&build, shape, &offsets, plans.entry_stride)?;
        let stream = device.stream();
        let up = cuda_err("cuMemcpyHtoD");
        let w32: Vec<f32> = r.weights.iter().map(|&w| w as f32).collect();
        Ok(Self {
            device,
            x: stream.clone_htod(&data.x).map_err(&up)?,
            a: stream.clone_htod(&data.a).map_err(&up)?,
            b: stream.clone_htod(&data.b).map_err(&up)?,
            y: stream.clone_htod(&data.y).map_err(&up)?,
            rank_offsets: stream.clone_htod(&offsets).map_err(&up)?,
            plan_offsets: stream.clone_htod(&plans.offsets).map_err(&up)?,
            plan_entries: stream.clone_htod(&plans.entries).map_err(&up)?,
            weights: stream.clone_htod(&w32).map_err(&up)?,
            h_part: stream
                .alloc_zeros::<f32>(plan.lens.get(crate::kernels::exec::Buf::Partials).max(1))
                .map_err(cuda_err("cuMemAlloc"))?,
            build,
            plan,
            data,
        })
    }

    /// Enqueues one forward on the device's stream (y accumulates; the traffic is the same).
    pub fn forward(&mut self) -> Result<()> {
        let bufs = SgmvBuffers {
            x: &self.x,
            a: &self.a,
            b: &self.b,
            rank_offsets: &self.rank_offsets,
            expert_scales: None,
            plan_offsets: &self.plan_offsets,
            plan_entries: &self.plan_entries,
            weights: &self.weights,
            h_part: &mut self.h_part,
            y: &mut self.y,
        };
        sgmv::forward(self.device, &self.build, &self.plan, bufs)
    }

    /// Resets y, runs one forward and returns y (widened to f64) and the f64 reference's y.
    pub fn check(&mut self) -> Result<(Vec<f64>, Vec<f64>)> {
        let stream = self.device.stream();
        stream.memcpy_htod(&self.data.y, &mut self.y).map_err(cuda_err("cuMemcpyHtoD"))?;
        self.forward()?;
        let got = stream.clone_dtoh(&self.y).map_err(cuda_err("cuMemcpyDtoH"))?;
        let d = &self.data;
        let r = &d.routing;
        let f = crate::dtype::to_f64_vec;
        let (x, a, b, y) = (f(&d.x), f(&d.a), f(&d.b), f(&d.y));
        let rp = RoutingPlan::build(&r.ids, r.tokens, r.slots, r.experts, 1)?;
        let bank =
            Bank { a: &a, b: &b, ranks: &d.ranks, scale: d.scale, expert_scales: None, d_in: d.d_in, d_out: d.d_out };
        Ok((f(&got), reference::grouped_forward(&x, &y, bank, r, &rp)))
    }

    /// Experts that received at least one token.
    pub fn touched_experts(&self) -> usize {
        let r = &self.data.routing;
        let mut seen = vec![false; r.experts];
        r.ids.iter().filter(|&&id| id >= 0).for_each(|&id| seen[id as usize] = true);
        seen.iter().filter(|&&s| s).count()
    }
}

/// Times `case` (median of `runs` after warm-up) and, with `check`, compares it with the reference.
pub fn bench_grouped<T: KernelElement + DeviceRepr>(
    device: &Device,
    case: &GroupedCase,
    runs: usize,
    check: bool,
) -> Result<GroupedResult> {
    let mut run = GroupedRun::<T>::new(device, case)?;
    let checked_error = if check {
        let (got, want) = run.check()?;
        Some(max_scaled_error(&got, &want))
    } else {
        None
    };
    let timing = time_on_device(device, 3, runs, || run.forward())?;
    let median_ms = timing.median_ms();
    let secs = median_ms * 1e-3;
    Ok(GroupedResult {
        case: *case,
        median_ms,
        gbs: case.bytes(T::DTYPE, run.touched_experts()) / secs / 1e9,
        tflops: case.flops() / secs / 1e12,
        checked_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_shapes_cover_the_issue_grid() {
        assert_eq!(GroupedCase::standard(true).len(), 5 * 3 * 3 * 2 * 5);
        let quick = GroupedCase::standard(false);
        assert_eq!(quick.len(), 3 * 2 * 5);
        assert!(quick.iter().all(|c| c.d_in == 4096 && c.rank == 16));
    }

    #[test]
    fn bytes_and_flops_by_hand() {
        let c = GroupedCase { d_in: 4, d_out: 2, rank: 3, experts: 5, k: 2, tokens: 10 };
        // bf16: x 10*2*4 + A/B 2*3*(4+2) + y 2*10*2 = 80 + 36 + 40 = 156 elements of 2 bytes.
        assert_eq!(c.bytes(DType::BF16, 2), 312.0);
        assert_eq!(c.flops(), 2.0 * 10.0 * 2.0 * 3.0 * 6.0);
    }

    #[test]
    fn random_routing_has_distinct_experts() {
        let r = random_routing(100, 8, 3, &mut Rng::new(1));
        for row in r.ids.chunks(3) {
            assert!(row[0] != row[1] && row[0] != row[2] && row[1] != row[2]);
        }
        assert!(RoutingPlan::build(&r.ids, 100, 3, 8, 1).is_ok());
    }
}
