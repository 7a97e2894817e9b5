//! Status codes, the thread-local message of the last call, and the guard every entry point runs
//! its body in: a Rust error becomes a status and a message, a panic becomes `MOLE_ERROR_PANIC`
//! (no panic crosses the C boundary), a null or misaligned pointer an error naming the argument.

use mole_core::MoleError;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What every `mole_*` call returns: `MOLE_OK`, or the family of the error, whose text
/// `mole_last_error_message()` gives.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum mole_status {
    /// Success.
    MOLE_OK = 0,
    /// A pointer argument that must not be null is null (the message names it).
    MOLE_ERROR_NULL_POINTER = 1,
    /// The layer spec JSON does not follow the documented form (the message names the field).
    MOLE_ERROR_INVALID_SPEC = 2,
    /// A scalar argument or parameter is out of its domain: a dtype name, `k`, rank offsets, a
    /// zero dimension, a string that is not UTF-8, a misaligned host pointer.
    MOLE_ERROR_INVALID_ARGUMENT = 3,
    /// A buffer has the wrong size for the spec and the token count (the message names it).
    MOLE_ERROR_SHAPE_MISMATCH = 4,
    /// A tensor the spec needs was not given (null), or a buffer the call needs is missing.
    MOLE_ERROR_MISSING_INPUT = 5,
    /// A tensor was given that the spec does not take (or a gradient the backward does not write).
    MOLE_ERROR_UNEXPECTED_INPUT = 6,
    /// An expert or adapter id is out of range, or repeated among a token's slots.
    MOLE_ERROR_INVALID_ROUTING = 7,
    /// The combination is not supported (e.g. a non-primary CUDA context, an unsupported GPU).
    MOLE_ERROR_UNSUPPORTED = 8,
    /// A size is over its documented limit, or overflows.
    MOLE_ERROR_TOO_LARGE = 9,
    /// An allocation would exceed the host's or the device's available memory; nothing was
    /// allocated.
    MOLE_ERROR_OUT_OF_MEMORY = 10,
    /// The CUDA driver (libcuda) could not be loaded: no GPU on this machine.
    MOLE_ERROR_NO_CUDA_DRIVER = 11,
    /// NVRTC could not be loaded where a kernel had to be compiled.
    MOLE_ERROR_NO_NVRTC = 12,
    /// cuBLAS could not be loaded.
    MOLE_ERROR_NO_CUBLAS = 13,
    /// A CUDA driver call failed (e.g. no GPU of that ordinal).
    MOLE_ERROR_CUDA = 14,
    /// NVRTC rejected a kernel (the message holds its log).
    MOLE_ERROR_KERNEL_COMPILE = 15,
    /// A file could not be read or written.
    MOLE_ERROR_IO = 16,
    /// A bug in mole: a Rust panic, caught at the boundary (please report the message).
    MOLE_ERROR_PANIC = 17,
    /// Any other error (see the message).
    MOLE_ERROR_OTHER = 18,
}

/// The status of an error of the Rust library, by its family.
pub fn status_of(e: &MoleError) -> mole_status {
    use mole_status::*;
    match e {
        MoleError::InvalidSpec { .. } => MOLE_ERROR_INVALID_SPEC,
        MoleError::InvalidParameter { .. }
        | MoleError::InvalidK { .. }
        | MoleError::InvalidRankOffsets { .. }
        | MoleError::ZeroDimension { .. } => MOLE_ERROR_INVALID_ARGUMENT,
        MoleError::ShapeMismatch { .. } | MoleError::WrongShape { .. } | MoleError::InvalidOperand { .. } => {
            MOLE_ERROR_SHAPE_MISMATCH
        }
        MoleError::MissingInput { .. } => MOLE_ERROR_MISSING_INPUT,
        MoleError::UnexpectedInput { .. } => MOLE_ERROR_UNEXPECTED_INPUT,
        MoleError::ExpertIdOutOfRange { .. } | MoleError::DuplicateExpert { .. } => MOLE_ERROR_INVALID_ROUTING,
        MoleError::Unsupported(_) => MOLE_ERROR_UNSUPPORTED,
        MoleError::TooLarge { .. } => MOLE_ERROR_TOO_LARGE,
        MoleError::OutOfMemory { .. } => MOLE_ERROR_OUT_OF_MEMORY,
        MoleError::CudaDriverNotFound { .. } => MOLE_ERROR_NO_CUDA_DRIVER,
        MoleError::NvrtcNotFound { .. } => MOLE_ERROR_NO_NVRTC,
        MoleError::CublasNotFound { .. } => MOLE_ERROR_NO_CUBLAS,
        MoleError::Cuda { .. } => MOLE_ERROR_CUDA,
        MoleError::NvrtcCompile { .. } => MOLE_ERROR_KERNEL_COMPILE,
        MoleError::Io { .. } | MoleError::UnsafeOutput { .. } => MOLE_ERROR_IO,
        _ => MOLE_ERROR_OTHER,
    }
}

