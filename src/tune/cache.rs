//! The tuning cache: one JSON file per GPU, entries storing the chosen configuration by value.
//!
//! File `<gpu slug>.json` ([`GpuId::file_name`]) holds a [`TuningFile`]. An entry is used only
//! while it is fresh: same kernel-source hash, same crate version and (when both are known) same
//! NVRTC version as the running process ([`Provenance`]). Stale entries, unreadable or corrupt
//! files and files of another format version are ignored with a warning, never an error.
//!
//! Precedence: the user's cache folder (`<``default_cache_dir``>/tuning/`, so
//! `MOLE_CACHE_DIR` moves it) over the files shipped in the repository's `tuning/` folder
//! (embedded at build time). [`store`] merges under an exclusive file lock and replaces the file
//! atomically, so concurrent tuning processes lose nothing and readers never see a partial file.

use super::key::ShapeKey;
use super::{Candidate, Strategy};
use crate::cuda::{default_cache_dir, nvrtc_version, sources, Device};
use crate::kernels::KernelBuild;
use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The version of the file layout this crate reads and writes. Version 2 stores each build as
/// its typed configuration (`{"dtype":..,"config":{"family":..,..}}`) where version 1 stored
/// define strings; files of version 1 are ignored as stale (re-run `mole autotune`).
pub const FORMAT_VERSION: u32 = 2;
/// The folder under the cache folder that holds the user's tuning files.
pub const TUNING_SUBDIR: &str = "tuning";

/// The GPU a tuning file belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuId {
    /// Marketing name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
}

impl GpuId {
    /// The GPU of `device`.
    pub fn of_device(device: &Device) -> GpuId {
        let (major, minor) = device.compute_capability();
        GpuId {
            name: device.name().to_string(),
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            sm_count: device.sm_count(),
        }
    }

    /// `nvidia-h100-80gb-hbm3_sm90_132sm`: the name lower-cased with every run of other
    /// characters than ASCII letters and digits turned into one `-`.
    pub fn slug(&self) -> String {
        let mut name = String::new();
        for c in self.name.chars() {
            if c.is_ascii_alphanumeric() {
                name.push(c.to_ascii_lowercase());
            } else if !name.is_empty() && !name.ends_with('-') {
                name.push('-');
            }
        }
        let name = name.trim_end_matches('-');
        let name = if name.is_empty() { "gpu" } else { name };
        let (major, minor) = self.compute_capability;
        format!("{name}_sm{major}{minor}_{}sm", self.sm_count)
    }

    /// The tuning file name: [`GpuId::slug`] + `.json`.
    pub fn file_name(&self) -> String {
        format!("{}.json", self.slug())
    }
}

/// What a tuning result was measured with; an entry is fresh only for the same values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// Hex of `sources::sources_hash` (16 digits).
    pub sources_hash: String,
    /// NVRTC's version, when NVRTC is loaded.
    pub nvrtc_version: Option<(i32, i32)>,
    /// The crate version.
    pub mole_version: String,
}

impl Provenance {
    /// The running crate's values.
    pub fn current() -> Provenance {
        Provenance {
            sources_hash: format!("{:016x}", sources::sources_hash()),
            nvrtc_version: nvrtc_version().ok(),
            mole_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Why `entry` is stale for these values, or `None` when it is fresh. NVRTC versions are
    /// compared only when both are known.
    pub fn staleness(&self, entry: &TunedEntry) -> Option<String> {
        if entry.sources_hash != self.sources_hash {
            return Some(format!("kernel sources hash {} != {}", entry.sources_hash, self.sources_hash));
        }
        if entry.mole_version != self.mole_version {
            return Some(format!("mole version {} != {}", entry.mole_version, self.mole_version));
        }
        match (entry.nvrtc_version, self.nvrtc_version) {
            (Some(a), Some(b)) if a != b => Some(format!("NVRTC {}.{} != {}.{}", a.0, a.1, b.0, b.1)),
            _ => None,
        }
    }
}

/// One tuned shape: the winner, by value, with what it was measured against.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedEntry {
    /// The shape.
    pub key: ShapeKey,
    /// The chosen strategy.
    pub strategy: Strategy,
    /// The chosen configuration (dtype and typed family configuration), checked when read.
    pub build: KernelBuild,
    /// Median time of the winner, ms.
    pub time_ms: f64,
    /// Median time of the default (candidate 0), ms, when it was measured and correct.
    pub default_time_ms: Option<f64>,
    /// Effective bandwidth of the winner, GB/s.
    pub gbs: f64,
    /// Hex of the kernel-source hash it was measured with.
    pub sources_hash: String,
    /// NVRTC version it was compiled with, when known.
    pub nvrtc_version: Option<(i32, i32)>,
    /// Crate version it was measured with.
    pub mole_version: String,
}

impl TunedEntry {
    /// An entry for `key` won by `candidate`, stamped with `provenance`.
    pub fn new(
        key: ShapeKey,
        candidate: Candidate,
        time_ms: f64,
        default_time_ms: Option<f64>,
        gbs: f64,
        provenance: &Provenance,
    ) -> Self {
        TunedEntry {
            key,
            strategy: candidate.strategy,
            build: candidate.build,
            time_ms,
            default_time_ms,
            gbs,
            sources_hash: provenance.sources_hash.clone(),
            nvrtc_version: provenance.nvrtc_version,
            mole_version: provenance.mole_version.clone(),
        }
    }

