//! Limits on every size that comes from user input (a layer spec, tensor headers, command-line
//! knobs), checked arithmetic on them, and the memory checks made before anything is allocated.
//!
//! Every size is multiplied out with checked arithmetic ([`elements`], [`Footprint`]): a product
//! that overflows is [`MoleError::TooLarge`], never a wrapped length. Before a CPU path allocates
//! a layer's buffers, their total is checked against the host memory available
//! ([`check_host`]: `MemAvailable` of `/proc/meminfo`, capped by `MOLE_MEMORY_LIMIT` or
//! [`set_host_memory_limit`]); before a GPU path uploads or allocates, against the device's free
//! memory (`Device::check_memory`). Either failure names the input and the bytes it would need.

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

/// Checks that `data` holds exactly `shape.iter().product()` elements (a product that
/// overflows is [`MoleError::TooLarge`], never a wrapped length).
pub fn check_len<T>(what: &'static str, data: &[T], shape: &[usize]) -> Result<()> {
    check_count(what, data.len(), shape)
}

/// [`check_len`] of a buffer's element count `len`.
pub fn check_count(what: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    if len != elements(what, shape)? {
        return Err(MoleError::ShapeMismatch { what, expected: shape.to_vec(), got: len });
    }
    Ok(())
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

pub use crate::error::format_bytes;

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
}
