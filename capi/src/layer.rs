//! `MoleLayer`: one compiled MoLE layer, run on the caller's device pointers and stream.

use crate::device::MoleDevice;
use crate::status::{arg, c_str, guard, guard_gpu, mole_status, write_out, Failure};
use mole_core::model::LayerSpec;
use mole_core::runtime::{BackwardPointers, CompiledLayer, LayerPointers};
use mole_core::DType;
use std::ffi::{c_char, c_void};

/// One MoLE layer on a device (opaque): its constants on the device, its loaded kernels and its
/// plans per token count. Calls on one layer may come from several threads.
pub struct MoleLayer {
    layer: CompiledLayer,
}

// What "calls may come from several threads" rests on.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<CompiledLayer>();
    shared::<mole_core::cuda::Device>();
};

/// Device addresses (`CUdeviceptr`) of a forward's tensors, 0 for an absent one, each of the
/// layer's dtype and row-major: `x [T, d_in]`, `a [d_in, R]`, `b [R, d_out]`, `y [T, d_out]`
/// (updated in place), `router_weight` (`[d_in, E]` for the x router, `[R, E]` for the h router),
/// `router_bias [E]`, `gate_input [T, E]` (logits or given weights), `adapter_ids [T]` (int32),
/// `selection_bias [E]`, `cores [E, R, R]`; which optional ones a spec takes is as in the Rust
/// `LayerInputs`. The workspace (256-byte aligned) holds at least
/// `mole_layer_workspace_bytes(T)` bytes; `saved` (0 for inference) at least
/// `mole_layer_saved_bytes(T)`, kept for the backward of this call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MoleLayerPointers {
    /// `x`.
    pub x: u64,
    /// `A`.
    pub a: u64,
    /// `B`.
    pub b: u64,
    /// `y`.
    pub y: u64,
    /// `router_weight`.
    pub router_weight: u64,
    /// `router_bias`.
    pub router_bias: u64,
    /// Router logits or given gate weights.
    pub gate_input: u64,
    /// `adapter_ids` (int32).
    pub adapter_ids: u64,
    /// `selection_bias`.
    pub selection_bias: u64,
    /// `cores`.
    pub cores: u64,
    /// The workspace.
    pub workspace: u64,
    /// Its size in bytes.
    pub workspace_bytes: usize,
    /// The saved routing of a training forward (0: inference).
    pub saved: u64,
    /// Its size in bytes.
    pub saved_bytes: usize,
}

impl From<&MoleLayerPointers> for LayerPointers {
    fn from(p: &MoleLayerPointers) -> Self {
        LayerPointers {
            x: p.x,
            a: p.a,
            b: p.b,
            y: p.y,
            router_weight: p.router_weight,
            router_bias: p.router_bias,
            gate_input: p.gate_input,
            adapter_ids: p.adapter_ids,
            selection_bias: p.selection_bias,
            cores: p.cores,
            workspace: p.workspace,
            workspace_bytes: p.workspace_bytes,
            saved: p.saved,
            saved_bytes: p.saved_bytes,
        }
    }
}

/// Device addresses of a backward's tensors (0: absent), of the layer's dtype: the forward's
/// inputs, `dy [T, d_out]`, the `saved` buffer the training forward of this call wrote, and the
/// gradients, overwritten: `dx [T, d_in]` always; `da`, `db`, `d_router_weight`,
/// `d_router_bias`, `d_cores` unless the spec freezes the parameter (then 0: giving one is an
/// error); `d_gate_input [T, E]` where the gating takes logits or given weights. The workspace
/// holds at least `mole_layer_backward_workspace_bytes(T)` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MoleBackwardPointers {
    /// `x`.
    pub x: u64,
    /// `A`.
    pub a: u64,
    /// `B`.
    pub b: u64,
    /// `dy`.
    pub dy: u64,
    /// `router_weight`.
    pub router_weight: u64,
    /// `router_bias`.
    pub router_bias: u64,
    /// Router logits or given gate weights.
    pub gate_input: u64,
    /// `cores`.
    pub cores: u64,
    /// The saved buffer of the training forward.
    pub saved: u64,
    /// Its size in bytes.
    pub saved_bytes: usize,
    /// `dx`.
    pub dx: u64,
    /// `dA`.
    pub da: u64,
    /// `dB`.
    pub db: u64,
    /// The router weight's gradient.
    pub d_router_weight: u64,
    /// The router bias's gradient.
    pub d_router_bias: u64,
    /// The logits' or given weights' gradient.
    pub d_gate_input: u64,
    /// The cores' gradient.
    pub d_cores: u64,
    /// The workspace.
    pub workspace: u64,
    /// Its size in bytes.
    pub workspace_bytes: usize,
}