    /// The winner as a candidate.
    pub fn candidate(&self) -> Candidate {
        Candidate { strategy: self.strategy, build: self.build.clone() }
    }

    /// `default_time_ms / time_ms`, when the default was measured.
    pub fn speedup(&self) -> Option<f64> {
        self.default_time_ms.filter(|d| d.is_finite() && self.time_ms > 0.0).map(|d| d / self.time_ms)
    }
}

/// The contents of one tuning file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuningFile {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The GPU.
    pub gpu: GpuId,
    /// The tuned shapes, sorted by key.
    pub entries: Vec<TunedEntry>,
}

#[derive(Deserialize)]
struct Header {
    format_version: u32,
}

impl TuningFile {
    /// Parses a tuning file; `origin` names it in errors. Errors on malformed JSON, on a
    /// build whose configuration is invalid, and on a format version other than
    /// [`FORMAT_VERSION`].
    pub fn parse(text: &str, origin: &str) -> Result<TuningFile> {
        let bad = |e: serde_json::Error| MoleError::io(format!("parsing tuning file {origin}"), e);
        let header: Header = serde_json::from_str(text).map_err(bad)?;
        if header.format_version != FORMAT_VERSION {
            let hint = if header.format_version < FORMAT_VERSION {
                " (written by an older mole: re-run `mole autotune`)"
            } else {
                " (written by a newer mole)"
            };
            return Err(MoleError::io(
                format!("tuning file {origin}"),
                format!("format_version {} is not the supported {FORMAT_VERSION}{hint}", header.format_version),
            ));
        }
        serde_json::from_str(text).map_err(bad)
    }
}

/// Where a cached entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntrySource {
    /// The user's cache folder.
    User,
    /// A file shipped in `tuning/`.
    Shipped,
}

/// The fresh tuned entries of one GPU, user results over shipped ones.
#[derive(Clone, Debug)]
pub struct TuningCache {
    gpu: GpuId,
    entries: HashMap<ShapeKey, (TunedEntry, EntrySource)>,
}

/// The user's tuning folder: `<``default_cache_dir``>/tuning`, if the environment names one.
pub fn user_tuning_dir() -> Option<PathBuf> {
    default_cache_dir().map(|d| d.join(TUNING_SUBDIR))
}

impl TuningCache {
    /// The cache of `gpu` for this process: the user folder ([`user_tuning_dir`]) over the
    /// embedded shipped files, checked against `Provenance::current`. Never fails; every file
    /// or entry that is skipped is explained in the returned warnings.
    pub fn load_for(gpu: &GpuId) -> (TuningCache, Vec<String>) {
        let shipped: Vec<(&str, &str)> = sources::shipped_tuning_files().collect();
        TuningCache::load_with(gpu, user_tuning_dir().as_deref(), &shipped, &Provenance::current())
    }

