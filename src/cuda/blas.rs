//! cuBLAS, loaded at run time by our own small binding (as NVRTC is), for the dense products of
//! the FFN-expert block's base weights: `G = x·W_gate`, `U = x·W_up` (`[T, d]·[d, f]`) and
//! `y = a_mix·W_down` (`[T, f]·[f, d]`), row-major, f32 / f16 / bf16 elements, f32 accumulation.
//!
//! Where cuBLAS is looked for, in order (the search is `dylib`'s, as for NVRTC):
//! `MOLE_CUBLAS_PATH` ([`CUBLAS_PATH_ENV`], a `libcublas.so.*` file or its folder; when set nothing
//! else is tried), the library search by soname (`libcublas.so.13`, `.so.12`, `.so`), a CUDA
//! toolkit (`$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`), and the PyPI wheels' layouts
//! (`nvidia/cu13/lib` of `nvidia-cublas`, `nvidia/cublas/lib` of `nvidia-cublas-cu12`, the
//! wheels PyTorch installs) under `$VIRTUAL_ENV`, `$CONDA_PREFIX` and `python3`'s `sys.path`.
//! libcublas needs libcublasLt: a file found by path has the libcublasLt beside it loaded first.
//!
//! # Numerics
//! Every product uses `CUBLAS_COMPUTE_32F` under the default math mode: f32 operands are
//! multiplied in f32 (TF32 would need `CUBLAS_TF32_TENSOR_OP_MATH` or
//! `CUBLAS_COMPUTE_32F_FAST_TF32`, and its 10-bit mantissa is far outside the f32 tolerance), f16
//! and bf16 operands on the tensor cores with f32 accumulation. The math mode adds
//! `CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION`, so split-K partial sums of f16 / bf16
//! outputs are reduced in f32, not in the output type. The pedantic mode (prescribed precision in
//! every phase, meant for robustness studies) adds nothing to either and may be slower.
//!
//! # Reproducibility
//! cuBLAS documents bitwise-identical results from run to run for one toolkit version on GPUs of
//! the same architecture and SM count, while a single stream is active; with concurrent streams
//! its shared workspace pool may make it pick other implementations. Its remedy is a workspace
//! per stream (`cublasSetWorkspace`): a [`Blas`] allocates one for each stream it is given and
//! sets it on every call (`cublasSetStream` resets the workspace to the pool). Nothing is
//! promised across cuBLAS versions, architectures or SM counts, nor between a matrix and the
//! same values at another leading dimension or alignment (other kernels may be chosen).

use super::dylib::{dlopen, loaded_path, Search};
use super::{cuda_err, Device};
use crate::{DType, MoleError, Result};
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// Environment variable naming the cuBLAS library to use: a `libcublas.so.*` file, or a folder
/// holding one (and its libcublasLt). When set, nothing else is tried.
pub const CUBLAS_PATH_ENV: &str = "MOLE_CUBLAS_PATH";

const SEARCH: Search = Search {
    env: CUBLAS_PATH_ENV,
    sonames: &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
    wheel_layouts: &["nvidia/cu13/lib", "nvidia/cublas/lib"],
    project_dir: None,
};

/// `cublasStatus_t`: 0 is success.
type Status = c_int;
/// `cublasHandle_t`.
type Handle = *mut c_void;

// cuBLAS and CUDA enumerators (cublas_api.h, library_types.h), stable since CUDA 11.
const OP_N: c_int = 0;
const CUDA_R_32F: c_int = 0;
const CUDA_R_16F: c_int = 2;
const CUDA_R_16BF: c_int = 14;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;
const DEFAULT_MATH: c_int = 0;
const DISALLOW_REDUCED_PRECISION_REDUCTION: c_int = 16;
const MAJOR_VERSION: c_int = 0;
const MINOR_VERSION: c_int = 1;
const PATCH_LEVEL: c_int = 2;