/// A failed call: its status and its message.
#[derive(Debug)]
pub struct Failure {
    /// The status returned.
    pub status: mole_status,
    /// The text `mole_last_error_message()` gives.
    pub message: String,
}

impl Failure {
    /// A failure of `status` saying `message`.
    pub fn new(status: mole_status, message: impl Into<String>) -> Self {
        Failure { status, message: message.into() }
    }
}

impl From<MoleError> for Failure {
    fn from(e: MoleError) -> Self {
        Failure { status: status_of(&e), message: e.to_string() }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message with an interior NUL would be cut there by C: drop the NULs instead.
    let text = CString::new(message.replace('\0', "")).unwrap_or_default();
    // `try_with`: during the thread's teardown the slot may be gone; never panic across C.
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = text);
}

/// [`guard`] for an entry point that touches a GPU: the calling thread's current CUDA context is
/// put back afterwards, whatever happens ([`mole_core::cuda::Device::restoring_current`]).
pub fn guard_gpu(body: impl FnOnce() -> Result<(), Failure>) -> mole_status {
    guard(|| mole_core::cuda::Device::restoring_current(body))
}

/// Runs the body of an entry point: `MOLE_OK` on success (and an empty message), the failure's
/// status and message otherwise; a panic is caught and reported as `MOLE_ERROR_PANIC`.
pub fn guard(body: impl FnOnce() -> Result<(), Failure>) -> mole_status {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Err(Failure::new(mole_status::MOLE_ERROR_PANIC, format!("internal error (a bug in mole): {what}")))
    });
    match outcome {
        Ok(()) => {
            set_last_error("");
            mole_status::MOLE_OK
        }
        Err(f) => {
            set_last_error(&f.message);
            f.status
        }
    }
}

/// The message of this thread's last `mole_*` call: empty after one that returned `MOLE_OK`.
/// The text stays valid until the next `mole_*` call on the same thread (copy it to keep it);
/// never null.
#[no_mangle]
pub extern "C" fn mole_last_error_message() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|m| m.borrow().as_ptr())).unwrap_or(c"internal error".as_ptr())
}

/// The name of a status (`"MOLE_ERROR_INVALID_SPEC"`), a static string; `"MOLE_UNKNOWN_STATUS"`
/// for a value that is no status.
#[no_mangle]
pub extern "C" fn mole_status_name(status: i32) -> *const c_char {
    use mole_status::*;
    let all = [
        (MOLE_OK, c"MOLE_OK"),
        (MOLE_ERROR_NULL_POINTER, c"MOLE_ERROR_NULL_POINTER"),
        (MOLE_ERROR_INVALID_SPEC, c"MOLE_ERROR_INVALID_SPEC"),
        (MOLE_ERROR_INVALID_ARGUMENT, c"MOLE_ERROR_INVALID_ARGUMENT"),
        (MOLE_ERROR_SHAPE_MISMATCH, c"MOLE_ERROR_SHAPE_MISMATCH"),
        (MOLE_ERROR_MISSING_INPUT, c"MOLE_ERROR_MISSING_INPUT"),
        (MOLE_ERROR_UNEXPECTED_INPUT, c"MOLE_ERROR_UNEXPECTED_INPUT"),
        (MOLE_ERROR_INVALID_ROUTING, c"MOLE_ERROR_INVALID_ROUTING"),
        (MOLE_ERROR_UNSUPPORTED, c"MOLE_ERROR_UNSUPPORTED"),
        (MOLE_ERROR_TOO_LARGE, c"MOLE_ERROR_TOO_LARGE"),
        (MOLE_ERROR_OUT_OF_MEMORY, c"MOLE_ERROR_OUT_OF_MEMORY"),
        (MOLE_ERROR_NO_CUDA_DRIVER, c"MOLE_ERROR_NO_CUDA_DRIVER"),
        (MOLE_ERROR_NO_NVRTC, c"MOLE_ERROR_NO_NVRTC"),
        (MOLE_ERROR_NO_CUBLAS, c"MOLE_ERROR_NO_CUBLAS"),
        (MOLE_ERROR_CUDA, c"MOLE_ERROR_CUDA"),
        (MOLE_ERROR_KERNEL_COMPILE, c"MOLE_ERROR_KERNEL_COMPILE"),
        (MOLE_ERROR_IO, c"MOLE_ERROR_IO"),
        (MOLE_ERROR_PANIC, c"MOLE_ERROR_PANIC"),
        (MOLE_ERROR_OTHER, c"MOLE_ERROR_OTHER"),
    ];
    all.iter().find(|(s, _)| *s as i32 == status).map_or(c"MOLE_UNKNOWN_STATUS", |(_, n)| n).as_ptr()
}

