//! # mole-hostexec: mole's CUDA kernels, unmodified, on the CPU
//!
//! A development-only execution layer: `build.rs` compiles every `kernels/*.cu` of the `mole`
//! crate (once per element type) and every `tests/kernels/*.cu` of this crate as C++ against a
//! host runtime (`kernels/common/host/`), so tests without a GPU can run the real kernel sources
//! and compare them with the f64 reference.
//!
//! Execution model: each CUDA thread is a fiber that runs until it blocks in `__syncthreads`, a
//! warp collective (shuffles, votes, `ldmatrix`, `mma`) or exits; the scheduler then resumes
//! another runnable thread in the order the launch chose ([`Schedule`]). What the layer checks:
//! - **barriers**: a missing `__syncthreads` reads poisoned or stale shared memory under some
//!   schedule; threads meeting at different `__syncthreads` calls, and blocks where no thread can
//!   progress (collectives some lanes never reach), are errors naming the call sites;
//! - **shared memory** starts every block poisoned (`0xFF` bytes: NaN / -1); dynamic shared
//!   memory past the launch's request is unmapped (or checked after the block);
//! - **global memory**: every buffer sits between guard pages ([`Guard`]); an out-of-bounds
//!   access stops the launch with the kernel, buffer, element index, thread and block; buffers
//!   bound only to `const T*` parameters are read-only for the launch;
//! - **arguments** are checked against the kernel's C++ signature (count, sizes, element sizes
//!   behind pointers, buffers for pointers); a buffer of bytes is untyped memory (a workspace
//!   carved into typed regions) and matches any element size;
//! - **architecture primitives**: `mma.sync m16n8k16` and `ldmatrix` with the PTX fragment
//!   layouts (full warps only), and `cp.async`, whose data lands only at the covering wait;
//! - **blocks** start in index order, reversed or shuffled ([`Schedule`]); under a seeded
//!   schedule several are in flight at once, interleaved at barrier releases, so a race between
//!   blocks sharing global memory (a read-modify-write across a barrier, a read of another
//!   block's output) shows.
//!
//! Shuffle operands follow `shfl.sync` (only the low five bits of a lane or delta count);
//! `cp.async` poisons its destination at issue (until the covering wait it holds neither old nor
//! new data); `mma` sums like the tensor cores by default ([`MmaAccumulation`]).
//!
//! Not modelled: timing, blocks that spin on another block's progress (they hang here),
//! memory-model races finer than the barrier/collective granularity, and the exact rounding of
//! the GPU's math library (`expf` & co. come from the C library). A kernel stuck in a loop
//! without collectives hangs the launch. Context switches are hand-written on x86-64; building with
//! `MOLE_HOSTEXEC_UCONTEXT=1` (or on other targets) uses `swapcontext` instead.
//!
//! Kernels are looked up by name ([`Kernel::get`], or [`Kernel::find`] by file and element type)
//! and launched with a [`LaunchConfig`] and [`Arg`]s; global memory is [`Buffer`]s. `scale_f32`
//! below is one of this crate's test kernels (`tests/kernels/basic.cu`):
//!
//! ```
//! use mole_hostexec::{Arg, Buffer, Kernel, LaunchConfig, Schedule};
//!
//! let x = Buffer::from_slice("x", &[1.0f32; 64]);
//! let y = Buffer::<f32>::poisoned("y", 64);
//! let k = Kernel::get("scale_f32")?;
//! k.launch(&LaunchConfig::new(1, 64).schedule(Schedule::Reverse), &[Arg::buffer(&x), Arg::buffer(&y), Arg::value(2.0f32)])?;
//! assert_eq!(y.read(), vec![2.0f32; 64]);
//! # Ok::<(), mole_hostexec::HostError>(())
//! ```

#![warn(missing_docs)]

mod buffer;
mod error;
mod ffi;

pub use buffer::{Buffer, Guard};
pub use error::{ErrorKind, HostError};

use bytemuck::Pod;
use std::ffi::{c_char, CStr};
use std::marker::PhantomData;

/// A CUDA `dim3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dim3 {
    /// Fastest-varying extent.
    pub x: u32,
    /// Middle extent.
    pub y: u32,
    /// Slowest-varying extent.
    pub z: u32,
}

impl From<u32> for Dim3 {
    fn from(x: u32) -> Dim3 {
        Dim3 { x, y: 1, z: 1 }
    }
}

