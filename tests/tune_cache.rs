//! The tuning cache's rules, CPU-only: round trip, stale entries and corrupt files ignored with
//! a warning, user results over shipped ones, `MOLE_CACHE_DIR`, and concurrent writers (threads
//! and processes) losing nothing.

use mole::autotune::candidates;
use mole::model::{Method, MethodShape};
use mole::tune::cache::{EntrySource, TUNING_SUBDIR};
use mole::tune::{store, GpuId, Provenance, ShapeKey, TunedEntry, TuningCache, TuningFile, FORMAT_VERSION};
use mole::DType;
use std::path::Path;
use std::process::Command;

fn gpu() -> GpuId {
    GpuId { name: "NVIDIA H100 80GB HBM3".into(), compute_capability: (9, 0), sm_count: 132 }
}

fn provenance() -> Provenance {
    Provenance { sources_hash: "0123456789abcdef".into(), nvrtc_version: Some((12, 4)), mole_version: "0.1.0".into() }
}

/// A distinct key per `i` (token buckets 1, 2, 4, ... then other d_out).
fn key(i: usize) -> ShapeKey {
    let shape = MethodShape { d_in: 64, d_out: 48 + 8 * (i / 20), experts: 8, rank: 4, k: 2, alpha: 8.0 };
    ShapeKey::new(&Method::MixLoraPerLinear.spec(shape).unwrap(), DType::BF16, 1 << (i % 20))
}

fn entry(i: usize, candidate: usize, p: &Provenance) -> TunedEntry {
    let c = candidates(DType::BF16)[candidate].clone();
    TunedEntry::new(key(i), c, 1.0 + i as f64, Some(2.0 + i as f64), 100.0, p)
}

fn load(dir: Option<&Path>, shipped: &[(&str, &str)]) -> (TuningCache, Vec<String>) {
    TuningCache::load_with(&gpu(), dir, shipped, &provenance())
}

#[test]
fn file_name_is_a_slug_of_the_gpu() {
    assert_eq!(gpu().file_name(), "nvidia-h100-80gb-hbm3_sm90_132sm.json");
    let odd = GpuId { name: "  NVIDIA  RTX (TM) 4090!! ".into(), compute_capability: (8, 9), sm_count: 128 };
    assert_eq!(odd.slug(), "nvidia-rtx-tm-4090_sm89_128sm");
    let empty = GpuId { name: "???".into(), compute_capability: (8, 0), sm_count: 108 };
    assert_eq!(empty.file_name(), "gpu_sm80_108sm.json");
}

#[test]
fn round_trip_through_the_user_folder() {
    let dir = tempfile::tempdir().unwrap();
    let p = provenance();
    let entries: Vec<TunedEntry> = (0..3).map(|i| entry(i, i % 2, &p)).collect();
    let stored = store(dir.path(), &gpu(), &entries).unwrap();
    assert_eq!(stored.path, dir.path().join(gpu().file_name()));
    assert_eq!((stored.entries, stored.warnings.len()), (3, 0));
    let (cache, warnings) = load(Some(dir.path()), &[]);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cache.len(), 3);
    for e in &entries {
        assert_eq!(cache.lookup(&e.key), Some(e));
        assert_eq!(cache.source(&e.key), Some(EntrySource::User));
    }
    assert_eq!(cache.lookup(&key(7)), None);
    // The file is what the docs say, configuration by value.
    let text = std::fs::read_to_string(&stored.path).unwrap();
    let file: TuningFile = serde_json::from_str(&text).unwrap();
    assert_eq!((file.format_version, &file.gpu), (FORMAT_VERSION, &gpu()));
    assert!(text.contains("\"strategy\": \"grouped\""), "{text}");
    assert!(text.contains("\"family\": \"sgmv\"") && text.contains("\"bm\": 32"), "{text}");
    // A new entry replaces the one of its key; the others stay.
    let newer = TunedEntry { time_ms: 0.5, ..entry(1, 3, &p) };
    assert_eq!(store(dir.path(), &gpu(), std::slice::from_ref(&newer)).unwrap().entries, 3);
    let (cache, _) = load(Some(dir.path()), &[]);
    assert_eq!(cache.lookup(&key(1)), Some(&newer));
    assert_eq!(cache.lookup(&key(0)), Some(&entries[0]));
    // No temporary files are left behind.
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