/// `p` as a reference, or a null-pointer failure naming `what`.
///
/// # Safety
/// A non-null `p` points to a live, properly aligned `T` for `'a`.
pub unsafe fn arg<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: non-null here, the rest is the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| null(what))
}

/// The failure of a null `what`.
pub fn null(what: &str) -> Failure {
    Failure::new(mole_status::MOLE_ERROR_NULL_POINTER, format!("`{what}` is null"))
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// A non-null `p` points to a NUL-terminated string that outlives `'a`.
pub unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Failure::new(mole_status::MOLE_ERROR_INVALID_ARGUMENT, format!("`{what}` is not UTF-8: {e}")))
}

/// Writes `value` through the out-pointer `out` (named `what`), refusing a null one.
///
/// # Safety
/// A non-null `out` is valid for a write of a `T`.
pub unsafe fn write_out<T>(out: *mut T, what: &str, value: T) -> Result<(), Failure> {
    if out.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, and valid for a write by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_and_reported() {
        let status = guard(|| panic!("planted"));
        assert_eq!(status, mole_status::MOLE_ERROR_PANIC);
        // SAFETY: a NUL-terminated string valid until the next call on this thread.
        let msg = unsafe { CStr::from_ptr(mole_last_error_message()) }.to_str().unwrap().to_string();
        assert!(msg.contains("planted") && msg.contains("bug in mole"), "{msg}");
    }

    #[test]
    fn every_error_family_has_its_own_status() {
        let cases = [
            (MoleError::InvalidSpec { path: "d_in".into(), message: "missing".into() }, "MOLE_ERROR_INVALID_SPEC"),
            (MoleError::ZeroDimension { name: "d_in" }, "MOLE_ERROR_INVALID_ARGUMENT"),
            (MoleError::ShapeMismatch { what: "x", expected: vec![2], got: 1 }, "MOLE_ERROR_SHAPE_MISMATCH"),
            (MoleError::MissingInput { name: "x", needed_by: "y" }, "MOLE_ERROR_MISSING_INPUT"),
            (MoleError::UnexpectedInput { name: "x", reason: "y" }, "MOLE_ERROR_UNEXPECTED_INPUT"),
            (MoleError::DuplicateExpert { token: 0, id: 1 }, "MOLE_ERROR_INVALID_ROUTING"),
            (MoleError::Unsupported("x".into()), "MOLE_ERROR_UNSUPPORTED"),
            (MoleError::CudaDriverNotFound { detail: "x".into() }, "MOLE_ERROR_NO_CUDA_DRIVER"),
            (MoleError::NvrtcNotFound { detail: "x".into() }, "MOLE_ERROR_NO_NVRTC"),
            (MoleError::Cuda { call: "cuInit", message: "x".into() }, "MOLE_ERROR_CUDA"),
        ];
        for (e, name) in cases {
            let status = status_of(&e);
            // SAFETY: a static NUL-terminated string.
            let got = unsafe { CStr::from_ptr(mole_status_name(status as i32)) }.to_str().unwrap();
            assert_eq!(got, name, "{e}");
        }
    }
}