impl From<(u32, u32)> for Dim3 {
    fn from((x, y): (u32, u32)) -> Dim3 {
        Dim3 { x, y, z: 1 }
    }
}

impl From<(u32, u32, u32)> for Dim3 {
    fn from((x, y, z): (u32, u32, u32)) -> Dim3 {
        Dim3 { x, y, z }
    }
}

/// The order in which a block's runnable threads are resumed whenever the running one blocks,
/// and the order of the blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// Lowest linear thread index first: warps run one after another; blocks in index order.
    #[default]
    Forward,
    /// Highest linear thread index first; blocks in reverse index order.
    Reverse,
    /// Uniformly random among the runnable threads, from this seed (reproducible); blocks in a
    /// shuffled order, [`SEEDED_RESIDENT_BLOCKS`] in flight at once, interleaved at barriers.
    Seeded(u64),
}

/// Blocks in flight at once under [`Schedule::Seeded`] unless [`LaunchConfig::resident_blocks`]
/// says otherwise.
pub const SEEDED_RESIDENT_BLOCKS: u32 = 4;

/// How the emulated `mma.sync` adds its products to the accumulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MmaAccumulation {
    /// Like the tensor cores (modelled on A100 measurements): blocks of 8 exact products and the
    /// accumulator aligned to the largest, truncated 3 bits below its f32 significand, summed,
    /// and the result truncated to f32. A tolerance that holds here holds on hardware.
    #[default]
    Truncating,
    /// The exact sum rounded once to f32 (round to nearest): the most accurate result.
    Exact,
}

impl MmaAccumulation {
    /// `MOLE_HOSTEXEC_MMA=exact` selects [`MmaAccumulation::Exact`] for every launch that does not
    /// choose; anything else (or nothing) [`MmaAccumulation::Truncating`]. Test suites run under
    /// both (`scripts/test.sh`).
    pub fn from_env() -> MmaAccumulation {
        match std::env::var("MOLE_HOSTEXEC_MMA").as_deref() {
            Ok("exact") => MmaAccumulation::Exact,
            _ => MmaAccumulation::Truncating,
        }
    }
}

impl Schedule {
    /// [`Schedule::Forward`], [`Schedule::Reverse`] and one [`Schedule::Seeded`] per seed: the
    /// set a race-sensitive test runs under.
    pub fn sweep(seeds: impl IntoIterator<Item = u64>) -> Vec<Schedule> {
        [Schedule::Forward, Schedule::Reverse].into_iter().chain(seeds.into_iter().map(Schedule::Seeded)).collect()
    }
}

/// Grid, block, dynamic shared memory and schedule of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in the grid.
    pub grid: Dim3,
    /// Threads per block (at most 1024).
    pub block: Dim3,
    /// Dynamic shared memory per block, bytes (at most 227 KiB).
    pub shared_bytes: u32,
    /// Thread resumption order.
    pub schedule: Schedule,
    /// How `mma.sync` sums.
    pub mma: MmaAccumulation,
    /// Blocks in flight at once (1..=16), interleaved at barrier releases so that blocks sharing
    /// global memory meet; `None`: 1, or [`SEEDED_RESIDENT_BLOCKS`] under [`Schedule::Seeded`].
    pub resident_blocks: Option<u32>,
}

impl LaunchConfig {
    /// `grid` x `block`, no dynamic shared memory, [`Schedule::Forward`], `mma` from
    /// [`MmaAccumulation::from_env`].
    pub fn new(grid: impl Into<Dim3>, block: impl Into<Dim3>) -> LaunchConfig {
        LaunchConfig {
            grid: grid.into(),
            block: block.into(),
            shared_bytes: 0,
            schedule: Schedule::Forward,
            mma: MmaAccumulation::from_env(),
            resident_blocks: None,
        }
    }

    /// With `mma.sync` summing as `mode` says.
    pub fn mma(mut self, mode: MmaAccumulation) -> LaunchConfig {
        self.mma = mode;
        self
    }

    /// With `n` blocks in flight at once (1..=16).
    pub fn resident_blocks(mut self, n: u32) -> LaunchConfig {
        self.resident_blocks = Some(n);
        self
    }

    /// With `bytes` of dynamic shared memory.
    pub fn shared(mut self, bytes: u32) -> LaunchConfig {
        self.shared_bytes = bytes;
        self
    }

    /// With thread order `schedule`.
    pub fn schedule(mut self, schedule: Schedule) -> LaunchConfig {
        self.schedule = schedule;
        self
    }
}

