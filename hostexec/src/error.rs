//! Errors of the host execution layer.

use std::fmt;

/// What went wrong in a launch (or before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad launch configuration or arguments (counts, sizes, element types, foreign pointers).
    Launch,
    /// A global-memory access outside its buffer (a guard page or the padding next to it).
    OutOfBounds,
    /// A write to a buffer bound only to `const T*` parameters.
    ReadOnlyWrite,
    /// An access to an address that belongs to no buffer (a wild or null pointer).
    InvalidAddress,
    /// A CUDA thread overflowed its fiber stack.
    StackOverflow,
    /// No thread of a block can make progress (e.g. a warp collective some lanes never reach).
    Deadlock,
    /// The threads of a block met at different `__syncthreads` calls.
    DivergentBarrier,
    /// The lanes of a warp met in different collectives.
    DivergentWarp,
    /// An architecture primitive used against its rules (partial-warp `mma`, misaligned or
    /// non-shared `ldmatrix`/`cp.async` addresses, partial shuffle masks).
    Misuse,
    /// An access past the dynamic shared memory the launch asked for.
    SharedOverrun,
    /// The requested kernel is not registered (or its unit failed to compile for the CPU).
    NotFound,
}

impl ErrorKind {
    pub(crate) fn from_code(code: i32) -> ErrorKind {
        match code {
            1 => ErrorKind::Launch,
            2 => ErrorKind::OutOfBounds,
            3 => ErrorKind::ReadOnlyWrite,
            4 => ErrorKind::InvalidAddress,
            5 => ErrorKind::StackOverflow,
            6 => ErrorKind::Deadlock,
            7 => ErrorKind::DivergentBarrier,
            8 => ErrorKind::DivergentWarp,
            9 => ErrorKind::Misuse,
            10 => ErrorKind::SharedOverrun,
            _ => ErrorKind::Launch,
        }
    }
}

/// A failed launch or lookup: the class and a message naming the kernel, and where it applies
/// the buffer, element, thread and block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError {
    /// The class of the error.
    pub kind: ErrorKind,
    /// The full report.
    pub message: String,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HostError {}
