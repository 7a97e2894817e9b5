//! Fuzzing `mole run`'s knobs: every method with any combination of `--tokens`, `--d`,
//! `--experts`, `--rank`, `--k` and `--dtype`, from zero to far past every limit. Each run must
//! exit (no panic, no abort, no signal) with a checked result, a documented no-op for zero
//! tokens, or an error naming the knob; with `MOLE_MEMORY_LIMIT` set, nothing large is allocated.

mod fuzz;

use mole::model::{Knob, Method};
use proptest::prelude::*;
use std::process::Command;

#[global_allocator]
static ALLOC: fuzz::Bounded = fuzz::Bounded;

fn knob() -> impl Strategy<Value = Option<u64>> {
    prop::option::weighted(
        0.7,
        prop_oneof![3 => 0u64..10, 1 => prop::sample::select(vec![16u64, 65, 1 << 16, 1 << 31, 1 << 52, u64::MAX])],
    )
}

proptest! {
    #![proptest_config(fuzz::config(40))]

    #[test]
    fn run_knobs_give_a_result_a_no_op_or_a_named_error(
        method in prop::sample::select(Method::ALL.to_vec()),
        tokens in prop_oneof![3 => 0u64..40, 1 => prop::sample::select(vec![65536u64, 1 << 52, u64::MAX])],
        d in prop_oneof![3 => 1u64..48, 1 => prop::sample::select(vec![0u64, 4096, 1 << 21, 1 << 40])],
        experts in knob(),
        rank in knob(),
        k in knob(),
        dtype in prop::sample::select(vec!["f32", "f16", "bf16", "half", "fp8"]),
    ) {
        let mut args = vec!["run".to_string(), "--method".into(), method.name().into(), "--tokens".into(),
            tokens.to_string(), "--d".into(), d.to_string(), "--dtype".into(), dtype.into()];
        for (flag, v) in [("--experts", experts), ("--rank", rank), ("--k", k)] {
            if let Some(v) = v {
                args.extend([flag.to_string(), v.to_string()]);
            }
        }
        let out = Command::new(env!("CARGO_BIN_EXE_mole"))
            .args(&args)
            .env("MOLE_MEMORY_LIMIT", "256M")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let cmd = args.join(" ");
        prop_assert!(out.status.code().is_some(), "{cmd}: killed by a signal\n{text}");
        prop_assert!(!text.contains("panicked") && !text.contains("memory allocation"), "{cmd}:\n{text}");
        if dtype == "fp8" || [experts, rank, k, Some(tokens), Some(d)].iter().flatten().any(|&v| v > usize::MAX as u64) {
            // clap's own errors: an unknown dtype (listing the valid ones) or a number out of range.
            prop_assert_eq!(out.status.code(), Some(2), "{}:\n{}", cmd, text);
            if dtype == "fp8" {
                prop_assert!(text.contains("[possible values: f32, f16, bf16]"), "{text}");
            }
            return Ok(());
        }
        if out.status.success() {
            if tokens == 0 {
                prop_assert!(text.contains("nothing to run") && !text.contains("time:"), "{cmd}:\n{text}");
            } else {
                prop_assert!(text.contains("check: PASS") || text.contains("check: none"), "{cmd}:\n{text}");
            }
        } else {
            prop_assert_eq!(out.status.code(), Some(1), "{}:\n{}", cmd, text);
            let err = text.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
            let names_a_knob = ["--tokens", "--d", "d_in", "experts", "rank", "k = ", "--k", "--rank", "host memory", "tokens", "cores"]
                .iter()
                .any(|n| err.contains(n));
            prop_assert!(names_a_knob, "{cmd}: the error names no knob: {err}");
            for (knob, flag, given) in [(Knob::Rank, "--rank", rank), (Knob::K, "--k", k)] {
                if given.is_some() && !method.uses(knob) {
                    prop_assert!(err.contains(&format!("{flag} {}: {method} does not take {flag}", given.unwrap())), "{cmd}: {err}");
                }
            }
        }
    }
}
