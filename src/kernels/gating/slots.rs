//! Per-slot routing plans on the device: the plan kernels in column mode build plan `s` from
//! column `s` of `ids [T, slots]` in place (no copy of `ids`, nothing on the host), packed as
//! [`crate::kernels::sgmv::SlotPlans`] lays them out for the SGMV kernels: `offsets [slots, E + 1]`
//! and `entries [slots, entry_stride]` with `entry_stride = `[`entry_capacity`], entries past each
//! plan's length filled with [`TokenSlot::PADDING`].

use super::launch::{bind_group, check_build, check_plan_build, launch_all, load, pack_plan, RawGroupPointers};
use super::{plan_grouping, GroupingPlan, PlanParams};
use crate::cuda::Device;
use crate::kernels::exec::{Backend, Bindings, Buf, BufLens, CudaBackend, LoadedBuild};
use crate::kernels::sgmv::entry_capacity;
use crate::kernels::KernelBuild;
use crate::plan::TokenSlot;
use crate::{MoleError, Result};
use cudarc::driver::sys::CUstream;
use cudarc::driver::CudaSlice;
use std::ops::Range;

/// A validated launch set of per-slot routing plans: the three plan kernels once per slot, slot
/// `s` with [`SlotGroupingPlan::params`]`(s)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotGroupingPlan {
    /// The launches of one slot (its parameters are those of slot 0) and the buffers of the
    /// whole call (see [`SlotGroupingPlan::lens`]): in column mode every launch addresses the
    /// packed buffers.
    pub grouping: GroupingPlan,
    /// Slots (plans).
    pub slots: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Entries between two plans: [`entry_capacity`]`(T, E, block)`, which fits any routing.
    pub entry_stride: usize,
}

impl SlotGroupingPlan {
    /// The kernels' parameters for slot `s` (`s < slots`).
    pub fn params(&self, s: usize) -> PlanParams {
        debug_assert!(s < self.slots);
        PlanParams { column: s as u32, ..self.grouping.params }
    }

    /// Element counts of the buffers: [`Buf::Ids`] `[T, slots]`, the [`Buf::PlanWorkspace`]
    /// (capacity, reused by every slot in stream order), [`Buf::PlanCounts`] `[slots, E]`,
    /// [`Buf::PlanOffsets`] `[slots, E + 1]`, [`Buf::PlanEntries`] `[slots, entry_stride]`
    /// (padding included) and [`Buf::PlanStatus`] `[slots]`.
    pub fn lens(&self) -> &BufLens {
        &self.grouping.lens
    }
}

/// Plans the per-slot routing plans of `ids [tokens, slots]` over the experts `experts` of
/// `global_experts` (as [`plan_grouping`]: `0..E, E` for a whole layer, an expert-parallel
/// shard's range otherwise; plan expert `e` is global expert `experts.start + e`), segments
/// padded to a multiple of `block` (the SGMV build's `bm`).
///
/// Errors: `slots`, `experts` or `block` zero, more than [`super::MAX_EXPERTS`] experts, a range
/// past `global_experts`, a bad block size, `tokens` or `slots` past 32 bits, or a plan capacity
/// ([`entry_capacity`]) or a packed buffer past what 32-bit offsets and the host can address.
pub fn plan_slot_grouping(
    tokens: usize,
    slots: usize,
    experts: Range<usize>,
    global_experts: usize,
    block: usize,
    block_threads: u32,
) -> Result<SlotGroupingPlan> {
    if slots == 0 {
        return Err(MoleError::ZeroDimension { name: "slots" });
    }
    let ids_stride = u32::try_from(slots).map_err(|_| MoleError::param("slots", slots, "must fit in 32 bits"))?;
    let mut grouping = plan_grouping(tokens, 1, experts, global_experts, block, block_threads)?;
    let experts = grouping.params.experts as usize;
    let capacity = tokens as u128 + experts as u128 * (block as u128 - 1);
    if capacity > u32::MAX as u128 {
        return Err(MoleError::param("tokens", tokens, "slot plan capacity exceeds 2^32 entries"));
    }
    let entry_stride = entry_capacity(tokens, experts, block);
    let ids = tokens.checked_mul(slots);
    let (Some(ids), Some(entries), Some(offsets)) =
        (ids, slots.checked_mul(entry_stride), slots.checked_mul(experts + 1))
    else {
        return Err(MoleError::param("slots", slots, "packed slot plans exceed the address space"));
    };
    grouping.params.ids_stride = ids_stride;
    grouping.params.entry_stride = entry_stride as u32;
    let workspace = grouping.lens.get(Buf::PlanWorkspace);
    grouping.lens = BufLens::new()
        .with(Buf::Ids, ids)
        .with(Buf::PlanWorkspace, workspace)
        .with(Buf::PlanCounts, slots * experts)
        .with(Buf::PlanOffsets, offsets)
        .with(Buf::PlanEntries, entries)
        .with(Buf::PlanStatus, slots);
    Ok(SlotGroupingPlan { grouping, slots, experts, entry_stride })
}

