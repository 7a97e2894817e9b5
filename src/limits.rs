//! Limits on every size that comes from user input (a layer spec, tensor headers, command-line
//! knobs), checked arithmetic on them, and the memory checks made before anything is allocated.
//!
//! Every size is multiplied out with checked arithmetic ([`elements`], [`Footprint`]): a product
//! that overflows is [`MoleError::TooLarge`], never a wrapped length. Before a CPU path allocates
//! a layer's buffers, their total is checked against the host memory available
//! ([`check_host`]: `MemAvailable` of `/proc/meminfo`, capped by `MOLE_MEMORY_LIMIT` or
//! [`set_host_memory_limit`]); before a GPU path uploads or allocates, against the device's free
//! memory ([`check_device`]). Either failure names the input and the bytes it would need.

use crate::model::{LayerSpec, Router};
use crate::{MoleError, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest `d_in` / `d_out` (and `--d`): 2^20.
pub const MAX_DIM: usize = 1 << 20;
/// Largest number of experts (bank experts, adapters, CoMoL cores): 2^16.
pub const MAX_EXPERTS: usize = 1 << 16;
/// Largest total rank `R` of a bank: 2^16.
pub const MAX_TOTAL_RANK: usize = 1 << 16;
/// Largest number of tokens of one call: 2^24.
pub const MAX_TOKENS: usize = 1 << 24;
/// Largest layer spec file read: 4 MiB (explicit offsets of the largest bank fit easily).
pub const MAX_SPEC_BYTES: u64 = 4 << 20;

/// The environment variable that caps the host memory `mole` plans to use (bytes, or with a
/// `K`, `M` or `G` suffix, powers of 1024).
pub const MEMORY_LIMIT_ENV: &str = "MOLE_MEMORY_LIMIT";

/// `u64::MAX` means no limit set in code.
static HOST_LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Checks `value <= max` for a named input, e.g. `check_max("d_in", 5_000_000, MAX_DIM)`.
pub fn check_max(what: &str, value: usize, max: usize) -> Result<()> {
    if value > max {
        return Err(MoleError::TooLarge {
            what: what.to_string(),
            value: value.to_string(),
            limit: format!("at most {max}"),
        });
    }
    Ok(())
}

/// The number of elements of a tensor of shape `dims`, or [`MoleError::TooLarge`] naming it
/// when the product overflows.
pub fn elements(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| MoleError::TooLarge {
        what: what.to_string(),
        value: format!("{dims:?}"),
        limit: "the element count overflows".into(),
    })
}

/// A running total of bytes to allocate, each term multiplied out with checked arithmetic.
#[derive(Clone, Debug, Default)]
pub struct Footprint {
    bytes: u64,
}

impl Footprint {
    /// An empty total.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor of shape `dims` with elements of `elem_bytes` bytes.
    pub fn add(mut self, what: &str, dims: &[usize], elem_bytes: usize) -> Result<Self> {
        let n = elements(what, dims)? as u64;
        let overflow = || MoleError::TooLarge {
            what: what.to_string(),
            value: format!("{dims:?} x {elem_bytes} bytes"),
            limit: "the byte count overflows".into(),
        };
        let b = n.checked_mul(elem_bytes as u64).ok_or_else(overflow)?;
        self.bytes = self.bytes.checked_add(b).ok_or_else(overflow)?;
        Ok(self)
    }

