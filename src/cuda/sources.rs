//! The CUDA sources under `kernels/` and the PTX under `ptx/`, embedded at build time by
//! `build.rs`: the library never reads them from disk, so a binary works wherever it is copied.

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// The contents of one kernel file, by its path relative to `kernels/` (e.g. `"gating.cu"`,
/// `"common/math.cuh"`).
pub fn source(path: &str) -> Option<&'static str> {
    embedded::KERNEL_FILES.iter().find(|(p, _)| *p == path).map(|&(_, text)| text)
}

/// Every embedded kernel file (`*.cu` and `*.cuh`) as `(path, contents)`, sorted by path.
pub fn files() -> impl Iterator<Item = (&'static str, &'static str)> {
    embedded::KERNEL_FILES.iter().copied()
}

/// The headers (`*.cuh`, e.g. `common/x.cuh`) as `(name, contents)`. They are handed to NVRTC as
/// in-memory headers under exactly these names, so sources write `#include "common/x.cuh"`
/// (also from inside another header: names are not resolved relative to the includer).
pub fn headers() -> impl Iterator<Item = (&'static str, &'static str)> {
    files().filter(|(p, _)| p.ends_with(".cuh"))
}

/// A stable 64-bit hash (FNV-1a) of every embedded kernel file, names included. Changes whenever
/// any source or header changes; part of every compiled-module cache key.
pub fn sources_hash() -> u64 {
    embedded::KERNEL_SOURCES_HASH
}

/// A hash of what one translation unit can see: `source_file` and every header. Used to tell
/// whether the shipped PTX of one family is stale without invalidating the others.
pub fn unit_hash(source_file: &str) -> Option<u64> {
    let text = source(source_file)?;
    let mut h = Fnv1a::new();
    h.field(source_file.as_bytes()).field(text.as_bytes());
    for (name, text) in headers() {
        h.field(name.as_bytes()).field(text.as_bytes());
    }
    Some(h.finish())
}

/// The embedded copy of a file under `ptx/` (e.g. `"gating_f16.ptx"`, `"manifest.json"`).
pub fn shipped_ptx_file(name: &str) -> Option<&'static str> {
    embedded::PTX_FILES.iter().find(|(p, _)| *p == name).map(|&(_, text)| text)
}

/// The shipped tuning files under `tuning/` (`*.json`) as `(path relative to `tuning/`,
/// contents)`, sorted by path; read by [`crate::tune::TuningCache`].
pub fn shipped_tuning_files() -> impl Iterator<Item = (&'static str, &'static str)> {
    embedded::TUNING_FILES.iter().copied()
}

/// FNV-1a 64, the crate's hash for cache keys and source fingerprints (not for security: every
/// use also stores or compares the full hashed input where a collision would matter).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Hashes a length-prefixed field, so that field boundaries are part of the hash.
    pub(crate) fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes(&(bytes.len() as u64).to_le_bytes()).bytes(bytes)
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_vectors() {
        // Reference values of the 64-bit FNV-1a test suite.
        assert_eq!(Fnv1a::new().finish(), 0xcbf29ce484222325);
        assert_eq!(Fnv1a::new().bytes(b"a").finish(), 0xaf63dc4c8601ec8c);
        assert_eq!(Fnv1a::new().bytes(b"foobar").finish(), 0x85944171f73967e8);
    }

    #[test]
    fn build_script_hash_agrees_with_the_library() {
        let mut h = Fnv1a::new();
        for (path, text) in files() {
            h.field(path.as_bytes()).field(text.as_bytes());
        }
        assert_eq!(h.finish(), sources_hash());
    }

    #[test]
    fn files_are_sorted_and_only_cuda_sources() {
        let names: Vec<_> = files().map(|(p, _)| p).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert!(names.iter().all(|p| p.ends_with(".cu") || p.ends_with(".cuh")), "{names:?}");
        assert!(headers().all(|(p, _)| p.ends_with(".cuh")));
        for (p, text) in files() {
            assert_eq!(source(p), Some(text));
        }
        assert_eq!(source("no/such/file.cu"), None);
    }

    #[test]
    fn unit_hash_depends_on_the_file() {
        assert_eq!(unit_hash("no_such_family.cu"), None);
        for (p, _) in files().filter(|(p, _)| p.ends_with(".cu")) {
            assert_eq!(unit_hash(p), unit_hash(p));
        }
    }
}
