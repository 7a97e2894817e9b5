//! The C interface of the runtime (hostexec/cpp). Layouts mirror the C++ structs field for field.

use std::ffi::{c_char, c_int, c_void};

/// `mole_host::ParamDesc` (kernels/common/host/api.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParamDesc {
    pub size: u32,
    pub pointee_size: u32,
    pub is_pointer: u8,
    pub pointee_const: u8,
}

/// `mole_host::KernelInfo` (hostexec/cpp/internal.h): static data, valid for the whole process.
#[repr(C)]
pub(crate) struct KernelInfo {
    pub name: *const c_char,
    pub file: *const c_char,
    pub dtype: *const c_char,
    pub params: *const ParamDesc,
    pub param_count: usize,
    pub fn_ptr: *const c_void,
    pub invoker: *const c_void,
}

/// `mole_hx_unit` (generated registry.cpp).
#[repr(C)]
pub(crate) struct Unit {
    pub file: *const c_char,
    pub dtype: *const c_char,
    pub register: *const c_void,
    pub error: *const c_char,
}

/// `LaunchConfig` (hostexec/cpp/launch.cpp).
#[repr(C)]
pub(crate) struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u64,
    pub schedule: u32,
    pub seed: u64,
    pub mma: u32,
    pub resident: u32,
}

/// `Arg` (hostexec/cpp/launch.cpp): the argument's bytes, and whether it is a buffer pointer.
#[repr(C)]
pub(crate) struct Arg {
    pub data: *const c_void,
    pub size: u64,
    pub is_buffer: u32,
}

extern "C" {
    pub(crate) fn mole_hx_kernel_count() -> usize;
    pub(crate) fn mole_hx_kernel_at(i: usize) -> *const KernelInfo;
    pub(crate) fn mole_hx_unit_total() -> usize;
    pub(crate) fn mole_hx_unit_at(i: usize) -> *const Unit;
    pub(crate) fn mole_hx_launch(
        kernel: *const KernelInfo,
        cfg: *const LaunchConfig,
        args: *const Arg,
        count: usize,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
    pub(crate) fn mole_hx_alloc(
        name: *const c_char,
        bytes: usize,
        elem: usize,
        align: usize,
        guard_before: c_int,
        lazy: c_int,
    ) -> *mut c_void;
    pub(crate) fn mole_hx_free(data: *mut c_void);
}