/// One kernel argument: a buffer (for a pointer parameter) or a value (copied by bytes; its
/// size must equal the parameter's).
#[derive(Clone, Debug)]
pub struct Arg<'a> {
    bytes: Vec<u8>,
    buffer: bool,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> Arg<'a> {
    /// A pointer to the first element of `b`.
    pub fn buffer<T: Pod>(b: &'a Buffer<T>) -> Arg<'a> {
        Arg { bytes: b.device_ptr().to_ne_bytes().to_vec(), buffer: true, _borrow: PhantomData }
    }

    /// A value parameter (a scalar, or a `#[repr(C)]` struct mirroring the kernel's).
    pub fn value<T: Pod>(v: T) -> Arg<'a> {
        Arg { bytes: bytemuck::bytes_of(&v).to_vec(), buffer: false, _borrow: PhantomData }
    }

    /// A value parameter given as its bytes (a parameter struct packed elsewhere).
    pub fn bytes(bytes: &[u8]) -> Arg<'a> {
        Arg { bytes: bytes.to_vec(), buffer: false, _borrow: PhantomData }
    }

    /// A pointer parameter given as an address: null, or an address inside a live [`Buffer`]
    /// (checked at launch, like every buffer argument). The caller keeps that buffer alive for
    /// the launch.
    pub fn pointer(address: u64) -> Arg<'a> {
        Arg { bytes: address.to_ne_bytes().to_vec(), buffer: address != 0, _borrow: PhantomData }
    }

    /// A null pointer.
    pub fn null() -> Arg<'a> {
        Arg { bytes: 0u64.to_ne_bytes().to_vec(), buffer: false, _borrow: PhantomData }
    }
}

impl<'a, T: Pod> From<&'a Buffer<T>> for Arg<'a> {
    fn from(b: &'a Buffer<T>) -> Arg<'a> {
        Arg::buffer(b)
    }
}

fn c_str(p: *const c_char) -> &'static str {
    if p.is_null() {
        return "";
    }
    // SAFETY: the runtime's strings are NUL-terminated literals with static storage.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
}

/// One parameter of a kernel's C++ signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    /// Bytes of the parameter itself (8 for a pointer).
    pub size: usize,
    /// For a pointer: bytes of the element it points to (0 for `void*`); `None` for a value.
    pub pointee_size: Option<usize>,
    /// For a pointer: whether it points to `const` data.
    pub pointee_const: bool,
}

/// A kernel compiled for the CPU.
#[derive(Clone, Copy)]
pub struct Kernel {
    info: &'static ffi::KernelInfo,
}

// SAFETY: a kernel record is immutable static data of the runtime (built once, never freed), and
// launches through it are serialised by the runtime.
unsafe impl Send for Kernel {}
// SAFETY: as above: shared references to immutable static data.
unsafe impl Sync for Kernel {}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernel({} in {} {})", self.name(), self.file(), self.dtype())
    }
}

/// Every kernel compiled for the CPU.
pub fn kernels() -> Vec<Kernel> {
    // SAFETY: a plain call; the runtime builds its kernel table once and never changes it.
    let count = unsafe { ffi::mole_hx_kernel_count() };
    (0..count)
        // SAFETY: `i < count`, so the pointer is to an entry of that never-freed table.
        .filter_map(|i| unsafe { ffi::mole_hx_kernel_at(i).as_ref() })
        .map(|info| Kernel { info })
        .collect()
}

/// A kernel source that did not compile for the CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitFailure {
    /// The file under `kernels/`.
    pub file: String,
    /// The element type it was built for.
    pub dtype: String,
    /// The compiler's output.
    pub log: String,
}

/// The project kernel sources (`kernels/*.cu`, per element type) that failed to compile for the
/// CPU when this crate was built.
pub fn unit_failures() -> Vec<UnitFailure> {
    // SAFETY: a plain call returning the length of the generated, static unit table.
    let count = unsafe { ffi::mole_hx_unit_total() };
    (0..count)
        // SAFETY: `i < count`, so the pointer is to an entry of the static table.
        .filter_map(|i| unsafe { ffi::mole_hx_unit_at(i).as_ref() })
        .filter(|u| !u.error.is_null())
        .map(|u| UnitFailure { file: c_str(u.file).into(), dtype: c_str(u.dtype).into(), log: c_str(u.error).into() })
        .collect()
}

