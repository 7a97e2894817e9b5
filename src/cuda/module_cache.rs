//! The on-disk cache of compiled kernels, and the key that names an entry.
//!
//! An entry is valid only for the exact inputs of its compilation: the kernel sources, the
//! build (dtype and typed configuration, as canonical JSON), the NVRTC options, the NVRTC version, the architecture and the
//! output kind. The key is the canonical text of all of these; its hash names the file and the
//! full text is stored inside it and compared on load, so a hash collision or a damaged file is
//! a miss (and a recompile), never a wrong kernel or a crash.

use super::arch::Arch;
use super::compile::{compile, compile_options, CompileUnit, Output};
use super::nvrtc::nvrtc_version;
use super::sources::{sources_hash, Fnv1a};
use crate::{MoleError, Result};
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Environment variable that overrides the cache folder.
pub const CACHE_DIR_ENV: &str = "MOLE_CACHE_DIR";

/// Everything a compiled image depends on, in canonical form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    canonical: String,
    hash: u64,
    stem: String,
    output: Output,
}

#[derive(Serialize)]
struct KeyFields<'a> {
    mole: &'a str,
    sources_hash: String,
    unit: &'a str,
    arch: Arch,
    output: Output,
    options: &'a [String],
    nvrtc_version: (i32, i32),
}

impl CacheKey {
    /// The key of `unit` compiled for `arch` as `output` with `options`, by NVRTC
    /// `nvrtc_version`, from sources hashing to `sources_hash`. The unit takes part as its
    /// identity (a build's canonical JSON: dtype, family and every configuration field).
    pub fn new(
        unit: &CompileUnit,
        arch: Arch,
        output: Output,
        options: &[String],
        nvrtc_version: (i32, i32),
        sources_hash: u64,
    ) -> Self {
        let fields = KeyFields {
            mole: env!("CARGO_PKG_VERSION"),
            sources_hash: format!("{sources_hash:016x}"),
            unit: &unit.identity,
            arch,
            output,
            options,
            nvrtc_version,
        };
        // Serialising plain strings, numbers, unit enums and the build's structs cannot fail.
        let canonical = serde_json::to_string(&fields).unwrap_or_default();
        let hash = Fnv1a::new().bytes(canonical.as_bytes()).finish();
        let stem = format!("{}_{}_{hash:016x}", unit.stem, arch);
        CacheKey { canonical, hash, stem, output }
    }

    /// The key for the cubin the library itself compiles for `unit` on `arch`, with the
    /// embedded sources and the loaded NVRTC.
    pub fn for_cubin(unit: &CompileUnit, arch: Arch) -> Result<Self> {
        let options = compile_options(unit, arch, Output::Cubin, false);
        Ok(CacheKey::new(unit, arch, Output::Cubin, &options, nvrtc_version()?, sources_hash()))
    }

    /// The canonical text of all inputs (stored in the cache file and compared on load).
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// A 64-bit hash of [`CacheKey::canonical`].
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The cache file name, e.g. `gating_f16_sm_90_0123456789abcdef.cubin`.
    pub fn file_name(&self) -> String {
        let ext = match self.output {
            Output::Cubin => "cubin",
            Output::Ptx => "ptx",
        };
        format!("{}.{ext}", self.stem)
    }
}

/// The cache folder from an environment lookup: `MOLE_CACHE_DIR`, else `$XDG_CACHE_HOME/mole`,
/// else `$HOME/.cache/mole`. Relative values of the XDG and HOME variables are ignored, as the
/// XDG base-directory specification asks; `None` means no disk cache.
pub fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(CACHE_DIR_ENV) {
        return Some(dir);
    }
    if let Some(xdg) = set("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("mole"));
    }
    set("HOME").filter(|p| p.is_absolute()).map(|home| home.join(".cache").join("mole"))
}

/// The cache folder for this process's environment (see [`cache_dir_from`]).
pub fn default_cache_dir() -> Option<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

const MAGIC: &[u8; 12] = b"MOLE-CACHE1\n";

