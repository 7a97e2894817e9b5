//! Embeds the CUDA sources under `kernels/` and the shipped PTX under `ptx/` into the crate, so
//! the library compiles kernels at run time without knowing where it was built.
//!
//! Generates `$OUT_DIR/embedded.rs` with `KERNEL_FILES` (path relative to `kernels/`, contents),
//! `KERNEL_SOURCES_HASH` (FNV-1a 64 over every embedded kernel file) and `PTX_FILES` (file name
//! relative to `ptx/`, contents). `src/cuda/sources.rs` recomputes the hash with the same
//! function in a unit test, so the two implementations cannot drift apart.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Every file under `dir` (recursively) whose name ends in one of `exts`, as
/// (path relative to `dir` with `/` separators, absolute path), sorted by relative path.
fn collect(dir: &Path, exts: &[&str]) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("reading {}: {e}", d.display())).path();
            if path.is_dir() {
                println!("cargo:rerun-if-changed={}", path.display());
                stack.push(path);
            } else if exts.iter().any(|e| path.to_string_lossy().ends_with(e)) {
                let rel = path.strip_prefix(dir).expect("walked from dir").to_string_lossy().replace('\\', "/");
                out.push((rel, path));
            }
        }
    }
    out.sort();
    out
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let ptx = root.join("ptx");
    let tuning = root.join("tuning");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", tuning.display());
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", ptx.display());

    let mut code = String::new();
    let mut hash = FNV_OFFSET;
    code.push_str("/// Kernel sources: (path relative to `kernels/`, contents), sorted by path.\n");
    code.push_str("pub(crate) static KERNEL_FILES: &[(&str, &str)] = &[\n");
    for (rel, path) in collect(&kernels, &[".cu", ".cuh"]) {
        println!("cargo:rerun-if-changed={}", path.display());
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (kernel sources must be UTF-8)", path.display()));
        // Length-prefixed so that moving bytes between a name and its contents changes the hash.
        hash = fnv1a(hash, &(rel.len() as u64).to_le_bytes());
        hash = fnv1a(hash, rel.as_bytes());
        hash = fnv1a(hash, &(text.len() as u64).to_le_bytes());
        hash = fnv1a(hash, text.as_bytes());
        writeln!(code, "    ({rel:?}, include_str!({:?})),", path.display().to_string()).unwrap();
    }
    code.push_str("];\n\n");
    writeln!(code, "/// FNV-1a 64 over every entry of [`KERNEL_FILES`].\npub(crate) const KERNEL_SOURCES_HASH: u64 = {hash:#018x};\n").unwrap();

    code.push_str("/// Shipped PTX and its manifest: (path relative to `ptx/`, contents), sorted by path.\n");
    code.push_str("pub(crate) static PTX_FILES: &[(&str, &str)] = &[\n");
    for (rel, path) in collect(&ptx, &[".ptx", "manifest.json"]) {
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(code, "    ({rel:?}, include_str!({:?})),", path.display().to_string()).unwrap();
    }
    code.push_str("];\n\n");

    code.push_str("/// Shipped tuning results: (path relative to `tuning/`, contents), sorted by path.\n");
    code.push_str("pub(crate) static TUNING_FILES: &[(&str, &str)] = &[\n");
    for (rel, path) in collect(&tuning, &[".json"]) {
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(code, "    ({rel:?}, include_str!({:?})),", path.display().to_string()).unwrap();
    }
    code.push_str("];\n");

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("embedded.rs");
    // Rewrite only on change so dependents are not rebuilt needlessly.
    if fs::read_to_string(&out).ok().as_deref() != Some(code.as_str()) {
        fs::write(&out, code).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}
