//! GPU architectures the kernels are compiled for, their per-block resource limits, and the
//! check of one compiled entry point against them.

use super::ptxas::EntryResources;
use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A real GPU architecture (`sm_XX`) the kernels target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Arch {
    /// Ampere data-center parts (A100, A30).
    #[serde(rename = "sm_80")]
    Sm80,
    /// Ampere consumer and workstation parts (RTX 30xx, A10, A40).
    #[serde(rename = "sm_86")]
    Sm86,
    /// Ada Lovelace (RTX 40xx, L4, L40).
    #[serde(rename = "sm_89")]
    Sm89,
    /// Hopper (H100, H200).
    #[serde(rename = "sm_90")]
    Sm90,
    /// Blackwell data-center parts (B200, GB200); needs NVRTC 12.8 or newer.
    #[serde(rename = "sm_100")]
    Sm100,
}

/// Per-block resource limits of an [`Arch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchLimits {
    /// Registers one thread may use.
    pub max_registers_per_thread: u32,
    /// 32-bit registers in one SM's register file (also the most one block may hold).
    pub registers_per_sm: u32,
    /// Threads in one block.
    pub max_threads_per_block: u32,
    /// Shared memory one block may use after opting in (`cudaFuncAttributeMaxDynamicSharedMemorySize`).
    pub max_shared_bytes_per_block: u32,
    /// Statically declared (`__shared__`) memory one block may use without opting in.
    pub max_static_shared_bytes: u32,
}

/// Registers are allocated per warp in units of this many (8 per thread, rounded up).
const REGISTER_ALLOCATION_UNIT: u32 = 256;
const WARP: u32 = 32;

impl Arch {
    /// Every supported architecture, oldest first.
    pub const ALL: [Arch; 5] = [Arch::Sm80, Arch::Sm86, Arch::Sm89, Arch::Sm90, Arch::Sm100];

    /// The real-architecture name, `sm_XX` (the cubin target).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm86 => "sm_86",
            Arch::Sm89 => "sm_89",
            Arch::Sm90 => "sm_90",
            Arch::Sm100 => "sm_100",
        }
    }

    /// The matching virtual-architecture name, `compute_XX` (the PTX target).
    pub fn virtual_name(self) -> &'static str {
        match self {
            Arch::Sm80 => "compute_80",
            Arch::Sm86 => "compute_86",
            Arch::Sm89 => "compute_89",
            Arch::Sm90 => "compute_90",
            Arch::Sm100 => "compute_100",
        }
    }

    /// The compute capability `(major, minor)` the architecture is named after.
    pub fn compute_capability(self) -> (u32, u32) {
        match self {
            Arch::Sm80 => (8, 0),
            Arch::Sm86 => (8, 6),
            Arch::Sm89 => (8, 9),
            Arch::Sm90 => (9, 0),
            Arch::Sm100 => (10, 0),
        }
    }

    /// The architecture to compile for on a device of compute capability `major.minor`. A cubin
    /// for `sm_8x` runs on any `8.y` with `y >= x`, so 8.7 (Jetson Orin) uses `sm_86`.
    pub fn from_compute_capability(major: i32, minor: i32) -> Result<Arch> {
        match (major, minor) {
            (8, 0) => Ok(Arch::Sm80),
            (8, 6) | (8, 7) => Ok(Arch::Sm86),
            (8, 9) => Ok(Arch::Sm89),
            (9, 0) => Ok(Arch::Sm90),
            (10, 0) => Ok(Arch::Sm100),
            _ => Err(MoleError::Unsupported(format!(
                "compute capability {major}.{minor}: the kernels target sm_80, sm_86, sm_89, sm_90 and sm_100"
            ))),
        }
    }

    /// The architecture's resource limits (CUDA C++ Programming Guide, "Compute Capabilities").
    pub fn limits(self) -> ArchLimits {
        let max_shared_bytes_per_block = match self {
            Arch::Sm80 => 163 * 1024,
            Arch::Sm86 | Arch::Sm89 => 99 * 1024,
            Arch::Sm90 | Arch::Sm100 => 227 * 1024,
        };
        ArchLimits {
            max_registers_per_thread: 255,
            registers_per_sm: 64 * 1024,
            max_threads_per_block: 1024,
            max_shared_bytes_per_block,
            max_static_shared_bytes: 48 * 1024,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = MoleError;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Arch::ALL.into_iter().find(|a| a.name() == t || a.virtual_name() == t).ok_or_else(|| {
            MoleError::InvalidParameter {
                name: "arch",
                value: s.to_string(),
                reason: "expected one of sm_80, sm_86, sm_89, sm_90, sm_100",
            }
        })
    }
}