/// A block's entry and a layer's of the same dimensions live side by side in one file, each
/// found under its own key (the token bucket as for layers), never under the other's.
#[test]
fn block_and_layer_entries_share_the_file_under_distinct_keys() {
    use mole::autotune::space::block_candidates;
    use mole::model::{Activation, FfnMethod, FfnShape};
    let dir = tempfile::tempdir().unwrap();
    let p = provenance();
    let shape = FfnShape { d: 64, f: 48, experts: 8, rank: 4, k: 2, alpha: 8.0, activation: Activation::Silu };
    let block = FfnMethod::MixLora.spec(shape).unwrap();
    let block_key = ShapeKey::for_ffn(&block, DType::BF16, 100);
    let layer_key = ShapeKey::new(
        &Method::MixLoraPerLinear
            .spec(MethodShape { d_in: 64, d_out: 48, experts: 8, rank: 4, k: 2, alpha: 8.0 })
            .unwrap(),
        DType::BF16,
        100,
    );
    let block_entry = TunedEntry::new(block_key.clone(), block_candidates(DType::BF16)[2].clone(), 1.0, None, 1.0, &p);
    let layer_entry = TunedEntry::new(layer_key.clone(), candidates(DType::BF16)[1].clone(), 2.0, None, 1.0, &p);
    assert_eq!(store(dir.path(), &gpu(), &[block_entry.clone(), layer_entry.clone()]).unwrap().entries, 2);
    let text = std::fs::read_to_string(dir.path().join(gpu().file_name())).unwrap();
    assert!(text.contains("\"strategy\": \"ffn_block\"") && text.contains("\"family\": \"ffn\""), "{text}");
    let (cache, warnings) = load(Some(dir.path()), &[]);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cache.lookup(&block_key), Some(&block_entry));
    assert_eq!(cache.lookup(&layer_key), Some(&layer_entry));
    // Any count of the bucket (65..=128) finds the block's entry; the next bucket does not.
    assert_eq!(cache.lookup(&ShapeKey::for_ffn(&block, DType::BF16, 65)), Some(&block_entry));
    assert_eq!(cache.lookup(&ShapeKey::for_ffn(&block, DType::BF16, 129)), None);
    // Another activation or f is another shape.
    let gelu = FfnMethod::MixLora.spec(FfnShape { activation: Activation::Gelu, ..shape }).unwrap();
    assert_eq!(cache.lookup(&ShapeKey::for_ffn(&gelu, DType::BF16, 100)), None);
    let wider = FfnMethod::MixLora.spec(FfnShape { f: 56, ..shape }).unwrap();
    assert_eq!(cache.lookup(&ShapeKey::for_ffn(&wider, DType::BF16, 100)), None);
}

#[test]
fn stale_entries_are_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let p = provenance();
    let fresh = entry(0, 0, &p);
    let other_sources = entry(1, 0, &Provenance { sources_hash: "fedcba9876543210".into(), ..p.clone() });
    let other_version = entry(2, 0, &Provenance { mole_version: "0.0.9".into(), ..p.clone() });
    let other_nvrtc = entry(3, 0, &Provenance { nvrtc_version: Some((12, 6)), ..p.clone() });
    let unknown_nvrtc = entry(4, 0, &Provenance { nvrtc_version: None, ..p.clone() });
    let all = [fresh.clone(), other_sources, other_version, other_nvrtc, unknown_nvrtc.clone()];
    store(dir.path(), &gpu(), &all).unwrap();
    let (cache, warnings) = load(Some(dir.path()), &[]);
    assert_eq!(cache.len(), 2, "{warnings:?}");
    assert_eq!(cache.lookup(&fresh.key), Some(&fresh));
    assert_eq!(cache.lookup(&unknown_nvrtc.key), Some(&unknown_nvrtc), "an unknown NVRTC version is not compared");
    for k in 1..=3 {
        assert_eq!(cache.lookup(&key(k)), None, "{k}");
    }
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("stale") && w.contains("sources hash")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("mole version 0.0.9")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("NVRTC 12.6")), "{warnings:?}");
}

