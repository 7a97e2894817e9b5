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
    for method in ["mix-lora", "dyn-mole", "smora", "comol", "adapter-serving"] {
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
        for kind in ["grouped", "layer"] {
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