impl ArchLimits {
    /// Registers one block of `threads` threads holds when each uses `registers_per_thread`,
    /// counting the per-warp allocation granularity.
    pub fn registers_per_block(&self, registers_per_thread: u32, threads: u32) -> u64 {
        let per_warp = (registers_per_thread as u64 * WARP as u64).div_ceil(REGISTER_ALLOCATION_UNIT as u64)
            * REGISTER_ALLOCATION_UNIT as u64;
        per_warp * threads.div_ceil(WARP) as u64
    }

    /// The largest block (a multiple of 32 threads, at most `max_threads_per_block`) whose
    /// registers fit in one SM at `registers_per_thread`.
    pub fn max_threads_for_registers(&self, registers_per_thread: u32) -> u32 {
        let mut threads = self.max_threads_per_block;
        while threads > 0 && self.registers_per_block(registers_per_thread, threads) > self.registers_per_sm as u64 {
            threads -= WARP;
        }
        threads
    }

    /// Every way `entry` breaks these limits when launched with `threads` per block (if known)
    /// and `dynamic_shared_bytes` on top of its static shared memory. Spills count as
    /// violations: kernels in this crate are expected to keep everything in registers.
    pub fn check(&self, entry: &EntryResources, threads: Option<u32>, dynamic_shared_bytes: u64) -> Vec<Violation> {
        let mut v = Vec::new();
        if entry.spill_stores > 0 || entry.spill_loads > 0 {
            v.push(Violation::Spill { stores: entry.spill_stores, loads: entry.spill_loads });
        } else if entry.stack_frame_bytes > 0 {
            // Every entry point is a hot kernel: a stack frame without spills is an array the
            // compiler could not keep in registers, read and written through local memory.
            v.push(Violation::StackFrame { bytes: entry.stack_frame_bytes });
        }
        if entry.registers > self.max_registers_per_thread {
            v.push(Violation::RegistersPerThread { used: entry.registers, limit: self.max_registers_per_thread });
        }
        if let Some(threads) = threads {
            if threads == 0 || threads > self.max_threads_per_block {
                v.push(Violation::ThreadsPerBlock { threads, limit: self.max_threads_per_block });
            }
            let needed = self.registers_per_block(entry.registers, threads);
            if needed > self.registers_per_sm as u64 {
                v.push(Violation::RegistersPerBlock { needed, limit: self.registers_per_sm });
            }
        }
        if entry.shared_bytes > self.max_static_shared_bytes as u64 {
            v.push(Violation::StaticShared { used: entry.shared_bytes, limit: self.max_static_shared_bytes });
        }
        let shared = entry.shared_bytes + dynamic_shared_bytes;
        if shared > self.max_shared_bytes_per_block as u64 {
            v.push(Violation::SharedPerBlock { used: shared, limit: self.max_shared_bytes_per_block });
        }
        v
    }
}