#[test]
fn corrupt_files_are_ignored_with_a_warning() {
    let p = provenance();
    let good = serde_json::to_string_pretty(&TuningFile {
        format_version: FORMAT_VERSION,
        gpu: gpu(),
        entries: vec![entry(0, 0, &p)],
    })
    .unwrap();
    let wrong_version = good.replacen(&format!("\"format_version\": {FORMAT_VERSION}"), "\"format_version\": 99", 1);
    assert_ne!(wrong_version, good);
    let other_gpu = good.replace("\"sm_count\": 132", "\"sm_count\": 114");
    assert_ne!(other_gpu, good);
    let bad_entry = good.replace("\"strategy\": \"grouped\"", "\"strategy\": \"warp_drive\"");
    assert_ne!(bad_entry, good);
    // A file of the layout before typed configurations (builds as define strings).
    let old_format = good.replacen(&format!("\"format_version\": {FORMAT_VERSION}"), "\"format_version\": 1", 1);
    assert_ne!(old_format, good);
    // Configurations the kernels cannot be built with, or that are not configurations.
    let bad_config = good.replacen("\"stages\": 2", "\"stages\": 7", 1);
    assert_ne!(bad_config, good);
    let bad_tile = good.replacen("\"bm\": 32", "\"bm\": 3", 1);
    assert_ne!(bad_tile, good);
    let text_value = good.replacen("\"bm\": 32", "\"bm\": \"32\"", 1);
    let unknown_family = good.replacen("\"family\": \"sgmv\"", "\"family\": \"warp\"", 1);
    assert_ne!(unknown_family, good);
    let unknown_field = good.replacen("\"bm\": 32", "\"bm\": 32, \"warps\": 4", 1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\xffnot json at all{{{".to_vec()),
        ("truncated", good.as_bytes()[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("wrong format_version", wrong_version.into_bytes()),
        ("another gpu", other_gpu.into_bytes()),
        ("unknown strategy", bad_entry.into_bytes()),
        ("format_version 1", old_format.into_bytes()),
        ("invalid stages", bad_config.into_bytes()),
        ("invalid bm", bad_tile.into_bytes()),
        ("bm as text", text_value.into_bytes()),
        ("unknown family", unknown_family.into_bytes()),
        ("unknown config field", unknown_field.into_bytes()),
        ("not an object", b"[1, 2, 3]".to_vec()),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(gpu().file_name()), &bytes).unwrap();
        let (cache, warnings) = load(Some(dir.path()), &[]);
        assert!(cache.is_empty(), "{what}");
        assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
        assert!(warnings[0].starts_with("ignoring"), "{what}: {warnings:?}");
        if what == "wrong format_version" {
            assert!(warnings[0].contains("format_version 99"), "{warnings:?}");
        }
        if what == "format_version 1" {
            assert!(warnings[0].contains("format_version 1 ") && warnings[0].contains("re-run"), "{warnings:?}");
        }
        if what == "invalid stages" {
            assert!(warnings[0].contains("stages"), "{warnings:?}");
        }
        // Shipped copies of the same bytes are ignored the same way.
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let (cache, warnings) = load(None, &[(gpu().file_name().as_str(), text.as_str())]);
        assert!(cache.is_empty() && warnings.len() == 1, "{what}: {warnings:?}");
        // Storing over a corrupt file replaces it, with a warning.
        let stored = store(dir.path(), &gpu(), &[entry(5, 0, &p)]).unwrap();
        assert_eq!(stored.entries, 1, "{what}");
        assert_eq!(stored.warnings.len(), 1, "{what}: {:?}", stored.warnings);
        assert_eq!(load(Some(dir.path()), &[]).0.len(), 1, "{what}");
    }
    // A folder where the file should be is unreadable: a warning, not a crash.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(gpu().file_name())).unwrap();
    let (cache, warnings) = load(Some(dir.path()), &[]);
    assert!(cache.is_empty() && warnings.len() == 1, "{warnings:?}");
}

#[test]
fn user_results_take_precedence_over_shipped_ones() {
    let p = provenance();
    let shipped_file = TuningFile {
        format_version: FORMAT_VERSION,
        gpu: gpu(),
        entries: vec![entry(0, 0, &p), entry(1, 0, &p), entry(2, 0, &p)],
    };
    let shipped_text = serde_json::to_string(&shipped_file).unwrap();
    let other_gpu_name = "other_sm80_108sm.json";
    let shipped = [(gpu().file_name(), shipped_text.clone()), (other_gpu_name.to_string(), shipped_text)];
    let shipped: Vec<(&str, &str)> = shipped.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();

    let dir = tempfile::tempdir().unwrap();
    let user0 = entry(0, 2, &p);
    let stale_user1 = entry(1, 3, &Provenance { mole_version: "0.0.1".into(), ..p.clone() });
    let user3 = entry(3, 1, &p);
    store(dir.path(), &gpu(), &[user0.clone(), stale_user1, user3.clone()]).unwrap();

    let (cache, warnings) = load(Some(dir.path()), &shipped);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(cache.lookup(&key(0)), Some(&user0));
    assert_eq!(cache.source(&key(0)), Some(EntrySource::User));
    // A stale user entry does not hide a fresh shipped one.
    assert_eq!(cache.lookup(&key(1)), Some(&shipped_file.entries[1]));
    assert_eq!(cache.source(&key(1)), Some(EntrySource::Shipped));
    assert_eq!(cache.source(&key(2)), Some(EntrySource::Shipped));
    assert_eq!(cache.lookup(&key(3)), Some(&user3));
    assert_eq!(cache.len(), 4);
    // Without a user folder, only the shipped file of this GPU counts.
    let (cache, warnings) = load(None, &shipped);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cache.len(), 3);
}

const CHILD_ENV: &str = "MOLE_TUNE_CACHE_TEST_CHILD";

/// Run by the other tests as a separate process (re-executing this test binary); a no-op
/// otherwise. `MOLE_TUNE_CACHE_TEST_CHILD=store:<dir>:<first key>` stores keys `first..first+20`
/// from 4 threads; `=load:<key>` checks that `TuningCache::load_for` finds that key through
/// `MOLE_CACHE_DIR`.
#[test]
fn child_process() {
    let Ok(task) = std::env::var(CHILD_ENV) else { return };
    let mut parts = task.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("store"), Some(first), Some(dir)) => {
            let first: usize = first.parse().unwrap();
            writers(Path::new(dir), first, 4, 5);
        }
        (Some("load"), Some(k), None) => {
            let (cache, warnings) = TuningCache::load_for(&gpu());
            assert!(warnings.is_empty(), "{warnings:?}");
            let k: usize = k.parse().unwrap();
            assert_eq!(cache.source(&key(k)), Some(EntrySource::User));
        }
        other => panic!("bad {CHILD_ENV}: {other:?}"),
    }
}

/// `threads` threads, each storing `per_thread` keys one `store` call at a time (each call its
/// own file handles, so the locks contend), keys `first..first + threads * per_thread`.
fn writers(dir: &Path, first: usize, threads: usize, per_thread: usize) {
    let current = Provenance::current();
    std::thread::scope(|s| {
        for t in 0..threads {
            let current = &current;
            s.spawn(move || {
                for j in 0..per_thread {
                    let i = first + t * per_thread + j;
                    store(dir, &gpu(), &[entry(i, i % 4, current)]).unwrap();
                }
            });
        }
    });
}

fn run_child(task: String, env: &[(&str, &Path)]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_process", "--nocapture", "--test-threads=1"]).env(CHILD_ENV, task);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

#[test]
fn concurrent_writers_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Two other processes with 4 threads each, and 8 threads here, all at once.
    let children: Vec<_> =
        (0..2).map(|c| run_child(format!("store:{}:{}", 100 + 20 * c, dir.path().display()), &[])).collect();
    writers(dir.path(), 0, 8, 5);
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let (cache, warnings) = TuningCache::load_with(&gpu(), Some(dir.path()), &[], &Provenance::current());
    assert!(warnings.is_empty(), "{warnings:?}");
    let expected: Vec<usize> = (0..40).chain(100..140).collect();
    let missing: Vec<usize> = expected.iter().copied().filter(|&i| cache.lookup(&key(i)).is_none()).collect();
    assert!(missing.is_empty(), "lost keys {missing:?}");
    assert_eq!(cache.len(), expected.len());
}

#[test]
fn load_for_reads_the_user_folder_under_mole_cache_dir() {
    let root = tempfile::tempdir().unwrap();
    store(&root.path().join(TUNING_SUBDIR), &gpu(), &[entry(9, 1, &Provenance::current())]).unwrap();
    let status = run_child("load:9".into(), &[("MOLE_CACHE_DIR", root.path())]).wait().unwrap();
    assert!(status.success());
}

#[test]
fn autotune_without_a_gpu_says_so_and_exits_cleanly() {
    if mole::cuda::driver_present() {
        eprintln!("note: autotune_without_a_gpu_says_so_and_exits_cleanly skipped: a CUDA driver is present");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["autotune", "--model", "llama3-8b", "--method", "mix-lora-per-linear,comol,mix-lora"])
        .env("MOLE_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("no usable GPU") && stdout.contains("nothing was tuned"), "{stdout}");
    assert!(!cache.path().join(TUNING_SUBDIR).exists(), "nothing may be written without a GPU");
    // Bad input is still an error.
    let out = Command::new(env!("CARGO_BIN_EXE_mole")).args(["autotune", "--model", "gpt-5"]).output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_mole")).args(["autotune", "--method", "mix-lora-x"]).output().unwrap();
    assert!(!out.status.success());
}

/// `nearest`: the exact bucket first, then one power of two away (the larger first at equal
/// distance), then two; nothing farther, nothing of another shape, nothing `usable` refuses.
#[test]
fn nearest_takes_the_closest_bucket_of_the_same_shape() {
    let p = provenance();
    // key(i): bucket 2^(i % 20) of one shape for i < 20; key(24): bucket 16 of another d_out.
    let (b16, b64, other) = (entry(4, 0, &p), entry(6, 1, &p), entry(24, 1, &p));
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), &gpu(), &[b16, b64, other]).unwrap();
    let (cache, warnings) = load(Some(dir.path()), &[]);
    assert!(warnings.is_empty() && cache.len() == 3, "{warnings:?}");
    let near = |i: usize| cache.nearest(&key(i), |_| true).map(|e| e.key.token_bucket);
    assert_eq!((near(4), near(6)), (Some(16), Some(64)), "exact buckets");
    assert_eq!(near(5), Some(64), "32: 16 and 64 are one power of two away, the larger first");
    assert_eq!((near(3), near(2)), (Some(16), Some(16)), "8 and 4: 16 is one and two away");
    assert_eq!((near(7), near(8)), (Some(64), Some(64)), "128 and 256");
    assert_eq!((near(1), near(9)), (None, None), "2 and 512: three powers of two from the nearest");
    assert_eq!(cache.nearest(&key(5), |e| e.key.token_bucket != 64).map(|e| e.key.token_bucket), Some(16));
    assert_eq!(cache.nearest(&key(25), |_| true).map(|e| e.key.token_bucket), Some(16), "the other shape's own");
    assert_eq!(cache.nearest(&key(27), |_| true), None, "the other shape at 128: 16 is three away");
}