/// Runs the per-slot plans of `plan` on the buffers of `bindings` through `backend`: the plan
/// kernels once per slot, in slot order, slot `s` reading column `s` of [`Buf::Ids`] and writing
/// plan `s` of the packed outputs. Lengths as [`SlotGroupingPlan::lens`]; everything is checked
/// before the first launch.
///
/// # Safety
/// As [`super::run_route`].
pub unsafe fn run_group_slots(
    build: &KernelBuild,
    plan: &SlotGroupingPlan,
    bindings: &Bindings,
    backend: &mut dyn Backend,
) -> Result<()> {
    check_plan_build(build, build.dtype, "slot grouping plan", plan.grouping.scan.block)?;
    bindings.check(plan.lens(), "the routing-plan kernels")?;
    // Every slot packs the same kernels from the same bindings: slot 0 checks them all.
    let mut packed = pack_plan(&plan.grouping, &plan.params(0), bindings)?;
    for s in 0..plan.slots {
        if s > 0 {
            packed = pack_plan(&plan.grouping, &plan.params(s), bindings)?;
        }
        // SAFETY: the caller's contract; slot `s` < slots writes counts[s*E..][..E],
        // offsets[s*(E+1)..][..E+1], entries[s*entry_stride..][..entry_stride] and status[s],
        // inside the checked lengths (offsets[E] <= entry_capacity); passes run in stream order.
        unsafe { launch_all(build, &mut packed, backend) }?;
    }
    Ok(())
}

/// The device buffers [`group_slots`] writes.
#[derive(Debug)]
pub struct SlotGroupOutputs<'a> {
    /// Tokens per expert per slot, `[slots, E]`.
    pub counts: &'a mut CudaSlice<u32>,
    /// Segment starts per slot, `[slots, E + 1]`.
    pub offsets: &'a mut CudaSlice<u32>,
    /// `[slots, entry_stride]` entries, padding included.
    pub entries: &'a mut CudaSlice<TokenSlot>,
    /// `[slots]`: 1 where column `s` held an id outside `-1..global_experts` (skipped), else 0.
    pub status: &'a mut CudaSlice<u32>,
}

/// Builds the per-slot routing plans of `ids [T, slots]` on the device, in the packed layout of
/// [`crate::kernels::sgmv::SlotPlans`] at `entry_stride = `[`SlotGroupingPlan::entry_stride`],
/// through [`run_group_slots`] on the device's stream. Any build dtype will do.
pub fn group_slots(
    device: &Device,
    build: &KernelBuild,
    plan: &SlotGroupingPlan,
    ids: &CudaSlice<i32>,
    workspace: &mut CudaSlice<u32>,
    out: SlotGroupOutputs<'_>,
) -> Result<()> {
    check_build(build, build.dtype)?;
    let b = bind_group(device, build, ids, workspace, [out.counts, out.offsets, out.status], out.entries);
    let g = &plan.grouping;
    let loaded = load(device, build, &[g.count, Some(g.scan), g.scatter])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: every address comes from a live slice of the device's context with its length
    // bound (checked against the plan by `run_group_slots`); the outputs are distinct borrows.
    unsafe { run_group_slots(build, plan, b.bindings()?, &mut CudaBackend::new(&builds, device.stream().cu_stream())) }
}