/// cuBLAS's entry points, resolved once from the loaded library.
struct Api {
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    destroy: unsafe extern "C" fn(Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, CUstream) -> Status,
    set_workspace: unsafe extern "C" fn(Handle, *mut c_void, usize) -> Status,
    set_math_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    get_property: unsafe extern "C" fn(c_int, *mut c_int) -> Status,
    #[allow(clippy::type_complexity)]
    gemm_ex: unsafe extern "C" fn(
        Handle,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *const c_void,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        *mut c_void,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> Status,
}

/// cuBLAS's name for `status` (`cublasStatus_t`), without a library call.
fn status_name(status: Status) -> String {
    let name = match status {
        1 => "CUBLAS_STATUS_NOT_INITIALIZED",
        3 => "CUBLAS_STATUS_ALLOC_FAILED",
        7 => "CUBLAS_STATUS_INVALID_VALUE",
        8 => "CUBLAS_STATUS_ARCH_MISMATCH",
        11 => "CUBLAS_STATUS_MAPPING_ERROR",
        13 => "CUBLAS_STATUS_EXECUTION_FAILED",
        14 => "CUBLAS_STATUS_INTERNAL_ERROR",
        15 => "CUBLAS_STATUS_NOT_SUPPORTED",
        16 => "CUBLAS_STATUS_LICENSE_ERROR",
        _ => return format!("cublasStatus_t {status}"),
    };
    name.to_string()
}

/// `Ok` when `status` is success, else [`MoleError::Cuda`] naming `call` and the status.
fn check(call: &'static str, status: Status) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(MoleError::Cuda { call, message: status_name(status) })
    }
}

/// The cuBLAS this process uses: which file, which version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CublasLibrary {
    /// The file that was loaded (resolved through `/proc/self/maps` where loaded by soname).
    pub path: PathBuf,
    /// `(major, minor, patch)` as `cublasGetProperty` reports it.
    pub version: (i32, i32, i32),
    /// How it was found, e.g. `MOLE_CUBLAS_PATH`, `library search`, `wheel under python3 sys.path`.
    pub found_by: String,
}

struct Loaded {
    api: Api,
    info: CublasLibrary,
    // Keep the libraries mapped for the life of the process (the function pointers point into
    // them); libcublasLt first, as libcublas needs it.
    _libs: Vec<libloading::Library>,
}

fn loaded() -> &'static std::result::Result<Loaded, String> {
    static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();
    LOADED.get_or_init(|| SEARCH.load(open))
}

/// Loads `name` (a soname or a path) and resolves every entry point.
fn open(name: &str, found_by: &str) -> std::result::Result<Loaded, String> {
    let mut libs = Vec::new();
    // dlopen by path does not search the file's folder for its dependencies: load the
    // libcublasLt beside it first, which then satisfies libcublas's need by soname.
    let path = std::path::Path::new(name);
    if let (Some(dir), Some(file)) = (path.parent().filter(|_| name.contains('/')), path.file_name()) {
        let lt = dir.join(file.to_string_lossy().replacen("libcublas", "libcublasLt", 1));
        if lt.is_file() {
            libs.push(dlopen(&lt.to_string_lossy()).map_err(|e| format!("{}: {e}", lt.display()))?);
        }
    }
    let lib = dlopen(name)?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is cuBLAS's C entry point of that name, and the field it is
            // stored in has the signature of its C declaration in cublas_api.h (stable since
            // CUDA 11; the `_v2` names are what cublas_v2.h maps the plain names to).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| format!("{name}: {e}"))?
        };
    }
    let api = Api {
        create: sym!("cublasCreate_v2"),
        destroy: sym!("cublasDestroy_v2"),
        set_stream: sym!("cublasSetStream_v2"),
        set_workspace: sym!("cublasSetWorkspace_v2"),
        set_math_mode: sym!("cublasSetMathMode"),
        get_property: sym!("cublasGetProperty"),
        gemm_ex: sym!("cublasGemmEx"),
    };
    let mut version = [0; 3];
    for (property, out) in [MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL].into_iter().zip(&mut version) {
        // SAFETY: the out-pointer is valid for a write; the property is a libraryPropertyType.
        let status = unsafe { (api.get_property)(property, out) };
        check("cublasGetProperty", status).map_err(|e| format!("{name}: {e}"))?;
    }
    libs.push(lib);
    let info = CublasLibrary {
        path: loaded_path(name),
        version: (version[0], version[1], version[2]),
        found_by: found_by.to_string(),
    };
    Ok(Loaded { api, info, _libs: libs })
}

fn api() -> Result<&'static Api> {
    match loaded() {
        Ok(l) => Ok(&l.api),
        Err(detail) => Err(MoleError::CublasNotFound { detail: detail.clone() }),
    }
}