impl From<&MoleBackwardPointers> for BackwardPointers {
    fn from(p: &MoleBackwardPointers) -> Self {
        BackwardPointers {
            x: p.x,
            a: p.a,
            b: p.b,
            dy: p.dy,
            router_weight: p.router_weight,
            router_bias: p.router_bias,
            gate_input: p.gate_input,
            cores: p.cores,
            saved: p.saved,
            saved_bytes: p.saved_bytes,
            dx: p.dx,
            da: p.da,
            db: p.db,
            d_router_weight: p.d_router_weight,
            d_router_bias: p.d_router_bias,
            d_gate_input: p.d_gate_input,
            d_cores: p.d_cores,
            workspace: p.workspace,
            workspace_bytes: p.workspace_bytes,
        }
    }
}

/// Parses a spec argument: the JSON text (errors name the field) and validation.
///
/// # Safety
/// As [`c_str`].
pub(crate) unsafe fn spec_arg(spec_json: *const c_char) -> Result<LayerSpec, Failure> {
    // SAFETY: forwarded from the caller's contract.
    Ok(LayerSpec::from_json(unsafe { c_str(spec_json, "spec_json") }?)?)
}

/// Builds a layer on `device` from the spec JSON (the `mole eval --spec` form) and a dtype name
/// (`"f32"`, `"f16"` or `"bf16"`) into `*out`: validates the spec and uploads its constants
/// (synchronously). Kernels are compiled on first use (`mole_layer_prepare`). Free it with
/// `mole_layer_destroy`.
///
/// # Safety
/// `device` is null or a live device; `spec_json` and `dtype` are null or NUL-terminated;
/// `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_create(
    device: *const MoleDevice,
    spec_json: *const c_char,
    dtype: *const c_char,
    out: *mut *mut MoleLayer,
) -> mole_status {
    guard_gpu(|| {
        // SAFETY: each pointer is null or valid by the caller's contract.
        let (device, spec, dtype) = unsafe { (arg(device, "device")?, spec_arg(spec_json)?, c_str(dtype, "dtype")?) };
        if out.is_null() {
            return Err(crate::status::null("out"));
        }
        let dtype: DType = dtype.parse()?;
        let layer = CompiledLayer::new(&device.device, &spec, dtype, None)?;
        // SAFETY: `out` is non-null and valid for a write by the caller's contract.
        unsafe { write_out(out, "out", Box::into_raw(Box::new(MoleLayer { layer }))) }
    })
}

/// Frees a layer (null: nothing), after waiting for the work of its context.
///
/// # Safety
/// `layer` is null or a layer from `mole_layer_create`, not yet destroyed.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_destroy(layer: *mut MoleLayer) {
    guard_gpu(|| {
        if !layer.is_null() {
            // SAFETY: a pointer from `Box::into_raw` in `mole_layer_create`, freed once.
            drop(unsafe { Box::from_raw(layer) });
        }
        Ok(())
    });
}

/// Runs `query` on the layer and writes its byte count to `*out`.
///
/// # Safety
/// `layer` is null or live; `out` is null or valid for a write.
unsafe fn bytes_query(
    layer: *const MoleLayer,
    out: *mut usize,
    query: impl FnOnce(&CompiledLayer) -> mole_core::Result<usize>,
) -> mole_status {
    guard(|| {
        // SAFETY: forwarded from the caller's contract.
        let layer = unsafe { arg(layer, "layer") }?;
        if out.is_null() {
            return Err(crate::status::null("out"));
        }
        let bytes = query(&layer.layer)?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { write_out(out, "out", bytes) }
    })
}

