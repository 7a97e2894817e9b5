//! Compiles every `../kernels/*.cu` (once per element type) and every `tests/kernels/*.cu` as C++
//! against the host runtime, together with the runtime itself, into one static library.
//!
//! A kernel unit goes through three steps:
//! 1. preprocess a wrapper that includes `common/host/runtime.h`, then the kernel file inside a
//!    namespace of its own (so units of different element types never collide);
//! 2. rewrite the marker tokens the host header leaves behind (see `rewrite`), collecting the
//!    kernel names;
//! 3. compile the result, with a registration function appended that hands every kernel, with
//!    its parameter types, to the runtime.
//!
//! A project kernel that does not compile for the CPU does not fail the build (kernels change
//! under active development): it is reported as a cargo warning and listed, with the compiler
//! output, by `mole_hostexec::unit_failures()`. The test kernels under `tests/kernels` and the
//! runtime must compile cleanly (`-Werror`).

#[path = "build_support/rewrite.rs"]
mod rewrite;

use rewrite::{c_string, rewrite};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Element types a project kernel is built for: (define, name).
const DTYPES: [(&str, &str); 3] = [("MOLE_DTYPE_F32", "f32"), ("MOLE_DTYPE_F16", "f16"), ("MOLE_DTYPE_BF16", "bf16")];

struct Unit {
    index: usize,
    /// Path relative to its kernel folder, e.g. `gating.cu`.
    file: String,
    source: PathBuf,
    /// Element type name, or "" for test kernels.
    dtype: &'static str,
    define: &'static str,
    /// Test kernels must build; project kernels may fail (reported, not fatal).
    strict: bool,
}

enum Outcome {
    Built { object: PathBuf },
    Failed { log: String },
}

fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn build_unit(unit: &Unit, base: &Command, kernels: &Path, out: &Path) -> Outcome {
    let stem = format!("unit_{}", unit.index);
    let namespace = format!("mole_hx_{stem}");
    let wrapper = out.join(format!("{stem}.cpp"));
    let wrapper_text = format!(
        "#include \"common/host/runtime.h\"\nnamespace {namespace} {{\n#include \"{}\"\n}}  // namespace {namespace}\n",
        unit.source.display()
    );
    fs::write(&wrapper, wrapper_text).expect("writing a unit wrapper");
    let run = |args: &[&str], extra: &[&Path]| -> Result<String, String> {
        let mut cmd = Command::new(base.get_program());
        cmd.args(base.get_args()).arg(format!("-I{}", kernels.display()));
        cmd.arg("-DMOLE_HOST_ARCH_HEADER=\"common/host/runtime.h\"").arg(format!("-D{}", unit.define));
        cmd.args(args).args(extra);
        let o = cmd.output().map_err(|e| format!("running the C++ compiler: {e}"))?;
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() {
            Ok(log)
        } else {
            Err(log)
        }
    };
    let pre = out.join(format!("{stem}.pre.ii"));
    if let Err(log) = run(&["-E", "-x", "c++", "-o", pre.to_str().unwrap()], &[&wrapper]) {
        return Outcome::Failed { log };
    }
    let text = fs::read_to_string(&pre).expect("reading preprocessed unit");
    let (mut text, names) = match rewrite(&text) {
        Ok(r) => r,
        Err(log) => return Outcome::Failed { log: format!("{}: {log}", unit.file) },
    };
    let _ = writeln!(text, "\nextern \"C\" void {namespace}_register(void* r) {{");
    for name in &names {
        let _ = writeln!(text, "    ::mole_host::register_kernel(r, {}, &::{namespace}::{name});", c_string(name));
    }
    text.push_str("}\n");
    let ii = out.join(format!("{stem}.ii"));
    let object = out.join(format!("{stem}.o"));
    // Unchanged preprocessed text (same flags, same compiler): the object of the last build
    // stands. A change to one kernel file then recompiles only its own units.
    if object.exists() && fs::read_to_string(&ii).is_ok_and(|old| old == text) {
        return Outcome::Built { object };
    }
    let _ = fs::remove_file(&object);
    fs::write(&ii, text).expect("writing rewritten unit");
    let mut flags = vec!["-c", "-Wall", "-o", object.to_str().unwrap()];
    if unit.strict {
        flags.extend(["-Wextra", "-Werror"]);
    }
    match run(&flags, &[&ii]) {
        Ok(log) => {
            for line in log.lines().filter(|l| l.contains("warning:")) {
                println!("cargo:warning=hostexec {} ({}): {line}", unit.file, unit.dtype);
            }
            Outcome::Built { object }
        }
        Err(log) => {
            let _ = fs::remove_file(&ii); // never pair this text with an older object
            Outcome::Failed { log }
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels = manifest.join("../kernels").canonicalize().expect("the kernels/ folder next to hostexec/");
    let test_kernels = manifest.join("tests/kernels");
    let cpp = manifest.join("cpp");
    for p in [&kernels, &test_kernels, &cpp] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_support");
    println!("cargo:rerun-if-env-changed=MOLE_HOSTEXEC_UCONTEXT");
    let ucontext = std::env::var_os("MOLE_HOSTEXEC_UCONTEXT").is_some_and(|v| v == "1");

    let mut build = cc::Build::new();
    build.cpp(true).std("c++20").opt_level(2).debug(false).warnings(false);
    // Kernels pun shared memory between types (as CUDA allows): no strict-aliasing assumptions.
    build.flag("-fno-strict-aliasing").flag("-U_FORTIFY_SOURCE");
    if ucontext {
        build.define("MOLE_HOSTEXEC_UCONTEXT", None);
    }
    let base = build.get_compiler().to_command();

    let mut units = Vec::new();
    for source in cu_files(&kernels) {
        for (define, dtype) in DTYPES {
            let file = source.file_name().unwrap().to_string_lossy().into_owned();
            units.push(Unit { index: units.len(), file, source: source.clone(), dtype, define, strict: false });
        }
    }
    for source in cu_files(&test_kernels) {
        let file = format!("tests/kernels/{}", source.file_name().unwrap().to_string_lossy());
        units.push(Unit { index: units.len(), file, source, dtype: "", define: "MOLE_DTYPE_F32", strict: true });
    }

    // Compile the units in parallel (they are independent and each takes a second or two).
    let outcomes: Mutex<Vec<Option<Outcome>>> = Mutex::new((0..units.len()).map(|_| None).collect());
    let next = Mutex::new(0usize);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(units.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    *n += 1;
                    *n - 1
                };
                let Some(unit) = units.get(i) else { break };
                let outcome = build_unit(unit, &base, &kernels, &out);
                outcomes.lock().unwrap()[i] = Some(outcome);
            });
        }
    });

    let mut registry = String::from(
        "#include <cstddef>\nstruct mole_hx_unit { const char* file; const char* dtype; \
         void (*register_kernels)(void*); const char* error; };\n",
    );
    let mut table = String::new();
    let mut objects = Vec::new();
    for (unit, outcome) in units.iter().zip(outcomes.into_inner().unwrap()) {
        match outcome.expect("every unit ran") {
            Outcome::Built { object } => {
                let _ = writeln!(registry, "extern \"C\" void mole_hx_unit_{}_register(void*);", unit.index);
                let _ = writeln!(
                    table,
                    "    {{{}, {}, &mole_hx_unit_{}_register, nullptr}},",
                    c_string(&unit.file),
                    c_string(unit.dtype),
                    unit.index
                );
                objects.push(object);
            }
            Outcome::Failed { log } => {
                if unit.strict {
                    panic!("hostexec: {} does not compile for the CPU:\n{log}", unit.file);
                }
                let first = log.lines().find(|l| l.contains("error")).unwrap_or("see unit_failures()");
                println!(
                    "cargo:warning=hostexec: {} ({}) does not compile for the CPU: {first}",
                    unit.file, unit.dtype
                );
                let _ = writeln!(
                    table,
                    "    {{{}, {}, nullptr, {}}},",
                    c_string(&unit.file),
                    c_string(unit.dtype),
                    c_string(&log)
                );
            }
        }
    }
    let _ = write!(
        registry,
        "extern \"C\" const mole_hx_unit mole_hx_units[] = {{\n{table}    {{nullptr, nullptr, nullptr, nullptr}}\n}};\n\
         extern \"C\" const std::size_t mole_hx_unit_count = {};\n",
        units.len()
    );
    let registry_path = out.join("registry.cpp");
    fs::write(&registry_path, registry).expect("writing registry.cpp");

    build.include(&kernels).include(&cpp).flag("-Wall").flag("-Wextra").flag("-Werror");
    for f in ["fiber.cpp", "launch.cpp", "memory.cpp", "sched.cpp", "warp.cpp"] {
        build.file(cpp.join(f));
    }
    build.file(&registry_path);
    for o in &objects {
        build.object(o);
    }
    build.compile("mole_hostexec");
}
