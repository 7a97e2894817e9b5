//! `MoleDevice`: a GPU opened by ordinal, or adopted from the caller's CUDA context.

use crate::status::{guard, guard_gpu, mole_status, write_out, Failure};
use cudarc::driver::{result as drv, sys, CudaContext};
use mole_core::cuda::{driver_present, Device};
use mole_core::MoleError;
use std::ffi::c_void;

/// A GPU with its CUDA context (opaque). Layers created on it keep what they need alive, so it
/// may be destroyed before them.
pub struct MoleDevice {
    pub(crate) device: Device,
}

fn no_driver() -> Failure {
    MoleError::CudaDriverNotFound { detail: "dlopen of libcuda.so / libcuda.so.1 failed".into() }.into()
}

fn cuda(call: &'static str) -> impl Fn(drv::DriverError) -> Failure {
    move |e| MoleError::Cuda { call, message: e.to_string() }.into()
}

/// Opens GPU `ordinal` (its primary context, the one the CUDA runtime, PyTorch and CuPy use) into
/// `*out`. Fails with `MOLE_ERROR_NO_CUDA_DRIVER` on a machine without the driver and
/// `MOLE_ERROR_CUDA` when there is no such GPU. Free it with `mole_device_destroy`.
///
/// # Safety
/// `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_device_create(ordinal: i32, out: *mut *mut MoleDevice) -> mole_status {
    guard_gpu(|| {
        if out.is_null() {
            return Err(crate::status::null("out"));
        }
        let ordinal = usize::try_from(ordinal).map_err(|_| {
            Failure::from(MoleError::InvalidParameter {
                name: "ordinal",
                value: ordinal.to_string(),
                reason: "a GPU ordinal is >= 0",
            })
        })?;
        let device = Device::new(ordinal)?;
        // SAFETY: `out` is non-null and valid for a write by the caller's contract.
        unsafe { write_out(out, "out", Box::into_raw(Box::new(MoleDevice { device }))) }
    })
}

/// Adopts the caller's CUDA context `context` (a `CUcontext`) into `*out`: kernels are loaded
/// into it. It must be its device's primary context (what `cudaSetDevice`, PyTorch and CuPy use,
/// or `cuDevicePrimaryCtxRetain`): any other context is refused with `MOLE_ERROR_UNSUPPORTED`,
/// as cudarc, which mole runs on, adopts only primary contexts without taking them over.
/// The caller keeps its own reference to the context.
///
/// # Safety
/// `context` is null or a live `CUcontext`; `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_device_from_context(context: *mut c_void, out: *mut *mut MoleDevice) -> mole_status {
    guard_gpu(|| {
        if context.is_null() {
            return Err(crate::status::null("context"));
        }
        if out.is_null() {
            return Err(crate::status::null("out"));
        }
        // cudarc's driver calls panic when libcuda cannot be loaded: check first.
        if !driver_present() {
            return Err(no_driver());
        }
        drv::init().map_err(cuda("cuInit"))?;
        // SAFETY: a live context by the caller's contract.
        let device = unsafe { adopt(context as sys::CUcontext) }?;
        // SAFETY: `out` is non-null and valid for a write by the caller's contract.
        unsafe { write_out(out, "out", Box::into_raw(Box::new(MoleDevice { device }))) }
    })
}

/// The device of the context `ctx`, when it is its GPU's primary context.
///
/// # Safety
/// `ctx` is a live context.
unsafe fn adopt(ctx: sys::CUcontext) -> Result<Device, Failure> {
    let mut dev: sys::CUdevice = 0;
    // SAFETY: `ctx` is a live context by the caller's contract; it is pushed, queried and popped
    // again, leaving the thread's context stack as it was.
    unsafe {
        sys::cuCtxPushCurrent_v2(ctx).result().map_err(cuda("cuCtxPushCurrent"))?;
        let got = sys::cuCtxGetDevice(&mut dev).result();
        let mut popped = std::ptr::null_mut();
        sys::cuCtxPopCurrent_v2(&mut popped).result().map_err(cuda("cuCtxPopCurrent"))?;
        got.map_err(cuda("cuCtxGetDevice"))?;
    }
    let count = drv::device::get_count().map_err(cuda("cuDeviceGetCount"))?;
    let mut ordinal = None;
    for o in 0..count {
        if drv::device::get(o).map_err(cuda("cuDeviceGet"))? == dev {
            ordinal = Some(o as usize);
        }
    }
    let ordinal = ordinal.ok_or_else(|| {
        Failure::from(MoleError::Cuda {
            call: "cuDeviceGet",
            message: format!("the context's device {dev} is none of the {count} devices"),
        })
    })?;
    let primary = CudaContext::new(ordinal).map_err(cuda("cuDevicePrimaryCtxRetain"))?;
    if primary.cu_ctx() != ctx {
        return Err(MoleError::Unsupported(format!(
            "the context is not GPU {ordinal}'s primary context: mole adopts primary contexts only \
             (cudarc takes no other without owning it); use the primary one (cuDevicePrimaryCtxRetain, \
             or the CUDA runtime's) or mole_device_create"
        ))
        .into());
    }
    Ok(Device::from_context(primary)?)
}

/// The number of SMs of the device into `*out`: what `mole_plan_sizes` plans for.
///
/// # Safety
/// `device` is null or live; `out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_device_sm_count(device: *const MoleDevice, out: *mut u32) -> mole_status {
    guard(|| {
        // SAFETY: forwarded from the caller's contract.
        let device = unsafe { crate::status::arg(device, "device") }?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { write_out(out, "out", device.device.sm_count()) }
    })
}

/// Frees a device from `mole_device_create` or `mole_device_from_context` (null: nothing).
///
/// # Safety
/// `device` is null or a device from those calls, not yet destroyed.
#[no_mangle]
pub unsafe extern "C" fn mole_device_destroy(device: *mut MoleDevice) {
    guard_gpu(|| {
        if !device.is_null() {
            // SAFETY: a pointer from `Box::into_raw` in the calls above, freed once.
            drop(unsafe { Box::from_raw(device) });
        }
        Ok(())
    });
}