fn not_found(what: String) -> HostError {
    let failures: Vec<String> = unit_failures().iter().map(|f| format!("{} ({})", f.file, f.dtype)).collect();
    let hint = if failures.is_empty() {
        String::new()
    } else {
        format!("; sources that failed to compile for the CPU: {}", failures.join(", "))
    };
    HostError { kind: ErrorKind::NotFound, message: format!("{what}{hint}") }
}

impl Kernel {
    /// The kernel called `name`; an error if none or several units define it.
    pub fn get(name: &str) -> Result<Kernel, HostError> {
        let found: Vec<Kernel> = kernels().into_iter().filter(|k| k.name() == name).collect();
        match found.as_slice() {
            [k] => Ok(*k),
            [] => Err(not_found(format!("no kernel `{name}` is compiled for the CPU"))),
            many => Err(HostError {
                kind: ErrorKind::NotFound,
                message: format!("kernel `{name}` is defined by {} units: use Kernel::find", many.len()),
            }),
        }
    }

    /// The kernel `name` of `file` (relative to `kernels/`, or `tests/kernels/x.cu`) built for
    /// element type `dtype` (`"f32"`, `"f16"`, `"bf16"`; `""` for test kernels).
    pub fn find(file: &str, dtype: &str, name: &str) -> Result<Kernel, HostError> {
        kernels()
            .into_iter()
            .find(|k| k.file() == file && k.dtype() == dtype && k.name() == name)
            .ok_or_else(|| not_found(format!("no kernel `{name}` in {file} ({dtype}) is compiled for the CPU")))
    }

    /// The entry-point name.
    pub fn name(&self) -> &'static str {
        c_str(self.info.name)
    }

    /// The source file.
    pub fn file(&self) -> &'static str {
        c_str(self.info.file)
    }

    /// The element type of the build (`""` for test kernels).
    pub fn dtype(&self) -> &'static str {
        c_str(self.info.dtype)
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.info.param_count
    }

    /// The parameters, as the C++ signature declares them.
    pub fn params(&self) -> Vec<Param> {
        (0..self.info.param_count)
            .map(|i| {
                // SAFETY: `params` points to `param_count` descriptors of the static kernel table.
                let p = unsafe { &*self.info.params.add(i) };
                Param {
                    size: p.size as usize,
                    pointee_size: (p.is_pointer != 0).then_some(p.pointee_size as usize),
                    pointee_const: p.pointee_const != 0,
                }
            })
            .collect()
    }

    /// Runs the kernel over the whole grid. Launches are serialised process-wide.
    pub fn launch(&self, cfg: &LaunchConfig, args: &[Arg<'_>]) -> Result<(), HostError> {
        let (schedule, seed) = match cfg.schedule {
            Schedule::Forward => (0, 0),
            Schedule::Reverse => (1, 0),
            Schedule::Seeded(s) => (2, s),
        };
        let c = ffi::LaunchConfig {
            grid: [cfg.grid.x, cfg.grid.y, cfg.grid.z],
            block: [cfg.block.x, cfg.block.y, cfg.block.z],
            shared_bytes: cfg.shared_bytes as u64,
            schedule,
            seed,
            mma: match cfg.mma {
                MmaAccumulation::Truncating => 0,
                MmaAccumulation::Exact => 1,
            },
            resident: cfg.resident_blocks.unwrap_or(match cfg.schedule {
                Schedule::Seeded(_) => SEEDED_RESIDENT_BLOCKS,
                _ => 1,
            }),
        };
        let raw: Vec<ffi::Arg> = args
            .iter()
            .map(|a| ffi::Arg { data: a.bytes.as_ptr().cast(), size: a.bytes.len() as u64, is_buffer: a.buffer as u32 })
            .collect();
        let mut message = vec![0u8; 4096];
        // SAFETY: `info` is a live kernel record; `c`, `raw` (with the argument bytes it points
        // into) and `message` outlive the call, and `message.len()` is its capacity. Buffers
        // named by the arguments are borrowed for 'a, so they stay mapped for the launch.
        let code = unsafe {
            ffi::mole_hx_launch(self.info, &c, raw.as_ptr(), raw.len(), message.as_mut_ptr().cast(), message.len())
        };
        if code == 0 {
            return Ok(());
        }
        let end = message.iter().position(|&b| b == 0).unwrap_or(message.len());
        Err(HostError { kind: ErrorKind::from_code(code), message: String::from_utf8_lossy(&message[..end]).into() })
    }
}