/// Which cuBLAS this process uses, or [`MoleError::CublasNotFound`] saying what was tried and
/// how to install it.
pub fn cublas_library() -> Result<CublasLibrary> {
    match loaded() {
        Ok(l) => Ok(l.info.clone()),
        Err(detail) => Err(MoleError::CublasNotFound { detail: detail.clone() }),
    }
}

/// One row-major matrix operand in device memory: `ptr` is its first element (a `CUdeviceptr`),
/// `len` the elements readable (or writable) from there, `ld` the elements from one row's start
/// to the next (at least the row length; larger for a view into a wider matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMatrix {
    /// Device address of element `[0, 0]`.
    pub ptr: u64,
    /// Elements available from `ptr`: at least `(rows - 1)·ld + cols`.
    pub len: usize,
    /// Leading dimension (row stride) in elements.
    pub ld: usize,
}

/// `C [m, n] = alpha·A [m, k]·B [k, n] + beta·C`, all row-major with elements of `dtype` and f32
/// accumulation. With `beta = 0`, `C` is only written (NaN there does not propagate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// Element type of A, B and C.
    pub dtype: DType,
    /// Rows of A and C.
    pub m: usize,
    /// Columns of B and C.
    pub n: usize,
    /// Columns of A, rows of B: the reduction length.
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C's previous contents.
    pub beta: f32,
}

/// A device byte range `[start, start + bytes)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    start: u64,
    bytes: u64,
}

impl Span {
    fn overlaps(&self, other: &Span) -> bool {
        self.start < other.start + other.bytes && other.start < self.start + self.bytes
    }
}

/// A checked product, ready for cuBLAS: sizes as its `int`s and the operands' byte ranges.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Checked {
    dims: [c_int; 3],
    lds: [c_int; 3],
    spans: [(&'static str, Span); 3],
}

/// `value` as cuBLAS's `int`, or [`MoleError::TooLarge`] naming it.
fn as_int(what: &str, value: usize) -> Result<c_int> {
    c_int::try_from(value).map_err(|_| MoleError::TooLarge {
        what: format!("gemm {what}"),
        value: value.to_string(),
        limit: format!("at most {} (cuBLAS takes 32-bit sizes)", c_int::MAX),
    })
}

impl Gemm {
    /// Checks the sizes, the leading dimensions, the lengths and the alignment of the operands,
    /// and that C overlaps neither A nor B, without any library call. `None`: nothing to do
    /// (`m = 0`, `n = 0`, or `k = 0` with `beta = 1`).
    pub(crate) fn check(&self, a: &DeviceMatrix, b: &DeviceMatrix, c: &DeviceMatrix) -> Result<Option<Checked>> {
        for (name, value) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !value.is_finite() {
                return Err(MoleError::param(name, value, "must be finite"));
            }
        }
        let dims = [as_int("m", self.m)?, as_int("n", self.n)?, as_int("k", self.k)?];
        if self.m == 0 || self.n == 0 || (self.k == 0 && self.beta == 1.0) {
            return Ok(None);
        }
        if self.k == 0 {
            return Err(MoleError::param(
                "k",
                0,
                "an empty product with beta != 1 would only scale C: scale C itself instead",
            ));
        }
        let (m, n, k) = (self.m, self.n, self.k);
        let operands = [("A [m, k]", a, m, k), ("B [k, n]", b, k, n), ("C [m, n]", c, m, n)];
        let mut lds = [0; 3];
        let mut spans = [("", Span { start: 0, bytes: 0 }); 3];
        for (i, (name, op, rows, cols)) in operands.into_iter().enumerate() {
            let operand = || format!("{name} = [{rows}, {cols}]");
            let bad = |reason: String| MoleError::InvalidOperand { operand: operand(), reason };
            lds[i] = as_int(&format!("leading dimension of {}", operand()), op.ld)?;
            if op.ld < cols {
                return Err(bad(format!("leading dimension {} is below the row length {cols}", op.ld)));
            }
            let too_large = || MoleError::TooLarge {
                what: operand(),
                value: format!("leading dimension {}", op.ld),
                limit: "its extent in bytes must fit in 64 bits".into(),
            };
            let extent = (rows - 1).checked_mul(op.ld).and_then(|e| e.checked_add(cols)).ok_or_else(too_large)?;
            if op.len < extent {
                return Err(bad(format!(
                    "{} elements given from the pointer, but rows of {cols} at a stride of {} need {extent}",
                    op.len, op.ld
                )));
            }
            let size = self.dtype.size_bytes() as u64;
            if op.ptr == 0 || op.ptr % size != 0 {
                return Err(bad(format!("pointer {:#x} is null or not aligned to its {size}-byte elements", op.ptr)));
            }
            let bytes = (extent as u64).checked_mul(size).filter(|b| op.ptr.checked_add(*b).is_some());
            spans[i] = (name, Span { start: op.ptr, bytes: bytes.ok_or_else(too_large)? });
        }
        for input in [0, 1] {
            if spans[2].1.overlaps(&spans[input].1) {
                return Err(MoleError::InvalidOperand {
                    operand: format!("C [m, n] = [{m}, {n}]"),
                    reason: format!("overlaps {}, which it would overwrite while it is read", spans[input].0),
                });
            }
        }
        Ok(Some(Checked { dims, lds, spans }))
    }
}

