//! Per-slot routing plans on the device: the plan kernels in column mode build plan `s` from
//! column `s` of `ids [T, slots]` in place (no copy of `ids`, nothing on the host), packed as
//! [`crate::kernels::sgmv::SlotPlans`] lays them out for the SGMV kernels: `offsets [slots, E + 1]`
//! and `entries [slots, entry_stride]` with `entry_stride = `[`entry_capacity`], entries past each
//! plan's length filled with [`TokenSlot::PADDING`].

use super::launch::{check_buffer, check_plan_build, function, launch_raw, require, RawGroupPointers};
use super::{plan_grouping, GroupingPlan, PlanParams};
use crate::cuda::{cuda_err, Device};
use crate::kernels::sgmv::entry_capacity;
use crate::kernels::KernelBuild;
use crate::plan::TokenSlot;
use crate::{MoleError, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, PushKernelArg};
use std::ffi::c_void;

/// A validated launch set of per-slot routing plans: the three plan kernels once per slot, slot
/// `s` with [`SlotGroupingPlan::params`]`(s)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotGroupingPlan {
    /// The launches of one slot; its parameters are those of slot 0.
    pub grouping: GroupingPlan,
    /// Slots (plans).
    pub slots: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Entries between two plans: [`entry_capacity`]`(T, E, block)`, which fits any routing.
    pub entry_stride: usize,
    /// Workspace size in 4-byte words (reused by every slot, in stream order).
    pub workspace_words: usize,
}

impl SlotGroupingPlan {
    /// The kernels' parameters for slot `s` (`s < slots`).
    pub fn params(&self, s: usize) -> PlanParams {
        debug_assert!(s < self.slots);
        PlanParams { column: s as u32, ..self.grouping.params }
    }

    /// Length of `counts [slots, E]`.
    pub fn counts_len(&self) -> usize {
        self.slots * self.experts
    }

    /// Length of `offsets [slots, E + 1]`.
    pub fn offsets_len(&self) -> usize {
        self.slots * (self.experts + 1)
    }

    /// Length of `entries [slots, entry_stride]`.
    pub fn entries_len(&self) -> usize {
        self.slots * self.entry_stride
    }
}

/// Plans the per-slot routing plans of `ids [tokens, slots]` over `experts` experts, segments
/// padded to a multiple of `block` (the SGMV build's `bm`).
///
/// Errors: `slots`, `experts` or `block` zero, more than [`super::MAX_EXPERTS`] experts, a bad
/// block size, `tokens` or `slots` past 32 bits, or a plan capacity ([`entry_capacity`]) or a
/// packed buffer past what 32-bit offsets and the host can address.
pub fn plan_slot_grouping(
    tokens: usize,
    slots: usize,
    experts: usize,
    block: usize,
    block_threads: u32,
) -> Result<SlotGroupingPlan> {
    if slots == 0 {
        return Err(MoleError::ZeroDimension { name: "slots" });
    }
    let ids_stride = u32::try_from(slots).map_err(|_| MoleError::param("slots", slots, "must fit in 32 bits"))?;
    let mut grouping = plan_grouping(tokens, 1, experts, block, block_threads)?;
    let capacity = tokens as u128 + experts as u128 * (block as u128 - 1);
    if capacity > u32::MAX as u128 {
        return Err(MoleError::param("tokens", tokens, "slot plan capacity exceeds 2^32 entries"));
    }
    let entry_stride = entry_capacity(tokens, experts, block);
    if slots.checked_mul(entry_stride).is_none() || slots.checked_mul(experts + 1).is_none() {
        return Err(MoleError::param("slots", slots, "packed slot plans exceed the address space"));
    }
    grouping.params.ids_stride = ids_stride;
    grouping.params.entry_stride = entry_stride as u32;
    grouping.max_entries = entry_stride;
    let workspace_words = grouping.workspace_words;
    Ok(SlotGroupingPlan { grouping, slots, experts, entry_stride, workspace_words })
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
    /// `[slots]`: 1 where column `s` held an id outside `-1..E` (skipped), else 0.
    pub status: &'a mut CudaSlice<u32>,
}