/// Workspace bytes a forward over `tokens` tokens needs, into `*out`.
///
/// # Safety
/// `layer` is null or live; `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_workspace_bytes(
    layer: *const MoleLayer,
    tokens: usize,
    out: *mut usize,
) -> mole_status {
    // SAFETY: forwarded from the caller's contract.
    unsafe { bytes_query(layer, out, |l| l.workspace_bytes(tokens)) }
}

/// Bytes of the saved buffer a training forward over `tokens` tokens writes for the backward,
/// into `*out`.
///
/// # Safety
/// `layer` is null or live; `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_saved_bytes(
    layer: *const MoleLayer,
    tokens: usize,
    out: *mut usize,
) -> mole_status {
    // SAFETY: forwarded from the caller's contract.
    unsafe { bytes_query(layer, out, |l| l.saved_bytes(tokens)) }
}

/// Workspace bytes a backward over `tokens` tokens needs, into `*out`.
///
/// # Safety
/// `layer` is null or live; `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_backward_workspace_bytes(
    layer: *const MoleLayer,
    tokens: usize,
    out: *mut usize,
) -> mole_status {
    // SAFETY: forwarded from the caller's contract.
    unsafe { bytes_query(layer, out, |l| l.backward_workspace_bytes(tokens)) }
}

/// Plans a forward of `tokens` tokens and loads its kernels (compiling them if needed): after it,
/// such a forward compiles nothing and can be captured in a CUDA graph. With `backward` non-zero,
/// the same for the backward.
///
/// # Safety
/// `layer` is null or live.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_prepare(layer: *const MoleLayer, tokens: usize, backward: i32) -> mole_status {
    guard_gpu(|| {
        // SAFETY: forwarded from the caller's contract.
        let layer = &unsafe { arg(layer, "layer") }?.layer;
        layer.prepare(tokens)?;
        if backward != 0 {
            layer.prepare_backward(tokens)?;
        }
        Ok(())
    })
}

/// One forward over `tokens` tokens, enqueued on `stream` (a `CUstream` or `cudaStream_t` of the
/// layer's context; null: the legacy default stream): `y += delta`, and the routing written to
/// `saved` for a training forward. Allocates nothing, copies nothing, never synchronises. The
/// workspace and saved sizes are checked against the plan before any launch.
///
/// # Safety
/// `layer` and `pointers` are null or live; every non-zero address in `pointers` is device
/// memory of the layer's context holding its tensor (sizes above), `y`, the workspace and the
/// saved buffer overlap nothing else, and all stay untouched by other work until the stream has
/// run the forward.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_forward(
    layer: *const MoleLayer,
    stream: *mut c_void,
    tokens: usize,
    pointers: *const MoleLayerPointers,
) -> mole_status {
    guard_gpu(|| {
        // SAFETY: each pointer is null or valid by the caller's contract.
        let (layer, pointers) = unsafe { (arg(layer, "layer")?, arg(pointers, "pointers")?) };
        // SAFETY: the device memory and the stream are the caller's contract (above).
        unsafe { layer.layer.forward_raw(stream.cast(), tokens, pointers.into()) }?;
        Ok(())
    })
}

/// The backward of a training forward over `tokens` tokens, enqueued on `stream`: overwrites `dx`
/// and the gradients of the trained parameters and gating inputs (never accumulates). Every
/// buffer is checked against the plan before any launch: a missing gradient, one the backward
/// does not write (a frozen parameter's) or a short workspace is an error.
///
/// # Safety
/// As `mole_layer_forward`, for `MoleBackwardPointers`; `saved` holds what the training forward
/// of these inputs wrote.
#[no_mangle]
pub unsafe extern "C" fn mole_layer_backward(
    layer: *const MoleLayer,
    stream: *mut c_void,
    tokens: usize,
    pointers: *const MoleBackwardPointers,
) -> mole_status {
    guard_gpu(|| {
        // SAFETY: each pointer is null or valid by the caller's contract.
        let (layer, pointers) = unsafe { (arg(layer, "layer")?, arg(pointers, "pointers")?) };
        // SAFETY: the device memory and the stream are the caller's contract (above).
        unsafe { layer.layer.backward_raw(stream.cast(), tokens, pointers.into()) }?;
        Ok(())
    })
}