/// At the top of the token range `nearest` neither wraps nor passes the largest bucket: from
/// 2^30 and 2^31 the only buckets probed above are 2^31 itself; an entry at a bucket no count
/// makes (0, a corrupt file's) is never reached by shifting.
#[test]
fn nearest_stops_at_the_largest_bucket() {
    use mole::tune::key::MAX_TOKEN_BUCKET;
    let p = provenance();
    let at = |bucket: u32, candidate: usize| {
        let mut e = entry(0, candidate, &p);
        e.key.token_bucket = bucket;
        e
    };
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), &gpu(), &[at(0, 0), at(MAX_TOKEN_BUCKET, 1)]).unwrap();
    let (cache, _) = load(Some(dir.path()), &[]);
    let near = |bucket: u32| {
        let key = ShapeKey { token_bucket: bucket, ..key(0) };
        cache.nearest(&key, |_| true).map(|e| e.key.token_bucket)
    };
    for (from, want) in [(1 << 31, Some(1 << 31)), (1 << 30, Some(1 << 31)), (1 << 29, Some(1 << 31)), (1 << 28, None)]
    {
        assert_eq!(near(from), want, "from bucket {from}");
    }
    // Without the entry at the top, the shifted buckets wrap to nothing: no entry at 0 is found.
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), &gpu(), &[at(0, 0)]).unwrap();
    let (cache, _) = load(Some(dir.path()), &[]);
    for from in [1u32 << 31, 1 << 30] {
        let key = ShapeKey { token_bucket: from, ..key(0) };
        assert_eq!(cache.nearest(&key, |_| true), None, "from bucket {from}");
    }
}