/// A folder of compiled images, one file per [`CacheKey`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// A cache in `dir` (created on the first store).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        DiskCache { dir: dir.into() }
    }

    /// The cache in [`default_cache_dir`], if the environment names one.
    pub fn from_env() -> Option<Self> {
        default_cache_dir().map(DiskCache::at)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for `key` lives.
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// The image stored for `key`, or `None` when there is none or the file is unreadable,
    /// truncated, damaged or written for other inputs.
    pub fn load(&self, key: &CacheKey) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        decode(&bytes, key.canonical())
    }

    /// Stores `image` for `key`. The file appears complete or not at all: it is written under a
    /// unique temporary name in the same folder and renamed into place, so concurrent writers
    /// and readers of one entry never see a partial file.
    pub fn store(&self, key: &CacheKey, image: &[u8]) -> Result<PathBuf> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let io = |what: &str, path: &Path, e: std::io::Error| MoleError::io(format!("{what} {}", path.display()), e);
        std::fs::create_dir_all(&self.dir).map_err(|e| io("creating cache folder", &self.dir, e))?;
        let path = self.path(key);
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            key.file_name(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = std::fs::write(&tmp, encode(key.canonical(), image))
            .map_err(|e| io("writing", &tmp, e))
            .and_then(|_| std::fs::rename(&tmp, &path).map_err(|e| io("renaming into", &path, e)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map(|_| path)
    }
}

/// `MAGIC | key length (u32 LE) | key | image length (u64 LE) | FNV-1a of image (u64 LE) | image`.
fn encode(canonical: &str, image: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 20 + canonical.len() + image.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(canonical.len() as u32).to_le_bytes());
    out.extend_from_slice(canonical.as_bytes());
    out.extend_from_slice(&(image.len() as u64).to_le_bytes());
    out.extend_from_slice(&Fnv1a::new().bytes(image).finish().to_le_bytes());
    out.extend_from_slice(image);
    out
}

/// Splits `n` bytes off the front of `bytes`.
fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Some(head)
}

fn decode(mut bytes: &[u8], canonical: &str) -> Option<Vec<u8>> {
    let b = &mut bytes;
    if take(b, MAGIC.len())? != MAGIC {
        return None;
    }
    let key_len = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
    if take(b, key_len)? != canonical.as_bytes() {
        return None;
    }
    let image_len = u64::from_le_bytes(take(b, 8)?.try_into().ok()?);
    let checksum = u64::from_le_bytes(take(b, 8)?.try_into().ok()?);
    if image_len != b.len() as u64 || image_len == 0 || Fnv1a::new().bytes(b).finish() != checksum {
        return None;
    }
    Some(b.to_vec())
}

/// Where a compiled image came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the disk cache.
    Hit,
    /// Compiled now (and stored, if a cache was given and the store succeeded).
    Compiled,
}

/// The cubin of `unit` for `arch`: from `cache` when it holds a valid entry, else compiled
/// with NVRTC and stored. A failed store is not an error: the cache only saves time.
pub fn cubin_cached(unit: &CompileUnit, arch: Arch, cache: Option<&DiskCache>) -> Result<(Vec<u8>, CacheOutcome)> {
    let key = CacheKey::for_cubin(unit, arch)?;
    load_or_compile(&key, cache, || Ok(compile(unit, arch, Output::Cubin, false)?.image))
}

