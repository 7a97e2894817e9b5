//! One launch path for every kernel.
//!
//! Each `extern "C"` entry point is described once, in Rust ([`KernelDesc`]): its parameter
//! struct and its pointer arguments in order, each bound to one of a call's buffers ([`Buf`]) with
//! its element type, access and whether null is accepted. The C signatures are checked against
//! these descriptions by the test suite (through the CPU execution layer, which knows every
//! parameter's size, constness and element size).
//!
//! A call goes the same way whoever makes it (typed slices, raw pointers, the layer runtime, the
//! CPU execution layer of the tests):
//! 1. its buffers are bound by name into [`Bindings`] (addresses, and lengths where known);
//! 2. the family's pure plan says which buffers it takes and how long they are ([`BufLens`]),
//!    and [`Bindings::check`] compares;
//! 3. the plan's launches are packed ([`Launch::pack`]: parameters, then pointers in the order
//!    the description gives) and handed to a [`Backend`]: a CUDA stream with functions resolved
//!    once per loaded build ([`CudaBackend`], [`LoadedBuild`]), or a [`Recorder`].

mod backend;
mod bind;
mod desc;
mod typed;

pub use backend::{Backend, CudaBackend, LoadedBuild, Recorder};
pub use bind::{Bindings, BufLens, Dims, Launch};
pub use desc::{Access, ArgDesc, Buf, Elem, KernelDesc, MAX_ARGS, MAX_PARAMS_BYTES};
pub use typed::TypedBindings;
