//! The C ABI of `mole` (`libmole.so`, `libmole.a`; header `include/mole.h`, generated from this
//! crate by cbindgen). Opaque handles: [`MoleDevice`] (a GPU, opened by ordinal or adopted from
//! the caller's primary CUDA context) and [`MoleLayer`] (a compiled layer, built from the spec
//! JSON and a dtype name). Layers run on raw device pointers ([`MoleLayerPointers`],
//! [`MoleBackwardPointers`]) and the caller's `CUstream`; [`mole_plan_sizes`] gives the sizes of
//! their buffers without a GPU; the f64 reference runs on host f32 buffers ([`MoleHostInputs`],
//! [`MoleHostGrads`]), so a C program can test against it without a GPU. Every call returns a
//! [`mole_status`]; `mole_last_error_message()` gives the text of the last failure on the calling
//! thread; no Rust panic crosses the boundary; a call that touches a GPU leaves the calling
//! thread's current CUDA context as it found it (the CUDA runtime's current device follows it).

#![warn(missing_docs)]

mod device;
mod layer;
mod plan;
mod reference;
mod status;

pub use device::{mole_device_create, mole_device_destroy, mole_device_from_context, mole_device_sm_count, MoleDevice};
pub use layer::{
    mole_layer_backward, mole_layer_backward_workspace_bytes, mole_layer_create, mole_layer_destroy,
    mole_layer_forward, mole_layer_prepare, mole_layer_saved_bytes, mole_layer_workspace_bytes, MoleBackwardPointers,
    MoleLayer, MoleLayerPointers,
};
pub use plan::{mole_plan_sizes, MoleLayerSizes};
pub use reference::{mole_reference_backward, mole_reference_forward, MoleHostGrads, MoleHostInputs};
pub use status::{mole_last_error_message, mole_status, mole_status_name};
