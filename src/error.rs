//! The crate's one error type. Every public entry point validates its inputs and returns one of
//! these instead of panicking.

/// Result alias used throughout the crate.
pub type Result<T, E = MoleError> = std::result::Result<T, E>;

/// Everything that can go wrong in `mole`, as a typed value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MoleError {
    /// A tensor has the wrong number of elements for the shape the problem implies.
    #[error("{what}: expected shape {expected:?} ({} elements), got {got} elements", expected.iter().product::<usize>())]
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// The shape the problem descriptor implies.
        expected: Vec<usize>,
        /// The number of elements supplied.
        got: usize,
    },
    /// A named tensor in a file has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        got: Vec<usize>,
    },
    /// A tensor the chosen method needs was not supplied.
    #[error("missing input `{name}`: {needed_by} needs it")]
    MissingInput {
        /// Tensor name (as in the `mole eval` safetensors file).
        name: &'static str,
        /// What needs it.
        needed_by: &'static str,
    },
    /// A tensor was supplied that the chosen method does not use (almost always a spec mistake).
    #[error("unexpected input `{name}`: {reason}")]
    UnexpectedInput {
        /// Tensor name.
        name: &'static str,
        /// Why it is not used.
        reason: &'static str,
    },
    /// An expert (or adapter) id is outside `0..experts` (and is not the empty-slot marker -1).
    #[error("expert id {id} at token {token}, slot {slot} is out of range for {experts} experts")]
    ExpertIdOutOfRange {
        /// Token index.
        token: usize,
        /// Slot index within the token.
        slot: usize,
        /// The offending id.
        id: i64,
        /// Number of experts.
        experts: usize,
    },
    /// The same expert appears twice among one token's slots.
    #[error("expert {id} appears twice among the slots of token {token}")]
    DuplicateExpert {
        /// Token index.
        token: usize,
        /// The repeated id.
        id: i64,
    },
    /// `k` is zero or larger than the number of experts.
    #[error("k = {k} is invalid for {experts} experts (need 1 <= k <= E)")]
    InvalidK {
        /// Requested k.
        k: usize,
        /// Number of experts.
        experts: usize,
    },
    /// `rank_offsets` is not `0 = o[0] <= o[1] <= ... <= o[E] = R` with `E >= 1`.
    #[error("invalid rank_offsets: {reason}")]
    InvalidRankOffsets {
        /// What is wrong, with the index.
        reason: String,
    },
    /// A scalar parameter is out of its domain.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// The value given, formatted.
        value: String,
        /// The allowed domain.
        reason: &'static str,
    },
    /// A dimension that must be positive is zero.
    #[error("{name} must be positive")]
    ZeroDimension {
        /// Dimension name.
        name: &'static str,
    },
    /// The combination of router, rule and mix is not meaningful.
    #[error("unsupported combination: {0}")]
    Unsupported(String),
    /// A layer spec or a tensor file could not be read or written.
    #[error("{context}: {message}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The underlying error.
        message: String,
    },
    /// The CUDA driver library (libcuda) could not be loaded.
    #[error(
        "the CUDA driver (libcuda.so / nvcuda.dll) was not found: install an NVIDIA driver \
         (https://www.nvidia.com/Download/index.aspx) or use the CPU path ({detail})"
    )]
    CudaDriverNotFound {
        /// What was tried.
        detail: String,
    },
    /// NVRTC (libnvrtc) could not be loaded.
    #[error(
        "NVRTC (libnvrtc.so.13 or .12) was not found: in a mole checkout run \
         `bash scripts/install-nvrtc.sh` (mole then finds .nvrtc/ by itself); elsewhere \
         `pip install nvidia-cuda-nvrtc` (CUDA 13) or `nvidia-cuda-nvrtc-cu12` (CUDA 12), install \
         the CUDA toolkit, or set MOLE_NVRTC_PATH to the library ({detail})"
    )]
    NvrtcNotFound {
        /// What was tried.
        detail: String,
    },
    /// cuBLAS (libcublas) could not be loaded.
    #[error(
        "cuBLAS (libcublas.so.13 or .12) was not found: `pip install nvidia-cublas` (CUDA 13) or \
         `nvidia-cublas-cu12` (CUDA 12) into the active Python environment (PyTorch's wheels bring \
         one), install the CUDA toolkit, or set MOLE_CUBLAS_PATH to the library or its folder ({detail})"
    )]
    CublasNotFound {
        /// What was tried.
        detail: String,
    },
    /// A matrix given by device pointer does not fit its shape, its memory or its stream.
    #[error("{operand}: {reason}")]
    InvalidOperand {
        /// Which operand, with its shape, e.g. `A [m, k] = [3, 33]`.
        operand: String,
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {call}: {message}")]
    Cuda {
        /// The driver call.
        call: &'static str,
        /// The driver's message.
        message: String,
    },
    /// NVRTC rejected a kernel source or its options; `log` is NVRTC's own log.
    #[error("NVRTC could not compile {what} ({status}):\n{log}")]
    NvrtcCompile {
        /// The kernel configuration, e.g. `gating.cu f16 [TOPK=2] for sm_90`.
        what: String,
        /// NVRTC's status code.
        status: String,
        /// The compiler log (errors and warnings).
        log: String,
    },
    /// A layer spec (JSON) does not follow the documented form: an unknown or missing field, a
    /// value of the wrong type. `path` locates the field (`gating.rule.temperature`).
    #[error("layer spec: {}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
    InvalidSpec {
        /// Where in the spec, dotted (`ranks[2]`, `gating.rule.k`); empty for the whole document.
        path: String,
        /// What is wrong, with the closest valid name where there is one.
        message: String,
    },
    /// A size derived from the inputs is over its documented limit (see the size limits) or
    /// overflows when multiplied out.
    #[error("{what} = {value} is too large: {limit}")]
    TooLarge {
        /// The input or the derived size, e.g. `--tokens` or `x [T, d_in]`.
        what: String,
        /// The value given (or the dimensions that overflow).
        value: String,
        /// The limit, stated.
        limit: String,
    },
    /// An allocation would need more memory than is available; nothing was allocated.
    #[error(
        "{what} would need {} of {memory} memory but {} is available; reduce it (tokens, dimensions) or free memory",
        format_bytes(*needed),
        format_bytes(*available)
    )]
    OutOfMemory {
        /// What would have been allocated, naming the input that sized it.
        what: String,
        /// Bytes it would need.
        needed: u64,
        /// Bytes available (host: `MemAvailable` or `MOLE_MEMORY_LIMIT`; device: free memory).
        available: u64,
        /// `host` or `device`.
        memory: &'static str,
    },
    /// An output path cannot be written safely (not a regular file, read-only, a dangling link).
    #[error("cannot write {path}: {reason}")]
    UnsafeOutput {
        /// The path given.
        path: String,
        /// Why it is refused; nothing was written.
        reason: String,
    },
    /// A release gate (`mole check-kernels`, `mole gen-ptx --check`) found problems.
    #[error("{gate} failed: {detail}")]
    GateFailed {
        /// Which gate.
        gate: &'static str,
        /// What failed, and how to fix it.
        detail: String,
    },
}

impl MoleError {
    /// Shorthand for [`MoleError::InvalidParameter`].
    pub(crate) fn param(name: &'static str, value: impl std::fmt::Display, reason: &'static str) -> Self {
        MoleError::InvalidParameter { name, value: value.to_string(), reason }
    }

    /// Shorthand for [`MoleError::Io`].
    pub(crate) fn io(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        MoleError::Io { context: context.into(), message: err.to_string() }
    }
}

/// `1536` as `1.5 KiB`: bytes in the largest binary unit that keeps the number at least 1.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
