//! The `mole` commands a user runs first: the main job, `info` and `bench`, on whatever this
//! machine has (without a GPU they must say so and succeed, never panic).

use std::process::Command;

fn mole(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mole")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn main_job_checks_against_the_reference() {
    for method in ["mix-lora-per-linear", "dyn-mole", "smora", "comol", "adapter-serving"] {
        let (ok, text) =
            mole(&["run", "--method", method, "--tokens", "33", "--d", "96", "--experts", "6", "--rank", "4"]);
        assert!(ok, "{method}: {text}");
        // Without a GPU, CoMoL's CPU path is the reference itself and says there is nothing to check.
        let checked = text.contains("check: PASS") || (method == "comol" && text.contains("check: none"));
        assert!(checked && text.contains("backend: "), "{method}: {text}");
    }
}

#[test]
fn info_and_bench_never_panic() {
    let (ok, text) = mole(&["info"]);
    assert!(ok && text.contains("CUDA driver:") && text.contains("NVRTC:"), "{text}");
    if mole::cuda::Device::new(0).is_err() {
        for kind in ["grouped", "layer", "ffn"] {
            let (ok, text) = mole(&["bench", kind]);
            assert!(ok && text.contains("no usable GPU"), "{kind}: {text}");
        }
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let (ok, text) = mole(&["run", "--experts", "4", "--k", "5", "--tokens", "4", "--d", "16"]);
    assert!(!ok && text.contains("k = 5 is invalid for 4 experts"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn every_method_checks_its_own_knobs_and_names_the_wrong_one() {
    let small = ["--tokens", "4", "--d", "16"];
    let run = |extra: &[&str]| mole(&[&["run"][..], &small[..], extra].concat());
    // SMoRA's scale is alpha / k: k = 0 is refused by name, not turned into an infinite scale.
    let (ok, text) = run(&["--method", "smora", "--k", "0"]);
    assert!(!ok && text.contains("k = 0 is invalid for 8 experts"), "{text}");
    // DynMoLE reads no k: one expert runs, and an explicit --k is refused by name.
    let (ok, text) = run(&["--method", "dyn-mole", "--experts", "1"]);
    assert!(ok && text.contains("E=1"), "{text}");
    let (ok, text) = run(&["--method", "dyn-mole", "--experts", "1", "--k", "1"]);
    assert!(!ok && text.contains("--k 1: dyn-mole does not take --k"), "{text}");
    // FlyLoRA's experts are single ranks: --rank is refused, not silently replaced by 1.
    let (ok, text) = run(&["--method", "fly-lora", "--rank", "16"]);
    assert!(!ok && text.contains("--rank 16: fly-lora does not take --rank"), "{text}");
    // X-LoRA refuses k > E like every other top-k method.
    let (ok, text) = run(&["--method", "x-lora", "--k", "9"]);
    assert!(!ok && text.contains("k = 9 is invalid for 8 experts"), "{text}");
    // Sizes past the limits, and products that would wrap, are refused before any allocation.
    let (ok, text) = mole(&["run", "--tokens", "4503599627370496", "--d", "4096"]);
    assert!(!ok && text.contains("--tokens = 4503599627370496 is too large: at most 16777216"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["run", "--tokens", "65536"])
        .env("MOLE_MEMORY_LIMIT", "1G")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && text.contains("mole run --tokens 65536 --d 4096")
            && text.contains("of host memory but 1.0 GiB is available"),
        "{text}"
    );
}

#[test]
fn zero_tokens_is_a_no_op_without_throughput() {
    let (ok, text) = mole(&["run", "--tokens", "0", "--d", "16"]);
    assert!(ok && text.contains("nothing to run") && !text.contains("time:") && !text.contains("PASS"), "{text}");
}

#[test]
fn help_lists_the_dtypes_and_the_cpu_path_counts_f64_bytes() {
    let (ok, text) = mole(&["run", "--help"]);
    assert!(ok && text.contains("f32") && text.contains("f16") && text.contains("bf16"), "{text}");
    let (ok, text) = mole(&["run", "--dtype", "fp8"]);
    assert!(!ok && text.contains("[possible values: f32, f16, bf16]"), "{text}");
    if mole::cuda::Device::new(0).is_err() {
        // 8 bytes · (100 · (256 + 2 · 256) + 16 · (256 + 256)) = 679,936 bytes: f64, not bf16's 0.2 MB.
        let args = ["--tokens", "100", "--d", "256", "--experts", "4", "--rank", "4", "--dtype", "bf16"];
        let (ok, text) = mole(&[&["run", "--method", "mix-lora-per-linear"][..], &args[..]].concat());
        assert!(ok && text.contains("of the 0.7 MB that must move"), "{text}");
    }
}

#[test]
fn the_block_runs_by_default_and_checks_its_knobs() {
    let small = ["--d", "64", "--f", "96", "--experts", "6", "--rank", "4"];
    let run = |extra: &[&str]| mole(&[&["run"][..], &small[..], extra].concat());
    // The default method is the block; without --tokens the CPU picks (and prints) a count.
    let (ok, text) = run(&[]);
    assert!(ok && text.contains("block: mix-lora d=64 f=96 E=6 r=4 slots/token=2 activation=silu"), "{text}");
    assert!(text.contains("tokens: 2048 (no --tokens") && text.contains("check: PASS"), "{text}");
    let (ok, text) = run(&["--method", "mix-lora-dynamic", "--activation", "gelu", "--tokens", "9", "--dtype", "f32"]);
    assert!(ok && text.contains("slots/token=6 activation=gelu T=9") && text.contains("check: PASS"), "{text}");
    // Knobs the preset does not read are refused by name.
    let (ok, text) = run(&["--method", "mix-lora-dynamic", "--k", "2", "--tokens", "4"]);
    assert!(!ok && text.contains("--k 2: mix-lora-dynamic does not take --k"), "{text}");
    let (ok, text) = mole(&["run", "--method", "dyn-mole", "--f", "96", "--tokens", "4", "--d", "16"]);
    assert!(!ok && text.contains("--f 96: dyn-mole does not take --f"), "{text}");
    let (ok, text) = mole(&["run", "--method", "smora", "--activation", "gelu", "--tokens", "4", "--d", "16"]);
    assert!(!ok && text.contains("--activation gelu: smora does not take --activation"), "{text}");
    let (ok, text) = mole(&["run", "--f", "0", "--tokens", "4", "--d", "16"]);
    assert!(!ok && text.contains("f must be positive"), "{text}");
    // --help lists both kinds of preset.
    let (ok, text) = mole(&["run", "--help"]);
    for name in ["mix-lora,", "mix-lora-dynamic,", "mix-lora-per-linear,", "mix-lora-dynamic-per-linear,", "comol"] {
        assert!(ok && text.contains(name), "{name}: {text}");
    }
}

#[test]
fn gen_ptx_finds_the_checkout_or_asks_for_a_folder() {
    let outside = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["gen-ptx", "--check"])
        .current_dir(outside.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("is not inside a mole checkout") && text.contains("--dir"),
        "{text}"
    );
}