/// The image for `key` from `cache`, or from `compile` (then stored).
fn load_or_compile(
    key: &CacheKey,
    cache: Option<&DiskCache>,
    compile: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, CacheOutcome)> {
    if let Some(image) = cache.and_then(|c| c.load(key)) {
        return Ok((image, CacheOutcome::Hit));
    }
    let image = compile()?;
    if let Some(cache) = cache {
        let _ = cache.store(key, &image);
    }
    Ok((image, CacheOutcome::Compiled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{fused, gating, sgmv, FusedConfig, KernelBuild, SgmvConfig};
    use crate::DType;

    fn build() -> KernelBuild {
        gating::build(DType::F16, 64)
    }

    fn key_of(b: &KernelBuild, arch: Arch, output: Output, nvrtc: (i32, i32), hash: u64) -> CacheKey {
        let u = b.unit().unwrap();
        CacheKey::new(&u, arch, output, &compile_options(&u, arch, output, false), nvrtc, hash)
    }

    #[test]
    fn key_changes_with_every_input() {
        let b = build();
        let base = key_of(&b, Arch::Sm90, Output::Cubin, (12, 4), 1);
        assert_eq!(base, key_of(&b, Arch::Sm90, Output::Cubin, (12, 4), 1));
        let variants = [
            key_of(&b, Arch::Sm90, Output::Cubin, (12, 4), 2),
            key_of(&b, Arch::Sm80, Output::Cubin, (12, 4), 1),
            key_of(&b, Arch::Sm90, Output::Ptx, (12, 4), 1),
            key_of(&b, Arch::Sm90, Output::Cubin, (12, 8), 1),
            key_of(&KernelBuild { dtype: DType::BF16, ..b.clone() }, Arch::Sm90, Output::Cubin, (12, 4), 1),
            key_of(&gating::build(DType::F16, 128), Arch::Sm90, Output::Cubin, (12, 4), 1),
            CacheKey::new(&b.unit().unwrap(), Arch::Sm90, Output::Cubin, &["-O3".into()], (12, 4), 1),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(v.canonical(), base.canonical(), "variant {i}");
            assert_ne!(v.hash(), base.hash(), "variant {i}");
            assert_ne!(v.file_name(), base.file_name(), "variant {i}");
        }
        assert!(base.file_name().starts_with("gating_f16_sm_90_") && base.file_name().ends_with(".cubin"));
    }

    /// The build takes part in the key by itself (not only through the define options): with
    /// the options fixed, changing any one configuration field changes the key.
    #[test]
    fn key_changes_with_every_config_field() {
        let key = |b: &KernelBuild| CacheKey::new(&b.unit().unwrap(), Arch::Sm90, Output::Cubin, &[], (12, 4), 1);
        let s = SgmvConfig::DEFAULT;
        let f = FusedConfig::DEFAULT;
        let sgmv_variants = [
            SgmvConfig { block_threads: 256, ..s },
            SgmvConfig { bm: 64, ..s },
            SgmvConfig { bn: 64, ..s },
            SgmvConfig { rc: 16, ..s },
            SgmvConfig { kc: 32, ..s },
            SgmvConfig { splits: 4, ..s },
            SgmvConfig { stages: 1, ..s },
        ];
        let fused_variants = [
            FusedConfig { block_threads: 128, ..f },
            FusedConfig { bt: 32, ..f },
            FusedConfig { kc: 64, ..f },
            FusedConfig { max_cols: 128, ..f },
        ];
        let families = [
            (sgmv::build(DType::F16, s), sgmv_variants.map(|c| sgmv::build(DType::F16, c)).to_vec()),
            (fused::build(DType::F16, f), fused_variants.map(|c| fused::build(DType::F16, c)).to_vec()),
            (gating::build(DType::F16, 128), vec![gating::build(DType::F16, 256)]),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (base, variants) in families {
            assert!(seen.insert(key(&base).hash()), "{base}");
            for v in variants {
                assert_ne!(key(&v).canonical(), key(&base).canonical(), "{v}");
                assert!(seen.insert(key(&v).hash()), "{v}: same key as another build");
            }
        }
        // The same tiling of another family is another key.
        let g = key(&gating::build(DType::F16, 256));
        assert!(g.canonical().contains(r#"\"family\":\"gating\""#), "{}", g.canonical());
    }

    #[test]
    fn cache_dir_precedence() {
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v))
        }
        let all = [(CACHE_DIR_ENV, "/m"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(cache_dir_from(env(&all)), Some(PathBuf::from("/m")));
        assert_eq!(cache_dir_from(env(&all[1..])), Some(PathBuf::from("/x/mole")));
        assert_eq!(cache_dir_from(env(&all[2..])), Some(PathBuf::from("/h/.cache/mole")));
        assert_eq!(
            cache_dir_from(env(&[(CACHE_DIR_ENV, ""), ("XDG_CACHE_HOME", "rel"), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/mole"))
        );
        assert_eq!(cache_dir_from(env(&[("HOME", "relative")])), None);
        assert_eq!(cache_dir_from(env(&[])), None);
    }

    #[test]
    fn store_then_load_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(dir.path().join("nested"));
        let key = key_of(&build(), Arch::Sm80, Output::Cubin, (12, 4), 7);
        assert_eq!(cache.load(&key), None);
        let image = b"\x7fELF\0\0binary\0".to_vec();
        let path = cache.store(&key, &image).unwrap();
        assert_eq!(path, cache.path(&key));
        assert_eq!(cache.load(&key), Some(image.clone()));
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from(key.file_name())]);
        // Overwriting replaces the entry.
        cache.store(&key, b"second").unwrap();
        assert_eq!(cache.load(&key), Some(b"second".to_vec()));
    }

    #[test]
    fn damaged_or_foreign_entries_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(dir.path());
        let key = key_of(&build(), Arch::Sm80, Output::Cubin, (12, 4), 7);
        let other = key_of(&build(), Arch::Sm86, Output::Cubin, (12, 4), 7);
        let good = encode(key.canonical(), b"image bytes");
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let mut longer = good.clone();
        longer.push(0);
        let damaged: Vec<Vec<u8>> = vec![
            vec![],
            b"garbage".to_vec(),
            good[..good.len() - 1].to_vec(),
            good[..MAGIC.len() + 2].to_vec(),
            flipped,
            longer,
            encode(other.canonical(), b"image bytes"),
            encode(key.canonical(), b""),
            {
                let mut huge_key = good.clone();
                huge_key[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&u32::MAX.to_le_bytes());
                huge_key
            },
        ];
        for (i, bytes) in damaged.iter().enumerate() {
            std::fs::write(cache.path(&key), bytes).unwrap();
            assert_eq!(cache.load(&key), None, "case {i}");
        }
        std::fs::write(cache.path(&key), &good).unwrap();
        assert_eq!(cache.load(&key), Some(b"image bytes".to_vec()));
        // A folder where the file should be is a miss too, and a store over it fails cleanly.
        let blocked = key_of(&build(), Arch::Sm89, Output::Cubin, (12, 4), 7);
        std::fs::create_dir(cache.path(&blocked)).unwrap();
        assert_eq!(cache.load(&blocked), None);
        assert!(matches!(cache.store(&blocked, b"x"), Err(MoleError::Io { .. })));
        let leftovers = std::fs::read_dir(cache.dir())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        assert_eq!(leftovers.count(), 0);
    }

    #[test]
    fn a_damaged_entry_is_recompiled_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(dir.path());
        let key = key_of(&build(), Arch::Sm90, Output::Cubin, (12, 4), 3);
        let calls = std::cell::Cell::new(0);
        let compile = || {
            calls.set(calls.get() + 1);
            Ok(b"fresh image".to_vec())
        };
        std::fs::write(cache.path(&key), b"MOLE-CACHE1\n\xff\xff").unwrap();
        assert_eq!(
            load_or_compile(&key, Some(&cache), compile).unwrap(),
            (b"fresh image".to_vec(), CacheOutcome::Compiled)
        );
        assert_eq!(load_or_compile(&key, Some(&cache), compile).unwrap(), (b"fresh image".to_vec(), CacheOutcome::Hit));
        assert_eq!(calls.get(), 1);
        // Without a cache every call compiles; a failed compile is passed through.
        assert_eq!(load_or_compile(&key, None, compile).unwrap().1, CacheOutcome::Compiled);
        assert_eq!(calls.get(), 2);
        let failed = load_or_compile(&key_of(&build(), Arch::Sm80, Output::Cubin, (12, 4), 3), Some(&cache), || {
            Err(MoleError::Unsupported("boom".into()))
        });
        assert_eq!(failed, Err(MoleError::Unsupported("boom".into())));
    }
}