    /// [`TuningCache::load_for`] with explicit inputs: the user folder (if any), the shipped
    /// files as `(file name, contents)`, and the values entries must match.
    pub fn load_with(
        gpu: &GpuId,
        user_dir: Option<&Path>,
        shipped: &[(&str, &str)],
        provenance: &Provenance,
    ) -> (TuningCache, Vec<String>) {
        let mut cache = TuningCache { gpu: gpu.clone(), entries: HashMap::new() };
        let mut warnings = Vec::new();
        let name = gpu.file_name();
        for (file, text) in shipped.iter().filter(|(f, _)| *f == name) {
            cache.add(&format!("tuning/{file} (shipped)"), text, EntrySource::Shipped, provenance, &mut warnings);
        }
        if let Some(dir) = user_dir {
            let path = dir.join(&name);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let origin = path.display().to_string();
                    cache.add(&origin, &text, EntrySource::User, provenance, &mut warnings);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warnings.push(format!("ignoring tuning file {}: {e}", path.display())),
            }
        }
        (cache, warnings)
    }

    fn add(&mut self, origin: &str, text: &str, source: EntrySource, p: &Provenance, warnings: &mut Vec<String>) {
        let file = match TuningFile::parse(text, origin) {
            Ok(f) => f,
            Err(e) => return warnings.push(format!("ignoring {e}")),
        };
        if file.gpu != self.gpu {
            return warnings.push(format!("ignoring tuning file {origin}: it is for {:?}", file.gpu));
        }
        for entry in file.entries {
            if let Some(why) = p.staleness(&entry) {
                warnings.push(format!("ignoring stale tuning entry {} in {origin}: {why}", entry.key));
            } else {
                self.entries.insert(entry.key.clone(), (entry, source));
            }
        }
    }

    /// A cache of `entries` as given (no file, no freshness check), for tests of the choices.
    #[cfg(test)]
    pub(crate) fn from_entries(gpu: GpuId, entries: Vec<TunedEntry>) -> TuningCache {
        let entries = entries.into_iter().map(|e| (e.key.clone(), (e, EntrySource::User))).collect();
        TuningCache { gpu, entries }
    }

    /// The GPU.
    pub fn gpu(&self) -> &GpuId {
        &self.gpu
    }

    /// The fresh entry for `key`, if any.
    pub fn lookup(&self, key: &ShapeKey) -> Option<&TunedEntry> {
        self.entries.get(key).map(|(e, _)| e)
    }

    /// The entry for `key`'s shape tuned at the nearest token bucket that `usable` accepts:
    /// `key`'s own bucket, else one or two powers of two away (up to 4 times fewer or more
    /// tokens), nearer first and, at equal distance, the larger bucket first; `None` beyond.
    /// What vLLM's per-GPU configurations do with the nearest batch size, bounded: a
    /// configuration tuned for decode says nothing of prefill. Probes at most five keys.
    pub fn nearest(&self, key: &ShapeKey, usable: impl Fn(&TunedEntry) -> bool) -> Option<&TunedEntry> {
        let b = key.token_bucket;
        // In u64: a shift out of u32's range is a bucket past the largest, not a wrapped one.
        let up = |d: u32| u32::try_from(u64::from(b) << d).ok().filter(|&u| u <= super::key::MAX_TOKEN_BUCKET);
        let down = |d: u32| (b >> d >= 1).then_some(b >> d);
        [Some(b), up(1), down(1), up(2), down(2)]
            .into_iter()
            .flatten()
            .filter_map(|bucket| self.lookup(&ShapeKey { token_bucket: bucket, ..key.clone() }))
            .find(|e| usable(e))
    }

    /// Where the entry for `key` came from.
    pub fn source(&self, key: &ShapeKey) -> Option<EntrySource> {
        self.entries.get(key).map(|(_, s)| *s)
    }

    /// Number of fresh entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no fresh entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What [`store`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The file written.
    pub path: PathBuf,
    /// Entries in the file after the merge.
    pub entries: usize,
    /// What was dropped from the previous file (unreadable, corrupt, other GPU or format).
    pub warnings: Vec<String>,
}

/// Merges `entries` into `dir/<gpu file name>`: under an exclusive lock on `<file>.lock`, the
/// current file is re-read, each new entry replaces the one of the same key, and the result is
/// written to a temporary file in `dir` and renamed into place. A corrupt or foreign previous
/// file is replaced (said in [`Stored::warnings`]).
pub fn store(dir: &Path, gpu: &GpuId, entries: &[TunedEntry]) -> Result<Stored> {
    let io = |what: &str, path: &Path, e: std::io::Error| MoleError::io(format!("{what} {}", path.display()), e);
    std::fs::create_dir_all(dir).map_err(|e| io("creating tuning folder", dir, e))?;
    let name = gpu.file_name();
    let path = dir.join(&name);
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io("opening", &lock_path, e))?;
    lock.lock().map_err(|e| io("locking", &lock_path, e))?;

    let mut warnings = Vec::new();
    let previous = std::fs::read(&path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let mut merged: Vec<TunedEntry> = match previous {
        Ok(text) => match TuningFile::parse(&text, &path.display().to_string()) {
            Ok(f) if f.gpu == *gpu => f.entries,
            Ok(f) => {
                warnings.push(format!("replacing {}: it was for {:?}", path.display(), f.gpu));
                Vec::new()
            }
            Err(e) => {
                warnings.push(format!("replacing unreadable {e}"));
                Vec::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io("reading", &path, e)),
    };
    for new in entries {
        merged.retain(|old| old.key != new.key);
        merged.push(new.clone());
    }
    merged.sort_by(|a, b| a.key.sort_key().cmp(&b.key.sort_key()));
    let count = merged.len();
    let file = TuningFile { format_version: FORMAT_VERSION, gpu: gpu.clone(), entries: merged };
    let text = serde_json::to_string_pretty(&file).map_err(|e| MoleError::io("serialising tuning file", e))?;

    let written = crate::outfile::write_atomic(&path, format!("{text}\n").as_bytes());
    // Closing the handle releases the lock as well; unlocking first keeps the order explicit.
    let _ = lock.unlock();
    written.map(|_| Stored { path, entries: count, warnings })
}