/// Checks a per-slot grouping call's buffer lengths (`[counts, offsets, entries, status]`).
pub(super) fn check_group_slots(
    build: &KernelBuild,
    plan: &SlotGroupingPlan,
    ids_len: usize,
    workspace_len: usize,
    out_lens: [usize; 4],
) -> Result<()> {
    check_plan_build(build, build.dtype, "slot grouping plan", plan.grouping.scan.block)?;
    check_buffer("ids", ids_len, &[plan.grouping.params.tokens as usize, plan.slots])?;
    let [counts, offsets, entries, status] = out_lens;
    check_buffer("counts", counts, &[plan.slots, plan.experts])?;
    check_buffer("offsets", offsets, &[plan.slots, plan.experts + 1])?;
    check_buffer("entries", entries, &[plan.slots, plan.entry_stride])?;
    check_buffer("status", status, &[plan.slots])?;
    if workspace_len < plan.workspace_words {
        return Err(MoleError::ShapeMismatch {
            what: "plan workspace",
            expected: vec![plan.workspace_words],
            got: workspace_len,
        });
    }
    Ok(())
}

/// Builds the per-slot routing plans of `ids [T, slots]` on the device, in the packed layout of
/// [`crate::kernels::sgmv::SlotPlans`] at `entry_stride = `[`SlotGroupingPlan::entry_stride`]:
/// the plan kernels run once per slot, in slot order, on the device's stream, reading column `s`
/// of `ids` in place. Every buffer is checked before the first launch. Any build dtype will do.
pub fn group_slots(
    device: &Device,
    build: &KernelBuild,
    plan: &SlotGroupingPlan,
    ids: &CudaSlice<i32>,
    workspace: &mut CudaSlice<u32>,
    out: SlotGroupOutputs<'_>,
) -> Result<()> {
    let out_lens = [out.counts.len(), out.offsets.len(), out.entries.len(), out.status.len()];
    check_group_slots(build, plan, ids.len(), workspace.len(), out_lens)?;
    let g = &plan.grouping;
    let count = g.count.map(|l| function(device, build, &l).map(|f| (l, f))).transpose()?;
    let scan = function(device, build, &g.scan)?;
    let scatter = g.scatter.map(|l| function(device, build, &l).map(|f| (l, f))).transpose()?;
    let stream = device.stream();
    for s in 0..plan.slots {
        let params = plan.params(s);
        if let Some((l, f)) = &count {
            let mut args = stream.launch_builder(f);
            args.arg(&params).arg(ids).arg(&mut *workspace);
            // SAFETY: arguments match gating_plan_count; the kernel reads ids [T, slots] at
            // column `s` < slots and writes workspace_words words, lengths checked above.
            unsafe { args.launch(l.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
        }
        let mut args = stream.launch_builder(&scan);
        args.arg(&params).arg(&mut *workspace).arg(&mut *out.counts).arg(&mut *out.offsets);
        args.arg(&mut *out.entries).arg(&mut *out.status);
        // SAFETY: arguments match gating_plan_scan; slot `s` writes counts[s*E..][..E],
        // offsets[s*(E+1)..][..E+1], entries[s*entry_stride..][..entry_stride] and status[s],
        // inside the buffers whose lengths were checked above.
        unsafe { args.launch(g.scan.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
        if let Some((l, f)) = &scatter {
            let mut args = stream.launch_builder(f);
            args.arg(&params).arg(ids).arg(&*workspace).arg(&mut *out.entries);
            // SAFETY: arguments match gating_plan_scatter; writes stay inside plan `s`'s
            // entry_stride entries (offsets[E] <= entry_capacity), lengths checked above.
            unsafe { args.launch(l.config()) }.map_err(cuda_err("cuLaunchKernel"))?;
        }
    }
    Ok(())
}

/// [`group_slots`] on caller-owned device memory and stream. The pointers are those of
/// [`RawGroupPointers`] with the per-slot lengths: `ids [T, slots]` (i32), `workspace_words`
/// u32, `counts [slots, E]`, `offsets [slots, E + 1]` (u32), `entries [slots, entry_stride]`
/// ([`TokenSlot`]) and `status [slots]` (u32). Presence is checked before any launch.
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
    check_plan_build(build, build.dtype, "slot grouping plan", plan.grouping.scan.block)?;
    let mut p = ptrs;
    for (name, v) in [
        ("workspace", p.workspace),
        ("counts", p.counts),
        ("offsets", p.offsets),
        ("status", p.status),
        ("entries", p.entries),
    ] {
        require(name, v)?;
    }
    let g = &plan.grouping;
    if g.count.is_some() {
        require("ids", p.ids)?;
    }
    let a = |v: &mut CUdeviceptr| v as *mut CUdeviceptr as *mut c_void;
    for s in 0..plan.slots {
        let mut params = plan.params(s);
        if let Some(launch) = g.count {
            let mut args = [&mut params as *mut _ as *mut c_void, a(&mut p.ids), a(&mut p.workspace)];
            // SAFETY: arguments match gating_plan_count; pointers per this function's contract.
            unsafe { launch_raw(device, build, &launch, stream, &mut args) }?;
        }
        let mut args = [
            &mut params as *mut _ as *mut c_void,
            a(&mut p.workspace),
            a(&mut p.counts),
            a(&mut p.offsets),
            a(&mut p.entries),
            a(&mut p.status),
        ];
        // SAFETY: arguments match gating_plan_scan; pointers per this function's contract.
        unsafe { launch_raw(device, build, &g.scan, stream, &mut args) }?;
        if let Some(launch) = g.scatter {
            let mut args =
                [&mut params as *mut _ as *mut c_void, a(&mut p.ids), a(&mut p.workspace), a(&mut p.entries)];
            // SAFETY: arguments match gating_plan_scatter; pointers per this function's contract.
            unsafe { launch_raw(device, build, &launch, stream, &mut args) }?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gating::{build, MAX_CHUNKS};
    use crate::DType;

    #[test]
    fn slot_plan_bounds() {
        let p = plan_slot_grouping(1000, 3, 8, 16, 128).unwrap();
        assert_eq!(p.entry_stride, entry_capacity(1000, 8, 16));
        assert_eq!(p.grouping.max_entries, p.entry_stride);
        assert_eq!((p.slots, p.experts), (3, 8));
        let q = p.params(2);
        assert_eq!((q.tokens, q.slots, q.ids_stride, q.column, q.entry_stride), (1000, 1, 3, 2, 1000 + 8 * 15));
        assert_eq!((q.chunk_entries, q.chunks), (1024, 1));
        assert_eq!(p.workspace_words, 9);
        let (c, sc) = (p.grouping.count.unwrap(), p.grouping.scatter.unwrap());
        assert_eq!((c.grid, c.block, c.shared_bytes), (1, 128, 4 * 8 * 4));
        assert_eq!((sc.grid, p.grouping.scan.grid, p.grouping.scan.shared_bytes), (1, 1, 128));
        assert_eq!((p.counts_len(), p.offsets_len(), p.entries_len()), (24, 27, 3 * p.entry_stride));
        // Many tokens: bounded chunks, one warp each.
        let big = plan_slot_grouping(5_000_000, 2, 64, 32, 256).unwrap();
        assert!(big.grouping.params.chunks as u64 <= MAX_CHUNKS);
        assert_eq!(big.grouping.count.unwrap().grid, big.grouping.params.chunks.div_ceil(8));
        assert_eq!(big.entry_stride, entry_capacity(5_000_000, 64, 32));
        // No tokens: only the scan runs (it still writes zero offsets and padding).
        let empty = plan_slot_grouping(0, 2, 4, 8, 128).unwrap();
        assert!(empty.grouping.count.is_none() && empty.grouping.scatter.is_none());
        assert_eq!(empty.entry_stride, entry_capacity(0, 4, 8));
        assert_eq!(empty.workspace_words, 1);
    }

    #[test]
    fn slot_plans_are_validated() {
        assert!(matches!(plan_slot_grouping(10, 0, 4, 4, 128), Err(MoleError::ZeroDimension { name: "slots" })));
        assert!(matches!(plan_slot_grouping(10, 2, 0, 4, 128), Err(MoleError::ZeroDimension { .. })));
        assert!(matches!(plan_slot_grouping(10, 2, 4, 0, 128), Err(MoleError::ZeroDimension { .. })));
        assert!(plan_slot_grouping(10, 2, 1025, 4, 128).is_err());
        assert!(plan_slot_grouping(10, 2, 4, 4, 100).is_err());
        assert!(plan_slot_grouping(u32::MAX as usize, 2, 2, 2, 128).is_err());
        assert!(plan_slot_grouping(1 << 20, 2, 1024, 1 << 23, 128).is_err());

        let b = build(DType::BF16, 128);
        let p = plan_slot_grouping(10, 2, 4, 4, 128).unwrap();
        let ok = [8, 10, p.entries_len(), 2];
        assert!(check_group_slots(&b, &p, 20, p.workspace_words, ok).is_ok());
        assert!(check_group_slots(&b, &p, 10, p.workspace_words, ok).is_err());
        assert!(check_group_slots(&b, &p, 20, 0, ok).is_err());
        for bad in [
            [4, 10, p.entries_len(), 2],
            [8, 5, p.entries_len(), 2],
            [8, 10, p.entry_stride, 2],
            [8, 10, p.entries_len(), 1],
        ] {
            assert!(matches!(
                check_group_slots(&b, &p, 20, p.workspace_words, bad),
                Err(MoleError::ShapeMismatch { .. })
            ));
        }
        assert!(check_group_slots(&build(DType::BF16, 64), &p, 20, p.workspace_words, ok).is_err());
    }
}