/// The cuBLAS workspace recommended per stream: 32 MiB from Hopper (sm_90) on, 4 MiB before.
fn workspace_bytes(compute_capability: (i32, i32)) -> usize {
    if compute_capability.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// A cuBLAS handle in a [`Device`]'s context, with one workspace per stream it has run on.
///
/// Rules (cuBLAS ties a handle to the context current when it is created):
/// - it belongs to the device's context, which [`Blas::new`] and every call bind on the calling
///   thread first, so it may be used from any thread;
/// - calls are serialised by a lock: each sets the handle's stream and that stream's workspace,
///   then enqueues the product, and returns without waiting for it;
/// - every stream given costs one workspace (4 or 32 MiB, checked against the free memory),
///   allocated by the first call on that stream (so make one before capturing the stream into
///   a CUDA graph) and kept until the `Blas` is dropped, which waits for the context's work and
///   then frees them.
pub struct Blas {
    device: Device,
    inner: Mutex<Inner>,
}

struct Inner {
    handle: Handle,
    /// `(stream, workspace)`: the stream handle's address and its workspace allocation.
    workspaces: Vec<(usize, CUdeviceptr)>,
}

// SAFETY: a cuBLAS handle may be used from any host thread (cuBLAS is thread-safe); the mutex
// around `Inner` keeps its per-call settings (stream, workspace) from interleaving.
unsafe impl Send for Inner {}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("device", &self.device.ordinal()).finish_non_exhaustive()
    }
}

impl Blas {
    /// Loads cuBLAS ([`MoleError::CublasNotFound`] with how to install it when it is missing)
    /// and creates a handle in `device`'s context.
    pub fn new(device: &Device) -> Result<Blas> {
        let api = api()?;
        device.bind()?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid for a write; the device's context is current.
        check("cublasCreate_v2", unsafe { (api.create)(&mut handle) })?;
        let blas = Blas { device: device.clone(), inner: Mutex::new(Inner { handle, workspaces: Vec::new() }) };
        let mode = DEFAULT_MATH | DISALLOW_REDUCED_PRECISION_REDUCTION;
        // SAFETY: `handle` was just created; dropping `blas` on error destroys it.
        check("cublasSetMathMode", unsafe { (api.set_math_mode)(handle, mode) })?;
        Ok(blas)
    }