/// One way a compiled entry point breaks an architecture's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Registers spilled to local memory.
    Spill {
        /// Bytes of spill stores.
        stores: u64,
        /// Bytes of spill loads.
        loads: u64,
    },
    /// A local-memory stack frame (an array indexed where the compiler cannot resolve it).
    StackFrame {
        /// Bytes of stack frame.
        bytes: u64,
    },
    /// More registers per thread than the architecture allows.
    RegistersPerThread {
        /// Registers used.
        used: u32,
        /// The limit.
        limit: u32,
    },
    /// Registers × threads exceed the register file.
    RegistersPerBlock {
        /// Registers one block needs (with allocation granularity).
        needed: u64,
        /// Registers per SM.
        limit: u32,
    },
    /// The block size is zero or too large.
    ThreadsPerBlock {
        /// Declared threads per block.
        threads: u32,
        /// The limit.
        limit: u32,
    },
    /// Static shared memory above the 48 KiB that needs no opt-in.
    StaticShared {
        /// Bytes used.
        used: u64,
        /// The limit.
        limit: u32,
    },
    /// Static plus dynamic shared memory above the opt-in maximum.
    SharedPerBlock {
        /// Bytes used.
        used: u64,
        /// The limit.
        limit: u32,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Spill { stores, loads } => write!(f, "spills ({stores} B stored, {loads} B loaded)"),
            Violation::StackFrame { bytes } => write!(f, "{bytes} B stack frame (local memory in a hot kernel)"),
            Violation::RegistersPerThread { used, limit } => write!(f, "{used} registers/thread > {limit}"),
            Violation::RegistersPerBlock { needed, limit } => write!(f, "{needed} registers/block > {limit}"),
            Violation::ThreadsPerBlock { threads, limit } => write!(f, "{threads} threads/block outside 1..={limit}"),
            Violation::StaticShared { used, limit } => write!(f, "{used} B static shared > {limit}"),
            Violation::SharedPerBlock { used, limit } => write!(f, "{used} B shared/block > {limit}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(registers: u32, shared_bytes: u64) -> EntryResources {
        EntryResources { entry: "k".into(), registers, shared_bytes, ..Default::default() }
    }

    #[test]
    fn names_parse_and_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            assert_eq!(a.virtual_name().parse::<Arch>().unwrap(), a);
            assert_eq!(a.to_string(), a.name());
            let (major, minor) = a.compute_capability();
            assert_eq!(Arch::from_compute_capability(major as i32, minor as i32).unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.name()));
        }
        assert_eq!(" SM_90 ".parse::<Arch>().unwrap(), Arch::Sm90);
        for bad in ["sm_70", "sm90", "", "sm_120"] {
            assert!(matches!(bad.parse::<Arch>(), Err(MoleError::InvalidParameter { .. })), "{bad}");
        }
        assert_eq!(Arch::from_compute_capability(8, 7).unwrap(), Arch::Sm86);
        assert!(matches!(Arch::from_compute_capability(7, 5), Err(MoleError::Unsupported(_))));
        assert!(matches!(Arch::from_compute_capability(12, 0), Err(MoleError::Unsupported(_))));
    }

    #[test]
    fn per_arch_limits() {
        let kib = 1024;
        assert_eq!(Arch::Sm80.limits().max_shared_bytes_per_block, 163 * kib);
        assert_eq!(Arch::Sm86.limits().max_shared_bytes_per_block, 99 * kib);
        assert_eq!(Arch::Sm89.limits().max_shared_bytes_per_block, 99 * kib);
        assert_eq!(Arch::Sm90.limits().max_shared_bytes_per_block, 227 * kib);
        for a in Arch::ALL {
            let l = a.limits();
            assert_eq!((l.max_registers_per_thread, l.registers_per_sm, l.max_threads_per_block), (255, 65536, 1024));
        }
    }

    #[test]
    fn register_file_accounting_uses_warp_granularity() {
        let l = Arch::Sm90.limits();
        // 32 registers x 32 threads = 1024 exactly; 33 registers round up to 40 per thread.
        assert_eq!(l.registers_per_block(32, 32), 1024);
        assert_eq!(l.registers_per_block(33, 32), 40 * 32);
        // A partial warp still takes a whole warp's registers.
        assert_eq!(l.registers_per_block(32, 33), 2048);
        assert_eq!(l.max_threads_for_registers(64), 1024);
        assert_eq!(l.max_threads_for_registers(65), 896); // 72 x 32 = 2304 per warp; 28 warps fit
        assert_eq!(l.max_threads_for_registers(128), 512);
        assert_eq!(l.max_threads_for_registers(255), 256);
    }

    #[test]
    fn check_flags_each_limit() {
        let l = Arch::Sm86.limits();
        assert!(l.check(&entry(64, 1024), Some(1024), 0).is_empty());
        assert_eq!(
            l.check(&entry(65, 0), Some(1024), 0),
            vec![Violation::RegistersPerBlock { needed: 72 * 1024, limit: 65536 }]
        );
        assert!(l.check(&entry(65, 0), None, 0).is_empty());
        let local_array = EntryResources { stack_frame_bytes: 32, ..entry(64, 0) };
        assert_eq!(l.check(&local_array, Some(256), 0), vec![Violation::StackFrame { bytes: 32 }]);
        assert_eq!(l.check(&entry(256, 0), None, 0), vec![Violation::RegistersPerThread { used: 256, limit: 255 }]);
        assert_eq!(
            l.check(&entry(8, 0), Some(2048), 0),
            vec![Violation::ThreadsPerBlock { threads: 2048, limit: 1024 }]
        );
        assert_eq!(
            l.check(&entry(8, 49 * 1024), None, 0)[0],
            Violation::StaticShared { used: 49 * 1024, limit: 48 * 1024 }
        );
        // 99 KiB is the sm_86 opt-in maximum but fits sm_80's 163 KiB.
        let big = entry(8, 40 * 1024);
        assert_eq!(
            l.check(&big, None, 60 * 1024),
            vec![Violation::SharedPerBlock { used: 100 * 1024, limit: 99 * 1024 }]
        );
        assert!(Arch::Sm80.limits().check(&big, None, 60 * 1024).is_empty());
        let spilly = EntryResources { spill_stores: 4, ..entry(32, 0) };
        assert_eq!(l.check(&spilly, None, 0), vec![Violation::Spill { stores: 4, loads: 0 }]);
    }
}