    /// The total in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The bytes the f64 reference ([`crate::reference::forward`]) allocates for `spec` on `tokens`
/// tokens: the inputs widened to f64, `h`, `h'`, the scores and probabilities, the routing and
/// the output `y`, each counted once (an upper bound, not a measurement).
pub fn reference_bytes(spec: &LayerSpec, tokens: usize) -> Result<u64> {
    let (t, r, e) = (tokens, spec.total_rank(), spec.routed_experts());
    let (d_in, d_out, slots) = (spec.d_in, spec.d_out, spec.slots());
    let w_rows = if matches!(spec.router(), Some(Router::H { .. })) { r } else { d_in };
    let merge_threads = if spec.core_count() > 0 { rayon::current_num_threads() } else { 0 };
    Ok(Footprint::new()
        .add("x [T, d_in]", &[2, t, d_in], 8)?
        .add("A [d_in, R]", &[d_in, r], 8)?
        .add("B [R, d_out]", &[r, d_out], 8)?
        .add("y [T, d_out]", &[3, t, d_out], 8)?
        .add("h and h' [T, R]", &[3, t, r], 8)?
        .add("scores and probabilities [T, E]", &[4, t, e], 8)?
        .add("router_weight", &[w_rows, e], 8)?
        .add("routing [T, slots]", &[t, slots], 12)?
        .add("cores [C, R, R]", &[spec.core_count(), r, r], 8)?
        // The core merge builds one merged [R, R] core per token, one at a time per thread.
        .add("merged cores [threads, R, R]", &[merge_threads, r, r], 8)?
        .bytes())
}

/// Sets (or with `None` clears) a cap on the host memory `mole` plans to use, below the
/// machine's available memory, for this process; `MOLE_MEMORY_LIMIT` (read at every check) is
/// the same cap from the environment. `MemAvailable` does not see cgroup limits: in a container,
/// set one of the two.
pub fn set_host_memory_limit(bytes: Option<u64>) {
    HOST_LIMIT.store(bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Parses a byte count: digits, optionally followed by `K`, `M` or `G` (powers of 1024).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last()?.to_ascii_uppercase() {
        'K' => (&t[..t.len() - 1], 10),
        'M' => (&t[..t.len() - 1], 20),
        'G' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// The host memory available now: `MemAvailable` of `/proc/meminfo`, capped by the limit set in
/// code or by `MOLE_MEMORY_LIMIT`; `None` where neither is known.
pub fn available_host_memory() -> Result<Option<u64>> {
    let set = HOST_LIMIT.load(Ordering::Relaxed);
    let env =
        match std::env::var(MEMORY_LIMIT_ENV) {
            Ok(v) => Some(parse_bytes(&v).ok_or_else(|| {
                MoleError::param(MEMORY_LIMIT_ENV, v, "expected a byte count such as 4294967296 or 4G")
            })?),
            Err(_) => None,
        };
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kb.checked_mul(1024)
    });
    let limits = [(set != u64::MAX).then_some(set), env, meminfo];
    Ok(limits.into_iter().flatten().min())
}

/// Checks that `bytes` of host memory are available for `what` (name the input that sized it)
/// before allocating them.
pub fn check_host(what: &str, bytes: u64) -> Result<()> {
    match available_host_memory()? {
        Some(available) if bytes > available => {
            Err(MoleError::OutOfMemory { what: what.to_string(), needed: bytes, available, memory: "host" })
        }
        _ => Ok(()),
    }
}

/// Checks that `bytes` of device memory are free on `device` for `what` before allocating them.
pub fn check_device(device: &crate::cuda::Device, what: &str, bytes: u64) -> Result<()> {
    let (free, _total) = device.context().mem_get_info().map_err(crate::cuda::cuda_err("cuMemGetInfo"))?;
    if bytes > free as u64 {
        return Err(MoleError::OutOfMemory {
            what: what.to_string(),
            needed: bytes,
            available: free as u64,
            memory: "device",
        });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_overflow_are_errors() {
        assert_eq!(elements("x", &[3, 4]).unwrap(), 12);
        assert_eq!(elements("x", &[]).unwrap(), 1);
        let e = elements("x [T, d_in]", &[1 << 52, 4096]).unwrap_err();
        assert!(e.to_string().contains("x [T, d_in] = [4503599627370496, 4096] is too large"), "{e}");
        assert!(Footprint::new().add("y", &[1 << 40, 1 << 22], 8).is_err());
        assert_eq!(Footprint::new().add("a", &[2, 3], 8).unwrap().add("b", &[5], 4).unwrap().bytes(), 68);
    }

    #[test]
    fn byte_counts_parse_and_print() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("64M"), Some(64 << 20));
        assert_eq!(parse_bytes("2g"), Some(2 << 30));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("99999999999G"), None);
        assert_eq!(format_bytes(512), "512 bytes");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn host_check_names_the_input_and_the_need() {
        // Far more than any machine has: refused whatever the cap.
        let e = check_host("--tokens 65536", u64::MAX / 2).unwrap_err();
        assert!(matches!(e, MoleError::OutOfMemory { memory: "host", .. }), "{e}");
        assert!(e.to_string().starts_with("--tokens 65536 would need 8192.0 PiB of host memory"), "{e}");
        assert!(check_host("a little", 1024).is_ok());
    }

    #[test]
    fn only_core_merge_layers_count_cores() {
        use crate::model::{Method, MethodShape};
        // A serving bank of 1024 adapters at r = 16 on d = 64: a few MiB, not E·R² cores.
        let shape = MethodShape { d_in: 64, d_out: 64, experts: 1024, rank: 16, k: 2, alpha: 32.0 };
        let serving = Method::AdapterServing.spec(shape).unwrap();
        let bytes = reference_bytes(&serving, 4).unwrap();
        assert!(bytes < 32 << 20, "{}", format_bytes(bytes));
        assert!(check_host("adapter serving", bytes).is_ok());
        // CoMoL's C cores of [R, R] are counted, with one merged core per thread.
        let comol = Method::Comol.spec(MethodShape { experts: 8, rank: 64, ..shape }).unwrap();
        let with_cores = reference_bytes(&comol, 4).unwrap();
        let cores = (8 + rayon::current_num_threads() as u64) * 64 * 64 * 8;
        assert!(with_cores >= cores, "{} < {}", format_bytes(with_cores), format_bytes(cores));
    }
}