    /// The device the handle belongs to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Enqueues `C = alpha·A·B + beta·C` ([`Gemm`]) on `stream`, with A `[m, k]`, B `[k, n]` and
    /// C `[m, n]` row-major in device memory. Everything is checked before cuBLAS is called:
    /// sizes within cuBLAS's 32-bit `int`, leading dimensions at least the row lengths, lengths
    /// covering the rows at their stride, element alignment, C overlapping neither input
    /// ([`MoleError::InvalidOperand`], [`MoleError::TooLarge`] naming the operand), every byte of
    /// each operand mapped device memory of the device's context (the driver's allocations,
    /// walked from the operand's start), and `stream` in that context. `m = 0`, `n = 0` (or
    /// `k = 0` with `beta = 1`) does nothing.
    ///
    /// Row-major through the column-major identity `Cᵀ = Bᵀ·Aᵀ`: a row-major `[r, c]` matrix
    /// with stride `ld` is the column-major `[c, r]` one with the same `ld`, so cuBLAS computes
    /// `(n, m, k)` with B first.
    ///
    /// # Safety
    /// The operands' memory must stay allocated, A and B unwritten and C otherwise untouched
    /// until the product has run on `stream` (order other streams' work by events), and `stream`
    /// must stay alive as long as this `Blas` may be called with it.
    pub unsafe fn gemm(
        &self,
        stream: CUstream,
        op: &Gemm,
        a: DeviceMatrix,
        b: DeviceMatrix,
        c: DeviceMatrix,
    ) -> Result<()> {
        let Some(checked) = self.validate(stream, op, &a, &b, &c)? else { return Ok(()) };
        let api = api()?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (workspace, workspace_len) = self.workspace(&mut inner, stream)?;
        let handle = inner.handle;
        // SAFETY: `handle` is live and its context is current; `stream` is in that context.
        check("cublasSetStream_v2", unsafe { (api.set_stream)(handle, stream) })?;
        // SAFETY: the workspace is a live allocation of `workspace_len` bytes in the context,
        // used only on `stream` (one per stream); set after the stream, which resets it.
        check("cublasSetWorkspace_v2", unsafe {
            (api.set_workspace)(handle, workspace as *mut c_void, workspace_len)
        })?;
        let ty = match op.dtype {
            DType::F32 => CUDA_R_32F,
            DType::F16 => CUDA_R_16F,
            DType::BF16 => CUDA_R_16BF,
        };
        let [m, n, k] = checked.dims;
        let [lda, ldb, ldc] = checked.lds;
        let (alpha, beta) = (op.alpha, op.beta);
        let ptr = |p: u64| p as *const c_void;
        // SAFETY: the sizes, strides, alignment and ranges were checked above, each range is
        // mapped device memory of the current context; the scalars are f32 host values, as
        // CUBLAS_COMPUTE_32F under the default (host) pointer mode reads them; the caller keeps
        // the memory alive and unraced until the product has run (this function's contract).
        let status = unsafe {
            (api.gemm_ex)(
                handle,
                OP_N,
                OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                ptr(b.ptr),
                ty,
                ldb,
                ptr(a.ptr),
                ty,
                lda,
                (&beta as *const f32).cast(),
                c.ptr as *mut c_void,
                ty,
                ldc,
                COMPUTE_32F,
                GEMM_DEFAULT,
            )
        };
        check("cublasGemmEx", status)
    }

    /// Every check [`Blas::gemm`] makes before calling cuBLAS, alone: a composed forward checks
    /// all its products before it enqueues the first. `None` for an empty product.
    pub(crate) fn validate(
        &self,
        stream: CUstream,
        op: &Gemm,
        a: &DeviceMatrix,
        b: &DeviceMatrix,
        c: &DeviceMatrix,
    ) -> Result<Option<Checked>> {
        let Some(checked) = op.check(a, b, c)? else { return Ok(None) };
        self.device.bind()?;
        self.check_stream(stream)?;
        for (name, span) in checked.spans {
            check_mapped(name, span)?;
        }
        Ok(Some(checked))
    }

    /// Allocates `stream`'s workspace now (it is otherwise allocated by the first product on
    /// `stream`): what a CUDA graph capture of a forward on `stream` needs first, since a capture
    /// cannot allocate.
    pub fn reserve(&self, stream: CUstream) -> Result<()> {
        self.device.bind()?;
        self.check_stream(stream)?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.workspace(&mut inner, stream).map(|_| ())
    }

    /// `stream`'s workspace, allocated on its first use.
    fn workspace(&self, inner: &mut Inner, stream: CUstream) -> Result<(CUdeviceptr, usize)> {
        let bytes = workspace_bytes(self.device.compute_capability());
        if let Some(&(_, ptr)) = inner.workspaces.iter().find(|(s, _)| *s == stream as usize) {
            return Ok((ptr, bytes));
        }
        self.device.check_memory("cuBLAS workspace", bytes as u64)?;
        // SAFETY: the device's context is current; cuBLAS never reads the workspace before
        // writing it, so its contents do not matter.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(cuda_err("cuMemAlloc"))?;
        inner.workspaces.push((stream as usize, ptr));
        Ok((ptr, bytes))
    }

