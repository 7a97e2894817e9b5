//! The planner without a GPU: the buffer sizes a layer's calls need, from the spec, the dtype and
//! the GPU's SM count alone (what a layer on such a GPU answers), so a C++ engine can size its
//! memory pools before it opens a device, and a test can check them on a machine without one.

use crate::layer::spec_arg;
use crate::status::{c_str, guard, mole_status, write_out};
use mole_core::runtime::LayerPlanner;
use mole_core::DType;
use std::ffi::c_char;

/// The bytes of the device buffers a layer's calls over one token count take, each 256-byte
/// aligned by the caller: the forward's workspace, the routing a training forward saves for the
/// backward, and the backward's workspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoleLayerSizes {
    /// Workspace of a forward (inference or training).
    pub workspace_bytes: usize,
    /// The saved buffer a training forward writes.
    pub saved_bytes: usize,
    /// Workspace of a backward.
    pub backward_workspace_bytes: usize,
}

/// The sizes of a layer's buffers over `tokens` tokens into `*out`, for the spec JSON, a dtype
/// name and a GPU with `sm_count` SMs, without a GPU: the numbers `mole_layer_workspace_bytes`,
/// `mole_layer_saved_bytes` and `mole_layer_backward_workspace_bytes` give for a layer created
/// from the same spec and dtype on such a GPU (the strategy, and so the workspace, depends on
/// the token count and the SM count). Errors: the spec's, an unknown dtype, zero SMs or tokens,
/// a token count past the limits.
///
/// # Safety
/// `spec_json` and `dtype` are null or NUL-terminated; `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_plan_sizes(
    spec_json: *const c_char,
    dtype: *const c_char,
    sm_count: u32,
    tokens: usize,
    out: *mut MoleLayerSizes,
) -> mole_status {
    guard(|| {
        // SAFETY: each pointer is null or valid by the caller's contract.
        let (spec, dtype) = unsafe { (spec_arg(spec_json)?, c_str(dtype, "dtype")?) };
        if out.is_null() {
            return Err(crate::status::null("out"));
        }
        let dtype: DType = dtype.parse()?;
        let planner = LayerPlanner::new(&spec, dtype, sm_count, None)?;
        let sizes = MoleLayerSizes {
            workspace_bytes: planner.workspace_bytes(tokens)?,
            saved_bytes: planner.plan_training(tokens)?.saved_bytes,
            backward_workspace_bytes: planner.plan_backward(tokens)?.workspace_bytes,
        };
        // SAFETY: `out` is non-null and valid for a write by the caller's contract.
        unsafe { write_out(out, "out", sizes) }
    })
}