/// [`group_slots`] on caller-owned device memory and stream, through [`run_group_slots`]. The
/// pointers are those of [`RawGroupPointers`] with the per-slot lengths of
/// [`SlotGroupingPlan::lens`]: `ids [T, slots]` (i32), the workspace (u32), `counts [slots, E]`,
/// `offsets [slots, E + 1]` (u32), `entries [slots, entry_stride]` ([`TokenSlot`]) and
/// `status [slots]` (u32). Presence is checked before any launch.
///
/// # Safety
/// - every pointer is a device allocation of the device's context holding at least the element
///   count and type listed above for `plan`;
/// - the outputs and the workspace overlap nothing else;
/// - `stream` is a live stream of the device's context (or null for the legacy default stream),
///   and the buffers stay alive and untouched by other work until the kernels have finished.
pub unsafe fn group_slots_raw(
    device: &Device,
    build: &KernelBuild,
    plan: &SlotGroupingPlan,
    ptrs: RawGroupPointers,
    stream: CUstream,
) -> Result<()> {
    check_build(build, build.dtype)?;
    let g = &plan.grouping;
    let loaded = load(device, build, &[g.count, Some(g.scan), g.scatter])?;
    let builds: Vec<&LoadedBuild> = loaded.iter().collect();
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_group_slots(build, plan, &ptrs.bindings(), &mut CudaBackend::new(&builds, stream)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gating::tests::{bound, record};
    use crate::kernels::gating::{build, MAX_CHUNKS};
    use crate::DType;

    #[test]
    fn slot_plan_bounds() {
        let p = plan_slot_grouping(1000, 3, 0..8, 8, 16, 128).unwrap();
        assert_eq!(p.entry_stride, entry_capacity(1000, 8, 16));
        assert_eq!((p.slots, p.experts), (3, 8));
        let q = p.params(2);
        assert_eq!((q.tokens, q.slots, q.ids_stride, q.column, q.entry_stride), (1000, 1, 3, 2, 1000 + 8 * 15));
        assert_eq!((q.chunk_entries, q.chunks), (1024, 1));
        let want = BufLens::new()
            .with(Buf::Ids, 3000)
            .with(Buf::PlanWorkspace, 9)
            .with(Buf::PlanCounts, 24)
            .with(Buf::PlanOffsets, 27)
            .with(Buf::PlanEntries, 3 * p.entry_stride)
            .with(Buf::PlanStatus, 3);
        assert_eq!(p.lens(), &want);
        let (c, sc) = (p.grouping.count.unwrap(), p.grouping.scatter.unwrap());
        assert_eq!((c.grid, c.block, c.shared_bytes), (1, 128, 4 * 8 * 4));
        assert_eq!((sc.grid, p.grouping.scan.grid, p.grouping.scan.shared_bytes), (1, 1, 128));
        // Many tokens: bounded chunks, one warp each.
        let big = plan_slot_grouping(5_000_000, 2, 0..64, 64, 32, 256).unwrap();
        assert!(big.grouping.params.chunks as u64 <= MAX_CHUNKS);
        assert_eq!(big.grouping.count.unwrap().grid, big.grouping.params.chunks.div_ceil(8));
        assert_eq!(big.entry_stride, entry_capacity(5_000_000, 64, 32));
        // No tokens: only the scan runs (it still writes zero offsets and padding).
        let empty = plan_slot_grouping(0, 2, 0..4, 4, 8, 128).unwrap();
        assert!(empty.grouping.count.is_none() && empty.grouping.scatter.is_none());
        assert_eq!(empty.entry_stride, entry_capacity(0, 4, 8));
        assert_eq!(empty.lens().get(Buf::PlanWorkspace), 1);
    }

    #[test]
    fn slot_plans_are_validated() {
        assert!(matches!(plan_slot_grouping(10, 0, 0..4, 4, 4, 128), Err(MoleError::ZeroDimension { name: "slots" })));
        assert!(matches!(plan_slot_grouping(10, 2, 0..0, 0, 4, 128), Err(MoleError::ZeroDimension { .. })));
        assert!(matches!(plan_slot_grouping(10, 2, 0..4, 4, 0, 128), Err(MoleError::ZeroDimension { .. })));
        assert!(plan_slot_grouping(10, 2, 0..1025, 1025, 4, 128).is_err());
        assert!(plan_slot_grouping(10, 2, 0..4, 4, 4, 100).is_err());
        assert!(plan_slot_grouping(u32::MAX as usize, 2, 0..2, 2, 2, 128).is_err());
        assert!(plan_slot_grouping(1 << 20, 2, 0..1024, 1024, 1 << 23, 128).is_err());

        let b = build(DType::BF16, 128);
        let p = plan_slot_grouping(10, 2, 0..4, 4, 4, 128).unwrap();
        // SAFETY: the recorder keeps the launches without touching the fake addresses.
        let run = |binds: &Bindings, b: &KernelBuild| record(|r| unsafe { run_group_slots(b, &p, binds, r) });
        let ok = bound(p.lens());
        let launches = run(&ok, &b).unwrap();
        assert_eq!(launches.len(), 3 * 2);
        let columns: Vec<u32> =
            launches.iter().map(|l| bytemuck::pod_read_unaligned::<PlanParams>(l.params()).column).collect();
        assert_eq!(columns, [0, 0, 0, 1, 1, 1]);
        let with = |buf: Buf, n: usize| {
            let mut x = ok;
            x.sized(buf, ok.ptr(buf), n);
            run(&x, &b)
        };
        assert!(with(Buf::Ids, 10).is_err());
        assert!(with(Buf::PlanWorkspace, 0).is_err());
        for (buf, n) in
            [(Buf::PlanCounts, 4), (Buf::PlanOffsets, 5), (Buf::PlanEntries, p.entry_stride), (Buf::PlanStatus, 1)]
        {
            assert!(matches!(with(buf, n), Err(MoleError::ShapeMismatch { .. })), "{buf:?}");
        }
        assert!(run(&ok, &build(DType::BF16, 64)).is_err());
    }
}