    /// `stream` must be in the device's context (the legacy default stream, null, always is),
    /// and not the per-thread default stream's handle, which names a different stream on every
    /// thread: workspaces are kept per stream handle, and two threads' streams must not share one.
    fn check_stream(&self, stream: CUstream) -> Result<()> {
        if stream as usize == PER_THREAD_STREAM {
            return Err(MoleError::InvalidOperand {
                operand: "stream".into(),
                reason: "the per-thread default stream (CU_STREAM_PER_THREAD) is not supported: pass a created stream"
                    .into(),
            });
        }
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid for a write; a stream the caller keeps alive (the
        // contract of `gemm`) is a valid argument.
        unsafe { sys::cuStreamGetCtx(stream, &mut ctx) }.result().map_err(cuda_err("cuStreamGetCtx"))?;
        if ctx != self.device.context().cu_ctx() {
            return Err(MoleError::InvalidOperand {
                operand: "stream".into(),
                reason: format!("belongs to another context than device {}'s", self.device.ordinal()),
            });
        }
        Ok(())
    }
}

/// `CU_STREAM_PER_THREAD`'s handle value.
const PER_THREAD_STREAM: usize = 0x2;

/// Every byte of `span` must be device memory mapped in the current context: the check walks
/// the allocations the driver reports from the span's start. A span may cross from one into the
/// next where they are adjacent, as the segments of one virtual-memory mapping are (PyTorch's
/// expandable segments; the driver reports each segment alone); it is refused where an address
/// is not mapped, which a kernel would hit as an illegal address that kills the context.
fn check_mapped(name: &str, span: Span) -> Result<()> {
    let end = span.start + span.bytes;
    let mut at = span.start;
    while at < end {
        let (mut base, mut size): (CUdeviceptr, usize) = (0, 0);
        // SAFETY: both out-pointers are valid for writes; any address is a valid argument.
        let found = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, at) }.result();
        let next = base.saturating_add(size as u64);
        match found {
            Ok(()) if base <= at && next > at => at = next,
            _ => {
                let why = found.err().map(|e| format!(" ({e})")).unwrap_or_default();
                let reason = if at == span.start {
                    format!("{at:#x} is not device memory of this context{why}")
                } else {
                    format!(
                        "its {} bytes from {:#x} reach {at:#x}, which is not device memory of this context{why}",
                        span.bytes, span.start
                    )
                };
                return Err(MoleError::InvalidOperand { operand: name.to_string(), reason });
            }
        }
    }
    Ok(())
}

impl Drop for Blas {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        // Products queued on the callers' streams may still use the workspaces: wait for the
        // context before freeing them. Errors here cannot be reported; a failed context has
        // nothing left to wait for.
        let _ =
            self.device.bind().and_then(|_| self.device.context().synchronize().map_err(cuda_err("cuCtxSynchronize")));
        if let Ok(api) = api() {
            // SAFETY: the handle is live and not used again; its context is current.
            let _ = unsafe { (api.destroy)(inner.handle) };
        }
        for (_, ptr) in inner.workspaces.drain(..) {
            // SAFETY: allocated by `malloc_sync` in this context, freed once, no work left on it.
            let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(dtype: DType, m: usize, n: usize, k: usize) -> Gemm {
        Gemm { dtype, m, n, k, alpha: 1.0, beta: 0.0 }
    }

    fn dense(ptr: u64, rows: usize, cols: usize) -> DeviceMatrix {
        DeviceMatrix { ptr, len: rows * cols, ld: cols }
    }

    /// An `InvalidOperand` naming `operand` with `words` in its reason.
    fn assert_operand(err: MoleError, operand: &str, words: &str) {
        match &err {
            MoleError::InvalidOperand { operand: o, reason } if o.starts_with(operand) && reason.contains(words) => {}
            _ => panic!("expected {operand}: ...{words}..., got {err:?}"),
        }
    }

    #[test]
    fn a_missing_library_is_an_error_that_says_how_to_install_it() {
        let missing = "/nonexistent/mole/libcublas.so.13";
        let detail = SEARCH.load_with(Some(missing.into()), open).err().expect("no such file");
        assert!(detail.starts_with(&format!("{CUBLAS_PATH_ENV}={missing}: ")), "{detail}");
        let message = MoleError::CublasNotFound { detail }.to_string();
        for hint in ["pip install nvidia-cublas", "nvidia-cublas-cu12", "CUDA toolkit", CUBLAS_PATH_ENV, missing] {
            assert!(message.contains(hint), "{hint} not in: {message}");
        }
    }

    #[test]
    fn a_folder_without_cublas_is_an_error_naming_what_it_lacks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libcublasLt.so.13"), b"").unwrap();
        let detail = SEARCH.load_with(Some(dir.path().into()), open).err().expect("no libcublas there");
        assert!(detail.contains("is a folder with none of libcublas.so.13, libcublas.so.12, libcublas.so"), "{detail}");
    }

