//! Writes `include/mole.h` from the C ABI crate with cbindgen; with `--check`, writes nothing and
//! fails when the checked-in header differs (what CI runs).

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let capi = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = capi.join("../include/mole.h");
    let check = std::env::args().any(|a| a == "--check");
    let config = match cbindgen::Config::from_file(capi.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gen-header: capi/cbindgen.toml: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bindings = match cbindgen::Builder::new().with_crate(capi).with_config(config).generate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gen-header: cbindgen failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut text = Vec::new();
    bindings.write(&mut text);
    let current = std::fs::read(&header).unwrap_or_default();
    if check {
        if current != text {
            eprintln!(
                "include/mole.h is stale: regenerate it with `cargo run -p mole-c --features gen-header --bin gen-header`"
            );
            return ExitCode::FAILURE;
        }
        println!("include/mole.h is up to date");
    } else if current != text {
        if let Err(e) = std::fs::write(&header, &text) {
            eprintln!("gen-header: cannot write {}: {e}", header.display());
            return ExitCode::FAILURE;
        }
        println!("wrote include/mole.h");
    }
    ExitCode::SUCCESS
}
