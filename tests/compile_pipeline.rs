//! The NVRTC pipeline end to end: compiling real sources (inline smoke kernels and the embedded
//! kernel files), the ptxas report, compile errors, the disk cache, and finding NVRTC through
//! `MOLE_NVRTC_PATH`. Tests that need NVRTC print a note and pass when it is absent, unless
//! `MOLE_REQUIRE_NVRTC=1` (set by scripts/test.sh), where its absence is a failure.

use mole::cuda::{self, compile_source, Arch, CacheOutcome, Device, DiskCache, Output};
use mole::kernels::{default_builds, gating, sgmv, KernelBuild, SgmvConfig};
use mole::{DType, MoleError};
use std::path::PathBuf;
use std::process::Command;

fn nvrtc_required() -> bool {
    std::env::var("MOLE_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// Whether NVRTC is usable; prints why a test is skipped when it is not.
fn have_nvrtc(test: &str) -> bool {
    match cuda::nvrtc_status() {
        Ok(()) => true,
        Err(e) => {
            assert!(!nvrtc_required(), "MOLE_REQUIRE_NVRTC=1 but {e}");
            eprintln!("note: {test} skipped: {e}");
            false
        }
    }
}

#[test]
fn nvrtc_is_present_when_required() {
    if nvrtc_required() {
        let version = cuda::nvrtc_version().unwrap_or_else(|e| panic!("MOLE_REQUIRE_NVRTC=1 but {e}"));
        assert!(version.0 >= 12, "NVRTC {version:?} is older than the pinned 12.x");
    }
}

const HEADER: &str = r#"#pragma once
__device__ inline float smoke_square(float x) { return x * x; }
"#;

const SMOKE: &str = r#"#include "common/smoke.cuh"
#if !defined(MOLE_DTYPE_F32)
#error "the dtype define is missing"
#endif
#ifndef SMOKE_SCALE
#define SMOKE_SCALE 1
#endif
extern "C" __global__ void mole_smoke_f32(float* out, const float* in, int n) {
    __shared__ float tile[256];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? smoke_square(in[i]) * SMOKE_SCALE : 0.0f;
    __syncthreads();
    if (i < n) out[i] = tile[blockDim.x - 1 - threadIdx.x];
}
"#;

fn smoke_options(target: &str, verbose: bool) -> Vec<String> {
    let mut o = vec![
        "-std=c++17".to_string(),
        format!("--gpu-architecture={target}"),
        "-default-device".to_string(),
        "-DMOLE_DTYPE_F32".to_string(),
        "-DSMOKE_SCALE=3".to_string(),
    ];
    if verbose {
        o.push("--ptxas-options=-v".to_string());
    }
    o
}

#[test]
fn smoke_kernel_compiles_to_cubin_with_a_resource_report() {
    if !have_nvrtc("smoke_kernel_compiles_to_cubin_with_a_resource_report") {
        return;
    }
    let headers = [("common/smoke.cuh", HEADER)];
    for arch in [Arch::Sm80, Arch::Sm90] {
        let c = compile_source("smoke.cu", SMOKE, &headers, &smoke_options(arch.name(), true), Output::Cubin).unwrap();
        assert_eq!(&c.image[..4], b"\x7fELF", "a cubin is an ELF file");
        let r = c.entry("mole_smoke_f32").unwrap_or_else(|| panic!("no report in log:\n{}", c.log));
        assert_eq!(r.shared_bytes, 1024, "{}", c.log);
        assert!(r.registers > 0 && r.registers <= 32, "{r:?}");
        assert_eq!((r.spill_stores, r.spill_loads), (0, 0));
        assert!(c.log.contains(&format!("for '{}'", arch.name())), "{}", c.log);
        assert!(arch.limits().check(r, Some(256), 0).is_empty());
    }
    // Without -v there is no report, and nothing is parsed.
    let quiet = compile_source("smoke.cu", SMOKE, &headers, &smoke_options("sm_86", false), Output::Cubin).unwrap();
    assert!(quiet.resources.is_empty());
}

#[test]
fn smoke_kernel_compiles_to_ptx() {
    if !have_nvrtc("smoke_kernel_compiles_to_ptx") {
        return;
    }
    let headers = [("common/smoke.cuh", HEADER)];
    let c = compile_source("smoke.cu", SMOKE, &headers, &smoke_options("compute_80", false), Output::Ptx).unwrap();
    let ptx = String::from_utf8(c.image).unwrap();
    assert!(ptx.contains(".target sm_80"), "{ptx}");
    assert!(ptx.contains(".entry mole_smoke_f32"), "{ptx}");
    assert!(!ptx.ends_with('\0'));
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    if !have_nvrtc("compile_errors_carry_the_nvrtc_log") {
        return;
    }
    let bad = "extern \"C\" __global__ void k(float* o) { o[0] = undefined_thing; }";
    match compile_source("bad.cu", bad, &[], &smoke_options("sm_80", false), Output::Cubin) {
        Err(MoleError::NvrtcCompile { what, status, log }) => {
            assert_eq!(what, "bad.cu");
            assert!(status.contains("COMPILATION"), "{status}");
            assert!(log.contains("undefined_thing"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    // A missing define trips the source's own #error.
    let no_dtype: Vec<String> = smoke_options("sm_80", false).into_iter().filter(|o| o != "-DMOLE_DTYPE_F32").collect();
    let err = compile_source("smoke.cu", SMOKE, &[("common/smoke.cuh", HEADER)], &no_dtype, Output::Cubin).unwrap_err();
    assert!(err.to_string().contains("the dtype define is missing"), "{err}");
    // A header that is not supplied is a compile error, not a crash.
    let err = compile_source("smoke.cu", SMOKE, &[], &smoke_options("sm_80", false), Output::Cubin).unwrap_err();
    assert!(matches!(err, MoleError::NvrtcCompile { .. }), "{err}");
    // An option NVRTC does not know is reported with its log.
    let mut opts = smoke_options("sm_80", false);
    opts.push("--no-such-option".into());
    let err = compile_source("smoke.cu", SMOKE, &[("common/smoke.cuh", HEADER)], &opts, Output::Cubin).unwrap_err();
    assert!(matches!(err, MoleError::NvrtcCompile { .. }), "{err}");
    // NUL bytes are refused before NVRTC sees them.
    let err = compile_source("smoke.cu", "\0", &[], &[], Output::Cubin).unwrap_err();
    assert!(matches!(err, MoleError::InvalidParameter { .. }), "{err}");
}

#[test]
fn registered_default_builds_compile_and_hit_the_disk_cache() {
    let Some(build) = default_builds().into_iter().next() else {
        eprintln!("note: no kernel builds are registered yet");
        return;
    };
    if !have_nvrtc("registered_default_builds_compile_and_hit_the_disk_cache") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::at(dir.path());
    let (first, outcome) = cuda::cubin_cached(&build.unit().unwrap(), Arch::Sm90, Some(&cache)).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    let (second, outcome) = cuda::cubin_cached(&build.unit().unwrap(), Arch::Sm90, Some(&cache)).unwrap();
    assert_eq!((outcome, &second), (CacheOutcome::Hit, &first));
    // Damage the entry: it is recompiled and rewritten, not trusted and not a crash.
    let key = cuda::CacheKey::for_cubin(&build.unit().unwrap(), Arch::Sm90).unwrap();
    let path = cache.path(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let (third, outcome) = cuda::cubin_cached(&build.unit().unwrap(), Arch::Sm90, Some(&cache)).unwrap();
    assert_eq!((outcome, &third), (CacheOutcome::Compiled, &first));
    assert_eq!(cuda::cubin_cached(&build.unit().unwrap(), Arch::Sm90, Some(&cache)).unwrap().1, CacheOutcome::Hit);
    // Every entry point the build names is in the cubin.
    let c = cuda::compile(&build.unit().unwrap(), Arch::Sm90, Output::Cubin, true).unwrap();
    for e in &build.entry_points() {
        assert!(c.entry(e).is_some(), "{e} missing from:\n{}", c.log);
    }
}

#[test]
fn builds_are_validated_before_compiling() {
    // Tilings the kernels' static asserts would reject (the 16-bit one only for the tensor-core
    // shrink), and a block size no GPU launches.
    let bad = [
        KernelBuild::new(DType::F32, SgmvConfig { stages: 3, ..SgmvConfig::DEFAULT }),
        sgmv::build(DType::F16, SgmvConfig { block_threads: 64, bm: 8, ..SgmvConfig::DEFAULT }),
        gating::build(DType::F32, 2048),
    ];
    // Fails the same way with or without NVRTC: validation comes first.
    for b in bad {
        assert!(
            matches!(
                b.unit().and_then(|u| cuda::compile(&u, Arch::Sm80, Output::Cubin, false)),
                Err(MoleError::InvalidParameter { .. })
            ),
            "{b}"
        );
    }
}

/// The project's NVRTC installs (`scripts/install-nvrtc.sh 12` and `13`): `(major, library file)`.
fn project_nvrtc() -> Vec<(u32, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".nvrtc");
    let libs = [(12, "cu12/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"), (13, "cu13/nvidia/cu13/lib/libnvrtc.so.13")];
    let found: Vec<_> = libs.iter().map(|(m, p)| (*m, root.join(p))).filter(|(_, p)| p.is_file()).collect();
    assert!(
        !nvrtc_required() || found.len() == 2,
        "MOLE_REQUIRE_NVRTC=1 but scripts/install-nvrtc.sh 12 and 13 have not both run: {found:?}"
    );
    found
}

/// `mole info` (the binary at `exe`) run in `dir` with a clean NVRTC environment plus `env`.
fn mole_info_at(exe: &std::path::Path, dir: &std::path::Path, env: &[(&str, &std::ffi::OsStr)]) -> String {
    let mut cmd = Command::new(exe);
    cmd.arg("info").current_dir(dir);
    for var in ["LD_LIBRARY_PATH", cuda::NVRTC_PATH_ENV, "VIRTUAL_ENV", "CONDA_PREFIX", "CUDA_HOME", "CUDA_PATH"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A binary copied moments ago may still be open for writing in a child another test thread
    // forked meanwhile (ETXTBSY): try again shortly.
    let mut tries = 0;
    let out = loop {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => break r.expect("run mole info"),
        }
    };
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("NVRTC")).collect()
}

fn mole_info(env: &[(&str, &std::ffi::OsStr)]) -> String {
    mole_info_at(env!("CARGO_BIN_EXE_mole").as_ref(), &std::env::temp_dir(), env)
}

#[test]
fn mole_nvrtc_path_loads_either_major_by_file_or_folder() {
    for (major, lib) in project_nvrtc() {
        let want = format!("NVRTC: {major}.");
        let by_file = mole_info(&[(cuda::NVRTC_PATH_ENV, lib.as_os_str())]);
        assert!(by_file.contains(&want) && by_file.contains("found by MOLE_NVRTC_PATH"), "{by_file}");
        assert!(by_file.contains(&lib.display().to_string()), "the loaded file is named: {by_file}");
        let by_folder = mole_info(&[(cuda::NVRTC_PATH_ENV, lib.parent().unwrap().as_os_str())]);
        assert!(by_folder.contains(&want), "{by_folder}");
    }
    let wrong = mole_info(&[(cuda::NVRTC_PATH_ENV, "/no/such/libnvrtc.so.12".as_ref())]);
    assert!(wrong.contains("NVRTC: not available") && wrong.contains("MOLE_NVRTC_PATH"), "{wrong}");
    let relative = mole_info(&[(cuda::NVRTC_PATH_ENV, "libnvrtc.so.12".as_ref())]);
    assert!(relative.contains("not an absolute path"), "{relative}");
}

#[test]
fn nvrtc_is_found_in_each_wheel_layout_and_in_the_checkout() {
    let installs = project_nvrtc();
    if installs.is_empty() {
        eprintln!("note: no project NVRTC install; discovery test skipped");
        return;
    }
    // Inside the checkout, with no variable at all: the project's own install, newest first.
    let here = mole_info_at(env!("CARGO_BIN_EXE_mole").as_ref(), env!("CARGO_MANIFEST_DIR").as_ref(), &[]);
    if here.contains("found by library search") || (here.contains("cuda") && !here.contains(".nvrtc/")) {
        // A system NVRTC (linker cache, CUDA toolkit) comes before the wheels by design.
        eprintln!("note: this machine has a system NVRTC ({here}); wheel discovery not exercised");
        return;
    }
    let newest = installs.iter().map(|(m, _)| *m).max().unwrap();
    assert!(here.contains(&format!("NVRTC: {newest}.")) && here.contains(".nvrtc/cu"), "{here}");
    // Outside the checkout (a copy of the binary in a scratch folder): a virtual environment
    // holding the wheel, in the layout of each major.
    let scratch = tempfile::tempdir().unwrap();
    let exe = scratch.path().join("mole");
    std::fs::copy(env!("CARGO_BIN_EXE_mole"), &exe).unwrap();
    for (major, lib) in &installs {
        let venv = scratch.path().join(format!("venv{major}"));
        let layout = if *major == 13 { "nvidia/cu13" } else { "nvidia/cuda_nvrtc" };
        let site = venv.join("lib/python3.12/site-packages").join(layout);
        std::fs::create_dir_all(&site).unwrap();
        std::os::unix::fs::symlink(lib.parent().unwrap(), site.join("lib")).unwrap();
        let found = mole_info_at(&exe, scratch.path(), &[("VIRTUAL_ENV", venv.as_os_str())]);
        assert!(found.contains(&format!("NVRTC: {major}.")) && found.contains("$VIRTUAL_ENV"), "{found}");
    }
    // Nothing anywhere: a typed message that says how to install it (unless this machine's own
    // python3 carries an NVRTC wheel, which is then what is found).
    let none = mole_info_at(&exe, scratch.path(), &[]);
    assert!(
        (none.contains("not available") && none.contains("install-nvrtc.sh")) || none.contains("python3 sys.path"),
        "{none}"
    );
}

#[test]
fn a_real_compile_works_with_nvrtc_found_only_through_the_variable() {
    let Some((_, lib)) = project_nvrtc().into_iter().next() else { return };
    // libnvrtc-builtins must be found next to the library: a compile in a child run of this
    // test binary with LD_LIBRARY_PATH cleared.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["compile_in_child_process", "--exact", "--nocapture", "--test-threads=1"])
        .env_remove("LD_LIBRARY_PATH")
        .env(cuda::NVRTC_PATH_ENV, &lib)
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("child compiled"), "{text}");
}

#[test]
fn no_driver_is_a_typed_error() {
    if !cuda::driver_present() {
        assert!(matches!(Device::new(0), Err(MoleError::CudaDriverNotFound { .. })));
    }
}

const CHILD_ENV: &str = "MOLE_PIPELINE_TEST_CHILD";

/// Does its work only when started by `a_real_compile_works_with_nvrtc_found_only_through_the_variable`.
#[test]
fn compile_in_child_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let c = compile_source(
        "smoke.cu",
        SMOKE,
        &[("common/smoke.cuh", HEADER)],
        &smoke_options("sm_90", true),
        Output::Cubin,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.entry("mole_smoke_f32").is_some());
    println!("child compiled");
}