    #[test]
    fn files_that_are_not_cublas_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libcublas.so.13");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        assert!(open(&fake.to_string_lossy(), "test").is_err());
        // The libcublasLt beside it is loaded first, and its failure reported.
        let lt = dir.path().join("libcublasLt.so.13");
        std::fs::write(&lt, b"not an ELF file either").unwrap();
        let err = open(&fake.to_string_lossy(), "test").err().expect("garbage must not load");
        assert!(err.contains("libcublasLt.so.13"), "{err}");
    }

    #[test]
    fn the_cublas_found_loads_with_every_entry_point() {
        // Where MOLE_CUBLAS_PATH names a library, it must load (and report its version).
        match cublas_library() {
            Ok(lib) => {
                eprintln!("{lib:?}");
                assert!(lib.version.0 >= 11 && lib.path.is_file(), "{lib:?}")
            }
            Err(e) => {
                assert!(matches!(e, MoleError::CublasNotFound { .. }), "{e}");
                assert!(std::env::var_os(CUBLAS_PATH_ENV).is_none(), "{CUBLAS_PATH_ENV} is set but: {e}");
            }
        }
    }

    #[test]
    fn statuses_are_named_with_their_call() {
        assert_eq!(check("cublasGemmEx", 0), Ok(()));
        let err = check("cublasGemmEx", 13).unwrap_err();
        assert_eq!(err, MoleError::Cuda { call: "cublasGemmEx", message: "CUBLAS_STATUS_EXECUTION_FAILED".into() });
        assert!(check("cublasCreate_v2", 99).unwrap_err().to_string().contains("cublasCreate_v2: cublasStatus_t 99"));
    }

    #[test]
    fn dense_and_strided_operands_check_out_with_their_byte_ranges() {
        let g = op(DType::BF16, 3, 17, 33);
        let (a, b, c) = (dense(0x1000, 3, 33), dense(0x10000, 33, 17), dense(0x20000, 3, 17));
        let checked = g.check(&a, &b, &c).unwrap().expect("work to do");
        assert_eq!(checked.dims, [3, 17, 33]);
        assert_eq!(checked.lds, [33, 17, 17]);
        assert_eq!(checked.spans.map(|(_, s)| s.bytes), [3 * 33 * 2, 33 * 17 * 2, 3 * 17 * 2]);
        // A [3, 33] view at column 5 of a [3, 40] matrix: its last row ends 2 elements before the
        // buffer does, so len = 3·40 - 5 covers it and one element less than its extent does not.
        let view = DeviceMatrix { ptr: 0x1000 + 5 * 2, len: 3 * 40 - 5, ld: 40 };
        let checked = g.check(&view, &b, &c).unwrap().unwrap();
        assert_eq!(checked.lds[0], 40);
        assert_eq!(checked.spans[0].1, Span { start: 0x100a, bytes: (2 * 40 + 33) * 2 });
        let short = DeviceMatrix { len: 2 * 40 + 32, ..view };
        assert_operand(g.check(&short, &b, &c).unwrap_err(), "A [m, k] = [3, 33]", "need 113");
    }

    #[test]
    fn empty_products_need_no_call() {
        let nowhere = DeviceMatrix { ptr: 0, len: 0, ld: 0 };
        for (m, n, k) in [(0, 4, 4), (4, 0, 4), (0, 0, 0)] {
            assert_eq!(op(DType::F32, m, n, k).check(&nowhere, &nowhere, &nowhere), Ok(None));
        }
        // k = 0 leaves C as it is only with beta = 1; other betas are refused, not ignored.
        let g = Gemm { beta: 1.0, ..op(DType::F16, 4, 4, 0) };
        assert_eq!(g.check(&nowhere, &nowhere, &nowhere), Ok(None));
        let err = Gemm { beta: 0.5, ..g }.check(&nowhere, &nowhere, &nowhere).unwrap_err();
        assert!(matches!(err, MoleError::InvalidParameter { name: "k", .. }), "{err:?}");
    }

    #[test]
    fn every_bad_operand_is_refused_by_name_before_any_call() {
        let g = op(DType::F16, 4, 8, 16);
        let (a, b, c) = (dense(0x1000, 4, 16), dense(0x2000, 16, 8), dense(0x3000, 4, 8));
        assert!(g.check(&a, &b, &c).unwrap().is_some());
        // Leading dimensions below the row length, each operand in turn.
        assert_operand(
            g.check(&DeviceMatrix { ld: 15, ..a }, &b, &c).unwrap_err(),
            "A [m, k]",
            "below the row length 16",
        );
        assert_operand(
            g.check(&a, &DeviceMatrix { ld: 7, ..b }, &c).unwrap_err(),
            "B [k, n]",
            "below the row length 8",
        );
        assert_operand(
            g.check(&a, &b, &DeviceMatrix { ld: 7, ..c }).unwrap_err(),
            "C [m, n]",
            "below the row length 8",
        );
        // Lengths one element short.
        assert_operand(g.check(&a, &DeviceMatrix { len: 127, ..b }, &c).unwrap_err(), "B [k, n]", "127 elements");
        assert_operand(g.check(&a, &b, &DeviceMatrix { len: 31, ..c }).unwrap_err(), "C [m, n]", "31 elements");
        // Null and misaligned pointers (f16 elements are 2 bytes; f32 4).
        assert_operand(g.check(&DeviceMatrix { ptr: 0, ..a }, &b, &c).unwrap_err(), "A [m, k]", "null");
        assert_operand(g.check(&a, &DeviceMatrix { ptr: 0x2001, ..b }, &c).unwrap_err(), "B [k, n]", "aligned");
        let f32_op = Gemm { dtype: DType::F32, ..g };
        assert_operand(f32_op.check(&a, &b, &DeviceMatrix { ptr: 0x3002, ..c }).unwrap_err(), "C [m, n]", "aligned");
        // C may not overlap an input; the inputs may share memory.
        let c_in_a = DeviceMatrix { ptr: 0x1000 + 2 * 16 * 2, ..c };
        assert_operand(g.check(&a, &b, &c_in_a).unwrap_err(), "C [m, n]", "overlaps A [m, k]");
        let c_in_b = DeviceMatrix { ptr: 0x2000 + 126 * 2, ..c };
        assert_operand(g.check(&a, &b, &c_in_b).unwrap_err(), "C [m, n]", "overlaps B [k, n]");
        let c_after_b = DeviceMatrix { ptr: 0x2000 + 128 * 2, ..c };
        assert!(g.check(&a, &b, &c_after_b).is_ok());
        assert!(g.check(&a, &DeviceMatrix { ptr: a.ptr, len: 128, ld: 8 }, &c).is_ok());
        // Sizes past cuBLAS's int, extents past 64 bits, scalars that are not finite.
        let huge = c_int::MAX as usize + 1;
        for (g, what) in [(op(DType::F32, huge, 1, 1), "gemm m"), (op(DType::F32, 1, 1, huge), "gemm k")] {
            assert!(matches!(g.check(&a, &b, &c), Err(MoleError::TooLarge { what: w, .. }) if w == what));
        }
        let wide = DeviceMatrix { ld: huge, len: usize::MAX, ..a };
        assert!(
            matches!(g.check(&wide, &b, &c), Err(MoleError::TooLarge { what, .. }) if what.contains("leading dimension of A"))
        );
        let far = DeviceMatrix { ptr: u64::MAX - 1, len: 64, ld: 16 };
        assert!(matches!(g.check(&far, &b, &c), Err(MoleError::TooLarge { what, .. }) if what.starts_with("A [m, k]")));
        for bad in [f32::NAN, f32::INFINITY] {
            assert!(matches!(
                Gemm { alpha: bad, ..g }.check(&a, &b, &c),
                Err(MoleError::InvalidParameter { name: "alpha", .. })
            ));
            assert!(matches!(
                Gemm { beta: bad, ..g }.check(&a, &b, &c),
                Err(MoleError::InvalidParameter { name: "beta", .. })
            ));
        }
    }

    #[test]
    fn hopper_and_later_get_the_larger_workspace() {
        assert_eq!(workspace_bytes((8, 0)), 4 << 20);
        assert_eq!(workspace_bytes((9, 0)), 32 << 20);
        assert_eq!(workspace_bytes((10, 0)), 32 << 20);
    }
}
